"""GenICam pixel formats -> numpy images in our convention (a leaf module).

Our frames are ``[H, W]`` grey or ``[H, W, 3]`` RGB, uint8 or uint16 with the samples
LSB-aligned (``significant_bits`` says how many bits mean something). Bayer mosaics are
demosaiced with OpenCV. OpenCV names a Bayer pattern by the second row's second and third
pixels, GenICam by the first row's first two, so GenICam ``BayerRG`` (R at (0, 0)) is OpenCV's
``BayerBG``; the table below holds that mapping and a test checks it on a synthetic mosaic.
"""

from __future__ import annotations

import re

import cv2
import numpy as np

from capture.errors import DeviceError

__all__ = ["SUPPORTED_FORMATS", "significant_bits_of", "to_image"]

#: GenICam Bayer pattern -> OpenCV conversion code to RGB
_BAYER_TO_RGB = {
    "BayerRG": cv2.COLOR_BayerBG2RGB,
    "BayerGR": cv2.COLOR_BayerGB2RGB,
    "BayerGB": cv2.COLOR_BayerGR2RGB,
    "BayerBG": cv2.COLOR_BayerRG2RGB,
}

SUPPORTED_FORMATS = (
    "Mono8", "Mono10", "Mono12", "Mono14", "Mono16", "Mono10p", "Mono12p", "Mono10Packed", "Mono12Packed",
    "RGB8", "BGR8", "RGBa8", "BGRa8",
    *(f"{p}{b}" for p in _BAYER_TO_RGB for b in ("8", "10", "12", "16")),
)

_BITS = re.compile(r"(\d+)(?:p|Packed)?$")


def significant_bits_of(pixel_format: str) -> int:
    """Bits per sample that carry data: ``Mono12`` -> 12, ``RGB8`` -> 8, ``RGBa8`` -> 8.

    >>> significant_bits_of("Mono12p"), significant_bits_of("BayerRG8")
    (12, 8)
    """
    m = _BITS.search(pixel_format)
    if m is None:
        raise DeviceError(f"pixel format {pixel_format!r}: cannot tell its bit depth; supported: {', '.join(SUPPORTED_FORMATS)}")
    return int(m.group(1))


def to_image(data: np.ndarray, *, width: int, height: int, pixel_format: str, components_per_pixel: float = 1.0) -> tuple[np.ndarray, int]:
    """Turn a buffer component into an owned image in our convention.

    Args:
        data: the component's flat sample array (harvesters has already unpacked packed formats).
        pixel_format: the component's GenICam format name (``component.data_format``).
        components_per_pixel: samples per pixel (harvesters gives a float).

    Returns:
        ``(image, significant_bits)``: ``[H, W]`` or ``[H, W, 3]`` RGB, uint8 or uint16,
        C-contiguous and never sharing memory with ``data``: harvesters builds component data
        on the GenTL buffer itself (``numpy.frombuffer``), and the producer overwrites that
        once the buffer is requeued (HARDWARE_NOTES §3.1).
    """
    if pixel_format not in SUPPORTED_FORMATS:
        raise DeviceError(f"pixel format {pixel_format!r} is not supported; supported: {', '.join(SUPPORTED_FORMATS)}")
    bits = significant_bits_of(pixel_format)
    dtype = np.uint8 if bits <= 8 else np.uint16
    channels = int(round(components_per_pixel))
    expected = width * height * max(channels, 1)
    source = np.asarray(data)
    if source.size != expected:
        raise DeviceError(f"pixel format {pixel_format}: buffer has {source.size} samples, expected {width}x{height}x{channels} = {expected}")
    flat = source.astype(dtype, copy=False)
    if pixel_format.startswith("Mono"):
        image = flat.reshape(height, width)
    elif pixel_format.startswith("Bayer"):
        image = cv2.cvtColor(flat.reshape(height, width), _BAYER_TO_RGB[pixel_format[:7]])
    else:
        image = flat.reshape(height, width, channels)
        image = image[..., 2::-1] if pixel_format.startswith("BGR") else image[..., :3]
    return _owned(image, source), bits


def _owned(image: np.ndarray, source: np.ndarray) -> np.ndarray:
    """``image`` as a C-contiguous array of its own: copied when it may alias ``source`` (a
    reshape, slice or no-op ``astype``/``ascontiguousarray`` of the camera buffer is a view)
    or is not contiguous; returned as is when it is already a fresh array (e.g. from OpenCV)."""
    if np.may_share_memory(image, source) or not image.flags.c_contiguous:
        return np.array(image, order="C", copy=True)
    return image
