"""How parameters are updated: parameter groups, optimizer, per-iteration LR schedule with warmup."""
import torch
from torch import nn
from torch.optim import lr_scheduler as sched

from common.log import UserError

NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
               nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)


def param_groups(model, lr, weight_decay, norm_weight_decay=None, head=None, head_lr=None):
    """Grouped by (normalisation layer?, in `head`?), each with its weight decay and lr; frozen ones left out."""
    if head_lr is not None and not head:
        raise UserError("--head-lr is the learning rate of the model's head, and this model has no nn.Linear head: "
                        "drop the flag")
    heads = tuple(f"{name}." for name in ([head] if isinstance(head, str) else head or ()))
    groups = {}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_norm = norm_weight_decay is not None and isinstance(module, NORM_LAYERS)
            in_head = head_lr is not None and f"{module_name}.".startswith(heads)
            group = groups.setdefault((is_norm, in_head), {
                "params": [], "lr": head_lr if in_head else lr,
                "weight_decay": norm_weight_decay if is_norm else weight_decay})
            group["params"].append(p)
    return list(groups.values())


def create_optimizer(name, model, lr, momentum, weight_decay, device_type, norm_weight_decay=None, head=None,
                     head_lr=None):
    groups = model if isinstance(model, list) else param_groups(model, lr, weight_decay, norm_weight_decay, head,
                                                                head_lr)
    # AdamW's fused kernel honours a step the GradScaler skips; SGD's leaves the momentum of a skipped first step
    # unfilled or advances it with the non-finite gradient, and every later step is NaN. Float16 runs skip their
    # first steps routinely (the scale starts at 65,536 and overflows).
    if name in ("sgd", "sgd_nesterov"):
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=name == "sgd_nesterov")
    if name == "adamw":
        fused = {"fused": True} if device_type in ("cuda", "cpu") else {}
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **fused)
    # No fused RMSprop either: under float16 GradScaler reads its inf check back every step (a sync); bfloat16 not.
    if name == "rmsprop":  # the eps and alpha of TF-style RMSprop used by EfficientNet/MobileNet recipes
        return torch.optim.RMSprop(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, eps=0.0316, alpha=0.9)
    raise ValueError(f"unknown --opt {name!r}: use sgd, sgd_nesterov, adamw or rmsprop")


def create_optimizer_and_scheduler(args, model, head, device_type, steps_per_epoch, total_steps):
    """The optimizer of --opt, and the schedule of the --lr-* flags laid out for `total_steps` optimizer steps (a
    run of --iters need not fill whole epochs)."""
    optimizer = create_optimizer(args.opt, model, args.lr, args.momentum, args.weight_decay, device_type,
                                 args.norm_weight_decay, head, args.head_lr)
    # Each script has the flags of the schedules it offers: StepLR's and ExponentialLR's, or PolynomialLR's.
    shape = {name: getattr(args, flag) for name, flag in (("step_size", "lr_step_size"), ("gamma", "lr_gamma"),
                                                          ("power", "lr_power")) if hasattr(args, flag)}
    lr_scheduler = create_lr_scheduler(optimizer, args.lr_scheduler, total_steps, steps_per_epoch,
                                       warmup_epochs=args.lr_warmup_epochs, warmup_method=args.lr_warmup_method,
                                       warmup_decay=args.lr_warmup_decay, lr_min=args.lr_min, **shape)
    return optimizer, lr_scheduler


def create_lr_scheduler(optimizer, name, total_steps, steps_per_epoch, *, warmup_epochs=0, warmup_method="linear",
                        warmup_decay=0.01, step_size=30, gamma=0.1, lr_min=0.0, power=0.9):
    """torch's schedulers stepped once per optimizer step, with epoch-based values converted to steps."""
    warmup_steps = warmup_epochs * steps_per_epoch
    main_steps = max(total_steps - warmup_steps, 1)
    if name == "steplr":
        main = sched.StepLR(optimizer, step_size=step_size * steps_per_epoch, gamma=gamma)
    elif name == "cosineannealinglr":
        main = sched.CosineAnnealingLR(optimizer, T_max=main_steps, eta_min=lr_min)
    elif name == "polylr":  # the segmentation schedule: lr * (1 - step / steps) ** power
        main = sched.PolynomialLR(optimizer, total_iters=main_steps, power=power)
    elif name == "exponentiallr":
        main = sched.ExponentialLR(optimizer, gamma=gamma ** (1 / steps_per_epoch))
    else:
        raise ValueError(f"unknown --lr-scheduler {name!r}")
    if warmup_steps == 0:
        return main
    if warmup_method == "linear":
        warmup = sched.LinearLR(optimizer, start_factor=warmup_decay, total_iters=warmup_steps)
    elif warmup_method == "constant":
        warmup = sched.ConstantLR(optimizer, factor=warmup_decay, total_iters=warmup_steps)
    else:
        raise ValueError(f"unknown --lr-warmup-method {warmup_method!r}: use linear or constant")
    return sched.SequentialLR(optimizer, [warmup, main], milestones=[warmup_steps])
