"""Runs that survive the cluster, on the CPU with gloo: multi-node launches (static, c10d, SLURM) equal one launch
of 2 processes bit for bit; a run killed with SIGKILL goes on on another number of processes with the same global
batch; an elastic torchrun launch that loses a node goes on alone; a rank whose data never comes is named and
stopped by the watchdog. Every run of a task is compared with one uninterrupted launch of 2 processes."""
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from common.checkpoint import CheckpointError, load_checkpoint
from common.log import UserError
from common.engine import StallWatchdog, stalled_stage
from common.log import STALLED_EXIT_CODE
from conftest import ENV, ROOT, TINY, popen, torchrun, train, write_tree
from test_hardening import descendants

# A few optimizer steps of tiny models: 64 images in global batches of 16 (2 processes x -b 8, or 1 x 8 x 2), one
# epoch of 4 steps. MobileNetV3-small has dropout, which must be drawn per slot.
TASKS = {
    "classification": ("classification/train.py", [
        "--model", "mobilenet_v3_small", "--synthetic-val-size", "32"]),
    "segmentation": ("segmentation/train.py", [
        "--unet-width", "8", "--synthetic-image-size", "32", "--synthetic-classes", "3", "--synthetic-val-size", "16"]),
}
COMMON = ["--device", "cpu", "--synthetic-train-size", "64", "-b", "8", "--global-batch", "16", "--epochs", "1",
          "--print-freq", "1", "--use-deterministic-algorithms", "--resume", "auto"]
# The tests of a task that read its reference run go to one pytest-xdist worker (pytest.ini's --dist loadgroup),
# whose module-scoped fixture then launches that run once, not once on each worker.
WITH_REFERENCE = [pytest.param(task, marks=pytest.mark.xdist_group(f"cluster-{task}")) for task in TASKS]
MID_EPOCH = ["--checkpoint-interval", "1"]  # for the runs that are killed: checkpoints after steps 1, 2 and 3 of 4
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# torchrun's own variables, which a launch that sets its own must not inherit.
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_LOCALID",
                    "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "TORCHELASTIC_RUN_ID")


