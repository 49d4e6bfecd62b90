"""Does the synthetic task separate model sizes?

Trains a tiny and a larger baseline for the SAME wall-clock budget on the
synthetic scenes, then reports each model's task metrics and Delta_m relative
to the tiny one. The synthetic dataset is useful for ranking compression
methods only if the larger model scores clearly better.

    python benchmarks/model_sizes_separate.py --minutes 3
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import RESULTS, print_table, steps_for_budget, write_json

from edgemt.config import load_recipe
from edgemt.data import build_dataset
from edgemt.evaluate import pad_collate
from edgemt.metrics import delta_m
from edgemt.models import create_model
from edgemt.models.profile import count_macs, count_params
from edgemt.stages import ensure_dataset
from edgemt.tasks import resolve_tasks
from edgemt.train.trainer import Trainer, multitask_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["baseline-xs", "baseline-m"])
    ap.add_argument("--minutes", type=float, default=3.0, help="training budget per model")
    ap.add_argument("--data", default="data/synthetic", help="synthetic dataset root (made if missing)")
    ap.add_argument("--out", default=str(RESULTS / "model_sizes_separate.json"))
    ap.add_argument("--workdir", default="runs/bench-sizes")
    args = ap.parse_args()

    torch.set_num_threads(max(1, torch.get_num_threads()))
    recipe = load_recipe("demo", {"data.root": args.data})
    ensure_dataset(recipe, progress=True)
    train_set = build_dataset(recipe.data, "train", train=True)
    val_set = build_dataset(recipe.data, "val", train=False)
    tasks = resolve_tasks(recipe.data.tasks, train_set.num_classes)
    probe_batch = pad_collate(tasks)([train_set[i] for i in range(recipe.train.batch_size)])

    rows, results = [], {}
    for name in args.models:
        torch.manual_seed(0)
        model = create_model(name, tasks=tasks)
        steps = steps_for_budget(model, probe_batch, multitask_loss(tasks, {}), args.minutes * 60)
        cfg = load_recipe("demo", {"train.steps": steps, "train.max_minutes": args.minutes * 1.05}).train
        t0 = time.perf_counter()
        res = Trainer(model, tasks, train_set, f"{args.workdir}/{name}", cfg, val_set=val_set).fit(resume=False)
        results[name] = res.metrics
        rows.append(
            {
                "model": name,
                "params_M": count_params(model) / 1e6,
                "GMACs": count_macs(model, tuple(recipe.data.crop)) / 1e9,
                "steps": res.steps,
                "train_s": time.perf_counter() - t0,
                **{f"{t.name}.{t.metric}": res.metrics[t.name][t.metric] for t in tasks},
            }
        )
    ref = args.models[0]
    for row in rows:
        row[f"delta_m_vs_{ref}_%"] = delta_m(results[row["model"]], results[ref], tasks)
    print_table(rows, list(rows[0].keys()))
    write_json(
        args.out,
        {"minutes_per_model": args.minutes, "threads": torch.get_num_threads(), "rows": rows, "metrics": results},
    )


if __name__ == "__main__":
    main()
