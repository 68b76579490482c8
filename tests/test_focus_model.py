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


# --------------------------------------------------------------------------------------------
# The calibrated (polynomial) model: its calibrated actuator span
# --------------------------------------------------------------------------------------------


def _stage_fit(offset_mm: float):
    """A G-code stage (thin lens f = 25 mm, image distance 25 + x mm) whose controller reports
    x + ``offset_mm``; fitted with the degree-2 model. Returns (fit, distances, positions)."""
    import numpy as np

    from calibration.focus_fit import fit_focus_model

    x = np.linspace(0.35, 1.6, 7)
    z = 1.0 / (1000.0 * (1.0 / 25.0 - 1.0 / (25.0 + x)))  # 1.8 .. 0.4 m
    pos = x + offset_mm
    return fit_focus_model(list(z), list(pos), unit="mm", degree=2), z, pos


@pytest.mark.parametrize("offset_mm", [0.0, 10.0, -60.0, 40.0])
def test_degree2_inverse_takes_the_root_on_the_calibrated_span(offset_mm: float) -> None:
    fit, z, pos = _stage_fit(offset_mm)
    m = fit.model
    assert m.valid_values == pytest.approx((pos.min(), pos.max()), abs=1e-3)
    for zz, p in zip(z, pos, strict=True):
        assert m.actuator_value(float(zz)) == pytest.approx(p, abs=1e-3)  # not the mirror root (-33 mm at offset -60)


def test_an_older_file_without_the_span_takes_it_from_the_fitted_peaks(tmp_path: Path) -> None:
    import yaml

    fit, z, pos = _stage_fit(-60.0)
    section = fit.to_dict()
    assert section["valid_values"] == pytest.approx([pos.min(), pos.max()], abs=1e-3)
    del section["valid_values"]  # as written before the span was stored
    m = load_focus_model(_write(tmp_path, yaml.safe_dump({"focus_model": section})))
    assert m.valid_values == pytest.approx((pos.min(), pos.max()), abs=1e-3)
    assert m.actuator_value(float(z[3])) == pytest.approx(pos[3], abs=1e-3)
    del section["fit"]  # nothing to take it from: no span, no span check (the older behaviour)
    (tmp_path / "b").mkdir()
    assert load_focus_model(_write(tmp_path / "b", yaml.safe_dump({"focus_model": section}))).valid_values is None


def test_an_actuator_value_outside_the_calibrated_span_is_refused() -> None:
    from calibration.focus_model import PolynomialFocusModel

    span = (0.5 / 0.0165 + 0.5 / 0.0165, 3.0 / 0.0165)  # 2 m .. 0.4 m at 25 C
    m = PolynomialFocusModel(coefficients_dpt=(-0.5, 0.0165, 0.0), unit="mA", temperature_dpt_per_c=-0.003,
                             reference_temperature_c=25.0, valid_dpt=(0.5, 2.5), valid_values=span)
    assert m.value_tolerance() == pytest.approx((0.02 / 0.0165, 0.02 / 0.0165))  # tolerance_dpt in mA
    assert m.actuator_value(0.4) == pytest.approx(span[1])
    # 5 C warmer: 0.015 dpt more, within the tolerance
    assert m.actuator_value(0.4, temperature_c=30.0) == pytest.approx(span[1] + 0.015 / 0.0165)
    # 10 C warmer: 0.03 dpt beyond the calibrated span
    with pytest.raises(CalibrationError, match=r"focus distance 0\.4 m needs 183\.6 mA at a lens temperature of 35\.0 °C "
                                               r"\(calibrated at 25\.0 °C\), outside the calibrated actuator span 60\.61\.\.181\.8 mA"):
        m.actuator_value(0.4, temperature_c=35.0)
    again = PolynomialFocusModel(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in m.to_dict().items()})
    assert again == m
