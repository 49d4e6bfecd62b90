"""Writers of tiny datasets in the real NYUD-v2 and PASCAL-Context layouts.

Content is random but valid, and some of it is constructed so tests can check
exact values: every PASCAL person has the part masks of :func:`person_parts`,
and the PASCAL-Part ``.mat`` files use the real nested struct layout
(``anno`` -> ``objects`` (class, class_ind, mask, parts) -> ``parts``
(part_name, mask)), so the loader is exercised on what the real files hold.

Import from tests with ``from fixtures import ...`` (``tests/test_data.py``
puts its own directory on ``sys.path``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

__all__ = [
    "write_nyud_fixture",
    "write_pascal_fixture",
    "write_parts_mat",
    "person_parts",
    "encode_normals",
    "random_normals",
]


def encode_normals(n: np.ndarray) -> np.ndarray:
    """Unit normals (H, W, 3) to the PNG encoding v = round((n + 1) / 2 * 255); zero vectors stay 0."""
    v = np.clip(np.round((n + 1.0) * 127.5), 0, 255).astype(np.uint8)
    v[(n == 0).all(axis=-1)] = 0
    return v


def random_normals(rng: np.random.Generator, hw: tuple[int, int], invalid_frac: float = 0.1) -> np.ndarray:
    """Random unit normals facing the camera (z > 0), with some all-zero (invalid) pixels."""
    n = rng.normal(size=(*hw, 3))
    n[..., 2] = np.abs(n[..., 2]) + 0.5
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    n[rng.random(hw) < invalid_frac] = 0.0
    return n


def _ids(n_train: int, n_val: int, prefix: str = "") -> tuple[list[str], list[str]]:
    ids = [f"{prefix}{i:06d}" for i in range(n_train + n_val)]
    return ids[:n_train], ids[n_train:]


def _blocks(rng: np.random.Generator, hw: tuple[int, int], values: Sequence[int], n: int = 4) -> np.ndarray:
    """A label map of a few random rectangles (so there are real boundaries)."""
    h, w = hw
    out = np.full(hw, values[0], dtype=np.int64)
    for _ in range(n):
        y0, x0 = int(rng.integers(0, h - 2)), int(rng.integers(0, w - 2))
        y1, x1 = int(rng.integers(y0 + 2, h + 1)), int(rng.integers(x0 + 2, w + 1))
        out[y0:y1, x0:x1] = int(rng.choice(values))
    return out


def write_nyud_fixture(
    root: str | Path,
    n_train: int = 3,
    n_val: int = 2,
    size: tuple[int, int] = (24, 32),
    num_classes: int = 40,
    saliency: bool = False,
    seed: int = 0,
) -> Path:
    """Write a NYUD-v2 layout dataset; with ``saliency`` (or ``num_classes != 40``) also
    ``saliency/`` and ``meta.json`` as the synthetic generator does. Returns the root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for d in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
        (root / d).mkdir(parents=True, exist_ok=True)
    if saliency:
        (root / "saliency").mkdir(exist_ok=True)
    train, val = _ids(n_train, n_val)
    for image_id in train + val:
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / "images" / f"{image_id}.png")
        seg = _blocks(rng, size, list(range(num_classes + 1)))  # stored 0 = unlabeled, k = class k - 1
        seg[0, :3] = 0  # always some unlabeled pixels
        seg[-1, -1] = num_classes  # and the top class
        Image.fromarray(seg.astype(np.uint8)).save(root / "segmentation" / f"{image_id}.png")
        depth = rng.uniform(0.5, 10.0, size).astype(np.float32)
        depth[rng.random(size) < 0.1] = 0.0
        np.save(root / "depth" / f"{image_id}.npy", depth)
        Image.fromarray(encode_normals(random_normals(rng, size))).save(root / "normals" / f"{image_id}.png")
        edge = (rng.random(size) < 0.1).astype(np.uint8) * 255
        Image.fromarray(edge).save(root / "edge" / f"{image_id}.png")
        if saliency:
            sal = (_blocks(rng, size, [0, 1]) * 255).astype(np.uint8)
            Image.fromarray(sal).save(root / "saliency" / f"{image_id}.png")
    (root / "gt_sets" / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (root / "gt_sets" / "val.txt").write_text("".join(f"{i}\n" for i in val))
    if saliency or num_classes != 40:
        meta = {
            "dataset": "synthetic",
            "num_classes": {"semseg": num_classes},
            "class_names": [f"class{i}" for i in range(num_classes)],
        }
        (root / "meta.json").write_text(json.dumps(meta))
    return root


# --------------------------------------------------------------------------- PASCAL


def person_parts(hw: tuple[int, int]) -> list[tuple[str, np.ndarray]]:
    """Known part masks of one person filling the left half of the image.

    Fine PASCAL-Part names, several per coarse class, stacked top to bottom;
    the last column of the person's box is left without parts (background).
    """
    h, w = hw
    x1 = w // 2
    bands = [
        ("hair", 0),
        ("nose", 1),
        ("neck", 2),
        ("torso", 3),
        ("luarm", 4),
        ("rlarm", 5),
        ("lhand", 6),
        ("ruleg", 7),
        ("llleg", 8),
        ("rfoot", 9),
    ]
    rows = np.linspace(0, h, len(bands) + 1).astype(int)
    out = []
    for name, i in bands:
        m = np.zeros(hw, dtype=np.uint8)
        m[rows[i] : rows[i + 1], 0 : x1 - 1] = 1
        out.append((name, m))
    return out


def write_parts_mat(path: str | Path, imname: str, objects: Sequence[dict]) -> None:
    """Write a PASCAL-Part annotation ``.mat`` with the real nested struct layout.

    ``objects``: dicts with ``class`` (str), ``class_ind`` (int), ``mask`` (H, W)
    and ``parts`` (list of ``(part_name, mask)``; empty for objects without parts).
    """
    part_dt = [("part_name", object), ("mask", object)]
    obj_dt = [("class", object), ("class_ind", object), ("mask", object), ("parts", object)]
    objs = np.zeros((1, len(objects)), dtype=obj_dt)
    for i, o in enumerate(objects):
        if o["parts"]:
            parts = np.zeros((1, len(o["parts"])), dtype=part_dt)
            for j, (name, mask) in enumerate(o["parts"]):
                parts[0, j] = (name, np.asarray(mask, dtype=np.uint8))
        else:
            parts = np.zeros((0, 0))  # MATLAB's [] for an object without parts
        objs[0, i] = (o["class"], np.array([[float(o["class_ind"])]]), np.asarray(o["mask"], dtype=np.uint8), parts)
    anno = np.zeros((1, 1), dtype=[("imname", object), ("objects", object)])
    anno[0, 0] = (imname, objs)
    scipy.io.savemat(str(path), {"anno": anno})


def _palette_png(arr: np.ndarray, path: Path) -> None:
    """Save class ids as a palette PNG, like the released PASCAL label maps."""
    img = Image.fromarray(arr.astype(np.uint8))  # putpalette turns this L image into P
    rng = np.random.default_rng(1)
    img.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tolist())
    img.save(path)


