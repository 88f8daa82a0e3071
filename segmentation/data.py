"""Segmentation data: joint image + mask transforms (torchvision v2), loaders, and the synthetic scenes."""
import math
from functools import partial

import torch
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from common.data import (ReportedBatches, SeededSamples, ShardedEvalSampler, SkipBadSamples, TensorLoader,
                         collate_reported, ignore_stop_signals, training_sampler)
from common.device_loader import DeviceLoader, SyntheticBatches
from common.distributed import from_rank0
from common.data import MEAN, STD, NormalizeBytes
from common.synthetic import SHAPES, contrasting_colours, noisy_backgrounds, shape_mask
from segmentation.datasets import DATASETS, IGNORE_INDEX

COLOUR_JITTER = 0.25  # brightness, contrast and saturation factors in 1 +- this, of training crops
SYNTHETIC_PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                     (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def train_transforms(base_size, crop_size, scale_range):
    """Rescale the shorter side to 0.5-2x the base size, crop (padding images with 0, masks with the ignore
    index), flip, jitter colours, normalise. v2 resizes tv_tensors.Mask with nearest interpolation, always."""
    return v2.Compose([
        v2.RandomResize(int(scale_range[0] * base_size), int(scale_range[1] * base_size) + 1),
        v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=COLOUR_JITTER, contrast=COLOUR_JITTER, saturation=COLOUR_JITTER),
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
        v2.Normalize(MEAN, STD),
    ])


def val_transform(image, mask, base_size):
    """Only the image is resized: the mask keeps the resolution it was annotated at, where it is scored."""
    image = F.resize(image, base_size, antialias=True)
    image = F.normalize(F.to_dtype(image, torch.float32, scale=True), MEAN, STD)
    return image, mask.to(torch.int64)


def load_dataset(args, split, decode_only=False):
    """The dataset of a split with its transforms; decode_only leaves them to the device (--data-backend gpu)."""
    transforms = (None if decode_only else train_transforms(args.base_size, args.crop_size, args.scale_range)
                  if split == "train" else partial(val_transform, base_size=args.base_size))
    shorter_side = int(args.scale_range[1] * args.base_size) if split == "train" else args.base_size
    if split == "train" and args.voc_aug:  # validation stays on VOC's val (eval.py has no such flag)
        split = "train_aug"
    # Listed by rank 0 alone and sent to the others. Not cached: the largest of these layouts (ADE20K's 20,210
    # training pairs in two flat folders) lists in well under a second, where ImageNet's tree takes minutes.
    dataset = from_rank0(lambda: DATASETS[args.dataset](args.data_path, split))
    dataset.transforms = transforms
    dataset.resize_shorter_side = shorter_side
    return dataset


def dataset_info(args):
    """(class names, palette) of the chosen data."""
    if args.data_path is None:
        names = ["background", *SHAPES[:args.synthetic_classes - 1]]
        return names, SYNTHETIC_PALETTE[:len(names)]

    def of_val():
        dataset = DATASETS[args.dataset](args.data_path, "val")
        return dataset.class_names, dataset.palette
    return from_rank0(of_val)


def collate_lists(batch):
    return tuple(list(items) for items in zip(*batch))


def resized_shape(height, width, shorter):
    """(height, width) after v2.functional.resize(image, [shorter]): the shorter side becomes `shorter`."""
    if height <= width:
        return shorter, int(shorter * width / height)
    return int(shorter * height / width), shorter


def draw_augmentation(height, width, base_size, crop_size, scale_range, generator):
    """One sample's random choices for train_transforms' steps, drawn from `generator` with the distributions
    v2 draws them with: RandomResize's shorter side, RandomCrop's offsets (after pad_if_needed, which pads the
    missing rows and columns on both sides), the flip, and ColorJitter's order and factors."""
    def randint(low, high):
        return int(torch.randint(low, high, (), generator=generator))

    shorter = randint(int(scale_range[0] * base_size), int(scale_range[1] * base_size) + 1)
    height, width = resized_shape(height, width, shorter)
    (crop_h, crop_w) = crop_size
    pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
    return {"shorter": shorter, "padding": [pad_w, pad_h, pad_w, pad_h],
            "top": randint(0, height + 2 * pad_h - crop_h + 1), "left": randint(0, width + 2 * pad_w - crop_w + 1),
            "flip": bool(torch.rand((), generator=generator) < 0.5),
            "jitter_order": torch.randperm(3, generator=generator).tolist(),
            "jitter": torch.empty(3).uniform_(1 - COLOUR_JITTER, 1 + COLOUR_JITTER, generator=generator).tolist()}


def augment(image, mask, params, crop_size):
    """Apply draw_augmentation's choices with v2.functional: masks are resized nearest and padded with 255."""
    image, mask = tv_tensors.Image(image), tv_tensors.Mask(mask)
    image = F.resize(image, [params["shorter"]], antialias=True)
    mask = F.resize(mask, [params["shorter"]])
    if any(params["padding"]):
        image = F.pad(image, params["padding"], fill=0)
        mask = F.pad(mask, params["padding"], fill=IGNORE_INDEX)
    image = F.crop(image, params["top"], params["left"], *crop_size)
    mask = F.crop(mask, params["top"], params["left"], *crop_size)
    if params["flip"]:
        image, mask = F.horizontal_flip(image), F.horizontal_flip(mask)
    adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
    for i in params["jitter_order"]:
        image = adjust[i](image, params["jitter"][i])
    return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


