"""Build the devices a config names, and open them together as a :class:`Rig`.

>>> from rig import load_config, open_rig                  # doctest: +SKIP
>>> with open_rig(load_config("configs/sim.yaml")) as rig:  # doctest: +SKIP
...     stack = rig.capture_stack()
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from calibration.focus_model import LiquidLensFocusModel, load_focus_model
from capture.devices import Camera, FocusActuator
from capture.errors import ConfigError
from capture.optics import SensorModel, ThinLens
from capture.scenes import Scene, procedural_scene, rgbd_scene
from capture.simulated import SimulatedCamera, SimulatedLiquidLens, TrueLensModel
from capture.stack import FocalStack
from capture.sweep import plan_focus_distances, sweep
from rig.config import RigConfig, RgbdSceneConfig

logger = logging.getLogger(__name__)

__all__ = ["Rig", "open_rig", "build_scene"]


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


#: camera driver name -> builder of (camera, actuator); the hardware drivers register here
_BUILDERS: dict[str, Callable[[RigConfig], tuple[Camera, FocusActuator]]] = {"simulated": _build_simulated}


@dataclass
class Rig:
    """An opened camera + focus actuator + focus map, with the sweep the config describes."""

    config: RigConfig
    camera: Camera
    actuator: FocusActuator
    focus_map: LiquidLensFocusModel

    def planned_distances_m(self) -> np.ndarray:
        s = self.config.sweep
        return plan_focus_distances(range_m=s.range_m, slices=s.slices, distances_m=s.distances_m)

    def capture_stack(self, *, progress: Callable[[int, int], None] | None = None) -> FocalStack:
        """Sweep focus once and return the stack (far to near)."""
        s = self.config.sweep
        optics = getattr(self.config.camera, "optics", None)
        meta: dict[str, Any] = {"capture": {"rig": self.config.name, "camera": self.camera.name, "focus": self.actuator.name}}
        if optics is not None:
            meta["optics"] = {"focal_length_mm": optics.focal_length_mm, "f_number": optics.f_number, "pixel_pitch_um": optics.pixel_pitch_um}
            meta["datum"] = "thin_lens"
        return sweep(
            self.camera, self.actuator, self.focus_map, self.planned_distances_m(),
            wait_settled=s.wait_settled, settle_timeout_s=s.settle_timeout_s, progress=progress, meta=meta,
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

    def __exit__(self, *exc: object) -> None:
        self.close()


def _focus_map(config: RigConfig) -> LiquidLensFocusModel:
    if config.calibration.file is not None:
        if not config.calibration.file.is_file():
            raise ConfigError(f"calibration.file: {config.calibration.file} not found")
        return load_focus_model(config.calibration.file)
    nominal = getattr(config.focus, "nominal", None)
    if nominal is None:
        raise ConfigError("calibration.file: this focus driver has no nominal model; a calibration file is required")
    base = getattr(getattr(config.camera, "optics", None), "base_focus_m", float("inf"))
    return LiquidLensFocusModel(offset_dpt=nominal.offset_dpt, dpt_per_ma=nominal.dpt_per_ma, base_focus_m=base)


def open_rig(config: RigConfig) -> Rig:
    """Build and open the camera and focus actuator the config names."""
    builder = _BUILDERS.get(config.camera.driver)
    if builder is None:
        raise ConfigError(f"camera.driver: no builder for {config.camera.driver!r}; valid: {', '.join(_BUILDERS)}")
    focus_map = _focus_map(config)
    camera, actuator = builder(config)
    try:
        actuator.open()
        camera.open()
    except BaseException:
        camera.close()
        actuator.close()
        raise
    return Rig(config=config, camera=camera, actuator=actuator, focus_map=focus_map)
