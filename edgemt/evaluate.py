"""Evaluate a PyTorch multi-task model on a split with the task metrics."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from edgemt.tasks import Task, activate

__all__ = ["pad_collate", "evaluate", "predict_batches"]


def pad_collate(tasks: Sequence[Task]) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """Collate samples of different sizes by padding bottom/right with each task's ignore value."""
    fill = {t.name: t.ignore_value for t in tasks}

    def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
        h = max(s["image"].shape[-2] for s in samples)
        w = max(s["image"].shape[-1] for s in samples)
        out: dict[str, Any] = {"id": [s.get("id", "") for s in samples]}
        for key in samples[0]:
            if key == "id":
                continue
            vals = []
            for s in samples:
                v = s[key]
                ph, pw = h - v.shape[-2], w - v.shape[-1]
                if ph or pw:
                    v = F.pad(v, (0, pw, 0, ph), value=float(fill.get(key, 0.0)))
                vals.append(v)
            out[key] = torch.stack(vals)
        return out

    return collate


@torch.no_grad()
def predict_batches(
    model: torch.nn.Module,
    dataset: Dataset,
    tasks: Sequence[Task],
    *,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    max_images: int = 0,
    progress: bool = False,
    desc: str = "eval",
):
    """Yield ``(batch, activated predictions)`` over the dataset in eval mode."""
    if max_images and max_images < len(dataset):
        dataset = Subset(dataset, range(max_images))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=pad_collate(tasks))
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            raw = model(batch["image"].to(device))
            preds = {t.name: activate(t, raw[t.name].float()).cpu() for t in tasks}
            yield batch, preds
    finally:
        model.train(was_training)


def evaluate(
    model: torch.nn.Module,
    dataset: Dataset,
    tasks: Sequence[Task],
    *,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    metric_options: Mapping[str, dict] | None = None,
    max_images: int = 0,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Task metrics of ``model`` on ``dataset`` (pooled over the whole split)."""
    from edgemt.metrics import MultiTaskEvaluator

    ev = MultiTaskEvaluator(list(tasks), dict(metric_options or {}))
    for batch, preds in predict_batches(
        model, dataset, tasks, batch_size=batch_size, device=device, max_images=max_images, progress=progress
    ):
        ev.update(preds, {t.name: batch[t.name] for t in tasks})
    return ev.compute()


def metric_options(recipe) -> dict[str, dict[str, Any]]:
    """Per-task metric options of the recipe's dataset (the boundary radius differs)."""
    opts: dict[str, dict[str, Any]] = {}
    if "edge" in recipe.data.tasks:
        opts["edge"] = {"max_dist_ratio": 0.0075 if recipe.data.dataset == "pascal" else 0.011}
    return opts
