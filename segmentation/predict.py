"""Predict the class of every pixel of unlabelled images with a checkpoint of segmentation/train.py: for each image,
OUTPUT_DIR/masks/NAME.png (the class indices, a palette PNG in the classes' colours, of the image's size) and
OUTPUT_DIR/overlays/NAME.jpg (the colours over the image), NAME the image's path under the inputs' common folder.

    python segmentation/predict.py --checkpoint runs/cs/best.pth photos/ --output-dir predictions/
    python segmentation/predict.py --checkpoint best.pth scan.tif -o out/ --base-size 0 --eval-mode slide
    torchrun --nproc_per_node=4 segmentation/predict.py --checkpoint best.pth --list tiles.txt -o out/ --amp

An image is predicted as eval.py predicts a validation image: its shorter side resized to the checkpoint's
--base-size (0: as it is), then whole or in sliding windows, over --eval-scales and flips, the class scores
upsampled back to the image's size. Only the model's input goes to the device, a window or the image at one
scale; the sums over windows, scales and flips stay on the CPU. Sliding windows at one scale keep there only
the rows that windows still to come reach, so a 6000x4000 scan needs no more than a band of them. Under
torchrun each rank predicts its share of the images.
"""
import argparse
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms.v2.functional import pil_to_tensor

from common.checkpoint import load_checkpoint
from common.distributed import from_rank0, init_distributed
from common.engine import Precision
from common.flags import number
from common.log import UserError, run_cli
from common.output_dir import check_destination
from common.prediction import (ImageInputs, Progress, add_input_args, find_images, gathered, input_loader,
                               report_unreadable, settings_from_training)
from segmentation.data import dataset_info, val_transform
from segmentation.datasets import voc_colour
from segmentation.eval import FROM_TRAINING, model_from_checkpoint
from segmentation.inference import add_eval_args, predictor_from_args, window_starts

# Class scores are upsampled to the image's size all at once, as eval.py does, up to this size (19 classes at
# 14 megapixels); beyond it one class at a time, which may round the last bit of a score otherwise.
UPSAMPLE_AT_ONCE_BYTES = 2**30
NO_MASK = torch.zeros(0, dtype=torch.uint8)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by segmentation/train.py (best.pth, ...)")
    p.add_argument("--base-size", type=number(int, at_least=0),
                   help="shorter side each image is resized to for prediction (default: the checkpoint's; 0: the "
                   "image's own)")
    add_eval_args(p)  # --eval-crop's default: the checkpoint's --crop-size
    add_input_args(p, workers=4)
    return p


class OnDevice(nn.Module):
    """The model on the device, called with tensors on the CPU: its input goes to the device, its class scores come
    back as float32."""

    def __init__(self, model, precision):
        super().__init__()
        self.model, self.precision = model, precision
        self.size_divisor = getattr(model, "size_divisor", 1)  # UNet's, which the predictor pads to

    def forward(self, images):
        with self.precision.autocast:
            out = self.model(images.to(self.precision.device, memory_format=self.precision.memory_format))["out"]
        return {"out": out.float().cpu()}


def score_bands(predictor, image):
    """The class scores [1, C, rows, w] of image [1, 3, h, w], band after band from the top, as predictor(image)
    computes them. Sliding windows at one scale are summed in the order Predictor.slide sums them, but the sums
    kept are those of a window's height of rows: the rows above the next window's top are finished."""
    if predictor.mode != "slide" or predictor.scales != (1.0,) or predictor.flip:
        yield predictor(image)
        return
    (crop_h, crop_w), (stride_h, stride_w) = predictor.crop, predictor.stride
    height, width = image.shape[-2:]
    if height < crop_h or width < crop_w:  # small images: one window (a copy, which a large one need not take)
        image = F.pad(image, (0, max(crop_w - width, 0), 0, max(crop_h - height, 0)))
    full_h, full_w = image.shape[-2:]
    tops, lefts = window_starts(full_h, crop_h, stride_h), window_starts(full_w, crop_w, stride_w)
    rows, columns = torch.zeros(full_h), torch.zeros(full_w)  # windows over each row, each column
    for top in tops:
        rows[top:top + crop_h] += 1
    for left in lefts:
        columns[left:left + crop_w] += 1

    def finished(first, end):  # the mean scores of rows first .. end of the image
        end = min(end, height)
        return sums[..., :max(end - first, 0), :width] / (rows[first:end, None] * columns[:width])

    first, sums = 0, None  # sums: of rows first .. first + crop_h
    for top in tops:
        if top > first:
            yield finished(first, top)
            sums = torch.cat([sums[..., top - first:, :], sums.new_zeros(*sums.shape[:2], top - first, full_w)], -2)
            first = top
        for left in lefts:
            scores = predictor.whole(image[..., top:top + crop_h, left:left + crop_w])
            if sums is None:
                sums = scores.new_zeros(*scores.shape[:2], crop_h, full_w)
            sums[..., top - first:top - first + crop_h, left:left + crop_w] += scores
    yield finished(first, full_h)


