"""Decode attention over the paged KV cache: one new query token per sequence, flash-decoding style.

One program per (sequence, KV head, split) handles all the query heads of that KV head's GQA group (padded to 16
rows for `tl.dot`), so each cached key/value is read once per step. Keys are visited in tiles of BLOCK_N through the
block table (any block size; a tile may span several cache blocks), with an online softmax in float32.

Split-K: when B * KVH programs cannot fill the GPU and the context is long, each sequence's visible key range is cut
into `num_splits` equal chunks (a multiple of BLOCK_N) handled by separate programs, which write partial
(max, sum, acc) in float32; a second kernel merges them in a fixed order (deterministic, no atomics). Programs whose
chunk lies past a sequence's context write neutral partials (max -inf, sum 0, acc 0).

All launch shapes come from tensor shapes (batch, heads, block-table width), never from the values in
`context_lens`, so the whole thing can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from reldl.kernels._triton import cdiv, interpreting, next_pow2, require_triton, tl, triton

LOG2E = 1.4426950408889634
MIN_KEYS_PER_SPLIT = 256  # never split a context into chunks shorter than this
MAX_SPLITS = 32
DEFAULT_SMS = 132  # H100 SXM; used where the device cannot be asked (the interpreter)


def paged_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
    window: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """The eager path: gather each sequence's blocks, build a mask from context lengths, SDPA in q.dtype.

    q [B, H, D]; k_cache/v_cache [num_blocks * block_size, KVH, D]; block_tables [B, NB]; context_lens [B].
    Key j of sequence b is visible iff j < context_lens[b] (and j > context_lens[b] - 1 - window). `num_splits` is
    accepted for signature parity and ignored.
    """
    del num_splits
    b, h, d = q.shape
    kvh = k_cache.shape[1]
    g = h // kvh
    s = block_tables.shape[1] * block_size
    kc = k_cache.view(-1, block_size, kvh, d)[block_tables].view(b, s, kvh, d).transpose(1, 2)
    vc = v_cache.view(-1, block_size, kvh, d)[block_tables].view(b, s, kvh, d).transpose(1, 2)
    keys = torch.arange(s, device=q.device)
    pos = context_lens.to(device=q.device, dtype=torch.long).view(b, 1) - 1
    mask = keys <= pos
    if window is not None:
        mask &= keys > pos - window
    out = F.scaled_dot_product_attention(
        q.reshape(b, kvh, g, d), kc.to(q.dtype), vc.to(q.dtype), attn_mask=mask[:, None, None, :], scale=scale
    )
    return out.reshape(b, h, d)


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    ctx_ptr,
    out_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    qk_scale,
    window,
    max_keys,
    stride_qb,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_btb,
    stride_ob,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    ctx = tl.minimum(tl.load(ctx_ptr + b).to(tl.int32), max_keys)
    lo = ctx * 0
    if HAS_WINDOW:
        lo = tl.maximum(ctx - window, 0)
    if NUM_SPLITS == 1:
        start = lo
        end = ctx
    else:
        per = tl.cdiv(tl.cdiv(ctx - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = lo + split * per
        end = tl.minimum(start + per, ctx)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gm = g < GROUP
    dm = d < HEAD_DIM
    heads = kvh * GROUP + g
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gm[:, None] & dm[None, :], other=0.0
    )

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    n = tl.arange(0, BLOCK_N)
    bt_row = bt_ptr + b * stride_btb
    k_head = k_ptr + kvh * stride_kh
    v_head = v_ptr + kvh * stride_vh
    for first in range(start, end, BLOCK_N):
        keys = first + n
        valid = keys < end
        blk = tl.load(bt_row + keys // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        slot = blk * BLOCK_SIZE + keys % BLOCK_SIZE
        kv_mask = valid[:, None] & dm[None, :]
        k = tl.load(k_head + slot[:, None] * stride_ks + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_head + slot[:, None] * stride_vs + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    rows = gm[:, None] & dm[None, :]
    if NUM_SPLITS == 1:
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]
        dst = out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=rows)
    else:
        part = (b * NUM_HEADS + heads) * NUM_SPLITS + split  # [BLOCK_G]
        tl.store(m_ptr + part, m_i, mask=gm)
        tl.store(l_ptr + part, l_i, mask=gm)
        tl.store(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=rows)


@triton.jit
def _merge_splits_kernel(
    m_ptr,
    l_ptr,
    acc_ptr,
    out_ptr,
    stride_ob,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    sm = s < NUM_SPLITS
    part = (b * NUM_HEADS + h) * NUM_SPLITS + s
    m = tl.load(m_ptr + part, mask=sm, other=float("-inf"))
    l = tl.load(l_ptr + part, mask=sm, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)  # 0 for empty splits
    total = tl.sum(w * l, axis=0)
    acc = tl.load(
        acc_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=sm[:, None] & (d < HEAD_DIM)[None, :], other=0.0
    )
    o = tl.sum(acc * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device, default: int = DEFAULT_SMS) -> int:
    """The device's SM count (cached per device); `default` where it cannot be asked (CPU, the interpreter)."""
    if device.type == "cuda" and not interpreting():
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return default


