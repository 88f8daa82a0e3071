"""Train a semantic segmenter (DeepLabV3+, UNet, torchvision's) on Cityscapes, PASCAL VOC, ADE20K, a folder of images
and masks, or the synthetic set.

    python segmentation/train.py                                      # built-in synthetic scenes, CPU or GPU
    torchrun --nproc_per_node=4 segmentation/train.py --dataset cityscapes --data-path /data/cityscapes -b 2 --amp
    python segmentation/train.py --dataset folder --data-path /data/defects  # train/images, train/masks, val/...
"""
import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import torch
import torch.nn.functional as F
from torch import nn

from common.checkpoint import Checkpointer
from common.data import BatchLayout, bad_sample_budget, default_workers
from common.distributed import data_parallel, init_distributed
from common.engine import (Precision, StepParts, install_run_guards, pause_after, train_step,
                           training_batches)
from common.flags import add_shared_flags, number
from common.log import RunLog, UserError, print0, run_cli
from common.optim import create_optimizer_and_scheduler
from segmentation.data import DATASETS, IGNORE_INDEX, dataset_info, load_train, load_val
from segmentation.inference import add_eval_args, validate
from segmentation.model import create_model

# Real data gets the Cityscapes DeepLabV3+ recipe: a batch of 8 (-b 8 on one GPU, -b 2 on four), SGD 0.01, poly
# decay, 80 epochs (the README has mmsegmentation's published flags). The synthetic set gets a small UNet that
# reaches a useful mIoU in a minute or two on a laptop CPU: width 12 on 48 px scenes steps several times faster
# than width 16 on 64 px and still learns the scenes in 4 epochs.
REAL_DATA_DEFAULTS = dict(model="deeplabv3plus_resnet50", batch_size=8, epochs=80, lr=0.01, lr_warmup_epochs=1,
                          workers=default_workers(8), print_freq=50, unet_width=64)
SYNTHETIC_DEFAULTS = dict(model="unet", batch_size=16, epochs=4, lr=0.1, lr_warmup_epochs=1, workers=0,
                          print_freq=25, unet_width=12)
# Defaults of the flags that --test-only --resume may take from the checkpoint instead (None: not given).
DEFAULTS = dict(output_stride=8, aux_loss=False, synthetic_val_size=500, synthetic_image_size=48, synthetic_classes=6,
                binary_masks=False)
SECTIONS = ("data", "model", "optimisation", "evaluation (each epoch, or every --eval-interval steps)",
            "precision and speed", "checkpoints and preemption", "logging")
# As in classification/train.py: these must match on resume, and the global batch as a product.
SCHEDULE_ARGS = ("opt", "epochs", "iters", "lr", "head_lr", "lr_scheduler", "lr_power", "lr_min", "lr_warmup_epochs",
                 "lr_warmup_method", "lr_warmup_decay", "voc_aug", "seed", "class_weights", "loss", "freeze_backbone")


