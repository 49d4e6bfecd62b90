"""Int8 quantization-aware training (torchao pt2e) and the int8 targets that consume it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("torchao")
pytest.importorskip("litert_torch")

from edgemt.compress.qat import ConvertedModel, QATModel, is_qat_dir, load_qat, save_qat  # noqa: E402
from edgemt.compress.reparam import reparameterize  # noqa: E402
from edgemt.errors import ConfigError, DataError  # noqa: E402
from edgemt.models import create_model  # noqa: E402
from edgemt.targets.registry import get_target  # noqa: E402
from edgemt.tasks import resolve_tasks  # noqa: E402

SIZE = (64, 96)
NAMES = ["semseg", "depth", "normals", "edge"]


def _float_model():
    torch.manual_seed(0)
    model = create_model("student-xs", tasks=resolve_tasks(NAMES, {"semseg": 5})).eval()
    reparameterize(model, "factorized", input_size=SIZE)  # BN folded, static form: what QAT quantizes
    return model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A QAT model fitted for a few steps to fixed targets, its losses, and its saved directory."""
    model = _float_model()
    qat = QATModel(model, SIZE)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, *SIZE, generator=g)
    with torch.no_grad():
        target = {k: 2.0 * v + 0.3 for k, v in qat(x).items()}  # reachable through the heads
    qat.train()
    opt = torch.optim.Adam(qat.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out = qat(x)
        loss = sum(torch.nn.functional.mse_loss(out[k], target[k]) for k in out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    qat.eval()
    qat.freeze_observers()
    d = tmp_path_factory.mktemp("qat")
    save_qat(d, model, qat)
    return qat, losses, d


def test_qat_lowers_its_loss(trained):
    _, losses, _ = trained
    assert losses[-1] < 0.7 * losses[0], losses


def test_qat_graph_is_fake_quantized_and_keeps_output_shapes(trained):
    qat, _, _ = trained
    state = qat.quant_state()
    assert any(k.endswith(".scale") for k in state) and any(k.endswith(".zero_point") for k in state)
    x = torch.randn(3, 3, 96, 128)  # other batch and size than the export example
    with torch.no_grad():
        out = qat(x)
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == {
        "semseg": (5, 96, 128),
        "depth": (1, 96, 128),
        "normals": (3, 96, 128),
        "edge": (1, 96, 128),
    }
    with pytest.raises(DataError, match="multiples of 32"):
        qat(torch.randn(1, 3, 60, 96))


def test_qat_artifact_reloads_without_pickle_and_gives_identical_outputs(trained):
    qat, _, d = trained
    assert is_qat_dir(d) and json.loads((d / "qat.json").read_text())["input_size"] == list(SIZE)
    model, again = load_qat(d)
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        a, b = qat(x), again(x)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The float model holds the QAT-trained weights.
    sd = model.state_dict()
    assert all(torch.equal(v.nan_to_num(), sd[k].nan_to_num()) for k, v in qat.float_state().items())


def test_qat_artifact_with_foreign_state_is_refused(trained, tmp_path):
    from edgemt.io import save_weights

    _, _, d = trained
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    save_weights(bad / "qat.safetensors", {"activation_post_process_9999.scale": torch.ones(1)})
    with pytest.raises(DataError, match="does not fit the rebuilt graph"):
        load_qat(bad)


# Tolerance of an int8 runtime against the fake-quantized PyTorch model: mean |a - b| at most 2% of the
# mean |b| per task (the runtimes requantize with their own integer rounding), and at most 1% against the
# converted int8 PyTorch graph, which applies the same rounding points.
TOL_FAKE_QUANT, TOL_CONVERTED = 0.02, 0.01


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean() / (np.abs(b).mean() + 1e-8))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["onnx-int8", "tflite-int8"])
def test_int8_file_from_qat_matches_the_fake_quantized_model(target, trained, tmp_path):
    qat, _, _ = trained
    spec = get_target(target)
    assert spec.takes_qat
    path = spec.export(_float_model(), tmp_path / f"m{spec.suffix}", input_size=SIZE, metadata={}, qat=qat)
    rt = spec.load(path, threads=1, target=target)
    meta_q = rt.metadata["quantization"]
    assert meta_q["scales"].startswith("learned by QAT, kept as they are") and "quantization-aware" in meta_q["method"]
    conv = ConvertedModel(qat)
    for seed in range(3):
        x = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(seed))
        got = rt.run(x.numpy())
        with torch.no_grad():
            fq, cv = qat(x), conv(x)
        for k in NAMES:
            assert _rel(got[k], fq[k].numpy()) <= TOL_FAKE_QUANT, (k, _rel(got[k], fq[k].numpy()))
            assert _rel(got[k], cv[k].numpy()) <= TOL_CONVERTED, (k, _rel(got[k], cv[k].numpy()))
    if target == "onnx-int8":
        import onnx

        proto = onnx.load(str(path))
        ops = {n.op_type for n in proto.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
        # activations run as uint8 (ORT's U8S8 kernels), weights stay int8
        zp_type = {t.name: t.data_type for t in proto.graph.initializer}
        q_types = {zp_type[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear"}
        assert q_types == {onnx.TensorProto.UINT8}, q_types
        w_types = {
            zp_type[n.input[2]] for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in zp_type
        }
        assert w_types == {onnx.TensorProto.INT8}, w_types
        # Residual and skip adds are quantized in and out (QLinearAdd in ONNX Runtime): no add of two
        # feature maps reads another add's float output. (The gate path's small adds of a constant stay float.)
        made_by = {o: n.op_type for n in proto.graph.node for o in n.output}
        consts = set(zp_type) | {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
        adds = [n for n in proto.graph.node if n.op_type == "Add" and not consts & set(n.input)]
        assert len(adds) >= 5  # the backbone's residual chain, the decoder blocks, the heads' skips
        chained = [n.name for n in adds if "Add" in map(made_by.get, n.input)]
        assert not chained, chained
        assert (
            path.stat().st_size
            < 0.5
            * get_target("onnx-fp32")
            .export(_float_model(), tmp_path / "f.onnx", input_size=SIZE, metadata={})
            .stat()
            .st_size
        )


def test_uint8_activation_rewrite_is_exact(trained, tmp_path):
    """QAT's int8 activations moved to uint8 (zero point + 128) give the same values bit for bit."""
    import copy

    import onnx
    import onnxruntime as ort

    from edgemt.targets.onnx import export_onnx
    from edgemt.targets.onnx_int8 import activations_to_uint8

    qat, _, _ = trained
    path = export_onnx(ConvertedModel(qat, fold_weights=True), tmp_path / "s8.onnx", input_size=SIZE, metadata={})
    s8 = onnx.load(str(path))
    u8 = activations_to_uint8(copy.deepcopy(s8))
    onnx.checker.check_model(u8, full_check=True)
    n_q = sum(n.op_type == "QuantizeLinear" for n in s8.graph.node)
    assert n_q > 20
    types = {t.name: t.data_type for t in u8.graph.initializer}
    assert all(types[n.input[2]] == onnx.TensorProto.UINT8 for n in u8.graph.node if n.op_type == "QuantizeLinear")
    x = np.random.default_rng(0).standard_normal((1, 3, *SIZE)).astype(np.float32)

    def run(proto, optimize: bool):
        so = ort.SessionOptions()
        if not optimize:  # the graph as written: every Q/DQ op evaluated on its own
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(proto.SerializeToString(), so).run(None, {"image": x})

    for u, v in zip(run(s8, False), run(u8, False), strict=True):
        assert np.array_equal(u, v)
    # Optimized, ORT fuses the QDQ pairs into integer kernels (U8S8 here, S8S8 before), whose
    # requantization rounds differently: close, not identical.
    for u, v in zip(run(s8, True), run(u8, True), strict=True):
        assert _rel(v, u) <= TOL_CONVERTED


def test_qat_graph_at_output_stride_4_trains_at_full_size_and_ships_the_quarter_maps(tmp_path):
    model = _float_model()
    qat = QATModel(model, SIZE, output_stride=4)
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        out = qat(x)  # the losses see full-size outputs, upsampled outside the quantized graph
        graph = qat.graph(image=x)
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == {n: SIZE for n in NAMES}
    assert {k: tuple(v.shape[-2:]) for k, v in graph.items()} == {n: (SIZE[0] // 4, SIZE[1] // 4) for n in NAMES}
    assert model.output_stride == 1  # the float model is left as it was
    save_qat(tmp_path, model, qat)
    _, again = load_qat(tmp_path)
    assert again.output_stride == 4
    spec = get_target("onnx-int8")
    path = spec.export(model, tmp_path / "q.onnx", input_size=SIZE, metadata={}, qat=again)
    from edgemt.targets.runtime import OnnxRuntimeModel

    got = OnnxRuntimeModel(path).run(x[:1].numpy())
    assert {k: v.shape[-2:] for k, v in got.items()} == {n: (SIZE[0] // 4, SIZE[1] // 4) for n in NAMES}


def _weight_constants(proto) -> dict[str, np.ndarray]:
    """The int8 weights of the conv and matrix ops of an ONNX QDQ graph (the inputs of their DequantizeLinear)."""
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    read_by = {i: n.op_type for n in proto.graph.node for i in n.input}
    return {
        n.input[0]: numpy_helper.to_array(inits[n.input[0]]).copy()
        for n in proto.graph.node
        if n.op_type == "DequantizeLinear"
        and n.input[0] in inits
        and inits[n.input[0]].data_type == TensorProto.INT8
        and read_by.get(n.output[0]) in ("Conv", "Gemm", "MatMul")
    }


def test_qat_learns_7_bit_weights_that_the_onnx_file_keeps_as_learned(trained, tmp_path):
    """qat.weight_bits: 7 (default) trains the weights in ONNX Runtime's x86 range; export rounds nothing again."""
    import copy

    import onnx

    from edgemt.targets.onnx import export_onnx
    from edgemt.targets.onnx_int8 import weights_to_7bit

    qat, _, d = trained
    assert qat.weight_bits == 7 and json.loads((d / "qat.json").read_text())["weight_bits"] == 7
    assert load_qat(d)[1].weight_bits == 7
    path = export_onnx(ConvertedModel(qat, fold_weights=True), tmp_path / "w7.onnx", input_size=SIZE, metadata={})
    proto = onnx.load(str(path))
    learned = _weight_constants(proto)
    assert len(learned) > 20
    assert max(int(np.abs(w).max()) for w in learned.values()) == 63  # per-channel min/max: the range is used
    kept = _weight_constants(weights_to_7bit(copy.deepcopy(proto)))
    assert all(np.array_equal(kept[k], w) for k, w in learned.items())

    # The full int8 range (qat.weight_bits: 8) is requantized at export: a second rounding QAT never saw.
    full = QATModel(_float_model(), SIZE, weight_bits=8)
    with torch.no_grad():
        full(torch.randn(2, 3, *SIZE))  # observe the weights' ranges
    full.freeze_observers()
    path8 = export_onnx(ConvertedModel(full, fold_weights=True), tmp_path / "w8.onnx", input_size=SIZE, metadata={})
    proto8 = onnx.load(str(path8))
    w8 = _weight_constants(proto8)
    assert max(int(np.abs(w).max()) for w in w8.values()) == 127
    w7 = _weight_constants(weights_to_7bit(proto8))
    assert max(int(np.abs(w).max()) for w in w7.values()) <= 64
    assert not all(np.array_equal(w7[k], w) for k, w in w8.items())
    with pytest.raises(ConfigError, match="weight_bits must be 7 or 8, got 4"):
        QATModel(_float_model(), SIZE, weight_bits=4)
