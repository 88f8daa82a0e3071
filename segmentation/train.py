"""Train a semantic segmenter (DeepLabV3+, UNet, torchvision's) on Cityscapes, PASCAL VOC, ADE20K or the synthetic set.

    python segmentation/train.py                                      # built-in synthetic scenes, CPU or GPU
    torchrun --nproc_per_node=4 segmentation/train.py --dataset cityscapes --data-path /data/cityscapes -b 2 --amp
"""
import argparse
import itertools
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import torch
import torch.nn.functional as F
from torch import nn

from common.checkpoint import (Checkpointer, load_model_state, read_training_checkpoint, resume_path, state_dict_from,
                               trained_settings, unwrap)
from common.data import BadSamples, BatchLayout, default_workers
from common.distributed import check_sync_bn, data_parallel, init_distributed, sync_batch_norm
from common.engine import RunSteps, configure_torch, evaluate, to_device, train_one_epoch
from common.flags import (add_bad_sample_flag, add_checkpoint_flags, add_optimisation_flags, add_precision_flags,
                          non_negative_float, non_negative_int, positive_float, positive_int)
from common.data import MEAN, STD
from common.log import (UserError, count_parameters, log_epoch, print0, print_run_end, print_run_start, run_cli,
                        start_output_dir, tensorboard_writer)
from common.metrics import SegmentationMeter
from common.optim import create_lr_scheduler, create_optimizer, param_groups
from common.engine import autocast_context, grad_scaler, precision_from_flags
from common.log import ProgressLog
from common.engine import NonFiniteGuard, PreemptionSignal, StallWatchdog, stop_at_once_until_training
from segmentation.data import dataset_info, load_train, load_val
from segmentation.datasets import DATASETS, IGNORE_INDEX
from segmentation.inference import add_eval_args, predictor_from_args
from segmentation.model import (OWN_MODELS, TORCHVISION_MODELS, check_input_size, create_model,
                                enable_grad_checkpointing, load_weights)

# Real data gets the Cityscapes DeepLabV3+ recipe: 512x1024 crops, a batch of 8 (-b 8 on one GPU, -b 2 on
# four), SGD 0.01, poly decay per iteration, 80 epochs. mmsegmentation's published 79.6-80.1 mIoU used weight
# decay 5e-4, 40k-80k iterations and an ImageNet backbone (the README has the flags). The synthetic set gets
# a small UNet that reaches a useful mIoU in a minute or two on a laptop CPU: width 12 on 48 px scenes takes a
# quarter of the step time of width 16 on 64 px without AVX-512, and still reaches 77-81% in 4 epochs (2026-12-01).
REAL_DATA_DEFAULTS = dict(model="deeplabv3plus_resnet50", batch_size=8, epochs=80, lr=0.01, lr_warmup_epochs=1,
                          workers=default_workers(8), print_freq=50, unet_width=64)
SYNTHETIC_DEFAULTS = dict(model="unet", batch_size=16, epochs=4, lr=0.1, lr_warmup_epochs=1, workers=0,
                          print_freq=25, unet_width=12)
# Defaults of the flags that --test-only --resume may take from the checkpoint instead (None: not given).
DEFAULTS = dict(output_stride=8, aux_loss=False, synthetic_val_size=500, synthetic_image_size=48, synthetic_classes=6)
# Sizes by dataset, mmsegmentation's: the shorter side is rescaled around the base size, then cropped.
SIZE_DEFAULTS = {"cityscapes": dict(base_size=1024, crop_size=[512, 1024]),
                 "voc": dict(base_size=512, crop_size=[512, 512]), "ade20k": dict(base_size=512, crop_size=[512, 512])}
# As in classification/train.py: these must match on resume, and the global batch as a product.
SCHEDULE_ARGS = ("opt", "epochs", "iters", "lr", "lr_scheduler", "lr_power", "lr_min", "lr_warmup_epochs",
                 "lr_warmup_method", "lr_warmup_decay", "voc_aug", "seed")


