"""Data pieces both tasks share: image files read or refused in one line; the seeding scheme; samplers; loaders."""
import os
import signal
import stat
import threading
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS

from common.log import SampleError, UserError

# ---- image files: only regular files are read (a FIFO would block, /dev/zero never end).

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as torchvision's weights expect
REPLACE_IMAGE = "delete the file or replace it with a valid image"
# Besides torchvision's list, the other photo formats Pillow reads (of a GIF, the first frame).
IMAGE_EXTENSIONS = IMG_EXTENSIONS + (".jfif", ".jpe", ".gif", ".apng", ".avif", ".pbm", ".pnm")


def replace_hint(what):
    return f"delete the file or replace it with a valid {what}"


def shown(text):
    """repr-quoted when a character would break or hide in a one-line message (newline, BOM, undecodable byte)."""
    text = os.fsdecode(text) if isinstance(text, bytes) else str(text)
    return text if text.isprintable() else repr(text)


def _kind(mode):
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


def not_a_file_error(path, what="image", mode=None):
    link = os.readlink(path) if os.path.islink(path) else None
    if link is not None and not os.path.exists(path):
        return SampleError(f"{what} {shown(path)} is a symlink to {shown(link)}, which does not exist: "
                           "fix the link or remove it")
    if mode is None:
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            return SampleError(f"cannot read {what} {shown(path)} ({reason(e)}): {replace_hint(what)}")
    kind = f"a symlink to {shown(link)}, {_kind(mode)}" if link is not None else _kind(mode)
    return SampleError(f"{what} {shown(path)} is {kind}, not a regular file: only regular files are read as "
                       f"{what}s; remove it or replace it with the {what} file")


def reason(e):
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _open_nonblocking(path, flags):
    # Opening a FIFO for reading would otherwise wait for a writer forever, before fstat can tell what it is.
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


def open_regular(path, what="image"):
    try:
        f = open(path, "rb", opener=_open_nonblocking)
    except OSError as e:
        if isinstance(e, FileNotFoundError) and os.path.islink(path):
            raise not_a_file_error(path, what) from None
        if isinstance(e, FileNotFoundError):  # "delete the file" would name a file that is gone already
            raise SampleError(f"{what} {shown(path)} was listed but no longer exists (moved or deleted since): put "
                              "it back, or take it out of the data; if a start-up line named a cache of the listing "
                              "(file_list_*.npz), delete that file to list the data anew") from None
        raise SampleError(f"cannot read {what} {shown(path)} ({reason(e)}): {replace_hint(what)}") from None
    info = os.fstat(f.fileno())
    if not stat.S_ISREG(info.st_mode):
        f.close()
        raise not_a_file_error(path, what, info.st_mode)
    return f, info.st_size


def read_image(path, name=None, resize_shorter_side=None):
    """As RGB; `name` names a file object in errors; the resized size is checked before decoding."""
    source = open_regular(path)[0] if isinstance(path, (str, bytes, os.PathLike)) else path
    try:
        with source, Image.open(source) as image:  # opening reads the header only
            check_resized_size(name or path, image.size, resize_shorter_side)
            if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit: keep the top 8 bits, not a clipped copy
                image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257).clip(0, 255).astype(np.uint8))
            return image.convert("RGB")
    except SampleError:
        raise
    except Exception as e:
        raise SampleError(f"cannot read image {shown(name or path)} ({reason(e)}): {REPLACE_IMAGE}") from None


MAX_RESIZED_PIXELS = 64_000_000  # 768 MB as float32 RGB; a photo of any usual shape stays far below


def check_resized_size(path, size, shorter_side):
    """A 143-byte PNG of 20000x1 pixels would be resized to 256x5,120,000: gigabytes."""
    if shorter_side is None:
        return
    width, height = size
    resized = shorter_side * int(shorter_side * max(width, height) / max(min(width, height), 1))
    if resized > MAX_RESIZED_PIXELS:
        raise SampleError(f"image {shown(path)} is {width}x{height} pixels: resized to a shorter side of "
                          f"{shorter_side} it would take {resized / 1e6:,.0f} megapixels, more than the "
                          f"{MAX_RESIZED_PIXELS / 1e6:.0f} allowed: crop it to a usual shape, or remove it")


class NormalizeBytes:
    def __init__(self, device):
        # Made once on the device: v2.Normalize copies Python lists to the GPU every call, a sync in every step.
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
        self.inv_std = 1 / (torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255)

    def __call__(self, images):
        return (images.float() - self.mean) * self.inv_std


