"""Multi-task evaluation: one meter per task, and the Delta_m summary.

``Delta_m`` (Maninis et al. / Vandenhende et al.) is the mean over tasks of the
relative change of each task's primary metric against a reference model,
signed so that positive is better:
``Delta_m = 100 / T * sum_t (-1)^{l_t} (M_t - R_t) / R_t`` with ``l_t = 1`` when
lower is better. The primary metric and direction come from the task registry
(:attr:`Task.metric`, :attr:`Task.higher_is_better`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from edgemt.errors import ConfigError
from edgemt.metrics.boundary import BoundaryMeter
from edgemt.metrics.depth import DepthMeter
from edgemt.metrics.normals import NormalsMeter
from edgemt.metrics.saliency import SaliencyMeter
from edgemt.metrics.segmentation import SegmentationMeter
from edgemt.tasks import Task, get_task

__all__ = ["make_meter", "MultiTaskEvaluator", "delta_m"]

Meter = SegmentationMeter | DepthMeter | NormalsMeter | SaliencyMeter | BoundaryMeter


def make_meter(task: Task, **options: Any) -> Meter:
    """The meter for ``task`` (by name); ``options`` go to its constructor."""
    name = task.name
    try:
        if name in ("semseg", "human_parts"):
            options.setdefault("ignore_index", int(task.ignore_value))
            return SegmentationMeter(num_classes=task.channels, **options)
        if name == "depth":
            return DepthMeter(**options)
        if name == "normals":
            return NormalsMeter(**options)
        if name == "saliency":
            return SaliencyMeter(**options)
        if name == "edge":
            return BoundaryMeter(**options)
    except TypeError as e:  # unknown option name
        raise ConfigError(f"metrics options for task {name!r}: {e}") from None
    raise ConfigError(f"no metric is defined for task {name!r}")


class MultiTaskEvaluator:
    """Accumulates every task's meter over a split.

    Args:
        tasks: registry entries (class counts already resolved).
        options: per task name, keyword options for that task's meter.
    """

    def __init__(self, tasks: Sequence[Task], options: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        options = dict(options or {})
        names = [t.name for t in tasks]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ConfigError(f"metrics options given for tasks {unknown} that are not evaluated ({names})")
        self.tasks = list(tasks)
        self.meters: dict[str, Meter] = {t.name: make_meter(t, **dict(options.get(t.name, {}))) for t in self.tasks}

    def update(self, preds: Mapping[str, Any], labels: Mapping[str, Any]) -> None:
        """Add one batch: activated predictions and labels keyed by task name."""
        for name, meter in self.meters.items():
            if name not in preds or name not in labels:
                side = "preds" if name not in preds else "labels"
                raise ValueError(
                    f"task {name!r} is missing from {side} (keys: {sorted(preds if side == 'preds' else labels)})"
                )
            meter.update(preds[name], labels[name])

    def compute(self) -> dict[str, dict[str, Any]]:
        return {name: meter.compute() for name, meter in self.meters.items()}

    def reset(self) -> None:
        for meter in self.meters.values():
            meter.reset()


def delta_m(
    results: Mapping[str, Mapping[str, float]],
    reference: Mapping[str, Mapping[str, float]],
    tasks: Sequence[Task | str],
) -> float:
    """Mean signed relative change (percent) of each task's primary metric vs ``reference``.

    Raises:
        ConfigError: a task (or its primary metric) is missing on either side,
            or the reference value is 0.
    """
    if not tasks:
        raise ConfigError("delta_m: the task list is empty")
    total = 0.0
    for t in tasks:
        task = get_task(t) if isinstance(t, str) else t
        vals = []
        for side, res in (("results", results), ("reference", reference)):
            if task.name not in res:
                raise ConfigError(f"delta_m: task {task.name!r} is missing from {side} (has {sorted(res)})")
            if task.metric not in res[task.name]:
                raise ConfigError(
                    f"delta_m: {side}[{task.name!r}] has no {task.metric!r} (has {sorted(res[task.name])})"
                )
            vals.append(float(res[task.name][task.metric]))
        m, r = vals
        if r == 0:
            raise ConfigError(f"delta_m: reference {task.name}.{task.metric} is 0; the relative change is undefined")
        sign = 1.0 if task.higher_is_better else -1.0
        total += sign * (m - r) / r
    return 100.0 * total / len(tasks)
