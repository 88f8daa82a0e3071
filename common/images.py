"""Reading image files of any mode Pillow knows into RGB, with one clear error for a broken file."""
import numpy as np
from PIL import Image

from common.log import UserError


def read_image(path, name=None):
    """Any Pillow-readable file as RGB: grayscale, RGBA, palette, CMYK, 16-bit, PNG named .jpg. `path` may
    also be a file object, called `name` in errors."""
    try:
        with Image.open(path) as image:
            if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit: keep the top 8 bits, not a clipped copy
                image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257).clip(0, 255).astype(np.uint8))
            return image.convert("RGB")
    except Exception as e:
        raise UserError(f"cannot read image {name or path} ({type(e).__name__}: {e}): "
                        "delete the file or replace it with a valid image") from None
