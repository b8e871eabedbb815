"""The model catalog: rows of `reldl.models` inside the database, created and read through SQL."""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb

from reldl import paths, scratch
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


def model_dir(duck: duckdb.DuckDBPyConnection, name: str, path: str | None) -> tuple[Path, bool]:
    """Where a new model's files go, and whether reldl chose the place: `path` (missing or an empty directory, see
    `paths.new_dir`), else `<db>.models/<name>` (with a random suffix when that is taken), else a new name in the
    temp directory. Nothing is created here; a `path` that is taken or cannot be made is a one-line error."""
    if path is not None:
        return paths.new_dir(f"CREATE MODEL {name}: path", path), False
    db = db_file(duck)
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name.lower())
    root = Path(str(db) + ".models") if db else Path(tempfile.gettempdir())
    p = root / (safe if db else f"reldl-{safe}-{uuid.uuid4().hex[:8]}")
    if p.exists() and any(p.iterdir()):  # a file database's <db>.models/<name> from an earlier model: a new one
        p = p.with_name(f"{p.name}-{uuid.uuid4().hex[:8]}")
    if not db:  # an in-memory database's catalog dies with the process: so do the files only it names
        scratch.remove_at_exit(p)
    return p, True


# -- directories reldl made for a model, listed in its row's options as `owned_dirs` (DROP MODEL removes them), in a
# form that survives copying or moving the database file. One under the database's own `<db file>.models/` is
# stored relative to that folder: a copy of the file resolves it under its own `<copy>.models/` (a copy made without
# that folder owns nothing there), never under the original's. Any other one (an `offload_dir` reldl creates, the
# temporary directory of an in-memory database) is stored absolute, with `owned_by`: the real path of the database
# file that made it (absent for an in-memory database); a copied or moved file is not its owner. Catalogs written
# before held absolute paths and no `owned_by`: such a directory is owned only when it lies under the database's
# own `<db>.models/` (or the database is in memory); otherwise DROP MODEL leaves it on disk.


def _owner(duck: duckdb.DuckDBPyConnection) -> tuple[str | None, str | None]:
    """(the database file's real path, the real path of its `<db>.models` folder), or (None, None) in memory."""
    db = db_file(duck)
    if not db:
        return None, None
    return os.path.realpath(db), os.path.realpath(db + ".models")


def _inside(path: str, root: str | None) -> bool:
    return root is not None and path.startswith(root + os.sep)


def store_owned_dirs(duck: duckdb.DuckDBPyConnection, options: dict[str, Any]) -> None:
    """Rewrite `options["owned_dirs"]` in place into the stored form above. Absolute entries are directories reldl
    made for this row (a relative one is taken as stored already); `owned_by` is set when an absolute one stays."""
    entries = [d for d in options.get("owned_dirs") or [] if isinstance(d, str) and d]
    options.pop("owned_by", None)
    if not entries:
        options.pop("owned_dirs", None)
        return
    db, root = _owner(duck)
    stored = []
    for d in entries:
        real = os.path.realpath(os.path.expanduser(d)) if os.path.isabs(os.path.expanduser(d)) else None
        stored.append(os.path.relpath(real, root) if real and _inside(real, root) else real or d)
    options["owned_dirs"] = list(dict.fromkeys(stored))
    if db and any(os.path.isabs(d) for d in stored):
        options["owned_by"] = db


def owned_dirs(duck: duckdb.DuckDBPyConnection, options: dict[str, Any] | None) -> list[str]:
    """The directories a row with `options` owns in this database (real absolute paths): those DROP MODEL may
    remove. A directory another database file made is never among them."""
    options = options or {}
    entries = [d for d in options.get("owned_dirs") or [] if isinstance(d, str) and d]
    if not entries:
        return []
    db, root = _owner(duck)
    owner = options.get("owned_by")
    out = []
    for d in entries:
        if not os.path.isabs(d):  # under this database's own <db>.models/
            real = os.path.realpath(os.path.join(root, d)) if root else None
            if real and _inside(real, root):
                out.append(real)
            continue
        real = os.path.realpath(d)
        if owner is not None:
            mine = owner == db
        else:  # written before `owned_by` existed, or by an in-memory database
            mine = db is None or _inside(real, root)
        if mine:
            out.append(real)
    return list(dict.fromkeys(out))


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
    """Insert (or replace) one catalog row in a single statement, so a failure leaves the catalog as it was.
    `options["owned_dirs"]` (directories reldl made for the model) is rewritten in place into its stored form."""
    ensure_schema(duck)
    existing = get_model(duck, name)
    if existing is not None and not replace:
        raise IntegrityError(f"model {existing.name!r} already exists (use CREATE OR REPLACE MODEL)")
    verb = "INSERT OR REPLACE" if replace else "INSERT"
    store_owned_dirs(duck, options)
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
