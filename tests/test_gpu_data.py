"""The gpu and synthetic data backends, run on CPU tensors: same distributions as the PIL presets, decoder
fallbacks, determinism, and the scripts end to end."""
import io
import json
import math
import sys

import pytest
import torch
from PIL import Image
from torchvision.io import decode_jpeg
from torchvision.transforms import v2

from classification.data import MEAN, STD, Crop, val_preset
from torchvision.ops import roi_align

from classification.gpu_preset import (EncodedSamples, GpuPreset, center_crop_boxes, collate_encoded, crop_resize,
                                       decode_batch, random_resized_crop_boxes)
from common.data import BatchLayout, TrainingSampler
from common.device_loader import DeviceLoader
from common.log import UserError
from conftest import evaluate, run, train, train_segmentation, write_image, write_tree


@pytest.mark.parametrize("scale,ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.5, 0.9), (0.9, 1.5))],
                         ids=["torchvision-default", "--train-crop-scale 0.5 0.9 --train-crop-ratio 0.9 1.5"])
def test_crop_boxes_follow_random_resized_crop(scale, ratio):
    n, height, width = 20_000, 300, 500
    boxes = random_resized_crop_boxes(torch.full((n,), height), torch.full((n,), width),
                                      torch.Generator().manual_seed(0), scale, ratio)
    crop_w, crop_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    torch.manual_seed(0)
    reference = torch.tensor([v2.RandomResizedCrop.get_params(torch.zeros(1, height, width), list(scale),
                                                              list(ratio)) for _ in range(n)], dtype=torch.float)
    ref_top, ref_left, ref_h, ref_w = reference.unbind(1)
    # Means agree to well within their sampling error (about 0.002 for the area fraction at n = 20,000).
    assert (crop_w * crop_h).mean() / (height * width) == pytest.approx(((ref_w * ref_h).mean() / (height * width)).item(), abs=0.01)
    assert (crop_w / crop_h).log().mean() == pytest.approx((ref_w / ref_h).log().mean().item(), abs=0.01)
    assert boxes[:, 1].mean() == pytest.approx(ref_top.mean().item(), abs=2)
    assert boxes[:, 0].mean() == pytest.approx(ref_left.mean().item(), abs=4)
    assert (crop_w / crop_h).min() >= ratio[0] - 0.02 and (crop_w / crop_h).max() <= ratio[1] + 0.02
    area = crop_w * crop_h / (height * width)
    assert scale[0] - 0.01 <= area.min() and area.max() <= scale[1] + 0.01


def test_crop_box_fallback_matches_torchvision_on_extreme_images():
    # A 10 x 1000 strip: no try fits in ratio 3/4..4/3, so both take the centred crop of ratio 4/3.
    box = random_resized_crop_boxes(torch.tensor([10]), torch.tensor([1000]), torch.Generator().manual_seed(0))
    top, left, height, width = v2.RandomResizedCrop.get_params(torch.zeros(1, 10, 1000), [0.08, 1.0], [3 / 4, 4 / 3])
    assert box[0].tolist() == [left, top, left + width, top + height]


