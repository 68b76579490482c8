"""Build the devices a config names, and open them together as a :class:`Rig`.

>>> from rig import load_config, open_rig                  # doctest: +SKIP
>>> with open_rig(load_config("configs/sim.yaml")) as rig:  # doctest: +SKIP
...     stack = rig.capture_stack()
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from calibration.focus_model import FocusModel, LiquidLensFocusModel, load_focus_model
from capture.devices import Camera, FocusActuator
from capture.errors import CalibrationError, ConfigError, DeviceError, RigError, reworded
from capture.optics import SensorModel, ThinLens
from capture.scenes import Scene, procedural_scene, rgbd_scene
from capture.simulated import SimulatedCamera, SimulatedLiquidLens, TrueLensModel
from capture.stack import FocalStack
from capture.sweep import SweepInterrupted, plan_focus_distances, sweep
from capture.yaml_load import load_yaml
from rig.config import RgbdSceneConfig, RigConfig, check_calibration_file, config_to_dict

logger = logging.getLogger(__name__)

#: The continuous sweep style restarts the actuator's triangle this often (seconds): the phase of
#: a running triangle is known from the host time its start was acknowledged, and the driver's
#: oscillator drifts against the host clock (50 ppm at 2 Hz is 0.1 period after ~17 min);
#: restarting re-synchronises it (at 50 ppm, 60 s is at most 3 ms of drift, about 1 % of a ramp).
TRIANGLE_RESTART_S = 60.0

__all__ = ["Rig", "open_rig", "build_scene", "check_focus_map"]


def build_scene(camera_cfg: Any) -> Scene:
    """The simulated camera's scene, at the camera's resolution."""
    sc = camera_cfg.scene
    if isinstance(sc, RgbdSceneConfig):
        return rgbd_scene(
            sc.image, depth_path=sc.depth, depth_unit_m=sc.depth_unit_m, disparity_path=sc.disparity,
            disparity_divisor=sc.disparity_divisor, range_m=sc.range_m, width=camera_cfg.width, height=camera_cfg.height,
        )
    return procedural_scene(camera_cfg.width, camera_cfg.height, near_m=sc.near_m, far_m=sc.far_m, seed=sc.seed)


def _build_simulated(config: RigConfig) -> tuple[SimulatedCamera, SimulatedLiquidLens]:
    cam, foc = config.camera, config.focus
    optics = ThinLens(
        focal_length_mm=cam.optics.focal_length_mm, f_number=cam.optics.f_number,
        pixel_pitch_um=cam.optics.pixel_pitch_um, base_focus_m=cam.optics.base_focus_m,
    )
    lens = SimulatedLiquidLens(
        true_model=TrueLensModel(
            offset_dpt=foc.actual.offset_dpt, dpt_per_ma=foc.actual.dpt_per_ma,
            drift_dpt_per_c=foc.actual.drift_dpt_per_c, temperature_c=foc.actual.temperature_c,
        ),
        base_focus_m=cam.optics.base_focus_m,
        time_constant_s=foc.time_constant_s,
        settle_tolerance_ma=foc.settle_tolerance_ma,
        current_limits_ma=foc.current_limits_ma,
        park_current_ma=foc.park_current_ma,
    )
    camera = SimulatedCamera(
        scene=build_scene(cam), lens=optics, focus_dpt_at=lens.true_focus_dpt_at, fps=cam.fps,
        exposure_s=cam.exposure_s, gain_db=cam.gain_db, pixel_format=cam.pixel_format,
        sensor=SensorModel(
            full_well_e=cam.noise.full_well_e, read_noise_e=cam.noise.read_noise_e,
            electrons_per_s=cam.noise.electrons_per_s, adc_bits=cam.noise.adc_bits, noise=cam.noise.enabled,
        ),
        breathing_per_dpt=cam.optics.breathing_per_dpt, breathing_reference_dpt=cam.optics.breathing_reference_dpt,
        seed=cam.seed,
    )
    return camera, lens


def _build_genicam_camera(config: RigConfig) -> Camera:
    from capture.genicam_camera import GenicamCamera

    cam = config.camera
    roi = None if cam.roi is None else (cam.roi.x, cam.roi.y, cam.roi.width, cam.roi.height)
    return GenicamCamera(
        producer=cam.producer, serial_number=cam.serial_number, device_id=cam.id, index=cam.index,
        pixel_format=cam.pixel_format, exposure_s=cam.exposure_s, gain_db=cam.gain_db, roi=roi,
        trigger=cam.trigger, trigger_source=cam.trigger_source, frame_rate_hz=cam.frame_rate_hz,
        fetch_timeout_s=cam.fetch_timeout_s, num_buffers=cam.num_buffers,
    )


def _build_actuator(config: RigConfig, camera: Camera) -> FocusActuator:
    foc = config.focus
    if foc.driver == "optotune":
        from capture.optotune import OptotuneLensDriver

        return OptotuneLensDriver(
            foc.port, mode=foc.mode, park_current_ma=foc.park_current_ma, timeout_s=foc.timeout_s,
            retries=foc.retries, settle_time_s=foc.settle_time_s, temperature_limits_c=foc.temperature_limits_c,
        )
    if foc.driver == "gcode":
        from capture.gcode import GcodeFocusStage

        return GcodeFocusStage(
            foc.port, flavor=foc.flavor, axis=foc.axis, home_on_start=foc.home_on_start, limits_mm=foc.limits_mm,
            feed_mm_min=foc.feed_mm_min, timeout_s=foc.timeout_s, move_timeout_s=foc.move_timeout_s, baudrate=foc.baudrate,
        )
    if foc.driver == "genicam":
        from capture.genicam_camera import GenicamCamera
        from capture.genicam_focus import GenicamFocus

        if not isinstance(camera, GenicamCamera):
            raise ConfigError("focus.driver: genicam focus needs camera.driver: genicam (it uses the camera's lens controller)")
        return GenicamFocus(lambda: camera.node_map, controller=foc.controller, feature=foc.feature, settle_time_s=foc.settle_time_s, lock=camera.lock)
    raise ConfigError(f"focus.driver: simulated focus only drives the simulated camera; camera.driver is {config.camera.driver!r}")


def _build_devices(config: RigConfig) -> tuple[Camera, FocusActuator]:
    """The (camera, actuator) pair a config names, not yet opened."""
    if config.camera.driver == "simulated":
        if config.focus.driver != "simulated":
            raise ConfigError(f"focus.driver: the simulated camera needs the simulated focus (it renders the lens's focus); got {config.focus.driver!r}")
        return _build_simulated(config)
    if config.camera.driver == "genicam":
        camera = _build_genicam_camera(config)
        return camera, _build_actuator(config, camera)
    raise ConfigError(f"camera.driver: no builder for {config.camera.driver!r}")


@dataclass
class Rig:
    """An opened camera + focus actuator + focus map, with the sweep the config describes."""

    config: RigConfig
    camera: Camera
    actuator: FocusActuator
    focus_map: FocusModel | None  # None only for a calibration session without a nominal model
    breathing: Any = None  # calibration.alignment.BreathingModel from the calibration file, if any
    wave: Any = field(default=None, repr=False)  # capture.periodic.TriangleWave while a continuous sweep runs
    _config_sha256: str | None = field(default=None, repr=False)  # computed on the first stack
    _calibration: dict[str, str] | None = field(default=None, repr=False)

    def planned_distances_m(self) -> np.ndarray:
        return planned_distances_m(self.config)

    def capture_stack(self, *, progress: Callable[[int, int], None] | None = None) -> FocalStack:
        """Sweep focus once and return the stack (far to near)."""
        s = self.config.sweep
        optics = getattr(self.config.camera, "optics", None)
        meta: dict[str, Any] = {"capture": {"rig": self.config.name, "camera": self.camera.name, "focus": self.actuator.name,
                                            **self._provenance()}}
        if optics is not None:
            meta["optics"] = {"focal_length_mm": optics.focal_length_mm, "f_number": optics.f_number, "pixel_pitch_um": optics.pixel_pitch_um}
        if isinstance(self.camera, SimulatedCamera):
            meta["datum"] = "thin_lens"
        for role, device in (("camera_identity", self.camera), ("focus_identity", self.actuator)):
            identity = getattr(device, "identity", None)
            if identity:
                meta["capture"][role] = {str(k): str(v) for k, v in identity.items()}
        if self.breathing is not None:  # before the sweep: a size mismatch is known without moving
            self._check_breathing_size(self.camera.image_hw)
        if s.style == "continuous":
            stack = self._capture_continuous(meta)
            if progress is not None:
                progress(stack.n_slices, stack.n_slices)
        else:
            stack = sweep(
                self.camera, self.actuator, self.focus_map, self.planned_distances_m(),
                wait_settled=s.wait_settled, settle_timeout_s=s.settle_timeout_s, progress=progress, meta=meta,
            )
        if self.breathing is not None:
            # per-slice affines from the calibrated breathing, through its checked path; images stay as captured
            self._check_breathing_size(stack.image_hw)
            stack = self.breathing.align_stack(stack)
        return stack

    def _provenance(self) -> dict[str, str]:
        """FOCAL_STACK_FORMAT.md's capture provenance: the start time (UTC ISO 8601), the
        resolved config's hash (sha256 of config.yaml's content, keys sorted), and the
        calibration file used with its hash."""
        if self._config_sha256 is None:
            text = yaml.safe_dump(config_to_dict(self.config), sort_keys=True, allow_unicode=True)
            self._config_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
            self._calibration = calibration_record(self.config)
        out = {"started_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "config_sha256": self._config_sha256}
        if self._calibration is not None:
            out["calibration_file"] = self._calibration["file"]
            out["calibration_sha256"] = self._calibration["sha256"]
        return out

    def _check_breathing_size(self, image_hw: tuple[int, int]) -> None:
        """The breathing table's affines are in pixels of its calibration images: refuse
        another image size (a scale about another centre is a shift here)."""
        h, w = (int(x) for x in image_hw)
        ch, cw = self.breathing.image_hw
        if h > 0 and w > 0 and (h, w) != (ch, cw):
            raise CalibrationError(
                f"{self.config.calibration.file}: its breathing table was calibrated at {cw}x{ch} px (width x height), "
                f"the camera delivers {w}x{h} px; recalibrate at this size, or set the camera's size back"
            )

    def _capture_continuous(self, meta: dict[str, Any]) -> FocalStack:
        """One stack from one ramp of the actuator's triangle sweep (started on first use)."""
        from capture.periodic import capture_continuous_stack, lag_estimate_s, start_triangle_sweep, triangle_bounds

        s = self.config.sweep
        lag_s = s.lag_s if s.lag_s is not None else lag_estimate_s(self.actuator)
        if lag_s is None:
            raise ConfigError(f"sweep.lag_s: {self.actuator.name} has no lag estimate of its own; measure the lens lag and set sweep.lag_s")
        distances = self.planned_distances_m()
        range_m = (float(np.min(distances)), float(np.max(distances)))
        if self.wave is not None and time.monotonic() - self.wave.t0_host_s > TRIANGLE_RESTART_S:
            logger.debug("restarting the triangle sweep (phase re-synchronised every %.0f s)", TRIANGLE_RESTART_S)
            self.wave = None
        if self.wave is None:
            guard_s = min(3.0 * lag_s, 0.1 / s.frequency_hz)  # the turns outside the range, at most 40 % of a ramp
            try:
                temperature_c = self.actuator.temperature_c()  # the focus map's temperature term
                lower, upper = triangle_bounds(self.focus_map, range_m, frequency_hz=s.frequency_hz, guard_s=guard_s,
                                               limits=self.actuator.limits, temperature_c=temperature_c)
                self.wave = start_triangle_sweep(self.actuator, lower, upper, s.frequency_hz)
            except DeviceError as exc:  # a sweep cut short before its first slice: reconnectable like any other
                raise SweepInterrupted(f"{self.actuator.name}: could not start the triangle sweep ({exc})", cause=exc,
                                       frames=[], distances_m=[], slice_meta=[]) from exc
        return capture_continuous_stack(
            self.camera, self.actuator, self.focus_map, wave=self.wave, lag_s=lag_s, n_slices=len(distances),
            direction="either", range_m=range_m, timeout_s=2.0 / s.frequency_hz + 2.0, meta=meta,
        )

    def truth(self) -> Scene | None:
        """The true scene where the camera is simulated (for accuracy figures), else None."""
        return self.camera.scene if isinstance(self.camera, SimulatedCamera) else None

    def close(self) -> None:
        errors: list[BaseException] = []
        for device in (self.actuator, self.camera):
            try:
                device.close()
            except Exception as exc:  # close everything, then report the first failure
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # an error is already on its way: a failing close (the port is gone) must not replace it
            self.close()
        except Exception as close_exc:
            logger.warning("while stopping after an error, closing the rig also failed: %s", close_exc)


