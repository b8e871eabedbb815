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


def unknown_model(function: str, name: str | None) -> ProgrammingError:
    """A reldl function given a model name that is not registered."""
    return ProgrammingError(f"{function}: model {name!r} does not exist (SHOW MODELS lists the registered models)")


def wrong_model(function: str, rec, wanted: str) -> ProgrammingError:
    """A reldl function given a registered model of the wrong kind (`rec`: its catalog record), e.g.
    "llm_generate: model 'churn_mlp' is a 'mlp' model, not an LLM"."""
    return ProgrammingError(f"{function}: model {rec.name!r} is a {rec.model_type!r} model, not {wanted}")


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


_INTERNAL_UDF = re.compile(r"'reldl_(llm_generate_list|llm_generate|llm_score|predict_proba|predict)_\d+\(")
_INTEGERS = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER", "INTEGER_LITERAL"}
_WANTED = {"BIGINT": "an integer (BIGINT)", "DOUBLE": "a number (DOUBLE)", "VARCHAR": "text (VARCHAR)"}


def _split_types(text: str, start: int) -> list[str] | None:
    """The comma-separated types of `name(T1, T2(3,1), ...)` from just after its '(' (None if it does not close)."""
    out, depth, cur = [], 0, ""
    for ch in text[start:]:
        if ch == ")" and depth == 0:
            return [t.strip() for t in out + [cur] if t.strip()]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return None


def _fits(given: str, wanted: str) -> bool:
    """Whether DuckDB casts an argument of type `given` to the UDF's `wanted` type on its own (roughly)."""
    if given in ('"NULL"', "NULL", "JSON"):
        return True
    if wanted == "VARCHAR":
        return given in ("VARCHAR", "STRING_LITERAL")
    if wanted == "BIGINT":
        return given in _INTEGERS or given == "STRING_LITERAL"
    if wanted == "DOUBLE":
        return given in _INTEGERS or given in ("FLOAT", "DOUBLE", "STRING_LITERAL") or given.startswith("DECIMAL")
    return True


def _user_type(t: str) -> str:
    return {'"NULL"': "NULL", "INTEGER_LITERAL": "INTEGER", "STRING_LITERAL": "VARCHAR"}.get(t, t)


def _internal_udf_message(text: str) -> str | None:
    """DuckDB's "No function matches ... 'reldl_llm_generate_0(VARCHAR, DOUBLE, ...)'" names the UDF behind a
    reldl function's macro, with the macro's positional arguments: the message the user should see instead names
    the function they called and the argument of the wrong type."""
    m = _INTERNAL_UDF.search(text)
    if m is None:
        return None
    from reldl.planner.plans import SIGNATURES  # (lazily: the planner imports this module)

    udf = m.group(1)
    fn = "llm_generate" if udf == "llm_generate_list" else udf
    sig = SIGNATURES[udf]
    positional = 2 if fn == "llm_score" else 1
    shown = [f"{name} := {typ}" if i >= positional else f"{name} {typ}" for i, (name, typ, _) in enumerate(sig)]
    if fn.startswith("predict"):
        shown = ["model VARCHAR", "feature, ... (numbers)"]
    elif fn == "llm_generate":
        shown = [s.replace("stop := VARCHAR", "stop := VARCHAR or VARCHAR[]") for s in shown[:9]]
        shown += ["n := BIGINT", "beam_width := BIGINT"]
    signature = f"{fn}({', '.join(shown)})"
    types = _split_types(text, m.end())
    if types is None or len(types) != len(sig):
        return f"{fn}: an argument has the wrong type; {signature}"
    for (name, wanted, _), given in zip(sig, types):
        if not _fits(given, wanted):
            what = _WANTED.get(wanted, wanted)
            return f"{fn}: {name} must be {what}, got {_user_type(given)} (cast it; arguments: {signature})"
    return f"{fn}: no version takes these argument types ({', '.join(map(_user_type, types))}); {signature}"


def translate(exc: BaseException) -> Error:
    """Map a DuckDB (or UDF) exception to reldl's hierarchy with a one-line message."""
    if isinstance(exc, Error):
        return exc
    text = str(exc)
    internal = _internal_udf_message(text)
    if internal is not None and isinstance(exc, duckdb.Error):
        return ProgrammingError(internal)
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
