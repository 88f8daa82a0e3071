"""--dataset folder: a plain folder of images and masks, paired by file stem, with the classes of classes.txt (and
their colours, for colour masks) or of the masks' values. Imported only when that layout is chosen."""
import functools
import os
import time

import numpy as np
import torch
from PIL import Image

from common.data import shown
from common.log import SampleError, UserError, print0
from segmentation.data import IGNORE_INDEX
from segmentation.datasets import (INDEX_MODES, LabelMap, SegmentationFiles, image_stem, read_mask_values,
                                   require_folders, require_images, split_folder_name, text_lines, values_present,
                                   voc_colour)

FOLDER_LAYOUT = ("a folder root holds {train,val}/images/ and {train,val}/masks/, an image and its mask sharing a "
                 "file name stem (a.jpg, a.png), and optionally classes.txt")

# Besides index masks, colour masks (alpha dropped) and 1-bit ones (as 0 and 255), converted so.
FOLDER_MODES = {**{mode: None for mode in INDEX_MODES}, "1": "L", "RGB": None, "RGBA": "RGB"}


@functools.cache
def pillow_extensions():
    """The file name extensions Pillow opens (.jpg, .png, .tif, .bmp, .webp, ...)."""
    return frozenset(ext for ext, codec in Image.registered_extensions().items() if codec in Image.OPEN)


def folder_files(folder, what):
    """(stem -> file name of the images or masks in `folder`, stem -> name of its other files). Hidden files
    (.DS_Store, macOS's ._a.png) and subfolders are not read."""
    found, others = {}, {}
    for entry in os.scandir(folder):
        if entry.name.startswith(".") or entry.is_dir():
            continue
        stem, extension = os.path.splitext(entry.name)
        if extension.lower() not in pillow_extensions():
            others[stem] = entry.name
        elif stem in found:
            raise UserError(f"{what}s {shown(found[stem])} and {shown(entry.name)} in {shown(folder)} share the stem "
                            f"{shown(stem)}, which pairs an image with its mask: rename or remove one of them")
        else:
            found[stem] = entry.name
    return found, others


def unpaired_error(path, what, partner, expected, unreadable, count):
    found = f"; {shown(unreadable)} is there, in a format Pillow does not read" if unreadable else ""
    more = f"; {count - 1} more {what}{'s lack' if count > 2 else ' lacks'} one" if count > 1 else ""
    return UserError(f"{what} {shown(path)} has no {partner}: expected {expected}{found} (add the {partner} or "
                     f"remove the {what}{more})")


def folder_pairs(image_dir, mask_dir):
    """(image, mask) paths of one split, sorted by stem; an image without a mask, or a mask without an image, is
    refused, naming both paths."""
    (images, other_images), (masks, other_masks) = folder_files(image_dir, "image"), folder_files(mask_dir, "mask")
    lone_images, lone_masks = sorted(images.keys() - masks.keys()), sorted(masks.keys() - images.keys())
    if lone_images:
        stem = lone_images[0]
        raise unpaired_error(os.path.join(image_dir, images[stem]), "image", "mask",
                             shown(os.path.join(mask_dir, f"{stem}.png")), other_masks.get(stem), len(lone_images))
    if lone_masks:
        stem = lone_masks[0]
        expected = f"{shown(os.path.join(image_dir, stem))}.* (.jpg, .png or another image format Pillow reads)"
        raise unpaired_error(os.path.join(mask_dir, masks[stem]), "mask", "image", expected, other_images.get(stem),
                             len(lone_masks))
    return [(os.path.join(image_dir, images[stem]), os.path.join(mask_dir, masks[stem])) for stem in sorted(images)]


