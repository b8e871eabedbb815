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
    assert opts["owned_dirs"] == ["ftx"]  # relative to the database's own m.duckdb.models/
    db.close()


def test_committed_create_in_a_transaction_keeps_its_dir(db, tmp_path):
    db.execute("BEGIN")
    db.execute(f"CREATE MODEL ftx {SPARSE} AS SELECT txt FROM corpus")
    db.execute("COMMIT")
    assert _model_dirs(tmp_path) == ["ftx"]
    db.commit()
    assert _model_dirs(tmp_path) == ["ftx"]
    assert [n for n, _, _ in _models(db)] == [BASE, "ftx"]


# -- 2, 3. n / beam_width of any bad value or type: one line naming the argument, for every plan
BAD_BRANCHES = [
    ("n := NULL", "n must be an integer from 1 to 64, got NULL"),
    ("beam_width := NULL", "beam_width must be an integer from 1 to 64, got NULL"),
    ("n := 2.5", "n must be an integer from 1 to 64, got 2.5"),
    ("n := true", "n must be an integer from 1 to 64, got true"),
    ("beam_width := 2.5", "beam_width must be an integer from 1 to 64, got 2.5"),
    ("n := 'abc'", "n must be an integer from 1 to 64, got 'abc'"),
    ("n := '2'", "n must be an integer from 1 to 64, got '2'"),
    ("n := CAST(NULL AS INTEGER)", "n must be an integer from 1 to 64, got NULL"),
]


@pytest.mark.parametrize("plan", ["udf", "dl"])
@pytest.mark.parametrize("args, words", BAD_BRANCHES)
def test_bad_n_and_beam_width(llm, plan, args, words):
    llm.execute("CREATE TABLE r AS SELECT 'the cat' AS p")
    llm.execute(f"SET reldl_plan = '{plan}'")
    before = _models(llm)
    msg = _err(llm, f"SELECT llm_generate(p, max_tokens := 2, {args}) FROM r")
    assert msg == f"llm_generate: {words}"
    assert "reldl_llm_generate" not in msg and "Binder" not in msg
    assert _models(llm) == before and llm.execute("SELECT p FROM r").fetchall() == [("the cat",)]


def test_n_and_beam_width_still_work(llm):
    ((two,),) = llm.execute("SELECT llm_generate('the cat', max_tokens := 2, n := 2, seed := 1)").fetchall()
    ((beams,),) = llm.execute("SELECT llm_generate('the cat', max_tokens := 2, beam_width := 2)").fetchall()
    assert len(two) == 2 and len(beams) == 2
    ((one,),) = llm.execute("SELECT llm_generate('the cat', max_tokens := 2, n := 2.0, seed := 1)").fetchall()
    assert one == two  # an integral number is an integer


def test_null_n_in_a_column_row(llm):
    llm.execute("CREATE TABLE r AS SELECT * FROM (VALUES ('a', 2), ('b', NULL)) t(p, k)")
    assert _err(llm, "SELECT llm_generate(p, max_tokens := 2, n := k) FROM r").endswith("got NULL")


def test_plain_duckdb_llm_generate_list(llama_ckpt):
    import duckdb

    with duckdb.connect() as duck:
        reldl.install(duck)
        reldl.register_model(duck, "plain", str(llama_ckpt), dtype="float32", device="cpu")
        q = "SELECT llm_generate_list('the cat', max_tokens := 2, {})"
        assert len(duck.execute(q.format("beam_width := 3")).fetchall()[0][0]) == 3
        assert len(duck.execute(q.format("n := 2, seed := 1")).fetchall()[0][0]) == 2
        assert len(duck.execute(q.format("seed := 1")).fetchall()[0][0]) == 1
        with pytest.raises(duckdb.Error, match="n must be an integer from 1 to 64, got 2.5"):
            duck.execute(q.format("n := 2.5")).fetchall()
    registry.unload()


