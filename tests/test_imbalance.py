"""Imbalanced classes (README, "Imbalanced classes"): loss weights per class, the balanced sampler, the Dice loss, a
frozen backbone, and the numbers that show an imbalance, in the validation line, log.jsonl, TensorBoard and eval."""
import copy
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from common.class_weights import WeightedCrossEntropy, class_weights, read_class_weights
from common.freeze import freeze_all_but
from common.log import SampleError, UserError
from common.optim import param_groups
from common.synthetic import SHAPES
from conftest import SEG_TINY, TINY, evaluate, torchrun, train, train_segmentation
from segmentation.data import folder
from segmentation.datasets import ade20k
from segmentation.imbalance import class_weights as segmentation_class_weights
from segmentation.imbalance import dice_loss, value_counts
from segmentation.model import create_model as create_segmentation_model
from test_seg_datasets import ade_tree, grid, write_mask
from test_seg_folder import CLASSES_TXT, FOLDER_RUN, HEIGHT, WIDTH, coloured, folder_tree
from test_seg_folder import grid as folder_grid


def log_of(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def write_two_class_lists(root, train_counts=(380, 20), val_counts=(100, 100), size=16, looks_like_other=0.2):
    """Two classes, good and defect, as a labelling tool exports them: images in one folder under names that say
    nothing of their class, and train.csv and val.csv of path,label rows with `train_counts` and `val_counts`
    images each. A good part is bluish, a defect reddish (in noise), except that a share `looks_like_other` of
    each class looks like the other, as good parts and defects overlap: a model learns the colour in a few steps,
    and with the imbalance of `train_counts` the best answer for a reddish picture is still "good", so plain
    cross-entropy never finds a defect, while class weights or balanced sampling that make up for 19:1 find the
    reddish ones. Returns (root, train.csv, val.csv)."""
    generator = torch.Generator().manual_seed(0)
    (root / "images").mkdir(parents=True)
    lists = []
    for split, counts in (("train", train_counts), ("val", val_counts)):
        rows = ["path,label"]
        for label, (name, count) in enumerate(zip(("good", "defect"), counts)):
            reddish = (torch.rand(count, generator=generator) < looks_like_other).long() ^ label
            red = 0.25 + 0.5 * reddish + 0.3 * (torch.rand(count, generator=generator) - 0.5)
            colours = torch.stack([red, torch.full_like(red, 0.5), 1 - red], 1).view(count, 3, 1, 1)
            pictures = (colours + 0.1 * torch.randn(count, 3, size, size, generator=generator)).clamp(0, 1)
            for picture in (pictures * 255).round().to(torch.uint8):
                path = f"images/part_{len(rows) + 1000 * (split == 'val'):05d}.png"
                Image.fromarray(picture.permute(1, 2, 0).numpy()).save(root / path)
                rows.append(f"{path},{name}")
        lists.append(root / f"{split}.csv")
        lists[-1].write_text("\n".join(rows) + "\n")
    return root, *lists


# ---- the bar: on a 19:1 set, weights and the sampler each find the rare class that plain cross-entropy misses

# 4 epochs of 12 steps; the cosine schedule's last steps let the model settle.
TWO_CLASSES = ["--model", "resnet18", "--device", "cpu", "-j", "0", "-b", "32", "--train-crop-size", "16",
               "--val-resize-size", "16", "--val-crop-size", "16", "--opt", "adamw", "--lr", "3e-3",
               "--lr-warmup-epochs", "0", "--lr-scheduler", "cosineannealinglr", "--epochs", "4", "--print-freq", "100"]


@pytest.fixture(scope="module")
def rare_recall(tmp_path_factory):
    """The defect class's recall (eval.py --output-json) and the last log.jsonl line of a run with the given flags
    on one 19:1 list-file set; each run once."""
    root = tmp_path_factory.mktemp("imbalanced")
    (data, train_list, val_list), runs = write_two_class_lists(root / "data"), {}

    def recall(*flags):
        if flags not in runs:
            out = root / f"run{len(runs)}"
            train("--data-path", data, "--train-list", train_list, "--val-list", val_list, *TWO_CLASSES,
                  "--output-dir", out, *flags)
            evaluate("--checkpoint", out / "checkpoint.pth", "--device", "cpu", "-j", "0", "--output-json",
                     out / "scores.json")
            scores = json.loads((out / "scores.json").read_text())
            assert scores["per_class_recall"] == scores["per_class_acc"]  # the per-class accuracy is the recall
            assert {"macro_f1", "balanced_acc", "per_class_precision", "per_class_f1"} <= set(scores)
            runs[flags] = scores["per_class_recall"]["defect"], log_of(out)[-1]
        return runs[flags]
    return recall


@pytest.mark.xdist_group("imbalance-19-to-1")  # one worker: the module-scoped plain run is trained once
@pytest.mark.parametrize("flags", [("--class-weights", "balanced"), ("--balanced-sampler",)])
def test_on_a_19_to_1_set_the_rare_class_is_found_only_with_weights_or_the_balanced_sampler(rare_recall, flags,
                                                                                         capsys):
    # The same seed for all; the plain run's numbers from its one run.
    plain, plain_record = rare_recall()
    capsys.readouterr()
    balanced, record = rare_recall(*flags)
    assert plain < 10 and balanced > plain + 50, (plain, balanced)  # 0 and about 80 on every seed tried
    assert record["val_balanced_acc"] > plain_record["val_balanced_acc"] + 20
    assert {"val_acc1", "val_acc5", "val_macro_f1", "val_balanced_acc", "val_num_samples"} <= set(record)
    validation = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Epoch 3 val:")]
    assert f"macro F1 {record['val_macro_f1']:.3f}  balanced acc {record['val_balanced_acc']:.3f}" in validation[0]


# ---- class weights

def test_balanced_weights_are_inverse_to_the_class_counts_with_a_mean_of_1_per_image(capsys):
    labels = torch.tensor([0] * 90 + [1] * 10)
    weights = class_weights("balanced", ["good", "defect"], labels)
    assert weights.dtype == torch.float32 and weights.tolist() == pytest.approx([100 / (2 * 90), 100 / (2 * 10)])
    assert (weights[labels].mean()) == pytest.approx(1.0)  # the loss keeps its scale
    assert "class weights (balanced, scaled to a mean of 1 over the training images" in capsys.readouterr().out


def test_a_weighted_loss_means_the_same_on_any_layout_of_the_batch():
    # 1 process x 16 images or 2 x 8 (DDP averages the ranks' gradients): the same loss, as without weights.
    logits, targets = torch.randn(16, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([0] * 13 + [1] * 3)
    criterion = WeightedCrossEntropy(torch.tensor([0.6, 4.0]), label_smoothing=0.1)
    halves = (criterion(logits[::2], targets[::2]) + criterion(logits[1::2], targets[1::2])) / 2
    assert criterion(logits, targets).item() == pytest.approx(halves.item())
    per_sample = nn.CrossEntropyLoss(criterion.weight, reduction="none", label_smoothing=0.1)(logits, targets)
    assert criterion(logits, targets).item() == pytest.approx(per_sample.mean().item())  # over samples, not weights


def test_balanced_weights_count_the_images_under_the_training_loaders_wrappers():
    wrapped = SimpleNamespace(dataset=SimpleNamespace(dataset=SimpleNamespace(targets=[0, 0, 0, 1])))
    assert class_weights("balanced", ["a", "b"], wrapped).tolist() == pytest.approx([4 / 6, 2.0])


def test_a_weights_file_gives_weights_by_class_name_in_any_order(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("\ufeff# defect inspection\n\ntraffic light 3\ngood\t0.5\n")  # a BOM, a comment, a tab
    assert read_class_weights(path, ["good", "traffic light"]) == [0.5, 3.0]
    counts = torch.tensor([30, 10])
    weights = class_weights(str(path), ["good", "traffic light"], counts=counts)
    assert weights.tolist() == pytest.approx([0.5 / 1.125, 3 / 1.125])  # scaled: (30 x 0.5 + 10 x 3) / 40 = 1.125


@pytest.mark.parametrize("text, message", [
    ("good 1\n", r"weights\.txt gives weights to 1 of the 2 classes: add a line for defect"),
    ("good 1\ndefect\n", r"weights\.txt line 2: 'defect' is not a class name and a weight"),
    ("good 1\ndefect one\n", r"weights\.txt line 2: 'defect one' is not a class name and a weight"),
    ("good 1\ndefetc 2\n", r"weights\.txt line 2: 'defetc' is not a class of this data set \(good, defect\)"),
    ("good 1\ndefect -2\n", r"weights\.txt line 2: the weight of defect is -2: give a finite number, 0 or more"),
    ("good nan\ndefect 2\n", r"weights\.txt line 1: the weight of good is nan: give a finite number"),
    ("good 1\ndefect 2\ngood 3\n", r"weights\.txt line 3: good has a weight on line 1 already: give each class once"),
])
def test_a_broken_weights_file_is_one_line_naming_the_file_and_line(tmp_path, text, message):
    (tmp_path / "weights.txt").write_text(text)
    with pytest.raises(UserError, match=message):
        read_class_weights(tmp_path / "weights.txt", ["good", "defect"])


def test_weights_file_problems_reach_the_user_from_the_train_script(tmp_path, capsys):
    for choice in (tmp_path / "missing.txt", "balance"):  # refused by the parser, before any work
        with pytest.raises(SystemExit):
            train(*TINY, "--synthetic-train-size", "64", "--class-weights", choice)
        assert (f"argument --class-weights: must be none, balanced or a file of 'class weight' lines; {choice} is no "
                "file") in capsys.readouterr().err
    (tmp_path / "weights.txt").write_bytes("caf\xe9 1\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"cannot read --class-weights .*weights\.txt \(UnicodeDecodeError: .*\): "
                                        r"give none, balanced, or a text file of 'class weight' lines"):
        train(*TINY, "--synthetic-train-size", "64", "--class-weights", tmp_path / "weights.txt")
    (tmp_path / "zero.txt").write_text("".join(f"{shape} 0\n" for shape in SHAPES))
    with pytest.raises(UserError, match=r"gives weight 0 to every class of the training set: nothing would be learned"):
        train(*TINY, "--synthetic-train-size", "64", "--class-weights", tmp_path / "zero.txt")


def test_weighted_cross_entropy_and_dice_train_under_bfloat16_autocast(tmp_path, capsys):
    train_segmentation(*SEG_TINY, "--class-weights", "balanced", "--loss", "ce+dice", "--amp-dtype", "bfloat16",
                       "--synthetic-train-size", "64", "--synthetic-val-size", "16", "--output-dir", tmp_path)
    out = capsys.readouterr().out
    assert "class weights (balanced, scaled to a mean of 1 over the training pixels" in out
    record = log_of(tmp_path)[-1]
    assert {"val_miou", "val_mean_dice", "val_pixel_acc", "val_mean_acc", "val_num_images"} <= set(record)
    assert math.isfinite(record["train_loss"]) and f"mean Dice {record['val_mean_dice']:.2f}" in out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = EventAccumulator(str(tmp_path / "tb")).Reload().Tags()["scalars"]
    assert {"val_iou/background", "val_dice/background", "epoch/val_mean_dice"} <= set(tags)


# ---- segmentation: the pixels of each class, counted once and cached

def test_pixel_counts_are_cached_and_counted_again_when_a_mask_changes(tmp_path, capsys):
    base = ade_tree(tmp_path / "ade", mask=grid([0, 1, 1, 2]))  # ADE value v is class v - 1; 0 is void
    dataset, cache = ade20k(base, "train"), tmp_path / "cache"
    cache.mkdir()
    counts = value_counts(dataset, 0, cache)
    pixels_per_mask = 24 * 16 // 4
    assert counts[:2] == [4 * pixels_per_mask, 2 * pixels_per_mask] and counts[255] == 2 * pixels_per_mask
    assert "counted the pixels per class of the 2 training masks" in capsys.readouterr().out
    assert value_counts(dataset, 0, cache) == counts and "from " in capsys.readouterr().out
    write_mask(base / "annotations" / "training" / "ADE_train_00000001.png", grid([2]))
    assert value_counts(dataset, 0, cache)[1] == 5 * pixels_per_mask  # 4 + 1 quarters of a mask
    assert "counted" in capsys.readouterr().out


def test_pixel_counts_are_counted_again_when_the_classes_map_the_masks_otherwise(tmp_path, capsys):
    quarter = 3 * HEIGHT * WIDTH // 4  # a quarter of each of the 3 training masks
    root = folder_tree(tmp_path / "colours", masks=[coloured(folder_grid([0, 1, 1, 2]))] * 5, classes_txt=CLASSES_TXT)
    cache = tmp_path / "cache"
    assert value_counts(folder(root, "train"), 0, cache)[:3] == [quarter, 2 * quarter, quarter]
    lines = CLASSES_TXT.splitlines(keepends=True)
    (tmp_path / "swapped.txt").write_text(lines[0] + lines[2] + lines[1])  # scratch and dent trade indices
    os.replace(tmp_path / "swapped.txt", root / "classes.txt")
    capsys.readouterr()
    assert value_counts(folder(root, "train"), 0, cache)[:3] == [quarter, quarter, 2 * quarter]
    assert "counted the pixels" in capsys.readouterr().out
    # 0 and 255 are background and void, or with --binary-masks background and foreground.
    root = folder_tree(tmp_path / "binary", masks=[folder_grid([0, 255])] * 5, classes_txt="background\nforeground\n")
    assert value_counts(folder(root, "train"), 0, cache)[1] == 0
    assert value_counts(folder(root, "train", binary_masks=True), 0, cache)[1] == 2 * quarter


def test_the_pixel_count_leaves_out_bad_masks_as_max_bad_samples_allows(tmp_path, capsys):
    root = folder_tree(tmp_path / "data", classes_txt="background\nscratch\ndent\n")  # 0, 1, 2 and void
    Image.fromarray(folder_grid([0, 9])).save(root / "train" / "masks" / "t1.png")
    cache, quarter = tmp_path / "cache", HEIGHT * WIDTH // 4
    with pytest.raises(SampleError, match=r"^mask .*t1\.png holds values that are not allowed: 9 \(allowed"):
        value_counts(folder(root, "train"), 0, cache)  # --max-bad-samples 0: the first bad mask stops the run
    assert value_counts(folder(root, "train"), 1, cache, max_bad_samples=1)[:3] == [2 * quarter] * 3  # t0 and t2
    out = capsys.readouterr().out
    assert "of the 3 training masks in" in out and "(-j 1), leaving out 1 that fails its checks" in out
    assert value_counts(folder(root, "train"), 0, cache, max_bad_samples=1)[:3] == [2 * quarter] * 3
    out = capsys.readouterr().out
    assert "masks: from " in out and "leaving out 1 that fails its checks" in out
    with pytest.raises(SampleError, match=r"t1\.png holds values"):  # the cached count says so too
        value_counts(folder(root, "train"), 0, cache)
    Image.fromarray(folder_grid([0, 7])).save(root / "train" / "masks" / "t2.png")
    with pytest.raises(UserError, match=r"t2\.png holds values that are not allowed: 7 .*\(bad sample 2 of this run, "
                                        r"more than --max-bad-samples 1 allows; python tools/check_data.py"):
        value_counts(folder(root, "train"), 0, cache, max_bad_samples=1)


def test_class_weights_train_with_bad_masks_that_max_bad_samples_allows(tmp_path, capsys):
    root = folder_tree(tmp_path / "data", classes_txt="background\nscratch\ndent\n")
    Image.fromarray(folder_grid([0, 9])).save(root / "train" / "masks" / "t1.png")
    train_segmentation(*FOLDER_RUN, "--data-path", root, "--class-weights", "balanced", "--max-bad-samples", "1",
                       "--output-dir", tmp_path / "out")
    out = capsys.readouterr().out
    assert "of the 3 training masks in" in out and "leaving out 1 that fails its checks" in out
    assert "class weights (balanced" in out and (tmp_path / "out" / "checkpoint.pth").exists()


def test_segmentation_weights_leave_out_void_and_the_ignored_label(tmp_path):
    base = ade_tree(tmp_path / "ade", mask=grid([0, 1, 1, 2]))
    args = SimpleNamespace(class_weights="balanced", ignore_index=0, workers=0, output_dir=None, max_bad_samples=0)
    weights = segmentation_class_weights(args, ["wall", "building", "sky"], ade20k(base, "train"))
    assert weights.tolist() == pytest.approx([0.0, 1.0, 0.0])  # wall ignored; building alone counted; sky absent


# ---- the Dice loss

def test_dice_loss_is_0_for_a_perfect_prediction_and_leaves_out_void_pixels():
    target = torch.tensor([[[0, 0, 1, 255]]])
    perfect = nn.functional.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float() * 50
    assert dice_loss(perfect, target) == pytest.approx(0.0, abs=1e-6)
    changed = perfect.clone()
    changed[..., 3] = torch.tensor([0.0, 50.0, 0.0]).view(1, 3, 1)  # the void pixel predicted otherwise
    assert dice_loss(changed, target) == pytest.approx(0.0, abs=1e-6)
    uniform = torch.zeros(1, 3, 1, 4)  # p = 1/3: class 0 Dice 2 (2/3) / (2 + 1) = 4/9, class 1 2 (1/3) / (1 + 1)
    assert dice_loss(uniform, target) == pytest.approx(1 - (4 / 9 + 1 / 3) / 2)
    assert dice_loss(uniform, target, torch.tensor([0.0, 1.0, 5.0])) == pytest.approx(1 - 1 / 3)  # class 2 absent


def test_dice_loss_computes_in_float32_under_autocast():
    logits, target = torch.randn(2, 4, 8, 8, requires_grad=True), torch.randint(0, 4, (2, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = dice_loss(logits.bfloat16(), target)
    assert low.dtype == torch.float32 and low.item() == pytest.approx(dice_loss(logits, target).item(), abs=1e-2)
    low.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


# ---- a frozen backbone

def test_frozen_modules_stay_in_eval_mode_through_train_sync_bn_and_copies():
    model = torchvision.models.resnet18(num_classes=3)
    freeze_all_but(model, ["fc"])
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert [len(group["params"]) for group in param_groups(model, 0.1, 0.0)] == [2]  # the optimizer gets fc alone
    model.train()
    assert model.training and model.fc.training and not model.bn1.training and not model.layer4[1].bn2.training
    copied = copy.deepcopy(model)  # as the EMA copies it: the copy's train() sets the copy, not the original
    model.eval()
    copied.train()
    assert copied.fc.training and not copied.bn1.training and not model.fc.training
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # --sync-bn converts after freezing
    synced.train()
    assert isinstance(synced.bn1, nn.SyncBatchNorm) and not synced.bn1.training and synced.fc.training


def test_a_segmentation_head_is_every_module_after_the_backbone():
    model = create_segmentation_model("deeplabv3plus_resnet50", 3, aux_loss=True, freeze_backbone=True)
    trained = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {"aspp", "project_low", "decoder", "classifier", "aux_classifier"}
    model.train()
    assert not model.backbone.bn1.training and model.aspp.training and model.decoder[0][1].training
    groups = param_groups(model, 0.01, 0.0, head=sorted(trained), head_lr=0.1)
    assert [group["lr"] for group in groups] == [0.1]  # the frozen backbone is in no group


def test_fine_tuning_a_frozen_backbone_moves_the_head_alone(tmp_path):
    source = torchvision.models.resnet18(num_classes=10)
    torch.save(source.state_dict(), tmp_path / "pretrained.pth")
    out = tmp_path / "out"
    train(*TINY, "--synthetic-train-size", "128", "--weights", tmp_path / "pretrained.pth", "--synthetic-classes",
          "4", "--freeze-backbone", "--head-lr", "0.05", "--output-dir", out)
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    state = source.state_dict()
    for name, tensor in checkpoint["model"].items():  # weights and batch-norm statistics as loaded
        assert name.startswith("fc.") or torch.equal(tensor, state[name]), name
    assert [len(group["params"]) for group in checkpoint["optimizer"]["param_groups"]] == [2]
    with pytest.raises(UserError, match=r"laid out for other values \(freeze_backbone True -> False\)"):
        train(*TINY, "--synthetic-train-size", "128", "--weights", tmp_path / "pretrained.pth", "--synthetic-classes",
              "4", "--head-lr", "0.05", "--resume", out / "checkpoint.pth")


def test_ddp_trains_a_frozen_backbone_with_class_weights_and_no_unused_parameter_search(tmp_path):
    source = torchvision.models.resnet18(num_classes=4)
    torch.save(source.state_dict(), tmp_path / "pretrained.pth")
    result = torchrun(2, "classification/train.py", *TINY, "--synthetic-train-size", "128", "--synthetic-classes", "4",
                      "--weights", tmp_path / "pretrained.pth", "--freeze-backbone", "--class-weights", "balanced",
                      "--output-dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("class weights (balanced") == 1  # rank 0 prints what every rank computed
    model = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)["model"]
    assert torch.equal(model["layer1.0.bn1.running_mean"], source.layer1[0].bn1.running_mean)
    assert not torch.equal(model["fc.weight"], source.fc.weight)


def test_a_segmentation_head_trains_alone_on_a_frozen_backbone_with_its_own_lr(tmp_path):
    source = create_segmentation_model("lraspp_mobilenet_v3_large", 3)
    torch.save(source.state_dict(), tmp_path / "pretrained.pth")
    out = tmp_path / "out"
    train_segmentation(*SEG_TINY, "--model", "lraspp_mobilenet_v3_large", "--weights", tmp_path / "pretrained.pth",
                       "--freeze-backbone", "--head-lr", "0.05", "--synthetic-train-size", "64",
                       "--synthetic-val-size", "16", "--output-dir", out)
    checkpoint, state = torch.load(out / "checkpoint.pth", weights_only=True), source.state_dict()
    assert all(torch.equal(tensor, state[name]) for name, tensor in checkpoint["model"].items()
               if name.startswith("backbone."))  # weights and batch-norm statistics
    assert not torch.equal(checkpoint["model"]["classifier.high_classifier.weight"],
                           state["classifier.high_classifier.weight"])
    assert [group["initial_lr"] for group in checkpoint["optimizer"]["param_groups"]] == [0.05]


# ---- flags that do not go together, and resumes that would change the objective or the order

@pytest.mark.parametrize("flags, message", [
    (["--freeze-backbone"], r"--freeze-backbone trains the head alone on pretrained layers: give --weights"),
    (["--balanced-sampler", "--class-weights", "balanced"],
     r"--balanced-sampler and --class-weights balanced together favour rare classes twice: use one"),
])
def test_classification_refuses(flags, message):
    with pytest.raises(UserError, match=message):
        train(*TINY, *flags)


@pytest.mark.parametrize("flags, message", [
    (["--freeze-backbone"], r"unet has no backbone, so no head apart from it: drop --freeze-backbone and --head-lr"),
    (["--head-lr", "0.1"], r"unet has no backbone"),
    (["--model", "lraspp_mobilenet_v3_large", "--freeze-backbone"],
     r"--freeze-backbone trains the head alone on a pretrained backbone: give --weights-backbone or --weights"),
])
def test_segmentation_refuses(flags, message):
    with pytest.raises(UserError, match=message):
        train_segmentation(*SEG_TINY, *flags)


def test_segmentation_refuses_an_unknown_loss(capsys):
    with pytest.raises(SystemExit):
        train_segmentation(*SEG_TINY, "--loss", "focal")
    assert "argument --loss: invalid choice: 'focal' (choose from" in capsys.readouterr().err


@pytest.mark.parametrize("flags, change", [(["--class-weights", "balanced"], "class_weights none -> balanced"),
                                           (["--balanced-sampler"], "balanced_sampler False -> True")])
def test_a_resume_with_other_weights_or_sampling_is_refused(trained_run, flags, change):
    with pytest.raises(UserError, match=rf"laid out for other values \({change}\)"):
        train(*TINY, "--epochs", "2", *flags, "--resume", trained_run / "checkpoint.pth")


def test_a_checkpoint_older_than_these_flags_resumes_with_their_defaults(trained_run, tmp_path):
    checkpoint = torch.load(trained_run / "checkpoint.pth", weights_only=True)
    for name in ("class_weights", "balanced_sampler", "freeze_backbone"):
        del checkpoint["args"][name]
    torch.save(checkpoint, tmp_path / "old.pth")
    train(*TINY, "--epochs", "2", "--resume", tmp_path / "old.pth")
    with pytest.raises(UserError, match=r"laid out for other values \(class_weights none -> balanced\)"):
        train(*TINY, "--epochs", "2", "--class-weights", "balanced", "--resume", tmp_path / "old.pth")
