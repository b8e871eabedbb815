"""ORDER BY ... LIMIT before model calls (planner/plans.py push_top_n): the same rows as the statement as written,
with only the top-N's rows reaching the model, under every plan; shapes the rewrite must not touch are left alone."""

from __future__ import annotations

import pytest

import reldl
from reldl import planning
from reldl.llm.engine import Engine
from reldl.planner import plans, predict_calls
from reldl.tabular import random_tabular
from reldl.udfs.predict import PredictFunctions

GEN = "llm_generate(prompt, max_tokens := 3)"


@pytest.fixture
def con(llama_path):
    con = reldl.connect()
    con.execute(f"CREATE MODEL m OPTIONS (model_type = 'llm', path = '{llama_path}')")
    con.execute(
        "CREATE TABLE t AS SELECT i AS id, (i * 7) % 23 AS k, CASE WHEN i % 6 = 0 THEN NULL ELSE i % 5 END AS n, "
        "'review ' || i AS prompt FROM range(200) r(i)"
    )
    con.execute("CREATE TABLE u AS SELECT i AS id, 'user ' || (i % 9) AS name FROM range(200) r(i)")
    # the un-rewritten semantics: the same statement with the call replaced by a lookup of its (pure) result
    con.execute(f"CREATE TABLE gens AS SELECT prompt AS p, {GEN} AS g FROM t")
    con.execute("CREATE MACRO fake(x) AS (SELECT g FROM gens WHERE gens.p IS NOT DISTINCT FROM x)")
    yield con
    con.close()


@pytest.fixture
def prompts(monkeypatch):
    seen: list[int] = []
    original = Engine.generate_ids

    def counting(self, ids, *args, **kw):
        seen.append(len(ids))
        return original(self, ids, *args, **kw)

    monkeypatch.setattr(Engine, "generate_ids", counting)
    return seen


def _explain(con, sql: str) -> str:
    return "\n".join(r[0] for r in con.execute("EXPLAIN " + sql).fetchall())


REWRITTEN = [
    # (statement with {g} for the model call, rows that reach the model)
    ("SELECT id, {g} AS g FROM t ORDER BY id LIMIT 5", 5),
    ("SELECT id, {g} FROM t ORDER BY id DESC LIMIT 4 OFFSET 3", 4),
    ("SELECT id AS key, {g} AS g FROM t ORDER BY key DESC LIMIT 3", 3),
    ("SELECT -id AS id, {g} AS g FROM t ORDER BY id LIMIT 3", 3),  # the alias wins over the column, as in DuckDB
    ("SELECT k, id, {g} FROM t ORDER BY 1, 2 DESC LIMIT 6", 6),
    ("SELECT n, id, {g} AS g FROM t ORDER BY n NULLS FIRST, id LIMIT 7", 7),
    ("SELECT n, id, {g} AS g FROM t ORDER BY n DESC NULLS LAST, id DESC LIMIT 7 OFFSET 2", 7),
    ("SELECT t.id, {g} AS g FROM t WHERE t.k > 10 ORDER BY t.k, t.id LIMIT 5", 5),
    ("SELECT r.id, {g} AS g FROM main.t AS r WHERE r.id % 3 = 0 ORDER BY r.id + r.k LIMIT 4", 4),
    ("SELECT *, {g} AS g FROM t ORDER BY k DESC, id LIMIT 3", 3),
    ("WITH c AS (SELECT * FROM t WHERE id > 50) SELECT c.id, {g} AS g FROM c ORDER BY c.id LIMIT 4", 4),
    ("SELECT x.id, x.g FROM (SELECT id, {g} AS g FROM t ORDER BY id DESC LIMIT 4) AS x ORDER BY x.id", 4),
    ("SELECT id, {g} AS g FROM (SELECT * FROM t WHERE k < 5) s ORDER BY lower(prompt) LIMIT 5", 5),
]


@pytest.mark.parametrize("mode", ["udf", "dl"])
@pytest.mark.parametrize("sql, n", REWRITTEN)
def test_rewritten_top_n_gives_the_same_rows_and_runs_n_prompts(con, prompts, mode, sql, n):
    want = con.execute(sql.format(g="fake(prompt)")).fetchall()
    con.execute(f"SET reldl_plan = '{mode}'")
    query = sql.format(g=GEN)
    assert plans.TOP_N_NOTE in _explain(con, query)
    prompts.clear()
    got = con.execute(query).fetchall()
    assert got == want
    assert sum(prompts) == n


def test_parameterized_limit_and_where(con, prompts):
    sql = "SELECT id, {g} AS g FROM t WHERE k > ? ORDER BY id LIMIT ? OFFSET ?"
    want = con.execute(sql.format(g="fake(prompt)"), [3, 4, 2]).fetchall()
    prompts.clear()
    assert con.execute(sql.format(g=GEN), [3, 4, 2]).fetchall() == want
    assert sum(prompts) == 4


