"""Every operator and kernel of the relational autodiff: gradients from the generated SQL against PyTorch autograd in
float64 (1e-10) and against finite differences, on fresh random inputs. SQL in, rows out."""

from __future__ import annotations

import itertools
import zlib

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import torch

from reldl import autodiff as ad
from reldl.autodiff.grad import backward
from reldl.autodiff.ir import AutodiffError

TOL = 1e-10


@pytest.fixture
def con():
    c = duckdb.connect()
    ad.install(c)
    yield c
    c.close()


def put_scalars(con, name: str, arr: np.ndarray, keys: tuple[str, ...]) -> None:
    """A scalar-tuple relation (keys..., v): one row per element of arr."""
    idx = list(itertools.product(*[range(n) for n in arr.shape]))
    cols = {k: pa.array([i[d] for i in idx], pa.int32()) for d, k in enumerate(keys)}
    cols["v"] = pa.array([float(arr[i]) for i in idx], pa.float64())
    con.register("__tmp", pa.table(cols))
    con.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM __tmp")
    con.unregister("__tmp")


def put_tiles(con, name: str, tiles: list[np.ndarray], key: str | None = "b") -> None:
    """A tile relation: one row per tile (flattened row-major), keyed by its index (or no key for one tile)."""
    cols = {"v": pa.array([t.ravel().tolist() for t in tiles], pa.list_(pa.float64()))}
    if key is not None:
        cols = {key: pa.array(range(len(tiles)), pa.int32()), **cols}
    con.register("__tmp", pa.table(cols))
    con.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM __tmp")
    con.unregister("__tmp")


def grads(con, loss, wrt=None) -> tuple[float, dict[str, np.ndarray]]:
    """(loss value, {param: gradient rows' values as an array in key order})."""
    prog = backward(loss, wrt)
    value = con.execute(prog.loss_query().sql("duckdb")).fetchall()[0][0]
    out = {}
    for p in prog.wrt:
        rows = con.execute(prog.gradient_query(p).sql("duckdb")).fetchall()
        vals = [r[-1] for r in rows]
        out[p.label()] = np.array(vals if p.shape == () else [np.array(v) for v in vals], dtype=np.float64)
    return value, out


def torch_grads(fn, **params: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    ts = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    loss = fn(**ts)
    loss.backward()
    return loss.item(), {k: t.grad.numpy() for k, t in ts.items()}


def close(a, b, tol=TOL):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(1.0, float(np.abs(b).max(initial=0.0)))
    assert np.abs(a - b).max(initial=0.0) <= tol * scale, np.abs(a - b).max()


UNARY = {
    "identity": lambda a: a,
    "neg": lambda a: -a,
    "exp": torch.exp,
    "log": torch.log,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "square": lambda a: a * a,
}
BINARY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "squared_error": lambda a, b: (a - b) ** 2,
    "bce_logits": lambda z, y: torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none"),
}


def _inputs(rng, name: str, shape):
    a = rng.normal(size=shape)
    if name == "log":
        a = np.abs(a) + 0.1
    return a


@pytest.mark.parametrize("name", sorted(UNARY))
@pytest.mark.parametrize("tiled", [False, True])
def test_unary_kernel(con, name, tiled):
    rng = np.random.default_rng(zlib.crc32(f"{name}{tiled}".encode()))
    a, r = _inputs(rng, name, (3, 4)), rng.normal(size=(3, 4))  # r weights the outputs: a non-uniform upstream grad
    if tiled:
        put_tiles(con, "a", list(a)), put_tiles(con, "r", list(r))
        x, w = ad.param("a", keys=["b"], shape=(4,)), ad.table("r", keys=["b"], shape=(4,))
        loss = ad.sum(ad.apply("tile_sum", ad.apply("mul", ad.apply(name, x), w)))
    else:
        put_scalars(con, "a", a, ("i", "j")), put_scalars(con, "r", r, ("i", "j"))
        x, w = ad.param("a", keys=["i", "j"]), ad.table("r", keys=["i", "j"])
        loss = ad.sum(ad.apply("mul", ad.apply(name, x), w))
    value, g = grads(con, loss)
    ref_value, ref = torch_grads(lambda a: (UNARY[name](a) * torch.tensor(r)).sum(), a=a)
    close(value, ref_value)
    close(g["a"].reshape(3, 4), ref["a"])


