"""Preemption, mid-epoch checkpoints, exact resume, non-finite losses, crash-safe saving, ranks that fail."""
import json
import os
import random
import signal
import sys

import pytest
import torch

from common.checkpoint import load_checkpoint
from common.log import PREEMPTED_EXIT_CODE
from conftest import ROOT, SEG_TINY, TINY, popen, python, run, torchrun, train, train_segmentation, write_tree

# Deterministic kernels on one thread per process: runs compared bit for bit must add in the same order. Small
# validation sets and MobileNetV3-small (batch norm and dropout, a seventh of ResNet-18's checkpoint): what is
# compared is bits, not accuracy.
CLASSIFICATION = [*TINY, "--model", "mobilenet_v3_small", "--synthetic-train-size", "256", "--synthetic-val-size", "64",
                  "-b", "16", "--epochs", "2", "--print-freq", "1", "--use-deterministic-algorithms",
                  "--resume", "auto"]
SEGMENTATION = [*SEG_TINY, "--synthetic-val-size", "32", "--epochs", "2", "--print-freq", "1",
                "--use-deterministic-algorithms", "--resume", "auto"]


def same_weights(a, b):
    first, second = (torch.load(d / "checkpoint.pth", weights_only=True)["model"] for d in (a, b))
    return all(torch.equal(first[k], second[k]) for k in first)


def last_record(out):
    return json.loads((out / "log.jsonl").read_text().splitlines()[-1])


def descendants(pid):
    """Processes started by `pid`, at any depth (torchrun puts its workers in sessions of their own)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    children = [child for child, parent in parents.items() if parent == pid]
    return children + [grandchild for child in children for grandchild in descendants(child)]


def interrupt(command, out, when, how, every_process=False):
    """Start `command`, send `how` once a stdout line matches `when(line)`, and return the exit status.

    every_process sends it to the command and everything it started, as when a node dies: torchrun cannot
    pass a SIGKILL on to its workers."""
    process = popen(*command, "--output-dir", out)
    for line in process.stdout:
        if when(line):
            for pid in (descendants(process.pid) if every_process else []) + [process.pid]:
                os.kill(pid, how)
            break
    process.stdout.read()
    return process.wait()


def test_sigkill_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "checkpoint.pth"
    script = f"""
