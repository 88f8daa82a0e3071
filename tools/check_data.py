"""Find every bad file of a data set before training: decode each image once (and for segmentation each mask, with
the checks training makes), on all cores, and report them all in one run with their counts per class or city.

    python tools/check_data.py --data-path /data/imagenet                        # an ImageFolder tree: train/, val/
    python tools/check_data.py --dataset cityscapes --data-path /data/cityscapes  # a segmentation layout
    python tools/check_data.py --data-path /data/parts --train-list train.csv --val-list val.csv  # list files

It takes the train scripts' data flags (--data-path, --dataset, --voc-aug, --classes-file, --binary-masks,
--train-list, --val-list, -j, --list-cache, --output-dir; any other flag of a training command is ignored, so that
command's flags can be pasted as they are). Exit status 0: every file is good; 1: bad files, each on a line
`bad: ...` naming it; 2: the layout itself is wrong (one `error:` line).
"""
import argparse
import bisect
import itertools
import multiprocessing
import os
import signal
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

from classification.data import list_split
from classification.list_file import check_labels, list_class_names, read_list
from common.flags import number
from common.data import read_image, shown
from common.log import SampleError, UserError, run_cli
from segmentation.data import DATASETS, open_split
from segmentation.datasets import check_same_size


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--data-path", help="the tree training reads: an ImageFolder root, or with --dataset its layout; with list "
        "files, where their relative paths start")
    add("--dataset", choices=sorted(DATASETS), help="segmentation: the layout of --data-path (default: an ImageFolder "
        "tree for classification)")
    add("--voc-aug", action="store_true", default=None, help="VOC: check the SBD augmented training set too")
    add("--classes-file", metavar="PATH", help="the classes, one a line in label order: a segmentation folder "
        "layout's (default: ROOT/classes.txt, else the masks' values), or the class names of --train-list")
    add("--binary-masks", action="store_true", help="folder layout: masks of 0 and 255 are background and foreground")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    add("-j", "--workers", type=number(int, at_least=0), default=cores,
        help=f"processes that decode (default: {cores}, every core; 0: this process alone)")
    add("--train-list", help="classification: a CSV of path,label rows, with --val-list, instead of class folders")
    add("--val-list", help="classification: the validation images' CSV of path,label rows")
    add("--list-cache", metavar="DIR", help="classification: read and refresh the train scripts' listing cache here")
    add("--output-dir", help="classification: the cache's default place, as in the train scripts")
    return p


class Samples:
    """The samples of a few splits, numbered one after the other: item k is sample k - start of its split. (No
    list of them: the workers would copy it, page by page, as they read it.)"""

    def __init__(self, splits, sizes):
        self.splits, self.starts = splits, [0, *itertools.accumulate(sizes)]

    def __len__(self):
        return self.starts[-1]

    def locate(self, item):
        """(split index, sample index) of an item."""
        split = bisect.bisect_right(self.starts, item) - 1
        return split, item - self.starts[split]

    def split_of(self, item):
        return self.splits[self.locate(item)[0]][0]


class ImageFolderCheck(Samples):
    """Each image of the train/ and val/ splits of an ImageFolder tree, or of --train-list and --val-list, decoded;
    grouped by class. `splits`: (split, FileList, each row's line in its list file or None, the list file)."""

    def __init__(self, splits, problems=()):
        self.problems = list(problems)
        super().__init__(splits, [len(files.paths) for _, files, *_ in splits])

    @classmethod
    def of_tree(cls, data_path, cache_dir):
        splits, problems = [], []
        for split in ("train", "val"):
            files, listed = list_split(os.path.join(data_path, split), cache_dir, strict=False)
            splits.append((split, files, None, None))
            for name, found in zip(files.classes, listed):  # names that are no regular file: reported, not read
                problems += [(split, name, str(error)) for error in found.not_files]
        return cls(splits, problems)

    @classmethod
    def of_lists(cls, args):
        """Every row checked as training checks it; its file, missing or not, is then decoded with the others."""
        class_names, splits = list_class_names(args), []
        for split in ("train", "val"):
            csv_path = getattr(args, f"{split}_list")
            rows, *_ = read_list(csv_path, args.data_path or "")
            check_labels(rows, csv_path, class_names)
            splits.append((split, rows.files, rows.lines, csv_path))
        return cls(splits)

    def group(self, item):
        split, index = self.locate(item)
        files = self.splits[split][1]
        return files.classes[files.class_index[index]]

    def check(self, item):
        split, index = self.locate(item)
        _, files, lines, csv_path = self.splits[split]
        try:
            read_image(os.path.join(files.root, os.fsdecode(files.paths[index])))
            return []
        except SampleError as e:
            return [str(e) if lines is None else f"list file {shown(csv_path)} line {lines[index]}: {e}"]


