"""Each bad input stops with one line that names the problem and the fix, before long work where possible."""
import os
import re
import signal
import sys

import pytest
import torch
import torchvision
from PIL import Image

from classification.data import image_folder, list_classes
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
               *TINY, "--epochs", "2", "--norm-weight-decay", "0", "--resume", trained_run / "checkpoint.pth")


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


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_sync_bn_on_cpu_processes_is_refused(monkeypatch, task):
    # Refused where a distributed CPU run starts, before the process group; two processes emulated by their variables.
    from importlib import import_module
    script = import_module(f"{task}.train")
    for name, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("torch.distributed.init_process_group", lambda *a, **k: pytest.fail("the group was started"))
    args = script.finish_args(script.get_args_parser().parse_args(["--device", "cpu", "--sync-bn"]))
    with pytest.raises(UserError, match=r"--sync-bn needs CUDA devices: drop it on CPU"):
        script.main(args)


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
    folder = image_folder(data / "train", ["cat", "dog", "fox"])
    assert [os.path.basename(path) for path, label in folder.samples if label == 0] == [f"{i}.jpg" for i in range(8)]
    assert "train: 2 hidden files or folders (names starting with '.')\n" in capsys.readouterr().out


def test_gif_and_jfif_are_images_and_other_files_are_counted(tmp_path, capsys):
    data = write_tree(tmp_path / "data")
    write_image(data / "train" / "cat" / "a.gif", fmt="GIF")
    write_image(data / "train" / "cat" / "b.JFIF", fmt="JPEG")
    (data / "train" / "cat" / "notes.txt").write_text("not an image")
    folder = image_folder(data / "train", ["cat", "dog", "fox"])
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
    ours = image_folder(data / "train", ["cat", "dog", "fox"]).samples
    assert list(ours) == torchvision.datasets.ImageFolder(data / "train").samples


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


# --- round three: output folders and full disks, checkpoint contents, flag values, dying workers, signals


def parse_error(script, argv, capsys, parser="train"):
    """What argparse says of `argv` to <script>/<parser>.py (it exits 2 with one line)."""
    from importlib import import_module
    with pytest.raises(SystemExit) as stop:
        import_module(f"{script}.{parser}").get_args_parser().parse_args([str(a) for a in argv])
    assert stop.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


SEED_RANGE = "argument --seed: must be between 0 and 4294967295, got"


@pytest.mark.parametrize("script,parser,argv,says", [
    ("classification", "train", ["--label-smoothing", "2"],
     "argument --label-smoothing: must be between 0 and 1, got 2"),
    ("classification", "train", ["--random-erase", "2"], "argument --random-erase: must be between 0 and 1, got 2"),
    ("classification", "train", ["--auto-augment", "randaugment"],  # quotes or not: it depends on the Python version
     "argument --auto-augment: invalid choice: 'randaugment' (choose from ra, ta_wide, augmix, imagenet, cifar10, "
     "svhn)"),
    ("classification", "train", ["--seed", str(2**32)], f"{SEED_RANGE} 4294967296"),
    ("segmentation", "train", ["--seed", "-1"], f"{SEED_RANGE} -1"),
    ("classification", "train", ["--device", "gpu"], "argument --device: must be cpu, cuda or cuda:N, got gpu"),
    ("segmentation", "train", ["--device", "gpu"], "argument --device: must be cpu, cuda or cuda:N, got gpu"),
    ("classification", "eval", ["--device", "gpu"], "argument --device: must be cpu, cuda or cuda:N, got gpu"),
    ("segmentation", "eval", ["--checkpoint", "c.pth", "--device", "gpu"],
     "argument --device: must be cpu, cuda or cuda:N, got gpu"),
])
def test_flag_values_out_of_range_are_refused_with_the_range(script, parser, argv, says, capsys):
    # --label-smoothing 2 failed at the first step, --random-erase 2 in a worker, --auto-augment randaugment and
    # --device gpu with tracebacks, --seed 2**32 silently.
    assert parse_error(script, argv, capsys, parser).replace("'", "").endswith(says.replace("'", ""))


def test_a_reversed_scale_range_is_refused_before_any_work():
    from conftest import SEG_TINY, train_segmentation
    with pytest.raises(UserError, match=r"^--scale-range 2 0\.5: give MIN <= MAX, e\.g\. --scale-range 0\.5 2$"):
        train_segmentation(*SEG_TINY, "--scale-range", "2.0", "0.5")


