"""Phase 2 of benchmarks/gpu_run.sh: the gpu backend decodes JPEGs as the CPU does.

    python benchmarks/decode_check.py --out DIR            # on the GPU machine: 10,000 files of the JPEG tree
    python benchmarks/decode_check.py --out DIR --smoke    # the smoke tree on the CPU, torchvision's CPU decoder
                                                           # standing in for nvJPEG: the code runs, nothing is judged

Three passes over the long-tailed JPEG tree of benchmarks/trees.py (written once under --data-dir and shared with
throughput.py), each a separate section of DIR/decode.json:
  decode       classification/gpu_preset.py's decode_batch (nvJPEG, and Pillow for what it leaves) against Pillow's
               decode of the same files in DataLoader workers, before any augmentation: the absolute difference of
               every pixel value, its mean and 99.9th percentile over the files the device decoded (the bar: at
               most 1 and 8 levels of 255), per file kind, and the files whose shape differs;
  side-stream  the same decoding inside common/device_loader.py's DeviceLoader, on its side CUDA stream in its
               thread, while the training thread runs a ResNet-50 training step per batch; compared with Pillow
               again, and with the first pass file by file;
  presets      GpuPreset's training batches (decode, crop, flip, normalise) through DeviceLoader with and without
               its thread and side stream: equal bit for bit, and the time of each.
No pass starts after --stop-after seconds; the JSON is rewritten after each.
"""
import argparse
import io
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script from anywhere

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.models import resnet18, resnet50
from torchvision.transforms.v2.functional import pil_to_tensor

from benchmarks import trees
from benchmarks.report import environment, write_json
from classification.gpu_preset import EncodedSamples, GpuPreset, collate_encoded, decode_batch, nvjpeg, read_file_bytes
from common.data import BatchLayout, TrainingSampler
from common.device_loader import DeviceLoader
from common.data import MEAN, STD, read_image
from common.optim import create_optimizer

BAR = {"mean_abs_levels": 1.0, "p99_9_levels": 8}


class EncodedAndDecoded(Dataset):
    """(file bytes, Pillow's RGB decode of them [3, H, W] uint8, index): what the gpu backend's workers read,
    and the CPU's answer for the same bytes."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        data = read_file_bytes(self.paths[index])
        reference = pil_to_tensor(read_image(io.BytesIO(data), name=self.paths[index]))
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), reference, index


def collate_lists(batch):
    return tuple(list(items) for items in zip(*batch))


class NotingDecoder:
    """decode_batch's device decoder, noting which files it decoded (decode_batch sends the others to Pillow)."""

    def __init__(self, decode):
        self.decode, self.decoded = decode, set()

    def __call__(self, encoded, device):
        images = self.decode(encoded, device)
        self.decoded.update(id(data) for data in (encoded if isinstance(encoded, list) else [encoded]))
        return images

    def decode_batch(self, encoded, paths, device):
        """decode_batch's images, and which decoder took each file ("device" or "pillow")."""
        self.decoded.clear()
        images = decode_batch(encoded, paths, device, self)
        return images, ["device" if id(data) in self.decoded else "pillow" for data in encoded]


def cpu_stand_in(encoded, device):
    """--smoke: torchvision's CPU decoder where nvJPEG would decode."""
    return decode_jpeg(encoded, mode=ImageReadMode.RGB)


def statistics_of(histogram):
    histogram = histogram.cpu().double()
    count = histogram.sum().item()
    if count == 0:
        return {"values": 0}
    levels = torch.arange(256, dtype=torch.float64)
    return {"values": int(count), "mean_abs_levels": round((histogram * levels).sum().item() / count, 4),
            "p99_9_levels": int((histogram.cumsum(0) < 0.999 * count).sum().item()),
            "max_levels": int(levels[histogram > 0].max().item())}


