"""predict / predict_proba as SQL functions on a plain DuckDB connection: batching by model, NULLs, errors,
the catalog snapshot, and the variadic form through planner/predict_calls.py."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from tabular_helpers import MODELS, reference

from reldl import catalog, errors
from reldl.planner.predict_calls import listify_predict_sql
from reldl.tabular import validate_create_options
from reldl.udfs.predict import PredictFunctions

TOL = dict(rtol=1e-12, atol=1e-12)


def register(duck, name, path):
    model_type = MODELS[path.name]["model_type"]
    resolved, options = validate_create_options(name, {"model_type": model_type, "path": str(path), "device": "cpu"})
    catalog.put_model(duck, name, model_type, resolved, options)


@pytest.fixture
def duck(tabular_models):
    con = duckdb.connect()
    catalog.ensure_schema(con)
    fns = PredictFunctions(con)
    fns.register(con)
    for name in MODELS:
        register(con, name, tabular_models[name])
    yield con
    fns.unregister()
    con.close()


def sql_error(duck, sql, params=None) -> errors.Error:
    """The reldl error (one line) that a failing statement translates to."""
    with pytest.raises(duckdb.Error) as info:
        duck.execute(sql, params).fetchall()
    err = errors.translate(info.value)
    msg = str(err)
    assert msg and "\n" not in msg, repr(msg)
    return err


def make_table(duck, x: np.ndarray, table: str = "t") -> None:
    """Table `table`(id, f0, f1, ...) holding the rows of x (NaN -> NULL)."""
    cols = {"id": pa.array(np.arange(len(x), dtype=np.int32))}
    cols.update({f"f{j}": pa.array(x[:, j], from_pandas=True) for j in range(x.shape[1])})
    data = pa.table(cols)  # noqa: F841 (read by DuckDB's replacement scan)
    duck.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT * FROM data")


def flist(f: int) -> str:
    return "[" + ", ".join(f"f{j}" for j in range(f)) + "]"


@pytest.mark.parametrize("name", list(MODELS))
def test_matches_reference(duck, tabular_models, name):
    f = MODELS[name]["n_features"]
    x = np.random.default_rng(0).normal(size=(3000, f))  # more than one DuckDB chunk (2048 rows)
    make_table(duck, x)
    rows = duck.execute(f"SELECT predict('{name}', {flist(f)}), predict_proba('{name}', {flist(f)}) FROM t ORDER BY id")
    rows = rows.fetchall()
    _, want, want_proba = reference(tabular_models[name], x)
    np.testing.assert_allclose([r[0] for r in rows], want, **TOL)
    np.testing.assert_allclose(np.array([r[1] for r in rows]), want_proba, **TOL)


def test_types(duck):
    (a, b), *_ = duck.execute(
        "SELECT typeof(predict('linear', [1, 2, 3, 4])), typeof(predict_proba('softmax', [1, 2, 3, 4, 5]))"
    ).fetchall()
    assert (a, b) == ("DOUBLE", "DOUBLE[]")


def test_nulls(duck, tabular_models):
    x = np.random.default_rng(1).normal(size=(10, 4))
    x[2, 1] = np.nan  # -> NULL feature
    make_table(duck, x)
    rows = duck.execute(
        "SELECT id, predict('mlp_reg', CASE WHEN id = 5 THEN NULL ELSE [f0, f1, f2, f3] END), "
        "predict(CASE WHEN id = 7 THEN NULL ELSE 'mlp_reg' END, [f0, f1, f2, f3]), "
        "predict_proba('mlp_reg', [f0, f1, f2, f3]) FROM t ORDER BY id"
    ).fetchall()
    want = reference(tabular_models["mlp_reg"], np.nan_to_num(x))[1]
    for i, a, b, p in rows:
        assert a is None if i in (2, 5) else a == pytest.approx(want[i], rel=1e-12)
        assert b is None if i in (2, 7) else b == pytest.approx(want[i], rel=1e-12)
        assert p is None if i == 2 else p == [pytest.approx(want[i], rel=1e-12)]
    assert duck.execute("SELECT predict('linear', NULL), predict_proba('linear', NULL)").fetchall() == [(None, None)]
    assert duck.execute("SELECT predict('linear', [1, NULL, 3, 4])").fetchall() == [(None,)]


def test_all_nulls_and_empty(duck):
    make_table(duck, np.full((5, 4), np.nan))
    assert duck.execute("SELECT predict('linear', [f0, f1, f2, f3]) FROM t").fetchall() == [(None,)] * 5
    assert duck.execute("SELECT predict('linear', [f0, f1, f2, f3]) FROM t WHERE false").fetchall() == []
    assert duck.execute("SELECT predict('no_such_model', [f0]) FROM t WHERE id < 0").fetchall() == []


def test_models_from_a_column_batch_per_model(duck, tabular_models, monkeypatch):
    from reldl.tabular import TabularModel

    calls: list[int] = []
    original = TabularModel.predict

    def spy(self, x):
        calls.append(len(x))
        return original(self, x)

    monkeypatch.setattr(TabularModel, "predict", spy)
    x = np.random.default_rng(2).normal(size=(1000, 3))
    make_table(duck, x)
    rows = duck.execute(
        "SELECT id, predict(CASE id % 3 WHEN 0 THEN 'logistic' WHEN 1 THEN 'MLP_BIN' ELSE NULL END, [f0, f1, f2]) "
        "FROM t ORDER BY id"
    ).fetchall()
    want = {0: reference(tabular_models["logistic"], x)[1], 1: reference(tabular_models["mlp_bin"], x)[1]}
    for i, y in rows:
        assert y is None if i % 3 == 2 else y == pytest.approx(want[i % 3][i], rel=1e-12)
    assert sorted(calls) == [333, 334]  # one batched forward per model (1000 rows: one chunk)


def test_wrong_feature_count(duck):
    err = sql_error(duck, "SELECT predict('mlp_reg', [1, 2, 3])")
    assert isinstance(err, errors.DataError)
    assert str(err) == "predict: model 'mlp_reg' expects 4 features, got 3"
    make_table(duck, np.ones((4, 4)))
    err = sql_error(
        duck, "SELECT predict_proba('softmax', CASE WHEN id = 3 THEN [f0] ELSE [f0, f1, f2, f3, f0] END) FROM t"
    )
    assert str(err) == "predict_proba: model 'softmax' expects 5 features, got 1"


def test_unknown_and_llm_models(duck, tabular_models):
    err = sql_error(duck, "SELECT predict('nope', [1.0])")
    assert isinstance(err, errors.ProgrammingError) and "'nope' does not exist" in str(err)
    catalog.put_model(duck, "chat", "llm", str(tabular_models["linear"]), {"dtype": "auto", "device": "auto"})
    err = sql_error(duck, "SELECT predict_proba('chat', [1.0])")
    assert isinstance(err, errors.ProgrammingError)
    assert "model 'chat' is a 'llm' model, not a tabular model" in str(err)


def test_model_files_removed_after_create(duck, tabular_models, tmp_path):
    import shutil

    d = shutil.copytree(tabular_models["linear"], tmp_path / "linear")
    register(duck, "gone", d)
    (d / "model.safetensors").unlink()
    err = sql_error(duck, "SELECT predict('gone', [1, 2, 3, 4])")
    assert isinstance(err, errors.CheckpointError) and "model.safetensors" in str(err)


def test_catalog_snapshot(duck, tabular_models):
    """begin_query(models): the UDF resolves names in the given catalog (a transaction's own view), per thread.
    reldl runs statements with model calls with DuckDB `threads = 1`, so the UDF runs on the calling thread."""
    duck.execute("SET threads = 1")
    fns = PredictFunctions(duck)
    fns.register(duck)  # a second set of functions (like a second reldl connection) on the same instance
    try:
        other = catalog.ModelRecord("only_here", "linear_reg", str(tabular_models["linear"]), {"device": "cpu"})
        fns.begin_query([other])
        got = duck.execute(f"SELECT {fns.names['predict']}('only_here', [1, 2, 3, 4]::DOUBLE[])").fetchall()
        assert got[0][0] == pytest.approx(reference(tabular_models["linear"], np.array([[1, 2, 3, 4]]))[1][0])
        err = sql_error(duck, f"SELECT {fns.names['predict']}('linear', [1, 2, 3, 4]::DOUBLE[])")
        assert "does not exist" in str(err)
        fns.end_query()
        assert duck.execute(f"SELECT {fns.names['predict']}('linear', [1, 2, 3, 4]::DOUBLE[])").fetchall()[0][0]
    finally:
        fns.unregister()


def test_function_names_are_per_connection(duck):
    a, b = PredictFunctions(duck), PredictFunctions(duck)
    assert set(a.names) == {"predict", "predict_proba"}
    assert a.names["predict"] != b.names["predict"] and a.names["predict_proba"] != b.names["predict_proba"]
    a.register(duck)
    a.unregister()
    with pytest.raises(duckdb.Error):
        duck.execute(f"SELECT {a.names['predict']}('linear', [1.0])").fetchall()


def test_worker_threads(duck, tabular_models):
    """On a plain connection DuckDB may call the UDF from several threads at once."""
    duck.execute("SET threads = 2")
    x = np.random.default_rng(3).normal(size=(50_000, 6))
    make_table(duck, x)
    rows = duck.execute(f"SELECT id, predict('mlp_multi', {flist(6)}) FROM t ORDER BY id").fetchall()
    np.testing.assert_array_equal([r[1] for r in rows], reference(tabular_models["mlp_multi"], x)[1])


def test_variadic_form_after_rewrite(duck, tabular_models):
    x = np.random.default_rng(4).normal(size=(20, 4))
    make_table(duck, x)
    want = reference(tabular_models["mlp_reg"], x)[1]
    for sql in (
        "SELECT predict('mlp_reg', f0, f1, f2, f3) FROM t ORDER BY id",
        "SELECT predict('mlp_reg', *COLUMNS('f\\d')) FROM t ORDER BY id",
        "SELECT predict('mlp_reg', f0, f1, *COLUMNS('f[23]')) FROM t ORDER BY id",
    ):
        rows = duck.execute(listify_predict_sql(sql)).fetchall()
        np.testing.assert_allclose([r[0] for r in rows], want, **TOL)
    proba = duck.execute(listify_predict_sql("SELECT predict_proba('softmax', 1, 2, 3, 4, -5.5)")).fetchall()[0][0]
    np.testing.assert_allclose(proba, reference(tabular_models["softmax"], np.array([[1, 2, 3, 4, -5.5]]))[2][0], **TOL)
