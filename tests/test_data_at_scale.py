"""Full-scale data without surprises, on tiny trees in the real layouts: the tree listed once (by rank 0) and cached,
every bad file found before training (tools/check_data.py), a bounded skip of files that break mid-run
(--max-bad-samples), and ImageNet's flat val/ sorted (tools/sort_imagenet_val.py)."""
import gc
import json
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

from classification.data import image_folder
from common.bad_samples import BadSamples, SkipBadSamples, stand_in_index
from common.log import SampleError, UserError
from conftest import ENV, ROOT, train, train_segmentation, write_image, write_tree

IMAGE_FLAGS = ["--model", "resnet18", "--device", "cpu", "-b", "4", "--epochs", "1", "--train-crop-size", "32",
               "--val-resize-size", "32", "--val-crop-size", "32", "--print-freq", "1"]
CLASSES = ["cat", "dog", "fox"]


def settled(root):
    """Date every folder an hour back: the cache does not trust a folder changed within seconds of its listing."""
    hour_ago = time.time() - 3600
    for folder, _, _ in os.walk(root):
        os.utime(folder, (hour_ago, hour_ago))


def listed_class_folders(monkeypatch, split_dir):
    """The class folders os.scandir is called on (at any depth below them), recorded as the listing runs."""
    seen, real = [], os.scandir

    def counting(path="."):
        relative = os.path.relpath(os.fspath(path), split_dir)
        if relative != ".":
            seen.append(relative.split(os.sep)[0])
        return real(path)
    monkeypatch.setattr(os, "scandir", counting)
    return seen


