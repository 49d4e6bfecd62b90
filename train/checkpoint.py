"""Training checkpoints as safetensors + JSON, written atomically, with exact resume.

One checkpoint is two files in ``<run>/checkpoints/``:

* ``step-0000100.safetensors``: model weights (``model/...``), optimizer tensors
  (``optim/<param index>/<key>``) and the torch RNG state (``rng/torch``);
* ``step-0000100.json``: step, epoch position, optimizer param groups and
  non-tensor state, history. It is written last, so a checkpoint whose JSON
  exists is complete.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from edgemt.errors import DataError
from edgemt.io import load_weights, read_json, save_weights, write_json

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "prune_checkpoints"]

_NAME = re.compile(r"^step-(\d{7})\.json$")


def _optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim/{idx}/{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim/"):
            _, idx, k = key.split("/", 2)
            state.setdefault(int(idx), {})[k] = v
    for idx, st in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    directory: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]
) -> Path:
    """Write checkpoint ``step``; returns the JSON path (the completion marker)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_to_flat(optimizer)
    tensors.update(opt_tensors)
    tensors["rng/torch"] = torch.get_rng_state()
    base = directory / f"step-{step:07d}"
    save_weights(base.with_suffix(".safetensors"), tensors)
    write_json(base.with_suffix(".json"), {"step": step, "optimizer": opt_meta, **extra})
    return base.with_suffix(".json")


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint (JSON present and its weights file too)."""
    if not directory.is_dir():
        return None
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m and p.with_suffix(".safetensors").is_file():
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def load_checkpoint(
    json_path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, device: str = "cpu"
) -> dict[str, Any]:
    """Restore model, optimizer and RNG state; returns the JSON payload."""
    meta = read_json(json_path)
    tensors = load_weights(json_path.with_suffix(".safetensors"), device=device)
    model_sd = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    missing, unexpected = model.load_state_dict(model_sd, strict=False)
    if missing or unexpected:
        raise DataError(
            f"{json_path}: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if optimizer is not None:
        _optimizer_from_flat(optimizer, tensors, meta["optimizer"])
    if "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"].cpu())
    return meta


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    found = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name)))
    for _, p in found[:-keep] if keep > 0 else []:
        p.unlink(missing_ok=True)
        p.with_suffix(".safetensors").unlink(missing_ok=True)
