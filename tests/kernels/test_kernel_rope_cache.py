"""rope_and_cache: rotated q, rotated k and raw v in the cache at the given slots, nothing else touched."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_testing import DTYPES, TOL, gen, randn

from reldl.kernels import rope_and_cache, rope_and_cache_reference

SHAPES = [(4, 2, 16), (8, 8, 32), (4, 1, 64)]  # (H, KVH, D)
MAX_POS = 300
NUM_SLOTS = 96


def _tables(d: int, device):
    inv = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    freqs = torch.outer(torch.arange(MAX_POS, dtype=torch.float64), inv)
    return freqs.cos().float().to(device), freqs.sin().float().to(device)


def _case(h, kvh, d, n, dtype, device, seed, cache_dtype=None):
    g = gen(seed)
    qkv = randn(n, (h + 2 * kvh) * d, seed=seed, dtype=dtype, device=device)
    positions = torch.randint(0, MAX_POS, (n,), generator=g).to(device)
    slots = (torch.randperm(NUM_SLOTS - 1, generator=g)[:n] + 1).to(device)  # distinct, trash slot 0 unused
    cache_dtype = cache_dtype or dtype
    k_cache = torch.full((NUM_SLOTS, kvh, d), float("nan"), dtype=cache_dtype, device=device)
    return qkv, positions, slots, k_cache, k_cache.clone()


def _rotate64(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE as a complex product: (x1 + i x2) * e^(i angle), in float64."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angles), angles)
    return torch.cat((z.real, z.imag), dim=-1)


@pytest.mark.parametrize("h,kvh,d", SHAPES)
def test_reference_matches_float64(h, kvh, d):
    n = 9
    qkv, pos, slots, kc, vc = _case(h, kvh, d, n, torch.float32, "cpu", seed=d)
    cos, sin = _tables(d, "cpu")
    q = rope_and_cache_reference(qkv, pos, cos, sin, kc, vc, slots, h, kvh, d)
    inv = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = (pos.double()[:, None] * inv)[:, None, :]  # [n, 1, d/2]
    x = qkv.double()
    want_q = _rotate64(x[:, : h * d].view(n, h, d), angles)
    want_k = _rotate64(x[:, h * d : (h + kvh) * d].view(n, kvh, d), angles)
    torch.testing.assert_close(q.double(), want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kc[slots].double(), want_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vc[slots].double(), x[:, (h + kvh) * d :].view(n, kvh, d), atol=0, rtol=0)


def test_reference_rotation_is_the_engines():
    from reldl.llm.rope import Rotary

    h, kvh, d, n = 4, 2, 32, 6
    rot = Rotary(d, 10000.0, None, MAX_POS, "cpu", torch.float32)
    qkv, pos, slots, kc, vc = _case(h, kvh, d, n, torch.float32, "cpu", seed=1)
    q = rope_and_cache_reference(qkv, pos, rot.cos, rot.sin, kc, vc, slots, h, kvh, d)
    want_q = rot(qkv[:, : h * d].view(1, n, h, d), pos.view(1, n))[0]
    want_k = rot(qkv[:, h * d : (h + kvh) * d].view(1, n, kvh, d), pos.view(1, n))[0]
    assert torch.equal(q, want_q) and torch.equal(kc[slots], want_k)


def _check(h, kvh, d, n, dtype, device, seed, cache_dtype=None, trash_rows=0):
    qkv, pos, slots, kc, vc = _case(h, kvh, d, n, dtype, device, seed, cache_dtype)
    if trash_rows:  # padding rows all aim at the trash slot 0
        slots[-trash_rows:] = 0
    cos, sin = _tables(d, device)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q = rope_and_cache(qkv, pos, cos, sin, kc, vc, slots, h, kvh, d)
    want = rope_and_cache_reference(qkv, pos, cos, sin, kc_ref, vc_ref, slots, h, kvh, d)
    assert q.shape == (n, h, d) and q.dtype == dtype and q.is_contiguous()
    torch.testing.assert_close(q, want, **TOL[dtype])
    real = slots[: n - trash_rows]
    tol = TOL[kc.dtype]
    torch.testing.assert_close(kc[real], kc_ref[real], **tol)
    torch.testing.assert_close(vc[real], vc_ref[real], atol=0, rtol=0)
    untouched = torch.ones(NUM_SLOTS, dtype=torch.bool, device=device)
    untouched[slots] = False
    assert kc[untouched].isnan().all() and vc[untouched].isnan().all(), "a slot outside `slots` was written"
    assert not kc[real].isnan().any() and not vc[real].isnan().any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("h,kvh,d", SHAPES)
def test_kernel_matches_reference(device, dtype, h, kvh, d):
    _check(h, kvh, d, 11, dtype, device, seed=100 + d)


def test_padding_rows_into_trash_slot(device):
    _check(8, 2, 32, 10, torch.float32, device, seed=7, trash_rows=3)


def test_cache_dtype_differs_from_input(device):
    """float32 activations into a float16 cache: k is rounded like the eager path (to input dtype, then cache's)."""
    _check(4, 2, 16, 5, torch.float32, device, seed=8, cache_dtype=torch.float16)


def test_many_heads_loop_over_head_tiles(device):
    """More heads than one tile holds (MAX_TILE) exercise the loop over head tiles."""
    _check(48, 8, 256, 2, torch.float32, device, seed=9)


def test_angle_precision_at_large_positions(device):
    """Positions near the end of the table: the fp32 cos/sin table is used as is, no recomputation."""
    h, kvh, d = 4, 2, 16
    qkv, _, slots, kc, vc = _case(h, kvh, d, 3, torch.float32, device, seed=10)
    pos = torch.tensor([MAX_POS - 1, MAX_POS - 2, 0], device=device)
    cos, sin = _tables(d, device)
    q = rope_and_cache(qkv, pos, cos, sin, kc, vc, slots, h, kvh, d)
    want = rope_and_cache_reference(qkv, pos, cos, sin, kc.clone(), vc.clone(), slots, h, kvh, d)
    torch.testing.assert_close(q, want, atol=1e-5, rtol=1e-5)
    assert math.isclose(float(q[2, 0, 0]), float(qkv[2, 0]), rel_tol=0, abs_tol=0)  # position 0: identity
