"""Classification data: ImageFolder trees (listed once, cached, checked), v2 presets, the synthetic set."""
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from common.data import (IMAGE_EXTENSIONS, MEAN, STD, BatchesThrough, NormalizeBytes, SeededSamples, ShardedEvalSampler,
                         TensorLoader, TrainingSampler, ignore_stop_signals, not_a_file_error, read_image, reason,
                         shown)
from common.distributed import from_rank0
from common.log import UserError, print0
from common.synthetic import SHAPES, contrasting_colours, noisy_backgrounds, shape_mask

LAYOUT_HINT = "--data-path must hold train/ and val/, each with one folder of images per class (ImageNet layout)"


def list_classes(split_dir):
    if not os.path.isdir(split_dir):
        raise UserError(f"split folder {shown(split_dir)} not found: {LAYOUT_HINT}")
    classes, hidden, loose = [], [], []
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if entry.name.startswith("."):
            hidden += [entry.name] if entry.is_dir() else []
        elif entry.is_dir():
            classes.append(entry.name)
        elif entry.is_symlink() and not os.path.exists(entry.path):
            # Dropping it would shift the label index of every class sorted after it.
            raise not_a_file_error(entry.path, "class folder")
        elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
            loose.append(entry.name)
    if hidden:
        print0(f"note: hidden folders are not classes, skipped in {shown(split_dir)}: {', '.join(map(shown, hidden))}")
    if loose:
        images = f"{shown(split_dir)} holds {len(loose)} image{'s' * (len(loose) > 1)}"
        if not classes and os.path.basename(os.path.normpath(split_dir)) == "val":  # ImageNet's val/ as shipped
            raise UserError(f"{images} and no class folders: sort them into class folders with: "
                            f"python tools/sort_imagenet_val.py {shown(split_dir)} LOC_val_solution.csv (the README "
                            "shows it with the devkit's labels too)")
        named = ", ".join(map(shown, loose[:5])) + (f" and {len(loose) - 5} more" if len(loose) > 5 else "")
        where = "and no class folders" if not classes else "beside its class folders"
        raise UserError(f"{images} {where} ({named}), which no class would read: move each image into the folder of "
                        "its class, or delete it")
    if not classes:
        raise UserError(f"{shown(split_dir)} has no class folders: {LAYOUT_HINT}")
    return classes


class PathArray:
    """Names as one byte array plus offsets: workers reading a list of str copy its pages as they touch refcounts
    (pytorch#13246)."""

    def __init__(self, data, offsets):
        self.data, self.offsets = data, offsets

    @classmethod
    def of(cls, names):
        offsets = np.zeros(len(names) + 1, np.int64)
        np.cumsum(np.fromiter(map(len, names), np.int64, len(names)), out=offsets[1:])
        return cls(np.frombuffer(b"".join(names), np.uint8).copy(), offsets)

    @classmethod
    def joined(cls, parts):
        if parts and all(p.data is parts[0].data for p in parts) and all(
                a.offsets[-1] == b.offsets[0] for a, b in zip(parts, parts[1:])):  # one cached array: no copy
            return cls(parts[0].data, np.concatenate([parts[0].offsets[:1], *(p.offsets[1:] for p in parts)]))
        data = np.concatenate([p.data[p.offsets[0]:p.offsets[-1]] for p in parts] or [np.zeros(0, np.uint8)])
        offsets, end = [np.zeros(1, np.int64)], 0
        for p in parts:
            offsets.append(p.offsets[1:] - p.offsets[0] + end)
            end += p.offsets[-1] - p.offsets[0]
        return cls(data, np.concatenate(offsets))

    def part(self, first, last):
        return PathArray(self.data, self.offsets[first:last + 1])

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        return self.data[self.offsets[i]:self.offsets[i + 1]].tobytes()


