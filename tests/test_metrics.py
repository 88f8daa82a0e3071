import math

import torch

from common.metrics import ClassificationMeter, ConfusionMatrix


def test_confusion_matrix_counts_true_rows_predicted_columns():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 1, 2, 2, 0]), torch.tensor([0, 1, 2, 2, 2, 1]))
    assert cm.matrix.tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 2]]
    assert cm.total == 6
    assert math.isclose(cm.accuracy(), 4 / 6)
    assert cm.per_class_accuracy() == [1.0, 0.5, 2 / 3]


def test_iou_and_mean_iou_by_hand():
    cm = ConfusionMatrix(3)
    # class 0: TP 2, FP 1, FN 0 -> 2/3; class 1: TP 1, FP 0, FN 1 -> 1/2; class 2 never appears -> NaN
    cm.update(torch.tensor([0, 0, 1, 0]), torch.tensor([0, 0, 1, 1]))
    iou = cm.iou()
    assert math.isclose(iou[0], 2 / 3) and math.isclose(iou[1], 0.5) and math.isnan(iou[2])
    assert math.isclose(cm.mean_iou(), (2 / 3 + 0.5) / 2)


def test_ignore_index_is_not_counted():
    cm = ConfusionMatrix(2, ignore_index=255)
    cm.update(torch.tensor([[0, 1], [1, 1]]), torch.tensor([[0, 255], [255, 0]]))
    assert cm.matrix.tolist() == [[1, 1], [0, 0]]


def test_classification_meter_top1_top5():
    logits = torch.tensor([
        [9.0, 8, 7, 6, 5, 4],   # target 0: top-1 hit
        [9.0, 8, 7, 6, 5, 4],   # target 4: top-5 hit only
        [9.0, 8, 7, 6, 5, 4],   # target 5: miss
        [0.0, 0, 0, 0, 0, 1],   # target 5: top-1 hit
    ])
    meter = ClassificationMeter(6)
    meter.update(logits, torch.tensor([0, 4, 5, 5]))
    summary = meter.summary()
    assert summary.items() >= {"acc1": 50.0, "acc5": 75.0, "num_samples": 4}.items()


def test_top5_with_fewer_than_five_classes_is_top_all():
    meter = ClassificationMeter(3)
    meter.update(torch.tensor([[3.0, 2, 1]]), torch.tensor([2]))
    assert meter.summary()["acc5"] == 100.0


def test_f1_and_the_macro_numbers_by_hand():
    # 9 samples of class 0, 1 of class 1; class 2 is predicted once but has no samples, class 3 appears nowhere.
    meter = ClassificationMeter(4)
    predicted = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 2, 0])
    meter.update(torch.nn.functional.one_hot(predicted, 4).float(), torch.tensor([0] * 9 + [1]))
    f1 = meter.confusion.f1()
    assert math.isclose(f1[0], 2 * 8 / (9 + 9)) and f1[1] == 0 and f1[2] == 0 and math.isnan(f1[3])
    summary = meter.summary()
    assert summary["acc1"] == 80.0  # what a model that never finds the rare class scores
    assert math.isclose(summary["balanced_acc"], 100 * (8 / 9 + 0) / 2)  # recall: the classes with samples
    assert math.isclose(summary["macro_f1"], 100 * (16 / 18 + 0 + 0) / 3)  # F1: those in labels or predictions
