"""A lab calibration session: focus distances, focus breathing, intrinsics; resumable.

The session drives an open camera and focus actuator and asks a :class:`TargetPlacer` to put
the target where it is needed: a person at the bench (prompted in the terminal), or the
simulated rig, which moves its virtual target itself. Progress is saved to ``session.yaml``
in the session folder after every step, so an interrupted session resumes where it stopped.
The state records the plan it was started with (distances, actuator, focus mode); a session is
resumed only with the same plan. A fit that fails because some peaks are out of order drops
those measurements, so running the session again re-measures them.

Steps:
1. for each known distance: place a textured target, sweep the actuator coarsely over the
   whole span, then finely around the sharpest setting; the refined peak is the actuator value
   that focuses there (:mod:`calibration.focus_fit`); then fit the focus model;
2. focus breathing: with the target at a middle distance, frames across the calibrated
   actuator span are registered to each other (:mod:`calibration.alignment`);
3. intrinsics: chessboard views at several poses (:mod:`calibration.intrinsics`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import yaml

from calibration.focus_fit import FlatSharpness, FocusFit, NonMonotonicPeaks, PeakAtSweepEdge, SharpnessCurve, fit_focus_model, refine_peak, sharpness
from calibration.focus_model import FocusModel
from capture.atomic import write_text_atomic
from capture.devices import Camera, FocusActuator, Frame
from capture.errors import CalibrationError, InputError, OutputError
from capture.imageio import read_image, write_image
from capture.stack import SliceStreamWriter
from capture.sweep import settle_wait_s, slice_entry

logger = logging.getLogger(__name__)

__all__ = ["SessionPlan", "TargetPlacer", "CalibrationSession", "ImplausiblePeaks", "STATE_FILE"]

STATE_FILE = "session.yaml"

#: the measured peaks' spread (nearest to farthest target) against the nominal model's: under
#: the first (in size) they do not follow the targets (a target never moved, a lens that does not
#: respond) and are refused; reversed or over the second, focus.nominal is off (a warning)
PEAK_SPREAD_RATIO_RANGE = (0.2, 5.0)
#: how many times a coarse sweep whose peak is at one end goes on past it (by half its span)
EDGE_EXTENSIONS = 2


class ImplausiblePeaks(CalibrationError):
    """The sharpness peaks do not follow the target distances; the measurements were dropped."""


class TargetPlacer(Protocol):
    """Whoever puts the calibration target in front of the camera."""

    def place_texture(self, distance_m: float, *, step: int, total: int) -> None:
        """A textured planar target, facing the camera, at ``distance_m`` from the datum."""

    def place_board(self, view: int, *, total: int) -> float | None:
        """The chessboard in its ``view``-th pose; returns its distance in metres where known
        (None: the session keeps focus at :attr:`board_focus_m`, which it sets before the first
        view on placers that have that attribute, so a person can be told where to hold it)."""


@dataclass
class SessionPlan:
    """What the session measures (from ``calibration.session`` in rig.yaml)."""

    distances_m: list[float]
    actuator_span: tuple[float, float]
    coarse_steps: int = 25
    fine_steps: int = 15
    roi_fraction: float = 0.5
    degree: int = 1
    settle_timeout_s: float = 1.0
    span_from_nominal: bool = True  # actuator_span from a nominal focus model (else the actuator's whole limits)
    breathing: bool = True
    breathing_steps: int = 9
    intrinsics: bool = True
    board_cols: int = 9
    board_rows: int = 6
    board_square_m: float = 0.025
    board_views: int = 10
    #: the lens or stage measured where it reports no serial number (e.g. its driver and port;
    #: None: its name); one that reports a serial number is known by that
    actuator_identity: str | None = None
    #: the actuator values the nominal focus model expects at ``distances_m`` (same order), where
    #: there is one: measured peaks that do not follow them at all are refused (:class:`ImplausiblePeaks`)
    nominal_values: list[float] | None = None
    #: keep each target's raw sweep (and the breathing sweep) as a focal-stack folder in ``sweeps/``
    keep_sweeps: bool = True


def _same_distance(a: float, b: float) -> bool:
    return round(float(a), 9) == round(float(b), 9)


@dataclass
class SessionState:
    curves: list[SharpnessCurve] = field(default_factory=list)
    breathing: dict[str, Any] | None = None
    board_views_done: int = 0
    complete: bool = False
    #: what the session was started with: distances_m, actuator, focus_mode (None: an older session file)
    plan: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan, "curves": [c.to_dict() for c in self.curves], "breathing": self.breathing,
                "board_views_done": self.board_views_done, "complete": self.complete}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> SessionState:
        return cls(curves=[SharpnessCurve.from_dict(c) for c in doc.get("curves") or []], breathing=doc.get("breathing"),
                   board_views_done=int(doc.get("board_views_done", 0)), complete=bool(doc.get("complete", False)),
                   plan=doc.get("plan") if isinstance(doc.get("plan"), dict) else None)


@dataclass
class SessionResult:
    fit: FocusFit
    curves: list[SharpnessCurve]
    breathing: Any | None
    intrinsics: Any | None
    temperatures_c: list[float]


class CalibrationSession:
    """Runs (or resumes) a session in ``folder`` on an open camera and actuator.

    A new session writes its state (with the plan) at once, so the folder is resumable from
    the start. An unfinished session in ``folder`` is resumed only with the same plan.

    Args:
        progress: called as ``progress(done, total, label)`` after each frame.

    Raises:
        InputError: ``folder`` holds an unfinished session started with another plan (other
            distances, another lens or stage, another focus mode).
    """

    def __init__(
        self, camera: Camera, actuator: FocusActuator, placer: TargetPlacer, plan: SessionPlan, folder: Path,
        *, progress: Callable[[int, int, str], None] | None = None,
    ) -> None:
        self.camera, self.actuator, self.placer, self.plan = camera, actuator, placer, plan
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.restarted = False  # an unfinished session that had measured nothing took this plan
        self.state = self._load_state()

    # ------------------------------------------------------------------ state
    def plan_identity(self) -> dict[str, Any]:
        """What a resumed session must share with the one it continues."""
        ident = getattr(self.actuator, "identity", None) or {}
        serial = ident.get("serial_number") if isinstance(ident, dict) else None
        identity = f"serial number {serial}" if serial not in (None, "") else (self.plan.actuator_identity or self.actuator.name)
        mode = getattr(self.actuator, "mode", None)
        h, w = self.camera.image_hw
        return {
            "distances_m": [float(d) for d in self.plan.distances_m],
            "actuator": str(identity),
            "focus_mode": f"{mode} ({self.actuator.unit})" if isinstance(mode, str) else self.actuator.unit,
            # breathing tables and board views are per image size: a session is not continued at another
            "image_size": f"{w}x{h} px",
        }

    def _load_state(self) -> SessionState:
        path = self.folder / STATE_FILE
        plan = self.plan_identity()
        if not path.is_file():
            state = SessionState(plan=plan)
            self.state = state
            self._save_state()  # resumable from the start
            return state
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        try:
            state = SessionState.from_dict(doc)
            measured = _measured_anything(state)
            if measured:
                self._check_plan(state, plan)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a hand-edited or damaged file
            what = f"missing {exc.args[0]!r}" if isinstance(exc, KeyError) else str(exc) or type(exc).__name__
            raise InputError(f"{path}: not a readable calibration session ({what}); move that run folder away to start a new session") from exc
        if state.plan is None or not measured:
            # an older session file: from now on it carries the plan; a session that measured
            # nothing yet (it failed at its first target) takes the plan it is run with now
            self.restarted = state.plan is not None and state.plan != plan
            state.plan = plan
        if measured:
            logger.info("resuming the session in %s: %d distances done", self.folder, len(state.curves))
        else:
            logger.info("the session in %s had measured nothing yet: it starts again with this plan", self.folder)
        return state

    def _check_plan(self, state: SessionState, plan: dict[str, Any]) -> None:
        """Refuse to resume a session started with another plan (one line, naming the folder)."""
        diffs = []
        old = state.plan or {}
        if "distances_m" in old:
            was = sorted(round(float(d), 9) for d in old["distances_m"])
            now = sorted(round(float(d), 9) for d in plan["distances_m"])
            if was != now:
                diffs.append(f"distances_m {was} m, now {now} m")
        else:  # an older session file: at least its measured distances must be planned
            stray = [c.distance_m for c in state.curves if not any(_same_distance(c.distance_m, d) for d in plan["distances_m"])]
            if stray:
                diffs.append(f"measured distances {sorted(stray)} m that the plan {sorted(plan['distances_m'])} m lacks")
        for key, label in (("actuator", "actuator"), ("focus_mode", "focus mode"), ("image_size", "image size")):
            if key in old and str(old[key]) != str(plan[key]):
                diffs.append(f"{label} {old[key]}, now {plan[key]}")
        if diffs:
            raise InputError(
                f"{self.folder}: this unfinished calibration session was started with another plan ({'; '.join(diffs)}); "
                "move that folder away to start a new session, or restore the plan it was started with"
            )

    def _save_state(self) -> None:
        path = self.folder / STATE_FILE
        try:
            write_text_atomic(path, yaml.safe_dump(self.state.to_dict(), sort_keys=False))
        except OSError as exc:  # a full disk: the last saved state stays whole (atomic write)
            raise OutputError(f"{path}: cannot save the calibration session ({exc.strerror or exc}); it keeps what it saved "
                              "before this step: free space and run the calibration again to resume") from exc

    # ------------------------------------------------------------------ capture helpers
    def _grab_at(self, value: float) -> tuple[Frame, dict[str, Any]]:
        """The first frame after the actuator settled at ``value``, and its per-slice keys."""
        self.actuator.move_to(value)
        t_ready = self.actuator.wait_settled(timeout_s=settle_wait_s(self.plan.settle_timeout_s, self.actuator))
        frame = self.camera.grab(start_after_host_s=t_ready)
        return frame, slice_entry(frame, self.actuator)

    def _sweep(self, values: np.ndarray, label: str, kept: SliceStreamWriter | None = None) -> list[float]:
        """Sharpness at each value; with ``kept``, each frame (with its keys and sharpness) is written there as it comes."""
        scores = []
        for i, v in enumerate(values):
            frame, entry = self._grab_at(float(v))
            score = sharpness(frame.image, roi_fraction=self.plan.roi_fraction)
            scores.append(score)
            if kept is not None:
                entry["sharpness"] = round(float(score), 8)
                with _keeping_sweeps():
                    kept.add(frame.image, entry)
            if self.progress is not None:
                self.progress(i + 1, len(values), label)
        return scores

    def _sweep_writer(self, name: str) -> SliceStreamWriter | None:
        """Where a sweep's frames go as they are grabbed (None with keep_sweeps off)."""
        if not self.plan.keep_sweeps:
            return None
        with _keeping_sweeps():
            return SliceStreamWriter(self.folder / "sweeps" / name)

    def _ascending_is_nearer(self) -> tuple[bool, str]:
        """Whether a larger actuator value focuses nearer, and what says so: the nominal focus
        model where the plan has it, else the usual convention (more lens current or focal power)."""
        nominal = self.plan.nominal_values
        if nominal is not None and len(nominal) >= 2:
            pairs = sorted(zip(self.plan.distances_m, nominal, strict=True))
            if pairs[0][1] != pairs[-1][1]:
                return pairs[0][1] > pairs[-1][1], "focus.nominal"
        return True, "assumed (no focus.nominal): a larger actuator value focuses nearer"

    def _finish_sweep(self, kept: SliceStreamWriter, *, capture: dict[str, Any], focus_distance_m: list[float] | None = None) -> Path:
        """Close a kept sweep as a focal-stack folder ``sweeps/<name>`` (FOCAL_STACK_FORMAT.md:
        calibration sessions keep their raw sweeps in it), slices in capture order. Without
        ``focus_distance_m`` (a target's sweep: what focus each value gives is being measured)
        each slice carries a ``focus_index``, its rank by actuator value, larger for nearer focus
        (by focus.nominal here; the fitted model corrects it at the end of the session).
        Replaces an earlier sweep of that name (a measurement taken again)."""
        meta: dict[str, Any] = {"capture": {"kind": "calibration sweep", **capture, "camera": self.camera.name,
                                            "focus": self.actuator.name, "roi_fraction": self.plan.roi_fraction}}
        bits = getattr(self.camera, "significant_bits", None)
        if isinstance(bits, int) and bits < 16 and kept.dtype == np.uint16:
            meta["significant_bits"] = bits
        with _keeping_sweeps():
            if focus_distance_m is not None:
                return kept.finish(meta=meta, focus_distance_m=focus_distance_m)
            nearer_up, basis = self._ascending_is_nearer()
            meta["capture"]["focus_index_from"] = f"rank by actuator value, larger nearer ({basis})"
            return kept.finish(meta=meta, focus_index=_ranks([float(e["actuator_value"]) for e in kept.entries], nearer_up))

    def measure_distance(self, distance_m: float) -> SharpnessCurve:
        """Coarse sweep over the plan's span, fine sweep around its peak; the refined peak.

        A peak at an end of the span (the nominal model is off, or the sharpness curve is wider
        than the span's margin: a narrow range of targets) extends the coarse sweep beyond that
        end by half the span, within the actuator's limits, up to :data:`EDGE_EXTENSIONS` times.
        """
        kept = self._sweep_writer(f"target_{distance_m:.6g}m")
        try:
            return self._measure(distance_m, kept)
        except BaseException:
            if kept is not None:
                kept.abort()
            raise

    def _measure(self, distance_m: float, kept: SliceStreamWriter | None) -> SharpnessCurve:
        lo, hi = self.plan.actuator_span
        coarse = np.linspace(lo, hi, self.plan.coarse_steps)
        step = coarse[1] - coarse[0]
        coarse_scores = np.asarray(self._sweep(coarse, f"{distance_m:.3f} m coarse", kept), dtype=float)
        last_value = float(coarse[-1])  # where the actuator stands
        for extension in range(EDGE_EXTENSIONS + 1):
            try:
                refine_peak(coarse, coarse_scores, distance_m=distance_m, half_window=1)  # raises on no peak / edge
                break
            except (PeakAtSweepEdge, FlatSharpness) as exc:
                # at an edge: on past it; flat: the curve may be wider than the span, so on past both ends
                edges = [exc.edge] if isinstance(exc, PeakAtSweepEdge) else ["far", "near"]
                more = np.concatenate([self._beyond_edge(coarse, step, e) for e in edges]) if extension < EDGE_EXTENSIONS else np.empty(0)
                if more.size == 0:
                    if isinstance(exc, FlatSharpness):
                        raise
                    how = ("" if extension == 0 else f", then {extension} times by half the span" +
                           (" (the actuator's limits stopped it)" if extension < EDGE_EXTENSIONS else ""))
                    raise self._edge_error(exc, float(coarse[0]), float(coarse[-1]), extended=how) from exc
                logger.info("target at %.3f m: %s over %.4g..%.4g %s; sweeping on past %s", distance_m,
                            "sharpest at the " + exc.edge + " end" if isinstance(exc, PeakAtSweepEdge) else "no clear peak",
                            coarse[0], coarse[-1], self.actuator.unit, " and ".join(f"the {e} end" for e in edges))
                more_scores = np.asarray(self._sweep(more, f"{distance_m:.3f} m coarse+", kept), dtype=float)
                last_value = float(more[-1])
                coarse = np.concatenate([coarse, more])
                coarse_scores = np.concatenate([coarse_scores, more_scores])
                order = np.argsort(coarse)
                coarse, coarse_scores = coarse[order], coarse_scores[order]
        i = int(np.argmax(coarse_scores))
        fine = np.linspace(coarse[i] - 1.5 * step, coarse[i] + 1.5 * step, self.plan.fine_steps)
        fine = fine[(fine >= coarse.min()) & (fine <= coarse.max())]
        if fine.size > 1 and (last_value - fine[0]) * (fine[1] - fine[0]) > 0:
            # the coarse sweep ended beyond the fine one's start: come back past it, so every fine
            # point is approached in the sweep's own direction (a lead screw's backlash, a
            # lens's hysteresis would shift the first point alone)
            lim_lo, lim_hi = self.actuator.limits
            self.actuator.move_to(float(np.clip(fine[0] - (fine[1] - fine[0]), lim_lo, lim_hi)))
            self.actuator.wait_settled(timeout_s=settle_wait_s(self.plan.settle_timeout_s, self.actuator))
        fine_scores = self._sweep(fine, f"{distance_m:.3f} m fine", kept)
        values = np.concatenate([coarse, fine])
        scores = np.concatenate([coarse_scores, fine_scores])
        order = np.argsort(values)
        # the coarse sweep showed a peak: the fine samples, all near its top, would lift the median of a contrast check
        peak = refine_peak(values[order], scores[order], distance_m=distance_m, check_contrast=False)
        temperature_c = self.actuator.temperature_c()
        if kept is not None:
            # before the measurement is saved: a sweep that cannot be kept (a full disk) is measured again next time
            capture = {"target_distance_m": float(distance_m), "peak_actuator_value": round(float(peak), 6)}
            if temperature_c is not None:
                capture["lens_temperature_c"] = round(float(temperature_c), 3)
            self._finish_sweep(kept, capture=capture)
        return SharpnessCurve(distance_m=distance_m, values=values[order].tolist(), sharpness=scores[order].tolist(),
                              temperature_c=temperature_c, peak_value=peak)

    def _beyond_edge(self, coarse: np.ndarray, step: float, edge: str) -> np.ndarray:
        """Coarse values past the ``edge`` end ("near": the highest values, "far": the lowest) of
        the sweep so far, half the plan's span at its step, within the actuator's limits, in the
        order they are swept (outward)."""
        lim_lo, lim_hi = sorted(float(v) for v in self.actuator.limits)
        lo, hi = self.plan.actuator_span
        count = max(2, int(math.ceil(0.5 * abs(hi - lo) / abs(step))))
        outward = np.arange(1, count + 1) * abs(step)
        values = coarse.max() + outward if edge == "near" else coarse.min() - outward
        return values[(values >= lim_lo - 1e-9) & (values <= lim_hi + 1e-9)]

    def _edge_error(self, exc: PeakAtSweepEdge, lo: float, hi: float, *, extended: str) -> CalibrationError:
        """Say which sweep the peak was at the edge of, and what sets it (refine_peak knows neither);
        ``extended`` says how the sweep went on past the plan's span ("" where it did not)."""
        unit = self.actuator.unit
        if self.plan.span_from_nominal:
            why = (f"the span focus.nominal gives the target distances, with a margin, within {self.actuator.name}'s limits"
                   f"{extended}); check the target's distance, then focus.nominal and the actuator's limits")
        else:
            why = f"{self.actuator.name}'s whole limits, without a focus.nominal); check the target's distance and the actuator's limits"
        return CalibrationError(f"{exc.what} ({lo:.4g}..{hi:.4g} {unit}: {why}")

    # ------------------------------------------------------------------ the steps
    def run(self) -> SessionResult:
        plan = self.plan
        done = {round(c.distance_m, 9) for c in self.state.curves}
        for k, distance_m in enumerate(plan.distances_m):
            if round(distance_m, 9) in done:
                continue
            self.placer.place_texture(distance_m, step=k + 1, total=len(plan.distances_m))
            curve = self.measure_distance(distance_m)
            self.state.curves.append(curve)
            self._save_state()
            logger.info("target at %.3f m: focused at %.4f %s", distance_m, curve.peak_value, self.actuator.unit)
        curves = sorted(self.state.curves, key=lambda c: c.distance_m)
        self._check_peaks_follow_targets(curves)  # before the fit: a target never moved also gives peaks out of order
        try:
            fit = fit_focus_model(
                [c.distance_m for c in curves], [float(c.peak_value) for c in curves], unit=self.actuator.unit,
                degree=plan.degree, temperatures_c=[c.temperature_c for c in curves],
            )
        except NonMonotonicPeaks as exc:
            # drop the out-of-order measurements, so that running the session again re-measures them
            self.state.curves = [c for c in self.state.curves if not any(_same_distance(c.distance_m, d) for d in exc.distances_m)]
            self._save_state()
            which = ", ".join(f"{d:.3f} m" for d in exc.distances_m)
            raise NonMonotonicPeaks(
                f"{exc}; the session in {self.folder} dropped the measurement at {which}: "
                "place the target again and run the calibration again to re-measure it",
                distances_m=exc.distances_m,
            ) from exc
        if plan.keep_sweeps:
            self._orient_kept_sweeps(fit.model)
        breathing = self._breathing(fit.model) if plan.breathing else None
        intrinsics = self._intrinsics(fit.model) if plan.intrinsics else None
        self.state.complete = True
        self._save_state()
        temps = [float(c.temperature_c) for c in curves if c.temperature_c is not None]
        return SessionResult(fit=fit, curves=curves, breathing=breathing, intrinsics=intrinsics, temperatures_c=temps)

    def _orient_kept_sweeps(self, model: FocusModel) -> None:
        """The kept target sweeps' focus indices by the fitted model's direction (they were
        ranked by focus.nominal's, or by the usual convention without one): a sweep ranked the
        other way has its indices reversed in its stack.yaml (the images stay)."""
        lo, hi = model.valid_values if getattr(model, "valid_values", None) else (None, None)  # type: ignore[union-attr]
        if lo is None or lo == hi:
            return
        nearer_up = bool(model.focus_dpt(float(hi)) > model.focus_dpt(float(lo)))  # type: ignore[attr-defined]
        for path in sorted((self.folder / "sweeps").glob("target_*/stack.yaml")):
            try:
                doc = yaml.safe_load(path.read_text(encoding="utf-8"))
                slices = doc["slices"]
                values = [float(e["actuator_value"]) for e in slices]
                index = [int(e["focus_index"]) for e in slices]
            except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as exc:
                logger.warning("%s: not re-ranked by the fitted focus model (%s)", path, exc)
                continue
            wanted = _ranks(values, nearer_up)
            basis = "rank by actuator value, larger nearer (the fitted focus model)"
            if wanted == index and doc.get("capture", {}).get("focus_index_from") == basis:
                continue
            for entry, i in zip(slices, wanted, strict=True):
                entry["focus_index"] = i
            doc.setdefault("capture", {})["focus_index_from"] = basis
            try:
                write_text_atomic(path, yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
            except OSError as exc:
                logger.warning("%s: could not re-rank it by the fitted focus model (%s)", path, exc.strerror or exc)

    def _check_peaks_follow_targets(self, curves: list[SharpnessCurve]) -> None:
        """Refuse peaks that hardly move from the nearest to the farthest target (their spread
        under a fifth of what the nominal model expects): a target never moved between the
        steps, or a lens that does not respond, gives a fit with a small residual and a
        nonsense slope. Those measurements are dropped, so running the session again measures
        them anew (kept, they would be refused for ever). Peaks that move the other way than
        focus.nominal says, or far more, are measurements of a nominal model that is off: kept,
        with a warning naming it."""
        nominal = self.plan.nominal_values
        if nominal is None or len(curves) < 2:
            return
        expected = dict(zip((round(float(d), 9) for d in self.plan.distances_m), nominal, strict=True))
        near, far = curves[0], curves[-1]  # sorted by distance
        want = expected.get(round(near.distance_m, 9), math.nan) - expected.get(round(far.distance_m, 9), math.nan)
        got = float(near.peak_value) - float(far.peak_value)
        if not (math.isfinite(want) and want != 0):
            return
        ratio = got / want
        lo, hi = PEAK_SPREAD_RATIO_RANGE
        unit = self.actuator.unit
        peaks = [float(c.peak_value) for c in curves]
        what = (f"{min(peaks):.4g}..{max(peaks):.4g} {unit} for targets at {near.distance_m:.3g}..{far.distance_m:.3g} m, where "
                f"focus.nominal expects {min(nominal):.4g}..{max(nominal):.4g} {unit}")
        if abs(ratio) >= lo:
            if ratio < 0 or ratio > hi:
                logger.warning("the sharpness peaks move %s than focus.nominal says (%s; spread %.2gx): the calibration is "
                               "measured and kept; correct focus.nominal (its sign or scale) for sweeps planned without this file",
                               "the other way" if ratio < 0 else "much further", what, ratio)
            return
        self.state.curves = []
        self._save_state()
        raise ImplausiblePeaks(
            f"the sharpness peaks do not follow the targets: {what} (spread {ratio:.2g}x the expected); was the target moved "
            f"to each distance, and does {self.actuator.name} change focus? The session in {self.folder} dropped these "
            f"{len(peaks)} measurements: run the calibration again to measure them anew"
        )

    def _breathing(self, model: FocusModel) -> Any:
        from calibration.alignment import BreathingModel, fit_breathing

        if self.state.breathing is not None:
            return BreathingModel.from_dict(self.state.breathing)
        near, far = model.valid_range_m  # type: ignore[union-attr]
        middle_m = _middle_m(model)
        self.placer.place_texture(middle_m, step=1, total=1)
        # the table covers whatever the focus model accepts: its calibrated range and its span
        ends = [model.actuator_value(near), model.actuator_value(far), *(getattr(model, "valid_values", None) or ())]
        lim_lo, lim_hi = self.actuator.limits
        lo_v, hi_v = float(np.clip(min(ends), lim_lo, lim_hi)), float(np.clip(max(ends), lim_lo, lim_hi))
        values = np.linspace(lo_v, hi_v, self.plan.breathing_steps)
        kept = self._sweep_writer("breathing")
        try:
            frames, sent = [], []
            for i, v in enumerate(values):
                frame, entry = self._grab_at(float(v))
                frames.append(frame.image)  # the breathing fit needs them all (breathing_steps frames, 9 by default)
                sent.append(float(entry["actuator_value"]))
                if kept is not None:
                    with _keeping_sweeps():
                        kept.add(frame.image, entry)
                if self.progress is not None:
                    self.progress(i + 1, len(values), "breathing")
            breathing = fit_breathing(frames, [float(v) for v in values], actuator_unit=self.actuator.unit,
                                      tolerance_frac=_breathing_tolerance(model, hi_v - lo_v))
            if kept is not None:
                distances = _distances_or_none(model, sent)
                capture = {"target_distance_m": float(middle_m)}
                if distances is None:
                    self._finish_sweep(kept, capture=capture)
                else:
                    self._finish_sweep(kept, capture=capture, focus_distance_m=distances)
        except BaseException:
            if kept is not None:
                kept.abort()
            raise
        self.state.breathing = breathing.to_dict()
        self._save_state()
        return breathing

    def _intrinsics(self, model: FocusModel) -> Any:
        from calibration.intrinsics import BoardSizeMismatch, calibrate_intrinsics

        views_dir = self.folder / "intrinsics_views"
        views_dir.mkdir(exist_ok=True)
        total = self.plan.board_views
        # a board held where the placer does not say is held in focus at the middle of the
        # calibrated range (in diopters): focus stayed wherever the breathing sweep left it, at
        # one end of the range, and the board was blurred in every view
        middle_m = _middle_m(model)
        if hasattr(self.placer, "board_focus_m"):
            self.placer.board_focus_m = middle_m  # type: ignore[attr-defined]
        for view in range(self.state.board_views_done, total):
            placed_m = self.placer.place_board(view, total=total)
            distance_m = middle_m if placed_m is None else placed_m
            try:
                value = model.actuator_value(distance_m)
                lo, hi = self.actuator.limits
                self.actuator.move_to(float(np.clip(value, lo, hi)))
                self.actuator.wait_settled(timeout_s=settle_wait_s(self.plan.settle_timeout_s, self.actuator))
            except CalibrationError:
                logger.warning("board view %d at %.3f m lies outside the calibrated focus range; left focus as it was", view, distance_m)
            image = self.camera.grab(start_after_host_s=time.monotonic()).image
            write_image(views_dir / f"view_{view:02d}.png", image)
            self.state.board_views_done = view + 1
            self._save_state()
            if self.progress is not None:
                self.progress(view + 1, total, "chessboard views")
        view_files = sorted(views_dir.glob("view_*.png"))
        images = [read_image(p) for p in view_files]
        try:
            return calibrate_intrinsics(images, cols=self.plan.board_cols, rows=self.plan.board_rows, square_m=self.plan.board_square_m)
        except BoardSizeMismatch as exc:
            # the settings are wrong, not the views: keep them, to be fitted at the right size
            raise CalibrationError(
                f"calibration.session.board: {exc}; the session in {self.folder} keeps its {len(view_files)} board views: "
                "fix cols and rows in the config and run the calibration again to fit them"
            ) from exc
        except CalibrationError as exc:
            # the views are what failed: set them aside so that running the session again asks
            # for new ones (it used to refit the same views and fail the same way, forever)
            rejected = views_dir.with_name(f"{views_dir.name}_rejected_{time.strftime('%Y%m%dT%H%M%S')}")
            views_dir.rename(rejected)
            self.state.board_views_done = 0
            self._save_state()
            raise CalibrationError(
                f"{exc}; the session in {self.folder} set those {len(view_files)} views aside ({rejected.name}) and keeps "
                "what it measured: run the calibration again to take new board views"
            ) from exc


def _ranks(values: list[float], nearer_up: bool) -> list[int]:
    """Each value's rank (0 = smallest; a repeated value in the order given), reversed where a
    larger value focuses farther: focus indices, larger for nearer focus."""
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    rank = {i: r for r, i in enumerate(order)}
    return [rank[i] if nearer_up else len(values) - 1 - rank[i] for i in range(len(values))]


@contextmanager
def _keeping_sweeps() -> Iterator[None]:
    """A raw sweep that cannot be written (a full disk) says what to do about it."""
    try:
        yield
    except OutputError as exc:
        raise OutputError(f"{exc}; the raw sweeps (calibration.session.keep_sweeps) need room: free some space, or set "
                          "keep_sweeps: false; the session keeps what it measured before this step") from exc


def _distances_or_none(model: FocusModel, values: list[float]) -> list[float] | None:
    """The focus distance the just-fitted model gives each value (a breathing sweep's slices),
    or None where one is not a usable distance (then the sweep is kept with focus indices)."""
    out = []
    for v in values:
        try:
            d = float(model.focus_distance_m(v))
        except (CalibrationError, ValueError, ZeroDivisionError):
            return None
        if not (d > 0):
            return None
        out.append(d)
    return out if len({round(d, 12) for d in out}) == len(out) else None


def _measured_anything(state: SessionState) -> bool:
    return bool(state.curves) or state.breathing is not None or state.board_views_done > 0


def _middle_m(model: FocusModel) -> float:
    """The middle of the model's calibrated range in diopters, as a distance in metres."""
    near, far = model.valid_range_m  # type: ignore[union-attr]
    return 2.0 / (1.0 / near + (0.0 if math.isinf(far) else 1.0 / far))


def _breathing_tolerance(model: FocusModel, span: float) -> float:
    """The breathing table's overshoot allowance (a fraction of its span) that matches the focus
    model's: its ``tolerance_dpt`` in actuator units at the ends of the calibrated span
    (:meth:`~calibration.focus_model.PolynomialFocusModel.value_tolerance`)."""
    from calibration.alignment import DEFAULT_TOLERANCE_FRAC

    value_tolerance = getattr(model, "value_tolerance", None)
    tol = value_tolerance() if callable(value_tolerance) else None
    if tol is None or not span > 0:
        return DEFAULT_TOLERANCE_FRAC
    return float(min(0.5, max(DEFAULT_TOLERANCE_FRAC, 1.001 * max(tol) / span)))
