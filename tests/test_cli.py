"""The `reldl` command line and its shell: fast, no model needed."""

from __future__ import annotations

import io
import subprocess
import sys
from decimal import Decimal

import pytest

import reldl
from reldl.cli import main
from reldl.shell import Shell, format_table, readline_history, returns_rows, statement_complete

DESC = [("id", "INTEGER"), ("name", "VARCHAR")]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- format_table


def test_format_table_aligns_numbers_right_and_text_left():
    table = format_table(DESC, [(1, "alice"), (100, "bo")])
    assert table.splitlines() == [
        "  id | name",
        "-----+-------",
        "   1 | alice",
        " 100 | bo",
        "(2 rows)",
    ]


def test_format_table_null_wrapping_newlines():
    rows = [(None, "x" * 20), (Decimal("1.5"), "a\nb")]
    lines = format_table(DESC, rows, max_width=10).splitlines()
    assert lines[2:5] == [" NULL | xxxxxxxxxx", "      | xxxxxxxxxx", "  1.5 | a\\nb"]  # wrapped, nothing cut off
    assert all(len(line) <= len(lines[1]) for line in lines[:5])


def test_format_table_wraps_long_text_at_spaces_and_keeps_all_of_it():
    text = "the quick brown fox jumps over the lazy dog " * 3
    lines = format_table(DESC, [(1, text)], max_width=30).splitlines()
    cells = [line.split(" | ", 1)[1] for line in lines[2:-1]]
    assert all(len(c) <= 30 for c in cells) and len(cells) > 1
    assert " ".join(cells).split() == text.split()
    assert lines[3].startswith("    | ")  # continuation lines leave the other columns empty
    assert format_table(DESC, [(1, text)], max_width=0).splitlines()[2] == "  1 | " + text.rstrip()


def test_explain_prints_in_full(capsys):
    code, out, err = run(capsys, "sql", "-c", "EXPLAIN SELECT 1")
    assert (code, err) == (0, "")
    assert "Projection" in out and "\\n" not in out and "…" not in out and len(out.splitlines()) > 3
    code, out, _ = run(capsys, "sql", "--max-width", "20", "-c", "SELECT repeat('ab ', 30) AS s")
    assert code == 0 and out.count("ab") == 30 and all(len(line) <= 24 for line in out.splitlines())


def test_reldl_explain_lines_are_not_clipped():
    """reldl's own EXPLAIN (a statement with model calls) prints its lines as text, none cut at any width."""
    from reldl.shell import format_explain

    long = "  why: " + "x" * 200
    assert format_explain([("reldl plan: UDF-centric",), (long,)]) == "reldl plan: UDF-centric\n" + long


def test_format_table_footers():
    assert format_table(DESC, [(1, "a")]).splitlines()[-1] == "(1 row)"
    assert format_table(DESC, []).splitlines() == [" id | name", "----+------", "(0 rows)"]
    assert format_table(DESC, [(1, "a")], total=5000).splitlines()[-1] == "(5000 rows, 1 shown)"


def test_format_table_values_read_like_duckdb():
    table = format_table([("b", "BOOLEAN"), ("l", "INTEGER[]"), ("s", "STRUCT")], [(True, [1, None], {"k": "v"})])
    assert table.splitlines()[2] == " true | [1, NULL] | {'k': v}"


def test_status_results_are_not_result_sets():
    conn = reldl.connect()
    cur = conn.cursor()
    assert not returns_rows("CREATE TABLE t(a INT)", cur.execute("CREATE TABLE t(a INT)").description)
    assert not returns_rows("INSERT INTO t VALUES (1)", cur.execute("INSERT INTO t VALUES (1)").description)
    assert returns_rows("SELECT 1 AS Count", cur.execute("SELECT 1::BIGINT AS Count").description)
    assert returns_rows("SELECT a FROM t", cur.execute("SELECT a FROM t").description)


