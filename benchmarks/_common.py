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


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB since the last :func:`reset_peak_rss`
    (Linux ``VmHWM``), else since it started (``ru_maxrss``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    scale = 1024 if sys.platform != "darwin" else 1024 * 1024  # kB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def reset_peak_rss() -> bool:
    """Start :func:`peak_rss_mb` afresh from the current resident size (Linux: ``5`` to
    ``/proc/self/clear_refs``), so that set-up (an export, a quantisation) is not counted in an
    inference's peak. False where the platform cannot: the peak then includes everything before."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


RESULTS_ENV = "DUALFOCUS_BENCH_RESULTS"


def save(name: str, doc: dict) -> Path:
    """Write ``doc`` as ``<results>/<name>.json``: benchmarks/results/, or ``$DUALFOCUS_BENCH_RESULTS``."""
    out = Path(os.environ.get(RESULTS_ENV) or Path(__file__).resolve().parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2))
    return path
