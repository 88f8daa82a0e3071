"""Seconds-long checks of what could go wrong on CUDA that the CPU tests cannot show, one check per process:

    python benchmarks/cuda_checks.py NAME --out-dir DIR             # on the GPU; the names: --help
    python benchmarks/cuda_checks.py NAME... --out-dir DIR --smoke  # tiny sizes on the CPU: the code runs

benchmarks/cuda_matrix.py (phase 1 of benchmarks/gpu_run.sh) runs each check in a process of its own, because a
CUDA fault ends the process's context, and reads DIR/NAME.json: the check's verdict ("pass", "fail", "info" for
a measurement without a bar, "error" for an exception) and the facts it rests on. A process that dies writes
nothing; its log says why.
"""
import argparse
import copy
import io
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script from anywhere

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.io import ImageReadMode, decode_jpeg

from classification.data import batch_mixer
from classification.gpu_preset import crop_resize, decode_batch, random_resized_crop_boxes
from common.checkpoint import Checkpointer
from common.engine import Precision, StepParts, to_device
from common.optim import create_optimizer
from segmentation.model import create_model as create_segmenter

CHECKS = {}


def check(function):
    CHECKS[function.__name__.replace("_", "-")] = function
    return function


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_of(function, device, repeats=3):
    """The median time of `repeats` calls, each between two device synchronisations."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def textured(height, width, seed=0):
    """uint8 [3, H, W]: smooth random blocks, a photo's kind of content for crops and codecs."""
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (1, 3, height // 50 + 2, width // 50 + 2), generator=generator).float()
    return F.interpolate(blocks, size=(height, width), mode="bilinear").round().to(torch.uint8)[0]


def jpeg_bytes(image, mode="RGB"):
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).convert(mode).save(buffer, format="JPEG", quality=90)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


@check
def crop_overflow(device, smoke):
    """classification/gpu_preset.py's crops on the device: a camera-sized bright image stays finite (roi_align's
    CUDA kernel sums a bin's samples in the canvas's dtype), and the device's crops equal the CPU's."""
    width, height = (806, 604) if smoke else (8064, 6048)
    bright = torch.full((3, height, width), 250, dtype=torch.uint8, device=device)
    crops = crop_resize([bright], torch.tensor([[0.0, 0.0, float(width), float(height)]]), 224)
    finite = bool(torch.isfinite(crops).all())
    bright_error = float((crops - 250).abs().max()) if finite else None
    height, width = (300, 400) if smoke else (3000, 4000)
    picture = textured(height, width)
    boxes = random_resized_crop_boxes(torch.tensor([height] * 4), torch.tensor([width] * 4),
                                      torch.Generator().manual_seed(0))
    on_cpu = crop_resize([picture] * 4, boxes, 224)
    on_device = crop_resize([picture.to(device)] * 4, boxes, 224).cpu()
    difference = (on_cpu - on_device).abs()
    facts = {"bright_image_finite": finite, "bright_image_max_error_levels": bright_error,
             "cpu_vs_device_max_abs_levels": float(difference.max()),
             "cpu_vs_device_mean_abs_levels": float(difference.mean())}
    passed = finite and bright_error <= 1e-3 and facts["cpu_vs_device_max_abs_levels"] <= 0.5
    return ("pass" if passed else "fail"), facts


@check
def cmyk_nvjpeg(device, smoke):
    """nvJPEG on a CMYK JPEG (one in 1,600 files of the benchmark tree, 22 in ImageNet): refused, which sends the
    file to Pillow, or decoded, in Pillow's colours or not; and what one such file costs a batch of 256, which
    decode_batch then decodes again one file at a time."""
    picture = textured(375, 500, seed=1)
    cmyk = jpeg_bytes(picture, "CMYK")
    expected = torch.from_numpy(np.array(Image.open(io.BytesIO(cmyk.numpy().tobytes())).convert("RGB")))
    facts = {}
    try:
        decoded = decode_jpeg(cmyk, mode=ImageReadMode.RGB, device=device).cpu()
        difference = (decoded.permute(1, 2, 0).int() - expected.int()).abs()
        facts.update(device_decoder="decoded it", mean_abs_levels_vs_pillow=float(difference.float().mean()),
                     max_abs_levels_vs_pillow=int(difference.max()))
    except RuntimeError as e:
        facts.update(device_decoder="refused it", refusal=str(e)[-300:])
    rgb = [jpeg_bytes(textured(375, 500, seed=2 + i)) for i in range(8)]
    batch = [rgb[i % 8] for i in range(32 if smoke else 256)]
    paths = [f"file{i}.jpg" for i in range(len(batch))]
    facts["batch"] = len(batch)
    facts["seconds_without_cmyk"] = seconds_of(lambda: decode_batch(batch, paths, device), device)
    facts["seconds_with_one_cmyk"] = seconds_of(lambda: decode_batch([cmyk] + batch[1:], paths, device), device)
    wrong_colours = facts["device_decoder"] == "decoded it" and facts["mean_abs_levels_vs_pillow"] > 2
    return ("fail" if wrong_colours else "pass"), facts


