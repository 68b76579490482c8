"""Tests of capture.simulated: the liquid lens with true optics and first-order settling, and
the free-running camera that renders the scene at the focus of each exposure."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from capture.errors import DeviceError, DeviceTimeout, InputError
from capture.optics import ThinLens
from capture.scenes import procedural_scene
from capture.simulated import SimulatedCamera, SimulatedLiquidLens, TrueLensModel

OPTICS = ThinLens(focal_length_mm=12.0, f_number=2.0, pixel_pitch_um=7.0)


@pytest.fixture(scope="module")
def small_scene():
    return procedural_scene(96, 72, seed=0)


def _camera(scene, focus_dpt_at=lambda t: 1.0, **kw) -> SimulatedCamera:
    args = {"fps": 200.0, "exposure_s": 0.002, "pixel_format": "Mono8"} | kw
    return SimulatedCamera(scene=scene, lens=OPTICS, focus_dpt_at=focus_dpt_at, **args)


# --------------------------------------------------------------------------------------------
# SimulatedLiquidLens
# --------------------------------------------------------------------------------------------


def test_lens_first_order_response() -> None:
    tau = 1.0  # long, so the few microseconds around move_to do not matter
    with SimulatedLiquidLens(time_constant_s=tau) as lens:
        t0 = time.monotonic()
        lens.move_to(100.0)
        t1 = time.monotonic()
        t_cmd = 0.5 * (t0 + t1)
        assert lens.target == 100.0
        assert lens.current_at(t_cmd) == pytest.approx(0.0, abs=0.1)
        assert lens.current_at(t_cmd + tau) == pytest.approx(100.0 * (1 - math.exp(-1)), abs=0.1)  # ~63 %
        assert lens.current_at(t_cmd + 3 * tau) == pytest.approx(100.0 * (1 - math.exp(-3)), abs=0.1)
        assert lens.current_at(t_cmd + 50 * tau) == pytest.approx(100.0, abs=1e-6)
        # a new command starts from where the lens is now, not from the old target
        time.sleep(0.05)
        t2 = time.monotonic()
        lens.move_to(0.0)
        t3 = time.monotonic()
        now_ma = lens.current_at(t3)
        assert 100.0 * (1 - math.exp(-(t2 - t1) / tau)) - 0.1 <= now_ma <= 100.0 * (1 - math.exp(-(t3 - t0) / tau)) + 0.1
        assert now_ma > 3.0
        assert lens.current_at(t3 + tau) == pytest.approx(now_ma * math.exp(-1), abs=0.2)


def test_lens_is_settled_semantics() -> None:
    """Settled means the current is within ``settle_tolerance_ma`` of the target: a short
    wait_settled then returns at once, otherwise it raises DeviceTimeout."""
    with SimulatedLiquidLens(time_constant_s=0.02, settle_tolerance_ma=0.05) as lens:
        t0 = time.monotonic()
        t = lens.wait_settled(timeout_s=1e-3)  # at rest after open
        assert t0 <= t <= time.monotonic()
        lens.move_to(50.0)
        with pytest.raises(DeviceTimeout):
            lens.wait_settled(timeout_s=1e-3)  # 50 mA away, tau = 20 ms: far from settled
        time.sleep(0.02 * math.log(50.0 / 0.05) + 0.03)  # ~7 time constants + margin
        t1 = time.monotonic()
        t = lens.wait_settled(timeout_s=1e-3)
        assert t - t1 < 1e-2  # seen settled at once (a loaded machine took 1.2 ms over one poll)
        assert abs(lens.position() - 50.0) <= 0.05
        lens.move_to(50.04)  # a step within the tolerance is settled at once
        lens.wait_settled(timeout_s=1e-3)


@pytest.mark.parametrize("timeout_s", [0.0, -1.0, math.nan, math.inf])
def test_wait_settled_needs_a_finite_positive_timeout(timeout_s: float) -> None:
    with SimulatedLiquidLens(time_constant_s=0.0, name="lens-under-test") as lens:
        with pytest.raises(InputError, match="timeout_s"):
            lens.wait_settled(timeout_s=timeout_s)


def test_wait_settled_returns_the_time_it_settled() -> None:
    with SimulatedLiquidLens(time_constant_s=0.01, settle_tolerance_ma=0.05) as lens:
        lens.move_to(100.0)
        t_before = time.monotonic()
        t_settled = lens.wait_settled(timeout_s=1.0)
        assert t_before <= t_settled <= time.monotonic()
        assert abs(lens.current_at(t_settled) - 100.0) <= 0.05
        # needs ln(100 / 0.05) ~ 7.6 time constants
        assert t_settled - t_before >= 0.5 * 0.01 * math.log(100.0 / 0.05)


def test_wait_settled_times_out() -> None:
    with SimulatedLiquidLens(time_constant_s=1e4, name="slow lens") as lens:
        lens.move_to(200.0)
        t0 = time.monotonic()
        with pytest.raises(DeviceTimeout, match="slow lens"):
            lens.wait_settled(timeout_s=0.03)
        assert 0.03 <= time.monotonic() - t0 < 0.5


@pytest.mark.parametrize("value", [-290.5, 291.0, math.inf, math.nan])
def test_move_outside_limits_names_the_device(value: float) -> None:
    with SimulatedLiquidLens(current_limits_ma=(-290.0, 290.0), name="lens-under-test") as lens:
        with pytest.raises(InputError, match="lens-under-test"):
            lens.move_to(value)
        assert lens.target == 0.0  # nothing was commanded
        lens.move_to(290.0)  # the limits themselves are allowed
        lens.move_to(-290.0)


@pytest.mark.parametrize("temperature_c", [25.0, 27.0, 40.0])
def test_true_focus_follows_the_true_model_with_drift(temperature_c: float) -> None:
    model = TrueLensModel(offset_dpt=-0.5, dpt_per_ma=0.0165, drift_dpt_per_c=-0.003, temperature_c=temperature_c)
    with SimulatedLiquidLens(true_model=model, time_constant_s=0.0, base_focus_m=2.0) as lens:
        lens.move_to(120.0)
        want = 0.5 + (-0.5 + 0.0165 * 120.0 - 0.003 * (temperature_c - 25.0))
        assert lens.true_focus_dpt_at(time.monotonic()) == pytest.approx(want, abs=1e-9)
        assert lens.temperature_c() == temperature_c


def test_close_parks_at_zero_and_is_idempotent() -> None:
    lens = SimulatedLiquidLens(time_constant_s=0.0)
    lens.open()
    lens.move_to(150.0)
    assert lens.position() == pytest.approx(150.0)
    lens.close()
    assert not lens.is_open
    assert lens.target == 0.0
    assert lens.current_at(time.monotonic()) == 0.0
    lens.close()  # idempotent
    assert not lens.is_open


def test_lens_operations_after_close_raise_device_error() -> None:
    lens = SimulatedLiquidLens(name="closed lens")
    lens.open()
    lens.close()
    with pytest.raises(DeviceError, match="closed lens"):
        lens.move_to(10.0)
    with pytest.raises(DeviceError):
        lens.wait_settled(timeout_s=0.1)
    with pytest.raises(DeviceError):
        lens.position()


def test_lens_rejects_a_negative_time_constant() -> None:
    with pytest.raises(InputError, match="time_constant_s"):
        SimulatedLiquidLens(time_constant_s=-1.0)


# --------------------------------------------------------------------------------------------
# SimulatedCamera
# --------------------------------------------------------------------------------------------


def test_frame_ids_and_timestamps(small_scene) -> None:
    with _camera(small_scene) as cam:
        frames = [cam.grab() for _ in range(6)]
    ids = [f.frame_id for f in frames]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for f in frames:
        # exposure starts on the frame grid: timestamp = frame_id / fps
        assert f.timestamp_s == pytest.approx(f.frame_id / 200.0, abs=1e-9)
        assert f.timestamp_source == "camera"
        assert f.exposure_s == 0.002
    gaps = np.diff([f.timestamp_s for f in frames])
    np.testing.assert_allclose(gaps, np.diff(ids) / 200.0, atol=1e-9)
    assert np.all(gaps > 0)


def test_grab_starts_after_the_requested_time(small_scene) -> None:
    with _camera(small_scene) as cam:
        t_open = cam._t_open  # the host time of frame 0 (timestamps are relative to it)
        for delay in (0.0, 0.013, 0.031):
            t = time.monotonic() + delay
            f = cam.grab(start_after_host_s=t)
            start = t_open + f.timestamp_s
            assert start >= t - 1e-9
            assert start < t + 1.0 / 200.0 + 1e-9  # and it is the first such frame
            assert time.monotonic() >= start + f.exposure_s  # it was exposed before returning


def test_grab_times_out_when_no_frame_starts_in_time(small_scene) -> None:
    with _camera(small_scene) as cam:
        t0 = time.monotonic()
        with pytest.raises(DeviceTimeout):
            cam.grab(start_after_host_s=time.monotonic() + 5.0, timeout_s=0.1)
        assert time.monotonic() - t0 < 1.0  # it does not wait for a frame it cannot deliver
        with pytest.raises(InputError):
            cam.grab(timeout_s=0.0)


def test_grabbing_costs_wall_time(small_scene) -> None:
    with _camera(small_scene, fps=20.0, exposure_s=0.01) as cam:
        t0 = time.monotonic()
        frames = [cam.grab() for _ in range(5)]
        elapsed = time.monotonic() - t0
    assert elapsed >= 4 / 20.0 + 0.01 - 1e-3
    assert frames[-1].frame_id - frames[0].frame_id >= 4


def test_pixel_format_mono8(small_scene) -> None:
    with _camera(small_scene, pixel_format="Mono8") as cam:
        f = cam.grab()
    assert f.image.dtype == np.uint8 and f.image.shape == (72, 96)
    assert f.significant_bits == 8
    assert f.image.std() > 5  # a real picture, not a constant


def test_pixel_format_mono16(small_scene) -> None:
    with _camera(small_scene, pixel_format="Mono16", exposure_s=0.005) as cam:
        f = cam.grab()
        assert cam.significant_bits == cam.sensor.adc_bits == 12
    assert f.image.dtype == np.uint16 and f.image.shape == (72, 96)
    assert int(f.image.max()) <= 2**12 - 1
    assert int(f.image.max()) > 255  # uses more than 8 bits
    assert f.significant_bits == 12


def test_pixel_format_rgb8(small_scene) -> None:
    with _camera(small_scene, pixel_format="RGB8") as cam:
        f = cam.grab()
    assert f.image.dtype == np.uint8 and f.image.shape == (72, 96, 3)
    assert f.significant_bits == 8


def test_camera_rejects_bad_settings(small_scene) -> None:
    with pytest.raises(InputError, match="pixel_format"):
        _camera(small_scene, pixel_format="BayerRG8")
    with pytest.raises(InputError, match="exposure_s"):
        _camera(small_scene, fps=200.0, exposure_s=0.01)  # longer than a frame
    with pytest.raises(InputError, match="fps"):
        _camera(small_scene, fps=0.0)


def test_render_cache_makes_a_repeated_focus_cheaper(small_scene) -> None:
    with _camera(small_scene, focus_dpt_at=lambda t: 1.234) as cam:
        cam.grab()
        assert (cam.cache_misses, cam.cache_hits) == (1, 0)
        cam.grab()
        cam.grab()
        assert (cam.cache_misses, cam.cache_hits) == (1, 2)
        t0 = time.perf_counter()
        cam.render_clean(0.3)
        t_miss = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = cam.render_clean(0.3)
        t_hit = time.perf_counter() - t0
        assert cam.cache_misses == 2 and cam.cache_hits == 3
        assert t_hit < t_miss
        # focus settings within the 1e-3 dpt quantum share a render
        assert cam.render_clean(0.3004) is again


def test_frames_show_the_focus_at_exposure_time(small_scene) -> None:
    model = TrueLensModel()
    with SimulatedLiquidLens(true_model=model, time_constant_s=0.05, settle_tolerance_ma=0.05) as lens:
        with _camera(small_scene, focus_dpt_at=lens.true_focus_dpt_at) as cam:
            lens.move_to(250.0)
            settled_focus = lens.base_dpt + model.power_dpt(250.0)
            early = cam.grab()  # the next frame, without waiting for the lens
            assert abs(early.meta["true_focus_dpt"] - settled_focus) > 1.0
            # it is the focus the moving lens had during that frame's exposure
            mid_exposure = cam._t_open + early.timestamp_s + early.exposure_s / 2
            assert early.meta["true_focus_dpt"] == pytest.approx(lens.true_focus_dpt_at(mid_exposure), abs=0.01)
            t_ready = lens.wait_settled(timeout_s=2.0)
            late = cam.grab(start_after_host_s=t_ready)
            assert late.meta["true_focus_dpt"] == pytest.approx(settled_focus, abs=1e-3)
            # and the pictures differ: the early one is rendered at the wrong focus
            assert np.abs(early.image.astype(int) - late.image.astype(int)).mean() > 1.0


def test_the_lens_parks_where_the_config_says() -> None:
    """focus.park_current_ma was accepted in rig.yaml and ignored: the simulated lens parked at 0."""
    lens = SimulatedLiquidLens(time_constant_s=0.0, park_current_ma=50.0)
    with lens:
        lens.move_to(120.0)
        lens.wait_settled(timeout_s=1.0)
    assert lens.current_at(time.monotonic()) == pytest.approx(50.0)
    with pytest.raises(InputError, match=r"focus.park_current_ma: 400 mA is outside the current limits"):
        SimulatedLiquidLens(park_current_ma=400.0)


def test_layers_follow_the_optics() -> None:
    """The layer spacing and the occlusion margin were fixed (0.05 dpt, 16 px) whatever the optics:
    small pixels and long lenses blur far more per diopter than 16 px of margin covers."""
    scene = procedural_scene(64, 80, near_m=0.4, far_m=2.0, seed=1)
    small_pixels = ThinLens(focal_length_mm=25.0, f_number=2.0, pixel_pitch_um=3.45)
    cam = SimulatedCamera(scene=scene, lens=small_pixels, focus_dpt_at=lambda t: 1.0)
    from capture.simulated import MAX_LAYERS, MAX_OCCLUSION_MARGIN_PX

    k = small_pixels.blur_px_per_dpt
    layered = cam._layered_scene()
    span = 1 / scene.depth_m.min() - 1 / scene.depth_m.max()
    assert layered.occlusion_margin_px == min(MAX_OCCLUSION_MARGIN_PX, int(np.ceil(k * span / 2)) + 2) > 16
    spacing = np.diff(layered.layer_dpt).max()
    assert spacing <= max(0.6 / k, span / (MAX_LAYERS - 1)) + 1e-6 and spacing < 0.05  # finer than the default
    assert len(layered.layer_dpt) <= MAX_LAYERS + 1  # bounded: rendering time grows with the layers
    moderate = ThinLens(focal_length_mm=12.0, f_number=2.0, pixel_pitch_um=3.45)  # 21 px/dpt: no bound reached
    mid = SimulatedCamera(scene=scene, lens=moderate, focus_dpt_at=lambda t: 1.0)._layered_scene()
    assert np.diff(mid.layer_dpt).max() <= 0.6 / moderate.blur_px_per_dpt + 1e-6
    assert mid.occlusion_margin_px >= moderate.blur_px_per_dpt * span / 2
    default_like = _camera(scene)._layered_scene()  # the default optics keep the defaults
    assert default_like.occlusion_margin_px == 16 and np.diff(default_like.layer_dpt).max() <= 0.05 + 1e-6
