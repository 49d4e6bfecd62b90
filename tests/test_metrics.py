"""Metrics: hand-computed cases for every meter, the boundary matcher and Delta_m."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from edgemt.errors import ConfigError
from edgemt.metrics import (
    BoundaryMeter,
    DepthMeter,
    MultiTaskEvaluator,
    NormalsMeter,
    SaliencyMeter,
    SegmentationMeter,
    boundary_counts,
    boundary_f,
    delta_m,
    edge_nms,
    make_meter,
)
from edgemt.metrics.boundary import _incremental_matching, _pairs
from edgemt.tasks import TASKS, resolve_tasks

# --------------------------------------------------------------------------- segmentation

# 3 classes, 7 valid pixels + 1 ignore pixel (whose prediction must not count).
SEG_GT = np.array([[[0, 0, 0, 1, 1, 2, 2, 255]]])
SEG_PRED = np.array([[[0, 0, 1, 1, 2, 2, 0, 1]]])
# confusion [gt, pred]:  row0 = [2, 1, 0], row1 = [0, 1, 1], row2 = [1, 0, 1]
# TP = [2, 1, 1]; FP = colsum - TP = [1, 1, 1]; FN = rowsum - TP = [1, 1, 1]
# IoU = [2/4, 1/3, 1/3] -> mIoU = (0.5 + 2/3) / 3 = 38.888...%; pixel acc = 4/7
SEG_MIOU = 100 * (0.5 + 1 / 3 + 1 / 3) / 3


def test_segmentation_hand_computed_confusion():
    m = SegmentationMeter(num_classes=3)
    m.update(SEG_PRED, SEG_GT)
    assert m.confusion.tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 1]]
    r = m.compute()
    assert r["miou"] == pytest.approx(SEG_MIOU)
    assert r["pixel_acc"] == pytest.approx(100 * 4 / 7)
    assert r["iou_per_class"] == pytest.approx([50.0, 100 / 3, 100 / 3])


def test_segmentation_probabilities_and_torch_equal_class_map():
    probs = np.eye(3)[SEG_PRED[0, 0]].T[None, :, None, :] * 0.8 + 0.05  # (1, 3, 1, 8), argmax = SEG_PRED
    m = SegmentationMeter(num_classes=3)
    m.update(torch.from_numpy(probs).float(), torch.from_numpy(SEG_GT))
    assert m.compute()["miou"] == pytest.approx(SEG_MIOU)


def test_segmentation_ignore_pixels_excluded():
    # turning a wrongly predicted valid pixel into ignore removes exactly one FP and one FN
    gt = SEG_GT.copy()
    gt[0, 0, 2] = 255  # was gt 0 / pred 1
    m = SegmentationMeter(num_classes=3)
    m.update(SEG_PRED, gt)
    # TP = [2, 1, 1]; FP = [1, 0, 1]; FN = [0, 1, 1] -> IoU = [2/3, 1/2, 1/3]
    assert m.compute()["miou"] == pytest.approx(100 * (2 / 3 + 1 / 2 + 1 / 3) / 3)
    assert m.compute()["pixel_acc"] == pytest.approx(100 * 4 / 6)


def test_segmentation_absent_class_option():
    # class 3 never occurs in GT nor prediction
    ign = SegmentationMeter(num_classes=4)
    zero = SegmentationMeter(num_classes=4, miou_absent="zero")
    for m in (ign, zero):
        m.update(SEG_PRED, SEG_GT)
    assert ign.compute()["miou"] == pytest.approx(SEG_MIOU)
    assert zero.compute()["miou"] == pytest.approx(100 * (0.5 + 2 / 3) / 4)
    assert math.isnan(ign.compute()["iou_per_class"][3])


def test_segmentation_pooled_over_batches_not_averaged():
    # batch A: gt all 0, pred all 0 (IoU0 = 1); batch B: gt [1, 1, 1, 0], pred [1, 0, 0, 0]
    a_gt, a_pr = np.zeros((1, 2, 2), int), np.zeros((1, 2, 2), int)
    b_gt, b_pr = np.array([[[1, 1], [1, 0]]]), np.array([[[1, 0], [0, 0]]])
    two = SegmentationMeter(2)
    two.update(a_pr, a_gt)
    two.update(b_pr, b_gt)
    one = SegmentationMeter(2)
    one.update(np.concatenate([a_pr, b_pr]), np.concatenate([a_gt, b_gt]))
    # pooled: TP = [5, 1], FP = [2, 0], FN = [0, 2] -> IoU = [5/7, 1/3]
    assert two.compute()["miou"] == pytest.approx(one.compute()["miou"])
    assert two.compute()["miou"] == pytest.approx(100 * (5 / 7 + 1 / 3) / 2)
    per_batch = []
    for pr, gt in ((a_pr, a_gt), (b_pr, b_gt)):
        m = SegmentationMeter(2)
        m.update(pr, gt)
        per_batch.append(m.compute()["miou"])
    assert abs(np.mean(per_batch) - two.compute()["miou"]) > 1.0


def test_segmentation_bad_inputs():
    m = SegmentationMeter(num_classes=3)
    with pytest.raises(ValueError, match=r"\(1, 3, 4, 4\).*\(1, 5, 5\)"):
        m.update(np.zeros((1, 3, 4, 4)), np.zeros((1, 5, 5), int))
    with pytest.raises(ValueError, match="num_classes=3"):
        m.update(np.zeros((1, 4, 5, 5)), np.zeros((1, 5, 5), int))
    with pytest.raises(ValueError, match="label values"):
        m.update(np.zeros((1, 5, 5), int), np.full((1, 5, 5), 7))


# --------------------------------------------------------------------------- depth


def test_depth_pooled_rmse_differs_from_per_image_mean():
    # image A: 4 valid pixels gt 2, one predicted 4 (error 2) -> RMSE_A = sqrt(4/4) = 1
    # image B: 1 valid pixel (gt 1, exact); gt 0 and gt 90 (> 80) are invalid
    gt = np.array([[[[2.0, 2.0], [2.0, 2.0]]], [[[1.0, 0.0], [90.0, 0.0]]]])
    pr = np.array([[[[4.0, 2.0], [2.0, 2.0]]], [[[1.0, 5.0], [3.0, 7.0]]]])
    m = DepthMeter()
    m.update(torch.from_numpy(pr[:1]), torch.from_numpy(gt[:1]))
    m.update(pr[1:], gt[1:])
    r = m.compute()
    # pooled: sqrt(4 / 5) = 0.894; the mean of per-image RMSEs would be (1 + 0) / 2 = 0.5
    assert r["rmse"] == pytest.approx(math.sqrt(4 / 5))
    assert r["rmse"] != pytest.approx(0.5)
    assert r["abs_rel"] == pytest.approx((2 / 2) / 5)
    assert r["log_rmse"] == pytest.approx(math.log(2) / math.sqrt(5))


def test_depth_max_depth_option_and_shapes():
    gt = np.array([[[[50.0, 10.0]]]])
    pr = np.array([[[[40.0, 10.0]]]])
    m = DepthMeter(max_depth=20)
    m.update(pr, gt)
    assert m.compute()["rmse"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match=r"\(1, 1, 2, 2\).*\(1, 1, 3, 3\)"):
        m.update(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 3, 3)))


# --------------------------------------------------------------------------- normals


def _unit(deg: float) -> list[float]:
    return [math.sin(math.radians(deg)), 0.0, math.cos(math.radians(deg))]


def test_normals_known_angles_and_thresholds():
    # label is +z everywhere but one all-zero (ignored) pixel; predictions at 90, 60, 20, 10, 0 degrees
    preds = [_unit(90), _unit(60), _unit(20), _unit(10), [0.0, 0.0, 2.0], [1.0, 0.0, 0.0]]  # last: ignored
    gts = [[0.0, 0.0, 1.0]] * 5 + [[0.0, 0.0, 0.0]]
    pred = np.array(preds, dtype=np.float32).T.reshape(1, 3, 1, 6)
    label = np.array(gts, dtype=np.float32).T.reshape(1, 3, 1, 6)
    m = NormalsMeter()
    m.update(pred, label)
    r = m.compute()
    assert r["mean_err"] == pytest.approx((90 + 60 + 20 + 10 + 0) / 5, abs=1e-3)
    assert r["median_err"] == pytest.approx(20.0, abs=0.01)
    assert r["rmse_err"] == pytest.approx(math.sqrt((90**2 + 60**2 + 20**2 + 10**2) / 5), abs=1e-3)
    assert r["within_11.25"] == pytest.approx(40.0)
    assert r["within_22.5"] == pytest.approx(60.0)
    assert r["within_30"] == pytest.approx(60.0)


def test_normals_opposite_vectors_and_even_median():
    pred = np.array([_unit(180), _unit(0)], dtype=np.float64).T.reshape(1, 3, 1, 2)
    label = np.array([_unit(0), _unit(0)], dtype=np.float64).T.reshape(1, 3, 1, 2)
    m = NormalsMeter()
    m.update(torch.from_numpy(pred), torch.from_numpy(label))
    r = m.compute()
    assert r["mean_err"] == pytest.approx(90.0, abs=1e-6)
    assert r["median_err"] == pytest.approx(90.0, abs=0.01)  # mean of the two middle values, like np.median


# --------------------------------------------------------------------------- saliency


def test_saliency_maxf_at_known_threshold():
    # 4 salient pixels with p = [0.9, 0.9, 0.6, 0.22], 4 background with p = [0.7, 0.12, 0.08, 0.08]
    p = np.array([0.9, 0.9, 0.6, 0.22, 0.7, 0.12, 0.08, 0.08, 0.99])
    g = np.array([1, 1, 1, 1, 0, 0, 0, 0, 255])  # the last pixel is ignored
    pred = np.stack([1 - p, p])[None, :, None, :]  # (1, 2, 1, 9) softmax layout
    m = SaliencyMeter()
    m.update(pred, g[None, None, :])
    f = m.f_per_threshold()
    # t in {0.15, 0.20}: predicted {0.9, 0.9, 0.6, 0.22, 0.7} -> TP 4, PP 5: P = 0.8, R = 1,
    # F = 1.3 * 0.8 / (0.3 * 0.8 + 1) = 1.04 / 1.24 = 0.8387 (the maximum)
    # t = 0.75: TP 2, PP 2 -> P = 1, R = 0.5, F = 0.65 / 0.8 = 0.8125
    # t = 0.05: all 8 -> P = 0.5, R = 1, F = 0.65 / 1.15
    assert f[2] == pytest.approx(1.04 / 1.24)
    assert f[14] == pytest.approx(0.8125)
    assert f[0] == pytest.approx(0.65 / 1.15)
    r = m.compute()
    assert r["maxf"] == pytest.approx(100 * 1.04 / 1.24)
    assert r["best_threshold"] == pytest.approx(0.15)


def test_saliency_paper_compat_sigmoid_changes_result():
    # positives 0.35, negatives 0.25: threshold 0.30 separates them (F = 1); after the papers'
    # sigmoid they become 0.587 / 0.562, which no threshold of 0.05..0.95 separates:
    # t <= 0.55 -> P = 0.5, R = 1, F = 0.65 / 1.15; t >= 0.60 -> nothing predicted, F = 0
    p = np.array([[[0.35, 0.35, 0.25, 0.25]]])
    g = np.array([[[1, 1, 0, 0]]])
    plain, compat = SaliencyMeter(), SaliencyMeter(paper_compat=True)
    plain.update(p, g)
    compat.update(torch.from_numpy(p), torch.from_numpy(g))
    assert plain.compute()["maxf"] == pytest.approx(100.0)
    assert compat.compute()["maxf"] == pytest.approx(100 * 0.65 / 1.15)


def test_saliency_counts_pooled_over_batches():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(4, 1, 6, 6))
    g = (rng.uniform(size=(4, 6, 6)) < 0.4).astype(int)
    a, b = SaliencyMeter(), SaliencyMeter()
    a.update(p, g)
    b.update(p[:1], g[:1])
    b.update(p[1:], g[1:])
    assert a.compute() == pytest.approx(b.compute())
    # brute-force counts at threshold 0.5
    assert a.tp[9] == int(((p[:, 0] >= 0.5) & (g == 1)).sum())
    with pytest.raises(ValueError, match=r"\(4, 3, 6, 6\)"):
        a.update(rng.uniform(size=(4, 3, 6, 6)), g)


# --------------------------------------------------------------------------- boundary

H, W = 96, 128  # diagonal 160 -> maxDist = 0.011 * 160 = 1.76 px (NYUD ratio)


def _line_label(row: int = 48) -> np.ndarray:
    lab = np.zeros((1, 1, H, W), np.float32)
    lab[0, 0, row, 10:118] = 1.0
    return lab


def _blurred_line(row: int, sigma: float = 1.5) -> np.ndarray:
    m = np.zeros((H, W))
    m[row, 10:118] = 1.0
    m = ndimage.gaussian_filter1d(m, sigma, axis=0)
    return (m / m.max())[None, None]


def test_boundary_shift_within_max_dist_matches():
    m = BoundaryMeter()
    m.update(_blurred_line(49), _line_label(48))  # 1 px off < 1.76 px
    assert m.compute()["odsf"] > 97.0


def test_boundary_shift_beyond_max_dist_fails():
    m = BoundaryMeter()
    m.update(torch.from_numpy(_blurred_line(51)), torch.from_numpy(_line_label(48)))  # 3 px off
    assert m.compute()["odsf"] < 5.0


def test_boundary_one_to_one_matching_doubled_lines():
    gt = np.zeros((H, W), bool)
    gt[48, 10:118] = True
    pred = np.zeros((H, W), bool)
    pred[47, 10:118] = pred[49, 10:118] = True  # two lines, each within 1 px of the single GT line
    p, r, f = boundary_f(pred, gt, max_dist=1.76)
    assert p == pytest.approx(0.5)  # a many-to-one matcher would give 1.0
    assert r == pytest.approx(1.0)
    assert f == pytest.approx(2 * 0.5 / 1.5)
    # the meter (no NMS, so both lines survive) pools the same counts
    m = BoundaryMeter(nms=False)
    m.update(pred[None, None].astype(np.float32), gt[None, None].astype(np.float32))
    assert m.compute()["precision"] == pytest.approx(50.0)
    assert m.compute()["recall"] == pytest.approx(100.0)


def test_boundary_nms_thins_blurred_line():
    blurred = _blurred_line(48, sigma=2.0)[0, 0]
    assert (blurred > 0.05).sum(axis=0)[64] >= 7  # thick before NMS
    thin = edge_nms(blurred)
    cols = thin[:, 20:108] > 0.05
    assert np.all(cols.sum(axis=0) == 1)  # one pixel per column ...
    assert np.all(cols[48])  # ... on the ridge


def test_boundary_ignore_pixels_excluded():
    lab = _line_label(48)
    pred = _blurred_line(48)
    pred[0, 0, 20, 10:118] = 1.0  # a false line ...
    lab[0, 0, 15:25, :] = 255  # ... inside an ignore band
    m = BoundaryMeter()
    m.update(pred, lab)
    assert m.compute()["precision"] > 97.0


def test_boundary_incremental_matching_equals_scipy_per_threshold():
    rng = np.random.default_rng(3)
    prob = ndimage.gaussian_filter(rng.uniform(size=(H, W)), 1.0)
    prob = (prob - prob.min()) / (prob.max() - prob.min())
    gt = np.zeros((H, W), bool)
    gt[rng.integers(0, H, 300), rng.integers(0, W, 300)] = True
    m = BoundaryMeter(thin="none", n_thresholds=21)
    valid = np.ones((H, W), bool)
    tp, n_pred, n_gt = m.image_counts(prob, gt, valid)
    e = m.prepare(prob, valid)
    max_dist = 0.011 * math.hypot(H, W)
    assert tp.max() > 20
    for k, t in enumerate(m.thresholds):
        assert (tp[k], n_pred[k], n_gt) == boundary_counts(e >= t, gt, max_dist)


def test_incremental_matcher_is_maximum_not_greedy():
    # left 0 -> {0, 1}, left 1 -> {0}: greedy-by-order matches 0-0 and then fails on 1;
    # the augmenting path re-routes 0 -> 1, so both prefixes are maximum: [1, 2]
    indptr = np.array([0, 2, 3])
    indices = np.array([0, 1, 0])
    assert _incremental_matching(indptr, indices, 2).tolist() == [1, 2]
    pts = np.array([[0.0, 0.0], [0.0, 1.0]])
    ip, ix = _pairs(pts, pts, 1.0)
    assert ip.tolist() == [0, 2, 4] and ix.tolist() == [0, 1, 1, 0]  # nearest first


def test_boundary_accumulates_over_images_and_bad_shapes():
    a, b = BoundaryMeter(), BoundaryMeter()
    preds = np.concatenate([_blurred_line(49), _blurred_line(52)])
    labels = np.concatenate([_line_label(48), _line_label(48)])
    a.update(preds, labels)
    b.update(preds[:1], labels[:1])
    b.update(preds[1:], labels[1:])
    assert a.compute() == pytest.approx(b.compute())
    assert 40.0 < a.compute()["odsf"] < 60.0  # one image matches, the other does not
    with pytest.raises(ValueError, match=r"\(2, 1, 96, 128\).*\(2, 1, 48, 64\)"):
        a.update(preds, labels[:, :, :48, :64])


# --------------------------------------------------------------------------- Delta_m / evaluator


def test_delta_m_mixed_directions():
    res = {"semseg": {"miou": 44.0}, "depth": {"rmse": 0.55}, "normals": {"mean_err": 18.0}}
    ref = {"semseg": {"miou": 40.0}, "depth": {"rmse": 0.50}, "normals": {"mean_err": 20.0}}
    # semseg +10 %, depth (lower better) 0.55 vs 0.50 -> -10 %, normals 18 vs 20 -> +10 %; mean 10/3
    assert delta_m(res, ref, ["semseg", "depth", "normals"]) == pytest.approx(10 / 3)
    assert delta_m(res, ref, [TASKS["depth"]]) == pytest.approx(-10.0)
    with pytest.raises(ConfigError, match="edge"):
        delta_m(res, ref, ["semseg", "edge"])
    with pytest.raises(ConfigError, match="reference"):
        delta_m(res, {"semseg": {"miou": 40.0}}, ["semseg", "depth"])


def test_multitask_evaluator_all_tasks():
    tasks = resolve_tasks(["semseg", "depth", "normals", "edge", "saliency", "human_parts"], {"semseg": 5})
    ev = MultiTaskEvaluator(tasks, options={"edge": {"max_dist_ratio": 0.0075}, "saliency": {"paper_compat": True}})
    assert isinstance(ev.meters["semseg"], SegmentationMeter) and ev.meters["semseg"].num_classes == 5
    assert ev.meters["edge"].max_dist_ratio == 0.0075 and ev.meters["saliency"].paper_compat
    g = torch.Generator().manual_seed(0)
    b, h, w = 2, 16, 20
    preds = {
        "semseg": torch.rand(b, 5, h, w, generator=g).softmax(1),
        "depth": torch.rand(b, 1, h, w, generator=g) * 5,
        "normals": torch.nn.functional.normalize(torch.randn(b, 3, h, w, generator=g), dim=1),
        "edge": torch.rand(b, 1, h, w, generator=g),
        "saliency": torch.rand(b, 2, h, w, generator=g).softmax(1),
        "human_parts": torch.rand(b, 7, h, w, generator=g).softmax(1),
    }
    labels = {
        "semseg": torch.randint(0, 5, (b, h, w), generator=g),
        "depth": torch.rand(b, 1, h, w, generator=g) * 5,
        "normals": torch.nn.functional.normalize(torch.randn(b, 3, h, w, generator=g), dim=1),
        "edge": (torch.rand(b, 1, h, w, generator=g) < 0.1).float(),
        "saliency": torch.randint(0, 2, (b, h, w), generator=g),
        "human_parts": torch.full((b, h, w), 255),
    }
    ev.update(preds, labels)
    out = ev.compute()
    for t in tasks:
        assert t.metric in out[t.name]
    assert 0.0 <= out["semseg"]["miou"] <= 100.0
    assert math.isnan(out["human_parts"]["miou"])  # all-ignore split: nothing to score
    with pytest.raises(ValueError, match="depth"):
        ev.update({k: v for k, v in preds.items() if k != "depth"}, labels)
    with pytest.raises(ConfigError):
        MultiTaskEvaluator(tasks, options={"edge": {"bogus": 1}})
    with pytest.raises(ConfigError):
        MultiTaskEvaluator(tasks[:1], options={"depth": {}})
    assert isinstance(make_meter(TASKS["edge"]), BoundaryMeter)