@check
def adamw_unfused_checkpoint(device, smoke):
    """A checkpoint whose AdamW state was saved unfused (an older run, or another device's) resumed through
    common/checkpoint.py into the fused AdamW the scripts build on CUDA: torch keeps the saved `step` on the CPU
    when the saved group was unfused. The next step must be finite and equal the plain implementation's."""
    torch.manual_seed(0)
    model = nn.Linear(16, 4)
    unfused = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=False, foreach=False)

    def one_step(module, optimizer, seed):
        module.zero_grad()
        inputs = torch.randn(8, 16, generator=torch.Generator().manual_seed(seed)).to(module.weight.device)
        module(inputs).square().mean().backward()
        optimizer.step()

    one_step(model, unfused, 1)
    flags, score = {"model": "linear"}, ("best_acc1", "top-1")

    def checkpointer(module, optimizer, folder, on):
        precision = Precision(on)
        parts = StepParts(module, None, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                          precision.grad_scaler(optimizer), precision)
        return Checkpointer(parts, folder, True, flags=flags, score=score)

    with tempfile.TemporaryDirectory() as folder:
        checkpointer(model, unfused, folder, torch.device("cpu")).save_on_all_ranks(0)
        resumed = copy.deepcopy(model).to(device)
        fused = create_optimizer("adamw", [{"params": list(resumed.parameters())}], 1e-2, 0.9, 0.0, device.type)
        checkpointer(resumed, fused, None, device).resume(os.path.join(folder, "checkpoint.pth"), "linear", ())
    reference = copy.deepcopy(model).to(device)
    plain = torch.optim.AdamW(reference.parameters(), lr=1e-2, fused=False, foreach=False)
    plain.load_state_dict(unfused.state_dict())
    one_step(resumed, fused, 2)
    one_step(reference, plain, 2)
    steps = [state["step"] for state in fused.state.values()]
    finite = all(bool(torch.isfinite(p).all()) for p in resumed.parameters())
    difference = max(float((a - b).detach().abs().max()) for a, b in zip(resumed.parameters(), reference.parameters()))
    facts = {"fused": fused.param_groups[0].get("fused"), "step_devices": sorted({str(s.device) for s in steps}),
             "finite": finite, "max_abs_difference_from_plain_adamw": difference}
    return ("pass" if finite and difference <= 1e-6 else "fail"), facts


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@check
def nccl_one_rank(device, smoke):
    """What of NCCL one GPU can show (it refuses two ranks on one device): a world of one process starts, sums an
    int64 tensor, meets a barrier and ends. On the CPU, gloo stands in."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    started = time.perf_counter()
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        total = torch.tensor([3], dtype=torch.int64, device=device)
        dist.all_reduce(total)
        dist.barrier(**({"device_ids": [device.index or 0]} if backend == "nccl" else {}))
        value = int(total.item())
    finally:
        dist.destroy_process_group()
    facts = {"backend": backend, "all_reduce_of_3": value, "seconds": round(time.perf_counter() - started, 2)}
    return ("pass" if value == 3 else "fail"), facts


@check
def mixup_copy(device, smoke):
    """MixUp/CutMix run in the training thread on the batch a pinned DataLoader gave, and their result is not
    pinned: its copy to the device waits. The time of mixer + copy against the copy alone, per step of the
    ResNet-50 V2 recipe's size (128 x 3 x 176 x 176)."""
    shape = (8, 3, 32, 32) if smoke else (128, 3, 176, 176)
    images, labels = torch.randn(shape), torch.randint(1000, (shape[0],))
    if device.type == "cuda":
        images, labels = images.pin_memory(), labels.pin_memory()
    mixer = batch_mixer(0.2, 1.0, 1000)
    copy_alone = seconds_of(lambda: to_device((images, labels), device), device, repeats=11)
    mixed_copy = seconds_of(lambda: to_device(mixer(images, labels), device), device, repeats=11)
    return "info", {"batch": list(shape), "ms_copy_of_pinned_batch": round(1e3 * copy_alone, 2),
                    "ms_mixer_and_copy": round(1e3 * mixed_copy, 2)}


