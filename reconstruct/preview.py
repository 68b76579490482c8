"""A colour-mapped depth picture for people, with a colour bar and its range written on it."""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["depth_preview"]


def depth_preview(depth: np.ndarray, *, unit: str = "m", lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Turbo-coloured depth (near = red, far = blue; +inf at the far end), NaN in grey, with a labelled colour bar.
    With ``unit="focus index"`` the high indices are red: a stack's focus index grows toward the
    near end, so the same scene is coloured the same with or without its focus distances.

    Args:
        depth: float ``[H, W]``, NaN where unknown.
        lo, hi: colour range (default: the 1st and 99th percentiles of the finite depth).

    Returns:
        uint8 ``[H + bar, W, 3]`` RGB.
    """
    h, w = depth.shape
    finite = np.isfinite(depth)
    clipped_lo = clipped_hi = False  # whether depths lie beyond an end of the colours
    if finite.any():
        p_lo, p_hi = np.percentile(depth[finite], [1, 99])
        lo = float(p_lo) if lo is None else lo
        hi = float(p_hi) if hi is None else hi
        clipped_lo, clipped_hi = bool(depth[finite].min() < lo), bool(depth[finite].max() > hi or np.isposinf(depth).any())
    else:
        lo, hi = 0.0, 1.0
    hi = hi if hi > lo else lo + 1e-6
    # +inf is an answer (a slice focused at infinity was sharpest): the far end of the colours,
    # like anything beyond hi; only NaN (no answer) is grey
    no_depth = np.isnan(depth)
    norm = np.clip((np.where(finite, depth, np.where(np.isposinf(depth), hi, lo)) - lo) / (hi - lo), 0, 1)
    high_is_near = unit == "focus index"
    idx = (255 * (norm if high_is_near else 1.0 - norm)).astype(np.uint8)  # near = red end of turbo
    bgr = cv2.applyColorMap(idx, cv2.COLORMAP_TURBO)
    bgr[no_depth] = (128, 128, 128)
    bar_h = max(28, h // 12)
    bar = np.zeros((bar_h, w, 3), np.uint8)
    ramp = cv2.applyColorMap((255 * (1.0 - np.linspace(0, 1, w))).astype(np.uint8)[None, :], cv2.COLORMAP_TURBO)
    bar[: bar_h // 2] = ramp
    scale = max(0.35, min(1.0, w / 900))
    text_y = bar_h - 4
    font = cv2.FONT_HERSHEY_SIMPLEX

    def width(text: str) -> int:
        return cv2.getTextSize(text, font, scale, 1)[0][0]

    # the ends say what each end colour stands for; where depths lie beyond (the colours span the
    # 1st-99th percentile), "<=" / ">=" says the end colour takes them too (no invented range when
    # nothing has a depth)
    near_end, far_end = (hi, lo) if high_is_near else (lo, hi)  # the bar runs red (near, left) to blue (far, right)
    near_clipped, far_clipped = (clipped_hi, clipped_lo) if high_is_near else (clipped_lo, clipped_hi)
    labels = []
    if finite.any():
        labels = [f"{'<=' if near_clipped and not high_is_near else '>=' if near_clipped else ''}{near_end:.3g} {unit}",
                  f"{'>=' if far_clipped and not high_is_near else '<=' if far_clipped else ''}{far_end:.3g} {unit}"]
    note = f"grey: no depth ({100 * no_depth.mean():.1f}%)" if no_depth.any() else ""
    if not finite.any() and np.isposinf(depth).any():  # every answer at infinity: no range to show
        note = "all at infinity" + (f"; grey: no depth ({100 * no_depth.mean():.1f}%)" if no_depth.any() else "")
    if labels and width(labels[0]) + width(labels[1]) + 12 > w:
        labels = labels[:1] if width(labels[0]) + 6 <= w else []  # too narrow for both: the near end, or nothing
    if note and sum(width(t) for t in labels) + width(note) + 18 > w:
        note = "no depth" if not labels and width("no depth") + 6 <= w else ""
    if labels:
        cv2.putText(bar, labels[0], (3, text_y), font, scale, (255, 255, 255), 1, cv2.LINE_AA)
    if len(labels) == 2:
        cv2.putText(bar, labels[1], (w - width(labels[1]) - 3, text_y), font, scale, (255, 255, 255), 1, cv2.LINE_AA)
    if note:
        cv2.putText(bar, note, ((w - width(note)) // 2, text_y), font, scale, (200, 200, 200), 1, cv2.LINE_AA)
    return np.ascontiguousarray(np.vstack([bgr, bar])[..., ::-1])
