"""Pipeline stages and CLI verbs of the training package: ``teacher`` / ``edgemt train``."""

from __future__ import annotations

from typing import Any

from edgemt.data import build_dataset
from edgemt.io import write_json
from edgemt.models import create_model, save_model
from edgemt.models.profile import count_macs, count_params
from edgemt.pipeline import StageContext
from edgemt.tasks import resolve_tasks
from edgemt.train.trainer import Trainer, TrainResult

__all__ = ["train_model_stage", "save_trained"]


def train_model_stage(ctx: StageContext) -> dict[str, Any]:
    """Train the recipe's teacher model on its dataset; save it as arch.json + safetensors."""
    r = ctx.recipe
    train_set = build_dataset(r.data, "train", train=True, seed=r.train.seed)
    val_set = build_dataset(r.data, "val", train=False)
    tasks = resolve_tasks(r.data.tasks, train_set.num_classes)
    # Every registered model takes the training size; fixed-grid teachers (MLoRE's spatial router) need it.
    model = create_model(r.teacher.name, tasks=tasks, **{"img_size": tuple(r.data.crop), **r.teacher.kwargs})
    trainer = Trainer(
        model, tasks, train_set, ctx.stage_dir, r.train, val_set=val_set, progress=ctx.progress, workers=r.data.workers
    )
    result = trainer.fit(resume=True)
    if not trainer.dist.is_main:
        return {}
    return save_trained(ctx, model, r.teacher.name, result)


def save_trained(ctx: StageContext, model, name: str, result: TrainResult) -> dict[str, Any]:
    """Save a trained model stage (arch.json + safetensors + history) and return its manifest fields."""
    model.cpu().eval()
    save_model(ctx.stage_dir, model)
    write_json(ctx.stage_dir / "history.json", result.history)
    size = tuple(ctx.recipe.data.crop)
    return {
        "model": name,
        "params": count_params(model),
        "macs": count_macs(model, size),
        "macs_input": list(size),
        "steps": result.steps,
        "train_time_s": round(result.wall_s, 1),
        "stopped_early": result.stopped_early,
        "metrics": result.metrics,
    }
