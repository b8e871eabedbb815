"""Adversarial SQL from review: each bad input gets a one-line reldl error, and the catalog, the tables and the
model directories stay as they were."""

from __future__ import annotations

import json

import pytest
from sqlhelpers import create_model_sql

import reldl
from reldl import registry

BASE = "base"
SPARSE = f"OPTIONS (model_type = 'llm', base = '{BASE}', sparsity = 0.5, epochs = 1, calibration_tokens = 256)"
LORA = f"OPTIONS (model_type = 'llm', base = '{BASE}', finetune = 'lora', epochs = 1, max_length = 32)"


def _models(conn) -> list[tuple]:
    return conn.execute("SELECT name, path, options FROM reldl.models ORDER BY name").fetchall()


def _err(conn, sql: str, params=None) -> str:
    with pytest.raises(reldl.Error) as info:
        conn.execute(sql, params).fetchall()
    msg = str(info.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


@pytest.fixture
def db(tmp_path, llama_ckpt):
    conn = reldl.connect(str(tmp_path / "m.duckdb"))
    conn.execute(create_model_sql(BASE, llama_ckpt))
    conn.execute("CREATE TABLE corpus AS SELECT unnest(?) AS txt", [["the cat sat on the mat", "a dog ran far"] * 4])
    conn.execute(
        "CREATE TABLE pairs AS SELECT unnest(?) AS prompt, unnest(?) AS completion",
        [["the cat", "a dog"] * 2, [" sat", " ran"] * 2],
    )
    yield conn
    conn.close()
    registry.unload()


def _model_dirs(tmp_path) -> list[str]:
    d = tmp_path / "m.duckdb.models"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


# -- 1. a rolled-back / aborted CREATE MODEL removes the directories it created
@pytest.mark.parametrize(
    "create",
    [
        f"CREATE MODEL ftx {SPARSE} AS SELECT txt FROM corpus",
        f"CREATE MODEL ftx {LORA} AS SELECT prompt, completion FROM pairs",
    ],
    ids=["sparse", "lora"],
)
@pytest.mark.parametrize("end", ["sql_rollback", "api_rollback", "failed_then_commit", "close"])
def test_rolled_back_create_removes_its_dir(db, tmp_path, create, end):
    before = _models(db)
    db.execute("BEGIN")
    db.execute(create)
    assert _model_dirs(tmp_path) == ["ftx"]
    if end == "sql_rollback":
        db.execute("ROLLBACK")
    elif end == "api_rollback":
        db.rollback()
    elif end == "failed_then_commit":
        with pytest.raises(reldl.Error):
            db.execute("INSERT INTO nosuch VALUES (1)")
        try:
            db.execute("COMMIT")
        except reldl.Error:
            pass
    else:
        db.close()
        db = reldl.connect(str(tmp_path / "m.duckdb"))
    assert _model_dirs(tmp_path) == []
    assert _models(db) == before
    db.execute(create)  # again, committed (autocommit): the same directory name, kept
    assert _model_dirs(tmp_path) == ["ftx"]
    (opts,) = [json.loads(o) for n, _, o in _models(db) if n == "ftx"]
    assert opts["owned_dirs"] == [str(tmp_path / "m.duckdb.models" / "ftx")]
    db.close()


def test_committed_create_in_a_transaction_keeps_its_dir(db, tmp_path):
    db.execute("BEGIN")
    db.execute(f"CREATE MODEL ftx {SPARSE} AS SELECT txt FROM corpus")
    db.execute("COMMIT")
    assert _model_dirs(tmp_path) == ["ftx"]
    db.commit()
    assert _model_dirs(tmp_path) == ["ftx"]
    assert [n for n, _, _ in _models(db)] == [BASE, "ftx"]
