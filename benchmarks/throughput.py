"""End-to-end throughput of the training and evaluation steps, per input pipeline. Run on a GPU machine:

    python benchmarks/throughput.py --out throughput.json --stop-after 420    # the default rows
    python benchmarks/throughput.py --device cpu --smoke                       # tiny sizes: proves it runs

Every row times the step the scripts themselves run: common.engine.train_one_epoch (train rows) or
common.engine.evaluate (eval rows), fed by classification/data.py's or segmentation/data.py's own loader for
the backend (synthetic: random batches on the device, the model-step ceiling; gpu: device decoding and
augmentation; pil: decoding in DataLoader workers, the baseline), with arguments from the scripts' own parsers.
Images come from generated trees of ImageNet-like JPEGs and Cityscapes-like PNGs, written once under --data-dir.
It prints one Markdown row per configuration as it finishes and rewrites the JSON of --out after each.
"""
import argparse
import contextlib
import gc
import io
import itertools
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from functools import cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script from anywhere

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from classification import train as classification_train
from classification.data import dataset_classes
from classification.data import load_train as classification_load_train
from classification.data import load_val as classification_load_val
from classification.model import create_model as create_classifier
from common.data import set_epoch
from common.distributed import DistEnv
from common.engine import configure_torch, evaluate, grad_scaler, train_one_epoch
from common.metrics import ClassificationMeter
from common.optim import create_lr_scheduler, create_optimizer, param_groups
from segmentation import train as segmentation_train
from segmentation.data import dataset_info
from segmentation.data import load_train as segmentation_load_train
from segmentation.model import create_model as create_segmenter

BACKENDS = ("synthetic", "gpu", "pil")
# Dense bfloat16 rate we measured on one H100 (the project's shared anchors), not the datasheet's figure.
H100_PEAK_TFLOPS = 790.0


@dataclass(frozen=True)
class Setting:
    """One model build (and compilation), shared by the rows of its backends."""
    name: str
    task: str  # classification or segmentation
    model: str
    dtype: str  # autocast dtype, or float32 for none (TF32 matmuls and convolutions)
    channels_last: bool
    compile: bool
    train_backends: tuple
    eval_backends: tuple = ()
    output_stride: int = 8  # DeepLabV3+ only; 8 is segmentation/train.py's default


# In the order they run: what the issue's bars need first, so that a run cut short still answers them, and a
# third compilation last.
SETTINGS = [
    Setting("r50-bf16-cl-compile", "classification", "resnet50", "bfloat16", True, True, BACKENDS, BACKENDS),
    Setting("deeplab-os8-bf16-cl-compile", "segmentation", "deeplabv3plus_resnet50", "bfloat16", True, True,
            BACKENDS),
    Setting("deeplab-os8-bf16-cl", "segmentation", "deeplabv3plus_resnet50", "bfloat16", True, False, BACKENDS),
    Setting("r50-fp16", "classification", "resnet50", "float16", False, False, ("synthetic", "gpu")),
    Setting("r50-fp32", "classification", "resnet50", "float32", False, False, ("synthetic", "gpu")),
    Setting("deeplab-os16-bf16-cl-compile", "segmentation", "deeplabv3plus_resnet50", "bfloat16", True, True,
            ("synthetic", "gpu"), output_stride=16),
]
DTYPE_LABELS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32 (TF32)"}


# ---------------------------------------------------------------------------------------------- data trees

# A JPEG's decoding cost grows with its entropy-coded size, so the tree matches ImageNet's files in bytes, not
# only in pixels: ILSVRC2012's published training archive holds 1.28 M images in about 140 GB, some 110 KB each.
# The smooth textures of train_speed.py's write_jpeg come to 55 KB at 500x375 (measured), so this tree adds
# pixel noise: 116 KB on average over its first 300 files (measured).
JPEG_SPEC = dict(classes=100, per_class=128, height=[300, 500], width=[400, 600], quality=90, noise=16)
SMOKE_JPEG_SPEC = dict(classes=4, per_class=8, height=[40, 56], width=[48, 72], quality=90, noise=16)
# Cityscapes' published leftImg8bit archive holds 5,000 PNGs in 11 GB, about 2.2 MB each; smooth 32-pixel
# textures at zlib level 1 come to 2.28 MB (measured). Masks hold labelIds, as gtFine's *_labelIds.png do.
CITYSCAPES_SPEC = dict(images=400, height=1024, width=2048, cities=4)
SMOKE_CITYSCAPES_SPEC = dict(images=8, height=128, width=256, cities=2)


