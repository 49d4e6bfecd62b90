"""TFLite export (``tflite-fp32``, ``tflite-fp16``, ``tflite-int8``) and the LiteRT runtime.

Two converter routes, chosen with ``export.tflite_converter`` (or ``route=``):

* ``litert-torch`` (default): PyTorch straight to TFLite with litert-torch.

  - fp32: ``litert_torch.convert`` on the model;
  - fp16: the fp32 flatbuffer with conv / depthwise / fully-connected weights
    cast to float16 by ai-edge-quantizer (``float_casting``). This is TFLite's
    standard "float16 quantization": half-size file, weights dequantized to
    fp32 on CPU, consumed as fp16 by GPU delegates;
  - int8: PyTorch 2 export quantization (pt2e) with litert-torch's
    ``PT2EQuantizer``: per-channel symmetric int8 weights, per-tensor int8
    activations, calibrated on training images, then converted. The exported
    program is decomposed (``run_decompositions()``) before ``.module()``: a
    non-decomposed softmax fails at run time. Softmax and sigmoid outputs get
    TFLite's fixed int8 parameters (scale 1/256, zero point -128) even where
    the stock quantizer leaves them unannotated (a softmax over a slice, as in
    the expert routers), otherwise the runtime refuses the graph. A tensor
    concatenated with a softmax output inherits that fixed [0, 1) range in
    TFLite (the converter unifies concat scales), so the students' factorized
    blocks never concatenate their gates with the unbounded mix scalar.

* ``onnx2tf``: the fp32 ONNX export, converted by onnx2tf to a TensorFlow
  SavedModel, then TensorFlow's ``TFLiteConverter`` (fp16 via
  ``supported_types=[float16]``; int8 via a representative dataset of the same
  calibration images, float input/output). onnx2tf turns the graph NHWC; the
  input is kept NCHW and the outputs are transposed back and named by task in
  a wrapper signature, so both routes have the same interface. onnx2tf tries
  to download a sample image for its own checks whenever the input looks like
  NHWC images; keeping the input NCHW avoids that, and the download function
  is replaced by one that raises, so conversion never touches the network.

Both routes produce one signature, ``serving_default``, with input ``image``
``(B, 3, H, W)`` (float32, or int8 with its quantization parameters for
litert-torch's int8) and one output per task named by the task, raw (before
activation) and NCHW. LiteRT's output order is not stable, so outputs are
always read by name through the signature runner.

Metadata: the flatbuffer's ``metadata`` table gets an entry ``edgemt`` whose
buffer is the JSON of the same string map an ONNX artifact carries in
``metadata_props`` (:func:`embed_tflite_metadata`,
:func:`read_tflite_metadata`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgemt.errors import DataError
from edgemt.io import atomic_path, tool_versions
from edgemt.tasks import Task, get_task

from .onnx import INPUT_NAME, artifact_metadata, decode_metadata
from .runtime import StaticShapeRuntime

__all__ = [
    "TFLITE_ROUTES",
    "TFLITE_PRECISIONS",
    "TFLiteExportError",
    "export_tflite",
    "embed_tflite_metadata",
    "read_tflite_metadata",
    "TFLiteModel",
]

# TensorFlow (imported by litert-torch, ai-edge-litert and onnx2tf) logs C++ info lines (oneDNN, no
# CUDA) that are noise on a CPU host; the variable must be set before TensorFlow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TFLITE_ROUTES = ("litert-torch", "onnx2tf")
TFLITE_PRECISIONS = ("fp32", "fp16", "int8")
METADATA_NAME = "edgemt"
SIGNATURE = "serving_default"
TOOLS = ("litert-torch", "ai-edge-litert", "ai-edge-quantizer", "tensorflow-cpu", "onnx2tf")


class TFLiteExportError(RuntimeError):
    """The model could not be converted to TFLite; no file was written."""


class _NamedOutputs(nn.Module):
    """``forward(image) -> {task: raw}``: the signature's input and output names come from here."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(image)
        return {n: out[n] for n in self.names}


@contextlib.contextmanager
def _quiet_litert() -> Iterator[None]:
    # litert-torch prints a rich progress tree per conversion; EdgeMT prints its own line per target.
    old = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = old


