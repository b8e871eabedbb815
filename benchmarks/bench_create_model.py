"""CREATE MODEL through SQL (the user path of relational training): seconds for the whole statement, on a given
number of rows, against PyTorch float64 training the same MLP for the same epochs on the same machine.

    python benchmarks/bench_create_model.py                 # 300k x 256, mlp [64], batches of 16384, 2 epochs
    python benchmarks/bench_create_model.py --rows 100000 --tile-rows 1024   # smaller shuffle blocks (IN lists)

The statement's time includes reading the SELECT into the model's data table, the epochs' commits, the export and
the registration; "its steps" is the training steps alone (reldl.training_log), comparable with PyTorch's epochs
(its data already a tensor). Prints a table and writes JSON (default benchmarks/out/create_model.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

import reldl


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16384)
    ap.add_argument("--tile-rows", type=int, default=None, help="the shuffle block (default: batch_size)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/create_model.json"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.rows, args.features))
    y = np.argmax(x @ rng.normal(size=(args.features, args.classes)), axis=1)
    con = reldl.connect()
    cur = con.cursor()
    duck = cur.duckdb_cursor
    duck.register("__bench", pa.table({**{f"f{i}": x[:, i] for i in range(args.features)}, "y": y}))
    duck.execute("CREATE TABLE pts AS SELECT * FROM __bench")
    duck.unregister("__bench")
    tile = f", tile_rows = {args.tile_rows}" if args.tile_rows else ""
    sql = (
        f"CREATE OR REPLACE MODEL m OPTIONS (model_type = 'mlp', label = 'y', hidden_units = [{args.hidden}], "
        f"optimizer = 'sgd', learning_rate = 0.1, batch_size = {args.batch_size}, epochs = {args.epochs}, "
        f"shuffle = false{tile}) AS SELECT * FROM pts"
    )
    reldl_s, steps_s = [], []
    for _ in range(args.repeat):
        t = time.perf_counter()
        cur.execute(sql)
        reldl_s.append(time.perf_counter() - t)
        # the training steps alone (reldl.training_log: each step's seconds), the rest being data preparation,
        # epoch commits, export and registration
        run = duck.execute("SELECT name FROM reldl.training_runs ORDER BY updated_at DESC LIMIT 1").fetchall()[0][0]
        logged = duck.execute("SELECT sum(seconds) FROM reldl.training_log WHERE name = ?", [run]).fetchall()[0][0]
        steps_s.append(float(logged))
    xt, yt = torch.tensor(x), torch.tensor(y)
    torch_s = []
    for _ in range(args.repeat):
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Linear(args.features, args.hidden), torch.nn.ReLU(), torch.nn.Linear(args.hidden, args.classes)
        ).double()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        t = time.perf_counter()
        for _ in range(args.epochs):
            for s in range(0, args.rows, args.batch_size):
                loss = torch.nn.functional.cross_entropy(net(xt[s : s + args.batch_size]), yt[s : s + args.batch_size])
                opt.zero_grad()
                loss.backward()
                opt.step()
        torch_s.append(time.perf_counter() - t)
    best_r, best_s, best_t = min(reldl_s), min(steps_s), min(torch_s)
    print(f"{'case':<44} {'statement s':>12} {'its steps s':>12} {'torch f64 s':>12} {'steps / torch':>14}")
    case = f"CREATE MODEL mlp {args.rows:,} x {args.features}, {args.epochs} epochs"
    print(f"{case:<44} {best_r:12.2f} {best_s:12.2f} {best_t:12.2f} {best_s / best_t:13.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(
        machine=platform.machine(),
        args={k: str(v) for k, v in vars(args).items()},
        sql=sql,
        reldl_statement_s=reldl_s,
        reldl_steps_s=steps_s,
        torch_f64_s=torch_s,
        steps_ratio_best=best_s / best_t,
    )
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
