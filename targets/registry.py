"""The target table: one row per deployable format (name, format, precision,
suffix, deploy form, how to export, how to load its runtime).

A target name reads ``<format>-<precision>`` (``onnx-fp32``). Later targets
(ONNX int8, TFLite, Core ML) are rows added here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from edgemt.errors import ConfigError

__all__ = ["TargetSpec", "TARGETS", "get_target"]


@dataclass(frozen=True)
class TargetSpec:
    """One export target.

    Attributes:
        deploy_form: how the model's low-rank expert blocks are laid out in the
            exported graph (``training`` for models without expert blocks).
        runs_here: whether this host can execute the artifact (Core ML cannot on Linux).
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
    # The format needs constant conv weights (int8, XNNPACK, the Neural Engine): the dynamic-merge
    # form, whose kernels are computed per image, cannot be exported to it.
    static_weights: bool = False


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
        ),
    )
}


def get_target(name: str) -> TargetSpec:
    try:
        return TARGETS[name]
    except KeyError:
        raise ConfigError(f"unknown target {name!r}; available: {sorted(TARGETS)}") from None