class Differences:
    """Histograms of |device - Pillow| over every pixel value, by (decoder, file kind), kept on the device until
    the end, and each file's mean and largest difference."""

    def __init__(self, device):
        self.device, self.histograms, self.files, self.shape_mismatch = device, {}, {}, []

    def add(self, index, kind, decoder, image, reference):
        reference = reference.to(self.device, non_blocking=True)
        if image.shape != reference.shape:
            self.shape_mismatch.append(index)
            return
        difference = (image.to(torch.int16) - reference.to(torch.int16)).abs_().flatten()
        if (decoder, kind) not in self.histograms:
            self.histograms[decoder, kind] = torch.zeros(256, dtype=torch.int64, device=self.device)
        self.histograms[decoder, kind] += torch.bincount(difference, minlength=256)
        self.files[index] = (decoder, kind, difference.float().mean(), difference.max())

    def per_file(self):
        """{index: (mean, max)} as Python numbers (one device sync)."""
        if not self.files:
            return {}
        means = torch.stack([mean for *_, mean, _ in self.files.values()]).tolist()
        maxima = torch.stack([largest for *_, largest in self.files.values()]).tolist()
        return {i: (round(m, 4), int(x)) for i, m, x in zip(self.files, means, maxima)}

    def summary(self):
        """Statistics over the files the device decoded (what the bar judges), over all files, by decoder and
        kind; the files of another shape; the five worst files."""
        def total(keys):
            chosen = [self.histograms[key] for key in keys]
            return statistics_of(sum(chosen)) if chosen else {"values": 0}
        per_file = self.per_file()
        files = {key: sum(1 for decoder, kind, *_ in self.files.values() if (decoder, kind) == key)
                 for key in self.histograms}
        worst = sorted(per_file.items(), key=lambda item: -item[1][0])[:5]
        return {"device_decoded": total([key for key in self.histograms if key[0] == "device"]),
                "device_files": sum(count for (decoder, _), count in files.items() if decoder == "device"),
                "all_files": total(list(self.histograms)),
                "by_decoder_and_kind": {f"{decoder}/{kind}": {"files": files[decoder, kind],
                                                               **statistics_of(self.histograms[decoder, kind])}
                                        for decoder, kind in sorted(self.histograms)},
                "shape_mismatch_files": self.shape_mismatch,
                "worst_files_by_mean": [{"index": i, "mean_abs_levels": m, "max_levels": x} for i, (m, x) in worst]}


def bar_met(stats, judged):
    """None when not judged (smoke, CPU); False without a device-decoded file or with a file of another shape."""
    device = stats["device_decoded"]
    if not judged:
        return None
    if not device.get("values") or stats["shape_mismatch_files"]:
        return False
    return device["mean_abs_levels"] <= BAR["mean_abs_levels"] and device["p99_9_levels"] <= BAR["p99_9_levels"]


# ------------------------------------------------------------------------------------------------ passes

def reference_loader(paths, opts):
    return DataLoader(EncodedAndDecoded(paths), batch_size=opts.batch_size, num_workers=opts.workers,
                      collate_fn=collate_lists)