def planned_distances_m(config: RigConfig) -> np.ndarray:
    """The sweep's focus distances (metres) as ``sweep`` in the config plans them."""
    s = config.sweep
    return plan_focus_distances(range_m=s.range_m, slices=s.slices, distances_m=s.distances_m)


def calibration_record(config: RigConfig) -> dict[str, str] | None:
    """``{"file": path, "sha256": checksum}`` of the calibration file a run uses (None without
    one): which calibration made a stack's distances, for its stack.yaml and the run summary."""
    path = config.calibration.file
    if path is None:
        return None
    try:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as exc:
        raise ConfigError(f"calibration.file: {path}: cannot read ({exc.strerror or exc})") from exc
    return {"file": str(path), "sha256": digest}


def check_reconstruction(config: RigConfig) -> None:
    """:func:`reconstruct.api.check_ready` for the config's ``reconstruct`` section, before any
    capture; a weights file that is missing or unreadable is named as ``reconstruct.weights``
    (the loader names the file alone)."""
    from reconstruct.api import check_ready

    rc = config.reconstruct
    try:
        check_ready(rc.method, model=rc.model, weights=rc.weights, backend=rc.backend, precision=rc.precision)
    except RigError as exc:
        if rc.weights is None or not str(exc).startswith(str(rc.weights)):
            raise
        raise reworded(exc, f"reconstruct.weights: {exc}") from exc


