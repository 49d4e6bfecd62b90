"""Pipeline stages of the compression package.

* ``student``: train the recipe's student, distilled from the teacher stage's
  model (``distill.teacher: false`` trains it on ground truth only, the
  control of the distillation benchmark).
* ``prune``: structured pruning of the student to ``prune``'s MACs or
  latency budget (Torch-Pruning), distillation fine-tuning between steps and
  after, evaluation.
* ``reparam``: reparameterize the student for deployment (``deploy.form``),
  fold BatchNorm, check the exact forms against the trained model, evaluate.
* ``qat``: int8 quantization-aware training of the reparameterized student
  (torchao pt2e), distilled from the teacher; the int8 targets consume it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from edgemt.data import build_dataset
from edgemt.errors import ConfigError, UserError
from edgemt.evaluate import evaluate, metric_options, pad_collate
from edgemt.io import read_manifest, write_json
from edgemt.models import create_model, load_model, save_model
from edgemt.models.profile import count_macs, count_params
from edgemt.pipeline import StageContext
from edgemt.tasks import resolve_tasks

__all__ = ["distill_stage", "prune_stage", "reparam_stage", "qat_stage", "find_teacher"]

EXACT_FORMS = ("training", "dynamic-merge", "factorized")


def find_teacher(ctx: StageContext) -> Path | None:
    """The teacher stage's model directory of this run, if the recipe has one and it is complete."""
    if "teacher" not in ctx.recipe.pipeline:
        return None
    d = ctx.stage_path("teacher")
    if read_manifest(d) is None:
        raise UserError(f"the teacher stage's output {d} is missing or incomplete; run the 'teacher' stage first")
    return d


def distill_stage(ctx: StageContext) -> dict[str, Any]:
    from edgemt.compress.distill import Distiller, check_compatible, distillation_loss
    from edgemt.train.stages import save_trained
    from edgemt.train.trainer import Trainer

    r = ctx.recipe
    cfg = r.distill
    train_set = build_dataset(r.data, "train", train=True, seed=cfg.train.seed)
    val_set = build_dataset(r.data, "val", train=False)
    tasks = resolve_tasks(r.data.tasks, train_set.num_classes)
    student = create_model(r.student.name, tasks=tasks, **{"img_size": tuple(r.data.crop), **r.student.kwargs})
    teacher_dir = find_teacher(ctx) if cfg.teacher else None
    if cfg.teacher and teacher_dir is None:
        raise ConfigError("distill.teacher is true but the recipe's pipeline has no 'teacher' stage before 'student'")
    teacher = None
    if teacher_dir is not None:
        teacher = load_model(teacher_dir).eval()
        check_compatible(teacher, tasks, teacher_dir)
        model = Distiller(student, teacher, cfg)
        loss_fn = distillation_loss(tasks, cfg, cfg.train.loss_weights, cfg.train.edge_pos_weight)
    else:
        model, loss_fn = student, None
    trainer = Trainer(
        model,
        tasks,
        train_set,
        ctx.stage_dir,
        cfg.train,
        val_set=val_set,
        loss_fn=loss_fn,
        progress=ctx.progress,
        metric_options=metric_options(r),
        workers=r.data.workers,
    )
    result = trainer.fit(resume=True)
    if not trainer.dist.is_main:
        return {}
    out = save_trained(ctx, student, r.student.name, result)
    out["teacher"] = str(teacher_dir) if teacher_dir else None
    size = tuple(r.data.crop)
    if teacher is not None:
        out["teacher_macs"] = count_macs(teacher.cpu(), size)
        out["teacher_student_macs_ratio"] = round(out["teacher_macs"] / max(1, out["macs"]), 2)
    return out


def _images(dataset, tasks, batch_size: int, max_batches: int):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=pad_collate(tasks))
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            return
        yield batch["image"]


