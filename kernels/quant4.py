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
[N, K]. One program per (BLOCK_M, BLOCK_N) output tile walks K one group at a time: it loads the two [BLOCK_N, 32]
nibble halves and their scale/minv, and accumulates in float32
    acc += scale * (x_lo @ code_lo^T + x_hi @ code_hi^T) + minv * rowsum(x_group)
which is x @ (code * scale + minv)^T for that group: full-precision weights never exist, not even as a tile. Codes
(0..15) are exact in fp16/bf16, so the tensor-core dots run in x's dtype. Tile shapes are picked from M (decode
1..16, small batches up to 64, prefill above).

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
    part_ptr, bias_ptr, out_ptr, N, stride_ps, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr
):
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = c < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(part_ptr + s * stride_ps + c, mask=m, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + c, acc.to(out_ptr.dtype.element_ty), mask=m)


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
    stride_xm,
    stride_pn,
    stride_sn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """M >= 2: per step, BLOCK_KH bytes of each of BLOCK_N weight rows (2 * BLOCK_KH columns, BLOCK_KH / 32 groups)
    are dequantized once into two [BLOCK_N, BLOCK_KH] tiles in x's dtype (low and high nibbles) and multiplied with
    the matching x columns (x loaded in the packed order: byte c of a step <-> columns 64 * (c // 32) + c % 32 and
    that + 32) by two full-size tl.dot calls. Programs are ordered in GROUP_M bands of row tiles (L2 reuse of the
    weight tiles)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_band = GROUP_M * num_n
    band = pid // per_band
    first_m = band * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_band) % size_m
    pid_n = (pid % per_band) // size_m
    m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mm = m < M
    nm = n < N
    c = tl.arange(0, BLOCK_KH)
    col = (c // 32) * 64 + c % 32
    x_rows = x_ptr + m[:, None] * stride_xm
    p_rows = packed_ptr + n[:, None] * stride_pn
    s_rows = scale_ptr + n[:, None] * stride_sn
    v_rows = minv_ptr + n[:, None] * stride_sn
    kb_total = tl.cdiv(K, 64) * 32  # bytes per weight row
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for b0 in range(0, kb_total, BLOCK_KH):
        k_lo = 2 * b0 + col
        x_lo = tl.load(x_rows + k_lo[None, :], mask=mm[:, None] & (k_lo < K)[None, :], other=0.0)
        x_hi = tl.load(x_rows + (k_lo + 32)[None, :], mask=mm[:, None] & (k_lo + 32 < K)[None, :], other=0.0)
        pb = b0 + c
        pm = nm[:, None] & (pb < kb_total)[None, :]
        p = tl.load(p_rows + pb[None, :], mask=pm, other=0).to(tl.int32)
        g = (pb // 32)[None, :]
        s = tl.load(s_rows + g, mask=pm, other=0.0).to(tl.float32)
        v = tl.load(v_rows + g, mask=pm, other=0.0).to(tl.float32)
        w_lo = ((p & 15).to(tl.float32) * s + v).to(x_lo.dtype)
        w_hi = ((p >> 4).to(tl.float32) * s + v).to(x_lo.dtype)
        acc = tl.dot(x_lo, tl.trans(w_lo), acc, input_precision=DOT_PREC)
        acc = tl.dot(x_hi, tl.trans(w_hi), acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=nm, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + m[:, None] * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mm[:, None] & nm[None, :]
    )


@triton.jit
def _dequant_kernel(
    packed_ptr,
    scale_ptr,
    minv_ptr,
    out_ptr,
    N,
    K,
    stride_pn,
    stride_sn,
    stride_on,
    BLOCK_N: tl.constexpr,
    NG: tl.constexpr,
):
    """Dequantize rows into out [N, K] (x's dtype): NG groups of BLOCK_N rows per program."""
    n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    g = tl.program_id(1) * NG + tl.arange(0, NG)
    j = tl.arange(0, 32)
    nm = n < N
    G = tl.cdiv(K, 64)
    gm = g < G
    pm = nm[:, None, None] & gm[None, :, None]
    p = tl.load(packed_ptr + n[:, None, None] * stride_pn + (g[:, None] * 32 + j[None, :])[None], mask=pm, other=0)
    p = p.to(tl.int32)
    sm = nm[:, None] & gm[None, :]
    s = tl.load(scale_ptr + n[:, None] * stride_sn + g[None, :], mask=sm, other=0.0).to(tl.float32)[:, :, None]
    v = tl.load(minv_ptr + n[:, None] * stride_sn + g[None, :], mask=sm, other=0.0).to(tl.float32)[:, :, None]
    c_lo = (g[:, None] * 64 + j[None, :])[None]
    dst = out_ptr + n[:, None, None] * stride_on
    ty = out_ptr.dtype.element_ty
    tl.store(dst + c_lo, ((p & 15).to(tl.float32) * s + v).to(ty), mask=pm & (c_lo < K))
    tl.store(dst + c_lo + 32, ((p >> 4).to(tl.float32) * s + v).to(ty), mask=pm & (c_lo + 32 < K))


# launch configurations (module-level so benchmarks and tests can swap them)
# H200 sweep (fp16, CUDA graphs): 8 rows x 8 groups, split K to ~2 programs per SM: qkv 7168^2 19 us (dense 27),
# fc1 28672x7168 69 us (dense 95), fc2 7168x28672 79 us (dense 101)
GEMV_CONFIG = {"BLOCK_N": 8, "NG": 8, "num_warps": 4, "num_stages": 3}
GEMV_PROGRAMS_PER_SM = 2  # split K until about this many programs per SM run (memory-level parallelism)
GEMV_PARTIAL_FRACTION = 8  # split-K partials (4 bytes per split and row) at most 1/this of the weight bytes
GEMM_CONFIGS = {  # by M: (max M, config)
    16: {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_KH": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    64: {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_KH": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    None: {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_KH": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
}
# From this many rows on (CUDA only), dequantize chunks of weight rows into x's dtype (one Triton launch each) and
# use torch.matmul. On the H200 this beat the fused tile kernel by 2-9x (M=256 qkv: 83 us vs 439 us, fc2: 338 us vs
# 3573 us; the dequantized tile reaches tl.dot from registers), so the fused kernel runs only in the interpreter
# (and where this is set to None).
DEQUANT_GEMM_MIN_M = None if interpreting() else 2
DEQUANT_CHUNK_BYTES = 256 << 20  # the dequantized chunk of weight rows stays under this


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


def matmul_4bit_config(m: int, dtype: torch.dtype) -> dict:
    """Tile shapes of the tl.dot kernel from the number of rows (every tl.dot dimension >= 16)."""
    prec = "ieee" if dtype == torch.float32 else "tf32"
    for top, cfg in GEMM_CONFIGS.items():
        if top is None or m <= top:
            return dict(cfg, DOT_PREC=prec)
    raise AssertionError


def dequantize_4bit_triton(q: Quantized4, dtype: torch.dtype, rows: slice | None = None) -> torch.Tensor:
    """A quantized weight [N, K] (or rows of it) -> [n, K] in dtype, one Triton launch."""
    packed, scale, minv = q.packed, q.scale, q.minv
    if rows is not None:
        packed, scale, minv = packed[rows], scale[rows], minv[rows]
    n, k = packed.shape[0], q.k
    out = torch.empty((n, k), dtype=dtype, device=packed.device)
    if n and k:
        bn, ng = 16, 8
        _dequant_kernel[(cdiv(n, bn), cdiv(q.groups, ng))](
            packed,
            scale,
            minv,
            out,
            n,
            k,
            packed.stride(0),
            scale.stride(0),
            out.stride(0),
            BLOCK_N=bn,
            NG=ng,
            num_warps=4,
        )
    return out


def _gemv_4bit(x2, packed, scale, minv, bias, out, n, k) -> None:
    cfg = gemv_4bit_config(n, k, _sms(x2.device))
    splits = cfg.pop("SPLITS")
    per = cfg.pop("GROUPS_PER_SPLIT")
    direct = splits == 1
    part = out if direct else torch.empty((splits, n), dtype=torch.float32, device=x2.device)
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
        block = 1024
        _splitk_reduce_kernel[(cdiv(n, block),)](
            part,
            bias if bias is not None else out,
            out,
            n,
            part.stride(0),
            SPLITS=splits,
            HAS_BIAS=bias is not None,
            BLOCK=block,
            num_warps=4,
        )


def matmul_4bit(x: torch.Tensor, q: Quantized4, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ dequantize_4bit(q).T + bias -> [..., N] in x.dtype, dequantizing inside the GEMM tiles.

    x in float16/bfloat16 on the GPU (float32 works too, slower), float32 in the interpreter; float32 accumulate.
    Falls back to `matmul_4bit_reference` where Triton cannot run on x's device. Grid (cdiv(M, BLOCK_M),
    cdiv(N, BLOCK_N)), no host syncs.
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
    elif DEQUANT_GEMM_MIN_M is not None and m >= DEQUANT_GEMM_MIN_M:
        step = max(64, (DEQUANT_CHUNK_BYTES // max(1, k * x.element_size())) // 64 * 64)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            w = dequantize_4bit_triton(Quantized4(packed, scale, minv, k), x.dtype, slice(lo, hi))
            torch.matmul(x2, w.T, out=out[:, lo:hi]) if hi - lo == n else out[:, lo:hi].copy_(x2 @ w.T)
        if bias is not None:
            out += bias.to(out.dtype)
    else:
        cfg = matmul_4bit_config(m, x.dtype)
        grid = (cdiv(m, cfg["BLOCK_M"]) * cdiv(n, cfg["BLOCK_N"]),)
        _matmul_4bit_kernel[grid](
            x2,
            packed,
            scale,
            minv,
            bias if bias is not None else out,
            out,
            m,
            n,
            k,
            x2.stride(0),
            packed.stride(0),
            scale.stride(0),
            out.stride(0),
            HAS_BIAS=bias is not None,
            **cfg,
        )
    return out.view(*lead, n)
