"""Soak: continuous acquisition on the simulated rig for ``--minutes`` (default 10).

Samples resident memory every ``--sample-s`` seconds; reports the growth from the first sample
after ``--warmup-s`` to the end (target: < 50 MB) and checks that every captured stack was
written or counted as dropped. Writes benchmarks/results/soak_continuous.json.

    python benchmarks/soak_continuous.py [--minutes 10] [--method dualfocus]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._common import machine, save  # noqa: E402


def rss_mb() -> float:
    """Current resident set size (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--method", default="dualfocus", choices=["dualfocus", "classical"])
    ap.add_argument("--warmup-s", type=float, default=60.0)
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "sim.yaml")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    from rig import load_config
    from rig.continuous import run_continuous

    config = load_config(args.config)
    config.reconstruct.method = args.method
    config.output.dir = Path(tempfile.mkdtemp(prefix="soak_"))
    config.output.record_stacks = False  # hours of stacks would fill the disk; depth is still written
    config.output.preview = True
    samples: list[tuple[float, float]] = []
    done = threading.Event()
    t0 = time.monotonic()

    def sample() -> None:
        while not done.wait(args.sample_s):
            samples.append((time.monotonic() - t0, rss_mb()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    run = run_continuous(config, duration_s=60.0 * args.minutes, show_status=False)
    done.set()
    sampler.join()
    after = [m for t, m in samples if t >= args.warmup_s]
    growth = (max(after[len(after) // 2:]) - after[0]) if len(after) >= 2 else float("nan")
    s = run.summary
    doc = {
        "machine": machine(), "minutes": args.minutes, "method": args.method,
        "rss_mb_first_after_warmup": round(after[0], 1) if after else None, "rss_mb_end": round(samples[-1][1], 1) if samples else None,
        "rss_growth_mb": round(growth, 1), "target_growth_mb": 50,
        "stacks_captured": s["stacks_captured"], "stacks_written": s["stacks_written"], "stacks_dropped": s["stacks_dropped"],
        "stacks_unaccounted": s["stacks_unaccounted"], "stacks_per_s": s["stacks_per_s"],
        "samples": [[round(t, 1), round(m, 1)] for t, m in samples],
    }
    path = save("soak_continuous", doc)
    print(f"{args.minutes:g} min: {s['stacks_written']} stacks written, {s['stacks_dropped']} dropped, "
          f"{s['stacks_unaccounted']} unaccounted; RSS {doc['rss_mb_first_after_warmup']} -> {doc['rss_mb_end']} MB "
          f"(growth {doc['rss_growth_mb']} MB, target < 50); written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
