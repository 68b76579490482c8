"""ONNX export of a DualFocus weights file for one fixed stack shape, cached on disk.

The graph is :class:`reconstruct.backends.base.InferenceGraph` (inputs ``stack``
``[1, N, 3, H, W]`` and ``focus`` ``[1, N]``; outputs ``depth``, ``confidence``,
``slice_position``, each ``[1, H, W]``), traced with the TorchScript-based exporter at opset 17
for a fixed shape: the Poisson solve's DCT bases are constants of the shape, so a fixed-shape
graph is the one whose numbers match torch (shared/DUALFOCUS.md).

Cache: ``$DUALFOCUS_CACHE_DIR`` or ``~/.cache/dualfocus-rig/``, folder ``onnx/``. An entry is
``<model>_<N>x<H>x<W>_<precision>_op<opset>_<digest>.onnx`` plus a ``.json`` sidecar; the digest
covers the weights' sha256, model name, shape, opset, precision, torch version and
:data:`EXPORT_FORMAT` (bump it when :class:`InferenceGraph` changes). Both files are written
to a temporary name and renamed, so a crash or a concurrent export never leaves a half file
under the final name; an entry whose ONNX checksum does not match its sidecar is re-exported.
The folder is kept in bounds after each new entry (:func:`prune_cache`): temporary files left
by a killed export (older than an hour) are removed, and while the entries exceed
``$DUALFOCUS_CACHE_MAX_MB`` (default 4096; 0 = no limit) the least recently used go, the new
one never (a cache hit marks its entry used).

``precision="int8"``: the fp32 graph (from the cache or exported) quantised by
:mod:`reconstruct.backends.quantize` for ONNX Runtime on the CPU; its key adds the fp32
graph's sha256, the onnxruntime version and the quantisation recipe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from capture.errors import InputError, OutputError, ReconstructionError
from reconstruct.backends.base import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    InferenceGraph,
)
from reconstruct.dualfocus.checkpoint import load_weights, sha256_of

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_ENV", "CACHE_MAX_ENV", "DEFAULT_OPSET", "EXPORT_FORMAT", "OnnxArtifact", "cache_dir", "cache_max_bytes",
    "weights_identity", "export_key", "parse_shape", "export_onnx", "copy_atomic", "mark_used", "prune_cache",
]

CACHE_ENV = "DUALFOCUS_CACHE_DIR"
CACHE_MAX_ENV = "DUALFOCUS_CACHE_MAX_MB"
DEFAULT_CACHE_MAX_MB = 4096
STALE_TMP_S = 3600.0  # a temporary file this old belongs to no live export
DEFAULT_OPSET = 17
EXPORT_FORMAT = "dualfocus-onnx/7"  # 2: slices sorted by a row Gather; 3: softmax written out, encoder fuse split; 4: stem, heads, volume layout; 5: 3D convolutions over the planes; 6: plane shifts as Pad + Slice; 7: the slice sort's K a constant
_LOCK = threading.Lock()
_IDENTITY: dict[tuple[str, int, int], tuple[str, str]] = {}


def cache_dir() -> Path:
    """``$DUALFOCUS_CACHE_DIR`` if set, else ``~/.cache/dualfocus-rig`` (not created here)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dualfocus-rig"


def weights_identity(weights: Path) -> tuple[str, str]:
    """``(sha256, model name)`` of a weights file; memoised per (path, inode, mtime, ctime,
    size), so a changed file is hashed again (also one replaced with ``cp -p`` or ``rsync -t``,
    which keep the modification time: the inode or change time differ) and an unchanged one is
    not hashed on every stack."""
    try:
        st = weights.stat()
    except OSError as exc:
        raise InputError(f"{weights}: weights file not readable ({exc.strerror or exc})") from exc
    key = (str(weights.resolve()), st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
    if key not in _IDENTITY:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(weights), framework="pt") as fh:
                meta = fh.metadata() or {}
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(f"{weights}: not a readable safetensors file ({exc})") from exc
        _IDENTITY[key] = (sha256_of(weights), str(meta.get("model") or "dualfocus"))
    return _IDENTITY[key]


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"10x288x384"`` -> ``(10, 288, 384)``: N >= 2 slices, H and W >= 8 and multiples of 4
    (:func:`predict` pads a stack to them). ValueError with the reason otherwise."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        n, h, w = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"expected NxHxW (slices x height x width, e.g. 10x288x384), got {text!r}") from None
    if n < 2:
        raise ValueError(f"N must be at least 2 slices, got {n}")
    if h < 8 or w < 8 or h % 4 or w % 4:
        pad = f"{n}x{h + (-h) % 4}x{w + (-w) % 4}"
        raise ValueError(f"H and W must be at least 8 and multiples of 4 (stacks are padded to them), got {h}x{w}; use {pad}")
    return n, h, w


