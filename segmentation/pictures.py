"""A segmentation run's validation in TensorBoard, written only with --output-dir: each class's IoU and Dice, and
a few validation images beside their labels and predictions."""
import itertools

import torch
import torch.nn.functional as F

from common.data import MEAN, STD
from segmentation.inference import predictor_from_args

EXAMPLE_HEIGHT = 192  # pixels of a TensorBoard example at least: the synthetic set's 48 are too few


@torch.inference_mode()
def log_validation(writer, summary, class_names, model, val_loader, palette, precision, args, step):
    """TensorBoard: each class's IoU and Dice (every per_class_* list of the summary), and input | label |
    prediction of the first four validation images."""
    for key, values in summary.items():
        for name, value in zip(class_names, values if key.startswith("per_class_") else []):
            if value is not None:
                writer.add_scalar(f"val_{key.removeprefix('per_class_')}/{name}", value, step)
    predictor = predictor_from_args(getattr(model, "module", model), args).eval()
    colours = torch.tensor(palette + [(255, 255, 255)] * (256 - len(palette)), dtype=torch.uint8,
                           device=precision.device)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    examples = itertools.islice(((image, target) for images, targets in val_loader  # read as they are shown
                                 for image, target in zip(images, targets)), 4)
    for i, (image, target) in enumerate(examples):
        image, target = precision.to_device((image[None], target[None]))
        with precision.autocast:
            scores = predictor(image)
        predicted = F.interpolate(scores.float(), target.shape[-2:], mode="bilinear").argmax(1)
        picture = F.interpolate(image.float().cpu() * std + mean, target.shape[-2:])
        picture, gap = (picture[0].clamp(0, 1) * 255).to(torch.uint8), torch.full((3, len(target[0]), 2), 255)
        row = torch.cat([picture, gap, colours[target[0]].permute(2, 0, 1).cpu(), gap,
                         colours[predicted[0]].permute(2, 0, 1).cpu()], dim=2).to(torch.uint8)
        zoom = -(-EXAMPLE_HEIGHT // row.shape[1])  # small images in blocks of zoom x zoom pixels
        writer.add_image(f"val_examples/{i}", row.repeat_interleave(zoom, 1).repeat_interleave(zoom, 2), step)
