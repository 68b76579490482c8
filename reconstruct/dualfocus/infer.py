"""Running a trained DualFocus network on a focal stack, on any backend (``reconstruct.backends``).

Weights load only from safetensors; the shipped ones live next to this package
(``reconstruct/weights/<model>.safetensors`` with a model card ``<model>.yaml``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from capture.errors import OutputError, ReconstructionError
from reconstruct.backends import Backend, BackendChoice, open_backend
from reconstruct.backends.base import describe_run
from reconstruct.backends.export import weights_identity
from reconstruct.backends.onnxruntime_backend import OPENVINO_INSTALL, OPENVINO_PROVIDER
from reconstruct.backends.quantize import check_int8_support
from reconstruct.backends.select import cpu_bf16_native, openvino_available
from reconstruct.backends.select import select_backend as _select
from reconstruct.dualfocus.checkpoint import check_weights_file
from reconstruct.dualfocus.model import DualFocusNet
from reconstruct.dualfocus.registry import MODELS

logger = logging.getLogger(__name__)

__all__ = [
    "WEIGHTS_DIR", "PRECISION_SETTINGS", "shipped_weights", "resolve_weights", "select_backend", "resolve_precision",
    "DualFocusPrediction", "predict",
]

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
_FAILED: set[tuple] = set()  # (weights, shape, backend, device, precision) that failed to open under auto
#: ``reconstruct.precision``: ``auto`` = fp16 on a GPU (TensorRT, torch or ONNX Runtime on CUDA); on the CPU bf16 in torch
#: (and in ONNX Runtime with OpenVINO) where the CPU has native bfloat16, else fp32; ``int8`` = ONNX Runtime on the CPU, asked for by name only
#: (:func:`resolve_precision`)
PRECISION_SETTINGS = ("auto", "fp32", "fp16", "bf16", "int8")
#: ``reconstruct.input_scale`` bounds: the network sees the slices resized by this factor
INPUT_SCALE_RANGE = (0.1, 4.0)
#: ``input_scale: auto`` keeps slices up to this long side as they are and scales larger ones down to it
AUTO_MAX_SIDE_PX = 768
#: a stack is padded to at least this many pixels a side for the network
MIN_SIDE_PX = 16


def shipped_weights(model: str) -> Path:
    """The weights file shipped for a registered model name."""
    if model not in MODELS:
        raise ReconstructionError(f"model: unknown model {model!r}; registered: {', '.join(MODELS)}")
    path = WEIGHTS_DIR / f"{model}.safetensors"
    if not path.is_file():
        raise ReconstructionError(
            f"model: no shipped weights for {model!r} (expected {path}); pass --weights (or reconstruct with the classical method)"
        )
    return path


def resolve_weights(model: str, weights: str | Path | None) -> Path:
    """The weights to use: the given file, or the shipped ones of ``model``; checked to be
    a loadable ``.safetensors`` file."""
    return check_weights_file(Path(weights) if weights is not None else shipped_weights(model))


def select_backend(backend: str, precision: str = "auto") -> BackendChoice:
    """The backend for a ``backend`` setting (auto, torch, onnxruntime, tensorrt) and a
    ``precision`` setting as ``(name, device, reason)``; logs the choice; ReconstructionError
    for an unknown or unavailable one (``reconstruct.backends.select``)."""
    return _select(backend, precision)


def resolve_precision(precision: str, choice: BackendChoice) -> str:
    """The precision the network body runs in for a ``reconstruct.precision`` setting on the
    chosen backend (softmax and the depth expectation stay fp32 in every backend):

    * on a GPU, ``auto`` is fp16 (TensorRT builds fp32 or fp16 engines only);
    * on the CPU, ``auto`` is bf16 where the CPU computes bfloat16 natively (AVX512-BF16 or
      AMX: about twice as fast, report-split accuracy unchanged, README) in torch, and in
      onnxruntime where OpenVINOExecutionProvider is installed, else fp32; ``bf16`` asked
      for needs such a CPU and one of those two; ``fp16`` needs a GPU;
    * ``int8`` runs in ONNX Runtime on the CPU only (a statically quantised graph,
      :mod:`reconstruct.backends.quantize`): never chosen by ``auto``, since it changes the
      numbers (report-split AbsRel 0.0340 against 0.0337 in fp32, README).

    A precision that cannot run is refused with one line naming ``precision``."""
    if precision not in PRECISION_SETTINGS:
        raise ReconstructionError(f"precision: unknown precision {precision!r}; valid: {', '.join(PRECISION_SETTINGS)}")
    if precision == "int8":
        if choice.name != "onnxruntime" or choice.device != "cpu":
            raise ReconstructionError(
                f"precision: int8 runs in the onnxruntime backend on the CPU only, and this run uses {choice.name} on {choice.device}; "
                "set reconstruct.backend to onnxruntime or auto, or reconstruct.precision to auto or fp32"
            )
        check_int8_support()  # a quantiser too old for the recipe: refused here, before any capture
        return "int8"
    if choice.device == "cpu":
        if precision == "fp32":
            return "fp32"
        if precision == "auto":
            bf16_here = choice.name == "torch" or (choice.name == "onnxruntime" and openvino_available())
            return "bf16" if bf16_here and cpu_bf16_native() else "fp32"
        if precision == "fp16":
            raise ReconstructionError(
                f"precision: fp16 needs a CUDA GPU, and this run reconstructs on the CPU ({choice.name}); "
                "set reconstruct.precision to auto or fp32"
            )
        if not cpu_bf16_native():
            raise ReconstructionError(
                "precision: bf16 needs a CUDA GPU or a CPU with native bfloat16 (AVX512-BF16 or AMX), and this CPU has neither; "
                "set reconstruct.precision to auto or fp32"
            )
        if choice.name == "onnxruntime" and not openvino_available():
            raise ReconstructionError(
                f"precision: bf16 in onnxruntime on the CPU needs {OPENVINO_PROVIDER} (the onnxruntime-openvino build: {OPENVINO_INSTALL}), "
                "and the installed onnxruntime runs fp32 there; set reconstruct.backend to torch or auto, or reconstruct.precision to auto or fp32"
            )
        if choice.name not in ("torch", "onnxruntime"):
            raise ReconstructionError(
                f"precision: bf16 on the CPU runs in torch or onnxruntime, and this run uses {choice.name}; "
                "set reconstruct.backend to torch or auto, or reconstruct.precision to auto or fp32"
            )
        return "bf16"
    if precision == "bf16" and choice.name == "tensorrt":
        raise ReconstructionError("precision: the TensorRT backend builds fp32 or fp16 engines; use fp16, fp32 or auto")
    return "fp16" if precision == "auto" else precision


@dataclass
class DualFocusPrediction:
    """``depth_focus`` ``[H, W]`` in the stack's focus unit (diopters or focus index),
    ``confidence`` ``[H, W]``, ``slice_position`` ``[H, W]`` (expected sorted-slice index);
    ``device`` where it ran (``cpu``, ``cuda:0``: result.yaml's ``device``), ``backend`` the
    backend's name, ``precision`` the network body's (``fp32``, ``bf16``, ``fp16``, ``int8``)."""

    depth_focus: np.ndarray
    confidence: np.ndarray
    slice_position: np.ndarray
    device: str
    sha256: str
    backend: str = "torch"
    precision: str = "fp32"
    input_scale: float = 1.0

    def describe(self) -> str:
        """Where and with what it ran, for people: ``cpu (torch)``, ``cuda:0 (tensorrt, fp16)``."""
        return describe_run(self.device, self.backend, self.precision)


def _fallback_precision(choice: BackendChoice, setting: str, resolved: str) -> str:
    """The precision torch runs in when it stands in for ``choice`` under ``auto``: on the CPU
    the ``reconstruct.precision`` setting resolved for torch (``auto``: bf16 where native),
    on a GPU the precision resolved for ``choice``."""
    if choice.device == "cpu":  # int8 runs in ONNX Runtime only: torch standing in runs what auto gives it
        return resolve_precision("auto" if setting == "int8" else setting, BackendChoice("torch", "cpu", "fallback"))
    return resolved


def _open(
    choice: BackendChoice, requested: str, weights: Path, shape: tuple[int, int, int], precision: str, setting: str = "auto"
) -> Backend:
    """The backend for ``choice``; under ``auto`` a backend that fails to open (an export the
    exporter refuses, an engine that does not build) falls back to torch on the same device
    (:func:`_fallback_precision`), once per (weights, shape, backend, precision), with a warning."""
    key = (str(weights), shape, choice.name, choice.device, precision)
    if requested == "auto" and choice.name != "torch" and key in _FAILED:
        return open_backend("torch", choice.device, weights=weights, shape=shape, precision=_fallback_precision(choice, setting, precision))
    try:
        return open_backend(choice.name, choice.device, weights=weights, shape=shape, precision=precision)
    except (ReconstructionError, OutputError, OSError) as exc:  # OutputError: an unwritable export cache
        if requested != "auto" or choice.name == "torch":
            raise
        _FAILED.add(key)
        logger.warning("backend auto: %s on %s failed (%s); using torch on %s", choice.name, choice.device, exc, choice.device)
        return open_backend("torch", choice.device, weights=weights, shape=shape, precision=_fallback_precision(choice, setting, precision))


def resolve_input_scale(input_scale: float | str, image_hw: tuple[int, int]) -> float:
    """The factor the network's input is resized by: a number as given (checked), or for
    ``"auto"`` 1 up to :data:`AUTO_MAX_SIDE_PX` on the long side and scaled down to it above.

    Why: the network learnt from 96-224 px crops with defocus blur of 6-20 px; a camera's
    full frame (2048x1536 here) has blur several times wider in pixels than any it saw and
    costs memory in proportion (4.7 GB at 2048x1536). On the shared PCB focus stack the board
    came out 5-6 slices too near at scale 1 and 0.5, right at 0.375 and 0.25 (README)."""
    if isinstance(input_scale, str):
        if input_scale != "auto":
            return check_input_scale(input_scale)
        longest = max(int(image_hw[0]), int(image_hw[1]))
        return 1.0 if longest <= AUTO_MAX_SIDE_PX else max(INPUT_SCALE_RANGE[0], AUTO_MAX_SIDE_PX / longest)
    return check_input_scale(input_scale)


def check_input_scale(input_scale: float | str) -> float:
    """``input_scale`` as a float in :data:`INPUT_SCALE_RANGE`, else one line naming it."""
    lo, hi = INPUT_SCALE_RANGE
    try:
        value = float(input_scale)
    except (TypeError, ValueError):
        value = float("nan")
    if not lo <= value <= hi:
        raise ReconstructionError(f"input_scale: must be auto or a number from {lo} to {hi}, got {input_scale!r}")
    return value


def _resize_slices(slices: np.ndarray, input_scale: float) -> np.ndarray:
    """``[N, H, W(, C)]`` float slices resized by ``input_scale`` (cubic up, area down; kept in [0, 1])."""
    n, h, w = slices.shape[:3]
    size = (round(w * input_scale), round(h * input_scale))
    if min(size) < 8:
        raise ReconstructionError(
            f"input_scale: {input_scale:g} makes the {h}x{w} slices {size[1]}x{size[0]} px; the network needs at least 8 px a side"
        )
    interp = cv2.INTER_CUBIC if input_scale > 1 else cv2.INTER_AREA
    out = np.stack([cv2.resize(np.ascontiguousarray(s, np.float32), size, interpolation=interp) for s in slices])
    if slices.ndim == 4 and out.ndim == 3:  # OpenCV drops a single channel
        out = out[..., None]
    return np.clip(out, 0.0, 1.0, out=out) if input_scale > 1 else out


def _resize_back(plane: np.ndarray, shape: tuple[int, int], input_scale: float) -> np.ndarray:
    interp = cv2.INTER_AREA if input_scale > 1 else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(plane, np.float32), (shape[1], shape[0]), interpolation=interp)


def predict(
    slices: np.ndarray, focus: np.ndarray, *, weights: Path, backend: str = "auto", precision: str = "auto",
    input_scale: float | str = "auto",
) -> DualFocusPrediction:
    """Run the network on float slices ``[N, H, W]`` or ``[N, H, W, C]`` in [0, 1] with their
    focus values ``[N]`` (diopters or focus index; any order), on ``backend`` in ``precision``
    (:func:`resolve_precision`).

    ``input_scale``: the network sees the slices resized by this factor (cubic up, area down)
    and its outputs are resized back to the stack's size. Above 1 the 1/4-resolution focal
    volume sees finer detail at the cost of time (1.5: ~2.25x the pixels; report-split AbsRel
    0.0337 -> 0.0323, but worse on the simulated rig's scene, README); below 1 it trades depth
    detail for speed on large sensors. A resized side under 8 px is refused.

    The stack is padded (edge-replicated) to multiples of 4, at least 16 px, and the outputs cropped back;
    every backend returns normalised depth (``reconstruct.backends.base``), converted here to
    focus units on the CPU in float32, so the units step is the same for all backends.
    """
    full = np.asarray(slices).shape[1:3]
    setting = input_scale
    input_scale = resolve_input_scale(input_scale, full)
    if setting == "auto" and input_scale != 1.0:
        h0, w0 = full
        logger.info("input_scale auto: the network sees the %dx%d slices at %dx%d (x%.3f; set reconstruct.input_scale / "
                    "--input-scale to choose)", w0, h0, round(w0 * input_scale), round(h0 * input_scale), input_scale)
    if input_scale != 1.0:
        pred = predict(_resize_slices(np.asarray(slices, np.float32), input_scale), focus, weights=weights, backend=backend,
                       precision=precision, input_scale=1.0)
        pred.depth_focus = _resize_back(pred.depth_focus, full, input_scale)
        pred.confidence = _resize_back(pred.confidence, full, input_scale)
        pred.slice_position = _resize_back(pred.slice_position, full, input_scale)
        pred.input_scale = input_scale
        return pred
    choice = select_backend(backend, precision)
    body_precision = resolve_precision(precision, choice)
    weights = Path(weights)
    sha, _model = weights_identity(weights)
    x = torch.from_numpy(np.ascontiguousarray(slices, np.float32))
    if x.ndim == 3:
        x = x[..., None]
    if x.shape[-1] == 1:
        x = x.expand(*x.shape[:-1], 3)
    x = x[..., :3].permute(0, 3, 1, 2)[None]  # [1, N, 3, H, W]
    h, w = x.shape[-2:]
    # multiples of 4, at least 16 px: at 8 px the 1/8-resolution branch is one pixel wide, where
    # CPU bf16 gave different depth on each run of the same stack and sometimes NaN everywhere
    ph, pw = max((-h) % 4, MIN_SIDE_PX - h), max((-w) % 4, MIN_SIDE_PX - w)
    if ph or pw:
        x = F.pad(x.reshape(-1, 3, h, w), (0, pw, 0, ph), mode="replicate").reshape(1, -1, 3, h + ph, w + pw)
    f = torch.from_numpy(np.asarray(focus, np.float32))[None]  # [1, N]
    n = int(x.shape[1])
    runner = _open(choice, backend, weights, (n, h + ph, w + pw), body_precision, precision)
    try:
        out = runner.run(np.ascontiguousarray(x.numpy()), np.ascontiguousarray(f.numpy()))
    except (MemoryError, RuntimeError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not isinstance(exc, MemoryError) and "allocate" not in message and "out of memory" not in message.lower():
            raise
        raise ReconstructionError(
            f"backend: out of memory for a {n}x{h + ph}x{w + pw} stack on {runner.describe()} ({message}); "
            "use --input-scale 0.5, fewer slices, or --method classical") from exc
    depth = DualFocusNet.to_focus_units(torch.from_numpy(out["depth"]), f)[0, :h, :w]
    bad = int((~torch.isfinite(depth)).sum())
    if bad:
        logger.warning("the network gave no finite depth at %d of %d pixels (diverged or overflowing weights?): NaN there", bad, h * w)
    return DualFocusPrediction(
        depth_focus=depth.numpy().astype(np.float32, copy=False),
        confidence=np.where(torch.isfinite(depth).numpy(), np.ascontiguousarray(out["confidence"][0, :h, :w], np.float32), np.float32(0.0)),
        slice_position=np.ascontiguousarray(out["slice_position"][0, :h, :w], np.float32),
        device=runner.device, sha256=sha, backend=runner.name, precision=runner.precision,
    )
