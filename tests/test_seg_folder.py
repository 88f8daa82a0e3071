"""The folder layout of segmentation (--dataset folder): ROOT/{train,val}/{images,masks}/ paired by stem, classes
from classes.txt or the masks' values, index, colour and binary masks; read on tiny trees in that layout."""
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from common.log import SampleError, UserError
from conftest import SCENES, SCENES_RUN, evaluate_segmentation, train_segmentation, write_image
from segmentation.data import DATASETS, folder, open_split
from segmentation.datasets import voc_colour

WIDTH, HEIGHT = 24, 16
COLOURS = {"background": (0, 0, 0), "scratch": (255, 0, 0), "dent": (0, 0, 255)}
CLASSES_TXT = "".join(f"{name} {r} {g} {b}\n" for name, (r, g, b) in COLOURS.items())
# What a UNet needs to train a step on the tiny trees.
FOLDER_RUN = ["--dataset", "folder", "--model", "unet", "--unet-width", "4", "--device", "cpu", "-b", "2", "-j", "0",
              "--epochs", "1", "--base-size", "16", "--crop-size", "16", "--print-freq", "1"]


def grid(values):
    """An uint8 [HEIGHT, WIDTH] array holding `values` over and over, row by row."""
    return np.resize(np.array(values, dtype=np.uint8), (HEIGHT, WIDTH))


def coloured(indices, colours=tuple(COLOURS.values())):
    """An RGB mask [H, W, 3] painting each index in its colour."""
    return np.array(colours, dtype=np.uint8)[indices]


def write_sample(root, split, stem, mask, image_ext="jpg", seed=0):
    """An image and its mask: 2-D values as an 8-bit grayscale PNG, [H, W, 3] as an RGB PNG."""
    write_image(root / split / "images" / f"{stem}.{image_ext}", size=(WIDTH, HEIGHT), seed=seed)
    path = root / split / "masks" / f"{stem}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)
    return path


def folder_tree(root, masks=None, classes_txt=None):
    """Three training and two validation samples; by default index masks of classes 0, 1, 2 and void."""
    masks = masks or [grid([0, 1, 2, 255])] * 5
    for i, mask in enumerate(masks):
        split, stem = ("train", f"t{i}") if i < 3 else ("val", f"v{i}")
        write_sample(root, split, stem, mask, image_ext=("jpg", "png", "bmp")[i % 3], seed=i)
    if classes_txt is not None:
        (root / "classes.txt").write_text(classes_txt)
    return root


# --- layout and pairing


def test_images_and_masks_pair_by_stem_in_any_image_format(tmp_path):
    root = folder_tree(tmp_path, classes_txt="background\nscratch\ndent\n")
    (root / "train" / "images" / ".DS_Store").write_bytes(b"\0")  # hidden files and other files are not images
    (root / "train" / "images" / "notes.txt").write_text("labelled by hand")
    train = folder(root, "train")
    assert train.names == ["t0", "t1", "t2"] and [image.rsplit(".", 1)[1] for image, _ in train.files] == [
        "jpg", "png", "bmp"]
    image, mask = train[1]
    assert image.shape == (3, HEIGHT, WIDTH) and image.dtype == mask.dtype == torch.uint8
    np.testing.assert_array_equal(mask.numpy(), grid([0, 1, 2, 255]))
    assert torch.equal(train.read_mask(1), mask.as_subclass(torch.Tensor))
    assert train.class_names == ["background", "scratch", "dent"]
    assert train.palette == [voc_colour(i) for i in range(3)]  # no colours given: VOC's, one per class
    assert folder(root, "val").names == ["v3", "v4"]


def test_the_folder_defaults_live_with_its_entry(tmp_path):
    from segmentation import train as script
    assert set(DATASETS) == {"cityscapes", "voc", "ade20k", "folder"}
    args = script.finish_args(script.get_args_parser().parse_args(["--dataset", "folder", "--data-path", "x"]))
    assert (args.base_size, args.crop_size) == (512, [512, 512]) and args.binary_masks is False
    cityscapes = script.finish_args(script.get_args_parser().parse_args(["--dataset", "cityscapes", "--data-path", "x"]))
    assert (cityscapes.base_size, cityscapes.crop_size) == (1024, [512, 1024])


