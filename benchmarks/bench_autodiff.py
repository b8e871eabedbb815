"""Relational autodiff training vs PyTorch: seconds per epoch, same data, same model, same batches, same machine.

    python benchmarks/bench_autodiff.py                  # MLP on 1M x 256, GCN on a 1M-node graph
    python benchmarks/bench_autodiff.py --quick          # 100k rows / nodes
    python benchmarks/bench_autodiff.py --memory-limit 512MB   # the MLP with DuckDB's memory_limit below the data

MLP: 256 features -> 64 (relu) -> 10 classes, softmax cross-entropy, SGD, batches of 16 row blocks of 1024 rows
(`--block`, `--batch-blocks`: the tile-size knob), in float64 on both sides (DuckDB tiles are DOUBLE[]); PyTorch
float32 is shown as well. The sides run their epochs in turn (reldl, PyTorch f64, PyTorch f32, reldl, ...: `--epochs`
rounds, default 3, training on from epoch to epoch), so a burst of other load on a shared machine hits one round, not
one side; the table gives median seconds per epoch and the median of the per-round ratios.
GCN: 2 layers (16 -> 16 -> 4), symmetric-normalized adjacency with self loops (average degree 5 + 1), full-batch
SGD, one step per epoch; PyTorch uses torch.sparse.mm. Prints a table and writes JSON (default
benchmarks/out/autodiff.json).
"""

from __future__ import annotations

import os

# DuckDB's bundled jemalloc (read once, when duckdb loads): freed pages stay for reuse for 10 s, and large allocations
# use the ordinary arenas rather than the one that hands them back at once. Every training step scans a 32 MB batch of
# tiles and hashes it for a join; without this, each step faulted ~10k fresh pages in (MLP: ~200 -> ~170 ms a step on
# the 2-core machine). Set DUCKDB_JE_MALLOC_CONF yourself (empty: jemalloc's defaults) to override.
os.environ.setdefault("DUCKDB_JE_MALLOC_CONF", "oversize_threshold:1073741824,dirty_decay_ms:10000,muzzy_decay_ms:0")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import duckdb  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import sqlglot  # noqa: E402
import torch  # noqa: E402

from reldl import autodiff as ad  # noqa: E402
from reldl.autodiff.train import Batches, minimize  # noqa: E402


def put(con, name: str, cols: dict) -> None:
    con.register("__bench", pa.table(cols))
    con.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM __bench")
    con.unregister("__bench")


def put_param(con, name: str, arr: np.ndarray) -> None:
    put(con, name, {"v": pa.array([arr.ravel().tolist()], pa.list_(pa.float64()))})


def limited(con, args) -> None:
    """The memory limit applies to training, after the data is loaded and checkpointed to disk."""
    if args.memory_limit:
        con.execute("CHECKPOINT")
        con.execute(f"SET memory_limit = '{args.memory_limit}'")


def median_step(stamps: list[float], start: float) -> float:
    """The median time between consecutive step ends (the first step from ``start``): per-step time that a burst of
    other load on the machine during a few steps does not move, unlike the epoch's mean."""
    return float(np.median(np.diff([start, *stamps]))) if stamps else 0.0


def reldl_epochs(con, loss, args, name: str, batches: Batches | None = None):
    """A function running one more SGD epoch of the run per call (``minimize`` resumes it), timed: the benchmark
    calls it in turn with PyTorch's epochs, so both sides see the same moments of a shared machine."""
    done = 0

    def epoch() -> dict:
        nonlocal done
        stamps: list[float] = []
        start = time.perf_counter()
        res = minimize(
            con,
            loss,
            optimizer="sgd",
            learning_rate=args.lr,
            epochs=done + 1,
            batches=batches,
            name=name,
            resume=done > 0,
            progress=False,
            on_step=lambda epoch, step, loss: stamps.append(time.perf_counter()),  # before the step's commit
        )
        done += 1
        return {
            "seconds": res.seconds_per_epoch,  # the epoch's steps and its commit (as in a multi-epoch run)
            "call_seconds": time.perf_counter() - start,  # + building the program and the run's bookkeeping
            "loss": res.losses[-1],
            "steps": len(stamps),
            "median_step_s": median_step(stamps, start),
        }

    return epoch


def init(rng, *shape) -> np.ndarray:
    return rng.normal(size=shape) / np.sqrt(shape[0])


# ---------------------------------------------------------------------------------------------------------------------
# MLP


def mlp_data(rows: int, feats: int, classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, feats))
    w = rng.normal(size=(feats, classes))
    y = np.argmax(x @ w + rng.normal(size=(rows, classes)), axis=1).astype(np.float64)
    return x, y


