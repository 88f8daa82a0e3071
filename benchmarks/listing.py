"""The listing of an ImageNet-size tree, and what its samples cost DataLoader workers: issue 23's bars.

    python benchmarks/listing.py --data-dir /tmp/listing-tree --out listing.json    # writes the tree, then measures
    python benchmarks/listing.py --data-dir /tmp/listing-tree --remove-tree         # ... and deletes it after

The tree: `--files` hard links (1,281,167, ImageNet's train/) to one small valid JPEG in `--classes` class folders
(1,000), to a copy of it per class folder (ext4 caps the links to one inode at 65,000): the entries of ImageNet's
tree at the disk cost of a thousand small files. Written once, reused while its spec.json
matches. Each measurement runs in fresh processes (the page and dentry caches stay warm, which makes a first
listing faster than on a cold disk or a network file system, and so the ratio bar harder to meet):

- listing: classification.data.image_folder on train/, first start (no cache) and second start (the cache the
  first wrote), with 1 process and with 2 (gloo on CPU); its time, and the class folders each rank scanned;
- worker memory: the USS (Private_Clean + Private_Dirty of /proc/PID/smaps_rollup) of each of 2 DataLoader
  workers when it starts and after it has read samples[i] of every index between them (no decoding), for the
  arrays of classification/data.py and, for comparison, a Python list of (path, class) tuples as torchvision's
  ImageFolder holds them.

Bars: the second start's listing at most 10% of the first's; only rank 0 lists; worker USS grows by under 20 MB.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SPEC = dict(files=1_281_167, classes=1_000)


def write_tree(root, spec):
    """train/class0000/0000000.JPEG ... as hard links to a 64x48 JPEG; val/ holds one image per class."""
    import numpy as np
    from PIL import Image
    marker = os.path.join(root, "spec.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == spec:
                return 0.0
        shutil.rmtree(root)
    elif os.path.exists(root):
        raise SystemExit(f"{root} exists but was not written by this script: choose another --data-dir")
    started = time.perf_counter()
    os.makedirs(root)
    source = os.path.join(root, "source.jpg")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(source, quality=90)
    per_class = [spec["files"] // spec["classes"] + (c < spec["files"] % spec["classes"])
                 for c in range(spec["classes"])]

    def write_class(c):
        # A copy of the JPEG per class: ext4 caps the hard links to one inode at 65,000.
        copy = os.path.join(root, "sources", f"{c:04d}.jpg")
        shutil.copyfile(source, copy)
        for split, count in (("train", per_class[c]), ("val", 1)):
            folder = os.path.join(root, split, f"class{c:04d}")
            os.makedirs(folder)
            for i in range(count):
                os.link(copy, os.path.join(folder, f"{i:07d}.JPEG"))
    os.makedirs(os.path.join(root, "sources"))
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(write_class, range(spec["classes"])))
    with open(marker, "w") as f:
        json.dump(spec, f)
    return time.perf_counter() - started


# --- one process of a measurement (run as: listing.py --role listing|memory ...)


def listing_role(args):
    """Time image_folder on train/ in this process (rank `args.rank` of `args.world`), counting the folders it lists."""
    import torch.distributed as dist

    from classification.data import image_folder, list_classes
    from common.distributed import from_rank0
    if args.world > 1:
        dist.init_process_group("gloo", init_method=f"file://{args.store}", rank=args.rank, world_size=args.world)
    train_dir = os.path.join(args.data_dir, "train")
    scanned, real = [], os.scandir

    def counting(path="."):
        scanned.append(os.fspath(path))
        return real(path)
    os.scandir = counting
    started = time.perf_counter()
    classes = from_rank0(lambda: list_classes(train_dir))
    folder = image_folder(train_dir, classes, cache_dir=args.cache)
    seconds = time.perf_counter() - started
    class_folders = sum(os.path.dirname(os.path.normpath(path)) == os.path.normpath(train_dir) for path in scanned)
    print(json.dumps({"rank": args.rank, "seconds": seconds, "samples": len(folder),
                      "class_folders_scanned": class_folders}))
    if args.world > 1:
        dist.destroy_process_group()


def uss_mib(pid="self"):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return sum(int(fields[key].split()[0]) for key in ("Private_Clean", "Private_Dirty")) / 1024


class ReadEverySample:
    """Item None: this worker's pid and USS; item (first, last): read samples[first:last] (no decoding), then that."""

    def __init__(self, samples):
        self.samples = samples

    def __getitem__(self, item):
        if item is not None:
            for i in range(*item):
                path, target = self.samples[i]
        return os.getpid(), uss_mib()


