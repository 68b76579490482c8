"""The TensorRT backend (TensorRT 10 Python API), engines cached on disk.

UNVERIFIED until it has run on a GPU with TensorRT: written against the documented TensorRT 10
API; the pure-Python parts (cache key, engine file, rebuild policy, profile shapes, the
build/load sequence of calls) are tested with a stand-in ``tensorrt`` module
(tests/test_backends.py). ``import tensorrt`` happens only inside functions, and every
function that needs the module takes it as a ``trt`` parameter (default: the real one).

Build
-----
* The network is **strongly typed** (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``),
  parsed from the exported ONNX with ``OnnxParser``. A strongly typed network takes every
  tensor's type from the graph, and precision builder flags (``BuilderFlag.FP16``) are not
  allowed with it. So fp16 is *in the graph*: ``export_onnx(..., precision="fp16")`` traces
  :class:`~reconstruct.backends.base.InferenceGraph` with the network body in half
  precision and explicit casts back to float32 before the softmax; the focus normalisation,
  the softmax, the depth and slice-position expectations and the confidence are float32
  tensors in that graph, and a strongly typed build cannot demote them. Inputs and outputs
  are float32 in both precisions.
* One optimisation profile pins any dynamic input axis to the fixed stack shape (our own
  exports have none; an ONNX file from elsewhere with a dynamic ``N`` works too).
* A timing cache per (TensorRT version, GPU, compute capability) is loaded before and saved
  after each build, so rebuilding for a new shape reuses the kernels' timings.

Engine cache
------------
``<cache>/tensorrt/<digest>.engine`` (+ ``.json``), the digest over TensorRT version, GPU name
and compute capability, the ONNX file's sha256, the input shapes, the precision and
:data:`ENGINE_FORMAT`. A cached engine that fails to deserialise (a driver update, a
truncated file) is deleted and rebuilt once; a fresh engine that fails to deserialise is an
error.

Execution
---------
``execute_async_v3`` on an explicit ``torch.cuda.Stream``: input and output buffers are torch
CUDA tensors allocated once (fixed shapes) and bound with ``set_tensor_address``; a run
copies the inputs in on that stream, enqueues the engine, copies the outputs to pinned host
memory on the same stream and synchronises that stream only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from capture.errors import ReconstructionError
from reconstruct.backends.base import INPUT_NAMES, OUTPUT_NAMES, Backend, check_inputs
from reconstruct.backends.export import cache_max_bytes, mark_used, prune_cache

logger = logging.getLogger(__name__)

__all__ = [
    "ENGINE_FORMAT", "GpuInfo", "EngineHandle", "TensorRTBackend", "import_tensorrt", "current_gpu", "io_shapes",
    "engine_cache_key", "engine_path", "timing_cache_path", "profile_shapes", "build_serialized_engine",
    "load_or_build_engine",
]

ENGINE_FORMAT = "dualfocus-trt/1"
WORKSPACE_BYTES = 4 << 30
_TRT_LOGGER: dict[int, tuple[ModuleType, Any]] = {}


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module (10 or later), or a ReconstructionError naming ``backend``."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ReconstructionError(
            f"backend: 'tensorrt' needs the tensorrt package, version 10 or later (pip install 'dualfocus-rig[tensorrt]') and a CUDA GPU: {exc}"
        ) from exc
    major = _major(getattr(trt, "__version__", "0"))
    if major < 10:
        raise ReconstructionError(f"backend: 'tensorrt' needs TensorRT 10 or later, found {trt.__version__}")
    return trt


def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def _trt_logger(trt: ModuleType) -> Any:
    """One ``trt.Logger`` per module (TensorRT wants a single logger per process)."""
    entry = _TRT_LOGGER.get(id(trt))
    if entry is None or entry[0] is not trt:
        entry = _TRT_LOGGER[id(trt)] = (trt, trt.Logger(trt.Logger.WARNING))
    return entry[1]


@dataclass(frozen=True)
class GpuInfo:
    """The GPU an engine is built for: ``name`` and compute ``capability`` (major, minor)."""

    name: str
    capability: tuple[int, int]

    @property
    def slug(self) -> str:
        clean = "".join(c if c.isalnum() else "-" for c in self.name.lower()).strip("-")
        return f"{clean}-sm{self.capability[0]}{self.capability[1]}"


def current_gpu(index: int | None = None) -> GpuInfo:
    """The CUDA GPU torch would use."""
    import torch

    if not torch.cuda.is_available():
        raise ReconstructionError("backend: 'tensorrt' needs a CUDA GPU and torch sees none")
    i = torch.cuda.current_device() if index is None else index
    major, minor = torch.cuda.get_device_capability(i)
    return GpuInfo(torch.cuda.get_device_name(i), (int(major), int(minor)))


def io_shapes(shape: tuple[int, int, int]) -> dict[str, tuple[int, ...]]:
    """Input shapes of the contract for stacks ``(N, H, W)``."""
    n, h, w = (int(s) for s in shape)
    return {"stack": (1, n, 3, h, w), "focus": (1, n)}


def engine_cache_key(
    *, trt_version: str, gpu: GpuInfo, onnx_sha256: str, shapes: Mapping[str, Sequence[int]], precision: str
) -> dict:
    """Everything a serialised engine depends on (an engine is only valid for the TensorRT
    version and GPU it was built with)."""
    return {
        "format": ENGINE_FORMAT,
        "tensorrt": str(trt_version),
        "gpu": gpu.name,
        "compute_capability": f"{gpu.capability[0]}.{gpu.capability[1]}",
        "onnx_sha256": onnx_sha256,
        "shapes": {k: [int(d) for d in v] for k, v in sorted(shapes.items())},
        "precision": precision,
    }


def _digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def engine_path(cache_root: Path, key: Mapping[str, Any]) -> Path:
    return cache_root / "tensorrt" / f"{_digest(key)}.engine"


def timing_cache_path(cache_root: Path, trt_version: str, gpu: GpuInfo) -> Path:
    return cache_root / "tensorrt" / f"timing_trt{trt_version}_{gpu.slug}.cache"


def profile_shapes(
    network_inputs: Mapping[str, Sequence[int]], wanted: Mapping[str, Sequence[int]]
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) per *dynamic* network input, all equal to the wanted fixed shape.

    ``network_inputs``: the parsed network's input shapes, ``-1`` for a dynamic axis.
    Raises ReconstructionError when the names differ, a rank differs, or a static axis
    disagrees with the wanted shape. Static inputs need no profile and get none.
    """
    if sorted(network_inputs) != sorted(wanted):
        raise ReconstructionError(f"tensorrt: the ONNX inputs are {sorted(network_inputs)}, expected {sorted(wanted)}")
    out: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}
    for name, dims in network_inputs.items():
        dims = tuple(int(d) for d in dims)
        want = tuple(int(d) for d in wanted[name])
        if len(dims) != len(want):
            raise ReconstructionError(f"tensorrt: input {name!r} has rank {len(dims)} in the ONNX, expected shape {list(want)}")
        for axis, (d, w) in enumerate(zip(dims, want, strict=True)):
            if d != -1 and d != w:
                raise ReconstructionError(f"tensorrt: input {name!r} axis {axis} is {d} in the ONNX, asked for {w} (shape {list(want)}); export for this shape")
        if -1 in dims:
            out[name] = (want, want, want)
    return out


