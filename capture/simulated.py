"""Simulated devices: a liquid lens with true (drifting) optics and first-order settling,
and a camera that renders the virtual scene through it at exposure time, in real time.

The lens is commanded in mA like a real one; the simulator's *true* lens model (with a
temperature drift) turns current into optical power, while the rig only knows a *nominal*
model, slightly off, as on real hardware. The camera free-runs at its frame rate; a frame
shows the scene at the focus the lens actually had during that exposure, so a sweep that
does not wait for settling gets the wrong image.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from capture.devices import Camera, FocusActuator, Frame
from capture.errors import DeviceError, DeviceTimeout, InputError
from capture.optics import LayeredScene, SensorModel, ThinLens, apply_breathing, breathing_scale
from capture.periodic import FirstOrderTriangleResponse, TriangleWave
from capture.scenes import Scene

logger = logging.getLogger(__name__)

__all__ = ["TrueLensModel", "SimulatedLiquidLens", "SimulatedCamera", "PIXEL_FORMATS"]

#: pixel format -> (channels, output bits)
PIXEL_FORMATS = {"Mono8": (1, 8), "Mono16": (1, 16), "RGB8": (3, 8)}


@dataclass(frozen=True)
class TrueLensModel:
    """The simulator's ground truth: power = offset + gain * I + drift * (T - 25 C)."""

    offset_dpt: float = -0.5
    dpt_per_ma: float = 0.0165
    drift_dpt_per_c: float = -0.003
    temperature_c: float = 27.0

    def power_dpt(self, current_ma: float) -> float:
        return self.offset_dpt + self.dpt_per_ma * current_ma + self.drift_dpt_per_c * (self.temperature_c - 25.0)


