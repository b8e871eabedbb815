"""The cost model: seconds and bytes for each plan family, from row estimates, model size and machine constants.

Constants are rates measured by `reldl calibrate` (stored in `reldl.calibration`); the defaults below are what
the 2-core development machine measured, so estimates are sensible before calibration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULTS: dict[str, float] = {
    "torch_cpu_flops": 4.0e10,  # dense float32 matmul FLOP/s on the CPU
    "torch_cuda_flops": 2.0e13,  # on a GPU
    "sql_flops": 8.0e8,  # multiply-adds per second and DuckDB thread of list_dot_product (relation-centric)
    "udf_chunk_seconds": 4.0e-5,  # fixed cost of one UDF call (one DuckDB chunk: Arrow in, Arrow out)
    "row_seconds": 2.5e-7,  # moving one row through DuckDB (scan, temp table, join back)
    "udf_row_seconds": 1.2e-6,  # one row through a Python Arrow UDF (conversion, grouping; bench_planner)
    "model_call_seconds": 2.0e-3,  # one call of a model UDF: catalog and model lookup, tensors (bench_planner)
    "dl_fixed_seconds": 2.0e-2,  # DL plan set-up: estimate, input query, Arrow registration, rewritten statement
    "relation_fixed_seconds": 2.5e-2,  # relation plan set-up: weight tables, CTE chain
    "relation_row_seconds": 2.5e-6,  # per input row of the relation plan (joins, re-assembly; bench_planner)
    "relation_value_seconds": 3.0e-8,  # per activation value it builds as a list element
    "relation_group_seconds": 3.0e-7,  # per (row, unit) partial sum of a tiled layer (join + GROUP BY, may spill)
    "llm_step_seconds_cpu": 1.0e-2,  # one decode step of a small model at batch 64 on the CPU
    "llm_step_seconds_cuda": 2.0e-3,  # on a GPU
}

CHUNK_ROWS = 2048  # DuckDB's vector size: the UDF plan sees rows in chunks of this many


@dataclass
class Workload:
    """What a statement asks of a model."""

    function: str  # predict | predict_proba | llm_generate | llm_score
    rows: float  # rows reaching the model call (estimate)
    distinct: float  # distinct argument tuples among them (estimate, <= rows)
    rows_needed: float | None  # when a LIMIT lets a streaming plan stop early: rows it must process
    flops_per_row: float = 0.0
    weight_bytes: float = 0.0
    activation_bytes_per_row: float = 0.0
    max_tokens: int = 0
    device: str = "cpu"
    memory_limit: float = float("inf")  # bytes available to the DL plan's working set
    scanned: float = 0.0  # rows the statement scans before its filters (0: same as rows); sets the UDF call count
    relation_ok: bool = False  # the model can run as SQL (tabular models)
    relation_threads: float = 1.0  # DuckDB threads the relation query runs on (1 when memory is tight)
    relation_bytes: float = 0.0  # its working set in DuckDB: whole-row matrices held + per-thread vectors
    relation_tiled_values: float = 0.0  # per row: (row, unit) partial sums of its tiled layers
    distinct_source: str = ""  # how `distinct` was estimated (EXPLAIN shows it)
    # offloaded LLMs (reldl/llm/offload): seconds per prompt at a full block, and of the smallest engine call (the
    # weights stream through every step however few prompts run): replace the llm_step_seconds model
    row_seconds: float | None = None
    call_seconds: float | None = None


@dataclass
class Estimate:
    family: str
    seconds: float
    feasible: bool = True
    note: str = ""
    details: dict[str, float] = field(default_factory=dict)


def _per_row(w: Workload, c: dict[str, float]) -> float:
    if w.row_seconds is not None:
        return w.row_seconds
    if w.function.startswith("llm"):
        step = c["llm_step_seconds_cuda" if w.device.startswith("cuda") else "llm_step_seconds_cpu"]
        return max(w.max_tokens, 1) * step / 64.0
    rate = c["torch_cuda_flops" if w.device.startswith("cuda") else "torch_cpu_flops"]
    return w.flops_per_row / rate


def _drain(w: Workload, c: dict[str, float]) -> float:
    """LLM generation only: the end of each engine call, where the batch empties and decode steps run part-full
    (about half the steps of one generation). A UDF plan pays it once per chunk, a DL plan once."""
    if not w.function.startswith("llm"):
        return 0.0
    if w.call_seconds is not None:
        return w.call_seconds
    step = c["llm_step_seconds_cuda" if w.device.startswith("cuda") else "llm_step_seconds_cpu"]
    return 0.5 * max(w.max_tokens, 1) * step


def estimate(w: Workload, constants: dict[str, float] | None = None) -> list[Estimate]:
    c = {**DEFAULTS, **(constants or {})}
    per_row = _per_row(w, c)
    drain = _drain(w, c)
    out: list[Estimate] = []

    # DL-centric: every distinct input row, in one large batch, then a join back.
    dl_bytes = 2 * w.weight_bytes + w.distinct * w.activation_bytes_per_row  # float32 file, float64 in memory
    dl = Estimate(
        "dl",
        c["dl_fixed_seconds"] + drain + w.distinct * per_row + (w.rows + w.distinct) * c["row_seconds"],
        details={"working_set_bytes": dl_bytes},
    )
    if dl_bytes > w.memory_limit:
        dl.feasible = False
        dl.note = f"working set {dl_bytes / 2**20:.0f} MiB exceeds the memory limit {w.memory_limit / 2**20:.0f} MiB"
    out.append(dl)

    # UDF-centric: streams chunks; stops early under a LIMIT; deduplicates within a chunk and across (cache).
    processed = w.rows if w.rows_needed is None else min(w.rows, w.rows_needed)  # DuckDB pushes LIMIT down
    # DuckDB calls the UDF once per scanned chunk, however few of its rows pass the filters
    selectivity = min(1.0, w.rows / w.scanned) if w.scanned > 0 else 1.0
    # the LLM functions remember results across a query's chunks; predict computes every row it is given
    model_rows = min(processed, w.distinct) if w.function.startswith("llm") else processed
    chunks = max(1.0, processed / max(selectivity, 1e-9) / CHUNK_ROWS)
    udf_bytes = 2 * w.weight_bytes + min(processed, CHUNK_ROWS) * w.activation_bytes_per_row
    udf = Estimate(
        "udf",
        chunks * (c["udf_chunk_seconds"] + c["model_call_seconds"] + drain)
        + model_rows * per_row
        + processed * (c["row_seconds"] + c["udf_row_seconds"]),
        details={"working_set_bytes": udf_bytes},
    )
    if udf_bytes > w.memory_limit:
        udf.feasible = False
        udf.note = f"weights and one chunk need {udf_bytes / 2**20:.0f} MiB, over the memory limit"
    out.append(udf)

    # Relation-centric: the model as SQL; whole-row layers stream, tiled layers join and aggregate (and spill).
    if w.relation_ok:
        rel = Estimate(
            "relation",
            c["relation_fixed_seconds"]
            + w.distinct
            * (
                (w.flops_per_row / 2) / (c["sql_flops"] * max(w.relation_threads, 1.0))
                + c["relation_row_seconds"]
                + (w.activation_bytes_per_row / 8) * c["relation_value_seconds"]
                + w.relation_tiled_values * c["relation_group_seconds"]
            ),
            note="tiled layers spill to disk under memory pressure",
            details={"working_set_bytes": w.relation_bytes},
        )
        if w.relation_bytes > w.memory_limit:
            rel.feasible = False
            rel.note = (
                f"whole-row matrices and per-thread vectors need {w.relation_bytes / 2**20:.0f} MiB, over the "
                "memory limit"
            )
        out.append(rel)
    return out


def choose(estimates: list[Estimate]) -> tuple[Estimate, str]:
    """The cheapest feasible plan, and why."""
    feasible = [e for e in estimates if e.feasible]
    if not feasible:
        spills = [e for e in estimates if e.family == "relation"]
        if spills:  # its estimate is the least certain, and DuckDB spills what it can
            return spills[0], "no plan fits the memory limit by the estimates; relation-centric, which can spill"
        best = min(estimates, key=lambda e: e.seconds)
        return best, "no plan fits the memory limit; running the cheapest anyway"
    order = {"udf": 0, "dl": 1, "relation": 2}  # on a tie, the plan that streams and rewrites nothing
    best = min(feasible, key=lambda e: (e.seconds, order.get(e.family, 3)))
    others = [e for e in estimates if e is not best]
    why = [f"lowest estimated cost ({best.seconds:.3g} s)"]
    for e in others:
        why.append(f"{e.family}: {'infeasible, ' + e.note if not e.feasible else f'{e.seconds:.3g} s'}")
    return best, "; ".join(why)
