"""The task registry: one entry per dense prediction task.

Everything else (heads, losses, metrics, reports, exporters' output names)
reads a task's properties from here, so adding a task is one entry.

Conventions for the tensors a task sees:

* model output (``raw``): ``(B, channels, H, W)`` before the output activation.
  Exported graphs emit ``raw``; the activation is applied outside the graph
  (it holds the L2 normalisation of normals, which must stay out of int8).
* labels, as the datasets return them:
  - ``semseg``/``human_parts``: ``(B, H, W)`` int64 class ids, 255 = ignore;
  - ``saliency``: ``(B, H, W)`` int64 in {0, 1}, 255 = ignore;
  - ``depth``: ``(B, 1, H, W)`` float metres, 0 = invalid;
  - ``normals``: ``(B, 3, H, W)`` float unit vectors, all-zero = invalid;
  - ``edge``: ``(B, 1, H, W)`` float in {0, 1}, 255 = ignore (padding).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from edgemt.errors import ConfigError

__all__ = [
    "IGNORE_INDEX",
    "Task",
    "TASKS",
    "get_task",
    "resolve_tasks",
    "task_loss",
    "activate",
]

IGNORE_INDEX = 255


@dataclasses.dataclass(frozen=True)
class Task:
    """One dense prediction task.

    Attributes:
        name: registry key and output name in exported graphs.
        channels: output channels of the head (class count for label tasks).
        activation: ``softmax`` | ``identity`` | ``relu`` | ``l2norm`` | ``sigmoid``.
        loss: ``ce`` | ``balanced_ce`` | ``l1_depth`` | ``l1_normals`` | ``balanced_bce``.
        loss_weight: default weight in the multi-task sum (NYUD-v2 MLoRE recipe).
        metric: primary metric key reported by :mod:`edgemt.metrics`.
        higher_is_better: direction of ``metric`` (used by Delta_m).
        ignore_value: label value that is ignored.
        pos_weight: positive-class weight of the balanced BCE (edges).
    """

    name: str
    channels: int
    activation: str
    loss: str
    loss_weight: float
    metric: str
    higher_is_better: bool
    ignore_value: float = IGNORE_INDEX
    pos_weight: float = 0.95
    label_kind: str = "class"  # "class" (int map) | "dense" (float channels)

    def with_channels(self, channels: int) -> Task:
        return dataclasses.replace(self, channels=int(channels))


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("semseg", 40, "softmax", "ce", 1.0, "miou", True),
        Task("depth", 1, "relu", "l1_depth", 1.0, "rmse", False, 0.0, label_kind="dense"),
        Task("normals", 3, "l2norm", "l1_normals", 10.0, "mean_err", False, 0.0, label_kind="dense"),
        Task("edge", 1, "sigmoid", "balanced_bce", 50.0, "odsf", True, label_kind="dense"),
        Task("saliency", 2, "softmax", "balanced_ce", 5.0, "maxf", True),
        Task("human_parts", 7, "softmax", "ce", 2.0, "miou", True),
    )
}

# Tasks whose channel count is a property of the dataset (its class list).
CLASS_TASKS = ("semseg", "human_parts")


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; expected one of {sorted(TASKS)}") from None


def resolve_tasks(names: Iterable[str], num_classes: Mapping[str, int] | None = None) -> list[Task]:
    """Registry entries for ``names``, with class counts taken from the dataset.

    Raises:
        ConfigError: an unknown task name, a duplicate, or an empty list.
    """
    names = list(names)
    if not names:
        raise ConfigError(f"the task list is empty; expected at least one of {sorted(TASKS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"duplicate task in {names}")
    out = []
    for n in names:
        t = get_task(n)
        if num_classes and n in num_classes:
            t = t.with_channels(num_classes[n])
        out.append(t)
    return out


# --------------------------------------------------------------------------- losses


def _ce(raw: torch.Tensor, label: torch.Tensor, task: Task) -> torch.Tensor:
    if not (label != IGNORE_INDEX).any():
        return raw.sum() * 0.0  # keeps the graph; an all-ignore batch contributes nothing
    return F.cross_entropy(raw.float(), label, ignore_index=IGNORE_INDEX)


def _balanced_ce(raw: torch.Tensor, label: torch.Tensor, task: Task) -> torch.Tensor:
    """Two-class CE where each class is weighted by the other's pixel share."""
    valid = label != IGNORE_INDEX
    if not valid.any():
        return raw.sum() * 0.0
    pos = (label == 1) & valid
    w_pos = 1.0 - pos.sum().float() / valid.sum().float()  # the rarer the positives, the heavier
    weight = torch.stack([1.0 - w_pos, w_pos]).clamp_min(1e-3).float()  # index = class id
    return F.cross_entropy(raw.float(), label, weight=weight, ignore_index=IGNORE_INDEX)


def _l1_depth(raw: torch.Tensor, label: torch.Tensor, task: Task) -> torch.Tensor:
    valid = label > 0
    if not valid.any():
        return raw.sum() * 0.0
    return (raw.float() - label).abs()[valid].mean()


def _l1_normals(raw: torch.Tensor, label: torch.Tensor, task: Task) -> torch.Tensor:
    valid = (label != 0).any(dim=1, keepdim=True).expand_as(label)
    if not valid.any():
        return raw.sum() * 0.0
    pred = F.normalize(raw.float(), dim=1)
    return (pred - label).abs()[valid].mean()


def _balanced_bce(raw: torch.Tensor, label: torch.Tensor, task: Task) -> torch.Tensor:
    """BCE with positives weighted by ``pos_weight`` and negatives by ``1 - pos_weight``.

    Boundaries are ~5% of pixels; the papers' edge loss weights them 0.95.
    """
    valid = label != IGNORE_INDEX
    if not valid.any():
        return raw.sum() * 0.0
    w = torch.where(label > 0.5, task.pos_weight, 1.0 - task.pos_weight)
    target = torch.where(valid, label, torch.zeros_like(label))
    loss = F.binary_cross_entropy_with_logits(raw.float(), target, weight=w, reduction="none")
    return loss[valid].sum() / valid.sum()


_LOSSES = {
    "ce": _ce,
    "balanced_ce": _balanced_ce,
    "l1_depth": _l1_depth,
    "l1_normals": _l1_normals,
    "balanced_bce": _balanced_bce,
}


def task_loss(task: Task, raw: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The task's training loss of raw outputs against labels at the same size."""
    if raw.shape[-2:] != label.shape[-2:]:
        raw = F.interpolate(raw, size=label.shape[-2:], mode="bilinear", align_corners=False)
    return _LOSSES[task.loss](raw, label, task)


# --------------------------------------------------------------------------- activations


def activate(task: Task, raw: torch.Tensor) -> torch.Tensor:
    """Apply the task's output activation to raw outputs (torch)."""
    a = task.activation
    if a == "softmax":
        return raw.softmax(dim=1)
    if a == "sigmoid":
        return raw.sigmoid()
    if a == "relu":
        return raw.clamp_min(0.0)
    if a == "l2norm":
        return F.normalize(raw, dim=1)
    return raw


def task_names(tasks: Sequence[Task]) -> list[str]:
    return [t.name for t in tasks]
