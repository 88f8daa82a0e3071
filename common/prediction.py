"""What classification/predict.py and segmentation/predict.py share: the images they read (folders searched
recursively, list files, single files), each named by its path under the inputs' common folder, so that two a.png
in different folders keep apart in the outputs; the readable ones loaded in this rank's share, the others listed
with the reason, never fatal; the settings a checkpoint gives; and what the ranks found, gathered on rank 0."""
import os
import time

import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, default_collate

from common.data import (IMAGE_EXTENSIONS, ShardedEvalSampler, default_workers, ignore_stop_signals, read_image,
                         reason, shown)
from common.flags import DEVICE_NAMES, device_name, number
from common.log import SampleError, UserError, in_process_group, print0

UNREADABLE = "unreadable.txt"


def add_input_args(parser, workers):
    """The inputs, the output folder and how to compute: the flags both predict scripts share."""
    group = parser.add_argument_group("images and outputs")
    group.add_argument("inputs", nargs="*", metavar="INPUT",
                       help="image files, or folders searched recursively for images (hidden files and folders, "
                       f"and files not named {', '.join(IMAGE_EXTENSIONS[:3])} ..., skipped)")
    group.add_argument("--list", action="append", default=[], metavar="FILE", dest="lists",
                       help="a UTF-8 text file naming one image a line, relative paths from the file's folder "
                       "(repeatable)")
    group.add_argument("-o", "--output-dir", required=True, help="where the predictions are written")
    group.add_argument("--print-freq", type=number(int, at_least=1), default=20,
                       help="a progress line every N batches (default: 20)")
    group = parser.add_argument_group("compute")
    group.add_argument("--device", type=device_name, help=f"{DEVICE_NAMES} (default: cuda when available)")
    group.add_argument("-j", "--workers", type=number(int, at_least=0), default=default_workers(workers),
                       help=f"DataLoader worker processes per rank, which read the images (default: "
                       f"{default_workers(workers)}, at most the cores)")
    group.add_argument("--amp", action="store_true", help="autocast (see --amp-dtype)")
    group.add_argument("--amp-dtype", choices=["float16", "bfloat16"],
                       help="autocast dtype (implies --amp; default float16)")
    group.add_argument("--channels-last", action="store_true", help="NHWC memory format")


def find_images(inputs, lists, output_dir=None):
    """[(path, name)] of the images to predict on, by path, each once; `name` is the path under the common folder
    of the inputs. Only what the user named is checked here: a list's entries that cannot be read are reported as
    they are met. An `output_dir` inside a folder searched is left out: a second run would predict on the first
    one's outputs."""
    if not inputs and not lists:
        raise UserError("give the images to predict on: image files, folders of images, or --list FILE")
    found, roots = {}, []
    for given in inputs:
        if os.path.isdir(given):
            paths, roots = images_under(given, output_dir), roots + [given]
            if not paths:
                raise UserError(f"folder {shown(given)} holds no images ({', '.join(IMAGE_EXTENSIONS)}): give "
                                "another folder, or name the files")
        elif os.path.lexists(given):  # anything else named is read, or reported if it cannot be
            paths, roots = [given], roots + [os.path.dirname(given)]
        else:
            raise UserError(f"{shown(given)} does not exist: give image files, folders of images, or --list FILE")
        for path in paths:
            found.setdefault(os.path.realpath(path), path)  # a file reached twice, through a link: the first path
    for list_file in lists:
        for path in listed(list_file):
            found.setdefault(os.path.realpath(path), path)
            roots.append(os.path.dirname(path))
    if not found:
        raise UserError(f"--list {' '.join(map(shown, lists))} names no images: give one image path a line")
    root = os.path.commonpath([os.path.abspath(folder) for folder in roots])
    return sorted((path, os.path.relpath(os.path.abspath(path), root)) for path in found.values())


