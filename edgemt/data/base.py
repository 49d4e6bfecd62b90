"""The dense multi-task dataset base class.

A subclass knows its on-disk layout: which files an id needs for each task
(:meth:`DenseDataset._files`) and how to decode them into numpy arrays
(:meth:`DenseDataset._load`). The base class does everything shared:

* checks at construction that the root exists, the tasks are supported and
  every needed file exists (one :class:`DataError` listing what is missing,
  instead of a crash hours into training);
* validates each loaded sample (label sizes match the image; class ids in range);
* converts to the tensor layouts of :mod:`edgemt.tasks`, applies the transform
  deterministically, normalises the image;
* optionally keeps decoded samples in memory (``cache_mb``, set from
  ``data.cache_mb`` by :func:`edgemt.data.build_dataset`): decoding the PNG and
  ``.npy`` files was a quarter of a training step on the demo's small scenes.
  The cache is shared by every dataset object of the process (the pipeline
  builds the training split again for each fine-tune), keyed by each file's
  path, size and modification time, so a file rewritten on disk is read again.

Sample format returned by ``dataset[i]``::

    {"image": float32 (3, H, W) normalised with IMAGENET_MEAN / IMAGENET_STD,
     "id": str,
     "semseg" | "human_parts": int64 (H, W), 255 = ignore,
     "saliency": int64 (H, W) in {0, 1}, 255 = ignore,
     "depth": float32 (1, H, W) metres, 0 = invalid,
     "normals": float32 (3, H, W), all-zero = invalid,
     "edge": float32 (1, H, W) in {0, 1}, 255 = ignore}

Only the selected tasks are present.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from edgemt.errors import ConfigError, DataError
from edgemt.tasks import IGNORE_INDEX, Task, resolve_tasks

from .transforms import finalize_sample, to_tv_sample

__all__ = ["DenseDataset", "sample_seed", "clear_decode_cache"]

# Raw arrays as ``_load`` returns them: the layout the base class validates.
_CLASS_TASKS = ("semseg", "human_parts", "saliency")
_HWC_TASKS = {"normals": 3}


# Decoded, validated samples shared by the datasets of this process (see the module docstring).
_DECODED: dict[tuple, dict[str, np.ndarray]] = {}
_DECODED_BYTES = [0]


def clear_decode_cache() -> None:
    """Drop every decoded sample kept in memory."""
    _DECODED.clear()
    _DECODED_BYTES[0] = 0


def _file_key(path: Path) -> tuple[str, int, int]:
    try:
        st = path.stat()
    except OSError:
        return (str(path), -1, -1)
    return (str(path), st.st_mtime_ns, st.st_size)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit RNG seed for one sample, mixing (seed, epoch, index) with SeedSequence.

    Plain sums such as ``seed + epoch * N + index`` collide across epochs and
    datasets; SeedSequence hashes the triple so nearby inputs give unrelated seeds.
    """
    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class DenseDataset(Dataset):
    """Base class: one image plus per-task dense labels per sample.

    Args:
        root: dataset root directory.
        split: split name; its id list is read by the subclass.
        tasks: task names (a subset of ``supported_tasks``).
        transform: a callable on the tv_tensor sample dict (see
            :mod:`edgemt.data.transforms`), or None.
        seed: augmentation seed; with :meth:`set_epoch` it fixes every sample's
            augmentation regardless of worker count, process or rank.

    Attributes:
        ids: image ids of the split, in file order.
        num_classes: class count per class-map task (``semseg``, ``human_parts``, ``saliency``).
        class_names: optional class names per task (from dataset metadata).
    """

    name: ClassVar[str] = "dense"
    # Files whose absence is legitimate (e.g. PASCAL human parts for images without people).
    optional_files: ClassVar[frozenset[str]] = frozenset()
    # How a stored class value relates to the class id, for error messages.
    label_encoding: ClassVar[dict[str, str]] = {}
    # Memory for decoded samples, in MiB, shared by the process's datasets (0: decode on every access).
    cache_mb: float = 0.0

    def __init__(
        self,
        root: str | Path,
        split: str,
        tasks: Iterable[str],
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        seed: int = 0,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            what = "is not a directory" if self.root.exists() else "does not exist"
            raise DataError(f"{self.root}: {self.name} dataset root {what}")
        if not isinstance(split, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", split):
            raise ConfigError(f"split: expected a split name such as 'train' or 'val', got {split!r}")
        self.split = split
        self.tasks = self._check_tasks(tasks)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self.num_classes: dict[str, int] = {}
        self.class_names: dict[str, list[str]] = {}
        self.ids: list[str] = []

    # ------------------------------------------------------------------ subclass API

    def supported_tasks(self) -> tuple[str, ...]:
        """Task names this dataset (as found on disk) can provide."""
        raise NotImplementedError

    def _files(self, image_id: str) -> dict[str, Path]:
        """Files for ``image_id``: key ``image`` plus one per selected task needing a file."""
        raise NotImplementedError

    def _load(self, idx: int) -> dict[str, np.ndarray]:
        """Decoded arrays of sample ``idx``.

        ``image``: uint8 ``(H, W, 3)``; class tasks: integer ``(H, W)`` with 255 =
        ignore; ``depth``/``edge``: float ``(H, W)``; ``normals``: float ``(H, W, 3)``.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ construction helpers

    def _check_tasks(self, tasks: Iterable[str]) -> list[str]:
        if isinstance(tasks, str):
            tasks = [tasks]
        tasks = list(tasks)
        supported = self.supported_tasks()
        if not tasks:
            raise ConfigError(f"data.tasks: empty; {self.name} at {self.root} supports {list(supported)}")
        for t in tasks:
            if t not in supported:
                raise ConfigError(
                    f"data.tasks: task {t!r} is not available in the {self.name} dataset at {self.root}; "
                    f"supported tasks: {list(supported)}"
                )
        if len(set(tasks)) != len(tasks):
            raise ConfigError(f"data.tasks: duplicate task in {tasks}")
        return tasks

    def _check_files(self) -> None:
        """Raise one DataError naming the first missing files and how many are missing."""
        missing: list[Path] = []
        for image_id in self.ids:
            for key, path in self._files(image_id).items():
                if key not in self.optional_files and not path.is_file():
                    missing.append(path)
        if missing:
            shown = "\n  ".join(str(p) for p in missing[:5])
            more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise DataError(
                f"{self.root}: {len(missing)} file(s) needed by split {self.split!r} and tasks {self.tasks} "
                f"are missing:\n  {shown}{more}"
            )

    # ------------------------------------------------------------------ Dataset protocol

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of ``epoch``.

        With DataLoader workers, call it before the epoch's iterator is created
        (workers copy the dataset at that point; use ``persistent_workers=False``).
        """
        self.epoch = int(epoch)

    def resolved_tasks(self) -> list[Task]:
        """Registry entries of the selected tasks, with this dataset's class counts."""
        return resolve_tasks(self.tasks, {k: v for k, v in self.num_classes.items() if k != "saliency"})

    def __getitem__(self, idx: int) -> dict[str, Any]:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} samples")
        idx = idx % len(self)
        image_id = self.ids[idx]
        arrays = self._decoded(idx)
        sample = to_tv_sample(arrays)
        if self.transform is not None:
            # The transform draws from torch's global RNG; forking it and seeding
            # from (seed, epoch, idx) makes the augmentation a function of the
            # sample alone, not of worker count, process or call order. That is
            # what exact resume and DDP need, and it leaves the caller's RNG alone.
            with torch.random.fork_rng(devices=[]):
                # The CPU generator only (torch.manual_seed would also reseed CUDA's, which fork_rng
                # does not restore here, and costs ten times more).
                torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, idx))
                sample = self.transform(sample)
        out = finalize_sample(sample)
        out["id"] = image_id
        return out

    def _decoded(self, idx: int) -> Mapping[str, np.ndarray]:
        """The validated arrays of sample ``idx``, from the decode cache when it has them."""
        if self.cache_mb <= 0:
            arrays = self._load(idx)
            self._validate(arrays, self.ids[idx])
            return arrays
        key = (type(self).__name__, tuple(self.tasks), *(_file_key(p) for p in self._files(self.ids[idx]).values()))
        hit = _DECODED.get(key)
        if hit is not None:
            return hit
        arrays = self._load(idx)
        self._validate(arrays, self.ids[idx])
        size = sum(a.nbytes for a in arrays.values())
        if _DECODED_BYTES[0] + size <= self.cache_mb * 2**20:
            for a in arrays.values():
                a.flags.writeable = False  # shared: to_tv_sample copies read-only arrays
            _DECODED[key] = arrays
            _DECODED_BYTES[0] += size
        return arrays

    def _validate(self, arrays: Mapping[str, np.ndarray], image_id: str) -> None:
        files = self._files(image_id)
        image = arrays["image"]
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise DataError(f"{files['image']}: expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
        hw = image.shape[:2]
        for task in self.tasks:
            arr = arrays[task]
            where = files.get(task, files["image"])
            want = (*hw, _HWC_TASKS[task]) if task in _HWC_TASKS else hw
            if tuple(arr.shape) != tuple(want):
                raise DataError(
                    f"{where}: {task} label has shape {tuple(arr.shape)}, expected {tuple(want)} "
                    f"to match the image {files['image'].name}"
                )
            if task in _CLASS_TASKS:
                n = self.num_classes[task]
                bad = (arr != IGNORE_INDEX) & ((arr < 0) | (arr >= n))
                if bad.any():
                    value = int(arr[bad].flat[0])
                    enc = self.label_encoding.get(task)
                    note = f" ({enc})" if enc else ""
                    raise DataError(
                        f"{where}: {task} class id {value} is out of range; allowed 0..{n - 1} "
                        f"or {IGNORE_INDEX} (ignore){note}"
                    )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, tasks={self.tasks}, "
            f"n={len(self)}, num_classes={self.num_classes})"
        )
