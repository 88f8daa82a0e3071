"""The train scripts' loop: precision, one optimizer step, pauses, evaluation, early stops. No flags read here."""
import faulthandler
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist

from common.checkpoint import last_good_checkpoint
from common.data import seed_epoch, seed_micro_batch
from common.distributed import all_reduce_max
from common.log import (INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, STALLED_EXIT_CODE, UserError, all_reduce_sum,
                        in_process_group, print0)


# ---- precision: "float32", "bfloat16" or "float16", decided once per run ----
# Only float16 needs loss scaling: its range is too narrow for small gradients.

def precision_from_flags(amp, amp_dtype):
    """--amp alone means float16, as in torchvision's references; --amp-dtype implies --amp."""
    if amp_dtype is not None:
        return amp_dtype
    return "float16" if amp else "float32"


def uses_loss_scaling(precision):
    return precision == "float16"


class UnitScaler(torch.amp.GradScaler):
    """Scale 1 for float32 and bfloat16: step() still skips non-finite steps, without the sync a Python `if` costs."""

    def __init__(self, device_type):
        super().__init__(device_type, init_scale=1.0)

    def update(self, new_scale=None):
        super().update(1.0)  # after a skipped step GradScaler would halve the scale; there is nothing to rescale


def grad_scaler(device, precision, optimizer):
    """A UnitScaler where sync-free; where it would sync every step (SGD, RMSprop on a GPU) a disabled one, which
    does not skip non-finite steps: NonFiniteGuard stops those."""
    if uses_loss_scaling(precision):
        return torch.amp.GradScaler(device.type)
    if device.type == "cpu" or getattr(optimizer, "_step_supports_amp_scaling", False):
        return UnitScaler(device.type)
    return torch.amp.GradScaler(device.type, enabled=False)


class Precision:
    """A checkpoint records `name`: a resume knows whether its scaler state applies. Nothing global changes until
    configure_kernels()."""

    def __init__(self, device, amp=False, amp_dtype=None, channels_last=False):
        self.device, self.name = device, precision_from_flags(amp, amp_dtype)
        self.autocast = (torch.autocast(device.type, enabled=False) if self.name == "float32"
                         else torch.autocast(device.type, dtype=getattr(torch, self.name)))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def configure_kernels(self, deterministic=False):
        configure_kernels(self.device, deterministic)

    def grad_scaler(self, optimizer):
        return grad_scaler(self.device, self.name, optimizer)

    def to_device(self, batch):
        return to_device(batch, self.device, self.memory_format)


# ---- the step ----

# A float16 step that overflows (as a run's first ones do) skips optimizer.step(), and torch warns. Intended: the
# schedule counts steps, taken or skipped, to stay aligned with the data.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")


def configure_kernels(device, deterministic=False):
    torch.backends.cudnn.benchmark = not deterministic  # the autotuner would not choose deterministic kernels
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS needs it
        # A few CUDA kernels (adaptive average pooling's backward) have no deterministic version: warn, not stop.
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def to_device(batch, device, memory_format=torch.contiguous_format):
    images, targets = batch
    return (images.to(device, non_blocking=True, memory_format=memory_format),
            targets.to(device, non_blocking=True))


def gradient_sync(model, last_micro_batch):
    return nullcontext() if last_micro_batch or not hasattr(model, "no_sync") else model.no_sync()


class StepParts(NamedTuple):
    model: torch.nn.Module  # DDP-wrapped and compiled as the run trains it
    criterion: Callable
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    precision: Precision
    clip_grad_norm: Optional[float] = None
    ema: Optional[torch.nn.Module] = None  # common.ema.EMA, updated after steps


def pause_after(steps_done, steps_per_epoch, total_steps, eval_interval):
    epoch_end = steps_done % steps_per_epoch == 0 or steps_done == total_steps
    validates = steps_done == total_steps or (steps_done % eval_interval == 0 if eval_interval else epoch_end)
    return epoch_end, validates


def training_batches(loader, epoch, step, seed, rank):
    """Alike in a run that goes on and one resumed at `step`: the workers' seeds are drawn as the iterator is made."""
    loader.sampler.set_epoch(epoch, step)
    seed_epoch(seed, epoch, rank)
    return iter(loader)


