"""Fixtures of the tabular-model tests: small random models of every type, written once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # `import tabular_helpers`
    sys.path.insert(0, str(_HERE))

from tabular_helpers import MODELS  # noqa: E402


@pytest.fixture(scope="session")
def tabular_models(tmp_path_factory) -> dict[str, Path]:
    from reldl.tabular import random_tabular

    root = tmp_path_factory.mktemp("tabular_models")
    out = {}
    for seed, (name, kw) in enumerate(MODELS.items()):
        random_tabular(root / name, seed=seed, **kw)
        out[name] = root / name
    return out
