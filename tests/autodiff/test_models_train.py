"""CREATE MODEL ... AS SELECT model types against PyTorch (float64): gradients at initialisation (1e-10) and the loss
and parameter trajectory of several SGD and Adam steps on the same data, seed and batch order."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

import reldl
from reldl import autodiff as ad
from reldl.autodiff import models, train
from reldl.autodiff.grad import backward

TOL = 1e-10


@pytest.fixture
def duck():
    c = duckdb.connect()
    ad.install(c)
    yield c
    c.close()


def put(con, name: str, cols: dict) -> None:
    con.register("__t", pa.table(cols))
    con.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM __t")
    con.unregister("__t")


def tabular_data(con, n=40, d=3, classes=None, seed=0, regression=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    if regression:
        y = x @ rng.normal(size=d) + 0.1 * rng.normal(size=n)
    elif classes is None:
        y = (x @ rng.normal(size=d) + 0.5 * rng.normal(size=n) > 0).astype(np.int64)
    else:
        y = rng.integers(0, classes, size=n)
    cols = {f"f{i}": x[:, i] for i in range(d)}
    cols["y"] = y
    put(con, "pts", cols)


def tile_data(con, job) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The job's data rows as (X, y, rows per block), in row order (blocks ``rb`` are runs of rows)."""
    rows = con.execute(f"SELECT rb, x, y FROM {job.table('data').sql('duckdb')} ORDER BY r").fetchall()
    x = np.array([r[1] for r in rows], dtype=np.float64)
    y = np.array([r[2][0] for r in rows], dtype=np.float64)
    blocks = [r[0] for r in rows]
    assert blocks == sorted(blocks)
    return x, y, [blocks.count(b) for b in dict.fromkeys(blocks)]


def params_of(con, job, roles) -> dict[str, np.ndarray]:
    out = {}
    for r in roles:
        rows = con.execute(f"SELECT * FROM {job.table(r).sql('duckdb')} ORDER BY 1").fetchall()
        out[r] = np.array([row[-1] for row in rows], dtype=np.float64)
        if len(rows) == 1 and not rows[0][:-1]:
            out[r] = out[r][0]
    return out


def sql_grads(con, loss) -> tuple[float, dict[str, np.ndarray]]:
    prog = backward(loss)
    value = con.execute(prog.loss_query().sql("duckdb")).fetchall()[0][0]
    out = {}
    for p in prog.wrt:
        rows = con.execute(prog.gradient_query(p).sql("duckdb")).fetchall()
        vals = [np.asarray(r[-1], dtype=np.float64) for r in rows]
        out[p.label()] = vals[0] if not p.keys else np.stack(vals)
    return value, out


def torch_tabular(job, params, x, y):
    """Loss of the job's tabular model in torch; params: role -> tensor (flat tiles as stored)."""
    sizes = models._layer_sizes(job)
    h = x
    for i, (fi, fo) in enumerate(sizes):
        h = h @ params[f"w{i}"].reshape(fi, fo) + params[f"b{i}"]
        if i < len(sizes) - 1:
            h = torch.relu(h)
    task = job.info["task"]
    if task == "multiclass":
        return F.cross_entropy(h, y.long())
    if task == "binary":
        return F.binary_cross_entropy_with_logits(h[:, 0], y)
    return F.mse_loss(h[:, 0], y)


def make(con, name, options, query="SELECT * FROM pts"):
    job = models.make_job(con, name, options, query)
    models.prepare(con, job)
    return job


OPTIONS = {
    "logistic": {"model_type": "logistic_reg", "label": "y"},
    "logistic_multi": {"model_type": "logistic_reg", "label": "y", "_classes": 3},
    "linear": {"model_type": "linear_reg", "label": "y", "_regression": True},
    "mlp": {"model_type": "mlp", "label": "y", "hidden_units": [5, 4], "_classes": 3},
}