def get_args_parser():
    def recipe(name):
        return f"(default: {REAL_DATA_DEFAULTS[name]}; {SYNTHETIC_DEFAULTS[name]} on the synthetic set)"

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = p.add_argument_group("data")
    add = group.add_argument
    add("--data-path", help="dataset root in its own layout (default: the built-in synthetic scenes)")
    add("--dataset", choices=sorted(DATASETS), help="layout of --data-path (required with it)")
    # None, not False, when absent: checkpoints from before this flag record none, and resume compares them.
    add("--voc-aug", action="store_true", default=None, help="VOC: train on the SBD augmented set "
        "(SegmentationClassAug/, ImageSets/Segmentation/train_aug.txt; 10,582 images), validate on VOC's val "
        "(default: off, VOC's 1,464 train images)")
    add("-b", "--batch-size", type=positive_int, help=f"crops per process per step {recipe('batch_size')}")
    add("-j", "--workers", type=non_negative_int, help=f"DataLoader worker processes per rank {recipe('workers')}")
    add("--crop-size", type=positive_int, nargs="+", metavar="PX", help="training crop H [W] "
        "(default: 512 1024 on Cityscapes, 512 on VOC and ADE20K)")
    add("--base-size", type=positive_int, help="shorter side before random rescaling, and of validation images "
        "(default: 1024 on Cityscapes, 512 on VOC and ADE20K)")
    add("--scale-range", type=positive_float, nargs=2, default=[0.5, 2.0], metavar=("MIN", "MAX"),
        help="random rescale of the base size (default: 0.5 2.0)")
    add("--ignore-index", type=int, default=IGNORE_INDEX, help="a label left out of loss and metrics, besides "
        "255 (void in every dataset loader and the crop padding), e.g. 0 to leave out a background class "
        "(default: 255, nothing more)")
    add("--data-backend", default="pil", choices=["pil", "gpu", "synthetic"],
        help="pil: decode and augment in DataLoader workers; gpu: workers decode, the device rescales, crops, "
        "flips and normalises; synthetic: random batches on the device, to time the model step alone (default: pil)")
    add_bad_sample_flag(group)
    add("--synthetic-train-size", type=positive_int, default=2_500,
        help="synthetic set: training images (default: 2500)")
    add("--synthetic-val-size", type=positive_int, help="synthetic set: validation images (default: 500)")
    add("--synthetic-image-size", type=positive_int,
        help="synthetic set: image side in pixels (default: 48)")
    add("--synthetic-classes", type=int, choices=range(2, 12), metavar="{2..11}",
        help="synthetic set: classes, background included (default: 6)")

    group = p.add_argument_group("model")
    add = group.add_argument
    add("--model", choices=OWN_MODELS + TORCHVISION_MODELS, metavar="MODEL", help=f"{', '.join(OWN_MODELS)} or "
        f"torchvision's {', '.join(TORCHVISION_MODELS)} {recipe('model')}")
    add("--output-stride", type=int, choices=[8, 16], help="DeepLabV3+: backbone output stride (default: 8)")
    add("--aux-loss", action="store_true", default=None,
        help="auxiliary FCN head on layer3, its loss weighted by --aux-weight")
    add("--aux-weight", type=non_negative_float, default=0.4, help="weight of the auxiliary loss (default: 0.4)")
    add("--unet-width", type=positive_int, help=f"UNet: channels of the first level {recipe('unet_width')}")
    add("--weights-backbone", help="ImageNet backbone: torchvision weights name (IMAGENET1K_V2) or a classifier "
        ".pth of the same ResNet (e.g. from classification/train.py)")
    add("--weights", help="start from a segmentation checkpoint (.pth) or, for torchvision's models, a weights "
        "name (COCO_WITH_VOC_LABELS_V1, downloaded once); classifier layers of another class count start afresh "
        "(default: none)")
    add("--sync-bn", action=argparse.BooleanOptionalAction,
        help="batch-norm statistics over all GPUs (default: on when distributed on CUDA)")

    group = p.add_argument_group("optimisation")
    add = group.add_argument
    add("--epochs", type=positive_int, help=f"epochs to train {recipe('epochs')}")
    add("--iters", type=positive_int, metavar="N", help="optimizer steps to train instead of --epochs, as "
        "mmsegmentation's 20k/40k/80k schedules count; the last epoch stops at step N (default: --epochs)")
    add("--opt", default="sgd", choices=["sgd", "sgd_nesterov", "adamw"], help="optimizer (default: sgd)")
    add("--lr", type=non_negative_float, help=f"peak learning rate for the whole run's batch {recipe('lr')}")
    add("--momentum", type=non_negative_float, default=0.9, help="SGD momentum (default: 0.9)")
    add("--wd", "--weight-decay", type=non_negative_float, default=1e-4, dest="weight_decay",
        help="weight decay (default: 1e-4)")
    add("--norm-weight-decay", type=non_negative_float, help="weight decay of normalisation layers (default: --wd)")
    add("--lr-scheduler", default="polylr", choices=["polylr", "cosineannealinglr"],
        help="schedule after warmup, stepped every optimizer step (default: polylr)")
    add("--lr-power", type=positive_float, default=0.9, help="polylr: lr * (1 - step / steps) ** power (default: 0.9)")
    add("--lr-min", type=non_negative_float, default=0.0, help="cosineannealinglr: final learning rate (default: 0)")
    add_optimisation_flags(group, recipe)

    add_eval_args(p.add_argument_group("evaluation (each epoch, or every --eval-interval steps)"))

    group = p.add_argument_group("precision and speed")
    add_precision_flags(group)
    group.add_argument("--grad-checkpointing", action="store_true", help="recompute the backbone's (UNet: every "
                       "block's) activations in backward to save memory (default: off)")

    group = p.add_argument_group("checkpoints and preemption")
    add_checkpoint_flags(group)
    add = group.add_argument
    add("--test-only", action="store_true", help="only evaluate the checkpoint of --resume on val")

    group = p.add_argument_group("logging")
    group.add_argument("--print-freq", type=positive_int,
                       help=f"optimizer steps between progress lines {recipe('print_freq')}")
    return p


