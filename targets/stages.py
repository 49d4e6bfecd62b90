"""Pipeline stages of the targets package: ``export``, ``validate`` and ``report``.

* ``export`` writes ``export/<target>/model<suffix>`` for every target of the
  recipe; a target that fails to export is recorded with its reason and the
  others carry on.
* ``validate`` runs the validation split through each artifact's own runtime
  (accuracy, parity with the PyTorch model, latency, size) and marks the
  stage failed when any target misses its gate.
* ``report`` gathers the model stages and the validation into
  ``report/report.md`` and ``report/report.json``.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any

from edgemt.config import Recipe
from edgemt.data import IMAGENET_MEAN, IMAGENET_STD, build_dataset
from edgemt.errors import ConfigError
from edgemt.evaluate import metric_options
from edgemt.io import file_hash, read_json, read_manifest, write_json
from edgemt.models import graph_output_stride, load_model
from edgemt.models.profile import count_macs
from edgemt.pipeline import StageContext, registry
from edgemt.targets.registry import get_target

__all__ = ["export_stage", "validate_stage", "report_stage", "metric_options", "eval_input_size"]


def eval_input_size(recipe: Recipe, val_set) -> tuple[int, int]:
    """The (padded) size of the validation images, which the artifacts are exported at."""
    if recipe.export.input_size is not None:
        return tuple(recipe.export.input_size)
    return tuple(int(v) for v in val_set[0]["image"].shape[-2:])


def _calibration_images(recipe: Recipe, size: tuple[int, int]) -> list:
    """The first ``export.calibration_images`` training images (eval transform), each a (B, 3, H, W) array."""
    import numpy as np

    from edgemt.targets.validate import _pad_to

    n = recipe.export.calibration_images
    if n <= 0:
        return []
    train = build_dataset(recipe.data, "train", train=False)
    batch = max(1, recipe.export.batch)
    # Larger images are cropped to the graph's input, smaller ones padded like the validation images.
    images = [
        _pad_to(train[i]["image"].numpy()[None, :, : size[0], : size[1]], size) for i in range(min(n, len(train)))
    ]
    return [np.concatenate(images[i : i + batch]) for i in range(0, len(images) - batch + 1, batch)]


def artifact_size(path: Path) -> int:
    """Bytes of a file, or of every file under a directory artifact (``.mlpackage``)."""
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


class _DeployForms:
    """Gives each target the model in a deploy form it can take, and says why.

    A target that needs constant conv weights (int8, TFLite, Core ML) gets its
    preferred static form (``factorized``: exact, the fastest static form) when
    the model's own form is the training form or ``dynamic-merge`` (kernels
    computed per image). A ``dynamic-merge`` model is rebuilt from the trained
    model the reparam stage started from. Targets without that need get the
    model as it is. Converted models are cached per form.
    """

    def __init__(self, model, model_dir: Path, size: tuple[int, int], fold_bn: bool) -> None:
        self.model = model
        self.model_dir = model_dir
        self.size = size
        self.fold_bn = fold_bn
        self.form = (getattr(model, "deploy_record", None) or {}).get("form", "training")
        self._cache: dict[str, Any] = {}

    def _has_experts(self) -> bool:
        return any(hasattr(m, "frozen_gates") and hasattr(m, "set_form") for m in self.model.modules())

    def for_target(self, spec) -> tuple[Any, str, str | None]:
        """``(model, form, note)``; ``note`` explains a form other than the model's own."""
        if not spec.static_weights or self.form in ("factorized", "frozen-gate") or not self._has_experts():
            return self.model, self.form, None
        want = spec.deploy_form if spec.deploy_form != "training" else "factorized"
        if want not in self._cache:
            import copy

            from edgemt.compress.reparam import reparameterize

            if self.form == "training":
                source = copy.deepcopy(self.model)
            else:
                src = (read_manifest(self.model_dir) or {}).get("source")
                if not src or not (Path(src) / "arch.json").is_file():
                    raise ConfigError(
                        f"{spec.name} needs static conv weights, but the model is in the {self.form} form (kernels "
                        "computed per image) and the trained model it came from is not recorded; set deploy.form "
                        "to factorized or frozen-gate"
                    )
                source = load_model(src).eval()
            reparameterize(source, want, input_size=self.size, fold_bn=self.fold_bn)
            self._cache[want] = source
        why = "computes its kernels per image" if self.form == "dynamic-merge" else "is the training form"
        note = f"{want}: {spec.name} needs static conv weights and the model's {self.form} form {why}"
        return self._cache[want], want, note


