"""Inference backends (reconstruct/backends, reconstruct/dualfocus/infer.py, reconstruct/export.py):
torch and ONNX Runtime parity, the ONNX export cache, backend selection, the TensorRT cache
and rebuild logic against a stand-in ``tensorrt`` module, the export command line, and the GPU
check's refusal on a machine without CUDA. Tiny shapes and the ``dualfocus-tiny`` variant;
the shipped ``dualfocus-s`` once, at a small shape."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from capture.errors import ReconstructionError
from capture.stack import FocalStack
from reconstruct.backends import export as export_mod
from reconstruct.backends import select as select_mod
from reconstruct.backends import tensorrt_backend as trt_mod
from reconstruct.backends.base import OUTPUT_NAMES, InferenceGraph
from reconstruct.dualfocus import infer
from reconstruct.dualfocus.checkpoint import load_weights, save_weights
from reconstruct.dualfocus.model import DualFocusNet
from reconstruct.dualfocus.registry import build_model

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("onnxruntime")


# ------------------------------------------------------------------------------ fixtures
def _tiny_net(seed: int) -> DualFocusNet:
    """A tiny network with non-trivial BatchNorm statistics (a fresh one has mean 0, var 1)."""
    torch.manual_seed(seed)
    net = build_model("dualfocus-tiny").eval()
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return net


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_weights(_tiny_net(0), tmp_path_factory.mktemp("weights") / "tiny.safetensors", name="dualfocus-tiny")


@pytest.fixture(autouse=True)
def _isolated(isolated_cache: Path) -> Path:
    """Every test in this file runs with ``isolated_cache`` (conftest)."""
    return isolated_cache


def _stack(n: int = 5, h: int = 30, w: int = 45, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    slices = rng.random((n, h, w), dtype=np.float32)
    focus = rng.permutation(np.linspace(0.4, 2.5, n)).astype(np.float32)  # unsorted on purpose
    return slices, focus


def _reference(weights: Path, slices: np.ndarray, focus: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``predict`` as it was before backends existed (torch, eager), for grey slices."""
    model, _ = load_weights(weights)
    x = torch.from_numpy(slices)[..., None].expand(*slices.shape, 3).permute(0, 3, 1, 2)[None]
    h, w = x.shape[-2:]
    ph, pw = (-h) % 4, (-w) % 4
    x = F.pad(x.reshape(-1, 3, h, w), (0, pw, 0, ph), mode="replicate").reshape(1, -1, 3, h + ph, w + pw)
    f = torch.from_numpy(focus)[None]
    with torch.inference_mode():
        out = model(x, f)
        depth = DualFocusNet.to_focus_units(out.depth, f)[0, :h, :w]
        n = out.prob.shape[1]
        pos = (out.prob[0, :, :h, :w] * torch.arange(n, dtype=out.prob.dtype)[:, None, None]).sum(0)
        conf = out.confidence[0, :h, :w]
    return depth.numpy(), conf.numpy(), pos.numpy()


# ------------------------------------------------------------------------------ parity
def test_torch_backend_is_the_previous_predict(tiny_weights: Path) -> None:
    slices, focus = _stack()
    pred = infer.predict(slices, focus, weights=tiny_weights, backend="torch", precision="fp32")
    depth, conf, pos = _reference(tiny_weights, slices, focus)
    assert pred.device == "cpu" and pred.describe() == "cpu (torch)" and pred.backend == "torch"
    assert pred.depth_focus.shape == (30, 45)
    # the backend runs channels-last weights (oneDNN's NHWC kernels), which sum the same terms
    # in another order: equal to float32 rounding, not bit for bit
    np.testing.assert_allclose(pred.depth_focus, depth, atol=1e-5, rtol=0)
    np.testing.assert_allclose(pred.confidence, conf, atol=1e-5, rtol=0)
    # the expected slice index is summed inside the graph over the padded image
    np.testing.assert_allclose(pred.slice_position, pos, atol=1e-6, rtol=0)


def test_onnxruntime_matches_torch(tiny_weights: Path) -> None:
    slices, focus = _stack(n=5)
    ref = infer.predict(slices, focus, weights=tiny_weights, backend="torch", precision="fp32")
    ort = infer.predict(slices, focus, weights=tiny_weights, backend="onnxruntime", precision="fp32")
    assert ort.device == "cpu" and ort.describe() == "cpu (onnxruntime)" and ort.backend == "onnxruntime"
    depth_range = float(focus.max() - focus.min())
    diff = float(np.abs(ort.depth_focus - ref.depth_focus).max())
    print(f"tiny 5x32x48: max |depth diff| {diff:.2e} = {diff / depth_range:.2e} of the depth range")
    assert diff <= 1e-3 * depth_range
    np.testing.assert_allclose(ort.confidence, ref.confidence, atol=1e-3, rtol=0)
    np.testing.assert_allclose(ort.slice_position, ref.slice_position, atol=1e-3 * (len(focus) - 1), rtol=0)
    assert ort.sha256 == ref.sha256


