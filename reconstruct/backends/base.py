"""What every inference backend runs and returns.

The contract (all backends, all precisions)
-------------------------------------------
Inputs, float32 numpy, already padded by the caller to ``H``, ``W`` multiples of 4:

* ``stack`` ``[1, N, 3, H, W]`` in [0, 1] (grey stacks repeated to 3 channels),
* ``focus`` ``[1, N]`` focus values in any unit that grows toward near focus (diopters or
  focus index), in any order.

Outputs, a dict of float32 numpy arrays (:data:`OUTPUT_NAMES`):

* ``depth`` ``[1, H, W]``: the network's *normalised* depth in [0, 1] over the stack's focus
  range (0 = farthest slice's focus, 1 = nearest). Backends do **not** convert to focus
  units: :func:`reconstruct.dualfocus.infer.predict` applies
  :meth:`DualFocusNet.to_focus_units` once, on the CPU in float32, for every backend, so a
  backend's graph never depends on the focus unit and the torch CPU path gives exactly the
  numbers it gave before backends existed.
* ``confidence`` ``[1, H, W]`` in [0, 1].
* ``slice_position`` ``[1, H, W]``: the expected sorted-slice index ``sum_n n * p_n``
  (what the all-in-focus fusion uses). Computed inside the graph so a GPU backend copies
  back three planes instead of the ``N``-plane probability volume.

:class:`InferenceGraph` is that contract as a torch module: the torch backend runs it, the
ONNX export traces it, so the graphs that ONNX Runtime and TensorRT run are the same one.
"""

from __future__ import annotations

import abc
import logging

import numpy as np
import torch
from torch import nn

from reconstruct.dualfocus.model import DualFocusNet

logger = logging.getLogger(__name__)

__all__ = ["INPUT_NAMES", "OUTPUT_NAMES", "PRECISIONS", "Backend", "InferenceGraph", "describe_run"]

INPUT_NAMES = ("stack", "focus")
OUTPUT_NAMES = ("depth", "confidence", "slice_position")
#: ``fp32`` everywhere; ``fp16`` / ``bf16`` for the network body on a GPU (see each backend);
#: ``bf16`` also in torch on a CPU with native bfloat16; ``int8`` in ONNX Runtime on the CPU
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def describe_run(device: str, backend: str, precision: str) -> str:
    """``cpu (torch)``, ``cpu (onnxruntime, int8)``, ``cuda:0 (tensorrt, fp16)``: fp32 goes unsaid."""
    extra = "" if precision == "fp32" else f", {precision}"
    return f"{device} ({backend}{extra})"


class InferenceGraph(nn.Module):
    """The network plus the contract's outputs: ``(stack [1, N, 3, H, W], focus [1, N])``
    (float32) -> ``(depth [1, H, W], confidence [1, H, W], slice_position [1, H, W])``, float32.

    ``body_dtype=torch.float16`` is the graph exported for TensorRT's fp16 engines (a strongly
    typed network takes its precision from the graph): the network body runs in half, but

    * the focus values are normalised to [0, 1] in float32 before the cast, so large focus
      units (motor steps) do not lose their order in half precision;
    * the network's softmax already runs on ``logits.float()``; the depth expectation over
      the slice positions is recomputed here from float32 positions, and the
      slice-position expectation and confidence come from the float32 probabilities.

    With float32 (the default) it is the network unchanged, so its depth and confidence are
    bit for bit what ``DualFocusNet.forward`` returns.
    """

    def __init__(self, net: DualFocusNet, *, body_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.net = net
        self.body_dtype = body_dtype

    def forward(self, stack: torch.Tensor, focus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = stack.shape[1]
        if self.body_dtype == torch.float32:
            out = self.net(stack, focus)
            depth, prob = out.depth, out.prob
        else:
            focus = focus.float()
            lo = focus.min(dim=1, keepdim=True).values
            span = (focus.max(dim=1, keepdim=True).values - lo).clamp_min(1e-6)
            out = self.net(stack.to(self.body_dtype), ((focus - lo) / span).to(self.body_dtype))
            prob = out.prob.float()
            _, pos, _ = DualFocusNet.normalise_focus(focus)  # float32 positions, same sort
            depth = (prob * pos[:, :, None, None]).sum(dim=1)
        index = torch.arange(n, device=prob.device, dtype=prob.dtype)
        slice_position = (prob * index[None, :, None, None]).sum(dim=1)
        return depth.float(), out.confidence.float(), slice_position.float()


class Backend(abc.ABC):
    """One way of running one network; ``run`` takes and returns numpy (module docstring).

    Attributes:
        name: ``torch``, ``onnxruntime`` or ``tensorrt``.
        device: where it runs, ``cpu`` or ``cuda`` (``cuda:K`` for a given GPU).
        precision: one of :data:`PRECISIONS`.
    """

    name: str = ""
    device: str = "cpu"
    precision: str = "fp32"

    @abc.abstractmethod
    def run(self, stack: np.ndarray, focus: np.ndarray) -> dict[str, np.ndarray]:
        """``stack`` ``[1, N, 3, H, W]`` float32, ``focus`` ``[1, N]`` float32 -> the
        :data:`OUTPUT_NAMES` arrays, each ``[1, H, W]`` float32."""

    def describe(self) -> str:
        """Where and with what this backend runs, for people: ``cpu (onnxruntime)``."""
        return describe_run(self.device, self.name, self.precision)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


def check_inputs(stack: np.ndarray, focus: np.ndarray) -> tuple[int, int, int]:
    """The ``(N, H, W)`` of valid contract inputs; ValueError otherwise (a programming error:
    :func:`predict` builds these arrays)."""
    if stack.ndim != 5 or stack.shape[0] != 1 or stack.shape[2] != 3:
        raise ValueError(f"stack must be [1, N, 3, H, W], got {list(stack.shape)}")
    n, h, w = int(stack.shape[1]), int(stack.shape[3]), int(stack.shape[4])
    if focus.shape != (1, n):
        raise ValueError(f"focus must be [1, {n}], got {list(focus.shape)}")
    if h % 4 or w % 4:
        raise ValueError(f"H and W must be multiples of 4, got {h}x{w}")
    return n, h, w
