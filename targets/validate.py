"""Validate one exported artifact through its own runtime against its PyTorch model.

:func:`validate_runtime` runs the validation split image by image (batch 1)
through the runtime under test and through the PyTorch reference, applies the
same :func:`edgemt.tasks.activate` to both raw outputs, and measures:

* accuracy of both against ground truth with the task metrics
  (:class:`edgemt.metrics.MultiTaskEvaluator`) and the delta per metric
  (runtime minus PyTorch), plus Delta_m of the runtime relative to PyTorch;
* parity between the two predictions, pooled over all images:

  - ``semseg`` / ``human_parts`` / ``saliency``: argmax agreement, the
    fraction of pixels of the unpadded image where both argmaxes are equal;
  - ``depth``: mean ``|a - b| / max(|b|, eps)`` over pixels where the
    reference ``b > 0`` (if the reference predicts no positive depth at all,
    the figure is the mean ``|a - b|``: a relative error is undefined there);
  - ``normals``: mean angle in degrees between the two normalised
    predictions (``atan2(|a x b|, a . b)``, stable near 0 where ``acos`` is not);
  - ``edge``: boundary F of the runtime's map against the reference's, both
    thresholded at 0.5, with ``max_dist = 0.0075 * image diagonal``; the mean
    over images (1.0 for an image where both maps are empty);

* latency of the runtime at batch 1 (or the artifact's fixed batch, if it
  was exported with one > 1; the image is repeated) and the validation input size
  (``cfg.warmup`` untimed, ``cfg.runs`` timed runs, threads stated), the file
  size, peak memory and MACs (when the caller knows them).

Parity figures are compared with ``cfg.parity[precision]``; ``status`` is
``"passed"`` or ``"failed_validation"`` and ``reasons`` names each figure that
missed its threshold. Accuracy against ground truth does not decide the
status: an artifact that reproduces its PyTorch model is a correct export,
however good that model is.

Images smaller than a runtime's fixed input size are zero-padded at the
bottom/right (the reference sees the same padded image) and every output is
cropped back before metrics and parity, so padding never counts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edgemt.config import ParityThresholds, ValidateConfig
from edgemt.errors import ConfigError
from edgemt.tasks import Task, activate

from .latency import measure_latency, peak_rss_mb
from .runtime import _torch_threads, as_runtime, outputs_at_input_size

__all__ = ["PARITY_KEYS", "validate_runtime", "parity_reasons", "ParityMeter"]

# task -> (parity figure name, ParityThresholds field, higher is better)
PARITY_KEYS: dict[str, tuple[str, str, bool]] = {
    "semseg": ("agreement", "semseg_agreement", True),
    "human_parts": ("agreement", "human_parts_agreement", True),
    "saliency": ("agreement", "saliency_agreement", True),
    "depth": ("rel_err", "depth_rel_err", False),
    "normals": ("mean_deg", "normals_deg", False),
    "edge": ("boundary_f", "edge_f", True),
}

_EPS = 1e-6


class ParityMeter:
    """Accumulates parity between runtime and reference predictions, pooled over images.

    ``update`` takes *activated* predictions of one batch, already cropped to
    the unpadded image, as torch tensors ``(B, C, H, W)``.
    """

    def __init__(self, tasks: Sequence[Task]) -> None:
        self.tasks = list(tasks)
        self._num: dict[str, float] = {t.name: 0.0 for t in tasks}
        self._den: dict[str, float] = {t.name: 0.0 for t in tasks}
        # depth fallback (absolute error) when the reference has no positive pixel
        self._abs: dict[str, float] = {t.name: 0.0 for t in tasks}
        self._abs_n: dict[str, float] = {t.name: 0.0 for t in tasks}
        self.nonfinite: set[str] = set()

    def update(self, task: Task, pred: torch.Tensor, ref: torch.Tensor) -> None:
        n = task.name
        a, b = pred.double(), ref.double()
        if not torch.isfinite(a).all():
            self.nonfinite.add(n)
            a = torch.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        if task.name not in PARITY_KEYS:
            return
        if task.activation == "softmax":
            eq = a.argmax(dim=1) == b.argmax(dim=1)
            self._num[n] += float(eq.sum())
            self._den[n] += eq.numel()
        elif n == "depth":
            valid = b > 0
            diff = (a - b).abs()
            self._num[n] += float((diff / b.abs().clamp_min(_EPS))[valid].sum())
            self._den[n] += float(valid.sum())
            self._abs[n] += float(diff.sum())
            self._abs_n[n] += diff.numel()
        elif n == "normals":
            an, bn = F.normalize(a, dim=1), F.normalize(b, dim=1)
            cross = torch.linalg.cross(an, bn, dim=1).norm(dim=1)
            dot = (an * bn).sum(dim=1)
            ang = torch.rad2deg(torch.atan2(cross, dot))
            self._num[n] += float(ang.sum())
            self._den[n] += ang.numel()
        elif n == "edge":
            from edgemt.metrics import boundary_f

            for i in range(a.shape[0]):
                pa = (a[i, 0] > 0.5).cpu().numpy()
                pb = (b[i, 0] > 0.5).cpu().numpy()
                if not pa.any() and not pb.any():
                    f = 1.0  # both maps empty: they agree exactly
                elif not pa.any() or not pb.any():
                    f = 0.0
                else:
                    h, w = pa.shape
                    _, _, f = boundary_f(pa, pb, max_dist=0.0075 * math.hypot(h, w))
                self._num[n] += float(f)
                self._den[n] += 1

    def compute(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for t in self.tasks:
            if t.name not in PARITY_KEYS:
                continue
            key = PARITY_KEYS[t.name][0]
            n = t.name
            if self._den[n] > 0:
                out[n] = {key: self._num[n] / self._den[n]}
            elif n == "depth" and self._abs_n[n] > 0:
                out[n] = {key: self._abs[n] / self._abs_n[n], "note": "reference depth <= 0 everywhere; mean |a-b|"}
            else:
                out[n] = {key: float("nan")}
        return out


def parity_reasons(
    parity: Mapping[str, Mapping[str, float]], thresholds: ParityThresholds, precision: str
) -> list[str]:
    """One sentence per parity figure that misses its threshold (NaN always misses)."""
    reasons = []
    for task, figs in parity.items():
        key, field, higher = PARITY_KEYS[task]
        value = figs.get(key, float("nan"))
        limit = float(getattr(thresholds, field))
        ok = (value >= limit) if higher else (value <= limit)
        if not ok or not math.isfinite(value):
            op = ">=" if higher else "<="
            reasons.append(f"{task} {key} {value:.4g} misses the {precision} threshold {field} {op} {limit:g}")
    return reasons


def _pad_to(x: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    if size is None:
        return x
    h, w = x.shape[-2:]
    th, tw = size
    if (h, w) == (th, tw):
        return x
    if h > th or w > tw:
        raise ConfigError(
            f"validation image {h}x{w} is larger than the artifact's fixed input {th}x{tw}; "
            "export at the validation size (or larger)"
        )
    return np.pad(x, ((0, 0), (0, 0), (0, th - h), (0, tw - w)))


def _tile(x: np.ndarray, fixed_batch: int | None) -> np.ndarray:
    # An artifact exported with a fixed batch > 1 only accepts that batch.
    return np.repeat(x, fixed_batch, axis=0) if fixed_batch and fixed_batch > 1 else x


def _run_batch1(runtime: Any, x: np.ndarray, fixed_batch: int | None) -> dict[str, np.ndarray]:
    """Outputs of one image, even through an artifact with a fixed batch > 1."""
    out = runtime.run(_tile(x, fixed_batch))
    return {k: v[:1] for k, v in out.items()} if fixed_batch and fixed_batch > 1 else out


def _batch_labels(sample: Mapping[str, Any], tasks: Sequence[Task]) -> dict[str, torch.Tensor]:
    # Dataset items are unbatched; labels gain the batch axis the meters expect.
    return {t.name: torch.as_tensor(sample[t.name]).unsqueeze(0) for t in tasks if t.name in sample}


def _scalar_delta(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for task, ma in a.items():
        mb = b.get(task, {})
        d = {}
        for k, v in ma.items():
            if isinstance(v, (int, float)) and isinstance(mb.get(k), (int, float)):
                d[k] = float(v) - float(mb[k])
        out[task] = d
    return out


def _jsonable(obj: Any) -> Any:
    """Plain JSON values: numpy scalars become Python numbers, NaN/inf become None."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    return obj


