"""The reconstruction result and its folder (FOCAL_STACK_FORMAT.md, "Reconstruction output").

Written atomically: every file fsynced in a temporary sibling folder, then renamed into place,
so a crash or a full disk never leaves half a result under the final name. ``depth.png`` holds
millimetres up to 65.535 m; a pixel beyond (or at infinity, from a slice focused there) is 0
("no depth") in it and keeps its value in ``depth.npy``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from capture.atomic import fsync_file, make_sibling, move_into_place
from capture.errors import OutputError
from reconstruct.preview import depth_preview

logger = logging.getLogger(__name__)

__all__ = ["DepthResult", "check_replaceable", "write_result", "png16_millimetres", "RESULT_FORMAT", "PNG16_SCALE_M"]

RESULT_FORMAT = "depth-result/1"
PNG16_SCALE_M = 0.001


@dataclass
class DepthResult:
    """Depth, confidence and the all-in-focus image of one stack.

    Attributes:
        depth: float32 ``[H, W]`` in metres (or focus-index units), NaN where no depth is given.
        confidence: float32 ``[H, W]`` in [0, 1].
        all_in_focus: ``[H, W]`` or ``[H, W, C]`` with the input's dtype and channels.
        depth_unit: ``"metre"`` or ``"focus_index"``.
        seconds: stage timings, e.g. ``{"read": .., "align": .., "infer": .., "write": ..}``.
    """

    depth: np.ndarray
    confidence: np.ndarray
    all_in_focus: np.ndarray
    depth_unit: str
    method: str
    backend: str
    device: str
    slices: int
    aligned: bool
    model: str | None = None
    model_sha256: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def valid_fraction(self) -> float:
        return float(np.isfinite(self.depth).mean())

    def depth_range(self) -> tuple[float, float] | None:
        finite = self.depth[np.isfinite(self.depth)]
        return (float(finite.min()), float(finite.max())) if finite.size else None

    def to_yaml_dict(self, *, png16: bool) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "format": RESULT_FORMAT,
            "depth_unit": self.depth_unit,
            "depth_kind": "z",
            "method": self.method,
        }
        if self.model is not None:
            doc["model"] = self.model
        if self.model_sha256 is not None:
            doc["model_sha256"] = self.model_sha256
        doc.update(
            {
                "backend": self.backend,
                "device": self.device,
                "image_hw": [int(self.depth.shape[0]), int(self.depth.shape[1])],
                "slices": int(self.slices),
                "aligned": bool(self.aligned),
                "valid_fraction": round(self.valid_fraction, 6),
                "seconds": {k: round(float(v), 4) for k, v in self.seconds.items()},
            }
        )
        rng = self.depth_range()
        if rng is not None:
            doc["depth_range"] = [round(rng[0], 6), round(rng[1], 6)]
        if png16:
            doc["png16_scale_m"] = PNG16_SCALE_M
        doc.update(self.extra)
        return doc


def _write_png(path: Path, image: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise OutputError(f"{path}: PNG encoding failed")
    with open(path, "wb") as fh:
        fh.write(buf.tobytes())


def _to_bgr(image: np.ndarray) -> np.ndarray:
    """RGB(A) ``[H, W, 3|4]`` in OpenCV's BGR(A) order; grey ``[H, W]`` / ``[H, W, 1]`` as is."""
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA)
    return image


def png16_millimetres(depth_m: np.ndarray) -> tuple[np.ndarray, int, int]:
    """``depth.png``'s pixels: depth in millimetres as uint16, 0 for no depth; how many pixels
    had a depth beyond what the format holds (beyond 65.535 m, or at infinity), and how many a
    depth that rounds to 0 mm (under 0.5 mm: a macro stack), both also written as 0 rather than
    as a wrong distance (``depth.npy`` and ``depth.tif`` keep their values)."""
    finite = np.isfinite(depth_m)
    mm = np.rint(np.where(finite, depth_m, 0.0) / PNG16_SCALE_M)
    beyond = np.isinf(depth_m) | (mm > 65535)
    below = finite & (mm < 1) & (depth_m >= 0)  # a negative depth is no depth, as before (not counted)
    return np.where(beyond | below | (mm < 0), 0, mm).astype(np.uint16), int(beyond.sum()), int(below.sum())