def check_focus_map(config: RigConfig) -> None:
    """Fail before a run folder exists if the config's focus map cannot be built (a calibration
    file that does not fit, a nominal model that does not fit the focus mode) or its camera and
    focus drivers cannot go together: one ConfigError."""
    _check_driver_pair(config)
    focus_map = _focus_map(config)
    _check_plan_within_calibrated_range(config, focus_map)
    _breathing(config, _calibration_doc(config))  # a breathing table that cannot be read: named now, not after the devices open
    _check_plan_within_stage_limits(config, focus_map)
    unit = _configured_unit(config)
    if config.calibration.file is not None and focus_map.unit and unit and focus_map.unit != unit:
        foc = config.focus
        moves = f"focus.driver {foc.driver}" + (f" in focus.mode {foc.mode}" if hasattr(foc, "mode") else "")
        raise ConfigError(
            f"{config.calibration.file}: focus_model is in {focus_map.unit}, but {moves} moves in {unit}: calibrate in this set-up "
            "(run_rig.py --mode calibrate) or use a calibration file made in it"
        )


def _check_plan_within_calibrated_range(config: RigConfig, focus_map: FocusModel) -> None:
    """With ``calibration.file``: a sweep plan reaching outside the calibrated range is refused
    before a run folder exists (the sweep refused it only after the devices opened, leaving an
    empty ``.incomplete`` stack)."""
    if config.calibration.file is None:
        return
    s = config.sweep
    for d in planned_distances_m(config):
        try:
            focus_map.actuator_value(float(d))
        except CalibrationError as exc:
            field = "sweep.distances_m" if s.distances_m is not None else "sweep.range_m"
            raise ConfigError(f"{field}: {exc} (calibration.file {config.calibration.file})") from exc


