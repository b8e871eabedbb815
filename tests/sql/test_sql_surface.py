"""The SQL surface under bad input (QA review): every mistake is a one-line reldl error naming the function, the
argument or the model at fault, raised before anything runs, and EXPLAIN fails the way the statement would."""

from __future__ import annotations

import pytest
from sqlhelpers import MODEL, one_line, usable

import reldl
from reldl.llm import Engine

TABULAR = "churn_mlp"


def _err(conn, sql: str) -> str:
    with pytest.raises(reldl.Error) as info:
        conn.execute(sql).fetchall()
    msg = one_line(info.value)
    assert "Traceback" not in msg and "reldl_" not in msg, msg  # no internal UDF or table names
    return msg


@pytest.fixture
def db(llm):
    """The tiny LLM, a prompts table, and a small MLP trained in SQL (a tabular model)."""
    llm.execute("CREATE TABLE t AS SELECT * FROM (VALUES ('hello'), ('world')) v(prompt)")
    llm.execute(
        "CREATE TABLE cust AS SELECT i::DOUBLE AS a, (2 * i)::DOUBLE AS b, (i % 2 = 0) AS y FROM range(16) r(i)"
    )
    llm.execute(
        f"CREATE MODEL {TABULAR} OPTIONS (model_type = 'mlp', label = 'y', hidden_units = [4], epochs = 1) "
        "AS SELECT a, b, y FROM cust"
    )
    return llm


# -- 1. literal arguments of the wrong type or range: one line naming the argument, before the model runs

BAD_LITERALS = [
    ("max_tokens := 1.5", "llm_generate: max_tokens must be an integer, got 1.5"),
    ("max_tokens := 2.0", "llm_generate: max_tokens must be an integer, got 2.0"),
    ("max_tokens := 'abc'", "llm_generate: max_tokens must be an integer, got 'abc'"),
    ("max_tokens := true", "llm_generate: max_tokens must be an integer, got true"),
    ("max_tokens := NULL", "llm_generate: max_tokens must be an integer >= 0, got NULL"),
    ("max_tokens := -1", "llm_generate: max_tokens must be >= 0, got -1"),
    ("temperature := 'hot'", "llm_generate: temperature must be a number, got 'hot'"),
    ("temperature := -0.5", "llm_generate: temperature must be >= 0, got -0.5"),
    ("top_p := 0", "llm_generate: top_p must be in (0, 1], got 0"),
    ("top_p := 1.5", "llm_generate: top_p must be in (0, 1], got 1.5"),
    ("top_k := 1.5", "llm_generate: top_k must be an integer, got 1.5"),
    ("top_k := -3", "llm_generate: top_k must be >= 0, got -3"),
    ("seed := 1.5", "llm_generate: seed must be an integer, got 1.5"),
    ("seed := 'x'", "llm_generate: seed must be an integer, got 'x'"),
    ("stop := 5", "llm_generate: stop must be a non-empty string or a list of non-empty strings, got 5"),
    ("truncate := 'right'", "llm_generate: truncate must be 'left' or NULL, got 'right'"),
    ("model := 5", "llm_generate: model must be a model name (text), got 5"),
    ("n := 0", "llm_generate: n must be an integer from 1 to 64, got 0"),
    ("n := 1.5", "llm_generate: n must be an integer from 1 to 64, got 1.5"),
    ("n := NULL", "llm_generate: n must be an integer from 1 to 64, got NULL"),
    ("beam_width := 65", "llm_generate: beam_width must be an integer from 1 to 64, got 65"),
    ("n := 2, max_tokens := 1.5", "llm_generate: max_tokens must be an integer, got 1.5"),
    ("n := 2, beam_width := 2", "llm_generate: n and beam_width cannot be combined"),
    ("beam_width := 2, temperature := 0.7", "llm_generate: beam_width needs temperature 0"),
]


@pytest.mark.parametrize("args, message", BAD_LITERALS)
@pytest.mark.parametrize("explain", [False, True], ids=["query", "explain"])
def test_bad_literal_arguments(db, args, message, explain):
    sql = f"SELECT llm_generate(prompt, {args}) FROM t"
    msg = _err(db, ("EXPLAIN " if explain else "") + sql)
    assert msg.startswith(message), msg
    usable(db)


