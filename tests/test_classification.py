import json
import re
import shutil
import sys

import numpy as np
import pytest
import torch
import torchvision

from classification.grad_checkpointing import enable_grad_checkpointing
from classification.model import create_model
from common.output_dir import read_provenance
from common.optim import param_groups
from conftest import ROOT, TINY, evaluate, popen, python, train, write_image, write_tree


def log_of(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_learns_the_synthetic_set_far_above_chance(tmp_path):
    # 10 classes: chance is 10%. AdamW gets there in a hundred small steps, which keeps this test short (about 63%
    # with seeds 0 and 1 on 1536 images, 90% on 3072; 37 to 44% on 1024 would be too near the bar).
    train("--model", "resnet18", "--device", "cpu", "--opt", "adamw", "--lr", "1e-3", "--lr-warmup-epochs", "0",
          "-b", "32", "--epochs", "2", "--synthetic-train-size", "1536", "--synthetic-val-size", "500",
          "--output-dir", tmp_path)
    assert log_of(tmp_path)[-1]["val_acc1"] > 35


def test_checkpoint_is_plain_and_loads_with_weights_only(trained_run):
    checkpoint = torch.load(trained_run / "checkpoint.pth", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "scaler", "model_ema", "epoch", "best_acc1", "args"} <= set(checkpoint)
    assert checkpoint["epoch"] == 1 and isinstance(checkpoint["args"], dict)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in checkpoint["model"])
    assert (trained_run / "best.pth").exists() and json.loads((trained_run / "args.json").read_text())["epochs"] == 2
    records = log_of(trained_run)
    assert [r["epoch"] for r in records] == [0, 1]
    assert {"epoch", "train_loss", "lr", "val_acc1", "val_acc5", "epoch_time_s", "img_per_s"} <= set(records[0])


def test_args_json_and_checkpoints_record_the_code_versions_and_device(trained_run, tmp_path, monkeypatch):
    recorded = json.loads((trained_run / "args.json").read_text())["provenance"]
    if shutil.which("git") and (ROOT / ".git").exists():  # the Docker image's copy has no .git
        assert re.fullmatch(r"[0-9a-f]{40}", recorded["git_commit"]) and isinstance(recorded["git_dirty"], bool)
    assert (recorded["torch"], recorded["torchvision"], recorded["cuda"]) == (
        torch.__version__, torchvision.__version__, torch.version.cuda)
    assert isinstance(recorded["device_name"], str) and recorded["device_name"]
    for name in ("checkpoint.pth", "best.pth"):
        assert torch.load(trained_run / name, weights_only=True)["provenance"] == recorded
    outside = read_provenance("cpu", tmp_path)  # a copy of the scripts, outside any git checkout
    assert (outside["git_commit"], outside["git_dirty"], outside["torch"]) == (None, None, torch.__version__)
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert read_provenance("cpu")["git_commit"] is None


