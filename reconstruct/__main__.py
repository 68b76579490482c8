"""``python -m reconstruct STACK_DIR --out OUT_DIR [--method M] ...``: one stack to depth."""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import time
from pathlib import Path

from capture.atomic import probe_writable
from capture.cli import OneLineArgumentParser, one_line_errors, quiet_opencv
from capture.errors import OutputError, ReconstructionError, StackFormatError
from capture.imageio import IMAGE_SUFFIXES
from capture.stack import STACK_YAML, FocalStack
from reconstruct.api import ALIGN_MODES, METHODS, reconstruct_stack
from reconstruct.classical import FOCUS_MEASURES
from reconstruct.result import check_replaceable, write_result

logger = logging.getLogger("reconstruct")


def _input_scale(text: str) -> float | str:
    from reconstruct.dualfocus.infer import INPUT_SCALE_RANGE

    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not INPUT_SCALE_RANGE[0] <= value <= INPUT_SCALE_RANGE[1]:
        raise argparse.ArgumentTypeError(f"must be auto or a number from {INPUT_SCALE_RANGE[0]} to {INPUT_SCALE_RANGE[1]}, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="python -m reconstruct", description="Depth from one focal stack (FOCAL_STACK_FORMAT.md).")
    p.add_argument("stack_dir", type=Path, help="a focal-stack folder (with stack.yaml), or its stack.yaml")
    p.add_argument("--out", type=Path, required=True, help="output folder (must not exist)")
    p.add_argument("--method", default="dualfocus", choices=METHODS, help="depth method (default: dualfocus, the shipped network)")
    p.add_argument("--model", default=None, help="DualFocus model name (dualfocus only; default dualfocus-s)")
    p.add_argument("--weights", type=Path, default=None, help="safetensors weights (dualfocus only)")
    p.add_argument("--backend", default=None, choices=["auto", "torch", "onnxruntime", "tensorrt"], help="dualfocus: where the network runs (default auto)")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "fp16", "bf16", "int8"],
                   help="network precision (default auto: fp16 on a GPU; bf16 on a CPU with native bfloat16, else fp32; "
                        "int8: ONNX Runtime on the CPU, quantised)")
    p.add_argument("--input-scale", type=_input_scale, default=None,
                   help="dualfocus: resize the slices by this factor for the network (default auto: 1 up to 768 px on the long "
                        "side, larger frames scaled down to it; 1.5: finer depth, ~2.25x slower; <1: faster)")
    p.add_argument("--align", default="apply", choices=ALIGN_MODES, help="apply stored alignment (default), estimate it, or none")
    p.add_argument("--focus-measure", default=None, choices=FOCUS_MEASURES,
                   help="classical focus measure (--method classical only; default: modified_laplacian)")
    p.add_argument("--no-preview", action="store_true", help="skip depth_preview.png")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--debug", action="store_true", help="tracebacks on error")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose > 1 or args.debug else logging.INFO if args.verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not args.debug:
        quiet_opencv()
    return one_line_errors(lambda: _run(args), debug=args.debug)


#: rig.yaml keys named in shared messages (reconstruct.dualfocus.infer) -> this command's flags
_CONFIG_KEY_FLAGS = {"reconstruct.precision": "--precision", "reconstruct.backend": "--backend"}
_CONFIG_KEY = re.compile(r"(?<![\w./-])reconstruct\.(?:precision|backend)(?![\w.])")  # the whole key, not part of a path
_IMPORT_COMMAND = "python -m capture.import_images"


def _import_hint(images: str) -> str:
    return (f"import them first: {_IMPORT_COMMAND} {images} --out STACK_DIR [--order far-to-near|near-to-far] "
            "[--focus-distances-m D ...], then python -m reconstruct STACK_DIR --out OUT_DIR")