def test_device_cuda_without_a_gpu_is_one_line_before_any_work(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    fails_with(r"^--device cuda, but this process sees no CUDA GPU \(torch .*\): check nvidia-smi and "
               r"CUDA_VISIBLE_DEVICES, or use --device cpu$", *TINY, "--device", "cuda")


# Mounts: CI runs as root, which ignores permission bits, so a read-only folder and a full disk are real file
# systems mounted for the test.
def mount(*argv):
    return run("mount", *argv).returncode == 0


@pytest.fixture
def mounted(tmp_path):
    """mounted("read-only") or mounted("tmpfs", "size=...") -> a fresh folder with that file system mounted on
    it (a read-only bind mount of itself, or a small tmpfs), unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a file system for the test needs root")
    points = []

    def make(kind, options=None):
        point = tmp_path / f"mount{len(points)}"
        point.mkdir()
        cannot = "this machine does not let root mount a file system (no CAP_SYS_ADMIN)"
        how = ("--bind", point, point) if kind == "read-only" else ("-t", "tmpfs", "-o", options, "tmpfs", point)
        if not mount(*how):
            pytest.skip(cannot)
        points.append(point)
        if kind == "read-only" and not mount("-o", "remount,bind,ro", point):  # a bind mount is made read-only so
            pytest.skip(cannot)
        return point

    yield make
    for point in reversed(points):
        run("umount", point)


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "run").write_text("")
    fails_with(rf"^--output-dir {tmp_path}/run is a file, not a folder: give a folder", *TINY,
               "--output-dir", tmp_path / "run")


@pytest.mark.parametrize("sub, says", [("run", r"cannot create --output-dir .*/run \(Read-only file system\)"),
                                       ("", r"--output-dir .*: cannot write in .* \(a read-only file system")])
def test_an_output_dir_on_a_read_only_file_system_is_one_line(mounted, sub, says):
    fails_with(says, *TINY, "--output-dir", mounted("read-only") / sub)


def test_a_full_disk_while_saving_keeps_the_last_checkpoint_and_says_where(mounted):
    from common.checkpoint import CheckpointError, load_checkpoint, save_training
    disk = mounted("tmpfs", "size=256k")
    small, large = ({"model": {"w": torch.zeros(n)}, "epoch": epoch, "step": None} for epoch, n in ((0, 1000),
                                                                                                    (1, 100_000)))
    (disk / "first").mkdir()
    with pytest.raises(CheckpointError, match=rf"^cannot save {disk}/first/checkpoint\.pth \(No space left on device: "
                                              r"the disk is full\): no checkpoint was saved yet; free space there, "
                                              r"then run the same command again$"):
        save_training(large, disk / "first")
    save_training(small, disk)
    with pytest.raises(CheckpointError, match=rf"^cannot save {disk}/checkpoint\.pth \(No space left on device: the "
                                              rf"disk is full\): the last good checkpoint, {disk}/checkpoint\.pth, is "
                                              r"intact; free space there, then resume from it with --resume auto$"):
        save_training(large, disk)
    assert load_checkpoint(disk / "checkpoint.pth")["epoch"] == 0
    assert sorted(os.listdir(disk)) == ["checkpoint.pth", "first"]  # no temporary file left behind


SAVE_UNDER_A_FILE_SIZE_LIMIT = """
import resource, sys, torch
from common.checkpoint import save_training
from common.log import run_cli
def main(out):
    save_training({"model": {"w": torch.zeros(1000)}, "epoch": 0, "step": None}, out)  # about 5 KB
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))  # ulimit -f; Python ignores SIGXFSZ
    save_training({"model": {"w": torch.zeros(100_000)}, "epoch": 1, "step": None}, out)  # about 400 KB
