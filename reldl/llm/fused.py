"""The engine's switch to reldl's Triton kernels (kernels/) on CUDA; the plain PyTorch path runs everywhere else.

Set RELDL_TRITON=0 to force the PyTorch path (for comparisons and debugging).
"""

from __future__ import annotations

import functools
import os

import torch

enabled = True  # benchmarks flip this to time the PyTorch path in the same process


@functools.cache
def _kernels():
    if os.environ.get("RELDL_TRITON", "1") == "0":
        return None
    try:
        from reldl import kernels
    except ImportError:  # triton missing
        return None
    return kernels


def on(t: torch.Tensor):
    """The kernels module when `t` lives on a CUDA device and Triton is usable, else None."""
    if not (enabled and t.is_cuda):
        return None
    return _kernels()
