"""Group-wise asymmetric 4-bit quantization (FlexGen's format) and a GEMM that dequantizes inside its tiles.

Format (`Quantized4`), for a tensor [..., K] quantized along its last dimension in groups of GROUP = 64:

- `scale` [..., G] and `minv` [..., G], G = ceil(K / 64): per group, minv = min, scale = (max - min) / 15, stored in
  the input's dtype (or `scale_dtype`). Codes are computed against the *stored* (rounded) minv and scale, so
  dequantization is exactly `code * scale + minv` with the stored values.
- `packed` [..., G * 32] uint8: byte j of group g holds element g*64 + j in its low nibble and element g*64 + 32 + j
  in its high nibble (the two halves of a group, not neighbouring elements, share a byte: a kernel loads each half
  as one contiguous [*, 32] tile).
- code = clamp(floor((w - minv) / scale + 0.5), 0, 15), and 0 where scale == 0 (a constant group dequantizes to its
  value exactly). Round-trip error |w - dequant| <= scale / 2 per element (plus the rounding of the stored minv and
  scale where they are kept in 16 bits; exact bound in float32).
- K not a multiple of 64: the last group is padded. Its min/max cover the real elements only and the padding gets
  code 0; `dequantize_4bit` drops it and `matmul_4bit` masks it out (x has no columns there).

Non-finite input (NaN, inf) is rejected with a ValueError: it would poison a whole group's scale.

`matmul_4bit(x [..., K], q, bias=None) -> [..., N]` = x @ dequantize_4bit(q).T + bias, with q quantized from a weight
[N, K]. Full-precision weights never exist in memory, for any M: each kernel loads packed bytes and the group
scales/mins and dequantizes in registers.
- M = 1 (`_gemv_4bit_kernel`): [BLOCK_N rows, NG groups, 32 bytes] per step, float32 FMAs, K split over programs
  until the GPU is full (float32 partials summed in a fixed order by a second launch).
- M >= 2 (`_matmul_4bit_kernel`): the output tile is computed transposed (W_tile @ x_tile^T, "swap AB"), so the
  dequantized weight tile is the tl.dot's first operand and a small M is its (>= 16) second dimension; float32
  accumulation, tensor-core dots in x's dtype (codes 0..15 are exact in fp16/bf16). Tiles by M (decode 2..16, small
  batches up to 64, prefill above); K split over programs as for M = 1 where the output tiles would not fill the GPU.

`quantize_kv_4bit(x [T, H, D])` / `dequantize_kv_4bit`: the same format for K/V cache rows, groups of 64 along
head_dim (decode attention over this format with the dequantization fused: `quant4_attention.py`).
"""

from __future__ import annotations

import torch

from reldl.kernels._triton import cdiv, interpreting, tl, triton, triton_available
from reldl.kernels.paged_attention import num_sms

GROUP = 64
HALF = GROUP // 2
LEVELS = 15  # 4 bits: codes 0..15


class Quantized4:
    """A tensor [..., k] quantized along its last dimension (see the module docstring for the layout).

    (A plain class rather than a dataclass: kernels/ imports nothing but torch and triton.)
    """

    __slots__ = ("packed", "scale", "minv", "k")

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, minv: torch.Tensor, k: int):
        self.packed = packed  # [..., G * 32] uint8
        self.scale = scale  # [..., G]
        self.minv = minv  # [..., G]
        self.k = int(k)  # the original last dimension (<= G * 64)

    def __repr__(self) -> str:
        return f"Quantized4(shape={self.shape}, groups={self.groups}, scale_dtype={self.scale.dtype})"

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.packed.shape[:-1], self.k)

    @property
    def groups(self) -> int:
        return self.scale.shape[-1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.minv))

    def to(self, device) -> Quantized4:
        return Quantized4(self.packed.to(device), self.scale.to(device), self.minv.to(device), self.k)