def corrupt(data):
    """A truncated JPEG and a zero-byte file among train/'s images, in place of two good ones."""
    good = (data / "train" / "dog" / "3.jpg").read_bytes()
    (data / "train" / "dog" / "3.jpg").write_bytes(good[: len(good) // 3])
    (data / "train" / "cat" / "5.jpg").write_bytes(b"")
    return {str(data / "train" / "dog" / "3.jpg"), str(data / "train" / "cat" / "5.jpg")}


# --- the tree listed once and cached


def test_a_restart_lists_no_file_and_a_changed_class_folder_is_listed_again_alone(tmp_path, monkeypatch):
    data = write_tree(tmp_path / "data")
    write_image(data / "train" / "cat" / "sub" / "0.jpg")
    settled(data)
    train_dir, cache = data / "train", tmp_path / "cache"
    seen = listed_class_folders(monkeypatch, train_dir)
    first = list(image_folder(train_dir, CLASSES, cache_dir=cache).samples)
    assert sorted(set(seen)) == CLASSES and (cache / "file_list_train.npz").is_file()
    seen.clear()
    assert list(image_folder(train_dir, CLASSES, cache_dir=cache).samples) == first and seen == []
    write_image(data / "train" / "dog" / "new.jpg")  # dog/ itself changes
    write_image(data / "train" / "cat" / "sub" / "1.jpg", seed=1)  # a folder inside cat/ changes
    third = list(image_folder(train_dir, CLASSES, cache_dir=cache).samples)
    assert sorted(set(seen)) == ["cat", "dog"]
    new = {(str(train_dir / "dog" / "new.jpg"), 1), (str(train_dir / "cat" / "sub" / "1.jpg"), 0)}
    assert set(third) - set(first) == new
    assert [path for path, _ in third] == sorted(path for path, _ in third)  # torchvision's order, as before


def test_a_cache_of_another_tree_or_unreadable_is_listed_again(tmp_path, monkeypatch, capsys):
    data = write_tree(tmp_path / "data")
    settled(data)
    cache = tmp_path / "cache"
    image_folder(data / "train", CLASSES, cache_dir=cache)
    other = write_tree(tmp_path / "other", train_per_class=2)
    settled(other)
    seen = listed_class_folders(monkeypatch, other / "train")
    assert len(image_folder(other / "train", CLASSES, cache_dir=cache)) == 6 and sorted(set(seen)) == CLASSES
    (cache / "file_list_train.npz").write_bytes(b"half a file")
    seen.clear()
    assert len(image_folder(other / "train", CLASSES, cache_dir=cache)) == 6 and sorted(set(seen)) == CLASSES
    assert "note: the file list cache " in capsys.readouterr().out


def test_samples_are_arrays_not_python_objects(tmp_path):
    data = write_tree(tmp_path / "data", train_per_class=300, val_per_class=0)
    gc.collect()
    before = len(gc.get_objects())
    folder = image_folder(data / "train", CLASSES)
    gc.collect()
    assert len(folder) == 900 and len(gc.get_objects()) - before < 100  # a list of tuples would add 900
    assert folder.samples[-1] == (str(data / "train" / "fox" / "99.jpg"), 2)


RANK = """
import json, os, sys
import torch.distributed as dist
from classification.data import dataset_classes, image_folder
from common.bad_samples import BadSamples
rank, store, data, out = int(sys.argv[1]), *sys.argv[2:]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
seen, real = [], os.scandir
os.scandir = lambda path=".": (seen.append(os.fspath(path)), real(path))[1]
args = type("Args", (), {"data_path": data, "synthetic_classes": None})()
folder = image_folder(os.path.join(data, "train"), dataset_classes(args), cache_dir=out)
bad = BadSamples(3, out)
if rank == 1:  # as when one of its workers reported a file that failed
    bad.record([((7, "x.jpg", "cannot read image x.jpg"),)])
bad.agree()
print(json.dumps({"scanned": len(seen), "samples": len(folder), "known": sorted(bad.known)}))
dist.destroy_process_group()
"""


def test_only_rank_0_lists_the_tree_and_every_rank_counts_bad_samples(tmp_path):
    data = write_tree(tmp_path / "data")
    out = tmp_path / "out"
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(rank), str(tmp_path / "store"), str(data), str(out)],
                              cwd=ROOT, env={**ENV, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    results = [json.loads(rank.communicate(timeout=600)[0].strip().splitlines()[-1]) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0]
    assert results[0]["scanned"] >= 4 and results[1]["scanned"] == 0  # train/ and its 3 class folders: rank 0 only
    assert results[0]["samples"] == results[1]["samples"] == 24
    assert results[0]["known"] == results[1]["known"] == [7]
    assert (out / "bad_samples.txt").read_text() == "x.jpg\tcannot read image x.jpg\n"


# --- ImageNet's val/ as distributed


def flat_val(data, labels):
    """ImageNet's val/ as it comes: every image in one folder, named by number, the labels elsewhere."""
    for k, wnid in enumerate(labels, 1):
        write_image(data / "val" / f"ILSVRC2012_val_{k:08d}.JPEG", fmt="JPEG", seed=k)


def sort_val(*argv):
    from tools import sort_imagenet_val as tool
    tool.main(tool.get_args_parser().parse_args([str(a) for a in argv]))


def test_a_flat_val_folder_names_the_command_that_sorts_it(tmp_path, capsys):
    data = write_tree(tmp_path / "data", classes=("n01440764", "n01443537"), val_per_class=0)
    labels = ["n01443537", "n01440764", "n01443537"]
    flat_val(data, labels)
    with pytest.raises(UserError, match=r"data/val holds 3 images and no class folders: sort them into class folders "
                                        r"with: python tools/sort_imagenet_val.py .*data/val LOC_val_solution.csv"):
        train("--data-path", data, *IMAGE_FLAGS, "-j", "0")
    rows = [f"ILSVRC2012_val_{k:08d},{wnid} 1 2 30 40 {wnid} 5 6 7 8\n" for k, wnid in enumerate(labels, 1)]
    (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(rows))
    sort_val(data / "val", tmp_path / "LOC_val_solution.csv")
    assert "moved 3 images into 2 class folders" in capsys.readouterr().out
    val = image_folder(data / "val", ["n01440764", "n01443537"])
    assert [(os.path.basename(path), label) for path, label in val.samples] == [
        ("ILSVRC2012_val_00000002.JPEG", 0), ("ILSVRC2012_val_00000001.JPEG", 1), ("ILSVRC2012_val_00000003.JPEG", 1)]


def test_images_beside_class_folders_are_never_left_out_unsaid(tmp_path):
    # Named, and not told to sort val/ with ImageNet's label file, which is for a val/ with no class folders.
    data = write_tree(tmp_path / "data")
    write_image(data / "val" / "stray.jpg")
    with pytest.raises(UserError, match=r"data/val holds 1 image beside its class folders \(stray.jpg\), which no "
                                        r"class would read: move each image into the folder of its class, or delete "
                                        r"it$"):
        train("--data-path", data, *IMAGE_FLAGS, "-j", "0")


def test_the_devkit_ground_truth_sorts_val_too(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    data = tmp_path / "imagenet"
    flat_val(data, ["n01443537", "n01440764"])
    devkit = tmp_path / "ILSVRC2012_devkit_t12"
    (devkit / "data").mkdir(parents=True)
    synsets = np.array([(1, "n01440764", 0), (2, "n01443537", 0), (1001, "n00001740", 2)],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    scipy_io.savemat(devkit / "data" / "meta.mat", {"synsets": synsets})
    (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("2\n1\n")
    with tarfile.open(tmp_path / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as archive:
        archive.add(devkit, arcname="ILSVRC2012_devkit_t12")
    sort_val(data / "val", tmp_path / "ILSVRC2012_devkit_t12.tar.gz")
    assert sorted(p.relative_to(data / "val").as_posix() for p in (data / "val").rglob("*.JPEG")) == [
        "n01440764/ILSVRC2012_val_00000002.JPEG", "n01443537/ILSVRC2012_val_00000001.JPEG"]


# --- every bad file found before training


def test_check_data_reports_every_bad_file_of_an_image_folder_tree_at_once(tmp_path, capsys):
    data = write_tree(tmp_path / "data")
    bad = corrupt(data)
    (data / "val" / "fox" / "text.jpg").write_text("not an image")
    os.mkfifo(data / "train" / "fox" / "pipe.jpg")
    out = check_data(capsys, "--data-path", data, "-j", "2", "-b", "4")  # -b: a training flag, ignored
    named = [line for line in out.splitlines() if line.startswith("bad: ")]
    assert len(named) == 4 and all(any(path in line for line in named) for path in bad)
    assert any("pipe.jpg is a FIFO" in line for line in named) and any("val/fox/text.jpg" in line for line in named)
    assert "train: 24 samples, 3 bad files (cat 1, dog 1, fox 1)" in out
    assert "val: 10 samples, 1 bad files (fox 1)" in out
    assert "note: flags that do not choose the data are ignored: -b 4" in out


def check_data(capsys, *argv):
    """tools/check_data.py in this process; its output, once it has exited with status 1 (bad files found)."""
    from tools import check_data as tool
    with pytest.raises(SystemExit) as stopped:
        tool.main(tool.parse_args([str(a) for a in argv]))
    assert stopped.value.code == 1
    return capsys.readouterr().out


def test_check_data_reads_every_mask_with_training_checks(tmp_path, capsys):
    from test_seg_datasets import grid, write_cityscapes_frame, write_mask
    root = tmp_path / "cityscapes"
    for k, city in enumerate(("aachen", "bremen", "bremen")):
        write_cityscapes_frame(root, f"{city}_00000{k}_000019", seed=k)
    write_cityscapes_frame(root, "zurich_000000_000019", split="val")
    write_mask(root / "gtFine" / "train" / "bremen" / "bremen_000001_000019_gtFine_labelIds.png", grid([7, 40]))
    (root / "leftImg8bit" / "train" / "bremen" / "bremen_000002_000019_leftImg8bit.png").write_bytes(b"")
    write_mask(root / "gtFine" / "val" / "zurich" / "zurich_000000_000019_gtFine_labelIds.png", grid([7], width=8))
    out = check_data(capsys, "--dataset", "cityscapes", "--data-path", root, "-j", "0")
    assert "holds values that are not allowed: 40" in out and "bremen_000002_000019_leftImg8bit.png" in out
    assert "is 24x16 but its mask" in out
    assert "train: 3 samples, 2 bad files (bremen 2)" in out and "val: 1 samples, 1 bad files (zurich 1)" in out


# --- a bounded skip of files that break mid-run


def test_a_stand_in_depends_on_the_seed_and_the_sample_alone():
    picks = [stand_in_index(0, index, 10) for index in range(10)]
    assert picks == [stand_in_index(0, index, 10) for index in range(10)]  # in any process, rank or epoch
    assert all(pick != index and 0 <= pick < 10 for index, pick in enumerate(picks))
    assert picks != [stand_in_index(1, index, 10) for index in range(10)]

    class Files:  # sample 3 cannot be read
        def __len__(self):
            return 10

        def path(self, index):
            return f"{index}.jpg"

        def __getitem__(self, index):
            if index == 3:
                raise SampleError("cannot read image 3.jpg")
            return index, index % 2

    sample = SkipBadSamples(Files(), seed=0, limit=1)[3]
    assert sample == (picks[3], picks[3] % 2, ((3, "3.jpg", "cannot read image 3.jpg"),))
    with pytest.raises(SampleError, match="cannot read image 3.jpg"):
        SkipBadSamples(Files(), seed=0, limit=0)[3]


def test_more_bad_samples_than_allowed_stop_with_one_line_and_the_list(tmp_path):
    data = write_tree(tmp_path / "data")
    bad = corrupt(data)
    with pytest.raises(UserError, match=r"cannot read image .*\(bad sample 2 of this run, more than "
                                        r"--max-bad-samples 1 allows; those met so far are in .*out/bad_samples.txt; "
                                        r"python tools/check_data"):
        train("--data-path", data, *IMAGE_FLAGS, "-j", "0", "--max-bad-samples", "1", "--output-dir", tmp_path / "out")
    assert {line.split("\t")[0] for line in (tmp_path / "out" / "bad_samples.txt").read_text().splitlines()} == bad


@pytest.mark.parametrize("backend", ["pil", "gpu"])
def test_bad_files_are_replaced_in_both_backends_and_listed(tmp_path, backend, capsys):
    data = write_tree(tmp_path / "data")
    bad = corrupt(data)  # gpu: the empty file fails in a worker (reading), the truncated one on the device (decoding)
    train("--data-path", data, *IMAGE_FLAGS, "-j", "1", "--max-bad-samples", "2", "--data-backend", backend,
          "--output-dir", tmp_path / "out")
    listed = (tmp_path / "out" / "bad_samples.txt").read_text().splitlines()
    assert {line.split("\t")[0] for line in listed} == bad
    assert torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)["bad_samples"][0][1] in bad
    assert "a stand-in sample is trained on instead (bad sample 2 of at most 2)" in capsys.readouterr().out


def test_a_segmentation_mask_that_breaks_is_replaced_on_the_device_path(tmp_path):
    from test_segmentation import write_cityscapes
    root = write_cityscapes(tmp_path / "cityscapes")
    mask = root / "gtFine" / "train" / "aachen" / "aachen_000000_000001_gtFine_labelIds.png"
    Image.fromarray(np.full((32, 64), 99, np.uint8)).save(mask)
    train_segmentation("--dataset", "cityscapes", "--data-path", root, "--model", "unet", "--unet-width", "4",
                       "--device", "cpu", "-b", "2", "-j", "0", "--epochs", "1", "--crop-size", "32", "64",
                       "--base-size", "16", "--data-backend", "gpu", "--max-bad-samples", "1",
                       "--output-dir", tmp_path / "out")
    line = (tmp_path / "out" / "bad_samples.txt").read_text()
    assert line.startswith(str(root / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000001_leftImg8bit.png"))
    assert "holds values that are not allowed: 99" in line


def test_a_resumed_run_counts_the_bad_samples_of_its_checkpoint(tmp_path):
    bad_samples = BadSamples(1)
    with pytest.raises(UserError, match=r"the checkpoint counts 2 bad samples, more than --max-bad-samples 1: resume "
                                        r"with --max-bad-samples 2 or more"):
        bad_samples.load_state([[3, "a.jpg", "cannot read image a.jpg"], [9, "b.jpg", "cannot read image b.jpg"]])
    bad_samples = BadSamples(2)
    bad_samples.load_state([[3, "a.jpg", "cannot read image a.jpg"]])
    bad_samples.record([((3, "a.jpg", "cannot read image a.jpg"),), ()])  # met again: counted once
    bad_samples.record([((9, "b.jpg", "cannot read image b.jpg"),)])
    with pytest.raises(SampleError, match=r"cannot read image c.jpg \(bad sample 3 of this run, more than "):
        bad_samples.record([((4, "c.jpg", "cannot read image c.jpg"),)])


def test_a_run_without_a_budget_refuses_a_checkpoint_that_counts_bad_samples(tmp_path):
    from common.checkpoint import Checkpointer, load_checkpoint
    from common.engine import Precision, StepParts
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    precision = Precision(torch.device("cpu"))
    parts = StepParts(model, None, optimizer, scheduler, precision.grad_scaler(optimizer), precision)
    checkpointer = Checkpointer(parts, tmp_path, True, flags={}, score=("best_acc1", "top-1"))  # --max-bad-samples 0
    checkpointer.save_on_all_ranks(0)
    path = tmp_path / "checkpoint.pth"
    checkpoint = load_checkpoint(path)
    assert checkpoint["bad_samples"] == []
    assert checkpointer.resume(path, None, ()) == (1, 0)
    checkpoint["bad_samples"] = [[3, "a.jpg", "cannot read image a.jpg"], [9, "b.jpg", "cannot read image b.jpg"]]
    torch.save(checkpoint, path)
    with pytest.raises(UserError, match=r"^the checkpoint counts 2 bad samples, more than --max-bad-samples 0: resume "
                                        r"with --max-bad-samples 2 or more$"):
        checkpointer.resume(path, None, ())


@pytest.mark.parametrize("script", ["classification", "segmentation"])
@pytest.mark.parametrize("flag, value, rule", [("--max-bad-samples", "-1", "0 or a positive integer"),
                                               ("--eval-interval", "-5", "0 or a positive integer")])
def test_bad_values_of_the_new_flags_are_one_line(script, flag, value, rule, capsys):
    module = __import__(f"{script}.train").train
    with pytest.raises(SystemExit):
        module.get_args_parser().parse_args([flag, value])
    assert f"argument {flag}: must be {rule}, got {value}" in capsys.readouterr().err


def test_a_list_cache_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "cache").write_text("")
    with pytest.raises(UserError, match=r"--list-cache .*cache is a file: give a folder for the listing of the tree"):
        train("--list-cache", tmp_path / "cache", "--epochs", "1")


def test_check_data_workers_take_sigterm_as_it_comes_even_under_a_stop_handler():
    """A pool ends busy workers with SIGTERM; forked from a process whose handler only notes the signal (a run's
    preemption handler, or a test's RunGuards), they would go on, and the pool would wait for them forever."""
    import signal

    from tools import check_data as tool
    signal.signal(signal.SIGTERM, lambda *args: None)  # restored after the test (conftest)
    tool._start_pool_worker(checker=None)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