def test_statement_complete():
    assert statement_complete("SELECT 1;\n")
    assert statement_complete("SELECT 1; -- done\n")
    assert not statement_complete("SELECT 1\n")
    assert not statement_complete("SELECT 'a;\n")  # inside a string
    assert not statement_complete("SELECT 1 /* ; \n")  # inside a comment


# -- reldl sql / reldl models


def test_sql_command_prints_last_result(capsys):
    code, out, err = run(capsys, "sql", "-c", "SELECT 1 AS a; SELECT 42 AS answer, 'x' AS s")
    assert (code, err) == (0, "")
    assert out == " answer | s\n--------+---\n     42 | x\n(1 row)\n"


def test_sql_command_without_result_prints_nothing(capsys):
    assert run(capsys, "sql", "-c", "CREATE TABLE t(a INT); INSERT INTO t VALUES (1)") == (0, "", "")


def test_script_from_stdin_prints_each_result(capsys, monkeypatch):
    script = (
        "CREATE TABLE t(a INT);\nINSERT INTO t VALUES (1), (2);\nSELECT count(*) AS n FROM t;\nSELECT 'done' AS s;\n"
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    code, out, err = run(capsys, "sql")
    assert (code, err) == (0, "")
    assert out == " n\n---\n 2\n(1 row)\n s\n------\n done\n(1 row)\n"


def test_script_from_stdin_runs_dot_commands(capsys, monkeypatch):
    script = "CREATE TABLE t(a INT);\n.tables\n.width 3\nSELECT 'abcdef' AS s;\n.quit\nSELECT 'not run' AS s;\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    code, out, err = run(capsys, "sql")
    assert (code, err) == (0, "")
    assert out == " name | type\n------+------------\n t    | base table\n(1 row)\n s\n-----\n abc\n def\n(1 row)\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(".bogus\nSELECT 1;\n"))
    assert run(capsys, "sql") == (1, "", "Error: unknown command .bogus (try .help)\n")  # stops, as a SQL error does


def test_error_exits_1_with_one_line_message(capsys, monkeypatch):
    code, out, err = run(capsys, "sql", "-c", "SELEC 1")
    assert (code, out) == (1, "")
    assert err.startswith("Error: ") and err.count("\n") == 1 and "Traceback" not in err

    monkeypatch.setattr(sys, "stdin", io.StringIO("SELECT 1 AS a;\nSELECT * FROM missing;\nSELECT 2 AS b;\n"))
    code, out, err = run(capsys, "sql")
    assert code == 1 and " a\n" in out and " b\n" not in out  # the script stops at its first error
    assert err.startswith("Error: ") and "missing" in err


def test_max_rows(capsys):
    code, out, _ = run(capsys, "sql", "--max-rows", "2", "-c", "SELECT range AS i FROM range(5)")
    assert code == 0 and out.splitlines()[-3:] == [" 0", " 1", "(5 rows, 2 shown)"]


def test_database_persists_across_runs(capsys, tmp_path):
    db = str(tmp_path / "my.db")
    assert run(capsys, "sql", db, "-c", "CREATE TABLE t AS SELECT 7 AS x")[0] == 0
    code, out, _ = run(capsys, "sql", db, "--read-only", "-c", "SELECT x FROM t")
    assert code == 0 and out.splitlines()[2] == " 7"


def test_models_on_empty_database(capsys, tmp_path):
    db = str(tmp_path / "empty.db")
    run(capsys, "sql", db, "-c", "SELECT 1")
    code, out, err = run(capsys, "models", db)
    assert (code, err) == (0, "")
    assert out.splitlines()[0].split(" | ") == [" name", "model_type", "path", "options", "created_at"]
    assert out.splitlines()[-1] == "(0 rows)"


def test_models_does_not_create_a_database(capsys, tmp_path):
    code, _, err = run(capsys, "models", str(tmp_path / "nope.db"))
    assert code == 1 and err.startswith("Error: ") and not (tmp_path / "nope.db").exists()


def test_unusable_paths_exit_1_with_one_line_naming_them(capsys, tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    for argv, why in (
        (("demo", "--dir", str(f / "sub"), "--rows", "1"), f"{str(f / 'sub')!r} cannot be created"),
        (("demo", "--dir", str(f), "--rows", "1"), f"{str(f)!r} is not a directory"),
        (
            (
                "sql",
                "-c",
                "CREATE TABLE t AS SELECT 1.0 AS x, 1 AS y; CREATE MODEL m OPTIONS (model_type = 'linear_reg', "
                f"label = 'y', path = '{f / 'sub'}') AS SELECT * FROM t",
            ),
            f"{str(f / 'sub')!r} cannot be created",
        ),
    ):
        code, out, err = run(capsys, *argv)
        assert code == 1 and err.startswith("Error: ") and err.count("\n") == 1 and why in err, (argv, err)
    assert f.read_text() == "x"


def _fake_calibrate(duck, out=print, offload=True):
    """`reldl.calibrate.calibrate` without the measuring: stores and prints one constant."""
    from reldl.calibrate import SCHEMA

    duck.execute(SCHEMA)
    duck.execute("INSERT OR REPLACE INTO reldl.calibration (key, value) VALUES ('sql_flops', 123.0)")
    out("sql_flops                       123")
    return {"sql_flops": 123.0}


def test_calibrate_without_a_database_says_nothing_was_stored(capsys, monkeypatch):
    monkeypatch.setattr("reldl.calibrate.calibrate", _fake_calibrate)
    code, out, err = run(capsys, "calibrate")
    assert code == 0 and "sql_flops" in out  # the measurements are shown
    assert err.count("\n") == 1 and "not stored" in err and "reldl calibrate my.db" in err
    code, out, _ = run(capsys, "calibrate", "--help")
    assert code == 0 and "without it they are measured and printed, not stored" in " ".join(out.split())


def test_calibrate_stores_in_the_database_given(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("reldl.calibrate.calibrate", _fake_calibrate)
    db = str(tmp_path / "my.db")
    code, out, err = run(capsys, "calibrate", db)
    assert (code, err) == (0, "") and out.splitlines()[-1] == f"stored in {db} (table reldl.calibration)"
    code, out, _ = run(capsys, "sql", db, "--read-only", "-c", "SELECT value FROM reldl.calibration")
    assert code == 0 and out.splitlines()[2] == " 123.0"


def test_help_version_and_usage_errors(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "sql" in out and "models" in out and "reldl models my.db" in out
    code, out, _ = run(capsys, "--version")
    assert code == 0 and reldl.__version__ in out
    assert run(capsys)[0] == 2
    assert run(capsys, "sql", "--no-such-flag")[0] == 2


def test_python_dash_m():
    proc = subprocess.run(
        [sys.executable, "-m", "reldl", "sql", "-c", "SELECT 1"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == " 1\n---\n 1\n(1 row)\n"


# -- the interactive shell


def feed(lines: list[str | type[BaseException]]):
    """A fake input(): returns the lines in order (raising any exception class given), then Ctrl-D."""
    prompts: list[str] = []
    items = iter(lines)

    def input_fn(prompt: str) -> str:
        prompts.append(prompt)
        item = next(items, EOFError)
        if isinstance(item, type):
            raise item
        return item

    return input_fn, prompts


def test_shell_multiline_statements_dot_commands_and_errors():
    lines = [
        "",
        "CREATE TABLE t(a INT);",
        "INSERT INTO t",
        "VALUES (1), (2);",
        "SELECT sum(a) AS total",
        "FROM t; SELECT 'x;y' AS s;",
        "SELEC 1;",
        ".tables",
        ".models",
        ".bogus",
        ".help",
        "SELECT 'never run'",
        KeyboardInterrupt,
        "SELECT 'after ctrl-c' AS s;",
    ]
    input_fn, prompts = feed(lines)
    out, err = io.StringIO(), io.StringIO()
    assert Shell(reldl.connect(), input_fn=input_fn, out=out, err=err).run() == 0
    text = out.getvalue()
    assert text.count("OK\n") == 2
    assert "   3\n(1 row)" in text and " x;y\n" in text
    assert " t    | base table" in text  # .tables
    assert " name | model_type" in text  # .models
    assert ".quit" in text  # .help
    assert "never run" not in text and " after ctrl-c\n" in text
    assert err.getvalue().splitlines() == [
        'Error: Parser Error: syntax error at or near "SELEC"',
        "Error: unknown command .bogus (try .help)",
    ]
    assert prompts[:5] == ["reldl> ", "reldl> ", "reldl> ", "   ...> ", "reldl> "]


def test_shell_quit():
    input_fn, prompts = feed([".quit", "SELECT 1;"])
    out = io.StringIO()
    assert Shell(reldl.connect(), input_fn=input_fn, out=out).run() == 0
    assert prompts == ["reldl> "] and out.getvalue() == ""


def test_history_file(tmp_path, monkeypatch):
    readline = pytest.importorskip("readline")
    path = tmp_path / "history"
    monkeypatch.setenv("RELDL_HISTORY", str(path))
    with readline_history():
        readline.add_history("SELECT 42;")
    assert "42" in path.read_text()


def test_shell_survives_an_interrupted_query(monkeypatch):
    def interrupted_query(*args, **kw):
        raise RuntimeError("Query interrupted")  # what DuckDB raises when Ctrl-C stops a running query

    monkeypatch.setattr("reldl.shell.run_script", interrupted_query)
    input_fn, prompts = feed(["SELECT 1;", "SELECT 2;"])
    err = io.StringIO()
    assert Shell(reldl.connect(), input_fn=input_fn, out=io.StringIO(), err=err).run() == 0
    assert err.getvalue() == "Error: interrupted\n" * 2 and len(prompts) == 3


# -- bad input never ends the shell: reldl errors and bugs alike are one line


def _shell(lines: list[str], **kw) -> tuple[str, str]:
    feed = iter(lines)

    def input_fn(prompt: str) -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    out, err = io.StringIO(), io.StringIO()
    conn = reldl.connect()
    try:
        assert Shell(conn, input_fn=input_fn, out=out, err=err, **kw).run() == 0
    finally:
        conn.close()
    return out.getvalue(), err.getvalue()


def test_shell_survives_bad_llm_arguments():
    out, err = _shell(["SELECT llm_generate('x', max_tokens := 1.5);", "SELECT 42 AS answer;"])
    assert err == "Error: llm_generate: max_tokens must be an integer, got 1.5\n"
    assert " 42\n" in out


def test_shell_survives_an_internal_error(monkeypatch):
    from reldl.connection import Cursor

    def broken(self, operation, parameters=None):
        if "boom" in operation:
            raise ValueError("invalid literal for int() with base 10: '1.5'")
        return original(self, operation, parameters)

    original = Cursor.execute
    monkeypatch.setattr(Cursor, "execute", broken)
    out, err = _shell(["SELECT 'boom';", "SELECT 7 AS seven;"])
    assert err.count("\n") == 1 and err.startswith("Error: internal error (ValueError: ") and "Traceback" not in err
    assert " 7\n" in out


def test_cli_internal_error_is_one_line(capsys, monkeypatch):
    from reldl.connection import Cursor

    def broken(self, operation, parameters=None):
        raise TypeError("'in <string>' requires string as left operand, not NoneType")

    monkeypatch.setattr(Cursor, "execute", broken)
    code, out, err = run(capsys, "sql", "-c", "SELECT 1")
    assert code == 1 and out == "" and err.count("\n") == 1 and err.startswith("Error: internal error (TypeError")


def test_shell_width_command():
    out, err = _shell([".width 12", "SELECT repeat('x', 30) AS s;", ".width", ".width abc"])
    assert "\n xxxxxxxxxxxx\n xxxxxxxxxxxx\n xxxxxx\n" in out and "width 12\n" in out
    assert err == "Error: usage: .width N (columns; 0: never wrap)\n"
