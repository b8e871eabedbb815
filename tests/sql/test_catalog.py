"""The model catalog from SQL: CREATE [OR REPLACE] MODEL [IF NOT EXISTS], DROP MODEL, SHOW MODELS, reldl.models,
persistence in the database file, read-only access, bad checkpoints and options, reldl.unload()."""

from __future__ import annotations

import json
from pathlib import Path

import checkpoints as ck
import duckdb
import pytest
from sqlhelpers import create_model_sql, one_line, quote, usable

import reldl
from reldl import registry

GEN = "SELECT llm_generate('The product is', max_tokens := 6)"
SHOW_COLUMNS = ["name", "model_type", "path", "options", "created_at"]


def names(conn) -> list[str]:
    return [r[0] for r in conn.execute("SHOW MODELS").fetchall()]


# ---------------------------------------------------------------------------------------------- create / show


def test_create_model_and_show_models(conn, llama_ckpt):
    assert names(conn) == []
    cur = conn.execute(
        f"CREATE MODEL tiny OPTIONS (model_type = 'llm', path = {quote(llama_ckpt)}, dtype = 'auto', device = 'auto')"
    )
    assert cur is not None
    cur = conn.execute("SHOW MODELS")
    rows = cur.fetchall()
    assert [d[0] for d in cur.description] == SHOW_COLUMNS
    assert len(rows) == 1
    name, model_type, path, options, created_at = rows[0]
    assert (name, model_type) == ("tiny", "llm")
    assert Path(path) == Path(llama_ckpt).resolve()
    opts = json.loads(options)
    assert opts["dtype"] == "auto" and opts["device"] == "auto"
    assert created_at is not None
    text = conn.execute(GEN).fetchall()[0][0]
    assert isinstance(text, str) and text


def test_show_models_is_sorted(conn, llama_ckpt, other_ckpt):
    conn.execute(create_model_sql("zeta", llama_ckpt))
    conn.execute(create_model_sql("alpha", other_ckpt))
    assert names(conn) == ["alpha", "zeta"]


def test_models_table_is_plain_sql(conn, llama_ckpt):
    conn.execute(create_model_sql("tiny", llama_ckpt))
    assert conn.execute("SELECT name, model_type FROM reldl.models").fetchall() == [("tiny", "llm")]
    assert conn.execute("SELECT count(*) FROM reldl.models WHERE options->>'dtype' = 'float32'").fetchall() == [(1,)]
    assert conn.duckdb_connection.execute("SELECT name FROM reldl.models").fetchall() == [("tiny",)]
    rows = conn.execute("SELECT * FROM reldl.models").fetchall()
    assert len(rows) == 1 and rows[0][0] == "tiny"


def test_create_existing_model_is_an_error(conn, llama_ckpt, other_ckpt):
    conn.execute(create_model_sql("tiny", llama_ckpt))
    with pytest.raises(reldl.DatabaseError) as info:
        conn.execute(create_model_sql("tiny", other_ckpt))
    msg = one_line(info.value)
    assert "tiny" in msg and "exists" in msg
    assert isinstance(info.value, reldl.IntegrityError)
    rows = conn.execute("SELECT path FROM reldl.models").fetchall()
    assert rows == [(str(Path(llama_ckpt).resolve()),)]  # unchanged
    usable(conn)


def test_create_or_replace_model(conn, llama_ckpt, other_ckpt):
    conn.execute(create_model_sql("tiny", llama_ckpt))
    before = conn.execute(GEN).fetchall()
    conn.execute(create_model_sql("tiny", other_ckpt, verb="CREATE OR REPLACE"))
    assert conn.execute("SELECT name, path FROM reldl.models").fetchall() == [("tiny", str(Path(other_ckpt).resolve()))]
    after = conn.execute(GEN).fetchall()
    eng = registry.get_engine("tiny", str(other_ckpt), "float32", "cpu")
    expected = eng.generate(["The product is"], reldl.llm.SamplingParams(max_tokens=6))[0].text
    assert after == [(expected,)]
    assert after != before
    # OR REPLACE of a model that does not exist yet just creates it
    conn.execute(create_model_sql("fresh", llama_ckpt, verb="CREATE OR REPLACE"))
    assert names(conn) == ["fresh", "tiny"]