def unbounded_crop_resize(images, boxes, size):
    """crop_resize before its memory was bounded: one zero-padded canvas the size of the batch's largest image."""
    height, width = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    canvas = torch.zeros(len(images), 3, height, width)
    for slot, image in zip(canvas, images):
        slot[:, :image.shape[1], :image.shape[2]] = image
    rois = torch.cat([torch.arange(len(images), dtype=torch.float32)[:, None], boxes], 1)
    return roi_align(canvas, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def crop_boxes(sizes, kind, generator):
    heights, widths = torch.tensor([h for h, _ in sizes]), torch.tensor([w for _, w in sizes])
    if kind == "train":
        return random_resized_crop_boxes(heights, widths, generator)
    if kind == "eval":
        return center_crop_boxes(heights, widths, 73, 64)
    return torch.stack([torch.zeros(len(sizes)), torch.zeros(len(sizes)), widths.float(), heights.float()], 1)


@pytest.mark.parametrize("kind", ["train", "eval", "whole"])
def test_bounded_crops_equal_the_unbounded_canvas(kind):
    # From thumbnails, which share a canvas, to a photo big enough to be made in bands of output rows.
    sizes = [(375, 500), (500, 375), (333, 500), (30, 40), (48, 36), (40, 52), (1200, 1600), (2000, 2600)]
    generator = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in sizes]
    boxes = crop_boxes(sizes, kind, generator)
    crops = crop_resize(images, boxes, 64)
    # Each image alone on the unbounded canvas: what the batched version gives the batch's largest image.
    alone = torch.cat([unbounded_crop_resize([image], box[None], 64) for image, box in zip(images, boxes)])
    assert crops.shape == (8, 3, 64, 64)
    assert (crops - alone).abs().max() < 0.02  # grey levels: float32 rounding of the shifted box coordinates
    # The batched version also reads its canvas's zero padding where a box reaches a smaller image's bottom or
    # right edge, which darkens those crops' edges; everywhere else the two agree.
    heights, widths = torch.tensor([h for h, _ in sizes]), torch.tensor([w for _, w in sizes])
    inside = (boxes[:, 2] <= widths - 1) & (boxes[:, 3] <= heights - 1)
    assert inside.sum() >= {"train": 2, "eval": 8, "whole": 0}[kind]
    assert ((crops - unbounded_crop_resize(images, boxes, 64))[inside].abs() < 0.02).all()


MEASURE_CROP_MEMORY = """
import json, sys
import torch
from classification.gpu_preset import crop_resize, random_resized_crop_boxes
sys.path.insert(0, "tests")
from test_gpu_data import unbounded_crop_resize

def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":")) * 1024

generator = torch.Generator().manual_seed(0)
images = [torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8, generator=generator) for _ in range(63)]
images.append(torch.randint(0, 256, (3, 3000, 4000), dtype=torch.uint8, generator=generator))
boxes = random_resized_crop_boxes(torch.full((64,), 375), torch.full((64,), 500), generator)
boxes[63] = torch.tensor([0.0, 0.0, 4000.0, 3000.0])  # the most pixels the big image can be read with
crop_resize(images[:2], boxes[:2], 224)  # the first call's one-time allocations are not the batch's
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM, the peak resident memory, to the current one
crops = crop_resize(images, boxes, 224)
working = status("VmHWM") - before
alone = torch.cat([unbounded_crop_resize([image], box[None], 224) for image, box in zip(images, boxes)])
print(json.dumps({"working": working, "decoded": sum(image.numel() for image in images),
                  "max_difference": (crops - alone).abs().max().item()}))
"""


def test_crop_memory_of_a_batch_with_one_huge_image_stays_near_its_decoded_size():
    # Unbounded, this batch needed a float32 canvas of 64 x 3 x 3000 x 4000 (9.2 GB; past 2**31 elements, which
    # torchvision's CPU roi_align crashed on). A subprocess, so that its peak resident memory is the crops' own.
    done = run(sys.executable, "-c", MEASURE_CROP_MEMORY, timeout=3600)  # a hang guard, not a speed limit
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.splitlines()[-1])
    assert measured["working"] <= 2 * measured["decoded"], measured
    assert measured["max_difference"] < 0.02, measured


def smooth_image(path, size=(160, 120)):
    x = torch.linspace(0, 1, size[0]).view(1, -1)
    y = torch.linspace(0, 1, size[1]).view(-1, 1)
    pixels = torch.stack([x * y, x.expand(size[1], -1), y.expand(-1, size[0])], -1) * 255
    Image.fromarray(pixels.round().to(torch.uint8).numpy()).save(path, quality=95)
    return path


