"""4-bit group-wise quantization: the Triton quantizer against its reference (bit for bit), the round-trip error
bound, the packed layout, edge cases, and the fused 4-bit GEMM against x @ dequantize(q).T + bias on odd shapes."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DTYPES, ON_GPU, TOL, randn

from reldl.kernels.quant4 import (
    GROUP,
    Quantized4,
    dequantize_4bit,
    dequantize_kv_4bit,
    matmul_4bit,
    matmul_4bit_reference,
    quantize_4bit,
    quantize_4bit_reference,
    quantize_kv_4bit,
    quantize_kv_4bit_reference,
)


def _per_element_scale(q: Quantized4) -> torch.Tensor:
    return q.scale.float().repeat_interleave(GROUP, dim=-1)[..., : q.k]


def _same(a: Quantized4, b: Quantized4) -> None:
    assert a.k == b.k
    for name in ("packed", "scale", "minv"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape and x.dtype == y.dtype, name
        assert torch.equal(x.cpu(), y.cpu()), name


@pytest.mark.parametrize("shape", [(1, 1), (3, 10), (70, 64), (33, 150), (17, 257), (2, 5, 96)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_matches_reference_and_round_trip_bound(shape, dtype, device):
    w = randn(*shape, seed=sum(shape), dtype=dtype, device=device, scale=3.0)
    q = quantize_4bit(w)
    ref = quantize_4bit_reference(w.cpu())
    _same(q, ref)
    g = -(-shape[-1] // GROUP)
    assert q.packed.shape == (*shape[:-1], g * 32) and q.packed.dtype == torch.uint8
    assert q.scale.shape == (*shape[:-1], g) and q.scale.dtype == dtype and q.minv.dtype == dtype
    err = (w.float() - dequantize_4bit(q).to(w.device)).abs()
    bound = _per_element_scale(q).to(w.device) / 2
    if dtype == torch.float32:
        slack = 1e-6 * (1 + w.abs())
    else:  # minv and scale stored in 16 bits: codes are computed against the stored values, the top may clamp
        eps = torch.finfo(dtype).eps
        slack = eps * (1 + w.float().abs()) + 16 * eps * bound
    assert bool((err <= bound + slack).all()), (err - bound).max()


def test_packed_layout_is_stable():
    """Byte j of a group holds element j (low nibble) and element 32 + j (high nibble)."""
    k = torch.arange(2 * GROUP + 7)
    w = torch.stack([(k % 16).float(), -(k % 16).float() * 0.5])  # min 0 / -7.5, scale 1 / 0.5
    q = quantize_4bit(w)
    assert q.packed.shape == (2, 3 * 32)
    torch.testing.assert_close(q.scale, torch.tensor([[1.0, 1.0, 6 / 15], [0.5, 0.5, 3 / 15]]))
    torch.testing.assert_close(q.minv, torch.tensor([[0.0, 0.0, 0.0], [-7.5, -7.5, -3.0]]))
    j = torch.arange(32)
    assert torch.equal(q.packed[0, :64], ((j % 16) * 17).repeat(2).to(torch.uint8))
    assert torch.equal(q.packed[1, :64], ((15 - j % 16) * 17).repeat(2).to(torch.uint8))
    # last group: 7 real elements (codes 0..6 of 0..6 / scale 0.4 -> round), the rest padding (code 0)
    tail = q.packed[0, 64:]
    assert torch.equal(tail[7:], torch.zeros(25, dtype=torch.uint8))
    assert torch.equal(tail[:7] >> 4, torch.zeros(7, dtype=torch.uint8))
    assert torch.equal(tail[:7] & 15, torch.tensor([0, 3, 5, 8, 10, 13, 15], dtype=torch.uint8))
    assert torch.equal(dequantize_4bit(q)[:, :128], w[:, :128])


def test_constant_and_negative_groups():
    w = torch.full((3, 130), -2.25)
    w[1] = 7.0
    w[2, :64] = -torch.linspace(1, 5, 64)  # all negative
    q = quantize_4bit(w)
    assert q.scale[0].eq(0).all() and q.scale[1].eq(0).all() and q.scale[2, 1:].eq(0).all()
    assert q.packed[:2].eq(0).all()
    d = dequantize_4bit(q)
    assert torch.equal(d[:2], w[:2]) and torch.equal(d[2, 64:], w[2, 64:])
    assert float(q.minv[2, 0]) == -5.0
    assert bool(((d[2, :64] - w[2, :64]).abs() <= q.scale[2, 0] / 2 + 1e-6).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_rejected(bad):
    w = torch.randn(4, 70)
    w[2, 65] = bad
    for fn in (quantize_4bit, quantize_4bit_reference):
        with pytest.raises(ValueError, match="NaN or inf"):
            fn(w)
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_kv_4bit(w.view(4, 1, 70))


def test_bad_inputs():
    with pytest.raises(TypeError):
        quantize_4bit(torch.ones(2, 3, dtype=torch.int32))
    q = quantize_4bit(torch.randn(8, 100))
    with pytest.raises(ValueError, match="input features"):
        matmul_4bit(torch.randn(2, 99), q)
    with pytest.raises(ValueError, match="bias"):
        matmul_4bit(torch.randn(2, 100), q, torch.zeros(7))
    with pytest.raises(ValueError, match="head_dim"):
        quantize_kv_4bit(torch.randn(4, 64))


SHAPES = [  # (M, N, K): decode rows, odd N, K below / at / off multiples of 64, several tiles each way
    (1, 33, 64),
    (3, 70, 10),
    (16, 65, 150),
    (17, 16, 129),
    (50, 130, 200),
    (130, 40, 96),
]


@pytest.mark.parametrize("mnk", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_matmul_4bit_float32(mnk, bias, device):
    m, n, k = mnk
    w = randn(n, k, seed=k, device=device)
    q = quantize_4bit(w)
    x = randn(m, k, seed=m + 1, device=device)
    b = randn(n, seed=n + 2, device=device) if bias else None
    got = matmul_4bit(x, q, b)
    want = x.double() @ dequantize_4bit(q).double().T.to(device) + (b.double() if bias else 0)
    assert got.shape == (m, n) and got.dtype == torch.float32
    err = (got.double() - want).abs().max() / (want.abs().max() + 1e-12)
    assert err < 1e-4, err
    torch.testing.assert_close(matmul_4bit_reference(x, q, b), got, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_4bit_dtypes_and_leading_dims(dtype, device):
    n, k = 48, 136
    q = quantize_4bit(randn(n, k, seed=5, dtype=dtype, device=device))
    x = randn(2, 9, k, seed=6, dtype=dtype, device=device)
    b = randn(n, seed=7, dtype=dtype, device=device)
    got = matmul_4bit(x, q, b)
    assert got.shape == (2, 9, n) and got.dtype == dtype
    want = matmul_4bit_reference(x, q, b)
    # 16-bit x: the kernel dequantizes each weight tile once into x's dtype (one rounding per weight, as an fp16
    # weight would have), so a 1-ulp difference of a large output is allowed: tolerance relative to the largest output
    rel = 1e-4 if dtype == torch.float32 else TOL[dtype]["rtol"]
    tol = dict(atol=rel * float(want.abs().max()), rtol=rel)
    torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("path", ["gemv-split", "gemv-direct"])
def test_gemv_4bit_paths(path, device, monkeypatch):
    """The M = 1 kernel with split-K partials (several groups per step, the last split short) and without."""
    import reldl.kernels.quant4 as Q

    m, n, k, dtype = 1, 37, 600, torch.float32
    if path == "gemv-split":
        monkeypatch.setattr(Q, "GEMV_CONFIG", {"BLOCK_N": 8, "NG": 2, "num_warps": 1})
        monkeypatch.setattr(Q, "GEMV_PARTIAL_FRACTION", 1e-3)
        monkeypatch.setattr(Q, "GEMV_PROGRAMS_PER_SM", 64)
    else:
        monkeypatch.setattr(Q, "GEMV_PROGRAMS_PER_SM", 0)
    cfg = Q.gemv_4bit_config(n, k, Q._sms(torch.device(device)))
    assert (cfg["SPLITS"] > 1) == (path == "gemv-split")
    q = quantize_4bit(randn(n, k, seed=9, dtype=dtype, device=device))
    x = randn(m, k, seed=10, dtype=dtype, device=device)
    b = randn(n, seed=11, dtype=dtype, device=device)
    got = matmul_4bit(x, q, b)
    want = x.double() @ dequantize_4bit(q).double().T.to(device) + b.double()
    err = (got.double() - want).abs().max() / want.abs().max()
    assert err < 1e-5, err


GEMM_VARIANTS = [  # (dequantization variant, groups per step, split K, rows tile, weight-rows tile, swap AB)
    (0, 1, False, 16, 16, True),
    (1, 2, True, 16, 32, True),
    (2, 1, True, 32, 16, False),
    (2, 2, False, 16, 16, True),
    (1, 4, False, 32, 16, False),
]


@pytest.mark.parametrize("variant", GEMM_VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_4bit_gemm_variants(variant, dtype, device, monkeypatch):
    """The M >= 2 kernel under each dequantization variant, with and without split-K partials (the last split short,
    a partial group step at the end of K), bias, odd M/N/K: against float64 on fresh random inputs. Poisoned
    output: every element must be written."""
    import reldl.kernels.quant4 as Q

    deq, ng, split, bm, bn, swap = variant
    cfg = dict(BLOCK_N=bn, BLOCK_M=bm, NG=ng, GROUP_N=2, DEQ=deq, SWAP=swap, PROGRAMS_PER_SM=64 if split else 0)
    monkeypatch.setattr(Q, "INTERPRETER_CONFIG", cfg)
    monkeypatch.setattr(Q, "GEMM_CONFIGS", {None: cfg})
    monkeypatch.setattr(Q, "GEMM_PARTIAL_FRACTION", 1e-3)
    m, n, k = 19, 45, 330  # 6 groups, the last one 10 columns
    got_cfg = Q.matmul_4bit_config(m, n, k, dtype, Q._sms(torch.device(device)), dtype)
    assert (got_cfg["SPLITS"] > 1) == split
    q = quantize_4bit(randn(n, k, seed=12 + deq, dtype=dtype, device=device, scale=0.5))
    x = randn(m, k, seed=13 + ng, dtype=dtype, device=device)
    b = randn(n, seed=14, dtype=dtype, device=device)
    x2, packed, scale, minv = x, q.packed, q.scale, q.minv
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    Q._gemm_4bit(x2, packed, scale, minv, b, out, n, k)
    assert not out.isnan().any()
    want = x.double() @ dequantize_4bit(q).double().T.to(device) + b.double()
    err = float((out.double() - want).norm() / want.norm())
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert err < tol, err


def test_no_dequantized_weight_is_materialized(device):
    """The M >= 2 path allocates nothing weight-sized (the old path dequantized row chunks into a scratch buffer)."""
    import reldl.kernels.quant4 as Q

    assert not hasattr(Q, "dequantize_4bit_triton") and not hasattr(Q, "DEQUANT_GEMM_MIN_M")
    n, k, m = 64, 256, 32
    q = quantize_4bit(randn(n, k, seed=3, device=device))
    x = randn(m, k, seed=4, device=device)
    seen = []
    real_empty = torch.empty

    def spy(*a, **kw):
        t = real_empty(*a, **kw)
        seen.append(t.numel())
        return t

    import unittest.mock

    with unittest.mock.patch.object(Q.torch, "empty", spy):
        got = matmul_4bit(x, q)
    assert max(seen) < n * k, seen  # the output [m, n] (+ partials) only
    torch.testing.assert_close(got, matmul_4bit_reference(x, q), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not ON_GPU, reason="prefill-sized shapes only on the GPU (slow in the interpreter)")
@pytest.mark.parametrize("m", [1, 16, 64, 300, 1030])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matmul_4bit_gpu_shapes(m, dtype, device):
    n, k = 1000, 1090
    q = quantize_4bit(randn(n, k, seed=m, dtype=dtype, device=device, scale=0.05))
    x = randn(m, k, seed=m + 1, dtype=dtype, device=device)
    got = matmul_4bit(x, q)
    want = x.float() @ dequantize_4bit(q).T
    err = (got.float() - want).abs().max() / want.abs().max()
    assert err < (5e-3 if dtype == torch.float16 else 3e-2), err


@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_quantization(head_dim, dtype, device):
    x = randn(19, 3, head_dim, seed=head_dim, dtype=dtype, device=device, scale=2.0)
    q = quantize_kv_4bit(x)
    _same(q, quantize_kv_4bit_reference(x.cpu()))
    g = -(-head_dim // GROUP)
    assert q.packed.shape == (19, 3, g * 32) and q.scale.shape == (19, 3, g) and q.shape == (19, 3, head_dim)
    d = dequantize_kv_4bit(q, dtype)
    assert d.shape == x.shape and d.dtype == dtype
    err = (x.float() - dequantize_kv_4bit(q).to(x.device)).abs()
    eps = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps * 16
    assert bool((err <= _per_element_scale(q).to(x.device) * (0.5 + eps) + eps * (1 + x.float().abs())).all())
    # rows are independent: quantizing one token alone gives the same bytes
    one = quantize_kv_4bit(x[7:8])
    assert torch.equal(one.packed.cpu(), q.packed[7:8].cpu())


def test_reference_signatures_match():
    import inspect

    for kernel, ref in [
        (quantize_4bit, quantize_4bit_reference),
        (quantize_kv_4bit, quantize_kv_4bit_reference),
        (matmul_4bit, matmul_4bit_reference),
    ]:
        assert list(inspect.signature(kernel).parameters) == list(inspect.signature(ref).parameters)
