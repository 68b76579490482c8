"""The focus sweep: plan focus distances, then move, wait settled, take the first frame
that starts after settling, copy it out, and assemble a :class:`FocalStack`."""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from capture.devices import Camera, FocusActuator, Frame
from capture.errors import ConfigError, InputError, RigError, interrupt_reason
from capture.repeat_log import RepeatLimiter
from capture.stack import FocalStack

logger = logging.getLogger(__name__)
#: the per-stack warnings below, at most once a minute per device and cause (continuous mode
#: sweeps for hours)
_repeating = RepeatLimiter(logger)

__all__ = ["plan_focus_distances", "FocusMap", "SweepInterrupted", "settle_wait_s", "slice_entry", "sweep", "thermal_kwargs"]


class FocusMap(Protocol):
    """What a sweep needs from calibration: metres -> actuator value. A map with a
    temperature term also takes a keyword ``temperature_c`` (the lens temperature, °C), which
    the sweep passes where the actuator reports one (:func:`thermal_kwargs`)."""

    unit: str

    def actuator_value(self, focus_distance_m: float) -> float: ...


def slice_entry(frame: Frame, actuator: FocusActuator) -> dict[str, Any]:
    """A slice's per-slice keys (FOCAL_STACK_FORMAT.md) for ``frame``, taken with ``actuator``
    where it stands: the value is what was sent, the device's own step (an LD4 in focal-power
    mode takes 1/200 dpt), not the planned value."""
    entry: dict[str, Any] = {
        "actuator_value": round(float(actuator.target), 6),
        "actuator_unit": actuator.unit,
        "timestamp_s": round(frame.timestamp_s, 6),
        "timestamp_source": frame.timestamp_source,
        "frame_id": frame.frame_id,
    }
    for key in ("exposure_s", "gain_db"):
        if getattr(frame, key) is not None:
            entry[key] = getattr(frame, key)
    return entry


def thermal_kwargs(method: Callable[..., Any], temperature_c: float | None) -> dict[str, float]:
    """``{"temperature_c": temperature_c}`` where a temperature is known and the focus map's
    ``method`` takes that keyword; else ``{}`` (a map without a temperature term)."""
    if temperature_c is None:
        return {}
    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return {}
    if "temperature_c" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return {"temperature_c": float(temperature_c)}
    return {}


def plan_focus_distances(
    *, range_m: Sequence[float] | None = None, slices: int | None = None, distances_m: Sequence[float] | None = None
) -> np.ndarray:
    """Focus distances (metres), sorted far to near (ascending diopter).

    Either an explicit list, or ``slices`` distances evenly spaced in diopters between the
    ends of ``range_m`` (defocus is linear in diopters, so this spaces blur evenly).

    >>> [round(d, 3) for d in plan_focus_distances(range_m=(0.5, 2.0), slices=3)]
    [2.0, 0.8, 0.5]
    """
    if distances_m is not None:
        d = np.asarray(list(distances_m), np.float64)
        if d.size < 2:
            raise InputError(f"sweep.distances_m: need at least 2 distances, got {d.size}")
        if np.any(~(d > 0)):
            raise InputError(f"sweep.distances_m: every distance must be > 0 m, got {d.tolist()}")
    else:
        if range_m is None or slices is None:
            raise InputError("sweep: give distances_m, or range_m and slices")
        near, far = sorted(float(x) for x in range_m)
        if not near > 0:
            raise InputError(f"sweep.range_m: distances must be > 0 m, got {list(range_m)}")
        if slices < 2:
            raise InputError(f"sweep.slices: need at least 2, got {slices}")
        far_dpt = 0.0 if math.isinf(far) else 1.0 / far
        dpt = np.linspace(far_dpt, 1.0 / near, int(slices))
        with np.errstate(divide="ignore"):
            d = np.where(dpt > 0, 1.0 / np.where(dpt > 0, dpt, 1.0), np.inf)
    order = np.argsort(-d, kind="stable")  # far to near
    return d[order]


class SweepInterrupted(RigError):
    """A sweep stopped early; ``frames`` and ``slice_meta`` hold what was captured."""

    def __init__(self, message: str, *, cause: BaseException, frames: list[Frame], distances_m: list[float], slice_meta: list[dict]) -> None:
        super().__init__(message)
        self.cause = cause
        self.frames = frames
        self.distances_m = distances_m
        self.slice_meta = slice_meta
        self.exit_code = getattr(cause, "exit_code", 130 if isinstance(cause, KeyboardInterrupt) else 3)


def check_reachable(actuator: FocusActuator, distances_m: Sequence[float], values: Sequence[float]) -> None:
    """ConfigError naming ``sweep.range_m`` where a planned slice's actuator value lies outside
    the device's limits (the first such slice, and how many)."""
    lo, hi = actuator.limits
    bad = [(float(d), float(v)) for d, v in zip(distances_m, values, strict=True) if not (math.isfinite(v) and lo <= v <= hi)]
    if bad:
        d, v = bad[0]
        raise ConfigError(
            f"sweep.range_m: focus distance {d:.4g} m needs {v:.4g} {actuator.unit} on {actuator.name}, outside its limits "
            f"[{lo:g}, {hi:g}] {actuator.unit} ({len(bad)} of {len(values)} planned slices); narrow sweep.range_m, or check "
            "focus.nominal / calibration.file; nothing was captured"
        )


