"""Sort ImageNet's validation images, which come as 50,000 JPEGs in one folder, into one folder per class (its WordNet
id, as train/'s folders are named), the layout the train and eval scripts read.

    python tools/sort_imagenet_val.py /data/imagenet/val LOC_val_solution.csv
    python tools/sort_imagenet_val.py /data/imagenet/val ILSVRC2012_devkit_t12.tar.gz   # needs scipy

The labels come from either file ImageNet is published with: LOC_val_solution.csv (the Kaggle download; plain CSV,
rows `ILSVRC2012_val_00000001,n01751748 ...`), or the ILSVRC2012 devkit (the .tar.gz or its extracted folder),
whose data/ILSVRC2012_validation_ground_truth.txt numbers the classes of data/meta.mat, a MATLAB file that scipy
reads: pip install -r requirements-imagenet.txt.

Every image is checked to have a label before any is moved; images are moved (renamed) within the folder, so a
run that stops half-way can be run again to finish.
"""
import argparse
import csv
import io
import os
import re
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

from common.data import reason, shown
from common.log import UserError, run_cli

WNID = re.compile(r"n\d{8}")
DEVKIT_FILES = ("data/meta.mat", "data/ILSVRC2012_validation_ground_truth.txt")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("val_dir", help="the folder of validation images (ILSVRC2012_val_00000001.JPEG, ...)")
    p.add_argument("labels", help="LOC_val_solution.csv, or the devkit: ILSVRC2012_devkit_t12.tar.gz or its folder")
    return p


def labels_from_csv(path):
    """{image id: WordNet id} from LOC_val_solution.csv: the first word of each row's PredictionString."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {shown(path)} ({reason(e)}): give LOC_val_solution.csv as downloaded") from None
    if not rows or rows[0][:2] != ["ImageId", "PredictionString"]:
        raise UserError(f"{shown(path)} does not start with the header ImageId,PredictionString of "
                        "LOC_val_solution.csv: give that file, or the devkit")
    labels = {}
    for number, row in enumerate(rows[1:], 2):
        wnid = row[1].split()[0] if len(row) >= 2 and row[1].split() else ""
        if not WNID.fullmatch(wnid):
            raise UserError(f"{shown(path)} line {number} names no WordNet id (n01440764 or the like): {row!r}")
        labels[row[0]] = wnid
    return labels


def devkit_file(devkit, name):
    """The bytes of a devkit file, from the .tar.gz or its extracted folder."""
    try:
        if os.path.isdir(devkit):
            with open(os.path.join(devkit, name), "rb") as f:
                return f.read()
        with tarfile.open(devkit) as archive:
            member = next((m for m in archive.getmembers() if m.name.endswith("/" + name) or m.name == name), None)
            if member is None:
                raise FileNotFoundError(f"no {name} in the archive")
            return archive.extractfile(member).read()
    except (OSError, tarfile.TarError) as e:
        raise UserError(f"cannot read {name} of the devkit {shown(devkit)} ({reason(e)}): give "
                        "ILSVRC2012_devkit_t12.tar.gz as downloaded, or its extracted folder") from None


def labels_from_devkit(devkit):
    """{image id: WordNet id} from the devkit: ground-truth line k is the ILSVRC2012_ID of image k, which
    meta.mat's synsets map to WordNet ids."""
    try:
        from scipy.io import loadmat  # only this path needs scipy
    except ImportError:
        raise UserError("reading the devkit's meta.mat needs scipy: pip install -r requirements-imagenet.txt, or "
                        "give LOC_val_solution.csv instead") from None
    synsets = loadmat(io.BytesIO(devkit_file(devkit, DEVKIT_FILES[0])), squeeze_me=True)["synsets"]
    wnid_of = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    truth = devkit_file(devkit, DEVKIT_FILES[1]).decode().split()
    try:
        return {f"ILSVRC2012_val_{k:08d}": wnid_of[int(class_id)] for k, class_id in enumerate(truth, 1)}
    except (KeyError, ValueError) as e:
        raise UserError(f"the devkit's ground truth names a class its meta.mat lacks ({reason(e)}): give the "
                        "ILSVRC2012 devkit as downloaded") from None


def main(args):
    if not os.path.isdir(args.val_dir):
        raise UserError(f"{shown(args.val_dir)} is not a folder: give the folder of validation images")
    is_csv = args.labels.lower().endswith(".csv")
    labels = labels_from_csv(args.labels) if is_csv else labels_from_devkit(args.labels)
    images = sorted(entry.name for entry in os.scandir(args.val_dir)
                    if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS))
    unlabelled = [name for name in images if os.path.splitext(name)[0] not in labels]
    if unlabelled:
        raise UserError(f"{len(unlabelled)} images of {shown(args.val_dir)} have no label in {shown(args.labels)} "
                        f"(e.g. {shown(unlabelled[0])}): nothing was moved; remove them, or give the label file of "
                        "these images")
    already = sum(1 for entry in os.scandir(args.val_dir) if entry.is_dir() for _ in os.scandir(entry.path))
    for name in images:
        folder = os.path.join(args.val_dir, labels[os.path.splitext(name)[0]])
        os.makedirs(folder, exist_ok=True)
        os.replace(os.path.join(args.val_dir, name), os.path.join(folder, name))
    classes = len({labels[os.path.splitext(name)[0]] for name in images})
    missing = len(labels) - len(images) - already
    print(f"moved {len(images):,} images into {classes:,} class folders of {shown(args.val_dir)}"
          + (f" ({already:,} were sorted before)" if already else "")
          + (f"; note: {missing:,} labelled images are in neither" if missing > 0 else ""))


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