class DeviceTransform:
    """--data-backend gpu: train_transforms applied on the device to the images and masks that the workers only
    decoded. Every random choice comes from the batch's generator, none from torch's global stream, so the
    DeviceLoader can prepare a batch ahead on its side thread and a resumed run prepares the same batches."""

    def __init__(self, args, device):
        self.base_size, self.crop_size, self.scale_range = args.base_size, args.crop_size, args.scale_range
        self.device, self.normalize = device, NormalizeBytes(device)

    def __call__(self, batch, generator):
        decoded_images, decoded_masks, *reports = batch  # and the bad-sample reports of SkipBadSamples, if any
        images, masks = [], []
        for image, mask in zip(decoded_images, decoded_masks):
            params = draw_augmentation(*image.shape[-2:], self.base_size, self.crop_size, self.scale_range, generator)
            image, mask = augment(image.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True),
                                  params, self.crop_size)
            images.append(image)
            masks.append(mask)
        return (self.normalize(torch.stack(images)), torch.stack(masks).to(torch.int64), *reports)


def load_train(args, env, device, bad_samples=None):
    """The training loader. With `bad_samples` (common.data.BadSamples of --max-bad-samples), samples whose files
    fail to load are replaced and reported there."""
    if args.data_path is None:
        return synthetic_loader(*synthetic_split(args, "train", device), args, env, train=True)
    if args.data_backend == "synthetic":
        sampler = training_sampler(load_dataset(args, "train"), env, args)
        num_classes = len(dataset_info(args)[0])

        def make_batch():
            return (torch.randn(args.batch_size, 3, *args.crop_size, device=device),
                    torch.randint(num_classes, (args.batch_size, *args.crop_size), device=device))
        return SyntheticBatches(make_batch, len(sampler) // args.batch_size, sampler, args.batch_size)
    skipping = bad_samples is not None and bad_samples.limit > 0
    if args.data_backend == "gpu":
        decoded = load_dataset(args, "train", decode_only=True)  # the workers only decode
        decoded = SkipBadSamples(decoded, args.seed, bad_samples.limit) if skipping else decoded
        loader = DataLoader(decoded, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate_lists,
                            sampler=training_sampler(decoded, env, args), drop_last=True,
                            worker_init_fn=ignore_stop_signals)
        loader = DeviceLoader(loader, DeviceTransform(args, device), device, args.seed)
        return ReportedBatches(loader, bad_samples) if skipping else loader
    dataset = load_dataset(args, "train")
    train_set = SeededSamples(SkipBadSamples(dataset, args.seed, bad_samples.limit) if skipping else dataset,
                              args.seed)
    # Not persistent: fresh workers each epoch take their seeds from the per-epoch RNG (exact resume).
    loader = DataLoader(train_set, batch_size=args.batch_size, num_workers=args.workers,
                        pin_memory=device.type == "cuda", drop_last=True, worker_init_fn=ignore_stop_signals,
                        sampler=training_sampler(train_set, env, args),
                        collate_fn=collate_reported if skipping else None)
    return ReportedBatches(loader, bad_samples) if skipping else loader


def load_val(args, env, device):
    """One image per batch for real data (their sizes differ); every image on exactly one rank."""
    if args.data_path is None:
        return synthetic_loader(*synthetic_split(args, "val", device), args, env, train=False)
    val_set = load_dataset(args, "val")
    return DataLoader(val_set, batch_size=1, num_workers=args.workers, pin_memory=device.type == "cuda",
                      sampler=ShardedEvalSampler(val_set, env.rank, env.world_size), worker_init_fn=ignore_stop_signals)


def synthetic_split(args, split, device):
    size = args.synthetic_train_size if split == "train" else args.synthetic_val_size
    images, masks = make_scenes(size, args.synthetic_image_size, args.synthetic_classes, seed=0, split=split)
    return images.to(device), masks.to(device)


def synthetic_loader(images, masks, args, env, train):
    normalize = NormalizeBytes(images.device)

    def transform(images, masks):
        if train:  # per-sample flips of image and mask together
            flip = torch.rand(len(images), device=images.device) < 0.5
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
            masks = torch.where(flip.view(-1, 1, 1), masks.flip(-1), masks)
        return normalize(images), masks.long()

    sampler = training_sampler(masks, env, args) if train else ShardedEvalSampler(masks, env.rank, env.world_size)
    return TensorLoader(images, masks, sampler, args.batch_size, transform, drop_last=train)


def make_scenes(num_samples, image_size=64, num_classes=6, seed=0, split="train", max_shapes=3):
    """(uint8 images [N, 3, S, S], uint8 masks [N, S, S]): one to `max_shapes` shapes on striped, noisy
    backgrounds; mask 0 is background and k the k-th shape. Deterministic in (seed, split)."""
    if not 2 <= num_classes <= len(SHAPES) + 1:
        raise ValueError(f"synthetic scenes have 2 to {len(SHAPES) + 1} classes, not {num_classes}")
    generator = torch.Generator().manual_seed(seed * 2 + (split != "train"))
    n, rand = num_samples, partial(torch.rand, generator=generator)
    images, background = noisy_backgrounds(n, image_size, generator)
    # Stripes of random direction and frequency: texture that a colour threshold cannot separate from shapes.
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
