"""Maps between actuator values and metric focus distances.

A liquid lens adds optical power ``P = offset_dpt + dpt_per_ma * I`` to a camera lens that
is focused at ``base_focus_m`` without it; the focus then lies at
``1 / D_f = 1 / base_focus_m + P`` (diopters add for thin lenses in contact). Sweep planning
uses the inverse map, distance -> actuator value, and refuses distances the model cannot reach.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from capture.errors import CalibrationError, ConfigError

logger = logging.getLogger(__name__)

__all__ = ["LiquidLensFocusModel", "load_focus_model"]


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

    def focus_dpt(self, current_ma: float) -> float:
        """Focus in diopters at a lens current."""
        return self.base_dpt + self.offset_dpt + self.dpt_per_ma * current_ma

    def focus_distance_m(self, current_ma: float) -> float:
        d = self.focus_dpt(current_ma)
        return math.inf if d <= 0 else 1.0 / d

    def actuator_value(self, focus_distance_m: float) -> float:
        """The lens current (mA) that focuses at ``focus_distance_m``."""
        if not focus_distance_m > 0:
            raise CalibrationError(f"focus model: focus distance must be > 0 m, got {focus_distance_m}")
        target_dpt = 0.0 if math.isinf(focus_distance_m) else 1.0 / focus_distance_m
        return (target_dpt - self.base_dpt - self.offset_dpt) / self.dpt_per_ma

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_focus_model(path: str | Path) -> LiquidLensFocusModel:
    """Read the ``focus_model`` section of a ``calibration.yaml``.

    Raises:
        ConfigError: the file is missing, unreadable or has no usable ``focus_model``.
    """
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read calibration file ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    section = doc.get("focus_model") if isinstance(doc, dict) else None
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: focus_model: missing (expected a mapping with kind, offset_dpt, dpt_per_ma)")
    kind = section.get("kind")
    if kind != "liquid_lens_linear":
        raise ConfigError(f"{path}: focus_model.kind: unknown kind {kind!r}; valid: liquid_lens_linear")
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
