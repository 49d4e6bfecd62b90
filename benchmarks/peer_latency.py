"""The demo student (all tasks) against torchvision's LR-ASPP MobileNetV3-Large
(semantic segmentation only), same input size, runtime, precision and threads.

Measured in one run, 1 thread, batch 1, with ONNX Runtime (fp32; int8 static
QDQ) and LiteRT (XNNPACK; fp32 and int8 through litert-torch's pt2e), both
models calibrated on the same training images; for a run with a ``qat``
stage, also the student's QAT int8 files (what the pipeline ships, with the
recipe's ``export.int8_input_conv``), in the row of the output stride the QAT
graph ends at. Student and peer are compared at full resolution (output
stride 1); a run that deploys at ``deploy.output_stride: 4`` also gets a
student row at that stride. Reports the student/peer latency ratio per runtime and precision (goal: at most 1.5x for all tasks
against one), the int8/fp32 ratio per model and runtime (goal: at most 0.6),
and, from the run's validation, the int8 accuracy drop in Delta_m against
fp32 per runtime (goal: at most 1 point).

    python benchmarks/peer_latency.py --run runs/demo --sizes 96x128 256x320
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import numpy as np
import torch
from _common import RESULTS, print_table, write_json
from torch import nn

from edgemt.config import load_recipe
from edgemt.data import build_dataset
from edgemt.io import read_json
from edgemt.metrics import delta_m
from edgemt.models import graph_output_stride, load_model
from edgemt.models.profile import count_macs
from edgemt.targets.latency import measure_latency
from edgemt.targets.onnx import export_onnx
from edgemt.targets.onnx_int8 import export_onnx_int8, quantize_onnx_int8
from edgemt.targets.runtime import OnnxRuntimeModel
from edgemt.targets.tflite import TFLiteModel, export_tflite


class _Peer(nn.Module):
    """LR-ASPP with one named output, like a single-task EdgeMT model (for export_onnx)."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        from torchvision.models.segmentation import lraspp_mobilenet_v3_large

        from edgemt.tasks import get_task

        self.net = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=classes)
        self.tasks = [get_task("semseg").with_channels(classes)]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"semseg": self.net(x)["out"]}


def _latency(path: Path, shape, runs: int, warmup: int = 10) -> float:
    rt = TFLiteModel(path, threads=1) if path.suffix == ".tflite" else OnnxRuntimeModel(path, threads=1)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return measure_latency(lambda: rt.run(x), warmup=warmup, runs=runs)["median_ms"]


