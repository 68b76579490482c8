"""Shared helpers for the benchmark scripts: pin to one core, describe the machine, save JSON."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path


def pin_one_core() -> None:
    """Restrict this process and its libraries to one core (call before importing numpy/cv2)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


RESULTS_ENV = "DUALFOCUS_BENCH_RESULTS"


def save(name: str, doc: dict) -> Path:
    """Write ``doc`` as ``<results>/<name>.json``: benchmarks/results/, or ``$DUALFOCUS_BENCH_RESULTS``."""
    out = Path(os.environ.get(RESULTS_ENV) or Path(__file__).resolve().parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2))
    return path
