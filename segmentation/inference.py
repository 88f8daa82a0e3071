"""Evaluation inference: whole image or sliding window, optionally over several scales and flips."""
import argparse

import torch
import torch.nn.functional as F
from torch import nn

from common.engine import evaluate
from common.flags import number
from common.log import UserError, print0
from common.metrics import SegmentationMeter

class Predictor(nn.Module):
    """Logits at the images' size; with test-time augmentation, probabilities averaged over scales and flips
    (logits of different scales are not comparable)."""

    def __init__(self, model, mode="whole", crop=None, stride=None, scales=(1.0,), flip=False):
        super().__init__()
        if mode == "slide" and not (crop and stride):
            raise ValueError("slide mode needs a crop and a stride")
        self.model, self.mode, self.crop, self.stride = model, mode, crop, stride
        self.scales, self.flip = tuple(scales), flip

    def forward(self, images):
        size = images.shape[-2:]
        views = [(scale, flipped) for scale in self.scales for flipped in ((False, True) if self.flip else (False,))]
        if views == [(1.0, False)]:
            return self.predict(images)
        total = 0
        for scale, flipped in views:
            x = images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear",
                                                           align_corners=False)
            scores = self.predict(x.flip(-1) if flipped else x)
            scores = scores.flip(-1) if flipped else scores
            total = total + F.interpolate(scores.float(), size=size, mode="bilinear", align_corners=False).softmax(1)
        return total / len(views)

    def predict(self, images):
        return self.slide(images) if self.mode == "slide" else self.whole(images)

    def whole(self, images):
        """Zero-padded to what the model can take (UNet: multiples of 16)."""
        height, width = images.shape[-2:]
        divisor = getattr(self.model, "size_divisor", 1)
        return self.model(F.pad(images, (0, -width % divisor, 0, -height % divisor)))["out"][..., :height, :width]

    def slide(self, images):
        (crop_h, crop_w), (stride_h, stride_w) = self.crop, self.stride
        height, width = images.shape[-2:]
        images = F.pad(images, (0, max(crop_w - width, 0), 0, max(crop_h - height, 0)))  # small images: one window
        full_h, full_w = images.shape[-2:]
        total, count = None, torch.zeros(1, 1, full_h, full_w, device=images.device)
        for top in window_starts(full_h, crop_h, stride_h):
            for left in window_starts(full_w, crop_w, stride_w):
                logits = self.whole(images[..., top:top + crop_h, left:left + crop_w]).float()
                if total is None:
                    total = logits.new_zeros(*logits.shape[:2], full_h, full_w)
                total[..., top:top + crop_h, left:left + crop_w] += logits
                count[..., top:top + crop_h, left:left + crop_w] += 1
        return (total / count)[..., :height, :width]


def window_starts(length, window, stride):
    """Every `stride` along `length` (at least a window), the last ending at the edge."""
    return sorted({*range(0, length - window, stride), length - window})


def add_eval_args(parser):
    add = parser.add_argument
    add("--eval-mode", choices=["whole", "slide"], default="whole",
        help="predict the whole image at once, or windows of --eval-crop every --eval-stride pixels")
    add("--eval-crop", type=number(int, at_least=1), nargs="+", metavar="PX",
        help="slide window: H [W] (default: --crop-size)")
    add("--eval-stride", type=number(int, at_least=1), nargs="+", metavar="PX",
        help="slide step: H [W] (default: 2/3 of the window)")
    add("--eval-scales", default="1.0", type=eval_scales,
        help="comma-separated input scales averaged at test time, e.g. 0.5,0.75,1.0,1.25,1.5,1.75 (default: 1.0)")
    add("--eval-flip", action="store_true", help="also average the horizontally flipped input")


def eval_scales(text):
    """Each scale once: a typo such as 1,5 for 1.5 repeats 1."""
    try:
        scales = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers such as 0.75,1.0,1.25, got {text}") from None
    if any(not 0 < scale <= 4 for scale in scales):
        raise argparse.ArgumentTypeError(f"scales must be above 0 and at most 4, got {text}")
    if len(set(scales)) < len(scales):
        raise argparse.ArgumentTypeError(f"lists a scale twice in {text}: is a decimal point written as a comma?")
    return text


def predictor_from_args(model, args):
    crop = tuple(args.eval_crop or args.crop_size) * 2
    stride = tuple(args.eval_stride) * 2 if args.eval_stride else tuple(max(1, 2 * c // 3) for c in crop)
    if args.eval_mode == "slide" and any(s > c for s, c in zip(stride[:2], crop[:2])):
        raise UserError(f"--eval-stride {stride[0]} {stride[1]} is larger than the window --eval-crop {crop[0]} "
                        f"{crop[1]}: windows would leave pixels unseen; use a stride up to the window")
    return Predictor(model, args.eval_mode, crop[:2], stride[:2], [float(s) for s in args.eval_scales.split(",")],
                     args.eval_flip)


def validate(model, val_loader, class_names, precision, args, name, guards=None):
    """(summary, meter); (None, None) when a stop signal came during it."""
    meter = SegmentationMeter(len(class_names), precision.device, args.ignore_index)
    if evaluate(predictor_from_args(model, args), val_loader, meter, precision, guards) is None:
        return None, None
    summary = meter.summary()
    print0(f"{name}: mIoU {summary['miou']:.2f}  mean Dice {summary['mean_dice']:.2f}  pixel acc "
           f"{summary['pixel_acc']:.2f}  mean acc {summary['mean_acc']:.2f}  on {summary['num_images']} images")
    return summary, meter
