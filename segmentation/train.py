"""Train a semantic segmenter (DeepLabV3+, UNet, torchvision's) on Cityscapes, PASCAL VOC, ADE20K or the synthetic set.

    python segmentation/train.py                                      # built-in synthetic scenes, CPU or GPU
    torchrun --nproc_per_node=4 segmentation/train.py --dataset cityscapes --data-path /data/cityscapes -b 2 --amp
"""
import argparse
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import torch
import torch.nn.functional as F
from torch import nn

from common.checkpoint import (
    load_checkpoint,
    load_model_state,
    check_finite_weights,
    read_training_checkpoint,
    restore_training,
    resume_path,
    save_training,
    state_dict_from,
    training_state,
    unwrap,
)
from common.distributed import init_distributed
from common.data import set_epoch
from common.engine import (PreemptionSignal, autocast, configure_torch, evaluate, exit_preempted, grad_scaler,
                           to_device, train_one_epoch)
from common.log import UserError, append_jsonl, positive_int, print0, run_cli, tensorboard_writer
from common.metrics import SegmentationMeter
from common.optim import create_lr_scheduler, create_optimizer, param_groups
from segmentation.data import MEAN, STD, dataset_info, load_train, load_val
from segmentation.datasets import DATASETS, IGNORE_INDEX
from segmentation.inference import add_eval_args, predictor_from_args
from segmentation.model import HEAD_PREFIXES, OWN_MODELS, TORCHVISION_MODELS, check_input_size, create_model

# Real data gets the Cityscapes DeepLabV3+ recipe: 512x1024 crops, a batch of 8 (-b 8 on one GPU, -b 2 on
# four), SGD 0.01, poly decay per iteration, 80 epochs. mmsegmentation's published 79.6-80.1 mIoU used weight
# decay 5e-4, 40k-80k iterations and an ImageNet backbone (the README has the flags). The synthetic set gets
# a small UNet that reaches a useful mIoU in minutes on a laptop CPU.
REAL_DATA_DEFAULTS = dict(model="deeplabv3plus_resnet50", batch_size=8, epochs=80, lr=0.01, lr_warmup_epochs=1,
                          workers=8, print_freq=50, unet_width=64)
SYNTHETIC_DEFAULTS = dict(model="unet", batch_size=16, epochs=4, lr=0.05, lr_warmup_epochs=1, workers=0,
                          print_freq=25, unet_width=16)
# Sizes by dataset, mmsegmentation's: the shorter side is rescaled around the base size, then cropped.
SIZE_DEFAULTS = {"cityscapes": dict(base_size=1024, crop_size=[512, 1024]),
                 "voc": dict(base_size=512, crop_size=[512, 512]), "ade20k": dict(base_size=512, crop_size=[512, 512])}
SCHEDULE_ARGS = ("epochs", "lr", "lr_scheduler", "lr_power", "lr_min", "lr_warmup_epochs", "lr_warmup_method",
                 "lr_warmup_decay", "batch_size", "accum_steps", "world_size")


