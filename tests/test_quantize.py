"""int8 ONNX Runtime graphs (reconstruct/backends/quantize.py and the int8 paths of the export,
backend selection, predict and the export command line). ONNX Runtime's real quantiser and
CPU kernels run here; the shipped ``dualfocus-s`` at small shapes."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from capture.errors import ReconstructionError
from reconstruct.backends import export as export_mod
from reconstruct.backends import quantize
from reconstruct.backends import select as select_mod
from reconstruct.dualfocus import infer

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnxruntime.quantization import quantize_static as ort_quantize_static  # noqa: E402
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (6, 64, 96)
#: whether the installed onnxruntime's quantiser runs the recipe (not onnxruntime-openvino 1.24.1)
QUANTISER_OK = "calibration_cache_path" in inspect.signature(ort_quantize_static).parameters
needs_quantiser = pytest.mark.skipif(not QUANTISER_OK, reason=f"onnxruntime {ort.__version__}'s quantiser is too old for the int8 recipe (needs 1.27)")
#: the IR version of the graphs built here: opset 17 needs 8; onnx writes its newest (14 in
#: onnx 1.23), which ONNX Runtime 1.30 refuses to load (seen on the GPU machine)
_IR_VERSION = 8


@pytest.fixture(autouse=True)
def _isolated(isolated_cache: Path) -> Path:
    """Every test in this file runs with ``isolated_cache`` (conftest)."""
    return isolated_cache


def _session(path: Path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _conv_model(in_channels: int, rank: int) -> onnx.ModelProto:
    """One ungrouped Conv (2D or 3D) with a bias, random weights, as an ONNX model."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(in_channels)
    spatial = [5, 6, 7][: rank - 2]
    w = rng.standard_normal((4, in_channels, *([3] * (rank - 2)))).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1] * (2 * (rank - 2)))
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_channels, *spatial])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=_IR_VERSION)


@pytest.mark.parametrize("rank", [4, 5])
def test_channel_padding_keeps_the_output(rank: int, tmp_path: Path) -> None:
    model = _conv_model(5, rank)
    x = np.random.default_rng(1).standard_normal([1, 5, 5, 6, 7][:rank]).astype(np.float32)
    before = tmp_path / "before.onnx"
    onnx.save(model, str(before))
    padded = quantize.pad_conv_channels(model, multiple=8)
    after = tmp_path / "after.onnx"
    onnx.save(model, str(after))
    assert padded == ["conv"]
    weight = next(i for i in model.graph.initializer if i.name == "w")
    assert list(weight.dims)[:2] == [4, 8]
    assert [n.op_type for n in model.graph.node] == ["Pad", "Conv"]
    y0 = _session(before).run(None, {"x": x})[0]
    y1 = _session(after).run(None, {"x": x})[0]
    np.testing.assert_allclose(y0, y1, atol=1e-6, rtol=0)  # zero terms added: equal up to summation order


def test_channel_padding_leaves_aligned_and_unlisted_convs_alone() -> None:
    aligned = _conv_model(8, 4)
    assert quantize.pad_conv_channels(aligned, multiple=8) == []
    unlisted = _conv_model(5, 4)
    assert quantize.pad_conv_channels(unlisted, names={"another"}, multiple=8) == []
    assert [n.op_type for n in unlisted.graph.node] == ["Conv"]


