"""Which sample each rank sees, in which order, with which augmentation (common/seeding.py has the seeds).

The training sampler cuts one order of each epoch into global batches of a fixed size, whatever the number of
processes, and can begin an epoch part-way, so a run resumed in the middle of an epoch, also on another number
of processes, replays what an uninterrupted run does; the evaluation sampler counts every sample once under any
number of processes.
"""
import os
import signal
import threading
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Sampler

from common.log import UserError
from common.seeding import sample_seed


@dataclass(frozen=True)
class BatchLayout:
    """How each optimizer step's global batch of world_size x batch_size x accum_steps samples is split, and
    which part of it this rank computes.

    The step's global batch is the next global_batch entries of the epoch's order. It is cut into
    world_size x accum_steps slots of batch_size samples, slot j taking entries j, j + slots, j + 2 x slots, ...;
    micro-batch m of rank r is slot m x world_size + r. A slot's samples depend on the global batch and
    batch_size only, so 2 processes x -b 16 x 1 and 1 process x -b 16 x 2 compute the same micro-batches, one
    per rank or one after the other, and a run resumed from one layout on the other goes on with the samples
    (and, seeded by slot, the random draws) the uninterrupted run had. With accum_steps 1, rank r takes every
    world_size-th entry, as DistributedSampler does.
    """

    world_size: int = 1
    rank: int = 0
    batch_size: int = 1
    accum_steps: int = 1

    @property
    def global_batch(self):
        return self.world_size * self.batch_size * self.accum_steps

    @property
    def slots(self):
        return self.world_size * self.accum_steps

    def slot(self, micro):
        """The place in the global batch of this rank's micro-batch `micro` (0 .. accum_steps - 1)."""
        return micro * self.world_size + self.rank


def batch_layout(env, args):
    """This rank's BatchLayout, from the flags (-b, --accum-steps or --global-batch) and the processes found."""
    return BatchLayout(env.world_size, env.rank, args.batch_size, accumulation_steps(args, env.world_size))


def accumulation_steps(args, world_size):
    """--accum-steps for this start: with --global-batch N, N / (processes x -b), so that an elastic launch that
    comes back with another number of processes keeps the global batch (and the run's schedule and order)."""
    if args.global_batch is None:
        return args.accum_steps or 1
    per_step = world_size * args.batch_size
    if args.global_batch % per_step:
        raise UserError(f"--global-batch {args.global_batch} is not a multiple of {world_size} "
                        f"process{'es' if world_size > 1 else ''} x -b {args.batch_size} = {per_step}: start on a "
                        "number of processes that divides it, or change -b")
    accum_steps = args.global_batch // per_step
    if args.accum_steps not in (None, accum_steps):
        raise UserError(f"--accum-steps {args.accum_steps} and --global-batch {args.global_batch} disagree on "
                        f"{world_size} process{'es' if world_size > 1 else ''} x -b {args.batch_size} (that global "
                        f"batch needs --accum-steps {accum_steps}): give one of them")
    return accum_steps


class TrainingSampler(Sampler):
    """This rank's samples of each epoch, micro-batch after micro-batch, as BatchLayout cuts the epoch's order.

    The order is one permutation of the data set for all ranks, drawn from seed + epoch (as DistributedSampler
    draws it). With `reps` (repeated augmentation, --ra-sampler: torchvision's RASampler) each sample comes
    `reps` times in a row, as virtual indices index + copy * len(dataset), from which SeededSamples seeds each
    copy apart (the datasets read index % len(dataset)); consecutive copies fall in consecutive slots, so on
    consecutive ranks, each augmented its own way. An epoch is len(dataset) // global_batch steps in either
    case (with reps it sees about 1/reps of the distinct samples); the entries after the last whole global
    batch are left out, on every layout alike. set_epoch(epoch, start_step) begins an epoch part-way.
    """

    def __init__(self, dataset, layout, seed, reps=0):
        self.dataset, self.layout, self.seed, self.reps = dataset, layout, seed, reps
        self.steps_per_epoch = len(dataset) // layout.global_batch
        self.epoch = self.start_step = 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def order(self):
        """The epoch's order of (virtual) sample indices, the same on every rank."""
        n = len(self.dataset)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return (order[:, None] + n * torch.arange(self.reps)).flatten() if self.reps else order

    def __iter__(self):
        order, layout = self.order(), self.layout
        for step in range(self.start_step, self.steps_per_epoch):
            global_batch = order[step * layout.global_batch:(step + 1) * layout.global_batch]
            for micro in range(layout.accum_steps):
                yield from global_batch[layout.slot(micro)::layout.slots].tolist()

    def __len__(self):
        return (self.steps_per_epoch - self.start_step) * self.layout.accum_steps * self.layout.batch_size

    def position(self, batch_index):
        """(step, slot) of the `batch_index`-th micro-batch this rank reads from where the epoch began."""
        steps, micro = divmod(batch_index, self.layout.accum_steps)
        return self.start_step + steps, self.layout.slot(micro)


