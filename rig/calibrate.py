"""``--mode calibrate``: a guided calibration session on the configured rig.

A person at the bench is prompted for each target placement; the simulated rig moves its
virtual target itself (after the same prompts, or without them with ``--non-interactive``). An unfinished session of the same rig in the
output folder is resumed, provided it was started with the same plan (distances, lens or
stage, focus mode). The result is ``calibration.yaml`` and a ``report/`` folder in the
run folder; set ``calibration.file`` to that file to use it. A calibration file the config
already names plays no part in a new calibration.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from calibration.focus_model import FocusModel
from calibration.report import calibration_document, write_calibration, write_report
from calibration.session import STATE_FILE, CalibrationSession, SessionPlan
from capture.errors import ConfigError, InputError, OutputError, RigError, yaml_problem
from capture.simulated import SimulatedCamera
from capture.sweep import plan_focus_distances
from rig.build import Rig, _focus_map, open_rig
from rig.config import RigConfig, config_to_dict
from rig.runfolder import create_run_folder, write_yaml_atomic

logger = logging.getLogger(__name__)

__all__ = ["CalibrationRun", "run_calibration", "HumanPlacer", "SimulatedPlacer"]


class HumanPlacer:
    """Asks the person at the bench to place the target, and waits for Enter."""

    def __init__(self, ask: Callable[[str], str] = input, *, before_ask: Callable[[], object] | None = None) -> None:
        self._ask = ask
        self._before_ask = before_ask  # e.g. clear a progress bar, so the prompt does not follow it on its line

    def ask(self, prompt: str) -> str:
        if self._before_ask is not None:
            self._before_ask()
        try:
            return self._ask(prompt)
        except (EOFError, KeyboardInterrupt) as exc:
            print(flush=True)  # the error line under the prompt, not after it
            if isinstance(exc, KeyboardInterrupt):
                raise
            # stdin closed (Ctrl-D) or not a terminal (a script, ssh without a tty)
            raise InputError("calibrate: standard input closed while waiting for Enter (Ctrl-D, or no terminal); run it again in a "
                             "terminal to resume where it stopped, or with --non-interactive on the simulated rig") from exc

    def place_texture(self, distance_m: float, *, step: int, total: int) -> None:
        self.ask(f"[{step}/{total}] Place the textured target at {distance_m:.3f} m from the lens datum, "
                 "facing the camera and filling the centre of the view; press Enter (Ctrl-C stops, the session resumes next time) ")

    board_focus_m: float | None = None  # where the session focuses for the board views (it sets this)

    def place_board(self, view: int, *, total: int) -> float | None:
        where = f" about {self.board_focus_m:.2f} m from the lens datum (in focus there)," if self.board_focus_m is not None else ""
        self.ask(f"[{view + 1}/{total}] Hold the chessboard{where} fully in view, tilted differently from the last view; press Enter ")
        return None


class SimulatedPlacer:
    """The simulated rig moves its own virtual targets (and knows where they are).

    Its chessboard is sized to fill about half the (narrow) view at ``board_distance_m``, so
    the board views lie inside the calibrated focus range; :attr:`board_square_m` is what the
    session must use for it.
    """

    def __init__(self, camera: SimulatedCamera, *, board_cols: int, board_rows: int, board_distance_m: float, views: int) -> None:
        from capture.targets import board_poses

        self.camera = camera
        h, w = camera.image_hw
        f_px = camera.lens.focal_length_px
        fill = 0.55
        self.board_cols, self.board_rows = board_cols, board_rows
        # board width (squares + one square of margin on each side) spans `fill` of the view
        self.board_square_m = fill * w * board_distance_m / (f_px * (board_cols + 3))
        self.poses = board_poses(views, width=w, height=h, focal_length_px=f_px, cols=board_cols, rows=board_rows,
                                 square_m=self.board_square_m, fill=(0.45, 0.65))

    def place_texture(self, distance_m: float, *, step: int, total: int) -> None:
        from capture.targets import planar_target_scene

        h, w = self.camera.image_hw
        logger.info("simulated target moved to %.3f m (%d/%d)", distance_m, step, total)
        self.camera.set_scene(planar_target_scene(w, h, distance_m=distance_m, seed=step))

    def place_board(self, view: int, *, total: int) -> float | None:
        from capture.targets import chessboard_scene

        h, w = self.camera.image_hw
        pose = self.poses[view]
        scene = chessboard_scene(w, h, cols=self.board_cols, rows=self.board_rows, square_m=self.board_square_m,
                                 focal_length_px=self.camera.lens.focal_length_px, **pose.as_kwargs())
        self.camera.set_scene(scene)
        return float(pose.distance_m)


class PromptedSimulatedPlacer:
    """The simulated rig without ``--non-interactive``: the prompts a person at the bench would
    see, then the simulator moves its virtual target (nobody can move it by hand, and a session
    that measured a target that never moved wrote a nonsense calibration)."""

    def __init__(self, human: HumanPlacer, simulated: SimulatedPlacer) -> None:
        self.human, self.simulated = human, simulated
        self.board_square_m = simulated.board_square_m

    @property
    def board_focus_m(self) -> float | None:
        return self.human.board_focus_m

    @board_focus_m.setter
    def board_focus_m(self, value: float | None) -> None:  # the session sets it: the prompt names it
        self.human.board_focus_m = value

    def place_texture(self, distance_m: float, *, step: int, total: int) -> None:
        self.human.place_texture(distance_m, step=step, total=total)
        self.simulated.place_texture(distance_m, step=step, total=total)

    def place_board(self, view: int, *, total: int) -> float | None:
        self.human.place_board(view, total=total)
        return self.simulated.place_board(view, total=total)


@dataclass
class CalibrationRun:
    run_dir: Path
    calibration_path: Path
    summary_path: Path
    resumed: bool
    document: dict


def _session_distances(config: RigConfig) -> list[float]:
    s = config.calibration.session
    if s.distances_m is not None:
        return sorted(s.distances_m, reverse=True)
    return [float(d) for d in plan_focus_distances(range_m=config.sweep.range_m, slices=7)]


def _without_calibration_file(config: RigConfig) -> RigConfig:
    return config.model_copy(update={"calibration": config.calibration.model_copy(update={"file": None})})


def _nominal_model(config: RigConfig) -> FocusModel | None:
    """The config's nominal focus model (never its calibration file), or None where it has none."""
    try:
        return _focus_map(_without_calibration_file(config))
    except ConfigError:
        if getattr(config.focus, "nominal", None) is not None:
            raise  # a nominal model that does not fit the focus mode: refused as a single run refuses it
        logger.warning("no nominal focus model (focus.nominal): the coarse sweeps span the actuator's whole limits, which is slower; "
                       "a rough focus.nominal sweeps only around the target distances")
        return None


