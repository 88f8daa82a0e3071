"""Phase 1 of benchmarks/gpu_run.sh, the CUDA smoke matrix: both training scripts on the GPU in every setting of
ROWS, and the checks of benchmarks/cuda_checks.py, each in processes of its own (a CUDA fault ends one row only).

    python benchmarks/cuda_matrix.py --out DIR                  # on the GPU machine
    python benchmarks/cuda_matrix.py --out DIR --smoke          # the rows marked for it and every check, tiny, CPU

A row is (name, script, flags[, options]) and runs:
  A  the script for 3 epochs of a few steps, --print-freq 1 --keep-checkpoints 3, TORCH_LOGS=recompiles under
     --compile: every step's loss is in TensorBoard, every epoch ends with a save and an evaluation;
  B  the same command resumed from A's checkpoint of epoch 1, into another folder: epoch 2 once more;
  with two ranks (options {"nproc": 2}), also --test-only on A's last checkpoint with 1 and with 2 processes.
It passes when every command exits 0; every loss (TensorBoard's float32 train/loss of each step) and validation
number is finite; B's losses equal A's over epoch 2 within RTOL (bit-exactness and the final weights' largest
difference are reported beside); under --compile no recompilation is logged from epoch 1's first progress line
on (so epoch 2 entirely, validation at its sizes included) and no recompile limit is hit; and with two ranks
both evaluations print the same numbers on the whole validation set.

A row whose flags the script does not take fails (a typo). A row or check is "cut" when the phase's deadline
killed it, "not started" when no time was left. Writes DIR/matrix.json (rewritten after each job),
DIR/summary.txt, DIR/logs/ (every command's output) and DIR/checks/; trees and checkpoints go under --work,
checkpoints deleted after each row. Exit status 1 when a row or check failed.
"""
import argparse
import contextlib
import glob
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script from anywhere

from benchmarks import trees
from benchmarks.cuda_checks import CHECKS
from benchmarks.report import write_json

CLS, SEG = "classification/train.py", "segmentation/train.py"
# The built-in sets, small: 8 steps an epoch (4 optimizer steps with --accum-steps 2), a few validation batches.
CLS_SYNTHETIC = "--synthetic-train-size 128 --synthetic-val-size 64 -b 16"
SEG_SYNTHETIC = "--synthetic-train-size 64 --synthetic-val-size 24 -b 8"
# Small written trees (benchmarks/trees.py): {jpeg} holds every JPEG kind the decoders treat apart (grayscale,
# CMYK, a PNG named .jpg; val/ is train/), {bad_jpeg} the same and a truncated file, {voc} a VOC layout whose
# images all differ in size, {list} such JPEGs of 3 classes in CSV lists, one class rare, {folder} segmentation's
# folder layout with RGB colour masks and a classes.txt of their colours. 4 steps an epoch.
CLS_TREE = "--data-path {jpeg} -b 4 -j 2 --model resnet18 --train-crop-size 32 --val-resize-size 36 --val-crop-size 32"
CLS_LIST = CLS_TREE.replace("{jpeg}", "{list}") + " --train-list {list}/train.csv --val-list {list}/val.csv"
SEG_TREE = "--data-path {voc} --dataset voc -b 4 -j 2 --crop-size 64 --base-size 64"
SEG_FOLDER = "--data-path {folder} --dataset folder -b 4 -j 2 --crop-size 64 --base-size 64"
# Weights written for --freeze-backbone (benchmarks/trees.py): ResNet-18 as a bare state dict, ResNet-50 as a
# classifier's checkpoint, which segmentation's --weights-backbone takes.
R18_WEIGHTS, R50_WEIGHTS = "{resnet18_weights}/resnet18.pth", "{resnet50_weights}/resnet50.pth"
UNET, DEEPLAB = "--model unet --unet-width 12", "--model deeplabv3plus_resnet50 --output-stride 8"
BF16_CL = "--amp-dtype bfloat16 --channels-last"

