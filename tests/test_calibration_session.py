"""Calibration sessions on the simulated rig: the calibrated models against the simulator's
truth, resuming, the report, bad input, and depth with vs without the calibration."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from calibration.focus_fit import fit_focus_model, refine_peak, sharpness
from calibration.focus_model import PolynomialFocusModel, load_focus_model
from capture.errors import CalibrationError, ConfigError
from capture.optics import breathing_scale
from rig import load_config, open_rig
from rig.calibrate import run_calibration
from rig.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
SIM_YAML = ROOT / "configs" / "sim.yaml"


def _config_dict(out: Path, *, size: tuple[int, int] = (320, 240), **session) -> dict:
    doc = yaml.safe_load(SIM_YAML.read_text(encoding="utf-8"))
    doc["camera"].update(width=size[0], height=size[1], fps=240, exposure_s=0.002)
    doc["focus"]["time_constant_s"] = 0.004  # a quick lens keeps the many small calibration moves fast
    doc["output"] = {"dir": str(out)}
    doc["calibration"] = {"file": None, "session": {"coarse_steps": 17, "fine_steps": 11, "breathing_steps": 7,
                                                    "board_views": 8, "board": {"cols": 7, "rows": 5, "square_mm": 30}, **session}}
    return doc


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> dict:
    """One full non-interactive session on a small simulated rig (shared by the tests below)."""
    out = tmp_path_factory.mktemp("cal")
    doc = _config_dict(out, size=(512, 384))  # sim.yaml's sensor: at 320 px the 11-degree view biases fx by ~2 %
    config = parse_config(doc, source="test")
    cal = run_calibration(config, interactive=False, show_progress=False)
    return {"run": cal, "config": config, "doc": doc, "out": out}


def test_focus_model_matches_the_true_lens_within_1_percent(calibrated: dict) -> None:
    config = calibrated["config"]
    model = load_focus_model(calibrated["run"].calibration_path)
    assert isinstance(model, PolynomialFocusModel) and model.unit == "mA"
    actual = config.focus.actual
    base_dpt = 0.0  # sim.yaml: camera lens focused at infinity
    near, far = config.sweep.range_m
    span_dpt = 1.0 / near - 1.0 / far
    lo, hi = sorted((model.actuator_value(near), model.actuator_value(far)))
    currents = np.linspace(lo, hi, 50)
    true_dpt = base_dpt + actual.offset_dpt + actual.dpt_per_ma * currents + actual.drift_dpt_per_c * (actual.temperature_c - 25.0)
    fitted = np.array([model.focus_dpt(c) for c in currents])
    assert np.max(np.abs(fitted - true_dpt)) <= 0.01 * span_dpt
    # and the nominal model in the config is measurably worse: the calibration found something
    nominal = config.focus.nominal.offset_dpt + config.focus.nominal.dpt_per_ma * currents
    assert np.max(np.abs(nominal - true_dpt)) > 2 * np.max(np.abs(fitted - true_dpt))


def test_breathing_scale_within_1e3(calibrated: dict) -> None:
    config = calibrated["config"]
    doc = yaml.safe_load(calibrated["run"].calibration_path.read_text(encoding="utf-8"))
    from calibration.alignment import BreathingModel

    breathing = BreathingModel.from_dict(doc["breathing"])
    model = load_focus_model(calibrated["run"].calibration_path)
    optics = config.camera.optics
    actual = config.focus.actual
    values = np.linspace(min(breathing.actuator_values), max(breathing.actuator_values), 9)
    ref_value = breathing.reference_value

    def true_scale(v: float) -> float:
        dpt = actual.offset_dpt + actual.dpt_per_ma * v + actual.drift_dpt_per_c * (actual.temperature_c - 25.0)
        return breathing_scale(dpt, breathing_per_dpt=optics.breathing_per_dpt, reference_dpt=optics.breathing_reference_dpt)

    for v in values:
        expected = true_scale(v) / true_scale(ref_value)  # magnification relative to the reference setting
        assert breathing.scale_at(v) == pytest.approx(expected, abs=1e-3), v
    assert model is not None


def test_intrinsic_focal_length_within_1_percent(calibrated: dict) -> None:
    config = calibrated["config"]
    doc = yaml.safe_load(calibrated["run"].calibration_path.read_text(encoding="utf-8"))
    from capture.optics import ThinLens

    o = config.camera.optics
    truth_px = ThinLens(focal_length_mm=o.focal_length_mm, f_number=o.f_number, pixel_pitch_um=o.pixel_pitch_um).focal_length_px
    k = doc["intrinsics"]
    fx, fy = k["fx_px"], k["fy_px"]
    assert fx == pytest.approx(truth_px, rel=0.01) and fy == pytest.approx(truth_px, rel=0.01)


def test_session_writes_file_and_report(calibrated: dict) -> None:
    run = calibrated["run"]
    doc = yaml.safe_load(run.calibration_path.read_text(encoding="utf-8"))
    assert doc["format"] == "calibration/1" and doc["rig"]["name"] == "sim" and doc["created_utc"].endswith("Z")
    fit = doc["focus_model"]["fit"]
    assert len(fit["distances_m"]) == 7 and fit["rms_dpt"] < 0.01 and fit["loo_rms_dpt"] < 0.02
    assert doc["temperature_range_c"] == [27.0, 27.0]
    report = run.run_dir / "report"
    for name in ("summary.md", "sharpness_curves.png", "focus_fit.png", "breathing.png"):
        assert (report / name).is_file() and (report / name).stat().st_size > (300 if name.endswith(".md") else 5000), name
    text = (report / "summary.md").read_text(encoding="utf-8")
    assert "leave-one-out" in text and str(run.calibration_path) in text
    assert "- lens temperature: 27.0 °C" in text  # not the raw list "[27.0, 27.0] °C"


def test_the_session_keeps_its_raw_sweeps_as_focal_stacks(calibrated: dict) -> None:
    """FOCAL_STACK_FORMAT.md: calibration sessions keep their raw sweeps in it (they kept only
    the sharpness numbers, so a session could not be re-scored)."""
    from capture.stack import FocalStack

    run = calibrated["run"]
    sweeps = run.run_dir / "calibration_session" / "sweeps"
    session = yaml.safe_load((run.run_dir / "calibration_session" / "session.yaml").read_text(encoding="utf-8"))
    curves = {round(c["distance_m"], 9): c for c in session["curves"]}
    targets = sorted(p for p in sweeps.iterdir() if p.name.startswith("target_"))
    assert len(targets) == len(curves) == 7
    for folder in targets:
        stack = FocalStack.read(folder)  # a valid focal stack, as any reader sees it
        capture = stack.meta["capture"]
        curve = curves[round(capture["target_distance_m"], 9)]
        values = [m["actuator_value"] for m in stack.slice_meta]
        # every frame of the coarse and fine sweeps, in capture order, with its score
        assert stack.n_slices == len(curve["values"]) and sorted(values) == pytest.approx(sorted(curve["values"]), abs=1e-5)
        assert [m["sharpness"] for m in stack.slice_meta] != [] and all(m["actuator_unit"] == "mA" for m in stack.slice_meta)
        assert capture["kind"] == "calibration sweep" and capture["peak_actuator_value"] == pytest.approx(curve["peak_value"], abs=1e-5)
        # focus_index: the rank by value, larger nearer (more current focuses nearer on this lens)
        assert sorted(stack.focus_index) == list(range(stack.n_slices))
        by_index = [values[i] for i in np.argsort(stack.focus_index)]
        assert by_index == sorted(by_index)
        ts = [m["timestamp_s"] for m in stack.slice_meta]
        assert ts == sorted(ts)
    breathing = FocalStack.read(sweeps / "breathing")  # the breathing sweep, with the fitted model's distances
    assert breathing.has_distances and breathing.n_slices == calibrated["config"].calibration.session.breathing_steps


def test_sweeps_are_not_kept_when_keep_sweeps_is_off(tmp_path: Path) -> None:
    config = parse_config(_config_dict(tmp_path, breathing=False, intrinsics=False, distances_m=[1.6, 1.0, 0.6], keep_sweeps=False), source="x")
    cal = run_calibration(config, interactive=False, show_progress=False)
    assert not (cal.run_dir / "calibration_session" / "sweeps").exists()


@pytest.mark.parametrize(("degree", "distances"), [(1, [1.0, 0.5]), (2, [1.5, 1.0, 0.5])])
def test_too_few_distances_are_refused_when_the_config_loads(tmp_path: Path, degree: int, distances: list) -> None:
    with pytest.raises(ConfigError, match=rf"calibration\.session.*{len(distances)} distances are too few for a degree-{degree} "
                                          rf"focus model; give at least {degree + 2}"):
        parse_config(_config_dict(tmp_path, degree=degree, distances_m=distances), source="few")


@pytest.mark.slow  # CI's 10-minute budget on the slower 2-core VMs; run with: pytest -m slow
def test_calibrated_stack_beats_the_uncalibrated_one(calibrated: dict, tmp_path: Path) -> None:
    """Same simulated rig (breathing on), default scene: the calibration (true focus map +
    breathing alignment) lowers the classical depth error."""
    from reconstruct import reconstruct_stack
    from reconstruct.metrics import depth_metrics

    doc = yaml.safe_load(SIM_YAML.read_text(encoding="utf-8"))
    doc["camera"].update(width=320, height=240, fps=240, exposure_s=0.002)
    doc["camera"]["optics"]["breathing_per_dpt"] = 0.01  # strong breathing: 2 % over the sweep
    errors = {}
    for label, cal_file in (("without", None), ("with", str(calibrated["run"].calibration_path))):
        doc["calibration"] = {"file": cal_file}
        config = parse_config(doc, source=label)
        if label == "with":  # calibrate this rig's breathing (the shared session used the default)
            session_doc = _config_dict(tmp_path / "cal2", intrinsics=False)
            session_doc["camera"]["optics"]["breathing_per_dpt"] = 0.01
            cal = run_calibration(parse_config(session_doc, source="cal2"), interactive=False, show_progress=False)
            config.calibration.file = cal.calibration_path
        with open_rig(config) as rig:
            stack = rig.capture_stack()
            truth = rig.truth()
        if label == "with":
            assert all("alignment" in m for m in stack.slice_meta)
        for method in ("classical", "dualfocus"):
            result = reconstruct_stack(stack, method=method, align="apply", precision="fp32")
            errors[label, method] = depth_metrics(result.depth, truth.depth_m, truth_valid=truth.truth_valid)["abs_rel"]
    # measured here: classical 0.130 -> 0.098, network 0.0651 -> 0.0636
    assert errors["with", "classical"] < errors["without", "classical"] - 0.01, errors
    assert errors["with", "dualfocus"] < errors["without", "dualfocus"], errors


@pytest.mark.slow  # CI's 10-minute budget on the slower 2-core VMs; run with: pytest -m slow
def test_an_interrupted_session_resumes(tmp_path: Path) -> None:
    doc = _config_dict(tmp_path, breathing=False, intrinsics=False, distances_m=[2.0, 1.2, 0.8, 0.6, 0.4])
    config = parse_config(doc, source="resume")
    _interrupt_after(config, 2)  # Ctrl-C at the third target
    state = yaml.safe_load(next(tmp_path.glob("*_sim/calibration_session/session.yaml")).read_text(encoding="utf-8"))
    assert len(state["curves"]) == 2 and not state["complete"]
    second = run_calibration(config, interactive=False, show_progress=False)
    assert second.resumed
    doc2 = yaml.safe_load(second.calibration_path.read_text(encoding="utf-8"))
    assert sorted(doc2["focus_model"]["fit"]["distances_m"]) == [0.4, 0.6, 0.8, 1.2, 2.0]
    assert len(list(tmp_path.glob("*_sim"))) == 1  # the same run folder


# ---- bad input --------------------------------------------------------------------------------------


def test_too_few_distances_says_what_to_do() -> None:
    with pytest.raises(CalibrationError, match="2 distances are too few for a degree-1 model; measure at least 3"):
        fit_focus_model([1.0, 0.5], [60.0, 90.0], unit="mA")


def test_non_monotonic_peaks_are_refused() -> None:
    with pytest.raises(CalibrationError, match="do not change monotonically"):
        fit_focus_model([2.0, 1.0, 0.7, 0.5], [60.0, 90.0, 85.0, 150.0], unit="mA")


def test_flat_curve_and_edge_peak_are_refused() -> None:
    v = np.linspace(0, 100, 15)
    with pytest.raises(CalibrationError, match="no sharpness peak"):
        refine_peak(v, np.full(15, 3.0) + 0.01 * np.sin(v), distance_m=0.8)
    with pytest.raises(CalibrationError, match="edge of the sweep"):
        refine_peak(v, np.exp(v / 20), distance_m=0.8)


def test_a_curve_blank_in_most_images_is_no_peak() -> None:
    """An object passing through an otherwise blank view (the viky simulator's ball) gave a
    curve that is zero in most images: max/median was infinite, so random "peaks" were
    accepted or reported as at the sweep's edge. Blank in over a third of the images: no peak."""
    v = np.linspace(0, 100, 25)
    s = np.zeros(25)
    s[[7, 8, 15]] = [4.0, 9.0, 2.0]  # the ball crossing the centre now and then
    with pytest.raises(CalibrationError, match=r"no sharpness peak \(22 of 25 images have no contrast"):
        refine_peak(v, s, distance_m=0.8)
    s = 0.2 + 50 * np.exp(-0.5 * ((v - 43.7) / 6) ** 2)  # a real curve: some contrast everywhere
    s[:5] = 0.0  # a few blank frames (say, a shutter) are not enough to refuse it
    assert refine_peak(v, s, distance_m=0.8) == pytest.approx(43.7, abs=1.0)


def test_peak_refinement_is_sub_step() -> None:
    v = np.linspace(0, 100, 11)  # step 10
    s = 1 + 50 * np.exp(-0.5 * ((v - 43.7) / 12) ** 2)
    assert refine_peak(v, s, distance_m=1.0) == pytest.approx(43.7, abs=1.0)


def test_textureless_target_stops_the_session(tmp_path: Path) -> None:
    from rig import calibrate as cal_mod

    doc = _config_dict(tmp_path, breathing=False, intrinsics=False)
    config = parse_config(doc, source="flat")
    real = cal_mod.SimulatedPlacer.place_texture

    def flat(self, distance_m, *, step, total):  # noqa: ANN001
        from capture.scenes import Scene

        h, w = self.camera.image_hw
        self.camera.set_scene(Scene(name="flat", radiance=np.full((h, w, 3), 0.5, np.float32), depth_m=np.full((h, w), distance_m, np.float32),
                                    truth_valid=np.ones((h, w), bool)))

    cal_mod.SimulatedPlacer.place_texture = flat
    try:
        with pytest.raises(CalibrationError, match="no sharpness peak.*textured target"):
            run_calibration(config, interactive=False, show_progress=False)
    finally:
        cal_mod.SimulatedPlacer.place_texture = real


def test_distance_outside_the_calibrated_range_is_refused() -> None:
    m = PolynomialFocusModel(coefficients_dpt=(-0.5, 0.0165, 0.0), unit="mA", valid_dpt=(0.5, 2.5))
    with pytest.raises(CalibrationError, match="outside the calibrated range 0.4-2 m"):
        m.actuator_value(5.0)
    assert math.isfinite(m.actuator_value(1.0))


def test_hardware_cannot_calibrate_non_interactively() -> None:
    raw = {"camera": {"driver": "genicam", "producer": "viky"}, "focus": {"driver": "optotune", "port": "emulator"}}
    with pytest.raises(ConfigError, match="--non-interactive: on hardware the target must be placed by a person"):
        run_calibration(parse_config(raw), interactive=False)


def test_sharpness_prefers_focused_images() -> None:
    rng = np.random.default_rng(0)
    sharp = rng.random((64, 64)).astype(np.float32)
    import cv2

    blurred = cv2.GaussianBlur(sharp, (0, 0), 2.0)
    assert sharpness(sharp) > 5 * sharpness(blurred)


def test_calibrate_mode_from_the_command_line(tmp_path: Path) -> None:
    runs = tmp_path / "lab runs, #2"  # the suggested line must stay valid YAML for such a path
    doc = _config_dict(runs, intrinsics=False, breathing=False, distances_m=[2.0, 1.0, 0.7, 0.5, 0.4])
    path = tmp_path / "rig.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    proc = subprocess.run([sys.executable, str(ROOT / "run_rig.py"), "--config", str(path), "--mode", "calibrate", "--non-interactive"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "calibration:" in proc.stdout and "use it:" in proc.stdout
    cal_path = next(runs.glob("*_sim/calibration.yaml"))
    (line,) = [ln for ln in proc.stdout.splitlines() if "use it:" in ln]
    assert yaml.safe_load(line.split("use it:", 1)[1]) == {"calibration": {"file": str(cal_path)}}
    summary = (cal_path.parent / "report" / "summary.md").read_text(encoding="utf-8")
    snippet = re.search(r"`(calibration: \{file: .*\})`", summary)
    assert snippet and yaml.safe_load(snippet.group(1)) == {"calibration": {"file": str(cal_path)}}
    config = load_config(path)
    config.calibration.file = cal_path
    with open_rig(config) as rig:
        assert isinstance(rig.focus_map, PolynomialFocusModel)


# ---- the fit's checks --------------------------------------------------------------------------------


def test_non_monotonic_peaks_name_the_step_out_of_order() -> None:
    from calibration.focus_fit import NonMonotonicPeaks

    d = [2.0, 1.2, 0.857, 0.667, 0.545, 0.462, 0.4]
    peaks = [(1 / x + 0.506) / 0.0165 for x in d]
    peaks[3] = peaks[1] - 1.0  # the target for 0.667 m was placed beyond 1.2 m
    with pytest.raises(NonMonotonicPeaks, match=r"the peak at 0\.667 m \(80\.\d+ mA\) is out of order") as info:
        fit_focus_model(d, peaks, unit="mA")
    assert info.value.distances_m == [0.667]
    # two neighbours swapped: either may be the wrong one, both are named
    with pytest.raises(NonMonotonicPeaks, match=r"the peaks at 0\.700 m .*, 0\.500 m .* are out of order") as info:
        fit_focus_model([2.0, 1.0, 0.7, 0.5, 0.4], [60.0, 90.0, 130.0, 110.0, 150.0], unit="mA")
    assert info.value.distances_m == [0.7, 0.5]


def test_a_mistyped_distance_is_named(caplog: pytest.LogCaptureFixture) -> None:
    d_true = np.array([2.0, 1.2, 0.857, 0.667, 0.545, 0.462, 0.4])
    peaks = (1 / d_true + 0.506) / 0.0165 + np.random.default_rng(0).normal(0, 0.3, d_true.size)  # 5 mdpt of peak noise
    clean = fit_focus_model(list(d_true), list(peaks), unit="mA")
    assert clean.suspects == [] and clean.to_dict()["fit"]["suspect_points"] == []
    typed = d_true.copy()
    typed[1] = 1.1  # 1.2 m entered as 1.1 m: still monotonic, leave-one-out rms 37 mdpt (under the 50 mdpt warning)
    with caplog.at_level("WARNING", logger="calibration.focus_fit"):
        fit = fit_focus_model(list(typed), list(peaks), unit="mA")
    assert [p["distance_m"] for p in fit.suspects] == [1.1]
    assert "the target at 1.100 m is 76.9 mdpt off the fit of the other points" in caplog.text
    (point,) = fit.to_dict()["fit"]["suspect_points"]
    assert point["distance_m"] == 1.1 and point["loo_error_dpt"] == pytest.approx(0.0769, abs=1e-4) and point["ratio"] > 5


def test_a_degree_2_fit_that_turns_inside_the_measured_span_is_refused() -> None:
    """Such a model maps one actuator value to two distances: a target measured at 50 mA came
    back as 37.7 mA from the inverse map, with only a suspect-point warning."""
    values = [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]
    dpt = [0.5, 1.0, 1.35, 1.55, 1.62, 1.64]
    with pytest.raises(CalibrationError, match=r"the degree-2 fit turns at 4\d\.\d+ mA, inside the measured span 0\.\.50 mA.*use degree 1"):
        fit_focus_model([1 / x for x in dpt], values, unit="mA", degree=2)
    fit_focus_model([1 / x for x in dpt[:4]], values[:4], unit="mA", degree=2)  # the bend alone, monotonic: accepted


# ---- resuming: only the same plan; a failed fit re-measures the bad step -----------------------------


def _interrupt_after(config, n_steps: int) -> None:
    from rig import calibrate as cal_mod

    calls = {"n": 0}
    real = cal_mod.SimulatedPlacer.place_texture

    def flaky(self, distance_m, *, step, total):
        calls["n"] += 1
        if calls["n"] > n_steps:
            raise KeyboardInterrupt
        return real(self, distance_m, step=step, total=total)

    cal_mod.SimulatedPlacer.place_texture = flaky
    try:
        with pytest.raises(KeyboardInterrupt):
            run_calibration(config, interactive=False, show_progress=False)
    finally:
        cal_mod.SimulatedPlacer.place_texture = real


def test_a_session_resumes_only_with_the_same_plan(tmp_path: Path) -> None:
    from capture.errors import InputError

    first = parse_config(_config_dict(tmp_path, breathing=False, intrinsics=False, distances_m=[1.8, 1.0, 0.7, 0.5, 0.4]), source="a")
    _interrupt_after(first, 2)
    (session_dir,) = tmp_path.glob("*_sim/calibration_session")
    state = yaml.safe_load((session_dir / "session.yaml").read_text(encoding="utf-8"))
    assert state["plan"]["distances_m"] == [1.8, 1.0, 0.7, 0.5, 0.4] and state["plan"]["actuator"] and state["plan"]["focus_mode"] == "mA"
    other = parse_config(_config_dict(tmp_path, breathing=False, intrinsics=False, distances_m=[2.0, 1.2, 0.8, 0.6, 0.4]), source="b")
    with pytest.raises(InputError, match="started with another plan") as info:
        run_calibration(other, interactive=False, show_progress=False)
    message = str(info.value)
    assert "\n" not in message and str(session_dir) in message and "move that folder away" in message
    assert "[0.4, 0.5, 0.7, 1.0, 1.8]" in message and "[0.4, 0.6, 0.8, 1.2, 2.0]" in message
    # an older session file (no plan): refused where its measured distances are not planned
    del state["plan"]
    (session_dir / "session.yaml").write_text(yaml.safe_dump(state), encoding="utf-8")
    with pytest.raises(InputError, match=r"measured distances \[1\.0, 1\.8\] m that the plan .* lacks"):
        run_calibration(other, interactive=False, show_progress=False)
    assert len(list(tmp_path.glob("*_sim"))) == 1


@pytest.mark.slow  # CI's 10-minute budget on the slower 2-core VMs; run with: pytest -m slow
def test_a_failed_fit_re_measures_the_bad_step(tmp_path: Path) -> None:
    from calibration.focus_fit import NonMonotonicPeaks
    from rig import calibrate as cal_mod

    config = parse_config(_config_dict(tmp_path, breathing=False, intrinsics=False, distances_m=[2.0, 1.2, 0.8, 0.6, 0.4]), source="bad")
    real = cal_mod.SimulatedPlacer.place_texture
    placed: list[float] = []

    def misplaced(self, distance_m, *, step, total):  # the 0.6 m target stood at 1.5 m
        placed.append(distance_m)
        return real(self, 1.5 if distance_m == 0.6 else distance_m, step=step, total=total)

    cal_mod.SimulatedPlacer.place_texture = misplaced
    try:
        with pytest.raises(NonMonotonicPeaks, match=r"the peak at 0\.600 m .* is out of order.*dropped the measurement at 0\.600 m"):
            run_calibration(config, interactive=False, show_progress=False)
    finally:
        cal_mod.SimulatedPlacer.place_texture = real
    state = yaml.safe_load(next(tmp_path.glob("*_sim/calibration_session/session.yaml")).read_text(encoding="utf-8"))
    assert sorted(c["distance_m"] for c in state["curves"]) == [0.4, 0.8, 1.2, 2.0] and not state["complete"]
    placed.clear()
    cal_mod.SimulatedPlacer.place_texture = lambda self, distance_m, *, step, total: (placed.append(distance_m), real(self, distance_m, step=step, total=total))[1]
    try:
        second = run_calibration(config, interactive=False, show_progress=False)
    finally:
        cal_mod.SimulatedPlacer.place_texture = real
    assert second.resumed and placed == [0.6]  # only the dropped step again
    fit = second.document["focus_model"]["fit"]
    assert sorted(fit["distances_m"]) == [0.4, 0.6, 0.8, 1.2, 2.0] and fit["rms_dpt"] < 0.01


# ---- using and replacing a calibration file --------------------------------------------------------


@pytest.mark.slow  # CI's 10-minute budget on the slower 2-core VMs; run with: pytest -m slow
def test_recalibrating_with_a_calibration_file_set(calibrated: dict, tmp_path: Path) -> None:
    doc = _config_dict(tmp_path, breathing=False, intrinsics=False, distances_m=[2.0, 1.2, 0.8, 0.6, 0.4])
    doc["calibration"]["file"] = str(calibrated["run"].calibration_path)  # its range: 0.4-2 m
    run = run_calibration(parse_config(doc, source="recal"), interactive=False, show_progress=False)
    assert run.document["session"]["actuator_span"][0] < 40.0  # the nominal map's span, wider than the old file's range
    assert len(list(tmp_path.glob("*_sim"))) == 1


def test_a_failure_before_the_session_leaves_no_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rig import calibrate as cal_mod

    def broken(*args, **kwargs):
        raise CalibrationError("no span")

    monkeypatch.setattr(cal_mod, "_actuator_span", broken)
    config = parse_config(_config_dict(tmp_path / "runs", breathing=False, intrinsics=False), source="early")
    with pytest.raises(CalibrationError, match="no span"):
        run_calibration(config, interactive=False, show_progress=False)
    assert not list((tmp_path / "runs").glob("*_sim"))


def test_the_breathing_table_accepts_what_the_focus_model_accepts(calibrated: dict) -> None:
    from calibration.alignment import BreathingModel

    doc = yaml.safe_load(calibrated["run"].calibration_path.read_text(encoding="utf-8"))
    model = load_focus_model(calibrated["run"].calibration_path)
    breathing = BreathingModel.from_dict(doc["breathing"])
    assert breathing.actuator_unit == "mA"
    lo, hi = model.valid_dpt
    for dpt in (lo - 0.99 * model.tolerance_dpt, hi + 0.99 * model.tolerance_dpt):  # just inside the focus model's tolerance
        breathing.affine_at(model.actuator_value(1.0 / dpt))
    with pytest.raises(CalibrationError, match=r"breathing model: actuator value 300 mA is outside"):
        breathing.affine_at(300.0)


def test_a_breathing_table_of_another_image_size_is_refused_before_the_sweep(calibrated: dict) -> None:
    doc = yaml.safe_load(SIM_YAML.read_text(encoding="utf-8"))
    doc["camera"].update(width=256, height=192)  # the calibration: 512x384
    doc["calibration"] = {"file": str(calibrated["run"].calibration_path)}
    with open_rig(parse_config(doc, source="roi")) as rig:
        target = rig.actuator.target
        with pytest.raises(CalibrationError) as info:
            rig.capture_stack()
        assert rig.actuator.target == target  # nothing moved
    message = str(info.value)
    assert str(calibrated["run"].calibration_path) in message and "512x384" in message and "256x192" in message


def test_a_session_waits_for_a_slow_actuator_as_long_as_its_own_move_limit(tmp_path: Path) -> None:
    """The session's focus sweeps wait at least the actuator's move_timeout_s (a stage's move
    takes seconds), as capture sweeps do; they used to stop at sweep.settle_timeout_s."""
    from calibration.session import CalibrationSession, SessionPlan
    from capture.errors import DeviceTimeout

    doc = _config_dict(tmp_path / "out")
    doc["focus"]["time_constant_s"] = 0.03  # ~0.2 s to settle after a large move
    config = parse_config(doc, source="test")
    with open_rig(config) as rig:
        lo, hi = rig.actuator.limits
        plan = SessionPlan(distances_m=[0.5, 1.0], actuator_span=(lo, hi), settle_timeout_s=0.02)
        session = CalibrationSession(rig.camera, rig.actuator, None, plan, tmp_path / "session")
        with pytest.raises(DeviceTimeout):
            session._sweep(np.array([lo, hi]), "coarse")  # a lens's limit: the long move is a timeout
        rig.actuator.move_timeout_s = 2.0  # as a stage declares it
        scores = session._sweep(np.array([lo, hi, lo]), "coarse")
    assert len(scores) == 3 and all(math.isfinite(s) for s in scores)


@pytest.mark.slow  # CI's 10-minute budget on the slower 2-core VMs; run with: pytest -m slow
def test_a_full_disk_at_the_end_keeps_the_session_and_a_rerun_writes_it_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The session was marked complete before calibration.yaml was written: a failed write was a
    traceback (exit 1), and the next run started a new session, every measurement lost."""
    import errno

    from calibration import report as report_mod
    from capture.errors import OutputError
    from rig import calibrate as cal_mod

    doc = _config_dict(tmp_path, breathing=False, intrinsics=False, distances_m=[2.0, 1.2, 0.8, 0.6, 0.4])
    config = parse_config(doc, source="disk")
    real = report_mod.write_text_atomic

    def full(path, text):
        if Path(path).name == "calibration.yaml":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, text)

    monkeypatch.setattr(report_mod, "write_text_atomic", full)
    with pytest.raises(OutputError, match=r"calibration\.yaml: cannot write \(No space left on device\); the session in .* keeps every measurement"):
        run_calibration(config, interactive=False, show_progress=False)
    monkeypatch.setattr(report_mod, "write_text_atomic", real)
    placed = []
    real_place = cal_mod.SimulatedPlacer.place_texture
    monkeypatch.setattr(cal_mod.SimulatedPlacer, "place_texture", lambda self, d, **kw: (placed.append(d), real_place(self, d, **kw))[1])
    second = run_calibration(config, interactive=False, show_progress=False)
    assert second.resumed and placed == []  # written out, nothing measured again
    assert sorted(second.document["focus_model"]["fit"]["distances_m"]) == [0.4, 0.6, 0.8, 1.2, 2.0]
    assert len(list(tmp_path.glob("*_sim"))) == 1
    # and a session that is complete with its file is not resumed: the next run is a new one
    third = run_calibration(config, interactive=False, show_progress=False)
    assert not third.resumed
    # nor one whose calibration.yaml the user moved away (its summary.yaml says it finished)
    third.calibration_path.rename(tmp_path / "moved.yaml")
    assert not run_calibration(config, interactive=False, show_progress=False).resumed


@pytest.mark.slow  # CI's 10-minute budget on the slower 2-core VMs; run with: pytest -m slow
def test_board_views_that_fail_are_set_aside_and_taken_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Intrinsics that failed (the board not found in enough views) refitted the same stored
    views on every rerun and failed the same way: the session could never finish."""
    from rig import calibrate as cal_mod

    doc = _config_dict(tmp_path, breathing=False, intrinsics=True, board_views=5, distances_m=[2.0, 1.2, 0.8, 0.6, 0.4])
    config = parse_config(doc, source="board")
    real_board = cal_mod.SimulatedPlacer.place_board
    monkeypatch.setattr(cal_mod.SimulatedPlacer, "place_board", lambda self, view, *, total: None)  # no board in view
    with pytest.raises(CalibrationError, match=r"found in 0 of 5 images.*set those 5 views aside \(intrinsics_views_rejected_.*run the calibration again to take new board views"):
        run_calibration(config, interactive=False, show_progress=False)
    session_dir = next(tmp_path.glob("*_sim/calibration_session"))
    assert yaml.safe_load((session_dir / "session.yaml").read_text(encoding="utf-8"))["board_views_done"] == 0
    assert len(list(session_dir.glob("intrinsics_views_rejected_*/view_*.png"))) == 5
    monkeypatch.setattr(cal_mod.SimulatedPlacer, "place_board", real_board)
    second = run_calibration(config, interactive=False, show_progress=False)
    assert second.resumed and "intrinsics" in second.document


@pytest.mark.slow  # CI's 10-minute budget on the slower 2-core VMs; run with: pytest -m slow
def test_board_views_taken_with_a_wrong_board_size_are_kept_and_fitted_after_the_fix(tmp_path: Path) -> None:
    """Board settings that count squares instead of inner corners: the views are good, so the
    session keeps them and names the size that fits; the rerun with it fits them without new views."""
    doc = _config_dict(tmp_path, breathing=False, intrinsics=True, board_views=5, distances_m=[2.0, 1.2, 0.8, 0.6, 0.4])
    good = dict(doc["calibration"]["session"]["board"])
    doc["calibration"]["session"]["board"] = {**good, "cols": good["cols"] + 1, "rows": good["rows"] + 1}
    with pytest.raises(CalibrationError, match=rf"calibration\.session\.board: .*but a {good['cols']}x{good['rows']} one was.*keeps its 5 board views"):
        # the simulated placer draws the board the config names: draw the true one, count it wrong
        _run_with_board(doc, good)
    session_dir = next(tmp_path.glob("*_sim/calibration_session"))
    assert yaml.safe_load((session_dir / "session.yaml").read_text(encoding="utf-8"))["board_views_done"] == 5
    assert not list(session_dir.glob("intrinsics_views_rejected_*"))
    doc["calibration"]["session"]["board"] = good
    second = run_calibration(parse_config(doc, source="board"), interactive=False, show_progress=False)
    assert second.resumed and "intrinsics" in second.document


def _run_with_board(doc: dict, board: dict):
    """run_calibration with the config's board settings, the simulated placer drawing ``board``."""
    from rig import calibrate as cal_mod

    real_init = cal_mod.SimulatedPlacer.__init__

    def init(self, camera, *, board_cols, board_rows, **kw):
        real_init(self, camera, board_cols=board["cols"], board_rows=board["rows"], **kw)

    cal_mod.SimulatedPlacer.__init__ = init
    try:
        return run_calibration(parse_config(doc, source="board"), interactive=False, show_progress=False)
    finally:
        cal_mod.SimulatedPlacer.__init__ = real_init


def test_a_session_state_that_cannot_be_saved_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from calibration import session as session_mod
    from capture.errors import OutputError

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(session_mod, "write_text_atomic", full)
    config = parse_config(_config_dict(tmp_path, breathing=False, intrinsics=False), source="state")
    with pytest.raises(OutputError, match=r"session\.yaml: cannot save the calibration session \(No space left on device\)"):
        run_calibration(config, interactive=False, show_progress=False)


@pytest.mark.slow  # CI's 10-minute budget on the slower 2-core VMs; run with: pytest -m slow
def test_board_views_without_a_known_distance_are_taken_in_focus_mid_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A person at the bench holds the board where the placer cannot say (place_board returns
    None): focus stayed wherever the last sweep left it, at one end of the range, so the board
    was blurred (after a breathing sweep, at 512x384: fx 0.8 % off, 3x the reprojection error). Now focus is set to
    the middle of the calibrated range, and the bench prompt says where to hold the board."""
    from rig import calibrate as cal_mod

    real = cal_mod.SimulatedPlacer.place_board
    monkeypatch.setattr(cal_mod.SimulatedPlacer, "place_board", lambda self, view, *, total: (real(self, view, total=total), None)[1])
    doc = _config_dict(tmp_path, size=(512, 384), breathing=False, intrinsics=True, board_views=6, distances_m=[2.0, 1.2, 0.8, 0.6, 0.4])
    config = parse_config(doc, source="board")
    run = run_calibration(config, interactive=False, show_progress=False)
    intr = run.document["intrinsics"]
    true_fx = config.camera.optics.focal_length_mm / (config.camera.optics.pixel_pitch_um / 1000.0)
    assert intr["fx_px"] == pytest.approx(true_fx, rel=0.003) and intr["rms_reprojection_px"] < 0.1, intr
    # and a person is told where that is
    asked = []
    placer = cal_mod.HumanPlacer(lambda prompt: asked.append(prompt) or "")
    placer.board_focus_m = 0.667
    assert placer.place_board(0, total=6) is None and "about 0.67 m from the lens datum" in asked[0]


def test_a_peak_at_the_edge_of_the_sweep_names_the_span_and_what_sets_it(tmp_path: Path) -> None:
    """'widen the actuator sweep' named no setting: the message now gives the span swept and
    that focus.nominal (with the actuator's limits) sets it."""
    from calibration.session import CalibrationSession, SessionPlan

    config = parse_config(_config_dict(tmp_path / "out"), source="edge")
    with open_rig(config) as rig:
        near_ma = rig.focus_map.actuator_value(0.4)
        span = (near_ma - 20.0, near_ma + 20.0)  # around 0.4 m: a target at 2 m peaks at one edge
        plan = SessionPlan(distances_m=[2.0, 0.4], actuator_span=span, coarse_steps=9)
        session = CalibrationSession(rig.camera, rig.actuator, None, plan, tmp_path / "session")
        with pytest.raises(CalibrationError, match=r"^target at 2\.000 m: the sharpness peak is at the \w+ edge of the sweep "
                                                   r"\(.* mA: the span focus\.nominal gives .*check the target's distance, then focus\.nominal"):
            session.measure_distance(2.0)
        # without a nominal model the sweep is the actuator's whole limits: focus.nominal is not to blame
        plan.span_from_nominal = False
        with pytest.raises(CalibrationError, match=r"edge of the sweep \(.* mA: .*whole limits, without a focus\.nominal\)"):
            session.measure_distance(2.0)


def test_every_fine_sweep_point_is_approached_in_the_sweeps_direction(tmp_path: Path) -> None:
    """The coarse sweep ends at the top of the span; the fine sweep's first point was then
    approached from above and the rest from below (a stage's backlash shifts that one point)."""
    from calibration.session import CalibrationSession, SessionPlan

    config = parse_config(_config_dict(tmp_path / "out"), source="direction")
    with open_rig(config) as rig:
        lo = rig.focus_map.actuator_value(2.5)
        hi = rig.focus_map.actuator_value(0.35)
        plan = SessionPlan(distances_m=[1.0, 0.5], actuator_span=(min(lo, hi), max(lo, hi)), coarse_steps=17, fine_steps=7)
        session = CalibrationSession(rig.camera, rig.actuator, None, plan, tmp_path / "session")
        moves: list[float] = []
        real_move = rig.actuator.move_to
        rig.actuator.move_to = lambda value: (moves.append(float(value)), real_move(value))[1]  # type: ignore[method-assign]
        session.measure_distance(1.0)
    fine = moves[plan.coarse_steps:]
    approach, points = fine[0], fine[1:]
    assert len(points) == plan.fine_steps and approach < points[0]
    assert all(b > a for a, b in zip(points, points[1:]))


def test_a_nominal_model_that_does_not_fit_the_focus_mode_is_refused_by_calibrate_too(tmp_path: Path) -> None:
    """In focal-power mode a current-mode focus.nominal must be refused by calibrate as by single
    (calibrate warned there was no nominal model, then refused when opening the rig; with the
    rig opened without a focus map for nominal-less stages it would have swept everything)."""
    from capture.errors import ConfigError

    doc = _config_dict(tmp_path)
    doc["camera"] = {"driver": "genicam", "producer": "viky"}
    doc["focus"] = {"driver": "optotune", "port": "emulator", "mode": "focal_power", "nominal": {"offset_dpt": -0.5, "dpt_per_ma": 0.0165}}
    with pytest.raises(ConfigError, match=r"^focus\.nominal: offset_dpt and dpt_per_ma describe the lens in current mode"):
        run_calibration(parse_config(doc, source="fp"), interactive=True, show_progress=False, ask=lambda prompt: "")
    assert not any(tmp_path.iterdir())


# ---- sessions that could not go on: a target never moved, nothing measured, another image size -------


@pytest.mark.slow  # CI's 10-minute budget on the slower 2-core VMs; run with: pytest -m slow
def test_a_target_that_never_moves_is_refused_and_measured_anew(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Peaks that stay put while the targets (should) go from 2 m to 0.4 m: the session wrote a
    calibration with a slope of -20 dpt/mA (the lens's is +0.017) and exited 0."""
    from calibration.session import ImplausiblePeaks
    from rig import calibrate as cal_mod

    config = parse_config(_config_dict(tmp_path, breathing=False, intrinsics=False, distances_m=[2.0, 1.0, 0.6, 0.4]), source="stuck")
    real = cal_mod.SimulatedPlacer.place_texture
    monkeypatch.setattr(cal_mod.SimulatedPlacer, "place_texture",
                        lambda self, distance_m, *, step, total: real(self, 0.8, step=1, total=total))  # always the same place
    with pytest.raises(ImplausiblePeaks, match=r"the sharpness peaks do not follow the targets: .* mA for targets at 0\.4\.\.2 m, "
                       r"where focus.nominal expects .*was the target moved.*dropped these 4 measurements") as info:
        run_calibration(config, interactive=False, show_progress=False)
    assert "\n" not in str(info.value)
    (run_dir,) = tmp_path.glob("*_sim")
    assert not (run_dir / "calibration.yaml").exists()
    state = yaml.safe_load((run_dir / "calibration_session" / "session.yaml").read_text(encoding="utf-8"))
    assert state["curves"] == [] and not state["complete"]
    monkeypatch.setattr(cal_mod.SimulatedPlacer, "place_texture", real)  # the targets placed: measured anew, and good
    again = run_calibration(config, interactive=False, show_progress=False)
    assert again.resumed and again.document["focus_model"]["fit"]["rms_dpt"] < 0.01


@pytest.mark.slow  # CI's 10-minute budget on the slower 2-core VMs; run with: pytest -m slow
def test_a_session_that_measured_nothing_takes_the_new_plan(tmp_path: Path) -> None:
    first = parse_config(_config_dict(tmp_path, breathing=False, intrinsics=False, distances_m=[80.0, 120.0, 160.0]), source="cm")
    _interrupt_after(first, 0)  # stopped before its first measurement (as a session that failed at its first target)
    fixed = parse_config(_config_dict(tmp_path, breathing=False, intrinsics=False, distances_m=[1.6, 1.2, 0.8, 0.5]), source="m")
    cal = run_calibration(fixed, interactive=False, show_progress=False)
    assert cal.resumed and sorted(cal.document["focus_model"]["fit"]["distances_m"]) == [0.5, 0.8, 1.2, 1.6]
    assert len(list(tmp_path.glob("*_sim"))) == 1
    as_run = yaml.safe_load((cal.run_dir / "config.yaml").read_text(encoding="utf-8"))  # the config as run, not the first try's
    assert as_run["calibration"]["session"]["distances_m"] == [1.6, 1.2, 0.8, 0.5]


def test_a_session_is_not_continued_at_another_image_size(tmp_path: Path) -> None:
    from capture.errors import InputError

    first = parse_config(_config_dict(tmp_path, breathing=False, intrinsics=False, distances_m=[1.6, 1.0, 0.6]), source="a")
    _interrupt_after(first, 1)
    other = parse_config(_config_dict(tmp_path, size=(256, 192), breathing=False, intrinsics=False, distances_m=[1.6, 1.0, 0.6]), source="b")
    with pytest.raises(InputError, match=r"started with another plan \(image size 320x240 px, now 256x192 px\)"):
        run_calibration(other, interactive=False, show_progress=False)


def test_the_simulated_rig_prompts_and_moves_its_target_itself(tmp_path: Path) -> None:
    """Without --non-interactive the simulated rig prompted for each target, which nobody can
    move: the session measured one place again and again."""
    config = parse_config(_config_dict(tmp_path, breathing=False, intrinsics=False, distances_m=[1.6, 1.0, 0.6, 0.4]), source="prompted")
    prompts: list[str] = []
    cal = run_calibration(config, interactive=True, show_progress=False, ask=lambda text: prompts.append(text) or "")
    assert len(prompts) == 4 and "Place the textured target at 1.600 m" in prompts[0]
    assert cal.document["focus_model"]["fit"]["rms_dpt"] < 0.01


def test_a_narrow_range_of_targets_is_calibrated(tmp_path: Path) -> None:
    """Targets 0.8-1.2 m: the coarse span's 30 % margin (0.13 dpt) is narrower than the sharpness
    curve, so the far target's peak sat at the edge of the sweep and the session stopped there,
    blaming focus.nominal. The sweep now goes on past that edge."""
    config = parse_config(_config_dict(tmp_path, breathing=False, intrinsics=False, distances_m=[1.2, 1.0, 0.8]), source="narrow")
    cal = run_calibration(config, interactive=False, show_progress=False)
    fit = cal.document["focus_model"]["fit"]
    assert sorted(fit["distances_m"]) == [0.8, 1.0, 1.2] and fit["rms_dpt"] < 0.01


def test_a_sweep_beyond_the_calibrated_range_is_refused_before_a_run_folder(calibrated: dict, tmp_path: Path) -> None:
    """It was refused by the sweep, after the devices opened, leaving a run folder with an empty
    .incomplete stack."""
    from rig.single import run_single

    doc = dict(calibrated["doc"], output={"dir": str(tmp_path / "runs")}, calibration={"file": str(calibrated["run"].calibration_path)})
    doc["sweep"] = dict(doc["sweep"], range_m=[0.3, 2.0])
    with pytest.raises(ConfigError, match=r"^sweep\.range_m: focus distance 0\.3\d* m is outside the calibrated range 0\.4-2 m.*"
                                          r"\(calibration\.file .*calibration\.yaml\)$"):
        run_single(parse_config(doc, source="wide"), show_progress=False)
    assert not (tmp_path / "runs").exists()


def test_a_damaged_breathing_table_names_the_file_before_a_run_folder(calibrated: dict, tmp_path: Path) -> None:
    from rig.single import run_single

    cal = yaml.safe_load(calibrated["run"].calibration_path.read_text(encoding="utf-8"))
    cal["breathing"]["affines"] = cal["breathing"]["affines"][:-1]  # one affine short
    damaged = tmp_path / "calibration.yaml"
    damaged.write_text(yaml.safe_dump(cal), encoding="utf-8")
    doc = dict(calibrated["doc"], output={"dir": str(tmp_path / "runs")}, calibration={"file": str(damaged)})
    with pytest.raises(ConfigError, match=rf"^{damaged}: breathing: need one 2x3 affine per actuator value"):
        run_single(parse_config(doc, source="damaged"), show_progress=False)
    assert not (tmp_path / "runs").exists()


def test_a_run_records_which_calibration_made_its_distances(calibrated: dict, tmp_path: Path) -> None:
    """The calibration file was named only in the run's config.yaml: a stack copied elsewhere
    did not say which calibration made its distances."""
    import hashlib

    from rig.single import run_single

    path = calibrated["run"].calibration_path
    doc = dict(calibrated["doc"], output={"dir": str(tmp_path / "runs")}, calibration={"file": str(path)})
    doc["reconstruct"] = dict(doc["reconstruct"], method="classical")
    run = run_single(parse_config(doc, source="with-calibration"), show_progress=False)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    capture = yaml.safe_load((run.run_dir / "stacks" / "000000" / "stack.yaml").read_text(encoding="utf-8"))["capture"]
    assert capture["calibration_file"] == str(path) and capture["calibration_sha256"] == sha
    summary = yaml.safe_load((run.run_dir / "summary.yaml").read_text(encoding="utf-8"))
    assert summary["calibration"] == {"file": str(path), "sha256": sha}


@pytest.mark.slow  # CI's 10-minute budget on the slower 2-core VMs; run with: pytest -m slow
def test_a_nominal_model_with_the_wrong_sign_keeps_good_measurements(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A focus.nominal whose direction is reversed (a sign slip, likely on a stage) covers the
    same span: the peaks, measured right, were refused and dropped on every run."""
    doc = _config_dict(tmp_path, breathing=False, intrinsics=False, distances_m=[2.0, 1.0, 0.6, 0.4])
    doc["focus"]["nominal"] = {"offset_dpt": 3.49, "dpt_per_ma": -0.0166}  # the default rises; this one falls over the same span
    with caplog.at_level("WARNING", logger="calibration.session"):
        cal = run_calibration(parse_config(doc, source="reversed"), interactive=False, show_progress=False)
    assert cal.document["focus_model"]["fit"]["rms_dpt"] < 0.01
    assert cal.document["focus_model"]["coefficients_dpt"][1] > 0  # the lens's true direction, measured
    assert "move the other way than focus.nominal says" in caplog.text
    # the kept sweeps were ranked by the reversed nominal, then re-ranked by the fitted model: larger index, nearer focus
    from capture.stack import FocalStack

    for folder in sorted((cal.run_dir / "calibration_session" / "sweeps").glob("target_*")):
        stack = FocalStack.read(folder)
        values = [m["actuator_value"] for m in stack.slice_meta]
        assert [values[i] for i in np.argsort(stack.focus_index)] == sorted(values)  # more current focuses nearer on this lens
        assert stack.meta["capture"]["focus_index_from"].endswith("(the fitted focus model)")