def paged_attention_config(head_dim: int, group: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch options of the main kernel (every tl.dot dimension >= 16)."""
    block_d = max(16, next_pow2(head_dim))
    return {
        "BLOCK_G": max(16, next_pow2(group)),
        "BLOCK_D": block_d,
        "BLOCK_N": 128 if block_d <= 64 else (64 if block_d <= 128 else 32),
        "DOT_PREC": "ieee" if dtype == torch.float32 else "tf32",
        "num_warps": 4 if block_d <= 128 else 8,
        "num_stages": 2,
    }


def choose_num_splits(batch: int, kv_heads: int, max_keys: int, block_n: int, sms: int) -> int:
    """Split-K factor from shapes alone: split only when B*KVH programs leave SMs idle and the context is long."""
    programs = batch * kv_heads
    if programs >= sms:
        return 1
    by_length = max_keys // MIN_KEYS_PER_SPLIT
    if by_length < 2:
        return 1
    return max(1, min(cdiv(2 * sms, programs), by_length, MAX_SPLITS, cdiv(max_keys, block_n)))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
    window: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Triton version of `paged_decode_attention_reference` -> [B, H, D] in q.dtype.

    q [B, H, D] (the new token of each sequence, whose K/V are already in the cache); k_cache/v_cache
    [num_blocks * block_size, KVH, D] in q.dtype; block_tables [B, NB] int (padded with any valid block, e.g. 0);
    context_lens [B] int32/int64, >= 1. `window`: key j visible iff j > context_len - 1 - window. `num_splits`: None
    picks split-K from shapes (`choose_num_splits`), 1 disables it, n > 1 forces n chunks.
    Grid (B, KVH, num_splits) [+ (B, H) for the merge]; no host syncs.
    """
    require_triton()
    b, h, d = q.shape
    kvh = k_cache.shape[1]
    if h % kvh:
        raise ValueError(f"paged_decode_attention: {h} query heads is not a multiple of {kvh} KV heads")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 3 or c.shape[1:] != (kvh, d) or c.stride(2) != 1 or c.shape[0] % block_size:
            raise ValueError(f"paged_decode_attention: {name} must be [num_blocks * {block_size}, {kvh}, {d}]")
        if c.dtype != q.dtype:
            raise ValueError(f"paged_decode_attention: {name} is {c.dtype}, q is {q.dtype}")
    if q.stride(2) != 1:
        q = q.contiguous()
    if block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    context_lens = context_lens.contiguous()  # indexed densely by the kernel
    group = h // kvh
    max_keys = block_tables.shape[1] * block_size
    cfg = paged_attention_config(d, group, q.dtype)
    visible = max_keys if window is None else min(max_keys, window)
    if num_splits is None:
        num_splits = choose_num_splits(b, kvh, visible, cfg["BLOCK_N"], num_sms(q.device))
    num_splits = max(1, int(num_splits))
    out = torch.empty((b, h, d), dtype=q.dtype, device=q.device)
    if b == 0:
        return out
    if num_splits > 1:
        m = torch.empty((b, h, num_splits), dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        acc = torch.empty((b, h, num_splits, d), dtype=torch.float32, device=q.device)
    else:
        m = l = acc = out  # unused
    _paged_decode_kernel[(b, kvh, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        m,
        l,
        acc,
        float(scale) * LOG2E,
        int(window) if window is not None else 0,
        max_keys,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        NUM_HEADS=h,
        GROUP=group,
        HEAD_DIM=d,
        BLOCK_SIZE=block_size,
        NUM_SPLITS=num_splits,
        HAS_WINDOW=window is not None,
        **cfg,
    )
    if num_splits > 1:
        merge_splits(m, l, acc, out)
    return out


def merge_splits(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor, out: torch.Tensor) -> None:
    """Combine split-K partials m / l [R, H, splits] and acc [R, H, splits, D] (float32, contiguous) into out
    [R, H, D] (last stride 1) in a fixed order: `_merge_splits_kernel`, grid (R, H)."""
    r, h, d = out.shape
    num_splits = m.shape[-1]
    _merge_splits_kernel[(r, h)](
        m,
        l,
        acc,
        out,
        out.stride(0),
        out.stride(1),
        NUM_HEADS=h,
        HEAD_DIM=d,
        NUM_SPLITS=num_splits,
        BLOCK_S=next_pow2(num_splits),
        BLOCK_D=max(16, next_pow2(d)),
        num_warps=2,
    )