class SegmentationCheck(Samples):
    """Each image and mask of a segmentation layout's splits, read with training's checks (mask mode, values, the
    image's size); grouped by city for Cityscapes, else by split."""

    def __init__(self, name, data_path, flags):
        splits = [(split, open_split(name, data_path, split, flags))
                  for split in ("train_aug" if flags.get("voc_aug") else "train", "val")]
        super().__init__(splits, [len(dataset) for _, dataset in splits])
        self.by_city, self.problems = name == "cityscapes", []

    def group(self, item):
        split, index = self.locate(item)
        image = self.splits[split][1].files[index][0]
        return os.path.basename(os.path.dirname(image)) if self.by_city else self.splits[split][0]

    def check(self, item):
        split, index = self.locate(item)
        dataset = self.splits[split][1]
        (image_path, mask_path), errors, image, mask = dataset.files[index], [], None, None
        try:
            image = read_image(image_path)
        except SampleError as e:
            errors.append(str(e))
        try:
            mask = dataset.read_mask(index)
        except SampleError as e:
            errors.append(str(e))
        if image is not None and mask is not None:
            try:
                check_same_size(image, image_path, mask, mask_path)
            except SampleError as e:
                errors.append(str(e))
        return errors


_checker = None  # the check of each worker process, given once when it starts


def _start_worker(checker):
    global _checker
    _checker = checker


def _start_pool_worker(checker):
    # The pool ends its workers with SIGTERM: a stop handler forked from the parent (a run's) must not catch it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _start_worker(checker)


def _check_items(items):
    return [(item, error) for item in items for error in _checker.check(item)]


def check_all(checker, workers):
    """(item, error) of every bad file, in the checker's order."""
    chunks = [range(start, min(start + 64, len(checker))) for start in range(0, len(checker), 64)]
    if workers == 0:
        _start_worker(checker)
        return [bad for chunk in chunks for bad in _check_items(chunk)]
    # fork where there is one: the workers get the listing without copying it.
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with context.Pool(workers, initializer=_start_pool_worker, initargs=(checker,)) as pool:
        found = [bad for part in pool.imap_unordered(_check_items, chunks) for bad in part]
    return sorted(found)


def main(args):
    started = time.perf_counter()
    lists = args.train_list or args.val_list or args.classes_file
    if not args.data_path and (args.dataset or not lists):
        raise UserError("give --data-path: an ImageFolder tree, with --dataset a segmentation layout, or with "
                        "--train-list and --val-list where their relative paths start")
    if args.dataset:
        checker = SegmentationCheck(args.dataset, args.data_path, vars(args))
        what = "images and masks"
    elif lists:
        checker, what = ImageFolderCheck.of_lists(args), "images"
    else:
        checker, what = ImageFolderCheck.of_tree(args.data_path, args.list_cache or args.output_dir), "images"
    print(f"checking {len(checker):,} samples ({what}) with {args.workers or 1} processes", flush=True)
    bad = check_all(checker, args.workers)
    problems = checker.problems + [(checker.split_of(item), checker.group(item), error) for item, error in bad]
    for _, _, error in problems:
        print(f"bad: {error}")
    for s, (split, *_) in enumerate(checker.splits):
        total = checker.starts[s + 1] - checker.starts[s]
        counts = Counter(group for where, group, _ in problems if where == split)
        listed = ", ".join(f"{shown(group)} {count}" for group, count in sorted(counts.items()))
        print(f"{split}: {total:,} samples, {sum(counts.values())} bad files{f' ({listed})' if listed else ''}")
    took = f"in {time.perf_counter() - started:.1f} s"
    if problems:
        in_training = sum(where == checker.splits[0][0] for where, _, _ in problems)
        pairs = " (an image together with its mask)" if args.dataset else ""
        skip = (f"; training can instead skip the {in_training} of its split with --max-bad-samples {in_training}, "
                "validation stops on its own" if in_training else "")
        print(f"{len(problems)} bad files {took}: replace or delete each one{pairs}{skip}")
        raise SystemExit(1)
    print(f"every file is good {took}")


def parse_args(argv=None):
    """This tool's flags; a training command's other flags are ignored, in a note."""
    known, ignored = get_args_parser().parse_known_args(argv)
    if ignored:
        print(f"note: flags that do not choose the data are ignored: {' '.join(ignored)}")
    return known


if __name__ == "__main__":
    run_cli(main, parse_args())