def get_args_parser():
    def recipe(name):
        return f"(default: {REAL_DATA_DEFAULTS[name]}; {SYNTHETIC_DEFAULTS[name]} on the synthetic set)"

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = add_shared_flags(p, recipe, SECTIONS)
    add = groups["data"].add_argument
    add("--data-path", help="dataset root in its own layout (default: the built-in synthetic scenes)")
    add("--dataset", choices=sorted(DATASETS), help="layout of --data-path (required with it)")
    add("--voc-aug", action="store_true", help="VOC: train on the SBD augmented set "
        "(SegmentationClassAug/, ImageSets/Segmentation/train_aug.txt; 10,582 images), validate on VOC's val "
        "(default: off, VOC's 1,464 train images)")
    add("--classes-file", metavar="PATH", help="folder: the classes, one a line in index order, optionally with the "
        "RGB colour of colour masks ('scratch 255 0 0') (default: ROOT/classes.txt, else the masks' values 0..K-1)")
    add("--binary-masks", action="store_true", default=None, help="folder: masks of 0 and 255 (or black and white) "
        "are background and foreground (default: off, 255 is void)")
    add("-b", "--batch-size", type=number(int, at_least=1), help=f"crops per process per step {recipe('batch_size')}")
    add("--crop-size", type=number(int, at_least=1), nargs="+", metavar="PX", help="training crop H [W] "
        "(default: 512 1024 on Cityscapes, 512 on VOC, ADE20K and folder)")
    add("--base-size", type=number(int, at_least=1),
        help="shorter side before random rescaling, and of validation images (default: 1024 on Cityscapes, 512 on "
        "VOC, ADE20K and folder)")
    add("--scale-range", type=number(float, above=0), nargs=2, default=[0.5, 2.0], metavar=("MIN", "MAX"),
        help="random rescale of the base size (default: 0.5 2.0)")
    add("--ignore-index", type=int, default=IGNORE_INDEX, help="a label left out of loss and metrics besides 255 "
        "(void and crop padding), e.g. 0 for a background class (default: 255, nothing more)")
    add("--data-backend", default="pil", choices=["pil", "gpu", "synthetic"],
        help="pil: decode and augment in DataLoader workers; gpu: workers decode, the device rescales, crops, "
        "flips and normalises; synthetic: random batches on the device, to time the model step alone (default: pil)")
    add("--synthetic-train-size", type=number(int, at_least=1), default=2_500,
        help="synthetic set: training images (default: 2500)")
    add("--synthetic-val-size", type=number(int, at_least=1), help="synthetic set: validation images (default: 500)")
    add("--synthetic-image-size", type=number(int, at_least=1),
        help="synthetic set: image side in pixels (default: 48)")
    add("--synthetic-classes", type=int, choices=range(2, 12), metavar="{2..11}",
        help="synthetic set: classes, background included (default: 6)")

    add = groups["model"].add_argument
    add("--model", help="deeplabv3plus_resnet50 or _resnet101, unet, a torchvision segmentation model (fcn_resnet50, "
        "deeplabv3_resnet50, lraspp_mobilenet_v3_large, ...), or your own as package.module:function "
        f"{recipe('model')}")
    add("--output-stride", type=int, choices=[8, 16], help="DeepLabV3+: backbone output stride (default: 8)")
    add("--aux-loss", action="store_true", default=None,
        help="auxiliary FCN head on layer3, its loss weighted by --aux-weight")
    add("--aux-weight", type=number(float, at_least=0), default=0.4, help="weight of the auxiliary loss (default: 0.4)")
    add("--unet-width", type=number(int, at_least=1), help=f"UNet: channels of the first level {recipe('unet_width')}")
    add("--weights-backbone", help="ImageNet backbone: torchvision weights name (IMAGENET1K_V2) or a classifier "
        ".pth of the same ResNet (e.g. from classification/train.py)")
    add("--weights", help="start from a segmentation checkpoint (.pth) or, for torchvision's models, a weights "
        "name (COCO_WITH_VOC_LABELS_V1, downloaded once); classifier layers of another class count start afresh "
        "(default: none)")
    add("--sync-bn", action=argparse.BooleanOptionalAction,
        help="batch-norm statistics over all GPUs (default: on when distributed on CUDA, where per-GPU batches of "
        "1-2 crops give poor statistics)")

    add = groups["optimisation"].add_argument
    add("--epochs", type=number(int, at_least=1), help=f"epochs to train {recipe('epochs')}")
    add("--iters", type=number(int, at_least=1), metavar="N", help="optimizer steps to train instead of --epochs, as "
        "mmsegmentation's 20k/40k/80k schedules count; the last epoch stops at step N (default: --epochs)")
    add("--opt", default="sgd", choices=["sgd", "sgd_nesterov", "adamw"], help="optimizer (default: sgd)")
    add("--lr", type=number(float, at_least=0), help=f"peak learning rate for the whole run's batch {recipe('lr')}")
    add("--head-lr", type=number(float, at_least=0), help="learning rate of the head, every layer after the "
        "backbone (DeepLabV3+'s ASPP and decoder; the classifier of torchvision's models) (default: --lr); for "
        "fine-tuning")
    add("--loss", default="ce", choices=["ce", "dice", "ce+dice"], help="cross-entropy, soft Dice over the classes "
        "present in the batch, or their sum; --class-weights weight both (default: ce)")
    add("--momentum", type=number(float, at_least=0), default=0.9, help="SGD momentum (default: 0.9)")
    add("--wd", "--weight-decay", type=number(float, at_least=0), default=1e-4, dest="weight_decay",
        help="weight decay (default: 1e-4)")
    add("--norm-weight-decay", type=number(float, at_least=0),
        help="weight decay of normalisation layers (default: --wd)")
    add("--lr-scheduler", default="polylr", choices=["polylr", "cosineannealinglr"],
        help="schedule after warmup, stepped every optimizer step (default: polylr)")
    add("--lr-power", type=number(float, above=0), default=0.9,
        help="polylr: lr * (1 - step / steps) ** power (default: 0.9)")
    add("--lr-min", type=number(float, at_least=0), default=0.0,
        help="cosineannealinglr: final learning rate (default: 0)")

    add_eval_args(groups["evaluation (each epoch, or every --eval-interval steps)"])
    groups["precision and speed"].add_argument(
        "--grad-checkpointing", action="store_true",
        help="recompute the backbone's (UNet: every block's) activations in backward to save memory (default: off)")

    groups["checkpoints and preemption"].add_argument("--test-only", action="store_true",
                                                      help="only evaluate the checkpoint of --resume on val")
    return p


