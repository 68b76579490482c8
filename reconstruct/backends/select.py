"""Which backend runs the network: ``auto``, ``torch``, ``onnxruntime`` or ``tensorrt``
(``reconstruct.backend`` in rig.yaml, ``--backend`` on the command lines).

``auto``, in order:

1. **tensorrt** on the GPU, when torch sees a CUDA GPU and ``tensorrt`` imports;
2. **torch** on the GPU, when there is a CUDA GPU but no TensorRT;
3. on the CPU, the faster of torch and onnxruntime **as measured** by
   ``benchmarks/bench_backends.py`` on this machine (its ``backends_cpu.json``, looked for in
   the cache folder first, then in ``benchmarks/results/``, which git does not track); where
   the CPU computes bfloat16 natively (:func:`cpu_bf16_native`) and the precision setting
   allows it, torch is weighed by its bf16 figure, since that is how it will run, and a
   measurement without a bf16 figure does not decide against it; likewise onnxruntime by
   its bf16 figure where OpenVINOExecutionProvider is installed (:func:`openvino_available`:
   ONNX Runtime computes bf16 there), else by its fp32 one;
4. without a measurement, **torch**: on our 2-core AVX-512 machine torch ran dualfocus-s at
   10x288x384 in 354 ms (fp32, channels-last) and 215 ms (bf16) against ONNX Runtime's 392 ms
   (README, "Inference backends"). ONNX Runtime stays a choice by name, and wins ``auto``
   wherever the benchmark measured it faster; except that where its OpenVINO build is
   installed (:func:`openvino_available`) and bf16 may run, **onnxruntime in bf16** is the
   default until a measurement has both bf16 figures (80 against 158 ms on a 2-core Xeon with
   AMX: whoever installed that build wants it used).

``precision: int8`` (asked for by name: it changes the numbers slightly) makes ``auto`` and
``onnxruntime`` run ONNX Runtime's int8 graph on the CPU, GPU or not. ``precision: bf16`` on
the CPU makes ``auto`` weigh the two bf16 figures (torch, and onnxruntime where OpenVINO is
installed); without both, torch, or onnxruntime where OpenVINO is installed (point 4).

The choice is logged at INFO with its reason the first time (and whenever it changes), at
DEBUG on repeated calls, so a continuous run does not log it for every stack. An explicit
backend that cannot run here raises :class:`ReconstructionError` naming ``backend``, why,
and the backends that are available.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import sys
import threading
from pathlib import Path
from typing import NamedTuple

from capture.errors import ReconstructionError
from reconstruct.backends.export import cache_dir
from reconstruct.backends.onnxruntime_backend import OPENVINO_PROVIDER

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS", "LATENCY_FILE", "BackendChoice", "select_backend", "available_backends", "cuda_available",
    "tensorrt_problem", "onnxruntime_providers", "latency_files", "measured_cpu_latencies", "forget_logged_choices",
    "cpu_bf16_native", "openvino_available",
]

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
LATENCY_FILE = "backends_cpu.json"
REPO_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / LATENCY_FILE
DEFAULT_REASON = ("torch by default (no export step; on a 2-core "
                     "Zen 5 with native bfloat16 its bf16 path was the fastest float one, 194-217 ms per 10x288x384 stack against "
                     "ONNX Runtime fp32 340-354 ms and torch fp32 367-384 ms; without native bfloat16 ONNX Runtime fp32 may be the faster)")
UNMEASURED_REASON = f"no CPU measurement yet (benchmarks/bench_backends.py writes one); {DEFAULT_REASON}"

UNMEASURED_OPENVINO_REASON = ("onnxruntime in bf16 by default where its OpenVINO build is installed and the CPU computes bfloat16 "
                              "natively (on a 2-core Xeon with AMX it ran a 10x288x384 stack in 80 ms against torch bf16's 158 ms); "
                              "benchmarks/bench_backends.py measures both here")

_LOGGED: dict[str, tuple[str, str, str]] = {}
_LOG_LOCK = threading.Lock()


class BackendChoice(NamedTuple):
    """``name`` (torch, onnxruntime, tensorrt), ``device`` (cpu, cuda) and why."""

    name: str
    device: str
    reason: str


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@functools.cache
def cpu_bf16_native() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles), where torch's
    CPU bf16 autocast runs the network's convolutions about twice as fast as fp32. Without
    it oneDNN emulates bf16, which is slower than fp32, so bf16 is not offered there. Asked
    once per process (every stack's backend choice consults it)."""
    import torch

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # a private probe that changed: treat as absent
            continue
    return False