def reparam_stage(ctx: StageContext) -> dict[str, Any]:
    from edgemt.compress.reparam import calibrate_gates, freeze_gates, reparameterize
    from edgemt.targets.stages import eval_input_size

    r = ctx.recipe
    cfg = r.deploy
    model = load_model(ctx.parent_dir).eval()
    val_set = build_dataset(r.data, "val", train=False)
    tasks = model.tasks
    size = eval_input_size(r, val_set)
    info: dict[str, Any] = {"form": cfg.form, "source": str(ctx.parent_dir)}
    if cfg.form == "frozen-gate":
        calib_set = build_dataset(r.data, "train", train=False)
        gates = calibrate_gates(model, _images(calib_set, tasks, 8, cfg.calibration_batches), progress=ctx.progress)
        info["frozen_gates"] = [g.tolist() for g in gates]
        if cfg.finetune_steps > 0:
            info["finetune"] = _finetune_frozen(ctx, model, tasks)
    reference = load_model(ctx.parent_dir).eval()
    if cfg.form == "frozen-gate":  # the exactness reference of the fold: the same frozen gates
        reference.load_state_dict(model.state_dict())
        freeze_gates(reference)
    model.eval()
    record = reparameterize(model, cfg.form, input_size=size, fold_bn=cfg.fold_bn)
    # The fold must be exact against its reference (float32 rounding only).
    x = torch.stack([val_set[i]["image"] for i in range(min(4, len(val_set)))])
    with torch.no_grad():
        ref, got = reference(x), model(x)
    diff = max(float((ref[k] - got[k]).abs().max()) for k in ref)
    scale = max(float(v.abs().max()) for v in ref.values())
    if diff > 1e-4 * max(1.0, scale):
        raise ConfigError(f"reparameterization to {cfg.form!r} is not exact: max abs diff {diff:.3g}")
    save_model(ctx.stage_dir, model)
    metrics = evaluate(model, val_set, tasks, metric_options=metric_options(r), progress=ctx.progress)
    return {
        "model": f"{model.registry_name} ({record['form']})",
        **info,
        "deploy_form": record["form"],
        "bn_folded": len(record["bn_folded"]),
        "max_abs_diff_vs_source": diff,
        "params_before": count_params(reference),
        "params": count_params(model),
        "macs_before": count_macs(reference, size),
        "macs": count_macs(model, size),
        "macs_input": list(size),
        "metrics": metrics,
    }


def _finetune_frozen(ctx: StageContext, model, tasks) -> dict[str, Any]:
    """A brief fine-tune with the gates frozen (training form), distilled when a teacher exists."""
    import dataclasses

    from edgemt.compress.distill import Distiller, distillation_loss
    from edgemt.compress.reparam import freeze_gates
    from edgemt.train.trainer import Trainer

    r = ctx.recipe
    tcfg = dataclasses.replace(
        r.distill.train,
        steps=r.deploy.finetune_steps,
        lr=r.deploy.finetune_lr,
        warmup_steps=0,
        eval_every=0,
        checkpoint_every=r.deploy.finetune_steps,
        time_budget_minutes=0.0,
    )
    freeze_gates(model)
    train_set = build_dataset(r.data, "train", train=True, seed=tcfg.seed + 1)
    teacher_dir = find_teacher(ctx) if r.distill.teacher else None
    net, loss_fn = model, None
    if teacher_dir is not None:
        net = Distiller(model, load_model(teacher_dir).eval(), r.distill)
        loss_fn = distillation_loss(tasks, r.distill, tcfg.loss_weights, tcfg.edge_pos_weight)
    result = Trainer(
        net, tasks, train_set, ctx.stage_dir / "finetune", tcfg, loss_fn=loss_fn, progress=ctx.progress
    ).fit(resume=True)
    model.cpu().eval()
    return {"steps": result.steps, "time_s": round(result.wall_s, 1), "distilled": teacher_dir is not None}