def test_an_image_without_a_mask_and_a_mask_without_an_image_name_both_paths(tmp_path):
    root = folder_tree(tmp_path)
    at = re.escape(str(root))
    write_image(root / "train" / "images" / "lone.jpg")
    (root / "train" / "masks" / "lone.heic").write_bytes(b"\0")
    with pytest.raises(UserError, match=rf"^image {at}/train/images/lone\.jpg has no mask: expected "
                                        rf"{at}/train/masks/lone\.png; lone\.heic is there, in a format Pillow does "
                                        r"not read \(add the mask or remove the image\)$"):
        folder(root, "train")
    (root / "train" / "images" / "lone.jpg").unlink()
    write_sample(root, "val", "only", grid([0]))
    (root / "val" / "images" / "only.jpg").unlink()
    write_sample(root, "val", "also", grid([0]))
    (root / "val" / "images" / "also.jpg").unlink()
    with pytest.raises(UserError, match=rf"^mask {at}/val/masks/also\.png has no image: expected {at}/val/images/"
                                        r"also\.\* \(\.jpg, \.png or another image format Pillow reads\) \(add the "
                                        r"image or remove the mask; 1 more mask lacks one\)$"):
        folder(root, "val")
    assert len(folder(root, "train")) == 3


def test_two_images_of_one_stem_and_missing_folders(tmp_path):
    root = folder_tree(tmp_path)
    write_image(root / "train" / "images" / "t0.png")
    with pytest.raises(UserError, match=r"images t0\.(jpg|png) and t0\.(jpg|png) in .*train/images share the stem t0"):
        folder(root, "train")
    with pytest.raises(UserError, match=r"folder .*nowhere/val/images not found: a folder root holds "
                                        r"\{train,val\}/images/ and \{train,val\}/masks/"):
        folder(tmp_path / "nowhere", "val")


# --- classes.txt


def test_colour_masks_map_through_the_colours_of_classes_txt(tmp_path):
    indices = grid([0, 1, 2, 1])
    root = folder_tree(tmp_path, masks=[coloured(indices)] * 4 + [grid([2, 0, 255])], classes_txt=CLASSES_TXT)
    train, val = folder(root, "train"), folder(root, "val")
    np.testing.assert_array_equal(train[0][1].numpy(), indices)
    np.testing.assert_array_equal(val.read_mask(1).numpy(), grid([2, 0, 255]))  # index masks still read as indices
    assert train.class_names == list(COLOURS) and train.palette == list(COLOURS.values())
    rgba = np.concatenate([coloured(indices), np.full((HEIGHT, WIDTH, 1), 255, np.uint8)], axis=2)
    Image.fromarray(rgba).save(root / "train" / "masks" / "t2.png")
    np.testing.assert_array_equal(train.read_mask(2).numpy(), indices)  # alpha dropped


def test_an_unknown_colour_names_the_file_the_colour_and_a_pixel(tmp_path):
    mask = coloured(grid([0, 1]))
    mask[5, 7], mask[6, 2] = (0, 255, 0), (9, 9, 9)
    root = folder_tree(tmp_path, masks=[coloured(grid([0]))] + [mask] * 4, classes_txt=CLASSES_TXT)
    at = re.escape(str(root))
    with pytest.raises(SampleError, match=rf"^mask {at}/train/masks/t1\.png holds the colour 0 255 0 at pixel x=7, "
                                          rf"y=5 \(and 1 more unknown colour\), which is not a class colour of "
                                          rf"{at}/classes\.txt: add a line 'name 0 255 0' for its class there, or "
                                          r"repaint those pixels in a class's colour$"):
        folder(root, "train").read_mask(1)


def test_colour_masks_need_colours(tmp_path):
    root = folder_tree(tmp_path, masks=[coloured(grid([0, 1, 2]))] * 5)
    at = re.escape(str(root))
    with pytest.raises(UserError, match=rf"mask {at}/train/masks/t0\.png holds RGB colours, and there is no "
                                        rf"{at}/classes\.txt to map them to classes: write one with a line "
                                        r"'name R G B' per class"):
        folder(root, "train")
    (root / "classes.txt").write_text("background\nscratch\ndent\n")
    with pytest.raises(SampleError, match=r"t0\.png holds RGB colours, but .*classes\.txt gives the classes no "
                                          r"colours: add R G B after each class name"):
        folder(root, "train")[0]


