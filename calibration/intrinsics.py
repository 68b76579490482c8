"""Camera intrinsics from chessboard views (OpenCV), for point clouds and metric geometry.

``find_board`` locates a chessboard's inner corners in one image (sub-pixel), and
``calibrate_intrinsics`` fits the pinhole camera matrix and lens distortion to a set of views
with ``cv2.calibrateCamera``, skipping images without a board. The result,
:class:`Intrinsics`, reports the RMS and per-view reprojection errors and goes into
``calibration.yaml`` through :meth:`Intrinsics.to_dict` / :meth:`Intrinsics.from_dict`.

Pattern size follows OpenCV: ``cols x rows`` *inner* corners (a board of
``(cols + 1) x (rows + 1)`` squares). A plain chessboard has to be seen whole in every view
that counts; a ChArUco board (``board="charuco"``, :func:`find_charuco`; the board is
:func:`capture.targets.charuco_board`) may be partly hidden or cut by the image border, as
its markers identify each corner.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from capture.errors import CalibrationError, InputError
from capture.targets import charuco_board

logger = logging.getLogger(__name__)

__all__ = [
    "BOARDS",
    "DISTORTION_MODELS",
    "Intrinsics",
    "board_object_points",
    "calibrate_intrinsics",
    "find_board",
    "find_charuco",
]

#: board kinds :func:`calibrate_intrinsics` takes
BOARDS = ("chessboard", "charuco")
#: fewest ChArUco corners a view needs to count
MIN_CHARUCO_CORNERS = 8

#: distortion model -> calibrateCamera flags. ``none``: an ideal pinhole; ``radial``: k1, k2;
#: ``standard``: k1, k2, p1, p2 (OpenCV's usual choice with k3 fixed at 0); ``full``: k1, k2, p1, p2, k3.
_FIX_ALL = cv2.CALIB_FIX_K1 | cv2.CALIB_FIX_K2 | cv2.CALIB_FIX_K3 | cv2.CALIB_ZERO_TANGENT_DIST
DISTORTION_MODELS: dict[str, int] = {
    "none": _FIX_ALL,
    "radial": cv2.CALIB_FIX_K3 | cv2.CALIB_ZERO_TANGENT_DIST,
    "standard": cv2.CALIB_FIX_K3,
    "full": 0,
}

_ADVICE_VIEWS = (
    "show the whole board (with its white border) in each image, tilted by 20-40 degrees in different "
    "directions and at different places in the view, evenly lit and in sharp focus; check that cols and rows "
    "count the inner corners of the printed board"
)
_ADVICE_CHARUCO = (
    f"show at least {MIN_CHARUCO_CORNERS} corners of the board in each image, tilted by 20-40 degrees in different "
    "directions and at different places in the view, evenly lit and in sharp focus; check that cols and rows "
    "count the inner corners and that marker_ratio and dictionary match the printed board"
)


@dataclass(frozen=True)
class Intrinsics:
    """A calibrated pinhole camera with OpenCV distortion.

    Attributes:
        camera_matrix: ``K`` ``[3, 3]`` float64 (pixels; principal point with pixel centres at
            integer coordinates, OpenCV's convention).
        distortion: OpenCV coefficients ``[k1, k2, p1, p2, k3]`` float64.
        image_size: ``(width, height)`` pixels the calibration holds for.
        rms_reprojection_px: RMS reprojection error over all corners, pixels.
        per_view_rms_px: RMS reprojection error of each view used, pixels.
        n_views: number of views used.
        views_used: indices (into the images given) of the views used.
        board: the board: ``cols``, ``rows`` (inner corners), ``square_m``.
        distortion_model: a key of :data:`DISTORTION_MODELS`.
        std_px: standard deviations of ``(fx, fy, cx, cy)`` from the fit, pixels (the
            estimate OpenCV derives from the residuals; small only if the poses are varied).
    """

    camera_matrix: np.ndarray
    distortion: np.ndarray
    image_size: tuple[int, int]
    rms_reprojection_px: float
    per_view_rms_px: tuple[float, ...]
    n_views: int
    views_used: tuple[int, ...] = ()
    board: dict[str, Any] = field(default_factory=dict)
    distortion_model: str = "standard"
    std_px: tuple[float, ...] = ()

    @property
    def fx_px(self) -> float:
        return float(self.camera_matrix[0, 0])

    @property
    def fy_px(self) -> float:
        return float(self.camera_matrix[1, 1])

    @property
    def focal_length_px(self) -> float:
        """Mean of ``fx`` and ``fy``, pixels."""
        return 0.5 * (self.fx_px + self.fy_px)

    @property
    def principal_point_px(self) -> tuple[float, float]:
        return float(self.camera_matrix[0, 2]), float(self.camera_matrix[1, 2])

    def focal_length_mm(self, pixel_pitch_um: float) -> float:
        """The image-side focal length in millimetres for a pixel pitch (micrometres)."""
        return self.focal_length_px * pixel_pitch_um * 1e-3

    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML-ready mapping (the ``intrinsics`` section of ``calibration.yaml``)."""
        cx, cy = self.principal_point_px
        return {
            "model": "pinhole_opencv",
            "image_size_px": [int(self.image_size[0]), int(self.image_size[1])],
            "fx_px": self.fx_px,
            "fy_px": self.fy_px,
            "cx_px": cx,
            "cy_px": cy,
            "camera_matrix": [[float(v) for v in row] for row in self.camera_matrix],
            "distortion_model": self.distortion_model,
            "distortion": [float(v) for v in self.distortion.ravel()],
            "rms_reprojection_px": float(self.rms_reprojection_px),
            "per_view_rms_px": [float(v) for v in self.per_view_rms_px],
            "n_views": int(self.n_views),
            "views_used": [int(v) for v in self.views_used],
            "board": dict(self.board),
            "std_px": {k: float(v) for k, v in zip(("fx", "fy", "cx", "cy"), self.std_px)},
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Intrinsics:
        """Inverse of :meth:`to_dict`.

        Raises:
            CalibrationError: a key is missing or malformed (names it).
        """
        if not isinstance(doc, dict):
            raise CalibrationError("intrinsics: expected a mapping; recalibrate or fix calibration.yaml")
        try:
            k = np.asarray(doc["camera_matrix"], np.float64)
            dist = np.asarray(doc.get("distortion", [0.0] * 5), np.float64).ravel()
            size = doc["image_size_px"]
            result = cls(
                camera_matrix=k,
                distortion=dist,
                image_size=(int(size[0]), int(size[1])),
                rms_reprojection_px=float(doc["rms_reprojection_px"]),
                per_view_rms_px=tuple(float(v) for v in doc.get("per_view_rms_px", [])),
                n_views=int(doc["n_views"]),
                views_used=tuple(int(v) for v in doc.get("views_used", [])),
                board=dict(doc.get("board", {})),
                distortion_model=str(doc.get("distortion_model", "standard")),
                std_px=tuple(float(doc["std_px"][k]) for k in ("fx", "fy", "cx", "cy") if k in doc.get("std_px", {})),
            )
        except KeyError as exc:
            raise CalibrationError(f"intrinsics.{exc.args[0]}: missing; recalibrate or fix calibration.yaml") from exc
        except (TypeError, ValueError, IndexError) as exc:
            raise CalibrationError(f"intrinsics: malformed entry ({exc}); recalibrate or fix calibration.yaml") from exc
        if k.shape != (3, 3) or not np.all(np.isfinite(k)) or k[0, 0] <= 0 or k[1, 1] <= 0:
            raise CalibrationError("intrinsics.camera_matrix: must be a finite 3x3 matrix with positive fx, fy")
        if dist.size not in (4, 5, 8, 12, 14) or not np.all(np.isfinite(dist)):
            raise CalibrationError(f"intrinsics.distortion: expected 4, 5, 8, 12 or 14 finite numbers, got {dist.size}")
        return result


def _to_grey_u8(image: np.ndarray) -> np.ndarray:
    """Any camera image (``[H, W]`` or ``[H, W, C]``; uint8, uint16 or float) as uint8 grey,
    stretched between its 0.5th and 99.5th percentiles for uint16 and float data."""
    img = np.asarray(image)
    if img.ndim == 3:
        if img.shape[2] == 1:
            img = img[..., 0]
        else:
            img = img[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    elif img.ndim != 2:
        raise InputError(f"intrinsics: expected an [H, W] or [H, W, C] image, got shape {img.shape}")
    if img.dtype == np.uint8:
        return img
    img = img.astype(np.float32)
    lo, hi = np.percentile(img, [0.5, 99.5])
    if not hi > lo:
        return np.zeros(img.shape, np.uint8)
    return np.clip((img - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)


def find_board(image: np.ndarray, cols: int, rows: int) -> np.ndarray | None:
    """The chessboard's inner corners in one image, to sub-pixel accuracy, or None.

    Uses ``cv2.findChessboardCornersSB`` (sector-based, robust), falling back to
    ``cv2.findChessboardCorners``, then ``cv2.cornerSubPix``. The whole board must be visible.

    Args:
        image: ``[H, W]`` or ``[H, W, C]`` (uint8, uint16 or float).
        cols, rows: inner corners per row and per column.

    Returns:
        float32 ``[rows * cols, 2]`` pixel positions in OpenCV's order (row by row), or None.
    """
    if cols < 2 or rows < 2:
        raise InputError(f"intrinsics: a chessboard needs at least 2x2 inner corners, got {cols}x{rows}")
    grey = _to_grey_u8(image)
    pattern = (int(cols), int(rows))
    flags_sb = cv2.CALIB_CB_NORMALIZE_IMAGE | cv2.CALIB_CB_EXHAUSTIVE | cv2.CALIB_CB_ACCURACY
    found, corners = cv2.findChessboardCornersSB(grey, pattern, flags=flags_sb)
    if not found or corners is None:
        flags = cv2.CALIB_CB_ADAPTIVE_THRESH | cv2.CALIB_CB_NORMALIZE_IMAGE
        found, corners = cv2.findChessboardCorners(grey, pattern, flags=flags)
        if not found or corners is None:
            return None
    # refine both detectors' corners to the saddle point (halves the SB detector's error on
    # simulated boards: 0.08 -> 0.04 px RMS); the window stays below half the smallest corner
    # spacing, so it never sees a neighbour
    pts = corners.reshape(rows, cols, 2)
    spacing = min(
        float(np.linalg.norm(np.diff(pts, axis=1), axis=2).min()), float(np.linalg.norm(np.diff(pts, axis=0), axis=2).min())
    )
    half = int(max(2, min(11, math.floor(spacing / 2.0) - 1)))
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 50, 1e-3)
    refined = cv2.cornerSubPix(grey, corners.astype(np.float32), (half, half), (-1, -1), criteria)
    return refined.reshape(-1, 2).astype(np.float32)


def find_charuco(
    image: np.ndarray,
    cols: int,
    rows: int,
    *,
    square_m: float = 0.02,
    marker_ratio: float = 0.7,
    dictionary: str = "DICT_5X5_100",
    min_corners: int = MIN_CHARUCO_CORNERS,
) -> tuple[np.ndarray, np.ndarray] | None:
    """The ChArUco corners visible in one image (sub-pixel, as refined by OpenCV's detector;
    a further ``cornerSubPix`` made them worse, its window meeting the markers), or None when fewer than
    ``min_corners`` are found or they all lie on one line.

    Args:
        image: ``[H, W]`` or ``[H, W, C]`` (uint8, uint16 or float).
        cols, rows, square_m, marker_ratio, dictionary: the board, as for
            :func:`capture.targets.charuco_board`.

    Returns:
        ``(corners, ids)``: float32 ``[N, 2]`` pixels and int32 ``[N]`` corner ids (id ``i`` is
        inner corner ``i`` of :func:`board_object_points`, row by row).
    """
    grey = _to_grey_u8(image)
    board = charuco_board(cols, rows, square_m, marker_ratio=marker_ratio, dictionary=dictionary)
    corners, ids, _marker_corners, _marker_ids = cv2.aruco.CharucoDetector(board).detectBoard(grey)
    if ids is None or corners is None or len(ids) < max(4, min_corners):
        return None
    pts = corners.reshape(-1, 2).astype(np.float32)
    ids_i = ids.reshape(-1).astype(np.int32)
    # corners on one board row or column fix no homography
    grid = np.column_stack([ids_i % cols, ids_i // cols]).astype(np.float64)
    if np.linalg.matrix_rank(grid - grid.mean(axis=0), tol=1e-6) < 2:
        return None
    return pts, ids_i


def board_object_points(cols: int, rows: int, square_m: float) -> np.ndarray:
    """The inner corners on the board plane, float32 ``[rows * cols, 3]`` metres (z = 0),
    in :func:`find_board`'s order."""
    gx, gy = np.meshgrid(np.arange(cols, dtype=np.float32), np.arange(rows, dtype=np.float32))
    return np.column_stack([gx.ravel(), gy.ravel(), np.zeros(cols * rows, np.float32)]) * np.float32(square_m)


class BoardSizeMismatch(CalibrationError):
    """The board was found in no view at its configured size, but at another one (``cols``,
    ``rows``): the settings are wrong, not the views."""

    def __init__(self, message: str, *, cols: int, rows: int) -> None:
        super().__init__(message)
        self.cols, self.rows = cols, rows


#: views tried at other board sizes when none was found at the configured one
_SIZE_GUESS_VIEWS = 3


def _other_board_size(images: list[np.ndarray], cols: int, rows: int) -> tuple[tuple[int, int], int, int] | None:
    """((cols, rows), views found in, views tried) for the first nearby chessboard size that
    OpenCV finds in most of ``images`` (squares counted for inner corners, one side off by
    one), or None. For the error message only: nothing is fitted at a guessed size."""
    candidates = [(cols - 1, rows - 1), (cols + 1, rows + 1), (cols - 1, rows), (cols, rows - 1), (cols + 1, rows), (cols, rows + 1)]
    greys = [_to_grey_u8(im) for im in images]
    flags = cv2.CALIB_CB_ADAPTIVE_THRESH | cv2.CALIB_CB_NORMALIZE_IMAGE | cv2.CALIB_CB_FAST_CHECK
    for c, r in candidates:
        if c < 2 or r < 2:
            continue
        hits = sum(bool(cv2.findChessboardCorners(g, (c, r), flags=flags)[0]) for g in greys)
        if greys and hits * 2 > len(greys):
            return (c, r), hits, len(greys)
    return None


def calibrate_intrinsics(
    images: Iterable[np.ndarray],
    *,
    cols: int,
    rows: int,
    square_m: float,
    min_views: int = 5,
    max_rms_px: float = 1.0,
    distortion_model: str = "standard",
    board: str = "chessboard",
    marker_ratio: float = 0.7,
    dictionary: str = "DICT_5X5_100",
) -> Intrinsics:
    """Calibrate a camera from images of a flat chessboard or ChArUco board.

    Images in which the board is not found are skipped (logged). The fit uses
    ``cv2.calibrateCamera`` with the distortion terms of ``distortion_model``.

    Args:
        images: ``[H, W]`` or ``[H, W, C]`` images, all of one size.
        cols, rows: inner corners of the board (OpenCV's pattern size).
        square_m: side of one square, metres (sets the scale of the poses, not of ``K``).
        board: ``chessboard`` (seen whole in each view) or ``charuco`` (at least
            ``MIN_CHARUCO_CORNERS`` corners per view; ``marker_ratio`` and ``dictionary``
            describe its markers).
        min_views: fewest views with a detected board to fit at all.
        max_rms_px: the largest RMS reprojection error accepted as plausible.
        distortion_model: ``none``, ``radial``, ``standard`` or ``full`` (see
            :data:`DISTORTION_MODELS`).

    Raises:
        CalibrationError: too few views show the board, or the fit is implausible (the
            message says what to do).
        InputError: bad arguments or images of different sizes.
    """
    if distortion_model not in DISTORTION_MODELS:
        raise InputError(f"intrinsics: distortion_model {distortion_model!r} unknown; valid: {', '.join(DISTORTION_MODELS)}")
    if not square_m > 0:
        raise InputError(f"intrinsics: square_m must be > 0, got {square_m}")
    if min_views < 3:
        raise InputError(f"intrinsics: min_views must be at least 3, got {min_views}")
    if board not in BOARDS:
        raise InputError(f"intrinsics: board {board!r} unknown; valid: {', '.join(BOARDS)}")
    if cols < 2 or rows < 2:
        raise InputError(f"intrinsics: a board needs at least 2x2 inner corners, got {cols}x{rows}")
    obj = board_object_points(cols, rows, square_m)
    object_points: list[np.ndarray] = []
    image_points: list[np.ndarray] = []
    used: list[int] = []
    size: tuple[int, int] | None = None
    n_images = 0
    seen: list[np.ndarray] = []  # a few views to try other board sizes on, where none is found
    for index, image in enumerate(images):
        n_images += 1
        if len(seen) < _SIZE_GUESS_VIEWS:
            seen.append(image)
        hw = (int(image.shape[1]), int(image.shape[0]))
        if size is None:
            size = hw
        elif hw != size:
            raise InputError(f"intrinsics: image {index} is {hw[0]}x{hw[1]}, the first was {size[0]}x{size[1]}")
        if board == "chessboard":
            corners = find_board(image, cols, rows)
            view_obj = obj
        else:
            found = find_charuco(
                image, cols, rows, square_m=square_m, marker_ratio=marker_ratio, dictionary=dictionary
            )
            corners, view_obj = (None, obj) if found is None else (found[0], obj[found[1]])
        if corners is None:
            logger.info("intrinsics: no %dx%d %s in image %d; skipped", cols, rows, board, index)
            continue
        object_points.append(np.ascontiguousarray(view_obj, np.float32))
        image_points.append(corners.reshape(-1, 1, 2))
        used.append(index)
    if not used and board == "chessboard":
        other = _other_board_size(seen, cols, rows)
        if other is not None:
            (c, r), hits, tried = other
            raise BoardSizeMismatch(
                f"intrinsics: a {cols}x{rows} chessboard (inner corners) was found in none of the {n_images} images, but a "
                f"{c}x{r} one was, in {hits} of the {tried} tried: cols and rows count the inner corners (one fewer than the "
                f"squares along each side); set cols {c} and rows {r}",
                cols=c, rows=r,
            )
    if len(used) < min_views:
        raise CalibrationError(
            f"intrinsics: a {cols}x{rows} {board} (inner corners) was found in {len(used)} of {n_images} images; "
            f"need at least {min_views}: {_ADVICE_VIEWS if board == 'chessboard' else _ADVICE_CHARUCO}"
        )
    assert size is not None
    flags = DISTORTION_MODELS[distortion_model]
    criteria = (cv2.TERM_CRITERIA_COUNT + cv2.TERM_CRITERIA_EPS, 100, 1e-12)
    try:
        rms, k, dist, rvecs, _tvecs, std_in, _std_ex, per_view = cv2.calibrateCameraExtended(
            object_points, image_points, size, None, None, flags=flags, criteria=criteria
        )
    except cv2.error as exc:
        raise CalibrationError(f"intrinsics: OpenCV could not fit the camera ({exc.msg.strip()}); {_ADVICE_VIEWS}") from exc
    k = np.asarray(k, np.float64)
    dist = np.asarray(dist, np.float64).ravel()
    per_view_px = tuple(float(v) for v in np.asarray(per_view).ravel())
    result = Intrinsics(
        camera_matrix=k,
        distortion=dist,
        image_size=size,
        rms_reprojection_px=float(rms),
        per_view_rms_px=per_view_px,
        n_views=len(used),
        views_used=tuple(used),
        board={
            "kind": board, "cols": int(cols), "rows": int(rows), "square_m": float(square_m),
            **({"marker_ratio": float(marker_ratio), "dictionary": dictionary} if board == "charuco" else {}),
        },
        distortion_model=distortion_model,
        std_px=tuple(float(v) for v in np.asarray(std_in).ravel()[:4]),
    )
    _check_plausible(result, max_rms_px=max_rms_px)
    _warn_uncertain(result, _tilts_deg(rvecs))
    logger.info(
        "intrinsics: fx %.2f px, fy %.2f px, principal point (%.2f, %.2f) px (std %s px), RMS reprojection %.3f px "
        "over %d views",
        result.fx_px, result.fy_px, *result.principal_point_px, ", ".join(f"{v:.2g}" for v in result.std_px),
        result.rms_reprojection_px, result.n_views,
    )
    return result


def _check_plausible(result: Intrinsics, *, max_rms_px: float) -> None:
    """Refuse fits no real camera gives (with what to do)."""
    k = result.camera_matrix
    width, height = result.image_size
    if not (np.all(np.isfinite(k)) and np.all(np.isfinite(result.distortion))) or k[0, 0] <= 0 or k[1, 1] <= 0:
        raise CalibrationError(f"intrinsics: the fit diverged (K = {k.tolist()}); {_ADVICE_VIEWS}")
    if not math.isfinite(result.rms_reprojection_px) or result.rms_reprojection_px > max_rms_px:
        worst = sorted(zip(result.per_view_rms_px, result.views_used), reverse=True)[:3]
        worst_txt = ", ".join(f"image {i}: {e:.2f} px" for e, i in worst)
        raise CalibrationError(
            f"intrinsics: RMS reprojection error {result.rms_reprojection_px:.3g} px exceeds {max_rms_px:g} px "
            f"(worst views: {worst_txt}); check that square_m, cols and rows match the printed board and that it "
            "lies flat, drop blurred or motion-smeared images, or try another distortion_model"
        )
    cx, cy = result.principal_point_px
    if not (0 <= cx <= width - 1 and 0 <= cy <= height - 1):
        raise CalibrationError(
            f"intrinsics: the principal point ({cx:.1f}, {cy:.1f}) px lies outside the {width}x{height} image; "
            f"the views constrain it poorly: {_ADVICE_VIEWS}"
        )
    ratio = result.fx_px / result.fy_px
    if not 0.8 < ratio < 1.25:
        raise CalibrationError(
            f"intrinsics: fx / fy = {ratio:.3f} is implausible for square pixels; {_ADVICE_VIEWS}"
        )


#: warn where OpenCV's standard deviation of fx/fy exceeds this share of the value, or that of
#: cx/cy this share of the image's width/height (sharp simulated views: 0.2 % and 1 %)
MAX_FOCAL_STD_FRAC = 0.01
MAX_CENTRE_STD_FRAC = 0.03
#: boards all tilted less than this leave the focal length undetermined (Zhang's method needs
#: planes at different angles; OpenCV's standard deviations do not show it: nearly parallel
#: simulated views gave fx 36 % off with a standard deviation of 0.05 %)
MIN_MAX_TILT_DEG = 15.0


def _tilts_deg(rvecs: Any) -> list[float]:
    """Each view's angle between the board's normal and the optical axis, degrees."""
    out = []
    for rvec in rvecs:
        rotation, _ = cv2.Rodrigues(np.asarray(rvec, np.float64))
        out.append(float(np.degrees(np.arccos(min(1.0, abs(rotation[2, 2]))))))
    return out


def _warn_uncertain(result: Intrinsics, tilts_deg: list[float]) -> None:
    """A fit that passed the checks but that the views pin down poorly (boards hardly tilted,
    blurred corners): a warning naming the figures, since its reprojection error can still be small."""
    advice = "hold the board in focus, tilted by 20-45 degrees in several directions, and calibrate again"
    if tilts_deg and max(tilts_deg) < MIN_MAX_TILT_DEG:
        logger.warning("intrinsics: the board was tilted by at most %.0f degrees in %d views, which leaves the focal length "
                       "undetermined (fx %.1f px may be far off); %s", max(tilts_deg), len(tilts_deg), result.fx_px, advice)
        return
    if len(result.std_px) < 4:
        return
    sfx, sfy, scx, scy = result.std_px
    width, height = result.image_size
    focal = max(sfx / result.fx_px, sfy / result.fy_px)
    centre = max(scx / width, scy / height)
    if focal > MAX_FOCAL_STD_FRAC or centre > MAX_CENTRE_STD_FRAC:
        logger.warning(
            "intrinsics: the views pin the camera down poorly: fx %.1f +- %.1f px (%.1f %%), principal point (%.0f +- %.0f, %.0f +- %.0f) px; "
            "blurred views do this: %s",
            result.fx_px, sfx, 100 * sfx / result.fx_px, result.principal_point_px[0], scx, result.principal_point_px[1], scy, advice,
        )

