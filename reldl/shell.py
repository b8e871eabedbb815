"""Result formatting and the interactive SQL shell behind `reldl sql`.

Kept apart from the argument parsing in reldl/cli.py so that the table formatter and the read-eval-print loop can be
tested without a terminal: the shell takes its input function and output streams as arguments.
"""

from __future__ import annotations

import contextlib
import os
import sys
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from typing import Any, TextIO

import duckdb
import sqlglot
from sqlglot.errors import ParseError, TokenError
from sqlglot.tokens import TokenType

from reldl.connection import Connection, Cursor
from reldl.errors import Error, first_line
from reldl.planner.statements import split

MAX_ROWS = 1000
STATUS_COLUMNS = {("Count", "BIGINT"), ("Success", "BOOLEAN")}
ESCAPES = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": "\\t"})
TABLES_SQL = (
    "SELECT CASE WHEN table_schema = 'main' THEN table_name ELSE table_schema || '.' || table_name END AS name, "
    "lower(table_type) AS type FROM information_schema.tables "
    "WHERE table_catalog = current_database() AND table_schema <> 'reldl' ORDER BY table_schema, table_name"
)
DOT_SQL = {".tables": TABLES_SQL, ".models": "SHOW MODELS"}
HELP = """\
.help      show this help
.tables    list tables and views
.models    list registered models (same as SHOW MODELS;)
.quit      leave the shell (also .exit or Ctrl-D)

SQL statements may span lines and run once they end with ';'. Ctrl-C discards the statement being typed.
reldl adds to DuckDB's SQL:
  CREATE [OR REPLACE] MODEL name OPTIONS (model_type = 'llm', path = '/dir/of/checkpoint')
    [, offload = 'auto' | 'weights = 0/50/50, cache = 0/100/0, gpu_batch_size = 32', gpu_memory = '16GB']
  DROP MODEL [IF EXISTS] name
  SHOW MODELS
  llm_generate(prompt, model := 'name', max_tokens := 64), llm_score(prompt, continuation)
  llm_generate(prompt, n := 4) / llm_generate(prompt, beam_width := 3): a list of samples / beams"""


# -- formatting


def format_table(
    description: Sequence[Sequence[Any]], rows: Sequence[Sequence[Any]], max_width: int = 60, total: int | None = None
) -> str:
    """Aligned text table (psql style): header, separator, rows, and a `(N rows)` footer.

    `total` is the size of the whole result when `rows` is only its first part.
    """
    header = [_clip(str(d[0]), max_width) for d in description]
    body = [[_clip(_text(v), max_width) for v in row] for row in rows]
    right = [_numeric([row[i] for row in rows]) for i in range(len(header))]
    widths = [max(map(_width, [h, *(r[i] for r in body)])) for i, h in enumerate(header)]
    lines = [_line(header, widths, right), "-" + "-+-".join("-" * w for w in widths) + "-"]
    lines += [_line(r, widths, right) for r in body]
    lines.append(_footer(len(rows), len(rows) if total is None else total))
    return "\n".join(lines)


def _line(cells: list[str], widths: list[int], right: list[bool]) -> str:
    padded = [" " * (w - _width(c)) + c if r else c + " " * (w - _width(c)) for c, w, r in zip(cells, widths, right)]
    return (" " + " | ".join(padded)).rstrip()


def _footer(shown: int, total: int) -> str:
    text = "(1 row" if total == 1 else f"({total} rows"
    return text + (f", {shown} shown)" if shown < total else ")")


def _numeric(values: list[Any]) -> bool:
    """Right-align a column when every non-NULL value in it is a number."""
    present = [v for v in values if v is not None]
    return bool(present) and all(isinstance(v, (int, float, Decimal)) and not isinstance(v, bool) for v in present)


def _text(value: Any) -> str:
    """How one value reads in a cell: NULL, DuckDB-style booleans, lists and structs, newlines escaped."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_text, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_text(v)}" for k, v in value.items()) + "}"
    return str(value).translate(ESCAPES)


def _clip(text: str, max_width: int) -> str:
    text = text.translate(ESCAPES)
    return text if len(text) <= max_width else text[: max_width - 1] + "…"


def _width(text: str) -> int:
    """Terminal columns: wide (CJK) characters take two, combining marks none."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


# -- running statements


def returns_rows(sql: str, description: Sequence[Sequence[Any]] | None) -> bool:
    """Whether a statement produced a result set worth printing.

    DuckDB describes DDL and DML with a one-column `Count` or `Success` result; those count as no result set,
    unless the statement is a SELECT that happens to name its only column that way.
    """
    if description is None:
        return False
    if len(description) != 1 or (description[0][0], str(description[0][1])) not in STATUS_COLUMNS:
        return True
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error:
        return False
    return bool(statements) and statements[-1].type == duckdb.StatementType.SELECT


