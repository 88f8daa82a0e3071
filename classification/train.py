"""Train an image classifier (ResNet-50 or any torchvision model) on an ImageFolder tree or the synthetic set.

    python classification/train.py                                    # built-in synthetic set, CPU or GPU
    torchrun --nproc_per_node=8 classification/train.py --data-path /data/imagenet --model resnet50 --amp
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import torch
from torch import nn
from torchvision.transforms.v2.functional import pil_to_tensor

from classification.confusion_image import confusion_matrix_image
from classification.data import dataset_classes, load_train, load_val
from classification.model import create_model, enable_grad_checkpointing
from common.checkpoint import (
    load_model_state,
    check_finite_weights,
    read_training_checkpoint,
    restore_training,
    resume_path,
    save_training,
    state_dict_from,
    training_state,
)
from common.distributed import init_distributed
from common.data import set_epoch
from common.engine import (PreemptionSignal, configure_torch, evaluate, exit_preempted, grad_scaler,
                           train_one_epoch)
from common.log import UserError, append_jsonl, positive_int, print0, run_cli, tensorboard_writer
from common.metrics import ClassificationMeter
from common.optim import create_ema, create_lr_scheduler, create_optimizer, param_groups

# Defaults that depend on the data. Real data gets torchvision's ResNet-50 V1 recipe (76.1% top-1 published,
# with 8 GPUs x 32 images); the synthetic set gets a small recipe that finishes on a laptop CPU.
REAL_DATA_DEFAULTS = dict(model="resnet50", batch_size=32, epochs=90, lr=0.1, lr_scheduler="steplr",
                          lr_warmup_epochs=0, workers=8, train_crop_size=224, print_freq=100)
SYNTHETIC_DEFAULTS = dict(model="resnet18", batch_size=128, epochs=4, lr=0.05, lr_scheduler="cosineannealinglr",
                          lr_warmup_epochs=1, workers=0, train_crop_size=32, print_freq=50)


def get_args_parser():
    def recipe(name):  # the help text of a default that depends on the data
        return f"(default: {REAL_DATA_DEFAULTS[name]}; {SYNTHETIC_DEFAULTS[name]} on the synthetic set)"

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--data-path", help="ImageFolder root with train/ and val/ (default: the built-in synthetic set)")
    add("--model", help=f"torchvision classifier name {recipe('model')}")
    add("--weights", help="start from weights: a torchvision enum name (IMAGENET1K_V2) or a local .pth state dict")
    add("--device", help="cuda or cpu (default: cuda when available)")
    add("-b", "--batch-size", type=positive_int, help=f"images per process per step {recipe('batch_size')}")
    add("--epochs", type=positive_int, help=f"epochs to train {recipe('epochs')}")
    add("-j", "--workers", type=int, help=f"DataLoader worker processes per rank {recipe('workers')}")
    add("--opt", default="sgd", choices=["sgd", "sgd_nesterov", "adamw", "rmsprop"], help="optimizer")
    add("--lr", type=float, help=f"peak learning rate for the whole run's batch {recipe('lr')}")
    add("--head-lr", type=float, help="learning rate of the classifier head (default: --lr); for fine-tuning")
    add("--momentum", type=float, default=0.9, help="SGD/RMSprop momentum")
    add("--wd", "--weight-decay", type=float, default=1e-4, dest="weight_decay", help="weight decay")
    add("--norm-weight-decay", type=float, help="weight decay of normalisation layers (default: --wd)")
    add("--label-smoothing", type=float, default=0.0, help="label smoothing of the cross-entropy loss")
    add("--mixup-alpha", type=float, default=0.0, help="MixUp alpha (0: off)")
    add("--cutmix-alpha", type=float, default=0.0, help="CutMix alpha (0: off); with MixUp, one of the two per batch")
    add("--auto-augment", help="ra, ta_wide, augmix, or an AutoAugment policy: imagenet, cifar10, svhn")
    add("--random-erase", type=float, default=0.0, help="RandomErasing probability")
    add("--lr-scheduler", choices=["steplr", "cosineannealinglr", "exponentiallr"],
        help=f"schedule after warmup, stepped every optimizer step {recipe('lr_scheduler')}")
    add("--lr-step-size", type=int, default=30, help="StepLR: epochs between decays")
    add("--lr-gamma", type=float, default=0.1, help="StepLR/ExponentialLR: decay factor per step size / epoch")
    add("--lr-min", type=float, default=0.0, help="CosineAnnealingLR: final learning rate")
    add("--lr-warmup-epochs", type=int, help=f"epochs of warmup {recipe('lr_warmup_epochs')}")
    add("--lr-warmup-method", default="linear", choices=["linear", "constant"], help="warmup shape")
    add("--lr-warmup-decay", type=float, default=0.01, help="warmup starts at this fraction of --lr")
    add("--clip-grad-norm", type=float, help="clip the gradient norm to this value (default: no clipping)")
    add("--model-ema", action="store_true", help="keep an exponential moving average of weights and evaluate it")
    add("--model-ema-steps", type=positive_int, default=32, help="optimizer steps between EMA updates")
    add("--model-ema-decay", type=float, default=0.99998, help="EMA decay, scaled as in torchvision's reference")
    add("--train-crop-size", type=positive_int, help=f"RandomResizedCrop size {recipe('train_crop_size')}")
    add("--val-resize-size", type=positive_int, default=256, help="validation resize of the shorter side")
    add("--val-crop-size", type=positive_int, default=224, help="validation centre crop")
    add("--interpolation", default="bilinear", choices=["nearest", "bilinear", "bicubic"], help="resize filter")
    add("--data-backend", default="pil", choices=["pil", "gpu", "synthetic"],
        help="pil: decode and augment in DataLoader workers; gpu: workers read bytes, the device decodes (nvJPEG) "
        "and augments whole batches; synthetic: random batches on the device, to time the model step alone")
    add("--sync-bn", action="store_true", help="synchronise batch-norm statistics across GPUs")
    add("--amp", action="store_true", help="mixed precision (autocast); float16 adds loss scaling")
    add("--amp-dtype", choices=["float16", "bfloat16"], help="autocast dtype (implies --amp; default float16)")
    add("--accum-steps", type=positive_int, default=1, help="micro-batches per optimizer step")
    add("--channels-last", action="store_true", help="NHWC memory format (faster convolutions under AMP)")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--grad-checkpointing", action="store_true", help="recompute stage activations in backward to save memory")
    add("--seed", type=int, default=0, help="seed of weights init, data order and augmentation")
    add("--use-deterministic-algorithms", action="store_true", help="deterministic kernels only (slower)")
    add("--output-dir", help="where checkpoints, logs and TensorBoard files go (default: nothing is written)")
    add("--resume", help="checkpoint to continue from, or 'auto' for <output-dir>/checkpoint.pth if it exists")
    add("--start-epoch", type=int, default=0, help="first epoch (set by --resume)")
    add("--checkpoint-interval", type=int, default=0, metavar="STEPS",
        help="also save checkpoint.pth every STEPS optimizer steps inside an epoch (default: 0, at epoch ends only)")
    add("--keep-checkpoints", type=int, default=0, metavar="N",
        help="keep checkpoint_epoch<E>.pth of the last N epochs besides checkpoint.pth and best.pth")
    add("--max-nonfinite-steps", type=positive_int, default=3, metavar="N",
        help="stop when the loss is NaN or Inf in N consecutive steps (those steps are skipped)")
    add("--test-only", action="store_true", help="only evaluate --resume (and its EMA) or --weights on val")
    add("--print-freq", type=positive_int, help=f"optimizer steps between progress lines {recipe('print_freq')}")
    add("--synthetic-train-size", type=positive_int, default=16_000, help="synthetic set: training images")
    add("--synthetic-val-size", type=positive_int, default=2_000, help="synthetic set: validation images")
    add("--synthetic-classes", type=int, default=10, choices=range(2, 11), metavar="{2..10}",
        help="synthetic set: number of classes")
    return p


# A checkpoint's LR schedule was laid out, step by step, for these values; resuming with others would
# silently follow the old curve, so they must match.
SCHEDULE_ARGS = ("epochs", "lr", "head_lr", "lr_scheduler", "lr_step_size", "lr_gamma", "lr_min", "lr_warmup_epochs",
                 "lr_warmup_method", "lr_warmup_decay", "batch_size", "accum_steps", "world_size")


def finish_args(args):
    for name, value in (SYNTHETIC_DEFAULTS if args.data_path is None else REAL_DATA_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.amp = args.amp or args.amp_dtype is not None
    args.amp_dtype = args.amp_dtype or "float16"
    if args.resume == "auto" and not args.output_dir:
        raise UserError("--resume auto looks for <output-dir>/checkpoint.pth: give --output-dir too")
    if args.test_only and not (args.resume or args.weights):
        raise UserError("--test-only evaluates a trained model: give --resume PATH or --weights NAME")
    if args.compile and args.grad_checkpointing:
        raise UserError("--grad-checkpointing and --compile together fail in the compiled backward on CUDA "
                        "(torch 2.11): use one of them")
    if args.data_path is None and (args.auto_augment or args.random_erase):
        print0("note: the synthetic set has its own augmentation; --auto-augment and --random-erase apply to "
               "--data-path only")
    return args


def restore(checkpoint, path, model, optimizer, lr_scheduler, scaler, model_ema, args):
    """Continue a run: returns (start epoch, steps already done in it, best top-1)."""
    start = restore_training(checkpoint, path, model, optimizer, lr_scheduler, scaler, args, SCHEDULE_ARGS)
    if model_ema is not None and checkpoint.get("model_ema") is not None:
        load_model_state(model_ema.module, checkpoint["model_ema"], path)
        model_ema.n_averaged.copy_(checkpoint["model_ema_n_averaged"])
    return *start, checkpoint["best_acc1"]


def validate(model, val_loader, class_names, device, args, name):
    meter = evaluate(model, val_loader, ClassificationMeter(len(class_names), device), device, args)
    summary = meter.summary()
    print0(f"{name}: top-1 {summary['acc1']:.3f}  top-5 {summary['acc5']:.3f}  on {summary['num_samples']} images")
    return summary, meter


def test_only(model, val_loader, class_names, device, args):
    """Evaluate the model of --resume (and its EMA weights, if it has them) or of --weights."""
    path = resume_path(args)
    if args.resume and not path:
        raise UserError(f"--resume auto found no checkpoint in {args.output_dir}: nothing to evaluate")
    checkpoint = read_training_checkpoint(path, args.model) if path else {}
    if checkpoint:
        load_model_state(model, state_dict_from(checkpoint), path)
    validate(model, val_loader, class_names, device, args, "Test")
    if checkpoint.get("model_ema") is not None:
        load_model_state(model, checkpoint["model_ema"], path)
        validate(model, val_loader, class_names, device, args, "Test EMA")


def main(args):
    env, device = init_distributed(args.device)
    args.world_size = env.world_size
    print0(f"{' '.join(sys.argv)}\nworld size {env.world_size}, device {device}, torch {torch.__version__}")
    configure_torch(args, device)

    class_names = dataset_classes(args)
    val_loader = load_val(args, env, device, class_names)  # before the long work: val/ problems show now
    model, head = create_model(args.model, args.weights, len(class_names))
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    if args.test_only:
        test_only(model, val_loader, class_names, device, args)
        return

    train_loader = load_train(args, env, device, class_names)
    steps_per_epoch = len(train_loader) // args.accum_steps
    if steps_per_epoch == 0:
        raise UserError(f"-b {args.batch_size} x --accum-steps {args.accum_steps} is more than the "
                        f"{len(train_loader.sampler)} training images per process: lower -b or --accum-steps")
    images_per_step = args.batch_size * args.accum_steps * env.world_size
    print0(f"{len(train_loader.dataset)} training and {len(val_loader.dataset)} validation images, "
           f"{len(class_names)} classes; effective batch {args.batch_size} x {args.accum_steps} accumulation "
           f"x {env.world_size} processes = {images_per_step}")
    if args.sync_bn and env.distributed:
        if device.type != "cuda":
            raise UserError("--sync-bn needs CUDA devices: drop it on CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model_ema = create_ema(model, args.model_ema_decay, args.model_ema_steps, images_per_step,
                           args.epochs) if args.model_ema else None
    if args.grad_checkpointing:  # after the EMA copy, which must not inherit the patched forwards
        enable_grad_checkpointing(model)
    groups = param_groups(model, args.lr, args.weight_decay, args.norm_weight_decay, head, args.head_lr)
    optimizer = create_optimizer(args.opt, groups, args.lr, args.momentum, args.weight_decay, device.type)
    lr_scheduler = create_lr_scheduler(optimizer, args, steps_per_epoch)
    scaler = grad_scaler(device, args, optimizer)

    best_acc1, start_step, path = 0.0, 0, resume_path(args)
    if path:
        checkpoint = read_training_checkpoint(path, args.model)
        args.start_epoch, start_step, best_acc1 = restore(checkpoint, path, model, optimizer, lr_scheduler, scaler,
                                                          model_ema, args)
        print0(f"resumed from {path}: epoch {args.start_epoch} step {start_step}, best top-1 {best_acc1:.2f}")
    if args.output_dir and env.is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)

    if env.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if args.compile:
        model.compile()  # in place: the state dict keeps its keys
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    writer = tensorboard_writer(args.output_dir)

    def save(epoch, step=None, is_best=False):
        if args.output_dir:
            check_finite_weights(model, epoch, args.output_dir)
        if args.output_dir and env.is_main:
            save_training(training_state(
                model, optimizer, lr_scheduler, scaler, epoch, args, step, best_acc1=best_acc1, class_names=class_names,
                model_ema=model_ema.module.state_dict() if model_ema is not None else None,
                model_ema_n_averaged=model_ema.n_averaged if model_ema is not None else None),
                args.output_dir, is_best, args.keep_checkpoints)

    preemption = PreemptionSignal(device)
    for epoch in range(args.start_epoch, args.epochs):
        # The data order follows from (seed, epoch), each sample's augmentation from (seed, epoch, index),
        # each step's other randomness from (seed, epoch, step, rank): a resumed run replays exactly. This
        # seed is for the rest (DataLoader worker seeds, MixUp/CutMix in workers).
        torch.manual_seed((args.seed << 32) + (epoch << 16) + env.rank)
        skip = start_step if epoch == args.start_epoch else 0
        set_epoch(train_loader, epoch, skip * args.accum_steps)
        stats = train_one_epoch(model, criterion, optimizer, lr_scheduler, scaler, train_loader, device, epoch,
                                args, model_ema, writer, start_step=skip, preemption=preemption,
                                save_checkpoint=lambda step: save(epoch, step))
        if stats.pop("stopped"):  # by SIGTERM/SIGUSR1, its checkpoint saved: the same command resumes it
            exit_preempted()
        val, val_meter = validate(model, val_loader, class_names, device, args, f"Epoch {epoch} val")
        record = {"epoch": epoch, **stats, "val_acc1": val["acc1"], "val_acc5": val["acc5"]}
        if model_ema is not None:
            ema, _ = validate(model_ema, val_loader, class_names, device, args, f"Epoch {epoch} EMA val")
            record.update(val_ema_acc1=ema["acc1"], val_ema_acc5=ema["acc5"])
        score = record.get("val_ema_acc1", val["acc1"])  # with EMA, its weights are the ones to keep
        is_best, best_acc1 = score > best_acc1, max(best_acc1, score)
        save(epoch, is_best=is_best)
        if args.output_dir and env.is_main:
            append_jsonl(os.path.join(args.output_dir, "log.jsonl"), record)
        if writer is not None:
            for key in ("val_acc1", "val_acc5", "val_ema_acc1", "train_loss", "img_per_s"):
                if key in record:
                    writer.add_scalar(f"epoch/{key}", record[key], epoch)
    print0(f"best top-1 {best_acc1:.3f}{' (EMA)' if model_ema is not None else ''}")

    if writer is not None and args.start_epoch < args.epochs:  # what the last epoch confuses with what
        picture = confusion_matrix_image(val_meter.confusion.matrix.cpu(), class_names)
        writer.add_image("val/confusion_matrix", pil_to_tensor(picture), args.epochs - 1)
        writer.close()


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    run_cli(lambda a: main(finish_args(a)), args)
