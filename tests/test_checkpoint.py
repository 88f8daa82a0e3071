import os

import pytest
import torch
import torchvision

from common import checkpoint as ckpt


def test_save_atomic_round_trip_with_weights_only(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "epoch": 3, "args": {"lr": 0.1, "model": "x"}}
    path = tmp_path / "c.pth"
    ckpt.save_atomic(state, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 3 and loaded["args"] == {"lr": 0.1, "model": "x"}
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0))
    assert os.listdir(tmp_path) == ["c.pth"]


def test_a_save_that_dies_midway_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    ckpt.save_atomic({"epoch": 1}, path)
    real_save = torch.save

    def dying_save(obj, f):
        real_save(obj, f)
        f.truncate(10)  # half a file on disk, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_atomic({"epoch": 2}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


def test_truncated_file_gives_a_checkpoint_error_naming_it(tmp_path):
    path = tmp_path / "c.pth"
    ckpt.save_atomic({"model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ckpt.CheckpointError, match=r"c\.pth.*truncated, corrupt"):
        ckpt.load_checkpoint(str(path))


def test_missing_file_says_so(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(str(tmp_path / "nope.pth"))


@pytest.mark.parametrize("prefix", ["module._orig_mod.", "_orig_mod.module.", "module."])
def test_prefixes_of_ddp_and_compile_are_removed(prefix):
    state = {f"{prefix}fc.weight": torch.zeros(2), f"{prefix}fc.bias": torch.zeros(1)}
    assert sorted(ckpt.state_dict_from({"model": state}, "x.pth")) == ["fc.bias", "fc.weight"]


def test_load_model_state_names_the_keys_and_shapes_that_differ():
    model = torchvision.models.resnet18(num_classes=5)
    other = torchvision.models.resnet18(num_classes=7).state_dict()
    with pytest.raises(ckpt.CheckpointError, match=r"fc\.weight file \[7, 512\] vs model \[5, 512\]"):
        ckpt.load_model_state(model, other, "x.pth")
    resnet34 = torchvision.models.resnet34(num_classes=5).state_dict()
    with pytest.raises(ckpt.CheckpointError, match=r"unexpected keys \(e\.g\. layer1\.2"):
        ckpt.load_model_state(model, resnet34, "x.pth")


def test_load_model_state_can_skip_a_resized_head():
    model = torchvision.models.resnet18(num_classes=5)
    source = torchvision.models.resnet18(num_classes=7)
    skipped = ckpt.load_model_state(model, source.state_dict(), "x.pth", skip_mismatched={"fc.weight", "fc.bias"})
    assert skipped == ["fc.weight", "fc.bias"]
    assert torch.equal(model.conv1.weight, source.conv1.weight)
