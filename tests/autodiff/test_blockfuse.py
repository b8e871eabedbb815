"""Block fusion (reldl.autodiff.blockfuse): the fused step computes the same loss and gradients as the relational
program it replaces (float64, 1e-12), on fresh random data, across DuckDB chunk boundaries and short last blocks; it
declines graphs it cannot compute in one pass; training with it matches PyTorch."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import sqlglot
import torch

from reldl import autodiff as ad
from reldl.autodiff import blockfuse, train
from reldl.autodiff.grad import backward
from reldl.autodiff.train import Batches, TrainingError, minimize

TOL = 1e-12


def put(con, name: str, cols: dict) -> None:
    con.register("__t", pa.table(cols))
    con.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM __t")
    con.unregister("__t")


def data(con, rng, rows: int, block: int, feats: int, label_cols: int | None = None, classes: int = 3):
    """Row-block tiles of x (block, feats) and y (block,) or (block, label_cols); the last block may be short."""
    x = rng.normal(size=(rows, feats))
    y = rng.integers(0, classes, rows).astype(float) if label_cols is None else rng.normal(size=(rows, label_cols))
    nb = -(-rows // block)
    put(
        con,
        "data",
        {
            "rb": np.arange(nb),
            "x": [x[i * block : (i + 1) * block].ravel().tolist() for i in range(nb)],
            "y": [y[i * block : (i + 1) * block].ravel().tolist() for i in range(nb)],
            "w": rng.uniform(0.5, 2.0, nb),  # a per-block scalar weight
        },
    )
    return x, y


def param(con, name, arr):
    put(con, name, {"v": [float(arr)] if np.ndim(arr) == 0 else [np.ravel(arr).tolist()]})
    return ad.param(name, shape=np.shape(arr))


def n_rows(src="data"):
    return ad.sum(ad.table(src, keys=["rb"], value=sqlglot.parse_one("len(y)"), name="rows"))


def mlp(con, rng, block, feats, act="relu", src="data"):
    w1 = param(con, "w1", rng.normal(size=(feats, 5)) * 0.4)
    b1 = param(con, "b1", rng.normal(size=5) * 0.1)
    w2 = param(con, "w2", rng.normal(size=(5, 3)) * 0.4)
    b2 = param(con, "b2", rng.normal(size=3) * 0.1)
    x = ad.table(src, keys=["rb"], shape=(block, feats), value="x")
    y = ad.table(src, keys=["rb"], shape=(block,), value="y")
    h = ad.apply(act, ad.linear(x, w1, b1))
    per_row = ad.apply("softmax_xent", ad.linear(h, w2, b2), y)
    return ad.apply("div", ad.sum(ad.apply("tile_sum", per_row)), n_rows(src))


def scaled_tanh_mlp(con, rng, block, feats):
    """matmul + bias_add + tanh, a keyless scalar parameter multiplying the logits, a per-block scalar weight."""
    w1 = param(con, "w1", rng.normal(size=(feats, 4)) * 0.4)
    b1 = param(con, "b1", rng.normal(size=4) * 0.1)
    w2 = param(con, "w2", rng.normal(size=(4, 3)) * 0.4)
    s = param(con, "s", np.array(1.3))
    x = ad.table("data", keys=["rb"], shape=(block, feats), value="x")
    y = ad.table("data", keys=["rb"], shape=(block,), value="y")
    wb = ad.table("data", keys=["rb"], value="w")
    h = ad.apply("tanh", ad.apply("bias_add", ad.matmul(x, w1), b1))
    logits = ad.apply("mul", ad.matmul(h, w2), s)
    per_block = ad.apply("mul", ad.apply("tile_sum", ad.apply("softmax_xent", logits, y)), wb)
    return ad.apply("div", ad.sum(per_block), n_rows())


def regression(con, rng, block, feats, loss="squared_error"):
    w = param(con, "w", rng.normal(size=(feats, 1)) * 0.5)
    b = param(con, "b", rng.normal(size=1) * 0.1)
    x = ad.table("data", keys=["rb"], shape=(block, feats), value="x")
    y = ad.table("data", keys=["rb"], shape=(block, 1), value="y")
    per_row = ad.apply(loss, ad.linear(x, w, b), y)
    return ad.apply("div", ad.sum(ad.apply("tile_sum", per_row)), n_rows())


def run(con, prog, prefix):
    t = prog.materialize(con, prefix)
    loss = con.execute(f"SELECT v FROM {t[f'f{prog.loss.id}']}").fetchall()[0][0]
    grads = {}
    for s in prog.wrt:
        v = con.execute(f"SELECT v FROM {t[prog.grads[s.id]]}").fetchall()[0][0]
        grads[s.label()] = np.asarray(v, dtype=np.float64)
    return loss, grads


def compare(con, loss_node, n_inputs):
    prog = backward(loss_node)
    fused, bp = blockfuse.fuse_blocks(prog)
    assert bp is not None and bp.arity == n_inputs
    ad.install(con)
    blockfuse.resolve_types(con, bp)
    blockfuse.install(con, bp)
    ref_loss, ref = run(con, prog, "u")
    got_loss, got = run(con, fused, "z")
    assert abs(got_loss - ref_loss) <= TOL * max(1.0, abs(ref_loss))
    for k in ref:
        scale = max(1.0, np.abs(ref[k]).max())
        assert np.abs(got[k] - ref[k]).max() <= TOL * scale, k

    # the fused program reads the data tiles in one statement: no other step scans x
    def readers_of_x(p):
        views = {s.name for s in p.steps if p.is_view(s.name)}
        out = []
        for s in p.steps:
            tree = s.build(lambda n: sqlglot.exp.Table(this=sqlglot.exp.to_identifier(n)))
            reads = {t.name for t in tree.find_all(sqlglot.exp.Table)}
            if any(c.name == "x" for c in tree.find_all(sqlglot.exp.Column)) or (reads & views & xviews):
                out.append(s.name)
        return out

    xviews = {f"f{n.id}" for n in bp.inputs if n.keys and n.value == "x"}
    assert readers_of_x(fused) == [f"b{prog.loss.id}"]  # one statement reads x, once
    assert len(readers_of_x(prog)) > 1
    return fused


@pytest.mark.parametrize(
    "rows,block,threads",
    [
        (50, 8, 1),  # short last block
        (5000, 2, 1),  # 2,500 blocks: DuckDB calls the UDF over several chunks of rows
        (5000, 2, 2),  # ... from two threads
    ],
)
@pytest.mark.parametrize("act", ["relu", "tanh", "sigmoid"])
def test_fused_mlp_equals_relational_program(rows, block, threads, act):
    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    rng = np.random.default_rng(rows + block + len(act))
    data(con, rng, rows, block, feats=4)
    compare(con, mlp(con, rng, block, 4, act), n_inputs=7)


@pytest.mark.parametrize("sub_rows", [1, 13])
def test_groups_of_blocks_add_up(monkeypatch, sub_rows):
    """The UDF computes a chunk's blocks a few at a time (SUB_ROWS rows): one block per group, or groups that end
    at the short last block, give the same loss and gradients."""
    monkeypatch.setattr(blockfuse, "SUB_ROWS", sub_rows)
    con = duckdb.connect()
    rng = np.random.default_rng(sub_rows)
    data(con, rng, 47, 6, feats=3)
    compare(con, scaled_tanh_mlp(con, rng, 6, 3), n_inputs=8)


def test_fused_matmul_bias_scale_and_per_block_weight():
    con = duckdb.connect()
    rng = np.random.default_rng(3)
    data(con, rng, 37, 5, feats=3)
    compare(con, scaled_tanh_mlp(con, rng, 5, 3), n_inputs=8)  # x, y, w (per block), w1, b1, w2, s; the SUM's gradient


@pytest.mark.parametrize("loss", ["squared_error", "bce_logits"])
def test_fused_regression_losses(loss):
    con = duckdb.connect()
    rng = np.random.default_rng(11)
    x, y = data(con, rng, 41, 6, feats=3, label_cols=1)
    if loss == "bce_logits":
        con.execute("UPDATE data SET y = list_transform(y, lambda e: CASE WHEN e > 0 THEN 1.0 ELSE 0.0 END)")
    compare(con, regression(con, rng, 6, 3, loss), n_inputs=5)


def test_declines_what_one_pass_cannot_compute():
    con = duckdb.connect()
    rng = np.random.default_rng(5)
    data(con, rng, 20, 4, feats=3)
    # the loss is not linear in the block SUM: its gradient needs the SUM's value first
    w1 = param(con, "w1", rng.normal(size=(3, 5)))
    b1 = param(con, "b1", rng.normal(size=5))
    w2 = param(con, "w2", rng.normal(size=(5, 3)))
    b2 = param(con, "b2", rng.normal(size=3))
    x = ad.table("data", keys=["rb"], shape=(4, 3), value="x")
    y = ad.table("data", keys=["rb"], shape=(4,), value="y")
    total = ad.sum(ad.apply("tile_sum", ad.apply("softmax_xent", ad.linear(ad.linear(x, w1, b1), w2, b2), y)))
    assert blockfuse.plan(backward(ad.apply("log", total))) is None
    # a parameter also read outside the block-local part (an L2 penalty)
    penalty = ad.sum(ad.apply("tile_sum", ad.apply("square", w1)))
    assert blockfuse.plan(backward(ad.apply("add", ad.apply("div", total, n_rows()), penalty))) is None
    # a keyed parameter (an embedding per key) joins on another key: not block-local
    put(con, "emb", {"k": np.arange(4), "v": rng.normal(size=4)})
    put(con, "obs", {"rb": [0, 0, 1, 1], "k": [0, 1, 2, 3], "t": rng.normal(size=4)})
    e = ad.param("emb", keys=["k"])
    t = ad.table("obs", keys=["rb", "k"], value="t")
    assert blockfuse.plan(backward(ad.sum(ad.apply("squared_error", e, t)))) is None
    # the linear loss fuses
    assert blockfuse.plan(backward(ad.apply("div", total, n_rows()))) is not None


def test_minimize_fused_matches_unfused_and_torch():
    """Adam over mini-batches: the fused and the unfused step give the same parameters, and PyTorch's."""
    rows, block, feats = 60, 6, 4
    results = {}
    for fuse in (True, False):
        con = duckdb.connect()
        rng = np.random.default_rng(21)
        x, y = data(con, rng, rows, block, feats)
        loss = mlp(con, rng, block, feats, "relu", src="batch")
        init = {k: np.asarray(con.execute(f"SELECT v FROM {k}").fetchall()[0][0]) for k in ("w1", "b1", "w2", "b2")}
        batches = Batches("batch", "data", "rb", size=3, shuffle=False)
        res = minimize(con, loss, optimizer="adam", learning_rate=0.05, epochs=2, batches=batches, fuse_blocks=fuse)
        results[fuse] = (res.step_losses, {k: read(con, k) for k in init})
    assert np.allclose(results[True][0], results[False][0], rtol=0, atol=1e-12)
    for k in init:
        assert np.abs(results[True][1][k] - results[False][1][k]).max() < 1e-12, k
    steps = [slice(s, s + 3 * block) for _ in range(2) for s in range(0, rows, 3 * block)]
    assert_trains_like_torch(results[True], init, feats, x, y, steps, lambda ps: torch.optim.Adam(ps, lr=0.05))