def train_step(parts, batches, layout, seed, epoch, step):
    """(loss, gradient norm) as device tensors: reading them here would make the CPU wait for the GPU every step."""
    model, optimizer, scaler, precision = parts.model, parts.optimizer, parts.scaler, parts.precision
    loss_sum = torch.zeros((), device=precision.device)
    for micro in range(layout.accum_steps):
        # By the micro-batch's place in the global batch, not by rank: any layout of it draws the same.
        seed_micro_batch(seed, epoch, step, layout.slot(micro))
        images, targets = precision.to_device(next(batches))
        with gradient_sync(model, last_micro_batch=micro == layout.accum_steps - 1):
            with precision.autocast:
                loss = parts.criterion(model(images), targets) / layout.accum_steps
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
    scaler.unscale_(optimizer)  # clip and log the true gradient norm, not the scaled one
    params = [p for group in optimizer.param_groups for p in group["params"]]  # no walk of the modules each step
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if parts.clip_grad_norm:
        torch.nn.utils.clip_grads_with_norm_(params, parts.clip_grad_norm, grad_norm)
    scaler.step(optimizer)  # skipped when a gradient is not finite, unless the scaler is a disabled one
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    parts.lr_scheduler.step()
    if parts.ema is not None:
        parts.ema.update(model, epoch, step)
    return loss_sum, grad_norm


@torch.inference_mode()
def evaluate(model, loader, meter, precision, guards=None):
    """None on a stop signal, agreed at the end: the one point ranks with different numbers of batches all reach."""
    model.eval()
    for batch in loader:
        if guards is not None and guards.preemption.agreed(sync_point=False):
            return None
        images, targets = precision.to_device(batch)
        with precision.autocast:
            output = model(images)
        meter.update(output, targets)
        if guards is not None:
            guards.watchdog.beat()
    if guards is not None and guards.preemption.agreed(sync_point=True):
        return None
    meter.all_reduce()
    return meter


# ---- stopping early: on a signal, on divergence (NaN or Inf), on a stall ----
# The first two are decided at sync points, so every rank stops together; a stalled rank reaches none.

class PreemptionSignal:
    """SIGTERM, SIGUSR1 (sent by SLURM and Kubernetes before preempting) and a first Ctrl-C: save at the next step
    boundary and exit; a second Ctrl-C stops at once."""

    def __init__(self, device):
        self.device, self.received = device, None
        for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(signum, self.handle)

    def handle(self, signum, frame):
        self.received = self.received or signal.Signals(signum).name
        if signum == signal.SIGINT:
            print0("Ctrl-C: finishing this step and saving; press it again to stop at once, without saving")
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def agreed(self, sync_point):
        if not in_process_group():
            return self.received is not None
        if not sync_point:
            return False
        return all_reduce_sum(torch.tensor(int(self.received is not None), device=self.device)).item() > 0

    def exit(self):
        """Once every rank is here, so rank 0 has saved: a launcher that sees one rank exit stops the others."""
        if in_process_group():
            dist.barrier()
        code = INTERRUPTED_EXIT_CODE if self.received == "SIGINT" else PREEMPTED_EXIT_CODE
        print0(f"stopped on {self.received or 'another rank'}'s request (exit status {code}); the same command with "
               "--resume auto goes on from the checkpoint")
        raise SystemExit(code)


class NonFiniteGuard:
    """Stops, without saving, after `max_steps` non-finite steps in a row. Under float16 a non-finite gradient is
    usually an overflow GradScaler handles: the loss is watched instead, and a scale below MIN_LOSS_SCALE."""

    # DeepSpeed's min_loss_scale, the same floor: below 1 even the unscaled gradients overflow float16.
    MIN_LOSS_SCALE = 1.0

    def __init__(self, max_steps, output_dir, scaler):
        self.max_steps, self.output_dir, self.scaler = max_steps, output_dir, scaler
        self.loss_scaling = scaler.is_enabled() and not isinstance(scaler, UnitScaler)
        self.run = self.worst_run = None

    def update(self, loss, grad_norm, epoch, step, sync_point):
        bad = ~torch.isfinite(loss) if self.loss_scaling else ~torch.isfinite(grad_norm)
        if self.run is None:
            self.run = self.worst_run = torch.zeros((), dtype=torch.int64, device=bad.device)
        self.run = (self.run + 1) * bad
        self.worst_run = torch.maximum(self.worst_run, self.run)
        if not sync_point:
            return
        worst = int(all_reduce_max(self.worst_run.clone()))  # one rank's NaN loss is every rank's problem
        where = f"(epoch {epoch}, by step {step + 1})"
        if worst >= self.max_steps:
            raise UserError(f"the loss or gradients were NaN or Inf in {worst} consecutive steps {where}: stopped "
                            f"without saving; {last_good_checkpoint(self.output_dir)}")
        if self.loss_scaling and self.scaler.get_scale() < self.MIN_LOSS_SCALE:
            raise UserError(f"float16 loss scaling fell to {self.scaler.get_scale():.3g} {where}: every step "
                            f"overflows, so the weights or the data hold NaN or Inf; stopped without saving; "
                            f"{last_good_checkpoint(self.output_dir)}")


