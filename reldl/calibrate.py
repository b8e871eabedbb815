"""`reldl calibrate`: measure the cost model's constants on this machine and store them in `reldl.calibration`."""

from __future__ import annotations

import time
from collections.abc import Callable

import duckdb
import pyarrow as pa
from duckdb.sqltypes import BIGINT

from reldl.planner.cost import DEFAULTS

SCHEMA = """CREATE TABLE IF NOT EXISTS reldl.calibration (
    key VARCHAR PRIMARY KEY, value DOUBLE NOT NULL, measured_at TIMESTAMP NOT NULL DEFAULT current_timestamp
)"""


def _best(fn: Callable[[], None], repeat: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def torch_flops(device: str) -> float:
    import torch

    n = 1024
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)

    def run():
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return 2 * n**3 / _best(run)


def sql_flops(duck: duckdb.DuckDBPyConnection) -> float:
    """Multiply-adds per second of list_dot_product over DOUBLE[] tiles, the relation-centric plan's inner loop."""
    rows, width = 20_000, 256
    duck.execute(
        "CREATE OR REPLACE TEMP TABLE __reldl_cal AS "
        f"SELECT i, list_transform(range({width}), lambda j: random()) AS v FROM range({rows}) t(i)"
    )
    secs = _best(lambda: duck.execute("SELECT sum(list_dot_product(v, v)) FROM __reldl_cal").fetchall())
    duck.execute("DROP TABLE __reldl_cal")
    return rows * width / secs


def udf_chunk_seconds(duck: duckdb.DuckDBPyConnection) -> float:
    duck.create_function("__reldl_cal_udf", lambda x: x, [BIGINT], BIGINT, type="arrow")
    rows = 2048 * 50
    try:
        secs = _best(lambda: duck.execute(f"SELECT sum(__reldl_cal_udf(i)) FROM range({rows}) t(i)").fetchall())
    finally:
        duck.remove_function("__reldl_cal_udf")
    return secs / (rows / 2048)


def row_seconds(duck: duckdb.DuckDBPyConnection) -> float:
    rows = 1_000_000
    duck.register("__reldl_cal_rows", pa.table({"k": pa.array(range(rows))}))
    try:
        secs = _best(
            lambda: duck.execute(
                f"SELECT count(*) FROM range({rows}) t(i) JOIN __reldl_cal_rows r ON r.k = t.i"
            ).fetchall()
        )
    finally:
        duck.unregister("__reldl_cal_rows")
    return secs / rows


def calibrate(duck: duckdb.DuckDBPyConnection, out: Callable[[str], None] = print) -> dict[str, float]:
    """Measure, store (one row per constant) and return the constants."""
    import torch

    measured = {
        "torch_cpu_flops": torch_flops("cpu"),
        "sql_flops": sql_flops(duck),
        "udf_chunk_seconds": udf_chunk_seconds(duck),
        "row_seconds": row_seconds(duck),
    }
    if torch.cuda.is_available():
        measured["torch_cuda_flops"] = torch_flops("cuda")
    duck.execute(SCHEMA)
    for key, value in measured.items():
        duck.execute("INSERT OR REPLACE INTO reldl.calibration (key, value) VALUES (?, ?)", [key, value])
        out(f"{key:<22} {value:12.4g}   (default {DEFAULTS[key]:.4g})")
    return measured
