"""DualFocus inference per backend: latency p50/p95 (warm-up excluded) and peak memory, torch
against ONNX Runtime on the CPU in one run (plus CUDA / TensorRT where available).

CPU rows: ``torch-cpu`` (fp32, channels-last weights, the backend's default), ``torch-nchw-cpu``
(fp32 in the default layout, to show what channels-last gains), ``torch-bf16-cpu`` (bf16
autocast; only where the CPU has native bfloat16), ``onnxruntime-cpu`` (fp32) and
``onnxruntime-int8-cpu`` (the statically quantised graph of ``reconstruct.backends.quantize``;
it changes the numbers, so its depth difference is reported, not held to the fp32 parity) and
``onnxruntime-bf16-cpu`` (the fp32 graph computed in bfloat16 by OpenVINOExecutionProvider;
only where the installed onnxruntime is the onnxruntime-openvino build and the CPU has native
bfloat16; its depth difference is reported likewise).

    python benchmarks/bench_backends.py [--model dualfocus-s] [--shape 10x288x384] [--threads 2]
                                        [--repeats 20] [--warmup 2] [--backends torch-cpu onnxruntime-cpu ...]
    python benchmarks/bench_backends.py --sweep 5x288x384 10x288x384 20x288x384 10x576x768 [...]

``--sweep`` times the same CPU backends at several slice counts and resolutions and writes
benchmarks/results/backends_cpu_sweep.json (a table per shape; ``auto`` does not read it).

Each backend runs in its own child process (so peak RSS is that backend's, and thread pools
do not mix), on the same synthetic stack, through ``reconstruct.backends.open_backend``: the
code ``predict`` runs. The ONNX export (cached on disk) and session set-up are timed apart
from the latency. Targets (issue 7): ONNX Runtime at least 2.5x faster than torch on the CPU
and under 250 ms per 10x288x384 stack on two cores.

Writes benchmarks/results/backends_cpu.json (read by ``backend: auto`` to pick the faster CPU
backend; CPU entries only decide) and, when GPU backends ran, backends_gpu.json. ``dualfocus-s``
uses its shipped weights; a model without shipped weights is timed with random weights
(latency does not depend on their values). Do not run it while a training run holds the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import machine, peak_rss_mb, reset_peak_rss, save  # noqa: E402

#: benchmark name -> (backend, device, precision)
SPECS = {
    "torch-cpu": ("torch", "cpu", "fp32"),
    "torch-nchw-cpu": ("torch", "cpu", "fp32"),
    "torch-bf16-cpu": ("torch", "cpu", "bf16"),
    "onnxruntime-cpu": ("onnxruntime", "cpu", "fp32"),
    "onnxruntime-int8-cpu": ("onnxruntime", "cpu", "int8"),
    "onnxruntime-bf16-cpu": ("onnxruntime", "cpu", "bf16"),
    "torch-cuda": ("torch", "cuda", "fp32"),
    "torch-cuda-fp16": ("torch", "cuda", "fp16"),
    "onnxruntime-cuda": ("onnxruntime", "cuda", "fp32"),
    "tensorrt-fp32": ("tensorrt", "cuda", "fp32"),
    "tensorrt-fp16": ("tensorrt", "cuda", "fp16"),
}
CPU_BACKENDS = ("torch-cpu", "torch-nchw-cpu", "torch-bf16-cpu", "onnxruntime-cpu", "onnxruntime-int8-cpu", "onnxruntime-bf16-cpu")
TARGET_RATIO = 2.5
TARGET_ORT_MS = 250.0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dualfocus-s")
    ap.add_argument("--weights", type=Path, default=None, help="safetensors weights (default: shipped, else random)")
    ap.add_argument("--shape", default="10x288x384", help="NxHxW, H and W multiples of 4")
    ap.add_argument("--sweep", nargs="+", default=None, metavar="NxHxW", help="time the CPU backends at each of these shapes instead")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--backends", nargs="*", default=None, choices=list(SPECS), help=f"default: {' '.join(CPU_BACKENDS)} and the GPU ones available")
    ap.add_argument("--child", default=None, choices=list(SPECS), help=argparse.SUPPRESS)
    ap.add_argument("--dump", type=Path, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _stack(shape: tuple[int, int, int]):
    """A textured plane blurred more in each slice: ``[1, N, 3, H, W]``, focus ``[1, N]``."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    n, h, w = shape
    base = torch.from_numpy(np.random.default_rng(0).random((1, 1, h, w), dtype=np.float32))
    slices = torch.cat([F.avg_pool2d(base, 2 * i + 1, 1, i, count_include_pad=False) for i in range(n)], 0)
    stack = slices.expand(n, 3, h, w)[None].contiguous().numpy()
    focus = np.linspace(0.5, 2.5, n, dtype=np.float32)[None]
    return stack, focus


