"""Joint augmentation of an image and its dense labels (torchvision.transforms.v2).

A sample travels through the transforms as a dict of tv_tensors, so every
geometric transform is applied identically to the image and all labels:

* ``image``: :class:`tv_tensors.Image` ``uint8 (3, H, W)``;
* ``semseg`` / ``human_parts`` / ``saliency``: :class:`tv_tensors.Mask` ``int64 (H, W)``;
* ``edge``: :class:`tv_tensors.Mask` ``float32 (1, H, W)``;
* ``depth``: :class:`Depth` ``float32 (1, H, W)`` (metres, 0 = invalid);
* ``normals``: :class:`Normals` ``float32 (3, H, W)`` (all-zero = invalid).

``Depth`` and ``Normals`` subclass ``Mask`` so torchvision's mask kernels
(nearest resize, crop, pad, flip) apply to them; the transforms below add what
differs: depth is divided by the scale factor, normals' x is negated on a
horizontal flip, and padding fills 255 for class/edge labels but 0 for depth,
normals and the image.

The transforms keep the image ``uint8``; :func:`finalize_sample` (which
:class:`~edgemt.data.base.DenseDataset` always applies last) normalises it with
the ImageNet statistics and unwraps the tv_tensors into plain tensors, so a
dataset without any transform still returns model-ready samples.

Randomness comes only from ``torch``'s global generator, which the dataset
seeds per (seed, epoch, index) inside ``torch.random.fork_rng``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from edgemt.errors import ConfigError, DataError
from edgemt.tasks import IGNORE_INDEX

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Depth",
    "Normals",
    "RandomScale",
    "RandomCropPad",
    "RandomHorizontalFlip",
    "PhotometricJitter",
    "PadToMultiple",
    "to_tv_sample",
    "finalize_sample",
    "train_transform",
    "eval_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Label layouts by task name: class maps are (H, W) int64; dense maps are (C, H, W) float32.
_CLASS_TASKS = ("semseg", "human_parts", "saliency")
_DENSE_CHANNELS = {"depth": 1, "normals": 3, "edge": 1}


class Depth(tv_tensors.Mask):
    """Depth in metres ``(1, H, W)``; resized nearest, divided by the scale factor, padded with 0."""


class Normals(tv_tensors.Mask):
    """Unit surface normals ``(3, H, W)``; x negated on horizontal flip, padded with 0 (invalid)."""


_SAMPLE_TYPES = (tv_tensors.Image, tv_tensors.Mask)


def _fill(inpt: Any) -> float:
    """Padding value per label type (check subclasses before ``Mask``)."""
    if isinstance(inpt, (Depth, Normals)):
        return 0.0  # invalid depth / all-zero normal
    if isinstance(inpt, tv_tensors.Mask):
        return float(IGNORE_INDEX)
    return 0.0  # image: black


def _hw(flat_inputs: list[Any]) -> tuple[int, int]:
    """Spatial size of the sample (all entries share it; the dataset checked that)."""
    for x in flat_inputs:
        if isinstance(x, _SAMPLE_TYPES):
            return int(x.shape[-2]), int(x.shape[-1])
    raise ValueError("sample holds no image or label tensor")


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from ``scale``.

    The image is resized bilinearly (antialiased), labels nearest, and depth is
    divided by the factor: enlarging the image by ``s`` looks like moving the
    camera ``s`` times closer.
    """

    _transformed_types = _SAMPLE_TYPES

    def __init__(self, scale: tuple[float, float] = (0.5, 2.0)) -> None:
        super().__init__()
        lo, hi = (float(v) for v in scale)
        if not (0 < lo <= hi):
            raise ConfigError(f"data.scale: expected 0 < min <= max, got {tuple(scale)}")
        self.scale = (lo, hi)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        lo, hi = self.scale
        s = lo + (hi - lo) * float(torch.rand(()))
        h, w = _hw(flat_inputs)
        return {"factor": s, "size": [max(1, round(h * s)), max(1, round(w * s))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        size = params["size"]
        if isinstance(inpt, tv_tensors.Image):
            return F.resize(inpt, size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        # Masks (and Depth/Normals) always use nearest: interpolating class ids,
        # invalid-depth zeros or unit normals would invent values.
        out = F.resize(inpt, size, interpolation=v2.InterpolationMode.NEAREST)
        if isinstance(inpt, Depth):
            out = tv_tensors.wrap(out / params["factor"], like=inpt)
        return out


class RandomCropPad(v2.Transform):
    """Random crop to ``size``; a sample smaller than ``size`` is first padded bottom/right.

    Padding values: image 0, class and edge labels 255 (ignore), depth 0 and
    normals 0 (both mean invalid).
    """

    _transformed_types = _SAMPLE_TYPES

    def __init__(self, size: Sequence[int]) -> None:
        super().__init__()
        self.size = _check_size(size, "data.crop")

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _hw(flat_inputs)
        ch, cw = self.size
        ph, pw = max(0, ch - h), max(0, cw - w)
        top = int(torch.randint(0, h + ph - ch + 1, ()))
        left = int(torch.randint(0, w + pw - cw + 1, ()))
        return {"pad": [0, 0, pw, ph], "top": top, "left": left}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if any(params["pad"]):
            inpt = F.pad(inpt, params["pad"], fill=_fill(inpt))
        return F.crop(inpt, params["top"], params["left"], *self.size)


class RandomHorizontalFlip(v2.Transform):
    """Mirror left-right with probability ``p``; normals' x component changes sign."""

    _transformed_types = _SAMPLE_TYPES

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = float(p)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"flip": bool(torch.rand(()) < self.p)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not params["flip"]:
            return inpt
        out = F.horizontal_flip(inpt)
        if isinstance(inpt, Normals):
            sign = torch.tensor([-1.0, 1.0, 1.0], dtype=out.dtype).view(3, 1, 1)
            out = tv_tensors.wrap(out.as_subclass(torch.Tensor) * sign, like=inpt)
        return out


class PhotometricJitter(v2.Transform):
    """Colour jitter of the image only (labels pass through), applied with probability ``p``.

    Ranges follow the PhotoMetricDistortion used by the multi-task papers:
    brightness +-32/255-ish, contrast and saturation 0.5-1.5, hue +-18 degrees.
    """

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = float(p)
        self.jitter = v2.ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        # One draw per sample, so the decision and the colour change are the same
        # for every image tensor in it.
        if float(torch.rand(())) >= self.p:
            return {"apply": False}
        return {"apply": True, **self.jitter.make_params(flat_inputs)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not params["apply"]:
            return inpt
        return self.jitter.transform(inpt, params)


class _PadBottomRight(v2.Transform):
    """Pads by ``params["pad"]`` (left, top, right, bottom) with each type's ignore value."""

    _transformed_types = _SAMPLE_TYPES

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not any(params["pad"]):
            return inpt
        return F.pad(inpt, params["pad"], fill=_fill(inpt))


class PadToMultiple(_PadBottomRight):
    """Pad bottom/right so height and width are multiples of ``multiple`` (no resize).

    The ViT teachers need sizes divisible by their patch grid (NYUD 425x560 ->
    448x576); padded pixels are ignored by every loss and metric.
    """

    def __init__(self, multiple: int = 32) -> None:
        super().__init__()
        if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
            raise ConfigError(f"data.pad_to: expected an integer >= 1, got {multiple!r}")
        self.multiple = multiple

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _hw(flat_inputs)
        m = self.multiple
        return {"pad": [0, 0, (-w) % m, (-h) % m]}


class PadToSize(_PadBottomRight):
    """Pad bottom/right to exactly ``size`` (no resize), for models with a fixed input grid.

    MLoRE's learned spatial pooling fixes the feature-map size, so PASCAL-Context
    images (at most 500x500) are padded to 512x512 for evaluation.
    """

    def __init__(self, size: Sequence[int]) -> None:
        super().__init__()
        self.size = _check_size(size, "data.eval_size")

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _hw(flat_inputs)
        th, tw = self.size
        if h > th or w > tw:
            raise DataError(f"an image of {h}x{w} is larger than data.eval_size {th}x{tw}; raise data.eval_size")
        return {"pad": [0, 0, tw - w, th - h]}


def _check_size(size: Sequence[int], field: str) -> tuple[int, int]:
    try:
        h, w = size
    except (TypeError, ValueError):
        raise ConfigError(f"{field}: expected (height, width), got {size!r}") from None
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ConfigError(f"{field}: expected two positive integers, got {size!r}")
    return int(h), int(w)


def train_transform(
    crop: Sequence[int],
    scale: tuple[float, float] | None = (0.5, 2.0),
    flip: bool = True,
    jitter: bool = True,
) -> v2.Compose:
    """Training augmentation: random scale, random crop (padding if needed), flip, jitter.

    ``scale=None`` or ``(1, 1)`` disables scaling. Normalisation happens in
    :func:`finalize_sample`.
    """
    steps: list[v2.Transform] = []
    if scale is not None and tuple(float(s) for s in scale) != (1.0, 1.0):
        steps.append(RandomScale(scale))
    steps.append(RandomCropPad(crop))
    if flip:
        steps.append(RandomHorizontalFlip())
    if jitter:
        steps.append(PhotometricJitter())
    return v2.Compose(steps)


def eval_transform(pad_to: int = 32, size: Sequence[int] | None = None) -> v2.Compose:
    """Evaluation: pad bottom/right with the ignore values, to exactly ``size`` when given,
    else to a multiple of ``pad_to``; no resize."""
    return v2.Compose([PadToSize(size) if size is not None else PadToMultiple(pad_to)])


# --------------------------------------------------------------------------- sample conversion


def to_tv_sample(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Numpy arrays (image ``HWC uint8``; labels decoded, ``HW`` or ``HWC``) to the tv_tensor sample.

    Keys other than ``image`` are task names; see the module docstring for layouts.
    """
    out: dict[str, torch.Tensor] = {}
    for key, arr in arrays.items():
        # PIL-backed arrays are read-only; torch warns on those, so copy when needed.
        t = torch.from_numpy(np.require(arr, requirements=["C", "W"]))
        if key == "image":
            out[key] = tv_tensors.Image(t.permute(2, 0, 1).contiguous())
        elif key in _CLASS_TASKS:
            out[key] = tv_tensors.Mask(t.to(torch.int64))
        elif key == "depth":
            out[key] = Depth(t.to(torch.float32).unsqueeze(0))
        elif key == "normals":
            out[key] = Normals(t.to(torch.float32).permute(2, 0, 1).contiguous())
        elif key == "edge":
            out[key] = tv_tensors.Mask(t.to(torch.float32).unsqueeze(0))
        else:
            raise KeyError(f"no tensor layout for sample key {key!r}")
    return out


_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def finalize_sample(sample: Mapping[str, Any]) -> dict[str, Any]:
    """Normalise the image to ``float32`` with ImageNet mean/std and unwrap tv_tensors.

    Labels come back as plain tensors with the dtypes of :mod:`edgemt.tasks`
    (class maps int64, dense maps float32), so ``default_collate`` stacks them.
    """
    out: dict[str, Any] = {}
    for key, value in sample.items():
        if not isinstance(value, torch.Tensor):
            out[key] = value
            continue
        t = value.as_subclass(torch.Tensor)
        if key == "image":
            t = (t.to(torch.float32) / 255.0 - _MEAN) / _STD
        elif key in _CLASS_TASKS:
            t = t.to(torch.int64)
        elif key in _DENSE_CHANNELS:
            t = t.to(torch.float32)
        out[key] = t.contiguous()
    return out
