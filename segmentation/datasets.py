"""Segmentation data in the layouts the datasets ship in (Cityscapes, PASCAL VOC 2012, ADE20K), checked up front;
the mask reading that segmentation/folder.py shares. train.py imports it only when --data-path is given (through
segmentation/data.py's DATASETS).

Each sample is (tv_tensors.Image uint8 [3, H, W] RGB, tv_tensors.Mask uint8 [H, W] of train ids or IGNORE_INDEX).
"""
import os

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors

from common.data import open_regular, read_image, reason, shown
from common.log import SampleError, UserError
from segmentation.data import IGNORE_INDEX

# (name, labelId, colour) of the 19 classes Cityscapes benchmarks on, in train-id order.
CITYSCAPES_CLASSES = [
    ("road", 7, (128, 64, 128)), ("sidewalk", 8, (244, 35, 232)), ("building", 11, (70, 70, 70)),
    ("wall", 12, (102, 102, 156)), ("fence", 13, (190, 153, 153)), ("pole", 17, (153, 153, 153)),
    ("traffic light", 19, (250, 170, 30)), ("traffic sign", 20, (220, 220, 0)), ("vegetation", 21, (107, 142, 35)),
    ("terrain", 22, (152, 251, 152)), ("sky", 23, (70, 130, 180)), ("person", 24, (220, 20, 60)),
    ("rider", 25, (255, 0, 0)), ("car", 26, (0, 0, 142)), ("truck", 27, (0, 0, 70)), ("bus", 28, (0, 60, 100)),
    ("train", 31, (0, 80, 100)), ("motorcycle", 32, (0, 0, 230)), ("bicycle", 33, (119, 11, 32)),
]
# The official evaluator reads labelIds, so predictions in train ids are written back through this list.
CITYSCAPES_LABEL_IDS = [label_id for _, label_id, _ in CITYSCAPES_CLASSES]
CITYSCAPES_LAYOUT = ("a Cityscapes root holds leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and "
                     "gtFine/{train,val}/<city>/*_gtFine_labelIds.png")

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]
VOC_LAYOUT = ("the VOC root is the folder holding VOCdevkit/VOC2012/, or VOC2012/ itself, with JPEGImages/, "
              "SegmentationClass/ and ImageSets/Segmentation/{train,val}.txt")
VOC_AUG_LAYOUT = ("--voc-aug reads the SBD augmented set inside VOC2012/: SegmentationClassAug/<id>.png (class-index "
                  "PNGs, 255 = void) and ImageSets/Segmentation/train_aug.txt (10,582 ids), as mmsegmentation's "
                  "tools/dataset_converters/voc_aug.py writes them (it names the list trainaug.txt, also read)")
# The training list of the augmented set, under either name it is published with.
VOC_AUG_LISTS = ("train_aug.txt", "trainaug.txt")

# The short names of SceneParsing's objectInfo150, index i = annotation value i + 1.
ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step",
    "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
    "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
]
ADE20K_LAYOUT = ("the ADE20K root is the folder holding ADEChallengeData2016/, or that folder itself, with "
                 "images/{training,validation}/*.jpg and annotations/{training,validation}/*.png")

# Pillow modes whose pixels are one number each: anything else (RGB, RGBA, ...) is a picture of the labels.
INDEX_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")
# JPEG turns the indices along every edge into neighbouring values, which are other classes' indices. (Pillow
# reads WebP as RGB, refused as such; JPEG 2000 may be lossless.)
LOSSY_FORMATS = ("JPEG", "MPO")
MAX_LISTED_VALUES = 10


def voc_colour(index):
    """VOC's colour map: the index's bits dealt out to r, g, b in turn, from the top bit down."""
    r = g = b = 0
    for bit in range(7, -1, -1):
        r |= (index & 1) << bit
        g |= ((index >> 1) & 1) << bit
        b |= ((index >> 2) & 1) << bit
        index >>= 3
    return r, g, b


CITYSCAPES_PALETTE = [colour for _, _, colour in CITYSCAPES_CLASSES]
VOC_PALETTE = [voc_colour(i) for i in range(len(VOC_CLASSES))]
# Not ADE's official palette: VOC's map shifted by one, so that every class gets a distinct, non-black colour.
ADE20K_PALETTE = [voc_colour(i + 1) for i in range(len(ADE20K_CLASSES))]


