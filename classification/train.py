"""Train an image classifier (ResNet-50 or any torchvision model) on an ImageFolder tree or the synthetic set.

    python classification/train.py                                    # built-in synthetic set, CPU or GPU
    torchrun --nproc_per_node=8 classification/train.py --data-path /data/imagenet --model resnet50 --amp
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import torch
from torch import nn

from classification.data import dataset_classes, load_train, load_val
from classification.model import create_model
from common.checkpoint import Checkpointer
from common.data import BatchLayout, bad_sample_budget, default_workers
from common.distributed import data_parallel, init_distributed
from common.engine import (Precision, StepParts, evaluate, install_run_guards, pause_after,
                           train_step, training_batches)
from common.flags import add_shared_flags, number
from common.log import RunLog, UserError, print0, run_cli
from common.metrics import ClassificationMeter
from common.optim import create_optimizer_and_scheduler

# Defaults that depend on the data: torchvision's ResNet-50 V1 recipe (8 GPUs x 32 images) for real data; for the
# synthetic set a small recipe that finishes on a laptop CPU, AdamW as it needs far fewer steps there than SGD.
REAL_DATA_DEFAULTS = dict(model="resnet50", batch_size=32, epochs=90, opt="sgd", lr=0.1, lr_scheduler="steplr",
                          lr_warmup_epochs=0, workers=default_workers(8), train_crop_size=224, print_freq=100)
SYNTHETIC_DEFAULTS = dict(model="resnet18", batch_size=64, epochs=3, opt="adamw", lr=2e-3,
                          lr_scheduler="cosineannealinglr", lr_warmup_epochs=1, workers=0, train_crop_size=32,
                          print_freq=20)
# Defaults of the flags that --test-only --resume may take from the checkpoint instead (None: not given).
DEFAULTS = dict(val_resize_size=256, val_crop_size=224, interpolation="bilinear", synthetic_val_size=1_000,
                synthetic_classes=10)
SECTIONS = ("data", "model", "optimisation", "precision and speed", "checkpoints and preemption", "logging")


def get_args_parser():
    def recipe(name):  # the help text of a default that depends on the data
        return f"(default: {REAL_DATA_DEFAULTS[name]}; {SYNTHETIC_DEFAULTS[name]} on the synthetic set)"

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = add_shared_flags(p, recipe, SECTIONS)
    add = groups["data"].add_argument
    add("--data-path", help="ImageFolder root with train/ and val/, or the folder list files' relative paths start "
        "from (default: the built-in synthetic set)")
    add("--train-list", help="instead of class folders, a CSV of path,label rows (with --val-list)")
    add("--val-list", help="the validation images' CSV (with --train-list)")
    add("--classes-file", help="class names one a line, in label order (default: the train list's, sorted)")
    add("-b", "--batch-size", type=number(int, at_least=1), help=f"images per process per step {recipe('batch_size')}")
    add("--train-crop-size", type=number(int, at_least=1), help=f"RandomResizedCrop size {recipe('train_crop_size')}")
    add("--train-crop-scale", type=number(float, above=0), nargs=2, default=[0.08, 1.0], metavar=("MIN", "MAX"),
        help="RandomResizedCrop: range of the crop's area, as a fraction of the image's (default: 0.08 1.0; "
        "higher MIN keeps more of the object, for small images and fine-tuning)")
    add("--train-crop-ratio", type=number(float, above=0), nargs=2, default=[3 / 4, 4 / 3], metavar=("MIN", "MAX"),
        help="RandomResizedCrop: range of the crop's width / height (default: 0.75 1.333)")
    add("--val-resize-size", type=number(int, at_least=1), help="validation resize of the shorter side (default: 256)")
    add("--val-crop-size", type=number(int, at_least=1), help="validation centre crop (default: 224)")
    add("--interpolation", choices=["nearest", "bilinear", "bicubic"], help="resize filter (default: bilinear)")
    add("--auto-augment", choices=["ra", "ta_wide", "augmix", "imagenet", "cifar10", "svhn"],
        help="ra (RandAugment), ta_wide (TrivialAugmentWide), augmix, or an AutoAugment policy: imagenet, cifar10, "
        "svhn (default: none)")
    add("--random-erase", type=number(float, at_least=0, at_most=1), default=0.0,
        help="RandomErasing probability (default: 0)")
    add("--mixup-alpha", type=number(float, at_least=0), default=0.0, help="MixUp alpha (default: 0, off)")
    add("--cutmix-alpha", type=number(float, at_least=0), default=0.0,
        help="CutMix alpha (default: 0, off); with MixUp, one of the two per batch")
    add("--ra-sampler", action="store_true", help="repeated augmentation: each image --ra-reps times per epoch, "
        "differently augmented, on consecutive ranks (torchvision's RASampler; its ResNet-50 V2 recipe uses it)")
    add("--ra-reps", type=number(int, at_least=1), default=3,
        help="copies of each image with --ra-sampler (default: 3)")
    add("--balanced-sampler", action="store_true", help="draw each class equally often (with replacement; with "
        "--ra-sampler, each drawn image repeated)")
    add("--data-backend", default="pil", choices=["pil", "gpu", "synthetic"],
        help="pil: decode and augment in DataLoader workers; gpu: workers read bytes, the device decodes (nvJPEG) "
        "and augments whole batches; synthetic: random batches on the device, to time the model step alone "
        "(default: pil)")
    add("--list-cache", metavar="DIR", help="folder keeping the listing of train/ and val/ or the lists read "
        "(file_list_*.npz): a restart lists again only the class folders that changed (default: --output-dir; none "
        "without it)")
    add("--synthetic-train-size", type=number(int, at_least=1), default=3_500,
        help="synthetic set: training images (default: 3500)")
    add("--synthetic-val-size", type=number(int, at_least=1), help="synthetic set: validation images (default: 1000)")
    add("--synthetic-classes", type=int, choices=range(2, 11), metavar="{2..10}",
        help="synthetic set: number of classes (default: 10)")

    add = groups["model"].add_argument
    add("--model", help=f"torchvision classifier name, or your own as package.module:function {recipe('model')}")
    add("--weights", help="start from weights: a torchvision enum name (IMAGENET1K_V2) or a local .pth state dict")
    add("--sync-bn", action="store_true", help="synchronise batch-norm statistics across GPUs")
    add("--model-ema", action="store_true", help="keep an exponential moving average of weights and evaluate it")
    add("--model-ema-steps", type=number(int, at_least=1), default=32,
        help="optimizer steps between EMA updates (default: 32)")
    add("--model-ema-decay", type=number(float, above=0), default=0.99998,
        help="EMA decay, scaled as in torchvision's reference (default: 0.99998)")

    add = groups["optimisation"].add_argument
    add("--epochs", type=number(int, at_least=1), help=f"epochs to train {recipe('epochs')}")
    add("--opt", choices=["sgd", "sgd_nesterov", "adamw", "rmsprop"], help=f"optimizer {recipe('opt')}")
    add("--lr", type=number(float, at_least=0), help=f"peak learning rate for the whole run's batch {recipe('lr')}")
    add("--head-lr", type=number(float, at_least=0),
        help="learning rate of the classifier head (default: --lr); for fine-tuning")
    add("--momentum", type=number(float, at_least=0), default=0.9, help="SGD/RMSprop momentum (default: 0.9)")
    add("--wd", "--weight-decay", type=number(float, at_least=0), default=1e-4, dest="weight_decay",
        help="weight decay (default: 1e-4)")
    add("--norm-weight-decay", type=number(float, at_least=0),
        help="weight decay of normalisation layers (default: --wd)")
    add("--label-smoothing", type=number(float, at_least=0, at_most=1), default=0.0,
        help="label smoothing of the cross-entropy loss (default: 0)")
    add("--lr-scheduler", choices=["steplr", "cosineannealinglr", "exponentiallr"],
        help=f"schedule after warmup, stepped every optimizer step {recipe('lr_scheduler')}")
    add("--lr-step-size", type=number(int, at_least=1), default=30, help="StepLR: epochs between decays (default: 30)")
    add("--lr-gamma", type=number(float, above=0), default=0.1,
        help="StepLR/ExponentialLR: decay factor per step size / epoch (default: 0.1)")
    add("--lr-min", type=number(float, at_least=0), default=0.0,
        help="CosineAnnealingLR: final learning rate (default: 0)")

    groups["precision and speed"].add_argument("--grad-checkpointing", action="store_true",
                                               help="recompute stage activations in backward to save memory")
    groups["checkpoints and preemption"].add_argument(
        "--test-only", action="store_true", help="only evaluate --resume (and its EMA) or --weights on val")
    return p


# A resume must keep these: the checkpoint's LR schedule and data order were laid out for them, and its optimizer
# state belongs to --opt. The global batch must match as a product; processes x -b x --accum-steps may change.
SCHEDULE_ARGS = ("opt", "epochs", "lr", "head_lr", "lr_scheduler", "lr_step_size", "lr_gamma", "lr_min",
                 "lr_warmup_epochs", "lr_warmup_method", "lr_warmup_decay", "seed", "ra_sampler", "ra_reps",
                 "balanced_sampler", "class_weights", "freeze_backbone")
# What --test-only --resume takes from the checkpoint unless given: the model and the validation images.
TRAINED_SETTINGS = ("model", "data_path", "train_crop_size", "val_resize_size", "val_crop_size", "interpolation",
                    "synthetic_val_size", "synthetic_classes", "train_list", "val_list", "classes_file")


def finish_args(args):
    Checkpointer.resolve_resume(args, TRAINED_SETTINGS)  # args.resume_from: the checkpoint, or None
    if args.data_path is None and (args.train_list or args.val_list or args.classes_file):
        args.data_path = ""  # list files of absolute paths: real data, not the synthetic set
    for name, value in {**DEFAULTS, **(SYNTHETIC_DEFAULTS if args.data_path is None else REAL_DATA_DEFAULTS)}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.start_epoch >= args.epochs and not (args.resume or args.test_only):
        raise UserError(f"--start-epoch {args.start_epoch} is not below --epochs {args.epochs}: nothing would be "
                        "trained")
    if args.data_path is not None and args.val_crop_size > args.val_resize_size:
        raise UserError(f"--val-crop-size {args.val_crop_size} is larger than --val-resize-size "
                        f"{args.val_resize_size}: the centre crop would pad validation images with black; crop at "
                        "most the resized size")
    if args.test_only and not (args.resume or args.weights):
        raise UserError("--test-only evaluates a trained model: give --resume PATH or --weights NAME")
    if args.freeze_backbone and not args.weights:
        raise UserError("--freeze-backbone trains the head alone on pretrained layers: give --weights")
    if args.balanced_sampler and args.class_weights == "balanced":
        raise UserError("--balanced-sampler and --class-weights balanced together favour rare classes twice: use one")
    if args.compile and args.grad_checkpointing:
        raise UserError("--grad-checkpointing and --compile together fail in the compiled backward on CUDA: use one "
                        "of them")
    for name in ("train_crop_scale", "train_crop_ratio"):
        low, high = getattr(args, name)
        if low > high or (name == "train_crop_scale" and high > 1):
            raise UserError(f"--{name.replace('_', '-')} {low:g} {high:g}: give MIN <= MAX"
                            f"{', and an area fraction of at most 1' if name == 'train_crop_scale' else ''}")
    if args.list_cache and os.path.exists(args.list_cache) and not os.path.isdir(args.list_cache):
        raise UserError(f"--list-cache {args.list_cache} is a file: give a folder for the listing of the tree (it is "
                        "made if missing)")
    if args.data_path is None and (args.auto_augment or args.random_erase or args.train_crop_scale != [0.08, 1.0]):
        print0("note: the synthetic set has its own augmentation; --auto-augment, --random-erase and "
               "--train-crop-scale/-ratio apply to --data-path only")
    return args


def validate(model, val_loader, class_names, precision, name, guards=None):
    """(summary, meter) of one evaluation; (None, None) when a stop signal came during it."""
    meter = ClassificationMeter(len(class_names), precision.device)
    if evaluate(model, val_loader, meter, precision, guards) is None:
        return None, None
    summary = meter.summary()
    print0(f"{name}: top-1 {summary['acc1']:.3f}  top-5 {summary['acc5']:.3f}  macro F1 {summary['macro_f1']:.3f}  "
           f"balanced acc {summary['balanced_acc']:.3f}  on {summary['num_samples']} images")
    return summary, meter


def validate_both(parts, val_loader, class_names, name, guards):
    """(numbers of the model and of its EMA weights, the model's meter); (None, None) on a stop."""
    val, meter = validate(parts.model, val_loader, class_names, parts.precision, f"{name} val", guards)
    if val is None:
        return None, None
    record = {f"val_{key}": value for key, value in val.items()}
    if parts.ema is not None:
        ema, _ = validate(parts.ema, val_loader, class_names, parts.precision, f"{name} EMA val", guards)
        if ema is None:
            return None, None
        record.update({f"val_ema_{key}": value for key, value in ema.items()})
    return record, meter


def test_only(model, val_loader, class_names, precision, args):
    """Evaluate --resume (and its EMA weights) or --weights."""
    ema = None
    if args.resume_from:
        ema = Checkpointer.load_for_evaluation(args.resume_from, model, args.model, class_names)
    validate(model, val_loader, class_names, precision, "Test")
    if ema is not None:
        model.load_state_dict(ema)
        validate(model, val_loader, class_names, precision, "Test EMA")


def main(args):
    env, device = init_distributed(args.device, args.dist_timeout, args.dist_backend, args.sync_bn)
    args.world_size = env.world_size
    layout = BatchLayout.planned(env, args.batch_size, args.accum_steps, args.global_batch)
    args.accum_steps = layout.accum_steps
    log = RunLog(env, device)
    precision = Precision(device, args.amp, args.amp_dtype, args.channels_last)
    precision.configure_kernels(args.use_deterministic_algorithms)  # process-wide: cuDNN autotuning, TF32, determinism
    torch.manual_seed(args.seed)  # the weights' initialisation

    class_names = dataset_classes(args)
    val_loader = load_val(args, env, device, class_names)  # before the long work: val/ problems show now
    model, head = create_model(args.model, args.weights, len(class_names), args.freeze_backbone,
                               args.grad_checkpointing)
    model.to(device, memory_format=precision.memory_format)
    if args.test_only:
        test_only(model, val_loader, class_names, precision, args)
        return

    log.lock_output_dir(args.output_dir, vars(args))  # before anything is read from the output folder or written to it
    if log.writer is not None:  # imported at the start, as the provenance says of all the code that runs
        from classification.pictures import log_pictures
    bad_samples = bad_sample_budget(args.max_bad_samples, args.output_dir)  # None at 0: a bad file stops the run
    train_loader = load_train(args, layout, device, class_names, bad_samples)
    steps_per_epoch = train_loader.sampler.steps_per_epoch
    print0(f"{args.model}, {sum(p.numel() for p in model.parameters()):,} parameters; {len(train_loader.dataset)} "
           f"training and {len(val_loader.dataset)} validation images, {len(class_names)} classes; effective batch "
           f"{args.batch_size} x {args.accum_steps} accumulation x {env.world_size} processes = {layout.global_batch}")
    model_ema = None
    if args.model_ema:
        from common.ema import EMA  # only with --model-ema
        model_ema = EMA(model, args.model_ema_decay, args.model_ema_steps, layout.global_batch, args.epochs,
                        args.lr_warmup_epochs)
    optimizer, lr_scheduler = create_optimizer_and_scheduler(args, model, head, device.type, steps_per_epoch,
                                                             args.epochs * steps_per_epoch)
    model = data_parallel(model, env, device, args.sync_bn)
    if args.compile:
        model.compile()  # in place: the state dict keeps its keys
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    if args.class_weights != "none":
        from common.class_weights import weighted_cross_entropy  # only with the flag
        criterion = weighted_cross_entropy(args.class_weights, class_names, train_loader.sampler.dataset,
                                           args.label_smoothing).to(device)
    parts = StepParts(model, criterion, optimizer, lr_scheduler, precision.grad_scaler(optimizer), precision,
                      args.clip_grad_norm, model_ema)
    checkpointer = Checkpointer(parts, args.output_dir, env.is_main, flags=vars(args), score=("best_acc1", "top-1"),
                                layout=layout, keep=args.keep_checkpoints, bad_samples=bad_samples,
                                provenance=log.provenance, class_names=class_names, steps_per_epoch=steps_per_epoch)
    args.start_epoch, start_step = checkpointer.resume(args.resume_from, args.model, SCHEDULE_ARGS)

    progress = log.progress(args.print_freq)
    guards = install_run_guards(device, env.rank, parts.scaler, args.output_dir, args.max_nonfinite_steps,
                                args.stall_timeout)
    by = "step" if args.eval_interval else "epoch"  # what log.jsonl's lines and TensorBoard's scalars follow
    total_steps, first_step = args.epochs * steps_per_epoch, args.start_epoch * steps_per_epoch + start_step
    epoch, done = args.start_epoch, start_step  # where the last step left the run: `done` steps into `epoch`
    # Saved by a stop signal at a pause (during its validation, or at the step before): the resumed run finishes
    # that pause before any step.
    epoch_end, validates = (pause_after(first_step, steps_per_epoch, total_steps, args.eval_interval)
                            if start_step > 0 and not checkpointer.validated else (False, False))
    batches = None
    for step in range(first_step, total_steps + 1):  # each pass: the pause the last step ended in, then a step
        if epoch_end or validates:
            batches, record = None, {"epoch": epoch, "step": step, **progress.summary(optimizer.param_groups[0]["lr"])}
            if validates:
                name = f"Epoch {epoch}" if by == "epoch" else f"Epoch {epoch} step {done}"
                val, meter = validate_both(parts, val_loader, class_names, name, guards)
                if val is None:  # a stop signal during validation: saved now, the validation reruns on resume
                    checkpointer.save_on_all_ranks(epoch, done)
                    guards.preemption.exit()
                record.update(val)
                checkpointer.save_validated_on_all_ranks(epoch, record.get("val_ema_acc1", val["val_acc1"]),
                                                         None if epoch_end else done, meter.confusion.matrix)
            else:  # an epoch's end between validations (--eval-interval)
                checkpointer.save_on_all_ranks(epoch)
            log.record(record, by)
            if validates and log.writer is not None:  # after the record: a resume does not redo this pause
                log_pictures(log.writer, model, guards.watchdog.beating(val_loader), meter, class_names, precision,
                             record[by])
        if step == total_steps:
            break
        epoch, in_epoch = divmod(step, steps_per_epoch)
        if batches is None:  # an epoch's start, or the restart after a validation inside it, as a resume starts
            model.train()
            progress.start_epoch(epoch, in_epoch, steps_per_epoch)
            batches = progress.timed(training_batches(train_loader, epoch, in_epoch, args.seed, env.rank))
        loss, grad_norm = train_step(parts, batches, layout, args.seed, epoch, in_epoch)
        done, (epoch_end, validates) = in_epoch + 1, pause_after(step + 1, steps_per_epoch, total_steps,
                                                                 args.eval_interval)
        printed = progress.log(in_epoch, loss, grad_norm, optimizer.param_groups[0]["lr"], last=validates)
        checkpoint_due = args.checkpoint_interval and done % args.checkpoint_interval == 0
        if guards.stop_requested(loss, grad_norm, epoch, in_epoch, sync_point=printed or checkpoint_due):
            progress.stop(in_epoch, guards.preemption.received or "another rank")
            checkpointer.save_on_all_ranks(epoch, done)
            guards.preemption.exit()  # the same command with --resume auto goes on from this checkpoint
        if checkpoint_due and not (epoch_end or validates):  # the pause, next, saves anyway
            checkpointer.save_on_all_ranks(epoch, done)
    guards.watchdog.stop()
    best = "none (no epoch evaluated)" if checkpointer.best is None else f"{checkpointer.best:.3f}"
    log.end(f"best top-1 {best}{' (EMA)' if model_ema is not None else ''}")


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    run_cli(lambda a: main(finish_args(a)), args)
