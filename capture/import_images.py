"""Turn a set of image files (a phone's or microscope's focus bracket) into a focal-stack folder.

Usage::

    python -m capture.import_images IMG_1.jpg IMG_2.jpg ... --out stacks/desk
    python -m capture.import_images photos/bracket/ --out stacks/desk --order near-to-far
    python -m capture.import_images a.png b.png c.png --out s --focus-distances-m 2.0 1.0 0.5

Images (PNG, TIFF or JPEG, 8- or 16-bit, grey or colour) must share size, channels and bit
depth. A single folder argument means its images, sorted by file name (digit runs compared
as numbers, so ``IMG_9`` comes before ``IMG_10``). Without ``--focus-distances-m`` (metres, one
per image, in the order given) slices get a ``focus_index``: ``--order far-to-near`` (the
default) means the first image is focused farthest (index 0), ``near-to-far`` the opposite.
The stack is written atomically as PNG (JPEG becomes 8-bit PNG), ``slice_XX.png`` in the given
order. Exit status 0 on success (the stack path is printed), 2 with one ``error:`` line on
bad input.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import sys
from decimal import Decimal
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from capture.atomic import probe_writable
from capture.cli import OneLineArgumentParser, quiet_opencv
from capture.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_OK, InputError, OutputError, RigError, interrupt_reason
from capture.imageio import IMAGE_SUFFIXES, read_image
from capture.stack import OME_NAMESPACE, FocalStack

__all__ = ["build_stack", "collect_inputs", "main"]

logger = logging.getLogger(__name__)

ORDERS = ("far-to-near", "near-to-far")


class _UsageError(Exception):
    """A command-line usage error (reported as one ``error:`` line, exit 2)."""


class _Parser(OneLineArgumentParser):
    """The shared one-line parser, raising instead of exiting so ``main`` can clean up."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{message} (see --help)")


#: what a folder import reads: the stack's own formats, and BMP and WebP (OpenCV decodes both)
IMPORT_SUFFIXES = (*IMAGE_SUFFIXES, ".bmp", ".webp")
#: files a folder may hold that are images we cannot read: named in a warning, not skipped silently
_OTHER_IMAGE_SUFFIXES = (".cr2", ".cr3", ".nef", ".arw", ".dng", ".raf", ".orf", ".rw2", ".heic", ".heif", ".gif", ".jp2",
                         ".czi", ".nd2", ".lif")
# a number in a file name: signed where the sign follows a separator (z_-10um, focus_+0.5), with a
# decimal part (z1.25); "img-3" is image 3 (the dash after a letter separates)
_NUMBER = re.compile(r"((?:(?<=^)|(?<=[_\s=(\[]))[-+]?\d+(?:\.\d+)?(?=\D|$)|\d+(?:\.\d+)?(?=\D|$))")


def _natural_key(name: str) -> list[object]:
    """Sort key: numbers in the name compared as numbers (``z_-10um`` before ``z_-5um`` before
    ``z_0um``; ``z1.25`` before ``z1.5``), the rest case-insensitively."""
    parts = _NUMBER.split(name)
    # Decimal, not float: a 17-digit time stamp in a name must not tie with the next one
    return [Decimal(part) if i % 2 else part.casefold() for i, part in enumerate(parts)]


def _series_pattern(name: str) -> str:
    """The name without its suffix, every number as ``#``: ``pcb_003.JPG`` -> ``pcb_#``."""
    return _NUMBER.sub("#", Path(name).stem.casefold())


def _warn_odd_files(folder: Path, images: list[Path], others: list[Path]) -> None:
    """Warnings for what a folder import is likely to get wrong silently: image files it cannot
    read (left out), and a file whose name does not fit the folder's numbered series (a fused
    or reference image left among the slices, e.g. ``expected.jpg``: taken in as a slice)."""
    if others:
        names = ", ".join(p.name for p in others[:5]) + (" ..." if len(others) > 5 else "")
        logger.warning("%s: left out %d file(s) that are not PNG, TIFF, JPEG, BMP or WebP: %s (convert them to import them)",
                       folder, len(others), names)
    patterns = [_series_pattern(p.name) for p in images]
    counts = sorted(((patterns.count(pat), pat) for pat in set(patterns)), reverse=True)
    common = counts[0][1]
    odd = [p.name for p, pat in zip(images, patterns) if pat != common]
    # only a clear majority makes a series (two halves of equal size are two series, or none)
    if odd and counts[0][0] >= 2 and counts[0][0] > len(patterns) / 2 and "#" in common:
        logger.warning("%s: %s do(es) not fit the numbered series of the other %d files (%s) and is imported as a slice all the "
                       "same; move it out if it is not one", folder, ", ".join(odd), patterns.count(common), common.replace("#", "N"))


