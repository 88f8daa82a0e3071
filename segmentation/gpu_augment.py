"""--data-backend gpu for segmentation: DataLoader workers only decode images and masks; the device applies
segmentation.data's training transforms to whole batches, one batch ahead on a side stream (common/device_loader.py).
Imported only with that flag."""
import torch
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from common.data import NormalizeBytes, ignore_stop_signals
from common.device_loader import DeviceLoader
from segmentation.data import COLOUR_JITTER
from segmentation.data import IGNORE_INDEX


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

    def __init__(self, augmentation, device):
        self.base_size, self.crop_size, self.scale_range = augmentation
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


def device_loader(dataset, sampler, batch_size, workers, augmentation, device, seed, bad_samples):
    """The training loader of --data-backend gpu: `dataset` decodes, the device augments as `augmentation`
    (base_size, crop_size, scale_range) says; bad_samples as for the pil loader."""
    decoded = bad_samples.stand_ins(dataset, seed) if bad_samples is not None else dataset
    loader = DataLoader(decoded, batch_size=batch_size, num_workers=workers, collate_fn=collate_lists,
                        sampler=sampler, drop_last=True, worker_init_fn=ignore_stop_signals)
    loader = DeviceLoader(loader, DeviceTransform(augmentation, device), device, seed)
    return bad_samples.reported(loader) if bad_samples is not None else loader
