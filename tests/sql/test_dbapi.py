"""PEP 249 surface of reldl.connect(): module attributes, exceptions, Connection and Cursor. SQL in, rows out."""

from __future__ import annotations

import inspect
import warnings

import duckdb
import pytest
from sqlhelpers import one_line, usable

import reldl

# ---------------------------------------------------------------------------------------------- module


def test_module_attributes():
    assert reldl.apilevel == "2.0"
    assert reldl.threadsafety == 1
    assert reldl.paramstyle == "qmark"


def test_connect_signature():
    sig = inspect.signature(reldl.connect)
    params = sig.parameters
    assert list(params) == ["database", "read_only", "config"]
    assert params["database"].default == ":memory:"
    assert params["read_only"].kind is inspect.Parameter.KEYWORD_ONLY and params["read_only"].default is False
    assert params["config"].kind is inspect.Parameter.KEYWORD_ONLY and params["config"].default is None


def test_connect_defaults_to_memory_and_takes_config():
    with reldl.connect() as c:
        assert c.execute("SELECT 1").fetchall() == [(1,)]
    with reldl.connect(":memory:", config={"threads": 1}) as c:
        assert c.execute("SELECT current_setting('threads')").fetchall() == [(1,)]


def test_exception_hierarchy():
    assert issubclass(reldl.Warning, Exception)
    assert issubclass(reldl.Error, Exception)
    assert not issubclass(reldl.Warning, reldl.Error)
    assert issubclass(reldl.InterfaceError, reldl.Error)
    assert issubclass(reldl.DatabaseError, reldl.Error)
    for cls in (
        reldl.DataError,
        reldl.OperationalError,
        reldl.IntegrityError,
        reldl.InternalError,
        reldl.ProgrammingError,
        reldl.NotSupportedError,
    ):
        assert issubclass(cls, reldl.DatabaseError), cls
    assert not issubclass(reldl.InterfaceError, reldl.DatabaseError)


@pytest.mark.parametrize(
    "setup, sql, cls, words",
    [
        ("", "SELEC 1", reldl.ProgrammingError, "syntax error"),
        ("", "SELECT * FROM no_such_table", reldl.ProgrammingError, "no_such_table"),
        ("CREATE TABLE t (a INT PRIMARY KEY)", "INSERT INTO t VALUES (1), (1)", reldl.IntegrityError, "primary key"),
        ("CREATE TABLE t (a INT NOT NULL)", "INSERT INTO t VALUES (NULL)", reldl.IntegrityError, "NOT NULL"),
        ("", "SELECT 'abc'::INTEGER", reldl.DataError, "Conversion Error"),
        ("", "SELECT 'x'::DATE", reldl.DataError, "Conversion Error"),
        ("", "SELECT 2147483647::INTEGER + 1", reldl.DataError, "Overflow"),
        # DuckDB classifies division by zero as invalid input (a ProgrammingError); DataError would also do
        ("", "SELECT 1 // 0", (reldl.DataError, reldl.ProgrammingError), "Division by zero"),
    ],
)
def test_duckdb_errors_are_mapped(conn, setup, sql, cls, words):
    if setup:
        conn.execute(setup)
    with pytest.raises(cls) as info:
        conn.execute(sql).fetchall()
    assert not isinstance(info.value, duckdb.Error)  # reldl's own classes, not DuckDB's
    assert words.lower() in one_line(info.value).lower()
    usable(conn)


def test_errors_from_cursor_are_mapped_too(conn):
    cur = conn.cursor()
    with pytest.raises(reldl.ProgrammingError) as info:
        cur.execute("SELECT FROM WHERE")
    one_line(info.value)
    assert cur.execute("SELECT 1").fetchall() == [(1,)]


# ---------------------------------------------------------------------------------------------- connection


def test_connection_execute_returns_cursor(conn):
    cur = conn.execute("SELECT 1 AS a, 'x' AS b")
    assert isinstance(cur, reldl.Cursor)
    assert cur.fetchall() == [(1, "x")]


def test_cursor_returns_new_cursors(conn):
    a, b = conn.cursor(), conn.cursor()
    assert a is not b and isinstance(a, reldl.Cursor)
    assert a.connection is conn
    a.execute("CREATE TABLE t AS SELECT 7 AS x")
    assert b.execute("SELECT x FROM t").fetchall() == [(7,)]
    assert conn.execute("SELECT x FROM t").fetchall() == [(7,)]


