"""reldl.autodiff.minimize: SGD, momentum and Adam as SQL updates against torch.optim (float64), sparse gradients,
mini-batches, the loss log, resume after a killed process, errors, and training under a DuckDB memory limit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import torch

import reldl
from reldl import autodiff as ad
from reldl.autodiff import blockfuse, train
from reldl.autodiff.grad import backward
from reldl.autodiff.train import Batches, TrainingError, minimize

TOL = 1e-10
M, D, H, C, NB = 6, 4, 5, 3, 4  # rows per block, features, hidden, classes, blocks


def put(con, name: str, cols: dict) -> None:
    con.register("__t", pa.table(cols))
    con.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM __t")
    con.unregister("__t")


def mlp_setup(con, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(NB * M, D))
    y = rng.integers(0, C, NB * M).astype(float)
    put(
        con,
        "data",
        {
            "rb": np.arange(NB),
            "x": [x[i * M : (i + 1) * M].ravel().tolist() for i in range(NB)],
            "y": [y[i * M : (i + 1) * M].tolist() for i in range(NB)],
        },
    )
    w = {"w1": rng.normal(size=(D, H)) * 0.3, "b1": rng.normal(size=H) * 0.1, "w2": rng.normal(size=(H, C)) * 0.3}
    for k, v in w.items():
        put(con, k, {"v": [v.ravel().tolist()]})
    put(con, "scale", {"v": [1.5]})  # a scalar parameter
    return x, y, w | {"scale": np.array(1.5)}


def mlp_loss(src: str):
    x = ad.table(src, keys=["rb"], shape=(M, D), value="x")
    y = ad.table(src, keys=["rb"], shape=(M,), value="y")
    w1, b1 = ad.param("w1", shape=(D, H)), ad.param("b1", shape=(H,))
    w2, s = ad.param("w2", shape=(H, C)), ad.param("scale")
    hdn = ad.apply("tanh", ad.apply("bias_add", ad.matmul(x, w1), b1))
    logits = ad.apply("mul", ad.matmul(hdn, w2), s)
    per_row = ad.sum(ad.apply("tile_sum", ad.apply("softmax_xent", logits, y)))
    return ad.apply("div", per_row, ad.count(ad.table(f"SELECT unnest(y) AS v FROM {src}")))


def torch_mlp(p, x, y):
    h = torch.tanh(x @ p["w1"] + p["b1"])
    return torch.nn.functional.cross_entropy((h @ p["w2"]) * p["scale"], y.long())


def read(con, name):
    v = con.execute(f"SELECT v FROM {name}").fetchall()[0][0]
    return np.asarray(v, dtype=np.float64)


@pytest.mark.parametrize(
    "optimizer,kw,torch_opt",
    [
        ("sgd", {}, lambda ps: torch.optim.SGD(ps, lr=0.05)),
        ("sgd", {"weight_decay": 0.1}, lambda ps: torch.optim.SGD(ps, lr=0.05, weight_decay=0.1)),
        ("momentum", {"momentum": 0.8}, lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8)),
        ("adam", {}, lambda ps: torch.optim.Adam(ps, lr=0.05)),
        (
            "adam",
            {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.01},
            lambda ps: torch.optim.Adam(ps, lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01),
        ),
    ],
)
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "relational"])
def test_optimizers_match_torch(optimizer, kw, torch_opt, fuse):
    con = duckdb.connect()
    x, y, w = mlp_setup(con)
    batches = Batches("batch", "data", "rb", size=2, seed=7)
    loss = mlp_loss("batch")
    assert blockfuse.plan(backward(loss)) is not None  # the fused run below really fuses
    res = minimize(
        con, loss, optimizer=optimizer, learning_rate=0.05, epochs=3, batches=batches, fuse_blocks=fuse, **kw
    )
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in w.items()}
    opt = torch_opt(list(tp.values()))
    losses = []
    for epoch in (1, 2, 3):
        perm = train.batch_order(NB, epoch, seed=7)
        for b in (0, 2):
            rows = np.concatenate([np.arange(k * M, (k + 1) * M) for k in perm[b : b + 2]])
            loss = torch_mlp(tp, torch.tensor(x[rows]), torch.tensor(y[rows]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert res.epochs == 3 and res.steps == 6 and len(res.losses) == 3
    assert np.max(np.abs(np.array(res.step_losses) - losses)) < TOL
    for k, t in tp.items():
        assert np.max(np.abs(read(con, k).reshape(t.shape) - t.detach().numpy())) < TOL, k
    logged = con.execute("SELECT epoch, step, loss FROM reldl.training_log ORDER BY step").fetchall()
    assert [r[1] for r in logged] == [1, 2, 3, 4, 5, 6] and [r[0] for r in logged] == [1, 1, 2, 2, 3, 3]
    assert np.allclose([r[2] for r in logged], losses, atol=TOL)


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_sparse_gradients_decay_state_like_dense_torch(optimizer):
    """Rows of a keyed parameter that a batch does not touch have no gradient row; their momentum / moments still
    decay and they still move, exactly as torch does with a dense zero gradient."""
    con = duckdb.connect()
    put(con, "emb", {"k": np.arange(5), "v": [0.5, -1.0, 2.0, 0.0, 1.0]})
    # batch 0 touches keys 0..2, batch 1 keys 2..4 (targets t)
    put(con, "obs", {"rb": [0, 0, 0, 1, 1, 1], "k": [0, 1, 2, 2, 3, 4], "t": [1.0, 0.0, -1.0, 0.5, 2.0, 1.0]})
    e = ad.param("emb", keys=["k"])
    t = ad.table("batch", keys=["rb", "k"], value="t")
    loss = ad.sum(ad.apply("squared_error", e, t))
    batches = Batches("batch", "obs", "rb", size=1, shuffle=False)
    res = minimize(con, loss, optimizer=optimizer, learning_rate=0.1, epochs=3, batches=batches, momentum=0.5)
    p = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([p], lr=0.1) if optimizer == "adam" else torch.optim.SGD([p], lr=0.1, momentum=0.5)
    idx = [torch.tensor([0, 1, 2]), torch.tensor([2, 3, 4])]
    tgt = [torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64), torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)]
    losses = []
    for _ in range(3):
        for b in (0, 1):
            loss_t = ((p[idx[b]] - tgt[b]) ** 2).sum()
            opt.zero_grad()
            loss_t.backward()
            opt.step()
            losses.append(loss_t.item())
    got = np.array([r[0] for r in con.execute("SELECT v FROM emb ORDER BY k").fetchall()])
    assert np.max(np.abs(got - p.detach().numpy())) < TOL
    assert np.max(np.abs(np.array(res.step_losses) - losses)) < TOL
    # key 0 is not in batch 1, yet it moved during batch 1 steps (decaying state): the test would catch a skip
    assert got[0] != pytest.approx(0.5)


def test_full_batch_and_finished_run_is_not_retrained():
    con = duckdb.connect()
    mlp_setup(con)
    con.execute("SET disabled_optimizers = 'expression_rewriter'")
    r1 = minimize(con, mlp_loss("data"), optimizer="sgd", learning_rate=0.1, epochs=2, name="fb")
    # the settings training changes come back: threads, and the optimizer it turns off (build_side_probe_side)
    assert con.execute("SELECT current_setting('disabled_optimizers')").fetchall()[0][0] == "expression_rewriter"
    before = read(con, "w1")
    r2 = minimize(con, mlp_loss("data"), optimizer="sgd", learning_rate=0.1, epochs=2, name="fb")
    assert r1.steps == r2.steps == 2 and r2.step_losses == [] and r2.losses == r1.losses
    assert np.array_equal(read(con, "w1"), before)
    r3 = minimize(con, mlp_loss("data"), optimizer="sgd", learning_rate=0.1, epochs=4, name="fb")  # more epochs
    assert r3.epochs == 4 and r3.resumed_from == 2 and len(r3.step_losses) == 2 and r3.losses[-1] < r1.losses[0]


def test_errors():
    con = duckdb.connect()
    mlp_setup(con)
    with pytest.raises(TrainingError, match="unknown optimizer 'rmsprop'"):
        minimize(con, mlp_loss("data"), optimizer="rmsprop")
    with pytest.raises(TrainingError, match="learning_rate must be positive"):
        minimize(con, mlp_loss("data"), learning_rate=0)
    with pytest.raises(TrainingError, match="epochs must be a non-negative integer"):
        minimize(con, mlp_loss("data"), epochs=-1)
    q = ad.param("SELECT [1.0, 2.0] AS v", shape=(2,))
    with pytest.raises(TrainingError, match="must be a table name"):
        minimize(con, ad.sum(ad.apply("tile_sum", ad.apply("square", q))))
    minimize(con, mlp_loss("data"), optimizer="sgd", epochs=1, name="r")
    with pytest.raises(TrainingError, match="exists with other settings"):
        minimize(con, mlp_loss("data"), optimizer="adam", epochs=1, name="r")
    before = read(con, "w1")
    con.execute("CREATE TABLE broken AS SELECT 1 AS rb, [1.0] AS x, [0.0] AS y")  # tiles of the wrong length
    with pytest.raises(TrainingError, match="training:"):
        minimize(con, mlp_loss("broken"), optimizer="sgd", epochs=1, name="bad")
    assert np.array_equal(read(con, "w1"), before)  # the failed epoch was rolled back
    assert con.execute("SELECT count(*) FROM reldl.training_log WHERE name = 'bad'").fetchall()[0][0] == 0


def test_plot(tmp_path):
    con = duckdb.connect()
    mlp_setup(con)
    minimize(con, mlp_loss("data"), optimizer="sgd", epochs=2, name="p")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(TrainingError, match="needs matplotlib"):
            train.plot_loss(con, "p", tmp_path / "loss.png")
        return
    out = train.plot_loss(con, "p", tmp_path / "loss.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_create_model_draws_the_loss_curve_on_request(tmp_path):
    pytest.importorskip("matplotlib")
    con = reldl.connect()
    con.execute("CREATE TABLE pts AS SELECT i::DOUBLE AS a, (i % 3)::DOUBLE AS b, (i % 2) AS y FROM range(40) t(i)")
    png = tmp_path / "curve.png"
    con.execute(
        f"CREATE MODEL lr OPTIONS (model_type = 'logistic_reg', label = 'y', epochs = 2, batch_size = 20, "
        f"plot = '{png}') AS SELECT a, b, y FROM pts"
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    con.close()


CREATE_SQL = (
    "CREATE MODEL m OPTIONS (model_type = 'mlp', label = 'y', hidden_units = [4], optimizer = 'adam', "
    "learning_rate = 0.05, epochs = 3, batch_size = 10, tile_rows = 5) AS SELECT a, b, c, y FROM pts"
)
KILLED = textwrap.dedent(
    """
    import os, sys
    import reldl
    from reldl.autodiff import models
    stop = int(sys.argv[2])
    def hook(epoch, step, loss):
        if step == stop:
            os._exit(3)  # no cleanup, no commit: like a killed process
    models.after_step = hook
    con = reldl.connect(sys.argv[1])
    con.execute(sys.argv[3])
    con.close()
    """
)


def _data(db: Path) -> None:
    con = duckdb.connect(str(db))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 3))
    put(con, "pts", {"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "y": (x.sum(1) > 0).astype(np.int64)})
    con.close()


def _script(tmp_path: Path, db: Path, stop: int) -> subprocess.CompletedProcess:
    script = tmp_path / "train_job.py"
    script.write_text(KILLED)
    _data(db)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, str(script), str(db), str(stop), CREATE_SQL]
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def _train_here(db: Path) -> None:
    import reldl

    with reldl.connect(str(db)) as con:
        con.execute(CREATE_SQL)


def _state(db: Path) -> tuple[dict, list]:
    """The model's tables (name -> rows) and the training log of a database."""
    con = duckdb.connect(str(db), read_only=True)
    tables = sorted(
        r[0]
        for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'reldl' AND table_name LIKE 'm_m_%'"
        ).fetchall()
    )
    out = {t: con.execute(f'SELECT * FROM reldl."{t}" ORDER BY ALL').fetchall() for t in tables}
    log = con.execute("SELECT epoch, step, loss FROM reldl.training_log ORDER BY step").fetchall()
    con.close()
    return out, log