class LabelMap:
    """Raw mask values to train ids through a 256-entry table; raw values absent from `train_ids` are refused."""

    def __init__(self, train_ids, allowed):
        self.table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        self.valid = np.zeros(256, dtype=bool)
        for raw, train_id in train_ids.items():
            self.table[raw] = train_id
            self.valid[raw] = True
        self.allowed = allowed

    def __call__(self, values, path):
        bad = self.bad_values(values)
        if bad:
            listed = ", ".join(map(str, bad[:MAX_LISTED_VALUES]))
            if len(bad) > MAX_LISTED_VALUES:
                listed += f" and {len(bad) - MAX_LISTED_VALUES} more"
            raise SampleError(f"mask {shown(path)} holds values that are not allowed: {listed} "
                            f"(allowed: {self.allowed}): fix or replace the file")
        # NumPy, not torch, indexes and counts here: several times faster on a Cityscapes mask.
        return torch.from_numpy(self.table[values])

    def read(self, path):
        """The train ids of the mask file at `path`, checked."""
        return self(read_mask_values(path), path)

    def bad_values(self, values):
        return [int(v) for v in values_present(values) if not (0 <= v < 256 and self.valid[v])]


def values_present(values):
    """The distinct values of an integer array, sorted."""
    if values.dtype == np.uint8:  # a histogram is one cheap pass, where unique() sorts every pixel
        return np.flatnonzero(np.bincount(values.ravel(), minlength=256))
    return np.unique(values)


CITYSCAPES_TRAIN_ID_OF = {label_id: train_id for train_id, label_id in enumerate(CITYSCAPES_LABEL_IDS)}
CITYSCAPES_LABEL_ID_MAP = LabelMap({label_id: CITYSCAPES_TRAIN_ID_OF.get(label_id, IGNORE_INDEX)
                                    for label_id in range(34)}, "Cityscapes labelIds 0..33")
CITYSCAPES_TRAIN_ID_MAP = LabelMap({**{i: i for i in range(len(CITYSCAPES_CLASSES))}, IGNORE_INDEX: IGNORE_INDEX},
                                   "Cityscapes train ids 0..18, or 255 to ignore")
VOC_MAP = LabelMap({**{i: i for i in range(len(VOC_CLASSES))}, IGNORE_INDEX: IGNORE_INDEX},
                   "VOC class indices 0..20, or 255 for void")
ADE20K_MAP = LabelMap({0: IGNORE_INDEX, **{v: v - 1 for v in range(1, len(ADE20K_CLASSES) + 1)}},
                      "ADE20K class indices 1..150, or 0 for other")


def read_mask_values(path, modes=None):
    """The raw values of a mask file as an integer array [H, W] (palette PNGs give their indices), or [H, W, 3] for
    a colour mask when `modes` (mode -> the mode it is converted to, or None; default INDEX_MODES) takes RGB."""
    modes = modes or dict.fromkeys(INDEX_MODES)
    f, _ = open_regular(path, "mask")
    try:
        with f, Image.open(f) as mask:
            mode, codec = mask.mode, mask.format
            values = None
            if mode in modes and codec not in LOSSY_FORMATS:
                values = np.array(mask.convert(modes[mode]) if modes[mode] else mask)
    except Exception as e:
        raise SampleError(f"cannot read mask {shown(path)} ({reason(e)}): "
                        "replace it with a valid mask, or delete it together with its image") from None
    if codec in LOSSY_FORMATS:
        raise SampleError(f"mask {shown(path)} is a lossy {codec} file, whose compression changes class indices along "
                        "the edges: masks must be lossless; replace it with a PNG made from the original annotation "
                        "(converting this file keeps the damage)")
    if values is None:
        raise SampleError(f"mask {shown(path)} holds {mode} pixels: it must hold class indices, one per pixel "
                        "(a palette PNG as VOC ships it, or an 8-bit grayscale PNG)")
    return values


def check_same_size(image, image_path, mask_values, mask_path):
    """`mask_values`: an array or tensor [H, W]."""
    (width, height), (mask_height, mask_width) = image.size, mask_values.shape
    if (width, height) != (mask_width, mask_height):
        raise SampleError(f"image {shown(image_path)} is {width}x{height} but its mask {shown(mask_path)} is "
                        f"{mask_width}x{mask_height}: an image and its mask must be the same size")