# What --test-only --resume takes from the checkpoint unless given: the model and the validation images.
TRAINED_SETTINGS = ("model", "output_stride", "aux_loss", "unet_width", "base_size", "crop_size", "dataset",
                    "data_path", "synthetic_val_size", "synthetic_image_size", "synthetic_classes")


def finish_args(args):
    path = resume_path(args.resume, args.output_dir)  # a wrong path is reported before any work
    if args.test_only and path:
        vars(args).update(trained_settings(path, vars(args), TRAINED_SETTINGS))
    if args.iters and args.epochs:
        raise UserError(f"--iters {args.iters} and --epochs {args.epochs} both set the length of the run: give one")
    for name, value in {**DEFAULTS, **(SYNTHETIC_DEFAULTS if args.data_path is None else REAL_DATA_DEFAULTS)}.items():
        if getattr(args, name) is None and not (name == "epochs" and args.iters):
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
    low, high = args.scale_range
    if low > high:  # RandomResize would fail at the first sample, in a DataLoader worker
        raise UserError(f"--scale-range {low:g} {high:g}: give MIN <= MAX, e.g. --scale-range {high:g} {low:g}")
    if args.voc_aug and args.dataset != "voc":
        raise UserError("--voc-aug is VOC's SBD augmented training set: use it with --dataset voc --data-path ROOT")
    if args.compile and args.grad_checkpointing:
        raise UserError("--grad-checkpointing and --compile together fail in the compiled backward on CUDA "
                        "(torch 2.11, measured with classification): use one of them")
    if args.epochs and args.start_epoch >= args.epochs and not (args.resume or args.test_only):
        raise UserError(f"--start-epoch {args.start_epoch} is not below --epochs {args.epochs}: nothing would be "
                        "trained")
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


def validate(model, val_loader, class_names, device, autocast, memory_format, args, name, preemption=None,
             watchdog=None):
    """The summary of one evaluation; None when a stop signal came during it."""
    meter = SegmentationMeter(len(class_names), device, args.ignore_index)
    predictor = predictor_from_args(model, args)
    if evaluate(predictor, val_loader, meter, device, autocast, memory_format, preemption, watchdog) is None:
        return None
    summary = meter.summary()
    print0(f"{name}: mIoU {summary['miou']:.2f}  pixel acc {summary['pixel_acc']:.2f}  "
           f"mean acc {summary['mean_acc']:.2f}  on {summary['num_images']} images")
    return summary