NOT_REWRITTEN = [
    "SELECT id, {g} AS g FROM t ORDER BY g LIMIT 3",  # ORDER BY the generated text
    "SELECT id, {g} AS g FROM t ORDER BY 2 LIMIT 3",
    "SELECT id, {g} FROM t ORDER BY {g}, id LIMIT 3",
    "SELECT id, {g} AS g FROM t ORDER BY length(g), id LIMIT 3",
    "SELECT count(*) AS c, max({g}) AS g FROM t ORDER BY c LIMIT 1",  # aggregates
    "SELECT k, max({g}) AS g FROM t GROUP BY k ORDER BY k LIMIT 2",
    "SELECT DISTINCT k, {g} AS g FROM t ORDER BY k, g LIMIT 3",
    "SELECT DISTINCT id, {g} AS g FROM t ORDER BY id LIMIT 3",
    "SELECT id, {g} AS g, row_number() OVER (ORDER BY k) AS r FROM t ORDER BY id LIMIT 3",  # window
    "SELECT id, {g} AS g FROM t QUALIFY row_number() OVER (ORDER BY id) < 5 ORDER BY id LIMIT 3",
    "SELECT id, {g} AS g FROM t ORDER BY id LIMIT 3 UNION ALL SELECT 1, 'x' ORDER BY 1 LIMIT 2",
    "SELECT t.id, {g} AS g FROM t JOIN u ON t.id = u.id ORDER BY u.name, t.id LIMIT 3",  # joins: not yet
    "SELECT id, {g} AS g FROM t WHERE {g} <> '' ORDER BY id LIMIT 3",  # the call filters every row
    "SELECT id * 2 AS d, {g} AS g FROM t WHERE d > 10 ORDER BY id LIMIT 3",  # WHERE reads an alias
    "SELECT id, {g} AS g FROM t ORDER BY random() LIMIT 3",
    "SELECT id, {g} AS g FROM t ORDER BY id LIMIT 10 PERCENT",
]


@pytest.mark.parametrize("sql", NOT_REWRITTEN)
def test_shapes_left_alone(con, sql):
    tree = predict_calls.parse_one(sql.format(g=GEN))
    out, done = plans.push_top_n(tree, lambda name: name.lower() in {"length", "lower", "row_number"})
    assert done == [] and out.sql() == tree.sql()


@pytest.mark.parametrize("sql", NOT_REWRITTEN[:3] + NOT_REWRITTEN[12:14])
def test_left_alone_statements_still_run_as_written(con, sql):
    want = con.execute(sql.format(g="fake(prompt)")).fetchall()
    assert plans.TOP_N_NOTE not in _explain(con, sql.format(g=GEN))
    assert con.execute(sql.format(g=GEN)).fetchall() == want


def test_unknown_functions_are_not_taken_for_scalars():
    sql = "SELECT id, my_udf(k), llm_generate(prompt) FROM t ORDER BY id LIMIT 3"  # might be an aggregate
    assert plans.push_top_n(predict_calls.parse_one(sql))[1] == []
    assert plans.push_top_n(predict_calls.parse_one(sql), lambda name: name == "my_udf")[1] != []


def test_explain_and_cost_count_n_rows(con):
    text = _explain(con, f"SELECT id, {GEN} AS g FROM t ORDER BY id LIMIT 5")
    assert "top-N before model calls: ORDER BY ... LIMIT over t first; the calls see at most 5 rows" in text
    assert "inputs: ~5 rows" in text
    assert "ORDER BY id LIMIT 5) AS t" in text  # the statement it runs


@pytest.fixture
def predict_rows(monkeypatch):
    seen: list[int] = []
    run, rel = PredictFunctions._run, planning.relation_predict

    def counting_run(self, fn, model, features, proba):
        seen.append(len(features))
        return run(self, fn, model, features, proba)

    def counting_rel(cur, function, cols):
        seen.append(len(cols[0]))
        return rel(cur, function, cols)

    monkeypatch.setattr(PredictFunctions, "_run", counting_run)
    monkeypatch.setattr(planning, "relation_predict", counting_rel)
    return seen


@pytest.mark.parametrize("mode", ["udf", "dl", "relation"])
def test_predict_under_all_three_plans(tmp_path, predict_rows, mode):
    con = reldl.connect()
    random_tabular(tmp_path / "m", "mlp", 2, seed=3, hidden=[8], n_outputs=1, task="regression")
    con.execute(f"CREATE MODEL p OPTIONS (model_type = 'mlp', path = '{tmp_path / 'm'}')")
    con.execute(
        "CREATE TABLE f AS SELECT i AS id, (i % 13)::DOUBLE AS a, (i % 7)::DOUBLE / 7 AS b FROM range(500) r(i)"
    )
    con.execute(f"SET reldl_plan = '{mode}'")
    con.execute("CREATE TABLE preds AS SELECT id, predict('p', a, b) AS y FROM f")
    con.execute("CREATE MACRO fp(i) AS (SELECT y FROM preds WHERE preds.id = i)")
    sql = "SELECT f.id, {p} AS y FROM f WHERE a > 2 ORDER BY f.b DESC, 1 LIMIT 6 OFFSET 1"
    want = con.execute(sql.format(p="fp(f.id)")).fetchall()
    assert plans.TOP_N_NOTE in _explain(con, sql.format(p="predict('p', a, b)"))
    predict_rows.clear()
    got = con.execute(sql.format(p="predict('p', a, b)")).fetchall()
    assert [r[0] for r in got] == [r[0] for r in want]
    assert all(abs(x[1] - y[1]) <= 1e-9 * max(1.0, abs(y[1])) for x, y in zip(got, want))
    assert sum(predict_rows) == 6
    con.close()