def test_duckdb_connection_is_reachable(conn):
    conn.execute("CREATE TABLE t AS SELECT 5 AS x")
    duck = conn.duckdb_connection
    assert isinstance(duck, duckdb.DuckDBPyConnection)
    assert duck.execute("SELECT x FROM t").fetchall() == [(5,)]


def test_rollback_undoes(conn):
    conn.execute("CREATE TABLE t (a INT)")
    conn.execute("BEGIN TRANSACTION")
    conn.execute("INSERT INTO t VALUES (1), (2)")
    assert conn.execute("SELECT count(*) FROM t").fetchall() == [(2,)]
    conn.rollback()
    assert conn.execute("SELECT count(*) FROM t").fetchall() == [(0,)]


def test_commit_persists(tmp_path):
    db = str(tmp_path / "commit.db")
    c = reldl.connect(db)
    c.execute("CREATE TABLE t (a INT)")
    c.execute("BEGIN")
    c.execute("INSERT INTO t VALUES (1)")
    c.commit()
    c.rollback()  # nothing open any more: a no-op
    assert c.cursor().execute("SELECT a FROM t").fetchall() == [(1,)]
    c.close()
    with reldl.connect(db) as c2:
        assert c2.execute("SELECT a FROM t").fetchall() == [(1,)]


def test_commit_and_rollback_without_transaction_are_noops(conn):
    conn.commit()
    conn.rollback()
    usable(conn)


def test_rollback_undoes_work_of_cursors(conn):
    conn.execute("CREATE TABLE t (a INT)")
    cur = conn.cursor()
    cur.execute("BEGIN")
    cur.execute("INSERT INTO t VALUES (1)")
    conn.rollback()
    assert cur.execute("SELECT count(*) FROM t").fetchall() == [(0,)]


def test_closed_connection_raises_interface_error():
    c = reldl.connect()
    cur = c.cursor()
    cur.execute("SELECT 1")
    c.close()
    assert c.closed
    c.close()  # closing twice is fine
    for call in (
        lambda: c.execute("SELECT 1"),
        c.cursor,
        c.commit,
        c.rollback,
        lambda: cur.execute("SELECT 1"),
        cur.fetchall,
    ):
        with pytest.raises(reldl.InterfaceError) as info:
            call()
        assert "closed" in one_line(info.value)


def test_closed_cursor_raises_interface_error(conn):
    cur = conn.cursor()
    cur.execute("SELECT 1")
    cur.close()
    cur.close()
    with pytest.raises(reldl.InterfaceError):
        cur.execute("SELECT 1")
    with pytest.raises(reldl.InterfaceError):
        cur.fetchone()
    usable(conn)  # the connection (and its other cursors) live on
    assert conn.cursor().execute("SELECT 2").fetchall() == [(2,)]


def test_closing_the_cursor_of_connection_execute_keeps_the_connection(conn):
    conn.execute("CREATE TABLE t AS SELECT 1 AS a")
    with conn.execute("SELECT a FROM t") as cur:
        assert cur.fetchall() == [(1,)]
    assert conn.execute("SELECT a FROM t").fetchall() == [(1,)]
    assert conn.cursor().execute("SELECT a FROM t").fetchall() == [(1,)]


def test_context_manager_commits_and_closes(tmp_path):
    db = str(tmp_path / "ctx.db")
    with reldl.connect(db) as c:
        c.execute("CREATE TABLE t (a INT)")
        c.execute("BEGIN")
        c.execute("INSERT INTO t VALUES (1)")
    assert c.closed
    with pytest.raises(reldl.InterfaceError):
        c.execute("SELECT 1")
    with reldl.connect(db) as c:
        assert c.execute("SELECT a FROM t").fetchall() == [(1,)]


def test_context_manager_rolls_back_on_error(tmp_path):
    db = str(tmp_path / "ctx_err.db")
    with reldl.connect(db) as c:
        c.execute("CREATE TABLE t (a INT)")
    with pytest.raises(ZeroDivisionError):
        with reldl.connect(db) as c:
            c.execute("BEGIN")
            c.execute("INSERT INTO t VALUES (1)")
            1 / 0  # noqa: B018
    assert c.closed
    with reldl.connect(db) as c:
        assert c.execute("SELECT count(*) FROM t").fetchall() == [(0,)]


