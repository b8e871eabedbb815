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
