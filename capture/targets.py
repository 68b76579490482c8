"""Calibration targets the simulated camera can show: a textured plane and a posed chessboard.

Both are :class:`capture.scenes.Scene` objects with the usual conventions (linear radiance
``[H, W, 3]`` float32 in [0, 1], z-depth ``[H, W]`` float32 metres, both in *image space*,
i.e. what an ideal pinhole camera sees), so a :class:`capture.simulated.SimulatedCamera` can
render them with defocus, focus breathing and noise like any other scene.

The simulator's pinhole
-----------------------
The simulator never projects 3-D points itself: a scene is already an image. The projection
it stands for is that of the thin lens's chief rays: a ray through the lens centre goes on
undeviated and meets the sensor, which sits ``v = ThinLens.sensor_distance_m`` behind the
lens; the blur disc of a defocused point is centred on that chief ray. So the image-side
focal length is ``v``, not the lens's focal length ``f`` (they agree only with the sensor at
``f``, i.e. ``base_focus_m = inf``), and in pixels it is ``ThinLens.focal_length_px = v /
pitch``. A liquid lens changes the power, not ``v``, so this pinhole does not move with focus.
What does change it is the simulated focus *breathing*: the rendered image is scaled about
the image centre by ``breathing_scale(D_f)``, so the camera the simulator really is at focus
``D_f`` has ``fx = fy = ThinLens.focal_length_px * breathing_scale(D_f)`` (equal to
``focal_length_px`` at the breathing reference focus). The principal point is the image
centre ``((w - 1) / 2, (h - 1) / 2)`` (pixel centres at integer coordinates, OpenCV's
convention), and the camera has no distortion.

:func:`chessboard_scene` renders a board through exactly that pinhole
(:func:`pinhole_camera_matrix`), so a camera calibration of the rendered images must recover it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import cv2
import numpy as np

from capture.errors import InputError
from capture.optics import ThinLens
from capture.scenes import Scene

logger = logging.getLogger(__name__)

__all__ = [
    "BACKGROUNDS",
    "DEFAULT_FOCAL_LENGTH_PX",
    "PATTERNS",
    "TEXTURES",
    "BoardPose",
    "board_corners_px",
    "board_poses",
    "board_rotation",
    "charuco_board",
    "chessboard_scene",
    "pinhole_camera_matrix",
    "planar_target_scene",
]

#: configs/sim.yaml's optics (12 mm, 7 um pixels, sensor at f): the simulator's default pinhole
DEFAULT_FOCAL_LENGTH_PX: float = ThinLens(focal_length_mm=12.0, f_number=2.0, pixel_pitch_um=7.0).focal_length_px

#: textures of :func:`planar_target_scene`
TEXTURES = ("random", "dead_leaves")
#: backgrounds and patterns of :func:`chessboard_scene`
BACKGROUNDS = ("grey", "texture")
PATTERNS = ("chessboard", "charuco")

_BLACK = 0.04  # linear radiance of printed black and of white paper
_WHITE = 0.85


def pinhole_camera_matrix(width: int, height: int, focal_length_px: float) -> np.ndarray:
    """The simulator's camera matrix ``K`` ``[3, 3]`` float64: ``fx = fy = focal_length_px``,
    principal point at the image centre ``((w - 1) / 2, (h - 1) / 2)``."""
    if not focal_length_px > 0:
        raise InputError(f"target: focal_length_px must be > 0, got {focal_length_px}")
    return np.array(
        [[focal_length_px, 0.0, (width - 1) / 2.0], [0.0, focal_length_px, (height - 1) / 2.0], [0.0, 0.0, 1.0]],
        np.float64,
    )


# --------------------------------------------------------------------------------------------
# textured plane
# --------------------------------------------------------------------------------------------


def _check_size(width: int, height: int) -> None:
    if width < 16 or height < 16:
        raise InputError(f"target: image size must be at least 16x16, got {width}x{height}")


def _multiscale_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """High-contrast blobs and edges at octave scales 2..128 px, in [0, 1]. ``[H, W]``."""
    out = np.zeros((h, w), np.float32)
    for cell in (2, 4, 8, 16, 32, 64, 128):
        gh, gw = h // cell + 3, w // cell + 3
        grid = rng.standard_normal((gh, gw)).astype(np.float32)
        up = cv2.resize(grid, (gw * cell, gh * cell), interpolation=cv2.INTER_CUBIC)
        oy, ox = int(rng.integers(0, cell)), int(rng.integers(0, cell))
        out += up[oy : oy + h, ox : ox + w]
    out -= out.mean()
    out /= max(float(out.std()), 1e-6)
    # a soft threshold: mostly near-black or near-white, with steep transitions (strong edges)
    return (0.5 + 0.5 * np.tanh(2.5 * out)).astype(np.float32)


def _dead_leaves_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Occluding discs with radii ~ r^-3 between 1 and ~h/6 px (scale-invariant), in [0, 1]. ``[H, W]``."""
    r_min, r_max = 1.0, max(4.0, min(h, w) / 6.0)
    # enough discs to cover the image several times over
    mean_area = 2.0 * math.pi * r_min**2 * math.log(r_max / r_min) / (1.0 - (r_min / r_max) ** 2)
    count = int(4.0 * h * w / mean_area) + 50
    u = rng.random(count)
    radii = r_min / np.sqrt(1.0 - u * (1.0 - (r_min / r_max) ** 2))  # p(r) ~ r^-3 on [r_min, r_max]
    tex = np.full((h, w), 0.5, np.float32)
    xs = rng.uniform(-r_max, w + r_max, count)
    ys = rng.uniform(-r_max, h + r_max, count)
    levels = rng.choice(np.array([0.0, 0.15, 0.3, 0.7, 0.85, 1.0], np.float32), count)
    shift = 4  # sub-pixel centres and radii
    for x, y, r, g in zip(xs, ys, radii, levels):
        cv2.circle(tex, (int(x * 2**shift), int(y * 2**shift)), int(r * 2**shift), float(g), -1, cv2.LINE_AA, shift)
    return tex


