"""Models trained for the SAME wall-clock budget on the synthetic scenes.

Reports each model's task metrics and Delta_m relative to the first model.
Two questions it answers:

* does the synthetic task separate model sizes (a larger baseline must score
  clearly better than a tiny one, or the dataset cannot rank compression
  methods)?  ``--models baseline-xs baseline-m``
* does a tiny teacher beat the baseline in the same time?
  ``--models baseline-s mlore-tiny``

    python benchmarks/same_budget.py --minutes 3 --models baseline-xs baseline-m

Seeds can be run apart and pooled: ``--first-seed 2 --seeds 1`` trains seed 2
alone, and ``--combine a.json b.json --out c.json`` reports the seeds of both
files together (same models and minutes, no seed twice) without training.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

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


def _summarize(rows: list[dict], models: list[str]) -> dict[str, dict]:
    """Mean and sample standard deviation of each model's Delta_m over its seeds."""
    key = next(k for k in rows[0] if k.startswith("delta_m_vs_"))
    summary = {}
    for spec in models:
        d = [r[key] for r in rows if r["model"] == spec]
        mean = sum(d) / len(d)
        std = (sum((v - mean) ** 2 for v in d) / max(1, len(d) - 1)) ** 0.5
        summary[spec] = {"delta_m_mean_%": mean, "delta_m_std_%": std, "seeds": len(d)}
    return summary


def _print(rows: list[dict], summary: dict[str, dict], ref: str) -> None:
    print_table(rows, list(rows[0].keys()))
    for spec, v in summary.items():
        print(f"{spec}: Δm vs {ref} {v['delta_m_mean_%']:+.2f}% ± {v['delta_m_std_%']:.2f} over {v['seeds']} seed(s)")


def combine(paths: list[str], out: str | None) -> None:
    """Pool result files of the same comparison (same models and minutes, different seeds)."""
    runs = []
    for p in paths:
        try:
            runs.append((p, json.loads(Path(p).read_text())))
        except (OSError, ValueError) as e:
            raise SystemExit(f"--combine: cannot read {p}: {e}") from None
    first_path, first = runs[0]
    models = list(dict.fromkeys(r["model"] for r in first["rows"]))
    rows, seen = [], {}
    for p, run in runs:
        for field in ("minutes_per_model", "device"):
            if run.get(field) != first.get(field):
                raise SystemExit(f"--combine: {p} has {field}={run.get(field)!r}, {first_path} {first.get(field)!r}")
        if list(dict.fromkeys(r["model"] for r in run["rows"])) != models:
            raise SystemExit(f"--combine: {p} compares other models than {first_path} ({models})")
        for r in run["rows"]:
            if (r["model"], r["seed"]) in seen:
                raise SystemExit(
                    f"--combine: {r['model']} seed {r['seed']} is in both {seen[r['model'], r['seed']]} and {p}"
                )
            seen[r["model"], r["seed"]] = p
            rows.append(r)
    summary = _summarize(rows, models)
    _print(rows, summary, models[0])
    if out:
        write_json(
            out,
            {
                **{k: first[k] for k in ("device", "minutes_per_model", "threads")},
                "combined_from": paths,
                "seeds": len({r["seed"] for r in rows}),
                "rows": rows,
                "summary": summary,
            },
        )


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
        "--seeds", type=int, default=1, help="train every model this many times (models alternating within a seed)"
    )
    ap.add_argument("--first-seed", type=int, default=0, help="seeds run first-seed..first-seed+N-1")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument(
        "--combine", nargs="+", metavar="JSON", help="pool earlier result files (different seeds) and exit; no training"
    )
    args = ap.parse_args()
    if args.seeds < 1 or args.first_seed < 0:
        ap.error(f"--seeds must be >= 1 and --first-seed >= 0, got {args.seeds} and {args.first_seed}")
    if args.combine:
        combine(args.combine, args.out)
        return

    torch.set_num_threads(max(1, torch.get_num_threads()))
    recipe = load_recipe("demo", {"data.root": args.data})
    ensure_dataset(recipe, progress=True)
    train_set = build_dataset(recipe.data, "train", train=True)
    val_set = build_dataset(recipe.data, "val", train=False)
    tasks = resolve_tasks(recipe.data.tasks, train_set.num_classes)

    rows, results = [], {}
    # Models alternate within a seed: a slow spell of the machine hits all of them.
    for seed in range(args.first_seed, args.first_seed + args.seeds):
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
    summary = _summarize(rows, args.models)
    _print(rows, summary, ref)
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