run_cli(main, sys.argv[1])
"""


def test_a_file_size_limit_while_saving_keeps_the_last_checkpoint_and_says_where(tmp_path):
    from common.checkpoint import load_checkpoint
    result = run(sys.executable, "-c", SAVE_UNDER_A_FILE_SIZE_LIMIT, tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot save {tmp_path}/checkpoint.pth (File too large: a file-size limit (ulimit -f) is below the "
        f"checkpoint's size): the last good checkpoint, {tmp_path}/checkpoint.pth, is intact; raise the limit, then "
        "resume from it with --resume auto")
    assert load_checkpoint(tmp_path / "checkpoint.pth")["epoch"] == 0 and os.listdir(tmp_path) == ["checkpoint.pth"]


# --- checkpoint contents


def test_resume_of_bare_weights_says_to_use_weights(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    fails_with(rf"^{path} holds model weights alone \(a state dict\), not a training checkpoint: start a new run from "
               rf"them with --weights {path} instead of --resume$", *TINY, "--resume", path)


def test_segmentation_resume_of_bare_weights_says_to_use_weights(tmp_path):
    from conftest import SEG_TINY, train_segmentation
    from segmentation.model import create_model
    path = tmp_path / "unet.pth"
    torch.save(create_model("unet", 3, 8, False, None, 8).state_dict(), path)
    with pytest.raises(UserError, match=rf"^{path} holds model weights alone .* with --weights {path} instead"):
        train_segmentation(*SEG_TINY, "--resume", path)


def edited_checkpoint(trained_run, tmp_path, drop):
    checkpoint = torch.load(trained_run / "checkpoint.pth", weights_only=True)
    del checkpoint[drop]
    torch.save(checkpoint, tmp_path / f"without_{drop}.pth")
    return tmp_path / f"without_{drop}.pth"


@pytest.mark.parametrize("drop", ["optimizer", "lr_scheduler", "scaler", "epoch"])
def test_resume_of_a_checkpoint_missing_a_part_names_it(trained_run, tmp_path, drop):
    path = edited_checkpoint(trained_run, tmp_path, drop)
    fails_with(rf"^cannot resume from {path}: it lacks {drop}, which train.py saves in every checkpoint .*start a new "
               rf"run from its weights with --weights {path}$", *TINY, "--epochs", "2", "--resume", path)


def test_resume_of_a_checkpoint_without_its_best_score_says_it_starts_over(trained_run, tmp_path, capsys):
    path = edited_checkpoint(trained_run, tmp_path, "best_acc1")
    train(*TINY, "--epochs", "2", "--resume", path)  # epoch 1 of 2 done: nothing left to train
    out = capsys.readouterr().out
    assert f"note: {path} holds no best_acc1: the best top-1 starts over, and best.pth is overwritten" in out
    assert "resumed from" in out


@pytest.mark.parametrize("content", ["list", "empty"])
@pytest.mark.parametrize("script", ["train.py --resume", "eval.py --checkpoint", "segmentation eval.py --checkpoint"])
def test_a_checkpoint_that_is_a_list_or_empty_is_one_line(tmp_path, script, content):
    from conftest import evaluate_segmentation
    path = tmp_path / "odd.pth"
    if content == "list":
        torch.save([torch.zeros(2)], path)
        says = rf"^checkpoint {path} holds a list, not a dict: give a checkpoint written by train\.py"
    else:
        path.write_bytes(b"")  # the error formatter itself used to fail on the message-less exception
        says = rf"^checkpoint {path} is empty \(0 bytes\), as a copy or save cut short leaves a file"
    with pytest.raises(UserError, match=says):
        if script == "train.py --resume":
            train(*TINY, "--resume", path)
        elif script == "eval.py --checkpoint":
            evaluate("--checkpoint", path, "--device", "cpu")
        else:
            evaluate_segmentation("--checkpoint", path, "--device", "cpu")


def test_a_checkpoint_without_model_weights_names_the_file(tmp_path):
    path = tmp_path / "no_model.pth"
    torch.save({"epoch": 3, "args": {"model": "resnet18"}}, path)
    with pytest.raises(UserError, match=rf"^checkpoint {path} holds no model state dict \(expected a dict of tensors"):
        evaluate("--checkpoint", path, "--device", "cpu")


def test_evaluating_a_checkpoint_on_other_classes_is_refused(tmp_path):
    # Trained on [cat, dog], evaluated on [ant, cat]: cat's images would carry label 1, which was dog.
    flags = ["--model", "resnet18", "--device", "cpu", "-b", "4", "-j", "0", "--train-crop-size", "32",
             "--val-resize-size", "32", "--val-crop-size", "32"]
    train("--data-path", write_tree(tmp_path / "pets", classes=("cat", "dog")), *flags, "--epochs", "1",
          "--output-dir", tmp_path / "run")
    other, checkpoint = write_tree(tmp_path / "insects", classes=("ant", "cat")), tmp_path / "run" / "checkpoint.pth"
    fails_with(rf"^cannot evaluate {checkpoint} on this data: it was trained with class_names \['cat', 'dog'\], the "
               r"data has \['ant', 'cat'\]\. Evaluate it on the data it was trained on$",
               "--data-path", other, *flags, "--test-only", "--resume", checkpoint)
    with pytest.raises(UserError, match=rf"^cannot evaluate {checkpoint} on {other}: its val/ has classes the "
                                        r"checkpoint was not trained on \(ant; it knows \['cat', 'dog'\]\)"):
        evaluate("--checkpoint", checkpoint, "--data-path", other, "--device", "cpu", "-j", "0")


# --- evaluation destinations, checked before the checkpoint is even read


@pytest.mark.parametrize("flags, says", [
    (["--output-json", "{tmp}/nowhere/scores.json"], "--output-json {tmp}/nowhere/scores.json: folder {tmp}/nowhere "
     "does not exist: create it"),
    (["--confusion-png", "{tmp}/nowhere/c.png"], "--confusion-png {tmp}/nowhere/c.png: folder {tmp}/nowhere does not"),
    (["--output-json", "{tmp}"], "--output-json {tmp} is a folder: give a file name"),
    (["--export", "torchscript", "--export-path", "{tmp}/nowhere/model.pt"],
     "--export-path {tmp}/nowhere/model.pt: folder {tmp}/nowhere does not exist"),
    (["--export", "onnx", "--export-path", "{tmp}/m.onnx", "--export-triton", "{tmp}/file"],
     "--export-triton {tmp}/file is a file, not a folder"),
])
def test_eval_destinations_are_checked_before_the_work(tmp_path, flags, says):
    (tmp_path / "file").write_text("")
    argv = [flag.format(tmp=tmp_path) for flag in flags]
    with pytest.raises(UserError, match="^" + re.escape(says.format(tmp=tmp_path))):
        evaluate("--checkpoint", tmp_path / "not-read.pth", "--device", "cpu", *argv)


@pytest.mark.parametrize("flags, says", [
    (["--output-json", "{tmp}/nowhere/scores.json"], "--output-json {tmp}/nowhere/scores.json: folder {tmp}/nowhere "
     "does not exist"),
    (["--save-predictions", "{tmp}/file"], "--save-predictions {tmp}/file is a file, not a folder"),
])
def test_segmentation_eval_destinations_are_checked_before_the_work(tmp_path, flags, says):
    from conftest import evaluate_segmentation
    (tmp_path / "file").write_text("")
    argv = [flag.format(tmp=tmp_path) for flag in flags]
    with pytest.raises(UserError, match="^" + re.escape(says.format(tmp=tmp_path))):
        evaluate_segmentation("--checkpoint", tmp_path / "not-read.pth", "--device", "cpu", *argv)


# --- DataLoader workers that die


class DyingSamples(torch.utils.data.Dataset):
    """The worker that loads sample 3 dies of `signum`: SIGKILL as from the kernel's out-of-memory killer, SIGBUS
    as when a full /dev/shm cannot back a page."""

    def __init__(self, signum):
        self.signum = signum

    def __len__(self):
        return 16

    def __getitem__(self, index):
        if index == 3:
            os.kill(os.getpid(), self.signum)
        return torch.zeros(2)


@pytest.mark.parametrize("signum, says", [
    ("SIGKILL", r"DataLoader worker \(pid \d+\) was killed \(SIGKILL\), which is most often the kernel's "
                r"out-of-memory killer: lower -j \(worker processes per rank\) or -b \(batch size\)"),
    ("SIGBUS", r"DataLoader worker \(pid \d+\) ran out of shared memory \(/dev/shm is full; it died of SIGBUS\): in a "
               r"container, give it more with docker run --shm-size=8g \(or --ipc=host\), or lower -j or -b"),
])
def test_a_dataloader_worker_killed_by_a_signal_is_one_line(signum, says, capsys):
    from torch.utils.data import DataLoader
    from common.log import run_cli

    def main(signum):
        for _ in DataLoader(DyingSamples(getattr(signal, signum)), batch_size=2, num_workers=2):
            pass
    with pytest.raises(SystemExit) as stop:
        run_cli(main, signum)
    assert stop.value.code == 2
    assert re.fullmatch(f"error: {says}", capsys.readouterr().err.strip().splitlines()[-1])


SHM_OF_ONE_MEGABYTE = """
import torch
from torch.utils.data import DataLoader
from common.log import run_cli
images = [torch.zeros(3, 256, 256)] * 32  # batches of 6 MB, through a /dev/shm of 1 MB
run_cli(lambda _: [None for _ in DataLoader(images, batch_size=8, num_workers=2)], None)
"""


def test_a_full_dev_shm_is_one_line_pointing_to_shm_size():
    if os.geteuid() != 0:
        pytest.skip("a /dev/shm of 1 MB is mounted in a mount namespace of the test's own, which needs root")
    if run("unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm").returncode != 0:
        pytest.skip("this machine does not let root mount a file system (no CAP_SYS_ADMIN)")
    result = run("unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs /dev/shm && exec "$0" -c "$1"',
                 sys.executable, SHM_OF_ONE_MEGABYTE)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert re.fullmatch(r"error: DataLoader worker \d ran out of shared memory \(/dev/shm is full\): in a container, "
                        r"give it more with docker run --shm-size=8g \(or --ipc=host\), or lower -j or -b",
                        result.stderr.strip().splitlines()[-1])


# --- SIGTERM before the training loop


def test_sigterm_during_start_up_exits_75_with_a_line(tmp_path):
    from common.log import PREEMPTED_EXIT_CODE
    from conftest import ROOT, popen
    out = tmp_path / "run"
    # 50,000 synthetic images take seconds to draw: the signal arrives while they are drawn.
    process = popen(sys.executable, ROOT / "classification/train.py", *TINY, "--synthetic-train-size", "50000",
                    "--output-dir", out)
    first = process.stdout.readline()  # the command line, printed once the process has started
    assert "classification/train.py" in first
    process.send_signal(signal.SIGTERM)
    rest = process.stdout.read()
    assert process.wait() == PREEMPTED_EXIT_CODE
    assert f"stopped on SIGTERM before training began (exit status {PREEMPTED_EXIT_CODE}): nothing was saved; the " \
           "same command starts again" in rest
    assert "Epoch: [0]" not in rest and not (out / "checkpoint.pth").exists()


# --- an image that resizing would blow up


def wide_png(path, width=1000, mode="RGB"):
    """A PNG of width x 1 pixels (a few hundred bytes). Resized to a shorter side of 256 it would take 256 x
    256,000 = 65.5 megapixels; the issue's 20000 x 1 took 5.9 GB, more than a test should risk without the fix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (width, 1), 1).save(path)
    return path


