"""Shared fixtures: tiny random Hugging Face checkpoints, each built once per test session."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# The test models are tiny: intra-op threads buy nothing, and on a shared 2-core machine OpenMP's spin-waiting
# made the suite up to 9x slower. Set before torch is imported (and inherited by subprocesses); an explicit
# OMP_NUM_THREADS still wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _interpret_triton_without_gpu() -> None:
    """Triton decides when it is imported whether @jit functions (its own standard library's too) run compiled or
    in the interpreter. The engine imports reldl.kernels, and so triton, while test modules are collected, before
    tests/kernels' conftest can set TRITON_INTERPRET; without a GPU, Triton can only run interpreted anyway."""
    if os.environ.get("RELDL_KERNEL_TESTS_GPU") == "1" or "TRITON_INTERPRET" in os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


_interpret_triton_without_gpu()

_TESTS = Path(__file__).resolve().parent
if str(_TESTS) not in sys.path:  # `import checkpoints` from any test file, at any depth
    sys.path.insert(0, str(_TESTS))


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> Callable[..., Path]:
    """``get(family, **kw) -> Path``: ``checkpoints.make_checkpoint(dir, family, **kw)``, cached per session."""
    import checkpoints

    root = tmp_path_factory.mktemp("tiny_checkpoints")
    cache: dict[str, Path] = {}

    def get(family: str, **kw) -> Path:
        key = json.dumps([family, kw], sort_keys=True, default=repr)  # overrides may hold dicts/lists
        if key not in cache:
            cache[key] = checkpoints.make_checkpoint(root / f"{family}_{len(cache)}", family, **kw)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def llama_path(tiny_checkpoints) -> Path:
    """The plain tiny Llama checkpoint (seed 0)."""
    return tiny_checkpoints("llama")
