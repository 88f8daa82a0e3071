"""What a run tells the user: console lines from rank 0, one-line errors, log.jsonl, TensorBoard."""
import argparse
import json
import os
import sys

import torch.distributed as dist


class UserError(Exception):
    """A problem the user can fix (bad path, bad flag, bad file): reported in one line, without a traceback."""


def positive_int(text):
    """An argparse type: a flag such as -b 0 is refused with the flag's name instead of failing later."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def is_main_process():
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def print0(*args, **kwargs):
    if is_main_process():
        print(*args, **kwargs, flush=True)


def run_cli(main, args):
    """Run main(args); turn a UserError (also one raised in a DataLoader worker) into one line and exit 2."""
    try:
        main(args)
    except UserError as e:
        # A worker's error arrives with the worker's traceback in its text; the cause is its last line.
        message = str(e).strip().splitlines()[-1]
        message = message.split("UserError: ", 1)[-1]
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def tensorboard_writer(output_dir):
    """A SummaryWriter under <output_dir>/tb on rank 0, None elsewhere (or when nothing is to be written)."""
    if not output_dir or not is_main_process():
        return None
    from torch.utils.tensorboard import SummaryWriter  # imported late: it pulls in tensorboard

    return SummaryWriter(os.path.join(output_dir, "tb"))
