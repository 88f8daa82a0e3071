"""Each bad input stops with one line that names the problem and the fix, before long work where possible."""
import os
import re
import sys

import pytest
import torch
import torchvision

from classification.data import ImageFolderWithClasses, list_classes
from common.log import UserError
from conftest import TINY, evaluate, python, run, train, write_image, write_tree

IMAGE_FLAGS = ["--model", "resnet18", "--device", "cpu", "-b", "4", "-j", "0", "--epochs", "1",
               "--train-crop-size", "32", "--val-resize-size", "32", "--val-crop-size", "32"]


def fails_with(pattern, *argv):
    with pytest.raises(UserError, match=pattern):
        train(*argv)


def test_missing_data_path(tmp_path):
    fails_with(r"split folder .*nowhere/train not found: --data-path must hold train/ and val/",
               "--data-path", tmp_path / "nowhere", *IMAGE_FLAGS)


def test_missing_val_split_is_caught_before_training(tmp_path):
    data = write_tree(tmp_path / "data")
    for f in (data / "val").rglob("*.jpg"):
        f.unlink()
    for d in sorted((data / "val").iterdir()):
        d.rmdir()
    (data / "val").rmdir()
    fails_with(r"split folder .*data/val not found", "--data-path", data, *IMAGE_FLAGS)


def test_empty_class_folder(tmp_path):
    data = write_tree(tmp_path / "data")
    (data / "train" / "emu").mkdir()
    fails_with(r"class folder .*train/emu holds no images .*add images or remove the folder",
               "--data-path", data, *IMAGE_FLAGS)


def test_val_class_unknown_to_train(tmp_path):
    data = write_tree(tmp_path / "data")
    write_image(data / "val" / "yak" / "0.jpg")
    fails_with(r"val has class folders the model was not trained on: yak", "--data-path", data, *IMAGE_FLAGS)