def upsampled_argmax(scores, size):
    """uint8 [H, W]: the class of each pixel of scores [1, C, h, w] upsampled bilinearly to `size`."""
    if scores.shape[1] * size[0] * size[1] * 4 <= UPSAMPLE_AT_ONCE_BYTES:
        return F.interpolate(scores, size, mode="bilinear", align_corners=False).argmax(1)[0].to(torch.uint8)
    labels, best = torch.zeros(size, dtype=torch.uint8), None
    for c in range(scores.shape[1]):
        upsampled = F.interpolate(scores[:, c:c + 1], size, mode="bilinear", align_corners=False)[0, 0]
        if best is not None:
            labels[upsampled > best] = c  # strictly: of equal scores argmax takes the first class
            upsampled = torch.maximum(best, upsampled)
        best = upsampled
    return labels


def predict_labels(predictor, image, base_size):
    """uint8 class indices [H, W] of a uint8 image [3, H, W], as eval.py scores a validation image."""
    size = image.shape[-2:]
    resized = val_transform(image, NO_MASK, base_size or min(size))[0][None]
    if resized.shape[-2:] == size:
        return torch.cat([scores.argmax(1).to(torch.uint8) for scores in score_bands(predictor, resized)], dim=1)[0]
    return upsampled_argmax(torch.cat(list(score_bands(predictor, resized)), dim=-2), size)


def output_names(names):
    """Each image's name without its extension, or with it where two differ only by it (a.jpg, a.png)."""
    stems = [os.path.splitext(name)[0] for name in names]
    counts = Counter(stems)
    return [name if counts[stem] > 1 else stem for name, stem in zip(names, stems)]


def write_prediction(output_dir, name, image, labels, palette):
    mask = Image.fromarray(labels.numpy())
    mask.putpalette([c for colour in palette for c in colour])  # an L image with a palette becomes a P image
    overlay = Image.blend(Image.fromarray(image.permute(1, 2, 0).numpy()), mask.convert("RGB"), 0.5)
    for picture, path in ((mask, os.path.join(output_dir, "masks", f"{name}.png")),
                          (overlay, os.path.join(output_dir, "overlays", f"{name}.jpg"))):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        picture.save(path, quality=90)


def main(args):
    check_destination("--output-dir", args.output_dir, folder=True)
    checkpoint = load_checkpoint(args.checkpoint)
    trained = checkpoint.get("args") or {}
    if "train_crop_size" in trained and "dataset" not in trained:  # else an 'unknown --model resnet50'
        raise UserError(f"{args.checkpoint} was written by classification/train.py: use classification/predict.py for "
                        "it")
    settings_from_training(args, trained, FROM_TRAINING, "segmentation/train.py")
    env, device = init_distributed(args.device)
    # One listing: the same images on all ranks.
    images = from_rank0(lambda: find_images(args.inputs, args.lists, args.output_dir))
    precision = Precision(device, args.amp, args.amp_dtype, args.channels_last)
    precision.configure_kernels()  # process-wide: cuDNN autotuning, TF32
    class_names = checkpoint.get("class_names") or dataset_info(args)[0]
    if len(class_names) > 255:
        raise UserError(f"{args.checkpoint} predicts {len(class_names)} classes: an 8-bit mask holds 255 (0 to 254)")
    palette = checkpoint.get("palette") or [voc_colour(i) for i in range(len(class_names))]
    model = model_from_checkpoint(checkpoint, args, len(class_names)).to(device, memory_format=precision.memory_format)
    predictor = predictor_from_args(OnDevice(model, precision), args).eval()

    paths, names = [path for path, _ in images], output_names([name for _, name in images])
    loader = input_loader(ImageInputs(paths, pil_to_tensor, args.base_size or None), env, device, 1, args.workers)
    progress = Progress(len(loader.sampler), args.print_freq, env.world_size)
    written, unreadable = [], []
    with torch.inference_mode():
        for indices, batch, errors in loader:  # one image a batch: their sizes differ
            unreadable += [(paths[i], why) for i, why in errors]
            for index, image in zip(indices, batch if batch is not None else []):
                write_prediction(args.output_dir, names[index], image, predict_labels(predictor, image,
                                                                                      args.base_size), palette)
                written.append(index)
            progress.step(len(indices) + len(errors))
    written, unreadable = gathered(written), gathered(unreadable)
    if env.is_main:
        report_unreadable(args.output_dir, unreadable, len(written), os.path.join(args.output_dir, "{masks,overlays}"))


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
