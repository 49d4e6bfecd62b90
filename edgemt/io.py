"""Artifacts on disk: atomic writes, safetensors weights, JSON manifests.

Every stage writes a directory holding ``manifest.json`` (stage, config,
parent artifact + hash, metrics, versions, wall time) and, for model stages,
``weights.safetensors`` + ``arch.json``. Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from edgemt.errors import DataError

__all__ = [
    "atomic_path",
    "atomic_dir",
    "write_json",
    "read_json",
    "save_weights",
    "load_weights",
    "file_hash",
    "config_hash",
    "tool_versions",
    "write_manifest",
    "read_manifest",
]

MANIFEST = "manifest.json"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; it replaces ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e})") from None


def save_weights(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write tensors to a safetensors file atomically (contiguous copies, no aliasing)."""
    flat = {k: v.detach().contiguous() for k, v in tensors.items()}
    # safetensors refuses tensors that share storage (tied weights): clone those.
    seen: set[int] = set()
    for k, v in flat.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else id(v)
        if ptr in seen:
            flat[k] = v.clone()
        seen.add(ptr)
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=dict(metadata or {}))


def load_weights(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: weights file does not exist")
    try:
        return load_file(str(path), device=device)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise DataError(f"{path}: not a readable safetensors file ({e})") from None


def file_hash(path: str | Path, n: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def config_hash(obj: Any, n: int = 16) -> str:
    data = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(data).hexdigest()[:n]


def tool_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("edgemt", "torch", "torchvision", "timm", "numpy", "onnx", "onnxruntime", *extra):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def write_manifest(stage_dir: str | Path, manifest: Mapping[str, Any]) -> None:
    """Write ``manifest.json`` last: its presence marks the stage complete."""
    data = dict(manifest)
    data.setdefault("versions", tool_versions())
    write_json(Path(stage_dir) / MANIFEST, data)


def read_manifest(stage_dir: str | Path) -> dict[str, Any] | None:
    p = Path(stage_dir) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None
