"""Segmentation datasets read tiny trees in each dataset's real layout: label mapping, sample format, bad input."""
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from common.log import UserError
from conftest import run, write_image
from segmentation.data import DATASETS, IGNORE_INDEX
from segmentation.datasets import CITYSCAPES_LABEL_IDS, ade20k, cityscapes, voc, voc_colour

WIDTH, HEIGHT = 24, 16
# Typed out from the Cityscapes label table rather than taken from the module, so that the test checks the facts.
CITYSCAPES_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                       26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
VOC_PALETTE_BYTES = [channel for index in range(256) for channel in voc_colour(index)]


def grid(values, width=WIDTH, height=HEIGHT):
    """An uint8 [height, width] array holding `values` over and over, row by row."""
    return np.resize(np.array(values, dtype=np.uint8), (height, width))


def write_mask(path, values, palette=None):
    """8-bit grayscale PNG, or a palette PNG when a palette is given (as VOC ships its masks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = Image.fromarray(values, mode="L")
    if palette is not None:
        mask = mask.convert("P")  # L -> P keeps the values as indices; the palette is attached after
        mask.putpalette(palette)
    mask.save(path)
    return path


def pixels(path):
    return np.array(Image.open(path).convert("RGB"))


def write_cityscapes_frame(root, frame="aachen_000000_000019", split="train", label_ids=None, train_ids=None,
                           seed=0):
    """One frame: a PNG image, its labelIds mask, and a labelTrainIds mask when `train_ids` is given."""
    city = frame.split("_")[0]
    image = root / "leftImg8bit" / split / city / f"{frame}_leftImg8bit.png"
    write_image(image, size=(WIDTH, HEIGHT), seed=seed)
    masks = root / "gtFine" / split / city
    write_mask(masks / f"{frame}_gtFine_labelIds.png", grid([7, 26, 0]) if label_ids is None else label_ids)
    if train_ids is not None:
        write_mask(masks / f"{frame}_gtFine_labelTrainIds.png", train_ids)
    return image


def voc_tree(base, ids=("2007_000033", "2007_000032"), split="train", mask=None, image_mode="RGB"):
    """VOC2012 at `base`: JPEG images, palette masks, and the split list in the given (unsorted) order."""
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    for seed, image_id in enumerate(ids):
        write_image(base / "JPEGImages" / f"{image_id}.jpg", mode=image_mode, size=(WIDTH, HEIGHT), seed=seed)
        write_mask(base / "SegmentationClass" / f"{image_id}.png", grid([0, 15, 255]) if mask is None else mask,
                   palette=VOC_PALETTE_BYTES)
    (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return base


def ade_tree(base, stems=("ADE_train_00000002", "ADE_train_00000001"), split="training", mask=None):
    for seed, stem in enumerate(stems):
        write_image(base / "images" / split / f"{stem}.jpg", size=(WIDTH, HEIGHT), seed=seed)
        write_mask(base / "annotations" / split / f"{stem}.png", grid([0, 1, 150]) if mask is None else mask)
    return base


def first_sample(dataset):
    image, mask = dataset[0]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, HEIGHT, WIDTH)
    assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.uint8 and mask.shape == (HEIGHT, WIDTH)
    return image, mask


# --- label mapping and sample format


def test_cityscapes_maps_every_label_id_to_its_train_id_or_ignore(tmp_path):
    raw = grid(range(34))
    image_path = write_cityscapes_frame(tmp_path, label_ids=raw)
    image, mask = first_sample(cityscapes(tmp_path, "train"))
    expected = np.vectorize(lambda v: CITYSCAPES_TRAIN_ID.get(v, IGNORE_INDEX))(raw)
    assert np.array_equal(mask.numpy(), expected)
    assert np.array_equal(image.permute(1, 2, 0).numpy(), pixels(image_path))  # RGB in channel order, unaltered


def test_cityscapes_lists_cities_in_order_with_their_stems(tmp_path):
    for frame in ("frankfurt_000000_000294", "aachen_000001_000019", "aachen_000000_000019"):
        write_cityscapes_frame(tmp_path, frame, split="val")
    dataset = cityscapes(tmp_path, "val")
    assert dataset.names == ["aachen_000000_000019_leftImg8bit", "aachen_000001_000019_leftImg8bit",
                             "frankfurt_000000_000294_leftImg8bit"]
    assert [image.endswith(f"{name}.png") for (image, _), name in zip(dataset.files, dataset.names)] == [True] * 3


def test_cityscapes_uses_label_train_ids_beside_label_ids_when_present(tmp_path):
    train_ids = grid([0, 18, 255, 5])
    write_cityscapes_frame(tmp_path, "aachen_000000_000019", label_ids=grid([0]), train_ids=train_ids)
    write_cityscapes_frame(tmp_path, "aachen_000001_000019", label_ids=grid([26]))  # only labelIds: mapped
    dataset = cityscapes(tmp_path, "train")
    assert dataset.files[0][1].endswith("aachen_000000_000019_gtFine_labelTrainIds.png")
    assert np.array_equal(dataset[0][1].numpy(), train_ids)
    assert (dataset[1][1] == 13).all()


def test_cityscapes_label_ids_turn_train_ids_back_into_label_ids():
    assert CITYSCAPES_LABEL_IDS == sorted(CITYSCAPES_TRAIN_ID, key=CITYSCAPES_TRAIN_ID.get)


@pytest.mark.parametrize("nested", [True, False], ids=["devkit-parent", "VOC2012-itself"])
def test_voc_keeps_palette_indices_and_void_from_either_root(tmp_path, nested):
    base = tmp_path / "VOCdevkit" / "VOC2012" if nested else tmp_path / "VOC2012"
    raw = grid([*range(21), 255])
    voc_tree(base, mask=raw, image_mode="L")
    dataset = voc(tmp_path if nested else base, "train")
    assert dataset.names == ["2007_000033", "2007_000032"]  # the split list's order
    image, mask = first_sample(dataset)
    assert np.array_equal(mask.numpy(), raw)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])  # a grayscale JPEG made RGB


@pytest.mark.parametrize("nested", [True, False], ids=["download-parent", "ADEChallengeData2016-itself"])
def test_ade20k_shifts_classes_down_and_ignores_other_from_either_root(tmp_path, nested):
    base = tmp_path / "ADEChallengeData2016"
    raw = grid(range(151))
    ade_tree(base, stems=("ADE_val_00000001",), split="validation", mask=raw)
    dataset = ade20k(tmp_path if nested else base, "val")
    assert dataset.names == ["ADE_val_00000001"]
    _, mask = first_sample(dataset)
    assert np.array_equal(mask.numpy(), np.where(raw == 0, IGNORE_INDEX, raw.astype(int) - 1))
    assert mask.flatten()[[0, 1, 150]].tolist() == [255, 0, 149]


def test_ade20k_lists_images_sorted(tmp_path):
    assert ade20k(ade_tree(tmp_path), "train").names == ["ADE_train_00000001", "ADE_train_00000002"]


@pytest.mark.parametrize("mode, fmt", [("L", "JPEG"), ("RGBA", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG")])
def test_any_image_mode_comes_out_rgb(tmp_path, mode, fmt):
    base = ade_tree(tmp_path, stems=("ADE_train_00000001",))
    write_image(base / "images" / "training" / "ADE_train_00000001.jpg", mode=mode, size=(WIDTH, HEIGHT), fmt=fmt)
    first_sample(ade20k(tmp_path, "train"))


def test_a_16_bit_mask_with_valid_values_is_read(tmp_path):
    base = ade_tree(tmp_path, stems=("ADE_train_00000001",))
    mask_path = base / "annotations" / "training" / "ADE_train_00000001.png"
    Image.fromarray(grid([0, 150]).astype(np.uint16)).save(mask_path)
    assert Image.open(mask_path).mode.startswith("I")
    assert first_sample(ade20k(tmp_path, "train"))[1][0, :2].tolist() == [255, 149]


def test_class_names_and_palettes(tmp_path):
    write_cityscapes_frame(tmp_path / "cityscapes")
    datasets = {"cityscapes": cityscapes(tmp_path / "cityscapes", "train"),
                "voc": voc(voc_tree(tmp_path / "voc"), "train"), "ade20k": ade20k(ade_tree(tmp_path / "ade"), "train")}
    for name, count in (("cityscapes", 19), ("voc", 21), ("ade20k", 150)):
        dataset = datasets[name]
        assert len(dataset.class_names) == len(set(dataset.class_names)) == count
        assert len(dataset.palette) == len(set(dataset.palette)) == count
    assert {"cityscapes", "voc", "ade20k", "folder"} <= set(DATASETS)
    cityscapes_set, voc_set, ade_set = datasets["cityscapes"], datasets["voc"], datasets["ade20k"]
    assert cityscapes_set.class_names[:2] == ["road", "sidewalk"] and cityscapes_set.class_names[-1] == "bicycle"
    assert cityscapes_set.palette[0] == (128, 64, 128) and cityscapes_set.palette[-1] == (119, 11, 32)
    assert voc_set.class_names[15] == "person" and voc_set.class_names[-1] == "tvmonitor"
    assert (voc_set.palette[1], voc_set.palette[15], voc_set.palette[20]) == ((128, 0, 0), (192, 128, 128),
                                                                              (0, 64, 128))
    assert ade_set.class_names[0] == "wall" and ade_set.class_names[44] == "chest of drawers"
    assert ade_set.class_names[-1] == "flag"


def test_transforms_get_image_and_mask_together(tmp_path):
    write_cityscapes_frame(tmp_path, label_ids=grid([7] * (WIDTH - 1) + [26]))
    plain_image, plain_mask = cityscapes(tmp_path, "train")[0]
    image, mask = cityscapes(tmp_path, "train", transforms=v2.RandomHorizontalFlip(p=1))[0]
    assert torch.equal(image, plain_image.flip(-1)) and torch.equal(mask, plain_mask.flip(-1))
    assert cityscapes(tmp_path, "train", transforms=lambda image, mask: "both")[0] == "both"


def test_loads_in_worker_processes_and_survives_pickling(tmp_path):
    # Pickled: spawn/forkserver workers (macOS, Windows, newer Pythons) get the dataset that way.
    dataset = pickle.loads(pickle.dumps(ade20k(ade_tree(tmp_path), "train")))
    images, masks = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2)))
    assert images.shape == (2, 3, HEIGHT, WIDTH) and masks.shape == (2, HEIGHT, WIDTH) and masks.dtype == torch.uint8


# --- bad input: one UserError naming the file or folder and the fix


def test_missing_cityscapes_split_folder(tmp_path):
    write_cityscapes_frame(tmp_path, split="train")
    with pytest.raises(UserError, match=r"folder .*leftImg8bit/val not found: a Cityscapes root holds leftImg8bit/"):
        cityscapes(tmp_path, "val")


def test_missing_cityscapes_gtfine_folder(tmp_path):
    write_image(tmp_path / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png")
    with pytest.raises(UserError, match=r"folder .*gtFine/train not found: a Cityscapes root holds"):
        cityscapes(tmp_path, "train")


def test_missing_voc_folders_name_both_root_forms(tmp_path):
    with pytest.raises(UserError, match=r"folder .*JPEGImages not found: the VOC root is the folder holding "
                                        r"VOCdevkit/VOC2012/, or VOC2012/ itself"):
        voc(tmp_path, "train")
    base = voc_tree(tmp_path / "VOC2012")
    with pytest.raises(UserError, match=r"split list .*ImageSets/Segmentation/val.txt not found"):
        voc(base, "val")
    for mask in (base / "SegmentationClass").iterdir():
        mask.unlink()
    (base / "SegmentationClass").rmdir()
    with pytest.raises(UserError, match=r"folder .*VOC2012/SegmentationClass not found"):
        voc(base, "train")


def test_missing_ade20k_annotations_folder(tmp_path):
    write_image(tmp_path / "ADEChallengeData2016" / "images" / "validation" / "ADE_val_00000001.jpg")
    with pytest.raises(UserError, match=r"folder .*ADEChallengeData2016/annotations/validation not found: the ADE20K"):
        ade20k(tmp_path, "val")


def test_unknown_split(tmp_path):
    with pytest.raises(UserError, match=r"unknown split 'test': use one of train, val"):
        ade20k(ade_tree(tmp_path), "test")


def test_image_without_mask_is_caught_when_listing(tmp_path):
    write_cityscapes_frame(tmp_path / "cityscapes")
    write_image(tmp_path / "cityscapes" / "leftImg8bit" / "train" / "bremen" / "bremen_000000_000019_leftImg8bit.png")
    with pytest.raises(UserError, match=r"image .*bremen_000000_000019_leftImg8bit.png has no mask: expected "
                                        r".*gtFine/train/bremen/bremen_000000_000019_gtFine_labelIds.png"):
        cityscapes(tmp_path / "cityscapes", "train")
    (voc_tree(tmp_path / "VOC2012") / "SegmentationClass" / "2007_000032.png").unlink()
    with pytest.raises(UserError, match=r"image .*2007_000032.jpg has no mask: expected .*SegmentationClass/"
                                        r"2007_000032.png \(add the mask or remove the image\)"):
        voc(tmp_path / "VOC2012", "train")
    (ade_tree(tmp_path / "ade") / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    with pytest.raises(UserError, match=r"image .*ADE_train_00000002.jpg has no mask: expected "
                                        r".*annotations/training/ADE_train_00000002.png"):
        ade20k(tmp_path / "ade", "train")


def test_voc_split_list_naming_a_missing_image(tmp_path):
    base = voc_tree(tmp_path)
    (base / "JPEGImages" / "2007_000032.jpg").unlink()
    with pytest.raises(UserError, match=r"split list .*train.txt names 2007_000032, but image .*2007_000032.jpg "
                                        r"is missing"):
        voc(base, "train")


def test_empty_split(tmp_path):
    (tmp_path / "cityscapes" / "leftImg8bit" / "train" / "aachen").mkdir(parents=True)
    (tmp_path / "cityscapes" / "gtFine" / "train").mkdir(parents=True)
    with pytest.raises(UserError, match=r"no images found in .*leftImg8bit/train/<city>/\*_leftImg8bit.png"):
        cityscapes(tmp_path / "cityscapes", "train")
    voc_tree(tmp_path / "VOC2012", ids=())
    with pytest.raises(UserError, match=r"no images found in .*ImageSets/Segmentation/train.txt"):
        voc(tmp_path / "VOC2012", "train")


def test_image_and_mask_of_different_sizes(tmp_path):
    write_cityscapes_frame(tmp_path, label_ids=grid([7], width=WIDTH - 4))
    dataset = cityscapes(tmp_path, "train")
    with pytest.raises(UserError, match=r"image .*_leftImg8bit.png is 24x16 but its mask .*_gtFine_labelIds.png "
                                        r"is 20x16: an image and its mask must be the same size"):
        dataset[0]


BAD_MASK_TREES = {
    "cityscapes": (lambda root, values: write_cityscapes_frame(root, label_ids=values), cityscapes,
                   "aachen_000000_000019_gtFine_labelIds.png"),
    "cityscapes-train-ids": (lambda root, values: write_cityscapes_frame(root, train_ids=values), cityscapes,
                             "aachen_000000_000019_gtFine_labelTrainIds.png"),
    "voc": (lambda root, values: voc_tree(root, mask=values), voc, "2007_000033.png"),
    "ade20k": (lambda root, values: ade_tree(root, mask=values), ade20k, "ADE_train_00000001.png"),
}


@pytest.mark.parametrize("layout, values, listed", [
    ("cityscapes", [7, 200, 34], r"34, 200 \(allowed: Cityscapes labelIds 0..33\)"),
    ("cityscapes-train-ids", [0, 19, 255], r"19 \(allowed: Cityscapes train ids 0..18, or 255 to ignore\)"),
    ("voc", [*range(41), 255], r"21, 22, 23, 24, 25, 26, 27, 28, 29, 30 and 10 more \(allowed: VOC class indices"),
    ("ade20k", [0, 151, 150], r"151 \(allowed: ADE20K class indices 1..150, or 0 for other\)"),
])
def test_mask_values_that_are_no_class(tmp_path, layout, values, listed):
    write_tree, dataset, mask_name = BAD_MASK_TREES[layout]
    write_tree(tmp_path, grid(values))
    with pytest.raises(UserError, match=rf"mask .*/{mask_name} holds values that are not allowed: {listed}"):
        dataset(tmp_path, "train")[0]


def test_16_bit_mask_values_above_255_are_listed(tmp_path):
    base = ade_tree(tmp_path, stems=("ADE_train_00000001",))
    mask_path = base / "annotations" / "training" / "ADE_train_00000001.png"
    Image.fromarray(grid([1]).astype(np.uint16) * 300).save(mask_path)
    with pytest.raises(UserError, match=r"ADE_train_00000001.png holds values that are not allowed: 300 "):
        ade20k(tmp_path, "train")[0]


def test_rgb_mask_is_refused(tmp_path):
    base = voc_tree(tmp_path)
    mask_path = base / "SegmentationClass" / "2007_000033.png"
    Image.open(mask_path).convert("RGB").save(mask_path)
    with pytest.raises(UserError, match=r"mask .*2007_000033.png holds RGB pixels: it must hold class indices, one per "
                                        r"pixel \(a palette PNG as VOC ships it"):
        voc(base, "train")[0]


def test_corrupt_image_and_corrupt_mask(tmp_path):
    image_path = write_cityscapes_frame(tmp_path)
    good_image = image_path.read_bytes()
    image_path.write_bytes(good_image[: len(good_image) // 2])
    with pytest.raises(UserError, match=r"cannot read image .*aachen_000000_000019_leftImg8bit.png .*"
                                        r"delete the file or replace it"):
        cityscapes(tmp_path, "train")[0]
    image_path.write_bytes(good_image)
    mask_path = tmp_path / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png"
    mask_path.write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"cannot read mask .*aachen_000000_000019_gtFine_labelIds.png .*"
                                        r"replace it with a valid mask"):
        cityscapes(tmp_path, "train")[0]


# --- files and names


def test_a_jpeg_compressed_mask_is_refused(tmp_path):
    # Named .png as the layout wants: only its content says JPEG. Its artefacts are valid VOC indices, so the
    # value check alone would accept it.
    base = voc_tree(tmp_path)
    mask_path = base / "SegmentationClass" / "2007_000033.png"
    person = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    person[3:13, 5:18] = 15
    Image.fromarray(person, mode="L").save(mask_path, format="JPEG", quality=75)
    decoded = np.array(Image.open(mask_path))
    assert decoded.max() <= 20 and (decoded != person).mean() > 0.2  # a third of the pixels wrong, all "classes"
    with pytest.raises(UserError, match=r"mask .*SegmentationClass/2007_000033\.png is a lossy JPEG file, whose "
                                        r"compression changes class indices .*replace it with a PNG made from the "
                                        r"original annotation"):
        voc(base, "train")[0]
    assert np.array_equal(voc(base, "train")[1][1].numpy(), grid([0, 15, 255]))  # its PNG neighbour still reads


def test_a_voc_split_list_naming_an_image_twice_is_refused(tmp_path):
    base = voc_tree(tmp_path)
    (base / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000033\n2007_000032\n\n2007_000033\n")
    with pytest.raises(UserError, match=r"split list .*train\.txt names 2007_000033 twice \(lines 1 and 4\): a "
                                        r"repeated image counts several times in training and mIoU; delete line 4"):
        voc(base, "train")


def test_a_voc_split_list_with_a_byte_order_mark_and_crlf_line_ends(tmp_path):
    base = voc_tree(tmp_path)
    (base / "ImageSets" / "Segmentation" / "train.txt").write_bytes(b"\xef\xbb\xbf2007_000033\r\n2007_000032\r\n")
    dataset = voc(base, "train")
    assert dataset.names == ["2007_000033", "2007_000032"]
    first_sample(dataset)


def test_an_invisible_character_in_a_split_list_id_is_shown(tmp_path):
    base = voc_tree(tmp_path)
    (base / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000033\n2007\u200b_000032\n")
    with pytest.raises(UserError, match=r"names '2007\\u200b_000032', but image '.*2007\\u200b_000032\.jpg' is "
                                        r"missing"):
        voc(base, "train")
    (base / "ImageSets" / "Segmentation" / "train.txt").write_bytes("2007_000033\n".encode("utf-16"))
    with pytest.raises(UserError, match=r"cannot read split list .*train\.txt \(UnicodeDecodeError: .*\): it must be "
                                        r"UTF-8 text"):
        voc(base, "train")


def test_a_newline_in_a_file_name_stays_inside_the_one_error_line(tmp_path):
    base = ade_tree(tmp_path, stems=("ADE_train\n1",))
    (base / "images" / "training" / "ADE_train\n1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match=r"cannot read image '.*images/training/ADE_train\\n1\.jpg' \(") as error:
        ade20k(tmp_path, "train")[0]
    assert "\n" not in str(error.value)  # common.log keeps only the last line of a message


# In a child process: a regression blocks on the FIFO, and the timeout ends it instead of the test suite hanging.
FIFO_READS = """
import sys
from common.log import UserError
from segmentation.datasets import voc
try:
    voc(sys.argv[1], "train")[0]