def test_evaluation_crop_on_the_device_matches_the_pil_preset(tmp_path):
    path = smooth_image(tmp_path / "smooth.jpg")
    preset = GpuPreset([str(path)], torch.device("cpu"), False, 64, 72, MEAN, STD)
    encoded = EncodedSamples([(str(path), 0)])
    images, _ = preset(collate_encoded([encoded[0]]), torch.Generator())
    expected = val_preset(Crop(False, 64, 72))(Image.open(path).convert("RGB"))
    assert images.shape == (1, 3, 64, 64)
    assert (images[0] - expected).abs().mean() < 0.03  # normalised units: about 2 grey levels in 255


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_crops_are_computed_in_float32_so_bright_boxes_do_not_overflow(monkeypatch, device):
    # roi_align's CUDA kernel sums a bin's samples in the input's dtype: in float16, 375 x 19 samples of 255 (a
    # 6,000 x 300 box resized to 16 x 16) pass 65,504 and the crop is Inf.
    import classification.gpu_preset as gpu_preset
    dtypes = []
    monkeypatch.setattr(gpu_preset, "roi_align", lambda canvas, *a, **k: (dtypes.append(canvas.dtype),
                                                                          roi_align(canvas, *a, **k))[1])
    image = torch.full((3, 300, 6000), 255, dtype=torch.uint8, device=device)
    crops = crop_resize([image], torch.tensor([[0.0, 0.0, 6000.0, 300.0]]), 16)
    assert dtypes and set(dtypes) == {torch.float32}
    assert torch.isfinite(crops).all() and torch.allclose(crops, torch.full_like(crops, 255.0))


def test_center_crop_boxes_are_centred_squares():
    box = center_crop_boxes(torch.tensor([300]), torch.tensor([500]), 256, 224)[0]
    side = 224 * 300 / 256
    assert box.tolist() == pytest.approx([(500 - side) / 2, (300 - side) / 2, (500 + side) / 2, (300 + side) / 2])


def test_training_preset_flips_half_and_normalises(tmp_path):
    path = smooth_image(tmp_path / "smooth.jpg")
    encoded = EncodedSamples([(str(path), 0)] * 64)
    preset = GpuPreset([str(path)] * 64, torch.device("cpu"), True, 32, 36, MEAN, STD)
    images, targets = preset(collate_encoded([encoded[i] for i in range(64)]), torch.Generator().manual_seed(0))
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32 and targets.tolist() == [0] * 64
    # The green channel grows left to right in the file: a flipped crop has it growing right to left.
    slope = images[:, 1, :, -1].mean(1) - images[:, 1, :, 0].mean(1)
    flipped = (slope < 0).float().mean()
    assert 0.3 < flipped < 0.7


def encode(mode, fmt):
    buffer = io.BytesIO()
    pixels = torch.randint(0, 255, (24, 32, 4 if mode in ("RGBA", "CMYK") else 3), dtype=torch.uint8)
    Image.fromarray(pixels.numpy(), "RGBA" if mode == "CMYK" else mode).convert(mode).save(buffer, format=fmt)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def test_files_the_gpu_decoder_refuses_fall_back_to_the_cpu():
    calls = []

    def fussy_decoder(encoded, device):  # stands in for nvJPEG: refuses CMYK, as nvJPEG does some files
        calls.append(len(encoded) if isinstance(encoded, list) else 1)
        for data in encoded if isinstance(encoded, list) else [encoded]:
            if Image.open(io.BytesIO(data.numpy().tobytes())).mode == "CMYK":
                raise RuntimeError("unsupported JPEG")
        return [decode_jpeg(d) for d in encoded] if isinstance(encoded, list) else decode_jpeg(encoded)

    files = [encode("RGB", "JPEG"), encode("CMYK", "JPEG"), encode("RGB", "PNG"), encode("RGB", "JPEG")]
    images = decode_batch(files, ["a.jpg", "b.jpg", "c.png", "d.jpg"], torch.device("cpu"), fussy_decoder)
    assert calls == [3, 1, 1, 1]  # the batch of three JPEGs, then each on its own; the PNG never reaches it
    assert all(image.shape == (3, 24, 32) and image.dtype == torch.uint8 for image in images)


def test_a_broken_file_is_named():
    with pytest.raises(UserError, match=r"cannot read image train/dog/broken.jpg"):
        decode_batch([torch.tensor([0xFF, 0xD8, 0, 1], dtype=torch.uint8)], ["train/dog/broken.jpg"],
                     torch.device("cpu"))


