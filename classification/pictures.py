"""Pictures of a classifier's validation, for TensorBoard and eval.py --confusion-png: the confusion matrix, and a
grid of predictions."""
import itertools

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.v2.functional import pil_to_tensor

from common.checkpoint import unwrap
from common.data import MEAN, STD

TITLE, LONGEST = 14, 28  # pixels of the axis titles' band; characters of a class name at most


def confusion_matrix_image(matrix, class_names=None, cell=None):
    """Row-normalised confusion matrix as a Pillow image, white = 0, dark blue = all of the row; the counts when
    the cells are large enough to read, and the class names, whole up to LONGEST characters."""
    n, font = matrix.shape[0], ImageFont.load_default()
    cell = cell or max(1, min(40, 960 // n))
    names = [name if len(name) <= LONGEST else name[:LONGEST - 2] + ".." for name in map(str, class_names or [])]
    margin = TITLE + 6 + int(max(map(font.getlength, names))) if cell >= 12 and names else 0
    rows = matrix.double() / matrix.sum(1, keepdim=True).clamp(min=1)
    colours = torch.stack([255 * (1 - rows), 255 * (1 - 0.8 * rows), 255 - 100 * rows], -1).to(torch.uint8).numpy()
    image = Image.new("RGB", (margin + n * cell,) * 2, "white")
    image.paste(Image.fromarray(colours).resize((n * cell,) * 2, Image.Resampling.NEAREST), (margin, margin))
    draw = ImageDraw.Draw(image)
    for i, j in itertools.product(range(n), repeat=2) if margin else ():
        count = str(int(matrix[i, j]))
        if font.getlength(count) + 4 <= cell:
            colour = "white" if rows[i, j] > 0.5 else "black"
            draw.text((margin + j * cell + 2, margin + i * cell + cell // 2 - 5), count, fill=colour, font=font)
    if margin:
        draw_axes(image, draw, names, cell, margin, font)
    return image


def draw_axes(image, draw, names, cell, margin, font):
    """Each class name beside its row, and above its column written across a band turned to read upwards, as the
    rows' title is."""
    middle = (cell - sum(font.getbbox("Ag")[1::2])) // 2
    columns = Image.new("RGB", (margin - TITLE, len(names) * cell), "white")
    for i, name in enumerate(names):
        draw.text((margin - 3 - int(font.getlength(name)), margin + i * cell + middle), name, fill="black", font=font)
        ImageDraw.Draw(columns).text((3, i * cell + middle), name, fill="black", font=font)
    title = Image.new("RGB", (columns.height, TITLE), "white")
    ImageDraw.Draw(title).text((title.width // 2 - 25, 1), "true class", fill="black", font=font)
    draw.text((margin, 1), "predicted class", fill="black", font=font)
    image.paste(title.rotate(90, expand=True), (0, margin))
    image.paste(columns.rotate(90, expand=True), (margin, TITLE))


def prediction_grid(images, targets, predicted, confidence, class_names, tile=128, columns=4):
    """A grid of validation pictures (uint8 [N, 3, H, W]) with their true and predicted classes, wrong in red."""
    band = 26  # two lines of the default font under each picture
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * tile, rows * (tile + band)), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = (i % columns) * tile, (i // columns) * (tile + band)
        picture = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((tile, tile), Image.Resampling.BILINEAR)
        grid.paste(picture, (x, y))
        right = int(predicted[i]) == int(targets[i])
        draw.text((x + 2, y + tile + 1), f"true {str(class_names[targets[i]])[:16]}", fill="black")
        predicted_line = f"pred {str(class_names[predicted[i]])[:12]} {100 * float(confidence[i]):.0f}%"
        draw.text((x + 2, y + tile + 13), predicted_line, fill=(0, 120, 0) if right else (200, 0, 0))
    return grid


def wrong_first(targets, predicted, confidence):
    """Indices of the wrong predictions, then of the right ones, each by falling confidence."""
    right = (predicted == targets).double()
    return torch.argsort(right * 2 - confidence.double(), stable=True)  # wrong: -conf in [-1, 0); right: [1, 2)


@torch.inference_mode()
def log_pictures(writer, model, val_loader, meter, class_names, precision, step, count=16):
    """TensorBoard: the confusion matrix of `meter`, and the first validation batches' pictures (the same ones each
    time), the most confidently wrong first."""
    picture = confusion_matrix_image(meter.confusion.matrix.cpu(), class_names)
    writer.add_image("val/confusion_matrix", pil_to_tensor(picture), step)
    model = unwrap(model).eval()
    images, targets, probabilities = [], [], []
    for batch in val_loader:
        batch_images, batch_targets = precision.to_device(batch)
        with precision.autocast:
            probabilities.append(model(batch_images).float().softmax(1).cpu())
        images.append(batch_images.float().cpu())
        targets.append(batch_targets.cpu())
        if sum(len(t) for t in targets) >= 4 * count:
            break
    images, targets, probabilities = torch.cat(images), torch.cat(targets), torch.cat(probabilities)
    confidence, predicted = probabilities.max(1)
    shown = wrong_first(targets, predicted, confidence)[:count]
    pictures = (images[shown] * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1))
    pictures = (pictures.clamp(0, 1) * 255).round().to(torch.uint8)
    grid = prediction_grid(pictures, targets[shown], predicted[shown], confidence[shown], class_names)
    writer.add_image("val/predictions", pil_to_tensor(grid), step)
