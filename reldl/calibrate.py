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


def calibrate(
    duck: duckdb.DuckDBPyConnection, out: Callable[[str], None] = print, offload: bool = True
) -> dict[str, float]:
    """Measure the constants that can be measured in isolation (each the median of three rounds), store (one row
    per constant) the ones whose rounds agree within MAX_SPREAD, and return those. A noisy measurement (a busy
    machine) leaves the stored value, or the default, in place. The other constants (UDF per-row and per-call
    costs, plan set-up times, the relation plan's per-row cost, LLM step times) keep the values fitted by
    benchmarks/bench_planner.py. `offload`: also measure the offload hardware (`calibrate_offload`)."""
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
    if offload:
        measured.update(calibrate_offload(duck, out))
    return measured


# the offload hardware (reldl/llm/offload/policy.py Hardware) needs a CUDA device for these fields
OFFLOAD_GPU_FIELDS = (
    "gpu_mem",
    "ctog_bw",
    "gtoc_bw",
    "gpu_flops",
    "gpu_mem_bw",
    "gpu_q4_bw",
    "gpu_attn_flops",
    "host_call_s",
    "host_segment_s",
)


def measure_offload(quick: bool = True, disk_path: str | None = None) -> tuple[dict[str, float], list[str]]:
    """The offload search's Hardware fields measurable here (quick: 32 MiB transfers, small matmuls) as
    `Hardware.to_calibration` keys, and the fields skipped. Without CUDA: capacities of RAM and disk, disk
    bandwidths, CPU attention rate; the GPU side is skipped."""
    import os
    import shutil
    import tempfile

    import torch

    from reldl.llm.offload import policy

    if torch.cuda.is_available():
        return policy.Hardware.measure("cuda", disk_path, quick).to_calibration(), []
    size = (32 << 20) if quick else (256 << 20)
    dtoc, ctod = policy.measure_disk(disk_path, size)
    fields = {
        "cpu_mem": float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
        "disk_mem": float(shutil.disk_usage(disk_path or tempfile.gettempdir()).free),
        "dtoc_bw": dtoc,
        "ctod_bw": ctod,
        "cpu_attn_flops": policy.measure_attention("cpu", batch=2 if quick else 8, ctx=512 if quick else 1024),
    }
    return {f"offload_{k}": v for k, v in fields.items()}, list(OFFLOAD_GPU_FIELDS)


def calibrate_offload(
    duck: duckdb.DuckDBPyConnection,
    out: Callable[[str], None] = print,
    quick: bool = True,
    disk_path: str | None = None,
    measure: Callable[..., tuple[dict[str, float], list[str]]] | None = None,
) -> dict[str, float]:
    """Measure the offload hardware (`measure_offload`, one quick round: transfers and disk vary more than the
    planner's constants, and the policy search only ranks policies by them) and store it under `offload_*` keys,
    which CREATE MODEL ... offload = 'auto' and EXPLAIN read. Returns what was stored."""
    duck.execute(SCHEMA)
    values, skipped = (measure or measure_offload)(quick=quick, disk_path=disk_path)
    for key, value in values.items():
        duck.execute("INSERT OR REPLACE INTO reldl.calibration (key, value) VALUES (?, ?)", [key, float(value)])
        out(f"{key:<22} {value:12.4g}   (offload hardware)")
    if skipped:
        out(f"offload: skipped {', '.join(skipped)} (no CUDA GPU: offloaded models plan with defaults for them)")
    return values