def _network_inputs(network: Any) -> dict[str, tuple[int, ...]]:
    inputs = (network.get_input(i) for i in range(network.num_inputs))
    return {t.name: tuple(int(d) for d in t.shape) for t in inputs}


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def build_serialized_engine(
    trt: ModuleType,
    onnx_path: Path,
    *,
    shapes: Mapping[str, Sequence[int]],
    timing_cache: Path,
    workspace_bytes: int = WORKSPACE_BYTES,
) -> bytes:
    """Parse ``onnx_path`` into a strongly typed network and build a serialised engine."""
    log = _trt_logger(trt)
    builder = trt.Builder(log)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ReconstructionError(f"tensorrt: cannot parse {onnx_path} ({errors or 'no parser message'})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    _attach_timing_cache(config, timing_cache)
    profile = profile_shapes(_network_inputs(network), shapes)
    if profile:
        opt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.items():
            opt_profile.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(opt_profile) < 0:  # -1: TensorRT found the profile invalid
            raise ReconstructionError(f"tensorrt: the optimisation profile {profile} for {onnx_path.name} is invalid (see the TensorRT messages above)")
    logger.info("building a TensorRT engine from %s (%s); this takes a while once per shape", onnx_path.name, shapes)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ReconstructionError(f"tensorrt: building an engine from {onnx_path} failed (see the TensorRT messages above)")
    try:
        _write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    except OSError as exc:
        logger.warning("could not save the TensorRT timing cache %s (%s)", timing_cache, exc)
    return bytes(serialized)


def _attach_timing_cache(config: Any, path: Path) -> None:
    """Use the timing cache in ``path`` if it loads, else start an empty one."""
    blob = b""
    if path.is_file():
        try:
            blob = path.read_bytes()
        except OSError:
            blob = b""
    if blob:
        try:
            cache = config.create_timing_cache(blob)
            if cache is not None and config.set_timing_cache(cache, False):
                return
        except Exception as exc:  # a corrupt or foreign cache
            logger.debug("timing cache %s raised %s", path, exc)
        logger.warning("timing cache %s is unusable; starting an empty one", path)
    config.set_timing_cache(config.create_timing_cache(b""), False)


def _deserialize(runtime: Any, blob: bytes) -> Any | None:
    try:
        return runtime.deserialize_cuda_engine(blob)
    except Exception as exc:  # TensorRT raises on some failures, returns None on others
        logger.debug("deserialize_cuda_engine raised %s", exc)
        return None


@dataclass
class EngineHandle:
    """A deserialised engine, its ``runtime`` (kept alive with it), cache ``path`` and ``key``,
    and whether this call ``built`` it."""

    engine: Any
    runtime: Any
    path: Path
    key: dict
    built: bool


def load_or_build_engine(
    onnx_path: Path,
    onnx_sha256: str,
    *,
    shapes: Mapping[str, Sequence[int]],
    precision: str,
    cache_root: Path,
    trt: ModuleType | None = None,
    gpu: GpuInfo | None = None,
    workspace_bytes: int = WORKSPACE_BYTES,
) -> EngineHandle:
    """The cached engine for this (TensorRT, GPU, ONNX, shapes, precision), else a new build.

    Policy: a cached file that deserialises is used; one that does not is deleted and the
    engine is rebuilt (once); a just-built engine that does not deserialise is an error.
    """
    trt = trt or import_tensorrt()
    gpu = gpu or current_gpu()
    key = engine_cache_key(trt_version=trt.__version__, gpu=gpu, onnx_sha256=onnx_sha256, shapes=shapes, precision=precision)
    path = engine_path(cache_root, key)
    runtime = trt.Runtime(_trt_logger(trt))
    if path.is_file():
        try:
            blob = path.read_bytes()
        except OSError as exc:
            blob = b""
            logger.warning("cannot read cached engine %s (%s)", path, exc)
        engine = _deserialize(runtime, blob) if blob else None
        if engine is not None:
            logger.debug("TensorRT engine cache hit: %s", path)
            mark_used(path.with_suffix(".json"))  # used: the last to go when the cache is pruned
            return EngineHandle(engine, runtime, path, key, built=False)
        logger.warning("cached TensorRT engine %s did not load; rebuilding it", path)
        path.unlink(missing_ok=True)
    blob = build_serialized_engine(
        trt, onnx_path, shapes=shapes, timing_cache=timing_cache_path(cache_root, trt.__version__, gpu), workspace_bytes=workspace_bytes
    )
    engine = _deserialize(runtime, blob)
    if engine is None:
        raise ReconstructionError(f"tensorrt: a freshly built engine for {onnx_path.name} does not deserialise (TensorRT {trt.__version__}, {gpu.name})")
    try:
        _write_atomic(path, blob)
        _write_atomic(path.with_suffix(".json"), json.dumps(key, indent=2).encode())
    except OSError as exc:
        logger.warning("could not cache the TensorRT engine in %s (%s); it will be rebuilt next time", path, exc)
    else:
        # engines are tens to hundreds of MB each, one per shape, precision and GPU: the same
        # least-recently-used limit as the ONNX exports ($DUALFOCUS_CACHE_MAX_MB, per folder)
        prune_cache(path.parent, keep={path}, max_bytes=cache_max_bytes(), suffix=".engine")
    return EngineHandle(engine, runtime, path, key, built=True)



def _torch_dtype(trt: ModuleType, dtype: Any) -> Any:
    import torch

    table = {}
    for trt_name, torch_dtype in (("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16),
                                  ("int32", torch.int32), ("int64", torch.int64), ("int8", torch.int8), ("bool", torch.bool)):
        if hasattr(trt, trt_name):
            table[getattr(trt, trt_name)] = torch_dtype
    if dtype not in table:
        raise ReconstructionError(f"tensorrt: engine tensor type {dtype} has no torch equivalent")
    return table[dtype]


class TensorRTBackend(Backend):
    """A TensorRT engine for one stack shape on one GPU.

    Args:
        onnx_path, onnx_sha256: the exported graph (fp16 graph for ``precision="fp16"``).
        shape: ``(N, H, W)``.
        precision: ``fp32`` or ``fp16`` (what the graph carries; recorded in the cache key).
        cache_root: the cache folder (``export.cache_dir()``).
        trt: the tensorrt module (default: imported).
    """

    name = "tensorrt"

    def __init__(
        self,
        onnx_path: Path,
        onnx_sha256: str,
        *,
        shape: tuple[int, int, int],
        precision: str = "fp32",
        cache_root: Path,
        trt: ModuleType | None = None,
    ) -> None:
        import torch

        if precision not in ("fp32", "fp16"):
            raise ReconstructionError(f"precision: TensorRT engines here are fp32 or fp16, got {precision!r}")
        trt = trt or import_tensorrt()
        self._trt = trt
        self.torch_device = torch.device("cuda", torch.cuda.current_device())
        self.device = str(self.torch_device)
        self.precision = precision
        self.shape = tuple(int(s) for s in shape)
        shapes = io_shapes(self.shape)
        self.handle = load_or_build_engine(
            Path(onnx_path), onnx_sha256, shapes=shapes, precision=precision, cache_root=cache_root, trt=trt,
            gpu=current_gpu(self.torch_device.index),
        )
        engine = self.handle.engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise ReconstructionError("tensorrt: could not create an execution context (GPU memory?)")
        self.stream = torch.cuda.Stream(device=self.torch_device)
        self._buffers: dict[str, torch.Tensor] = {}
        self._host: dict[str, torch.Tensor] = {}
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if sorted(inputs) != sorted(INPUT_NAMES) or not set(OUTPUT_NAMES) <= set(outputs):
            raise ReconstructionError(f"tensorrt: engine has inputs {inputs} and outputs {outputs}, expected {list(INPUT_NAMES)} and {list(OUTPUT_NAMES)}")
        for name in inputs:
            if -1 in tuple(engine.get_tensor_shape(name)):
                if not self.context.set_input_shape(name, shapes[name]):
                    raise ReconstructionError(f"tensorrt: the engine refused input {name!r} of shape {shapes[name]}")
        for name in names:
            dims = shapes[name] if name in inputs else tuple(int(d) for d in self.context.get_tensor_shape(name))
            buf = torch.empty(dims, dtype=_torch_dtype(trt, engine.get_tensor_dtype(name)), device=self.torch_device)
            self._buffers[name] = buf
            if not self.context.set_tensor_address(name, buf.data_ptr()):
                raise ReconstructionError(f"tensorrt: could not bind tensor {name!r}")
            if name in OUTPUT_NAMES:
                self._host[name] = torch.empty(dims, dtype=torch.float32, pin_memory=True)
        torch.cuda.synchronize(self.torch_device)  # buffers allocated on the default stream are ready
        self._lock = threading.Lock()

    def run_tensors(self, stack: Any, focus: Any) -> dict[str, Any]:
        """CUDA ``stack`` ``[1, N, 3, H, W]`` and ``focus`` ``[1, N]`` -> the engine's output
        buffers (CUDA, float32), valid once :attr:`stream` has been synchronised and until the
        next run. The inputs may come from any stream: this stream waits for the current one."""
        import torch

        self.stream.wait_stream(torch.cuda.current_stream(self.torch_device))
        with torch.cuda.stream(self.stream):
            self._buffers["stack"].copy_(stack, non_blocking=True)
            self._buffers["focus"].copy_(focus, non_blocking=True)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise ReconstructionError("tensorrt: execute_async_v3 failed (see the TensorRT messages above)")
        return {name: self._buffers[name] for name in OUTPUT_NAMES}

    def run(self, stack: np.ndarray, focus: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        n, h, w = check_inputs(stack, focus)
        if (n, h, w) != self.shape:
            raise ValueError(f"this engine is for {self.shape}, got {(n, h, w)}")
        with self._lock:
            with torch.cuda.stream(self.stream):
                x = torch.from_numpy(np.ascontiguousarray(stack, np.float32)).to(self.torch_device, non_blocking=True)
                f = torch.from_numpy(np.ascontiguousarray(focus, np.float32)).to(self.torch_device, non_blocking=True)
            outs = self.run_tensors(x, f)
            with torch.cuda.stream(self.stream):
                for name, buf in outs.items():
                    self._host[name].copy_(buf, non_blocking=True)
            self.stream.synchronize()
            return {name: self._host[name].numpy().copy() for name in OUTPUT_NAMES}