# What --test-only --resume takes from the checkpoint unless given: the model and the validation images.
TRAINED_SETTINGS = ("model", "output_stride", "aux_loss", "unet_width", "base_size", "crop_size", "dataset",
                    "data_path", "classes_file", "binary_masks", "synthetic_val_size", "synthetic_image_size",
                    "synthetic_classes")


def finish_args(args):
    if ":" in (args.model or "") and (args.weights_backbone or args.aux_loss or args.output_stride or
                                      args.freeze_backbone or args.head_lr is not None):
        raise UserError(f"--model {args.model} is your own: --weights-backbone, --aux-loss, --output-stride, "
                        "--freeze-backbone and --head-lr are for the built-in models; drop them")
    Checkpointer.resolve_resume(args, TRAINED_SETTINGS)  # args.resume_from: the checkpoint, or None
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
        args.base_size = args.base_size or DATASETS[args.dataset].base_size
        args.crop_size = args.crop_size or DATASETS[args.dataset].crop_size
    args.crop_size = (args.crop_size * 2)[:2]  # one number means a square
    low, high = args.scale_range
    if low > high:  # RandomResize would fail at the first sample, in a DataLoader worker
        raise UserError(f"--scale-range {low:g} {high:g}: give MIN <= MAX, e.g. --scale-range {high:g} {low:g}")
    if args.voc_aug and args.dataset != "voc":
        raise UserError("--voc-aug is VOC's SBD augmented training set: use it with --dataset voc --data-path ROOT")
    if args.compile and args.grad_checkpointing:
        raise UserError("--grad-checkpointing and --compile together fail in the compiled backward on CUDA: use one "
                        "of them")
    if args.epochs and args.start_epoch >= args.epochs and not (args.resume or args.test_only):
        raise UserError(f"--start-epoch {args.start_epoch} is not below --epochs {args.epochs}: nothing would be "
                        "trained")
    if args.test_only and not args.resume:
        raise UserError("--test-only evaluates a trained model: give --resume PATH")
    if args.model == "unet" and (args.freeze_backbone or args.head_lr is not None):
        raise UserError("unet has no backbone, so no head apart from it: drop --freeze-backbone and --head-lr")
    if args.freeze_backbone and not (args.weights_backbone or args.weights):
        raise UserError("--freeze-backbone trains the head alone on a pretrained backbone: give --weights-backbone "
                        "or --weights")
    return args


def check_batch_norm_batch(args, env):
    if args.batch_size == 1 and "deeplab" in args.model and not (args.sync_bn and env.distributed):
        raise UserError("-b 1: DeepLab's image-pooling branch normalises a 1x1 map over the batch, which needs 2 "
                        "or more crops per process (or --sync-bn across GPUs): use -b 2 or more, and --accum-steps "
                        "to keep the effective batch")


