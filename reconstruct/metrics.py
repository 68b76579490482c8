"""Depth accuracy against a known truth. NaN predictions count as errors (as a prediction
of 0, i.e. a relative error of 1), never as missing data."""

from __future__ import annotations

import numpy as np

__all__ = ["depth_metrics"]


def depth_metrics(pred_m: np.ndarray, truth_m: np.ndarray, *, truth_valid: np.ndarray | None = None) -> dict[str, float]:
    """AbsRel, RMSE (m), delta < 1.25 and the share of pixels with a depth.

    Args:
        pred_m: ``[H, W]`` predicted depth, NaN where no depth is given.
        truth_m: ``[H, W]`` true depth (> 0).
        truth_valid: ``[H, W]`` bool, pixels with a known truth (default: all finite > 0).

    Returns:
        ``abs_rel``, ``rmse_m``, ``delta_1_25``, ``valid_fraction`` (of scored pixels), ``pixels``.
    """
    if pred_m.shape != truth_m.shape:
        raise ValueError(f"prediction {pred_m.shape} and truth {truth_m.shape} differ in shape")
    valid = np.isfinite(truth_m) & (truth_m > 0)
    if truth_valid is not None:
        valid &= truth_valid
    t = truth_m[valid].astype(np.float64)
    p = pred_m[valid].astype(np.float64)
    has = np.isfinite(p)
    p = np.where(has, p, 0.0)  # a missing depth is scored as 0 m: relative error 1
    rel = np.abs(p - t) / t
    ratio = np.where(has, np.maximum(p / t, t / np.maximum(p, 1e-12)), np.inf)
    return {
        "abs_rel": float(rel.mean()),
        "rmse_m": float(np.sqrt(np.mean((p - t) ** 2))),
        "delta_1_25": float(np.mean(ratio < 1.25)),
        "valid_fraction": float(has.mean()),
        "pixels": int(t.size),
    }
