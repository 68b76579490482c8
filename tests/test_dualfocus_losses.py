"""DualFocus losses (reconstruct/dualfocus/losses.py): depth (smooth-L1), spatial variational
L_sv, focal variational (unimodality) L_fv, and their weighted sum."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reconstruct.dualfocus.losses import LossWeights, depth_loss, focal_variational_loss, spatial_variational_loss, total_loss
from reconstruct.dualfocus.model import DualFocusNet, DualFocusOutput
from reconstruct.dualfocus.registry import build_model

torch.set_num_threads(1)

B, N, H, W = 2, 5, 32, 48
h, w = H // 4, W // 4


def _target() -> torch.Tensor:
    """A smooth, non-planar normalised inverse depth in [0, 1], ``[B, H, W]``."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
    t0 = 0.15 + 0.4 * xx + 0.3 * yy**2 + 0.05 * torch.sin(7 * xx)
    t1 = 0.9 - 0.6 * xx * yy
    return torch.stack([t0, t1]).clamp(0, 1)


def _low(target: torch.Tensor) -> torch.Tensor:
    """The true depth at the surfaces' resolution (area average, as the loss does)."""
    return F.adaptive_avg_pool2d(target[:, None], (h, w))[:, 0]


def _pos() -> torch.Tensor:
    return torch.linspace(0, 1, N).repeat(B, 1)


def _ones_mask() -> torch.Tensor:
    return torch.ones(B, H, W, dtype=torch.bool)


# ------------------------------------------------------------------------------ depth loss
def test_depth_loss_zero_for_perfect_prediction() -> None:
    t = _target()
    assert float(depth_loss(t.clone(), t, _ones_mask())) == 0.0


def test_depth_loss_positive_and_smooth_l1_values() -> None:
    t = _target()
    m = _ones_mask()
    assert float(depth_loss(t + 0.01, t, m)) > 0
    # smooth-L1 with beta 0.05: 0.5 e^2 / beta below beta, e - beta / 2 above
    torch.testing.assert_close(depth_loss(t + 0.2, t, m, beta=0.05), torch.tensor(0.2 - 0.025), atol=1e-6, rtol=0)
    torch.testing.assert_close(depth_loss(t - 0.02, t, m, beta=0.05), torch.tensor(0.5 * 0.02**2 / 0.05), atol=1e-6, rtol=0)