# -- 4. a model call in an aborted transaction: reldl's OperationalError, one line
def test_model_call_in_an_aborted_transaction(llm):
    llm.execute("CREATE TABLE t AS SELECT 1 AS a")
    before = _models(llm)
    with pytest.raises(reldl.ProgrammingError, match="nosuch"):
        llm.execute("BEGIN; INSERT INTO nosuch VALUES (1); SELECT llm_generate('hi', max_tokens := 1); COMMIT;")
    with pytest.raises(reldl.OperationalError) as info:  # (a literal n := 0 is refused before anything runs)
        llm.execute("SELECT llm_generate('hi', max_tokens := 1)")
    assert "transaction is aborted" in str(info.value) and "\n" not in str(info.value)
    llm.execute("ROLLBACK")
    assert _models(llm) == before and llm.execute("SELECT a FROM t").fetchall() == [(1,)]


# -- 5, 6, 7. offload options: messages in the user's units, NULL said as NULL, offload_dir's parent checked
@pytest.fixture(scope="module")
def opt_ckpt(tmp_path_factory):
    import checkpoints

    return checkpoints.make_checkpoint(tmp_path_factory.mktemp("opt") / "opt", "opt")


BAD_OFFLOAD = [
    ("offload = 'num_gpu_batches = 2.5'", "offload policy: num_gpu_batches must be an integer >= 1, got 2.5"),
    ("offload = 'gpu_batch_size = abc'", "offload policy: gpu_batch_size must be an integer >= 1, got abc"),
    (
        "offload = 'weights = 0/50/40'",
        "offload policy: weights shares must sum to 100 (gpu/cpu/disk %), got 0/50/40 = 90",
    ),
    ("offload = 'weights = -10/60/50'", "offload policy: weights shares must be >= 0 (gpu/cpu/disk %), got -10/60/50"),
    (
        "offload = '{\"cache\": [0.2, 0.3, 0.4]}'",
        "offload policy: cache shares must sum to 1 (gpu/cpu/disk fractions), got 0.2/0.3/0.4 = 0.9",
    ),
    ("offload = NULL", "offload must be 'auto' or a policy (text or JSON), got NULL"),
    ("offload = 'auto', gen_len = NULL", "gen_len must be an integer >= 1, got NULL"),
    ("offload = 'auto', gpu_memory = NULL", "gpu_memory must be a size such as '16GB' or '512MiB', got NULL"),
    ("offload = 'auto', offload_dir = NULL", "offload_dir must be a directory path, got NULL"),
    ("offload = 'auto', offload_dir = '/nonexistent/x'", "offload_dir's parent directory /nonexistent does not exist"),
]


@pytest.mark.parametrize("options, words", BAD_OFFLOAD)
def test_bad_offload_options(conn, opt_ckpt, options, words):
    conn.execute(f"CREATE MODEL keep OPTIONS (model_type = 'llm', path = '{opt_ckpt}', device = 'cpu')")
    before = _models(conn)
    sql = f"CREATE MODEL big OPTIONS (model_type = 'llm', path = '{opt_ckpt}', device = 'cpu', {options})"
    assert _err(conn, sql) == f"CREATE MODEL big: {words}"
    assert _models(conn) == before


def test_offload_dir_reldl_creates_is_owned(conn, opt_ckpt, tmp_path):
    odir = tmp_path / "spill"
    conn.execute(
        f"CREATE MODEL big OPTIONS (model_type = 'llm', path = '{opt_ckpt}', device = 'cpu', offload = 'auto', "
        f"offload_dir = '{odir}')"
    )
    ((opts,),) = conn.execute("SELECT options FROM reldl.models WHERE name = 'big'").fetchall()
    assert json.loads(opts)["owned_dirs"] == [str(odir)]


# -- 6, 8. fine-tuning: NULL options say NULL; lora_* options with finetune = 'full' are refused
FT = f"model_type = 'llm', base = '{BASE}'"
BAD_FINETUNE = [
    ("finetune = 'full', lora_rank = 8", "lora_rank applies only to finetune = 'lora'"),
    ("finetune = 'full', lora_alpha = 4", "lora_alpha applies only to finetune = 'lora'"),
    ("finetune = 'full', lora_targets = 'q', lora_rank = 2", "lora_rank, lora_targets apply only to finetune = 'lora'"),
    ("finetune = NULL", "option 'finetune' must be one of full, lora, got NULL"),
    ("finetune = 'lora', epochs = NULL", "option 'epochs' must be an integer >= 1, got NULL"),
    ("finetune = 'lora', lora_targets = NULL", "lora_targets must be a list like 'q,v', got NULL"),
    ("finetune = 'lora', path = NULL", "option 'path' must be a directory name, got NULL"),
    ("finetune = 'lora', device = NULL", "option 'device' must be text such as 'auto', got NULL"),
]


