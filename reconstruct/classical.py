"""Classical depth from focus: focus measures, per-pixel peak search with sub-slice
refinement in diopters, confidence, edge-aware filling of texture-poor regions, and
all-in-focus fusion. Vectorised numpy + OpenCV.

Example:
    >>> from capture.stack import FocalStack                            # doctest: +SKIP
    >>> depth_dpt, conf, aif_index = depth_from_focus(grey, focus_dpt)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from capture.errors import ReconstructionError
from reconstruct.fill import edge_aware_fill, fit_planes_in_plain_regions

logger = logging.getLogger(__name__)

__all__ = ["FOCUS_MEASURES", "focus_measure", "ClassicalParams", "ClassicalOutput", "depth_from_focus", "fuse_all_in_focus"]

_LAP_X = np.array([[-1.0, 2.0, -1.0]], np.float32)
_LAP_Y = _LAP_X.T.copy()


def _modified_laplacian(img: np.ndarray) -> np.ndarray:
    """|I_xx| + |I_yy| with step 1 (Nayar's modified Laplacian)."""
    return np.abs(cv2.filter2D(img, -1, _LAP_X)) + np.abs(cv2.filter2D(img, -1, _LAP_Y))


def _laplacian(img: np.ndarray) -> np.ndarray:
    return cv2.Laplacian(img, cv2.CV_32F, ksize=1)


def _tenengrad(img: np.ndarray) -> np.ndarray:
    gx = cv2.Sobel(img, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(img, cv2.CV_32F, 0, 1, ksize=3)
    return gx * gx + gy * gy


FOCUS_MEASURES = ("modified_laplacian", "variance_of_laplacian", "tenengrad")


def focus_measure(grey: np.ndarray, *, name: str = "modified_laplacian", window_px: int = 9) -> np.ndarray:
    """Per-pixel sharpness of every slice, aggregated over a square window.

    Args:
        grey: float32 ``[N, H, W]`` (or ``[H, W]``) in [0, 1].
        name: one of :data:`FOCUS_MEASURES`.
        window_px: side of the aggregation window (odd).

    Returns:
        float32 of the same shape, >= 0, larger = sharper.
    """
    single = grey.ndim == 2
    out, _ = _focus_volumes(grey[None] if single else grey, name=name, window_px=window_px, local_px=0)
    return out[0] if single else out


def _focus_volumes(grey: np.ndarray, *, name: str, window_px: int, local_px: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The focus measure over ``window_px`` and, if ``local_px`` > 0, the same sharpness
    energy over a small ``local_px`` window, from one pass of derivative filters.
    ``[N, H, W]`` float32 each."""
    if name not in FOCUS_MEASURES:
        raise ReconstructionError(f"focus_measure: unknown measure {name!r}; valid: {', '.join(FOCUS_MEASURES)}")
    out = np.empty_like(grey, dtype=np.float32)
    local = np.empty_like(out) if local_px else None
    k = (window_px, window_px)
    for i, img in enumerate(grey):
        img = np.ascontiguousarray(img, np.float32)
        if name == "variance_of_laplacian":
            lap = _laplacian(img)
            energy = lap * lap
            mean = cv2.boxFilter(lap, -1, k)
            out[i] = np.maximum(cv2.boxFilter(energy, -1, k) - mean * mean, 0.0)
        else:
            energy = _modified_laplacian(img) if name == "modified_laplacian" else _tenengrad(img)
            out[i] = cv2.boxFilter(energy, -1, k)
        if local is not None:
            local[i] = cv2.boxFilter(energy, -1, (local_px, local_px))
    return out, local


@dataclass(frozen=True)
class ClassicalParams:
    """Knobs of the classical method.

    Attributes:
        focus_measure: one of :data:`FOCUS_MEASURES`.
        window_px: focus-measure aggregation window.
        refine: ``"parabola"`` or ``"gaussian"`` (a parabola through log-sharpness).
        confidence_floor: pixels below it are filled from confident neighbours.
        fill: fill low-confidence pixels edge-aware; if False they become NaN.
        local_check_px: window of the local-support check (0 = off): a pixel whose own
            small neighbourhood is flat in its sharpest slice only borrowed its peak from a
            nearby edge inside the aggregation window ("edge fattening"), so its confidence drops.
    """

    focus_measure: str = "modified_laplacian"
    window_px: int = 9
    refine: str = "gaussian"
    confidence_floor: float = 0.3
    fill: bool = True
    local_check_px: int = 3

    def __post_init__(self) -> None:
        # OpenCV's box filter raised a multi-line cv2.error for these, deep inside the method
        for name, low in (("window_px", 1), ("local_check_px", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ReconstructionError(f"params.{name}: expected a whole number of pixels >= {low}, got {value!r}")


@dataclass
class ClassicalOutput:
    """Depth in the stack's focus unit (diopters, or focus index), ``[H, W]`` float32;
    confidence ``[H, W]`` in [0, 1]; continuous in-focus slice position ``[H, W]``; the
    all-in-focus image, float32 ``[H, W(, C)]`` in the value scale of the fused slices."""

    focus_dpt: np.ndarray
    confidence: np.ndarray
    slice_position: np.ndarray
    all_in_focus: np.ndarray


def _at(volume: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``volume[index[y, x], y, x]`` for every pixel (``[N, H, W, ...]`` and ``[H, W]`` ints);
    a flat gather, several times faster than ``np.take_along_axis`` here."""
    n = volume.shape[0]
    per_slice = volume[0].size
    flat = index.reshape(-1).astype(np.intp) * per_slice
    if volume.ndim == 3:
        flat = flat + np.arange(per_slice, dtype=np.intp)
        return np.take(volume.reshape(n * per_slice), flat).reshape(index.shape)
    c = per_slice // index.size  # trailing channels
    flat = (flat[:, None] + np.arange(index.size, dtype=np.intp)[:, None] * c + np.arange(c, dtype=np.intp)).reshape(-1)
    return np.take(volume.reshape(-1), flat).reshape(volume.shape[1:])


def _refine_peak(
    measure: np.ndarray, focus_dpt: np.ndarray, *, method: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sub-slice peak of each pixel's sharpness curve, in diopters.

    A parabola (or, for ``"gaussian"``, a parabola through log-sharpness, exact for a
    Gaussian focus curve) is fitted through the peak slice and its neighbours; at the ends
    of the sweep the three end slices are used. The vertex is kept within one slice of the
    peak and within the swept range (a sweep cannot say how far beyond its ends a point lies).

    Args:
        measure: ``[N, H, W]`` >= 0, slices sorted by ascending diopter (N >= 2).
        focus_dpt: ``[N]`` ascending.

    Returns:
        peak_dpt ``[H, W]``, continuous slice position ``[H, W]``, peak slice index ``[H, W]``.
    """
    n = measure.shape[0]
    k = np.argmax(measure, axis=0)
    if n == 2:
        f0, f1 = measure[0], measure[1]
        t = (f1 / np.maximum(f0 + f1, 1e-12)).astype(np.float32)
        peak = (focus_dpt[0] + t * (focus_dpt[1] - focus_dpt[0])).astype(np.float32)
        return peak, t, k
    c = np.clip(k, 1, n - 2)
    y0 = _at(measure, (c - 1))
    y1 = _at(measure, c)
    y2 = _at(measure, (c + 1))
    if method == "gaussian":
        eps = np.float32(1e-12)
        y0, y1, y2 = np.log(y0 + eps), np.log(y1 + eps), np.log(y2 + eps)
    elif method != "parabola":
        raise ReconstructionError(f"refine: unknown method {method!r}; valid: parabola, gaussian")
    x0, x1, x2 = focus_dpt[c - 1], focus_dpt[c], focus_dpt[c + 1]
    # vertex of the parabola through three points with non-uniform spacing
    d01 = (y0 - y1) / (x0 - x1)
    d12 = (y1 - y2) / (x1 - x2)
    a = (d01 - d12) / (x0 - x2)
    b = d01 - a * (x0 + x1)
    xk = focus_dpt[k]
    vertex = np.where(a < 0, -b / np.where(a != 0, 2 * a, 1.0), xk)
    lo = focus_dpt[np.maximum(k - 1, 0)]
    hi = focus_dpt[np.minimum(k + 1, n - 1)]
    peak = np.clip(vertex, lo, hi).astype(np.float32)
    # continuous slice position, linear in diopters between slices
    pos = np.interp(peak, focus_dpt, np.arange(n)).astype(np.float32)
    return peak, pos, k


def _peak_confidence(measure: np.ndarray, k: np.ndarray, f_min: np.ndarray, floor: float) -> np.ndarray:
    """Confidence in [0, 1] that a pixel's sharpness curve has a real focus peak.

    Two factors: the peak must stand above the curve's floor relative to the noise level
    (no texture -> flat curve -> 0), and it must fall off within two slices on both sides
    (blurred edges of neighbouring objects spread into a window most at the *most* defocused
    slices, which gives broad ramps, not peaks).
    """
    n = measure.shape[0]
    f_max = _at(measure, k)
    contrast = (f_max - f_min) / (f_max + f_min + 2 * np.float32(floor))
    if n < 4:
        return np.clip(contrast, 0.0, 1.0).astype(np.float32)
    far_side = _at(measure, np.clip(k - 2, 0, n - 1))
    near_side = _at(measure, np.clip(k + 2, 0, n - 1))
    # at the ends only one side exists: the side beyond the sweep is not evidence
    far_side = np.where(k >= 2, far_side, near_side)
    near_side = np.where(k <= n - 3, near_side, far_side)
    drop = 1.0 - np.maximum(far_side, near_side) / np.maximum(f_max, 1e-12)
    return np.clip(contrast * np.clip(drop / 0.5, 0.0, 1.0), 0.0, 1.0).astype(np.float32)


def _local_support(measure: np.ndarray, local: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Share of the window's sharpness at the peak slice that lies in the pixel's own small
    neighbourhood, scaled to [0, 1] (1 = at least half of the window average).

    Args:
        measure: ``[N, H, W]`` window-aggregated; local: ``[N, H, W]`` over the small
            window; k: ``[H, W]`` peak slice.
    """
    at_peak_local = _at(local, k)
    at_peak = _at(measure, k)
    return np.clip(at_peak_local / np.maximum(0.5 * at_peak, 1e-12), 0.0, 1.0).astype(np.float32)


def _noise_floor(f_min: np.ndarray) -> float:
    """The measure's level where nothing is sharp: a low percentile of each pixel's minimum
    over the slices (``f_min`` ``[H, W]``)."""
    return float(np.percentile(f_min[::2, ::2], 20)) + 1e-12


def depth_from_focus(
    grey: np.ndarray,
    focus_dpt: np.ndarray,
    *,
    params: ClassicalParams = ClassicalParams(),
    slices: np.ndarray | None = None,
) -> ClassicalOutput:
    """Depth (as focus, in the stack's unit) from a sorted grey focal stack.

    Args:
        grey: float32 ``[N, H, W]`` in [0, 1], slices sorted by ascending ``focus_dpt``.
        focus_dpt: ``[N]`` ascending focus in diopters (or focus index).
        params: see :class:`ClassicalParams`.
        slices: the slices to fuse into the all-in-focus image, ``[N, H, W(, C)]`` in any
            dtype (the captured images, so colour guides the fill); ``grey`` when absent.
    """
    focus_dpt = np.asarray(focus_dpt, np.float64)
    if grey.ndim != 3 or grey.shape[0] != focus_dpt.shape[0]:
        raise ReconstructionError(f"classical: need [N, H, W] slices and N focus values, got {grey.shape} and {focus_dpt.shape}")
    if grey.shape[0] < 2:
        raise ReconstructionError("classical: need at least 2 slices")
    if np.any(np.diff(focus_dpt) <= 0):
        raise ReconstructionError("classical: focus values must be strictly increasing (sort the stack; no duplicates)")
    measure, local = _focus_volumes(grey, name=params.focus_measure, window_px=params.window_px, local_px=params.local_check_px)
    peak, pos, k = _refine_peak(measure, focus_dpt, method=params.refine)
    f_min = measure.min(axis=0)
    confidence = _peak_confidence(measure, k, f_min, _noise_floor(f_min))
    if local is not None:
        confidence *= _local_support(measure, local, k)
    if slices is not None and slices.shape[:3] != grey.shape:
        raise ReconstructionError(f"classical: slices {slices.shape} do not match the grey stack {grey.shape}")
    aif = fuse_all_in_focus(grey if slices is None else slices, pos)
    if params.fill:
        # the all-in-focus image guides the fill: depth follows its colour edges
        depth = edge_aware_fill(peak, confidence, aif, confidence_floor=params.confidence_floor)
        planes, in_plane = fit_planes_in_plain_regions(peak, confidence, aif, confidence_floor=params.confidence_floor)
        depth = np.where(in_plane, planes, depth)
        # a sweep cannot say anything beyond its ends: neither can a fill
        depth = np.clip(depth, focus_dpt[0], focus_dpt[-1]).astype(np.float32)
    else:
        depth = np.where(confidence >= params.confidence_floor, peak, np.nan).astype(np.float32)
    return ClassicalOutput(focus_dpt=depth, confidence=confidence, slice_position=pos, all_in_focus=aif)


def fuse_all_in_focus(slices: np.ndarray, slice_position: np.ndarray) -> np.ndarray:
    """All-in-focus image: each pixel from its sharpest slice, blended between the two
    slices around its continuous in-focus position.

    Args:
        slices: ``[N, H, W]`` or ``[N, H, W, C]``, any numeric dtype.
        slice_position: float ``[H, W]`` in [0, N-1].

    Returns:
        float32 ``[H, W]`` or ``[H, W, C]`` in the input's value scale.
    """
    n = slices.shape[0]
    # a non-finite position (a network that returned NaN) takes the first slice, not an invalid index
    pos = np.clip(np.nan_to_num(slice_position, nan=0.0, posinf=n - 1, neginf=0.0), 0, n - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    t = (pos - lo).astype(np.float32)
    if slices.ndim == 4:
        t = t[..., None]
    a = _at(slices, lo).astype(np.float32)
    b = _at(slices, hi).astype(np.float32)
    return a + (b - a) * t
