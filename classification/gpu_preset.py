"""--data-backend gpu for classification: DataLoader workers read file bytes only; the device decodes a whole
batch (nvJPEG) and applies the presets of classification/data.py to it: random-resized crop + flip for
training, resize + centre crop for evaluation, then normalisation.

Crop boxes are drawn exactly as v2.RandomResizedCrop draws them (same scale and ratio ranges, ten tries,
the same fallback), for all images at once; a few roi_align calls over canvases of bounded size then crop
and resize the whole batch.
"""
import io
import math
from typing import NamedTuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align
from torchvision.transforms.v2.functional import pil_to_tensor

from common.data import (MEAN, REPLACE_IMAGE, STD, check_resized_size, ignore_stop_signals, open_regular, read_image,
                         reason, shown)
from common.device_loader import DeviceLoader
from common.log import SampleError


def read_file_bytes(path):
    """Never more than the file's size: a symlink to /dev/zero would otherwise read until memory runs out."""
    f, size = open_regular(path)
    with f:
        try:
            data = f.read(size)
        except OSError as e:
            raise SampleError(f"cannot read image {shown(path)} ({reason(e)}): {REPLACE_IMAGE}") from None
    if not data:
        raise SampleError(f"cannot read image {shown(path)} (the file is empty): {REPLACE_IMAGE}")
    return data


def check_encoded_size(path, data, shorter_side):
    """check_resized_size from the header of encoded bytes; bytes Pillow cannot open are left to the decoder."""
    if shorter_side is None:
        return
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
    except Exception:
        return
    check_resized_size(path, size, shorter_side)


class EncodedSamples(Dataset):
    """(file bytes, target, index) of each sample of a dataset with a `samples` sequence of (path, target).
    `resize_shorter_side`: what the preset resizes the shorter side to, checked from the file's header."""

    def __init__(self, samples, resize_shorter_side=None):
        self.samples, self.resize_shorter_side = samples, resize_shorter_side

    def __len__(self):
        return len(self.samples)

    def path(self, index):
        return self.samples[index % len(self.samples)][0]

    def __getitem__(self, index):
        index %= len(self.samples)  # repeated augmentation's copies: index + copy * len
        path, target = self.samples[index]
        # Regular files only, read up to their size: a FIFO would block and /dev/zero never end.
        data = read_file_bytes(path)
        check_encoded_size(path, data, self.resize_shorter_side)  # as the pil backend refuses it, before decoding
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), target, index


def collate_encoded(batch):
    """Lists of bytes, tensors of targets and indices, and SkipBadSamples' reports when the samples carry them."""
    encoded, targets, indices, *reports = zip(*batch)
    return (list(encoded), torch.as_tensor(targets), torch.as_tensor(indices), *map(list, reports))


def is_jpeg(encoded):
    return len(encoded) > 2 and encoded[0] == 0xFF and encoded[1] == 0xD8


def nvjpeg(encoded, device):
    return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


def decode_batch(encoded, paths, device, gpu_decode=None):
    """uint8 RGB tensors [3, H, W] on `device`. On CUDA the JPEGs go through nvJPEG in one batched call; PNGs,
    CMYK or 16-bit files and anything nvJPEG refuses go through Pillow on the CPU (common.data.read_image,
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


class Piece(NamedTuple):
    """Output rows first..last-1 of image `index`'s crop: the box `roi` (x1, y1, x2, y2, in the piece's own
    pixels) over the image's pixels [top:bottom, left:right]."""
    index: int
    top: int
    bottom: int
    left: int
    right: int
    first: int
    last: int
    roi: tuple


def sampled_span(start, end, size, first, last, limit):
    """The input rows (or columns) that output rows first..last-1 of a box from start to end read, within
    0..limit. roi_align (aligned) samples inside [start - 0.5, end - 0.5) and interpolates each sample from
    the two pixels around it; one more on each side absorbs its float rounding."""
    step = (end - start) / size
    low, high = start - 0.5 + first * step, start - 0.5 + last * step
    return max(math.floor(low) - 1, 0), min(math.floor(high) + 3, limit)