def _distill_finetune(
    ctx: StageContext, model, tasks, steps: int, lr: float, out_dir: Path, seed: int, distill_cfg=None
) -> dict[str, Any]:
    """Train ``model`` for ``steps`` steps, distilled from the run's teacher when there is one."""
    import dataclasses

    from edgemt.compress.distill import Distiller, distillation_loss
    from edgemt.train.trainer import Trainer

    r = ctx.recipe
    tcfg = dataclasses.replace(
        r.distill.train,
        steps=steps,
        lr=lr,
        warmup_steps=0,
        eval_every=0,
        checkpoint_every=steps,
        time_budget_minutes=0.0,
        seed=seed,
    )
    dcfg = distill_cfg or r.distill
    train_set = build_dataset(r.data, "train", train=True, seed=seed)
    teacher_dir = find_teacher(ctx) if r.distill.teacher else None
    net, loss_fn = model, None
    if teacher_dir is not None:
        net = Distiller(model, load_model(teacher_dir).eval(), dcfg)
        loss_fn = distillation_loss(tasks, dcfg, tcfg.loss_weights, tcfg.edge_pos_weight)
    result = Trainer(net, tasks, train_set, out_dir, tcfg, loss_fn=loss_fn, progress=ctx.progress).fit(resume=True)
    model.cpu().eval()
    return {"steps": result.steps, "time_s": round(result.wall_s, 1), "distilled": teacher_dir is not None}


def _onnx_latency_fn(ctx: StageContext, size: tuple[int, int]):
    """Latency of a model exported to ``prune.latency_target`` and run by ONNX Runtime (median ms)."""
    import tempfile

    import numpy as np

    from edgemt.targets.latency import measure_latency
    from edgemt.targets.onnx import export_onnx
    from edgemt.targets.runtime import OnnxRuntimeModel

    r = ctx.recipe
    calibration = None
    if r.prune.latency_target == "onnx-int8":
        from edgemt.targets.stages import _calibration_images

        calibration = _calibration_images(r, size)[:16]

    def latency(model) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(model, Path(tmp) / "m.onnx", input_size=size)
            if calibration is not None:
                from edgemt.targets.onnx_int8 import quantize_onnx_int8

                path = quantize_onnx_int8(path, Path(tmp) / "q.onnx", calibration)
            rt = OnnxRuntimeModel(path, threads=r.validate.threads)
            x = np.zeros((1, 3, *size), dtype=np.float32)
            return measure_latency(lambda: rt.run(x), warmup=5, runs=max(10, r.validate.runs))["median_ms"]

    return latency


def prune_stage(ctx: StageContext) -> dict[str, Any]:
    from edgemt.compress.prune import prune_to_budget
    from edgemt.targets.stages import eval_input_size

    r = ctx.recipe
    cfg = r.prune
    model = load_model(ctx.parent_dir).eval()
    if getattr(model, "deploy_record", None):
        raise ConfigError(
            f"prune needs the trained model in its training form; {ctx.parent_dir} is reparameterized "
            "(put 'prune' before 'reparam' in the pipeline)"
        )
    tasks = model.tasks
    val_set = build_dataset(r.data, "val", train=False)
    size = tuple(r.data.crop)
    params_before = count_params(model)
    latency_fn = _onnx_latency_fn(ctx, eval_input_size(r, val_set)) if cfg.latency_ms is not None else None
    rounds: list[dict[str, Any]] = []

    def finetune(m, i: int) -> None:
        rounds.append(
            _distill_finetune(
                ctx, m, tasks, cfg.finetune_steps, cfg.finetune_lr, ctx.stage_dir / f"finetune_{i}", seed=100 + i
            )
        )

    record = prune_to_budget(
        model,
        input_size=size,
        macs_ratio=cfg.macs_ratio,
        macs=cfg.macs,
        latency_ms=cfg.latency_ms,
        latency_fn=latency_fn,
        max_steps=cfg.max_steps,
        max_ratio=cfg.max_ratio,
        round_to=cfg.round_to,
        rank_round=cfg.rank_round,
        measure_every=cfg.measure_every,
        global_ranking=cfg.global_ranking,
        importance=cfg.importance,
        latency_weight=cfg.latency_weight,
        element_weight=cfg.element_weight,
        min_channels=cfg.min_channels,
        snap_to_grid=cfg.snap_to_grid,
        finetune=finetune if cfg.finetune_every > 0 or cfg.finetune_rounds > 0 else None,
        finetune_every=cfg.finetune_every,
        finetune_rounds=cfg.finetune_rounds,
        progress=ctx.progress,
    )
    if not record["met"]:
        raise ConfigError(
            f"prune: the budget {record['budget']} was not met after {record['steps']} steps "
            f"(MACs ratio {record['macs_ratio']}, latency {record['latency_ms']} ms); raise prune.max_ratio or "
            "prune.max_steps, or relax the budget"
        )
    final = None
    if cfg.final_finetune_steps > 0:
        final = _distill_finetune(
            ctx, model, tasks, cfg.final_finetune_steps, cfg.finetune_lr, ctx.stage_dir / "finetune_final", seed=99
        )
    save_model(ctx.stage_dir, model)
    write_json(ctx.stage_dir / "prune_history.json", record["history"])
    metrics = evaluate(model, val_set, tasks, metric_options=metric_options(r), progress=ctx.progress)
    print(
        f"[prune] MACs {record['macs_before']:,} -> {record['macs_after']:,} ({record['macs_ratio']:.3f}x) in "
        f"{record['steps']} steps; expert block widths {[w['channels'] for w in record['widths_after']]}"
    )
    return {
        "model": f"{model.registry_name} (pruned)",
        "params_before": params_before,
        "params": count_params(model),
        "macs": count_macs(model, size),
        "macs_input": list(size),
        "train_time_s": round(sum(x["time_s"] for x in rounds) + (final["time_s"] if final else 0.0), 1),
        "prune": {k: v for k, v in record.items() if k != "history"},
        "finetune_rounds": rounds,
        "final_finetune": final,
        "metrics": metrics,
    }


