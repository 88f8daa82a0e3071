"""How parameters are updated: parameter groups, optimizer, per-iteration LR schedule with warmup, EMA."""
import torch
from torch import nn
from torch.optim import lr_scheduler as sched
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
               nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)


def param_groups(model, lr, weight_decay, norm_weight_decay=None, head=None, head_lr=None):
    """Split parameters by (is normalisation layer, is in the `head` module) so each can get its own wd / lr."""
    groups = {}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_norm = norm_weight_decay is not None and isinstance(module, NORM_LAYERS)
            in_head = head_lr is not None and head is not None and (module_name == head or
                                                                   module_name.startswith(head + "."))
            group = groups.setdefault((is_norm, in_head), {
                "params": [], "lr": head_lr if in_head else lr,
                "weight_decay": norm_weight_decay if is_norm else weight_decay})
            group["params"].append(p)
    return list(groups.values())


def create_optimizer(name, groups, lr, momentum, weight_decay, device_type):
    # Fused kernels update all parameters in a few launches; they exist for SGD and AdamW on CUDA.
    fused = {"fused": True} if device_type == "cuda" else {}
    if name in ("sgd", "sgd_nesterov"):
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=name == "sgd_nesterov", **fused)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **fused)
    # RMSprop has no fused kernel: with float16 loss scaling, GradScaler reads its inf check back to the CPU
    # every step (a sync); bfloat16 needs no scaler and avoids it.
    if name == "rmsprop":  # the eps and alpha of TF-style RMSprop used by EfficientNet/MobileNet recipes
        return torch.optim.RMSprop(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, eps=0.0316, alpha=0.9)
    raise ValueError(f"unknown --opt {name!r}: use sgd, sgd_nesterov, adamw or rmsprop")


def create_lr_scheduler(optimizer, args, steps_per_epoch):
    """torch's schedulers stepped once per optimizer step, with epoch-based flags converted to steps."""
    warmup_steps = args.lr_warmup_epochs * steps_per_epoch
    main_steps = max(args.epochs * steps_per_epoch - warmup_steps, 1)
    if args.lr_scheduler == "steplr":
        main = sched.StepLR(optimizer, step_size=args.lr_step_size * steps_per_epoch, gamma=args.lr_gamma)
    elif args.lr_scheduler == "cosineannealinglr":
        main = sched.CosineAnnealingLR(optimizer, T_max=main_steps, eta_min=args.lr_min)
    elif args.lr_scheduler == "polylr":  # the segmentation schedule: lr * (1 - step / steps) ** power
        main = sched.PolynomialLR(optimizer, total_iters=main_steps, power=args.lr_power)
    elif args.lr_scheduler == "exponentiallr":
        main = sched.ExponentialLR(optimizer, gamma=args.lr_gamma ** (1 / steps_per_epoch))
    else:
        raise ValueError(f"unknown --lr-scheduler {args.lr_scheduler!r}")
    if warmup_steps == 0:
        return main
    if args.lr_warmup_method == "linear":
        warmup = sched.LinearLR(optimizer, start_factor=args.lr_warmup_decay, total_iters=warmup_steps)
    elif args.lr_warmup_method == "constant":
        warmup = sched.ConstantLR(optimizer, factor=args.lr_warmup_decay, total_iters=warmup_steps)
    else:
        raise ValueError(f"unknown --lr-warmup-method {args.lr_warmup_method!r}: use linear or constant")
    return sched.SequentialLR(optimizer, [warmup, main], milestones=[warmup_steps])


def create_ema(model, decay, ema_steps, images_per_step, epochs):
    """EMA of weights and buffers, updated every `ema_steps` optimizer steps.

    The decay is rescaled by images per step, ema_steps and epochs exactly as torchvision's reference
    does, so the --model-ema-decay of its published recipes means the same here.
    """
    alpha = min(1.0, (1 - decay) * images_per_step * ema_steps / epochs)
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(1 - alpha), use_buffers=True)
