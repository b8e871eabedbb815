"""quant4_decode_attention (4-bit K/V dequantized in registers) against dequantize-then-SDPA, in the interpreter.

Caches are fresh random K/V quantized with quantize_kv_4bit_reference, laid out as the offloaded executor keeps
them (packed [S_alloc, B*h, G*32], the kernel given the prefix rows [0, S) only); the rows past the prefix hold NaN
scales, so a read past S would poison the output. Contexts are odd lengths, GQA groups 1 / 4 / 8, splits forced,
left padding masks whole key tiles.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
from kernel_testing import ON_GPU, gen, randn

from reldl.kernels import (
    Quantized4,
    quant4_decode_attention,
    quant4_decode_attention_reference,
    quantize_kv_4bit,
    quantize_kv_4bit_into,
    quantize_kv_4bit_into_reference,
    quantize_kv_4bit_reference,
)

TOLS = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=1e-2)}
if ON_GPU:
    TOLS[torch.bfloat16] = dict(atol=3e-2, rtol=3e-2)


def _cache(s, b, h, d, dtype, device, seed, spare=5):
    """A quantized cache of s + spare slots (the spare rows poisoned), returned with its [0, s) prefix."""
    x = randn(s + spare, b * h, d, seed=seed, dtype=dtype)
    q = quantize_kv_4bit_reference(x)
    q = Quantized4(q.packed.to(device), q.scale.to(device), q.minv.to(device), d)
    q.scale[s:] = float("nan")
    q.minv[s:] = float("nan")
    return Quantized4(q.packed[:s], q.scale[:s], q.minv[:s], d)


def _pad_mask(b, t, s, tn, pads, device):
    """Left padding pads[i] (keys before it hidden) and causality over the t query tokens at the end."""
    keys = torch.arange(s + tn)
    qpos = torch.arange(s + tn - t, s + tn)
    pads = torch.tensor(pads)
    m = (keys[None, None, :] >= pads[:, None, None]) & (keys[None, None, :] <= qpos[None, :, None])
    return m.to(device)


def _run(b, h, g, d, s, t, dtype, device, seed, splits=None, new=True, masked=True, pads=None):
    tn = t if new else 0
    q = randn(b, t, h * g, d, seed=seed, dtype=dtype, device=device)
    kc = _cache(s, b, h, d, dtype, device, seed + 1)
    vc = _cache(s, b, h, d, dtype, device, seed + 2)
    kn = randn(tn, b, h, d, seed=seed + 3, dtype=dtype, device=device) if new else None
    vn = randn(tn, b, h, d, seed=seed + 4, dtype=dtype, device=device) if new else None
    if pads is None:
        pads = [int(i) for i in torch.randint(0, max(1, s // 2), (b,), generator=gen(seed + 5))]
    mask = _pad_mask(b, t, s, tn, pads, device) if masked else None
    scale = d**-0.5
    got = quant4_decode_attention(q, kc, vc, scale, kn, vn, mask, num_splits=splits)
    f = (lambda x: None if x is None else x.float()) if dtype != torch.float32 else (lambda x: x)
    want = quant4_decode_attention_reference(f(q), kc, vc, scale, f(kn), f(vn), mask)
    assert got.shape == (b, t, h * g, d) and got.dtype == dtype
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want.float(), **TOLS[dtype])
    return got


@pytest.mark.parametrize("dtype", list(TOLS))
@pytest.mark.parametrize(
    "b,h,g,d,s,splits",
    [
        (2, 2, 1, 64, 37, 1),  # MHA (OPT), odd context
        (2, 1, 4, 128, 71, 1),  # GQA 4, head_dim 128
        (1, 2, 8, 64, 203, 3),  # GQA 8, split-K forced (last split short)
        (2, 1, 4, 128, 150, 4),
    ],
)
def test_kernel_matches_reference(b, h, g, d, s, splits, dtype, device):
    _run(b, h, g, d, s, 1, dtype, device, seed=s + g, splits=splits)


@pytest.mark.parametrize("splits", [1, 2])
def test_several_query_tokens_and_row_blocks(splits, device):
    """T = 3 queries per sequence (causal among the new rows); T * g = 72 rows takes two row blocks."""
    _run(2, 1, 4, 64, 45, 3, torch.float32, device, seed=1, splits=splits)
    _run(1, 1, 8, 64, 70, 9, torch.float32, device, seed=2, splits=splits)


def test_fully_masked_tiles_and_empty_splits(device):
    """Left padding of 100 keys hides whole 64-key tiles (and whole splits): max stays -inf there, no NaN."""
    _run(2, 2, 2, 64, 130, 1, torch.float32, device, seed=3, splits=4, pads=[100, 0])
    _run(1, 1, 1, 64, 10, 1, torch.float32, device, seed=4, splits=1, pads=[10])  # only the new row visible


def test_no_new_rows_no_mask_odd_head_dim(device):
    """The cache alone (no exact new rows, no mask), head_dim 80 (a padded second group), 4-D cache views."""
    _run(2, 2, 2, 80, 33, 1, torch.float32, device, seed=5, new=False, masked=False)
    q = randn(2, 1, 4, 64, seed=6, device=device)
    kc, vc = (_cache(19, 2, 2, 64, torch.float32, device, seed=i) for i in (7, 8))
    four = [Quantized4(*(x.view(19, 2, 2, -1) for x in (c.packed, c.scale, c.minv)), 64) for c in (kc, vc)]
    torch.testing.assert_close(
        quant4_decode_attention(q, *four, 0.125),
        quant4_decode_attention_reference(q, kc, vc, 0.125),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize(
    "d,s,splits,new,masked,pads",
    [
        (128, 150, 1, True, True, None),
        (128, 150, 3, True, True, None),  # split-K, the new row in the last split
        (80, 33, 1, False, False, None),  # a padded second group, the cache alone
        (64, 130, 4, True, True, [100, 0]),  # whole tiles and splits masked
        (64, 10, 1, True, True, [10, 10]),  # only the new row visible
    ],
)
def test_gemv_one_row_per_head(d, s, splits, new, masked, pads, device, monkeypatch):
    """T * g == 1 (multi-head attention decode, OPT) takes the GEMV kernel: the reference, and the tl.dot kernel's
    result (module flag GEMV off)."""
    import importlib

    qa = importlib.import_module("reldl.kernels.quant4_attention")
    got = _run(2, 3, 1, d, s, 1, torch.float32, device, seed=d + s, splits=splits, new=new, masked=masked, pads=pads)
    monkeypatch.setattr(qa, "GEMV", False)
    dot = _run(2, 3, 1, d, s, 1, torch.float32, device, seed=d + s, splits=splits, new=new, masked=masked, pads=pads)
    torch.testing.assert_close(got, dot, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("g", [1, 4])
def test_explicit_splits_past_the_keys(g, device):
    """A split count fixed for a whole generation (the executor's, from `decode_splits` at the final context) while
    the context is still short: the splits past the keys are empty and the result is the single-split one."""
    a = _run(1, 2, g, 64, 20, 1, torch.float32, device, seed=30 + g, splits=12)
    b = _run(1, 2, g, 64, 20, 1, torch.float32, device, seed=30 + g, splits=1)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_decode_splits_is_the_automatic_choice(device):
    """`decode_splits` at a context gives the split count the kernel picks by itself there, for the GEMV and the
    tl.dot kernels; one sequence of a few heads over a long context splits, a full batch does not."""
    qa = importlib.import_module("reldl.kernels.quant4_attention")
    pa = importlib.import_module("reldl.kernels.paged_attention")
    sms = pa.num_sms(torch.device(device))
    for rows, d in ((1, 128), (4, 64), (8, 128)):
        block_n = (
            qa.GEMV_CONFIG["BLOCK_N"] if rows == 1 else qa.quant4_attention_config(d, rows, torch.float32)["BLOCK_N"]
        )
        for b, h, keys in ((1, 2, 4096), (64, 8, 4096), (1, 2, 40)):
            want = pa.choose_num_splits(b, h, keys, block_n, sms)
            assert qa.decode_splits(b, h, rows, d, keys, torch.device(device)) == want
    assert qa.decode_splits(1, 2, 1, 128, 4096, torch.device(device)) > 1
    assert qa.decode_splits(1024, 8, 1, 128, 4096, torch.device(device)) == 1


def test_automatic_splits_match_single_split(device):
    """Split-K chosen from shapes (few programs, long context) gives the single-split result."""
    a = _run(1, 1, 4, 64, 700, 1, torch.float32, device, seed=9, splits=None)
    b = _run(1, 1, 4, 64, 700, 1, torch.float32, device, seed=9, splits=1)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_reference_equals_executor_attention():
    """The reference is what the executor computes eagerly (layers.attention over the dequantized prefix + new)."""
    from reldl.kernels.quant4 import dequantize_kv_4bit
    from reldl.llm.offload import layers

    b, h, g, d, s = 2, 2, 2, 64, 21
    q = randn(b, 1, h * g, d, seed=11)
    kc, vc = (_cache(s, b, h, d, torch.float32, "cpu", seed=i) for i in (12, 13))
    kn, vn = (randn(1, b, h, d, seed=i) for i in (14, 15))
    mask = _pad_mask(b, 1, s, 1, [3, 0], "cpu")
    full = [torch.cat([dequantize_kv_4bit(c).view(s, b, h, d), n]) for c, n in ((kc, kn), (vc, vn))]
    want = layers.attention(q, full[0], full[1], mask, 0.125)
    got = quant4_decode_attention_reference(q, kc, vc, 0.125, kn, vn, mask).reshape(b, 1, -1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_into_matches_quantize_and_copy(device, dtype):
    """Quantizing new rows into a cache (scales in the cache's dtype: the executor's fp16 caches too) writes the bytes
    quantize_kv_4bit gives."""
    x = randn(3, 6, 128, seed=16, device=device).to(dtype)
    caches = []
    for fn in (quantize_kv_4bit_into, quantize_kv_4bit_into_reference):
        c = Quantized4(
            torch.zeros(8, 6, 64, dtype=torch.uint8, device=device),
            torch.zeros(8, 6, 2, device=device, dtype=dtype),
            torch.zeros(8, 6, 2, device=device, dtype=dtype),
            128,
        )
        fn(x, c, 4)
        caches.append(c)
    want = quantize_kv_4bit(x)
    assert want.scale.dtype == dtype
    for c, exact in zip(caches, (True, not ON_GPU)):
        # the Triton path writes quantize_kv_4bit's bytes exactly; the torch reference on a GPU may round the scale
        # one ulp apart (its own division), so it is compared within float32 rounding there
        same = torch.equal if exact else (lambda a, b: torch.allclose(a, b, rtol=1e-6, atol=0))
        assert torch.equal(c.packed[4:7], want.packed) and same(c.scale[4:7], want.scale)
        assert same(c.minv[4:7], want.minv) and not c.packed[:4].any() and not c.packed[7:].any()


def test_signatures_and_shape_errors(device):
    for k, r in (
        (quant4_decode_attention, quant4_decode_attention_reference),
        (quantize_kv_4bit_into, quantize_kv_4bit_into_reference),
    ):
        assert list(inspect.signature(k).parameters) == list(inspect.signature(r).parameters)
    q = randn(2, 1, 4, 64, seed=17, device=device)
    kc = _cache(9, 2, 2, 64, torch.float32, device, seed=18)
    with pytest.raises(ValueError, match="mask"):
        quant4_decode_attention(q, kc, kc, 0.1, mask=torch.ones(2, 1, 5, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="k_new"):
        quant4_decode_attention(q, kc, kc, 0.1, randn(1, 2, 2, 64, seed=1, device=device), None)
    with pytest.raises(ValueError, match="query heads"):
        quant4_decode_attention(q[:, :, :3], kc, kc, 0.1)


@pytest.mark.skipif(not ON_GPU, reason="compiled kernels exist on the GPU only")
@pytest.mark.parametrize("g", [1, 4])
def test_one_compile_across_decode_steps(g):
    """A growing context (S and the mask's strides change every step, some multiples of 16) reuses one compiled
    kernel: no recompiles (stalls of seconds) in the middle of generation."""
    import importlib

    qa = importlib.import_module("reldl.kernels.quant4_attention")
    kern = qa._quant4_decode_gemv_kernel if g == 1 else qa._quant4_decode_kernel
    dev = torch.device("cuda")
    sizes = []
    for s in (31, 32, 47, 48, 63):
        _run(2, 2, g, 64, s, 1, torch.float16, dev, seed=s, splits=1)
        sizes.append(sum(len(c[0]) for c in kern.device_caches.values()))
    assert sizes[-1] == sizes[0], sizes
