"""Continuous acquisition on the simulated rig: is the pipeline as fast as its slowest stage?

Three runs, in one process, every stage at the same thread count (``--threads`` for torch,
OpenCV and the BLAS libraries), the simulated camera paced in real time:

1. capture alone: ``--stacks`` sweeps back to back;
2. reconstruction alone: the same number of reconstructions of a captured stack;
3. the pipeline (``run_continuous``): capture, reconstruction and writing overlapped.

Prints the pipelined rate as a ratio of the slower of (1) and (2) (target >= 0.9) and the
latency p95 against two stack periods (target: within). Writes
benchmarks/results/continuous.json. Do not run it while a training run holds the cores.

    python benchmarks/bench_continuous.py [--stacks 12] [--threads 1] [--method dualfocus]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._common import machine, save  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stacks", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--method", default="dualfocus", choices=["dualfocus", "classical"])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "sim.yaml")
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import cv2
    import torch

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    import logging

    logging.basicConfig(level=logging.WARNING)
    from reconstruct import reconstruct_stack
    from rig import load_config, open_rig
    from rig.continuous import run_continuous

    config = load_config(args.config)
    config.reconstruct.method = args.method
    rc = config.reconstruct
    out = Path(tempfile.mkdtemp(prefix="bench_continuous_"))
    config.output.dir = out
    config.output.preview = False

    # 1. capture alone (first sweep warms the render cache, as it would in a long run)
    with open_rig(config) as rig:
        stack = rig.capture_stack()
        t0 = time.perf_counter()
        for _ in range(args.stacks):
            stack = rig.capture_stack()
        capture_s = (time.perf_counter() - t0) / args.stacks
    # 2. reconstruction alone (one warm-up: model load, ONNX export)
    reconstruct_stack(stack, method=rc.method, align=rc.align, model=rc.model, weights=rc.weights, backend=rc.backend, precision=rc.precision)
    t0 = time.perf_counter()
    for _ in range(args.stacks):
        result = reconstruct_stack(stack, method=rc.method, align=rc.align, model=rc.model, weights=rc.weights, backend=rc.backend, precision=rc.precision)
    reconstruct_s = (time.perf_counter() - t0) / args.stacks
    # 3. the pipeline (block: no stack is dropped, so the rate is the real throughput)
    config.continuous.when_behind = "block"
    run = run_continuous(config, count=args.stacks + 2, show_status=False)
    s = run.summary
    pipelined_rate = s["stacks_per_s"]
    slower_rate = 1.0 / max(capture_s, reconstruct_s)
    period_s = 1.0 / pipelined_rate
    doc = {
        "machine": machine(),
        "config": str(args.config), "method": args.method, "backend": result.backend, "threads": args.threads,
        "stacks": args.stacks, "image_hw": list(stack.image_hw), "slices": stack.n_slices,
        "capture_alone_s_per_stack": round(capture_s, 4), "reconstruct_alone_s_per_stack": round(reconstruct_s, 4),
        "pipelined_stacks_per_s": pipelined_rate, "slower_stage_stacks_per_s": round(slower_rate, 4),
        "ratio_pipelined_to_slower": round(pipelined_rate / slower_rate, 4), "target_ratio": 0.9,
        "latency_p50_s": s["latency_s"]["p50"], "latency_p95_s": s["latency_s"]["p95"],
        "latency_p95_in_stack_periods": round(s["latency_s"]["p95"] / period_s, 3), "target_latency_periods": 2.0,
        "dropped": s["stacks_dropped"],
    }
    path = save("continuous", doc)
    print(f"capture alone {capture_s:.3f} s/stack, reconstruction alone ({args.method}, {result.backend}) {reconstruct_s:.3f} s/stack")
    print(f"pipelined {pipelined_rate:.3f} stacks/s = {doc['ratio_pipelined_to_slower']:.2f}x the slower stage (target >= 0.9)")
    print(f"latency p50 {doc['latency_p50_s']:.3f} s, p95 {doc['latency_p95_s']:.3f} s = {doc['latency_p95_in_stack_periods']:.2f} stack periods (target <= 2)")
    print(f"machine: {doc['machine']['cpu']} ({doc['machine']['logical_cpus']} logical CPUs); written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
