"""The data trees the benchmarks read, each written once in parallel and reused while its spec.json matches:
benchmarks/throughput.py's ImageFolder tree of long-tailed JPEGs and Cityscapes-layout tree of PNGs, and the small
trees of the CUDA smoke matrix (benchmarks/cuda_matrix.py): a VOC layout, a classification list-file set, a
segmentation folder of colour masks, and ResNet weights files for --weights and --weights-backbone."""
import csv
import json
import math
import multiprocessing
import os
import shutil
import time

import numpy as np
from PIL import Image

from segmentation.datasets import voc_colour

# Sizes like ImageNet's: most photos 500 px on their long side, a tail of bigger ones up to camera size. Each
# run of 200 files holds (files, long side from, to); the short side is 0.6-0.8 of the long one, a quarter of
# the files are portrait. A JPEG's decoding cost grows with its entropy-coded size, so the pictures carry pixel
# noise to come near ImageNet's files in bytes as well (its training archive: 1.28 M images in about 140 GB).
# Some files take the decoders' fallbacks: grayscale JPEGs, CMYK JPEGs (nvJPEG may refuse them) and PNGs named
# .jpg (which only Pillow reads), one in every `*_every` files.
JPEG_SPEC = dict(classes=100, per_class=128, quality=90, noise=16, portrait=0.25, aspect=[0.6, 0.8],
                 sizes=[[168, 500, 500], [25, 150, 999], [6, 1000, 2499], [1, 3500, 4500]],
                 gray_every=50, cmyk_every=1600, png_every=1600)
SMOKE_JPEG_SPEC = dict(JPEG_SPEC, classes=2, per_class=8, gray_every=8, cmyk_every=16, png_every=16,
                       sizes=[[4, 40, 40], [2, 24, 39], [1, 41, 60], [1, 64, 80]])  # 1/10 the sizes
# Cityscapes' published leftImg8bit archive holds 5,000 PNGs in 11 GB, about 2.2 MB each; smooth 32-pixel
# textures at zlib level 1 come to 2.28 MB (measured). Masks hold labelIds, as gtFine's *_labelIds.png do.
CITYSCAPES_SPEC = dict(images=400, height=1024, width=2048, cities=4)
SMOKE_CITYSCAPES_SPEC = dict(images=4, height=64, width=128, cities=2)
# The CUDA smoke matrix's VOC layout: every image of its own size, so that validation (one image a batch, at its
# size) meets a new shape at each image, as VOC and ADE20K do; train and val lists hold different images.
VOC_SPEC = dict(train=16, val=6, sizes=[48, 112], quality=90, noise=16)
# The matrix's list-file set (classification --train-list/--val-list): the smoke JPEG tree's files of 3 classes,
# labelled by names that are not their folders'. train.csv lists 8, 5 and 3 of them (a rare class, for
# --class-weights and --balanced-sampler; 16 rows), val.csv all 24; classes.txt names them in an order of its own.
LIST_SPEC = dict(SMOKE_JPEG_SPEC, classes=3, labels=["good", "scratch", "dent"], train_per_class=[8, 5, 3])
# The matrix's folder layout (segmentation --dataset folder): RGB masks in the colours of classes.txt, most pixels
# background, each image of its own size as in VOC_SPEC.
FOLDER_SPEC = dict(VOC_SPEC, classes=[["background", 0, 0, 0], ["scratch", 255, 0, 0], ["dent", 0, 0, 255]],
                   shares=[0.8, 0.15, 0.05])
# Weights to start from without a download: torchvision's ResNet at its random initialisation, with batch norm's
# running statistics taken from a few random batches, so that a frozen backbone (eval mode) normalises its
# activations as trained weights do; with initialisation's statistics (mean 0, variance 1) they grow from block to
# block. Saved as a bare state dict, or (as_checkpoint) in a checkpoint's "model" key: the two forms the scripts
# read.
WEIGHTS_SPEC = dict(model="resnet18", as_checkpoint=False, batches=2, batch_size=8, size=64, seed=0)