def box_pieces(index, height, width, box, size, budget):
    """One piece for the whole crop, or bands of output rows when the pixels the box reads exceed `budget`
    (a 4,000x3,000 box alone can outweigh a whole batch of 500x375 images).

    A band's box spans its rows' share of the crop's box, so roi_align gives its bins the same size and the
    same number of samples; for the presets' boxes (whole pixels, or eighths) every coordinate stays exact."""
    x1, y1, x2, y2 = box
    left, right = sampled_span(x1, x2, size, 0, size, width)
    top, bottom = sampled_span(y1, y2, size, 0, size, height)
    rows = math.ceil(size / min(size, math.ceil((bottom - top) * (right - left) / budget)))
    pieces = []
    for first in range(0, size, rows):
        last = min(first + rows, size)
        band_top, band_bottom = sampled_span(y1, y2, size, first, last, height)
        band_y1, band_y2 = (y1 + (y2 - y1) * row / size - band_top for row in (first, last))
        pieces.append(Piece(index, band_top, band_bottom, left, right, first, last,
                            (x1 - left, band_y1, x2 - left, band_y2)))
    return pieces


def canvas_groups(pieces, budget):
    """The pieces in runs that each fill one canvas of at most `budget` pixels (or hold a single piece) and
    make the same number of output rows (one roi_align call each); tallest first, so that the pieces sharing
    a canvas are of about the same height."""
    groups, group, height, width = [], [], 0, 0
    for piece in sorted(pieces, key=lambda p: (p.last - p.first, p.bottom - p.top, p.right - p.left),
                        reverse=True):
        h, w = piece.bottom - piece.top, piece.right - piece.left
        if group and ((len(group) + 1) * max(height, h) * max(width, w) > budget
                      or piece.last - piece.first != group[0].last - group[0].first):
            groups.append(group)
            group, height, width = [], 0, 0
        group.append(piece)
        height, width = max(height, h), max(width, w)
    return groups + [group] if group else groups


def fill_canvas(images, group, dtype):
    """The group's pixels in one zero-padded canvas [len(group), C, H, W].

    Where a piece ends at its image's border and the canvas goes on, roi_align would blend the canvas's zeros
    into the edge pixels; a copy of the edge row and column makes it read what it reads at an image's own
    border, so that a crop does not depend on the other images of its batch."""
    height, width = max(p.bottom - p.top for p in group), max(p.right - p.left for p in group)
    canvas = torch.zeros(len(group), images[0].shape[0], height, width, dtype=dtype, device=images[0].device)
    for slot, p in zip(canvas, group):
        image = images[p.index]
        region = image[:, p.top:p.bottom, p.left:p.right]
        h, w = region.shape[1:]
        slot[:, :h, :w] = region
        down, right = h < height and p.bottom == image.shape[1], w < width and p.right == image.shape[2]
        if down:
            slot[:, h, :w] = region[:, -1]
        if right:
            slot[:, :h, w] = region[:, :, -1]
        if down and right:
            slot[:, h, w] = region[:, -1, -1]
    return canvas


