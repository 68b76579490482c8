"""The output sinks of continuous acquisition (INTERFACES.md ``output:`` and ``live:``).

Each sink writes one kind of output for stack number ``index`` (0-based) of a run:

=================  ==========================================  ================================
sink               writes                                      config key
=================  ==========================================  ================================
:class:`StackSink`      ``stacks/NNNNNN/`` (FOCAL_STACK_FORMAT.md)  ``output.record_stacks``
:class:`OmeTiffSink`    ``stacks/NNNNNN.ome.tif``                   ``output.ome_tiff``
:class:`DepthSink`      ``depth/NNNNNN/`` (``write_result``)         always
:class:`PointCloudSink` ``depth/NNNNNN/points.ply``                 ``output.point_cloud``
:class:`PreviewSink`    ``live_preview.png`` (refreshed, throttled) ``output.preview``
:class:`RerunSink`      the rerun viewer (optional extra)           ``live.rerun``
=================  ==========================================  ================================

Every file a sink writes appears under its final name only when complete: stacks and results
through their own atomic writers, the rest through a temporary sibling that is fsynced and
renamed. Before each write a sink checks the free space (``output.min_free_gb``); too little,
or ``ENOSPC`` / ``EDQUOT`` during the write, raises :class:`DiskFull` so that the pipeline
stops recording with one clear line.

``output.every_nth`` thins the *recorded stacks* (stack folders and OME-TIFF files): stack
``index`` is kept when ``index % every_nth == 0``. Depth, point clouds and the live views are
written for every stack (their own ``every_nth`` is 1; the preview has its own throttle).

Sinks are not thread-safe: call them from one writer thread.
"""

from __future__ import annotations

import errno
import importlib
import logging
import math
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import cv2
import numpy as np

from capture.atomic import fsync_dir, fsync_file
from capture.errors import ConfigError, DiskFull, OutputError
from capture.stack import OME_NAMESPACE, FocalStack
from reconstruct.preview import depth_preview
from reconstruct.result import DepthResult, write_result
from rig.config import LiveConfig, OutputConfig
from rig.runfolder import check_free_space, free_bytes

if TYPE_CHECKING:
    from calibration.intrinsics import Intrinsics

logger = logging.getLogger(__name__)

__all__ = [
    "PREVIEW_INTERVAL_S",
    "RERUN_INSTALL_HINT",
    "CameraModel",
    "DepthSink",
    "OmeTiffSink",
    "PointCloudSink",
    "PreviewSink",
    "RerunSink",
    "Sink",
    "StackSink",
    "build_sinks",
    "check_sinks",
    "check_free_space",
    "depth_to_points",
    "folder_name",
]

#: default shortest time between two refreshes of ``live_preview.png``
PREVIEW_INTERVAL_S = 1.0
RERUN_INSTALL_HINT = "pip install rerun-sdk"
#: errno values that mean "the disk (or the user's quota) is full"
_DISK_FULL_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)
_PLY_DTYPE = np.dtype(
    [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")]
)


def folder_name(index: int) -> str:
    """The 6-digit name of stack ``index`` in a run folder: ``7`` -> ``'000007'``."""
    if index < 0:
        raise ValueError(f"stack index must be >= 0, got {index}")
    return f"{index:06d}"


# --------------------------------------------------------------------------------------------
# Free space, ENOSPC and atomic files
# --------------------------------------------------------------------------------------------


def _disk_full_cause(exc: BaseException) -> OSError | None:
    """The ``OSError`` with errno ENOSPC/EDQUOT in ``exc`` or its cause/context chain, if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return current
        current = current.__cause__ or current.__context__
    return None


#: a failed write on a filesystem with less than this free is taken for a full disk: numpy's and
#: tifffile's short writes raise an OSError without ENOSPC ("... requested and ... written")
NEARLY_FULL_BYTES = 16 * 2**20


def _nearly_full(target: Path | None) -> OSError | None:
    """An ENOSPC ``OSError`` standing for a write that failed on a (nearly) full filesystem."""
    if target is None:
        return None
    try:
        free = free_bytes(target)
    except OSError:
        return None
    if free >= NEARLY_FULL_BYTES:
        return None
    return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: {free} bytes free")


@contextmanager
def _atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``final`` to write; on success fsync it and rename it to
    ``final`` (replacing an old one), on any error remove it. Never leaves a partial ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{secrets.token_hex(4)}")
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            logger.warning("%s: could not remove the temporary file", tmp)
        raise
    fsync_dir(final.parent)


# --------------------------------------------------------------------------------------------
# Images for people and point colours
# --------------------------------------------------------------------------------------------


def _to_rgb8(image: np.ndarray, significant_bits: int | None = None) -> np.ndarray:
    """Any image (``[H, W]`` or ``[H, W, C]``, C = 1, 3 or 4; uint8, uint16 or float in [0, 1])
    as uint8 RGB ``[H, W, 3]`` (alpha dropped, grey replicated)."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 3:
        img = img[..., :3]
    if img.dtype == np.uint8:
        out = img
    elif np.issubdtype(img.dtype, np.integer):
        full = float(np.iinfo(img.dtype).max)
        scale = float(2 ** int(significant_bits) - 1) if significant_bits else full
        out = np.clip(img.astype(np.float32) * (255.0 / scale), 0, 255).round().astype(np.uint8)
    else:
        out = np.clip(np.nan_to_num(img.astype(np.float32)) * 255.0, 0, 255).round().astype(np.uint8)
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=2)
    return np.ascontiguousarray(out)


