import copy
import json
import shutil
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import tv_tensors

from common.log import UserError
from common.metrics import SegmentationMeter
from conftest import ROOT, SEG_TINY, evaluate_segmentation, popen, python, torchrun, train_segmentation, write_image
from segmentation.data import make_scenes, train_transforms
from segmentation.inference import Predictor
from segmentation.model import TORCHVISION_MODELS, UNet, create_model


def log_of(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def parameters(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("output_stride", [8, 16])
def test_deeplabv3plus_shapes_at_both_output_strides(output_stride):
    model = create_model("deeplabv3plus_resnet50", 19, output_stride, aux_loss=True)
    seen = {}
    model.aspp.register_forward_hook(lambda module, inputs, output: seen.update(aspp_in=inputs[0].shape))
    out = model(torch.randn(2, 3, 64, 96))
    assert seen["aspp_in"] == (2, 2048, 64 // output_stride, 96 // output_stride)
    assert out["out"].shape == out["aux"].shape == (2, 19, 64, 96)
    rates = [branch[0].dilation[0] for branch in model.aspp.convs[1:4]]
    assert rates == ([12, 24, 36] if output_stride == 8 else [6, 12, 18])


def test_parameter_counts_stated_in_the_readme():
    assert parameters(create_model("deeplabv3plus_resnet50", 19)) == 40_351_667
    assert parameters(create_model("deeplabv3plus_resnet50", 19, aux_loss=True)) == 42_716_358
    assert parameters(create_model("deeplabv3plus_resnet101", 19)) == 59_343_795
    assert parameters(create_model("unet", 19)) == 31_038_803


@pytest.mark.parametrize("name", ["deeplabv3plus_resnet50", "deeplabv3plus_resnet101", "unet", *TORCHVISION_MODELS])
def test_every_model_trains_one_step_on_cpu(name):
    torch.manual_seed(0)
    model = create_model(name, 4, aux_loss=name != "unet" and not name.startswith("lraspp"), unet_width=8)
    images, target = torch.randn(2, 3, 64, 64), torch.randint(4, (2, 64, 64))
    target[0, :8] = 255
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(images)
    loss = sum(torch.nn.functional.cross_entropy(o, target, ignore_index=255) for o in out.values())
    loss.backward()
    optimizer.step()
    assert out["out"].shape == (2, 4, 64, 64) and torch.isfinite(loss)
    assert sum(not torch.equal(a, b) for a, b in zip(before, model.parameters())) > len(before) // 2


def test_unet_names_the_size_it_cannot_take():
    with pytest.raises(ValueError, match="divisible by 16, got 60x64"):
        UNet(3, 8)(torch.randn(1, 3, 60, 64))
    with pytest.raises(UserError, match=r"--crop-size 40x40 does not divide by 16"):
        train_segmentation(*SEG_TINY, "--crop-size", "40")


def test_predictor_pads_unet_input_and_slide_matches_whole():
    model = UNet(3, 4).eval()
    images = torch.randn(1, 3, 37, 53)
    with torch.no_grad():
        whole = Predictor(model)(images)
        assert whole.shape == (1, 3, 37, 53)
        pointwise = torch.nn.Conv2d(3, 3, 1)  # a window sees exactly what the whole image does at each pixel
        model = type("Pointwise", (torch.nn.Module,), {"forward": lambda self, x: {"out": pointwise(x)}})()
        slid = Predictor(model, "slide", crop=(16, 16), stride=(10, 10))(images)
        torch.testing.assert_close(slid, Predictor(model)(images))
        assert Predictor(model, scales=(0.5, 1.0, 1.5), flip=True)(images).shape == (1, 3, 37, 53)


def test_segmentation_meter_by_hand():
    meter = SegmentationMeter(4, ignore_index=255)
    logits = torch.zeros(1, 4, 2, 2)
    logits[0, [0, 1, 1, 0], [0, 0, 1, 1], [0, 1, 0, 1]] = 1  # predicts [[0, 1], [1, 0]] at 2x2
    target = torch.tensor([[[1, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 255, 255]]])
    predicted = meter.update(logits, target)  # upsampled to the label's 4x4: each 2x2 cell becomes a 2x2 block
    assert predicted.shape == (1, 4, 4) and predicted[0, 0, 0] == 0
    assert meter.confusion.matrix[:2, :2].tolist() == [[5, 0], [1, 8]]  # 14 labelled pixels, the 2 ignored left out
    summary = meter.summary()
    assert summary["per_class_iou"][:2] == pytest.approx([100 * 5 / 6, 100 * 8 / 9])  # percent, as classification
    assert summary["per_class_iou"][2:] == [None, None]  # absent from labels and predictions: not NaN, not 0
    assert summary["miou"] == pytest.approx(100 * (5 / 6 + 8 / 9) / 2)
    assert summary["pixel_acc"] == pytest.approx(100 * 13 / 14)
    assert summary["mean_acc"] == pytest.approx(100 * (1 + 8 / 9) / 2)
    assert summary["num_images"] == 1


def test_a_validation_summary_holds_numbers_and_the_meter_keeps_the_pixel_counts(capsys):
    import argparse
    from common.data import ShardedEvalSampler
    from common.engine import Precision
    from segmentation.data import synthetic_loader
    from segmentation.inference import validate
    images, masks = make_scenes(5, 32, 3, split="val")
    args = argparse.Namespace(eval_mode="whole", eval_crop=None, eval_stride=None, crop_size=[32], eval_scales="1.0",
                              eval_flip=False, ignore_index=255)
    summary, meter = validate(UNet(3, 8), synthetic_loader(images, masks, ShardedEvalSampler(masks), 4, False),
                              ["background", "disk", "ring"], Precision(torch.device("cpu")), args, "Test")
    assert json.loads(json.dumps(summary)) == summary  # numbers and per-class lists alone, as classification's
    assert set(summary) == {"miou", "mean_dice", "pixel_acc", "mean_acc", "per_class_iou", "per_class_dice",
                            "num_images"}
    assert meter.confusion.matrix.shape == (3, 3) and meter.confusion.total == 5 * 32 * 32
    assert f"Test: mIoU {summary['miou']:.2f}" in capsys.readouterr().out


def test_train_transforms_move_image_and_mask_together():
    torch.manual_seed(0)
    mask = torch.arange(4).repeat_interleave(12).view(1, 48).repeat(40, 1).to(torch.uint8)  # four vertical bands
    image = (mask * 60).expand(3, -1, -1).clone()  # brightness says the label
    transform = train_transforms(base_size=40, crop_size=[32, 32], scale_range=[0.5, 2.0])
    for _ in range(20):
        out_image, out_mask = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        assert out_image.dtype == torch.float32 and out_mask.dtype == torch.int64
        assert out_image.shape == (3, 32, 32) and out_mask.shape == (32, 32)
        values = set(out_mask.unique().tolist())
        assert values <= {0, 1, 2, 3, 255}  # nearest interpolation: no blended labels; 255 only where padded
        labelled = out_mask != 255
        if len(values - {255}) > 1:
            brightness = out_image.mean(0)[labelled]
            correlation = torch.corrcoef(torch.stack([brightness, out_mask[labelled].float()]))[0, 1]
            assert correlation > 0.9  # flips, crops and rescales hit both the same way


def test_synthetic_scenes_are_deterministic_and_hold_every_class():
    images, masks = make_scenes(64, 32, 6, seed=0)
    again, masks_again = make_scenes(64, 32, 6, seed=0)
    assert torch.equal(images, again) and torch.equal(masks, masks_again)
    assert set(masks.unique().tolist()) == set(range(6))
    assert not torch.equal(make_scenes(8, 32, 6, split="val")[1], masks[:8])


@pytest.mark.xdist_group("scenes-learned")  # with test_seg_folder.py's, which reads the same run
def test_learns_the_synthetic_scenes_far_above_chance(scenes_learned):
    # Background is ~90% of the pixels: predicting it everywhere scores an mIoU of about 0.3. scenes_learned: a
    # UNet of width 16, 2 epochs on 1000 scenes of 32 pixels and 3 classes at lr 0.1.
    assert log_of(scenes_learned)[-1]["val_miou"] > 60


def test_run_writes_checkpoints_log_and_tensorboard(segmentation_run):
    checkpoint = torch.load(segmentation_run / "checkpoint.pth", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "scaler", "epoch", "best_miou", "class_names", "palette"} <= set(checkpoint)
    records = log_of(segmentation_run)
    assert [r["epoch"] for r in records] == [0, 1]
    assert {"epoch", "train_loss", "lr", "val_miou", "val_pixel_acc", "epoch_time_s", "img_per_s"} <= set(records[0])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(segmentation_run / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    assert len(events.Scalars("train/loss")) == 2 * 16 and len(events.Scalars("train/grad_norm")) == 32
    assert {"val_iou/background", "epoch/val_miou", "epoch/val_pixel_acc", "train/lr"} <= set(events.Tags()["scalars"])
    assert {f"val_examples/{i}" for i in range(4)} <= set(events.Tags()["images"])


def test_poly_schedule_with_warmup_per_iteration(segmentation_run):
    args = json.loads((segmentation_run / "args.json").read_text())
    assert args["lr_scheduler"] == "polylr" and args["lr_warmup_epochs"] == 1
    lrs = [r["lr"] for r in log_of(segmentation_run)]
    # 16 steps per epoch; after 1 warmup epoch, 16 steps of (1 - t/16) ** 0.9 end at 0.
    assert lrs[0] == pytest.approx(args["lr"]) and lrs[1] == pytest.approx(0.0, abs=1e-12)


def test_eval_reports_json_and_predictions(segmentation_run, tmp_path):
    evaluate_segmentation("--checkpoint", segmentation_run / "best.pth", "--device", "cpu", "--output-json",
                          tmp_path / "scores.json", "--save-predictions", tmp_path / "predictions")
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert {"miou", "pixel_acc", "mean_acc", "per_class_iou", "num_images"} <= set(scores)
    assert scores["num_images"] == 101 and list(scores["per_class_iou"]) == ["background", "disk", "ring"]
    assert max(log_of(segmentation_run), key=lambda r: r["val_miou"])["val_miou"] == pytest.approx(scores["miou"])
    pictures = sorted((tmp_path / "predictions" / "color").iterdir())
    assert len(pictures) == 101 and Image.open(pictures[0]).mode == "P"


def test_test_time_augmentation_runs_through_eval(segmentation_run, tmp_path):
    evaluate_segmentation("--checkpoint", segmentation_run / "best.pth", "--device", "cpu", "--eval-mode", "slide",
                          "--eval-crop", "16", "--eval-scales", "0.75,1.0,1.25", "--eval-flip",
                          "--output-json", tmp_path / "tta.json")
    assert 0 <= json.loads((tmp_path / "tta.json").read_text())["miou"] <= 100


def test_a_killed_run_resumed_with_auto_ends_as_an_uninterrupted_one(tmp_path):
    flags = [*SEG_TINY, "--synthetic-val-size", "32", "--use-deterministic-algorithms", "--epochs", "3",
             "--resume", "auto"]
    train_segmentation(*flags, "--output-dir", tmp_path / "straight")  # in this process: one start less
    interrupted = tmp_path / "interrupted"
    process = popen(sys.executable, ROOT / "segmentation/train.py", *flags, "--output-dir", interrupted)
    for line in process.stdout:
        if line.startswith("saved") and "epoch 0" in line:  # during the LR warmup
            process.kill()
            break
    process.wait()
    assert torch.load(interrupted / "checkpoint.pth", weights_only=True)["epoch"] < 2
    resumed = python("segmentation/train.py", *flags, "--output-dir", interrupted)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout
    a = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)
    b = torch.load(interrupted / "checkpoint.pth", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert log_of(interrupted)[-1]["val_miou"] == log_of(tmp_path / "straight")[-1]["val_miou"]


def test_distributed_eval_equals_single_process(segmentation_run, tmp_path):
    evaluate_segmentation("--checkpoint", segmentation_run / "best.pth", "--device", "cpu",
                          "--output-json", tmp_path / "one.json")  # one process: this one
    double = torchrun(2, "segmentation/eval.py", "--checkpoint", segmentation_run / "best.pth", "--device", "cpu",
                      "--output-json", tmp_path / "two.json")
    assert double.returncode == 0, double.stderr
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one == two and one["num_images"] == 101  # 101 images over 2 ranks: none counted twice


def test_weights_backbone_from_a_classifier_checkpoint(tmp_path):
    classifier = torchvision.models.resnet50(num_classes=7)
    torch.save({"model": classifier.state_dict()}, tmp_path / "r50.pth")
    model = create_model("deeplabv3plus_resnet50", 5, weights_backbone=str(tmp_path / "r50.pth"))
    torch.testing.assert_close(model.backbone.layer4[2].conv3.weight, classifier.layer4[2].conv3.weight)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(UserError, match="r18.pth does not fit this model"):
        create_model("deeplabv3plus_resnet50", 5, weights_backbone=str(tmp_path / "r18.pth"))
    with pytest.raises(UserError, match="neither a file nor a torchvision weights name of resnet50"):
        create_model("deeplabv3plus_resnet50", 5, weights_backbone="IMAGENET_V9")


def test_fine_tune_to_another_class_count(segmentation_run, tmp_path):
    args = train_segmentation(*SEG_TINY, "--synthetic-classes", "4", "--weights", segmentation_run / "best.pth",
                              "--output-dir", tmp_path)
    assert args.model == "unet" and log_of(tmp_path)[0]["val_miou"] > 0


def write_cityscapes(root, size=(64, 32)):
    """Two frames per split; labelIds drawn from all 34 ids so every mapping is exercised."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for frame in range(2):
            stem = f"aachen_000000_00000{frame}"
            write_image(root / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png", size=size, seed=frame)
            labels = rng.integers(0, 34, size[::-1], dtype=np.uint8)
            path = root / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelIds.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(labels).save(path)
    return root


def test_cityscapes_tree_trains_and_writes_label_id_predictions(tmp_path):
    root = write_cityscapes(tmp_path / "cityscapes")
    out = tmp_path / "run"
    train_segmentation("--dataset", "cityscapes", "--data-path", root, "--model", "unet", "--unet-width", "4",
                       "--device", "cpu", "-b", "2", "-j", "0", "--epochs", "1", "--crop-size", "32", "64",
                       "--base-size", "16", "--output-dir", out)
    evaluate_segmentation("--checkpoint", out / "checkpoint.pth", "--device", "cpu", "-j", "0",
                          "--save-predictions", tmp_path / "predictions", "--output-json", tmp_path / "scores.json")
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["num_images"] == 2 and len(scores["per_class_iou"]) == 19
    label_ids = np.asarray(Image.open(tmp_path / "predictions" / "labelIds" / "aachen_000000_000000_leftImg8bit.png"))
    assert label_ids.shape == (32, 64)  # scored and written at the label's resolution, not the 16-pixel input
    assert set(np.unique(label_ids)) <= {7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33}


def test_script_errors_are_one_line(tmp_path):
    root = write_cityscapes(tmp_path / "cityscapes")
    bad = np.full((32, 64), 40, dtype=np.uint8)  # labelIds stop at 33
    Image.fromarray(bad).save(root / "gtFine" / "val" / "aachen" / "aachen_000000_000001_gtFine_labelIds.png")
    result = python("segmentation/train.py", "--dataset", "cityscapes", "--data-path", root, "--model", "unet",
                    "--unet-width", "4", "--device", "cpu", "-j", "0", "-b", "2", "--crop-size", "32", "--base-size", "16")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "aachen_000000_000001_gtFine_labelIds.png" in result.stderr
    assert "40" in result.stderr and "Traceback" not in result.stderr
    missing = python("segmentation/train.py", "--data-path", root, "--device", "cpu")
    assert missing.returncode == 2 and "--data-path needs --dataset" in missing.stderr


def test_checkpoint_with_another_class_count_is_refused(segmentation_run, tmp_path):
    root = write_cityscapes(tmp_path / "cityscapes")
    with pytest.raises(UserError, match=r"best.pth predicts 3 classes, but the data has 19"):
        evaluate_segmentation("--checkpoint", segmentation_run / "best.pth", "--device", "cpu", "-j", "0",
                              "--dataset", "cityscapes", "--data-path", root)
    with pytest.raises(UserError, match=r"checkpoint.pth does not fit this model.*shapes differ: classifier.weight"):
        train_segmentation(*SEG_TINY, "--synthetic-classes", "5", "--resume", segmentation_run / "checkpoint.pth")


@pytest.mark.parametrize("flags, message", [
    (["--model", "deeplabv3plus_resnet50", "-b", "1", "--synthetic-image-size", "32"],
     r"-b 1: DeepLab's image-pooling branch .* use -b 2 or more"),
    (["--test-only", "--resume", "auto", "--output-dir", "{tmp}"], r"--resume auto found no checkpoint in"),
    (["--eval-mode", "slide", "--eval-crop", "16", "--eval-stride", "20"], r"--eval-stride 20 20 is larger than"),
    (["--model", "lraspp_mobilenet_v3_large", "--aux-loss"], r"has no auxiliary head: drop --aux-loss"),
    (["--iters", "10"], r"--iters 10 and --epochs 1 both set the length of the run: give one"),
    (["--voc-aug"], r"--voc-aug is VOC's SBD augmented training set: use it with --dataset voc"),
    (["--grad-checkpointing", "--compile"], r"--grad-checkpointing and --compile together fail"),
    (["--model", "lraspp_mobilenet_v3_large", "--grad-checkpointing"],
     r"--grad-checkpointing knows .* not the MobileNet backbone of LRASPP: drop the flag"),
    (["--weights", "COCO_WITH_VOC_LABELS_V1"], r"--weights 'COCO_WITH_VOC_LABELS_V1' is not a file, and weights "
     r"names are for torchvision's models \(.*fcn_resnet50.*\): give unet a checkpoint .pth"),
])
def test_segmentation_flag_errors(tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        train_segmentation(*SEG_TINY, *[f.replace("{tmp}", str(tmp_path)) for f in flags])


def test_ignore_index_leaves_a_class_out_of_loss_and_metrics():
    from segmentation.train import SegmentationLoss
    logits, target = torch.randn(1, 3, 2, 2), torch.tensor([[[0, 1], [2, 255]]])
    loss = SegmentationLoss(ignore_index=0, aux_weight=0.4)({"out": logits}, target)
    expected = torch.nn.functional.cross_entropy(logits, target.masked_fill(target == 0, 255), ignore_index=255)
    torch.testing.assert_close(loss, expected)
    meter = SegmentationMeter(3, ignore_index=0)
    meter.update(logits, target)
    assert meter.confusion.matrix.sum() == 2  # class 0's pixel and the void one are not counted


def test_weights_by_torchvision_name_replace_the_heads_of_another_class_count(monkeypatch):
    from segmentation import train as script
    from torchvision.models.segmentation import FCN_ResNet50_Weights
    # torchvision's published file, without the download: a 21-class model with the auxiliary head it ships with.
    published = torchvision.models.get_model("fcn_resnet50", weights=None, weights_backbone=None,
                                                num_classes=21, aux_loss=True).state_dict()
    asked = []
    monkeypatch.setattr(FCN_ResNet50_Weights, "get_state_dict",
                        lambda self, *a, **kw: asked.append(self.name) or published)

    def build(num_classes, *flags):
        args = script.finish_args(script.get_args_parser().parse_args(["--model", "fcn_resnet50", *flags]))
        return create_model(args.model, num_classes, args.output_stride, args.aux_loss, weights=args.weights).state_dict()

    same = build(21, "--weights", "COCO_WITH_VOC_LABELS_V1")  # no --aux-loss: the shipped aux head is left out
    assert asked == ["COCO_WITH_VOC_LABELS_V1"]
    assert set(same) == {k for k in published if not k.startswith("aux_classifier.")}
    assert all(torch.equal(same[k], published[k]) for k in same)
    other = build(3, "--weights", "COCO_WITH_VOC_LABELS_V1", "--aux-loss")
    heads = {k for k in other if other[k].shape != published[k].shape}
    assert heads == {"classifier.4.weight", "classifier.4.bias", "aux_classifier.4.weight", "aux_classifier.4.bias"}
    assert all(other[k].shape[0] == 3 for k in heads)
    assert all(torch.equal(other[k], published[k]) for k in other if k not in heads)
    with pytest.raises(UserError, match=r"--weights 'COCO_V9' is neither a file nor a torchvision weights name of "
                                        r"fcn_resnet50 \(COCO_WITH_VOC_LABELS_V1\)"):
        build(3, "--weights", "COCO_V9")


@pytest.mark.parametrize("name", ["deeplabv3plus_resnet50", "unet"])
def test_grad_checkpointing_keeps_the_gradients_and_keeps_fewer_activations(name):
    from segmentation.model import enable_grad_checkpointing
    torch.manual_seed(0)
    plain = create_model(name, 3, aux_loss=name != "unet", unet_width=8)
    checkpointed = copy.deepcopy(plain)  # before patching: a copy would keep the patched forwards
    enable_grad_checkpointing(checkpointed)
    images, target = torch.randn(2, 3, 64, 64), torch.randint(3, (2, 64, 64))

    def backward(model):
        torch.manual_seed(1)  # the same dropout masks (ASPP) in both runs
        # Activation bytes autograd keeps for backward, weights aside; inside a checkpointed stage, checkpoint's
        # own hooks keep none.
        weights, kept = {p.data_ptr() for p in model.parameters()}, []

        def pack(tensor):
            if tensor.data_ptr() not in weights:
                kept.append(tensor.numel() * tensor.element_size())
            return tensor
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            outputs = model(images)
            loss = sum(torch.nn.functional.cross_entropy(out, target) for out in outputs.values())
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}, sum(kept)

    grads, kept = backward(plain)
    grads_checkpointed, kept_checkpointed = backward(checkpointed)
    assert grads.keys() == grads_checkpointed.keys() and all(g is not None for g in grads.values())
    for key in grads:
        torch.testing.assert_close(grads_checkpointed[key], grads[key], msg=key)
    assert kept_checkpointed < 0.5 * kept  # the CPU's count; the memory saved is measured on a GPU


def seg_tiny_without_epochs():
    i = SEG_TINY.index("--epochs")
    return SEG_TINY[:i] + SEG_TINY[i + 2:]


def test_iters_end_the_schedule_and_the_run_at_step_n_and_resume_exactly(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from segmentation import train as script
    real_save = script.Checkpointer.save_on_all_ranks

    def save(self, epoch, step=None, **kwargs):  # keeps the mid-epoch checkpoint of the partial last epoch
        real_save(self, epoch, step, **kwargs)
        if (epoch, step) == (2, 4):
            shutil.copy(tmp_path / "run" / "checkpoint.pth", tmp_path / "mid.pth")
    monkeypatch.setattr(script.Checkpointer, "save_on_all_ranks", save)
    # 256 images at -b 16 are 16 steps an epoch: 40 steps are two epochs and 8 steps of a third.
    flags = [*seg_tiny_without_epochs(), "--iters", "40", "--use-deterministic-algorithms",
             "--checkpoint-interval", "4"]
    args = train_segmentation(*flags, "--output-dir", tmp_path / "run")
    records = log_of(tmp_path / "run")
    assert [r["epoch"] for r in records] == [0, 1, 2] and records[-1]["lr"] == 0.0
    final = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert final["lr_scheduler"]["last_epoch"] == 40 and (final["epoch"], final["step"]) == (2, None)
    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(40))  # stopped at step 40, none twice
    lrs = {e.step: e.value for e in events.Scalars("train/lr")}  # after steps 4, 8, ..., 40
    # One warmup epoch (16 steps), then 24 of poly decay: after step 36, 20 of them are done.
    assert lrs[35] == pytest.approx(args.lr * (1 - 20 / 24) ** 0.9, rel=1e-5) and lrs[39] == 0.0

    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "mid.pth", tmp_path / "resumed" / "checkpoint.pth")
    train_segmentation(*flags, "--output-dir", tmp_path / "resumed", "--resume", "auto")
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)
    assert all(torch.equal(final["model"][k], resumed["model"][k]) for k in final["model"])
    assert log_of(tmp_path / "resumed")[-1]["val_miou"] == records[-1]["val_miou"]

    with pytest.raises(UserError, match=r"its LR schedule and data order were laid out for other values \(iters 40 -> 48\)"):
        train_segmentation(*seg_tiny_without_epochs(), "--iters", "48", "--resume", tmp_path / "mid.pth")
    with pytest.raises(UserError, match=r"\(epochs None -> 3; iters 40 -> None\)"):
        train_segmentation(*SEG_TINY, "--epochs", "3", "--resume", tmp_path / "mid.pth")


def test_validation_examples_are_image_label_prediction_at_a_readable_size():
    import argparse
    from common.data import ShardedEvalSampler
    from common.engine import Precision
    from segmentation.data import SYNTHETIC_PALETTE, synthetic_loader
    from segmentation.pictures import EXAMPLE_HEIGHT, log_validation
    images, masks = make_scenes(4, 48, 3, split="val")
    shown = {}
    writer = type("Writer", (), {"add_scalar": lambda *a: None,
                                 "add_image": lambda self, tag, image, step: shown.update({tag: image})})()
    args = argparse.Namespace(eval_mode="whole", eval_crop=None, eval_stride=None, crop_size=[48], eval_scales="1.0",
                              eval_flip=False)
    log_validation(writer, {"per_class_iou": [None] * 3}, ["background", "disk", "ring"], UNet(3, 8),
                   synthetic_loader(images, masks, ShardedEvalSampler(masks), 4, False), SYNTHETIC_PALETTE[:3],
                   Precision(torch.device("cpu")), args, step=0)
    assert sorted(shown) == [f"val_examples/{i}" for i in range(4)]
    picture = shown["val_examples/0"]
    zoom = EXAMPLE_HEIGHT // 48
    assert picture.dtype == torch.uint8 and picture.shape == (3, 48 * zoom, (3 * 48 + 2 * 2) * zoom)
    label = picture[:, ::zoom, (48 + 2) * zoom::zoom][:, :, :48]  # the middle panel, one pixel a block
    assert torch.equal(label, torch.tensor(SYNTHETIC_PALETTE[:3], dtype=torch.uint8)[masks[0].long()].permute(2, 0, 1))