@torch.inference_mode()
def log_validation(writer, summary, class_names, predictor, val_loader, palette, device, autocast, epoch, count=4):
    """TensorBoard: each class's IoU, and input | label | prediction of the first validation images, coloured
    with the dataset's palette."""
    for name, iou in zip(class_names, summary["per_class_iou"]):
        if iou is not None:
            writer.add_scalar(f"val_iou/{name}", iou, epoch)
    colours = torch.tensor(palette + [(255, 255, 255)] * (256 - len(palette)), dtype=torch.uint8, device=device)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    examples = [(image, target) for images, targets in itertools.islice(val_loader, count)
                for image, target in zip(images, targets)][:count]
    for i, (image, target) in enumerate(examples):
        image, target = to_device((image[None], target[None]), device)
        with autocast:
            scores = predictor.eval()(image)
        predicted = F.interpolate(scores.float(), target.shape[-2:], mode="bilinear").argmax(1)
        picture = F.interpolate(image.float().cpu() * std + mean, target.shape[-2:])
        picture = (picture[0].clamp(0, 1) * 255).to(torch.uint8)
        row = [picture, colours[target[0]].permute(2, 0, 1).cpu(), colours[predicted[0]].permute(2, 0, 1).cpu()]
        writer.add_image(f"val_examples/{i}", torch.cat(row, dim=2), epoch)


def build_model(args, num_classes):
    model = create_model(args.model, num_classes, args.output_stride, args.aux_loss, args.weights_backbone,
                         args.unet_width)
    check_input_size(model, *args.crop_size, "--crop-size")
    if args.weights:
        load_weights(model, args.model, args.weights)
    if args.grad_checkpointing:
        enable_grad_checkpointing(model)
    if args.data_path is not None and args.model != "unet" and not (args.weights_backbone or args.weights):
        print0("note: the backbone starts from random weights; published results start from ImageNet ones: "
               "add --weights-backbone IMAGENET1K_V1")
    return model


def test_only(model, val_loader, class_names, device, autocast, memory_format, args):
    path = resume_path(args.resume, args.output_dir)
    if not path:
        raise UserError(f"--resume auto found no checkpoint in {args.output_dir}: nothing to evaluate")
    load_model_state(model, state_dict_from(read_training_checkpoint(path, args.model, class_names), path), path)
    validate(model, val_loader, class_names, device, autocast, memory_format, args, "Test")


