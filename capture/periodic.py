"""Periodic (triangle) focus sweeps: the *continuous* sweep style.

The actuator runs a triangle wave on its own (the Optotune LD4's signal generator,
``MwTA`` with ``PwLA``/``PwUA``/``PwFA``) while the camera free-runs; nothing waits for
settling. Each frame's focus is computed afterwards from its timestamp:

1. the frame's exposure midpoint, mapped from the camera clock to the host-monotonic clock
   (:class:`CameraClock`);
2. minus the lens lag ``lag_s`` (the focus trails the commanded wave; for a first-order lens
   with time constant tau the focus on a ramp is exactly the command tau seconds earlier,
   once the transient after each turning point has decayed, see
   :class:`FirstOrderTriangleResponse`);
3. the wave's value there, :meth:`TriangleWave.value_at`, is the slice's actuator value, and the
   focus map turns it into a focus distance.

One stack is one monotonic ramp (half a period), so a triangle at ``f`` Hz gives up to
``2 f`` stacks per second; the slice count is bounded by the frames per ramp,
``fps / (2 f)`` (minus the share of the ramp outside the planned range).

Phase convention: at ``t0_host_s`` the wave is at ``lower`` and rising; it reaches ``upper``
half a period later (the LD4 emulator uses the same convention). Ramp ``j`` (counted from
``t0``) rises for even ``j`` and falls for odd ``j``.

Known limits:

* **Intra-exposure smear.** The focus moves during an exposure by ``slope * exposure`` (in
  actuator units; :attr:`TriangleWave.slope_per_s`). The frame shows the focus averaged over
  the exposure; on a ramp that average is the focus at the exposure midpoint, which is what is
  recorded, but the image is a blend of a small focus range. Keep exposures short: the smear
  should be well below the slice spacing (it is recorded as ``sweep.smear_per_frame`` and a
  warning is logged when it exceeds half the median spacing).
* **Turning points.** Near a turn the lens rounds the corner (for a first-order lens the error
  against ``value_at(t - lag)`` is up to ~0.74 * slope * tau at tau after the turn, decaying as
  ``exp(-t/tau)``). :func:`triangle_bounds` extends the triangle beyond the planned range by a
  guard time (about 3 lags) so that those frames fall outside the range and are dropped.
* **Phase knowledge.** The wave's ``t0_host_s`` comes from the host time at which the driver
  acknowledged the start (:func:`start_triangle_sweep`); a constant offset between that and the
  device's real start, the USB latency and the lens's own delay all act as one constant lag,
  which is why ``lag_s`` must be calibrated with a target at the frequency used. The driver's
  oscillator and the host clock also differ by some ppm: over long runs the phase drifts
  (50 ppm at 2 Hz is 0.1 period after ~17 min), so restart the triangle (a new wave) or
  re-calibrate the phase periodically (the rig restarts it every
  ``rig.build.TRIANGLE_RESTART_S``, a minute).

Clock mapping (:class:`CameraClock`), in order of preference:

* ``timestamp_source == "host"``: timestamps already are host-monotonic exposure starts.
* the camera has a ``clock_origin_host_s`` attribute (the host-monotonic time of its clock's
  zero; proposed for :class:`~capture.simulated.SimulatedCamera`, whose ``timestamp_s`` is
  ``t_start - t_open``): exact.
* an offset given by the caller, ``CameraClock(offset_s=...)``. On GenICam cameras with camera
  timestamps, the best source is a latch: read ``time.monotonic()`` before and after executing
  ``TimestampLatch`` (SFNC; ``GevTimestampControlLatch`` on older GigE cameras) and read
  ``TimestampLatchValue`` (``GevTimestampValue``); offset = host midpoint - latched value (in
  seconds: the producer's ``timestamp_ns`` assumes a 1 GHz tick; check
  ``GevTimestampTickFrequency`` on GigE). PTP-synchronised cameras can use the PTP time instead.
* otherwise the offset is estimated from frame *arrival*: ``offset = min over frames of
  (host time grab returned - (timestamp_s + exposure_s))``. Assumptions: the camera clock ticks
  in seconds at the host's rate over one stack (ppm drift is microseconds per stack; a new
  clock is made per stack); delivery after the end of exposure takes >= 0 s with a small, stable
  minimum (readout, transfer, driver). That minimum biases every frame of the stack by the same
  amount (the frames look later than they are), which a lag calibrated with the same camera and
  clock source absorbs. In the simulator the minimum is the render time (milliseconds).

Real cameras: :class:`~capture.genicam_camera.GenicamCamera`'s free-run ``grab`` drains the
stream and waits two frame ids, so consecutive grabs return every second or third frame; the
slice count per ramp is lower than ``fps / (2 f)`` until the camera offers a streaming read.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, overload

import numpy as np

from capture.devices import Camera, FocusActuator, Frame
from capture.errors import CalibrationError, DeviceTimeout, InputError, RigError
from capture.stack import FocalStack
from capture.sweep import SweepInterrupted, thermal_kwargs

logger = logging.getLogger(__name__)

__all__ = [
    "CameraClock",
    "FirstOrderTriangleResponse",
    "PeriodicFocusMap",
    "TriangleWave",
    "capture_continuous_stack",
    "lag_estimate_s",
    "start_triangle_sweep",
    "triangle_bounds",
]

Direction = Literal["up", "down", "either"]
_DIRECTIONS = ("up", "down", "either")


def _finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{name}: must be finite, got {value}")
    return value


# --------------------------------------------------------------------------------------------
# The wave and the lens's response to it
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TriangleWave:
    """A triangle between ``lower`` and ``upper`` (actuator units) at ``frequency_hz``, at
    ``lower`` and rising at host-monotonic time ``t0_host_s``.

    >>> w = TriangleWave(0.0, 100.0, 2.0, t0_host_s=10.0)
    >>> w.value_at(10.125), w.value_at(10.25), w.value_at(10.375), w.half_period_s
    (50.0, 100.0, 50.0, 0.25)
    """

    lower: float
    upper: float
    frequency_hz: float
    t0_host_s: float

    def __post_init__(self) -> None:
        for name in ("lower", "upper", "frequency_hz", "t0_host_s"):
            object.__setattr__(self, name, _finite(f"triangle {name}", getattr(self, name)))
        if not self.lower < self.upper:
            raise InputError(f"triangle: lower {self.lower:g} must be below upper {self.upper:g}")
        if not self.frequency_hz > 0:
            raise InputError(f"triangle: frequency_hz must be > 0, got {self.frequency_hz:g}")

    @property
    def period_s(self) -> float:
        return 1.0 / self.frequency_hz

    @property
    def half_period_s(self) -> float:
        """Duration of one monotonic ramp (one stack), seconds."""
        return 0.5 / self.frequency_hz

    @property
    def span(self) -> float:
        """``upper - lower``, actuator units."""
        return self.upper - self.lower

    @property
    def slope_per_s(self) -> float:
        """Magnitude of the ramp slope, actuator units per second."""
        return 2.0 * self.span * self.frequency_hz

    @overload
    def phase(self, t_host_s: float) -> float: ...
    @overload
    def phase(self, t_host_s: np.ndarray) -> np.ndarray: ...

    def phase(self, t_host_s: float | np.ndarray) -> float | np.ndarray:
        """Fraction of the period since the last lower turning point, in ``[0, 1)``;
        below 0.5 the wave rises. Scalar in, float out; ``[N]`` in, ``[N]`` out."""
        ph = np.mod((np.asarray(t_host_s, np.float64) - self.t0_host_s) * self.frequency_hz, 1.0)
        return float(ph) if np.ndim(ph) == 0 else ph

    @overload
    def value_at(self, t_host_s: float) -> float: ...
    @overload
    def value_at(self, t_host_s: np.ndarray) -> np.ndarray: ...

    def value_at(self, t_host_s: float | np.ndarray) -> float | np.ndarray:
        """The commanded value at host-monotonic time(s), actuator units."""
        ph = np.asarray(self.phase(np.asarray(t_host_s, np.float64)))
        frac = np.where(ph < 0.5, 2.0 * ph, 2.0 - 2.0 * ph)
        value = self.lower + self.span * frac
        return float(value) if np.ndim(value) == 0 else value

    def ramp_index(self, t_host_s: float) -> int:
        """Which ramp (half period) holds ``t_host_s``, counted from ``t0``: even rises, odd falls."""
        return math.floor((float(t_host_s) - self.t0_host_s) / self.half_period_s)

    @staticmethod
    def is_rising(ramp_index: int) -> bool:
        return ramp_index % 2 == 0

    def ramp_start_s(self, ramp_index: int) -> float:
        """Host-monotonic start of ramp ``ramp_index`` (a turning point)."""
        return self.t0_host_s + ramp_index * self.half_period_s

    def time_at_value(self, value: float, ramp_index: int) -> float:
        """When ramp ``ramp_index`` passes ``value`` (clipped to [lower, upper]), host seconds."""
        v = min(max(float(value), self.lower), self.upper)
        offset = (v - self.lower) if self.is_rising(ramp_index) else (self.upper - v)
        return self.ramp_start_s(ramp_index) + offset / self.slope_per_s


@dataclass(frozen=True)
class FirstOrderTriangleResponse:
    """The output of a first-order system (``tau * dy/dt = u - y``) driven by ``wave`` from
    ``wave.t0_host_s`` on, starting at ``start_value``: how a liquid lens's focus follows its
    driver's triangle. Exact and O(1) at any time: the periodic steady state plus the decay of the
    initial mismatch.

    In the steady state the output at a lower turning point is ``lower + p`` and at an upper one
    ``upper - p``, ``p = slope * tau * tanh(T / (4 tau))`` (T the period); on a ramp, once the
    turn's transient ``~ 2 p exp(-s / tau)`` has decayed, ``y(t) = wave.value_at(t - tau)``.
    """

    wave: TriangleWave
    time_constant_s: float
    start_value: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.time_constant_s) and self.time_constant_s >= 0):
            raise InputError(f"first-order response: time_constant_s must be finite and >= 0, got {self.time_constant_s}")

    def steady_state_at(self, t_host_s: float) -> float:
        """The periodic steady-state output at ``t_host_s``."""
        w, tau = self.wave, self.time_constant_s
        if tau == 0:
            return float(w.value_at(t_host_s))
        k, h = w.slope_per_s, w.half_period_s
        p = k * tau * math.tanh(h / (2.0 * tau))
        s = math.fmod(float(t_host_s) - w.t0_host_s, w.period_s)
        if s < 0:
            s += w.period_s
        if s < h:  # rising, s since the lower turning point
            return w.lower + k * (s - tau) + (p + k * tau) * math.exp(-s / tau)
        s -= h  # falling, s since the upper turning point
        return w.upper - k * (s - tau) - (p + k * tau) * math.exp(-s / tau)

    def value_at(self, t_host_s: float) -> float:
        """The output at ``t_host_s`` (``start_value`` before ``t0``)."""
        w, tau = self.wave, self.time_constant_s
        dt = float(t_host_s) - w.t0_host_s
        if dt <= 0:
            return self.start_value
        if tau == 0:
            return float(w.value_at(t_host_s))
        y0_ss = self.steady_state_at(w.t0_host_s)
        return self.steady_state_at(t_host_s) + (self.start_value - y0_ss) * math.exp(-dt / tau)


# --------------------------------------------------------------------------------------------
# Clocks
# --------------------------------------------------------------------------------------------


class CameraClock:
    """Maps a frame's ``timestamp_s`` to the host-monotonic clock: ``host = timestamp_s + offset_s``
    (frames stamped on the host clock map to themselves).

    Args:
        offset_s: a known offset (e.g. from a timestamp latch), or None to estimate it from frame
            arrival (see the module docstring for the assumptions).
        source: a label recorded in the stack meta (default ``"given"`` or ``"arrival"``).
    """

    def __init__(self, *, offset_s: float | None = None, source: str | None = None) -> None:
        if offset_s is not None:
            offset_s = _finite("camera clock offset_s", offset_s)
        self.offset_s = offset_s
        self.source = source or ("given" if offset_s is not None else "arrival")
        self.observations = 0

    @classmethod
    def for_camera(cls, camera: Camera) -> CameraClock:
        """The best mapping the camera offers: its ``clock_origin_host_s`` where it has one
        (exact), else an arrival estimate (host-stamped frames need none)."""
        origin = getattr(camera, "clock_origin_host_s", None)
        if isinstance(origin, (int, float)) and math.isfinite(origin):
            return cls(offset_s=float(origin), source="camera_origin")
        return cls()

    @property
    def estimating(self) -> bool:
        return self.source == "arrival"

    def observe(self, frame: Frame, returned_host_s: float) -> None:
        """Record one frame's arrival (``time.monotonic()`` right after ``grab`` returned)."""
        if not self.estimating or frame.timestamp_source == "host":
            return
        candidate = float(returned_host_s) - (frame.timestamp_s + (frame.exposure_s or 0.0))
        self.offset_s = candidate if self.offset_s is None else min(self.offset_s, candidate)
        self.observations += 1

    def needs_frame(self, camera: Camera) -> bool:
        """True while an arrival estimate has no observation and the camera stamps on its own clock."""
        return self.estimating and self.offset_s is None and camera.timestamp_source != "host"

    def to_host_s(self, frame: Frame) -> float:
        """Host-monotonic start of the frame's exposure.

        Raises:
            RigError: a camera-clock frame before any offset is known.
        """
        if frame.timestamp_source == "host":
            return float(frame.timestamp_s)
        if self.offset_s is None:
            raise RigError("continuous sweep: no mapping from the camera clock to the host clock yet (no frame observed)")
        return float(frame.timestamp_s) + self.offset_s


