"""Where every random number of a training run comes from: the whole seeding scheme, in one place.

Each stream is seeded from --seed and the position in the run at which it is used, never from what ran
before. That is what makes a run resumed at any optimizer step replay exactly what an uninterrupted run
does, and what makes a sample's augmentation independent of the DataLoader worker that loads it.

    what                                   seeded from                        where
    weight initialisation                  seed                               configure_torch, before the model is built
    data order (also --ra-sampler's)       seed + epoch                       DistributedSampler(seed=seed) and
                                                                              RepeatedAugmentationSampler: every rank
                                                                              the same order, each its own slice
    per-sample augmentation (CPU workers)  (seed, epoch, sample index)        SeededSamples
    per-epoch global stream: the base      (seed, epoch, rank)                train_one_epoch, before the epoch's
      seed of the DataLoader's workers                                        loader iterator is made
    per-step global stream: dropout,       (seed, epoch, step, rank)          train_one_epoch, before each step
      stochastic depth, MixUp/CutMix, the
      synthetic set's flips
    per-batch device augmentation          (seed, epoch, rank, batch index)   DeviceLoader: a torch.Generator of the
      (--data-backend gpu)                                                    batch's own, as it is prepared on a
                                                                              side thread one batch ahead
    the stand-in for a file that fails     (seed, failed sample index)        SkipBadSamples (--max-bad-samples),
      to load                                                                 GpuPreset: the same on any rank and
                                                                              in any epoch

A DataLoader worker's own stream is not covered (it depends on which worker gets which batch): nothing draws
from it, which is why MixUp and CutMix run in the main process, not in the workers' collate function.
Seeds come from numpy's SeedSequence, which hashes the whole tuple (stream, seed, position...): positions of
any size, ImageNet's 1.28 million sample indices among them, never share a seed by arithmetic accident.
"""
import numpy as np
import torch

_TAGS = {"epoch": 1, "step": 2, "sample": 3, "batch": 4, "stand-in": 5}


def derive_seed(stream, seed, *position):
    """The seed of stream `stream` at `position` (non-negative ints) of a run seeded with `seed`, in 63 bits."""
    entropy = [_TAGS[stream], seed % 2**64, *position]
    high, low = np.random.SeedSequence(entropy).generate_state(2, np.uint32).tolist()
    return ((high << 32) | low) >> 1


def seed_epoch(seed, epoch, rank):
    torch.manual_seed(derive_seed("epoch", seed, epoch, rank))


def seed_step(seed, epoch, step, rank):
    torch.manual_seed(derive_seed("step", seed, epoch, step, rank))


def sample_seed(seed, epoch, index):
    return derive_seed("sample", seed, epoch, index)


def batch_generator(seed, epoch, rank, batch_index):
    return torch.Generator().manual_seed(derive_seed("batch", seed, epoch, rank, batch_index))


def stand_in_index(seed, index, size):
    """The sample that replaces sample `index` of a dataset of `size` when its file fails to load: another one."""
    other = derive_seed("stand-in", seed, index) % (size - 1)
    return other + (other >= index)  # every index but `index` itself, equally likely