def size_class(n, spec):
    """Which of spec["sizes"] file n has: dealt from a shuffled run, so that the tree holds their shares exactly."""
    run = [k for k, (files, _, _) in enumerate(spec["sizes"]) for _ in range(files)]
    return int(np.random.default_rng(n // len(run)).permutation(run)[n % len(run)])


def jpeg_jobs(root, spec):
    """(path, seed, height, width, kind) of every file."""
    jobs = []
    for c in range(spec["classes"]):
        for i in range(spec["per_class"]):
            n = len(jobs)
            rng = np.random.default_rng(n)
            _, low, high = spec["sizes"][size_class(n, spec)]
            long_side = int(rng.integers(low, high + 1))
            short_side = round(long_side * rng.uniform(*spec["aspect"]))
            height, width = (long_side, short_side) if rng.random() < spec["portrait"] else (short_side, long_side)
            path = os.path.join(root, "train", f"class{c:03d}", f"{i:04d}.jpg")
            jobs.append((path, n, height, width, file_kind(n, spec)))
    return jobs


def file_kind(n, spec):
    if spec.get("truncated_every") and n % spec["truncated_every"] == 3:  # the bad-file tree only
        return "truncated"
    if n % spec["cmyk_every"] == 1:
        return "cmyk"
    if n % spec["png_every"] == spec["png_every"] // 2 + 1:
        return "png"
    return "gray" if n % spec["gray_every"] == spec["gray_every"] // 2 else "rgb"


def write_photo(path, seed, height, width, kind, quality, noise):
    """A blocky picture with pixel noise, as a JPEG of `kind` (rgb, gray, cmyk) or a PNG (png) at `path`."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(blocks).resize((width, height), Image.BILINEAR), dtype=np.float32)
    # A tile of noise repeated: JPEG codes each 8x8 block on its own, so it costs the same bytes as fresh noise.
    tile = rng.normal(0, noise, (min(height, 256), min(width, 256), 3)).astype(np.float32)
    image += np.tile(tile, (math.ceil(height / len(tile)), math.ceil(width / tile.shape[1]), 1))[:height, :width]
    picture = Image.fromarray(image.clip(0, 255).astype(np.uint8))
    if kind == "png":
        picture.save(path, format="PNG", compress_level=1)
    else:
        mode = {"rgb": "RGB", "truncated": "RGB", "gray": "L", "cmyk": "CMYK"}[kind]
        picture.convert(mode).save(path, format="JPEG", quality=quality)
    if kind == "truncated":  # a download cut short: the header and half the data
        os.truncate(path, os.path.getsize(path) // 2)
    return os.path.getsize(path), height, width, kind


def write_street_pngs(image_path, mask_path, seed, height, width):
    rng = np.random.default_rng(seed)
    cells = (height // 32 + 1, width // 32 + 1)
    blocks = rng.integers(0, 256, (*cells, 3), dtype=np.uint8)
    Image.fromarray(blocks).resize((width, height), Image.BILINEAR).save(image_path, compress_level=1)
    label_ids = rng.integers(0, 34, cells, dtype=np.uint8)  # every Cityscapes labelId, void ones included
    Image.fromarray(label_ids).resize((width, height), Image.NEAREST).save(mask_path)
    return os.path.getsize(image_path)


def in_parallel(function, jobs):
    with multiprocessing.Pool(min(os.cpu_count() or 1, 16)) as pool:
        return pool.starmap(function, jobs, chunksize=max(1, len(jobs) // 256))


def write_jpeg_tree(root, spec):
    """An ImageFolder tree; val/ links to train/, since evaluation speed does not depend on which images."""
    jobs = jpeg_jobs(root, spec)
    for c in range(spec["classes"]):
        os.makedirs(os.path.join(root, "train", f"class{c:03d}"))
    os.symlink("train", os.path.join(root, "val"))
    written = in_parallel(write_photo, [(*job, spec["quality"], spec["noise"]) for job in jobs])
    sizes = [size for size, *_ in written]
    classes = [size_class(n, spec) for n in range(len(written))]
    return {"files": len(written), "mean_kb": round(sum(sizes) / len(sizes) / 1e3, 1),
            "mean_megapixels": round(sum(h * w for _, h, w, _ in written) / len(written) / 1e6, 3),
            "files_per_size_class": [classes.count(k) for k in range(len(spec["sizes"]))],
            **{kind: sum(k == kind for *_, k in written) for kind in ("gray", "cmyk", "png", "truncated")}}


def write_cityscapes_tree(root, spec):
    """Cityscapes' layout (segmentation/datasets.py); val/ links to train/, as only its class list is read."""
    jobs = []
    for i in range(spec["images"]):
        city = f"city{i % spec['cities']}"
        stem = f"{city}_{i:06d}_000019"
        image_dir, mask_dir = (os.path.join(root, top, "train", city) for top in ("leftImg8bit", "gtFine"))
        os.makedirs(image_dir, exist_ok=True)
        os.makedirs(mask_dir, exist_ok=True)
        jobs.append((os.path.join(image_dir, f"{stem}_leftImg8bit.png"),
                     os.path.join(mask_dir, f"{stem}_gtFine_labelIds.png"), i, spec["height"], spec["width"]))
    for top in ("leftImg8bit", "gtFine"):
        os.symlink("train", os.path.join(root, top, "val"))
    sizes = in_parallel(write_street_pngs, jobs)
    return {"files": len(sizes), "mean_mb": round(sum(sizes) / len(sizes) / 1e6, 2)}


def write_voc_pair(image_path, mask_path, seed, height, width, quality, noise):
    write_photo(image_path, seed, height, width, "rgb", quality, noise)
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, 21, (height // 16 + 1, width // 16 + 1), dtype=np.uint8)
    mask = np.array(Image.fromarray(classes).resize((width, height), Image.NEAREST))
    mask[:2], mask[-2:] = 255, 255  # a void border, as VOC's annotations have around objects
    picture = Image.fromarray(mask)
    picture.putpalette([value for index in range(256) for value in voc_colour(index)])  # a palette PNG, as VOC's
    picture.save(mask_path)
    return height, width


def write_voc_tree(root, spec):
    """PASCAL VOC 2012's layout (VOCdevkit/VOC2012/: JPEGImages, SegmentationClass palette PNGs, the lists of
    ImageSets/Segmentation) with each side of each image drawn from spec["sizes"]."""
    base = os.path.join(root, "VOCdevkit", "VOC2012")
    for folder in ("JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation")):
        os.makedirs(os.path.join(base, folder))
    ids = [f"2007_{n:06d}" for n in range(spec["train"] + spec["val"])]
    jobs = []
    for n, image_id in enumerate(ids):
        height, width = (int(side) for side in np.random.default_rng(n).integers(*spec["sizes"], 2, endpoint=True))
        jobs.append((os.path.join(base, "JPEGImages", f"{image_id}.jpg"),
                     os.path.join(base, "SegmentationClass", f"{image_id}.png"), n, height, width, spec["quality"],
                     spec["noise"]))
    sizes = in_parallel(write_voc_pair, jobs)
    for split, chosen in (("train", ids[:spec["train"]]), ("val", ids[spec["train"]:])):
        with open(os.path.join(base, "ImageSets", "Segmentation", f"{split}.txt"), "w") as f:
            f.write("".join(f"{image_id}\n" for image_id in chosen))
    return {"files": len(ids), "distinct_sizes": len(set(sizes))}


def write_list_tree(root, spec):
    """The JPEG tree of write_jpeg_tree with train.csv, val.csv and classes.txt of spec["labels"]."""
    stats = write_jpeg_tree(root, spec)
    rows = [(f"train/class{c:03d}/{i:04d}.jpg", label, i < spec["train_per_class"][c])
            for c, label in enumerate(spec["labels"]) for i in range(spec["per_class"])]
    for split, chosen in (("train", [row for row in rows if row[2]]), ("val", rows)):
        with open(os.path.join(root, f"{split}.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerows([("path", "label"), *((path, label) for path, label, _ in chosen)])
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("".join(f"{label}\n" for label in spec["labels"]))
    return dict(stats, train_rows=sum(spec["train_per_class"]), val_rows=len(rows))


def write_folder_pair(image_path, mask_path, seed, height, width, spec):
    write_photo(image_path, seed, height, width, "rgb", spec["quality"], spec["noise"])
    rng = np.random.default_rng(seed)
    classes = rng.choice(len(spec["classes"]), (height // 16 + 1, width // 16 + 1), p=spec["shares"])
    colours = np.array([colour for _, *colour in spec["classes"]], dtype=np.uint8)
    Image.fromarray(colours[classes]).resize((width, height), Image.NEAREST).save(mask_path)
    return height, width


def write_folder_tree(root, spec):
    """segmentation's folder layout: {train,val}/images/NAME.jpg, {train,val}/masks/NAME.png, classes.txt with the
    classes' colours."""
    jobs = []
    for split in ("train", "val"):
        for folder in ("images", "masks"):
            os.makedirs(os.path.join(root, split, folder))
        for i in range(spec[split]):
            n = len(jobs)
            height, width = (int(side) for side in np.random.default_rng(n).integers(*spec["sizes"], 2, endpoint=True))
            jobs.append((os.path.join(root, split, "images", f"{n:04d}.jpg"),
                         os.path.join(root, split, "masks", f"{n:04d}.png"), n, height, width, spec))
    sizes = in_parallel(write_folder_pair, jobs)
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("".join(f"{name} {r} {g} {b}\n" for name, r, g, b in spec["classes"]))
    return {"files": len(jobs), "distinct_sizes": len(set(sizes))}


def write_weights(root, spec):
    """ROOT/MODEL.pth of WEIGHTS_SPEC."""
    import torch
    import torchvision
    torch.manual_seed(spec["seed"])
    model = torchvision.models.get_model(spec["model"])
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # the plain average over the batches
    with torch.no_grad():
        for _ in range(spec["batches"]):
            model(torch.randn(spec["batch_size"], 3, spec["size"], spec["size"]))
    os.makedirs(root)
    state = model.state_dict()
    torch.save({"model": state} if spec["as_checkpoint"] else state, os.path.join(root, f"{spec['model']}.pth"))
    return {"parameters": sum(p.numel() for p in model.parameters()), "batch_norms": len(norms)}


def sized(spec, key, needed, per=1):
    """The spec, grown so that one epoch holds every warm-up and timed batch: an epoch boundary restarts the
    DataLoader workers, a cost a real epoch of thousands of steps pays once."""
    spec = dict(spec)
    spec[key] = max(spec[key], math.ceil(needed / per))
    return spec


def generate_once(root, spec, write):
    """Write the tree `write(folder, spec)` makes into root, unless root already holds one of this spec.

    It is written beside root and renamed at the end, so a run killed half-way leaves no tree that looks whole.
    """
    marker = os.path.join(root, "spec.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            written = json.load(f)
        if written["spec"] == spec:
            return written["stats"]
        shutil.rmtree(root)  # ours (it has our marker), of another size
    elif os.path.exists(root):
        raise SystemExit(f"{root} exists but was not written by this script: choose another --data-dir")
    partial = root + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    start = time.perf_counter()
    stats = write(partial, spec)
    stats["seconds_to_write"] = round(time.perf_counter() - start, 1)
    with open(os.path.join(partial, "spec.json"), "w") as f:
        json.dump({"spec": spec, "stats": stats}, f, indent=1)
    os.replace(partial, root)
    return stats
