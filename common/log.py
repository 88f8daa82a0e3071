"""Rank-0 console lines, one-line errors and exit statuses, log.jsonl, progress lines, the output folders held."""
import json
import os
import re
import signal
import sys
import time

import torch
import torch.distributed as dist


class UserError(Exception):
    """Fixable by the user: one line, no traceback; every rank meets it, rank 0 reports it."""


class SampleError(UserError):
    """Met, and reported, only by the rank that loads the file."""


def in_process_group():
    return dist.is_available() and dist.is_initialized()


def is_main_process():
    return not in_process_group() or dist.get_rank() == 0


def print0(*args, **kwargs):
    if is_main_process():
        print(*args, **kwargs, flush=True)


def launch_rank():
    return dist.get_rank() if in_process_group() else int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


# Exit statuses besides 0 and 1 (a bug's traceback), for launchers; the README has the table.
USER_ERROR_EXIT_CODE = 2  # one `error:` line: fix what it names, do not restart
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request, checkpoint saved; run the same command again
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports Ctrl-C; saved as for 75
STALLED_EXIT_CODE = 124  # as coreutils' timeout: a rank made no progress; resume from the last checkpoint


def stop_at_once_until_training():
    """Before PreemptionSignal takes over there is nothing to save: a stop signal exits at once, requeueable."""
    def stop(signum, frame):
        print0(f"stopped on {signal.Signals(signum).name} before training began (exit status {PREEMPTED_EXIT_CODE}): "
               "nothing was saved; the same command starts again")
        raise SystemExit(PREEMPTED_EXIT_CODE)

    return {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGUSR1)}


def run_cli(main, args):
    replaced = stop_at_once_until_training()
    try:
        main(args)
    except UserError as e:
        # A worker's error arrives with the worker's traceback in its text; the cause is its last line.
        lines = str(e).strip().splitlines() or [type(e).__name__]
        report(re.sub(r"^[\w.]+Error: ", "", lines[-1]), only_this_rank=isinstance(e, SampleError))
    except RuntimeError as e:
        message = dataloader_worker_failure(e)
        if message is None:
            raise
        report(message, only_this_rank=True)
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, no traceback either
        if launch_rank() == 0:
            print("interrupted: stopped without saving", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED_EXIT_CODE)
    finally:
        release_output_dirs()
        if in_process_group():
            dist.destroy_process_group()
        for signum, handler in replaced.items():  # for a caller in the same process (the tests)
            signal.signal(signum, handler)


def report(message, only_this_rank):
    rank = launch_rank()
    from common.engine import StallWatchdog  # here: common.engine imports this module
    if StallWatchdog.latest is not None:  # the run has ended: an error, or the wait below, is no stall
        StallWatchdog.latest.stop()
    if rank == 0 or only_this_rank:
        print(f"error: {message}{'' if rank == 0 else f' (rank {rank})'}", file=sys.stderr, flush=True)
    else:
        wait_for_launcher_to_stop_this_rank()
    sys.exit(USER_ERROR_EXIT_CODE)


SHARED_MEMORY_FIX = "in a container, give it more with docker run --shm-size=8g (or --ipc=host), or lower -j or -b"


def dataloader_worker_failure(error):
    """One line for a DataLoader worker's death or a full /dev/shm (where workers hand batches over); else None."""
    chain, cause = [], error
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = " ".join(str(e) for e in chain)
    if "DataLoader worker" not in text:
        return None
    pid = re.search(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\)", text)
    worker = f"DataLoader worker (pid {pid.group(1)})" if pid else "a DataLoader worker"
    killed = re.search(r"is killed by signal: ([^.]+)\.", text)  # strsignal's name: Killed, Bus error, ...
    if killed and killed.group(1) == "Bus error":  # a page of a full /dev/shm that cannot be backed
        return f"{worker} ran out of shared memory (/dev/shm is full; it died of SIGBUS): {SHARED_MEMORY_FIX}"
    if killed and killed.group(1) != "Killed":
        return f"{worker} was killed by signal: {killed.group(1)}: run with -j 0 to meet the problem in this process"
    if not killed and re.search(r"unable to \w+ shared memory|unable to write to file </torch_", text):
        index = re.search(r"DataLoader worker process (\d+)", text)
        worker = f"DataLoader worker {index.group(1)}" if index else worker
        return f"{worker} ran out of shared memory (/dev/shm is full): {SHARED_MEMORY_FIX}"
    if killed or "exited unexpectedly" in text:
        how = "was killed (SIGKILL)" if killed else "exited unexpectedly"
        return (f"{worker} {how}, which is most often the kernel's out-of-memory killer: lower -j (worker processes "
                "per rank) or -b (batch size)")
    return None


def wait_for_launcher_to_stop_this_rank(timeout_s=30):
    """Were the other ranks to exit first, torchrun would kill rank 0 before its error line is out: they wait for
    the SIGTERM it sends once rank 0 has exited (srun sends none)."""
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) > 1
    if not under_torchrun or not hasattr(signal, "sigtimedwait"):  # macOS has no sigtimedwait
        return
    # Blocked first, or its default action (or PreemptionSignal's handler) would take it instead of the wait.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        signal.sigtimedwait({signal.SIGTERM}, timeout_s)
    except KeyboardInterrupt:  # Ctrl-C while waiting: exit as the error would have
        pass
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


held_output_locks = {}  # output folder -> its open lock file, held for this process's life


def release_output_dirs():
    while held_output_locks:
        held_output_locks.popitem()[1].close()


