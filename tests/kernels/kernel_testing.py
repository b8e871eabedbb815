"""Shared settings of the kernel tests (conftest.py sets up the interpreter before this is imported)."""

from __future__ import annotations

import os

import torch

ON_GPU = os.environ.get("RELDL_KERNEL_TESTS_GPU") == "1"

# dtypes the kernels are checked in: bf16 is broken in the interpreter, so only on the GPU
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])

# kernel vs reference (reference in float32 unless said otherwise)
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int, dtype=torch.float32, device="cpu", scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen(seed), dtype=torch.float64) * scale).to(device=device, dtype=dtype)