def test_corrupt_image_in_a_worker_is_one_line_naming_the_file(tmp_path):
    data = write_tree(tmp_path / "data")
    good = (data / "train" / "dog" / "0.jpg").read_bytes()
    (data / "train" / "dog" / "broken.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    flags = [f if f != "0" else "2" for f in IMAGE_FLAGS]  # -j 2: the error is raised in a worker process
    result = python("classification/train.py", "--data-path", data, *flags)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot read image ") and "dog/broken.jpg" in last and "delete the file" in last


def test_batch_larger_than_the_training_set(tmp_path):
    fails_with(r"-b 64 x --accum-steps 2 is more than the 100 training images per process: lower -b",
               *TINY, "--synthetic-train-size", "100", "-b", "64", "--accum-steps", "2")


@pytest.mark.parametrize("flag", ["--accum-steps", "-b", "--epochs"])
def test_zero_or_negative_counts_are_refused_by_the_parser(flag):
    result = python("classification/train.py", flag, "0")
    assert result.returncode == 2 and "must be a positive integer, got 0" in result.stderr


def test_unknown_model():
    fails_with(r"unknown --model 'resnet5000': use a torchvision classifier", *TINY, "--model", "resnet5000")


def test_unknown_weights_name():
    fails_with(r"--weights 'IMAGENET9K' is neither a file nor a weights name of resnet18 \(IMAGENET1K_V1\)",
               *TINY, "--weights", "IMAGENET9K")


def test_resume_pointing_nowhere(tmp_path):
    fails_with(r"checkpoint .*missing\.pth does not exist", *TINY, "--resume", tmp_path / "missing.pth")


def test_resume_auto_without_output_dir():
    fails_with(r"--resume auto looks for <output-dir>/checkpoint.pth: give --output-dir", *TINY, "--resume", "auto")


def test_resume_from_another_model(trained_run):
    fails_with(r"trained with --model resnet18, not resnet34: pass --model resnet18",
               *TINY, "--model", "resnet34", "--resume", trained_run / "checkpoint.pth")


def test_resume_with_another_class_count(trained_run):
    fails_with(r"fc\.weight file \[10, 512\] vs model \[4, 512\]",
               *TINY, "--synthetic-classes", "4", "--resume", trained_run / "checkpoint.pth")


def test_resume_with_an_incompatible_optimizer(trained_run):
    fails_with(r"cannot resume from .*Resume with the flags it was trained with",
               *TINY, "--norm-weight-decay", "0", "--resume", trained_run / "checkpoint.pth")


def test_resume_with_another_schedule(trained_run):
    fails_with(r"its LR schedule and data order were laid out for other values \(epochs 2 -> 4\)", *TINY, "--epochs", "4",
               "--resume", trained_run / "checkpoint.pth")


def test_test_only_needs_something_to_evaluate():
    fails_with(r"--test-only evaluates a trained model: give --resume PATH or --weights NAME", *TINY, "--test-only")


def test_grad_checkpointing_of_a_model_without_blocks():
    fails_with(r"--grad-checkpointing knows the stages of ResNet.*not of VGG", *TINY, "--model", "vgg11",
               "--grad-checkpointing")


def test_grad_checkpointing_with_compile():
    fails_with(r"--grad-checkpointing and --compile together fail", *TINY, "--compile", "--grad-checkpointing")


def test_synthetic_class_count_out_of_range():
    result = python("classification/train.py", "--synthetic-classes", "11")
    assert result.returncode == 2 and "invalid choice: 11" in result.stderr


def test_checkpoint_of_torchvision_references_with_an_argparse_namespace(tmp_path):
    import argparse
    path = tmp_path / "tv.pth"
    torch.save({"model": torchvision.models.resnet18(num_classes=10).state_dict(),
                "args": argparse.Namespace(lr=0.1)}, path)
    fails_with(r"holds Python objects besides tensors, which weights_only loading refuses", *TINY, "--resume", path)


def test_truncated_checkpoint(tmp_path, trained_run):
    broken = tmp_path / "broken.pth"
    broken.write_bytes((trained_run / "checkpoint.pth").read_bytes()[:5000])
    fails_with(r"cannot read checkpoint .*broken\.pth .*truncated, corrupt", *TINY, "--resume", broken)


def test_eval_of_a_checkpoint_with_another_architecture(tmp_path):
    torch.save(torchvision.models.resnet34(num_classes=10).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(UserError, match=r"does not fit this model: .*unexpected keys"):
        evaluate("--checkpoint", tmp_path / "r34.pth", "--model", "resnet18", "--device", "cpu")


def test_eval_with_weights_for_other_classes(tmp_path):
    data = write_tree(tmp_path / "data")
    with pytest.raises(UserError, match=r"predicts 1000 classes, but the data has 3"):
        evaluate("--model", "resnet18", "--weights", "IMAGENET1K_V1", "--data-path", data, "--device", "cpu")


def test_sync_bn_on_cpu_processes_is_refused(monkeypatch):
    # The check runs where a distributed CPU run would start; emulate that without starting two processes.
    from classification import train as script
    monkeypatch.setattr(script, "init_distributed", lambda device, timeout_minutes: (type("E", (), {
        "rank": 0, "world_size": 2, "distributed": True, "is_main": True})(), torch.device("cpu")))
    fails_with(r"--sync-bn needs CUDA devices", *TINY, "--sync-bn")


# --- files and layouts of an ImageFolder tree


def test_a_class_folder_that_is_a_dangling_symlink_is_an_error(tmp_path):
    data = write_tree(tmp_path / "data")
    os.symlink(tmp_path / "gone", data / "train" / "bee")  # sorted first: dropping it would shift every label
    fails_with(r"class folder .*train/bee is a symlink to .*gone, which does not exist: fix the link or remove it",
               "--data-path", data, *IMAGE_FLAGS)


def test_hidden_folders_and_files_are_not_classes_or_images(tmp_path, capsys):
    data = write_tree(tmp_path / "data")
    write_image(data / "train" / ".thumbnails" / "0.jpg")
    write_image(data / "train" / "cat" / ".thumbnails" / "0.jpg")
    write_image(data / "train" / "cat" / "._0.jpg")  # macOS resource fork
    assert list_classes(data / "train") == ["cat", "dog", "fox"]
    assert "note: hidden folders are not classes, skipped in " in capsys.readouterr().out
    folder = ImageFolderWithClasses(data / "train", ["cat", "dog", "fox"], transform=None)
    assert [os.path.basename(path) for path, label in folder.samples if label == 0] == [f"{i}.jpg" for i in range(8)]
    assert "train: 2 hidden files or folders (names starting with '.')\n" in capsys.readouterr().out


def test_gif_and_jfif_are_images_and_other_files_are_counted(tmp_path, capsys):
    data = write_tree(tmp_path / "data")
    write_image(data / "train" / "cat" / "a.gif", fmt="GIF")
    write_image(data / "train" / "cat" / "b.JFIF", fmt="JPEG")
    (data / "train" / "cat" / "notes.txt").write_text("not an image")
    folder = ImageFolderWithClasses(data / "train", ["cat", "dog", "fox"], transform=None)
    cat = [path for path, label in folder.samples if label == 0]
    assert [os.path.basename(path) for path in cat[:2]] == ["0.jpg", "1.jpg"] and len(cat) == 10
    assert {os.path.basename(path) for path in cat} >= {"a.gif", "b.JFIF"}
    assert all(folder[i][0].mode == "RGB" for i, (path, _) in enumerate(folder.samples) if not path.endswith(".jpg"))
    assert "train: files not named as images: 1 .txt (images end in .jpg, .jpeg, " in capsys.readouterr().out


def test_sample_order_is_torchvisions(tmp_path):
    # Checkpoints resume by sample index: the listing must keep torchvision's order for ordinary trees.
    data = write_tree(tmp_path / "data")
    for sub in ("a", "a-b", "a/x"):
        write_image(data / "train" / "dog" / sub / "0.jpg")
    ours = ImageFolderWithClasses(data / "train", ["cat", "dog", "fox"], transform=None).samples
    assert ours == torchvision.datasets.ImageFolder(data / "train").samples


def test_a_single_class_is_refused(tmp_path):
    data = write_tree(tmp_path / "data", classes=("cat",))
    fails_with(r"data/val is read with 1 class \(cat\): a classifier needs at least 2: give train/ and val/ one folder",
               "--data-path", data, *IMAGE_FLAGS)


@pytest.mark.parametrize("target, problem", [
    ("/dev/zero", r"/dev/zero, a character device, not a regular file: only regular files are read as images"),
    ("/nowhere/x.jpg", r"/nowhere/x\.jpg, which does not exist: fix the link or remove it")])
def test_an_image_symlink_to_a_device_or_nowhere_is_refused_when_listing(tmp_path, target, problem):
    data = write_tree(tmp_path / "data")
    os.symlink(target, data / "train" / "dog" / "x.jpg")
    fails_with(rf"image .*train/dog/x\.jpg is a symlink to {problem}", "--data-path", data, *IMAGE_FLAGS)


def test_a_fifo_named_jpg_is_refused_not_waited_on(tmp_path):
    data = write_tree(tmp_path / "data")
    os.mkfifo(data / "train" / "dog" / "pipe.jpg")
    result = python("classification/train.py", "--data-path", data, *IMAGE_FLAGS, timeout=600)  # a hang: timeout
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.fullmatch(r"error: image .*train/dog/pipe\.jpg is a FIFO \(named pipe\), not a regular file: only "
                        r"regular files are read as images; remove it .*", result.stderr.strip().splitlines()[-1])


# Reading bytes for --data-backend gpu, in a child process: a regression would block on the FIFO (the timeout
# ends it) or read /dev/zero until the address-space limit set here stops it.
ENCODED_READS = """
import os, resource, sys
from classification.gpu_preset import EncodedSamples
from common.log import UserError
size = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, resource.RLIM_INFINITY))
for path in sys.argv[1:]:
    try:
        print("read", len(EncodedSamples([(path, 0)])[0][0]))
    except UserError as e:
        print(e)
"""


def test_gpu_backend_reads_only_regular_files_and_at_most_their_size(tmp_path):
    image = tmp_path / "ok.jpg"
    write_image(image)
    os.mkfifo(tmp_path / "pipe.jpg")
    os.symlink("/dev/zero", tmp_path / "zero.jpg")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    result = run(sys.executable, "-c", ENCODED_READS, image, *(tmp_path / name for name in
                 ("zero.jpg", "dangling.jpg", "empty.jpg", "pipe.jpg")), timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"read {image.stat().st_size}",
        f"image {tmp_path}/zero.jpg is a symlink to /dev/zero, a character device, not a regular file: only regular "
        "files are read as images; remove it or replace it with the image file",
        f"image {tmp_path}/dangling.jpg is a symlink to {tmp_path}/gone.jpg, which does not exist: fix the link or "
        "remove it",
        f"cannot read image {tmp_path}/empty.jpg (the file is empty): delete the file or replace it with a valid image",
        f"image {tmp_path}/pipe.jpg is a FIFO (named pipe), not a regular file: only regular files are read as "
        "images; remove it or replace it with the image file"]


@pytest.mark.parametrize("where", ["image", "class folder"])
def test_a_newline_in_a_name_stays_inside_the_one_error_line(tmp_path, where):
    data = write_tree(tmp_path / "data")
    if where == "image":
        (data / "train" / "dog" / "bro\nken.jpg").write_bytes(b"not a jpeg")
        pattern = r"cannot read image '.*train/dog/bro\\nken\.jpg' \("
    else:
        (data / "train" / "e\nmu").mkdir()
        pattern = r"class folder '.*train/e\\nmu' holds no images"
    with pytest.raises(UserError, match=pattern) as error:
        train("--data-path", data, *IMAGE_FLAGS)
    assert "\n" not in str(error.value)  # common.log keeps only the last line of a message