def _batches(calibration: Sequence[np.ndarray], batch: int) -> Iterator[np.ndarray]:
    """Calibration arrays re-cut to the graph's fixed batch (a short tail is dropped)."""
    if not calibration:
        return
    x = np.concatenate([np.asarray(c, dtype=np.float32) for c in calibration])
    for i in range(0, x.shape[0] - batch + 1, batch):
        yield np.ascontiguousarray(x[i : i + batch])


# ---------------------------------------------------------------- litert-torch route


def _int8_quantizer(qat: bool = False, weight_bits: int = 8) -> Any:
    """litert-torch's PT2EQuantizer (per-channel weights) that also pins softmax/sigmoid outputs.

    ``weight_bits: 7`` keeps the symmetric weights within [-63, 63] (still int8 tensors): the range
    ONNX Runtime's x86 int8 kernels without VNNI need (see ``weights_to_7bit``), so QAT learns the
    weights that file will hold instead of having them rounded a second time at export.

    The stock annotator gives softmax its fixed output parameters only when the
    softmax input is itself annotated; a softmax over a slice of a linear
    output (the routers' gates) is left out, its output is then quantized by
    the consumer with observed parameters, and LiteRT's int8 softmax kernel
    refuses anything but scale 1/256, zero point -128.

    The stock add annotator (source partitions) finds no add in the graphs
    ``torch.export`` gives with this torch release, so none was annotated: an add's
    inputs were quantized only by their producers, and an add feeding another
    add (a chain of residual blocks, the heads' skip) stayed float. In ONNX
    Runtime such an add cannot become a ``QLinearAdd`` and runs in float with a
    quantize per consumer (the QAT file of the demo student was 4.5% slower
    than the post-training one). Adds of two same-shape feature maps are
    annotated here (inputs and output int8, like a ``QLinearAdd``); the small
    broadcast adds of the gate path stay as they were.
    """
    from litert_torch.quantize import pt2e_quantizer_utils as qutils
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    fixed_ops = (torch.ops.aten._softmax.default, torch.ops.aten.sigmoid.default)
    add_ops = (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor)

    def feature_map(arg: Any) -> tuple[str, ...] | None:
        # As strings: exported with dynamic sizes, the shapes hold symbols (32*s0), compared without guards.
        val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
        return tuple(str(d) for d in val.shape) if isinstance(val, torch.Tensor) and val.dim() == 4 else None

    class _Quantizer(PT2EQuantizer):
        # EdgeMT folds BatchNorm before quantizing, so the QAT-only conv+BN patterns never match (and
        # their pattern tracing breaks with this torchao release).
        STATIC_QAT_ONLY_OPS: list[str] = []

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            model = super().annotate(model)
            cfg = self.global_config
            for node in model.graph.nodes:
                if node.op != "call_function":
                    continue
                ann = node.meta.get("quantization_annotation")
                if ann is not None and ann._annotated:
                    continue
                if node.target in add_ops and len(node.args) >= 2:
                    a, b = node.args[0], node.args[1]
                    if feature_map(a) is not None and feature_map(a) == feature_map(b):
                        node.meta["quantization_annotation"] = QuantizationAnnotation(
                            input_qspec_map={a: qutils.get_input_act_qspec(cfg), b: qutils.get_input_act_qspec(cfg)},
                            output_qspec=qutils.get_output_act_qspec(cfg),
                            _annotated=True,
                        )
                    continue
                if node.target in fixed_ops:
                    node.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map={node.args[0]: qutils.get_input_act_qspec(cfg)},
                        output_qspec=qutils.get_fixed_qparams_qspec(cfg),
                        _annotated=True,
                    )
            return model

    # Stock observers: HistogramObserver for activations (measured on the demo student: 0.10 points of
    # Delta_m against fp32, MinMax 0.14), per-channel MinMax for weights.
    cfg = get_symmetric_quantization_config(is_per_channel=True, is_qat=qat)
    if weight_bits == 7:  # QATModel checks the value (7 or 8)
        limit = 2 ** (weight_bits - 1) - 1
        cfg = dataclasses.replace(cfg, weight=dataclasses.replace(cfg.weight, quant_min=-limit, quant_max=limit))
    return _Quantizer().set_global(cfg)


