"""Classification from list files (--train-list, --val-list: a CSV of path,label rows): training, --test-only and
eval.py on the same data, relative and absolute paths, one line with the line number for each bad row, the cache,
bad files skipped, and tools/check_data.py."""
import argparse
import csv
import json
import shutil
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from common.log import UserError
from conftest import evaluate, train, write_image

FLAGS = ["--model", "resnet18", "--device", "cpu", "-b", "4", "-j", "0", "--epochs", "1", "--train-crop-size", "16",
         "--val-resize-size", "16", "--val-crop-size", "16", "--print-freq", "10"]
CLASSES = ["dent", "good", "scratch"]


def write_list(path, rows, header="path,label"):
    """A CSV as the csv module writes it: a path holding a comma is quoted."""
    with open(path, "w", newline="") as f:
        f.write(f"{header}\n" if header else "")
        csv.writer(f, lineterminator="\n").writerows(rows)
    return path


def list_set(root, train_per_class=2, val_per_class=1):
    """Small random JPEGs in root/images/, and train.csv and val.csv naming them relative to root."""
    rows = {}
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        rows[split] = []
        for c, name in enumerate(CLASSES):
            for i in range(count):
                path = f"images/{split}_{name}_{i}.jpg"
                write_image(root / path, size=(20, 18), seed=10 * c + i + 5 * (split == "val"))
                rows[split].append((path, name))
        write_list(root / f"{split}.csv", rows[split])
    return root


def rows_of(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))[1:]


def lists(data, *argv):
    return ["--data-path", data, "--train-list", data / "train.csv", "--val-list", data / "val.csv", *argv]


def parsed(*argv):
    from classification import train as script
    return script.finish_args(script.get_args_parser().parse_args([str(a) for a in argv]))


# --- learning, and the same data for --test-only and eval.py


