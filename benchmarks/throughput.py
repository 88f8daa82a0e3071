"""End-to-end throughput of the training and evaluation steps, per input pipeline. Run on a GPU machine:

    benchmarks/gpu_run.sh RESULTS_DIR                                     # everything, under 8 minutes
    python benchmarks/throughput.py --out runs/throughput.json            # the rows alone
    python benchmarks/throughput.py --device cpu --smoke                  # tiny sizes: proves it runs

Every row times the step the scripts themselves run: common.engine.train_step (train rows) or
common.engine.evaluate (eval rows), fed by classification/data.py's or segmentation/data.py's own loader for
the backend (synthetic: random batches on the device, the model-step ceiling; gpu: device decoding and
augmentation; pil: decoding in DataLoader workers, the baseline), with arguments from the scripts' own parsers
(benchmarks/run_step.py). Images come from generated trees of long-tailed JPEGs and Cityscapes-like PNGs
(benchmarks/trees.py), written once under --data-dir. It prints one Markdown row per configuration as it
finishes and rewrites the JSON of --out after each; benchmarks/bars.py states the issue's bars.
"""
import argparse
import gc
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from functools import cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script from anywhere

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import trees
from benchmarks.bars import check_bars, summary
from benchmarks.report import environment, markdown_header, markdown_row, write_json
from benchmarks.run_step import Runner, load, prepare, script_args
from benchmarks.timing import Batches, SyntheticLoader, input_size, random_batches, time_row, warm_up
from classification.model import create_model as create_classifier
from segmentation.model import create_model as create_segmenter

BACKENDS = ("synthetic", "gpu", "pil")
# Dense bfloat16 rate we measured on one H100 (the project's shared anchors), not the datasheet's figure; the
# H200 has the same GH100 compute, with more and faster memory.
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
    grad_checkpointing: bool = False


# In the order they run: what the issue's bars need first, so that a run cut short still answers them (the
# segmentation bar first by the setting that needs no compilation), then the other compilations.
SETTINGS = [
    Setting("r50-bf16-cl-compile", "classification", "resnet50", "bfloat16", True, True, BACKENDS, BACKENDS),
    Setting("deeplab-os8-bf16-cl", "segmentation", "deeplabv3plus_resnet50", "bfloat16", True, False, BACKENDS),
    Setting("deeplab-os8-bf16-cl-compile", "segmentation", "deeplabv3plus_resnet50", "bfloat16", True, True,
            BACKENDS),
    Setting("r50-fp16", "classification", "resnet50", "float16", False, False, ("synthetic", "gpu")),
    Setting("r50-fp32", "classification", "resnet50", "float32", False, False, ("synthetic", "gpu")),
    Setting("deeplab-os16-bf16-cl-compile", "segmentation", "deeplabv3plus_resnet50", "bfloat16", True, True,
            ("synthetic", "gpu"), output_stride=16),
]


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


# ------------------------------------------------------------------------------------------------- rows

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