def write_pascal_fixture(
    root: str | Path,
    n_train: int = 3,
    n_val: int = 2,
    size: tuple[int, int] = (24, 32),
    with_people: Sequence[bool | None] | None = None,
    seed: int = 0,
) -> Path:
    """Write a PASCAL-Context layout dataset. Returns the root.

    ``with_people[i]`` for image i (train ids first, then val): True = a person
    with the parts of :func:`person_parts` plus a cat; False = a ``.mat`` with
    only a cat and a part-less person; None = no human-parts ``.mat`` at all.
    Default: alternating True, False.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    train, val = _ids(n_train, n_val, prefix="2008_")
    ids = train + val
    if with_people is None:
        with_people = [i % 2 == 0 for i in range(len(ids))]
    if len(with_people) != len(ids):
        raise ValueError(f"with_people needs {len(ids)} entries, got {len(with_people)}")
    dirs = (
        "JPEGImages",
        "ImageSets/Context",
        "semseg/pascal-context",
        "human_parts",
        "pascal-context/trainval",
        "normals_distill",
        "sal_distill",
    )
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    h, w = size
    for image_id, people in zip(ids, with_people):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
            root / "JPEGImages" / f"{image_id}.jpg", quality=95
        )
        seg = _blocks(rng, size, list(range(21)))
        seg[0, 0] = 255  # an ignore pixel
        _palette_png(seg, root / "semseg" / "pascal-context" / f"{image_id}.png")
        label_map = _blocks(rng, size, [0, 5, 19, 284, 459]).astype(np.uint16)
        scipy.io.savemat(str(root / "pascal-context" / "trainval" / f"{image_id}.mat"), {"LabelMap": label_map})
        Image.fromarray(encode_normals(random_normals(rng, size))).save(root / "normals_distill" / f"{image_id}.png")
        sal = (_blocks(rng, size, [0, 1]) * 255).astype(np.uint8)
        Image.fromarray(sal).save(root / "sal_distill" / f"{image_id}.png")
        cat_mask = np.zeros(size, dtype=np.uint8)
        cat_mask[h // 2 :, w // 2 :] = 1
        cat = {"class": "cat", "class_ind": 8, "mask": cat_mask, "parts": []}
        if people is True:
            parts = person_parts(size)
            person_mask = np.zeros(size, dtype=np.uint8)
            person_mask[:, : w // 2] = 1
            objs = [{"class": "person", "class_ind": 15, "mask": person_mask, "parts": parts}, cat]
            write_parts_mat(root / "human_parts" / f"{image_id}.mat", image_id, objs)
        elif people is False:
            lone = {"class": "person", "class_ind": 15, "mask": cat_mask, "parts": []}
            write_parts_mat(root / "human_parts" / f"{image_id}.mat", image_id, [cat, lone])
    (root / "ImageSets" / "Context" / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (root / "ImageSets" / "Context" / "val.txt").write_text("".join(f"{i}\n" for i in val))
    return root