def test_exported_slice_sort_takes_a_constant_k(tiny_weights: Path) -> None:
    """The slices are sorted by focus with TopK; its K must be a constant one-element tensor:
    ONNX Runtime 1.24 and 1.26 refuse at load a K computed from Shape (as torch.sort exports it),
    so every graph failed there. Unsorted focus still gives torch's depth (test above)."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    art = export_mod.export_onnx(tiny_weights, (5, 32, 48))
    graph = onnx.load(str(art.path)).graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    constants.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    topk = [n for n in graph.node if n.op_type == "TopK"]
    assert topk, "the slice sort is no longer a TopK: check what replaced it loads in older ONNX Runtime"
    for node in topk:
        assert node.input[1] in constants, f"{node.name}: K comes from {node.input[1]}, not a constant"
        k = constants[node.input[1]]
        assert k.shape == (1,) and int(k[0]) == 5


def test_shipped_dualfocus_s_parity_at_a_small_shape() -> None:
    weights = infer.shipped_weights("dualfocus-s")
    rng = np.random.default_rng(3)
    # a textured scene blurred differently per slice: the network sees a plausible stack
    base = rng.random((64, 96)).astype(np.float32)
    slices = np.stack([F.avg_pool2d(torch.from_numpy(base)[None, None], k, 1, k // 2, count_include_pad=False)[0, 0].numpy()
                       for k in (1, 3, 5, 7, 9, 11)])
    focus = np.linspace(0.5, 2.5, 6).astype(np.float32)
    ref = infer.predict(slices, focus, weights=weights, backend="torch", precision="fp32")
    ort = infer.predict(slices, focus, weights=weights, backend="onnxruntime", precision="fp32")
    diff = float(np.abs(ort.depth_focus - ref.depth_focus).max())
    print(f"dualfocus-s 6x64x96: max |depth diff| {diff:.2e} dpt = {diff / 2.0:.2e} of the depth range")
    assert diff <= 1e-3 * 2.0
    np.testing.assert_allclose(ort.confidence, ref.confidence, atol=1e-3, rtol=0)


def test_fp16_graph_keeps_softmax_and_expectation_fp32(tiny_weights: Path) -> None:
    """The graph TensorRT builds fp16 engines from: half body, float32 head; checked on the CPU."""
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort

    art16 = export_mod.export_onnx(tiny_weights, (3, 32, 48), precision="fp16")
    art32 = export_mod.export_onnx(tiny_weights, (3, 32, 48))
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(art16.path)))
    types_ = {v.name: v.type.tensor_type.elem_type for v in [*proto.graph.value_info, *proto.graph.input, *proto.graph.output]}
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert any(n.op_type == "Conv" and types_.get(n.input[0]) == f16 for n in proto.graph.node)  # the body is half
    # the head: everything computed from the upsampled logits (the graph's last Resize)
    nodes = list(proto.graph.node)
    last_resize = max(i for i, n in enumerate(nodes) if n.op_type == "Resize")
    reached = set(nodes[last_resize].output)
    downstream = []
    for n in nodes[last_resize + 1:]:
        if reached & set(n.input):
            reached |= set(n.output)
            downstream.append(n)
    head = [n for n in downstream if n.op_type in ("Softmax", "ReduceMax", "Exp", "Div", "ReduceSum")]
    assert {"ReduceMax", "Exp", "Div", "ReduceSum"} <= {n.op_type for n in head}  # the softmax, written out, and the expectation
    assert head and all(types_.get(n.output[0]) == f32 for n in head), [(n.op_type, types_.get(n.output[0])) for n in head]
    assert all(types_[name] == f32 for name in ("stack", "focus", *OUTPUT_NAMES))
    rng = np.random.default_rng(1)
    feeds = {"stack": rng.random((1, 3, 3, 32, 48), dtype=np.float32), "focus": np.array([[1.5, 0.5, 1.0]], np.float32)}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    out16 = ort.InferenceSession(str(art16.path), opts, providers=["CPUExecutionProvider"]).run(list(OUTPUT_NAMES), feeds)
    out32 = ort.InferenceSession(str(art32.path), opts, providers=["CPUExecutionProvider"]).run(list(OUTPUT_NAMES), feeds)
    assert float(np.abs(out16[0] - out32[0]).max()) < 1e-2  # normalised depth


def test_inference_graph_fp32_is_the_network(tiny_weights: Path) -> None:
    net, _ = load_weights(tiny_weights)
    x, f = torch.rand(1, 4, 3, 16, 24), torch.tensor([[2.0, 0.5, 1.0, 1.5]])
    with torch.no_grad():
        depth, conf, pos = InferenceGraph(net)(x, f)
        out = net(x, f)
    assert torch.equal(depth, out.depth) and torch.equal(conf, out.confidence)
    torch.testing.assert_close(pos, (out.prob * torch.arange(4.0)[None, :, None, None]).sum(1))


# ------------------------------------------------------------------------------ export cache
def test_export_cache_hit_and_miss(tiny_weights: Path, tmp_path: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []
    real = export_mod._torch_export
    monkeypatch.setattr(export_mod, "_torch_export", lambda graph, shape, path, opset: (calls.append(shape), real(graph, shape, path, opset)))
    first = export_mod.export_onnx(tiny_weights, (3, 32, 48))
    assert not first.reused and first.path.is_file() and first.path.parent == isolated_cache / "onnx"
    assert first.path.with_suffix(".json").is_file()
    mtime = first.path.stat().st_mtime_ns
    second = export_mod.export_onnx(tiny_weights, (3, 32, 48))
    assert second.reused and second.path == first.path and second.sha256 == first.sha256
    assert len(calls) == 1 and first.path.stat().st_mtime_ns == mtime
    # another shape: a new export
    other = export_mod.export_onnx(tiny_weights, (4, 32, 48))
    assert not other.reused and other.path != first.path and len(calls) == 2
    # changed weights (same path): a new export
    weights = tmp_path / "w.safetensors"
    save_weights(_tiny_net(1), weights, name="dualfocus-tiny")
    a = export_mod.export_onnx(weights, (3, 32, 48))
    save_weights(_tiny_net(2), weights, name="dualfocus-tiny")
    os.utime(weights, ns=(a.path.stat().st_mtime_ns + 10**9,) * 2)
    b = export_mod.export_onnx(weights, (3, 32, 48))
    assert not b.reused and b.path != a.path and len(calls) == 4
    # a damaged cache entry is exported again, under the same name
    b.path.write_bytes(b"not onnx")
    c = export_mod.export_onnx(weights, (3, 32, 48))
    assert not c.reused and c.path == b.path and c.sha256 == b.sha256 and len(calls) == 5
    assert not [p for p in (isolated_cache / "onnx").iterdir() if p.name.endswith(".tmp")]


def _cache_entry(folder: Path, name: str, size: int, used: float) -> Path:
    graph = folder / f"{name}.onnx"
    graph.write_bytes(b"x" * size)
    graph.with_suffix(".json").write_text("{}")
    os.utime(graph.with_suffix(".json"), (used, used))
    return graph


def test_prune_cache_removes_stale_temporary_files_and_the_least_recently_used_entries(tmp_path: Path) -> None:
    now = 1_000_000.0
    a, b, c = (_cache_entry(tmp_path, n, 1000, now - age) for n, age in (("a", 300), ("b", 200), ("c", 100)))
    stale, live = tmp_path / ".b.onnx.x1.tmp", tmp_path / ".d.onnx.x2.tmp"
    for path, age in ((stale, 7200), (live, 10)):
        path.write_bytes(b"t")
        os.utime(path, (now - age, now - age))
    # budget for two entries; a is the oldest but kept (the entry just written), so b goes
    removed = export_mod.prune_cache(tmp_path, keep={a}, max_bytes=2 * 1002 + 10, now=now)
    assert set(removed) == {stale, b, b.with_suffix(".json")}
    assert a.exists() and c.exists() and live.exists()
    # under budget or no limit: only stale temporary files ever go
    assert export_mod.prune_cache(tmp_path, keep=set(), max_bytes=None, now=now + 7200) == [live]
    assert export_mod.prune_cache(tmp_path, keep=set(), max_bytes=10**9, now=now) == []


def test_export_cache_stays_under_its_limit_and_a_hit_counts_as_use(
    tiny_weights: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shape_a, shape_b, shape_c = (3, 16, 16), (4, 16, 16), (5, 16, 16)
    art_a = export_mod.export_onnx(tiny_weights, shape_a)
    art_b = export_mod.export_onnx(tiny_weights, shape_b)
    entry = max(p.stat().st_size + p.with_suffix(".json").stat().st_size for p in (art_a.path, art_b.path))
    t = time.time()
    os.utime(art_a.path.with_suffix(".json"), (t - 20, t - 20))  # a is the older entry ...
    os.utime(art_b.path.with_suffix(".json"), (t - 10, t - 10))
    assert export_mod.export_onnx(tiny_weights, shape_a).reused  # ... until this hit uses it again
    monkeypatch.setenv(export_mod.CACHE_MAX_ENV, f"{2.5 * entry / 2**20:.6f}")
    art_c = export_mod.export_onnx(tiny_weights, shape_c)
    assert art_a.path.exists() and art_c.path.exists()
    assert not art_b.path.exists() and not art_b.path.with_suffix(".json").exists()
    monkeypatch.setenv(export_mod.CACHE_MAX_ENV, "lots")
    with pytest.raises(ReconstructionError, match=rf"^{export_mod.CACHE_MAX_ENV}: expected .* MB .*, got 'lots'$"):
        export_mod.export_onnx(tiny_weights, shape_a)  # refused on a hit as well


def test_export_refuses_bad_shapes(tiny_weights: Path) -> None:
    for bad in ("10x287x384", "1x32x32", "10x288", "axbxc", "10x4x384"):
        with pytest.raises(ValueError):
            export_mod.parse_shape(bad)
    assert export_mod.parse_shape("10x288x384") == (10, 288, 384)


def torch_backend_bf16_runs() -> bool:
    """Whether the torch backend can really run bf16 here (a CPU with native bfloat16)."""
    from reconstruct.backends import torch_backend

    return torch_backend.cpu_bf16_native()


def test_auto_falls_back_to_torch_when_the_export_fails(isolated_cache: Path, tiny_weights: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(*_a: object) -> None:
        raise RuntimeError("exporter says no")

    monkeypatch.setattr(export_mod, "_torch_export", broken)
    _write_latencies(isolated_cache, {"torch-cpu": 300.0, "torch-bf16-cpu": 200.0, "onnxruntime-cpu": 100.0})  # auto picks ORT
    monkeypatch.setattr(select_mod, "cpu_bf16_native", lambda: False)
    monkeypatch.setattr(infer, "cpu_bf16_native", lambda: False)
    slices, focus = _stack(n=3)
    with caplog.at_level(logging.WARNING):
        pred = infer.predict(slices, focus, weights=tiny_weights, backend="auto")
    assert pred.describe() == "cpu (torch)"
    assert "exporter says no" in caplog.text and "using torch" in caplog.text
    # where the CPU runs bf16, torch standing in runs what auto gives torch there: bf16; unless fp32 was asked for
    if torch_backend_bf16_runs():
        monkeypatch.setattr(select_mod, "cpu_bf16_native", lambda: True)
        monkeypatch.setattr(infer, "cpu_bf16_native", lambda: True)
        assert infer.predict(slices, focus, weights=tiny_weights, backend="auto").describe() == "cpu (torch, bf16)"
        assert infer.predict(slices, focus, weights=tiny_weights, backend="auto", precision="fp32").describe() == "cpu (torch)"
    with pytest.raises(ReconstructionError, match="backend: ONNX export"):  # asked for explicitly: no fallback
        infer.predict(slices, focus, weights=tiny_weights, backend="onnxruntime")


# ------------------------------------------------------------------------------ through the API
def test_reconstruct_stack_with_onnxruntime(tiny_weights: Path) -> None:
    from reconstruct.api import check_ready, reconstruct_stack

    rng = np.random.default_rng(5)
    images = (rng.random((4, 30, 40)) * 255).astype(np.uint8)
    stack = FocalStack(images, focus_distance_m=[2.0, 0.5, 1.0, 0.7])
    check_ready("dualfocus", weights=tiny_weights, backend="onnxruntime")
    ref = reconstruct_stack(stack, method="dualfocus", weights=tiny_weights, backend="torch", precision="fp32")
    res = reconstruct_stack(stack, method="dualfocus", weights=tiny_weights, backend="onnxruntime", precision="fp32")
    assert res.device == "cpu" and res.backend == "onnxruntime" and res.extra["precision"] == "fp32"
    assert res.depth.shape == (30, 40)
    dpt_range = 1 / 0.5 - 1 / 2.0
    diff = float(np.nanmax(np.abs(1.0 / res.depth - 1.0 / ref.depth)))  # compare in diopters
    assert diff <= 1e-3 * dpt_range
    np.testing.assert_allclose(res.confidence, ref.confidence, atol=1e-3, rtol=0)


# ------------------------------------------------------------------------------ selection
def test_auto_picks_a_cpu_backend_and_says_why(isolated_cache: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(select_mod, "cpu_bf16_native", lambda: False)
    monkeypatch.setattr(select_mod, "onnxruntime_providers", lambda: ["CPUExecutionProvider"])  # the plain build (OpenVINO's: test below)
    with caplog.at_level(logging.INFO, logger="reconstruct.backends.select"):
        choice = select_mod.select_backend("auto")
    assert choice.name == "torch" and choice.device == "cpu"
    assert "backend auto: torch on cpu" in caplog.text and "no CPU measurement yet" in caplog.text and "340-354 ms" in caplog.text
    # a measurement decides
    _write_latencies(isolated_cache, {"torch-cpu": 150.0, "onnxruntime-cpu": 100.0})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="reconstruct.backends.select"):
        choice = select_mod.select_backend("auto")
    assert choice.name == "onnxruntime" and choice.device == "cpu"
    assert "measured faster" in caplog.text and "100 ms against torch 150 ms" in caplog.text and "Test CPU" in caplog.text
    # a repeated choice is not logged at INFO again
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="reconstruct.backends.select"):
        select_mod.select_backend("auto")
    assert caplog.text == ""
    # on a CPU with native bf16, a measurement without a bf16 figure cannot speak against bf16 torch
    monkeypatch.setattr(select_mod, "cpu_bf16_native", lambda: True)
    choice = select_mod.select_backend("auto")
    assert choice.name == "torch" and "has no bf16 figure" in choice.reason
    assert "no CPU measurement yet" not in choice.reason  # it names the measurement file: one exists
    assert select_mod.select_backend("auto", "fp32").name == "onnxruntime"  # fp32 asked for: the fp32 figures decide
    # without onnxruntime: torch
    monkeypatch.setattr(select_mod, "onnxruntime_providers", lambda: None)
    assert select_mod.select_backend("auto", "fp32").name == "torch"


def test_auto_on_a_gpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(select_mod, "cuda_available", lambda: True)
    monkeypatch.setattr(select_mod, "tensorrt_problem", lambda: None)
    assert tuple(select_mod.select_backend("auto"))[:2] == ("tensorrt", "cuda")
    monkeypatch.setattr(select_mod, "tensorrt_problem", lambda: "the tensorrt package is not installed")
    choice = select_mod.select_backend("auto")
    assert (choice.name, choice.device) == ("torch", "cuda") and "no TensorRT" in choice.reason
    assert select_mod.select_backend("torch").device == "cuda"


def test_unavailable_or_unknown_backends_are_refused(tiny_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from reconstruct.api import check_ready

    with pytest.raises(ReconstructionError, match=r"^backend: 'tensorrt' is not available.*available here: auto, torch, onnxruntime"):
        select_mod.select_backend("tensorrt")
    with pytest.raises(ReconstructionError, match="backend: 'tensorrt'"):
        check_ready("dualfocus", weights=tiny_weights, backend="tensorrt")
    with pytest.raises(ReconstructionError, match="backend: unknown backend 'fast'; valid: auto, torch, onnxruntime, tensorrt"):
        infer.select_backend("fast")
    monkeypatch.setattr(select_mod, "onnxruntime_providers", lambda: None)
    with pytest.raises(ReconstructionError, match=r"backend: 'onnxruntime' is not available.*available here: auto, torch$"):
        select_mod.select_backend("onnxruntime")


@pytest.mark.parametrize(("setting", "name", "device", "native_bf16", "expected"), [
    ("auto", "onnxruntime", "cpu", True, "fp32"),
    ("auto", "torch", "cpu", False, "fp32"),
    ("auto", "torch", "cpu", True, "bf16"),
    ("fp32", "torch", "cpu", True, "fp32"),
    ("bf16", "torch", "cpu", True, "bf16"),
    ("auto", "tensorrt", "cuda", False, "fp16"),
    ("auto", "torch", "cuda", True, "fp16"),
    ("fp32", "tensorrt", "cuda", False, "fp32"),
    ("int8", "onnxruntime", "cpu", False, "int8"),
    ("bf16", "torch", "cuda", False, "bf16"),
])
def test_precision_setting_resolves_per_device(
    setting: str, name: str, device: str, native_bf16: bool, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(infer, "cpu_bf16_native", lambda: native_bf16)
    monkeypatch.setattr(infer, "openvino_available", lambda: False)  # the plain onnxruntime build
    monkeypatch.setattr(infer, "check_int8_support", lambda: None)  # whether this onnxruntime quantises: test_quantize
    assert infer.resolve_precision(setting, select_mod.BackendChoice(name, device, "test")) == expected


@pytest.mark.parametrize(("setting", "openvino", "expected"), [
    ("auto", True, "bf16"), ("bf16", True, "bf16"), ("fp32", True, "fp32"), ("auto", False, "fp32"),
])
def test_onnxruntime_runs_bf16_on_the_cpu_where_openvino_is_installed(
    setting: str, openvino: bool, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime-openvino computes bf16 on a CPU with native bfloat16, so ``auto`` there is
    bf16 as in torch; the plain build stays fp32 (and refuses bf16, test below)."""
    monkeypatch.setattr(infer, "cpu_bf16_native", lambda: True)
    monkeypatch.setattr(infer, "openvino_available", lambda: openvino)
    assert infer.resolve_precision(setting, select_mod.BackendChoice("onnxruntime", "cpu", "test")) == expected


