"""CREATE MODEL ... AS SELECT that cannot train: one line naming the problem, and the database left as it was.

* training that diverges (the loss or the parameters stop being finite) fails instead of registering the model;
* a model whose parameters would not fit (hidden_units = [100000000]) is refused before anything is allocated;
* a training query that returns no rows leaves no training bookkeeping behind (not even an empty table).
"""

from __future__ import annotations

import pytest
from sqlhelpers import one_line

import reldl
from reldl.autodiff import models

DIVERGES = (
    "CREATE {verb} m OPTIONS (model_type = {kind!r}, label = 'y', optimizer = 'sgd', learning_rate = 1e6, "
    "epochs = 5, batch_size = 50) AS SELECT x1, x2, y FROM big"
)
GOOD = (
    "CREATE {verb} m OPTIONS (model_type = 'linear_reg', label = 'y', epochs = 2, batch_size = 50) "
    "AS SELECT x1 / 1000 AS x1, x2 / 1000 AS x2, y / 1000 AS y FROM big"
)


@pytest.fixture
def fresh():
    """An in-memory database with unscaled features (thousands to tens of thousands) and no training done yet."""
    conn = reldl.connect()
    conn.execute(
        "CREATE TABLE big AS SELECT i::DOUBLE * 1000 AS x1, (i % 7)::DOUBLE * 1e4 AS x2, (i * 37 % 1000)::DOUBLE AS y, "
        "i % 2 AS c, 'u' || (i % 9) AS who, 'i' || (i % 5) AS what FROM range(200) t(i)"
    )
    yield conn
    conn.close()


def _reldl_tables(conn) -> list[str]:
    rows = conn.execute("SELECT table_name FROM duckdb_tables() WHERE schema_name = 'reldl' ORDER BY 1").fetchall()
    return [t for (t,) in rows]


def _snapshot(conn) -> tuple:
    """Every table with its rows, and the catalog."""
    tables = conn.execute("SELECT schema_name, table_name FROM duckdb_tables() ORDER BY ALL").fetchall()
    rows = {t: conn.execute(f'SELECT * FROM "{t[0]}"."{t[1]}" ORDER BY ALL').fetchall() for t in tables}
    return tables, rows


def _fails(conn, sql: str, kind: type[reldl.Error] = reldl.Error) -> str:
    with pytest.raises(kind) as info:
        conn.execute(sql)
    return one_line(info.value)


# -- 1. divergence


@pytest.mark.parametrize("kind", ["linear_reg", "mlp"])
def test_diverging_training_fails_and_leaves_nothing(fresh, kind):
    msg = _fails(fresh, DIVERGES.format(verb="MODEL", kind=kind), reldl.DataError)
    assert msg.startswith("CREATE MODEL m: training diverged at epoch ")
    assert "loss is inf" in msg or "loss is nan" in msg
    assert msg.endswith("lower learning_rate or scale the features")
    assert fresh.execute("SELECT count(*) FROM reldl.models").fetchall() == [(0,)]
    assert _reldl_tables(fresh) == ["models"]  # no parameter tables, no training_jobs / runs / log
    fresh.execute(GOOD.format(verb="MODEL"))  # the statement with scaled features trains
    assert fresh.execute("SELECT count(*) FROM big WHERE isfinite(predict('m', x1 / 1000, x2 / 1000))").fetchall() == [
        (200,)
    ]


def test_diverging_replace_keeps_the_registered_model_and_its_log(fresh):
    fresh.execute(GOOD.format(verb="MODEL"))
    before = _snapshot(fresh)
    predictions = fresh.execute("SELECT predict('m', x1 / 1000, x2 / 1000) FROM big ORDER BY x1").fetchall()
    msg = _fails(fresh, DIVERGES.format(verb="OR REPLACE MODEL", kind="linear_reg"), reldl.DataError)
    assert "training diverged at epoch" in msg
    assert _snapshot(fresh) == before  # catalog, training log and runs, the old model's tables: as they were
    assert fresh.execute("SELECT predict('m', x1 / 1000, x2 / 1000) FROM big ORDER BY x1").fetchall() == predictions