# (name, script, flags[, options]); options: nproc (processes, under torchrun; default 1), first_device (A's
# device instead of the run's), smoke (also run by --smoke, on the CPU), last (after every other job). Jobs run
# in this order, rows that take longest first (compilation, two ranks, DeepLab), then the checks, then the rest.
ROWS = [
    ("cls-bf16-cl-compile", CLS, f"{CLS_SYNTHETIC} {BF16_CL} --compile"),
    ("seg-voc-unet-bf16-cl-compile", SEG, f"{SEG_TREE} {UNET} {BF16_CL} --compile"),
    ("cls-2-ranks-gloo-sync-bn", CLS, f"{CLS_SYNTHETIC} --dist-backend gloo --sync-bn", {"nproc": 2}),
    ("seg-2-ranks-gloo-sync-bn", SEG, f"{SEG_SYNTHETIC} --dist-backend gloo", {"nproc": 2}),  # sync-bn: default
    ("seg-voc-deeplab-os8-amp", SEG, f"{SEG_TREE} {DEEPLAB} --amp"),
    ("seg-voc-deeplab-os8-gpu-grad-ckpt", SEG, f"{SEG_TREE} {DEEPLAB} {BF16_CL} --data-backend gpu "
                                              "--grad-checkpointing"),
    ("cls-fp32", CLS, CLS_SYNTHETIC),
    ("cls-amp", CLS, f"{CLS_SYNTHETIC} --amp"),
    ("cls-bf16-cl", CLS, f"{CLS_SYNTHETIC} {BF16_CL}"),
    ("cls-ema-accum", CLS, f"{CLS_SYNTHETIC} --model-ema --model-ema-steps 1 --accum-steps 2"),
    ("cls-grad-ckpt", CLS, f"{CLS_SYNTHETIC} --grad-checkpointing"),
    ("cls-tree-gpu", CLS, f"{CLS_TREE} --data-backend gpu", {"smoke": True}),
    ("cls-tree-pil-amp-sgd", CLS, f"{CLS_TREE} --data-backend pil --amp"),  # real data's recipe: SGD
    ("cls-deterministic", CLS, f"{CLS_SYNTHETIC} --use-deterministic-algorithms"),
    ("cls-cpu-checkpoint-on-cuda", CLS, CLS_SYNTHETIC, {"first_device": "cpu"}),
    ("seg-fp32", SEG, SEG_SYNTHETIC),
    ("seg-amp", SEG, f"{SEG_SYNTHETIC} --amp"),
    ("seg-bf16-cl", SEG, f"{SEG_SYNTHETIC} {BF16_CL}"),
    ("seg-accum", SEG, f"{SEG_SYNTHETIC} --accum-steps 2"),
    ("seg-grad-ckpt", SEG, f"{SEG_SYNTHETIC} --grad-checkpointing"),
    ("seg-voc-unet-gpu", SEG, f"{SEG_TREE} {UNET} --data-backend gpu", {"smoke": True}),
    ("seg-voc-unet-gpu-bf16-cl", SEG, f"{SEG_TREE} {UNET} --data-backend gpu {BF16_CL}"),
    # The watchdog, validation within epochs, and bad files (on a tree with a truncated JPEG) skipped or replaced.
    ("cls-stall-timeout", CLS, f"{CLS_SYNTHETIC} --stall-timeout 60"),
    ("cls-2-ranks-gloo-stall-timeout", CLS, f"{CLS_SYNTHETIC} --dist-backend gloo --stall-timeout 60", {"nproc": 2}),
    ("cls-eval-interval-compile", CLS, f"{CLS_SYNTHETIC} {BF16_CL} --compile --eval-interval 3"),
    ("seg-voc-eval-interval", SEG, f"{SEG_TREE} {UNET} --eval-interval 3"),
    ("cls-bad-samples-gpu", CLS, f"{CLS_TREE.replace('{jpeg}', '{bad_jpeg}')} --data-backend gpu --max-bad-samples 4"),
    ("cls-bad-samples-pil", CLS, f"{CLS_TREE.replace('{jpeg}', '{bad_jpeg}')} --data-backend pil --max-bad-samples 4"),
    # Users' own data: the list-file and folder readers with both data backends; class weights in the losses of
    # fused AdamW under float16's scaler, Dice under autocast, the balanced sampler's draws, a frozen backbone
    # (batch norm in eval mode) under DDP and SyncBatchNorm, and segmentation's --head-lr beside it.
    ("cls-list-adamw-amp-class-weights", CLS, f"{CLS_LIST} --classes-file {{list}}/classes.txt --opt adamw --lr 1e-3 "
                                              "--class-weights balanced --amp"),
    ("cls-list-gpu-balanced-sampler-freeze", CLS, f"{CLS_LIST} --data-backend gpu --balanced-sampler "
                                                  f"--weights {R18_WEIGHTS} --freeze-backbone", {"smoke": True}),
    ("cls-freeze-2-ranks-gloo-sync-bn-amp", CLS, f"{CLS_SYNTHETIC} --weights {R18_WEIGHTS} --freeze-backbone "
                                                 "--dist-backend gloo --sync-bn --amp", {"nproc": 2}),
    ("seg-folder-unet-ce-dice-class-weights-bf16-cl", SEG, f"{SEG_FOLDER} {UNET} --loss ce+dice "
                                                           f"--class-weights balanced {BF16_CL}", {"smoke": True}),
    ("seg-folder-unet-gpu-dice-class-weights-adamw-amp", SEG, f"{SEG_FOLDER} {UNET} --data-backend gpu --loss dice "
                                                              "--class-weights balanced --opt adamw --lr 1e-3 --amp"),
    ("seg-folder-deeplab-freeze-head-lr-amp", SEG, f"{SEG_FOLDER} {DEEPLAB} --weights-backbone {R50_WEIGHTS} "
                                                   "--freeze-backbone --head-lr 0.02 --amp"),
    # DeepLabV3+ compiled, validated at VOC's varying sizes: the longest compilation, the first row to give up.
    ("seg-voc-deeplab-os8-compile", SEG, f"{SEG_TREE} {DEEPLAB} {BF16_CL} --compile", {"last": True}),
]
TREES = {"jpeg": (trees.SMOKE_JPEG_SPEC, trees.write_jpeg_tree),
         "bad_jpeg": (dict(trees.SMOKE_JPEG_SPEC, truncated_every=16), trees.write_jpeg_tree),
         "voc": (trees.VOC_SPEC, trees.write_voc_tree),
         "list": (trees.LIST_SPEC, trees.write_list_tree),
         "folder": (trees.FOLDER_SPEC, trees.write_folder_tree),
         "resnet18_weights": (trees.WEIGHTS_SPEC, trees.write_weights),
         "resnet50_weights": (dict(trees.WEIGHTS_SPEC, model="resnet50", as_checkpoint=True), trees.write_weights)}
