"""PEP 249 exception hierarchy, and the translation of DuckDB's errors onto it.

Messages are meant for SQL users: one line that names the model, argument or file at fault.
"""

from __future__ import annotations

import re

import duckdb


class Warning(Exception):  # noqa: A001 - the name PEP 249 prescribes
    """Important warnings, e.g. data truncation."""


class Error(Exception):
    """Base class of every reldl error."""


class InterfaceError(Error):
    """Misuse of the interface itself (e.g. a closed cursor)."""


class DatabaseError(Error):
    """Errors related to the database."""


class DataError(DatabaseError):
    """Problems with the processed data: a prompt too long for the model, a value out of range."""


class OperationalError(DatabaseError):
    """Errors in the database's operation: a checkpoint that cannot be loaded, out of memory."""


class IntegrityError(DatabaseError):
    """Relational integrity violated (e.g. a model name registered twice)."""


class InternalError(DatabaseError):
    """The database hit an internal error."""


class ProgrammingError(DatabaseError):
    """Bad SQL, an unknown model, a bad argument."""


class NotSupportedError(DatabaseError):
    """A method or feature the database does not support."""


class CheckpointError(OperationalError):
    """A model checkpoint on disk is missing, unsupported or damaged."""


_DUCKDB_TO_PEP249: list[tuple[type[BaseException], type[Error]]] = [
    (duckdb.DataError, DataError),
    (duckdb.IntegrityError, IntegrityError),
    (duckdb.InternalError, InternalError),
    (duckdb.NotSupportedError, NotSupportedError),
    (duckdb.ProgrammingError, ProgrammingError),
    (duckdb.OperationalError, OperationalError),
    (duckdb.DatabaseError, DatabaseError),
    (duckdb.Warning, Error),
    (duckdb.Error, Error),
]

_UDF_ERROR = re.compile(r"Python exception occurred while executing the UDF: (\w+): (.*)", re.S)
_BY_NAME = {
    cls.__name__: cls
    for cls in (
        Error,
        InterfaceError,
        DatabaseError,
        DataError,
        OperationalError,
        IntegrityError,
        InternalError,
        ProgrammingError,
        NotSupportedError,
        CheckpointError,
    )
}


def shown(value) -> str:
    """A value as the SQL user wrote it, for messages: NULL, not Python's None."""
    return "NULL" if value is None else repr(value)


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def translate(exc: BaseException) -> Error:
    """Map a DuckDB (or UDF) exception to reldl's hierarchy with a one-line message."""
    if isinstance(exc, Error):
        return exc
    text = str(exc)
    m = _UDF_ERROR.search(text)
    if m:
        name, msg = m.group(1), first_line(m.group(2))
        cls = _BY_NAME.get(name, OperationalError)
        return cls(msg if name in _BY_NAME else f"{name}: {msg}")
    for src, dst in _DUCKDB_TO_PEP249:
        if isinstance(exc, src):
            return dst(first_line(text))
    if isinstance(exc, RuntimeError) and "interrupted" in text.lower():
        return OperationalError("query interrupted")
    if isinstance(exc, MemoryError):
        return OperationalError("out of memory")
    return OperationalError(f"{type(exc).__name__}: {first_line(text)}")
