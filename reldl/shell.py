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
MAX_WIDTH = 80  # columns of text a cell takes before it wraps onto more lines (0: never wrap); nothing is clipped
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
.width N   wrap cells wider than N columns onto more lines (0: never wrap; default 80); nothing is cut off
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
    description: Sequence[Sequence[Any]],
    rows: Sequence[Sequence[Any]],
    max_width: int = MAX_WIDTH,
    total: int | None = None,
) -> str:
    """Aligned text table (psql style): header, separator, rows, and a `(N rows)` footer.

    Values are shown in full: a cell wider than `max_width` terminal columns wraps onto further lines of its row
    (`max_width` 0: no wrapping); newlines inside a value are shown as `\\n`. `total` is the size of the whole
    result when `rows` is only its first part.
    """
    header = [_wrap(str(d[0]).translate(ESCAPES), max_width) for d in description]
    body = [[_wrap(_text(v), max_width) for v in row] for row in rows]
    right = [_numeric([row[i] for row in rows]) for i in range(len(header))]
    widths = [max(_width(line) for cell in [h, *(r[i] for r in body)] for line in cell) for i, h in enumerate(header)]
    lines = _lines(header, widths, right) + ["-" + "-+-".join("-" * w for w in widths) + "-"]
    for r in body:
        lines += _lines(r, widths, right)
    lines.append(_footer(len(rows), len(rows) if total is None else total))
    return "\n".join(lines)


def format_explain(rows: Sequence[Sequence[Any]]) -> str:
    """EXPLAIN output as plain text, never wrapped or cut: reldl's plan (one line a row) or DuckDB's (a key and a
    multi-line plan drawing a row: the drawing is printed)."""
    return "\n".join(("" if row[-1] is None else str(row[-1])).rstrip("\n") for row in rows)


def _lines(cells: list[list[str]], widths: list[int], right: list[bool]) -> list[str]:
    """The text lines of one table row whose cells hold one or more (wrapped) lines each."""
    height = max(len(c) for c in cells)
    out = []
    for k in range(height):
        parts = [c[k] if k < len(c) else "" for c in cells]
        out.append(_line(parts, widths, right))
    return out


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


def _wrap(text: str, max_width: int) -> list[str]:
    """`text` cut into lines of at most `max_width` terminal columns (all of it: nothing is dropped), breaking
    after a space where one falls in the second half of a line; one line when `max_width` is 0 or less."""
    if max_width <= 0 or _width(text) <= max_width:
        return [text]
    lines: list[str] = []
    while _width(text) > max_width:
        cut, used = 0, 0
        while cut < len(text) and used + _width(text[cut]) <= max_width:
            used += _width(text[cut])
            cut += 1
        cut = max(cut, 1)  # a character wider than the limit still moves on
        space = text.rfind(" ", 0, cut)
        if space >= cut // 2 and space + 1 < cut:
            cut = space + 1
        lines.append(text[:cut].rstrip(" ") or text[:cut])
        text = text[cut:]
    return lines + ([text] if text else [])


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


def is_explain(sql: str) -> bool:
    """Whether the statement is an EXPLAIN (reldl's or DuckDB's), whose rows are printed as plain text."""
    statements = split(sql)
    tokens = statements[-1][1] if statements else []
    return bool(tokens) and tokens[0].text.upper() == "EXPLAIN"


def print_result(
    cur: Cursor,
    sql: str,
    out: TextIO,
    max_rows: int = MAX_ROWS,
    status: str | None = None,
    max_width: int = MAX_WIDTH,
) -> None:
    """Print the result set of `sql`, just run on `cur`; `status` (e.g. OK) is printed when there is none."""
    if returns_rows(sql, cur.description):
        if is_explain(sql):
            print(format_explain(cur.fetchall()), file=out)
            return
        rows, total = fetch_limited(cur, max_rows)
        print(format_table(cur.description, rows, max_width, total=total), file=out)
    elif status:
        print(status, file=out)


def run_query(cur: Cursor, sql: str, out: TextIO, max_rows: int = MAX_ROWS, max_width: int = MAX_WIDTH) -> None:
    """Run `sql` (one statement or several) as one call and print the last statement's result."""
    cur.execute(sql)
    statements = split(sql)
    print_result(cur, statements[-1][0] if statements else sql, out, max_rows, max_width=max_width)


def run_script(
    cur: Cursor,
    sql: str,
    out: TextIO,
    max_rows: int = MAX_ROWS,
    status: str | None = None,
    max_width: int = MAX_WIDTH,
) -> None:
    """Run a script statement by statement, printing each result set; the first error stops it."""
    for text, _ in split(sql):
        cur.execute(text)
        print_result(cur, text, out, max_rows, status, max_width)


def run_input(
    conn: Connection,
    text: str,
    out: TextIO,
    max_rows: int = MAX_ROWS,
    max_width: int = MAX_WIDTH,
) -> None:
    """A script read from stdin: its statements as run_script runs them (the first error stops it), and the shell's
    dot-commands (.tables, .width 40, .quit, ...) on lines of their own between statements."""
    cur = conn.cursor()
    buffer = ""
    for line in text.splitlines(keepends=True):
        if line.strip().startswith(".") and not split(buffer):  # between statements (comments aside)
            buffer = ""
            shell = Shell(conn, out=out, err=_Raise(), max_rows=max_rows, max_width=max_width, cursor=cur)
            if not shell.dot_command(line.strip()):
                return
            max_width = shell.max_width
            continue
        buffer += line
        if statement_complete(buffer):
            run_script(cur, buffer, out, max_rows, max_width=max_width)
            buffer = ""
    if buffer.strip():
        run_script(cur, buffer, out, max_rows, max_width=max_width)


class _Raise:
    """An error stream for dot-commands in a script: what the shell would print as an error stops the script."""

    def write(self, text: str) -> None:
        if text.strip():
            raise Error(text.strip().removeprefix("Error: "))

    def flush(self) -> None:
        pass


def print_error(exc: BaseException, err: TextIO | None = None) -> None:
    print(f"Error: {first_line(str(exc))}", file=err or sys.stderr)


def print_internal_error(exc: BaseException, err: TextIO | None = None) -> None:
    """An exception reldl did not turn into one of its errors (a bug): one line naming it, never a traceback."""
    text = first_line(str(exc))
    print(f"Error: internal error ({type(exc).__name__}{': ' + text if text else ''})", file=err or sys.stderr)


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
        max_width: int = MAX_WIDTH,
        cursor: Cursor | None = None,
    ):
        self.cur = cursor or conn.cursor()
        self.input_fn = input_fn
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.max_rows = max_rows
        self.max_width = max_width

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
            run_script(self.cur, sql, self.out, self.max_rows, status="OK", max_width=self.max_width)
        except Error as e:
            print_error(e, self.err)
        except (KeyboardInterrupt, RuntimeError) as e:
            if not interrupted(e):
                print_internal_error(e, self.err)
            else:
                print("Error: interrupted", file=self.err)
        except Exception as e:  # noqa: BLE001 - a bug must not end the user's session
            print_internal_error(e, self.err)

    def dot_command(self, line: str) -> bool:
        """Run a dot-command; False means leave the shell."""
        cmd = line.split()[0].lower()
        if cmd in (".quit", ".exit"):
            return False
        if cmd == ".help":
            print(HELP, file=self.out)
        elif cmd == ".width":
            args = line.split()[1:]
            if len(args) == 1 and args[0].isdigit():
                self.max_width = int(args[0])
            elif args:
                print("Error: usage: .width N (columns; 0: never wrap)", file=self.err)
            else:
                print(f"width {self.max_width}", file=self.out)
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
