"""Reading image files of any mode Pillow knows into RGB, with one clear error for a broken file. Only regular
files are read (a FIFO would block, /dev/zero never end), and a name in an error is quoted when it holds a
character that would cut or hide in the one-line message."""
import io
import os
import stat

import numpy as np
import torch
from PIL import Image

from common.log import SampleError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as torchvision's weights expect
REPLACE_IMAGE = "delete the file or replace it with a valid image"


def replace_hint(what):
    return REPLACE_IMAGE if what == "image" else f"delete the file or replace it with a valid {what}"


def shown(text):
    """A path or name as an error shows it: as it is, or repr-quoted when it holds a character that would break
    or hide in the one-line message (a newline, a tab, a byte-order mark, an undecodable byte)."""
    text = os.fsdecode(text) if isinstance(text, bytes) else str(text)
    return text if text.isprintable() else repr(text)


def _kind(mode):
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


def not_a_file_error(path, what="image", mode=None):
    """The error for a listed file that is no regular file: a dangling symlink, a FIFO, a device, ... (a
    SampleError: when it is met in loading, only the rank that loads it knows)."""
    link = os.readlink(path) if os.path.islink(path) else None
    if link is not None and not os.path.exists(path):
        return SampleError(f"{what} {shown(path)} is a symlink to {shown(link)}, which does not exist: "
                           "fix the link or remove it")
    if mode is None:
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            return SampleError(f"cannot read {what} {shown(path)} ({reason(e)}): {replace_hint(what)}")
    kind = f"a symlink to {shown(link)}, {_kind(mode)}" if link is not None else _kind(mode)
    return SampleError(f"{what} {shown(path)} is {kind}, not a regular file: only regular files are read as "
                       f"{what}s; remove it or replace it with the {what} file")


def reason(e):
    """An exception as `Type: message` on one line (a message may hold a newline of its own)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _open_nonblocking(path, flags):
    # Opening a FIFO for reading would otherwise wait for a writer forever, before fstat can tell what it is.
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


def open_regular(path, what="image"):
    """(binary file object, size in bytes) of `path`, refused unless it is a regular file."""
    try:
        f = open(path, "rb", opener=_open_nonblocking)
    except OSError as e:
        if isinstance(e, FileNotFoundError) and os.path.islink(path):
            raise not_a_file_error(path, what) from None
        raise SampleError(f"cannot read {what} {shown(path)} ({reason(e)}): {replace_hint(what)}") from None
    info = os.fstat(f.fileno())
    if not stat.S_ISREG(info.st_mode):
        f.close()
        raise not_a_file_error(path, what, info.st_mode)
    return f, info.st_size


def read_file_bytes(path):
    """The bytes of an image file, refused unless it is a regular file, and never more than its size (a symlink
    to /dev/zero would otherwise read until memory runs out)."""
    f, size = open_regular(path)
    with f:
        try:
            data = f.read(size)
        except OSError as e:
            raise SampleError(f"cannot read image {shown(path)} ({reason(e)}): {REPLACE_IMAGE}") from None
    if not data:
        raise SampleError(f"cannot read image {shown(path)} (the file is empty): {REPLACE_IMAGE}")
    return data


def read_image(path, name=None, resize_shorter_side=None):
    """Any Pillow-readable file as RGB: grayscale, RGBA, palette, CMYK, 16-bit, PNG named .jpg. `path` may
    also be a file object, called `name` in errors. With `resize_shorter_side`, the size the preset will resize
    the image to is checked (check_resized_size) before the image is decoded."""
    source = path
    if isinstance(path, (str, bytes, os.PathLike)):
        source, _ = open_regular(path)
    try:
        with source, Image.open(source) as image:  # opening reads the header only
            check_resized_size(name or path, image.size, resize_shorter_side)
            if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit: keep the top 8 bits, not a clipped copy
                image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257).clip(0, 255).astype(np.uint8))
            return image.convert("RGB")
    except SampleError:
        raise
    except Exception as e:
        raise SampleError(f"cannot read image {shown(name or path)} ({reason(e)}): {REPLACE_IMAGE}") from None


MAX_RESIZED_PIXELS = 64_000_000  # 768 MB as float32 RGB; a photo of any usual shape stays far below


def check_resized_size(path, size, shorter_side):
    """Refuse an image (width, height) = `size` that resizing its shorter side to `shorter_side` would make
    larger than MAX_RESIZED_PIXELS: a 143-byte PNG of 20000x1 pixels becomes 256x5,120,000, gigabytes."""
    if shorter_side is None:
        return
    width, height = size
    resized = shorter_side * int(shorter_side * max(width, height) / max(min(width, height), 1))
    if resized > MAX_RESIZED_PIXELS:
        raise SampleError(f"image {shown(path)} is {width}x{height} pixels: resized to a shorter side of "
                          f"{shorter_side} it would take {resized / 1e6:,.0f} megapixels, more than the "
                          f"{MAX_RESIZED_PIXELS / 1e6:.0f} allowed: crop it to a usual shape, or remove it")


def check_encoded_size(path, data, shorter_side):
    """check_resized_size of an image's encoded bytes, from the size in its header (Pillow decodes nothing to
    open it); bytes Pillow cannot open are left to the decoder, which names the file."""
    if shorter_side is None:
        return
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
    except Exception:
        return
    check_resized_size(path, size, shorter_side)


class NormalizeBytes:
    """uint8 images [N, 3, H, W] to float32 normalised with MEAN and STD, on `device`."""

    def __init__(self, device):
        # Constants made once on the data's device: v2.Normalize builds them from Python lists on every call,
        # and on a GPU each such host-to-device copy waits for all queued work, a sync in every step.
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
        self.inv_std = 1 / (torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255)

    def __call__(self, images):
        return (images.float() - self.mean) * self.inv_std