@pytest.mark.parametrize("case", sorted(OPTIONS))
def test_tabular_gradients_match_torch(duck, case):
    opts = dict(OPTIONS[case])
    tabular_data(duck, classes=opts.pop("_classes", None), regression=opts.pop("_regression", False))
    job = make(duck, "m", {**opts, "batch_size": 16, "tile_rows": 8})
    if job.options["model_type"] != "mlp":  # zero init: perturb so every gradient is non-trivial
        duck.execute(f"UPDATE {job.table('w0').sql('duckdb')} SET v = list_transform(v, lambda x, i: 0.1 * i - 0.2)")
    loss, _ = models.tabular_graph(job, source=job.table("data"))
    value, grads = sql_grads(duck, loss)
    x, y, _ = tile_data(duck, job)
    init = params_of(duck, job, [r for r in job.tables if r[0] in "wb"])
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in init.items()}
    ref = torch_tabular(job, tp, torch.tensor(x), torch.tensor(y))
    ref.backward()
    assert abs(value - ref.item()) < TOL
    for k, t in tp.items():
        assert np.max(np.abs(grads[k] - t.grad.numpy())) < TOL, k
    assert len(x) == 40 and job.info["task"] == {"logistic": "binary", "linear": "regression"}.get(case, "multiclass")


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_mlp_training_trajectory_matches_torch(duck, optimizer):
    """Several epochs of shuffled mini-batches (40 rows, tiles of 8, batches of 16: a short last batch)."""
    tabular_data(duck, classes=3, seed=1)
    opts = {"model_type": "mlp", "label": "y", "hidden_units": [6], "batch_size": 16, "tile_rows": 8}
    opts.update(optimizer=optimizer, learning_rate=0.05, epochs=2, seed=3)
    job = make(duck, "m", opts)
    x, y, sizes = tile_data(duck, job)
    roles = ["w0", "b0", "w1", "b1"]
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params_of(duck, job, roles).items()}
    result = models.fit(duck, job, progress=False)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)(list(tp.values()), lr=0.05)
    losses = []
    for epoch in (1, 2):
        perm = train.batch_order(len(sizes), epoch, seed=3)
        for b in range(0, len(sizes), 2):
            rows = np.concatenate([np.arange(starts[k], starts[k + 1]) for k in perm[b : b + 2]])
            loss = torch_tabular(job, tp, torch.tensor(x[rows]), torch.tensor(y[rows]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert len(result.step_losses) == len(losses) == 6
    assert np.max(np.abs(np.array(result.step_losses) - losses)) < TOL
    after = params_of(duck, job, roles)
    for k in roles:
        assert np.max(np.abs(after[k] - tp[k].detach().numpy())) < TOL, k
    assert losses[-1] != losses[0]


def mf_data(con, users=7, items=6, seed=0):
    """A sparse set of observed ratings (about 40% of the user x item grid), users and items as strings."""
    rng = np.random.default_rng(seed)
    mask = rng.random((users, items)) < 0.4
    mask[np.arange(users), np.arange(users) % items] = True  # every user and item observed at least once
    mask[np.arange(items) % users, np.arange(items)] = True
    u, i = np.nonzero(mask)
    put(
        con,
        "ratings",
        {"who": [f"u{k}" for k in u], "what": [f"i{k:02d}" for k in i], "stars": rng.integers(1, 6, len(u))},
    )
    return len(u)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_matrix_factorization_matches_torch(duck, optimizer):
    n = mf_data(duck)
    opts = {"model_type": "matrix_factorization", "user": "who", "item": "what", "label": "stars", "num_factors": 3}
    opts.update(optimizer=optimizer, learning_rate=0.05, epochs=2, batch_size=8, l2=0.01, seed=5)
    job = make(duck, "mf", opts, "SELECT who, what, stars FROM ratings")
    ratings = duck.execute(f"SELECT rid, u, i, r, rb FROM {job.table('ratings').sql('duckdb')} ORDER BY rid").fetchall()
    assert len(ratings) == n
    rid, u, i, r, rb = (np.array(c) for c in zip(*ratings))
    init = params_of(duck, job, ["users", "items"])
    P, Q = (torch.tensor(init[k], requires_grad=True) for k in ("users", "items"))

    def loss_of(rows):
        pred = (P[u[rows]] * Q[i[rows]]).sum(1)
        return ((pred - torch.tensor(r[rows])) ** 2).mean() + 0.01 * ((P**2).sum() + (Q**2).sum())

    # gradient at initialisation on one batch: only its observed users/items get data gradient (sparse mask)
    loss, _ = models.mf_graph(job, source=_batch0(job))
    value, grads = sql_grads(duck, loss)
    ref = loss_of(np.nonzero(rb == 0)[0])
    ref.backward()
    assert abs(value - ref.item()) < TOL
    assert np.max(np.abs(grads["users"] - P.grad.numpy())) < TOL
    assert np.max(np.abs(grads["items"] - Q.grad.numpy())) < TOL
    P.grad = Q.grad = None

    result = models.fit(duck, job, progress=False)
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)([P, Q], lr=0.05)
    losses = []
    blocks = np.unique(rb)
    for epoch in (1, 2):
        for k in train.batch_order(len(blocks), epoch, seed=5):
            loss = loss_of(np.nonzero(rb == blocks[k])[0])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert np.max(np.abs(np.array(result.step_losses) - losses)) < TOL
    after = params_of(duck, job, ["users", "items"])
    assert np.max(np.abs(after["users"] - P.detach().numpy())) < TOL
    assert np.max(np.abs(after["items"] - Q.detach().numpy())) < TOL


def _batch0(job):
    from sqlglot import exp

    from reldl.autodiff.emit import select

    return select(exp.Star()).from_(job.table("ratings")).where(exp.column("rb").eq(0))


def gcn_data(con, n=12, d=4, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    labels = rng.integers(0, classes, n).astype(float)
    labels[[2, 7]] = np.nan  # unlabeled nodes
    edges = {(int(a), int(b)) for a, b in rng.integers(0, n, (2 * n, 2)) if a != b}
    cols = {"node": np.arange(100, 100 + n), **{f"f{k}": x[:, k] for k in range(d)}}
    cols["label"] = pa.array([None if np.isnan(v) else int(v) for v in labels], pa.int64())
    put(con, "nodes", cols)
    put(con, "edges", {"src": [100 + a for a, _ in sorted(edges)], "dst": [100 + b for _, b in sorted(edges)]})
    return x, labels, edges


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_gcn_matches_torch(duck, optimizer):
    n = 12
    x, labels, edges = gcn_data(duck, n)
    opts = {"model_type": "gcn", "edges": "edges", "hidden_units": [5], "optimizer": optimizer}
    opts.update(learning_rate=0.1, epochs=3, seed=2)
    job = make(duck, "g", opts, "SELECT * FROM nodes")
    a = np.zeros((n, n))
    for s, t in edges:
        a[s, t] = a[t, s] = 1.0
    a += np.eye(n)
    dinv = 1 / np.sqrt(a.sum(1))
    A = torch.tensor(dinv[:, None] * a * dinv[None, :])
    X = torch.tensor(x)
    mask = ~np.isnan(labels)
    Y = torch.tensor(labels[mask]).long()
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params_of(duck, job, ["w0", "b0", "w1", "b1"]).items()}

    def loss_of():
        h = torch.relu(A @ (X @ tp["w0"].reshape(4, 5)) + tp["b0"])
        z = A @ (h @ tp["w1"].reshape(5, 3)) + tp["b1"]
        return F.cross_entropy(z[torch.tensor(mask)], Y)

    loss, _ = models.gcn_graph(job)
    value, grads = sql_grads(duck, loss)
    ref = loss_of()
    ref.backward()
    assert abs(value - ref.item()) < TOL
    for k, t in tp.items():
        assert np.max(np.abs(grads[k] - t.grad.numpy())) < TOL, k
        t.grad = None
    result = models.fit(duck, job, progress=False)
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)(list(tp.values()), lr=0.1)
    losses = []
    for _ in range(3):
        loss = loss_of()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.max(np.abs(np.array(result.step_losses) - losses)) < TOL
    after = params_of(duck, job, list(tp))
    for k, t in tp.items():
        assert np.max(np.abs(after[k] - t.detach().numpy())) < TOL, k


