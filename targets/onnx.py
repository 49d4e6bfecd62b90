"""ONNX export of a multi-task model, with metadata embedded in the file.

The graph has one input, ``image`` (``(B, 3, H, W)`` float32, already
normalised), and one output per task, named by the task and holding the task's
*raw* output ``(B, channels, H, W)``. Activations stay outside the graph (see
:mod:`edgemt.tasks`): the runtime side applies :func:`edgemt.tasks.activate`,
the same function the PyTorch model goes through, so parity compares like with
like and the L2 normalisation of normals never enters an int8 graph.

Export uses the dynamo exporter (``torch.onnx.export(..., dynamo=True)``);
TorchScript tracing breaks on dict outputs with numpy 2.x. The model's dict
output is turned into a tuple in task order by :class:`_TupleOutputs`, so the
output names line up with the tasks by position.

Every artifact carries metadata in ``ModelProto.metadata_props`` (string
key -> string value; structured values are JSON): tasks with channels and
activations, classes, input size, normalisation mean/std, deploy form, the hash
of the source artifact and the tool versions. :func:`read_onnx_metadata` reads
it back with the JSON decoded; ONNX Runtime exposes the same map through
``InferenceSession.get_modelmeta().custom_metadata_map``.

The file is written atomically: the exporter writes a temporary file beside
the destination, which is checked (``onnx.checker``) and renamed over it only
when everything succeeded. A failed export raises :class:`OnnxExportError`
and leaves no file behind.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgemt.io import atomic_path, tool_versions
from edgemt.tasks import Task

__all__ = [
    "INPUT_NAME",
    "OnnxExportError",
    "make_metadata",
    "export_onnx",
    "read_onnx_metadata",
    "decode_metadata",
]

INPUT_NAME = "image"
# Name of the dynamic batch axis when ``batch=None``.
BATCH_DIM = "batch"


class OnnxExportError(RuntimeError):
    """The model could not be exported to (or checked as) ONNX; no file was written."""


class _TupleOutputs(nn.Module):
    """Returns the model's dict of raw outputs as a tuple in task order.

    Tuple outputs make the ONNX output order, and thus the output names given
    to the exporter, independent of how the model builds its dict.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(image)
        return tuple(out[n] for n in self.names)


def _task_entries(tasks: Sequence[Task]) -> list[dict[str, Any]]:
    return [{"name": t.name, "channels": t.channels, "activation": t.activation, "metric": t.metric} for t in tasks]