def test_device_loader_batches_are_a_function_of_seed_epoch_and_position(tmp_path):
    data = write_tree(tmp_path / "data", train_per_class=4)
    samples = sorted((str(p), 0) for p in (data / "train").rglob("*.jpg"))
    encoded = EncodedSamples(samples)
    sampler = TrainingSampler(encoded, BatchLayout(batch_size=3), seed=0)
    loader = torch.utils.data.DataLoader(encoded, batch_size=3, sampler=sampler, collate_fn=collate_encoded)
    device_loader = DeviceLoader(loader, GpuPreset([p for p, _ in samples], torch.device("cpu"), True, 16, 18,
                                                   MEAN, STD), torch.device("cpu"), seed=0)
    sampler.set_epoch(1)
    full = [images for images, _ in device_loader]
    sampler.set_epoch(1, start_step=2)  # resumed after two steps
    rest = [images for images, _ in device_loader]
    assert len(full) == 4 and len(rest) == 2
    assert all(torch.equal(a, b) for a, b in zip(full[2:], rest))
    sampler.set_epoch(2)
    assert not torch.equal(next(iter(device_loader))[0], full[0])


@pytest.mark.parametrize("backend", ["gpu", "synthetic"])
def test_classification_trains_with_each_backend(tmp_path, backend):
    data = write_tree(tmp_path / "data")
    write_image(data / "train" / "cat" / "cmyk.jpg", mode="CMYK", fmt="JPEG")
    write_image(data / "train" / "dog" / "deep.png", mode="I;16")
    train("--data-path", data, "--model", "resnet18", "--device", "cpu", "-b", "4", "-j", "2", "--epochs", "1",
          "--train-crop-size", "32", "--val-resize-size", "36", "--val-crop-size", "32", "--data-backend", backend,
          "--mixup-alpha", "0.2", "--output-dir", tmp_path / "out")
    evaluate("--checkpoint", tmp_path / "out" / "checkpoint.pth", "--device", "cpu", "-j", "0", "--data-backend", "gpu",
             "--output-json", tmp_path / "eval.json")
    assert json.loads((tmp_path / "eval.json").read_text())["num_samples"] == 9  # every val image, on the device path


@pytest.mark.parametrize("backend", ["gpu", "synthetic"])
def test_segmentation_trains_with_each_backend(tmp_path, backend):
    from test_segmentation import write_cityscapes
    root = write_cityscapes(tmp_path / "cityscapes")
    train_segmentation("--dataset", "cityscapes", "--data-path", root, "--model", "unet", "--unet-width", "4",
                       "--device", "cpu", "-b", "2", "-j", "1", "--epochs", "1", "--crop-size", "32", "64",
                       "--base-size", "16", "--data-backend", backend, "--output-dir", tmp_path / "out")
    assert (tmp_path / "out" / "checkpoint.pth").exists()


def test_segmentation_device_transform_keeps_labels_and_pads_with_ignore():
    from segmentation.gpu_augment import DeviceTransform
    augmentation = (16, [32, 48], [0.5, 2.0])  # base size, crop size, scale range
    image = torch.randint(0, 255, (3, 16, 24), dtype=torch.uint8)
    mask = torch.randint(0, 3, (16, 24), dtype=torch.uint8)
    images, masks = DeviceTransform(augmentation, torch.device("cpu"))(([image] * 8, [mask] * 8),
                                                                       torch.Generator().manual_seed(0))
    assert images.shape == (8, 3, 32, 48) and masks.shape == (8, 32, 48) and masks.dtype == torch.int64
    assert set(masks.unique().tolist()) <= {0, 1, 2, 255} and (masks == 255).any()  # crops bigger than the image
    assert not math.isnan(images.sum().item())


def test_both_backends_take_the_crop_scale_and_ratio(tmp_path):
    from classification import train as script
    from classification.data import load_train
    from common.bad_samples import BadSamples
    from common.data import BatchLayout
    data = write_tree(tmp_path / "data")

    def loader(backend):
        args = script.finish_args(script.get_args_parser().parse_args(
            ["--data-path", str(data), "-j", "0", "-b", "4", "--train-crop-scale", "0.5", "0.9", "--train-crop-ratio",
             "0.9", "1.5", "--data-backend", backend]))
        return load_train(args, BatchLayout(batch_size=4), torch.device("cpu"), ["cat", "dog", "fox"], BadSamples(0))

    crop = loader("pil").dataset.dataset.transform.transforms[0]  # under SeededSamples
    assert isinstance(crop, v2.RandomResizedCrop) and (tuple(crop.scale), tuple(crop.ratio)) == ((0.5, 0.9), (0.9, 1.5))
    preset = loader("gpu").prepare
    assert (tuple(preset.scale), tuple(preset.ratio)) == ((0.5, 0.9), (0.9, 1.5))


