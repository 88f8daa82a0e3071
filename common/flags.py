"""The flags both train scripts take, by --help section; each script adds its own task's flags beside them.

Only definitions live here: the scripts read the values and pass them on as plain arguments.
"""
import argparse
import re


def _number(kind, accept, rule):
    def parse(text):
        value = kind(text)
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


# argparse types: a flag such as -b 0 or --clip-grad-norm -1 is refused with the flag's name at once, instead of
# failing later or, worse, running with a meaning nobody asked for.
positive_int = _number(int, lambda v: v > 0, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "0 or a positive integer")
positive_float = _number(float, lambda v: v > 0, "a positive number")
non_negative_float = _number(float, lambda v: v >= 0, "0 or a positive number")
probability = _number(float, lambda v: 0 <= v <= 1, "between 0 and 1")
seed_value = _number(int, lambda v: 0 <= v < 2**32, "between 0 and 4294967295 (2**32 - 1)")
DEVICE_NAMES = "cpu, cuda or cuda:N"


def device_name(text):
    """argparse type of --device: a typo (gpu) is refused at once, not by the first tensor moved to it."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"must be {DEVICE_NAMES}, got {text}")
    return text


def add_optimisation_flags(group, recipe):
    """Warmup, clipping, accumulation and the seed; `recipe(name)` is the help text of a data-dependent default."""
    add = group.add_argument
    add("--lr-warmup-epochs", type=non_negative_int, help=f"epochs of warmup {recipe('lr_warmup_epochs')}")
    add("--lr-warmup-method", default="linear", choices=["linear", "constant"], help="warmup shape (default: linear)")
    add("--lr-warmup-decay", type=positive_float, default=0.01,
        help="warmup starts at this fraction of --lr (default: 0.01)")
    add("--clip-grad-norm", type=positive_float, help="clip the gradient norm to this value (default: no clipping)")
    add("--accum-steps", type=positive_int, help="micro-batches per optimizer step (default: 1, or what --global-batch "
        "makes of it)")
    add("--global-batch", type=positive_int, metavar="N", help="images per optimizer step over all processes: "
        "each start sets --accum-steps to N / (processes x -b), so a run that comes back on another number of "
        "processes (torchrun --nnodes=MIN:MAX) keeps its global batch; a number of processes that does not "
        "divide it is refused (default: processes x -b x --accum-steps)")
    add("--seed", type=seed_value, default=0, help="seed of weights init, data order and augmentation (default: 0)")


def add_precision_flags(group):
    add = group.add_argument
    add("--device", type=device_name, help=f"{DEVICE_NAMES} (default: cuda when available)")
    add("--dist-backend", choices=["nccl", "gloo"], help="process-group backend of a multi-process run (default: "
        "nccl on GPUs, gloo on CPU); gloo also runs several processes on one GPU, which NCCL refuses")
    add("--amp", action="store_true", help="mixed precision (autocast); float16 adds loss scaling")
    add("--amp-dtype", choices=["float16", "bfloat16"], help="autocast dtype (implies --amp; default float16)")
    add("--channels-last", action="store_true", help="NHWC memory format (faster convolutions under AMP)")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--use-deterministic-algorithms", action="store_true", help="deterministic kernels only (slower)")


def add_checkpoint_flags(group):
    add = group.add_argument
    add("--output-dir", help="where checkpoints, logs and TensorBoard files go (default: nothing is written)")
    add("--resume", help="checkpoint to continue from, or 'auto' for <output-dir>/checkpoint.pth if it exists")
    add("--start-epoch", type=non_negative_int, default=0, help="first epoch (default: 0; set by --resume)")
    add("--checkpoint-interval", type=non_negative_int, default=0, metavar="STEPS",
        help="also save checkpoint.pth every STEPS optimizer steps inside an epoch (default: 0, at epoch ends only)")
    add("--eval-interval", type=non_negative_int, default=0, metavar="STEPS",
        help="validate every STEPS optimizer steps of the run, and at its end, instead of at each epoch's end; "
        "best.pth, log.jsonl and TensorBoard follow (default: 0, at each epoch's end)")
    add("--keep-checkpoints", type=non_negative_int, default=0, metavar="N",
        help="keep checkpoint_epoch<E>.pth of the last N epochs besides checkpoint.pth and best.pth (default: 0)")
    add("--max-nonfinite-steps", type=positive_int, default=3, metavar="N",
        help="stop when the loss or gradients are NaN or Inf in N consecutive steps, which are skipped (default: 3)")
    add("--stall-timeout", type=non_negative_float, default=600, metavar="SECONDS",
        help="a rank on which no optimizer step or evaluation batch finishes in SECONDS (counted from the first "
        "step) prints its threads' stacks and what it was waiting for, and exits with status 124 (default: 600; "
        "0: off)")
    add("--dist-timeout", type=positive_float, default=30, metavar="MINUTES",
        help="timeout of the process group's collectives and rendezvous (default: 30)")


def add_bad_sample_flag(group):
    group.add_argument("--max-bad-samples", type=non_negative_int, default=0, metavar="N",
                       help="training samples whose files fail to load (truncated, corrupt or unreadable images; "
                       "masks that fail their checks) that the run replaces by other samples, listed in "
                       "<output-dir>/bad_samples.txt; one more stops it (default: 0, the first stops it; "
                       "tools/check_data.py finds them all before training)")
