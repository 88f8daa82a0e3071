"""--freeze-backbone: a model of which only the head trains, a linear probe of its other layers. Imported only with
the flag."""
from functools import partial

from torch import nn

from common.log import print0


def freeze_all_but(model, head):
    """Stop every parameter outside the modules named in `head` from training: requires_grad False, so that the
    optimizer's parameter groups leave them out and DDP neither computes nor waits for their gradients (no
    find_unused_parameters needed). Every module outside the head stays in eval mode through the model.train()
    that the training loop calls each epoch: batch norm keeps the statistics its weights were trained with, and
    dropout stays off, as in a fixed feature extractor."""
    def in_head(name):
        return any(f"{name}.".startswith(f"{module}.") for module in head)

    for name, parameter in model.named_parameters():
        parameter.requires_grad_(in_head(name))
    # Not the head's own enclosing modules (the root, "classifier" of "classifier.1"): they hold the head.
    frozen = [name for name, _ in model.named_modules()
              if name and not in_head(name) and not any(module.startswith(f"{name}.") for module in head)]
    model.train = partial(train_keeping_frozen, model, frozen)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"--freeze-backbone: {trained:,} of {sum(p.numel() for p in model.parameters()):,} parameters train, "
           f"those of {', '.join(head)}")


def train_keeping_frozen(model, frozen, mode=True):
    """model.train(mode) with the `frozen` modules kept in eval mode. They are looked up by name at each call:
    --sync-bn replaces the batch-norm modules after they were frozen (convert_sync_batchnorm)."""
    nn.Module.train(model, mode)
    for name in frozen:
        model.get_submodule(name).training = False
    return model
