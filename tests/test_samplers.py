"""Repeated augmentation (--ra-sampler): which copies each rank sees, and that resume stays exact with it."""
import sys
from collections import Counter

import torch

from common.data import RepeatedAugmentationSampler, SeededSamples
from conftest import ROOT, popen, python, write_tree


def epoch_of(sampler, epoch, start=0):
    sampler.set_epoch(epoch, start)
    return list(sampler)


def test_each_sample_comes_reps_times_in_a_row_and_an_epoch_keeps_its_length():
    sampler = RepeatedAugmentationSampler(range(12), 1, 0, seed=0, reps=3)
    virtual = epoch_of(sampler, 0)
    assert len(virtual) == len(sampler) == 12 and len(set(virtual)) == 12  # every copy its own virtual index
    real = [v % 12 for v in virtual]
    assert list(Counter(real).values()) == [3, 3, 3, 3]  # 4 distinct images, 3 copies each
    assert all(len(set(real[i:i + 3])) == 1 for i in range(0, 12, 3))  # the copies of one image in a row
    assert epoch_of(sampler, 1) != virtual  # another epoch, another order


def test_ranks_split_the_one_order_of_the_epoch():
    single = epoch_of(RepeatedAugmentationSampler(range(12), 1, 0, seed=5, reps=4), 2)
    ranks = [epoch_of(RepeatedAugmentationSampler(range(12), 2, rank, seed=5, reps=4), 2) for rank in (0, 1)]
    assert [v for pair in zip(*ranks) for v in pair] == single  # rank r takes every other entry of that order
    assert len(ranks[0]) == len(ranks[1]) == 6
    for first, second in zip(*ranks):  # consecutive copies of an image land on different ranks
        assert first % 12 == second % 12 and first != second


def test_a_resumed_epoch_yields_the_rest_of_the_same_order():
    sampler = RepeatedAugmentationSampler(range(10), 1, 0, seed=1, reps=2)
    whole = epoch_of(sampler, 3)
    assert epoch_of(sampler, 3, start=4) == whole[4:] and len(sampler) == 6


def test_copies_of_one_sample_are_augmented_differently():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, index):
            return torch.rand(1)  # stands for a random transform

    samples = SeededSamples(Noise(), seed=0)
    assert not torch.equal(samples[2], samples[2 + 5])  # copy 0 and copy 1 of sample 2
    assert torch.equal(samples[2 + 5], samples[2 + 5])  # each copy the same wherever it is loaded


def test_a_killed_run_with_repeated_augmentation_and_mixing_resumes_bitwise(tmp_path):
    # Workers load the samples and the main process mixes them: neither may depend on where the epoch began.
    data = write_tree(tmp_path / "data", train_per_class=12)
    flags = ["--data-path", data, "--model", "resnet18", "--device", "cpu", "-b", "4", "-j", "2", "--epochs", "2",
             "--train-crop-size", "32", "--val-resize-size", "32", "--val-crop-size", "32", "--print-freq", "1",
             "--checkpoint-interval", "3", "--use-deterministic-algorithms", "--resume", "auto", "--ra-sampler",
             "--ra-reps", "3", "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0"]
    straight = python("classification/train.py", *flags, "--output-dir", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
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