def test_create_model_if_not_exists(conn, llama_ckpt, other_ckpt):
    conn.execute(create_model_sql("tiny", llama_ckpt, verb="CREATE"))
    conn.execute(create_model_sql("tiny", other_ckpt, verb="CREATE").replace("MODEL", "MODEL IF NOT EXISTS", 1))
    assert conn.execute("SELECT path FROM reldl.models").fetchall() == [(str(Path(llama_ckpt).resolve()),)]
    conn.execute(create_model_sql("other", other_ckpt).replace("MODEL", "MODEL IF NOT EXISTS", 1))
    assert names(conn) == ["other", "tiny"]


def test_drop_model(conn, llama_ckpt):
    conn.execute(create_model_sql("tiny", llama_ckpt))
    conn.execute("DROP MODEL tiny")
    assert names(conn) == []
    assert conn.execute("SELECT count(*) FROM reldl.models").fetchall() == [(0,)]
    with pytest.raises(reldl.ProgrammingError) as info:
        conn.execute("DROP MODEL tiny")
    assert "tiny" in one_line(info.value)
    conn.execute("DROP MODEL IF EXISTS tiny")
    with pytest.raises(reldl.ProgrammingError) as info:
        conn.execute("SELECT llm_generate('x', model := 'tiny')").fetchall()
    assert "tiny" in one_line(info.value)
    usable(conn)


def test_model_names_are_case_insensitive(conn, llama_ckpt):
    conn.execute(create_model_sql("Tiny", llama_ckpt))
    with pytest.raises(reldl.IntegrityError):
        conn.execute(create_model_sql("TINY", llama_ckpt))
    assert conn.execute("SELECT llm_generate('x', model := 'tiny', max_tokens := 2) IS NOT NULL").fetchall() == [
        (True,)
    ]
    conn.execute("DROP MODEL tINY")
    assert names(conn) == []


def test_statements_in_a_script(conn, llama_ckpt):
    cur = conn.execute(
        create_model_sql("a", llama_ckpt) + "; " + create_model_sql("b", llama_ckpt) + "; DROP MODEL a; SHOW MODELS"
    )
    assert [r[0] for r in cur.fetchall()] == ["b"]


# ---------------------------------------------------------------------------------------------- persistence


def test_models_persist_in_the_database_file(tmp_path, llama_ckpt):
    db = str(tmp_path / "models.db")
    c = reldl.connect(db)
    c.execute(create_model_sql("tiny", llama_ckpt))
    first = c.execute(GEN).fetchall()
    c.close()

    c = reldl.connect(db)
    assert names(c) == ["tiny"]
    assert c.execute(GEN).fetchall() == first
    c.close()

    # the catalog is an ordinary table of the file: plain DuckDB sees it
    duck = duckdb.connect(db, read_only=True)
    assert duck.execute("SELECT name, model_type FROM reldl.models").fetchall() == [("tiny", "llm")]
    duck.close()


def test_read_only_connection_reads_and_uses_models(tmp_path, llama_ckpt):
    db = str(tmp_path / "ro.db")
    with reldl.connect(db) as c:
        c.execute(create_model_sql("tiny", llama_ckpt))
        expected = c.execute(GEN).fetchall()
    with reldl.connect(db, read_only=True) as ro:
        assert names(ro) == ["tiny"]
        assert ro.execute("SELECT name FROM reldl.models").fetchall() == [("tiny",)]
        assert ro.execute(GEN).fetchall() == expected
        assert ro.cursor().execute(GEN).fetchall() == expected
        with pytest.raises(reldl.DatabaseError) as info:
            ro.execute(create_model_sql("other", llama_ckpt))
        assert "read-only" in one_line(info.value)
        with pytest.raises(reldl.DatabaseError) as info:
            ro.execute("DROP MODEL tiny")
        one_line(info.value)
        assert names(ro) == ["tiny"]


