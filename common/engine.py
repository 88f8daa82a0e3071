"""The training and evaluation loops: a model, a criterion, loaders and the objects the script made from its
flags go in; nothing task-specific, no flags read here.

The optimizer step is the block marked "the step" in train_one_epoch; everything after it is bookkeeping
that each helper object does in one call (common/progress.py, common/stopping.py, common/checkpoint.py).
"""
import os
import warnings
from contextlib import nullcontext
from typing import NamedTuple

import torch

from common.data import BatchLayout
from common.seeding import seed_epoch, seed_micro_batch

# GradScaler skips the optimizer step of a float16 step that overflowed, as the first steps of a run usually do;
# torch then warns that the LR scheduler stepped before the optimizer. Intended: the schedule counts steps, taken
# or skipped, so that it stays aligned with the data.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")


def configure_torch(device, seed, deterministic=False):
    """Kernel choices (fast or deterministic, TF32) and the seed of weight initialisation."""
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS needs it
        # A few CUDA kernels (adaptive average pooling's backward among them) have no deterministic version:
        # on GPUs they warn instead of stopping the run. On CPU every kernel used here is deterministic.
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed)


def to_device(batch, device, memory_format=torch.contiguous_format):
    images, targets = batch
    return (images.to(device, non_blocking=True, memory_format=memory_format),
            targets.to(device, non_blocking=True))


def gradient_sync(model, last_micro_batch):
    """DDP all-reduces gradients in backward; with accumulation, only the last micro-batch needs it."""
    return nullcontext() if last_micro_batch or not hasattr(model, "no_sync") else model.no_sync()


class RunSteps(NamedTuple):
    """Where a run of `total` optimizer steps, `per_epoch` to an epoch, pauses to validate: every `eval_interval`
    steps counted from its start (--eval-interval), or at each epoch's end when that is 0; and at its end."""
    per_epoch: int
    total: int
    eval_interval: int = 0

    def epoch_end(self, epoch):
        """The steps done in `epoch` when it ends: all of them, or fewer where the run ends inside it (--iters)."""
        return min(self.per_epoch, self.total - epoch * self.per_epoch)

    def validates_after(self, epoch, step):
        done = epoch * self.per_epoch + step
        if done == self.total:
            return True
        return done % self.eval_interval == 0 if self.eval_interval else step == self.per_epoch

    def pauses(self, epoch, start, resumed_validated=True):
        """The steps of `epoch` after which training pauses, from step `start` on: each validation, and the
        epoch's end. A run resumed at a step where a validation was due but had not run (a checkpoint saved when
        a stop signal came) or at an epoch's end not yet closed pauses at once, at `start` itself."""
        end = self.epoch_end(epoch)
        due = start > 0 and (start == end or (self.validates_after(epoch, start) and not resumed_validated))
        return [start] * due + [step for step in range(start + 1, end + 1)
                                if step == end or self.validates_after(epoch, step)]


def train_one_epoch(model, criterion, optimizer, lr_scheduler, scaler, loader, epoch, *, device, autocast,
                    progress, nonfinite, memory_format=torch.contiguous_format, seed=0, layout=BatchLayout(),
                    clip_grad_norm=None, ema=None, preemption=None, checkpointer=None, checkpoint_interval=0,
                    start_step=0, end_step=None, watchdog=None):
    """Optimizer steps `start_step`..`end_step` (default: the epoch's end) of one epoch, each of
    `layout.accum_steps` micro-batches from `loader`, already positioned at `start_step`. The checkpointer saves
    every `checkpoint_interval` steps and on a stop signal, which ends the epoch early ("stopped" in the summary);
    the watchdog (common/stopping.py) hears of every step."""
    model.train()
    seed_epoch(seed, epoch, layout.rank)  # before the loader's iterator draws its workers' seeds
    accum_steps = layout.accum_steps
    epoch_steps = start_step + len(loader) // accum_steps
    steps = epoch_steps if end_step is None else min(epoch_steps, end_step)
    params = [p for p in model.parameters() if p.requires_grad]
    progress.start_epoch(epoch, start_step, steps, epoch_steps)
    batches, stopped = progress.timed(iter(loader)), False
    for step in range(start_step, steps):
        # ---- the step ----
        step_loss = torch.zeros((), device=device)
        for micro in range(accum_steps):
            # By the micro-batch's place in the global batch, not by rank: any layout of it draws the same.
            seed_micro_batch(seed, epoch, step, layout.slot(micro))
            images, targets = to_device(next(batches), device, memory_format)
            with gradient_sync(model, last_micro_batch=micro == accum_steps - 1):
                with autocast:
                    loss = criterion(model(images), targets) / accum_steps
                scaler.scale(loss).backward()
            step_loss += loss.detach()
        scaler.unscale_(optimizer)  # clip and log the true gradient norm, not the scaled one
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if clip_grad_norm:
            torch.nn.utils.clip_grads_with_norm_(params, clip_grad_norm, grad_norm)
        scaler.step(optimizer)  # skipped when a gradient is not finite
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lr_scheduler.step()
        if ema is not None:
            ema.update(model, epoch, step)
        # ---- bookkeeping: values stay on the device until a sync point (a progress line, a checkpoint step) ----
        if watchdog is not None:
            watchdog.beat()
        printed = progress.log(step, step_loss, grad_norm, optimizer.param_groups[0]["lr"])
        checkpoint_step = bool(checkpoint_interval) and (step + 1) % checkpoint_interval == 0
        nonfinite.update(step_loss, grad_norm, epoch, step, sync_point=printed or checkpoint_step)
        stopped = preemption is not None and preemption.agreed(sync_point=printed or checkpoint_step)
        if stopped:
            progress.stop(step, preemption.received or "another rank")
        # The epoch's last step is saved after validation; a stop does not wait for that.
        if checkpointer is not None and (stopped or (checkpoint_step and step < steps - 1)):
            checkpointer.save(epoch, step + 1)
        if stopped:
            break
    return {**progress.summary(optimizer.param_groups[0]["lr"]), "stopped": stopped}


@torch.inference_mode()
def evaluate(model, loader, meter, device, autocast, memory_format=torch.contiguous_format, preemption=None,
             watchdog=None):
    """Feed every batch of `loader` to meter.update(output, target), then sum the meter over ranks. Returns
    None instead when `preemption` asks to stop: at once in one process, at the end across ranks (which may
    hold different numbers of batches, so the end is the one point all of them reach)."""
    model.eval()
    for batch in loader:
        if preemption is not None and preemption.agreed(sync_point=False):
            return None
        images, targets = to_device(batch, device, memory_format)
        with autocast:
            output = model(images)
        meter.update(output, targets)
        if watchdog is not None:
            watchdog.beat()
    if preemption is not None and preemption.agreed(sync_point=True):
        return None
    meter.all_reduce()
    return meter