def get_args_parser():
    def recipe(name):
        return f"(default: {REAL_DATA_DEFAULTS[name]}; {SYNTHETIC_DEFAULTS[name]} on the synthetic set)"

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--data-path", help="dataset root in its own layout (default: the built-in synthetic scenes)")
    add("--dataset", choices=sorted(DATASETS), help="layout of --data-path")
    add("--model", choices=OWN_MODELS + TORCHVISION_MODELS, metavar="MODEL", help=f"{', '.join(OWN_MODELS)} or "
        f"torchvision's {', '.join(TORCHVISION_MODELS)} {recipe('model')}")
    add("--output-stride", type=int, default=8, choices=[8, 16], help="DeepLabV3+: backbone output stride")
    add("--aux-loss", action="store_true", help="auxiliary FCN head on layer3, its loss weighted by --aux-weight")
    add("--aux-weight", type=float, default=0.4, help="weight of the auxiliary loss")
    add("--unet-width", type=positive_int, help=f"UNet: channels of the first level {recipe('unet_width')}")
    add("--weights-backbone", help="ImageNet backbone: torchvision weights name (IMAGENET1K_V2) or a classifier "
        ".pth of the same ResNet (e.g. from classification/train.py)")
    add("--weights", help="start from a segmentation checkpoint (.pth); classifier layers of another class "
        "count are left freshly initialised")
    add("--device", help="cuda or cpu (default: cuda when available)")
    add("-b", "--batch-size", type=positive_int, help=f"crops per process per step {recipe('batch_size')}")
    add("--epochs", type=positive_int, help=f"epochs to train {recipe('epochs')}")
    add("-j", "--workers", type=int, help=f"DataLoader worker processes per rank {recipe('workers')}")
    add("--opt", default="sgd", choices=["sgd", "sgd_nesterov", "adamw"], help="optimizer")
    add("--lr", type=float, help=f"peak learning rate for the whole run's batch {recipe('lr')}")
    add("--momentum", type=float, default=0.9, help="SGD momentum")
    add("--wd", "--weight-decay", type=float, default=1e-4, dest="weight_decay", help="weight decay")
    add("--norm-weight-decay", type=float, help="weight decay of normalisation layers (default: --wd)")
    add("--lr-scheduler", default="polylr", choices=["polylr", "cosineannealinglr"],
        help="schedule after warmup, stepped every optimizer step")
    add("--lr-power", type=float, default=0.9, help="polylr: lr * (1 - step / steps) ** power")
    add("--lr-min", type=float, default=0.0, help="cosineannealinglr: final learning rate")
    add("--lr-warmup-epochs", type=int, help=f"epochs of warmup {recipe('lr_warmup_epochs')}")
    add("--lr-warmup-method", default="linear", choices=["linear", "constant"], help="warmup shape")
    add("--lr-warmup-decay", type=float, default=0.01, help="warmup starts at this fraction of --lr")
    add("--clip-grad-norm", type=float, help="clip the gradient norm to this value (default: no clipping)")
    add("--crop-size", type=positive_int, nargs="+", metavar="PX", help="training crop H [W] "
        "(default: 512 1024 on Cityscapes, 512 on VOC and ADE20K)")
    add("--base-size", type=positive_int, help="shorter side before random rescaling, and of validation images "
        "(default: 1024 on Cityscapes, 512 on VOC and ADE20K)")
    add("--scale-range", type=float, nargs=2, default=[0.5, 2.0], metavar=("MIN", "MAX"),
        help="random rescale of the base size")
    add("--ignore-index", type=int, default=IGNORE_INDEX, help="a label left out of loss and metrics, besides "
        "255 (void in every dataset loader and the crop padding), e.g. 0 to leave out a background class")
    add("--data-backend", default="pil", choices=["pil", "gpu", "synthetic"],
        help="pil: decode and augment in DataLoader workers; gpu: workers decode, the device rescales, crops, "
        "flips and normalises; synthetic: random batches on the device, to time the model step alone")
    add_eval_args(p)
    add("--sync-bn", action=argparse.BooleanOptionalAction,
        help="batch-norm statistics over all GPUs (default: on when distributed on CUDA)")
    add("--amp", action="store_true", help="mixed precision (autocast); float16 adds loss scaling")
    add("--amp-dtype", choices=["float16", "bfloat16"], help="autocast dtype (implies --amp; default float16)")
    add("--accum-steps", type=positive_int, default=1, help="micro-batches per optimizer step")
    add("--channels-last", action="store_true", help="NHWC memory format (faster convolutions under AMP)")
    add("--compile", action="store_true", help="torch.compile the model")
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
    add("--test-only", action="store_true", help="only evaluate the checkpoint of --resume on val")
    add("--print-freq", type=positive_int, help=f"optimizer steps between progress lines {recipe('print_freq')}")
    add("--synthetic-train-size", type=positive_int, default=2_500, help="synthetic set: training images")
    add("--synthetic-val-size", type=positive_int, default=500, help="synthetic set: validation images")
    add("--synthetic-image-size", type=positive_int, default=64, help="synthetic set: image side in pixels")
    add("--synthetic-classes", type=int, default=6, choices=range(2, 12), metavar="{2..11}",
        help="synthetic set: classes, background included")
    return p


