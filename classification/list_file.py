"""Classification from list files (--train-list, --val-list): a CSV of `path,label` rows, as labelling tools export
it, read into the same FileList that a class-folder tree gives, so that ImageFiles, the samplers and both data
backends take it unchanged. Paths are relative to --data-path, or absolute (then --data-path may be left out).

    path,label
    line1/0001.png,good
    "line2/a,b.png",scratch

Imported only when a list flag is given."""
import csv
import functools
import io
import json
import os
import stat
import time
from typing import NamedTuple

import numpy as np

from classification.data import FileList, ImageFiles, PathArray, in_threads
from classification.list_cache import MTIME_SLACK_NS
from common.data import reason, shown
from common.distributed import from_rank0
from common.log import UserError, print0

HEADER = ["path", "label"]
CACHE_FORMAT = 1


class ListRows(NamedTuple):
    """A list file read: its rows as a FileList (classes: the list's own labels, sorted) and each row's line."""
    files: FileList
    lines: np.ndarray


def list_class_names(args):
    """Class names in label order: --classes-file's, else the sorted labels of --train-list."""
    if not (args.train_list and args.val_list):
        raise UserError("--train-list and --val-list go together (and --classes-file with them): give both, each a "
                        "CSV of path,label rows")
    if args.classes_file:
        names, source = read_classes_file(args.classes_file), f"--classes-file {shown(args.classes_file)} names"
    else:
        rows, *_ = read_list(args.train_list, args.data_path or "", list_cache_path(args, "train"))
        names, source = rows.files.classes, f"list file {shown(args.train_list)} has"
    if len(names) < 2:  # one class is always right: "100% top-1" that means nothing
        raise UserError(f"{source} {len(names)} class{'es' * (len(names) != 1)} ({', '.join(map(shown, names))}): a "
                        "classifier needs at least 2: label images of another class too")
    return list(names)


def read_classes_file(path):
    """--classes-file: one class name a line, in label order."""
    lines = read_text(path, "classes file", "one class name a line").splitlines()
    names, first_line = [], {}
    for number, line in enumerate(lines, 1):
        name = line.strip()
        if not name:
            if any(rest.strip() for rest in lines[number:]):  # trailing blank lines are fine
                raise UserError(f"classes file {shown(path)} line {number} is empty: one class name a line; delete "
                                "the line")
            break
        if name in first_line:
            raise UserError(f"classes file {shown(path)} names {shown(name)} twice (lines {first_line[name]} and "
                            f"{number}): each class once; delete line {number}")
        first_line[name] = number
        names.append(name)
    return names


def read_text(path, what, form):
    """A UTF-8 file's text (a byte-order mark dropped); a decoding error names its line."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"cannot read {what} {shown(path)} ({reason(e)}): check the path") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"cannot read {what} {shown(path)} (line {line}: {reason(e)}): it must be UTF-8 text, "
                        f"{form}") from None


def list_cache_path(args, split):
    cache_dir = getattr(args, "list_cache", None) or getattr(args, "output_dir", None)
    return os.path.join(cache_dir, f"file_list_{split}_list.npz") if cache_dir else None


def list_key(csv_path, root):
    """What the cache of a list file is kept under: an edited file changes its size, mtime or ctime, a replaced one
    its inode (and ctime), a moved --data-path the root its relative paths start from."""
    try:
        info = os.stat(csv_path)
    except OSError as e:
        raise UserError(f"cannot read list file {shown(csv_path)} ({reason(e)}): check the path") from None
    return (os.path.realpath(csv_path), os.path.abspath(root) if root else "", info.st_size, info.st_mtime_ns,
            info.st_ino, info.st_ctime_ns)


def read_list(csv_path, root, cache=None):
    """(ListRows, their list_key, whether they came from the `cache` file) of a list file."""
    key = list_key(csv_path, root)  # before the file is read: a change while it is read shows next time
    cached = read_cache(cache, key) if cache else None
    return (cached, key, True) if cached is not None else (parse_rows(csv_path, root, key), key, False)


@functools.lru_cache(maxsize=2)  # training reads the train list for its class names, then for its images
def parse_rows(csv_path, root, key):
    """Every row of a list file checked (columns, empty fields, relative paths without a root, repeats); its files
    are not: see check_files. `key`: the file's list_key, so that a changed file is read again."""
    text = read_text(csv_path, "list file", "a CSV of path,label rows")
    where = f"list file {shown(csv_path)}"
    reader = csv.reader(io.StringIO(text, newline=""))  # quoted fields may hold commas and line ends
    header = next(reader, None)
    if [field.strip().lower() for field in header or []] != HEADER:  # Path,Label as some tools write it
        shown_header = "empty" if header is None else f"{shown(','.join(header))}"
        raise UserError(f"{where} line 1 is {shown_header}, not the header path,label: make the first line "
                        "path,label, then one row per image")
    paths, labels, lines, first_line = [], [], [], {}
    for row in reader:
        number = reader.line_num
        if not any(field.strip() for field in row):  # a blank line, or a spreadsheet's empty row
            continue
        if len(row) != 2:
            fields = f"{len(row)} field{'s' * (len(row) != 1)}"
            raise UserError(f"{where} line {number} has {fields}, not 2 (path,label): quote a path that holds a "
                            'comma, as in "a,b.png",dent')
        path, label = row[0], row[1].strip()
        if not path.strip() or not label:
            raise UserError(f"{where} line {number} has an empty {'path' if label else 'label'}: give each image "
                            "its path and class name, or delete the line")
        if not root and not os.path.isabs(path):
            raise UserError(f"{where} line {number}: {shown(path)} is a relative path, and there is no --data-path "
                            "for it to start from: give --data-path, or absolute paths")
        full = os.path.normpath(os.path.join(root, path))
        if full in first_line:
            raise UserError(f"{where} names {shown(path)} twice (lines {first_line[full]} and {number}): a repeated "
                            f"image counts several times in training and accuracy; delete line {number}")
        first_line[full] = number
        paths.append(os.fsencode(path))
        labels.append(label)
        lines.append(number)
    if not paths:
        raise UserError(f"{where} lists no images: add path,label rows below its header")
    names = sorted(set(labels))
    index = {name: i for i, name in enumerate(names)}
    class_index = np.fromiter((index[label] for label in labels), np.int32, len(labels))
    return ListRows(FileList(root, names, PathArray.of(paths), class_index), np.array(lines, np.int64))


