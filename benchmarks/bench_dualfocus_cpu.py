"""DualFocus inference on the CPU: latency (median, p95) and peak memory for 10 slices at
384x288 on two threads (target: under 0.5 s), for each registered variant asked for.

    python benchmarks/bench_dualfocus_cpu.py [--models dualfocus-s] [--threads 2] [--repeats 10]

Timing does not depend on the weights' values, so untrained instances are timed where no
weights are shipped. Writes benchmarks/results/dualfocus_cpu.json. Do not run it while a
training run holds the cores.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import machine, save  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["dualfocus-s"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--slices", type=int, default=10)
    ap.add_argument("--height", type=int, default=288)
    ap.add_argument("--width", type=int, default=384)
    args = ap.parse_args()
    import numpy as np
    import torch

    from reconstruct.dualfocus.model import DualFocusNet
    from reconstruct.dualfocus.registry import build_model, count_parameters

    torch.set_num_threads(args.threads)
    results = {}
    for name in args.models:
        model = build_model(name).eval()
        x = torch.rand(1, args.slices, 3, args.height, args.width)
        f = torch.linspace(0.5, 2.5, args.slices)[None]
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        times = []
        with torch.inference_mode():
            for i in range(args.repeats + 1):
                t0 = time.perf_counter()
                out = model(x, f)
                DualFocusNet.to_focus_units(out.depth, f)
                if i:  # the first call warms up
                    times.append(time.perf_counter() - t0)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ms = np.array(times) * 1e3
        results[name] = {"parameters": count_parameters(model), "median_ms": round(float(np.median(ms)), 1),
                         "p95_ms": round(float(np.percentile(ms, 95)), 1), "peak_rss_mb": round(peak_mb, 1),
                         "rss_growth_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024, 1)}
        r = results[name]
        print(f"{name}: {r['parameters'] / 1e6:.2f}M params, {args.slices}x{args.height}x{args.width} on {args.threads} threads: "
              f"median {r['median_ms']:.0f} ms, p95 {r['p95_ms']:.0f} ms (target < 500 ms: {r['median_ms'] / 500:.2f}x), peak RSS {r['peak_rss_mb']:.0f} MB")
    path = save("dualfocus_cpu", {"what": __doc__.splitlines()[0], "machine": machine(), "threads": args.threads,
                                   "shape": [args.slices, args.height, args.width], "backend": "torch", "results": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