def test_the_same_statement_diverging_on_new_data_keeps_the_registered_model(fresh):
    """CREATE OR REPLACE with the statement a model was trained with (same options and query, so the same job spec)
    trains beside the registered model's tables, never over them: a matrix factorization predicts from its tables."""
    fresh.execute("CREATE TABLE r AS SELECT who, what, (x2 / 1e4 + 1) AS y FROM big")
    create = (
        "CREATE OR REPLACE MODEL m OPTIONS (model_type = 'matrix_factorization', user = 'who', item = 'what', "
        "label = 'y', optimizer = 'sgd', learning_rate = 0.05, epochs = 5) AS SELECT who, what, y FROM r"
    )
    fresh.execute(create)
    before = _snapshot(fresh)
    predict = "SELECT who, what, predict('m', who, what) FROM (SELECT DISTINCT who, what FROM r) ORDER BY ALL"
    predictions = fresh.execute(predict).fetchall()
    fresh.execute("UPDATE r SET y = y * 1e8")
    assert "training diverged at epoch" in _fails(fresh, create, reldl.DataError)
    fresh.execute("UPDATE r SET y = y / 1e8")
    assert _snapshot(fresh) == before and fresh.execute(predict).fetchall() == predictions
    fresh.execute(create)  # trains again, and the model it replaces is dropped
    assert fresh.execute(predict).fetchall() == predictions  # (same data, seed and options: the same model)
    assert len([t for t in _reldl_tables(fresh) if t.startswith("m_m_")]) == len(
        [t for (_, t) in before[0] if t.startswith("m_m_")]
    )


def test_parameters_that_overflow_on_the_last_update_are_divergence(fresh):
    """One step: its loss is finite (zero weights), the update makes the weights infinite."""
    msg = _fails(
        fresh,
        "CREATE MODEL m OPTIONS (model_type = 'linear_reg', label = 'y', optimizer = 'sgd', learning_rate = 1e305, "
        "epochs = 1, batch_size = 256) AS SELECT x1, x2, y FROM big",
        reldl.DataError,
    )
    assert msg.startswith("CREATE MODEL m: training diverged at epoch 1 (step 1): the parameters are not finite")
    assert _reldl_tables(fresh) == ["models"]


def test_non_finite_data_is_named_not_blamed_on_the_learning_rate(fresh):
    msg = _fails(
        fresh,
        "CREATE MODEL m OPTIONS (model_type = 'logistic_reg', label = 'c', epochs = 1) "
        "AS SELECT CASE WHEN x1 > 5000 THEN 'nan'::DOUBLE ELSE x1 END AS x1, c FROM big",
        reldl.DataError,
    )
    assert "loss is nan at the first step, before any update" in msg and "learning_rate" not in msg
    assert _reldl_tables(fresh) == ["models"]


def test_diverging_matrix_factorization(fresh):
    msg = _fails(
        fresh,
        "CREATE MODEL m OPTIONS (model_type = 'matrix_factorization', user = 'who', item = 'what', label = 'y', "
        "optimizer = 'sgd', learning_rate = 1e6, epochs = 10) AS SELECT who, what, y FROM big",
        reldl.DataError,
    )
    assert msg.startswith("CREATE MODEL m: training diverged at epoch ") and "lower learning_rate" in msg
    assert _reldl_tables(fresh) == ["models"]


# -- 2. model size


