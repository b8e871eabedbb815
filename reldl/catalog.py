"""The model catalog: rows of `reldl.models` inside the database, created and read through SQL."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

import duckdb

from reldl import scratch
from reldl.errors import IntegrityError, ProgrammingError, translate

MODEL_COLUMNS = "name, model_type, path, options, created_at"
EMPTY_MODELS_SQL = (  # SHOW MODELS on a read-only database that never had a catalog
    "SELECT NULL::VARCHAR AS name, NULL::VARCHAR AS model_type, NULL::VARCHAR AS path, "
    "NULL::JSON AS options, NULL::TIMESTAMP AS created_at WHERE false"
)


@dataclass(frozen=True)
class ModelRecord:
    name: str
    model_type: str
    path: str | None
    options: dict[str, Any]

    @property
    def dtype(self) -> str:
        return str(self.options.get("dtype", "auto"))

    @property
    def device(self) -> str:
        return str(self.options.get("device", "auto"))


def sql_file(name: str) -> str:
    return resources.files("reldl.sql").joinpath(name).read_text()


def db_file(duck: duckdb.DuckDBPyConnection) -> str | None:
    """The current database's file, or None for an in-memory database."""
    row = duck.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchall()
    return row[0][0] if row and row[0][0] else None


def ensure_schema(duck: duckdb.DuckDBPyConnection) -> None:
    """Create the `reldl` schema and its tables if missing (no-op on read-only databases that lack them)."""
    if has_catalog(duck):
        return
    try:
        duck.execute(sql_file("catalog.sql"))
    except duckdb.Error as e:
        if "read-only" in str(e).lower() or "read only" in str(e).lower():
            return
        raise translate(e) from None


def has_catalog(duck: duckdb.DuckDBPyConnection) -> bool:
    row = duck.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'reldl' AND table_name = 'models' "
        "AND database_name = current_database()"
    ).fetchall()
    return bool(row and row[0][0])


def get_model(duck: duckdb.DuckDBPyConnection, name: str) -> ModelRecord | None:
    if not has_catalog(duck):
        return None
    row = duck.execute(
        "SELECT name, model_type, path, options FROM reldl.models WHERE lower(name) = lower(?)", [name]
    ).fetchall()
    return _record(row[0]) if row else None


def list_models(duck: duckdb.DuckDBPyConnection, model_type: str | None = None) -> list[ModelRecord]:
    if not has_catalog(duck):
        return []
    sql = "SELECT name, model_type, path, options FROM reldl.models"
    params: list[Any] = []
    if model_type is not None:
        sql += " WHERE model_type = ?"
        params.append(model_type)
    return [_record(r) for r in duck.execute(sql + " ORDER BY name", params).fetchall()]


def _record(row) -> ModelRecord:
    name, model_type, path, options = row
    return ModelRecord(name, model_type, path, json.loads(options) if isinstance(options, str) else options)


def put_model(
    duck: duckdb.DuckDBPyConnection,
    name: str,
    model_type: str,
    path: str | None,
    options: dict[str, Any],
    *,
    replace: bool = False,
) -> None:
    """Insert (or replace) one catalog row in a single statement, so a failure leaves the catalog as it was."""
    ensure_schema(duck)
    existing = get_model(duck, name)
    if existing is not None and not replace:
        raise IntegrityError(f"model {existing.name!r} already exists (use CREATE OR REPLACE MODEL)")
    verb = "INSERT OR REPLACE" if replace else "INSERT"
    try:
        if existing is not None and existing.name != name:  # same name, other case: keep one row
            duck.execute("DELETE FROM reldl.models WHERE name = ?", [existing.name])
        duck.execute(
            f"{verb} INTO reldl.models (name, model_type, path, options) VALUES (?, ?, ?, ?)",
            [name, model_type, path, json.dumps(options)],
        )
        if path and db_file(duck):  # a persistent catalog names it: never removed at exit
            scratch.keep(path)
    except duckdb.Error as e:
        raise translate(e) from None


def delete_model(duck: duckdb.DuckDBPyConnection, name: str, *, if_exists: bool = False) -> ModelRecord | None:
    existing = get_model(duck, name)
    if existing is None:
        if if_exists:
            return None
        raise ProgrammingError(f"model {name!r} does not exist")
    try:
        duck.execute("DELETE FROM reldl.models WHERE name = ?", [existing.name])
    except duckdb.Error as e:
        raise translate(e) from None
    return existing


def default_llm(duck: duckdb.DuckDBPyConnection) -> ModelRecord:
    """The model an `llm_*` call without `model :=` uses: the only registered LLM."""
    return pick_model(list_models(duck), None)


def pick_model(models: list[ModelRecord], name: str | None) -> ModelRecord | None:
    """`name` among `models` (case-insensitive; None if absent), or with no name the only registered LLM."""
    if name is not None:
        return next((m for m in models if m.name.lower() == name.lower()), None)
    llms = [m for m in models if m.model_type == "llm"]
    if len(llms) == 1:
        return llms[0]
    if not llms:
        raise ProgrammingError(
            "no LLM is registered: CREATE MODEL name OPTIONS (model_type = 'llm', path = '/dir/of/checkpoint')"
        )
    names = ", ".join(m.name for m in llms)
    raise ProgrammingError(f"several LLMs are registered ({names}): pass model := 'name'")