def test_classes_file_flag_names_another_file(tmp_path):
    root = folder_tree(tmp_path, masks=[grid([0, 1])] * 5)
    (tmp_path / "mine.txt").write_text("sky\ngrass\n")
    flags = {"classes_file": str(tmp_path / "mine.txt")}
    assert open_split("folder", root, "train", flags).class_names == ["sky", "grass"]
    with pytest.raises(UserError, match=r"--classes-file .*gone\.txt not found: give a text file"):
        open_split("folder", root, "train", {"classes_file": str(tmp_path / "gone.txt")})
    with pytest.raises(UserError, match=r"--classes-file is an option of --dataset folder, not of --dataset voc: "
                                        r"drop it"):
        open_split("voc", root, "train", flags)


@pytest.mark.parametrize("text, says", [
    ("background\nscratch 255 0\n", r"line 2 of .*classes\.txt, 'scratch 255 0', ends in 2 numbers: a colour takes "
                                    r"three, R G B from 0 to 255"),
    ("background 0 0 0\nscratch 256 0 0\n", r"line 2 of .*classes\.txt, 'scratch 256 0 0', has a colour value "
                                            r"above 255"),
    ("background\nscratch\n\ndent\nscratch\n", r"line 5 of .*classes\.txt names the class scratch again \(first on "
                                               r"line 2\): list each class once"),
    ("", r"classes file .*classes\.txt lists 0 classes: a segmenter needs 2 to 255"),
    ("background\n", r"classes file .*classes\.txt lists 1 class: a segmenter needs 2 to 255"),
    ("background 0 0 0\nscratch\n", r"line 2 of .*classes\.txt gives no colour, but line 1 does: give every class a "
                                    r"colour \(R G B\) or none"),
    ("background 0 0 0\nscratch 0 0 0\n", r"line 2 of .*classes\.txt gives scratch the colour of background, 0 0 0: "
                                          r"colour masks could not tell them apart"),
    ("255 0 0\n", r"line 1 of .*classes\.txt, '255 0 0', gives a colour but no class name"),
])
def test_a_bad_classes_txt_line_is_one_error_naming_its_line(tmp_path, text, says):
    root = folder_tree(tmp_path, classes_txt=text)
    with pytest.raises(UserError, match=says):
        folder(root, "train")


def test_names_with_spaces_and_crlf_in_classes_txt(tmp_path):
    root = folder_tree(tmp_path, classes_txt="\ufeffbackground 0 0 0\r\ntraffic light 250 170 30\r\ngrade 3 9 9 9\r\n")
    dataset = folder(root, "train")
    assert dataset.class_names == ["background", "traffic light", "grade 3"]
    assert dataset.palette == [(0, 0, 0), (250, 170, 30), (9, 9, 9)]


# --- classes from the masks' values, binary masks


def test_without_classes_txt_the_classes_are_the_masks_values_read_once(tmp_path, capsys):
    root = folder_tree(tmp_path, masks=[grid([0, 1, 255])] * 4 + [grid([2, 0])])  # class 2 only in val
    train, val = folder(root, "train"), folder(root, "val")
    assert train.class_names == val.class_names == ["0", "1", "2"]
    out = capsys.readouterr().out
    assert out.count("note: no classes.txt in") == 1  # both splits, one reading
    assert "the classes are the values of its 5 masks" in out and "3 classes named by index 0..2, 255 void" in out
    write_sample(root, "val", "v9", grid([0, 1, 5]))  # a new file: read again
    with pytest.raises(UserError, match=r"the masks in .*\{train,val\}/masks hold the values 0, 1, 2, 5, 255: read as "
                                        r"class indices 0..5 \(255 = void\), 3, 4 occur in no mask; name the classes "
                                        r"in .*classes\.txt"):
        folder(root, "train")