def test_read_only_database_without_catalog(tmp_path):
    db = str(tmp_path / "plain.db")
    duck = duckdb.connect(db)
    duck.execute("CREATE TABLE t AS SELECT 1 AS a")
    duck.close()
    with reldl.connect(db, read_only=True) as ro:
        cur = ro.execute("SHOW MODELS")
        assert cur.fetchall() == []
        assert [d[0] for d in cur.description] == SHOW_COLUMNS
        with pytest.raises(reldl.ProgrammingError) as info:
            ro.execute("SELECT llm_generate('x')").fetchall()
        assert "CREATE MODEL" in one_line(info.value)
        assert ro.execute("SELECT a FROM t").fetchall() == [(1,)]


# ---------------------------------------------------------------------------------------------- bad input

BAD_CHECKPOINTS = [
    # (builder in checkpoints.py or None for a missing directory, words the message must contain)
    (None, ["does not exist"]),
    ("make_pickle_only", ["safetensors", "pytorch_model.bin"]),
    ("make_missing_tokenizer", ["tokenizer"]),
    ("make_missing_config", ["config.json"]),
    ("make_truncated_safetensors", ["truncated", "safetensors"]),
    ("make_corrupt_header", ["safetensors", "header"]),
    ("make_shape_mismatch", ["shape", "mlp"]),
    ("make_unknown_architecture", ["fancy", "architecture"]),
]


@pytest.mark.parametrize("builder, words", BAD_CHECKPOINTS, ids=[b or "missing_dir" for b, _ in BAD_CHECKPOINTS])
def test_bad_checkpoint(conn, llama_ckpt, tmp_path, builder, words):
    path = tmp_path / "bad"
    if builder is not None:
        getattr(ck, builder)(llama_ckpt, path)
    with pytest.raises(reldl.DatabaseError) as info:
        conn.execute(create_model_sql("broken", path))
    msg = one_line(info.value)
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)
    assert isinstance(info.value, reldl.OperationalError)
    assert names(conn) == []
    usable(conn)


BAD_OPTIONS = [
    # (OPTIONS (...) text, error class, words the message must contain)
    ("model_type = 'llm', path = {p}, colour = 'red'", reldl.ProgrammingError, ["unknown option", "colour"]),
    ("model_type = 'llm'", reldl.ProgrammingError, ["path"]),
    ("model_type = 'llm', path = ''", reldl.ProgrammingError, ["path"]),
    ("path = {p}", reldl.ProgrammingError, ["model_type"]),
    ("model_type = 'xgboost', path = {p}", reldl.NotSupportedError, ["model_type", "xgboost"]),
    ("model_type = 'llm', path = {p}, dtype = 'int3'", reldl.ProgrammingError, ["dtype", "int3"]),
    ("model_type = 'llm', path = {p}, device = 'tpu'", reldl.ProgrammingError, ["device", "tpu"]),
    ("model_type = 'llm', path = {p}, path = {p}", reldl.ProgrammingError, ["path", "twice"]),
]


@pytest.mark.parametrize("options, cls, words", BAD_OPTIONS)
def test_bad_options(conn, llama_ckpt, options, cls, words):
    sql = f"CREATE MODEL m OPTIONS ({options.format(p=quote(llama_ckpt))})"
    with pytest.raises(cls) as info:
        conn.execute(sql)
    msg = one_line(info.value)
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)
    assert names(conn) == []
    usable(conn)


@pytest.mark.parametrize(
    "sql",
    ["CREATE MODEL", "CREATE MODEL m", "DROP MODEL", "DROP MODEL a b", "CREATE MODEL m OPTIONS (model_type = 'llm'"],
)
def test_malformed_statements(conn, sql):
    with pytest.raises(reldl.ProgrammingError) as info:
        conn.execute(sql)
    one_line(info.value)
    usable(conn)