def check_replaceable(final: Path, *, overwrite: bool) -> None:
    """Raise :class:`OutputError` unless a result may be written at ``final``: it does not exist,
    or ``overwrite`` and it is an earlier result (a real folder with ``result.yaml``, or empty).
    Command lines call it before the work; :func:`write_result` again before writing."""
    final = Path(final)
    if not os.path.lexists(final):
        return
    if not overwrite:
        raise OutputError(f"{final}: already exists (choose another --out, or remove it)")
    if final.is_symlink():
        raise OutputError(f"{final}: is a symbolic link; refusing to replace it (give the folder it points to)")
    if not final.is_dir():
        raise OutputError(f"{final}: exists and is not a folder; refusing to replace it")
    try:
        foreign = not (final / "result.yaml").is_file() and any(final.iterdir())
    except OSError as exc:
        raise OutputError(f"{final}: cannot look inside ({exc.strerror or exc}); refusing to replace it") from exc
    if foreign:
        raise OutputError(f"{final}: exists and is not a reconstruction result (no result.yaml); refusing to replace it")


def write_result(
    result: DepthResult, out_dir: str | os.PathLike[str], *, png16: bool = True, preview: bool = True, overwrite: bool = False,
    tiff: bool = True, also: Callable[[Path], object] | None = None,
) -> Path:
    """Write ``depth.npy``, ``confidence.npy``, ``all_in_focus.png``, ``depth_preview.png``,
    ``result.yaml`` (and ``depth.png``, 16-bit millimetres, when ``png16`` and the depth is
    metric; ``depth.tif``, the float32 depth for image tools, when ``tiff``; continuous mode
    leaves it out: a second float copy of every stack) into ``out_dir``, atomically: every file fsynced in a hidden sibling folder that is
    then renamed into place; with ``overwrite``, an old result there is moved aside and removed
    only once the new one is in place. ``also`` writes more files into the temporary folder
    (a point cloud), so they appear with the rest.

    Raises:
        OutputError: the folder exists (and not ``overwrite``, or it is not a result folder:
            no ``result.yaml``, and not empty) or cannot be written.
    """
    final = Path(out_dir)
    check_replaceable(final, overwrite=overwrite)
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{parent}: cannot create the output folder ({exc.strerror})") from exc
    tmp = make_sibling(final, "tmp")
    t_start = time.perf_counter()
    metric = result.depth_unit == "metre"
    write_png16 = png16 and metric
    try:
        np.save(tmp / "depth.npy", result.depth.astype(np.float32))
        # the same float32 depth as a TIFF, for Fiji and other image tools that cannot read .npy
        # (depth.png holds whole millimetres: a macro or microscope relief needs this one)
        if tiff:
            import tifffile

            tifffile.imwrite(tmp / "depth.tif", result.depth.astype(np.float32), metadata={"unit": "metre" if metric else "focus_index"})
        np.save(tmp / "confidence.npy", result.confidence.astype(np.float32))
        _write_png(tmp / "all_in_focus.png", _to_bgr(result.all_in_focus))
        if preview:
            _write_png(tmp / "depth_preview.png", depth_preview(result.depth, unit="m" if metric else "focus index")[..., ::-1])
        # this write's own facts go into a copy: writing the same result again (say without
        # depth.png) must not carry a count about a depth.png it did not write
        extra = {k: v for k, v in result.extra.items() if k not in ("png16_beyond_range_pixels", "png16_below_range_pixels")}
        if write_png16:
            mm, beyond, below = png16_millimetres(result.depth)
            if beyond:
                logger.warning("%s: %d pixels lie beyond depth.png's 65.535 m (or at infinity) and are 0 there; depth.npy has them", final, beyond)
                extra["png16_beyond_range_pixels"] = beyond
            if below:
                logger.warning("%s: %d pixels lie nearer than depth.png's 0.5 mm and are 0 there; depth.tif and depth.npy have them", final, below)
                extra["png16_below_range_pixels"] = below
            span = result.depth_range()
            if span is not None and span[1] - span[0] < 0.05:
                logger.warning("%s: the depth spans %.3g mm, and depth.png holds whole millimetres: read depth.tif or depth.npy", final,
                               1000 * (span[1] - span[0]))
            _write_png(tmp / "depth.png", mm)
        if also is not None:
            also(tmp)
        # result.yaml is written last; its write time covers everything before it (and is kept
        # in result.seconds, which the command line prints)
        result.seconds["write"] = time.perf_counter() - t_start
        doc = replace(result, extra=extra).to_yaml_dict(png16=write_png16)
        (tmp / "result.yaml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        for path in tmp.iterdir():
            fsync_file(path)
        move_into_place(tmp, final, overwrite=overwrite, what="result")
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"{final}: cannot write the result ({exc.strerror or exc})") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s", final)
    return final
