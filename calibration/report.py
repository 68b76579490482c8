"""The calibration file and the report a person reads first (plots + a short summary page).

``calibration.yaml`` (format ``calibration/1``): the focus model (``focus_model``, read by
:func:`calibration.focus_model.load_focus_model`), its fit (residuals, leave-one-out, valid
range), the breathing table, the intrinsics, the rig and lens identity, the lens temperature
range and the date. The report folder holds ``summary.md`` and PNG plots.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from capture.atomic import write_text_atomic

logger = logging.getLogger(__name__)

__all__ = ["calibration_document", "write_calibration", "write_report"]

FORMAT = "calibration/1"


def calibration_document(result: Any, *, rig: dict[str, Any], session: dict[str, Any]) -> dict[str, Any]:
    """Everything a later run (and a person) needs, as plain YAML-able data."""
    temps = result.temperatures_c
    doc: dict[str, Any] = {
        "format": FORMAT,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "rig": rig,
        "focus_model": result.fit.to_dict(),
        "temperature_range_c": [min(temps), max(temps)] if temps else None,
        "session": session,
    }
    near_far = result.fit.model.valid_range_m
    doc["focus_model"]["valid_range_m"] = None if near_far is None else [float(near_far[0]), float(near_far[1])]
    if result.breathing is not None:
        doc["breathing"] = result.breathing.to_dict()
    if result.intrinsics is not None:
        doc["intrinsics"] = result.intrinsics.to_dict()
    return doc


def write_calibration(doc: dict[str, Any], path: Path) -> Path:
    """Write ``calibration.yaml`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    write_text_atomic(path, yaml.safe_dump(doc, sort_keys=False))
    return path


def _plot_curves(result: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    cmap = plt.get_cmap("viridis")
    n = max(1, len(result.curves) - 1)
    for k, c in enumerate(result.curves):
        s = np.asarray(c.sharpness)
        s = s / s.max()
        colour = cmap(k / n)
        ax.plot(c.values, s, ".-", color=colour, lw=1, ms=3, label=f"{c.distance_m:.3f} m")
        ax.axvline(c.peak_value, color=colour, lw=0.8, ls="--")
    ax.set_xlabel(f"actuator value ({result.fit.model.unit})")
    ax.set_ylabel("sharpness (normalised)")
    ax.set_title("Sharpness curves; dashed: fitted peaks")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_fit(result: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fit = result.fit
    v = np.asarray(fit.peak_values)
    dpt = 1.0 / np.asarray(fit.distances_m)
    grid = np.linspace(v.min(), v.max(), 200)
    fig, (ax, axr) = plt.subplots(2, 1, figsize=(7, 5.2), dpi=110, sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
    ax.plot(v, dpt, "o", label="measured peaks")
    ax.plot(grid, [fit.model.focus_dpt(x) for x in grid], "-", label="fitted model")
    ax.set_ylabel("focus (dpt = 1 / m)")
    ax.set_title(f"Focus model: rms {fit.rms_dpt * 1000:.2f} mdpt, leave-one-out rms {fit.loo_rms_dpt * 1000:.2f} mdpt")
    ax.legend(fontsize=8)
    axr.axhline(0, color="grey", lw=0.8)
    axr.plot(v, 1000 * np.asarray(fit.residuals_dpt), "o", label="residual")
    axr.plot(v, 1000 * np.asarray(fit.loo_errors_dpt), "x", label="leave-one-out")
    axr.set_xlabel(f"actuator value ({fit.model.unit})")
    axr.set_ylabel("mdpt")
    axr.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_breathing(result: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    b = result.breathing
    values = np.asarray(b.actuator_values)
    grid = np.linspace(values.min(), values.max(), 100)
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    ax.plot(values, [b.scale_at(x) for x in values], "o", label="measured")
    ax.plot(grid, [b.scale_at(x) for x in grid], "-", lw=1, label="interpolated")
    ax.set_xlabel(f"actuator value ({result.fit.model.unit})")
    ax.set_ylabel("magnification vs reference")
    ax.set_title("Focus breathing")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(result: Any, folder: Path, *, doc: dict[str, Any], calibration_path: Path) -> Path:
    """Plots and ``summary.md`` in ``folder``; returns the summary's path."""
    import matplotlib

    matplotlib.use("Agg")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _plot_curves(result, folder / "sharpness_curves.png")
    _plot_fit(result, folder / "focus_fit.png")
    if result.breathing is not None:
        _plot_breathing(result, folder / "breathing.png")
    fit, model = result.fit, result.fit.model
    near, far = model.valid_range_m  # type: ignore[misc]
    c0, c1, c2 = model.coefficients_dpt
    lines = [
        "# Calibration summary",
        "",
        f"- date (UTC): {doc['created_utc']}; rig: {doc['rig'].get('name')}",
        f"- file: `{calibration_path}`; use it with `calibration: {{file: {json.dumps(str(calibration_path))}}}` in rig.yaml",
        "",
        "## Focus distance",
        "",
        f"- model: focus (dpt) = {c0:.5f} + {c1:.6f}·v" + (f" + {c2:.3e}·v²" if c2 else "") + f", v in {model.unit}",
        f"- fitted on {len(fit.distances_m)} distances, {min(fit.distances_m):.3f}–{max(fit.distances_m):.3f} m; "
        f"valid range {near:.3f}–{'∞' if math.isinf(far) else f'{far:.3f}'} m",
        f"- residuals: rms {fit.rms_dpt * 1000:.2f} mdpt, max {np.max(np.abs(fit.residuals_dpt)) * 1000:.2f} mdpt; "
        f"leave-one-out rms {fit.loo_rms_dpt * 1000:.2f} mdpt",
        *[f"- **check the target at {p['distance_m']:.3f} m**: {abs(p['loo_error_dpt']) * 1000:.1f} mdpt off the fit of the "
          f"other points ({p['ratio']:.1f}x their typical leave-one-out error); a mistyped distance? repeat that step" for p in getattr(fit, "suspects", [])],
        f"- lens temperature: {_temperature_text(doc['temperature_range_c'])}"
        + (f"; temperature term {model.temperature_dpt_per_c:.4f} dpt/°C" if model.temperature_dpt_per_c else ""),
        "",
        "![sharpness curves](sharpness_curves.png)",
        "",
        "![focus fit](focus_fit.png)",
        "",
    ]
    if result.breathing is not None:
        scales = [result.breathing.scale_at(v) for v in result.breathing.actuator_values]
        lines += ["## Focus breathing", "",
                  f"- magnification {min(scales):.5f}–{max(scales):.5f} over the calibrated span "
                  f"({(max(scales) - min(scales)) * 100:.2f} %); stacks captured with this file carry per-slice `alignment`",
                  "", "![breathing](breathing.png)", ""]
    if result.intrinsics is not None:
        k = result.intrinsics
        cx, cy = k.principal_point_px
        lines += ["## Intrinsics", "",
                  f"- fx {k.fx_px:.2f} px, fy {k.fy_px:.2f} px, principal point ({cx:.1f}, {cy:.1f}) px, {k.distortion_model} distortion",
                  f"- reprojection error rms {k.rms_reprojection_px:.3f} px over {k.n_views} views", ""]
    path = folder / "summary.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _temperature_text(span_c: list[float] | None) -> str:
    """``27.0 °C``, ``26.5-28.1 °C`` or ``not logged`` (was the raw list, ``[27.0, 27.0] °C``)."""
    if not span_c:
        return "not logged"
    lo, hi = span_c
    return f"{lo:.1f} °C" if lo == hi else f"{lo:.1f}-{hi:.1f} °C"

