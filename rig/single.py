"""Single-stack mode: open the rig, sweep once, write the stack and its depth, summarise."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from capture.errors import RigError
from capture.imageio import write_image
from capture.scenes import texture_poor_mask
from capture.stack import FocalStack
from capture.sweep import SweepInterrupted
from reconstruct.api import reconstruct_stack
from reconstruct.metrics import depth_metrics
from reconstruct.result import DepthResult, write_result
from rig.build import calibration_record, check_focus_map, check_reconstruction, open_rig
from rig.config import RigConfig, config_to_dict
from rig.runfolder import create_run_folder, write_yaml_atomic

logger = logging.getLogger(__name__)

__all__ = ["SingleRun", "run_single", "save_incomplete"]


@dataclass
class SingleRun:
    run_dir: Path
    stack: FocalStack
    result: DepthResult
    seconds: dict[str, float]
    accuracy: dict[str, float] | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def save_incomplete(err: SweepInterrupted, folder: Path) -> Path:
    """Keep the slices of a cut-short sweep in ``<folder>.incomplete/`` with ``reason.txt``.

    With two or more slices the folder is a readable stack (stack.yaml); with one, the image
    alone. Keeping partial data is best effort: a failure here is logged, not raised, so the
    original error is what the user sees.
    """
    target = folder.with_name(folder.name + ".incomplete")
    try:
        if len(err.frames) >= 2:
            images = np.stack([f.image for f in err.frames])
            FocalStack(images, focus_distance_m=err.distances_m, slice_meta=err.slice_meta).write(target)
        else:
            target.mkdir(parents=True, exist_ok=True)
            for i, frame in enumerate(err.frames):
                write_image(target / f"slice_{i:02d}.png", frame.image)
        (target / "reason.txt").write_text(str(err) + "\n", encoding="utf-8")
    except Exception:
        logger.exception("could not keep the partial stack in %s", target)
    return target


def run_single(config: RigConfig, *, show_progress: bool = True) -> SingleRun:
    """Capture one stack on the configured rig, reconstruct it, and write the run folder."""
    seconds: dict[str, float] = {}
    ignored = [key for key in ("point_cloud", "ome_tiff") if getattr(config.output, key)] + (["every_nth"] if config.output.every_nth != 1 else [])
    if ignored:
        logger.warning("output.%s: continuous mode only; a single run writes the stack folder and the depth outputs",
                       ", output.".join(ignored))
    check_reconstruction(config)  # before any capture
    check_focus_map(config)  # a calibration file or nominal model that cannot serve: before the run folder
    run_dir = create_run_folder(config.output.dir, config.name, min_free_gb=config.output.min_free_gb)
    try:
        return _capture_and_reconstruct(config, run_dir, seconds, show_progress=show_progress)
    except BaseException as exc:
        # the run folder stays: say where it is and why it holds no depth
        if not (run_dir / "summary.yaml").exists():
            try:
                write_yaml_atomic(run_dir / "summary.yaml", {"stacks": 0, "error": str(exc) or "interrupted by the user"})
            except RigError as write_exc:
                logger.error("could not write the run summary: %s", write_exc)
        exc.run_dir = run_dir  # the command line prints it (INTERFACES.md: the path is printed at the end)
        raise


def _capture_and_reconstruct(config: RigConfig, run_dir: Path, seconds: dict[str, float], *, show_progress: bool) -> SingleRun:
    rc = config.reconstruct
    write_yaml_atomic(run_dir / "config.yaml", config_to_dict(config))
    t0 = time.perf_counter()
    with open_rig(config) as rig:
        seconds["open"] = time.perf_counter() - t0
        n = len(rig.planned_distances_m())
        bar = tqdm(total=n, desc="sweep", unit="slice", disable=not show_progress, leave=False)
        t0 = t_capture0 = time.perf_counter()
        try:
            stack = rig.capture_stack(progress=lambda i, _n: bar.update(1))
        except SweepInterrupted as err:
            kept = save_incomplete(err, run_dir / "stacks" / "000000")
            write_yaml_atomic(run_dir / "summary.yaml", {"stacks": 0, "incomplete": [str(kept)], "error": str(err)})
            raise
        finally:
            bar.close()
        seconds["capture"] = time.perf_counter() - t0
        truth = rig.truth()
    if config.output.record_stacks:
        t0 = time.perf_counter()
        stack.write(run_dir / "stacks" / "000000")
        seconds["write_stack"] = time.perf_counter() - t0
    result = reconstruct_stack(
        stack, method=rc.method, focus_measure=rc.focus_measure, align=rc.align,
        model=rc.model, weights=rc.weights, backend=rc.backend, precision=rc.precision, input_scale=rc.input_scale,
    )
    seconds["reconstruct"] = result.seconds.get("align", 0.0) + result.seconds.get("infer", 0.0)
    t0 = time.perf_counter()
    write_result(result, run_dir / "depth" / "000000", png16=config.output.depth_png16, preview=config.output.preview)
    seconds["write_depth"] = time.perf_counter() - t0
    accuracy = None
    latency_s = round(time.perf_counter() - t_capture0, 4)
    summary: dict[str, Any] = {
        "mode": "single",
        "stacks": 1,
        "stacks_dropped": 0,  # INTERFACES.md's summary: counts, rates, latencies, drops, errors (one stack: none dropped)
        "errors": [],
        # from the sweep's start to the depth written; as continuous mode's (p50, p95), over the one stack
        "latency_s": {"p50": latency_s, "p95": latency_s},
        "slices": stack.n_slices,
        "image_hw": list(stack.image_hw),
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "depth_range_m": [round(v, 4) for v in result.depth_range()] if result.depth_range() else None,
        "valid_fraction": round(result.valid_fraction, 6),
        "method": result.method,
        "model": result.model,
        "backend": result.backend,
        "device": result.device,
    }
    calibration = calibration_record(config)
    if calibration is not None:
        summary["calibration"] = calibration
    if "precision" in result.extra:
        summary["precision"] = result.extra["precision"]
    if truth is not None and result.depth_unit == "metre":
        accuracy = depth_metrics(result.depth, truth.depth_m, truth_valid=truth.truth_valid)
        summary["accuracy"] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in accuracy.items()}
        summary["accuracy"]["texture_poor_fraction"] = round(float(texture_poor_mask(truth.radiance).mean()), 4)
        summary["accuracy"]["note"] = "against the simulator's true depth; a pixel without depth counts as relative error 1"
        if result.method != "classical":
            # the simulator knows the truth: show how the classical method does on the same stack
            baseline = reconstruct_stack(stack, method="classical", focus_measure=rc.focus_measure, align=rc.align)
            base_acc = depth_metrics(baseline.depth, truth.depth_m, truth_valid=truth.truth_valid)
            summary["accuracy_classical_same_stack"] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in base_acc.items()}
    write_yaml_atomic(run_dir / "summary.yaml", summary)
    return SingleRun(run_dir=run_dir, stack=stack, result=result, seconds=seconds, accuracy=accuracy, summary=summary)