@check
def deeplab_eval_sizes(device, smoke):
    """DeepLabV3+ R50 OS8 evaluation at the sizes VOC's and ADE20K's validation images come in: with
    cudnn.benchmark (the scripts' default) each new size searches convolution algorithms again. Seconds of a
    first pass over 10 sizes with it on and off, and of a second pass over the same sizes with it on."""
    sizes = [(32, 32 + 8 * k) for k in range(3)] if smoke else [(512, 512 + 24 * k) for k in range(10)]
    model = create_segmenter("deeplabv3plus_resnet50", 21, 8).eval().to(device, memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def forward_all():
        for height, width in sizes:
            images = torch.randn(1, 3, height, width, device=device).to(memory_format=torch.channels_last)
            with torch.inference_mode(), autocast:
                model(images)

    with torch.inference_mode(), autocast:  # CUDA's and cuDNN's lazy start-up, at a size not timed below
        model(torch.randn(1, 3, 64, 64, device=device).to(memory_format=torch.channels_last))
    facts = {"sizes": [f"{h}x{w}" for h, w in sizes]}
    for benchmark in (True, False):
        torch.backends.cudnn.benchmark = benchmark
        facts[f"seconds_first_pass_benchmark_{'on' if benchmark else 'off'}"] = round(
            seconds_of(forward_all, device, repeats=1), 3)
        if benchmark:
            facts["seconds_second_pass_benchmark_on"] = round(seconds_of(forward_all, device, repeats=1), 3)
    return "info", facts


@check
def predict_on_files(device, smoke):
    """classification/predict.py and segmentation/predict.py on image files with bfloat16 and channels_last: each
    image predicted once, the masks at the images' sizes; a 4000x3000 photo in 512-pixel sliding windows (DeepLabV3+
    R50 OS8, 19 classes) holds on the device what one window does, not full-size class scores (912 MB)."""
    from classification import predict as classify
    from classification.model import create_model as create_classifier
    from segmentation import predict as segment
    work = tempfile.mkdtemp(prefix="predict-check-")
    size, window, segmenter = ((96, 64), 32, "unet") if smoke else ((4000, 3000), 512, "deeplabv3plus_resnet50")
    pictures = {f"photos/{i}.jpg": (64, 48) for i in range(4)} | {"window/x.jpg": (window, window), "scan/x.jpg": size}
    for i, (name, (width, height)) in enumerate(pictures.items()):
        os.makedirs(os.path.dirname(os.path.join(work, name)), exist_ok=True)
        Image.fromarray(textured(height, width, i).permute(1, 2, 0).numpy()).save(os.path.join(work, name))
    torch.save({"model": create_classifier("resnet18", None, 10)[0].state_dict(), "class_names": list("abcdefghij"),
                "args": {"model": "resnet18", "data_path": None, "train_crop_size": 32}}, os.path.join(work, "c.pth"))
    torch.save({"model": create_segmenter(segmenter, 19, 8, unet_width=8).state_dict(),
                "class_names": [f"class {i}" for i in range(19)],
                "args": {"model": segmenter, "output_stride": 8, "unet_width": 8, "crop_size": [window, window]}},
               os.path.join(work, "s.pth"))
    flags = ["--device", str(device), "-j", "0", "--amp-dtype", "bfloat16", "--channels-last"]
    classify.main(classify.get_args_parser().parse_args(["--checkpoint", os.path.join(work, "c.pth"), *flags,
                                                         os.path.join(work, "photos"), "-o", os.path.join(work, "c")]))
    with open(os.path.join(work, "c", "predictions.csv")) as f:
        facts = {"csv_rows": len(f.read().splitlines()) - 1}
    for name in ("window", "scan"):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        segment.main(segment.get_args_parser().parse_args([
            "--checkpoint", os.path.join(work, "s.pth"), os.path.join(work, name), *flags, "--eval-mode", "slide",
            "--base-size", "0", "-o", os.path.join(work, f"s_{name}")]))
        facts[f"seconds_{name}"] = round(time.perf_counter() - started, 2)
        if device.type == "cuda":
            facts[f"peak_device_mib_{name}"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    facts["mask_size"] = list(Image.open(os.path.join(work, "s_scan", "masks", "x.png")).size)
    right = facts["csv_rows"] == 4 and facts["mask_size"] == list(size)
    if device.type == "cuda":  # the scan's windows on the device cost what one window alone does
        right = right and facts["peak_device_mib_scan"] <= 1.1 * facts["peak_device_mib_window"] + 64
    shutil.rmtree(work)
    return "pass" if right else "fail", facts


def run_check(name, device, smoke):
    """The check's result; an exception becomes verdict "error", so that the next check in the process runs."""
    started = time.perf_counter()
    try:
        verdict, facts = CHECKS[name](device, smoke)
    except Exception as e:  # noqa: BLE001 - reported, not hidden: the JSON carries it
        traceback.print_exc()
        verdict, facts = "error", {"error": f"{type(e).__name__}: {e}"[-2000:]}
    return {"check": name, "device": str(device), "verdict": verdict, "smoke": smoke,
            "seconds": round(time.perf_counter() - started, 1), "what": " ".join(CHECKS[name].__doc__.split()),
            "facts": facts}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="+", choices=sorted(CHECKS), metavar="NAME",
                   help=f"checks to run in this process, in order: {', '.join(CHECKS)}")
    p.add_argument("--out-dir", required=True, help="where NAME.json is written for each check")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: the code runs, nothing is judged")
    opts = p.parse_args()
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    os.makedirs(opts.out_dir, exist_ok=True)
    errors = 0
    for name in opts.names:
        result = run_check(name, device, opts.smoke)
        errors += result["verdict"] == "error"
        with open(os.path.join(opts.out_dir, f"{name}.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result), flush=True)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
