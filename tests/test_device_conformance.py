"""Conformance tests per device role: every driver of a role must pass them.

Each driver contributes a *factory fixture* that returns a callable building a new, unopened
device (and skips cleanly where its hardware is absent). To cover a new driver, write its
factory fixture and append the fixture's name to ``ACTUATOR_FACTORIES`` or
``CAMERA_FACTORIES``; every test below then runs on it too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from capture.devices import Camera, FocusActuator, Frame
from capture.errors import DeviceError, DeviceTimeout, InputError
from capture.optics import ThinLens
from capture.scenes import procedural_scene
from capture.simulated import SimulatedCamera, SimulatedLiquidLens

# --------------------------------------------------------------------------------------------
# Driver factories (append hardware drivers here)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def _small_scene():
    return procedural_scene(96, 72, seed=0)


@pytest.fixture
def _created() -> Iterator[list]:
    """Devices the factories built; all are closed after the test, whatever happened."""
    devices: list = []
    yield devices
    for device in devices:
        device.close()


@pytest.fixture
def simulated_lens_factory(_created) -> Callable[[], FocusActuator]:
    def make() -> FocusActuator:
        device = SimulatedLiquidLens(time_constant_s=0.005, name="conformance simulated lens")
        _created.append(device)
        return device

    return make


@pytest.fixture
def simulated_camera_factory(_created, _small_scene) -> Callable[[], Camera]:
    def make() -> Camera:
        device = SimulatedCamera(
            scene=_small_scene, lens=ThinLens(focal_length_mm=12.0, f_number=2.0, pixel_pitch_um=7.0),
            focus_dpt_at=lambda t: 1.0, fps=200.0, exposure_s=0.002, pixel_format="Mono8",
            name="conformance simulated camera",
        )
        _created.append(device)
        return device

    return make


@pytest.fixture
def genicam_viky_camera_factory(_created) -> Callable[[], Camera]:
    """The real harvesters path against the real viky.cti GenTL producer."""
    from capture.gentl import viky_path

    if not viky_path().is_file():
        pytest.skip(f"viky.cti not found at {viky_path()}")
    from capture.genicam_camera import GenicamCamera

    def make() -> Camera:
        device = GenicamCamera(producer="viky", serial_number="0", pixel_format="Mono8", frame_rate_hz=100, fetch_timeout_s=1.0)
        _created.append(device)
        return device

    return make


@pytest.fixture
def genicam_focus_factory(_created) -> Callable[[], FocusActuator]:
    """In-camera focus (SFNC FocalPower) on a node-map stand-in: viky has no OpticControl."""
    from capture.genicam_focus import GenicamFocus
    from tests.genicam_doubles import FakeLens

    def make() -> FocusActuator:
        lens = FakeLens("FocalPower", busy_s=0.01)
        device = GenicamFocus(lambda: lens.node_map, name="conformance in-camera focus")
        _created.append(device)
        return device

    return make


@pytest.fixture
def optotune_emulated_factory(_created) -> Callable[[], FocusActuator]:
    """The Optotune LD4 driver over a real pseudo-terminal against the protocol emulator."""
    import sys

    if sys.platform.startswith("win"):
        pytest.skip("the emulators need a pseudo-terminal")
    from capture.optotune import OptotuneLensDriver

    def make() -> FocusActuator:
        device = OptotuneLensDriver("emulator", timeout_s=0.3, settle_time_s=0.01, name="conformance optotune")
        _created.append(device)
        return device

    return make


def _gcode_factory(created: list, flavor: str) -> Callable[[], FocusActuator]:
    import sys

    if sys.platform.startswith("win"):
        pytest.skip("the emulators need a pseudo-terminal")
    from capture.gcode import GcodeFocusStage

    def make() -> FocusActuator:
        # short travel and a fast feed keep the full-range move of the tests near 0.5 s
        device = GcodeFocusStage("emulator", flavor=flavor, feed_mm_min=1200, limits_mm=(-10.0, 0.0) if flavor == "grbl" else (0.0, 10.0), timeout_s=1.0)
        created.append(device)
        return device

    return make


@pytest.fixture
def grbl_emulated_factory(_created) -> Callable[[], FocusActuator]:
    """The G-code stage driver against the GRBL emulator over a pseudo-terminal."""
    return _gcode_factory(_created, "grbl")


@pytest.fixture
def marlin_emulated_factory(_created) -> Callable[[], FocusActuator]:
    """The G-code stage driver against the Marlin emulator over a pseudo-terminal."""
    return _gcode_factory(_created, "marlin")


#: fixture names of FocusActuator factories
ACTUATOR_FACTORIES = [
    "simulated_lens_factory", "genicam_focus_factory", "optotune_emulated_factory",
    "grbl_emulated_factory", "marlin_emulated_factory",
]
#: fixture names of Camera factories
CAMERA_FACTORIES = ["simulated_camera_factory", "genicam_viky_camera_factory"]


@pytest.fixture(params=ACTUATOR_FACTORIES)
def make_actuator(request) -> Callable[[], FocusActuator]:
    return request.getfixturevalue(request.param)


@pytest.fixture(params=CAMERA_FACTORIES)
def make_camera(request) -> Callable[[], Camera]:
    return request.getfixturevalue(request.param)


# --------------------------------------------------------------------------------------------
# Life cycle, shared by every role
# --------------------------------------------------------------------------------------------


@pytest.fixture(params=ACTUATOR_FACTORIES + CAMERA_FACTORIES)
def make_device(request) -> Callable[[], FocusActuator | Camera]:
    return request.getfixturevalue(request.param)


def test_open_and_close_are_idempotent(make_device) -> None:
    device = make_device()
    assert not device.is_open
    device.close()  # closing a never-opened device is harmless
    device.open()
    device.open()
    assert device.is_open
    device.close()
    device.close()
    assert not device.is_open
    device.open()  # and it can be opened again
    assert device.is_open
    device.close()


def test_context_manager_opens_and_closes(make_device) -> None:
    device = make_device()
    with device as d:
        assert d is device
        assert device.is_open
    assert not device.is_open
    with pytest.raises(RuntimeError, match="boom"):
        with device:
            raise RuntimeError("boom")
    assert not device.is_open


def test_device_has_a_name(make_device) -> None:
    device = make_device()
    assert isinstance(device.name, str) and device.name


# --------------------------------------------------------------------------------------------
# FocusActuator
# --------------------------------------------------------------------------------------------


def _mid(actuator: FocusActuator, frac: float = 0.5) -> float:
    lo, hi = actuator.limits
    return lo + frac * (hi - lo)


def test_actuator_declares_unit_and_limits(make_actuator) -> None:
    with make_actuator() as a:  # hardware reads its limits (and in-camera focus its unit) at open
        assert isinstance(a.unit, str) and a.unit
        lo, hi = a.limits
        assert math.isfinite(lo) and math.isfinite(hi) and lo < hi


@pytest.mark.parametrize("operation", ["move_to", "wait_settled", "position"])
def test_actuator_operations_when_closed_raise_device_error(make_actuator, operation: str) -> None:
    a = make_actuator()
    calls = {
        "move_to": lambda: a.move_to(_mid(a)),
        "wait_settled": lambda: a.wait_settled(timeout_s=0.1),
        "position": lambda: a.position(),
    }
    with pytest.raises(DeviceError, match=a.name):
        calls[operation]()  # never opened
    a.open()
    a.close()
    with pytest.raises(DeviceError, match=a.name):
        calls[operation]()  # closed again


def test_move_to_validates_the_limits(make_actuator) -> None:
    with make_actuator() as a:
        lo, hi = a.limits
        span = hi - lo
        for bad in (lo - 0.01 * span, hi + 0.01 * span, math.nan, math.inf, -math.inf):
            with pytest.raises(InputError, match=a.name):
                a.move_to(bad)
        for good in (lo, hi, _mid(a, 0.3)):
            a.move_to(good)
            assert a.target == pytest.approx(good)


def test_move_settles_at_the_target(make_actuator) -> None:
    with make_actuator() as a:
        target = _mid(a, 0.7)
        a.move_to(target)
        t_before = time.monotonic()
        t_settled = a.wait_settled(timeout_s=5.0)
        assert t_before <= t_settled <= time.monotonic()
        lo, hi = a.limits
        assert a.position() == pytest.approx(target, abs=1e-3 * (hi - lo))


def test_wait_settled_is_finite(make_actuator) -> None:
    with make_actuator() as a:
        for bad in (0.0, -1.0, math.nan, math.inf):
            with pytest.raises(InputError, match="timeout_s"):
                a.wait_settled(timeout_s=bad)
        a.move_to(a.limits[1])
        a.move_to(a.limits[0])  # a full-range step: the slowest move there is
        t0 = time.monotonic()
        try:
            a.wait_settled(timeout_s=0.001)
        except DeviceTimeout:
            pass
        assert time.monotonic() - t0 < 0.5


# --------------------------------------------------------------------------------------------
# Camera
# --------------------------------------------------------------------------------------------


def _check_frame(camera: Camera, frame: Frame) -> None:
    assert isinstance(frame, Frame)
    image = frame.image
    assert image.shape[:2] == camera.image_hw
    assert image.ndim in (2, 3) and (image.ndim == 2 or image.shape[2] == 3)
    assert image.dtype in (np.uint8, np.uint16)
    assert image.flags.owndata and image.base is None  # copied out of the device buffer
    assert frame.timestamp_source in ("camera", "host")
    assert frame.timestamp_source == camera.timestamp_source
    if camera.exposure_s is None:  # a camera without an exposure feature
        assert frame.exposure_s is None
    else:
        assert frame.exposure_s == pytest.approx(camera.exposure_s)
    assert 1 <= frame.significant_bits <= 8 * image.itemsize
    assert int(image.max()) <= 2**frame.significant_bits - 1


def test_camera_grab_when_closed_raises_device_error(make_camera) -> None:
    cam = make_camera()
    with pytest.raises(DeviceError, match=cam.name):
        cam.grab()
    cam.open()
    cam.close()
    with pytest.raises(DeviceError, match=cam.name):
        cam.grab()


def test_grab_returns_an_owned_frame_of_image_hw(make_camera) -> None:
    with make_camera() as cam:
        h, w = cam.image_hw
        assert h > 0 and w > 0
        a = cam.grab()
        b = cam.grab()
    _check_frame(cam, a)
    _check_frame(cam, b)
    assert not np.shares_memory(a.image, b.image)
    kept = b.image.copy()
    a.image[...] = 0  # the caller may scribble on its frame
    np.testing.assert_array_equal(b.image, kept)


def test_timestamps_are_monotonic(make_camera) -> None:
    with make_camera() as cam:
        frames = [cam.grab() for _ in range(5)]
    stamps = [f.timestamp_s for f in frames]
    ids = [f.frame_id for f in frames]
    assert all(t1 > t0 for t0, t1 in zip(stamps, stamps[1:]))
    assert all(i1 > i0 for i0, i1 in zip(ids, ids[1:]))


def test_grab_after_a_time_waits_for_a_later_frame(make_camera) -> None:
    with make_camera() as cam:
        first = cam.grab()
        t = time.monotonic() + 0.05
        later = cam.grab(start_after_host_s=t)
        assert time.monotonic() >= t  # it cannot have exposed before t
        assert later.timestamp_s - first.timestamp_s >= 0.05 - 1e-6


def test_grab_timeout_is_finite(make_camera) -> None:
    with make_camera() as cam:
        t0 = time.monotonic()
        with pytest.raises(DeviceTimeout, match=cam.name):
            cam.grab(start_after_host_s=time.monotonic() + 30.0, timeout_s=0.1)
        assert time.monotonic() - t0 < 1.0
        for bad in (0.0, -1.0, math.nan, math.inf):
            with pytest.raises(InputError, match="timeout_s"):
                cam.grab(timeout_s=bad)


# --------------------------------------------------------------------------------------------
# The role base itself (not per driver): it copies a frame a driver hands out as a view
# --------------------------------------------------------------------------------------------


class _ViewCamera(Camera):
    """A driver that (wrongly) returns a view into its one reused buffer."""

    def __init__(self) -> None:
        super().__init__(name="view camera")
        self.buffer = np.zeros((4, 6), np.uint8)
        self.k = 0

    @property
    def image_hw(self) -> tuple[int, int]:
        return (4, 6)

    @property
    def exposure_s(self) -> float:
        return 0.001

    def _do_open(self) -> None:
        pass

    def _do_close(self) -> None:
        pass

    def _do_grab(self, *, start_after_host_s: float, deadline_host_s: float) -> Frame:
        self.k += 1
        self.buffer[...] = self.k
        return Frame(image=self.buffer[:, :], frame_id=self.k, timestamp_s=float(self.k), timestamp_source="host",
                     exposure_s=0.001, gain_db=0.0, significant_bits=8)


def test_camera_base_copies_frames_out_of_the_driver_buffer() -> None:
    with _ViewCamera() as cam:
        a = cam.grab()
        b = cam.grab()
        assert a.image.flags.owndata and not np.shares_memory(a.image, cam.buffer)
        assert int(a.image[0, 0]) == 1 and int(b.image[0, 0]) == 2


class _SettledActuator(FocusActuator):
    """A minimal driver that is always settled (so a wrong timeout cannot hang the test)."""

    unit = "mm"

    def __init__(self) -> None:
        super().__init__(name="settled actuator")
        self._target = 0.0

    @property
    def limits(self) -> tuple[float, float]:
        return (0.0, 10.0)

    @property
    def target(self) -> float:
        return self._target

    def _do_open(self) -> None:
        pass

    def _do_close(self) -> None:
        pass

    def _do_move(self, value: float) -> None:
        self._target = value

    def _do_is_settled(self) -> bool:
        return True

    def _do_position(self) -> float:
        return self._target


@pytest.mark.parametrize("timeout_s", [0.0, -1.0, math.nan, math.inf])
def test_base_refuses_a_non_finite_or_non_positive_timeout(timeout_s: float) -> None:
    """'Finite timeouts everywhere': a nan deadline would never pass and inf never ends."""
    with _SettledActuator() as a:
        with pytest.raises(InputError, match="timeout_s"):
            a.wait_settled(timeout_s=timeout_s)
    with _ViewCamera() as cam:
        with pytest.raises(InputError, match="timeout_s"):
            cam.grab(timeout_s=timeout_s)
