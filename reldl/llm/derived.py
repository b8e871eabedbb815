"""What `CREATE MODEL ... OPTIONS (model_type = 'llm', base = ...) AS SELECT ...` needs whether it builds a sparse
variant (reldl.llm.sparse) or a fine-tuned model (reldl.llm.finetune): the base LLM's catalog row, the query's
rows, and the directory the new model's files go to."""

from __future__ import annotations

from typing import Any

from reldl import catalog
from reldl.catalog import model_dir  # noqa: F401 - where the new model's files go (one rule for every model type)
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