# --------------------------------------------------------------------------------------------
# Planning helpers
# --------------------------------------------------------------------------------------------


class PeriodicFocusMap(Protocol):
    """What the continuous sweep needs from calibration: both directions of the focus map
    (e.g. :class:`~calibration.focus_model.LiquidLensFocusModel`); an optional
    ``valid_dpt`` = (lowest, highest) calibrated diopters limits the usable frames. A map with a
    temperature term also takes a keyword ``temperature_c`` in both directions (the capture
    passes the lens temperature, read once per stack, where the actuator reports one)."""

    unit: str

    def actuator_value(self, focus_distance_m: float) -> float: ...

    def focus_distance_m(self, value: float) -> float: ...


def _dpt(distance_m: float) -> float:
    return 0.0 if math.isinf(distance_m) else 1.0 / distance_m


def _distance(dpt: float) -> float:
    return math.inf if dpt <= 0 else 1.0 / dpt


def _calibrated_dpt(focus_map: Any) -> tuple[float, float] | None:
    valid = getattr(focus_map, "valid_dpt", None)
    if valid is None:
        return None
    tol = float(getattr(focus_map, "tolerance_dpt", 0.0) or 0.0)
    return (float(valid[0]) - tol, float(valid[1]) + tol)


def triangle_bounds(
    focus_map: PeriodicFocusMap,
    range_m: Sequence[float],
    *,
    frequency_hz: float,
    guard_s: float = 0.0,
    limits: tuple[float, float] | None = None,
    temperature_c: float | None = None,
) -> tuple[float, float]:
    """Lower and upper actuator values of a triangle that covers the planned focus range and runs
    ``guard_s`` seconds beyond each end of it, so the lens's rounded turning points (a few lags
    long: ``guard_s ~ 3 * lag_s``) fall outside the range.

    The ramp spends a share ``4 * frequency_hz * guard_s`` of its time outside the range, so the
    triangle's span is the range's span divided by ``1 - 4 f g``.
    For a first-order lens with ``lag_s = tau`` the focus error left at the range's ends is
    ``~2 * slope * tau * exp(-(guard_s + tau) / tau)``: 4 % of ``slope * tau`` with ``guard_s = 3 tau``.
    ``temperature_c``: the lens temperature, for a focus map with a temperature term.

    Raises:
        InputError: an empty range, a guard too long for the frequency, or a planned range
            outside ``limits`` (a guard that would leave them is clipped, with a warning).
    """
    if len(range_m) != 2:
        raise InputError(f"continuous sweep: range_m must be (near, far), got {list(range_m)}")
    frequency_hz = _finite("sweep.frequency_hz", frequency_hz)
    guard_s = _finite("continuous sweep guard_s", guard_s)
    if not frequency_hz > 0 or guard_s < 0:
        raise InputError(f"continuous sweep: need frequency_hz > 0 and guard_s >= 0, got {frequency_hz:g} Hz, {guard_s:g} s")
    thermal = thermal_kwargs(focus_map.actuator_value, temperature_c)
    a, b = (float(focus_map.actuator_value(float(d), **thermal)) for d in range_m)
    lo, hi = min(a, b), max(a, b)
    if not hi > lo:
        raise InputError(f"continuous sweep: range_m {list(range_m)} maps to a single actuator value {lo:g}")
    share = 4.0 * frequency_hz * guard_s
    if share >= 0.9:
        raise InputError(
            f"continuous sweep: a guard of {guard_s:g} s at each turn leaves no ramp at {frequency_hz:g} Hz "
            f"(half period {0.5 / frequency_hz:g} s); lower the frequency or the guard"
        )
    margin = 0.5 * (hi - lo) * share / (1.0 - share)
    lower, upper = lo - margin, hi + margin
    if limits is not None:
        lim_lo, lim_hi = float(limits[0]), float(limits[1])
        if lo < lim_lo or hi > lim_hi:
            raise InputError(
                f"continuous sweep: the planned range needs {lo:.4g}..{hi:.4g} {focus_map.unit}, "
                f"outside the actuator limits [{lim_lo:g}, {lim_hi:g}]"
            )
        if lower < lim_lo or upper > lim_hi:
            logger.warning("continuous sweep: the turn guard is clipped by the actuator limits [%g, %g]", lim_lo, lim_hi)
            lower, upper = max(lower, lim_lo), min(upper, lim_hi)
    return lower, upper


