"""--data-backend gpu for classification: DataLoader workers read file bytes only; the device decodes a whole
batch (nvJPEG) and applies the presets of classification/data.py to it: random-resized crop + flip for
training, resize + centre crop for evaluation, then normalisation.

Crop boxes are drawn exactly as v2.RandomResizedCrop draws them (same scale and ratio ranges, ten tries,
the same fallback), for all images at once; one roi_align then crops and resizes the whole batch.
"""
import io
import math

import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align
from torchvision.transforms.v2.functional import pil_to_tensor

from common.images import read_image


class EncodedSamples(Dataset):
    """(file bytes, target, index) of each sample of a dataset with a `samples` list of (path, target)."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        with open(path, "rb") as f:
            return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8), target, index


def collate_encoded(batch):
    encoded, targets, indices = zip(*batch)
    return list(encoded), torch.as_tensor(targets), torch.as_tensor(indices)


def is_jpeg(encoded):
    return len(encoded) > 2 and encoded[0] == 0xFF and encoded[1] == 0xD8


def nvjpeg(encoded, device):
    return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


def decode_batch(encoded, paths, device, gpu_decode=None):
    """uint8 RGB tensors [3, H, W] on `device`. On CUDA the JPEGs go through nvJPEG in one batched call; PNGs,
    CMYK or 16-bit files and anything nvJPEG refuses go through Pillow on the CPU (common.images.read_image,
    which also names a broken file)."""
    images = [None] * len(encoded)
    gpu_decode = gpu_decode or (nvjpeg if device.type == "cuda" else None)
    jpegs = [i for i, data in enumerate(encoded) if is_jpeg(data)] if gpu_decode else []
    if jpegs:
        try:
            decoded = gpu_decode([encoded[i] for i in jpegs], device)
        except RuntimeError:  # one file nvJPEG cannot take fails the batch: decode them one by one
            decoded = []
            for i in jpegs:
                try:
                    decoded.append(gpu_decode(encoded[i], device))
                except RuntimeError:
                    decoded.append(None)
        for i, image in zip(jpegs, decoded):
            images[i] = image
    for i, image in enumerate(images):
        if image is None:
            image = read_image(io.BytesIO(encoded[i].numpy().tobytes()), name=paths[i])
            images[i] = pil_to_tensor(image).to(device, non_blocking=True)
    return images


def random_resized_crop_boxes(heights, widths, generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), tries=10):
    """(x1, y1, x2, y2) float boxes [N, 4], one per image of the given sizes (int64 tensors [N])."""
    n = len(heights)
    area = (heights * widths).double()[:, None]
    target_area = area * torch.empty(n, tries, dtype=torch.float64).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n, tries, dtype=torch.float64).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                                     generator=generator)
    aspect = log_ratio.exp()
    crop_w = (target_area * aspect).sqrt().round().long()
    crop_h = (target_area / aspect).sqrt().round().long()
    fits = (crop_w > 0) & (crop_h > 0) & (crop_w <= widths[:, None]) & (crop_h <= heights[:, None])
    first = fits.long().argmax(1)  # the first try that fits, as the sequential loop would take it
    rows = torch.arange(n)
    crop_w, crop_h, found = crop_w[rows, first], crop_h[rows, first], fits.any(1)
    # No try fits: the whole image, its aspect ratio clamped to the range, centred.
    in_ratio = widths.double() / heights.double()
    fallback_w = torch.where(in_ratio > ratio[1], (heights * ratio[1]).round().long(), widths)
    fallback_h = torch.where(in_ratio < ratio[0], (widths / ratio[0]).round().long(), heights)
    crop_w, crop_h = torch.where(found, crop_w, fallback_w), torch.where(found, crop_h, fallback_h)
    u = torch.rand(n, 2, dtype=torch.float64, generator=generator)
    top = torch.where(found, (u[:, 0] * (heights - crop_h + 1)).floor().long(), (heights - crop_h) // 2)
    left = torch.where(found, (u[:, 1] * (widths - crop_w + 1)).floor().long(), (widths - crop_w) // 2)
    return torch.stack([left, top, left + crop_w, top + crop_h], 1).float()


def center_crop_boxes(heights, widths, resize_size, crop_size):
    """The region of each image that Resize(resize_size) + CenterCrop(crop_size) keeps, in its own pixels."""
    side = crop_size * torch.minimum(heights, widths).double() / resize_size
    top, left = (heights - side) / 2, (widths - side) / 2
    return torch.stack([left, top, left + side, top + side], 1).float()


def crop_resize(images, boxes, size):
    """Every image's box resized to size x size in one roi_align over a zero-padded canvas; float [N, 3, S, S].

    roi_align averages ceil(box / size) samples per output pixel in each direction, which keeps
    downscaling from aliasing, as the antialiased resize of the CPU preset does."""
    device = images[0].device
    height, width = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    # float16 holds every uint8 value exactly and halves the canvas; the CPU has no float16 roi_align.
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    canvas = torch.zeros(len(images), 3, height, width, dtype=dtype, device=device)
    for slot, image in zip(canvas, images):
        slot[:, :image.shape[1], :image.shape[2]] = image
    rois = torch.cat([torch.arange(len(images), dtype=torch.float32)[:, None], boxes], 1).to(device, dtype)
    return roi_align(canvas, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True).float()


class GpuPreset:
    """prepare(batch, generator) for common.device_loader.DeviceLoader: decode, crop, flip, normalise."""

    def __init__(self, paths, device, train, crop_size, resize_size, mean, std):
        self.paths, self.device, self.train = paths, device, train
        self.crop_size, self.resize_size = crop_size, resize_size
        # Made once: a tensor built from a Python list is a host-to-device copy, which waits for the GPU.
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def __call__(self, batch, generator):
        encoded, targets, indices = batch
        images = decode_batch(encoded, [self.paths[i] for i in indices.tolist()], self.device)
        heights = torch.tensor([image.shape[1] for image in images])
        widths = torch.tensor([image.shape[2] for image in images])
        if self.train:
            boxes = random_resized_crop_boxes(heights, widths, generator)
        else:
            boxes = center_crop_boxes(heights, widths, self.resize_size, self.crop_size)
        crops = crop_resize(images, boxes, self.crop_size)
        if self.train:
            flip = (torch.rand(len(crops), generator=generator) < 0.5).to(self.device).view(-1, 1, 1, 1)
            crops = torch.where(flip, crops.flip(-1), crops)
        return (crops - self.mean) / self.std, targets.to(self.device, non_blocking=True)
