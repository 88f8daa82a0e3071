"""A confusion matrix drawn as a picture, for TensorBoard and eval.py --confusion-png."""
from PIL import Image, ImageDraw


def confusion_matrix_image(matrix, class_names=None, cell=None):
    """Row-normalised confusion matrix as a Pillow image: white = 0, dark blue = all of the row."""
    n = matrix.shape[0]
    cell = cell or max(1, min(24, 960 // n))
    labelled = class_names is not None and cell >= 12
    margin = 90 if labelled else 0
    rows = matrix.double() / matrix.sum(1, keepdim=True).clamp(min=1)
    image = Image.new("RGB", (margin + n * cell, margin + n * cell), "white")
    draw = ImageDraw.Draw(image)
    for i in range(n):
        for j in range(n):
            v = float(rows[i, j])
            if v > 0:
                colour = (int(255 * (1 - v)), int(255 * (1 - 0.8 * v)), 255 - int(100 * v))
                x, y = margin + j * cell, margin + i * cell
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour)
    if labelled:  # true classes down the left, predicted classes across the top
        for i, name in enumerate(class_names):
            draw.text((2, margin + i * cell + cell // 4), str(name)[:14], fill="black")
            draw.text((margin + i * cell + 1, 2 + (i % 6) * 14), str(name)[:3], fill="black")
    return image
