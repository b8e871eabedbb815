"""Triton, or a stand-in that lets the kernel modules import (and their torch references run) where it is missing.

`TRITON_INTERPRET=1` must be in the environment before the kernel modules are imported: `triton.jit` decides at
decoration time whether a kernel runs compiled (CUDA) or in the interpreter (CPU tensors, for tests).
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    try:  # kernels with a PDL branch call tl.extra.cuda.gdc_*: load the submodule before they are compiled
        import triton.language.extra.cuda  # noqa: F401

        HAS_GDC = True
    except ImportError:  # pragma: no cover - a triton without it: PDL stays off
        HAS_GDC = False
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False
    HAS_GDC = False

    class _Stub:
        """Just enough of `triton` / `triton.language` for module-level kernel definitions to evaluate."""

        constexpr = object

        @staticmethod
        def jit(fn=None, **_kw):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _Stub()  # type: ignore[assignment]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(device) -> bool:
    """True when the Triton kernels can run on `device` (a torch.device, a device string or a tensor).

    That is: triton imports and the device is CUDA, or TRITON_INTERPRET=1 is set (the interpreter runs on CPU
    tensors). Callers fall back to the `*_reference` functions otherwise.
    """
    if not HAS_TRITON:
        return False
    if interpreting():
        return True
    if isinstance(device, torch.Tensor):
        device = device.device
    return torch.device(device).type == "cuda"


def require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: use the *_reference functions of reldl.kernels instead")


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _capability_major(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch (a kernel launched with `launch_pdl=True` starts while the previous one
    finishes, and waits for it with `tl.extra.cuda.gdc_wait()`): compiled kernels on a CUDA device of compute
    capability >= 9 with a triton that has the gdc intrinsics."""
    return HAS_GDC and device.type == "cuda" and not interpreting() and _capability_major(device.index) >= 9


def pdl_launch_opts(device: torch.device, on: bool) -> dict:
    """A kernel's PDL constexpr and launch option where PDL is asked for (`on`) and supported, else nothing."""
    return {"PDL": True, "launch_pdl": True} if on and pdl_supported(device) else {}
