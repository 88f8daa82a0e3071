"""The ways a run stops before its last epoch: on request (a preemption signal), because it diverged (the loss
or gradients went NaN or Inf), or because a rank stalled (no step for --stall-timeout seconds). The first two
are decided at sync points, so every rank stops together; a stalled rank cannot reach one, so each rank's
watchdog stops it alone."""
import faulthandler
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time

import torch
import torch.distributed as dist

from common.checkpoint import last_good_checkpoint
from common.distributed import all_reduce_max, all_reduce_sum
from common.log import UserError, print0
from common.precision import UnitScaler

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request with a checkpoint saved; run the same command again
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports Ctrl-C; the checkpoint is saved as for 75
STALLED_EXIT_CODE = 124  # as coreutils' timeout reports one: a rank made no progress; resume from the last checkpoint


def stop_at_once_until_training():
    """Until PreemptionSignal takes over at the training loop, a stop signal has nothing to save: SIGTERM or
    SIGUSR1 during start-up (scanning data, building the model, loading a checkpoint) ends the run at once with
    PREEMPTED_EXIT_CODE and a line, so a script that requeues on it runs the same command again. Install it
    before any slow work; a first Ctrl-C stops at once too (KeyboardInterrupt, exit status 130)."""
    def stop(signum, frame):
        print0(f"stopped on {signal.Signals(signum).name} during start-up, before training began (exit status "
               f"{PREEMPTED_EXIT_CODE}): nothing was saved; the same command starts the run again")
        raise SystemExit(PREEMPTED_EXIT_CODE)

    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, stop)


class PreemptionSignal:
    """SIGTERM and SIGUSR1 (what SLURM and Kubernetes send before preempting a job) and a first Ctrl-C (SIGINT)
    ask the loop to stop at the next step boundary, save and exit; a second Ctrl-C stops at once. Ranks agree
    at sync points (progress lines, checkpoint steps), so all stop together."""

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
        """Whether to stop after this step: at once in one process, at the next sync point across ranks."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.received is not None
        if not sync_point:
            return False
        return all_reduce_sum(torch.tensor(int(self.received is not None), device=self.device)).item() > 0

    def exit(self):
        """Leave with PREEMPTED_EXIT_CODE (INTERRUPTED_EXIT_CODE after Ctrl-C) once every rank is here, so rank 0
        has finished saving: a launcher that sees one rank exit stops the others."""
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        code = INTERRUPTED_EXIT_CODE if self.received == "SIGINT" else PREEMPTED_EXIT_CODE
        print0(f"stopped on {self.received or 'another rank'}'s request (exit status {code}); the same command with "
               "--resume auto goes on from the checkpoint")
        raise SystemExit(code)


class NonFiniteGuard:
    """Stops a run that diverged, at the first sync point after it is seen, without saving over the last good
    checkpoint.

    Without float16, a step whose gradient norm is NaN or Inf (a NaN loss makes it so) is skipped by the scaler
    (not by the disabled one of SGD and RMSprop on a GPU, see common/precision.py), and `max_steps` such steps
    in a row stop the run. Under float16 a non-finite gradient is usually an overflow of the loss scale, which
    GradScaler handles by skipping the step and halving the scale; what it cannot handle is counted instead: a
    loss that is NaN or Inf before any scaling, and a scale halved below MIN_LOSS_SCALE, which only a run whose
    every step overflows reaches. The counts stay on the device between sync points; ranks agree at each one.
    """

    # DeepSpeed's min_loss_scale, the same floor: below 1 even the unscaled gradients overflow float16.
    MIN_LOSS_SCALE = 1.0

    def __init__(self, max_steps, output_dir, scaler):
        self.max_steps, self.output_dir, self.scaler = max_steps, output_dir, scaler
        self.loss_scaling = scaler.is_enabled() and not isinstance(scaler, UnitScaler)
        self.run = self.worst_run = None

    def update(self, loss, grad_norm, epoch, step, sync_point):
        """Count this step on the device; at a sync point, stop the run if it diverged."""
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


# What a stalled rank was doing, told by the innermost frame of its training thread that lies in one of these
# places (paths end with them or hold them). With NCCL a collective returns at once and the rank waits at the
# next sync instead: the loss of a progress line, the stop or non-finite check, hence those files.
STALL_STAGES = (
    (("torch/distributed/", "torch/nn/parallel/", "common/distributed.py", "common/progress.py",
      "common/stopping.py"), "in a collective (waiting for the other ranks)"),
    (("torch/utils/data/", "common/device_loader.py"), "waiting for data"),
    (("torch/serialization.py", "common/checkpoint.py"), "saving a checkpoint"),
    (("torch/autograd/", "torch/nn/", "torch/_tensor.py"), "in forward/backward"),
)


def stalled_stage(frame):
    """STALL_STAGES' name for the innermost frame of `frame`'s stack that one of its places matches."""
    while frame is not None:
        path = frame.f_code.co_filename.replace(os.sep, "/")
        for places, stage in STALL_STAGES:
            if any(place in path for place in places):
                return stage
        frame = frame.f_back
    return "between steps"


class StallWatchdog:
    """--stall-timeout: a thread that ends this rank when no optimizer step or evaluation batch has finished
    for `timeout_s` seconds (0: no watchdog), instead of letting a stuck file, DataLoader worker or collective
    hang the job until the process group's timeout, or forever.

    The clock starts at the first beat(), after the run's first optimizer step (so start-up, data listing and
    compilation do not count), and restarts at every beat. A beat only reads the clock: no host sync. On a
    stall the rank prints the stacks of all its threads (faulthandler) and one line naming its rank and what
    it was doing, ends its DataLoader workers, and exits with STALLED_EXIT_CODE, which a launcher answers by
    starting the run again with --resume auto: checkpoints are written atomically, so the last one is whole.

    It watches only while the function that made it runs (its code is on the stack of the thread that made
    it) and no later watchdog was made: a run called in-process, as the tests do, ends its watchdog when it
    returns or raises. It keeps no reference to that function's frame, which would keep the model alive.
    """

    latest = None  # the watchdog of the run in progress

    def __init__(self, timeout_s, rank):
        self.timeout_s, self.rank, self.last_beat = timeout_s, rank, None
        StallWatchdog.latest = self
        if timeout_s:
            self.thread_id, self.owner = threading.get_ident(), sys._getframe(1).f_code
            threading.Thread(target=self.watch, name="stall watchdog", daemon=True).start()

    def beat(self):
        self.last_beat = time.monotonic()

    def watch(self):
        while StallWatchdog.latest is self and self.owner_runs():
            if self.last_beat is not None and time.monotonic() - self.last_beat > self.timeout_s:
                self.stop_the_rank()
            time.sleep(min(1.0, self.timeout_s / 4))

    def owner_runs(self):
        frame = sys._current_frames().get(self.thread_id)
        while frame is not None and frame.f_code is not self.owner:
            frame = frame.f_back
        return frame is not None

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
