"""Runtimes with one interface, so validation treats PyTorch and ONNX alike.

Each runtime has ``.run(images) -> {task: raw ndarray}`` taking a float32
``(B, 3, H, W)`` array of normalised images and returning the *raw* outputs
(before activation), plus ``.tasks`` (registry entries with the artifact's
channel counts), ``.metadata`` (dict), ``.threads`` and ``.target`` (a label
for reports). :class:`OnnxRuntimeModel` runs an exported ``.onnx`` file with
ONNX Runtime on the CPU; :class:`TorchModel` adapts an ``nn.Module`` that
returns ``{task: raw tensor}``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgemt.errors import DataError
from edgemt.tasks import Task, get_task

from .latency import onnx_peak_memory
from .onnx import decode_metadata

__all__ = ["OnnxRuntimeModel", "TorchModel", "StaticShapeRuntime", "as_runtime", "outputs_at_input_size"]


def outputs_at_input_size(outputs: dict[str, np.ndarray], size: Sequence[int]) -> dict[str, np.ndarray]:
    """Raw outputs upsampled to ``size`` (H, W) where a graph ended early (``deploy.output_stride`` > 1).

    The same bilinear resize (half-pixel centres, ``align_corners=False``) the
    model would have run as its last op, done on the host; outputs already at
    ``size`` pass through untouched.

    Raises:
        DataError: an output whose size is not ``size`` divided by a whole stride.
    """
    h, w = int(size[0]), int(size[1])
    out = {}
    for name, arr in outputs.items():
        oh, ow = arr.shape[-2:]
        if (oh, ow) == (h, w):
            out[name] = arr
            continue
        if oh < 1 or ow < 1 or h % oh or w % ow or h // oh != w // ow:
            raise DataError(f"output {name!r} is {oh}x{ow}: not the input size {h}x{w} divided by a whole stride")
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        out[name] = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False).numpy()
    return out


class StaticShapeRuntime:
    """For runtimes whose graph has a fixed ``input_shape`` ``[B, 3, H, W]`` (LiteRT, Core ML)."""

    input_shape: list[int]

    @property
    def input_size(self) -> tuple[int, int]:
        return self.input_shape[2], self.input_shape[3]

    @property
    def fixed_batch(self) -> int:
        return self.input_shape[0]


def _as_float32(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {images.shape}")
    return np.ascontiguousarray(images, dtype=np.float32)


class OnnxRuntimeModel:
    """An exported ONNX model run by ONNX Runtime.

    Session options aim at reproducible, comparable latency on edge CPUs: a
    fixed number of intra-op threads (stated in every report), one inter-op
    thread and sequential execution (multi-task graphs have parallel heads,
    but parallel execution makes timings depend on the host's idle cores), and
    all graph optimisations (what a deployment would use).

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads.
        providers: ONNX Runtime execution providers (CPU by default).
        target: label for reports, e.g. ``onnx-fp32``.
    """

    def __init__(
        self,
        path: str | Path,
        threads: int = 1,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        target: str = "onnx-fp32",
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: ONNX file does not exist")
        self.threads = int(threads)
        self.target = target
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=list(providers))
        except Exception as e:  # ORT raises its own exception types for bad files
            raise DataError(f"{self.path}: ONNX Runtime cannot load the model ({e})") from None
        self.metadata: dict[str, Any] = decode_metadata(self.session.get_modelmeta().custom_metadata_map)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise DataError(f"{self.path}: expected one image input, found {[i.name for i in inputs]}")
        self.input_name = inputs[0].name
        self.input_shape = list(inputs[0].shape)  # symbolic dims are strings
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.tasks = self._tasks_from_metadata()

    def _tasks_from_metadata(self) -> list[Task]:
        entries = self.metadata.get("tasks")
        if isinstance(entries, list) and entries:
            tasks = [get_task(e["name"]).with_channels(int(e["channels"])) for e in entries]
        else:
            # A foreign file without EdgeMT metadata: outputs named by task.
            tasks = [get_task(n) for n in self.output_names]
        missing = [t.name for t in tasks if t.name not in self.output_names]
        if missing:
            raise DataError(
                f"{self.path}: metadata names tasks {missing} that are not graph outputs {self.output_names}"
            )
        return tasks

    @property
    def input_size(self) -> tuple[int, int] | None:
        """``(H, W)`` fixed in the graph, or ``None`` if either is dynamic."""
        h, w = self.input_shape[2], self.input_shape[3]
        return (h, w) if isinstance(h, int) and isinstance(w, int) else None

    @property
    def fixed_batch(self) -> int | None:
        b = self.input_shape[0]
        return b if isinstance(b, int) else None

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Raw outputs ``{task: (B, C, H, W) float32}`` for normalised images."""
        x = _as_float32(images)
        names = [t.name for t in self.tasks]
        outs = self.session.run(names, {self.input_name: x})
        return dict(zip(names, outs))

    def peak_memory(self, input_shape: Sequence[int]) -> dict[str, Any]:
        """Peak memory of this model in a fresh process (see :func:`onnx_peak_memory`)."""
        return onnx_peak_memory(self.path, input_shape, threads=self.threads)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class TorchModel:
    """An ``nn.Module`` behind the runtime interface (eval mode, no grad).

    The module is switched to eval mode in place: validation must see the
    inference behaviour (BatchNorm running statistics, no dropout).

    Args:
        model: returns ``{task: raw (B, C, H, W)}``; must have ``.tasks``
            unless ``tasks`` is given.
        tasks: overrides ``model.tasks``.
        device: where the model runs; outputs come back as CPU numpy.
        threads: torch intra-op threads while running (restored after);
            ``None`` keeps the process setting.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        tasks: Sequence[Task] | None = None,
        device: str | torch.device = "cpu",
        threads: int | None = None,
        target: str = "pytorch",
    ) -> None:
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.tasks = list(tasks if tasks is not None else getattr(model, "tasks", []))
        if not self.tasks:
            raise ValueError("TorchModel needs the task list (model.tasks or tasks=)")
        self._threads = threads
        self.target = target
        arch = getattr(model, "arch", None)
        self.metadata: dict[str, Any] = {"arch": arch()} if callable(arch) else {}

    @property
    def threads(self) -> int:
        """Intra-op threads used by :meth:`run` (the process setting when not fixed)."""
        return self._threads if self._threads is not None else torch.get_num_threads()

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(_as_float32(images)).to(self.device)
        with _torch_threads(self._threads), torch.no_grad():
            out = self.model(x)
        return {t.name: out[t.name].detach().float().cpu().numpy() for t in self.tasks}


def as_runtime(obj: Any) -> Any:
    """An object with ``.run``: runtimes pass through, ``nn.Module`` gets a :class:`TorchModel`."""
    if isinstance(obj, nn.Module):
        return TorchModel(obj)
    if not callable(getattr(obj, "run", None)):
        raise TypeError(f"expected a runtime with .run(images) or an nn.Module, got {type(obj).__name__}")
    return obj
