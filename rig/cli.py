"""``python run_rig.py``: the command line of the rig (INTERFACES.md)."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from capture.cli import OneLineArgumentParser, one_line_errors
from capture.errors import ConfigError, RigError, reworded

logger = logging.getLogger("rig")

DEFAULT_CONFIG = Path("configs/sim.yaml")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="run_rig.py", description="Sweep focus on a (simulated or real) rig, capture a focal stack, reconstruct depth.")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="rig.yaml (default: configs/sim.yaml)")
    p.add_argument("--mode", choices=["single", "continuous", "calibrate"], help="override the config's mode")
    p.add_argument("--out", type=Path, help="override output.dir")
    p.add_argument("--method", choices=["dualfocus", "classical"], help="override reconstruct.method")
    p.add_argument("--backend", choices=["auto", "torch", "onnxruntime", "tensorrt"], help="override reconstruct.backend")
    p.add_argument("--count", type=int, help="continuous mode: stop after N stacks")
    p.add_argument("--duration", type=float, help="continuous mode: stop after S seconds")
    p.add_argument("--non-interactive", action="store_true", help="calibrate mode: no prompts")
    p.add_argument("--list-devices", action="store_true", help="list GenTL producers, cameras and serial ports")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="tracebacks on error")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    p.add_argument("-q", "--quiet", action="store_true", help="less logging and no progress bars")
    return p


def _configure_logging(args: argparse.Namespace) -> None:
    if args.quiet:
        level = logging.ERROR
    elif args.debug or args.verbose > 1:
        level = logging.DEBUG
    elif args.verbose:
        level = logging.INFO
    else:
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _print_summary(run) -> None:  # noqa: ANN001 (rig.single.SingleRun)
    s = run.summary
    print(f"run folder: {run.run_dir}")
    t = s["seconds"]
    print("  timings:  " + ", ".join(f"{k} {v:.3f} s" for k, v in t.items()))
    rng = s.get("depth_range_m")
    print(f"  depth:    {rng[0]:.3f}-{rng[1]:.3f} m, {100 * s['valid_fraction']:.1f}% of pixels have a depth" if rng else "  depth:    none")
    method = s["method"]
    if s.get("model"):  # say the precision where it is not fp32
        precision = [p for p in [s.get("precision", "fp32")] if p != "fp32"]
        method += f" ({s['model']}, {' '.join([s['backend'], *precision])} on {s['device']})"
    print(f"  method:   {method}")
    acc = s.get("accuracy")
    if acc:
        print(f"  accuracy: AbsRel {acc['abs_rel']:.4f}, RMSE {acc['rmse_m']:.4f} m, delta<1.25 {100 * acc['delta_1_25']:.1f}% "
              f"(vs the simulator's truth; {100 * acc['valid_fraction']:.1f}% of pixels scored with a depth, the rest as errors)")
    base = s.get("accuracy_classical_same_stack")
    if base:
        print(f"  classical on the same stack: AbsRel {base['abs_rel']:.4f}, RMSE {base['rmse_m']:.4f} m, delta<1.25 {100 * base['delta_1_25']:.1f}%")
    print(f"  outputs:  {run.run_dir / 'depth' / '000000' / 'depth.npy'}, {run.run_dir / 'depth' / '000000' / 'depth_preview.png'}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args)
    from capture.signals import sigterm_stops_like_ctrl_c

    with sigterm_stops_like_ctrl_c():  # single runs and calibration sessions keep what they captured
        return one_line_errors(lambda: _run_saying_where(args), debug=args.debug)


def _run_saying_where(args: argparse.Namespace) -> int:
    """:func:`_run`; a run that fails after making its run folder still prints the folder's path,
    and a bad-input error that names a field but not the config file gets the file (and the
    ``reconstruct.`` section, or the command-line flag, for the reconstruction's own fields)."""
    try:
        return _run(args)
    except BaseException as exc:
        run_dir = getattr(exc, "run_dir", None)
        if run_dir is not None:
            note = getattr(exc, "run_note", None)
            print(f"run folder: {run_dir}" + (f" ({note})" if note else ""), flush=True)
        error = _naming_the_config(exc, args) if isinstance(exc, RigError) else exc
        if error is not exc:
            raise error from exc
        raise


_FIELD_FIRST = re.compile(r"^([a-z_]+)((?:\.[a-z_0-9]+)*): ")
_RECONSTRUCT_FIELDS = {"method", "model", "weights", "backend", "precision", "input_scale", "focus_measure", "align"}


def _naming_the_config(exc: RigError, args: argparse.Namespace) -> RigError:
    """``exc`` with the config file in front where it starts with a bare field name (exit 2 only)."""
    from rig.config import RigConfig

    message = str(exc)
    if message.startswith("output.dir: ") and getattr(args, "out", None) is not None:
        return reworded(exc, f"--out: {message.removeprefix('output.dir: ')}")  # the value came from the command line
    m = _FIELD_FIRST.match(message)
    if exc.exit_code != 2 or m is None or args.list_devices or str(args.config) in message:
        return exc
    first = m.group(1)
    if first not in _RECONSTRUCT_FIELDS and first not in {*RigConfig.model_fields, "camera", "focus"}:
        return exc  # a field of some other file (a calibration file names itself)
    if first in _RECONSTRUCT_FIELDS and not m.group(2):
        flag = f"--{first}"
        if getattr(args, first, None) is not None:  # the value came from the command line
            return exc if message.startswith(flag) else reworded(exc, f"{flag}{message[len(first):]}")
        return reworded(exc, f"{args.config}: reconstruct.{message}")
    return reworded(exc, f"{args.config}: {message}")


def _run(args: argparse.Namespace) -> int:
    if args.list_devices:
        from rig.discovery import device_report

        print(device_report())
        return 0
    from rig.config import load_config
    from rig.single import run_single

    config = load_config(args.config)
    if args.mode:
        config.mode = args.mode
    if args.out:
        config.output.dir = args.out
    if args.method:
        config.reconstruct.method = args.method
    if args.backend:
        config.reconstruct.backend = args.backend
    show_progress = not (args.quiet or args.no_progress) and sys.stderr.isatty()
    if config.mode != "continuous" and (args.count is not None or args.duration is not None):
        raise ConfigError("--count/--duration: only for --mode continuous")
    if config.mode != "calibrate" and args.non_interactive:
        raise ConfigError("--non-interactive: only for --mode calibrate")
    if config.mode == "calibrate":
        from rig.calibrate import run_calibration

        cal = run_calibration(config, interactive=not args.non_interactive, show_progress=show_progress)
        fm = cal.document["focus_model"]
        print(f"run folder: {cal.run_dir}" + ("  (resumed)" if cal.resumed else ""))
        print(f"  calibration: {cal.calibration_path}")
        print(f"  report:      {cal.summary_path}")
        print(f"  focus fit:   rms {fm['fit']['rms_dpt'] * 1000:.2f} mdpt, leave-one-out {fm['fit']['loo_rms_dpt'] * 1000:.2f} mdpt, "
              f"valid {fm['valid_range_m'][0]:.3f}-{fm['valid_range_m'][1]:.3f} m")
        if "intrinsics" in cal.document:
            k = cal.document["intrinsics"]
            print(f"  intrinsics:  fx {k['fx_px']:.1f} px, fy {k['fy_px']:.1f} px, reprojection rms {k['rms_reprojection_px']:.3f} px")
        print(f"  use it:      calibration: {{file: {json.dumps(str(cal.calibration_path))}}}")  # quoted: valid YAML for any path
        return 0
    if config.mode == "continuous":
        from rig.continuous import run_continuous

        for flag, value in (("--count", args.count), ("--duration", args.duration)):
            if value is not None and not value > 0:
                raise ConfigError(f"{flag}: must be > 0, got {value}")
        cont = run_continuous(config, count=args.count, duration_s=args.duration, show_status=show_progress)
        s = cont.summary
        lat = s["latency_s"] or {}
        print(f"run folder: {cont.run_dir}")
        raw = f" ({s['stacks_written_without_depth']} without depth)" if s.get("stacks_written_without_depth") else ""
        print(f"  stacks:   {s['stacks_written']} written{raw}, {s['stacks_dropped']} dropped, {s['stacks_captured']} captured "
              f"({s['stacks_per_s']:.2f} stacks/s over {s['seconds']:.1f} s); stopped by {s['stopped_by']}")
        if lat:
            print(f"  latency:  p50 {lat['p50']:.3f} s, p95 {lat['p95']:.3f} s (sweep start to depth ready: the first move, every slice, the queue and reconstruction)")
        if s.get("network"):
            warm = f", opened in {s['network_warm_up_s']:.2f} s while the first stack was captured" if s.get("network_warm_up_s") is not None else ""
            print(f"  network:  {s['network']}{warm}")
        acc = s.get("accuracy")
        if acc:
            print(f"  accuracy: AbsRel {acc['abs_rel']:.4f}, delta<1.25 {100 * acc['delta_1_25']:.1f}% "
                  f"(mean over {acc['stacks_scored']} stacks, vs the simulator's truth)")
        return cont.exit_code
    if config.mode != "single":
        where = "--mode" if args.mode else f"{args.config}: mode"
        raise ConfigError(f"{where}: {config.mode!r} is not available; valid: single, calibrate, continuous")
    run = run_single(config, show_progress=show_progress)
    _print_summary(run)
    return 0
