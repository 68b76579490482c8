"""Tests of capture.periodic: the triangle wave, the lens's first-order response to it, and the
continuous sweep style on the simulated rig (against the stepped sweep) and on the LD4 emulator.

The simulated lens's ``start_triangle``/``stop_signal`` and the simulated camera's
``clock_origin_host_s`` are what the continuous style uses on the simulated rig.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np
import pytest

from calibration.focus_model import LiquidLensFocusModel
from capture import ld4_protocol as ld4
from capture.devices import Camera, Frame
from capture.errors import DeviceError, DeviceTimeout, InputError, RigError
from capture.optics import ThinLens
from capture.periodic import (
    CameraClock,
    FirstOrderTriangleResponse,
    TriangleWave,
    capture_continuous_stack,
    lag_estimate_s,
    start_triangle_sweep,
    triangle_bounds,
)
from capture.scenes import procedural_scene
from capture.simulated import SimulatedCamera, SimulatedLiquidLens, TrueLensModel
from capture.sweep import SweepInterrupted, plan_focus_distances, sweep
from reconstruct import reconstruct_stack
from reconstruct.metrics import depth_metrics

TRUE = TrueLensModel(offset_dpt=-0.5, dpt_per_ma=0.0165, drift_dpt_per_c=-0.003, temperature_c=27.0)
#: the simulator's true optics as a focus map (a perfect calibration), to isolate the sweep's own error
CALIBRATED = LiquidLensFocusModel(offset_dpt=TRUE.power_dpt(0.0), dpt_per_ma=TRUE.dpt_per_ma)
OPTICS = ThinLens(focal_length_mm=12.0, f_number=2.0, pixel_pitch_um=7.0)
RANGE_M = (0.4, 2.0)
SLICES = 10
TAU_S = 0.015
FREQUENCY_HZ = 2.0
#: long enough for a usable signal (2 ms gives ~2x the depth error for both styles: shot noise), below 1/fps
EXPOSURE_S = 0.008

needs_pty = pytest.mark.skipif(sys.platform.startswith("win"), reason="the LD4 emulator needs a pseudo-terminal (Linux/macOS)")


class HostCamera(Camera):
    """A stand-in free-running camera stamping frames on the host clock (no rendering)."""

    timestamp_source = "host"

    def __init__(self, *, fps: float = 200.0, exposure_s: float = 0.002, hw: tuple[int, int] = (24, 32)) -> None:
        super().__init__(name="host-stamped stand-in camera")
        self.fps, self._exposure_s, self._hw = fps, exposure_s, hw
        self._t_open = 0.0

    @property
    def image_hw(self) -> tuple[int, int]:
        return self._hw

    @property
    def exposure_s(self) -> float:
        return self._exposure_s

    def _do_open(self) -> None:
        self._t_open = time.monotonic()

    def _do_close(self) -> None:
        pass

    def _do_grab(self, *, start_after_host_s: float, deadline_host_s: float) -> Frame:
        k = max(0, math.ceil((start_after_host_s - self._t_open) * self.fps - 1e-9))
        t_start = self._t_open + k / self.fps
        if t_start + self._exposure_s > deadline_host_s:
            raise DeviceTimeout(f"{self.name}: no frame before the deadline")
        time.sleep(max(0.0, t_start + self._exposure_s - time.monotonic()))
        image = np.full(self._hw, k % 256, np.uint8)
        return Frame(image=image, frame_id=k, timestamp_s=t_start, timestamp_source="host",
                     exposure_s=self._exposure_s, gain_db=None, significant_bits=8)


def _lens(**kw) -> SimulatedLiquidLens:
    return SimulatedLiquidLens(true_model=TRUE, time_constant_s=TAU_S, settle_tolerance_ma=0.05, **kw)


def _bounds(frequency_hz: float = FREQUENCY_HZ, lag_s: float = TAU_S) -> tuple[float, float]:
    return triangle_bounds(CALIBRATED, RANGE_M, frequency_hz=frequency_hz, guard_s=3 * lag_s, limits=(-290.0, 290.0))


# --------------------------------------------------------------------------------------------
# TriangleWave and the first-order response
# --------------------------------------------------------------------------------------------


def test_triangle_wave_values_phase_and_ramps() -> None:
    w = TriangleWave(10.0, 110.0, 2.0, t0_host_s=100.0)
    assert w.period_s == 0.5 and w.half_period_s == 0.25 and w.span == 100.0 and w.slope_per_s == 400.0
    for dt, value, phase in ((0.0, 10.0, 0.0), (0.125, 60.0, 0.25), (0.25, 110.0, 0.5), (0.375, 60.0, 0.75),
                             (0.5, 10.0, 0.0), (0.0625, 35.0, 0.125), (-0.125, 60.0, 0.75)):
        assert w.value_at(100.0 + dt) == pytest.approx(value)
        assert w.phase(100.0 + dt) == pytest.approx(phase)
    t = 100.0 + np.linspace(0, 1.0, 41)
    values = w.value_at(t)
    assert isinstance(values, np.ndarray) and values.shape == (41,)
    np.testing.assert_allclose(values, [w.value_at(float(x)) for x in t])
    assert values.min() == pytest.approx(10.0) and values.max() == pytest.approx(110.0)
    assert [w.ramp_index(100.0 + dt) for dt in (0.01, 0.26, 0.51, -0.01)] == [0, 1, 2, -1]
    assert w.is_rising(0) and not w.is_rising(1) and w.is_rising(-2) and not w.is_rising(-1)
    assert w.ramp_start_s(3) == pytest.approx(100.75)
    assert w.time_at_value(35.0, 0) == pytest.approx(100.0625)
    assert w.time_at_value(35.0, 1) == pytest.approx(100.4375)  # falling: 110 -> 35 takes 3/4 of the ramp
    for j in (0, 1, 4, 7):
        assert w.value_at(w.time_at_value(72.0, j)) == pytest.approx(72.0)
    for bad in ((5.0, 5.0, 1.0, 0.0), (0.0, 1.0, 0.0, 0.0), (0.0, 1.0, math.nan, 0.0), (0.0, math.inf, 1.0, 0.0)):
        with pytest.raises(InputError):
            TriangleWave(*bad)


def test_first_order_response_matches_the_ode_and_lags_by_tau() -> None:
    tau = 0.015
    w = TriangleWave(20.0, 140.0, 2.0, t0_host_s=5.0)
    resp = FirstOrderTriangleResponse(w, tau, start_value=0.0)
    # integrate tau dy/dt = u - y exactly per small step (u linear within a step)
    dt = 1e-5
    ts = 5.0 + np.arange(0, int(1.6 / dt) + 1) * dt
    u = w.value_at(ts)
    a = math.exp(-dt / tau)
    y = np.empty_like(ts)
    y[0] = 0.0
    for i in range(1, ts.size):
        k = (u[i] - u[i - 1]) / dt
        y[i] = u[i] - k * tau + (y[i - 1] - u[i - 1] + k * tau) * a
    check = np.arange(0, ts.size, 997)
    np.testing.assert_allclose([resp.value_at(float(ts[i])) for i in check], y[check], atol=0.05)
    assert resp.value_at(4.0) == 0.0  # before the start: where it was
    # after the transient, on a ramp more than ~5 tau past a turn, the lens is the command tau earlier
    for t in (6.1, 6.2, 6.35, 6.45, 7.11):
        s = (t - w.t0_host_s) % w.half_period_s
        if s > 5 * tau:
            assert resp.value_at(t) == pytest.approx(w.value_at(t - tau), abs=0.01 * w.slope_per_s * tau)
    # tau = 0 follows the command
    assert FirstOrderTriangleResponse(w, 0.0, 0.0).value_at(5.1) == pytest.approx(w.value_at(5.1))


def test_triangle_bounds_cover_the_range_with_a_guard() -> None:
    a, b = (CALIBRATED.actuator_value(d) for d in RANGE_M)
    lo, hi = min(a, b), max(a, b)
    lower, upper = triangle_bounds(CALIBRATED, RANGE_M, frequency_hz=2.0, guard_s=0.045)
    assert lower < lo and upper > hi and (lo - lower) == pytest.approx(upper - hi)
    w = TriangleWave(lower, upper, 2.0, 0.0)
    assert (lo - lower) / w.slope_per_s == pytest.approx(0.045)  # the guard in time
    assert triangle_bounds(CALIBRATED, RANGE_M, frequency_hz=2.0) == pytest.approx((lo, hi))
    with pytest.raises(InputError, match="guard"):
        triangle_bounds(CALIBRATED, RANGE_M, frequency_hz=20.0, guard_s=0.045)
    with pytest.raises(InputError, match="limits"):
        triangle_bounds(CALIBRATED, RANGE_M, frequency_hz=2.0, limits=(0.0, 50.0))
    clipped = triangle_bounds(CALIBRATED, RANGE_M, frequency_hz=2.0, guard_s=0.045, limits=(lo - 1.0, 290.0))
    assert clipped[0] == pytest.approx(lo - 1.0)
    assert lag_estimate_s(_lens()) == TAU_S


# --------------------------------------------------------------------------------------------
# The simulated rig: continuous against stepped
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scene():
    return procedural_scene(160, 120, near_m=RANGE_M[0], far_m=RANGE_M[1], seed=0)


def _camera(scene, lens, cls=SimulatedCamera) -> SimulatedCamera:
    return cls(scene=scene, lens=OPTICS, focus_dpt_at=lens.true_focus_dpt_at, fps=120.0, exposure_s=EXPOSURE_S, pixel_format="Mono8")


@pytest.fixture(scope="module")
def measured(scene):
    """Stepped and continuous stacks on one simulated rig (160x120, 120 fps, 8 ms, tau 15 ms),
    with wall times and the lens's true focus at each continuous slice's exposure midpoint."""
    lens = _lens()
    cam = _camera(scene, lens)
    out: dict = {}
    with lens, cam:
        planned = plan_focus_distances(range_m=RANGE_M, slices=SLICES)
        t0 = time.monotonic()
        stepped = [sweep(cam, lens, CALIBRATED, planned) for _ in range(2)]
        out["stepped_s"] = (time.monotonic() - t0) / len(stepped)
        wave = start_triangle_sweep(lens, *_bounds(), FREQUENCY_HZ)
        time.sleep(0.1)  # past the start transient (the lens starts at 0 mA)
        t0 = time.monotonic()
        continuous = [
            capture_continuous_stack(cam, lens, CALIBRATED, wave=wave, lag_s=TAU_S, n_slices=SLICES, range_m=RANGE_M, timeout_s=3.0)
            for _ in range(3)
        ]
        out["continuous_s"] = (time.monotonic() - t0) / len(continuous)
        truth = []
        for stack in continuous:
            rows = []
            for m, d in zip(stack.slice_meta, stack.focus_distance_m, strict=True):
                t_mid = cam.clock_origin_host_s + m["timestamp_s"] + 0.5 * m["exposure_s"]
                rows.append((m["actuator_value"], lens.current_at(t_mid), 1.0 / d, lens.true_focus_dpt_at(t_mid)))
            truth.append(np.array(rows))
        lens.stop_signal()
    out.update(stepped=stepped, continuous=continuous, truth=truth, wave=wave)
    return out


def test_continuous_focus_matches_the_true_focus(measured) -> None:
    rows = np.concatenate(measured["truth"])
    err_ma = np.abs(rows[:, 0] - rows[:, 1])
    err_dpt = np.abs(rows[:, 2] - rows[:, 3])
    print(f"\ncontinuous sweep: focus error vs the simulator's truth at the exposure midpoint: "
          f"max {err_dpt.max():.4f} dpt (mean {err_dpt.mean():.4f}), max {err_ma.max():.3f} mA, {rows.shape[0]} slices")
    assert err_ma.max() < 0.6
    assert err_dpt.max() < 0.01


def test_continuous_stack_contents(measured) -> None:
    wave = measured["wave"]
    near_dpt, far_dpt = 1 / RANGE_M[0], 1 / RANGE_M[1]
    directions = []
    for stack in measured["continuous"]:
        assert stack.n_slices == SLICES
        assert stack.images.shape == (SLICES, 120, 160) and stack.images.dtype == np.uint8
        dpt = 1.0 / stack.focus_distance_m
        assert np.all(np.diff(dpt) > 0)  # far to near
        assert far_dpt - 1e-6 <= dpt.min() and dpt.max() <= near_dpt + 1e-6
        step_dpt = wave.slope_per_s * CALIBRATED.dpt_per_ma / 120.0  # focus change between frames
        assert dpt.min() <= far_dpt + step_dpt and dpt.max() >= near_dpt - step_dpt  # the whole range is covered
        sw = stack.meta["sweep"]
        assert sw["style"] == "continuous" and sw["frequency_hz"] == FREQUENCY_HZ and sw["lag_s"] == TAU_S
        assert sw["clock"] == "camera_origin" and sw["unit"] == "mA"
        assert sw["smear_per_frame"] == pytest.approx(wave.slope_per_s * EXPOSURE_S, abs=1e-3)
        directions.append(sw["direction"])
        ids = [m["frame_id"] for m in stack.slice_meta]
        assert len(set(ids)) == SLICES
        for m in stack.slice_meta:
            assert m["actuator_unit"] == "mA" and m["timestamp_source"] == "camera" and m["exposure_s"] == EXPOSURE_S
            assert m["lens_temperature_c"] == 27.0 and 0 <= m["sweep_phase"] < 1
        # timestamps follow the ramp: rising current = rising diopters here
        ts = np.array([m["timestamp_s"] for m in stack.slice_meta])
        assert np.all(np.diff(ts) > 0) if sw["direction"] == "up" else np.all(np.diff(ts) < 0)
    # direction "either" takes the next ramp whichever way it runs (on a loaded machine a ramp
    # can pass while a stack is rendered, so consecutive stacks need not alternate)
    assert set(directions) <= {"up", "down"} and len(directions) == 3


def test_continuous_is_faster_with_depth_within_1_5x_of_stepped(measured, scene) -> None:
    def abs_rel(stack) -> float:
        result = reconstruct_stack(stack, method="classical")
        return depth_metrics(result.depth, scene.depth_m, truth_valid=scene.truth_valid)["abs_rel"]

    stepped_rel = float(np.mean([abs_rel(s) for s in measured["stepped"]]))
    continuous_rel = float(np.mean([abs_rel(s) for s in measured["continuous"]]))
    stepped_rate, continuous_rate = 1.0 / measured["stepped_s"], 1.0 / measured["continuous_s"]
    print(f"\nstack rate ({SLICES} slices, 160x120, 120 fps, {1e3 * EXPOSURE_S:g} ms): stepped {stepped_rate:.2f}/s, continuous {continuous_rate:.2f}/s "
          f"({continuous_rate / stepped_rate:.2f}x); classical AbsRel: stepped {stepped_rel:.4f}, continuous {continuous_rel:.4f} "
          f"(ratio {continuous_rel / stepped_rel:.2f})")
    assert continuous_rate > stepped_rate
    assert continuous_rel <= 1.5 * stepped_rel


def test_arrival_clock_estimate_on_a_camera_without_origin(scene) -> None:
    """Without a known clock origin, the offset comes from frame arrival: never early, and late
    by the delivery delay (here the render time)."""
    lens = _lens()
    cam = _camera(scene, lens, cls=SimulatedCamera)
    with lens, cam:
        wave = start_triangle_sweep(lens, *_bounds(), FREQUENCY_HZ)
        clock = CameraClock()  # what for_camera gives a camera without clock_origin_host_s
        assert clock.estimating and clock.offset_s is None and clock.needs_frame(cam)
        assert CameraClock.for_camera(HostCamera()).source == "arrival"  # (host stamps need no offset)
        stack = capture_continuous_stack(cam, lens, CALIBRATED, wave=wave, lag_s=TAU_S, range_m=RANGE_M, clock=clock, timeout_s=3.0)
        t_open = cam._t_open  # the simulator's private clock origin, for the check only
    assert stack.meta["sweep"]["clock"] == "arrival" and clock.observations >= stack.n_slices
    print(f"\narrival clock: offset late by {1e3 * (clock.offset_s - t_open):.2f} ms")
    assert 0.0 <= clock.offset_s - t_open < 0.05
    assert stack.n_slices >= 2


# --------------------------------------------------------------------------------------------
# Directions and errors (host-stamped stand-in camera: no rendering)
# --------------------------------------------------------------------------------------------


def test_directions_and_all_frames_in_range() -> None:
    lens, cam = _lens(), HostCamera(fps=200.0)
    with lens, cam:
        wave = start_triangle_sweep(lens, *_bounds(), FREQUENCY_HZ)
        for direction in ("up", "down"):
            stack = capture_continuous_stack(cam, lens, CALIBRATED, wave=wave, lag_s=TAU_S, direction=direction,
                                             range_m=RANGE_M, timeout_s=2.0)
            assert stack.meta["sweep"]["direction"] == direction
            ts = np.array([m["timestamp_s"] for m in stack.slice_meta])
            values = np.array([m["actuator_value"] for m in stack.slice_meta])
            assert np.all(np.diff(values) > 0)  # far to near (rising current)
            assert np.all(np.diff(ts) > 0) if direction == "up" else np.all(np.diff(ts) < 0)
            # no n_slices: every frame in range (ramp 250 ms, 64 % in range, 200 fps: ~32 frames)
            assert 29 <= stack.n_slices <= 34
            for m in stack.slice_meta:
                assert m["timestamp_source"] == "host"
                assert m["actuator_value"] == pytest.approx(wave.value_at(m["timestamp_s"] + 0.001 - TAU_S), abs=1e-3)


def test_errors() -> None:
    lens, cam = _lens(), HostCamera(fps=200.0)
    with lens, cam:
        wave = TriangleWave(*_bounds(), FREQUENCY_HZ, time.monotonic())
        with pytest.raises(InputError, match="no triangle sweep is running"):
            capture_continuous_stack(cam, lens, CALIBRATED, wave=wave, lag_s=TAU_S)
        wave = start_triangle_sweep(lens, *_bounds(), FREQUENCY_HZ)
        with pytest.raises(DeviceError, match="stop_signal"):
            lens.move_to(10.0)
        for kwargs, match in (({"direction": "sideways"}, "direction"), ({"lag_s": -1.0}, "lag_s"),
                              ({"n_slices": 1}, "slices"), ({"timeout_s": 0.0}, "timeout_s"),
                              ({"range_m": (0.1, 0.2)}, "does not cover")):
            args = {"wave": wave, "lag_s": TAU_S} | kwargs
            with pytest.raises(InputError, match=match):
                capture_continuous_stack(cam, lens, CALIBRATED, **args)
        with pytest.raises(InputError, match="runs"):
            capture_continuous_stack(cam, lens, CALIBRATED, wave=TriangleWave(0.0, 50.0, 2.0, wave.t0_host_s), lag_s=TAU_S)
        with pytest.raises(InputError, match="dpt"):
            capture_continuous_stack(cam, lens, LiquidLensFocusModel(offset_dpt=0.0, dpt_per_ma=1.0, unit="dpt"), wave=wave, lag_s=TAU_S)
        with pytest.raises(SweepInterrupted) as info:
            capture_continuous_stack(cam, lens, CALIBRATED, wave=wave, lag_s=TAU_S, timeout_s=0.01)
        assert isinstance(info.value.cause, DeviceTimeout)
        lens.stop_signal()
        lens.move_to(10.0)  # allowed again
    slow, fast = _lens(), HostCamera(fps=10.0, exposure_s=0.005)
    with slow, fast:
        wave = start_triangle_sweep(slow, *_bounds(5.0, lag_s=0.005), 5.0)
        with pytest.raises(RigError, match="frames fell in the focus range") as info:
            capture_continuous_stack(fast, slow, CALIBRATED, wave=wave, lag_s=TAU_S, range_m=RANGE_M, timeout_s=2.0)
        assert not isinstance(info.value, SweepInterrupted)


# --------------------------------------------------------------------------------------------
# The Optotune LD4 (emulated): triangle mode and the continuous capture with a stand-in camera
# --------------------------------------------------------------------------------------------


@needs_pty
def test_optotune_triangle_and_continuous_capture() -> None:
    from capture.optotune import OptotuneLensDriver

    focus_map = LiquidLensFocusModel(offset_dpt=-0.49, dpt_per_ma=0.0166)
    lens = OptotuneLensDriver("emulator")
    cam = HostCamera(fps=100.0)
    with lens, cam:
        emulator = lens.emulator
        lower, upper = triangle_bounds(focus_map, (0.5, 1.5), frequency_hz=2.0, guard_s=0.02, limits=lens.limits)
        n_before = len(emulator.received)
        wave = start_triangle_sweep(lens, lower, upper, 2.0)
        i_max = lens.max_current_ma
        assert emulator.received[n_before:] == [
            ld4.set_signal_lower(ld4.current_to_raw(lower, i_max)).frame,
            ld4.set_signal_upper(ld4.current_to_raw(upper, i_max)).frame,
            ld4.set_signal_frequency(2000).frame,
            ld4.set_mode_triangular().frame,
        ]
        assert [bytes(f[:4]) for f in emulator.received[n_before:]] == [b"PwLA", b"PwUA", b"PwFA", b"MwTA"]
        assert wave.lower == pytest.approx(lens.sweep_parameters["lower_ma"]) and wave.frequency_hz == 2.0
        stack = capture_continuous_stack(cam, lens, focus_map, wave=wave, lag_s=0.0, range_m=(0.5, 1.5), n_slices=8, timeout_s=3.0)
        assert stack.n_slices == 8 and stack.meta["sweep"]["clock"] == "host"
        tolerance_ma = wave.slope_per_s * 0.02  # the start acknowledgement's latency, under load
        for m, d in zip(stack.slice_meta, stack.focus_distance_m, strict=True):
            t_mid = m["timestamp_s"] + 0.5 * m["exposure_s"]
            assert m["actuator_value"] == pytest.approx(wave.value_at(t_mid), abs=1e-3)
            assert m["actuator_value"] == pytest.approx(emulator.commanded_current_ma(t_mid), abs=tolerance_ma)
            assert d == pytest.approx(focus_map.focus_distance_m(m["actuator_value"]), rel=1e-3)
            assert 0.5 - 1e-6 <= d <= 1.5 + 1e-6
        lens.stop_signal()
        assert lens.active_mode() == "current"


def test_continuous_capture_uses_the_lens_temperature() -> None:
    """A lens 20 C above the calibration's reference: the triangle's bounds, the usable range
    and every recorded focus distance use the model's temperature term."""
    from calibration.focus_model import PolynomialFocusModel

    warm = TrueLensModel(offset_dpt=-0.5, dpt_per_ma=0.0165, drift_dpt_per_c=-0.003, temperature_c=45.0)
    model = PolynomialFocusModel(coefficients_dpt=(-0.5, 0.0165, 0.0), unit="mA", temperature_dpt_per_c=-0.003,
                                 reference_temperature_c=25.0)
    lens = SimulatedLiquidLens(true_model=warm, time_constant_s=TAU_S, settle_tolerance_ma=0.05)
    cam = HostCamera(fps=200.0)
    lower, upper = triangle_bounds(model, RANGE_M, frequency_hz=FREQUENCY_HZ, limits=(-290.0, 290.0), temperature_c=45.0)
    assert (lower, upper) == pytest.approx(sorted(model.actuator_value(d, temperature_c=45.0) for d in RANGE_M))
    with lens, cam:
        wave = start_triangle_sweep(lens, *triangle_bounds(model, RANGE_M, frequency_hz=FREQUENCY_HZ, guard_s=3 * TAU_S,
                                                           limits=(-290.0, 290.0), temperature_c=45.0), FREQUENCY_HZ)
        stack = capture_continuous_stack(cam, lens, model, wave=wave, lag_s=TAU_S, n_slices=6, range_m=RANGE_M, timeout_s=3.0)
    assert stack.n_slices == 6
    for m, d in zip(stack.slice_meta, stack.focus_distance_m, strict=True):
        assert d == pytest.approx(1.0 / warm.power_dpt(m["actuator_value"]), rel=1e-3)  # the warm lens's true focus
        assert RANGE_M[0] - 1e-6 <= d <= RANGE_M[1] + 1e-6
        assert m["lens_temperature_c"] == 45.0
