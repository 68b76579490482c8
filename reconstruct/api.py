"""One stack to depth: the public entry point shared by ``python -m reconstruct`` and the rig.

>>> from capture.stack import FocalStack                                   # doctest: +SKIP
>>> result = reconstruct_stack(FocalStack.read("runs/.../stacks/000000"))  # doctest: +SKIP
>>> write_result(result, "out")                                           # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from capture.errors import CalibrationError, ReconstructionError
from capture.stack import FocalStack
from reconstruct.classical import FOCUS_MEASURES, ClassicalParams, depth_from_focus, fuse_all_in_focus
from reconstruct.result import DepthResult

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "ALIGN_MODES", "check_ready", "reconstruct_stack", "warm_up_network"]

METHODS = ("dualfocus", "classical")
ALIGN_MODES = ("apply", "estimate", "none")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ReconstructionError(f"method: unknown method {method!r}; valid: {', '.join(METHODS)}")


def check_ready(
    method: str, *, model: str = "dualfocus-s", weights: str | Path | None = None, backend: str = "auto", precision: str = "auto"
) -> None:
    """Fail early (before a capture) if ``method`` cannot run: unknown method or model,
    missing or non-safetensors weights, unavailable backend, a precision the backend's device
    cannot run."""
    _check_method(method)
    if method == "dualfocus":
        from reconstruct.backends.export import weights_identity
        from reconstruct.dualfocus.infer import resolve_precision, resolve_weights, select_backend

        weights_identity(resolve_weights(model, weights))  # a damaged file: before the capture, not after (memoised)
        resolve_precision(precision, select_backend(backend, precision))


def warm_up_network(
    image_hw: tuple[int, int], distances_m: Sequence[float], *, model: str = "dualfocus-s", weights: str | Path | None = None,
    backend: str = "auto", precision: str = "auto", input_scale: float | str = "auto",
) -> str:
    """Run the network once on a made-up stack of ``len(distances_m)`` slices of ``image_hw``
    (grey noise), so that its backend is open for that shape (export, quantisation, CUDA
    start-up, cuDNN's kernel search) before the first real stack; returns where it ran
    (``"cuda:0 (torch, fp16)"``). Errors are those of :func:`reconstruct_stack`."""
    from reconstruct.dualfocus.infer import predict, resolve_weights

    h, w = (int(v) for v in image_hw)
    distances = np.asarray(distances_m, np.float64)
    if distances.size < 2 or not np.all(distances > 0):
        raise ReconstructionError(f"warm-up: needs at least two positive focus distances, got {distances.tolist()}")
    rng = np.random.default_rng(0)
    slices = rng.random((distances.size, h, w), dtype=np.float32)
    pred = predict(slices, np.sort(1.0 / distances), weights=resolve_weights(model, weights), backend=backend,
                   precision=precision, input_scale=input_scale)
    return pred.describe()


def _all_slices_identical(images: np.ndarray) -> bool:
    """Whether every slice of ``[N, H, W(, C)]`` is the first one, pixel for pixel."""
    return bool(all(np.array_equal(images[i], images[0]) for i in range(1, images.shape[0])))


def reconstruct_stack(
    stack: FocalStack,
    *,
    method: str = "classical",
    focus_measure: str = "modified_laplacian",
    align: str = "apply",
    params: ClassicalParams | None = None,
    model: str = "dualfocus-s",
    weights: str | Path | None = None,
    backend: str = "auto",
    precision: str = "auto",
    input_scale: float | str = "auto",
) -> DepthResult:
    """Depth, confidence and all-in-focus image of a focal stack (any slice order).

    Args:
        stack: the stack as read or captured (:meth:`FocalStack.read` for a folder).
        method: ``classical`` (this function's default, for scripts without torch) or
            ``dualfocus`` (the network; the command lines' and rig.yaml's default).
        focus_measure: classical focus measure (see ``reconstruct.classical.FOCUS_MEASURES``).
        model, weights, backend: the network variant, its safetensors weights (default: the
            shipped ones) and where it runs (``auto`` = GPU if there is one, else CPU).
        precision: the network body's precision: ``auto`` (fp16 on a GPU; on the CPU bf16 in
            torch, or in ONNX Runtime's OpenVINO build, where the CPU has native bfloat16, else
            fp32), ``fp32``, ``fp16`` (GPU only) or ``bf16`` (a GPU, or torch or ONNX Runtime's
            OpenVINO build on such a CPU), ``int8`` (ONNX Runtime on the CPU).
        input_scale: the network sees the slices resized by this factor, its outputs are
            resized back (``predict``); ``auto`` (default): 1 up to 768 px on the long side,
            larger slices scaled down to it (a camera's full frame has blur wider than the
            network learnt); 1.5 was more accurate on the report split and less on the
            simulated scene, ~2.25x slower; below 1 is faster.
        align: ``apply`` the stack's stored per-slice ``alignment``, ``estimate`` it (needs the
            calibration module), or ``none``.
        params: all classical parameters at once (its ``focus_measure`` wins over the
            argument's, which must then be left at its default or agree).
    """
    if not isinstance(stack, FocalStack):
        hint = " (read a stack folder with FocalStack.read(path))" if isinstance(stack, (str, Path)) else ""
        raise ReconstructionError(f"stack: expected a FocalStack, got {type(stack).__name__}{hint}")
    if params is not None and not isinstance(params, ClassicalParams):
        raise ReconstructionError(f"params: expected a ClassicalParams, got {type(params).__name__}")
    if params is not None and focus_measure != "modified_laplacian" and focus_measure != params.focus_measure:
        raise ReconstructionError(f"focus_measure: {focus_measure!r} and params.focus_measure {params.focus_measure!r} disagree; give one")
    _check_method(method)
    if align not in ALIGN_MODES:
        raise ReconstructionError(f"align: unknown mode {align!r}; valid: {', '.join(ALIGN_MODES)}")
    if focus_measure not in FOCUS_MEASURES:
        raise ReconstructionError(f"focus_measure: unknown measure {focus_measure!r}; valid: {', '.join(FOCUS_MEASURES)}")
    # FOCAL_STACK_FORMAT.md's stages; "read" is 0 for a stack handed over in memory (a rig's),
    # and python -m reconstruct puts its own read time there
    seconds: dict[str, float] = {"read": 0.0}
    t0 = time.perf_counter()
    ordered = stack.sorted_by_focus()
    focus = ordered.focus_dpt
    if np.any(np.diff(focus) <= 0):
        key = "focus_distance_m" if stack.has_distances else "focus_index"
        values = stack.focus_dpt
        i, j = next(((i, j) for j in range(len(values)) for i in range(j) if values[i] == values[j]), (0, 1))
        raise ReconstructionError(f"stack: slices[{i}].{key} and slices[{j}].{key} are the same focus; each slice needs its own")
    aligned = False
    coverage: np.ndarray | None = None  # where every aligned slice shows the scene (not reflected border)
    if align == "apply" and ordered.has_alignment:
        coverage = ordered.alignment_coverage()
        ordered = ordered.aligned()
        aligned = True
    elif align == "estimate":
        from calibration.alignment import estimate_stack_alignment

        try:
            affines = estimate_stack_alignment(ordered)
        except CalibrationError as err:
            raise ReconstructionError(
                f"align: could not estimate the slice alignment from the images ({err}); "
                "use align='apply' with a calibrated alignment, or align='none'"
            ) from err
        # Lanczos, not aligned()'s bilinear: bilinear resampling blurs every slice but the
        # reference and biases the focus measures toward it (worse depth than no alignment)
        ordered = ordered.with_alignment(affines)
        coverage = ordered.alignment_coverage()
        ordered = ordered.aligned(interpolation="lanczos")
        aligned = True
    seconds["align"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    extra: dict = {}
    model_name = sha = None
    backend_name, device = "numpy", "cpu"
    if method == "dualfocus":
        from reconstruct.dualfocus.infer import predict, resolve_weights

        path = resolve_weights(model, weights)
        pred = predict(ordered.as_float(), focus, weights=path, backend=backend, precision=precision, input_scale=input_scale)
        focus_out, confidence = pred.depth_focus, pred.confidence
        aif = fuse_all_in_focus(ordered.images, pred.slice_position)
        from reconstruct.backends.export import weights_identity

        # the model the weights file holds (its metadata), not the argument's default
        model_name = weights_identity(path)[1] if weights is not None else model
        sha, backend_name, device = pred.sha256, pred.backend, pred.device
        extra["precision"] = pred.precision
        extra["weights"] = path.name
        extra["input_scale"] = round(float(pred.input_scale), 6)  # what the network saw ("auto" resolved)
    else:
        grey = ordered.to_grey_float()
        p = params or ClassicalParams(focus_measure=focus_measure)
        out = depth_from_focus(grey, focus, params=p, slices=ordered.images)
        focus_out, confidence, aif = out.focus_dpt, out.confidence, out.all_in_focus
        extra["focus_measure"] = p.focus_measure
    if coverage is not None and not coverage.all():
        # a pixel that some slice shows only as mirrored border content has no focus curve of its own
        confidence = np.where(coverage, confidence, np.float32(0.0))
        extra["alignment_coverage"] = round(float(coverage.mean()), 4)
        logger.info("alignment: %.1f %% of the pixels lie outside at least one slice after the warp: confidence 0 there",
                    100 * (1 - float(coverage.mean())))
    if _all_slices_identical(stack.images):
        # nothing changes from slice to slice, so nothing tells one focus from another; a network
        # would still answer (confidence up to 0.87 on such stacks), so the answer is declined here
        logger.warning("stack: all %d slices are the same image, pixel for pixel: no focus information (a camera that "
                       "repeats one frame, a covered lens, a saturated or unlit scene?); no depth (NaN), confidence 0",
                       stack.n_slices)
        focus_out = np.full(focus_out.shape, np.nan, np.float32)
        confidence = np.zeros(focus_out.shape, np.float32)
    if np.issubdtype(ordered.images.dtype, np.integer):
        aif = np.clip(np.rint(aif), 0, np.iinfo(ordered.images.dtype).max).astype(ordered.images.dtype)
    if stack.has_distances:
        with np.errstate(divide="ignore", invalid="ignore"):
            depth = np.where(focus_out > 0, 1.0 / focus_out, np.inf).astype(np.float32)
        depth[~np.isfinite(focus_out)] = np.nan
        unit = "metre"
    else:
        depth = focus_out.astype(np.float32)
        unit = "focus_index"
    seconds["infer"] = time.perf_counter() - t0
    return DepthResult(
        depth=depth,
        confidence=confidence.astype(np.float32),
        all_in_focus=aif,
        depth_unit=unit,
        method=method,
        backend=backend_name,
        device=device,
        slices=stack.n_slices,
        aligned=aligned,
        model=model_name,
        model_sha256=sha,
        seconds=seconds,
        extra=extra,
    )