def assert_trains_like_torch(result, init, feats, x, y, steps, make_opt):
    """``result`` (step losses, final parameters) equals PyTorch's 2-layer relu MLP trained from ``init`` on the row
    slices ``steps`` (1e-10)."""
    shapes = {"w1": (feats, 5), "b1": (5,), "w2": (5, 3), "b2": (3,)}
    tp = {k: torch.tensor(v.reshape(shapes[k]), requires_grad=True) for k, v in init.items()}
    opt = make_opt(list(tp.values()))
    xt, yt = torch.tensor(x), torch.tensor(y).long()
    losses = []
    for sl in steps:
        z = torch.relu(xt[sl] @ tp["w1"] + tp["b1"]) @ tp["w2"] + tp["b2"]
        loss_t = torch.nn.functional.cross_entropy(z, yt[sl])
        opt.zero_grad()
        loss_t.backward()
        opt.step()
        losses.append(loss_t.item())
    assert np.abs(np.array(result[0]) - losses).max() < 1e-10
    for k, t in tp.items():
        assert np.abs(result[1][k] - t.detach().numpy().ravel()).max() < 1e-10, k


def read(con, name):
    return np.asarray(con.execute(f"SELECT v FROM {name}").fetchall()[0][0], dtype=np.float64)


def test_null_tile_is_a_one_line_error_and_changes_nothing():
    con = duckdb.connect()
    rng = np.random.default_rng(8)
    data(con, rng, 24, 4, feats=3)
    con.execute("UPDATE data SET x = NULL WHERE rb = 2")
    loss = mlp(con, rng, 4, 3)
    before = read(con, "w1")
    with pytest.raises(TrainingError, match="NULL tile") as err:
        minimize(con, loss, optimizer="sgd", learning_rate=0.1, epochs=1)
    assert "\n" not in str(err.value)
    assert np.array_equal(read(con, "w1"), before)