def start_triangle_sweep(actuator: FocusActuator, lower: float, upper: float, frequency_hz: float) -> TriangleWave:
    """Start the actuator's triangle and return the wave it runs, phase-referenced to the host
    time at which the start was acknowledged (or the actuator's own ``t0_host_s``).

    The values are taken back from ``actuator.sweep_parameters`` where it reports them
    (the LD4 quantises currents to its raw step and the frequency to 1 mHz).

    Raises:
        InputError: the actuator has no triangle mode, or runs it in another unit than its focus
            map's (the LD4's signal generator is always in mA; use its current mode).
    """
    start = getattr(actuator, "start_triangle", None)
    if start is None:
        raise InputError(f"{actuator.name}: has no periodic (triangle) sweep; use sweep.style: stepped")
    if getattr(actuator, "mode", "current") == "focal_power":
        raise InputError(
            f"{actuator.name}: the signal generator sweeps the current (mA), but the driver is in focal-power mode (dpt); "
            "use focus.mode: current with a focus map in mA for the continuous sweep"
        )
    start(float(lower), float(upper), float(frequency_hz))
    t_ack_s = time.monotonic()
    params = getattr(actuator, "sweep_parameters", None) or {}
    wave = TriangleWave(
        float(params.get("lower_ma", lower)),
        float(params.get("upper_ma", upper)),
        float(params.get("frequency_hz", frequency_hz)),
        float(params.get("t0_host_s", t_ack_s)),
    )
    logger.info("%s: triangle %.4g..%.4g %s at %.4g Hz", actuator.name, wave.lower, wave.upper, actuator.unit, wave.frequency_hz)
    return wave