def main(args):
    env, device = init_distributed(args.device, args.dist_timeout, args.dist_backend)
    args.world_size = env.world_size
    # With --global-batch, the --accum-steps that keeps it on the processes this start found.
    layout = BatchLayout.planned(env, args.batch_size, args.accum_steps, args.global_batch)
    args.accum_steps = layout.accum_steps
    started = print_run_start(env, device)
    configure_torch(device, args.seed, args.use_deterministic_algorithms)
    precision = precision_from_flags(args.amp, args.amp_dtype)
    autocast = autocast_context(device, precision)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    if args.sync_bn is None:  # per-GPU batches of 1-2 crops give poor batch-norm statistics: sync by default
        args.sync_bn = env.distributed and device.type == "cuda"
    check_sync_bn(args.sync_bn, env, device)

    class_names, palette = dataset_info(args)
    val_loader = load_val(args, env, device)  # before the long work: val/ problems show now
    model = build_model(args, len(class_names))
    if args.sync_bn:
        model = sync_batch_norm(model, env)
    model.to(device, memory_format=memory_format)
    if args.test_only:
        test_only(model, val_loader, class_names, device, autocast, memory_format, args)
        return

    if args.batch_size == 1 and "deeplab" in args.model and not (args.sync_bn and env.distributed):
        raise UserError("-b 1: DeepLab's image-pooling branch normalises a 1x1 map over the batch, which needs 2 "
                        "or more crops per process (or --sync-bn across GPUs): use -b 2 or more, and --accum-steps "
                        "to keep the effective batch")
    start_output_dir(args.output_dir, vars(args))  # claimed before anything is read from it or written
    bad_samples = BadSamples(args.max_bad_samples, args.output_dir)  # files that fail to load mid-run
    train_loader = load_train(args, layout, device, bad_samples)
    steps_per_epoch = train_loader.sampler.steps_per_epoch
    total_steps = args.iters or args.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)  # with --iters, the last one may stop early
    print0(f"{args.model}, {count_parameters(model):,} parameters; {len(train_loader.dataset)} training and "
           f"{len(val_loader.dataset)} validation images, {len(class_names)} classes; crops {args.crop_size[0]}x"
           f"{args.crop_size[1]}, effective batch {args.batch_size} x {args.accum_steps} x {env.world_size} processes; "
           f"sync-bn {args.sync_bn}; {total_steps} optimizer steps: {epochs} epochs of {steps_per_epoch}")
    groups = param_groups(model, args.lr, args.weight_decay, args.norm_weight_decay)
    optimizer = create_optimizer(args.opt, groups, args.lr, args.momentum, args.weight_decay, device.type)
    # Laid out in optimizer steps (one scheduler "epoch" = one step), so that --iters need not fill whole epochs.
    lr_scheduler = create_lr_scheduler(optimizer, args.lr_scheduler, total_steps, 1,
                                       warmup_epochs=args.lr_warmup_epochs * steps_per_epoch,
                                       warmup_method=args.lr_warmup_method, warmup_decay=args.lr_warmup_decay,
                                       lr_min=args.lr_min, power=args.lr_power)
    scaler = grad_scaler(device, precision, optimizer)
    checkpointer = Checkpointer(args.output_dir, env.is_main, model, optimizer, lr_scheduler, scaler,
                                precision=precision, flags=vars(args), keep=args.keep_checkpoints,
                                bad_samples=bad_samples, best_key="best_miou", best_name="mIoU",
                                class_names=class_names, palette=palette, steps_per_epoch=steps_per_epoch)
    args.start_epoch, start_step = checkpointer.resume(resume_path(args.resume, args.output_dir), args.model,
                                                       SCHEDULE_ARGS)

    model = data_parallel(model, env, device)
    if args.compile:
        model.compile()  # in place: the state dict keeps its keys
    criterion = SegmentationLoss(args.ignore_index, args.aux_weight)
    writer = tensorboard_writer(args.output_dir)
    progress = ProgressLog(args.print_freq, env.world_size, writer)
    nonfinite = NonFiniteGuard(args.max_nonfinite_steps, args.output_dir, scaler)
    preemption = PreemptionSignal(device)
    watchdog = StallWatchdog(args.stall_timeout, env.rank)
    run = RunSteps(steps_per_epoch, total_steps, args.eval_interval)
    by = "step" if args.eval_interval else "epoch"  # what log.jsonl's lines and TensorBoard's scalars follow
    for epoch in range(args.start_epoch, epochs):
        start = start_step if epoch == args.start_epoch else 0
        for stop in run.pauses(epoch, start, checkpointer.validated):  # the epoch's end, and any validation inside
            train_loader.sampler.set_epoch(epoch, start)
            stats = train_one_epoch(model, criterion, optimizer, lr_scheduler, scaler, train_loader, epoch,
                                    device=device, autocast=autocast, progress=progress, nonfinite=nonfinite,
                                    memory_format=memory_format, seed=args.seed, layout=layout,
                                    clip_grad_norm=args.clip_grad_norm, preemption=preemption,
                                    checkpointer=checkpointer, checkpoint_interval=args.checkpoint_interval,
                                    start_step=start, end_step=stop, watchdog=watchdog)
            if stats.pop("stopped"):  # by SIGTERM/SIGUSR1, its checkpoint saved: the same command resumes it
                preemption.exit()
            start, record = stop, {"epoch": epoch, "step": epoch * steps_per_epoch + stop, **stats}
            if not run.validates_after(epoch, stop):  # an epoch's end between validations (--eval-interval)
                checkpointer.save(epoch)
                log_epoch(record, args.output_dir, writer, by)
                continue
            val = validate(model, val_loader, class_names, device, autocast, memory_format, args,
                           f"Epoch {epoch} val" if by == "epoch" else f"Epoch {epoch} step {stop} val", preemption,
                           watchdog)
            if val is None:  # a signal during validation: the training is saved now; the validation reruns on resume
                checkpointer.save(epoch, stop)
                preemption.exit()
            checkpointer.save_validated(epoch, val["miou"], None if stop == run.epoch_end(epoch) else stop)
            record.update(val_miou=val["miou"], val_pixel_acc=val["pixel_acc"], val_mean_acc=val["mean_acc"])
            log_epoch(record, args.output_dir, writer, by)
            if writer is not None:
                log_validation(writer, val, class_names, predictor_from_args(unwrap(model), args), val_loader,
                               palette, device, autocast, record[by])
    if writer is not None:
        writer.close()
    best = "none (no epoch evaluated)" if checkpointer.best is None else f"{checkpointer.best:.2f}"
    print_run_end(started, f"best mIoU {best}", args.output_dir)


if __name__ == "__main__":
    stop_at_once_until_training()  # SIGTERM before the loop: exit 75 at once, not by the default handler
    args = get_args_parser().parse_args()
    run_cli(lambda a: main(finish_args(a)), args)
