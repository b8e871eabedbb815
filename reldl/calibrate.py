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


def _one_thread(duck: duckdb.DuckDBPyConnection, fn: Callable[[], float]) -> float:
    saved = duck.execute("SELECT current_setting('threads')").fetchall()[0][0]
    duck.execute("SET threads = 1")
    try:
        return fn()
    finally:
        duck.execute(f"SET threads = {saved}")


def sql_flops(duck: duckdb.DuckDBPyConnection) -> float:
    """Multiply-adds per second and DuckDB thread of the relation-centric plan's inner loop: a 256 x 256 matrix
    (a list of rows) applied to every input row with list_transform + list_dot_product."""
    rows, width = 2000, 256
    duck.execute(
        "CREATE OR REPLACE TEMP TABLE __reldl_cal AS "
        f"SELECT i, list_transform(range({width}), lambda j: random()) AS v FROM range({rows}) t(i)"
    )
    duck.execute(
        f"CREATE OR REPLACE TEMP TABLE __reldl_cal_m AS SELECT list(v) AS m FROM __reldl_cal WHERE i < {width}"
    )
    q = (
        "SELECT sum(list_sum(list_transform(m.m, lambda r: list_dot_product(r, t.v)))) "
        "FROM __reldl_cal AS t CROSS JOIN __reldl_cal_m AS m"
    )
    try:
        secs = _one_thread(duck, lambda: _best(lambda: duck.execute(q).fetchall()))
    finally:
        duck.execute("DROP TABLE IF EXISTS __reldl_cal")
        duck.execute("DROP TABLE IF EXISTS __reldl_cal_m")
    return rows * width * width / secs


def udf_chunk_seconds(duck: duckdb.DuckDBPyConnection) -> float:
    duck.create_function("__reldl_cal_udf", lambda x: x, [BIGINT], BIGINT, type="arrow")
    rows = 2048 * 200
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


MAX_SPREAD = 1.3  # a constant whose rounds differ by more than this factor is noise: not stored
ROUNDS = 3


def _rounds(fn: Callable[[], float], rounds: int = ROUNDS) -> tuple[float, float]:
    """(median, max / min) of a measurement repeated ``rounds`` times (each already a best of 3)."""
    values = sorted(fn() for _ in range(rounds))
    return values[len(values) // 2], values[-1] / values[0]


def calibrate(duck: duckdb.DuckDBPyConnection, out: Callable[[str], None] = print) -> dict[str, float]:
    """Measure the constants that can be measured in isolation (each the median of three rounds), store (one row
    per constant) the ones whose rounds agree within MAX_SPREAD, and return those. A noisy measurement (a busy
    machine) leaves the stored value, or the default, in place. The other constants (UDF per-row and per-call
    costs, plan set-up times, the relation plan's per-row cost, LLM step times) keep the values fitted by
    benchmarks/bench_planner.py."""
    import torch

    probes: dict[str, Callable[[], float]] = {
        "torch_cpu_flops": lambda: torch_flops("cpu"),
        "sql_flops": lambda: sql_flops(duck),
        "udf_chunk_seconds": lambda: udf_chunk_seconds(duck),
        "row_seconds": lambda: row_seconds(duck),
    }
    if torch.cuda.is_available():
        probes["torch_cuda_flops"] = lambda: torch_flops("cuda")
    duck.execute(SCHEMA)
    stored = dict(duck.execute("SELECT key, value FROM reldl.calibration").fetchall())
    measured: dict[str, float] = {}
    for key, probe in probes.items():
        value, spread = _rounds(probe)
        if spread > MAX_SPREAD:
            kept = stored.get(key, DEFAULTS[key])
            out(f"{key:<22} {value:12.4g}   noisy (rounds differ x{spread:.2f}): kept {kept:.4g}")
            continue
        measured[key] = value
        duck.execute("INSERT OR REPLACE INTO reldl.calibration (key, value) VALUES (?, ?)", [key, value])
        out(f"{key:<22} {value:12.4g}   (default {DEFAULTS[key]:.4g}; rounds within x{spread:.2f})")
    return measured
