"""Segmentation data: joint image + mask transforms (torchvision v2), loaders, the synthetic scenes."""
import math
from functools import partial
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from common.data import (MEAN, STD, NormalizeBytes, SeededSamples, ShardedEvalSampler, TensorLoader, TrainingSampler,
                         ignore_stop_signals)
from common.distributed import from_rank0
from common.synthetic import SHAPES, contrasting_colours, noisy_backgrounds, shape_mask
from common.log import UserError

COLOUR_JITTER = 0.25  # brightness, contrast and saturation factors in 1 +- this
IGNORE_INDEX = 255  # void: left out of the loss and the metrics
SYNTHETIC_PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                     (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


# Each --dataset's reader, imported only when chosen: segmentation/datasets.py and folder.py import this module,
# so it imports them inside functions only.
def cityscapes(root, split, transforms=None):
    from segmentation.datasets import cityscapes
    return cityscapes(root, split, transforms)


def voc(root, split, transforms=None):
    from segmentation.datasets import voc
    return voc(root, split, transforms)


def ade20k(root, split, transforms=None):
    from segmentation.datasets import ade20k
    return ade20k(root, split, transforms)


def folder(root, split, transforms=None, classes_file=None, binary_masks=False):
    from segmentation.folder import folder_split
    return folder_split(root, split, transforms, classes_file, binary_masks)


class Layout(NamedTuple):
    """A --dataset: its reader (root, split, transforms=None, **options) -> SegmentationFiles, and the sizes its
    recipe trains at (mmsegmentation's: the shorter side rescaled around base_size, then crop_size crops)."""
    reader: object
    base_size: int
    crop_size: list
    options: tuple = ()  # the argparse dests it reads besides --data-path


DATASETS = {"cityscapes": Layout(cityscapes, 1024, [512, 1024]), "voc": Layout(voc, 512, [512, 512]),
            "ade20k": Layout(ade20k, 512, [512, 512]),
            "folder": Layout(folder, 512, [512, 512], ("classes_file", "binary_masks"))}


def open_split(name, root, split, flags):
    """`flags`: vars(args)."""
    layout = DATASETS[name]
    for other_name, other in DATASETS.items():
        for option in other.options:
            if option not in layout.options and flags.get(option):
                raise UserError(f"--{option.replace('_', '-')} is an option of --dataset {other_name}, not of "
                                f"--dataset {name}: drop it")
    return layout.reader(root, split, **{option: flags.get(option) for option in layout.options})


def train_transforms(base_size, crop_size, scale_range):
    """v2 resizes tv_tensors.Mask with nearest interpolation, always."""
    return v2.Compose([
        v2.RandomResize(int(scale_range[0] * base_size), int(scale_range[1] * base_size) + 1),
        v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=COLOUR_JITTER, contrast=COLOUR_JITTER, saturation=COLOUR_JITTER),
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
        v2.Normalize(MEAN, STD),
    ])


def val_transform(image, mask, base_size):
    """The mask is not resized: it is scored at the resolution it was annotated at."""
    image = F.to_dtype(F.resize(image, base_size, antialias=True), torch.float32, scale=True)
    return F.normalize(image, MEAN, STD), mask.to(torch.int64)


def load_dataset(args, split, resize_shorter_side):
    """Listed by rank 0 alone; not cached, as even ADE20K's lists in well under a second."""
    loaded = from_rank0(lambda: open_split(args.dataset, args.data_path, split, vars(args)))
    loaded.resize_shorter_side = resize_shorter_side
    return loaded


def dataset_info(args):
    if args.data_path is None:
        names = ["background", *SHAPES[:args.synthetic_classes - 1]]
        return names, SYNTHETIC_PALETTE[:len(names)]

    def of_val():
        dataset = open_split(args.dataset, args.data_path, "val", vars(args))
        return dataset.class_names, dataset.palette
    return from_rank0(of_val)