class SeededSamples(Dataset):
    """Seeds each sample's random transforms from (seed, epoch, index) instead of from the worker's stream, so
    a sample is augmented the same way whichever worker or rank loads it and wherever a resumed epoch starts. A
    virtual index of TrainingSampler's repeated augmentation gives each copy of a sample a seed of its own."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        with torch.random.fork_rng(devices=[]):  # the caller's own stream is left as it was
            torch.manual_seed(sample_seed(self.seed, self.epoch, index))
            return self.dataset[index % len(self.dataset)]


def training_sampler(dataset, env, args, ra_reps=0):
    """The training sampler of this rank (BatchLayout of the run's flags); with ra_reps, repeated augmentation."""
    return TrainingSampler(dataset, batch_layout(env, args), args.seed, ra_reps)


def set_epoch(loader, epoch, start_step=0):
    """Point a training loader at `epoch`, starting after its first `start_step` optimizer steps."""
    loader.sampler.set_epoch(epoch, start_step)
    if isinstance(loader.dataset, SeededSamples):
        loader.dataset.epoch = epoch


def ignore_stop_signals(worker_id):
    """DataLoader worker_init_fn: SIGTERM, SIGUSR1 and Ctrl-C sent to the whole process group (a terminal, `kill
    -- -PGID`, tini -g, many schedulers) must not kill the workers before the main process has saved: the main
    process handles them, and ends its workers itself.

    A SIGTERM from the main process itself still ends the worker: Python terminates its daemon children so at
    exit, and an ignored one would leave it waiting for them forever."""
    for signum in (signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # no way to tell who sent it (macOS): leave SIGTERM as it is
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    parent = os.getppid()

    def end_on_the_parents_sigterm():
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)

    threading.Thread(target=end_on_the_parents_sigterm, daemon=True).start()


def default_workers(most=8):
    """DataLoader workers per process: `most`, or fewer on a machine with fewer cores available to it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(most, cores)


def optimizer_steps_per_epoch(loader, batch_size, accum_steps):
    steps = loader.sampler.steps_per_epoch
    if steps == 0:
        per_process = len(loader.sampler.dataset) // loader.sampler.layout.world_size
        raise UserError(f"-b {batch_size} x --accum-steps {accum_steps} is more than the {per_process} "
                        "training images per process: lower -b or --accum-steps")
    return steps


class ShardedEvalSampler(torch.utils.data.Sampler):
    """Rank r takes samples r, r + world, r + 2*world, ...: every sample once, no padding.

    DistributedSampler pads the last batch with repeated samples, which counts some of them twice.
    """

    def __init__(self, dataset, rank=0, world_size=1):
        self.indices = range(rank, len(dataset), world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class TensorLoader:
    """Batches of in-memory (or GPU-resident) tensors in the order of `sampler`, without DataLoader workers.

    With the samplers a DataLoader would use (TrainingSampler for training, ShardedEvalSampler for
    evaluation), it splits the data across ranks exactly as a DataLoader does, at no per-sample cost.
    """

    def __init__(self, images, labels, sampler, batch_size, transform, drop_last):
        self.images, self.labels, self.sampler = images, labels, sampler
        self.batch_size, self.transform, self.drop_last = batch_size, transform, drop_last
        self.dataset = images

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        indices = torch.tensor(list(self.sampler)) % len(self.images)  # % for repeated augmentation's copies
        indices = indices.to(self.images.device, non_blocking=True)
        for b in range(len(self)):
            batch = indices[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.transform(self.images[batch], self.labels[batch])
