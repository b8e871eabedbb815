"""Plans under a memory limit: the relation plan finishes where torch cannot, the join back of DL/relation results
stays out of core, the cost model refuses plans whose working set exceeds the limit (and EXPLAIN says so), a DL plan
that runs out of memory fails with one line, and the distinct-count estimate."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import reldl
from reldl import planning
from reldl.planner import plans, predict_calls
from reldl.planner import relational as R
from reldl.planner.cost import Workload, estimate
from reldl.tabular import random_tabular, read_layers


def _table(con, name: str, rows: int, dup: int = 0) -> None:
    key = f"i % {dup}" if dup else "i"
    con.execute(
        f"CREATE OR REPLACE TABLE {name} AS SELECT i AS id, (i % 100)::INTEGER AS g, "
        f"sin({key} * 0.1) AS a, cos({key} * 0.7) AS b, ({key} % 13)::DOUBLE AS c, ({key} % 4)::DOUBLE AS d "
        f"FROM range({rows}) t(i)"
    )


def _rows(con, sql: str) -> dict:
    return dict(con.execute(sql).fetchall())


def _close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (a[k] is None and b[k] is None) or abs(a[k] - b[k]) <= 1e-9 * max(1.0, abs(b[k])) for k in a
    )


def test_wide_model_under_32mib_relation_finishes_and_agrees(tmp_path):
    """A 1024-wide layer (8 MiB as float64) under a 32 MiB memory_limit: whole rows, small batches, one thread."""
    random_tabular(tmp_path / "m", "mlp", 4, hidden=[1024, 1024], n_outputs=1, seed=7)
    con = reldl.connect()
    _table(con, "t", 300)
    con.execute(f"CREATE MODEL wide OPTIONS (model_type = 'mlp', path = '{tmp_path / 'm'}')")
    sql = "SELECT id, predict('wide', a, b, c, d) FROM t"
    con.execute("SET reldl_plan = 'dl'")
    expected = _rows(con, sql)
    con.execute(f"SET temp_directory = '{tmp_path / 'spill'}'")
    con.execute("SET memory_limit = '32MiB'")
    con.execute("SET reldl_plan = 'relation'")
    assert _close(_rows(con, sql), expected)
    _, layers = read_layers(tmp_path / "m")
    limit = 32 * 2**20
    assert planning.layer_tiles(layers, limit) == [None, None, None]
    assert planning.layer_tiles(layers, 16 * 2**20)[1] == planning.BIG_LAYER_TILE  # 8 MiB > 30% of 16 MiB
    assert planning.batch_rows(layers, limit) < 2048
    assert planning.single_thread(con.duckdb_connection, layers, [None] * 3, limit) == (
        int(con.execute("SELECT current_setting('threads')").fetchall()[0][0]) > 1
    )
    con.close()


@pytest.mark.parametrize("family", ["dl", "relation"])
def test_join_back_runs_out_of_core(tmp_path, family):
    """200k distinct rows joined back under 32 MiB (the correlated lookup ran out of memory here)."""
    random_tabular(tmp_path / "m", "mlp", 4, hidden=[16], n_outputs=1, seed=7)
    con = reldl.connect()
    _table(con, "t", 200_000)
    con.execute(f"CREATE MODEL small OPTIONS (model_type = 'mlp', path = '{tmp_path / 'm'}')")
    con.execute(f"SET temp_directory = '{tmp_path / 'spill'}'")
    con.execute(f"SET reldl_plan = '{family}'")
    con.execute("SET memory_limit = '32MiB'")
    ((n, s),) = con.execute("SELECT count(y), sum(y) FROM (SELECT predict('small', a, b, c, d) AS y FROM t)").fetchall()
    con.execute("RESET memory_limit")
    con.execute("SET reldl_plan = 'udf'")
    ((n2, s2),) = con.execute(
        "SELECT count(y), sum(y) FROM (SELECT predict('small', a, b, c, d) AS y FROM t)"
    ).fetchall()
    assert n == n2 == 200_000 and abs(s - s2) <= 1e-9 * abs(s2)
    con.close()


@pytest.fixture
def small(tmp_path):
    random_tabular(tmp_path / "m", "mlp", 4, hidden=[8], n_outputs=1, seed=1)
    con = reldl.connect()
    _table(con, "t", 500)
    con.execute("CREATE TABLE u AS SELECT i AS id, i * 2 AS z FROM range(500) t(i)")
    con.execute(f"CREATE MODEL s OPTIONS (model_type = 'mlp', path = '{tmp_path / 'm'}')")
    yield con
    con.close()


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT *, predict('s', a, b, c, d) AS y FROM t ORDER BY id",  # * must not show the join's columns
        "SELECT t.id, u.z, predict('s', a, b, c, d) AS y FROM t, u WHERE t.id = u.id ORDER BY t.id",  # comma join
        "SELECT id FROM t WHERE predict('s', a, b, c, d) > 0 ORDER BY id",  # a call in WHERE
        "SELECT t.id FROM t JOIN u ON u.id = t.id AND predict('s', t.a, t.b, t.c, t.d) > 0 ORDER BY t.id",  # in ON
        "SELECT id, predict('s', a, b, c, d) AS y, predict('s', d, c, b, a) AS y2 FROM t ORDER BY id",  # two calls
    ],
)
def test_rewrites_give_the_udf_rows(small, sql):
    small.execute("SET reldl_plan = 'udf'")
    expected = small.execute(sql).fetchall()
    columns = [d[0] for d in small.execute(sql).description]
    for family in ("dl", "relation"):
        small.execute(f"SET reldl_plan = '{family}'")
        cur = small.execute(sql)
        assert [d[0] for d in cur.description] == columns
        got = cur.fetchall()
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert all(
                (x == y) if not isinstance(x, float) else abs(x - y) <= 1e-9 * max(1.0, abs(y)) for x, y in zip(g, e)
            )


def test_call_in_join_on_uses_subqueries():
    tree = predict_calls.parse_one("SELECT t.id FROM t JOIN u ON u.id = t.id AND predict('s', [t.a]) > 0")
    calls, select, _ = plans.analyse(tree)
    sql = plans.lookup_rewrite(tree, calls, "res").sql("duckdb")
    assert "LEFT JOIN" not in sql and "(SELECT __d.r0 FROM res AS __d" in sql
    tree = predict_calls.parse_one("SELECT * FROM t WHERE predict('s', [t.a]) > 0")
    calls, select, _ = plans.analyse(tree)
    sql = plans.lookup_rewrite(tree, calls, "res").sql("duckdb")
    assert "LEFT JOIN" in sql and "EXCLUDE" in sql


def test_relation_working_set_over_the_limit_is_infeasible_and_explained():
    kw = dict(function="predict", rows=1e4, distinct=1e4, rows_needed=None, flops_per_row=2e6, relation_ok=True)
    kw.update(weight_bytes=3e7, activation_bytes_per_row=5e4, relation_bytes=5e7)
    est = {e.family: e for e in estimate(Workload(**kw, memory_limit=4e7))}
    assert not est["relation"].feasible and "over the memory limit" in est["relation"].note
    assert est["relation"].details["working_set_bytes"] == 5e7
    assert estimate(Workload(**kw, memory_limit=6e7))[-1].feasible


def test_explain_shows_working_sets_inputs_and_infeasible_plans(tmp_path):
    random_tabular(tmp_path / "m", "mlp", 4, hidden=[1024, 1024], n_outputs=1, seed=7)
    con = reldl.connect()
    _table(con, "t", 20_000)
    con.execute(f"CREATE MODEL wide OPTIONS (model_type = 'mlp', path = '{tmp_path / 'm'}')")
    con.execute("SET memory_limit = '32MiB'")
    lines = [r[0] for r in con.execute("EXPLAIN SELECT id, predict('wide', a, b, c, d) FROM t").fetchall()]
    text = "\n".join(lines)
    assert lines[0] == "reldl plan: relation-centric", text
    assert "inputs: ~20000 rows" in text and "distinct inputs" in text
    assert "DL-centric        estimated infeasible (working set" in text
    assert "UDF-centric       estimated infeasible" in text
    assert (
        "relation-centric  estimated" in text
        and "working set" in lines[[i for i, x in enumerate(lines) if "* relation" in x][0]]
    )
    con.close()


def test_distinct_estimate():
    con = reldl.connect()
    _table(con, "uniq", 50_000)
    _table(con, "dup", 50_000, dup=37)
    _table(con, "few", 600, dup=30)
    cur = con.cursor()
    out = {}
    for name in ("uniq", "dup", "few"):
        tree = predict_calls.parse_one(f"SELECT predict('m', [a, b, c, d]) FROM {name}")
        calls, select, _ = plans.analyse(tree)
        q = plans.inputs_query(select, calls)
        rows = planning._estimated_rows(cur.duckdb_cursor, q)
        out[name] = planning.estimate_distinct(cur.duckdb_cursor, q, rows)
    assert out["uniq"][0] >= 45_000
    assert out["dup"][0] == 37
    assert out["few"] == (30.0, "exact: 30 of 600 rows")
    con.close()


def test_llm_duplicates_lower_the_dl_estimate():
    kw = dict(function="llm_generate", rows=600, rows_needed=None, max_tokens=24)
    dup = {e.family: e.seconds for e in estimate(Workload(**kw, distinct=30))}
    uniq = {e.family: e.seconds for e in estimate(Workload(**kw, distinct=600))}
    assert dup["dl"] < uniq["dl"] / 5


def test_dl_out_of_memory_is_one_line(tmp_path):
    """torch's allocation failure in a DL plan becomes an OperationalError naming the model, need and limit."""
    script = textwrap.dedent(
        f"""
        import resource
        import reldl
        from reldl.tabular import random_tabular
        random_tabular({str(tmp_path / "m")!r}, "mlp", 4, hidden=[1024, 1024], n_outputs=1, seed=7)
        con = reldl.connect()
        con.execute("CREATE TABLE t AS SELECT i AS id, random() a, random() b, random() c, random() d "
                    "FROM range(20000) t(i)")
        con.execute("CREATE MODEL big OPTIONS (model_type = 'mlp', path = '{tmp_path / "m"}')")
        con.execute("SET reldl_plan = 'dl'")
        con.execute("SET memory_limit = '64MiB'")
        con.execute("SELECT predict('big', a, b, c, d) FROM t LIMIT 5").fetchall()  # loads the model
        vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmData"))
        resource.setrlimit(resource.RLIMIT_DATA, (vm + 100 * 2**20, resource.getrlimit(resource.RLIMIT_DATA)[1]))
        try:
            con.execute("SELECT id, predict('big', a, b, c, d) FROM t").fetchall()
            print("NO ERROR")
        except Exception as e:
            print(type(e).__name__ + "|" + str(e))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    last = out.stdout.strip().splitlines()[-1]
    kind, _, msg = last.partition("|")
    assert kind == "OperationalError", out.stdout + out.stderr
    assert "\n" not in msg and "'big'" in msg and "memory_limit 64 MiB" in msg and "MiB estimated" in msg
    assert "SET reldl_plan = 'relation'" in msg


def test_store_matrices_and_per_layer_tiles_match_the_reference(tmp_path):
    import duckdb

    rng = np.random.default_rng(5)
    layers = [
        (rng.standard_normal((6, 3)), rng.standard_normal(6), "tanh"),
        (rng.standard_normal((2, 6)), rng.standard_normal(2), "identity"),
    ]
    x = rng.standard_normal((40, 3))
    ref = np.tanh(x @ layers[0][0].T + layers[0][1]) @ layers[1][0].T + layers[1][1]
    con = duckdb.connect()
    con.execute("CREATE TABLE inp AS SELECT unnest(range(40)) AS rid")
    con.execute("CREATE TABLE xs (rid INTEGER, x DOUBLE[])")
    con.executemany("INSERT INTO xs VALUES (?, ?)", [(i, list(r)) for i, r in enumerate(x)])
    for tiles in ([None, None], [2, None], [None, 4], [1, 2]):
        R.store_weights(con, "w", layers, tiles, only=[i for i, t in enumerate(tiles) if t])
        R.store_matrices(con, "m", layers, only=[i for i, t in enumerate(tiles) if t is None])
        q = R.forward_query("w", "xs", layers, tiles, matrices="m").sql("duckdb")
        got = dict(con.execute(q).fetchall())
        np.testing.assert_allclose(np.array([got[i] for i in range(40)]), ref, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="widths given"):
        R.forward_query("w", "xs", layers, [None], matrices="m")
    con.close()
