"""Semantic / human-parts segmentation: mIoU from a confusion matrix pooled over the split.

Protocol (ATRC / InvPT / MLoRE): predictions are the arg-max class of the
softmax output; a ``num_classes x num_classes`` confusion matrix is accumulated
over every valid pixel (label != 255) of the whole split, then per class
``IoU = TP / (TP + FP + FN)`` and ``mIoU`` is the mean over classes.

Classes absent from the split (``TP + FP + FN == 0``, never labelled and never
predicted) have an undefined IoU. The papers' code divides by
``max(TP + FP + FN, 1e-8)`` and averages over *all* classes, i.e. such a class
counts as IoU 0 (``miou_absent="zero"``). On the full NYUD-v2 / PASCAL-Context
val sets every class occurs, so both options agree there; on small or synthetic
splits ``"zero"`` penalises classes that cannot be scored, so the default is
``miou_absent="ignore"`` (leave them out of the mean; their per-class entry is
NaN).
"""

from __future__ import annotations

import numpy as np

from edgemt.metrics._common import ArrayLike, label_map_inputs

__all__ = ["SegmentationMeter"]


class SegmentationMeter:
    """Pooled confusion-matrix mIoU and pixel accuracy.

    Args:
        num_classes: class count ``C``.
        ignore_index: label value excluded from every count.
        miou_absent: ``"ignore"`` (default) drops classes with TP+FP+FN == 0 from
            the mean; ``"zero"`` counts them as 0 like the papers' code.

    ``update(pred, label)``: pred ``(B, C, H, W)`` probabilities/scores (arg-max
    is taken) or ``(B, H, W)`` integer class map; label ``(B, H, W)`` int.
    ``compute()`` returns ``miou`` and ``pixel_acc`` in percent and
    ``iou_per_class`` (percent, NaN for absent classes).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, miou_absent: str = "ignore") -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if miou_absent not in ("ignore", "zero"):
            raise ValueError(f"miou_absent must be 'ignore' or 'zero', got {miou_absent!r}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.miou_absent = miou_absent
        self.reset()

    def reset(self) -> None:
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)  # [gt, pred]

    def update(self, pred: ArrayLike, label: ArrayLike) -> None:
        pred, label = label_map_inputs(pred, label, "segmentation")
        if pred.ndim == 4:
            if pred.shape[1] != self.num_classes:
                raise ValueError(
                    f"segmentation: pred shape {tuple(pred.shape)} has {pred.shape[1]} channels; "
                    f"expected num_classes={self.num_classes} (label shape {tuple(label.shape)})"
                )
            pred = pred.argmax(axis=1)
        elif np.issubdtype(pred.dtype, np.floating) and not np.all(pred == np.round(pred)):
            raise ValueError("segmentation: a (B, H, W) pred must hold integer class ids")
        pred = pred.astype(np.int64)
        label = label.astype(np.int64)
        valid = label != self.ignore_index
        g = label[valid]
        p = pred[valid]
        if g.size and (g.min() < 0 or g.max() >= self.num_classes):
            raise ValueError(
                f"segmentation: label values must be in [0, {self.num_classes}) or {self.ignore_index}; "
                f"found [{g.min()}, {g.max()}]"
            )
        if p.size and (p.min() < 0 or p.max() >= self.num_classes):
            raise ValueError(
                f"segmentation: predicted class ids must be in [0, {self.num_classes}); found [{p.min()}, {p.max()}]"
            )
        c = self.num_classes
        self.confusion += np.bincount(g * c + p, minlength=c * c).reshape(c, c)

    def compute(self) -> dict[str, float | list[float]]:
        cm = self.confusion.astype(np.float64)
        tp = np.diag(cm)
        fp = cm.sum(axis=0) - tp
        fn = cm.sum(axis=1) - tp
        denom = tp + fp + fn
        present = denom > 0
        iou = np.full(self.num_classes, np.nan)
        iou[present] = tp[present] / denom[present]
        if self.miou_absent == "zero":
            miou = float(np.nan_to_num(iou, nan=0.0).mean())
        else:
            miou = float(iou[present].mean()) if present.any() else float("nan")
        total = cm.sum()
        pixel_acc = float(tp.sum() / total) if total > 0 else float("nan")
        return {
            "miou": 100.0 * miou,
            "pixel_acc": 100.0 * pixel_acc,
            "iou_per_class": [float(v) for v in 100.0 * iou],
        }
