"""Evaluate a segmenter: mIoU, mean Dice, pixel and mean class accuracy, per-class IoU and Dice, exact under torchrun.

    python segmentation/eval.py --checkpoint runs/deeplab/best.pth --output-json scores.json
    python segmentation/eval.py --checkpoint best.pth --eval-scales 0.5,0.75,1.0,1.25,1.5,1.75 --eval-flip \\
        --save-predictions predictions/
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import torch
from PIL import Image

from common.checkpoint import load_checkpoint, load_model_state, state_dict_from
from common.data import default_workers
from common.distributed import init_distributed
from common.engine import Precision, evaluate
from common.export import add_export_args, export_model, export_requested
from common.flags import DEVICE_NAMES, device_name, number
from common.log import UserError, print0, run_cli
from common.output_dir import check_destination
from common.metrics import SegmentationMeter
from segmentation.data import dataset_info, load_val
from segmentation.data import DATASETS, IGNORE_INDEX
from segmentation.datasets import CITYSCAPES_LABEL_IDS
from segmentation.inference import add_eval_args, predictor_from_args
from segmentation.model import create_model

# Settings of the training run that evaluation repeats: this script's flags when given, else the
# checkpoint's training arguments, else these defaults. Those without a flag here only select the model
# or the same synthetic validation set.
FROM_TRAINING = dict(model=None, dataset=None, data_path=None, classes_file=None, binary_masks=False, base_size=None,
                     crop_size=None, output_stride=8, aux_loss=False, unet_width=64, synthetic_val_size=500,
                     synthetic_image_size=48, synthetic_classes=6)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--checkpoint", required=True, help="a checkpoint written by segmentation/train.py (best.pth, checkpoint.pth)")
    add("--data-path", help="dataset root (default: the checkpoint's training data)")
    add("--dataset", choices=sorted(DATASETS), help="layout of --data-path (default: the checkpoint's)")
    add("--classes-file", metavar="PATH", help="folder layout: its classes file (default: the checkpoint's)")
    add("--binary-masks", action="store_true", default=None,
        help="folder layout: masks of 0 and 255 are background and foreground (default: the checkpoint's)")
    add("--device", type=device_name, help=f"{DEVICE_NAMES} (default: cuda when available)")
    add("-b", "--batch-size", type=number(int, at_least=1), default=16,
        help="synthetic set: images per step (default: 16; real data: one)")
    add("-j", "--workers", type=number(int, at_least=0), default=default_workers(4),
        help=f"DataLoader worker processes per rank (default: {default_workers(4)}, at most the cores)")
    add("--amp", action="store_true", help="autocast (see --amp-dtype)")
    add("--amp-dtype", choices=["float16", "bfloat16"], help="autocast dtype (implies --amp; default float16)")
    add("--channels-last", action="store_true", help="NHWC memory format")
    add("--base-size", type=int, help="shorter side the input is resized to (default: the checkpoint's)")
    add("--ignore-index", type=int, default=IGNORE_INDEX, help="a label left out of the metrics, besides 255 (void)")
    add_eval_args(p)
    add("--output-json", help="write every number of the summary (miou, mean_dice, pixel_acc, mean_acc, num_images) "
        "and the per-class ones by class name (per_class_iou, per_class_dice) here")
    add("--save-predictions", metavar="DIR", help="write DIR/color/<name>.png (the dataset's palette, the colours "
        "of a folder's classes.txt) and, for "
        "Cityscapes, DIR/labelIds/<name>.png for the official evaluator (CITYSCAPES_RESULTS=DIR/labelIds; the "
        "README has the command)")
    add_export_args(p)
    return p


class PredictionWriter:
    """A SegmentationMeter that also writes every prediction it scores, named after its image."""

    def __init__(self, meter, names, out_dir, palette, dataset):
        self.meter, self.names = meter, iter(names)
        self.color_dir, self.palette = os.path.join(out_dir, "color"), [c for colour in palette for c in colour]
        self.label_ids = torch.tensor(CITYSCAPES_LABEL_IDS, dtype=torch.uint8) if dataset == "cityscapes" else None
        os.makedirs(self.color_dir, exist_ok=True)
        if self.label_ids is not None:
            os.makedirs(os.path.join(out_dir, "labelIds"), exist_ok=True)

    def update(self, logits, target):
        predicted = self.meter.update(logits, target)
        for labels in predicted.to(torch.uint8).cpu():
            name = next(self.names)
            picture = Image.fromarray(labels.numpy(), mode="P")
            picture.putpalette(self.palette)
            picture.save(os.path.join(self.color_dir, f"{name}.png"))
            if self.label_ids is not None:
                Image.fromarray(self.label_ids[labels.long()].numpy()).save(
                    os.path.join(os.path.dirname(self.color_dir), "labelIds", f"{name}.png"))
        return predicted

    def all_reduce(self):
        self.meter.all_reduce()

    def summary(self):
        return self.meter.summary()


def model_from_checkpoint(checkpoint, args, num_classes):
    model = create_model(args.model, num_classes, args.output_stride, args.aux_loss, None, args.unet_width)
    load_model_state(model, state_dict_from(checkpoint, args.checkpoint), args.checkpoint)
    return model


def main(args):
    export = export_requested(args.export, args.export_path, args.export_triton)
    if args.output_json:  # before the work, not after it
        check_destination("--output-json", args.output_json)
    if args.save_predictions:
        check_destination("--save-predictions", args.save_predictions, folder=True)
    checkpoint = load_checkpoint(args.checkpoint)
    trained = checkpoint.get("args") or {}
    for name, default in FROM_TRAINING.items():
        if getattr(args, name, None) is None:
            setattr(args, name, trained.get(name, default))
    if not args.model:
        raise UserError(f"{args.checkpoint} does not say which model it holds: evaluate a checkpoint written by "
                        "segmentation/train.py")
    if args.data_path is not None and args.dataset is None:
        raise UserError(f"--data-path needs --dataset to say its layout: one of {', '.join(sorted(DATASETS))}")
    if args.data_path is not None:  # sizes a checkpoint without them (another trainer's) is evaluated at
        layout = DATASETS[args.dataset]
        args.base_size, args.crop_size = args.base_size or layout.base_size, args.crop_size or layout.crop_size
    env, device = init_distributed(args.device)
    # TF32 and cuDNN's choice of kernels as in training
    precision = Precision(device, args.amp, args.amp_dtype, args.channels_last)
    precision.configure_kernels()  # process-wide: cuDNN autotuning, TF32

    class_names, palette = dataset_info(args)
    trained_classes = checkpoint.get("class_names") or class_names
    if len(trained_classes) != len(class_names):
        raise UserError(f"{args.checkpoint} predicts {len(trained_classes)} classes, but the data has "
                        f"{len(class_names)}: evaluate it on the dataset it was trained on")
    model = model_from_checkpoint(checkpoint, args, len(class_names))
    model.to(device, memory_format=precision.memory_format)

    val_loader = load_val(args, env, device)
    if export:  # instead of evaluating
        if env.is_main:  # the first validation batch checks the export; UNet takes multiples of 16
            export_model(model, val_loader, args.export, args.export_path, args.export_rtol, args.export_triton,
                         args.model, size_divisor=getattr(model, "size_divisor", 1))
        return
    meter = SegmentationMeter(len(class_names), device, args.ignore_index)
    if args.save_predictions:
        names = getattr(val_loader.dataset, "names", None) or [f"{i:06d}" for i in range(len(val_loader.dataset))]
        meter = PredictionWriter(meter, [names[i] for i in val_loader.sampler], args.save_predictions, palette,
                                 args.dataset if args.data_path else None)
    summary = evaluate(predictor_from_args(model, args), val_loader, meter, precision).summary()
    width = max(len(name) for name in class_names)
    print0(f"{'class':<{width}}  {'IoU':>6}  {'Dice':>6}")
    for name, *scores in zip(class_names, summary["per_class_iou"], summary["per_class_dice"]):
        print0(f"{name:<{width}}" + "".join(f"  {'-' if score is None else f'{score:.2f}':>6}" for score in scores))
    print0(f"mIoU {summary['miou']:.2f}  mean Dice {summary['mean_dice']:.2f}  pixel acc {summary['pixel_acc']:.2f}  "
           f"mean acc {summary['mean_acc']:.2f}  on {summary['num_images']} images "
           f"({args.eval_mode}, scales {args.eval_scales}{', flip' if args.eval_flip else ''})")
    if env.is_main and args.output_json:
        with open(args.output_json, "w") as f:  # every number by itself; per-class lists by class name
            json.dump({key: dict(zip(class_names, value)) if isinstance(value, list) else value
                       for key, value in summary.items()}, f, indent=1)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