@pytest.mark.parametrize("name", sorted(BINARY))
@pytest.mark.parametrize("layout", ["scalars", "tiles", "tile_and_scalar"])
def test_binary_kernel(con, name, layout):
    rng = np.random.default_rng(zlib.crc32(f"{name}{layout}".encode()))
    a, b, r = rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    if name == "div":
        b = np.sign(b) * (np.abs(b) + 0.5)
    if name == "bce_logits":
        b = rng.uniform(size=(3, 4))
    if layout == "scalars":
        (
            put_scalars(con, "a", a, ("i", "j")),
            put_scalars(con, "bb", b, ("i", "j")),
            put_scalars(con, "r", r, ("i", "j")),
        )
        xa, xb, w = ad.param("a", keys=["i", "j"]), ad.param("bb", keys=["i", "j"]), ad.table("r", keys=["i", "j"])
        loss = ad.sum(ad.apply("mul", ad.apply(name, xa, xb), w))
        fn = lambda a, bb: (BINARY[name](a, bb) * torch.tensor(r)).sum()  # noqa: E731
    elif layout == "tiles":
        put_tiles(con, "a", list(a)), put_tiles(con, "bb", list(b)), put_tiles(con, "r", list(r))
        xa, xb = ad.param("a", keys=["b"], shape=(4,)), ad.param("bb", keys=["b"], shape=(4,))
        loss = ad.sum(
            ad.apply("tile_sum", ad.apply("mul", ad.apply(name, xa, xb), ad.table("r", keys=["b"], shape=(4,))))
        )
        fn = lambda a, bb: (BINARY[name](a, bb) * torch.tensor(r)).sum()  # noqa: E731
    else:  # one scalar per tile row, broadcast over the tile: its gradient sums over the tile
        b = b[:, :1].copy()
        put_tiles(con, "a", list(a)), put_scalars(con, "bb", b[:, 0], ("b",)), put_tiles(con, "r", list(r))
        xa, xb = ad.param("a", keys=["b"], shape=(4,)), ad.param("bb", keys=["b"])
        loss = ad.sum(
            ad.apply("tile_sum", ad.apply("mul", ad.apply(name, xa, xb), ad.table("r", keys=["b"], shape=(4,))))
        )
        fn = lambda a, bb: (BINARY[name](a, bb.expand(3, 4)) * torch.tensor(r)).sum()  # noqa: E731
    value, g = grads(con, loss)
    ref_value, ref = torch_grads(fn, a=a, bb=b)
    close(value, ref_value)
    close(g["a"].reshape(a.shape), ref["a"])
    close(g["bb"].reshape(b.shape), ref["bb"])


