"""predict() / predict_proba() under all three plans: the same numbers (1e-9 relative, float64), and the planner's
choice under a memory limit."""

from __future__ import annotations

import pytest

import reldl
from reldl.tabular import random_tabular

CASES = [
    ("mlp", dict(hidden=[16, (8, "tanh")], n_outputs=1, task="regression"), "predict"),
    ("mlp", dict(hidden=[(12, "gelu")], n_outputs=1, task="binary"), "predict_proba"),
    ("logistic_reg", dict(hidden=[], n_outputs=3, task="multiclass"), "predict"),
    ("linear_reg", dict(hidden=[], n_outputs=1, task="regression"), "predict"),
]


@pytest.fixture
def con():
    con = reldl.connect()
    con.execute(
        "CREATE TABLE f AS SELECT i AS id, random() AS a, random() - 0.5 AS b, "
        "CASE WHEN i % 9 = 0 THEN NULL ELSE random() END AS c, (i % 4)::DOUBLE AS d FROM range(3000) t(i)"
    )
    yield con
    con.close()


def _close(x, y) -> bool:
    if x is None or y is None:
        return x is None and y is None
    if isinstance(x, list):
        return len(x) == len(y) and all(_close(a, b) for a, b in zip(x, y))
    return abs(x - y) <= 1e-9 * max(1.0, abs(y))


@pytest.mark.parametrize("model_type, kw, fn", CASES)
def test_three_plans_agree(con, tmp_path, model_type, kw, fn):
    random_tabular(tmp_path / "m", model_type, 4, seed=3, **kw)
    con.execute(f"CREATE MODEL m OPTIONS (model_type = '{model_type}', path = '{tmp_path / 'm'}')")
    sql = f"SELECT id, {fn}('m', a, b, c, d) AS y FROM f WHERE id % 2 = 0 ORDER BY id"
    rows = {}
    for mode in ("udf", "dl", "relation"):
        con.execute(f"SET reldl_plan = '{mode}'")
        rows[mode] = con.execute(sql).fetchall()
    assert len(rows["udf"]) == 1500
    for mode in ("dl", "relation"):
        assert all(a[0] == b[0] and _close(a[1], b[1]) for a, b in zip(rows[mode], rows["udf"])), mode
    assert sum(r[1] is None for r in rows["udf"]) == len([i for i in range(0, 3000, 2) if i % 9 == 0])


def test_memory_limit_makes_the_planner_choose_relation(con, tmp_path):
    """Weights (34 MB float32) plus one chunk of activations (100 MB) exceed a 48 MB limit: only the relation-centric
    plan fits, and DuckDB spills its weight table (67 MB as DOUBLE) and intermediates to disk."""
    random_tabular(tmp_path / "m", "mlp", 4, hidden=[2048, 4096], n_outputs=1, task="regression", seed=1)
    con.execute(f"CREATE MODEL m OPTIONS (model_type = 'mlp', path = '{tmp_path / 'm'}')")
    sql = "SELECT id, predict('m', a, b, c, d) AS y FROM f WHERE id < 40 ORDER BY id"
    want = con.execute(sql).fetchall()  # no limit: whatever the planner picks
    con.execute(f"SET temp_directory = '{tmp_path / 'spill'}'")
    con.execute("SET memory_limit = '48MB'")
    text = "\n".join(r[0] for r in con.execute("EXPLAIN " + sql).fetchall())
    assert text.startswith("reldl plan: relation-centric"), text
    assert "infeasible" in text
    got = con.execute(sql).fetchall()
    assert len(got) == 40 and all(_close(a[1], b[1]) for a, b in zip(got, want))


def test_wrong_feature_count_names_the_model(con, tmp_path):
    random_tabular(tmp_path / "m", "mlp", 4, hidden=[8], n_outputs=1, task="regression")
    con.execute(f"CREATE MODEL m OPTIONS (model_type = 'mlp', path = '{tmp_path / 'm'}')")
    for mode in ("udf", "dl"):
        con.execute(f"SET reldl_plan = '{mode}'")
        with pytest.raises(reldl.DataError, match="model 'm' expects 4 features, got 3"):
            con.execute("SELECT predict('m', a, b, c) FROM f")