def test_validation_every_n_steps_writes_a_line_and_keeps_the_best_at_each(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train(*TINY, "--epochs", "2", "--synthetic-train-size", "128", "--synthetic-val-size", "64", "--eval-interval", "3",
          "--output-dir", tmp_path)
    records = log_of(tmp_path)  # 4 steps an epoch: validations at 3, 6 and the end, 8; epoch 0 ends at 4
    assert [(r["epoch"], r["step"], "val_acc1" in r) for r in records] == [
        (0, 3, True), (0, 4, False), (1, 6, True), (1, 8, True)]
    best_step = max((r for r in records if "val_acc1" in r), key=lambda r: r["val_acc1"])["step"]
    best = torch.load(tmp_path / "best.pth", weights_only=True)
    assert best["epoch"] * 4 + (best["step"] or 4) == best_step and best["validated"]
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert [e.step for e in events.Scalars("step/val_acc1")] == [3, 6, 8]


def test_tensorboard_gets_every_step_and_the_confusion_matrix(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(trained_run / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(2 * 16))  # 512 images / 32 per step
    assert len(events.Scalars("train/grad_norm")) == 32
    assert {"train/lr", "train/img_per_s", "epoch/val_acc1"} <= set(events.Tags()["scalars"])
    assert sorted(events.Tags()["images"]) == ["val/confusion_matrix", "val/predictions"]
    assert len(events.Images("val/predictions")) == 2  # one grid at each evaluation


def test_a_killed_run_resumed_with_auto_ends_as_an_uninterrupted_one(tmp_path):
    # 4 steps an epoch, a small validation set and MobileNetV3-small (batch norm and dropout, a seventh of ResNet-18's
    # checkpoint): what is compared is bits, not accuracy.
    flags = [*TINY, "--model", "mobilenet_v3_small", "--use-deterministic-algorithms", "--synthetic-train-size", "128",
             "--synthetic-val-size", "64",
             "--epochs", "4", "--lr-scheduler", "cosineannealinglr", "--model-ema", "--model-ema-steps", "2",
             "--resume", "auto"]
    train(*flags, "--output-dir", tmp_path / "straight")  # the uninterrupted run in this process: one start less
    interrupted = tmp_path / "interrupted"
    process = popen(sys.executable, ROOT / "classification/train.py", *flags, "--output-dir", interrupted)
    for line in process.stdout:
        if line.startswith("saved") and "epoch 0" in line:  # still in LR warmup, where the EMA copies
            process.kill()  # SIGKILL: no chance to clean up, as when a node dies
            break
    process.wait()
    assert torch.load(interrupted / "checkpoint.pth", weights_only=True)["epoch"] < 3
    resumed = python("classification/train.py", *flags, "--output-dir", interrupted)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout
    a = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)
    b = torch.load(interrupted / "checkpoint.pth", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["model_ema"][k], b["model_ema"][k]) for k in a["model_ema"])
    assert log_of(interrupted)[-1]["val_acc1"] == log_of(tmp_path / "straight")[-1]["val_acc1"]


def test_imagefolder_tree_trains_with_the_modern_recipe_and_evaluates(tmp_path):
    data = write_tree(tmp_path / "data")
    # Files that must simply work: grayscale, RGBA PNG, CMYK JPEG, PNG content named .jpg, 16-bit PNG.
    write_image(data / "train" / "cat" / "gray.jpg", mode="L")
    write_image(data / "train" / "dog" / "rgba.png", mode="RGBA")
    write_image(data / "train" / "fox" / "cmyk.jpg", mode="CMYK", fmt="JPEG")
    write_image(data / "val" / "cat" / "really_png.jpg", fmt="PNG")
    write_image(data / "val" / "dog" / "deep.png", mode="I;16")
    out = tmp_path / "out"
    train("--data-path", data, "--model", "resnet18", "--device", "cpu", "-b", "4", "-j", "2", "--epochs", "2",
          "--train-crop-size", "32", "--val-resize-size", "36", "--val-crop-size", "32",
          "--lr-scheduler", "cosineannealinglr", "--lr-warmup-epochs", "1", "--label-smoothing", "0.1",
          "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0", "--auto-augment", "ta_wide", "--random-erase", "0.1",
          "--model-ema", "--model-ema-steps", "1", "--norm-weight-decay", "0", "--clip-grad-norm", "1",
          "--amp", "--amp-dtype", "bfloat16", "--channels-last", "--accum-steps", "2", "--output-dir", out)
    record = log_of(out)[-1]
    assert record["epoch"] == 1 and "val_ema_acc1" in record and record["train_loss"] == record["train_loss"]
    report = tmp_path / "eval.json"
    # No --data-path: eval.py takes the checkpoint's, as it takes its preprocessing.
    evaluate("--checkpoint", out / "checkpoint.pth", "--device", "cpu", "-j", "0",
             "--output-json", report, "--confusion-png", tmp_path / "cm.png", "--use-ema")
    result = json.loads(report.read_text())
    assert result["num_samples"] == 11 and set(result["per_class_acc"]) == {"cat", "dog", "fox"}
    assert (tmp_path / "cm.png").stat().st_size > 0


