"""One HTML page of a training run, for people who will not open TensorBoard: the command and its settings, the
curves, the final and best numbers, per-class scores and the confusion matrix of a validation, and validation
pictures with their predictions. Images are inlined: the file opens anywhere, with no network and no server.

    pip install -r requirements-report.txt          # matplotlib, for the plots
    python tools/report.py runs/demo                  # writes runs/demo/report.html
    python tools/report.py runs/demo -o demo.html --checkpoint checkpoint.pth   # the latest validation's

It reads what a run writes (README.md, "What a run writes"): args.json, log.jsonl, the checkpoint's class names
and the confusion matrix of the validation it was saved after (best.pth: the best one; checkpoint.pth: the
latest), and tb/ for the training loss of every step and the validation pictures of that validation. Per-class
scores are computed here from the confusion matrix's counts.
"""
import argparse
import base64
import html
import importlib
import io
import json
import os
import shlex
import sys
from typing import NamedTuple, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import numpy as np
from PIL import Image

from common.checkpoint import load_checkpoint
from common.log import UserError, format_duration, run_cli
from common.output_dir import check_destination

MOST_CONFUSED = 20  # classes in the close-up of a confusion matrix too large to label
LABELLED_CLASSES = 40  # up to this many, the whole matrix is drawn with every class name
COUNTED_CLASSES = 25  # up to this many, with the counts in its cells too


class Run(NamedTuple):
    folder: str
    task: str  # "classification" or "segmentation"
    args: dict  # args.json
    records: list  # log.jsonl's lines, one per step at which one was written (the last, after a restart)
    by: str  # what the records follow: "epoch", or "step" with --eval-interval
    checkpoint_name: str
    checkpoint: Optional[dict]  # its class names, confusion matrix, epoch, step; None without one
    train_loss: list  # (global step, loss) of every step, from TensorBoard
    pictures: dict  # TensorBoard image tag -> {step: PNG bytes}


def read_run(folder, checkpoint_name="best.pth"):
    """Everything the report shows, read from a run's output folder."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder} is not a folder: give the --output-dir of a training run")
    args = read_json(os.path.join(folder, "args.json"))
    records = read_records(os.path.join(folder, "log.jsonl"))
    path = os.path.join(folder, checkpoint_name)
    if checkpoint_name != "best.pth" and not os.path.exists(path):  # best.pth is missing until a validation ran
        raise UserError(f"{path} does not exist: give --checkpoint a checkpoint of the run (best.pth, checkpoint.pth, "
                        "checkpoint_epoch<E>.pth)")
    checkpoint = load_checkpoint(path) if os.path.exists(path) else None
    train_loss, pictures = read_tensorboard(os.path.join(folder, "tb"))
    task = "segmentation" if "dataset" in args else "classification"
    return Run(folder, task, args, records, "step" if args.get("eval_interval") else "epoch", checkpoint_name,
               checkpoint, train_loss, pictures)


def read_json(path):
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist: give the --output-dir of a training run (train.py writes args.json "
                        "there when it starts)")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not JSON ({e}): give the --output-dir of a training run") from None


def read_records(path):
    """log.jsonl's lines by step, the last of each: a run restarted from an earlier checkpoint logs its steps
    again. A last line cut short (the run was killed while writing it) is left out."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        lines = f.read().splitlines()
    records = {}
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                print(f"note: {path}: its last line is cut short (the run stopped while writing it); left out")
                continue
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step", record.get("epoch")), int):
            raise UserError(f"{path}, line {number}, is not a line of train.py's log (a JSON object with its epoch "
                            "and step): remove the line or restore the file")
        records[record.get("step", record.get("epoch"))] = record
    return [records[key] for key in sorted(records)]