def test_sql_end_to_end_predict_and_drop(tmp_path):
    con = reldl.connect(str(tmp_path / "t.db"))
    tabular_data(con.duckdb_connection, n=200, d=3, seed=4)
    con.execute(
        "CREATE MODEL clf OPTIONS (model_type = 'logistic_reg', label = 'y', learning_rate = 0.2, epochs = 4, "
        "batch_size = 50) AS SELECT f0, f1, f2, y FROM pts"
    )
    acc = con.execute("SELECT avg(((predict('clf', f0, f1, f2) > 0.5)::INT = y)::INT) FROM pts").fetchall()[0][0]
    assert acc > 0.8
    row = con.execute("SELECT model_type, path, options FROM reldl.models WHERE name = 'clf'").fetchall()[0]
    assert row[0] == "logistic_reg" and row[1].startswith(str(tmp_path / "t.db.models"))
    losses = [r[0] for r in con.execute("SELECT loss FROM reldl.training_log ORDER BY step").fetchall()]
    assert len(losses) == 16 and losses[-1] < losses[0]
    tables = con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name LIKE 'm_clf_%'").fetchall()[0][0]
    assert tables == 5  # data, w0, b0 and the two optimizer state tables
    con.execute("DROP MODEL clf")
    assert con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name LIKE 'm_clf_%'").fetchall()[0][0] == 0
    con.close()


