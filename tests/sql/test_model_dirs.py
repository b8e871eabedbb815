"""Directories reldl creates for a model (sparse variants, fine-tuned checkpoints, trained tabular models, offload
dirs) are recorded as owned in the catalog (`owned_dirs`) and removed by DROP MODEL / CREATE OR REPLACE MODEL once
the catalog change is committed; a user's directory (`path`) never is; a rolled-back DROP keeps the directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from sqlhelpers import create_model_sql, quote

import reldl
from reldl import registry

BASE = "base"


def _sparse(name: str, verb: str = "CREATE", extra: str = "") -> str:
    return (
        f"{verb} MODEL {name} OPTIONS (model_type = 'llm', base = '{BASE}', sparsity = 0.5, epochs = 1, "
        f"calibration_tokens = 256{extra}) AS SELECT text FROM corpus"
    )


def _path(conn, name: str) -> Path:
    ((path,),) = conn.execute("SELECT path FROM reldl.models WHERE name = ?", [name]).fetchall()
    return Path(path)


def _options(conn, name: str) -> dict:
    ((o,),) = conn.execute("SELECT options FROM reldl.models WHERE name = ?", [name]).fetchall()
    return json.loads(o)


@pytest.fixture
def db(tmp_path, llama_ckpt):
    """A file database with the tiny Llama as BASE and a small calibration corpus."""
    conn = reldl.connect(str(tmp_path / "m.duckdb"))
    conn.execute(create_model_sql(BASE, llama_ckpt))
    conn.execute("CREATE TABLE corpus AS SELECT unnest(?) AS text", [["the cat sat on the mat", "a dog ran far"] * 4])
    yield conn
    conn.close()
    registry.unload()


def test_drop_removes_the_owned_dir(db, tmp_path, llama_ckpt):
    db.execute(_sparse("fast"))
    d = _path(db, "fast")
    assert d.is_dir() and d.parent == tmp_path / "m.duckdb.models"
    assert _options(db, "fast")["owned_dirs"] == [d.name]  # relative to the database's own m.duckdb.models/
    db.execute("SELECT llm_generate('the cat', model := 'fast', max_tokens := 2)").fetchall()  # engine loaded
    db.execute("DROP MODEL fast")
    assert not d.exists()
    assert Path(llama_ckpt).is_dir()  # the base's checkpoint (the user's `path`) stays
    db.execute(f"DROP MODEL {BASE}")
    assert (Path(llama_ckpt) / "config.json").is_file()


def test_or_replace_removes_the_old_dir_and_keeps_the_new(db):
    db.execute(_sparse("fast"))
    old = _path(db, "fast")
    db.execute(_sparse("fast", verb="CREATE OR REPLACE"))
    new = _path(db, "fast")
    assert new != old and not old.exists() and (new / "sparse.json").is_file()
    assert _options(db, "fast")["owned_dirs"] == [new.name]
    out = db.execute("SELECT llm_generate('the cat', model := 'fast', max_tokens := 2)").fetchall()[0][0]
    assert isinstance(out, str)


def test_a_users_dir_is_never_removed(db, tmp_path):
    mine = tmp_path / "my_variant"
    db.execute(_sparse("fast", extra=f", path = {quote(mine)}"))
    assert _path(db, "fast") == mine.resolve() and "owned_dirs" not in _options(db, "fast")
    db.execute(_sparse("fast", verb="CREATE OR REPLACE"))  # replaced by an owned one: the user's stays
    assert (mine / "sparse.json").is_file()
    owned = _path(db, "fast")
    # a model registered by the user on a directory reldl created: neither DROP removes what it still refers to
    db.execute(
        "INSERT INTO reldl.models (name, model_type, path, options) VALUES ('alias', 'mlp', ?, '{}')", [str(owned)]
    )
    db.execute("DROP MODEL fast")
    assert owned.is_dir()
    db.execute("DROP MODEL alias")
    assert owned.is_dir() and (mine / "sparse.json").is_file()


def test_rollback_keeps_the_dir_and_commit_removes_it(db):
    db.execute(_sparse("fast"))
    d = _path(db, "fast")
    db.execute("BEGIN TRANSACTION")
    db.execute("DROP MODEL fast")
    assert d.is_dir()  # not committed yet
    db.rollback()
    assert d.is_dir() and _path(db, "fast") == d
    db.execute("BEGIN; DROP MODEL fast; ROLLBACK")  # the same in SQL
    assert d.is_dir() and _path(db, "fast") == d
    db.execute("BEGIN")
    db.execute("DROP MODEL fast")
    assert d.is_dir()
    db.commit()
    assert not d.exists()
    db.execute(_sparse("fast2"))
    d2 = _path(db, "fast2")
    db.execute("BEGIN; DROP MODEL fast2; COMMIT")  # SQL COMMIT
    assert not d2.exists()


def test_or_replace_in_a_rolled_back_transaction_keeps_the_old_dir(db):
    db.execute(_sparse("fast"))
    old = _path(db, "fast")
    db.execute("BEGIN")
    db.execute(_sparse("fast", verb="CREATE OR REPLACE"))
    db.rollback()
    assert old.is_dir() and _path(db, "fast") == old


def test_a_failed_delete_warns_and_keeps_the_drop(db, monkeypatch):
    db.execute(_sparse("fast"))
    d = _path(db, "fast")

    def fail(*a, **k):
        raise PermissionError("denied")

    monkeypatch.setattr(shutil, "rmtree", fail)
    with pytest.warns(UserWarning, match="could not remove model directory"):
        db.execute("DROP MODEL fast")
    assert d.is_dir()
    assert db.execute("SELECT count(*) FROM reldl.models WHERE name = 'fast'").fetchall() == [(0,)]


def test_offload_dir_reldl_creates_is_owned(db, tmp_path, llama_ckpt):
    new, existing = tmp_path / "off_new", tmp_path / "off_existing"
    existing.mkdir()
    for name, d in (("a", new), ("b", existing)):
        db.execute(
            f"CREATE MODEL {name} OPTIONS (model_type = 'llm', path = {quote(llama_ckpt)}, dtype = 'float32', "
            f"device = 'cpu', offload = 'auto', offload_dir = {quote(d)})"
        )
    assert _options(db, "a")["owned_dirs"] == [str(new)] and "owned_dirs" not in _options(db, "b")
    new.mkdir()  # what loading the offloaded model does
    (new / "w-000001.bin").write_bytes(b"x")
    db.execute("DROP MODEL a")
    db.execute("DROP MODEL b")
    assert not new.exists() and existing.is_dir() and Path(llama_ckpt).is_dir()


def test_finetuned_checkpoint_dir(db, tmp_path):
    db.execute("CREATE TABLE ex AS SELECT 'the cat' AS prompt, ' sat down' AS completion")
    ft = "OPTIONS (model_type = 'llm', base = 'base', finetune = 'lora', epochs = 1, batch_size = 1{}) AS "
    ft += "SELECT * FROM ex"
    db.execute("CREATE MODEL tuned " + ft.format(""))
    db.execute("CREATE MODEL mine " + ft.format(f", path = {quote(tmp_path / 'my_ckpt')}"))
    owned, mine = _path(db, "tuned"), _path(db, "mine")
    assert _options(db, "tuned")["owned_dirs"] == [owned.name] and "owned_dirs" not in _options(db, "mine")
    db.execute("DROP MODEL tuned")
    db.execute("DROP MODEL mine")
    assert not owned.exists() and mine.is_dir()
    assert not list((tmp_path / "m.duckdb.models").glob(".reldl-finetune-*"))  # no resume state left behind
