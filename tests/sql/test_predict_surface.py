"""predict / predict_proba: the same answer or the same one-line error under every plan."""

from __future__ import annotations

import pytest

import reldl

PLANS = ["udf", "dl", "relation"]


def _err(conn, sql: str) -> str:
    with pytest.raises(reldl.Error) as info:
        conn.execute(sql).fetchall()
    msg = str(info.value)
    assert msg and "\n" not in msg
    return msg


@pytest.fixture
def one(conn):
    """`lin`: a linear regression of one feature (trained in SQL; epochs = 0 keeps its seeded initial weights)."""
    conn.execute("CREATE TABLE t AS SELECT range::DOUBLE AS x, (2 * range)::DOUBLE AS y FROM range(4)")
    conn.execute("CREATE MODEL lin OPTIONS (model_type = 'linear_reg', label = 'y', epochs = 0) AS SELECT x, y FROM t")
    return conn


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize(
    "call, typ, fixed",
    [
        ("predict('lin', x)", "DOUBLE", "predict('lin', [x])"),
        ("predict('lin', x > 1)", "BOOLEAN", "predict('lin', [(x > 1)::INT])"),
        ("predict_proba('lin', x)", "DOUBLE", "predict_proba('lin', [x])"),
    ],
)
def test_lone_feature_column_says_how_to_call(one, plan, call, typ, fixed):
    fn = call.split("(")[0]
    one.execute(f"SET reldl_plan = '{plan}'")
    assert _err(one, f"SELECT {call} FROM t") == (
        f"{fn}: a single feature argument is taken as the list of features (DOUBLE[]) but is {typ}: "
        f"for a model of one feature write {fn}(model, [x])"
    )
    assert len(one.execute(f"SELECT {fixed} FROM t").fetchall()) == 4


@pytest.mark.parametrize("plan", PLANS)
def test_regression_proba_is_the_output_under_every_plan(one, plan):
    one.execute(f"SET reldl_plan = '{plan}'")
    rows = one.execute("SELECT predict('lin', [x]) AS p, predict_proba('lin', [x]) AS q FROM t ORDER BY x").fetchall()
    assert len(rows) == 4 and all(q == [p] for p, q in rows)


@pytest.mark.parametrize("plan", PLANS)
def test_wrong_length_and_null_features_under_every_plan(one, plan):
    one.execute(f"SET reldl_plan = '{plan}'")
    assert _err(one, "SELECT predict('lin', x, NULL) FROM t") == "predict: model 'lin' expects 1 features, got 2"
    assert _err(one, "SELECT predict('lin', x, x) FROM t") == "predict: model 'lin' expects 1 features, got 2"
    sql = "SELECT predict('lin', NULL::DOUBLE[]) AS p, predict_proba('lin', [NULL]) AS q FROM t"
    assert one.execute(sql).fetchall() == [(None, None)] * 4