def test_masks_of_0_and_255_ask_for_binary_masks(tmp_path):
    root = folder_tree(tmp_path, masks=[grid([0, 255, 255])] * 5)
    with pytest.raises(UserError, match=r"the masks in .* hold only the values 0 and 255, and 255 is void "
                                        r"\(unlabelled\): that leaves one class; binary masks \(0 = background, 255 = "
                                        r"foreground\) need --binary-masks"):
        folder(root, "train")
    train = folder(root, "train", binary_masks=True)
    assert train.class_names == ["background", "foreground"] and train.palette == [(0, 0, 0), (255, 255, 255)]
    np.testing.assert_array_equal(train.read_mask(0).numpy(), grid([0, 1, 1]))
    Image.fromarray(coloured(grid([0, 1]), [(0, 0, 0), (255, 255, 255)])).save(root / "train" / "masks" / "t1.png")
    Image.fromarray(grid([0, 255]) > 0).save(root / "train" / "masks" / "t2.png")  # a 1-bit PNG
    assert Image.open(root / "train" / "masks" / "t2.png").mode == "1"
    for i in (1, 2):
        np.testing.assert_array_equal(train.read_mask(i).numpy(), grid([0, 1]))
    Image.fromarray(coloured(grid([0, 1]), [(0, 0, 0), (250, 250, 250)])).save(root / "train" / "masks" / "t1.png")
    with pytest.raises(SampleError, match=r"t1\.png holds the colour 250 250 250 at pixel x=1, y=0, which is not "
                                          r"black \(background\) or white \(foreground\), as --binary-masks reads "
                                          r"them: repaint those pixels black or white$"):
        train.read_mask(1)
    Image.fromarray(grid([0, 1])).save(root / "train" / "masks" / "t1.png")
    with pytest.raises(SampleError, match=r"t1\.png holds values that are not allowed: 1 \(allowed: 0 = background "
                                          r"and 255 = foreground of --binary-masks; masks of 0 and 1 are class "
                                          r"indices already: drop the flag\)"):
        train.read_mask(1)
    (root / "classes.txt").write_text("good\nscratched\n")
    assert folder(root, "train", binary_masks=True).class_names == ["good", "scratched"]
    (root / "classes.txt").write_text("good\nscratched\ndented\n")
    with pytest.raises(UserError, match=r"--binary-masks reads two classes, background and foreground, but "
                                        r".*classes\.txt lists 3: list two, or drop --binary-masks"):
        folder(root, "train", binary_masks=True)


# --- the scripts on a folder set


def test_check_data_reports_a_bad_mask_of_a_folder_set(tmp_path, capsys):
    from test_data_at_scale import check_data
    mask = coloured(grid([0, 1]))
    mask[0, 3] = (1, 2, 3)
    root = folder_tree(tmp_path, masks=[coloured(grid([0, 1, 2]))] * 2 + [mask, grid([0, 7]), grid([1])],
                       classes_txt=CLASSES_TXT)
    out = check_data(capsys, "--dataset", "folder", "--data-path", root, "-j", "0")
    assert "bad: mask" in out and "t2.png holds the colour 1 2 3 at pixel x=3, y=0" in out
    assert "v3.png holds values that are not allowed: 7" in out
    assert "train: 3 samples, 1 bad files (train 1)" in out and "val: 2 samples, 1 bad files (val 1)" in out


