"""``python -m reconstruct.export --model NAME --shape NxHxW --to onnx|tensorrt --out PATH``:
deployment artefacts for one fixed stack shape.

* ``--to onnx``: the ONNX graph (opset 17; inputs ``stack`` ``[1, N, 3, H, W]`` and ``focus``
  ``[1, N]``, outputs ``depth`` (normalised), ``confidence``, ``slice_position``, see
  ``reconstruct.backends.base``). ``--fp16`` exports the graph with the network body in half
  precision and the softmax/expectations in float32 (the form TensorRT's strongly typed
  networks build fp16 engines from). ``--int8`` writes the statically quantised graph that
  ONNX Runtime runs on the CPU (``reconstruct.backends.quantize``; ONNX only).
* ``--to tensorrt``: a serialised TensorRT engine for this GPU and TensorRT version (needs
  the ``tensorrt`` package and a CUDA GPU; ``--fp16`` for an fp16 engine).

Both go through the on-disk cache (``$DUALFOCUS_CACHE_DIR``, default ``~/.cache/dualfocus-rig``)
and are then copied to ``--out``. Exit codes: 0 done, 2 bad input (one line).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from capture.cli import OneLineArgumentParser, one_line_errors
from capture.errors import OutputError, ReconstructionError

logger = logging.getLogger("reconstruct.export")


def _shape(text: str) -> tuple[int, int, int]:
    from reconstruct.backends.export import parse_shape

    try:
        return parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="python -m reconstruct.export", description="Export the DualFocus network for one stack shape.")
    p.add_argument("--model", default=None, help="registered model name (default: dualfocus-s; with --weights, the file's own architecture is used)")
    p.add_argument("--weights", type=Path, default=None, help="safetensors weights (default: the model's shipped ones)")
    p.add_argument("--shape", type=_shape, required=True, help="NxHxW: slices x height x width, H and W multiples of 4 (e.g. 10x288x384)")
    p.add_argument("--to", required=True, choices=["onnx", "tensorrt"], help="artefact kind")
    p.add_argument("--out", type=Path, required=True, help="output file (.onnx or .engine)")
    p.add_argument("--fp16", action="store_true", help="network body in fp16; softmax and expectations stay fp32")
    p.add_argument("--int8", action="store_true", help="--to onnx only: the int8 graph for ONNX Runtime on the CPU (quantised, calibrated on procedural stacks)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--debug", action="store_true", help="tracebacks on error")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose > 1 or args.debug else logging.INFO if args.verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    return one_line_errors(lambda: _run(args), debug=args.debug)


def _run(args: argparse.Namespace) -> int:
    from reconstruct.backends.export import cache_dir, copy_atomic, export_onnx
    from reconstruct.backends.select import select_backend
    from reconstruct.dualfocus.infer import resolve_weights

    if args.out.exists() and not args.overwrite:
        raise OutputError(f"{args.out}: already exists (choose another --out, or pass --overwrite)")
    if args.out.is_dir():
        raise OutputError(f"{args.out}: is a folder; --out names the output file")
    weights = resolve_weights(args.model or "dualfocus-s", args.weights)
    if args.int8 and (args.fp16 or args.to != "onnx"):
        raise ReconstructionError("--int8: an int8 graph is exported --to onnx only, and not together with --fp16")
    precision = "int8" if args.int8 else "fp16" if args.fp16 else "fp32"
    n, h, w = args.shape
    if args.to == "tensorrt":
        select_backend("tensorrt")  # one clear line when the package or the GPU is missing
    art = export_onnx(weights, args.shape, precision=precision)
    if args.to == "onnx":
        copy_atomic(art.path, args.out)
        what = f"ONNX opset {art.key['opset']}, sha256 {art.sha256[:12]}"
    else:
        from reconstruct.backends.tensorrt_backend import (
            io_shapes,
            load_or_build_engine,
        )

        handle = load_or_build_engine(art.path, art.sha256, shapes=io_shapes(args.shape), precision=precision, cache_root=cache_dir())
        copy_atomic(handle.path, args.out)
        what = f"TensorRT {handle.key['tensorrt']} engine for {handle.key['gpu']} (sm {handle.key['compute_capability']})"
    model = art.key["model"]  # what the weights file holds (its metadata), whatever --model said
    if args.model is not None and args.model != model:
        logger.warning("--model %s: %s holds %s; exported %s", args.model, weights, model, model)
    print(f"{args.out}  {model} {n}x{h}x{w} {precision}, {what}{' (from the cache)' if art.reused else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
