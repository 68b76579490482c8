"""DualFocus inference on the CPU: latency (median, p95) and peak memory for 10 slices at
384x288 on two threads (target: under 0.5 s), for each registered variant asked for.

    python benchmarks/bench_dualfocus_cpu.py [--models dualfocus-s] [--threads 2] [--repeats 10]

Each model runs in its own process through the torch backend ``predict`` uses
(``bench_backends.py``'s ``torch-cpu`` child: channels-last weights, fp32; ``--precision bf16``
for the bf16 path on a CPU that computes it natively), so a model's peak memory is its own and
the timed path is the one users run. The peak counts inference only (set-up apart, Linux). A
model without shipped weights is timed with random ones (latency does not depend on their
values). Writes benchmarks/results/dualfocus_cpu.json. Do not run it while a training run holds
the cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import machine, save  # noqa: E402
from benchmarks.bench_backends import _default_weights, _run_child  # noqa: E402

TARGET_MS = 500.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["dualfocus-s"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--slices", type=int, default=10)
    ap.add_argument("--height", type=int, default=288)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = ap.parse_args()
    from reconstruct.dualfocus.registry import build_model, count_parameters

    backend = "torch-cpu" if args.precision == "fp32" else "torch-bf16-cpu"
    shape = f"{args.slices}x{args.height}x{args.width}"
    results = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name in args.models:
            weights, origin = _default_weights(name, tmp)
            child_args = argparse.Namespace(model=name, shape=shape, threads=args.threads, repeats=args.repeats, warmup=args.warmup)
            r, _depth = _run_child(child_args, backend, weights, tmp)
            if "error" in r:
                results[name] = r
                continue
            results[name] = {"parameters": count_parameters(build_model(name)), "weights": origin, "median_ms": r["p50_ms"],
                             "p95_ms": r["p95_ms"], "peak_rss_mb": r["peak_rss_mb"],
                             "peak_rss_is_inference_only": r["peak_rss_is_inference_only"], "setup_peak_rss_mb": r["setup_peak_rss_mb"],
                             "device": r["device"]}
            out = results[name]
            print(f"{name}: {out['parameters'] / 1e6:.2f}M params ({origin} weights), {shape} on {args.threads} threads, {out['device']}: "
                  f"median {out['median_ms']:.0f} ms, p95 {out['p95_ms']:.0f} ms (target < {TARGET_MS:.0f} ms: "
                  f"{out['median_ms'] / TARGET_MS:.2f}x), peak RSS {out['peak_rss_mb']:.0f} MB")
    path = save("dualfocus_cpu", {"what": __doc__.splitlines()[0], "machine": machine(), "threads": args.threads,
                                   "shape": [args.slices, args.height, args.width], "backend": backend, "results": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
