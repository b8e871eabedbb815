"""Gated activations: silu(gate) * up from the fused gate/up projection, in one launch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reldl.kernels._triton import cdiv, next_pow2, require_triton, tl, triton

MAX_BLOCK = 1024


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2*I] = cat(gate, up) -> silu(gate) * up [..., I], computed in float32, returned in x.dtype."""
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_config(inter: int) -> dict[str, int]:
    block = min(next_pow2(inter), MAX_BLOCK)
    return {"BLOCK": block, "num_warps": min(max(block // 256, 1), 4)}


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton version of `silu_and_mul_reference`. Grid (rows, cdiv(I, BLOCK)); no host syncs."""
    require_triton()
    two_i = x.shape[-1]
    if two_i % 2:
        raise ValueError(f"silu_and_mul: last dimension {two_i} is odd")
    inter = two_i // 2
    x2 = x.reshape(-1, two_i)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty((rows, inter), dtype=x.dtype, device=x.device)
    cfg = silu_and_mul_config(inter)
    if rows > 0 and inter > 0:
        _silu_and_mul_kernel[(rows, cdiv(inter, cfg["BLOCK"]))](x2, out, inter, x2.stride(0), out.stride(0), **cfg)
    return out.view(*x.shape[:-1], inter)
