"""silu_and_mul against its reference, and the reference against float64."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DTYPES, TOL, randn

from reldl.kernels import silu_and_mul, silu_and_mul_reference


def test_reference_matches_float64():
    x = randn(4, 2 * 96, seed=1, dtype=torch.float32, scale=3.0)
    g, u = x.double().chunk(2, dim=-1)
    want = g / (1 + torch.exp(-g)) * u
    torch.testing.assert_close(silu_and_mul_reference(x).double(), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 2 * 48), (2, 5, 2 * 1500), (1, 2 * 8)])
def test_kernel_matches_reference(device, dtype, shape):
    x = randn(*shape, seed=shape[-1], dtype=dtype, device=device, scale=4.0)
    out = silu_and_mul(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    torch.testing.assert_close(out, silu_and_mul_reference(x), **TOL[dtype])


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy exp
def test_extreme_values(device):
    x = torch.tensor([[-100.0, 0.0, 100.0, -1e4, 2.0, 3.0, 4.0, 5.0]], device=device)
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_reference(x), atol=1e-5, rtol=1e-5)
    assert silu_and_mul(x).isfinite().all()
