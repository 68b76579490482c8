"""Tests of capture.sweep: planning focus distances and capturing a stack on the simulated rig."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibration.focus_model import LiquidLensFocusModel
from capture.errors import ConfigError, DeviceError, DeviceTimeout, InputError
from capture.optics import ThinLens
from capture.scenes import procedural_scene
from capture.simulated import SimulatedCamera, SimulatedLiquidLens, TrueLensModel
from capture.stack import FocalStack
from capture.sweep import SweepInterrupted, plan_focus_distances, sweep

# --------------------------------------------------------------------------------------------
# plan_focus_distances
# --------------------------------------------------------------------------------------------


def test_plan_is_even_in_diopters_far_to_near() -> None:
    d = plan_focus_distances(range_m=(0.4, 2.0), slices=5)
    assert d.shape == (5,)
    assert d[0] == pytest.approx(2.0) and d[-1] == pytest.approx(0.4)
    dpt = 1.0 / d
    np.testing.assert_allclose(np.diff(dpt), (2.5 - 0.5) / 4, rtol=1e-12)
    np.testing.assert_allclose(d, [2.0, 1.0, 2 / 3, 0.5, 0.4], rtol=1e-12)


def test_plan_accepts_the_range_in_either_order() -> None:
    np.testing.assert_allclose(plan_focus_distances(range_m=(2.0, 0.5), slices=3), [2.0, 0.8, 0.5], rtol=1e-12)


def test_plan_allows_infinity_as_the_far_end() -> None:
    d = plan_focus_distances(range_m=(0.5, math.inf), slices=3)
    assert math.isinf(d[0])
    np.testing.assert_allclose(d[1:], [1.0, 0.5], rtol=1e-12)


def test_plan_sorts_an_explicit_list_far_to_near() -> None:
    d = plan_focus_distances(distances_m=[0.5, 3.0, 1.0, math.inf, 0.7])
    assert math.isinf(d[0])
    np.testing.assert_allclose(d[1:], [3.0, 1.0, 0.7, 0.5])
    # an explicit list wins over range and slices
    np.testing.assert_allclose(plan_focus_distances(range_m=(0.4, 2.0), slices=9, distances_m=[1.0, 2.0]), [2.0, 1.0])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"range_m": (0.5, 2.0), "slices": 1}, "slices"),
        ({"range_m": (0.5, 2.0), "slices": 0}, "slices"),
        ({"range_m": (0.0, 2.0), "slices": 5}, "range_m"),
        ({"range_m": (-1.0, 2.0), "slices": 5}, "range_m"),
        ({"distances_m": [1.0]}, "distances_m"),
        ({"distances_m": []}, "distances_m"),
        ({"distances_m": [1.0, 0.0]}, "distances_m"),
        ({"distances_m": [1.0, -0.5]}, "distances_m"),
        ({"distances_m": [1.0, math.nan]}, "distances_m"),
        ({"range_m": (0.5, 2.0)}, "sweep"),
        ({}, "sweep"),
    ],
)
def test_plan_errors(kwargs: dict, field: str) -> None:
    with pytest.raises(InputError, match=field):
        plan_focus_distances(**kwargs)


# --------------------------------------------------------------------------------------------
# sweep on the simulated rig
# --------------------------------------------------------------------------------------------

TRUE = TrueLensModel(offset_dpt=-0.5, dpt_per_ma=0.0165, drift_dpt_per_c=-0.003, temperature_c=27.0)
NOMINAL = LiquidLensFocusModel(offset_dpt=-0.49, dpt_per_ma=0.0166)


@pytest.fixture(scope="module")
def scene():
    return procedural_scene(96, 72, seed=0)


@pytest.fixture
def rig(scene, monkeypatch):
    """A simulated lens and camera (fast: 96x72 at 200 fps); ``grabbed`` records every frame."""
    lens = SimulatedLiquidLens(true_model=TRUE, time_constant_s=0.005, settle_tolerance_ma=0.05)
    cam = SimulatedCamera(scene=scene, lens=ThinLens(focal_length_mm=12.0, f_number=2.0, pixel_pitch_um=7.0),
                          focus_dpt_at=lens.true_focus_dpt_at, fps=200.0, exposure_s=0.002, pixel_format="Mono8")
    grabbed = []
    real_grab = cam.grab

    def recording_grab(**kw):
        frame = real_grab(**kw)
        grabbed.append(frame)
        return frame

    monkeypatch.setattr(cam, "grab", recording_grab)
    with lens, cam:
        yield cam, lens, grabbed


def test_sweep_returns_a_stack_as_planned(rig) -> None:
    cam, lens, grabbed = rig
    planned = plan_focus_distances(range_m=(0.4, 2.0), slices=6)
    progress = []
    stack = sweep(cam, lens, NOMINAL, planned, progress=lambda i, n: progress.append((i, n)), meta={"run": "t"})
    assert isinstance(stack, FocalStack)
    assert stack.n_slices == 6
    assert stack.images.shape == (6, 72, 96) and stack.images.dtype == np.uint8
    np.testing.assert_allclose(stack.focus_distance_m, planned)
    assert progress == [(i, 6) for i in range(1, 7)]
    assert stack.meta["run"] == "t"
    for i, (entry, frame) in enumerate(zip(stack.slice_meta, grabbed, strict=True)):
        assert entry["actuator_value"] == pytest.approx(NOMINAL.actuator_value(planned[i]), abs=1e-4)
        assert entry["actuator_unit"] == "mA"
        assert entry["timestamp_s"] == pytest.approx(frame.timestamp_s, abs=1e-6)
        assert entry["timestamp_source"] == "camera"
        assert entry["exposure_s"] == 0.002
        assert entry["frame_id"] == frame.frame_id
        assert entry["lens_temperature_c"] == 27.0
        np.testing.assert_array_equal(stack.images[i], frame.image)
    ts = [e["timestamp_s"] for e in stack.slice_meta]
    assert ts == sorted(ts) and len(set(ts)) == len(ts)


def test_sweep_waits_for_the_true_focus(rig) -> None:
    cam, lens, grabbed = rig
    planned = plan_focus_distances(range_m=(0.4, 2.0), slices=5)
    stack = sweep(cam, lens, NOMINAL, planned, wait_settled=True, settle_timeout_s=1.0)
    assert len(grabbed) == 5
    for entry, frame in zip(stack.slice_meta, grabbed, strict=True):
        true_dpt = lens.base_dpt + TRUE.power_dpt(entry["actuator_value"])
        assert frame.meta["true_focus_dpt"] == pytest.approx(true_dpt, abs=0.01)
    # the nominal model is off, so the true focus is not the planned one: that is calibration's job
    first_true = lens.base_dpt + TRUE.power_dpt(stack.slice_meta[0]["actuator_value"])
    assert abs(first_true - 1.0 / planned[0]) > 0.005


def test_sweep_without_settling_sees_the_lens_in_motion(rig) -> None:
    cam, lens, grabbed = rig
    lens.time_constant_s = 0.05
    planned = plan_focus_distances(range_m=(0.4, 2.0), slices=3)
    stack = sweep(cam, lens, NOMINAL, planned, wait_settled=False)
    errors = [abs(f.meta["true_focus_dpt"] - (lens.base_dpt + TRUE.power_dpt(e["actuator_value"])))
              for f, e in zip(grabbed, stack.slice_meta, strict=True)]
    assert max(errors) > 0.1


def test_device_timeout_mid_sweep_keeps_the_frames_captured(rig) -> None:
    cam, lens, grabbed = rig
    lens.time_constant_s = 1e4  # never settles after a real move
    focus_map = LiquidLensFocusModel(offset_dpt=0.0, dpt_per_ma=0.01)  # infinity = 0 mA, where the lens rests
    with pytest.raises(SweepInterrupted) as info:
        sweep(cam, lens, focus_map, [math.inf, 1.0, 0.5], settle_timeout_s=0.02)
    err = info.value
    assert isinstance(err.cause, DeviceTimeout)
    assert err.exit_code == 3
    assert len(err.frames) == 1 and err.frames[0] is grabbed[0]
    assert err.distances_m == [math.inf]
    assert len(err.slice_meta) == 1 and err.slice_meta[0]["actuator_value"] == 0.0
    assert "1 of 3" in str(err)


def test_a_temperature_read_failing_after_a_grab_keeps_that_slice(rig, monkeypatch) -> None:
    """The lens temperature is read after each frame: a cable pulled between the grab and that
    read stops the sweep, and the frame already taken is among the kept ones (without a
    temperature)."""
    cam, lens, grabbed = rig
    calls = []
    real = lens.temperature_c

    def failing_on_third_read():
        calls.append(1)
        if len(calls) == 3:  # read 1 is before planning, 2 after slice 0, 3 after slice 1
            raise DeviceError("/dev/ttyACM0: the Lens Driver stopped answering")
        return real()

    monkeypatch.setattr(lens, "temperature_c", failing_on_third_read)
    planned = plan_focus_distances(range_m=(0.4, 2.0), slices=4)
    with pytest.raises(SweepInterrupted) as info:
        sweep(cam, lens, NOMINAL, planned)
    err = info.value
    assert len(err.frames) == 2 and err.frames[1] is grabbed[1]
    assert err.distances_m == pytest.approx(list(planned[:2]))
    assert err.slice_meta[0]["lens_temperature_c"] == 27.0
    assert "lens_temperature_c" not in err.slice_meta[1]
    assert "2 of 4" in str(err) and "stopped answering" in str(err)


def test_the_settle_wait_is_at_least_the_actuators_own_move_limit(rig) -> None:
    """A stage's move takes seconds at its feed rate, longer than sweep.settle_timeout_s (sized
    for a lens): the sweep waits the actuator's move_timeout_s instead. It used to time out on
    every sweep of the shipped G-code template (40 mm at 600 mm/min against 1 s)."""
    cam, lens, grabbed = rig
    lens.time_constant_s = 0.03  # ~0.2 s to settle after each move: 10x the settle timeout below
    planned = plan_focus_distances(range_m=(0.4, 2.0), slices=3)
    with pytest.raises(SweepInterrupted):
        sweep(cam, lens, NOMINAL, planned, settle_timeout_s=0.02)  # a lens's limit: the slow move is a timeout
    lens.move_timeout_s = 2.0  # as a stage declares it
    grabbed.clear()
    stack = sweep(cam, lens, NOMINAL, planned, settle_timeout_s=0.02)
    assert stack.n_slices == 3
    errors = [abs(f.meta["true_focus_dpt"] - (lens.base_dpt + TRUE.power_dpt(e["actuator_value"])))
              for f, e in zip(grabbed, stack.slice_meta, strict=True)]
    assert max(errors) < 0.01  # each frame after the lens settled


def test_a_sweep_outside_the_lens_limits_is_refused_before_the_first_move(rig) -> None:
    """It used to capture the reachable slices and stop at the first unreachable one (a
    half stack, and a message naming neither the field nor the file)."""
    cam, lens, grabbed = rig
    with pytest.raises(ConfigError, match=r"^sweep.range_m: focus distance 0.05 m needs .* mA on .*outside its limits .*\(1 of 3 planned slices\)"):
        sweep(cam, lens, NOMINAL, [2.0, 1.0, 0.05])  # 20 dpt needs ~1200 mA
    assert grabbed == []


@pytest.mark.parametrize("distances", [[], [1.0]])
def test_sweep_needs_at_least_two_distances(rig, distances: list) -> None:
    cam, lens, grabbed = rig
    with pytest.raises(InputError, match="distances_m"):
        sweep(cam, lens, NOMINAL, distances)
    assert grabbed == []


def test_sweep_compensates_the_lens_temperature(scene) -> None:
    """A lens 20 C above the calibration's reference: the model's temperature term sets the
    currents sent, so the lens really focuses at the distances the stack records."""
    from calibration.focus_model import PolynomialFocusModel

    warm = TrueLensModel(offset_dpt=-0.5, dpt_per_ma=0.0165, drift_dpt_per_c=-0.003, temperature_c=45.0)
    model = PolynomialFocusModel(coefficients_dpt=(-0.5, 0.0165, 0.0), unit="mA", temperature_dpt_per_c=-0.003,
                                 reference_temperature_c=25.0)
    lens = SimulatedLiquidLens(true_model=warm, time_constant_s=0.005, settle_tolerance_ma=0.05)
    cam = SimulatedCamera(scene=scene, lens=ThinLens(focal_length_mm=12.0, f_number=2.0, pixel_pitch_um=7.0),
                          focus_dpt_at=lens.true_focus_dpt_at, fps=200.0, exposure_s=0.002, pixel_format="Mono8")
    planned = plan_focus_distances(range_m=(0.4, 2.0), slices=4)
    with lens, cam:
        stack = sweep(cam, lens, model, planned)
    for entry, d in zip(stack.slice_meta, stack.focus_distance_m, strict=True):
        assert entry["actuator_value"] == pytest.approx(model.actuator_value(d, temperature_c=45.0), abs=1e-3)
        assert 1.0 / warm.power_dpt(entry["actuator_value"]) == pytest.approx(d, rel=1e-4)
        assert entry["lens_temperature_c"] == 45.0


def test_sweep_takes_a_focus_map_without_a_temperature_term(rig) -> None:
    cam, lens, _grabbed = rig

    class Plain:  # a user's own map: no temperature_c keyword
        unit = "mA"

        def actuator_value(self, focus_distance_m: float) -> float:
            return NOMINAL.actuator_value(focus_distance_m)

    stack = sweep(cam, lens, Plain(), [2.0, 0.5])
    assert [m["actuator_value"] for m in stack.slice_meta] == pytest.approx([NOMINAL.actuator_value(2.0), NOMINAL.actuator_value(0.5)], abs=1e-4)


def test_a_camera_that_repeats_a_frame_is_named_in_one_warning(rig, caplog) -> None:
    cam, lens, grabbed = rig
    real_grab = cam.grab
    first = []

    def stuck_grab(**kw):  # a camera that hands over its first buffer again and again
        frame = real_grab(**kw)
        first.append(first[0] if first else frame)
        return first[-1]

    cam.grab = stuck_grab
    with caplog.at_level("WARNING", logger="capture.sweep"):
        stack = sweep(cam, lens, NOMINAL, plan_focus_distances(range_m=(0.4, 2.0), slices=4))
    assert stack.n_slices == 4  # the stack is kept: the warning says what is wrong with it
    lines = [r.getMessage() for r in caplog.records if "same image" in r.getMessage()]
    assert len(lines) == 1
    assert "slices 0 and 1, 1 and 2, 2 and 3" in lines[0]
    assert f"returned frame {first[0].frame_id} twice" in lines[0]


def test_a_sweep_of_distinct_frames_warns_of_nothing_and_saturated_frames_are_named(rig, caplog) -> None:
    cam, lens, grabbed = rig
    with caplog.at_level("WARNING", logger="capture.sweep"):
        sweep(cam, lens, NOMINAL, plan_focus_distances(range_m=(0.4, 2.0), slices=4))
    assert not [r for r in caplog.records if "same image" in r.getMessage()]
    real_grab = cam.grab

    def white_grab(**kw):  # new frames (new ids), every pixel clipped at white
        frame = real_grab(**kw)
        frame.image[...] = 255
        return frame

    cam.grab = white_grab
    with caplog.at_level("WARNING", logger="capture.sweep"):
        sweep(cam, lens, NOMINAL, plan_focus_distances(range_m=(0.4, 2.0), slices=3))
    lines = [r.getMessage() for r in caplog.records if "same image" in r.getMessage()]
    assert len(lines) == 1 and "saturated or unlit" in lines[0] and "(2 repeats in 3 slices)" in lines[0]