def load_train(args, layout, device, bad_samples):
    seed, batch_size, workers, backend = args.seed, args.batch_size, args.workers, args.data_backend
    augmentation = (args.base_size, args.crop_size, args.scale_range)
    if args.data_path is None:
        images, masks = make_scenes(args.synthetic_train_size, args.synthetic_image_size, args.synthetic_classes)
        return synthetic_loader(images.to(device), masks.to(device), TrainingSampler(masks, layout, seed), batch_size,
                                train=True)
    dataset = load_dataset(args, "train_aug" if args.voc_aug else "train", int(args.scale_range[1] * args.base_size))
    if backend == "synthetic":  # the model step alone
        from common.synthetic_batches import SyntheticBatches
        shapes = ((batch_size, 3, *args.crop_size), (batch_size, *args.crop_size))
        return SyntheticBatches(shapes, len(dataset.class_names), device, TrainingSampler(dataset, layout, seed))
    if backend == "gpu":  # the workers only decode
        from segmentation.gpu_augment import device_loader
        sampler = TrainingSampler(dataset, layout, seed)
        return device_loader(dataset, sampler, batch_size, workers, augmentation, device, seed, bad_samples)
    dataset.transforms = train_transforms(*augmentation)
    train_set = SeededSamples(bad_samples.stand_ins(dataset, seed) if bad_samples is not None else dataset, seed)
    # Not persistent: fresh workers each epoch seed from the per-epoch RNG (exact resume).
    loader = DataLoader(train_set, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                        sampler=TrainingSampler(train_set, layout, seed), drop_last=True,
                        worker_init_fn=ignore_stop_signals, collate_fn=bad_samples and bad_samples.collate)
    return bad_samples.reported(loader) if bad_samples is not None else loader


def load_val(args, env, device):
    """One image per batch for real data: their sizes differ."""
    if args.data_path is None:
        images, masks = make_scenes(args.synthetic_val_size, args.synthetic_image_size, args.synthetic_classes,
                                    split="val")
        sampler = ShardedEvalSampler(masks, env.rank, env.world_size)
        return synthetic_loader(images.to(device), masks.to(device), sampler, args.batch_size, train=False)
    val_set = load_dataset(args, "val", args.base_size)
    val_set.transforms = partial(val_transform, base_size=args.base_size)
    return DataLoader(val_set, batch_size=1, num_workers=args.workers, pin_memory=device.type == "cuda",
                      sampler=ShardedEvalSampler(val_set, env.rank, env.world_size), worker_init_fn=ignore_stop_signals)


def synthetic_loader(images, masks, sampler, batch_size, train):
    normalize = NormalizeBytes(images.device)

    def transform(images, masks):
        if train:
            flip = torch.rand(len(images), device=images.device) < 0.5
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
            masks = torch.where(flip.view(-1, 1, 1), masks.flip(-1), masks)
        return normalize(images), masks.long()

    return TensorLoader(images, masks, sampler, batch_size, transform, drop_last=train)


def make_scenes(num_samples, image_size=64, num_classes=6, seed=0, split="train", max_shapes=3):
    """(uint8 images [N, 3, S, S], uint8 masks [N, S, S]): mask 0 is background and k the k-th shape."""
    if not 2 <= num_classes <= len(SHAPES) + 1:
        raise ValueError(f"synthetic scenes have 2 to {len(SHAPES) + 1} classes, not {num_classes}")
    generator = torch.Generator().manual_seed(seed * 2 + (split != "train"))
    n, rand = num_samples, partial(torch.rand, generator=generator)
    images, background = noisy_backgrounds(n, image_size, generator)
    # Stripes: texture that a colour threshold cannot separate from shapes.
    angle, cycles, phase = rand(n, 1, 1) * math.pi, rand(n, 1, 1) * 6 + 2, rand(n, 1, 1) * 2 * math.pi
    coords = (torch.arange(image_size, dtype=torch.float32) + 0.5) / image_size
    along = coords.view(1, 1, -1) * angle.cos() + coords.view(1, -1, 1) * angle.sin()
    images = images + 0.12 * torch.sin(2 * math.pi * cycles * along + phase)[:, None]
    masks = torch.zeros(n, image_size, image_size, dtype=torch.uint8)
    for slot in range(max_shapes):
        present = rand(n) < (1.0 if slot == 0 else 0.6)
        labels = torch.randint(1, num_classes, (n,), generator=generator)
        colour = contrasting_colours(n, background, generator)
        radius = (rand(n) * 0.13 + 0.12) * image_size
        centre = radius[:, None] + rand(n, 2) * (image_size - 2 * radius[:, None])
        dx = coords.view(1, 1, -1) * image_size - centre[:, 0].view(-1, 1, 1)
        dy = coords.view(1, -1, 1) * image_size - centre[:, 1].view(-1, 1, 1)
        for k in range(1, num_classes):
            idx = (present & (labels == k)).nonzero().squeeze(1)
            inside = shape_mask(SHAPES[k - 1], dx[idx], dy[idx], radius[idx].view(-1, 1, 1))
            images[idx] = torch.where(inside[:, None], colour[idx], images[idx])
            masks[idx] = torch.where(inside, k, masks[idx]).to(torch.uint8)
    images += torch.randn(images.shape, generator=generator) * 0.08
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), masks