def lag_estimate_s(actuator: FocusActuator) -> float | None:
    """The actuator's own lag estimate: a first-order lens's time constant (on a ramp its focus
    trails the command by exactly that), else None (measure it)."""
    tau = getattr(actuator, "time_constant_s", None)
    if isinstance(tau, (int, float)) and math.isfinite(tau) and tau >= 0:
        return float(tau)
    return None


# --------------------------------------------------------------------------------------------
# The capture
# --------------------------------------------------------------------------------------------


def _value_window(
    wave: TriangleWave, focus_map: PeriodicFocusMap, range_m: Sequence[float] | None, temperature_c: float | None = None
) -> tuple[float, float]:
    """The actuator values of the usable range (planned and calibrated) within the wave, at
    the lens temperature ``temperature_c`` (where the focus map has a temperature term)."""
    lo_dpt, hi_dpt = -math.inf, math.inf
    if range_m is not None:
        if len(range_m) != 2 or not all(float(d) > 0 for d in range_m):
            raise InputError(f"continuous sweep: range_m must be two distances > 0 m, got {list(range_m)}")
        d = sorted(_dpt(float(x)) for x in range_m)
        lo_dpt, hi_dpt = d[0], d[1]
    calibrated = _calibrated_dpt(focus_map)
    if calibrated is not None:
        lo_dpt, hi_dpt = max(lo_dpt, calibrated[0]), min(hi_dpt, calibrated[1])
    values = [wave.lower, wave.upper]
    if math.isfinite(lo_dpt) and math.isfinite(hi_dpt):
        if not hi_dpt > lo_dpt:
            raise InputError("continuous sweep: the planned range lies outside the focus map's calibrated range")
        try:
            thermal = thermal_kwargs(focus_map.actuator_value, temperature_c)
            values = sorted(float(focus_map.actuator_value(_distance(max(dpt, 0.0)), **thermal)) for dpt in (lo_dpt, hi_dpt))
        except CalibrationError as exc:
            raise InputError(f"continuous sweep: the planned range is not reachable: {exc}") from exc
    lo_v, hi_v = max(values[0], wave.lower), min(values[1], wave.upper)
    if not hi_v > lo_v:
        raise InputError(
            f"continuous sweep: the triangle {wave.lower:.4g}..{wave.upper:.4g} does not cover the planned focus range "
            f"({values[0]:.4g}..{values[1]:.4g}); choose its bounds with triangle_bounds()"
        )
    return lo_v, hi_v