def _quantization_source(spec, model_dir: Path, recipe: Recipe) -> str:
    """Where a quantized target's quantization comes from (empty for float targets)."""
    from edgemt.compress.qat import is_qat_dir

    if spec.precision not in ("int8", "int8w", "pal4"):
        return ""
    qat = is_qat_dir(model_dir)
    if spec.takes_qat and qat:
        if spec.format == "tflite" and recipe.export.tflite_converter != "litert-torch":
            return "calibration of the QAT-trained weights (the onnx2tf route cannot take QAT scales)"
        return "qat: scales learned by quantization-aware training, kept as they are"
    if qat:
        return "weights of the QAT-trained model, compressed by the converter (activations stay fp16)"
    return "post-training calibration" if spec.needs_calibration else "post-training weight compression"


def export_stage(ctx: StageContext) -> dict[str, Any]:
    from edgemt.targets.onnx import make_metadata

    recipe = ctx.recipe
    specs = [get_target(name) for name in recipe.export.targets]  # unknown names fail before any work
    model_dir = ctx.parent_dir
    model = load_model(model_dir).eval()
    val_set = build_dataset(recipe.data, "val", train=False)
    size = eval_input_size(recipe, val_set)
    source_hash = file_hash(model_dir / "weights.safetensors")
    forms = _DeployForms(model, model_dir, size, recipe.deploy.fold_bn)
    results: dict[str, Any] = {}
    calibration = None
    qat = None  # the QAT stage's graph, when the model comes from it and an int8 target wants it
    tflite_float: dict = {}  # tflite-fp32 and tflite-fp16 share one litert-torch conversion
    for spec in specs:
        name = spec.name
        path = ctx.stage_dir / name / f"model{spec.suffix}"
        t0 = time.perf_counter()
        try:
            target_model, form, note = forms.for_target(spec)
            meta = make_metadata(
                model.tasks,
                input_size=size,
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
                classes=getattr(val_set, "class_names", {}),
                deploy_form=form,
                source_hash=source_hash,
                model_name=model.registry_name,
                extra={"target": name, "precision": spec.precision, "source_stage": model_dir.name},
            )
            kwargs: dict[str, Any] = {}
            stride = recipe.deploy.output_stride
            if stride != 1:
                meta["output_stride"] = str(stride)
                meta["outputs"] = (
                    f"raw (before activation) at 1/{stride} of the input size; upsample bilinearly (half-pixel "
                    "centres) to the input size, then apply edgemt.tasks.activate"
                )
            if spec.needs_calibration:
                if calibration is None:
                    calibration = _calibration_images(recipe, size)
                kwargs["calibration"] = calibration
            if spec.format == "onnx" and spec.precision == "int8":
                kwargs["input_conv"] = recipe.export.int8_input_conv
            if spec.format == "tflite":
                kwargs["route"] = recipe.export.tflite_converter
                if spec.precision in ("fp32", "fp16"):
                    kwargs["float_cache"] = tflite_float
            source = _quantization_source(spec, model_dir, recipe)
            if spec.takes_qat and source.startswith("qat"):
                if qat is None:
                    from edgemt.compress.qat import load_qat

                    qat = load_qat(model_dir)[1]
                if qat.output_stride != stride:
                    raise ConfigError(
                        f"the QAT graph in {model_dir} ends at output stride {qat.output_stride}, deploy.output_stride "
                        f"is {stride}: rerun the qat stage"
                    )
                kwargs["qat"] = qat
            with graph_output_stride(target_model, stride):
                spec.export(
                    target_model,
                    path,
                    input_size=size,
                    metadata=meta,
                    opset=recipe.export.opset,
                    batch=recipe.export.batch,
                    **kwargs,
                )
            size_bytes = artifact_size(path)
            results[name] = {
                "status": "exported",
                "path": str(path.relative_to(ctx.stage_dir)),
                "size_bytes": size_bytes,
                "deploy_form": form,
                "output_stride": stride,
                "export_s": round(time.perf_counter() - t0, 2),
            }
            if note:
                results[name]["deploy_form_note"] = note
            if source:
                results[name]["quantization_source"] = source
            if spec.format == "onnx" and spec.precision == "int8":
                from edgemt.targets.onnx import read_onnx_metadata

                results[name]["input_conv"] = read_onnx_metadata(path).get("quantization", {}).get("input_conv")
            if spec.format == "tflite":
                results[name]["converter"] = recipe.export.tflite_converter
            print(
                f"[export] {name}: {path} ({size_bytes / 1e6:.2f} MB, deploy form {form}"
                + (f" chosen: {note.split(': ', 1)[1]}" if note else "")
                + f", {time.perf_counter() - t0:.1f} s)"
            )
        except Exception as e:  # one failing target never stops the others
            results[name] = {
                "status": "export_failed",
                "reason": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=5),
            }
            print(f"[export] {name}: FAILED ({type(e).__name__}: {e})")
    return {"input_size": list(size), "source_dir": str(model_dir), "source_hash": source_hash, "targets": results}


