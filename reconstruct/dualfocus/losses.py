"""DualFocus losses (shared/DUALFOCUS.md): depth (smooth-L1), spatial variational ``L_sv``,
focal variational (unimodality) ``L_fv``. All work in normalised inverse depth: 0..1 over
the stack's focus range, pixels whose truth lies outside it masked out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from reconstruct.dualfocus.model import DualFocusOutput
from reconstruct.dualfocus.poisson import forward_gradients

__all__ = ["LossWeights", "depth_loss", "spatial_variational_loss", "focal_variational_loss", "total_loss"]


@dataclass(frozen=True)
class LossWeights:
    """``L = L_depth + lambda_sv * L_sv + lambda_fv * L_fv``; a weight of 0 switches a term off.
    ``tau`` is in normalised inverse-depth units."""

    lambda_sv: float = 0.1
    lambda_fv: float = 1.0
    tau: float = 0.05
    beta: float = 0.05  # smooth-L1 transition


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


def depth_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, beta: float = 0.05) -> torch.Tensor:
    """Smooth-L1 between predicted and true normalised inverse depth, ``[B, H, W]`` each."""
    return _masked_mean(F.smooth_l1_loss(pred, target, reduction="none", beta=beta), mask)


def _downsample_target(target: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked area-average of ``[B, H, W]`` to ``size``; a low-res pixel counts only if all of
    its footprint is known."""
    m = mask.to(target.dtype)[:, None]
    num = F.adaptive_avg_pool2d(target[:, None] * m, size)
    den = F.adaptive_avg_pool2d(m, size)
    return (num / den.clamp_min(1e-6))[:, 0], den[:, 0] > 0.999


def spatial_variational_loss(
    surfaces: torch.Tensor, focus_pos: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, tau: float
) -> torch.Tensor:
    """``L_sv = sum_x sum_n q_n(x) |grad D*(x) - grad z*_n(x)|_1``, ``q_n = softmax_n(-|f_n - D*| / tau)``.

    Args:
        surfaces: ``[B, C2, N, h, w]`` integrated surfaces (channel 0 is constrained).
        focus_pos: ``[B, N]`` normalised focus positions, ascending (the model's sorted order).
        target: ``[B, H, W]`` true normalised inverse depth; mask ``[B, H, W]`` bool.
    """
    z = surfaces[:, 0]  # [B, N, h, w]
    h, w = z.shape[-2:]
    t_low, m_low = _downsample_target(target, mask, (h, w))
    q = torch.softmax(-(focus_pos[:, :, None, None] - t_low[:, None]).abs() / tau, dim=1)  # [B, N, h, w]
    tgx, tgy = forward_gradients(t_low)
    zgx, zgy = forward_gradients(z)
    mx = m_low[:, :, 1:] & m_low[:, :, :-1]
    my = m_low[:, 1:, :] & m_low[:, :-1, :]
    qx = 0.5 * (q[..., :, 1:] + q[..., :, :-1])
    qy = 0.5 * (q[..., 1:, :] + q[..., :-1, :])
    ex = (qx * (tgx[:, None] - zgx).abs()).sum(dim=1)
    ey = (qy * (tgy[:, None] - zgy).abs()).sum(dim=1)
    return 0.5 * (_masked_mean(ex, mx) + _masked_mean(ey, my))


def focal_variational_loss(prob: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Unimodality along focus: rising up to the peak ``k = argmax_n p_n`` (no gradient
    through k), falling after it. ``prob`` ``[B, N, H, W]``; ``mask`` ``[B, H, W]`` or None."""
    n = prob.shape[1]
    k = prob.detach().argmax(dim=1, keepdim=True)  # [B, 1, H, W]
    i = torch.arange(n - 1, device=prob.device)[None, :, None, None]
    step = prob[:, 1:] - prob[:, :-1]  # p_{i+1} - p_i, [B, N-1, H, W]
    before = i < k
    violation = torch.where(before, F.relu(-step), F.relu(step)) ** 2
    per_pixel = violation.sum(dim=1)
    if mask is None:
        return per_pixel.mean()
    return _masked_mean(per_pixel, mask)


def total_loss(out: DualFocusOutput, focus_pos: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weights: LossWeights) -> tuple[torch.Tensor, dict[str, float]]:
    """The training objective and its parts (floats, for logging)."""
    l_depth = depth_loss(out.depth, target, mask, beta=weights.beta)
    loss = l_depth
    parts = {"depth": float(l_depth.detach())}
    if weights.lambda_sv > 0 and out.surfaces is not None:
        l_sv = spatial_variational_loss(out.surfaces, focus_pos, target, mask, tau=weights.tau)
        loss = loss + weights.lambda_sv * l_sv
        parts["sv"] = float(l_sv.detach())
    if weights.lambda_fv > 0:
        l_fv = focal_variational_loss(out.prob, mask)
        loss = loss + weights.lambda_fv * l_fv
        parts["fv"] = float(l_fv.detach())
    return loss, parts
