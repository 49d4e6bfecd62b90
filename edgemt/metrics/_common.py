"""Shared input handling for the meters: tensors or arrays in, numpy out."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["to_numpy", "check_spatial", "label_map_inputs", "ArrayLike"]

ArrayLike = Any  # torch.Tensor | np.ndarray


def to_numpy(x: ArrayLike, name: str = "input") -> np.ndarray:
    """A CPU numpy view/copy of a torch tensor or array (bf16/fp16 become fp32)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        t = x.detach().cpu()
        if t.dtype.is_floating_point and t.element_size() < 4:
            t = t.float()
        return t.numpy()
    try:
        return np.asarray(x)
    except Exception as e:  # pragma: no cover - defensive
        raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(x).__name__}") from e


def check_spatial(pred: np.ndarray, label: np.ndarray, pred_ndim: tuple[int, ...], what: str) -> None:
    """Raise ValueError (naming both shapes) unless batch and spatial sizes agree."""
    if pred.ndim not in pred_ndim:
        raise ValueError(
            f"{what}: pred has shape {tuple(pred.shape)}; expected {' or '.join(f'{d}-D' for d in pred_ndim)}"
        )
    if pred.shape[0] != label.shape[0] or pred.shape[-2:] != label.shape[-2:]:
        raise ValueError(
            f"{what}: pred shape {tuple(pred.shape)} does not match label shape {tuple(label.shape)} "
            "(batch and spatial sizes must agree)"
        )


def label_map_inputs(pred: ArrayLike, label: ArrayLike, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Numpy ``pred`` (3-D or 4-D) and a ``(B, H, W)`` label map, checked against each other."""
    pred = to_numpy(pred, "pred")
    label = to_numpy(label, "label")
    if label.ndim == 4 and label.shape[1] == 1:
        label = label[:, 0]
    if label.ndim != 3:
        raise ValueError(f"{what}: label has shape {tuple(label.shape)}; expected (B, H, W)")
    check_spatial(pred, label, (3, 4), what)
    return pred, label
