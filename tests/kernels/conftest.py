"""Kernel tests: Triton kernels against their PyTorch references, on CPU through the Triton interpreter.

TRITON_INTERPRET=1 is set here, before anything in this folder imports triton (triton.jit reads it when a kernel is
defined). To run the same tests compiled on a CUDA GPU instead: `RELDL_KERNEL_TESTS_GPU=1 pytest tests/kernels`.
Without triton the whole folder is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

ON_GPU = os.environ.get("RELDL_KERNEL_TESTS_GPU") == "1"
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
    # kernels defined before the variable was set would be compiled-only: define them again
    for _name in [m for m in sys.modules if m == "reldl.kernels" or m.startswith("reldl.kernels.")]:
        del sys.modules[_name]

HAS_TRITON = importlib.util.find_spec("triton") is not None
_HERE = os.path.dirname(os.path.abspath(__file__))

import torch  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    if HAS_TRITON and (not ON_GPU or torch.cuda.is_available()):
        return
    reason = "triton is not installed" if not HAS_TRITON else "RELDL_KERNEL_TESTS_GPU=1 but no CUDA GPU"
    for item in items:
        if str(item.path).startswith(_HERE + os.sep):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if ON_GPU else "cpu")
