"""Registration of focal-stack slices: focus breathing and hand-held motion.

Refocusing changes the image scale unless the optics are telecentric (HARDWARE_NOTES §4.2),
and a hand-held stack also moves between slices. Per-pixel depth from focus compares the
same scene point across slices, so every slice is first mapped onto one reference slice.

This module estimates those maps with OpenCV's ECC (enhanced correlation coefficient,
``cv2.findTransformECC``), coarse to fine over an image pyramid, on lightly smoothed grey
images (ECC is invariant to gain and offset, and the smoothing makes a sharp and a slightly
blurred slice look alike). Constrained models are fitted as a full affine at every level
and projected onto the model; each pair is registered both ways and the two estimates are
averaged, which cancels ECC's direction-dependent bias. Slices are registered to their
neighbour in focus (neighbours have similar blur) and the pairwise maps are chained to the
reference slice.

Conventions
-----------
* An *affine* is a float64 ``[2, 3]`` array ``[[a, b, tx], [c, d, ty]]`` in the
  ``cv2.warpAffine`` convention (no ``WARP_INVERSE_MAP``): it maps a pixel position of the
  *moving* image to its position in the *reference* image, so
  ``cv2.warpAffine(moving, affine, (W, H))`` shows the moving image in the reference frame.
  This is the per-slice ``alignment`` of FOCAL_STACK_FORMAT.md.
* Pixel coordinates: x to the right, y down, the centre of the top-left pixel at ``(0, 0)``;
  the image centre is ``((W - 1) / 2, (H - 1) / 2)``, as in :func:`capture.optics.apply_breathing`.
* Motion models: ``translation``; ``scale_shift`` (isotropic scale about the image centre plus
  a shift: the focus-breathing model); ``similarity`` (plus rotation); ``affine``.
* Breathing *magnification* (:meth:`BreathingModel.scale_at`) is the size of the image at a
  focus setting relative to the reference setting, like :func:`capture.optics.breathing_scale`
  ratios; the alignment affine of that setting scales by its inverse.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from capture.errors import CalibrationError
from capture.stack import FocalStack

logger = logging.getLogger(__name__)

__all__ = [
    "MOTIONS",
    "BreathingModel",
    "Registration",
    "estimate_pair",
    "estimate_stack_alignment",
    "fit_breathing",
    "misregistration",
    "scale_shift_params",
]

#: Motion models, fewest parameters first.
MOTIONS = ("translation", "scale_shift", "similarity", "affine")
#: A breathing table's default overshoot allowance beyond its range (fraction of its span); a
#: calibration session sets the focus model's tolerance instead (calibration.session).
DEFAULT_TOLERANCE_FRAC = 0.005
_BT601 = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Small affine helpers
# --------------------------------------------------------------------------------------------


def _to3(affine: np.ndarray) -> np.ndarray:
    """``[2, 3]`` -> ``[3, 3]`` homogeneous."""
    out = np.eye(3, dtype=np.float64)
    out[:2] = affine
    return out


def _compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The affine ``x -> outer(inner(x))``, both ``[2, 3]``."""
    return (_to3(outer) @ _to3(inner))[:2]


def _invert(affine: np.ndarray) -> np.ndarray:
    """Inverse of a ``[2, 3]`` affine (CalibrationError when singular)."""
    det = float(np.linalg.det(affine[:, :2]))
    if not math.isfinite(det) or abs(det) < 1e-12:
        raise CalibrationError(f"alignment: singular affine {affine.tolist()} (the registration failed)")
    return np.linalg.inv(_to3(affine))[:2]


def _centre(image_hw: tuple[int, int]) -> np.ndarray:
    h, w = image_hw
    return np.array([(w - 1) / 2.0, (h - 1) / 2.0], dtype=np.float64)


def _spread(image_hw: tuple[int, int]) -> tuple[float, float]:
    """Variance of the pixel x and y coordinates over the image (uniform grid)."""
    h, w = image_hw
    return (w * w - 1) / 12.0 + 1e-9, (h * h - 1) / 12.0 + 1e-9


def _project(affine: np.ndarray, motion: str, image_hw: tuple[int, int]) -> np.ndarray:
    """The ``motion``-model affine closest to ``affine`` in the mean squared displacement over
    the image grid (``[2, 3]`` in, ``[2, 3]`` out).

    The constrained model keeps the displacement of the image centre; its linear part is the
    least-squares fit to the affine's over the pixel coordinates (weights: their spreads).
    """
    if motion == "affine":
        return affine.copy()
    c = _centre(image_hw)
    vx, vy = _spread(image_hw)
    (a, b), (cc, d) = affine[:, :2]
    if motion == "translation":
        lin = np.eye(2)
    elif motion == "scale_shift":
        s = (a * vx + d * vy) / (vx + vy)
        lin = np.array([[s, 0.0], [0.0, s]])
    elif motion == "similarity":
        alpha = (a * vx + d * vy) / (vx + vy)
        beta = (cc * vx - b * vy) / (vx + vy)
        lin = np.array([[alpha, -beta], [beta, alpha]])
    else:  # pragma: no cover - checked by callers
        raise CalibrationError(f"alignment: unknown motion {motion!r}")
    moved_centre = affine[:, :2] @ c + affine[:, 2]
    out = np.empty((2, 3), dtype=np.float64)
    out[:, :2] = lin
    out[:, 2] = moved_centre - lin @ c
    return out