class SegmentationFiles(torch.utils.data.Dataset):
    """The (image path, mask path) pairs of one split, with their label mappings."""

    # The largest shorter side the transforms (or the device, for --data-backend gpu) resize an image to; an
    # image that would become too large at it is refused before decoding (common.data.check_resized_size).
    resize_shorter_side = None

    def __init__(self, files, names, class_names, palette, label_maps, transforms=None):
        # label_maps holds one LabelMap per sample: Cityscapes mixes labelIds and labelTrainIds files.
        self.files = files
        self.names = names
        self.class_names = class_names
        self.palette = palette
        self.label_maps = label_maps
        self.transforms = transforms

    def __len__(self):
        return len(self.files)

    def path(self, i):
        """The image of sample i, which names it (in bad_samples.txt)."""
        return self.files[i][0]

    def read_mask(self, i):
        """The train-id mask of sample i (uint8 tensor [H, W], IGNORE_INDEX where void), checked."""
        return self.label_maps[i].read(self.files[i][1])

    def __getitem__(self, i):
        image_path, mask_path = self.files[i]
        image = read_image(image_path, resize_shorter_side=self.resize_shorter_side)
        mask = self.read_mask(i)
        check_same_size(image, image_path, mask, mask_path)
        image, mask = tv_tensors.Image(image), tv_tensors.Mask(mask)
        return self.transforms(image, mask) if self.transforms is not None else (image, mask)


def split_folder_name(split, folder_names):
    if split not in folder_names:
        raise UserError(f"unknown split {split!r}: use one of {', '.join(folder_names)}")
    return folder_names[split]


def require_folders(layout, *paths):
    for path in paths:
        if not os.path.isdir(path):
            raise UserError(f"folder {shown(path)} not found: {layout}")


def files_in(folder):
    """Names of the files in `folder`; none when it is missing (its images are then reported as unpaired)."""
    return set(os.listdir(folder)) if os.path.isdir(folder) else set()


def inner_root(root, inner):
    """root/inner when it exists, else root: both the download folder and the dataset folder are accepted."""
    nested = os.path.join(root, inner)
    return nested if os.path.isdir(nested) else root


def require_mask(image_path, mask_path, existing_masks):
    if os.path.basename(mask_path) not in existing_masks:
        raise UserError(f"image {shown(image_path)} has no mask: expected {shown(mask_path)} "
                        "(add the mask or remove the image)")


def require_images(files, where):
    if not files:
        raise UserError(f"no images found in {shown(where)}: add images or pick another split")


def image_stem(image_path):
    return os.path.splitext(os.path.basename(image_path))[0]


def cityscapes_pairs(image_dir, mask_dir):
    """(image, mask) paths of one split in sorted order, preferring a ready labelTrainIds mask to labelIds."""
    pairs = []
    for city in sorted(entry.name for entry in os.scandir(image_dir) if entry.is_dir()):
        masks_here = files_in(os.path.join(mask_dir, city))
        for name in sorted(os.listdir(os.path.join(image_dir, city))):
            if not name.endswith("_leftImg8bit.png"):
                continue
            frame = name[:-len("_leftImg8bit.png")]
            train_ids, label_ids = f"{frame}_gtFine_labelTrainIds.png", f"{frame}_gtFine_labelIds.png"
            mask_name = train_ids if train_ids in masks_here else label_ids
            image_path, mask_path = os.path.join(image_dir, city, name), os.path.join(mask_dir, city, mask_name)
            require_mask(image_path, mask_path, masks_here)
            pairs.append((image_path, mask_path))
    return pairs


def cityscapes(root, split, transforms=None):
    split = split_folder_name(split, {"train": "train", "val": "val"})
    image_dir, mask_dir = os.path.join(root, "leftImg8bit", split), os.path.join(root, "gtFine", split)
    require_folders(CITYSCAPES_LAYOUT, image_dir, mask_dir)
    files = cityscapes_pairs(image_dir, mask_dir)
    require_images(files, f"{image_dir}/<city>/*_leftImg8bit.png")
    label_maps = [CITYSCAPES_TRAIN_ID_MAP if mask.endswith("_labelTrainIds.png") else CITYSCAPES_LABEL_ID_MAP
                  for _, mask in files]
    return SegmentationFiles(files, [image_stem(image) for image, _ in files],
                             [name for name, _, _ in CITYSCAPES_CLASSES], list(CITYSCAPES_PALETTE), label_maps,
                             transforms)


def text_lines(path, what, form):
    """The lines of a text file that a user writes (a split list, classes.txt)."""
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) would otherwise start the first line;
        # newline=None reads CRLF and CR line ends as \n.
        with open(path, encoding="utf-8-sig", newline=None) as f:
            return f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {what} {shown(path)} ({reason(e)}): it must be UTF-8 text, {form}") from None


