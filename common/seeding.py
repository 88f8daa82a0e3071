"""Where every random number of a training run comes from: the whole seeding scheme, in one place.

Each stream is seeded from --seed and the position in the run at which it is used, never from what ran
before. That is what makes a run resumed at any optimizer step replay exactly what an uninterrupted run
does, and what makes a sample's augmentation independent of the DataLoader worker that loads it.

    what                                   seeded from                        where
    weight initialisation                  seed                               configure_torch, before the model is built
    data order                             (seed, epoch)                      DistributedSampler(seed=seed), every rank
                                                                              the same permutation, each its own slice
    per-sample augmentation (CPU workers)  (seed, epoch, sample index)        SeededSamples
    per-epoch global stream: DataLoader    (seed, epoch, rank)                train_one_epoch, before the epoch's
      worker seeds, MixUp/CutMix in workers                                   loader iterator is made
    per-step global stream: dropout,       (seed, epoch, step, rank)          train_one_epoch, before each step
      stochastic depth, device transforms
      that draw from torch's stream
    per-batch device augmentation          (seed, epoch, rank, batch index)   DeviceLoader: a torch.Generator of the
      (--data-backend gpu)                                                    batch's own, as it is prepared on a
                                                                              side thread one batch ahead

Streams never share a seed by accident: each carries its own tag into the mix.
"""
import torch

_MODULUS = 2**63 - 25  # the largest prime below 2**63: seeds fill torch's 63-bit range
_TAGS = {"epoch": 1, "step": 2, "sample": 3, "batch": 4}


def derive_seed(stream, seed, *position):
    """The seed of stream `stream` at `position` (a tuple of non-negative ints) of a run seeded with `seed`."""
    value = _TAGS[stream]
    for part in (seed, *position):
        value = (value * 1_000_003 + part) % _MODULUS
    return value


def seed_epoch(seed, epoch, rank):
    torch.manual_seed(derive_seed("epoch", seed, epoch, rank))


def seed_step(seed, epoch, step, rank):
    torch.manual_seed(derive_seed("step", seed, epoch, step, rank))


def sample_seed(seed, epoch, index):
    return derive_seed("sample", seed, epoch, index)


def batch_generator(seed, epoch, rank, batch_index):
    return torch.Generator().manual_seed(derive_seed("batch", seed, epoch, rank, batch_index))