class RunLog:

    def __init__(self, env, device):
        print0(f"{' '.join(sys.argv)}\nworld size {env.world_size}, device {device}, torch {torch.__version__}")
        self.world_size, self.started, self.device = env.world_size, time.perf_counter(), device
        self.output_dir, self.writer, self.provenance = None, None, None

    def lock_output_dir(self, output_dir, flags):
        # Provenance read once: what ran is the code imported at the start, whatever the working tree becomes.
        if output_dir and is_main_process():
            from common.output_dir import TensorBoard, read_provenance, start_output_dir  # only with --output-dir
            self.provenance = read_provenance(self.device)
            start_output_dir(output_dir, flags, self.provenance)
            self.writer = TensorBoard(output_dir)
        self.output_dir = output_dir

    def progress(self, print_freq):
        return ProgressLog(print_freq, self.world_size, self.writer)

    def record(self, record, by="epoch"):
        if self.output_dir and is_main_process():
            path = os.path.join(self.output_dir, "log.jsonl")
            try:
                with open(path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                from common.output_dir import unwritable_output
                raise UserError(unwritable_output(path, e, self.output_dir)) from None
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{by}/{key}", value, record[by])

    def end(self, result):
        if self.writer is not None:
            self.writer.close()
        where = (f"checkpoints, log.jsonl and TensorBoard files in {self.output_dir}" if self.output_dir else
                 "nothing written (no --output-dir)")
        print0(f"done in {format_duration(time.perf_counter() - self.started)}: {result}; {where}")


def format_duration(seconds):
    """h:mm:ss, or m:ss under an hour (rounded first, so never "42:60")."""
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def all_reduce_sum(tensor):
    if in_process_group():
        dist.all_reduce(tensor)
    return tensor


def peak_memory_mib():
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else None


class ProgressLog:
    """Losses and norms stay device tensors, read back every `print_freq` steps: the loop never waits for the GPU."""

    def __init__(self, print_freq, world_size=1, writer=None):
        self.print_freq, self.world_size, self.writer = print_freq, world_size, writer
        self.start_epoch(0, 0, 0)  # a summary with nothing trained: a run resumed in a pause finishes that first

    def start_epoch(self, epoch, start_step, steps_per_epoch, total_steps=None):
        """`total_steps` ends the last epoch early (--iters)."""
        self.epoch, self.start_step, self.steps_per_epoch = epoch, start_step, steps_per_epoch
        self.steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch) if total_steps else steps_per_epoch
        self.losses, self.grad_norms, self.loss_total, self.done = [], [], 0.0, 0
        self.images, self.images_since_print, self.batches, self.data_time = 0, 0, 0, 0.0
        self.start = self.last_print = time.perf_counter()
        if torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()  # max_memory_mib is the epoch's peak

    def timed(self, batches):
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

    def log(self, step, loss, grad_norm, lr, last=False):
        """Returns whether it printed (a sync point)."""
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        self.done += 1
        if (step + 1) % self.print_freq and step != self.steps - 1 and not last:
            return False
        images = self.images_since_print
        losses, norms = self.read_back()
        now, done = time.perf_counter(), step + 1 - self.start_step
        img_per_s = images * self.world_size / (now - self.last_print)
        eta = (now - self.start) / done * (self.steps - step - 1)
        memory = peak_memory_mib()
        print0(f"Epoch: [{self.epoch}] [{step + 1:>{len(str(self.steps))}}/{self.steps}]  eta: {format_duration(eta)}  "
               f"lr: {lr:.6f}  loss: {losses[-1]:.4f} ({self.loss_total / done:.4f})  grad_norm: {norms[-1]:.3f}  "
               f"img/s: {img_per_s:.1f}  data: {self.data_time / self.batches:.4f}s"
               + (f"  max mem: {memory:.0f}MB" if memory is not None else ""))
        self.log_scalars(step, losses, norms, lr, img_per_s)
        self.last_print = now
        return True

    def read_back(self):
        losses = all_reduce_sum(torch.stack(self.losses)).div_(self.world_size).tolist()
        norms = torch.stack(self.grad_norms).tolist()
        self.loss_total += sum(losses)
        self.images += self.images_since_print
        self.losses, self.grad_norms, self.images_since_print = [], [], 0
        return losses, norms

    def log_scalars(self, step, losses, norms, lr, img_per_s):
        if self.writer is None:
            return
        global_step = self.epoch * self.steps_per_epoch + step
        for at, (loss, norm) in enumerate(zip(losses, norms), global_step - len(losses) + 1):
            self.writer.add_scalar("train/loss", loss, at)
            self.writer.add_scalar("train/grad_norm", norm, at)
        if lr is not None:
            self.writer.add_scalar("train/lr", lr, global_step)
            self.writer.add_scalar("train/img_per_s", img_per_s, global_step)

    def stop(self, step, reason):
        """Logs the steps since the last progress line: the checkpoint saved next counts them as done."""
        if self.losses:
            self.log_scalars(step, *self.read_back(), None, None)
        print0(f"stopping at step {step + 1} of epoch {self.epoch} on {reason}'s request")

    def summary(self, lr):
        epoch_time = time.perf_counter() - self.start
        images = self.images + self.images_since_print
        trained = self.done > 0  # not in an epoch resumed after its last step (a stop during validation)
        return {"train_loss": self.loss_total / self.done if trained else None, "lr": lr, "epoch_time_s": epoch_time,
                "img_per_s": images * self.world_size / epoch_time if trained else None,
                "max_memory_mib": peak_memory_mib()}