def memory_role(args):
    """The USS of 2 DataLoader workers before and after reading every sample, for the arrays or a list of tuples."""
    import torch
    from torch.utils.data import DataLoader

    from classification.data import image_folder, list_classes
    train_dir = os.path.join(args.data_dir, "train")
    folder = image_folder(train_dir, list_classes(train_dir), cache_dir=args.cache)
    samples = folder.samples if args.kind == "arrays" else [folder.samples[i] for i in range(len(folder))]
    n, chunk = len(folder), 20_000
    # Item k goes to worker k % 2: each reports its USS, reads every other chunk, and reports again.
    items = [None, None] + [(first, min(first + chunk, n)) for first in range(0, n, chunk)]
    items += [None, None]
    loader = DataLoader(ReadEverySample(samples), batch_size=None, sampler=items, num_workers=2,
                        collate_fn=lambda item: item)
    torch.set_num_threads(1)
    seen = list(loader)
    workers = {}
    for pid, uss in seen:
        workers.setdefault(pid, []).append(uss)
    result = [{"pid": pid, "uss_start_mib": values[0], "uss_end_mib": values[-1],
               "growth_mib": values[-1] - values[0]} for pid, values in workers.items()]
    print(json.dumps({"kind": args.kind, "samples": n, "main_uss_mib": uss_mib(), "workers": result}))


# --- the whole benchmark


def run_role(args, role, **extra):
    command = [sys.executable, os.path.abspath(__file__), "--role", role, "--data-dir", args.data_dir]
    for key, value in extra.items():
        command += [f"--{key}", str(value)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def outcome(process):
    out, _ = process.communicate()
    if process.returncode:
        raise SystemExit(f"a measurement failed (status {process.returncode}):\n{out}")
    return json.loads(out.strip().splitlines()[-1])


def listing_rows(args, world):
    """First and second start with `world` processes, each rank's time and folders scanned."""
    cache = tempfile.mkdtemp(prefix="listing-cache-")
    try:
        rows = []
        for start in ("first", "second"):
            store = tempfile.mktemp(prefix="listing-store-")
            processes = [run_role(args, "listing", rank=rank, world=world, store=store, cache=cache)
                         for rank in range(world)]
            ranks = [outcome(p) for p in processes]
            if os.path.exists(store):  # the process group's file store
                os.remove(store)
            rows.append({"processes": world, "start": start, "seconds": max(r["seconds"] for r in ranks),
                         "ranks": ranks})
            print(f"listing, {world} process(es), {start} start: {rows[-1]['seconds']:.2f} s; class folders scanned "
                  f"by rank: {[r['class_folders_scanned'] for r in ranks]}", flush=True)
        return rows, cache
    except BaseException:
        shutil.rmtree(cache, ignore_errors=True)
        raise


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="where the tree is written (and kept, unless --remove-tree)")
    p.add_argument("--files", type=int, default=SPEC["files"])
    p.add_argument("--classes", type=int, default=SPEC["classes"])
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--remove-tree", action="store_true", help="delete the tree at the end")
    p.add_argument("--role", help=argparse.SUPPRESS)
    for hidden in ("rank", "world"):
        p.add_argument(f"--{hidden}", type=int, default=0 if hidden == "rank" else 1, help=argparse.SUPPRESS)
    for hidden in ("store", "cache", "kind"):
        p.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "listing":
        return listing_role(args)
    if args.role == "memory":
        return memory_role(args)

    spec = dict(files=args.files, classes=args.classes)
    written = write_tree(args.data_dir, spec)
    print(f"tree: {args.files:,} hard links in {args.classes:,} class folders at {args.data_dir}"
          + (f" (written in {written:.0f} s)" if written else " (reused)"), flush=True)
    results = {"date": time.strftime("%Y-%m-%d"), "machine": platform.node(), "cpus": os.cpu_count(),
               "python": platform.python_version(), "spec": spec, "listing": [], "memory": []}
    caches = []
    try:
        for world in (1, 2):
            rows, cache = listing_rows(args, world)
            results["listing"] += rows
            caches.append(cache)
        for kind in ("arrays", "list of tuples"):
            results["memory"].append(outcome(run_role(args, "memory", kind=kind, cache=caches[0])))
            growth = [w["growth_mib"] for w in results["memory"][-1]["workers"]]
            print(f"worker USS growth reading every sample, {kind}: {', '.join(f'{g:.1f}' for g in growth)} MiB",
                  flush=True)
    finally:
        for cache in caches:
            shutil.rmtree(cache, ignore_errors=True)
        if args.remove_tree:
            shutil.rmtree(args.data_dir, ignore_errors=True)

    listing = {(row["processes"], row["start"]): row for row in results["listing"]}
    ratio = max(listing[(w, "second")]["seconds"] / listing[(w, "first")]["seconds"] for w in (1, 2))
    rank1 = [r["class_folders_scanned"] for row in results["listing"] if row["processes"] == 2 for r in row["ranks"]
             if r["rank"] == 1]
    growth = max(w["growth_mib"] for w in results["memory"][0]["workers"])
    results["bars"] = {"second start / first start <= 10%": [ratio, ratio <= 0.10],
                       "class folders rank 1 lists == 0": [max(rank1), max(rank1) == 0],
                       "worker USS growth < 20 MB (arrays)": [growth, growth * 2**20 < 20e6]}
    for bar, (value, met) in results["bars"].items():
        print(f"{'met' if met else 'NOT met'}: {bar}: {value:.3g}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