def test_failed_create_leaves_existing_model(conn, llama_ckpt):
    conn.execute(create_model_sql("tiny", llama_ckpt))
    with pytest.raises(reldl.OperationalError):
        conn.execute(create_model_sql("tiny", "/no/such/dir", verb="CREATE OR REPLACE"))
    assert conn.execute("SELECT path FROM reldl.models").fetchall() == [(str(Path(llama_ckpt).resolve()),)]
    assert conn.execute(GEN).fetchall()[0][0]


# ---------------------------------------------------------------------------------------------- unload / register


def test_unload_frees_and_next_use_reloads(conn, llama_ckpt):
    conn.execute(create_model_sql("unload_me", llama_ckpt))
    first = conn.execute(GEN).fetchall()
    key = registry.engine_key(str(llama_ckpt), "float32", "cpu")
    assert key in registry.loaded()
    n = len(registry.loaded())
    assert reldl.unload("unload_me") >= 1
    assert key not in registry.loaded()
    assert len(registry.loaded()) < n
    assert reldl.unload("unload_me") == 0  # nothing left under that name
    assert conn.execute(GEN).fetchall() == first  # reloaded on use
    assert key in registry.loaded()


def test_drop_model_unloads(conn, other_ckpt):
    conn.execute(create_model_sql("drop_me", other_ckpt))
    conn.execute(GEN).fetchall()
    key = registry.engine_key(str(other_ckpt), "float32", "cpu")
    assert key in registry.loaded()
    conn.execute("DROP MODEL drop_me")
    assert key not in registry.loaded()


def test_register_model_on_connection(conn, llama_ckpt):
    reldl.register_model(conn, "py_tiny", str(llama_ckpt), dtype="float32", device="cpu")
    assert names(conn) == ["py_tiny"]
    with pytest.raises(reldl.IntegrityError):
        reldl.register_model(conn, "py_tiny", str(llama_ckpt))
    reldl.register_model(conn, "py_tiny", str(llama_ckpt), replace=True)
    assert conn.execute(GEN).fetchall()[0][0]


def test_register_model_on_plain_duckdb(llama_ckpt):
    duck = duckdb.connect()
    try:
        reldl.install(duck)
        reldl.register_model(duck, "plain_tiny", str(llama_ckpt), dtype="float32", device="cpu")
        assert duck.execute("SELECT name FROM reldl.models").fetchall() == [("plain_tiny",)]
        out = duck.execute("SELECT llm_generate('The product is', model := 'plain_tiny', max_tokens := 6)").fetchall()
        with reldl.connect() as c:
            c.execute(create_model_sql("tiny", llama_ckpt))
            assert c.execute(GEN).fetchall() == out
    finally:
        duck.close()


def test_replace_model_on_plain_duckdb_gives_new_results(llama_ckpt, other_ckpt):
    duck = duckdb.connect()
    try:
        reldl.install(duck)
        reldl.register_model(duck, "swap", str(llama_ckpt), dtype="float32", device="cpu")
        before = duck.execute("SELECT llm_generate('The product is', max_tokens := 6)").fetchall()
        reldl.register_model(duck, "swap", str(other_ckpt), dtype="float32", device="cpu", replace=True)
        after = duck.execute("SELECT llm_generate('The product is', max_tokens := 6)").fetchall()
        eng = registry.get_engine("swap", str(other_ckpt), "float32", "cpu")
        assert after == [(eng.generate(["The product is"], reldl.llm.SamplingParams(max_tokens=6))[0].text,)]
        assert after != before
    finally:
        duck.close()


def test_two_connections_to_one_file(tmp_path, llama_ckpt):
    """DuckDB shares one instance per file: the second connection works, also after the first one closes."""
    db = str(tmp_path / "shared.db")
    a = reldl.connect(db)
    a.execute(create_model_sql("tiny", llama_ckpt))
    expected = a.execute(GEN).fetchall()
    b = reldl.connect(db)
    cur = b.cursor()
    assert b.execute(GEN).fetchall() == expected
    a.close()
    assert b.execute(GEN).fetchall() == expected
    assert cur.execute(GEN).fetchall() == expected
    assert b.cursor().execute(GEN).fetchall() == expected
    c = reldl.connect(db)
    b.close()
    assert c.execute(GEN).fetchall() == expected
    c.close()
