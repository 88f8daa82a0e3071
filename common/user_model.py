"""--model package.module:function: a model of the user's own, built by their function with `num_classes`.

The module is imported as `python -m` would from the folder the run was started in, so train.py, a resumed run
and eval.py started there all find it."""
import importlib
import os
import sys

from torch import nn

from common.log import UserError


def build_user_model(spec, num_classes):
    module_name, _, function_name = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name and not module_name.startswith(f"{e.name}."):  # what the user's module imports
            raise UserError(f"--model {spec}: {module_name} imports {e.name}, which is not installed: pip install "
                            "it") from None
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


def as_output_dict(module, inputs, output):
    """A forward hook: a segmentation model of the user's that returns logits gives them as the loop reads
    torchvision's, {"out": logits}, with its state dict's keys unchanged."""
    return output if isinstance(output, dict) else {"out": output}