def planar_target_scene(
    width: int, height: int, *, distance_m: float, seed: int = 0, texture: str = "random"
) -> Scene:
    """A fronto-parallel, textured plane filling the view at ``distance_m``.

    The target for focus-distance and breathing calibration: high contrast, with texture at
    every scale from 2 px to about a quarter of the image everywhere (so the image centre, and
    any window, has a clear sharpness peak when the lens is focused at ``distance_m``). The
    texture is defined in image space, with statistics that do not depend on scale, so the
    sharpness curves at different distances have the same shape.

    Args:
        width, height: image size in pixels.
        distance_m: z-depth of the plane, metres (> 0).
        seed: the texture's random seed (the same seed, the same printed target).
        texture: ``random`` (multi-scale blobs, soft-thresholded to near black / white) or
            ``dead_leaves`` (occluding discs with a scale-invariant size distribution).

    Returns:
        a Scene: radiance ``[H, W, 3]`` (grey, 0.04..0.85), depth ``[H, W]`` = ``distance_m``.
    """
    _check_size(width, height)
    if not (distance_m > 0 and math.isfinite(distance_m)):
        raise InputError(f"target: distance_m must be finite and > 0, got {distance_m}")
    if texture not in TEXTURES:
        raise InputError(f"target: texture {texture!r} unknown; valid: {', '.join(TEXTURES)}")
    rng = np.random.default_rng(seed)
    tex = _multiscale_texture(rng, height, width) if texture == "random" else _dead_leaves_texture(rng, height, width)
    grey = _BLACK + (_WHITE - _BLACK) * np.clip(tex, 0.0, 1.0)
    radiance = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    return Scene(
        name=f"planar-target-{texture}-{seed}",
        radiance=np.ascontiguousarray(radiance),
        depth_m=np.full((height, width), distance_m, np.float32),
        truth_valid=np.ones((height, width), bool),
        info={"kind": "planar_target", "texture": texture, "seed": seed, "distance_m": float(distance_m)},
    )


