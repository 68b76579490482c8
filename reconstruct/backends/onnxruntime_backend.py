"""The ONNX Runtime backend: the exported fixed-shape graph (``reconstruct.backends.export``)
in an ``InferenceSession``.

CPUExecutionProvider by default; CUDAExecutionProvider (with the CPU provider behind it for
any node it lacks) where the installed onnxruntime has it and a CUDA GPU is present; on the
CPU in bf16, OpenVINOExecutionProvider (the ``onnxruntime-openvino`` build of ONNX Runtime),
given the fp32 graph and told to compute in bfloat16 (OpenVINO's ``INFERENCE_PRECISION_HINT``;
it needs a CPU with native bfloat16, :func:`reconstruct.backends.select.cpu_bf16_native`), with
the CPU provider behind it. Session options: intra-op threads = torch's thread count (so ``torch.set_num_threads`` and
``OMP_NUM_THREADS`` govern both backends alike and comparisons are fair), one inter-op
thread, all graph optimisations. Sessions are cached by the caller per (weights sha256,
shape, provider, precision): building one costs tens of milliseconds plus the export the
first time a shape is seen.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import ModuleType

import numpy as np

from capture.errors import ReconstructionError
from reconstruct.backends.base import INPUT_NAMES, OUTPUT_NAMES, Backend, check_inputs

logger = logging.getLogger(__name__)

__all__ = ["OPENVINO_PROVIDER", "OnnxRuntimeBackend", "cuda_index", "import_onnxruntime", "providers_for"]

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
OPENVINO_PROVIDER = "OpenVINOExecutionProvider"
#: how to get OpenVINOExecutionProvider: a build of ONNX Runtime that replaces the plain one
OPENVINO_INSTALL = "pip uninstall -y onnxruntime && pip install onnxruntime-openvino"


def import_onnxruntime() -> ModuleType:
    """``onnxruntime``, or a ReconstructionError naming ``backend`` and the install extra."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ReconstructionError(
            f"backend: 'onnxruntime' needs the onnxruntime package (pip install 'dualfocus-rig[onnx]'): {exc}"
        ) from exc
    return onnxruntime


def providers_for(device: str, available: list[str], precision: str = "fp32", threads: int = 1) -> list:
    """The provider list for ``device`` (``cpu`` or ``cuda[:K]``) and ``precision`` given the
    installed ones: the CUDA provider with its ``device_id`` option set to K (0 for plain
    ``cuda``); on the CPU the CPU provider, or for ``bf16`` OpenVINO's told to compute in
    bfloat16 on ``threads`` threads (ReconstructionError naming ``precision`` where it is missing)."""
    if device == "cpu" and precision == "bf16":
        if OPENVINO_PROVIDER not in available:
            raise ReconstructionError(
                f"precision: bf16 in onnxruntime on the CPU needs {OPENVINO_PROVIDER} (the onnxruntime-openvino build: "
                f"{OPENVINO_INSTALL}); installed: {', '.join(available)}"
            )
        options = {"device_type": "CPU", "num_of_threads": str(int(threads)),
                   "load_config": json.dumps({"CPU": {"INFERENCE_PRECISION_HINT": "bf16"}})}
        return [(OPENVINO_PROVIDER, options), CPU_PROVIDER]
    if device.startswith("cuda"):
        if CUDA_PROVIDER not in available:
            raise ReconstructionError(
                f"backend: onnxruntime on cuda needs {CUDA_PROVIDER} (the onnxruntime-gpu package); installed: {', '.join(available)}"
            )
        return [(CUDA_PROVIDER, {"device_id": cuda_index(device)}), CPU_PROVIDER]
    return [CPU_PROVIDER]


def cuda_index(device: str) -> int:
    """K of ``cuda:K`` (0 for ``cuda``); ReconstructionError naming ``device`` otherwise."""
    _, _, index = device.partition(":")
    if not index:
        return 0
    if not index.isdigit():
        raise ReconstructionError(f"device: {device!r} is not cpu, cuda or cuda:K")
    return int(index)


class OnnxRuntimeBackend(Backend):
    """An ``InferenceSession`` on one exported graph.

    Args:
        onnx_path: the ``.onnx`` file (inputs ``stack``, ``focus``; outputs per the contract).
        device: ``cpu`` or ``cuda``.
        threads: intra-op threads; default ``torch.get_num_threads()``.
        precision: what the graph was exported in (``fp32``; ``fp16`` on CUDA; ``int8``, the
            quantised graph of :mod:`reconstruct.backends.quantize`, on the CPU), or ``bf16``
            on the CPU: the fp32 graph computed in bfloat16 by OpenVINO.
        ort: the onnxruntime module (tests may pass a stand-in).
    """

    name = "onnxruntime"

    def __init__(
        self,
        onnx_path: Path,
        *,
        device: str = "cpu",
        threads: int | None = None,
        precision: str = "fp32",
        ort: ModuleType | None = None,
    ) -> None:
        ort = ort or import_onnxruntime()
        if threads is None:
            import torch

            threads = torch.get_num_threads()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = providers_for(device, list(ort.get_available_providers()), precision, int(threads))
        try:
            self.session = ort.InferenceSession(str(onnx_path), opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ReconstructionError(f"backend: onnxruntime could not load {onnx_path} ({str(exc).splitlines()[0]})") from exc
        used = self.session.get_providers()
        if device.startswith("cuda") and CUDA_PROVIDER not in used:
            raise ReconstructionError(f"backend: onnxruntime did not start {CUDA_PROVIDER} (it runs {', '.join(used)})")
        if device == "cpu" and precision == "bf16" and OPENVINO_PROVIDER not in used:
            raise ReconstructionError(f"backend: onnxruntime did not start {OPENVINO_PROVIDER} for bf16 (it runs {', '.join(used)})")
        names = [i.name for i in self.session.get_inputs()]
        if sorted(names) != sorted(INPUT_NAMES):
            raise ReconstructionError(f"backend: {onnx_path} has inputs {names}, expected {list(INPUT_NAMES)}")
        self.device = f"cuda:{cuda_index(device)}" if device.startswith("cuda") else "cpu"
        self.precision = precision
        self.threads = int(threads)
        self.path = Path(onnx_path)
        logger.debug("onnxruntime session on %s (%s, %d threads)", onnx_path, ", ".join(used), threads)

    def run(self, stack: np.ndarray, focus: np.ndarray) -> dict[str, np.ndarray]:
        check_inputs(stack, focus)
        feeds = {"stack": np.ascontiguousarray(stack, np.float32), "focus": np.ascontiguousarray(focus, np.float32)}
        outs = self.session.run(list(OUTPUT_NAMES), feeds)
        return {name: np.asarray(v, np.float32) for name, v in zip(OUTPUT_NAMES, outs, strict=True)}