def write_photo_jpeg(path, seed, height_range, width_range, quality, noise):
    rng = np.random.default_rng(seed)
    height, width = (int(rng.integers(low, high + 1)) for low, high in (height_range, width_range))
    blocks = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(blocks).resize((width, height), Image.BILINEAR), dtype=np.float32)
    image += rng.normal(0, noise, image.shape).astype(np.float32)
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(path, quality=quality)
    return os.path.getsize(path)


def write_street_pngs(image_path, mask_path, seed, height, width):
    rng = np.random.default_rng(seed)
    cells = (height // 32 + 1, width // 32 + 1)
    blocks = rng.integers(0, 256, (*cells, 3), dtype=np.uint8)
    Image.fromarray(blocks).resize((width, height), Image.BILINEAR).save(image_path, compress_level=1)
    label_ids = rng.integers(0, 34, cells, dtype=np.uint8)  # every Cityscapes labelId, void ones included
    Image.fromarray(label_ids).resize((width, height), Image.NEAREST).save(mask_path)
    return os.path.getsize(image_path)


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


def in_parallel(function, jobs):
    with multiprocessing.Pool(min(os.cpu_count() or 1, 16)) as pool:
        return pool.starmap(function, jobs, chunksize=max(1, len(jobs) // 256))


def write_jpeg_tree(root, spec):
    """An ImageFolder tree; val/ links to train/, since evaluation speed does not depend on which images."""
    jobs = []
    for c in range(spec["classes"]):
        folder = os.path.join(root, "train", f"class{c:03d}")
        os.makedirs(folder)
        jobs += [(os.path.join(folder, f"{i:04d}.jpg"), len(jobs) + i, spec["height"], spec["width"],
                  spec["quality"], spec["noise"]) for i in range(spec["per_class"])]
    os.symlink("train", os.path.join(root, "val"))
    sizes = in_parallel(write_photo_jpeg, jobs)
    return {"files": len(sizes), "mean_kb": round(sum(sizes) / len(sizes) / 1e3, 1)}


def write_cityscapes_tree(root, spec):
    """Cityscapes' layout (segmentation/datasets.py); val/ links to train/, which only its class list is read from."""
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


def sized(spec, key, needed, per=1):
    """The spec, grown so that one epoch holds every warm-up and timed batch: an epoch boundary restarts the
    DataLoader workers, a cost a real epoch of thousands of steps pays once."""
    spec = dict(spec)
    spec[key] = max(spec[key], math.ceil(needed / per))
    return spec


# ------------------------------------------------------------------------------------------------- FLOPs

@cache
def forward_flops_per_image(task, model_name, num_classes, height, width, output_stride):
    """FLOPs of one forward pass at batch 1, counted by FlopCounterMode (matmuls and convolutions) on the meta
    device, which builds and runs the model without memory or arithmetic."""
    with torch.device("meta"):
        if task == "classification":
            model, _ = create_classifier(model_name, None, num_classes)
        else:
            model = create_segmenter(model_name, num_classes, output_stride)
    model.eval()  # batch 1 in training mode would fail in ASPP's pooled batch norm
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(1, 3, height, width, device="meta"))
    return counter.get_total_flops()


# ------------------------------------------------------------------------------------------------ timing

class Batches:
    """Batches from a loader's running iterator, across as many passes as asked for. A short last batch is
    skipped: a compiled model would compile again for its shape."""

    def __init__(self, loader, batch_size):
        self.loader, self.batch_size = loader, batch_size
        self.epoch, self.iterator, self.passes_started, self.given_in_pass = 0, None, 0, 0

    def next(self):
        while True:
            if self.iterator is None:
                if hasattr(self.loader.sampler, "set_epoch"):
                    set_epoch(self.loader, self.epoch)
                self.iterator, self.given_in_pass = iter(self.loader), 0
                self.passes_started += 1
            try:
                batch = next(self.iterator)
            except StopIteration:
                if self.given_in_pass == 0:  # another pass would not give one either
                    raise RuntimeError(f"the loader holds no full batch of {self.batch_size}: give it more images "
                                       "or lower the batch size") from None
                self.iterator, self.epoch = None, self.epoch + 1
                continue
            if len(batch[0]) == self.batch_size:
                self.given_in_pass += 1
                return batch

    def take(self, count):
        return Take(self.next, count)

    def close(self):
        if hasattr(self.iterator, "close"):  # DeviceLoader's generator: stops its producer thread now
            self.iterator.close()
        self.iterator = None


class Take:
    """What train_one_epoch and evaluate need of a loader: a length and `count` batches."""

    def __init__(self, next_batch, count):
        self.next_batch, self.count = next_batch, count

    def __len__(self):
        return self.count

    def __iter__(self):
        return (self.next_batch() for _ in range(self.count))


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quietly(function, *args):
    """The engine prints a progress line per call; the table is this script's output."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        # float16's GradScaler skips its first steps while it finds its scale, which torch reports each time.
        warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before `optimizer.step()`"))
        return function(*args)


class Runner:
    """The model, optimizer and scaler of one setting, built as the training scripts build them."""

    def __init__(self, setting, args, device, num_classes):
        self.setting, self.args, self.device, self.num_classes = setting, args, device, num_classes
        if setting.task == "classification":
            model, head = create_classifier(args.model, None, num_classes)
            self.criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
            groups = param_groups(model, args.lr, args.weight_decay, args.norm_weight_decay, head, args.head_lr)
        else:
            model = segmentation_train.build_model(args, num_classes)
            self.criterion = segmentation_train.SegmentationLoss(args.ignore_index, args.aux_weight)
            groups = param_groups(model, args.lr, args.weight_decay, args.norm_weight_decay)
        model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
        self.optimizer = create_optimizer(args.opt, groups, args.lr, args.momentum, args.weight_decay, device.type)
        # The schedule's shape does not change a step's cost; any epoch length will do.
        self.lr_scheduler = create_lr_scheduler(self.optimizer, args, steps_per_epoch=1000)
        self.scaler = grad_scaler(device, args, self.optimizer)
        if args.compile:
            model.compile()  # in place, as the scripts do; compilation happens in the first warm-up step
        self.model = model

    def train(self, batches):
        quietly(train_one_epoch, self.model, self.criterion, self.optimizer, self.lr_scheduler, self.scaler,
                batches, self.device, 0, self.args)

    def eval(self, batches):
        quietly(evaluate, self.model, batches, ClassificationMeter(self.num_classes, self.device), self.device,
                self.args)

    def random_batches(self, train, count=4):
        """A few distinct batches of the loaders' shapes, already on the device, for warm-up and for eval's
        synthetic rows (load_val has no synthetic backend)."""
        args, size = self.args, self.input_size(train)
        label_shape = (args.batch_size,) if self.setting.task == "classification" else (args.batch_size, *size)
        return [(torch.randn(args.batch_size, 3, *size, device=self.device),
                 torch.randint(self.num_classes, label_shape, device=self.device)) for _ in range(count)]

    def input_size(self, train=True):
        if self.setting.task == "segmentation":
            return tuple(self.args.crop_size)
        crop = self.args.train_crop_size if train else self.args.val_crop_size
        return crop, crop

    def warm_up(self, train, steps):
        """Compilation and cuDNN's algorithm search happen here, on random batches, before any loader starts."""
        source = itertools.cycle(self.random_batches(train))
        (self.train if train else self.eval)(Take(lambda: next(source), steps))
        synchronize(self.device)


def time_row(runner, batches, train, opts):
    """img/s of `opts.steps` steps after `opts.data_warmup` steps from the same loader; peak memory of both."""
    device, step = runner.device, runner.train if train else runner.eval
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step(batches.take(opts.data_warmup))  # workers started, queues filled: the state a long epoch runs in
    passes_before = batches.passes_started
    synchronize(device)
    start = time.perf_counter()
    step(batches.take(opts.steps))
    synchronize(device)
    seconds = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"steps": opts.steps, "seconds": round(seconds, 3),
            "img_per_s": opts.steps * runner.args.batch_size / seconds,
            "peak_memory_gib": round(memory, 2) if memory is not None else None,
            "passes_started_while_timed": batches.passes_started - passes_before}


# ------------------------------------------------------------------------------------------------- setup

def script_args(setting, opts, data, device, backend):
    """The setting as the training script's own flags, parsed and completed by its own parser."""
    flags = ["--model", setting.model, "-j", str(opts.workers), "--device", str(device), "--data-backend", backend]
    if setting.dtype != "float32":
        flags += ["--amp-dtype", setting.dtype]
    flags += ["--channels-last"] * setting.channels_last + ["--compile"] * setting.compile
    if setting.task == "classification":
        script = classification_train
        crop = str(opts.crop_size)
        flags += ["--data-path", data["imagefolder"], "-b", str(opts.batch_size), "--train-crop-size", crop,
                  "--val-crop-size", crop, "--val-resize-size", str(opts.crop_size * 256 // 224)]
    else:
        script = segmentation_train
        flags += ["--data-path", data["cityscapes"], "--dataset", "cityscapes", "-b", str(opts.seg_batch_size),
                  "--output-stride", str(setting.output_stride), "--crop-size", *map(str, opts.seg_crop_size),
                  "--base-size", str(opts.seg_crop_size[1])]  # Cityscapes' recipe: 1024 for 512x1024 crops
    args = script.finish_args(script.get_args_parser().parse_args(flags))
    args.world_size = 1
    # One progress line per call, at its end; and random-label batches that make the loss diverge must not stop
    # the timing (the engine still skips their non-finite steps, as in a real run).
    args.print_freq, args.max_nonfinite_steps = 10**9, 10**9
    return args


def load_train(setting, args, env, device, class_names):
    if setting.task == "classification":
        return classification_load_train(args, env, device, class_names)
    return segmentation_load_train(args, env, device)


MODEL_LABELS = {"resnet50": "ResNet-50", "deeplabv3plus_resnet50": "DeepLabV3+ R50",
                "deeplabv3plus_resnet101": "DeepLabV3+ R101"}


def describe(setting, args, opts, size, train, backend, forward_flops, peak_tflops, facts):
    model = MODEL_LABELS.get(setting.model, setting.model)
    if setting.task == "segmentation":
        model += f" OS{setting.output_stride}"
    # Training costs about three forward passes (the backward pass computes two products per forward one).
    return {"setting": setting.name, "step": "train" if train else "eval", "model": model,
            "input": f"{size[0]}x{size[1]}", "backend": backend, "dtype": setting.dtype,
            "memory_format": "channels_last" if setting.channels_last else "NCHW", "compiled": setting.compile,
            "batch": args.batch_size, "workers": opts.workers,
            "gflop_per_image": round(forward_flops * (3 if train else 1) / 1e9, 2), "peak_tflops": peak_tflops,
            **facts}


def run_setting(setting, opts, data, device, facts, peak_tflops, report):
    env = DistEnv()
    args = script_args(setting, opts, data, device, "pil")
    configure_torch(args, device)
    class_names = dataset_classes(args) if setting.task == "classification" else dataset_info(args)[0]
    num_classes = len(class_names)
    print(f"# {setting.name}: building{' and compiling' if setting.compile else ''} the model", flush=True)
    runner = Runner(setting, args, device, num_classes)
    started = time.perf_counter()
    runner.warm_up(True, opts.warmup)
    print(f"# {setting.name}: train warm-up took {time.perf_counter() - started:.0f} s", flush=True)
    phases = [(True, b) for b in setting.train_backends if b in opts.backends]
    if not opts.no_eval:
        phases += [(False, b) for b in setting.eval_backends if b in opts.backends]
    warmed_eval = False
    for train, backend in phases:
        size = runner.input_size(train)
        flops = forward_flops_per_image(setting.task, setting.model, num_classes, *size, setting.output_stride)
        row = describe(setting, args, opts, size, train, backend, flops, peak_tflops, facts)
        batches = None
        try:
            if not train and not warmed_eval:
                started = time.perf_counter()
                runner.warm_up(False, opts.warmup)
                warmed_eval = True
                print(f"# {setting.name}: eval warm-up took {time.perf_counter() - started:.0f} s", flush=True)
            backend_args = script_args(setting, opts, data, device, backend)
            if train:
                loader = load_train(setting, backend_args, env, device, class_names)
            elif backend == "synthetic":
                loader = SyntheticLoader(runner.random_batches(False))
            else:
                loader = classification_load_val(backend_args, env, device, class_names)
            batches = Batches(loader, args.batch_size)
            row.update(time_row(runner, batches, train, opts))
            if peak_tflops:
                row["mfu"] = round(row["img_per_s"] * row["gflop_per_image"] * 1e9 / (peak_tflops * 1e12), 4)
        except Exception as e:  # one failing row (out of memory, a missing codec) must not cost the others
            row["error"] = f"{type(e).__name__}: {e}"[-2000:]
            traceback.print_exc()
        finally:
            if batches is not None:
                batches.close()
            loader = batches = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        report(row)


class SyntheticLoader:
    """Eval's synthetic rows: the same few random batches over and over, as SyntheticBatches gives training."""

    def __init__(self, batches):
        self.batches, self.sampler = batches, None

    def __iter__(self):
        return itertools.cycle(self.batches)


# ------------------------------------------------------------------------------------------------ report

COLUMNS = ["step", "model", "input", "backend", "dtype", "memory format", "compiled", "batch", "img/s",
           "× synthetic", "× pil", "peak memory", "MFU", "measured on"]


def ratio(row, rows, backend):
    base = next((r for r in rows if r["setting"] == row["setting"] and r["step"] == row["step"]
                 and r["backend"] == backend and r.get("img_per_s")), None)
    if base is None or not row.get("img_per_s") or base is row:
        return None
    return row["img_per_s"] / base["img_per_s"]


def markdown_row(row, rows):
    def times(value):
        return f"{value:.2f}" if value is not None else "–"
    rate = row.get("img_per_s")
    rate = "error" if not rate else f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"
    memory = f"{row['peak_memory_gib']:.1f} GiB" if row.get("peak_memory_gib") is not None else "–"
    mfu = f"{100 * row['mfu']:.0f}%" if row.get("mfu") is not None else "–"
    measured = f"{row['hardware']}, {row['cpu_count']} CPUs, torch {row['torch']}, {row['date']}"
    cells = [row["step"], row["model"], row["input"].replace("x", "×"), row["backend"], DTYPE_LABELS[row["dtype"]],
             row["memory_format"], "yes" if row["compiled"] else "no", row["batch"], rate,
             times(ratio(row, rows, "synthetic")), times(ratio(row, rows, "pil")), memory, mfu, measured]
    return "| " + " | ".join(map(str, cells)) + " |"


def markdown_header():
    align = ["---"] * 7 + ["---:"] * 6 + ["---"]
    return "| " + " | ".join(COLUMNS) + " |\n|" + "|".join(align) + "|"


def check_bars(rows):
    """The issue's bars, stated against this run's rows (None where the run lacks a row the bar needs)."""
    def rate(setting, step, backend):
        return next((r["img_per_s"] for r in rows if r["setting"] == setting and r["step"] == step
                     and r["backend"] == backend and r.get("img_per_s")), None)

    gpu, synthetic, pil = (rate("r50-bf16-cl-compile", "train", b) for b in BACKENDS)
    segmentation = [(r["img_per_s"], r["setting"], r["backend"]) for r in rows
                    if r["setting"].startswith("deeplab-os8") and r["backend"] != "synthetic" and r.get("img_per_s")]
    best = max(segmentation, default=None)
    evaluation = rate("r50-bf16-cl-compile", "eval", "gpu")
    bars = [
        ("ResNet-50 train, gpu backend: at least 5,000 img/s", gpu, 5000, f"{gpu:,.0f} img/s" if gpu else None),
        ("ResNet-50 train, gpu backend: at least 0.9 × synthetic", gpu and synthetic and gpu / synthetic, 0.9,
         f"{gpu / synthetic:.2f} ×" if gpu and synthetic else None),
        ("ResNet-50 train, gpu backend: at least 2.8 × pil", gpu and pil and gpu / pil, 2.8,
         f"{gpu / pil:.2f} ×" if gpu and pil else None),
        ("DeepLabV3+ R50 OS8 train from PNGs, batch 8: at least 150 img/s", best and best[0], 150,
         f"{best[0]:,.0f} img/s ({best[1]}, {best[2]})" if best else None),
        ("ResNet-50 eval, gpu backend: at least 8,000 img/s", evaluation, 8000,
         f"{evaluation:,.0f} img/s" if evaluation else None),
    ]
    return [{"bar": name, "measured": shown, "met": None if value is None else bool(value >= threshold)}
            for name, value, threshold, shown in bars]


def hardware_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return f"CPU ({line.split(':', 1)[1].strip()})"
    return f"CPU ({platform.machine()})"


def write_json(path, result):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
        json.dump(result, f, indent=1)
    os.replace(f.name, path)  # a run killed mid-write keeps the previous complete file


# -------------------------------------------------------------------------------------------------- main

def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--device", help="cuda or cpu (default: cuda when available)")
    add("--smoke", action="store_true", help="tiny images and models' inputs, 2 timed steps, no compilation: "
        "checks that every row runs, measures nothing")
    add("--settings", nargs="+", choices=[s.name for s in SETTINGS], help="settings to run (default: all)")
    add("--only", choices=["classification", "segmentation"], help="run one task's settings")
    add("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS), help="backends to run")
    add("--no-eval", action="store_true", help="skip the evaluation rows")
    add("--warmup", type=int, default=10, help="model warm-up steps on random batches (compilation, autotuning)")
    add("--data-warmup", type=int, default=16, help="steps from each loader before the timed ones")
    add("--steps", type=int, default=32, help="timed steps per row; a multiple of --workers times whole rounds "
        "of workers, which deliver their batches in bursts when they are the bottleneck")
    add("--workers", type=int, default=16, help="DataLoader workers (pil: decoding; gpu: file reading, or PNG "
        "decoding for segmentation)")
    add("-b", "--batch-size", type=int, default=256, help="classification batch")
    add("--crop-size", type=int, default=224, help="classification training crop and evaluation crop")
    add("--seg-batch-size", type=int, default=8, help="segmentation batch")
    add("--seg-crop-size", type=int, nargs=2, default=[512, 1024], metavar=("H", "W"), help="segmentation crop")
    add("--data-dir", default=os.path.join(tempfile.gettempdir(), "throughput-data"),
        help="where the generated trees are written once and reused (--smoke: this path + '-smoke')")
    add("--imagefolder", help="an existing ImageFolder tree (train/ and val/) instead of the generated JPEGs")
    add("--cityscapes", help="an existing Cityscapes root instead of the generated PNGs")
    add("--peak-tflops", type=float, help=f"the device's peak for MFU (default: {H100_PEAK_TFLOPS:.0f} on an "
        "H100, our dense bf16 measurement; none elsewhere)")
    add("--stop-after", type=float, metavar="SECONDS", help="start no further setting after this many seconds, "
        "so that a run under a time limit still ends with its table and bars")
    add("--out", default="throughput.json", help="JSON results, rewritten after every row")
    return p


def apply_smoke(opts):
    """Tiny everything; compilation is left out because on a CPU it alone takes minutes."""
    opts.warmup, opts.data_warmup, opts.steps, opts.workers = 1, 1, 2, 2
    opts.batch_size, opts.crop_size, opts.seg_batch_size, opts.seg_crop_size = 4, 32, 2, [64, 128]
    opts.data_dir = opts.data_dir.rstrip("/") + "-smoke"
    settings, seen = [], set()
    for s in SETTINGS:
        eager = Setting(**{**asdict(s), "compile": False, "name": s.name.replace("-compile", "")})
        if eager.name not in seen:
            seen.add(eager.name)
            settings.append(eager)
    return settings


def main(opts):
    started = time.perf_counter()
    settings = apply_smoke(opts) if opts.smoke else list(SETTINGS)
    if opts.settings:
        wanted = {name.replace("-compile", "") if opts.smoke else name for name in opts.settings}
        settings = [s for s in settings if s.name in wanted]
    if opts.only:
        settings = [s for s in settings if s.task == opts.only]
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:  # set_device and the allocator's statistics want an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    hardware = hardware_name(device)
    peak_tflops = opts.peak_tflops or (H100_PEAK_TFLOPS if "H100" in hardware else None)
    facts = {"hardware": hardware, "cpu_count": len(os.sched_getaffinity(0)), "torch": torch.__version__,
             "torchvision": torchvision.__version__, "date": time.strftime("%Y-%m-%d")}
    result = {**facts, "command": " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]), "smoke": opts.smoke,
              "peak_tflops": peak_tflops,
              "peak_tflops_source": "--peak-tflops" if opts.peak_tflops else
              "our dense bf16 measurement on an H100 (shared anchors)" if peak_tflops else None,
              "options": vars(opts),
              "settings": [asdict(s) for s in settings], "data": {}, "rows": [], "bars": []}
    if opts.steps % opts.workers:
        print(f"# note: --steps {opts.steps} is not a multiple of --workers {opts.workers}: rows bound by their "
              "workers are timed over a part of a round", flush=True)

    data = {}
    steps_per_row = opts.data_warmup + opts.steps
    if any(s.task == "classification" for s in settings):
        if opts.imagefolder:
            data["imagefolder"] = opts.imagefolder
        else:
            spec = SMOKE_JPEG_SPEC if opts.smoke else JPEG_SPEC
            spec = sized(spec, "per_class", steps_per_row * opts.batch_size, spec["classes"])
            data["imagefolder"] = os.path.join(opts.data_dir, "imagenet-like")
            print(f"# JPEG tree in {data['imagefolder']}", flush=True)
            result["data"]["imagefolder"] = {"spec": spec, **generate_once(data["imagefolder"], spec, write_jpeg_tree)}
    if any(s.task == "segmentation" for s in settings):
        if opts.cityscapes:
            data["cityscapes"] = opts.cityscapes
        else:
            spec = SMOKE_CITYSCAPES_SPEC if opts.smoke else CITYSCAPES_SPEC
            spec = sized(spec, "images", steps_per_row * opts.seg_batch_size)
            data["cityscapes"] = os.path.join(opts.data_dir, "cityscapes-like")
            print(f"# Cityscapes-layout PNG tree in {data['cityscapes']}", flush=True)
            result["data"]["cityscapes"] = {"spec": spec, **generate_once(data["cityscapes"], spec,
                                                                          write_cityscapes_tree)}
    result["data"].update({"paths": data})
    mfu = f"MFU against {peak_tflops:g} TFLOP/s" if peak_tflops else "no MFU (no --peak-tflops for this device)"
    print(f"# {hardware}, {facts['cpu_count']} CPUs, torch {facts['torch']}, torchvision {facts['torchvision']}; "
          f"{mfu}\n{markdown_header()}", flush=True)

    # The bars are stated for these sizes on a GPU; other runs report their rows only.
    issue_sizes = (opts.batch_size, opts.crop_size, opts.seg_batch_size, list(opts.seg_crop_size)) == \
        (256, 224, 8, [512, 1024])
    check = not opts.smoke and device.type == "cuda" and issue_sizes

    def report(row):
        result["rows"].append(row)
        if check:
            result["bars"] = check_bars(result["rows"])
        print(markdown_row(row, result["rows"]), flush=True)
        write_json(opts.out, result)

    for setting in settings:
        if opts.stop_after and time.perf_counter() - started > opts.stop_after:
            print(f"# {setting.name}: not started, --stop-after {opts.stop_after} s has passed", flush=True)
            result.setdefault("not_started", []).append(setting.name)
            continue
        try:
            run_setting(setting, opts, data, device, facts, peak_tflops, report)
        except Exception as e:  # a setting that cannot even be built or compiled: the next one still runs
            traceback.print_exc()
            print(f"# {setting.name}: failed before its rows, see above", flush=True)
            result.setdefault("failed_settings", {})[setting.name] = f"{type(e).__name__}: {e}"[-2000:]
            write_json(opts.out, result)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    write_json(opts.out, result)
    print(f"\n# all rows (× synthetic, × pil: against the same setting and step in this run)\n{markdown_header()}")
    for row in result["rows"]:
        print(markdown_row(row, result["rows"]))
    if result["bars"]:
        print("\n# the issue's bars")
        for bar in result["bars"]:
            verdict = {True: "met", False: "NOT met", None: "no row"}[bar["met"]]
            print(f"- {bar['bar']}: {bar['measured'] or '–'}, {verdict}")
    else:
        reason = "smoke run" if opts.smoke else "not a GPU" if device.type != "cuda" else "sizes other than the issue's"
        print(f"\n# bars not checked: {reason}")
    print(f"# wrote {opts.out}", flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