@pytest.mark.parametrize(
    "sql, message",
    [
        ("SELECT llm_generate(123) FROM t", "llm_generate: prompt must be text, got 123"),
        ("SELECT llm_score(prompt, 5) FROM t", "llm_score: continuation must be text, got 5"),
        ("SELECT predict(1, a, b) FROM cust", "predict: model must be a model name (text), got 1"),
        (
            "SELECT llm_generate(prompt, temperature := 'nan'::DOUBLE) FROM t",
            "llm_generate: temperature must be >= 0, got nan",
        ),
        (
            "SELECT llm_generate(prompt, n := 2, temperature := 'nan'::DOUBLE) FROM t",
            "llm_generate: temperature must be >= 0, got nan",
        ),
    ],
)
def test_bad_literal_values_of_other_arguments(db, sql, message):
    assert _err(db, sql) == message


def test_valid_edge_literals_still_run(db):
    rows = db.execute(
        "SELECT llm_generate(prompt, max_tokens := 0), llm_generate(prompt, max_tokens := 2, temperature := NULL, "
        "top_k := 0, top_p := 1), llm_generate(prompt, max_tokens := 2, temperature := 0.5, seed := -1) FROM t"
    ).fetchall()
    assert len(rows) == 2 and all(r[0] == "" and isinstance(r[1], str) and isinstance(r[2], str) for r in rows)


# -- 5. arguments of the wrong SQL type (not literals): the user's function and argument, not the internal UDF


@pytest.mark.parametrize(
    "sql, message",
    [
        (
            "SELECT llm_generate(prompt, top_k := a) FROM t, cust",
            "llm_generate: top_k must be an integer (BIGINT), got DOUBLE",
        ),
        (
            "SELECT llm_generate(prompt, n := 2, seed := a) FROM t, cust",
            "llm_generate: seed must be an integer (BIGINT), got DOUBLE",
        ),
        (
            "SELECT llm_generate(prompt, temperature := prompt) FROM t",
            "llm_generate: temperature must be a number (DOUBLE), got VARCHAR",
        ),
        ("SELECT llm_score(prompt, a) FROM t, cust", "llm_score: continuation must be text (VARCHAR), got DOUBLE"),
    ],
)
def test_wrong_sql_types_name_the_argument(db, sql, message):
    msg = _err(db, sql)
    assert msg.startswith(message), msg
    assert "llm_generate(prompt VARCHAR" in msg or "llm_score(prompt VARCHAR" in msg  # the user-facing signature


# -- 2. a model of the wrong kind: one line, whatever plan the statement gets


@pytest.mark.parametrize("plan", ["auto", "udf", "dl", "relation"])
@pytest.mark.parametrize(
    "sql, message",
    [
        (
            f"SELECT llm_generate(prompt, model := '{TABULAR}') FROM t",
            f"llm_generate: model '{TABULAR}' is a 'mlp' model, not an LLM",
        ),
        (
            f"SELECT llm_generate(prompt, model := '{TABULAR}', n := 2) FROM t",
            f"llm_generate: model '{TABULAR}' is a 'mlp' model, not an LLM",
        ),
        (
            f"SELECT llm_score(prompt, prompt, model := '{TABULAR}') FROM t",
            f"llm_score: model '{TABULAR}' is a 'mlp' model, not an LLM",
        ),
        (
            f"SELECT predict('{MODEL}', a, b) FROM cust",
            f"predict: model '{MODEL}' is a 'llm' model, not a model predict() runs "
            "(mlp, linear_reg, logistic_reg, matrix_factorization, gcn)",
        ),
        (
            f"SELECT predict_proba('{MODEL}', a, b) FROM cust",
            f"predict_proba: model '{MODEL}' is a 'llm' model, not a tabular model (mlp, linear_reg, logistic_reg)",
        ),
        (
            "SELECT llm_generate(prompt, model := 'nosuch') FROM t",
            "llm_generate: model 'nosuch' does not exist (SHOW MODELS lists the registered models)",
        ),
        (
            "SELECT predict('nosuch', a, b) FROM cust",
            "predict: model 'nosuch' does not exist (SHOW MODELS lists the registered models)",
        ),
    ],
)
def test_model_of_the_wrong_kind(db, plan, sql, message):
    if plan != "auto":
        db.execute(f"SET reldl_plan = '{plan}'")
    assert _err(db, sql) == message
    assert _err(db, "EXPLAIN " + sql) == message
    usable(db)


