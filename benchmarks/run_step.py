"""Every call benchmarks/throughput.py makes into the training scripts, their data modules and the loop's pieces in
common/ (engine, optim, log, data), in one place: when their signatures change, this file is the one to adapt.

A row must time the step the scripts run, so the arguments come from the scripts' own parsers and the model,
optimizer, LR schedule, GradScaler and loaders are built as train.py builds them.
"""
import contextlib
import io
import re
import signal
import warnings

import torch
from torch import nn

from classification import train as classification_train
from classification.data import dataset_classes
from classification.data import load_train as classification_load_train
from classification.data import load_val as classification_load_val
from classification.model import create_model as create_classifier
from common.data import BatchLayout
from common.distributed import DistEnv
from common.engine import Precision, StepParts, configure_kernels, evaluate, install_run_guards, train_step
from common.log import ProgressLog
from common.metrics import ClassificationMeter
from common.optim import create_lr_scheduler, create_optimizer
from segmentation import train as segmentation_train
from segmentation.data import dataset_info
from segmentation.data import load_train as segmentation_load_train
from segmentation.model import create_model as create_segmenter


def script_args(setting, opts, data, device, backend):
    """The setting as the training script's own flags, parsed and completed by its own parser."""
    flags = ["--model", setting.model, "-j", str(opts.workers), "--device", str(device), "--data-backend", backend]
    if setting.dtype != "float32":
        flags += ["--amp-dtype", setting.dtype]
    flags += ["--channels-last"] * setting.channels_last + ["--compile"] * setting.compile
    flags += ["--grad-checkpointing"] * setting.grad_checkpointing
    if setting.task == "classification":
        script = classification_train
        crop = str(opts.crop_size)
        flags += ["--data-path", data["imagefolder"], "-b", str(opts.batch_size), "--train-crop-size", crop,
                  "--val-crop-size", crop, "--val-resize-size", str(opts.crop_size * 256 // 224)]
    else:
        script = segmentation_train
        flags += ["--data-path", data["cityscapes"], "--dataset", "cityscapes", "-b", str(opts.seg_batch_size),
                  "--output-stride", str(setting.output_stride), "--crop-size", *map(str, opts.seg_crop_size),
                  "--base-size", str(opts.seg_crop_size[1])]  # Cityscapes' recipe: 1024 for 512x1024 crops
    args = script.finish_args(script.get_args_parser().parse_args(flags))
    args.world_size = 1
    return args


def prepare(setting, args, device):
    """torch's global settings as the script sets them; the class names of the data set."""
    configure_kernels(device, args.use_deterministic_algorithms)
    torch.manual_seed(args.seed)
    return dataset_classes(args) if setting.task == "classification" else dataset_info(args)[0]


def load(setting, args, device, class_names, train):
    """The script's own loader of the backend in args (classification's evaluation loader when not train)."""
    env = DistEnv()
    if not train:
        return classification_load_val(args, env, device, class_names)
    layout = BatchLayout.planned(env, args.batch_size, args.accum_steps, args.global_batch)
    if setting.task == "classification":
        return classification_load_train(args, layout, device, class_names, None)
    return segmentation_load_train(args, layout, device, None)


def start_pass(loader, epoch):
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)


def quietly(function, *args):
    """The engine prints a progress line per call; the table is throughput.py's output."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        # float16's GradScaler skips its first steps while it finds its scale, which torch reports each time.
        warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before `optimizer.step()`"))
        return function(*args)


def optimizer_label(optimizer, device):
    """The optimizer a row steps, as its JSON records it: the class and the implementation torch runs."""
    fused, foreach = optimizer.defaults.get("fused"), optimizer.defaults.get("foreach")
    if fused:
        implementation = "fused"
    elif foreach or (foreach is None and device.type == "cuda"):  # torch's default on CUDA tensors
        implementation = "foreach"
    else:
        implementation = "for-loop"
    return f"{type(optimizer).__name__} ({implementation})"


class Runner:
    """The model, optimizer and scaler of one setting, built as the training scripts build them; train(batches)
    and eval(batches) run the engine's own loops over any sized iterable of batches."""

    def __init__(self, setting, args, device, num_classes):
        self.setting, self.args, self.device, self.num_classes = setting, args, device, num_classes
        precision = Precision(device, args.amp, args.amp_dtype, args.channels_last)
        precision.configure_kernels(args.use_deterministic_algorithms)  # as train.py: cuDNN autotuning, TF32
        if setting.task == "classification":
            model, head = create_classifier(args.model, None, num_classes, grad_checkpointing=args.grad_checkpointing)
            criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
            groups = dict(norm_weight_decay=args.norm_weight_decay, head=head, head_lr=args.head_lr)
            schedule = dict(step_size=args.lr_step_size, gamma=args.lr_gamma)
        else:
            model = create_segmenter(args.model, num_classes, args.output_stride, args.aux_loss, None, args.unet_width,
                                     crop_size=args.crop_size, grad_checkpointing=args.grad_checkpointing)
            criterion = segmentation_train.SegmentationLoss(args.ignore_index, args.aux_weight)
            groups = dict(norm_weight_decay=args.norm_weight_decay)
            schedule = dict(power=args.lr_power)
        model.to(device, memory_format=precision.memory_format)
        # The call both scripts make: SGD is never fused there (common/optim.py says why).
        optimizer = create_optimizer(args.opt, model, args.lr, args.momentum, args.weight_decay, device.type, **groups)
        self.optimizer_label = optimizer_label(optimizer, device)
        # The schedule's shape does not change a step's cost; any epoch length will do.
        lr_scheduler = create_lr_scheduler(
            optimizer, args.lr_scheduler, args.epochs * 1000, 1000, warmup_epochs=args.lr_warmup_epochs,
            warmup_method=args.lr_warmup_method, warmup_decay=args.lr_warmup_decay, lr_min=args.lr_min, **schedule)
        if args.compile:
            model.compile()  # in place, as the scripts do; compilation happens in the first warm-up step
        self.parts = StepParts(model, criterion, optimizer, lr_scheduler, precision.grad_scaler(optimizer), precision)
        self.model, self.precision = model, precision
        # Random-label batches that make the loss diverge must not stop the timing (their non-finite steps are still
        # skipped, as in a real run); nor does a stop signal wait for a step's end: a benchmark just ends.
        self.guards = install_run_guards(device, 0, self.parts.scaler, max_nonfinite_steps=10**9)
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def train(self, batches):
        quietly(self.train_steps, batches)

    def train_steps(self, batches):
        """The steps of the scripts' loop over `batches`, with its bookkeeping: one progress line, at the end,
        whose read of the losses waits for the device."""
        self.parts.model.train()
        progress = ProgressLog(10**9)
        progress.start_epoch(0, 0, len(batches))
        timed = progress.timed(iter(batches))
        for step in range(len(batches)):
            loss, grad_norm = train_step(self.parts, timed, BatchLayout(), self.args.seed, 0, step)
            printed = progress.log(step, loss, grad_norm, self.parts.optimizer.param_groups[0]["lr"])
            self.guards.stop_requested(loss, grad_norm, 0, step, sync_point=printed)

    def eval(self, batches):
        quietly(evaluate, self.model, batches, ClassificationMeter(self.num_classes, self.device), self.precision)
