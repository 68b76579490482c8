"""The torch backend: eager PyTorch on the CPU or a CUDA GPU.

* CPU: float32, or ``bf16`` autocast for the network body where the CPU computes bfloat16
  natively (AVX512-BF16 or AMX; :func:`reconstruct.backends.select.cpu_bf16_native`).
* CUDA: float32, or ``fp16`` / ``bf16`` autocast for the network body.
* In every precision the softmax over the slices runs on ``logits.float()`` inside the
  network and the depth / slice-position expectations multiply float32 probabilities by
  float32 positions, so the parts that turn probabilities into depth stay float32 under
  autocast (``mul`` and ``sum`` are not autocast ops).
* Weights are put in channels-last (2D convolutions) and channels-last-3d (3D convolutions)
  by default, in place (a network handed in is changed too; its values are not): cuDNN's
  NHWC kernels are faster on CUDA, especially in half precision, and oneDNN's on the CPU
  (10x288x384 on two AVX-512 cores, fp32: 455 -> 354 ms; ``benchmarks/bench_backends.py``
  measures both layouts).
* On the CPU in fp32, 3D convolutions call oneDNN directly (:class:`OneDnnConv3d`): torch's
  dispatcher sends a batch-1 3D convolution whose ``N * C * D * H`` is at most 20480 to its
  slow reference kernel (a rule written for 2D inputs), which caught every 3D convolution of
  stacks under 9 slices at 288 px height: 5x288x384 took 615 ms against 382 ms for 10 slices.
* ``compile=True`` (or a mode: ``"reduce-overhead"`` adds CUDA graphs) wraps the graph in
  ``torch.compile``; the first call compiles. The GPU check measures both; ``predict`` runs
  eager, since compiling costs tens of seconds per shape.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

from capture.errors import ReconstructionError
from reconstruct.backends.base import (
    OUTPUT_NAMES,
    Backend,
    InferenceGraph,
    check_inputs,
)
from reconstruct.backends.select import cpu_bf16_native
from reconstruct.dualfocus.checkpoint import load_weights
from reconstruct.dualfocus.model import DualFocusNet, to_channels_last

logger = logging.getLogger(__name__)

__all__ = ["OneDnnConv3d", "TorchBackend", "use_onednn_conv3d"]

_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _cpu_autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled()


class OneDnnConv3d(nn.Conv3d):
    """``nn.Conv3d`` that runs oneDNN's kernel for batched float32 CPU inputs outside autocast
    (same weights, same result to float32 rounding), and the stock path otherwise. Inference
    only: ``mkldnn_convolution`` has no ONNX symbolic, so export a freshly loaded network."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.dim() == 5 and x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.enabled
            and not _cpu_autocast_on() and self.padding_mode == "zeros" and not isinstance(self.padding, str)
        ):
            return torch.ops.aten.mkldnn_convolution(
                x, self.weight, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups
            )
        return super().forward(x)


def use_onednn_conv3d(net: nn.Module) -> int:
    """Make every ``nn.Conv3d`` of ``net`` a :class:`OneDnnConv3d` (in place, like the
    channels-last weights: a network handed to :class:`TorchBackend` is changed; parameters and
    state dict unchanged) where torch has oneDNN; returns how many."""
    if not torch.backends.mkldnn.is_available():
        return 0
    count = 0
    for module in net.modules():
        if type(module) is nn.Conv3d:
            module.__class__ = OneDnnConv3d
            count += 1
    return count


class TorchBackend(Backend):
    """A DualFocus network in eager (or compiled) PyTorch.

    Args:
        weights: a safetensors weights file (``load_weights``), or an already built network.
        device: ``cpu``, ``cuda`` or ``cuda:K``.
        precision: ``fp32``; ``fp16`` / ``bf16`` (autocast) on CUDA; ``bf16`` on a CPU with
            native bfloat16.
        channels_last: channels-last weights (default True).
        compile: wrap the graph in ``torch.compile`` (True, or a mode such as
            ``"reduce-overhead"``, which adds CUDA graphs).
    """

    name = "torch"

    def __init__(
        self,
        weights: Path | DualFocusNet,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        channels_last: bool | None = None,
        compile: bool | str = False,
    ) -> None:
        dev = torch.device(device)
        if precision not in ("fp32", *_AUTOCAST):
            raise ReconstructionError(f"precision: unknown precision {precision!r}; valid: fp32, fp16, bf16")
        if dev.type == "cpu" and precision == "fp16":
            raise ReconstructionError("precision: fp16 autocast runs on a CUDA GPU; the CPU runs fp32, or bf16 where it has native bfloat16")
        if dev.type == "cpu" and precision == "bf16" and not cpu_bf16_native():
            raise ReconstructionError("precision: bf16 on the CPU needs native bfloat16 (AVX512-BF16 or AMX), which this CPU lacks; use fp32")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ReconstructionError("backend: torch on cuda asked for, but torch sees no CUDA GPU")
        net = weights if isinstance(weights, DualFocusNet) else load_weights(weights)[0]
        net = net.to(dev).eval()
        self.channels_last = True if channels_last is None else channels_last
        if self.channels_last:
            to_channels_last(net)
        if dev.type == "cpu" and not compile:  # torch.compile cannot trace the direct oneDNN call
            use_onednn_conv3d(net)
        self.graph = InferenceGraph(net).eval()
        if compile:
            self._fn = torch.compile(self.graph, mode=compile if isinstance(compile, str) else None)
        else:
            self._fn = self.graph
        self.compiled = bool(compile)
        self.torch_device = dev
        # result.yaml's device: cpu or cuda:K (torch.device('cuda') has no index until asked)
        self.device = f"cuda:{dev.index if dev.index is not None else torch.cuda.current_device()}" if dev.type == "cuda" else "cpu"
        self.precision = precision
        self._lock = threading.Lock()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.torch_device.type, dtype=_AUTOCAST[self.precision])

    def run_tensors(self, stack: torch.Tensor, focus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """On-device ``stack`` ``[1, N, 3, H, W]`` and ``focus`` ``[1, N]`` -> on-device
        ``(depth, confidence, slice_position)``, each ``[1, H, W]`` float32 (not synchronised)."""
        with torch.inference_mode(), self._autocast():
            return self._fn(stack, focus)

    def run(self, stack: np.ndarray, focus: np.ndarray) -> dict[str, np.ndarray]:
        check_inputs(stack, focus)
        x = torch.from_numpy(np.ascontiguousarray(stack, np.float32)).to(self.torch_device)
        f = torch.from_numpy(np.ascontiguousarray(focus, np.float32)).to(self.torch_device)
        with self._lock:
            outs = self.run_tensors(x, f)
            return {name: t.float().cpu().numpy() for name, t in zip(OUTPUT_NAMES, outs, strict=True)}
