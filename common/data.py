"""Which sample each rank sees, in which order, with which augmentation: all a function of (seed, epoch, index).

That makes a run resumed in the middle of an epoch replay exactly what an uninterrupted run does, and makes
evaluation count every sample once under any number of processes.
"""
import itertools

import torch
from torch.utils.data import Dataset, DistributedSampler


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
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index) % 2**63)
            return self.dataset[index]


def set_epoch(loader, epoch, skip_batches=0):
    """Point a training loader at `epoch`, starting after its first `skip_batches` batches."""
    loader.sampler.set_epoch(epoch, skip_batches * loader.batch_size)
    if isinstance(loader.dataset, SeededSamples):
        loader.dataset.epoch = epoch


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