EPOCHS, RESUMED_FROM = 3, 1  # B resumes from the checkpoint of epoch 1 and trains epoch 2
# How close B's losses must come to A's. Bit for bit is not promised on CUDA (cudnn.benchmark may choose other
# kernels in another process); a wrong batch, LR or optimizer state moves a loss by far more than this.
RTOL = {"float32": 1e-3, "autocast": 1e-2}
KILLED = "killed at the deadline"  # a command's exit status when the phase's time ran out: the row is "cut"
RECOMPILE = re.compile(r"Recompiling function")
RECOMPILE_LIMIT = re.compile(r"recompile_limit|cache_size_limit")
PROGRESS = re.compile(r"^Epoch: \[(\d+)\] \[\s*(\d+)/(\d+)\].*?loss: (\S+) \(", re.M)


@dataclass
class Row:
    name: str
    script: str
    flags: str
    options: dict = field(default_factory=dict)

    @property
    def nproc(self):
        return self.options.get("nproc", 1)

    @property
    def long(self):
        return "--compile" in self.flags or self.nproc > 1 or "deeplab" in self.flags

    def tolerance(self):
        return RTOL["autocast"] if "--amp" in self.flags else RTOL["float32"]


def rows_of(table):
    return [Row(*entry) for entry in table]


# ------------------------------------------------------------------------------------------------ the table