class SimulatedLiquidLens(FocusActuator):
    """A liquid lens on its driver: current in mA, first-order response to each command.

    Args:
        true_model: the optics the simulator really has.
        base_focus_m: focus of the camera lens with the liquid lens at 0 dpt.
        time_constant_s: first-order settling time constant.
        settle_tolerance_ma: reported settled once within this of the target.
        current_limits_ma: the driver's limits.
    """

    unit = "mA"

    def __init__(
        self,
        *,
        true_model: TrueLensModel = TrueLensModel(),
        base_focus_m: float = math.inf,
        time_constant_s: float = 0.015,
        settle_tolerance_ma: float = 0.05,
        current_limits_ma: tuple[float, float] = (-290.0, 290.0),
        park_current_ma: float = 0.0,
        name: str = "simulated liquid lens",
    ) -> None:
        super().__init__(name=name)
        if not time_constant_s >= 0:
            raise InputError(f"focus.time_constant_s: must be >= 0, got {time_constant_s}")
        if not (math.isfinite(park_current_ma) and current_limits_ma[0] <= park_current_ma <= current_limits_ma[1]):
            raise InputError(f"focus.park_current_ma: {park_current_ma:g} mA is outside the current limits "
                             f"[{current_limits_ma[0]:g}, {current_limits_ma[1]:g}] mA")
        self.park_current_ma = float(park_current_ma)
        self.true_model = true_model
        self.base_dpt = 0.0 if math.isinf(base_focus_m) else 1.0 / base_focus_m
        self.time_constant_s = time_constant_s
        self.settle_tolerance_ma = settle_tolerance_ma
        self._limits = (float(current_limits_ma[0]), float(current_limits_ma[1]))
        self._lock = threading.Lock()
        self._from_ma = 0.0
        self._target_ma = 0.0
        self._t_cmd = time.monotonic()
        self._triangle: FirstOrderTriangleResponse | None = None

    @property
    def limits(self) -> tuple[float, float]:
        return self._limits

    @property
    def target(self) -> float:
        return self._target_ma

    def current_at(self, t_host_s: float) -> float:
        """The lens current (mA) at a host-monotonic time, from the first-order response."""
        with self._lock:
            from_ma, target_ma, t_cmd, triangle = self._from_ma, self._target_ma, self._t_cmd, self._triangle
        if triangle is not None and t_host_s >= triangle.wave.t0_host_s:
            return triangle.value_at(t_host_s)
        dt = max(0.0, t_host_s - t_cmd)
        if self.time_constant_s == 0:
            return target_ma
        return target_ma + (from_ma - target_ma) * math.exp(-dt / self.time_constant_s)

    def true_focus_dpt_at(self, t_host_s: float) -> float:
        """Where the lens really focuses (diopters) at a host-monotonic time."""
        return self.base_dpt + self.true_model.power_dpt(self.current_at(t_host_s))

    def temperature_c(self) -> float | None:
        return self.true_model.temperature_c

    # -- periodic sweeps, like the LD4's signal generator (capture.periodic)
    def start_triangle(self, lower: float, upper: float, frequency_hz: float) -> None:
        """Sweep the current as a triangle between ``lower`` and ``upper`` mA at ``frequency_hz``:
        at ``lower`` and rising at the call, the lens following with its first-order response
        (on a ramp it trails the command by ``time_constant_s``). ``move_to`` is refused until
        :meth:`stop_signal`."""
        self._require_open("start_triangle")
        lo, hi = self._limits
        if not (math.isfinite(lower) and math.isfinite(upper) and lo <= lower < upper <= hi):
            raise InputError(f"{self.name}: triangle {lower:g}..{upper:g} mA must satisfy {lo:g} <= lower < upper <= {hi:g} mA")
        if not (math.isfinite(frequency_hz) and frequency_hz > 0):
            raise InputError(f"{self.name}: triangle frequency must be > 0 Hz, got {frequency_hz:g}")
        now = time.monotonic()
        start_ma = self.current_at(now)
        with self._lock:
            self._triangle = FirstOrderTriangleResponse(TriangleWave(lower, upper, frequency_hz, now), self.time_constant_s, start_ma)

    def stop_signal(self) -> None:
        """End the triangle: the lens relaxes from where it is to the last ``move_to`` target."""
        self._require_open("stop_signal")
        now = time.monotonic()
        current = self.current_at(now)
        with self._lock:
            self._triangle = None
            self._from_ma, self._t_cmd = current, now

    @property
    def sweep_parameters(self) -> dict[str, float] | None:
        """While a triangle runs: ``lower_ma``, ``upper_ma``, ``frequency_hz`` and its start
        ``t0_host_s`` (host-monotonic); else None."""
        triangle = self._triangle
        if triangle is None:
            return None
        w = triangle.wave
        return {"lower_ma": w.lower, "upper_ma": w.upper, "frequency_hz": w.frequency_hz, "t0_host_s": w.t0_host_s}

    def _do_open(self) -> None:
        with self._lock:
            self._from_ma = self._target_ma = 0.0
            self._t_cmd = time.monotonic()
            self._triangle = None

    def _do_close(self) -> None:
        # park at park_current_ma (0 by default), as the real driver does on close
        with self._lock:
            self._from_ma = self._target_ma = self.park_current_ma
            self._t_cmd = time.monotonic()
            self._triangle = None

    def _do_move(self, value: float) -> None:
        if self._triangle is not None:
            raise DeviceError(f"{self.name}: move_to while a triangle sweep runs; call stop_signal() first")
        now = time.monotonic()
        current = self.current_at(now)
        with self._lock:
            self._from_ma, self._target_ma, self._t_cmd = current, value, now

    def _do_is_settled(self) -> bool:
        if self._triangle is not None:
            return False  # never settled while sweeping
        return abs(self.current_at(time.monotonic()) - self._target_ma) <= self.settle_tolerance_ma

    def _do_position(self) -> float:
        return self.current_at(time.monotonic())


#: bounds on the layered rendering's cost for strongly blurring optics (see SimulatedCamera._layered_scene)
MAX_LAYERS = 96
MAX_OCCLUSION_MARGIN_PX = 48


