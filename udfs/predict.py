"""`predict` and `predict_proba` over tabular models (mlp, linear_reg, logistic_reg) as Arrow DuckDB functions.

Per chunk: rows are grouped by model, their feature lists stacked into one [N, F] array and run in one batched
forward. NULL model, NULL feature list or a NULL feature gives NULL; a feature list of the wrong length is an error.
The SQL front ends are TEMP macros (sql/predict_functions.sql): `predict(model, [f1, f2, ...])`; the variadic form
`predict(model, f1, f2, ...)` is rewritten into it by planner/predict_calls.py.
"""

from __future__ import annotations

import itertools
import string
import threading

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from duckdb.sqltypes import DOUBLE, VARCHAR

from reldl import catalog
from reldl.errors import DataError, unknown_model, wrong_model

TABULAR_TYPES = ("mlp", "linear_reg", "logistic_reg")
MACROS_FILE = "predict_functions.sql"


def _array(col) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


class PredictFunctions:
    """predict / predict_proba registered on one DuckDB connection (UDF names unique to it, like LLMFunctions)."""

    _ids = itertools.count()

    def __init__(self, duck: duckdb.DuckDBPyConnection):
        self.duck = duck
        self.local = threading.local()
        n = next(self._ids)
        self.names = {"predict": f"reldl_predict_{n}", "predict_proba": f"reldl_predict_proba_{n}"}

    def register(self, duck: duckdb.DuckDBPyConnection) -> None:
        """Create this connection's UDFs on `duck` (its own handle) and the macros."""
        features = duckdb.list_type(DOUBLE)
        for key, fn, ret in (
            ("predict", self.predict, DOUBLE),
            ("predict_proba", self.predict_proba, duckdb.list_type(DOUBLE)),
        ):
            duck.create_function(
                self.names[key], fn, [VARCHAR, features], ret, type="arrow", null_handling="special", side_effects=False
            )
        self.install_macros(duck)

    def install_macros(self, duck: duckdb.DuckDBPyConnection) -> None:
        """The TEMP macros (per DuckDB connection or cursor) `predict(model, features)` and `predict_proba`."""
        duck.execute(string.Template(catalog.sql_file(MACROS_FILE)).substitute(self.names))

    def unregister(self) -> None:
        for name in self.names.values():
            try:
                self.duck.remove_function(name)
            except duckdb.Error:
                pass

    # -- query lifecycle (same contract as LLMFunctions: reldl's cursor calls these around statements with calls)
    def begin_query(self, models: list[catalog.ModelRecord] | None = None) -> None:
        """`models`: the catalog as the statement's own transaction sees it; kept per thread (the UDF runs on the
        calling thread of a reldl statement with model calls)."""
        self.local.models = models

    def end_query(self) -> None:
        self.local.models = None

    def _catalog(self) -> list[catalog.ModelRecord]:
        models = getattr(self.local, "models", None)
        if models is not None:
            return models
        cur = self.duck.cursor()  # not self.duck: this runs inside a query on it
        try:
            return catalog.list_models(cur)
        finally:
            cur.close()

    def _model(self, fn: str, name: str, models: list[catalog.ModelRecord]):
        rec = catalog.pick_model(models, name)
        if rec is None:
            raise unknown_model(fn, name)
        if rec.model_type not in TABULAR_TYPES:
            raise wrong_model(fn, rec, f"a tabular model ({', '.join(TABULAR_TYPES)})")
        from reldl import tabular  # loads torch: only once a model is actually used

        return rec, tabular.get_tabular(rec.path, rec.device, name=rec.name)

    def _run(self, fn: str, model, features, proba: bool) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        """-> (mask of the rows with a result, [(row indices, outputs)] per model)."""
        model, features = _array(model), _array(features)
        n = len(features)
        lengths = pc.list_value_length(features).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        given = features.is_valid().to_numpy(zero_copy_only=False) & model.is_valid().to_numpy(zero_copy_only=False)
        flat = features.flatten()  # the values of the non-null lists, in row order
        values = flat.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
        valid = given.copy()
        if flat.null_count:  # a NULL feature -> NULL result for that row
            rows = np.repeat(np.arange(n), lengths)
            valid &= np.bincount(rows[~flat.is_valid().to_numpy(zero_copy_only=False)], minlength=n) == 0
        groups: list[tuple[np.ndarray, np.ndarray]] = []
        if not given.any():
            return valid, groups
        starts = np.zeros(n, np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        names = pc.unique(model.filter(pa.array(given))).to_pylist()
        models = self._catalog()
        for name in names:
            rec, net = self._model(fn, name, models)
            mine = given if len(names) == 1 else given & _equal(model, name)
            f = net.n_features
            wrong = mine & (lengths != f)
            if wrong.any():
                got = int(lengths[np.flatnonzero(wrong)[0]])
                raise DataError(f"{fn}: model {rec.name!r} expects {f} features, got {got}")
            idx = np.flatnonzero(mine & valid)
            if len(idx) == 0:
                continue
            if len(idx) == n:  # every row: the values are exactly the [n, f] matrix
                x = values.reshape(n, f)
            else:
                x = values[starts[idx][:, None] + np.arange(f)]
            groups.append((idx, net.predict_proba(x) if proba else net.predict(x)))
        return valid, groups

    def predict(self, model, features) -> pa.Array:
        valid, groups = self._run("predict", model, features, proba=False)
        out = np.zeros(len(valid), np.float64)
        for idx, y in groups:
            out[idx] = y
        return pa.array(out, pa.float64(), mask=~valid)

    def predict_proba(self, model, features) -> pa.Array:
        valid, groups = self._run("predict_proba", model, features, proba=True)
        n = len(valid)
        sizes = np.zeros(n, np.int64)
        for idx, p in groups:
            sizes[idx] = p.shape[1]
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(sizes, out=offsets[1:])
        values = np.empty(int(offsets[-1]), np.float64)
        for idx, p in groups:
            values[offsets[idx][:, None] + np.arange(p.shape[1])] = p
        if offsets[-1] > np.iinfo(np.int32).max:  # only for a direct call on a huge array (DL-centric plans)
            return pa.LargeListArray.from_arrays(offsets, values, mask=pa.array(~valid))
        return pa.ListArray.from_arrays(offsets.astype(np.int32), values, mask=pa.array(~valid))


def _equal(model: pa.Array, name: str) -> np.ndarray:
    return pc.fill_null(pc.equal(model, name), False).to_numpy(zero_copy_only=False)


def install(duck: duckdb.DuckDBPyConnection) -> PredictFunctions:
    """Register predict / predict_proba on a DuckDB connection (or cursor)."""
    fns = PredictFunctions(duck)
    fns.register(duck)
    return fns
