"""Edge-aware filling of unreliable depth from reliable neighbours (a bilateral grid).

Where a focal stack has no texture, no focus measure can say where the focus peak is; the
depth there is propagated from confident pixels of similar brightness in the all-in-focus
image (surfaces tend to share a colour), falling back to the nearest confident pixels in
space where no similar one exists.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["edge_aware_fill"]


def _blur_axis(grid: np.ndarray, axis: int, passes: int) -> np.ndarray:
    """Repeated [1, 2, 1] / 4 smoothing along one axis (edges replicated)."""
    for _ in range(passes):
        pad = [(0, 0)] * grid.ndim
        pad[axis] = (1, 1)
        p = np.pad(grid, pad, mode="edge")
        sl = [slice(None)] * grid.ndim
        sl[axis] = slice(0, -2)
        a = p[tuple(sl)]
        sl[axis] = slice(1, -1)
        b = p[tuple(sl)]
        sl[axis] = slice(2, None)
        c = p[tuple(sl)]
        grid = 0.25 * a + 0.5 * b + 0.25 * c
    return grid


def _slice_trilinear(grid: np.ndarray, gy: np.ndarray, gx: np.ndarray, gr: np.ndarray) -> np.ndarray:
    """Sample ``grid`` ``[Y, X, R]`` at float coordinates, trilinearly."""
    y0 = np.clip(np.floor(gy).astype(np.int64), 0, grid.shape[0] - 2)
    x0 = np.clip(np.floor(gx).astype(np.int64), 0, grid.shape[1] - 2)
    r0 = np.clip(np.floor(gr).astype(np.int64), 0, grid.shape[2] - 2)
    ty, tx, tr = gy - y0, gx - x0, gr - r0
    out = np.zeros(gy.shape, np.float64)
    for dy, wy in ((0, 1 - ty), (1, ty)):
        for dx, wx in ((0, 1 - tx), (1, tx)):
            for dr, wr in ((0, 1 - tr), (1, tr)):
                out += grid[y0 + dy, x0 + dx, r0 + dr] * (wy * wx * wr)
    return out


def _guide_features(guide: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Normalised brightness ``[H, W]`` in [0, 1] and, for colour guides, a chroma
    coordinate ``[H, W]`` in [0, 1] (blue versus red share), else None."""
    grey = guide.mean(axis=2) if guide.ndim == 3 else guide
    lo, hi = np.percentile(grey, [1, 99])
    luma = np.clip((grey - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    if guide.ndim != 3 or guide.shape[2] < 3:
        return luma, None
    rgb = guide[..., :3].astype(np.float64)
    total = rgb.sum(axis=2) + 1e-6
    chroma = (rgb[..., 2] - rgb[..., 0]) / total  # -1 (red) .. +1 (blue)
    lo, hi = np.percentile(chroma, [1, 99])
    return luma, np.clip((chroma - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def edge_aware_fill(
    value: np.ndarray,
    confidence: np.ndarray,
    guide: np.ndarray,
    *,
    confidence_floor: float,
    sigma_spatial_px: float = 12.0,
    sigma_range: float = 0.06,
    sigma_chroma: float = 0.12,
) -> np.ndarray:
    """Replace values whose confidence is below ``confidence_floor`` by a confidence-weighted
    average of reliable values nearby in space *and* in guide brightness (and chroma).

    Args:
        value: float32 ``[H, W]`` (depth in any unit).
        confidence: float32 ``[H, W]`` in [0, 1].
        guide: float ``[H, W]`` or ``[H, W, 3]`` (the all-in-focus image) whose edges are respected.
        confidence_floor: reliable pixels have at least this confidence.
        sigma_spatial_px: grid cell size in pixels.
        sigma_range: grid cell size in normalised brightness.
        sigma_chroma: grid cell size in normalised chroma (colour guides only).

    Returns:
        float32 ``[H, W]``: reliable pixels unchanged, the rest filled; NaN only where no
        reliable pixel exists at all.
    """
    h, w = value.shape
    reliable = (confidence >= confidence_floor) & np.isfinite(value)
    if reliable.all():
        return value.astype(np.float32)
    if not reliable.any():
        logger.warning("no pixel reached confidence %.2f: depth left empty", confidence_floor)
        return np.full((h, w), np.nan, np.float32)
    weight = np.where(reliable, confidence, 0.0).astype(np.float64)
    val = np.where(reliable, value, 0.0).astype(np.float64)
    luma, chroma = _guide_features(guide)

    s = float(sigma_spatial_px)
    ny, nx, nr = int(np.ceil(h / s)) + 2, int(np.ceil(w / s)) + 2, int(np.ceil(1.0 / sigma_range)) + 2
    nc = 1 if chroma is None else int(np.ceil(1.0 / sigma_chroma)) + 1
    yy, xx = np.mgrid[0:h, 0:w]
    gy, gx, gr = yy / s + 0.5, xx / s + 0.5, luma / sigma_range + 0.5
    gc = np.zeros((h, w), np.int64) if chroma is None else np.rint(chroma / sigma_chroma).astype(np.int64)
    nb = nr * nc  # brightness x chroma bins, flattened
    gb = np.rint(gr).astype(np.int64) * nc + gc
    idx = (np.rint(gy).astype(np.int64) * nx + np.rint(gx).astype(np.int64)) * nb + gb
    size = ny * nx * nb
    num = np.bincount(idx.ravel(), weights=(weight * val).ravel(), minlength=size).reshape(ny, nx, nb)
    den = np.bincount(idx.ravel(), weights=weight.ravel(), minlength=size).reshape(ny, nx, nb)
    num, den = _blur_axis(_blur_axis(num, 0, 1), 1, 1), _blur_axis(_blur_axis(den, 0, 1), 1, 1)
    # fill each colour bin over space from its nearest data (push-pull), so a plain surface
    # takes the depth of confident pixels of its own colour, however far away they are
    values = np.zeros((ny, nx, nb), np.float64)
    has_data = den.sum(axis=(0, 1)) > 0
    full = 2.0 * float(np.percentile(den[den > 0], 50))
    for b in np.flatnonzero(has_data):
        values[:, :, b] = _push_pull(num[:, :, b], den[:, :, b], full)
    data_r, data_c = np.divmod(np.flatnonzero(has_data), nc)
    for b in np.flatnonzero(~has_data):
        r, c = divmod(int(b), nc)
        nearest = np.argmin((data_r - r) ** 2 + (0.5 * (data_c - c)) ** 2)
        values[:, :, b] = values[:, :, data_r[nearest] * nc + data_c[nearest]]
    values = values.reshape(ny, nx, nr, nc)
    values = _blur_axis(values, 2, 1)
    # trilinear in space and brightness, nearest in chroma
    filled = np.zeros((h, w), np.float64)
    for c in range(nc):
        sel = gc == c
        if sel.any():
            filled[sel] = _slice_trilinear(values[:, :, :, c], gy[sel], gx[sel], gr[sel])
    return np.where(reliable, value, filled).astype(np.float32)


def _push_pull(num: np.ndarray, den: np.ndarray, full_weight: float) -> np.ndarray:
    """Normalised-convolution hole filling over a pyramid: every cell gets the weighted mean
    of the nearest data, coarser levels filling where finer ones have none.

    Args:
        num, den: ``[Y, X]`` weighted sums and weights (den >= 0, some > 0).
        full_weight: a weight at which a cell's own data is fully trusted.
    """
    levels = [(num.astype(np.float32), den.astype(np.float32))]
    while max(levels[-1][0].shape) > 1:
        n, d = levels[-1]
        levels.append((cv2.resize(n, (max(1, n.shape[1] // 2), max(1, n.shape[0] // 2)), interpolation=cv2.INTER_AREA) * 4,
                       cv2.resize(d, (max(1, d.shape[1] // 2), max(1, d.shape[0] // 2)), interpolation=cv2.INTER_AREA) * 4))
    n_up, d_up = levels[-1]
    total = float(d_up.sum())
    v_up = n_up / np.maximum(d_up, 1e-12) if total > 0 else np.zeros_like(n_up)
    for n, d in reversed(levels[:-1]):
        v_up = cv2.resize(v_up, (n.shape[1], n.shape[0]), interpolation=cv2.INTER_LINEAR)
        a = np.clip(d / full_weight, 0.0, 1.0)
        v_here = n / np.maximum(d, 1e-12)
        v_up = a * v_here + (1 - a) * v_up
    return v_up.astype(np.float64)
