"""Shared fixtures: the simulated rig's configs, small and default-sized."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# The tests describe what happens on a machine without a GPU, which is where CI runs. On a machine
# with one, `backend: auto` and training would choose the GPU and the CPU expectations would not
# hold (seen on an H100), so the GPU is hidden from this process and its subprocesses before torch
# looks for it; benchmarks/gpu_check.py checks the GPU path. DUALFOCUS_TESTS_SEE_GPU=1 keeps it.
if os.environ.get("DUALFOCUS_TESTS_SEE_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _fresh_repeat_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with the sweep's once-a-minute warnings unlogged (they are per process)."""
    import capture.sweep
    from capture.repeat_log import RepeatLimiter

    monkeypatch.setattr(capture.sweep, "_repeating", RepeatLimiter(capture.sweep.logger))


def sim_config_dict(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """configs/sim.yaml as a dict, writing runs under ``tmp_path``; ``overrides`` are
    ``section={key: value}`` merged one level deep."""
    raw = yaml.safe_load((ROOT / "configs" / "sim.yaml").read_text())
    raw["output"]["dir"] = str(tmp_path / "runs")
    for section, values in overrides.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return raw


@pytest.fixture
def small_sim_dict(tmp_path: Path) -> dict[str, Any]:
    """A fast simulated rig: 128x96, 200 fps, 5 slices."""
    return sim_config_dict(
        tmp_path,
        camera={"width": 128, "height": 96, "fps": 200.0, "exposure_s": 0.004},
        sweep={"slices": 5},
    )


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 (a generator fixture)
    """Its own export cache and no benchmark file, no open backends, no logged choice and no
    remembered failures, before and after the test (backend and export tests use it)."""
    from reconstruct import backends
    from reconstruct.backends import export as export_mod
    from reconstruct.backends import select as select_mod
    from reconstruct.dualfocus import infer

    cache = tmp_path / "cache"
    monkeypatch.setenv(export_mod.CACHE_ENV, str(cache))
    monkeypatch.setattr(select_mod, "latency_files", lambda: [cache / select_mod.LATENCY_FILE])
    backends.close_backends()
    select_mod.forget_logged_choices()
    infer._FAILED.clear()
    yield cache
    backends.close_backends()
