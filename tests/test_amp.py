"""--amp (float16 with loss scaling) with every optimizer: a step whose scaled gradients overflow is skipped
whole, the first one too, and a run that diverges stops with one line instead of training on as NaN.

Fused SGD took the skip over from the GradScaler and left the momentum of a skipped first step unfilled, so
that every later step was NaN. These tests run on the CPU, and on CUDA too where there is one (the GPU
command's first phase runs this file)."""
import copy
import re

import pytest
import torch
from torch import nn

from classification.model import create_model as create_classifier
from common.checkpoint import CheckpointError, Checkpointer, load_checkpoint
from common.log import UserError
from common.optim import create_optimizer, param_groups
from common.data import BatchLayout
from common.engine import Precision, StepParts, grad_scaler, train_step
from common.engine import NonFiniteGuard
from conftest import TINY, train
from segmentation.model import create_model as create_segmenter
from segmentation.train import SegmentationLoss

OPTIMIZERS = ["sgd", "sgd_nesterov", "adamw", "rmsprop"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LR, MOMENTUM = 0.1, 0.9


def unfused_reference(name, params):
    """The same update written out by torch's plain for-loop implementation: the textbook."""
    plain = {"foreach": False}
    if name in ("sgd", "sgd_nesterov"):
        return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, nesterov=name == "sgd_nesterov", **plain)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=LR, weight_decay=0.0, **plain)
    return torch.optim.RMSprop(params, lr=LR, momentum=MOMENTUM, eps=0.0316, alpha=0.9, **plain)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_skipped_first_step_leaves_no_trace_in_the_optimizer(name, device):
    device = torch.device(device)
    weight = nn.Parameter(torch.ones(4, device=device))
    optimizer = create_optimizer(name, [{"params": [weight]}], LR, MOMENTUM, 0.0, device.type)  # as the scripts do
    scaler = grad_scaler(device, "float16", optimizer)
    for gradient in (float("inf"), 1.0):  # an overflow the scaler must skip, then a gradient of 1
        scaler.scale(torch.ones((), device=device))
        weight.grad = torch.full_like(weight, gradient) * scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
    expected = nn.Parameter(torch.ones(4, device=device))
    expected.grad = torch.ones_like(expected)
    unfused_reference(name, [expected]).step()
    if name == "sgd":  # the textbook: the first momentum buffer is the gradient itself
        assert torch.allclose(expected, torch.full_like(expected, 1 - LR))
    if name == "sgd_nesterov":
        assert torch.allclose(expected, torch.full_like(expected, 1 - LR * (1 + MOMENTUM)))
    assert torch.allclose(weight, expected, rtol=1e-6, atol=1e-7), (weight, expected)


def classification_case(device):
    torch.manual_seed(0)
    model = create_classifier("resnet18", None, 10)[0]
    batches = [(torch.randn(4, 3, 16, 16), torch.randint(10, (4,))) for _ in range(3)]  # float16 is slow on CPUs
    return model.to(device), nn.CrossEntropyLoss(), batches


def segmentation_case(device):
    torch.manual_seed(0)
    model = create_segmenter("unet", 3, unet_width=8)
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(3, (4, 32, 32))) for _ in range(3)]
    return model.to(device), SegmentationLoss(255, 0.4), batches


class OverflowFirst(nn.Module):
    """The loss of the first call blown up 2**20 times: still finite, but its scaled gradients overflow float16,
    as a real run's first steps do with GradScaler's initial scale of 65,536."""

    def __init__(self, criterion):
        super().__init__()
        self.criterion, self.calls = criterion, 0

    def forward(self, outputs, targets):
        self.calls += 1
        return self.criterion(outputs, targets) * (2.0**20 if self.calls == 1 else 1.0)


