"""How good a depth map at a network's working resolution can be: the AbsRel of the truth itself
at 1/2, 1/4 and 1/8 resolution, upsampled back.

A study for the network issue, not a benchmark of record, and no model is scored or chosen by
it: it uses the ground truth only. Each scene is rendered as ``bench_report_split.py`` renders
it (384 px wide, 10 slices even in inverse depth over the 1-99 % disparity range); the true
disparity, clamped to the sweep's range (no focus-based method can place a pixel outside it),
is resized down by area averaging or point sampling, then back up bilinearly, and scored as the
network is (AbsRel of 1/disparity over every pixel with known truth). ``argmax slice`` is the
truth snapped to the nearest of the 10 focus settings (what a per-slice argmax reaches at best).

DualFocus's focal volume, decoder and logits are at 1/4 resolution and reach full resolution by
bilinear interpolation (of logits, before the softmax, which can be sharper than interpolating
depth), so the 1/4 rows are what a perfect volume would score through a depth upsampler.

    python benchmarks/study_resolution_floor.py [--split report tuning]

Prints a table per split and writes benchmarks/results/resolution_floor.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import machine, save  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from reconstruct.synth import REPORT_SCENES, load_middlebury, render_eval_stack  # noqa: E402
from reconstruct.train import disparity_metrics  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "middlebury_2001_2006"
TUNING_SCENES = ("Aloe", "Flowerpots", "Rocks1")  # configs/train_dualfocus_s*.yaml


def floors(truth: np.ndarray, focus: np.ndarray, known: np.ndarray) -> dict[str, float]:
    """AbsRel of each resampled truth: ``truth`` ``[H, W]`` disparity, ``focus`` ``[N]`` (disparity units)."""
    h, w = truth.shape
    lo, hi = float(focus.min()), float(focus.max())
    clamped = np.clip(truth, lo, hi).astype(np.float32)
    out = {"clamped to the sweep": disparity_metrics(clamped, truth, known)["abs_rel"]}
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for factor in (2, 4, 8):
        # area: cv2.resize down and up use the same scale (h / (h // factor)), so they stay aligned
        area = cv2.resize(clamped, (w // factor, h // factor), interpolation=cv2.INTER_AREA)
        up_area = cv2.resize(area, (w, h), interpolation=cv2.INTER_LINEAR)
        out[f"1/{factor} area, bilinear up"] = disparity_metrics(up_area, truth, known)["abs_rel"]
        # point: the sample of row j sits at full-resolution row off + factor * j, and is
        # interpolated from there (cv2.resize would place it at factor * j + (factor - 1) / 2:
        # half a pixel off, which inflated this row by 10-45 % until 2026-11-28)
        off = factor // 2
        point = np.ascontiguousarray(clamped[off::factor, off::factor])
        up_point = cv2.remap(point, (xx - off) / factor, (yy - off) / factor, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        out[f"1/{factor} point, bilinear up"] = disparity_metrics(up_point, truth, known)["abs_rel"]
    levels = np.sort(focus.astype(np.float32))
    snapped = levels[np.abs(clamped[..., None] - levels).argmin(axis=-1)]
    out[f"argmax slice ({len(levels)} slices)"] = disparity_metrics(snapped, truth, known)["abs_rel"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--split", nargs="+", choices=("report", "tuning"), default=["report", "tuning"])
    args = ap.parse_args()
    if not (args.data / "manifest.csv").is_file():
        print(f"skip: {args.data} not found (the Middlebury scenes live in ../shared/data)")
        return 0
    doc: dict = {"what": __doc__.splitlines()[0], "machine": machine(), "splits": {}}
    for split in args.split:
        names = list(REPORT_SCENES) if split == "report" else list(TUNING_SCENES)
        scenes = load_middlebury(args.data, names=names)
        per_scene = {}
        for i, scene in enumerate(scenes):  # seeds as bench_report_split.py's (the truth does not depend on them)
            ev = render_eval_stack(scene, width=384, slices=10, max_blur_px=14.0, noise_sigma=0.01, seed=i)
            per_scene[scene.name] = floors(ev["disparity"], ev["focus"], ev["known"])
        rows = list(next(iter(per_scene.values())))
        mean = {r: float(np.mean([v[r] for v in per_scene.values()])) for r in rows}
        print(f"\n{split} split ({', '.join(names)}): AbsRel of the resampled truth")
        print(f"{'':34s} {'mean':>7s} " + " ".join(f"{n:>10s}" for n in names))
        for r in rows:
            print(f"{r:34s} {mean[r]:7.4f} " + " ".join(f"{per_scene[n][r]:10.4f}" for n in names))
        doc["splits"][split] = {"scenes": names, "mean": mean, "per_scene": per_scene}
    print(f"\nwrote {save('resolution_floor', doc)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
