"""What benchmarks/throughput.py writes: the environment's facts, one Markdown row per configuration, the JSON."""
import contextlib
import json
import os
import platform
import subprocess
import tempfile
import time

import torch
import torchvision

DTYPE_LABELS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32 (TF32)"}
COLUMNS = ["step", "model", "input", "backend", "dtype", "memory format", "compiled", "batch", "img/s",
           "× synthetic", "× pil", "peak memory", "MFU", "measured on"]


def hardware_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return f"CPU ({line.split(':', 1)[1].strip()})"
    return f"CPU ({platform.machine()})"


def driver_version():
    """The NVIDIA driver, which torch does not report; None without nvidia-smi."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        return done.stdout.split("\n")[0].strip() or None
    return None


def environment(device):
    facts = {"hardware": hardware_name(device), "cpu_count": len(os.sched_getaffinity(0)), "torch": torch.__version__,
             "torchvision": torchvision.__version__, "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d")}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        facts.update(driver=driver_version(), gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                     cudnn=torch.backends.cudnn.version())
    return facts


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


def write_json(path, result):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
        json.dump(result, f, indent=1)
    os.replace(f.name, path)  # a run killed mid-write keeps the previous complete file