@pytest.mark.parametrize(
    "options,words",
    [
        (
            "model_type = 'mlp', hidden_units = [100000, 100000]",
            "hidden_units = [100000, 100000] with 2 features needs at least 10,000,500,001 parameters "
            "(74.5 GiB as DOUBLE)",
        ),
        ("model_type = 'mlp', hidden_units = 100000000", "needs at least 400,000,001 parameters (3.0 GiB as DOUBLE)"),
        ("model_type = 'gcn', edges = 'big', node = 'x1', hidden_units = [1000000000]", "needs at least"),
        ("model_type = 'mlp', hidden_units = [0]", "hidden_units must be a list of positive integers"),
        ("model_type = 'mlp', hidden_units = [8, -1]", "hidden_units must be a list of positive integers"),
        ("model_type = 'mlp', hidden_units = 0", "hidden_units must be a list of positive integers"),
    ],
)
def test_absurd_model_sizes_are_refused_before_allocating(fresh, options, words):
    msg = _fails(fresh, f"CREATE MODEL m OPTIONS ({options}, label = 'c') AS SELECT x1, x2, c FROM big")
    assert msg.startswith("CREATE MODEL m: ") and words in msg
    if "parameters" in words:
        assert "over the limit of" in msg and "reduce hidden_units" in msg
    assert _reldl_tables(fresh) == ["models"]


def test_num_factors_is_capped(fresh):
    msg = _fails(
        fresh,
        "CREATE MODEL m OPTIONS (model_type = 'matrix_factorization', user = 'who', item = 'what', label = 'y', "
        "num_factors = 1000000000) AS SELECT who, what, y FROM big",
    )
    assert "num_factors = 1000000000" in msg and "over the limit of" in msg and "reduce num_factors" in msg
    assert _reldl_tables(fresh) == ["models"]


def test_the_limit_is_checked_again_once_classes_and_users_are_known(fresh, monkeypatch):
    """What the data decides (classes: the largest label; users and items: distinct values) is checked before the
    parameters are made, and the data tables made so far are rolled back."""
    monkeypatch.setattr(models, "MAX_PARAMETER_BYTES", 8 * 1000)  # 1000 parameters
    msg = _fails(
        fresh,
        "CREATE MODEL m OPTIONS (model_type = 'logistic_reg', label = 'y') AS SELECT x1, x2, y::INT AS y FROM big",
    )
    assert "2 features and 1,000 classes needs 3,000 parameters" in msg and "limit of 1,000 parameters" in msg
    assert _reldl_tables(fresh) == ["models"]
    monkeypatch.setattr(models, "MAX_PARAMETER_BYTES", 8 * 20)
    msg = _fails(
        fresh,
        "CREATE MODEL m OPTIONS (model_type = 'matrix_factorization', user = 'who', item = 'what', label = 'y', "
        "num_factors = 2) AS SELECT who, what, y FROM big",
    )
    assert "num_factors = 2 for 9 users and 5 items needs 28 parameters" in msg
    assert _reldl_tables(fresh) == ["models"]
    fresh.execute("CREATE MODEL m OPTIONS (model_type = 'linear_reg', label = 'y') AS SELECT x1, x2, y FROM big")


# -- 3. a training query without rows


@pytest.mark.parametrize(
    "options,query",
    [
        ("model_type = 'logistic_reg', label = 'c'", "SELECT x1, x2, c FROM big WHERE false"),
        ("model_type = 'mlp', label = 'y'", "SELECT x1, x2, y FROM big WHERE x1 < 0"),
        (
            "model_type = 'matrix_factorization', user = 'who', item = 'what', label = 'y'",
            "SELECT who, what, y FROM big LIMIT 0",
        ),
    ],
)
def test_empty_training_query_leaves_no_trace(fresh, options, query):
    msg = _fails(fresh, f"CREATE MODEL m OPTIONS ({options}) AS {query}", reldl.DataError)
    assert msg == "CREATE MODEL m: the SELECT returned no rows"
    assert _reldl_tables(fresh) == ["models"]  # no training_jobs table, empty or not
    fresh.execute(GOOD.format(verb="MODEL"))  # then bookkeeping exists: a second failure adds no row to it
    before = _snapshot(fresh)
    _fails(fresh, f"CREATE MODEL other OPTIONS ({options}) AS {query}", reldl.DataError)
    assert _snapshot(fresh) == before