def collect_inputs(inputs: Sequence[str]) -> list[Path]:
    """The image files to import: the arguments as given, or one folder's images sorted by the numbers in their names.

    Raises :class:`InputError` naming the path for a missing file, a folder mixed with files,
    an unsupported suffix, or fewer than two images.
    """
    paths = [Path(p) for p in inputs]
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        try:
            entries = list(folder.iterdir())
        except OSError as err:
            raise InputError(f"{folder}: cannot list folder ({err.strerror or err})") from err
        files = [p for p in entries if not p.name.startswith(".") and p.is_file()]
        paths = sorted((p for p in files if p.suffix.lower() in IMPORT_SUFFIXES), key=lambda p: _natural_key(p.name))
        others = sorted(p for p in files if p.name.lower().endswith(_OTHER_IMAGE_SUFFIXES))
        if len(paths) < 2:
            extra = f"; {len(others)} other image file(s) such as {others[0].name} need converting first" if others else ""
            raise InputError(f"{folder}: need at least 2 images (.png, .tif, .jpg, .bmp, .webp) in the folder, found {len(paths)}{extra}")
        _warn_odd_files(folder, paths, others)
        return paths
    for p in paths:
        if p.is_dir():
            raise InputError(f"{p}: is a folder; give one folder or a list of image files, not both")
        if not p.exists():
            raise InputError(f"{p}: no such file")
        if p.suffix.lower() not in IMPORT_SUFFIXES:
            raise InputError(f"{p}: unsupported image type {p.suffix or '(none)'!r} (use PNG, TIFF, JPEG, BMP or WebP)")
    if len(paths) < 2 and not (len(paths) == 1 and paths[0].suffix.lower() in (".tif", ".tiff")):
        raise InputError(f"need at least 2 images for a focal stack (or one multi-page TIFF z-stack), got {len(paths)}")
    return paths


def read_tiff_pages(path: Path) -> list[np.ndarray]:
    """The planes of a multi-page TIFF z-stack (Fiji's or Micro-Manager's export: axes ZYX,
    ZYXS or a plain run of pages), first page first, as ``[H, W]`` or ``[H, W, 3|4]`` uint8 or
    uint16. A single page is one plane; other layouts (channels or time points besides Z,
    float samples) and pages of different sizes are one line naming the file and what to do."""
    return _read_tiff(path)[0]


