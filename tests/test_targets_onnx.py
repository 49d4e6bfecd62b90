"""ONNX export, ONNX Runtime, validation (accuracy + parity + latency) and the report.

One random-init ``baseline-xs`` (semseg 13 classes, depth, normals, edge) at
32x48 is exported once per module (export takes a few seconds); the rest of
the tests reuse the file.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402

from edgemt.config import ParityThresholds, ValidateConfig  # noqa: E402
from edgemt.models.registry import create_model  # noqa: E402
from edgemt.targets.latency import measure_latency, onnx_peak_memory, peak_rss_mb  # noqa: E402
from edgemt.targets.onnx import OnnxExportError, export_onnx, make_metadata, read_onnx_metadata  # noqa: E402
from edgemt.targets.report import export_failed_entry, summary_skeleton, write_report  # noqa: E402
from edgemt.targets.runtime import OnnxRuntimeModel, TorchModel  # noqa: E402
from edgemt.targets.validate import validate_runtime  # noqa: E402
from edgemt.tasks import IGNORE_INDEX, resolve_tasks  # noqa: E402

H, W = 32, 48
TASK_NAMES = ["semseg", "depth", "normals", "edge"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _tasks():
    return resolve_tasks(TASK_NAMES, {"semseg": 13})


def _model() -> nn.Module:
    """Random-init baseline-xs whose heads are rescaled so that parity sees non-trivial maps.

    Untouched random heads give near-constant outputs (depth <= 0 everywhere,
    edge > 0.5 everywhere), which would test the fallbacks, not the parity.
    """
    torch.manual_seed(0)
    model = create_model("baseline-xs", tasks=_tasks()).eval()
    x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for head in model.heads.values():
            head[1].weight.mul_(30.0)
            head[1].bias.zero_()
        out = model(x)
        model.heads["depth"][1].bias.fill_(1.0 - out["depth"].mean().item())  # mostly positive depth
        model.heads["edge"][1].bias.fill_(-out["edge"].mean().item())  # about half the pixels are edges
    return model


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return _model()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """A dynamic-batch export with full metadata."""
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    meta = make_metadata(
        model.tasks,
        input_size=(H, W),
        mean=MEAN,
        std=STD,
        classes={"semseg": [f"c{i}" for i in range(13)]},
        deploy_form="dense",
        source_hash="abc123",
        model_name="baseline-xs",
    )
    out = export_onnx(model, path, input_size=(H, W), batch=None, metadata=meta)
    return out


def _dataset(n: int = 3, seed: int = 0) -> list[dict]:
    """Random images and labels in the conventions of edgemt.tasks (unbatched)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        semseg = torch.randint(0, 13, (H, W), generator=g)
        semseg[:2] = IGNORE_INDEX
        depth = torch.rand(1, H, W, generator=g) * 5 + 0.5
        depth[:, :, :3] = 0.0  # invalid
        normals = torch.nn.functional.normalize(torch.randn(3, H, W, generator=g), dim=0)
        edge = torch.zeros(1, H, W)
        edge[:, H // 2, :] = 1.0
        edge[:, :, W // 3] = 1.0
        items.append(
            {
                "image": torch.randn(3, H, W, generator=g),
                "id": f"img{i}",
                "semseg": semseg,
                "depth": depth,
                "normals": normals,
                "edge": edge,
            }
        )
    return items


# --------------------------------------------------------------------------- export


def test_export_file_checker_and_metadata(exported, model):
    assert exported.is_file()
    proto = onnx.load(str(exported))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == TASK_NAMES
    # no temporary files left beside the artifact
    assert sorted(p.name for p in exported.parent.iterdir()) == ["model.onnx"]

    meta = read_onnx_metadata(exported)
    assert meta["tasks"] == [
        {"name": t.name, "channels": t.channels, "activation": t.activation, "metric": t.metric} for t in model.tasks
    ]
    assert meta["input_size"] == [H, W]
    assert meta["normalisation"] == {"mean": list(MEAN), "std": list(STD)}
    assert meta["classes"]["semseg"][12] == "c12"
    assert meta["deploy_form"] == "dense"
    assert meta["source_hash"] == "abc123"
    assert meta["batch"] == "dynamic"
    assert "torch" in meta["tool_versions"] and "onnx" in meta["tool_versions"]


def test_onnxruntime_matches_pytorch_and_dynamic_batch(exported, model):
    rt = OnnxRuntimeModel(exported, threads=1)
    assert [t.name for t in rt.tasks] == TASK_NAMES
    assert rt.tasks[0].channels == 13
    assert rt.metadata["source_hash"] == "abc123"  # via ORT's custom_metadata_map
    assert rt.fixed_batch is None and rt.input_size == (H, W)
    ref = TorchModel(model)
    for batch in (1, 2):
        x = np.random.default_rng(batch).standard_normal((batch, 3, H, W)).astype(np.float32)
        a, b = rt.run(x), ref.run(x)
        assert list(a) == TASK_NAMES
        for name in TASK_NAMES:
            assert a[name].shape == b[name].shape == (batch, _tasks()[TASK_NAMES.index(name)].channels, H, W)
            assert np.abs(a[name] - b[name]).max() <= 1e-4, name


def test_static_batch_export(model, tmp_path):
    """A fixed batch (2 here) is kept in the graph; validation still runs image by image."""
    path = export_onnx(model, tmp_path / "static.onnx", input_size=(H, W), batch=2, metadata={"note": "static"})
    rt = OnnxRuntimeModel(path)
    assert rt.fixed_batch == 2
    meta = read_onnx_metadata(path)
    assert meta["batch"] == 2 and meta["opset"] == 18 and meta["note"] == "static"
    assert meta["input_size"] == [H, W]  # filled in from the export arguments
    assert [t["name"] for t in meta["tasks"]] == TASK_NAMES
    assert model.training is False
    x = np.random.default_rng(0).standard_normal((2, 3, H, W)).astype(np.float32)
    ref = TorchModel(model).run(x)
    assert all(np.abs(rt.run(x)[k] - ref[k]).max() <= 1e-4 for k in TASK_NAMES)
    pytest.importorskip("edgemt.metrics")
    res = validate_runtime(rt, model, _dataset(1), _tasks(), cfg=_cfg(), measure_memory=False)
    assert res["status"] == "passed" and res["latency"]["batch"] == 2


@torch.library.custom_op("edgemt_test::opaque", mutates_args=())
def _opaque(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_opaque.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _Unexportable(nn.Module):
    """A custom op without an ONNX translation: conversion must fail."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks = resolve_tasks(["depth"])
        self.conv = nn.Conv2d(3, 1, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"depth": _opaque(self.conv(x))}


def test_failed_export_leaves_no_file(tmp_path, model):
    path = tmp_path / "bad.onnx"
    with pytest.raises(OnnxExportError):
        export_onnx(_Unexportable().eval(), path, input_size=(8, 8), metadata={})
    assert list(tmp_path.iterdir()) == []

    # an existing artifact is kept unchanged when a re-export fails
    path.write_bytes(b"previous")
    with pytest.raises(OnnxExportError):
        export_onnx(_Unexportable().eval(), path, input_size=(8, 8), metadata={})
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["bad.onnx"]

    # an unwritable destination (its parent is a file)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OnnxExportError):
        export_onnx(model, blocker / "m.onnx", input_size=(H, W), metadata={})


# --------------------------------------------------------------------------- latency


def test_latency_keys_and_order():
    lat = measure_latency(lambda: sum(range(1000)), warmup=2, runs=15)
    assert set(lat) >= {"median_ms", "p90_ms", "mean_ms", "min_ms", "runs", "warmup"}
    assert lat["runs"] == 15 and lat["warmup"] == 2
    assert lat["p90_ms"] >= lat["median_ms"] >= lat["min_ms"] >= 0
    assert peak_rss_mb() > 10


def test_onnx_peak_memory(exported):
    mem = onnx_peak_memory(exported, (1, 3, H, W))
    assert "error" not in mem, mem
    assert mem["peak_rss_mb"] >= mem["baseline_mb"] > 0
    assert mem["model_mb"] >= 0


# --------------------------------------------------------------------------- validation


def _cfg(**kw) -> ValidateConfig:
    return ValidateConfig(threads=1, warmup=1, runs=5, **kw)


def test_validate_runtime_passes(exported, model):
    pytest.importorskip("edgemt.metrics")
    rt = OnnxRuntimeModel(exported, threads=1)
    res = validate_runtime(rt, model, _dataset(3), _tasks(), cfg=_cfg(), macs=123456)
    json.dumps(res, allow_nan=False)  # strictly JSON-serialisable
    assert res["status"] == "passed", res["reasons"]
    assert res["reasons"] == []
    assert res["target"] == "onnx-fp32" and res["precision"] == "fp32"
    assert res["n_images"] == 3 and res["threads"] == 1 and res["macs"] == 123456
    th = ParityThresholds()
    assert res["parity"]["semseg"]["agreement"] >= th.semseg_agreement
    assert res["parity"]["depth"]["rel_err"] <= th.depth_rel_err
    assert res["parity"]["normals"]["mean_deg"] <= th.normals_deg
    assert res["parity"]["edge"]["boundary_f"] >= th.edge_f
    assert set(res["metrics"]) == set(TASK_NAMES) == set(res["metrics_pytorch"])
    for task, d in res["delta"].items():
        for k, v in d.items():
            assert abs(v) < 1e-3, (task, k, v)
    lat = res["latency"]
    assert lat["p90_ms"] >= lat["median_ms"] > 0 and lat["runs"] == 5
    assert res["size_mb"] > 0 and res["size_bytes"] == os.path.getsize(exported)
    assert res["peak_rss_mb"] > 0

    # max_images limits the split
    res2 = validate_runtime(rt, model, _dataset(3), _tasks(), cfg=_cfg(max_images=1), measure_memory=False)
    assert res2["n_images"] == 1


class _Perturbed:
    """Wraps a runtime and corrupts the outputs of ``tasks``.

    semseg: classes rolled by one; depth/normals: unit Gaussian noise on the
    raw output; edge: the map shifted by 6 pixels.
    """

    def __init__(self, inner: OnnxRuntimeModel, tasks: set[str]) -> None:
        self.inner = inner
        self.perturb = tasks
        self.rng = np.random.default_rng(0)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        out = dict(self.inner.run(images))
        for name in self.perturb:
            if name == "semseg":
                out[name] = np.roll(out[name], 1, axis=1)
            elif name == "edge":
                out[name] = np.roll(out[name], 6, axis=-1)
            else:
                out[name] = out[name] + self.rng.standard_normal(out[name].shape).astype(np.float32)
        return out


@pytest.mark.parametrize("broken", [{"semseg", "depth", "normals"}, {"edge"}])
def test_validate_runtime_detects_perturbed_runtime(exported, model, broken):
    pytest.importorskip("edgemt.metrics")
    bad = _Perturbed(OnnxRuntimeModel(exported, threads=1), broken)
    res = validate_runtime(bad, model, _dataset(2), _tasks(), cfg=_cfg(), target="onnx-broken", measure_memory=False)
    assert res["status"] == "failed_validation"
    assert res["target"] == "onnx-broken"
    named = {r.split()[0] for r in res["reasons"]}
    assert named == broken, res["reasons"]  # untouched outputs still agree
    if "semseg" in broken:
        assert any("semseg_agreement >= 0.99" in r for r in res["reasons"])


def test_validate_unknown_precision(exported, model):
    from edgemt.errors import ConfigError

    rt = OnnxRuntimeModel(exported)
    with pytest.raises(ConfigError, match="int4"):
        validate_runtime(rt, model, _dataset(1), _tasks(), cfg=_cfg(), precision="int4")


# --------------------------------------------------------------------------- report


def test_write_report(tmp_path, exported, model):
    pytest.importorskip("edgemt.metrics")
    rt = OnnxRuntimeModel(exported, threads=1)
    res = validate_runtime(rt, model, _dataset(2), _tasks(), cfg=_cfg(), measure_memory=False)
    summary = summary_skeleton("demo-run", "synthetic", _tasks())
    summary["stages"].append(
        {
            "stage": "teacher",
            "model": "baseline-xs",
            "params": sum(p.numel() for p in model.parameters()),
            "macs": 2_500_000,
            "train_time_s": 12.5,
        }
    )
    summary["targets"] += [res, export_failed_entry("tflite-int8", "int8", "converter crashed: boom")]
    summary["not_executed"].append("coreml-fp16: Core ML predict needs macOS")
    paths = write_report(tmp_path / "report", summary)
    assert paths["json"].is_file() and paths["md"].is_file()
    assert json.loads(paths["json"].read_text())["run"] == "demo-run"
    md = paths["md"].read_text()
    assert "# EdgeMT report: demo-run" in md
    assert "synthetic" in md and "semseg, depth, normals, edge" in md
    row = next(line for line in md.splitlines() if line.startswith("| onnx-fp32 |"))
    assert "passed" in row and f"{res['latency']['median_ms']:.4g}" in row
    assert "| tflite-int8 | export failed |" in md
    assert "converter crashed: boom" in md
    assert "| teacher | baseline-xs |" in md
    assert "## What was not executed here" in md and "Core ML predict needs macOS" in md
    assert "onnxruntime" in md
    assert not [p for p in (tmp_path / "report").iterdir() if p.name.startswith(".")]


def test_report_without_metrics(tmp_path):
    summary = summary_skeleton("empty", "nyud", ["semseg", "depth"])
    paths = write_report(tmp_path, summary)
    md = paths["md"].read_text()
    assert "No targets were exported." in md and "No model stages recorded." in md
    assert math.isfinite(len(md))


def test_onnx_int8_export_is_qdq_per_channel_and_close_to_fp32(tmp_path):
    import onnx

    from edgemt.compress.reparam import reparameterize
    from edgemt.models import create_model
    from edgemt.targets.onnx import read_onnx_metadata
    from edgemt.targets.registry import get_target
    from edgemt.targets.runtime import OnnxRuntimeModel
    from edgemt.tasks import resolve_tasks

    torch.manual_seed(0)
    tasks = resolve_tasks(["semseg", "depth", "normals", "edge"], {"semseg": 5})
    model = create_model("student-xs", tasks=tasks).eval()
    reparameterize(model, "factorized", input_size=(64, 64))
    spec = get_target("onnx-int8")
    assert spec.needs_calibration and spec.precision == "int8"
    calib = [np.random.default_rng(i).standard_normal((1, 3, 64, 64)).astype(np.float32) for i in range(8)]
    path = spec.export(
        model, tmp_path / "m.onnx", input_size=(64, 64), metadata={"deploy_form": "factorized"}, calibration=calib
    )
    proto = onnx.load(str(path))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    # Per-channel weights: some DequantizeLinear has a 1-D scale with more than one entry.
    inits = {i.name: i for i in proto.graph.initializer}
    per_channel = [
        n
        for n in proto.graph.node
        if n.op_type == "DequantizeLinear"
        and n.input[1] in inits
        and len(inits[n.input[1]].dims) == 1
        and inits[n.input[1]].dims[0] > 1
    ]
    assert per_channel
    # The heads' upsampling to the input size stays float: no quantize/dequantize pair at full resolution.
    producers = {o: n for n in proto.graph.node for o in n.output}
    assert {producers[o.name].op_type for o in proto.graph.output} == {"Resize"}
    for o in proto.graph.output:
        assert not any(o.name in n.input for n in proto.graph.node), "a graph output feeds another node"
    meta = read_onnx_metadata(path)
    assert meta["deploy_form"] == "factorized"
    assert meta["quantization"]["calibration_images"] == 8
    assert meta["quantization"]["float_output_resizes"] == len(tasks)
    assert meta["quantization"]["weights"].startswith("int8, per-channel")
    # The int8 graph tracks the fp32 model on an in-distribution input.
    x = calib[0]
    got = OnnxRuntimeModel(path, threads=1).run(x)
    with torch.no_grad():
        ref = model(torch.from_numpy(x))
    for t in tasks:
        err = np.abs(got[t.name] - ref[t.name].numpy()).mean() / (np.abs(ref[t.name].numpy()).mean() + 1e-6)
        assert err < 0.2, (t.name, err)


def test_onnx_int8_input_conv_in_float_holds_the_dequantized_weights(tmp_path):
    import onnx
    from onnx import numpy_helper

    from edgemt.compress.reparam import reparameterize
    from edgemt.models import create_model
    from edgemt.targets.onnx import read_onnx_metadata
    from edgemt.targets.onnx_int8 import export_onnx_int8
    from edgemt.targets.runtime import OnnxRuntimeModel
    from edgemt.tasks import resolve_tasks

    torch.manual_seed(0)
    tasks = resolve_tasks(["semseg", "depth"], {"semseg": 5})
    model = create_model("student-xs", tasks=tasks).eval()
    reparameterize(model, "factorized", input_size=(64, 64))
    calib = [np.random.default_rng(i).standard_normal((1, 3, 64, 64)).astype(np.float32) for i in range(4)]
    files = {
        mode: export_onnx_int8(
            model, tmp_path / f"{mode}.onnx", input_size=(64, 64), metadata={}, calibration=calib, input_conv=mode
        )
        for mode in ("int8", "float")
    }
    protos = {m: onnx.load(str(f)) for m, f in files.items()}
    made_by = {m: {o: n for n in p.graph.node for o in n.output} for m, p in protos.items()}
    inits = {m: {t.name: t for t in p.graph.initializer} for m, p in protos.items()}

    def first_conv(m):
        return next(n for n in protos[m].graph.node if n.op_type == "Conv" and n.name == first_name)

    first_name = read_onnx_metadata(files["float"])["quantization"]["input_conv"]["node"]
    q8, f32 = first_conv("int8"), first_conv("float")
    assert made_by["int8"][q8.input[0]].op_type == "DequantizeLinear" and f32.input[0] == "image"
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "image" for n in protos["float"].graph.node)
    # The float weights are the int8 file's weights, dequantized (per output channel).
    dq = made_by["int8"][q8.input[1]]
    q, scale = (numpy_helper.to_array(inits["int8"][dq.input[i]]).astype(np.float64) for i in (0, 1))
    w = numpy_helper.to_array(inits["float"][f32.input[1]])
    assert w.dtype == np.float32 and np.allclose(w, q * scale.reshape(-1, 1, 1, 1), rtol=0, atol=1e-7)
    assert read_onnx_metadata(files["int8"])["quantization"]["input_conv"] == {"precision": "int8"}
    # Both run and agree with each other within int8 error.
    x = calib[0]
    a, b = (OnnxRuntimeModel(files[m], threads=1).run(x) for m in ("int8", "float"))
    for t in tasks:
        err = np.abs(a[t.name] - b[t.name]).mean() / (np.abs(a[t.name]).mean() + 1e-6)
        assert err < 0.1, (t.name, err)
    with pytest.raises(ValueError, match="int8_input_conv must be one of"):
        export_onnx_int8(
            model, tmp_path / "x.onnx", input_size=(64, 64), metadata={}, calibration=calib, input_conv="fp16"
        )
    assert not (tmp_path / "x.onnx").exists()


def test_onnx_int8_without_calibration_fails_clearly(tmp_path):
    from edgemt.models import create_model
    from edgemt.targets.onnx import OnnxExportError
    from edgemt.targets.registry import get_target
    from edgemt.tasks import resolve_tasks

    model = create_model("baseline-xs", tasks=resolve_tasks(["depth"])).eval()
    with pytest.raises(OnnxExportError, match="calibration"):
        get_target("onnx-int8").export(model, tmp_path / "m.onnx", input_size=(32, 32), metadata={}, calibration=[])
    assert not (tmp_path / "m.onnx").exists()


def test_html_report_renders_in_headless_chromium(tmp_path):
    """The self-contained page renders in a real browser (Debian's chromium) to a non-blank screenshot."""
    import shutil
    import subprocess

    from edgemt.targets.report import write_report
    from edgemt.targets.report_html import accuracy_latency_png, predictions_png

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    summary = summary_skeleton("html-check", "synthetic", ["semseg", "depth"])
    summary["stages"] = [{"stage": "teacher", "model": "m", "metrics": {"semseg": {"miou": 40.0}}, "delta_m_%": 0.0}]
    chart = accuracy_latency_png(
        [
            {"label": "teacher", "latency_ms": 5.0, "delta_m": 0.0, "kind": "stage"},
            {"label": "onnx-int8", "latency_ms": 1.0, "delta_m": -2.0, "kind": "target"},
        ]
    )
    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, 3, 32, 48)).astype(np.float32)
    preds = {"semseg": rng.random((2, 5, 32, 48)), "depth": rng.random((2, 1, 32, 48))}
    labels = {"semseg": rng.integers(0, 5, (2, 32, 48)), "depth": rng.random((2, 1, 32, 48))}
    grid = predictions_png(images, preds, labels, ["semseg", "depth"], (0.5,) * 3, (0.25,) * 3, "onnx-fp32")
    paths = write_report(tmp_path, summary, figures=[("chart", chart), ("grid", grid)])
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 2 and "<table>" in page
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium); the page was built but not rendered")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=1200,1600",
            f"--screenshot={shot}",
            paths["html"].as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (1600, 1200)
    assert pixels.std() > 10  # text, tables and figures, not a blank page


def test_html_report_renders_markdown_emphasis_and_escapes_the_rest():
    from edgemt.targets.report_html import render_html

    page = render_html("# r\n\n- **onnx-int8**: uses `qat` <scales>\nplain **bold** & text\n", [])
    assert "<li><b>onnx-int8</b>: uses <code>qat</code> &lt;scales&gt;</li>" in page
    assert "<p>plain <b>bold</b> &amp; text</p>" in page and "**" not in page
