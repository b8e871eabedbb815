"""Fixtures of the SQL-surface tests: tiny checkpoints (built once per session) and fresh connections."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
for _p in (_HERE.parent, _HERE):  # `import checkpoints`, `import sqlhelpers`
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from sqlhelpers import MODEL, create_model_sql  # noqa: E402

import reldl  # noqa: E402


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sql_checkpoints")


@pytest.fixture(scope="session")
def llama_ckpt(ckpt_root) -> Path:
    import checkpoints

    return checkpoints.make_checkpoint(ckpt_root / "llama", "llama")


@pytest.fixture(scope="session")
def other_ckpt(ckpt_root) -> Path:
    """A second, different model (GPT-2 family, other weights and tokenizer)."""
    import checkpoints

    return checkpoints.make_checkpoint(ckpt_root / "gpt2", "gpt2", seed=1)


@pytest.fixture
def conn():
    c = reldl.connect()
    yield c
    c.close()


@pytest.fixture
def llm(conn, llama_ckpt):
    """An in-memory connection with the tiny Llama registered as MODEL (float32 on CPU)."""
    conn.execute(create_model_sql(MODEL, llama_ckpt))
    return conn