def test_wrong_kind_from_a_column_is_checked_per_row(db):
    """A model named by an expression is resolved when the UDF runs: the same message."""
    msg = _err(db, f"SELECT llm_generate(prompt, model := m) FROM t, (SELECT '{TABULAR}' AS m)")
    assert msg == f"llm_generate: model '{TABULAR}' is a 'mlp' model, not an LLM"


# -- 4. EXPLAIN fails with the statement's own error


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT llm_generate(prompt) FROM nosuch",
        "SELECT llm_generate(nocolumn) FROM t",
        "SELECT llm_generate(prompt, model := 'nosuch') FROM t",
        "SELECT llm_generate(prompt, n := 0) FROM t",
        "SELECT llm_generate(prompt, top_k := a) FROM t, cust",
        "SELECT predict('churn_mlp', a, nocolumn) FROM cust",
        "CREATE TABLE out AS SELECT llm_generate(prompt) FROM nosuch",
    ],
)
def test_explain_fails_like_the_statement(db, sql):
    query = _err(db, sql)
    assert _err(db, "EXPLAIN " + sql) == query
    assert db.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'out'").fetchall() == [(0,)]


def test_explain_of_a_valid_statement_still_shows_the_plan(db):
    lines = [r[0] for r in db.execute("EXPLAIN SELECT llm_generate(prompt, max_tokens := 2) FROM t").fetchall()]
    assert lines[0].startswith("reldl plan:")


# -- 10. a newline stop string is chr(10): SQL strings have no backslash escapes


def test_stop_newline_is_chr10(db, monkeypatch):
    seen = []
    original = Engine.generate_ids

    def spy(self, prompts, params, **kw):
        seen.extend(p.stop for p in params)
        return original(self, prompts, params, **kw)

    monkeypatch.setattr(Engine, "generate_ids", spy)
    db.execute("SELECT llm_generate('hello', max_tokens := 2, stop := chr(10))").fetchall()
    db.execute("SELECT llm_generate('hello', max_tokens := 2, stop := '\\n')").fetchall()
    assert seen == [("\n",), ("\\n",)]  # the README's example uses chr(10); '\n' is a backslash and an n


# -- 8. result columns keep the names DuckDB gives the expressions as the user wrote them, whatever the plan


@pytest.mark.parametrize("plan", ["udf", "dl"])
@pytest.mark.parametrize(
    "sql, names",
    [
        (
            "SELECT prompt, llm_generate(prompt, max_tokens := 2) FROM t",
            ["prompt", "llm_generate(prompt, max_tokens := 2)"],
        ),
        (
            "SELECT llm_generate(prompt, max_tokens := 2, n := 2) FROM t",
            ["llm_generate(prompt, max_tokens := 2, n := 2)"],
        ),
        (
            "SELECT upper(llm_generate(prompt, max_tokens := 2)), llm_generate(prompt, max_tokens := 1) AS g FROM t",
            ["upper(llm_generate(prompt, max_tokens := 2))", "g"],
        ),
        ("SELECT a, predict('churn_mlp', a, b) FROM cust", ["a", "predict('churn_mlp', a, b)"]),
        (
            "SELECT *, predict_proba('churn_mlp', a, b) FROM cust ORDER BY a LIMIT 3",
            ["a", "b", "y", "predict_proba('churn_mlp', a, b)"],
        ),
        ("SELECT llm_generate('say \"hi\"', max_tokens := 1) FROM t", ["llm_generate('say \"hi\"', max_tokens := 1)"]),
    ],
)
def test_result_columns_keep_their_names(db, plan, sql, names):
    db.execute(f"SET reldl_plan = '{plan}'")
    cur = db.execute(sql)
    assert [d[0] for d in cur.description] == names
    assert cur.fetchall()
    db.execute(f"CREATE TABLE made AS {sql}")
    assert [d[0] for d in db.execute("SELECT * FROM made").description] == names