def fetch_limited(cur: Cursor, limit: int = MAX_ROWS) -> tuple[list[tuple], int]:
    """The first `limit` rows (all when `limit` is 0) and the size of the whole result."""
    if limit <= 0:
        rows = cur.fetchall()
        return rows, len(rows)
    rows = cur.fetchmany(limit + 1)
    total = len(rows)
    while total > limit and (batch := cur.fetchmany(10_000)):
        total += len(batch)
    return rows[:limit], total


def print_result(cur: Cursor, sql: str, out: TextIO, max_rows: int = MAX_ROWS, status: str | None = None) -> None:
    """Print the result set of `sql`, just run on `cur`; `status` (e.g. OK) is printed when there is none."""
    if returns_rows(sql, cur.description):
        rows, total = fetch_limited(cur, max_rows)
        print(format_table(cur.description, rows, total=total), file=out)
    elif status:
        print(status, file=out)


def run_query(cur: Cursor, sql: str, out: TextIO, max_rows: int = MAX_ROWS) -> None:
    """Run `sql` (one statement or several) as one call and print the last statement's result."""
    cur.execute(sql)
    statements = split(sql)
    print_result(cur, statements[-1][0] if statements else sql, out, max_rows)


def run_script(cur: Cursor, sql: str, out: TextIO, max_rows: int = MAX_ROWS, status: str | None = None) -> None:
    """Run a script statement by statement, printing each result set; the first error stops it."""
    for text, _ in split(sql):
        cur.execute(text)
        print_result(cur, text, out, max_rows, status)


def print_error(exc: BaseException, err: TextIO | None = None) -> None:
    print(f"Error: {first_line(str(exc))}", file=err or sys.stderr)


def interrupted(exc: BaseException) -> bool:
    """Ctrl-C: DuckDB reports it during a query as RuntimeError('Query interrupted'), not KeyboardInterrupt."""
    return isinstance(exc, KeyboardInterrupt) or (isinstance(exc, RuntimeError) and "interrupted" in str(exc))


def statement_complete(buffer: str) -> bool:
    """True once the buffer ends with a `;` outside strings and comments."""
    try:
        tokens = sqlglot.tokenize(buffer, read="duckdb")
    except (TokenError, ParseError, ValueError):
        return False  # e.g. an unterminated string: keep reading
    return bool(tokens) and tokens[-1].token_type == TokenType.SEMICOLON


# -- the interactive shell


class Shell:
    """Read-eval-print loop; `input_fn` is injectable so tests can drive it without a terminal."""

    prompt = "reldl> "
    continuation = "   ...> "

    def __init__(
        self,
        conn: Connection,
        input_fn: Callable[[str], str] = input,
        out: TextIO | None = None,
        err: TextIO | None = None,
        max_rows: int = MAX_ROWS,
    ):
        self.cur = conn.cursor()
        self.input_fn = input_fn
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.max_rows = max_rows

    def run(self) -> int:
        """Loop until Ctrl-D or .quit; errors are reported and the loop goes on."""
        buffer = ""
        while True:
            try:
                line = self.input_fn(self.continuation if buffer else self.prompt)
            except EOFError:
                print(file=self.out)
                return 0
            except KeyboardInterrupt:
                print(file=self.out)
                buffer = ""
                continue
            if not buffer and line.strip().startswith("."):
                if not self.dot_command(line.strip()):
                    return 0
                continue
            buffer = buffer + line + "\n" if buffer or line.strip() else ""
            if buffer and statement_complete(buffer):
                self.execute(buffer)
                buffer = ""

    def execute(self, sql: str) -> None:
        try:
            run_script(self.cur, sql, self.out, self.max_rows, status="OK")
        except Error as e:
            print_error(e, self.err)
        except (KeyboardInterrupt, RuntimeError) as e:
            if not interrupted(e):
                raise
            print("Error: interrupted", file=self.err)

    def dot_command(self, line: str) -> bool:
        """Run a dot-command; False means leave the shell."""
        cmd = line.split()[0].lower()
        if cmd in (".quit", ".exit"):
            return False
        if cmd == ".help":
            print(HELP, file=self.out)
        elif cmd in DOT_SQL:
            self.execute(DOT_SQL[cmd])
        else:
            print(f"Error: unknown command {cmd} (try .help)", file=self.err)
        return True


def history_path() -> str:
    return os.path.expanduser(os.environ.get("RELDL_HISTORY") or "~/.reldl_history")


@contextlib.contextmanager
def readline_history(path: str | None = None) -> Iterator[None]:
    """Line editing with history kept across sessions; a no-op where Python has no readline module."""
    try:
        import readline
    except ImportError:
        readline = None
    path = path or history_path()
    if readline is not None:
        with contextlib.suppress(OSError):
            readline.read_history_file(path)
        readline.set_history_length(2000)
    try:
        yield
    finally:
        if readline is not None:
            with contextlib.suppress(OSError):
                readline.write_history_file(path)
