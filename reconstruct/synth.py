"""Training and evaluation stacks synthesised with the project's own image formation
(``capture.optics``) from RGB-D sources (Middlebury layout) and procedural scenes.

Defocus is linear in inverse depth, and disparity is proportional to inverse depth, so a
disparity map serves directly as the "diopter" axis: the blur of a point at disparity ``d``
in a slice focused at ``f`` is ``k * |f - d|`` pixels. Nothing needs metric calibration; the
network sees normalised focus positions and predicts normalised inverse depth.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from capture.errors import InputError
from capture.imageio import read_image
from capture.optics import LayeredScene
from capture.scenes import procedural_scene, srgb_to_linear

logger = logging.getLogger(__name__)

__all__ = ["RgbdSource", "load_middlebury", "SynthRanges", "render_item", "render_eval_stack", "render_calibration_stack", "REPORT_SCENES"]

#: the report split: never trained or tuned on
REPORT_SCENES = ("Art", "Books", "Dolls", "Laundry", "Moebius", "Reindeer")


@dataclass
class RgbdSource:
    """A scene: linear RGB ``[H, W, 3]`` float32, disparity ``[H, W]`` float32 (holes filled),
    and ``known`` ``[H, W]`` bool (where the disparity is ground truth)."""

    name: str
    rgb: np.ndarray
    disparity: np.ndarray
    known: np.ndarray


def load_middlebury(root: str | Path, *, names: list[str] | None = None, exclude: tuple[str, ...] = ()) -> list[RgbdSource]:
    """Scenes of a Middlebury-layout folder (``manifest.csv``: scene, rgb, gt_disparity,
    gt_scale, unknown_value). Disparity = stored value / gt_scale."""
    root = Path(root)
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise InputError(f"{manifest}: not found (expected a Middlebury-layout folder)")
    out = []
    try:
        # utf-8-sig: a spreadsheet's "CSV UTF-8" starts with a byte-order mark (it hid the first column)
        with manifest.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{manifest}: unreadable ({exc})") from exc
    columns = {"scene", "rgb", "gt_disparity", "gt_scale"} - set(reader.fieldnames or ())
    if columns:
        raise InputError(f"{manifest}: no {', '.join(sorted(columns))} column (expected a Middlebury-layout manifest)")
    seen: set[str] = set()
    excluded = {e.lower() for e in exclude}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{manifest}: line {line}"
        short = [k for k in ("scene", "rgb", "gt_disparity", "gt_scale") if row.get(k) in (None, "")]
        if short:
            raise InputError(f"{where}: {', '.join(short)}: empty or missing (a row has scene, rgb, gt_disparity, gt_scale[, unknown_value])")
        name = row["scene"].strip()
        if name in seen:
            raise InputError(f"{where}: scene {name!r} is listed twice")
        seen.add(name)
        # excluded scenes are matched ignoring case: a manifest saying 'art' must not leak the report scene Art
        if (names is not None and name not in names) or name.lower() in excluded:
            continue
        out.append(_load_row(root, row, name, where))
    if names is not None:
        missing = set(names) - {s.name for s in out}
        if missing:
            raise InputError(f"{manifest}: scenes not found: {', '.join(sorted(missing))}")
    return out


def _load_row(root: Path, row: dict[str, str], name: str, where: str) -> RgbdSource:
    """One manifest row as an :class:`RgbdSource`; InputError naming the row and what is wrong
    (never a scene whose truth does not line up with its image, or that has none)."""
    try:
        scale = float(row["gt_scale"])
    except ValueError:
        scale = float("nan")
    if not (math.isfinite(scale) and scale > 0):
        raise InputError(f"{where}: gt_scale: expected a positive number (disparity = stored value / gt_scale), got {row['gt_scale']!r}")
    unknown_text = (row.get("unknown_value") or "").strip()
    try:  # 'none' (as the Middlebury manifest writes it), 'null' or empty: no marker (0 is unknown anyway)
        unknown = None if unknown_text.lower() in ("", "none", "null") else float(unknown_text)
    except ValueError:
        raise InputError(f"{where}: unknown_value: expected the number stored where the truth is unknown (or none), got {unknown_text!r}") from None
    rgb_path, disp_path = root / row["rgb"], root / row["gt_disparity"]
    rgb = read_image(rgb_path)
    raw = read_image(disp_path)
    if raw.ndim == 3:
        raw = raw[..., 0]
    if rgb.shape[:2] != raw.shape:
        raise InputError(f"{where}: scene {name!r}: {rgb_path.name} is {rgb.shape[1]}x{rgb.shape[0]} px but {disp_path.name} is "
                         f"{raw.shape[1]}x{raw.shape[0]} (width x height): the truth must line up with the image pixel for pixel")
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    disp = raw.astype(np.float32) / scale
    known = np.ones(raw.shape, bool) if unknown is None else raw.astype(np.float64) != unknown
    known &= disp > 0
    if not known.any():
        raise InputError(f"{where}: scene {name!r}: {disp_path.name} has no known disparity (every pixel is 0"
                         f"{'' if unknown is None else f' or unknown_value {unknown_text}'}); remove the row or fix the file")
    filled = disp.copy()
    if (~known).any():
        filled = cv2.inpaint(disp, (~known).astype(np.uint8), 5, cv2.INPAINT_NS)
    full_scale = 65535.0 if rgb.dtype == np.uint16 else 255.0  # a 16-bit image read as 8-bit was 257x too bright
    return RgbdSource(name, srgb_to_linear(rgb[..., :3].astype(np.float32) / full_scale), np.maximum(filled, 0.1), known)


@dataclass(frozen=True)
class SynthRanges:
    """What real rigs vary, and by how much."""

    slices: tuple[int, int] = (3, 12)
    crop_px: tuple[int, ...] = (96, 112, 128)
    scale: tuple[float, float] = (0.45, 1.0)  # resize of the source before cropping
    max_blur_px: tuple[float, float] = (6.0, 20.0)  # blur diameter across the focus range
    span_whole_range: float = 0.6  # share of stacks whose focus spans the scene's 1-99 % range
    jitter_step: float = 0.15  # focus jitter, in steps
    noise_sigma: tuple[float, float] = (0.0, 0.02)
    gamma: tuple[float, float] = (1.0, 2.2)
    jpeg_share: float = 0.25
    jpeg_quality: tuple[int, int] = (70, 95)
    grey_share: float = 0.3
    breathing: float = 0.01  # |relative scale change| over the stack, at most
    misalign_px: float = 0.5
    procedural_share: float = 0.25


def _crop_source(rng: np.random.Generator, src: RgbdSource, size: int, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    h, w = src.disparity.shape
    scale = max(scale, size / h, size / w)  # one factor for both axes: a crop larger than the scaled image keeps the aspect
    sh, sw = max(size, int(round(h * scale))), max(size, int(round(w * scale)))
    rgb = cv2.resize(src.rgb, (sw, sh), interpolation=cv2.INTER_AREA)
    disp = cv2.resize(src.disparity, (sw, sh), interpolation=cv2.INTER_NEAREST) * (sw / w)
    known = cv2.resize(src.known.astype(np.uint8), (sw, sh), interpolation=cv2.INTER_NEAREST) > 0
    y = int(rng.integers(0, sh - size + 1))
    x = int(rng.integers(0, sw - size + 1))
    sl = (slice(y, y + size), slice(x, x + size))
    return rgb[sl], disp[sl], known[sl]


def _render_slices(
    rgb: np.ndarray, disp: np.ndarray, focus: np.ndarray, k_px: float, *, rng: np.random.Generator | None, ranges: SynthRanges | None,
    noise_sigma: float, gamma: float, grey: bool, jpeg_quality: int | None,
) -> np.ndarray:
    """Render, degrade and quantise slices: uint8 ``[N, H, W, 3]``."""
    # layers 0.6 px of blur apart; hidden surfaces continued as far as the largest blur reaches
    reach_px = k_px * float(max(disp.max(), focus.max()) - min(disp.min(), focus.min()))
    layered = LayeredScene(rgb, (1.0 / disp).astype(np.float32), max_layer_dpt=0.6 / max(k_px, 1e-6),
                           occlusion_margin_px=int(math.ceil(reach_px / 2)) + 2)
    n = len(focus)
    h, w = disp.shape
    out = np.empty((n, h, w, 3), np.uint8)
    noise_rng = rng if rng is not None else np.random.default_rng(0)
    breath = 0.0 if ranges is None else float(noise_rng.uniform(-ranges.breathing, ranges.breathing))
    for i, f in enumerate(focus):
        img = layered.render(float(f), blur_px_per_dpt=k_px)
        if ranges is not None and (breath != 0.0 or ranges.misalign_px > 0):
            pos = i / max(n - 1, 1) - 0.5
            s = 1.0 + breath * pos
            tx, ty = noise_rng.uniform(-ranges.misalign_px, ranges.misalign_px, 2)
            cx, cy = (w - 1) / 2, (h - 1) / 2
            m = np.array([[s, 0, cx * (1 - s) + tx], [0, s, cy * (1 - s) + ty]], np.float32)
            img = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        img = np.clip(img, 0, 1) ** (1.0 / gamma)
        if grey:  # a grey sensor: one channel through noise and JPEG, repeated at the end (R = G = B)
            img = img @ np.array([0.299, 0.587, 0.114], np.float32)
        if noise_sigma > 0:
            img = img + noise_rng.normal(0, noise_sigma, img.shape).astype(np.float32)
        u8 = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
        if jpeg_quality is not None:
            ok, buf = cv2.imencode(".jpg", u8, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
            u8 = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE if grey else cv2.IMREAD_COLOR)
        out[i] = u8[..., None] if grey else u8
    return out


def render_item(rng: np.random.Generator, sources: list[RgbdSource], ranges: SynthRanges = SynthRanges()) -> dict[str, np.ndarray]:
    """One randomised training stack.

    Returns:
        ``stack`` uint8 ``[N, S, S, 3]`` (slices in random order), ``focus`` float32 ``[N]``
        (disparity units), ``target`` float32 ``[S, S]`` normalised inverse depth over the
        focus range, ``mask`` bool ``[S, S]`` (known truth inside the focus range).
    """
    size = int(rng.choice(ranges.crop_px))
    if not sources or rng.random() < ranges.procedural_share:
        scene = procedural_scene(size + 32, size + 32, near_m=float(rng.uniform(0.25, 0.6)), far_m=float(rng.uniform(1.0, 4.0)), seed=int(rng.integers(1 << 30)))
        y, x = rng.integers(0, 33, 2)
        rgb = scene.radiance[y : y + size, x : x + size]
        disp = (1.0 / scene.depth_m[y : y + size, x : x + size]).astype(np.float32)
        known = np.ones_like(disp, bool)
    else:
        src = sources[int(rng.integers(len(sources)))]
        rgb, disp, known = _crop_source(rng, src, size, float(rng.uniform(*ranges.scale)))
    valid = disp[known]
    lo, hi = np.percentile(valid if valid.size > 16 else disp, [1, 99])
    # a nearly flat crop still gets a sweep of sensible depth (at least 5 % of its disparity)
    min_span = max(0.05 * float(np.median(disp)), 0.5)
    if hi - lo < min_span:
        mid = 0.5 * (lo + hi)
        lo, hi = mid - 0.5 * min_span, mid + 0.5 * min_span
    n = int(rng.integers(ranges.slices[0], ranges.slices[1] + 1))
    if rng.random() >= ranges.span_whole_range:  # a sweep that does not match the scene
        span = hi - lo
        lo, hi = lo + span * rng.uniform(-0.2, 0.35), hi - span * rng.uniform(-0.2, 0.35)
        if hi - lo < 0.2 * span:
            lo, hi = lo - 0.1 * span, hi + 0.1 * span
    step = (hi - lo) / (n - 1)
    focus = np.linspace(lo, hi, n) + rng.uniform(-ranges.jitter_step, ranges.jitter_step, n) * step
    focus[0], focus[-1] = lo, hi
    focus = np.sort(focus)
    k_px = float(rng.uniform(*ranges.max_blur_px)) / max(hi - lo, 1e-6)
    # points far outside the sweep would blur without bound: no real lens shows discs wider
    # than a few times the largest in-range blur (and a huge kernel costs gigabytes)
    reach = float(max(disp.max(), focus.max()) - min(disp.min(), focus.min()))
    k_px = min(k_px, 2.0 * ranges.max_blur_px[1] / max(reach, 1e-6))
    stack = _render_slices(
        rgb, disp, focus, k_px, rng=rng, ranges=ranges,
        noise_sigma=float(rng.uniform(*ranges.noise_sigma)), gamma=float(rng.uniform(*ranges.gamma)),
        grey=bool(rng.random() < ranges.grey_share),
        jpeg_quality=int(rng.integers(ranges.jpeg_quality[0], ranges.jpeg_quality[1] + 1)) if rng.random() < ranges.jpeg_share else None,
    )
    order = rng.permutation(n)
    target = (disp - focus[0]) / (focus[-1] - focus[0])
    mask = known & (target >= 0) & (target <= 1)
    return {"stack": stack[order], "focus": focus[order].astype(np.float32), "target": target.astype(np.float32), "mask": mask}


def render_eval_stack(
    src: RgbdSource, *, width: int, slices: int = 10, max_blur_px: float = 14.0, noise_sigma: float = 0.01, seed: int = 0
) -> dict[str, np.ndarray]:
    """A deterministic evaluation stack of a whole scene: colour, ``width`` px wide, focus even
    in inverse depth over the scene's 1-99 % disparity range, slices in shuffled order.

    Returns ``stack`` uint8 ``[N, H, W, 3]``, ``focus`` ``[N]`` (disparity units),
    ``disparity`` ``[H, W]`` truth, ``known`` ``[H, W]`` bool.
    """
    h0, w0 = src.disparity.shape
    height = int(round(h0 * width / w0 / 4)) * 4
    rgb = cv2.resize(src.rgb, (width, height), interpolation=cv2.INTER_AREA)
    disp = cv2.resize(src.disparity, (width, height), interpolation=cv2.INTER_NEAREST) * (width / w0)
    known = cv2.resize(src.known.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
    stack, focus = render_calibration_stack(rgb, disp, known=known, slices=slices, max_blur_px=max_blur_px, noise_sigma=noise_sigma, seed=seed)
    return {"stack": stack, "focus": focus, "disparity": disp.astype(np.float32), "known": known}


def render_calibration_stack(
    rgb: np.ndarray, disp: np.ndarray, *, known: np.ndarray | None = None, slices: int = 10, max_blur_px: float = 14.0,
    noise_sigma: float = 0.01, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The evaluation rendering of one RGB-D image (``rgb`` float ``[H, W, 3]`` linear, ``disp``
    ``[H, W]``): focus even in ``disp`` over its 1-99 % range of ``known`` pixels, largest blur
    ``max_blur_px``, Gaussian noise, slices in shuffled order (seeded).

    Returns ``stack`` uint8 ``[N, H, W, 3]`` and ``focus`` float32 ``[N]`` (disparity units)."""
    lo, hi = np.percentile(disp[known] if known is not None else disp, [1, 99])
    focus = np.linspace(lo, hi, slices)
    k_px = max_blur_px / (hi - lo)
    rng = np.random.default_rng(seed)
    stack = _render_slices(rgb, disp, focus, k_px, rng=rng, ranges=None, noise_sigma=noise_sigma, gamma=1.0, grey=False, jpeg_quality=None)
    order = rng.permutation(slices)
    return stack[order], focus[order].astype(np.float32)