def decode_pass(paths, kinds, device, decoder, opts):
    differences, noting, started, decode_seconds = Differences(device), NotingDecoder(decoder), time.perf_counter(), 0
    for encoded, references, indices in reference_loader(paths, opts):
        t0 = time.perf_counter()
        images, decoders = noting.decode_batch(encoded, [paths[i] for i in indices], device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        decode_seconds += time.perf_counter() - t0
        for index, decoder_name, image, reference in zip(indices, decoders, images, references):
            differences.add(index, kinds[index], decoder_name, image, reference)
    stats = differences.summary()
    stats.update(files=len(paths), seconds=round(time.perf_counter() - started, 1),
                 decode_batch_img_per_s=round(len(paths) / decode_seconds, 1) if decode_seconds else None)
    return stats, differences.per_file()


class DecodeOnly:
    """DeviceLoader's prepare for the side-stream pass: decode_batch alone, the batch as one flat uint8 tensor and
    a tensor of (index, C, H, W) per file (DeviceLoader hands tensors between the streams). Pillow's decodes and
    which decoder took each file wait in `references` and `decoders` for the training thread."""

    def __init__(self, paths, device, decoder):
        self.paths, self.device, self.noting = paths, device, NotingDecoder(decoder)
        self.references, self.decoders = {}, {}

    def __call__(self, batch, generator):
        encoded, references, indices = batch
        images, decoders = self.noting.decode_batch(encoded, [self.paths[i] for i in indices], self.device)
        self.references.update(zip(indices, references))
        self.decoders.update(zip(indices, decoders))
        flat = torch.cat([image.flatten() for image in images])
        shapes = torch.tensor([[i, *image.shape] for i, image in zip(indices, images)]).to(self.device)
        return flat, shapes


def training_step(device, smoke):
    """One optimizer step of ResNet-50 on a random batch, as the scripts take it (bf16, channels_last, SGD built
    by common/optim.py), to run on the main stream while the side stream decodes."""
    model = (resnet18() if smoke else resnet50()).to(device, memory_format=torch.channels_last)
    optimizer = create_optimizer("sgd", model, 0.01, 0.9, 1e-4, device.type)
    size, batch = (32, 2) if smoke else (224, 64)
    images = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    targets = torch.randint(1000, (batch,), device=device)
    losses = []

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return step, losses


def side_stream_pass(paths, kinds, device, decoder, opts, first):
    prepare = DecodeOnly(paths, device, decoder)
    step, losses = training_step(device, opts.smoke)
    differences, started = Differences(device), time.perf_counter()
    for flat, shapes in DeviceLoader(reference_loader(paths, opts), prepare, device, seed=0, threaded=True):
        step()  # on the main stream, allocating and freeing while the next batch decodes on the side stream
        offset = 0
        for index, channels, height, width in shapes.tolist():
            image = flat[offset:offset + channels * height * width].view(channels, height, width)
            offset += image.numel()
            differences.add(index, kinds[index], prepare.decoders.pop(index), image, prepare.references.pop(index))
    stats = differences.summary()
    changed = [i for i, values in differences.per_file().items() if first.get(i) != values]
    stats.update(files=len(paths), seconds=round(time.perf_counter() - started, 1),
                 files_decoded_otherwise_than_the_first_pass=changed[:20], count_changed=len(changed),
                 training_losses_finite=bool(torch.isfinite(torch.stack(losses)).all()) if losses else None)
    return stats


def presets_pass(paths, device, opts):
    samples = [(path, 0) for path in paths[:opts.preset_batches * opts.preset_batch_size]]
    encoded = EncodedSamples(samples)
    # A training sampler, as the scripts use: each batch's crops are drawn from a generator of its place in the run.
    sampler = TrainingSampler(encoded, BatchLayout(batch_size=opts.preset_batch_size), seed=0)
    loader = DataLoader(encoded, batch_size=opts.preset_batch_size, num_workers=opts.workers, sampler=sampler,
                        collate_fn=collate_encoded, drop_last=True)
    preset = GpuPreset([path for path, _ in samples], device, True, opts.crop_size, opts.crop_size * 256 // 224,
                       MEAN, STD)
    outputs, result = {}, {"batches": len(loader), "batch": opts.preset_batch_size}
    for threaded in (True, False):
        started = time.perf_counter()
        outputs[threaded] = list(DeviceLoader(loader, preset, device, seed=0, threaded=threaded))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        result[f"img_per_s_{'threaded' if threaded else 'unthreaded'}"] = round(len(loader) * loader.batch_size
                                                                                / seconds, 1)
    result["bit_exact"] = len(outputs[True]) == len(outputs[False]) and all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(outputs[True], outputs[False]))
    return result


# --------------------------------------------------------------------------------------------------- main

def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--out", required=True, help="folder of decode.json and summary.txt")
    add("--device", help="cuda or cpu (default: cuda when available)")
    add("--smoke", action="store_true", help="the smoke tree, on the CPU decoder: the code runs, nothing is judged")
    add("--files", type=int, default=10_000, help="JPEG tree files compared (default: 10000)")
    add("--data-dir", default=os.path.join(tempfile.gettempdir(), "throughput-data"),
        help="where throughput.py writes its trees (the same default; --smoke: this path + '-smoke')")
    add("--workers", type=int, help="DataLoader workers (default: the CPUs, at most 16; 0 with --smoke)")
    add("-b", "--batch-size", type=int, default=64, help="files decoded per batch (default: 64)")
    add("--preset-batches", type=int, default=20, help="presets pass: batches (default: 20)")
    add("--preset-batch-size", type=int, default=256, help="presets pass: batch (default: 256)")
    add("--crop-size", type=int, default=224, help="presets pass: training crop (default: 224)")
    add("--stop-after", type=float, metavar="SECONDS", help="start no pass after this many seconds")
    return p