def make_metadata(
    tasks: Sequence[Task],
    *,
    input_size: tuple[int, int],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    classes: Mapping[str, Sequence[str]] | None = None,
    deploy_form: str = "",
    source_hash: str = "",
    model_name: str = "",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The standard metadata of an EdgeMT artifact, as ``metadata_props`` strings.

    Structured values are JSON so that any consumer (ONNX Runtime's
    ``custom_metadata_map``, Netron, a C++ app) can read them without EdgeMT.

    Args:
        tasks: the model's tasks (name, channels, activation, primary metric).
        input_size: ``(H, W)`` the graph was exported at.
        mean, std: the per-channel normalisation the input must already carry.
        classes: class names per class task (``{"semseg": [...]}``), if known.
        deploy_form: which form of the model this is (e.g. ``merged-experts``).
        source_hash: hash of the artifact (weights) the export came from.
        model_name: registry name of the model.
        extra: further keys; non-string values are JSON-encoded.
    """
    meta: dict[str, Any] = {
        "edgemt.format": "edgemt-onnx/1",
        "tasks": _task_entries(tasks),
        "input_name": INPUT_NAME,
        "input_size": [int(input_size[0]), int(input_size[1])],
        "input_layout": "NCHW float32, normalised",
        "outputs": "raw (before activation); apply edgemt.tasks.activate",
        "normalisation": {
            "mean": list(mean) if mean is not None else None,
            "std": list(std) if std is not None else None,
        },
        "classes": {k: list(v) for k, v in (classes or {}).items()},
        "deploy_form": deploy_form,
        "source_hash": source_hash,
        "model": model_name,
        "tool_versions": tool_versions(("onnxscript", "onnxslim")),
    }
    meta.update(extra or {})
    return {k: _encode(v) for k, v in meta.items()}


def _encode(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def artifact_metadata(
    metadata: Mapping[str, Any] | None, fmt: str, tasks: Sequence[Task], size: tuple[int, int], batch: int
) -> dict[str, str]:
    """The string entries every non-ONNX artifact (TFLite, Core ML) starts from: the caller's metadata
    JSON-encoded, plus the format tag, tasks, input size and name, and batch the runtimes rely on."""
    meta = {k: (v if isinstance(v, str) else json.dumps(v, sort_keys=True)) for k, v in (metadata or {}).items()}
    meta["edgemt.format"] = fmt
    meta.setdefault("tasks", json.dumps([{"name": t.name, "channels": t.channels} for t in tasks]))
    meta.setdefault("input_size", json.dumps([int(size[0]), int(size[1])]))
    meta["input_name"] = INPUT_NAME
    meta["batch"] = json.dumps(batch)
    return meta


def decode_metadata(props: Mapping[str, str]) -> dict[str, Any]:
    """Decode JSON-encoded values of a metadata map; other strings stay strings.

    A string that happens to be valid JSON (``"1"``, ``"true"``) decodes to
    that value; EdgeMT writes numbers and structures as JSON on purpose.
    """
    out: dict[str, Any] = {}
    for k, v in props.items():
        try:
            out[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            out[k] = v
    return out


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The ``metadata_props`` of an ONNX file with JSON values decoded."""
    import onnx

    # Only the model header is needed, but onnx has no partial reader; the
    # exported files are small (external data is off), so a full load is fine.
    model = onnx.load(str(path), load_external_data=False)
    return decode_metadata({p.key: p.value for p in model.metadata_props})


def _model_tasks(model: nn.Module) -> list[Task]:
    tasks = getattr(model, "tasks", None)
    if not tasks:
        raise OnnxExportError("the model has no .tasks; export needs the task list to name the outputs")
    return list(tasks)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    input_size: tuple[int, int],
    batch: int | None = 1,
    opset: int = 18,
    metadata: Mapping[str, Any] | None = None,
    slim: bool = False,
    postprocess: Callable[[Any], Any] | None = None,
) -> Path:
    """Export ``model`` to an ONNX file at ``path`` and return the path.

    Args:
        model: a multi-task model whose forward returns ``{task: raw (B,C,H,W)}``
            and which has ``.tasks``. It is exported in eval mode; its mode is
            restored afterwards.
        path: destination ``.onnx`` file (parents are created).
        input_size: ``(H, W)`` of the input; fixed in the graph.
        batch: a fixed batch size, or ``None`` for a dynamic batch axis named
            ``batch`` (min 1). Edge runtimes (LiteRT via onnx2tf, TensorRT)
            prefer a static batch of 1, hence the default.
        opset: ONNX opset of the default domain.
        metadata: ``metadata_props`` to embed (see :func:`make_metadata`);
            non-string values are JSON-encoded. Keys missing from it that the
            runtime needs (``tasks``, ``input_size``, ``input_name``,
            ``tool_versions``) are filled in from the model.
        slim: run onnxslim on the exported graph. Off by default: measured
            on baseline-s (96x128) and baseline-m (480x640) it kept the node
            count (the exporter already folds constants and BatchNorm), cut
            the file by 2-5% (value_info/naming), left parity unchanged and
            gave no latency difference beyond run-to-run noise on ORT CPU,
            which applies the same fusions itself.
        postprocess: a rewrite of the exported ``ModelProto`` applied before
            the metadata is written and the checker runs (the QAT int8 export
            uses it to move activations to uint8).

    Raises:
        OnnxExportError: the exporter or the checker failed. No file is left
            at ``path`` (an existing file there is kept unchanged).
    """
    import onnx

    path = Path(path)
    tasks = _model_tasks(model)
    names = [t.name for t in tasks]
    h, w = int(input_size[0]), int(input_size[1])
    example_batch = 1 if batch is None else int(batch)
    if example_batch < 1 or h < 1 or w < 1:
        raise ValueError(f"batch and input_size must be positive, got batch={batch}, input_size={input_size}")

    meta = {k: _encode(v) for k, v in (metadata or {}).items()}
    defaults = make_metadata(tasks, input_size=(h, w), model_name=getattr(model, "registry_name", ""))
    for key in ("edgemt.format", "tasks", "input_name", "input_size", "outputs", "tool_versions", "model"):
        meta.setdefault(key, defaults[key])
    meta["opset"] = _encode(int(opset))
    meta["batch"] = "dynamic" if batch is None else _encode(example_batch)

    wrapper = _TupleOutputs(model, names)
    was_training = model.training
    # eval() on the wrapper matters: a freshly built wrapper is in training
    # mode and the exporter warns (and BatchNorm would trace its train branch).
    wrapper.eval()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.randn(example_batch, 3, h, w, device=device)
    dynamic_shapes = ({0: torch.export.Dim(BATCH_DIM, min=1, max=4096)},) if batch is None else None

    try:
        with atomic_path(path) as tmp, warnings.catch_warnings():
            # The exporter is chatty (deprecations, "draft export" notes); real
            # failures raise, so the warnings carry no information for users.
            warnings.simplefilter("ignore")
            try:
                program = torch.onnx.export(
                    wrapper,
                    (x,),
                    dynamo=True,
                    external_data=False,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=names,
                    dynamic_shapes=dynamic_shapes,
                    verbose=False,
                )
            except Exception as e:
                raise OnnxExportError(f"torch.onnx.export failed for {path.name}: {type(e).__name__}: {e}") from e
            if program is None:
                raise OnnxExportError("torch.onnx.export returned no program")
            proto = program.model_proto
            if slim:
                proto = _slim(proto)
            if postprocess is not None:
                proto = postprocess(proto)
            del proto.metadata_props[:]
            for k, v in sorted(meta.items()):
                entry = proto.metadata_props.add()
                entry.key, entry.value = k, v
            _check_outputs(proto, names)
            try:
                onnx.checker.check_model(proto, full_check=True)
            except Exception as e:
                raise OnnxExportError(f"onnx.checker rejected the exported graph: {e}") from e
            onnx.save_model(proto, str(tmp))
    except OSError as e:
        # An unwritable or invalid destination: same contract as a failed export.
        raise OnnxExportError(f"export to {path} failed: {type(e).__name__}: {e}") from e
    finally:
        model.train(was_training)
    return path


def _check_outputs(proto: Any, names: Sequence[str]) -> None:
    """The graph's input/outputs must carry the names the runtime relies on."""
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if inputs != [INPUT_NAME] or outputs != list(names):
        raise OnnxExportError(
            f"exported graph has inputs {inputs} and outputs {outputs}; expected [{INPUT_NAME!r}] and {list(names)}"
        )


def _slim(proto: Any) -> Any:
    try:
        import onnxslim
    except ImportError as e:  # optional extra
        raise OnnxExportError("slim=True needs onnxslim (pip install 'edgemt[export]')") from e
    try:
        return onnxslim.slim(proto)
    except Exception as e:
        raise OnnxExportError(f"onnxslim failed: {e}") from e