def child(args: argparse.Namespace) -> int:
    """Time one backend; print one JSON line."""
    import numpy as np
    import torch

    from reconstruct.backends import open_backend
    from reconstruct.backends.export import parse_shape

    torch.set_num_threads(args.threads)
    shape = parse_shape(args.shape)
    name, device, precision = SPECS[args.child]
    rss_imports = peak_rss_mb()
    stack, focus = _stack(shape)
    t0 = time.perf_counter()
    if args.child == "torch-nchw-cpu":
        from reconstruct.backends.torch_backend import TorchBackend

        backend = TorchBackend(args.weights, device=device, precision=precision, channels_last=False)
    else:
        backend = open_backend(name, device, weights=args.weights, shape=shape, precision=precision)
    setup_s = time.perf_counter() - t0
    setup_peak_mb = peak_rss_mb()  # imports, the export or quantisation on a cold cache, the session
    peak_is_inference = reset_peak_rss()  # from here the peak is inference's (plus what set-up left resident)
    times = []
    for i in range(args.warmup + args.repeats):
        t = time.perf_counter()
        out = backend.run(stack, focus)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    ms = np.array(times) * 1e3
    if args.dump is not None:
        np.save(args.dump, out["depth"])
    print(json.dumps({
        "backend": args.child, "device": backend.describe(), "threads": args.threads,
        "p50_ms": round(float(np.median(ms)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
        "min_ms": round(float(ms.min()), 1), "repeats": args.repeats, "setup_s": round(setup_s, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1), "peak_rss_is_inference_only": peak_is_inference,
        "setup_peak_rss_mb": round(setup_peak_mb, 1), "rss_after_imports_mb": round(rss_imports, 1),
    }))
    return 0


def _available_gpu_backends() -> list[str]:
    from reconstruct.backends.select import (
        cuda_available,
        onnxruntime_providers,
        tensorrt_problem,
    )

    if not cuda_available():
        return []
    names = ["torch-cuda", "torch-cuda-fp16"]
    if "CUDAExecutionProvider" in (onnxruntime_providers() or []):
        names.append("onnxruntime-cuda")
    if tensorrt_problem() is None:
        names += ["tensorrt-fp32", "tensorrt-fp16"]
    return names


def _sweep(args: argparse.Namespace) -> int:
    """Each shape of ``--sweep`` in turn (children as for one shape); one JSON for all."""
    from reconstruct.backends.export import parse_shape

    for text in args.sweep:
        try:
            parse_shape(text)
        except ValueError as exc:
            print(f"error: --sweep {text}: {exc}", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="bench_backends_"))
    weights, weights_note = (args.weights, "given") if args.weights is not None else _default_weights(args.model, tmp)
    names = args.backends or [n for n in CPU_BACKENDS if n not in _skipped()]
    rows: dict[str, dict] = {}
    for text in args.sweep:
        print(f"--- {text}")
        one = argparse.Namespace(**{**vars(args), "shape": text})
        rows[text] = {name: _run_child(one, name, weights, tmp)[0] for name in names}
    mach = machine()
    print(f"p50 ms (peak RSS MB); {mach['cpu']}, {args.threads} threads, {args.model} ({weights_note} weights):")
    print(f"{'shape':>12} " + " ".join(f"{n:>22}" for n in names))
    for text, r in rows.items():
        cells = [f"{r[n]['p50_ms']:.1f} ({r[n]['peak_rss_mb']:.0f})" if "p50_ms" in r[n] else "failed" for n in names]
        print(f"{text:>12} " + " ".join(f"{c:>22}" for c in cells))
    doc = {"what": "DualFocus CPU inference per backend and stack shape", "machine": mach, "threads": args.threads, "model": args.model,
           "weights": weights_note, "repeats": args.repeats, "warmup": args.warmup, "results": rows}
    print(f"wrote {save('backends_cpu_sweep', doc)}")
    return 0 if all("error" not in v for r in rows.values() for v in r.values()) else 1


def _skipped() -> set[str]:
    """CPU rows that cannot run here: ONNX Runtime missing, no native bfloat16, (for ONNX
    Runtime's bf16) no OpenVINOExecutionProvider, or (for int8) a quantiser too old for the
    recipe (the OpenVINO build's)."""
    from capture.errors import ReconstructionError
    from reconstruct.backends.quantize import check_int8_support
    from reconstruct.backends.select import cpu_bf16_native, onnxruntime_providers, openvino_available

    skip = set()
    if onnxruntime_providers() is None:
        skip.update({"onnxruntime-cpu", "onnxruntime-int8-cpu"})
    else:
        try:
            check_int8_support()
        except ReconstructionError as exc:
            print(f"onnxruntime-int8-cpu: skipped ({exc})")
            skip.add("onnxruntime-int8-cpu")
    if not cpu_bf16_native():
        skip.add("torch-bf16-cpu")
    if not openvino_available():
        skip.add("onnxruntime-bf16-cpu")
    return skip


def _default_weights(model: str, tmp: Path) -> tuple[Path, str]:
    """The shipped weights of ``model``, else random ones saved under ``tmp``."""
    from reconstruct.dualfocus.checkpoint import save_weights
    from reconstruct.dualfocus.infer import WEIGHTS_DIR
    from reconstruct.dualfocus.registry import build_model

    shipped = WEIGHTS_DIR / f"{model}.safetensors"
    if shipped.is_file():
        return shipped, "shipped"
    import torch

    torch.manual_seed(0)
    return save_weights(build_model(model).eval(), tmp / f"{model}.safetensors", name=model), "random initialisation"


def _run_child(args: argparse.Namespace, name: str, weights: Path, tmp: Path):  # noqa: ANN202
    """One backend in its own process at ``args.shape``: (its result, or {"error": ...}; its depth or None)."""
    import numpy as np

    dump = tmp / f"{name}.npy"
    cmd = [sys.executable, __file__, "--child", name, "--model", args.model, "--weights", str(weights), "--shape", args.shape,
           "--threads", str(args.threads), "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--dump", str(dump)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"{name}: failed ({tail})")
        return {"error": tail}, None
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{name:>16}: p50 {r['p50_ms']:7.1f} ms  p95 {r['p95_ms']:7.1f} ms  peak RSS {r['peak_rss_mb']:6.0f} MB  "
          f"(set-up {r['setup_s']:.1f} s, {r['device']})")
    return r, np.load(dump)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.child:
        return child(args)
    if args.sweep:
        return _sweep(args)
    import numpy as np

    from reconstruct.backends.export import parse_shape

    try:
        shape = parse_shape(args.shape)
    except ValueError as exc:
        print(f"error: --shape: {exc}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="bench_backends_"))
    weights, weights_note = (args.weights, "given") if args.weights is not None else _default_weights(args.model, tmp)
    names = args.backends or [n for n in CPU_BACKENDS if n not in _skipped()] + _available_gpu_backends()
    results: dict[str, dict] = {}
    depths: dict[str, np.ndarray] = {}
    for name in names:
        results[name], depth = _run_child(args, name, weights, tmp)
        if depth is not None:
            depths[name] = depth
    ref = depths.get("torch-cpu")
    if ref is not None:
        for name, depth in depths.items():
            if name != "torch-cpu":
                results[name]["max_abs_depth_diff_vs_torch_cpu"] = float(np.abs(depth - ref).max())  # normalised depth
    summary: dict = {}
    if "p50_ms" in results.get("torch-cpu", {}) and "p50_ms" in results.get("onnxruntime-cpu", {}):
        ratio = results["torch-cpu"]["p50_ms"] / results["onnxruntime-cpu"]["p50_ms"]
        ort_ms = results["onnxruntime-cpu"]["p50_ms"]
        summary = {"torch_over_onnxruntime_cpu": round(ratio, 2), "target_ratio": TARGET_RATIO, "ratio_met": ratio >= TARGET_RATIO,
                   "onnxruntime_cpu_p50_ms": ort_ms, "target_ms": TARGET_ORT_MS, "ms_met": ort_ms <= TARGET_ORT_MS,
                   "parity_max_abs_depth_diff": results["onnxruntime-cpu"].get("max_abs_depth_diff_vs_torch_cpu")}
        print(f"torch / onnxruntime on the CPU: {ratio:.2f}x (target >= {TARGET_RATIO}x: {'met' if ratio >= TARGET_RATIO else 'not met'}); "
              f"onnxruntime {ort_ms:.0f} ms (target < {TARGET_ORT_MS:.0f} ms: {'met' if ort_ms <= TARGET_ORT_MS else 'not met'}); "
              f"max |depth diff| {summary['parity_max_abs_depth_diff']:.1e} of the range")
    if "p50_ms" in results.get("onnxruntime-int8-cpu", {}):
        int8 = results["onnxruntime-int8-cpu"]
        ratios = {f"{k}_over_onnxruntime_int8": round(results[k]["p50_ms"] / int8["p50_ms"], 2)
                  for k in ("torch-cpu", "torch-nchw-cpu", "torch-bf16-cpu", "onnxruntime-cpu") if "p50_ms" in results.get(k, {})}
        summary.update({**ratios, "onnxruntime_int8_p50_ms": int8["p50_ms"], "int8_ms_met": int8["p50_ms"] <= TARGET_ORT_MS,
                        "int8_max_abs_depth_diff_vs_torch_cpu": int8.get("max_abs_depth_diff_vs_torch_cpu")})
        print(f"onnxruntime int8: {int8['p50_ms']:.0f} ms (under {TARGET_ORT_MS:.0f} ms: {'yes' if int8['p50_ms'] <= TARGET_ORT_MS else 'no'}); "
              + ", ".join(f"{k.replace('_over_onnxruntime_int8', '')} / int8 {v:.2f}x" for k, v in ratios.items()))
    if "p50_ms" in results.get("onnxruntime-bf16-cpu", {}):
        ov = results["onnxruntime-bf16-cpu"]
        ratios = {f"{k}_over_onnxruntime_bf16": round(results[k]["p50_ms"] / ov["p50_ms"], 2)
                  for k in ("torch-cpu", "torch-nchw-cpu", "torch-bf16-cpu", "onnxruntime-cpu", "onnxruntime-int8-cpu") if "p50_ms" in results.get(k, {})}
        summary.update({**ratios, "onnxruntime_bf16_p50_ms": ov["p50_ms"], "bf16_onnxruntime_ms_met": ov["p50_ms"] <= TARGET_ORT_MS,
                        "onnxruntime_bf16_max_abs_depth_diff_vs_torch_cpu": ov.get("max_abs_depth_diff_vs_torch_cpu")})
        print(f"onnxruntime bf16 (OpenVINO): {ov['p50_ms']:.0f} ms (under {TARGET_ORT_MS:.0f} ms: {'yes' if ov['p50_ms'] <= TARGET_ORT_MS else 'no'}); "
              + ", ".join(f"{k.replace('_over_onnxruntime_bf16', '')} / it {v:.2f}x" for k, v in ratios.items()))
    timed = {k: v["p50_ms"] for k, v in results.items() if k.endswith("-cpu") and "p50_ms" in v}
    if timed:
        fastest = min(timed, key=timed.__getitem__)
        summary.update({"fastest_cpu": fastest, "fastest_cpu_p50_ms": timed[fastest], "fastest_cpu_ms_met": timed[fastest] <= TARGET_ORT_MS})
        if "torch-bf16-cpu" in results:
            summary["bf16_max_abs_depth_diff_vs_fp32"] = results["torch-bf16-cpu"].get("max_abs_depth_diff_vs_torch_cpu")
        print(f"fastest on the CPU: {fastest} at {timed[fastest]:.0f} ms (under {TARGET_ORT_MS:.0f} ms: {'yes' if timed[fastest] <= TARGET_ORT_MS else 'no'})")
    mach = machine()
    print(f"machine: {mach['cpu']}, {mach['logical_cpus']} logical CPUs, {args.threads} threads; {args.model} ({weights_note} weights) at {args.shape}")
    common = {"what": __doc__.splitlines()[0], "machine": mach, "threads": args.threads, "model": args.model, "weights": weights_note,
              "shape": list(shape), "repeats": args.repeats, "warmup": args.warmup}
    cpu = {k: v for k, v in results.items() if k.endswith("-cpu")}
    gpu = {k: v for k, v in results.items() if not k.endswith("-cpu")}
    if cpu:
        doc = {**common, 'results': cpu, 'summary': summary}
        print(f"wrote {save('backends_cpu', doc)}")
        if args.model == "dualfocus-s" and tuple(shape) == (10, 288, 384):
            # where backend: auto looks first, whatever DUALFOCUS_BENCH_RESULTS says (and outside a checkout)
            from reconstruct.backends.export import cache_dir
            from reconstruct.backends.select import LATENCY_FILE

            try:
                target = cache_dir() / LATENCY_FILE
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.tmp")
                tmp.write_text(json.dumps(doc, indent=2))
                os.replace(tmp, target)
                print(f"wrote {target} (read by backend: auto)")
            except OSError as exc:
                print(f"could not write {cache_dir() / LATENCY_FILE} for backend: auto ({exc})")
    if gpu:
        print(f"wrote {save('backends_gpu', {**common, 'results': gpu})}")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