def test_trained_lookup_keeps_the_column_name(db):
    db.execute("CREATE TABLE r AS SELECT i % 4 AS u, i % 3 AS m, (i % 5)::DOUBLE AS stars FROM range(30) x(i)")
    db.execute(
        "CREATE MODEL recs OPTIONS (model_type = 'matrix_factorization', user = 'u', item = 'm', label = 'stars', "
        "num_factors = 2, epochs = 1) AS SELECT u, m, stars FROM r"
    )
    cur = db.execute("SELECT u, predict('recs', u, m) FROM r LIMIT 2")
    assert [d[0] for d in cur.description] == ["u", "predict('recs', u, m)"] and len(cur.fetchall()) == 2


# -- 9. model types: the list in the message is every kind reldl has


def test_unknown_model_type_lists_every_kind(conn):
    from reldl.autodiff.models import MODEL_TYPES as TRAINED
    from reldl.tabular import MODEL_TYPES as TABULAR_TYPES

    msg = _err(conn, "CREATE MODEL x OPTIONS (model_type = 'svm', path = '/x')")
    assert msg.startswith("CREATE MODEL x: model_type 'svm' is not supported (model types: llm, ")
    assert all(t in msg for t in (*TABULAR_TYPES, *TRAINED))
    msg = _err(conn, "CREATE MODEL x OPTIONS (model_type = 'gcn', path = '/x')")
    assert msg == "CREATE MODEL x: model_type 'gcn' is trained in the database: " + (
        "CREATE MODEL x OPTIONS (model_type = 'gcn', ...) AS SELECT ..."
    )


# -- 6. sizes need their unit; offload_dir must be writable


@pytest.fixture(scope="module")
def opt_ckpt(ckpt_root):
    import checkpoints

    return checkpoints.make_checkpoint(ckpt_root / "opt_surface", "opt")


def _offload(name: str, path, extra: str) -> str:
    return f"CREATE MODEL {name} OPTIONS (model_type = 'llm', path = '{path}', device = 'cpu', offload = 'auto'{extra})"


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ", gpu_memory = 16",
            "gpu_memory must be a size such as '16GB' or '512MiB', got 16 without a unit (write '16GB' or '16GiB', "
            "or '16B' for bytes)",
        ),
        (", cpu_memory = '64'", "cpu_memory must be a size such as '16GB' or '512MiB', got '64' without a unit"),
        (", gpu_memory = 0", "gpu_memory must be a positive size, got 0"),
        (", offload_dir = 5", "offload_dir must be a directory path, got 5"),
    ],
)
def test_bad_sizes_and_offload_dirs(conn, opt_ckpt, extra, message):
    assert _err(conn, _offload("big", opt_ckpt, extra)).startswith(f"CREATE MODEL big: {message}")
    assert conn.execute("SELECT count(*) FROM reldl.models").fetchall() == [(0,)]


def test_sizes_with_units(conn, opt_ckpt):
    conn.execute(_offload("big", opt_ckpt, ", gpu_memory = '16 GiB', cpu_memory = '64GB'"))
    ((opts,),) = conn.execute("SELECT options->'offload'->'caps' FROM reldl.models").fetchall()
    assert '"gpu":17179869184' in opts.replace(" ", "") and '"cpu":64000000000' in opts.replace(" ", "")


def test_finetune_gpu_memory_needs_a_unit():
    from reldl.llm.finetune.sql import check_options

    base = {"model_type": "llm", "base": "b", "finetune": "full"}
    with pytest.raises(reldl.ProgrammingError, match="got 16 without a unit"):
        check_options("t", {**base, "gpu_memory": 16}, True)
    s, _ = check_options("t", {**base, "gpu_memory": "1073741824B"}, True)
    assert s.gpu_memory == 2**30


