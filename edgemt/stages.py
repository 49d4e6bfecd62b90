"""The core's own pipeline stage: ``data`` (synthesize the default dataset if missing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgemt.config import Recipe
from edgemt.io import file_hash, read_json, write_json

__all__ = ["register", "ensure_dataset"]


def ensure_dataset(recipe: Recipe, progress: bool = True, echo=print) -> dict[str, Any]:
    """Make sure the recipe's dataset is on disk; synthesize it when it is the default.

    Returns a fingerprint (meta + split file hashes) so later stages rerun when the data change.
    """
    from edgemt.data import build_dataset

    cfg = recipe.data
    root = Path(cfg.root)
    if cfg.dataset == "synthetic":
        s = cfg.synth
        want = {"size": list(s.size), "seed": s.seed, "counts": {"train": s.train, "val": s.val}}
        meta_path = root / "meta.json"
        meta = read_json(meta_path) if meta_path.is_file() else None
        have = {k: meta.get(k) for k in want} if meta else None
        if have != want:
            from edgemt.data.synthetic import generate

            echo(f"[data] synthesizing {s.train}+{s.val} scenes at {s.size[0]}x{s.size[1]} into {root}")
            generate(root, s.train, s.val, size=tuple(s.size), seed=s.seed, overwrite=True, progress=progress)
    # Constructing both splits checks the layout and every file the tasks need.
    sizes = {split: len(build_dataset(cfg, split, train=False)) for split in ("train", "val")}
    fingerprint: dict[str, Any] = {"dataset": cfg.dataset, "root": str(root), "samples": sizes}
    for rel in (
        "meta.json",
        "gt_sets/train.txt",
        "gt_sets/val.txt",
        "ImageSets/Context/train.txt",
        "ImageSets/Context/val.txt",
    ):
        if (root / rel).is_file():
            fingerprint[rel] = file_hash(root / rel)
    return fingerprint


def _run_data(ctx) -> dict[str, Any]:
    fp = ensure_dataset(ctx.recipe, progress=ctx.progress)
    write_json(ctx.stage_dir / "dataset.json", fp)
    return {"dataset": fp}


def register(reg) -> None:
    from edgemt.pipeline import Stage

    reg.add_stage(Stage("data", _run_data, "synthesize or check the dataset", sections=("data",)))