def colour_set(root, seed=0):
    """Two classes a model learns in a few dozen steps, so that a label read off the wrong row shows as chance: red
    images are `good`, blue ones `dent`."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", 96), ("val", 40)):
        rows = []
        for i in range(count):
            k = int(rng.integers(2))
            pixels = rng.integers(0, 160, (16, 16, 3), dtype=np.uint8)
            pixels[..., 2 * k] += 90
            (root / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / split / f"{i}.png")
            rows.append((f"{split}/{i}.png", ("good", "dent")[k]))
        write_list(root / f"{split}.csv", rows)
    return root


LEARNING = ["--opt", "adamw", "--lr", "1e-3", "--lr-warmup-epochs", "0", "--lr-scheduler", "cosineannealinglr",
            "-b", "16", "--epochs", "2"]


@pytest.fixture(scope="module")
def list_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lists")
    data, out = colour_set(root / "data"), root / "out"
    train(*lists(data), *FLAGS, *LEARNING, "--output-dir", out)
    return data, out


def test_a_list_file_set_is_learned_far_above_chance(list_run):
    _, out = list_run
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[-1]["val_acc1"] > 85  # chance: about 50
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert checkpoint["class_names"] == ["dent", "good"]
    assert checkpoint["args"]["train_list"].endswith("train.csv") and checkpoint["args"]["classes_file"] is None


def test_test_only_and_eval_take_the_lists_from_the_checkpoint(list_run, tmp_path, capsys):
    data, out = list_run
    last = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][-1]
    train("--device", "cpu", "-j", "0", "--test-only", "--resume", out / "checkpoint.pth")
    assert f"Test: top-1 {last['val_acc1']:.3f}" in capsys.readouterr().out
    evaluate("--checkpoint", out / "checkpoint.pth", "--device", "cpu", "-j", "0", "--output-json", tmp_path / "e.json")
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["acc1"] == pytest.approx(last["val_acc1"]) and set(result["per_class_acc"]) == {"dent", "good"}
    # Another list of absolute paths, no --data-path: the checkpoint's classes label it.
    rows = rows_of(data / "val.csv")
    write_list(tmp_path / "abs.csv", [(str(data / path), label) for path, label in rows[:10]])
    evaluate("--checkpoint", out / "checkpoint.pth", "--val-list", tmp_path / "abs.csv", "--device", "cpu", "-j", "0",
             "--output-json", tmp_path / "abs.json")
    assert json.loads((tmp_path / "abs.json").read_text())["num_samples"] == 10
    write_list(tmp_path / "yak.csv", [(str(data / rows[0][0]), "good"), (str(data / rows[1][0]), "yak")])
    with pytest.raises(UserError, match=r"^list file .*yak.csv line 3: label yak is not one of the 2 classes the "
                                        r"model is trained on \(dent, good\): correct the label, or add images"):
        evaluate("--checkpoint", out / "checkpoint.pth", "--val-list", tmp_path / "yak.csv", "--device", "cpu")


def test_eval_with_a_data_path_of_its_own_reads_its_val_folder_not_the_checkpoints_list(list_run, tmp_path):
    data, out = list_run
    for path, label in rows_of(data / "val.csv")[:6]:  # the same images, sorted into class folders
        (tmp_path / "tree" / "val" / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(data / path, tmp_path / "tree" / "val" / label)
    evaluate("--checkpoint", out / "checkpoint.pth", "--data-path", tmp_path / "tree", "--device", "cpu", "-j", "0",
             "--output-json", tmp_path / "tree.json")
    assert json.loads((tmp_path / "tree.json").read_text())["num_samples"] == 6


def test_resuming_with_a_list_of_other_classes_is_refused(list_run, tmp_path):
    data, out = list_run
    for split in ("train", "val"):
        text = (data / f"{split}.csv").read_text()
        (tmp_path / f"{split}.csv").write_text(text.replace(",dent", ",scratch"))
    with pytest.raises(UserError, match=r"cannot resume from .*: it was trained with class_names \['dent', 'good'\], "
                                        r"this run has \['good', 'scratch'\]"):
        train("--data-path", data, "--train-list", tmp_path / "train.csv", "--val-list", tmp_path / "val.csv",
              *FLAGS, *LEARNING, "--output-dir", tmp_path / "out", "--resume", out / "checkpoint.pth")


# --- paths, the CSV's dialects, both backends


def test_relative_and_absolute_paths_quotes_bom_and_crlf_read_alike(tmp_path):
    from classification.data import dataset_classes, load_train, split_files
    from common.bad_samples import BadSamples
    from common.data import BatchLayout
    data = list_set(tmp_path / "data")
    write_image(data / "images" / "a,b.jpg")
    write_list(data / "train.csv", rows_of(data / "train.csv") + [("images/a,b.jpg", "dent")])
    relative = parsed(*lists(data), *FLAGS)
    # Absolute paths, no --data-path; a byte-order mark, CRLF line ends, spaces around labels, a blank line.
    for split in ("train", "val"):
        rows = rows_of(data / f"{split}.csv")
        text = "path,label\r\n" + "".join(f'"{data / path}", {label}\r\n\r\n' for path, label in rows)
        (tmp_path / f"{split}.csv").write_bytes(text.encode("utf-8-sig"))
    absolute = parsed("--train-list", tmp_path / "train.csv", "--val-list", tmp_path / "val.csv", *FLAGS)
    assert absolute.data_path == "" and absolute.batch_size == 4  # the real data's recipe, not the synthetic set's
    for split in ("train", "val"):
        samples = [list(split_files(args, split, CLASSES).samples) for args in (relative, absolute)]
        assert samples[0] == samples[1] and len(samples[0]) == (7 if split == "train" else 3)
    assert dataset_classes(absolute) == CLASSES and samples[0][-1] == (str(data / "images" / "val_scratch_0.jpg"), 2)
    assert (str(data / "images" / "a,b.jpg"), 0) in list(split_files(absolute, "train", CLASSES).samples)
    absolute.data_backend = "gpu"  # the device decodes: on the CPU here
    images, labels = next(iter(load_train(absolute, BatchLayout(batch_size=4), torch.device("cpu"), CLASSES,
                                          BadSamples(0))))
    assert images.shape == (4, 3, 16, 16) and set(labels.tolist()) <= {0, 1, 2}


def test_a_classes_file_sets_the_label_order(tmp_path):
    from classification.data import dataset_classes, split_files
    data = list_set(tmp_path / "data")
    (data / "classes.txt").write_text("scratch\ngood\ndent\nrust\n\n")
    args = parsed(*lists(data, "--classes-file", data / "classes.txt"), *FLAGS)
    assert dataset_classes(args) == ["scratch", "good", "dent", "rust"]
    assert list(split_files(args, "val", dataset_classes(args)).samples)[0] == (str(data / "images/val_dent_0.jpg"), 2)


# --- one line, with the line number, for each bad list


def edit(path, old, new):
    path.write_text(path.read_text().replace(old, new))


BAD_LISTS = {
    "no header": (lambda d: edit(d / "train.csv", "path,label\n", ""),
                  r"^list file .*train.csv line 1 is images/train_dent_0.jpg,dent, not the header path,label: make "
                  r"the first line path,label"),
    "other columns": (lambda d: edit(d / "val.csv", "path,label", "file,class"),
                      r"^list file .*val.csv line 1 is file,class, not the header path,label"),
    "three fields": (lambda d: edit(d / "train.csv", "images/train_good_1.jpg", "images/a,b.jpg"),
                     r"^list file .*train.csv line 5 has 3 fields, not 2 \(path,label\): quote a path that holds a "
                     r"comma"),
    "no label": (lambda d: edit(d / "train.csv", "train_good_0.jpg,good", "train_good_0.jpg, "),
                 r"^list file .*train.csv line 4 has an empty label: give each image its path and class name, or "
                 r"delete the line$"),
    "no path": (lambda d: edit(d / "val.csv", "images/val_good_0.jpg,", ","),
                r"^list file .*val.csv line 3 has an empty path"),
    "a missing file": (lambda d: edit(d / "train.csv", "train_scratch_1", "gone"),
                       r"^list file .*train.csv line 7: image .*data/images/gone.jpg does not exist: correct the path "
                       r"\(relative paths start at --data-path .*data\) or delete the line$"),
    "an image twice": (lambda d: edit(d / "train.csv", "images/train_good_1.jpg", "./images/train_dent_0.jpg"),
                       r"^list file .*train.csv names ./images/train_dent_0.jpg twice \(lines 2 and 5\): a repeated "
                       r"image counts several times in training and accuracy; delete line 5$"),
    "a val label train lacks": (lambda d: edit(d / "val.csv", "val_good_0.jpg,good", "val_good_0.jpg,yak"),
                                r"^list file .*val.csv line 3: label yak is not one of the 3 classes the model is "
                                r"trained on \(dent, good, scratch\): correct the label, or add images of that class "
                                r"to the train list \(or the class to --classes-file\)$"),
    "not UTF-8": (lambda d: (d / "train.csv").write_bytes((d / "train.csv").read_bytes() + "caf\xe9,dent\n"
                                                          .encode("latin-1")),
                  r"^cannot read list file .*train.csv \(line 8: UnicodeDecodeError: .*\): it must be UTF-8 text, a "
                  r"CSV of path,label rows$"),
    "one class": (lambda d: write_list(d / "train.csv", [("images/train_good_0.jpg", "good")]),
                  r"^list file .*train.csv has 1 class \(good\): a classifier needs at least 2: label images of "
                  r"another class too$"),
    "no rows": (lambda d: write_list(d / "val.csv", []),
                r"^list file .*val.csv lists no images: add path,label rows below its header$"),
}


@pytest.mark.parametrize("case", BAD_LISTS)
def test_a_bad_list_is_refused_with_its_line(tmp_path, case):
    data = list_set(tmp_path / "data")
    change, message = BAD_LISTS[case]
    change(data)
    with pytest.raises(UserError, match=message):
        train(*lists(data), *FLAGS)


@pytest.mark.parametrize("flags, message", [
    (["--train-list", "{d}/train.csv"], r"^--train-list and --val-list go together \(and --classes-file with them\)"),
    (["--data-path", "{d}", "--train-list", "{d}/train.csv", "--val-list", "{d}/nowhere.csv"],
     r"^cannot read list file .*nowhere.csv \(FileNotFoundError: .*\): check the path$"),
    (["--train-list", "{d}/train.csv", "--val-list", "{d}/val.csv"],
     r"^list file .*train.csv line 2: images/train_dent_0.jpg is a relative path, and there is no --data-path for it "
     r"to start from: give --data-path, or absolute paths$"),
    (["--data-path", "{d}", "--train-list", "{d}/train.csv", "--val-list", "{d}/val.csv", "--classes-file",
      "{d}/classes.txt"], r"^classes file .*classes.txt names good twice \(lines 1 and 3\): each class once; delete "
                          r"line 3$"),
    (["--data-path", "{d}", "--train-list", "{d}/train.csv", "--val-list", "{d}/val.csv", "--classes-file",
      "{d}/gap.txt"], r"^classes file .*gap.txt line 2 is empty: one class name a line; delete the line$"),
    (["--data-path", "{d}", "--train-list", "{d}/train.csv", "--val-list", "{d}/val.csv", "--classes-file",
      "{d}/two.txt"], r"^list file .*val.csv line 4: label scratch is not one of the 2 classes the model is trained on "
                      r"\(dent, good\)"),
])
def test_list_flags_that_do_not_fit_are_refused(tmp_path, flags, message):
    data = list_set(tmp_path / "data")
    (data / "classes.txt").write_text("good\ndent\ngood\n")
    (data / "two.txt").write_text("dent\ngood\n")
    (data / "gap.txt").write_text("dent\n\ngood\n")
    with pytest.raises(UserError, match=message):
        train(*[flag.format(d=data) for flag in flags], *FLAGS)


# --- the cache, bad files, check_data.py


def test_the_cache_reads_an_edited_or_replaced_list_again_and_an_unchanged_one_not(tmp_path, capsys):
    from classification.data import split_files
    data = list_set(tmp_path / "data")
    csv_path, cache = data / "train.csv", tmp_path / "cache"
    hour_ago = time.time_ns() - 3600 * 10**9  # a list changed within seconds of its reading is not cached
    os.utime(csv_path, ns=(hour_ago, hour_ago))
    args = argparse.Namespace(data_path=str(data), train_list=str(csv_path), list_cache=str(cache))

    def labels():
        files = split_files(args, "train", CLASSES)
        return [label for _, label in files.samples], capsys.readouterr().out

    first, said = labels()
    assert first == [0, 0, 1, 1, 2, 2] and "(read, every file checked)" in said
    (data / "images" / "train_dent_0.jpg").unlink()  # the cache spares the stat of every file: not seen now
    again, said = labels()
    assert again == first and f"(from {cache}/file_list_train_list.npz)" in said
    write_image(data / "images" / "train_dent_0.jpg")
    swapped = csv_path.read_text().replace(",dent", ",DENT").replace(",good", ",dent").replace(",DENT", ",good")
    csv_path.write_text(swapped)  # edited in place: same size, its modification time put back
    os.utime(csv_path, ns=(hour_ago, hour_ago))
    second, said = labels()
    assert second == [1, 1, 0, 0, 2, 2] and "(read, every file checked)" in said
    labels()
    (tmp_path / "new.csv").write_text(csv_path.read_text().replace(",scratch", ",dent"))
    os.utime(tmp_path / "new.csv", ns=(hour_ago, hour_ago))
    os.replace(tmp_path / "new.csv", csv_path)  # replaced by another file of the same time
    third, said = labels()
    assert third == [1, 1, 0, 0, 0, 0] and "(read, every file checked)" in said


def test_bad_files_of_a_list_are_skipped_with_max_bad_samples(tmp_path):
    data = list_set(tmp_path / "data", train_per_class=4)
    (data / "images" / "train_good_2.jpg").write_bytes(b"")
    train(*lists(data), *FLAGS, "--max-bad-samples", "1", "--output-dir", tmp_path / "out")
    reported = (tmp_path / "out" / "bad_samples.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in reported] == [str(data / "images" / "train_good_2.jpg")]


def test_check_data_reports_every_bad_file_of_the_lists_with_its_line(tmp_path, capsys):
    from test_data_at_scale import check_data
    data = list_set(tmp_path / "data")
    (data / "images" / "train_good_1.jpg").write_bytes(b"")
    (data / "images" / "val_dent_0.jpg").unlink()
    out = check_data(capsys, *lists(data), "-j", "2", "--epochs", "3")
    bad = [line for line in out.splitlines() if line.startswith("bad: ")]
    assert len(bad) == 2
    assert bad[0].startswith(f"bad: list file {data}/train.csv line 5: cannot read image {data}/images/train_good_1")
    assert bad[1].startswith(f"bad: list file {data}/val.csv line 2: image {data}/images/val_dent_0.jpg was listed but "
                             "no longer exists")
    assert "train: 6 samples, 1 bad files (good 1)" in out and "val: 3 samples, 1 bad files (dent 1)" in out



def test_training_reads_each_list_once(tmp_path, monkeypatch):
    from classification import list_file
    from classification.data import dataset_classes, split_files
    data, read = list_set(tmp_path / "data"), []
    real = list_file.read_text
    monkeypatch.setattr(list_file, "read_text", lambda path, *rest: (read.append(path), real(path, *rest))[1])
    args = parsed(*lists(data), *FLAGS)
    names = dataset_classes(args)  # the train list's labels; then its images, from the same reading
    assert [len(split_files(args, split, names)) for split in ("val", "train")] == [3, 6]
    assert sorted(map(os.path.basename, read)) == ["train.csv", "val.csv"]