def test_offload_dir_not_writable(conn, opt_ckpt, tmp_path, monkeypatch):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(locked) else real(p, mode, **kw))
    msg = _err(conn, _offload("big", opt_ckpt, f", offload_dir = '{locked}'"))
    assert msg == f"CREATE MODEL big: offload_dir {locked} is not writable"
    msg = _err(conn, _offload("big", opt_ckpt, f", offload_dir = '{locked}/spill'"))
    assert msg == (
        f"CREATE MODEL big: offload_dir {locked}/spill cannot be created (its parent directory {locked} is not "
        "writable)"
    )


# -- 7. EXPLAIN CREATE MODEL: what registering would do (an offload policy), checked like CREATE, nothing registered


def test_explain_create_model_shows_the_offload_policy(conn, opt_ckpt, tmp_path):
    lines = [
        r[0]
        for r in conn.execute(_offload("big", opt_ckpt, ", gpu_memory = '1MB'").replace("CREATE", "EXPLAIN CREATE", 1))
    ]
    assert lines[0] == "CREATE MODEL big: model_type 'llm' (EXPLAIN: nothing is registered)"
    assert any("offload policy:" in line for line in lines) and any("predicted throughput" in line for line in lines)
    assert conn.execute("SELECT count(*) FROM reldl.models").fetchall() == [(0,)]
    plain = [r[0] for r in conn.execute(f"EXPLAIN CREATE MODEL p OPTIONS (model_type = 'llm', path = '{opt_ckpt}')")]
    assert plain[-1].startswith("  not offloaded")
    odir = tmp_path / "spill"
    conn.execute(_offload("big", opt_ckpt, f", offload_dir = '{odir}'").replace("CREATE", "EXPLAIN CREATE", 1))
    assert not odir.exists()


@pytest.mark.parametrize(
    "sql, message",
    [
        (
            "EXPLAIN " + _offload("big", "{ckpt}", ", gpu_memory = '16XB'"),
            "CREATE MODEL big: gpu_memory must be a size such as '16GB' or '512MiB', got '16XB'",
        ),
        ("EXPLAIN CREATE MODEL big OPTIONS (path = '/x')", "CREATE MODEL big: OPTIONS must set model_type"),
        (
            "EXPLAIN CREATE MODEL keep OPTIONS (model_type = 'llm', path = '{ckpt}')",
            "model 'keep' already exists (use CREATE OR REPLACE MODEL)",
        ),
        (
            "EXPLAIN CREATE MODEL m OPTIONS (model_type = 'mlp', label = 'y') AS SELECT 1 AS x, 0 AS y",
            "EXPLAIN CREATE MODEL m: training (AS SELECT) has no plan to show",
        ),
        ("EXPLAIN ANALYZE CREATE MODEL big OPTIONS (model_type = 'llm', path = '/x')", "EXPLAIN ANALYZE CREATE MODEL"),
        ("EXPLAIN DROP MODEL keep", "EXPLAIN DROP MODEL: nothing to explain"),
    ],
)
def test_explain_create_model_errors(conn, opt_ckpt, sql, message):
    conn.execute(f"CREATE MODEL keep OPTIONS (model_type = 'llm', path = '{opt_ckpt}', device = 'cpu')")
    assert _err(conn, sql.format(ckpt=opt_ckpt)).startswith(message)
    assert [r[0] for r in conn.execute("SELECT name FROM reldl.models").fetchall()] == ["keep"]


def test_forced_relation_plan_on_an_llm_says_why(db):
    db.execute("SET reldl_plan = 'relation'")
    with pytest.raises(reldl.ProgrammingError) as info:
        db.execute("SELECT llm_generate(prompt, max_tokens := 2) FROM t")
    assert one_line(info.value) == (
        "reldl_plan = 'relation' is not possible for this statement (it runs tabular models only (mlp, linear_reg, "
        "logistic_reg), as SQL over weight tables)"
    )