class SegmentationLoss(nn.Module):
    """Cross-entropy over labelled pixels, soft Dice or their sum (`loss`), with `class_weights` in each; plus the
    auxiliary head's alike when the model has one."""

    def __init__(self, ignore_index, aux_weight, loss="ce", class_weights=None):
        super().__init__()
        self.ignore_index, self.aux_weight, self.loss = ignore_index, aux_weight, loss
        self.class_weights = class_weights
        if loss != "ce":
            from segmentation.imbalance import dice_loss  # only with --loss dice or ce+dice
            self.dice_loss = dice_loss

    def forward(self, outputs, target):
        if self.ignore_index != IGNORE_INDEX:  # a label the user leaves out joins the void pixels
            target = target.masked_fill(target == self.ignore_index, IGNORE_INDEX)
        # The mean over labelled pixels, but 0 instead of 0/0 = NaN for a crop that has none (all padding).
        labelled = (target != IGNORE_INDEX).sum().clamp(min=1)
        loss = 0
        for name, weight in (("out", 1.0), ("aux", self.aux_weight)):
            if name in outputs and self.loss != "dice":
                ce = F.cross_entropy(outputs[name], target, self.class_weights, ignore_index=IGNORE_INDEX,
                                     reduction="sum")
                loss = loss + weight * ce / labelled
            if name in outputs and self.loss != "ce":
                loss = loss + weight * self.dice_loss(outputs[name], target, self.class_weights)
        return loss


def create_criterion(args, class_names, train_set, device):
    weights = None
    if args.class_weights != "none":  # the module only this flag needs is imported with it
        from segmentation.imbalance import class_weights
        weights = class_weights(args, class_names, train_set).to(device)
    return SegmentationLoss(args.ignore_index, args.aux_weight, args.loss, weights)


def test_only(model, val_loader, class_names, precision, args):
    Checkpointer.load_for_evaluation(args.resume_from, model, args.model, class_names)
    validate(model, val_loader, class_names, precision, args, "Test")