def test_fine_tuning_loads_the_backbone_and_gives_the_new_head_its_own_lr(tmp_path):
    source = torchvision.models.resnet18(num_classes=10)
    torch.save(source.state_dict(), tmp_path / "pretrained.pth")
    out = tmp_path / "out"
    # lr 0 and no weight decay: the backbone must come out exactly as loaded; the head must move.
    train(*TINY, "--weights", tmp_path / "pretrained.pth", "--synthetic-classes", "4", "--lr", "0", "--wd", "0",
          "--head-lr", "0.05", "--lr-warmup-epochs", "0", "--lr-scheduler", "steplr", "--output-dir", out)
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert torch.equal(checkpoint["model"]["layer3.0.conv1.weight"], source.layer3[0].conv1.weight)
    assert checkpoint["model"]["fc.weight"].shape == (4, 512)
    assert sorted(g["initial_lr"] for g in checkpoint["optimizer"]["param_groups"]) == [0.0, 0.05]


def test_param_groups_split_norm_and_head():
    model = torchvision.models.resnet18(num_classes=3)
    groups = param_groups(model, lr=0.1, weight_decay=1e-4, norm_weight_decay=0.0, head="fc", head_lr=1.0)
    by_key = {(g["lr"], g["weight_decay"]): len(g["params"]) for g in groups}
    assert by_key == {(0.1, 1e-4): 20, (0.1, 0.0): 40, (1.0, 1e-4): 2}  # 20 convs, 20 BNs, fc


def test_torchvision_weights_replace_the_head(monkeypatch):
    # No download in tests: the enum's weights are replaced by a local random state dict.
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    monkeypatch.setattr(type(weights), "get_state_dict",
                        lambda self, *a, **k: torchvision.models.resnet18().state_dict())
    model, head = create_model("resnet18", "IMAGENET1K_V1", num_classes=7)
    assert head == "fc" and model.fc.out_features == 7


def test_grad_checkpointing_keeps_the_gradients():
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=4)
    checkpointed = torchvision.models.resnet18(num_classes=4)
    checkpointed.load_state_dict(plain.state_dict())
    enable_grad_checkpointing(checkpointed)
    images = torch.randn(4, 3, 32, 32)
    for model in (plain, checkpointed):
        model(images).square().mean().backward()
    assert torch.allclose(plain.conv1.weight.grad, checkpointed.conv1.weight.grad, atol=1e-6)
    assert list(plain.state_dict()) == list(checkpointed.state_dict())


@pytest.mark.parametrize("model,flags", [("convnext_tiny", ["--grad-checkpointing"]),
                                         ("mobilenet_v3_small", ["--grad-checkpointing"]), ("googlenet", [])])
def test_other_torchvision_models_train_a_step(tmp_path, model, flags):
    train(*TINY, "--model", model, "--synthetic-train-size", "64", "--synthetic-val-size", "16", "-b", "16",
          *flags, "--output-dir", tmp_path)
    assert log_of(tmp_path)[0]["train_loss"] > 0


def test_resume_may_switch_on_float16_loss_scaling(trained_run):
    train(*TINY, "--epochs", "2", "--amp", "--resume", trained_run / "checkpoint.pth")  # no error is the test


def test_resume_steps_the_optimizer_this_run_built_not_the_saved_one(trained_run, tmp_path):
    # A checkpoint's groups carry the implementation that stepped them. One saved with fused SGD (which corrupts
    # momentum on skipped steps) or on another device must not bring it back.
    checkpoint = torch.load(trained_run / "checkpoint.pth", weights_only=True)
    for group in checkpoint["optimizer"]["param_groups"]:
        group["fused"] = None
    checkpoint["epoch"] = 0  # so that the resumed run steps the optimizer through epoch 1
    torch.save(checkpoint, tmp_path / "unfused.pth")
    train(*TINY, "--epochs", "2", "--resume", tmp_path / "unfused.pth", "--output-dir", tmp_path / "run")
    resumed = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert resumed["epoch"] == 1 and all(group["fused"] for group in resumed["optimizer"]["param_groups"])

    sgd, flags = tmp_path / "sgd", [*TINY, "--opt", "sgd", "--epochs", "2", "--synthetic-train-size", "128"]
    train(*flags, "--output-dir", sgd)
    checkpoint = torch.load(sgd / "checkpoint.pth", weights_only=True)
    for group in checkpoint["optimizer"]["param_groups"]:
        group["fused"] = True
    checkpoint["epoch"] = 0
    torch.save(checkpoint, tmp_path / "fused_sgd.pth")
    train(*flags, "--resume", tmp_path / "fused_sgd.pth", "--output-dir", sgd)
    resumed = torch.load(sgd / "checkpoint.pth", weights_only=True)
    assert resumed["epoch"] == 1 and not any(group["fused"] for group in resumed["optimizer"]["param_groups"])


