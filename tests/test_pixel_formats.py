"""capture.pixel_formats.to_image returns frames that own their memory: harvesters builds
component data on the GenTL buffer itself (numpy.frombuffer), and the producer overwrites it
once the buffer is requeued (HARDWARE_NOTES §3.1), so a frame that aliases it changes later."""

from __future__ import annotations

import numpy as np
import pytest

from capture.pixel_formats import SUPPORTED_FORMATS, significant_bits_of, to_image

W, H = 6, 4


def _channels(pixel_format: str) -> int:
    if pixel_format.startswith(("RGBa", "BGRa")):
        return 4
    if pixel_format.startswith(("RGB", "BGR")):
        return 3
    return 1


def _camera_buffer(pixel_format: str) -> np.ndarray:
    """A writable flat sample array on a raw byte buffer, as harvesters hands out
    ``component.data`` (``numpy.frombuffer`` on the GenTL buffer)."""
    dtype = np.uint8 if significant_bits_of(pixel_format) <= 8 else np.uint16
    n = W * H * _channels(pixel_format)
    raw = bytearray(n * np.dtype(dtype).itemsize)
    data = np.frombuffer(raw, dtype=dtype)
    data[:] = (np.arange(n) * 7 + 3) % min(np.iinfo(dtype).max, 2 ** significant_bits_of(pixel_format))
    return data


@pytest.mark.parametrize("pixel_format", ["RGB8", "Mono8", *[f for f in SUPPORTED_FORMATS if f not in ("RGB8", "Mono8")]])
def test_decoded_frame_survives_the_buffer_being_requeued(pixel_format: str) -> None:
    data = _camera_buffer(pixel_format)
    image, _ = to_image(data, width=W, height=H, pixel_format=pixel_format, components_per_pixel=float(_channels(pixel_format)))
    assert not np.shares_memory(image, data), f"{pixel_format}: the frame is a view of the camera buffer"
    assert image.flags.c_contiguous and image.flags.writeable
    before = image.copy()
    data[:] = 0  # the producer refills the buffer after buf.queue()
    np.testing.assert_array_equal(image, before, err_msg=f"{pixel_format}: the frame changed when the buffer was overwritten")


@pytest.mark.parametrize(("pixel_format", "channels"), [("RGB8", 3), ("BGR8", 3), ("RGBa8", 4), ("Mono8", 1), ("Mono12", 1)])
def test_a_plain_array_input_is_not_aliased_either(pixel_format: str, channels: int) -> None:
    dtype = np.uint8 if pixel_format.endswith("8") else np.uint16
    data = np.arange(W * H * channels, dtype=dtype)
    image, _ = to_image(data, width=W, height=H, pixel_format=pixel_format, components_per_pixel=float(channels))
    assert not np.shares_memory(image, data)
