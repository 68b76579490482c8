"""Maps between actuator values and metric focus distances.

A liquid lens adds optical power ``P = offset_dpt + dpt_per_ma * I`` to a camera lens that
is focused at ``base_focus_m`` without it; the focus then lies at
``D_f = 1 / base_focus_m + P`` diopters, i.e. at ``1 / D_f`` metres (diopters add for thin lenses in contact). Sweep planning
uses the inverse map, distance -> actuator value, and refuses distances the model cannot reach.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from capture.errors import CalibrationError, ConfigError, yaml_problem
from capture.yaml_load import load_yaml

logger = logging.getLogger(__name__)

__all__ = ["LiquidLensFocusModel", "PolynomialFocusModel", "FocusModel", "load_focus_model"]


@dataclass(frozen=True)
class LiquidLensFocusModel:
    """Linear current -> optical power model of a liquid lens.

    >>> m = LiquidLensFocusModel(offset_dpt=-0.5, dpt_per_ma=0.0165)
    >>> round(m.actuator_value(1.0), 3)  # mA to focus at 1 m
    90.909
    >>> round(m.focus_distance_m(90.909), 3)
    1.0
    """

    offset_dpt: float
    dpt_per_ma: float
    base_focus_m: float = math.inf
    unit: str = "mA"
    kind: str = "liquid_lens_linear"

    def __post_init__(self) -> None:
        if self.dpt_per_ma == 0 or not math.isfinite(self.dpt_per_ma):
            raise CalibrationError(f"focus model: dpt_per_ma must be finite and non-zero, got {self.dpt_per_ma}")

    @property
    def base_dpt(self) -> float:
        return 0.0 if math.isinf(self.base_focus_m) else 1.0 / self.base_focus_m

    def focus_dpt(self, current_ma: float, *, temperature_c: float | None = None) -> float:
        """Focus in diopters at a lens current (``temperature_c`` is accepted for a uniform
        interface with :class:`PolynomialFocusModel`; this nominal model has no temperature term)."""
        return self.base_dpt + self.offset_dpt + self.dpt_per_ma * current_ma

    def focus_distance_m(self, current_ma: float, *, temperature_c: float | None = None) -> float:
        d = self.focus_dpt(current_ma)
        return math.inf if d <= 0 else 1.0 / d

    def actuator_value(self, focus_distance_m: float, *, temperature_c: float | None = None) -> float:
        """The lens current (mA) that focuses at ``focus_distance_m`` (no temperature term)."""
        if not focus_distance_m > 0:
            raise CalibrationError(f"focus model: focus distance must be > 0 m, got {focus_distance_m}")
        target_dpt = 0.0 if math.isinf(focus_distance_m) else 1.0 / focus_distance_m
        return (target_dpt - self.base_dpt - self.offset_dpt) / self.dpt_per_ma

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PolynomialFocusModel:
    """A calibrated map: focus power (diopters) polynomial in the actuator value.

    ``D(v, T) = c0 + c1 * v + c2 * v**2 + t * (T - T_ref)``; the focus distance is ``1 / D``.
    For a liquid lens (v in mA, or dpt in focal-power mode) the linear form is the physics;
    for a motorised stage (v in mm) the polynomial is a local thin-lens approximation. The
    inverse map refuses distances outside the calibrated range (with ``tolerance_dpt``) and
    current/position outside the calibrated actuator span ``valid_values`` (with the same
    tolerance, converted to actuator units by the slope at each end of the span:
    :meth:`value_tolerance`), because a fit says nothing there. Of the two roots of a degree-2
    model the one on the calibrated span's branch is taken.

    >>> m = PolynomialFocusModel(coefficients_dpt=(-0.5, 0.0165, 0.0), unit="mA", valid_dpt=(0.4, 2.6))
    >>> round(m.actuator_value(1.0), 3)
    90.909
    """

    coefficients_dpt: tuple[float, float, float]
    unit: str = "mA"
    temperature_dpt_per_c: float = 0.0
    reference_temperature_c: float | None = None
    valid_dpt: tuple[float, float] | None = None
    tolerance_dpt: float = 0.02
    kind: str = "polynomial"
    #: (lowest, highest) calibrated actuator value: the fitted peaks, widened to the values of
    #: the ``valid_dpt`` ends by the model; None: unknown (a model made in code without it)
    valid_values: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        c = tuple(float(x) for x in self.coefficients_dpt)
        if len(c) != 3 or not all(math.isfinite(x) for x in c):
            raise CalibrationError(f"focus model: coefficients_dpt must be three finite numbers, got {self.coefficients_dpt}")
        if c[1] == 0 and c[2] == 0:
            raise CalibrationError("focus model: the power does not depend on the actuator value (c1 = c2 = 0)")
        object.__setattr__(self, "coefficients_dpt", c)
        if self.valid_values is not None:
            lo, hi = sorted(float(x) for x in self.valid_values)
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise CalibrationError(f"focus model: valid_values must be two finite numbers, got {self.valid_values}")
            object.__setattr__(self, "valid_values", (lo, hi))
            if self.valid_dpt is not None:  # the span covers the calibrated distance range (the fit's residuals
                ends = [lo, hi]             # put its ends a little off the outermost peaks)
                for target in self.valid_dpt:
                    value = self._inverse(float(target) - c[0])
                    if value is not None:
                        ends.append(value)
                object.__setattr__(self, "valid_values", (min(ends), max(ends)))

    def _thermal_dpt(self, temperature_c: float | None) -> float:
        if temperature_c is None or self.reference_temperature_c is None:
            return 0.0
        return self.temperature_dpt_per_c * (temperature_c - self.reference_temperature_c)

    def focus_dpt(self, value: float, *, temperature_c: float | None = None) -> float:
        c0, c1, c2 = self.coefficients_dpt
        return c0 + c1 * value + c2 * value * value + self._thermal_dpt(temperature_c)

    def focus_distance_m(self, value: float, *, temperature_c: float | None = None) -> float:
        d = self.focus_dpt(value, temperature_c=temperature_c)
        return math.inf if d <= 0 else 1.0 / d

    @property
    def valid_range_m(self) -> tuple[float, float] | None:
        """(nearest, farthest) calibrated focus distance."""
        if self.valid_dpt is None:
            return None
        lo, hi = self.valid_dpt
        return (1.0 / hi, math.inf if lo <= 0 else 1.0 / lo)

    def actuator_value(self, focus_distance_m: float, *, temperature_c: float | None = None) -> float:
        """The actuator value that focuses at ``focus_distance_m``.

        Args:
            temperature_c: the lens temperature now, for the fitted temperature term (None:
                the reference temperature).

        Raises:
            CalibrationError: the distance lies outside the calibrated range, or the actuator
                value it needs lies outside the calibrated span (both with ``tolerance_dpt``).
        """
        if not focus_distance_m > 0:
            raise CalibrationError(f"focus model: focus distance must be > 0 m, got {focus_distance_m}")
        target = 0.0 if math.isinf(focus_distance_m) else 1.0 / focus_distance_m
        if self.valid_dpt is not None:
            lo, hi = self.valid_dpt
            if not (lo - self.tolerance_dpt <= target <= hi + self.tolerance_dpt):
                near, far = self.valid_range_m  # type: ignore[misc]
                raise CalibrationError(
                    f"focus distance {focus_distance_m:.4g} m is outside the calibrated range {near:.4g}-{far:.4g} m; "
                    "calibrate over a wider range or narrow sweep.range_m"
                )
        c0 = self.coefficients_dpt[0]
        value = self._inverse(target - c0 - self._thermal_dpt(temperature_c))
        if value is None:
            raise CalibrationError(f"focus model: no actuator value reaches {focus_distance_m:.4g} m")
        self._check_span(value, focus_distance_m, temperature_c)
        return value

    def _inverse(self, rhs: float) -> float | None:
        """The actuator value v with ``c1 * v + c2 * v**2 == rhs`` (None: none)."""
        _c0, c1, c2 = self.coefficients_dpt
        if abs(c2) < 1e-15:
            return rhs / c1
        disc = c1 * c1 + 4 * c2 * rhs
        if disc < 0:
            return None
        roots = [(-c1 + sgn * math.sqrt(disc)) / (2 * c2) for sgn in (1.0, -1.0)]
        return self._calibrated_root(roots, rhs)

    def _calibrated_root(self, roots: list[float], rhs: float) -> float:
        """The root of a degree-2 model on the branch of the calibrated span: the one inside
        it, else the nearer to it. Without a known span (a model made in code without
        ``valid_values``) the root nearest the linear solution ``rhs / c1``."""
        if self.valid_values is not None:
            lo, hi = self.valid_values
            mid = 0.5 * (lo + hi)
            return min(roots, key=lambda r: (max(lo - r, 0.0, r - hi), abs(r - mid)))
        c1 = self.coefficients_dpt[1]
        linear = rhs / c1 if c1 != 0 else 0.0
        return min(roots, key=lambda r: abs(r - linear))

    def value_tolerance(self) -> tuple[float, float] | None:
        """How far (actuator units) a value may lie below / above the calibrated span: the
        distance tolerance ``tolerance_dpt`` divided by the model's slope at that end of the
        span. None without a known span. The breathing table of a calibration uses the same."""
        if self.valid_values is None:
            return None
        _c0, c1, c2 = self.coefficients_dpt
        out = []
        for end in self.valid_values:
            slope = abs(c1 + 2.0 * c2 * end)
            out.append(self.tolerance_dpt / slope if slope > 0 else 0.0)
        return out[0], out[1]

    def _check_span(self, value: float, focus_distance_m: float, temperature_c: float | None) -> None:
        tol = self.value_tolerance()
        if tol is None or self.valid_values is None:
            return
        lo, hi = self.valid_values
        eps = 1e-9 * max(1.0, abs(lo), abs(hi))
        if lo - tol[0] - eps <= value <= hi + tol[1] + eps:
            return
        thermal = ""
        if temperature_c is not None and self.reference_temperature_c is not None and self.temperature_dpt_per_c:
            thermal = f" at a lens temperature of {temperature_c:.1f} °C (calibrated at {self.reference_temperature_c:.1f} °C)"
        raise CalibrationError(
            f"focus distance {focus_distance_m:.4g} m needs {value:.4g} {self.unit}{thermal}, outside the calibrated "
            f"actuator span {lo:.4g}..{hi:.4g} {self.unit}; calibrate over a wider range or narrow sweep.range_m"
        )

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "kind": self.kind,
            "unit": self.unit,
            "coefficients_dpt": [float(x) for x in self.coefficients_dpt],
            "temperature_dpt_per_c": float(self.temperature_dpt_per_c),
            "reference_temperature_c": self.reference_temperature_c,
            "valid_dpt": None if self.valid_dpt is None else [float(x) for x in self.valid_dpt],
            "tolerance_dpt": float(self.tolerance_dpt),
            "valid_values": None if self.valid_values is None else [float(x) for x in self.valid_values],
        }
        return doc


#: anything sweep planning can use as a focus map
FocusModel = LiquidLensFocusModel | PolynomialFocusModel


def load_focus_model(path: str | Path) -> FocusModel:
    """Read the ``focus_model`` section of a ``calibration.yaml``.

    Raises:
        ConfigError: the file is missing, unreadable or has no usable ``focus_model``.
    """
    path = Path(path)
    try:
        doc = load_yaml(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read calibration file ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML {yaml_problem(exc)}") from exc
    section = doc.get("focus_model") if isinstance(doc, dict) else None
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: focus_model: missing (expected a mapping with kind, offset_dpt, dpt_per_ma)")
    kind = section.get("kind")
    if kind == "polynomial":
        return _polynomial_from(section, path)
    if kind != "liquid_lens_linear":
        raise ConfigError(f"{path}: focus_model.kind: unknown kind {kind!r}; valid: liquid_lens_linear, polynomial")
    try:
        return LiquidLensFocusModel(
            offset_dpt=float(section["offset_dpt"]),
            dpt_per_ma=float(section["dpt_per_ma"]),
            base_focus_m=float(section.get("base_focus_m", math.inf)),
        )
    except KeyError as exc:
        raise ConfigError(f"{path}: focus_model.{exc.args[0]}: missing") from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: focus_model: expected numbers ({exc})") from exc
    except CalibrationError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _polynomial_from(section: dict[str, Any], path: Path) -> PolynomialFocusModel:
    try:
        valid = section.get("valid_dpt")
        return PolynomialFocusModel(
            valid_values=_valid_values(section),
            coefficients_dpt=tuple(float(x) for x in section["coefficients_dpt"]),  # type: ignore[arg-type]
            unit=str(section.get("unit", "mA")),
            temperature_dpt_per_c=float(section.get("temperature_dpt_per_c", 0.0)),
            reference_temperature_c=None if section.get("reference_temperature_c") is None else float(section["reference_temperature_c"]),
            valid_dpt=None if valid is None else (float(valid[0]), float(valid[1])),
            tolerance_dpt=float(section.get("tolerance_dpt", 0.02)),
        )
    except KeyError as exc:
        raise ConfigError(f"{path}: focus_model.{exc.args[0]}: missing") from exc
    except (TypeError, ValueError, IndexError) as exc:
        raise ConfigError(f"{path}: focus_model: expected numbers ({exc})") from exc
    except CalibrationError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _valid_values(section: dict[str, Any]) -> tuple[float, float] | None:
    """The calibrated actuator span: ``valid_values``, or for files written before it was
    stored, the lowest and highest fitted peak (``fit.peak_values``); else None (unknown)."""
    span = section.get("valid_values")
    if span is not None:
        return (float(span[0]), float(span[1]))
    fit = section.get("fit")
    peaks = fit.get("peak_values") if isinstance(fit, dict) else None
    if isinstance(peaks, list) and len(peaks) >= 2:
        values = [float(v) for v in peaks]
        return (min(values), max(values))
    return None
