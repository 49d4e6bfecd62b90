"""The target table: one row per deployable format (name, format, precision,
suffix, deploy form, how to export, how to load its runtime).

A target name reads ``<format>-<precision>`` (``onnx-fp32``, ``tflite-int8``,
``coreml-pal4``). Each row says which runtime validates the artifact, whether
this host can run it, whether export needs calibration images, and whether
the format needs constant conv weights (then the exporter hands it a
static-weight deploy form, see ``deploy_form``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from edgemt.errors import ConfigError

from .coreml import coreml_runs_here

__all__ = ["TargetSpec", "TARGETS", "get_target"]


@dataclass(frozen=True)
class TargetSpec:
    """One export target.

    Attributes:
        deploy_form: the form the exporter gives the model's low-rank expert
            blocks when the model's own form does not suit the target
            (``factorized`` for static-weight targets; ``training`` means
            "as the model is").
        runs_here: whether this host can execute the artifact (Core ML cannot on Linux).
        directory: the artifact is a directory (``.mlpackage``), not a file.
    """

    name: str
    format: str
    precision: str
    suffix: str
    runtime: str
    deploy_form: str
    export: Callable[..., Path]
    load: Callable[..., Any]
    runs_here: bool = True
    needs_calibration: bool = False  # export() takes calibration=[(B, 3, H, W) arrays] from training images
    takes_qat: bool = False  # export() takes qat= (a QATModel) and keeps its learned quantization
    # The format needs constant conv weights (int8, XNNPACK, the Neural Engine): the dynamic-merge
    # form, whose kernels are computed per image, cannot be exported to it.
    static_weights: bool = False
    directory: bool = False
    # Static checks of an artifact this host cannot run: check(path, tasks, input_size, precision=) -> dict
    # with a one-line "summary"; and why it cannot run here.
    check: Callable[..., dict[str, Any]] | None = None
    not_here: str = ""


def _export_onnx_fp32(
    model: nn.Module,
    path: Path,
    *,
    input_size: tuple[int, int],
    metadata: dict[str, Any],
    opset: int = 18,
    batch: int | None = 1,
) -> Path:
    from edgemt.targets.onnx import export_onnx

    return export_onnx(model, path, input_size=input_size, batch=batch, opset=opset, metadata=metadata)


def _export_onnx_int8(model: nn.Module, path: Path, **kw: Any) -> Path:
    from edgemt.targets.onnx_int8 import export_onnx_int8

    return export_onnx_int8(model, path, **kw)


def _export_tflite(precision: str) -> Callable[..., Path]:
    def export(model: nn.Module, path: Path, *, opset: int = 18, route: str = "litert-torch", **kw: Any) -> Path:
        from edgemt.targets.tflite import export_tflite

        return export_tflite(model, path, precision=precision, route=route, opset=opset, **kw)

    return export


def _load_tflite(path: Path, *, threads: int, target: str) -> Any:
    from edgemt.targets.tflite import TFLiteModel

    return TFLiteModel(path, threads=threads, target=target)


def _export_coreml(precision: str) -> Callable[..., Path]:
    def export(model: nn.Module, path: Path, **kw: Any) -> Path:
        from edgemt.targets.coreml import export_coreml

        return export_coreml(model, path, precision=precision, **kw)

    return export


def _check_coreml(path: Path, tasks: Any, input_size: tuple[int, int], *, precision: str) -> dict[str, Any]:
    from edgemt.targets.coreml import check_coreml_program

    return check_coreml_program(path, tasks, input_size, precision=precision)


def _load_coreml(path: Path, *, threads: int, target: str) -> Any:
    from edgemt.targets.coreml import CoreMLModel

    return CoreMLModel(path, threads=threads, target=target)


def _load_onnx(path: Path, *, threads: int, target: str) -> Any:
    from edgemt.targets.runtime import OnnxRuntimeModel

    return OnnxRuntimeModel(path, threads=threads, target=target)


TARGETS: dict[str, TargetSpec] = {
    t.name: t
    for t in (
        TargetSpec("onnx-fp32", "onnx", "fp32", ".onnx", "onnxruntime", "training", _export_onnx_fp32, _load_onnx),
        TargetSpec(
            "onnx-int8",
            "onnx",
            "int8",
            ".onnx",
            "onnxruntime",
            "factorized",
            _export_onnx_int8,
            _load_onnx,
            needs_calibration=True,
            static_weights=True,
            takes_qat=True,
        ),
        *(
            TargetSpec(
                f"tflite-{p}",
                "tflite",
                p,
                ".tflite",
                "litert",
                "factorized",
                _export_tflite(p),
                _load_tflite,
                needs_calibration=p == "int8",
                takes_qat=p == "int8",
                static_weights=True,
            )
            for p in ("fp32", "fp16", "int8")
        ),
        *(
            TargetSpec(
                f"coreml-{p}",
                "coreml",
                p,
                ".mlpackage",
                "coreml",
                "factorized",
                _export_coreml(p),
                _load_coreml,
                runs_here=coreml_runs_here(),
                static_weights=True,
                directory=True,
                check=_check_coreml,
                not_here="Core ML prediction needs macOS",
            )
            for p in ("fp16", "int8w", "pal4")
        ),
    )
}


def get_target(name: str) -> TargetSpec:
    try:
        return TARGETS[name]
    except KeyError:
        raise ConfigError(f"unknown target {name!r}; available: {sorted(TARGETS)}") from None