def test_sums_pads_and_slices_are_quantised_only_between_quantised_tensors() -> None:
    """Residual sums and the plane sums and shifts of the export's 3D convolutions (sums of
    quantised convolutions, shifted or not, and ReLUs, feeding a Relu or another such node) are
    quantised, and so is a pad feeding only int8 convolutions; a sum or shift of a float
    convolution or of anything else, a sum feeding anything else, and a pad of a float tensor
    read by float ops (the Poisson solve's) stay float."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Relu", ["x"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w"], ["c0"], name="conv"),
        helper.make_node("Add", ["r0", "c0"], ["a"], name="residual"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w"], ["c1"], name="float_conv"),
        helper.make_node("Add", ["r", "c1"], ["f"], name="of_a_float_conv"),
        helper.make_node("Relu", ["f"], ["rf"], name="relu_f"),
        helper.make_node("Add", ["rf", "x"], ["b"], name="of_an_input"),
        helper.make_node("Relu", ["b"], ["rb"], name="relu_b"),
        helper.make_node("Add", ["rb", "c0"], ["h"], name="head_sum"),
        helper.make_node("Add", ["rb", "rf"], ["c"], name="shared"),
        helper.make_node("Relu", ["c"], ["y1"], name="relu2"),
        helper.make_node("Mul", ["c", "h"], ["y2"], name="mul"),
        # the plane sums of the export's 3D convolutions: a conv, a shifted conv, a residual
        helper.make_node("Pad", ["c0", "pads"], ["shifted"], name="shift"),
        helper.make_node("Add", ["c0", "shifted"], ["s1"], name="plane_sum"),
        helper.make_node("Add", ["s1", "r0"], ["s2"], name="plane_residual"),
        helper.make_node("Relu", ["s2"], ["y3"], name="relu3"),
        helper.make_node("Slice", ["c0", "starts", "ends"], ["sliced"], name="slice"),
        helper.make_node("Add", ["sliced", "c0"], ["s4"], name="slice_sum"),
        helper.make_node("Relu", ["s4"], ["y5"], name="relu5"),
        helper.make_node("Pad", ["c1", "pads"], ["shifted_float"], name="shift_float"),
        helper.make_node("Add", ["c0", "shifted_float"], ["s3"], name="of_a_shifted_float_conv"),
        helper.make_node("Relu", ["s3"], ["y4"], name="relu4"),
        # a channel padding in front of an int8 convolution, and a pad of a float input read by float ops
        helper.make_node("Pad", ["x", "pads"], ["xp"], name="channel_pad"),
        helper.make_node("Conv", ["xp", "w"], ["y6"], name="conv_after_pad"),
        helper.make_node("Pad", ["x", "pads"], ["xq"], name="poisson_pad"),
        helper.make_node("Sub", ["xq", "x"], ["y7"], name="sub"),
    ]
    spec = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])
    weight = onnx.numpy_helper.from_array(np.zeros((2, 2, 1, 1), np.float32), "w")
    pads = onnx.numpy_helper.from_array(np.array([1, 0, 0, 0, -1, 0, 0, 0], np.int64), "pads")
    starts, ends = (onnx.numpy_helper.from_array(np.array([v], np.int64), name) for v, name in ((0, "starts"), (1, "ends")))
    outs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("y1", "y2", "y3", "y4", "y5", "y6", "y7")]
    model = helper.make_model(helper.make_graph(nodes, "g", [spec], outs, [weight, pads, starts, ends]), opset_imports=[helper.make_opsetid("", 17)], ir_version=_IR_VERSION)
    assert "Pad" in quantize.QUANTISED_OPS and "Slice" in quantize.QUANTISED_OPS
    assert quantize.float_sum_and_shift_names(model, ["float_conv"]) == [
        "of_a_float_conv", "of_an_input", "head_sum", "shared", "shift_float", "of_a_shifted_float_conv", "poisson_pad"]
    assert quantize.float_sum_and_shift_names(model) == ["of_an_input", "head_sum", "shared", "poisson_pad"]


def _qdq_pad_model(shift: list[int], zero_point: int, q_zero_point: int) -> onnx.ModelProto:
    """uint8 -> DequantizeLinear -> Pad (constant 0) -> QuantizeLinear -> uint8, as the quantiser writes a quantised Pad."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("DequantizeLinear", ["x", "s", "z"], ["f"], name="dq"),
        helper.make_node("Pad", ["f", "pads"], ["g"], name="pad", mode="constant"),
        helper.make_node("QuantizeLinear", ["g", "s", "qz"], ["y"], name="q"),
    ]
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(zero_point, np.uint8), "z"),
             numpy_helper.from_array(np.array(q_zero_point, np.uint8), "qz"), numpy_helper.from_array(np.array(shift, np.int64), "pads")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [4, 3, 5, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=_IR_VERSION)


@pytest.mark.parametrize("shift", [[1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 2, 0, 0]])
def test_pads_in_uint8_is_exact(shift: list[int]) -> None:
    """A dequantise -> pad -> quantise with one scale and zero point becomes a uint8 Pad filled
    with the zero point: the same output bytes, two nodes fewer."""
    model = _qdq_pad_model(shift, 7, 7)
    x = np.random.default_rng(0).integers(0, 256, (4, 3, 5, 6), dtype=np.uint8)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert quantize.pads_in_uint8(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Pad"]
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, ref)


