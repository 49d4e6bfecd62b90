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

__all__ = [
    "quantize_onnx_int8",
    "export_onnx_int8",
    "activations_to_uint8",
    "weights_to_7bit",
    "float_input_conv",
    "input_conv_to_float",
    "INPUT_CONV_CHOICES",
    "QUANT_SCHEME",
]

INPUT_CONV_CHOICES = ("int8", "float")

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
    extra_quantization: dict[str, Any] | None = None,
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
            {
                **QUANT_SCHEME,
                "calibration_images": reader.count,
                "float_output_resizes": len(exclude),
                **(extra_quantization or {}),
            }
        )
        _save(proto, meta, out_path)
    return out_path


def _save(proto: Any, meta: dict[str, str], path: Path) -> None:
    """Write ``proto`` with exactly ``meta`` as its metadata, atomically."""
    import onnx

    del proto.metadata_props[:]
    for k, v in sorted(meta.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    with atomic_path(path) as dst:
        onnx.save_model(proto, str(dst))


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
    from the 8-bit value. Zero points of symmetric weights stay 0. Weights already within [-64, 63] (learned
    so by QAT, ``qat.weight_bits: 7``) are left exactly as they are.
    """
    from onnx import TensorProto, numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    done: set[str] = set()
    # Only the weights of the integer matrix kernels saturate; a quantized constant a Mul reads is left alone.
    matrix_ops = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
    read_by: dict[str, set[str]] = {}
    for n in graph.node:
        for i in n.input:
            read_by.setdefault(i, set()).add(n.op_type)
    for n in graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits or n.input[0] in done:
            continue
        if not read_by.get(n.output[0], set()) & matrix_ops:
            continue
        w = inits[n.input[0]]
        if w.data_type != TensorProto.INT8 or n.input[1] not in inits:
            continue
        if len(n.input) > 2 and n.input[2] in inits and np.any(numpy_helper.to_array(inits[n.input[2]])):
            continue  # not symmetric: leave it
        q = numpy_helper.to_array(w).astype(np.int16)
        if q.size and q.min() >= -64 and q.max() <= 63:
            done.add(n.input[0])
            continue  # already in range (QAT with qat.weight_bits: 7): kept exactly as learned
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
    input_conv: str = "int8",
) -> Path:
    """Export fp32 ONNX to a temporary file, then quantize it to int8 QDQ at ``path``.

    With ``qat`` (a :class:`edgemt.compress.qat.QATModel`), the converted QAT graph is exported
    instead: its quantize/dequantize ops become QDQ nodes carrying the learned scales (int8
    activations), and no calibration runs.

    ``input_conv``: the precision of the conv that reads the image, ``int8`` or ``float``
    (:func:`input_conv_to_float`).
    """
    if input_conv not in INPUT_CONV_CHOICES:
        raise ValueError(f"export.int8_input_conv must be one of {INPUT_CONV_CHOICES}, got {input_conv!r}")
    # int8 (the default) is recorded at the first write; float rewrites the file once more.
    path = _export_int8(model, path, input_size, metadata, calibration, opset, batch, qat, {"precision": "int8"})
    return input_conv_to_float(path) if input_conv == "float" else path


def _export_int8(model, path, input_size, metadata, calibration, opset, batch, qat, input_conv_record) -> Path:
    if qat is not None:
        from edgemt.compress.qat import QAT_SCHEME, ConvertedModel

        learned_7bit = getattr(qat, "weight_bits", 8) == 7
        meta = dict(metadata)
        meta["quantization"] = {
            **QAT_SCHEME,
            "format": "QDQ",
            "activations": "uint8, per-tensor, asymmetric (QAT's int8 zero points shifted by 128, exact)",
            "scales": (
                "learned by QAT, kept as they are"
                if learned_7bit
                else "learned by QAT, kept as they are (weights requantized to 7 bits, see below)"
            ),
            "weights": (
                "int8, per-channel, symmetric, 7-bit range (ORT's x86 U8S8 kernels without VNNI saturate); "
                + (
                    "learned in that range by QAT, exported as learned"
                    if learned_7bit
                    else "learned over the full int8 range, requantized to 7 bits at export"
                )
            ),
            "input_conv": input_conv_record,
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
        return quantize_onnx_int8(fp32, path, calibration, extra_quantization={"input_conv": input_conv_record})


def float_input_conv(proto: Any) -> str | None:
    """Run the conv that reads the graph input in float, in place; returns its name (None: no such conv).

    The image's quantize/dequantize pair goes, the conv reads the float image, and its weight and
    bias become float initializers holding exactly the dequantized int8 values; its output is
    quantized for the next layer as before. The first conv of an image model has 3 input channels:
    ONNX Runtime's int8 kernels run it as an im2col with K = 27 plus a full-resolution quantize of
    the image, and with few output channels its float kernel can be the faster one.
    """
    from onnx import numpy_helper

    graph = proto.graph
    inputs = {i.name for i in graph.input}
    made_by = {o: n for n in graph.node for o in n.output}
    consts = {t.name: t for t in graph.initializer}

    def dq_of_quantized_input(name: str) -> str | None:
        dq = made_by.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        q = made_by.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] not in inputs:
            return None
        return q.input[0]

    conv = next((n for n in graph.node if n.op_type == "Conv" and dq_of_quantized_input(n.input[0])), None)
    if conv is None:
        return None

    def dequantized(name: str) -> str:
        dq = made_by.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or any(i not in consts for i in dq.input if i):
            return name  # already float (or not a constant): left as it is
        q = numpy_helper.to_array(consts[dq.input[0]]).astype(np.float64)
        scale = numpy_helper.to_array(consts[dq.input[1]]).astype(np.float64)
        zp = numpy_helper.to_array(consts[dq.input[2]]).astype(np.float64) if len(dq.input) > 2 else 0.0
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        if np.ndim(scale) == 1 and q.ndim > 1:  # per channel along ``axis``
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zp = scale.reshape(shape), np.reshape(zp, shape) if np.ndim(zp) else zp
        value = ((q - zp) * scale).astype(np.float32)
        new = numpy_helper.from_array(value, name=f"{name}_float")
        graph.initializer.append(new)
        return new.name

    conv.input[0] = dq_of_quantized_input(conv.input[0])
    for i in range(1, len(conv.input)):
        if conv.input[i]:
            conv.input[i] = dequantized(conv.input[i])
    _drop_dead(graph)
    return conv.name


def _drop_dead(graph: Any) -> None:
    """Remove the nodes and initializers nothing reads any more (graph outputs are read)."""
    while True:
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def input_conv_to_float(path: str | Path) -> Path:
    """Rewrite the int8 file at ``path`` so its image conv runs in float; returns ``path``.

    The usual first-layer exception of int8 deployment, for accuracy (:func:`float_input_conv`): the
    image is not quantized and the conv's weights are the dequantized int8 ones. It is also faster on a
    pruned 16-channel stem: ONNX Runtime runs a 3-channel int8 conv as an im2col over the whole
    quantized image (0.94 ms by its profiler on the pruned demo student at 256x320, AVX2, 1 thread),
    the float conv plus its reorder and the quantize of its output about 0.6 ms. The ``quantization``
    metadata entry records it (``input_conv``); the file is rewritten atomically.
    """
    import json

    import onnx

    path = Path(path)
    proto = onnx.load(str(path))
    name = float_input_conv(proto)
    if name is None:
        raise OnnxExportError(f"{path.name}: no conv reads the quantized input image; cannot make it float")
    record = {"precision": "float", "node": name}
    meta = {p.key: p.value for p in proto.metadata_props}
    quant = json.loads(meta.get("quantization", "{}"))
    quant["input_conv"] = record
    meta["quantization"] = _encode(quant)
    _save(proto, meta, path)
    return path