def _litert_fp32(named: nn.Module, x: torch.Tensor) -> bytes:
    import litert_torch

    with _quiet_litert():
        return bytes(litert_torch.convert(named, sample_kwargs={INPUT_NAME: x}).model_content())


def _cast_weights_fp16(fp32: bytes) -> bytes:
    from ai_edge_quantizer import qtyping, quantizer

    q = quantizer.Quantizer(bytearray(fp32))
    for op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "CONV_2D_TRANSPOSE"):
        q.add_weight_only_config(
            regex=".*",
            operation_name=getattr(qtyping.TFLOperationName, op),
            num_bits=16,
            algorithm_key="float_casting",
        )
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a size summary
        result = q.quantize()
    if result.quantized_model is None:
        raise TFLiteExportError("ai-edge-quantizer returned no float16 model")
    return bytes(result.quantized_model)


def _litert_int8(named: nn.Module, x: torch.Tensor, calibration: Sequence[np.ndarray]) -> tuple[bytes, int]:
    import litert_torch
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = _int8_quantizer()
    # Decompose before .module(): the fused softmax otherwise reaches the converter and fails at run time.
    graph = torch.export.export(named, (), {INPUT_NAME: x}).run_decompositions().module()
    prepared = prepare_pt2e(graph, quantizer)
    seen = 0
    with torch.no_grad():
        for b in _batches(calibration, x.shape[0]):
            prepared(**{INPUT_NAME: torch.from_numpy(b)})
            seen += b.shape[0]
    if seen == 0:
        raise TFLiteExportError("tflite-int8 got no calibration images")
    quantized = convert_pt2e(prepared, fold_quantize=False)
    move_exported_model_to_eval(quantized)
    quantized.training = False  # an exported GraphModule refuses .eval(); the converter checks the flag
    with _quiet_litert():
        edge = litert_torch.convert(
            quantized, sample_kwargs={INPUT_NAME: x}, quant_config=QuantConfig(pt2e_quantizer=quantizer)
        )
        return bytes(edge.model_content()), seen


def _litert_int8_from_qat(qat: Any, x: torch.Tensor) -> bytes:
    """TFLite bytes of a QAT graph, converted with the scales it learned."""
    import litert_torch
    from litert_torch.quantize.quant_config import QuantConfig

    from edgemt.compress.qat import ConvertedModel

    converted = ConvertedModel(qat).graph
    converted.training = False
    with _quiet_litert():
        edge = litert_torch.convert(
            converted, sample_kwargs={INPUT_NAME: x}, quant_config=QuantConfig(pt2e_quantizer=qat.quantizer)
        )
        return bytes(edge.model_content())


# ---------------------------------------------------------------- onnx2tf route


def _no_download() -> np.ndarray:
    raise TFLiteExportError(
        "onnx2tf asked to download its sample image; EdgeMT never downloads at run time "
        "(the input should have been kept NCHW)"
    )


