"""Synthetic indoor scenes with exact dense labels, written in the NYUD-v2 layout.

No real dataset can be downloaded here, so this module is the embedded default
dataset. It renders small indoor-like 3-D scenes by vectorised numpy ray
casting and writes them exactly as NYUD-v2 is laid out on disk (plus a
``saliency/`` folder), so the real loader is exercised by the default path.

Scene model
-----------
World coordinates are metres, ``y`` up. The room is a closed axis-aligned box:
floor ``y = 0``, ceiling ``y = Hc``, left/right walls ``x = -/+ hw``, a front
wall ``z = 0`` behind the camera and a back wall ``z = D``. Because the room is
closed every camera ray hits something, so depth and normals are valid
everywhere. Inside it stand objects built from three primitives:

* boxes with a random yaw about the vertical axis,
* spheres,
* cylinders with a vertical axis.

An object is one instance made of one or more primitives; its class depends on
the primitive type *and* its size and shape (a table is a thin top on four legs,
a cabinet a tall box, a bed a large low box often with a headboard, a lamp a thin
pole with a shade, a stool a short fat cylinder, a picture or a door a thin panel
on a wall, a rug a very flat box on the floor ...). Colour palettes deliberately
overlap between classes (wooden tables, cabinets, doors and floors; white walls,
ceilings, beds and doors; red balls, boxes, rugs and beds), so colour alone does
not identify a class and a model must use shape and context. About one object in
ten is "clutter": a random primitive labelled 0 (unlabeled) in the segmentation
PNG, so the ignore path of the loss and metrics is exercised.

Appearance: every primitive has a procedural texture evaluated on its 3-D hit
points (plain, stripes, checker or pseudo-noise mixing a base colour and an
alternative colour), Lambertian shading from one random point light (with
inverse-square-like falloff) plus a hemispherical ambient term, and hard cast
shadows from one shadow ray per pixel tested against every object primitive.
A mild sensor model (Gaussian blur, exposure, gamma, additive noise) follows.

Camera: a pinhole camera inside the front part of the room, random position,
height, yaw, downward pitch, small roll and horizontal field of view. Normals
are reported in the camera frame of OpenCV (x right, y down, z forward), so
they face the camera (``n . ray < 0``) and a horizontal flip negates ``x``.
Depth is the camera z-depth in metres (ray directions are built with a unit
forward component, so the ray parameter ``t`` *is* the z-depth).

Labels: class per pixel; ``edge`` marks, on the nearer side, pixels where the
instance id changes to a 4-neighbour or where depth jumps strongly within one
instance, thinned to one pixel; ``saliency`` is every labelled object pixel
(room surfaces and clutter are background).

Determinism: scene ``i`` of :func:`generate` uses
``np.random.default_rng([seed, i])``, so output is byte-identical for a seed
whatever the number of workers.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from edgemt.errors import ConfigError, DataError

__all__ = ["SYNTH_CLASSES", "GENERATOR_VERSION", "render_scene", "generate"]

GENERATOR_VERSION = 1

SYNTH_CLASSES: tuple[str, ...] = (
    "floor",  # 0  room plane y = 0
    "ceiling",  # 1  room plane y = Hc
    "wall",  # 2  the four vertical room planes
    "table",  # 3  thin wide top on four legs
    "cabinet",  # 4  tall box
    "bed",  # 5  large low box, often with a headboard
    "box",  # 6  small box on the floor or on a table
    "ball",  # 7  sphere
    "lamp",  # 8  thin pole + shade (cylinders)
    "stool",  # 9  short fat cylinder
    "picture",  # 10 thin panel hanging on a wall
    "door",  # 11 tall thin panel on a wall, standing on the floor
    "rug",  # 12 very flat box on the floor
)
_C = {name: i for i, name in enumerate(SYNTH_CLASSES)}
_CLUTTER = -1
_FIRST_OBJECT_CLASS = _C["table"]  # classes from here on are salient objects

# Shadow rays start this far off the surface (along the normal) so a surface
# does not shadow itself through rounding.
_EPS = 1e-3
# Two same-instance neighbours whose depths differ by more than this fraction
# are an occlusion boundary (e.g. a table top over its own legs). Grazing room
# planes stay well below it at the sizes used here.
_DEPTH_JUMP = 0.12

# ---------------------------------------------------------------------------
# Colours. Values are linear reflectances in [0, 1]. Palettes share entries on
# purpose (see the module docstring): colour must not identify a class.
# ---------------------------------------------------------------------------
_WOOD = ((0.45, 0.30, 0.18), (0.62, 0.44, 0.27), (0.33, 0.21, 0.12))
_WHITE, _OFFWHITE, _LGREY = (0.86, 0.86, 0.83), (0.80, 0.77, 0.68), (0.66, 0.66, 0.66)
_GREY, _DARK, _BEIGE = (0.45, 0.45, 0.46), (0.12, 0.12, 0.13), (0.74, 0.66, 0.52)
_RED, _BLUE, _GREEN, _YELLOW = (0.62, 0.13, 0.12), (0.16, 0.26, 0.58), (0.20, 0.48, 0.22), (0.85, 0.72, 0.18)
_PALEBLUE, _PALEGREEN, _CARDBOARD = (0.64, 0.72, 0.80), (0.66, 0.75, 0.62), (0.62, 0.48, 0.30)

_PALETTES: dict[int, tuple[tuple[float, float, float], ...]] = {
    _C["floor"]: (*_WOOD, _GREY, _BEIGE, _LGREY),
    _C["ceiling"]: (_WHITE, _OFFWHITE, _LGREY),
    _C["wall"]: (_WHITE, _OFFWHITE, _BEIGE, _PALEBLUE, _PALEGREEN, _LGREY),
    _C["table"]: (*_WOOD, _WHITE, _DARK),
    _C["cabinet"]: (*_WOOD, _WHITE, _GREY),
    _C["bed"]: (_WHITE, _PALEBLUE, _RED, _BEIGE, _BLUE),
    _C["box"]: (_CARDBOARD, _RED, _BLUE, _GREEN, _WHITE),
    _C["ball"]: (_RED, _BLUE, _GREEN, _YELLOW, _WHITE),
    _C["lamp"]: (_DARK, _WHITE, _GREY, _YELLOW),
    _C["stool"]: (*_WOOD, _DARK, _RED),
    _C["picture"]: (_RED, _BLUE, _GREEN, _YELLOW, _DARK, _BEIGE),
    _C["door"]: (*_WOOD, _WHITE, _OFFWHITE),
    _C["rug"]: (_RED, _BLUE, _BEIGE, _GREY, _GREEN),
}
_ALL_COLOURS = tuple(sorted({c for p in _PALETTES.values() for c in p}))
_PALETTES[_CLUTTER] = _ALL_COLOURS

# Texture patterns and their probabilities per class (plain, stripes, checker, noise).
_PATTERNS = ("plain", "stripes", "checker", "noise")
_PATTERN_P: dict[int, tuple[float, float, float, float]] = {
    _C["floor"]: (0.2, 0.35, 0.25, 0.2),
    _C["ceiling"]: (0.7, 0.1, 0.1, 0.1),
    _C["wall"]: (0.5, 0.2, 0.1, 0.2),
    _C["picture"]: (0.1, 0.3, 0.2, 0.4),
    _C["rug"]: (0.2, 0.3, 0.3, 0.2),
}
_DEFAULT_PATTERN_P = (0.45, 0.2, 0.15, 0.2)


@dataclass
class _Material:
    """A procedural texture: ``albedo = base * (1 - s) + alt * s``, ``s`` a pattern of the 3-D point."""

    base: np.ndarray  # (3,)
    alt: np.ndarray  # (3,)
    pattern: str
    scale: float  # pattern period in metres
    direction: np.ndarray  # (3,) unit; stripes run across it
    offset: np.ndarray  # (3,) keeps checker cells off exact plane coordinates
    waves: np.ndarray  # (k, 4): wave vector (3) + phase, for "noise"

    def albedo(self, p: np.ndarray) -> np.ndarray:
        """Albedo (M, 3) at world points ``p`` (M, 3)."""
        if self.pattern == "plain":
            return np.broadcast_to(self.base, p.shape)
        if self.pattern == "stripes":
            s = (np.floor((p @ self.direction) / self.scale * 2.0 + self.offset[0]) % 2.0).astype(np.float64)
        elif self.pattern == "checker":
            cells = np.floor((p + self.offset) / self.scale)
            s = (cells.sum(axis=1) % 2.0).astype(np.float64)
        else:  # "noise": a few random plane waves, smooth blotches
            s = np.sin(p @ self.waves[:, :3].T + self.waves[:, 3]).mean(axis=1) * 0.5 + 0.5
        return self.base * (1.0 - s[:, None]) + self.alt * s[:, None]


def _make_material(rng: np.random.Generator, cls: int) -> _Material:
    palette = _PALETTES[cls]
    base = np.asarray(palette[rng.integers(len(palette))], dtype=np.float64)
    # Per-object jitter: overall brightness and a little per-channel tint.
    base = np.clip(base * rng.uniform(0.8, 1.15) * rng.uniform(0.92, 1.08, size=3), 0.02, 0.95)
    probs = _PATTERN_P.get(cls, _DEFAULT_PATTERN_P)
    pattern = _PATTERNS[rng.choice(len(_PATTERNS), p=probs)]
    if rng.random() < 0.5:  # tone-on-tone pattern
        alt = np.clip(base * rng.uniform(0.55, 0.85), 0.0, 1.0)
    else:  # two-colour pattern, second colour from the whole colour set
        alt = np.asarray(_ALL_COLOURS[rng.integers(len(_ALL_COLOURS))], dtype=np.float64)
    direction = rng.normal(size=3)
    if rng.random() < 0.6:  # mostly axis-aligned stripes (planks, wallpaper)
        direction = np.eye(3)[rng.integers(3)]
    direction = direction / (np.linalg.norm(direction) + 1e-12)
    scale = rng.uniform(0.08, 0.5)
    k = rng.normal(size=(4, 3)) * (2.0 * math.pi / rng.uniform(0.15, 0.6))
    waves = np.concatenate([k, rng.uniform(0, 2 * math.pi, size=(4, 1))], axis=1)
    offset = rng.uniform(0.1, 0.9, size=3) * scale
    return _Material(base, alt, pattern, scale, direction, offset, waves)


# ---------------------------------------------------------------------------
# Primitives. ``intersect`` returns, per ray, the smallest ray parameter
# ``t > tmin`` at which the ray enters the solid (``inf`` on a miss); rays are
# given component-wise so origins may be scalars (primary rays share one).
# ``normal`` returns outward unit normals at points on the surface.
# ---------------------------------------------------------------------------
Rays = tuple[Any, Any, Any, np.ndarray, np.ndarray, np.ndarray]


@dataclass
class _Box:
    center: np.ndarray  # (3,)
    half: np.ndarray  # (3,) half extents in the box frame
    yaw: float  # rotation about +y, world = R_y(yaw) @ local

    def __post_init__(self) -> None:
        self.c, self.s = math.cos(self.yaw), math.sin(self.yaw)

    def _to_local(self, x: Any, y: Any, z: Any) -> tuple[Any, Any, Any]:
        return self.c * x - self.s * z, y, self.s * x + self.c * z

    def intersect(self, rays: Rays, tmin: float) -> np.ndarray:
        ox, oy, oz, dx, dy, dz = rays
        ox, oy, oz = self._to_local(ox - self.center[0], oy - self.center[1], oz - self.center[2])
        dx, dy, dz = self._to_local(dx, dy, dz)
        tn = np.full(np.shape(dx), -np.inf)
        tf = np.full(np.shape(dx), np.inf)
        with np.errstate(divide="ignore", invalid="ignore"):
            for o, d, h in ((ox, dx, self.half[0]), (oy, dy, self.half[1]), (oz, dz, self.half[2])):
                inv = 1.0 / d
                t1 = (-h - o) * inv
                t2 = (h - o) * inv
                # nan (ray parallel to and exactly on a slab plane) compares False: a miss.
                np.maximum(tn, np.minimum(t1, t2), out=tn)
                np.minimum(tf, np.maximum(t1, t2), out=tf)
            hit = (tn <= tf) & (tn > tmin)
        return np.where(hit, tn, np.inf)

    def normal(self, p: np.ndarray) -> np.ndarray:
        lx, ly, lz = self._to_local(p[:, 0] - self.center[0], p[:, 1] - self.center[1], p[:, 2] - self.center[2])
        local = np.stack([lx, ly, lz], axis=1)
        axis = np.argmax(np.abs(local) / self.half, axis=1)  # the face the point lies on
        n = np.zeros_like(local)
        rows = np.arange(len(local))
        n[rows, axis] = np.sign(local[rows, axis])
        # back to world: x = c*lx + s*lz, z = -s*lx + c*lz
        return np.stack([self.c * n[:, 0] + self.s * n[:, 2], n[:, 1], -self.s * n[:, 0] + self.c * n[:, 2]], axis=1)

    def bound(self) -> tuple[np.ndarray, float]:
        return self.center, float(np.linalg.norm(self.half))


@dataclass
class _Sphere:
    center: np.ndarray
    radius: float

    def intersect(self, rays: Rays, tmin: float) -> np.ndarray:
        ox, oy, oz, dx, dy, dz = rays
        px, py, pz = ox - self.center[0], oy - self.center[1], oz - self.center[2]
        a = dx * dx + dy * dy + dz * dz
        b = px * dx + py * dy + pz * dz  # half of the usual b
        c = px * px + py * py + pz * pz - self.radius**2
        disc = b * b - a * c
        with np.errstate(invalid="ignore"):
            t = (-b - np.sqrt(disc)) / a
        return np.where((disc >= 0) & (t > tmin), t, np.inf)

    def normal(self, p: np.ndarray) -> np.ndarray:
        return (p - self.center) / self.radius

    def bound(self) -> tuple[np.ndarray, float]:
        return self.center, self.radius


@dataclass
class _Cylinder:
    cx: float
    cz: float
    radius: float
    y0: float
    y1: float

    def intersect(self, rays: Rays, tmin: float) -> np.ndarray:
        ox, oy, oz, dx, dy, dz = rays
        px, pz = ox - self.cx, oz - self.cz
        a = dx * dx + dz * dz
        b = px * dx + pz * dz
        c = px * px + pz * pz - self.radius**2
        disc = b * b - a * c
        with np.errstate(invalid="ignore", divide="ignore"):
            t_side = (-b - np.sqrt(disc)) / a
            y_side = oy + t_side * dy
            side_ok = (disc >= 0) & (t_side > tmin) & (y_side >= self.y0) & (y_side <= self.y1)
            t = np.where(side_ok, t_side, np.inf)
            for yc in (self.y0, self.y1):  # end caps
                tc = (yc - oy) / dy
                qx, qz = px + tc * dx, pz + tc * dz
                cap_ok = (tc > tmin) & (qx * qx + qz * qz <= self.radius**2)
                t = np.where(cap_ok & (tc < t), tc, t)
        return t

    def normal(self, p: np.ndarray) -> np.ndarray:
        rx, rz = p[:, 0] - self.cx, p[:, 2] - self.cz
        rr = np.sqrt(rx * rx + rz * rz)
        # The point lies on whichever surface it is closest to.
        d_side = np.abs(rr - self.radius)
        d_top, d_bot = np.abs(p[:, 1] - self.y1), np.abs(p[:, 1] - self.y0)
        n = np.stack([rx / np.maximum(rr, 1e-12), np.zeros_like(rr), rz / np.maximum(rr, 1e-12)], axis=1)
        top = (d_top < d_side) & (d_top <= d_bot)
        bot = (d_bot < d_side) & ~top
        n[top] = (0.0, 1.0, 0.0)
        n[bot] = (0.0, -1.0, 0.0)
        return n

    def bound(self) -> tuple[np.ndarray, float]:
        h = 0.5 * (self.y1 - self.y0)
        return np.array([self.cx, self.y0 + h, self.cz]), math.hypot(self.radius, h)


Primitive = _Box | _Sphere | _Cylinder


@dataclass
class _Object:
    """One instance: a class (or clutter), a material, one or more primitives."""

    cls: int
    material: _Material
    prims: list[Primitive] = field(default_factory=list)


@dataclass
class _Camera:
    position: np.ndarray  # (3,) world
    rot: np.ndarray  # (3, 3) columns: camera x (right), y (down), z (forward) in world
    focal: float  # pixels
    cx: float
    cy: float


@dataclass
class _Scene:
    hw: float  # room half width
    depth: float  # room depth (back wall z)
    height: float  # ceiling height
    room_materials: list[_Material]  # floor, ceiling, back, left, right, front
    objects: list[_Object]
    light: np.ndarray  # (3,)
    light_rgb: np.ndarray  # (3,) intensity per channel
    ambient: float
    camera: _Camera


# Room planes in the order used for instance ids 0..5 and room_materials.
_ROOM_PLANES = ("floor", "ceiling", "back", "left", "right", "front")
_ROOM_CLASS = (_C["floor"], _C["ceiling"], _C["wall"], _C["wall"], _C["wall"], _C["wall"])
_ROOM_NORMALS = np.array([[0, 1, 0], [0, -1, 0], [0, 0, -1], [1, 0, 0], [-1, 0, 0], [0, 0, 1]], dtype=np.float64)


# ---------------------------------------------------------------------------
# Scene sampling
# ---------------------------------------------------------------------------
def _sample_camera(rng: np.random.Generator, size: tuple[int, int], hw: float) -> _Camera:
    h, w = size
    pos = np.array([rng.uniform(-0.5, 0.5) * hw, rng.uniform(1.0, 1.8), rng.uniform(0.3, 1.0)])
    yaw = math.radians(rng.uniform(-30, 30))
    pitch = math.radians(rng.uniform(-28, -4))  # looking down
    roll = math.radians(rng.uniform(-3, 3))
    fwd = np.array([math.cos(pitch) * math.sin(yaw), math.sin(pitch), math.cos(pitch) * math.cos(yaw)])
    right = np.cross([0.0, 1.0, 0.0], fwd)
    right /= np.linalg.norm(right)
    down = np.cross(right, fwd)  # image y grows downwards
    right, down = math.cos(roll) * right + math.sin(roll) * down, -math.sin(roll) * right + math.cos(roll) * down
    hfov = math.radians(rng.uniform(55, 75))
    focal = (w / 2.0) / math.tan(hfov / 2.0)
    return _Camera(pos, np.stack([right, down, fwd], axis=1), focal, w / 2.0, h / 2.0)


def _yaw_offset(yaw: float, lx: float, lz: float) -> tuple[float, float]:
    """World xz offset of the local (box frame) offset ``(lx, lz)``."""
    c, s = math.cos(yaw), math.sin(yaw)
    return c * lx + s * lz, -s * lx + c * lz


def _box(cx: float, y0: float, cz: float, w: float, h: float, d: float, yaw: float) -> _Box:
    """Box standing on height ``y0``, footprint ``w x d`` (local x, z), height ``h``."""
    return _Box(np.array([cx, y0 + h / 2.0, cz]), np.array([w / 2.0, h / 2.0, d / 2.0]), yaw)


def _small_item(rng: np.random.Generator, x: float, y0: float, z: float, cls: int) -> list[Primitive]:
    if cls == _C["ball"]:
        r = rng.uniform(0.06, 0.14)
        return [_Sphere(np.array([x, y0 + r, z]), r)]
    if cls == _C["lamp"]:  # desk lamp: short pole + shade
        r = rng.uniform(0.07, 0.12)
        hp = rng.uniform(0.2, 0.35)
        return [
            _Cylinder(x, z, rng.uniform(0.012, 0.02), y0, y0 + hp),
            _Cylinder(x, z, r, y0 + hp, y0 + hp + rng.uniform(0.1, 0.16)),
        ]
    s = rng.uniform(0.1, 0.3, size=3)
    return [_box(x, y0, z, s[0], s[1], s[2], rng.uniform(0, math.pi))]


# Floor object kinds and their probabilities.
_KINDS = ("table", "cabinet", "bed", "box", "ball", "lamp", "stool", "clutter")
_KIND_P = np.array([0.16, 0.13, 0.08, 0.16, 0.12, 0.10, 0.13, 0.12])


def _sample_objects(rng: np.random.Generator, hw: float, depth: float, height: float, cam: np.ndarray) -> list[_Object]:
    objects: list[_Object] = []
    footprints: list[tuple[float, float, float]] = []  # (x, z, radius) of floor objects

    def free_spot(radius: float, against_wall: bool) -> tuple[float, float, float] | None:
        """Rejection-sample a floor position (x, z, yaw_base) not overlapping others or the camera."""
        for _ in range(25):
            if against_wall:
                wall = rng.integers(3)  # back, left, right
                if wall == 0:
                    x, z, yaw = rng.uniform(-hw + radius, hw - radius), depth - radius * 0.75, 0.0
                else:
                    sgn = -1.0 if wall == 1 else 1.0
                    x = sgn * (hw - radius * 0.75)
                    z, yaw = rng.uniform(cam[2] + 0.5, depth - radius), sgn * math.pi / 2
            else:
                x = rng.uniform(-hw + radius, hw - radius)
                z = rng.uniform(cam[2] + 0.4, depth - radius)
                yaw = rng.uniform(-math.pi, math.pi)
            if math.hypot(x - cam[0], z - cam[2]) < radius + 0.6:
                continue
            if all(math.hypot(x - fx, z - fz) > radius + fr + 0.05 for fx, fz, fr in footprints):
                footprints.append((x, z, radius))
                return x, z, yaw
        return None

    n_floor = int(rng.integers(4, 12))
    for kind in rng.choice(_KINDS, size=n_floor, p=_KIND_P):
        if kind == "table":
            w, d = rng.uniform(0.9, 1.8), rng.uniform(0.6, 1.0)
            spot = free_spot(0.5 * math.hypot(w, d), against_wall=False)
            if spot is None:
                continue
            x, z, yaw = spot
            top_h, thick, leg = rng.uniform(0.65, 0.8), rng.uniform(0.03, 0.06), rng.uniform(0.04, 0.07)
            prims: list[Primitive] = [_box(x, top_h - thick, z, w, thick, d, yaw)]
            for sx in (-1, 1):
                for sz in (-1, 1):
                    ox, oz = _yaw_offset(yaw, sx * (w / 2 - leg), sz * (d / 2 - leg))
                    prims.append(_box(x + ox, 0.0, z + oz, leg, top_h - thick, leg, yaw))
            objects.append(_Object(_C["table"], _make_material(rng, _C["table"]), prims))
            # Things standing on the table give stacking and occlusion.
            for _ in range(rng.choice(3, p=(0.45, 0.4, 0.15))):
                cls = int(rng.choice([_C["ball"], _C["box"], _C["lamp"], _CLUTTER], p=(0.35, 0.35, 0.2, 0.1)))
                ox, oz = _yaw_offset(yaw, rng.uniform(-0.35, 0.35) * w, rng.uniform(-0.3, 0.3) * d)
                item = _small_item(rng, x + ox, top_h, z + oz, cls if cls != _CLUTTER else _C["box"])
                objects.append(_Object(cls, _make_material(rng, cls), item))
        elif kind == "cabinet":
            w, d = rng.uniform(0.5, 1.2), rng.uniform(0.4, 0.6)
            spot = free_spot(0.5 * math.hypot(w, d), against_wall=rng.random() < 0.6)
            if spot is None:
                continue
            x, z, yaw = spot
            h = rng.uniform(1.2, min(2.1, height - 0.6))
            objects.append(_Object(_C["cabinet"], _make_material(rng, _C["cabinet"]), [_box(x, 0, z, w, h, d, yaw)]))
        elif kind == "bed":
            w, d = rng.uniform(1.3, 2.0), rng.uniform(1.9, 2.2)
            spot = free_spot(0.5 * math.hypot(w, d), against_wall=rng.random() < 0.5)
            if spot is None:
                continue
            x, z, yaw = spot
            h = rng.uniform(0.4, 0.6)
            prims = [_box(x, 0, z, w, h, d, yaw)]
            if rng.random() < 0.7:  # headboard on the local +z end (the wall side when against one)
                ox, oz = _yaw_offset(yaw, 0.0, d / 2 - 0.03)
                prims.append(_box(x + ox, 0, z + oz, w, rng.uniform(0.85, 1.15), 0.06, yaw))
            objects.append(_Object(_C["bed"], _make_material(rng, _C["bed"]), prims))
        elif kind == "box":
            s = rng.uniform(0.25, 0.6, size=3)
            spot = free_spot(0.5 * math.hypot(s[0], s[2]), against_wall=False)
            if spot is None:
                continue
            x, z, yaw = spot
            objects.append(_Object(_C["box"], _make_material(rng, _C["box"]), [_box(x, 0, z, s[0], s[1], s[2], yaw)]))
        elif kind == "ball":
            r = rng.uniform(0.12, 0.35)
            spot = free_spot(r, against_wall=False)
            if spot is None:
                continue
            x, z, _ = spot
            objects.append(_Object(_C["ball"], _make_material(rng, _C["ball"]), [_Sphere(np.array([x, r, z]), r)]))
        elif kind == "lamp":
            shade_r = rng.uniform(0.15, 0.25)
            spot = free_spot(shade_r, against_wall=False)
            if spot is None:
                continue
            x, z, _ = spot
            pole_h = rng.uniform(1.1, min(1.7, height - 0.8))
            shade_h = rng.uniform(0.22, 0.35)
            prims = [
                _Cylinder(x, z, rng.uniform(0.12, 0.2), 0.0, 0.03),  # base disc
                _Cylinder(x, z, rng.uniform(0.015, 0.03), 0.03, pole_h),  # pole
                _Cylinder(x, z, shade_r, pole_h, pole_h + shade_h),  # shade
            ]
            objects.append(_Object(_C["lamp"], _make_material(rng, _C["lamp"]), prims))
        elif kind == "stool":
            r = rng.uniform(0.17, 0.3)
            spot = free_spot(r, against_wall=False)
            if spot is None:
                continue
            x, z, _ = spot
            prim = _Cylinder(x, z, r, 0.0, rng.uniform(0.35, 0.6))
            objects.append(_Object(_C["stool"], _make_material(rng, _C["stool"]), [prim]))
        else:  # clutter: a random primitive over the union of the shape ranges, labelled unlabeled
            r = rng.uniform(0.1, 0.45)
            spot = free_spot(r, against_wall=False)
            if spot is None:
                continue
            x, z, yaw = spot
            shape = rng.integers(3)
            if shape == 0:
                s = rng.uniform(0.1, 2 * r / math.sqrt(2), size=2)
                prim = _box(x, 0, z, s[0], rng.uniform(0.1, 1.2), s[1], yaw)
            elif shape == 1:
                prim = _Sphere(np.array([x, r, z]), r)
            else:
                prim = _Cylinder(x, z, r, 0.0, rng.uniform(0.1, 1.2))
            objects.append(_Object(_CLUTTER, _make_material(rng, _CLUTTER), [prim]))

    # Wall-mounted panels: pictures and doors (thin boxes against a wall).
    def wall_panel(w: float, y0: float, h: float, thick: float) -> Primitive:
        wall = rng.integers(3)
        if wall == 0:
            x = rng.uniform(-hw + w / 2 + 0.05, hw - w / 2 - 0.05)
            return _box(x, y0, depth - thick / 2, w, h, thick, 0.0)
        sgn = -1.0 if wall == 1 else 1.0
        z = rng.uniform(max(cam[2] + 0.5, w / 2 + 0.05), depth - w / 2 - 0.05)
        return _box(sgn * (hw - thick / 2), y0, z, w, h, thick, math.pi / 2)

    for _ in range(rng.choice(4, p=(0.3, 0.35, 0.25, 0.1))):
        w, h = rng.uniform(0.35, 1.2), rng.uniform(0.3, 0.9)
        prim = wall_panel(w, rng.uniform(1.0, min(1.7, height - h - 0.15)), h, rng.uniform(0.02, 0.05))
        objects.append(_Object(_C["picture"], _make_material(rng, _C["picture"]), [prim]))
    if rng.random() < 0.45:
        prim = wall_panel(
            rng.uniform(0.75, 1.0), 0.0, rng.uniform(1.95, min(2.2, height - 0.15)), rng.uniform(0.03, 0.06)
        )
        objects.append(_Object(_C["door"], _make_material(rng, _C["door"]), [prim]))
    if rng.random() < 0.4:  # rug: objects stand on (in) it, fine for a solid ray caster
        x, z = rng.uniform(-0.5, 0.5) * hw, rng.uniform(cam[2] + 1.0, max(cam[2] + 1.1, depth - 1.2))
        prim = _box(
            x, 0.0, z, rng.uniform(1.0, 2.4), rng.uniform(0.008, 0.015), rng.uniform(0.8, 1.8), rng.uniform(0, math.pi)
        )
        objects.append(_Object(_C["rug"], _make_material(rng, _C["rug"]), [prim]))
    return objects


def _sample_scene(rng: np.random.Generator, size: tuple[int, int]) -> _Scene:
    hw, depth, height = rng.uniform(1.8, 3.0), rng.uniform(4.5, 7.5), rng.uniform(2.45, 3.2)
    camera = _sample_camera(rng, size, hw)
    wall_mat = _make_material(rng, _C["wall"])
    # Walls usually share one finish; sometimes one wall is an accent wall.
    walls = [wall_mat if rng.random() < 0.8 else _make_material(rng, _C["wall"]) for _ in range(4)]
    room = [_make_material(rng, _C["floor"]), _make_material(rng, _C["ceiling"]), *walls]
    objects = _sample_objects(rng, hw, depth, height, camera.position)
    light = np.array([rng.uniform(-0.7, 0.7) * hw, height - rng.uniform(0.05, 0.3), rng.uniform(0.2, 0.9) * depth])
    tint = rng.uniform(0.85, 1.0, size=3)
    light_rgb = tint / tint.max() * rng.uniform(1.0, 1.7)
    return _Scene(hw, depth, height, room, objects, light, light_rgb, rng.uniform(0.22, 0.42), camera)


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------
def _intersect_culled(prim: Primitive, rays: Rays, tmin: float) -> tuple[np.ndarray, np.ndarray]:
    """Intersect only the rays that reach the primitive's bounding sphere.

    Returns the indices of those rays and their ``t`` (``inf`` on a miss). The
    sphere test is a few operations per ray, much cheaper than a box or
    cylinder test, and most primitives cover a small part of the image.
    """
    ox, oy, oz, dx, dy, dz = rays
    center, radius = prim.bound()
    px, py, pz = ox - center[0], oy - center[1], oz - center[2]
    b = px * dx + py * dy + pz * dz
    c = px * px + py * py + pz * pz - radius * radius
    a = dx * dx + dy * dy + dz * dz
    # the line meets the sphere, and the sphere is not wholly behind the origin
    cand = (b * b >= a * c) & ((c <= 0) | (b < 0))
    idx = np.flatnonzero(cand)
    sub = tuple(x if np.ndim(x) == 0 else x[idx] for x in rays)
    return idx, prim.intersect(sub, tmin)  # type: ignore[arg-type]


def _room_hit(scene: _Scene, rays: Rays) -> tuple[np.ndarray, np.ndarray]:
    """Exit distance of rays from inside the closed room box and which plane (0..5) they hit."""
    ox, oy, oz, dx, dy, dz = rays
    with np.errstate(divide="ignore"):
        tx = np.where(dx > 0, (scene.hw - ox) / dx, (-scene.hw - ox) / dx)
        ty = np.where(dy > 0, (scene.height - oy) / dy, (0.0 - oy) / dy)
        tz = np.where(dz > 0, (scene.depth - oz) / dz, (0.0 - oz) / dz)
    t = np.stack([ty, tz, tx])  # y first: floor/ceiling win ties in corners
    which = np.argmin(t, axis=0)
    # map (axis, sign) to plane index in _ROOM_PLANES
    plane = np.where(
        which == 0,
        np.where(dy > 0, 1, 0),
        np.where(which == 1, np.where(dz > 0, 2, 5), np.where(dx > 0, 4, 3)),
    )
    return np.take_along_axis(t, which[None], axis=0)[0], plane


def _render(rng: np.random.Generator, size: tuple[int, int]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Sample and render one scene; also return internals (camera, instance map) for tests."""
    return _draw(_sample_scene(rng, size), size, rng)


