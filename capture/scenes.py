"""Virtual scenes for the simulated camera and for training-data synthesis.

A scene is what an ideal pinhole camera would see at the reference focus: a linear-light
radiance image and a z-depth map in metres, both at sensor resolution. Leaf module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from capture.errors import InputError
from capture.imageio import read_image

logger = logging.getLogger(__name__)

__all__ = ["Scene", "procedural_scene", "rgbd_scene", "texture_poor_mask", "srgb_to_linear"]


@dataclass
class Scene:
    """Radiance ``[H, W, 3]`` float32 (linear, 0..1) and depth ``[H, W]`` float32 metres.

    ``truth_valid`` ``[H, W]`` bool marks pixels whose depth is known (RGB-D sources can have
    holes, which are filled for rendering but not scored).
    """

    name: str
    radiance: np.ndarray
    depth_m: np.ndarray
    truth_valid: np.ndarray
    info: dict = field(default_factory=dict)

    @property
    def image_hw(self) -> tuple[int, int]:
        return self.depth_m.shape[0], self.depth_m.shape[1]


def srgb_to_linear(srgb: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] to linear light (float32)."""
    srgb = np.asarray(srgb, np.float32)
    return np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4).astype(np.float32)


def _fractal_noise(rng: np.random.Generator, h: int, w: int, *, cells: tuple[int, ...], falloff: float) -> np.ndarray:
    """Sum of upsampled random grids (value noise), normalised to zero mean, unit std. ``[H, W]``."""
    out = np.zeros((h, w), np.float32)
    amp = 1.0
    for cell in cells:
        gh, gw = max(2, h // cell + 2), max(2, w // cell + 2)
        grid = rng.standard_normal((gh, gw)).astype(np.float32)
        up = cv2.resize(grid, (gw * cell, gh * cell), interpolation=cv2.INTER_CUBIC)[:h, :w]
        out += amp * up
        amp *= falloff
    out -= out.mean()
    out /= max(float(out.std()), 1e-6)
    return out


def _texture(rng: np.random.Generator, h: int, w: int, base_rgb: tuple[float, float, float], *, contrast: float) -> np.ndarray:
    """A colour texture with fine and coarse detail plus sharp-edged marks. ``[H, W, 3]``."""
    noise = _fractal_noise(rng, h, w, cells=(2, 4, 8, 24, 64), falloff=1.0)
    tex = np.empty((h, w, 3), np.float32)
    for ch in range(3):
        tint = 1.0 + 0.25 * _fractal_noise(rng, h, w, cells=(48,), falloff=1.0)
        tex[..., ch] = base_rgb[ch] * tint * (1.0 + contrast * noise)
    # sharp marks: random strokes and discs, like print or paint on real objects
    n_marks = max(4, (h * w) // 900)
    for _ in range(n_marks):
        colour = tuple(float(v) for v in rng.uniform(0.03, 0.9, 3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        if rng.random() < 0.5:
            cv2.circle(tex, (x, y), int(rng.integers(1, 6)), colour, -1, lineType=cv2.LINE_AA)
        else:
            x2, y2 = x + int(rng.integers(-25, 26)), y + int(rng.integers(-25, 26))
            cv2.line(tex, (x, y), (x2, y2), colour, int(rng.integers(1, 3)), lineType=cv2.LINE_AA)
    return np.clip(tex, 0.02, 0.95)


def _sparse_marks(rng: np.random.Generator, radiance: np.ndarray, region: np.ndarray, *, count: int) -> None:
    """A few small printed marks (dots, short strokes) inside ``region``, as on a plain box."""
    ys, xs = np.nonzero(region)
    layer = radiance.copy()
    for _ in range(count):
        i = int(rng.integers(0, ys.size))
        colour = tuple(float(c) for c in rng.uniform(0.05, 0.8, 3))
        if rng.random() < 0.5:
            cv2.circle(layer, (int(xs[i]), int(ys[i])), int(rng.integers(2, 4)), colour, -1, lineType=cv2.LINE_AA)
        else:
            dx, dy = int(rng.integers(-12, 13)), int(rng.integers(-12, 13))
            cv2.line(layer, (int(xs[i]), int(ys[i])), (int(xs[i]) + dx, int(ys[i]) + dy), colour, 2, lineType=cv2.LINE_AA)
    radiance[region] = layer[region]


def procedural_scene(
    width: int = 512, height: int = 384, *, near_m: float = 0.4, far_m: float = 2.0, seed: int = 0
) -> Scene:
    """The default test scene: a tilted textured plane, objects at several depths with sharp
    depth edges, a thin pole, and texture-poor regions (a plain poster on the back plane and a
    plain box face), spanning ``near_m``..``far_m``.
    """
    if not 0 < near_m < far_m:
        raise InputError(f"scene: need 0 < near_m < far_m, got near_m={near_m}, far_m={far_m}")
    rng = np.random.default_rng(seed)
    h, w = height, width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = xx / (w - 1), yy / (h - 1)  # 0..1
    d_near, d_far = 1.0 / near_m, 1.0 / far_m
    span = d_near - d_far

    def dpt(frac: float) -> float:  # 0 = far end, 1 = near end of the range, in diopters
        return d_far + frac * span

    # back plane, tilted: inverse depth is affine in image coordinates for any plane
    depth_dpt = (dpt(0.0) + (dpt(0.18) - dpt(0.0)) * (0.65 * v + 0.35 * (1 - u))).astype(np.float32)
    radiance = _texture(rng, h, w, (0.55, 0.5, 0.42), contrast=0.35)

    # texture-poor poster on the back plane: smooth shading only
    poster = (u > 0.02) & (u < 0.47) & (v > 0.03) & (v < 0.56)
    shade = 0.45 + 0.08 * u + 0.05 * v
    radiance[poster] = np.stack([shade * 0.9, shade * 0.95, shade], axis=-1)[poster]

    # a cardboard box standing in the middle distance: faint grain and a few printed marks
    box = (u > 0.55) & (u < 0.88) & (v > 0.12) & (v < 0.55)
    depth_dpt[box] = dpt(0.33)
    radiance[box] = _texture(rng, h, w, (0.30, 0.34, 0.5), contrast=0.12)[box]
    _sparse_marks(rng, radiance, box, count=7)

    # a textured slab tilted in depth, lower left
    slab = (u > 0.08) & (u < 0.5) & (v > 0.6) & (v < 0.93)
    slab_dpt = dpt(0.45) + (dpt(0.62) - dpt(0.45)) * ((u - 0.08) / 0.42)
    depth_dpt[slab] = slab_dpt[slab]
    radiance[slab] = _texture(rng, h, w, (0.35, 0.55, 0.4), contrast=0.45)[slab]

    # a thin pole in front
    pole = (u > 0.505) & (u < 0.535) & (v > 0.0) & (v < 0.9)
    depth_dpt[pole] = dpt(0.72)
    radiance[pole] = _texture(rng, h, w, (0.7, 0.3, 0.25), contrast=0.5)[pole]

    # a dome (the nearest object), lower right
    cx, cy, rad = 0.76, 0.78, 0.17
    r2 = ((u - cx) * w / h) ** 2 + (v - cy) ** 2
    dome = r2 < rad**2
    bulge = np.sqrt(np.clip(1.0 - r2 / rad**2, 0.0, 1.0))
    dome_depth_m = (1.0 / dpt(0.8)) - (1.0 / dpt(0.8) - near_m) * bulge
    depth_dpt[dome] = (1.0 / dome_depth_m)[dome]
    radiance[dome] = _texture(rng, h, w, (0.75, 0.65, 0.3), contrast=0.5)[dome]

    depth_m = (1.0 / depth_dpt).astype(np.float32)
    return Scene(
        name=f"procedural-{seed}",
        radiance=np.ascontiguousarray(radiance, np.float32),
        depth_m=depth_m,
        truth_valid=np.ones((h, w), bool),
        info={"kind": "procedural", "seed": seed, "near_m": near_m, "far_m": far_m},
    )


def texture_poor_mask(radiance: np.ndarray, *, window_px: int = 15, threshold: float = 0.01) -> np.ndarray:
    """Pixels whose local contrast (std of the grey image in a window) is below ``threshold``.

    Args:
        radiance: ``[H, W]`` or ``[H, W, C]`` in [0, 1].
    Returns:
        bool ``[H, W]``.
    """
    grey = radiance.mean(axis=2) if radiance.ndim == 3 else radiance
    grey = grey.astype(np.float32)
    k = (window_px, window_px)
    mean = cv2.blur(grey, k)
    var = cv2.blur(grey * grey, k) - mean * mean
    return np.sqrt(np.maximum(var, 0.0)) < threshold


def _read_depth_file(path: Path, *, unit_scale: float) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot read depth ({exc})") from exc
    else:
        data = read_image(path)
        if data.ndim == 3:
            data = data[..., 0]
    return data.astype(np.float32) * np.float32(unit_scale)


def rgbd_scene(
    image_path: str | Path,
    *,
    depth_path: str | Path | None = None,
    depth_unit_m: float = 1.0,
    disparity_path: str | Path | None = None,
    disparity_divisor: float = 1.0,
    range_m: tuple[float, float] | None = None,
    width: int | None = None,
    height: int | None = None,
) -> Scene:
    """A scene from an RGB image and a depth map (metres, times ``depth_unit_m``) or a disparity
    map (stored value / ``disparity_divisor`` = pixels; 0 = unknown).

    Disparity is proportional to inverse depth, so with ``range_m = (near, far)`` disparities
    are mapped linearly onto diopters between ``1/far`` and ``1/near`` (the only metric
    information a disparity map lacks). A depth map may be rescaled the same way.
    Unknown pixels are filled from their neighbours for rendering and marked in ``truth_valid``.
    """
    image_path = Path(image_path)
    if (depth_path is None) == (disparity_path is None):
        raise InputError("scene: give exactly one of depth and disparity")
    rgb = read_image(image_path)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    rgb = rgb[..., :3]
    scale = 255.0 if rgb.dtype == np.uint8 else 65535.0
    radiance = srgb_to_linear(rgb.astype(np.float32) / scale)
    if disparity_path is not None:
        disp = _read_depth_file(Path(disparity_path), unit_scale=1.0 / disparity_divisor)
        valid = disp > 0
        inv = disp
    else:
        depth = _read_depth_file(Path(depth_path), unit_scale=depth_unit_m)  # type: ignore[arg-type]
        valid = np.isfinite(depth) & (depth > 0)
        inv = np.where(valid, 1.0 / np.where(valid, depth, 1.0), 0.0).astype(np.float32)
    src = Path(disparity_path or depth_path)  # type: ignore[arg-type]
    if inv.shape != radiance.shape[:2]:
        raise InputError(f"{src}: size {inv.shape[::-1]} differs from the image {image_path} {radiance.shape[1::-1]}")
    if valid.mean() < 0.5:
        raise InputError(f"{src}: fewer than half of the pixels have a depth")
    if range_m is not None:
        near, far = range_m
        lo, hi = np.percentile(inv[valid], [0.5, 99.5])
        inv = np.where(valid, 1.0 / far + (inv - lo) / max(hi - lo, 1e-9) * (1.0 / near - 1.0 / far), 0.0)
        inv = np.clip(inv, 1.0 / far, 1.0 / near).astype(np.float32)
    elif disparity_path is not None:
        raise InputError("scene: a disparity map needs range_m to become metric")
    # fill holes from neighbours (rendering needs a depth everywhere)
    holes = (~valid).astype(np.uint8)
    if holes.any():
        inv = cv2.inpaint(inv.astype(np.float32), holes, 5, cv2.INPAINT_NS)
    if width is not None and height is not None and (width, height) != (radiance.shape[1], radiance.shape[0]):
        radiance = cv2.resize(radiance, (width, height), interpolation=cv2.INTER_AREA)
        inv = cv2.resize(inv, (width, height), interpolation=cv2.INTER_NEAREST)
        valid = cv2.resize(valid.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
    depth_m = (1.0 / np.maximum(inv, 1e-6)).astype(np.float32)
    return Scene(
        name=image_path.parent.name or image_path.stem,
        radiance=np.ascontiguousarray(radiance, np.float32),
        depth_m=depth_m,
        truth_valid=valid,
        info={"kind": "rgbd", "image": str(image_path), "depth_source": str(src)},
    )
