"""The training and evaluation loops: a model, a criterion and loaders in; nothing task-specific.

Both read these fields of the script's argparse namespace: amp, amp_dtype, channels_last; training also
accum_steps, clip_grad_norm, model_ema_steps, lr_warmup_epochs, print_freq, batch_size, world_size, seed,
checkpoint_interval, max_nonfinite_steps, output_dir.
"""
import os
import signal
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from common.checkpoint import unwrap
from common.distributed import all_reduce_sum
from common.log import UserError, print0

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request with a checkpoint saved; run the same command again


def configure_torch(args, device):
    """Kernel choices (fast or deterministic, TF32) and the seed of weight initialisation."""
    torch.backends.cudnn.benchmark = not args.use_deterministic_algorithms
    if args.use_deterministic_algorithms:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS needs it
        # A few CUDA kernels (adaptive average pooling's backward among them) have no deterministic version:
        # on GPUs they warn instead of stopping the run. On CPU every kernel used here is deterministic.
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)


def step_seed(seed, epoch, step):
    """The seed of one step: every step's randomness (augmentation on the device, dropout) follows from
    (seed, epoch, step, rank), so a run resumed at any step replays what an uninterrupted run does."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return (((seed * 1_000_003 + epoch) * 1_000_003 + step) * 4_099 + rank) % 2**63


def loss_scaling(args):
    return args.amp and args.amp_dtype == "float16"


def grad_scaler(device, args, optimizer):
    """float16 needs loss scaling. For float32 and bfloat16 a scaler held at 1.0 (train_one_epoch resets it
    every step) changes no number but still skips a step whose gradients are not finite: without a host
    sync on fused optimizers and on the CPU. Other optimizers on a GPU would sync every step: no scaler."""
    if loss_scaling(args):
        return torch.amp.GradScaler(device.type)
    sync_free = device.type == "cpu" or getattr(optimizer, "_step_supports_amp_scaling", False)
    return torch.amp.GradScaler(device.type, init_scale=1.0, enabled=sync_free)


def exit_preempted():
    """Leave with PREEMPTED_EXIT_CODE once every rank is here, so rank 0 has finished saving: a launcher
    that sees one rank exit stops the others."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    raise SystemExit(PREEMPTED_EXIT_CODE)


class PreemptionSignal:
    """SIGTERM and SIGUSR1 (what SLURM and Kubernetes send before preempting a job) ask the loop to stop at
    the next step boundary. Ranks agree at progress lines and checkpoint steps, so that all stop together."""

    def __init__(self, device):
        self.device, self.received = device, None
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, self.handle)

    def handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def agreed(self, sync_point):
        if not (dist.is_available() and dist.is_initialized()):
            return self.received is not None
        if not sync_point:
            return False
        return all_reduce_sum(torch.tensor(int(self.received is not None), device=self.device)).item() > 0


def check_finite(worst_run, epoch, step, args):
    """Stop a run whose gradients were NaN or Inf (a NaN loss makes them so) for too many steps in a row.

    Counted from the gradient norm, which DDP makes the same on every rank, so all ranks stop together.
    """
    run = int(worst_run)
    if run >= args.max_nonfinite_steps:
        last = os.path.join(args.output_dir, "checkpoint.pth") if args.output_dir else None
        saved = f"the last good checkpoint is {last}" if last and os.path.isfile(last) else "no checkpoint was saved"
        raise UserError(f"the loss or gradients were NaN or Inf in {run} consecutive steps (epoch {epoch}, by step {step + 1}): stopped "
                        f"without saving; {saved}. Resume from it with a lower --lr or --clip-grad-norm")


def autocast(device, args):
    return torch.autocast(device.type, dtype=getattr(torch, args.amp_dtype), enabled=args.amp)


def to_device(images, targets, device, args):
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    return (images.to(device, non_blocking=True, memory_format=memory_format),
            targets.to(device, non_blocking=True))