def _draw(
    scene: _Scene, size: tuple[int, int], rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Render ``scene``; ``rng`` drives only the sensor model (blur, exposure, noise)."""
    h, w = size
    cam = scene.camera

    # Primary rays through pixel centres; forward component 1 => t is z-depth.
    u = (np.arange(w) + 0.5 - cam.cx) / cam.focal
    v = (np.arange(h) + 0.5 - cam.cy) / cam.focal
    uu, vv = np.meshgrid(u, v)
    uu, vv = uu.ravel(), vv.ravel()
    r = cam.rot
    d = [r[k, 0] * uu + r[k, 1] * vv + r[k, 2] for k in range(3)]
    o = cam.position
    rays: Rays = (o[0], o[1], o[2], d[0], d[1], d[2])

    t_best, plane = _room_hit(scene, rays)
    inst = plane.astype(np.int64)  # instance ids: 0..5 room planes, 6.. objects
    prim_of = np.full(t_best.shape, -1, dtype=np.int64)  # index into the flat primitive list
    flat: list[tuple[int, Primitive]] = []  # (object index, primitive)
    for oi, obj in enumerate(scene.objects):
        for prim in obj.prims:
            flat.append((oi, prim))
    for pi, (oi, prim) in enumerate(flat):
        idx, t = _intersect_culled(prim, rays, 1e-6)
        closer = t < t_best[idx]
        sel = idx[closer]
        t_best[sel] = t[closer]
        inst[sel] = 6 + oi
        prim_of[sel] = pi

    n_pix = h * w
    pts = np.stack([o[0] + t_best * d[0], o[1] + t_best * d[1], o[2] + t_best * d[2]], axis=1)
    normals = _ROOM_NORMALS[np.clip(inst, 0, 5)].copy()
    albedo = np.empty((n_pix, 3))
    cls = np.empty(n_pix, dtype=np.int64)
    for k in range(6):
        m = inst == k
        if m.any():
            albedo[m] = scene.room_materials[k].albedo(pts[m])
            cls[m] = _ROOM_CLASS[k]
    for pi, (oi, prim) in enumerate(flat):
        m = prim_of == pi
        if m.any():
            normals[m] = prim.normal(pts[m])
            obj = scene.objects[oi]
            albedo[m] = obj.material.albedo(pts[m])
            cls[m] = obj.cls

    # Shading: hemispherical ambient (sky-ish from above) + point light with cast shadows.
    to_l = scene.light[None, :] - pts
    dist2 = np.einsum("ij,ij->i", to_l, to_l)
    cos_l = np.einsum("ij,ij->i", normals, to_l) / np.sqrt(dist2)
    lit = np.flatnonzero(cos_l > 0)
    if len(lit):
        sp = pts[lit] + _EPS * normals[lit]
        sd = scene.light[None, :] - sp  # unnormalised: the light is at t = 1
        srays: Rays = (sp[:, 0], sp[:, 1], sp[:, 2], sd[:, 0], sd[:, 1], sd[:, 2])
        blocked = np.zeros(len(lit), dtype=bool)
        for _, prim in flat:
            idx, t = _intersect_culled(prim, srays, 0.0)
            blocked[idx[t < 1.0]] = True
        vis = np.zeros(n_pix)
        vis[lit] = ~blocked
    else:
        vis = np.zeros(n_pix)
    direct = np.clip(cos_l, 0.0, None) * vis * 4.0 / (4.0 + dist2)
    ambient = scene.ambient * (0.75 + 0.25 * normals[:, 1])
    radiance = albedo * (ambient[:, None] + direct[:, None] * scene.light_rgb[None, :])

    # Sensor: blur (optics), exposure, gamma, noise, quantisation.
    img = radiance.reshape(h, w, 3)
    sigma = rng.uniform(0.3, 0.8)
    img = ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0), mode="nearest")
    img = np.clip(img * rng.uniform(0.85, 1.2), 0.0, 1.0) ** (1 / 2.2)
    img = img + rng.normal(0.0, rng.uniform(0.004, 0.02), size=img.shape)
    image = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)

    depth = t_best.reshape(h, w).astype(np.float32)
    inst_map = inst.reshape(h, w)
    n_cam = (normals @ cam.rot).reshape(h, w, 3)  # rows dotted with camera axes
    n_cam /= np.linalg.norm(n_cam, axis=2, keepdims=True)
    semseg = cls.reshape(h, w)
    out = {
        "image": image,
        "semseg": semseg,
        "depth": depth,
        "normals": n_cam.astype(np.float32),
        "edge": _boundaries(inst_map, depth),
        "saliency": (semseg >= _FIRST_OBJECT_CLASS).astype(np.uint8),
    }
    info = {"focal": cam.focal, "cx": cam.cx, "cy": cam.cy, "instance": inst_map, "scene": scene}
    return out, info


def _boundaries(inst: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """1-pixel boundaries (uint8 0/1): instance changes and same-instance depth jumps, on the nearer side."""
    from skimage.morphology import thin  # lazy: skimage import is slow and only needed here

    edge = np.zeros(inst.shape, dtype=bool)
    for axis in (0, 1):
        a = [slice(None), slice(None)]
        b = [slice(None), slice(None)]
        a[axis], b[axis] = slice(None, -1), slice(1, None)
        ia, ib, za, zb = inst[tuple(a)], inst[tuple(b)], depth[tuple(a)], depth[tuple(b)]
        jump = np.abs(za - zb) > _DEPTH_JUMP * np.minimum(za, zb)
        diff = (ia != ib) | jump
        # Mark the nearer pixel of each differing pair: the occluding contour.
        edge[tuple(a)] |= diff & (za <= zb)
        edge[tuple(b)] |= diff & (zb < za)
    return thin(edge).astype(np.uint8)


def render_scene(rng: np.random.Generator, size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Sample a random scene from ``rng`` and render it at ``size = (H, W)``.

    Returns a dict with

    * ``image``: (H, W, 3) uint8 RGB, with mild blur and noise;
    * ``semseg``: (H, W) int64 class index into :data:`SYNTH_CLASSES`, -1 = unlabeled clutter;
    * ``depth``: (H, W) float32 camera z-depth in metres, > 0 everywhere;
    * ``normals``: (H, W, 3) float32 unit normals in the camera frame (x right, y down, z forward);
    * ``edge``: (H, W) uint8 in {0, 1}, thin instance/occlusion boundaries;
    * ``saliency``: (H, W) uint8 in {0, 1}, 1 on labelled object pixels.

    The result depends only on the state of ``rng`` and ``size``.
    """
    out, _ = _render(rng, _check_size(size))
    return out


# ---------------------------------------------------------------------------
# Dataset writing
# ---------------------------------------------------------------------------
def _check_size(size: Sequence[int]) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in size)
        ok = [h, w] == list(size)
    except (TypeError, ValueError):
        ok = False
    if not ok or h < 16 or w < 16:
        raise ConfigError(f"size: expected (H, W) with two integers >= 16, got {size!r}")
    return h, w


