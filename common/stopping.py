"""The two ways a run stops before its last epoch: on request (a preemption signal), or because it diverged
(the loss or gradients went NaN or Inf). Both are decided at sync points, so every rank stops together."""
import signal

import torch
import torch.distributed as dist

from common.checkpoint import last_good_checkpoint
from common.distributed import all_reduce_max, all_reduce_sum
from common.log import UserError, print0
from common.precision import UnitScaler

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request with a checkpoint saved; run the same command again
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports Ctrl-C; the checkpoint is saved as for 75


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
