"""Surface normals: angular error statistics pooled over the split.

Protocol (ATRC / InvPT / MLoRE): a pixel is valid when the label is not the
all-zero vector; prediction and label are both L2-normalised and the angle
between them is measured in degrees. We use ``2 * atan2(|p - g|, |p + g|)``,
equal to ``acos(p . g)`` for unit vectors but accurate near 0 and 180 degrees.
``mean_err`` is the pooled mean over all valid pixels, ``rmse_err`` the pooled
root mean square, ``within_*`` the percentage of pixels with error below
11.25 / 22.5 / 30 degrees (exact counts).

The median needs every error of the split; to stay O(1) in memory the meter
keeps a histogram with ``bin_deg`` (0.01 degree) bins over [0, 180] and takes
the centre of the bin holding each middle order statistic (their mean for an
even count, like ``np.median``), so ``median_err`` is exact to within half a
bin width.
"""

from __future__ import annotations

import numpy as np

from edgemt.metrics._common import ArrayLike, check_spatial, to_numpy

__all__ = ["NormalsMeter", "angular_error_deg"]

_THRESHOLDS = (11.25, 22.5, 30.0)


def angular_error_deg(pred: np.ndarray, gt: np.ndarray, axis: int = 0) -> np.ndarray:
    """Angle in degrees between vectors along ``axis`` (both normalised first)."""
    p = pred / np.maximum(np.linalg.norm(pred, axis=axis, keepdims=True), 1e-12)
    g = gt / np.maximum(np.linalg.norm(gt, axis=axis, keepdims=True), 1e-12)
    return np.degrees(2.0 * np.arctan2(np.linalg.norm(p - g, axis=axis), np.linalg.norm(p + g, axis=axis)))


class NormalsMeter:
    """Pooled angular errors. Keys: ``mean_err``, ``median_err``, ``rmse_err``,
    ``within_11.25``, ``within_22.5``, ``within_30`` (degrees / percent)."""

    def __init__(self, bin_deg: float = 0.01) -> None:
        if bin_deg <= 0:
            raise ValueError(f"bin_deg must be > 0, got {bin_deg}")
        self.bin_deg = float(bin_deg)
        self.n_bins = int(np.ceil(180.0 / self.bin_deg))
        self.reset()

    def reset(self) -> None:
        self.hist = np.zeros(self.n_bins, dtype=np.int64)
        self.sum_err = 0.0
        self.sum_sq = 0.0
        self.n = 0
        self.within = np.zeros(len(_THRESHOLDS), dtype=np.int64)

    def update(self, pred: ArrayLike, label: ArrayLike) -> None:
        pred = to_numpy(pred, "pred")
        label = to_numpy(label, "label")
        check_spatial(pred, label, (4,), "normals")
        if pred.shape != label.shape or pred.shape[1] != 3:
            raise ValueError(
                f"normals: pred shape {tuple(pred.shape)} and label shape {tuple(label.shape)} must both be (B, 3, H, W)"
            )
        g = np.moveaxis(label.astype(np.float64), 1, -1)  # (B, H, W, 3)
        p = np.moveaxis(pred.astype(np.float64), 1, -1)
        valid = np.any(g != 0, axis=-1) & np.all(np.isfinite(g), axis=-1)
        err = angular_error_deg(p[valid], g[valid], axis=-1)
        err = np.nan_to_num(err, nan=180.0)  # a zero / NaN prediction counts as the worst error
        self.sum_err += float(err.sum())
        self.sum_sq += float(np.dot(err, err))
        self.n += int(err.size)
        for i, t in enumerate(_THRESHOLDS):
            self.within[i] += int(np.count_nonzero(err < t))
        idx = np.minimum((err / self.bin_deg).astype(np.int64), self.n_bins - 1)
        self.hist += np.bincount(idx, minlength=self.n_bins)

    def _order_stat(self, q: int, cum: np.ndarray) -> float:
        """Centre of the bin holding the ``q``-th smallest error (0-based)."""
        k = int(np.searchsorted(cum, q + 1, side="left"))
        return (k + 0.5) * self.bin_deg

    def _median(self) -> float:
        cum = np.cumsum(self.hist)
        lo, hi = (self.n - 1) // 2, self.n // 2  # the two middle order statistics (equal when n is odd)
        return 0.5 * (self._order_stat(lo, cum) + self._order_stat(hi, cum))

    def compute(self) -> dict[str, float]:
        if self.n == 0:
            nan = float("nan")
            return {"mean_err": nan, "median_err": nan, "rmse_err": nan, **{f"within_{t:g}": nan for t in _THRESHOLDS}}
        out = {
            "mean_err": self.sum_err / self.n,
            "median_err": self._median(),
            "rmse_err": float(np.sqrt(self.sum_sq / self.n)),
        }
        for i, t in enumerate(_THRESHOLDS):
            out[f"within_{t:g}"] = 100.0 * float(self.within[i]) / self.n
        return out