def _check_plan_within_stage_limits(config: RigConfig, focus_map: FocusModel) -> None:
    """A stage with ``focus.limits_mm`` set: the sweep's planned positions are known before it
    opens, so a plan beyond the limits is refused before the stage homes (a physical move) and
    before a run folder exists. (A lens's limits come from the device: checked after it opens.)"""
    foc = config.focus
    if foc.driver != "gcode" or foc.limits_mm is None:
        return
    distances = planned_distances_m(config)
    lo, hi = foc.limits_mm
    try:
        values = [float(focus_map.actuator_value(float(d))) for d in distances]
    except RigError:
        return  # outside a calibrated range: the run's own checks say so
    bad = [(float(d), v) for d, v in zip(distances, values, strict=True) if not (math.isfinite(v) and lo <= v <= hi)]
    if bad:
        d, v = bad[0]
        raise ConfigError(
            f"sweep.range_m: focus distance {d:.4g} m needs the stage at {v:.4g} mm, outside focus.limits_mm [{lo:g}, {hi:g}] mm "
            f"({len(bad)} of {len(values)} planned slices); narrow sweep.range_m, or check focus.nominal or calibration.file"
        )


def _configured_unit(config: RigConfig) -> str | None:
    """The focus actuator's unit as the config sets it (None: found when the device opens)."""
    foc = config.focus
    if foc.driver == "optotune":
        return "dpt" if foc.mode == "focal_power" else "mA"
    return {"simulated": "mA", "gcode": "mm"}.get(foc.driver)