def train_one_epoch(model, criterion, optimizer, lr_scheduler, scaler, loader, device, epoch, args,
                    model_ema=None, writer=None, start_step=0, save_checkpoint=None, preemption=None):
    """Optimizer steps `start_step`.. of one epoch, each of args.accum_steps micro-batches from `loader`
    (already positioned at `start_step`); returns the epoch's summary.

    save_checkpoint(step) is called every args.checkpoint_interval steps and on a preemption signal, which
    also ends the epoch early ("stopped" in the summary).
    """
    model.train()
    accum, world_size = args.accum_steps, args.world_size
    steps = start_step + len(loader) // accum
    # float16 overflows are GradScaler's business (it skips them and lowers its scale); otherwise a
    # non-finite gradient is a sign of divergence, counted to stop the run.
    count_nonfinite = not loss_scaling(args)
    params = [p for p in model.parameters() if p.requires_grad]
    # Per-step values stay on the device until a print step, so the loop never waits for the GPU.
    losses, grad_norms, loss_total = [], [], 0.0
    bad_run = worst_run = torch.zeros((), dtype=torch.int64, device=device)  # consecutive non-finite losses
    batch_iter = iter(loader)
    start = last_print = time.perf_counter()
    images_since_print, data_time, stopped, done = 0, 0.0, False, 0
    for step in range(start_step, steps):
        torch.manual_seed(step_seed(args.seed, epoch, step))
        step_loss = torch.zeros((), device=device)
        for micro in range(accum):
            t0 = time.perf_counter()
            images, targets = to_device(*next(batch_iter), device, args)
            data_time += time.perf_counter() - t0
            # Gradients are all-reduced only on the last micro-batch of an accumulation group.
            sync = nullcontext() if micro == accum - 1 or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with autocast(device, args):
                    loss = criterion(model(images), targets) / accum
                scaler.scale(loss).backward()
            step_loss += loss.detach()
            images_since_print += len(images)
        scaler.unscale_(optimizer)  # clip and log the true gradient norm, not the scaled one
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if args.clip_grad_norm:
            torch.nn.utils.clip_grads_with_norm_(params, args.clip_grad_norm, grad_norm)
        grad_norms.append(grad_norm)
        scaler.step(optimizer)  # skipped when a gradient is not finite
        scaler.update(None if loss_scaling(args) else 1.0)  # without float16, the scale stays 1 after a skip
        optimizer.zero_grad(set_to_none=True)
        lr_scheduler.step()
        losses.append(step_loss)
        done += 1
        if count_nonfinite:
            bad_run = (bad_run + 1) * ~torch.isfinite(grad_norm)
            worst_run = torch.maximum(worst_run, bad_run)
        global_step = epoch * steps + step
        if model_ema is not None and global_step % args.model_ema_steps == 0:
            model_ema.update_parameters(unwrap(model))
            if epoch < args.lr_warmup_epochs:
                model_ema.n_averaged.fill_(0)  # during warmup the EMA copies the model instead of averaging it
        print_step = (step + 1) % args.print_freq == 0 or step == steps - 1
        checkpoint_step = bool(args.checkpoint_interval) and (step + 1) % args.checkpoint_interval == 0
        if print_step:
            step_losses = all_reduce_sum(torch.stack(losses)).div_(world_size).tolist()  # the one sync
            norms = torch.stack(grad_norms).tolist()
            loss_total += sum(step_losses)
            first_step = global_step - len(losses) + 1
            now = time.perf_counter()
            img_per_s = images_since_print * world_size / (now - last_print)
            eta = (now - start) / (step + 1 - start_step) * (steps - step - 1)
            lr = optimizer.param_groups[0]["lr"]
            memory = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0
            print0(f"Epoch: [{epoch}] [{step + 1:>{len(str(steps))}}/{steps}]  eta: {eta // 60:.0f}:{eta % 60:02.0f}  "
                   f"lr: {lr:.6f}  loss: {step_losses[-1]:.4f} ({loss_total / (step + 1 - start_step):.4f})  "
                   f"grad_norm: {norms[-1]:.3f}  img/s: {img_per_s:.1f}  "
                   f"data: {data_time / (step + 1 - start_step) / accum:.4f}s  max mem: {memory:.0f}MB")
            if writer is not None:
                for i, (loss_value, norm) in enumerate(zip(step_losses, norms)):
                    writer.add_scalar("train/loss", loss_value, first_step + i)
                    writer.add_scalar("train/grad_norm", norm, first_step + i)
                writer.add_scalar("train/lr", lr, global_step)
                writer.add_scalar("train/img_per_s", img_per_s, global_step)
            losses, grad_norms, images_since_print, last_print = [], [], 0, now
        if print_step or checkpoint_step:
            check_finite(worst_run, epoch, step, args)
        stopped = preemption is not None and preemption.agreed(print_step or checkpoint_step)
        # At the end of the epoch its own checkpoint follows, after validation; a stop does not wait for that.
        if save_checkpoint is not None and (stopped or (checkpoint_step and step < steps - 1)):
            save_checkpoint(step + 1)
        if stopped:
            print0(f"stopping at step {step + 1} of epoch {epoch} on {preemption.received or 'another rank'}'s request")
            break
    epoch_time = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0
    return {"train_loss": loss_total / max(done, 1), "lr": optimizer.param_groups[0]["lr"],
            "epoch_time_s": epoch_time, "img_per_s": done * accum * args.batch_size * world_size / epoch_time,
            "max_memory_mib": memory, "stopped": stopped}


@torch.inference_mode()
def evaluate(model, loader, meter, device, args):
    """Feed every batch of `loader` to meter.update(output, target), then sum the meter over ranks."""
    model.eval()
    for images, targets in loader:
        images, targets = to_device(images, targets, device, args)
        with autocast(device, args):
            output = model(images)
        meter.update(output, targets)
    meter.all_reduce()
    return meter
