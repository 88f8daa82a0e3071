"""The flags both train scripts share, in their --help sections."""
import argparse
import os
import re

DEVICE_NAMES = "cpu, cuda or cuda:N"
# A year: far longer (inf, 1e13) overflows the process group's timedelta or torch's clock arithmetic.
MAX_DIST_TIMEOUT_MINUTES = 525_600


def number(kind, at_least=None, above=None, at_most=None):
    """An argparse type within bounds: -b 0 is refused with the flag's name at once, not later or silently."""
    noun = "integer" if kind is int else "number"
    if at_most is not None:
        rule = f"between {at_least} and {at_most}" if above is None else f"more than {above} and at most {at_most}"
    elif above is not None:
        rule = f"a positive {noun}" if above == 0 else f"more than {above}"
    else:
        rule = f"0 or a positive {noun}" if at_least == 0 else f"a positive {noun}" if at_least == 1 else \
            f"at least {at_least}"

    def parse(text):
        value = kind(text)
        low_ok = (at_least is None or value >= at_least) and (above is None or value > above)
        if not (low_ok and (at_most is None or value <= at_most)):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def device_name(text):
    """A typo (gpu) is refused at once, not by the first tensor moved to it."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"must be {DEVICE_NAMES}, got {text}")
    return text


def class_weights_source(text):
    if text not in ("none", "balanced") and not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"must be none, balanced or a file of 'class weight' lines; {text} is no "
                                         "file")
    return text


def add_shared_flags(parser, recipe, sections):
    """Returns the --help groups by name; `recipe(name)` is the help of a data-dependent default."""
    groups = {name: parser.add_argument_group(name) for name in sections}
    add = groups["data"].add_argument
    add("-j", "--workers", type=number(int, at_least=0), help="DataLoader worker processes per rank (default: 8, or "
        "the cores this process may use if fewer; 0 on the synthetic set)")
    add("--max-bad-samples", type=number(int, at_least=0), default=0, metavar="N",
        help="training samples whose files fail to load (truncated, corrupt or unreadable images; masks that fail "
        "their checks) that the run replaces by other samples, listed in <output-dir>/bad_samples.txt; one more "
        "stops it (default: 0, the first stops it; tools/check_data.py finds them all before training)")

    add = groups["optimisation"].add_argument
    add("--lr-warmup-epochs", type=number(int, at_least=0), help=f"epochs of warmup {recipe('lr_warmup_epochs')}")
    add("--lr-warmup-method", default="linear", choices=["linear", "constant"], help="warmup shape (default: linear)")
    add("--lr-warmup-decay", type=number(float, above=0), default=0.01,
        help="warmup starts at this fraction of --lr (default: 0.01)")
    add("--clip-grad-norm", type=number(float, above=0), help="clip the gradient norm to this value (default: no "
        "clipping)")
    add("--accum-steps", type=number(int, at_least=1), help="micro-batches per optimizer step (default: 1, or what "
        "--global-batch makes of it)")
    add("--global-batch", type=number(int, at_least=1), metavar="N", help="images per optimizer step over all "
        "processes: each start sets --accum-steps to N / (processes x -b), so a run that comes back on another "
        "number of processes (torchrun --nnodes=MIN:MAX) keeps its global batch; a number of processes that does not "
        "divide it is refused (default: processes x -b x --accum-steps)")
    add("--seed", type=number(int, at_least=0, at_most=2**32 - 1), default=0,
        help="seed of weights init, data order and augmentation (default: 0)")
    add("--class-weights", type=class_weights_source, default="none", metavar="{none,balanced,FILE}",
        help="loss weights: balanced (inverse to each class's share of the training images/pixels) or a FILE of "
        "'class weight' lines, scaled to a mean of 1 over those (default: none)")
    add("--freeze-backbone", action="store_true", help="train the head alone on pretrained layers: a classifier's "
        "last layer, a segmenter's layers after its backbone")

    add = groups["precision and speed"].add_argument
    add("--device", type=device_name, help=f"{DEVICE_NAMES} (default: cuda when available)")
    add("--dist-backend", choices=["nccl", "gloo"], help="process-group backend of a multi-process run (default: "
        "nccl on GPUs, gloo on CPU); gloo also runs several processes on one GPU, which NCCL refuses")
    add("--amp", action="store_true", help="mixed precision (autocast); float16 adds loss scaling")
    add("--amp-dtype", choices=["float16", "bfloat16"], help="autocast dtype (implies --amp; default float16)")
    add("--channels-last", action="store_true", help="NHWC memory format (faster convolutions under AMP)")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--use-deterministic-algorithms", action="store_true", help="deterministic kernels only (slower)")

    add_checkpoint_flags(groups["checkpoints and preemption"])
    groups["logging"].add_argument("--print-freq", type=number(int, at_least=1),
                                   help=f"optimizer steps between progress lines {recipe('print_freq')}")
    return groups


def add_checkpoint_flags(group):
    add = group.add_argument
    add("--output-dir", help="where checkpoints, logs and TensorBoard files go (default: nothing is written)")
    add("--resume", help="checkpoint to continue from, or 'auto' for <output-dir>/checkpoint.pth if it exists")
    add("--start-epoch", type=number(int, at_least=0), default=0, help="first epoch (default: 0; set by --resume)")
    add("--checkpoint-interval", type=number(int, at_least=0), default=0, metavar="STEPS",
        help="also save checkpoint.pth every STEPS optimizer steps inside an epoch (default: 0, at epoch ends only)")
    add("--eval-interval", type=number(int, at_least=0), default=0, metavar="STEPS",
        help="validate every STEPS optimizer steps of the run, and at its end, instead of at each epoch's end; "
        "best.pth, log.jsonl and TensorBoard follow (default: 0, at each epoch's end)")
    add("--keep-checkpoints", type=number(int, at_least=0), default=0, metavar="N",
        help="keep checkpoint_epoch<E>.pth of the last N epochs besides checkpoint.pth and best.pth (default: 0)")
    add("--max-nonfinite-steps", type=number(int, at_least=1), default=3, metavar="N",
        help="stop when the loss or gradients are NaN or Inf in N consecutive steps, which are skipped (default: 3)")
    add("--stall-timeout", type=number(float, at_least=0), default=600, metavar="SECONDS",
        help="a rank on which no optimizer step or evaluation batch finishes in SECONDS (counted from the first "
        "step) prints its threads' stacks and what it was waiting for, and exits with status 124 (default: 600; "
        "0: off)")
    add("--dist-timeout", type=number(float, above=0, at_most=MAX_DIST_TIMEOUT_MINUTES), default=30, metavar="MINUTES",
        help=f"timeout of the process group's collectives and rendezvous (default: 30; at most "
        f"{MAX_DIST_TIMEOUT_MINUTES}, a year)")
