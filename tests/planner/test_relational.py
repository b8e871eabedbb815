"""The relation-centric MLP forward pass (planner/relational.py) against a float64 torch reference."""

from __future__ import annotations

import math

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import sqlglot
import torch
import torch.nn.functional as F
from sqlglot import exp

from reldl.planner import relational as R
from reldl.spill import SpillWatcher

TORCH_ACT = {
    "identity": lambda v: v,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,  # the exact (erf) form, torch's default
}


def make_mlp(dims: list[int], acts: list[str], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, str]]:
    g = torch.Generator().manual_seed(seed)
    layers = []
    for (n_in, n_out), act in zip(zip(dims[:-1], dims[1:]), acts):
        w = torch.randn(n_out, n_in, generator=g, dtype=torch.float64) / math.sqrt(n_in) * 1.5
        b = torch.randn(n_out, generator=g, dtype=torch.float64) * 0.5
        layers.append((w, b, act))
    return layers


def reference(layers, x: np.ndarray) -> np.ndarray:
    h = torch.from_numpy(x)
    for w, b, act in layers:
        h = TORCH_ACT[act](F.linear(h, w, b))
    return h.numpy()


def inputs(con, name: str, x: np.ndarray, rid: np.ndarray | None = None) -> None:
    n, d = x.shape
    rid = np.arange(n) if rid is None else rid
    offsets = pa.array(np.arange(0, n * d + 1, d, dtype=np.int32))
    con.register("__arrow_in", pa.table({"rid": rid, "x": pa.ListArray.from_arrays(offsets, pa.array(x.ravel()))}))
    con.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM __arrow_in")
    con.unregister("__arrow_in")


def run(con, query: exp.Select) -> dict:
    """{rid: value} of a (rid, value) query."""
    return dict(con.execute(query.sql("duckdb")).fetchall())


def as_matrix(out: dict, n: int) -> np.ndarray:
    assert sorted(out) == list(range(n))
    return np.array([out[i] for i in range(n)], dtype=np.float64)


# widths 7, 33, 130 are not multiples of 16; every activation appears in a hidden and an output position
MODELS = [
    ([7, 3], ["identity"]),
    ([7, 33], ["gelu"]),
    ([33, 64, 7], ["relu", "sigmoid"]),
    ([130, 64, 33, 3], ["tanh", "gelu", "identity"]),
    ([7, 130, 33, 2], ["sigmoid", "relu", "tanh"]),
    ([64, 33, 1], ["gelu", "relu"]),
]


@pytest.fixture
def con():
    c = duckdb.connect()
    yield c
    c.close()


@pytest.mark.parametrize("tile", [1, 16, None])
@pytest.mark.parametrize("model", range(len(MODELS)))
def test_forward_matches_torch(con, model, tile):
    dims, acts = MODELS[model]
    layers = make_mlp(dims, acts, seed=model)
    x = np.random.default_rng(model).standard_normal((41, dims[0])) * 2
    R.store_weights(con, "reldl.w_test", layers, tile=tile)
    inputs(con, "inp", x)
    y = as_matrix(run(con, R.forward_query("reldl.w_test", "inp", layers, tile)), len(x))
    ref = reference(layers, x)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-9, atol=1e-12)


def test_spill_safe_off_gives_the_same(con):
    layers = make_mlp([33, 64, 7], ["gelu", "identity"], seed=3)
    x = np.random.default_rng(3).standard_normal((50, 33))
    R.store_weights(con, "w", layers, tile=16)
    inputs(con, "inp", x)
    a = as_matrix(run(con, R.forward_query("w", "inp", layers, 16)), 50)
    b = as_matrix(run(con, R.forward_query("w", "inp", layers, 16, spill_safe=False)), 50)
    np.testing.assert_array_equal(a, b)
    ordered = "ARRAY_AGG(v ORDER BY j) AS x"  # identity: the value itself
    assert ordered in R.forward_query("w", "inp", layers, 16, spill_safe=False).sql("duckdb")
    assert ordered not in R.forward_query("w", "inp", layers, 16).sql("duckdb")