# --------------------------------------------------------------------------------------------
# chessboard
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BoardPose:
    """Where a board is: rotation (degrees about the camera's x, y, z axes, applied x first;
    right-handed with x right, y down, z forward, so a positive y angle turns the board's right
    edge toward the camera and a positive x angle its bottom edge away), the board centre's
    lateral offset (metres, x right, y down) and its z-distance (metres)."""

    rotation_deg: tuple[float, float, float]
    offset_m: tuple[float, float]
    distance_m: float

    def as_kwargs(self) -> dict:
        """Keyword arguments for :func:`chessboard_scene`."""
        return {"rotation_deg": self.rotation_deg, "offset_m": self.offset_m, "distance_m": self.distance_m}


def board_rotation(rotation_deg: tuple[float, float, float]) -> np.ndarray:
    """Rotation matrix ``[3, 3]`` ``Rz @ Ry @ Rx`` for angles in degrees (board -> camera)."""
    rx, ry, rz = (math.radians(float(a)) for a in rotation_deg)
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    r_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], np.float64)
    r_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], np.float64)
    r_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], np.float64)
    return r_z @ r_y @ r_x


def _board_extent_m(cols: int, rows: int, square_m: float, margin_squares: float) -> tuple[float, float]:
    """Width and height of the printed board (squares plus white margin), metres."""
    return (cols + 1 + 2 * margin_squares) * square_m, (rows + 1 + 2 * margin_squares) * square_m