def qat_stage(ctx: StageContext) -> dict[str, Any]:
    import dataclasses

    from edgemt.compress.qat import QAT_SCHEME, QATModel, save_qat
    from edgemt.compress.reparam import reparameterize

    r = ctx.recipe
    model = load_model(ctx.parent_dir).eval()
    tasks = model.tasks
    form = (getattr(model, "deploy_record", None) or {}).get("form")
    if form == "dynamic-merge":
        raise ConfigError(
            "qat: the dynamic-merge form computes conv kernels per image and cannot be int8; "
            "set deploy.form to factorized or frozen-gate"
        )
    size = tuple(r.data.crop)
    if size[0] % 32 or size[1] % 32:
        raise ConfigError(f"qat: data.crop {list(size)} must be multiples of 32 (the exported graph's strides)")
    folded = form is not None
    if not folded:  # BatchNorm is folded before quantizing, and the deploy form fixes the graph that is trained
        static = r.deploy.form if r.deploy.form != "dynamic-merge" else "factorized"
        reparameterize(model, static, input_size=size, fold_bn=True)
    val_set = build_dataset(r.data, "val", train=False)
    opts = metric_options(r)
    float_metrics = evaluate(model, val_set, tasks, metric_options=opts, progress=ctx.progress)
    # The graph is traced where the exporters will end it (deploy.output_stride), so int8 targets ship it as trained.
    qat = QATModel(model, size, output_stride=r.deploy.output_stride, weight_bits=r.qat.weight_bits)
    before = evaluate(qat, val_set, tasks, metric_options=opts, progress=ctx.progress)  # fake-quant, untrained
    # Output distillation only: the feature adapters read the heads' inputs, which a traced graph hides.
    dcfg = dataclasses.replace(r.distill, feature_weight=0.0)
    ft = _distill_finetune(ctx, qat, tasks, r.qat.steps, r.qat.lr, ctx.stage_dir / "train", seed=7, distill_cfg=dcfg)
    qat.eval()
    qat.freeze_observers()
    metrics = evaluate(qat, val_set, tasks, metric_options=opts, progress=ctx.progress)
    save_qat(ctx.stage_dir, model, qat, extra={"source": str(ctx.parent_dir)})
    return {
        "model": f"{model.registry_name} (int8 QAT)",
        "params": count_params(model),
        "macs": count_macs(model, size),
        "macs_input": list(size),
        "train_time_s": ft["time_s"],
        "qat": {
            **QAT_SCHEME,
            "steps": ft["steps"],
            "distilled": ft["distilled"],
            "bn_folded_here": not folded,
            "output_stride": qat.output_stride,
            "weight_bits": qat.weight_bits,
        },
        "metrics_float": float_metrics,
        "metrics_fake_quant_before_training": before,
        "metrics": metrics,
    }