def _stack_folder(path: Path) -> Path:
    """The stack folder the STACK_DIR argument names: the folder itself, or the folder of a
    given stack.yaml. A file that is not a stack.yaml, or a folder of images without one, is one
    line saying what to pass instead (the import tool for plain images)."""
    if path.is_file():
        if path.name == STACK_YAML or (path.is_symlink() and path.resolve().name == STACK_YAML):
            return path.resolve().parent if path.is_symlink() else path.parent  # a linked stack.yaml: its images are beside the target
        hint = (f"to use images, {_import_hint('IMAGE...')}" if path.suffix.lower() in IMAGE_SUFFIXES
                else f"give the folder that holds its {STACK_YAML}")
        raise StackFormatError(f"{path}: is a file, not a focal-stack folder; {hint}")
    if path.is_dir() and not (path / STACK_YAML).exists():
        try:
            images = [p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        except OSError:
            images = []
        if images:
            raise StackFormatError(
                f"{path / STACK_YAML}: missing (a focal-stack folder needs a {STACK_YAML}); the folder holds "
                f"{len(images)} image file{'s' if len(images) != 1 else ''}: {_import_hint(shlex.quote(str(path)))}"
            )
    return path


def _as_flags(exc: ReconstructionError) -> ReconstructionError:
    """The shared message with this command's flags for the rig.yaml keys it names
    (``precision: ...; set reconstruct.precision to auto or fp32`` -> ``--precision: ...;
    set --precision to auto or fp32``); ``exc`` itself when it names none."""
    text = str(exc)
    renamed = _CONFIG_KEY.sub(lambda m: _CONFIG_KEY_FLAGS[m.group(0)], text)
    renamed = re.sub(r"\balign='(apply|estimate|none)'", r"--align \1", renamed)  # the API's argument, as this command's flag
    if renamed.startswith("align: "):
        renamed = "--" + renamed
    if renamed.startswith("precision: "):
        renamed = "--" + renamed
    if renamed.startswith("input_scale: "):
        renamed = "--input-scale: " + renamed.removeprefix("input_scale: ")
    return exc if renamed == text else ReconstructionError(renamed)


def _run(args: argparse.Namespace) -> int:
    if os.path.lexists(args.out) and not args.overwrite:
        raise OutputError(f"{args.out}: already exists (choose another --out, or pass --overwrite)")
    check_replaceable(args.out, overwrite=True)  # what --overwrite would refuse, refused before the work
    probe_writable(args.out)  # a read-only or full place is found before the reconstruction, not after it
    if args.focus_measure is not None and args.method != "classical":
        logger.warning("--focus-measure applies to --method classical only; ignored with --method %s", args.method)
    network_flags = [flag for flag, value in (("--model", args.model), ("--weights", args.weights), ("--backend", args.backend),
                                              ("--precision", args.precision), ("--input-scale", args.input_scale)) if value is not None]
    if network_flags and args.method != "dualfocus":
        logger.warning("%s %s to --method dualfocus only; ignored with --method %s", ", ".join(network_flags),
                       "applies" if len(network_flags) == 1 else "apply", args.method)
    t_start = time.perf_counter()
    folder = _stack_folder(args.stack_dir)
    stack = FocalStack.read(folder)
    t_read = time.perf_counter() - t_start
    try:
        result = reconstruct_stack(
            stack, method=args.method, focus_measure=args.focus_measure or "modified_laplacian", align=args.align,
            model=args.model or "dualfocus-s", weights=args.weights, backend=args.backend or "auto", precision=args.precision or "auto",
            input_scale="auto" if args.input_scale is None else args.input_scale,
        )
    except ReconstructionError as exc:
        if str(exc).startswith("stack: "):  # a property of the stack file: name it
            raise ReconstructionError(f"{folder / STACK_YAML}: {str(exc).removeprefix('stack: ')}") from exc
        rephrased = _as_flags(exc)
        if rephrased is not exc:
            raise rephrased from exc
        raise
    result.seconds["read"] = t_read
    if args.model is not None and args.weights is not None and result.model not in (None, args.model):
        logger.warning("--model %s: %s holds %s; reconstructed with %s", args.model, args.weights, result.model, result.model)
    out = write_result(result, args.out, png16=True, preview=not args.no_preview, overwrite=args.overwrite)
    total = time.perf_counter() - t_start
    rng = result.depth_range()
    unit = "m" if result.depth_unit == "metre" else "focus index"
    span = f"{rng[0]:.3f}-{rng[1]:.3f} {unit}" if rng else "none"
    stages = ", ".join(f"{name} {seconds:.3f}" for name, seconds in result.seconds.items())
    print(f"{out}  depth {span}, {100 * result.valid_fraction:.1f}% of pixels, {total:.3f} s ({stages} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
