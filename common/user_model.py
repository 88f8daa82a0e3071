"""--model package.module:function: a model of the user's own, built by their function with `num_classes`.

The module is imported as `python -m` would from the folder the run was started in, so train.py, a resumed run
and eval.py started there all find it."""
import importlib
import os
import sys

from torch import nn

from common.log import UserError


def is_import_path(name):
    return ":" in (name or "")


def build_user_model(spec, num_classes):
    module_name, _, function_name = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise UserError(f"--model {spec}: cannot import {module_name} ({e}): start the run in the folder that holds "
                        "it, or add that folder to PYTHONPATH") from None
    build = getattr(module, function_name, None)
    if not callable(build):
        raise UserError(f"--model {spec}: {module.__file__} has no function {function_name!r}: name the function "
                        "that returns the model, as package.module:function")
    model = build(num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise UserError(f"--model {spec}: {function_name}(num_classes={num_classes}) returned a "
                        f"{type(model).__name__}, not a torch.nn.Module")
    return model


class OutputDict(nn.Module):
    """A segmentation model of the user's that returns logits, as the loop reads torchvision's: {"out": logits}."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        output = self.model(images)
        return output if isinstance(output, dict) else {"out": output}