def validate_stage(ctx: StageContext) -> dict[str, Any]:
    from edgemt.targets.report import export_failed_entry
    from edgemt.targets.runtime import TorchModel
    from edgemt.targets.validate import validate_runtime

    recipe = ctx.recipe
    exported = read_manifest(ctx.parent_dir)
    model = load_model(exported["source_dir"]).eval()
    val_set = build_dataset(recipe.data, "val", train=False)
    macs = count_macs(model, tuple(exported["input_size"]))
    reference = TorchModel(model, threads=recipe.validate.threads)
    qat_reference = None  # int8 files that kept QAT's scales are compared with the fake-quantized model
    rows = []
    for name, info in exported["targets"].items():
        spec = get_target(name)
        if info["status"] != "exported":
            rows.append(export_failed_entry(name, spec.precision, info.get("reason", "export failed")))
            continue
        if recipe.validate.parity.get(spec.precision) is None:
            raise ConfigError(f"validate.parity: no thresholds for precision {spec.precision!r} (target {name})")
        if not spec.runs_here:
            rows.append(_not_run_entry(spec, ctx.parent_dir / info["path"], info, model.tasks, exported["input_size"]))
            r = rows[-1]
            print(f"[validate] {name}: {r['status']} ({'; '.join(r['reasons'] or [r['not_run_reason']])})")
            continue
        ref, ref_label = reference, "the PyTorch float model"
        if str(info.get("quantization_source", "")).startswith("qat"):
            if qat_reference is None:
                from edgemt.compress.qat import load_qat

                qat_reference = TorchModel(
                    load_qat(exported["source_dir"])[1], tasks=model.tasks, threads=recipe.validate.threads
                )
            ref, ref_label = qat_reference, "the fake-quantized QAT model (PyTorch)"
        try:
            runtime = spec.load(ctx.parent_dir / info["path"], threads=recipe.validate.threads, target=name)
            row = validate_runtime(
                runtime,
                ref,
                val_set,
                model.tasks,
                cfg=recipe.validate,
                precision=spec.precision,
                metric_options=metric_options(recipe),
                target=name,
                macs=macs,
            )
        except Exception as e:  # a runtime that cannot load or run fails its own row only
            row = {
                "target": name,
                "precision": spec.precision,
                "status": "failed_validation",
                "reasons": [f"{type(e).__name__}: {e}"],
            }
        row.update({"deploy_form": info.get("deploy_form"), "runtime": spec.runtime, "format": spec.format})
        row["parity_reference"] = ref_label
        for key in ("deploy_form_note", "converter", "quantization_source"):
            if info.get(key):
                row[key] = info[key]
        rows.append(row)
        print(f"[validate] {name}: {row['status']}" + (f" ({'; '.join(row['reasons'])})" if row.get("reasons") else ""))
    write_json(ctx.stage_dir / "results.json", rows)
    # A target this host cannot run (Core ML off macOS) passed its static checks: not a failure.
    failed = [r["target"] for r in rows if r["status"] not in ("passed", "not_run")]
    return {
        "targets": {r["target"]: r["status"] for r in rows},
        "status": "failed" if failed else "passed",
        "exit_code": 1 if failed else 0,
    }