@pytest.mark.parametrize("rows", [16, 21])  # 21 rows in blocks of 8: the last row block is short
def test_matmul_bias_softmax_xent_on_row_blocks(con, rows):
    rng = np.random.default_rng(rows)
    m, d, h, c = 8, 6, 5, 3
    x, y = rng.normal(size=(rows, d)), rng.integers(0, c, size=rows).astype(np.float64)
    w1, b1, w2, b2 = rng.normal(size=(d, h)), rng.normal(size=h), rng.normal(size=(h, c)), rng.normal(size=c)
    blocks = range(-(-rows // m))
    put_tiles(con, "x", [x[i * m : (i + 1) * m] for i in blocks])
    put_tiles(con, "y", [y[i * m : (i + 1) * m] for i in blocks])
    for name, arr in dict(w1=w1, b1=b1, w2=w2, b2=b2).items():
        put_tiles(con, name, [arr], key=None)
    xs, ys = ad.table("x", keys=["b"], shape=(m, d)), ad.table("y", keys=["b"], shape=(m,))
    p = {n: ad.param(n, shape=s) for n, s in dict(w1=(d, h), b1=(h,), w2=(h, c), b2=(c,)).items()}
    hidden = ad.apply("tanh", ad.linear(xs, p["w1"], p["b1"]))  # the fused dense layer
    logits = ad.apply("bias_add", ad.matmul(hidden, p["w2"]), p["b2"])
    loss = ad.sum(ad.apply("tile_sum", ad.apply("softmax_xent", logits, ys)))
    value, g = grads(con, loss)

    def fn(w1, b1, w2, b2):
        z = torch.tanh(torch.tensor(x) @ w1 + b1) @ w2 + b2
        return torch.nn.functional.cross_entropy(z, torch.tensor(y).long(), reduction="sum")

    ref_value, ref = torch_grads(fn, w1=w1, b1=b1, w2=w2, b2=b2)
    close(value, ref_value)
    for n in p:
        close(g[n].reshape(ref[n].shape), ref[n])


def test_blocked_matmul_contracts_a_key(con):
    """A (rb, kb) tiles x B (kb, cb) tiles, summed over kb: the relational matmul of Tang et al."""
    rng = np.random.default_rng(7)
    a, b, r = rng.normal(size=(6, 8)), rng.normal(size=(8, 4)), rng.normal(size=(6, 4))
    ta = 3  # A in 2 x 2 tiles of 3 x 4; B in 2 x 2 tiles of 4 x 2

    def cut(arr, th, tw, k1, k2, name):
        rows = []
        for i in range(arr.shape[0] // th):
            for j in range(arr.shape[1] // tw):
                rows.append((i, j, arr[i * th : (i + 1) * th, j * tw : (j + 1) * tw].ravel().tolist()))
        con.register("__t", pa.table({k1: [r[0] for r in rows], k2: [r[1] for r in rows], "v": [r[2] for r in rows]}))
        con.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM __t")
        con.unregister("__t")

    cut(a, ta, 4, "rb", "kb", "a")
    cut(b, 4, 2, "kb", "cb", "bm")
    cut(r, ta, 2, "rb", "cb", "r")
    pa_, pb = ad.param("a", keys=["rb", "kb"], shape=(ta, 4)), ad.param("bm", keys=["kb", "cb"], shape=(4, 2))
    prod = ad.matmul(pa_, pb)
    assert prod.keys == ("rb", "cb")
    loss = ad.sum(ad.apply("tile_sum", ad.apply("mul", prod, ad.table("r", keys=["rb", "cb"], shape=(ta, 2)))))
    prog = backward(loss)
    value = con.execute(prog.loss_query().sql("duckdb")).fetchall()[0][0]
    ref_value, ref = torch_grads(lambda a, bm: ((a @ bm) * torch.tensor(r)).sum(), a=a, bm=b)
    close(value, ref_value)
    ga = {(i, j): np.array(v) for i, j, v in con.execute(prog.gradient_query(pa_).sql("duckdb")).fetchall()}
    for (i, j), tile in ga.items():
        close(tile.reshape(ta, 4), ref["a"][i * ta : (i + 1) * ta, j * 4 : (j + 1) * 4])


def test_dot_and_vector_matmul(con):
    rng = np.random.default_rng(3)
    u, v, w = rng.normal(size=(4, 5)), rng.normal(size=(4, 5)), rng.normal(size=(5, 3))
    put_tiles(con, "u", list(u)), put_tiles(con, "vv", list(v)), put_tiles(con, "w", [w], key=None)
    pu, pv, pw = (
        ad.param("u", keys=["b"], shape=(5,)),
        ad.param("vv", keys=["b"], shape=(5,)),
        ad.param("w", shape=(5, 3)),
    )
    dots = ad.apply("dot", pu, pv)
    vm = ad.apply("tile_sum", ad.apply("square", ad.matmul(pu, pw)))
    loss = ad.sum(ad.apply("add", dots, vm))
    value, g = grads(con, loss)
    ref_value, ref = torch_grads(lambda u, vv, w: (u * vv).sum() + ((u @ w) ** 2).sum(), u=u, vv=v, w=w)
    close(value, ref_value)
    close(g["u"], ref["u"]), close(g["vv"], ref["vv"]), close(g["w"].reshape(5, 3), ref["w"])


@pytest.mark.parametrize("fn", ["sum", "avg", "max"])
@pytest.mark.parametrize("tiled", [False, True])
def test_aggregates(con, fn, tiled):
    rng = np.random.default_rng(zlib.crc32(f"{fn}{tiled}".encode()))
    a = rng.normal(size=(4, 3, 5))  # keys (i, j), tiles of 5 (or the 5 as a third key for scalars)
    r = rng.normal(size=(4, 5))
    if tiled:
        con.register(
            "__t",
            pa.table(
                {
                    "i": np.repeat(np.arange(4), 3),
                    "j": np.tile(np.arange(3), 4),
                    "v": [t.tolist() for t in a.reshape(12, 5)],
                }
            ),
        )
        con.execute("CREATE TABLE a AS SELECT i::INT AS i, j::INT AS j, v FROM __t")
        put_tiles(con, "r", list(r), key="i")
        x = ad.param("a", keys=["i", "j"], shape=(5,))
        agg = {"sum": ad.sum, "avg": ad.mean, "max": ad.max}[fn](x, by=["i"])
        loss = ad.sum(ad.apply("tile_sum", ad.apply("mul", agg, ad.table("r", keys=["i"], shape=(5,)))))
    else:
        put_scalars(con, "a", a, ("i", "j", "k")), put_scalars(con, "r", r, ("i", "k"))
        x = ad.param("a", keys=["i", "j", "k"])
        agg = {"sum": ad.sum, "avg": ad.mean, "max": ad.max}[fn](x, by=["i", "k"])
        loss = ad.sum(ad.apply("mul", agg, ad.table("r", keys=["i", "k"])))
    value, g = grads(con, loss)
    red = {"sum": lambda t: t.sum(1), "avg": lambda t: t.mean(1), "max": lambda t: t.amax(1)}[fn]
    ref_value, ref = torch_grads(lambda a: (red(a) * torch.tensor(r)).sum(), a=a)
    close(value, ref_value)
    close(g["a"].reshape(a.shape), ref["a"])


def test_parameter_used_twice_gets_both_contributions(con):
    """w in two branches and twice in one join, and through a rename (a quadratic form w_i A_ij w_j)."""
    rng = np.random.default_rng(11)
    w, A = rng.normal(size=5), rng.normal(size=(5, 5))
    put_scalars(con, "w", w, ("i",)), put_scalars(con, "amat", A, ("i", "j"))
    pw = ad.param("w", keys=["i"])
    quad = ad.sum(ad.apply("mul", ad.apply("mul", pw, ad.table("amat", keys=["i", "j"])), ad.rename(pw, {"i": "j"})))
    self_mul = ad.sum(ad.apply("mul", pw, pw))  # one join using w twice
    branch = ad.sum(ad.apply("exp", pw))  # another consumer of the same node
    loss = ad.apply("add", ad.apply("add", quad, self_mul), branch)
    value, g = grads(con, loss)
    At = torch.tensor(A)
    ref_value, ref = torch_grads(lambda w: w @ At @ w + (w * w).sum() + torch.exp(w).sum(), w=w)
    close(value, ref_value)
    close(g["w"], ref["w"])


def test_filter_and_sparse_gradient(con):
    """Rows a filter drops get gradient zero, and the per-parameter query still returns every parameter row."""
    rng = np.random.default_rng(5)
    w = rng.normal(size=6)
    put_scalars(con, "w", w, ("i",))
    pw = ad.param("w", keys=["i"])
    loss = ad.sum(ad.apply("square", pw, where="i % 2 = 0"))
    value, g = grads(con, loss)
    mask = torch.tensor([1.0, 0, 1, 0, 1, 0], dtype=torch.float64)
    ref_value, ref = torch_grads(lambda w: ((w * w) * mask).sum(), w=w)
    close(value, ref_value)
    close(g["w"], ref["w"])


def test_against_finite_differences(con):
    """A composite graph (tiles, a contraction, an AVG, a rename) checked by central differences of the SQL loss."""
    rng = np.random.default_rng(13)
    x, w = rng.normal(size=(3, 4, 2)), rng.normal(size=(2, 3))
    put_tiles(con, "x", [t for t in x])
    put_tiles(con, "w", [w], key=None)
    px, pw = ad.param("x", keys=["b"], shape=(4, 2)), ad.param("w", shape=(2, 3))
    h = ad.apply("sigmoid", ad.matmul(px, pw))
    loss = ad.mean(ad.apply("tile_sum", ad.apply("mul", h, h)))
    prog = backward(loss)
    loss_sql = prog.loss_query().sql("duckdb")
    gw = np.array(con.execute(prog.gradient_query(pw).sql("duckdb")).fetchall()[0][0])
    eps = 1e-6
    fd = []
    for k in range(w.size):
        vals = []
        for s in (eps, -eps):
            wk = w.ravel().copy()
            wk[k] += s
            con.execute("UPDATE w SET v = ?", [wk.tolist()])
            vals.append(con.execute(loss_sql).fetchall()[0][0])
        fd.append((vals[0] - vals[1]) / (2 * eps))
    close(gw, np.array(fd), tol=1e-7)


def test_gradient_sql_is_plain_duckdb_sql(con):
    rng = np.random.default_rng(1)
    put_scalars(con, "w", rng.normal(size=3), ("i",))
    sql = ad.grad(con, ad.sum(ad.apply("square", ad.param("w", keys=["i"]))))
    assert set(sql) == {"w"}
    rows = con.execute(sql["w"]).fetchall()
    w = [r[0] for r in con.execute("SELECT v FROM w ORDER BY i").fetchall()]
    assert [r[0] for r in rows] == [0, 1, 2]
    close([r[1] for r in rows], [2 * v for v in w])


def test_errors_name_the_problem(con):
    put_scalars(con, "w", np.ones(3), ("i",))
    pw = ad.param("w", keys=["i"])
    with pytest.raises(AutodiffError, match="loss must be one scalar"):
        backward(ad.apply("square", pw))
    with pytest.raises(AutodiffError, match="does not read"):
        backward(ad.sum(pw), wrt=[ad.param("w", keys=["i"])])
    with pytest.raises(AutodiffError, match="matmul needs"):
        ad.matmul(ad.param("w", shape=(3,)), ad.param("w", shape=(4, 2)))
    with pytest.raises(AutodiffError, match="not keys"):
        ad.sum(pw, by=["j"])
    with pytest.raises(AutodiffError, match="unknown kernel"):
        ad.apply("softplus_typo", pw)
    labels = ad.param("w", keys=["i"], shape=(3,))
    logits = ad.table("w", keys=["i"], shape=(3, 2))
    with pytest.raises(AutodiffError, match="no gradient"):
        backward(ad.sum(ad.apply("tile_sum", ad.apply("softmax_xent", logits, labels))))


def test_softmax_xent_per_row_vector_and_scalar_label(con):
    """Per-node logits (n,) with a scalar label, as a GCN's output layer has them."""
    rng = np.random.default_rng(17)
    z, y = rng.normal(size=(5, 4)), rng.integers(0, 4, size=5).astype(np.float64)
    put_tiles(con, "z", list(z))
    put_scalars(con, "lab", y, ("b",))
    loss = ad.sum(ad.apply("softmax_xent", ad.param("z", keys=["b"], shape=(4,)), ad.table("lab", keys=["b"])))
    value, g = grads(con, loss)
    yt = torch.tensor(y).long()
    ref_value, ref = torch_grads(lambda z: torch.nn.functional.cross_entropy(z, yt, reduction="sum"), z=z)
    close(value, ref_value)
    close(g["z"], ref["z"])


def test_sparse_dense_product_sums_small_tiles_per_element(con):
    """sum_j A(i, j) * X(j): a join feeding a SUM (fused), on small vector tiles (one SUM per element), with the
    gradient reaching both the sparse scalars and the tiles."""
    rng = np.random.default_rng(19)
    n, d = 6, 3
    mask = rng.uniform(size=(n, n)) < 0.5
    a, x, r = rng.normal(size=(n, n)) * mask, rng.normal(size=(n, d)), rng.normal(size=(n, d))
    rows = [(int(i), int(j), float(a[i, j])) for i, j in zip(*np.nonzero(mask))]
    con.execute("CREATE TABLE adj (i INTEGER, j INTEGER, v DOUBLE)")
    con.executemany("INSERT INTO adj VALUES (?, ?, ?)", rows)
    put_tiles(con, "x", list(x), key="j"), put_tiles(con, "r", list(r), key="i")
    pa_, px = ad.param("adj", keys=["i", "j"]), ad.param("x", keys=["j"], shape=(d,))
    ax = ad.sum(ad.apply("mul", pa_, px), by=["i"])
    loss = ad.sum(ad.apply("tile_sum", ad.apply("mul", ad.apply("tanh", ax), ad.table("r", keys=["i"], shape=(d,)))))
    value, g = grads(con, loss)
    mt = torch.tensor(mask, dtype=torch.float64)
    ref_value, ref = torch_grads(lambda adj, x: (torch.tanh((adj * mt) @ x) * torch.tensor(r)).sum(), adj=a, x=x)
    close(value, ref_value)
    close(g["x"], ref["x"])
    close(g["adj"], ref["adj"][mask])  # gradient rows for the stored (nonzero) entries, in key order


# ---------------------------------------------------------------------------------------------------------------------
# an element-wise join folded into the matmul / dense layer that consumes it (kernels.Activated)


@pytest.mark.parametrize("act", ["relu", "tanh", "sigmoid", "square", "exp"])
@pytest.mark.parametrize("rows", [16, 21])
def test_activation_folded_into_the_next_layer(con, act, rows):
    """``linear(act(linear(x)))`` and ``matmul(act(...))``: the activation runs inside the next layer's UDF (forward,
    weight gradient, and the input gradient ``act'(z) * (G @ W^T)``); gradients match torch's at every layer."""
    rng = np.random.default_rng(rows)
    m, d, h, c = 8, 6, 5, 3
    x, y = rng.normal(size=(rows, d)), rng.integers(0, c, size=rows).astype(np.float64)
    w1, b1, w2, b2, w3 = (
        0.3 * rng.normal(size=s) for s in ((d, h), (h,), (h, h), (h,), (h, c))
    )  # exp(exp) stays finite
    blocks = range(-(-rows // m))
    put_tiles(con, "x", [x[i * m : (i + 1) * m] for i in blocks])
    put_tiles(con, "y", [y[i * m : (i + 1) * m] for i in blocks])
    shapes = dict(w1=(d, h), b1=(h,), w2=(h, h), b2=(h,), w3=(h, c))
    for name, arr in dict(w1=w1, b1=b1, w2=w2, b2=b2, w3=w3).items():
        put_tiles(con, name, [arr], key=None)
    xs, ys = ad.table("x", keys=["b"], shape=(m, d)), ad.table("y", keys=["b"], shape=(m,))
    p = {n: ad.param(n, shape=s) for n, s in shapes.items()}
    h1 = ad.apply(act, ad.linear(xs, p["w1"], p["b1"]))
    h2 = ad.apply(act, ad.linear(h1, p["w2"], p["b2"]))  # folded into linear: reldl_affine_act
    logits = ad.matmul(h2, p["w3"])  # folded into matmul: reldl_matmul_act
    loss = ad.sum(ad.apply("tile_sum", ad.apply("softmax_xent", logits, ys)))
    sql = " ".join(s for _, _, s in backward(loss).statements("t"))
    for fn in ("reldl_affine_act", "reldl_matmul_act", "reldl_matmul_tn_act", "reldl_matmul_nt_act"):
        assert fn in sql.lower()
    value, g = grads(con, loss)
    f = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "square": torch.square, "exp": torch.exp}

    def fn(w1, b1, w2, b2, w3):
        z = f[act](f[act](torch.tensor(x) @ w1 + b1) @ w2 + b2) @ w3
        return torch.nn.functional.cross_entropy(z, torch.tensor(y).long(), reduction="sum")

    ref_value, ref = torch_grads(fn, w1=w1, b1=b1, w2=w2, b2=b2, w3=w3)
    close(value, ref_value)
    for n in p:
        close(g[n].reshape(ref[n].shape), ref[n])


def test_activation_used_twice_is_not_folded(con):
    """An element-wise join read by two consumers stays a relation of its own (its value is stored once)."""
    m, d = 4, 3
    xs = ad.table("x", keys=["b"], shape=(m, d))
    w = ad.param("w", shape=(d, d))
    h = ad.apply("relu", ad.matmul(xs, w))
    loss = ad.sum(ad.apply("tile_sum", ad.apply("add", ad.matmul(h, w), h)))
    sql = " ".join(s for _, _, s in backward(loss).statements("t")).lower()
    assert "_act(" not in sql


@pytest.mark.parametrize("name", sorted(["identity", "neg", "square", "exp", "log", "tanh", "sigmoid", "relu"]))
def test_numpy_elementwise_matches_duckdb(con, name):
    """The numpy form of each unary element-wise kernel and of its derivative equals DuckDB's value of the SQL."""
    from reldl.autodiff.kernels import elementwise, numpy_function

    k = elementwise(name)
    v = np.array([-2.5, -1.0, -1e-3, 0.0, 1e-3, 0.5, 1.0, 3.0])
    if name == "log":
        v = np.abs(v) + 0.25
    con.register("vals", pa.table({"__a0": v}))
    for tree in (k.template, k.partial(0)):
        fn = numpy_function(tree)
        assert fn is not None
        expected = [r[0] for r in con.execute(f"SELECT {tree.sql('duckdb')} FROM vals").fetchall()]
        np.testing.assert_allclose(fn(v), expected, rtol=1e-15, atol=0)


def test_numpy_case_with_zero_default_matches_duckdb_on_special_values(con):
    """relu and its derivative (CASE ... ELSE 0, computed as a multiply by the mask) give DuckDB's values on
    infinities, NaN and signed zeros too; bce_logits' partials (with sign()) on finite values."""
    from reldl.autodiff.kernels import elementwise, numpy_function

    v = np.array([-np.inf, -2.0, -0.0, 0.0, 1e-300, 2.0, np.inf, np.nan])
    con.register("special", pa.table({"__a0": v}))
    k = elementwise("relu")
    for tree in (k.template, k.partial(0)):
        expected = np.array([r[0] for r in con.execute(f"SELECT {tree.sql('duckdb')} FROM special").fetchall()])
        np.testing.assert_array_equal(numpy_function(tree)(v), expected)
    z, y = np.array([-3.0, -0.5, 0.0, 0.5, 3.0]), np.array([1.0, 0.0, 1.0, 0.0, 1.0])
    con.register("pairs", pa.table({"__a0": z, "__a1": y}))
    k = elementwise("bce_logits")
    for tree in (k.template, k.partial(0), k.partial(1)):
        expected = [r[0] for r in con.execute(f"SELECT {tree.sql('duckdb')} FROM pairs").fetchall()]
        np.testing.assert_allclose(numpy_function(tree, 2)(z, y), expected, rtol=1e-15, atol=0)


def test_numpy_comparisons_order_nan_as_duckdb_does(con):
    import sqlglot

    from reldl.autodiff.kernels import numpy_function

    vals = [-np.inf, -1.0, 0.0, 1.0, np.inf, np.nan]
    a, b = (np.array(x) for x in zip(*[(p, q) for p in vals for q in vals]))
    con.register("cmp", pa.table({"__a0": a, "__a1": b}))
    for op in ("<", "<=", ">", ">=", "=", "<>"):
        sql = f"CASE WHEN __a0 {op} __a1 THEN 1.0 ELSE 0.0 END"
        expected = np.array([float(r[0]) for r in con.execute(f"SELECT {sql} FROM cmp").fetchall()])
        np.testing.assert_array_equal(numpy_function(sqlglot.parse_one(sql), 2)(a, b), expected, err_msg=op)


def test_numpy_elementwise_refuses_what_it_cannot_compute():
    import sqlglot

    from reldl.autodiff.kernels import numpy_function

    for sql in ("CASE WHEN __a0 > 0 THEN __a0 END", "random() * __a0", "other + __a0", "'a' || __a0"):
        assert numpy_function(sqlglot.parse_one(sql, read="duckdb")) is None


def test_renames_and_pass_through_gradients_are_views():
    """Steps that only rename or pass on another step's columns (a Rename; the gradient of an addition's input) are
    views, not copies; steps that compute are tables."""
    adj = ad.table("adj", keys=["i", "j"])
    h = ad.apply("add", ad.table("h", keys=["i"], shape=(3,)), ad.param("b", shape=(3,)))
    loss = ad.sum(ad.apply("tile_sum", ad.sum(ad.apply("mul", adj, ad.rename(h, {"i": "j"})), by=["i"])))
    prog = backward(loss)
    kinds = {name: ("VIEW" in sql) for name, _, sql in prog.statements("t")}
    r = next(n for n in ad.ir.topological([loss]) if isinstance(n, ad.ir.Rename))
    assert kinds[f"f{r.id}"]  # forward rename: a view
    assert kinds[f"g{h.id}"]  # h's gradient is r's, renamed back: a view
    assert not kinds[f"f{h.id}"]  # the addition computes: a table
    assert not kinds[prog.grads[prog.wrt[0].id]]  # b's gradient sums over rows: a table