def _next_window(
    wave: TriangleWave, lag_s: float, v_lo: float, v_hi: float, direction: str, earliest_host_s: float, half_exposure_s: float
) -> tuple[float, float, int]:
    """(first, last) host time of an exposure midpoint whose lagged focus lies in [v_lo, v_hi]
    on the next ramp of the wanted direction that starts after ``earliest_host_s``; and its index."""
    j = wave.ramp_index(earliest_host_s - lag_s) - 1
    for _ in range(8):
        rising = wave.is_rising(j)
        if direction == "either" or (direction == "up") == rising:
            a = wave.time_at_value(v_lo if rising else v_hi, j) + lag_s
            b = wave.time_at_value(v_hi if rising else v_lo, j) + lag_s
            if a - half_exposure_s >= earliest_host_s:
                return a, b, j
        j += 1
    raise AssertionError("unreachable: a matching ramp lies within two periods")  # pragma: no cover


def _select(dpts: np.ndarray, n: int, lo_dpt: float, hi_dpt: float) -> list[int]:
    """Indices of ``n`` distinct entries of ``dpts`` ([M]) nearest to ``n`` evenly spaced targets."""
    targets = np.linspace(lo_dpt, hi_dpt, n)
    free = np.ones(dpts.size, bool)
    chosen: list[int] = []
    for target in targets:
        candidates = np.flatnonzero(free)
        best = int(candidates[np.argmin(np.abs(dpts[candidates] - target))])
        free[best] = False
        chosen.append(best)
    return chosen