def test_depth_loss_ignores_masked_pixels() -> None:
    t = _target()
    m = _ones_mask()
    m[:, :, : W // 2] = False
    pred = t.clone()
    pred[:, :, : W // 2] = torch.rand(B, H, W // 2) * 5  # garbage where the truth is unknown
    assert float(depth_loss(pred, t, m)) == 0.0
    pred[:, 0, -1] += 0.3  # one known pixel wrong per item
    expected = (0.3 - 0.025) * B / (B * H * (W - W // 2))
    torch.testing.assert_close(depth_loss(pred, t, m), torch.tensor(expected), atol=1e-6, rtol=1e-4)
    # nothing known: zero, not NaN
    assert float(depth_loss(pred, t, torch.zeros_like(m))) == 0.0


def test_depth_loss_gradient() -> None:
    t = _target()
    pred = (t + 0.1).requires_grad_(True)
    depth_loss(pred, t, _ones_mask()).backward()
    assert pred.grad is not None and float(pred.grad.min()) > 0


# ------------------------------------------------------------------------------ focal variational
def _gaussian_profiles() -> torch.Tensor:
    """A peaked profile across N at every pixel, the peak anywhere (also at either end)."""
    n = torch.arange(N, dtype=torch.float32)[None, :, None, None]
    g = torch.Generator().manual_seed(0)
    centre = torch.rand(B, 1, H, W, generator=g) * (N + 1) - 1  # some peaks outside: monotonic
    width = 0.3 + torch.rand(B, 1, H, W, generator=g) * 2
    return torch.softmax(-((n - centre) ** 2) / (2 * width**2), dim=1)


def test_focal_loss_zero_for_unimodal_gaussian() -> None:
    p = _gaussian_profiles()
    assert float(focal_variational_loss(p)) == pytest.approx(0.0, abs=1e-12)
    assert float(focal_variational_loss(p, _ones_mask())) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("profile", [[0.05, 0.1, 0.15, 0.3, 0.4], [0.4, 0.3, 0.15, 0.1, 0.05], [0.1, 0.35, 0.35, 0.1, 0.1], [0.2] * 5])
def test_focal_loss_zero_for_monotonic_and_plateau(profile: list[float]) -> None:
    p = torch.tensor(profile)[None, :, None, None].expand(B, N, H, W)
    assert float(focal_variational_loss(p)) == pytest.approx(0.0, abs=1e-12)


def test_focal_loss_positive_for_bimodal() -> None:
    p = torch.tensor([0.3, 0.05, 0.1, 0.45, 0.1])[None, :, None, None].expand(B, N, H, W)
    loss = float(focal_variational_loss(p))
    # peak k = 3; before it p must rise: 0.3 -> 0.05 falls by 0.25
    assert loss == pytest.approx(0.25**2, rel=1e-5)
    # a dip after the peak also counts
    p2 = torch.tensor([0.05, 0.45, 0.1, 0.3, 0.1])[None, :, None, None].expand(B, N, H, W)
    assert float(focal_variational_loss(p2)) == pytest.approx(0.2**2, rel=1e-5)


def test_focal_loss_mask() -> None:
    p = _gaussian_profiles().clone()
    m = _ones_mask()
    m[:, :4] = False
    p[:, :, :4] = torch.tensor([0.3, 0.05, 0.1, 0.45, 0.1])[None, :, None, None]  # bimodal, masked
    assert float(focal_variational_loss(p, m)) == pytest.approx(0.0, abs=1e-12)
    assert float(focal_variational_loss(p)) > 0


def _reference_fv(prob: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """L_fv with a given (constant) peak index ``k`` ``[B, 1, H, W]``."""
    loss = torch.zeros(prob.shape[0], *prob.shape[2:], dtype=prob.dtype)
    for i in range(prob.shape[1] - 1):
        d = prob[:, i + 1] - prob[:, i]
        before = (i < k[:, 0]).to(prob.dtype)
        loss = loss + before * F.relu(-d) ** 2 + (1 - before) * F.relu(d) ** 2
    return loss.mean()


def test_focal_loss_gradient_through_prob_not_argmax() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, N, 4, 6, generator=g, dtype=torch.float64) * 2
    logits.requires_grad_(True)
    prob = torch.softmax(logits, dim=1)
    loss = focal_variational_loss(prob)
    assert loss.requires_grad and float(loss.detach()) > 0
    (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
    assert float(grad.abs().sum()) > 0
    # the same as treating k = argmax as a constant
    k = prob.detach().argmax(dim=1, keepdim=True)
    (grad_ref,) = torch.autograd.grad(_reference_fv(prob, k), logits)
    torch.testing.assert_close(grad, grad_ref, atol=1e-12, rtol=1e-9)
    # and finite differences agree (k is piecewise constant, so it contributes nothing)
    x = logits.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: focal_variational_loss(torch.softmax(z, dim=1)), (x,), eps=1e-7, atol=1e-6)


def test_focal_loss_peak_index_is_detached() -> None:
    """k comes from ``prob.detach()``: the loss graph holds no argmax node."""
    prob = torch.softmax(torch.randn(1, N, 3, 3, dtype=torch.float64), dim=1).requires_grad_(True)
    loss = focal_variational_loss(prob)
    seen, stack = set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        assert "argmax" not in type(fn).__name__.lower()
        stack.extend(f for f, _ in fn.next_functions)


# ------------------------------------------------------------------------------ spatial variational
def _true_surfaces(target: torch.Tensor, c2: int = 2) -> torch.Tensor:
    """Channel 0 of every plane = the true low-res depth plus a per-plane constant."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(B, c2, N, h, w, generator=g)  # other channels are unconstrained
    s[:, 0] = _low(target)[:, None] + torch.randn(B, N, 1, 1, generator=g)
    return s


def test_spatial_loss_zero_for_true_gradients() -> None:
    t = _target()
    s = _true_surfaces(t)
    loss = spatial_variational_loss(s, _pos(), t, _ones_mask(), tau=0.05)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    # for any tau (q only weighs planes)
    assert float(spatial_variational_loss(s, _pos(), t, _ones_mask(), tau=10.0)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("wrong", ["negated", "transposed", "flipped", "flat"])
def test_spatial_loss_positive_for_wrong_gradients(wrong: str) -> None:
    t = _target()
    s = _true_surfaces(t)
    z = s[:, 0]
    if wrong == "negated":
        s[:, 0] = -z
    elif wrong == "transposed":
        t = t[:, :, :H].contiguous()  # a square (not symmetric) scene, H x H, surfaces h x h
        low = F.adaptive_avg_pool2d(t[:, None], (h, h))[:, 0]
        s = torch.zeros(B, 1, N, h, h)
        s[:, 0] = low.transpose(-2, -1)[:, None]
        s_right = low[:, None, None].repeat(1, 1, N, 1, 1)
        sq_mask = torch.ones(t.shape, dtype=torch.bool)
        assert float(spatial_variational_loss(s_right, _pos(), t, sq_mask, tau=0.05)) == pytest.approx(0.0, abs=1e-6)
    elif wrong == "flipped":
        s[:, 0] = torch.flip(z, dims=[-1])
    else:
        s[:, 0] = 0.0
    mask = torch.ones(t.shape, dtype=torch.bool)
    assert float(spatial_variational_loss(s, _pos(), t, mask, tau=0.05)) > 1e-3


def test_spatial_loss_weights_the_plane_nearest_the_truth() -> None:
    """With a small tau only the plane focused nearest the true depth carries the constraint."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
    t = (0.48 + 0.04 * xx + 0.02 * yy).repeat(B, 1, 1)  # close to plane 2 (pos 0.5) everywhere
    g = torch.Generator().manual_seed(4)
    good = _low(t)
    s = torch.zeros(B, 1, N, h, w)
    s[:, 0, 2] = good
    far = [0, 1, 3, 4]
    s[:, 0, far] = torch.randn(B, len(far), h, w, generator=g)  # wrong surfaces on the far planes only
    mask = _ones_mask()
    assert float(spatial_variational_loss(s, _pos(), t, mask, tau=0.01)) < 1e-6
    # with a huge tau q is uniform, and the far planes' errors show
    assert float(spatial_variational_loss(s, _pos(), t, mask, tau=100.0)) > 0.1
    # the nearest plane wrong, the far ones right: the loss is large
    s2 = good[:, None, None].repeat(1, 1, N, 1, 1)
    s2[:, 0, 2] = torch.randn(B, h, w, generator=g)
    assert float(spatial_variational_loss(s2, _pos(), t, mask, tau=0.01)) > 0.1


def test_spatial_loss_ignores_unknown_truth() -> None:
    t = _target()
    s = _true_surfaces(t)
    mask = _ones_mask()
    mask[:, :, : W // 2] = False  # low-res columns 0..w/2-1 unknown
    s[:, 0, :, :, : w // 2] = torch.randn(B, N, h, w // 2)
    assert float(spatial_variational_loss(s, _pos(), t, mask, tau=0.05)) == pytest.approx(0.0, abs=1e-6)
    t_garbage = t.clone()
    t_garbage[:, :, : W // 2] = 7.0
    assert float(spatial_variational_loss(s, _pos(), t_garbage, mask, tau=0.05)) == pytest.approx(0.0, abs=1e-6)


def test_spatial_loss_gradient_reaches_surfaces() -> None:
    t = _target()
    s = _true_surfaces(t)
    s[:, 0] = -s[:, 0]
    s.requires_grad_(True)
    spatial_variational_loss(s, _pos(), t, _ones_mask(), tau=0.05).backward()
    assert s.grad is not None and float(s.grad[:, 0].abs().sum()) > 0
    assert float(s.grad[:, 1:].abs().sum()) == 0.0  # only channel 0 is constrained


# ------------------------------------------------------------------------------ total
def _model_output() -> tuple[DualFocusOutput, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("dualfocus-tiny").train()
    g = torch.Generator().manual_seed(5)
    stack = torch.rand(B, 3, 3, H, W, generator=g)
    focus = torch.tensor([[2.0, 0.5, 1.0], [0.1, 0.9, 0.4]])
    out = model(stack, focus)
    pos = DualFocusNet.normalise_focus(focus)[1]
    return out, pos, _target(), _ones_mask()


@pytest.mark.parametrize(
    "lsv, lfv, keys",
    [(0.0, 0.0, {"depth"}), (0.1, 0.0, {"depth", "sv"}), (0.0, 1.0, {"depth", "fv"}), (0.1, 1.0, {"depth", "sv", "fv"})],
)
def test_total_loss_switches_terms(lsv: float, lfv: float, keys: set[str]) -> None:
    out, pos, t, m = _model_output()
    weights = LossWeights(lambda_sv=lsv, lambda_fv=lfv, tau=0.05, beta=0.05)
    loss, parts = total_loss(out, pos, t, m, weights)
    assert set(parts) == keys
    assert all(isinstance(v, float) for v in parts.values())
    expected = parts["depth"] + lsv * parts.get("sv", 0.0) + lfv * parts.get("fv", 0.0)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    if keys == {"depth"}:
        assert float(loss.detach()) == pytest.approx(float(depth_loss(out.depth, t, m).detach()), rel=1e-6)
    loss.backward()


def test_total_loss_without_surfaces_has_no_sv() -> None:
    out, pos, t, m = _model_output()
    out.surfaces = None
    _, parts = total_loss(out, pos, t, m, LossWeights(lambda_sv=0.5))
    assert "sv" not in parts and "fv" in parts
