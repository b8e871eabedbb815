"""RoPE on q and k straight out of the fused qkv projection, with k and v written into the paged KV cache.

One launch replaces the split/view, two rotations (about ten elementwise ops each), two dtype casts and two
`index_copy_` calls of the eager path. One program per token handles all its heads; cos/sin rows are read once.
"""

from __future__ import annotations

import torch

from reldl.kernels._triton import next_pow2, require_triton, tl, triton

MAX_TILE = 4096  # heads x (head_dim / 2) elements per tile


def _rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, D] rotated by cos/sin [N, D/2] (Hugging Face half-split convention), fp32 math, x.dtype out."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def rope_and_cache_reference(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> torch.Tensor:
    """qkv [N, (H + 2*KVH) * D] -> rotated q [N, H, D]; rotated k and raw v written to the caches at `slots`."""
    n = qkv.shape[0]
    h, kvh, d = num_heads, num_kv_heads, head_dim
    positions, slots = positions.reshape(-1), slots.reshape(-1)
    q, k, v = qkv.reshape(n, -1).split([h * d, kvh * d, kvh * d], dim=-1)
    c, s = cos[positions].float(), sin[positions].float()
    q = _rotate_reference(q.reshape(n, h, d), c, s)
    k = _rotate_reference(k.reshape(n, kvh, d), c, s)
    k_cache.index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.index_copy_(0, slots, v.reshape(n, kvh, d).to(v_cache.dtype))
    return q.contiguous()


@triton.jit
def _rope_cache_kernel(
    qkv_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    q_ptr,
    stride_qkv,
    stride_cos,
    stride_sin,
    stride_kc_s,
    stride_kc_h,
    stride_vc_s,
    stride_vc_h,
    stride_q_n,
    stride_q_h,
    NUM_HEADS: tl.constexpr,
    NUM_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    jm = j < HALF
    cos = tl.load(cos_ptr + pos * stride_cos + j, mask=jm, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + pos * stride_sin + j, mask=jm, other=0.0).to(tl.float32)[None, :]
    row = qkv_ptr + tok * stride_qkv

    # q heads -> q_out
    for h0 in tl.static_range(0, NUM_HEADS, BLOCK_HQ):
        h = h0 + tl.arange(0, BLOCK_HQ)
        m = (h < NUM_HEADS)[:, None] & jm[None, :]
        src = row + h[:, None] * HEAD_DIM + j[None, :]
        x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
        dst = q_ptr + tok * stride_q_n + h[:, None] * stride_q_h + j[None, :]
        tl.store(dst, (x1 * cos - x2 * sin).to(q_ptr.dtype.element_ty), mask=m)
        tl.store(dst + HALF, (x2 * cos + x1 * sin).to(q_ptr.dtype.element_ty), mask=m)

    # k heads -> k_cache[slot] (rounded to the input dtype first, as the eager path does)
    k_row = row + NUM_HEADS * HEAD_DIM
    for h0 in tl.static_range(0, NUM_KV, BLOCK_HKV):
        h = h0 + tl.arange(0, BLOCK_HKV)
        m = (h < NUM_KV)[:, None] & jm[None, :]
        src = k_row + h[:, None] * HEAD_DIM + j[None, :]
        x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
        o1 = (x1 * cos - x2 * sin).to(qkv_ptr.dtype.element_ty).to(kc_ptr.dtype.element_ty)
        o2 = (x2 * cos + x1 * sin).to(qkv_ptr.dtype.element_ty).to(kc_ptr.dtype.element_ty)
        dst = kc_ptr + slot * stride_kc_s + h[:, None] * stride_kc_h + j[None, :]
        tl.store(dst, o1, mask=m)
        tl.store(dst + HALF, o2, mask=m)

    # v heads -> v_cache[slot], unchanged
    v_row = row + (NUM_HEADS + NUM_KV) * HEAD_DIM
    d = tl.arange(0, BLOCK_D)
    for h0 in tl.static_range(0, NUM_KV, BLOCK_HKV):
        h = h0 + tl.arange(0, BLOCK_HKV)
        m = (h < NUM_KV)[:, None] & (d < HEAD_DIM)[None, :]
        v = tl.load(v_row + h[:, None] * HEAD_DIM + d[None, :], mask=m, other=0.0)
        dst = vc_ptr + slot * stride_vc_s + h[:, None] * stride_vc_h + d[None, :]
        tl.store(dst, v.to(vc_ptr.dtype.element_ty), mask=m)


def rope_cache_config(num_heads: int, num_kv_heads: int, head_dim: int) -> dict[str, int]:
    half = next_pow2(head_dim // 2)
    cap = max(1, MAX_TILE // half)
    return {
        "BLOCK_HALF": half,
        "BLOCK_HQ": min(next_pow2(num_heads), cap),
        "BLOCK_HKV": min(next_pow2(num_kv_heads), cap),
        "BLOCK_D": next_pow2(head_dim),
        "num_warps": 4 if num_heads * head_dim >= 2048 else 2,
    }


def _check_cache(name: str, cache: torch.Tensor, kvh: int, d: int) -> None:
    if cache.dim() != 3 or cache.shape[1:] != (kvh, d) or cache.stride(2) != 1:
        raise ValueError(f"rope_and_cache: {name} must be [num_slots, {kvh}, {d}] with contiguous rows")


def rope_and_cache(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> torch.Tensor:
    """Triton version of `rope_and_cache_reference`: one launch, grid (N,). No host syncs.

    Slots are not checked (that would need a sync): every slot must be < k_cache.shape[0]; padding rows use slot 0.
    """
    require_triton()
    h, kvh, d = num_heads, num_kv_heads, head_dim
    if d % 2:
        raise ValueError(f"rope_and_cache: head_dim {d} is odd")
    n = qkv.shape[0]
    qkv2 = qkv.reshape(n, -1)
    if qkv2.shape[1] != (h + 2 * kvh) * d:
        raise ValueError(f"rope_and_cache: qkv has {qkv2.shape[1]} columns, expected {(h + 2 * kvh) * d}")
    if qkv2.stride(-1) != 1:
        qkv2 = qkv2.contiguous()
    _check_cache("k_cache", k_cache, kvh, d)
    _check_cache("v_cache", v_cache, kvh, d)
    if cos.shape[-1] != d // 2 or sin.shape[-1] != d // 2:
        raise ValueError(f"rope_and_cache: cos/sin must have {d // 2} columns")
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    positions = positions.reshape(-1).contiguous()  # the kernel indexes them densely; views of [B, 1] may stride
    slots = slots.reshape(-1).contiguous()
    q = torch.empty((n, h, d), dtype=qkv.dtype, device=qkv.device)
    if n > 0:
        _rope_cache_kernel[(n,)](
            qkv2,
            positions,
            cos,
            sin,
            k_cache,
            v_cache,
            slots,
            q,
            qkv2.stride(0),
            cos.stride(0),
            sin.stride(0),
            k_cache.stride(0),
            k_cache.stride(1),
            v_cache.stride(0),
            v_cache.stride(1),
            q.stride(0),
            q.stride(1),
            NUM_HEADS=h,
            NUM_KV=kvh,
            HEAD_DIM=d,
            **rope_cache_config(h, kvh, d),
        )
    return q
