"""Counts on the device, summed over ranks once at the end: accuracy, top-k, confusion matrix, IoU, F1 (Dice)."""
import torch
import torch.nn.functional as F

from common.log import all_reduce_sum


class ConfusionMatrix:
    """matrix[true, predicted]; entries equal to ignore_index are not counted."""

    def __init__(self, num_classes, device="cpu", ignore_index=None):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, predicted, target):
        # Ignored entries get weight 0, not a mask: boolean masking and bincount read a size back from the GPU.
        predicted, target = predicted.flatten(), target.flatten()
        keep = target != self.ignore_index if self.ignore_index is not None else torch.ones_like(target, dtype=bool)
        cell = torch.where(keep, target * self.num_classes + predicted, 0)
        self.matrix.view(-1).index_put_((cell,), keep.long(), accumulate=True)

    def all_reduce(self):
        all_reduce_sum(self.matrix)

    @property
    def total(self):
        return int(self.matrix.sum())

    def accuracy(self):
        return self.matrix.diag().sum().item() / max(self.total, 1)

    def per_class_accuracy(self):
        """Recall of each class; NaN for a class with no samples."""
        m = self.matrix.double()
        return (m.diag() / m.sum(1)).tolist()

    def f1(self):
        """F1 (Dice), 2 TP / (samples + predictions); NaN for a class absent from both."""
        m = self.matrix.double()
        return (2 * m.diag() / (m.sum(0) + m.sum(1))).tolist()

    def iou(self):
        """NaN for a class absent from both target and prediction."""
        m = self.matrix.double()
        return (m.diag() / (m.sum(0) + m.sum(1) - m.diag())).tolist()

    def mean_iou(self):
        return nanmean(self.iou())


def nanmean(values):
    return torch.tensor(values, dtype=torch.float64).nanmean().item()


def percent(values):
    """None where undefined: JSON has no NaN."""
    return [None if x != x else 100 * x for x in values]


class ClassificationMeter:

    def __init__(self, num_classes, device="cpu"):
        self.confusion = ConfusionMatrix(num_classes, device)
        self.k = min(5, num_classes)
        self.topk_correct = torch.zeros((), dtype=torch.int64, device=device)

    def update(self, logits, target):
        self.confusion.update(logits.argmax(1), target)
        self.topk_correct += (logits.topk(self.k, dim=1).indices == target[:, None]).any(1).sum()

    def all_reduce(self):
        self.confusion.all_reduce()
        all_reduce_sum(self.topk_correct)

    def summary(self):
        """Macro F1 and balanced accuracy (mean recall) average the classes where each is defined."""
        c, total = self.confusion, self.confusion.total
        return {"acc1": 100 * c.accuracy(), "acc5": 100 * self.topk_correct.item() / max(total, 1),
                "macro_f1": 100 * nanmean(c.f1()), "balanced_acc": 100 * nanmean(c.per_class_accuracy()),
                "num_samples": total}


class SegmentationMeter:
    """Logits are upsampled to each label's size before the argmax: the score is that of the original annotation."""

    VOID = 255  # what every segmentation loader writes for unlabelled pixels

    def __init__(self, num_classes, device="cpu", ignore_index=VOID):
        self.confusion = ConfusionMatrix(num_classes, device, self.VOID)
        self.ignore_index = ignore_index  # left out too, besides VOID
        self.num_images = torch.zeros((), dtype=torch.int64, device=device)

    def update(self, logits, target):
        if self.ignore_index != self.VOID:
            target = target.masked_fill(target == self.ignore_index, self.VOID)
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
        predicted = logits.argmax(1)
        self.confusion.update(predicted, target)
        self.num_images += len(target)
        return predicted

    def all_reduce(self):
        self.confusion.all_reduce()
        all_reduce_sum(self.num_images)

    def summary(self):
        """mIoU and mean Dice average the classes in labels or predictions (neither: None), mean accuracy those in
        labels."""
        c = self.confusion
        return {"miou": 100 * c.mean_iou(), "mean_dice": 100 * nanmean(c.f1()), "pixel_acc": 100 * c.accuracy(),
                "mean_acc": 100 * nanmean(c.per_class_accuracy()), "per_class_iou": percent(c.iou()),
                "per_class_dice": percent(c.f1()), "num_images": int(self.num_images)}