def _rescale(affine: np.ndarray, factor: float) -> np.ndarray:
    """An affine in pyramid-level coordinates ``x_l = x / factor`` -> full-resolution ones
    (``cv2.pyrDown`` keeps pixel ``k`` of a level at pixel ``2k`` of the level below)."""
    out = affine.copy()
    out[:, 2] *= factor
    return out


def scale_shift_params(affine: np.ndarray, image_hw: tuple[int, int]) -> tuple[float, float, float]:
    """``(scale, dx_px, dy_px)`` of an affine read as a scale about the image centre followed by
    a shift: ``x' = centre + scale * (x - centre) + (dx, dy)``.

    ``scale`` is ``sqrt(|det|)`` of the linear part (for a non-isotropic affine, the scale
    of equal area); the shift is the displacement of the image centre, in pixels.

    Args:
        affine: ``[2, 3]``.
        image_hw: ``(H, W)`` of the images the affine applies to.
    """
    affine = np.asarray(affine, dtype=np.float64)
    c = _centre(image_hw)
    scale = math.sqrt(abs(float(np.linalg.det(affine[:, :2]))))
    shift = affine[:, :2] @ c + affine[:, 2] - c
    return scale, float(shift[0]), float(shift[1])


# --------------------------------------------------------------------------------------------
# Image preparation
# --------------------------------------------------------------------------------------------


