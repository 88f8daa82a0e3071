"""Inputs and events that used to give a wrong result or lose work: flag values with no sensible meaning, a
second run on one output folder, classes that changed under a checkpoint, stop signals that reached the
DataLoader workers, arrived during validation, or came from Ctrl-C."""
import os
import signal
import sys

import pytest

from common.checkpoint import CheckpointError, load_checkpoint
from common.log import UserError
from common.log import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE
from conftest import ROOT, SEG_TINY, TINY, popen, python, torchrun, train, train_segmentation, write_tree


def parse_error(script, argv, capsys):
    """What argparse says of `argv` (it exits 2 with one line)."""
    from importlib import import_module
    parser = import_module(f"{script}.train").get_args_parser()
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("script,argv,says", [
    ("classification", ["--clip-grad-norm", "-1"], "argument --clip-grad-norm: must be a positive number, got -1"),
    ("classification", ["--checkpoint-interval", "-1"], "argument --checkpoint-interval: must be 0 or a positive"),
    ("classification", ["--keep-checkpoints", "-2"], "argument --keep-checkpoints: must be 0 or a positive"),
    ("classification", ["--mixup-alpha", "-1"], "argument --mixup-alpha: must be 0 or a positive number"),
    ("segmentation", ["--eval-stride", "-8"], "argument --eval-stride: must be a positive integer, got -8"),
    ("segmentation", ["--eval-scales", "0.5,1.0,1,5"], "argument --eval-scales: scales must be above 0 and at most 4"),
    ("segmentation", ["--eval-scales", "0.75,1,1.0"], "argument --eval-scales: lists a scale twice"),
])
def test_flag_values_without_a_sensible_meaning_are_refused(script, argv, says, capsys):
    assert says in parse_error(script, argv, capsys)


def test_a_start_epoch_past_the_end_is_refused():
    with pytest.raises(UserError, match="--start-epoch 5 is not below --epochs 1: nothing would be trained"):
        train(*TINY, "--start-epoch", "5")


def test_a_validation_crop_larger_than_the_resize_is_refused(tmp_path):
    data = write_tree(tmp_path / "data")
    with pytest.raises(UserError, match="--val-crop-size 64 is larger than --val-resize-size 32"):
        train("--data-path", data, "--device", "cpu", "--val-resize-size", "32", "--val-crop-size", "64")


def test_resuming_on_other_classes_of_the_same_count_is_refused(tmp_path):
    flags = ["--model", "resnet18", "--device", "cpu", "-b", "4", "-j", "0", "--train-crop-size", "32",
             "--val-resize-size", "32", "--val-crop-size", "32"]
    train("--data-path", write_tree(tmp_path / "pets", classes=("cat", "dog")), *flags, "--epochs", "1",
          "--output-dir", tmp_path / "run")
    other = write_tree(tmp_path / "insects", classes=("ant", "cat"))
    with pytest.raises(CheckpointError, match=r"trained with class_names \['cat', 'dog'\], this run has \['ant', 'cat'\]"):
        train("--data-path", other, *flags, "--epochs", "1", "--resume", tmp_path / "run" / "checkpoint.pth")


def test_a_second_live_run_on_one_output_dir_is_refused_and_a_crash_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "run"
    first = popen(sys.executable, ROOT / "classification/train.py", *TINY, "--epochs", "3", "--print-freq", "1",
                  "--output-dir", out)
    for line in first.stdout:
        if line.startswith("Epoch: [0] ["):  # the first run holds the folder now
            break
    second = python("classification/train.py", *TINY, "--output-dir", out)
    first.kill()  # a crash: the lock must not outlive it
    first.wait()
    assert second.returncode == 2
    assert f"error: another run (pid {first.pid}) is writing to --output-dir {out}" in second.stderr
    train(*TINY, "--synthetic-train-size", "64", "--synthetic-val-size", "32", "--output-dir", out)  # in this process


def test_sigterm_to_the_whole_process_group_saves_despite_dataloader_workers(tmp_path):
    data = write_tree(tmp_path / "data", train_per_class=16)
    out = tmp_path / "run"
    process = popen(sys.executable, ROOT / "classification/train.py", "--data-path", data, "--model", "resnet18",
                    "--device", "cpu", "-b", "4", "-j", "2", "--epochs", "2", "--train-crop-size", "32",
                    "--val-resize-size", "32", "--val-crop-size", "32", "--print-freq", "1", "--output-dir", out,
                    start_new_session=True)  # its own process group, as a terminal or a scheduler makes
    for line in process.stdout:
        if line.startswith("Epoch: [0] ["):
            os.killpg(process.pid, signal.SIGTERM)  # main process and workers alike
            break
    process.stdout.read()
    assert process.wait() == PREEMPTED_EXIT_CODE
    assert load_checkpoint(out / "checkpoint.pth")["step"] is not None


def test_a_stop_during_validation_saves_the_trained_epoch_at_once(tmp_path):
    # A large validation set: the signal arrives while it is being evaluated, or at the epoch's last step.
    flags = [*SEG_TINY, "--synthetic-train-size", "64", "--synthetic-val-size", "4000", "--print-freq", "1",
             "--resume", "auto"]
    out = tmp_path / "run"
    process = popen(sys.executable, ROOT / "segmentation/train.py", *flags, "--output-dir", out)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("Epoch: [0] [4/4]"):
            process.send_signal(signal.SIGTERM)
            break
    lines += process.stdout.readlines()
    assert process.wait() == PREEMPTED_EXIT_CODE
    assert not any(line.startswith("Epoch 0 val") for line in lines)  # validation did not run to its end
    checkpoint = load_checkpoint(out / "checkpoint.pth")
    assert (checkpoint["epoch"], checkpoint["step"]) == (0, 4)  # every step of the epoch, saved
    resumed = python("segmentation/train.py", *flags, "--output-dir", out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "Epoch 0 val: mIoU" in resumed.stdout  # validation reruns


def test_a_first_ctrl_c_saves_and_exits_130(tmp_path):
    out = tmp_path / "run"
    process = popen(sys.executable, ROOT / "classification/train.py", *TINY, "--print-freq", "1", "--output-dir", out)
    for line in process.stdout:
        if line.startswith("Epoch: [0] ["):
            process.send_signal(signal.SIGINT)
            break
    rest = process.stdout.read()
    assert process.wait() == INTERRUPTED_EXIT_CODE
    assert "Ctrl-C: finishing this step and saving" in rest
    assert load_checkpoint(out / "checkpoint.pth")["step"] is not None


def test_an_error_every_rank_meets_is_reported_once_under_torchrun(tmp_path):
    result = torchrun(2, "classification/train.py", *TINY, "--start-epoch", "5")
    assert result.returncode != 0
    assert result.stderr.count("error: --start-epoch 5 is not below --epochs 1") == 1, result.stderr[-2000:]


def test_test_only_takes_the_model_and_sizes_of_the_checkpoint(tmp_path, capsys):
    # Trained at 32 pixels: evaluating at the synthetic default of 48 would score other images.
    train_segmentation(*SEG_TINY, "--output-dir", tmp_path)
    logged = load_checkpoint(tmp_path / "checkpoint.pth")["best_miou"]
    capsys.readouterr()
    args = train_segmentation("--device", "cpu", "--test-only", "--resume", tmp_path / "checkpoint.pth")
    assert (args.synthetic_image_size, args.unet_width, args.synthetic_classes, args.base_size) == (32, 8, 3, 32)
    assert f"Test: mIoU {logged:.2f}" in capsys.readouterr().out
