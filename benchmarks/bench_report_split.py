"""Depth accuracy on the report split (the Middlebury 2005 scenes, never trained or tuned on).

Stacks rendered with the project's image formation at 384 px wide, colour, 10 slices even in
inverse depth over each scene's 1-99 % disparity range, largest blur diameter 14 px, noise
sigma 0.01, slices in shuffled order (seeded). Depth = 1 / disparity (the unknown scale
cancels in AbsRel and delta1); every pixel with known truth scored, NaN counted as error.

    python benchmarks/bench_report_split.py [--weights W.safetensors ...] [--precision fp32 bf16]
                                            [--onnx fp32 int8 bf16] [--input-scale 1.5 ...]

Prints a table and writes benchmarks/results/report_split.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import machine, save  # noqa: E402

import numpy as np  # noqa: E402

from capture.stack import FocalStack  # noqa: E402
from reconstruct.classical import FOCUS_MEASURES, ClassicalParams  # noqa: E402
from reconstruct.api import reconstruct_stack  # noqa: E402
from reconstruct.synth import REPORT_SCENES, load_middlebury, render_eval_stack  # noqa: E402
from reconstruct.train import disparity_metrics, predict_disparity  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "middlebury_2001_2006"


def classical_disparity(stack_u8: np.ndarray, focus: np.ndarray, measure: str) -> np.ndarray:
    # focus values are disparities: a FocalStack with focus_distance_m = 1 / disparity keeps
    # the same (inverse) axis, and its depth output is 1 / disparity
    stack = FocalStack(stack_u8, focus_distance_m=(1.0 / focus).tolist())
    res = reconstruct_stack(stack, params=ClassicalParams(focus_measure=measure))
    return 1.0 / res.depth


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--weights", type=Path, nargs="*", default=[], help="DualFocus safetensors files to score")
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32"],
                    help="score each weights file in these precisions (bf16: CPU bfloat16 autocast of the network body)")
    ap.add_argument("--onnx", nargs="*", choices=("fp32", "int8", "bf16"), default=[],
                    help="also score each weights file through ONNX Runtime on the CPU in these precisions (int8: the quantised graph; bf16: the fp32 graph in OpenVINO, needs onnxruntime-openvino)")
    ap.add_argument("--input-scale", nargs="*", type=float, default=[],
                    help="also score each weights file with the slices resized by these factors for the network (torch fp32)")
    ap.add_argument("--out", default="report_split")
    args = ap.parse_args()
    if not (args.data / "manifest.csv").is_file():
        print(f"skip: {args.data} not found (the Middlebury scenes live in ../shared/data)")
        return 0
    import torch

    torch.set_num_threads(2)
    scenes = load_middlebury(args.data, names=list(REPORT_SCENES))
    t0 = time.perf_counter()
    stacks = [render_eval_stack(s, width=args.width, slices=10, max_blur_px=14.0, noise_sigma=0.01, seed=i) for i, s in enumerate(scenes)]
    print(f"rendered {len(stacks)} report stacks in {time.perf_counter() - t0:.1f} s")
    methods: dict[str, callable] = {f"classical/{m}": (lambda st, f, m=m: classical_disparity(st, f, m)) for m in FOCUS_MEASURES}
    from reconstruct.dualfocus.checkpoint import load_weights
    from reconstruct.dualfocus.infer import predict

    parity_pairs: list[tuple[str, str]] = []
    outputs: dict[tuple[str, str], np.ndarray] = {}
    for w in args.weights:
        model, meta = load_weights(w)
        label, depth = f"{meta.get('model', w.stem)} ({w.name})", 1
        while label in methods and depth < len(w.parts):  # files of the same name: add folders until unique
            depth += 1
            label = f"{meta.get('model', w.stem)} ({'/'.join(w.parts[-depth:])})"
        for precision in args.precision:
            tag = label if precision == "fp32" else f"{label} {precision}"
            methods[tag] = lambda st, f, model=model, bf16=precision == "bf16": predict_disparity(model, st, f, bf16=bf16)
        for scale in args.input_scale:
            methods[f"{label} input_scale {scale:g}"] = lambda st, f, w=w, sc=scale: predict(
                st.astype(np.float32) / 255.0, f, weights=w, backend="torch", precision="fp32", input_scale=sc).depth_focus
        for precision in args.onnx:
            methods[f"{label} onnxruntime {precision}"] = lambda st, f, w=w, p=precision: predict(
                st.astype(np.float32) / 255.0, f, weights=w, backend="onnxruntime", precision=p).depth_focus
            if "fp32" in args.precision:  # how far ONNX Runtime's depth is from torch's, per pixel
                parity_pairs.append((f"{label} onnxruntime {precision}", label))
    results: dict[str, dict] = {}
    for name, fn in methods.items():
        per_scene, secs = {}, []
        for scene, ev in zip(scenes, stacks):
            t0 = time.perf_counter()
            disp = fn(ev["stack"], ev["focus"])
            secs.append(time.perf_counter() - t0)
            if any(name in pair for pair in parity_pairs):
                outputs[name, scene.name] = np.asarray(disp, np.float64)
            per_scene[scene.name] = disparity_metrics(disp, ev["disparity"], ev["known"])
        mean = {k: float(np.mean([v[k] for v in per_scene.values()])) for k in ("abs_rel", "delta1")}
        results[name] = {"mean": mean, "per_scene": per_scene, "seconds_per_stack": float(np.median(secs))}
    best_classical = min((k for k in results if k.startswith("classical/")), key=lambda k: results[k]["mean"]["abs_rel"])
    base = results[best_classical]["mean"]["abs_rel"]
    print(f"{'method':44s} {'AbsRel':>8s} {'x best classical':>17s} {'delta1':>8s} {'s/stack':>8s}")
    for name, r in results.items():
        print(f"{name:44s} {r['mean']['abs_rel']:8.4f} {r['mean']['abs_rel'] / base:17.2f} {r['mean']['delta1']:8.4f} {r['seconds_per_stack']:8.3f}")
    parity = {}
    for onnx_name, torch_name in parity_pairs:
        # |ONNX Runtime - torch fp32| over every pixel of every report stack, in units of the stack's focus range
        diffs = np.concatenate([
            (np.abs(outputs[onnx_name, sc.name] - outputs[torch_name, sc.name]) / float(np.ptp(ev["focus"]))).ravel()
            for sc, ev in zip(scenes, stacks)])
        parity[onnx_name] = {"max": float(diffs.max()), "p99": float(np.quantile(diffs, 0.99)), "mean": float(diffs.mean()),
                             "share_within_1e-3": float((diffs <= 1e-3).mean())}
        print(f"{onnx_name} vs torch fp32, |depth difference| / focus range over {diffs.size} pixels: max {diffs.max():.1e}, "
              f"p99 {np.quantile(diffs, 0.99):.1e}, mean {diffs.mean():.1e}, {100 * (diffs <= 1e-3).mean():.2f} % within 1e-3")
    path = save(args.out, {"what": __doc__.splitlines()[0], "machine": machine(), "scenes": list(REPORT_SCENES),
                           "width_px": args.width, "best_classical": best_classical, "results": results, "onnx_parity": parity})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