class ClassFiles(NamedTuple):
    files: PathArray  # paths from the split folder, in torchvision's order
    folders: list  # (relative path as bytes, folder_stamp) of every folder walked
    hidden: int = 0
    skipped: dict = {}  # extension -> count
    not_files: list = []  # SampleErrors: image names that are no regular file


def folder_stamp(info):
    """Also inode and ctime: a folder replaced by one of the same mtime (rsync -t, an unpacked archive) changes
    them."""
    return info.st_mtime_ns, info.st_ino, info.st_ctime_ns


def list_class(split_dir, name):
    """torchvision's make_dataset order, but stopping where it hangs (a FIFO), skips silently (an unlistable
    folder) or loops (symlinks)."""
    folders, skipped, hidden, not_files, pending = [], Counter(), 0, [], [(name, ())]
    while pending:
        relative, ancestors = pending.pop()
        folder = os.path.join(split_dir, relative)
        try:  # stat first: a file added during the listing makes the folder newer than its listing
            info, entries = os.stat(folder), sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            raise UserError(f"cannot list folder {shown(folder)} ({reason(e)}): fix its permissions or remove "
                            "it") from None
        here = (info.st_dev, info.st_ino)
        if here in ancestors:
            raise UserError(f"folder {shown(folder)} leads back to {shown(os.path.realpath(folder))}, which holds it "
                            "(a symlink loop): remove the link")
        files = []
        for entry in entries:
            if entry.name.startswith("."):
                hidden += 1
            elif entry.is_dir():
                pending.append((os.path.join(relative, entry.name), ancestors + (here,)))
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                if entry.is_file():
                    files.append(os.fsencode(os.path.join(relative, entry.name)))
                else:
                    not_files.append(not_a_file_error(entry.path))
            else:
                skipped[os.path.splitext(entry.name)[1].lower() or "(no extension)"] += 1
        folders.append((relative, folder_stamp(info), files))
    folders.sort()
    return ClassFiles(PathArray.of([path for *_, files in folders for path in files]),
                      [(os.fsencode(relative), stamp) for relative, stamp, _ in folders], hidden, dict(skipped),
                      not_files)


class FileList(NamedTuple):
    root: str
    classes: list
    paths: PathArray
    class_index: np.ndarray


def in_threads(function, items, threads=16):
    """[function(item) for item in items] in threads: a network file system answers many listings at once about
    as fast as one. Each thread takes every threads-th item: tiny tasks would wait on the GIL. The first error in
    the items' order is raised, as a loop would raise it."""
    items = list(items)

    def run(first):
        results = []
        for item in items[first::threads]:
            try:
                results.append((function(item), None))
            except Exception as e:
                results.append((None, e))
        return results
    outcomes = [None] * len(items)
    with ThreadPoolExecutor(threads) as pool:
        for first, results in enumerate(pool.map(run, range(min(threads, len(items))))):
            outcomes[first::threads] = results
    for result, error in outcomes:
        if error is not None:
            raise error
    return [result for result, _ in outcomes]