# ---- the seeding scheme: where every random number of a training run comes from ----
#
# Each stream is seeded from --seed and where in the run it is used, never from what ran before: a resumed run (also
# on another number of processes, same global and per-process batch) replays the uninterrupted one, and no
# augmentation depends on the worker that loads it.
#
#   weight initialisation: seed, in the train script before the model is built
#   data order (also --ra-sampler's and --balanced-sampler's): seed + epoch, in TrainingSampler
#   each sample's augmentation (CPU workers): (seed, epoch, sample index), in SeededSamples
#   the workers' base seed (the per-epoch stream): (seed, epoch, rank), in training_batches
#   dropout, stochastic depth, MixUp/CutMix, the synthetic set's flips (the per-micro-batch stream):
#     (seed, epoch, step, slot), in train_step before each micro-batch is fetched
#   device augmentation (--data-backend gpu): (seed, epoch, step, slot), a torch.Generator of its own in
#     DeviceLoader (it prepares batches on a side thread)
#   the stand-in for a file that fails to load: (seed, sample index), in common/bad_samples.py, alike on any rank
#     and epoch (never a sample its chain tried before)
#
# Keyed by slot (BatchLayout), not by rank, a run resumed on another number of processes draws the same. The
# per-epoch stream stays per rank: the workers' base seed reaches no sample. A worker's own stream depends on which
# worker gets which batch: nothing draws from it, hence MixUp and CutMix run in the main process. SeedSequence
# hashes the whole tuple: positions of any size (1.28M sample indices) never share a seed by arithmetic accident.

_TAGS = {"epoch": 1, "step": 2, "sample": 3, "batch": 4, "stand-in": 5}


def derive_seed(stream, seed, *position):
    entropy = [_TAGS[stream], seed % 2**64, *position]
    high, low = np.random.SeedSequence(entropy).generate_state(2, np.uint32).tolist()
    return ((high << 32) | low) >> 1


def seed_epoch(seed, epoch, rank):
    torch.manual_seed(derive_seed("epoch", seed, epoch, rank))


def seed_micro_batch(seed, epoch, step, slot):
    torch.manual_seed(derive_seed("step", seed, epoch, step, slot))


def sample_seed(seed, epoch, index):
    return derive_seed("sample", seed, epoch, index)


# ---- samplers and loaders ----

def bad_sample_budget(limit, output_dir):
    """None at 0: the first file that fails to load stops the run."""
    if not limit:
        return None
    from common.bad_samples import BadSamples
    return BadSamples(limit, output_dir)