# ---------------------------------------------------------------------------------------------- cursor


@pytest.fixture
def table(conn):
    conn.execute("CREATE TABLE t (id INTEGER, name VARCHAR, score DOUBLE)")
    conn.execute("INSERT INTO t VALUES (1, 'a', 0.5), (2, 'b', NULL), (3, NULL, 1.5), (4, 'd', 2.5), (5, 'e', 3.5)")
    return conn


def test_execute_qmark_parameters(table):
    cur = table.cursor()
    cur.execute("SELECT id, name FROM t WHERE id > ? AND name <> ? ORDER BY id", [2, "d"])
    assert cur.fetchall() == [(5, "e")]
    cur.execute("SELECT ?::VARCHAR || ?", ("x", "y"))
    assert cur.fetchall() == [("xy",)]
    assert table.execute("SELECT name FROM t WHERE id = ?", [4]).fetchall() == [("d",)]


def test_execute_wrong_number_of_parameters(table):
    with pytest.raises(reldl.ProgrammingError) as info:
        table.execute("SELECT * FROM t WHERE id = ?", [1, 2])
    one_line(info.value)
    usable(table)


def test_parameters_need_a_single_statement(conn):
    with pytest.raises(reldl.ProgrammingError):
        conn.execute("SELECT ?; SELECT ?", [1])


def test_script_returns_last_result(conn):
    cur = conn.cursor()
    cur.execute("CREATE TABLE s (a INT); INSERT INTO s VALUES (1), (2); SELECT sum(a) FROM s")
    assert cur.fetchall() == [(3,)]


def test_executemany(table):
    cur = table.cursor()
    cur.executemany("INSERT INTO t VALUES (?, ?, ?)", [(10, "x", 1.0), (11, "y", None), (12, None, 2.0)])
    assert cur.rowcount == -1  # not the last set's 1: DuckDB gives no total
    cur.executemany("UPDATE t SET score = ? WHERE id >= ?", [(5.0, 11)])
    assert cur.rowcount == 2  # one parameter set: its count
    assert cur.execute("SELECT id, name, score FROM t WHERE id >= 10 ORDER BY id").fetchall() == [
        (10, "x", 1.0),
        (11, "y", 5.0),
        (12, None, 5.0),
    ]


def test_fetchone_fetchmany_fetchall(table):
    cur = table.cursor()
    assert cur.arraysize == 1
    cur.execute("SELECT id FROM t ORDER BY id")
    assert cur.fetchone() == (1,)
    assert cur.fetchmany() == [(2,)]  # arraysize rows
    assert cur.fetchmany(2) == [(3,), (4,)]
    assert cur.fetchall() == [(5,)]
    assert cur.fetchone() is None
    assert cur.fetchmany() == []
    assert cur.fetchall() == []
    cur.arraysize = 3
    cur.execute("SELECT id FROM t ORDER BY id")
    assert cur.fetchmany() == [(1,), (2,), (3,)]


def test_fetch_before_execute_is_an_error(conn):
    cur = conn.cursor()
    assert cur.description is None
    assert cur.rowcount == -1
    with pytest.raises(reldl.Error):
        cur.fetchall()


def test_description(table):
    cur = table.cursor()
    cur.execute("SELECT id, name, score FROM t")
    desc = cur.description
    assert [d[0] for d in desc] == ["id", "name", "score"]
    assert all(len(d) == 7 for d in desc)
    cur.execute("SELECT 1 AS only_col")
    assert [d[0] for d in cur.description] == ["only_col"]


def test_rowcount(table):
    cur = table.cursor()
    cur.execute("UPDATE t SET score = 0 WHERE id <= 3")
    assert cur.rowcount == 3
    cur.execute("DELETE FROM t WHERE id = 5")
    assert cur.rowcount == 1
    cur.execute("SELECT * FROM t")
    assert cur.rowcount == -1  # unknown for queries, as PEP 249 allows


