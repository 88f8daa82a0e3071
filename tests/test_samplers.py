"""The training sampler: one order per epoch cut into global batches and slots (the same under every layout of a
global batch), repeated augmentation (--ra-sampler), the balanced draw (--balanced-sampler), and that resume stays
exact with them."""
import sys
from collections import Counter

import pytest
import torch
from torch.utils.data import DistributedSampler

from common.data import BatchLayout, SeededSamples, TrainingSampler
from conftest import ROOT, popen, python, train, write_tree


def epoch_of(sampler, epoch, start_step=0):
    sampler.set_epoch(epoch, start_step)
    return list(sampler)


def slots_of(dataset, layout, epoch=3, reps=0, classes=None):
    """{(step, slot): the samples of that micro-batch} over every rank of `layout`."""
    slots = {}
    for rank in range(layout.world_size):
        ranked = BatchLayout(layout.world_size, rank, layout.batch_size, layout.accum_steps)
        sampler = TrainingSampler(dataset, ranked, seed=7, reps=reps, classes=classes)
        samples = epoch_of(sampler, epoch)
        for index in range(len(samples) // layout.batch_size):
            slots[sampler.position(index)] = samples[index * layout.batch_size:(index + 1) * layout.batch_size]
    return slots


@pytest.mark.parametrize("reps, balanced", [(0, False), (3, False), (0, True), (3, True)])
def test_every_layout_of_a_global_batch_fills_the_same_slots(reps, balanced):
    # 2 processes x 4 x 1, 1 x 4 x 2 and 4 x 2 x 1 ... of a global batch of 8 over 30 samples: 3 steps.
    classes = (torch.arange(30) < 3).long() if balanced else None  # 27 of class 0, 3 of class 1
    same_b = [BatchLayout(2, 0, 4, 1), BatchLayout(1, 0, 4, 2)]
    assert slots_of(range(30), same_b[0], reps=reps, classes=classes) == slots_of(range(30), same_b[1], reps=reps,
                                                                                  classes=classes)
    order = TrainingSampler(range(30), BatchLayout(1, 0, 8, 1), seed=7, reps=reps, classes=classes)
    order.set_epoch(3)
    for layout in same_b + [BatchLayout(4, 0, 2, 1), BatchLayout(2, 0, 1, 4)]:
        slots = slots_of(range(30), layout, reps=reps, classes=classes)
        assert len(slots) == 3 * layout.slots
        for step in range(3):  # each step takes the next 8 entries of the one order, whatever the layout
            taken = [i for slot in range(layout.slots) for i in slots[step, slot]]
            assert sorted(taken) == sorted(order.order()[step * 8:(step + 1) * 8].tolist())


def test_with_accum_steps_1_each_rank_takes_what_distributed_sampler_gave_it():
    for rank in range(3):
        ours = epoch_of(TrainingSampler(range(50), BatchLayout(3, rank, 4, 1), seed=2), 5)
        theirs = DistributedSampler(range(50), 3, rank, shuffle=True, seed=2, drop_last=True)
        theirs.set_epoch(5)
        assert ours == list(theirs)[:len(ours)] and len(ours) == 4 * (50 // 12)


def test_each_sample_comes_reps_times_in_a_row_and_an_epoch_keeps_its_length():
    sampler = TrainingSampler(range(12), BatchLayout(1, 0, 1, 1), seed=0, reps=3)
    virtual = epoch_of(sampler, 0)
    assert len(virtual) == len(sampler) == 12 and len(set(virtual)) == 12  # every copy its own virtual index
    real = [v % 12 for v in virtual]
    assert list(Counter(real).values()) == [3, 3, 3, 3]  # 4 distinct images, 3 copies each
    assert all(len(set(real[i:i + 3])) == 1 for i in range(0, 12, 3))  # the copies of one image in a row
    assert epoch_of(sampler, 1) != virtual  # another epoch, another order


def test_the_balanced_sampler_draws_each_class_about_equally_often_from_the_seed_and_epoch_alone():
    classes = (torch.arange(2000) >= 1900).long()  # 19:1
    sampler = TrainingSampler(range(2000), BatchLayout(1, 0, 10, 1), seed=3, classes=classes)
    first = epoch_of(sampler, 4)
    images = [i % 2000 for i in first]  # each draw a virtual index of its own (test below)
    assert len(first) == 2000 and 0.45 < classes[images].float().mean() < 0.55  # 1,000 expected of each class
    rare_drawn = [i for i in images if i >= 1900]
    assert len(set(rare_drawn)) < len(rare_drawn)  # with replacement: the 100 rare images come several times
    again = TrainingSampler(range(2000), BatchLayout(1, 0, 10, 1), seed=3, classes=classes)
    assert epoch_of(again, 4) == first and epoch_of(again, 5) != first
    assert epoch_of(again, 4, start_step=150) == first[1500:]  # a resumed epoch goes on with the same draws


def test_the_balanced_sampler_repeats_each_drawn_image_with_ra_sampler():
    classes = (torch.arange(12) >= 10).long()
    virtual = epoch_of(TrainingSampler(range(12), BatchLayout(1, 0, 1, 1), seed=0, reps=3, classes=classes), 0)
    real = [v % 12 for v in virtual]
    assert len(virtual) == 12 and all(len(set(real[i:i + 3])) == 1 for i in range(0, 12, 3))
    assert all(v // 12 == i for i, v in enumerate(virtual))  # draw d's copy c: virtual index image + 12 (3d + c)


def test_an_image_the_balanced_sampler_draws_again_is_augmented_anew():
    classes = (torch.arange(20) >= 19).long()  # one rare image, drawn about 10 times an epoch
    sampler = TrainingSampler(range(20), BatchLayout(1, 0, 1, 1), seed=0, classes=classes)
    drawn = [v for v in epoch_of(sampler, 0) if v % 20 == 19]
    augmented = [SeededSamples(Noise(20), seed=0)[v].item() for v in drawn]
    assert len(drawn) > 3 and len(set(augmented)) == len(drawn)


def test_ranks_split_the_one_order_of_the_epoch():
    single = epoch_of(TrainingSampler(range(12), BatchLayout(1, 0, 1, 1), seed=5, reps=4), 2)
    ranks = [epoch_of(TrainingSampler(range(12), BatchLayout(2, rank, 1, 1), seed=5, reps=4), 2) for rank in (0, 1)]
    assert [v for pair in zip(*ranks) for v in pair] == single  # rank r takes every other entry of that order
    assert len(ranks[0]) == len(ranks[1]) == 6
    for first, second in zip(*ranks):  # consecutive copies of an image land on different ranks
        assert first % 12 == second % 12 and first != second


def test_a_resumed_epoch_yields_the_rest_of_the_same_order():
    sampler = TrainingSampler(range(10), BatchLayout(1, 0, 2, 1), seed=1, reps=2)
    whole = epoch_of(sampler, 3)
    assert epoch_of(sampler, 3, start_step=2) == whole[4:] and len(sampler) == 6
    assert sampler.position(0) == (2, 0)


class Noise(torch.utils.data.Dataset):
    """`size` samples, each a random number that stands for a random transform."""

    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return torch.rand(1)


def test_copies_of_one_sample_are_augmented_differently():
    samples = SeededSamples(Noise(5), seed=0)
    assert not torch.equal(samples[2], samples[2 + 5])  # copy 0 and copy 1 of sample 2
    assert torch.equal(samples[2 + 5], samples[2 + 5])  # each copy the same wherever it is loaded


def test_a_killed_run_with_repeated_augmentation_and_mixing_resumes_bitwise(tmp_path):
    # Workers load the samples and the main process mixes them: neither may depend on where the epoch began.
    data = write_tree(tmp_path / "data", train_per_class=8)  # 6 steps an epoch
    flags = ["--data-path", data, "--model", "resnet18", "--device", "cpu", "-b", "4", "-j", "2", "--epochs", "2",
             "--train-crop-size", "32", "--val-resize-size", "32", "--val-crop-size", "32", "--print-freq", "1",
             "--checkpoint-interval", "3", "--use-deterministic-algorithms", "--resume", "auto", "--ra-sampler",
             "--ra-reps", "3", "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0"]
    train(*flags, "--output-dir", tmp_path / "straight")  # in this process: one start less
    killed = tmp_path / "killed"
    process = popen(sys.executable, ROOT / "classification/train.py", *flags, "--output-dir", killed)
    for line in process.stdout:
        if line.startswith("saved") and "epoch 1 step 3)" in line:
            process.kill()
            break
    process.wait()
    resumed = python("classification/train.py", *flags, "--output-dir", killed)
    assert resumed.returncode == 0 and "epoch 1 step 3" in resumed.stdout, resumed.stderr[-2000:]
    first, second = (torch.load(d / "checkpoint.pth", weights_only=True)["model"] for d in (tmp_path / "straight", killed))
    assert all(torch.equal(first[k], second[k]) for k in first)
