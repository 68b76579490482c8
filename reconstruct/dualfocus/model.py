"""The DualFocus network (shared/DUALFOCUS.md): shared per-slice 2D encoder, focal volume
with the focal-difference augmentation, a spatial branch that integrates per-plane gradient
fields into surfaces (Poisson/DCT), a 3D-convolution decoder to per-plane focus
probabilities, depth as their expectation over focus in (normalised) diopters, confidence.

Shapes: ``B`` batch, ``N`` slices, ``H x W`` image, ``h x w = H/4 x W/4`` volume.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from reconstruct.dualfocus.poisson import poisson_solve

logger = logging.getLogger(__name__)

__all__ = ["ConvexUpsampler", "DualFocusConfig", "DualFocusNet", "DualFocusOutput", "conv3d_as_planes", "conv_bn_relu_of_concat",
           "planes_conv3d", "stem_conv_of_parts", "to_channels_last"]

IN_CHANNELS = 7  # RGB, RGB minus the stack mean, normalised focus position


@dataclass(frozen=True)
class DualFocusConfig:
    """Architecture knobs (recorded in the model card).

    Attributes:
        enc_channels: widths of the 2D encoder stages (1/2, 1/4, 1/8 resolution).
        feat_channels: C1, features per slice in the focal volume.
        surface_channels: C2, integrated surfaces per plane (spatial branch).
        dec_channels: width of the 3D decoder.
        dec_blocks: residual 3D blocks at 1/4 resolution (plus a 1/8 branch of twice the width).
        focal_difference: "augment" (DualFocus: [V_n, V_n+1 - V_n]) or "replace" (DFV: V_n+1 - V_n only).
        spatial: use the spatial branch (surfaces from integrated gradient fields).
        upsample: how the 1/4-resolution focus probabilities reach full resolution:
            "bilinear" (logits interpolated) or "convex" (each full-resolution pixel a learned
            convex combination of its 3x3 coarse neighbours' probabilities, weights predicted from
            the features and the stack's mean image: sharp at depth edges).
    """

    enc_channels: tuple[int, int, int] = (24, 40, 64)
    feat_channels: int = 32
    surface_channels: int = 2
    dec_channels: int = 40
    dec_blocks: int = 3
    focal_difference: str = "augment"
    spatial: bool = True
    upsample: str = "bilinear"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["enc_channels"] = list(self.enc_channels)
        return d


def _conv2d(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Res2d(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                                  nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


def _conv3d(cin: int, cout: int, stride: tuple[int, int, int] = (1, 1, 1)) -> _Block3d:
    return _Block3d(nn.Conv3d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class _Block3d(nn.Sequential):
    """``(Conv3d 3x3x3, BatchNorm3d, ReLU)`` on ``[B, C, N, h, w]``; with ``planes`` (ONNX exports
    of one stack) on the planes ``[N, C, h, w]`` as 2D convolutions (:func:`planes_conv3d`)."""

    def forward(self, x: torch.Tensor, planes: bool = False) -> torch.Tensor:
        if planes:
            return F.relu(planes_conv3d(x, *_folded(self, "planes_conv3d"), _plane_stride(self[0])))
        return super().forward(x)


class _Res3d(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(c, c, 3, 1, 1, bias=False), nn.BatchNorm3d(c), nn.ReLU(inplace=True),
                                  nn.Conv3d(c, c, 3, 1, 1, bias=False), nn.BatchNorm3d(c))

    def forward(self, x: torch.Tensor, planes: bool = False) -> torch.Tensor:
        if planes:  # x: [N, C, h, w] planes of one stack (_Block3d)
            hidden = F.relu(planes_conv3d(x, *_folded(self.body[0:2], "planes_conv3d"), _plane_stride(self.body[0])))
            return F.relu(x + planes_conv3d(hidden, *_folded(self.body[3:5], "planes_conv3d"), _plane_stride(self.body[3])))
        return F.relu(x + self.body(x))


class Encoder(nn.Module):
    """Shared per-slice 2D encoder: ``[B*N, 7, H, W]`` -> ``[B*N, C1, H/4, W/4]``.

    A strided stem to 1/4 resolution, the widest stage at 1/8 (where parameters are cheap in
    compute), and back up to 1/4 with a skip connection: a small U-Net.
    """

    def __init__(self, cfg: DualFocusConfig) -> None:
        super().__init__()
        c0, c1, c2 = cfg.enc_channels
        self.stem = nn.Sequential(_conv2d(IN_CHANNELS, c0, 2), _conv2d(c0, c1, 2), _Res2d(c1))  # 1/4
        self.deep = nn.Sequential(_conv2d(c1, c2, 2), _Res2d(c2), _Res2d(c2))  # 1/8
        self.fuse = nn.Sequential(_conv2d(c1 + c2, c1), nn.Conv2d(c1, cfg.feat_channels, 1))

    def forward(self, x: torch.Tensor | None = None, *, parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``x`` the 7-channel input, or (in ONNX exports) its ``parts`` for :func:`stem_conv_of_parts`."""
        quarter = self.stem[1:](stem_conv_of_parts(self.stem[0], *parts)) if parts is not None else self.stem(x)
        deep = F.interpolate(self.deep(quarter), size=quarter.shape[-2:], mode="bilinear", align_corners=False)
        if _exporting(self):
            return self.fuse[1](conv_bn_relu_of_concat(self.fuse[0], [quarter, deep]))
        return self.fuse(torch.cat([quarter, deep], dim=1))


def _folded(block: nn.Sequential, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``block[0]`` (a bias-free, ungrouped, undilated, zero-padded convolution, 2D or 3D)
    followed by ``block[1]`` (BatchNorm in eval mode) as one convolution: (weight, bias). Refuses
    (ValueError naming ``what``) a convolution the export rewrites cannot fold."""
    conv, bn = block[0], block[1]
    if conv.bias is not None or conv.groups != 1 or any(d != 1 for d in conv.dilation) or conv.padding_mode != "zeros":
        raise ValueError(f"{what}: the block's convolution must be bias-free, ungrouped, undilated, zero-padded")
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return conv.weight * scale.reshape(-1, *([1] * (conv.weight.dim() - 1))), bn.bias - bn.running_mean * scale


def stem_conv_of_parts(block: nn.Sequential, x: torch.Tensor, mean: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The encoder's first block (``_conv2d`` of the 7 input channels) on ``cat([x, x - mean,
    pos plane])`` without building that input: the convolution is linear, so it is one
    3-channel convolution of the slices, minus the stack mean's convolution (once per stack),
    plus each slice's focus position times the convolution of a plane of ones (a constant of the
    graph's shape). Same function to float32 rounding; used in ONNX exports (the full-resolution
    concatenation and a 7-channel convolution cost ONNX Runtime more than the sums).

    ``x`` ``[B, N, 3, H, W]`` (sorted slices), ``mean`` ``[B, 3, H, W]``, ``pos`` ``[B, N]`` ->
    ``[B*N, C0, H/2, W/2]``."""
    conv = block[0]
    b, n, c, h, w = x.shape
    weight, bias = _folded(block, "stem_conv_of_parts")
    if weight.shape[1] != 2 * c + 1:
        raise ValueError(f"stem_conv_of_parts: the block must read {2 * c + 1} channels (slices, slices - mean, position), not {weight.shape[1]}")
    w_x, w_d, w_p = weight[:, :c], weight[:, c:2 * c], weight[:, 2 * c:]
    own = F.conv2d(x.reshape(b * n, c, h, w), w_x + w_d, bias, conv.stride, conv.padding)  # [B*N, C0, h2, w2]
    common = F.conv2d(mean, w_d, None, conv.stride, conv.padding)  # [B, C0, h2, w2]
    ones = F.conv2d(torch.ones(1, 1, h, w, dtype=x.dtype, device=x.device), w_p, None, conv.stride, conv.padding)  # [1, C0, h2, w2]
    shift = pos[:, :, None, None, None].to(x.dtype) * ones[:, None] - common[:, None]  # [B, N, C0, h2, w2]
    return F.relu(own + shift.reshape(own.shape))


def _exporting(module: nn.Module) -> bool:
    """In an ONNX export of a model in eval mode: where the graph may be written differently
    (same function, to float32 rounding) for ONNX Runtime's sake. The exporter's flag is
    process-wide: a torch inference in another thread during an export takes the rewritten
    path too (same numbers to float32 rounding, not bit for bit)."""
    return torch.onnx.is_in_onnx_export() and not module.training


def conv_bn_relu_of_concat(block: nn.Sequential, parts: list[torch.Tensor]) -> torch.Tensor:
    """``block(cat(parts, dim=1))`` for a ``_conv2d`` / ``_conv3d`` block (bias-free conv,
    BatchNorm in eval mode, ReLU) as one convolution per part, BatchNorm folded in, summed:
    the same function without a ``Concat``. Used in ONNX exports only: ONNX Runtime's int8
    graph turns each concatenation in front of a quantised convolution into layout transposes
    and a copy (for the encoder's: 221 -> 203 ms per 10x288x384 stack; README, "Export rewrites").
    The block's convolution must be bias-free, ungrouped, undilated and zero-padded (as
    ``_conv2d`` / ``_conv3d`` make it)."""
    conv = block[0]
    weight, bias = _folded(block, "conv_bn_relu_of_concat")
    op = F.conv2d if conv.weight.dim() == 4 else F.conv3d
    out, start = None, 0
    for part in parts:
        stop = start + part.shape[1]
        term = op(part, weight[:, start:stop], bias if out is None else None, conv.stride, conv.padding)
        out = term if out is None else out + term
        start = stop
    return F.relu(out)


def conv3d_as_planes(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a 3x3x3, stride-1, zero-padded ``Conv3d`` on ``x`` ``[B, C, N, h, w]`` as one
    2D convolution over the ``B*N`` planes with three sets of outputs (one per plane offset),
    summed shifted along N: the same function to float32 rounding. Used in ONNX exports for the
    two float output heads (4 and 1 output channels): ONNX Runtime runs a 2D convolution with
    few outputs in its blocked float kernels, a 3D one through a generic im2col path (3x slower)."""
    if (conv.kernel_size != (3, 3, 3) or conv.stride != (1, 1, 1) or conv.padding != (1, 1, 1) or conv.dilation != (1, 1, 1)
            or conv.groups != 1 or conv.padding_mode != "zeros"):
        raise ValueError("conv3d_as_planes: the convolution must be 3x3x3, stride 1, padding 1, undilated, ungrouped, zero-padded")
    b, c, n, h, w = x.shape
    k = conv.out_channels
    planes = x.permute(0, 2, 1, 3, 4).reshape(b * n, c, h, w)
    weight = conv.weight.permute(2, 0, 1, 3, 4).reshape(3 * k, c, 3, 3)  # [offset * k + out, c, 3, 3]
    z = F.conv2d(planes, weight, None, 1, 1).reshape(b, n, 3, k, h, w)
    zero = z.new_zeros(b, 1, k, h, w)
    out = z[:, :, 1] + torch.cat([zero, z[:, :-1, 0]], dim=1) + torch.cat([z[:, 1:, 2], zero], dim=1)  # [B, N, k, h, w]
    if conv.bias is not None:
        out = out + conv.bias[:, None, None]
    return out.permute(0, 2, 1, 3, 4)


def _plane_stride(conv: nn.Conv3d) -> int:
    """The across-plane stride of a 3x3x3 convolution :func:`planes_conv3d` can run (padding 1,
    stride 1 along the planes, one stride across them), or ValueError."""
    if conv.kernel_size != (3, 3, 3) or conv.padding != (1, 1, 1) or conv.stride[0] != 1 or conv.stride[1] != conv.stride[2]:
        raise ValueError("planes_conv3d: the convolution must be 3x3x3 with padding 1, stride 1 along the planes and one stride across them")
    return conv.stride[1]


def planes_conv3d(p: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int = 1) -> torch.Tensor:
    """A 3x3x3 convolution (zero padding 1, stride 1 along the planes, ``stride`` across them) of
    one stack's planes ``p`` ``[N, C, h, w]``, ``weight`` ``[Cout, C, 3, 3, 3]``, as three 2D
    convolutions of the planes, one per plane offset, the outer two shifted by one plane (a zero
    plane padded at one end, one plane sliced off the other), summed:
    ``[N, Cout, h/stride, w/stride]``, the same function to float32 rounding.

    Used in float32 ONNX exports of one stack for every 3D convolution of the decoder and the
    gradient head but the heads' last ones (:func:`conv3d_as_planes`): ONNX Runtime runs a 3D int8 convolution through a generic im2col path and a 2D one in
    its NHWC kernels, 2.4-2.9x faster for the same work (32-channel blocks at 1/4 resolution: 6.6
    against 3 x 0.9 ms per 10x288x384 stack). A stack's planes in the 2D convolutions' NHWC
    layout are the volume's NDHWC layout, so no transposes appear between them."""
    n = p.shape[0]
    out = F.conv2d(p, weight[:, :, 1], bias, stride, 1)
    out = out + F.pad(F.conv2d(p, weight[:, :, 0], None, stride, 1), (0, 0, 0, 0, 0, 0, 1, 0))[:n]  # plane n-1's term to plane n
    return out + F.pad(F.conv2d(p, weight[:, :, 2], None, stride, 1), (0, 0, 0, 0, 0, 0, 0, 1))[1:]  # plane n+1's


class _Head(nn.Sequential):
    """``(_conv3d block, Conv3d)``: an output head. In ONNX exports its last convolution runs as
    :func:`conv3d_as_planes`; with ``planes`` it takes one stack's planes ``[N, C, h, w]`` (and
    returns ``[1, Cout, N, h, w]``)."""

    def forward(self, x: torch.Tensor, planes: bool = False) -> torch.Tensor:
        if planes:
            return conv3d_as_planes(self[1], self[0](x, planes=True).permute(1, 0, 2, 3)[None])
        return conv3d_as_planes(self[1], self[0](x)) if _exporting(self) else super().forward(x)


def _focal_difference(v: torch.Tensor, dim: int) -> torch.Tensor:
    """The focal difference along the slice axis ``dim``: ``V_n+1 - V_n`` for n < N and
    ``V_N - V_N-1`` for the last (DualFocus's ``V*_n = [V_n, V_n+1 - V_n]`` takes it beside
    ``V``; DFV takes it alone)."""
    n = v.shape[dim]
    nxt = torch.cat([v.narrow(dim, 1, n - 1), v.narrow(dim, n - 1, 1)], dim=dim)
    prv = torch.cat([v.narrow(dim, 0, 1), v.narrow(dim, 0, n - 1)], dim=dim)
    return torch.cat([(nxt - v).narrow(dim, 0, n - 1), (v - prv).narrow(dim, n - 1, 1)], dim=dim)


def _cat_channels(a: torch.Tensor, b: torch.Tensor, *, channels_last: bool) -> torch.Tensor:
    """``cat([a, b], dim=1)`` of ``[B, C, N, h, w]`` volumes; with ``channels_last`` written as a
    concatenation along a trailing channel axis between permutes (same numbers)."""
    if not channels_last:
        return torch.cat([a, b], dim=1)
    return torch.cat([a.permute(0, 2, 3, 4, 1), b.permute(0, 2, 3, 4, 1)], dim=-1).permute(0, 4, 1, 2, 3)


def _softmax_over_planes(logits: torch.Tensor, *, written_out: bool) -> torch.Tensor:
    """Softmax over dim 1 of ``[B, N, H, W]``. With ``written_out`` (in an ONNX export) it is
    computed as ``exp(x - max) / sum`` (ONNX: ReduceMax, Sub, Exp, ReduceSum, Div): ONNX
    Runtime's CPU ``Softmax`` on a non-last axis transposes the tensor twice (10.6 ms of a
    10x288x384 int8 stack in its profiler; the graph's tail alone 9.0 -> 3.2 ms written out,
    same numbers to float32 rounding); torch itself keeps its fused kernel."""
    if not written_out:
        return torch.softmax(logits, dim=1)
    e = torch.exp(logits - logits.amax(dim=1, keepdim=True))
    return e / e.sum(dim=1, keepdim=True)


class ConvexUpsampler(nn.Module):
    """Learned convex upsampling by 4 of per-plane probabilities (as RAFT upsamples flow).

    ``forward(prob_low, guide, image)``: ``prob_low`` ``[B, N, h, w]`` (sums to 1 over N),
    ``guide`` ``[B, C, h, w]`` features, ``image`` ``[B, 3, 4h, 4w]`` -> ``[B, N, 4h, 4w]``, still
    summing to 1 over N: every full-resolution pixel takes a softmax-weighted mix of the 3x3
    coarse pixels around its own, so at a depth edge it can take one side's probabilities
    instead of an average of both. The last convolution starts at zero (uniform 3x3 weights).
    Exports to ONNX as Pad (edge), Slice, Reshape/Transpose (``pixel_unshuffle``) and
    DepthToSpace. Its softmaxes are plain ``Softmax`` nodes (not written out as the bilinear
    path's is): it is not the shipped configuration.
    """

    FACTOR = 4

    def __init__(self, guide_channels: int, hidden: int = 64) -> None:
        super().__init__()
        f2 = self.FACTOR * self.FACTOR
        self.head = nn.Sequential(nn.Conv2d(guide_channels + 3 * f2, hidden, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, 9 * f2, 1))
        nn.init.zeros_(self.head[2].weight)
        nn.init.zeros_(self.head[2].bias)

    def forward(self, prob_low: torch.Tensor, guide: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        b, n, h, w = prob_low.shape
        f = self.FACTOR
        x = torch.cat([guide, F.pixel_unshuffle(image, f)], dim=1)
        mask = torch.softmax(self.head(x).float().reshape(b, 9, f * f, h, w), dim=1)
        padded = F.pad(prob_low, (1, 1, 1, 1), mode="replicate")
        up = None
        for k in range(9):
            dy, dx = divmod(k, 3)
            term = padded[:, :, None, dy:dy + h, dx:dx + w] * mask[:, None, k]  # [B, N, f*f, h, w]
            up = term if up is None else up + term
        return F.pixel_shuffle(up.reshape(b, n * f * f, h, w), f)


@dataclass
class DualFocusOutput:
    """What the network returns.

    Attributes:
        depth: ``[B, H, W]`` normalised inverse depth in [0, 1] over the stack's focus range
            (0 = farthest slice's focus, 1 = nearest).
        prob: ``[B, N, H, W]`` focus probability per (sorted) slice.
        logits_low: ``[B, N, h, w]`` decoder logits at 1/4 resolution.
        surfaces: ``[B, C2, N, h, w]`` integrated surfaces (None without the spatial branch).
        confidence: ``[B, H, W]`` in [0, 1] (peak probability mass, normalised for N).
    """

    depth: torch.Tensor
    prob: torch.Tensor
    logits_low: torch.Tensor
    surfaces: torch.Tensor | None
    confidence: torch.Tensor


class DualFocusNet(nn.Module):
    """Depth from a focal stack with spatial and focal constraints.

    ``forward(stack, focus)``: ``stack`` ``[B, N, 3, H, W]`` in [0, 1] (grey stacks repeated to
    3 channels), ``focus`` ``[B, N]`` focus in diopters (or focus index), any order; H and W
    multiples of 4. Slices are sorted by focus inside; depth comes back in normalised inverse
    depth over the stack's focus range (use :meth:`to_focus_units`).
    """

    def __init__(self, cfg: DualFocusConfig = DualFocusConfig()) -> None:
        super().__init__()
        if cfg.focal_difference not in ("augment", "replace"):
            raise ValueError(f"focal_difference: 'augment' or 'replace', got {cfg.focal_difference!r}")
        if cfg.upsample not in ("bilinear", "convex"):
            raise ValueError(f"upsample: 'bilinear' or 'convex', got {cfg.upsample!r}")
        self.cfg = cfg
        c1 = cfg.feat_channels
        self.encoder = Encoder(cfg)
        vol_c = 2 * c1 if cfg.focal_difference == "augment" else c1
        vol_c += 1  # normalised focus position as a channel of the volume
        if cfg.spatial:
            self.grad_head = _Head(_conv3d(vol_c, cfg.dec_channels), nn.Conv3d(cfg.dec_channels, 2 * cfg.surface_channels, 3, 1, 1))
            vol_c += cfg.surface_channels
        d = cfg.dec_channels
        self.dec_in = _conv3d(vol_c, d)
        self.dec_blocks = nn.Sequential(*[_Res3d(d) for _ in range(cfg.dec_blocks)])
        self.dec_down = nn.Sequential(_conv3d(d, 2 * d, (1, 2, 2)), _Res3d(2 * d), _Res3d(2 * d))  # 1/8
        self.dec_out = _Head(_conv3d(3 * d, d), nn.Conv3d(d, 1, 3, 1, 1))
        if cfg.upsample == "convex":
            # guide: slice-mean and slice-max features, decoder features averaged over planes,
            # and the low-resolution depth and peak probability
            self.upsampler = ConvexUpsampler(2 * c1 + d + 2)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def normalise_focus(focus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sort order and normalised positions: ``order`` ``[B, N]``, ``pos`` ``[B, N]`` in [0, 1]
        (ascending), and (min, span) ``[B, 2]`` to map back to focus units."""
        if torch.jit.is_tracing():
            # ONNX export (fixed shapes): TopK with K a constant. torch.sort exports K as
            # Gather(Shape(focus)), which ONNX Runtime 1.24 and 1.26's shape inference refuse at load
            # ("K input must be a one-dimensional tensor of size 1"). Same values and order.
            sorted_focus, order = torch.topk(focus, int(focus.shape[1]), dim=1, largest=False, sorted=True)
        else:
            sorted_focus, order = torch.sort(focus, dim=1)
        lo = sorted_focus[:, :1]
        span = (sorted_focus[:, -1:] - lo).clamp_min(1e-6)
        pos = (sorted_focus - lo) / span
        return order, pos, torch.cat([lo, span], dim=1)

    @staticmethod
    def to_focus_units(depth_norm: torch.Tensor, focus: torch.Tensor) -> torch.Tensor:
        """Normalised inverse depth ``[B, H, W]`` -> the focus unit (diopters or index)."""
        lo = focus.min(dim=1).values[:, None, None]
        hi = focus.max(dim=1).values[:, None, None]
        return lo + depth_norm * (hi - lo)

    def _volume(self, feat: torch.Tensor, pos: torch.Tensor, b: int, n: int) -> torch.Tensor:
        """``feat`` ``[B*N, C1, h, w]``, ``pos`` ``[B, N]`` -> the focal volume ``[B, C, N, h, w]``."""
        _, c1, h, w = feat.shape
        vol = feat.reshape(b, n, c1, h, w).permute(0, 2, 1, 3, 4)  # [B, C1, N, h, w]
        diff = _focal_difference(vol, dim=2)
        vol = torch.cat([vol, diff], dim=1) if self.cfg.focal_difference == "augment" else diff
        return torch.cat([vol, pos[:, None, :, None, None].expand(b, 1, n, h, w)], dim=1)

    def _decode(self, vol: torch.Tensor, b: int, n: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Volume ``[B, C, N, h, w]`` -> (logits ``[B, N, h, w]``, surfaces, decoder features ``y``)."""
        surfaces = None
        if self.cfg.spatial:
            g = self.grad_head(vol)  # [B, 2*C2, N, h, w]
            c2 = self.cfg.surface_channels
            surfaces = poisson_solve(g[:, :c2], g[:, c2:])  # [B, C2, N, h, w]
            vol = _cat_channels(vol, surfaces, channels_last=_exporting(self))
        y = self.dec_blocks(self.dec_in(vol))
        low = self.dec_down(y)
        if _exporting(self):  # same numbers: the slice axis keeps its size, so each plane is bilinear
            cl, hl, wl = low.shape[1], low.shape[3], low.shape[4]
            planes = low.permute(0, 2, 1, 3, 4).reshape(b * n, cl, hl, wl)
            up = F.interpolate(planes, size=(h, w), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(b, n, h, w, cl)
            cat = torch.cat([y.permute(0, 2, 3, 4, 1), up], dim=-1).permute(0, 4, 1, 2, 3)
        else:
            cat = torch.cat([y, F.interpolate(low, size=(n, h, w), mode="trilinear", align_corners=False)], dim=1)
        logits_low = self.dec_out(cat)[:, 0]  # [B, N, h, w]
        return logits_low, surfaces, y

    def _volume_planes(self, feat: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The focal volume of one stack as planes: ``feat`` ``[N, C1, h, w]``, ``pos`` ``[1, N]`` ->
        ``[N, C, h, w]`` (the 5D volume's planes, same numbers)."""
        n, _c1, h, w = feat.shape
        diff = _focal_difference(feat, dim=0)
        parts = [feat, diff] if self.cfg.focal_difference == "augment" else [diff]
        return torch.cat([*parts, pos.reshape(n, 1, 1, 1).expand(n, 1, h, w)], dim=1)

    def _decode_planes(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """:meth:`_decode` for one stack (B = 1) with every 3D convolution written as 2D ones over
        the planes (:func:`planes_conv3d`): the same function to float32 rounding, used in ONNX
        exports."""
        n, _c, h, w = p.shape
        surfaces = None
        if self.cfg.spatial:
            g = self.grad_head(p, planes=True)  # [1, 2*C2, N, h, w]
            c2 = self.cfg.surface_channels
            surfaces = poisson_solve(g[:, :c2], g[:, c2:])  # [1, C2, N, h, w]
            p = torch.cat([p, surfaces[0].permute(1, 0, 2, 3)], dim=1)
        y = self.dec_in(p, planes=True)
        for res in self.dec_blocks:
            y = res(y, planes=True)
        low = self.dec_down[0](y, planes=True)
        for res in self.dec_down[1:]:
            low = res(low, planes=True)
        up = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
        logits_low = self.dec_out(torch.cat([y, up], dim=1), planes=True)[:, 0]
        return logits_low, surfaces, y.permute(1, 0, 2, 3)[None]

    # ------------------------------------------------------------------ forward
    def forward(self, stack: torch.Tensor, focus: torch.Tensor) -> DualFocusOutput:
        b, n, c, h_img, w_img = stack.shape
        order, pos, _ = self.normalise_focus(focus)
        # sorted by focus, far to near: one row index per slice (an ONNX Gather), not a
        # full-resolution index tensor (gather's expand cost ~10 ms per stack in ONNX Runtime)
        rows = (order + torch.arange(b, device=order.device)[:, None] * n).reshape(-1)
        x = stack.reshape(b * n, c, h_img, w_img).index_select(0, rows).reshape(b, n, c, h_img, w_img)
        mean = x.mean(dim=1, keepdim=True)
        if _exporting(self):
            feat = self.encoder(parts=(x, mean[:, 0], pos))
        else:
            pos_plane = pos[:, :, None, None, None].expand(b, n, 1, h_img, w_img)
            feat = self.encoder(torch.cat([x, x - mean, pos_plane], dim=2).reshape(b * n, IN_CHANNELS, h_img, w_img))
        _, c1, h, w = feat.shape
        if _exporting(self) and b == 1 and self.cfg.upsample == "bilinear" and feat.dtype == torch.float32:
            # the traced graph is fixed to one stack (the exports are fixed-shape, B = 1): a graph
            # traced here must not be run with B > 1, whose planes it would mix. fp16 exports
            # (TensorRT's source) keep the 3D convolutions: the rewrite was measured for ONNX
            # Runtime on the CPU only
            logits_low, surfaces, y = self._decode_planes(self._volume_planes(feat, pos))
        else:
            logits_low, surfaces, y = self._decode(self._volume(feat, pos, b, n), b, n, h, w)
        if self.cfg.upsample == "convex":
            prob_low = torch.softmax(logits_low.float(), dim=1)
            feat_n = feat.reshape(b, n, c1, h, w)
            depth_low = (prob_low * pos[:, :, None, None].float()).sum(dim=1, keepdim=True)
            guide = torch.cat([feat_n.mean(dim=1), feat_n.amax(dim=1), y.mean(dim=2),
                               depth_low.to(feat.dtype), prob_low.amax(dim=1, keepdim=True).to(feat.dtype)], dim=1)
            prob = self.upsampler(prob_low, guide, mean[:, 0])
        else:
            logits = F.interpolate(logits_low, size=(h_img, w_img), mode="bilinear", align_corners=False)
            prob = _softmax_over_planes(logits.float(), written_out=_exporting(self))
        depth = (prob * pos[:, :, None, None].float()).sum(dim=1)
        peak = prob.max(dim=1).values
        confidence = ((peak - 1.0 / n) / (1.0 - 1.0 / n)).clamp(0, 1) if n > 1 else torch.ones_like(peak)
        return DualFocusOutput(depth=depth, prob=prob, logits_low=logits_low, surfaces=surfaces, confidence=confidence)


def to_channels_last(net: nn.Module) -> nn.Module:
    """Channels-last weights: ``Conv2d`` in NHWC, ``Conv3d`` in NDHWC (in place)."""
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
        elif isinstance(module, nn.Conv3d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)
    return net