def row_table(con, rng, rows: int, rows_per_batch_key: int, feats: int, classes: int = 3):
    """One data row a tuple: x as a fixed-size DOUBLE[feats] array, y as DOUBLE[1], stored in row order; ``rb`` (a
    run of rows) is the batch key."""
    x = rng.normal(size=(rows, feats))
    y = rng.integers(0, classes, rows).astype(float)
    tab = pa.table(
        {
            "rb": np.arange(rows) // rows_per_batch_key,
            "r": np.arange(rows),
            "x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), feats),
            "y": pa.FixedSizeListArray.from_arrays(pa.array(y), 1),
        }
    )
    con.register("__t", tab)
    con.execute("CREATE OR REPLACE TABLE rows AS SELECT * FROM __t ORDER BY r")
    con.unregister("__t")
    return x, y


def row_mlp(con, rng, feats, src="batch"):
    w1 = param(con, "w1", rng.normal(size=(feats, 5)) * 0.4)
    b1 = param(con, "b1", rng.normal(size=5) * 0.1)
    w2 = param(con, "w2", rng.normal(size=(5, 3)) * 0.4)
    b2 = param(con, "b2", rng.normal(size=3) * 0.1)
    x = ad.table(src, keys=["r"], shape=(1, feats), value="x")
    y = ad.table(src, keys=["r"], shape=(1,), value="y")
    n = ad.sum(ad.table(src, keys=["r"], value=sqlglot.parse_one("len(y)"), name="rows"))
    per_row = ad.apply("softmax_xent", ad.linear(ad.apply("relu", ad.linear(x, w1, b1)), w2, b2), y)
    return ad.apply("div", ad.sum(ad.apply("tile_sum", per_row)), n)


