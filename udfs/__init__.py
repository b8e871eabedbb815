"""reldl's SQL functions as DuckDB UDFs: thin adapters from Arrow chunks to the engines."""

from __future__ import annotations

from collections.abc import Callable

import duckdb

from reldl import catalog
from reldl.udfs.llm import LLMFunctions
from reldl.udfs.predict import PredictFunctions


class SqlFunctions:
    """Every reldl SQL function registered for one connection (UDFs on its own handle, macros per cursor)."""

    def __init__(self, duck: duckdb.DuckDBPyConnection):
        self.llm = LLMFunctions(duck)
        self.predict = PredictFunctions(duck)
        self.groups = (self.llm, self.predict)

    def register(self, duck: duckdb.DuckDBPyConnection) -> None:
        for g in self.groups:
            g.register(duck)

    def install_macros(self, duck: duckdb.DuckDBPyConnection) -> None:
        for g in self.groups:
            g.install_macros(duck)

    def unregister(self) -> None:
        for g in self.groups:
            g.unregister()

    def begin_query(self, models: list[catalog.ModelRecord] | None = None) -> None:
        for g in self.groups:
            g.begin_query(models)

    def end_query(self) -> None:
        for g in self.groups:
            g.end_query()

    def function(self, name: str) -> Callable:
        """The Python function behind a SQL function, for plans that call it on whole Arrow columns."""
        return {
            "llm_generate": self.llm.generate,
            "llm_generate_list": self.llm.generate_list,
            "llm_score": self.llm.score,
            "predict": self.predict.predict,
            "predict_proba": self.predict.predict_proba,
        }[name]


def install(duck: duckdb.DuckDBPyConnection) -> SqlFunctions:
    """Register reldl's SQL functions on a plain DuckDB connection."""
    fns = SqlFunctions(duck)
    fns.register(duck)
    return fns
