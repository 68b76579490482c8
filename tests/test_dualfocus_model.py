"""The DualFocus network (reconstruct/dualfocus/model.py, registry.py): shapes and ranges,
invariance to slice order and focus units, variants, registry, parameter budgets, ONNX export."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from capture.errors import ReconstructionError
from reconstruct.dualfocus.model import DualFocusConfig, DualFocusNet, DualFocusOutput
from reconstruct.dualfocus.registry import MODELS, build_model, count_parameters, model_config

torch.set_num_threads(1)

B, H, W = 2, 32, 48


def _tiny(seed: int = 0, **overrides: object) -> DualFocusNet:
    torch.manual_seed(seed)
    return build_model("dualfocus-tiny", **overrides).eval()


def _inputs(n: int, *, b: int = B, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    stack = torch.rand(b, n, 3, H, W, generator=g)
    focus = torch.rand(b, n, generator=g) * 3.0 + 0.5  # diopters, distinct with probability 1
    return stack, focus


@pytest.mark.parametrize("n", [2, 3, 7])
def test_output_shapes_and_ranges(n: int) -> None:
    model = _tiny()
    stack, focus = _inputs(n)
    with torch.no_grad():
        out = model(stack, focus)
    assert isinstance(out, DualFocusOutput)
    c2 = model.cfg.surface_channels
    assert out.depth.shape == (B, H, W)
    assert out.prob.shape == (B, n, H, W)
    assert out.logits_low.shape == (B, n, H // 4, W // 4)
    assert out.surfaces is not None and out.surfaces.shape == (B, c2, n, H // 4, W // 4)
    assert out.confidence.shape == (B, H, W)
    for t in (out.depth, out.prob, out.logits_low, out.surfaces, out.confidence):
        assert torch.isfinite(t).all()
    assert float(out.depth.min()) >= 0.0 and float(out.depth.max()) <= 1.0
    assert float(out.prob.min()) >= 0.0
    torch.testing.assert_close(out.prob.sum(dim=1), torch.ones(B, H, W), atol=1e-5, rtol=0)
    assert float(out.confidence.min()) >= 0.0 and float(out.confidence.max()) <= 1.0
    # the surfaces are zero-mean (the Poisson solve's free constant)
    assert float(out.surfaces.mean(dim=(-2, -1)).abs().max()) < 1e-4


def test_train_mode_forward_and_backward() -> None:
    torch.manual_seed(0)
    model = build_model("dualfocus-tiny").train()
    stack, focus = _inputs(4)
    out = model(stack, focus)
    (out.depth.mean() + out.surfaces.mean()).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert model.grad_head[0][0].weight.grad.abs().sum() > 0  # the spatial branch is trained


@pytest.mark.parametrize("n", [2, 3, 7])
def test_slice_order_does_not_matter(n: int) -> None:
    model = _tiny()
    stack, focus = _inputs(n, seed=n)
    with torch.no_grad():
        ref = model(stack, focus)
        for seed in range(3):
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            out = model(stack[:, perm], focus[:, perm])
            torch.testing.assert_close(out.depth, ref.depth, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.confidence, ref.confidence, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.prob, ref.prob, atol=1e-5, rtol=0)  # prob is in sorted order


def test_slice_order_per_batch_item() -> None:
    """Each batch item is sorted on its own."""
    model = _tiny()
    stack, focus = _inputs(5)
    perm0, perm1 = torch.tensor([4, 2, 0, 1, 3]), torch.tensor([1, 0, 3, 4, 2])
    stack_p = torch.stack([stack[0, perm0], stack[1, perm1]])
    focus_p = torch.stack([focus[0, perm0], focus[1, perm1]])
    with torch.no_grad():
        torch.testing.assert_close(model(stack_p, focus_p).depth, model(stack, focus).depth, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale, offset", [(1000.0, -7.0), (0.01, 0.25), (2.0, 0.0), (1.0, 100.0)])
def test_focus_units_do_not_matter(scale: float, offset: float) -> None:
    """Scaling / offsetting the focus values (diopters, mm of lens travel, motor steps, ...)
    leaves the normalised depth unchanged."""
    model = _tiny()
    stack, focus = _inputs(5, seed=3)
    with torch.no_grad():
        ref = model(stack, focus)
        out = model(stack, focus * scale + offset)
    torch.testing.assert_close(out.depth, ref.depth, atol=1e-5, rtol=0)
    # and to_focus_units maps back into the given units
    back = DualFocusNet.to_focus_units(out.depth, focus * scale + offset)
    torch.testing.assert_close(back, DualFocusNet.to_focus_units(ref.depth, focus) * scale + offset, rtol=1e-4, atol=1e-4 * abs(scale))


def test_focus_as_slice_index() -> None:
    model = _tiny()
    stack, _ = _inputs(4)
    idx = torch.arange(4, dtype=torch.float32).repeat(B, 1)
    with torch.no_grad():
        out = model(stack, idx)
        out_d = model(stack, 0.5 + 0.25 * idx)
    torch.testing.assert_close(out.depth, out_d.depth, atol=1e-5, rtol=0)
    units = DualFocusNet.to_focus_units(out.depth, idx)
    assert float(units.min()) >= 0.0 and float(units.max()) <= 3.0


def test_normalise_focus() -> None:
    focus = torch.tensor([[2.0, 0.5, 1.0], [10.0, 30.0, 20.0]])
    order, pos, lo_span = DualFocusNet.normalise_focus(focus)
    assert order.tolist() == [[1, 2, 0], [0, 2, 1]]
    torch.testing.assert_close(pos, torch.tensor([[0.0, 1 / 3, 1.0], [0.0, 0.5, 1.0]]))
    torch.testing.assert_close(lo_span, torch.tensor([[0.5, 1.5], [10.0, 20.0]]))


@pytest.mark.parametrize(
    "overrides",
    [
        {"focal_difference": "replace"},
        {"spatial": False},
        {"focal_difference": "replace", "spatial": False},
        {"surface_channels": 3},
    ],
    ids=["replace", "no-spatial", "replace-no-spatial", "c2=3"],
)
def test_variants_run(overrides: dict) -> None:
    model = _tiny(**overrides)
    for k, v in overrides.items():
        assert getattr(model.cfg, k) == v
    stack, focus = _inputs(3)
    with torch.no_grad():
        out = model(stack, focus)
    assert out.depth.shape == (B, H, W)
    assert float(out.depth.min()) >= 0.0 and float(out.depth.max()) <= 1.0
    torch.testing.assert_close(out.prob.sum(dim=1), torch.ones(B, H, W), atol=1e-5, rtol=0)
    if overrides.get("spatial", True):
        assert out.surfaces is not None and out.surfaces.shape[1] == model.cfg.surface_channels
    else:
        assert out.surfaces is None
        assert not hasattr(model, "grad_head")


def test_bad_focal_difference() -> None:
    with pytest.raises(ValueError, match="focal_difference"):
        DualFocusNet(DualFocusConfig(focal_difference="sideways"))


def test_registry_unknown_name_lists_variants() -> None:
    with pytest.raises(ReconstructionError, match="dualfocus-s") as exc:
        build_model("dualfocus-xl")
    assert "dualfocus-xl" in str(exc.value)
    for name in MODELS:
        assert name in str(exc.value)
    with pytest.raises(ReconstructionError, match="dualfocus-s"):
        model_config("nope")


def test_registry_overrides_do_not_change_the_registered_config() -> None:
    before = MODELS["dualfocus-tiny"]
    cfg = model_config("dualfocus-tiny", spatial=False, enc_channels=[4, 8, 8])
    assert cfg.spatial is False and cfg.enc_channels == (4, 8, 8)
    assert MODELS["dualfocus-tiny"] == before and MODELS["dualfocus-tiny"].spatial is True


def test_parameter_counts() -> None:
    n_s = count_parameters(build_model("dualfocus-s"))
    assert 1_000_000 < n_s < 5_000_000, n_s
    n_paper = count_parameters(build_model("dualfocus-paper"))
    assert n_paper > 15_000_000, n_paper
    assert count_parameters(build_model("dualfocus-tiny")) < 200_000


# ----------------------------------------------------------------------------------- ONNX
class _DepthOnly(nn.Module):
    """ONNX wants tensors out, not a dataclass."""

    def __init__(self, net: DualFocusNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, stack: torch.Tensor, focus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.net(stack, focus)
        return out.depth, out.prob, out.confidence


def _export_and_compare(tmp_path: Path, *, spatial: bool) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    net = _tiny(seed=1, spatial=spatial)
    wrapper = _DepthOnly(net).eval()  # a fresh wrapper is in training mode: eval() or BatchNorm stats change
    g = torch.Generator().manual_seed(7)
    stack = torch.rand(1, 5, 3, 32, 48, generator=g)
    focus = torch.tensor([[0.3, 1.2, 0.1, 2.0, 0.7]])  # unsorted on purpose
    with torch.no_grad():
        ref = [t.numpy() for t in wrapper(stack, focus)]
    path = tmp_path / f"dualfocus-tiny-{'spatial' if spatial else 'plain'}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(
            wrapper, (stack, focus), str(path), opset_version=18, dynamo=False,
            input_names=["stack", "focus"], output_names=["depth", "prob", "confidence"],
        )
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    ops = {node.op_type for node in proto.graph.node}
    assert not [op for op in ops if "FFT" in op.upper() or "DFT" in op.upper()], ops
    if spatial:
        assert "MatMul" in ops  # the DCT solve as matrix products
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    depth, prob, confidence = sess.run(None, {"stack": stack.numpy(), "focus": focus.numpy()})
    np.testing.assert_allclose(depth, ref[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(prob, ref[1], atol=1e-4, rtol=0)
    np.testing.assert_allclose(confidence, ref[2], atol=1e-4, rtol=0)
    # the same graph with the slices in another order gives the same depth
    perm = [2, 0, 4, 1, 3]
    (depth_p,) = sess.run(["depth"], {"stack": stack[:, perm].numpy(), "focus": focus[:, perm].numpy()})
    np.testing.assert_allclose(depth_p, ref[0], atol=1e-4, rtol=0)


def test_onnx_export_spatial(tmp_path: Path) -> None:
    assert MODELS["dualfocus-tiny"].spatial is True  # the default
    _export_and_compare(tmp_path, spatial=True)


def test_onnx_export_without_spatial_branch(tmp_path: Path) -> None:
    _export_and_compare(tmp_path, spatial=False)
