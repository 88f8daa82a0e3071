"""Every call benchmarks/throughput.py makes into the training scripts, their data modules and the loop's pieces in
common/ (engine, optim, precision, progress, stopping, data), in one place: when their signatures change, this
file is the one to adapt.

A row must time the step the scripts run, so the arguments come from the scripts' own parsers and the model,
optimizer, LR schedule, GradScaler and loaders are built as train.py builds them.
"""
import contextlib
import io
import re
import warnings

import torch
from torch import nn

from classification import train as classification_train
from classification.data import dataset_classes
from classification.data import load_train as classification_load_train
from classification.data import load_val as classification_load_val
from classification.model import create_model as create_classifier
from classification.model import enable_grad_checkpointing
from common.data import BadSamples, BatchLayout
from common.distributed import DistEnv
from common.engine import configure_torch, evaluate, train_one_epoch
from common.metrics import ClassificationMeter
from common.optim import create_lr_scheduler, create_optimizer, param_groups
from common.engine import autocast_context, grad_scaler, precision_from_flags
from common.log import ProgressLog
from common.engine import NonFiniteGuard
from segmentation import train as segmentation_train
from segmentation.data import dataset_info
from segmentation.data import load_train as segmentation_load_train


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
    configure_torch(device, args.seed, args.use_deterministic_algorithms)
    return dataset_classes(args) if setting.task == "classification" else dataset_info(args)[0]


def load(setting, args, device, class_names, train):
    """The script's own loader of the backend in args (classification's evaluation loader when not train)."""
    env = DistEnv()
    if not train:
        return classification_load_val(args, env, device, class_names)
    layout = BatchLayout.planned(env, args.batch_size, args.accum_steps, args.global_batch)
    if setting.task == "classification":
        return classification_load_train(args, layout, device, class_names, BadSamples(0))
    return segmentation_load_train(args, layout, device, BadSamples(0))


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
        self.precision = precision_from_flags(args.amp, args.amp_dtype)
        self.autocast = autocast_context(device, self.precision)
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        if setting.task == "classification":
            model, head = create_classifier(args.model, None, num_classes)
            if args.grad_checkpointing:
                enable_grad_checkpointing(model)
            self.criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
            groups = param_groups(model, args.lr, args.weight_decay, args.norm_weight_decay, head, args.head_lr)
            schedule = dict(step_size=args.lr_step_size, gamma=args.lr_gamma)
        else:
            model = segmentation_train.build_model(args, num_classes)
            self.criterion = segmentation_train.SegmentationLoss(args.ignore_index, args.aux_weight)
            groups = param_groups(model, args.lr, args.weight_decay, args.norm_weight_decay)
            schedule = dict(power=args.lr_power)
        model.to(device, memory_format=self.memory_format)
        # The call both scripts make: SGD is never fused there (common/optim.py says why).
        self.optimizer = create_optimizer(args.opt, groups, args.lr, args.momentum, args.weight_decay, device.type)
        self.optimizer_label = optimizer_label(self.optimizer, device)
        # The schedule's shape does not change a step's cost; any epoch length will do.
        self.lr_scheduler = create_lr_scheduler(
            self.optimizer, args.lr_scheduler, args.epochs, 1000, warmup_epochs=args.lr_warmup_epochs,
            warmup_method=args.lr_warmup_method, warmup_decay=args.lr_warmup_decay, lr_min=args.lr_min, **schedule)
        self.scaler = grad_scaler(device, self.precision, self.optimizer)
        if args.compile:
            model.compile()  # in place, as the scripts do; compilation happens in the first warm-up step
        self.model = model

    def train(self, batches):
        # One progress line per call, at its end; random-label batches that make the loss diverge must not stop
        # the timing (their non-finite steps are still skipped, as in a real run).
        quietly(lambda: train_one_epoch(
            self.model, self.criterion, self.optimizer, self.lr_scheduler, self.scaler, batches, 0, device=self.device,
            autocast=self.autocast, progress=ProgressLog(10**9), memory_format=self.memory_format,
            nonfinite=NonFiniteGuard(10**9, None, self.scaler)))

    def eval(self, batches):
        quietly(evaluate, self.model, batches, ClassificationMeter(self.num_classes, self.device), self.device,
                self.autocast, self.memory_format)