def images_under(folder, leave_out=None):
    """The image files under `folder` and its subfolders (also those linked to), hidden ones and the folder
    `leave_out` left out; a note counts the other files."""
    def refuse(error):
        raise UserError(f"cannot list folder {shown(error.filename)} ({reason(error)}): fix its permissions or "
                        "remove it")

    images, others, seen = [], 0, {os.path.realpath(leave_out)} if leave_out else set()
    for parent, folders, files in os.walk(folder, onerror=refuse, followlinks=True):
        if os.path.realpath(parent) in seen:  # a link to a folder already searched, or a loop
            folders[:] = []
            continue
        seen.add(os.path.realpath(parent))
        folders[:] = sorted(name for name in folders if not name.startswith("."))  # links: the first path found
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                images.append(os.path.join(parent, name))
            else:
                others += not name.startswith(".")
    if others:
        print0(f"note: {others} files under {shown(folder)} are not named as images, skipped")
    return images


def listed(list_file):
    """The paths a list file names, one a line; blank lines skipped."""
    try:
        with open(list_file, encoding="utf-8-sig") as f:  # a byte-order mark is no part of the first path
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --list {shown(list_file)} ({reason(e)}): it must be UTF-8 text, one image "
                        "path a line") from None
    folder = os.path.dirname(list_file)
    return [os.path.join(folder, line.strip()) for line in lines if line.strip()]


def settings_from_training(args, trained, defaults, script):
    """Each of `defaults` that no flag gave: the training run's (`trained`, the checkpoint's args), else the
    default."""
    for name, default in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, trained.get(name, default))
    if not args.model:
        raise UserError(f"{args.checkpoint} does not say which model it holds: predict with a checkpoint written by "
                        f"{script}")


class ImageInputs(Dataset):
    """(index, transform(RGB image), None), or (index, None, why) when the file cannot be read."""

    def __init__(self, paths, transform, resize_shorter_side=None):
        self.paths, self.transform, self.resize_shorter_side = paths, transform, resize_shorter_side

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            image = read_image(self.paths[index], resize_shorter_side=self.resize_shorter_side)
        except SampleError as e:
            return index, None, str(e)
        return index, self.transform(image), None


def collate_readable(samples):
    """(indices of the readable images, their batch or None, [(index, why)] of the others)"""
    readable = [(index, image) for index, image, _ in samples if image is not None]
    indices = [index for index, _ in readable]
    batch = default_collate([image for _, image in readable]) if readable else None
    return indices, batch, [(index, why) for index, _, why in samples if why is not None]


def input_loader(dataset, env, device, batch_size, workers):
    """This rank's share of `dataset`: every image on exactly one rank."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                      sampler=ShardedEvalSampler(dataset, env.rank, env.world_size), collate_fn=collate_readable,
                      worker_init_fn=ignore_stop_signals)


class Progress:
    """A line every `print_freq` batches and at the end: this rank's images done and how fast."""

    def __init__(self, total, print_freq, world_size):
        self.total, self.print_freq, self.world_size = total, print_freq, world_size
        self.done = self.batches = 0
        self.start = time.perf_counter()

    def step(self, images):
        self.done, self.batches = self.done + images, self.batches + 1
        if self.batches % self.print_freq == 0 or self.done == self.total:
            rate = self.done / (time.perf_counter() - self.start)
            ranks = f" (rank 0 of {self.world_size}: about {rate * self.world_size:.3g} in all)" \
                if self.world_size > 1 else ""
            print0(f"[{self.done:>{len(str(self.total))}}/{self.total}]  img/s: {rate:.3g}{ranks}")


def gathered(items):
    """The lists `items` of every rank joined on rank 0 (the other ranks get theirs back)."""
    if not in_process_group() or dist.get_world_size() == 1:
        return items
    everything = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(items, everything, dst=0)
    return [item for part in everything for item in part] if dist.get_rank() == 0 else items


def report_unreadable(output_dir, unreadable, written, where):
    """On rank 0: OUTPUT_DIR/unreadable.txt (path, a tab, the reason; none left from an earlier run when all were
    read), and the closing line: how many images were predicted (to `where`) and how many skipped."""
    path = os.path.join(output_dir, UNREADABLE)
    if unreadable:
        with open(path, "w") as f:
            f.writelines(f"{shown(image)}\t{why}\n" for image, why in sorted(unreadable))
    elif os.path.exists(path):
        os.remove(path)
    skipped = f"; skipped {len(unreadable)} that could not be read, listed in {path}" if unreadable else ""
    print0(f"wrote the predictions of {written} images to {where}{skipped}")

