"""Boundary detection: ODS F-measure, the *Python protocol*.

The papers (ATRC, InvPT, MLoRE) score edges with the MATLAB SEISM toolbox. This
module re-implements that pipeline in Python; it is an approximation of SEISM,
not SEISM, and its numbers are labelled "Python protocol" in reports. Note also
that SEISM evaluates PASCAL-Context on a 2498-image subset of the 5105 val
images, while this meter scores whatever split it is given.

Per image:

1. **NMS** as in structured-edge / HED post-processing (``edgesNmsMex``):
   the orientation comes from the second derivatives of the map smoothed by a
   triangle filter of radius ``orient_radius`` (4):
   ``O = mod(atan(Oyy * sign(-Oxy) / (Oxx + 1e-5)), pi)`` (with sign(0) := 1,
   so exactly axis-aligned ridges get the right normal); a pixel is
   suppressed when ``margin * e`` (1.01) is below the bilinearly interpolated
   value at ``d = +-1 .. +-nms_radius`` pixels along ``(cos O, sin O)``; values
   within ``nms_border`` (5) px of the image border are scaled down linearly to 0
   at the border. Ignore pixels (label 255, e.g. padding) are zeroed.
2. **Thinning** (``skimage.morphology.thin``, like ``bwmorph(.., 'thin', inf)``).
   ``thin="once"`` (default) thins the support of the NMS map once and then
   thresholds it, so the predicted sets of successive thresholds are nested and
   every threshold is scored by one incremental matching pass (below).
   ``thin="per_threshold"`` thins each thresholded map, as the BSDS code does
   (slower; the result differs only where NMS leaves 2-px plateaus);
   ``thin="none"`` skips it.
3. **Thresholds**: ``n_thresholds`` (101) values
   ``linspace(1/(n+1), 1 - 1/(n+1), n)``, predicted boundary = ``E >= t``.
4. **Matching**: predicted and ground-truth boundary pixels are matched
   one-to-one within ``maxDist = max_dist_ratio * diagonal`` (Euclidean,
   ``<=``), where the diagonal is that of the bounding box of the valid
   (non-ignore) pixels, i.e. the unpadded image; ``max_dist_ratio`` is 0.011 for
   NYUD-v2 and 0.0075 for PASCAL-Context. The match is a *maximum* bipartite
   matching (SEISM's CSA assignment also maximises the matched count first), not
   a greedy one. ``TP = |matching|`` is both the matched-prediction and the
   matched-ground-truth count.

Across the split, ``TP``, ``n_pred`` and ``n_gt`` are summed per threshold (ODS:
one threshold for the whole split); ``P = TP / n_pred``, ``R = TP / n_gt``,
``F = 2PR / (P + R)``; ``odsf`` is the maximum over thresholds (no
interpolation between thresholds), in percent. ``oisf`` (best threshold per
image, counts pooled) is reported as well.

Efficiency: with nested predicted sets, the pixels are added in decreasing
score order and each new pixel is matched by one augmenting-path search
(Kuhn's algorithm). After adding the first ``k`` pixels the matching is maximum
for those ``k`` pixels, so one pass gives the exact maximum matching size at
every threshold. Ground-truth pixels visited by a failed search can never lie on
a later augmenting path and are retired, which bounds the work of failed
searches by the number of candidate pairs.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.morphology import thin as _sk_thin

from edgemt.metrics._common import ArrayLike, check_spatial, to_numpy

__all__ = [
    "BoundaryMeter",
    "boundary_f",
    "boundary_counts",
    "edge_nms",
    "edge_orientation",
    "conv_tri",
    "default_thresholds",
]


# --------------------------------------------------------------------------- NMS


def conv_tri(img: np.ndarray, r: int) -> np.ndarray:
    """Separable triangle filter of integer radius ``r`` with symmetric padding."""
    if r <= 0:
        return img.astype(np.float64, copy=True)
    k = np.concatenate([np.arange(1, r + 2), np.arange(r, 0, -1)]).astype(np.float64) / (r + 1) ** 2
    out = ndimage.convolve1d(img.astype(np.float64), k, axis=0, mode="reflect")
    return ndimage.convolve1d(out, k, axis=1, mode="reflect")


def edge_orientation(prob: np.ndarray, r: int = 4) -> np.ndarray:
    """Edge normal orientation in [0, pi) from second derivatives of the smoothed map."""
    s = conv_tri(prob, r)
    oy, ox = np.gradient(s)  # rows (y), cols (x)
    oxx = np.gradient(ox, axis=1)
    oyy, oxy = np.gradient(oy)
    # sign(0) is taken as +1 (MATLAB's is 0): on an exactly axis-aligned ridge Oxy == 0 and
    # sign(0) would give O = 0 (along the ridge) for horizontal edges, disabling NMS there
    sgn = np.where(oxy > 0, -1.0, 1.0)
    return np.mod(np.arctan(oyy * sgn / (oxx + 1e-5)), np.pi)


def _interp(img: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    h, w = img.shape
    x = np.clip(x, 0.0, max(w - 1.001, 0.0))
    y = np.clip(y, 0.0, max(h - 1.001, 0.0))
    x0 = x.astype(np.int64)
    y0 = y.astype(np.int64)
    x1 = np.minimum(x0 + 1, w - 1)
    y1 = np.minimum(y0 + 1, h - 1)
    dx = x - x0
    dy = y - y0
    return (
        img[y0, x0] * (1 - dx) * (1 - dy)
        + img[y0, x1] * dx * (1 - dy)
        + img[y1, x0] * (1 - dx) * dy
        + img[y1, x1] * dx * dy
    )


def edge_nms(
    prob: np.ndarray,
    orient: np.ndarray | None = None,
    radius: int = 1,
    border: int = 5,
    margin: float = 1.01,
    orient_radius: int = 4,
) -> np.ndarray:
    """Non-maximum suppression of an edge probability map along the edge normal."""
    e = np.nan_to_num(np.asarray(prob, dtype=np.float64), nan=0.0)
    h, w = e.shape
    if orient is None:
        orient = edge_orientation(e, orient_radius)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    c, s = np.cos(orient), np.sin(orient)
    em = e * margin
    suppress = np.zeros((h, w), dtype=bool)
    for d in range(-radius, radius + 1):
        if d == 0:
            continue
        suppress |= em < _interp(e, xs + d * c, ys + d * s)
    out = np.where(suppress, 0.0, e)
    sb = min(int(border), w // 2, h // 2)
    if sb > 0:
        ramp = np.arange(sb, dtype=np.float64) / sb
        out[:, :sb] *= ramp[None, :]
        out[:, w - sb :] *= ramp[None, ::-1]
        out[:sb, :] *= ramp[:, None]
        out[h - sb :, :] *= ramp[::-1, None]
    return out


# --------------------------------------------------------------------------- matching


def _pairs(pred_rc: np.ndarray, gt_rc: np.ndarray, max_dist: float) -> tuple[np.ndarray, np.ndarray]:
    """CSR adjacency (indptr, indices) of pred -> gt pixels within ``max_dist``,
    each row's neighbours sorted nearest first."""
    n_pred = len(pred_rc)
    if n_pred == 0 or len(gt_rc) == 0:
        return np.zeros(n_pred + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    sdm = cKDTree(pred_rc).sparse_distance_matrix(cKDTree(gt_rc), max_dist, output_type="ndarray")
    i, j, v = sdm["i"], sdm["j"], sdm["v"]
    order = np.lexsort((v, i))
    i, j = i[order], j[order]
    indptr = np.zeros(n_pred + 1, dtype=np.int64)
    np.cumsum(np.bincount(i, minlength=n_pred), out=indptr[1:])
    return indptr, j.astype(np.int64)


def _incremental_matching(indptr: np.ndarray, indices: np.ndarray, n_right: int) -> np.ndarray:
    """Maximum matching size after each prefix of the left vertices (Kuhn, incremental)."""
    ptr = indptr.tolist()
    nbr = indices.tolist()
    n_left = len(ptr) - 1
    match_r = [-1] * n_right
    dead = [False] * n_right
    seen = [0] * n_right
    stamp = 0
    matched = 0
    cum = [0] * n_left
    for u in range(n_left):
        a, b = ptr[u], ptr[u + 1]
        if a == b:
            cum[u] = matched
            continue
        hit = -1
        for q in range(a, b):
            if match_r[nbr[q]] < 0:
                hit = nbr[q]
                break
        if hit >= 0:
            match_r[hit] = u
            matched += 1
            cum[u] = matched
            continue
        # augmenting-path DFS (iterative): stack of left vertices, path of right vertices
        stamp += 1
        visited: list[int] = []
        stack_l = [u]
        stack_p = [a]
        path_r: list[int] = []
        success = False
        while stack_l:
            lv = stack_l[-1]
            p = stack_p[-1]
            end = ptr[lv + 1]
            nxt = -1
            while p < end:
                r = nbr[p]
                p += 1
                if dead[r] or seen[r] == stamp:
                    continue
                seen[r] = stamp
                visited.append(r)
                if match_r[r] < 0:
                    path_r.append(r)
                    success = True
                    break
                nxt = r
                break
            if success:
                break
            stack_p[-1] = p
            if nxt >= 0:
                m = match_r[nxt]
                path_r.append(nxt)
                stack_l.append(m)
                stack_p.append(ptr[m])
                # lookahead: a free neighbour of the new left vertex ends the search at once
                for q in range(ptr[m], ptr[m + 1]):
                    r = nbr[q]
                    if match_r[r] < 0 and not dead[r]:
                        seen[r] = stamp
                        path_r.append(r)
                        success = True
                        break
                if success:
                    break
            else:
                stack_l.pop()
                stack_p.pop()
                if path_r:
                    path_r.pop()
        if success:
            for lv, r in zip(stack_l, path_r):
                match_r[r] = lv
            matched += 1
        else:
            for r in visited:
                dead[r] = True
        cum[u] = matched
    return np.asarray(cum, dtype=np.int64)


def boundary_counts(pred: np.ndarray, gt: np.ndarray, max_dist: float) -> tuple[int, int, int]:
    """(matched, n_pred, n_gt) of a maximum one-to-one matching within ``max_dist`` pixels
    (no NMS or thinning)."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"boundary_f: pred shape {pred.shape} and gt shape {gt.shape} must be the same (H, W)")
    p_rc = np.argwhere(pred).astype(np.float64)
    g_rc = np.argwhere(gt).astype(np.float64)
    indptr, indices = _pairs(p_rc, g_rc, max_dist)
    if indices.size == 0:
        return 0, len(p_rc), len(g_rc)
    # Nearest-first greedy plus augmenting paths: scipy's maximum_bipartite_matching takes
    # minutes on dense maps (e.g. an int8 edge map above threshold almost everywhere).
    matched = int(_incremental_matching(indptr, indices, len(g_rc))[-1])
    return matched, len(p_rc), len(g_rc)


def _prf(tp: np.ndarray | float, n_pred: np.ndarray | float, n_gt: np.ndarray | float):
    tp = np.asarray(tp, dtype=np.float64)
    n_pred = np.asarray(n_pred, dtype=np.float64)
    n_gt = np.asarray(n_gt, dtype=np.float64) * np.ones_like(tp)
    p = np.divide(tp, n_pred, out=np.zeros_like(tp), where=n_pred > 0)
    r = np.divide(tp, n_gt, out=np.zeros_like(tp), where=n_gt > 0)
    f = np.divide(2 * p * r, p + r, out=np.zeros_like(tp), where=(p + r) > 0)
    return p, r, f


def boundary_f(pred: np.ndarray, gt: np.ndarray, max_dist: float) -> tuple[float, float, float]:
    """(precision, recall, F) of two binary boundary maps under one-to-one matching
    within ``max_dist`` pixels. Use it for parity checks between two maps."""
    tp, n_pred, n_gt = boundary_counts(pred, gt, max_dist)
    p, r, f = _prf(tp, n_pred, n_gt)
    return float(p), float(r), float(f)


# --------------------------------------------------------------------------- meter


def default_thresholds(n: int) -> np.ndarray:
    """SEISM / BSDS thresholds: ``linspace(1/(n+1), 1 - 1/(n+1), n)``."""
    return np.linspace(1.0 / (n + 1), 1.0 - 1.0 / (n + 1), n)


class BoundaryMeter:
    """ODS / OIS boundary F-measure (Python protocol; see the module docstring).

    ``update(pred, label)``: pred ``(B, 1, H, W)`` (or ``(B, H, W)``) edge
    probabilities, label of the same layout in {0, 1}, ``ignore_index`` excluded.
    ``compute()`` keys: ``odsf``, ``oisf`` (percent), ``ods_threshold``,
    ``precision``, ``recall`` (percent, at the ODS threshold).
    """

    def __init__(
        self,
        max_dist_ratio: float = 0.011,
        n_thresholds: int = 101,
        nms: bool = True,
        nms_radius: int = 1,
        nms_border: int = 5,
        nms_margin: float = 1.01,
        orient_radius: int = 4,
        thin: str = "once",
        ignore_index: float = 255,
    ) -> None:
        if thin not in ("once", "per_threshold", "none"):
            raise ValueError(f"thin must be 'once', 'per_threshold' or 'none', got {thin!r}")
        if n_thresholds < 1:
            raise ValueError(f"n_thresholds must be >= 1, got {n_thresholds}")
        if max_dist_ratio <= 0:
            raise ValueError(f"max_dist_ratio must be > 0, got {max_dist_ratio}")
        self.max_dist_ratio = float(max_dist_ratio)
        self.thresholds = default_thresholds(int(n_thresholds))
        self.nms = bool(nms)
        self.nms_radius = int(nms_radius)
        self.nms_border = int(nms_border)
        self.nms_margin = float(nms_margin)
        self.orient_radius = int(orient_radius)
        self.thin = thin
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        n = self.thresholds.size
        self.tp = np.zeros(n, dtype=np.int64)
        self.n_pred = np.zeros(n, dtype=np.int64)
        self.n_gt = 0
        self.ois = np.zeros(3, dtype=np.int64)  # tp, n_pred, n_gt at each image's best threshold
        self.n_images = 0

    # -- one image ---------------------------------------------------------
    def prepare(self, prob: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """NMS'ed, masked score map of one image (before thresholding)."""
        e = np.nan_to_num(prob.astype(np.float64), nan=0.0)
        if self.nms:
            e = edge_nms(e, None, self.nms_radius, self.nms_border, self.nms_margin, self.orient_radius)
        e[~valid] = 0.0
        return e

    def image_counts(self, prob: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Per-threshold (tp, n_pred) and n_gt of one image."""
        gt = gt & valid
        ys, xs = np.nonzero(valid)
        if ys.size == 0:
            z = np.zeros(self.thresholds.size, dtype=np.int64)
            return z, z.copy(), 0
        max_dist = self.max_dist_ratio * float(np.hypot(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1))
        e = self.prepare(prob, valid)
        if self.thin == "per_threshold":
            return self._counts_per_threshold(e, gt, max_dist)
        cand = e >= self.thresholds[0]
        if self.thin == "once":
            cand = _sk_thin(cand)
        return _counts_nested(e, cand, gt, max_dist, self.thresholds)

    def _counts_per_threshold(self, e: np.ndarray, gt: np.ndarray, max_dist: float):
        tp = np.zeros(self.thresholds.size, dtype=np.int64)
        n_pred = np.zeros_like(tp)
        last_n = -1
        last = (0, 0)
        for k, t in enumerate(self.thresholds):
            above = e >= t
            n_above = int(np.count_nonzero(above))
            if n_above != last_n:  # thresholds pass through the same set often
                m, npr, _ = boundary_counts(_sk_thin(above) if n_above else above, gt, max_dist)
                last, last_n = (m, npr), n_above
            tp[k], n_pred[k] = last
        return tp, n_pred, int(np.count_nonzero(gt))

    # -- meter API ---------------------------------------------------------
    def update(self, pred: ArrayLike, label: ArrayLike) -> None:
        pred = to_numpy(pred, "pred")
        label = to_numpy(label, "label")
        if pred.ndim == 3:
            pred = pred[:, None]
        if label.ndim == 3:
            label = label[:, None]
        check_spatial(pred, label, (4,), "edge")
        if pred.shape != label.shape or pred.shape[1] != 1:
            raise ValueError(
                f"edge: pred shape {tuple(pred.shape)} and label shape {tuple(label.shape)} must both be (B, 1, H, W)"
            )
        for b in range(pred.shape[0]):
            lab = label[b, 0]
            valid = lab != self.ignore_index
            gt = (lab >= 0.5) & valid
            tp, n_pred, n_gt = self.image_counts(pred[b, 0], gt, valid)
            self.tp += tp
            self.n_pred += n_pred
            self.n_gt += n_gt
            _, _, f = _prf(tp, n_pred, n_gt)
            k = int(np.argmax(f))
            self.ois += np.array([tp[k], n_pred[k], n_gt], dtype=np.int64)
            self.n_images += 1

    def compute(self) -> dict[str, float]:
        if self.n_images == 0:
            nan = float("nan")
            return {"odsf": nan, "oisf": nan, "ods_threshold": nan, "precision": nan, "recall": nan}
        p, r, f = _prf(self.tp, self.n_pred, self.n_gt)
        k = int(np.argmax(f))
        _, _, f_ois = _prf(*self.ois)
        return {
            "odsf": 100.0 * float(f[k]),
            "oisf": 100.0 * float(f_ois),
            "ods_threshold": float(self.thresholds[k]),
            "precision": 100.0 * float(p[k]),
            "recall": 100.0 * float(r[k]),
        }


def _counts_nested(e: np.ndarray, cand: np.ndarray, gt: np.ndarray, max_dist: float, thresholds: np.ndarray):
    """Per-threshold (tp, n_pred), n_gt when the prediction at ``t`` is ``cand & (e >= t)``."""
    p_rc = np.argwhere(cand)
    vals = e[cand]
    order = np.argsort(-vals, kind="stable")
    p_rc = p_rc[order].astype(np.float64)
    vals = vals[order]
    g_rc = np.argwhere(gt).astype(np.float64)
    indptr, indices = _pairs(p_rc, g_rc, max_dist)
    cum = _incremental_matching(indptr, indices, len(g_rc)) if indices.size else np.zeros(len(p_rc), dtype=np.int64)
    # n_pred(t) = #(vals >= t); vals is descending
    n_pred = np.searchsorted(-vals, -thresholds, side="right").astype(np.int64)
    tp = np.where(n_pred > 0, cum[np.maximum(n_pred - 1, 0)] if cum.size else 0, 0).astype(np.int64)
    return tp, n_pred, len(g_rc)
