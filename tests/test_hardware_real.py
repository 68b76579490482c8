"""Checks on physical devices, for a lab's bring-up (marked ``hardware``: left out of the
default run). Each test runs only where its environment variable names the device:

- ``DUALFOCUS_OPTOTUNE_PORT=/dev/ttyACM0``: an Optotune Lens Driver 4 with a lens attached
- ``DUALFOCUS_GENTL_PRODUCER=/path/to/vendor.cti`` (+ optional ``DUALFOCUS_CAMERA_SERIAL``): a GenICam camera
- ``DUALFOCUS_GCODE_PORT=/dev/ttyUSB0`` (+ ``DUALFOCUS_GCODE_FLAVOR=grbl|marlin``): a G-code stage;
  it is homed and moved by 1 mm, so clear its travel first

Run: ``.venv/bin/python -m pytest -m hardware -v``
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

pytestmark = pytest.mark.hardware


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.skip(f"set {name} to run this check on a physical device")
    return value


def test_optotune_lens_driver_round_trip() -> None:
    from capture.optotune import OptotuneLensDriver

    with OptotuneLensDriver(_env("DUALFOCUS_OPTOTUNE_PORT")) as lens:
        assert lens.identity["serial_number"]
        lo, hi = lens.limits
        assert lo < 0 < hi
        temperature_c = lens.temperature_c()
        assert temperature_c is not None and 5 < temperature_c < 80
        target = min(hi, 50.0)
        lens.move_to(target)
        lens.wait_settled(timeout_s=1.0)
        assert lens.position() == pytest.approx(target, abs=0.2)
    # closing parks the lens at park_current_ma (0 by default)


def test_genicam_camera_streams() -> None:
    from capture.genicam_camera import GenicamCamera

    serial = os.environ.get("DUALFOCUS_CAMERA_SERIAL") or None
    with GenicamCamera(producer=_env("DUALFOCUS_GENTL_PRODUCER"), serial_number=serial) as cam:
        frames = [cam.grab(timeout_s=5.0) for _ in range(5)]
    assert all(f.image.shape[:2] == cam.image_hw for f in frames)
    ids = [f.frame_id for f in frames]
    assert ids == sorted(ids)
    assert float(np.std(frames[-1].image)) > 0  # not a blank buffer


def test_gcode_stage_homes_and_moves() -> None:
    from capture.gcode import GcodeFocusStage

    flavor = os.environ.get("DUALFOCUS_GCODE_FLAVOR", "grbl")
    with GcodeFocusStage(_env("DUALFOCUS_GCODE_PORT"), flavor=flavor, home_on_start=True) as stage:
        start = stage.position()
        stage.move_to(min(stage.limits[1], start + 1.0))
        t0 = time.monotonic()
        stage.wait_settled(timeout_s=30.0)
        assert time.monotonic() - t0 < 30.0
        assert stage.position() == pytest.approx(min(stage.limits[1], start + 1.0), abs=0.01)