@pytest.mark.parametrize(
    "options,query,error",
    [
        ("model_type = 'mlp', label = 'y', hiden_units = [4]", "SELECT * FROM pts", "unknown option(s) hiden_units"),
        ("model_type = 'mlp', label = 'target'", "SELECT * FROM pts", "label column 'target' is not in"),
        ("model_type = 'logistic_reg', label = 'y'", "SELECT f0, 'a' AS s, y FROM pts", "feature column 's' has type"),
        ("model_type = 'svm', label = 'y'", "SELECT * FROM pts", "model_type 'svm' cannot be trained"),
        ("model_type = 'mlp', label = 'y', optimizer = 'lbfgs'", "SELECT * FROM pts", "optimizer 'lbfgs'"),
        ("model_type = 'logistic_reg', label = 'f0'", "SELECT f0, f1 FROM pts", "labels must be class indices"),
        ("model_type = 'mlp', label = 'y', batch_size = 10, tile_rows = 4", "SELECT * FROM pts", "multiple of"),
        ("model_type = 'gcn', label = 'y'", "SELECT * FROM pts", "needs OPTIONS (edges"),
        (
            "model_type = 'mlp', label = 'y'",
            "SELECT f0, CASE WHEN f0 > 0 THEN f1 END AS f1, y FROM pts",
            "column 'f1' has",  # a NULL feature, named
        ),
        ("model_type = 'linear_reg', label = 'y'", "SELECT f0, f1, NULLIF(y, 1) AS y FROM pts", "column 'y' has"),
        ("model_type = 'mlp', label = 'y'", "SELECT * FROM pts WHERE false", "the SELECT returned no rows"),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(tmp_path, options, query, error):
    con = reldl.connect(str(tmp_path / "bad.db"))
    tabular_data(con.duckdb_connection, n=20, d=2)
    con.execute(
        "CREATE MODEL keep OPTIONS (model_type = 'linear_reg', label = 'y', epochs = 1, batch_size = 10) "
        "AS SELECT f0, f1, y FROM pts"
    )

    def snapshot():
        tables = con.execute("SELECT schema_name, table_name FROM duckdb_tables() ORDER BY ALL").fetchall()
        rows = {t: con.execute(f'SELECT * FROM "{t[0]}"."{t[1]}" ORDER BY ALL').fetchall() for t in tables}
        return tables, rows, con.execute("SELECT name, options FROM reldl.models").fetchall()

    before = snapshot()
    with pytest.raises(reldl.Error) as info:
        con.execute(f"CREATE OR REPLACE MODEL keep OPTIONS ({options}) AS {query}")
    assert error in str(info.value) and "\n" not in str(info.value)
    assert snapshot() == before
    assert con.execute("SELECT predict('keep', f0, f1) IS NOT NULL FROM pts LIMIT 1").fetchall() == [(True,)]
    con.close()


def test_predict_on_matrix_factorization_and_gcn():
    """predict() on lookup models trained in the database: p_user . q_item, and the class of a node from the trained
    GCN's forward pass (checked against the same forward pass in torch with the trained weights)."""
    con = reldl.connect()
    duck = con.cursor().duckdb_cursor
    mf_data(duck)
    con.execute(
        "CREATE MODEL recs OPTIONS (model_type = 'matrix_factorization', user = 'who', item = 'what', label = 'stars', "
        "num_factors = 3, epochs = 2, learning_rate = 0.05) AS SELECT who, what, stars FROM ratings"
    )
    got = con.execute("SELECT who, what, predict('recs', who, what) FROM ratings ORDER BY who, what").fetchall()
    t = {r.name: r for r in reldl.catalog.list_models(duck)}["recs"].options["tables"]
    want = con.execute(
        f"SELECT a.value, b.value, list_dot_product(p.v, q.v) FROM {t['users']} AS p, {t['items']} AS q, "
        f"{t['user_ids']} AS a, {t['item_ids']} AS b WHERE a.u = p.u AND b.i = q.i"
    ).fetchall()
    lookup = {(a, b): v for a, b, v in want}
    assert len(got) > 0 and all(abs(v - lookup[(a, b)]) < 1e-12 for a, b, v in got)
    assert con.execute("SELECT predict('recs', 'nobody', 'i00')").fetchall() == [(None,)]
    # the caller's columns named like the model's own (value, u, i, v) still bind to the caller's table
    probe = con.execute(
        "SELECT value, u, predict('recs', value, u) FROM (SELECT who AS value, what AS u, 0 AS i, 0 AS v FROM ratings) "
        "AS a ORDER BY value, u"
    ).fetchall()
    assert probe == got
    plan = [r[0] for r in con.execute("EXPLAIN SELECT predict('recs', who, what) FROM ratings").fetchall()]
    assert plan[0].startswith("plan: lookup")
    with pytest.raises(reldl.ProgrammingError, match="model 'nosuch' does not exist"):  # beside a trained lookup
        con.execute("SELECT predict('nosuch', 1.0, 2.0)")
    with pytest.raises(reldl.ProgrammingError, match="takes \\(user, item\\)"):
        con.execute("SELECT predict('recs', who) FROM ratings")

    x, labels, edges = gcn_data(duck, 12)
    con.execute(
        "CREATE MODEL topics OPTIONS (model_type = 'gcn', edges = 'edges', hidden_units = [5], epochs = 3, "
        "learning_rate = 0.1) AS SELECT * FROM nodes"
    )
    rec = {r.name: r for r in reldl.catalog.list_models(duck)}["topics"]
    tables = rec.options["tables"]

    def tile(role):
        return np.array(duck.execute(f"SELECT v FROM {tables[role]}").fetchall()[0][0])

    n = 12
    a = np.zeros((n, n))
    for s, t in edges:
        a[s, t] = a[t, s] = 1.0
    a += np.eye(n)
    dinv = 1 / np.sqrt(a.sum(1))
    A = dinv[:, None] * a * dinv[None, :]
    h = np.maximum(A @ (x @ tile("w0").reshape(4, 5)) + tile("b0"), 0)
    z = A @ (h @ tile("w1").reshape(5, 3)) + tile("b1")
    got = con.execute("SELECT node, predict('topics', node) FROM nodes ORDER BY node").fetchall()
    assert [c for _, c in got] == list(np.argmax(z, axis=1))
    con.close()


def test_shuffle_puts_rows_in_a_seeded_random_order_once(duck):
    """A SELECT sorted by its label: with shuffle on, every batch (one block of rows) holds both classes, in an order
    fixed by the seed; with shuffle off the rows keep the SELECT's order."""
    tabular_data(duck, n=200, d=2, seed=5)
    sorted_q = "SELECT * FROM pts ORDER BY y, f0"
    base = {"model_type": "logistic_reg", "label": "y", "batch_size": 50}
    mixed = make(duck, "a", {**base, "seed": 1}, sorted_q)
    q = "SELECT rb, count(DISTINCT y[1]) FROM {} GROUP BY rb ORDER BY rb"
    assert [r[1] for r in duck.execute(q.format(mixed.table("data").sql("duckdb"))).fetchall()] == [2, 2, 2, 2]
    again = make(duck, "b", {**base, "seed": 1}, sorted_q)
    other = make(duck, "c", {**base, "seed": 2}, sorted_q)
    order = "SELECT list(x ORDER BY r) FROM {}"
    same = [duck.execute(order.format(j.table("data").sql("duckdb"))).fetchall() for j in (mixed, again, other)]
    assert same[0] == same[1] and same[0] != same[2]
    kept = make(duck, "d", {**base, "shuffle": False}, sorted_q)
    ys = duck.execute(f"SELECT list(y[1] ORDER BY r) FROM {kept.table('data').sql('duckdb')}").fetchall()[0][0]
    assert ys == sorted(ys)


def test_feature_columns_may_have_any_name(duck):
    """Columns named like the generated ones (x, y, r, rb, n, __row, __src) are features like any other."""
    names = ["x", "y", "r", "rb", "n", "__row", "__src"]
    rng = np.random.default_rng(9)
    vals = rng.normal(size=(30, len(names)))
    cols = {c: vals[:, i] for i, c in enumerate(names)}
    cols["label"] = (vals[:, 0] > 0).astype(np.int64)
    put(duck, "odd", cols)
    job = make(
        duck, "odd_names", {"model_type": "logistic_reg", "label": "label", "shuffle": False}, "SELECT * FROM odd"
    )
    rows = duck.execute(f"SELECT x, y FROM {job.table('data').sql('duckdb')} ORDER BY r").fetchall()
    assert np.array_equal(np.array([r[0] for r in rows]), vals)
    assert [r[1][0] for r in rows] == cols["label"].astype(float).tolist()
    shuffled = make(duck, "odd_shuffled", {"model_type": "logistic_reg", "label": "label"}, "SELECT * FROM odd")
    got = duck.execute(f"SELECT x FROM {shuffled.table('data').sql('duckdb')} ORDER BY r").fetchall()
    assert sorted(map(tuple, (r[0] for r in got))) == sorted(map(tuple, vals.tolist()))