def command(task):
    script, flags = TASKS[task]
    return [ROOT / script, *flags, *COMMON]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank, port, slurm=False, **extra):
    """The variables of rank `rank` of 2, as torchrun sets them or, with slurm, as srun does (one task a node)."""
    env = {k: v for k, v in ENV.items() if k not in LAUNCH_VARIABLES}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra)
    if slurm:
        return {**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": "0", "SLURM_NODEID": str(rank), "SLURM_NTASKS": "2"}
    return {**env, "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2"}


def launch(argv, log, env=None):
    """A command whose stdout and stderr go to the file `log`."""
    with open(log, "w") as out:
        return subprocess.Popen([str(a) for a in argv], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True,
                                env=env or {k: v for k, v in ENV.items() if k not in LAUNCH_VARIABLES})


def kill_all(process):
    """SIGKILL a launch and everything it started, as when its node dies."""
    for pid in descendants(process.pid) + [process.pid]:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    process.wait()


def wait_for(logs, text, processes, timeout=300):
    """Until one of the files `logs` holds a line with `text`; fails if the processes end first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in line for log in logs if log.exists() for line in log.read_text().splitlines()):
            return
        if all(p.poll() is not None for p in processes):
            break
        time.sleep(0.05)
    pytest.fail(f"no line with {text!r} in {', '.join(map(str, logs))}: " +
                " | ".join(log.read_text()[-1500:] for log in logs if log.exists()))


def finish(processes, logs, timeout=600):
    """Wait for the processes, which must all succeed; whatever is left after `timeout` seconds is killed."""
    try:
        codes = [p.wait(timeout=timeout) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                kill_all(p)
    assert codes == [0] * len(codes), " | ".join(log.read_text()[-2000:] for log in logs)


def weights(out):
    return torch.load(out / "checkpoint.pth", weights_only=True)["model"]


def records(out):
    """log.jsonl without the timings, which differ from run to run."""
    timings = ("epoch_time_s", "img_per_s", "max_memory_mib")
    return [{k: v for k, v in json.loads(line).items() if k not in timings}
            for line in (out / "log.jsonl").read_text().splitlines()]


def relative_distance(out, reference):
    """||w - w_ref|| / ||w_ref|| over the parameters. Batch-norm running statistics are left out: under DDP they
    are rank 0's micro-batches' (broadcast at every forward), with accumulation every micro-batch's."""
    ours, theirs = weights(out), weights(reference)
    names = [k for k in theirs if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    difference = torch.cat([(ours[k].double() - theirs[k].double()).flatten() for k in names])
    return float(difference.norm() / torch.cat([theirs[k].double().flatten() for k in names]).norm())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """reference(task): the output folder of one uninterrupted launch of 2 processes (torchrun --standalone)."""
    done = {}

    def run_of(task):
        if task not in done:
            out = tmp_path_factory.mktemp(f"reference_{task}")
            result = torchrun(2, *command(task), "--output-dir", out)
            assert result.returncode == 0, result.stderr[-3000:]
            assert "effective batch 8 x 1" in result.stdout
            done[task] = out
        return done[task]
    return run_of


@pytest.mark.parametrize("task", WITH_REFERENCE)
@pytest.mark.parametrize("launcher", ["static", "c10d", "slurm"])
def test_a_multi_node_launch_trains_and_evaluates_as_one_launch_of_two_processes(task, launcher, reference, tmp_path):
    out, port = tmp_path / "run", free_port()
    if launcher == "slurm":  # srun starts every task itself: no torchrun
        argv = [[sys.executable, *command(task), "--output-dir", out]] * 2
        envs = [rank_env(rank, port, slurm=True) for rank in (0, 1)]
    else:
        nodes = ([f"--node-rank={rank}", "--master-addr=127.0.0.1", f"--master-port={port}"] for rank in (0, 1))
        if launcher == "c10d":  # the same command on every node; the rendezvous gives out the ranks
            nodes = (["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes"],) * 2
        argv = [[*TORCHRUN, "--nnodes=2", "--nproc_per_node=1", *node, *command(task), "--output-dir", out]
                for node in nodes]
        envs = [None, None]
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    finish([launch(a, log, env) for a, log, env in zip(argv, logs, envs)], logs)
    assert "world size 2" in logs[0].read_text() + logs[1].read_text()
    ours, theirs = weights(out), weights(reference(task))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert records(out) == records(reference(task))


@pytest.mark.parametrize("task", WITH_REFERENCE)
def test_one_process_with_accumulation_killed_mid_epoch_goes_on_on_two_processes(task, reference, tmp_path):
    out = tmp_path / "run"
    process = popen(sys.executable, *command(task), *MID_EPOCH, "--output-dir", out)  # 1 process x -b 8 x 2
    for line in process.stdout:
        if line.startswith("saved") and "(epoch 0 step 1)" in line:
            process.kill()
            break
    process.stdout.read()
    process.wait()
    checkpoint = load_checkpoint(out / "checkpoint.pth")
    assert checkpoint["epoch"] == 0 and checkpoint["step"] in (1, 2, 3), checkpoint["step"]  # in the middle
    assert (checkpoint["args"]["world_size"], checkpoint["args"]["accum_steps"]) == (1, 2)
    port, logs = free_port(), [tmp_path / "rank0.log", tmp_path / "rank1.log"]
    finish([launch([sys.executable, *command(task), "--output-dir", out], log, rank_env(rank, port))
            for rank, log in enumerate(logs)], logs)  # 2 processes x -b 8 x 1
    said = logs[0].read_text()
    assert f"resumed from {out}/checkpoint.pth: epoch 0 step {checkpoint['step']}," in said, said[-3000:]
    assert load_checkpoint(out / "checkpoint.pth")["args"]["accum_steps"] == 1
    assert relative_distance(out, reference(task)) < 1e-3


@pytest.mark.parametrize("task", WITH_REFERENCE)
def test_an_elastic_launch_that_loses_a_node_goes_on_alone_with_the_same_global_batch(task, reference, tmp_path):
    out, port = tmp_path / "run", free_port()
    # The surviving launch hosts the rendezvous store; a dead node is noticed after 2 missed 1-second heartbeats, and
    # the rendezvous closes 5 s after the first node joins (the default 30 s would only make the test wait).
    conf = "last_call_timeout=5,keep_alive_interval=1,keep_alive_max_attempt=2,is_host="
    argv = [[*TORCHRUN, "--nnodes=1:2", "--nproc_per_node=1", "--max-restarts=3", "--rdzv-backend=c10d",
             f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=elastic", f"--rdzv-conf={conf}{is_host}",
             *command(task), *MID_EPOCH, "--output-dir", out] for is_host in (1, 0)]
    logs = [tmp_path / "survivor.log", tmp_path / "killed.log"]
    survivor, doomed = [launch(a, log) for a, log in zip(argv, logs)]
    try:
        wait_for(logs, "(epoch 0 step 1)", [survivor, doomed])
        kill_all(doomed)
    finally:
        if doomed.poll() is None:
            kill_all(doomed)
    finish([survivor], logs[:1])
    survived = logs[0].read_text()
    assert "world size 2" in survived + logs[1].read_text() and "world size 1" in survived, survived[-3000:]
    assert re.search(rf"resumed from {re.escape(str(out))}/checkpoint.pth: epoch 0 step [123],", survived)
    final = load_checkpoint(out / "checkpoint.pth")
    assert (final["epoch"], final["step"], final["args"]["world_size"], final["args"]["accum_steps"]) == (0, None, 1, 2)
    assert relative_distance(out, reference(task)) < 1e-3


def rank_of(pid):
    try:
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
        return None
    return next((int(v[5:]) for v in environ if v.startswith(b"RANK=")), None)


@pytest.mark.parametrize("task", WITH_REFERENCE)
def test_a_rank_killed_mid_epoch_is_restarted_by_torchrun_and_ends_with_the_same_weights(task, reference, tmp_path):
    out, logs = tmp_path / "run", [tmp_path / "torchrun.log"]
    # Without it, the restart may read the killed attempt's addresses from torchrun's store (README, pytorch #135712)
    env = {k: v for k, v in ENV.items() if k not in LAUNCH_VARIABLES} | {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    launcher = launch([*TORCHRUN, "--standalone", "--nproc_per_node=2", "--max-restarts=1", *command(task),
                       *MID_EPOCH, "--output-dir", out], logs[0], env)
    wait_for(logs, "(epoch 0 step 1)", [launcher])
    rank1 = [pid for pid in descendants(launcher.pid) if rank_of(pid) == 1]
    assert rank1, logs[0].read_text()[-3000:]
    os.kill(rank1[0], 9)  # as the out-of-memory killer would; torchrun restarts both workers
    finish([launcher], logs)
    said = logs[0].read_text()
    assert re.search(rf"resumed from {re.escape(str(out))}/checkpoint.pth: epoch 0 step [123],", said), said[-3000:]
    ours, theirs = weights(out), weights(reference(task))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)  # same layout: bit for bit


def test_restarts_that_share_torchruns_store_are_warned_about():
    from common.distributed import restarts_may_reuse_stale_addresses
    launched = {"TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert restarts_may_reuse_stale_addresses(launched)
    assert not restarts_may_reuse_stale_addresses(launched | {"TORCHELASTIC_USE_AGENT_STORE": "False"})
    assert not restarts_may_reuse_stale_addresses(launched | {"TORCHELASTIC_MAX_RESTARTS": "0"})
    assert not restarts_may_reuse_stale_addresses({})


# Rank 1's DataLoader worker waits forever, from the moment the file STALL_TRIGGER exists, for an image that never
# comes (as from a file server that stopped answering). Patched in before the script runs; the workers fork it.
NEVER_ANSWERS = """
import multiprocessing, os, runpy, sys, threading
multiprocessing.set_start_method("fork", force=True)  # the workers inherit the patch (Python 3.14 defaults otherwise)
sys.path.insert(0, os.getcwd())
import classification.data as data
read_image = data.read_image
def read_or_wait_forever(path, *args, **kwargs):
    if os.environ["RANK"] == "1" and os.path.exists(os.environ["STALL_TRIGGER"]):
        threading.Event().wait()
    return read_image(path, *args, **kwargs)
data.read_image = read_or_wait_forever
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_rank_whose_data_never_comes_is_named_and_every_rank_exits_within_the_stall_timeout(tmp_path, capsys):
    data, out, trigger = write_tree(tmp_path / "data", train_per_class=16), tmp_path / "run", tmp_path / "stop"
    flags = ["--data-path", data, "--model", "mobilenet_v3_small", "--device", "cpu", "-b", "4", "-j", "1",
             "--global-batch", "8", "--epochs", "1", "--train-crop-size", "32", "--val-resize-size", "32",
             "--val-crop-size", "32", "--print-freq", "1", "--checkpoint-interval", "1", "--resume", "auto",
             "--output-dir", out]
    port, logs = free_port(), [tmp_path / "rank0.log", tmp_path / "rank1.log"]
    ranks = [launch([sys.executable, "-c", NEVER_ANSWERS, "classification/train.py", *flags, "--stall-timeout", "5"],
                    log, rank_env(rank, port, STALL_TRIGGER=str(trigger))) for rank, log in enumerate(logs)]
    try:
        wait_for(logs, "(epoch 0 step 1)", ranks)
        trigger.touch()
        stalled = time.monotonic()
        codes = [rank.wait(timeout=5 + 30) for rank in ranks]
        assert time.monotonic() - stalled < 5 + 30
    finally:
        for rank in ranks:
            if rank.poll() is None:
                kill_all(rank)
    said = logs[1].read_text()
    assert codes[1] == STALLED_EXIT_CODE and codes[0] != 0, said[-3000:]
    assert "most recent call first" in said  # faulthandler's stacks of every thread
    line = next(line for line in said.splitlines() if line.startswith("error: "))
    assert line.startswith("error: rank 1 (host") and "stalled waiting for data" in line
    checkpoint = load_checkpoint(out / "checkpoint.pth")  # whole, and it goes on
    assert checkpoint["epoch"] == 0 and checkpoint["step"] >= 1
    trigger.unlink()
    capsys.readouterr()
    train(*flags)  # on 1 process (this one): -b 4 x 2
    resumed = capsys.readouterr().out
    assert f"epoch 0 step {checkpoint['step']}" in resumed and "done in" in resumed


@pytest.mark.parametrize("place,stage", [
    ("torch/utils/data/dataloader.py", "waiting for data"),
    ("torch/distributed/distributed_c10d.py", "in a collective (waiting for the other ranks)"),
    ("torch/serialization.py", "saving a checkpoint"),
    ("torch/autograd/graph.py", "in forward/backward"),
    ("classification/train.py", "between steps"),
])
def test_the_watchdog_names_the_stage_from_where_the_rank_waits(place, stage):
    # A thread that blocks in code that says it comes from `place`, beneath a frame of the training loop.
    started, release = threading.Event(), threading.Event()
    # From started.set() on, the thread's frames stand beneath the code from `place`, in set() or in wait().
    blocked = compile("started.set()\nrelease.wait()", f"/site-packages/{place}", "exec")
    loop = compile("exec(blocked)", f"{ROOT}/common/engine.py", "exec")
    thread = threading.Thread(target=exec, args=(loop, {"started": started, "release": release, "blocked": blocked}))
    thread.start()
    try:
        assert started.wait(60)
        assert stalled_stage(sys._current_frames()[thread.ident]) == stage
    finally:
        release.set()
        thread.join()


def test_the_watchdog_ends_when_its_run_stops_it():
    def run():
        watchdog = StallWatchdog(0.2, rank=0)
        try:
            watchdog.beat()  # armed; the run returns before the timeout
        finally:
            watchdog.stop()

    watchdogs = [t for t in threading.enumerate() if t.name == "stall watchdog"]
    run()
    for thread in set(threading.enumerate()) - set(watchdogs):
        if thread.name == "stall watchdog":
            thread.join(timeout=5)  # past the 0.2 s timeout: a watchdog still watching would end this process
    assert [t for t in threading.enumerate() if t.name == "stall watchdog"] == watchdogs


def test_resuming_with_another_global_batch_is_refused_and_any_layout_of_the_same_goes_on(trained_run):
    path = trained_run / "checkpoint.pth"  # 1 process x -b 32 x 1
    with pytest.raises(CheckpointError, match=re.escape(
            "it was trained with a global batch of 32 images (1 process x -b 32 x --accum-steps 1), this run has 16 "
            "images (1 process x -b 16 x --accum-steps 1). Keep the product: --accum-steps 2 here, or --global-batch "
            "32, which sets --accum-steps")):
        train(*TINY, "--epochs", "2", "-b", "16", "--resume", path)
    assert train(*TINY, "--epochs", "2", "-b", "16", "--global-batch", "32", "--resume", path).accum_steps == 2


@pytest.mark.parametrize("flags,says", [
    (["--global-batch", "48"], "--global-batch 48 is not a multiple of 1 process x -b 32 = 32: start on a number of "
                               "processes that divides it, or change -b"),
    (["--global-batch", "64", "--accum-steps", "3"], "--accum-steps 3 and --global-batch 64 disagree on 1 process x "
                                                      "-b 32 (that global batch needs --accum-steps 2): give one"),
])
def test_a_global_batch_this_start_cannot_keep_is_refused(flags, says):
    with pytest.raises(UserError, match=re.escape(says)):
        train(*TINY, *flags)


@pytest.mark.parametrize("task", TASKS)
def test_dist_timeout_is_the_process_groups_timeout(task, monkeypatch):
    from importlib import import_module
    script = import_module(f"{task}.train")
    asked = []

    def init_distributed(device, timeout_minutes, backend=None, sync_bn=False):  # records what the script asks for; stops it
        asked.append(timeout_minutes)
        raise UserError("stop")

    monkeypatch.setattr(script, "init_distributed", init_distributed)
    args = script.finish_args(script.get_args_parser().parse_args(["--device", "cpu", "--dist-timeout", "2.5"]))
    with pytest.raises(UserError, match="stop"):
        script.main(args)
    assert asked == [2.5]


@pytest.mark.parametrize("task", TASKS)
def test_workers_default_to_the_cores_on_real_data_and_to_zero_on_the_synthetic_set(task, tmp_path):
    from importlib import import_module

    from common.data import default_workers
    script = import_module(f"{task}.train")
    real = ["--data-path", str(tmp_path)] + (["--dataset", "voc"] if task == "segmentation" else [])

    def workers(*flags):
        return script.finish_args(script.get_args_parser().parse_args(list(flags))).workers

    assert workers(*real) == default_workers(8) >= 1
    assert workers() == 0
    assert workers(*real, "-j", "3") == 3
