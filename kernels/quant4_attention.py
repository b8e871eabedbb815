"""Decode attention over a 4-bit K/V cache (the quant4 KV format), dequantizing K and V tiles in registers.

Layout (the offloaded executor's compressed cache, reldl/llm/offload/executor.py): K and V are `Quantized4` with
packed [S, B*h, G*32] (or [S, B, h, G*32]) uint8 and scale / minv [S, B*h, G] (or [S, B, h, G]): S cached tokens
(slots), B sequences, h KV heads, head_dim quantized in groups of 64 (quant4.py: byte j of group g holds element
g*64 + j in its low nibble and g*64 + 32 + j in its high nibble). Optionally the current step's exact K/V rows
`k_new` / `v_new` [T, B, h, D] come after the S cached keys (FlexGen attends the new tokens at full precision), and
`mask` [B, T, S + T] (bool, True = visible) masks keys per sequence and query token (left padding, causality).
Queries q [B, T, h*g, D] (T = 1 for decode, a few for short multi-token steps), output [B, T, h*g, D] in q.dtype.

`quant4_decode_attention` (Triton): one program per (sequence, KV head, row block, split). The row block packs the
T * g query rows of one KV head (GQA group x query tokens, padded to >= 16 rows for `tl.dot`), so each cached byte
is read once per step. Per tile of BLOCK_N keys the program loads the packed bytes [BLOCK_N, G*32] and the
per-group scale / minv, forms the low-nibble and high-nibble halves (`(p & 15) * scale + minv`, `(p >> 4) * ...`,
float32, then q's dtype) and runs two `tl.dot`s against q split the same way (q_lo = the columns g*64 + j,
q_hi = g*64 + 32 + j): no interleaving, no full-precision K/V outside registers. Online softmax in float32 (exp2),
masked tiles safe (a fully masked row keeps max -inf and contributes nothing). The exact new rows are one extra
tile, handled by the last split.

Split-K as in paged_attention.py: when B * h programs cannot fill the GPU and S is long, the cached keys are cut
into `num_splits` chunks (multiples of BLOCK_N); each program writes float32 partials (max, sum, acc) that
paged_attention's merge kernel combines in a fixed order (deterministic, no atomics). S and the mask strides are
runtime arguments that are not specialized, so a growing context does not recompile; the automatic split count
follows S, so a caller whose context grows step by step (the offloaded executor) passes `num_splits` from
`decode_splits` once for the whole generation (an explicit count is used as given: splits past the keys are empty).

`quant4_decode_attention_reference`: dequantize (in q.dtype, as the executor's eager path does) then SDPA, same
signature. `quantize_kv_4bit_into(x [T, B*h, D], cache, start)`: quantize new rows straight into cache rows
[start, start + T) (quant4's kernel writing into the cache's buffers: no temporary `Quantized4`, no copies).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reldl.kernels._triton import cdiv, next_pow2, tl, triton, triton_available
from reldl.kernels.paged_attention import LOG2E, choose_num_splits, merge_splits, num_sms
from reldl.kernels.quant4 import (
    GROUP,
    HALF,
    Quantized4,
    _quantize_rows,
    dequantize_4bit,
    quantize_kv_4bit_reference,
)

MAX_BLOCK_M = 64  # query rows (T * g) per program; more rows take several row blocks


def _cache4(c: Quantized4, b: int, name: str) -> Quantized4:
    """The cache as 4-D views [S, B, h, ...] (accepts [S, B*h, ...] and [S, B, h, ...])."""
    p, s, m = c.packed, c.scale, c.minv
    if p.dim() == 3:
        if p.shape[1] % b:
            raise ValueError(f"quant4_decode_attention: {name} has {p.shape[1]} rows per slot, not a multiple of B={b}")
        h = p.shape[1] // b
        p, s, m = (t.reshape(t.shape[0], b, h, t.shape[2]) for t in (p, s, m))
    elif p.dim() != 4 or p.shape[1] != b:
        raise ValueError(f"quant4_decode_attention: {name}.packed must be [S, B*h, G*32] or [S, B, h, G*32]")
    g = cdiv(c.k, GROUP)
    if p.shape[-1] != g * HALF or s.shape != p.shape[:-1] + (g,) or m.shape != s.shape:
        raise ValueError(f"quant4_decode_attention: {name} is not a quant4 KV cache of head_dim {c.k}")
    return Quantized4(p, s, m, c.k)


def _check(q, kc, vc, k_new, v_new, mask):
    if q.dim() != 4:
        raise ValueError(f"quant4_decode_attention: q must be [B, T, H, D], got {tuple(q.shape)}")
    b, t, hq, d = q.shape
    kc, vc = _cache4(kc, b, "k_cache"), _cache4(vc, b, "v_cache")
    if kc.k != d or vc.k != d or kc.packed.shape != vc.packed.shape:
        raise ValueError("quant4_decode_attention: k_cache / v_cache do not match q's head_dim or each other")
    s, h = kc.packed.shape[0], kc.packed.shape[2]
    if h == 0 or hq % h:
        raise ValueError(f"quant4_decode_attention: {hq} query heads is not a multiple of {h} KV heads")
    if (k_new is None) != (v_new is None):
        raise ValueError("quant4_decode_attention: pass both k_new and v_new or neither")
    tn = 0
    if k_new is not None:
        tn = k_new.shape[0]
        for name, x in (("k_new", k_new), ("v_new", v_new)):
            if x.dim() != 4 or tuple(x.shape[1:]) != (b, h, d) or x.shape[0] != tn:
                raise ValueError(f"quant4_decode_attention: {name} must be [T, {b}, {h}, {d}], got {tuple(x.shape)}")
    if mask is not None and tuple(mask.shape) != (b, t, s + tn):
        raise ValueError(f"quant4_decode_attention: mask must be [{b}, {t}, {s + tn}], got {tuple(mask.shape)}")
    return kc, vc, s, h, tn


def quant4_decode_attention_reference(
    q: torch.Tensor,
    k_cache: Quantized4,
    v_cache: Quantized4,
    scale: float,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Dequantize the cache into q.dtype, append k_new / v_new, SDPA in q.dtype -> [B, T, H, D] (see the module
    docstring for the shapes). `num_splits` is accepted for signature parity and ignored."""
    del num_splits
    kc, vc, s, h, _ = _check(q, k_cache, v_cache, k_new, v_new, mask)
    b, t, hq, d = q.shape
    g = hq // h
    keys, vals = dequantize_4bit(kc, q.dtype), dequantize_4bit(vc, q.dtype)  # [S, B, h, D]
    if k_new is not None:
        keys = torch.cat([keys, k_new.to(q.dtype)])
        vals = torch.cat([vals, v_new.to(q.dtype)])
    qg = q.reshape(b, t, h, g, d).permute(0, 2, 1, 3, 4).reshape(b, h, t * g, d)
    kk, vv = keys.permute(1, 2, 0, 3), vals.permute(1, 2, 0, 3)
    m = None
    if mask is not None:
        m = (mask.repeat_interleave(g, dim=1) if g > 1 else mask).unsqueeze(1).to(torch.bool)
    out = F.scaled_dot_product_attention(qg, kk, vv, attn_mask=m, scale=scale)
    return out.view(b, h, t, g, d).permute(0, 2, 1, 3, 4).reshape(b, t, hq, d)