except UserError as e:
    print(e)
"""


@pytest.mark.parametrize("which", ["image", "mask"])
def test_a_fifo_is_refused_not_waited_on(tmp_path, which):
    base = voc_tree(tmp_path)
    path = base / ("JPEGImages/2007_000033.jpg" if which == "image" else "SegmentationClass/2007_000033.png")
    path.unlink()
    os.mkfifo(path)
    result = run(sys.executable, "-c", FIFO_READS, base, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (f"{which} {path} is a FIFO (named pipe), not a regular file: only regular files "
                                     f"are read as {which}s; remove it or replace it with the {which} file")


def voc_aug_tree(base, list_name="train_aug.txt"):
    """VOC2012 with the SBD augmented set as mmsegmentation's conversion leaves it: one train id with VOC's own
    palette mask (and a different SBD mask, which must lose), two SBD-only ids with class-index masks, a val id."""
    voc_tree(base, ids=("2007_000032",), split="train")
    voc_tree(base, ids=("2007_000033",), split="val", mask=grid([0, 1, 255]))
    aug = {"2008_000002": grid([0, 7, 20, 255, 3]), "2008_000003": grid([12, 0, 255])}
    for seed, (image_id, values) in enumerate(aug.items()):
        write_image(base / "JPEGImages" / f"{image_id}.jpg", size=(WIDTH, HEIGHT), seed=seed + 5)
        write_mask(base / "SegmentationClassAug" / f"{image_id}.png", values)
    write_mask(base / "SegmentationClassAug" / "2007_000032.png", grid([4]))
    ids = ["2008_000003", "2007_000032", "2008_000002"]
    (base / "ImageSets" / "Segmentation" / list_name).write_text("".join(f"{i}\n" for i in ids))
    return base, ids, aug


@pytest.mark.parametrize("list_name", ["train_aug.txt", "trainaug.txt"])
def test_voc_aug_reads_sbd_class_index_masks_pixel_by_pixel(tmp_path, list_name):
    base, ids, aug = voc_aug_tree(tmp_path / "VOCdevkit" / "VOC2012", list_name)
    assert Image.open(base / "SegmentationClassAug" / "2008_000002.png").mode == "L"  # not a palette PNG
    train = voc(tmp_path, "train_aug")
    assert train.names == ids  # the list's order
    assert [os.path.basename(os.path.dirname(mask)) for _, mask in train.files] == [
        "SegmentationClassAug", "SegmentationClass", "SegmentationClassAug"]
    expected = [aug["2008_000003"], grid([0, 15, 255]), aug["2008_000002"]]
    for i, values in enumerate(expected):
        image, mask = train[i]
        assert image.shape == (3, HEIGHT, WIDTH) and mask.dtype == torch.uint8
        np.testing.assert_array_equal(mask.numpy(), values)  # 0..20 kept, 255 stays void
    assert train.class_names == voc(tmp_path, "val").class_names
    val = voc(tmp_path, "val")
    assert val.names == ["2007_000033"] and "SegmentationClassAug" not in val.files[0][1]
    np.testing.assert_array_equal(val[0][1].numpy(), grid([0, 1, 255]))


def test_voc_aug_flag_trains_on_the_augmented_set_and_validates_on_val(tmp_path):
    from common.bad_samples import BadSamples
    from common.data import BatchLayout
    from common.distributed import DistEnv
    from segmentation import train as script
    from segmentation.data import load_train, load_val
    voc_aug_tree(tmp_path)
    args = script.finish_args(script.get_args_parser().parse_args(
        ["--dataset", "voc", "--data-path", str(tmp_path), "--voc-aug", "--base-size", "16", "--crop-size", "16",
         "-b", "1"]))
    cpu, layout = torch.device("cpu"), BatchLayout()

    def training_names():
        dataset = load_train(args, layout, cpu, BadSamples(0)).dataset
        return getattr(dataset, "dataset", dataset).names  # under SeededSamples with --data-backend pil

    assert training_names() == ["2008_000003", "2007_000032", "2008_000002"]
    assert load_val(args, DistEnv(), cpu).dataset.names == ["2007_000033"]
    args.data_backend = "gpu"  # its workers decode the same set
    assert training_names() == ["2008_000003", "2007_000032", "2008_000002"]
    args.voc_aug, args.data_backend = None, "pil"
    assert training_names() == ["2007_000032"]


def test_voc_aug_names_what_is_missing(tmp_path):
    base, _, _ = voc_aug_tree(tmp_path)
    (base / "ImageSets" / "Segmentation" / "train_aug.txt").unlink()
    with pytest.raises(UserError, match=r"split list .*ImageSets/Segmentation/train_aug.txt not found: --voc-aug "
                                        r"reads the SBD augmented set .*voc_aug.py"):
        voc(tmp_path, "train_aug")
    (base / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("2008_000002\n2008_000009\n")
    write_image(base / "JPEGImages" / "2008_000009.jpg", size=(WIDTH, HEIGHT))
    with pytest.raises(UserError, match=r"image .*2008_000009.jpg has no mask: expected "
                                        r".*SegmentationClassAug/2008_000009.png"):
        voc(tmp_path, "train_aug")
    for mask in (base / "SegmentationClassAug").iterdir():
        mask.unlink()
    (base / "SegmentationClassAug").rmdir()
    with pytest.raises(UserError, match=r"folder .*SegmentationClassAug not found: --voc-aug reads"):
        voc(tmp_path, "train_aug")
    assert voc(tmp_path, "train").names == ["2007_000032"]  # VOC's own sets need none of it