def test_iteration(table):
    cur = table.cursor()
    cur.execute("SELECT id FROM t ORDER BY id")
    assert [r[0] for r in cur] == [1, 2, 3, 4, 5]
    assert list(table.execute("SELECT name FROM t WHERE id < 3 ORDER BY id")) == [("a",), ("b",)]


def test_fetch_arrow_table(table):
    pa = pytest.importorskip("pyarrow")
    cur = table.cursor()
    cur.execute("SELECT id, name FROM t ORDER BY id")
    tbl = cur.fetch_arrow_table()
    assert isinstance(tbl, pa.Table)
    assert tbl.column_names == ["id", "name"]
    assert tbl.column("id").to_pylist() == [1, 2, 3, 4, 5]
    assert tbl.column("name").to_pylist() == ["a", "b", None, "d", "e"]


def test_fetch_arrow_table_warns_nothing(table):
    """No DuckDB warning reaches the user: neither the deprecation of fetch_arrow_table nor DuckDB's advice to
    use con.sql(query).to_arrow_table(), which a reldl cursor (its statement already run) cannot follow."""
    pytest.importorskip("pyarrow")
    cur = table.cursor()
    cur.execute("SELECT id FROM t ORDER BY id")
    assert cur.fetchone() == (1,)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tbl = cur.fetch_arrow_table()  # the rest of the result, as before
    assert tbl.column("id").to_pylist() == [2, 3, 4, 5]


def test_fetchdf(table):
    pytest.importorskip("pandas")
    df = table.execute("SELECT id, name FROM t ORDER BY id").fetchdf()
    assert list(df.columns) == ["id", "name"]
    assert df["id"].tolist() == [1, 2, 3, 4, 5]


def test_cursor_context_manager(table):
    with table.cursor() as cur:
        assert cur.execute("SELECT count(*) FROM t").fetchall() == [(5,)]
    with pytest.raises(reldl.InterfaceError):
        cur.execute("SELECT 1")
    usable(table)


def test_setinputsizes_setoutputsize_exist(conn):
    cur = conn.cursor()
    cur.setinputsizes([None])
    cur.setoutputsize(10)
    cur.setoutputsize(10, 0)


def test_connect_takes_paths_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(reldl.ProgrammingError, match="database must be a file path or ':memory:', got 123"):
        reldl.connect(123)
    assert list(tmp_path.iterdir()) == []  # no file named "123"
    with reldl.connect(tmp_path / "p.db") as conn:  # a pathlib.Path is fine
        assert conn.execute("SELECT 1").fetchall() == [(1,)]


@pytest.mark.parametrize(
    "sql, params, what",
    [
        ("CREATE MODEL m OPTIONS (model_type = 'llm', path = ?)", ["/models/x"], "CREATE MODEL"),
        (
            "CREATE MODEL m OPTIONS (model_type = 'linear_reg', label = 'y') AS SELECT 1.0 AS x, 2.0 AS y WHERE 1 > ?",
            [0],
            "CREATE MODEL",
        ),
        ("DROP MODEL ?", ["m"], "DROP MODEL"),
        ("SHOW MODELS", {"x": 1}, "SHOW MODELS"),
        ("SET reldl_plan = ?", ["dl"], "SET reldl_plan"),
    ],
)
def test_reldl_statements_refuse_parameters(conn, sql, params, what):
    """They were ignored: path = ? registered the path '?', DROP MODEL ? looked for a model named '?'."""
    with pytest.raises(reldl.NotSupportedError) as info:
        conn.execute(sql, params)
    assert one_line(info.value).startswith(f"{what} does not take parameters (? or $name)")
    assert conn.execute("SELECT count(*) FROM reldl.models").fetchall() == [(0,)]
    conn.execute("SHOW MODELS", [])  # no parameters given: fine


def test_executemany_of_a_reldl_statement(conn):
    cur = conn.cursor()
    with pytest.raises(reldl.NotSupportedError) as info:
        cur.executemany("DROP MODEL IF EXISTS m", [(), ()])
    assert one_line(info.value) == (
        "executemany() runs DuckDB statements with parameters; run reldl's own with execute()"
    )
    with pytest.raises(reldl.ProgrammingError, match="takes a single SQL statement, got 2"):
        cur.executemany("SELECT ?; SELECT ?", [(1,)])
