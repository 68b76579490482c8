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


def _luma(guide: np.ndarray) -> np.ndarray:
    """Brightness of a grey ``[H, W]`` or colour ``[H, W, C]`` guide, scaled to [0, 1] by its
    1st and 99th percentiles. float32 ``[H, W]``."""
    grey = guide[..., :3].mean(axis=2, dtype=np.float32) if guide.ndim == 3 else guide.astype(np.float32)
    lo, hi = np.percentile(grey[::2, ::2], [1, 99])  # a quarter of the pixels is plenty
    return np.clip((grey - np.float32(lo)) / np.float32(max(hi - lo, 1e-6)), 0.0, 1.0)


def _guide_features(guide: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Normalised brightness ``[H, W]`` in [0, 1] and, for colour guides, a chroma
    coordinate ``[H, W]`` in [0, 1] (blue versus red share), else None."""
    luma = _luma(guide)
    if guide.ndim != 3 or guide.shape[2] < 3:
        return luma, None
    rgb = guide[..., :3].astype(np.float32)
    total = rgb.sum(axis=2) + np.float32(1e-6)
    chroma = (rgb[..., 2] - rgb[..., 0]) / total  # -1 (red) .. +1 (blue)
    lo, hi = np.percentile(chroma[::2, ::2], [1, 99])
    return luma, np.clip((chroma - np.float32(lo)) / np.float32(max(hi - lo, 1e-6)), 0.0, 1.0)


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
    luma, chroma = _guide_features(guide)
    s = float(sigma_spatial_px)
    ny, nx, nr = int(np.ceil(h / s)) + 2, int(np.ceil(w / s)) + 2, int(np.ceil(1.0 / sigma_range)) + 2
    nc = 1 if chroma is None else int(np.ceil(1.0 / sigma_chroma)) + 1
    nb = nr * nc  # brightness x chroma bins, flattened (bin = r * nc + c)
    if nb > 512:
        raise ValueError(f"fill: {nb} colour bins exceed OpenCV's 512 channels; raise sigma_range/sigma_chroma")

    def coords(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        ys, xs = np.nonzero(mask)
        gy = ys.astype(np.float32) / s + 0.5
        gx = xs.astype(np.float32) / s + 0.5
        gr = luma[mask].astype(np.float32) / sigma_range + 0.5
        gc = np.zeros(ys.size, np.int64) if chroma is None else np.rint(chroma[mask] / sigma_chroma).astype(np.int64)
        return gy, gx, gr, gc

    # splat the reliable pixels (nearest cell), weighted by confidence
    gy, gx, gr, gc = coords(reliable)
    weight = confidence[reliable].astype(np.float64)
    idx = (np.rint(gy).astype(np.int64) * nx + np.rint(gx).astype(np.int64)) * nb + np.rint(gr).astype(np.int64) * nc + gc
    size = ny * nx * nb
    num = np.bincount(idx, weights=weight * value[reliable], minlength=size).reshape(ny, nx, nb).astype(np.float32)
    den = np.bincount(idx, weights=weight, minlength=size).reshape(ny, nx, nb).astype(np.float32)
    num, den = _blur_axis(_blur_axis(num, 0, 1), 1, 1), _blur_axis(_blur_axis(den, 0, 1), 1, 1)
    # fill every colour bin over space from its nearest data (push-pull, all bins at once),
    # so a plain surface takes the depth of confident pixels of its own colour, however far
    has_data = den.sum(axis=(0, 1)) > 0
    full = 2.0 * float(np.median(den[den > 0]))
    values = _push_pull(num, den, full)
    data_r, data_c = np.divmod(np.flatnonzero(has_data), nc)
    for b in np.flatnonzero(~has_data):  # a colour nobody reliable has: borrow the nearest colour's
        r, c = divmod(int(b), nc)
        nearest = int(np.argmin((data_r - r) ** 2 + (0.5 * (data_c - c)) ** 2))
        values[:, :, b] = values[:, :, data_r[nearest] * nc + data_c[nearest]]
    values = _blur_axis(values.reshape(ny, nx, nr, nc), 2, 1)
    # slice at the unreliable pixels: trilinear in space and brightness, nearest in chroma
    todo = ~reliable
    gy, gx, gr, gc = coords(todo)
    out = value.astype(np.float32, copy=True)
    out[todo] = _slice(values, gy, gx, gr, gc)
    return out


def _slice(grid: np.ndarray, gy: np.ndarray, gx: np.ndarray, gr: np.ndarray, gc: np.ndarray) -> np.ndarray:
    """Sample ``grid`` ``[Y, X, R, C]`` trilinearly in (y, x, r) at chroma bin ``gc``."""
    ny, nx, nr, nc = grid.shape
    flat = grid.reshape(-1)
    y0 = np.clip(np.floor(gy).astype(np.int64), 0, ny - 2)
    x0 = np.clip(np.floor(gx).astype(np.int64), 0, nx - 2)
    r0 = np.clip(np.floor(gr).astype(np.int64), 0, nr - 2)
    ty, tx, tr = gy - y0, gx - x0, gr - r0
    out = np.zeros(gy.shape, np.float32)
    for dy, wy in ((0, 1 - ty), (1, ty)):
        for dx, wx in ((0, 1 - tx), (1, tx)):
            base = ((y0 + dy) * nx + (x0 + dx)) * nr
            wyx = wy * wx
            for dr, wr in ((0, 1 - tr), (1, tr)):
                out += flat[(base + r0 + dr) * nc + gc] * (wyx * wr)
    return out


def _push_pull(num: np.ndarray, den: np.ndarray, full_weight: float) -> np.ndarray:
    """Normalised-convolution hole filling over a pyramid, for every channel at once: each
    cell gets the weighted mean of the nearest data, coarser levels filling where finer ones
    have none.

    Args:
        num, den: ``[Y, X, B]`` float32 weighted sums and weights (den >= 0).
        full_weight: a weight at which a cell's own data is fully trusted.

    Returns:
        float32 ``[Y, X, B]`` (channels without any data come out 0).
    """

    levels = [(num, den)]
    while max(levels[-1][0].shape[:2]) > 1:
        n, d = levels[-1]
        levels.append((_half(n), _half(d)))
    n_up, d_up = levels[-1]
    v_up = n_up / np.maximum(d_up, 1e-12)
    for n, d in reversed(levels[:-1]):
        v_up = _double(v_up, n.shape[:2])
        a = np.clip(d / np.float32(full_weight), 0.0, 1.0)
        v_up = a * (n / np.maximum(d, 1e-12)) + (1 - a) * v_up
    return v_up.astype(np.float32)


def _half(a: np.ndarray) -> np.ndarray:
    """2x2 block sums of ``[Y, X, B]`` (odd sizes padded with zeros: sums of weights stay exact)."""
    y, x = a.shape[:2]
    a = np.pad(a, ((0, y % 2), (0, x % 2), (0, 0)))
    return a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]


def _double(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Upsample ``[Y, X, B]`` by 2 to ``shape`` (nearest, then a [1, 2, 1] smoothing)."""
    up = np.repeat(np.repeat(a, 2, axis=0), 2, axis=1)[: shape[0], : shape[1]]
    return _blur_axis(_blur_axis(up, 0, 1), 1, 1)


def fit_planes_in_plain_regions(
    value: np.ndarray,
    confidence: np.ndarray,
    guide: np.ndarray,
    *,
    confidence_floor: float,
    min_area_px: int = 400,
    ring_px: int = 6,
    edge_threshold: float = 0.02,
) -> tuple[np.ndarray, np.ndarray]:
    """Large plain regions (no reliable pixel, no edge in the guide) take a plane, in the
    value's unit, fitted robustly to the reliable pixels around them.

    A plain poster on a wall, the face of a box: no focus measure can see inside them, but
    the reliable pixels along their rim say where the surface is. Inverse depth (diopters)
    of a plane is affine in image coordinates, so the fit is exact for planar surfaces.

    Args:
        value: float32 ``[H, W]`` focus in diopters (or any unit affine over planes).
        confidence: ``[H, W]`` in [0, 1].
        guide: ``[H, W]`` or ``[H, W, C]`` all-in-focus image; its edges bound the regions.

    Returns:
        the fitted values ``[H, W]`` (NaN outside fitted regions) and a bool mask of them.
    """
    h, w = value.shape
    grey = _luma(guide)
    grad = np.abs(cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3)) + np.abs(cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3))
    reliable = (confidence >= confidence_floor) & np.isfinite(value)
    plain = (~reliable) & (cv2.blur(grad, (3, 3)) < edge_threshold * 8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(plain.astype(np.uint8), connectivity=4)
    fitted = np.full((h, w), np.nan, np.float32)
    mask = np.zeros((h, w), bool)
    ring_kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * ring_px + 1, 2 * ring_px + 1))
    for label in range(1, n):
        x, y, bw, bh, area = stats[label]
        if area < min_area_px:
            continue
        y0, y1 = max(0, y - ring_px), min(h, y + bh + ring_px)
        x0, x1 = max(0, x - ring_px), min(w, x + bw + ring_px)
        region = labels[y0:y1, x0:x1] == label
        ring = (cv2.dilate(region.astype(np.uint8), ring_kernel) > 0) & reliable[y0:y1, x0:x1]
        ys, xs = np.nonzero(ring)
        if ys.size < 30:
            continue
        v = value[y0:y1, x0:x1][ring].astype(np.float64)
        wts = confidence[y0:y1, x0:x1][ring].astype(np.float64)
        design = np.stack([xs.astype(np.float64), ys.astype(np.float64), np.ones(ys.size)], axis=1)
        coef = _robust_plane(design, v, wts)
        if coef is None:
            continue
        ry, rx = np.nonzero(region)
        fitted[ry + y0, rx + x0] = (coef[0] * rx + coef[1] * ry + coef[2]).astype(np.float32)
        mask[ry + y0, rx + x0] = True
    return fitted, mask


def _robust_plane(design: np.ndarray, v: np.ndarray, w: np.ndarray, *, iterations: int = 5) -> np.ndarray | None:
    """Weighted least squares with Tukey reweighting; None if most of the rim disagrees."""
    weights = w.copy()
    coef = None
    for _ in range(iterations):
        sw = np.sqrt(weights)
        coef, *_ = np.linalg.lstsq(design * sw[:, None], v * sw, rcond=None)
        resid = v - design @ coef
        scale = 1.4826 * np.median(np.abs(resid)) + 1e-6
        u = resid / (4.685 * scale)
        weights = w * np.where(np.abs(u) < 1, (1 - u * u) ** 2, 0.0)
        if weights.sum() <= 0:
            return None
    inliers = float((weights > 0).mean())
    return coef if inliers >= 0.5 else None
