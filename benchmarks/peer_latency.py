"""The demo student (all tasks) against torchvision's LR-ASPP MobileNetV3-Large
(semantic segmentation only), same input size, runtime, precision and threads.

Measured in one run with ONNX Runtime (1 thread, batch 1) in fp32 and int8
(static QDQ, calibrated on the same training images for both models). Reports
the student/peer latency ratio per precision (goal: at most 1.5x for all
tasks against one), the int8/fp32 ratio per model (goal: at most 0.6), and,
from the run's validation, the int8 accuracy drop in Delta_m against fp32
(goal: at most 1 point). LiteRT rows come with the TFLite targets (issue 5).

    python benchmarks/peer_latency.py --run runs/demo --sizes 96x128 256x320
"""

from __future__ import annotations

import argparse
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
from edgemt.models import load_model
from edgemt.models.profile import count_macs
from edgemt.targets.latency import measure_latency
from edgemt.targets.onnx import export_onnx
from edgemt.targets.onnx_int8 import quantize_onnx_int8
from edgemt.targets.runtime import OnnxRuntimeModel


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
    rt = OnnxRuntimeModel(path, threads=1)
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
    classes = next(t.channels for t in student.tasks if t.name == "semseg")
    peer = _Peer(classes).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size_s in args.sizes:
            size = tuple(int(v) for v in size_s.lower().split("x"))
            calib = _calibration(recipe, size, args.calibration_images)
            lat = {}
            for name, model in (("student", student), ("peer", peer)):
                fp32 = export_onnx(model, tmp / f"{name}{size_s}.onnx", input_size=size)
                int8 = quantize_onnx_int8(fp32, tmp / f"{name}{size_s}-int8.onnx", calib)
                lat[name] = {p: _latency(f, (1, 3, *size), args.runs) for p, f in (("fp32", fp32), ("int8", int8))}
                rows.append(
                    {
                        "size": size_s,
                        "model": f"{model_dir.name} {getattr(model, 'registry_name', '')}".strip()
                        if name == "student"
                        else "lraspp_mobilenet_v3_large (semseg only)",
                        "tasks": len(model.tasks),
                        "GMACs": round(count_macs(model, size) / 1e9, 4),
                        "ort_fp32_ms": round(lat[name]["fp32"], 3),
                        "ort_int8_ms": round(lat[name]["int8"], 3),
                        "int8/fp32": round(lat[name]["int8"] / lat[name]["fp32"], 3),
                    }
                )
            for p in ("fp32", "int8"):
                rows[-2][f"student/peer {p}"] = round(lat["student"][p] / lat["peer"][p], 3)
    print_table(rows, list(dict.fromkeys(k for r in rows for k in r)))
    summary: dict = {"rows": rows, "threads": 1, "runtime": "onnxruntime"}
    results = run / "validate" / "results.json"
    if results.is_file():
        by = {r["target"]: r for r in read_json(results)}
        if "onnx-fp32" in by and "onnx-int8" in by and by["onnx-int8"].get("metrics"):
            drop = -delta_m(by["onnx-int8"]["metrics"], by["onnx-fp32"]["metrics"], student.tasks)
            summary["int8_delta_m_drop_points"] = round(drop, 3)
            print(f"int8 accuracy drop vs fp32 (run's validation split): {drop:+.3f} points of Delta_m (goal <= 1)")
    write_json(args.out, summary)


if __name__ == "__main__":
    main()
