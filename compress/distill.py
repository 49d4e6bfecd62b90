"""Teacher-to-student distillation: per-task output terms, feature imitation and ground truth.

Per task (outputs of the teacher resized to the student's output size,
averaged over the pixels where the task's ground truth is valid, i.e. under
the ignore mask and off the padded border):

* ``semseg`` / ``human_parts``: pixel-wise KL(teacher || student) of the
  softmaxes at temperature T, times T^2 (Hinton et al.);
* ``depth``: L1 to the teacher's depth;
* ``normals``: L1 between the unit normals of both;
* ``edge``: BCE of the student's logits against the teacher's probabilities,
  each pixel weighted like the ground-truth loss (``pos_weight`` for the
  teacher's positive mass), so the term has the ground truth's scale;
* ``saliency``: BCE between the two foreground probabilities (two-class
  softmaxes: the soft cross-entropy).

Each term is multiplied by the task's loss weight (the recipe's, as for the
ground truth) and by ``distill.weights[task]`` (default 1).

Feature imitation reads the input of every task head (the decoder feature
each model predicts from) of both models: a 1x1 adapter maps the student's
channels to the teacher's, the teacher's map is resized to the student's
grid, and the loss is the MSE or, with ``feature_loss: cwd``, channel-wise
distillation (Shu et al., ICCV 2021: per channel, KL of the spatial softmaxes
at temperature tau, times tau^2).

The teacher runs in eval mode under ``torch.no_grad``; only the student and
the adapters train.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgemt.config import DistillConfig
from edgemt.errors import ConfigError
from edgemt.tasks import IGNORE_INDEX, Task, task_loss

__all__ = [
    "check_compatible",
    "valid_mask",
    "resize_to",
    "kd_semseg",
    "kd_l1",
    "kd_normals",
    "kd_bce",
    "kd_saliency",
    "cwd_loss",
    "task_kd",
    "HeadInputs",
    "Distiller",
    "distillation_loss",
]


def check_compatible(teacher: nn.Module, student_tasks: Sequence[Task], teacher_dir: Any = "teacher") -> None:
    """A clear error when the teacher cannot teach these tasks (other tasks, other class counts)."""
    t_tasks = {t.name: t for t in getattr(teacher, "tasks", [])}
    missing = [t.name for t in student_tasks if t.name not in t_tasks]
    if missing:
        raise ConfigError(
            f"{teacher_dir}: the teacher predicts {sorted(t_tasks)}; it cannot teach the student's task(s) {missing}"
        )
    for t in student_tasks:
        if t_tasks[t.name].channels != t.channels:
            raise ConfigError(
                f"{teacher_dir}: the teacher's {t.name!r} has {t_tasks[t.name].channels} channels "
                f"(classes), the student's {t.channels}; distill from a teacher trained on the same dataset"
            )


def valid_mask(task: Task, label: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` bool: pixels where ``label`` is usable for ``task``."""
    if task.label_kind == "class":
        return (label != IGNORE_INDEX).unsqueeze(1)
    if task.name == "depth":
        return label > 0
    if task.name == "normals":
        return (label != 0).any(dim=1, keepdim=True)
    return label != IGNORE_INDEX


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _masked_mean(per_pixel: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``(B, 1, H, W)`` values over ``mask`` (all pixels when None); 0 with the graph when empty."""
    if mask is None:
        return per_pixel.mean()
    m = mask.to(per_pixel.dtype)
    n = m.sum()
    return (per_pixel * m).sum() / n.clamp_min(1.0)


def kd_semseg(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, T: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)) per pixel, averaged over ``mask``."""
    teacher = resize_to(teacher, student.shape[-2:])
    log_s = F.log_softmax(student.float() / T, dim=1)
    log_t = F.log_softmax(teacher.float() / T, dim=1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=1, keepdim=True)
    return _masked_mean(kl, mask) * T * T


def kd_l1(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean |student - teacher| over channels and ``mask``."""
    teacher = resize_to(teacher, student.shape[-2:])
    return _masked_mean((student.float() - teacher.float()).abs().mean(dim=1, keepdim=True), mask)


def kd_normals(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """L1 between the unit vectors of both predictions."""
    teacher = F.normalize(resize_to(teacher, student.shape[-2:]).float(), dim=1)
    return kd_l1(F.normalize(student.float(), dim=1), teacher, mask)


def kd_bce(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, pos_weight: float | None = None
) -> torch.Tensor:
    """BCE of the student's logits against the teacher's probabilities.

    With ``pos_weight`` each pixel is weighted ``p * pos_weight + (1 - p) * (1 - pos_weight)``
    (``p`` the teacher's probability), the soft version of the balanced ground-truth BCE.
    """
    p = torch.sigmoid(resize_to(teacher, student.shape[-2:]).float())
    weight = None if pos_weight is None else p * pos_weight + (1 - p) * (1 - pos_weight)
    bce = F.binary_cross_entropy_with_logits(student.float(), p, weight=weight, reduction="none")
    return _masked_mean(bce.mean(dim=1, keepdim=True), mask)


def kd_saliency(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """BCE between the foreground probabilities of two-class softmaxes (= soft cross-entropy)."""
    p_t = F.softmax(resize_to(teacher, student.shape[-2:]).float(), dim=1)
    ce = -(p_t * F.log_softmax(student.float(), dim=1)).sum(dim=1, keepdim=True)
    return _masked_mean(ce, mask)


def task_kd(
    task: Task, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, T: float
) -> torch.Tensor:
    """The output distillation term of ``task``."""
    if task.name == "saliency":
        return kd_saliency(student, teacher, mask)
    if task.activation == "softmax":
        return kd_semseg(student, teacher, mask, T)
    if task.name == "normals":
        return kd_normals(student, teacher, mask)
    if task.activation == "sigmoid":
        return kd_bce(student, teacher, mask, task.pos_weight)
    if task.activation == "relu":
        return kd_l1(student, resize_to(teacher, student.shape[-2:]).clamp_min(0.0), mask)
    return kd_l1(student, teacher, mask)


def cwd_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float = 4.0) -> torch.Tensor:
    """Channel-wise distillation: per channel, tau^2 * KL over the spatial softmax at temperature tau."""
    b, c = student.shape[:2]
    s = student.float().reshape(b * c, -1) / tau
    t = teacher.float().reshape(b * c, -1) / tau
    log_t = F.log_softmax(t, dim=1)
    kl = (log_t.exp() * (log_t - F.log_softmax(s, dim=1))).sum(dim=1)
    return kl.mean() * tau * tau


class HeadInputs:
    """Records the input of every task head (``model.heads[task]``) on each forward."""

    def __init__(self, model: nn.Module, tasks: Sequence[str], what: str) -> None:
        heads = getattr(model, "heads", None)
        if not isinstance(heads, nn.ModuleDict) or any(t not in heads for t in tasks):
            raise ConfigError(
                f"{what} ({type(model).__name__}) has no per-task heads to read decoder features from; "
                "set distill.feature_weight: 0"
            )
        self.features: dict[str, torch.Tensor] = {}
        self._hooks = [heads[t].register_forward_pre_hook(self._hook(t)) for t in tasks]
        self.channels = {t: _in_channels(heads[t]) for t in tasks}

    def _hook(self, task: str):
        def hook(mod, args):
            self.features[task] = args[0]

        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def _in_channels(module: nn.Module) -> int:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise ConfigError(f"cannot find the input width of head {type(module).__name__}")


class Distiller(nn.Module):
    """The module the trainer optimises: the student plus the feature adapters.

    ``forward`` returns the student's outputs (so evaluation sees the student);
    the teacher is held outside the module tree (no parameters, not saved).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: DistillConfig) -> None:
        super().__init__()
        self.student = student
        object.__setattr__(self, "teacher", teacher.eval())  # not a submodule: not trained, not checkpointed
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.cfg = cfg
        self.task_names = list(student.task_names)
        self.adapters = nn.ModuleDict()
        self._s_feats = self._t_feats = None
        if cfg.feature_weight > 0:
            self._s_feats = HeadInputs(student, self.task_names, "the student")
            self._t_feats = HeadInputs(teacher, self.task_names, "the teacher")
            for t in self.task_names:
                self.adapters[t] = nn.Conv2d(self._s_feats.channels[t], self._t_feats.channels[t], 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.student(x)

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.teacher.eval()  # always
        return self

    @torch.no_grad()
    def teacher_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        dev = next(self.teacher.parameters()).device
        if dev != x.device:
            self.teacher.to(x.device)
        return self.teacher(x)

    def feature_loss(self) -> torch.Tensor:
        total = 0.0
        for t in self.task_names:
            s = self.adapters[t](self._s_feats.features[t].float())
            te = resize_to(self._t_feats.features[t].float(), s.shape[-2:])
            total = total + (cwd_loss(s, te, self.cfg.cwd_tau) if self.cfg.feature_loss == "cwd" else F.mse_loss(s, te))
        return total / len(self.task_names)


def distillation_loss(
    tasks: Sequence[Task], cfg: DistillConfig, loss_weights: Mapping[str, float], edge_pos_weight: float | None = None
):
    """The trainer's loss function for a :class:`Distiller`: GT + output KD + feature terms.

    ``(out, batch, model) -> (total, parts)``; the teacher runs on ``batch["image"]``.
    """
    if edge_pos_weight is not None:
        tasks = [dataclasses.replace(t, pos_weight=edge_pos_weight) if t.name == "edge" else t for t in tasks]
    w = {t.name: float(loss_weights.get(t.name, t.loss_weight)) for t in tasks}
    unknown = sorted(set(cfg.weights) - set(w))
    if unknown:
        raise ConfigError(f"distill.weights: unknown task(s) {unknown}; the student's tasks are {sorted(w)}")

    def loss_fn(out: dict[str, torch.Tensor], batch: dict[str, Any], model: nn.Module):
        distiller = model
        if not isinstance(distiller, Distiller):
            raise TypeError("distillation_loss needs the Distiller module")
        t_out = distiller.teacher_outputs(batch["image"])
        parts: dict[str, torch.Tensor] = {}
        total = out[tasks[0].name].new_zeros(())
        for t in tasks:
            label = batch[t.name]
            kd = task_kd(t, out[t.name], t_out[t.name], valid_mask(t, label), cfg.temperature)
            parts[f"kd/{t.name}"] = kd
            total = total + w[t.name] * cfg.weights.get(t.name, 1.0) * kd
            if cfg.gt_weight > 0:
                gt = task_loss(t, out[t.name], label)
                parts[t.name] = gt
                total = total + cfg.gt_weight * w[t.name] * gt
        if cfg.feature_weight > 0:
            parts["feature"] = distiller.feature_loss()
            total = total + cfg.feature_weight * parts["feature"]
        for n, v in distiller.student.extra_losses().items():
            parts[n] = v
            total = total + v
        return total, {n: float(v.detach()) for n, v in parts.items()}

    return loss_fn