def list_split(split_dir, cache_dir=None, strict=True):
    """(FileList, [ClassFiles]); `strict` stops on an image name that is no regular file. list_cache.py imports
    this module, so it imports list_cache inside functions only."""
    started, listed_at_ns = time.perf_counter(), time.time_ns()
    classes = list_classes(split_dir)
    path, cached, kept = None, {}, [False] * len(classes)
    if cache_dir:
        from classification.list_cache import cache_path, read_cache, unchanged
        path = cache_path(cache_dir, split_dir)
        cached, cached_at_ns = read_cache(path, split_dir)
        kept = in_threads(lambda name: name in cached and unchanged(split_dir, cached[name], cached_at_ns), classes)
    listed = in_threads(lambda k: cached[classes[k]] if kept[k] else list_class(split_dir, classes[k]),
                        range(len(classes)))
    for name, found in zip(classes, listed):
        if strict and found.not_files:
            raise found.not_files[0]
        if not len(found.files) and not found.not_files:
            raise UserError(f"class folder {shown(os.path.join(split_dir, name))} holds no images "
                            f"({', '.join(IMAGE_EXTENSIONS)}): add images or remove the folder")
    print_skipped(split_dir, listed)
    relisted = len(classes) - sum(kept)
    if path and (relisted or set(cached) != set(classes)) and not any(c.not_files for c in listed):
        from classification.list_cache import write_cache
        write_cache(path, split_dir, listed_at_ns, classes, listed)
    files = FileList(split_dir, classes, PathArray.joined([c.files for c in listed]),
                     np.repeat(np.arange(len(classes), dtype=np.int32), [len(c.files) for c in listed]))
    source = (f"{relisted} of {len(classes)} class folders listed, the others from the cache {shown(path)}: delete it "
              "to list them all again" if sum(kept) else f"{len(classes)} class folders listed")
    print0(f"{shown(split_dir)}: {len(files.paths):,} images ({source}) in {time.perf_counter() - started:.2f} s")
    return files, listed


def print_skipped(split_dir, listed):
    hidden, skipped = sum(c.hidden for c in listed), Counter()
    for c in listed:
        skipped.update(c.skipped)
    notes = [f"{hidden} hidden files or folders (names starting with '.')"] if hidden else []
    if skipped:
        kinds = ", ".join(f"{count} {shown(ext)}" for ext, count in skipped.most_common(5))
        more = f" and {len(skipped) - 5} other kinds" if len(skipped) > 5 else ""
        notes.append(f"files not named as images: {kinds}{more} (images end in {', '.join(IMAGE_EXTENSIONS)})")
    if notes:
        print0(f"note: skipped under {shown(split_dir)}: {'; '.join(notes)}")


class ImageFiles(Dataset):
    """Labels index `class_names`, train/'s classes: val/ may hold only some."""

    def __init__(self, files, class_names, transform=None, resize_shorter_side=None):
        if len(class_names) < 2:  # one class is always right: "100% top-1" that means nothing
            raise UserError(f"{shown(files.root)} is read with {len(class_names)} class "
                            f"({', '.join(map(shown, class_names))}): a classifier needs at least 2: give train/ and "
                            "val/ one folder of images per class")
        index_of = {name: i for i, name in enumerate(class_names)}
        self.root, self.paths, self.classes = files.root, files.paths, list(class_names)
        self.transform, self.resize_shorter_side = transform, resize_shorter_side
        self.targets = np.array([index_of[name] for name in files.classes], np.int64)[files.class_index]
        self.samples = SampleView(self)

    def __len__(self):
        return len(self.targets)

    def path(self, index):
        return os.path.join(self.root, os.fsdecode(self.paths[index]))

    def __getitem__(self, index):
        image = read_image(self.path(index), resize_shorter_side=self.resize_shorter_side)
        return (self.transform(image) if self.transform is not None else image), int(self.targets[index])


