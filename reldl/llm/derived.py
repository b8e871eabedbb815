"""What `CREATE MODEL ... OPTIONS (model_type = 'llm', base = ...) AS SELECT ...` needs whether it builds a sparse
variant (reldl.llm.sparse) or a fine-tuned model (reldl.llm.finetune): the base LLM's catalog row, the query's
rows, and the directory the new model's files go to."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import Any

from reldl import catalog, scratch
from reldl.errors import ProgrammingError


def base_llm(duck, name: str, base: str) -> catalog.ModelRecord:
    """The catalog row of the base model of `CREATE MODEL name`, which must exist and be an LLM."""
    rec = catalog.get_model(duck, base)
    if rec is None:
        raise ProgrammingError(f"CREATE MODEL {name}: base model {base!r} does not exist")
    if rec.model_type != "llm":
        raise ProgrammingError(
            f"CREATE MODEL {name}: base model {rec.name!r} is a {rec.model_type!r} model, not an LLM"
        )
    return rec


def run_query(duck, query: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The query's column names and rows, on a cursor of its own; DuckDB errors translated."""
    import duckdb

    from reldl.errors import translate

    cur = duck.cursor()
    try:
        try:
            cur.execute(query)
            cols = [d[0] for d in (cur.description or [])]
            return cols, cur.fetchall()
        except duckdb.Error as e:
            raise translate(e) from None
    finally:
        cur.close()


def model_dir(duck, name: str, path: str | None) -> tuple[Path, bool]:
    """Where the new model's files go, and whether reldl chose the place: `path` (missing or an empty directory),
    else `<db>.models/<name>` (with a random suffix when that is taken), else a new name in the temp directory.
    Nothing is created here."""
    if path is not None:
        p = Path(path).expanduser().resolve()
        if p.exists() and (not p.is_dir() or any(p.iterdir())):
            raise ProgrammingError(f"CREATE MODEL {name}: path {str(p)!r} exists and is not an empty directory")
        return p, False
    db = catalog.db_file(duck)
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name.lower())
    root = Path(str(db) + ".models") if db else Path(tempfile.gettempdir())
    p = root / (safe if db else f"reldl-{safe}-{uuid.uuid4().hex[:8]}")
    if p.exists() and any(p.iterdir()):  # a file database's <db>.models/<name> from an earlier model: a new one
        p = p.with_name(f"{p.name}-{uuid.uuid4().hex[:8]}")
    if not db:  # an in-memory database's catalog dies with the process: so do the files only it names
        scratch.remove_at_exit(p)
    return p, True