@pytest.mark.parametrize("backend", ["pil", "gpu"])
def test_an_image_too_large_once_resized_is_refused_before_decoding(tmp_path, backend):
    import argparse
    from classification.data import load_val
    from common.distributed import DistEnv
    data = write_tree(tmp_path / "data")
    wide = wide_png(data / "val" / "cat" / "wide.png")
    args = argparse.Namespace(data_path=str(data), val_resize_size=256, val_crop_size=224, interpolation="bilinear",
                              data_backend=backend, batch_size=4, workers=0, train_crop_size=224)
    loader = load_val(args, DistEnv(), torch.device("cpu"), ["cat", "dog", "fox"])
    dataset = loader.loader.dataset if backend == "gpu" else loader.dataset
    index = [os.path.basename(path) for path, _ in dataset.samples].index("wide.png")
    with pytest.raises(UserError, match=rf"^image {wide} is 1000x1 pixels: resized to a shorter side of 256 it would "
                                        r"take 66 megapixels, more than the 64 allowed: crop it to a usual shape, or "
                                        r"remove it$"):
        dataset[index]


@pytest.mark.parametrize("split, backend", [("val", "pil"), ("train", "pil"), ("train", "gpu")])
def test_segmentation_refuses_an_image_too_large_once_resized(tmp_path, split, backend):
    import argparse

    from common.bad_samples import BadSamples
    from common.data import BatchLayout
    from common.distributed import DistEnv
    from segmentation.data import load_train, load_val
    folder = {"train": "training", "val": "validation"}[split]
    wide = wide_png(tmp_path / "images" / folder / "ADE_wide.jpg")  # a PNG named .jpg: read by its header
    wide_png(tmp_path / "annotations" / folder / "ADE_wide.png", mode="L")  # ADE20K's class 1 everywhere
    args = argparse.Namespace(dataset="ade20k", data_path=str(tmp_path), base_size=256, crop_size=[256, 256],
                              scale_range=[0.5, 2.0], voc_aug=None, seed=0, batch_size=1, workers=0,
                              data_backend=backend)
    cpu = torch.device("cpu")
    loader = (load_val(args, DistEnv(), cpu) if split == "val" else load_train(args, BatchLayout(), cpu, BadSamples(0)))
    dataset = loader.dataset
    shorter = 512 if split == "train" else 256  # training rescales up to --scale-range's MAX x --base-size
    with pytest.raises(UserError, match=rf"^image {wide} is 1000x1 pixels: resized to a shorter side of {shorter} it "
                                        r"would take \d+ megapixels, more than the 64 allowed"):
        dataset[0]