def capture_continuous_stack(
    camera: Camera,
    actuator: FocusActuator,
    focus_map: PeriodicFocusMap,
    *,
    wave: TriangleWave,
    lag_s: float,
    n_slices: int | None = None,
    direction: Direction = "either",
    timeout_s: float = 5.0,
    range_m: Sequence[float] | None = None,
    clock: CameraClock | None = None,
    grab_timeout_s: float = 2.0,
    meta: dict[str, Any] | None = None,
) -> FocalStack:
    """Capture one focal stack from one monotonic ramp of a running triangle sweep.

    With the actuator already running ``wave`` (:func:`start_triangle_sweep`), takes the
    free-running camera's frames whose exposure midpoints, delayed by ``lag_s``, fall on the next
    ramp of the wanted direction (``up``: rising actuator value) inside the planned range
    ``range_m`` (and the focus map's calibrated range, if it has one). Each frame's actuator value
    is ``wave.value_at(t_mid_host - lag_s)``, its focus distance ``focus_map.focus_distance_m`` of
    that. Frames outside the ranges, or whose exposure spans a turning point, are dropped. With
    ``n_slices``, the frames nearest to ``n_slices`` focus values evenly spaced in diopters over the
    range are kept (fewer, with a warning, when the ramp has fewer frames).

    Returns:
        A stack sorted far to near (images ``[N, H, W]`` or ``[N, H, W, C]``), ``slice_meta`` as the
        stepped sweep's plus ``sweep_phase``; ``meta["sweep"]`` = ``style: continuous``,
        ``frequency_hz``, ``lag_s``, ``direction`` (the ramp used: up/down), ``lower``, ``upper``,
        ``unit``, ``clock``, ``smear_per_frame``, ``frames_seen``.

    Raises:
        InputError: bad arguments, a wave not covering the range, or a unit mismatch.
        SweepInterrupted: a device error, a timeout (the ramp ends after ``timeout_s``) or Ctrl-C.
        RigError: fewer than 2 frames in range.
    """
    lag_s = _finite("sweep.lag_s", lag_s)
    if lag_s < 0:
        raise InputError(f"sweep.lag_s: must be >= 0, got {lag_s:g}")
    if direction not in _DIRECTIONS:
        raise InputError(f"continuous sweep: direction must be one of {', '.join(_DIRECTIONS)}, got {direction!r}")
    if n_slices is not None and not (isinstance(n_slices, (int, np.integer)) and n_slices >= 2):
        raise InputError(f"sweep.slices: need an integer >= 2, got {n_slices!r}")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise InputError(f"continuous sweep: timeout_s must be finite and > 0, got {timeout_s}")
    unit = actuator.unit
    if focus_map.unit and unit and focus_map.unit != unit:
        raise InputError(f"continuous sweep: the focus map is in {focus_map.unit} but {actuator.name} moves in {unit}")
    running = getattr(actuator, "sweep_parameters", None)
    if hasattr(type(actuator), "sweep_parameters"):
        if running is None:
            raise InputError(f"{actuator.name}: no triangle sweep is running; start one with start_triangle_sweep()")
        tol = 1e-3 * wave.span
        if (abs(running.get("lower_ma", wave.lower) - wave.lower) > tol or abs(running.get("upper_ma", wave.upper) - wave.upper) > tol
                or abs(running.get("frequency_hz", wave.frequency_hz) - wave.frequency_hz) > 1e-3):
            raise InputError(f"{actuator.name}: runs {running}, not the wave given ({wave})")
    try:  # once per stack, before planning: the focus map's temperature term compensates it
        temperature = actuator.temperature_c()
    except (RigError, KeyboardInterrupt) as exc:
        what = "interrupted by the user" if isinstance(exc, KeyboardInterrupt) else str(exc)
        raise SweepInterrupted(f"continuous sweep stopped before its first frame: {what}", cause=exc,
                               frames=[], distances_m=[], slice_meta=[]) from exc
    v_lo, v_hi = _value_window(wave, focus_map, range_m, temperature)
    clock = clock if clock is not None else CameraClock.for_camera(camera)
    exposure_s = float(camera.exposure_s or 0.0)

    t_call = time.monotonic()
    deadline = t_call + timeout_s
    frames: list[Frame] = []
    seen = 0
    ramp: int | None = None
    try:
        if clock.needs_frame(camera):  # learn the camera clock from one frame before planning
            frame = camera.grab(start_after_host_s=None, timeout_s=min(grab_timeout_s, timeout_s))
            clock.observe(frame, time.monotonic())
            seen += 1
        t_a, t_b, ramp = _next_window(wave, lag_s, v_lo, v_hi, direction, time.monotonic(), 0.5 * exposure_s)
        if t_b > deadline:
            raise DeviceTimeout(
                f"continuous sweep: the next usable ramp ends {t_b - t_call:.3g} s from now, after timeout_s = {timeout_s:g} s"
            )
        request = t_a - 0.5 * exposure_s
        last_stamp = -math.inf
        bump = 1e-4
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeviceTimeout(f"continuous sweep: the ramp was not captured within timeout_s = {timeout_s:g} s")
            frame = camera.grab(start_after_host_s=request, timeout_s=min(grab_timeout_s, remaining))
            clock.observe(frame, time.monotonic())
            seen += 1
            start_host = clock.to_host_s(frame)
            if frame.timestamp_s <= last_stamp:  # the same frame again: the clock estimate runs early
                request += bump
                bump *= 2.0
                continue
            bump = 1e-4
            last_stamp = frame.timestamp_s
            frames.append(frame)
            if start_host + 0.5 * (frame.exposure_s or exposure_s) > t_b:
                break
            request = start_host + 1e-4  # the next frame
    except (RigError, KeyboardInterrupt) as exc:
        kept, distances, entries = _records(frames, clock, wave, lag_s, ramp, v_lo, v_hi, focus_map, unit, exposure_s, temperature)
        what = "interrupted by the user" if isinstance(exc, KeyboardInterrupt) else str(exc)
        raise SweepInterrupted(
            f"continuous sweep stopped after {len(frames)} frames: {what}",
            cause=exc, frames=kept, distances_m=distances, slice_meta=entries,
        ) from exc

    assert ramp is not None  # set before any frame of the ramp is taken
    kept, distances, entries = _records(frames, clock, wave, lag_s, ramp, v_lo, v_hi, focus_map, unit, exposure_s, temperature)
    if len(kept) < 2:
        raise RigError(
            f"continuous sweep: only {len(kept)} of {len(frames)} frames fell in the focus range on the ramp "
            f"({wave.half_period_s:.3g} s at the camera's frame rate); lower sweep.frequency_hz, raise the frame rate, "
            "or widen the range"
        )
    dpts = np.array([_dpt(d) for d in distances])
    order = np.argsort(dpts, kind="stable")  # far to near
    if n_slices is not None:
        if len(kept) < n_slices:
            logger.warning(
                "continuous sweep: %d frames in range on the ramp, fewer than the %d slices asked for; "
                "lower sweep.frequency_hz or raise the frame rate", len(kept), n_slices,
            )
        else:
            lo_dpt, hi_dpt = (float(dpts.min()), float(dpts.max()))
            if range_m is not None:
                ends = sorted(_dpt(float(x)) for x in range_m)
                lo_dpt, hi_dpt = max(lo_dpt, ends[0]), min(hi_dpt, ends[1])
            chosen = _select(dpts, int(n_slices), lo_dpt, hi_dpt)
            order = np.array(sorted(chosen, key=lambda i: (dpts[i], i)))
    smear = wave.slope_per_s * exposure_s
    values = np.sort(np.array([entries[i]["actuator_value"] for i in order]))
    if values.size > 1:
        spacing = float(np.median(np.diff(values)))
        if smear > 0.5 * spacing:
            logger.warning(
                "continuous sweep: the focus moves %.3g %s during one exposure, more than half the slice spacing %.3g %s; "
                "shorten the exposure or lower the frequency", smear, unit, spacing, unit,
            )
    stack_meta = dict(meta or {})
    stack_meta["sweep"] = {
        "style": "continuous",
        "frequency_hz": wave.frequency_hz,
        "lag_s": lag_s,
        "direction": "up" if wave.is_rising(ramp) else "down",
        "lower": round(wave.lower, 4),
        "upper": round(wave.upper, 4),
        "unit": unit,
        "clock": "host" if all(f.timestamp_source == "host" for f in kept) else clock.source,
        "smear_per_frame": round(smear, 4),
        "frames_seen": seen,
    }
    first = kept[int(order[0])]
    if first.image.dtype == np.uint16:
        stack_meta.setdefault("significant_bits", first.significant_bits)
    logger.debug(
        "continuous sweep: %d slices from %d frames on ramp %d (%s), %.3f s",
        len(order), len(frames), ramp, stack_meta["sweep"]["direction"], time.monotonic() - t_call,
    )
    return FocalStack(
        np.stack([kept[i].image for i in order]),
        focus_distance_m=[distances[i] for i in order],
        slice_meta=[entries[i] for i in order],
        meta=stack_meta,
    )


