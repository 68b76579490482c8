"""Read and write 8/16-bit grey or colour PNG, TIFF and JPEG files, RGB order in memory.

A leaf module (numpy, OpenCV, the standard library and ``capture.errors`` only). OpenCV
works in BGR and returns ``None`` instead of raising; these helpers convert to RGB(A) and turn
every failure into :class:`~capture.errors.InputError` / :class:`~capture.errors.OutputError`
naming the file. Paths go through ``np.fromfile`` / ``cv2.imdecode`` (and ``cv2.imencode`` /
Python file I/O) so non-ASCII paths work on every platform.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np

from capture.errors import InputError, OutputError

__all__ = ["IMAGE_SUFFIXES", "JPEG_SUFFIXES", "read_image", "write_image"]

logger = logging.getLogger(__name__)

#: File suffixes (lower case) the project reads as images.
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
JPEG_SUFFIXES = (".jpg", ".jpeg")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_GREY_ALPHA = 4  # IHDR colour type of a grey + alpha PNG


def _png_colour_type(buf: np.ndarray) -> int | None:
    """The IHDR colour type of PNG bytes (0 grey, 2 RGB, 3 palette, 4 grey + alpha, 6 RGBA),
    None for anything else."""
    head = buf[:26].tobytes()
    if len(head) < 26 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    return head[25]


def decode_image_file(path: Path) -> np.ndarray:
    """Decode one image file: ``[H, W]`` or ``[H, W, C]`` RGB(A), uint8/uint16.

    Raises ``ValueError`` with the reason only (callers name the file, and the key).
    """
    try:
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise ValueError(f"cannot read ({err.strerror or err})") from err
    if buf.size == 0:
        raise ValueError("empty file, not an image")
    flags = cv2.IMREAD_ANYCOLOR if path.suffix.lower() in JPEG_SUFFIXES else cv2.IMREAD_UNCHANGED
    try:
        image = cv2.imdecode(buf, flags)
    except cv2.error as err:
        raise ValueError(f"cannot decode image ({' '.join(str(err).split())})") from err
    if image is None:
        raise ValueError("cannot decode image (not a valid PNG, TIFF or JPEG file)")
    if image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"unsupported sample type {image.dtype} (need 8- or 16-bit)")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 4 and _png_colour_type(buf) == _PNG_GREY_ALPHA:
        # OpenCV expands grey + alpha to BGRA: keep it grey (a focal stack is grey or colour;
        # the alpha of a slice carries nothing a focus measure could use)
        return np.ascontiguousarray(image[:, :, 0])
    if image.ndim == 3:
        if image.shape[2] == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        elif image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
        else:
            raise ValueError(f"unsupported channel count {image.shape[2]} (need 1, 3 or 4)")
    return image


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one image file.

    Returns ``[H, W]`` (grey) or ``[H, W, C]`` (C = 3 RGB or 4 RGBA), uint8 or uint16, as stored
    (PNG/TIFF read unchanged; JPEG read as 8-bit grey or RGB, EXIF orientation applied).

    Raises :class:`InputError` naming the file when it is missing, unreadable, not a
    decodable image, or not 8/16-bit with 1, 3 or 4 channels.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such image file")
    try:
        return decode_image_file(path)
    except ValueError as err:
        raise InputError(f"{path}: {err}") from err


def write_image(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Write ``image`` (``[H, W]`` grey or ``[H, W, C]`` RGB/RGBA, uint8 or uint16) by suffix.

    ``.png`` and ``.tif``/``.tiff`` keep 8 or 16 bits; ``.jpg``/``.jpeg`` takes 8-bit grey or
    RGB only (quality 95). The parent folder must exist. Raises :class:`OutputError` naming
    the file when the image or suffix is unsupported or the file cannot be written.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    image = np.asarray(image)
    if suffix not in IMAGE_SUFFIXES:
        raise OutputError(f"{path}: unsupported image type {suffix or '(none)'!r} (use .png, .tif or .jpg)")
    if image.dtype not in (np.uint8, np.uint16):
        raise OutputError(f"{path}: cannot write {image.dtype} samples (need uint8 or uint16)")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise OutputError(f"{path}: cannot write an image of shape {list(image.shape)} ([H, W] or [H, W, 3|4])")
    params: list[int] = []
    if suffix in JPEG_SUFFIXES:
        if image.dtype != np.uint8 or (image.ndim == 3 and image.shape[2] != 3):
            raise OutputError(f"{path}: JPEG takes 8-bit grey or RGB only, got {image.dtype} {list(image.shape)}")
        params = [cv2.IMWRITE_JPEG_QUALITY, 95]
    if image.ndim == 3:
        code = cv2.COLOR_RGB2BGR if image.shape[2] == 3 else cv2.COLOR_RGBA2BGRA
        image = cv2.cvtColor(np.ascontiguousarray(image), code)
    try:
        ok, encoded = cv2.imencode(suffix, np.ascontiguousarray(image), params)
    except cv2.error as err:
        raise OutputError(f"{path}: cannot encode image ({' '.join(str(err).split())})") from err
    if not ok:
        raise OutputError(f"{path}: OpenCV could not encode the image as {suffix}")
    try:
        with open(path, "wb") as fh:
            fh.write(encoded.tobytes())
    except OSError as err:
        raise OutputError(f"{path}: cannot write ({err.strerror or err})") from err
    logger.debug("wrote %s", path)