def crop_resize(images, boxes, size):
    """Every image's box resized to size x size with roi_align; float [N, 3, S, S].

    roi_align averages ceil(box / size) samples per output pixel in each direction, which keeps
    downscaling from aliasing, as the antialiased resize of the CPU preset does. Only the pixels a box reads
    are copied, into canvases of at most half the batch's decoded bytes each, made one after the other: one
    canvas padded to the largest image would cost batch x largest image (about 37 GB in float32 for one
    4,000x3,000 JPEG among 256 images)."""
    device = images[0].device
    # float32 on every device: roi_align's CUDA kernel sums a bin's samples in the canvas's dtype, and in float16 a
    # large box of bright pixels passes 65,504 and gives an Inf crop, which turns batch norm's statistics NaN.
    dtype = torch.float32
    channels = images[0].shape[0]
    # Bytes per canvas pixel; torchvision's CPU roi_align also precomputes the interpolation of every sample
    # of a box (32 bytes each, about one sample per pixel the box covers) where CUDA computes it in place.
    per_pixel = channels * torch.finfo(dtype).bits // 8 + (32 if device.type == "cpu" else 0)
    budget = max(1, sum(image.numel() for image in images) // (2 * per_pixel))  # canvas pixels
    pieces = [piece for i, (image, box) in enumerate(zip(images, boxes.tolist()))
              for piece in box_pieces(i, image.shape[1], image.shape[2], box, size, budget)]
    crops = torch.empty(len(images), channels, size, size, device=device)
    for group in canvas_groups(pieces, budget):
        rois = torch.tensor([[slot, *p.roi] for slot, p in enumerate(group)]).to(device, dtype)
        resized = roi_align(fill_canvas(images, group, dtype), rois, output_size=(group[0].last - group[0].first, size),
                            spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        for slot, p in enumerate(group):
            crops[p.index, :, p.first:p.last] = resized[slot]
    return crops


class GpuPreset:
    """prepare(batch, generator) for common.device_loader.DeviceLoader: decode, crop, flip, normalise. `paths[i]`
    names sample i in errors. With `stand_ins` (common.bad_samples.SkipBadSamples over the EncodedSamples of the
    batches, --max-bad-samples), a file that does not decode is replaced as a worker replaces one it cannot read,
    and the batch's reports gain it."""

    def __init__(self, paths, device, train, crop_size, resize_size, mean, std, scale=(0.08, 1.0),
                 ratio=(3 / 4, 4 / 3), stand_ins=None):
        self.paths, self.device, self.train, self.stand_ins = paths, device, train, stand_ins
        self.crop_size, self.resize_size, self.scale, self.ratio = crop_size, resize_size, scale, ratio
        # Made once: a tensor built from a Python list is a host-to-device copy, which waits for the GPU.
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def decode_or_stand_in(self, encoded, targets, indices, unread):
        """decode_batch; where a file does not decode, the stand-in SkipBadSamples' rule picks, and its report.
        `unread`: each sample's reports of the files that its worker could not read before it."""
        try:
            return decode_batch(encoded, [self.paths[i] for i in indices.tolist()], self.device), targets, ()
        except SampleError:
            pass  # once more, one image at a time, to find which
        images, targets, reports = [], targets.clone(), []
        for slot, (data, index) in enumerate(zip(encoded, indices.tolist())):
            chain = unread[slot]  # the slot's samples that failed, each the stand-in of the one before
            while True:
                try:
                    images.append(decode_batch([data], [self.paths[index]], self.device)[0])
                    break
                except SampleError as e:
                    data, targets[slot], index, chain = self.stand_ins.stand_in(
                        [*chain, (index, shown(self.paths[index]), str(e))])
            reports += chain[len(unread[slot]):]
        return images, targets, tuple(reports)

    def __call__(self, batch, generator):
        encoded, targets, indices, *reports = batch
        if self.stand_ins is None:
            images = decode_batch(encoded, [self.paths[i] for i in indices.tolist()], self.device)
        else:
            images, targets, undecoded = self.decode_or_stand_in(encoded, targets, indices, reports[0])
            reports = [reports[0] + [undecoded]]
        heights = torch.tensor([image.shape[1] for image in images])
        widths = torch.tensor([image.shape[2] for image in images])
        if self.train:
            boxes = random_resized_crop_boxes(heights, widths, generator, self.scale, self.ratio)
        else:
            boxes = center_crop_boxes(heights, widths, self.resize_size, self.crop_size)
        crops = crop_resize(images, boxes, self.crop_size)
        if self.train:
            flip = (torch.rand(len(crops), generator=generator) < 0.5).to(self.device).view(-1, 1, 1, 1)
            crops = torch.where(flip, crops.flip(-1), crops)
        return ((crops - self.mean) / self.std, targets.to(self.device, non_blocking=True), *reports)


class FilePaths:
    """paths[i], the file of sample i of a dataset that has path(i), made when asked for: no list of a million str."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, index):
        return self.dataset.path(index)


def device_loader(folder, sampler, batch_size, workers, crop, device, seed=0, mixer=None, bad_samples=None):
    """--data-backend gpu: DataLoader workers read the file bytes of `folder`'s images, the device decodes and
    augments whole batches (classification.data.Crop says how) one batch ahead. With `bad_samples`
    (--max-bad-samples), a file that cannot be read (in a worker) or decoded (on the device) is replaced by a
    stand-in."""
    encoded = EncodedSamples(folder.samples, None if crop.train else crop.resize)
    dataset = bad_samples.stand_ins(encoded, seed) if bad_samples is not None else encoded
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, sampler=sampler,
                        collate_fn=collate_encoded, drop_last=crop.train, worker_init_fn=ignore_stop_signals)
    preset = GpuPreset(FilePaths(folder), device, crop.train, crop.size, crop.resize, MEAN, STD, crop.scale,
                       crop.ratio, stand_ins=dataset if dataset is not encoded else None)
    loader = DeviceLoader(loader, preset, device, seed, after=mixer)
    return bad_samples.reported(loader) if bad_samples is not None else loader