def _by_role(tables: dict) -> dict:
    """Parameter and optimizer tables keyed by role (w0, w0__opt, ...), without the spec hash in their names."""
    return {t.split("__", 1)[1]: rows for t, rows in tables.items() if "__" in t and not t.endswith("__data")}


def test_resume_after_kill_gives_identical_parameters(tmp_path):
    """Killed in the middle of epoch 2 (step 5 of 3 x 3), then run again: the same parameters as an uninterrupted
    run, and each step logged once."""
    killed = _script(tmp_path, tmp_path / "killed.db", stop=5)
    assert killed.returncode == 3, killed.stderr
    con = duckdb.connect(str(tmp_path / "killed.db"))
    assert con.execute("SELECT epoch, step FROM reldl.training_runs").fetchall() == [(1, 3)]
    assert con.execute("SELECT count(*) FROM reldl.models").fetchall()[0][0] == 0
    con.close()
    # the killed run's tables hold exactly one whole epoch: the same as a run of 1 epoch (none of step 4's updates)
    _data(tmp_path / "one.db")
    with reldl.connect(str(tmp_path / "one.db")) as one:
        one.execute(CREATE_SQL.replace("epochs = 3", "epochs = 1"))
    after_kill, _ = _state(tmp_path / "killed.db")
    one_epoch, _ = _state(tmp_path / "one.db")
    assert len(_by_role(after_kill)) == 8 and _by_role(after_kill) == _by_role(one_epoch)
    _train_here(tmp_path / "killed.db")  # the statement run again resumes
    _data(tmp_path / "clean.db")
    _train_here(tmp_path / "clean.db")  # uninterrupted

    (p1, log1), (p2, log2) = _state(tmp_path / "killed.db"), _state(tmp_path / "clean.db")
    assert list(p1) == list(p2) and len(p1) == 9  # data, 4 parameters, 4 optimizer states
    assert p1 == p2  # bit-identical parameters and optimizer state
    assert [r[1] for r in log1] == list(range(1, 10)) and log1 == log2