def measure_row(runner, setting, opts, data, device, backend, train, class_names):
    """One row's timing: the backend's loader, warmed up, then the timed steps; the loader is closed after."""
    batches = None
    try:
        if not train and backend == "synthetic":
            loader = SyntheticLoader(random_batches(runner, False))
        else:
            loader = load(setting, script_args(setting, opts, data, device, backend), device, class_names, train)
        batches = Batches(loader, runner.args.batch_size)
        return time_row(runner, batches, train, opts)
    finally:
        if batches is not None:
            batches.close()
        loader = batches = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_setting(setting, opts, data, device, facts, peak_tflops, report, out_of_time):
    args = script_args(setting, opts, data, device, "pil")
    class_names = prepare(setting, args, device)
    print(f"# {setting.name}: building{' and compiling' if setting.compile else ''} the model", flush=True)
    runner = Runner(setting, args, device, len(class_names))
    started = time.perf_counter()
    warm_up(runner, True, opts.warmup)
    print(f"# {setting.name}: train warm-up took {time.perf_counter() - started:.0f} s", flush=True)
    phases = [(True, b) for b in setting.train_backends if b in opts.backends]
    if not opts.no_eval:
        phases += [(False, b) for b in setting.eval_backends if b in opts.backends]
    warmed_eval = False
    for train, backend in phases:
        if out_of_time(f"{setting.name} {'train' if train else 'eval'} {backend}"):
            continue
        size = input_size(setting, args, train)
        flops = forward_flops_per_image(setting.task, setting.model, len(class_names), *size, setting.output_stride)
        row = describe(setting, args, opts, size, train, backend, flops, peak_tflops, facts)
        row["optimizer"] = runner.optimizer_label
        try:
            if not train and not warmed_eval:
                started = time.perf_counter()
                warm_up(runner, False, opts.warmup)
                warmed_eval = True
                print(f"# {setting.name}: eval warm-up took {time.perf_counter() - started:.0f} s", flush=True)
            row.update(measure_row(runner, setting, opts, data, device, backend, train, class_names))
            if peak_tflops:
                row["mfu"] = round(row["img_per_s"] * row["gflop_per_image"] * 1e9 / (peak_tflops * 1e12), 4)
        except Exception as e:  # one failing row (out of memory, a missing codec) must not cost the others
            row["error"] = f"{type(e).__name__}: {e}"[-2000:]
            traceback.print_exc()
        report(row)


# -------------------------------------------------------------------------------------------------- main

def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--device", help="cuda or cpu (default: cuda when available)")
    add("--smoke", action="store_true", help="tiny images, inputs and trees, 1 timed step, no compilation: "
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
        "H100 or H200, our dense bf16 measurement on the H100; none elsewhere)")
    add("--stop-after", type=float, metavar="SECONDS", help="start no further setting or row after this many "
        "seconds, so that a run under a time limit still ends with its table and bars")
    add("--out", default=os.path.join(ROOT, "runs", "throughput.json"),
        help="JSON results, rewritten after every row (default: runs/throughput.json, which git ignores)")
    return p


def apply_smoke(opts, settings):
    """Tiny everything; compilation is left out because on a CPU it alone takes minutes, and autocast too (float32
    instead), because a CPU without bfloat16 instructions emulates it ten times slower (measured). The settings
    keep their names, which the bars look rows up by (each row records its dtype and that it was not compiled);
    those left the same as another by that are run once."""
    opts.warmup, opts.data_warmup, opts.steps, opts.workers = 1, 1, 1, 1
    opts.batch_size, opts.crop_size, opts.seg_batch_size, opts.seg_crop_size = 2, 32, 2, [32, 64]
    opts.data_dir = opts.data_dir.rstrip("/") + "-smoke"
    eager, seen = [], set()
    for s in settings:
        setting = Setting(**{**asdict(s), "compile": False, "dtype": "float32"})
        if (key := tuple(asdict(setting).values())[1:]) not in seen:
            seen.add(key)
            eager.append(setting)
    return eager


def chosen_settings(opts):
    settings = [s for s in SETTINGS if (not opts.settings or s.name in opts.settings)
                and (not opts.only or s.task == opts.only)]
    return apply_smoke(opts, settings) if opts.smoke else settings


def prepare_data(opts, settings, result):
    """The trees the settings read: given ones, or ours, written once (one epoch holds every batch a row takes)."""
    data, steps_per_row = {}, opts.data_warmup + opts.steps
    if any(s.task == "classification" for s in settings):
        data["imagefolder"] = opts.imagefolder or os.path.join(opts.data_dir, "imagenet-like")
        if not opts.imagefolder:
            spec = trees.SMOKE_JPEG_SPEC if opts.smoke else trees.JPEG_SPEC
            spec = trees.sized(spec, "per_class", steps_per_row * opts.batch_size, spec["classes"])
            print(f"# JPEG tree in {data['imagefolder']}", flush=True)
            stats = trees.generate_once(data["imagefolder"], spec, trees.write_jpeg_tree)
            result["data"]["imagefolder"] = {"spec": spec, **stats}
    if any(s.task == "segmentation" for s in settings):
        data["cityscapes"] = opts.cityscapes or os.path.join(opts.data_dir, "cityscapes-like")
        if not opts.cityscapes:
            spec = trees.SMOKE_CITYSCAPES_SPEC if opts.smoke else trees.CITYSCAPES_SPEC
            spec = trees.sized(spec, "images", steps_per_row * opts.seg_batch_size)
            print(f"# Cityscapes-layout PNG tree in {data['cityscapes']}", flush=True)
            stats = trees.generate_once(data["cityscapes"], spec, trees.write_cityscapes_tree)
            result["data"]["cityscapes"] = {"spec": spec, **stats}
    result["data"]["paths"] = data
    return data


