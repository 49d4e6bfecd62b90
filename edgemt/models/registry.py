"""One registry and one factory for every multi-task model.

Each variant is a thin function decorated with :func:`register_model`;
``create_model(name, tasks=..., **cfg)`` builds it and ``list_models('pat*')``
lists them. A built model records ``arch()`` (registry name, tasks, kwargs),
which together with a safetensors state dict rebuilds it without pickle.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgemt.errors import ConfigError, DataError
from edgemt.io import load_weights, read_json, save_weights, write_json
from edgemt.tasks import Task, get_task

__all__ = [
    "MultiTaskModel",
    "register_model",
    "create_model",
    "list_models",
    "model_from_arch",
    "save_model",
    "load_model",
    "graph_output_stride",
]

_REGISTRY: dict[str, Callable[..., MultiTaskModel]] = {}


class MultiTaskModel(nn.Module):
    """Base class: one image in, a dict of raw per-task outputs at input size out."""

    # Set by create_model so that arch() can rebuild the model.
    registry_name: str = ""
    # Strides the forward can end at: 1 = every output at the input size (the default); a model
    # whose heads predict at a coarser stride may also return them there (see graph_output_stride).
    output_strides: tuple[int, ...] = (1,)
    output_stride: int = 1
    registry_kwargs: dict[str, Any]

    def __init__(self, tasks: Sequence[Task]) -> None:
        super().__init__()
        if not tasks:
            raise ConfigError("a model needs at least one task")
        self.tasks = list(tasks)
        self.task_names = [t.name for t in tasks]
        self.registry_kwargs = {}

    def arch(self) -> dict[str, Any]:
        out = {
            "name": self.registry_name,
            "tasks": [{"name": t.name, "channels": t.channels} for t in self.tasks],
            "kwargs": dict(self.registry_kwargs),
        }
        pruned = getattr(self, "pruned_shapes", None)
        if pruned:
            out["pruned"] = {k: dict(v) for k, v in pruned.items()}
        deploy = getattr(self, "deploy_record", None)
        if deploy:
            out["deploy"] = dict(deploy)
        return out

    def extra_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary losses of the last forward pass (e.g. load balancing); none by default."""
        return {}


@contextlib.contextmanager
def graph_output_stride(model: nn.Module, stride: int) -> Iterator[nn.Module]:
    """While active, ``model`` returns its outputs at ``stride`` (1: the input size).

    Exporters use it to end a deployment graph at the heads' own resolution,
    leaving the last bilinear upsampling to the host (which may need only a
    region, or upsample on a GPU texture); the artifact records the stride.

    Raises:
        ConfigError: the model cannot end at that stride.
    """
    stride = int(stride)
    supported = tuple(getattr(model, "output_strides", (1,)))
    if stride not in supported:
        raise ConfigError(
            f"deploy.output_stride: {type(model).__name__} ({getattr(model, 'registry_name', '')}) returns its "
            f"outputs at stride {list(supported)}, not {stride}"
        )
    old = getattr(model, "output_stride", 1)
    model.output_stride = stride
    try:
        yield model
    finally:
        model.output_stride = old


def register_model(fn: Callable[..., MultiTaskModel]) -> Callable[..., MultiTaskModel]:
    name = fn.__name__.replace("_", "-")
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} registered twice")
    _REGISTRY[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    _import_builtin_models()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def _import_builtin_models() -> None:
    # Registered variants live in their own modules; importing them fills the registry.
    from edgemt.models import baseline, mlore, scamtl, student, taskexpert  # noqa: F401


def create_model(name: str, *, tasks: Sequence[Task], **kwargs: Any) -> MultiTaskModel:
    """Build registered model ``name`` for ``tasks``.

    Raises:
        ConfigError: unknown model name or keyword.
    """
    _import_builtin_models()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; registered: {sorted(_REGISTRY)}")
    try:
        model = _REGISTRY[name](tasks=list(tasks), **kwargs)
    except TypeError as e:
        raise ConfigError(f"model {name!r}: {e}") from None
    model.registry_name = name
    model.registry_kwargs = dict(kwargs)
    return model


def model_from_arch(arch: Mapping[str, Any]) -> MultiTaskModel:
    """Rebuild the model's structure from ``arch.json`` (weights are loaded separately).

    A structurally pruned model (``pruned``: the sizes of the layers that
    changed) is resized, and a reparameterized model (``deploy``: its form and
    the folded conv/BN pairs) gets the same structural changes replayed, in
    that order, so its weights load strictly.
    """
    try:
        tasks = [get_task(t["name"]).with_channels(t["channels"]) for t in arch["tasks"]]
        model = create_model(arch["name"], tasks=tasks, **arch.get("kwargs", {}))
        pruned = arch.get("pruned")
        if pruned:
            from edgemt.models.shapes import apply_shapes

            apply_shapes(model, pruned)
            model.pruned_shapes = {k: dict(v) for k, v in pruned.items()}
        deploy = arch.get("deploy")
        if deploy:
            _replay_deploy(model, deploy)
        return model
    except (KeyError, TypeError) as e:
        raise ConfigError(f"arch.json: missing or malformed field {e}") from None


def _replay_deploy(model: MultiTaskModel, deploy: Mapping[str, Any]) -> None:
    from edgemt.models.fold import apply_bn_fold

    model.eval()
    form = deploy.get("form", "training")
    if form != "training":
        if not hasattr(model, "set_form"):
            raise ConfigError(f"arch.json: deploy form {form!r} but model {model.registry_name!r} has no forms")
        for m in model.modules():  # structure only: the real gates come with the weights
            fg = getattr(m, "frozen_gates", None)
            if isinstance(fg, torch.Tensor):
                fg.nan_to_num_(0.0)
        model.set_form(form)
    apply_bn_fold(model, deploy.get("bn_folded", []))
    model.deploy_record = dict(deploy)


def save_model(directory: str | Path, model: MultiTaskModel, metadata: Mapping[str, str] | None = None) -> None:
    directory = Path(directory)
    write_json(directory / "arch.json", model.arch())
    save_weights(directory / "weights.safetensors", model.state_dict(), metadata)


def load_model(directory: str | Path, device: str = "cpu") -> MultiTaskModel:
    """Rebuild a model from ``arch.json`` + ``weights.safetensors`` (strict keys)."""
    directory = Path(directory)
    model = model_from_arch(read_json(directory / "arch.json"))
    state = load_weights(directory / "weights.safetensors", device=device)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise DataError(f"{directory / 'weights.safetensors'}: weights do not match arch.json ({e})") from None
    if missing or unexpected:
        raise DataError(
            f"{directory / 'weights.safetensors'}: weights do not match arch.json "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model.to(device)
