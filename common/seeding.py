"""Where every random number of a training run comes from: the whole seeding scheme, in one place.

Each stream is seeded from --seed and the position in the run at which it is used, never from what ran
before. That is what makes a run resumed at any optimizer step replay exactly what an uninterrupted run
does, also on another number of processes with the same global and per-process batch, and what makes a
sample's augmentation independent of the DataLoader worker that loads it.

    what                                   seeded from                        where
    weight initialisation                  seed                               configure_torch, before the model is built
    data order (also --ra-sampler's)       seed + epoch                       TrainingSampler (common/data.py): one
                                                                              order for all ranks, cut into global
                                                                              batches and those into slots
    per-sample augmentation (CPU workers)  (seed, epoch, sample index)        SeededSamples
    per-epoch global stream: the base      (seed, epoch, rank)                train_one_epoch, before the epoch's
      seed of the DataLoader's workers                                        loader iterator is made
    per-micro-batch global stream:         (seed, epoch, step, slot)          train_one_epoch, before each
      dropout, stochastic depth,                                              micro-batch is fetched
      MixUp/CutMix, the synthetic set's
      flips
    per-micro-batch device augmentation    (seed, epoch, step, slot)          DeviceLoader: a torch.Generator of the
      (--data-backend gpu)                                                    micro-batch's own, as it is prepared on
                                                                              a side thread one batch ahead
    the stand-in for a file that fails     (seed, failed sample index)        SkipBadSamples (--max-bad-samples),
      to load                                                                 GpuPreset: the same on any rank and
                                                                              in any epoch

A slot is a micro-batch's place in its step's global batch (BatchLayout in common/data.py): micro-batch m of
rank r is slot m * world_size + r, and it holds the same samples under any layout of the same global batch and
per-process batch. Keying per-step randomness by slot, not by rank, is what lets a run resumed on another number
of processes (2 x -b 16 x 1 -> 1 x -b 16 x 2) draw what the uninterrupted run drew. With --accum-steps 1 the slot
is the rank, so those numbers are the ones of the scheme before slots. The per-epoch stream stays per rank: the
workers' base seed it gives reaches no sample (SeededSamples seeds each one).

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


def seed_micro_batch(seed, epoch, step, slot):
    torch.manual_seed(derive_seed("step", seed, epoch, step, slot))


def sample_seed(seed, epoch, index):
    return derive_seed("sample", seed, epoch, index)


def batch_generator(seed, epoch, step, slot):
    return torch.Generator().manual_seed(derive_seed("batch", seed, epoch, step, slot))


def stand_in_index(seed, index, size):
    """The sample that replaces sample `index` of a dataset of `size` when its file fails to load: another one."""
    other = derive_seed("stand-in", seed, index) % (size - 1)
    return other + (other >= index)  # every index but `index` itself, equally likely