def _gpu_name() -> str:
    import torch

    try:
        return torch.cuda.get_device_name(0)
    except Exception:  # only for a message
        return "a CUDA GPU"


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (a module already in
    ``sys.modules``, a stand-in included, counts)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def tensorrt_problem() -> str | None:
    """None when the tensorrt package imports (version 10+), else why not."""
    if not _installed("tensorrt"):
        return "the tensorrt package is not installed (pip install 'dualfocus-rig[tensorrt]')"
    try:
        from reconstruct.backends.tensorrt_backend import import_tensorrt

        import_tensorrt()
    except ReconstructionError as exc:
        return str(exc).removeprefix("backend: ")
    except Exception as exc:  # a broken install can raise anything on import
        return f"importing tensorrt failed ({type(exc).__name__}: {exc})"
    return None


def onnxruntime_providers() -> list[str] | None:
    """The installed onnxruntime's execution providers, or None when it is not installed."""
    if not _installed("onnxruntime"):
        return None
    try:
        import onnxruntime
    except Exception:  # a broken install
        return None
    return list(onnxruntime.get_available_providers())


def openvino_available() -> bool:
    """Whether ONNX Runtime can compute bf16 on this CPU: the installed onnxruntime has
    OpenVINOExecutionProvider (the onnxruntime-openvino build) and the CPU computes
    bfloat16 natively."""
    return OPENVINO_PROVIDER in (onnxruntime_providers() or []) and cpu_bf16_native()


def available_backends() -> list[str]:
    """The backend names that can run here (``auto`` always can)."""
    names = ["auto", "torch"]
    if onnxruntime_providers() is not None:
        names.append("onnxruntime")
    if cuda_available() and tensorrt_problem() is None:
        names.append("tensorrt")
    return names


def latency_files() -> list[Path]:
    """Where ``bench_backends.py`` results are looked for, in order."""
    return [cache_dir() / LATENCY_FILE, REPO_RESULTS]


def measured_cpu_latencies() -> tuple[dict[str, float], Path, str] | None:
    """``({"torch": p50_ms, "onnxruntime": p50_ms[, "torch-bf16": p50_ms][, "onnxruntime-bf16":
    p50_ms]}, file, where-measured)`` from the first readable benchmark file that has both fp32
    CPU figures, or None (the bf16 figures only where the file has them)."""
    for path in latency_files():
        try:
            doc = json.loads(path.read_text())
            results = doc["results"]
            figures = {name: float(results[f"{name}-cpu"]["p50_ms"]) for name in ("torch", "onnxruntime")}
        except (OSError, ValueError, KeyError, TypeError):
            continue
        for name in ("torch-bf16", "onnxruntime-bf16"):
            try:
                figures[name] = float(results[f"{name}-cpu"]["p50_ms"])
            except (KeyError, TypeError, ValueError):
                pass
        machine = doc.get("machine", {}) if isinstance(doc.get("machine"), dict) else {}
        where = f"{machine.get('cpu', 'a CPU')}, {doc.get('threads', '?')} threads, {doc.get('model', '?')} at {'x'.join(str(s) for s in doc.get('shape', []))}"
        return figures, path, where
    return None


def _cpu_choice(precision: str = "auto") -> BackendChoice:
    ort_bf16 = openvino_available()  # implies a CPU with native bfloat16
    if precision == "bf16" and not ort_bf16:
        return BackendChoice("torch", "cpu", "no CUDA GPU; precision bf16 asked for, which on this CPU only torch runs "
                                             "(onnxruntime computes bf16 with OpenVINOExecutionProvider only)")
    providers = onnxruntime_providers()
    if providers is None:
        return BackendChoice("torch", "cpu", "no CUDA GPU; onnxruntime is not installed, so torch on the CPU")
    measured = measured_cpu_latencies()
    if measured is not None:
        figures, path, where = measured
        candidates = {"torch": (figures["torch"], "torch"), "onnxruntime": (figures["onnxruntime"], "onnxruntime")}
        if precision in ("auto", "bf16") and ort_bf16 and not {"torch-bf16", "onnxruntime-bf16"} <= set(figures):
            # onnxruntime would run bf16 in OpenVINO, which this file did not measure against torch's bf16
            return BackendChoice("onnxruntime", "cpu", f"no CUDA GPU; {path} has no figures for both bf16 paths; {UNMEASURED_OPENVINO_REASON}")
        if precision in ("auto", "bf16") and cpu_bf16_native():
            if "torch-bf16" not in figures:  # measured before bf16 was: it cannot speak for bf16 torch
                return BackendChoice(
                    "torch", "cpu",
                    f"no CUDA GPU; this CPU computes bfloat16 natively and {path} has no bf16 figure (measured before bf16 was; "
                    f"benchmarks/bench_backends.py measures it); {DEFAULT_REASON}",
                )
            candidates["torch"] = (figures["torch-bf16"], "torch (bf16, native on this CPU)")
            if ort_bf16:
                candidates["onnxruntime"] = (figures["onnxruntime-bf16"], "onnxruntime (bf16 in OpenVINO)")
        fast = min(candidates, key=lambda k: candidates[k][0])
        slow = "torch" if fast == "onnxruntime" else "onnxruntime"
        (fast_ms, fast_label), (slow_ms, slow_label) = candidates[fast], candidates[slow]
        return BackendChoice(
            fast, "cpu",
            f"no CUDA GPU; {fast_label} measured faster on the CPU: p50 {fast_ms:.0f} ms against {slow_label} {slow_ms:.0f} ms ({where}; {path})",
        )
    if precision in ("auto", "bf16") and ort_bf16:
        return BackendChoice("onnxruntime", "cpu", f"no CUDA GPU; {UNMEASURED_OPENVINO_REASON}")
    return BackendChoice("torch", "cpu", f"no CUDA GPU; {UNMEASURED_REASON}")


