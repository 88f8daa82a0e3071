"""classification/predict.py and segmentation/predict.py: on a labelled set their outputs score what eval.py
scores; unreadable images are listed and skipped; every image is predicted once, also under torchrun."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from common.log import UserError
from common.metrics import ConfusionMatrix
from conftest import evaluate, evaluate_segmentation, torchrun, train, train_segmentation, write_image, write_tree
from test_segmentation import write_cityscapes


def predict_classes(*argv):
    from classification import predict as script
    script.main(script.get_args_parser().parse_args([str(a) for a in argv]))


def predict_segmentation(*argv):
    from segmentation import predict as script
    script.main(script.get_args_parser().parse_args([str(a) for a in argv]))


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """(data tree, checkpoint) of a ResNet-18 trained a few steps on 3 classes of 32-pixel images: a low learning
    rate, so that its predictions still differ from image to image."""
    root = tmp_path_factory.mktemp("classifier")
    data = write_tree(root / "data")
    train("--data-path", data, "--model", "resnet18", "--device", "cpu", "-b", "4", "-j", "0", "--epochs", "1",
          "--lr", "0.002", "--lr-warmup-epochs", "0", "--train-crop-size", "32", "--val-resize-size", "36",
          "--val-crop-size", "32", "--print-freq", "100", "--output-dir", root / "run")
    return data, root / "run" / "checkpoint.pth"


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    """(Cityscapes tree of 64x32 frames, checkpoint) of a UNet trained an epoch at --base-size 16. On two frames of
    noise it learns to predict one class everywhere: with sharper batch-norm statistics its predictions vary from
    pixel to pixel, so that equal scores say something."""
    root = tmp_path_factory.mktemp("segmenter")
    data = write_cityscapes(root / "cityscapes")
    train_segmentation("--dataset", "cityscapes", "--data-path", data, "--model", "unet", "--unet-width", "4",
                       "--device", "cpu", "-b", "2", "-j", "0", "--epochs", "1", "--crop-size", "32", "64",
                       "--base-size", "16", "--output-dir", root / "run")
    checkpoint = torch.load(root / "run" / "checkpoint.pth", weights_only=True)
    for name, value in checkpoint["model"].items():
        if name.endswith("running_var"):
            value.fill_(0.01)
    torch.save(checkpoint, root / "sharp.pth")
    return data, root / "sharp.pth"


def test_classes_in_the_csv_score_what_eval_scores(classifier, tmp_path, capsys):
    data, checkpoint = classifier
    evaluate("--checkpoint", checkpoint, "--device", "cpu", "-j", "0", "--output-json", tmp_path / "eval.json")
    predict_classes("--checkpoint", checkpoint, data / "val", "--device", "cpu", "-j", "0", "-o", tmp_path / "out",
                    "--sort-into", "link")
    header, *rows = read_csv(tmp_path / "out" / "predictions.csv")
    assert header == ["path", "class_1", "probability_1", "class_2", "probability_2", "class_3", "probability_3"]
    assert [row[0] for row in rows] == sorted(str(path) for path in (data / "val").rglob("*.jpg"))
    right = sum(row[1] == row[0].split("/")[-2] for row in rows)
    assert 100 * (right / len(rows)) == json.loads((tmp_path / "eval.json").read_text())["acc1"]
    assert len({row[1] for row in rows}) > 1  # a model that tells images apart
    chances = np.array([[float(p) for p in row[2::2]] for row in rows])
    assert (np.diff(chances, axis=1) <= 0).all() and np.allclose(chances.sum(1), 1, atol=1e-5)
    for row in rows:  # --sort-into link: OUT/<predicted class>/<path under the input folder>
        link = tmp_path / "out" / row[1] / "/".join(row[0].split("/")[-2:])
        assert link.is_symlink() and link.resolve() == (data / "val").joinpath(*row[0].split("/")[-2:])
    assert "wrote the predictions of 9 images to" in capsys.readouterr().out


def test_sorting_again_leaves_no_image_in_the_folder_of_its_old_class(classifier, tmp_path):
    data, checkpoint = classifier
    stale = tmp_path / "out" / "zebra" / "cat" / "0.jpg"  # an earlier model's class for this image
    stale.parent.mkdir(parents=True)
    stale.symlink_to(data / "val" / "cat" / "0.jpg")
    (tmp_path / "out" / ".sorted_folders").write_text("zebra\n")
    (tmp_path / "out" / "notes").mkdir()  # the user's own: not touched
    predict_classes("--checkpoint", checkpoint, data / "val", "--device", "cpu", "-j", "0", "-o", tmp_path / "out",
                    "--sort-into", "copy")
    sorted_images = [path for path in (tmp_path / "out").rglob("*.jpg")]
    assert len(sorted_images) == 9 and not stale.parent.exists() and (tmp_path / "out" / "notes").is_dir()


@pytest.mark.parametrize("flags", [[], ["--base-size", "32", "--eval-mode", "slide", "--eval-crop", "16",
                                        "--eval-stride", "8"]], ids=["whole-resized", "slide-native"])
def test_written_masks_score_what_eval_scores(segmenter, tmp_path, flags):
    from segmentation.data import open_split
    data, checkpoint = segmenter
    evaluate_segmentation("--checkpoint", checkpoint, "--device", "cpu", "-j", "0", *flags,
                          "--output-json", tmp_path / "eval.json")
    predict_segmentation("--checkpoint", checkpoint, data / "leftImg8bit" / "val", "--device", "cpu", "-j", "0",
                         *flags, "-o", tmp_path / "out")
    confusion = ConfusionMatrix(19, ignore_index=255)
    val_set = open_split("cityscapes", data, "val", {})
    for (image_path, _), (image, target) in zip(val_set.files, val_set):
        name = image_path.split("/")[-1].removesuffix(".png")
        mask = Image.open(tmp_path / "out" / "masks" / "aachen" / f"{name}.png")
        assert mask.mode == "P" and mask.size == (64, 32) and mask.getpalette()[3:6] == [244, 35, 232]  # sidewalk
        predicted = torch.from_numpy(np.array(mask)).long()
        assert len(predicted.unique()) > 5
        confusion.update(predicted, target.long())
        assert Image.open(tmp_path / "out" / "overlays" / "aachen" / f"{name}.jpg").size == (64, 32)
    assert 100 * confusion.mean_iou() == json.loads((tmp_path / "eval.json").read_text())["miou"]


def test_slide_in_bands_sums_as_the_predictor_does(monkeypatch):
    from segmentation import predict
    from segmentation.inference import Predictor
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 7, padding=3)  # windows see less than the image near their edges
    model = type("Conv", (torch.nn.Module,), {"forward": lambda self, x: {"out": conv(x)}})()
    with torch.no_grad():
        for size, crop, stride in [((70, 45), (24, 16), (10, 7)), ((9, 12), (16, 16), (8, 8))]:
            predictor = Predictor(model, "slide", crop, stride)
            image = torch.randn(1, 3, *size)
            assert torch.equal(torch.cat(list(predict.score_bands(predictor, image)), dim=-2), predictor(image))
    scores = torch.randn(1, 19, 16, 32)
    at_once = predict.upsampled_argmax(scores, (37, 70))
    monkeypatch.setattr(predict, "UPSAMPLE_AT_ONCE_BYTES", 0)
    assert torch.equal(predict.upsampled_argmax(scores, (37, 70)), at_once)  # class by class


def test_unreadable_images_are_listed_and_skipped_and_hidden_ones_left_out(classifier, tmp_path, capsys):
    _, checkpoint = classifier
    photos = tmp_path / "photos"
    for name in ("a.jpg", "day2/a.jpg", ".hidden.jpg", ".thumbnails/b.jpg"):
        write_image(photos / name, size=(48, 40))
    (photos / "broken.jpg").write_bytes(b"not a JPEG")
    os.mkfifo(photos / "pipe.jpg")  # would block a plain open
    os.symlink("/dev/zero", photos / "zero.jpg")  # would be read until memory runs out
    (photos / "notes.txt").write_text("not an image")
    (tmp_path / "todo.txt").write_text("photos/day2/a.jpg\n\nphotos/missing.png\n")
    predict_classes("--checkpoint", checkpoint, photos, "--list", tmp_path / "todo.txt", "--device", "cpu",
                    "-j", "2", "-b", "2", "--topk", "1", "-o", tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "predictions.csv")
    assert [row[0] for row in rows[1:]] == [str(photos / "a.jpg"), str(photos / "day2" / "a.jpg")]
    assert rows[0] == ["path", "class_1", "probability_1"]
    unreadable = (tmp_path / "out" / "unreadable.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in unreadable] == [str(photos / name) for name in
                                                            ("broken.jpg", "missing.png", "pipe.jpg", "zero.jpg")]
    assert unreadable[0].split("\t")[1].startswith(f"cannot read image {photos / 'broken.jpg'} (")
    assert unreadable[1].split("\t")[1].startswith(f"image {photos / 'missing.png'} was listed but no longer exists")
    assert " is a FIFO (named pipe), not a regular file" in unreadable[2]
    assert " is a symlink to /dev/zero, a character device, not a regular file" in unreadable[3]
    printed = capsys.readouterr().out
    assert "wrote the predictions of 2 images" in printed and "skipped 4 that could not be read" in printed
    assert "note: 1 files under" in printed  # notes.txt


def test_names_keep_the_path_under_the_inputs_common_folder(tmp_path):
    from common.prediction import find_images
    from segmentation.predict import output_names
    for name in ("day1/a.png", "day1/a.jpg", "day2/a.png", "day2/sub/b.png"):
        write_image(tmp_path / "tiles" / name)
    found = find_images([tmp_path / "tiles" / "day2", tmp_path / "tiles" / "day1", tmp_path / "tiles" / "day1" /
                         "a.png"], [])
    assert [name for _, name in found] == ["day1/a.jpg", "day1/a.png", "day2/a.png", "day2/sub/b.png"]
    assert output_names([name for _, name in found]) == ["day1/a.jpg", "day1/a.png", "day2/a", "day2/sub/b"]
    os.symlink(tmp_path / "tiles" / "day2", tmp_path / "tiles" / "day2" / "sub" / "loop")
    os.symlink(tmp_path / "tiles" / "day1", tmp_path / "more")
    found = find_images([tmp_path / "tiles", tmp_path / "more"], [])  # linked folders searched, each once
    assert [name for _, name in found] == ["tiles/day1/a.jpg", "tiles/day1/a.png", "tiles/day2/a.png",
                                           "tiles/day2/sub/b.png"]
    write_image(tmp_path / "tiles" / "out" / "masks" / "day1" / "a.png")  # a first run's outputs, inside the inputs
    assert len(find_images([tmp_path / "tiles"], [], output_dir=tmp_path / "tiles" / "out")) == 4
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(UserError, match=r"^--list .*empty.txt names no images: give one image path a line"):
        find_images([], [tmp_path / "empty.txt"])


def test_two_processes_write_the_csv_once_as_one_does(classifier, tmp_path):
    data, checkpoint = classifier
    shutil.copytree(data / "val", tmp_path / "val")
    (tmp_path / "val" / "cat" / "broken.jpg").write_bytes(b"")
    flags = ["--checkpoint", checkpoint, tmp_path / "val", "--device", "cpu", "-j", "0", "-b", "1"]
    predict_classes(*flags, "-o", tmp_path / "one")
    result = torchrun(2, "classification/predict.py", *flags, "-o", tmp_path / "two")
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("predictions.csv", "unreadable.txt"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()
    assert len(read_csv(tmp_path / "two" / "predictions.csv")) == 1 + 9
    assert result.stdout.count("wrote the predictions of 9 images") == 1


def test_inputs_and_outputs_that_cannot_be_used_are_one_line(classifier, segmenter, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"^--output-dir .*/file is a file, not a folder"):
        predict_classes("--checkpoint", classifier[1], classifier[0] / "val", "-o", tmp_path / "file")
    with pytest.raises(UserError, match=r"^.*/nowhere does not exist: give image files, folders of images"):
        predict_segmentation("--checkpoint", segmenter[1], tmp_path / "nowhere", "-o", tmp_path / "out")
    with pytest.raises(UserError, match=r"^give the images to predict on"):
        predict_segmentation("--checkpoint", segmenter[1], "-o", tmp_path / "out")
    (tmp_path / "list.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(UserError, match=r"^cannot read --list .*list.txt \(UnicodeDecodeError: .*\): it must be UTF-8"):
        predict_segmentation("--checkpoint", segmenter[1], "--list", tmp_path / "list.txt", "-o", tmp_path / "out")


def test_a_checkpoint_of_the_other_task_or_a_crop_past_the_resize_is_one_line(classifier, segmenter, tmp_path):
    (data, classifier_checkpoint), (_, segmenter_checkpoint) = classifier, segmenter
    with pytest.raises(UserError, match=r"was written by segmentation/train.py: use segmentation/predict.py for it$"):
        predict_classes("--checkpoint", segmenter_checkpoint, data / "val", "-o", tmp_path / "a")
    with pytest.raises(UserError, match=r"was written by classification/train.py: use classification/predict.py"):
        predict_segmentation("--checkpoint", classifier_checkpoint, data / "val", "-o", tmp_path / "b")
    with pytest.raises(UserError, match=r"^--val-crop-size 64 is larger than --val-resize-size 32: the centre crop"):
        predict_classes("--checkpoint", classifier_checkpoint, data / "val", "--val-crop-size", "64",
                        "--val-resize-size", "32", "-o", tmp_path / "c")
    with pytest.raises(UserError, match=r"^--val-crop-size 64 is larger than --val-resize-size 32"):
        evaluate("--checkpoint", classifier_checkpoint, "--val-crop-size", "64", "--val-resize-size", "32")


def test_a_crop_size_that_is_no_positive_integer_is_refused_by_the_parser(capsys):
    from classification import predict as script
    with pytest.raises(SystemExit):
        script.get_args_parser().parse_args(["--checkpoint", "c.pth", "-o", "out", "--val-crop-size", "-5"])
    assert "argument --val-crop-size: must be a positive integer, got -5" in capsys.readouterr().err
