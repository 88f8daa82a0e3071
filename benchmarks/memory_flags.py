"""Phase 3 of benchmarks/gpu_run.sh: what --grad-checkpointing saves. The peak GPU memory of the training step with
and without it, for ResNet-50 (batch 256, 224x224) and DeepLabV3+ R50 OS8 (batch 8, 512x1024), bf16 and
channels_last as the bars' rows run them (compilation is left out: the scripts refuse it with the flag):

    python benchmarks/memory_flags.py --out DIR            # on the GPU machine: each setting in a process of its own
    python benchmarks/memory_flags.py --out DIR --smoke    # tiny sizes on the CPU, in this process: the code runs

The step is the scripts' own: common.engine.train_step with the model (checkpointed as train.py does it),
optimizer and scaler built as train.py builds them (benchmarks/run_step.py), on random batches already on the
device, so that the input pipeline takes no memory of its own. After 3 warm-up steps (cuDNN's algorithm search,
the optimizer's state), `state` is the memory allocated (weights, optimizer state) and `peak` the most allocated
during the next 7 steps (one input batch, gradients and activations on top); img/s is timed over the last 5.
Writes DIR/memory.json and DIR/summary.txt.
"""
import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script from anywhere

import torch

from benchmarks.report import environment, write_json
from benchmarks.run_step import Runner, script_args
from benchmarks.throughput import Setting, pick_device
from benchmarks.timing import Batches, SyntheticLoader, random_batches, time_row, warm_up

SETTINGS = [Setting(f"{name}{suffix}", task, model, "bfloat16", True, False, ("synthetic",),
                    grad_checkpointing=bool(suffix))
            for name, task, model in (("r50-bf16-cl", "classification", "resnet50"),
                                      ("deeplab-os8-bf16-cl", "segmentation", "deeplabv3plus_resnet50"))
            for suffix in ("", "-grad-ckpt")]
NUM_CLASSES = {"classification": 1000, "segmentation": 19}  # ImageNet's head, Cityscapes' classes


def sizes(smoke):
    if smoke:
        return SimpleNamespace(batch_size=2, crop_size=32, seg_batch_size=2, seg_crop_size=[32, 64], workers=0,
                               warmup=0, data_warmup=1, steps=1)
    return SimpleNamespace(batch_size=256, crop_size=224, seg_batch_size=8, seg_crop_size=[512, 1024], workers=0,
                           warmup=3, data_warmup=2, steps=5)


def measure(setting, device, smoke):
    """One setting's state and peak memory (GiB, None off CUDA) and img/s of its training step."""
    opts = sizes(smoke)
    data = {"imagefolder": os.devnull, "cityscapes": os.devnull}  # parsed by the scripts, never read
    args = script_args(setting, opts, data, device, "synthetic")
    runner = Runner(setting, args, device, NUM_CLASSES[setting.task])
    warm_up(runner, True, opts.warmup)
    state = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    batches = Batches(SyntheticLoader(random_batches(runner, True, count=1)), args.batch_size)  # one input batch
    row = time_row(runner, batches, True, opts)
    size = f"{args.crop_size[0]}x{args.crop_size[1]}" if setting.task == "segmentation" else \
        f"{args.train_crop_size}x{args.train_crop_size}"
    return {"setting": setting.name, "model": setting.model, "grad_checkpointing": setting.grad_checkpointing,
            "batch": args.batch_size, "input": size, "dtype": setting.dtype, "channels_last": setting.channels_last,
            "optimizer": runner.optimizer_label, "state_gib": round(state, 2) if state is not None else None,
            **row}


def in_own_process(setting, out, smoke):
    """measure() in a child process (a CUDA fault or an out-of-memory ends that one only); its log beside."""
    path, log = os.path.join(out, f"{setting.name}.json"), os.path.join(out, f"{setting.name}.log")
    argv = [sys.executable, os.path.abspath(__file__), "--out", out, "--one", setting.name] + ["--smoke"] * smoke
    with open(log, "w") as f:
        done = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode == 0 and os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    with open(log, errors="replace") as f:
        tail = " | ".join(f.read().strip().splitlines()[-3:])[-800:]
    return {"setting": setting.name, "error": f"exited with {done.returncode}: {tail}"}


def saving_lines(rows):
    lines = []
    by_name = {row["setting"]: row for row in rows}
    for base in ("r50-bf16-cl", "deeplab-os8-bf16-cl"):
        without, with_flag = by_name.get(base), by_name.get(f"{base}-grad-ckpt")
        if not (without and with_flag) or "error" in without or "error" in with_flag:
            errors = [row["error"] for row in (without, with_flag) if row and "error" in row]
            lines.append(f"- {base}: no comparison ({'; '.join(errors) or 'not run'})")
            continue
        speed = f"{without['img_per_s']:,.1f} -> {with_flag['img_per_s']:,.1f} img/s"
        if without["peak_memory_gib"] is None:
            lines.append(f"- {base}, batch {without['batch']}, {without['input']}: no memory figures off CUDA; {speed}")
            continue
        change = with_flag["peak_memory_gib"] / without["peak_memory_gib"] - 1
        lines.append(f"- {base}, batch {without['batch']}, {without['input']}: peak {without['peak_memory_gib']:.2f} "
                     f"-> {with_flag['peak_memory_gib']:.2f} GiB with --grad-checkpointing ({100 * change:+.0f}%; "
                     f"weights and optimizer state {without['state_gib']:.2f} GiB); {speed}")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder of memory.json, summary.txt and each setting's log")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, all settings in this process")
    p.add_argument("--one", choices=[s.name for s in SETTINGS], help=argparse.SUPPRESS)  # the child's setting
    opts = p.parse_args()
    os.makedirs(opts.out, exist_ok=True)
    device = pick_device(opts.device)
    if opts.one:
        setting = next(s for s in SETTINGS if s.name == opts.one)
        write_json(os.path.join(opts.out, f"{setting.name}.json"), measure(setting, device, opts.smoke))
        return 0
    started, rows = time.perf_counter(), []
    result = {**environment(device), "smoke": opts.smoke, "rows": rows}
    for setting in SETTINGS:
        if opts.smoke:  # float32: a CPU without bfloat16 instructions emulates it ten times slower
            try:
                rows.append(measure(Setting(**{**asdict(setting), "dtype": "float32"}), device, True))
            except Exception as e:  # noqa: BLE001 - recorded in the JSON, as a child's failure is
                traceback.print_exc()
                rows.append({"setting": setting.name, "error": f"{type(e).__name__}: {e}"[-800:]})
        else:
            rows.append(in_own_process(setting, opts.out, False))
        print(json.dumps(rows[-1]), flush=True)
        write_json(os.path.join(opts.out, "memory.json"), result)
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_json(os.path.join(opts.out, "memory.json"), result)
    lines = [f"# phase 3, peak GPU memory of the training step with and without --grad-checkpointing, on "
             f"{result['hardware']}{' (smoke)' if opts.smoke else ''}: {result['seconds']} s", *saving_lines(rows)]
    with open(os.path.join(opts.out, "summary.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