class SampleView:
    """ImageFolder's .samples, made on demand."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        return self.files.path(index), int(self.files.targets[index])


def image_folder(split_dir, class_names, transform=None, cache_dir=None, resize_shorter_side=None):
    files = from_rank0(lambda: list_split(split_dir, cache_dir)[0])
    unknown = sorted(set(files.classes) - set(class_names))
    if unknown:
        raise UserError(f"{shown(split_dir)} has class folders the model was not trained on: "
                        f"{', '.join(map(shown, unknown[:5]))}: add them to train/ or remove them from val/")
    return ImageFiles(files, class_names, transform, resize_shorter_side)


class Crop(NamedTuple):
    """Train: RandomResizedCrop; val: the shorter side resized to `resize`, then a centre crop."""
    train: bool
    size: int
    resize: int = 256
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    interpolation: str = "bilinear"


AUGMENTS = {"ra": v2.RandAugment, "ta_wide": v2.TrivialAugmentWide, "augmix": v2.AugMix}  # else a policy


def train_preset(crop, auto_augment=None, random_erase=0.0):
    interpolation = v2.InterpolationMode(crop.interpolation)
    steps = [v2.RandomResizedCrop(crop.size, scale=crop.scale, ratio=crop.ratio, interpolation=interpolation,
                                  antialias=True),
             v2.RandomHorizontalFlip()]
    if auto_augment in AUGMENTS:
        steps.append(AUGMENTS[auto_augment](interpolation=interpolation))
    elif auto_augment:
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy(auto_augment), interpolation=interpolation))
    steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    if random_erase > 0:
        steps.append(v2.RandomErasing(p=random_erase))
    return v2.Compose(steps)


def val_preset(crop):
    return v2.Compose([v2.Resize(crop.resize, interpolation=v2.InterpolationMode(crop.interpolation), antialias=True),
                       v2.CenterCrop(crop.size), v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(MEAN, STD)])


def batch_mixer(mixup_alpha, cutmix_alpha, num_classes):
    mixers = [mixer(alpha=alpha, num_classes=num_classes) for mixer, alpha in
              ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha)) if alpha > 0]
    return v2.RandomChoice(mixers) if mixers else None


def make_shapes(num_samples, image_size=32, num_classes=10, seed=0, split="train", chunk=1024):
    """(uint8 images [N, 3, H, W], int64 labels [N]): one shape per image, its label."""
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"the synthetic set has 2 to {len(SHAPES)} classes, not {num_classes}")
    # Different streams, so that no validation image is seen in training.
    generator = torch.Generator().manual_seed(seed * 2 + (split != "train"))
    parts = [_draw_shapes(min(chunk, num_samples - start), image_size, num_classes, generator)
             for start in range(0, num_samples, chunk)]  # chunks bound memory at large image sizes
    return torch.cat([images for images, _ in parts]), torch.cat([labels for _, labels in parts])


def _draw_shapes(n, image_size, num_classes, generator):
    labels = torch.randint(num_classes, (n,), generator=generator)
    images, background = noisy_backgrounds(n, image_size, generator)
    colour = contrasting_colours(n, background, generator)
    # 60-90% of the side: at 32 px, ResNet-18's stride-4 stem still sees the outline.
    radius = (torch.rand(n, generator=generator) * 0.15 + 0.3) * image_size
    centre = radius[:, None] + torch.rand(n, 2, generator=generator) * (image_size - 2 * radius[:, None])
    coords = torch.arange(image_size, dtype=torch.float32) + 0.5
    dx = coords.view(1, 1, -1) - centre[:, 0].view(-1, 1, 1)
    dy = coords.view(1, -1, 1) - centre[:, 1].view(-1, 1, 1)
    for k in range(num_classes):
        idx = (labels == k).nonzero().squeeze(1)
        mask = shape_mask(SHAPES[k], dx[idx], dy[idx], radius[idx].view(-1, 1, 1))
        images[idx] = torch.where(mask[:, None], colour[idx], images[idx])
    images += torch.randn(images.shape, generator=generator) * 0.08
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels


def synthetic_loader(images, labels, sampler, batch_size, train, mixer=None):
    normalize = NormalizeBytes(images.device)

    def transform(images, labels):
        if train:  # per-sample flips: v2.RandomHorizontalFlip on a batch tensor flips all or none
            flip = torch.rand(len(images), device=images.device) < 0.5
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        images = normalize(images)
        return mixer(images, labels) if mixer is not None else (images, labels)

    return TensorLoader(images, labels, sampler, batch_size, transform, drop_last=train)


def dataset_classes(args, split="train"):
    if any(getattr(args, name, None) for name in ("train_list", "val_list", "classes_file")):
        from classification.list_file import list_class_names
        return from_rank0(lambda: list_class_names(args))
    if args.data_path is None:
        return list(SHAPES[:args.synthetic_classes])
    return from_rank0(lambda: list_classes(os.path.join(args.data_path, split)))


def split_files(args, split, class_names, transform=None, resize_shorter_side=None):
    if getattr(args, f"{split}_list", None):
        from classification.list_file import image_list
        return image_list(args, split, class_names, transform, resize_shorter_side)
    cache_dir = getattr(args, "list_cache", None) or getattr(args, "output_dir", None)
    return image_folder(os.path.join(args.data_path, split), class_names, transform, cache_dir, resize_shorter_side)


def load_train(args, layout, device, class_names, bad_samples):
    seed, batch_size, workers, backend = args.seed, args.batch_size, args.workers, args.data_backend
    reps = args.ra_reps if args.ra_sampler else 0
    crop = Crop(True, args.train_crop_size, scale=args.train_crop_scale, ratio=args.train_crop_ratio,
                interpolation=args.interpolation)
    mixer = batch_mixer(args.mixup_alpha, args.cutmix_alpha, len(class_names))
    if args.data_path is None:
        images, labels = make_shapes(args.synthetic_train_size, crop.size, args.synthetic_classes, split="train")
        sampler = TrainingSampler(labels, layout, seed, reps, labels if args.balanced_sampler else None)
        return synthetic_loader(images.to(device), labels.to(device), sampler, batch_size, True, mixer)
    if backend != "pil" and (args.auto_augment or args.random_erase):
        raise UserError(f"--auto-augment and --random-erase run in the pil backend only: drop them or use "
                        f"--data-backend pil instead of {backend}")
    folder = split_files(args, "train", class_names)
    classes = torch.from_numpy(folder.targets) if args.balanced_sampler else None
    if backend == "synthetic":  # the model step alone
        from common.synthetic_batches import SyntheticBatches
        shape = ((batch_size, 3, crop.size, crop.size), (batch_size,))
        return SyntheticBatches(shape, len(class_names), device, TrainingSampler(folder, layout, seed, reps, classes))
    if backend == "gpu":
        from classification.gpu_preset import device_loader
        sampler = TrainingSampler(folder, layout, seed, reps, classes)
        return device_loader(folder, sampler, batch_size, workers, crop, device, seed, mixer, bad_samples)
    folder.transform = train_preset(crop, args.auto_augment, args.random_erase)
    train_set = SeededSamples(bad_samples.stand_ins(folder, seed) if bad_samples is not None else folder, seed)
    # Not persistent: fresh workers each epoch seed from the per-epoch RNG (exact resume).
    loader = DataLoader(train_set, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                        sampler=TrainingSampler(train_set, layout, seed, reps, classes), drop_last=True,
                        worker_init_fn=ignore_stop_signals, collate_fn=bad_samples and bad_samples.collate)
    loader = bad_samples.reported(loader) if bad_samples is not None else loader
    # In the main process, which the loop seeds every step: a worker's stream would mix a resumed run differently.
    return BatchesThrough(loader, mixer) if mixer else loader


def load_val(args, env, device, class_names):
    batch_size, workers = args.batch_size, args.workers
    crop = Crop(False, args.val_crop_size, args.val_resize_size, interpolation=args.interpolation)
    if args.data_path is None:
        images, labels = make_shapes(args.synthetic_val_size, args.train_crop_size, args.synthetic_classes,
                                     split="val")
        sampler = ShardedEvalSampler(labels, env.rank, env.world_size)
        return synthetic_loader(images.to(device), labels.to(device), sampler, batch_size, False)
    val_set = split_files(args, "val", class_names, val_preset(crop), crop.resize)
    sampler = ShardedEvalSampler(val_set, env.rank, env.world_size)
    if args.data_backend == "gpu":
        from classification.gpu_preset import device_loader
        return device_loader(val_set, sampler, batch_size, workers, crop, device)
    return DataLoader(val_set, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                      sampler=sampler, worker_init_fn=ignore_stop_signals)
