"""Checkpoints as plain dicts of tensors: written atomically, read with weights_only=True, checked key by key."""
import os
import pickle
import re

import torch

from common.log import UserError


class CheckpointError(UserError):
    """A checkpoint that cannot be used; like every UserError, the scripts report it in one line."""


def unwrap(model):
    """The plain module under DistributedDataParallel / AveragedModel, so state-dict keys carry no prefix."""
    return model.module if hasattr(model, "module") else model


def save_atomic(state, path):
    """Write to a temporary file beside `path`, fsync, then rename: a crash leaves the old file or the new one."""
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # only when saving failed
            os.remove(tmp)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist: check the path, or use --resume auto "
                              "to resume only when <output-dir>/checkpoint.pth exists")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):  # e.g. torchvision's references store an argparse.Namespace
            raise CheckpointError(
                f"checkpoint {path} holds Python objects besides tensors, which weights_only loading refuses: "
                "if you trust the file, load it once with weights_only=False and torch.save its 'model' entry "
                "to a new file, then use that file") from None
        cause = e
    except Exception as e:
        cause = e
    first_line = re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).strip().splitlines()[0]
    raise CheckpointError(f"cannot read checkpoint {path} ({type(cause).__name__}: {first_line}): the file is "
                          "truncated, corrupt or not a PyTorch checkpoint; use an earlier checkpoint")


def state_dict_from(checkpoint):
    """A training checkpoint ({'model': ...}) or a bare state dict, with DDP/compile prefixes removed."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("the file holds no model state dict (expected a dict of tensors or a 'model' key)")
    stripped = True
    while stripped and state:  # in any order and nesting: module._orig_mod.x, _orig_mod.module.x
        stripped = False
        for prefix in ("module.", "_orig_mod."):
            if all(k.startswith(prefix) for k in state):
                state, stripped = {k[len(prefix):]: v for k, v in state.items()}, True
    return state


def load_model_state(model, state, path, skip_mismatched=()):
    """Load `state` strictly, except keys in `skip_mismatched` whose shapes differ (a replaced head).

    Returns the skipped keys. Any other difference stops with the keys and shapes that differ.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]
    skipped = [k for k in mismatched if k in skip_mismatched]
    mismatched = [k for k in mismatched if k not in skip_mismatched]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys missing from the file (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if mismatched:
            parts.append("shapes differ: " + ", ".join(
                f"{k} file {list(state[k].shape)} vs model {list(own[k].shape)}" for k in mismatched[:3]))
        raise CheckpointError(f"checkpoint {path} does not fit this model: {'; '.join(parts)}. "
                              "Use the --model (and class count) the checkpoint was trained with")
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=not skipped)
    return skipped
