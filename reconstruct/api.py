"""One stack to depth: the public entry point shared by ``python -m reconstruct`` and the rig.

>>> from capture.stack import FocalStack                                   # doctest: +SKIP
>>> result = reconstruct_stack(FocalStack.read("runs/.../stacks/000000"))  # doctest: +SKIP
>>> write_result(result, "out")                                           # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time

import numpy as np

from capture.errors import ReconstructionError
from capture.stack import FocalStack
from reconstruct.classical import FOCUS_MEASURES, ClassicalParams, depth_from_focus
from reconstruct.result import DepthResult

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "ALIGN_MODES", "reconstruct_stack"]

#: method name -> available now? (False: planned, refused with a clear message)
METHODS = {"classical": True, "dualfocus": False}
ALIGN_MODES = ("apply", "estimate", "none")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ReconstructionError(f"method: unknown method {method!r}; valid: {', '.join(METHODS)}")
    if not METHODS[method]:
        raise ReconstructionError(
            f"method: {method!r} is not available in this version (the DualFocus network has not shipped yet); "
            "use --method classical"
        )


def reconstruct_stack(
    stack: FocalStack,
    *,
    method: str = "classical",
    focus_measure: str = "modified_laplacian",
    align: str = "apply",
    params: ClassicalParams | None = None,
) -> DepthResult:
    """Depth, confidence and all-in-focus image of a focal stack (any slice order).

    Args:
        stack: the stack as read or captured.
        method: ``classical`` (``dualfocus`` once the network ships).
        focus_measure: classical focus measure (see ``reconstruct.classical.FOCUS_MEASURES``).
        align: ``apply`` the stack's stored per-slice ``alignment``, ``estimate`` it (needs the
            calibration module), or ``none``.
    """
    _check_method(method)
    if align not in ALIGN_MODES:
        raise ReconstructionError(f"align: unknown mode {align!r}; valid: {', '.join(ALIGN_MODES)}")
    if focus_measure not in FOCUS_MEASURES:
        raise ReconstructionError(f"focus_measure: unknown measure {focus_measure!r}; valid: {', '.join(FOCUS_MEASURES)}")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    ordered = stack.sorted_by_focus()
    focus = ordered.focus_dpt
    if np.any(np.diff(focus) <= 0):
        raise ReconstructionError("stack: two slices share the same focus; each slice needs its own focus distance or index")
    aligned = False
    if align == "apply" and ordered.has_alignment:
        ordered = ordered.aligned()
        aligned = True
    elif align == "estimate":
        raise ReconstructionError("align: 'estimate' needs the slice-registration module, not in this version; use apply or none")
    seconds["align"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    grey = ordered.to_grey_float()
    p = params or ClassicalParams(focus_measure=focus_measure)
    out = depth_from_focus(grey, focus, params=p, slices=ordered.images)
    aif = out.all_in_focus
    if np.issubdtype(ordered.images.dtype, np.integer):
        aif = np.clip(np.rint(aif), 0, np.iinfo(ordered.images.dtype).max).astype(ordered.images.dtype)
    if stack.has_distances:
        with np.errstate(divide="ignore", invalid="ignore"):
            depth = np.where(out.focus_dpt > 0, 1.0 / out.focus_dpt, np.inf).astype(np.float32)
        depth[~np.isfinite(out.focus_dpt)] = np.nan
        unit = "metre"
    else:
        depth = out.focus_dpt.astype(np.float32)
        unit = "focus_index"
    seconds["infer"] = time.perf_counter() - t0
    return DepthResult(
        depth=depth,
        confidence=out.confidence,
        all_in_focus=aif,
        depth_unit=unit,
        method=method,
        backend="numpy",
        device="cpu",
        slices=stack.n_slices,
        aligned=aligned,
        seconds=seconds,
        extra={"focus_measure": p.focus_measure},
    )