@pytest.mark.parametrize("options, words", BAD_FINETUNE)
def test_bad_finetune_options(db, tmp_path, options, words):
    before = _models(db)
    sql = f"CREATE MODEL ftx OPTIONS ({FT}, {options}) AS SELECT prompt, completion FROM pairs"
    assert _err(db, sql) == f"CREATE MODEL ftx: {words}"
    assert _models(db) == before and _model_dirs(tmp_path) == []
    assert db.execute("SELECT count(*) FROM pairs").fetchall() == [(4,)]


def test_null_llm_options(db, llama_ckpt):
    before = _models(db)
    for key in ("dtype", "device"):
        sql = f"CREATE MODEL m OPTIONS (model_type = 'llm', path = '{llama_ckpt}', {key} = NULL)"
        assert _err(db, sql) == f"CREATE MODEL m: option '{key}' must be text such as 'auto', got NULL"
    assert _models(db) == before


# -- 9. PREPARE: llm_generate(..., n / beam_width) is rewritten inside it too
def test_prepare_with_n_and_beam_width(llm):
    llm.execute("PREPARE s1 AS SELECT llm_generate(?, max_tokens := 2, n := 2, seed := 3)")
    llm.execute("PREPARE s2 AS SELECT llm_generate(?, max_tokens := 2, beam_width := 2)")
    ((two,),) = llm.execute("EXECUTE s1('the cat')").fetchall()
    ((beams,),) = llm.execute("EXECUTE s2('the cat')").fetchall()
    want = llm.execute("SELECT llm_generate('the cat', max_tokens := 2, n := 2, seed := 3)").fetchall()[0][0]
    assert two == want and len(beams) == 2
    assert _err(llm, "PREPARE s3 AS SELECT llm_generate(?, nn := 2)").startswith("llm_generate: unknown argument 'nn'")
    bad_n = "llm_generate: n must be an integer from 1 to 64, got 2.5"
    assert _err(llm, "PREPARE s4 AS SELECT llm_generate(?, n := 2.5)") == bad_n  # a literal: refused at once
    llm.execute("PREPARE s5 AS SELECT llm_generate(?, n := ?)")
    assert _err(llm, "EXECUTE s5('x', 2.5)") == bad_n


# -- 10. CREATE MODEL ... AS takes one SELECT, nothing that writes
@pytest.mark.parametrize(
    "query",
    [
        "DELETE FROM corpus RETURNING txt",
        "(DELETE FROM corpus RETURNING txt)",
        "INSERT INTO corpus VALUES ('x') RETURNING txt",
        "UPDATE corpus SET txt = 'y' RETURNING txt",
        "DROP TABLE corpus",
    ],
)
def test_create_model_as_not_a_select(db, tmp_path, capfd, query):
    before = _models(db)
    capfd.readouterr()
    assert _err(db, f"CREATE MODEL f {SPARSE} AS {query}") == "CREATE MODEL f: AS must be followed by a SELECT query"
    assert capfd.readouterr().err == ""  # no sqlglot warning on stderr
    assert _models(db) == before and _model_dirs(tmp_path) == []
    assert db.execute("SELECT count(*) FROM corpus").fetchall() == [(8,)]


def test_create_model_query_is_one_select():
    from reldl.planner.statements import CreateModel, Passthrough, parse

    stmts = parse(f"CREATE MODEL f {SPARSE} AS SELECT txt FROM corpus; DROP TABLE corpus")
    assert isinstance(stmts[0], CreateModel) and stmts[0].query == "SELECT txt FROM corpus"
    assert isinstance(stmts[1], Passthrough) and stmts[1].sql == "DROP TABLE corpus"