def test_row_tiles_as_arrays_pass_natively_and_equal_the_relational_program():
    """One row a tuple (5,000 rows: several DuckDB chunks and UDF calls), x a DOUBLE[4] array passed to the UDF as it
    is (no list conversion); the parameters reach it through the stash step, never per row."""
    con = duckdb.connect()
    rng = np.random.default_rng(31)
    row_table(con, rng, 5000, 100, 4)
    loss = row_mlp(con, rng, 4, src="rows")
    prog = backward(loss)
    fused, bp = blockfuse.fuse_blocks(prog)
    assert bp is not None
    blockfuse.resolve_types(con, bp)
    assert sorted(bp.native.values()) == ["DOUBLE[1]", "DOUBLE[4]"]
    assert bp.step_function == "reldl_block_step_a4_a1"
    ad.install(con)
    blockfuse.install(con, bp)
    ref_loss, ref = run(con, prog, "u")
    got_loss, got = run(con, fused, "z")
    assert abs(got_loss - ref_loss) <= TOL * max(1.0, abs(ref_loss))
    for k in ref:
        assert np.abs(got[k] - ref[k]).max() <= TOL * max(1.0, np.abs(ref[k]).max()), k
    # the step's SQL passes no parameter tile: only the handle and the keyed columns
    packed = next(sql for step, _, sql in fused.statements("z") if step == f"b{prog.loss.id}")
    calls = [c for c in sqlglot.parse_one(packed).find_all(sqlglot.exp.Anonymous) if "block_step" in c.name.lower()]
    assert [(c.name.lower(), len(c.expressions)) for c in calls] == [("reldl_block_step_a4_a1", 3)]
    blockfuse.release(bp)
    with pytest.raises(duckdb.Error, match="nothing stashed"):
        con.execute(packed)