def _check_input(w: torch.Tensor, name: str, check_finite: bool) -> None:
    if not w.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {w.dtype}")
    if w.dim() < 1 or w.shape[-1] == 0:
        raise ValueError(f"{name}: expected a tensor [..., K] with K >= 1, got {tuple(w.shape)}")
    if check_finite and not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name}: the input holds NaN or inf values, which cannot be quantized (a group's scale)")


def _storage_dtype(w: torch.Tensor, scale_dtype: torch.dtype | None) -> torch.dtype:
    return scale_dtype if scale_dtype is not None else w.dtype


def quantize_4bit_reference(
    w: torch.Tensor, scale_dtype: torch.dtype | None = None, check_finite: bool = True
) -> Quantized4:
    """PyTorch version of `quantize_4bit` (same codes, bit for bit, in float32 arithmetic)."""
    _check_input(w, "quantize_4bit", check_finite)
    sdt = _storage_dtype(w, scale_dtype)
    lead, k = tuple(w.shape[:-1]), w.shape[-1]
    g = cdiv(k, GROUP)
    wf = w.reshape(-1, k).float()
    pad = g * GROUP - k
    lo_fill = torch.nn.functional.pad(wf, (0, pad), value=float("inf")).view(-1, g, GROUP)
    hi_fill = torch.nn.functional.pad(wf, (0, pad), value=float("-inf")).view(-1, g, GROUP)
    mn = lo_fill.amin(dim=2).to(sdt).float()
    mx = hi_fill.amax(dim=2)
    scale = ((mx - mn) / LEVELS).to(sdt).float()
    wg = torch.nn.functional.pad(wf, (0, pad)).view(-1, g, GROUP)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.floor((wg - mn[..., None]) / safe[..., None] + 0.5).clamp_(0, LEVELS)
    codes = torch.where(scale[..., None] > 0, codes, torch.zeros_like(codes))
    if pad:
        codes.view(-1, g * GROUP)[:, k:] = 0
    codes = codes.to(torch.uint8)
    packed = codes[..., :HALF] | (codes[..., HALF:] << 4)
    return Quantized4(
        packed.reshape(*lead, g * HALF).to(w.device),
        scale.to(sdt).reshape(*lead, g),
        mn.to(sdt).reshape(*lead, g),
        k,
    )


def dequantize_4bit(q: Quantized4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., k] in `dtype`: code * scale + minv (computed in float32), the padding of the last group dropped."""
    lead = tuple(q.packed.shape[:-1])
    g = q.groups
    p = q.packed.reshape(-1, g, HALF)
    codes = torch.cat([p & 0xF, p >> 4], dim=2).float()  # [rows, g, 64]
    w = codes * q.scale.reshape(-1, g, 1).float() + q.minv.reshape(-1, g, 1).float()
    return w.reshape(-1, g * GROUP)[:, : q.k].reshape(*lead, q.k).to(dtype)


dequantize_4bit_reference = dequantize_4bit


@triton.jit
def _quantize_kernel(
    w_ptr,
    packed_ptr,
    scale_ptr,
    minv_ptr,
    rows,
    K,
    stride_w,
    stride_p,
    stride_s,
    BLOCK_R: tl.constexpr,
):
    pid_r = tl.program_id(0)
    g = tl.program_id(1)
    r = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rm = r < rows
    j = tl.arange(0, 32)
    c_lo = g * 64 + j
    c_hi = c_lo + 32
    m_lo = rm[:, None] & (c_lo < K)[None, :]
    m_hi = rm[:, None] & (c_hi < K)[None, :]
    base = w_ptr + r[:, None] * stride_w
    w_lo = tl.load(base + c_lo[None, :], mask=m_lo, other=0.0).to(tl.float32)
    w_hi = tl.load(base + c_hi[None, :], mask=m_hi, other=0.0).to(tl.float32)
    mn = tl.minimum(
        tl.min(tl.where(m_lo, w_lo, float("inf")), axis=1), tl.min(tl.where(m_hi, w_hi, float("inf")), axis=1)
    )
    mx = tl.maximum(
        tl.max(tl.where(m_lo, w_lo, float("-inf")), axis=1), tl.max(tl.where(m_hi, w_hi, float("-inf")), axis=1)
    )
    sdt = scale_ptr.dtype.element_ty
    mn = tl.where(rm, mn, 0.0).to(sdt).to(tl.float32)
    mx = tl.where(rm, mx, 0.0)
    scale = tl.math.div_rn(mx - mn, 15.0).to(sdt).to(tl.float32)
    pos = scale > 0
    safe = tl.where(pos, scale, 1.0)
    q_lo = tl.floor(tl.math.div_rn(w_lo - mn[:, None], safe[:, None]) + 0.5)
    q_hi = tl.floor(tl.math.div_rn(w_hi - mn[:, None], safe[:, None]) + 0.5)
    q_lo = tl.where(m_lo & pos[:, None], tl.minimum(tl.maximum(q_lo, 0.0), 15.0), 0.0)
    q_hi = tl.where(m_hi & pos[:, None], tl.minimum(tl.maximum(q_hi, 0.0), 15.0), 0.0)
    byte = q_lo.to(tl.int32) | (q_hi.to(tl.int32) << 4)
    tl.store(packed_ptr + r[:, None] * stride_p + (g * 32 + j)[None, :], byte.to(tl.uint8), mask=rm[:, None])
    tl.store(scale_ptr + r * stride_s + g, scale.to(sdt), mask=rm)
    tl.store(minv_ptr + r * stride_s + g, mn.to(sdt), mask=rm)


def quantize_4bit(w: torch.Tensor, scale_dtype: torch.dtype | None = None, check_finite: bool = True) -> Quantized4:
    """Quantize w [..., K] (a weight [N, K]: along the input dimension) in groups of 64 -> `Quantized4`.

    Triton on CUDA / in the interpreter, else `quantize_4bit_reference` (same codes). `scale_dtype`: dtype of the
    stored scale/minv (default: w's). `check_finite=False` skips the NaN/inf check (a host sync).
    """
    if not triton_available(w):
        return quantize_4bit_reference(w, scale_dtype, check_finite)
    _check_input(w, "quantize_4bit", check_finite)
    sdt = _storage_dtype(w, scale_dtype)
    lead, k = tuple(w.shape[:-1]), w.shape[-1]
    g = cdiv(k, GROUP)
    w2 = w.reshape(-1, k)
    if w2.stride(1) != 1:
        w2 = w2.contiguous()
    rows = w2.shape[0]
    packed = torch.empty((rows, g * HALF), dtype=torch.uint8, device=w.device)
    scale = torch.empty((rows, g), dtype=sdt, device=w.device)
    minv = torch.empty((rows, g), dtype=sdt, device=w.device)
    if rows:
        _quantize_rows(w2, packed, scale, minv, packed.stride(0), scale.stride(0))
    return Quantized4(packed.view(*lead, g * HALF), scale.view(*lead, g), minv.view(*lead, g), k)


def _quantize_rows(w2, packed, scale, minv, stride_p: int, stride_s: int) -> None:
    """`_quantize_kernel` over the rows of w2 [rows, K] (unit last stride): row r's bytes at packed + r * stride_p,
    its scale / minv at scale / minv + r * stride_s (the group count is scale's last dimension)."""
    rows, k = w2.shape
    block_r = 64 if interpreting() else 32
    _quantize_kernel[(cdiv(rows, block_r), scale.shape[-1])](
        w2, packed, scale, minv, rows, k, w2.stride(0), stride_p, stride_s, BLOCK_R=block_r
    )


def quantize_kv_4bit(x: torch.Tensor, scale_dtype: torch.dtype | None = None, check_finite: bool = True) -> Quantized4:
    """K or V rows [tokens, heads, head_dim] -> `Quantized4` with packed [T, H, G*32], scale/minv [T, H, G]:
    groups of 64 along head_dim (head_dim 80 or 96: one padded group after the first)."""
    if x.dim() != 3:
        raise ValueError(f"quantize_kv_4bit: expected [tokens, heads, head_dim], got {tuple(x.shape)}")
    return quantize_4bit(x, scale_dtype, check_finite)


def quantize_kv_4bit_reference(
    x: torch.Tensor, scale_dtype: torch.dtype | None = None, check_finite: bool = True
) -> Quantized4:
    if x.dim() != 3:
        raise ValueError(f"quantize_kv_4bit: expected [tokens, heads, head_dim], got {tuple(x.shape)}")
    return quantize_4bit_reference(x, scale_dtype, check_finite)


def dequantize_kv_4bit(q: Quantized4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[tokens, heads, head_dim] in `dtype`."""
    if q.packed.dim() != 3:
        raise ValueError(f"dequantize_kv_4bit: expected packed [tokens, heads, G*32], got {tuple(q.packed.shape)}")
    return dequantize_4bit(q, dtype)


def matmul_4bit_reference(x: torch.Tensor, q: Quantized4, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ dequantize_4bit(q).T (+ bias) -> [..., N] in x.dtype (computed in float32)."""
    _check_matmul(x, q, bias)
    out = x.float() @ dequantize_4bit(q).T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def _check_matmul(x: torch.Tensor, q: Quantized4, bias: torch.Tensor | None) -> None:
    if q.packed.dim() != 2:
        raise ValueError(f"matmul_4bit: q must be a quantized weight [N, K], got packed {tuple(q.packed.shape)}")
    if x.shape[-1] != q.k:
        raise ValueError(f"matmul_4bit: x has {x.shape[-1]} input features, the weight {q.k}")
    n = q.packed.shape[0]
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"matmul_4bit: bias must be [{n}], got {tuple(bias.shape)}")


@triton.jit
def _gemv_4bit_kernel(
    x_ptr,
    packed_ptr,
    scale_ptr,
    minv_ptr,
    bias_ptr,
    out_ptr,
    N,
    K,
    G,
    groups_per_split,
    stride_pn,
    stride_sn,
    stride_os,
    HAS_BIAS: tl.constexpr,
    DIRECT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NG: tl.constexpr,
):
    """M = 1: out[n] = sum_k x[k] * (code[n, k] * scale + minv), a [BLOCK_N, NG groups, 32] tile of bytes per step
    (NG * 32 bytes of every weight row), float32 fused multiply-adds into a 3-D accumulator reduced once at the end.
    Program (c, s) takes rows block c and groups [s * groups_per_split, ...): with several splits it writes float32
    partials [splits, N] that `_splitk_reduce_kernel` sums in a fixed order."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    nm = n < N
    gi = tl.arange(0, NG)
    j = tl.arange(0, 32)
    p_rows = packed_ptr + n[:, None, None] * stride_pn
    s_rows = scale_ptr + n[:, None] * stride_sn
    v_rows = minv_ptr + n[:, None] * stride_sn
    g_lo = pid_s * groups_per_split
    g_hi = tl.minimum(g_lo + groups_per_split, G)
    acc = tl.zeros([BLOCK_N, NG, 32], dtype=tl.float32)
    for g0 in range(g_lo, g_hi, NG):
        g = g0 + gi
        gm = g < g_hi
        c_lo = g[:, None] * 64 + j[None, :]  # [NG, 32]
        x_lo = tl.load(x_ptr + c_lo, mask=gm[:, None] & (c_lo < K), other=0.0).to(tl.float32)
        x_hi = tl.load(x_ptr + c_lo + 32, mask=gm[:, None] & (c_lo + 32 < K), other=0.0).to(tl.float32)
        pm = nm[:, None, None] & gm[None, :, None]
        p = tl.load(p_rows + (g[:, None] * 32 + j[None, :])[None, :, :], mask=pm, other=0).to(tl.int32)
        sm = nm[:, None] & gm[None, :]
        s = tl.load(s_rows + g[None, :], mask=sm, other=0.0).to(tl.float32)[:, :, None]
        v = tl.load(v_rows + g[None, :], mask=sm, other=0.0).to(tl.float32)[:, :, None]
        acc += ((p & 15).to(tl.float32) * s + v) * x_lo[None, :, :]
        acc += ((p >> 4).to(tl.float32) * s + v) * x_hi[None, :, :]
    res = tl.sum(tl.sum(acc, axis=2), axis=1)
    if DIRECT:
        if HAS_BIAS:
            res += tl.load(bias_ptr + n, mask=nm, other=0.0).to(tl.float32)
        tl.store(out_ptr + n, res.to(out_ptr.dtype.element_ty), mask=nm)
    else:
        tl.store(out_ptr + pid_s * stride_os + n, res, mask=nm)


@triton.jit
def _splitk_reduce_kernel(
    part_ptr,
    bias_ptr,
    out_ptr,
    total,
    N,
    stride_ps,
    SPLITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out.flat[c] = sum over s of part[s].flat[c] (fixed order) + bias[c % N], for c < total (= rows * N)."""
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = c < total
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(part_ptr + s * stride_ps + c, mask=m, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c % N, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + c, acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _dequant_tile(p, s, v, ty: tl.constexpr, DEQ: tl.constexpr):
    """codes p (int32 [BN, BK], 0..15) * s + v (s, v: [BN, BK] or broadcastable, as loaded) -> [BN, BK] in `ty`.

    DEQ 0: int -> float32 conversion, float32 fma. DEQ 1: the same value through the float32 exponent trick
    (bits 0x4B000000 | code are 2^23 + code: a logic op and a subtraction instead of a quarter-rate int->float
    conversion). DEQ 2 (16-bit x, scales stored in x's dtype): the trick in x's dtype (0x6400 | code = 1024 + code in
    fp16, 0x4300 | code = 128 + code in bf16, both exact) and code * s + v in x's dtype."""
    if DEQ == 2:
        if ty == tl.float16:
            c = ((p | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0).to(tl.float16)
        else:
            c = ((p | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True) - 128.0).to(tl.bfloat16)
        w = c * s.to(ty) + v.to(ty)
    else:
        if DEQ == 1:
            c = (p | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        else:
            c = p.to(tl.float32)
        w = c * s.to(tl.float32) + v.to(tl.float32)
    return w.to(ty)


@triton.jit
def _matmul_4bit_kernel(
    x_ptr,
    packed_ptr,
    scale_ptr,
    minv_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    G,
    groups_per_split,
    stride_xm,
    stride_pn,
    stride_sn,
    stride_om,
    stride_os,
    HAS_BIAS: tl.constexpr,
    DIRECT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NG: tl.constexpr,
    GROUP_N: tl.constexpr,
    DEQ: tl.constexpr,
    SWAP: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """M >= 2. Per step, NG groups of each of BLOCK_N weight rows: the packed bytes [BLOCK_N, NG * 32] (contiguous in
    each row) and scale/min [BLOCK_N, NG] are loaded, the low and high nibbles dequantized in registers into two
    [BLOCK_N, NG * 32] tiles in x's dtype (`_dequant_tile`) and multiplied with the matching x columns (low nibble of
    byte j of group g <-> column 64 g + j, high <-> 64 g + 32 + j: runs of 32 contiguous columns) by two tl.dot calls
    with float32 accumulation. No dequantized weight is ever written to memory.

    SWAP ("swap AB"): the output tile is computed transposed, acc[BLOCK_N, BLOCK_M] = W_tile @ x_tile^T, so the
    dequantized weights are the dot's first operand (which the tensor-core dot may take from registers) and a small
    M is the dot's second dimension (>= 16); else acc[BLOCK_M, BLOCK_N] = x_tile @ W_tile^T.

    Program (t, s): output tile t (ordered in bands of GROUP_N weight-row tiles: the x tiles and weight tiles of a
    band stay in L2) over groups [s * groups_per_split, ...). DIRECT: one split, bias added, x's dtype stored; else
    float32 partials [splits, M, N] that `_splitk_reduce_kernel` sums in a fixed order (deterministic)."""
    BK: tl.constexpr = NG * 32
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    num_m = tl.cdiv(M, BLOCK_M)
    per_band = GROUP_N * num_m
    band = pid // per_band
    first_n = band * GROUP_N
    size_n = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_band) % size_n
    pid_m = (pid % per_band) // size_n
    n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    nm = n < N
    mm = m < M
    c = tl.arange(0, BK)  # byte c of a step: group c // 32, low column 64 * (c // 32) + c % 32
    p_rows = packed_ptr + n[:, None] * stride_pn
    s_rows = scale_ptr + n[:, None] * stride_sn
    v_rows = minv_ptr + n[:, None] * stride_sn
    ty = x_ptr.dtype.element_ty
    g_lo = pid_s * groups_per_split
    g_hi = tl.minimum(g_lo + groups_per_split, G)
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g0 in range(g_lo, g_hi, NG):
        cm = g0 + c // 32 < g_hi  # [BK]
        p = tl.load(p_rows + (g0 * 32 + c)[None, :], mask=nm[:, None] & cm[None, :], other=0).to(tl.int32)
        if NG == 1:
            s = tl.load(s_rows + g0, mask=nm[:, None], other=0.0)  # [BN, 1]
            v = tl.load(v_rows + g0, mask=nm[:, None], other=0.0)
        else:
            gi = tl.arange(0, NG)
            sm = nm[:, None] & (g0 + gi < g_hi)[None, :]
            s = tl.load(s_rows + g0 + gi[None, :], mask=sm, other=0.0)  # [BN, NG] -> [BN, BK]
            v = tl.load(v_rows + g0 + gi[None, :], mask=sm, other=0.0)
            s = tl.reshape(tl.broadcast_to(s[:, :, None], [BLOCK_N, NG, 32]), [BLOCK_N, BK])
            v = tl.reshape(tl.broadcast_to(v[:, :, None], [BLOCK_N, NG, 32]), [BLOCK_N, BK])
        w_lo = _dequant_tile(p & 15, s, v, ty, DEQ)
        w_hi = _dequant_tile(p >> 4, s, v, ty, DEQ)
        kc = g0 * 64 + (c // 32) * 64 + c % 32
        if SWAP:
            x_cols = x_ptr + m[None, :] * stride_xm
            x_lo = tl.load(x_cols + kc[:, None], mask=(cm & (kc < K))[:, None] & mm[None, :], other=0.0)
            x_hi = tl.load(x_cols + (kc + 32)[:, None], mask=(cm & (kc + 32 < K))[:, None] & mm[None, :], other=0.0)
            acc = tl.dot(w_lo, x_lo, acc, input_precision=DOT_PREC)
            acc = tl.dot(w_hi, x_hi, acc, input_precision=DOT_PREC)
        else:
            x_rows = x_ptr + m[:, None] * stride_xm
            x_lo = tl.load(x_rows + kc[None, :], mask=mm[:, None] & (cm & (kc < K))[None, :], other=0.0)
            x_hi = tl.load(x_rows + (kc + 32)[None, :], mask=mm[:, None] & (cm & (kc + 32 < K))[None, :], other=0.0)
            acc = tl.dot(x_lo, tl.trans(w_lo), acc, input_precision=DOT_PREC)
            acc = tl.dot(x_hi, tl.trans(w_hi), acc, input_precision=DOT_PREC)
    if SWAP:
        om = nm[:, None] & mm[None, :]
        o_off = m[None, :] * stride_om + n[:, None]
        part_off = m[None, :] * N + n[:, None]
        if HAS_BIAS and DIRECT:
            acc += tl.load(bias_ptr + n, mask=nm, other=0.0).to(tl.float32)[:, None]
    else:
        om = mm[:, None] & nm[None, :]
        o_off = m[:, None] * stride_om + n[None, :]
        part_off = m[:, None] * N + n[None, :]
        if HAS_BIAS and DIRECT:
            acc += tl.load(bias_ptr + n, mask=nm, other=0.0).to(tl.float32)[None, :]
    if DIRECT:
        tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=om)
    else:
        tl.store(out_ptr + pid_s * stride_os + part_off, acc, mask=om)


# launch configurations (module-level so benchmarks and tests can swap them)
# H200 sweep (fp16, CUDA graphs): 8 rows x 8 groups, split K to ~2 programs per SM: qkv 7168^2 19 us (dense 27),
# fc1 28672x7168 69 us (dense 95), fc2 7168x28672 79 us (dense 101)
GEMV_CONFIG = {"BLOCK_N": 8, "NG": 8, "num_warps": 4, "num_stages": 3}
GEMV_PROGRAMS_PER_SM = 2  # split K until about this many programs per SM run (memory-level parallelism)
GEMV_PARTIAL_FRACTION = 8  # split-K partials (4 bytes per split and row) at most 1/this of the weight bytes
# M >= 2 (the tl.dot kernel), by M: (max M, config). PROGRAMS_PER_SM: split K until about this many programs run
# per SM (small M is bound by the 4-bit weight bytes: enough loads in flight); 0: never split.
# H100 sweep (fp16, OPT-30B shapes, CUDA graphs, `bench_quant4.py --sweep`): see benchmarks/RESULTS.md.
GEMM_CONFIGS = {
    16: dict(BLOCK_N=64, BLOCK_M=16, NG=2, GROUP_N=8, DEQ=2, SWAP=True, PROGRAMS_PER_SM=8, num_warps=4, num_stages=4),
    64: dict(BLOCK_N=64, BLOCK_M=64, NG=4, GROUP_N=8, DEQ=2, SWAP=True, PROGRAMS_PER_SM=4, num_warps=4, num_stages=3),
    None: dict(
        BLOCK_N=128, BLOCK_M=128, NG=1, GROUP_N=8, DEQ=2, SWAP=True, PROGRAMS_PER_SM=1, num_warps=8, num_stages=4
    ),
}
GEMM_PARTIAL_FRACTION = 4  # split-K partials (4 bytes per split, row and output) at most 1/this of the weight bytes
INTERPRETER_CONFIG = dict(BLOCK_N=16, BLOCK_M=16, NG=1, GROUP_N=2, DEQ=1, SWAP=True, PROGRAMS_PER_SM=0, num_warps=4)


def _sms(device) -> int:
    return num_sms(device, default=4)


def gemv_4bit_config(n: int, k: int, sms: int) -> dict:
    """M = 1: row tile, groups per step, and the split over K (grid from shapes only)."""
    cfg = dict(GEMV_CONFIG)
    g = cdiv(k, GROUP)
    blocks_n = cdiv(n, cfg["BLOCK_N"])
    steps = cdiv(g, cfg["NG"])
    by_bytes = max(1, (g * HALF) // (4 * GEMV_PARTIAL_FRACTION))
    split = max(1, min(steps, cdiv(GEMV_PROGRAMS_PER_SM * sms, blocks_n), by_bytes))
    per = cdiv(steps, split) * cfg["NG"]
    cfg["GROUPS_PER_SPLIT"] = per
    cfg["SPLITS"] = cdiv(g, per)
    return cfg


def matmul_4bit_config(
    m: int, n: int, k: int, dtype: torch.dtype, sms: int, scale_dtype=None, base: dict | None = None
) -> dict:
    """Tiles, dequantization variant and K split of the tl.dot kernel for M = m rows (every tl.dot dimension >= 16),
    from `base` (a GEMM_CONFIGS entry; default: the one for m). Returns the kernel's constexprs and launch options
    plus GROUPS_PER_SPLIT and SPLITS."""
    if base is not None:
        cfg = dict(base)
    elif interpreting():
        cfg = dict(INTERPRETER_CONFIG)
    else:
        cfg = next(dict(c) for top, c in GEMM_CONFIGS.items() if top is None or m <= top)
    if dtype == torch.float32:  # float32 tiles take twice the shared memory, and ieee dots run on FMA units
        cfg["DEQ"] = min(cfg["DEQ"], 1)
        if not interpreting():
            cfg.update(BLOCK_N=min(cfg["BLOCK_N"], 64), BLOCK_M=min(cfg["BLOCK_M"], 64), NG=1, num_stages=2)
    if cfg["DEQ"] == 2 and scale_dtype is not None and scale_dtype != dtype:
        cfg["DEQ"] = 1  # DEQ 2 computes in x's dtype: only where the scales are stored in it
    cfg["DOT_PREC"] = "ieee" if dtype == torch.float32 else "tf32"
    g = cdiv(k, GROUP)
    steps = cdiv(g, cfg["NG"])
    tiles = cdiv(m, cfg["BLOCK_M"]) * cdiv(n, cfg["BLOCK_N"])
    target = cfg.pop("PROGRAMS_PER_SM") * sms
    by_bytes = max(1, (n * g * HALF) // (4 * m * n * GEMM_PARTIAL_FRACTION))
    split = max(1, min(steps, cdiv(target, tiles) if target else 1, by_bytes))
    per = cdiv(steps, split) * cfg["NG"]
    cfg["GROUPS_PER_SPLIT"] = per
    cfg["SPLITS"] = cdiv(g, per)
    return cfg


def _reduce_splits(part, bias, out, n: int) -> None:
    total = out.numel()
    block = 1024
    _splitk_reduce_kernel[(cdiv(total, block),)](
        part,
        bias if bias is not None else out,
        out,
        total,
        n,
        part.stride(0),
        SPLITS=part.shape[0],
        HAS_BIAS=bias is not None,
        BLOCK=block,
        num_warps=4,
    )


def _split_output(cfg: dict, out: torch.Tensor, shape: tuple[int, ...]) -> tuple[int, int, bool, torch.Tensor]:
    """(splits of K, groups per split, direct, where the kernel writes): ``out`` itself when K is not split, else
    float32 partials [splits, *shape] for :func:`_reduce_splits`. Takes SPLITS and GROUPS_PER_SPLIT out of ``cfg``."""
    splits, per = cfg.pop("SPLITS"), cfg.pop("GROUPS_PER_SPLIT")
    direct = splits == 1
    part = out if direct else torch.empty((splits, *shape), dtype=torch.float32, device=out.device)
    return splits, per, direct, part


def _gemv_4bit(x2, packed, scale, minv, bias, out, n, k) -> None:
    cfg = gemv_4bit_config(n, k, _sms(x2.device))
    splits, per, direct, part = _split_output(cfg, out, (n,))
    _gemv_4bit_kernel[(cdiv(n, cfg["BLOCK_N"]), splits)](
        x2,
        packed,
        scale,
        minv,
        bias if bias is not None else out,
        part,
        n,
        k,
        scale.shape[1],
        per,
        packed.stride(0),
        scale.stride(0),
        0 if direct else part.stride(0),
        HAS_BIAS=bias is not None,
        DIRECT=direct,
        **cfg,
    )
    if not direct:
        _reduce_splits(part, bias, out, n)


def _gemm_4bit(x2, packed, scale, minv, bias, out, n, k, cfg: dict | None = None) -> None:
    m = x2.shape[0]
    cfg = dict(cfg or matmul_4bit_config(m, n, k, x2.dtype, _sms(x2.device), scale.dtype))
    splits, per, direct, part = _split_output(cfg, out, (m, n))
    tiles = cdiv(m, cfg["BLOCK_M"]) * cdiv(n, cfg["BLOCK_N"])
    _matmul_4bit_kernel[(tiles, splits)](
        x2,
        packed,
        scale,
        minv,
        bias if bias is not None else out,
        part,
        m,
        n,
        k,
        scale.shape[1],
        per,
        x2.stride(0),
        packed.stride(0),
        scale.stride(0),
        out.stride(0),
        0 if direct else part.stride(0),
        HAS_BIAS=bias is not None,
        DIRECT=direct,
        **cfg,
    )
    if not direct:
        _reduce_splits(part, bias, out, n)


def matmul_4bit(x: torch.Tensor, q: Quantized4, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ dequantize_4bit(q).T + bias -> [..., N] in x.dtype, dequantizing inside the GEMM tiles.

    x in float16/bfloat16 on the GPU (float32 works too, slower), float32 in the interpreter; float32 accumulate.
    M = 1: `_gemv_4bit_kernel` (float32 FMAs); M >= 2: `_matmul_4bit_kernel` (tl.dot). Either splits K over several
    programs when the output tiles alone would not fill the GPU (then a second launch sums the float32 partials in a
    fixed order). No dequantized weight is materialized in memory, for any shape. Falls back to
    `matmul_4bit_reference` where Triton cannot run on x's device. No host syncs.
    """
    if not triton_available(x):
        return matmul_4bit_reference(x, q, bias)
    _check_matmul(x, q, bias)
    lead, k = tuple(x.shape[:-1]), x.shape[-1]
    n = q.packed.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    packed, scale, minv = q.packed, q.scale, q.minv
    if packed.stride(1) != 1:
        packed = packed.contiguous()
    if scale.stride(1) != 1 or minv.stride() != scale.stride():
        scale, minv = scale.contiguous(), minv.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.view(*lead, n)
    if m == 1:
        _gemv_4bit(x2, packed, scale, minv, bias, out, n, k)
    else:
        _gemm_4bit(x2, packed, scale, minv, bias, out, n, k)
    return out.view(*lead, n)