def _not_run_entry(spec, path: Path, info: dict[str, Any], tasks, input_size) -> dict[str, Any]:
    """A target this host cannot execute (Core ML off macOS): its static program checks instead of numerics."""
    import sys

    row: dict[str, Any] = {
        "target": spec.name,
        "precision": spec.precision,
        "deploy_form": info.get("deploy_form"),
        "runtime": spec.runtime,
        "format": spec.format,
        "size_bytes": info.get("size_bytes"),
        "size_mb": round(info["size_bytes"] / 2**20, 3) if info.get("size_bytes") else None,
        "reasons": [],
    }
    for key in ("deploy_form_note", "quantization_source"):
        if info.get(key):
            row[key] = info[key]
    try:
        if spec.check is None:
            raise ConfigError(f"{spec.name} cannot run on {sys.platform} and has no static check")
        row["program"] = spec.check(path, tasks, tuple(input_size), precision=spec.precision)
        row["status"] = "not_run"
        row["not_run_reason"] = (
            f"{spec.not_here or f'{spec.runtime} does not run on {sys.platform}'}: numerics, parity and latency "
            f"were not measured on this {sys.platform} host; conversion and program checks ran"
        )
        row["notes"] = [f"program checks passed: {row['program'].get('summary', 'static checks')}"]
    except Exception as e:
        row["status"] = "failed_validation"
        row["reasons"] = [f"{type(e).__name__}: {e}"]
    return row


def _model_stage_rows(recipe: Recipe) -> list[dict[str, Any]]:
    reg = registry()
    rows = []
    for name in recipe.pipeline:
        stage = reg.stages[name]
        m = read_manifest(recipe.run_dir / (stage.dir_name or name))
        if stage.produces_model and m:
            rows.append(
                {
                    "stage": name,
                    "model": m.get("model"),
                    "params": m.get("params"),
                    "macs": m.get("macs"),
                    "train_time_s": m.get("train_time_s"),
                    "metrics": m.get("metrics", {}),
                    "artifact_hash": m.get("outputs_hash"),
                }
            )
    return rows


def _add_delta_m(rows: list[dict[str, Any]], tasks) -> None:
    """Each model stage's Delta_m (percent) against the first one (the teacher)."""
    from edgemt.metrics import delta_m

    if not rows or not rows[0].get("metrics"):
        return
    for row in rows:
        try:
            row["delta_m_%"] = delta_m(row["metrics"], rows[0]["metrics"], tasks)
        except (ConfigError, KeyError, TypeError):
            row["delta_m_%"] = None


def report_stage(ctx: StageContext) -> dict[str, Any]:
    from edgemt.targets.report import summary_skeleton, write_report

    recipe = ctx.recipe
    val_set = build_dataset(recipe.data, "val", train=False)
    summary = summary_skeleton(recipe.name, recipe.data.dataset, val_set.resolved_tasks())
    summary["stages"] = _model_stage_rows(recipe)
    _add_delta_m(summary["stages"], val_set.resolved_tasks())
    results = Path(ctx.parent_dir) / "results.json"
    summary["targets"] = read_json(results) if results.is_file() else []
    for r in summary["targets"]:
        if r.get("status") == "not_run":
            summary["not_executed"].append(f"{r['target']}: {r.get('not_run_reason') or 'not run on this host'}")
    summary["notes"].append(
        f"Validation split: {len(val_set)} images of {recipe.data.root}; latency at batch 1 with "
        f"{recipe.validate.threads} thread(s), {recipe.validate.warmup} warm-up + {recipe.validate.runs} timed runs."
    )
    host_up = {
        r["target"]: r["latency"]["host_upsample_ms"]
        for r in summary["targets"]
        if "host_upsample_ms" in (r.get("latency") or {})
    }
    if host_up:
        summary["notes"].append(
            f"The exported graphs end at the heads' stride (deploy.output_stride {recipe.deploy.output_stride}): "
            "their latency excludes the last bilinear upsampling to the input size, which the host does (accuracy "
            "and parity are measured after it). Host upsampling in PyTorch, 1 thread, median ms: "
            + ", ".join(f"{k} {v:.3f}" for k, v in host_up.items())
            + "."
        )
    if "edge" in recipe.data.tasks:
        summary["notes"].append(
            "Boundary odsF is the Python protocol (NMS + one-to-one matching within maxDist), not MATLAB SEISM."
        )
    figures = _report_figures(recipe, summary, val_set, Path(ctx.parent_dir))
    paths = write_report(ctx.stage_dir, summary, figures=figures)
    print(f"[report] {paths.get('md', ctx.stage_dir / 'report.md')}")
    return {"files": {k: str(v) for k, v in paths.items()}}