def test_onnxruntime_bf16_providers_name_openvino_with_its_precision_and_threads() -> None:
    from reconstruct.backends.onnxruntime_backend import providers_for

    plain = ["AzureExecutionProvider", "CPUExecutionProvider"]
    assert providers_for("cpu", plain, "fp32", 2) == ["CPUExecutionProvider"]
    with_ov = ["OpenVINOExecutionProvider", "CPUExecutionProvider"]
    assert providers_for("cpu", with_ov, "fp32", 2) == ["CPUExecutionProvider"]  # fp32 and int8 stay on the CPU provider
    (name, options), fallback = providers_for("cpu", with_ov, "bf16", 2)
    assert name == "OpenVINOExecutionProvider" and fallback == "CPUExecutionProvider"
    assert options["device_type"] == "CPU" and options["num_of_threads"] == "2"
    assert json.loads(options["load_config"]) == {"CPU": {"INFERENCE_PRECISION_HINT": "bf16"}}
    with pytest.raises(ReconstructionError, match=r"^precision: bf16 in onnxruntime on the CPU needs OpenVINOExecutionProvider .*onnxruntime-openvino.*installed: AzureExecutionProvider, CPUExecutionProvider$"):
        providers_for("cpu", plain, "bf16", 2)


@pytest.mark.parametrize(("setting", "name", "device", "native_bf16", "needle"), [
    ("fp16", "onnxruntime", "cpu", True, "fp16 needs a CUDA GPU"),
    ("fp16", "torch", "cpu", True, "fp16 needs a CUDA GPU"),
    ("bf16", "torch", "cpu", False, "bf16 needs a CUDA GPU or a CPU with native bfloat16"),
    ("bf16", "onnxruntime", "cpu", True, "bf16 in onnxruntime on the CPU needs OpenVINOExecutionProvider"),
    ("bf16", "tensorrt", "cuda", True, "fp32 or fp16 engines"),
    ("int4", "torch", "cuda", True, "unknown precision 'int4'"),
    ("int8", "torch", "cpu", True, "int8 runs in the onnxruntime backend on the CPU only, and this run uses torch on cpu"),
    ("int8", "onnxruntime", "cuda", True, "int8 runs in the onnxruntime backend on the CPU only, and this run uses onnxruntime on cuda"),
    ("int8", "tensorrt", "cuda", True, "int8 runs in the onnxruntime backend on the CPU only"),
])
def test_precision_setting_refused_where_it_cannot_run(
    setting: str, name: str, device: str, native_bf16: bool, needle: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(infer, "cpu_bf16_native", lambda: native_bf16)
    monkeypatch.setattr(infer, "openvino_available", lambda: False)  # the plain onnxruntime build
    with pytest.raises(ReconstructionError, match=rf"^precision: .*{needle}"):
        infer.resolve_precision(setting, select_mod.BackendChoice(name, device, "test"))


def _write_latencies(cache: Path, results: dict[str, float]) -> None:
    (cache / select_mod.LATENCY_FILE).parent.mkdir(parents=True, exist_ok=True)
    (cache / select_mod.LATENCY_FILE).write_text(json.dumps({
        "machine": {"cpu": "Test CPU"}, "threads": 2, "model": "dualfocus-s", "shape": [10, 288, 384],
        "results": {k: {"p50_ms": v} for k, v in results.items()},
    }))


def test_auto_weighs_torch_by_its_bf16_figure_where_the_cpu_runs_bf16(isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_latencies(isolated_cache, {"torch-cpu": 500.0, "torch-bf16-cpu": 200.0, "onnxruntime-cpu": 400.0})
    monkeypatch.setattr(select_mod, "cpu_bf16_native", lambda: True)
    monkeypatch.setattr(select_mod, "onnxruntime_providers", lambda: ["CPUExecutionProvider"])  # the plain build
    choice = select_mod.select_backend("auto", "auto")
    assert choice.name == "torch" and "torch (bf16, native on this CPU)" in choice.reason and "200 ms" in choice.reason
    # fp32 asked for: the fp32 figures decide
    choice = select_mod.select_backend("auto", "fp32")
    assert choice.name == "onnxruntime" and "400 ms against torch 500 ms" in choice.reason
    # bf16 asked for: without OpenVINO only torch runs it on the CPU
    assert select_mod.select_backend("auto", "bf16").name == "torch"
    # a CPU without native bf16 ignores the bf16 figure (it was measured elsewhere)
    monkeypatch.setattr(select_mod, "cpu_bf16_native", lambda: False)
    assert select_mod.select_backend("auto", "auto").name == "onnxruntime"


def test_auto_weighs_onnxruntime_by_its_bf16_figure_where_openvino_is_installed(isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_latencies(isolated_cache, {"torch-cpu": 500.0, "torch-bf16-cpu": 200.0, "onnxruntime-cpu": 400.0, "onnxruntime-bf16-cpu": 90.0})
    monkeypatch.setattr(select_mod, "cpu_bf16_native", lambda: True)
    monkeypatch.setattr(infer, "cpu_bf16_native", lambda: True)  # resolve_precision's view of the same CPU
    monkeypatch.setattr(select_mod, "onnxruntime_providers", lambda: ["OpenVINOExecutionProvider", "CPUExecutionProvider"])
    for setting in ("auto", "bf16"):
        choice = select_mod.select_backend("auto", setting)
        assert choice.name == "onnxruntime" and "onnxruntime (bf16 in OpenVINO) measured faster" in choice.reason and "90 ms against torch (bf16" in choice.reason
    assert select_mod.select_backend("auto", "fp32").name == "onnxruntime"  # 400 against 500: the fp32 figures
    # the plain onnxruntime build: its bf16 figure (measured with OpenVINO) does not speak for it
    monkeypatch.setattr(select_mod, "onnxruntime_providers", lambda: ["CPUExecutionProvider"])
    assert select_mod.select_backend("auto", "auto").name == "torch"
    assert select_mod.select_backend("auto", "bf16").name == "torch"
    # OpenVINO installed but no bf16 figure for it (a file measured with the plain build, whose fp32
    # figure cannot speak for bf16): the OpenVINO build's default, onnxruntime in bf16, for auto and bf16 alike,
    # even where that file's fp32 onnxruntime figure is the slower one
    monkeypatch.setattr(select_mod, "onnxruntime_providers", lambda: ["OpenVINOExecutionProvider", "CPUExecutionProvider"])
    for fp32_ms in (150.0, 900.0):
        _write_latencies(isolated_cache, {"torch-cpu": 500.0, "torch-bf16-cpu": 200.0, "onnxruntime-cpu": fp32_ms})
        for setting in ("auto", "bf16"):
            choice = select_mod.select_backend("auto", setting)
            assert choice.name == "onnxruntime" and "has no figures for both bf16 paths" in choice.reason
            assert infer.resolve_precision(setting, choice) == "bf16"
    assert select_mod.select_backend("auto", "fp32").name == "torch"  # fp32: the fp32 figures decide (500 against 900)
    # nothing measured: the same default with OpenVINO; torch without it
    (isolated_cache / select_mod.LATENCY_FILE).unlink()
    choice = select_mod.select_backend("auto", "auto")
    assert choice.name == "onnxruntime" and "80 ms against torch bf16's 158 ms" in choice.reason
    assert select_mod.select_backend("auto", "fp32").name == "torch"
    monkeypatch.setattr(select_mod, "onnxruntime_providers", lambda: ["CPUExecutionProvider"])
    assert select_mod.select_backend("auto", "auto").name == "torch"


def test_onnxruntime_bf16_with_the_real_openvino_provider(tiny_weights: Path) -> None:
    """Runs only where onnxruntime is the onnxruntime-openvino build and the CPU has native
    bfloat16 (not in CI: its onnxruntime is the plain build; run here with that wheel on
    PYTHONPATH, see the README)."""
    if not select_mod.openvino_available():
        pytest.skip("OpenVINOExecutionProvider with native bfloat16 not available")
    slices, focus = _stack(n=5)
    ref = infer.predict(slices, focus, weights=tiny_weights, backend="torch", precision="fp32")
    ov = infer.predict(slices, focus, weights=tiny_weights, backend="onnxruntime", precision="bf16")
    assert ov.backend == "onnxruntime" and ov.precision == "bf16" and ov.describe() == "cpu (onnxruntime, bf16)"
    diff = np.abs(ov.depth_focus - ref.depth_focus) / float(np.ptp(focus))
    print(f"tiny 5x32x48 in OpenVINO bf16: |depth diff| max {diff.max():.1e}, mean {diff.mean():.1e} of the range")
    assert diff.mean() < 5e-3 and diff.max() < 0.1  # bfloat16 keeps 8 bits: close, not fp32-equal
    assert diff.max() > 0  # it computed in bf16, not in fp32


def _backend_input() -> tuple[np.ndarray, np.ndarray]:
    """``_stack()`` as a backend takes it: ``[1, N, 3, H, W]`` (H, W cropped to multiples of 4), ``[1, N]``."""
    slices, focus = _stack()
    return np.ascontiguousarray(np.repeat(slices[None, :, None], 3, axis=2)[..., :28, :44]), focus[None]


def test_torch_backend_runs_bf16_on_a_cpu_with_native_bfloat16(tiny_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from reconstruct.backends import torch_backend

    x, f = _backend_input()
    if select_mod.cpu_bf16_native():
        fp32 = torch_backend.TorchBackend(tiny_weights).run(x, f)
        bf16 = torch_backend.TorchBackend(tiny_weights, precision="bf16")
        out = bf16.run(x, f)
        assert bf16.describe() == "cpu (torch, bf16)"
        assert all(v.dtype == np.float32 for v in out.values())  # outputs come back fp32
        diff = float(np.abs(out["depth"] - fp32["depth"]).max())  # normalised depth, range 1
        assert 0 < diff < 0.05
    monkeypatch.setattr(torch_backend, "cpu_bf16_native", lambda: False)
    with pytest.raises(ReconstructionError, match=r"^precision: bf16 on the CPU needs native bfloat16"):
        torch_backend.TorchBackend(tiny_weights, precision="bf16")
    with pytest.raises(ReconstructionError, match=r"^precision: fp16 autocast runs on a CUDA GPU"):
        torch_backend.TorchBackend(tiny_weights, precision="fp16")


def test_channels_last_on_the_cpu_keeps_the_numbers(tiny_weights: Path) -> None:
    from reconstruct.backends import torch_backend

    x, f = _backend_input()
    default = torch_backend.TorchBackend(tiny_weights)
    nchw = torch_backend.TorchBackend(tiny_weights, channels_last=False)
    assert default.channels_last and not nchw.channels_last
    conv2d = default.graph.net.encoder.stem[1][0].weight  # 3x3, many channels: the layouts differ
    conv3d = default.graph.net.dec_in[0].weight
    assert conv2d.is_contiguous(memory_format=torch.channels_last) and not conv2d.is_contiguous()
    assert conv3d.is_contiguous(memory_format=torch.channels_last_3d) and not conv3d.is_contiguous()
    assert nchw.graph.net.encoder.stem[1][0].weight.is_contiguous()
    a, b = default.run(x, f), nchw.run(x, f)
    np.testing.assert_allclose(a["depth"], b["depth"], atol=1e-5, rtol=0)


def test_predict_passes_the_resolved_precision_to_the_backend(tiny_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a (stand-in) GPU choice, auto opens the backend in fp16; the CPU path opens fp32, or
    bf16 where the CPU has native bfloat16."""
    opened: list[tuple[str, str, str]] = []
    real_open = infer.open_backend

    def spy(name: str, device: str, **kw):  # noqa: ANN003, ANN202 - mirrors open_backend
        opened.append((name, device, kw["precision"]))
        return real_open(name, "cpu", **{**kw, "precision": "fp32"})

    monkeypatch.setattr(infer, "open_backend", spy)
    slices = np.random.default_rng(0).random((4, 32, 48)).astype(np.float32)
    focus = np.array([0.5, 1.0, 1.5, 2.0], np.float32)
    monkeypatch.setattr(infer, "cpu_bf16_native", lambda: False)
    infer.predict(slices, focus, weights=tiny_weights, backend="torch")
    monkeypatch.setattr(infer, "cpu_bf16_native", lambda: True)
    infer.predict(slices, focus, weights=tiny_weights, backend="torch")
    monkeypatch.setattr(infer, "select_backend", lambda b, p: select_mod.BackendChoice("torch", "cuda", "stand-in GPU"))
    infer.predict(slices, focus, weights=tiny_weights, backend="auto")
    assert opened == [("torch", "cpu", "fp32"), ("torch", "cpu", "bf16"), ("torch", "cuda", "fp16")]


# ------------------------------------------------------------------------------ TensorRT, with a stand-in
def _fake_tensorrt(version: str = "10.9.0.34") -> types.ModuleType:
    """A stand-in for the parts of the tensorrt module the build/load path calls; it records
    what was called. Engines are ``b"ENGINE:" + onnx bytes``; a blob starting ``b"BAD"``
    does not deserialise."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = {"builds": 0, "flags": [], "network_flags": [], "profiles": [], "timing_blobs": [], "deserialize": 0}
    trt.network_inputs = {"stack": (1, 3, 3, 32, 48), "focus": (1, 3)}
    trt.fresh_engine_loads = True
    trt.profile_index = 0  # what add_optimization_profile returns (-1: TensorRT finds the profile invalid)

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            self.level = level

    class Enum:
        def __init__(self, **members: int) -> None:
            self.__dict__.update(members)

    trt.Logger = Logger
    trt.NetworkDefinitionCreationFlag = Enum(STRONGLY_TYPED=5)
    trt.MemoryPoolType = Enum(WORKSPACE=0)
    trt.BuilderFlag = Enum(FP16=0)

    class Tensor:
        def __init__(self, name: str, shape: tuple) -> None:
            self.name, self.shape = name, shape

    class Network:
        def __init__(self) -> None:
            self.inputs = [Tensor(k, v) for k, v in trt.network_inputs.items()]
            self.num_inputs = len(self.inputs)
            self.source = b""

        def get_input(self, i: int) -> Tensor:
            return self.inputs[i]

    class Parser:
        num_errors = 0

        def __init__(self, network: Network, logger: Logger) -> None:
            self.network = network

        def parse_from_file(self, path: str) -> bool:
            self.network.source = Path(path).read_bytes()
            return True

    class TimingCache:
        def __init__(self, blob: bytes) -> None:
            self.blob = bytes(blob)

        def serialize(self) -> bytes:
            return self.blob + b"+timing"

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict = {}

        def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
            self.shapes[name] = (lo, opt, hi)

    class Config:
        def __init__(self) -> None:
            self.cache: TimingCache | None = None

        def set_memory_pool_limit(self, pool: int, size: int) -> None:
            assert size > 0

        def set_flag(self, flag: int) -> None:
            trt.calls["flags"].append(flag)

        def create_timing_cache(self, blob: bytes) -> TimingCache:
            if bytes(blob).startswith(b"CORRUPT"):
                raise RuntimeError("timing cache header mismatch")
            return TimingCache(blob)

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            trt.calls["timing_blobs"].append(cache.blob)
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache:
            return self.cache

        def add_optimization_profile(self, profile: Profile) -> int:
            trt.calls["profiles"].append(profile.shapes)
            return trt.profile_index

    class Builder:
        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, flags: int) -> Network:
            trt.calls["network_flags"].append(flags)
            return Network()

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes:
            trt.calls["builds"] += 1
            return b"ENGINE:" + network.source if trt.fresh_engine_loads else b"BAD fresh engine"

    class Engine:
        def __init__(self, blob: bytes) -> None:
            self.blob = blob

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            pass

        def deserialize_cuda_engine(self, blob: bytes) -> Engine | None:
            trt.calls["deserialize"] += 1
            return None if bytes(blob).startswith(b"BAD") else Engine(bytes(blob))

    trt.OnnxParser, trt.Builder, trt.Runtime = Parser, Builder, Runtime
    return trt


GPU = trt_mod.GpuInfo("NVIDIA H100 80GB HBM3", (9, 0))
SHAPES = trt_mod.io_shapes((3, 32, 48))


def test_tensorrt_engine_cache_key() -> None:
    base = dict(trt_version="10.9.0", gpu=GPU, onnx_sha256="a" * 64, shapes=SHAPES, precision="fp16")
    key = trt_mod.engine_cache_key(**base)
    assert key["shapes"] == {"focus": [1, 3], "stack": [1, 3, 3, 32, 48]} and key["compute_capability"] == "9.0"
    root = Path("/cache")
    path = trt_mod.engine_path(root, key)
    assert path.parent == root / "tensorrt" and path.suffix == ".engine"
    assert trt_mod.engine_path(root, trt_mod.engine_cache_key(**base)) == path  # stable
    for change in (dict(trt_version="10.10.0"), dict(gpu=trt_mod.GpuInfo("NVIDIA L4", (8, 9))),
                   dict(gpu=trt_mod.GpuInfo(GPU.name, (9, 1))), dict(onnx_sha256="b" * 64),
                   dict(shapes=trt_mod.io_shapes((4, 32, 48))), dict(precision="fp32")):
        assert trt_mod.engine_path(root, trt_mod.engine_cache_key(**{**base, **change})) != path, change
    assert trt_mod.timing_cache_path(root, "10.9.0", GPU).name == "timing_trt10.9.0_nvidia-h100-80gb-hbm3-sm90.cache"


def test_tensorrt_profile_shapes() -> None:
    assert trt_mod.profile_shapes(SHAPES, SHAPES) == {}  # a fixed-shape export needs no profile
    dynamic = {"stack": (1, -1, 3, 32, 48), "focus": (1, -1)}
    prof = trt_mod.profile_shapes(dynamic, SHAPES)
    assert prof == {"stack": ((1, 3, 3, 32, 48),) * 3, "focus": ((1, 3),) * 3}
    with pytest.raises(ReconstructionError, match="axis 3 is 32 in the ONNX, asked for 64"):
        trt_mod.profile_shapes(SHAPES, trt_mod.io_shapes((3, 64, 48)))
    with pytest.raises(ReconstructionError, match="inputs are"):
        trt_mod.profile_shapes({"x": (1, 3)}, SHAPES)
    with pytest.raises(ReconstructionError, match="rank"):
        trt_mod.profile_shapes({"stack": (1, 3, 3, 32), "focus": (1, 3)}, SHAPES)


def test_tensorrt_build_cache_and_rebuild(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    trt = _fake_tensorrt()
    onnx_path = tmp_path / "g.onnx"
    onnx_path.write_bytes(b"graph")
    kw = dict(shapes=SHAPES, precision="fp16", cache_root=tmp_path / "cache", trt=trt, gpu=GPU)
    first = trt_mod.load_or_build_engine(onnx_path, "a" * 64, **kw)
    assert first.built and first.path.is_file() and first.path.read_bytes() == b"ENGINE:graph"
    assert json.loads(first.path.with_suffix(".json").read_text())["gpu"] == GPU.name
    assert trt.calls["builds"] == 1 and trt.calls["network_flags"] == [1 << 5]  # strongly typed
    assert trt.calls["flags"] == []  # no precision flags: the graph carries the types
    assert trt.calls["profiles"] == []  # fixed-shape inputs
    timing = trt_mod.timing_cache_path(tmp_path / "cache", trt.__version__, GPU)
    assert timing.read_bytes() == b"+timing"
    # cached: loaded, not built
    second = trt_mod.load_or_build_engine(onnx_path, "a" * 64, **kw)
    assert not second.built and second.path == first.path and trt.calls["builds"] == 1
    # a cached engine that does not deserialise is rebuilt (with the saved timing cache)
    first.path.write_bytes(b"BAD truncated")
    with caplog.at_level(logging.WARNING):
        third = trt_mod.load_or_build_engine(onnx_path, "a" * 64, **kw)
    assert third.built and trt.calls["builds"] == 2 and "did not load; rebuilding" in caplog.text
    assert first.path.read_bytes() == b"ENGINE:graph" and trt.calls["timing_blobs"][-1] == b"+timing"
    # another TensorRT version: another engine file
    other = trt_mod.load_or_build_engine(onnx_path, "a" * 64, **{**kw, "trt": _fake_tensorrt("10.10.0")})
    assert other.built and other.path != first.path
    # a fresh engine that does not deserialise is an error, and nothing is cached
    bad = _fake_tensorrt("10.11.0")
    bad.fresh_engine_loads = False
    with pytest.raises(ReconstructionError, match="freshly built engine"):
        trt_mod.load_or_build_engine(onnx_path, "a" * 64, **{**kw, "trt": bad})
    # a damaged timing cache does not stop a build: it starts from an empty one
    timing.write_bytes(b"CORRUPT")
    first.path.unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert trt_mod.load_or_build_engine(onnx_path, "a" * 64, **kw).built
    assert "unusable" in caplog.text and trt.calls["timing_blobs"][-1] == b"" and timing.read_bytes() == b"+timing"
    # a dynamic-N ONNX gets a profile pinned to the stack shape
    dyn = _fake_tensorrt("10.12.0")
    dyn.network_inputs = {"stack": (1, -1, 3, 32, 48), "focus": (1, -1)}
    trt_mod.load_or_build_engine(onnx_path, "a" * 64, **{**kw, "trt": dyn})
    assert dyn.calls["profiles"] == [{"stack": ((1, 3, 3, 32, 48),) * 3, "focus": ((1, 3),) * 3}]
    # a profile TensorRT refuses is one line before any build (its return value was ignored)
    refused = _fake_tensorrt("10.13.0")
    refused.network_inputs, refused.profile_index = dyn.network_inputs, -1
    with pytest.raises(ReconstructionError, match="optimisation profile .* is invalid"):
        trt_mod.load_or_build_engine(onnx_path, "a" * 64, **{**kw, "trt": refused})
    assert refused.calls["builds"] == 0


def test_tensorrt_engine_cache_stays_under_its_limit_and_a_hit_counts_as_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Engines (one per graph, shape, precision and GPU; tens of MB each on a real GPU) are
    pruned as the ONNX exports are: least recently used first, a hit marks its engine used, the
    one just built is kept. They used to pile up without limit."""
    trt = _fake_tensorrt()
    onnx_path = tmp_path / "g.onnx"
    onnx_path.write_bytes(b"graph")
    kw = dict(shapes=SHAPES, precision="fp16", cache_root=tmp_path / "cache", trt=trt, gpu=GPU)
    a = trt_mod.load_or_build_engine(onnx_path, "a" * 64, **kw)
    b = trt_mod.load_or_build_engine(onnx_path, "b" * 64, **kw)
    entry = max(p.stat().st_size + p.with_suffix(".json").stat().st_size for p in (a.path, b.path))
    t = time.time()
    os.utime(a.path.with_suffix(".json"), (t - 20, t - 20))  # a is the older engine ...
    os.utime(b.path.with_suffix(".json"), (t - 10, t - 10))
    assert not trt_mod.load_or_build_engine(onnx_path, "a" * 64, **kw).built  # ... until this hit uses it again
    monkeypatch.setenv(export_mod.CACHE_MAX_ENV, f"{2.5 * entry / 2**20:.6f}")
    c = trt_mod.load_or_build_engine(onnx_path, "c" * 64, **kw)
    assert a.path.exists() and c.path.exists()
    assert not b.path.exists() and not b.path.with_suffix(".json").exists()
    timing = trt_mod.timing_cache_path(tmp_path / "cache", trt.__version__, GPU)
    assert timing.exists()  # not an engine: never pruned


def test_tensorrt_import_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("8.6.1"))
    with pytest.raises(ReconstructionError, match="TensorRT 10 or later, found 8.6.1"):
        trt_mod.import_tensorrt()
    assert "8.6.1" in select_mod.tensorrt_problem()
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.9.0"))
    assert trt_mod.import_tensorrt().__version__ == "10.9.0" and select_mod.tensorrt_problem() is None
    # with the package but without a GPU, tensorrt is still refused
    with pytest.raises(ReconstructionError, match="torch sees no CUDA GPU"):
        select_mod.select_backend("tensorrt")


# ------------------------------------------------------------------------------ command lines
def _run(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, export_mod.CACHE_ENV: str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_export_cli_writes_a_loadable_onnx_file(tiny_weights: Path, tmp_path: Path, isolated_cache: Path) -> None:
    import onnxruntime as ort

    out = tmp_path / "art" / "tiny.onnx"
    proc = _run("-m", "reconstruct.export", "--model", "dualfocus-tiny", "--weights", str(tiny_weights),
                "--shape", "3x32x48", "--to", "onnx", "--out", str(out), cache=isolated_cache)
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout and "3x32x48 fp32" in proc.stdout
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["stack", "focus"]
    depth, _conf, _pos = sess.run(None, {"stack": np.random.default_rng(0).random((1, 3, 3, 32, 48), dtype=np.float32),
                                         "focus": np.array([[0.5, 1.0, 2.0]], np.float32)})
    assert depth.shape == (1, 32, 48) and 0.0 <= depth.min() <= depth.max() <= 1.0


def test_export_cli_names_the_model_the_weights_hold(tiny_weights: Path, tmp_path: Path, isolated_cache: Path) -> None:
    """--model with --weights of another architecture: the file's architecture is exported,
    and the printed line says so (it echoed --model), with a warning about the mismatch."""
    out = tmp_path / "tiny.onnx"
    proc = _run("-m", "reconstruct.export", "--model", "dualfocus-paper", "--weights", str(tiny_weights),
                "--shape", "3x32x48", "--to", "onnx", "--out", str(out), cache=isolated_cache)
    assert proc.returncode == 0, proc.stderr
    assert "dualfocus-tiny 3x32x48 fp32" in proc.stdout and "dualfocus-paper" not in proc.stdout
    assert "--model dualfocus-paper" in proc.stderr and "holds dualfocus-tiny" in proc.stderr


@pytest.mark.parametrize(
    "args, words",
    [
        (["--shape", "10x287x384", "--to", "onnx"], ["--shape", "multiples of 4", "10x288x384"]),
        (["--shape", "tenxbyx", "--to", "onnx"], ["--shape", "NxHxW"]),
        (["--shape", "3x32x48", "--to", "tensorrt"], ["backend: 'tensorrt'", "available here"]),
    ],
    ids=["odd-height", "garbage", "tensorrt-missing"],
)
def test_export_cli_bad_input_is_one_line(tmp_path: Path, isolated_cache: Path, args: list[str], words: list[str]) -> None:
    out = tmp_path / "x.onnx"
    proc = _run("-m", "reconstruct.export", "--model", "dualfocus-s", *args, "--out", str(out), cache=isolated_cache)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for word in words:
        assert word in lines[0]
    assert not out.exists()


def test_gpu_check_refuses_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("OUT", str(tmp_path))
    assert module.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA" in err[0] and err[0].startswith("error:")
    assert not list(tmp_path.iterdir())


def test_cpu_fp32_3d_convolutions_run_onednn(tiny_weights: Path) -> None:
    """torch sends a batch-1 3D convolution with N*C*D*H <= 20480 to its slow reference kernel;
    the CPU backend calls oneDNN for every 3D convolution instead, with the same numbers."""
    from torch.profiler import ProfilerActivity, profile

    from reconstruct.backends.torch_backend import OneDnnConv3d, TorchBackend

    backend = TorchBackend(tiny_weights, device="cpu", precision="fp32")
    convs = [m for m in backend.graph.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(type(m) is OneDnnConv3d for m in convs)
    stack, focus = _backend_input()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out = backend.run(stack, focus)
    events = prof.key_averages(group_by_input_shape=True)
    onednn_3d = [e for e in events if e.key == "aten::mkldnn_convolution" and e.input_shapes and len(e.input_shapes[0]) == 5]
    assert len(onednn_3d) >= 1 and sum(e.count for e in onednn_3d) == len(convs)
    assert "aten::slow_conv3d_forward" not in {e.key for e in events}
    ref = TorchBackend(load_weights(tiny_weights)[0], device="cpu", precision="fp32", channels_last=False)
    for m in ref.graph.modules():  # the stock module class, for the reference numbers
        if type(m) is OneDnnConv3d:
            m.__class__ = torch.nn.Conv3d
    expected = ref.run(stack, focus)
    for name in OUTPUT_NAMES:
        np.testing.assert_allclose(out[name], expected[name], atol=2e-5, rtol=0)


def test_onednn_conv3d_leaves_autocast_to_torch() -> None:
    from reconstruct.backends.torch_backend import OneDnnConv3d

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(4, 4, 3, padding=1)
    conv.__class__ = OneDnnConv3d
    x = torch.randn(1, 4, 3, 8, 8)
    with torch.inference_mode():
        np.testing.assert_allclose(conv(x).numpy(), F.conv3d(x, conv.weight, conv.bias, padding=1).numpy(), atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert conv(x).dtype == torch.bfloat16  # autocast's conv3d, not the float32 oneDNN call


@pytest.mark.parametrize("scale", [1.5, 0.5])
def test_input_scale_resizes_for_the_network_and_back(tiny_weights: Path, scale: float) -> None:
    slices, focus = _stack(n=4, h=40, w=60)
    seen: list[tuple[int, ...]] = []
    real_open = infer._open
    def spy(choice, requested, weights, shape, *a, **k):  # noqa: ANN001, ANN202
        seen.append(tuple(shape))
        return real_open(choice, requested, weights, shape, *a, **k)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(infer, "_open", spy)
        pred = infer.predict(slices, focus, weights=tiny_weights, backend="torch", precision="fp32", input_scale=scale)
    h, w = round(40 * scale), round(60 * scale)
    assert seen == [(4, h + (-h) % 4, w + (-w) % 4)]  # the network saw the resized (then padded) stack
    assert pred.depth_focus.shape == pred.confidence.shape == pred.slice_position.shape == (40, 60)
    assert focus.min() - 1e-4 <= pred.depth_focus.min() and pred.depth_focus.max() <= focus.max() + 1e-4
    assert 0.0 <= pred.confidence.min() and pred.confidence.max() <= 1.0 + 1e-6
    same = infer.predict(slices, focus, weights=tiny_weights, backend="torch", precision="fp32")
    assert not np.allclose(pred.depth_focus, same.depth_focus)


@pytest.mark.parametrize("bad", [0, -1.0, 5.0, float("nan"), "big"])
def test_input_scale_out_of_range_is_one_line(tiny_weights: Path, bad: object) -> None:
    slices, focus = _stack(n=3)
    with pytest.raises(ReconstructionError, match=r"^input_scale: must be auto or a number from 0.1 to 4.0"):
        infer.predict(slices, focus, weights=tiny_weights, backend="torch", input_scale=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("hw", "expected"), [((288, 384), 1.0), ((768, 600), 1.0), ((1536, 2048), 0.375), ((1000, 800), 0.768)])
def test_input_scale_auto_keeps_small_frames_and_scales_large_ones_to_768_px(hw, expected: float) -> None:
    assert infer.resolve_input_scale("auto", hw) == pytest.approx(expected)
    assert infer.resolve_input_scale(1.5, hw) == 1.5  # a number is used as given
    assert infer.resolve_input_scale("1.5", hw) == 1.5


def test_input_scale_auto_is_the_default_and_is_resolved_once(tiny_weights: Path) -> None:
    seen: list[tuple] = []
    real_open = infer._open

    def spy(choice, requested, weights, shape, *a, **k):  # noqa: ANN001
        seen.append(shape)
        return real_open(choice, requested, weights, shape, *a, **k)

    slices, focus = _stack(n=3, h=40, w=800)  # long side 800: auto scales to 768
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(infer, "_open", spy)
        pred = infer.predict(slices, focus, weights=tiny_weights, backend="torch", precision="fp32")
        assert pred.input_scale == pytest.approx(0.96) and seen[-1] == (3, 40, 768)
        assert pred.depth_focus.shape == (40, 800)
        small, focus = _stack(n=3, h=40, w=500)  # an explicit 2 makes it 1000 px: not scaled down again by auto
        pred = infer.predict(small, focus, weights=tiny_weights, backend="torch", precision="fp32", input_scale=2.0)
        assert pred.input_scale == 2.0 and seen[-1] == (3, 80, 1000)


def test_input_scale_too_small_for_the_stack_is_one_line(tiny_weights: Path) -> None:
    slices, focus = _stack(n=3, h=30, w=45)
    with pytest.raises(ReconstructionError, match=r"^input_scale: 0.2 makes the 30x45 slices 6x9 px; the network needs at least 8 px a side"):
        infer.predict(slices, focus, weights=tiny_weights, backend="torch", input_scale=0.2)


# ------------------------------------------------------------------------------ failure paths
def test_auto_falls_back_to_torch_when_the_export_cache_cannot_be_written(
    isolated_cache: Path, tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_latencies(isolated_cache, {"torch-cpu": 300.0, "torch-bf16-cpu": 200.0, "onnxruntime-cpu": 100.0})  # auto picks ORT
    monkeypatch.setattr(select_mod, "cpu_bf16_native", lambda: False)
    monkeypatch.setattr(infer, "cpu_bf16_native", lambda: False)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv(export_mod.CACHE_ENV, str(blocker))  # as a full or read-only disk would
    slices, focus = _stack(n=3)
    pred = infer.predict(slices, focus, weights=tiny_weights, backend="auto")
    assert pred.describe() == "cpu (torch)" and np.isfinite(pred.depth_focus).all()


def test_a_sidecar_that_cannot_be_written_leaves_no_orphan_graph(tiny_weights: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from capture.errors import OutputError

    real = export_mod._write_atomic

    def json_fails(final: Path, write) -> None:  # noqa: ANN001
        if final.suffix == ".json":
            raise OSError(28, "No space left on device")
        real(final, write)

    monkeypatch.setattr(export_mod, "_write_atomic", json_fails)
    with pytest.raises(OutputError, match="No space left"):
        export_mod.export_onnx(tiny_weights, (3, 32, 48))
    assert not list((isolated_cache / "onnx").glob("*.onnx"))


def test_nan_from_the_network_gives_nan_depth_not_a_crash(tiny_weights: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from reconstruct.api import reconstruct_stack

    net, _meta = load_weights(tiny_weights)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(float("nan"))  # weights of a training run that diverged
    nan_weights = save_weights(net, tmp_path / "nan.safetensors", name="dualfocus-tiny")
    rng = np.random.default_rng(3)
    stack = FocalStack((rng.random((4, 24, 32)) * 255).astype(np.uint8), focus_distance_m=[2.0, 0.5, 1.0, 0.7])
    with caplog.at_level(logging.WARNING):
        result = reconstruct_stack(stack, method="dualfocus", weights=nan_weights, backend="torch", precision="fp32")
    assert np.isnan(result.depth).all() and result.all_in_focus.shape == (24, 32)
    assert "no finite depth" in caplog.text
    # the contract: confidence is in [0, 1]; where there is no depth it is 0, not NaN
    assert (result.confidence == 0).all()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_stack_eight_pixels_wide_gives_the_same_depth_on_every_run(precision: str) -> None:
    """Padded to 8 px, the 1/8-resolution branch was one pixel wide, and CPU bf16 gave another
    depth on each run of the same 64x8 stack, sometimes NaN everywhere (a reviewer's CLI runs);
    stacks are now padded to 16 px."""
    if precision == "bf16" and not infer.cpu_bf16_native():
        pytest.skip("this CPU has no native bfloat16")
    rng = np.random.default_rng(0)
    slices = rng.random((6, 64, 8)).astype(np.float32)
    focus = np.array([2.0, 0.5, 1.0, 0.7, 1.5, 0.6], np.float32)
    weights = infer.shipped_weights("dualfocus-s")
    runs = [infer.predict(slices, focus, weights=weights, backend="torch", precision=precision) for _ in range(4)]
    for run in runs:
        assert np.isfinite(run.depth_focus).all() and np.isfinite(run.confidence).all()
        np.testing.assert_array_equal(run.depth_focus, runs[0].depth_focus)


def test_a_weights_file_replaced_with_its_old_modification_time_is_hashed_again(tiny_weights: Path, tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(tiny_weights.read_bytes())
    first, _ = export_mod.weights_identity(path)
    st = path.stat()
    other = save_weights(_tiny_net(1), tmp_path / "other.safetensors", name="dualfocus-tiny")
    os.replace(other, path)  # same size, and (as cp -p or rsync -t do) the old modification time
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size
    assert export_mod.weights_identity(path)[0] != first


def test_auto_with_bf16_on_a_gpu_runs_torch_not_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(select_mod, "cuda_available", lambda: True)
    monkeypatch.setattr(select_mod, "tensorrt_problem", lambda: None)
    choice = select_mod.select_backend("auto", "bf16")
    assert (choice.name, choice.device) == ("torch", "cuda") and "bf16" in choice.reason


def test_running_out_of_memory_is_one_line_naming_the_stack(tiny_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Starved:
        name, device, precision = "torch", "cpu", "fp32"

        def describe(self) -> str:
            return "cpu (torch)"

        def run(self, stack: np.ndarray, focus: np.ndarray) -> dict:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 12884901888 bytes.")

    monkeypatch.setattr(infer, "_open", lambda *a, **k: Starved())
    slices, focus = _stack(n=3, h=30, w=45)
    with pytest.raises(ReconstructionError, match=r"out of memory for a 3x32x48 stack on cpu \(torch\).*--input-scale 0.5"):
        infer.predict(slices, focus, weights=tiny_weights, backend="torch", precision="fp32")


def test_a_stack_a_few_pixels_wide_runs_in_onnxruntime(tiny_weights: Path) -> None:
    slices, focus = _stack(n=3, h=40, w=4)
    pred = infer.predict(slices, focus, weights=tiny_weights, backend="onnxruntime")
    assert pred.depth_focus.shape == (40, 4) and np.isfinite(pred.depth_focus).all()


def test_compiled_torch_backend_traces_the_whole_network(tiny_weights: Path) -> None:
    """``compile=`` keeps stock 3D convolutions (Dynamo cannot trace the direct oneDNN call)
    and the whole inference graph traces under inference mode with eager's numbers (the
    inductor compile itself ran on an H100 in benchmarks/gpu_check.py; too slow for here)."""
    from reconstruct.backends.torch_backend import OneDnnConv3d, TorchBackend

    backend = TorchBackend(tiny_weights, device="cpu", precision="fp32", compile=True)
    assert backend.compiled and not any(type(m) is OneDnnConv3d for m in backend.graph.modules())
    x, f = (torch.from_numpy(a) for a in _backend_input())
    torch._dynamo.reset()
    traced = torch.compile(backend.graph, backend="eager", fullgraph=True)
    with torch.inference_mode():
        out = traced(x, f)
    ref = TorchBackend(tiny_weights, device="cpu", precision="fp32").run(x.numpy(), f.numpy())
    np.testing.assert_allclose(out[0].numpy(), ref["depth"], atol=1e-5, rtol=0)


def test_the_result_names_the_model_the_weights_hold(tiny_weights: Path) -> None:
    """A dualfocus-tiny weights file run with model= left at its default was recorded as
    dualfocus-s in DepthResult.model and result.yaml."""
    from capture.stack import FocalStack
    from reconstruct.api import reconstruct_stack

    rng = np.random.default_rng(0)
    stack = FocalStack((rng.random((3, 32, 32)) * 255).astype(np.uint8), focus_distance_m=[2.0, 1.0, 0.5])
    result = reconstruct_stack(stack, method="dualfocus", weights=tiny_weights, backend="torch", precision="fp32")
    assert result.model == "dualfocus-tiny"


@pytest.mark.parametrize(("case", "pattern"), [
    ("a path", r"^stack: expected a FocalStack, got str \(read a stack folder with FocalStack\.read"),
    ("params as a dict", r"^params: expected a ClassicalParams, got dict"),
    ("two focus measures", r"^focus_measure: 'tenengrad' and params\.focus_measure 'variance_of_laplacian' disagree"),
    ("window 0", r"^params\.window_px: expected a whole number of pixels >= 1, got 0"),
    ("window 2.5", r"^params\.window_px: .*got 2\.5"),
    ("local check -1", r"^params\.local_check_px: .*>= 0, got -1"),
])
def test_bad_api_arguments_are_one_line_naming_them(case: str, pattern: str) -> None:
    """These raised AttributeError, a multi-line cv2.error, or ran another focus measure silently."""
    from capture.stack import FocalStack
    from reconstruct.api import reconstruct_stack
    from reconstruct.classical import ClassicalParams

    stack = FocalStack(np.zeros((3, 16, 16), np.uint8), focus_distance_m=[2.0, 1.0, 0.5])
    calls = {
        "a path": lambda: reconstruct_stack("stacks/000000"),  # type: ignore[arg-type]
        "params as a dict": lambda: reconstruct_stack(stack, params={"window_px": 5}),  # type: ignore[arg-type]
        "two focus measures": lambda: reconstruct_stack(stack, focus_measure="tenengrad", params=ClassicalParams(focus_measure="variance_of_laplacian")),
        "window 0": lambda: ClassicalParams(window_px=0),
        "window 2.5": lambda: ClassicalParams(window_px=2.5),  # type: ignore[arg-type]
        "local check -1": lambda: ClassicalParams(local_check_px=-1),
    }
    with pytest.raises(ReconstructionError, match=pattern):
        calls[case]()