def main(args):
    env, device = init_distributed(args.device, args.dist_timeout, args.dist_backend, args.sync_bn)
    args.world_size = env.world_size
    layout = BatchLayout.planned(env, args.batch_size, args.accum_steps, args.global_batch)
    args.accum_steps = layout.accum_steps
    log = RunLog(env, device)
    precision = Precision(device, args.amp, args.amp_dtype, args.channels_last)
    precision.configure_kernels(args.use_deterministic_algorithms)  # process-wide: cuDNN autotuning, TF32, determinism
    torch.manual_seed(args.seed)  # the weights' initialisation
    args.sync_bn = env.distributed and device.type == "cuda" if args.sync_bn is None else args.sync_bn

    class_names, palette = dataset_info(args)
    val_loader = load_val(args, env, device)  # before the long work: val/ problems show now
    model = create_model(args.model, len(class_names), args.output_stride, args.aux_loss, args.weights_backbone,
                         args.unet_width, args.weights, args.crop_size, args.grad_checkpointing, args.freeze_backbone)
    if args.data_path is not None and args.model != "unet" and not (args.weights_backbone or args.weights):
        print0("note: the backbone starts from random weights; published results start from ImageNet ones: "
               "add --weights-backbone IMAGENET1K_V1")
    model.to(device, memory_format=precision.memory_format)
    if args.test_only:
        test_only(model, val_loader, class_names, precision, args)
        return

    check_batch_norm_batch(args, env)
    log.lock_output_dir(args.output_dir, vars(args))  # before anything is read from the output folder or written to it
    if log.writer is not None:  # imported at the start, as the provenance says of all the code that runs
        from segmentation.pictures import log_validation
    bad_samples = bad_sample_budget(args.max_bad_samples, args.output_dir)  # None at 0: a bad file stops the run
    train_loader = load_train(args, layout, device, bad_samples)
    steps_per_epoch = train_loader.sampler.steps_per_epoch
    total_steps = args.iters or args.epochs * steps_per_epoch  # with --iters, the last epoch may stop early
    print0(f"{args.model}, {sum(p.numel() for p in model.parameters()):,} parameters; {len(train_loader.dataset)} "
           f"training and {len(val_loader.dataset)} validation images, {len(class_names)} classes; crops "
           f"{args.crop_size[0]}x{args.crop_size[1]}, effective batch {args.batch_size} x {args.accum_steps} x "
           f"{env.world_size} processes; sync-bn {args.sync_bn}; {total_steps} optimizer steps: "
           f"{math.ceil(total_steps / steps_per_epoch)} epochs of {steps_per_epoch}")
    head = [name for name, _ in model.named_children() if name != "backbone"]  # what --head-lr trains
    optimizer, lr_scheduler = create_optimizer_and_scheduler(args, model, head, device.type, steps_per_epoch,
                                                             total_steps)
    model = data_parallel(model, env, device, args.sync_bn)
    if args.compile:
        model.compile()  # in place: the state dict keeps its keys
    criterion = create_criterion(args, class_names, train_loader.sampler.dataset, device)
    parts = StepParts(model, criterion, optimizer, lr_scheduler, precision.grad_scaler(optimizer), precision,
                      args.clip_grad_norm)
    checkpointer = Checkpointer(parts, args.output_dir, env.is_main, flags=vars(args), score=("best_miou", "mIoU"),
                                layout=layout, keep=args.keep_checkpoints, bad_samples=bad_samples,
                                provenance=log.provenance, class_names=class_names, palette=palette,
                                steps_per_epoch=steps_per_epoch)
    args.start_epoch, start_step = checkpointer.resume(args.resume_from, args.model, SCHEDULE_ARGS)

    progress = log.progress(args.print_freq)
    guards = install_run_guards(device, env.rank, parts.scaler, args.output_dir, args.max_nonfinite_steps,
                                args.stall_timeout)
    by = "step" if args.eval_interval else "epoch"  # what log.jsonl's lines and TensorBoard's scalars follow
    first_step = args.start_epoch * steps_per_epoch + start_step
    epoch, done = args.start_epoch, start_step  # where the last step left the run: `done` steps into `epoch`
    # Saved by a stop signal at a pause (during its validation, or at the step before): the resumed run finishes
    # that pause before any step.
    epoch_end, validates = (pause_after(first_step, steps_per_epoch, total_steps, args.eval_interval)
                            if start_step > 0 and not checkpointer.validated else (False, False))
    batches = None
    for step in range(first_step, total_steps + 1):  # each pass: the pause the last step ended in, then a step
        if epoch_end or validates:  # the training part's numbers; its batches restart after, as a resumed run's
            trained, batches = {"epoch": epoch, "step": step, **progress.summary(optimizer.param_groups[0]["lr"])}, None
        if validates:
            name = f"Epoch {epoch} val" if by == "epoch" else f"Epoch {epoch} step {done} val"
            val, meter = validate(model, val_loader, class_names, precision, args, name, guards)
            if val is None:  # a stop signal during validation: saved now, the validation reruns on resume
                checkpointer.save_on_all_ranks(epoch, done)
                guards.preemption.exit()
            checkpointer.save_validated_on_all_ranks(epoch, val["miou"], None if epoch_end else done,
                                                     meter.confusion.matrix)
            log.record({**trained, **{f"val_{key}": v for key, v in val.items() if not isinstance(v, list)}}, by)
            if log.writer is not None:
                log_validation(log.writer, val, class_names, model, guards.watchdog.beating(val_loader), palette,
                               precision, args, step if by == "step" else epoch)
        elif epoch_end:  # between validations (--eval-interval)
            checkpointer.save_on_all_ranks(epoch)
            log.record(trained, by)
        if step == total_steps:
            break
        epoch, in_epoch = divmod(step, steps_per_epoch)
        if batches is None:
            progress.start_epoch(epoch, in_epoch, steps_per_epoch, total_steps)
            batches = progress.timed(training_batches(train_loader, epoch, in_epoch, args.seed, env.rank))
            model.train()
        loss, grad_norm = train_step(parts, batches, layout, args.seed, epoch, in_epoch)
        epoch_end, validates = pause_after(step + 1, steps_per_epoch, total_steps, args.eval_interval)
        done = in_epoch + 1
        checkpoint_due = args.checkpoint_interval and done % args.checkpoint_interval == 0
        printed = progress.log(in_epoch, loss, grad_norm, optimizer.param_groups[0]["lr"], last=validates)
        if guards.stop_requested(loss, grad_norm, epoch, in_epoch, sync_point=printed or checkpoint_due):
            progress.stop(in_epoch, guards.preemption.received or "another rank")
            checkpointer.save_on_all_ranks(epoch, done)
            guards.preemption.exit()  # the same command with --resume auto goes on from this checkpoint
        if checkpoint_due and not (epoch_end or validates):  # the pause, next, saves anyway
            checkpointer.save_on_all_ranks(epoch, done)
    guards.watchdog.stop()
    log.end("best mIoU " + ("none (no epoch evaluated)" if checkpointer.best is None else f"{checkpointer.best:.2f}"))


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    run_cli(lambda a: main(finish_args(a)), args)