def _write_scene(job: tuple[str, int, int, tuple[int, int]]) -> int:
    """Render scene ``i`` with ``default_rng([seed, i])`` and write its files under ``root``."""
    root, seed, i, size = job
    out = render_scene(np.random.default_rng([seed, i]), size)
    base = Path(root)
    sid = f"{i:06d}"
    Image.fromarray(out["image"]).save(base / "images" / f"{sid}.png")
    seg = np.where(out["semseg"] < 0, 0, out["semseg"] + 1).astype(np.uint8)
    Image.fromarray(seg).save(base / "segmentation" / f"{sid}.png")
    np.save(base / "depth" / f"{sid}.npy", out["depth"])
    nrm = np.clip(np.rint((out["normals"] + 1.0) * 0.5 * 255.0), 0, 255).astype(np.uint8)
    Image.fromarray(nrm).save(base / "normals" / f"{sid}.png")
    Image.fromarray(out["edge"] * np.uint8(255)).save(base / "edge" / f"{sid}.png")
    Image.fromarray(out["saliency"] * np.uint8(255)).save(base / "saliency" / f"{sid}.png")
    return i


_SUBDIRS = ("images", "segmentation", "depth", "normals", "edge", "saliency", "gt_sets")


def generate(
    out_dir: str | os.PathLike[str],
    n_train: int,
    n_val: int,
    size: tuple[int, int] = (96, 128),
    seed: int = 0,
    *,
    overwrite: bool = False,
    progress: bool = True,
    workers: int = 1,
) -> Path:
    """Render ``n_train + n_val`` scenes and write them in the NYUD-v2 layout under ``out_dir``.

    Layout: ``images/{id}.png`` (RGB), ``segmentation/{id}.png`` (0 = unlabeled,
    else class + 1), ``depth/{id}.npy`` (float32 metres), ``normals/{id}.png``
    (``n = 2 v / 255 - 1``), ``edge/{id}.png`` and ``saliency/{id}.png`` (0/255),
    ``gt_sets/{train,val}.txt`` and ``meta.json``. Ids are ``000000``, ... with
    the train ids first. Scene ``i`` uses ``np.random.default_rng([seed, i])``,
    so the files are identical for any ``workers``.

    Everything is written to a temporary sibling directory that is renamed to
    ``out_dir`` at the end, so an interrupted run leaves no half dataset.

    Raises:
        ConfigError: an argument is out of range.
        DataError: ``out_dir`` exists and is not empty, and ``overwrite`` is false.
    """
    for name, val in (("n_train", n_train), ("n_val", n_val), ("workers", workers)):
        if isinstance(val, bool) or not isinstance(val, int | np.integer) or val < 1:
            raise ConfigError(f"{name}: expected an integer >= 1, got {val!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"seed: expected an integer >= 0, got {seed!r}")
    size = _check_size(size)
    out = Path(out_dir).resolve()  # resolved so that the sibling temp dir has a real name
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{out}: directory exists and is not empty (pass overwrite=True to replace it)")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        for sub in _SUBDIRS:
            (tmp / sub).mkdir(parents=True)
        total = n_train + n_val
        jobs = [(str(tmp), int(seed), i, size) for i in range(total)]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, desc=f"synthetic {size[0]}x{size[1]}", unit="scene")
        if workers > 1 and total > 1:
            # fork where available: spawn would re-import the package (and torch) in every worker. Not
            # once JAX or TensorFlow (the TFLite toolchain) is loaded: their threads make fork deadlock-prone.
            threaded = any(m in sys.modules for m in ("jax", "tensorflow"))
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() and not threaded else "spawn"
            with multiprocessing.get_context(method).Pool(min(workers, total)) as pool:
                for _ in pool.imap_unordered(_write_scene, jobs, chunksize=max(1, total // (8 * workers))):
                    if bar is not None:
                        bar.update(1)
        else:
            for job in jobs:
                _write_scene(job)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        ids = [f"{i:06d}" for i in range(total)]
        (tmp / "gt_sets" / "train.txt").write_text("".join(f"{s}\n" for s in ids[:n_train]))
        (tmp / "gt_sets" / "val.txt").write_text("".join(f"{s}\n" for s in ids[n_train:]))
        meta = {
            "dataset": "synthetic",
            "num_classes": {"semseg": len(SYNTH_CLASSES)},
            "class_names": list(SYNTH_CLASSES),
            "size": list(size),
            "seed": int(seed),
            "counts": {"train": int(n_train), "val": int(n_val)},
            "generator_version": GENERATOR_VERSION,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")

        # Swap in: move an old directory aside first so the rename cannot fail on a non-empty target.
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
