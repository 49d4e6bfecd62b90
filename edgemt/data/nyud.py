"""NYUD-v2 in the layout used by ATRC, InvPT, TaskPrompter and MLoRE (and the synthetic scenes).

Layout under ``root``::

    images/{id}.png          RGB
    segmentation/{id}.png    0 = unlabeled (-> 255 ignore), else class id + 1 (40 classes)
    depth/{id}.npy           float metres (H, W), 0 = invalid
    normals/{id}.png         n = 2 v / 255 - 1; an all-zero pixel is invalid
    edge/{id}.png            boundaries, /255 -> {0, 1}
    saliency/{id}.png        optional (synthetic scenes): /255 binarised at 0.5
    gt_sets/{train,val}.txt  one id per line
    meta.json                optional: {"num_classes": {"semseg": N}, "class_names": [...], ...}

The synthetic generator writes this layout plus ``saliency/`` and
``meta.json``, so the default demo exercises the real loader.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from edgemt.errors import DataError

from .base import DenseDataset
from .readers import read_depth_npy, read_image, read_label_png, read_split

__all__ = ["NYUDv2", "decode_normals"]

NYUD_NUM_CLASSES = 40


def decode_normals(rgb: np.ndarray) -> np.ndarray:
    """``uint8 (H, W, 3)`` -> float32 normals ``2 v / 255 - 1``; all-zero pixels stay all-zero (invalid)."""
    n = rgb.astype(np.float32) * (2.0 / 255.0) - 1.0
    # v = 0 decodes to -1, not to "no label": the papers mark missing normals
    # with an all-zero pixel, which must stay an all-zero (ignored) label.
    n[(rgb == 0).all(axis=-1)] = 0.0
    return n


def binarize(arr: np.ndarray) -> np.ndarray:
    """A 0..255 map /255 thresholded at 0.5, as the papers' loaders do for saliency."""
    return (arr.astype(np.float32) / 255.0 > 0.5).astype(np.int64)


class NYUDv2(DenseDataset):
    """NYUD-v2 (or synthetic scenes in its layout).

    Supported tasks: ``semseg``, ``depth``, ``normals``, ``edge``, plus
    ``saliency`` when a ``saliency/`` folder exists. ``meta.json``'s
    ``num_classes.semseg`` overrides the 40 classes of real NYUD.

    Raises:
        DataError: missing root, split file or any needed file; malformed meta.json.
        ConfigError: a task the dataset does not provide.
    """

    name = "NYUD-v2"
    label_encoding = {"semseg": "stored pixel value = class id + 1; 0 = unlabeled"}

    _FOLDERS = {
        "semseg": ("segmentation", ".png"),
        "depth": ("depth", ".npy"),
        "normals": ("normals", ".png"),
        "edge": ("edge", ".png"),
        "saliency": ("saliency", ".png"),
    }

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        tasks: Iterable[str] = ("semseg", "depth", "normals", "edge"),
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(root, split, tasks, transform, seed)
        self.meta = self._read_meta()
        self.num_classes = {"semseg": self._semseg_classes(), "saliency": 2}
        names = self.meta.get("class_names")
        if isinstance(names, list):
            self.class_names = {"semseg": [str(n) for n in names]}
        elif isinstance(names, dict):
            self.class_names = {str(k): [str(n) for n in v] for k, v in names.items() if isinstance(v, list)}
        self.ids = read_split(self.root / "gt_sets" / f"{split}.txt")
        self._check_files()

    def supported_tasks(self) -> tuple[str, ...]:
        base = ("semseg", "depth", "normals", "edge")
        return (*base, "saliency") if (self.root / "saliency").is_dir() else base

    def _read_meta(self) -> dict[str, Any]:
        path = self.root / "meta.json"
        if not path.is_file():
            return {}
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: cannot read dataset metadata (expected JSON): {e}") from None
        if not isinstance(meta, dict):
            raise DataError(f"{path}: expected a JSON object at the top level")
        return meta

    def _semseg_classes(self) -> int:
        nc = self.meta.get("num_classes", {})
        if not isinstance(nc, dict):
            raise DataError(f"{self.root / 'meta.json'}: 'num_classes' must be an object like {{\"semseg\": 13}}")
        n = nc.get("semseg", NYUD_NUM_CLASSES)
        # 255 is the ignore value and the PNG stores id + 1, so at most 254 classes fit in 8 bits.
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 254:
            raise DataError(f"{self.root / 'meta.json'}: num_classes.semseg must be an integer in 1..254, got {n!r}")
        return n

    def _files(self, image_id: str) -> dict[str, Path]:
        files = {"image": self.root / "images" / f"{image_id}.png"}
        for task in self.tasks:
            folder, ext = self._FOLDERS[task]
            files[task] = self.root / folder / f"{image_id}{ext}"
        return files

    def _load(self, idx: int) -> dict[str, np.ndarray]:
        files = self._files(self.ids[idx])
        image = read_image(files["image"])
        out: dict[str, np.ndarray] = {"image": image}
        for task in self.tasks:
            path = files[task]
            if task == "semseg":
                raw = read_label_png(path, max_value=255).astype(np.int64)
                out[task] = np.where(raw == 0, 255, raw - 1)
            elif task == "depth":
                out[task] = read_depth_npy(path, image.shape[:2])
            elif task == "normals":
                rgb = read_image(path)
                out[task] = decode_normals(rgb)
            elif task == "edge":
                out[task] = (read_label_png(path, max_value=255).astype(np.float32) / 255.0 > 0.5).astype(np.float32)
            elif task == "saliency":
                out[task] = binarize(read_label_png(path, max_value=255))
        return out
