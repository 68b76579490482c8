"""Shared fixtures: the simulated rig's configs, small and default-sized."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


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
