"""Models trained for the SAME wall-clock budget on the synthetic scenes.

Reports each model's task metrics and Delta_m relative to the first model.
Two questions it answers:

* does the synthetic task separate model sizes (a larger baseline must score
  clearly better than a tiny one, or the dataset cannot rank compression
  methods)?  ``--models baseline-xs baseline-m``
* does a tiny teacher beat the baseline in the same time?
  ``--models baseline-s mlore-tiny``

    python benchmarks/same_budget.py --minutes 3 --models baseline-xs baseline-m
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _common import RESULTS, print_table, write_json

from edgemt.config import load_recipe
from edgemt.data import build_dataset
from edgemt.metrics import delta_m
from edgemt.models import create_model
from edgemt.models.profile import count_macs, count_params
from edgemt.stages import ensure_dataset
from edgemt.tasks import resolve_tasks
from edgemt.train.trainer import Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--models",
        nargs="+",
        default=["baseline-xs", "baseline-m"],
        help="registry names, each optionally with constructor kwargs as JSON: mlore-tiny'{\"channels\": 48}'",
    )
    ap.add_argument("--minutes", type=float, default=3.0, help="training budget per model")
    ap.add_argument("--data", default="data/synthetic", help="synthetic dataset root (made if missing)")
    ap.add_argument("--out", default=None, help="JSON path (default results/same_budget_<models>.json)")
    ap.add_argument("--workdir", default="runs/bench-same-budget")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--lr", type=float, default=None, help="learning rate for every model (default: the demo's)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--workers", type=int, default=0, help="data-loading processes (use some on a GPU)")
    ap.add_argument(
        "--seeds", type=int, default=1, help="train every model this many times (seeds 0..N-1, models alternating)"
    )
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(max(1, torch.get_num_threads()))
    recipe = load_recipe("demo", {"data.root": args.data})
    ensure_dataset(recipe, progress=True)
    train_set = build_dataset(recipe.data, "train", train=True)
    val_set = build_dataset(recipe.data, "val", train=False)
    tasks = resolve_tasks(recipe.data.tasks, train_set.num_classes)

    rows, results = [], {}
    for seed in range(args.seeds):  # models alternate within a seed: a slow spell of the machine hits all
        for spec in args.models:
            name, _, extra = spec.partition("{")
            kwargs = json.loads("{" + extra) if extra else {}

            over = {
                "train.steps": 10**9,  # an upper bound only: the time budget ends training
                "train.time_budget_minutes": args.minutes,
                "train.checkpoint_every": 0,
                "train.seed": seed,
            }
            if args.lr:
                over["train.lr"] = args.lr
            if args.batch_size:
                over["train.batch_size"] = args.batch_size
            torch.manual_seed(seed)
            model = create_model(name, tasks=tasks, **{"img_size": tuple(recipe.data.crop), **kwargs})
            trainer = Trainer(
                model, tasks, train_set, f"{args.workdir}/{len(rows)}-{name}", load_recipe("demo", over).train,
                val_set=val_set, progress=not args.no_progress, device=args.device, workers=args.workers,
            )  # fmt: skip
            model = trainer.model
            t0 = time.perf_counter()
            res = trainer.fit(resume=False)
            results[spec, seed] = res.metrics
            rows.append(
                {
                    "model": spec,
                    "seed": seed,
                    "params_M": count_params(model) / 1e6,
                    "GMACs": count_macs(model, tuple(recipe.data.crop)) / 1e9,
                    "steps": res.steps,
                    "train_s": time.perf_counter() - t0,
                    **{f"{t.name}.{t.metric}": res.metrics[t.name][t.metric] for t in tasks},
                }
            )
    ref = args.models[0]
    for row in rows:  # against the reference model trained with the same seed
        row[f"delta_m_vs_{ref}_%"] = delta_m(results[row["model"], row["seed"]], results[ref, row["seed"]], tasks)
    summary = {}
    for spec in args.models:
        d = [r[f"delta_m_vs_{ref}_%"] for r in rows if r["model"] == spec]
        mean = sum(d) / len(d)
        std = (sum((v - mean) ** 2 for v in d) / max(1, len(d) - 1)) ** 0.5
        summary[spec] = {"delta_m_mean_%": mean, "delta_m_std_%": std, "seeds": len(d)}
    print_table(rows, list(rows[0].keys()))
    for spec, v in summary.items():
        print(f"{spec}: Δm vs {ref} {v['delta_m_mean_%']:+.2f}% ± {v['delta_m_std_%']:.2f} over {v['seeds']} seed(s)")
    out = args.out or RESULTS / f"same_budget_{'_vs_'.join(m.partition('{')[0] for m in args.models)}.json"
    write_json(
        out,
        {
            "device": str(trainer.device),
            "minutes_per_model": args.minutes,
            "threads": torch.get_num_threads(),
            "seeds": args.seeds,
            "rows": rows,
            "summary": summary,
            "metrics": {f"{spec} seed {seed}": m for (spec, seed), m in results.items()},
        },
    )


if __name__ == "__main__":
    main()
