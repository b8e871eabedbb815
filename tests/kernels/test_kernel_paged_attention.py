"""paged_decode_attention against a dense softmax over the gathered keys, and the reference against float64 loops.

Block tables are shuffled and non-contiguous, contexts run from 1 key to several blocks with partly filled last
blocks, and every cache slot a sequence may not see (past its context, before its window, unused blocks, the trash
block) holds NaN for the kernel: a single read of one would poison the output.
"""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DTYPES, TOL, gen, randn

from reldl.kernels import choose_num_splits, paged_decode_attention, paged_decode_attention_reference


def _case(b, kvh, group, d, block_size, nb, ctx, dtype, device, seed):
    """Returns q, clean caches, NaN-poisoned caches, block tables, context lengths."""
    g = gen(seed)
    h = kvh * group
    num_blocks = b * nb + 3
    q = randn(b, h, d, seed=seed, dtype=dtype, device=device)
    k = randn(num_blocks * block_size, kvh, d, seed=seed + 1, dtype=dtype, device=device)
    v = randn(num_blocks * block_size, kvh, d, seed=seed + 2, dtype=dtype, device=device)
    pool = torch.randperm(num_blocks - 1, generator=g) + 1  # block 0 (trash) is never handed out
    tables = torch.zeros(b, nb, dtype=torch.long)
    ctx = torch.tensor(ctx, dtype=torch.long)
    for i in range(b):
        used = -(-int(ctx[i]) // block_size)
        tables[i, :used] = pool[i * nb : i * nb + used]  # the rest stays 0 (padding)
    return q, k, v, tables.to(device), ctx.to(device)


def _poison(cache, tables, ctx, block_size, window):
    """NaN everywhere except the slots each sequence is allowed to see."""
    keep = torch.zeros(cache.shape[0], dtype=torch.bool, device=cache.device)
    for i in range(tables.shape[0]):
        n = int(ctx[i])
        lo = 0 if window is None else max(0, n - window)
        j = torch.arange(lo, n, device=cache.device)
        keep[tables[i, j // block_size] * block_size + j % block_size] = True
    out = cache.clone()
    out[~keep] = float("nan")
    return out


def _float64(q, k, v, tables, ctx, block_size, scale, window):
    b, h, d = q.shape
    kvh = k.shape[1]
    out = torch.zeros(b, h, d, dtype=torch.float64)
    for i in range(b):
        n = int(ctx[i])
        lo = 0 if window is None else max(0, n - window)
        j = torch.arange(lo, n)
        slots = tables[i].cpu()[j // block_size] * block_size + j % block_size
        for head in range(h):
            kk = k.cpu()[slots, head // (h // kvh)].double()
            vv = v.cpu()[slots, head // (h // kvh)].double()
            p = torch.softmax(kk @ q[i, head].cpu().double() * scale, dim=0)
            out[i, head] = p @ vv
    return out


# one key, exactly one block, partial blocks, several blocks, several BLOCK_N tiles (block_size 16, nb 20)
CTX = [1, 16, 37, 300, 5]
NB = 20


@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("group", [1, 4])
def test_reference_matches_float64(group, window):
    d, bs = 32, 16
    q, k, v, t, ctx = _case(5, 2, group, d, bs, NB, CTX, torch.float32, "cpu", seed=group)
    got = paged_decode_attention_reference(q, k, v, t, ctx, bs, d**-0.5, window)
    torch.testing.assert_close(got.double(), _float64(q, k, v, t, ctx, bs, d**-0.5, window), atol=1e-5, rtol=1e-5)


def _run(q, k, v, t, ctx, bs, window, splits, dtype):
    d = q.shape[-1]
    scale = d**-0.5
    kp, vp = _poison(k, t, ctx, bs, window), _poison(v, t, ctx, bs, window)
    out = paged_decode_attention(q, kp, vp, t, ctx, bs, scale, window=window, num_splits=splits)
    assert out.shape == q.shape and out.dtype == dtype
    want = paged_decode_attention_reference(q.float(), k.float(), v.float(), t, ctx, bs, scale, window)
    torch.testing.assert_close(out.float(), want, **TOL[dtype])
    return out


@pytest.mark.parametrize("d", [16, 32, 64])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_kernel_float32_groups_and_head_dims(device, group, d):
    """Every (group, head_dim), without split-K, with it (3 chunks) and with a window; results agree to 1e-5."""
    q, k, v, t, ctx = _case(5, 2, group, d, 16, NB, CTX, torch.float32, device, seed=10 * group + d)
    whole = _run(q, k, v, t, ctx, 16, None, 1, torch.float32)
    split = _run(q, k, v, t, ctx, 16, None, 3, torch.float32)
    torch.testing.assert_close(split, whole, atol=1e-6, rtol=1e-6)
    _run(q, k, v, t, ctx, 16, 24, 1, torch.float32)
    _run(q, k, v, t, ctx, 16, 24, 2, torch.float32)


@pytest.mark.parametrize("dtype", [x for x in DTYPES if x != torch.float32], ids=str)
@pytest.mark.parametrize("group", [1, 8])
def test_kernel_low_precision(device, dtype, group):
    q, k, v, t, ctx = _case(5, 2, group, 64, 16, NB, CTX, dtype, device, seed=20 + group)
    for splits in (1, 4):
        for window in (None, 33):
            _run(q, k, v, t, ctx, 16, window, splits, dtype)


@pytest.mark.parametrize("block_size", [8, 32])
def test_other_block_sizes(device, block_size):
    """Tiles of BLOCK_N keys span several small blocks, or part of one large block."""
    ctx = [1, 9, 70, 96]
    q, k, v, t, c = _case(4, 2, 2, 32, block_size, 96 // block_size, ctx, torch.float32, device, seed=block_size)
    _run(q, k, v, t, c, block_size, None, 1, torch.float32)
    _run(q, k, v, t, c, block_size, 10, 3, torch.float32)


def test_more_splits_than_keys(device):
    """Most chunks are empty for short contexts: their neutral partials must not disturb the merge."""
    q, k, v, t, ctx = _case(3, 1, 4, 16, 16, 2, [1, 2, 17], torch.float32, device, seed=3)
    _run(q, k, v, t, ctx, 16, None, 8, torch.float32)
    _run(q, k, v, t, ctx, 16, 1, 8, torch.float32)  # window 1: only the newest key


def test_window_wider_than_context_and_full_blocks(device):
    q, k, v, t, ctx = _case(2, 2, 2, 32, 16, 4, [64, 63], torch.float32, device, seed=4)
    for window in (None, 1000, 64, 17):
        _run(q, k, v, t, ctx, 16, window, 1, torch.float32)


@pytest.mark.parametrize("d,group", [(128, 8), (48, 2)])
def test_large_and_non_power_of_two_head_dims(device, d, group):
    q, k, v, t, ctx = _case(2, 1, group, d, 16, 3, [40, 7], torch.float32, device, seed=d)
    _run(q, k, v, t, ctx, 16, None, 1, torch.float32)
    _run(q, k, v, t, ctx, 16, None, 2, torch.float32)


def test_automatic_split_k(device):
    """Few programs and a long context: the default picks split-K, and agrees with the unsplit kernel."""
    assert choose_num_splits(2, 2, 512, 64, sms=132) > 1
    assert choose_num_splits(64, 4, 2048, 64, sms=132) == 1  # 256 programs already fill the GPU
    assert choose_num_splits(2, 2, 256, 64, sms=132) == 1  # too short to be worth it
    q, k, v, t, ctx = _case(2, 2, 2, 16, 16, 32, [512, 300], torch.float32, device, seed=5)
    auto = _run(q, k, v, t, ctx, 16, None, None, torch.float32)
    torch.testing.assert_close(
        auto, paged_decode_attention(q, k, v, t, ctx, 16, 0.25, num_splits=1), atol=1e-6, rtol=1e-6
    )


def test_int32_context_lens_and_strided_q(device):
    q, k, v, t, ctx = _case(3, 2, 2, 32, 16, 3, [5, 33, 48], torch.float32, device, seed=6)
    wide = torch.zeros(3, 4, 64, device=device)
    wide[:, :, :32] = q
    qs = wide[:, :, :32]  # non-contiguous view
    out = paged_decode_attention(qs, k, v, t, ctx.to(torch.int32), 16, 32**-0.5)
    want = paged_decode_attention_reference(q, k, v, t, ctx, 16, 32**-0.5)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
