"""The listing of a split folder kept between starts (--list-cache, or --output-dir): the next start lists again
only the class folders whose stamps moved."""
import json
import os

import numpy as np

from classification.data import ClassFiles, PathArray, folder_stamp
from common.data import reason, shown
from common.log import UserError, print0

# A folder changed less than this before it was listed may change again within its timestamp's granularity (FAT
# and some network file systems: 1-2 s) with its modification time unmoved: the cache lists it again next time.
MTIME_SLACK_NS = 2 * 10**9
CACHE_FORMAT = 2  # 2: folders keyed by inode number and change time too


def cache_path(cache_dir, split_dir):
    return os.path.join(cache_dir, f"file_list_{os.path.basename(os.path.normpath(split_dir))}.npz")


def read_cache(path, split_dir):
    """({class name: ClassFiles}, listing time) of this split folder's cache; ({}, None) when there is none."""
    if not os.path.isfile(path):
        return {}, None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {key: f[key] for key in f.files}
        header = json.loads(arrays["header"].tobytes())
        if header["format"] != CACHE_FORMAT or header["root"] != os.path.realpath(split_dir):
            return {}, None
        files = PathArray(arrays["file_paths"], arrays["file_offsets"])
        folders = PathArray(arrays["folder_paths"], arrays["folder_offsets"])
        file_starts = np.concatenate([[0], np.cumsum(arrays["files_per_class"])])
        folder_starts = np.concatenate([[0], np.cumsum(arrays["folders_per_class"])])
        stamps = list(zip(*(arrays[key].tolist() for key in ("folder_mtimes", "folder_inodes", "folder_ctimes"))))
        cached = {}
        for i, name in enumerate(header["classes"]):
            walked = range(folder_starts[i], folder_starts[i + 1])
            cached[name] = ClassFiles(files.part(file_starts[i], file_starts[i + 1]),
                                      [(folders[k], stamps[k]) for k in walked], header["hidden"][i],
                                      header["skipped"][i])
        return cached, header["listed_at_ns"]
    except Exception as e:
        print0(f"note: the file list cache {shown(path)} cannot be read ({reason(e)}): listing the tree again")
        return {}, None


def write_cache(path, split_dir, listed_at_ns, classes, listed):
    header = {"format": CACHE_FORMAT, "root": os.path.realpath(split_dir), "listed_at_ns": listed_at_ns,
              "classes": classes, "hidden": [c.hidden for c in listed], "skipped": [c.skipped for c in listed]}
    folders = [folder for c in listed for folder, _ in c.folders]
    folder_paths = PathArray.of(folders)
    mtimes, inodes, ctimes = zip(*(stamp for c in listed for _, stamp in c.folders)) if folders else ((), (), ())
    files = PathArray.joined([c.files for c in listed])
    arrays = dict(header=np.frombuffer(json.dumps(header).encode(), np.uint8), file_paths=files.data,
                  file_offsets=files.offsets, files_per_class=np.array([len(c.files) for c in listed], np.int64),
                  folder_paths=folder_paths.data, folder_offsets=folder_paths.offsets,
                  folder_mtimes=np.array(mtimes, np.int64), folder_inodes=np.array(inodes, np.uint64),
                  folder_ctimes=np.array(ctimes, np.int64),
                  folders_per_class=np.array([len(c.folders) for c in listed], np.int64))
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{path}.tmp.{os.getpid()}", "wb") as f:  # written whole, then renamed: never read half-written
            np.savez(f, **arrays)
        os.replace(f"{path}.tmp.{os.getpid()}", path)
    except OSError as e:
        raise UserError(f"cannot write the file list cache {shown(path)} ({reason(e)}): give --list-cache a "
                        "writable folder") from None


def unchanged(split_dir, cached, listed_at_ns):
    """Whether a cached class's folders are the ones listed, with the modification times they had well before the
    listing."""
    for relative, stamp in cached.folders:
        try:
            now = folder_stamp(os.stat(os.path.join(split_dir, os.fsdecode(relative))))
        except OSError:
            return False
        if now != stamp or stamp[0] >= listed_at_ns - MTIME_SLACK_NS:
            return False
    return True