def mlp_reldl(con, x, y, p, args) -> dict:
    block, feats, hidden, classes = args.block, x.shape[1], args.hidden, args.classes
    t = time.perf_counter()
    view = "batch"
    if args.layout == "rows":
        # one data row a tuple: x a DOUBLE[feats] array, y a DOUBLE[1]; rb (block of rows) is the batch key and the
        # table is stored in row order, so a batch (a run of blocks) is one BETWEEN over a contiguous range
        rows = len(x)
        tab = pa.table(
            {
                "rb": pa.array((np.arange(rows) // block).astype(np.int32)),
                "r": pa.array(np.arange(rows, dtype=np.int32)),
                "x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), feats),
                "y": pa.FixedSizeListArray.from_arrays(pa.array(y), 1),
            }
        )
        con.register("__bench", tab)
        con.execute("CREATE OR REPLACE TABLE data AS SELECT * FROM __bench")
        con.unregister("__bench")
        keys, xshape, yshape = ["r"], (1, feats), (1,)
        batches = Batches(view=view, source="data", key="rb", size=args.batch_blocks, shuffle=False, contiguous=True)
    else:
        nb = -(-len(x) // block)
        big = len(x) * feats >= 2**31
        xoff = np.minimum(np.arange(nb + 1) * block, len(x)).astype(np.int64) * feats
        xs = pa.ListArray.from_arrays(pa.array(xoff) if big else pa.array(xoff.astype(np.int32)), pa.array(x.ravel()))
        ys = pa.ListArray.from_arrays(
            pa.array((np.minimum(np.arange(nb + 1) * block, len(y))).astype(np.int32)), pa.array(y)
        )
        put(con, "data", {"rb": pa.array(np.arange(nb, dtype=np.int32)), "x": xs, "y": ys})
        con.execute("CREATE INDEX data_rb ON data (rb)")  # each mini-batch reads only its row blocks
        keys, xshape, yshape = ["rb"], (block, feats), (block,)
        batches = Batches(view=view, source="data", key="rb", size=args.batch_blocks, shuffle=False)
    load_s = time.perf_counter() - t
    for name, arr in p.items():
        put_param(con, name, arr)
    limited(con, args)
    xd = ad.table(view, keys=keys, shape=xshape, value="x")
    yd = ad.table(view, keys=keys, shape=yshape, value="y")
    n = ad.sum(ad.table(view, keys=keys, value=sqlglot.parse_one("len(y)"), name="rows"))
    w1, b1 = ad.param("w1", shape=(feats, hidden)), ad.param("b1", shape=(hidden,))
    w2, b2 = ad.param("w2", shape=(hidden, classes)), ad.param("b2", shape=(classes,))
    h = ad.apply("relu", ad.linear(xd, w1, b1))
    logits = ad.linear(h, w2, b2)
    loss = ad.apply("div", ad.sum(ad.apply("tile_sum", ad.apply("softmax_xent", logits, yd))), n)
    return reldl_epochs(con, loss, args, "bench_mlp", batches), load_s


def mlp_torch(x, y, p, args, dtype):
    """One more epoch of the same model, data, batches and SGD per call (see :func:`reldl_epochs`)."""
    torch.manual_seed(0)
    xt, yt = torch.tensor(x, dtype=dtype), torch.tensor(y).long()
    ps = {k: torch.tensor(v, dtype=dtype, requires_grad=True) for k, v in p.items()}
    opt = torch.optim.SGD(list(ps.values()), lr=args.lr)
    rows = args.block * args.batch_blocks

    def epoch() -> dict:
        stamps = []
        start = time.perf_counter()
        total, steps = 0.0, 0
        for s in range(0, len(xt), rows):
            xb, yb = xt[s : s + rows], yt[s : s + rows]
            z = torch.relu(xb @ ps["w1"] + ps["b1"]) @ ps["w2"] + ps["b2"]
            loss = torch.nn.functional.cross_entropy(z, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
            stamps.append(time.perf_counter())
        return {
            "seconds": time.perf_counter() - start,
            "loss": total / steps,
            "steps": steps,
            "median_step_s": median_step(stamps, start),
        }

    return epoch


# ---------------------------------------------------------------------------------------------------------------------
# GCN


def gcn_data(nodes: int, degree: int, feats: int, classes: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    src = np.repeat(np.arange(nodes), degree)
    dst = rng.integers(0, nodes, size=nodes * degree)
    i = np.concatenate([src, dst, np.arange(nodes)])  # undirected + self loops
    j = np.concatenate([dst, src, np.arange(nodes)])
    key = np.unique(i.astype(np.int64) * nodes + j)
    i, j = (key // nodes).astype(np.int32), (key % nodes).astype(np.int32)
    deg = np.bincount(i, minlength=nodes).astype(np.float64)
    a = 1.0 / np.sqrt(deg[i] * deg[j])
    x = rng.normal(size=(nodes, feats))
    y = rng.integers(0, classes, size=nodes).astype(np.float64)
    return i, j, a, x, y


def gcn_reldl(con, g, p, args) -> dict:
    i, j, a, x, y = g
    t = time.perf_counter()
    put(con, "adj", {"i": i, "j": j, "v": a})
    feats = x.shape[1]
    put(
        con,
        "feat",
        {
            "j": pa.array(np.arange(len(x), dtype=np.int32)),
            "v": pa.ListArray.from_arrays(
                pa.array((np.arange(len(x) + 1) * feats).astype(np.int32)), pa.array(x.ravel())
            ),
            "y": pa.array(y),
        },
    )
    load_s = time.perf_counter() - t
    for name, arr in p.items():
        put_param(con, name, arr)
    limited(con, args)
    h, c = args.gcn_hidden, args.gcn_classes
    adj = ad.table("adj", keys=["i", "j"])
    xf = ad.table("feat", keys=["j"], shape=(feats,))
    labels = ad.table("feat", keys=["i"], columns={"i": "j"}, value="y")
    w1, b1 = ad.param("gw1", shape=(feats, h)), ad.param("gb1", shape=(h,))
    w2, b2 = ad.param("gw2", shape=(h, c)), ad.param("gb2", shape=(c,))
    ax = ad.sum(ad.apply("mul", adj, xf), by=["i"])
    h1 = ad.apply("relu", ad.apply("add", ad.matmul(ax, w1), b1))
    ah = ad.sum(ad.apply("mul", adj, ad.rename(h1, {"i": "j"})), by=["i"])
    logits = ad.apply("add", ad.matmul(ah, w2), b2)
    loss = ad.mean(ad.apply("softmax_xent", logits, labels))
    return reldl_epochs(con, loss, args, "bench_gcn"), load_s


def gcn_torch(g, p, args, dtype):
    """One more full-batch SGD step (the GCN's epoch) per call."""
    i, j, a, x, y = g
    n = len(x)
    warnings.filterwarnings("ignore", message="Sparse")
    adj = torch.sparse_coo_tensor(np.stack([i, j]), torch.tensor(a, dtype=dtype), (n, n)).coalesce().to_sparse_csr()
    xt, yt = torch.tensor(x, dtype=dtype), torch.tensor(y).long()
    ps = {k: torch.tensor(v, dtype=dtype, requires_grad=True) for k, v in p.items()}
    opt = torch.optim.SGD(list(ps.values()), lr=args.lr)

    def epoch() -> dict:
        t = time.perf_counter()
        h1 = torch.relu((adj @ xt) @ ps["gw1"] + ps["gb1"])
        z = (adj @ h1) @ ps["gw2"] + ps["gb2"]
        loss = torch.nn.functional.cross_entropy(z, yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"seconds": time.perf_counter() - t, "loss": loss.item(), "steps": 1, "median_step_s": 0.0}

    return epoch


def rounds(sides: dict, epochs: int) -> dict:
    """``epochs`` rounds, each one epoch of every side in turn; per side its epochs and the medians."""
    runs = {name: [] for name in sides}
    for _ in range(epochs):
        for name, epoch in sides.items():
            runs[name].append(epoch())
    out = {}
    for name, rs in runs.items():
        out[name] = {
            "epochs": rs,
            "seconds_per_epoch": float(np.median([r["seconds"] for r in rs])),
            "epoch_losses": [r["loss"] for r in rs],
            "median_step_s": float(np.median([r["median_step_s"] for r in rs])),
        }
    ratios = [r["seconds"] / t["seconds"] for r, t in zip(runs["reldl"], runs["torch_f64"])]
    out["ratios"] = ratios
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100k rows and nodes")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--nodes", type=int, default=None)
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument(
        "--layout",
        choices=["rows", "tiles"],
        default="rows",
        help="MLP data as one row a tuple (DOUBLE[features] arrays, contiguous batches) or as row-block tiles "
        "(DOUBLE[] lists of --block rows, batches through an index)",
    )
    ap.add_argument("--block", type=int, default=1024, help="rows per batch key (rows) or per tile (tiles)")
    ap.add_argument("--batch-blocks", type=int, default=16, help="row blocks per SGD step")
    ap.add_argument("--gcn-features", type=int, default=16)
    ap.add_argument("--gcn-hidden", type=int, default=16)
    ap.add_argument("--gcn-classes", type=int, default=4)
    ap.add_argument("--degree", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=3, help="epochs of each side, run in turn (the table: medians)")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--memory-limit", default=None, help="DuckDB memory_limit for the reldl runs, e.g. 512MB")
    ap.add_argument("--skip", choices=["mlp", "gcn"], action="append", default=[])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/autodiff.json"))
    args = ap.parse_args()
    rows = args.rows or (100_000 if args.quick else 1_000_000)
    nodes = args.nodes or (100_000 if args.quick else 1_000_000)
    torch.set_num_threads(os.cpu_count() or 1)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result: dict = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "args": config,
        "duckdb_je_malloc_conf": os.environ.get("DUCKDB_JE_MALLOC_CONF"),
    }
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        con = duckdb.connect(str(Path(tmp) / "bench.duckdb"))
        con.execute(f"SET temp_directory = '{Path(tmp) / 'spill'}'")
        ad.install(con)
        rng = np.random.default_rng(0)
        if "mlp" not in args.skip:
            x, y = mlp_data(rows, args.features, args.classes)
            p = {
                "w1": init(rng, args.features, args.hidden),
                "b1": np.zeros(args.hidden),
                "w2": init(rng, args.hidden, args.classes),
                "b2": np.zeros(args.classes),
            }
            reldl, load_s = mlp_reldl(con, x, y, p, args)
            sides = {
                "reldl": reldl,
                "torch_f64": mlp_torch(x, y, p, args, torch.float64),
                "torch_f32": mlp_torch(x, y, p, args, torch.float32),
            }
            res = rounds(sides, args.epochs)
            res["reldl"]["load_s"] = load_s
            data_mb = x.nbytes / 2**20
            result["mlp"] = {"rows": rows, "data_mb": data_mb, **res}
            table.append((f"MLP {rows:,} x {args.features}", res))
            con.execute("RESET memory_limit")
            del x, y, sides
        if "gcn" not in args.skip:
            g = gcn_data(nodes, args.degree, args.gcn_features, args.gcn_classes)
            p = {
                "gw1": init(rng, args.gcn_features, args.gcn_hidden),
                "gb1": np.zeros(args.gcn_hidden),
                "gw2": init(rng, args.gcn_hidden, args.gcn_classes),
                "gb2": np.zeros(args.gcn_classes),
            }
            reldl, load_s = gcn_reldl(con, g, p, args)
            sides = {
                "reldl": reldl,
                "torch_f64": gcn_torch(g, p, args, torch.float64),
                "torch_f32": gcn_torch(g, p, args, torch.float32),
            }
            res = rounds(sides, args.epochs)
            res["reldl"]["load_s"] = load_s
            result["gcn"] = {"nodes": nodes, "edges": len(g[0]), **res}
            table.append((f"GCN {nodes:,} nodes, {len(g[0]):,} edges", res))
        con.close()
    print(f"bench_autodiff: {result['cpus']} CPUs, epochs={args.epochs}, memory_limit={args.memory_limit}")
    head = ("case", "reldl s/epoch", "torch f64", "ratio", "torch f32", "loss reldl", "loss torch")
    print(f"{head[0]:40} {head[1]:>14} {head[2]:>10} {head[3]:>7} {head[4]:>10} {head[5]:>11} {head[6]:>11}")
    for name, res in table:
        r, t64, t32 = res["reldl"], res["torch_f64"], res["torch_f32"]
        ratio = float(np.median(res["ratios"]))
        print(
            f"{name:40} {r['seconds_per_epoch']:14.2f} {t64['seconds_per_epoch']:10.2f} {ratio:6.1f}x "
            f"{t32['seconds_per_epoch']:10.2f} {r['epoch_losses'][-1]:11.5f} {t64['epoch_losses'][-1]:11.5f}"
        )
        print(f"{'  ratio per epoch':40} {' '.join(f'{x:.2f}x' for x in res['ratios'])}")
        if t64.get("median_step_s"):
            print(
                f"{'  median step (ms)':40} {r['median_step_s'] * 1e3:14.1f} {t64['median_step_s'] * 1e3:10.1f} "
                f"{r['median_step_s'] / t64['median_step_s']:6.1f}x {t32['median_step_s'] * 1e3:10.1f}"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
