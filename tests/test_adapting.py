"""What README's "Adapting" promises: an own model (--model package.module:function, one file of the user's) and an
own metric (one line in common/metrics.py) go through training, resume, --test-only and eval.py."""
import json
import sys

import pytest
import torch

from conftest import SEG_TINY, evaluate, evaluate_segmentation, train, train_segmentation

OWN_MODELS = '''
from torch import nn


def classifier(num_classes):
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, num_classes))


def segmenter(num_classes):  # plain logits, not torchvision's {"out": logits}
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, num_classes, 1))
'''


@pytest.fixture
def own_module(tmp_path, monkeypatch):
    """The user's file, in the folder the runs start in; not importable from anywhere else."""
    (tmp_path / "lab_models.py").write_text(OWN_MODELS)
    monkeypatch.chdir(tmp_path)
    yield "lab_models"
    for name in ("lab_models", "no_head"):
        sys.modules.pop(name, None)
    if str(tmp_path) in sys.path:
        sys.path.remove(str(tmp_path))


def with_own_metric(monkeypatch, meter_class):
    """The one line a user adds to a meter's summary, as a monkeypatch."""
    real = meter_class.summary
    monkeypatch.setattr(meter_class, "summary", lambda self: {**real(self), "own_metric": 42.0})


def last_record(folder):
    return json.loads((folder / "log.jsonl").read_text().splitlines()[-1])


def test_an_own_classifier_and_metric_train_resume_test_and_evaluate(own_module, tmp_path, monkeypatch, capsys):
    from common.metrics import ClassificationMeter
    with_own_metric(monkeypatch, ClassificationMeter)
    flags = ["--model", f"{own_module}:classifier", "--device", "cpu", "--synthetic-train-size", "256",
             "--synthetic-val-size", "64", "-b", "32", "--epochs", "2", "--keep-checkpoints", "2"]
    train(*flags, "--output-dir", tmp_path / "run")
    assert last_record(tmp_path / "run")["val_own_metric"] == 42.0
    trained = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert trained["args"]["model"] == f"{own_module}:classifier" and "5.weight" in trained["model"]

    # A resume from the first epoch's checkpoint ends with the same weights as the run that went on.
    train(*flags, "--output-dir", tmp_path / "resumed", "--resume", tmp_path / "run" / "checkpoint_epoch0.pth")
    assert "resumed from" in capsys.readouterr().out
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)
    assert all(torch.equal(resumed["model"][key], value) for key, value in trained["model"].items())

    train("--test-only", "--resume", tmp_path / "run" / "checkpoint.pth", "--device", "cpu")
    assert "Test: top-1" in capsys.readouterr().out
    evaluate("--checkpoint", tmp_path / "run" / "checkpoint.pth", "--device", "cpu", "-j", "0",
             "--output-json", tmp_path / "eval.json")
    assert json.loads((tmp_path / "eval.json").read_text())["own_metric"] == 42.0


def test_an_own_segmenter_and_metric_train_and_evaluate(own_module, tmp_path, monkeypatch, capsys):
    """Its logits come as {"out": logits} by a hook, and its state dict keeps its own keys."""
    from common.metrics import SegmentationMeter
    with_own_metric(monkeypatch, SegmentationMeter)
    train_segmentation(*SEG_TINY, "--model", f"{own_module}:segmenter", "--synthetic-train-size", "64",
                       "--synthetic-val-size", "16", "--output-dir", tmp_path / "run")
    assert last_record(tmp_path / "run")["val_own_metric"] == 42.0
    assert "0.weight" in torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["model"]
    train_segmentation("--test-only", "--resume", tmp_path / "run" / "checkpoint.pth", "--device", "cpu")
    assert "Test: mIoU" in capsys.readouterr().out
    evaluate_segmentation("--checkpoint", tmp_path / "run" / "checkpoint.pth", "--device", "cpu",
                          "--output-json", tmp_path / "eval.json")
    assert json.loads((tmp_path / "eval.json").read_text())["own_metric"] == 42.0


def test_an_own_model_that_cannot_be_imported_or_lacks_what_a_flag_needs_is_one_line(own_module, tmp_path):
    from common.log import UserError
    tiny = ["--device", "cpu", "--synthetic-train-size", "64", "--epochs", "1"]
    with pytest.raises(UserError, match="cannot import no_such_module .*start the run in the folder that holds it"):
        train("--model", "no_such_module:build", *tiny)
    (tmp_path / "needs_more.py").write_text("import not_installed_anywhere\n")
    with pytest.raises(UserError, match="needs_more imports not_installed_anywhere, which is not installed"):
        train("--model", "needs_more:build", *tiny)
    (tmp_path / "no_head.py").write_text("from torch import nn\n\ndef build(num_classes):\n"
                                         "    return nn.Sequential(nn.Conv2d(3, num_classes, 1), nn.AdaptiveAvgPool2d(1), "
                                         "nn.Flatten())\n")
    with pytest.raises(UserError, match="no nn.Linear head"):
        train("--model", "no_head:build", "--head-lr", "0.1", *tiny)
    with pytest.raises(UserError, match="is your own: --weights-backbone, --aux-loss"):
        train_segmentation(*SEG_TINY, "--model", f"{own_module}:segmenter", "--aux-loss")