def read_tensorboard(folder):
    """(train/loss as [(step, value)], {image tag: {step: PNG bytes}}); empty without tb/."""
    if not os.path.isdir(folder):
        return [], {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # only here: it is slow

    events = EventAccumulator(folder, size_guidance={"scalars": 0, "images": 0}).Reload()  # 0: keep every event
    tags = events.Tags()
    loss = {e.step: e.value for e in events.Scalars("train/loss")} if "train/loss" in tags["scalars"] else {}
    pictures = {tag: {e.step: e.encoded_image_string for e in events.Images(tag)} for tag in tags["images"]}
    return sorted(loss.items()), pictures


# ---- the numbers ------------------------------------------------------------------------------------------------

def per_class_scores(matrix, task):
    """Columns of per-class scores in percent, from matrix[true, predicted] counts; NaN where a class has no
    samples (or, for precision, no predictions)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    hits, true, predicted = np.diag(matrix), matrix.sum(1), matrix.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        if task == "segmentation":
            return {"pixels": true.astype(np.int64), "IoU": 100 * hits / (true + predicted - hits),
                    "Dice": 100 * 2 * hits / (true + predicted)}
        precision, recall = 100 * hits / predicted, 100 * hits / true
        return {"images": true.astype(np.int64), "precision": precision, "recall": recall,
                "F1": 2 * precision * recall / (precision + recall)}


def most_confused_pairs(matrix, count):
    """[(true, predicted, images)] of the `count` largest off-diagonal cells, largest first."""
    off = np.array(matrix, dtype=np.int64)
    np.fill_diagonal(off, 0)
    flat = np.argsort(off, axis=None, kind="stable")[::-1][:count]
    return [(int(i), int(j), int(off[i, j])) for i, j in zip(*np.unravel_index(flat, off.shape)) if off[i, j] > 0]


def most_confused_classes(matrix, count):
    """Up to `count` classes, those of the largest confusions first, in class order."""
    chosen = []
    for i, j, _ in most_confused_pairs(matrix, count * count):  # enough pairs to meet `count` classes
        chosen += [c for c in (i, j) if c not in chosen]
        if len(chosen) >= count:
            break
    return sorted(chosen[:count])


def validation_record(run):
    """The log.jsonl line of the validation the checkpoint was saved after: the epoch's last line with val_* keys,
    or with --eval-interval the one at its step."""
    if run.checkpoint is None:
        return None
    epoch, step = run.checkpoint.get("epoch"), run.checkpoint.get("step")
    lines = [r for r in run.records if r.get("epoch") == epoch and has_validation(r)]
    if step is not None:
        lines = [r for r in lines if r.get("step") == epoch * run.checkpoint.get("steps_per_epoch", 0) + step]
    return lines[-1] if lines else None


def has_validation(record):
    return any(key.startswith("val_") for key in record)


def final_and_best(records):
    """[(name, final value, best value, where the best was)] of every val_* number; best is lowest for a loss."""
    validations = [r for r in records if has_validation(r)]
    names = list(dict.fromkeys(k for r in validations for k, v in r.items() if k.startswith("val_")
                               and isinstance(v, (int, float))))
    rows = []
    for name in names:
        scored = [r for r in validations if isinstance(r.get(name), (int, float))]
        pick = min if "loss" in name else max
        best = pick(scored, key=lambda r: r[name])  # the first of equals, as best.pth keeps it
        final = validations[-1].get(name)
        rows.append((name, final, best[name], f"epoch {best.get('epoch')}, step {best.get('step')}"))
    return rows


# ---- the plots (matplotlib, imported here only: the rest of the file and its tests do without) --------------------

def figure(width, height):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("tools/report.py draws its plots with matplotlib, which is not installed: pip install -r "
                        "requirements-report.txt") from None
    return Figure(figsize=(width, height), layout="constrained")


def png(fig, dpi=100):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def steps_per_epoch(run):
    """From the checkpoint, else from the first epoch's last line; None when unknown (x then counts steps)."""
    if run.checkpoint and run.checkpoint.get("steps_per_epoch"):
        return run.checkpoint["steps_per_epoch"]
    ends = [r["step"] / (r["epoch"] + 1) for r in run.records if "step" in r and r.get("epoch") == 0]
    return max(ends) if ends and max(ends) > 0 else None


def curves_png(run):
    """Training loss (every step and each line's mean), the validation numbers, and the learning rate."""
    per_epoch = steps_per_epoch(run)
    scale = per_epoch or 1

    def x(record):
        return record.get("step", (record.get("epoch", 0) + 1) * scale) / scale

    fig = figure(15, 4.2)
    loss_ax, val_ax, lr_ax = fig.subplots(1, 3)
    if run.train_loss:
        steps, losses = np.array(run.train_loss).T
        steps, losses = thinned(steps, losses)
        loss_ax.plot((steps + 1) / scale, losses, lw=0.6, alpha=0.4, color="tab:blue", label="each step")
    trained = [r for r in run.records if r.get("train_loss") is not None]
    loss_ax.plot([x(r) for r in trained], [r["train_loss"] for r in trained], "o-", color="tab:blue", ms=3,
                 label="mean of each epoch" if run.by == "epoch" else "mean since the line before")
    validations = [r for r in run.records if has_validation(r)]
    # Counts (val_num_samples, val_num_images) are no percentages: they stay in the table of numbers.
    for name in dict.fromkeys(k for r in validations for k in r if k.startswith("val_") and "_num_" not in k):
        points = [(x(r), r[name]) for r in validations if isinstance(r.get(name), (int, float))]
        axes = loss_ax if "loss" in name else val_ax
        axes.plot(*zip(*points), "o-", ms=3, label=name)
    lr = [r for r in run.records if r.get("lr") is not None]
    lr_ax.plot([x(r) for r in lr], [r["lr"] for r in lr], "o-", ms=3, color="tab:green")
    unit = "epochs trained" if per_epoch else "optimizer steps"
    for axes, title in ((loss_ax, "training loss"), (val_ax, "validation (%)"), (lr_ax, "learning rate")):
        axes.set_title(title)
        axes.set_xlabel(unit)
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    return png(fig)


def thinned(steps, values, most=4000):
    """At most `most` points, each the mean of a run of steps: a long run's million steps plot as a line."""
    group = -(-len(steps) // most)
    if group <= 1:
        return steps, values
    cut = len(steps) // group * group
    return steps[:cut].reshape(-1, group).mean(1), values[:cut].reshape(-1, group).mean(1)


def confusion_png(matrix, class_names, row_totals=None):
    """Each row coloured by its share of the true class (`row_totals`: the class's count, when `matrix` is a close-up
    of some classes): every class name on the axes up to LABELLED_CLASSES classes, the counts in the cells up to
    COUNTED_CLASSES; beyond, a heat map of the whole matrix without labels."""
    matrix = np.asarray(matrix)
    n = len(matrix)
    totals = matrix.sum(1) if row_totals is None else np.asarray(row_totals)
    rows = matrix / np.maximum(totals, 1)[:, None]
    labelled = n <= LABELLED_CLASSES
    side = max(5.0, 0.32 * n + 2.5) if labelled else 8.0
    fig = figure(side + 1.2, side)
    axes = fig.subplots()
    from matplotlib.colors import PowerNorm  # square root: a confusion of a few percent still shows
    shown = axes.imshow(rows, cmap="Blues", norm=PowerNorm(0.5, 0, 1), interpolation="nearest" if labelled
                        else "antialiased")
    fig.colorbar(shown, ax=axes, shrink=0.8, label="share of the true class (square-root scale)")
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    if labelled:
        axes.set_xticks(range(n), [str(c) for c in class_names], rotation=90, fontsize=8)
        axes.set_yticks(range(n), [str(c) for c in class_names], fontsize=8)
    if n <= COUNTED_CLASSES:
        for i, j in np.ndindex(n, n):
            if matrix[i, j]:
                axes.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7,
                          color="white" if rows[i, j] > 0.5 else "black")
    return png(fig)


# ---- the page ---------------------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1240px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { max-height: 32em; overflow: auto; display: inline-block; }
code { background: #f4f4f4; padding: 0.3em; display: block; white-space: pre-wrap; word-break: break-all; }
img { max-width: 100%; } img.pictures { image-rendering: pixelated; }
#predictions { display: flex; flex-wrap: wrap; gap: 1em; } figure { margin: 0; }
.note { color: #666; }
.swatch { display: inline-block; width: 1em; height: 1em; vertical-align: middle; border: 1px solid #888; }
"""


def image(data, alt, element_id=None, css=None, width=None):
    attributes = (f' id="{element_id}"' if element_id else "") + (f' class="{css}"' if css else "") + (
        f' width="{width}"' if width else "")
    return f'<img{attributes} alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def number(value, digits=2):
    if value is None or value != value:  # NaN: a class without samples
        return "–"
    return f"{value:,}" if isinstance(value, (int, np.integer)) else f"{value:,.{digits}f}"


def table(header, rows, element_id=None):
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f'<td class="number">{number(v)}</td>' if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
        else f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>\n" for row in rows)
    return f'<table{f" id={chr(34)}{element_id}{chr(34)}" if element_id else ""}><tr>{cells}</tr>\n{body}</table>'


def command(run):
    """The train script's command with every flag whose value is not its parser's default: the settings the run
    had, with the defaults that depend on the data (its recipe) written out."""
    parser = importlib.import_module(f"{run.task}.train").get_args_parser()
    words = [f"python {run.task}/train.py"]
    for action in parser._actions:
        value = run.args.get(action.dest)
        if not action.option_strings or value is None or value == action.default:
            continue
        if action.dest.startswith("synthetic_") and run.args.get("data_path") is not None:
            continue  # the built-in set's sizes, filled in but unused on real data
        if action.dest == "accum_steps" and run.args.get("global_batch"):
            continue  # worked out from --global-batch for the processes of that start
        flag = max(action.option_strings, key=len)
        if value is True:
            words.append(flag)
        elif value is not False:
            values = value if isinstance(value, list) else [value]
            words.append(" ".join([flag, *(shell_word(v) for v in values)]))
    return " ".join(words)


def shell_word(value):
    return shlex.quote(f"{value:g}" if isinstance(value, float) else str(value))


def settings_section(run):
    processes = run.args.get("world_size", 1)
    rows = [(name, json.dumps(value)) for name, value in sorted(run.args.items()) if name != "provenance"]
    return (f"<h2 id=settings>Command and settings</h2><p>The flags that differ from the script's defaults "
            f"(on {processes} process{'es' if processes > 1 else ''}):</p><code>{html.escape(command(run))}</code>"
            f"{provenance_line(run.args.get('provenance'))}"
            f"<details><summary>every setting (args.json)</summary>{table(('flag', 'value'), rows)}</details>")


def provenance_line(provenance):
    """args.json's "provenance" in a sentence; nothing for a run older than it."""
    if not provenance:
        return ""
    commit, dirty = provenance.get("git_commit"), provenance.get("git_dirty")
    changes = {True: " with uncommitted changes", None: " (uncommitted changes unknown)"}.get(dirty, "")
    code = "code outside a git checkout" if commit is None else f"commit {commit}{changes}"
    sentence = (f"Run from {code} with torch {provenance.get('torch')}, torchvision {provenance.get('torchvision')}, "
                f"CUDA {provenance.get('cuda') or 'none'}, on {provenance.get('device_name')}.")
    return f"<p>{html.escape(sentence)}</p>"


def numbers_section(run):
    rows = [(name, final, best, where) for name, final, best, where in final_and_best(run.records)]
    trained = [r for r in run.records if r.get("train_loss") is not None]
    if trained:
        rows.append(("train_loss", trained[-1]["train_loss"], min(r["train_loss"] for r in trained), ""))
    seconds = sum(r.get("epoch_time_s") or 0 for r in run.records)
    speeds = [r["img_per_s"] for r in run.records if r.get("img_per_s")]
    memory = max([r.get("max_memory_mib") or 0 for r in run.records], default=0)
    last, lines = (run.records[-1] if run.records else {}), len(run.records)
    facts = (f"{lines} line{'' if lines == 1 else 's'} in log.jsonl, up to epoch {last.get('epoch')} (step "
             f"{last.get('step')}); "
             f"{format_duration(seconds)} of training and validation logged"
             + (f", {np.mean(speeds):,.0f} images/s on average" if speeds else "")
             + (f", peak GPU memory {memory:,.0f} MiB" if memory else ""))
    return (f"<h2 id=numbers>Final and best numbers</h2><p>{html.escape(facts)}.</p>"
            + table(("number", "final", "best", "best at"), rows, "numbers"))


def curves_section(run):
    if not run.records and not run.train_loss:
        return "<h2 id=curves>Curves</h2><p class=note>Nothing logged yet: log.jsonl and tb/ are empty.</p>"
    return ("<h2 id=curves>Curves</h2><p>Training loss of every step (TensorBoard) and its mean over each line of "
            "log.jsonl, every validation number log.jsonl holds, and the learning rate at each line's end.</p>"
            + image(curves_png(run), "training and validation curves", "curves"))


def validation_sections(run):
    """Per-class scores, the confusion matrix and the pictures of the checkpoint's validation."""
    name, checkpoint = run.checkpoint_name, run.checkpoint
    if checkpoint is None:
        return f"<h2 id=validation>Validation</h2><p class=note>{name} is not in the folder: no validation yet.</p>"
    record = validation_record(run)
    where = f"epoch {checkpoint.get('epoch')}" + (f", step {checkpoint['step']}" if checkpoint.get("step") else "")
    header = f"<p>Of the validation {name} was saved after ({where}).</p>"
    confusion, class_names = checkpoint.get("confusion"), checkpoint.get("class_names")
    if confusion is None:
        parts = [f"<p class=note>{name} holds no confusion matrix: it was saved without a validation, or by a "
                 "train.py older than the report (the report of best.pth has one).</p>"]
    else:
        confusion = confusion.numpy() if hasattr(confusion, "numpy") else np.asarray(confusion)
        class_names = list(class_names or range(len(confusion)))
        parts = [per_class_section(confusion, class_names, run.task), confusion_section(confusion, class_names)]
    step = record.get(run.by) if record else None
    return f"<h2 id=validation>Validation</h2>{header}" + "".join(parts) + pictures_section(run, step)


def per_class_section(confusion, class_names, task):
    scores = per_class_scores(confusion, task)
    key = "IoU" if task == "segmentation" else "F1"
    order = range(len(class_names))
    if len(class_names) > LABELLED_CLASSES:  # the classes to look at first
        order = sorted(order, key=lambda i: (np.nan_to_num(scores[key][i], nan=-1), i))
    rows = [(class_names[i], *(column[i] for column in scores.values())) for i in order]
    with np.errstate(invalid="ignore"):
        means = [np.nanmean(column) if np.isfinite(column).any() else float("nan") for column in scores.values()]
    rows.append(("all classes: total, mean", int(confusion.sum()), *means[1:]))  # the first column counts
    sort = " Sorted by " + key + ", lowest first." if len(class_names) > LABELLED_CLASSES else ""
    what = ("IoU = TP / (TP + FP + FN) and Dice = 2 TP / (2 TP + FP + FN) of each class's pixels" if
            task == "segmentation" else "precision = TP / predicted, recall = TP / true, F1 their harmonic mean")
    return (f"<h3>Per class</h3><p>From the confusion matrix's counts: {what}, in percent; – where a class has "
            f"none.{sort}</p><div class=scroll>{table(('class', *scores), rows, 'per-class')}</div>")


def confusion_section(confusion, class_names):
    n = len(confusion)
    text = "<h3>Confusion matrix</h3><p>True classes down, predicted across; each row coloured by its share of the "
    if n <= LABELLED_CLASSES:
        return text + "true class." + image(confusion_png(confusion, class_names), "confusion matrix", "confusion")
    chosen = most_confused_classes(confusion, MOST_CONFUSED)
    pairs = [(class_names[i], class_names[j], count, 100 * count / max(confusion[i].sum(), 1))
             for i, j, count in most_confused_pairs(confusion, MOST_CONFUSED)]
    close_up = confusion[np.ix_(chosen, chosen)]
    return (text + f"true class. All {n:,} classes, too many to name:</p>"
            + image(confusion_png(confusion, class_names), "confusion matrix of every class", "confusion")
            + f"<p>The {len(chosen)} classes of the largest confusions, every other class left out:</p>"
            + image(confusion_png(close_up, [class_names[i] for i in chosen], confusion[chosen].sum(1)),
                    "confusion matrix of the most confused classes", "confusion-close-up")
            + "<p>The largest confusions:</p>"
            + table(("true class", "predicted as", "count", "% of the true class"), pairs, "most-confused"))


def pictures_section(run, step):
    """TensorBoard's validation pictures (all but the confusion matrix) of `step`, or of the nearest step."""
    tags = sorted((tag for tag in run.pictures if "confusion" not in tag), key=natural_order)
    if not tags:
        return "<h3>Predictions</h3><p class=note>No validation pictures in tb/.</p>"
    images = []
    for tag in tags:
        steps = sorted(run.pictures[tag])
        shown = min(steps, key=lambda s: (abs(s - step), -s)) if step is not None else steps[-1]
        images.append(f"<figure>{enlarged(run.pictures[tag][shown], tag)}<figcaption>{html.escape(tag)} at "
                      f"{run.by} {shown}</figcaption></figure>")
    if run.task == "segmentation":
        what = "Each picture: a validation image, its true labels, the model's labels, side by side."
        legend = palette_legend(run.checkpoint or {})
    else:
        what = "Validation images with their true and predicted classes, the most confidently wrong first."
        legend = ""
    return f"<h3>Predictions</h3><p>{what}</p>{legend}<div id=predictions>{''.join(images)}</div>"


def enlarged(data, alt, width=900, most=4):
    """An image shown up to `most` times its size, to about `width` pixels: TensorBoard's pictures are small."""
    size = Image.open(io.BytesIO(data)).width
    return image(data, alt, css="pictures", width=round(size * max(1.0, min(most, width / size))))


def natural_order(tag):
    return [int(part) if part.isdigit() else part for part in tag.replace("/", " / ").split()]


def palette_legend(checkpoint):
    palette, names = checkpoint.get("palette"), checkpoint.get("class_names")
    if not palette or not names:
        return ""
    items = [f'<span class="swatch" style="background: rgb{tuple(int(c) for c in colour)}"></span> '
             f"{html.escape(str(name))}" for name, colour in zip(names, palette)]
    return "<p>" + " &nbsp; ".join(items) + "</p>"


def page(run):
    title = f"{run.task} run {os.path.basename(os.path.abspath(run.folder))}"
    sections = [settings_section(run), numbers_section(run), curves_section(run), validation_sections(run)]
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class=note>{html.escape(os.path.abspath(run.folder))}: written by tools/report.py.</p>"
            + "\n".join(sections) + "</body></html>\n")


def write_report(folder, output=None, checkpoint_name="best.pth"):
    """Write the page of the run in `folder` (default: <folder>/report.html); returns its path."""
    run = read_run(folder, checkpoint_name)
    output = output or os.path.join(folder, "report.html")
    check_destination("-o", output)
    text = page(run)
    with open(output, "w", encoding="utf-8") as f:
        f.write(text)
    return output


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run's --output-dir")
    parser.add_argument("-o", "--output", help="the HTML file to write (default: RUN_DIR/report.html)")
    parser.add_argument("--checkpoint", default="best.pth", help="the checkpoint in RUN_DIR whose validation the "
                        "per-class scores, confusion matrix and pictures show (default: best.pth; checkpoint.pth "
                        "for the latest)")
    return parser


def main(args):
    path = write_report(args.run_dir, args.output, args.checkpoint)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB)")


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