def _report_figures(recipe: Recipe, summary: dict[str, Any], val_set, validate_dir: Path) -> list[tuple[str, bytes]]:
    """The accuracy-vs-latency chart (PyTorch stages timed here, targets from validation) and,
    per target that runs here, its predictions on the first validation scenes next to the ground truth."""
    import numpy as np
    import torch

    from edgemt.metrics import delta_m
    from edgemt.targets.latency import measure_latency
    from edgemt.targets.report_html import accuracy_latency_png, predictions_png
    from edgemt.targets.runtime import TorchModel, outputs_at_input_size
    from edgemt.tasks import activate

    tasks = val_set.resolved_tasks()
    names = [t.name for t in tasks]
    stages = summary["stages"]
    threads = recipe.validate.threads
    x = torch.stack([val_set[0]["image"]])
    points: list[dict[str, Any]] = []
    ref = stages[0]["metrics"] if stages and stages[0].get("metrics") else None
    for row in stages:
        model = load_model(recipe.run_dir / row["stage"]).eval()
        rt = TorchModel(model, threads=threads)
        lat = measure_latency(lambda rt=rt: rt.run(x.numpy()), warmup=3, runs=max(5, recipe.validate.runs // 3))
        row["latency_pytorch_ms"] = lat["median_ms"]
        points.append(
            {"label": row["stage"], "latency_ms": lat["median_ms"], "delta_m": row.get("delta_m_%"), "kind": "stage"}
        )
    for r in summary["targets"]:
        if r.get("status") == "passed" and ref and r.get("metrics"):
            try:
                dm = delta_m(r["metrics"], ref, tasks)
            except (ConfigError, KeyError):
                dm = None
            lat = (r.get("latency") or {}).get("median_ms")
            points.append({"label": r["target"], "latency_ms": lat, "delta_m": dm, "kind": "target"})
    figures = [
        (
            "Accuracy (Δm vs the teacher) versus median latency; threads as stated in the tables",
            accuracy_latency_png(points),
        )
    ]
    n = min(3, len(val_set))
    samples = [val_set[i] for i in range(n)]
    images = np.stack([s["image"].numpy() for s in samples])
    labels = {t: np.stack([np.asarray(s[t]) for s in samples]) for t in names}
    # The artifacts live in the validate stage's parent (the export stage).
    export_dir = Path(
        ((read_manifest(validate_dir) or {}).get("parent") or {}).get("dir", validate_dir.parent / "export")
    )
    exported = read_manifest(export_dir) or {}
    for r in summary["targets"]:
        info = (exported.get("targets") or {}).get(r["target"], {})
        spec = get_target(r["target"])
        if r.get("status") != "passed" or not spec.runs_here or "path" not in info:
            continue
        runtime = spec.load(export_dir / info["path"], threads=threads, target=r["target"])
        outs = [outputs_at_input_size(runtime.run(images[i : i + 1]), images.shape[-2:]) for i in range(n)]
        preds = {
            t.name: activate(t, torch.from_numpy(np.concatenate([o[t.name] for o in outs]))).numpy() for t in tasks
        }
        figures.append(
            (
                f"{r['target']}: predictions on the first {n} validation scenes",
                predictions_png(images, preds, labels, names, IMAGENET_MEAN, IMAGENET_STD, r["target"]),
            )
        )
    return figures