def export_key(*, weights_sha256: str, model: str, shape: tuple[int, int, int], opset: int, precision: str) -> dict:
    """Everything an exported graph depends on."""
    return {
        "format": EXPORT_FORMAT, "model": model, "weights_sha256": weights_sha256, "shape": [int(s) for s in shape],
        "opset": int(opset), "precision": precision, "torch": torch.__version__,
    }


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class OnnxArtifact:
    """An exported graph: its ``path``, ``sha256``, the cache ``key`` and whether it was
    ``reused`` from the cache (False: exported by this call)."""

    path: Path
    sha256: str
    key: dict
    reused: bool


def _write_atomic(final: Path, write: Callable[[Path], None]) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; a cache and an artefact are readable
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def copy_atomic(src: Path, dst: Path) -> Path:
    """Copy ``src`` to ``dst`` through a temporary file in ``dst``'s folder."""
    try:
        _write_atomic(dst, lambda tmp: shutil.copyfile(src, tmp))
    except OSError as exc:
        raise OutputError(f"{dst}: cannot write ({exc.strerror or exc})") from exc
    return dst


def _torch_export(graph: InferenceGraph, shape: tuple[int, int, int], path: Path, opset: int) -> None:
    """Trace ``graph`` for ``shape`` into ``path`` (the one call tests count)."""
    n, h, w = shape
    device = next(graph.parameters()).device
    g = torch.Generator().manual_seed(0)
    stack = torch.rand(1, n, 3, h, w, generator=g).to(device)
    focus = torch.linspace(0.5, 2.5, n)[None].to(device)  # distinct values: only the shapes are recorded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            graph, (stack, focus), str(path), opset_version=opset, dynamo=False, do_constant_folding=True,
            input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
        )


def export_onnx(
    weights: str | Path,
    shape: tuple[int, int, int],
    *,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    cache: Path | None = None,
    keep: Collection[Path] = (),
) -> OnnxArtifact:
    """The ONNX graph of ``weights`` for stacks ``shape = (N, H, W)`` (H, W multiples of 4),
    from the cache or exported into it. ``keep``: cache files a caller still needs, never
    pruned to make room for this one.

    ``precision="fp16"`` exports the graph with the network body in half precision and the
    softmax, expectations and confidence in float32 (:class:`InferenceGraph`), the form a
    strongly typed TensorRT network needs; inputs and outputs stay float32.
    """
    if precision not in ("fp32", "fp16", "int8"):
        raise ReconstructionError(f"precision: ONNX export supports fp32, fp16 and int8, got {precision!r} (valid: fp32, fp16, int8)")
    weights = Path(weights)
    try:
        n, h, w = parse_shape("x".join(str(int(s)) for s in shape))
    except ValueError as exc:
        raise ReconstructionError(f"backend: cannot export for a {'x'.join(str(s) for s in shape)} stack: {exc}") from exc
    if precision == "int8":
        return _export_int8(weights, (n, h, w), opset=opset, cache=cache)
    sha, model = weights_identity(weights)
    key = export_key(weights_sha256=sha, model=model, shape=(n, h, w), opset=opset, precision=precision)
    root = (cache or cache_dir()) / "onnx"
    final = root / f"{model}_{n}x{h}x{w}_{precision}_op{opset}_{_digest(key)}.onnx"

    def build(tmp: Path) -> dict:
        try:
            net, _meta = load_weights(weights)
        except OSError as exc:  # not the cache's fault: say so before the cache's OSError handling
            raise ReconstructionError(f"weights: cannot read {weights} ({exc.strerror or exc})") from exc
        graph = InferenceGraph(net.eval(), body_dtype=torch.float16 if precision == "fp16" else torch.float32).eval()
        if precision == "fp16":
            graph.net.half()
        if torch.cuda.is_available():  # tracing runs the network once: fast on a GPU, slow in CPU fp16
            graph.to("cuda")
        _torch_export(graph, (n, h, w), tmp, opset)
        return {}

    return _cached_or_built(final, key, build, weights=weights, what=f"ONNX export of {model} for {n}x{h}x{w} ({precision}, opset {opset})", keep=keep)