# --- round four: the process group's timeout, a tree replaced in place, chains of stand-ins, output folders that
# fill up or vanish, the watchdog around the TensorBoard pictures


@pytest.mark.parametrize("value", ["inf", "1e13"])
@pytest.mark.parametrize("script", ["classification", "segmentation"])
def test_a_dist_timeout_past_a_year_is_refused_by_the_parser(script, value, capsys):
    # timedelta(minutes=inf) raised OverflowError on every rank of a distributed run.
    assert parse_error(script, ["--dist-timeout", value], capsys).endswith(
        f" error: argument --dist-timeout: must be more than 0 and at most 525600, got {value}")


def test_the_longest_dist_timeout_is_one_the_process_group_takes():
    # Far longer ones (timedelta.max) overflow torch's clock arithmetic: its store then times out at once.
    import datetime
    import socket

    import torch.distributed as dist

    from common.flags import MAX_DIST_TIMEOUT_MINUTES
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(minutes=MAX_DIST_TIMEOUT_MINUTES))
    try:
        total = torch.ones(1)
        dist.all_reduce(total)
        dist.barrier()
        assert total.item() == 1
    finally:
        dist.destroy_process_group()


def test_a_tree_replaced_by_one_with_the_same_folder_times_is_listed_anew(tmp_path, capsys):
    # An archive unpacked with fixed times, rsync -t or a restored snapshot bring back the modification times: the
    # cache trained on 8 of the 12 images, 4 never seen.
    from test_data_at_scale import settled
    old, new, cache = write_tree(tmp_path / "old", train_per_class=8), tmp_path / "new", tmp_path / "cache"
    settled(old)
    assert len(image_folder(old / "train", ["cat", "dog", "fox"], cache_dir=cache)) == 24
    capsys.readouterr()
    assert len(image_folder(old / "train", ["cat", "dog", "fox"], cache_dir=cache)) == 24
    assert re.fullmatch(rf"{old}/train: 24 images \(0 of 3 class folders listed, the others from the cache "
                        rf"{cache}/file_list_train\.npz: delete it to list them all again\) in \d+\.\d\d s\n",
                        capsys.readouterr().out)
    write_tree(new, train_per_class=12)
    for folder, _, _ in os.walk(old / "train"):  # the replacement's folders carry the old modification times
        times = os.stat(folder)
        os.utime(new / os.path.relpath(folder, old), ns=(times.st_atime_ns, times.st_mtime_ns))
    os.rename(old, tmp_path / "gone")
    os.rename(new, old)
    assert len(image_folder(old / "train", ["cat", "dog", "fox"], cache_dir=cache)) == 36


