"""Numeric precision, decided once per run: the autocast context of the forward pass and the GradScaler of
the backward, from one name ("float32", "bfloat16" or "float16").

    precision = precision_from_flags(args.amp, args.amp_dtype)
    autocast = autocast_context(device, precision)       # `with autocast:` around forward and loss
    scaler = grad_scaler(device, precision, optimizer)   # scale, unscale_, step, update, as torch documents

Only float16 needs loss scaling: its range is too narrow for small gradients. A checkpoint records the name,
so a resumed run knows whether the scaler state it saved still applies.
"""
import torch

PRECISIONS = ("float32", "bfloat16", "float16")


def precision_from_flags(amp, amp_dtype):
    """--amp alone means float16, as in torchvision's references; --amp-dtype implies --amp."""
    if amp_dtype is not None:
        return amp_dtype
    return "float16" if amp else "float32"


def uses_loss_scaling(precision):
    return precision == "float16"


def autocast_context(device, precision):
    """One reusable context manager: mixed precision on `device`, or a no-op for float32."""
    if precision == "float32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=getattr(torch, precision))


class UnitScaler(torch.amp.GradScaler):
    """A GradScaler held at scale 1, for float32 and bfloat16: it changes no number, but its step() still skips
    an optimizer step whose gradients are not finite. On the CPU and with fused optimizers on a GPU it does so
    without a host sync, which a Python `if torch.isfinite(...)` would cost every step."""

    def __init__(self, device_type):
        super().__init__(device_type, init_scale=1.0)

    def update(self, new_scale=None):
        super().update(1.0)  # after a skipped step GradScaler would halve the scale; there is nothing to rescale


def grad_scaler(device, precision, optimizer):
    """The GradScaler for `precision`: loss scaling for float16, otherwise a UnitScaler where it is sync-free
    and a disabled one (no skipping of non-finite steps) where it would sync every step."""
    if uses_loss_scaling(precision):
        return torch.amp.GradScaler(device.type)
    if device.type == "cpu" or getattr(optimizer, "_step_supports_amp_scaling", False):
        return UnitScaler(device.type)
    return torch.amp.GradScaler(device.type, enabled=False)
