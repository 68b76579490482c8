"""Classical reconstruction time for 10 slices at 384x288 on ONE core (target: <= 30 ms).

Renders the default procedural scene through the simulated optics (noise on), then times
``reconstruct_stack`` (sort, grey conversion, focus measure, peak refinement, confidence,
fill, all-in-focus fusion; no file I/O). Prints the figures and writes
benchmarks/results/classical.json.

    python benchmarks/bench_classical.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import machine, pin_one_core, save  # noqa: E402

pin_one_core()

import cv2  # noqa: E402
import numpy as np  # noqa: E402

cv2.setNumThreads(1)

from capture.optics import LayeredScene, SensorModel, ThinLens  # noqa: E402
from capture.scenes import procedural_scene  # noqa: E402
from capture.stack import FocalStack  # noqa: E402
from reconstruct.api import reconstruct_stack  # noqa: E402
from reconstruct.classical import FOCUS_MEASURES, ClassicalParams  # noqa: E402
from reconstruct.metrics import depth_metrics  # noqa: E402


def make_stack(width: int, height: int, slices: int) -> tuple[FocalStack, np.ndarray]:
    scene = procedural_scene(width, height)
    # same blur per diopter relative to the image as the 512-wide default rig
    lens = ThinLens(focal_length_mm=12.0, f_number=2.0, pixel_pitch_um=7.0 * 512 / width)
    layered = LayeredScene(scene.radiance, scene.depth_m)
    focus_dpt = np.linspace(0.5, 2.5, slices)
    rng = np.random.default_rng(0)
    sensor = SensorModel()
    images = [sensor.expose(layered.render(f, blur_px_per_dpt=lens.blur_px_per_dpt), exposure_s=0.01, gain_db=0.0, out_bits=8, rng=rng) for f in focus_dpt]
    return FocalStack(np.stack(images), focus_distance_m=1.0 / focus_dpt), scene.depth_m


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--height", type=int, default=288)
    ap.add_argument("--slices", type=int, default=10)
    args = ap.parse_args()
    stack, truth = make_stack(args.width, args.height, args.slices)
    results = {}
    for measure in FOCUS_MEASURES:
        params = ClassicalParams(focus_measure=measure)
        reconstruct_stack(stack, params=params)  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = reconstruct_stack(stack, params=params)
            times.append(time.perf_counter() - t0)
        ms = np.array(times) * 1e3
        acc = depth_metrics(res.depth, truth)
        results[measure] = {"median_ms": round(float(np.median(ms)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2), "abs_rel": round(acc["abs_rel"], 4)}
        print(f"{measure:24s} median {np.median(ms):6.1f} ms  p95 {np.percentile(ms, 95):6.1f} ms  AbsRel {acc['abs_rel']:.4f}")
    # where the time goes, default measure
    from reconstruct import classical, fill

    grey = stack.sorted_by_focus().to_grey_float()
    focus = stack.sorted_by_focus().focus_dpt
    stages = {}
    t0 = time.perf_counter(); m = classical.focus_measure(grey); stages["focus_measure"] = time.perf_counter() - t0
    t0 = time.perf_counter(); peak, pos, k = classical._refine_peak(m, focus, method="gaussian"); stages["refine"] = time.perf_counter() - t0
    t0 = time.perf_counter(); f_min = m.min(axis=0); conf = classical._peak_confidence(m, k, f_min, classical._noise_floor(f_min)); stages["confidence"] = time.perf_counter() - t0
    t0 = time.perf_counter(); guide = classical.fuse_all_in_focus(stack.sorted_by_focus().images, pos); stages["fuse"] = time.perf_counter() - t0
    t0 = time.perf_counter(); fill.edge_aware_fill(peak, conf, guide, confidence_floor=0.3); stages["fill"] = time.perf_counter() - t0
    t0 = time.perf_counter(); fill.fit_planes_in_plain_regions(peak, conf, guide, confidence_floor=0.3); stages["plane_fit"] = time.perf_counter() - t0
    print("stages (ms): " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in stages.items()))
    target = 30.0
    default = results["modified_laplacian"]["median_ms"]
    print(f"target <= {target:.0f} ms on one core: measured {default:.1f} ms ({default / target:.2f}x the target)")
    path = save("classical", {
        "what": f"reconstruct_stack, {args.slices} slices {args.width}x{args.height}, one core",
        "machine": machine(), "results": results, "stages_ms": {k: round(v * 1e3, 2) for k, v in stages.items()},
        "target_ms": target,
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
