"""The DualFocus network (reconstruct/dualfocus/model.py, registry.py): shapes and ranges,
invariance to slice order and focus units, variants, registry, parameter budgets, ONNX export."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from capture.errors import ReconstructionError
from reconstruct.dualfocus.model import (
    IN_CHANNELS,
    ConvexUpsampler,
    DualFocusConfig,
    DualFocusNet,
    DualFocusOutput,
    conv3d_as_planes,
    conv_bn_relu_of_concat,
    planes_conv3d,
    stem_conv_of_parts,
)
from reconstruct.dualfocus.model import _conv2d as _conv2d_block
from reconstruct.dualfocus.model import _conv3d as _conv3d_block
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
        {"upsample": "convex"},
        {"upsample": "convex", "spatial": False},
    ],
    ids=["replace", "no-spatial", "replace-no-spatial", "c2=3", "convex", "convex-no-spatial"],
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


def test_bad_upsample() -> None:
    with pytest.raises(ValueError, match="upsample"):
        DualFocusNet(DualFocusConfig(upsample="bicubic"))


# ------------------------------------------------------------------------ convex upsampling
def _upsampler_with_bias(bias: torch.Tensor) -> ConvexUpsampler:
    """An upsampler whose mask logits are the constant ``bias`` ``[9, 16]`` everywhere."""
    up = ConvexUpsampler(guide_channels=2)
    with torch.no_grad():
        up.head[2].bias.copy_(bias.reshape(-1))
    return up


def test_convex_upsampler_starts_as_uniform_3x3_mixing() -> None:
    g = torch.Generator().manual_seed(0)
    prob_low = torch.softmax(torch.randn(2, 4, 5, 6, generator=g), dim=1)
    up = ConvexUpsampler(guide_channels=2)
    out = up(prob_low, torch.randn(2, 2, 5, 6, generator=g), torch.rand(2, 3, 20, 24, generator=g))
    assert out.shape == (2, 4, 20, 24)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(2, 20, 24), atol=1e-6, rtol=0)
    # zero-initialised last layer: every full-resolution pixel is the mean of the 3x3 coarse
    # neighbourhood (edge-replicated) of its own coarse pixel
    box = F.avg_pool2d(F.pad(prob_low, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    torch.testing.assert_close(out, F.interpolate(box, scale_factor=4, mode="nearest"), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("k", "dy", "dx"), [(4, 0, 0), (0, -1, -1), (5, 0, 1), (7, 1, 0)])
def test_convex_upsampler_takes_the_neighbour_its_mask_picks(k: int, dy: int, dx: int) -> None:
    """A mask that puts all weight on neighbour ``k`` copies that coarse pixel's probabilities
    to all 16 full-resolution pixels: sharp, no averaging across an edge."""
    g = torch.Generator().manual_seed(1)
    prob_low = torch.softmax(torch.randn(1, 3, 4, 5, generator=g) * 3, dim=1)
    bias = torch.full((9, 16), -60.0)
    bias[k] = 60.0
    out = _upsampler_with_bias(bias)(prob_low, torch.zeros(1, 2, 4, 5), torch.zeros(1, 3, 16, 20))
    padded = F.pad(prob_low, (1, 1, 1, 1), mode="replicate")
    shifted = padded[:, :, 1 + dy:1 + dy + 4, 1 + dx:1 + dx + 5]
    torch.testing.assert_close(out, F.interpolate(shifted, scale_factor=4, mode="nearest"), atol=1e-6, rtol=0)


def test_convex_upsampler_subpixel_layout() -> None:
    """Mask channel ``j`` of the 16 drives full-resolution offset (j // 4, j % 4) in each 4x4
    cell: the pixel-shuffle order is the one the docstring promises."""
    prob_low = torch.zeros(1, 2, 3, 3)
    prob_low[:, 0] = 1.0
    prob_low[:, :, 1, 2] = torch.tensor([0.0, 1.0])  # the right-hand neighbour of the centre is plane 1
    bias = torch.full((9, 16), -60.0)
    bias[4] = 60.0  # every subpixel takes its own coarse pixel ...
    bias[4, 6], bias[5, 6] = -60.0, 60.0  # ... except subpixel (1, 2), which takes the right neighbour
    with torch.no_grad():
        out = _upsampler_with_bias(bias)(prob_low, torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 12, 12))
    plane1 = out[0, 1]
    assert float(plane1[4 + 1, 4 + 2]) == pytest.approx(1.0)  # centre cell, subpixel (1, 2)
    assert float(plane1[4:8, 4:8].sum()) == pytest.approx(1.0)  # nowhere else in the centre cell
    assert float(plane1[4:8, 8:12].sum()) == pytest.approx(16.0)  # the right cell is plane 1 itself


def test_convex_upsampler_learns() -> None:
    """Gradients reach both of its layers (the zero-initialised last one first)."""
    model = _tiny(upsample="convex").train()
    stack, focus = _inputs(3)
    model(stack, focus).depth.mean().backward()
    assert model.upsampler.head[2].weight.grad is not None and float(model.upsampler.head[2].weight.grad.abs().sum()) > 0


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
@pytest.mark.parametrize("dims", [2, 3])
def test_conv_bn_relu_of_concat_is_the_block_of_the_concatenation(dims: int) -> None:
    """The export-only rewrite (one convolution per part, BatchNorm folded, summed) is the same
    function as the block on the concatenated input, with trained-looking BatchNorm statistics."""
    torch.manual_seed(0)
    block = _trained_looking((_conv2d_block if dims == 2 else _conv3d_block)(5 + 3 + 1, 6))
    spatial = (7, 9) if dims == 2 else (4, 7, 9)
    parts = [torch.randn(2, c, *spatial) for c in (5, 3, 1)]
    with torch.no_grad():
        ref = block(torch.cat(parts, dim=1))
        got = conv_bn_relu_of_concat(block, parts)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def _trained_looking(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm's statistics and affine parameters away from their
    defaults (so that folding them into a convolution is tested), in eval mode."""
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
    return module.eval()


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("bias", [True, False])
def test_conv3d_as_planes_is_the_convolution(n: int, bias: bool) -> None:
    """The export-only rewrite of a 3x3x3 convolution (one 2D convolution over the planes with
    an output set per plane offset, summed shifted along N) is the same function, at the first
    and last planes too."""
    torch.manual_seed(n)
    conv = nn.Conv3d(6, 4, 3, 1, 1, bias=bias)
    x = torch.randn(2, 6, n, 7, 9)
    with torch.no_grad():
        torch.testing.assert_close(conv3d_as_planes(conv, x), conv(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("stride", [1, 2])
def test_planes_conv3d_is_the_convolution(n: int, stride: int) -> None:
    """One stack's 3x3x3 convolution as three 2D convolutions over its planes, the outer two
    shifted by a plane, is the same function (first and last planes included, strided too)."""
    torch.manual_seed(n + stride)
    conv = nn.Conv3d(6, 5, 3, (1, stride, stride), 1)
    x = torch.randn(1, 6, n, 8, 10)
    with torch.no_grad():
        ref = conv(x)[0].permute(1, 0, 2, 3)  # [N, Cout, h, w]
        got = planes_conv3d(x[0].permute(1, 0, 2, 3), conv.weight, conv.bias, stride)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_planes_path_refuses_convolutions_it_cannot_run() -> None:
    from reconstruct.dualfocus.model import _Block3d

    for conv in (nn.Conv3d(2, 2, 3, (2, 1, 1), 1, bias=False), nn.Conv3d(2, 2, 3, (1, 2, 1), 1, bias=False), nn.Conv3d(2, 2, 1, bias=False)):
        block = _Block3d(conv, nn.BatchNorm3d(2), nn.ReLU()).eval()
        with pytest.raises(ValueError, match="planes_conv3d"):
            block(torch.zeros(3, 2, 5, 5), planes=True)
    with pytest.raises(ValueError, match="bias-free"):
        _Block3d(nn.Conv3d(2, 2, 3, 1, 1, bias=True), nn.BatchNorm3d(2), nn.ReLU()).eval()(torch.zeros(3, 2, 5, 5), planes=True)


def test_conv3d_as_planes_refuses_other_convolutions() -> None:
    for conv in (nn.Conv3d(2, 2, 3, (1, 2, 2), 1), nn.Conv3d(2, 2, 1), nn.Conv3d(2, 2, 3, 1, 1, padding_mode="replicate")):
        with pytest.raises(ValueError, match="3x3x3, stride 1, padding 1"):
            conv3d_as_planes(conv, torch.zeros(1, 2, 3, 5, 5))


def test_stem_conv_of_parts_is_the_block_of_the_seven_channel_input() -> None:
    """The export-only rewrite of the encoder's first block (slices, stack mean and focus
    positions convolved apart, no 7-channel input) is the same function, borders included."""
    torch.manual_seed(0)
    block = _trained_looking(_conv2d_block(IN_CHANNELS, 6, 2))
    b, n = 2, 3
    x = torch.rand(b, n, 3, 12, 16)
    mean = x.mean(dim=1)
    pos = torch.rand(b, n)
    seven = torch.cat([x, x - mean[:, None], pos[:, :, None, None, None].expand(b, n, 1, 12, 16)], dim=2).reshape(b * n, IN_CHANNELS, 12, 16)
    with torch.no_grad():
        torch.testing.assert_close(stem_conv_of_parts(block, x, mean, pos), block(seven), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("b", "overrides"), [(1, {}), (2, {}), (1, {"focal_difference": "replace"}), (1, {"spatial": False})])
def test_export_only_rewrites_do_not_touch_the_torch_path(monkeypatch: pytest.MonkeyPatch, b: int, overrides: dict) -> None:
    """Outside an export, and in training mode even inside one, the network runs its plain
    graph; inside an eval-mode export, the rewritten graph gives the same outputs (one stack:
    every 3D convolution over the planes; a batch: the heads only)."""
    import reconstruct.dualfocus.model as model_mod

    calls: list[str] = []
    softmaxes: list[bool] = []
    for name in ("conv_bn_relu_of_concat", "conv3d_as_planes", "stem_conv_of_parts", "planes_conv3d"):
        real = getattr(model_mod, name)
        monkeypatch.setattr(model_mod, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    real_softmax = model_mod._softmax_over_planes
    monkeypatch.setattr(model_mod, "_softmax_over_planes", lambda x, *, written_out: softmaxes.append(written_out) or real_softmax(x, written_out=written_out))
    model = _trained_looking(_tiny(seed=2, **overrides))
    stack, focus = _inputs(4, b=b)
    exporting = [False]
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: exporting[0])
    with torch.no_grad():
        ref = model(stack, focus)
        assert calls == [] and softmaxes == [False]  # plain torch inference: no rewrite
        exporting[0] = True
        exported = model(stack, focus)
        # the stem's first block, the encoder's fuse block, both heads (and with one stack every
        # other 3D convolution: two blocks and a residual pair per level, as the tiny config has); the softmax
        heads = 2 if model.cfg.spatial else 1
        convs3d = sum(isinstance(m, nn.Conv3d) for m in model.modules()) - heads
        assert sorted(set(calls)) == sorted({"conv3d_as_planes", "conv_bn_relu_of_concat", "stem_conv_of_parts"} | ({"planes_conv3d"} if b == 1 else set()))
        assert calls.count("conv3d_as_planes") == heads and calls.count("planes_conv3d") == (convs3d if b == 1 else 0)
        assert softmaxes[-1] is True
        torch.testing.assert_close(exported.depth, ref.depth, atol=1e-5, rtol=0)
        torch.testing.assert_close(exported.prob, ref.prob, atol=1e-6, rtol=0)
        if model.cfg.spatial:
            torch.testing.assert_close(exported.surfaces, ref.surfaces, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(exported.logits_low, ref.logits_low, atol=1e-4, rtol=1e-5)
        done = len(calls)
        model.train()
        model(stack, focus)
        assert len(calls) == done and softmaxes[-1] is False  # training mode: no rewrite


def test_conv_bn_relu_of_concat_refuses_blocks_it_cannot_fold() -> None:
    block = nn.Sequential(nn.Conv2d(4, 4, 3, 1, 1, bias=True), nn.BatchNorm2d(4), nn.ReLU()).eval()
    with pytest.raises(ValueError, match="bias-free"):
        conv_bn_relu_of_concat(block, [torch.zeros(1, 2, 5, 5), torch.zeros(1, 2, 5, 5)])


class _DepthOnly(nn.Module):
    """ONNX wants tensors out, not a dataclass."""

    def __init__(self, net: DualFocusNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, stack: torch.Tensor, focus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.net(stack, focus)
        return out.depth, out.prob, out.confidence


def _export_and_compare(tmp_path: Path, *, spatial: bool, upsample: str = "bilinear") -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    net = _trained_looking(_tiny(seed=1, spatial=spatial, upsample=upsample))
    if upsample == "convex":  # a non-trivial mask: the zero-initialised layer would hide layout errors
        with torch.no_grad():
            net.upsampler.head[2].weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(3))
    wrapper = _DepthOnly(net).eval()  # a fresh wrapper is in training mode: eval() or BatchNorm stats change
    g = torch.Generator().manual_seed(7)
    stack = torch.rand(1, 5, 3, 32, 48, generator=g)
    focus = torch.tensor([[0.3, 1.2, 0.1, 2.0, 0.7]])  # unsorted on purpose
    with torch.no_grad():
        ref = [t.numpy() for t in wrapper(stack, focus)]
    path = tmp_path / f"dualfocus-tiny-{'spatial' if spatial else 'plain'}-{upsample}.onnx"
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
    if upsample == "bilinear":
        # the export rewrites happened: softmax written out, the encoder's fuse conv fed by no Concat
        assert "Softmax" not in ops and "Exp" in ops
        producers = {out: node for node in proto.graph.node for out in node.output}
        fuse = [node for node in proto.graph.node if node.op_type == "Conv" and "/encoder/fuse" in node.name]
        assert fuse and all(producers[node.input[0]].op_type != "Concat" for node in fuse if node.input[0] in producers)
    # every export: no convolution reads the 7-channel input (the stem's parts are convolved
    # apart), and the two float heads are 2D convolutions over the planes
    inferred = onnx.shape_inference.infer_shapes(proto).graph
    dims = {init.name: list(init.dims) for init in inferred.initializer}
    dims.update({vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in inferred.value_info})
    conv_weights = {node.name: dims[node.input[1]] for node in proto.graph.node if node.op_type == "Conv"}
    assert conv_weights and all(w[1] != IN_CHANNELS for w in conv_weights.values())
    heads = [name for name in conv_weights if name in ("/net/grad_head/Conv", "/net/dec_out/Conv")]
    assert len(heads) == (2 if spatial else 1) and all(len(conv_weights[name]) == 4 for name in heads)
    if upsample == "bilinear":  # one stack: no 3D convolution is left (all over the planes)
        assert all(len(w) == 4 for w in conv_weights.values()), {k: w for k, w in conv_weights.items() if len(w) != 4}
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


def test_onnx_export_convex_upsampler(tmp_path: Path) -> None:
    _export_and_compare(tmp_path, spatial=True, upsample="convex")
