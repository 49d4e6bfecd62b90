"""Strict file readers for dataset files.

Every reader either returns a well-formed numpy array or raises
:class:`~edgemt.errors.DataError` whose message names the file and what was
expected, so a bad file in a 10 000-image dataset is reported by name instead
of surfacing later as a shape error inside a model.

Truncated images are errors: PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is
left at its default (False) and every image is decoded with ``.load()`` inside
the ``try`` (``Image.open`` alone only parses the header).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from edgemt.errors import DataError

__all__ = ["read_image", "read_label_png", "read_depth_npy", "read_split", "read_mat"]


def _open_pil(path: Path, what: str) -> Image.Image:
    """Open and fully decode an image file, turning every failure into a DataError."""
    if not path.is_file():
        raise DataError(f"{path}: {what} file does not exist")
    try:
        img = Image.open(path)
        # ``open`` only reads the header; ``load`` decodes the pixels and is where
        # truncated or corrupt data raises (OSError / SyntaxError / ValueError).
        img.load()
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: {what} is too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot decode {what} (truncated or corrupt file?): {e}") from None
    return img


def read_image(path: str | Path) -> np.ndarray:
    """Read an RGB image as ``uint8`` ``(H, W, 3)``.

    Grayscale, palette and RGBA images are converted to RGB; 16-bit images are
    rejected because silently rescaling them would hide a wrong file.

    Raises:
        DataError: the file is missing, truncated, corrupt or not an 8-bit image.
    """
    path = Path(path)
    img = _open_pil(path, "image")
    if img.mode not in ("RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1"):
        raise DataError(f"{path}: expected an 8-bit RGB or grayscale image, got PIL mode {img.mode!r}")
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{path}: expected an (H, W, 3) image, got shape {arr.shape}")
    return arr


def read_label_png(path: str | Path, max_value: int | None = None) -> np.ndarray:
    """Read a single-channel label PNG (grayscale, palette indices or 16-bit) as a 2-D array.

    Palette PNGs (PASCAL's class maps) yield their palette indices, not colours.
    An RGB file whose three channels are equal is accepted as grayscale (some
    tools save binary maps that way); a real colour image is an error.

    Args:
        path: the PNG file.
        max_value: if given, any value above it is an error (e.g. 255 for 8-bit maps).

    Raises:
        DataError: unreadable file, colour image, or a value above ``max_value``.
    """
    path = Path(path)
    img = _open_pil(path, "label image")
    arr = np.asarray(img)
    if arr.ndim == 3:
        colour = arr[..., :3]
        if colour.shape[2] == 1 or np.array_equal(colour, np.repeat(colour[..., :1], colour.shape[2], axis=2)):
            arr = colour[..., 0]
        else:
            raise DataError(
                f"{path}: expected a single-channel label image (grayscale or palette), got a {img.mode} colour image"
            )
    if arr.ndim != 2 or arr.size == 0:
        raise DataError(f"{path}: expected a 2-D label image, got shape {arr.shape}")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{path}: expected integer label values, got dtype {arr.dtype}")
    if max_value is not None:
        top = int(arr.max())
        if top > max_value:
            raise DataError(f"{path}: label value {top} exceeds the maximum {max_value}")
    return arr


def read_depth_npy(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """Read a depth map in metres (``.npy``, 2-D float) as ``float32 (H, W)``.

    0 marks invalid pixels. The file is loaded with ``allow_pickle=False`` so a
    crafted ``.npy`` cannot execute code.

    Raises:
        DataError: missing/unreadable file, non-float dtype, not 2-D, a shape other
            than ``shape``, NaN/inf or negative values.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: depth file does not exist")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read depth map (expected a .npy float array): {e}") from None
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{path}: expected a single .npy array, got {type(arr).__name__}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{path}: expected a float depth map in metres, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a 2-D (H, W) depth map, got {arr.ndim}-D shape {arr.shape}")
    if tuple(arr.shape) != tuple(shape):
        raise DataError(f"{path}: depth map has shape {arr.shape}, expected {tuple(shape)} (the image size)")
    if not np.isfinite(arr).all():
        n = int((~np.isfinite(arr)).sum())
        raise DataError(f"{path}: depth map has {n} NaN/inf values; mark invalid pixels with 0 instead")
    if (arr < 0).any():
        raise DataError(f"{path}: depth map has negative values (min {float(arr.min())}); expected metres >= 0")
    return arr.astype(np.float32, copy=False)


def read_split(path: str | Path) -> list[str]:
    """Read a split file: one image id per line (blank lines ignored).

    Raises:
        DataError: missing or empty file, or a duplicated id.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split file does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read split file: {e}") from None
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise DataError(f"{path}: split file is empty; expected one image id per line")
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise DataError(f"{path}: image id {i!r} is listed twice")
        seen.add(i)
    return ids


def read_mat(path: str | Path, key: str) -> np.ndarray:
    """Read variable ``key`` from a MATLAB ``.mat`` file (v5/v7; scipy layout, structs as records).

    Raises:
        DataError: missing or unreadable file, or no variable named ``key``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: .mat file does not exist")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:
        # A corrupt .mat surfaces as MatReadError, zlib.error, ValueError, TypeError
        # or NotImplementedError (MATLAB v7.3 / HDF5 files), depending on where the
        # bytes go wrong; all of them mean the same thing to the user.
        raise DataError(f"{path}: cannot read .mat file: {e}") from None
    if key not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{path}: .mat file has no variable {key!r}; found {found}")
    return mat[key]
