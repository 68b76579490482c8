"""Inference backends for the DualFocus network behind one interface.

* :mod:`.base`: the contract (:class:`Backend`, :class:`InferenceGraph`, input and output names).
* :mod:`.select`: :func:`select_backend` (``auto`` and the explicit names).
* :mod:`.torch_backend`, :mod:`.onnxruntime_backend`, :mod:`.tensorrt_backend`: the backends.
* :mod:`.export`: the ONNX export and its on-disk cache (``$DUALFOCUS_CACHE_DIR``).

:func:`open_backend` builds (or returns the already built) backend for a weights file and a
stack shape; ``reconstruct.dualfocus.infer.predict`` is its user.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path

from capture.errors import ReconstructionError
from reconstruct.backends.base import INPUT_NAMES, OUTPUT_NAMES, Backend
from reconstruct.backends.select import BACKENDS, BackendChoice, select_backend

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS", "INPUT_NAMES", "OUTPUT_NAMES", "Backend", "BackendChoice", "select_backend", "open_backend",
    "close_backends",
]

_MAX_OPEN = 8
_OPEN: OrderedDict[tuple, Backend] = OrderedDict()
_LOCK = threading.RLock()


def open_backend(
    name: str, device: str, *, weights: Path, shape: tuple[int, int, int], precision: str = "fp32"
) -> Backend:
    """A ready backend ``name`` on ``device`` for ``weights`` and stacks of ``shape`` ``(N, H, W)``
    (H, W multiples of 4), cached in this process per (name, weights sha256, device,
    precision, and the shape and threads where the backend depends on them): the torch model,
    the ONNX Runtime session and the TensorRT engine are each made once. ONNX exports and
    TensorRT engines are also cached on disk (:mod:`.export`, :mod:`.tensorrt_backend`).
    """
    from reconstruct.backends.export import cache_dir, export_onnx, weights_identity

    sha, _model = weights_identity(Path(weights))
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    if name == "torch":
        key: tuple = (name, sha, device, precision)
    elif name == "onnxruntime":
        import torch

        key = (name, sha, device, precision, shape, torch.get_num_threads())
    elif name == "tensorrt":
        key = (name, sha, device, precision, shape)
    else:
        raise ReconstructionError(f"backend: unknown backend {name!r}; valid: torch, onnxruntime, tensorrt")
    with _LOCK:
        if key in _OPEN:
            _OPEN.move_to_end(key)
            return _OPEN[key]
        if name == "torch":
            from reconstruct.backends.torch_backend import TorchBackend

            backend: Backend = TorchBackend(Path(weights), device=device, precision=precision)
        elif name == "onnxruntime":
            from reconstruct.backends.onnxruntime_backend import OnnxRuntimeBackend

            # bf16 on the CPU: OpenVINO computes the fp32 graph in bfloat16
            art = export_onnx(weights, shape, precision="fp32" if precision == "bf16" and device == "cpu" else precision)
            backend = OnnxRuntimeBackend(art.path, device=device, precision=precision)
        else:
            from reconstruct.backends.tensorrt_backend import TensorRTBackend

            art = export_onnx(weights, shape, precision=precision)
            backend = TensorRTBackend(art.path, art.sha256, shape=shape, precision=precision, cache_root=cache_dir())
        _OPEN[key] = backend
        while len(_OPEN) > _MAX_OPEN:
            _OPEN.popitem(last=False)
        logger.debug("opened %r for %s, shape %s", backend, Path(weights).name, shape)
        return backend


def close_backends() -> None:
    """Forget every open backend (tests; frees models and sessions)."""
    with _LOCK:
        _OPEN.clear()
