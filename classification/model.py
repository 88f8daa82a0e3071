"""Any torchvision classifier by name, from scratch or from weights, with its head sized to the dataset."""
import os

import torchvision
from torch import nn

from common.checkpoint import load_checkpoint, load_model_state, state_dict_from
from common.log import UserError, print0


def find_head(model, required=True):
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linear and required:
        raise UserError(f"{type(model).__name__} has no nn.Linear classifier to resize: choose another --model")
    return linear[-1] if linear else None


# Their training-mode output carries auxiliary heads; the loop expects plain logits.
AUX_HEAD_MODELS = ("googlenet", "inception_v3")


def create_model(name, weights, num_classes, freeze_backbone=False, grad_checkpointing=False):
    """(model, head name)."""
    model, head = build_model(name, weights, num_classes)
    if freeze_backbone and head is None:
        raise UserError(f"--freeze-backbone keeps the head training, and --model {name} has no nn.Linear head: drop "
                        "the flag")
    if grad_checkpointing:
        from classification.grad_checkpointing import enable_grad_checkpointing  # only with the flag
        enable_grad_checkpointing(model)
    if freeze_backbone:
        from common.freeze import freeze_all_but
        freeze_all_but(model, [head])
    return model, head


def build_model(name, weights, num_classes):
    """`weights`: None, a torchvision weights name such as IMAGENET1K_V2, or a file."""
    if ":" in name:  # package.module:function
        from common.user_model import build_user_model
        model = build_user_model(name, num_classes)
        if weights:
            load_model_state(model, state_dict_from(load_checkpoint(weights), weights), weights)
        return model, find_head(model, required=False)  # None: --head-lr and --freeze-backbone have none to keep
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise UserError(f"unknown --model {name!r}: use a torchvision classifier such as resnet50, resnet18, "
                        "convnext_tiny, vit_b_16 (all: torchvision.models.list_models(module=torchvision.models)), "
                        "or your own as package.module:function")
    extra = {"aux_logits": False} if name in AUX_HEAD_MODELS else {}
    # init_weights=True keeps their current initialisation and silences a FutureWarning.
    scratch = {**extra, "init_weights": True} if extra else {}
    if weights and os.path.isfile(weights):
        model = torchvision.models.get_model(name, num_classes=num_classes, **scratch)
        head = find_head(model)
        state = state_dict_from(load_checkpoint(weights), weights)
        skipped = load_model_state(model, state, weights, skip_mismatched={f"{head}.weight", f"{head}.bias"})
        if skipped:
            print0(f"new {num_classes}-class head: {', '.join(skipped)} from {weights} not used")
        return model, head
    if weights:
        try:
            enum = torchvision.models.get_model_weights(name)[weights]
        except KeyError:
            options = ", ".join(w.name for w in torchvision.models.get_model_weights(name))
            raise UserError(f"--weights {weights!r} is neither a file nor a weights name of {name} "
                            f"({options})") from None
        model = torchvision.models.get_model(name, weights=enum, **extra)
        head = find_head(model)
        if len(enum.meta["categories"]) != num_classes:
            parent, _, attr = head.rpartition(".")
            setattr(model.get_submodule(parent), attr, nn.Linear(model.get_submodule(head).in_features, num_classes))
            print0(f"replaced the {len(enum.meta['categories'])}-class head of {weights} with a "
                   f"{num_classes}-class one")
        return model, head
    model = torchvision.models.get_model(name, num_classes=num_classes, **scratch)
    return model, find_head(model)