# What a stalled rank was doing: the innermost frame of its training thread in one of these paths (and functions).
# With NCCL a collective returns at once and the rank waits at the next sync: a progress line, a stop check.
STALL_STAGES = (
    (("torch/distributed/", None), ("torch/nn/parallel/", None), ("common/distributed.py", None),
     ("common/log.py", ("all_reduce_sum", "read_back")), ("common/engine.py", ("agreed", "update", "exit")),
     "in a collective (waiting for the other ranks)"),
    (("torch/utils/data/", None), ("common/device_loader.py", None), "waiting for data"),
    (("torch/serialization.py", None), ("common/checkpoint.py", None), "saving a checkpoint"),
    (("torch/autograd/", None), ("torch/nn/", None), ("torch/_tensor.py", None), "in forward/backward"),
)


def stalled_stage(frame):
    while frame is not None:
        path = frame.f_code.co_filename.replace(os.sep, "/")
        for *places, stage in STALL_STAGES:
            if any(place in path and (functions is None or frame.f_code.co_name in functions)
                   for place, functions in places):
                return stage
        frame = frame.f_back
    return "between steps"


class StallWatchdog:
    """Ends this rank when no step or evaluation batch finished in `timeout_s` seconds (0: off), lest a stuck file,
    worker or collective hang the job; the clock starts at the first beat(). A caller that goes on after the run
    (a test) calls stop()."""

    latest = None  # the watchdog of the run in progress

    def __init__(self, timeout_s, rank):
        self.timeout_s, self.rank, self.last_beat, self.stopped = timeout_s, rank, None, False
        StallWatchdog.latest = self
        if timeout_s:
            self.thread_id = threading.get_ident()
            threading.Thread(target=self.watch, name="stall watchdog", daemon=True).start()

    def beat(self):
        self.last_beat = time.monotonic()

    def beating(self, batches):
        """Passes outside evaluate() (a validation's TensorBoard pictures) count as evaluation batches too."""
        for batch in batches:
            self.beat()
            yield batch

    def stop(self):
        self.stopped = True

    def watch(self):
        while not self.stopped and StallWatchdog.latest is self:  # a later run's watchdog replaces it
            if self.last_beat is not None and time.monotonic() - self.last_beat > self.timeout_s:
                self.stop_the_rank()
            time.sleep(min(1.0, self.timeout_s / 4))

    def stop_the_rank(self):
        stage = stalled_stage(sys._current_frames().get(self.thread_id))
        sys.stdout.flush()
        try:
            faulthandler.dump_traceback(sys.stderr, all_threads=True)
        except (AttributeError, ValueError, OSError):  # a stderr without a file descriptor (captured)
            faulthandler.dump_traceback(sys.__stderr__, all_threads=True)
        print(f"error: rank {self.rank} (host {socket.gethostname()}, pid {os.getpid()}) stalled {stage}: no "
              f"optimizer step or evaluation batch finished in {self.timeout_s:g} s (--stall-timeout; the stacks of "
              f"all its threads are above). Exit status {STALLED_EXIT_CODE}: start the run again with --resume "
              "auto, as torchrun --max-restarts or a SLURM requeue does", file=sys.stderr, flush=True)
        for child in multiprocessing.active_children():  # DataLoader workers, one of which may be what hangs
            child.kill()
        os._exit(STALLED_EXIT_CODE)


class RunGuards:

    def __init__(self, preemption, nonfinite, watchdog):
        self.preemption, self.nonfinite, self.watchdog = preemption, nonfinite, watchdog

    def stop_requested(self, loss, grad_norm, epoch, step, sync_point):
        """After each step; the divergence check (which raises) and the stop read device values at sync points only."""
        self.watchdog.beat()
        self.nonfinite.update(loss, grad_norm, epoch, step, sync_point)
        return self.preemption.agreed(sync_point)


def install_run_guards(device, rank, scaler, output_dir=None, max_nonfinite_steps=3, stall_timeout=0):
    """Side effects (signal handlers, the watchdog's thread), made here in sight of main."""
    return RunGuards(PreemptionSignal(device), NonFiniteGuard(max_nonfinite_steps, output_dir, scaler),
                     StallWatchdog(stall_timeout, rank))
