"""Issue 11's bars, checked against the rows of one throughput.py run, and the summary of a run's JSON:

    python benchmarks/bars.py RESULT.json     # facts, every row, each bar met / NOT met / no row

The summary reads only the JSON, which throughput.py rewrites after every row, so a run cut short still gets one.
"""
import json
import sys

R50 = "r50-bf16-cl-compile"  # ResNet-50 train and eval, bf16 + channels_last + compiled, batch 256, 224x224


def row(rows, step, backend, setting=R50):
    return next((r for r in rows if r["setting"] == setting and r["step"] == step and r["backend"] == backend
                 and r.get("img_per_s")), None)


def rate(rows, step, backend):
    found = row(rows, step, backend)
    return found and (found["img_per_s"], f"{found['img_per_s']:,.0f} img/s")


def times(rows, backend):
    gpu, other = row(rows, "train", "gpu"), row(rows, "train", backend)
    return gpu and other and (gpu["img_per_s"] / other["img_per_s"],
                              f"{gpu['img_per_s'] / other['img_per_s']:.2f} × {backend}")


def memory_over_synthetic(rows):
    gpu, synthetic = row(rows, "train", "gpu"), row(rows, "train", "synthetic")
    if not (gpu and synthetic and gpu.get("peak_memory_gib") is not None):
        return None
    extra = gpu["peak_memory_gib"] - synthetic["peak_memory_gib"]
    return extra, f"{gpu['peak_memory_gib']:.1f} GiB vs {synthetic['peak_memory_gib']:.1f} GiB synthetic ({extra:+.1f})"


def segmentation(rows):
    """The faster DeepLabV3+ OS8 gpu row, compiled or not: the bar asks for the speed, not the setting."""
    found = [r for r in rows if r["setting"].startswith("deeplab-os8") and r["step"] == "train"
             and r["backend"] == "gpu" and r.get("img_per_s")]
    if not found:
        return None
    best = max(found, key=lambda r: r["img_per_s"])
    memory = f", peak {best['peak_memory_gib']:.1f} GiB" if best.get("peak_memory_gib") is not None else ""
    return best["img_per_s"], f"{best['img_per_s']:,.0f} img/s ({best['setting']}{memory})"


# The bars: what each says, how this run's rows answer it (value and text, or None without its rows), and the
# threshold the value is held to.
BARS = [
    ("ResNet-50 train, gpu: at least 5,000 img/s", lambda rows: rate(rows, "train", "gpu"), ">=", 5000),
    ("ResNet-50 train, gpu: at least 0.9 × synthetic", lambda rows: times(rows, "synthetic"), ">=", 0.9),
    ("ResNet-50 train, gpu: at least 2.8 × pil", lambda rows: times(rows, "pil"), ">=", 2.8),
    ("ResNet-50 train, gpu: peak memory at most synthetic's + 4 GiB", memory_over_synthetic, "<=", 4.0),
    ("ResNet-50 eval, gpu: at least 8,000 img/s", lambda rows: rate(rows, "eval", "gpu"), ">=", 8000),
    ("DeepLabV3+ R50 OS8 train, 512×1024 from PNGs, batch 8, gpu: at least 150 img/s", segmentation, ">=", 150),
]


def check_bars(rows, judged=True):
    """Each bar with what this run measured; `met` is None without its rows, or when not judged (a run on other
    sizes or hardware than the bars are stated for)."""
    results = []
    for name, measure, direction, threshold in BARS:
        measured = measure(rows)
        met = None
        if measured and judged:
            met = bool(measured[0] >= threshold if direction == ">=" else measured[0] <= threshold)
        results.append({"bar": name, "measured": measured[1] if measured else None, "met": met})
    return results


def summary(result):
    """The printed end of a run: its facts, and each bar's verdict."""
    facts = (f"{result.get('hardware')}, driver {result.get('driver') or '–'}, {result.get('cpu_count')} CPUs, "
             f"torch {result.get('torch')}, torchvision {result.get('torchvision')}, {result.get('date')}")
    judged = result.get("bars_judged", False)
    lines = [f"# {facts}", f"# {len(result.get('rows', []))} rows; settings not started: "
             f"{', '.join(result.get('not_started', [])) or 'none'}; failed: "
             f"{', '.join(result.get('failed_settings', {})) or 'none'}",
             "# the issue's bars" + ("" if judged else f" (not judged: {result.get('bars_not_judged_because')})")]
    for bar in check_bars(result.get("rows", []), judged):
        verdict = {True: "PASS", False: "FAIL", None: "no row" if not bar["measured"] else "not judged"}[bar["met"]]
        lines.append(f"- {verdict}: {bar['bar']}: {bar['measured'] or '–'}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if len(sys.argv) == 2 else 2)
    with open(sys.argv[1]) as f:
        print(summary(json.load(f)))
