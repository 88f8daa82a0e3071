"""What segmentation does about rare classes, imported only with its flags: loss weights from the pixels of each
class over the training masks (--class-weights), and the soft Dice loss (--loss dice, ce+dice)."""
import hashlib
import json
import os
import pickle
import time

import torch
from torch.utils.data import DataLoader, Dataset

from common.class_weights import class_weights as scaled_weights
from common.bad_samples import BadSamples
from common.data import ignore_stop_signals, reason, shown
from common.distributed import from_rank0
from common.log import SampleError, UserError, print0
from segmentation.data import IGNORE_INDEX

CACHE_FILE = "class_pixels_train.json"  # the 256 bins of the training masks' train ids, for the masks it names


def class_weights(args, class_names, dataset):
    """The loss weights of --class-weights over the pixels of the training set `dataset` (the training loader's, or
    the synthetic set's masks), counted by rank 0 once and the same on every rank; the count is kept in
    --output-dir for the next start (without one, every start counts). Void pixels and those of --ignore-index are
    not counted; masks that fail their checks are left out, as many as --max-bad-samples allows."""
    while hasattr(dataset, "dataset"):  # the training loader's wrappers: SeededSamples, SkipBadSamples
        dataset = dataset.dataset
    count = from_rank0(lambda: value_counts(dataset, args.workers, args.output_dir, args.max_bad_samples))
    pixels = torch.as_tensor(count)[:len(class_names)]
    if 0 <= args.ignore_index < len(class_names):  # after the count, which is of every train id
        pixels[args.ignore_index] = 0
    return scaled_weights(args.class_weights, class_names, counts=pixels, unit="pixels")


class MaskValues(Dataset):
    """The pixels of each value 0..255 of each mask, counted in DataLoader workers, with the error of a mask that
    fails its checks ("" for one that passes them)."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            return torch.bincount(self.files.read_mask(i).flatten().long(), minlength=256), ""
        except SampleError as e:
            return torch.zeros(256, dtype=torch.int64), str(e)


def value_counts(dataset, workers, cache_dir=None, max_bad_samples=0):
    """Pixels of each mask value (256 bins) over a SegmentationFiles, or over a tensor of masks (the synthetic
    set). Masks that fail their checks are left out, up to `max_bad_samples` (training replaces them); one more
    stops the run. With `cache_dir`, kept there for the next start, which reads it back while the masks keep their
    paths, sizes and modification times and are mapped to train ids alike (masks_key)."""
    if isinstance(dataset, torch.Tensor):
        return torch.bincount(dataset.flatten().long(), minlength=256).tolist()
    path, key = (os.path.join(cache_dir, CACHE_FILE), masks_key(dataset)) if cache_dir else (None, None)
    cached = read_cache(path, key)
    if cached is not None:
        pixels, left_out = cached
        refuse_too_many(left_out, max_bad_samples)
        print0(f"pixels per class of the {len(dataset):,} training masks: from {shown(path)}{leaving_out(left_out)}")
        return pixels
    started = time.perf_counter()
    loader = DataLoader(MaskValues(dataset), batch_size=8, num_workers=workers, worker_init_fn=ignore_stop_signals)
    pixels, left_out = torch.zeros(256, dtype=torch.int64), []
    for counts, errors in loader:
        pixels += counts.sum(0)
        left_out += [error for error in errors if error]
        refuse_too_many(left_out, max_bad_samples)  # at once, not after reading every mask
    print0(f"counted the pixels per class of the {len(dataset):,} training masks in {time.perf_counter() - started:.1f}"
           f" s (-j {workers}){leaving_out(left_out)}")
    if key is not None:
        write_cache(path, key, pixels.tolist(), left_out)
    return pixels.tolist()


def refuse_too_many(left_out, max_bad_samples):
    """Stop at the first mask past --max-bad-samples, as training would: with 0, by the mask's own error."""
    if len(left_out) > max_bad_samples:
        error = left_out[max_bad_samples]
        raise SampleError(error) if not max_bad_samples else UserError(
            BadSamples(max_bad_samples).too_many(error, max_bad_samples + 1))


def leaving_out(left_out):
    if not left_out:
        return ""
    fail = "fails its" if len(left_out) == 1 else "fail their"
    return f", leaving out {len(left_out)} that {fail} checks (--max-bad-samples; the first: {left_out[0]})"


def masks_key(dataset):
    """What the count depends on: each mask's path, size and modification time, and what turns its values into
    train ids (the label maps, pickled, and the class names and colours: a reordered classes.txt, --classes-file,
    --binary-masks); None if a mask cannot be read. --ignore-index is applied after the count."""
    try:
        listed = [(mask, info.st_size, info.st_mtime_ns) for _, mask in dataset.files for info in [os.stat(mask)]]
    except OSError:  # the count meets it and says so
        return None
    mapping = pickle.dumps((dataset.class_names, dataset.palette, dataset.label_maps))
    return hashlib.sha256(json.dumps(listed).encode() + mapping).hexdigest()


def read_cache(path, key):
    """(pixels, errors of the masks left out) kept at `path` under `key`, or None."""
    if key is None:
        return None
    try:
        with open(path) as f:
            cached = json.load(f)
        return (cached["pixels"], cached["left_out"]) if cached["key"] == key else None
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or not one of ours: counted again
        return None


def write_cache(path, key, pixels, left_out):
    try:  # written whole, then renamed: never read half-written
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{path}.tmp.{os.getpid()}", "w") as f:
            json.dump({"key": key, "pixels": pixels, "left_out": left_out}, f)
        os.replace(f"{path}.tmp.{os.getpid()}", path)
    except OSError as e:
        print0(f"note: cannot write {shown(path)} ({reason(e)}): the next start counts the pixels again")


def dice_loss(logits, target, weight=None):
    """1 - the soft Dice coefficient of each class present in `target`, averaged over those classes (weighted by
    `weight` when given), the batch's pixels counted as one image; IGNORE_INDEX pixels are left out. In float32
    whatever the autocast dtype: sums over millions of pixels lose too much in 16 bits."""
    with torch.autocast(logits.device.type, enabled=False):
        probabilities = logits.float().softmax(1)
        labelled = target != IGNORE_INDEX
        classes = target.masked_fill(~labelled, 0).unsqueeze(1)
        labelled = labelled.unsqueeze(1).float()
        num_classes = probabilities.shape[1]

        def per_class(values):  # sums by the pixel's class; index_put_ is deterministic on CUDA, scatter_add_ not
            return values.new_zeros(num_classes).index_put_((classes.flatten(),), values.flatten(), accumulate=True)
        intersection = per_class(probabilities.gather(1, classes) * labelled)
        present = per_class(labelled)
        predicted = (probabilities * labelled).sum((0, 2, 3))
        dice = 2 * intersection / (present + predicted).clamp(min=1e-6)
        share = (present > 0).float() * (1 if weight is None else weight)
        return (share * (1 - dice)).sum() / share.sum().clamp(min=1e-6)
