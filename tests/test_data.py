"""Tests of edgemt.data: readers, NYUD-v2 / PASCAL-Context loaders, joint augmentation.

The fixtures (tests/fixtures.py) write tiny datasets in the real layouts.
Every user error gets its own test asserting the error type and that the
message names the offending file or field.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

# Make ``fixtures`` importable whether or not tests/ is a package and whatever
# pytest's import mode; no conftest.py needed.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixtures import (  # noqa: E402
    encode_normals,
    person_parts,
    random_normals,
    write_nyud_fixture,
    write_parts_mat,
    write_pascal_fixture,
)

from edgemt.config import DataConfig  # noqa: E402
from edgemt.data import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    Depth,
    Normals,
    NYUDv2,
    PASCALContext,
    build_dataset,
    eval_transform,
    read_depth_npy,
    read_image,
    read_label_png,
    read_mat,
    read_split,
    train_transform,
)
from edgemt.data.pascal import PART_NAME_TO_CLASS, label_boundaries  # noqa: E402
from edgemt.data.transforms import (  # noqa: E402
    PadToMultiple,
    PhotometricJitter,
    RandomCropPad,
    RandomHorizontalFlip,
    RandomScale,
    to_tv_sample,
)
from edgemt.errors import ConfigError, DataError  # noqa: E402

NYUD_TASKS = ("semseg", "depth", "normals", "edge")
PASCAL_TASKS = ("semseg", "human_parts", "saliency", "normals", "edge")
H, W = 24, 32


@pytest.fixture
def nyud(tmp_path: Path) -> Path:
    return write_nyud_fixture(tmp_path / "NYUDv2")


@pytest.fixture
def synth(tmp_path: Path) -> Path:
    return write_nyud_fixture(tmp_path / "synthetic", num_classes=13, saliency=True)


@pytest.fixture
def pascal(tmp_path: Path) -> Path:
    return write_pascal_fixture(tmp_path / "PASCALContext", with_people=(True, False, None, True, False))


def _unnormalise(img: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (img * std + mean) * 255.0


# --------------------------------------------------------------------------- NYUD-v2


def test_nyud_loads_every_task(nyud: Path) -> None:
    ds = NYUDv2(nyud, "train", NYUD_TASKS)
    assert len(ds) == 3 and ds.num_classes["semseg"] == 40
    s = ds[0]
    assert set(s) == {"image", "id", *NYUD_TASKS}
    assert s["id"] == "000000"
    assert s["image"].shape == (3, H, W) and s["image"].dtype == torch.float32
    # The image is the PNG normalised with the ImageNet statistics.
    raw = np.array(Image.open(nyud / "images" / "000000.png"))
    torch.testing.assert_close(
        _unnormalise(s["image"]), torch.from_numpy(raw).permute(2, 0, 1).float(), atol=1e-3, rtol=0
    )

    seg = s["semseg"]
    assert seg.shape == (H, W) and seg.dtype == torch.int64
    stored = torch.from_numpy(np.asarray(Image.open(nyud / "segmentation" / "000000.png")).astype(np.int64))
    assert (seg[stored == 0] == 255).all()  # unlabeled -> ignore
    assert torch.equal(seg[stored > 0], stored[stored > 0] - 1)
    assert int(seg[seg != 255].max()) == 39

    depth = s["depth"]
    assert depth.shape == (1, H, W) and depth.dtype == torch.float32
    torch.testing.assert_close(depth[0], torch.from_numpy(np.load(nyud / "depth" / "000000.npy")))

    n = s["normals"]
    assert n.shape == (3, H, W) and n.dtype == torch.float32
    valid = (n != 0).any(0)
    assert 0 < valid.sum() < H * W  # the fixture has invalid (all-zero) pixels
    norms = n.norm(dim=0)[valid]
    assert ((norms - 1).abs() < 0.02).all()  # unit up to 8-bit quantisation
    stored_n = np.asarray(Image.open(nyud / "normals" / "000000.png"))
    assert torch.equal(~valid, torch.from_numpy((stored_n == 0).all(-1)))

    e = s["edge"]
    assert e.shape == (1, H, W) and e.dtype == torch.float32
    assert set(e.unique().tolist()) == {0.0, 1.0}


def test_nyud_val_split_and_default_tasks(nyud: Path) -> None:
    ds = NYUDv2(nyud, "val")
    assert ds.tasks == list(NYUD_TASKS) and ds.ids == ["000003", "000004"]


def test_synthetic_layout_with_saliency_and_meta(synth: Path) -> None:
    ds = NYUDv2(synth, "train", (*NYUD_TASKS, "saliency"))
    assert ds.num_classes["semseg"] == 13  # meta.json overrides NYUD's 40
    assert ds.class_names["semseg"][0] == "class0"
    assert [t.channels for t in ds.resolved_tasks()][0] == 13
    s = ds[1]
    assert s["saliency"].dtype == torch.int64 and set(s["saliency"].unique().tolist()) <= {0, 1}
    assert int(s["semseg"][s["semseg"] != 255].max()) <= 12


def test_saliency_unavailable_without_folder(nyud: Path) -> None:
    with pytest.raises(ConfigError, match=r"'saliency'.*supported tasks: \['semseg', 'depth', 'normals', 'edge'\]"):
        NYUDv2(nyud, "train", ("semseg", "saliency"))


def test_dataloader_collates_a_batch(synth: Path) -> None:
    ds = NYUDv2(synth, "train", (*NYUD_TASKS, "saliency"), transform=train_transform((16, 20)))
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 3, 16, 20)
    assert batch["semseg"].shape == (3, 16, 20) and batch["semseg"].dtype == torch.int64
    assert batch["saliency"].shape == (3, 16, 20)
    assert batch["depth"].shape == (3, 1, 16, 20)
    assert batch["normals"].shape == (3, 3, 16, 20)
    assert batch["edge"].shape == (3, 1, 16, 20)
    assert batch["id"] == ["000000", "000001", "000002"]
    assert all(type(v) is torch.Tensor for k, v in batch.items() if k != "id")


def test_eval_transform_pads_val_to_multiple(nyud: Path) -> None:
    ds = NYUDv2(nyud, "val", NYUD_TASKS, transform=eval_transform(32))
    s = ds[0]
    assert s["image"].shape == (3, 32, 32)
    assert (s["semseg"][H:] == 255).all() and (s["edge"][:, H:] == 255).all()
    assert (s["depth"][:, H:] == 0).all() and (s["normals"][:, H:] == 0).all()


# --------------------------------------------------------------------------- PASCAL-Context


def test_pascal_loads_every_task(pascal: Path) -> None:
    ds = PASCALContext(pascal, "train", PASCAL_TASKS)
    assert ds.num_classes == {"semseg": 21, "human_parts": 7, "saliency": 2}
    s = ds[0]
    assert set(s) == {"image", "id", *PASCAL_TASKS}
    assert s["id"] == "2008_000000"
    assert s["image"].shape == (3, H, W)
    seg = s["semseg"]
    # Palette PNG read as indices, as-is: 0..20 and 255.
    stored = np.asarray(Image.open(pascal / "semseg" / "pascal-context" / "2008_000000.png"))
    assert torch.equal(seg, torch.from_numpy(stored.astype(np.int64)))
    assert seg[0, 0] == 255 and int(seg[seg != 255].max()) <= 20
    assert s["saliency"].dtype == torch.int64 and set(s["saliency"].unique().tolist()) <= {0, 1}
    assert s["normals"].shape == (3, H, W)
    assert s["edge"].shape == (1, H, W) and set(s["edge"].unique().tolist()) <= {0.0, 1.0}
    assert s["human_parts"].dtype == torch.int64


def test_pascal_human_parts_of_constructed_person(pascal: Path) -> None:
    ds = PASCALContext(pascal, "train", ("human_parts",))
    hp = ds[0]["human_parts"]
    expected = np.zeros((H, W), dtype=np.int64)
    for name, mask in person_parts((H, W)):
        expected[mask.astype(bool)] = PART_NAME_TO_CLASS[name]
    assert torch.equal(hp, torch.from_numpy(expected))
    assert set(hp.unique().tolist()) == set(range(7))
    # Fine names map to the coarse classes of the papers.
    assert PART_NAME_TO_CLASS["hair"] == 1 and PART_NAME_TO_CLASS["neck"] == 2
    assert PART_NAME_TO_CLASS["ruarm"] == 3 and PART_NAME_TO_CLASS["lhand"] == 4
    assert PART_NAME_TO_CLASS["luleg"] == 5 and PART_NAME_TO_CLASS["rfoot"] == 6


def test_pascal_no_people_is_all_ignore(pascal: Path) -> None:
    ds = PASCALContext(pascal, "train", ("human_parts",))
    # id 1: a cat and a person without parts; id 2: no .mat file at all.
    assert (ds[1]["human_parts"] == 255).all()
    assert (ds[2]["human_parts"] == 255).all()


def test_pascal_two_people_merge(tmp_path: Path) -> None:
    root = write_pascal_fixture(tmp_path / "P", n_train=1, n_val=0, with_people=(True,))
    a = np.zeros((H, W), np.uint8)
    a[:5, :5] = 1
    b = np.zeros((H, W), np.uint8)
    b[10:, 20:] = 1
    objs = [
        {"class": "person", "class_ind": 15, "mask": a, "parts": [("reye", a)]},
        {"class": "bus", "class_ind": 6, "mask": b, "parts": []},
        {"class": "person", "class_ind": 15, "mask": b, "parts": [("rlleg", b)]},
    ]
    write_parts_mat(root / "human_parts" / "2008_000000.mat", "2008_000000", objs)
    hp = PASCALContext(root, "train", ("human_parts",))[0]["human_parts"]
    assert (hp[:5, :5] == 1).all() and (hp[10:, 20:] == 6).all()
    assert int((hp == 0).sum()) == H * W - 25 - 14 * 12


def test_pascal_edges_from_labelmap_boundaries(tmp_path: Path) -> None:
    root = write_pascal_fixture(tmp_path / "P", n_train=1, n_val=0)
    lm = np.full((H, W), 3, dtype=np.uint16)
    lm[:, 16:] = 284  # one vertical boundary between columns 15 and 16
    scipy.io.savemat(str(root / "pascal-context" / "trainval" / "2008_000000.mat"), {"LabelMap": lm})
    e = PASCALContext(root, "train", ("edge",))[0]["edge"][0]
    cols = torch.nonzero(e)[:, 1]
    assert set(cols.tolist()) <= {15, 16}
    # Thinned to one pixel per row (thinning may shorten the line's ends by a pixel).
    assert (e.sum(1) <= 1).all() and (e[1:-1].sum(1) == 1).all()
    # The boundary pixels are exactly where the label changes (before thinning).
    lm2 = np.zeros((H, W), np.uint16)
    lm2[5:15, 8:20] = 7
    edge2 = label_boundaries(lm2)
    changes = np.zeros((H, W), bool)
    changes[:, 1:] |= lm2[:, 1:] != lm2[:, :-1]
    changes[:, :-1] |= lm2[:, 1:] != lm2[:, :-1]
    changes[1:] |= lm2[1:] != lm2[:-1]
    changes[:-1] |= lm2[1:] != lm2[:-1]
    assert edge2.any() and (edge2[~changes] == 0).all()
    assert label_boundaries(np.zeros((H, W), np.uint16)).sum() == 0


# --------------------------------------------------------------------------- augmentation


def _sample(h: int = 8, w: int = 10) -> dict:
    rng = np.random.default_rng(0)
    normals = random_normals(rng, (h, w), invalid_frac=0.0).astype(np.float32)
    arrays = {
        "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "semseg": rng.integers(0, 40, (h, w)).astype(np.int64),
        "depth": rng.uniform(1, 5, (h, w)).astype(np.float32),
        "normals": normals,
        "edge": (rng.random((h, w)) < 0.3).astype(np.float32),
        "saliency": rng.integers(0, 2, (h, w)).astype(np.int64),
    }
    return to_tv_sample(arrays)


def test_flip_negates_normals_x() -> None:
    s = _sample()
    out = RandomHorizontalFlip(p=1.0)(s)
    assert isinstance(out["normals"], Normals) and isinstance(out["depth"], Depth)
    n, fn = s["normals"].as_subclass(torch.Tensor), out["normals"].as_subclass(torch.Tensor)
    assert torch.equal(fn[0], -n[0].flip(-1))
    assert torch.equal(fn[1:], n[1:].flip(-1))
    assert torch.equal(out["semseg"], s["semseg"].flip(-1))
    assert torch.equal(out["image"], s["image"].flip(-1))
    assert torch.equal(RandomHorizontalFlip(p=0.0)(s)["normals"], s["normals"])


def test_scale_divides_depth_and_keeps_labels_integer() -> None:
    s = _sample()
    out = RandomScale((2.0, 2.0))(s)
    assert out["image"].shape == (3, 16, 20) and out["depth"].shape == (1, 16, 20)
    d = s["depth"].as_subclass(torch.Tensor)
    # Nearest upsampling by 2 then depth / 2.
    torch.testing.assert_close(out["depth"].as_subclass(torch.Tensor)[:, ::2, ::2], d / 2)
    assert out["semseg"].dtype == torch.int64 and out["saliency"].dtype == torch.int64
    assert set(out["semseg"].unique().tolist()) <= set(s["semseg"].unique().tolist())
    assert set(out["edge"].unique().tolist()) <= {0.0, 1.0}
    half = RandomScale((0.5, 0.5))(s)
    assert half["semseg"].shape == (4, 5)
    torch.testing.assert_close(half["depth"].as_subclass(torch.Tensor), d[:, ::2, ::2] * 2)
    with pytest.raises(ConfigError, match="data.scale"):
        RandomScale((0.0, 2.0))


def test_crop_pads_with_ignore_values() -> None:
    s = _sample(8, 10)
    torch.manual_seed(0)
    out = RandomCropPad((12, 14))(s)  # larger than the sample: pad bottom/right, no room to move
    assert out["image"].shape == (3, 12, 14)
    assert torch.equal(out["image"][:, :8, :10], s["image"])
    assert (out["image"][:, 8:] == 0).all() and (out["image"][:, :, 10:] == 0).all()
    assert (out["semseg"][8:] == 255).all() and (out["semseg"][:, 10:] == 255).all()
    assert (out["saliency"][8:] == 255).all()
    assert (out["edge"][:, 8:] == 255).all()
    assert (out["depth"][:, 8:] == 0).all() and (out["normals"][:, :, 10:] == 0).all()
    assert out["semseg"].dtype == torch.int64
    small = RandomCropPad((4, 5))(s)
    assert small["semseg"].shape == (4, 5) and small["depth"].shape == (1, 4, 5)


def test_pad_to_multiple() -> None:
    s = _sample(8, 10)
    out = PadToMultiple(8)(s)
    assert out["image"].shape == (3, 8, 16) and (out["semseg"][:, 10:] == 255).all()
    assert (out["depth"][..., 10:] == 0).all() and (out["edge"][..., 10:] == 255).all()
    assert PadToMultiple(1)(s)["image"].shape == (3, 8, 10)
    with pytest.raises(ConfigError, match="data.pad_to"):
        eval_transform(0)


def test_jitter_changes_image_only() -> None:
    s = _sample()
    torch.manual_seed(0)
    out = PhotometricJitter(p=1.0)(s)
    assert not torch.equal(out["image"], s["image"]) and out["image"].dtype == torch.uint8
    for k in ("semseg", "depth", "normals", "edge", "saliency"):
        assert torch.equal(out[k], s[k])


def test_train_transform_validates_crop() -> None:
    with pytest.raises(ConfigError, match="data.crop"):
        train_transform((0, 16))
    with pytest.raises(ConfigError, match="data.crop"):
        train_transform((16,))


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def test_augmentation_is_deterministic(synth: Path) -> None:
    tasks = (*NYUD_TASKS, "saliency")
    ds = NYUDv2(synth, "train", tasks, transform=train_transform((16, 16)), seed=3)
    a = ds[1]
    torch.manual_seed(123)  # the caller's RNG state must not matter ...
    state = torch.get_rng_state()
    assert _equal(a, ds[1])
    assert torch.equal(state, torch.get_rng_state())  # ... nor be consumed
    other = NYUDv2(synth, "train", tasks, transform=train_transform((16, 16)), seed=3)
    assert _equal(a, other[1])
    ds.set_epoch(1)
    assert not torch.equal(a["image"], ds[1]["image"])
    ds.set_epoch(0)
    assert _equal(a, ds[1])
    assert not _equal(a, NYUDv2(synth, "train", tasks, transform=train_transform((16, 16)), seed=4)[1])


def test_augmentation_independent_of_workers(synth: Path) -> None:
    ds = NYUDv2(synth, "train", NYUD_TASKS, transform=train_transform((16, 16)), seed=0)
    ds.set_epoch(2)
    single = list(DataLoader(ds, batch_size=1, num_workers=0))
    multi = list(DataLoader(ds, batch_size=1, num_workers=2))
    assert all(_equal(a, b) for a, b in zip(single, multi))


def test_build_dataset_from_config(synth: Path, pascal: Path) -> None:
    cfg = DataConfig(dataset="synthetic", root=str(synth), tasks=["semseg", "depth", "saliency"], crop=(16, 16))
    tr = build_dataset(cfg, "train", train=True, seed=1)
    assert isinstance(tr, NYUDv2) and tr.seed == 1 and tr[0]["image"].shape == (3, 16, 16)
    va = build_dataset(cfg, "val", train=False)
    assert va[0]["image"].shape == (3, 32, 32)
    pc = DataConfig(dataset="pascal", root=str(pascal), tasks=["human_parts"], crop=(8, 8))
    assert isinstance(build_dataset(pc, "val", train=False), PASCALContext)
    bad = DataConfig(dataset="nyud", root=str(synth), tasks=["semseg"], crop=(16, 16), pad_to=-1)
    with pytest.raises(ConfigError, match="data.pad_to"):
        build_dataset(bad, "val", train=False)


def test_decode_cache_gives_the_same_samples_and_rereads_rewritten_files(synth: Path) -> None:
    from edgemt.data.base import _DECODED, clear_decode_cache

    clear_decode_cache()
    cfg = DataConfig(dataset="synthetic", root=str(synth), tasks=["semseg", "depth"], crop=(16, 16), cache_mb=0)
    plain = build_dataset(cfg, "train", train=True, seed=3)
    assert plain[1] and not _DECODED  # cache off: nothing kept
    cfg.cache_mb = 64
    cached = build_dataset(cfg, "train", train=True, seed=3)
    first = cached[1]
    assert len(_DECODED) == 1
    again = build_dataset(cfg, "train", train=True, seed=3)[1]  # another dataset object shares the cache
    assert len(_DECODED) == 1
    for k in ("image", "semseg", "depth"):
        assert torch.equal(first[k], plain[1][k]) and torch.equal(again[k], first[k])
    # A label rewritten on disk is decoded again, and still validated.
    label = synth / "segmentation" / f"{cached.ids[1]}.png"
    arr = np.array(Image.open(label))
    Image.fromarray(np.full_like(arr, 200)).save(label)
    with pytest.raises(DataError, match="class id 199 is out of range"):
        cached[1]
    with pytest.raises(ConfigError, match="data.cache_mb"):
        build_dataset(DataConfig(dataset="synthetic", root=str(synth), cache_mb=-1), "train", train=True)
    clear_decode_cache()


# --------------------------------------------------------------------------- bad inputs


def test_truncated_png_is_rejected(nyud: Path) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    f = nyud / "images" / "000001.png"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    ds = NYUDv2(nyud, "train", NYUD_TASKS)
    with pytest.raises(DataError, match=r"000001\.png.*cannot decode image"):
        ds[1]
    with pytest.raises(DataError, match=re.escape(str(f))):
        read_image(f)


def test_truncated_jpeg_is_rejected(pascal: Path) -> None:
    f = pascal / "JPEGImages" / "2008_000000.jpg"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"2008_000000\.jpg"):
        PASCALContext(pascal, "train", ("semseg",))[0]


def test_missing_label_file(nyud: Path) -> None:
    (nyud / "depth" / "000002.npy").unlink()
    (nyud / "edge" / "000000.png").unlink()
    with pytest.raises(DataError, match=r"2 file\(s\).*missing") as e:
        NYUDv2(nyud, "train", NYUD_TASKS)
    assert "edge/000000.png" in str(e.value) and "depth/000002.npy" in str(e.value)
    # Tasks that do not need the missing files still load.
    assert len(NYUDv2(nyud, "train", ("semseg", "normals"))) == 3


def test_missing_files_are_counted_beyond_first_five(pascal: Path) -> None:
    for p in (pascal / "sal_distill").iterdir():
        p.unlink()
    for p in (pascal / "normals_distill").iterdir():
        p.unlink()
    with pytest.raises(DataError, match=r"(?s)6 file\(s\).*and 1 more"):
        PASCALContext(pascal, "train", ("saliency", "normals"))


def test_depth_of_wrong_shape(nyud: Path) -> None:
    f = nyud / "depth" / "000000.npy"
    np.save(f, np.ones((H - 1, W), np.float32))
    with pytest.raises(DataError, match=rf"{re.escape(str(f))}.*shape \(23, 32\), expected \(24, 32\)"):
        NYUDv2(nyud, "train", ("depth",))[0]


def test_nan_depth(nyud: Path) -> None:
    f = nyud / "depth" / "000001.npy"
    d = np.ones((H, W), np.float32)
    d[3, 4] = np.nan
    np.save(f, d)
    with pytest.raises(DataError, match=rf"{re.escape(str(f))}.*1 NaN/inf"):
        NYUDv2(nyud, "train", ("depth",))[1]


def test_depth_wrong_dtype_ndim_and_pickle(tmp_path: Path) -> None:
    f = tmp_path / "d.npy"
    np.save(f, np.ones((H, W), np.int32))
    with pytest.raises(DataError, match="dtype int32"):
        read_depth_npy(f, (H, W))
    np.save(f, np.ones((1, H, W), np.float32))
    with pytest.raises(DataError, match="3-D"):
        read_depth_npy(f, (H, W))
    np.save(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=re.escape(str(f))):
        read_depth_npy(f, (H, W))


def test_class_id_out_of_range(nyud: Path) -> None:
    f = nyud / "segmentation" / "000002.png"
    seg = np.ones((H, W), np.uint8)
    seg[2, 2] = 45  # stored 45 = class 44; NYUD has 0..39
    Image.fromarray(seg).save(f)
    with pytest.raises(DataError, match=rf"{re.escape(str(f))}: semseg class id 44 is out of range; allowed 0\.\.39"):
        NYUDv2(nyud, "train", ("semseg",))[2]


def test_pascal_class_id_out_of_range(pascal: Path) -> None:
    f = pascal / "semseg" / "pascal-context" / "2008_000000.png"
    seg = np.zeros((H, W), np.uint8)
    seg[0, 0] = 21
    Image.fromarray(seg).save(f)
    with pytest.raises(DataError, match=r"class id 21 is out of range; allowed 0\.\.20"):
        PASCALContext(pascal, "train", ("semseg",))[0]


def test_label_shape_mismatch(nyud: Path) -> None:
    f = nyud / "edge" / "000000.png"
    Image.fromarray(np.zeros((H, W + 2), np.uint8)).save(f)
    with pytest.raises(DataError, match=rf"{re.escape(str(f))}: edge label has shape \(24, 34\), expected \(24, 32\)"):
        NYUDv2(nyud, "train", ("edge",))[0]


def test_empty_split_file(nyud: Path) -> None:
    f = nyud / "gt_sets" / "val.txt"
    f.write_text("\n \n")
    with pytest.raises(DataError, match=rf"{re.escape(str(f))}: split file is empty"):
        NYUDv2(nyud, "val")


def test_missing_split_file(nyud: Path) -> None:
    with pytest.raises(DataError, match=r"test\.txt: split file does not exist"):
        NYUDv2(nyud, "test")
    with pytest.raises(ConfigError, match="split"):
        NYUDv2(nyud, "../train")


def test_unknown_task(nyud: Path, pascal: Path) -> None:
    with pytest.raises(ConfigError, match=r"task 'human_parts'.*supported tasks: \['semseg'"):
        NYUDv2(nyud, "train", ("semseg", "human_parts"))
    with pytest.raises(ConfigError, match=r"task 'depth'.*PASCAL-Context"):
        PASCALContext(pascal, "train", ("depth",))
    with pytest.raises(ConfigError, match="duplicate"):
        NYUDv2(nyud, "train", ("depth", "depth"))


def test_dataset_root_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=rf"{re.escape(str(missing))}: NYUD-v2 dataset root does not exist"):
        NYUDv2(missing, "train")
    with pytest.raises(DataError, match=rf"{re.escape(str(missing))}: PASCAL-Context dataset root does not exist"):
        build_dataset(DataConfig(dataset="pascal", root=str(missing)), "train", train=True)


def test_bad_meta_json(nyud: Path) -> None:
    (nyud / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match=r"meta\.json"):
        NYUDv2(nyud, "train")
    (nyud / "meta.json").write_text(json.dumps({"num_classes": {"semseg": 300}}))
    with pytest.raises(DataError, match=r"num_classes\.semseg"):
        NYUDv2(nyud, "train")


def test_corrupt_mat_and_missing_key(pascal: Path) -> None:
    f = pascal / "pascal-context" / "trainval" / "2008_000001.mat"
    scipy.io.savemat(str(f), {"Other": np.zeros((H, W))})
    ds = PASCALContext(pascal, "train", ("edge",))
    with pytest.raises(
        DataError, match=rf"{re.escape(str(f))}: .mat file has no variable 'LabelMap'; found \['Other'\]"
    ):
        ds[1]
    f.write_bytes(b"MATLAB 5.0 garbage" * 3)
    with pytest.raises(DataError, match=rf"{re.escape(str(f))}: cannot read .mat file"):
        read_mat(f, "LabelMap")


def test_unknown_part_name(pascal: Path) -> None:
    f = pascal / "human_parts" / "2008_000000.mat"
    m = np.ones((H, W), np.uint8)
    write_parts_mat(f, "x", [{"class": "person", "class_ind": 15, "mask": m, "parts": [("tail", m)]}])
    with pytest.raises(DataError, match=rf"{re.escape(str(f))}: unknown person part name 'tail'"):
        PASCALContext(pascal, "train", ("human_parts",))[0]


def test_reader_errors(tmp_path: Path) -> None:
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(rgb)
    with pytest.raises(DataError, match=rf"{rgb}: expected a single-channel label image"):
        read_label_png(rgb)
    gray = tmp_path / "g.png"
    Image.fromarray(np.full((4, 4), 200, np.uint8)).save(gray)
    assert read_label_png(gray).shape == (4, 4)
    with pytest.raises(DataError, match="exceeds the maximum 100"):
        read_label_png(gray, max_value=100)
    with pytest.raises(DataError, match="does not exist"):
        read_image(tmp_path / "missing.png")
    notimg = tmp_path / "x.png"
    notimg.write_text("hello")
    with pytest.raises(DataError, match=re.escape(str(notimg))):
        read_image(notimg)
    dup = tmp_path / "s.txt"
    dup.write_text("a\nb\na\n")
    with pytest.raises(DataError, match="'a' is listed twice"):
        read_split(dup)
    assert encode_normals(np.zeros((1, 1, 3))).sum() == 0


def test_eval_size_pads_to_exactly_that_size_and_refuses_larger(tmp_path: Path) -> None:
    from edgemt.data.transforms import eval_transform

    root = tmp_path / "nyud"
    write_nyud_fixture(root, n_train=1, n_val=1, size=(24, 32))
    ds = NYUDv2(root, split="val", tasks=("semseg", "depth"), transform=eval_transform(size=(32, 48)))
    s = ds[0]
    assert s["image"].shape[-2:] == (32, 48)
    assert (s["semseg"][24:] == 255).all() and (s["depth"][..., :, 32:] == 0).all()
    small = NYUDv2(root, split="val", tasks=("semseg",), transform=eval_transform(size=(16, 48)))
    with pytest.raises(DataError, match=r"24x32 is larger than data.eval_size 16x48"):
        small[0]