@dataclass(frozen=True)
class BatchLayout:
    """A step's global batch in `slots` slots of batch_size (slot j: entries j, j + slots, ...); micro-batch m of
    rank r is slot m x world_size + r: resumed on another layout of the same global batch, a run goes on with the
    same samples."""

    world_size: int = 1
    rank: int = 0
    batch_size: int = 1
    accum_steps: int = 1

    @property
    def global_batch(self):
        return self.world_size * self.batch_size * self.accum_steps

    @property
    def slots(self):
        return self.world_size * self.accum_steps

    def slot(self, micro):
        return micro * self.world_size + self.rank

    @classmethod
    def planned(cls, env, batch_size, accum_steps=None, global_batch=None):
        """With --global-batch N, --accum-steps is N / (processes x -b): an elastic launch keeps the global batch."""
        world_size, per_step = env.world_size, env.world_size * batch_size
        if global_batch is None:
            return cls(world_size, env.rank, batch_size, accum_steps or 1)
        processes = f"{world_size} process{'es' if world_size > 1 else ''}"
        if global_batch % per_step:
            raise UserError(f"--global-batch {global_batch} is not a multiple of {processes} x -b {batch_size} = "
                            f"{per_step}: start on a number of processes that divides it, or change -b")
        if accum_steps not in (None, global_batch // per_step):
            raise UserError(f"--accum-steps {accum_steps} and --global-batch {global_batch} disagree on {processes} x "
                            f"-b {batch_size} (that global batch needs --accum-steps {global_batch // per_step}): give "
                            "one of them")
        return cls(world_size, env.rank, batch_size, global_batch // per_step)

    def described(self):
        processes = f"{self.world_size} process{'es' if self.world_size > 1 else ''}"
        return f"{self.global_batch} images ({processes} x -b {self.batch_size} x --accum-steps {self.accum_steps})"


class TrainingSampler(Sampler):
    """One order for all ranks, from seed + epoch, cut by BatchLayout (the tail after the last global batch left
    out). `reps` (--ra-sampler): each sample `reps` times in a row, as virtual indices index + copy * len(dataset)
    that SeededSamples augments apart. `classes` (--balanced-sampler): draws weighted by 1 / class count."""

    def __init__(self, dataset, layout, seed, reps=0, classes=None):
        self.dataset, self.layout, self.seed, self.reps = dataset, layout, seed, reps
        self.weights = None if classes is None else 1 / torch.bincount(classes)[classes].double()
        self.steps_per_epoch = len(dataset) // layout.global_batch
        self.epoch = self.start_step = 0
        if self.steps_per_epoch == 0:
            raise UserError(f"-b {layout.batch_size} x --accum-steps {layout.accum_steps} is more than the "
                            f"{len(dataset) // layout.world_size} training images per process: lower -b or "
                            "--accum-steps")

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step
        if isinstance(self.dataset, SeededSamples):
            self.dataset.epoch = epoch

    def order(self):
        n, generator = len(self.dataset), torch.Generator().manual_seed(self.seed + self.epoch)
        copies = torch.arange(max(self.reps, 1))
        if self.weights is None:
            order = torch.randperm(n, generator=generator)[:, None]
        else:  # each draw a virtual index of its own, augmented apart
            order = torch.multinomial(self.weights, n, replacement=True, generator=generator)[:, None]
            copies = torch.arange(n)[:, None] * len(copies) + copies
        return (order + n * copies).flatten()

    def __iter__(self):
        order, layout = self.order(), self.layout
        for step in range(self.start_step, self.steps_per_epoch):
            global_batch = order[step * layout.global_batch:(step + 1) * layout.global_batch]
            for micro in range(layout.accum_steps):
                yield from global_batch[layout.slot(micro)::layout.slots].tolist()

    def __len__(self):
        return (self.steps_per_epoch - self.start_step) * self.layout.accum_steps * self.layout.batch_size

    def position(self, batch_index):
        """(step, slot) of this rank's `batch_index`-th micro-batch since the epoch (re)started."""
        steps, micro = divmod(batch_index, self.layout.accum_steps)
        return self.start_step + steps, self.layout.slot(micro)


class SeededSamples(Dataset):
    """Seeded per (seed, epoch, index), not by the worker's stream: alike on any worker, rank or resume point."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        with torch.random.fork_rng(devices=[]):  # the caller's own stream is left as it was
            torch.manual_seed(sample_seed(self.seed, self.epoch, index))
            return self.dataset[index % len(self.dataset)]


def ignore_stop_signals(worker_id):
    """Stop signals sent to the process group must not kill workers before the main process has saved; its own
    SIGTERM still ends them (at exit it would wait for them forever). SIGBUS (full /dev/shm) gets its default
    action back: the worker dies of it, and the main process reports that in one line."""
    signal.signal(signal.SIGBUS, signal.SIG_DFL)
    for signum in (signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # no way to tell who sent it (macOS): leave SIGTERM as it is
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    parent = os.getppid()

    def end_on_the_parents_sigterm():
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)

    threading.Thread(target=end_on_the_parents_sigterm, daemon=True).start()


def default_workers(most=8):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(most, cores)


class ShardedEvalSampler(Sampler):
    """Every sample once, no padding: DistributedSampler's padding would count some samples twice."""

    def __init__(self, dataset, rank=0, world_size=1):
        self.indices = range(rank, len(dataset), world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class TensorLoader:

    def __init__(self, images, labels, sampler, batch_size, transform, drop_last):
        self.images, self.labels, self.sampler = images, labels, sampler
        self.batch_size, self.transform, self.drop_last = batch_size, transform, drop_last
        self.dataset = images

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        indices = torch.tensor(list(self.sampler)) % len(self.images)  # % for repeated augmentation's copies
        indices = indices.to(self.images.device, non_blocking=True)
        for b in range(len(self)):
            batch = indices[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.transform(self.images[batch], self.labels[batch])


class BatchesThrough:
    """`function(*batch)` in the training thread as each batch is trained on, not in a worker, whose random
    stream is its own."""

    def __init__(self, loader, function):
        self.loader, self.function = loader, function
        self.sampler, self.dataset, self.batch_size = loader.sampler, loader.dataset, loader.batch_size

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)  # made now, in the training thread, from the stream the loop just seeded
        return (self.function(*batch) for batch in batches)