def _actuator_span(rig: Rig, nominal: FocusModel | None, distances_m: list[float], margin: float = 0.3) -> tuple[float, float]:
    """Actuator values covering the distances in diopters by the *nominal* focus model (never an
    older calibration file: it refuses what it was not calibrated for), widened by ``margin`` of
    the span on each side (the nominal map may be off), within the actuator's limits; the whole
    of the limits without a nominal model."""
    lo, hi = rig.actuator.limits
    if nominal is None:
        return float(lo), float(hi)
    dpt = [1.0 / d for d in distances_m]
    lo_d, hi_d = min(dpt), max(dpt)
    pad = margin * (hi_d - lo_d)
    ends = []
    for d in (max(lo_d - pad, 1e-3), hi_d + pad):
        ends.append(nominal.actuator_value(1.0 / d))
    a, b = sorted(ends)
    ca, cb = float(np.clip(a, lo, hi)), float(np.clip(b, lo, hi))
    unit = rig.actuator.unit
    where = (f"focus.nominal puts the target distances {min(distances_m):.3g}-{max(distances_m):.3g} m (with a {margin:.0%} margin) at "
             f"{a:.4g}..{b:.4g} {unit}, and {rig.actuator.name}'s limits are [{lo:g}, {hi:g}] {unit}")
    if not cb > ca:
        raise ConfigError(f"{where}: nothing of that lies within them; check focus.nominal (and the distances, calibration.session.distances_m)")
    if cb - ca < 0.5 * (b - a):
        logger.warning("%s: the coarse sweeps cover only %.4g..%.4g %s; a target outside that will be refused as at the edge of the sweep",
                       where, ca, cb, unit)
    return ca, cb