class Files(torch.utils.data.Dataset):
    """`size` samples, named <index>.jpg, of which those in `bad` fail to load."""

    def __init__(self, size, bad):
        self.size, self.bad = size, set(bad)

    def __len__(self):
        return self.size

    def path(self, index):
        return f"{index}.jpg"

    def __getitem__(self, index):
        if index in self.bad:
            from common.log import SampleError
            raise SampleError(f"cannot read image {index}.jpg")
        return (index,)


def test_a_chain_of_stand_ins_never_comes_back_to_a_sample():
    from common.bad_samples import SkipBadSamples, stand_in_index
    assert (stand_in_index(0, 0, 10), stand_in_index(0, 9, 10)) == (9, 0)  # each the other's stand-in
    # It went 0, 9, 0, 9, ... and stopped after 6 tries, naming one file; now it goes on to 1 (after 0, tried).
    index, reports = SkipBadSamples(Files(10, bad={0, 9}), seed=0, limit=5)[0]
    assert index == 1 and reports == ((0, "0.jpg", "cannot read image 0.jpg"), (9, "9.jpg", "cannot read image 9.jpg"))
    assert SkipBadSamples(Files(10, bad={0, 9}), seed=0, limit=5)[9][0] == 1  # 9, then 0, then the one after 9


def test_a_chain_of_stand_ins_that_finds_no_readable_one_says_why_and_names_the_files():
    from common.bad_samples import SkipBadSamples
    from common.log import SampleError
    with pytest.raises(SampleError, match=r"^cannot read image 9\.jpg \(2 files failed in turn, each standing in for "
                                          r"the one before \(0\.jpg, 9\.jpg\): more than --max-bad-samples 1 allows; "
                                          r"python tools/check_data\.py with the same data flags finds every bad file"):
        SkipBadSamples(Files(10, bad={0, 9}), seed=0, limit=1)[0]
    # Every file bad: --max-bad-samples 1000 cannot apply, and the line says why.
    with pytest.raises(SampleError, match=r"^cannot read image \d\.jpg \(every one of the 4 training samples failed to "
                                          r"load \(\d\.jpg, \d\.jpg, \d\.jpg, \d\.jpg\): --max-bad-samples 1000 replaces "
                                          r"a bad file by a readable one, and there is none; python tools/check_data"):
        SkipBadSamples(Files(4, bad=range(4)), seed=0, limit=1000)[2]