def test_training_under_memory_limit(tmp_path):
    """128 MiB of data under a 32 MiB DuckDB memory_limit: each step reads a mini-batch of row blocks from disk, and
    commits on its own, so memory stays flat across the epoch's steps.

    DuckDB scans a list column a vector (2,048 rows) at a time, whatever the filter, so a scan holds about
    2,048 x tile bytes: out of core needs small tiles (here 16 x 16 doubles, 2 KiB)."""
    con = duckdb.connect(str(tmp_path / "big.db"), config={"temp_directory": str(tmp_path)})
    m, d, nb = 16, 16, 65536  # 65,536 blocks of 16 x 16 doubles
    con.execute(
        "CREATE TABLE data AS SELECT rb, list_transform(range(?), lambda i: sin(rb * 7 + i * 0.37)) AS x, "
        "list_transform(range(?), lambda i: (rb * 3 + i) % 2 * 1.0) AS y FROM range(?) t(rb)",
        [m * d, m, nb],
    )
    assert con.execute("SELECT sum(len(x)) * 8 FROM data").fetchall()[0][0] >= 4 * 32 * 2**20
    put(con, "w", {"v": [[0.0] * d]})
    con.execute("CHECKPOINT")
    con.execute("SET memory_limit = '32MB'")
    con.execute("SET threads = 1")  # one scan's vectors in memory at a time
    x = ad.table("batch", keys=["rb"], shape=(m, d), value="x")
    y = ad.table("batch", keys=["rb"], shape=(m, 1), value="y")
    w = ad.param("w", shape=(d, 1))
    loss = ad.sum(ad.apply("tile_sum", ad.apply("bce_logits", ad.matmul(x, w), y)))
    batches = Batches("batch", "data", "rb", size=2048, shuffle=False)
    res = minimize(con, loss, optimizer="sgd", learning_rate=1e-5, epochs=1, batches=batches, name="big")
    assert res.epochs == 1 and res.steps == 32
    assert res.step_losses[0] == pytest.approx(2048 * m * np.log(2.0))  # w = 0: every logit is 0
    assert con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0] in ("30.5 MiB", "32.0 MiB")
    # the same SGD in numpy, batch by batch, on the same data: out of core changes nothing
    rb, i = np.arange(nb)[:, None], np.arange(m * d)[None, :]
    xs = np.sin(rb * 7 + i * 0.37).reshape(nb * m, d)
    ys = ((rb * 3 + np.arange(m)[None, :]) % 2 * 1.0).reshape(nb * m)
    w_ref = np.zeros(d)
    for b in range(32):
        xb, yb = xs[b * 2048 * m : (b + 1) * 2048 * m], ys[b * 2048 * m : (b + 1) * 2048 * m]
        w_ref -= 1e-5 * xb.T @ (1 / (1 + np.exp(-(xb @ w_ref))) - yb)
    assert np.max(np.abs(read(con, "w").ravel() - w_ref)) < 1e-9 * max(1.0, np.abs(w_ref).max())


def test_keep_freed_memory_while_training_restores_the_allocator():
    """glibc keeps freed memory while training (fewer page faults per step) and gets its defaults back after."""
    import platform

    from reldl.autodiff.train import keep_freed_memory_while_training

    restore = keep_freed_memory_while_training()
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        assert restore is None
        return
    assert callable(restore)
    buf = np.ones(8 << 20)  # 64 MB allocated and freed under the setting
    del buf
    restore()
