"""CREATE MODEL ... AS <query>: the query runs as DuckDB SQL exactly as written (it was once rewritten from BigQuery's
dialect: "x" became a string, '\\n' a newline, a[1] a[2]), and the statement's own syntax is checked."""

from __future__ import annotations

import pytest

import reldl

TRAIN = "OPTIONS (model_type = 'linear_reg', label = 'y', epochs = 0)"


def _err(conn, sql: str) -> str:
    with pytest.raises(reldl.Error) as info:
        conn.execute(sql)
    msg = str(info.value)
    assert msg and "\n" not in msg
    return msg


@pytest.fixture
def t(conn):
    conn.execute(
        'CREATE TABLE t AS SELECT range::DOUBLE AS "Feature X", [range % 2, 9]::DOUBLE[] AS a, '
        "CASE WHEN range = 3 THEN 'a\\nb' ELSE 'x' END AS s, range::DOUBLE AS y FROM range(10)"
    )
    return conn


def _trained(conn, name: str) -> tuple:
    return conn.execute(
        "SELECT options->>'features', (options->>'rows')::INT FROM reldl.models WHERE name = ?", [name]
    ).fetchone()


@pytest.mark.parametrize(
    "query, features, rows",
    [
        ('SELECT "Feature X", y FROM t', '["Feature X"]', 10),  # a quoted identifier, not the string 'Feature X'
        ("SELECT a[1] AS f, y FROM t WHERE a[1] = 1", '["f"]', 5),  # 1-based, as DuckDB indexes lists
        ("SELECT y AS f, y FROM t WHERE s = 'a\\nb'", '["f"]', 1),  # '\n' is a backslash and an n
        ('FROM t SELECT "Feature X" AS f, y', '["f"]', 10),  # DuckDB's FROM-first SELECT
    ],
    ids=["quoted_identifier", "list_index", "no_string_escapes", "from_first"],
)
def test_query_runs_as_written(t, query, features, rows):
    t.execute(f"CREATE MODEL m {TRAIN} AS {query}")
    assert _trained(t, "m") == (features, rows)


def test_query_in_a_script_after_other_statements(conn):
    conn.execute(
        "CREATE TABLE u AS SELECT range::DOUBLE AS x, range::DOUBLE AS y FROM range(4); "
        f"CREATE MODEL m {TRAIN} AS SELECT x, y FROM u WHERE x > 0"
    )
    assert _trained(conn, "m") == ('["x"]', 3)


def test_query_that_writes_is_refused(t):
    sql = f'CREATE MODEL m {TRAIN} AS WITH d AS (DELETE FROM t RETURNING *) SELECT "Feature X", y FROM d'
    assert _err(t, sql) == "CREATE MODEL m: AS must be followed by a SELECT query"
    assert t.execute("SELECT count(*) FROM t").fetchall() == [(10,)]
    assert t.execute("SELECT count(*) FROM reldl.models").fetchall() == [(0,)]


@pytest.mark.parametrize(
    "sql, message",
    [
        (f'CREATE MODEL "" {TRAIN} AS SELECT 1 AS x, 2 AS y', "CREATE MODEL: the model name is empty"),
        (
            f"CREATE OR REPLACE MODEL IF NOT EXISTS m {TRAIN} AS SELECT 1 AS x, 2 AS y",
            "CREATE MODEL m: OR REPLACE and IF NOT EXISTS cannot be combined",
        ),
        (
            f"CREATE MODEL m {TRAIN} AS SELECT FROM WHERE",
            'CREATE MODEL m: Parser Error: syntax error at or near "WHERE"',
        ),
    ],
)
def test_bad_create_model_statements(conn, sql, message):
    assert _err(conn, sql) == message
    assert conn.execute("SELECT count(*) FROM reldl.models").fetchall() == [(0,)]


@pytest.mark.parametrize("name", ["from", "as", "select", "my-model"])
def test_register_model_takes_keyword_names(conn, llama_ckpt, name):
    reldl.register_model(conn, name, str(llama_ckpt), dtype="float32", device="cpu")
    assert conn.execute("SELECT name FROM reldl.models").fetchall() == [(name,)]
    conn.execute(f'DROP MODEL "{name}"')
    assert conn.execute("SELECT count(*) FROM reldl.models").fetchall() == [(0,)]


@pytest.mark.parametrize("dirname", ["bob's models", "a\\nb"], ids=["apostrophe", "backslash"])
def test_option_strings_are_duckdb_strings(conn, llama_ckpt, tmp_path, dirname):
    """'' is a quote and a backslash is a backslash, as everywhere in DuckDB's SQL (not BigQuery's escapes)."""
    link = tmp_path / dirname
    link.symlink_to(llama_ckpt, target_is_directory=True)
    quoted = "'" + str(link).replace("'", "''") + "'"
    conn.execute(f"CREATE MODEL m OPTIONS (model_type = 'llm', path = {quoted}, device = 'cpu')")
    reldl.register_model(conn, "m2", str(link), device="cpu")
    assert conn.execute("SELECT name, path FROM reldl.models ORDER BY name").fetchall() == [
        ("m", str(llama_ckpt.resolve())),
        ("m2", str(llama_ckpt.resolve())),
    ]


@pytest.mark.parametrize(
    "options, message",
    [
        ("(model_type = 'mlp', epochs = 1 + 2)", "CREATE MODEL m: option 'epochs' must be a literal, got 1 + 2"),
        ("(model_type = 'mlp', epochs)", "CREATE MODEL m: OPTIONS takes key = value pairs"),
        ("(model_type = 'mlp') extra", "syntax: CREATE [OR REPLACE] MODEL"),
    ],
)
def test_bad_options(conn, options, message):
    assert _err(conn, f"CREATE MODEL m OPTIONS {options}").startswith(message)


def test_training_inside_a_transaction_is_refused_and_leaves_it_open(conn):
    conn.execute("CREATE TABLE u AS SELECT range::DOUBLE AS x, range::DOUBLE AS y FROM range(4)")
    conn.execute("BEGIN")
    conn.execute("INSERT INTO u VALUES (9, 9)")
    assert _err(conn, f"CREATE MODEL m {TRAIN} AS SELECT x, y FROM u") == (
        "CREATE MODEL m: training in the database commits its steps one by one, so it cannot run inside a "
        "transaction (BEGIN ... COMMIT): run it outside one"
    )
    conn.execute("COMMIT")  # the transaction was not aborted: its insert is kept
    assert conn.execute("SELECT count(*) FROM u").fetchall() == [(5,)]
    assert conn.execute("SELECT count(*) FROM reldl.models").fetchall() == [(0,)]
