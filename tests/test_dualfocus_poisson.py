"""Poisson integration of gradient fields (reconstruct/dualfocus/poisson.py): exact recovery,
linearity, differentiability, and the orthonormal DCT-II basis it is built on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reconstruct.dualfocus.poisson import dct_basis, forward_gradients, poisson_solve

torch.set_num_threads(1)


def _padded_gradients(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences padded back to ``[..., H, W]`` (the solver ignores the last column/row)."""
    gx, gy = forward_gradients(z)
    return F.pad(gx, (0, 1)), F.pad(gy, (0, 0, 0, 1))


def _zero_mean(z: torch.Tensor) -> torch.Tensor:
    return z - z.mean(dim=(-2, -1), keepdim=True)


@pytest.mark.parametrize("shape", [(5, 6), (8, 12), (17, 31), (1, 9), (9, 1), (2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_recovers_random_zero_mean_surface(shape: tuple[int, int], dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    z = _zero_mean(torch.randn(3, 2, *shape, generator=g, dtype=dtype))
    rec = poisson_solve(*_padded_gradients(z))
    assert rec.shape == z.shape
    assert rec.dtype == dtype
    torch.testing.assert_close(rec, z, atol=1e-4, rtol=0)


def test_recovers_smooth_surface_and_fixes_constant_to_zero_mean() -> None:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 24), torch.linspace(0, 1, 40), indexing="ij")
    surface = 0.7 * xx**2 - 0.3 * yy + 0.2 * torch.sin(9 * xx) * torch.cos(5 * yy) + 5.0  # not zero mean
    rec = poisson_solve(*_padded_gradients(surface))
    assert abs(float(rec.mean())) < 1e-5
    torch.testing.assert_close(rec, _zero_mean(surface), atol=1e-4, rtol=0)


def test_last_column_and_row_are_ignored() -> None:
    g = torch.Generator().manual_seed(1)
    gx, gy = torch.randn(2, 6, 7, generator=g), torch.randn(2, 6, 7, generator=g)
    gx2, gy2 = gx.clone(), gy.clone()
    gx2[..., :, -1] = 100.0
    gy2[..., -1, :] = -100.0
    torch.testing.assert_close(poisson_solve(gx, gy), poisson_solve(gx2, gy2), atol=1e-5, rtol=0)


def test_least_squares_for_non_integrable_field() -> None:
    """A curl-only field has no potential: the best surface is flat (and zero-mean)."""
    g = torch.Generator().manual_seed(2)
    gx, gy = torch.randn(7, 9, generator=g, dtype=torch.float64), torch.randn(7, 9, generator=g, dtype=torch.float64)
    z = poisson_solve(gx, gy)
    # the normal equations hold: P^T (P z - g) = 0 (checked through the gradient of the residual)
    zz = z.clone().requires_grad_(True)
    zgx, zgy = forward_gradients(zz)
    residual = ((zgx - gx[:, :-1]) ** 2).sum() + ((zgy - gy[:-1, :]) ** 2).sum()
    (grad,) = torch.autograd.grad(residual, zz)
    assert float(grad.abs().max()) < 1e-5


def test_linear() -> None:
    g = torch.Generator().manual_seed(3)
    gx1, gy1, gx2, gy2 = (torch.randn(2, 3, 10, 14, generator=g, dtype=torch.float64) for _ in range(4))
    a, b = 1.7, -0.4
    lhs = poisson_solve(a * gx1 + b * gx2, a * gy1 + b * gy2)
    rhs = a * poisson_solve(gx1, gy1) + b * poisson_solve(gx2, gy2)
    torch.testing.assert_close(lhs, rhs, atol=1e-10, rtol=0)
    torch.testing.assert_close(poisson_solve(torch.zeros(4, 5), torch.zeros(4, 5)), torch.zeros(4, 5))


def test_batched_equals_one_by_one() -> None:
    g = torch.Generator().manual_seed(4)
    gx, gy = torch.randn(3, 2, 8, 6, generator=g), torch.randn(3, 2, 8, 6, generator=g)
    whole = poisson_solve(gx, gy)
    for i in range(3):
        for j in range(2):
            torch.testing.assert_close(whole[i, j], poisson_solve(gx[i, j], gy[i, j]), atol=1e-6, rtol=0)


def test_gradcheck_float64() -> None:
    g = torch.Generator().manual_seed(5)
    gx = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(poisson_solve, (gx, gy), eps=1e-6, atol=1e-6)


def test_gradient_reaches_inputs() -> None:
    gx = torch.randn(1, 6, 8, requires_grad=True)
    gy = torch.randn(1, 6, 8, requires_grad=True)
    target = torch.randn(1, 6, 8)
    ((poisson_solve(gx, gy) - target) ** 2).sum().backward()
    assert gx.grad is not None and gy.grad is not None
    assert float(gx.grad[..., :, :-1].abs().sum()) > 0 and float(gy.grad[..., :-1, :].abs().sum()) > 0
    # the ignored last column / row get no gradient
    assert float(gx.grad[..., :, -1].abs().max()) == 0.0
    assert float(gy.grad[..., -1, :].abs().max()) == 0.0


@pytest.mark.parametrize("n", [1, 2, 5, 8, 13, 64])
def test_dct_basis_orthonormal(n: int) -> None:
    c = dct_basis(n, dtype=torch.float64)
    assert c.shape == (n, n)
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(c @ c.T, eye, atol=1e-6, rtol=0)
    torch.testing.assert_close(c.T @ c, eye, atol=1e-6, rtol=0)
    # row 0 is the constant (DC) vector; DCT-II: c[k, i] = s_k cos(pi (i + 1/2) k / n)
    torch.testing.assert_close(c[0], torch.full((n,), n**-0.5, dtype=torch.float64), atol=1e-7, rtol=0)
    if n > 1:
        i = torch.arange(n, dtype=torch.float64)
        torch.testing.assert_close(c[1], (2.0 / n) ** 0.5 * torch.cos(torch.pi * (i + 0.5) / n), atol=1e-7, rtol=0)


def test_dct_basis_follows_dtype() -> None:
    assert dct_basis(4).dtype == torch.float32
    assert dct_basis(4, dtype=torch.float64).dtype == torch.float64


def test_poisson_solve_traces_under_torch_compile() -> None:
    """torch.compile (Dynamo) could not guard on the cached numpy bases under inference mode
    ("Guard failed on the same frame it was created", seen on an H100): the traced solve gives
    the eager numbers."""
    torch._dynamo.reset()
    traced = torch.compile(poisson_solve, backend="eager")
    gx, gy = torch.randn(2, 3, 12, 20), torch.randn(2, 3, 12, 20)
    with torch.inference_mode():
        out = traced(gx, gy)
    torch.testing.assert_close(out, poisson_solve(gx, gy), atol=1e-6, rtol=0)


def test_bases_built_in_torch_for_compile_equal_the_numpy_ones() -> None:
    from reconstruct.dualfocus.poisson import _basis_np, _basis_torch, _inv_eigen_np, _inv_eigen_torch

    for n in (1, 2, 9, 48):
        np.testing.assert_allclose(_basis_torch(n, None).numpy(), _basis_np(n), atol=1e-15, rtol=0)
    np.testing.assert_array_equal(_inv_eigen_torch(6, 9, None).numpy() == 0, _inv_eigen_np(6, 9) == 0)
    np.testing.assert_allclose(_inv_eigen_torch(6, 9, None).numpy(), _inv_eigen_np(6, 9), atol=1e-15, rtol=0)