def parsers():
    """The scripts' own argument parsers, which say which flags this version has."""
    from classification import train as classification_train
    from segmentation import train as segmentation_train
    return {CLS: classification_train.get_args_parser(), SEG: segmentation_train.get_args_parser()}


def check_flags(row, parser):
    """None when the script takes the row's flags; else ("fail", the reason): a flag the script refuses (a typo)."""
    argv = row.flags.format(**{name: "TREE" for name in TREES}).split()
    with contextlib.redirect_stderr(io.StringIO()) as errors:
        try:
            _, unknown = parser.parse_known_args(argv)
        except SystemExit:
            return "fail", f"{row.script} refuses the flags: {errors.getvalue().strip().splitlines()[-1]}"
    if unknown:
        return "fail", f"{row.script} does not know {' '.join(unknown)}"
    return None


# --------------------------------------------------------------------------------------------- processes

class Deadline:
    """No job starts after `stop_after` seconds; every process still running at `deadline` seconds is killed."""

    def __init__(self, stop_after, deadline):
        self.start = time.monotonic()
        self.stop_after, self.deadline = stop_after, deadline

    def may_start(self):
        return self.stop_after is None or time.monotonic() - self.start < self.stop_after

    def left(self):
        return None if self.deadline is None else max(1.0, self.deadline - (time.monotonic() - self.start))


def descendants(pid):
    """Every process below `pid`, from Linux's /proc (none elsewhere): torchrun starts each rank in a session of
    its own, out of reach of a signal to torchrun's process group."""
    children = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def kill_tree(pid):
    below = descendants(pid)
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    for process in below:
        with contextlib.suppress(OSError):
            os.kill(process, signal.SIGKILL)


def run_command(argv, log_path, env, deadline):
    """Run argv from the repository root with its output (stdout and stderr, in order) in log_path; returns
    (exit status or "killed at the deadline", the output, seconds). At the deadline it is killed with everything
    it started: torchrun's ranks and DataLoader workers too."""
    started = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        try:
            status = process.wait(timeout=deadline.left())
        except subprocess.TimeoutExpired:
            kill_tree(process.pid)
            process.wait()
            status = KILLED
    with open(log_path, errors="replace") as f:
        return status, f.read(), round(time.monotonic() - started, 1)