def _onnx2tf(
    model: nn.Module,
    names: Sequence[str],
    x: torch.Tensor,
    precision: str,
    calibration: Sequence[np.ndarray],
    opset: int,
) -> tuple[bytes, int]:
    try:
        import onnx2tf
        import onnx2tf.onnx2tf as onnx2tf_main
        import onnx2tf.utils.common_functions as onnx2tf_common
        import tensorflow as tf
    except ImportError as e:
        raise TFLiteExportError(
            f"the onnx2tf route needs onnx2tf and tensorflow ({e}); see the README's install notes (make install-tflite)"
        ) from e
    from .onnx import export_onnx

    b, _, h, w = x.shape
    seen = 0
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(model, Path(tmp) / "model.onnx", input_size=(h, w), batch=b, opset=opset)
        saved = Path(tmp) / "saved_model"
        patched = [(m, m.download_test_image_data) for m in (onnx2tf_main, onnx2tf_common)]
        try:
            for m, _ in patched:
                m.download_test_image_data = _no_download
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                onnx2tf.convert(
                    input_onnx_file_path=str(onnx_path),
                    output_folder_path=str(saved),
                    keep_ncw_or_nchw_or_ncdhw_input_names=[INPUT_NAME],
                    non_verbose=True,
                )
        except TFLiteExportError:
            raise
        except Exception as e:
            raise TFLiteExportError(f"onnx2tf failed: {type(e).__name__}: {e}") from e
        finally:
            for m, fn in patched:
                m.download_test_image_data = fn
        loaded = tf.saved_model.load(str(saved))
        inner = loaded.signatures[SIGNATURE]
        outs = inner.structured_outputs
        if sorted(outs) != sorted(f"output_{i}" for i in range(len(names))):
            raise TFLiteExportError(f"onnx2tf's SavedModel has outputs {sorted(outs)}; expected {len(names)}")
        input_key = next(iter(inner.structured_input_signature[1]))

        # onnx2tf names outputs output_<i> in the ONNX output order (the task order) and makes them NHWC.
        @tf.function(input_signature=[tf.TensorSpec([b, 3, h, w], tf.float32, name=INPUT_NAME)])
        def serve(image: Any) -> dict[str, Any]:
            res = inner(**{input_key: image})
            return {n: tf.transpose(res[f"output_{i}"], [0, 3, 1, 2]) for i, n in enumerate(names)}

        conv = tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function()], loaded)
        if precision == "fp16":
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.target_spec.supported_types = [tf.float16]
        elif precision == "int8":
            batches = list(_batches(calibration, b))
            if not batches:
                raise TFLiteExportError("tflite-int8 got no calibration images")
            seen = sum(c.shape[0] for c in batches)
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = lambda: ([c] for c in batches)
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        try:
            return bytes(conv.convert()), seen
        except Exception as e:
            raise TFLiteExportError(f"TFLiteConverter failed: {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------- metadata


def embed_tflite_metadata(model_bytes: bytes, metadata: Mapping[str, str]) -> bytes:
    """The flatbuffer with a ``metadata`` entry ``edgemt`` holding ``metadata`` as JSON (replacing an older one)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    root = schema.Model.GetRootAs(model_bytes, 0)
    obj = schema.ModelT.InitFromObj(root)
    for buf in obj.buffers or []:
        # Some writers (ai-edge-quantizer) store buffer data after the flatbuffer, addressed by offset:
        # pull it back inside, where the repacked file keeps it.
        if (buf.offset or 0) > 1:
            if buf.offset + buf.size > len(model_bytes):
                raise TFLiteExportError("a TFLite buffer points past the end of the file")
            buf.data = np.frombuffer(model_bytes, dtype=np.uint8, count=buf.size, offset=buf.offset)
            buf.offset, buf.size = 0, 0
    payload = np.frombuffer(json.dumps(dict(metadata), sort_keys=True).encode(), dtype=np.uint8)
    obj.metadata = [m for m in (obj.metadata or []) if (m.name or b"").decode() != METADATA_NAME]
    buf = schema.BufferT()
    buf.data = payload
    obj.buffers = [*(obj.buffers or []), buf]
    entry = schema.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(obj.buffers) - 1
    obj.metadata.append(entry)
    builder = flatbuffers.Builder(len(model_bytes) + 1024)
    builder.Finish(obj.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def read_tflite_metadata(path_or_bytes: str | Path | bytes) -> dict[str, Any]:
    """The ``edgemt`` metadata of a TFLite file, JSON values decoded; ``{}`` when there is none."""
    from ai_edge_litert import schema_py_generated as schema

    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    try:
        root = schema.Model.GetRootAs(data, 0)
        for i in range(root.MetadataLength()):
            md = root.Metadata(i)
            if (md.Name() or b"").decode() != METADATA_NAME:
                continue
            buf = root.Buffers(md.Buffer())
            raw = buf.DataAsNumpy()
            blob = raw.tobytes() if isinstance(raw, np.ndarray) else data[buf.Offset() : buf.Offset() + buf.Size()]
            return decode_metadata(json.loads(blob.decode()))
    except Exception as e:  # a truncated or foreign file
        raise DataError(
            f"{path_or_bytes if not isinstance(path_or_bytes, bytes) else 'model'}: "
            f"cannot read TFLite metadata ({type(e).__name__}: {e})"
        ) from None
    return {}


# ---------------------------------------------------------------- export


def export_tflite(
    model: nn.Module,
    path: str | Path,
    *,
    precision: str,
    input_size: tuple[int, int],
    metadata: Mapping[str, Any] | None = None,
    calibration: Sequence[np.ndarray] | None = None,
    route: str = "litert-torch",
    batch: int | None = 1,
    opset: int = 18,
    qat: Any = None,
    float_cache: dict[Any, bytes] | None = None,
) -> Path:
    """Convert ``model`` to a ``.tflite`` file at ``path`` (written atomically) and return the path.

    Args:
        model: multi-task model with ``.tasks`` returning ``{task: raw (B,C,H,W)}``; exported in eval mode.
        precision: ``fp32``, ``fp16`` or ``int8`` (int8 needs ``calibration``).
        input_size: ``(H, W)``, fixed in the graph.
        metadata: the string map of :func:`edgemt.targets.onnx.make_metadata`; embedded as ``edgemt``.
        calibration: int8 only: ``(B, 3, H, W)`` arrays of normalised training images.
        route: ``litert-torch`` or ``onnx2tf`` (see the module docstring).
        batch: fixed batch of the graph (LiteRT graphs are static; ``None`` means 1).
        qat: int8 only: a :class:`edgemt.compress.qat.QATModel`. litert-torch converts its int8
            graph with the learned scales; the onnx2tf route cannot take them and calibrates the
            QAT-trained float weights on ``calibration`` instead (the metadata says which).
        float_cache: litert-torch fp32/fp16: a dict shared by the calls that export the SAME, unchanged model
            object; the fp32 flatbuffer is converted once and fp16 casts it (the export stage: one conversion,
            24 s on the demo student, instead of two).

    Raises:
        TFLiteExportError: the conversion failed; nothing is left at ``path``.
        ValueError: an unknown precision or route.
    """
    if precision not in TFLITE_PRECISIONS:
        raise ValueError(f"tflite precision must be one of {TFLITE_PRECISIONS}, got {precision!r}")
    if route not in TFLITE_ROUTES:
        raise ValueError(f"export.tflite_converter must be one of {TFLITE_ROUTES}, got {route!r}")
    tasks = list(getattr(model, "tasks", None) or [])
    if not tasks:
        raise TFLiteExportError("the model has no .tasks; export needs the task list to name the outputs")
    use_qat = qat is not None and precision == "int8" and route == "litert-torch"
    if precision == "int8" and not calibration and not use_qat:
        raise TFLiteExportError("tflite-int8 needs calibration images (export.calibration_images > 0)")
    names = [t.name for t in tasks]
    h, w = int(input_size[0]), int(input_size[1])
    b = 1 if batch is None else int(batch)
    path = Path(path)
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    x = torch.randn(b, 3, h, w, device=param.device if param is not None else "cpu")
    calibrated = 0
    try:
        if route == "onnx2tf":
            data, calibrated = _onnx2tf(model, names, x, precision, calibration or [], opset)
        else:
            named = _NamedOutputs(model, names).eval()
            try:
                if use_qat:
                    data = _litert_int8_from_qat(qat, x)
                elif precision == "int8":
                    data, calibrated = _litert_int8(named, x, calibration or [])
                else:
                    key = (id(model), b, h, w, getattr(model, "output_stride", None))
                    data = float_cache.get(key) if float_cache is not None else None
                    if data is None:
                        data = _litert_fp32(named, x)
                        if float_cache is not None:
                            float_cache[key] = data
                    if precision == "fp16":
                        data = _cast_weights_fp16(data)
            except TFLiteExportError:
                raise
            except Exception as e:
                raise TFLiteExportError(f"litert-torch conversion failed: {type(e).__name__}: {e}") from e
        meta = artifact_metadata(metadata, "edgemt-tflite/1", tasks, (h, w), b)
        meta["input_layout"] = "NCHW float32, normalised (int8 inputs: quantize with the input's scale/zero point)"
        meta["converter"] = route
        meta["tool_versions"] = json.dumps(tool_versions(TOOLS), sort_keys=True)
        if use_qat:
            from edgemt.compress.qat import QAT_SCHEME

            scheme = {**QAT_SCHEME, "format": "TFLite int8", "scales": "learned by QAT, kept as they are"}
            meta["quantization"] = json.dumps(scheme, sort_keys=True)
        elif precision == "int8":
            scheme = {
                "format": "TFLite int8",
                "activations": "int8, per-tensor, asymmetric",
                "weights": "int8, per-channel, symmetric",
                "method": "post-training static"
                + (", pt2e (litert-torch)" if route == "litert-torch" else ", TFLiteConverter representative dataset"),
                "calibration_images": calibrated,
            }
            if qat is not None:
                scheme["method"] += " of the QAT-trained weights (this converter cannot take QAT scales)"
            meta["quantization"] = json.dumps(scheme, sort_keys=True)
        elif precision == "fp16":
            meta["quantization"] = json.dumps({"format": "float16 weights", "activations": "float32 on CPU"})
        data = embed_tflite_metadata(data, meta)
        try:
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
        except OSError as e:
            raise TFLiteExportError(f"writing {path} failed: {e}") from e
    finally:
        model.train(was_training)
    return path


# ---------------------------------------------------------------- runtime


class TFLiteModel(StaticShapeRuntime):
    """A ``.tflite`` file run by LiteRT's interpreter (XNNPACK on CPU) through its signature runner.

    Int8 inputs and outputs (litert-torch's int8 graphs) are quantized and
    dequantized here with the tensors' own scale and zero point, so callers
    always pass and receive float32 NCHW arrays.
    """

    def __init__(self, path: str | Path, threads: int = 1, *, target: str = "tflite-fp32") -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: TFLite file does not exist")
        self.threads = int(threads)
        self.target = target
        self.metadata = read_tflite_metadata(self.path)
        try:
            self.interpreter = Interpreter(model_path=str(self.path), num_threads=self.threads)
            sigs = self.interpreter.get_signature_list()
            if SIGNATURE not in sigs:
                raise DataError(f"{self.path}: no {SIGNATURE!r} signature (found {sorted(sigs)})")
            self.runner = self.interpreter.get_signature_runner(SIGNATURE)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{self.path}: LiteRT cannot load the model ({type(e).__name__}: {e})") from None
        inputs = self.runner.get_input_details()
        if list(inputs) != [INPUT_NAME]:
            raise DataError(f"{self.path}: expected one input {INPUT_NAME!r}, found {sorted(inputs)}")
        self._in = inputs[INPUT_NAME]
        self.input_shape = [int(s) for s in self._in["shape"]]
        self._out = self.runner.get_output_details()
        entries = self.metadata.get("tasks")
        if isinstance(entries, list) and entries:
            self.tasks: list[Task] = [get_task(e["name"]).with_channels(int(e["channels"])) for e in entries]
        else:
            self.tasks = [get_task(n) for n in sorted(self._out)]
        missing = [t.name for t in self.tasks if t.name not in self._out]
        if missing:
            raise DataError(f"{self.path}: tasks {missing} are not signature outputs {sorted(self._out)}")

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    @property
    def input_dtype(self) -> Any:
        return self._in["dtype"]

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = np.asarray(images, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {x.shape}")
        dtype = self._in["dtype"]
        if dtype != np.float32:
            scale, zero = self._in["quantization"]
            info = np.iinfo(dtype)
            x = np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dtype)
        out = self.runner(**{INPUT_NAME: np.ascontiguousarray(x)})
        res = {}
        for t in self.tasks:
            v = out[t.name]
            if v.dtype != np.float32:
                scale, zero = self._out[t.name]["quantization"]
                v = (v.astype(np.float32) - zero) * scale
            res[t.name] = v
        return res

    def peak_memory(self, input_shape: Sequence[int]) -> dict[str, Any]:
        from .latency import runtime_peak_memory

        return runtime_peak_memory("tflite", self.path, input_shape, threads=self.threads)
