"""TFLite (litert-torch and onnx2tf routes) and Core ML targets on a tiny student.

The student is random-init with its heads rescaled so that every task's map
is non-trivial (varied argmaxes, positive depth, about half the pixels edges):
parity on near-constant outputs would test nothing. It is reparameterized to
the factorized form, as the exporter does for static-weight targets.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnx")

from edgemt.config import ValidateConfig  # noqa: E402
from edgemt.errors import DataError  # noqa: E402
from edgemt.models.registry import create_model  # noqa: E402
from edgemt.targets.onnx import make_metadata  # noqa: E402
from edgemt.targets.registry import get_target  # noqa: E402
from edgemt.targets.runtime import TorchModel  # noqa: E402
from edgemt.targets.validate import validate_runtime  # noqa: E402
from edgemt.tasks import IGNORE_INDEX, resolve_tasks  # noqa: E402

H, W = 64, 64
TASK_NAMES = ["semseg", "depth", "normals", "edge"]


def _tasks():
    return resolve_tasks(TASK_NAMES, {"semseg": 6})


def _images(n: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, H, W, generator=g).numpy()


def _dataset(n: int = 3, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed + 100)
    items = []
    for i, image in enumerate(_images(n, seed)):
        semseg = torch.randint(0, 6, (H, W), generator=g)
        semseg[:2] = IGNORE_INDEX
        edge = torch.zeros(1, H, W)
        edge[:, H // 2, :] = 1.0
        items.append(
            {
                "image": torch.from_numpy(image),
                "id": f"img{i}",
                "semseg": semseg,
                "depth": torch.rand(1, H, W, generator=g) * 5 + 0.5,
                "normals": torch.nn.functional.normalize(torch.randn(3, H, W, generator=g), dim=0),
                "edge": edge,
            }
        )
    return items


def _student() -> nn.Module:
    from edgemt.compress.reparam import reparameterize

    torch.manual_seed(0)
    model = create_model("student-xs", tasks=_tasks()).eval()
    x = torch.from_numpy(_images(4, 1))
    with torch.no_grad():
        for head in model.heads.values():
            head[1].weight.mul_(30.0)
            head[1].bias.zero_()
        out = model(x)
        model.heads["depth"][1].bias.fill_(1.0 - out["depth"].mean().item())
        model.heads["edge"][1].bias.fill_(-out["edge"].mean().item())
    reparameterize(model, "factorized", input_size=(H, W))
    return model


@pytest.fixture(scope="module")
def student() -> nn.Module:
    return _student()


@pytest.fixture(scope="module")
def calibration() -> list[np.ndarray]:
    return [_images(1, 50 + i) for i in range(16)]


def _meta(model) -> dict[str, str]:
    return make_metadata(
        model.tasks,
        input_size=(H, W),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        classes={"semseg": [f"c{i}" for i in range(6)]},
        deploy_form="factorized",
        source_hash="abc123",
        model_name="student-xs",
    )


def _export(name: str, model, path, calibration, route: str | None = None):
    spec = get_target(name)
    kw = {"calibration": calibration} if spec.needs_calibration else {}
    if route:
        kw["route"] = route
    return spec.export(model, path, input_size=(H, W), metadata=_meta(model), **kw)


# ------------------------------------------------------------------------------------------ TFLite


@pytest.fixture(scope="module")
def tflite_files(student, calibration, tmp_path_factory) -> dict[str, object]:
    pytest.importorskip("litert_torch")
    d = tmp_path_factory.mktemp("tflite")
    return {p: _export(f"tflite-{p}", student, d / f"{p}.tflite", calibration) for p in ("fp32", "fp16", "int8")}


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tflite_export_load_run_and_parity(precision, student, tflite_files):
    name = f"tflite-{precision}"
    spec = get_target(name)
    assert spec.static_weights and spec.runtime == "litert"
    rt = spec.load(tflite_files[precision], threads=1, target=name)
    assert rt.input_size == (H, W) and rt.fixed_batch == 1
    assert [t.name for t in rt.tasks] == TASK_NAMES and rt.tasks[0].channels == 6
    # litert-torch's int8 graphs take and return int8: the runtime quantizes and dequantizes.
    assert (rt.input_dtype == np.int8) == (precision == "int8")
    out = rt.run(_images(1, 7))
    assert {k: v.shape for k, v in out.items()} == {
        "semseg": (1, 6, H, W),
        "depth": (1, 1, H, W),
        "normals": (1, 3, H, W),
        "edge": (1, 1, H, W),
    }
    assert all(v.dtype == np.float32 for v in out.values())
    res = validate_runtime(
        rt, student, _dataset(3), _tasks(), cfg=ValidateConfig(threads=1, warmup=1, runs=3), precision=precision
    )
    json.dumps(res, allow_nan=False)
    assert res["status"] == "passed", res["reasons"]
    assert res["latency"]["median_ms"] > 0 and res["size_bytes"] == tflite_files[precision].stat().st_size
    assert res["memory"].get("model_mb") is not None, res["memory"]  # measured in a child process with LiteRT
    if precision == "fp32":
        ref = TorchModel(student).run(_images(1, 7))
        for k in TASK_NAMES:
            assert np.abs(out[k] - ref[k]).max() <= 1e-4 * max(1.0, np.abs(ref[k]).max())


@pytest.mark.slow
def test_tflite_sizes_and_metadata(tflite_files):
    from edgemt.targets.tflite import read_tflite_metadata

    sizes = {p: f.stat().st_size for p, f in tflite_files.items()}
    # fp16 weights halve the file, int8 quarters it (within the graph's non-weight overhead).
    assert 0.4 < sizes["fp16"] / sizes["fp32"] < 0.6
    assert 0.2 < sizes["int8"] / sizes["fp32"] < 0.4
    for f in tflite_files.values():
        meta = read_tflite_metadata(f)
        assert meta["edgemt.format"] == "edgemt-tflite/1" and meta["converter"] == "litert-torch"
        assert meta["deploy_form"] == "factorized" and meta["source_hash"] == "abc123"
        assert [e["name"] for e in meta["tasks"]] == TASK_NAMES
        assert meta["input_size"] == [H, W] and meta["normalisation"]["mean"] == [0.485, 0.456, 0.406]
        assert meta["classes"]["semseg"][0] == "c0"
        assert "litert-torch" in meta["tool_versions"] and "torch" in meta["tool_versions"]
    assert read_tflite_metadata(tflite_files["int8"])["quantization"]["calibration_images"] == 16
    assert read_tflite_metadata(tflite_files["fp16"])["quantization"]["format"] == "float16 weights"


def test_tflite_metadata_embedding_replaces_and_keeps_the_model(tflite_files, tmp_path):
    from edgemt.targets.tflite import TFLiteModel, embed_tflite_metadata, read_tflite_metadata

    # The fp16 file has buffers addressed by offset after the flatbuffer: they must survive a repack.
    data = tflite_files["fp16"].read_bytes()
    again = embed_tflite_metadata(data, {"tasks": json.dumps(read_tflite_metadata(data)["tasks"]), "k": "v2"})
    meta = read_tflite_metadata(again)
    assert meta["k"] == "v2" and "converter" not in meta  # replaced, not appended
    path = tmp_path / "again.tflite"
    path.write_bytes(again)
    x = _images(1, 3)
    a = TFLiteModel(path).run(x)
    b = TFLiteModel(tflite_files["fp16"]).run(x)
    assert all(np.array_equal(a[k], b[k]) for k in TASK_NAMES)


@pytest.mark.slow
def test_tflite_routes_agree_on_fp32(student, calibration, tflite_files, tmp_path):
    pytest.importorskip("onnx2tf")
    path = _export("tflite-fp32", student, tmp_path / "o2t.tflite", calibration, route="onnx2tf")
    from edgemt.targets.tflite import TFLiteModel, read_tflite_metadata

    assert read_tflite_metadata(path)["converter"] == "onnx2tf"
    a, b = TFLiteModel(path), TFLiteModel(tflite_files["fp32"])
    assert a.input_size == b.input_size and [t.name for t in a.tasks] == [t.name for t in b.tasks]
    for seed in range(3):
        x = _images(1, 20 + seed)
        oa, ob = a.run(x), b.run(x)
        for k in TASK_NAMES:
            assert oa[k].shape == ob[k].shape
            assert np.abs(oa[k] - ob[k]).max() <= 1e-4 * max(1.0, np.abs(ob[k]).max()), k


@pytest.mark.slow
def test_tflite_int8_through_onnx2tf_passes_int8_parity(student, calibration, tmp_path):
    pytest.importorskip("onnx2tf")
    path = _export("tflite-int8", student, tmp_path / "o2t8.tflite", calibration, route="onnx2tf")
    rt = get_target("tflite-int8").load(path, threads=1, target="tflite-int8")
    assert rt.input_dtype == np.float32  # TFLiteConverter keeps float input/output, int8 inside
    res = validate_runtime(
        rt, student, _dataset(2), _tasks(), cfg=ValidateConfig(threads=1, warmup=1, runs=2), precision="int8"
    )
    assert res["status"] == "passed", res["reasons"]


@pytest.mark.slow
def test_tflite_fp32_and_fp16_share_one_conversion_of_the_same_model(student, tmp_path, monkeypatch):
    pytest.importorskip("litert_torch")
    import copy

    import edgemt.targets.tflite as tfl
    from edgemt.targets.tflite import read_tflite_metadata

    calls = []
    real = tfl._litert_fp32
    monkeypatch.setattr(tfl, "_litert_fp32", lambda *a: calls.append(1) or real(*a))
    spec32, spec16 = get_target("tflite-fp32"), get_target("tflite-fp16")
    cache: dict = {}
    kw = {"input_size": (H, W), "metadata": _meta(student), "float_cache": cache}
    f32 = spec32.export(student, tmp_path / "a.tflite", **kw)
    f16 = spec16.export(student, tmp_path / "b.tflite", **kw)
    assert len(calls) == 1
    assert 0.4 < f16.stat().st_size / f32.stat().st_size < 0.6
    assert read_tflite_metadata(f16)["quantization"]["format"] == "float16 weights"
    other = copy.deepcopy(student)  # another model object is converted again, never served from the cache
    spec16.export(other, tmp_path / "c.tflite", **kw)
    assert len(calls) == 2


def test_tflite_bad_requests_fail_clearly_and_write_nothing(student, tmp_path):
    pytest.importorskip("ai_edge_litert")
    from edgemt.targets.tflite import TFLiteExportError, TFLiteModel, export_tflite

    with pytest.raises(ValueError, match="precision must be one of"):
        export_tflite(student, tmp_path / "a.tflite", precision="int4", input_size=(H, W))
    with pytest.raises(ValueError, match="tflite_converter must be one of"):
        export_tflite(student, tmp_path / "a.tflite", precision="fp32", input_size=(H, W), route="tf2onnx")
    with pytest.raises(TFLiteExportError, match="needs calibration images"):
        export_tflite(student, tmp_path / "a.tflite", precision="int8", input_size=(H, W))
    assert list(tmp_path.iterdir()) == []
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a flatbuffer at all")
    with pytest.raises(DataError, match="bad.tflite"):
        TFLiteModel(bad)
    with pytest.raises(DataError, match="does not exist"):
        TFLiteModel(tmp_path / "missing.tflite")


# ------------------------------------------------------------------------------------------ Core ML


@pytest.fixture(scope="module")
def coreml_files(student, tmp_path_factory) -> dict[str, object]:
    pytest.importorskip("coremltools")
    d = tmp_path_factory.mktemp("coreml")
    return {p: _export(f"coreml-{p}", student, d / f"{p}.mlpackage", None) for p in ("fp16", "int8w", "pal4")}


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "int8w", "pal4"])
def test_coreml_conversion_and_program_checks(precision, coreml_files):
    from edgemt.targets.coreml import check_coreml_program, read_coreml_metadata
    from edgemt.targets.stages import artifact_size

    path = coreml_files[precision]
    assert path.is_dir() and (path / "Manifest.json").is_file()
    info = check_coreml_program(path, _tasks(), (H, W), precision=precision)
    assert info["inputs"] == {"image": [1, 3, H, W]}
    assert info["outputs"] == {
        "semseg": [1, 6, H, W],
        "depth": [1, 1, H, W],
        "normals": [1, 3, H, W],
        "edge": [1, 1, H, W],
    }
    assert info["ops"]["conv"] > 10 and info["specification_version"] >= 7
    compressed = {"fp16": None, "int8w": "constexpr_affine_dequantize", "pal4": "constexpr_lut_to_dense"}[precision]
    if compressed:
        assert info["ops"].get(compressed, 0) > 10
    else:
        assert not any(op.startswith("constexpr_") for op in info["ops"])
    meta = read_coreml_metadata(path)
    assert meta["edgemt.format"] == "edgemt-coreml/1" and meta["deploy_form"] == "factorized"
    assert [e["name"] for e in meta["tasks"]] == TASK_NAMES and meta["source_hash"] == "abc123"
    assert "coremltools" in meta["tool_versions"]
    sizes = {p: artifact_size(f) for p, f in coreml_files.items()}
    assert sizes["pal4"] < sizes["int8w"] < sizes["fp16"]


@pytest.mark.slow
def test_coreml_program_checks_name_what_is_wrong(coreml_files):
    from edgemt.targets.coreml import CoreMLExportError, check_coreml_program

    path = coreml_files["fp16"]
    with pytest.raises(CoreMLExportError, match=r"input shape \[1, 3, 64, 64\], expected \[1, 3, 32, 32\]"):
        check_coreml_program(path, _tasks(), (32, 32))
    with pytest.raises(CoreMLExportError, match="outputs are"):
        check_coreml_program(path, resolve_tasks(["semseg", "depth"], {"semseg": 6}), (H, W))
    with pytest.raises(CoreMLExportError, match="constexpr_lut_to_dense"):
        check_coreml_program(path, _tasks(), (H, W), precision="pal4")
    with pytest.raises(DataError, match="does not exist"):
        check_coreml_program(path.parent / "missing.mlpackage")


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS Core ML runs; the next test covers it")
def test_coreml_runtime_refuses_to_run_off_macos(coreml_files):
    from edgemt.targets.coreml import CoreMLModel

    assert get_target("coreml-fp16").runs_here is False
    with pytest.raises(DataError, match="needs macOS"):
        CoreMLModel(coreml_files["fp16"])


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction needs macOS; not run on this host")
@pytest.mark.parametrize("precision", ["fp16", "int8w", "pal4"])
def test_coreml_predicts_within_its_thresholds_on_macos(precision, student, coreml_files):
    rt = get_target(f"coreml-{precision}").load(coreml_files[precision], threads=1, target=f"coreml-{precision}")
    res = validate_runtime(
        rt, student, _dataset(2), _tasks(), cfg=ValidateConfig(threads=1, warmup=1, runs=3), precision=precision
    )
    assert res["status"] == "passed", res["reasons"]


# ------------------------------------------------------------------------------------------ deploy forms


def test_exporter_gives_static_weight_targets_a_static_form(tmp_path):
    from edgemt.targets.stages import _DeployForms

    torch.manual_seed(0)
    model = create_model("student-xs", tasks=_tasks()).eval()  # training form
    forms = _DeployForms(model, tmp_path, (H, W), fold_bn=True)
    m, form, note = forms.for_target(get_target("onnx-fp32"))
    assert m is model and form == "training" and note is None
    for name in ("onnx-int8", "tflite-fp32", "coreml-pal4"):
        m2, form, note = forms.for_target(get_target(name))
        assert form == "factorized" and name in note and "static conv weights" in note
        assert m2 is not model and m2.deploy_record["form"] == "factorized"
    x = torch.from_numpy(_images(1, 4))
    with torch.no_grad():
        a, b = model(x), m2(x)
    assert all(torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-4) for k in TASK_NAMES)
    # A dynamic-merge model without a recorded training-form source cannot be made static.
    from edgemt.compress.reparam import reparameterize

    dm = create_model("student-xs", tasks=_tasks()).eval()
    reparameterize(dm, "dynamic-merge", input_size=(H, W))
    forms = _DeployForms(dm, tmp_path, (H, W), fold_bn=True)
    assert forms.for_target(get_target("onnx-fp32"))[1] == "dynamic-merge"
    with pytest.raises(Exception, match="needs static conv weights"):
        forms.for_target(get_target("tflite-int8"))
