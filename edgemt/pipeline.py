"""Stages, plugins and the make-like pipeline runner.

A stage reads its parent's artifact directory and writes its own under
``runs/<name>/<stage>/`` with a ``manifest.json`` written last. A stage is
skipped when its manifest's ``inputs_hash`` equals the hash of what it would
run on now (its recipe sections plus its parent's manifest), so an interrupted
pipeline resumes where it stopped, and a changed recipe reruns what it touches.

The core never imports ``edgemt.train``/``edgemt.targets``/``edgemt.compress``:
they register their stages and CLI verbs through the ``edgemt.plugins`` entry
point group (see pyproject.toml).
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from edgemt.config import Recipe, to_dict
from edgemt.errors import ConfigError, UserError
from edgemt.io import config_hash, file_hash, read_manifest, write_manifest

__all__ = ["Stage", "Command", "Registry", "StageContext", "registry", "run_pipeline", "run_stage", "lazy_run"]


@dataclass
class StageContext:
    """What a stage's ``run`` gets: the recipe, its directory and its parent's."""

    recipe: Recipe
    name: str
    stage_dir: Path
    parent_dir: Path | None
    progress: bool = True

    @property
    def run_dir(self) -> Path:
        return self.recipe.run_dir

    def stage_path(self, name: str) -> Path:
        return self.run_dir / name


@dataclass
class Stage:
    """A pipeline stage.

    Attributes:
        run: does the work in ``ctx.stage_dir``; returns the manifest's extra
            fields (``metrics`` and anything else worth recording).
        sections: recipe sections whose values decide whether to rerun.
        produces_model: the stage writes ``arch.json`` + ``weights.safetensors``.
        needs_model: the stage's parent is the nearest earlier model stage;
            otherwise its parent is simply the previous stage.
        dir_name: where it writes (default: the stage name).
        check: validates the recipe for this stage before any stage of the
            pipeline runs (e.g. unknown target names), raising ConfigError.
    """

    name: str
    run: Callable[[StageContext], dict[str, Any]]
    help: str = ""
    sections: tuple[str, ...] = ()
    produces_model: bool = False
    needs_model: bool = False
    dir_name: str | None = None
    check: Callable[[Recipe], None] | None = None


def lazy_run(module: str, function: str) -> Callable[[StageContext], dict[str, Any]]:
    """A stage ``run`` that imports ``module`` only when the stage runs (plugins stay cheap to load)."""

    def run(ctx: StageContext) -> dict[str, Any]:
        import importlib

        return getattr(importlib.import_module(module), function)(ctx)

    return run


@dataclass
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


@dataclass
class Registry:
    stages: dict[str, Stage] = field(default_factory=dict)
    commands: dict[str, Command] = field(default_factory=dict)

    def add_stage(self, stage: Stage) -> None:
        self.stages[stage.name] = stage

    def add_command(self, command: Command) -> None:
        self.commands[command.name] = command


_REGISTRY: Registry | None = None


def registry() -> Registry:
    """The registry filled by the core and every installed plugin (loaded once)."""
    global _REGISTRY
    if _REGISTRY is None:
        reg = Registry()
        from edgemt import stages as core_stages

        core_stages.register(reg)
        for ep in entry_points(group="edgemt.plugins"):
            ep.load()(reg)
        _REGISTRY = reg
    return _REGISTRY


def _parent_of(recipe: Recipe, name: str, reg: Registry) -> str | None:
    order = recipe.pipeline
    idx = order.index(name)
    stage = reg.stages[name]
    for prev in reversed(order[:idx]):
        if not stage.needs_model or reg.stages[prev].produces_model:
            return prev
    return None


def _inputs_hash(recipe: Recipe, stage: Stage, parent_manifest: dict[str, Any] | None) -> str:
    cfg = to_dict(recipe)
    sections = {s: cfg.get(s) for s in stage.sections}
    parent = parent_manifest.get("outputs_hash") if parent_manifest else None
    return config_hash({"stage": stage.name, "sections": sections, "parent": parent})


def _outputs_hash(stage_dir: Path) -> str:
    files = sorted(
        p
        for p in stage_dir.rglob("*")
        if p.is_file() and p.name != "manifest.json" and "tb" not in p.parts and "checkpoints" not in p.parts
    )
    return config_hash({str(p.relative_to(stage_dir)): file_hash(p) for p in files})


def _failed_targets(manifest: dict[str, Any] | None) -> list[str]:
    """Targets a stage's manifest records as failed exports: the stage is not complete, so it reruns
    (the failure may have been an installable converter or a fixed bug) instead of counting as up to date."""
    targets = (manifest or {}).get("targets")
    if not isinstance(targets, dict):
        return []
    return [k for k, v in targets.items() if isinstance(v, dict) and v.get("status") == "export_failed"]


def _validate_order(recipe: Recipe, reg: Registry) -> None:
    for i, name in enumerate(recipe.pipeline):
        if name not in reg.stages:
            raise ConfigError(f"pipeline[{i}]: unknown stage {name!r}; available: {sorted(reg.stages)}")


def _save_recipe(recipe: Recipe) -> None:
    """Keep the resolved recipe in the run directory, so ``edgemt validate runs/demo`` works."""
    import yaml

    from edgemt.io import atomic_path

    with atomic_path(recipe.run_dir / "recipe.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))


def run_stage(recipe: Recipe, name: str, *, force: bool = False, progress: bool = True, echo=print) -> dict[str, Any]:
    """Run one stage of ``recipe`` (its parent must be complete); returns its manifest."""
    reg = registry()
    _validate_order(recipe, reg)
    if name not in recipe.pipeline:
        raise ConfigError(f"stage {name!r} is not in this recipe's pipeline {recipe.pipeline}")
    stage = reg.stages[name]
    parent = _parent_of(recipe, name, reg)
    parent_dir = recipe.run_dir / (reg.stages[parent].dir_name or parent) if parent else None
    parent_manifest = read_manifest(parent_dir) if parent_dir else None
    if parent_dir is not None and parent_manifest is None:
        raise UserError(
            f"stage {name!r} needs the output of stage {parent!r} in {parent_dir}, which is missing or "
            f"incomplete; run `edgemt pipeline {recipe.name}` or the {parent!r} stage first"
        )
    stage_dir = recipe.run_dir / (stage.dir_name or name)
    _save_recipe(recipe)
    want = _inputs_hash(recipe, stage, parent_manifest)
    have = read_manifest(stage_dir)
    failed = _failed_targets(have)
    if not force and have is not None and have.get("inputs_hash") == want and not failed:
        echo(f"[{name}] up to date ({stage_dir}), skipped")
        return have
    if failed and have is not None and have.get("inputs_hash") == want:
        echo(f"[{name}] {', '.join(failed)} failed to export last time; running the stage again")
    if have is not None:
        # Stale output: remove it so nothing of the old run leaks into the new one.
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    echo(f"[{name}] running -> {stage_dir}")
    t0 = time.perf_counter()
    extra = stage.run(StageContext(recipe, name, stage_dir, parent_dir, progress))
    manifest = {
        "stage": name,
        "recipe": recipe.name,
        "config": {s: to_dict(recipe).get(s) for s in stage.sections},
        "parent": {"stage": parent, "dir": str(parent_dir), "outputs_hash": parent_manifest.get("outputs_hash")}
        if parent_manifest
        else None,
        "inputs_hash": want,
        "outputs_hash": _outputs_hash(stage_dir),
        "wall_time_s": round(time.perf_counter() - t0, 3),
        **extra,
    }
    write_manifest(stage_dir, manifest)
    echo(f"[{name}] done in {manifest['wall_time_s']:.1f} s")
    return read_manifest(stage_dir) or manifest


def run_pipeline(
    recipe: Recipe, *, force: Sequence[str] = (), progress: bool = True, until: str | None = None, echo=print
) -> dict[str, dict[str, Any]]:
    """Run the recipe's stages in order, skipping up-to-date ones."""
    reg = registry()
    _validate_order(recipe, reg)
    for name in recipe.pipeline:  # fail on a bad recipe before hours of training, not after
        if reg.stages[name].check is not None:
            reg.stages[name].check(recipe)
    out = {}
    for name in recipe.pipeline:
        out[name] = run_stage(recipe, name, force=name in force or "all" in force, progress=progress, echo=echo)
        if name == until:
            break
    return out