def child_env(row):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    if "--compile" in row.flags:
        env["TORCH_LOGS"] = "recompiles"
    if row.nproc > 1 and os.path.exists("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # ranks of one machine meet on the loopback, with no network
    return env


def launcher(nproc):
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


# ------------------------------------------------------------------------------------------------ reading

def tensorboard_losses(output_dir):
    """{global step: loss} of train/loss in the run's TensorBoard files: float32 as logged, every step."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    losses = {}
    for path in sorted(glob.glob(os.path.join(output_dir, "tb", "events.out.tfevents.*"))):
        for event in LegacyEventFileLoader(path).Load():
            for value in event.summary.value:
                if value.tag == "train/loss":
                    losses[int(event.step)] = float(value.simple_value)
    return losses


def printed_losses(output):
    """{global step: loss} from the progress lines (4 decimals): what is left when TensorBoard wrote nothing."""
    return {int(epoch) * int(steps) + int(step) - 1: float(loss)
            for epoch, step, steps, loss in PROGRESS.findall(output)}


def step_losses(output_dir, output):
    try:
        losses = tensorboard_losses(output_dir)
    except ImportError:  # no tensorboard here: the scripts could not have written --output-dir either
        losses = {}
    return (losses, "tensorboard") if losses else (printed_losses(output), "progress lines")


def compare_losses(uninterrupted, resumed, rtol):
    """B's losses against A's at the steps B trained."""
    steps = sorted(resumed)
    if not steps or any(step not in uninterrupted for step in steps):
        return {"steps_compared": 0, "reason": f"A lacks steps {sorted(set(steps) - set(uninterrupted))}"}
    pairs = [(uninterrupted[s], resumed[s]) for s in steps]
    absolute = [abs(a - b) for a, b in pairs]
    relative = [abs(a - b) / max(abs(a), 1e-12) for a, b in pairs]
    return {"steps_compared": len(steps), "bit_exact": all(a == b for a, b in pairs),
            "max_abs_diff": max(absolute), "max_rel_diff": max(relative), "rtol": rtol,
            "close": max(relative) <= rtol}


def recompilations(output):
    """Recompilations logged (TORCH_LOGS=recompiles) in all, and from the first progress line of epoch 1 on."""
    lines = output.splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("Epoch: [1]")), len(lines))
    return {"total": sum(bool(RECOMPILE.search(line)) for line in lines),
            "from_epoch_1_on": sum(bool(RECOMPILE.search(line)) for line in lines[first:]),
            "limit_hit": any(RECOMPILE_LIMIT.search(line) for line in lines)}


def evaluation_lines(output):
    """The numbers --test-only prints: 'Test: top-1 ...' (and 'Test EMA: ...'), or 'Test: mIoU ...'."""
    return [line.strip() for line in output.splitlines() if line.startswith("Test")]


def validation_numbers(output_dir):
    numbers = []
    with contextlib.suppress(OSError), open(os.path.join(output_dir, "log.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            validation = {key: value for key, value in record.items() if key.startswith("val_")}
            numbers += [validation] if validation else []
    return numbers


def weights_difference(first, second):
    """The largest difference between the model weights of two checkpoints, and whether they are equal bit for bit."""
    import torch
    a, b = (torch.load(path, map_location="cpu", weights_only=True)["model"] for path in (first, second))
    differences = [float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point()]
    return {"bit_exact": all(torch.equal(a[k], b[k]) for k in a), "max_abs_diff": max(differences, default=0.0)}


def finite(numbers):
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers)


# ------------------------------------------------------------------------------------------------ jobs

def run_row(row, opts, paths, deadline, log_dir, work):
    result = {"name": row.name, "script": row.script, "flags": row.flags, "options": row.options, "commands": [],
              "reasons": []}
    folder = os.path.join(work, row.name)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    flags = row.flags.format(**paths).split()
    env, reasons = child_env(row), result["reasons"]
    first_device = row.options.get("first_device", opts.device)
    common = ["--epochs", str(EPOCHS), "--print-freq", "1", "--keep-checkpoints", str(EPOCHS)]

    def command(what, argv):
        status, output, seconds = run_command(argv, os.path.join(log_dir, f"{row.name}.{what}.log"), env, deadline)
        result["commands"].append({"what": what, "exit": status, "seconds": seconds,
                                   "log": f"logs/{row.name}.{what}.log"})
        if status != 0:
            tail = " | ".join(output.strip().splitlines()[-3:])[-600:]
            reasons.append(f"{what} exited with {status}: {tail}")
        return status == 0, output

    a, b = os.path.join(folder, "a"), os.path.join(folder, "b")
    script = [*launcher(row.nproc), row.script, *flags]
    ok, output_a = command("A", [*script, *common, "--device", first_device, "--output-dir", a])
    if ok:
        losses_a, source = step_losses(a, output_a)
        result["losses_from"], result["losses_a"] = source, losses_a
        result["validation"] = validation_numbers(a)
        if not losses_a or not finite(losses_a.values()):
            reasons.append("A: a loss is not finite" if losses_a else "A: no losses found")
        if not result["validation"] or not finite(v for r in result["validation"] for v in r.values()):
            reasons.append(f"A: no evaluation in log.jsonl, or one not finite: {result['validation']}")
        if "--compile" in row.flags:
            result["recompiles"] = recompilations(output_a)
            if result["recompiles"]["from_epoch_1_on"] or result["recompiles"]["limit_hit"]:
                reasons.append(f"A: recompiled after the first epoch: {result['recompiles']}")
        resume = os.path.join(a, f"checkpoint_epoch{RESUMED_FROM}.pth")
        ok, output_b = command("B", [*script, *common, "--device", opts.device, "--output-dir", b, "--resume", resume])
        if ok:
            losses_b, _ = step_losses(b, output_b)
            result["losses_b"] = losses_b
            if not losses_b or not finite(losses_b.values()):
                reasons.append("B: a loss is not finite" if losses_b else "B: no losses found")
            result["resume"] = compare_losses(losses_a, losses_b, row.tolerance())
            if first_device != opts.device:
                result["resume"]["not_judged"] = f"A ran on {first_device}, B on {opts.device}"
            elif not result["resume"].get("close"):
                reasons.append(f"B's losses differ from A's: {result['resume']}")
            if "--compile" in row.flags and recompilations(output_b)["limit_hit"]:
                reasons.append("B: hit the recompile limit")
            result["weights"] = weights_difference(os.path.join(a, "checkpoint.pth"), os.path.join(b, "checkpoint.pth"))
    if ok and row.nproc > 1:  # the whole validation set on 1 process and on row.nproc, from A's last checkpoint
        single = [f for f in flags if f not in ("--sync-bn", "--dist-backend", "gloo", "nccl")]
        test = ["--test-only", "--resume", os.path.join(a, "checkpoint.pth"), "--device", opts.device]
        ok_one, output_one = command("E1", [sys.executable, row.script, *single, *test])
        ok_two, output_two = command(f"E{row.nproc}", [*script, *test])
        one, two = evaluation_lines(output_one), evaluation_lines(output_two)
        result["evaluation"] = {"1 process": one, f"{row.nproc} processes": two}
        if ok_one and ok_two and (not one or one != two):
            reasons.append(f"evaluation differs between 1 and {row.nproc} processes: {one} vs {two}")
    if not opts.keep:
        shutil.rmtree(folder, ignore_errors=True)
    cut = any(c["exit"] == KILLED for c in result["commands"])
    result["status"] = "cut" if cut else "fail" if reasons else "pass"
    return result


def run_check(name, opts, deadline, log_dir, check_dir):
    argv = [sys.executable, os.path.join(ROOT, "benchmarks", "cuda_checks.py"), name, "--out-dir", check_dir,
            "--device", opts.device, *(["--smoke"] if opts.smoke else [])]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    status, output, seconds = run_command(argv, os.path.join(log_dir, f"check.{name}.log"), env, deadline)
    result = {"name": name, "exit": status, "seconds": seconds, "log": f"logs/check.{name}.log"}
    with contextlib.suppress(OSError, ValueError), open(os.path.join(check_dir, f"{name}.json")) as f:
        result.update(json.load(f))
    if "verdict" not in result:
        tail = " | ".join(output.strip().splitlines()[-3:])[-600:]
        result.update(verdict="error", facts={"error": f"exited with {status} and no result: {tail}"})
    result["status"] = "cut" if status == KILLED else \
        {"pass": "pass", "info": "pass", "fail": "fail"}.get(result["verdict"], "fail")
    return result


# ------------------------------------------------------------------------------------------------ report

def row_line(row):
    details = []
    resume = row.get("resume", {})
    if resume.get("steps_compared"):
        exact = "bit-exact" if resume["bit_exact"] else f"max rel diff {resume['max_rel_diff']:.1e}"
        details.append(f"resumed losses {exact} over {resume['steps_compared']} steps")
    if row.get("weights"):
        weights = row["weights"]
        equal = "equal" if weights["bit_exact"] else f"differ by {weights['max_abs_diff']:.1e}"
        details.append(f"final weights {equal}")
    if "recompiles" in row:
        details.append(f"{row['recompiles']['total']} recompilations, {row['recompiles']['from_epoch_1_on']} "
                       "from epoch 1 on")
    if row.get("evaluation"):
        printed = " / ".join(" ; ".join(lines) for lines in row["evaluation"].values())
        details.append(f"evaluation on 1 and 2 processes: {printed}")
    why = "; ".join(row.get("reasons", []))[:600]
    return (f"- {row['status'].upper()}: {row['name']}" + (f" ({', '.join(details)})" if details else "")
            + (f": {why}" if why else ""))


def summary_lines(result):
    lines = [f"# phase 1, the CUDA smoke matrix, on {result['device']}{' (smoke)' if result['smoke'] else ''}: "
             f"{result.get('seconds', '?')} s"]
    lines += [row_line(row) for row in result["rows"]]
    for check in result["checks"]:
        facts = json.dumps(check.get("facts", {}))[:400]
        lines.append(f"- {check['status'].upper()}: check {check['name']} ({check.get('verdict')}): {facts}")
    items = result["rows"] + result["checks"]
    counts = [f"{sum(item['status'] == s for item in items)} {s}"
              for s in ("pass", "fail", "skipped", "cut", "not started")]
    lines.append("# " + ", ".join(counts))
    return lines


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--out", required=True, help="folder of the results: matrix.json, summary.txt, logs/, checks/")
    add("--work", help="folder of the trees and the runs' checkpoints (default: OUT/../cuda-matrix-work)")
    add("--device", help="cuda or cpu (default: cuda, or cpu with --smoke)")
    add("--smoke", action="store_true", help="only the rows marked smoke, and every check in one process, tiny")
    add("--rows", nargs="+", metavar="NAME", help="run these rows only (default: all; with --smoke, those marked)")
    add("--no-checks", action="store_true", help="skip benchmarks/cuda_checks.py")
    add("--jobs", type=int, help="rows and checks run at once (default: 8, or 2 with --smoke)")
    add("--stop-after", type=float, metavar="SECONDS", help="start no row or check after this many seconds")
    add("--deadline", type=float, metavar="SECONDS", help="kill every process still running at this many seconds")
    add("--keep", action="store_true", help="keep the runs' checkpoints and TensorBoard files under --work")
    return p


def main(opts):
    opts.device = opts.device or ("cpu" if opts.smoke else "cuda")
    opts.jobs = opts.jobs or (2 if opts.smoke else 8)
    deadline = Deadline(opts.stop_after, opts.deadline)
    work = opts.work or os.path.join(os.path.dirname(os.path.abspath(opts.out)), "cuda-matrix-work")
    log_dir, check_dir = os.path.join(opts.out, "logs"), os.path.join(opts.out, "checks")
    for folder in (log_dir, check_dir):
        os.makedirs(folder, exist_ok=True)
    chosen = (lambda r: r.name in opts.rows) if opts.rows else (lambda r: not opts.smoke or r.options.get("smoke"))
    rows = [r for r in rows_of(ROWS) if chosen(r)]
    result = {"device": opts.device, "smoke": opts.smoke, "rows": [], "checks": [], "table": [r.name for r in rows],
              "epochs": EPOCHS, "resumed_from_epoch": RESUMED_FROM, "rtol": RTOL}
    lock = threading.Lock()

    def record(kind, item):
        with lock:
            result[kind].append(item)
            result["seconds"] = round(time.monotonic() - deadline.start, 1)
            write_json(os.path.join(opts.out, "matrix.json"), result)
            with open(os.path.join(opts.out, "summary.txt"), "w") as f:
                f.write("\n".join(summary_lines(result)) + "\n")

    # Every row of the table is checked against the scripts' parsers, also those not run: a typo fails here.
    script_parsers, runnable = parsers(), []
    for row in rows_of(ROWS):
        refused = check_flags(row, script_parsers[row.script])
        if refused and row in rows:
            record("rows", {"name": row.name, "script": row.script, "flags": row.flags, "status": refused[0],
                            "reasons": [refused[1]]})
        elif refused and refused[0] == "fail":
            record("rows", {"name": row.name, "script": row.script, "flags": row.flags, "status": "fail",
                            "reasons": [refused[1]], "not_run": "not chosen"})
        elif row in rows:
            runnable.append(row)
    needed = {name for row in runnable for name in TREES if "{" + name + "}" in row.flags}
    paths = {name: os.path.join(work, "data", name) for name in TREES}
    for name in sorted(needed):
        spec, write = TREES[name]
        trees.generate_once(paths[name], spec, write)
    runs = os.path.join(work, "runs")
    ordered = sorted(runnable, key=lambda r: (r.options.get("last", False), not r.long))
    long_rows = [r for r in ordered if r.long and not r.options.get("last")]
    checks = [] if opts.no_checks else list(CHECKS)
    jobs = [("row", r) for r in long_rows]
    if opts.smoke and checks:  # one process for all of them: on the CPU the imports cost more than the checks
        jobs.append(("checks", checks))
    else:
        jobs += [("check", name) for name in checks]
    jobs += [("row", r) for r in ordered if r not in long_rows]

    def run_job(job):
        kind, what = job
        if not deadline.may_start():
            if kind == "row":
                record("rows", {"name": what.name, "script": what.script, "flags": what.flags,
                                "status": "not started", "reasons": ["the phase's time had run out"]})
            else:
                for name in [what] if kind == "check" else what:
                    record("checks", {"name": name, "status": "not started", "verdict": None})
            return
        if kind == "row":
            try:
                record("rows", run_row(what, opts, paths, deadline, log_dir, runs))
            except Exception as e:  # noqa: BLE001 - a bug here must not cost the other rows their results
                record("rows", {"name": what.name, "script": what.script, "flags": what.flags, "status": "fail",
                                "reasons": [f"the matrix failed reading this row: {type(e).__name__}: {e}"]})
        elif kind == "check":
            record("checks", run_check(what, opts, deadline, log_dir, check_dir))
        else:
            results = run_checks_together(what, opts, deadline, log_dir, check_dir)
            for item in results:
                record("checks", item)

    with ThreadPoolExecutor(max_workers=opts.jobs) as pool:
        for future in [pool.submit(run_job, job) for job in jobs]:
            future.result()
    order = {name: i for i, name in enumerate(r.name for r in rows_of(ROWS))}
    with lock:
        result["rows"].sort(key=lambda r: order[r["name"]])
        result["checks"].sort(key=lambda c: list(CHECKS).index(c["name"]))
    write_json(os.path.join(opts.out, "matrix.json"), result)
    text = "\n".join(summary_lines(result))
    with open(os.path.join(opts.out, "summary.txt"), "w") as f:
        f.write(text + "\n")
    print(text, flush=True)
    failed = [item for item in result["rows"] + result["checks"] if item["status"] == "fail"]
    return 1 if failed else 0


def run_checks_together(names, opts, deadline, log_dir, check_dir):
    """--smoke: every check in one process."""
    argv = [sys.executable, os.path.join(ROOT, "benchmarks", "cuda_checks.py"), *names, "--out-dir", check_dir,
            "--device", opts.device, "--smoke"]
    status, output, seconds = run_command(argv, os.path.join(log_dir, "checks.log"), os.environ.copy(), deadline)
    results = []
    for name in names:
        result = {"name": name, "exit": status, "log": "logs/checks.log"}
        with contextlib.suppress(OSError, ValueError), open(os.path.join(check_dir, f"{name}.json")) as f:
            result.update(json.load(f))
        result.setdefault("verdict", "error")
        result["status"] = {"pass": "pass", "info": "pass", "fail": "fail"}.get(result["verdict"], "fail")
        results.append(result)
    return results


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