def test_eval_takes_the_preprocessing_of_torchvision_weights():
    from classification.eval import preprocessing_of
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    assert preprocessing_of(weights) == {"val_resize_size": 232, "val_crop_size": 224, "interpolation": "bilinear"}


def test_default_command_help_documents_every_flag():
    result = python("classification/train.py", "--help")
    assert result.returncode == 0
    for flag in ("--data-path", "--amp-dtype", "--accum-steps", "--grad-checkpointing", "--head-lr", "--resume"):
        assert flag in result.stdout


@pytest.mark.parametrize("opt,schedule,final_lr", [("sgd_nesterov", "exponentiallr", 0.001),
                                                   ("rmsprop", "steplr", 0.001), ("adamw", "cosineannealinglr", 0.0)])
def test_every_optimizer_and_schedule_runs(tmp_path, opt, schedule, final_lr):
    train(*TINY, "--opt", opt, "--lr-scheduler", schedule, "--lr-warmup-method", "constant", "--lr", "0.01",
          "--lr-step-size", "1", "--epochs", "2", "--synthetic-train-size", "64", "--synthetic-val-size", "16",
          "-b", "16", "--output-dir", tmp_path)
    warmup, decayed = log_of(tmp_path)
    assert warmup["lr"] == pytest.approx(0.01) and decayed["lr"] == pytest.approx(final_lr, abs=1e-9)
    assert decayed["train_loss"] > 0


def test_test_only_reproduces_the_logged_accuracy(trained_run, capsys):
    train(*TINY, "--test-only", "--resume", trained_run / "checkpoint.pth")
    last = log_of(trained_run)[-1]
    assert f"top-1 {last['val_acc1']:.3f}" in capsys.readouterr().out


def test_the_prediction_grid_shows_the_most_confidently_wrong_first():
    from classification.pictures import wrong_first
    targets = torch.tensor([0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 1, 2, 1, 0])
    confidence = torch.tensor([0.9, 0.6, 0.95, 0.5, 0.7])
    assert wrong_first(targets, predicted, confidence).tolist() == [2, 4, 1, 0, 3]  # wrong 0.95, 0.7, 0.6; right 0.9, 0.5


def ink(picture):
    """(rows, columns) of a picture's dark pixels, as index arrays."""
    return np.nonzero(np.asarray(picture.convert("L")) < 128)


def test_the_confusion_matrix_writes_every_class_name_whole_and_makes_room_for_the_longest():
    from PIL import Image, ImageDraw, ImageFont
    from classification.pictures import LONGEST, TITLE, confusion_matrix_image
    font, matrix, cell = ImageFont.load_default(), torch.eye(3, dtype=torch.long) * 7, 40
    names = ["cat", "golden retriever", "water ouzel, dipper"]
    picture = confusion_matrix_image(matrix, names, cell)
    margin = picture.width - 3 * cell
    assert margin - TITLE > font.getlength("water ouzel, dipper") > confusion_matrix_image(matrix, list("abc"),
                                                                                         cell).width - 3 * cell
    for i, name in enumerate(names):
        alone = Image.new("RGB", (300, 20), "white")
        ImageDraw.Draw(alone).text((0, 0), name, fill="black", font=font)
        length = np.ptp(ink(alone)[1]) + 1  # of the name's ink, as wide as drawn by itself
        rows, _ = ink(picture.crop((margin + i * cell, TITLE, margin + (i + 1) * cell, margin)))  # above its column
        _, columns = ink(picture.crop((TITLE, margin + i * cell, margin, margin + (i + 1) * cell)))  # beside its row
        assert np.ptp(rows) + 1 == length == np.ptp(columns) + 1 and rows.min() > 0, name
    long = confusion_matrix_image(matrix, ["x" * 200, "b", "c"], cell)
    assert long.width - 3 * cell == TITLE + 6 + int(font.getlength("x" * (LONGEST - 2) + ".."))  # cut, not huge
