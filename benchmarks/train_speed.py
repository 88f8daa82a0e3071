"""How much of the GPU's speed does classification/train.py keep? Run on a GPU machine:

    python benchmarks/train_speed.py --out speed.json [--jpeg-tree /tmp/jpegs]

For each setting it times the bare ResNet-50 training step (random GPU tensors, no script around it),
then runs train.py end to end on GPU-resident synthetic data with the same setting, and, when asked,
on a JPEG ImageFolder tree (the PIL DataLoader pipeline). It prints one row per setting and writes JSON.
"""
import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time

import torch
import torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {  # name: train.py flags
    "fp32 (TF32)": [],
    "amp float16": ["--amp"],
    "amp bfloat16 + channels_last": ["--amp-dtype", "bfloat16", "--channels-last"],
    "amp bfloat16 + channels_last + compile": ["--amp-dtype", "bfloat16", "--channels-last", "--compile"],
}


def bare_step_img_per_s(flags, batch_size, steps=30, warmup=15):
    """The model step alone: forward, loss, backward, fused SGD step, on tensors already on the GPU."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if "--channels-last" in flags else torch.contiguous_format
    dtype = torch.bfloat16 if "bfloat16" in flags else torch.float16 if "--amp" in flags else None
    model = torchvision.models.resnet50().cuda().to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    if "--compile" in flags:
        model.compile()
    images = torch.randn(batch_size, 3, 224, 224, device="cuda").to(memory_format=memory_format)
    labels = torch.randint(1000, (batch_size,), device="cuda")
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return batch_size * steps / (time.perf_counter() - start)


def script_img_per_s(flags, data_flags, epochs, timeout):
    """Median img/s of train.py's epochs after the first (which holds compilation and cuDNN autotuning)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, os.path.join(ROOT, "classification/train.py"), "--model", "resnet50",
               "--epochs", str(epochs), "--print-freq", "20", "--output-dir", out, *data_flags, *flags]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if run.returncode != 0:
            return {"error": run.stderr[-1500:]}
        with open(os.path.join(out, "log.jsonl")) as f:
            epochs_log = [json.loads(line) for line in f][1:]
        rates = sorted(epoch["img_per_s"] for epoch in epochs_log)
        return {"img_per_s": rates[len(rates) // 2] if rates else None, "epochs_img_per_s": rates,
                "peak_memory_gib": max((e["max_memory_mib"] or 0 for e in epochs_log), default=0) / 1024}


def write_jpeg(path, seed, size=(500, 375)):
    from PIL import Image
    generator = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (size[1] // 8, size[0] // 8, 3), generator=generator, dtype=torch.uint8)
    Image.fromarray(small.numpy()).resize(size, Image.BILINEAR).save(path, quality=90)


def write_jpeg_tree(root, classes=10, per_class=1280):
    """An ImageFolder tree of ImageNet-sized JPEGs (smooth random textures; only the decoding cost matters)."""
    jobs = []
    for split, count in (("train", per_class), ("val", per_class // 10)):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"class{c}"), exist_ok=True)
            jobs += [(os.path.join(root, split, f"class{c}", f"{i}.jpg"), len(jobs) + i) for i in range(count)]
    with multiprocessing.Pool() as pool:
        pool.starmap(write_jpeg, jobs, chunksize=64)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-b", "--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=6, help="train.py epochs per setting (the first is not counted)")
    p.add_argument("--synthetic-train-size", type=int, default=5120)
    p.add_argument("--jpeg-tree", help="also train on a JPEG ImageFolder tree written here (12,800 images)")
    p.add_argument("--jpeg-settings", nargs="*", default=["amp float16", "amp bfloat16 + channels_last + compile"],
                   help="the settings that also run on the JPEG tree")
    p.add_argument("--workers", type=int, default=16, help="DataLoader workers for the JPEG tree")
    p.add_argument("--settings", nargs="*", default=list(SETTINGS), help="which settings to run")
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--out", default="train_speed.json")
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "torchvision": torchvision.__version__,
              "date": time.strftime("%Y-%m-%d"), "batch_size": args.batch_size, "rows": []}
    synthetic = ["--synthetic-train-size", str(args.synthetic_train_size), "--synthetic-val-size", "1024",
                 "--train-crop-size", "224", "-b", str(args.batch_size)]
    if args.jpeg_tree and not os.path.isdir(os.path.join(args.jpeg_tree, "train")):
        write_jpeg_tree(args.jpeg_tree)
    print(f"{'setting':<42} {'bare step':>10} {'train.py':>10} {'kept':>6} {'JPEG tree':>10}")
    for name in args.settings:
        flags = SETTINGS[name]
        row = {"setting": name, "flags": flags, "bare_img_per_s": bare_step_img_per_s(flags, args.batch_size)}
        torch.cuda.empty_cache()
        row["synthetic"] = script_img_per_s(flags, synthetic, args.epochs, args.timeout)
        if args.jpeg_tree and name in args.jpeg_settings:
            jpeg = ["--data-path", args.jpeg_tree, "-b", str(args.batch_size), "-j", str(args.workers)]
            row["jpeg_tree"] = script_img_per_s(flags, jpeg, 3, args.timeout)
        result["rows"].append(row)
        script = row["synthetic"].get("img_per_s")
        kept = f"{100 * script / row['bare_img_per_s']:.0f}%" if script else "error"
        jpeg_rate = row.get("jpeg_tree", {}).get("img_per_s")
        print(f"{name:<42} {row['bare_img_per_s']:>10.0f} {script or 0:>10.0f} {kept:>6} {jpeg_rate or 0:>10.0f}",
              flush=True)
        for part in ("synthetic", "jpeg_tree"):
            if "error" in row.get(part, {}):
                print(f"  {part} failed: {row[part]['error']}", flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
