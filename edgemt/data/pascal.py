"""PASCAL-Context in the layout used by ATRC, InvPT, TaskPrompter and MLoRE.

Layout under ``root``::

    JPEGImages/{id}.jpg
    ImageSets/Context/{train,val}.txt
    semseg/pascal-context/{id}.png        21 classes (0 = background .. 20), 255 = ignore; read as-is
    human_parts/{id}.mat                  PASCAL-Part annotation ("anno" struct); may be absent
    pascal-context/trainval/{id}.mat      "LabelMap" (459-class context map); edges = its boundaries
    normals_distill/{id}.png              n = 2 v / 255 - 1; all-zero = invalid
    sal_distill/{id}.png                  /255 binarised at 0.5

Human parts: every PASCAL-Part object with ``class_ind == 15`` (person) and a
non-empty part list paints its parts into one map with the 6 coarse parts
(head, torso, upper arm, lower arm, upper leg, lower leg; 0 = background).
An image without such a person, or without a ``.mat`` file, is all-ignore
(255), as in the papers' loaders, so it contributes nothing to the parts loss
and metric.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage
from skimage.morphology import thin

from edgemt.errors import DataError

from .base import DenseDataset
from .nyud import binarize, decode_normals
from .readers import read_image, read_label_png, read_mat, read_split

__all__ = ["PASCALContext", "PART_CLASSES", "PART_NAME_TO_CLASS", "parse_human_parts", "label_boundaries"]

PERSON_CLASS_IND = 15
PART_CLASSES = ("background", "head", "torso", "upper_arm", "lower_arm", "upper_leg", "lower_leg")
PART_NAME_TO_CLASS = {
    **dict.fromkeys(("hair", "head", "leye", "reye", "lear", "rear", "lebrow", "rebrow", "nose", "mouth"), 1),
    **dict.fromkeys(("torso", "neck"), 2),
    **dict.fromkeys(("luarm", "ruarm"), 3),
    **dict.fromkeys(("llarm", "rlarm", "lhand", "rhand"), 4),
    **dict.fromkeys(("luleg", "ruleg"), 5),
    **dict.fromkeys(("llleg", "rlleg", "lfoot", "rfoot"), 6),
}


def _scalar(x: Any) -> Any:
    """MATLAB values load as nested (1, 1) arrays; unwrap to the Python scalar/string."""
    arr = np.asarray(x)
    while arr.dtype == object and arr.size == 1:
        arr = np.asarray(arr.flat[0])
    if arr.size != 1:
        raise ValueError(f"expected a scalar, got an array of shape {arr.shape}")
    return arr.flat[0]


def _field(record: Any, name: str, path: Path) -> Any:
    try:
        return record[name]
    except (KeyError, ValueError, IndexError):
        raise DataError(f"{path}: PASCAL-Part annotation lacks the field {name!r}") from None


def parse_human_parts(anno: np.ndarray, shape: tuple[int, int], path: Path) -> np.ndarray:
    """Coarse human-part map from a PASCAL-Part ``anno`` struct (``scipy.io.loadmat`` layout).

    Returns int64 ``shape``: 0 background, 1..6 parts; all 255 when no person has parts.

    Raises:
        DataError: malformed struct, an unknown part name or a mask of the wrong size.
    """
    if anno.size == 0:
        raise DataError(f"{path}: PASCAL-Part annotation 'anno' is empty")
    objects = np.asarray(_field(anno.flat[0], "objects", path))
    target = np.zeros(shape, dtype=np.int64)
    found = False
    for obj in objects.flat:
        try:
            class_ind = int(_scalar(_field(obj, "class_ind", path)))
        except ValueError as e:
            raise DataError(f"{path}: object class_ind is not a number: {e}") from None
        parts = np.asarray(_field(obj, "parts", path))
        if class_ind != PERSON_CLASS_IND or parts.size == 0 or parts.dtype.names is None:
            continue  # not a person, or a person without part annotations
        found = True
        for part in parts.flat:
            try:
                name = str(_scalar(_field(part, "part_name", path)))
            except ValueError as e:
                raise DataError(f"{path}: part_name is not a string: {e}") from None
            if name not in PART_NAME_TO_CLASS:
                raise DataError(
                    f"{path}: unknown person part name {name!r}; expected one of {sorted(PART_NAME_TO_CLASS)}"
                )
            mask = np.asarray(_field(part, "mask", path))
            if mask.shape != tuple(shape):
                raise DataError(f"{path}: part {name!r} mask has shape {mask.shape}, expected {tuple(shape)}")
            # Later parts overwrite earlier ones where masks overlap, as in the reference loaders.
            target[mask.astype(bool)] = PART_NAME_TO_CLASS[name]
    if not found:
        target.fill(255)
    return target


def label_boundaries(label_map: np.ndarray) -> np.ndarray:
    """Thinned boundaries of a label map: pixels where a 4-neighbour Laplacian is non-zero.

    Matches ``thin(abs(cv2.Laplacian(LabelMap)) > 0)`` of the reference loaders
    (cv2's default border, reflect-101, is scipy's ``mirror``). Float64 avoids
    wrap-around on the unsigned label maps.
    """
    lap = scipy.ndimage.laplace(label_map.astype(np.float64), mode="mirror")
    return thin(np.abs(lap) > 0).astype(np.float32)


class PASCALContext(DenseDataset):
    """PASCAL-Context with the multi-task labels of the ATRC/InvPT/MLoRE protocol.

    Supported tasks: ``semseg`` (21), ``human_parts`` (7), ``saliency``,
    ``normals``, ``edge``.

    Raises:
        DataError: missing root, split file or any needed file.
        ConfigError: a task the dataset does not provide.
    """

    name = "PASCAL-Context"
    optional_files = frozenset({"human_parts"})
    label_encoding = {"semseg": "stored pixel value = class id, 0 = background"}
    NUM_CLASSES = {"semseg": 21, "human_parts": len(PART_CLASSES), "saliency": 2}

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        tasks: Iterable[str] = ("semseg", "human_parts", "saliency", "normals", "edge"),
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(root, split, tasks, transform, seed)
        self.num_classes = dict(self.NUM_CLASSES)
        self.class_names = {"human_parts": list(PART_CLASSES)}
        self.ids = read_split(self.root / "ImageSets" / "Context" / f"{split}.txt")
        self._check_files()

    def supported_tasks(self) -> tuple[str, ...]:
        return ("semseg", "human_parts", "saliency", "normals", "edge")

    def _files(self, image_id: str) -> dict[str, Path]:
        r = self.root
        where = {
            "semseg": r / "semseg" / "pascal-context" / f"{image_id}.png",
            "human_parts": r / "human_parts" / f"{image_id}.mat",
            "edge": r / "pascal-context" / "trainval" / f"{image_id}.mat",
            "normals": r / "normals_distill" / f"{image_id}.png",
            "saliency": r / "sal_distill" / f"{image_id}.png",
        }
        files = {"image": r / "JPEGImages" / f"{image_id}.jpg"}
        files.update({t: where[t] for t in self.tasks})
        return files

    def _load(self, idx: int) -> dict[str, np.ndarray]:
        files = self._files(self.ids[idx])
        image = read_image(files["image"])
        hw = image.shape[:2]
        out: dict[str, np.ndarray] = {"image": image}
        for task in self.tasks:
            path = files[task]
            if task == "semseg":
                out[task] = read_label_png(path).astype(np.int64)
            elif task == "human_parts":
                if path.is_file():
                    out[task] = parse_human_parts(read_mat(path, "anno"), hw, path)
                else:
                    out[task] = np.full(hw, 255, dtype=np.int64)
            elif task == "edge":
                label_map = read_mat(path, "LabelMap")
                if label_map.ndim != 2 or label_map.dtype == object:
                    raise DataError(
                        f"{path}: LabelMap must be a 2-D numeric array, got {label_map.dtype} {label_map.shape}"
                    )
                out[task] = label_boundaries(label_map)
            elif task == "normals":
                out[task] = decode_normals(read_image(path))
            elif task == "saliency":
                out[task] = binarize(read_label_png(path, max_value=255))
        return out
