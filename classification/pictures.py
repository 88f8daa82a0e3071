"""Pictures of a classifier's validation, for TensorBoard and eval.py --confusion-png: the confusion matrix, and a
grid of predictions."""
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.v2.functional import pil_to_tensor

from common.checkpoint import unwrap
from common.data import MEAN, STD

TITLE = 14  # pixels of the axis titles' band
LONGEST = 160  # pixels of a class name at most: longer ones are cut


def confusion_matrix_image(matrix, class_names=None, cell=None):
    """Row-normalised confusion matrix as a Pillow image, white = 0, dark blue = all of the row; the counts when
    the cells are large enough to read, and the class names, whole up to LONGEST pixels."""
    n, font = matrix.shape[0], ImageFont.load_default()
    cell = cell or max(1, min(40, 960 // n))
    names = [fitted(str(name), font) for name in class_names] if class_names is not None and cell >= 12 else []
    margin = TITLE + 6 + int(max(map(font.getlength, names))) if names else 0
    rows = matrix.double() / matrix.sum(1, keepdim=True).clamp(min=1)
    image = Image.new("RGB", (margin + n * cell, margin + n * cell), "white")
    draw = ImageDraw.Draw(image)
    for i in range(n):
        for j in range(n):
            v, x, y = float(rows[i, j]), margin + j * cell, margin + i * cell
            if v > 0:
                colour = (int(255 * (1 - v)), int(255 * (1 - 0.8 * v)), 255 - int(100 * v))
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour)
            count = str(int(matrix[i, j]))
            if names and font.getlength(count) + 4 <= cell:
                draw.text((x + 2, y + cell // 2 - 5), count, fill="white" if v > 0.5 else "black", font=font)
    if names:
        draw_axes(image, draw, names, cell, margin, font)
    return image


def fitted(name, font):
    while font.getlength(name) > LONGEST:
        name = name[:-4] + "..."
    return name


def draw_axes(image, draw, names, cell, margin, font):
    """Each class name beside its row and above its column, there written across a band that is turned to read
    upwards (as is the title of the rows)."""
    top, bottom = font.getbbox("Ag")[1::2]
    draw.text((margin, 1), "predicted class", fill="black", font=font)
    title, columns = Image.new("RGB", (len(names) * cell, TITLE), "white"), Image.new(
        "RGB", (margin - TITLE, len(names) * cell), "white")
    ImageDraw.Draw(title).text(((title.width - font.getlength("true class")) // 2, 1), "true class", fill="black",
                               font=font)
    for i, name in enumerate(names):
        y = i * cell + (cell - top - bottom) // 2
        draw.text((margin - 3 - int(font.getlength(name)), margin + y), name, fill="black", font=font)
        ImageDraw.Draw(columns).text((3, y), name, fill="black", font=font)
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