def _records(
    frames: list[Frame],
    clock: CameraClock,
    wave: TriangleWave,
    lag_s: float,
    ramp: int | None,
    v_lo: float,
    v_hi: float,
    focus_map: PeriodicFocusMap,
    unit: str,
    exposure_s: float,
    temperature_c: float | None,
) -> tuple[list[Frame], list[float], list[dict[str, Any]]]:
    """The frames in range on ``ramp``, their focus distances (at the lens temperature
    ``temperature_c``) and slice metadata (the three lists have one entry per kept frame)."""
    kept: list[Frame] = []
    distances: list[float] = []
    entries: list[dict[str, Any]] = []
    if ramp is None:
        return kept, distances, entries
    eps = 1e-9 * wave.span
    calibrated = _calibrated_dpt(focus_map)
    thermal = thermal_kwargs(focus_map.focus_distance_m, temperature_c)
    for frame in frames:
        if frame.timestamp_source != "host" and clock.offset_s is None:
            continue
        exp_s = frame.exposure_s if frame.exposure_s is not None else exposure_s
        t_lens = clock.to_host_s(frame) + 0.5 * exp_s - lag_s
        if wave.ramp_index(t_lens - 0.5 * exp_s) != ramp or wave.ramp_index(t_lens + 0.5 * exp_s) != ramp:
            continue  # another ramp, or the exposure spans a turning point
        value = float(wave.value_at(t_lens))
        if not v_lo - eps <= value <= v_hi + eps:
            continue
        distance_m = float(focus_map.focus_distance_m(value, **thermal))
        if not distance_m > 0:
            continue
        if calibrated is not None and not calibrated[0] <= _dpt(distance_m) <= calibrated[1]:
            continue
        entry: dict[str, Any] = {
            "actuator_value": round(value, 4),
            "actuator_unit": unit,
            "timestamp_s": round(frame.timestamp_s, 6),
            "timestamp_source": frame.timestamp_source,
            "frame_id": frame.frame_id,
            "sweep_phase": round(float(wave.phase(t_lens)), 5),
        }
        for key in ("exposure_s", "gain_db"):
            if getattr(frame, key) is not None:
                entry[key] = getattr(frame, key)
        if temperature_c is not None:
            entry["lens_temperature_c"] = round(float(temperature_c), 3)
        kept.append(frame)
        distances.append(distance_m)
        entries.append(entry)
    return kept, distances, entries