def pick_device(name):
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:  # set_device and the allocator's statistics want an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def main(opts):
    started = time.perf_counter()
    settings = chosen_settings(opts)
    device = pick_device(opts.device)
    facts = environment(device)
    peak_tflops = opts.peak_tflops or (H100_PEAK_TFLOPS if "H100" in facts["hardware"] or "H200" in facts["hardware"]
                                       else None)
    # The bars are stated for these sizes on a GPU; other runs report their rows (and the bars' values) only.
    issue_sizes = (opts.batch_size, opts.crop_size, opts.seg_batch_size, list(opts.seg_crop_size)) == \
        (256, 224, 8, [512, 1024])
    not_judged = "smoke run" if opts.smoke else "not a GPU" if device.type != "cuda" else \
        None if issue_sizes else "sizes other than the issue's"
    result = {**facts, "command": " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]), "smoke": opts.smoke,
              "peak_tflops": peak_tflops,
              "peak_tflops_source": "--peak-tflops" if opts.peak_tflops else
              "our dense bf16 measurement on an H100 (shared anchors)" if peak_tflops else None,
              "bars_judged": not_judged is None, "bars_not_judged_because": not_judged, "options": vars(opts),
              "settings": [asdict(s) for s in settings], "data": {}, "rows": [], "bars": [], "not_started": []}
    if opts.steps % opts.workers:
        print(f"# note: --steps {opts.steps} is not a multiple of --workers {opts.workers}: rows bound by their "
              "workers are timed over a part of a round", flush=True)
    write_json(opts.out, result)
    data = prepare_data(opts, settings, result)
    mfu = f"MFU against {peak_tflops:g} TFLOP/s" if peak_tflops else "no MFU (no --peak-tflops for this device)"
    print(f"# {facts['hardware']}, {facts['cpu_count']} CPUs, torch {facts['torch']}, torchvision "
          f"{facts['torchvision']}; {mfu}\n{markdown_header()}", flush=True)

    def report(row):
        result["rows"].append(row)
        result["bars"] = check_bars(result["rows"], result["bars_judged"])
        print(markdown_row(row, result["rows"]), flush=True)
        write_json(opts.out, result)

    def out_of_time(what):
        if opts.stop_after and time.perf_counter() - started > opts.stop_after:
            print(f"# {what}: not started, --stop-after {opts.stop_after:g} s has passed", flush=True)
            result["not_started"].append(what)
            write_json(opts.out, result)
            return True
        return False

    for setting in settings:
        if out_of_time(setting.name):
            continue
        try:
            run_setting(setting, opts, data, device, facts, peak_tflops, report, out_of_time)
        except Exception as e:  # a setting that cannot even be built or compiled: the next one still runs
            traceback.print_exc()
            print(f"# {setting.name}: failed before its rows, see above", flush=True)
            result.setdefault("failed_settings", {})[setting.name] = f"{type(e).__name__}: {e}"[-2000:]
            write_json(opts.out, result)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    result["bars"] = check_bars(result["rows"], result["bars_judged"])
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_json(opts.out, result)
    print(f"\n# all rows (× synthetic, × pil: against the same setting and step in this run)\n{markdown_header()}")
    for row in result["rows"]:
        print(markdown_row(row, result["rows"]))
    print(f"\n{summary(result)}\n# wrote {opts.out}", flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
