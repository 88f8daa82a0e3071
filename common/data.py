"""Which sample each rank sees, in which order, with which augmentation (common/seeding.py has the seeds).

Training samplers can begin an epoch part-way, so a run resumed in the middle of an epoch replays exactly
what an uninterrupted run does; the evaluation sampler counts every sample once under any number of processes.
"""
import itertools
import os
import signal
import threading

import torch
from torch.utils.data import Dataset, DistributedSampler

from common.log import UserError
from common.seeding import sample_seed


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can begin an epoch part-way: set_epoch(epoch, start) skips `start` samples."""

    start = 0

    def set_epoch(self, epoch, start=0):
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return self.num_samples - self.start


class RepeatedAugmentationSampler(ResumableSampler):
    """Repeated augmentation (torchvision's RASampler, --ra-sampler): each sample `reps` times in a row in the
    epoch's order, so its copies land on consecutive ranks (or in one batch), each augmented its own way. An
    epoch keeps its usual length per rank, so it sees about 1/reps of the distinct samples.

    It yields virtual indices, index + copy * len(dataset), from which SeededSamples seeds each copy apart;
    the datasets read sample index % len(dataset). As for DistributedSampler, the epoch's order depends on
    (seed, epoch) only, and rank r takes every world-th entry of it.
    """

    def __init__(self, dataset, num_replicas, rank, seed, reps):
        super().__init__(dataset, num_replicas, rank, shuffle=True, seed=seed, drop_last=True)
        self.reps = reps

    def __iter__(self):
        n = len(self.dataset)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        copies = (order[:, None] + n * torch.arange(self.reps)).flatten()
        mine = copies[self.rank::self.num_replicas][:self.num_samples]
        return itertools.islice(iter(mine.tolist()), self.start, None)


class SeededSamples(Dataset):
    """Seeds each sample's random transforms from (seed, epoch, index) instead of from the worker's stream, so
    a sample is augmented the same way whichever worker loads it and wherever a resumed epoch starts. A virtual
    index of RepeatedAugmentationSampler gives each copy of a sample a seed of its own."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        with torch.random.fork_rng(devices=[]):  # the caller's own stream is left as it was
            torch.manual_seed(sample_seed(self.seed, self.epoch, index))
            return self.dataset[index % len(self.dataset)]


def training_sampler(dataset, env, seed, ra_reps=0):
    """The training sampler: each rank its own shuffled part of every epoch; with ra_reps, repeated augmentation."""
    if ra_reps:
        return RepeatedAugmentationSampler(dataset, env.world_size, env.rank, seed, ra_reps)
    return ResumableSampler(dataset, env.world_size, env.rank, shuffle=True, seed=seed, drop_last=True)


def set_epoch(loader, epoch, skip_batches=0):
    """Point a training loader at `epoch`, starting after its first `skip_batches` batches."""
    loader.sampler.set_epoch(epoch, skip_batches * loader.batch_size)
    if isinstance(loader.dataset, SeededSamples):
        loader.dataset.epoch = epoch


def ignore_stop_signals(worker_id):
    """DataLoader worker_init_fn: SIGTERM, SIGUSR1 and Ctrl-C sent to the whole process group (a terminal, `kill
    -- -PGID`, tini -g, many schedulers) must not kill the workers before the main process has saved: the main
    process handles them, and ends its workers itself.

    A SIGTERM from the main process itself still ends the worker: Python terminates its daemon children so at
    exit, and an ignored one would leave it waiting for them forever.

    SIGBUS (shared memory full) gets its default action back: the worker dies without torch's own message, one
    line per worker, and the main process reports it in one line (common/log.py, dataloader_worker_failure)."""
    signal.signal(signal.SIGBUS, signal.SIG_DFL)
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
    steps = len(loader) // accum_steps
    if steps == 0:
        raise UserError(f"-b {batch_size} x --accum-steps {accum_steps} is more than the {len(loader.sampler)} "
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

    With the samplers a DataLoader would use (DistributedSampler for training, ShardedEvalSampler for
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
        indices = torch.tensor(list(self.sampler)) % len(self.images)  # % for RepeatedAugmentationSampler's copies
        indices = indices.to(self.images.device, non_blocking=True)
        for b in range(len(self)):
            batch = indices[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.transform(self.images[batch], self.labels[batch])