def finish_args(args):
    for name, value in (SYNTHETIC_DEFAULTS if args.data_path is None else REAL_DATA_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.data_path is None:
        size = args.synthetic_image_size
        args.base_size, args.crop_size = args.base_size or size, args.crop_size or [size]
    elif args.dataset is None:
        raise UserError(f"--data-path needs --dataset to say its layout: one of {', '.join(sorted(DATASETS))}")
    else:
        args.base_size = args.base_size or SIZE_DEFAULTS[args.dataset]["base_size"]
        args.crop_size = args.crop_size or SIZE_DEFAULTS[args.dataset]["crop_size"]
    args.crop_size = (args.crop_size * 2)[:2]  # one number means a square
    args.amp = args.amp or args.amp_dtype is not None
    args.amp_dtype = args.amp_dtype or "float16"
    if args.resume == "auto" and not args.output_dir:
        raise UserError("--resume auto looks for <output-dir>/checkpoint.pth: give --output-dir too")
    if args.test_only and not args.resume:
        raise UserError("--test-only evaluates a trained model: give --resume PATH")
    return args


class SegmentationLoss(nn.Module):
    """Cross-entropy over labelled pixels, plus the auxiliary head's when the model has one."""

    def __init__(self, ignore_index, aux_weight):
        super().__init__()
        self.ignore_index, self.aux_weight = ignore_index, aux_weight

    def forward(self, outputs, target):
        if self.ignore_index != IGNORE_INDEX:  # a label the user leaves out joins the void pixels
            target = target.masked_fill(target == self.ignore_index, IGNORE_INDEX)
        # The mean over labelled pixels, but 0 instead of 0/0 = NaN for a crop that has none (all padding).
        labelled = (target != IGNORE_INDEX).sum().clamp(min=1)
        loss = 0
        for name, weight in (("out", 1.0), ("aux", self.aux_weight)):
            if name in outputs:
                ce = F.cross_entropy(outputs[name], target, ignore_index=IGNORE_INDEX, reduction="sum")
                loss = loss + weight * ce / labelled
        return loss


def validate(model, val_loader, class_names, device, args, name):
    meter = SegmentationMeter(len(class_names), device, args.ignore_index)
    summary = evaluate(predictor_from_args(model, args), val_loader, meter, device, args).summary()
    print0(f"{name}: mIoU {100 * summary['miou']:.2f}  pixel acc {100 * summary['pixel_acc']:.2f}  "
           f"mean acc {100 * summary['mean_acc']:.2f}  on {summary['num_images']} images")
    return summary


@torch.inference_mode()
def log_examples(writer, model, val_loader, palette, device, args, epoch, count=4):
    """Input | label | prediction of the first validation images, coloured with the dataset's palette."""
    colours = torch.tensor(palette + [(255, 255, 255)] * (256 - len(palette)), dtype=torch.uint8, device=device)
    predictor, mean, std = predictor_from_args(unwrap(model), args).eval(), torch.tensor(MEAN), torch.tensor(STD)
    examples = [(image, target) for images, targets in itertools.islice(val_loader, count)
                for image, target in zip(images, targets)][:count]
    for i, (image, target) in enumerate(examples):
        image, target = to_device(image[None], target[None], device, args)
        with autocast(device, args):
            scores = predictor(image)
        predicted = F.interpolate(scores.float(), target.shape[-2:], mode="bilinear").argmax(1)
        picture = F.interpolate(image.float().cpu() * std.view(3, 1, 1) + mean.view(3, 1, 1), target.shape[-2:])
        picture = (picture[0].clamp(0, 1) * 255).to(torch.uint8)
        row = [picture, colours[target[0]].permute(2, 0, 1).cpu(), colours[predicted[0]].permute(2, 0, 1).cpu()]
        writer.add_image(f"val_examples/{i}", torch.cat(row, dim=2), epoch)


def build_model(args, num_classes):
    model = create_model(args.model, num_classes, args.output_stride, args.aux_loss, args.weights_backbone,
                         args.unet_width)
    check_input_size(model, *args.crop_size, "--crop-size")
    if args.weights:
        own = model.state_dict()
        state = state_dict_from(load_checkpoint(args.weights))
        heads = [k for k in own if k.startswith(HEAD_PREFIXES)]
        skipped = load_model_state(model, state, args.weights, skip_mismatched=heads)
        if skipped:
            print0(f"--weights {args.weights}: {len(skipped)} classifier tensors of another class count start afresh")
    return model


def main(args):
    env, device = init_distributed(args.device)
    args.world_size = env.world_size
    print0(f"{' '.join(sys.argv)}\nworld size {env.world_size}, device {device}, torch {torch.__version__}")
    configure_torch(args, device)

    class_names, palette = dataset_info(args)
    val_loader = load_val(args, env, device)  # before the long work: val/ problems show now
    model = build_model(args, len(class_names))
    if args.sync_bn is None:  # per-GPU batches of 1-2 crops give poor batch-norm statistics: sync by default
        args.sync_bn = env.distributed and device.type == "cuda"
    if args.sync_bn and env.distributed:
        if device.type != "cuda":
            raise UserError("--sync-bn needs CUDA devices: drop it on CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.data_path is not None and args.model != "unet" and not (args.weights_backbone or args.weights):
        print0("note: the backbone starts from random weights; published results start from ImageNet ones: "
               "add --weights-backbone IMAGENET1K_V1")
    model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    if args.test_only:
        path = resume_path(args)
        if not path:
            raise UserError(f"--resume auto found no checkpoint in {args.output_dir}: nothing to evaluate")
        load_model_state(model, state_dict_from(read_training_checkpoint(path, args.model)), path)
        validate(model, val_loader, class_names, device, args, "Test")
        return

    if args.batch_size == 1 and "deeplab" in args.model and not (args.sync_bn and env.distributed):
        raise UserError("-b 1: DeepLab's image-pooling branch normalises a 1x1 map over the batch, which needs 2 "
                        "or more crops per process (or --sync-bn across GPUs): use -b 2 or more, and --accum-steps "
                        "to keep the effective batch")
    train_loader = load_train(args, env, device)
    steps_per_epoch = len(train_loader) // args.accum_steps
    if steps_per_epoch == 0:
        raise UserError(f"-b {args.batch_size} x --accum-steps {args.accum_steps} is more than the "
                        f"{len(train_loader.sampler)} training images per process: lower -b or --accum-steps")
    print0(f"{len(train_loader.dataset)} training and {len(val_loader.dataset)} validation images, "
           f"{len(class_names)} classes; {args.model}; crops {args.crop_size[0]}x{args.crop_size[1]}, effective "
           f"batch {args.batch_size} x {args.accum_steps} x {env.world_size} processes; sync-bn {args.sync_bn}")
    groups = param_groups(model, args.lr, args.weight_decay, args.norm_weight_decay)
    optimizer = create_optimizer(args.opt, groups, args.lr, args.momentum, args.weight_decay, device.type)
    lr_scheduler = create_lr_scheduler(optimizer, args, steps_per_epoch)
    scaler = grad_scaler(device, args, optimizer)

    best_miou, start_step, path = 0.0, 0, resume_path(args)
    if path:
        checkpoint = read_training_checkpoint(path, args.model)
        args.start_epoch, start_step = restore_training(checkpoint, path, model, optimizer, lr_scheduler, scaler,
                                                        args, SCHEDULE_ARGS)
        best_miou = checkpoint["best_miou"]
        print0(f"resumed from {path}: epoch {args.start_epoch} step {start_step}, best mIoU {100 * best_miou:.2f}")
    if args.output_dir and env.is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)

    if env.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if args.compile:
        model.compile()  # in place: the state dict keeps its keys
    criterion = SegmentationLoss(args.ignore_index, args.aux_weight)
    writer = tensorboard_writer(args.output_dir)

    def save(epoch, step=None, is_best=False):
        if args.output_dir:
            check_finite_weights(model, epoch, args.output_dir)
        if args.output_dir and env.is_main:
            save_training(training_state(model, optimizer, lr_scheduler, scaler, epoch, args, step, best_miou=best_miou,
                                         class_names=class_names, palette=palette),
                          args.output_dir, is_best, args.keep_checkpoints)

    preemption = PreemptionSignal(device)
    for epoch in range(args.start_epoch, args.epochs):
        # As in classification/train.py: the data order, each sample's augmentation and each step's
        # randomness follow from the seed and the position in the run, so a resumed run replays exactly.
        torch.manual_seed((args.seed << 32) + (epoch << 16) + env.rank)
        skip = start_step if epoch == args.start_epoch else 0
        set_epoch(train_loader, epoch, skip * args.accum_steps)
        stats = train_one_epoch(model, criterion, optimizer, lr_scheduler, scaler, train_loader, device, epoch, args,
                                writer=writer, start_step=skip, preemption=preemption,
                                save_checkpoint=lambda step: save(epoch, step))
        if stats.pop("stopped"):  # by SIGTERM/SIGUSR1, its checkpoint saved: the same command resumes it
            exit_preempted()
        val = validate(model, val_loader, class_names, device, args, f"Epoch {epoch} val")
        record = {"epoch": epoch, **stats, "val_miou": val["miou"], "val_pixel_acc": val["pixel_acc"],
                  "val_mean_acc": val["mean_acc"]}
        is_best, best_miou = val["miou"] > best_miou, max(best_miou, val["miou"])
        save(epoch, is_best=is_best)
        if args.output_dir and env.is_main:
            append_jsonl(os.path.join(args.output_dir, "log.jsonl"), record)
        if writer is not None:
            for key in ("val_miou", "val_pixel_acc", "val_mean_acc", "train_loss", "img_per_s"):
                writer.add_scalar(f"epoch/{key}", record[key], epoch)
            for name, iou in zip(class_names, val["per_class_iou"]):
                if iou is not None:
                    writer.add_scalar(f"val_iou/{name}", iou, epoch)
            log_examples(writer, model, val_loader, palette, device, args, epoch)
    print0(f"best mIoU {100 * best_miou:.2f}")
    if writer is not None:
        writer.close()


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    run_cli(lambda a: main(finish_args(a)), args)