def _project(points_board_m: np.ndarray, rotation: np.ndarray, translation_m: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Board-plane points ``[N, 2]`` (metres, centre origin) to pixels ``[N, 2]``; NaN behind the camera."""
    pts = np.column_stack([points_board_m, np.zeros(len(points_board_m))])
    cam = pts @ rotation.T + translation_m
    z = cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = (cam @ k.T)[:, :2] / z[:, None]
    uv[z <= 1e-9] = np.nan
    return uv


def board_corners_px(
    width: int,
    height: int,
    *,
    distance_m: float,
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0),
    offset_m: tuple[float, float] = (0.0, 0.0),
    cols: int = 9,
    rows: int = 6,
    square_m: float = 0.02,
    focal_length_px: float = DEFAULT_FOCAL_LENGTH_PX,
) -> np.ndarray:
    """True image positions of the board's inner corners, ``[rows * cols, 2]`` float64 pixels,
    row by row (x fastest) from the board's top-left inner corner."""
    k = pinhole_camera_matrix(width, height, focal_length_px)
    gx, gy = np.meshgrid(np.arange(cols), np.arange(rows))
    pts = np.column_stack([(gx.ravel() - (cols - 1) / 2.0) * square_m, (gy.ravel() - (rows - 1) / 2.0) * square_m])
    t = np.array([offset_m[0], offset_m[1], distance_m], np.float64)
    return _project(pts, board_rotation(rotation_deg), t, k)


def charuco_board(
    cols: int, rows: int, square_m: float, *, marker_ratio: float = 0.7, dictionary: str = "DICT_5X5_100"
) -> cv2.aruco.CharucoBoard:
    """The OpenCV ChArUco board with ``cols x rows`` inner corners (``(cols + 1) x (rows + 1)``
    squares, top-left black) and ArUco markers of ``marker_ratio * square_m`` from the named
    predefined dictionary (``cv2.aruco.DICT_...``). Its corner ``i`` lies at
    ``((i % cols + 1) * square_m, (i // cols + 1) * square_m)`` on the board."""
    if not 0.2 <= marker_ratio <= 0.9:
        raise InputError(f"target: marker_ratio must be within 0.2..0.9, got {marker_ratio}")
    dict_id = getattr(cv2.aruco, dictionary, None) if dictionary.startswith("DICT_") else None
    if not isinstance(dict_id, int):
        raise InputError(f"target: unknown ArUco dictionary {dictionary!r} (expected a cv2.aruco.DICT_... name)")
    vocabulary = cv2.aruco.getPredefinedDictionary(dict_id)
    n_markers = ((cols + 1) * (rows + 1)) // 2
    if n_markers > vocabulary.bytesList.shape[0]:
        raise InputError(f"target: a {cols}x{rows} ChArUco board needs {n_markers} markers; {dictionary} has fewer")
    return cv2.aruco.CharucoBoard((cols + 1, rows + 1), float(square_m), float(marker_ratio * square_m), vocabulary)


def _board_texture(cols: int, rows: int, px_per_square: int, margin_px: int) -> np.ndarray:
    """The printed board: ``(cols + 1) x (rows + 1)`` squares (top-left black) in a white
    margin. float32 ``[Ht, Wt]`` radiance."""
    sq_h, sq_w = (rows + 1) * px_per_square, (cols + 1) * px_per_square
    yy, xx = np.mgrid[0:sq_h, 0:sq_w]
    black = ((yy // px_per_square + xx // px_per_square) % 2) == 0
    tex = np.full((sq_h + 2 * margin_px, sq_w + 2 * margin_px), _WHITE, np.float32)
    tex[margin_px : margin_px + sq_h, margin_px : margin_px + sq_w][black] = _BLACK
    return tex


def chessboard_scene(
    width: int,
    height: int,
    *,
    distance_m: float,
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0),
    offset_m: tuple[float, float] = (0.0, 0.0),
    cols: int = 9,
    rows: int = 6,
    square_m: float = 0.02,
    focal_length_px: float = DEFAULT_FOCAL_LENGTH_PX,
    background: str = "grey",
    background_m: float | None = None,
    margin_squares: float = 1.0,
    supersample: int = 5,
    seed: int = 0,
    pattern: str = "chessboard",
    marker_ratio: float = 0.7,
    dictionary: str = "DICT_5X5_100",
) -> Scene:
    """A flat chessboard (or ChArUco board) in a given pose, seen through the simulator's pinhole.

    The board has ``cols x rows`` *inner* corners (OpenCV's pattern size), i.e.
    ``(cols + 1) x (rows + 1)`` squares of ``square_m``, in a white margin of
    ``margin_squares`` squares. With ``pattern="charuco"`` the white squares carry ArUco
    markers (:func:`charuco_board`: side ``marker_ratio * square_m`` from ``dictionary``),
    which lets a detector use a board that is only partly in view. Its centre sits at ``(offset_m[0], offset_m[1], distance_m)``
    in camera coordinates (x right, y down, z forward), rotated by ``rotation_deg`` (see
    :func:`board_rotation`). It is rendered by projecting the board plane through ``K`` =
    :func:`pinhole_camera_matrix`: a homography applied to the board texture
    (``cv2.warpPerspective``, nearest texel, on a ``supersample`` times finer grid, then
    area-averaged: anti-aliased edges with exact geometry). Depth comes from the plane
    equation; behind the board lies a fronto-parallel background plane at ``background_m``
    (default four times ``distance_m``).

    Args:
        width, height: image size in pixels.
        background: ``grey`` (plain mid grey) or ``texture`` (a low-contrast texture).
        seed: seed of the background texture.

    Returns:
        a Scene; ``info`` holds ``camera_matrix`` (``K`` as nested lists), ``corners_px``
        (the true inner-corner positions ``[rows * cols, 2]``, as from
        :func:`board_corners_px`), the pose and the board geometry.
    """
    _check_size(width, height)
    if cols < 2 or rows < 2:
        raise InputError(f"target: a chessboard needs at least 2x2 inner corners, got {cols}x{rows}")
    if not (square_m > 0 and distance_m > 0 and math.isfinite(distance_m)):
        raise InputError(f"target: need square_m > 0 and a finite distance_m > 0, got {square_m}, {distance_m}")
    if background not in BACKGROUNDS:
        raise InputError(f"target: background {background!r} unknown; valid: {', '.join(BACKGROUNDS)}")
    if supersample < 1:
        raise InputError(f"target: supersample must be >= 1, got {supersample}")
    if pattern not in PATTERNS:
        raise InputError(f"target: pattern {pattern!r} unknown; valid: {', '.join(PATTERNS)}")
    background_m = 4.0 * distance_m if background_m is None else float(background_m)
    k = pinhole_camera_matrix(width, height, focal_length_px)
    rotation = board_rotation(rotation_deg)
    t = np.array([offset_m[0], offset_m[1], distance_m], np.float64)
    normal = rotation[:, 2]
    if float(normal @ t) <= 0 or abs(float(normal @ t)) < 1e-9:
        raise InputError("target: the board plane passes through the camera")
    board_w_m, board_h_m = _board_extent_m(cols, rows, square_m, margin_squares)

    # texture: integer texels per square, so square edges fall on texel boundaries exactly
    px_per_square = 40
    margin_px = round(margin_squares * px_per_square)
    if pattern == "chessboard":
        tex = _board_texture(cols, rows, px_per_square, margin_px)
    else:
        board = charuco_board(cols, rows, square_m, marker_ratio=marker_ratio, dictionary=dictionary)
        size = ((cols + 1) * px_per_square + 2 * margin_px, (rows + 1) * px_per_square + 2 * margin_px)
        printed = board.generateImage(size, marginSize=margin_px, borderBits=1).astype(np.float32) / 255.0
        tex = (_BLACK + (_WHITE - _BLACK) * printed).astype(np.float32)
    texel_m = square_m / px_per_square
    tex_w_m, tex_h_m = tex.shape[1] * texel_m, tex.shape[0] * texel_m
    # texel (a, b) centre -> board plane (metres, origin at the board centre)
    s = np.array([[texel_m, 0.0, 0.5 * texel_m - tex_w_m / 2], [0.0, texel_m, 0.5 * texel_m - tex_h_m / 2], [0, 0, 1]])
    plane_to_image = k @ np.column_stack([rotation[:, 0], rotation[:, 1], t])
    ss = int(supersample)
    # image pixel u -> supersampled pixel ss * u + (ss - 1) / 2 (block centres)
    to_fine = np.array([[ss, 0.0, (ss - 1) / 2.0], [0.0, ss, (ss - 1) / 2.0], [0, 0, 1]])
    homography = to_fine @ plane_to_image @ s
    planes = np.dstack([tex, np.ones_like(tex)])  # radiance, coverage
    fine = cv2.warpPerspective(
        planes, homography, (width * ss, height * ss), flags=cv2.INTER_NEAREST,
        borderMode=cv2.BORDER_CONSTANT, borderValue=(0.0, 0.0, 0.0, 0.0),
    )
    coarse = cv2.resize(fine, (width, height), interpolation=cv2.INTER_AREA) if ss > 1 else fine
    board_rad, coverage = coarse[..., 0], np.clip(coarse[..., 1], 0.0, 1.0)

    if background == "grey":
        back = np.full((height, width), 0.25, np.float32)
    else:
        noise = _multiscale_texture(np.random.default_rng(seed), height, width)
        back = (0.18 + 0.14 * noise).astype(np.float32)
    grey = board_rad + (1.0 - coverage) * back  # board_rad is premultiplied by its coverage
    radiance = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)

    # depth: the z at which each pixel's ray meets the board plane n . X = n . t
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    rays = np.stack([(xx - k[0, 2]) / k[0, 0], (yy - k[1, 2]) / k[1, 1], np.ones_like(xx)], axis=-1)
    denom = rays @ normal
    with np.errstate(divide="ignore", invalid="ignore"):
        board_z = float(normal @ t) / denom
    on_board = (coverage >= 0.5) & np.isfinite(board_z) & (board_z > 0)
    depth = np.where(on_board, board_z, background_m).astype(np.float32)
    if float(depth[on_board].max(initial=0.0)) >= background_m:
        logger.warning("chessboard: parts of the board lie beyond the background plane at %.3g m", background_m)

    corners = board_corners_px(
        width, height, distance_m=distance_m, rotation_deg=rotation_deg, offset_m=offset_m, cols=cols, rows=rows,
        square_m=square_m, focal_length_px=focal_length_px,
    )
    return Scene(
        name=f"{pattern}-{cols}x{rows}",
        radiance=np.ascontiguousarray(radiance),
        depth_m=depth,
        truth_valid=np.ones((height, width), bool),
        info={
            "kind": pattern,
            "cols": cols,
            "rows": rows,
            "square_m": float(square_m),
            "distance_m": float(distance_m),
            "rotation_deg": [float(a) for a in rotation_deg],
            "offset_m": [float(a) for a in offset_m],
            "background_m": background_m,
            "focal_length_px": float(focal_length_px),
            **({"marker_ratio": float(marker_ratio), "dictionary": dictionary} if pattern == "charuco" else {}),
            "camera_matrix": k.tolist(),
            "corners_px": corners.tolist(),
            "board_fully_in_view": bool(_outline_in_view(plane_to_image, board_w_m, board_h_m, width, height, 0.0)),
        },
    )


def _outline_in_view(
    plane_to_image: np.ndarray, board_w_m: float, board_h_m: float, width: int, height: int, margin_px: float
) -> bool:
    """Whether the board's four outer corners project in front of the camera and at least
    ``margin_px`` inside the image."""
    hw, hh = board_w_m / 2.0, board_h_m / 2.0
    outline = np.array([[-hw, -hh, 1.0], [hw, -hh, 1.0], [hw, hh, 1.0], [-hw, hh, 1.0]])
    p = outline @ plane_to_image.T
    if np.any(p[:, 2] <= 1e-9):
        return False
    uv = p[:, :2] / p[:, 2:3]
    return bool(
        np.all(uv[:, 0] >= margin_px) and np.all(uv[:, 0] <= width - 1 - margin_px)
        and np.all(uv[:, 1] >= margin_px) and np.all(uv[:, 1] <= height - 1 - margin_px)
    )


def board_poses(
    n: int,
    *,
    width: int,
    height: int,
    focal_length_px: float = DEFAULT_FOCAL_LENGTH_PX,
    cols: int = 9,
    rows: int = 6,
    square_m: float = 0.02,
    max_tilt_deg: float = 35.0,
    max_roll_deg: float = 20.0,
    fill: tuple[float, float] = (0.45, 0.7),
    margin_px: float = 8.0,
    margin_squares: float = 1.0,
    seed: int = 0,
) -> list[BoardPose]:
    """``n`` varied board poses that keep the whole board (with its white margin) in view.

    Views alternate between tilts mostly about the vertical axis and mostly about the
    horizontal one (both up to ``max_tilt_deg``, never both small: fronto-parallel views say
    nothing about the focal length), with a roll up to ``max_roll_deg``; the distance makes
    the untilted board span a fraction ``fill`` of the image width, and the board centre is
    shifted at random within the room left. Deterministic for a given ``seed``.

    Raises:
        InputError: no pose keeps the board in view (the board is too large for ``fill``).
    """
    if n < 1:
        raise InputError(f"target: n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    k = pinhole_camera_matrix(width, height, focal_length_px)
    board_w_m, board_h_m = _board_extent_m(cols, rows, square_m, margin_squares)
    poses: list[BoardPose] = []
    for i in range(n):
        for _attempt in range(200):
            main_tilt = float(rng.uniform(0.45, 1.0) * max_tilt_deg * rng.choice([-1.0, 1.0]))
            side_tilt = float(rng.uniform(-0.4, 0.4) * max_tilt_deg)
            rx, ry = (side_tilt, main_tilt) if i % 2 == 0 else (main_tilt, side_tilt)
            rz = float(rng.uniform(-max_roll_deg, max_roll_deg))
            frac = float(rng.uniform(*fill))
            z = focal_length_px * board_w_m / (frac * width)
            # lateral room for the board centre at this distance, then a random share of it
            room_x = max(0.0, (width / 2.0 - frac * width / 2.0) * z / focal_length_px)
            room_y = max(0.0, (height / 2.0 - frac * width * board_h_m / board_w_m / 2.0) * z / focal_length_px)
            tx, ty = float(rng.uniform(-room_x, room_x)), float(rng.uniform(-room_y, room_y))
            rotation = board_rotation((rx, ry, rz))
            plane_to_image = k @ np.column_stack([rotation[:, 0], rotation[:, 1], [tx, ty, z]])
            if _outline_in_view(plane_to_image, board_w_m, board_h_m, width, height, margin_px):
                poses.append(BoardPose(rotation_deg=(rx, ry, rz), offset_m=(tx, ty), distance_m=z))
                break
        else:
            raise InputError(
                f"target: no pose keeps a {board_w_m:.3g} x {board_h_m:.3g} m board in a {width}x{height} view at "
                f"fill {fill}; use a smaller fill or max_tilt_deg"
            )
    return poses