@triton.jit
def _split_keys(S, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Cached keys [start, end) of split `split` (chunks of whole BLOCK_N tiles; the last may be short or empty)."""
    if NUM_SPLITS == 1:
        start = S * 0
        end = S
    else:
        per = tl.cdiv(tl.cdiv(S, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = split * per
        end = tl.minimum(start + per, S)
    return start, end


@triton.jit
def _head_ptrs(kp_ptr, vp_ptr, ks_ptr, km_ptr, vs_ptr, vm_ptr, b, kvh, stride_pb, stride_ph, stride_sb, stride_sh):
    """The packed bytes, scales and minimums of K and V for sequence b, KV head kvh."""
    p = b * stride_pb + kvh * stride_ph
    q = b * stride_sb + kvh * stride_sh
    return kp_ptr + p, vp_ptr + p, ks_ptr + q, km_ptr + q, vs_ptr + q, vm_ptr + q


@triton.jit
def _online_update(sc, m_i, l_i, acc_lo, acc_hi, v_lo, v_hi, DOT_PREC: tl.constexpr):
    """One tile of (already scaled, masked with -inf) scores [M, N] into the running (max, sum, acc)."""
    m_new = tl.maximum(m_i, tl.max(sc, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(sc - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    pv = p.to(v_lo.dtype)
    acc_lo = acc_lo * alpha[:, None] + tl.dot(pv, v_lo, input_precision=DOT_PREC)
    acc_hi = acc_hi * alpha[:, None] + tl.dot(pv, v_hi, input_precision=DOT_PREC)
    return m_new, l_i, acc_lo, acc_hi


# S and the mask's batch and token strides (the mask is [B, T, S + T], rebuilt every step) change with every decode
# step: not specialized, so a step whose S happens to be a multiple of 16 does not compile another kernel (1.6-1.8 s
# stalls at full depth on the H100, two kernels per head segment)
_PER_STEP = ["S", "stride_mb", "stride_mt"]


@triton.jit(do_not_specialize=_PER_STEP)
def _quant4_decode_kernel(
    q_ptr,
    kp_ptr,
    ks_ptr,
    km_ptr,
    vp_ptr,
    vs_ptr,
    vm_ptr,
    kn_ptr,
    vn_ptr,
    mask_ptr,
    out_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    qk_scale,
    S,
    T,
    TN,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_ps,
    stride_pb,
    stride_ph,
    stride_ss,
    stride_sb,
    stride_sh,
    stride_ns,
    stride_nb,
    stride_nh,
    stride_mb,
    stride_mt,
    stride_mk,
    stride_ob,
    stride_ot,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NBYTES: tl.constexpr,
    ROW_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HAS_NEW: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = (tl.program_id(1) // ROW_BLOCKS).to(tl.int64)
    rb = tl.program_id(1) % ROW_BLOCKS
    split = tl.program_id(2)

    start, end = _split_keys(S, split, NUM_SPLITS, BLOCK_N)

    # query rows: r = t * GROUP + (head within the GQA group)
    r = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = r < T * GROUP
    t = (r // GROUP).to(tl.int64)
    head = kvh * GROUP + (r % GROUP)
    # packed byte c <-> columns (c // 32) * 64 + c % 32 (low nibble) and that + 32 (high nibble)
    c = tl.arange(0, BLOCK_C)
    cm = c < NBYTES
    grp = c // 32
    col_lo = grp * 64 + c % 32
    col_hi = col_lo + 32
    lo_m = cm & (col_lo < HEAD_DIM)
    hi_m = cm & (col_hi < HEAD_DIM)

    q_rows = q_ptr + b * stride_qb + t[:, None] * stride_qt + head[:, None] * stride_qh
    q_lo = tl.load(q_rows + col_lo[None, :], mask=rm[:, None] & lo_m[None, :], other=0.0)
    q_hi = tl.load(q_rows + col_hi[None, :], mask=rm[:, None] & hi_m[None, :], other=0.0)
    qdt = q_lo.dtype

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_lo = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)

    n = tl.arange(0, BLOCK_N)
    kp_head, vp_head, ks_head, km_head, vs_head, vm_head = _head_ptrs(
        kp_ptr, vp_ptr, ks_ptr, km_ptr, vs_ptr, vm_ptr, b, kvh, stride_pb, stride_ph, stride_sb, stride_sh
    )
    mask_rows = mask_ptr + b * stride_mb + t[:, None] * stride_mt
    for first in range(start, end, BLOCK_N):
        keys = first + n
        valid = keys < end
        kk = keys.to(tl.int64)
        tm = valid[:, None] & cm[None, :]
        p_off = kk[:, None] * stride_ps + c[None, :]
        s_off = kk[:, None] * stride_ss + grp[None, :]
        p = tl.load(kp_head + p_off, mask=tm, other=0).to(tl.int32)
        sc = tl.load(ks_head + s_off, mask=tm, other=0.0).to(tl.float32)
        mv = tl.load(km_head + s_off, mask=tm, other=0.0).to(tl.float32)
        k_lo = ((p & 15).to(tl.float32) * sc + mv).to(qdt)
        k_hi = ((p >> 4).to(tl.float32) * sc + mv).to(qdt)
        s = tl.dot(q_lo, tl.trans(k_lo), input_precision=DOT_PREC)
        s = tl.dot(q_hi, tl.trans(k_hi), s, input_precision=DOT_PREC) * qk_scale
        vis = rm[:, None] & valid[None, :]
        if HAS_MASK:
            vis = vis & (tl.load(mask_rows + kk[None, :] * stride_mk, mask=vis, other=0) != 0)
        s = tl.where(vis, s, float("-inf"))
        p = tl.load(vp_head + p_off, mask=tm, other=0).to(tl.int32)
        sc = tl.load(vs_head + s_off, mask=tm, other=0.0).to(tl.float32)
        mv = tl.load(vm_head + s_off, mask=tm, other=0.0).to(tl.float32)
        v_lo = ((p & 15).to(tl.float32) * sc + mv).to(qdt)
        v_hi = ((p >> 4).to(tl.float32) * sc + mv).to(qdt)
        m_i, l_i, acc_lo, acc_hi = _online_update(s, m_i, l_i, acc_lo, acc_hi, v_lo, v_hi, DOT_PREC)

    if HAS_NEW:  # the exact new rows: one tile, in the last split only
        j = tl.arange(0, BLOCK_T)
        jv = (j < TN) & (split + j * 0 == NUM_SPLITS - 1)  # (scalar & vector: bad mask dtype in the interpreter)
        jj = j.to(tl.int64)
        n_off = jj[:, None] * stride_ns + b * stride_nb + kvh * stride_nh
        k_lo = tl.load(kn_ptr + n_off + col_lo[None, :], mask=jv[:, None] & lo_m[None, :], other=0.0).to(qdt)
        k_hi = tl.load(kn_ptr + n_off + col_hi[None, :], mask=jv[:, None] & hi_m[None, :], other=0.0).to(qdt)
        s = tl.dot(q_lo, tl.trans(k_lo), input_precision=DOT_PREC)
        s = tl.dot(q_hi, tl.trans(k_hi), s, input_precision=DOT_PREC) * qk_scale
        vis = rm[:, None] & jv[None, :]
        if HAS_MASK:
            vis = vis & (tl.load(mask_rows + (S + jj)[None, :] * stride_mk, mask=vis, other=0) != 0)
        s = tl.where(vis, s, float("-inf"))
        v_lo = tl.load(vn_ptr + n_off + col_lo[None, :], mask=jv[:, None] & lo_m[None, :], other=0.0).to(qdt)
        v_hi = tl.load(vn_ptr + n_off + col_hi[None, :], mask=jv[:, None] & hi_m[None, :], other=0.0).to(qdt)
        m_i, l_i, acc_lo, acc_hi = _online_update(s, m_i, l_i, acc_lo, acc_hi, v_lo, v_hi, DOT_PREC)

    st_lo = rm[:, None] & lo_m[None, :]
    st_hi = rm[:, None] & hi_m[None, :]
    if NUM_SPLITS == 1:
        inv = 1.0 / tl.where(l_i > 0, l_i, 1.0)
        dst = out_ptr + b * stride_ob + t[:, None] * stride_ot + head[:, None] * stride_oh
        ty = out_ptr.dtype.element_ty
        tl.store(dst + col_lo[None, :], (acc_lo * inv[:, None]).to(ty), mask=st_lo)
        tl.store(dst + col_hi[None, :], (acc_hi * inv[:, None]).to(ty), mask=st_hi)
    else:
        part = ((b * T + t) * NUM_HEADS + head) * NUM_SPLITS + split  # [BLOCK_M]
        tl.store(m_ptr + part, m_i, mask=rm)
        tl.store(l_ptr + part, l_i, mask=rm)
        tl.store(acc_ptr + part[:, None] * HEAD_DIM + col_lo[None, :], acc_lo, mask=st_lo)
        tl.store(acc_ptr + part[:, None] * HEAD_DIM + col_hi[None, :], acc_hi, mask=st_hi)


@triton.jit(do_not_specialize=["S", "stride_mb"])
def _quant4_decode_gemv_kernel(
    q_ptr,
    kp_ptr,
    ks_ptr,
    km_ptr,
    vp_ptr,
    vs_ptr,
    vm_ptr,
    kn_ptr,
    vn_ptr,
    mask_ptr,
    out_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    qk_scale,
    S,
    TN,
    stride_qb,
    stride_qh,
    stride_ps,
    stride_pb,
    stride_ph,
    stride_ss,
    stride_sb,
    stride_sh,
    stride_ns,
    stride_nb,
    stride_nh,
    stride_mb,
    stride_mk,
    stride_ob,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NG: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HAS_NEW: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """One query row per KV head (T * g == 1: decode of a multi-head-attention model such as OPT): scores and the
    weighted sum as float32 multiply-adds over [BLOCK_N keys, groups, 32 bytes] tiles, no tl.dot (which would pad
    the single row to 16). Same layout, masks, new rows and split-K partials as `_quant4_decode_kernel`."""
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    start, end = _split_keys(S, split, NUM_SPLITS, BLOCK_N)
    gi = tl.arange(0, BLOCK_G)
    j = tl.arange(0, 32)
    gm = gi < NG
    byte = gi[:, None] * 32 + j[None, :]  # [BLOCK_G, 32]: packed byte -> columns (lo) and + 32 (hi)
    col_lo = gi[:, None] * 64 + j[None, :]
    col_hi = col_lo + 32
    lo_m = gm[:, None] & (col_lo < HEAD_DIM)
    hi_m = gm[:, None] & (col_hi < HEAD_DIM)
    q_row = q_ptr + b * stride_qb + head * stride_qh
    q_lo = tl.load(q_row + col_lo, mask=lo_m, other=0.0).to(tl.float32) * qk_scale
    q_hi = tl.load(q_row + col_hi, mask=hi_m, other=0.0).to(tl.float32) * qk_scale

    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), dtype=tl.float32), axis=0)  # float32 scalars
    l_i = tl.sum(tl.zeros([BLOCK_N], dtype=tl.float32), axis=0)
    acc_lo = tl.zeros([BLOCK_G, 32], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK_G, 32], dtype=tl.float32)
    n = tl.arange(0, BLOCK_N)
    kp_head, vp_head, ks_head, km_head, vs_head, vm_head = _head_ptrs(
        kp_ptr, vp_ptr, ks_ptr, km_ptr, vs_ptr, vm_ptr, b, head, stride_pb, stride_ph, stride_sb, stride_sh
    )
    mask_row = mask_ptr + b * stride_mb
    for first in range(start, end, BLOCK_N):
        keys = first + n
        valid = keys < end
        kk = keys.to(tl.int64)
        p_off = kk[:, None, None] * stride_ps + byte[None, :, :]
        pm = valid[:, None, None] & gm[None, :, None]
        s_off = kk[:, None] * stride_ss + gi[None, :]
        sm = valid[:, None] & gm[None, :]
        p = tl.load(kp_head + p_off, mask=pm, other=0).to(tl.int32)
        sc = tl.load(ks_head + s_off, mask=sm, other=0.0).to(tl.float32)[:, :, None]
        mv = tl.load(km_head + s_off, mask=sm, other=0.0).to(tl.float32)[:, :, None]
        s = tl.sum(((p & 15).to(tl.float32) * sc + mv) * q_lo[None, :, :], axis=2)
        s += tl.sum(((p >> 4).to(tl.float32) * sc + mv) * q_hi[None, :, :], axis=2)
        s = tl.sum(s, axis=1)  # [BLOCK_N]
        vis = valid
        if HAS_MASK:
            vis = vis & (tl.load(mask_row + kk * stride_mk, mask=valid, other=0) != 0)
        s = tl.where(vis, s, float("-inf"))
        p = tl.load(vp_head + p_off, mask=pm, other=0).to(tl.int32)
        sc = tl.load(vs_head + s_off, mask=sm, other=0.0).to(tl.float32)[:, :, None]
        mv = tl.load(vm_head + s_off, mask=sm, other=0.0).to(tl.float32)[:, :, None]
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        w = tl.exp2(s - m_use)[:, None, None]
        l_i = l_i * alpha + tl.sum(tl.sum(tl.sum(w, axis=2), axis=1), axis=0)
        acc_lo = acc_lo * alpha + tl.sum(w * ((p & 15).to(tl.float32) * sc + mv), axis=0)
        acc_hi = acc_hi * alpha + tl.sum(w * ((p >> 4).to(tl.float32) * sc + mv), axis=0)
        m_i = m_new

    if HAS_NEW:  # the exact new rows: one tile, in the last split only
        t = tl.arange(0, BLOCK_T)
        tv = (t < TN) & (split + t * 0 == NUM_SPLITS - 1)
        n_row = kn_ptr + t.to(tl.int64)[:, None, None] * stride_ns + b * stride_nb + head * stride_nh
        v_row = vn_ptr + t.to(tl.int64)[:, None, None] * stride_ns + b * stride_nb + head * stride_nh
        ml = tv[:, None, None] & lo_m[None, :, :]
        mh = tv[:, None, None] & hi_m[None, :, :]
        s = tl.sum(tl.load(n_row + col_lo[None, :, :], mask=ml, other=0.0).to(tl.float32) * q_lo[None, :, :], axis=2)
        s += tl.sum(tl.load(n_row + col_hi[None, :, :], mask=mh, other=0.0).to(tl.float32) * q_hi[None, :, :], axis=2)
        s = tl.sum(s, axis=1)
        vis = tv
        if HAS_MASK:
            vis = vis & (tl.load(mask_row + (S + t.to(tl.int64)) * stride_mk, mask=tv, other=0) != 0)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        w = tl.exp2(s - m_use)[:, None, None]
        l_i = l_i * alpha + tl.sum(tl.sum(tl.sum(w, axis=2), axis=1), axis=0)
        v_lo = tl.load(v_row + col_lo[None, :, :], mask=ml, other=0.0).to(tl.float32)
        v_hi = tl.load(v_row + col_hi[None, :, :], mask=mh, other=0.0).to(tl.float32)
        acc_lo = acc_lo * alpha + tl.sum(w * v_lo, axis=0)
        acc_hi = acc_hi * alpha + tl.sum(w * v_hi, axis=0)
        m_i = m_new

    if NUM_SPLITS == 1:
        inv = 1.0 / tl.where(l_i > 0, l_i, 1.0)
        dst = out_ptr + b * stride_ob + head * stride_oh
        ty = out_ptr.dtype.element_ty
        tl.store(dst + col_lo, (acc_lo * inv).to(ty), mask=lo_m)
        tl.store(dst + col_hi, (acc_hi * inv).to(ty), mask=hi_m)
    else:
        part = (b * NUM_HEADS + head) * NUM_SPLITS + split
        tl.store(m_ptr + part, m_i)
        tl.store(l_ptr + part, l_i)
        tl.store(acc_ptr + part * HEAD_DIM + col_lo, acc_lo, mask=lo_m)
        tl.store(acc_ptr + part * HEAD_DIM + col_hi, acc_hi, mask=hi_m)


# one query row per KV head (T * g == 1) takes `_quant4_decode_gemv_kernel` (GEMV; False: the tl.dot kernel). H100,
# OPT-30B heads (results/2026-11-28-quant4-attention-h100.json): batch 96 x 530 keys 3.82 ms (tl.dot) -> 0.50 ms,
# 96 x 2048 14.2 -> 1.84 ms, with 16-key tiles and 2 warps (the best of 16/32/64 keys x 2/4 warps at every shape)
GEMV = True
GEMV_CONFIG = {"BLOCK_N": 16, "num_warps": 2, "num_stages": 2}


def quant4_attention_config(head_dim: int, rows: int, dtype: torch.dtype) -> dict:
    """Tile sizes (every tl.dot dimension >= 16) from head_dim and the query rows per KV head (T * g)."""
    nbytes = cdiv(head_dim, GROUP) * HALF
    block_c = max(32, next_pow2(nbytes))
    return {
        "BLOCK_M": min(MAX_BLOCK_M, max(16, next_pow2(rows))),
        "BLOCK_C": block_c,
        "BLOCK_N": max(16, 2048 // block_c),  # [BLOCK_N, BLOCK_C] byte tiles of 2048 (registers: 5 such tiles live)
        "DOT_PREC": "ieee" if dtype == torch.float32 else "tf32",
        "num_warps": 4,
        "num_stages": 2,
    }


def _split_tiles(rows: int, head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(keys per tile, row blocks per KV head) of the kernel that serves `rows` = T * g query rows per KV head."""
    if GEMV and rows == 1:
        return GEMV_CONFIG["BLOCK_N"], 1
    cfg = quant4_attention_config(head_dim, rows, dtype)
    return cfg["BLOCK_N"], cdiv(rows, cfg["BLOCK_M"])


def _split_count(num_splits: int | None, batch: int, programs: int, keys: int, block_n: int, device) -> int:
    """An explicit split count as given (at least 1); None: split-K from shapes (`programs` per sequence), at most
    one split per tile of keys."""
    if num_splits is None:
        return max(1, min(choose_num_splits(batch, programs, keys, block_n, num_sms(device)), cdiv(keys, block_n)))
    return max(1, int(num_splits))


def _split_partials(out: torch.Tensor, num_splits: int):
    """float32 (max, sum, acc) partials for out [B, T, H, D] over num_splits splits (unused `out` for one split)."""
    if num_splits == 1:
        return out, out, out
    b, t, hq, d = out.shape
    m = torch.empty((b, t, hq, num_splits), dtype=torch.float32, device=out.device)
    return m, torch.empty_like(m), torch.empty((b, t, hq, num_splits, d), dtype=torch.float32, device=out.device)


def _merge_partials(out: torch.Tensor, m: torch.Tensor, lsum: torch.Tensor, acc: torch.Tensor) -> None:
    b, t, hq, d = out.shape
    ns = m.shape[-1]
    merge_splits(m.view(b * t, hq, ns), lsum.view(b * t, hq, ns), acc, out.view(b * t, hq, d))


def decode_splits(batch: int, kv_heads: int, rows: int, head_dim: int, max_keys: int, device: torch.device) -> int:
    """The split count `quant4_decode_attention` would pick for `max_keys` cached keys (rows = T * g query rows per
    KV head): callers whose context grows pass it for every step, so one compiled kernel serves them all."""
    block_n, row_blocks = _split_tiles(rows, head_dim, torch.float16)
    return _split_count(None, batch, kv_heads * row_blocks, max_keys, block_n, device)


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.stride(-1) != 1 or b.stride() != a.stride():
        return a.contiguous(), b.contiguous()
    return a, b


def quant4_decode_attention(
    q: torch.Tensor,
    k_cache: Quantized4,
    v_cache: Quantized4,
    scale: float,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Triton version of `quant4_decode_attention_reference` -> [B, T, H, D] in q.dtype (module docstring).

    q [B, T, h*g, D] float16/bfloat16/float32 (any strides, last one 1 or copied); k_cache / v_cache `Quantized4`
    packed [S, B*h, G*32] or [S, B, h, G*32]; k_new / v_new [T', B, h, D] or None; mask [B, T, S + T'] bool or None
    (keys visible everywhere). `num_splits`: None picks split-K from shapes (S included), 1 disables it, n > 1
    forces n chunks (some empty when S is short).
    Grid (B, h * row blocks, splits) [+ (B*T, H) for the merge]; no host syncs. Falls back to the reference where
    Triton cannot run on q's device.
    """
    if not triton_available(q):
        return quant4_decode_attention_reference(q, k_cache, v_cache, scale, k_new, v_new, mask, num_splits)
    kc, vc, s, h, tn = _check(q, k_cache, v_cache, k_new, v_new, mask)
    b, t, hq, d = q.shape
    g = hq // h
    if q.stride(3) != 1:
        q = q.contiguous()
    kp, vp = _same_strides(kc.packed, vc.packed)
    ks, km = _same_strides(kc.scale, kc.minv)
    vs, vm = _same_strides(vc.scale, vc.minv)
    if vs.stride() != ks.stride():
        ks, km, vs, vm = (x.contiguous() for x in (ks, km, vs, vm))
    has_new = k_new is not None
    if has_new:
        k_new, v_new = _same_strides(k_new, v_new)
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # loaded as bytes (!= 0)
    out = torch.empty((b, t, hq, d), dtype=q.dtype, device=q.device)
    if b == 0 or t == 0:
        return out
    if GEMV and t * g == 1:
        return _gemv(q, kp, ks, km, vp, vs, vm, k_new, v_new, mask, out, scale, s, h, tn, num_splits)
    cfg = quant4_attention_config(d, t * g, q.dtype)
    row_blocks = cdiv(t * g, cfg["BLOCK_M"])
    num_splits = _split_count(num_splits, b, h * row_blocks, s, cfg["BLOCK_N"], q.device)
    m, lsum, acc = _split_partials(out, num_splits)
    kn = k_new if has_new else out
    vn = v_new if has_new else out
    nstr = k_new.stride()[:3] if has_new else (0, 0, 0)
    mk = mask if mask is not None else out
    mstr = mask.stride() if mask is not None else (0, 0, 0)
    _quant4_decode_kernel[(b, h * row_blocks, num_splits)](
        q,
        kp,
        ks,
        km,
        vp,
        vs,
        vm,
        kn,
        vn,
        mk,
        out,
        m,
        lsum,
        acc,
        float(scale) * LOG2E,
        s,
        t,
        tn,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        kp.stride(0),
        kp.stride(1),
        kp.stride(2),
        ks.stride(0),
        ks.stride(1),
        ks.stride(2),
        *nstr,
        *mstr,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        NUM_HEADS=hq,
        GROUP=g,
        HEAD_DIM=d,
        NBYTES=cdiv(d, GROUP) * HALF,
        ROW_BLOCKS=row_blocks,
        BLOCK_T=max(16, next_pow2(tn)),
        NUM_SPLITS=num_splits,
        HAS_NEW=has_new,
        HAS_MASK=mask is not None,
        **cfg,
    )
    if num_splits > 1:
        _merge_partials(out, m, lsum, acc)
    return out


def _gemv(q, kp, ks, km, vp, vs, vm, k_new, v_new, mask, out, scale, s, h, tn, num_splits) -> torch.Tensor:
    """`quant4_decode_attention` for T * g == 1 (checked and normalized by the caller): the GEMV kernel."""
    b, _, hq, d = q.shape
    cfg = dict(GEMV_CONFIG)
    num_splits = _split_count(num_splits, b, h, s, cfg["BLOCK_N"], q.device)
    m, lsum, acc = _split_partials(out, num_splits)
    has_new = k_new is not None
    ng = cdiv(d, GROUP)
    _quant4_decode_gemv_kernel[(b, h, num_splits)](
        q,
        kp,
        ks,
        km,
        vp,
        vs,
        vm,
        k_new if has_new else out,
        v_new if has_new else out,
        mask if mask is not None else out,
        out,
        m,
        lsum,
        acc,
        float(scale) * LOG2E,
        s,
        tn,
        q.stride(0),
        q.stride(2),
        kp.stride(0),
        kp.stride(1),
        kp.stride(2),
        ks.stride(0),
        ks.stride(1),
        ks.stride(2),
        *(k_new.stride()[:3] if has_new else (0, 0, 0)),
        mask.stride(0) if mask is not None else 0,
        mask.stride(2) if mask is not None else 0,
        out.stride(0),
        out.stride(2),
        NUM_HEADS=hq,
        HEAD_DIM=d,
        NG=ng,
        BLOCK_G=next_pow2(ng),
        BLOCK_T=max(2, next_pow2(tn)),
        NUM_SPLITS=num_splits,
        HAS_NEW=has_new,
        HAS_MASK=mask is not None,
        **cfg,
    )
    if num_splits > 1:
        _merge_partials(out, m, lsum, acc)
    return out


def quantize_kv_4bit_into_reference(x: torch.Tensor, cache: Quantized4, start: int) -> None:
    """Quantize x [T, R, D] (R = B*h rows per slot) and write it into cache rows [start, start + T) (cache packed
    [S, R, G*32], scale / minv [S, R, G]); returns nothing."""
    _check_into(x, cache, start)
    qx = quantize_kv_4bit_reference(x, cache.scale.dtype, check_finite=False)
    t = x.shape[0]
    for dst, src in ((cache.packed, qx.packed), (cache.scale, qx.scale), (cache.minv, qx.minv)):
        dst[start : start + t].copy_(src)


def _check_into(x: torch.Tensor, cache: Quantized4, start: int) -> None:
    if x.dim() != 3 or cache.packed.dim() != 3:
        raise ValueError("quantize_kv_4bit_into: x must be [T, R, D] and the cache packed [S, R, G*32]")
    if x.shape[1] != cache.packed.shape[1] or x.shape[2] != cache.k:
        raise ValueError(f"quantize_kv_4bit_into: x {tuple(x.shape)} does not fit the cache {cache}")
    if not 0 <= start <= cache.packed.shape[0] - x.shape[0]:
        raise ValueError(f"quantize_kv_4bit_into: rows [{start}, {start + x.shape[0]}) outside the cache")


def quantize_kv_4bit_into(x: torch.Tensor, cache: Quantized4, start: int) -> None:
    """Triton version of `quantize_kv_4bit_into_reference`: quant4's quantization kernel writes straight into the
    cache's buffers (same bytes as quantize_kv_4bit + copies). No NaN/inf check (no host sync)."""
    if not triton_available(x):
        return quantize_kv_4bit_into_reference(x, cache, start)
    _check_into(x, cache, start)
    t, r, d = x.shape
    if t * r == 0:
        return None
    packed = cache.packed[start : start + t]
    scale = cache.scale[start : start + t]
    minv = cache.minv[start : start + t]
    flat_ok = (
        packed.stride(2) == 1
        and packed.stride(0) == r * packed.stride(1)
        and scale.stride(2) == 1
        and scale.stride(0) == r * scale.stride(1)
        and minv.stride() == scale.stride()
    )
    if not flat_ok:
        return quantize_kv_4bit_into_reference(x, cache, start)  # odd strides: quantize then copy
    x2 = x.reshape(t * r, d)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    _quantize_rows(x2, packed, scale, minv, packed.stride(1), scale.stride(1))
    return None
