"""ONNX int8: static post-training quantization to QDQ with ONNX Runtime.

The scheme ONNX Runtime runs fastest on x86/ARM CPUs (DESIGN.md section 8):
QDQ format, per-tensor asymmetric uint8 activations, per-channel symmetric
int8 weights, activation ranges calibrated (MinMax) on training images. The
fp32 graph is exported first, pre-processed (shape inference, graph
optimisation) and quantized; the artifact keeps the fp32 file's metadata plus
a ``quantization`` entry. Until the QAT issue lands this is post-training
calibration; the graph's raw outputs stay outside any L2 normalisation (the
activation runs after the graph), so no division is quantized.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgemt.io import atomic_path
from edgemt.targets.onnx import INPUT_NAME, OnnxExportError, _encode, export_onnx

__all__ = ["quantize_onnx_int8", "export_onnx_int8", "QUANT_SCHEME"]

QUANT_SCHEME = {
    "format": "QDQ",
    "activations": "uint8, per-tensor, asymmetric",
    "weights": "int8, per-channel, symmetric",
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
            )
        except Exception as e:
            raise OnnxExportError(f"int8 quantization failed: {type(e).__name__}: {e}") from e
        if reader.count == 0:
            raise OnnxExportError("int8 quantization got no calibration images")
        proto = onnx.load(str(q))
        meta.update({k: _encode(v) for k, v in (extra_metadata or {}).items()})
        meta["quantization"] = _encode({**QUANT_SCHEME, "calibration_images": reader.count})
        del proto.metadata_props[:]
        for k, v in sorted(meta.items()):
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        with atomic_path(out_path) as dst:
            onnx.save_model(proto, str(dst))
    return out_path


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
        meta["quantization"] = {**QAT_SCHEME, "format": "QDQ", "scales": "learned by QAT, kept as they are"}
        return export_onnx(
            ConvertedModel(qat, fold_weights=True), path, input_size=input_size, batch=batch, opset=opset, metadata=meta
        )
    if not calibration:
        raise OnnxExportError("onnx-int8 needs calibration images (export.calibration_images > 0)")
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(
            model, Path(tmp) / "fp32.onnx", input_size=input_size, batch=batch, opset=opset, metadata=metadata
        )
        return quantize_onnx_int8(fp32, path, calibration)
