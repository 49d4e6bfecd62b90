"""The same student trained with and without distillation, for the same number of steps.

On the synthetic scenes (the demo recipe's data, student and distillation
settings): the teacher is trained first (or loaded with ``--teacher DIR``),
then the student twice from the same initialisation and data order, once on
ground truth only and once distilled. Reports each model's metrics, MACs, the
teacher/student MACs ratio, and Delta_m relative to the teacher.

Goal (issue 4): distillation improves the student's Delta_m by >= 3 points.

    python benchmarks/distillation.py                       # trains the teacher too
    python benchmarks/distillation.py --teacher runs/demo/teacher
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from _common import RESULTS, print_table, write_json

from edgemt.compress.distill import Distiller, check_compatible, distillation_loss
from edgemt.config import load_recipe
from edgemt.data import build_dataset
from edgemt.evaluate import metric_options
from edgemt.metrics import delta_m
from edgemt.models import create_model, load_model, save_model
from edgemt.models.profile import count_macs, count_params
from edgemt.stages import ensure_dataset
from edgemt.tasks import resolve_tasks
from edgemt.train.trainer import Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="demo")
    ap.add_argument("--teacher", default=None, help="a trained teacher's model directory (default: train one)")
    ap.add_argument("--student", default=None, help="student registry name (default: the recipe's)")
    ap.add_argument("--steps", type=int, default=None, help="student steps (default: the recipe's distill.train.steps)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--workdir", default="runs/bench-distillation")
    ap.add_argument("--out", default=str(RESULTS / "distillation.json"))
    ap.add_argument("--resume", action="store_true", help="reuse finished or interrupted runs in --workdir")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()

    recipe = load_recipe(args.recipe)
    ensure_dataset(recipe, progress=not args.no_progress)
    opts = metric_options(recipe)
    val_set = build_dataset(recipe.data, "val", train=False)
    tasks = resolve_tasks(recipe.data.tasks, val_set.num_classes)
    work = Path(args.workdir)
    size = tuple(recipe.data.crop)

    if args.teacher:
        teacher = load_model(args.teacher).eval()
        t_time = None
    else:
        teacher = create_model(recipe.teacher.name, tasks=tasks, **{"img_size": size, **recipe.teacher.kwargs})
        train_set = build_dataset(recipe.data, "train", train=True, seed=recipe.train.seed)
        t0 = time.perf_counter()
        Trainer(teacher, tasks, train_set, work / "teacher", recipe.train, progress=not args.no_progress).fit()
        t_time = time.perf_counter() - t0
        teacher.cpu().eval()
        save_model(work / "teacher", teacher)
    check_compatible(teacher, tasks, args.teacher or "teacher")
    from edgemt.evaluate import evaluate

    t_metrics = evaluate(teacher, val_set, tasks, metric_options=opts)
    ref = t_metrics
    rows = [_row("teacher " + teacher.registry_name, teacher, size, t_metrics, tasks, ref, None, t_time)]
    results = {"teacher": t_metrics}
    student_name = args.student or recipe.student.name
    gains = []
    for seed in args.seeds:
        cfg = recipe.distill
        tcfg = dataclasses.replace(
            cfg.train, steps=args.steps or cfg.train.steps, seed=seed, checkpoint_every=0, eval_every=0
        )
        dm = {}
        for mode in ("ground truth only", "distilled"):
            torch.manual_seed(seed)
            student = create_model(student_name, tasks=tasks, **{"img_size": size, **recipe.student.kwargs})
            train_set = build_dataset(recipe.data, "train", train=True, seed=seed)
            model, loss_fn = student, None
            if mode == "distilled":
                model = Distiller(student, teacher, cfg)
                loss_fn = distillation_loss(tasks, cfg, tcfg.loss_weights, tcfg.edge_pos_weight)
            out_dir = work / f"{mode.split()[0]}-seed{seed}"
            trainer = Trainer(model, tasks, train_set, out_dir, tcfg, loss_fn=loss_fn, progress=not args.no_progress)
            res = trainer.fit(resume=args.resume)
            student.cpu().eval()
            metrics = evaluate(student, val_set, tasks, metric_options=opts)
            row = _row(
                f"{student_name} {mode} (seed {seed})", student, size, metrics, tasks, ref, res.steps, res.wall_s
            )
            rows.append(row)
            dm[mode] = row["delta_m_vs_teacher_%"]
            results[f"{mode} seed {seed}"] = metrics
        gains.append(dm["distilled"] - dm["ground truth only"])
    print_table(rows, list(rows[0]))
    summary = {
        "student": student_name,
        "teacher": teacher.registry_name,
        "teacher_student_macs_ratio": round(rows[0]["GMACs"] / rows[1]["GMACs"], 2),
        "delta_m_gain_points": gains,
        "mean_gain_points": sum(gains) / len(gains),
        "goal_points": 3.0,
    }
    print(
        f"distillation gain in Delta_m: {', '.join(f'{g:+.2f}' for g in gains)} points "
        f"(mean {summary['mean_gain_points']:+.2f}; goal >= +3); teacher/student MACs "
        f"{summary['teacher_student_macs_ratio']}x"
    )
    write_json(args.out, {"summary": summary, "rows": rows, "metrics": results, "input_size": list(size)})


def _row(name, model, size, metrics, tasks, ref, steps, seconds) -> dict:
    row = {
        "model": name,
        "params_M": round(count_params(model) / 1e6, 3),
        "GMACs": round(count_macs(model, size) / 1e9, 4),
        "steps": steps,
        "train_s": None if seconds is None else round(seconds, 1),
    }
    for t in tasks:
        row[f"{t.name}.{t.metric}"] = round(metrics[t.name][t.metric], 3)
    row["delta_m_vs_teacher_%"] = round(delta_m(metrics, ref, tasks), 2)
    return row


if __name__ == "__main__":
    main()
