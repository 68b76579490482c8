"""Running a trained DualFocus network on a focal stack (torch backend).

Weights load only from safetensors; the shipped ones live next to this package
(``reconstruct/weights/<model>.safetensors`` with a model card ``<model>.yaml``).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from capture.errors import ReconstructionError
from reconstruct.dualfocus.checkpoint import check_weights_file, load_weights, sha256_of
from reconstruct.dualfocus.model import DualFocusNet
from reconstruct.dualfocus.registry import MODELS

logger = logging.getLogger(__name__)

__all__ = ["WEIGHTS_DIR", "shipped_weights", "resolve_weights", "select_backend", "DualFocusPrediction", "predict"]

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
_CACHE: dict[tuple[str, str], tuple[DualFocusNet, str]] = {}
_LOCK = threading.Lock()


def shipped_weights(model: str) -> Path:
    """The weights file shipped for a registered model name."""
    if model not in MODELS:
        raise ReconstructionError(f"model: unknown model {model!r}; registered: {', '.join(MODELS)}")
    path = WEIGHTS_DIR / f"{model}.safetensors"
    if not path.is_file():
        raise ReconstructionError(
            f"model: no shipped weights for {model!r} (expected {path}); pass --weights, or use --method classical"
        )
    return path


def resolve_weights(model: str, weights: str | Path | None) -> Path:
    """The weights to use: the given file, or the shipped ones of ``model``; checked to be
    a loadable ``.safetensors`` file."""
    return check_weights_file(Path(weights) if weights is not None else shipped_weights(model))


def select_backend(backend: str) -> tuple[str, torch.device]:
    """``auto`` picks torch on the GPU where CUDA is available, else torch on the CPU, and
    logs its choice; ``torch`` likewise. Other backends arrive with the deployment work."""
    if backend not in ("auto", "torch"):
        raise ReconstructionError(f"backend: {backend!r} is not available in this version; valid now: auto, torch")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if backend == "auto":
        logger.info("backend auto: torch on %s%s", device, "" if device.type == "cuda" else " (no CUDA GPU found)")
    return "torch", device


def _load(path: Path, device: torch.device) -> tuple[DualFocusNet, str]:
    key = (str(path.resolve()), str(device))
    with _LOCK:
        if key not in _CACHE:
            model, _meta = load_weights(path)
            _CACHE[key] = (model.to(device).eval(), sha256_of(path))
        return _CACHE[key]


@dataclass
class DualFocusPrediction:
    """``depth_focus`` ``[H, W]`` in the stack's focus unit (diopters or focus index),
    ``confidence`` ``[H, W]``, ``slice_position`` ``[H, W]`` (expected sorted-slice index)."""

    depth_focus: np.ndarray
    confidence: np.ndarray
    slice_position: np.ndarray
    device: str
    sha256: str


def predict(slices: np.ndarray, focus: np.ndarray, *, weights: Path, backend: str = "auto") -> DualFocusPrediction:
    """Run the network on float slices ``[N, H, W]`` or ``[N, H, W, C]`` in [0, 1] with their
    focus values ``[N]`` (diopters or focus index; any order)."""
    _, device = select_backend(backend)
    model, sha = _load(weights, device)
    x = torch.from_numpy(np.ascontiguousarray(slices, np.float32))
    if x.ndim == 3:
        x = x[..., None]
    if x.shape[-1] == 1:
        x = x.expand(*x.shape[:-1], 3)
    x = x[..., :3].permute(0, 3, 1, 2)[None]  # [1, N, 3, H, W]
    h, w = x.shape[-2:]
    ph, pw = (-h) % 4, (-w) % 4
    if ph or pw:
        x = F.pad(x.reshape(-1, 3, h, w), (0, pw, 0, ph), mode="replicate").reshape(1, -1, 3, h + ph, w + pw)
    f = torch.from_numpy(np.asarray(focus, np.float32))[None]
    with torch.inference_mode():
        out = model(x.to(device), f.to(device))
        depth = DualFocusNet.to_focus_units(out.depth, f.to(device))[0, :h, :w]
        n = out.prob.shape[1]
        pos = (out.prob[0, :, :h, :w] * torch.arange(n, device=device, dtype=out.prob.dtype)[:, None, None]).sum(0)
        conf = out.confidence[0, :h, :w]
    return DualFocusPrediction(
        depth_focus=depth.float().cpu().numpy(), confidence=conf.float().cpu().numpy(),
        slice_position=pos.float().cpu().numpy(), device=str(device), sha256=sha,
    )
