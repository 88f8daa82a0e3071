"""Which sample each rank sees, in which order, with which augmentation (common/seeding.py has the seeds).

Training samplers can begin an epoch part-way, so a run resumed in the middle of an epoch replays exactly
what an uninterrupted run does; the evaluation sampler counts every sample once under any number of processes.
"""
import itertools
import os
import signal

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


class SeededSamples(Dataset):
    """Seeds each sample's random transforms from (seed, epoch, index) instead of from the worker's stream, so
    a sample is augmented the same way whichever worker loads it and wherever a resumed epoch starts."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        with torch.random.fork_rng(devices=[]):  # the caller's own stream is left as it was
            torch.manual_seed(sample_seed(self.seed, self.epoch, index))
            return self.dataset[index]


def set_epoch(loader, epoch, skip_batches=0):
    """Point a training loader at `epoch`, starting after its first `skip_batches` batches."""
    loader.sampler.set_epoch(epoch, skip_batches * loader.batch_size)
    if isinstance(loader.dataset, SeededSamples):
        loader.dataset.epoch = epoch


def ignore_stop_signals(worker_id):
    """DataLoader worker_init_fn: SIGTERM, SIGUSR1 and Ctrl-C sent to the whole process group (a terminal, `kill
    -- -PGID`, tini -g, many schedulers) must not kill the workers before the main process has saved: the main
    process handles them, and ends its workers itself."""
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


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
        indices = torch.tensor(list(self.sampler)).to(self.images.device, non_blocking=True)
        for b in range(len(self)):
            batch = indices[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.transform(self.images[batch], self.labels[batch])
