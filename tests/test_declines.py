"""A stack whose slices are all the same image holds no focus information: both methods decline
(NaN depth, confidence 0) and say why, instead of the network's confident guess."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from capture.stack import FocalStack
from reconstruct.api import reconstruct_stack


def _textured(h: int = 48, w: int = 64) -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("method", ["classical", "dualfocus"])
@pytest.mark.parametrize("kind", ["constant", "textured"])
def test_identical_slices_give_no_depth_and_say_why(method: str, kind: str, caplog) -> None:
    image = np.full((48, 64, 3), 128, np.uint8) if kind == "constant" else _textured()
    stack = FocalStack(np.stack([image] * 6), focus_distance_m=[2.0, 1.5, 1.0, 0.8, 0.6, 0.5])
    with caplog.at_level(logging.WARNING, logger="reconstruct.api"):
        res = reconstruct_stack(stack, method=method, precision="fp32" if method == "dualfocus" else "auto")
    assert np.isnan(res.depth).all()
    assert (res.confidence == 0).all()
    assert res.all_in_focus.shape == image.shape
    assert any("all 6 slices are the same image" in r.getMessage() for r in caplog.records)


def test_one_changed_pixel_is_enough_to_answer(caplog) -> None:
    # the check is for identical slices only: any real exposure differs by its noise
    image = _textured()
    slices = np.stack([image] * 6)
    slices[3, 10, 10, 0] ^= 1
    stack = FocalStack(slices, focus_distance_m=[2.0, 1.5, 1.0, 0.8, 0.6, 0.5])
    with caplog.at_level(logging.WARNING, logger="reconstruct.api"):
        res = reconstruct_stack(stack, method="dualfocus", precision="fp32")
    assert np.isfinite(res.depth).all()
    assert not any("same image" in r.getMessage() for r in caplog.records)
