"""What a run tells the user: console lines from rank 0, one-line errors, log.jsonl, TensorBoard, pictures."""
import json
import os
import sys

import torch.distributed as dist
from PIL import Image, ImageDraw


class UserError(Exception):
    """A problem the user can fix (bad path, bad flag, bad file): reported in one line, without a traceback."""


def is_main_process():
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def print0(*args, **kwargs):
    if is_main_process():
        print(*args, **kwargs, flush=True)


def run_cli(main, args):
    """Run main(args); turn a UserError (also one raised in a DataLoader worker) into one line and exit 2."""
    try:
        main(args)
    except UserError as e:
        # A worker's error arrives with the worker's traceback in its text; the cause is its last line.
        message = str(e).strip().splitlines()[-1]
        message = message.split("UserError: ", 1)[-1]
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def tensorboard_writer(output_dir):
    """A SummaryWriter under <output_dir>/tb on rank 0, None elsewhere (or when nothing is to be written)."""
    if not output_dir or not is_main_process():
        return None
    from torch.utils.tensorboard import SummaryWriter  # imported late: it pulls in tensorboard

    return SummaryWriter(os.path.join(output_dir, "tb"))


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
