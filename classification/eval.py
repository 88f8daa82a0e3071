"""Evaluate a classifier: top-1, top-5, macro F1, balanced accuracy, per-class accuracy, precision, recall and F1,
and a confusion matrix, exact under torchrun.

    python classification/eval.py --checkpoint runs/r50/best.pth --data-path /data/imagenet --output-json r50.json
    python classification/eval.py --model resnet50 --weights IMAGENET1K_V2 --data-path /data/imagenet
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import torchvision

from classification.data import dataset_classes, load_val
from classification.model import create_model
from classification.pictures import confusion_matrix_image
from common.checkpoint import load_checkpoint, load_model_state, state_dict_from
from common.data import default_workers
from common.distributed import init_distributed
from common.engine import Precision, evaluate
from common.export import add_export_args, export_model, export_requested
from common.flags import DEVICE_NAMES, device_name, number
from common.log import UserError, print0, run_cli
from common.output_dir import check_destination
from common.metrics import ClassificationMeter, percent

# Settings of the training run that evaluation must repeat: flags of this script when given, else the
# checkpoint's training arguments, else these defaults. The synthetic_* entries and train_crop_size (the
# synthetic image size) have no flag here: they only select the same synthetic validation set.
FROM_TRAINING = dict(model=None, data_path=None, val_resize_size=256, val_crop_size=224, interpolation="bilinear",
                     train_crop_size=32, synthetic_val_size=1_000, synthetic_classes=10, val_list=None, train_list=None,
                     classes_file=None)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--checkpoint", help="a checkpoint written by train.py (checkpoint.pth, best.pth) or a bare state dict")
    add("--use-ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    add("--weights", help="instead of --checkpoint: a torchvision weights name such as IMAGENET1K_V2")
    add("--data-path", help="ImageFolder root whose val/ is evaluated, or where --val-list's relative paths start "
        "(default: the checkpoint's training data)")
    add("--val-list", help="a CSV of path,label rows to evaluate instead (default: the checkpoint's, if it has one)")
    add("--model", help="torchvision model name (default: the checkpoint's)")
    add("--device", type=device_name, help=f"{DEVICE_NAMES} (default: cuda when available)")
    add("-b", "--batch-size", type=number(int, at_least=1), default=64,
        help="images per process per step (default: 64)")
    add("-j", "--workers", type=number(int, at_least=0), default=default_workers(8),
        help=f"DataLoader worker processes per rank (default: {default_workers(8)}, at most the cores)")
    add("--amp", action="store_true", help="autocast (see --amp-dtype)")
    add("--amp-dtype", choices=["float16", "bfloat16"], help="autocast dtype (implies --amp; default float16)")
    add("--channels-last", action="store_true", help="NHWC memory format")
    add("--val-resize-size", type=number(int, at_least=1),
        help="resize of the shorter side (default: the checkpoint's or weights')")
    add("--val-crop-size", type=number(int, at_least=1), help="centre crop (default: the checkpoint's or the weights')")
    add("--interpolation", choices=["nearest", "bilinear", "bicubic"],
        help="resize filter (default: the checkpoint's or the weights')")
    add("--data-backend", default="pil", choices=["pil", "gpu"],
        help="pil: decode and resize in DataLoader workers; gpu: the device decodes and resizes whole batches "
        "(default: pil)")
    add("--output-json", help="write every number of the summary (acc1, acc5, macro_f1, balanced_acc, num_samples) "
        "and the per-class ones by class name (per_class_acc, per_class_precision, per_class_recall, per_class_f1)")
    add("--confusion-png", help="draw the confusion matrix into this PNG file")
    add_export_args(p)
    return p


def check_task(checkpoint_args, path, script):
    """A segmentation checkpoint given to a classification script would fail as an 'unknown --model'."""
    if "dataset" in checkpoint_args and "train_crop_size" not in checkpoint_args:
        raise UserError(f"{path} was written by segmentation/train.py: use segmentation/{script} for it")


def check_val_classes(args, class_names):
    """A checkpoint labels val/ by the class names it was trained with: val/ must hold no others."""
    unknown = sorted(set(dataset_classes(args, "val")) - set(class_names))
    if unknown:
        raise UserError(f"cannot evaluate {args.checkpoint} on {args.data_path}: its val/ has classes the checkpoint "
                        f"was not trained on ({', '.join(unknown[:5])}; it knows {class_names[:5]}"
                        f"{' ...' if len(class_names) > 5 else ''}). Evaluate it on the data it was trained on")


def check_val_crop(args):
    if args.val_crop_size > args.val_resize_size:
        raise UserError(f"--val-crop-size {args.val_crop_size} is larger than --val-resize-size "
                        f"{args.val_resize_size}: the centre crop would pad the images with black; crop at most the "
                        "resized size")


def model_from_checkpoint(checkpoint, args, num_classes):
    if args.use_ema and checkpoint.get("model_ema") is None:
        raise UserError(f"{args.checkpoint} holds no EMA weights: drop --use-ema")
    model, _ = create_model(args.model, None, num_classes)
    state = state_dict_from({"model": checkpoint["model_ema"]} if args.use_ema else checkpoint, args.checkpoint)
    load_model_state(model, state, args.checkpoint)
    return model


def weights_enum(model_name, weights):
    try:
        return torchvision.models.get_model_weights(model_name)[weights]
    except (KeyError, ValueError):
        raise UserError(f"--weights {weights!r} is not a torchvision weights name of --model {model_name}; "
                        "pass a file with --checkpoint") from None


def preprocessing_of(enum):
    """The resize, crop and filter that torchvision evaluated these weights with (232 for ResNet-50 V2)."""
    preset = enum.transforms()
    return {"val_resize_size": preset.resize_size[0], "val_crop_size": preset.crop_size[0],
            "interpolation": preset.interpolation.value}


def main(args):
    if bool(args.checkpoint) == bool(args.weights):
        raise UserError("give either --checkpoint PATH (from train.py) or --model NAME --weights NAME")
    if args.weights and not args.model:
        raise UserError("--weights needs --model, e.g. --model resnet50 --weights IMAGENET1K_V2")
    export = export_requested(args.export, args.export_path, args.export_triton)
    for flag, path in (("--output-json", args.output_json), ("--confusion-png", args.confusion_png)):
        if path:  # before the work, not after it
            check_destination(flag, path)
    checkpoint, trained = {}, {}
    if args.checkpoint:
        checkpoint = load_checkpoint(args.checkpoint)
        trained = checkpoint.get("args") or {}
        check_task(trained, args.checkpoint, "eval.py")
        if args.data_path is not None and args.val_list is None:  # a tree of its own: its val/, not the run's lists
            trained = {name: value for name, value in trained.items() if name not in ("train_list", "val_list")}
    else:
        trained = preprocessing_of(weights_enum(args.model, args.weights))
    for name, default in FROM_TRAINING.items():
        if getattr(args, name, None) is None:
            setattr(args, name, trained.get(name, default))
    if not args.model:
        raise UserError(f"{args.checkpoint} does not say which model it holds: give --model")
    check_val_crop(args)
    env, device = init_distributed(args.device)
    # TF32 and cuDNN's choice of kernels as in training
    precision = Precision(device, args.amp, args.amp_dtype, args.channels_last)
    precision.configure_kernels()  # process-wide: cuDNN autotuning, TF32

    if args.data_path is None and args.val_list:
        args.data_path = ""  # list files of absolute paths: real data, not the synthetic set
    # Labels by the checkpoint's class names when it has them, else as in training (a tree without train/: val/'s).
    class_names = checkpoint.get("class_names")
    if class_names is None:
        no_train = args.data_path and not os.path.isdir(os.path.join(args.data_path, "train"))
        class_names = dataset_classes(args, "val" if no_train and not args.val_list else "train")
    elif args.data_path and not args.val_list:
        check_val_classes(args, class_names)
    if args.weights:
        categories = weights_enum(args.model, args.weights).meta["categories"]
        if len(categories) != len(class_names):
            raise UserError(f"--weights {args.weights} predicts {len(categories)} classes, but the data has "
                            f"{len(class_names)}: evaluate a checkpoint fine-tuned on this data instead")
        model, _ = create_model(args.model, args.weights, len(class_names))
    else:
        model = model_from_checkpoint(checkpoint, args, len(class_names))
    model.to(device, memory_format=precision.memory_format)

    val_loader = load_val(args, env, device, class_names)
    if export:  # instead of evaluating
        if env.is_main:  # the first validation batch checks the export
            export_model(model, val_loader, args.export, args.export_path, args.export_rtol, args.export_triton,
                         args.model)
        return
    meter = ClassificationMeter(len(class_names), device)
    evaluate(model, val_loader, meter, precision)
    summary, confusion = meter.summary(), meter.confusion
    matrix = confusion.matrix.cpu().double()
    per_class = {"per_class_recall": percent(confusion.per_class_accuracy()),  # None: no images
                 "per_class_precision": percent((matrix.diag() / matrix.sum(0)).tolist()),  # None: never predicted
                 "per_class_f1": percent(confusion.f1())}
    counts = matrix.sum(1).long().tolist()
    width = max(len(name) for name in class_names)
    print0(f"{'class':<{width}}  {'images':>6}  recall (accuracy)  precision  {'F1':>7}")
    for name, count, *scores in zip(class_names, counts, *per_class.values()):
        if count:
            print0(f"{name:<{width}}  {count:>6}  " + "  ".join(
                f"{'-' if score is None else f'{score:.2f}':>{column}}" for score, column in zip(scores, (17, 9, 7))))
    print0(f"top-1 {summary['acc1']:.3f}  top-5 {summary['acc5']:.3f}  macro F1 {summary['macro_f1']:.3f}  "
           f"balanced acc {summary['balanced_acc']:.3f}  on {summary['num_samples']} images")
    if env.is_main and args.output_json:
        by_name = {key: dict(zip(class_names, values)) for key, values in per_class.items()}
        with open(args.output_json, "w") as f:  # every number of the summary by itself, and the per-class ones
            json.dump({**summary, "per_class_acc": by_name["per_class_recall"], **by_name}, f, indent=1)
    if env.is_main and args.confusion_png:
        confusion_matrix_image(meter.confusion.matrix.cpu(), class_names).save(args.confusion_png)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
