"""Process groups under torchrun and SLURM, and the DDP and SyncBatchNorm wrapping that depends on them."""
import datetime
import os
import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from common.log import UserError, in_process_group, launch_rank


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def read_dist_env(environ=os.environ):
    """torchrun's variables, else SLURM's (one task per GPU)."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(int(environ["RANK"]), int(environ.get("LOCAL_RANK", 0)), int(environ["WORLD_SIZE"]))
    # srun sets SLURM_STEP_NUM_TASKS for the processes of its step; SLURM_NTASKS is the whole allocation's.
    slurm_tasks = int(environ.get("SLURM_STEP_NUM_TASKS", environ.get("SLURM_NTASKS", 1)))
    if slurm_tasks > 1 and "SLURM_PROCID" in environ:
        if "MASTER_ADDR" not in environ:
            raise UserError("SLURM launch without MASTER_ADDR: add "
                            "'export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1)' "
                            "to the sbatch script")
        return DistEnv(int(environ["SLURM_PROCID"]), int(environ.get("SLURM_LOCALID", 0)), slurm_tasks)
    return DistEnv()


def cuda_device_of(local_rank):
    """Modulo: SLURM's --gpus-per-task=1 shows each task only its own GPU, as cuda:0, whatever its local rank."""
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device_name=None, timeout_minutes=30, backend=None, sync_bn=False):
    """(DistEnv, torch.device). `sync_bn` is checked before any work: SyncBatchNorm has CUDA kernels only. gloo on
    GPUs is slower (through host memory) but takes several ranks on one GPU."""
    env = read_dist_env()
    if device_name is None:
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if backend == "nccl" and device.type != "cuda":
        raise UserError(f"--dist-backend nccl needs CUDA devices, and this run is on {device.type}: drop the flag "
                        "(gloo is used on CPU)")
    if device.type == "cuda":
        check_gpu(device, device_name)
        if env.distributed or device.index is None:
            device = cuda_device_of(env.local_rank)
        torch.cuda.set_device(device)
    if sync_bn and env.distributed and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA devices: drop it on CPU")
    if env.distributed:
        if env.is_main and restarts_may_reuse_stale_addresses():
            print("warning: under torchrun --max-restarts the workers share torchrun's store, where a restart at the "
                  "same size can find the killed attempt's addresses and fail to connect or hang (pytorch issue "
                  "135712): launch with --rdzv-backend=c10d (or --standalone) and "
                  "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", flush=True)
        os.environ.setdefault("MASTER_PORT", "29500")
        # A rank that dies makes the others fail after this timeout instead of hanging forever.
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"), init_method="env://",
                                rank=env.rank, world_size=env.world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return env, device


def restarts_may_reuse_stale_addresses(environ=os.environ):
    """A restart on torchrun's own store may find the killed attempt's keys and connect to ranks that are gone.
    Static rendezvous always shares it; c10d does unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1."""
    return (int(environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0
            and environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


def check_gpu(device, device_name):
    """Otherwise the first CUDA call fails with the driver's traceback."""
    if not torch.cuda.is_available():
        raise UserError(f"--device {device_name}, but this process sees no CUDA GPU (torch {torch.__version__}, "
                        f"CUDA {torch.version.cuda or 'not built in'}): check nvidia-smi and CUDA_VISIBLE_DEVICES, "
                        "or use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"cuda:{device.index} asked for, but this process sees {torch.cuda.device_count()} GPU(s): "
                        "use a lower index, or start at most one process per GPU")


def all_reduce_max(tensor):
    if in_process_group():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def from_rank0(compute):
    """compute() on rank 0, its result (or error, lest a rank wait forever) sent to all. Arrays go out of band
    (pickle protocol 5): ImageNet's 50 MB listing is not copied through pickle's bytes."""
    if not in_process_group() or dist.get_world_size() == 1:
        return compute()
    box, buffers = [None], []
    if dist.get_rank() == 0:
        try:
            result = compute()
            box = [("result", pickle.dumps(result, protocol=5, buffer_callback=buffers.append),
                    [buffer.raw().nbytes for buffer in buffers])]
        except Exception as e:
            dist.broadcast_object_list([("error", e if isinstance(e, UserError) else None, [])], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value, sizes = box[0]
    if kind == "error":
        # Plain UserError: only rank 0 prints it (a SampleError would be printed by every rank).
        raise UserError(str(value) if value is not None else f"rank 0 failed (its traceback says why); rank "
                        f"{launch_rank()} stops too")
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    received = []
    for k, size in enumerate(sizes):
        tensor = (torch.frombuffer(bytearray(buffers[k].raw()), dtype=torch.uint8) if buffers and size
                  else torch.empty(size, dtype=torch.uint8))
        if size:
            tensor = tensor.to(device) if device is not None else tensor  # NCCL sends device tensors only
            dist.broadcast(tensor, src=0)
        received.append(tensor.cpu().numpy())
    return result if dist.get_rank() == 0 else pickle.loads(value, buffers=received)


def data_parallel(model, env, device, sync_bn=False):
    """The parameters stay the same objects: an optimizer or EMA made before still holds them."""
    if not env.distributed:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