def train_steps(model, optimizer, criterion, batches, device):
    """Steps of the scripts' train_step under float16 autocast, the first one overflowing; returns the scale, the mean
    loss and a copy of the state dict after each step."""
    precision = Precision(device, amp=True)  # float16, as --amp
    scaler = precision.grad_scaler(optimizer)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    parts = StepParts(model, OverflowFirst(criterion), optimizer, scheduler, scaler, precision)
    scales, losses, states = [], [], []
    model.train()
    for step, batch in enumerate(batches):
        loss, _ = train_step(parts, iter([batch]), BatchLayout(), 0, 0, step)
        scales.append(scaler.get_scale())
        losses.append(loss.item())
        states.append(copy.deepcopy(model.state_dict()))
    return scales, losses, states


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("case", [classification_case, segmentation_case], ids=["classification", "segmentation"])
def test_amp_trains_on_after_a_first_step_that_overflows(case, name, device):
    device = torch.device(device)
    model, criterion, batches = case(device)
    reference, initial = copy.deepcopy(model), copy.deepcopy(dict(model.named_parameters()))
    optimizer = create_optimizer(name, model, LR, MOMENTUM, 0.0, device.type)
    scales, losses, states = train_steps(model, optimizer, criterion, batches, device)
    assert scales[0] == 2.0**15  # the first step overflowed and was skipped: the scale halved
    assert all(torch.equal(states[0][k], initial[k]) for k in initial)
    assert all(torch.isfinite(torch.tensor(loss)) for loss in losses), losses

    # The step after the skipped one starts from the same weights and gradients as the reference's: the same
    # update, but for rounding (later steps drift apart, AdamW's most: it divides by tiny gradients).
    reference_optimizer = unfused_reference(name, param_groups(reference, LR, 0.0))
    _, _, expected = train_steps(reference, reference_optimizer, criterion, batches[:2], device)
    for key, value in states[1].items():
        assert torch.allclose(value.float(), expected[1][key].float(), rtol=1e-5, atol=1e-6), key


def test_weights_that_turn_nan_under_amp_stop_the_run_with_the_last_good_checkpoint(tmp_path):
    # Epoch 0 at lr 1e-3 (the constant warmup), epoch 1 at 1e30: the weights overflow float16 and the loss turns
    # NaN. GradScaler alone would skip every later step and halve its scale to the end of the run.
    with pytest.raises(UserError) as stopped:
        # float16 convolutions are slow on the CPU: 8 steps an epoch of 4 images of 16 pixels
        train(*TINY, "--synthetic-train-size", "32", "--synthetic-val-size", "8", "-b", "4", "--train-crop-size", "16",
              "--epochs", "2", "--amp", "--opt", "sgd", "--lr", "1e30",
              "--lr-warmup-epochs", "1", "--lr-warmup-method", "constant", "--lr-warmup-decay", "1e-33",
              "--lr-scheduler", "steplr", "--output-dir", tmp_path)
    message = str(stopped.value)
    assert re.search(r"NaN or Inf in \d consecutive steps \(epoch 1, by step [48]\): stopped without saving", message)
    assert f"the last good checkpoint is {tmp_path}/checkpoint.pth, untouched" in message
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pth")
    assert checkpoint["epoch"] == 0 and all(torch.isfinite(v).all() for v in checkpoint["model"].values())


def test_a_scale_below_the_floor_stops_the_run():
    weight = nn.Parameter(torch.ones(2))
    scaler = grad_scaler(torch.device("cpu"), "float16", torch.optim.SGD([weight], lr=0.1))
    guard = NonFiniteGuard(3, None, scaler)
    scaler.scale(torch.ones(()))
    scaler.update(0.5)  # what 17 overflows in a row from 65,536 leave
    finite = torch.tensor(1.0)
    guard.update(finite, torch.tensor(float("inf")), 0, 0, sync_point=False)  # not checked between sync points
    with pytest.raises(UserError, match=r"float16 loss scaling fell to 0.5 \(epoch 0, by step 2\).*no checkpoint"):
        guard.update(finite, torch.tensor(float("inf")), 0, 1, sync_point=True)


def test_overflows_alone_do_not_stop_a_float16_run():
    scaler = grad_scaler(torch.device("cpu"), "float16", torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1))
    guard = NonFiniteGuard(3, None, scaler)
    for step in range(10):  # non-finite gradients from finite losses: GradScaler's business
        guard.update(torch.tensor(2.0), torch.tensor(float("inf")), 0, step, sync_point=True)


@pytest.mark.parametrize("output_dir", [True, False], ids=["output-dir", "no-output-dir"])
def test_a_nan_running_mean_is_never_saved(tmp_path, output_dir):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    precision = Precision(torch.device("cpu"))
    parts = StepParts(model, None, optimizer, scheduler, precision.grad_scaler(optimizer), precision)
    checkpointer = Checkpointer(parts, tmp_path if output_dir else None, True, flags={}, score=("best_acc1", "top-1"))
    checkpointer.save_on_all_ranks(0)
    model[1].running_mean[0] = float("nan")  # the parameters are finite: only the statistics went wrong
    with pytest.raises(CheckpointError, match=r"batch-norm statistics are NaN or Inf \(epoch 1 step 3\): nothing"):
        checkpointer.save_on_all_ranks(1, 3)
    if output_dir:
        saved = load_checkpoint(tmp_path / "checkpoint.pth")
        assert saved["epoch"] == 0 and torch.isfinite(saved["model"]["1.running_mean"]).all()
