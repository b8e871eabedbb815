"""planner/predict_calls.py: predict(m, f1, f2, ...) -> predict(m, [f1, f2, ...]), on text and on sqlglot trees."""

from __future__ import annotations

import pytest
import sqlglot
from sqlglot import exp

from reldl.planner.predict_calls import DIALECT, calls_predict, listify_predict_calls, listify_predict_sql, parse_one

CASES = [
    # (input, text rewrite)
    ("SELECT predict(m, a, b, c) FROM t", "SELECT predict(m, [a, b, c]) FROM t"),
    ("SELECT predict_proba('m', a, b) FROM t", "SELECT predict_proba('m', [a, b]) FROM t"),
    ("SELECT PREDICT('m', 1, -2.5, x + 1)", "SELECT PREDICT('m', [1, -2.5, x + 1])"),
    # already a list, or a single argument that may be a list column: unchanged
    ("SELECT predict('m', [a, b]) FROM t", "SELECT predict('m', [a, b]) FROM t"),
    ("SELECT predict('m', feats) FROM t", "SELECT predict('m', feats) FROM t"),
    (
        "SELECT predict_proba(model_col, list_value(a, b)) FROM t",
        "SELECT predict_proba(model_col, list_value(a, b)) FROM t",
    ),
    # a lone number or an unpacked *COLUMNS cannot be a list
    ("SELECT predict('m', 2.5), predict('m', -1)", "SELECT predict('m', [2.5]), predict('m', [-1])"),
    ("SELECT predict('m', *COLUMNS('f.*')) FROM t", "SELECT predict('m', [*COLUMNS('f.*')]) FROM t"),
    ("SELECT predict('m', a, *COLUMNS('f.*')) FROM t", "SELECT predict('m', [a, *COLUMNS('f.*')]) FROM t"),
    # nested calls, function calls and lists inside the arguments
    (
        "SELECT predict('m', coalesce(a, 0), [1, 2][1], predict('n', x, y)) FROM t",
        "SELECT predict('m', [coalesce(a, 0), [1, 2][1], predict('n', [x, y])]) FROM t",
    ),
    ("SELECT predict('m', predict('n', a, b))", "SELECT predict('m', predict('n', [a, b]))"),
    # named arguments, qualified names and non-calls are left alone
    ("SELECT predict('m', a, b, x := 1)", "SELECT predict('m', a, b, x := 1)"),
    ("SELECT s.predict(a, b, c) FROM t", "SELECT s.predict(a, b, c) FROM t"),
    (
        "SELECT predict, predict_proba FROM t WHERE predict > 1",
        "SELECT predict, predict_proba FROM t WHERE predict > 1",
    ),
    ("SELECT 'predict(m, a, b)' AS s", "SELECT 'predict(m, a, b)' AS s"),
]


@pytest.mark.parametrize("sql, want", CASES)
def test_text_rewrite(sql, want):
    assert listify_predict_sql(sql) == want


@pytest.mark.parametrize("sql, want", CASES)
def test_tree_rewrite_agrees_with_text(sql, want):
    got = listify_predict_calls(parse_one(sql))
    assert got.sql(dialect=DIALECT) == parse_one(want).sql(dialect=DIALECT)


def test_text_rewrite_keeps_the_rest_verbatim():
    sql = "select  /* keep */ predict('m',a,b)::VARCHAR AS p,\n  x->>'$.k' from t;  SELECT predict('m', c, d)"
    assert listify_predict_sql(sql) == (
        "select  /* keep */ predict('m',[a,b])::VARCHAR AS p,\n  x->>'$.k' from t;  SELECT predict('m', [c, d])"
    )
    assert listify_predict_sql("SELECT 'unterminated") == "SELECT 'unterminated"
    assert listify_predict_sql("SELECT predict(m, a, b") == "SELECT predict(m, a, b"  # DuckDB reports it


def test_tree_shape():
    tree = listify_predict_calls(parse_one("SELECT predict(m, a, b, c) FROM t"))
    call = tree.find(exp.Anonymous)
    assert str(call.this).lower() == "predict" and len(call.expressions) == 2
    assert isinstance(call.expressions[1], exp.Array)
    assert [c.name for c in call.expressions[1].expressions] == ["a", "b", "c"]


def test_copy_flag():
    tree = parse_one("SELECT predict(m, a, b)")
    listify_predict_calls(tree)
    assert tree.sql(dialect=DIALECT) == "SELECT PREDICT(m, a, b)"  # copy=True: the input is untouched
    listify_predict_calls(tree, copy=False)
    assert tree.sql(dialect=DIALECT) == "SELECT PREDICT(m, [a, b])"


def test_stock_duckdb_dialect():
    """sqlglot's own duckdb dialect reads predict as BigQuery's ML.PREDICT: at most 3 arguments, and written back
    as PREDICT(MODEL m, ...), which DuckDB rejects. DIALECT parses any number; the transform repairs exp.Predict."""
    with pytest.raises(sqlglot.errors.ParseError):
        sqlglot.parse_one("SELECT predict(m, a, b, c)", read="duckdb")
    stock = sqlglot.parse_one("SELECT predict(m, a, b), predict('m', x)", read="duckdb")
    assert "MODEL" in stock.sql(dialect="duckdb")
    fixed = listify_predict_calls(stock).sql(dialect="duckdb")
    assert fixed == "SELECT PREDICT(m, [a, b]), PREDICT('m', x)"
    assert len(parse_one("SELECT predict(m, a, b, c, d, e)").find(exp.Anonymous).expressions) == 6


def test_calls_predict():
    assert calls_predict("SELECT predict('m', [a]) FROM t")
    assert calls_predict("select x, PREDICT_PROBA(m, a, b) from t")
    assert not calls_predict("SELECT predict FROM t")
    assert not calls_predict("SELECT 'predict(x)'")