def test_pads_in_uint8_drops_a_dequantisation_shared_by_two_rewritten_pads() -> None:
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("DequantizeLinear", ["x", "s", "z"], ["f"], name="dq")]
    for k, shift in enumerate(([1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0])):
        nodes += [helper.make_node("Pad", ["f", f"pads{k}"], [f"g{k}"], name=f"pad{k}", mode="constant"),
                  helper.make_node("QuantizeLinear", [f"g{k}", "s", "z"], [f"q{k}"], name=f"q{k}"),
                  helper.make_node("DequantizeLinear", [f"q{k}", "s", "z"], [f"y{k}"], name=f"out{k}")]
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(7, np.uint8), "z"),
             numpy_helper.from_array(np.array([1, 0, 0, 0, 0, 0, 0, 0], np.int64), "pads0"),
             numpy_helper.from_array(np.array([0, 0, 0, 0, 1, 0, 0, 0], np.int64), "pads1")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [4, 3, 5, 6])],
                              [helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, None) for k in range(2)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=_IR_VERSION)
    x = np.random.default_rng(1).integers(0, 256, (4, 3, 5, 6), dtype=np.uint8)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert quantize.pads_in_uint8(model) == 2
    assert [n.op_type for n in model.graph.node] == ["Pad", "DequantizeLinear", "Pad", "DequantizeLinear"]  # the shared dq is gone
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_array_equal(a, b)


def test_pads_in_uint8_leaves_requantising_pads_alone() -> None:
    model = _qdq_pad_model([1, 0, 0, 0, 0, 0, 0, 0], 7, 9)  # another zero point after the pad
    assert quantize.pads_in_uint8(model) == 0 and len(model.graph.node) == 3


def test_calibration_feeds_are_seeded_stacks_of_the_shape() -> None:
    a = quantize.calibration_feeds(SHAPE, count=2)
    b = quantize.calibration_feeds(SHAPE, count=2)
    assert len(a) == 2
    assert a[0]["stack"].shape == (1, *SHAPE[:1], 3, *SHAPE[1:]) and a[0]["stack"].dtype == np.float32
    assert a[0]["focus"].shape == (1, SHAPE[0])
    assert 0.0 <= a[0]["stack"].min() and a[0]["stack"].max() <= 1.0
    np.testing.assert_array_equal(a[1]["stack"], b[1]["stack"])
    assert not np.array_equal(a[0]["stack"], a[1]["stack"])
    # the slices differ in focus: blur varies across the stack
    assert float(np.abs(np.diff(a[0]["stack"][0], axis=0)).mean()) > 1e-3