def _check_driver_pair(config: RigConfig) -> None:
    if config.camera.driver == "simulated" and config.focus.driver != "simulated":  # before the focus model's own checks
        raise ConfigError(f"focus.driver: the simulated camera needs the simulated focus (it renders the lens's focus); got {config.focus.driver!r}")


def _focus_map(config: RigConfig) -> FocusModel:
    """Metres <-> actuator value: the calibration file where the config names one, else the
    focus section's nominal model (in the actuator's unit)."""
    if config.calibration.file is not None:
        check_calibration_file(config)
        return load_focus_model(config.calibration.file)
    optics = getattr(config.camera, "optics", None)
    base = optics.base_focus_m if optics is not None else float("inf")
    foc = config.focus
    nominal = getattr(foc, "nominal", None)
    if foc.driver in ("simulated", "optotune") and getattr(foc, "mode", "current") == "current":
        if nominal is None:
            raise ConfigError(f"focus.nominal: the {foc.driver} lens in current mode needs a nominal model (offset_dpt, dpt_per_ma) or calibration.file")
        return LiquidLensFocusModel(offset_dpt=nominal.offset_dpt, dpt_per_ma=nominal.dpt_per_ma, base_focus_m=base)
    unit = {"optotune": "dpt", "gcode": "mm"}.get(foc.driver, "")
    if nominal is not None and not hasattr(nominal, "dpt_per_unit"):  # a current-mode model (dpt_per_ma) in focal_power mode
        raise ConfigError(
            f"focus.nominal: offset_dpt and dpt_per_ma describe the lens in current mode; in {getattr(foc, 'mode', '')} mode the "
            f"{foc.driver} driver sets the lens in diopters itself, so remove focus.nominal (or set focus.mode: current)"
        )
    if nominal is None:
        if foc.driver == "gcode" or (foc.driver == "genicam" and foc.feature == "FocusStepper"):
            raise ConfigError(f"focus.nominal: the {foc.driver} focus needs a nominal model (offset_dpt, dpt_per_unit) or calibration.file")
        return LiquidLensFocusModel(offset_dpt=0.0, dpt_per_ma=1.0, base_focus_m=base, unit="dpt")
    return LiquidLensFocusModel(offset_dpt=nominal.offset_dpt, dpt_per_ma=nominal.dpt_per_unit, base_focus_m=base, unit=unit)


def _calibration_doc(config: RigConfig) -> dict:
    """The calibration file as a mapping ({} without one); its focus model has been loaded
    (and its faults named) by :func:`_focus_map` before this reads it again."""
    path = config.calibration.file
    if path is None:
        return {}
    doc = load_yaml(Path(path).read_text(encoding="utf-8"))
    return doc if isinstance(doc, dict) else {}


