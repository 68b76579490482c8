"""Focus-distance calibration: sharpness curves, their peaks, and the fitted focus model.

For each known target distance the actuator is swept finely; the sharpness of a central
region of interest gives a curve whose peak (refined below the step by a Gaussian fit, i.e. a
parabola through the log-sharpness of the points around the maximum) is the actuator value
that focuses at that distance. Over all distances, focus power ``1 / d`` is fitted as a
polynomial in the actuator value (linear for a liquid lens; quadratic on request or for a
stage), with a temperature term when the logged lens temperature varied enough to tell.
Residuals, leave-one-out error and the valid range go into the calibration file.

Every way this can go wrong on a real bench gets a message that says what to do: too few
distances, a target without texture (no peak), a peak at the edge of the swept range,
peaks that do not move monotonically with distance.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np

from calibration.focus_model import PolynomialFocusModel
from capture.errors import CalibrationError

logger = logging.getLogger(__name__)

__all__ = ["sharpness", "SharpnessCurve", "refine_peak", "FocusFit", "NonMonotonicPeaks", "PeakAtSweepEdge", "FlatSharpness", "fit_focus_model"]

#: a curve whose maximum is less than this many times its median shows no usable peak
MIN_PEAK_CONTRAST = 1.25
#: a sample at most this fraction of the curve's maximum counts as an image with no contrast
BLANK_SHARPNESS_FRACTION = 1e-6
#: a point is suspect when its leave-one-out error exceeds this many times the typical
#: leave-one-out error of the other points (fitted without it; see _loo_outliers) ...
LOO_OUTLIER_RATIO = 5.0
#: ... and this many diopters: the focus model's own tolerance (PolynomialFocusModel.tolerance_dpt)
LOO_OUTLIER_MIN_DPT = 0.02


class NonMonotonicPeaks(CalibrationError):
    """The focused actuator values do not change monotonically with distance;
    ``distances_m`` are the targets whose peaks are out of order (repeat those steps)."""

    def __init__(self, message: str, *, distances_m: list[float]) -> None:
        super().__init__(message)
        self.distances_m = distances_m


class FlatSharpness(CalibrationError):
    """The sharpness hardly changes over the sweep (max/median below :data:`MIN_PEAK_CONTRAST`):
    no texture, or a sweep narrower than the sharpness curve, or a target outside it."""


class PeakAtSweepEdge(CalibrationError):
    """The sharpness peak sits at the ``edge`` ("near" or "far") end of the swept values: the
    target is outside them (or the sweep is too narrow)."""

    def __init__(self, distance_m: float, edge: str) -> None:
        self.distance_m, self.edge = distance_m, edge
        super().__init__(f"{self.what}; widen the actuator sweep or move the target inside the focus range")

    @property
    def what(self) -> str:
        return f"target at {self.distance_m:.3f} m: the sharpness peak is at the {self.edge} edge of the sweep"


def _grey(image: np.ndarray) -> np.ndarray:
    img = image.astype(np.float32)
    if img.ndim == 3:
        img = img[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    peak = float(img.max()) or 1.0
    return img / peak


def sharpness(image: np.ndarray, *, roi_fraction: float = 0.5) -> float:
    """Variance of the Laplacian over the central ``roi_fraction`` of the image (width and
    height), after a light blur that keeps sensor noise from dominating.

    Args:
        image: ``[H, W]`` or ``[H, W, C]``, any dtype.
    """
    img = _grey(image)
    h, w = img.shape
    fh, fw = max(8, int(h * roi_fraction)), max(8, int(w * roi_fraction))
    y0, x0 = (h - fh) // 2, (w - fw) // 2
    roi = cv2.GaussianBlur(img[y0 : y0 + fh, x0 : x0 + fw], (0, 0), 0.8)
    lap = cv2.Laplacian(roi, cv2.CV_32F, ksize=3)
    return float(lap.var())


@dataclass
class SharpnessCurve:
    """Sharpness against actuator value at one target distance."""

    distance_m: float
    values: list[float]
    sharpness: list[float]
    temperature_c: float | None = None
    peak_value: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "distance_m": float(self.distance_m), "values": [float(v) for v in self.values],
            "sharpness": [float(s) for s in self.sharpness], "temperature_c": self.temperature_c,
            "peak_value": None if self.peak_value is None else float(self.peak_value),
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> SharpnessCurve:
        return cls(
            distance_m=float(doc["distance_m"]), values=[float(v) for v in doc["values"]],
            sharpness=[float(s) for s in doc["sharpness"]], temperature_c=doc.get("temperature_c"),
            peak_value=doc.get("peak_value"),
        )


def refine_peak(
    values: np.ndarray | list[float], scores: np.ndarray | list[float], *, distance_m: float, half_window: int = 2,
    check_contrast: bool = True, method: Literal["half_max", "gaussian"] = "half_max",
) -> float:
    """The actuator value of the sharpness peak, below the sampling step.

    ``half_max`` (default): the midpoint of the two points where the curve crosses half its
    height above the floor, each interpolated linearly between samples. It does not care about
    the shape of the top: a real lens (and the simulator) has a flat top over its depth of
    field, where a peak fit wanders. ``gaussian``: a parabola fitted by least squares to
    log-sharpness over the ``2 * half_window + 1`` samples around the maximum (Nayar's fit).
    ``check_contrast`` tests that the curve has a peak at all: right for a sweep over the whole
    range, wrong for a fine sweep that only spans the top of the peak.

    Raises:
        CalibrationError: no peak (flat curve: no texture, or the target is out of the
            swept range); PeakAtSweepEdge: the peak sits at the edge of the sweep.
    """
    v = np.asarray(values, np.float64)
    s = np.asarray(scores, np.float64)
    order = np.argsort(v, kind="stable")
    v, s = v[order], s[order]
    if v.size < 5:
        raise CalibrationError(f"target at {distance_m:.3f} m: a sharpness curve needs at least 5 samples, got {v.size}")
    if not np.all(np.isfinite(s)) or s.max() <= 0:
        raise CalibrationError(f"target at {distance_m:.3f} m: the images have no contrast; check the light, exposure and lens cap")
    blank = int(np.count_nonzero(s <= BLANK_SHARPNESS_FRACTION * s.max()))
    if check_contrast and blank > v.size // 3:
        # a defocused textured target still has some contrast (and a real sensor its noise): a
        # curve that is nothing in most images is a blank or covered view, or an object passing
        # through it, whose max/median ratio (median 0) would otherwise pass any contrast test
        raise CalibrationError(
            f"target at {distance_m:.3f} m: no sharpness peak ({blank} of {v.size} images have no contrast in the centre of the view); "
            "use a textured target that fills the centre of the view, and check the light, exposure and lens cap"
        )
    contrast = s.max() / max(float(np.median(s)), 1e-12)
    if check_contrast and contrast < MIN_PEAK_CONTRAST:
        raise FlatSharpness(
            f"target at {distance_m:.3f} m: no sharpness peak (max/median {contrast:.2f}); "
            "use a textured target that fills the centre of the view, and check it lies inside the swept focus range"
        )
    i = int(np.argmax(s))
    edge = "near" if i == v.size - 1 else "far" if i == 0 else None
    if method == "half_max" and edge is None:
        level = s.min() + 0.5 * (s[i] - s.min())
        j = i
        while j > 0 and s[j - 1] >= level:
            j -= 1
        k = i
        while k < v.size - 1 and s[k + 1] >= level:
            k += 1
        if j == 0:
            edge = "far"
        elif k == v.size - 1:
            edge = "near"
        else:
            left = v[j - 1] + (level - s[j - 1]) / (s[j] - s[j - 1]) * (v[j] - v[j - 1])
            right = v[k] + (s[k] - level) / (s[k] - s[k + 1]) * (v[k + 1] - v[k])
            return float(0.5 * (left + right))
    if edge is not None:
        raise PeakAtSweepEdge(distance_m, edge)
    lo, hi = max(0, i - half_window), min(v.size, i + half_window + 1)
    x, y = v[lo:hi], np.log(np.maximum(s[lo:hi], 1e-12))
    xm = x.mean()
    a, b, _c = np.polyfit(x - xm, y, 2)
    if a >= 0:  # not a maximum: fall back to the sample
        return float(v[i])
    peak = xm - b / (2 * a)
    step = float(np.median(np.diff(v)))
    return float(np.clip(peak, v[i] - step, v[i] + step))


@dataclass
class FocusFit:
    """The fitted model and how well it fits."""

    model: PolynomialFocusModel
    distances_m: list[float]
    peak_values: list[float]
    residuals_dpt: list[float]
    loo_errors_dpt: list[float]
    temperatures_c: list[float | None] = field(default_factory=list)
    #: points far off the fit of the others (a mistyped distance?): distance_m, loo_error_dpt, ratio (to the others')
    suspects: list[dict[str, float]] = field(default_factory=list)

    @property
    def rms_dpt(self) -> float:
        return float(np.sqrt(np.mean(np.square(self.residuals_dpt))))

    @property
    def loo_rms_dpt(self) -> float:
        return float(np.sqrt(np.mean(np.square(self.loo_errors_dpt)))) if self.loo_errors_dpt else math.nan

    def to_dict(self) -> dict[str, Any]:
        temps = [t for t in self.temperatures_c if t is not None]
        return {
            **self.model.to_dict(),
            "fit": {
                "distances_m": [float(d) for d in self.distances_m],
                "peak_values": [float(v) for v in self.peak_values],
                "residuals_dpt": [float(r) for r in self.residuals_dpt],
                "rms_dpt": self.rms_dpt,
                "max_abs_dpt": float(np.max(np.abs(self.residuals_dpt))),
                "loo_errors_dpt": [float(e) for e in self.loo_errors_dpt],
                "loo_rms_dpt": self.loo_rms_dpt,
                "temperature_range_c": [min(temps), max(temps)] if temps else None,
                "suspect_points": [{k: float(v) for k, v in p.items()} for p in self.suspects],
            },
        }


def _design(values: np.ndarray, temps: np.ndarray | None, degree: int, t_ref: float | None) -> np.ndarray:
    cols = [np.ones_like(values), values]
    if degree == 2:
        cols.append(values * values)
    if temps is not None and t_ref is not None:
        cols.append(temps - t_ref)
    return np.stack(cols, axis=1)


def fit_focus_model(
    distances_m: list[float],
    peak_values: list[float],
    *,
    unit: str,
    degree: Literal[1, 2] = 1,
    temperatures_c: list[float | None] | None = None,
    min_temperature_span_c: float = 2.0,
) -> FocusFit:
    """Fit focus power (1 / distance) as a polynomial in the actuator value.

    Args:
        distances_m: known target distances (metres from the datum).
        peak_values: the actuator value focused at each.
        degree: 1 (liquid lens) or 2.
        temperatures_c: the lens temperature at each; a linear temperature term is fitted
            when they span at least ``min_temperature_span_c``.

    Raises:
        CalibrationError: too few distances for the model, or peaks that do not move
            monotonically with distance (the target was moved wrongly, or a peak is false).
    """
    d = np.asarray(distances_m, np.float64)
    v = np.asarray(peak_values, np.float64)
    temps_list = list(temperatures_c) if temperatures_c is not None else [None] * d.size
    known = [t for t in temps_list if t is not None]
    use_temp = len(known) == d.size and (max(known) - min(known)) >= min_temperature_span_c
    n_params = degree + 1 + (1 if use_temp else 0)
    need = n_params + 1  # one more than the parameters, for a residual and leave-one-out
    if d.size < need:
        raise CalibrationError(
            f"focus calibration: {d.size} distances are too few for a degree-{degree} model"
            f"{' with a temperature term' if use_temp else ''}; measure at least {need} distances spread over the range"
        )
    if np.any(~(d > 0)) or len(set(d.tolist())) != d.size:
        raise CalibrationError("focus calibration: target distances must be positive and distinct")
    dpt = 1.0 / d
    order = np.argsort(dpt)
    steps = np.diff(v[order])
    if not (np.all(steps > 0) or np.all(steps < 0)):
        bad = sorted(_out_of_order(v[order], steps), key=lambda i: -d[order][i])
        where = ", ".join(f"{d[order][i]:.3f} m ({v[order][i]:.4g} {unit})" for i in bad)
        one = len(bad) == 1
        raise NonMonotonicPeaks(
            "focus calibration: the focused actuator values do not change monotonically with distance: "
            f"the peak{'' if one else 's'} at {where} {'is' if one else 'are'} out of order; "
            f"check {'that target distance' if one else 'those target distances'} and repeat {'that step' if one else 'those steps'}",
            distances_m=[float(d[order][i]) for i in bad],
        )
    temps = np.asarray([t if t is not None else np.nan for t in temps_list], np.float64) if use_temp else None
    t_ref = float(np.mean(known)) if known else None
    A = _design(v, temps, degree, t_ref if use_temp else None)
    coef, *_ = np.linalg.lstsq(A, dpt, rcond=None)
    residuals = dpt - A @ coef
    loo: list[float] = []
    for k in range(d.size):
        keep = np.arange(d.size) != k
        ck, *_ = np.linalg.lstsq(A[keep], dpt[keep], rcond=None)
        loo.append(float(dpt[k] - A[k] @ ck))
    suspects = _loo_outliers(A, dpt, d)
    c = [float(coef[0]), float(coef[1]), float(coef[2]) if degree == 2 else 0.0]
    if c[2] != 0.0:
        turn = -c[1] / (2.0 * c[2])  # where the power's slope changes sign
        if float(v.min()) < turn < float(v.max()):
            raise CalibrationError(
                f"focus calibration: the degree-{degree} fit turns at {turn:.4g} {unit}, inside the measured span "
                f"{float(v.min()):.4g}..{float(v.max()):.4g} {unit}, so one actuator value there would focus at two distances; "
                "use degree 1 (calibration.session.degree: run again and the session refits what it measured), or, if a "
                "target near that end stood elsewhere, start a new session (move this run folder away) to measure again"
            )
    t_coef = float(coef[-1]) if use_temp else 0.0
    model = PolynomialFocusModel(
        coefficients_dpt=(c[0], c[1], c[2]), unit=unit, temperature_dpt_per_c=t_coef,
        reference_temperature_c=t_ref, valid_dpt=(float(dpt.min()), float(dpt.max())),
        valid_values=(float(v.min()), float(v.max())),
    )
    fit = FocusFit(model=model, distances_m=d.tolist(), peak_values=v.tolist(), residuals_dpt=residuals.tolist(),
                   loo_errors_dpt=loo, temperatures_c=temps_list, suspects=suspects)
    for p in suspects:
        logger.warning(
            "focus fit: the target at %.3f m is %.1f mdpt off the fit of the other points (%.1fx their typical "
            "leave-one-out error); check that distance (mistyped, or the target not where it was asked for?): "
            "if it was wrong, this calibration is too, and a new session (run the calibration again) measures every distance anew",
            p["distance_m"], 1000 * p["loo_error_dpt"], p["ratio"],
        )
    logger.info("focus fit (%d distances, degree %d%s): rms %.4f dpt, leave-one-out rms %.4f dpt",
                d.size, degree, ", temperature term" if use_temp else "", fit.rms_dpt, fit.loo_rms_dpt)
    return fit


def _loo(A: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out errors of a least-squares fit and the points' leverages (hat diagonal)."""
    H = A @ np.linalg.pinv(A)
    h = np.clip(np.diag(H), 0.0, 1.0 - 1e-12)
    return (y - H @ y) / (1.0 - h), h


def _loo_outliers(A: np.ndarray, dpt: np.ndarray, d: np.ndarray) -> list[dict[str, float]]:
    """Points whose leave-one-out error is far above the other points': the error, scaled by
    ``sqrt(1 - leverage)`` (the ends of the range are extrapolated when left out, so their
    errors run larger), exceeds :data:`LOO_OUTLIER_RATIO` times the median of the same figure
    over the other points in a fit without the point (so a bad point does not inflate the
    yardstick it is measured by), and :data:`LOO_OUTLIER_MIN_DPT`. Needs at least three points
    more than the parameters; fewer give no verdict."""
    n, p = A.shape
    if n < p + 3:
        return []
    loo, h = _loo(A, dpt)
    score = np.abs(loo) * np.sqrt(1.0 - h)
    out = []
    for k in np.flatnonzero(score > LOO_OUTLIER_MIN_DPT):
        keep = np.arange(n) != k
        loo_k, h_k = _loo(A[keep], dpt[keep])
        typical = float(np.median(np.abs(loo_k) * np.sqrt(1.0 - h_k)))
        if score[k] > LOO_OUTLIER_RATIO * typical:
            out.append({"distance_m": float(d[k]), "loo_error_dpt": float(loo[k]),
                        "ratio": float(score[k] / max(typical, 1e-12))})
    return out


def _out_of_order(values: np.ndarray, steps: np.ndarray) -> list[int]:
    """Indices (into ``values``, sorted by diopter) of the peaks that break monotonicity: those
    outside some longest strictly monotone subsequence (in the direction most steps take)."""
    n = values.size
    best: list[int] | None = None
    up_first = not (np.median(steps) < 0) if steps.size else True
    for sign in ((1.0, -1.0) if up_first else (-1.0, 1.0)):
        x = sign * values
        end = [1] * n  # longest increasing run of x ending at i
        for i in range(n):
            for j in range(i):
                if x[j] < x[i]:
                    end[i] = max(end[i], end[j] + 1)
        start = [1] * n  # ... starting at i
        for i in range(n - 1, -1, -1):
            for j in range(i + 1, n):
                if x[j] > x[i]:
                    start[i] = max(start[i], start[j] + 1)
        length = max(end)
        on = [i for i in range(n) if end[i] + start[i] - 1 == length]
        levels = [end[i] for i in on]
        sure = {i for i in on if levels.count(end[i]) == 1}  # on every longest subsequence
        bad = [i for i in range(n) if i not in sure]
        if best is None or len(bad) < len(best):
            best = bad
    return best or []
