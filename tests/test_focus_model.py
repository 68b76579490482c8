"""Tests of calibration.focus_model: the liquid-lens current <-> focus distance map and its file."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from calibration.focus_model import LiquidLensFocusModel, load_focus_model
from capture.errors import CalibrationError, ConfigError


@pytest.mark.parametrize("distance_m", [0.25, 0.4, 1.0, 2.0, 7.5])
def test_round_trip_distance_to_current_and_back(distance_m: float) -> None:
    m = LiquidLensFocusModel(offset_dpt=-0.5, dpt_per_ma=0.0165)
    current = m.actuator_value(distance_m)
    assert current == pytest.approx((1.0 / distance_m + 0.5) / 0.0165, rel=1e-12)
    assert m.focus_distance_m(current) == pytest.approx(distance_m, rel=1e-12)
    assert m.focus_dpt(current) == pytest.approx(1.0 / distance_m, rel=1e-12)


def test_known_values() -> None:
    m = LiquidLensFocusModel(offset_dpt=-0.5, dpt_per_ma=0.0165)
    assert m.actuator_value(1.0) == pytest.approx(90.909, abs=1e-3)
    assert m.actuator_value(math.inf) == pytest.approx(0.5 / 0.0165)
    assert math.isinf(m.focus_distance_m(0.0))  # -0.5 dpt: beyond infinity
    assert m.unit == "mA" and m.kind == "liquid_lens_linear"


def test_base_focus_adds_its_diopters() -> None:
    m = LiquidLensFocusModel(offset_dpt=0.0, dpt_per_ma=0.01, base_focus_m=2.0)
    assert m.base_dpt == pytest.approx(0.5)
    assert m.focus_distance_m(0.0) == pytest.approx(2.0)  # no added power: the base focus
    assert m.actuator_value(1.0) == pytest.approx(50.0)  # 1 dpt = 0.5 dpt base + 0.5 dpt lens
    assert m.actuator_value(math.inf) == pytest.approx(-50.0)  # negative power to reach infinity
    assert math.isinf(m.focus_distance_m(-60.0))
    d = LiquidLensFocusModel(offset_dpt=0.0, dpt_per_ma=0.01)
    assert d.base_dpt == 0.0


@pytest.mark.parametrize("gain", [0.0, math.inf, math.nan])
def test_unusable_gain_is_refused(gain: float) -> None:
    with pytest.raises(CalibrationError, match="dpt_per_ma"):
        LiquidLensFocusModel(offset_dpt=0.0, dpt_per_ma=gain)


@pytest.mark.parametrize("distance_m", [0.0, -1.0, math.nan])
def test_unreachable_distance_is_refused(distance_m: float) -> None:
    with pytest.raises(CalibrationError):
        LiquidLensFocusModel(offset_dpt=0.0, dpt_per_ma=0.01).actuator_value(distance_m)


def test_to_dict_round_trips() -> None:
    m = LiquidLensFocusModel(offset_dpt=-0.45, dpt_per_ma=0.017, base_focus_m=3.0)
    assert LiquidLensFocusModel(**m.to_dict()) == m


# --------------------------------------------------------------------------------------------
# load_focus_model
# --------------------------------------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "calibration.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_reads_a_calibration_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "focus_model:\n  kind: liquid_lens_linear\n  offset_dpt: -0.47\n  dpt_per_ma: 0.0163\n  base_focus_m: 4.0\nother: 1\n")
    m = load_focus_model(path)
    assert m == LiquidLensFocusModel(offset_dpt=-0.47, dpt_per_ma=0.0163, base_focus_m=4.0)
    (tmp_path / "b").mkdir()
    default_base = load_focus_model(_write(tmp_path / "b", "focus_model: {kind: liquid_lens_linear, offset_dpt: 0, dpt_per_ma: 0.02}\n"))
    assert math.isinf(default_base.base_focus_m)
    assert load_focus_model(str(path)) == m  # str paths too


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("focus_model: [unclosed\n", "not valid YAML"),
        ("focus_model:\n  kind: stage_linear\n  offset_dpt: 0\n  dpt_per_ma: 0.01\n", "kind"),
        ("focus_model:\n  offset_dpt: 0\n  dpt_per_ma: 0.01\n", "kind"),
        ("focus_model:\n  kind: liquid_lens_linear\n  offset_dpt: 0\n", "dpt_per_ma"),
        ("focus_model:\n  kind: liquid_lens_linear\n  dpt_per_ma: 0.01\n", "offset_dpt"),
        ("focus_model:\n  kind: liquid_lens_linear\n  offset_dpt: zero\n  dpt_per_ma: 0.01\n", "focus_model"),
        ("something_else: 1\n", "focus_model"),
        ("", "focus_model"),
        ("- a list\n", "focus_model"),
    ],
)
def test_load_errors_name_the_file(tmp_path: Path, text: str, match: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_focus_model(path)
    assert str(path) in str(info.value)
    assert match in str(info.value)


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "calibration.yaml"
    with pytest.raises(ConfigError, match="calibration.yaml"):
        load_focus_model(path)


def test_load_zero_gain_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "focus_model:\n  kind: liquid_lens_linear\n  offset_dpt: 0\n  dpt_per_ma: 0\n")
    with pytest.raises(ConfigError, match="calibration.yaml") as info:
        load_focus_model(path)
    assert "dpt_per_ma" in str(info.value)