def _nominal_values(nominal: FocusModel | None, distances_m: list[float]) -> list[float] | None:
    """The actuator values the nominal model expects at the target distances (None without one,
    or where it cannot say)."""
    if nominal is None:
        return None
    try:
        return [float(nominal.actuator_value(float(d))) for d in distances_m]
    except (RigError, ValueError):
        return None


def _actuator_identity(config: RigConfig) -> str | None:
    """The lens or stage a session measures where it reports no serial number (the session
    prefers one): its driver and port (None: the actuator's name)."""
    port = getattr(config.focus, "port", None)
    return f"{config.focus.driver} on {port}" if port else None


def _find_unfinished(config: RigConfig) -> Path | None:
    out = Path(config.output.dir)
    if not out.is_dir():
        return None
    candidates = sorted((p for p in out.iterdir() if p.is_dir() and p.name.endswith(f"_{config.name}")), reverse=True)
    for run_dir in candidates:
        state = run_dir / "calibration_session" / STATE_FILE
        if state.is_file():
            try:
                doc = yaml.safe_load(state.read_text(encoding="utf-8")) or {}
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
                raise InputError(f"{state}: not a readable calibration session ({yaml_problem(exc)}); "
                                 "move that run folder away to start a new session") from exc
            if not isinstance(doc, dict):
                raise InputError(f"{state}: not a calibration session (expected a mapping); move that run folder away to start a new session")
            # complete but stopped before writing out (a full disk, a kill while writing
            # calibration.yaml: neither it nor summary.yaml, written last, is there): resumed, so
            # that what it measured is written instead of measured again. A calibration.yaml moved
            # away by the user leaves summary.yaml: that session is done
            written = (run_dir / "calibration.yaml").is_file() or (run_dir / "summary.yaml").is_file()
            if not doc.get("complete") or not written:
                return run_dir
    return None


