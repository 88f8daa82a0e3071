"""Timing one row of benchmarks/throughput.py: batches from a loader's running iterator, the warm-up on random
batches, the timed steps between two device synchronisations, and the peak memory of both."""
import itertools
import time

import torch

from benchmarks.run_step import start_pass


class Batches:
    """Batches from a loader's running iterator, across as many passes as asked for. A short last batch is
    skipped: a compiled model would compile again for its shape."""

    def __init__(self, loader, batch_size):
        self.loader, self.batch_size = loader, batch_size
        self.epoch, self.iterator, self.passes_started, self.given_in_pass = 0, None, 0, 0

    def next(self):
        while True:
            if self.iterator is None:
                start_pass(self.loader, self.epoch)
                self.iterator, self.given_in_pass = iter(self.loader), 0
                self.passes_started += 1
            try:
                batch = next(self.iterator)
            except StopIteration:
                if self.given_in_pass == 0:  # another pass would not give one either
                    raise RuntimeError(f"the loader holds no full batch of {self.batch_size}: give it more images "
                                       "or lower the batch size") from None
                self.iterator, self.epoch = None, self.epoch + 1
                continue
            if len(batch[0]) == self.batch_size:
                self.given_in_pass += 1
                return batch

    def take(self, count):
        return Take(self.next, count)

    def close(self):
        if hasattr(self.iterator, "close"):  # DeviceLoader's generator: stops its producer thread now
            self.iterator.close()
        self.iterator = None


class Take:
    """What the training steps and evaluate need of a loader: a length and `count` batches."""

    def __init__(self, next_batch, count):
        self.next_batch, self.count = next_batch, count

    def __len__(self):
        return self.count

    def __iter__(self):
        return (self.next_batch() for _ in range(self.count))


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def input_size(setting, args, train=True):
    if setting.task == "segmentation":
        return tuple(args.crop_size)
    crop = args.train_crop_size if train else args.val_crop_size
    return crop, crop


def random_batches(runner, train, count=4):
    """A few distinct batches of the loaders' shapes, already on the device, for warm-up and for eval's
    synthetic rows (load_val has no synthetic backend)."""
    args, size = runner.args, input_size(runner.setting, runner.args, train)
    label_shape = (args.batch_size,) if runner.setting.task == "classification" else (args.batch_size, *size)
    return [(torch.randn(args.batch_size, 3, *size, device=runner.device),
             torch.randint(runner.num_classes, label_shape, device=runner.device)) for _ in range(count)]


def warm_up(runner, train, steps):
    """Compilation and cuDNN's algorithm search happen here, on random batches, before any loader starts."""
    source = itertools.cycle(random_batches(runner, train))
    (runner.train if train else runner.eval)(Take(lambda: next(source), steps))
    synchronize(runner.device)


class SyntheticLoader:
    """Eval's synthetic rows: the same few random batches over and over, as SyntheticBatches gives training."""

    def __init__(self, batches):
        self.batches, self.sampler = batches, None

    def __iter__(self):
        return itertools.cycle(self.batches)


def time_row(runner, batches, train, opts):
    """img/s of `opts.steps` steps after `opts.data_warmup` steps from the same loader; peak memory of both."""
    device, step = runner.device, runner.train if train else runner.eval
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step(batches.take(opts.data_warmup))  # workers started, queues filled: the state a long epoch runs in
    passes_before = batches.passes_started
    synchronize(device)
    start = time.perf_counter()
    step(batches.take(opts.steps))
    synchronize(device)
    seconds = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"steps": opts.steps, "seconds": round(seconds, 3),
            "img_per_s": opts.steps * runner.args.batch_size / seconds,
            "peak_memory_gib": round(memory, 2) if memory is not None else None,
            "passes_started_while_timed": batches.passes_started - passes_before}
