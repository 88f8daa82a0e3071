"""tools/report.py: the confusion matrix a checkpoint keeps, the per-class scores computed from it, and the HTML page,
rendered by a real browser (headless Chromium)."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from common.log import UserError, run_cli
from conftest import TINY, train
from tools import report

# Under CI (.ci/run) the browser and matplotlib must be there: a missing one fails instead of skipping.
REQUIRED = os.environ.get("REQUIRE_BROWSER") == "1"


def need(thing, why):
    if REQUIRED:
        pytest.fail(f"{thing} is missing and REQUIRE_BROWSER=1: {why}")
    pytest.skip(f"{thing} is not installed: {why}")


def matplotlib_or_skip():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        need("matplotlib", "pip install -r requirements-report.txt")


def chromium():
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        need("chromium", "apt-get install chromium (Debian), as .ci/run does as root")
    return browser


def browse(page, tmp_path, *flags):
    """Chromium on `page`, headless and offline; returns its stdout."""
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chromium-profile'}",
               *flags, page.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def check_in_browser(page, tmp_path, expected_images):
    """The page as Chromium loads it: every image decoded (a script added to a copy reports each one's size after
    the load event), and a screenshot that is mostly not blank."""
    probe = tmp_path / "probe.html"
    script = ("<script>addEventListener('load', () => document.body.setAttribute('data-images', JSON.stringify("
              "[...document.images].map(i => [i.id || i.alt, i.complete, i.naturalWidth]))));</script></body>")
    probe.write_text(page.read_text().replace("</body>", script))
    dom = browse(probe, tmp_path, "--virtual-time-budget=10000", "--dump-dom")
    found = re.search(r'data-images="([^"]*)"', dom)
    assert found, "the load event never came"
    images = json.loads(found.group(1).replace("&quot;", '"'))
    assert all(complete and width > 0 for _, complete, width in images), images  # each one decoded
    assert expected_images <= {name for name, _, _ in images}
    shot = tmp_path / "page.png"
    browse(page, tmp_path, f"--screenshot={shot}", "--window-size=1280,4000")
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    drawn = (pixels < 235).any(axis=2).mean()
    coloured = (pixels.max(axis=2) - pixels.min(axis=2) > 60).mean()  # the plots' lines, the pictures
    assert drawn > 0.05 and coloured > 0.01, (drawn, coloured)


def only_data_uris(text):
    """Nothing the page would fetch: every src and href is inline."""
    return all(link.startswith("data:") or link.startswith("#") for link in re.findall(r'(?:src|href)="([^"]*)"',
                                                                                          text))


# ---- the numbers, from a confusion matrix (numpy only) -----------------------------------------------------------

def test_per_class_scores_by_hand():
    matrix = np.array([[8, 2, 0], [1, 3, 0], [0, 0, 0]])  # rows true, columns predicted; class 2 never occurs
    scores = report.per_class_scores(matrix, "classification")
    assert scores["images"].tolist() == [10, 4, 0]
    assert scores["precision"][:2] == pytest.approx([100 * 8 / 9, 100 * 3 / 5])
    assert scores["recall"][:2] == pytest.approx([80, 75])
    f1 = 2 * (8 / 9) * 0.8 / (8 / 9 + 0.8)
    assert scores["F1"][0] == pytest.approx(100 * f1)
    assert np.isnan(scores["precision"][2]) and np.isnan(scores["F1"][2])
    seg = report.per_class_scores(matrix, "segmentation")
    assert seg["IoU"][:2] == pytest.approx([100 * 8 / 11, 100 * 3 / 6])
    assert seg["Dice"][:2] == pytest.approx([100 * 16 / 19, 100 * 6 / 9])
    assert np.isnan(seg["IoU"][2])


def test_the_most_confused_pairs_and_classes():
    matrix = np.diag([50] * 6)
    matrix[4, 1], matrix[2, 5], matrix[0, 3] = 9, 7, 1
    assert report.most_confused_pairs(matrix, 2) == [(4, 1, 9), (2, 5, 7)]
    assert report.most_confused_pairs(matrix, 10) == [(4, 1, 9), (2, 5, 7), (0, 3, 1)]  # no zero cells
    assert report.most_confused_classes(matrix, 3) == [1, 2, 4]  # 4 and 1 first, then 2: in class order


# ---- what a run keeps --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def interval_run(tmp_path_factory):
    """2 epochs of 4 steps validated every 3 steps: at 3, 6 and 8; epoch 0 ends at 4 without a validation."""
    out = tmp_path_factory.mktemp("interval")
    train(*TINY, "--epochs", "2", "--synthetic-train-size", "128", "--synthetic-val-size", "64", "--eval-interval", "3",
          "--keep-checkpoints", "2", "--output-dir", out)
    return out


def test_a_checkpoint_keeps_the_confusion_matrix_of_the_validation_it_was_saved_after(interval_run):
    records = [json.loads(line) for line in (interval_run / "log.jsonl").read_text().splitlines()]
    for name in ("best.pth", "checkpoint.pth"):
        checkpoint = torch.load(interval_run / name, weights_only=True)
        confusion = checkpoint["confusion"]
        assert confusion.dtype == torch.int64 and confusion.shape == (10, 10) and confusion.sum() == 64
        record = next(r for r in records if r["step"] == checkpoint["epoch"] * 4 + (checkpoint["step"] or 4))
        assert 100 * confusion.trace().item() / 64 == pytest.approx(record["val_acc1"])
    unvalidated = torch.load(interval_run / "checkpoint_epoch0.pth", weights_only=True)  # epoch 0's end, step 4
    assert unvalidated["confusion"] is None and not unvalidated["validated"]


def test_a_segmentation_checkpoint_keeps_the_pixel_counts(segmentation_run):
    checkpoint = torch.load(segmentation_run / "best.pth", weights_only=True)
    confusion = checkpoint["confusion"]
    assert confusion.shape == (3, 3) and confusion.sum() == 101 * 32 * 32  # every pixel of the 32x32 val scenes
    iou = report.per_class_scores(confusion.numpy(), "segmentation")["IoU"]
    assert np.nanmean(iou) == pytest.approx(checkpoint["best_miou"])


# ---- the page -----------------------------------------------------------------------------------------------------

def written_report(run, tmp_path):
    """(path, text) of the report of `run`, which fetches nothing."""
    matplotlib_or_skip()
    page = tmp_path / "report.html"
    report.write_report(run, page)
    text = page.read_text()
    assert only_data_uris(text)
    return page, text


def test_the_report_of_a_run_validated_every_few_steps(interval_run, tmp_path):
    page, text = written_report(interval_run, tmp_path)
    assert "python classification/train.py" in text and "--eval-interval 3" in text and "--epochs 2" in text
    best = torch.load(interval_run / "best.pth", weights_only=True)
    where = f"epoch {best['epoch']}" + (f", step {best['step']}" if best["step"] else "")
    assert f"best.pth was saved after ({where})" in text
    provenance = json.loads((interval_run / "args.json").read_text())["provenance"]
    assert f"torch {provenance['torch']}" in text and "<td>provenance</td>" not in text  # a sentence, not a flag
    rows = re.search(r'<table id="per-class">(.*?)</table>', text, re.S).group(1)
    assert rows.count("<tr>") == 1 + 10 + 1  # header, the classes, the total
    for name in ("val_acc1", "val_acc5", "train_loss"):
        assert f"<td>{name}</td>" in text
    assert "<div id=predictions>" in text and "val/predictions at step " in text
    check_in_browser(page, tmp_path, {"curves", "confusion", "val/predictions"})


def test_the_report_of_a_segmentation_run(segmentation_run, tmp_path):
    page, text = written_report(segmentation_run, tmp_path)
    assert "python segmentation/train.py" in text and ">IoU<" in text and ">Dice<" in text
    assert all(f"val_examples/{i} at epoch" in text for i in range(4))
    check_in_browser(page, tmp_path, {"curves", "confusion", "val_examples/0"})


def long_imagenet_run(folder, epochs=90, classes=1000, steps_per_epoch=5004):
    """What a 90-epoch ImageNet run leaves behind, in its shape: args.json, a log line per epoch, best.pth with a
    1000-class confusion matrix, and in tb/ the loss of some steps and a prediction grid of noise (PNG cannot
    compress it: the largest a grid can be)."""
    from torch.utils.tensorboard import SummaryWriter
    os.makedirs(folder)
    args = {"data_path": "/data/imagenet", "model": "resnet50", "epochs": epochs, "batch_size": 32, "lr": 0.1,
            "world_size": 8, "eval_interval": 0, "output_dir": str(folder)}
    (folder / "args.json").write_text(json.dumps(args))
    generator = np.random.default_rng(0)
    with open(folder / "log.jsonl", "w") as f:
        for epoch in range(epochs):
            f.write(json.dumps({"epoch": epoch, "step": (epoch + 1) * steps_per_epoch, "train_loss": 7 - epoch / 20,
                                "lr": 0.1 * 0.1 ** (epoch // 30), "val_acc1": 0.85 * epoch, "val_acc5": epoch,
                                "epoch_time_s": 600.0, "img_per_s": 3000.0, "max_memory_mib": 20000.0}) + "\n")
    confusion = torch.from_numpy(generator.poisson(0.05, (classes, classes))) + 38 * torch.eye(classes).long()
    torch.save({"epoch": epochs - 1, "step": None, "confusion": confusion, "best_acc1": 76.0,
                "class_names": [f"n{i:08d}" for i in range(classes)], "steps_per_epoch": steps_per_epoch},
               folder / "best.pth")
    writer = SummaryWriter(folder / "tb")
    for step in range(0, epochs * steps_per_epoch, 100):
        writer.add_scalar("train/loss", 7 - step / 1e5, step)
    noise = torch.from_numpy(generator.integers(0, 256, (3, 616, 512), dtype=np.uint8))
    writer.add_image("val/predictions", noise, epochs - 1)
    writer.add_image("val/confusion_matrix", noise, epochs - 1)
    writer.close()


def test_the_report_of_a_90_epoch_run_on_1000_classes_stays_under_5_mb(tmp_path):
    matplotlib_or_skip()
    long_imagenet_run(tmp_path / "run")
    page = report.write_report(tmp_path / "run")
    size = os.path.getsize(page)
    assert size < 5e6, size
    text = open(page).read()
    assert "All 1,000 classes, too many to name" in text and 'id="confusion-close-up"' in text
    assert re.search(r'<table id="per-class">(.*?)</table>', text, re.S).group(1).count("<tr>") == 1002


def test_a_cut_short_last_line_is_left_out_and_a_bad_one_refused(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"epoch": 0, "step": 4}\n{"epoch": 1, "step": 8}\n{"epoch": 2, "st')
    assert [r["epoch"] for r in report.read_records(tmp_path / "log.jsonl")] == [0, 1]
    (tmp_path / "log.jsonl").write_text('{"epoch": 0, "step": 4}\nnot json\n{"epoch": 1, "step": 8}\n')
    with pytest.raises(UserError, match=r"log.jsonl, line 2, is not a line of train.py's log"):
        report.read_records(tmp_path / "log.jsonl")


def test_a_folder_that_is_not_a_run_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        run_cli(report.main, report.get_args_parser().parse_args([str(tmp_path)]))
    assert stopped.value.code == 2 and capsys.readouterr().err.splitlines() == [
        f"error: {tmp_path / 'args.json'} does not exist: give the --output-dir of a training run (train.py writes "
        "args.json there when it starts)"]
    with pytest.raises(SystemExit):  # not "-o ...: folder does not exist"
        run_cli(report.main, report.get_args_parser().parse_args([str(tmp_path / "nowhere")]))
    assert capsys.readouterr().err == f"error: {tmp_path / 'nowhere'} is not a folder: give the --output-dir of a " \
                                      "training run\n"


def test_a_checkpoint_the_run_does_not_have_is_refused(interval_run, capsys):
    with pytest.raises(UserError, match=r"checkpoint_epoch9\.pth does not exist: give --checkpoint a checkpoint of the "
                                        r"run"):
        report.read_run(interval_run, "checkpoint_epoch9.pth")


def test_without_matplotlib_the_report_says_what_to_install(interval_run, tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure"):  # as if not installed, also after an import by another test
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(UserError, match="pip install -r requirements-report.txt"):
        report.write_report(interval_run, tmp_path / "report.html")
