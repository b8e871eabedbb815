"""RMSNorm, optionally fused with the residual add that precedes it: one launch, one row per program.

Semantics are those of reldl's `RMSNorm` module: statistics in float32, the normalised row cast to the input dtype
*before* it is multiplied by the weight, the product in the promoted dtype of (input, weight).
"""

from __future__ import annotations

import torch

from reldl.kernels._triton import cdiv, next_pow2, require_triton, tl, triton

MAX_SINGLE_BLOCK = 8192  # rows up to this many elements are held in registers; longer rows take two passes
CHUNK = 4096


def rmsnorm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * rmsnorm(r).to(r.dtype), r) with r = x + residual (or x itself)."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype), x


@triton.jit
def _rmsnorm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    rout_ptr,
    n_cols,
    eps,
    stride_x,
    stride_res,
    stride_out,
    stride_rout,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    res_row = res_ptr + row * stride_res
    out_row = out_ptr + row * stride_out
    rout_row = rout_ptr + row * stride_rout
    cols = tl.arange(0, BLOCK)
    if NUM_CHUNKS == 1:
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            r = (x + tl.load(res_row + cols, mask=mask, other=0.0).to(tl.float32)).to(rout_ptr.dtype.element_ty)
            tl.store(rout_row + cols, r, mask=mask)
            x = r.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        y = (x * rstd).to(rout_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_row + cols, (y * w).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(NUM_CHUNKS):
            offs = c * BLOCK + cols
            mask = offs < n_cols
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_RES:
                r = (x + tl.load(res_row + offs, mask=mask, other=0.0).to(tl.float32)).to(rout_ptr.dtype.element_ty)
                tl.store(rout_row + offs, r, mask=mask)
                x = r.to(tl.float32)
            acc += x * x
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / n_cols + eps)
        for c in range(NUM_CHUNKS):
            offs = c * BLOCK + cols
            mask = offs < n_cols
            # recompute x (+ residual) rather than re-read what this program just stored
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_RES:
                r = (x + tl.load(res_row + offs, mask=mask, other=0.0).to(tl.float32)).to(rout_ptr.dtype.element_ty)
                x = r.to(tl.float32)
            y = (x * rstd).to(rout_ptr.dtype.element_ty).to(tl.float32)
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_row + offs, (y * w).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 else t.contiguous()


def rmsnorm_config(n_cols: int) -> dict[str, int]:
    """Block size, chunk count and warps for rows of `n_cols` elements."""
    block = next_pow2(n_cols)
    chunks = 1
    if block > MAX_SINGLE_BLOCK:
        block, chunks = CHUNK, cdiv(n_cols, CHUNK)
    return {"BLOCK": block, "NUM_CHUNKS": chunks, "num_warps": min(max(block // 256, 1), 8)}


def rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `rmsnorm_reference`: x [..., H] (and residual, same shape), weight [H].

    Returns (normed, r): r = x + residual in a new tensor when residual is given, else x itself. No host syncs, so it
    can be captured in a CUDA graph.
    """
    require_triton()
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"rmsnorm: weight has shape {tuple(weight.shape)}, expected ({n},)")
    x2 = _rows(x, n)
    rows = x2.shape[0]
    r_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty((rows, n), dtype=torch.promote_types(r_dtype, weight.dtype), device=x.device)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"rmsnorm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        res2 = _rows(residual, n)
        rout = torch.empty((rows, n), dtype=r_dtype, device=x.device)
    else:
        res2, rout = x2, x2
    if rows > 0:
        _rmsnorm_kernel[(rows,)](
            x2,
            res2,
            weight.contiguous(),
            out,
            rout,
            n,
            float(eps),
            x2.stride(0),
            res2.stride(0),
            out.stride(0),
            rout.stride(0),
            HAS_RES=residual is not None,
            **rmsnorm_config(n),
        )
    return out.view(x.shape), (rout.view(x.shape) if residual is not None else x)
