"""Tests of the synthetic scene generator (edgemt.data.synthetic)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgemt.data import synthetic
from edgemt.data.synthetic import SYNTH_CLASSES, generate, render_scene
from edgemt.errors import ConfigError, DataError

SIZE = (48, 64)
K = len(SYNTH_CLASSES)
C = {n: i for i, n in enumerate(SYNTH_CLASSES)}


@pytest.fixture(scope="module")
def renders() -> list[tuple[dict[str, np.ndarray], dict]]:
    """30 scenes with their internals (camera, instance map, scene), shared by the tests."""
    return [synthetic._render(np.random.default_rng([7, i]), SIZE) for i in range(30)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("ds") / "synth", 4, 2, size=SIZE, seed=3, progress=False)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _camera_rays(info: dict, shape: tuple[int, int]) -> np.ndarray:
    """Ray directions in the camera frame with unit z, (H, W, 3)."""
    h, w = shape
    u = (np.arange(w) + 0.5 - info["cx"]) / info["focal"]
    v = (np.arange(h) + 0.5 - info["cy"]) / info["focal"]
    uu, vv = np.meshgrid(u, v)
    return np.stack([uu, vv, np.ones_like(uu)], axis=-1)


def _angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.degrees(np.arccos(np.clip((a * b).sum(-1), -1.0, 1.0)))


# ---------------------------------------------------------------------------
# render_scene
# ---------------------------------------------------------------------------
def test_render_scene_keys_dtypes_ranges(renders) -> None:
    for out, _ in renders[:10]:
        assert set(out) == {"image", "semseg", "depth", "normals", "edge", "saliency"}
        h, w = SIZE
        assert out["image"].shape == (h, w, 3) and out["image"].dtype == np.uint8
        assert out["semseg"].shape == (h, w) and out["semseg"].dtype == np.int64
        assert out["depth"].shape == (h, w) and out["depth"].dtype == np.float32
        assert out["normals"].shape == (h, w, 3) and out["normals"].dtype == np.float32
        assert out["edge"].dtype == np.uint8 and out["saliency"].dtype == np.uint8
        assert out["semseg"].min() >= -1 and out["semseg"].max() < K
        assert np.all(np.isfinite(out["depth"])) and out["depth"].min() > 0 and out["depth"].max() < 20
        assert np.allclose(np.linalg.norm(out["normals"], axis=-1), 1.0, atol=1e-5)
        assert set(np.unique(out["edge"])) <= {0, 1} and set(np.unique(out["saliency"])) <= {0, 1}
        # the image is not flat: there is shading and texture
        assert out["image"].std() > 5


def test_render_scene_is_a_function_of_the_rng() -> None:
    a = render_scene(np.random.default_rng(11), SIZE)
    b = render_scene(np.random.default_rng(11), SIZE)
    c = render_scene(np.random.default_rng(12), SIZE)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert not np.array_equal(a["image"], c["image"])


def test_every_class_and_clutter_appear(renders) -> None:
    seen = set()
    for out, _ in renders:
        seen |= set(np.unique(out["semseg"]).tolist())
    assert -1 in seen, "no unlabeled clutter: the ignore path is never exercised"
    missing = [SYNTH_CLASSES[k] for k in range(K) if k not in seen]
    assert not missing, f"classes never rendered in 30 scenes: {missing}"


def test_saliency_is_labelled_objects(renders) -> None:
    nonempty = 0
    for out, _ in renders:
        sem, sal = out["semseg"], out["saliency"]
        assert np.array_equal(sal == 1, sem >= C["table"])
        assert not sal[sem < 0].any()  # clutter is background
        nonempty += bool(sal.any())
    assert nonempty >= 0.8 * len(renders)


def test_colour_does_not_identify_class() -> None:
    # Every class shares at least one palette colour with another class.
    pal = synthetic._PALETTES
    for k in range(K):
        others = {c for j, p in pal.items() if j not in (k, -1) for c in p}
        assert set(pal[k]) & others, SYNTH_CLASSES[k]


def test_edges_are_thin_and_on_boundaries(renders) -> None:
    from scipy import ndimage

    for out, info in renders:
        edge = out["edge"].astype(bool)
        inst = info["instance"]
        assert edge.any()
        # thin: a full 2x2 block survives thinning only at the odd junction
        blocks = edge[:-1, :-1] & edge[1:, :-1] & edge[:-1, 1:] & edge[1:, 1:]
        assert blocks.sum() <= 2
        # precision: every edge pixel touches another instance (or a depth jump) in its 3x3 neighbourhood
        change = np.zeros_like(edge)
        change[:, :-1] |= inst[:, :-1] != inst[:, 1:]
        change[:, 1:] |= inst[:, :-1] != inst[:, 1:]
        change[:-1] |= inst[:-1] != inst[1:]
        change[1:] |= inst[:-1] != inst[1:]
        d = out["depth"]
        jump = np.zeros_like(edge)
        jh = np.abs(d[:, 1:] - d[:, :-1]) > synthetic._DEPTH_JUMP * np.minimum(d[:, 1:], d[:, :-1])
        jv = np.abs(d[1:] - d[:-1]) > synthetic._DEPTH_JUMP * np.minimum(d[1:], d[:-1])
        jump[:, 1:] |= jh
        jump[:, :-1] |= jh
        jump[1:] |= jv
        jump[:-1] |= jv
        near = ndimage.binary_dilation(change | jump, np.ones((3, 3), bool))
        assert near[edge].all()
        # recall: almost every instance change has an edge pixel within one pixel
        grown = ndimage.binary_dilation(edge, np.ones((3, 3), bool))
        assert grown[change].mean() > 0.95


# ---------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------
def test_normals_face_the_camera(renders) -> None:
    for out, info in renders:
        rays = _camera_rays(info, SIZE)
        assert ((out["normals"] * rays).sum(-1) < 0).all()


def test_depth_backprojects_onto_the_room_planes(renders) -> None:
    # Back-project depth to world points: floor pixels lie on y = 0, ceiling on y = Hc,
    # back wall on z = D. Catches wrong depth scaling (e.g. ray length instead of z).
    for out, info in renders:
        scene, cam, inst = info["scene"], info["scene"].camera, info["instance"]
        pts_cam = _camera_rays(info, SIZE) * out["depth"][..., None].astype(np.float64)
        world = pts_cam @ cam.rot.T + cam.position
        for plane, axis, value in ((0, 1, 0.0), (1, 1, scene.height), (2, 2, scene.depth)):
            m = inst == plane
            if m.any():
                assert np.abs(world[m][:, axis] - value).max() < 1e-3 * scene.depth


def test_normals_agree_with_depth_gradient(renders) -> None:
    from scipy import ndimage

    errs = []
    for out, info in renders:
        inst = info["instance"]
        pts = _camera_rays(info, SIZE) * out["depth"][..., None].astype(np.float64)
        # finite-difference tangents (central), normal = their cross product, oriented to the camera
        tu = pts[1:-1, 2:] - pts[1:-1, :-2]
        tv = pts[2:, 1:-1] - pts[:-2, 1:-1]
        n_fd = np.cross(tu, tv)
        n_fd *= -np.sign((n_fd * pts[1:-1, 1:-1]).sum(-1, keepdims=True))
        # interior pixels of the planar room surfaces (3x3 neighbourhood on one plane)
        room = inst <= 5
        same = np.ones_like(room)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                same &= np.roll(inst, (dy, dx), axis=(0, 1)) == inst
        mask = (ndimage.binary_erosion(room) & same)[1:-1, 1:-1]
        if mask.sum() < 50:
            continue
        errs.append(_angle_deg(n_fd[mask], out["normals"][1:-1, 1:-1][mask]).mean())
        # the floor normal is world-up: in camera coordinates that is rot^T @ (0, 1, 0)
        floor = inst == 0
        if floor.any():
            up_cam = info["scene"].camera.rot.T @ np.array([0.0, 1.0, 0.0])
            assert _angle_deg(out["normals"][floor], up_cam[None]).max() < 0.1
    assert len(errs) >= 20
    assert np.mean(errs) < 2.0, errs


@pytest.mark.parametrize(
    "prim",
    [
        synthetic._Box(np.array([0.3, 1.0, 4.0]), np.array([0.5, 0.3, 0.2]), 0.7),
        synthetic._Sphere(np.array([-0.2, 0.8, 3.0]), 0.4),
        synthetic._Cylinder(0.1, 3.5, 0.3, 0.2, 1.4),
    ],
    ids=["box", "sphere", "cylinder"],
)
def test_primitive_hits_lie_on_the_surface(prim) -> None:
    rng = np.random.default_rng(0)
    n = 4000
    origin = np.array([0.0, 1.2, 0.0])
    center, radius = prim.bound()
    # rays towards random points near the primitive's bounding sphere
    target = center + rng.uniform(-1.2, 1.2, size=(n, 3)) * radius
    d = target - origin
    rays = (origin[0], origin[1], origin[2], d[:, 0], d[:, 1], d[:, 2])
    t = prim.intersect(rays, 1e-6)
    hit = np.isfinite(t)
    assert 0.1 < hit.mean() < 0.95
    p = origin + t[hit, None] * d[hit]
    nrm = prim.normal(p)
    assert np.allclose(np.linalg.norm(nrm, axis=1), 1.0)
    assert ((nrm * d[hit]).sum(1) < 1e-9).all()  # hit from outside: normal against the ray
    # A point a little outside along the normal is outside the solid, a little inside is inside:
    # a ray from the origin to just inside the surface must hit before reaching it.
    inside = p - 1e-4 * nrm
    d_in = inside - origin
    t_in = prim.intersect((origin[0], origin[1], origin[2], d_in[:, 0], d_in[:, 1], d_in[:, 2]), 1e-6)
    assert (t_in <= 1.0 + 1e-9).all()
    outside = p + 1e-3 * nrm
    # rays from outside points away along the normal never re-enter a convex solid
    t_out = prim.intersect((outside[:, 0], outside[:, 1], outside[:, 2], nrm[:, 0], nrm[:, 1], nrm[:, 2]), 0.0)
    assert np.isinf(t_out).all()
    # a ray through the centre always hits
    dc = center - origin
    assert np.isfinite(prim.intersect((*origin, np.array([dc[0]]), np.array([dc[1]]), np.array([dc[2]])), 1e-6)).all()


def test_objects_cast_shadows() -> None:
    # Render each scene with and without its objects, with the same sensor noise. Room pixels
    # well away from any object can only lose light to objects (shadows), never gain it, and
    # some scenes must show clearly shadowed pixels.
    import dataclasses

    from scipy import ndimage

    shadowed = 0
    for i in range(12):
        scene = synthetic._sample_scene(np.random.default_rng([5, i]), SIZE)
        full, info = synthetic._draw(scene, SIZE, np.random.default_rng(0))
        empty, _ = synthetic._draw(dataclasses.replace(scene, objects=[]), SIZE, np.random.default_rng(0))
        room = ~ndimage.binary_dilation(info["instance"] > 5, np.ones((5, 5), bool))
        diff = full["image"].astype(int)[room].sum(-1) - empty["image"].astype(int)[room].sum(-1)
        assert diff.max() <= 0
        shadowed += int((diff < -30).sum() > 10)
    assert shadowed >= 6


# ---------------------------------------------------------------------------
# generate: layout, formats, determinism, safety
# ---------------------------------------------------------------------------
def test_layout_and_formats(dataset: Path) -> None:
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta == {
        "dataset": "synthetic",
        "num_classes": {"semseg": K},
        "class_names": list(SYNTH_CLASSES),
        "size": list(SIZE),
        "seed": 3,
        "counts": {"train": 4, "val": 2},
        "generator_version": 1,
    }
    train = (dataset / "gt_sets" / "train.txt").read_text().split()
    val = (dataset / "gt_sets" / "val.txt").read_text().split()
    assert train == ["000000", "000001", "000002", "000003"] and val == ["000004", "000005"]
    h, w = SIZE
    for sid in train + val:
        img = np.asarray(Image.open(dataset / "images" / f"{sid}.png"))
        assert img.shape == (h, w, 3) and img.dtype == np.uint8
        seg = Image.open(dataset / "segmentation" / f"{sid}.png")
        assert seg.mode == "L"
        seg = np.asarray(seg)
        assert seg.shape == (h, w) and seg.max() <= K
        depth = np.load(dataset / "depth" / f"{sid}.npy")
        assert depth.shape == (h, w) and depth.dtype == np.float32 and depth.min() > 0
        nimg = Image.open(dataset / "normals" / f"{sid}.png")
        assert nimg.mode == "RGB"
        n = 2.0 * np.asarray(nimg).astype(np.float64) / 255.0 - 1.0
        assert np.abs(np.linalg.norm(n, axis=-1) - 1.0).max() < 0.02  # unit within quantisation
        assert not (np.asarray(nimg) == 0).all(-1).any()  # no pixel marked invalid
        for sub in ("edge", "saliency"):
            m = Image.open(dataset / sub / f"{sid}.png")
            assert m.mode == "L" and m.size == (w, h)
            assert set(np.unique(np.asarray(m))) <= {0, 255}
        assert np.asarray(Image.open(dataset / "edge" / f"{sid}.png")).any()
    assert not list(dataset.parent.glob(".synth*")), "temporary directory left behind"


def test_files_match_render_scene(dataset: Path) -> None:
    out = render_scene(np.random.default_rng([3, 4]), SIZE)
    sid = "000004"
    assert np.array_equal(np.asarray(Image.open(dataset / "images" / f"{sid}.png")), out["image"])
    seg = np.asarray(Image.open(dataset / "segmentation" / f"{sid}.png")).astype(np.int64)
    assert np.array_equal(seg - 1, out["semseg"])  # 0 -> -1 (clutter), else class + 1
    assert np.array_equal(np.load(dataset / "depth" / f"{sid}.npy"), out["depth"])
    n = 2.0 * np.asarray(Image.open(dataset / "normals" / f"{sid}.png")).astype(np.float64) / 255.0 - 1.0
    assert _angle_deg(n, out["normals"].astype(np.float64)).max() < 1.0
    assert np.array_equal(np.asarray(Image.open(dataset / "edge" / f"{sid}.png")) // 255, out["edge"])
    assert np.array_equal(np.asarray(Image.open(dataset / "saliency" / f"{sid}.png")) // 255, out["saliency"])


def test_determinism(tmp_path: Path, dataset: Path) -> None:
    again = generate(tmp_path / "again", 4, 2, size=SIZE, seed=3, progress=False)
    assert _files(again) == _files(dataset)
    other = generate(tmp_path / "other", 4, 2, size=SIZE, seed=4, progress=False)
    a, b = _files(dataset), _files(other)
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a if k.startswith("images/"))


def test_workers_do_not_change_output(tmp_path: Path, dataset: Path) -> None:
    par = generate(tmp_path / "par", 4, 2, size=SIZE, seed=3, progress=False, workers=2)
    assert _files(par) == _files(dataset)


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(DataError, match="ds"):
        generate(out, 1, 1, size=(16, 16), progress=False)
    assert (out / "keep.txt").read_text() == "precious"
    generate(out, 1, 1, size=(16, 16), progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "meta.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    # an existing empty directory is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    generate(empty, 1, 1, size=(16, 16), progress=False)
    assert (empty / "meta.json").exists()


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = synthetic._write_scene

    def flaky(job):
        if job[2] == 2:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(synthetic, "_write_scene", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "ds", 2, 2, size=(16, 16), progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n_train": 0}, "n_train"),
        ({"n_val": 0}, "n_val"),
        ({"n_train": 2.5}, "n_train"),
        ({"size": (8, 64)}, "size"),
        ({"size": (48,)}, "size"),
        ({"size": (48.5, 64)}, "size"),
        ({"seed": -1}, "seed"),
        ({"workers": 0}, "workers"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, field: str) -> None:
    args = {"n_train": 1, "n_val": 1, "size": (16, 16), "progress": False} | kwargs
    with pytest.raises(ConfigError, match=field):
        generate(tmp_path / "ds", **args)
    assert not (tmp_path / "ds").exists()


def test_render_scene_rejects_tiny_size() -> None:
    with pytest.raises(ConfigError, match="size"):
        render_scene(np.random.default_rng(0), (8, 8))


def test_sizes_scale() -> None:
    out = render_scene(np.random.default_rng(1), (16, 24))
    assert out["image"].shape == (16, 24, 3)
    assert not math.isnan(float(out["depth"].mean()))
