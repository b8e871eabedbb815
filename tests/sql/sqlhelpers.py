"""Helpers shared by the SQL-surface tests."""

from __future__ import annotations

MODEL = "sql_tiny"  # the name the `llm` fixture registers


def one_line(exc: BaseException) -> str:
    """The exception's message, checked to be a single non-empty line."""
    msg = str(exc)
    assert msg and "\n" not in msg, f"not one line: {msg!r}"
    return msg


def usable(conn) -> None:
    """The connection still answers an ordinary query."""
    assert conn.execute("SELECT 40 + 2").fetchall() == [(42,)]


def quote(s) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def create_model_sql(name: str, path, *, verb: str = "CREATE", dtype: str = "float32", device: str = "cpu") -> str:
    return (
        f"{verb} MODEL {name} OPTIONS (model_type = 'llm', path = {quote(path)}, "
        f"dtype = {quote(dtype)}, device = {quote(device)})"
    )
