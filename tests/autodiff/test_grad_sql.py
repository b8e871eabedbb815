"""The SQL front end: `reldl.autodiff.grad(connection, loss_sql, wrt=[...])` on losses written as SELECTs over
parameter and data tables, checked against PyTorch autograd (float64, 1e-10)."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest
import torch

import reldl
from reldl import autodiff as ad
from reldl.autodiff.ir import AutodiffError

TOL = 1e-10


def load(con, name: str, arr: np.ndarray, keys: tuple[str, ...]) -> None:
    cols = ", ".join(f"{k} INTEGER" for k in keys)
    con.execute(f"CREATE OR REPLACE TABLE {name} ({cols}{', ' if keys else ''}v DOUBLE)")
    rows = [(*idx, float(arr[idx])) for idx in np.ndindex(*arr.shape)]
    con.executemany(f"INSERT INTO {name} VALUES ({', '.join('?' * (len(keys) + 1))})", rows)


def check(con, sql: str, wrt: dict[str, np.ndarray], fn) -> None:
    """The SQL loss equals fn(**params) and each parameter table's gradient equals torch's."""
    ts = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in wrt.items()}
    ref = fn(**ts)
    ref.backward()
    (value,) = con.execute(sql).fetchall()[0]
    assert abs(value - ref.item()) <= TOL * max(1.0, abs(ref.item()))
    grads = ad.grad(con, sql, wrt=list(wrt))
    for name, t in ts.items():
        rows = con.execute(grads[name]).fetchall()
        got = np.array([r[-1] for r in rows])
        want = t.grad.numpy().ravel()  # tables are loaded in key order, and the query orders by key
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= TOL * max(1.0, np.abs(want).max()), (name, got, want)


@pytest.fixture
def con():
    c = duckdb.connect()
    yield c
    c.close()


@pytest.fixture
def regression(con):
    rng = np.random.default_rng(42)
    x, y, w = rng.normal(size=(12, 4)), rng.normal(size=12), rng.normal(size=4)
    load(con, "x", x, ("i", "j")), load(con, "y", y, ("i",)), load(con, "w", w, ("j",))
    return x, y, w


def test_least_squares_through_a_subquery(con, regression):
    x, y, w = regression
    sql = (
        "SELECT AVG(POWER(s.pred - y.v, 2)) FROM "
        "(SELECT x.i, SUM(x.v * w.v) AS pred FROM x JOIN w ON x.j = w.j GROUP BY x.i) AS s JOIN y ON s.i = y.i"
    )
    check(con, sql, {"w": w}, lambda w: ((torch.tensor(x) @ w - torch.tensor(y)) ** 2).mean())


def test_logistic_loss_with_a_cte_ridge_term_and_a_scalar_bias(con, regression):
    x, y, w = regression
    labels = (y > 0).astype(float)
    load(con, "lab", labels, ("i",))
    load(con, "bias", np.array(0.3), ())
    sql = """
        WITH z AS (SELECT x.i, SUM(x.v * w.v) AS s FROM x JOIN w USING (j) GROUP BY x.i)
        SELECT AVG(LN(1 + EXP(z.s + b.v)) - lab.v * (z.s + b.v)) + 0.01 * (SELECT 1)
        FROM z JOIN lab ON z.i = lab.i, bias AS b
    """
    with pytest.raises(AutodiffError):  # a scalar subquery in the select list is outside the subset
        ad.grad(con, sql, wrt=["w", "bias"])
    sql = """
        WITH z AS (SELECT x.i, SUM(x.v * w.v) AS s FROM x JOIN w USING (j) GROUP BY x.i)
        SELECT AVG(LN(1 + EXP(z.s + b.v)) - lab.v * (z.s + b.v)) FROM z JOIN lab ON z.i = lab.i, bias AS b
    """
    xt, lt = torch.tensor(x), torch.tensor(labels)

    def fn(w, bias):
        z = xt @ w + bias
        return (torch.nn.functional.softplus(z) - lt * z).mean()

    check(con, sql, {"w": w, "bias": np.array(0.3)}, fn)


def test_self_join_sums_both_uses(con):
    rng = np.random.default_rng(1)
    w, a = rng.normal(size=4), rng.normal(size=(4, 4))
    load(con, "w", w, ("j",)), load(con, "a", a, ("i", "j"))
    sql = (
        "SELECT SUM(w1.v * a.v * w2.v) + SUM(TANH(w1.v)) / COUNT(*) "
        "FROM w AS w1, a, w AS w2 WHERE w1.j = a.i AND a.j = w2.j"
    )
    at = torch.tensor(a)
    check(con, sql, {"w": w}, lambda w: w @ at @ w + 4 * torch.tanh(w).sum() / 16)


def test_matrix_factorization_on_observed_entries_only(con):
    rng = np.random.default_rng(2)
    users, items, f = 5, 6, 3
    p, q = rng.normal(size=(users, f)), rng.normal(size=(items, f))
    mask = rng.uniform(size=(users, items)) < 0.5
    r = rng.normal(size=(users, items))
    load(con, "p", p, ("u", "f")), load(con, "q", q, ("it", "f"))
    con.execute("CREATE TABLE ratings (u INTEGER, it INTEGER, rating DOUBLE)")
    con.executemany(
        "INSERT INTO ratings VALUES (?, ?, ?)", [(int(u), int(i), float(r[u, i])) for u, i in zip(*np.nonzero(mask))]
    )
    sql = """
        SELECT SUM(POWER(pred.s - r.rating, 2))
        FROM (SELECT p.u, q.it, SUM(p.v * q.v) AS s FROM p JOIN q ON p.f = q.f GROUP BY p.u, q.it) AS pred
        JOIN ratings AS r ON pred.u = r.u AND pred.it = r.it
    """
    mt, rt = torch.tensor(mask, dtype=torch.float64), torch.tensor(r)
    check(con, sql, {"p": p, "q": q}, lambda p, q: (((p @ q.T - rt) ** 2) * mt).sum())


def test_keyless_data_table_uses_rowid_and_filters_on_keys(con):
    rng = np.random.default_rng(3)
    pts = rng.normal(size=(7, 2))
    con.execute("CREATE TABLE pts (a DOUBLE, t DOUBLE)")
    con.executemany("INSERT INTO pts VALUES (?, ?)", [tuple(map(float, r)) for r in pts])
    load(con, "w", np.array(0.7), ())
    sql = "SELECT SUM(POWER(w.v * pts.a - pts.t, 2)) FROM pts, w"
    check(
        con, sql, {"w": np.array(0.7)}, lambda w: ((w * torch.tensor(pts[:, 0]) - torch.tensor(pts[:, 1])) ** 2).sum()
    )
    x = rng.normal(size=(6,))
    load(con, "wf", x, ("i",))
    keep = torch.tensor([1.0 if i > 2 else 0.0 for i in range(6)], dtype=torch.float64)
    check(con, "SELECT SUM(wf.v * wf.v) FROM wf WHERE wf.i > 2", {"wf": x}, lambda wf: (wf * wf * keep).sum())


def test_works_through_a_reldl_connection():
    con = reldl.connect()
    con.execute("CREATE TABLE w (j INTEGER, v DOUBLE)")
    con.execute("INSERT INTO w VALUES (0, 1.5), (1, -2.0)")
    sql = ad.grad(con, "SELECT SUM(w.v * w.v * w.v) FROM w", wrt=["w"])["w"]
    assert con.execute(sql).fetchall() == [(0, 3 * 1.5**2), (1, 3 * 4.0)]
    con.close()


@pytest.mark.parametrize(
    "sql, message",
    [
        ("SELECT SUM(w.v) FROM w LEFT JOIN y ON w.j = y.i", "only inner joins"),
        ("SELECT MAX(w.v) FROM w", "aggregate MAX is not supported"),
        ("SELECT SUM(w.v) FROM w GROUP BY w.j", "GROUP BY"),
        ("SELECT w.j, SUM(w.v) FROM w GROUP BY w.j", "one row"),
        ("SELECT SUM(foo(w.v)) FROM w", "cannot differentiate"),
        ("SELECT SUM(w.v) FROM nosuch", "cannot read table nosuch"),
        ("SELECT SUM(y.v) FROM y", "does not use the parameter"),
        ("SELECT SUM(w.v * w.j) FROM w", "exactly one value column"),
        ("SELECT SUM(w.v) FROM w ORDER BY 1", "ORDER is not supported"),
    ],
)
def test_unsupported_queries_get_one_line_errors(con, regression, sql, message):
    with pytest.raises(AutodiffError, match=message) as err:
        ad.grad(con, sql, wrt=["w"])
    assert "\n" not in str(err.value)
