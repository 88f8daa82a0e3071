import json

import pytest
import torch
from conftest import TINY, evaluate, torchrun

from common.data import ShardedEvalSampler
from common.distributed import DistEnv, cuda_device_of, init_distributed, read_dist_env
from common.log import UserError


def test_torchrun_variables():
    env = read_dist_env({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"})
    assert (env.rank, env.local_rank, env.world_size, env.is_main, env.distributed) == (5, 1, 8, False, True)


def test_slurm_variables():
    env = read_dist_env({"SLURM_PROCID": "3", "SLURM_LOCALID": "3", "SLURM_NTASKS": "16", "MASTER_ADDR": "node1"})
    assert (env.rank, env.local_rank, env.world_size) == (3, 3, 16)


def test_an_srun_step_smaller_than_the_allocation():
    env = read_dist_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "2", "MASTER_ADDR": "n"})
    assert (env.rank, env.world_size) == (1, 2)


@pytest.mark.parametrize("local_rank,visible,expected", [(1, 1, 0), (3, 1, 0), (3, 8, 3), (5, 4, 1)])
def test_each_rank_takes_a_gpu_it_can_see(monkeypatch, local_rank, visible, expected):
    # srun --gpus-per-task=1 shows every task only its own GPU, as cuda:0, whatever its local rank
    monkeypatch.setattr("torch.cuda.device_count", lambda: visible)
    assert cuda_device_of(local_rank) == torch.device("cuda", expected)


@pytest.mark.parametrize("flag,device,expected", [(None, "cuda", "nccl"), ("gloo", "cuda", "gloo"),
                                                   (None, "cpu", "gloo"), ("gloo", "cpu", "gloo")])
def test_dist_backend_flag_chooses_the_process_group(monkeypatch, flag, device, expected):
    # Two ranks on a machine with one GPU: both take cuda:0, which NCCL refuses and gloo accepts.
    started = {}
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "29500")  # which init_distributed would otherwise leave set in this process
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.set_device", lambda device: started.setdefault("device", device))
    monkeypatch.setattr("torch.distributed.init_process_group", lambda backend, **kw: started.update(backend=backend))
    env, chosen = init_distributed(device, backend=flag)
    assert (env.rank, env.world_size, started["backend"]) == (1, 2, expected)
    assert chosen == (torch.device("cuda", 0) if device == "cuda" else torch.device("cpu"))


def test_nccl_on_cpu_is_refused_with_the_fix():
    with pytest.raises(UserError, match="--dist-backend nccl needs CUDA devices.*drop the flag"):
        init_distributed("cpu", backend="nccl")


def test_torchrun_wins_over_slurm_inside_an_allocation():
    env = read_dist_env({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert env.world_size == 2


def test_slurm_without_master_addr_says_what_to_export():
    with pytest.raises(UserError, match="export MASTER_ADDR"):
        read_dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


def test_single_process_by_default():
    assert read_dist_env({}) == DistEnv(0, 0, 1)
    assert read_dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).world_size == 1


@pytest.mark.parametrize("size,world", [(301, 2), (7, 3), (2, 4)])
def test_sharded_sampler_counts_every_sample_once(size, world):
    seen = [i for rank in range(world) for i in ShardedEvalSampler(range(size), rank, world)]
    assert sorted(seen) == list(range(size))


def test_two_process_training_and_exact_evaluation(tmp_path):
    """DDP with gloo trains (with accumulation); eval on 2 processes equals eval on 1, on 301 images."""
    out = tmp_path / "ddp"
    result = torchrun(2, "classification/train.py", *TINY, "--model", "mobilenet_v3_small", "--synthetic-train-size",
                      "256", "--accum-steps", "2", "--output-dir", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "= 128" in result.stdout  # effective batch: 32 x 2 accumulation x 2 processes
    assert "on 301 images" in result.stdout
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    evaluate("--checkpoint", out / "checkpoint.pth", "--device", "cpu", "--output-json", one)  # one process: this one
    result = torchrun(2, "classification/eval.py", "--checkpoint", out / "checkpoint.pth", "--device", "cpu",
                      "--output-json", two)
    assert result.returncode == 0, result.stderr[-3000:]
    single, double = json.loads(one.read_text()), json.loads(two.read_text())
    assert single["num_samples"] == double["num_samples"] == 301
    assert single == double