def summary_lines(result):
    lines = [f"# phase 2, GPU decoding against Pillow's, on {result['hardware']}"
             + (" (smoke: not judged)" if result["smoke"] else "")]
    for name in ("decode", "side_stream"):
        section = result.get(name)
        if section is None:
            lines.append(f"- {name}: not run ({', '.join(result['not_started']) or 'failed'})")
            continue
        device = section["device_decoded"]
        verdict_text = {True: "PASS", False: "FAIL", None: "not judged"}[section["bar_met"]]
        lines.append(f"- {verdict_text}: {name}: {device.get('values', 0):,} values of "
                     f"{section['files']:,} files ({section.get('device_files', '?')} decoded on the device): mean "
                     f"|diff| {device.get('mean_abs_levels', '–')} levels (bar <= {BAR['mean_abs_levels']:g}), "
                     f"99.9th percentile {device.get('p99_9_levels', '–')} (bar <= {BAR['p99_9_levels']}), max "
                     f"{device.get('max_levels', '–')}; shape mismatches {len(section['shape_mismatch_files'])}")
        if name == "side_stream":
            lines.append(f"  files decoded otherwise than in the first pass: {section['count_changed']}; training "
                         f"losses finite: {section['training_losses_finite']}")
    presets = result.get("presets")
    if presets:
        lines.append(f"- {'PASS' if presets['bit_exact'] else 'FAIL'}: presets with and without the side stream "
                     f"{'equal bit for bit' if presets['bit_exact'] else 'DIFFER'} ({presets['batches']} batches of "
                     f"{presets['batch']}); img/s threaded {presets['img_per_s_threaded']}, unthreaded "
                     f"{presets['img_per_s_unthreaded']}")
    return lines


def main(opts):
    started = time.perf_counter()
    spec = trees.SMOKE_JPEG_SPEC if opts.smoke else trees.JPEG_SPEC
    root = os.path.join(opts.data_dir.rstrip("/") + ("-smoke" if opts.smoke else ""), "imagenet-like")
    print(f"# JPEG tree in {root}", flush=True)
    tree = trees.generate_once(root, spec, trees.write_jpeg_tree)  # its worker processes fork before CUDA starts
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    if opts.workers is None:
        opts.workers = 0 if opts.smoke else min(len(os.sched_getaffinity(0)), 16)
    if opts.smoke:
        opts.preset_batches, opts.preset_batch_size, opts.crop_size = 2, 4, 32
    result = {**environment(device), "smoke": opts.smoke, "bar": BAR, "options": vars(opts), "not_started": [],
              "tree": {"root": root, **tree}}
    os.makedirs(opts.out, exist_ok=True)
    out = os.path.join(opts.out, "decode.json")
    jobs = trees.jpeg_jobs(root, spec)[:opts.files]
    paths, kinds = [job[0] for job in jobs], [job[4] for job in jobs]
    decoder = nvjpeg if device.type == "cuda" else cpu_stand_in
    judged = device.type == "cuda" and not opts.smoke
    write_json(out, result)

    def may_start(name):
        if opts.stop_after and time.perf_counter() - started > opts.stop_after:
            result["not_started"].append(name)
            return False
        print(f"# {name}", flush=True)
        return True

    first = {}
    if may_start("decode"):
        result["decode"], first = decode_pass(paths, kinds, device, decoder, opts)
        result["decode"]["bar_met"] = bar_met(result["decode"], judged)
        write_json(out, result)
    if may_start("side_stream"):
        side = result["side_stream"] = side_stream_pass(paths, kinds, device, decoder, opts, first)
        passed = bar_met(side, judged)
        side["bar_met"] = passed if passed is None else \
            passed and not side["count_changed"] and bool(side["training_losses_finite"])
        write_json(out, result)
    if may_start("presets"):
        result["presets"] = presets_pass(paths, device, opts)
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_json(out, result)
    text = "\n".join(summary_lines(result))
    with open(os.path.join(opts.out, "summary.txt"), "w") as f:
        f.write(text + "\n")
    print(text, flush=True)
    failed = any(result.get(name, {}).get("bar_met") is False for name in ("decode", "side_stream")) or \
        (result.get("presets") is not None and not result["presets"]["bit_exact"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