def _grey(image: np.ndarray) -> np.ndarray:
    """float32 ``[H, W]`` grey of ``[H, W]`` / ``[H, W, C]`` in any numeric dtype (integers
    scaled to [0, 1] by their dtype maximum; BT.601 luma of RGB, alpha ignored)."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (3, 4))):
        raise CalibrationError(f"alignment: images must be [H, W] or [H, W, 3|4], got {list(img.shape)}")
    out = img.astype(np.float32)
    if np.issubdtype(img.dtype, np.integer):
        out *= np.float32(1.0 / np.iinfo(img.dtype).max)
    if out.ndim == 3:
        out = out[..., :3] @ _BT601
    return np.ascontiguousarray(out, dtype=np.float32)


def _pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
    """``[finest, ..., coarsest]``: ``levels`` images, each a ``cv2.pyrDown`` of the previous."""
    out = [image]
    for _ in range(levels - 1):
        out.append(cv2.pyrDown(out[-1]))
    return out


def _n_levels(image_hw: tuple[int, int], *, max_side_px: int | None, coarsest_min_px: int) -> tuple[int, int]:
    """``(first, total)``: the finest pyramid level used (so its long side is at most
    ``max_side_px``) and the number of levels to build (coarsest short side >= ``coarsest_min_px``)."""
    h, w = image_hw
    first = 0
    if max_side_px is not None:
        while max(h, w) / 2**first > max_side_px:
            first += 1
    total = first + 1
    while min(h, w) / 2**total >= coarsest_min_px:
        total += 1
    return first, total


def _border_mask(shape: tuple[int, int], border_frac: float) -> np.ndarray:
    """uint8 ``[H, W]``: 255 inside, 0 in a border of ``border_frac`` of each side (>= 1 px)."""
    h, w = shape
    mask = np.zeros((h, w), np.uint8)
    by = max(1, round(border_frac * h))
    bx = max(1, round(border_frac * w))
    if h > 2 * by and w > 2 * bx:
        mask[by : h - by, bx : w - bx] = 255
    else:
        mask[:] = 255
    return mask


def _smooth(image: np.ndarray, sigma_px: float) -> np.ndarray:
    if sigma_px <= 0:
        return image
    return cv2.GaussianBlur(image, (0, 0), sigma_px, borderType=cv2.BORDER_REFLECT)


# --------------------------------------------------------------------------------------------
# One pair
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Registration:
    """The result of registering one image onto another.

    Attributes:
        affine: float64 ``[2, 3]``, maps moving-image pixels onto the reference image
            (``cv2.warpAffine`` convention), full-resolution pixels.
        correlation: ECC correlation coefficient at the finest level used, in [-1, 1]
            (1 = identical up to gain and offset after smoothing); the lower of the two
            directions when the estimate is symmetric.
        converged: True when every pyramid level converged and ``correlation`` reached the
            required minimum; False means the affine must not be used.
        motion: the motion model (one of :data:`MOTIONS`).
        message: why it failed (empty when converged).
    """

    affine: np.ndarray
    correlation: float
    converged: bool
    motion: str
    message: str = ""

    def scale_shift(self, image_hw: tuple[int, int]) -> tuple[float, float, float]:
        """``(scale, dx_px, dy_px)`` about the centre of an ``(H, W)`` image; see :func:`scale_shift_params`."""
        return scale_shift_params(self.affine, image_hw)


def _check_motion(motion: str) -> None:
    if motion not in MOTIONS:
        raise CalibrationError(f"alignment: unknown motion model {motion!r}; valid: {', '.join(MOTIONS)}")


def estimate_pair(
    moving: np.ndarray,
    reference: np.ndarray,
    *,
    motion: str = "scale_shift",
    init: np.ndarray | None = None,
    smooth_sigma_px: float = 1.0,
    max_side_px: int | None = 1024,
    coarsest_min_px: int = 40,
    border_frac: float = 0.05,
    mask: np.ndarray | None = None,
    iterations: int = 80,
    eps: float = 1e-7,
    min_correlation: float = 0.3,
    min_contrast: float = 1e-3,
    symmetric: bool = True,
    strict: bool = True,
) -> Registration:
    """Register ``moving`` onto ``reference`` with ECC, coarse to fine.

    Each pyramid level is smoothed with a Gaussian of ``smooth_sigma_px`` (pixels of that
    level) before ECC; every level's estimate is projected onto ``motion`` and seeds the
    next finer level. ``scale_shift`` and ``similarity`` are fitted as an affine and then
    projected (:func:`_project`), which keeps the centre's displacement exact.

    Args:
        moving: float32 ``[H, W]`` (any numeric dtype or ``[H, W, 3|4]`` is converted to grey).
        reference: same shape as ``moving``.
        motion: one of :data:`MOTIONS`.
        init: optional ``[2, 3]`` starting affine (moving -> reference); identity when absent.
        smooth_sigma_px: Gaussian smoothing at every level, pixels (makes defocus matter less).
        max_side_px: the finest level used has a long side of at most this (``None``: full
            resolution); the result is always in full-resolution pixels.
        coarsest_min_px: the coarsest level's short side is at least this many pixels.
        border_frac: fraction of each side left out of the fit (reflected or missing content
            near the borders after scaling).
        mask: optional bool/uint8 ``[H, W]``, nonzero where ``moving`` is valid.
        iterations, eps: ECC termination per level (max iterations, correlation increment).
        min_correlation: below this final correlation the registration counts as failed.
        min_contrast: the smoothed images need at least this standard deviation (in [0, 1]
            units of the grey image) inside the mask; below it there is no texture to register.
        symmetric: also register ``reference`` onto ``moving`` (started from the inverse of
            the first result) and average the two; cancels most of ECC's direction-dependent
            bias (a few 1e-4 in scale) at twice the cost.
        strict: raise :class:`CalibrationError` on failure (default) instead of returning
            ``converged=False``.

    Returns:
        :class:`Registration` with the full-resolution ``[2, 3]`` affine moving -> reference.

    Raises:
        CalibrationError: mismatched shapes, unknown motion, and (when ``strict``) no texture,
            an ECC failure or a correlation below ``min_correlation``.
    """
    _check_motion(motion)
    mov = _grey(moving)
    ref = _grey(reference)
    if mov.shape != ref.shape:
        raise CalibrationError(f"alignment: image sizes differ: moving {mov.shape}, reference {ref.shape}")
    hw = (int(ref.shape[0]), int(ref.shape[1]))
    if min(hw) < 16:
        raise CalibrationError(f"alignment: images of {hw[0]}x{hw[1]} px are too small to register")
    first, total = _n_levels(hw, max_side_px=max_side_px, coarsest_min_px=coarsest_min_px)
    mov_pyr = _pyramid(mov, total)
    ref_pyr = _pyramid(ref, total)
    base_mask = None
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != hw:
            raise CalibrationError(f"alignment: mask {m.shape} does not match the images {hw}")
        base_mask = (m > 0).astype(np.uint8) * 255

    def fail(message: str, affine: np.ndarray, rho: float) -> Registration:
        if strict:
            raise CalibrationError(f"alignment: {message}")
        logger.warning("alignment failed: %s", message)
        return Registration(affine=affine, correlation=rho, converged=False, motion=motion, message=message)

    # texture check on the finest level used
    finest_mov = _smooth(mov_pyr[first], smooth_sigma_px)
    finest_ref = _smooth(ref_pyr[first], smooth_sigma_px)
    check_mask = _border_mask(finest_mov.shape, border_frac) > 0
    contrast = min(float(finest_mov[check_mask].std()), float(finest_ref[check_mask].std()))
    if not contrast >= min_contrast:
        return fail(
            f"no texture to register (contrast {contrast:.2g} < {min_contrast:g}); "
            "use a textured target (print, newspaper, a random-dot pattern) and light it evenly",
            _IDENTITY.copy(),
            float("nan"),
        )

    affine = _IDENTITY.copy() if init is None else np.asarray(init, dtype=np.float64).reshape(2, 3).copy()
    settings = _EccSettings(
        motion=motion, first=first, total=total, smooth_sigma_px=smooth_sigma_px,
        border_frac=border_frac, iterations=int(iterations), eps=float(eps),
    )
    forward = _ecc_coarse_to_fine(mov_pyr, ref_pyr, affine, settings, moving_mask=base_mask)
    if isinstance(forward, str):
        return fail(forward, affine, float("nan"))
    affine, rho = forward
    if symmetric:
        # ECC's estimate depends a little on which image is resampled (about 3e-4 in scale
        # here, of opposite sign the other way round): average the two directions
        backward = _ecc_coarse_to_fine(ref_pyr, mov_pyr, _invert(affine), settings, template_mask=base_mask)
        if isinstance(backward, str):
            return fail(f"{backward} (reference onto moving)", affine, rho)
        affine = 0.5 * (affine + _invert(backward[0]))
        rho = min(rho, backward[1])
    affine = _project(affine, motion, hw)
    if not np.all(np.isfinite(affine)):
        return fail("ECC gave a non-finite affine", _IDENTITY.copy(), rho)
    if not rho >= min_correlation:
        return fail(
            f"correlation {rho:.3f} after registration is below {min_correlation:g}; "
            "the images show too little of the same texture (or differ too much in blur)",
            affine,
            rho,
        )
    return Registration(affine=affine, correlation=rho, converged=True, motion=motion)


@dataclass(frozen=True)
class _EccSettings:
    motion: str
    first: int
    total: int
    smooth_sigma_px: float
    border_frac: float
    iterations: int
    eps: float


def _level_mask(full_mask: np.ndarray | None, shape: tuple[int, int], border_frac: float) -> np.ndarray:
    """uint8 mask of one pyramid level: the border left out, and ``full_mask`` (uint8, full size)."""
    mask = _border_mask(shape, border_frac)
    if full_mask is not None:
        small = cv2.resize(full_mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
        mask = cv2.bitwise_and(mask, small)
    return mask


def _ecc_coarse_to_fine(
    mov_pyr: list[np.ndarray],
    ref_pyr: list[np.ndarray],
    affine: np.ndarray,
    settings: _EccSettings,
    *,
    moving_mask: np.ndarray | None = None,
    template_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, float] | str:
    """ECC over the pyramid levels ``total - 1 .. first``, starting from ``affine`` (moving ->
    reference, full-resolution pixels). Returns ``(affine, correlation)`` or, on failure, the
    reason. ``moving_mask`` / ``template_mask``: optional full-size uint8 validity masks."""
    ecc_motion = cv2.MOTION_TRANSLATION if settings.motion == "translation" else cv2.MOTION_AFFINE
    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, settings.iterations, settings.eps)
    with_template_mask = getattr(cv2, "findTransformECCWithMask", None)
    rho = float("nan")
    for level in range(settings.total - 1, settings.first - 1, -1):
        factor = float(2**level)
        lm = _smooth(mov_pyr[level], settings.smooth_sigma_px)
        lr = _smooth(ref_pyr[level], settings.smooth_sigma_px)
        in_mask = _level_mask(moving_mask, lm.shape, settings.border_frac)
        # ECC's warp maps template (reference) coordinates to input (moving) coordinates
        level_affine = affine.copy()
        level_affine[:, 2] /= factor
        warp = _invert(level_affine).astype(np.float32)
        try:
            if template_mask is not None and with_template_mask is not None:
                t_mask = _level_mask(template_mask, lr.shape, settings.border_frac)
                rho, warp = with_template_mask(lr, lm, t_mask, in_mask, warp, ecc_motion, criteria, 1)
            else:
                rho, warp = cv2.findTransformECC(lr, lm, warp, ecc_motion, criteria, in_mask, 1)
        except cv2.error as err:
            detail = " ".join(str(err).split("error:")[-1].split())
            return (
                f"ECC did not converge at pyramid level {level} ({detail}); "
                "the images may not overlap or may lack texture"
            )
        try:
            level_affine = _invert(warp.astype(np.float64))
        except CalibrationError as err:
            return str(err)
        level_hw = (int(lm.shape[0]), int(lm.shape[1]))
        affine = _rescale(_project(level_affine, settings.motion, level_hw), factor)
        logger.debug("ECC level %d (%dx%d): rho %.4f", level, level_hw[1], level_hw[0], rho)
    return affine, float(rho)


# --------------------------------------------------------------------------------------------
# A whole stack
# --------------------------------------------------------------------------------------------


def _reference_position(n: int, reference: str | int, order: np.ndarray) -> int:
    """Position (in focus order) of the reference slice."""
    if isinstance(reference, (bool, np.bool_)):
        raise CalibrationError(f"alignment: reference must be 'middle', 'first', 'last' or a slice index, got {reference!r}")
    if isinstance(reference, (int, np.integer)):
        if not 0 <= int(reference) < n:
            raise CalibrationError(f"alignment: reference slice {reference} outside 0..{n - 1}")
        return int(np.nonzero(order == int(reference))[0][0])
    if reference == "middle":
        return n // 2
    if reference == "first":
        return 0
    if reference == "last":
        return n - 1
    raise CalibrationError(f"alignment: reference must be 'middle', 'first', 'last' or a slice index, got {reference!r}")


def _chain(
    grey: Sequence[np.ndarray],
    ref_pos: int,
    *,
    motion: str,
    names: Sequence[str],
    pair_kwargs: Mapping[str, Any],
) -> tuple[list[np.ndarray], list[float]]:
    """Register every image (in the given order) to its neighbour toward ``ref_pos`` and chain.

    Returns per-image affines onto image ``ref_pos`` and the pairwise correlations (NaN for
    the reference).
    """
    n = len(grey)
    affines: list[np.ndarray | None] = [None] * n
    rhos = [float("nan")] * n
    affines[ref_pos] = _IDENTITY.copy()
    for step in (-1, 1):
        k = ref_pos + step
        while 0 <= k < n:
            toward = k - step
            try:
                reg = estimate_pair(grey[k], grey[toward], motion=motion, strict=True, **pair_kwargs)
            except CalibrationError as err:
                raise CalibrationError(f"{names[k]} onto its neighbour {names[toward]}: {err}") from err
            prev = affines[toward]
            assert prev is not None
            affines[k] = _compose(prev, reg.affine)
            rhos[k] = reg.correlation
            k += step
    return [a for a in affines if a is not None], rhos


def estimate_stack_alignment(
    stack: FocalStack,
    *,
    motion: str = "scale_shift",
    reference: str | int = "middle",
    **pair_kwargs: Any,
) -> list[np.ndarray]:
    """Per-slice alignment of a focal stack, estimated from its images.

    Slices are taken in focus order (:attr:`FocalStack.focus_dpt`); each is registered with
    :func:`estimate_pair` onto its neighbour toward the reference slice, and the pairwise
    affines are chained (``A_k->ref = A_k+1->ref o A_k->k+1``). Existing ``alignment`` keys
    are ignored (the raw images are used).

    Args:
        stack: any slice order; colour stacks are registered on their BT.601 luma.
        motion: one of :data:`MOTIONS`.
        reference: ``"middle"`` (the middle slice in focus order), ``"first"`` (farthest
            focus), ``"last"`` (nearest focus), or an index into the stack's own slice order.
        **pair_kwargs: passed to :func:`estimate_pair` (``smooth_sigma_px``, ``max_side_px``, ...).

    Returns:
        N float64 ``[2, 3]`` affines in the stack's own slice order, each mapping that slice's
        pixels onto the reference slice (the reference gets the identity).

    Raises:
        CalibrationError: a pair could not be registered (names the two slices).
    """
    _check_motion(motion)
    order = np.argsort(stack.focus_dpt, kind="stable")
    ref_pos = _reference_position(stack.n_slices, reference, order)
    grey_all = stack.to_grey_float()
    grey = [grey_all[i] for i in order]
    names = [stack.image_names[i] for i in order]
    chained, rhos = _chain(grey, ref_pos, motion=motion, names=names, pair_kwargs=pair_kwargs)
    out: list[np.ndarray] = [_IDENTITY.copy() for _ in range(stack.n_slices)]
    for pos, idx in enumerate(order):
        out[int(idx)] = chained[pos]
    if logger.isEnabledFor(logging.INFO):
        hw = stack.image_hw
        scales = [scale_shift_params(a, hw)[0] for a in out]
        logger.info(
            "estimated %s alignment of %d slices onto %s: scales %.4f..%.4f, min pair correlation %.3f",
            motion, stack.n_slices, names[ref_pos], min(scales), max(scales),
            float(np.nanmin(rhos)) if stack.n_slices > 1 else float("nan"),
        )
    return out


def _relative_to_slice(affines: list[np.ndarray], k: int) -> list[np.ndarray]:
    """Affines into the table's reference frame (a setting between slices) re-expressed into
    slice ``k``'s frame: ``inv(A_k) @ A_i`` (as 3x3), and exactly the identity for slice ``k``.

    Args:
        affines: one 2x3 per slice, slice pixels -> reference frame (``cv2.warpAffine`` convention).
    """
    to_k = np.linalg.inv(np.vstack([np.asarray(affines[k], np.float64), [0.0, 0.0, 1.0]]))
    out = []
    for i, a in enumerate(affines):
        if i == k:
            out.append(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        else:
            out.append((to_k @ np.vstack([np.asarray(a, np.float64), [0.0, 0.0, 1.0]]))[:2])
    return out


class BreathingModel:
    """Focus breathing as a table: actuator value -> alignment affine, linearly interpolated.

    The affine of a value maps a frame taken at that value onto the frame at
    ``reference_value`` (``cv2.warpAffine`` convention, pixels of an ``image_hw`` image).
    Between table nodes each affine entry is interpolated linearly; outside the calibrated
    range the model refuses (a small ``tolerance_frac`` of the range is allowed and
    extrapolated linearly), because a calibration says nothing there.

    Args:
        actuator_values: ``[K]`` strictly increasing actuator values (K >= 2), in ``actuator_unit``.
        affines: ``[K, 2, 3]`` alignment affines at those values.
        image_hw: ``(H, W)`` of the calibration frames (the affines are in their pixels).
        reference_value: the actuator value whose frame is the reference (identity).
        actuator_unit: e.g. ``"mA"``, ``"dpt"``, ``"mm"``.
        motion: the motion model fitted.
        correlations: optional ``[K]`` pair correlations (NaN at the reference), for reports.
        tolerance_frac: allowed overshoot beyond the range, as a fraction of its span. A
            calibration session sets it to the focus model's ``tolerance_dpt`` in actuator units
            (:meth:`~calibration.focus_model.PolynomialFocusModel.value_tolerance`), so that the
            table accepts every actuator value the focus model accepts.
    """

    kind = "breathing_affine_table"

    def __init__(
        self,
        actuator_values: Sequence[float] | np.ndarray,
        affines: Sequence[np.ndarray] | np.ndarray,
        *,
        image_hw: tuple[int, int],
        reference_value: float,
        actuator_unit: str = "",
        motion: str = "scale_shift",
        correlations: Sequence[float] | None = None,
        tolerance_frac: float = DEFAULT_TOLERANCE_FRAC,
    ) -> None:
        values = np.asarray(actuator_values, dtype=np.float64).reshape(-1)
        try:
            table = np.asarray(affines, dtype=np.float64).reshape(len(values), 2, 3)
        except ValueError:
            raise CalibrationError(
                f"breathing model: need one 2x3 affine per actuator value ({len(values)}), "
                f"got an array of shape {np.shape(affines)}"
            ) from None
        if len(values) < 2:
            raise CalibrationError(f"breathing model: need at least 2 actuator values, got {len(values)}")
        if not np.all(np.isfinite(values)) or not np.all(np.isfinite(table)):
            raise CalibrationError("breathing model: actuator values and affines must be finite")
        if np.any(np.diff(values) <= 0):
            raise CalibrationError(
                f"breathing model: actuator values must be strictly increasing, got {values.tolist()}"
            )
        _check_motion(motion)
        h, w = (int(v) for v in image_hw)
        if h < 1 or w < 1:
            raise CalibrationError(f"breathing model: image_hw must be positive, got {image_hw}")
        if not 0 <= tolerance_frac < 1:
            raise CalibrationError(f"breathing model: tolerance_frac must be in [0, 1), got {tolerance_frac}")
        self.actuator_values = values
        self.affines = table
        self.image_hw = (h, w)
        self.reference_value = float(reference_value)
        self.actuator_unit = str(actuator_unit)
        self.motion = motion
        self.correlations = (
            np.full(len(values), np.nan) if correlations is None else np.asarray(correlations, np.float64).reshape(-1)
        )
        if len(self.correlations) != len(values):
            raise CalibrationError("breathing model: one correlation per actuator value")
        self.tolerance_frac = float(tolerance_frac)
        self._check_value(self.reference_value, "reference_value")

    def __repr__(self) -> str:
        lo, hi = self.value_range
        return (
            f"BreathingModel({len(self.actuator_values)} nodes, {lo:g}..{hi:g} {self.actuator_unit}, "
            f"magnification {self.magnifications.min():.5f}..{self.magnifications.max():.5f})"
        )

    @property
    def value_range(self) -> tuple[float, float]:
        """``(lowest, highest)`` calibrated actuator value."""
        return float(self.actuator_values[0]), float(self.actuator_values[-1])

    @property
    def magnifications(self) -> np.ndarray:
        """float64 ``[K]``: :meth:`scale_at` at every node."""
        return np.array([1.0 / scale_shift_params(a, self.image_hw)[0] for a in self.affines])

    def _check_value(self, value: float, what: str = "actuator value") -> float:
        value = float(value)
        lo, hi = self.value_range
        tol = self.tolerance_frac * (hi - lo) + 1e-12 * max(1.0, abs(lo), abs(hi))
        if not (lo - tol <= value <= hi + tol):
            unit = f" {self.actuator_unit}" if self.actuator_unit else ""
            raise CalibrationError(
                f"breathing model: {what} {value:g}{unit} is outside the calibrated range "
                f"{lo:g}..{hi:g}{unit}; calibrate breathing over the range the sweep uses"
            )
        return value

    def affine_at(self, value: float) -> np.ndarray:
        """float64 ``[2, 3]``: the alignment affine of a frame taken at ``value`` (maps it onto
        the reference frame). Raises :class:`CalibrationError` outside the calibrated range."""
        value = self._check_value(value)
        v = self.actuator_values
        k = int(np.clip(np.searchsorted(v, value, side="right") - 1, 0, len(v) - 2))
        t = (value - v[k]) / (v[k + 1] - v[k])
        return (1.0 - t) * self.affines[k] + t * self.affines[k + 1]

    def scale_at(self, value: float) -> float:
        """Breathing magnification at ``value`` relative to the reference frame (1 at
        ``reference_value``; > 1 when the image is larger). The alignment affine at ``value``
        scales by its inverse."""
        return 1.0 / scale_shift_params(self.affine_at(value), self.image_hw)[0]

    def align_stack(self, stack: FocalStack) -> FocalStack:
        """A new stack whose slices carry the calibrated ``alignment`` for their
        ``actuator_value`` (images not warped; see :meth:`FocalStack.aligned`).

        Raises :class:`CalibrationError` when the image size differs from the calibration's,
        a slice has no ``actuator_value``, or a value is outside the calibrated range.
        """
        if stack.image_hw != self.image_hw:
            raise CalibrationError(
                f"breathing model: calibrated for {self.image_hw[0]}x{self.image_hw[1]} px images, "
                f"the stack has {stack.image_hw[0]}x{stack.image_hw[1]}; recalibrate at this size"
            )
        affines = []
        for i, meta in enumerate(stack.slice_meta):
            if "actuator_value" not in meta:
                raise CalibrationError(
                    f"breathing model: slice {i} ({stack.image_names[i]}) has no actuator_value; "
                    "estimate the alignment from the images instead"
                )
            affines.append(self.affine_at(float(meta["actuator_value"])))
        k = self._reference_slice(stack)
        out = stack.with_alignment(_relative_to_slice(affines, k))
        # the reference slice's frame onto the table's (the calibration's, where its intrinsics hold): what a
        # point cloud applies to the depth's pixels before the intrinsics (a few tenths of a per cent of scale)
        out.meta["breathing_reference_affine"] = [[round(float(x), 12) for x in row] for row in np.asarray(affines[k])]
        return out

    def _reference_slice(self, stack: FocalStack) -> int:
        """The slice whose actuator value is nearest the table's reference value: its frame is
        the stack's reference frame (FOCAL_STACK_FORMAT.md: the reference slice has the identity)."""
        values = [float(m["actuator_value"]) for m in stack.slice_meta]
        # two slices equally near: the lower value, whatever the capture order (a triangle sweep alternates it)
        return min(range(len(values)), key=lambda i: (abs(values[i] - self.reference_value), values[i]))

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-safe values for ``calibration.yaml`` (see :meth:`from_dict`)."""
        return {
            "kind": self.kind,
            "motion": self.motion,
            "actuator_unit": self.actuator_unit,
            "reference_value": float(self.reference_value),
            "image_hw": [int(self.image_hw[0]), int(self.image_hw[1])],
            "tolerance_frac": float(self.tolerance_frac),
            "actuator_values": [float(v) for v in self.actuator_values],
            "affines": [[[float(x) for x in row] for row in a] for a in self.affines],
            "magnification": [round(float(m), 8) for m in self.magnifications],
            "correlations": [None if not math.isfinite(c) else round(float(c), 6) for c in self.correlations],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BreathingModel:
        """Inverse of :meth:`to_dict`; raises :class:`CalibrationError` naming a missing or bad key."""
        if not isinstance(data, Mapping):
            raise CalibrationError(f"breathing model: expected a mapping, got {type(data).__name__}")
        kind = data.get("kind", cls.kind)
        if kind != cls.kind:
            raise CalibrationError(f"breathing model: kind must be {cls.kind!r}, got {kind!r}")
        for key in ("actuator_values", "affines", "image_hw", "reference_value"):
            if key not in data:
                raise CalibrationError(f"breathing model: missing key {key!r}")
        try:
            hw = tuple(int(v) for v in data["image_hw"])
            if len(hw) != 2:
                raise ValueError
            corr = data.get("correlations")
            correlations = None if corr is None else [np.nan if c is None else float(c) for c in corr]
            return cls(
                [float(v) for v in data["actuator_values"]],
                np.asarray(data["affines"], dtype=np.float64),
                image_hw=(hw[0], hw[1]),
                reference_value=float(data["reference_value"]),
                actuator_unit=str(data.get("actuator_unit", "")),
                motion=str(data.get("motion", "scale_shift")),
                correlations=correlations,
                tolerance_frac=float(data.get("tolerance_frac", DEFAULT_TOLERANCE_FRAC)),
            )
        except (TypeError, ValueError) as err:
            raise CalibrationError(f"breathing model: malformed entry ({err})") from err


def fit_breathing(
    frames: Sequence[np.ndarray],
    actuator_values: Sequence[float],
    *,
    reference_value: float | None = None,
    motion: str = "scale_shift",
    actuator_unit: str = "",
    tolerance_frac: float = DEFAULT_TOLERANCE_FRAC,
    **pair_kwargs: Any,
) -> BreathingModel:
    """Calibrate focus breathing from frames of a textured target at several focus settings.

    Frames are ordered by actuator value (focus must be monotonic in it), each is registered
    onto its neighbour toward the reference frame with :func:`estimate_pair`, and the pairwise
    affines are chained. When ``reference_value`` falls between nodes, every affine is
    re-expressed relative to the interpolated one there, so ``affine_at(reference_value)`` is
    the identity.

    Args:
        frames: K images ``[H, W]`` or ``[H, W, 3|4]`` (any numeric dtype), one per value.
        actuator_values: K distinct actuator values.
        reference_value: the setting that defines the reference frame (default: the middle
            node); must lie inside the swept range.
        motion: one of :data:`MOTIONS` (``scale_shift`` is the breathing model).
        actuator_unit: stored with the model.
        tolerance_frac: the model's overshoot allowance (see :class:`BreathingModel`).
        **pair_kwargs: passed to :func:`estimate_pair`.

    Raises:
        CalibrationError: fewer than 2 frames, mismatched counts or sizes, repeated values, a
            reference outside the range, or a pair that cannot be registered (no texture).
    """
    _check_motion(motion)
    if len(frames) != len(actuator_values):
        raise CalibrationError(f"breathing: {len(frames)} frames for {len(actuator_values)} actuator values")
    if len(frames) < 2:
        raise CalibrationError(f"breathing: need frames at 2 or more focus settings, got {len(frames)}")
    values = np.asarray(actuator_values, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise CalibrationError("breathing: actuator values must be finite")
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    if np.any(np.diff(sorted_values) <= 0):
        raise CalibrationError(
            f"breathing: each focus setting needs its own actuator value; repeated values in {values.tolist()}"
        )
    grey = [_grey(frames[int(i)]) for i in order]
    hw = grey[0].shape
    for i, g in zip(order, grey):
        if g.shape != hw:
            raise CalibrationError(f"breathing: frame {int(i)} is {g.shape}, frame {int(order[0])} is {hw}")
    lo, hi = float(sorted_values[0]), float(sorted_values[-1])
    if reference_value is None:
        ref_pos = len(grey) // 2
        ref_value = float(sorted_values[ref_pos])
    else:
        ref_value = float(reference_value)
        if not lo <= ref_value <= hi:
            raise CalibrationError(f"breathing: reference_value {ref_value:g} outside the swept range {lo:g}..{hi:g}")
        ref_pos = int(np.argmin(np.abs(sorted_values - ref_value)))
    names = [f"frame at {v:g} {actuator_unit}".rstrip() for v in sorted_values]
    affines, rhos = _chain(grey, ref_pos, motion=motion, names=names, pair_kwargs=pair_kwargs)
    model = BreathingModel(
        sorted_values, np.stack(affines), image_hw=(int(hw[0]), int(hw[1])),
        reference_value=float(sorted_values[ref_pos]), actuator_unit=actuator_unit, motion=motion, correlations=rhos,
        tolerance_frac=tolerance_frac,
    )
    if ref_value != float(sorted_values[ref_pos]):
        back = _invert(model.affine_at(ref_value))
        renorm = np.stack([_project(_compose(back, a), motion, model.image_hw) for a in affines])
        model = BreathingModel(
            sorted_values, renorm, image_hw=model.image_hw, reference_value=ref_value,
            actuator_unit=actuator_unit, motion=motion, correlations=rhos, tolerance_frac=tolerance_frac,
        )
    logger.info("breathing calibrated: %r", model)
    return model


# --------------------------------------------------------------------------------------------
# A figure of misregistration
# --------------------------------------------------------------------------------------------


def _band_pass(grey: np.ndarray, sigma_px: float) -> np.ndarray:
    """Difference of Gaussians (``sigma_px`` and twice that): keeps the detail that a slice
    shift of about a pixel or more destroys, drops illumination and most of defocus."""
    return _smooth(grey, sigma_px) - _smooth(grey, 2.0 * sigma_px)


def misregistration(
    stack_or_slices: FocalStack | np.ndarray | Sequence[np.ndarray],
    *,
    apply_alignment: bool = True,
    sigma_px: float = 1.5,
    max_side_px: int = 512,
    border_frac: float = 0.08,
) -> float:
    """Mean ``1 - r`` over neighbouring slices, where ``r`` is the correlation coefficient of
    their band-passed grey images in the central region: 0 for perfectly registered copies,
    about 1 for unrelated images. Defocus differences keep it above 0 even when registered,
    so compare values of the same stack (before and after alignment), not across stacks.

    Args:
        stack_or_slices: a :class:`FocalStack` (taken in focus order; with ``apply_alignment``
            its ``alignment`` keys are applied first), or slices ``[N, H, W(, C)]`` already in
            focus order (any numeric dtype; integers are scaled to [0, 1]).
        apply_alignment: warp a stack by its stored alignment before measuring.
        sigma_px: band-pass scale (Gaussian sigma, pixels at the working size).
        max_side_px: images are reduced (area averaging) to at most this long side first.
        border_frac: fraction of each side left out (warped borders are reflections).

    Returns:
        The mean of ``1 - r`` over the N - 1 neighbouring pairs (unitless, in [0, 2]).
    """
    if isinstance(stack_or_slices, FocalStack):
        stack = stack_or_slices.sorted_by_focus()
        if apply_alignment and stack.has_alignment:
            stack = stack.aligned()
        grey = list(stack.to_grey_float())
    else:
        grey = [_grey(s) for s in stack_or_slices]
    if len(grey) < 2:
        raise CalibrationError("misregistration: need at least 2 slices")
    h, w = grey[0].shape
    f = max(1.0, max(h, w) / float(max_side_px))
    size = (max(1, round(w / f)), max(1, round(h / f)))
    bands = []
    for g in grey:
        if g.shape != (h, w):
            raise CalibrationError("misregistration: all slices must have the same size")
        small = cv2.resize(g, size, interpolation=cv2.INTER_AREA) if f > 1 else g
        bands.append(_band_pass(small, sigma_px))
    inside = _border_mask(bands[0].shape, border_frac) > 0
    scores = []
    for a, b in itertools.pairwise(bands):
        x = a[inside] - a[inside].mean()
        y = b[inside] - b[inside].mean()
        denom = math.sqrt(float(np.dot(x, x)) * float(np.dot(y, y)))
        r = float(np.dot(x, y)) / denom if denom > 0 else 0.0
        scores.append(1.0 - r)
    return float(np.mean(scores))
