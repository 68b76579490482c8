"""int8 ONNX graphs for ONNX Runtime on the CPU: static quantisation of an exported fp32 graph.

The recipe (:data:`RECIPE`), chosen by measurement on the report split and at 10x288x384 on a
2-core AVX-512 VNNI CPU (README, "Inference backends"):

* ONNX Runtime's pre-processing (symbolic shape inference, graph optimisation), then
* every convolution that reads a tensor at more than half the input resolution stays float:
  these see the image itself (the stem's first block, written by the export as a convolution of
  the slices and one of the stack mean). Recipe v1 kept the half-resolution one float as well
  (report-split AbsRel 0.0350 with both quantised, 0.0340 with both float, 0.0337 in fp32);
  v2 to v5 quantised it (with activations fused, below, 0.0338), so the stem stayed in ONNX
  Runtime's NHWC int8 layout. Since v6 every node of the half-resolution stem
  (:data:`STEM_MARK`) stays float again: the stem was the largest single source of int8's
  departure from fp32 depth (benchmarks/study_int8_parity.py), and on the report stacks v6
  halves it (|int8 - torch| / focus range: mean 2.2e-3 -> 1.2e-3, p99 1.6e-2 -> 8.3e-3, within
  1e-3: 44 % -> 62 %; AbsRel 0.0339 both) for about 8 % of the speed (170 -> 183 ms at
  10x288x384 on a 2-core Intel Xeon);
* every convolution with fewer than :data:`MIN_INT8_OUT_CHANNELS` output channels stays float
  (the output heads, 4 and 1 channels, which the export writes as 2D convolutions with 12 and
  3: ONNX Runtime's int8 kernels ran them slower than fp32);
* a quantised convolution whose input channel count is not a multiple of
  :data:`CHANNEL_MULTIPLE` gets zero channels appended (one ``Pad`` per tensor before the
  convolutions that read it, and zero weights: exact in fp32). The 65- and 67-channel inputs of
  the gradient head and the decoder ran slower unpadded (v1, as 3D convolutions: 3x; v3, as 2D
  convolutions over the planes: 130 against 127 ms per stack), and 72 channels ran faster than
  80 (multiples of 16) or 96 (of 32);
* ``Relu``, ``Pad``, ``Slice`` and the sums between quantised tensors (:func:`float_sum_and_shift_names`)
  are quantised too (:data:`QUANTISED_OPS`): a ReLU after a convolution or a residual sum becomes
  the quantised output's clamp, and the export's plane shifts and sums of the 3D convolutions
  (``reconstruct.dualfocus.model.planes_conv3d``) run on uint8, so ONNX Runtime has no
  dequantise/quantise pair between one convolution and the next (v1 had one after every
  convolution: 10 ms per 10x288x384 stack); the other sums (the stem's first block, inside the
  float heads, the Poisson solve's divergence) stay float. ONNX Runtime keeps a quantised
  ``Pad`` in float between a dequantise and a quantise; :func:`pads_in_uint8` rewrites those as
  uint8 pads (exact: 12 ms per stack);
* QDQ format, weights int8 per output channel, activations uint8 with min/max ranges from
  :data:`CALIBRATION_STACKS` procedural stacks rendered with the project's image formation
  (seeded: the same graph every time, no dataset needed), at the graph's shape or, for stacks
  over :data:`CALIBRATION_MAX_PIXELS` per slice, at a scaled-down shape (:func:`calibration_shape`):
  ONNX Runtime's calibrator runs the graph unoptimised, so its peak memory grows with the pixels
  per stack (not with the number of stacks: it keeps only each tensor's min and max), and ranges measured at 10x288x384
  gave the same tuning-split AbsRel at 10x668x768 as ranges measured there (recipe v1: 0.0156 both; fp32
  0.0155) for 4.3 GB peak instead of 9.2 GB.

Softmax, the depth expectation and the confidence stay float32 (only ``Conv``, ``Relu``,
``Pad``, ``Slice`` and ``Add`` are quantised, by the rules above; the Poisson solve and the
resizes stay float).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from capture.errors import ReconstructionError

logger = logging.getLogger(__name__)

__all__ = ["RECIPE", "CALIBRATION_STACKS", "CALIBRATION_MAX_PIXELS", "CHANNEL_MULTIPLE", "MIN_INT8_OUT_CHANNELS", "calibration_feeds", "calibration_shape",
           "feed_reader", "float_sum_and_shift_names", "float_conv_names", "pad_conv_channels", "prepare_graph", "quantize_int8", "quantiser_settings"]

RECIPE = "int8-qdq-v6"  # part of the cache key: change it when the recipe changes
CALIBRATION_STACKS = 4
CHANNEL_MULTIPLE = 8
MIN_INT8_OUT_CHANNELS = 16
QUANTISED_OPS = ("Conv", "Relu", "Add", "Pad", "Slice")
#: the half-resolution stem of the 2D encoder (every node of it stays float since recipe v6)
STEM_MARK = "/encoder/stem."
CALIBRATION_SEED = 1000
CALIBRATION_MAX_PIXELS = 288 * 384


def calibration_feeds(shape: tuple[int, int, int], count: int = CALIBRATION_STACKS, seed: int = CALIBRATION_SEED) -> list[dict[str, np.ndarray]]:
    """``count`` seeded procedural stacks of ``shape = (N, H, W)`` as ONNX feeds: ``stack``
    ``[1, N, 3, H, W]`` float32 in [0, 1], ``focus`` ``[1, N]`` (disparity units, even over the
    scene's 1-99 % range), largest blur 14 px, noise sigma 0.01, like the evaluation stacks."""
    from capture.scenes import procedural_scene
    from reconstruct.synth import render_calibration_stack

    n, h, w = (int(s) for s in shape)
    feeds = []
    for k in range(count):
        scene = procedural_scene(w, h, near_m=0.3 + 0.1 * k, far_m=2.0 + k, seed=seed + k)
        stack_u8, focus = render_calibration_stack(scene.radiance, (1.0 / scene.depth_m).astype(np.float32), slices=n, seed=seed + k)
        feeds.append({
            "stack": np.ascontiguousarray(stack_u8.transpose(0, 3, 1, 2)[None], np.float32) / np.float32(255.0),
            "focus": focus[None].astype(np.float32),
        })
    return feeds


def _shapes(model) -> dict[str, list[int]]:
    """Static shapes of the graph's tensors (after shape inference), by name."""
    out: dict[str, list[int]] = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
        out[vi.name] = dims
    return out


def float_conv_names(model, shape: tuple[int, int, int]) -> list[str]:
    """The ``Conv`` nodes the recipe keeps in float: those reading more than (H/2)x(W/2)
    positions per plane, and the output heads: fewer than :data:`MIN_INT8_OUT_CHANNELS`
    outputs, or, written by the export as one 2D convolution with an output set per plane offset
    (``conv3d_as_planes``, its output reshaped into the three sets), fewer per set."""
    from onnx import numpy_helper

    _n, h, w = shape
    shapes = _shapes(model)
    inits = {i.name: i for i in model.graph.initializer}
    reshaped = {name for node in model.graph.node if node.op_type == "Reshape" for name in node.input[:1]}
    keep = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        dims = shapes.get(node.input[0])
        if dims is None or len(dims) < 3 or min(dims[-2:]) < 0:
            raise ReconstructionError(f"backend: int8 quantisation needs static shapes, and {node.name}'s input has none")
        weight = inits.get(node.input[1])
        out_channels = numpy_helper.to_array(weight).shape[0] if weight is not None else MIN_INT8_OUT_CHANNELS
        head = out_channels < MIN_INT8_OUT_CHANNELS or (
            node.output[0] in reshaped and out_channels % 3 == 0 and out_channels // 3 < MIN_INT8_OUT_CHANNELS)
        if dims[-2] * dims[-1] > (h // 2) * (w // 2) or head:
            keep.append(node.name)
    return keep


def _links(model) -> tuple[dict, dict[str, list]]:
    """The graph's producer of each tensor, and the nodes reading each tensor, by name."""
    producers = {name: node for node in model.graph.node for name in node.output}
    users: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return producers, users


def float_sum_and_shift_names(model, float_convs: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The ``Add``, ``Pad`` and ``Slice`` nodes the recipe keeps in float (the other two ops are
    in :data:`QUANTISED_OPS` too). An ``Add`` is quantised when each input is a quantised tensor
    (the output of a ``Conv`` not in ``float_convs``, of a ``Relu``, or of a quantised ``Add``,
    ``Pad`` or ``Slice``) and each user takes one (``Relu``, a quantised ``Conv``, ``Add``,
    ``Pad`` or ``Slice``): the residual sums and the plane sums of the export's 3D convolutions.
    A ``Pad`` or ``Slice`` is quantised when its input is a quantised tensor (the plane shifts)
    or its users are all quantised convolutions (the channel padding). The others stay float:
    the stem's first sum (a float convolution plus the stack-mean and focus-position terms:
    rounding each to 8 bits before the sum cost report-split AbsRel 0.0338 -> 0.0355), the sums
    inside the float heads, and the Poisson solve's pads and sums, which read the float
    gradient head's output."""
    producers, user_nodes = _links(model)
    movers = ("Pad", "Slice")
    candidates = [node for node in model.graph.node if node.op_type == "Add" or (node.op_type in movers and node.op_type in QUANTISED_OPS)]
    quantised = {node.name for node in candidates}

    def int8_conv(node) -> bool:
        return node.op_type == "Conv" and node.name not in float_convs

    def quantised_source(name: str) -> bool:
        src = producers.get(name)
        return src is not None and (src.op_type == "Relu" or int8_conv(src) or src.name in quantised)

    def quantised_user(node) -> bool:
        return node.op_type == "Relu" or int8_conv(node) or node.name in quantised

    changed = True
    while changed:  # drop nodes until every one left reads (and, for sums, feeds) quantised tensors
        changed = False
        for node in candidates:
            if node.name not in quantised:
                continue
            users = user_nodes.get(node.output[0], [])
            if node.op_type == "Add":
                ok = all(quantised_source(i) for i in node.input) and bool(users) and all(quantised_user(u) for u in users)
            else:
                ok = quantised_source(node.input[0]) or (bool(users) and all(int8_conv(u) for u in users))
            if not ok:
                quantised.discard(node.name)
                changed = True
    return [node.name for node in candidates if node.name not in quantised]


def pad_conv_channels(model, names: set[str] | None = None, multiple: int | None = None) -> list[str]:
    """Append zero input channels to ``Conv`` nodes (all, or those in ``names``) whose input
    channel count is not a multiple of ``multiple``: a ``Pad`` on the channel axis before the
    convolution (one per padded tensor, shared by the convolutions that read it) and zero weight
    columns, so the output is unchanged. Ungrouped convolutions
    with a weight initializer only. Edits ``model`` in place; returns the names padded."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    padded, nodes = [], []
    shared: dict[str, str] = {}
    for node in graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        weight = inits.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if weight is not None and group == 1 and (names is None or node.name in names) and users.get(node.input[1], 0) == 1:
            w = numpy_helper.to_array(weight)
            extra = -w.shape[1] % (multiple or CHANNEL_MULTIPLE)
            if extra:
                w = np.concatenate([w, np.zeros((w.shape[0], extra, *w.shape[2:]), w.dtype)], axis=1)
                weight.CopyFrom(numpy_helper.from_array(w, node.input[1]))
                if node.input[0] not in shared:  # one Pad per tensor, however many convolutions read it
                    pads = np.zeros(2 * w.ndim, np.int64)
                    pads[w.ndim + 1] = extra  # end of the channel axis
                    tag = f"{node.name}_channel_pad"
                    graph.initializer.append(numpy_helper.from_array(pads, f"{tag}_pads"))
                    nodes.append(helper.make_node("Pad", [node.input[0], f"{tag}_pads"], [f"{tag}_out"], name=tag, mode="constant"))
                    shared[node.input[0]] = f"{tag}_out"
                node.input[0] = shared[node.input[0]]
                padded.append(node.name)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return padded


def pads_in_uint8(model) -> int:
    """Rewrite each ``DequantizeLinear -> Pad -> QuantizeLinear`` whose two quantisations share
    scale and zero point (the quantiser's form of a quantised ``Pad``, which ONNX Runtime runs in
    float between the two) as a ``Pad`` of the uint8 tensor with the zero point as its constant:
    exact, since the zero point is what 0.0 quantises to. These are the plane shifts of the
    export's 3D convolutions (``planes_conv3d``) and the channel padding: a dequantise, a float
    pad and a quantise each, ~1 ms per shift before, ~0.1 ms after. Edits ``model`` in place;
    returns how many it rewrote."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    producers, users = _links(model)
    outputs = {out.name for out in graph.output}

    def const(node, k: int) -> np.ndarray | None:
        init = inits.get(node.input[k]) if len(node.input) > k and node.input[k] else None
        return numpy_helper.to_array(init) if init is not None else None

    dropped: set[int] = set()
    count = 0
    for pad in graph.node:
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        dq = producers.get(pad.input[0]) if pad.op_type == "Pad" else None
        if dq is None or dq.op_type != "DequantizeLinear" or mode != b"constant" or pad.output[0] in outputs:
            continue
        after = users.get(pad.output[0], [])
        if len(after) != 1 or after[0].op_type != "QuantizeLinear":
            continue
        q = after[0]
        scales, zeros = (const(dq, 1), const(q, 1)), (const(dq, 2), const(q, 2))
        fill = const(pad, 2) if len(pad.input) > 2 and pad.input[2] else np.float32(0.0)
        if (any(v is None for v in (*scales, *zeros, fill)) or zeros[0].ndim != 0 or float(fill) != 0.0
                or zeros[0].dtype != zeros[1].dtype
                or not (np.array_equal(scales[0], scales[1]) and np.array_equal(zeros[0], zeros[1]))):
            continue
        pad.input[:] = [dq.input[0], pad.input[1], dq.input[2], *pad.input[3:]]
        pad.output[0] = q.output[0]
        dropped.add(id(q))
        count += 1
    read = {name for node in graph.node if id(node) not in dropped for name in node.input}
    for node in graph.node:  # dequantisations left without a reader (one can feed several rewritten pads)
        if node.op_type == "DequantizeLinear" and node.output[0] not in read and node.output[0] not in outputs:
            dropped.add(id(node))
    kept = [node for node in graph.node if id(node) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    return count


def calibration_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The shape the activation ranges are measured at for a graph of ``shape``: the same slice
    count, and H, W scaled down (multiples of 4, same aspect) to at most
    :data:`CALIBRATION_MAX_PIXELS` per slice. ONNX Runtime's calibrator runs the graph unoptimised,
    with a min/max reduction on every tensor: its peak memory grows with the pixels per stack, not
    with the number of stacks (10x288x384, recipe v5: 2.0 GB with one calibration stack, 3.6 GB
    with four or eight)."""
    n, h, w = (int(s) for s in shape)
    if h * w <= CALIBRATION_MAX_PIXELS:
        return n, h, w
    scale = (CALIBRATION_MAX_PIXELS / (h * w)) ** 0.5
    return n, max(8, int(h * scale) // 4 * 4), max(8, int(w * scale) // 4 * 4)


def prepare_graph(fp32_onnx: Path, shape: tuple[int, int, int], folder: Path) -> tuple[Path, list[str], list[str], set[str], list[str]]:
    """Pre-processed and channel-padded copy of ``fp32_onnx`` in ``folder``: (its path, the
    convolutions kept float, the sums, pads and slices kept float, the convolutions to quantise,
    those padded)."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    folder.mkdir(parents=True, exist_ok=True)
    pre = folder / "pre.onnx"
    quant_pre_process(str(fp32_onnx), str(pre))
    model = onnx.load(str(pre))
    stem = [n for n in model.graph.node if STEM_MARK in n.name and n.op_type in QUANTISED_OPS]
    keep = float_conv_names(model, shape)
    keep += [n.name for n in stem if n.op_type == "Conv" and n.name not in keep]
    quantised = {n.name for n in model.graph.node if n.op_type == "Conv"} - set(keep)
    padded = pad_conv_channels(model, quantised)
    del model.graph.value_info[:]  # the padded tensors' shapes changed: let ONNX Runtime infer them again
    path = folder / "padded.onnx"
    onnx.save(model, str(path))
    floats = float_sum_and_shift_names(model, keep)
    floats += [n.name for n in stem if n.op_type != "Conv" and n.name not in floats]
    return path, keep, floats, quantised, padded


def check_quantiser_version(quantize_static: Callable) -> None:
    """ReconstructionError naming ``precision`` and the installed version where ONNX Runtime's
    ``quantize_static`` cannot take the activation ranges measured on another graph
    (``calibration_cache_path``, ONNX Runtime 1.27 and newer; 1.26 and older raise a TypeError
    deep inside the quantisation)."""
    if "calibration_cache_path" in inspect.signature(quantize_static).parameters:
        return
    import onnxruntime

    if _installed_distribution("onnxruntime-openvino"):  # the OpenVINO build: installing the plain wheel over it breaks both
        installed = (f"onnxruntime-openvino {onnxruntime.__version__}, whose quantiser is older (the plain build has it: "
                     "ORT_BUILD=plain ./setup.sh); fp32 and bf16 run in it")
    else:
        installed = f"onnxruntime {onnxruntime.__version__} (pip install -U 'onnxruntime>=1.27'); fp32 runs in it"
    raise ReconstructionError(
        f"precision: int8 needs onnxruntime 1.27 or newer (its quantiser takes activation ranges measured on another graph); installed: {installed}"
    )


def _installed_distribution(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def check_int8_support() -> None:
    """ReconstructionError naming ``precision`` where int8 cannot run here: onnx or onnxruntime
    missing, or a quantiser too old for the recipe (:func:`check_quantiser_version`). Cheap
    after the first call (the imports are cached)."""
    try:
        import onnx  # noqa: F401
        from onnxruntime.quantization import quantize_static
    except ImportError as exc:
        raise ReconstructionError(f"precision: int8 needs the onnx and onnxruntime packages (pip install 'dualfocus-rig[onnx]'): {exc}") from exc
    check_quantiser_version(quantize_static)


def quantiser_settings() -> dict:
    """The keyword arguments of ONNX Runtime's ``quantize_static`` that make the recipe: QDQ,
    int8 weights per output channel, uint8 activations with min/max ranges, only
    :data:`QUANTISED_OPS`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    return {"quant_format": QuantFormat.QDQ, "per_channel": True, "activation_type": QuantType.QUInt8,
            "weight_type": QuantType.QInt8, "op_types_to_quantize": list(QUANTISED_OPS), "calibrate_method": CalibrationMethod.MinMax}


def feed_reader(feeds: list[dict[str, np.ndarray]]):  # an onnxruntime CalibrationDataReader
    """ONNX Runtime's calibration reader over ``feeds``, once through."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    return _Reader()


def quantize_int8(
    fp32_onnx: Path, out: Path, shape: tuple[int, int, int], *, calibration_onnx: Path | None = None,
) -> dict:
    """Write the int8 graph of ``fp32_onnx`` (exported for ``shape``) to ``out`` by the module's
    recipe; returns what it did (float convolutions, padded ones, calibration stacks).

    ``calibration_onnx``: the fp32 graph exported for :func:`calibration_shape` ``(shape)``,
    where that differs from ``shape``: the activation ranges are measured on it (tensor names do
    not depend on the shape) and applied to the graph of ``shape``."""
    check_int8_support()
    import onnx
    from onnxruntime.quantization import quantize_static

    cal_shape = calibration_shape(shape)
    if cal_shape != tuple(shape) and calibration_onnx is None:
        raise ReconstructionError(f"backend: int8 quantisation for {'x'.join(map(str, shape))} needs the graph for {'x'.join(map(str, cal_shape))} to calibrate on")
    feeds = calibration_feeds(cal_shape)
    settings = quantiser_settings()

    with tempfile.TemporaryDirectory(prefix="dualfocus-int8-") as tmp:
        ranges = Path(tmp) / "ranges.json"
        target, keep, float_sums_pads_slices, quantised, padded = prepare_graph(fp32_onnx, shape, Path(tmp) / "target")
        if cal_shape != tuple(shape):
            cal, cal_keep, cal_sums_pads_slices, _q, _p = prepare_graph(calibration_onnx, cal_shape, Path(tmp) / "calibration")
            quantize_static(str(cal), str(Path(tmp) / "calibration" / "int8.onnx"), feed_reader(feeds), nodes_to_exclude=cal_keep + cal_sums_pads_slices,
                            calibration_cache_path=ranges, **settings)
            quantize_static(str(target), str(out), None, nodes_to_exclude=keep + float_sums_pads_slices, calibration_cache_path=ranges, **settings)
        else:
            quantize_static(str(target), str(out), feed_reader(feeds), nodes_to_exclude=keep + float_sums_pads_slices, **settings)
        model = onnx.load(str(out))
        uint8_pads = pads_in_uint8(model)
        onnx.save(model, str(out))
    logger.info("int8 graph of %s: %d convolutions int8, %d float (%s), %d channel-padded, %d sums, pads and slices float, %d pads in uint8; ranges from %d stacks of %s",
                fp32_onnx.name, len(quantised), len(keep), ", ".join(keep), len(padded), len(float_sums_pads_slices), uint8_pads, len(feeds), "x".join(map(str, cal_shape)))
    return {"recipe": RECIPE, "float_convs": keep, "float_sums_pads_slices": float_sums_pads_slices, "padded_convs": padded, "uint8_pads": uint8_pads, "calibration_stacks": len(feeds),
            "calibration_seed": CALIBRATION_SEED, "calibration_shape": list(cal_shape)}