def _breathing(config: RigConfig, doc: dict) -> Any:
    """The breathing table of the calibration file ``doc``, or None."""
    path = config.calibration.file
    section = doc.get("breathing")
    if not section:
        return None
    from calibration.alignment import BreathingModel

    try:
        return BreathingModel.from_dict(section)
    except CalibrationError as exc:  # read, but not a usable table: name the file it is in
        raise ConfigError(f"{path}: breathing: {str(exc).removeprefix('breathing model: ')}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: breathing: unreadable ({exc})") from exc


def _check_units(focus_map: FocusModel, actuator: FocusActuator) -> None:
    """The map's unit must be the actuator's (an in-camera focus finds its unit at open)."""
    if focus_map.unit and actuator.unit and focus_map.unit != actuator.unit:
        raise ConfigError(
            f"focus: the focus map is in {focus_map.unit} but {actuator.name} moves in {actuator.unit}; "
            "give focus.nominal or a calibration.file in the actuator's unit"
        )


def _warn_other_devices(config: RigConfig, doc: dict, camera: Camera, actuator: FocusActuator) -> None:
    """Warn (not refuse) where the calibration file was made with another camera or focus
    device than the open ones (their serial numbers or models differ): a liquid lens's offset
    differs by tenths of a diopter between units, so another unit's focus model gives wrong
    distances without any error. A warning, because a replaced driver board or camera body
    with the same lens can be what the user meant."""
    path = config.calibration.file
    rig_doc = doc.get("rig")
    if not isinstance(rig_doc, dict):
        return
    for section, driver in (("camera", config.camera.driver), ("focus", config.focus.driver)):
        # the driver it was made with (older files: only whether it was the simulator, from the device's name)
        was = rig_doc.get(f"{section}_driver") or ("simulated" if str(rig_doc.get(section, "")).startswith("simulated") else None)
        if was is not None and str(was) != driver:
            logger.warning(
                "calibration.file %s was made with %s.driver %s (%s); this rig's %s.driver is %s: its %s do not hold here; "
                "recalibrate on this rig (run_rig.py --mode calibrate)",
                path, section, was, rig_doc.get(section, "?"), section, driver,
                "breathing table and intrinsics" if section == "camera" else "focus distances",
            )
    for role, device in (("camera_identity", camera), ("focus_identity", actuator)):
        then, now = rig_doc.get(role), getattr(device, "identity", None)
        if not isinstance(then, dict) or not isinstance(now, dict):
            continue
        for key in ("serial_number", "model"):
            was, got = then.get(key), now.get(key)
            if was in (None, "", "None") or got in (None, "", "None") or str(was) == str(got):
                continue
            logger.warning(
                "calibration.file %s was made with %s %s %s; this rig's %s has %s %s: its %s may not hold here; "
                "recalibrate (run_rig.py --mode calibrate) if the %s was changed",
                path, "a camera" if role == "camera_identity" else "a focus device", key.replace("_", " "), was, device.name,
                key.replace("_", " "), got, "breathing table and intrinsics" if role == "camera_identity" else "focus distances",
                "camera" if role == "camera_identity" else "lens",
            )


def open_rig(config: RigConfig, *, need_focus_map: bool = True) -> Rig:
    """Build and open the camera and focus actuator the config names. ``need_focus_map=False``
    (a calibration session, which moves the actuator by value and measures the map itself):
    the rig opens without one where the config has neither a nominal model nor a calibration
    file (``focus_map`` None)."""
    _check_driver_pair(config)
    focus_map = _focus_map(config) if need_focus_map else None
    calibration_doc = _calibration_doc(config) if need_focus_map else {}
    breathing = _breathing(config, calibration_doc) if need_focus_map else None
    camera, actuator = _build_devices(config)
    try:
        camera.open()  # first: an in-camera focus actuator needs the open camera's node map
        actuator.open()
        if focus_map is not None:
            _check_units(focus_map, actuator)
            _warn_other_devices(config, calibration_doc, camera, actuator)
    except BaseException:
        actuator.close()
        camera.close()
        raise
    return Rig(config=config, camera=camera, actuator=actuator, focus_map=focus_map, breathing=breathing)
