"""Depth: RMSE, abs-rel and log-RMSE pooled over all valid pixels of the split.

Protocol (ATRC / InvPT / MLoRE ``DepthMeter``): a pixel is valid when
``min_depth < gt < max_depth`` (0 and 80 m by default). The prediction is
clamped to ``>= 1e-9`` (the papers clamp before every term; with a ReLU output
this only matters for the log). Squared errors are summed over every valid
pixel of every image and divided by the total valid count before the square
root: ``rmse = sqrt(sum (p - g)^2 / N)``. This is *not* the mean of per-image
RMSEs, which weights small and large images equally and differs whenever the
per-image errors differ. ``log_rmse`` pools ``(log p - log g)^2`` the same way;
``abs_rel`` is the pooled mean of ``|p - g| / g``.
"""

from __future__ import annotations

import numpy as np

from edgemt.metrics._common import ArrayLike, check_spatial, to_numpy

__all__ = ["DepthMeter"]


class DepthMeter:
    """Pooled depth errors (metres). Keys: ``rmse``, ``abs_rel``, ``log_rmse``."""

    def __init__(self, max_depth: float = 80.0, min_depth: float = 0.0, clamp_min: float = 1e-9) -> None:
        if not max_depth > min_depth:
            raise ValueError(f"max_depth ({max_depth}) must exceed min_depth ({min_depth})")
        self.max_depth = float(max_depth)
        self.min_depth = float(min_depth)
        self.clamp_min = float(clamp_min)
        self.reset()

    def reset(self) -> None:
        self.sum_sq = 0.0
        self.sum_abs_rel = 0.0
        self.sum_log_sq = 0.0
        self.n = 0

    def update(self, pred: ArrayLike, label: ArrayLike) -> None:
        pred = to_numpy(pred, "pred")
        label = to_numpy(label, "label")
        if label.ndim == 3:
            label = label[:, None]
        if pred.ndim == 3:
            pred = pred[:, None]
        check_spatial(pred, label, (4,), "depth")
        if pred.shape != label.shape or pred.shape[1] != 1:
            raise ValueError(
                f"depth: pred shape {tuple(pred.shape)} and label shape {tuple(label.shape)} must both be (B, 1, H, W)"
            )
        g = label.astype(np.float64)
        valid = np.isfinite(g) & (g > self.min_depth) & (g < self.max_depth)
        g = g[valid]
        p = np.maximum(pred.astype(np.float64)[valid], self.clamp_min)
        d = p - g
        self.sum_sq += float(np.dot(d, d))
        self.sum_abs_rel += float(np.sum(np.abs(d) / g))
        ld = np.log(p) - np.log(g)
        self.sum_log_sq += float(np.dot(ld, ld))
        self.n += int(g.size)

    def compute(self) -> dict[str, float]:
        if self.n == 0:
            return {"rmse": float("nan"), "abs_rel": float("nan"), "log_rmse": float("nan")}
        return {
            "rmse": float(np.sqrt(self.sum_sq / self.n)),
            "abs_rel": float(self.sum_abs_rel / self.n),
            "log_rmse": float(np.sqrt(self.sum_log_sq / self.n)),
        }