def _significant_bits(stack: FocalStack | None) -> int | None:
    bits = None if stack is None else stack.meta.get("significant_bits")
    return int(bits) if isinstance(bits, (int, np.integer)) and not isinstance(bits, bool) else None


# --------------------------------------------------------------------------------------------
# Camera model and back-projection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CameraModel:
    """The pinhole camera used to back-project depth (OpenCV conventions).

    Attributes:
        fx_px, fy_px: focal lengths, pixels.
        cx_px, cy_px: principal point, pixels, pixel centres at integer coordinates; ``None``
            for the image centre ``((W - 1) / 2, (H - 1) / 2)`` of whatever image comes.
        distortion: OpenCV distortion coefficients (empty or all zero: none).
        image_hw: ``(H, W)`` the model holds for, or ``None`` for any size.
        source: where the numbers come from, for logs and PLY comments.
    """

    fx_px: float
    fy_px: float
    cx_px: float | None = None
    cy_px: float | None = None
    distortion: tuple[float, ...] = ()
    image_hw: tuple[int, int] | None = None
    source: str = "intrinsics"
    _rays: dict[tuple[Any, ...], np.ndarray] = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("fx_px", "fy_px"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0, got {value!r}")

    @classmethod
    def from_intrinsics(cls, intrinsics: Intrinsics) -> CameraModel:
        """From a calibration's :class:`~calibration.intrinsics.Intrinsics`."""
        cx, cy = intrinsics.principal_point_px
        width, height = intrinsics.image_size
        return cls(
            fx_px=intrinsics.fx_px,
            fy_px=intrinsics.fy_px,
            cx_px=cx,
            cy_px=cy,
            distortion=tuple(float(v) for v in np.asarray(intrinsics.distortion).ravel()),
            image_hw=(int(height), int(width)),
            source="calibrated intrinsics",
        )

    @classmethod
    def from_focal_length(cls, focal_length_px: float, image_hw: tuple[int, int] | None = None) -> CameraModel:
        """``fx = fy = focal_length_px``, principal point at the image centre, no distortion."""
        cx = cy = None
        if image_hw is not None:
            cx, cy = (image_hw[1] - 1) / 2.0, (image_hw[0] - 1) / 2.0
        return cls(
            fx_px=float(focal_length_px), fy_px=float(focal_length_px), cx_px=cx, cy_px=cy,
            image_hw=None if image_hw is None else (int(image_hw[0]), int(image_hw[1])),
            source="lens focal length, principal point at the image centre",
        )

    def principal_point_px(self, image_hw: tuple[int, int]) -> tuple[float, float]:
        """``(cx, cy)`` for an image of ``image_hw``."""
        h, w = image_hw
        cx = (w - 1) / 2.0 if self.cx_px is None else self.cx_px
        cy = (h - 1) / 2.0 if self.cy_px is None else self.cy_px
        return float(cx), float(cy)

    def matrix(self, image_hw: tuple[int, int]) -> np.ndarray:
        """The camera matrix ``K`` float64 ``[3, 3]`` for an image of ``image_hw``."""
        cx, cy = self.principal_point_px(image_hw)
        return np.array([[self.fx_px, 0.0, cx], [0.0, self.fy_px, cy], [0.0, 0.0, 1.0]])

    def rays(self, image_hw: tuple[int, int], pixel_affine: Sequence[Sequence[float]] | None = None) -> np.ndarray:
        """float32 ``[H, W, 2]``: ``(x / z, y / z)`` of the ray through each pixel centre
        (undistorted when the model has distortion). ``pixel_affine``: a 2x3 affine that maps the
        depth's pixels onto the frame the model holds for (a breathing-aligned stack's reference
        slice onto the calibration's frame). Cached per image size and affine."""
        h, w = int(image_hw[0]), int(image_hw[1])
        key_affine = None if pixel_affine is None else tuple(float(x) for row in pixel_affine for x in row)
        if self.image_hw is not None and (h, w) != tuple(self.image_hw):
            raise OutputError(
                f"point cloud: the camera model ({self.source}) is for {self.image_hw[1]}x{self.image_hw[0]} "
                f"pixels, the depth is {w}x{h}; recalibrate at this resolution"
            )
        cached = self._rays.get((h, w, key_affine))
        if cached is not None:
            return cached
        cx, cy = self.principal_point_px((h, w))
        u, v = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
        if key_affine is not None:
            a = np.asarray(key_affine, np.float64).reshape(2, 3)
            u, v = a[0, 0] * u + a[0, 1] * v + a[0, 2], a[1, 0] * u + a[1, 1] * v + a[1, 2]
        if any(c != 0.0 for c in self.distortion):
            pts = np.stack([u.ravel(), v.ravel()], axis=1).reshape(-1, 1, 2)
            norm = cv2.undistortPoints(pts, self.matrix((h, w)), np.asarray(self.distortion, np.float64))
            rays = norm.reshape(h, w, 2).astype(np.float32)
        else:
            rays = np.stack([(u - cx) / self.fx_px, (v - cy) / self.fy_px], axis=2).astype(np.float32)
        self._rays[(h, w, key_affine)] = rays
        return rays


def depth_to_points(
    depth_m: np.ndarray, camera: CameraModel, colours: np.ndarray | None = None, *, pixel_affine: Sequence[Sequence[float]] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Back-project z-depth to camera-frame points (x right, y down, z forward, metres).

    ``x = (u - cx) * z / fx``, ``y = (v - cy) * z / fy`` (through undistorted rays when the
    camera has distortion). Pixels whose depth is not finite and > 0 are skipped.

    Args:
        depth_m: float ``[H, W]`` z-depth in metres, NaN where unknown.
        camera: the pinhole model.
        colours: optional ``[H, W]`` or ``[H, W, C]`` image (any dtype :func:`_to_rgb8` takes) or
            uint8 ``[H, W, 3]``.
        pixel_affine: see :meth:`CameraModel.rays` (a stack's ``breathing_reference_affine``).

    Returns:
        ``(xyz, rgb)``: float32 ``[N, 3]`` and uint8 ``[N, 3]`` (``None`` without colours),
        in row-major pixel order.
    """
    depth = np.asarray(depth_m, dtype=np.float32)
    if depth.ndim != 2:
        raise ValueError(f"depth must be [H, W], got shape {depth.shape}")
    rays = camera.rays(depth.shape, pixel_affine)
    valid = np.isfinite(depth) & (depth > 0)
    z = depth[valid]
    xyz = np.empty((z.size, 3), np.float32)
    xyz[:, 0] = rays[..., 0][valid] * z
    xyz[:, 1] = rays[..., 1][valid] * z
    xyz[:, 2] = z
    rgb = None
    if colours is not None:
        rgb8 = colours if (colours.dtype == np.uint8 and colours.ndim == 3 and colours.shape[2] == 3) else _to_rgb8(colours)
        if rgb8.shape[:2] != depth.shape:
            raise ValueError(f"colours are {rgb8.shape[:2]}, depth is {depth.shape}")
        rgb = np.ascontiguousarray(rgb8[valid])
    return xyz, rgb


# --------------------------------------------------------------------------------------------
# The sinks
# --------------------------------------------------------------------------------------------


class Sink:
    """One kind of output, written once per (kept) stack.

    Subclasses set :attr:`name`, :attr:`needs_stack` / :attr:`needs_result`, and implement
    :meth:`_write` (and :meth:`path_for`, the final path of stack ``index``, for messages);
    :meth:`write` does the ``every_nth`` thinning, the throttle (:meth:`_due`), the free-space
    check and the translation of ENOSPC into :class:`DiskFull`.

    Attributes:
        written: stacks written. skipped: stacks left out by ``every_nth``.
        throttled: stacks a sink left out by its own rule (the preview's rate limit, point
            clouds of non-metric depth).
        write_s: seconds spent writing, in total.
    """

    name: str = "sink"
    needs_stack: bool = False
    needs_result: bool = False

    def __init__(self, root: str | os.PathLike[str] | None, *, every_nth: int = 1, min_free_gb: float = 0.0) -> None:
        if int(every_nth) < 1:
            raise ValueError(f"{self.name}: every_nth must be >= 1, got {every_nth}")
        if not min_free_gb >= 0:
            raise ValueError(f"{self.name}: min_free_gb must be >= 0, got {min_free_gb}")
        self.root = None if root is None else Path(root)
        self.every_nth = int(every_nth)
        self.min_free_gb = float(min_free_gb)
        self.written = 0
        self.skipped = 0
        self.throttled = 0
        self.write_s = 0.0
        self.closed = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.root}, every_nth={self.every_nth})"

    def path_for(self, index: int) -> Path | None:
        """The final path stack ``index`` is written to (``None`` when not a file)."""
        return None

    def wants(self, index: int) -> bool:
        """True when ``every_nth`` keeps stack ``index``."""
        return index % self.every_nth == 0

    def write(self, index: int, stack: FocalStack | None, result: DepthResult | None) -> bool:
        """Write stack ``index`` (its stack and/or its result, as this sink needs).

        Returns:
            True when something was written, False when ``every_nth`` or the throttle left
            it out (counted in :attr:`skipped` / :attr:`throttled`).

        Raises:
            DiskFull: too little free space before the write, or ENOSPC/EDQUOT during it;
                nothing partial remains under the final name.
            OutputError: any other failure to write (names the path).
            ValueError: ``stack`` or ``result`` is None where this sink needs it.
        """
        if self.closed:
            raise RuntimeError(f"{self.name}: write after close()")
        if index < 0:
            raise ValueError(f"{self.name}: stack index must be >= 0, got {index}")
        if self.needs_stack and stack is None:
            raise ValueError(f"{self.name}: needs the stack, got None")
        if self.needs_result and result is None:
            raise ValueError(f"{self.name}: needs the depth result, got None")
        if not self.wants(index):
            self.skipped += 1
            return False
        if not self._due(index, stack, result):
            self.throttled += 1
            return False
        target = self.path_for(index) or self.root
        if target is not None:
            check_free_space(target, self.min_free_gb)
        t0 = time.perf_counter()
        try:
            self._write(index, stack, result)
        except DiskFull:
            raise
        except (OSError, OutputError) as exc:
            full = _disk_full_cause(exc) or _nearly_full(target)
            where = target if target is not None else self.name
            if full is not None:
                raise DiskFull(
                    f"{where}: disk full while writing stack {folder_name(index)} "
                    f"({full.strerror or os.strerror(full.errno or errno.ENOSPC)}); nothing partial was kept"
                ) from exc
            if isinstance(exc, OSError):
                raise OutputError(f"{where}: cannot write stack {folder_name(index)} ({exc.strerror or exc})") from exc
            raise
        finally:
            self.write_s += time.perf_counter() - t0
        self.written += 1
        return True

    def _due(self, index: int, stack: FocalStack | None, result: DepthResult | None) -> bool:
        """False to leave this stack out for a rate limit (counted as throttled)."""
        return True

    def _write(self, index: int, stack: FocalStack | None, result: DepthResult | None) -> None:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        """Counts and time for the run summary."""
        return {
            "written": self.written, "skipped": self.skipped, "throttled": self.throttled,
            "write_s": round(self.write_s, 4),
        }

    def close(self) -> None:
        """Finish (idempotent). Later writes raise RuntimeError."""
        self.closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StackSink(Sink):
    """Each kept stack as a stack folder ``<root>/stacks/NNNNNN/`` (atomic, FocalStack.write)."""

    name = "stacks"
    needs_stack = True

    def path_for(self, index: int) -> Path:
        assert self.root is not None
        return self.root / "stacks" / folder_name(index)

    def _write(self, index: int, stack: FocalStack | None, result: DepthResult | None) -> None:
        assert stack is not None
        stack.write(self.path_for(index))


class DepthSink(Sink):
    """Each result as ``<root>/depth/NNNNNN/`` via :func:`reconstruct.result.write_result`:
    ``depth.npy`` (float32 metres) always, ``depth.png`` (16-bit millimetres, scale in
    ``result.yaml``) when ``png16``, ``depth_preview.png`` when ``preview``."""

    name = "depth"
    needs_result = True

    def __init__(self, root: str | os.PathLike[str], *, png16: bool = True, preview: bool = True,
                 every_nth: int = 1, min_free_gb: float = 0.0, point_cloud: PointCloudSink | None = None) -> None:
        super().__init__(root, every_nth=every_nth, min_free_gb=min_free_gb)
        self.png16 = bool(png16)
        self.preview = bool(preview)
        #: writes each result's points.ply inside the result folder before it is renamed into place
        self.point_cloud = point_cloud

    def path_for(self, index: int) -> Path:
        assert self.root is not None
        return self.root / "depth" / folder_name(index)

    def _write(self, index: int, stack: FocalStack | None, result: DepthResult | None) -> None:
        assert result is not None
        cloud = self.point_cloud
        also = None if cloud is None else (lambda folder: cloud.write_into(folder, index, stack, result))
        write_result(result, self.path_for(index), png16=self.png16, preview=self.preview, tiff=False, also=also)  # depth.npy holds the floats


def _ply_header(n_points: int, comments: Sequence[str]) -> bytes:
    lines = ["ply", "format binary_little_endian 1.0"]
    for comment in comments:
        text = " ".join(str(comment).split()).encode("ascii", "replace").decode("ascii")
        lines.append(f"comment {text}")
    lines += [
        f"element vertex {int(n_points)}",
        "property float x", "property float y", "property float z",
        "property uchar red", "property uchar green", "property uchar blue",
        "end_header",
    ]
    return ("\n".join(lines) + "\n").encode("ascii")


def _write_ply(path: Path, xyz: np.ndarray, rgb: np.ndarray, comments: Sequence[str] = ()) -> None:
    """A binary little-endian PLY of ``xyz`` float32 ``[N, 3]`` and ``rgb`` uint8 ``[N, 3]``, atomically."""
    body = np.empty(len(xyz), _PLY_DTYPE)
    body["x"], body["y"], body["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    body["red"], body["green"], body["blue"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    with _atomic_file(path) as tmp, open(tmp, "wb") as fh:
        fh.write(_ply_header(len(body), comments))
        fh.write(body.tobytes())


class PointCloudSink(Sink):
    """Each result as a coloured point cloud ``<root>/depth/NNNNNN/points.ply``.

    Binary little-endian PLY: ``x y z`` float32 metres in the camera frame (x right, y down,
    z forward) and ``red green blue`` uchar from the all-in-focus image; pixels without depth
    are left out. A result whose depth is not metric (focus-index units) is skipped with one
    warning (counted as throttled). Call it after :class:`DepthSink` for the same stack (as
    :func:`build_sinks` orders them): ``write_result`` refuses a depth folder that exists.
    """

    name = "point_cloud"
    needs_result = True

    def __init__(self, root: str | os.PathLike[str], camera: CameraModel, *, every_nth: int = 1,
                 min_free_gb: float = 0.0) -> None:
        super().__init__(root, every_nth=every_nth, min_free_gb=min_free_gb)
        self.camera = camera
        self._warned_relative = False

    def path_for(self, index: int) -> Path:
        assert self.root is not None
        return self.root / "depth" / folder_name(index) / "points.ply"

    def _due(self, index: int, stack: FocalStack | None, result: DepthResult | None) -> bool:
        assert result is not None
        if result.depth_unit != "metre":
            if not self._warned_relative:
                logger.warning("point cloud: depth is in %s units, not metres; no point clouds are written", result.depth_unit)
                self._warned_relative = True
            return False
        return True

    def _write(self, index: int, stack: FocalStack | None, result: DepthResult | None) -> None:
        self._write_to(self.path_for(index), index, stack, result)

    def write_into(self, folder: Path, index: int, stack: FocalStack | None, result: DepthResult) -> bool:
        """Write ``points.ply`` into ``folder`` (a depth result's temporary folder, renamed into
        place with it, so no result folder is ever seen without its cloud); counts as this sink's
        own writes. False where the depth is not metric (skipped, as :meth:`write` skips it)."""
        if not self._due(index, stack, result):
            self.throttled += 1
            return False
        self._write_to(folder / "points.ply", index, stack, result)
        self.written += 1
        return True

    def _write_to(self, path: Path, index: int, stack: FocalStack | None, result: DepthResult | None) -> None:
        assert result is not None
        colours = _to_rgb8(result.all_in_focus, _significant_bits(stack))
        # a breathing-aligned depth is in its reference slice's frame; the intrinsics hold in the calibration's
        affine = stack.meta.get("breathing_reference_affine") if (stack is not None and result.aligned) else None
        xyz, rgb = depth_to_points(result.depth, self.camera, colours, pixel_affine=affine)
        assert rgb is not None
        h, w = result.depth.shape
        cx, cy = self.camera.principal_point_px((h, w))
        comments = [
            f"dualfocus-rig stack {folder_name(index)}",
            "camera frame: x right, y down, z forward, metres",
            f"camera: fx {self.camera.fx_px:.6g} fy {self.camera.fy_px:.6g} cx {cx:.6g} cy {cy:.6g} px ({self.camera.source})",
        ]
        _write_ply(path, xyz, rgb, comments)


class OmeTiffSink(Sink):
    """Each kept stack as one OME-TIFF ``<root>/stacks/NNNNNN.ome.tif`` (tifffile).

    Planes are ordered near to far (focus distance ascending; for a stack with focus indices,
    index descending); axes ``ZYX`` (grey) or ``ZYXS`` (RGB/RGBA, interleaved), the images as
    captured (alignment not applied). Each plane's ``PositionZ`` is its focus distance in
    metres (``INF`` for infinity); a ``MapAnnotation`` keeps the focus values and per-slice
    file names. Written to a temporary sibling, then renamed.
    """

    name = "ome_tiff"
    needs_stack = True

    def __init__(self, root: str | os.PathLike[str], *, every_nth: int = 1, min_free_gb: float = 0.0) -> None:
        super().__init__(root, every_nth=every_nth, min_free_gb=min_free_gb)
        self._tifffile = importlib.import_module("tifffile")

    def path_for(self, index: int) -> Path:
        assert self.root is not None
        return self.root / "stacks" / f"{folder_name(index)}.ome.tif"

    @staticmethod
    def metadata(stack: FocalStack, order: np.ndarray) -> dict[str, Any]:
        """The ``metadata=`` mapping for tifffile's OME writer, for slices in ``order``."""
        n = len(order)
        meta: dict[str, Any] = {"axes": "ZYX" if stack.channels == 1 else "ZYXS", "Name": "focal stack"}
        annotation: dict[str, Any] = {"Namespace": OME_NAMESPACE, "format": "focal-stack/1"}
        if stack.focus_distance_m is not None:
            dist = stack.focus_distance_m[order]
            meta["Plane"] = {
                "PositionZ": [float(d) if math.isfinite(d) else "INF" for d in dist],
                "PositionZUnit": ["m"] * n,
            }
            annotation["focus_distance_m"] = " ".join(f"{d:.9g}" if math.isfinite(d) else "inf" for d in dist)
        else:
            assert stack.focus_index is not None
            annotation["focus_index"] = " ".join(str(int(i)) for i in stack.focus_index[order])
        stamps = [stack.slice_meta[i].get("timestamp_s") for i in order]
        if all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in stamps):
            t0 = min(stamps)  # type: ignore[type-var]
            meta.setdefault("Plane", {})
            meta["Plane"]["DeltaT"] = [float(t) - float(t0) for t in stamps]  # type: ignore[arg-type]
            meta["Plane"]["DeltaTUnit"] = ["s"] * n
        annotation["slice_images"] = " ".join(stack.image_names[i] for i in order)
        bits = stack.meta.get("significant_bits")
        if isinstance(bits, int):
            meta["SignificantBits"] = bits
        meta["MapAnnotation"] = annotation
        return meta

    def _write(self, index: int, stack: FocalStack | None, result: DepthResult | None) -> None:
        assert stack is not None
        order = np.argsort(-stack.focus_dpt, kind="stable")  # near (high dpt) first
        data = np.ascontiguousarray(stack.images[order])
        photometric = "minisblack" if stack.channels == 1 else "rgb"
        with _atomic_file(self.path_for(index)) as tmp:
            self._tifffile.imwrite(tmp, data, ome=True, photometric=photometric, metadata=self.metadata(stack, order))


class PreviewSink(Sink):
    """``<root>/live_preview.png``: the depth preview next to the all-in-focus image, replaced
    atomically at most every ``min_interval_s`` (in between, results are counted as throttled;
    the latest one is written at :meth:`close`). Works headless (no window is opened).

    The picture is RGB uint8 ``[H + bar, 2 W + gap, 3]`` (scaled down to ``max_width_px``).
    """

    name = "preview"
    needs_result = True
    FILE_NAME = "live_preview.png"

    def __init__(self, root: str | os.PathLike[str], *, min_interval_s: float = PREVIEW_INTERVAL_S,
                 max_width_px: int = 1600, min_free_gb: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(root, every_nth=1, min_free_gb=min_free_gb)
        if not min_interval_s >= 0:
            raise ValueError(f"preview: min_interval_s must be >= 0, got {min_interval_s}")
        self.min_interval_s = float(min_interval_s)
        self.max_width_px = int(max_width_px)
        self._clock = clock
        self._last_write: float | None = None
        self._pending: tuple[int, FocalStack | None, DepthResult] | None = None

    @property
    def path(self) -> Path:
        assert self.root is not None
        return self.root / self.FILE_NAME

    def path_for(self, index: int) -> Path:
        return self.path

    def _due(self, index: int, stack: FocalStack | None, result: DepthResult | None) -> bool:
        assert result is not None
        now = self._clock()
        if self._last_write is not None and now - self._last_write < self.min_interval_s:
            self._pending = (index, stack, result)
            return False
        return True

    def compose(self, index: int, stack: FocalStack | None, result: DepthResult) -> np.ndarray:
        """The preview picture, RGB uint8 ``[H + bar, 2 W + gap, 3]`` (before down-scaling)."""
        metric = result.depth_unit == "metre"
        left = depth_preview(result.depth, unit="m" if metric else "focus index")
        aif = _to_rgb8(result.all_in_focus, _significant_bits(stack))
        h, w = aif.shape[:2]
        right = np.zeros((left.shape[0], w, 3), np.uint8)
        right[:h] = aif
        scale = max(0.35, min(1.0, w / 900))
        stamp = time.strftime("%H:%M:%S", time.gmtime())
        captions = [f"all in focus, stack {folder_name(index)}, {stamp} UTC", f"stack {folder_name(index)} {stamp}",
                    folder_name(index)]
        caption = next((c for c in captions if cv2.getTextSize(c, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] <= w - 6),
                       captions[-1])
        cv2.putText(right, caption, (3, left.shape[0] - 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
        gap = np.zeros((left.shape[0], max(2, w // 100), 3), np.uint8)
        return np.hstack([left, gap, right])

    def _write(self, index: int, stack: FocalStack | None, result: DepthResult | None) -> None:
        assert result is not None
        picture = self.compose(index, stack, result)
        if picture.shape[1] > self.max_width_px > 0:
            f = self.max_width_px / picture.shape[1]
            size = (self.max_width_px, max(1, round(picture.shape[0] * f)))
            picture = cv2.resize(picture, size, interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".png", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        if not ok:
            raise OutputError(f"{self.path}: PNG encoding failed")
        with _atomic_file(self.path) as tmp, open(tmp, "wb") as fh:
            fh.write(buf.tobytes())
        self._last_write = self._clock()
        self._pending = None

    def close(self) -> None:
        """Write the latest throttled result (best effort: a failure is logged), then close."""
        if self.closed:
            return
        pending, self._pending = self._pending, None
        if pending is not None:
            self._last_write = None
            try:
                self.write(*pending)
            except (OutputError, OSError) as exc:
                logger.warning("preview: the last refresh failed: %s", exc)
        super().close()


class RerunSink(Sink):
    """Logs each result to a rerun viewer (optional extra: ``pip install rerun-sdk``).

    Entities: ``world/camera`` (a ``Pinhole`` when a camera model is known),
    ``world/camera/depth`` (``DepthImage``, metres), ``world/camera/image`` (the all-in-focus
    image) and ``world/points`` (``Points3D``, coloured, at most ``max_points``), on the
    sequence timeline ``stack``. With ``save_path`` the stream goes to an ``.rrd`` file
    instead of a spawned viewer (headless machines).
    """

    name = "rerun"
    needs_result = True

    def __init__(self, *, camera: CameraModel | None = None, spawn: bool = True, save_path: str | os.PathLike[str] | None = None,
                 app_id: str = "dualfocus_rig", max_points: int = 200_000, min_free_gb: float = 0.0) -> None:
        save = None if save_path is None else Path(save_path)
        super().__init__(None if save is None else save.parent, every_nth=1, min_free_gb=min_free_gb)
        try:
            self._rr = importlib.import_module("rerun")
        except ImportError as exc:
            raise ConfigError(f"live.rerun: the rerun SDK is not installed ({RERUN_INSTALL_HINT})") from exc
        self.camera = camera
        self.max_points = int(max_points)
        self.save_path = save
        rr = self._rr
        rr.init(app_id, spawn=bool(spawn and save is None))
        if save is not None:
            save.parent.mkdir(parents=True, exist_ok=True)
            rr.save(str(save))
        self._pinhole_hw: tuple[int, int] | None = None

    def path_for(self, index: int) -> Path | None:
        return self.save_path

    def _set_time(self, index: int) -> None:
        rr = self._rr
        if hasattr(rr, "set_time"):
            rr.set_time("stack", sequence=index)
        else:  # rerun-sdk < 0.23
            rr.set_time_sequence("stack", index)

    def _write(self, index: int, stack: FocalStack | None, result: DepthResult | None) -> None:
        assert result is not None
        rr = self._rr
        self._set_time(index)
        depth = np.asarray(result.depth, np.float32)
        h, w = depth.shape
        colours = _to_rgb8(result.all_in_focus, _significant_bits(stack))
        if self.camera is not None and self._pinhole_hw != (h, w):
            cx, cy = self.camera.principal_point_px((h, w))
            rr.log("world/camera", rr.Pinhole(focal_length=[self.camera.fx_px, self.camera.fy_px],
                                              principal_point=[cx, cy], resolution=[w, h]), static=True)
            self._pinhole_hw = (h, w)
        rr.log("world/camera/image", rr.Image(colours))
        if result.depth_unit == "metre":
            rr.log("world/camera/depth", rr.DepthImage(np.nan_to_num(depth, nan=0.0), meter=1.0))
            if self.camera is not None:
                stride = max(1, math.ceil(math.sqrt(h * w / max(1, self.max_points))))
                cam = self.camera if stride == 1 else _strided_camera(self.camera, stride)
                xyz, rgb = depth_to_points(depth[::stride, ::stride], cam, colours[::stride, ::stride])
                rr.log("world/points", rr.Points3D(xyz, colors=rgb))

    def close(self) -> None:
        if not self.closed:
            disconnect = getattr(self._rr, "disconnect", None)
            if disconnect is not None:
                try:
                    disconnect()
                except Exception as exc:  # noqa: BLE001  (a viewer gone away must not stop the shutdown)
                    logger.warning("rerun: disconnect failed: %s", exc)
        super().close()


def _strided_camera(camera: CameraModel, stride: int) -> CameraModel:
    """The camera for an image subsampled as ``image[::stride, ::stride]`` (no distortion kept:
    a preview only)."""
    return CameraModel(
        fx_px=camera.fx_px / stride, fy_px=camera.fy_px / stride,
        cx_px=None if camera.cx_px is None else camera.cx_px / stride,
        cy_px=None if camera.cy_px is None else camera.cy_px / stride,
        source=camera.source,
    )


# --------------------------------------------------------------------------------------------
# From the config
# --------------------------------------------------------------------------------------------


def _display_available() -> bool:
    if sys.platform in ("win32", "darwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def check_sinks(
    output_cfg: OutputConfig,
    live_cfg: LiveConfig,
    *,
    intrinsics: Intrinsics | None = None,
    focal_length_px: float | None = None,
    image_hw: tuple[int, int] | None = None,
) -> CameraModel | None:
    """The config checks of :func:`build_sinks`, touching no file: run them before making the
    run folder, so that a bad config leaves nothing behind. Returns the camera model the point
    cloud and rerun sinks use (None where there is none). Arguments as :func:`build_sinks`.

    Raises:
        ConfigError: as :func:`build_sinks`.
    """
    camera: CameraModel | None = None
    if intrinsics is not None:
        camera = CameraModel.from_intrinsics(intrinsics)
        users = [name for name, on in (("output.point_cloud", output_cfg.point_cloud), ("live.rerun", live_cfg.rerun)) if on]
        if users and image_hw is not None and camera.image_hw is not None and tuple(image_hw) != camera.image_hw:
            raise ConfigError(
                f"calibration.file: the intrinsics are for {camera.image_hw[1]}x{camera.image_hw[0]} pixels, "
                f"the camera gives {image_hw[1]}x{image_hw[0]}; recalibrate at this resolution "
                f"(needed by {' and '.join(users)})"
            )
    elif focal_length_px is not None and focal_length_px > 0 and math.isfinite(focal_length_px):
        camera = CameraModel.from_focal_length(focal_length_px, image_hw)
    if live_cfg.rerun:
        try:
            importlib.import_module("rerun")
        except ImportError:
            raise ConfigError(
                f"live.rerun: true needs the rerun SDK, which is not installed: {RERUN_INSTALL_HINT} "
                "(or set live.rerun: false)"
            ) from None
    if output_cfg.point_cloud and camera is None:
        raise ConfigError(
            "output.point_cloud: needs camera intrinsics (calibration.file with an intrinsics section) "
            "or the lens focal length in pixels; calibrate the camera or set output.point_cloud: false"
        )
    return camera


def build_sinks(
    output_cfg: OutputConfig,
    live_cfg: LiveConfig,
    run_dir: str | os.PathLike[str],
    *,
    intrinsics: Intrinsics | None = None,
    focal_length_px: float | None = None,
    image_hw: tuple[int, int] | None = None,
) -> list[Sink]:
    """The sinks the config asks for, writing into ``run_dir``.

    Order: stacks, OME-TIFF, depth (with the point cloud inside each result folder), preview, rerun. ``output.every_nth`` thins
    the stack sinks; ``output.min_free_gb`` applies to every file sink; ``output.preview``
    turns on both ``live_preview.png`` and each result's ``depth_preview.png`` (as in single
    mode). With ``live.rerun`` and no display (no ``DISPLAY``/``WAYLAND_DISPLAY`` on Linux),
    the rerun stream is saved to ``run_dir/live.rrd`` instead of spawning a viewer.

    Args:
        intrinsics: calibrated intrinsics (``calibration.file``'s ``intrinsics`` section).
        focal_length_px: the lens model's focal length in pixels, used for point clouds when
            there are no intrinsics (principal point at the image centre; logged).
        image_hw: ``(H, W)`` of the camera's images, to check the intrinsics against.

    Raises:
        ConfigError: ``output.point_cloud`` without intrinsics or a focal length, intrinsics
            for another image size, or ``live.rerun`` without the rerun SDK installed.
    """
    root = Path(run_dir)
    min_free = float(output_cfg.min_free_gb)
    camera = check_sinks(output_cfg, live_cfg, intrinsics=intrinsics, focal_length_px=focal_length_px, image_hw=image_hw)
    rerun_sink: RerunSink | None = None

    sinks: list[Sink] = []
    if output_cfg.record_stacks:
        sinks.append(StackSink(root, every_nth=output_cfg.every_nth, min_free_gb=min_free))
    if output_cfg.ome_tiff:
        sinks.append(OmeTiffSink(root, every_nth=output_cfg.every_nth, min_free_gb=min_free))
    cloud: PointCloudSink | None = None
    if output_cfg.point_cloud:
        assert camera is not None  # check_sinks refused a point cloud without one
        if intrinsics is None:
            logger.warning(
                "output.point_cloud: no calibrated intrinsics; using fx = fy = %.1f px from the lens model with the "
                "principal point at the image centre (calibrate for accurate point clouds)", camera.fx_px,
            )
        cloud = PointCloudSink(root, camera, min_free_gb=min_free)
    # the depth sink writes the cloud into each result folder before it is renamed into place
    sinks.append(DepthSink(root, png16=output_cfg.depth_png16, preview=output_cfg.preview, min_free_gb=min_free, point_cloud=cloud))
    if output_cfg.preview:
        sinks.append(PreviewSink(root, min_free_gb=min_free))
    if live_cfg.rerun:
        if _display_available():
            rerun_sink = RerunSink(camera=camera, spawn=True)
        else:
            save = root / "live.rrd"
            logger.info("live.rerun: no display; the rerun stream goes to %s (open it with: rerun %s)", save, save)
            rerun_sink = RerunSink(camera=camera, spawn=False, save_path=save, min_free_gb=min_free)
        sinks.append(rerun_sink)
    logger.debug("sinks: %s", ", ".join(s.name for s in sinks))
    return sinks
