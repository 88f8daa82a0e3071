"""Progress lines of training, in the manner of torchvision's MetricLogger.log_every: one object that owns the
per-step values, the one host sync per printed line, the ETA, and the TensorBoard scalars."""
import time

import torch

from common.distributed import all_reduce_sum
from common.log import format_duration, print0


class ProgressLog:
    """Collects each step's loss and gradient norm as device tensors and reads them back only every
    `print_freq` steps (and at the epoch's last), so the training loop never waits for the GPU in between."""

    def __init__(self, print_freq, world_size=1, writer=None):
        self.print_freq, self.world_size, self.writer = print_freq, world_size, writer

    def start_epoch(self, epoch, start_step, steps, steps_per_epoch=None):
        """Steps `start_step`..`steps` of `epoch`; `steps_per_epoch` numbers the global steps when the run
        ends before the epoch does (default: `steps`)."""
        self.epoch, self.start_step, self.steps = epoch, start_step, steps
        self.steps_per_epoch = steps_per_epoch or steps
        self.losses, self.grad_norms, self.loss_total, self.done = [], [], 0.0, 0
        self.images, self.images_since_print, self.batches, self.data_time = 0, 0, 0, 0.0
        self.start = self.last_print = time.perf_counter()
        if torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()  # max_memory_mib is the epoch's peak

    def timed(self, batches):
        """The batches of an iterator, counting images and the time spent waiting for them."""
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.data_time += time.perf_counter() - t0
            self.batches += 1
            self.images_since_print += len(batch[0])
            yield batch

    def log(self, step, loss, grad_norm, lr):
        """Record one optimizer step; on a print step, print and log it. Returns whether it printed (a sync point)."""
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        self.done += 1
        if (step + 1) % self.print_freq and step != self.steps - 1:
            return False
        losses = all_reduce_sum(torch.stack(self.losses)).div_(self.world_size).tolist()  # the one sync
        norms = torch.stack(self.grad_norms).tolist()
        self.loss_total += sum(losses)
        now, done = time.perf_counter(), step + 1 - self.start_step
        img_per_s = self.images_since_print * self.world_size / (now - self.last_print)
        eta = (now - self.start) / done * (self.steps - step - 1)
        memory = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else 0
        print0(f"Epoch: [{self.epoch}] [{step + 1:>{len(str(self.steps))}}/{self.steps}]  eta: {format_duration(eta)}  "
               f"lr: {lr:.6f}  loss: {losses[-1]:.4f} ({self.loss_total / done:.4f})  grad_norm: {norms[-1]:.3f}  "
               f"img/s: {img_per_s:.1f}  data: {self.data_time / self.batches:.4f}s  max mem: {memory:.0f}MB")
        self.log_scalars(step, losses, norms, lr, img_per_s)
        self.images += self.images_since_print
        self.losses, self.grad_norms, self.images_since_print, self.last_print = [], [], 0, now
        return True

    def log_scalars(self, step, losses, norms, lr, img_per_s):
        if self.writer is None:
            return
        global_step = self.epoch * self.steps_per_epoch + step
        first_step = global_step - len(losses) + 1
        for i, (loss, norm) in enumerate(zip(losses, norms)):
            self.writer.add_scalar("train/loss", loss, first_step + i)
            self.writer.add_scalar("train/grad_norm", norm, first_step + i)
        if lr is not None:
            self.writer.add_scalar("train/lr", lr, global_step)
            self.writer.add_scalar("train/img_per_s", img_per_s, global_step)

    def stop(self, step, reason):
        """A stop signal ends the epoch at `step`: log the steps since the last progress line, which the
        checkpoint saved next already counts as done, and say why the run stops."""
        if self.losses:
            losses = all_reduce_sum(torch.stack(self.losses)).div_(self.world_size).tolist()
            self.loss_total += sum(losses)
            self.log_scalars(step, losses, torch.stack(self.grad_norms).tolist(), None, None)
            self.images += self.images_since_print
            self.losses, self.grad_norms, self.images_since_print = [], [], 0
        print0(f"stopping at step {step + 1} of epoch {self.epoch} on {reason}'s request")

    def summary(self, lr):
        """The epoch's numbers for log.jsonl: mean loss, last LR, time, throughput over all ranks, peak memory."""
        epoch_time = time.perf_counter() - self.start
        memory = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else 0
        images = self.images + self.images_since_print
        if self.done == 0:  # an epoch resumed after its last step (a stop during validation): nothing to report
            return {"train_loss": None, "lr": lr, "epoch_time_s": epoch_time, "img_per_s": None,
                    "max_memory_mib": memory}
        return {"train_loss": self.loss_total / self.done, "lr": lr, "epoch_time_s": epoch_time,
                "img_per_s": images * self.world_size / epoch_time, "max_memory_mib": memory}