def voc_ids(list_path):
    """The image ids of a split list, one a line; a repeated id is refused (it would count several times)."""
    require_folders(VOC_LAYOUT, os.path.dirname(list_path))
    if not os.path.isfile(list_path):
        raise UserError(f"split list {shown(list_path)} not found: {VOC_LAYOUT}")
    lines = text_lines(list_path, "split list", "one image id a line")
    ids, first_line = [], {}
    for number, line in enumerate(lines, 1):
        image_id = line.strip()
        if not image_id:
            continue
        if image_id in first_line:
            raise UserError(f"split list {shown(list_path)} names {shown(image_id)} twice (lines "
                            f"{first_line[image_id]} and {number}): a repeated image counts several times in "
                            f"training and mIoU; delete line {number}")
        first_line[image_id] = number
        ids.append(image_id)
    return ids


def voc_pairs(image_dir, mask_dirs, ids, list_path):
    """(image, mask) paths in the split list's order; each mask from the first of `mask_dirs` that holds it."""
    existing_images, existing_masks = files_in(image_dir), [files_in(folder) for folder in mask_dirs]
    pairs = []
    for image_id in ids:
        image_path = os.path.join(image_dir, f"{image_id}.jpg")
        if f"{image_id}.jpg" not in existing_images:
            raise UserError(f"split list {shown(list_path)} names {shown(image_id)}, but image {shown(image_path)} "
                            "is missing: add the image or remove the line")
        where = next((i for i, names in enumerate(existing_masks) if f"{image_id}.png" in names), -1)
        mask_path = os.path.join(mask_dirs[where], f"{image_id}.png")
        require_mask(image_path, mask_path, existing_masks[where])
        pairs.append((image_path, mask_path))
    return pairs


def voc_aug_list(base):
    folder = os.path.join(base, "ImageSets", "Segmentation")
    for name in VOC_AUG_LISTS:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise UserError(f"split list {shown(os.path.join(folder, VOC_AUG_LISTS[0]))} not found: {VOC_AUG_LAYOUT}")


def voc(root, split, transforms=None):
    """Split train_aug is the SBD augmented set (--voc-aug); train and val are VOC's own."""
    split = split_folder_name(split, {"train": "train", "val": "val", "train_aug": "train_aug"})
    base = inner_root(root, os.path.join("VOCdevkit", "VOC2012"))
    image_dir, mask_dir = os.path.join(base, "JPEGImages"), os.path.join(base, "SegmentationClass")
    require_folders(VOC_LAYOUT, image_dir, mask_dir)
    if split == "train_aug":
        aug_dir = os.path.join(base, "SegmentationClassAug")
        require_folders(VOC_AUG_LAYOUT, aug_dir)
        # VOC's own mask first, as mmsegmentation trains (its conversion writes SBD's masks only, and SBD lacks
        # some of VOC's train images); then SBD's.
        list_path, mask_dirs = voc_aug_list(base), (mask_dir, aug_dir)
    else:
        list_path, mask_dirs = os.path.join(base, "ImageSets", "Segmentation", f"{split}.txt"), (mask_dir,)
    ids = voc_ids(list_path)
    files = voc_pairs(image_dir, mask_dirs, ids, list_path)
    require_images(files, list_path)
    return SegmentationFiles(files, ids, list(VOC_CLASSES), list(VOC_PALETTE), [VOC_MAP] * len(files), transforms)


def ade20k_pairs(image_dir, mask_dir):
    """(image, mask) paths of one split in sorted order."""
    existing_masks = files_in(mask_dir)
    pairs = []
    for name in sorted(os.listdir(image_dir)):
        if name.lower().endswith((".jpg", ".jpeg", ".png")):
            image_path, mask_path = os.path.join(image_dir, name), os.path.join(mask_dir, f"{image_stem(name)}.png")
            require_mask(image_path, mask_path, existing_masks)
            pairs.append((image_path, mask_path))
    return pairs


def ade20k(root, split, transforms=None):
    split = split_folder_name(split, {"train": "training", "val": "validation"})
    base = inner_root(root, "ADEChallengeData2016")
    image_dir, mask_dir = os.path.join(base, "images", split), os.path.join(base, "annotations", split)
    require_folders(ADE20K_LAYOUT, image_dir, mask_dir)
    files = ade20k_pairs(image_dir, mask_dir)
    require_images(files, image_dir)
    return SegmentationFiles(files, [image_stem(image) for image, _ in files], list(ADE20K_CLASSES),
                             list(ADE20K_PALETTE), [ADE20K_MAP] * len(files), transforms)
