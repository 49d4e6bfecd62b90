"""ONNX int8: static post-training quantization to QDQ with ONNX Runtime.

The scheme ONNX Runtime runs fastest on x86/ARM CPUs (DESIGN.md section 8):
QDQ format, per-tensor asymmetric uint8 activations, per-channel symmetric
int8 weights, activation ranges calibrated (MinMax) on training images. The
fp32 graph is exported first, pre-processed (shape inference, graph
optimisation) and quantized; the artifact keeps the fp32 file's metadata plus
a ``quantization`` entry. A Resize that produces a graph output (the heads'
upsampling to the input size) stays in float: quantizing it only adds a
quantize/dequantize pair at full resolution (on the demo student at 256x320,
about a tenth of the int8 latency) and rounds the outputs. The graph's raw outputs stay outside any L2
normalisation (the activation runs after the graph), so no division is
quantized.

Given a QAT model, no calibration runs: the converted QAT graph is exported
with its learned scales, and its int8 activations are moved to uint8 (zero
point + 128, exact; :func:`activations_to_uint8`), the U8S8 form ONNX
Runtime's CPU kernels are built for. Signed activations ran 1.6x slower on
this machine.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgemt.io import atomic_path
from edgemt.targets.onnx import INPUT_NAME, OnnxExportError, _encode, export_onnx

__all__ = ["quantize_onnx_int8", "export_onnx_int8", "activations_to_uint8", "weights_to_7bit", "QUANT_SCHEME"]

QUANT_SCHEME = {
    "format": "QDQ",
    "activations": "uint8, per-tensor, asymmetric",
    "weights": "int8, per-channel, symmetric, 7-bit range (ORT's x86 U8S8 kernels without VNNI saturate)",
    "method": "post-training static, MinMax calibration",
}


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over an iterable of (B, 3, H, W) arrays."""

    def __init__(self, batches: Iterable[np.ndarray], input_name: str) -> None:
        self._it = iter(batches)
        self._name = input_name
        self.count = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        if x is None:
            return None
        self.count += int(x.shape[0])
        return {self._name: np.ascontiguousarray(x, dtype=np.float32)}