def _cached_or_built(
    final: Path, key: dict, build: Callable[[Path], dict], *, weights: Path, what: str, keep: Collection[Path] = ()
) -> OnnxArtifact:
    """The cache entry ``final`` for ``key``, or ``build(tmp)`` written atomically under it with a
    JSON sidecar (``key``, what ``build`` returned, the ONNX sha256); errors as one line."""
    sidecar = final.with_suffix(".json")
    max_bytes = cache_max_bytes()  # a bad setting is refused on every call, not only after a build
    with _LOCK:
        hit = _cached(final, sidecar, key)
        if hit is not None:
            logger.debug("ONNX cache hit: %s", final)
            mark_used(sidecar)
            return OnnxArtifact(final, hit, key, True)
        t0 = time.perf_counter()
        done: dict = {}
        try:
            _write_atomic(final, lambda tmp: done.update(build(tmp)))
        except OSError as exc:
            raise OutputError(f"{final.parent}: cannot write the ONNX cache ({exc.strerror or exc}); set {CACHE_ENV} to a writable folder") from exc
        except ReconstructionError:
            raise
        except Exception as exc:  # the exporter and the quantiser raise many types
            raise ReconstructionError(f"backend: {what} failed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
        onnx_sha = sha256_of(final)
        doc = {**key, **done, "onnx_sha256": onnx_sha, "weights_file": str(weights), "exported_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            _write_atomic(sidecar, lambda tmp: tmp.write_text(json.dumps(doc, indent=2)))
        except OSError as exc:  # a graph without its sidecar is never used: remove it too
            final.unlink(missing_ok=True)
            raise OutputError(f"{final.parent}: cannot write the ONNX cache ({exc.strerror or exc}); set {CACHE_ENV} to a writable folder") from exc
        logger.info("%s: %s in %.1f s", what, final, time.perf_counter() - t0)
        prune_cache(final.parent, keep={final, *keep}, max_bytes=max_bytes)
        return OnnxArtifact(final, onnx_sha, key, False)


def cache_max_bytes() -> int | None:
    """``$DUALFOCUS_CACHE_MAX_MB`` in bytes (default 4096 MB); None for 0 (no limit);
    ReconstructionError naming the variable for anything else than a number >= 0."""
    text = os.environ.get(CACHE_MAX_ENV, "").strip()
    if not text:
        return DEFAULT_CACHE_MAX_MB * 2**20
    try:
        mb = float(text)
    except ValueError:
        mb = -1.0
    if not mb >= 0:  # also NaN
        raise ReconstructionError(f"{CACHE_MAX_ENV}: expected the export cache's size limit in MB (a number, 0 for none), got {text!r}")
    return None if mb == 0 else int(mb * 2**20)


def mark_used(sidecar: Path) -> None:
    """Touch a hit's sidecar, the entry's last-use time for :func:`prune_cache` (a read-only
    cache still serves hits)."""
    try:
        os.utime(sidecar)
    except OSError:
        pass


def prune_cache(folder: Path, *, keep: set[Path], max_bytes: int | None, now: float | None = None, suffix: str = ".onnx") -> list[Path]:
    """Remove from the cache ``folder`` the temporary files older than :data:`STALE_TMP_S`,
    then, while the entries (a ``suffix`` file, ``.onnx`` graphs or TensorRT's ``.engine``
    files, with its ``.json`` sidecar) add up to more than
    ``max_bytes``, the least recently used entry (its sidecar's modification time; a hit
    touches it), never one in ``keep``. Returns the files removed; a file that cannot be
    removed is logged and skipped. Another process may be about to load an entry removed
    here: it then exports it again on its next cache miss."""
    now = time.time() if now is None else now
    removed: list[Path] = []

    def _remove(path: Path) -> int:
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            logger.warning("export cache: could not remove %s (%s)", path, exc.strerror or exc)
            return 0
        removed.append(path)
        return size

    try:
        files = [p for p in folder.iterdir() if p.is_file()]
    except OSError:
        return removed
    for path in files:
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            try:
                stale = now - path.stat().st_mtime > STALE_TMP_S
            except OSError:
                continue
            if stale:
                _remove(path)
    if max_bytes is None:
        return removed
    entries = []  # (last use, files, bytes, kept)
    for graph in (p for p in files if p.suffix == suffix):
        sidecar = graph.with_suffix(".json")
        try:
            used = sidecar.stat().st_mtime if sidecar.exists() else graph.stat().st_mtime
            size = graph.stat().st_size + (sidecar.stat().st_size if sidecar.exists() else 0)
        except OSError:
            continue
        entries.append((used, [graph, sidecar], size, graph in keep))
    total = sum(e[2] for e in entries)
    for _used, paths, _size, kept in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        if kept:
            continue
        for path in paths:
            total -= _remove(path)
    if removed:
        logger.info("export cache %s: removed %d file(s) (stale temporary files, least recently used entries over %s=%.0f MB)",
                    folder, len(removed), CACHE_MAX_ENV, max_bytes / 2**20)
    return removed


def _export_int8(weights: Path, shape: tuple[int, int, int], *, opset: int, cache: Path | None) -> OnnxArtifact:
    """The int8 graph for ``shape`` (module docstring), from the cache or quantised into it."""
    from reconstruct.backends import quantize as q

    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ReconstructionError(f"precision: int8 needs the onnx and onnxruntime packages (pip install 'dualfocus-rig[onnx]'): {exc}") from exc
    base = export_onnx(weights, shape, precision="fp32", opset=opset, cache=cache)
    cal_shape = q.calibration_shape(shape)
    # the base graph must survive the calibration graph's export (a small DUALFOCUS_CACHE_MAX_MB
    # pruned it there, and the quantisation then failed), and both graphs the quantisation
    cal = export_onnx(weights, cal_shape, precision="fp32", opset=opset, cache=cache, keep=(base.path,)) if cal_shape != tuple(shape) else None
    n, h, w = shape
    key = {**base.key, "precision": "int8", "fp32_onnx_sha256": base.sha256, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
           "recipe": q.RECIPE, "calibration_shape": list(cal_shape), "calibration_stacks": q.CALIBRATION_STACKS,
           "calibration_seed": q.CALIBRATION_SEED, "channel_multiple": q.CHANNEL_MULTIPLE,
           "min_int8_out_channels": q.MIN_INT8_OUT_CHANNELS, "quantised_ops": list(q.QUANTISED_OPS)}
    final = base.path.parent / f"{key['model']}_{n}x{h}x{w}_int8_op{opset}_{_digest(key)}.onnx"
    return _cached_or_built(
        final, key, lambda tmp: q.quantize_int8(base.path, tmp, shape, calibration_onnx=cal.path if cal else None),
        weights=weights, what=f"int8 quantisation of {key['model']} for {n}x{h}x{w}",
        keep=(base.path,) if cal is None else (base.path, cal.path),
    )


def _cached(final: Path, sidecar: Path, key: dict) -> str | None:
    """The ONNX sha256 of a valid cache entry for ``key``, or None (missing, other key, or an
    ONNX file that does not match its sidecar's checksum)."""
    if not (final.is_file() and sidecar.is_file()):
        return None
    try:
        doc = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    if {k: doc.get(k) for k in key} != key:
        return None
    onnx_sha = sha256_of(final)
    if onnx_sha != doc.get("onnx_sha256"):
        logger.warning("%s: checksum does not match its sidecar; exporting again", final)
        return None
    return onnx_sha