@pytest.mark.parametrize("backend", ["pil", "gpu"])
def test_two_bad_files_that_stand_in_for_each_other_are_both_replaced_and_listed(tmp_path, backend):
    # Samples 3 (cat/3.jpg) and 8 (fox/0.jpg) of 12 are each other's stand-in at --seed 0. Truncated, they fail in
    # the decoder: on the device with --data-backend gpu.
    data = write_tree(tmp_path / "data", train_per_class=4)
    bad = [data / "train" / "cat" / "3.jpg", data / "train" / "fox" / "0.jpg"]
    for path in bad:
        path.write_bytes(path.read_bytes()[:200])
    train("--data-path", data, *IMAGE_FLAGS, "--max-bad-samples", "5", "--data-backend", backend,
          "--output-dir", tmp_path / "out")
    listed = (tmp_path / "out" / "bad_samples.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == sorted(map(str, bad))


def test_a_full_disk_while_bad_samples_txt_is_written_is_one_line_naming_the_last_checkpoint(tmp_path, monkeypatch):
    import errno

    import common.bad_samples
    from common.checkpoint import load_checkpoint
    data, out = write_tree(tmp_path / "data", train_per_class=4), tmp_path / "out"
    (data / "train" / "dog" / "1.jpg").write_bytes(b"")
    writes = []

    def full_at_the_second(path, *args, **kwargs):  # the first save (epoch 0) goes through
        if os.path.basename(str(path)).startswith("bad_samples.txt.tmp"):
            writes.append(path)
            if len(writes) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return open(path, *args, **kwargs)
    monkeypatch.setattr(common.bad_samples, "open", full_at_the_second, raising=False)
    with pytest.raises(UserError, match=rf"^cannot save {out}/bad_samples\.txt \(No space left on device: the disk is "
                                        rf"full\): the last good checkpoint, {out}/checkpoint\.pth, is intact; free "
                                        r"space there, then resume from it with --resume auto$"):
        train("--data-path", data, *IMAGE_FLAGS, "--epochs", "2", "--max-bad-samples", "1", "--output-dir", out)
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 0 and len(writes) == 2
    assert sorted(os.listdir(out)).count("bad_samples.txt") == 1 and not list(out.glob("*.tmp.*"))


@pytest.mark.parametrize("bad_samples", [False, True], ids=["", "max-bad-samples"])
def test_an_output_dir_deleted_under_the_run_is_one_line(tmp_path, monkeypatch, bad_samples):
    import shutil

    from common import engine
    data, out = write_tree(tmp_path / "data", train_per_class=8), tmp_path / "out"
    flags = ["--max-bad-samples", "1"] if bad_samples else []
    if bad_samples:
        (data / "train" / "dog" / "1.jpg").write_bytes(b"")
    real = engine.seed_micro_batch

    def deleting_at_step_2(seed, epoch, step, slot):
        if step == 2 and out.exists():
            shutil.rmtree(out)
        real(seed, epoch, step, slot)
    monkeypatch.setattr(engine, "seed_micro_batch", deleting_at_step_2)
    # TensorBoard's writer, log.jsonl, bad_samples.txt or the checkpoint: whichever meets it first says so.
    with pytest.raises(UserError, match=rf"^cannot save .*{out}/.*: --output-dir {out} is gone \(deleted, moved or "
                                        r"unmounted while the run wrote to it\), and no checkpoint of the run with it: "
                                        r"start the run again, on a folder that stays$"):
        train("--data-path", data, *IMAGE_FLAGS, "--print-freq", "1", *flags, "--output-dir", out)


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_the_tensorboard_pictures_after_a_validation_beat_the_stall_watchdog(task, monkeypatch, tmp_path):
    # Their forward passes came after the validation's last beat: a --stall-timeout shorter than the pass killed a
    # healthy run as "stalled in forward/backward". Each batch they read is a beat now.
    from importlib import import_module

    from common.engine import StallWatchdog
    from conftest import SEG_TINY, train_segmentation
    pictures = import_module(f"{task}.pictures")  # imported by train.py when it logs them
    name = {"classification": "log_pictures", "segmentation": "log_validation"}[task]
    real, beats = getattr(pictures, name), []

    def spied(writer, *args):
        model = next(arg for arg in args if isinstance(arg, torch.nn.Module))
        hook = model.register_forward_pre_hook(lambda *_: beats.append(StallWatchdog.latest.last_beat))
        try:
            real(writer, *args)
        finally:
            hook.remove()
    monkeypatch.setattr(pictures, name, spied)
    if task == "classification":  # 2 batches of 32 give the 4 x 16 pictures it picks from
        train(*TINY, "--synthetic-train-size", "64", "--synthetic-val-size", "64", "--output-dir", tmp_path)
    else:  # 4 examples, from 2 batches of 2
        train_segmentation(*SEG_TINY, "--synthetic-train-size", "32", "--synthetic-val-size", "4", "-b", "2",
                           "--output-dir", tmp_path)
    assert len(beats) >= 2 and beats[-1] > beats[0]


def test_a_save_cut_short_leaves_no_temporary_file_to_the_next_start(tmp_path, capsys):
    # The stall watchdog ends its rank with os._exit, in the middle of a save if that is where it hangs.
    import subprocess

    from common.log import release_output_dirs
    from common.output_dir import start_output_dir
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    for name in (f"checkpoint.pth.tmp.{dead.pid}", f"bad_samples.txt.tmp.{dead.pid}", f"best.pth.tmp.{os.getppid()}",
                 f"notes.tmp.{dead.pid}"):  # the last one the user's own, not a file a run writes
        (out / name).write_bytes(b"PK half")
    try:
        start_output_dir(out, {})  # as any start claims it: a resume, or the same command again
    finally:
        release_output_dirs()
    assert sorted(os.listdir(out)) == [".lock", "args.json", f"best.pth.tmp.{os.getppid()}", f"notes.tmp.{dead.pid}"]
    assert f"note: removed bad_samples.txt.tmp.{dead.pid}, checkpoint.pth.tmp.{dead.pid} from {out}: left by a save " \
           "that was cut short" in capsys.readouterr().out


def test_a_listed_image_that_is_gone_is_not_told_to_be_deleted(tmp_path):
    from common.log import SampleError
    data = write_tree(tmp_path / "data")
    folder = image_folder(data / "train", ["cat", "dog", "fox"], cache_dir=tmp_path / "cache")
    gone = data / "train" / "dog" / "3.jpg"
    gone.unlink()  # after the listing, or missed by a cached one
    with pytest.raises(SampleError) as error:
        folder[[path for path, _ in folder.samples].index(str(gone))]
    assert str(error.value) == (
        f"image {gone} was listed but no longer exists (moved or deleted since): put it back, or take it out of the "
        "data; if a start-up line named a cache of the listing (file_list_*.npz), delete that file to list the data "
        "anew")