def _shipped_inputs(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    feed = quantize.calibration_feeds(SHAPE, count=1, seed=seed)[0]  # a seed the calibration does not use
    slices = feed["stack"][0].transpose(0, 2, 3, 1)  # [N, H, W, 3]
    return np.ascontiguousarray(slices), feed["focus"][0]


@needs_quantiser
def test_int8_export_is_quantised_cached_and_close_to_fp32(isolated_cache: Path) -> None:
    weights = infer.shipped_weights("dualfocus-s")
    art = export_mod.export_onnx(weights, SHAPE, precision="int8")
    assert not art.reused and art.path.parent == isolated_cache / "onnx" and "_int8_" in art.path.name
    model = onnx.load(str(art.path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 5 and ops.count("DequantizeLinear") > 5
    side = json.loads(art.path.with_suffix(".json").read_text())
    assert side["recipe"] == quantize.RECIPE and side["precision"] == "int8"
    assert side["calibration_stacks"] == quantize.CALIBRATION_STACKS
    # the recipe's structural rules pick the two full-resolution convolutions of the stem's first
    # block (the slices' and the stack mean's, as the export writes it), the two heads with fewer
    # than 16 output channels (2D convolutions over the planes in the export) and, since recipe
    # v6, every convolution of the half-resolution stem
    stem_convs = [name for name in side["float_convs"] if quantize.STEM_MARK in name]
    assert len(stem_convs) >= 3 and sorted(side["float_convs"]) == sorted([
        "/net/encoder/Conv", "/net/encoder/Conv_1", "/net/grad_head/Conv", "/net/dec_out/Conv", *stem_convs,
    ])
    producers = {out: node for node in model.graph.node for out in node.output}
    convs = {n.name: n for n in model.graph.node if n.op_type == "Conv"}
    assert {name for name in convs if quantize.STEM_MARK in name} == set(stem_convs)
    for name in stem_convs:  # float weights: no DequantizeLinear in front of them
        assert producers.get(convs[name].input[1]) is None or producers[convs[name].input[1]].op_type != "DequantizeLinear", name
    # the stem's sums, those inside the float heads and the Poisson solve's pads and sums stay
    # float; the residual sums of the deeper encoder and the decoder do not
    floats = side["float_sums_pads_slices"]
    assert "/net/encoder/Add" in floats and any(name.startswith("/net/dec_out/") for name in floats)
    assert any("stem.2" in name for name in floats)
    assert not [name for name in floats if any(block in name for block in ("/deep/", "/dec_blocks/", "/dec_down/"))]
    # the three plane convolutions of the two 65- and 67-channel 3D convolutions are padded, each
    # input once
    assert sorted(side["padded_convs"]) == sorted(f"/net/{block}/{conv}" for block in ("dec_in", "grad_head/grad_head.0") for conv in ("Conv", "Conv_1", "Conv_2"))
    assert len([n for n in model.graph.node if n.op_type == "Pad" and n.name.endswith("_channel_pad")]) == 2
    # every Pad (channel padding, plane shifts) runs on uint8, none between a dequantise and a quantise
    pads = [n for n in model.graph.node if n.op_type == "Pad"]
    float_pads = [n.name for n in pads if n.name in side["float_sums_pads_slices"]]
    assert len(float_pads) == 4  # the Poisson divergence's, which read the float gradient head
    assert side["uint8_pads"] == len(pads) - 4 > 2
    assert not [n.name for n in pads if n.name not in float_pads and producers.get(n.input[0]) is not None and producers[n.input[0]].op_type == "DequantizeLinear"]
    # and no node whose output nobody reads
    read = {name for n in model.graph.node for name in n.input} | {o.name for o in model.graph.output}
    assert not [n.name for n in model.graph.node if not any(o in read for o in n.output)]
    fp32 = export_mod.export_onnx(weights, SHAPE, precision="fp32")
    assert fp32.reused and side["fp32_onnx_sha256"] == fp32.sha256
    again = export_mod.export_onnx(weights, SHAPE, precision="int8")
    assert again.reused and again.sha256 == art.sha256

    slices, focus = _shipped_inputs()
    ref = infer.predict(slices, focus, weights=weights, backend="onnxruntime", precision="fp32")
    q = infer.predict(slices, focus, weights=weights, backend="onnxruntime", precision="int8")
    assert q.describe() == "cpu (onnxruntime, int8)" and q.device == "cpu" and q.precision == "int8" and q.backend == "onnxruntime"
    span = float(focus.max() - focus.min())
    diff = np.abs(q.depth_focus - ref.depth_focus) / span
    print(f"dualfocus-s {'x'.join(map(str, SHAPE))} int8 vs fp32: mean |depth diff| {diff.mean():.2e}, max {diff.max():.2e} of the range")
    assert not np.array_equal(q.depth_focus, ref.depth_focus)  # it did run another graph
    assert diff.mean() < 0.01 and np.quantile(diff, 0.99) < 0.1


def test_auto_with_int8_runs_onnxruntime_on_the_cpu_even_with_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(select_mod, "cuda_available", lambda: True)
    monkeypatch.setattr(select_mod, "tensorrt_problem", lambda: None)
    monkeypatch.setattr(select_mod, "_gpu_name", lambda: "Test GPU")
    monkeypatch.setattr(infer, "check_int8_support", lambda: None)  # the choice, whatever this onnxruntime's quantiser
    for requested in ("auto", "onnxruntime"):
        choice = select_mod.select_backend(requested, "int8")
        assert (choice.name, choice.device) == ("onnxruntime", "cpu")
        assert "int8" in choice.reason
        assert infer.resolve_precision("int8", choice) == "int8"
    # auto without int8 still takes the GPU
    assert select_mod.select_backend("auto", "auto").device == "cuda"


def test_int8_without_onnxruntime_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(select_mod, "onnxruntime_providers", lambda: None)
    with pytest.raises(ReconstructionError, match=r"^precision: int8 runs in ONNX Runtime, and the onnxruntime package is not installed"):
        select_mod.select_backend("auto", "int8")


def test_auto_int8_failure_falls_back_to_torch(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(*_a, **_k):
        raise ReconstructionError("backend: int8 quantisation of dualfocus-s for 6x64x96 failed (test)")

    monkeypatch.setattr(export_mod, "_export_int8", broken)
    monkeypatch.setattr(infer, "cpu_bf16_native", lambda: False)
    monkeypatch.setattr(infer, "check_int8_support", lambda: None)  # a failure past the up-front checks
    slices, focus = _shipped_inputs()
    pred = infer.predict(slices, focus, weights=infer.shipped_weights("dualfocus-s"), backend="auto", precision="int8")
    assert pred.backend == "torch" and pred.describe() == "cpu (torch)"
    assert any("failed" in r.getMessage() and "using torch" in r.getMessage() for r in caplog.records)


def _run(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, export_mod.CACHE_ENV: str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.slow  # CI's 10-minute budget on the slower 2-core VMs; run with: pytest -m slow
@needs_quantiser
def test_export_cli_int8(tmp_path: Path, isolated_cache: Path) -> None:
    out = tmp_path / "s_int8.onnx"
    proc = _run("-m", "reconstruct.export", "--shape", "4x32x48", "--to", "onnx", "--int8", "--out", str(out), cache=isolated_cache)
    assert proc.returncode == 0, proc.stderr
    assert "4x32x48 int8" in proc.stdout
    assert any(n.op_type == "DequantizeLinear" for n in onnx.load(str(out)).graph.node)
    bad = _run("-m", "reconstruct.export", "--shape", "4x32x48", "--to", "onnx", "--int8", "--fp16", "--out", str(tmp_path / "x.onnx"),
               cache=isolated_cache)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "--int8" in lines[0] and "--fp16" in lines[0]
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.slow  # CI's 10-minute budget on the slower 2-core VMs; run with: pytest -m slow
@needs_quantiser
def test_bench_backends_sweep_writes_a_row_per_shape(tmp_path: Path, isolated_cache: Path) -> None:
    env = {**os.environ, export_mod.CACHE_ENV: str(isolated_cache), "DUALFOCUS_BENCH_RESULTS": str(tmp_path)}
    cmd = [sys.executable, "benchmarks/bench_backends.py", "--sweep", "3x32x48", "4x32x64", "--repeats", "1", "--warmup", "0",
           "--threads", "1", "--backends", "torch-cpu", "onnxruntime-int8-cpu"]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "backends_cpu_sweep.json").read_text())
    assert list(doc["results"]) == ["3x32x48", "4x32x64"]
    for row in doc["results"].values():
        assert set(row) == {"torch-cpu", "onnxruntime-int8-cpu"}
        assert row["torch-cpu"]["p50_ms"] > 0 and row["onnxruntime-int8-cpu"]["device"] == "cpu (onnxruntime, int8)"
    bad = subprocess.run([*cmd[:3], "3x31x48"], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --sweep 3x31x48")


def test_calibration_shape_caps_the_pixels() -> None:
    assert quantize.calibration_shape((10, 288, 384)) == (10, 288, 384)
    assert quantize.calibration_shape((4, 32, 48)) == (4, 32, 48)
    n, h, w = quantize.calibration_shape((12, 1088, 1440))
    assert n == 12 and h % 4 == 0 and w % 4 == 0
    assert h * w <= quantize.CALIBRATION_MAX_PIXELS and h * w > 0.9 * quantize.CALIBRATION_MAX_PIXELS
    assert abs(w / h - 1440 / 1088) < 0.02


@pytest.mark.slow  # CI's 10-minute budget on the slower 2-core VMs; run with: pytest -m slow
@needs_quantiser
def test_large_stacks_are_calibrated_at_the_smaller_shape(isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantize, "CALIBRATION_MAX_PIXELS", 32 * 48)
    seen: list[tuple[int, int, int]] = []
    real = quantize.calibration_feeds
    monkeypatch.setattr(quantize, "calibration_feeds", lambda shape, *a, **k: seen.append(tuple(shape)) or real(shape, *a, **k))
    weights = infer.shipped_weights("dualfocus-s")
    art = export_mod.export_onnx(weights, SHAPE, precision="int8")
    side = json.loads(art.path.with_suffix(".json").read_text())
    assert side["calibration_shape"] == [6, 32, 48] and seen == [(6, 32, 48)]
    assert any((isolated_cache / "onnx").glob("dualfocus-s_6x32x48_fp32_*.onnx"))  # the calibration graph, cached too
    slices, focus = _shipped_inputs()
    ref = infer.predict(slices, focus, weights=weights, backend="onnxruntime", precision="fp32")
    q = infer.predict(slices, focus, weights=weights, backend="onnxruntime", precision="int8")
    diff = np.abs(q.depth_focus - ref.depth_focus) / float(focus.max() - focus.min())
    print(f"ranges from 6x32x48 applied at 6x64x96: mean |depth diff| {diff.mean():.2e} of the range")
    assert diff.mean() < 0.01 and np.quantile(diff, 0.99) < 0.1


def test_a_quantiser_too_old_for_the_recipe_is_one_line_naming_the_version() -> None:
    """ONNX Runtime 1.26 and older lack ``calibration_cache_path`` (checked against the real
    1.20, 1.24 and 1.26 wheels: a TypeError deep in the quantisation); a stand-in with 1.26's
    signature gets one line naming precision, the version needed and the installed one."""
    import onnxruntime
    from onnxruntime.quantization import quantize_static

    def old_quantize_static(model_input, model_output, calibration_data_reader, quant_format=None, op_types_to_quantize=None,
                            per_channel=False, reduce_range=False, activation_type=None, weight_type=None, nodes_to_quantize=None,
                            nodes_to_exclude=None, use_external_data_format=False, calibrate_method=None, extra_options=None):
        raise AssertionError("not reached")

    with pytest.raises(ReconstructionError) as info:
        quantize.check_quantiser_version(old_quantize_static)
    assert str(info.value).startswith("precision: int8 needs onnxruntime 1.27 or newer")
    assert "installed: onnxruntime" in str(info.value) and onnxruntime.__version__ in str(info.value)
    if QUANTISER_OK:
        quantize.check_quantiser_version(quantize_static)  # the installed one takes it


def test_the_openvino_build_is_told_to_switch_builds_not_to_install_the_plain_wheel_over_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-openvino 1.24.1's quantiser is too old; ``pip install -U onnxruntime`` over it
    would leave two wheels sharing one module, so the message points at ``ORT_BUILD=plain``."""
    monkeypatch.setattr(quantize, "_installed_distribution", lambda name: name == "onnxruntime-openvino")
    with pytest.raises(ReconstructionError) as info:
        quantize.check_quantiser_version(lambda model_input, model_output, calibration_data_reader: None)
    assert "installed: onnxruntime-openvino" in str(info.value) and "ORT_BUILD=plain ./setup.sh" in str(info.value)
    assert "pip install" not in str(info.value)


def test_int8_is_refused_before_any_capture_where_the_quantiser_is_too_old(monkeypatch: pytest.MonkeyPatch) -> None:
    """``check_ready`` (run_rig's check before capturing) and ``auto`` refuse int8 on a quantiser
    too old for the recipe in one line, instead of failing (or, under auto, falling back to
    torch with a warning) at the first stack."""
    from reconstruct.api import check_ready

    def too_old() -> None:
        raise ReconstructionError("precision: int8 needs onnxruntime 1.27 or newer (test)")

    monkeypatch.setattr(infer, "check_int8_support", too_old)
    for backend in ("auto", "onnxruntime"):
        with pytest.raises(ReconstructionError, match=r"^precision: int8 needs onnxruntime 1.27"):
            check_ready("dualfocus", backend=backend, precision="int8")


@pytest.mark.slow  # CI's 10-minute budget on the slower 2-core VMs; run with: pytest -m slow
@needs_quantiser
def test_int8_export_survives_a_cache_limit_smaller_than_its_graphs(isolated_cache: Path, monkeypatch) -> None:
    """A stack above the calibration size exports two fp32 graphs (the base and a smaller one to
    calibrate on); the second export's pruning under a small DUALFOCUS_CACHE_MAX_MB removed the
    base, and the quantisation then failed as 'cannot write the ONNX cache'."""
    monkeypatch.setattr(quantize, "CALIBRATION_MAX_PIXELS", 16 * 24)
    monkeypatch.setenv(export_mod.CACHE_MAX_ENV, "0.001")  # 1 kB: every graph is over it
    weights = infer.shipped_weights("dualfocus-s")
    shape = (2, 32, 48)
    assert quantize.calibration_shape(shape) != shape
    art = export_mod.export_onnx(weights, shape, precision="int8")
    assert art.path.is_file() and "_int8_" in art.path.name
