"""rmsnorm (optionally fused with the residual add) against its reference, the reference against float64 and
against the engine's RMSNorm module."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DTYPES, TOL, randn

from reldl.kernels import rmsnorm, rmsnorm_reference

EPS = 1e-6


def _inputs(shape, dtype, device, seed, residual):
    h = shape[-1]
    x = randn(*shape, seed=seed, dtype=dtype, device=device)
    w = randn(h, seed=seed + 1, dtype=dtype, device=device, scale=0.5) + 1
    r = randn(*shape, seed=seed + 2, dtype=dtype, device=device, scale=2.0) if residual else None
    return x, w, r


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("h", [64, 200, 256])
def test_reference_matches_float64(h, residual):
    x, w, r = _inputs((7, h), torch.float32, "cpu", seed=h, residual=residual)
    out, r_out = rmsnorm_reference(x, w, EPS, r)
    s = x.double() + (r.double() if residual else 0)
    want = w.double() * s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r_out.double(), s, atol=1e-6, rtol=1e-6)


def test_reference_is_the_engine_module():
    from reldl.llm.models.common import RMSNorm

    for dtype in (torch.float32, torch.float16):
        x, w, _ = _inputs((3, 5, 64), dtype, "cpu", seed=3, residual=False)
        mod = RMSNorm(64, EPS).to(dtype)
        with torch.no_grad():
            mod.weight.copy_(w)
            assert torch.equal(mod(x), rmsnorm_reference(x, w, EPS)[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("h", [64, 200, 256])
def test_kernel_matches_reference(device, dtype, h, residual):
    x, w, r = _inputs((2, 3, h), dtype, device, seed=10 * h + residual, residual=residual)
    out, r_out = rmsnorm(x, w, EPS, r)
    want, want_r = rmsnorm_reference(x, w, EPS, r)
    assert out.shape == x.shape and out.dtype == dtype and r_out.dtype == dtype
    torch.testing.assert_close(out, want, **TOL[dtype])
    if residual:
        torch.testing.assert_close(r_out, want_r, atol=0, rtol=0)  # same rounding of the same sum
        assert r_out.data_ptr() not in (x.data_ptr(), r.data_ptr())
    else:
        assert r_out is x
    # against float32 math as well (the reference in a low dtype is itself rounded)
    want32, _ = rmsnorm_reference(x.float() if r is None else (x + r).float(), w.float(), EPS)
    torch.testing.assert_close(out.float(), want32, **TOL[dtype])


def test_long_rows_two_pass(device):
    """Rows longer than one block (MAX_SINGLE_BLOCK) take the chunked two-pass path."""
    x, w, r = _inputs((2, 9000), torch.float32, device, seed=5, residual=True)
    for res in (None, r):
        out, r_out = rmsnorm(x, w, EPS, res)
        want, want_r = rmsnorm_reference(x, w, EPS, res)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r_out, want_r, atol=0, rtol=0)


def test_strided_rows_and_float32_weight(device):
    """A non-contiguous row view works; a float32 weight promotes the output like the module does."""
    base = randn(4, 128, seed=6, dtype=torch.float16, device=device)
    x = base[:, :64]
    w = randn(64, seed=7, device=device)
    out, _ = rmsnorm(x, w, EPS)
    want, _ = rmsnorm_reference(x, w, EPS)
    assert out.dtype == torch.float32 == want.dtype
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