def settle_wait_s(settle_timeout_s: float, actuator: FocusActuator) -> float:
    """How long to wait for ``actuator`` to settle after a move: ``settle_timeout_s`` (the
    config's ``sweep.settle_timeout_s``, sized for a lens's milliseconds), but at least the
    actuator's own per-move limit: a stage's move takes seconds at its feed rate."""
    return max(float(settle_timeout_s), float(actuator.move_timeout_s))


def _warn_temperature(actuator: FocusActuator, slice_meta: list[dict]) -> None:
    """A warning (at most once a minute) for a stack where the lens was outside the temperatures its driver guarantees
    focus over (the LD4 in focal-power mode): checked at open only, a lens warming up during a
    long acquisition went unnoticed."""
    limits = actuator.compensated_temperature_c()
    temps = [e["lens_temperature_c"] for e in slice_meta if "lens_temperature_c" in e]
    if limits is None or not temps:
        return
    lo, hi = limits
    outside = [t for t in temps if not lo <= t <= hi]
    if outside:
        _repeating.warning(("temperature", id(actuator)),
                           "%s: lens at %.1f-%.1f C in %d of %d slices, outside focus.temperature_limits_c [%g, %g] C: "
                           "the focal power of those slices is not guaranteed", actuator.name, min(outside), max(outside),
                           len(outside), len(slice_meta), lo, hi)


def _warn_repeated_frames(camera: Camera, frames: list[Frame]) -> None:
    """A warning (at most once a minute) for a stack where a slice is the very image of the slice before it: a camera
    that handed over one buffer twice, or a scene saturated or unlit in both, where focus
    cannot be told apart between them (real sensor noise makes two exposures differ)."""
    pairs = [i for i in range(1, len(frames)) if np.array_equal(frames[i].image, frames[i - 1].image)]
    if not pairs:
        return
    same_id = [i for i in pairs if frames[i].frame_id is not None and frames[i].frame_id == frames[i - 1].frame_id]
    listed = ", ".join(f"{i - 1} and {i}" for i in pairs[:5]) + (" ..." if len(pairs) > 5 else "")
    why = (f"the camera returned frame {frames[same_id[0]].frame_id} twice" if same_id
           else "the camera may be repeating a buffer, or the scene is saturated or unlit")
    _repeating.warning(("repeated frames", id(camera)), "sweep: slices %s are the same image, pixel for pixel (%d repeats in %d slices): %s; "
                       "no focus can be measured between them", listed, len(pairs), len(frames), why)


def sweep(
    camera: Camera,
    actuator: FocusActuator,
    focus_map: FocusMap,
    distances_m: Sequence[float],
    *,
    wait_settled: bool = True,
    settle_timeout_s: float = 1.0,
    grab_timeout_s: float = 2.0,
    progress: Callable[[int, int], None] | None = None,
    meta: dict | None = None,
) -> FocalStack:
    """Capture one focal stack.

    The lens temperature is read once, before planning; for each distance: convert to an
    actuator value (at that temperature, where the focus map has a temperature term), move,
    wait until the actuator reports settled (finite timeout), then take the first frame whose
    exposure starts after that moment. With ``wait_settled=False`` the frame is the first that
    starts after the move command, as a careless rig would take it.

    Raises:
        SweepInterrupted: on any device error or Ctrl-C, carrying the frames captured so far.
    """
    if len(distances_m) < 2:
        raise InputError(f"sweep: distances_m: need at least 2 focus distances, got {len(distances_m)}")
    frames: list[Frame] = []
    done_m: list[float] = []
    slice_meta: list[dict] = []
    n = len(distances_m)
    try:
        # once per stack, before planning: the focus map's temperature term compensates it
        thermal = thermal_kwargs(focus_map.actuator_value, actuator.temperature_c())
        # every slice planned and checked against the device's limits before the first move,
        # so an unreachable sweep captures nothing instead of stopping half way
        values = [float(focus_map.actuator_value(float(d), **thermal)) for d in distances_m]
        check_reachable(actuator, distances_m, values)
        settle_s = settle_wait_s(settle_timeout_s, actuator)
        for i, (distance_m, value) in enumerate(zip(distances_m, values, strict=True)):
            actuator.move_to(value)
            t_cmd = time.monotonic()
            t_ready = actuator.wait_settled(timeout_s=settle_s) if wait_settled else t_cmd
            frame = camera.grab(start_after_host_s=t_ready, timeout_s=grab_timeout_s)
            entry = slice_entry(frame, actuator)
            # the frame is taken: all three lists grow together now, so a temperature read that
            # fails (a cable pulled just then) stops the sweep without losing this slice
            frames.append(frame)
            done_m.append(float(distance_m))
            slice_meta.append(entry)
            temperature = actuator.temperature_c()
            if temperature is not None:
                entry["lens_temperature_c"] = round(float(temperature), 3)
            if progress is not None:
                progress(i + 1, n)
    except ConfigError:
        raise  # the plan does not fit the rig: nothing was captured
    except (RigError, KeyboardInterrupt) as exc:
        what = interrupt_reason(exc) if isinstance(exc, KeyboardInterrupt) else str(exc)
        raise SweepInterrupted(
            f"sweep stopped after {len(frames)} of {n} slices: {what}",
            cause=exc, frames=frames, distances_m=done_m, slice_meta=slice_meta,
        ) from exc
    _warn_temperature(actuator, slice_meta)
    _warn_repeated_frames(camera, frames)
    stack_meta = dict(meta or {})
    if frames[0].image.dtype == np.uint16:
        stack_meta.setdefault("significant_bits", frames[0].significant_bits)
    return FocalStack(
        np.stack([f.image for f in frames]),
        focus_distance_m=done_m,
        slice_meta=slice_meta,
        meta=stack_meta,
    )