def _calibration(recipe, size, n: int) -> list[np.ndarray]:
    train = build_dataset(recipe.data, "train", train=False)
    out = []
    for i in range(min(n, len(train))):
        x = torch.nn.functional.interpolate(train[i]["image"][None], size=size, mode="bilinear", align_corners=False)
        out.append(x.numpy())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo", help="a run with a reparam (or student) stage")
    ap.add_argument("--sizes", nargs="+", default=["96x128", "256x320"], help="input sizes HxW")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--calibration-images", type=int, default=32)
    ap.add_argument("--out", default=str(RESULTS / "peer_latency.json"))
    args = ap.parse_args()
    run = Path(args.run)
    recipe = load_recipe(run)
    model_dir = run / "reparam" if (run / "reparam" / "arch.json").is_file() else run / "student"
    student = load_model(model_dir).eval()
    qat = None
    if (run / "qat" / "qat.json").is_file():  # the int8 targets of such a run come from QAT
        from edgemt.compress.qat import load_qat

        qat_float, qat = load_qat(run / "qat")
    stride = recipe.deploy.output_stride
    classes = next(t.channels for t in student.tasks if t.name == "semseg")
    peer = _Peer(classes).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size_s in args.sizes:
            size = tuple(int(v) for v in size_s.lower().split("x"))
            calib = _calibration(recipe, size, args.calibration_images)
            lat = {}
            # Student and peer both end at full resolution (output stride 1): the fair comparison. A run
            # that deploys at stride 4 also gets a student row at that stride (its QAT graph ends there), whose
            # latency excludes the host's last upsampling.
            entries = [("student", 1), ("peer", 1)] + ([("student", stride)] if stride != 1 else [])
            row_of = {}
            for name, s in entries:
                model = student if name == "student" else peer
                files = {}
                tag = f"{name}{size_s}-s{s}"
                with graph_output_stride(model, s) if name == "student" else contextlib.nullcontext():
                    files["ort_fp32"] = export_onnx(model, tmp / f"{tag}.onnx", input_size=size)
                    files["ort_int8"] = quantize_onnx_int8(files["ort_fp32"], tmp / f"{tag}-int8.onnx", calib)
                    for p in ("fp32", "int8"):
                        files[f"litert_{p}"] = export_tflite(
                            model,
                            tmp / f"{tag}-{p}.tflite",
                            precision=p,
                            input_size=size,
                            calibration=calib if p == "int8" else None,
                        )
                if name == "student" and qat is not None and qat.output_stride == s:
                    files["ort_int8_qat"] = export_onnx_int8(
                        qat_float,
                        tmp / f"{tag}-qat.onnx",
                        input_size=size,
                        metadata={},
                        qat=qat,
                        input_conv=recipe.export.int8_input_conv,
                    )
                    files["litert_int8_qat"] = export_tflite(
                        qat_float, tmp / f"{tag}-qat.tflite", precision="int8", input_size=size, qat=qat
                    )
                lat[name, s] = {k: _latency(f, (1, 3, *size), args.runs) for k, f in files.items()}
                t = lat[name, s]
                row = {
                    "size": size_s,
                    "model": f"{model_dir.name} {getattr(model, 'registry_name', '')}".strip()
                    + ("" if s == 1 else f", output stride {s}")
                    if name == "student"
                    else "lraspp_mobilenet_v3_large (semseg only)",
                    "tasks": len(model.tasks),
                    "GMACs": round(count_macs(model, size) / 1e9, 4),
                }
                for rt in ("ort", "litert"):
                    row[f"{rt}_fp32_ms"] = round(t[f"{rt}_fp32"], 3)
                    row[f"{rt}_int8_ms"] = round(t[f"{rt}_int8"], 3)
                    row[f"{rt} int8/fp32"] = round(t[f"{rt}_int8"] / t[f"{rt}_fp32"], 3)
                    if f"{rt}_int8_qat" in t:
                        row[f"{rt}_int8_qat_ms"] = round(t[f"{rt}_int8_qat"], 3)
                        row[f"{rt} int8 QAT/fp32"] = round(t[f"{rt}_int8_qat"] / t[f"{rt}_fp32"], 3)
                rows.append(row)
                row_of[name, s] = row
            for k in ("ort_fp32", "ort_int8", "litert_fp32", "litert_int8"):
                row_of["student", 1][f"student/peer {k}"] = round(lat["student", 1][k] / lat["peer", 1][k], 3)
    print_table(rows, list(dict.fromkeys(k for r in rows for k in r)))
    summary: dict = {"rows": rows, "threads": 1, "runtimes": ["onnxruntime", "litert (xnnpack)"]}
    results = run / "validate" / "results.json"
    if results.is_file():
        by = {r["target"]: r for r in read_json(results)}
        for fmt in ("onnx", "tflite"):
            fp32, int8 = by.get(f"{fmt}-fp32"), by.get(f"{fmt}-int8")
            if fp32 and int8 and fp32.get("metrics") and int8.get("metrics"):
                drop = -delta_m(int8["metrics"], fp32["metrics"], student.tasks)
                summary[f"{fmt}_int8_delta_m_drop_points"] = round(drop, 3)
                print(
                    f"{fmt}-int8 accuracy drop vs {fmt}-fp32 (validation split): {drop:+.3f} points of Delta_m (goal <= 1)"
                )
    write_json(args.out, summary)


if __name__ == "__main__":
    main()
