"""Relation-centric MLP inference (planner/relational.py) against torch on the CPU.

    python benchmarks/bench_relational.py --out benchmarks/out/relational.json
    python benchmarks/bench_relational.py --rows 1000,10000 --widths 64,256 --tiles whole,64 --memory-limit 256MB

The model has ``width`` features, one hidden layer of ``width`` units (relu) and one output (identity), in float64.
For each (rows, width, tile) case: torch's forward (``F.linear`` chain on a tensor already in memory, best of
--repeat) against the DuckDB query (``SELECT count(*), sum(list_sum(y)) FROM (forward_query)``, so the time is the
computation, not the transfer of results to Python; best of --repeat), with the weights and inputs already stored
as tables (store time reported apart), and the peak size of DuckDB's spill files during the runs. Every DuckDB run
uses --memory-limit and --threads (torch uses the same number of threads). Cases whose work would exceed --max-pairs
(tiled) or --max-macs (whole rows) are skipped; a run over --timeout seconds is interrupted.

Also reported, purely informational: the largest case that ran under --memory-limit while torch's working set
(weights + input + every layer's output, float64) is over that limit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from reldl.planner import relational as R
from reldl.spill import SpillWatcher


def parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    return int(float(num) * units[t[len(num) :]])


def make_model(width: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dims = [width, width, 1]
    acts = ["relu", "identity"]
    return [
        (
            torch.randn(o, i, generator=g, dtype=torch.float64) / math.sqrt(i),
            torch.randn(o, generator=g, dtype=torch.float64) * 0.1,
            a,
        )
        for i, o, a in zip(dims[:-1], dims[1:], acts)
    ]


def torch_forward(layers, x):
    h = x
    for w, b, act in layers:
        h = F.linear(h, w, b)
        if act == "relu":
            h = torch.relu(h)
    return h


def torch_working_set(layers, rows: int) -> int:
    params = sum(w.numel() + b.numel() for w, b, _ in layers)
    return 8 * (params + rows * (layers[0][0].shape[1] + sum(w.shape[0] for w, _, _ in layers)))


def work(layers, rows: int, tile: int | None) -> tuple[float, float]:
    """(multiply-adds, rows of the tiled joins) of a forward pass."""
    macs = rows * sum(w.numel() for w, _, _ in layers)
    pairs = 0.0
    for w, _, _ in layers:
        n_out, n_in = w.shape
        if tile is not None and tile < n_in:
            pairs += rows * n_out * math.ceil(n_in / tile)
    return macs, pairs


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run_case(rows, width, tile, args, spill_dir) -> dict:
    layers = make_model(width)
    macs, pairs = work(layers, rows, tile)
    rec = dict(
        rows=rows,
        width=width,
        tile="whole" if tile is None else tile,
        params=sum(w.numel() + b.numel() for w, b, _ in layers),
        macs=macs,
        join_rows=pairs,
        torch_ws_bytes=torch_working_set(layers, rows),
    )
    if (tile is not None and pairs > args.max_pairs) or macs > args.max_macs:
        rec["status"] = "skipped"
        return rec
    x = np.random.default_rng(0).standard_normal((rows, width))
    xt = torch.from_numpy(x)
    ref = torch_forward(layers, xt)
    rec["torch_s"] = best_of(lambda: torch_forward(layers, xt), args.repeat)

    con = duckdb.connect(
        config={"memory_limit": args.memory_limit, "threads": args.threads, "temp_directory": str(spill_dir)}
    )
    try:
        try:
            t0 = time.perf_counter()
            R.store_weights(con, "reldl.w_bench", layers, tile=tile)
            rec["store_s"] = time.perf_counter() - t0
            offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int64))
            x_arr = pa.LargeListArray.from_arrays(offsets, pa.array(x.ravel()))
            con.register("__bench_in", pa.table({"rid": np.arange(rows), "x": x_arr}))
            con.execute("CREATE TABLE inp AS SELECT rid, CAST(x AS DOUBLE[]) AS x FROM __bench_in")
            con.unregister("__bench_in")
        except duckdb.OutOfMemoryException as e:
            rec["status"] = "out of memory storing the weights or inputs"
            rec["error"] = str(e).splitlines()[0]
            return rec
        query = R.forward_query("reldl.w_bench", "inp", layers, tile).sql("duckdb")
        sql = f"SELECT count(*), sum(list_sum(y)) FROM ({query})"
        timer = threading.Timer(args.timeout, con.interrupt)
        timer.start()
        try:
            result = []
            with SpillWatcher(spill_dir, interval=0.01) as spill:
                rec["duck_s"] = best_of(lambda: result.append(con.execute(sql).fetchone()), args.repeat)
            rec["spill_peak_bytes"] = spill.peak
            n, total = result[-1]
            rec["status"] = "ok"
            rec["sum_rel_err"] = abs(total - ref.sum().item()) / max(1.0, ref.abs().sum().item())
            assert n == rows
        except duckdb.InterruptException:
            rec["status"] = f"timeout {args.timeout:g}s"
        except duckdb.OutOfMemoryException as e:
            rec["status"] = "out of memory"
            rec["error"] = str(e).splitlines()[0]
        finally:
            timer.cancel()
        rec["duck_vs_torch"] = rec["duck_s"] / rec["torch_s"] if "duck_s" in rec else None
    finally:
        con.close()
    return rec


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.0f}MiB" if n < 2**30 else f"{n / 2**30:.1f}GiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1000,10000,100000")
    ap.add_argument("--widths", default="64,256,1024")
    ap.add_argument("--tiles", default="whole,64", help="comma list: 'whole' (tile=None) or an int")
    ap.add_argument("--memory-limit", default="1GB", help="DuckDB memory_limit for every run (e.g. 256MB, 1GiB)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds before a DuckDB run is interrupted")
    ap.add_argument("--max-macs", type=float, default=3e10, help="skip cases with more multiply-adds")
    ap.add_argument("--max-pairs", type=float, default=1.5e8, help="skip tiled cases with more join rows")
    ap.add_argument("--out", type=Path, default=None, help="JSON results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows_list = [int(r) for r in args.rows.split(",")]
    widths = [int(w) for w in args.widths.split(",")]
    tiles = [None if t.strip() == "whole" else int(t) for t in args.tiles.split(",")]
    limit = parse_size(args.memory_limit)

    records = []
    head = (
        f"{'rows':>7} {'width':>5} {'tile':>5} {'torch ws':>9} {'torch ms':>9} {'duck ms':>9} {'x torch':>8} "
        f"{'Mmac/s':>7} {'store ms':>8} {'spilled':>8}  status"
    )
    print(f"DuckDB {duckdb.__version__}, torch {torch.__version__}, {args.threads} threads, limit {args.memory_limit}")
    print(head)
    print("-" * len(head))
    with tempfile.TemporaryDirectory() as spill_dir:
        for rows in rows_list:
            for width in widths:
                for tile in tiles:
                    rec = run_case(rows, width, tile, args, Path(spill_dir))
                    records.append(rec)
                    ok = rec["status"] == "ok"
                    print(
                        f"{rows:>7} {width:>5} {rec['tile']!s:>5} {fmt_bytes(rec['torch_ws_bytes']):>9} "
                        + (f"{rec['torch_s'] * 1e3:>9.1f} " if "torch_s" in rec else f"{'':>9} ")
                        + (f"{rec['duck_s'] * 1e3:>9.1f} {rec['duck_vs_torch']:>7.1f}x " if ok else f"{'':>9} {'':>8} ")
                        + (f"{rec['macs'] / rec['duck_s'] / 1e6:>7.0f} " if ok else f"{'':>7} ")
                        + (f"{rec['store_s'] * 1e3:>8.1f} " if "store_s" in rec else f"{'':>8} ")
                        + (f"{fmt_bytes(rec['spill_peak_bytes']):>8}  " if "spill_peak_bytes" in rec else f"{'':>8}  ")
                        + rec["status"],
                        flush=True,
                    )
    over = [r for r in records if r["status"] == "ok" and r["torch_ws_bytes"] > limit]
    largest = max(over, key=lambda r: (r["torch_ws_bytes"], r["rows"]), default=None)
    if largest:
        print(
            f"\nlargest case run under memory_limit={args.memory_limit} where torch's working set is over it: "
            f"rows={largest['rows']} width={largest['width']} tile={largest['tile']} "
            f"(torch would hold {fmt_bytes(largest['torch_ws_bytes'])}), {largest['duck_s']:.2f}s in DuckDB"
        )
    else:
        print(f"\nno case ran whose torch working set exceeds memory_limit={args.memory_limit}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            command=" ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            duckdb=duckdb.__version__,
            torch=torch.__version__,
            python=platform.python_version(),
            machine=platform.machine(),
            processor=platform.processor(),
            threads=args.threads,
            memory_limit=args.memory_limit,
        )
        largest_info = (
            {k: largest[k] for k in ("rows", "width", "tile", "torch_ws_bytes", "duck_s")} if largest else None
        )
        args.out.write_text(json.dumps(dict(meta=meta, results=records, largest_over_limit=largest_info), indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
