"""Differentiable least-squares integration of gradient fields (Poisson, Neumann boundary),
solved in closed form with a DCT written as matrix products.

``z* = argmin_z ||P z - (gx, gy)||^2`` with ``P`` the forward-difference operator has the
normal equations ``P^T P z = P^T g``; ``P^T P`` is the Neumann Laplacian, which the DCT-II
diagonalises exactly. The free constant is fixed by a zero mean. Only MatMul, Pad, Slice,
Sub and Mul are used, so the solve exports to ONNX (``torch.fft`` does not).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["dct_basis", "forward_gradients", "inverse_eigenvalues", "poisson_solve"]


@lru_cache(maxsize=32)
def _basis_np(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    c = np.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c  # orthonormal DCT-II, [n, n], float64


@lru_cache(maxsize=32)
def _inv_eigen_np(h: int, w: int) -> np.ndarray:
    mu = (2 - 2 * np.cos(np.pi * np.arange(h) / h))[:, None] + (2 - 2 * np.cos(np.pi * np.arange(w) / w))[None, :]
    inv = np.zeros_like(mu)
    inv[mu > 0] = 1.0 / mu[mu > 0]  # the (0, 0) mode is the free constant: zero mean
    return inv


def _compiling() -> bool:
    """Inside ``torch.compile``'s tracing (Dynamo cannot guard on a cached numpy array)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return bool(compiler.is_compiling())
    return False


def _basis_torch(n: int, device: torch.device | None) -> torch.Tensor:
    """:func:`_basis_np` in torch ops, float64 (for ``torch.compile``, which folds it)."""
    k = torch.arange(n, device=device, dtype=torch.float64)[:, None]
    i = torch.arange(n, device=device, dtype=torch.float64)[None, :]
    scale = torch.full((n, 1), math.sqrt(2.0 / n), device=device, dtype=torch.float64)
    scale[0] = math.sqrt(1.0 / n)
    return torch.cos(math.pi * (i + 0.5) * k / n) * scale


def _inv_eigen_torch(h: int, w: int, device: torch.device | None) -> torch.Tensor:
    """:func:`_inv_eigen_np` in torch ops, float64."""
    mh = 2 - 2 * torch.cos(math.pi * torch.arange(h, device=device, dtype=torch.float64) / h)
    mw = 2 - 2 * torch.cos(math.pi * torch.arange(w, device=device, dtype=torch.float64) / w)
    mu = mh[:, None] + mw[None, :]
    return torch.where(mu > 0, 1.0 / torch.where(mu > 0, mu, torch.ones_like(mu)), torch.zeros_like(mu))


def dct_basis(n: int, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``[n, n]`` (a constant when traced for export)."""
    if _compiling():
        return _basis_torch(n, device).to(dtype=dtype)
    return torch.from_numpy(_basis_np(n)).to(device=device, dtype=dtype)


def inverse_eigenvalues(h: int, w: int, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[h, w]``: 1 / the Neumann Laplacian's eigenvalues in the DCT basis, 0 for the constant mode."""
    if _compiling():
        return _inv_eigen_torch(h, w, device).to(dtype=dtype)
    return torch.from_numpy(_inv_eigen_np(h, w)).to(device=device, dtype=dtype)


def forward_gradients(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences of ``z`` ``[..., H, W]``: gx ``[..., H, W-1]``, gy ``[..., H-1, W]``."""
    return z[..., :, 1:] - z[..., :, :-1], z[..., 1:, :] - z[..., :-1, :]


def poisson_solve(gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """The zero-mean surface whose forward differences best match (gx, gy).

    Args:
        gx: ``[..., H, W]`` x-gradients (the last column is ignored).
        gy: ``[..., H, W]`` y-gradients (the last row is ignored).

    Returns:
        ``[..., H, W]``.
    """
    h, w = int(gx.shape[-2]), int(gx.shape[-1])  # python ints: the bases are constants when traced
    gxm = gx[..., :, : w - 1]
    gym = gy[..., : h - 1, :]
    # P^T g: divergence by backward differences, zero flux through the border
    div = F.pad(gxm, (1, 0)) - F.pad(gxm, (0, 1)) + F.pad(gym, (0, 0, 1, 0)) - F.pad(gym, (0, 0, 0, 1))
    ch = dct_basis(h, device=gx.device, dtype=gx.dtype)
    cw = dct_basis(w, device=gx.device, dtype=gx.dtype)
    inv = inverse_eigenvalues(h, w, device=gx.device, dtype=gx.dtype)
    z_hat = torch.matmul(torch.matmul(ch, div), cw.transpose(0, 1)) * inv
    return torch.matmul(torch.matmul(ch.transpose(0, 1), z_hat), cw)