def test_a_folder_set_trains_on_both_backends_resumes_and_evaluates_in_its_colours(tmp_path, capsys, monkeypatch):
    from segmentation import train as script
    real_save = script.Checkpointer.save_on_all_ranks

    def save(self, epoch, step=None, **kwargs):  # keeps the checkpoint of the first epoch
        real_save(self, epoch, step, **kwargs)
        if epoch == 0 and self.output_dir == str(tmp_path / "straight"):
            shutil.copy(tmp_path / "straight" / "checkpoint.pth", tmp_path / "resumed" / "checkpoint.pth")
    monkeypatch.setattr(script.Checkpointer, "save_on_all_ranks", save)
    (tmp_path / "resumed").mkdir()
    indices = [grid(np.roll([0, 1, 2, 1], k)) for k in range(8)]
    root = folder_tree(tmp_path / "data", masks=[coloured(m) for m in indices[:5]], classes_txt=CLASSES_TXT)
    for i in range(3, 6):  # 6 training images, 2 validation ones
        write_sample(root, "train", f"u{i}", coloured(indices[i]), seed=10 + i)
    Image.fromarray(grid([0, 9])).save(root / "train" / "masks" / "u5.png")  # skipped by --max-bad-samples
    flags = [*FOLDER_RUN, "--data-path", root, "--use-deterministic-algorithms", "--max-bad-samples", "1"]
    train_segmentation(*flags, "--epochs", "2", "--data-backend", "gpu", "--output-dir", tmp_path / "gpu")
    assert "u5.png holds values that are not allowed: 9" in (tmp_path / "gpu" / "bad_samples.txt").read_text()
    out = capsys.readouterr().out
    assert out.count(f"classes of {root}/classes.txt: 0 background (0 0 0), 1 scratch (255 0 0)") == 1  # read once
    train_segmentation(*flags, "--epochs", "2", "--output-dir", tmp_path / "straight")
    capsys.readouterr()
    train_segmentation(*flags, "--epochs", "2", "--output-dir", tmp_path / "resumed", "--resume", "auto")
    assert "resumed from" in capsys.readouterr().out
    straight, resumed = (torch.load(tmp_path / run / "checkpoint.pth", weights_only=True)
                         for run in ("straight", "resumed"))
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
    assert straight["class_names"] == list(COLOURS) and straight["palette"] == list(COLOURS.values())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "straight" / "tb"), size_guidance={"images": 0}).Reload()
    assert {"val_examples/0", "val_examples/1"} <= set(events.Tags()["images"])

    evaluate_segmentation("--checkpoint", tmp_path / "straight" / "checkpoint.pth", "--device", "cpu", "-j", "0",
                          "--eval-mode", "slide", "--eval-crop", "16", "--eval-scales", "0.75,1.0", "--eval-flip",
                          "--save-predictions", tmp_path / "predictions", "--output-json", tmp_path / "scores.json")
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["num_images"] == 2 and list(scores["per_class_iou"]) == list(COLOURS)
    picture = Image.open(tmp_path / "predictions" / "color" / "v3.png")
    assert picture.mode == "P" and picture.size == (WIDTH, HEIGHT)
    assert picture.getpalette()[:9] == [c for colour in COLOURS.values() for c in colour]
    train_segmentation("--test-only", "--resume", tmp_path / "straight" / "checkpoint.pth", "--device", "cpu",
                       "-j", "0", "--output-dir", tmp_path / "test")  # the data settings from the checkpoint
    tested = capsys.readouterr().out
    assert "Test: mIoU" in tested and "on 2 images" in tested


def write_scenes(root, split, images, masks):
    for i, (image, mask) in enumerate(zip(images, masks)):
        for folder_name, picture in (("images", image.permute(1, 2, 0)), ("masks", mask)):
            (root / split / folder_name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(picture.numpy()).save(root / split / folder_name / f"{i:04d}.png")


@pytest.mark.xdist_group("scenes-learned")  # with test_segmentation.py's learning bar, which reads the same run
def test_a_folder_set_learns_as_well_as_the_built_in_scenes_it_holds(tmp_path, monkeypatch, scenes_learned):
    from segmentation import data
    from test_segmentation import log_of
    size, classes, train_size, val_size = SCENES["size"], SCENES["classes"], SCENES["train_size"], SCENES["val_size"]
    write_scenes(tmp_path / "scenes", "train", *data.make_scenes(train_size, size, classes))
    write_scenes(tmp_path / "scenes", "val", *data.make_scenes(val_size, size, classes, split="val"))
    run = SCENES_RUN  # scenes_learned: this run on the built-in set
    # The same images in the same order, the same model and epochs. The built-in set's loader flips and does
    # nothing more, so the files get flips alone too: scale 1, crops of the whole image, no colour jitter.
    monkeypatch.setattr(data, "COLOUR_JITTER", 0.0)
    train_segmentation(*run, "--dataset", "folder", "--data-path", tmp_path / "scenes", "--base-size", size,
                       "--crop-size", size, "--scale-range", 1, 1, "-j", "1", "--output-dir", tmp_path / "files")
    built_in, files = (log_of(out)[-1]["val_miou"] for out in (scenes_learned, tmp_path / "files"))
    assert built_in > 60  # background everywhere scores about 30
    # "At least", within the noise of 2 epochs: two such runs that differ only in which samples are flipped, or
    # only in float rounding (bytes normalised at once, or after scaling to 0..1), ended 0 to 5.3 points apart
    # (measured over 4 seeds on 800 to 1200 images; 0 here). Files read wrongly cost tens of points.
    assert files >= built_in - 6, (files, built_in)
