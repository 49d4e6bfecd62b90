"""Datasets, file readers and joint augmentation for dense multi-task learning.

``build_dataset(cfg.data, "train", train=True)`` is the entry point the stages
use; the classes are public for direct use. The synthetic scene generator
(:mod:`edgemt.data.synthetic`) is not imported here: it writes the NYUD-v2
layout, which :class:`NYUDv2` reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgemt.errors import ConfigError

from .base import DenseDataset, sample_seed
from .nyud import NYUDv2
from .pascal import PASCALContext
from .readers import read_depth_npy, read_image, read_label_png, read_mat, read_split
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Depth,
    Normals,
    eval_transform,
    finalize_sample,
    to_tv_sample,
    train_transform,
)

if TYPE_CHECKING:
    from edgemt.config import DataConfig

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DenseDataset",
    "NYUDv2",
    "PASCALContext",
    "Depth",
    "Normals",
    "build_dataset",
    "train_transform",
    "eval_transform",
    "to_tv_sample",
    "finalize_sample",
    "sample_seed",
    "read_image",
    "read_label_png",
    "read_depth_npy",
    "read_split",
    "read_mat",
]

_DATASETS = {"synthetic": NYUDv2, "nyud": NYUDv2, "pascal": PASCALContext}


def build_dataset(cfg: DataConfig, split: str, train: bool, seed: int = 0) -> DenseDataset:
    """The dataset named by ``cfg.dataset`` at ``cfg.root`` with ``cfg.tasks``.

    ``train=True`` uses the training augmentation (``cfg.crop``, ``scale``,
    ``flip``, ``jitter``); otherwise the evaluation padding to ``cfg.pad_to``.
    ``"synthetic"`` reads the generated NYUD-v2 layout (it must have been
    generated first).

    Raises:
        ConfigError: unknown dataset kind, bad augmentation field or unsupported task.
        DataError: missing root or files.
    """
    try:
        cls = _DATASETS[cfg.dataset]
    except KeyError:
        raise ConfigError(f"data.dataset: unknown dataset {cfg.dataset!r}; allowed: {sorted(_DATASETS)}") from None
    if train:
        transform = train_transform(cfg.crop, scale=cfg.scale, flip=cfg.flip, jitter=cfg.jitter)
    else:
        transform = eval_transform(cfg.pad_to, cfg.eval_size)
    if cfg.cache_mb < 0:
        raise ConfigError(f"data.cache_mb: expected >= 0 (0 turns the decode cache off), got {cfg.cache_mb}")
    ds = cls(cfg.root, split=split, tasks=list(cfg.tasks), transform=transform, seed=seed)
    ds.cache_mb = float(cfg.cache_mb)
    return ds