import os, signal, torch
from common.checkpoint import save_atomic
save_atomic({{"weight": torch.ones(3)}}, {str(path)!r})
def save_half_then_die(obj, f):
    f.write(b"PK half of a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # as when the node dies in the middle of torch.save
torch.save = save_half_then_die
save_atomic({{"weight": torch.zeros(3)}}, {str(path)!r})
"""
    result = run(sys.executable, "-c", script)
    assert result.returncode == -signal.SIGKILL
    assert torch.equal(load_checkpoint(path)["weight"], torch.ones(3))


def test_keep_checkpoints_keeps_the_last_epochs(tmp_path):
    train(*TINY, "--synthetic-train-size", "64", "--synthetic-val-size", "32", "--epochs", "3", "--keep-checkpoints", "2", "--output-dir", tmp_path)
    kept = sorted(p.name for p in tmp_path.glob("checkpoint_epoch*.pth"))
    assert kept == ["checkpoint_epoch1.pth", "checkpoint_epoch2.pth"]
    assert load_checkpoint(tmp_path / "checkpoint_epoch1.pth")["epoch"] == 1


def test_sigterm_saves_mid_epoch_and_resume_goes_on_from_that_batch(tmp_path):
    command = [sys.executable, ROOT / "segmentation/train.py", *SEGMENTATION]
    train_segmentation(*SEGMENTATION, "--output-dir", tmp_path / "straight")  # in this process: one start less
    stopped = tmp_path / "stopped"
    status = interrupt(command, stopped, lambda line: line.startswith("Epoch: [0] [ 5/16]"), signal.SIGTERM)
    assert status == PREEMPTED_EXIT_CODE
    checkpoint = load_checkpoint(stopped / "checkpoint.pth")
    assert checkpoint["epoch"] == 0 and 5 <= checkpoint["step"] < 16  # inside the epoch, at the batch it reached
    resumed = python("segmentation/train.py", *SEGMENTATION, "--output-dir", stopped)
    assert resumed.returncode == 0 and f"epoch 0 step {checkpoint['step']}" in resumed.stdout, resumed.stderr[-2000:]
    assert same_weights(tmp_path / "straight", stopped)
    assert last_record(stopped)["val_miou"] == last_record(tmp_path / "straight")["val_miou"]


def test_sigkill_at_a_random_step_resumes_bitwise_with_two_processes(tmp_path):
    flags = [*SEGMENTATION, "--checkpoint-interval", "2"]
    straight = torchrun(2, "segmentation/train.py", *flags, "--output-dir", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = tmp_path / "killed"
    step = random.Random(0).choice(range(2, 8, 2))  # 8 steps per epoch and rank
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               ROOT / "segmentation/train.py", *flags]
    interrupt(command, killed, lambda line: line.startswith("saved") and f"step {step})" in line, signal.SIGKILL,
              every_process=True)
    assert load_checkpoint(killed / "checkpoint.pth")["step"] in range(step, 8)
    resumed = torchrun(2, "segmentation/train.py", *flags, "--output-dir", killed)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]
    assert same_weights(tmp_path / "straight", killed)


def test_classification_resumes_bitwise_mid_epoch_with_image_folder_workers_and_bad_files(tmp_path):
    # Real files through DataLoader workers: augmentation must not depend on which worker loads a sample, and two
    # files that fail to load (--max-bad-samples) are replaced alike, and counted once, in the resumed run.
    data = write_tree(tmp_path / "data", train_per_class=8)  # 6 steps an epoch
    good = (data / "train" / "dog" / "3.jpg").read_bytes()
    (data / "train" / "dog" / "3.jpg").write_bytes(good[: len(good) // 3])
    (data / "train" / "cat" / "5.jpg").write_bytes(b"")
    flags = ["--data-path", data, "--model", "resnet18", "--device", "cpu", "-b", "4", "-j", "2", "--epochs", "2",
             "--train-crop-size", "32", "--val-resize-size", "32", "--val-crop-size", "32", "--print-freq", "1",
             "--checkpoint-interval", "3", "--use-deterministic-algorithms", "--resume", "auto",
             "--max-bad-samples", "2"]
    train(*flags, "--output-dir", tmp_path / "straight")  # in this process: one start less
    killed = tmp_path / "killed"
    interrupt([sys.executable, ROOT / "classification/train.py", *flags], killed,
              lambda line: line.startswith("saved") and "epoch 1 step 3)" in line, signal.SIGKILL)
    resumed = python("classification/train.py", *flags, "--output-dir", killed)
    assert resumed.returncode == 0 and "epoch 1 step" in resumed.stdout, resumed.stderr[-2000:]
    assert "2 bad samples met before this resume count towards --max-bad-samples 2" in resumed.stdout
    assert same_weights(tmp_path / "straight", killed)
    bad = [load_checkpoint(out / "checkpoint.pth")["bad_samples"] for out in (tmp_path / "straight", killed)]
    assert bad[0] == bad[1] and len(bad[0]) == 2
    assert (killed / "bad_samples.txt").read_text() == (tmp_path / "straight" / "bad_samples.txt").read_text()


def test_sigterm_to_torchrun_stops_every_rank_at_the_same_step(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               ROOT / "classification/train.py", *CLASSIFICATION]
    stopped = tmp_path / "stopped"
    interrupt(command, stopped, lambda line: line.startswith("Epoch: [0] [3/8]"), signal.SIGTERM)
    checkpoint = load_checkpoint(stopped / "checkpoint.pth")
    assert checkpoint["epoch"] == 0 and checkpoint["step"] is not None
    resumed = torchrun(2, "classification/train.py", *CLASSIFICATION, "--output-dir", stopped)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = torchrun(2, "classification/train.py", *CLASSIFICATION, "--output-dir", tmp_path / "straight")
    assert straight.returncode == 0
    assert same_weights(tmp_path / "straight", stopped)


def test_nonfinite_loss_stops_without_overwriting_the_last_good_checkpoint(tmp_path):
    # Epoch 0 at lr 1e-3 (the constant warmup), epoch 1 at 1e30: the weights overflow and the loss turns NaN.
    result = python("classification/train.py", *TINY, "--synthetic-train-size", "256", "--epochs", "2",
                    "--lr", "1e30", "--lr-warmup-method", "constant", "--lr-warmup-decay", "1e-33",
                    "--lr-scheduler", "steplr", "--output-dir", tmp_path)
    assert result.returncode == 2
    assert "error: the loss or gradients were NaN or Inf in 3 consecutive steps (epoch 1" in result.stderr
    assert f"the last good checkpoint is {tmp_path}/checkpoint.pth" in result.stderr
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pth")
    assert checkpoint["epoch"] == 0 and all(torch.isfinite(v).all() for v in checkpoint["model"].values())


def test_a_crop_with_no_labelled_pixel_has_zero_loss_not_nan():
    from segmentation.train import SegmentationLoss
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = SegmentationLoss(255, 0.4)({"out": logits, "aux": logits}, torch.full((1, 4, 4), 255))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("content", [b"", b"this is not an image"], ids=["zero-byte", "text-named-jpg"])
def test_unreadable_image_files_name_the_file(tmp_path, content):
    from common.log import UserError
    data = write_tree(tmp_path / "data")
    (data / "train" / "cat" / "odd.jpg").write_bytes(content)
    with pytest.raises(UserError, match=r"cannot read image .*cat/odd.jpg .*delete the file"):
        train("--data-path", data, "--model", "resnet18", "--device", "cpu", "-b", "4", "-j", "0", "--epochs", "1",
              "--train-crop-size", "32", "--val-resize-size", "32", "--val-crop-size", "32")


def test_a_rank_that_fails_does_not_leave_the_other_hanging(tmp_path):
    data = write_tree(tmp_path / "data")
    (data / "val" / "dog" / "0.jpg").write_bytes(b"")  # rank 1 meets it in validation; rank 0 waits for rank 1
    result = torchrun(2, "classification/train.py", "--data-path", data, "--model", "resnet18", "--device", "cpu",
                      "-b", "4", "-j", "0", "--epochs", "1", "--train-crop-size", "32", "--val-resize-size", "32",
                      "--val-crop-size", "32")
    assert result.returncode != 0
    assert "error: cannot read image" in result.stderr and "dog/0.jpg" in result.stderr


def test_uneven_data_across_ranks(tmp_path):
    # 101 training images over 2 ranks at batch 16: the odd image and the partial batches are dropped,
    # and 101 validation images are each counted once.
    result = torchrun(2, "segmentation/train.py", *SEG_TINY, "--synthetic-train-size", "101",
                      "--output-dir", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "on 101 images" in result.stdout and last_record(tmp_path)["epoch"] == 0


def test_a_nan_batch_is_skipped_and_the_scale_stays_one():
    from common.data import BatchLayout
    from common.engine import Precision, StepParts, train_step
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    batches = [(torch.randn(8, 4), torch.randint(2, (8,))) for _ in range(4)]
    batches[1][0][0, 0] = float("nan")  # one poisoned sample in the second batch
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    precision = Precision(torch.device("cpu"))
    scaler = precision.grad_scaler(optimizer)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    seen = []
    real_step = optimizer.step
    optimizer.step = lambda *a, **k: (seen.append(1), real_step(*a, **k))[1]
    parts = StepParts(model, torch.nn.CrossEntropyLoss(), optimizer, scheduler, scaler, precision)
    for step, batch in enumerate(batches):
        train_step(parts, iter([batch]), BatchLayout(), 0, 0, step)
    assert len(seen) == 3 and scaler.get_scale() == 1.0  # the NaN step skipped, the scale not halved
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def stop_signal_when(monkeypatch, module, name, when):
    """Send this process a SIGTERM as `module.name(*args)` is called with `when(*args)` true (runs in this process)."""
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        if when(*args):
            signal.raise_signal(signal.SIGTERM)  # the run's PreemptionSignal takes it
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)


def test_validation_every_n_steps_follows_resumes_and_stops_exactly(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from common import engine
    from segmentation import train as script
    at = SEG_TINY.index("--epochs")
    seg_tiny = SEG_TINY[:at] + SEG_TINY[at + 2:]  # --iters instead
    # 16 steps an epoch: validations at steps 12, 24 (epoch 1 step 8), 36 and 40 (the end, in epoch 2)
    flags = [*seg_tiny, "--iters", "40", "--eval-interval", "12", "--checkpoint-interval", "5",
             "--use-deterministic-algorithms", "--resume", "auto"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train_segmentation(*flags, "--output-dir", straight)
    with monkeypatch.context() as patch, pytest.raises(SystemExit, match=str(PREEMPTED_EXIT_CODE)):
        stop_signal_when(patch, script, "validate", lambda *args: args[5] == "Epoch 1 step 8 val")
        train_segmentation(*flags, "--output-dir", stopped)  # stopped during the validation at step 24
    checkpoint = load_checkpoint(stopped / "checkpoint.pth")
    assert (checkpoint["epoch"], checkpoint["step"], checkpoint["validated"]) == (1, 8, False)
    with monkeypatch.context() as patch, pytest.raises(SystemExit, match=str(PREEMPTED_EXIT_CODE)):
        stop_signal_when(patch, engine, "seed_micro_batch", lambda seed, epoch, step, slot: (epoch, step) == (1, 13))
        train_segmentation(*flags, "--output-dir", stopped)  # validates step 24 first, then stops between validations
    assert (load_checkpoint(stopped / "checkpoint.pth")["step"]) == 14
    train_segmentation(*flags, "--output-dir", stopped)
    assert same_weights(straight, stopped)
    validations = [[(r["step"], r["val_miou"]) for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())
                    if "val_miou" in r] for out in (straight, stopped)]
    assert validations[0] == validations[1] and [step for step, _ in validations[0]] == [12, 24, 36, 40]
    best_step = max(validations[0], key=lambda v: v[1])[0]  # the first of equal scores stays best
    best = load_checkpoint(straight / "best.pth")
    assert best["epoch"] * 16 + (best["step"] or 8) == best_step  # step None: the end of epoch 2, at 8 steps
    events = EventAccumulator(str(straight / "tb")).Reload()
    assert [event.step for event in events.Scalars("step/val_miou")] == [12, 24, 36, 40]