class SimulatedCamera(Camera):
    """A free-running camera that renders a virtual scene through a focusable thin lens.

    Frame ``k`` starts its exposure at ``t_open + k / fps`` (host-monotonic time); its image
    shows the scene at the focus the lens had, averaged over the exposure, with focus
    breathing and sensor noise. Renders are cached per focus setting (rounded to 1e-3 dpt,
    far below a pixel of blur), so repeated sweeps cost little more than the noise.

    Args:
        scene: what the camera looks at.
        lens: thin-lens optics (focal length, f-number, pixel pitch).
        focus_dpt_at: a callable giving the true focus (dpt) at a host-monotonic time,
            usually :meth:`SimulatedLiquidLens.true_focus_dpt_at`.
        pixel_format: ``Mono8``, ``Mono16`` or ``RGB8``.
    """

    timestamp_source = "camera"

    def __init__(
        self,
        *,
        scene: Scene,
        lens: ThinLens,
        focus_dpt_at,
        fps: float = 30.0,
        exposure_s: float = 0.01,
        gain_db: float = 0.0,
        pixel_format: str = "RGB8",
        sensor: SensorModel = SensorModel(),
        breathing_per_dpt: float = 0.004,
        breathing_reference_dpt: float = 1.5,
        seed: int | None = 0,
        cache_size: int = 64,
        name: str = "simulated camera",
    ) -> None:
        super().__init__(name=name)
        if pixel_format not in PIXEL_FORMATS:
            raise InputError(f"camera.pixel_format: {pixel_format!r} not supported; valid: {', '.join(PIXEL_FORMATS)}")
        if not fps > 0:
            raise InputError(f"camera.fps: must be > 0, got {fps}")
        if not 0 < exposure_s <= 1.0 / fps:
            raise InputError(f"camera.exposure_s: must be > 0 and at most 1/fps = {1.0 / fps:.4g} s, got {exposure_s}")
        self.scene = scene
        self.lens = lens
        self._focus_dpt_at = focus_dpt_at
        self.fps = float(fps)
        self._exposure_s = float(exposure_s)
        self.gain_db = float(gain_db)
        self.pixel_format = pixel_format
        self.sensor = sensor
        self.breathing_per_dpt = breathing_per_dpt
        self.breathing_reference_dpt = breathing_reference_dpt
        self._seed = seed
        self._cache_size = cache_size
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._layered: LayeredScene | None = None
        self._t_open = 0.0
        self._rng = np.random.default_rng(seed)
        self.render_seconds = 0.0  # time spent rendering (cache misses), for benchmarks
        self.cache_hits = 0
        self.cache_misses = 0

    @property
    def image_hw(self) -> tuple[int, int]:
        return self.scene.image_hw

    @property
    def exposure_s(self) -> float:
        return self._exposure_s

    @property
    def clock_origin_host_s(self) -> float:
        """Host-monotonic time of this camera clock's zero (the open time): a frame's exposure
        starts at ``clock_origin_host_s + Frame.timestamp_s``."""
        return self._t_open

    @property
    def significant_bits(self) -> int:
        return 8 if PIXEL_FORMATS[self.pixel_format][1] == 8 else self.sensor.adc_bits

    def _do_open(self) -> None:
        if self._layered is None:
            self._layered = self._layered_scene()
        self._t_open = time.monotonic()
        self._rng = np.random.default_rng(self._seed)

    def _do_close(self) -> None:
        pass

    def set_scene(self, scene: Scene) -> None:
        """Show another scene (a calibration target moved to a new distance); same image size.

        The render cache and the layered scene are rebuilt for it."""
        if scene.image_hw != self.scene.image_hw:
            raise InputError(f"{self.name}: new scene is {scene.image_hw}, the camera is {self.scene.image_hw}")
        self.scene = scene
        self._cache.clear()
        self._layered = None

    def _layered_scene(self) -> LayeredScene:
        """The scene cut into layers for these optics: layers at most 0.6 px of blur apart, and
        continued behind nearer surfaces by the largest blur radius across the scene's depth
        range (focus inside it; never less than the defaults, 0.05 dpt and 16 px; at most
        :data:`MAX_LAYERS` layers and :data:`MAX_OCCLUSION_MARGIN_PX`). Fixed defaults
        under-served long lenses and small pixels (3.45 um: 21 px of radius at 2 dpt)."""
        k_px = float(self.lens.blur_px_per_dpt)
        depth = np.asarray(self.scene.depth_m, np.float64)
        if not (depth.size and np.isfinite(depth).all() and (depth > 0).all()):
            return LayeredScene(self.scene.radiance, self.scene.depth_m)  # which refuses it, naming the problem
        span_dpt = float(1.0 / depth.min() - 1.0 / depth.max())
        # bounded: rendering time grows with the layers and the margin (a 25 mm f/1.4 lens on 3.45 um
        # pixels blurs 129 px per dpt: 650 layers and a 190 px margin would take minutes per open)
        margin_px = min(MAX_OCCLUSION_MARGIN_PX, max(16, int(math.ceil(k_px * span_dpt / 2.0)) + 2))
        max_layer_dpt = max(span_dpt / (MAX_LAYERS - 1), min(0.05, 0.6 / max(k_px, 1e-6)))
        return LayeredScene(self.scene.radiance, self.scene.depth_m, max_layer_dpt=max_layer_dpt, occlusion_margin_px=margin_px)

    def render_clean(self, focus_dpt: float) -> np.ndarray:
        """The noise-free image (linear radiance, float32 ``[H, W, 3]``) at a focus, with
        breathing; cached per 1e-3 dpt."""
        key = int(round(focus_dpt * 1000))
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            self.cache_hits += 1
            return cached
        t0 = time.perf_counter()
        if self._layered is None:
            self._layered = self._layered_scene()
        focus_q = key / 1000.0
        img = self._layered.render(focus_q, blur_px_per_dpt=self.lens.blur_px_per_dpt)
        scale = breathing_scale(focus_q, breathing_per_dpt=self.breathing_per_dpt, reference_dpt=self.breathing_reference_dpt)
        img = apply_breathing(img, scale)
        self._cache[key] = img
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        self.render_seconds += time.perf_counter() - t0
        self.cache_misses += 1
        return img

    def _do_grab(self, *, start_after_host_s: float, deadline_host_s: float) -> Frame:
        period = 1.0 / self.fps
        k = max(0, math.ceil((start_after_host_s - self._t_open) / period - 1e-9))
        t_start = self._t_open + k * period
        t_end = t_start + self._exposure_s
        if t_end > deadline_host_s:
            raise DeviceTimeout(f"{self.name}: no frame starting after the requested time within the timeout")
        # the frame exists only once its exposure has ended: wait like a real camera
        wait = t_end - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        # focus during the exposure (mean of samples across it)
        samples = [self._focus_dpt_at(t_start + f * self._exposure_s) for f in (0.0, 0.25, 0.5, 0.75, 1.0)]
        focus_dpt = float(np.mean(samples))
        radiance = self.render_clean(focus_dpt)
        channels, bits = PIXEL_FORMATS[self.pixel_format]
        if channels == 1:
            radiance = radiance @ np.array([0.299, 0.587, 0.114], np.float32)
        image = self.sensor.expose(radiance, exposure_s=self._exposure_s, gain_db=self.gain_db, out_bits=bits, rng=self._rng)
        return Frame(
            image=image,
            frame_id=k,
            timestamp_s=t_start - self._t_open,
            timestamp_source=self.timestamp_source,
            exposure_s=self._exposure_s,
            gain_db=self.gain_db,
            significant_bits=self.significant_bits,
            meta={"true_focus_dpt": focus_dpt},
        )
