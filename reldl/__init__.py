"""reldl: deep learning inside DuckDB. `reldl.connect()` opens a database with reldl's SQL surface."""

from __future__ import annotations

import duckdb

from reldl.connection import Connection, Cursor
from reldl.errors import (
    CheckpointError,
    DatabaseError,
    DataError,
    Error,
    IntegrityError,
    InterfaceError,
    InternalError,
    NotSupportedError,
    OperationalError,
    ProgrammingError,
    Warning,
)

__version__ = "0.1.0"
apilevel = "2.0"
threadsafety = 1
paramstyle = "qmark"


def unload(name: str | None = None) -> int:
    """Free the memory of model `name` (every loaded model when None); the next use loads it again."""
    from reldl import tabular
    from reldl.registry import unload as _unload

    return _unload(name) + tabular.unload(name)


def connect(database: str = ":memory:", *, read_only: bool = False, config: dict | None = None) -> Connection:
    """Open (or create) a DuckDB database with reldl's statements and functions."""
    return Connection(database, read_only=read_only, config=config)


def install(duck: duckdb.DuckDBPyConnection) -> None:
    """Register reldl's SQL functions (llm_generate, llm_score, predict, predict_proba) on a plain DuckDB
    connection; named arguments work there too. Statements are not planned: every call runs UDF-centric."""
    from reldl import catalog
    from reldl.udfs import install as install_functions

    catalog.ensure_schema(duck)
    install_functions(duck)


def register_model(
    duck: duckdb.DuckDBPyConnection | Connection,
    name: str,
    path: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    replace: bool = False,
) -> None:
    """Python form of CREATE [OR REPLACE] MODEL name OPTIONS (model_type = 'llm', path = ...)."""
    conn = duck if isinstance(duck, Connection) else None
    sql = (
        f"CREATE {'OR REPLACE ' if replace else ''}MODEL {_quote_ident(name)} OPTIONS (model_type = 'llm', "
        f"path = {_quote(path)}, dtype = {_quote(dtype)}, device = {_quote(device)})"
    )
    if conn is not None:
        conn.execute(sql)
        return
    Cursor(_Detached(), duck, owns_duck=False).execute(sql)  # type: ignore[arg-type]


def _quote(s: str) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def _quote_ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'  # always: a keyword (from, as, select) is a fine model name


class _Detached:
    """Stands in for a reldl Connection when a reldl Cursor wraps a plain DuckDB connection."""

    closed = False


__all__ = [
    "CheckpointError",
    "Connection",
    "Cursor",
    "DataError",
    "DatabaseError",
    "Error",
    "IntegrityError",
    "InterfaceError",
    "InternalError",
    "NotSupportedError",
    "OperationalError",
    "ProgrammingError",
    "Warning",
    "apilevel",
    "connect",
    "install",
    "paramstyle",
    "register_model",
    "threadsafety",
    "unload",
]