def colour_code(rgb):
    """One integer per colour of an array [..., 3] of 0..255: (r << 16) | (g << 8) | b."""
    rgb = np.asarray(rgb, dtype=np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


class FolderLabels:
    """The folder layout's masks to train ids: index masks (L, P, 16-bit) through `index_map`, a LabelMap; colour
    masks (RGB) through `colours`, colour -> train id. An unknown colour's error says it is not `described` ("a
    class colour of ROOT/classes.txt") and how to `fix` it ({colour} is filled in); with no colours, a colour
    mask's error says why (`no_colours`)."""

    def __init__(self, index_map, colours, described=None, fix=None, no_colours=None):
        self.index_map, self.described, self.fix, self.no_colours = index_map, described, fix, no_colours
        table = sorted((int(colour_code(colour)), train_id) for colour, train_id in colours.items())
        self.codes = np.array([code for code, _ in table], dtype=np.int64)
        self.train_ids = np.array([train_id for _, train_id in table], dtype=np.uint8)

    def read(self, path):
        """The train ids of the mask file at `path`, checked."""
        values = read_mask_values(path, FOLDER_MODES)
        return self.index_map(values, path) if values.ndim == 2 else self.map_colours(values, path)

    def map_colours(self, rgb, path):
        if not len(self.codes):
            raise SampleError(f"mask {shown(path)} holds RGB colours, but {self.no_colours}")
        codes = colour_code(rgb)
        slots = np.minimum(np.searchsorted(self.codes, codes), len(self.codes) - 1)
        known = self.codes[slots] == codes
        if not known.all():
            y, x = np.unravel_index(np.argmin(known), known.shape)  # the first unknown pixel, row by row
            colour = " ".join(str(int(c)) for c in rgb[y, x])
            others = len(np.unique(codes[~known])) - 1
            more = f" (and {others} more unknown colour{'s' * (others > 1)})" if others else ""
            raise SampleError(f"mask {shown(path)} holds the colour {colour} at pixel x={x}, y={y}{more}, which is not "
                              f"{self.described}: {self.fix.format(colour=colour)}")
        return torch.from_numpy(self.train_ids[slots])


BINARY_LABELS = FolderLabels(
    LabelMap({0: 0, 255: 1}, "0 = background and 255 = foreground of --binary-masks; masks of 0 and 1 are class "
             "indices already: drop the flag"),
    {(0, 0, 0): 0, (255, 255, 255): 1}, "black (background) or white (foreground), as --binary-masks reads them",
    "repaint those pixels black or white")
BINARY_COLOURS = [(0, 0, 0), (255, 255, 255)]


def index_labels(count, source, colours):
    """FolderLabels of `count` classes listed in `source`, with their colours (or None)."""
    index_map = LabelMap({**{i: i for i in range(count)}, IGNORE_INDEX: IGNORE_INDEX},
                         f"class indices 0..{count - 1}, as in {source}, or 255 for void")
    if colours is None:
        return FolderLabels(index_map, {}, no_colours=f"{source} gives the classes no colours: add R G B after each "
                            "class name ('scratch 255 0 0'), or save the masks as class indices (8-bit grayscale PNGs)")
    return FolderLabels(index_map, {colour: i for i, colour in enumerate(colours)}, f"a class colour of {source}",
                        "add a line 'name {colour}' for its class there, or repaint those pixels in a class's colour")


def class_line(text, number, path):
    """(name, colour or None) of line `number` of a classes file: `name` or `name R G B`."""
    words, numbers = text.split(), 0
    while numbers < len(words) and words[-1 - numbers].isdigit():
        numbers += 1
    where = f"line {number} of {shown(path)}, {text.strip()!r},"
    if numbers in (1, 2):
        raise UserError(f"{where} ends in {numbers} number{'s' * (numbers > 1)}: a colour takes three, R G B from 0 "
                        "to 255 (e.g. 'scratch 255 0 0'), and a class name cannot end in a number")
    name, colour = " ".join(words[:-3] if numbers else words), tuple(int(w) for w in words[-3:]) if numbers else None
    if not name:
        raise UserError(f"{where} gives a colour but no class name: write the name first (e.g. 'scratch 255 0 0')")
    if colour and max(colour) > 255:
        raise UserError(f"{where} has a colour value above 255: R, G and B go from 0 to 255")
    return name, colour


def read_classes_file(path):
    """(names, colours or None) of a classes file: one class a line in index order, `name` or `name R G B`;
    blank lines are skipped."""
    names, colours, first_line = [], [], {}
    for number, text in enumerate(text_lines(path, "classes file", "one class name a line"), 1):
        if not text.strip():
            continue
        name, colour = class_line(text, number, path)
        if name in first_line:
            raise UserError(f"line {number} of {shown(path)} names the class {shown(name)} again (first on line "
                            f"{first_line[name]}): list each class once")
        if colours and (colour is None) != (colours[0] is None):
            gives, does = ("no colour", "does") if colour is None else ("a colour", "does not")
            raise UserError(f"line {number} of {shown(path)} gives {gives}, but line {min(first_line.values())} "
                            f"{does}: give every class a colour (R G B) or none")
        if colour is not None and colour in colours:
            other = names[colours.index(colour)]
            raise UserError(f"line {number} of {shown(path)} gives {shown(name)} the colour of {shown(other)}, "
                            f"{' '.join(map(str, colour))}: colour masks could not tell them apart; give each class "
                            "its own colour")
        first_line[name] = number
        names.append(name)
        colours.append(colour)
    if not 2 <= len(names) < IGNORE_INDEX:
        raise UserError(f"classes file {shown(path)} lists {len(names)} class{'es' * (len(names) != 1)}: a segmenter "
                        f"needs 2 to {IGNORE_INDEX} (mask value 255 is void), one name a line in index order "
                        "(e.g. background, then your classes)")
    return names, None if colours[0] is None else colours


@functools.lru_cache(maxsize=8)
def classes_from_file(path, binary_masks, stamp):
    """(names, palette, labels) of a classes file; `stamp` is its identity and times, so that an edit is read
    again. Printed once per process."""
    names, colours = read_classes_file(path)
    if binary_masks and len(names) != 2:
        raise UserError(f"--binary-masks reads two classes, background and foreground, but {shown(path)} lists "
                        f"{len(names)}: list two, or drop --binary-masks")
    listed = ", ".join(f"{i} {name}" + (f" ({' '.join(map(str, colours[i]))})" if colours else "")
                       for i, name in enumerate(names))
    print0(f"classes of {shown(path)}{' (--binary-masks)' if binary_masks else ''}: {listed}")
    palette = colours or (BINARY_COLOURS if binary_masks else [voc_colour(i) for i in range(len(names))])
    labels = BINARY_LABELS if binary_masks else index_labels(len(names), shown(path), colours)
    return tuple(names), tuple(palette), labels


def mask_listing(root):
    """The mask files of train/ and val/ with their folders' identity and times: what their values depend on
    within a process (a mask rewritten in place leaves its folder's times as they were)."""
    listing = []
    for split in ("train", "val"):
        folder = os.path.join(root, split, "masks")
        require_folders(FOLDER_LAYOUT, folder)
        info = os.stat(folder)
        names = tuple(sorted(folder_files(folder, "mask")[0].values()))
        listing.append((folder, info.st_ino, info.st_ctime_ns, info.st_mtime_ns, names))
    return tuple(listing)


def mask_values_found(listing):
    """(values present in the readable masks of `listing`, masks read); a colour mask is refused, an unreadable
    mask skipped (training or tools/check_data.py reports it when it reads it)."""
    found, read = np.zeros(256, dtype=bool), 0
    for folder, *_, names in listing:
        for name in names:
            path = os.path.join(folder, name)
            try:
                values = read_mask_values(path, FOLDER_MODES)
            except SampleError:
                continue
            if values.ndim == 3:
                root = os.path.dirname(os.path.dirname(folder))
                classes_file = shown(os.path.join(root, "classes.txt"))
                raise UserError(f"mask {shown(path)} holds RGB colours, and there is no {classes_file} to map them "
                                "to classes: write one with a line 'name R G B' per class in index order "
                                "(--classes-file names another file), or save the masks as class indices (black and "
                                "white masks: --binary-masks)")
            present = values_present(values)
            found[present[(present >= 0) & (present < 256)]] = True  # others are refused when the mask is read
            read += 1
    return [int(v) for v in np.flatnonzero(found)], read


@functools.lru_cache(maxsize=8)
def classes_from_masks(root, listing):
    """(names, palette, labels) from the values of every mask of `listing` (mask_listing), which must be 0..K-1
    and 255 (void); read once per process while the listing stays as it is."""
    started = time.perf_counter()
    values, read = mask_values_found(listing)
    classes, where = [v for v in values if v != IGNORE_INDEX], shown(os.path.join(root, "{train,val}", "masks"))
    listed = ", ".join(map(str, values))
    if classes == [0] and IGNORE_INDEX in values:
        raise UserError(f"the masks in {where} hold only the values 0 and 255, and 255 is void (unlabelled): that "
                        "leaves one class; binary masks (0 = background, 255 = foreground) need --binary-masks, "
                        f"masks of other classes list them in {shown(os.path.join(root, 'classes.txt'))}")
    name_them = f"name the classes in {shown(os.path.join(root, 'classes.txt'))}, one a line in index order"
    if len(classes) < 2:
        raise UserError(f"the masks in {where} hold only the values {listed} (255 = void): a segmenter needs 2 "
                        f"classes or more; {name_them}, or check the masks")
    if classes != list(range(len(classes))):
        missing = ", ".join(str(v) for v in range(classes[-1]) if v not in classes)
        raise UserError(f"the masks in {where} hold the values {listed}: read as class indices 0..{classes[-1]} "
                        f"(255 = void), {missing} occur in no mask; {name_them}, or remap the masks to "
                        f"0..{len(classes) - 1}")
    print0(f"note: no classes.txt in {shown(root)}: the classes are the values of its {read:,} masks (read in "
           f"{time.perf_counter() - started:.1f} s), {len(classes)} classes named by index 0..{len(classes) - 1}"
           f"{', 255 void' if IGNORE_INDEX in values else ''}; a classes.txt there, one name a line in index order, "
           "names them and skips this reading")
    names = [str(i) for i in classes]
    labels = index_labels(len(names), "the masks of train/ and val/", None)
    return tuple(names), tuple(voc_colour(i) for i in classes), labels


def folder_classes(root, classes_file, binary_masks):
    """(names, palette, labels): from `classes_file` or ROOT/classes.txt, else black and white with
    --binary-masks, else from the masks' values."""
    if classes_file is not None and not os.path.isfile(classes_file):
        raise UserError(f"--classes-file {shown(classes_file)} not found: give a text file with one class name a "
                        "line, in index order")
    path = classes_file or os.path.join(root, "classes.txt")
    if os.path.isfile(path):
        info = os.stat(path)
        return classes_from_file(path, binary_masks, (info.st_ino, info.st_mtime_ns, info.st_size))
    if binary_masks:
        return ("background", "foreground"), tuple(BINARY_COLOURS), BINARY_LABELS
    return classes_from_masks(root, mask_listing(root))


def folder_split(root, split, transforms=None, classes_file=None, binary_masks=False):
    """ROOT/<split>/images/ and ROOT/<split>/masks/, an image and its mask sharing a file name stem."""
    split = split_folder_name(split, {"train": "train", "val": "val"})
    image_dir, mask_dir = os.path.join(root, split, "images"), os.path.join(root, split, "masks")
    require_folders(FOLDER_LAYOUT, image_dir, mask_dir)
    files = folder_pairs(image_dir, mask_dir)
    require_images(files, image_dir)
    names, palette, labels = folder_classes(root, classes_file, binary_masks)
    return SegmentationFiles(files, [image_stem(image) for image, _ in files], list(names), list(palette),
                             [labels] * len(files), transforms)