def quantize_onnx_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration: Iterable[np.ndarray],
    *,
    per_channel: bool = True,
    extra_metadata: dict[str, Any] | None = None,
) -> Path:
    """Quantize an fp32 ONNX file to int8 QDQ; ``calibration`` yields input batches of its fixed shape.

    Raises:
        OnnxExportError: no calibration data, or ONNX Runtime's quantizer failed. Nothing is left at ``out_path``.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    src = onnx.load(str(fp32_path))
    meta = {p.key: p.value for p in src.metadata_props}
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        except Exception as e:
            raise OnnxExportError(f"int8 pre-processing of {fp32_path.name} failed: {type(e).__name__}: {e}") from e
        reader = _Reader(calibration, INPUT_NAME)
        q = Path(tmp) / "q.onnx"
        exclude = _output_resizes(onnx.load(str(pre)))
        try:
            quantize_static(
                str(pre),
                str(q),
                reader,
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=exclude,
                reduce_range=True,  # 7-bit weights: see weights_to_7bit
            )
        except Exception as e:
            raise OnnxExportError(f"int8 quantization failed: {type(e).__name__}: {e}") from e
        if reader.count == 0:
            raise OnnxExportError("int8 quantization got no calibration images")
        proto = onnx.load(str(q))
        meta.update({k: _encode(v) for k, v in (extra_metadata or {}).items()})
        meta["quantization"] = _encode(
            {**QUANT_SCHEME, "calibration_images": reader.count, "float_output_resizes": len(exclude)}
        )
        del proto.metadata_props[:]
        for k, v in sorted(meta.items()):
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        with atomic_path(out_path) as dst:
            onnx.save_model(proto, str(dst))
    return out_path


def _output_resizes(proto: Any) -> list[str]:
    """Names of the Resize nodes whose output is a graph output (kept in float by the quantizer)."""
    outputs = {o.name for o in proto.graph.output}
    return [n.name for n in proto.graph.node if n.op_type == "Resize" and any(o in outputs for o in n.output)]


def weights_to_7bit(proto: Any) -> Any:
    """Requantize every constant int8 weight of ``proto`` to the 7-bit range, in place; returns it.

    ONNX Runtime's x86 U8S8 kernels without VNNI (AVX2, AVX-512F) multiply uint8 activations by int8
    weights with ``vpmaddubsw``, whose pairwise sums saturate at int16: with weights over the full int8
    range, results go wrong (measured on an AVX2 AMD EPYC: the normals of a QAT file 15% off the
    fake-quantized model with ORT's fusions on, 0.05% with them off). ORT's documented remedy is weights
    in 7 bits (``reduce_range``): ``q7 = round(q / 2)`` with twice the scale, at most half a new step
    from the 8-bit value. Zero points of symmetric weights stay 0.
    """
    from onnx import TensorProto, numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    done: set[str] = set()
    for n in graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits or n.input[0] in done:
            continue
        w = inits[n.input[0]]
        if w.data_type != TensorProto.INT8 or n.input[1] not in inits:
            continue
        if len(n.input) > 2 and n.input[2] in inits and np.any(numpy_helper.to_array(inits[n.input[2]])):
            continue  # not symmetric: leave it
        q = numpy_helper.to_array(w).astype(np.int16)
        w.CopyFrom(numpy_helper.from_array(np.clip(np.round(q / 2.0), -64, 63).astype(np.int8), name=w.name))
        scale = inits[n.input[1]]
        s = numpy_helper.to_array(scale)
        scale.CopyFrom(numpy_helper.from_array((s * 2).astype(s.dtype), name=scale.name))
        done.add(n.input[0])
    return proto


def activations_to_uint8(proto: Any) -> Any:
    """Move every int8 activation quantize/dequantize pair of ``proto`` to uint8, in place; returns it.

    QAT (pt2e, shared with the TFLite int8 target) learns int8 activations with a zero point ``z``.
    ``clamp(round(x / s) + z, -128, 127) + 128 == clamp(round(x / s) + z + 128, 0, 255)``, so a uint8
    zero point ``z + 128`` gives the same dequantized values bit for bit (op by op; ONNX Runtime's
    fused integer kernels then requantize with their own rounding, within 1% of the signed file), and
    ONNX Runtime's x86 and ARM kernels are built for uint8 activations with int8 weights (U8S8):
    measured on this machine, the signed-activation file of the pruned demo student ran 1.6x slower
    than the PTQ file. Weights (constant inputs) keep their symmetric int8 zero point of 0.
    """
    from onnx import TensorProto, numpy_helper

    graph = proto.graph
    consts = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)

    def shifted(zp_name: str, tag: str) -> str:
        z = numpy_helper.to_array(inits[zp_name]).astype(np.int16) + 128
        new = numpy_helper.from_array(z.astype(np.uint8), name=f"{zp_name}_u8_{tag}")
        graph.initializer.append(new)
        return new.name

    infos = {v.name: v for v in graph.value_info}
    for i, q in enumerate([n for n in graph.node if n.op_type == "QuantizeLinear"]):
        if q.input[0] in consts or len(q.input) < 3 or q.input[2] not in inits:
            continue
        if inits[q.input[2]].data_type != TensorProto.INT8:
            continue
        dqs = consumers.get(q.output[0], [])
        if any(d.op_type != "DequantizeLinear" or len(d.input) < 3 or d.input[2] not in inits for d in dqs):
            raise OnnxExportError(f"quantized activation {q.output[0]!r} feeds a node other than DequantizeLinear")
        q.input[2] = shifted(q.input[2], f"q{i}")
        if q.output[0] in infos:  # the exporter's recorded type of the quantized tensor
            infos[q.output[0]].type.tensor_type.elem_type = TensorProto.UINT8
        for j, d in enumerate(dqs):
            d.input[2] = shifted(d.input[2], f"dq{i}_{j}")
    # drop the int8 zero points nothing reads any more
    used = {name for n in graph.node for name in n.input}
    keep = [t for t in graph.initializer if t.name in used or t.name in {o.name for o in graph.output}]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return proto


def export_onnx_int8(
    model: Any,
    path: str | Path,
    *,
    input_size: tuple[int, int],
    metadata: dict[str, Any],
    calibration: Sequence[np.ndarray] | None = None,
    opset: int = 18,
    batch: int | None = 1,
    qat: Any = None,
) -> Path:
    """Export fp32 ONNX to a temporary file, then quantize it to int8 QDQ at ``path``.

    With ``qat`` (a :class:`edgemt.compress.qat.QATModel`), the converted QAT graph is exported
    instead: its quantize/dequantize ops become QDQ nodes carrying the learned scales (int8
    activations), and no calibration runs.
    """
    if qat is not None:
        from edgemt.compress.qat import QAT_SCHEME, ConvertedModel

        meta = dict(metadata)
        meta["quantization"] = {
            **QAT_SCHEME,
            "format": "QDQ",
            "activations": "uint8, per-tensor, asymmetric (QAT's int8 zero points shifted by 128, exact)",
            "scales": "learned by QAT, kept as they are (weights requantized to 7 bits, see below)",
            "weights": "int8, per-channel, symmetric, 7-bit range (ORT's x86 U8S8 kernels without VNNI saturate)",
        }
        return export_onnx(
            ConvertedModel(qat, fold_weights=True),
            path,
            input_size=input_size,
            batch=batch,
            opset=opset,
            metadata=meta,
            postprocess=lambda p: weights_to_7bit(activations_to_uint8(p)),
        )
    if not calibration:
        raise OnnxExportError("onnx-int8 needs calibration images (export.calibration_images > 0)")
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(
            model, Path(tmp) / "fp32.onnx", input_size=input_size, batch=batch, opset=opset, metadata=metadata
        )
        return quantize_onnx_int8(fp32, path, calibration)