def check_labels(rows, csv_path, class_names):
    """Every label of the list is one of `class_names` (the train list's, --classes-file's or a checkpoint's)."""
    known = set(class_names)
    unknown = [k for k, name in enumerate(rows.files.classes) if name not in known]
    if unknown:
        first = int(np.isin(rows.files.class_index, unknown).argmax())
        label = rows.files.classes[rows.files.class_index[first]]
        listed = f"{', '.join(map(shown, class_names[:5]))}{' ...' if len(class_names) > 5 else ''}"
        raise UserError(f"list file {shown(csv_path)} line {rows.lines[first]}: label {shown(label)} is not one of the "
                        f"{len(class_names)} classes the model is trained on ({listed}): correct the label, or add "
                        "images of that class to the train list (or the class to --classes-file)")


def check_files(rows, csv_path):
    """Each row's file is a regular file (one stat each, in threads: what costs on a network file system)."""
    files = rows.files

    def check(i):
        path = os.path.join(files.root, os.fsdecode(files.paths[i]))
        try:
            if stat.S_ISREG(os.stat(path).st_mode):
                return
            problem = "is not a regular file"
        except FileNotFoundError:
            problem = "does not exist"
        except OSError as e:
            problem = f"cannot be read ({reason(e)})"
        start = f" (relative paths start at --data-path {shown(files.root)})" if files.root else ""
        raise UserError(f"list file {shown(csv_path)} line {rows.lines[i]}: image {shown(path)} {problem}: correct "
                        f"the path{start} or delete the line")
    in_threads(check, range(len(files.paths)))


def read_cache(path, key):
    """The ListRows kept for this list file under `key`, or None."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in f.files}
        header = json.loads(arrays["header"].tobytes())
        if header["format"] != CACHE_FORMAT or header["key"] != list(key):
            return None
        return ListRows(FileList(header["root"], header["classes"], PathArray(arrays["paths"], arrays["offsets"]),
                                 arrays["class_index"]), arrays["lines"])
    except Exception as e:
        print0(f"note: the list cache {shown(path)} cannot be read ({reason(e)}): reading the list file again")
        return None


def write_cache(path, key, rows):
    files = rows.files
    header = {"format": CACHE_FORMAT, "key": list(key), "root": files.root, "classes": files.classes}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{path}.tmp.{os.getpid()}", "wb") as f:  # written whole, then renamed: never read half-written
            np.savez(f, header=np.frombuffer(json.dumps(header).encode(), np.uint8), paths=files.paths.data,
                     offsets=files.paths.offsets, class_index=files.class_index, lines=rows.lines)
        os.replace(f"{path}.tmp.{os.getpid()}", path)
    except OSError as e:
        raise UserError(f"cannot write the list cache {shown(path)} ({reason(e)}): give --list-cache a writable "
                        "folder") from None


def checked_list(csv_path, root, class_names, cache=None):
    """The FileList of a list file, its labels and files checked. The cache keeps the rows read and checked: a
    start with the list file unchanged neither parses it nor stats its files again (a million round trips on a
    network file system). A file deleted since is then found when read, as a bad sample (--max-bad-samples)."""
    started, listed_at_ns = time.perf_counter(), time.time_ns()
    rows, key, cached = read_list(csv_path, root, cache)
    check_labels(rows, csv_path, class_names)
    if not cached:
        check_files(rows, csv_path)
        # A file changed within its timestamp's granularity (1-2 s on FAT and some network file systems) may change
        # again with its size and times unmoved: it is cached once it is older.
        if cache and key[3] < listed_at_ns - MTIME_SLACK_NS:
            write_cache(cache, key, rows)
    source = f"from {shown(cache)}" if cached else "read, every file checked"
    print0(f"{shown(csv_path)}: {len(rows.files.paths):,} images of {len(rows.files.classes)} classes ({source}) in "
           f"{time.perf_counter() - started:.2f} s")
    return rows.files


def image_list(args, split, class_names, transform=None, resize_shorter_side=None):
    """The ImageFiles of --train-list or --val-list (`split`), read by rank 0 and sent to the others."""
    csv_path = getattr(args, f"{split}_list")
    files = from_rank0(lambda: checked_list(csv_path, args.data_path or "", class_names, list_cache_path(args, split)))
    return ImageFiles(files, class_names, transform, resize_shorter_side)
