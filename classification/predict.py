"""Predict the classes of unlabelled images with a checkpoint of classification/train.py: OUTPUT_DIR/predictions.csv
holds each readable image's top-k classes and their probabilities, a row an image, by path.

    python classification/predict.py --checkpoint runs/r50/best.pth photos/ --output-dir predictions/
    python classification/predict.py --checkpoint best.pth --list todo.txt -o out/ --sort-into link
    torchrun --nproc_per_node=8 classification/predict.py --checkpoint best.pth /data/day1 -o out/ --amp

The model, its classes and the preprocessing (resize, centre crop, filter) come from the checkpoint, as for
eval.py; the classes are ranked as eval.py ranks them. Under torchrun each rank predicts its share of the
images and rank 0 writes the file.
"""
import argparse
import csv
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import torch

from classification.data import Crop, dataset_classes, val_preset
from classification.eval import FROM_TRAINING, check_task, check_val_crop, model_from_checkpoint
from common.checkpoint import load_checkpoint
from common.distributed import from_rank0, init_distributed
from common.engine import Precision
from common.flags import number
from common.log import run_cli
from common.output_dir import check_destination
from common.prediction import (ImageInputs, Progress, add_input_args, find_images, gathered, input_loader,
                               report_unreadable, settings_from_training)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--checkpoint", required=True, help="a checkpoint written by classification/train.py (best.pth, ...)")
    add("--use-ema", action="store_true", help="predict with the checkpoint's EMA weights")
    add("--topk", type=number(int, at_least=1), default=5,
        help="classes per image in the CSV, the likeliest first (default: 5, at most the model's classes)")
    add("--sort-into", choices=["copy", "link"],
        help="also copy each image (or symlink to it) into OUTPUT_DIR/<predicted class>/, for a quick look")
    add("-b", "--batch-size", type=number(int, at_least=1), default=64,
        help="images per process per step (default: 64)")
    add("--val-resize-size", type=number(int, at_least=1), help="resize of the shorter side (default: the checkpoint's)")
    add("--val-crop-size", type=number(int, at_least=1), help="centre crop (default: the checkpoint's)")
    add("--interpolation", choices=["nearest", "bilinear", "bicubic"], help="resize filter (default: the checkpoint's)")
    add_input_args(p, workers=8)
    return p


@torch.inference_mode()
def predict(model, loader, paths, class_names, k, precision, progress):
    """([(path, top-k class names, their probabilities)] of this rank's readable images, [(path, why)] of the
    others)"""
    rows, unreadable = [], []
    model.eval()
    for indices, batch, errors in loader:
        unreadable += [(paths[i], why) for i, why in errors]
        if batch is not None:
            with precision.autocast:
                batch = batch.to(precision.device, non_blocking=True, memory_format=precision.memory_format)
                logits = model(batch).float()
            # Ranked by the logits, as eval.py's top-1: a softmax could round two of them to one probability.
            top = logits.topk(k, dim=1).indices
            probabilities = logits.softmax(1).gather(1, top)
            rows += [(paths[i], [class_names[c] for c in classes], chances)
                     for i, classes, chances in zip(indices, top.tolist(), probabilities.tolist())]
        progress.step(len(indices) + len(errors))
    return rows, unreadable


def write_csv(path, rows, k):
    """Written whole, then renamed: a file at `path` is never half-written."""
    with open(f"{path}.tmp", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", *(f"{what}_{rank}" for rank in range(1, k + 1) for what in ("class", "probability"))])
        for image, classes, chances in rows:
            pairs = zip(classes, chances)
            writer.writerow([image, *(value for name, chance in pairs for value in (name, f"{chance:.6f}"))])
    os.replace(f"{path}.tmp", path)


SORTED_FOLDERS = ".sorted_folders"  # the class folders the last --sort-into wrote, one a line


def sort_into(output_dir, rows, names, how):
    """OUTPUT_DIR/<top class>/<name>: a copy of each image, or a symlink to it. The class folders an earlier run
    wrote are removed first: their images may belong to other classes now."""
    record = os.path.join(output_dir, SORTED_FOLDERS)
    if os.path.isfile(record):
        with open(record) as f:
            for folder in f.read().splitlines():
                shutil.rmtree(os.path.join(output_dir, folder), ignore_errors=True)
    folders = set()
    for image, classes, _ in rows:
        folder = classes[0].replace("/", "_").replace(os.sep, "_")  # a class name is no path out of OUTPUT_DIR
        folder = folder if folder.strip(".") else f"_{folder}"
        destination = os.path.join(output_dir, folder, names[image])
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        folders.add(folder)
        if how == "link":
            os.symlink(os.path.abspath(image), destination)
        else:
            shutil.copy2(image, destination)
    with open(record, "w") as f:
        f.writelines(f"{folder}\n" for folder in sorted(folders))


def main(args):
    check_destination("--output-dir", args.output_dir, folder=True)
    checkpoint = load_checkpoint(args.checkpoint)
    trained = checkpoint.get("args") or {}
    check_task(trained, args.checkpoint, "predict.py")
    if trained and trained.get("data_path") is None:  # the synthetic set's images are neither resized nor cropped
        size = trained["train_crop_size"]
        trained = {**trained, "val_resize_size": size, "val_crop_size": size}
    settings_from_training(args, trained, FROM_TRAINING, "classification/train.py")
    check_val_crop(args)
    env, device = init_distributed(args.device)
    # One listing: the same images on all ranks.
    images = from_rank0(lambda: find_images(args.inputs, args.lists, args.output_dir))
    precision = Precision(device, args.amp, args.amp_dtype, args.channels_last)
    precision.configure_kernels()  # process-wide: cuDNN autotuning, TF32
    class_names = checkpoint.get("class_names") or dataset_classes(args)
    model = model_from_checkpoint(checkpoint, args, len(class_names)).to(device, memory_format=precision.memory_format)

    paths = [path for path, _ in images]
    crop = Crop(False, args.val_crop_size, args.val_resize_size, interpolation=args.interpolation)
    loader = input_loader(ImageInputs(paths, val_preset(crop), crop.resize), env, device, args.batch_size,
                          args.workers)
    k = min(args.topk, len(class_names))
    progress = Progress(len(loader.sampler), args.print_freq, env.world_size)
    rows, unreadable = predict(model, loader, paths, class_names, k, precision, progress)
    rows, unreadable = gathered(rows), gathered(unreadable)
    if env.is_main:
        csv_path = os.path.join(args.output_dir, "predictions.csv")
        write_csv(csv_path, sorted(rows), k)
        if args.sort_into:
            sort_into(args.output_dir, rows, dict(images), args.sort_into)
        report_unreadable(args.output_dir, unreadable, len(rows), f"{csv_path} (top {k} classes)")


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
