"""Core ML export (``coreml-fp16``, ``coreml-int8w``, ``coreml-pal4``), program checks and the macOS runtime.

Conversion: ``torch.export.export`` of the model (dict outputs as a tuple in
task order), ``run_decompositions({})``, then ``coremltools.convert`` to an
ML program (``.mlpackage``) with fp16 compute precision and iOS 16 as the
minimum deployment target (the first with the compressed-weight ops used
below). TorchScript tracing is not used: it breaks on dict outputs with
numpy 2.x. Weight compression runs on the fp16 program with
``coremltools.optimize.coreml``:

* ``int8w``: linear symmetric int8 weights, per output channel
  (``constexpr_affine_dequantize`` ops; activations stay fp16);
* ``pal4``: 4-bit palettization, a 16-entry k-means lookup table per weight
  tensor (``constexpr_lut_to_dense``; k-means needs scikit-learn).

Metadata: the same string map as the ONNX artifact's ``metadata_props``, in
the model's ``user_defined_metadata``.

Core ML runs only on macOS. On Linux, :func:`check_coreml_program` loads the
saved package without compiling it and checks what can be checked: one input
``image`` of the exported shape (float32), one output per task with the
expected channel count, every op of the program in coremltools' registry of
Core ML ops at the program's deployment target (nothing left to a custom
layer), and the compressed-weight ops the precision implies. Numerics and
latency are not measured there and the report says so. On macOS
:class:`CoreMLModel` predicts with ``MLModel.predict`` (compute units from
``EDGEMT_COREML_COMPUTE_UNITS``, default ``CPU_ONLY`` for comparable timings),
so validation runs the same way as for the other targets.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgemt.errors import DataError
from edgemt.io import atomic_dir, tool_versions
from edgemt.tasks import Task, get_task

from .onnx import INPUT_NAME, _TupleOutputs, artifact_metadata, decode_metadata
from .runtime import StaticShapeRuntime

__all__ = [
    "COREML_PRECISIONS",
    "CoreMLExportError",
    "coreml_runs_here",
    "export_coreml",
    "check_coreml_program",
    "read_coreml_metadata",
    "CoreMLModel",
]

COREML_PRECISIONS = ("fp16", "int8w", "pal4")
# The weight op each compressed precision must leave in the program.
_COMPRESSION_OPS = {
    "int8w": ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale"),
    "pal4": ("constexpr_lut_to_dense",),
}


class CoreMLExportError(RuntimeError):
    """The model could not be converted to Core ML, or the program failed its checks; nothing was written."""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Swallow coremltools' stderr chatter: a progress bar per pass, and at import on Linux one
    "Failed to load _MLModelProxy" line per native class (expected: prediction needs macOS)."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def _coremltools() -> Any:
    import logging

    log = logging.getLogger("coremltools")
    level = log.level
    try:
        log.setLevel(logging.ERROR)  # its import logs one warning per native class it cannot load off macOS
        with _quiet():
            import coremltools as ct
    except ImportError as e:
        raise CoreMLExportError("Core ML targets need coremltools (pip install 'edgemt[coreml]')") from e
    finally:
        log.setLevel(level)
    return ct


def coreml_runs_here() -> bool:
    """Core ML prediction needs macOS (the Core ML framework)."""
    return sys.platform == "darwin"


def _compress(mlmodel: Any, precision: str) -> Any:
    from coremltools.optimize.coreml import (
        OpLinearQuantizerConfig,
        OpPalettizerConfig,
        OptimizationConfig,
        linear_quantize_weights,
        palettize_weights,
    )

    if precision == "int8w":
        cfg = OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
        return linear_quantize_weights(mlmodel, OptimizationConfig(global_config=cfg))
    if precision == "pal4":
        try:
            import sklearn  # noqa: F401  (k-means palettization)
        except ImportError as e:
            raise CoreMLExportError("coreml-pal4 needs scikit-learn for k-means palettization") from e
        cfg = OpPalettizerConfig(mode="kmeans", nbits=4)
        return palettize_weights(mlmodel, OptimizationConfig(global_config=cfg))
    return mlmodel


def export_coreml(
    model: nn.Module,
    path: str | Path,
    *,
    precision: str,
    input_size: tuple[int, int],
    metadata: Mapping[str, Any] | None = None,
    batch: int | None = 1,
    **_: Any,
) -> Path:
    """Convert ``model`` to an ``.mlpackage`` directory at ``path`` (replaced atomically) and check it.

    Raises:
        CoreMLExportError: conversion, compression or the program checks failed; nothing is left at ``path``.
    """
    ct = _coremltools()
    if precision not in COREML_PRECISIONS:
        raise ValueError(f"Core ML precision must be one of {COREML_PRECISIONS}, got {precision!r}")
    tasks = list(getattr(model, "tasks", None) or [])
    if not tasks:
        raise CoreMLExportError("the model has no .tasks; export needs the task list to name the outputs")
    names = [t.name for t in tasks]
    h, w = int(input_size[0]), int(input_size[1])
    b = 1 if batch is None else int(batch)
    path = Path(path)
    was_training = model.training
    wrapper = _TupleOutputs(model, names).eval()
    x = torch.randn(b, 3, h, w)
    try:
        try:
            program = torch.export.export(wrapper, (x,)).run_decompositions({})
            with _quiet():
                mlmodel = ct.convert(
                    program,
                    convert_to="mlprogram",
                    inputs=[ct.TensorType(name=INPUT_NAME, shape=(b, 3, h, w), dtype=np.float32)],
                    outputs=[ct.TensorType(name=n) for n in names],
                    compute_precision=ct.precision.FLOAT16,
                    minimum_deployment_target=ct.target.iOS16,
                )
                mlmodel = _compress(mlmodel, precision)
        except CoreMLExportError:
            raise
        except Exception as e:
            raise CoreMLExportError(f"coremltools conversion failed: {type(e).__name__}: {e}") from e
        meta = artifact_metadata(metadata, "edgemt-coreml/1", tasks, (h, w), b)
        meta["compute_precision"] = "fp16"
        meta["weights"] = {"fp16": "fp16", "int8w": "int8 per-channel symmetric", "pal4": "4-bit k-means palette"}[
            precision
        ]
        meta["tool_versions"] = json.dumps(tool_versions(("coremltools", "scikit-learn")), sort_keys=True)
        for k, v in meta.items():
            mlmodel.user_defined_metadata[k] = v
        with atomic_dir(path) as tmp:
            pkg = tmp / "model.mlpackage"
            mlmodel.save(str(pkg))
            check_coreml_program(pkg, tasks, (h, w), precision=precision, batch=b)
            # atomic_dir replaces `path` with the directory `tmp`: move the package's contents up.
            for child in pkg.iterdir():
                child.rename(tmp / child.name)
            pkg.rmdir()
    except OSError as e:
        raise CoreMLExportError(f"writing {path} failed: {e}") from e
    finally:
        model.train(was_training)
    return path


def _program_ops(spec: Any) -> Counter:
    ops: Counter = Counter()

    def walk(block: Any) -> None:
        for op in block.operations:
            ops[op.type] += 1
            for inner in op.blocks:
                walk(inner)

    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            walk(block)
    return ops


def check_coreml_program(
    path: str | Path,
    tasks: Sequence[Task] | None = None,
    input_size: tuple[int, int] | None = None,
    *,
    precision: str | None = None,
    batch: int = 1,
) -> dict[str, Any]:
    """Check a saved ``.mlpackage`` without running it (works on Linux); return what was checked.

    Checks: an ML program; one float32 input ``image`` of shape ``(batch, 3, H, W)``;
    one output per task (named by the task) with its channel count; every op in
    coremltools' Core ML op registry at an opset no newer than the program's
    specification version; for ``int8w``/``pal4``, the compressed-weight op present.

    Raises:
        CoreMLExportError: naming every failed check.
    """
    ct = _coremltools()
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry
    from coremltools.proto import FeatureTypes_pb2

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: Core ML package does not exist")
    try:
        mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    except Exception as e:
        raise DataError(f"{path}: coremltools cannot read the package ({type(e).__name__}: {e})") from None
    spec = mlmodel.get_spec()
    problems: list[str] = []
    if spec.WhichOneof("Type") != "mlProgram":
        problems.append(f"model type is {spec.WhichOneof('Type')!r}, expected an ML program")
    inputs = {i.name: i for i in spec.description.input}
    outputs = {o.name: o for o in spec.description.output}
    if list(inputs) != [INPUT_NAME]:
        problems.append(f"inputs are {list(inputs)}, expected [{INPUT_NAME!r}]")
    else:
        arr = inputs[INPUT_NAME].type.multiArrayType
        shape = [int(s) for s in arr.shape]
        if input_size is not None and shape != [batch, 3, *input_size]:
            problems.append(f"input shape {shape}, expected {[batch, 3, *input_size]}")
        if arr.dataType != FeatureTypes_pb2.ArrayFeatureType.FLOAT32:
            problems.append(f"input data type {arr.dataType}, expected FLOAT32")
    ops = _program_ops(spec)
    version = int(spec.specificationVersion)
    unknown = sorted(op for op in ops if op not in SSAOpRegistry.core_ops)
    too_new = sorted(
        op
        for op in ops
        if op in SSAOpRegistry.core_ops and min(int(v.value) for v in SSAOpRegistry.core_ops[op]) > version
    )
    if unknown:
        problems.append(f"ops not in the Core ML op set: {unknown}")
    if too_new:
        problems.append(f"ops newer than the program's specification version {version}: {too_new}")
    if precision in _COMPRESSION_OPS and not any(ops.get(op) for op in _COMPRESSION_OPS[precision]):
        problems.append(f"{precision}: none of {list(_COMPRESSION_OPS[precision])} in the program")
    output_shapes: dict[str, list[int]] = {}
    if tasks is not None:
        expected = [t.name for t in tasks]
        if sorted(outputs) != sorted(expected):
            problems.append(f"outputs are {sorted(outputs)}, expected {sorted(expected)}")
        for t in tasks:
            if t.name in outputs:
                shape = [int(s) for s in outputs[t.name].type.multiArrayType.shape]
                output_shapes[t.name] = shape
                if shape and (len(shape) != 4 or shape[1] != t.channels):
                    problems.append(f"output {t.name} has shape {shape}, expected (B, {t.channels}, H, W)")
    if problems:
        raise CoreMLExportError(f"{path.name}: " + "; ".join(problems))
    compressed = {op: ops[op] for ops_ in _COMPRESSION_OPS.values() for op in ops_ if ops.get(op)}
    summary = (
        f"input image {[int(s) for s in inputs[INPUT_NAME].type.multiArrayType.shape]} float32, "
        f"outputs {', '.join(sorted(outputs))}; {sum(ops.values())} ops of {len(ops)} types, all in the Core ML "
        f"op set of specification {version}"
        + (f"; compressed weights: {', '.join(f'{n} {op} ops' for op, n in compressed.items())}" if compressed else "")
    )
    return {
        "summary": summary,
        "inputs": {n: [int(s) for s in i.type.multiArrayType.shape] for n, i in inputs.items()},
        "outputs": output_shapes or sorted(outputs),
        "ops": dict(sorted(ops.items())),
        "n_ops": int(sum(ops.values())),
        "specification_version": version,
        "checks": "inputs, outputs, op set, compressed-weight ops",
    }


def read_coreml_metadata(path: str | Path) -> dict[str, Any]:
    """The ``user_defined_metadata`` of a saved package, JSON values decoded (no model compilation)."""
    ct = _coremltools()

    try:
        mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    except Exception as e:
        raise DataError(f"{path}: coremltools cannot read the package ({type(e).__name__}: {e})") from None
    return decode_metadata(dict(mlmodel.user_defined_metadata))


def _package_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class CoreMLModel(StaticShapeRuntime):
    """A ``.mlpackage`` run through Core ML (macOS only; elsewhere construction raises ``DataError``).

    Compute units come from ``EDGEMT_COREML_COMPUTE_UNITS`` (``CPU_ONLY`` by
    default, ``ALL`` to allow the GPU and Neural Engine). ``threads`` is
    recorded for the report; Core ML does not expose a thread count.
    """

    def __init__(self, path: str | Path, threads: int = 1, *, target: str = "coreml-fp16") -> None:
        self.path = Path(path)
        self.threads = int(threads)
        self.target = target
        if not coreml_runs_here():
            raise DataError(f"{self.path}: Core ML prediction needs macOS (this host is {sys.platform})")
        ct = _coremltools()

        units = os.environ.get("EDGEMT_COREML_COMPUTE_UNITS", "CPU_ONLY")
        try:
            compute_units = getattr(ct.ComputeUnit, units)
        except AttributeError:
            raise DataError(
                f"EDGEMT_COREML_COMPUTE_UNITS={units!r}: expected one of CPU_ONLY, CPU_AND_GPU, CPU_AND_NE, ALL"
            ) from None
        self.metadata = read_coreml_metadata(self.path)
        self.mlmodel = ct.models.MLModel(str(self.path), compute_units=compute_units)
        entries = self.metadata.get("tasks") or []
        self.tasks = [get_task(e["name"]).with_channels(int(e["channels"])) for e in entries]
        if not self.tasks:
            raise DataError(f"{self.path}: no EdgeMT task metadata")
        arr = self.mlmodel.get_spec().description.input[0].type.multiArrayType
        self.input_shape = [int(s) for s in arr.shape]

    @property
    def size_bytes(self) -> int:
        return _package_size(self.path)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(images, dtype=np.float32)
        out = self.mlmodel.predict({INPUT_NAME: x})
        return {t.name: np.asarray(out[t.name], dtype=np.float32) for t in self.tasks}