def run_calibration(config: RigConfig, *, interactive: bool, show_progress: bool = True, ask: Callable[[str], str] = input) -> CalibrationRun:
    """Run (or resume) the calibration session the config describes."""
    if config.camera.driver != "simulated" and not interactive:
        raise ConfigError(
            "--non-interactive: on hardware the target must be placed by a person (run without --non-interactive), "
            "or by your own script through calibration.session.CalibrationSession with a TargetPlacer"
        )
    s = config.calibration.session
    distances = _session_distances(config)
    found = _find_unfinished(config)
    resumed = found is not None
    # the session needs no calibration file (an old one is not opened: it may be what is being replaced)
    nominal = _nominal_model(config)
    rig_config = _without_calibration_file(config)
    bar = tqdm(total=0, disable=not show_progress, leave=False, unit="frame")

    def progress(done: int, total: int, label: str) -> None:
        if bar.total != total or done == 1:
            bar.reset(total=total)
        bar.set_description(label)
        bar.n = done
        bar.refresh()

    with bar, open_rig(rig_config, need_focus_map=nominal is not None) as rig:
        placer: HumanPlacer | SimulatedPlacer | PromptedSimulatedPlacer = HumanPlacer(ask, before_ask=bar.clear)
        if isinstance(rig.camera, SimulatedCamera):
            middle_m = 2.0 / (1.0 / min(distances) + 1.0 / max(distances))
            simulated = SimulatedPlacer(rig.camera, board_cols=s.board.cols, board_rows=s.board.rows, board_distance_m=middle_m,
                                        views=s.board_views)
            placer = simulated if not interactive else PromptedSimulatedPlacer(placer, simulated)
        plan = SessionPlan(
            distances_m=distances, actuator_span=_actuator_span(rig, nominal, distances), coarse_steps=s.coarse_steps,
            fine_steps=s.fine_steps, roi_fraction=s.roi_fraction, degree=s.degree, settle_timeout_s=config.sweep.settle_timeout_s,
            breathing=s.breathing, breathing_steps=s.breathing_steps, intrinsics=s.intrinsics,
            board_cols=s.board.cols, board_rows=s.board.rows, board_views=s.board_views,
            board_square_m=getattr(placer, "board_square_m", s.board.square_mm / 1000.0),
            actuator_identity=_actuator_identity(config), span_from_nominal=nominal is not None,
            nominal_values=_nominal_values(nominal, distances), keep_sweeps=s.keep_sweeps,
        )
        # the run folder only now, with the plan made: a failure before leaves none behind; from
        # here on the session folder holds its state at once, so the run folder is resumable
        if found is None:
            run_dir = create_run_folder(config.output.dir, config.name, min_free_gb=config.output.min_free_gb)
            write_yaml_atomic(run_dir / "config.yaml", config_to_dict(config))
        else:
            run_dir = found
        session = CalibrationSession(rig.camera, rig.actuator, placer, plan, run_dir / "calibration_session", progress=progress)
        if resumed and session.restarted:  # it measured nothing and takes this plan: config.yaml is the config as run
            write_yaml_atomic(run_dir / "config.yaml", config_to_dict(config))
        if resumed:
            logger.warning("resuming the unfinished calibration session in %s", found)
        try:
            result = session.run()
        except BaseException as exc:  # Ctrl-C included: the command line says where the session waits to resume
            exc.run_dir = run_dir  # type: ignore[attr-defined]
            exc.run_note = "the calibration session resumes there when run again with this config"  # type: ignore[attr-defined]
            raise
        identity = {
            "name": config.name, "camera": rig.camera.name, "focus": rig.actuator.name,
            "camera_driver": config.camera.driver, "focus_driver": config.focus.driver,
            "camera_identity": {str(k): str(v) for k, v in (getattr(rig.camera, "identity", None) or {}).items()},
            "focus_identity": {str(k): str(v) for k, v in (getattr(rig.actuator, "identity", None) or {}).items()},
            "actuator_unit": rig.actuator.unit,
        }
    session_doc = {"distances_m": distances, "actuator_span": list(plan.actuator_span), "coarse_steps": plan.coarse_steps,
                   "fine_steps": plan.fine_steps, "roi_fraction": plan.roi_fraction, "degree": plan.degree}
    doc = calibration_document(result, rig=identity, session=session_doc)
    fit = result.fit
    try:
        calibration_path = write_calibration(doc, run_dir / "calibration.yaml")
    except OSError as exc:  # a full disk: the session's measurements stay in its folder, resumable
        raise OutputError(f"{run_dir / 'calibration.yaml'}: cannot write ({exc.strerror or exc}); the session in {run_dir} keeps "
                          "every measurement: free space and run the calibration again to write it out") from exc
    target = run_dir / "report"
    try:
        summary_path = write_report(result, target, doc=doc, calibration_path=calibration_path)
        target = run_dir / "summary.yaml"
        write_yaml_atomic(target, {
            "mode": "calibrate", "resumed": resumed, "calibration": str(calibration_path), "report": str(summary_path),
            "focus_rms_dpt": round(fit.rms_dpt, 6), "focus_loo_rms_dpt": round(fit.loo_rms_dpt, 6),
        })
    except OSError as exc:
        raise OutputError(f"{target}: cannot write ({exc.strerror or exc}); {calibration_path} was written and is usable") from exc
    if math.isfinite(fit.loo_rms_dpt) and fit.loo_rms_dpt > 0.05:
        # one point far off (named above) is a target's distance, not the model's shape
        advice = "the target named above" if fit.suspects else "the target distances, or try calibration.session.degree: 2"
        logger.warning("leave-one-out error %.3f dpt is large: check %s", fit.loo_rms_dpt, advice)
    return CalibrationRun(run_dir=run_dir, calibration_path=calibration_path, summary_path=summary_path, resumed=resumed, document=doc)
