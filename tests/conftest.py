"""Helpers shared by the tests: run the scripts in-process or as subprocesses, write image trees."""
import contextlib
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """pytest-xdist's --dist loadgroup (pytest.ini) sends the tests of one xdist_group to one worker by the suffix
    "@group" it gives their node ids; it sets item._nodeid, which pytest 9's nodes no longer read (they keep a
    NodeId in item._id), and the groups would then be spread over the workers like any test. Give the suffix
    where xdist's did not take."""
    if not getattr(config.option, "loadgroup", False):  # set on xdist's workers under --dist loadgroup
        return
    for item in items:
        names = {str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
                 for mark in item.iter_markers("xdist_group")}
        suffix = "@" + "_".join(sorted(names))
        if not names or item.nodeid.endswith(suffix):
            continue
        try:
            from _pytest.nodeid import NodeId
            item._id = NodeId.parse(item.nodeid + suffix)
        except (ImportError, AttributeError):
            pass
        if not item.nodeid.endswith(suffix):  # another pytest: the groups spread over workers, slower but alike
            warnings.warn("xdist_group has no effect with this pytest: grouped fixtures run on each worker")
            return

# One thread per test process: pytest-xdist runs as many tests at once as there are cores, and two threads each
# would only fight over them (runs in a subprocess get OMP_NUM_THREADS=1 from ENV below).
torch.set_num_threads(1)

# Small enough for seconds on 2 CPU cores; resnet18 is the smallest torchvision model with a Linear head
# and batch norm, which is what the recipe code paths care about.
TINY = ["--model", "resnet18", "--device", "cpu", "--print-freq", "4", "--synthetic-train-size", "512",
        "--synthetic-val-size", "301", "-b", "32", "--epochs", "1"]


@contextlib.contextmanager
def own_signal_handlers():
    """The scripts install SIGTERM/SIGUSR1/SIGINT handlers for preemption; pytest keeps its own. And a run's lock on
    its output folder and its stall watchdog end with the run, as they do when a script's process exits."""
    from common.engine import StallWatchdog
    from common.log import release_output_dirs
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        yield
    finally:
        if StallWatchdog.latest is not None:
            StallWatchdog.latest.stop()
        release_output_dirs()
        for signum, handler in saved.items():
            signal.signal(signum, handler)


@pytest.fixture(autouse=True)
def restored_signal_handlers():
    """A test that builds a run's pieces itself (RunGuards) installs their stop handlers in pytest's process;
    processes forked later (tools/check_data.py's pool) would inherit them and ignore the pool's SIGTERM."""
    with own_signal_handlers():
        yield


def train(*argv):
    """classification/train.py in this process (no interpreter start-up); UserError propagates."""
    from classification import train as script
    args = script.finish_args(script.get_args_parser().parse_args([str(a) for a in argv]))
    with own_signal_handlers():
        script.main(args)
    return args


def evaluate(*argv):
    from classification import eval as script
    args = script.get_args_parser().parse_args([str(a) for a in argv])
    script.main(args)


# One thread per process: two processes of a torchrun test then share the 2 cores without contention, and
# runs compared bit for bit use the same reduction order.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run(*argv, timeout=1800):
    """A command from the repository root, as a user would type it; returns the CompletedProcess. The timeout
    only guards against a hang: it is far above what any test takes on a slow machine."""
    return subprocess.run([str(a) for a in argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)


def popen(*argv, **kw):
    """A command whose output is read while it runs (stdout as text lines)."""
    return subprocess.Popen([str(a) for a in argv], cwd=ROOT, stdout=subprocess.PIPE, text=True, env=ENV, **kw)


def python(script, *argv, **kw):
    return run(sys.executable, ROOT / script, *argv, **kw)


def torchrun(nproc, script, *argv, **kw):
    return run(sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               ROOT / script, *argv, **kw)


def write_image(path, mode="RGB", size=(40, 36), fmt=None, seed=0):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16)).save(path, format=fmt or "PNG")
        return
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    pixels = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode).save(path, format=fmt)


def write_tree(root, classes=("cat", "dog", "fox"), train_per_class=8, val_per_class=3):
    """An ImageFolder tree of small random JPEGs (what is tested is the plumbing, not learning)."""
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, name in enumerate(classes):
            for i in range(count):
                write_image(root / split / name / f"{i}.jpg", seed=100 * c + i + 50 * (split == "val"))
    return root


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One short synthetic run whose outputs several tests read."""
    out = tmp_path_factory.mktemp("trained")
    train(*TINY, "--epochs", "2", "--output-dir", out)
    return out


# Segmentation: a UNet of width 8 on 32-pixel scenes with 3 classes learns in seconds.
SEG_TINY = ["--device", "cpu", "--unet-width", "8", "--synthetic-image-size", "32", "--synthetic-classes", "3",
            "--synthetic-train-size", "256", "--synthetic-val-size", "101", "-b", "16", "--epochs", "1",
            "--print-freq", "4"]


def train_segmentation(*argv):
    from segmentation import train as script
    args = script.finish_args(script.get_args_parser().parse_args([str(a) for a in argv]))
    with own_signal_handlers():
        script.main(args)
    return args


def evaluate_segmentation(*argv):
    from segmentation import eval as script
    script.main(script.get_args_parser().parse_args([str(a) for a in argv]))


# The segmentation learning bar: a UNet of width 16 on 1000 built-in 32-pixel scenes of 3 classes, 2 epochs.
# test_segmentation.py checks it learns; test_seg_folder.py trains the same on those scenes written as files.
SCENES = dict(size=32, classes=3, train_size=1000, val_size=101)
SCENES_RUN = ["--model", "unet", "--unet-width", "16", "--device", "cpu", "-b", "16", "--lr", "0.1", "--epochs", "2",
              "--print-freq", "25"]


@pytest.fixture(scope="session")
def scenes_learned(tmp_path_factory):
    """The output folder of SCENES_RUN on the built-in scenes; its tests share an xdist_group, so it runs once."""
    out = tmp_path_factory.mktemp("scenes-learned")
    train_segmentation(*SCENES_RUN, "--synthetic-image-size", SCENES["size"], "--synthetic-classes", SCENES["classes"],
                       "--synthetic-train-size", SCENES["train_size"], "--synthetic-val-size", SCENES["val_size"],
                       "--output-dir", out)
    return out


@pytest.fixture(scope="session")
def segmentation_run(tmp_path_factory):
    """One short synthetic segmentation run whose outputs several tests read."""
    out = tmp_path_factory.mktemp("segmentation")
    train_segmentation(*SEG_TINY, "--epochs", "2", "--output-dir", out)
    return out