def _int8_choice(requested: str) -> BackendChoice:
    """ONNX Runtime on the CPU, the only place int8 runs (``auto`` and ``onnxruntime``)."""
    if onnxruntime_providers() is None:
        raise ReconstructionError(
            "precision: int8 runs in ONNX Runtime, and the onnxruntime package is not installed (pip install 'dualfocus-rig[onnx]')"
        )
    why = "precision int8 asked for, which runs in ONNX Runtime on the CPU" if requested == "auto" else "asked for; precision int8 runs on the CPU"
    return BackendChoice("onnxruntime", "cpu", why)


def _choose(requested: str, precision: str) -> BackendChoice:
    if requested not in BACKENDS:
        raise ReconstructionError(f"backend: unknown backend {requested!r}; valid: {', '.join(BACKENDS)}")
    if precision == "int8" and requested in ("auto", "onnxruntime"):
        return _int8_choice(requested)
    cuda = cuda_available()
    if requested == "auto":
        if cuda:
            problem = tensorrt_problem() if precision != "bf16" else "TensorRT engines here are fp32 or fp16, and bf16 was asked for"
            if problem is None:
                return BackendChoice("tensorrt", "cuda", f"CUDA GPU ({_gpu_name()}) and TensorRT found")
            return BackendChoice("torch", "cuda", f"CUDA GPU ({_gpu_name()}); no TensorRT: {problem}")
        return _cpu_choice(precision)
    if requested == "torch":
        return BackendChoice("torch", "cuda" if cuda else "cpu", "asked for" + ("" if cuda else "; no CUDA GPU, so the CPU"))
    if requested == "onnxruntime":
        providers = onnxruntime_providers()
        if providers is None:
            raise ReconstructionError(
                f"backend: 'onnxruntime' is not available: the onnxruntime package is not installed (pip install 'dualfocus-rig[onnx]'); "
                f"available here: {', '.join(available_backends())}"
            )
        on_gpu = cuda and "CUDAExecutionProvider" in providers
        return BackendChoice("onnxruntime", "cuda" if on_gpu else "cpu", "asked for" + ("" if on_gpu else "; CPUExecutionProvider"))
    # tensorrt
    problems = []
    if not cuda:
        problems.append("torch sees no CUDA GPU")
    problem = tensorrt_problem()
    if problem is not None:
        problems.append(problem)
    if problems:
        raise ReconstructionError(f"backend: 'tensorrt' is not available: {'; '.join(problems)}; available here: {', '.join(available_backends())}")
    return BackendChoice("tensorrt", "cuda", "asked for")


def select_backend(requested: str, precision: str = "auto") -> BackendChoice:
    """The backend, device and reason for a ``backend`` setting (module docstring), given the
    ``precision`` setting (it matters on the CPU only: bf16 runs in torch there, or in
    onnxruntime where OpenVINO is installed; int8 in onnxruntime);
    ReconstructionError for an unknown or unavailable one."""
    choice = _choose(requested, precision)
    with _LOG_LOCK:
        new = _LOGGED.get(requested) != tuple(choice)
        _LOGGED[requested] = tuple(choice)
    logger.log(logging.INFO if new else logging.DEBUG, "backend %s: %s on %s (%s)", requested, choice.name, choice.device, choice.reason)
    return choice


def forget_logged_choices() -> None:
    """Log the next choice at INFO again (tests, a new run)."""
    with _LOG_LOCK:
        _LOGGED.clear()
