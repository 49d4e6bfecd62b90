"""Saliency: maximum F-measure (beta^2 = 0.3) with counts pooled over the split.

Protocol (ATRC / InvPT / MLoRE ``SaliencyMeter``): the saliency probability is
binarised at each of the thresholds 0.05, 0.10, ..., 0.95 (19 values,
``pred >= t``); true positives, predicted positives and actual positives are
summed over every valid pixel (label != 255) of the split, one set of counts
per threshold. Per threshold ``P = TP / PP``, ``R = TP / AP`` and
``F = (1 + b2) P R / (b2 P + R)``; ``maxF`` is the largest F over thresholds,
in percent.

``paper_compat=True`` reproduces a quirk of the MLoRE / InvPT code: it applies a
sigmoid to the (already softmaxed) probability before thresholding, which maps
[0, 1] to [0.5, 0.73] so every threshold <= 0.5 marks all pixels salient and
the effective thresholds are much coarser. Default off.

``mae`` is the mean absolute error between the (possibly sigmoided)
probability and the binary label over valid pixels (not a paper metric).
"""

from __future__ import annotations

import numpy as np

from edgemt.metrics._common import ArrayLike, label_map_inputs

__all__ = ["SaliencyMeter", "SALIENCY_THRESHOLDS"]

SALIENCY_THRESHOLDS = np.linspace(0.05, 0.95, 19)


class SaliencyMeter:
    """Pooled max-F. Keys: ``maxf`` (percent), ``best_threshold``, ``mae``.

    ``update(pred, label)``: pred ``(B, 2, H, W)`` softmax probabilities
    (channel 1 is salient), ``(B, 1, H, W)`` or ``(B, H, W)`` probabilities;
    label ``(B, H, W)`` (or ``(B, 1, H, W)``) in {0, 1}, ``ignore_index`` ignored.
    """

    def __init__(
        self,
        beta_sq: float = 0.3,
        thresholds: np.ndarray | list[float] | None = None,
        paper_compat: bool = False,
        ignore_index: int = 255,
    ) -> None:
        self.beta_sq = float(beta_sq)
        self.thresholds = np.asarray(SALIENCY_THRESHOLDS if thresholds is None else thresholds, dtype=np.float64)
        if self.thresholds.ndim != 1 or self.thresholds.size == 0 or np.any(np.diff(self.thresholds) <= 0):
            raise ValueError("thresholds must be a non-empty increasing 1-D sequence")
        self.paper_compat = bool(paper_compat)
        self.ignore_index = int(ignore_index)
        self.reset()

    def reset(self) -> None:
        t = self.thresholds.size
        self.tp = np.zeros(t, dtype=np.int64)
        self.pp = np.zeros(t, dtype=np.int64)
        self.ap = 0
        self.abs_err = 0.0
        self.n = 0

    def update(self, pred: ArrayLike, label: ArrayLike) -> None:
        pred, label = label_map_inputs(pred, label, "saliency")
        if pred.ndim == 4:
            if pred.shape[1] == 2:
                pred = pred[:, 1]
            elif pred.shape[1] == 1:
                pred = pred[:, 0]
            else:
                raise ValueError(
                    f"saliency: pred shape {tuple(pred.shape)} must have 1 or 2 channels (label shape {tuple(label.shape)})"
                )
        prob = pred.astype(np.float64)
        if self.paper_compat:
            prob = 1.0 / (1.0 + np.exp(-prob))
        valid = label != self.ignore_index
        g = label[valid]
        if g.size and not np.all((g == 0) | (g == 1)):
            raise ValueError(f"saliency: label values must be 0, 1 or {self.ignore_index}")
        g = g.astype(bool)
        p = prob[valid]
        # k = how many thresholds are <= p, i.e. p is positive at threshold indices [0, k)
        k = np.searchsorted(self.thresholds, p, side="right")
        nt = self.thresholds.size
        pos_at = np.cumsum(np.bincount(k, minlength=nt + 1)[::-1])[::-1]  # pos_at[i] = #(k >= i)
        tp_at = np.cumsum(np.bincount(k[g], minlength=nt + 1)[::-1])[::-1]
        self.pp += pos_at[1:]
        self.tp += tp_at[1:]
        self.ap += int(g.sum())
        self.abs_err += float(np.abs(p - g).sum())
        self.n += int(g.size)

    def f_per_threshold(self) -> np.ndarray:
        """F-measure at each threshold from the pooled counts (0 where undefined)."""
        tp = self.tp.astype(np.float64)
        prec = np.divide(tp, self.pp, out=np.zeros_like(tp), where=self.pp > 0)
        rec = tp / self.ap if self.ap > 0 else np.zeros_like(tp)
        den = self.beta_sq * prec + rec
        return np.divide((1.0 + self.beta_sq) * prec * rec, den, out=np.zeros_like(tp), where=den > 0)

    def compute(self) -> dict[str, float]:
        if self.n == 0:
            return {"maxf": float("nan"), "best_threshold": float("nan"), "mae": float("nan")}
        f = self.f_per_threshold()
        i = int(np.argmax(f))
        return {"maxf": 100.0 * float(f[i]), "best_threshold": float(self.thresholds[i]), "mae": self.abs_err / self.n}
