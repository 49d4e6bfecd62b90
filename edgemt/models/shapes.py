"""Layer sizes of a structurally pruned model, recorded in ``arch.json`` and replayed on load.

Structured pruning changes the channel counts of convolutions, linear layers
and BatchNorms; the registry's constructor builds the unpruned sizes.
:func:`layer_shapes` records, per such module, its sizes; :func:`shape_diff`
keeps the modules whose sizes changed; :func:`apply_shapes` resizes a freshly
built model's modules to them (fresh uninitialised tensors of the new shapes,
the weights come from the safetensors file), then lets modules with
size-dependent attributes refresh them (``sync_shapes()``). No pickle is
involved: the record is plain JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from edgemt.errors import ConfigError

__all__ = ["layer_shapes", "shape_diff", "apply_shapes"]


def _entry(m: nn.Module) -> dict[str, int] | None:
    if isinstance(m, nn.Conv2d):
        return {"in": m.in_channels, "out": m.out_channels, "groups": m.groups}
    if isinstance(m, nn.Linear):
        return {"in": m.in_features, "out": m.out_features}
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return {"features": m.num_features}
    return None


def layer_shapes(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{module name: sizes}`` for every Conv2d, Linear and BatchNorm of ``model``."""
    out = {}
    for name, m in model.named_modules():
        e = _entry(m)
        if e is not None:
            out[name] = e
    return out


def shape_diff(before: Mapping[str, Mapping[str, int]], after: Mapping[str, Mapping[str, int]]) -> dict[str, dict]:
    """The entries of ``after`` that differ from ``before``."""
    return {k: dict(v) for k, v in after.items() if dict(before.get(k, {})) != dict(v)}


def _resize(m: nn.Module, e: Mapping[str, int], name: str) -> None:
    def fresh(t: torch.Tensor | None, shape: tuple[int, ...]) -> Any:
        if t is None:
            return None
        new = torch.empty(shape, dtype=t.dtype, device=t.device)
        return nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new

    if isinstance(m, nn.Conv2d):
        cin, cout, groups = int(e["in"]), int(e["out"]), int(e["groups"])
        if cin % groups or cout % groups:
            raise ConfigError(f"arch.json pruned.{name}: in={cin}, out={cout} not divisible by groups={groups}")
        m.in_channels, m.out_channels, m.groups = cin, cout, groups
        m.weight = fresh(m.weight, (cout, cin // groups, *m.kernel_size))
        if m.bias is not None:
            m.bias = fresh(m.bias, (cout,))
    elif isinstance(m, nn.Linear):
        m.in_features, m.out_features = int(e["in"]), int(e["out"])
        m.weight = fresh(m.weight, (m.out_features, m.in_features))
        if m.bias is not None:
            m.bias = fresh(m.bias, (m.out_features,))
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        n = int(e["features"])
        m.num_features = n
        for attr in ("weight", "bias"):
            if getattr(m, attr) is not None:
                setattr(m, attr, fresh(getattr(m, attr), (n,)))
        for attr in ("running_mean", "running_var"):
            if getattr(m, attr, None) is not None:
                setattr(m, attr, fresh(getattr(m, attr), (n,)))
    else:
        raise ConfigError(f"arch.json pruned.{name}: {type(m).__name__} has no recorded sizes")


def apply_shapes(model: nn.Module, shapes: Mapping[str, Mapping[str, int]]) -> None:
    """Resize ``model``'s modules to the recorded ``shapes`` (see the module docstring)."""
    modules = dict(model.named_modules())
    for name, e in shapes.items():
        if name not in modules:
            raise ConfigError(f"arch.json pruned: no module {name!r} in {type(model).__name__}")
        _resize(modules[name], e, name)
    for m in model.modules():
        sync = getattr(m, "sync_shapes", None)
        if callable(sync) and m is not model:
            sync()