def _read_tiff(path: Path) -> tuple[list[np.ndarray], dict[str, list] | None]:
    """:func:`read_tiff_pages`, and the focus values this project's own OME-TIFF recorded
    (``{"focus_distance_m": [...]}`` or ``{"focus_index": [...]}``, one per plane, in page
    order), else None."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            if len(tif.series) > 1 or len(series.pages) != len(tif.pages):
                # tifffile groups pages of one shape into a series: a page of another size (or a
                # thumbnail) would be left out of series[0] without a word
                sizes = ", ".join(f"page {i + 1}: {'x'.join(map(str, page.shape))}" for i, page in enumerate(tif.pages[:12]))
                raise InputError(f"{path}: its pages differ in size or kind ({sizes}{', ...' if len(tif.pages) > 12 else ''}); "
                                 "a focal stack needs every plane the same size: crop or split it first (Fiji: Image > Stacks), "
                                 "or save it again without a preview/thumbnail page")
            axes, data = series.axes, series.asarray()
            own = _own_ome_focus(tif.ome_metadata) if tif.is_ome else None
    except (OSError, ValueError, tifffile.TiffFileError) as err:
        raise InputError(f"{path}: not a readable TIFF ({err})") from err
    if data.dtype not in (np.uint8, np.uint16):
        raise InputError(f"{path}: {data.dtype} samples; a focal stack takes 8- or 16-bit images (convert it in Fiji: Image > Type)")
    if axes in ("YX", "YXS"):
        return [data], None
    plane_axes = axes[1:]
    if len(axes) >= 3 and axes[0] in "ZIQT" and plane_axes in ("YX", "YXS") and (plane_axes == "YX" or data.shape[-1] in (3, 4)):
        pages = [np.ascontiguousarray(page) for page in data]
        listed = len(next(iter(own.values()))) if own is not None else len(pages)
        if listed != len(pages):
            logger.warning("%s: its focus annotation lists %d values for %d planes; ignored", path, listed, len(pages))
            own = None
        return pages, own
    raise InputError(f"{path}: a TIFF with axes {axes} {list(data.shape)}; a focal stack takes one plane per focus "
                     "(axes ZYX or ZYXS): split its channels or time points first (Fiji: Image > Stacks > Tools)")


def _own_ome_focus(ome_xml: str | None) -> dict[str, list] | None:
    """The per-plane focus values in the MapAnnotation this project's OME-TIFF writer adds
    (namespace :data:`capture.stack.OME_NAMESPACE`); None for any other OME file (a microscope's
    ``PositionZ`` is a stage position, not a focus distance from the camera)."""
    import xml.etree.ElementTree as ET

    if not ome_xml:
        return None
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag.rsplit("}", 1)[-1] != "MapAnnotation" or element.get("Namespace") != OME_NAMESPACE:
            continue
        values = {m.get("K"): (m.text or "") for m in element.iter() if m.tag.rsplit("}", 1)[-1] == "M"}
        try:
            if "focus_distance_m" in values:
                return {"focus_distance_m": [float(v) for v in values["focus_distance_m"].split()]}
            if "focus_index" in values:
                return {"focus_index": [int(v) for v in values["focus_index"].split()]}
        except ValueError:
            return None
    return None


def _describe(image: np.ndarray) -> str:
    channels = 1 if image.ndim == 2 else image.shape[2]
    return f"{image.shape[0]}x{image.shape[1]} (HxW), {channels} channel(s), {image.dtype.itemsize * 8}-bit"


def build_stack(
    paths: Sequence[Path],
    *,
    order: str = "far-to-near",
    focus_distances_m: Sequence[float] | None = None,
) -> FocalStack:
    """Read ``paths`` (N >= 2 images) into a :class:`FocalStack` in the given order.

    ``order`` ('far-to-near' or 'near-to-far') is the order of ``paths`` by focus and sets
    ``focus_index`` when ``focus_distances_m`` (metres, N values > 0, ``inf`` allowed) is not
    given. Raises :class:`InputError` naming the odd file or argument.
    """
    if order not in ORDERS:
        raise InputError(f"--order: must be one of {', '.join(ORDERS)}, got {order!r}")
    pages: list[np.ndarray] | None = None
    own_index: list[int] | None = None
    from_file = False  # the focus values come from our own OME-TIFF's annotation
    if len(paths) == 1:  # one multi-page TIFF: its planes are the slices
        pages, own = _read_tiff(paths[0])
        if len(pages) < 2:
            raise InputError(f"{paths[0]}: a single image; a focal stack needs at least 2 (images, or a multi-page TIFF's planes)")
        if own is not None and focus_distances_m is None:
            logger.info("%s: focus values from its own annotation (%s, written by DualFocus Rig); --order is not needed", paths[0], *own)
            from_file = True
            focus_distances_m, own_index = own.get("focus_distance_m"), own.get("focus_index")
    n = len(paths) if pages is None else len(pages)
    if focus_distances_m is not None:
        if len(focus_distances_m) != n:
            raise InputError(f"--focus-distances-m: got {len(focus_distances_m)} values for {n} images")
        for i, d in enumerate(focus_distances_m):
            if not d > 0:  # also NaN
                raise InputError(f"--focus-distances-m: value {i + 1} must be > 0 (metres), got {d}")
        _check_distinct_focus(focus_distances_m)
    images: list[np.ndarray] = [] if pages is None else pages
    for path in paths if pages is None else ():
        image = read_image(path)
        if images and (image.shape != images[0].shape or image.dtype != images[0].dtype):
            raise InputError(f"{path}: {_describe(image)} differs from {paths[0]}: {_describe(images[0])}")
        images.append(image)
    meta = {
        "capture": {
            "imported_from": [p.name for p in paths] if pages is None else [f"{paths[0].name} (page {i + 1})" for i in range(n)],
            "imported_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    }
    if from_file:
        meta["capture"]["focus_values_from"] = "the file's own annotation (DualFocus Rig OME-TIFF)"
    if focus_distances_m is not None:
        return FocalStack(images, focus_distance_m=list(focus_distances_m), meta=meta)
    if own_index is not None:
        return FocalStack(images, focus_index=own_index, meta=meta)
    index = list(range(n)) if order == "far-to-near" else list(range(n - 1, -1, -1))
    return FocalStack(images, focus_index=index, meta=meta)


def _check_distinct_focus(distances: Sequence[float]) -> None:
    """Refuse two images at the same focus (same diopter, 1 / distance): a reader cannot order
    them, and ``python -m reconstruct`` refuses such a stack."""
    groups: dict[float, list[int]] = {}
    for i, d in enumerate(distances):
        groups.setdefault(1.0 / float(d), []).append(i + 1)  # 1 / inf = 0.0
    same = [(distances[pos[0] - 1], pos) for pos in groups.values() if len(pos) > 1]
    if same:
        listed = "; ".join(f"{d:g} m at values {', '.join(map(str, pos))}" for d, pos in same)
        raise InputError(f"--focus-distances-m: the same focus distance given for more than one image ({listed}); "
                         "each image needs its own distance")


def _check_order_against_distances(order: str | None, distances: Sequence[float]) -> None:
    """Warn when an explicit --order contradicts the given distances (distances win)."""
    if order is None:
        return
    d = np.asarray(distances, dtype=np.float64)
    far_to_near = bool(np.all(np.diff(d) <= 0))
    near_to_far = bool(np.all(np.diff(d) >= 0))
    if (order == "far-to-near" and near_to_far and not far_to_near) or (
        order == "near-to-far" and far_to_near and not near_to_far
    ):
        logger.warning("--order %s contradicts --focus-distances-m; the distances are used", order)


def _parser() -> _Parser:
    parser = _Parser(
        prog="python -m capture.import_images",
        description="Import a focus bracket of images (PNG/TIFF/JPEG) as a focal-stack folder.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files in focus order, or one folder (its images sorted by the numbers in their names)")
    parser.add_argument("--out", required=True, metavar="STACK_DIR", help="stack folder to write")
    parser.add_argument("--order", choices=ORDERS, default=None,
                        help="focus order of the given images (default: far-to-near: first is farthest)")
    parser.add_argument("--focus-distances-m", type=float, nargs="+", metavar="D", default=None,
                        help="focus distance of each image in metres (> 0, 'inf' allowed, no two the same), in the order given")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing stack folder")
    parser.add_argument("--debug", action="store_true", help="verbose log and tracebacks")
    return parser


def _print_order(names: Sequence[str], order: str, distances_m: Sequence[float] | None, from_file: str | None = None) -> None:
    """One line on stderr saying which file became which end of the stack (a wrong sort of the
    file names scrambles the depth without any other sign)."""
    names = list(names)
    shown = ", ".join(names) if len(names) <= 6 else ", ".join(names[:3]) + ", ..., " + ", ".join(names[-2:])
    if from_file is not None:
        print(f"imported {len(names)} slices with the focus values from {from_file}: {shown}", file=sys.stderr)
    elif distances_m is not None:
        print(f"imported {len(names)} slices in the order given, with their focus distances: {shown}", file=sys.stderr)
    else:
        first = "farthest" if order == "far-to-near" else "nearest"
        print(f"imported {len(names)} slices, {first} focus first: {shown} (if that is the wrong way round: --order "
              f"{'near-to-far' if order == 'far-to-near' else 'far-to-near'})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input)."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s: %(name)s: %(message)s")
    if not debug:
        quiet_opencv()
    try:
        args = _parser().parse_args(argv)
        out = Path(args.out)
        if os.path.lexists(out) and not args.overwrite:
            raise OutputError(f"{out}: already exists (pass --overwrite to replace it)")
        probe_writable(out)  # before reading every image
        paths = collect_inputs(args.images)
        if args.focus_distances_m is not None:
            _check_order_against_distances(args.order, args.focus_distances_m)
        stack = build_stack(paths, order=args.order or "far-to-near",
                            focus_distances_m=args.focus_distances_m)
        written = stack.write(out, overwrite=args.overwrite)
        _print_order(stack.meta["capture"]["imported_from"], args.order or "far-to-near", args.focus_distances_m,
                     stack.meta["capture"].get("focus_values_from"))
    except _UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RigError as err:
        if debug:
            logger.exception("import failed")
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as exc:
        print(f"error: {interrupt_reason(exc)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # a bug or an exhausted machine: one line, traceback with --debug
        if debug:
            raise
        print(f"error: internal error: {type(err).__name__}: {' '.join(str(err).split())} "
              f"(run with --debug for a traceback)", file=sys.stderr)
        return 1
    print(written)
    return EXIT_OK



if __name__ == "__main__":
    raise SystemExit(main())