def test_contiguous_row_batches_train_like_torch():
    """Row tiles with contiguous batches (runs of batch keys selected with BETWEEN, runs shuffled): fused, relational
    and PyTorch give the same losses and parameters (SGD, 2 epochs)."""
    rows, per_key, feats, size = 600, 50, 4, 3  # 12 batch keys, batches of 3 keys (150 rows)
    results = {}
    for fuse in (True, False):
        con = duckdb.connect()
        rng = np.random.default_rng(5)
        x, y = row_table(con, rng, rows, per_key, feats)
        loss = row_mlp(con, rng, feats)
        init = {k: read(con, k) for k in ("w1", "b1", "w2", "b2")}
        batches = Batches("batch", "rows", "rb", size=size, shuffle=True, seed=3, contiguous=True)
        res = minimize(con, loss, optimizer="sgd", learning_rate=0.2, epochs=2, batches=batches, fuse_blocks=fuse)
        results[fuse] = (res.step_losses, {k: read(con, k) for k in init})
    assert np.abs(np.array(results[True][0]) - results[False][0]).max() < 1e-12
    runs = [b for epoch in (1, 2) for b in train.batch_order(rows // per_key // size, epoch, 3)]
    steps = [slice(b * size * per_key, (b + 1) * size * per_key) for b in runs]
    assert_trains_like_torch(results[True], init, feats, x, y, steps, lambda ps: torch.optim.SGD(ps, lr=0.2))


def test_one_fused_program_on_two_connections_keeps_their_parameters_apart():
    """The stash is per execution: a connection's step reads what its own stash statement filed, even when another
    connection runs the same fused program (other parameters) in between."""
    cons, refs = [], []
    for seed in (41, 42):
        con = duckdb.connect()
        rng = np.random.default_rng(seed)
        data(con, rng, 40, 4, feats=3)
        loss = mlp(con, rng, 4, 3)
        ad.install(con)
        refs.append(run(con, backward(loss), "u"))
        cons.append(con)
    fused, bp = blockfuse.fuse_blocks(backward(loss))  # table names only: the same program fits both connections
    for con in cons:
        blockfuse.resolve_types(con, bp)
        blockfuse.install(con, bp)
    statements = fused.statements("z")
    stash_at = next(i for i, (step, _, _) in enumerate(statements) if step.startswith("k"))
    for _, _, sql in statements[: stash_at + 1]:
        cons[0].execute(sql)
    run(cons[1], fused, "z")  # connection 1 stashes its own parameters meanwhile
    for _, _, sql in statements[stash_at + 1 :]:
        cons[0].execute(sql)
    got_loss = cons[0].execute(f"SELECT v FROM z_f{fused.loss.id}").fetchall()[0][0]
    assert abs(got_loss - refs[0][0]) <= TOL * max(1.0, abs(refs[0][0]))
    for s in fused.wrt:
        got = np.asarray(cons[0].execute(f"SELECT v FROM z_{fused.grads[s.id]}").fetchall()[0][0], dtype=np.float64)
        assert np.abs(got - refs[0][1][s.label()]).max() <= TOL * max(1.0, np.abs(refs[0][1][s.label()]).max())


def test_plans_release_their_stash_when_collected():
    import gc

    con = duckdb.connect()
    rng = np.random.default_rng(3)
    data(con, rng, 24, 4, feats=3)
    fused, bp = blockfuse.fuse_blocks(backward(mlp(con, rng, 4, 3)))
    ad.install(con)
    blockfuse.resolve_types(con, bp)
    blockfuse.install(con, bp)
    run(con, fused, "z")
    handle = bp.handle
    assert blockfuse._BY_HANDLE[handle]
    del fused, bp
    gc.collect()
    assert handle not in blockfuse._BY_HANDLE


def test_training_keeps_one_stash_at_most():
    """Each step's stash is released once the step has read it: the parameters are not kept once per step."""
    con = duckdb.connect()
    rng = np.random.default_rng(12)
    data(con, rng, 96, 4, feats=3)
    loss = mlp(con, rng, 4, 3, src="batch")
    sizes = []
    minimize(
        con,
        loss,
        optimizer="sgd",
        learning_rate=0.1,
        epochs=1,
        batches=Batches("batch", "data", "rb", size=2, shuffle=False),
        on_step=lambda *a: sizes.append(len(blockfuse._STASH)),
    )
    assert len(sizes) == 12 and max(sizes) == min(sizes)