def test_segmentation_device_augmentation_draws_as_v2_does():
    from segmentation.gpu_augment import draw_augmentation, resized_shape
    n, height, width, base, crop, scale_range = 4000, 40, 60, 32, (48, 48), (0.5, 2.0)
    generator = torch.Generator().manual_seed(0)
    ours = [draw_augmentation(height, width, base, crop, scale_range, generator) for _ in range(n)]
    torch.manual_seed(0)
    resize = v2.RandomResize(int(scale_range[0] * base), int(scale_range[1] * base) + 1)
    theirs = [resize.make_params([torch.zeros(3, height, width)])["size"][0] for _ in range(n)]
    shorter = torch.tensor([p["shorter"] for p in ours], dtype=torch.float)
    assert (shorter.min(), shorter.max()) == (min(theirs), max(theirs)) == (16, 64)
    assert shorter.mean() == pytest.approx(sum(theirs) / n, abs=0.6)  # uniform over 16..64: sd of the mean 0.22
    cropper = v2.RandomCrop(crop, pad_if_needed=True)
    for p in ours[:300]:  # offsets within what v2 allows on the same resized size
        resized = resized_shape(height, width, p["shorter"])
        assert F_resized_shape(height, width, p["shorter"]) == resized
        v2_params = cropper.make_params([torch.zeros(3, *resized)])
        assert p["padding"] == v2_params["padding"]
        padded_h, padded_w = resized[0] + 2 * p["padding"][1], resized[1] + 2 * p["padding"][0]
        assert 0 <= p["top"] <= padded_h - crop[0] and 0 <= p["left"] <= padded_w - crop[1]
    assert sum(p["flip"] for p in ours) / n == pytest.approx(0.5, abs=0.03)
    factors = torch.tensor([p["jitter"] for p in ours])
    assert 0.75 <= factors.min() and factors.max() <= 1.25 and factors.mean() == pytest.approx(1.0, abs=0.01)
    orders = {tuple(p["jitter_order"]) for p in ours}
    assert len(orders) == 6  # every order of brightness, contrast, saturation


def F_resized_shape(height, width, shorter):
    """What v2.functional.resize really makes of an image, to check segmentation.data.resized_shape."""
    return tuple(v2.functional.resize(torch.zeros(1, height, width), [shorter], antialias=True).shape[-2:])


def test_segmentation_device_augmentation_keeps_masks_nearest_and_pads_with_ignore():
    from segmentation.gpu_augment import augment
    image = torch.full((3, 8, 8), 200, dtype=torch.uint8)
    mask = torch.zeros(8, 8, dtype=torch.uint8)
    mask[:, 4:] = 7  # two labels side by side: bilinear resizing would make 1..6 along the edge
    params = {"shorter": 13, "padding": [2, 3, 2, 3], "top": 0, "left": 0, "flip": False, "jitter_order": [0, 1, 2],
              "jitter": [1.0, 1.0, 1.0]}
    crops, labels = augment(image, mask, params, (19, 17))
    assert set(labels.unique().tolist()) == {0, 7, 255}
    assert (labels[:3] == 255).all() and (labels[:, :2] == 255).all()  # the padded rows and columns
    assert (crops[:, :3] == 0).all()  # the image is padded with 0 where the mask has 255


def test_segmentation_device_transform_is_a_function_of_its_generator_alone():
    # It may run on the DeviceLoader's side thread: torch's global stream must neither feed nor change it.
    from segmentation.gpu_augment import DeviceTransform
    transform = DeviceTransform((16, [24, 24], [0.5, 2.0]), torch.device("cpu"))
    batch = ([torch.randint(0, 255, (3, 16, 20), dtype=torch.uint8)] * 4, [torch.zeros(16, 20, dtype=torch.uint8)] * 4)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    first = transform(batch, torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), before)  # the global stream untouched
    torch.manual_seed(2)
    again = transform(batch, torch.Generator().manual_seed(7))
    other = transform(batch, torch.Generator().manual_seed(8))
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and not torch.equal(first[0], other[0])
