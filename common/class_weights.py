"""--class-weights: a loss weight for each class, inverse to its share of the training set (balanced) or read from a
file, then scaled so that their mean over the training samples is 1: the loss keeps the scale the lr recipes were
tuned for. Imported only with the flag."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from common.data import reason, shown
from common.log import UserError, print0

FILE_FORMAT = "a text file of 'class weight' lines, one per class (e.g. 'defect 12.5'; # starts a comment line)"
PRINTED_CLASSES = 20


class WeightedCrossEntropy(nn.Module):
    """Cross-entropy with a weight per class, averaged over the samples, not over their weights as
    nn.CrossEntropyLoss averages: a sample's loss then does not depend on the others in its micro-batch, so the
    weights mean the same on any layout of processes and accumulation and with mixed (MixUp/CutMix) targets too."""

    def __init__(self, weight, label_smoothing=0.0):
        super().__init__()
        self.register_buffer("weight", weight)
        self.label_smoothing = label_smoothing

    def forward(self, logits, target):
        return F.cross_entropy(logits, target, self.weight, reduction="none",
                               label_smoothing=self.label_smoothing).mean()


def weighted_cross_entropy(choice, class_names, dataset, label_smoothing=0.0):
    """The classification loss of --class-weights `choice`, its weights counted over the training set `dataset`."""
    return WeightedCrossEntropy(class_weights(choice, class_names, dataset), label_smoothing)


def class_weights(choice, class_names, dataset=None, counts=None, unit="images"):
    """The weights (float32, one per class) of --class-weights `choice`, "balanced" or a file, printed. `counts`: the
    training `unit`s of each class; by default the images of the classification training set `dataset`."""
    counts = (image_counts(dataset, len(class_names)) if counts is None else counts).double()
    if choice == "balanced":  # a class absent from the training set is never a target: its weight does not matter
        weights = torch.where(counts > 0, 1 / counts.clamp(min=1), 0)
    else:
        weights = torch.tensor(read_class_weights(choice, class_names), dtype=torch.float64)
    mean = (weights * counts).sum() / counts.sum().clamp(min=1)
    if mean == 0:
        raise UserError(f"--class-weights {shown(choice)} gives weight 0 to every class of the training set: nothing "
                        "would be learned; give some class a positive weight")
    weights /= mean
    entries = [f"{name} {w:.3g} ({int(n):,})" for name, w, n in zip(class_names, weights.tolist(), counts.tolist())]
    more = f" and {len(entries) - PRINTED_CLASSES} more" if len(entries) > PRINTED_CLASSES else ""
    print0(f"class weights ({'balanced' if choice == 'balanced' else shown(choice)}, scaled to a mean of 1 over the "
           f"training {unit}; {unit} of each class in brackets): {', '.join(entries[:PRINTED_CLASSES])}{more}")
    return weights.float()


def image_counts(dataset, num_classes):
    """Images per class of a classification training set: the labels of the synthetic set (a tensor), or the
    targets of ImageFiles under the wrappers of the training loader (SeededSamples, SkipBadSamples)."""
    while hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return torch.bincount(torch.as_tensor(getattr(dataset, "targets", dataset)), minlength=num_classes)


def read_class_weights(path, class_names):
    """The weights of a --class-weights file in class order; each problem in one line naming the file and line."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # utf-8-sig: a byte-order mark would start the first name
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --class-weights {shown(path)} ({reason(e)}): give none, balanced, or "
                        f"{FILE_FORMAT}") from None
    index, weights, first_line = {name: i for i, name in enumerate(class_names)}, [None] * len(class_names), {}
    for number, line in enumerate(lines, 1):
        text, where = line.strip(), f"--class-weights {shown(path)} line {number}"
        if not text or text.startswith("#"):
            continue
        name, value = (text.rsplit(None, 1) + [""])[:2]  # a name may hold spaces: the weight is the last field
        try:
            weight = float(value)
        except ValueError:
            raise UserError(f"{where}: {text!r} is not a class name and a weight: the file must be {FILE_FORMAT}") \
                from None
        if name not in index:
            known = ", ".join(class_names[:10]) + (" ..." if len(class_names) > 10 else "")
            raise UserError(f"{where}: {name!r} is not a class of this data set ({known}): fix the name or remove "
                            "the line")
        if not (math.isfinite(weight) and weight >= 0):
            raise UserError(f"{where}: the weight of {name} is {value}: give a finite number, 0 or more")
        if name in first_line:
            raise UserError(f"{where}: {name} has a weight on line {first_line[name]} already: give each class once")
        first_line[name], weights[index[name]] = number, weight
    missing = [name for name, weight in zip(class_names, weights) if weight is None]
    if missing:
        raise UserError(f"--class-weights {shown(path)} gives weights to {len(first_line)} of the "
                        f"{len(class_names)} classes: add a line for {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}")
    return weights
