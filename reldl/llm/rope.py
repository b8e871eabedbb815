"""Rotary position embeddings, with the RoPE scalings Hugging Face configs use (linear, dynamic, llama3, yarn)."""

from __future__ import annotations

import math
from typing import Any

import torch

from reldl.errors import CheckpointError


def inv_frequencies(
    head_dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int
) -> tuple[torch.Tensor, float]:
    """Return (inverse frequencies [head_dim/2] in float64, attention factor applied to cos/sin)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if not scaling:
        return inv, 1.0
    kind = scaling.get("rope_type", "default")
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "dynamic":
        # NTK-aware scaling only changes frequencies beyond the configured context, which reldl never exceeds.
        return inv, 1.0
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        old = float(scaling.get("original_max_position_embeddings") or max_positions / factor)
        beta_fast, beta_slow = float(scaling.get("beta_fast", 32)), float(scaling.get("beta_slow", 1))
        mscale = scaling.get("attention_factor")
        if mscale is None:
            mscale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

        def dim_for(rot: float) -> float:
            return (head_dim * math.log(old / (rot * 2 * math.pi))) / (2 * math.log(theta))

        lo = max(math.floor(dim_for(beta_fast)), 0)
        hi = min(math.ceil(dim_for(beta_slow)), head_dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
        extrapolation = 1 - ramp
        inv = (inv / factor) * (1 - extrapolation) + inv * extrapolation
        return inv, float(mscale)
    raise CheckpointError(f"config.json: rope scaling type {kind!r} is not supported")


class Rotary:
    """cos/sin tables for every position, indexed by each token's absolute position."""

    def __init__(self, head_dim: int, theta: float, scaling, max_positions: int, device, dtype):
        inv, mscale = inv_frequencies(head_dim, theta, scaling, max_positions)
        t = torch.arange(max_positions, dtype=torch.float64)
        freqs = torch.outer(t, inv)
        self.cos = (freqs.cos() * mscale).to(device=device, dtype=torch.float32)
        self.sin = (freqs.sin() * mscale).to(device=device, dtype=torch.float32)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, T, heads, D] rotated (half-split convention) by positions [B, T]."""
        cos = self.cos[positions].unsqueeze(2)
        sin = self.sin[positions].unsqueeze(2)
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(x.dtype)