def validate_runtime(
    runtime: Any,
    reference: Any,
    dataset: Sequence[Mapping[str, Any]],
    tasks: Sequence[Task],
    *,
    cfg: ValidateConfig,
    precision: str = "fp32",
    metric_options: Mapping[str, Mapping[str, Any]] | None = None,
    target: str | None = None,
    macs: int | None = None,
    measure_memory: bool = True,
) -> dict[str, Any]:
    """Accuracy, parity and latency of ``runtime`` against its PyTorch ``reference``.

    Args:
        runtime: object with ``.run(images float32 (B,3,H,W)) -> {task: raw}``
            (e.g. :class:`~edgemt.targets.runtime.OnnxRuntimeModel`); its
            optional ``input_size``, ``threads``, ``path``, ``target`` and
            ``peak_memory(shape)`` are used when present.
        reference: the PyTorch model (``nn.Module``) or a
            :class:`~edgemt.targets.runtime.TorchModel`.
        dataset: indexable; items ``{"image": (3,H,W), "id": str, task: label}``.
        tasks: tasks to evaluate (a subset of the runtime's).
        cfg: ``threads`` (reported), ``warmup``/``runs`` (latency),
            ``max_images`` (> 0 limits the images), ``parity`` thresholds.
        precision: key of ``cfg.parity`` (``fp32``, ``fp16``, ``int8`` ...).
        metric_options: per-task options for the metric meters.
        target: label in the result; defaults to ``runtime.target``.
        macs: multiply-accumulates per image, if the caller counted them.
        measure_memory: probe the runtime's own peak memory when it offers one.

    Returns:
        A JSON-serialisable dict: ``target, precision, status, reasons,
        metrics, metrics_pytorch, delta, delta_m, parity, latency, threads,
        size_bytes, size_mb, macs, peak_rss_mb, memory, n_images, input_size,
        wall_s``. NaN figures appear as ``null``.

    Raises:
        ConfigError: no thresholds for ``precision``, an empty dataset, or
            images larger than the runtime's fixed input.
    """
    from edgemt.metrics import MultiTaskEvaluator, delta_m

    t_start = time.perf_counter()
    tasks = list(tasks)
    if precision not in cfg.parity:
        raise ConfigError(
            f"validate.parity has no thresholds for precision {precision!r}; defined: {sorted(cfg.parity)}"
        )
    thresholds = cfg.parity[precision]
    ref = as_runtime(reference)
    n_total = len(dataset)
    n = min(n_total, cfg.max_images) if cfg.max_images > 0 else n_total
    if n == 0:
        raise ConfigError("the validation split is empty")
    fixed = getattr(runtime, "input_size", None)
    fixed_batch = getattr(runtime, "fixed_batch", None)

    ev_rt = MultiTaskEvaluator(tasks, dict(metric_options) if metric_options else None)
    ev_pt = MultiTaskEvaluator(tasks, dict(metric_options) if metric_options else None)
    parity = ParityMeter(tasks)
    first_input: np.ndarray | None = None
    for i in range(n):
        sample = dataset[i]
        image = np.asarray(torch.as_tensor(sample["image"]).float().numpy())[None]
        h, w = image.shape[-2:]
        x = _pad_to(image, fixed)
        if first_input is None:
            first_input = x
        raw_rt = _run_batch1(runtime, x, fixed_batch)
        raw_pt = ref.run(x)
        graph_size = {tuple(v.shape[-2:]) for v in raw_rt.values()}
        # A graph that ends at the heads' stride (deploy.output_stride): the host upsamples, as the model would.
        raw_rt = outputs_at_input_size(raw_rt, x.shape[-2:])
        raw_pt = outputs_at_input_size(raw_pt, x.shape[-2:])
        labels = _batch_labels(sample, tasks)
        act_rt, act_pt = {}, {}
        for t in tasks:
            # Same activation function for both: numpy raw -> torch -> activate.
            a = activate(t, torch.from_numpy(np.ascontiguousarray(raw_rt[t.name][..., :h, :w])).float())
            b = activate(t, torch.from_numpy(np.ascontiguousarray(raw_pt[t.name][..., :h, :w])).float())
            act_rt[t.name], act_pt[t.name] = a, b
            parity.update(t, a, b)
        ev_rt.update(act_rt, labels)
        ev_pt.update(act_pt, labels)

    metrics_rt = ev_rt.compute()
    metrics_pt = ev_pt.compute()
    par = parity.compute()
    reasons = parity_reasons(par, thresholds, precision)
    reasons += [f"{t} outputs contain NaN or inf" for t in sorted(parity.nonfinite)]
    try:
        dm = float(delta_m(metrics_rt, metrics_pt, tasks))
    except Exception:  # a metric missing or NaN on tiny splits; Delta_m is informative only
        dm = float("nan")

    assert first_input is not None
    lat_input = _tile(first_input, fixed_batch)
    latency = measure_latency(lambda: runtime.run(lat_input), warmup=cfg.warmup, runs=cfg.runs)
    threads = getattr(runtime, "threads", None)
    latency["threads"] = threads if threads is not None else cfg.threads
    if graph_size != {tuple(first_input.shape[-2:])}:
        # Outputs end at a coarser stride; the latency above is the graph's. The host's upsampling
        # (torch, one thread) is timed apart: an app may do it on a GPU, or only where it needs it.
        raw = _run_batch1(runtime, first_input, fixed_batch)
        with _torch_threads(1):
            up = measure_latency(
                lambda: outputs_at_input_size(raw, first_input.shape[-2:]), warmup=2, runs=max(3, cfg.runs // 3)
            )
        latency["output_size"] = [list(s) for s in sorted(graph_size)]
        latency["host_upsample_ms"] = up["median_ms"]
    latency["batch"] = int(lat_input.shape[0])
    latency["input_size"] = list(first_input.shape[-2:])

    path = getattr(runtime, "path", None)
    size_bytes = getattr(runtime, "size_bytes", None)
    if size_bytes is None and path is not None and hasattr(path, "stat"):
        size_bytes = int(path.stat().st_size)
    memory: dict[str, Any] = {"process_peak_rss_mb": peak_rss_mb(), "note": "whole validation process"}
    if measure_memory and callable(getattr(runtime, "peak_memory", None)):
        memory.update(runtime.peak_memory(list(lat_input.shape)))
    peak = memory.get("peak_rss_mb", memory["process_peak_rss_mb"])

    result = {
        "target": target or getattr(runtime, "target", type(runtime).__name__),
        "precision": precision,
        "status": "passed" if not reasons else "failed_validation",
        "reasons": reasons,
        "metrics": metrics_rt,
        "metrics_pytorch": metrics_pt,
        "delta": _scalar_delta(metrics_rt, metrics_pt),
        "delta_m": dm,
        "parity": par,
        "thresholds": {PARITY_KEYS[t][1]: getattr(thresholds, PARITY_KEYS[t][1]) for t in par},
        "latency": latency,
        "threads": latency["threads"],
        "size_bytes": size_bytes,
        "size_mb": round(size_bytes / 2**20, 3) if size_bytes is not None else None,
        "macs": int(macs) if macs is not None else None,
        "peak_rss_mb": peak,
        "memory": memory,
        "n_images": n,
        "input_size": list(first_input.shape[-2:]),
        "wall_s": round(time.perf_counter() - t_start, 3),
    }
    return _jsonable(result)
