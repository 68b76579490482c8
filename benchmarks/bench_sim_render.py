"""Simulated camera cost on ONE core: a first 10-slice sweep at 512x384 (renders every focus
setting; target < 3 s) and a repeated one (render cache hit, only noise; target < 0.3 s).

Times the camera's compute per frame (render + breathing + sensor noise), not its real-time
pacing (a real frame costs 1/fps of wall time, and so does a simulated one). Writes
benchmarks/results/sim_render.json.

    python benchmarks/bench_sim_render.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import machine, pin_one_core, save  # noqa: E402

pin_one_core()

import cv2  # noqa: E402
import numpy as np  # noqa: E402

cv2.setNumThreads(1)

from capture.optics import SensorModel, ThinLens  # noqa: E402
from capture.scenes import procedural_scene  # noqa: E402
from capture.simulated import PIXEL_FORMATS, SimulatedCamera  # noqa: E402


def sweep_compute_s(camera: SimulatedCamera, focus_dpt: np.ndarray, rng: np.random.Generator) -> float:
    t0 = time.perf_counter()
    _, bits = PIXEL_FORMATS[camera.pixel_format]
    for f in focus_dpt:
        radiance = camera.render_clean(float(f))
        camera.sensor.expose(radiance, exposure_s=camera.exposure_s, gain_db=0.0, out_bits=bits, rng=rng)
    return time.perf_counter() - t0


def main() -> int:
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help describes, never runs
    scene = procedural_scene(512, 384)
    lens = ThinLens(focal_length_mm=12.0, f_number=2.0, pixel_pitch_um=7.0)
    focus = np.linspace(0.5, 2.5, 10)
    rng = np.random.default_rng(0)
    cold, warm = [], []
    for _ in range(3):
        cam = SimulatedCamera(scene=scene, lens=lens, focus_dpt_at=lambda t: 1.0, sensor=SensorModel())
        t0 = time.perf_counter()
        cam.open()  # prepares the layered scene
        prepare = time.perf_counter() - t0
        cold.append(prepare + sweep_compute_s(cam, focus, rng))
        warm.append(min(sweep_compute_s(cam, focus, rng) for _ in range(3)))
        cam.close()
    first, again = float(np.median(cold)), float(np.median(warm))
    print(f"first 10-slice sweep at 512x384:    {first:.3f} s (target < 3 s, {first / 3:.2f}x)")
    print(f"repeated 10-slice sweep (cached):   {again:.3f} s (target < 0.3 s, {again / 0.3:.2f}x)")
    path = save("sim_render", {"what": "SimulatedCamera compute per 10-slice sweep, 512x384 RGB8, one core", "machine": machine(),
                               "first_sweep_s": round(first, 4), "repeated_sweep_s": round(again, 4), "targets_s": {"first": 3.0, "repeated": 0.3}})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