def test_erf_and_gelu(con):
    z = np.concatenate([np.linspace(-8, 8, 4001), [0.0, -0.0, 1e-300, 0.5, 1.0, 2.0, 6.0, -6.0, 40.0, -1e10]])
    inputs(con, "v", z[:, None])
    first = sqlglot.parse_one("x[1]", read="duckdb")

    def values(e: exp.Expression) -> np.ndarray:
        rows = con.execute(exp.select(e).from_("v").order_by("rid").sql("duckdb")).fetchall()
        return np.array([r[0] for r in rows])

    assert np.max(np.abs(values(R.erf_sql(first)) - np.array([math.erf(t) for t in z]))) < 1e-14
    g = values(R.activation_sql("gelu", first))
    # both sides compute v * 0.5 * (1 + erf(.)): the erf's last-bit errors, times |v|, are what may differ
    assert np.all(np.abs(g - F.gelu(torch.from_numpy(z)).numpy()) <= 5e-15 * (1 + np.abs(z)))
    # the tanh approximation would not have done
    assert np.max(np.abs(F.gelu(torch.from_numpy(z), approximate="tanh").numpy() - g)) > 1e-5


@pytest.mark.parametrize("tile", [16, None])
def test_predict_and_proba(con, tile):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((60, 33)) * 2
    inputs(con, "inp", x)
    for task, out in [("regression", 1), ("binary", 1), ("multiclass", 5)]:
        layers = make_mlp([33, 64, out], ["relu", "identity"], seed=out)
        R.store_weights(con, "m.w", layers, tile=tile)
        logits = torch.from_numpy(reference(layers, x))
        pred = as_matrix(run(con, R.predict_query("m.w", "inp", layers, task, tile)), 60)
        if task == "regression":
            np.testing.assert_allclose(pred, logits[:, 0].numpy(), rtol=1e-9, atol=1e-12)
            raw = as_matrix(run(con, R.proba_query("m.w", "inp", layers, task, tile)), 60)  # the UDF's raw outputs
            np.testing.assert_allclose(raw, logits.numpy(), rtol=1e-9, atol=1e-12)
            continue
        proba = as_matrix(run(con, R.proba_query("m.w", "inp", layers, task, tile)), 60)
        if task == "binary":
            p = torch.sigmoid(logits[:, 0]).numpy()
            np.testing.assert_allclose(pred, p, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(proba, np.stack([1 - p, p], axis=1), rtol=1e-9, atol=1e-12)
        else:
            assert pred.dtype == np.float64
            np.testing.assert_array_equal(pred, logits.argmax(dim=1).double().numpy())
            np.testing.assert_allclose(proba, torch.softmax(logits, dim=1).numpy(), rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    with pytest.raises(ValueError, match="unknown task"):
        R.predict_query("m.w", "inp", layers, "ranking", tile)


def test_multiclass_argmax_takes_the_first_maximum(con):
    # identity weights: y = x, so ties are exact
    layers = [(np.eye(4), np.zeros(4), "identity")]
    R.store_weights(con, "w", layers, tile=None)
    con.execute(
        "CREATE TABLE t AS SELECT * FROM (VALUES (0, [1.0, 3.0, 3.0, 0.0]), (1, [-1.0, -1.0, -2.0, -3.0])) v(rid, x)"
    )
    assert run(con, R.predict_query("w", "t", layers, "multiclass", None)) == {0: 1.0, 1: 0.0}


@pytest.mark.parametrize("tile", [1, 16, None])
def test_null_and_empty_inputs(con, tile):
    layers = make_mlp([7, 33, 3], ["tanh", "identity"], seed=1)
    R.store_weights(con, "w", layers, tile=tile)
    x = np.random.default_rng(1).standard_normal((3, 7))
    con.execute("CREATE TABLE t (rid INTEGER, x DOUBLE[])")
    con.executemany("INSERT INTO t VALUES (?, ?)", [(i, list(r)) for i, r in enumerate(x)])
    con.execute("INSERT INTO t VALUES (10, NULL), (11, [1.0, NULL, 2.0, 3.0, 4.0, 5.0, 6.0])")
    ref = reference(layers, x)
    out = run(con, R.forward_query("w", "t", layers, tile))
    assert sorted(out) == [0, 1, 2, 10, 11]
    assert out[10] is None and out[11] is None
    np.testing.assert_allclose(np.array([out[i] for i in range(3)]), ref, rtol=1e-9, atol=1e-12)
    for task in ("binary", "multiclass"):
        for q in (R.predict_query, R.proba_query):
            res = run(con, q("w", "t", layers, task, tile))
            assert sorted(res) == [0, 1, 2, 10, 11] and res[10] is None and res[11] is None
    res = run(con, R.predict_query("w", "t", layers, "regression", tile))
    assert res[10] is None
    # an empty relation, and one of only NULLs
    con.execute("CREATE TABLE e (rid INTEGER, x DOUBLE[])")
    assert run(con, R.forward_query("w", "e", layers, tile)) == {}
    assert run(con, R.proba_query("w", "e", layers, "multiclass", tile)) == {}
    con.execute("INSERT INTO e VALUES (5, NULL)")
    assert run(con, R.predict_query("w", "e", layers, "binary", tile)) == {5: None}


def test_wrong_length_is_an_error(con):
    layers = make_mlp([7, 3], ["relu"])
    R.store_weights(con, "w", layers, tile=4)
    con.execute("CREATE TABLE t AS SELECT 1 AS rid, [1.0, 2.0, 3.0] AS x")
    with pytest.raises(duckdb.Error, match="takes 7 features"):
        run(con, R.forward_query("w", "t", layers, 4))


def test_sources_names_and_types(con):
    layers = make_mlp([7, 33, 2], ["relu", "identity"], seed=5)
    R.store_weights(con, '"odd schema"."w-1; DROP TABLE x"', layers, tile=16)
    assert con.execute('SELECT count(*) FROM "odd schema"."w-1; DROP TABLE x"').fetchone()[0] == 33 + 2 * 3
    x = np.arange(14, dtype=np.float32).reshape(2, 7) / 7
    ref = reference(layers, x.astype(np.float64))
    # a FLOAT[7] array column under other names, a string id
    con.execute("CREATE TABLE f (id VARCHAR, feats FLOAT[7])")
    con.executemany("INSERT INTO f VALUES (?, ?)", [(f"r{i}", list(map(float, r))) for i, r in enumerate(x)])
    table = '"odd schema"."w-1; DROP TABLE x"'
    out = run(con, R.forward_query(table, "f", layers, 16, rid="id", x="feats"))
    np.testing.assert_allclose(np.array([out["r0"], out["r1"]]), ref, rtol=1e-9, atol=1e-12)
    # SQL text, a sqlglot tree, integer vectors
    text = "SELECT rid, [1, 2, 3, 4, 5, 6, 7] AS x FROM range(3) r(rid)"
    ref = reference(layers, np.arange(1, 8, dtype=np.float64)[None, :])[0]
    for src in (text, exp.select("rid", "[1, 2, 3, 4, 5, 6, 7] AS x").from_("range(3) r(rid)")):
        out = run(con, R.forward_query(table, src, layers, 16))
        assert sorted(out) == [0, 1, 2]
        np.testing.assert_allclose(out[2], ref, rtol=1e-9, atol=1e-12)
    # the (in, out, activation) shapes work as well as the weights themselves
    shapes = [(7, 33, "relu"), (33, 2, "identity")]
    assert R.forward_query(table, "f", shapes, 16).sql() == R.forward_query(table, "f", layers, 16).sql()


def test_temporary_weight_table(con):
    layers = make_mlp([7, 33, 1], ["relu", "identity"], seed=4)
    R.store_weights(con, "temp.main.w_tmp", layers, tile=16)
    assert con.execute("SELECT temporary FROM duckdb_tables() WHERE table_name = 'w_tmp'").fetchall() == [(True,)]
    x = np.random.default_rng(4).standard_normal((5, 7))
    inputs(con, "inp", x)
    y = as_matrix(run(con, R.forward_query("temp.main.w_tmp", "inp", layers, 16)), 5)
    np.testing.assert_allclose(y, reference(layers, x), rtol=1e-9, atol=1e-12)
    assert R.weights_layout(con, "temp.main.w_tmp") == ([(7, 33), (33, 1)], 16)


def test_store_weights_layout(con):
    layers = make_mlp([130, 33, 3], ["relu", "identity"], seed=2)
    for tile, blocks in [(1, (130, 33)), (16, (9, 3)), (64, (3, 1)), (None, (1, 1)), (500, (1, 1))]:
        R.store_weights(con, "s.w", layers, tile=tile)
        rows = con.execute("SELECT layer, j, in_block, w, b FROM s.w").fetchall()
        assert len(rows) == 33 * blocks[0] + 3 * blocks[1]
        assert con.execute("SELECT typeof(w), typeof(b), typeof(layer) FROM s.w LIMIT 1").fetchone() == (
            "DOUBLE[]",
            "DOUBLE",
            "INTEGER",
        )
        for k, (w, b, _) in enumerate(layers):
            got = sorted((r for r in rows if r[0] == k), key=lambda r: (r[1], r[2]))
            for j in range(w.shape[0]):
                mine = [r for r in got if r[1] == j]
                np.testing.assert_array_equal(np.concatenate([r[3] for r in mine]), w[j].numpy())
                assert [r[4] for r in mine] == [b[j].item()] + [0.0] * (len(mine) - 1)
        dims, t = R.weights_layout(con, "s.w")
        assert dims == [(130, 33), (33, 3)]
        assert t == (130 if tile in (None, 500) else tile)


def test_bad_arguments(con):
    layers = make_mlp([7, 3], ["relu"])
    with pytest.raises(ValueError, match="unknown activation"):
        R.store_weights(con, "w", [(layers[0][0], layers[0][1], "swish")])
    with pytest.raises(ValueError, match="takes 5 inputs"):
        R.store_weights(con, "w", [layers[0], (np.ones((2, 5)), np.ones(2), "relu")])
    with pytest.raises(ValueError, match="tile"):
        R.store_weights(con, "w", layers, tile=0)
    with pytest.raises(ValueError, match="NaN"):
        R.store_weights(con, "w", [(np.full((3, 7), np.nan), np.zeros(3), "relu")])
    with pytest.raises(ValueError, match="at least one layer"):
        R.forward_query("w", "t", [], 4)
    with pytest.raises(ValueError, match="takes 4 inputs"):
        R.forward_query("w", "t", [(7, 3, "relu"), (4, 2, "relu")], 4)


def test_generated_sql_is_one_select_of_ctes(con):
    q = R.forward_query("reldl.w_m", "t", [(7, 33, "relu"), (33, 2, "identity")], 16)
    assert isinstance(q, exp.Select)
    names = [c.alias for c in q.args[R._WITH].expressions]
    assert names == ["__l0", "__l1", "__t1", "__p1", "__l2"]  # layer 0 fits a tile: one CTE, no join


# ---------------------------------------------------------------------------------------------------------------------
# spilling


def torch_working_set(layers, n_rows: int) -> int:
    """Bytes torch holds for a float64 forward: weights, the input and every layer's output."""
    params = sum(w.numel() + b.numel() for w, b, _ in layers)
    acts = n_rows * (layers[0][0].shape[1] + sum(w.shape[0] for w, _, _ in layers))
    return 8 * (params + acts)


@pytest.mark.parametrize(
    "dims, rows, tile, limit_mib, torch_over, must_spill",
    [
        # whole rows stream: each layer is a projection over chunks of rows, so the activations (48 MiB in torch)
        # never exist at once and a 16 MiB limit is enough without spilling
        ([16, 512, 1], 12_000, None, 16, True, False),
        # the weights (64 MiB; torch needs 69 MiB) exceed the limit: the weight table and the join spill
        ([2048, 4096, 1], 100, 512, 64, True, True),
        # tiled layers: torch would fit, but DuckDB's own working set, the per-(row, unit) partial sums
        # (10000 x 512 x 2 blocks), is aggregated out of core
        ([16, 512, 1], 10_000, 8, 64, False, True),
    ],
)
def test_under_memory_limit(tmp_path, dims, rows, tile, limit_mib, torch_over, must_spill):
    layers = make_mlp(dims, ["relu", "identity"], seed=11)
    assert (torch_working_set(layers, rows) > limit_mib * 2**20) == torch_over
    spill = tmp_path / "spill"
    con = duckdb.connect(config={"memory_limit": f"{limit_mib}MiB", "temp_directory": str(spill), "threads": 2})
    try:
        R.store_weights(con, "reldl.w_big", layers, tile=tile)
        x = np.random.default_rng(11).standard_normal((rows, dims[0]))
        inputs(con, "inp", x)
        query = R.forward_query("reldl.w_big", "inp", layers, tile).sql("duckdb")
        with SpillWatcher(spill) as watch:
            out = dict(con.execute(f"SELECT rid, y[1] FROM ({query})").fetchall())
    finally:
        con.close()
    if must_spill:
        assert watch.peak > 32 * 2**20, f"DuckDB spilled only {watch.peak} bytes"
    y = np.array([out[i] for i in range(rows)])
    np.testing.assert_allclose(y, reference(layers, x)[:, 0], rtol=1e-9, atol=1e-12)
