"""The planner's choice against every plan forced: does `auto` pick the fastest plan that works?

    python benchmarks/bench_planner.py --out benchmarks/out/planner.json           # full grid (< 8 min, 2 cores)
    python benchmarks/bench_planner.py --quick --out benchmarks/out/planner-quick.json

Cases:

- grid: rows (1k, 20k, 200k) x MLP width (hidden [16], [256], [1024, 1024]; 4 features, 1 output, regression) x
  memory (no limit, 256 MiB, 32 MiB): `SELECT id, predict('<model>', a, b, c, d) AS y FROM t_<rows>`;
- LIMIT: the same statement over 200k rows with `LIMIT 10` (no ORDER BY, so a streaming plan may stop early);
- filter: over 200k rows with `WHERE g = 7` (1%, well estimated by DuckDB) and `WHERE a < 0.01` (1%, not);
- llm_generate with the shipped demo model (greedy, max_tokens := 24, stop := chr(10)) over held-out review
  prompts: all distinct, many duplicates (each of 30 prompts 20 times), and with LIMIT 10.

For each case every plan ('udf', 'dl', 'relation') is forced with `SET reldl_plan` and run once as a warm-up. A
failure is recorded instead of a time: `oom` (torch or DuckDB could not allocate), `timeout` (interrupted after
--timeout seconds, or once it runs 5x as long as the fastest warm-up of the case so far, but never before 10 s: such a
plan cannot be within 10% of the fastest; in memory-limited cases the relation plan instead gets --limited-timeout,
default 600 s, since the question there is whether it finishes at all), `refused` (the planner rejects the forced
plan), `error`. A warm-up that takes longer than --long-run seconds (default 20) is that plan's one timed run (its
time and rows are recorded; minutes of work are warm after their first seconds). Then
`RESET reldl_plan`: EXPLAIN's first line says which plan `auto` chose. Then timed runs of every plan that worked and
of `auto` (whose plan is warm from the forced runs), interleaved round by round so that drift in the machine's speed
hits all alike: best of up to 9 runs each, fewer once a plan's runs add up to --repeat-budget seconds (one run when a
run takes longer). The chosen plan is scored by its forced time against the fastest forced plan (both measured the
same way): within 10% is a hit.

Memory limits: each limited case runs in a fresh process (forked from a preloaded fork server) that warms torch and
DuckDB on a tiny model, then sets DuckDB's `memory_limit` (with `temp_directory` under a temp folder, so DuckDB can
spill). DuckDB enforces that limit itself; torch has none, so every udf or dl run (where the model runs in torch)
also caps the process's data segment (RLIMIT_DATA) at its size when the run starts + the limit + --slack-mib (for
Python, Arrow and DuckDB's own virtual-memory overhead), and the models are unloaded before the warm-up so their
weights load under the cap. A DL-centric plan whose tensors do not fit then fails with torch's allocation error, as on
a machine with that much memory free, instead of silently using more. Relation-centric runs get no RLIMIT: DuckDB's
limit is theirs. A LIMIT case's relation plan, which does the same work as the full statement without a memory limit
(it evaluates every distinct input row), is not run again when that timed out: recorded as a timeout (`inherited`,
marked * in the table). `peak_rss_growth_mib` in the JSON is the RSS high-water mark over the warm-up and
first timed run, above the RSS at the start of each (a lower bound: memory kept from earlier runs is not counted).

Results are checked: every plan (and auto) must give the same rows as the reference (the first plan that finished
without a limit): predict values within 1e-9 relative, llm_generate text identical. Prints a table and a summary;
writes everything, with the machine, versions, calibrated constants and the planner's estimates, to --out as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib
import json
import math
import multiprocessing as mp
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import sqlglot
import torch

import reldl
from reldl import calibrate, planning
from reldl.demo import data as demo_data
from reldl.demo import run as demo_run
from reldl.planner import cost, plans
from reldl.tabular import random_tabular

FAMILIES = ("udf", "dl", "relation")
TORCH_FAMILIES = ("udf", "dl")  # plans whose model runs in torch (no memory limit of its own)
FAMILY_OF = {"UDF-centric": "udf", "DL-centric": "dl", "relation-centric": "relation"}
WIDTHS = {"w16": [16], "w256": [256], "w1024x2": [1024, 1024]}
N_FEATURES = 4
MIB = 2**20
MIN_TIMEOUT = 10.0  # seconds: the shortest a warm-up run is given (see Runner.run_case)
LLM_CALL = "llm_generate(prompt, model := 'demo', max_tokens := 24, stop := chr(10))"
OOM = re.compile(
    r"can't allocate memory|cannot allocate memory|out of memory|outofmemory|memoryerror|bad_alloc|"
    r"failed to allocate|could not allocate|not enough memory|error code 12",
    re.IGNORECASE,
)
# every reldl module a run uses, imported up front (here and, through __main__, in the fork server started at the
# beginning of a run), so that the whole run measures the code as it was when it started
SOURCE_MODULES = [
    "reldl.connection",
    "reldl.planning",
    "reldl.tabular",
    "reldl.catalog",
    "reldl.registry",
    "reldl.udfs.predict",
    "reldl.udfs.llm",
    "reldl.planner.cost",
    "reldl.planner.plans",
    "reldl.planner.relational",
    "reldl.planner.predict_calls",
    "reldl.planner.statements",
    "reldl.llm.engine",
    "reldl.llm.models",
    "safetensors.torch",
    "safetensors.numpy",
]
for _m in SOURCE_MODULES:
    importlib.import_module(_m)
SOURCE_DIRS = ("reldl", "planner", "udfs", "sql")

warnings.filterwarnings("ignore", message="Arrow output on a DB-API result")


# ------------------------------------------------------------------------------------------------------------ setup


def table_sql(name: str, rows: int) -> str:
    """Deterministic features (the same in every process): a uniform in [0, 1) by a multiplicative hash."""
    return (
        f"CREATE OR REPLACE TABLE {name} AS SELECT i AS id, (i % 100)::INTEGER AS g, "
        "((i * 2654435761) % 4294967296) / 4294967296.0 AS a, ((i * 40503) % 65536) / 65536.0 - 0.5 AS b, "
        f"cos(i * 0.37) AS c, (i % 4)::DOUBLE AS d FROM range({rows}) t(i)"
    )


def install_constants(con: reldl.Connection, constants: dict[str, float]) -> None:
    duck = con.duckdb_connection
    duck.execute("SET enable_progress_bar = false")  # DuckDB's own bar for queries over 2 s
    duck.execute(calibrate.SCHEMA)
    for key, value in constants.items():
        duck.execute("INSERT OR REPLACE INTO reldl.calibration (key, value) VALUES (?, ?)", [key, value])


def create_model(con: reldl.Connection, name: str, path: Path | str, model_type: str = "mlp") -> None:
    con.execute(f"CREATE OR REPLACE MODEL {name} OPTIONS (model_type = '{model_type}', path = '{path}')")


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*", text)
    if not m:
        raise ValueError(f"bad size {text!r}")
    units = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    return int(float(m.group(1)) * units[m.group(2)])


def _status_field(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------------ measuring


def normalize(table: pa.Table | None, kind: str):
    """(ids sorted, values in the same order): float64 array for predict (NaN for NULL), list of str for llm."""
    if table is None:
        return None
    ids = np.asarray(table.column(0).to_numpy(zero_copy_only=False), dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    col = table.column(1)
    if kind == "predict":
        values = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)[order]
    else:
        raw = col.to_pylist()
        values = [raw[i] for i in order]
    return ids[order], values


def mismatches(ref, got, kind: str, subset: bool) -> int:
    """Rows of `got` that differ from `ref` (or are missing from it); with subset=False also rows `got` lacks."""
    ref_ids, ref_vals = ref
    ids, vals = got
    pos = np.searchsorted(ref_ids, ids)
    pos = np.minimum(pos, len(ref_ids) - 1) if len(ref_ids) else pos
    found = (len(ref_ids) > 0) & (ref_ids[pos] == ids) if len(ref_ids) else np.zeros(len(ids), bool)
    bad = int((~found).sum())
    idx = pos[found]
    if kind == "predict":
        a, b = np.asarray(vals)[found], ref_vals[idx]
        both_nan = np.isnan(a) & np.isnan(b)
        close = np.abs(a - b) <= 1e-9 * np.maximum(1.0, np.abs(b))
        bad += int((~(close | both_nan)).sum())
    else:
        got_found = [v for v, f in zip(vals, found) if f]
        bad += sum(x != ref_vals[i] for x, i in zip(got_found, idx))
    if not subset:
        bad += len(ref_ids) - int(found.sum())
    return bad


class Runner:
    """Runs one case on a connection: each plan forced (warm-up + timed runs), EXPLAIN, then auto."""

    def __init__(
        self,
        con: reldl.Connection,
        timeout: float,
        budget: float,
        max_repeat: int = 9,
        limit_bytes: int | None = None,
        slack: int = 0,
        relation_timeout: float | None = None,
        long_run: float = float("inf"),
    ):
        self.con = con
        self.cur = con.cursor()  # for the planner's estimates (planning.make_plan)
        self.timeout = timeout
        self.budget = budget
        self.max_repeat = max_repeat
        self.limit_bytes = limit_bytes  # caps udf/dl runs' data segment (see the module docstring)
        self.slack = slack
        self.relation_timeout = relation_timeout  # memory-limited cases: the relation plan's own timeout
        self.long_run = long_run  # a warm-up longer than this is the plan's one timed run

    def capped(self, fam: str) -> bool:
        return self.limit_bytes is not None and fam in TORCH_FAMILIES

    def once(self, sql: str, fam: str, timeout: float | None = None) -> dict:
        fired = threading.Event()

        def interrupt():
            fired.set()
            self.con.duckdb_connection.interrupt()

        timer = threading.Timer(timeout or self.timeout, interrupt)
        timer.start()  # before the cap: the thread's stack is data too
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if self.capped(fam):
            cap = (_status_field("VmData") or 0) + self.limit_bytes + self.slack
            resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
        t0 = time.perf_counter()
        try:
            table = self.con.execute(sql).fetch_arrow_table()
            return {"status": "ok", "seconds": time.perf_counter() - t0, "table": table}
        except Exception as e:  # noqa: BLE001 - every failure is a result here
            secs = time.perf_counter() - t0
            msg = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:300]
            if fired.is_set():
                status = "timeout"
            elif isinstance(e, MemoryError) or OOM.search(msg):
                status = "oom"
            elif "not possible" in msg:
                status = "refused"
            else:
                status = "error"
            return {"status": status, "seconds": secs, "error": msg}
        finally:
            if self.capped(fam):
                resource.setrlimit(resource.RLIMIT_DATA, (hard, hard))
            timer.cancel()
            timer.join()

    def timed(self, sql: str, fam: str, rec: dict, peak: bool, timeout: float | None = None) -> dict:
        """One run; with peak=True also the RSS high-water mark above the RSS at its start (into rec)."""
        rss0 = _status_field("VmRSS") if peak and _reset_peak() else None
        r = self.once(sql, fam, timeout)
        hwm = _status_field("VmHWM") if rss0 is not None else None
        if rss0 is not None and hwm is not None:
            rec["peak_rss_growth_mib"] = round(max(rec.get("peak_rss_growth_mib", 0.0), (hwm - rss0) / MIB), 1)
        return r

    def explain(self, sql: str) -> dict:
        self.con.execute("RESET reldl_plan")
        lines = [r[0] for r in self.con.execute("EXPLAIN " + sql).fetchall()]
        m = re.match(r"reldl plan: (UDF-centric|DL-centric|relation-centric)", lines[0])
        out = {"chosen": FAMILY_OF[m.group(1)] if m else None, "explain": lines[: 3 + len(FAMILIES)]}
        try:  # the planner's numbers, infeasible ones included (EXPLAIN prints no seconds for those)
            plan = planning.make_plan(self.cur, sql, None)
            if plan.select is not None:  # the row estimate the planner costed with (DuckDB's cardinality)
                query = plans.inputs_query(plan.select, plan.calls)
                out["estimated_rows"] = planning._estimated_rows(self.cur.duckdb_cursor, query)
            out["estimates"] = {
                e.family: {
                    "seconds": e.seconds,
                    "feasible": e.feasible,
                    "working_set_mib": round(e.details["working_set_bytes"] / MIB, 2)
                    if "working_set_bytes" in e.details
                    else None,
                }
                for e in plan.estimates
            }
        except Exception as e:  # noqa: BLE001
            out["estimates_error"] = repr(e)
        return out

    def run_case(self, case: dict, skip: dict[str, str]) -> tuple[dict, dict]:
        """Warm up each plan, EXPLAIN, then timed runs of every plan that worked and of auto, interleaved (round
        after round, so that drift in the machine's speed hits all of them alike): best of up to max_repeat runs,
        fewer once a plan's runs add up to `budget` seconds."""
        sql, kind = case["sql"], case["kind"]
        plans_rec: dict[str, dict] = {}
        results: dict = {}
        live: list[str] = []
        for fam in FAMILIES:
            if fam in skip:
                plans_rec[fam] = {"status": "timeout", "inherited": skip[fam]}
                continue
            self.con.execute(f"SET reldl_plan = '{fam}'")
            if self.capped(fam):
                reldl.unload()  # the model loads in the warm-up, under the cap: its weights count
            rec = plans_rec[fam] = {}
            # a plan 5x slower than one that finished cannot be within 10% of the fastest: stop it there
            best = min((plans_rec[f]["warmup_s"] for f in live), default=None)
            timeout = self.timeout if best is None else min(self.timeout, max(MIN_TIMEOUT, 5 * best))
            if fam == "relation" and self.relation_timeout is not None:
                timeout = self.relation_timeout  # under a memory limit: does it finish at all?
            w = self.timed(sql, fam, rec, peak=True, timeout=timeout)
            rec["warmup_s"] = round(w["seconds"], 6)
            if w["status"] != "ok":
                rec.update(status=w["status"], error=w.get("error"), failed_in="warm-up")
                if w["status"] == "timeout":
                    rec["timeout_s"] = timeout
                continue
            if w["seconds"] > self.long_run:  # minutes of work: warm after its first seconds, not run again
                rec.update(status="ok", seconds=w["seconds"], times=[round(w["seconds"], 6)], warmup_is_timed=True)
                results[fam] = normalize(w["table"], kind)
                continue
            live.append(fam)
        out: dict = {"plans": plans_rec}
        out.update(self.explain(sql))
        chosen = out["chosen"]
        if chosen in live:
            live.append("auto")  # its plan is warm from the forced runs
            out["auto"] = {}
        else:  # auto runs exactly the forced plan's statement: it would fail (or time out) the same way, or (a run
            # of minutes, timed once) take the same time
            forced = plans_rec.get(chosen, {})
            out["auto"] = {"status": forced.get("status", "n/a"), "inherited": f"forced {chosen}"}
            if "seconds" in forced:
                out["auto"]["seconds"] = forced["seconds"]
        recs = {**plans_rec, "auto": out["auto"]}
        times: dict[str, list[float]] = {f: [] for f in live}
        while todo := [f for f in live if len(times[f]) < self.max_repeat and sum(times[f]) < self.budget]:
            for f in todo:
                fam = chosen if f == "auto" else f
                self.con.execute("RESET reldl_plan" if f == "auto" else f"SET reldl_plan = '{f}'")
                r = self.timed(sql, fam, recs[f], peak=not times[f])
                if r["status"] != "ok":
                    recs[f].update(status=r["status"], error=r.get("error"), failed_in="timed run")
                    live.remove(f)
                    continue
                if not times[f]:
                    results[f] = normalize(r["table"], kind)
                times[f].append(r["seconds"])
        for f, ts in times.items():
            if f in live:
                recs[f].update(status="ok", seconds=min(ts), times=[round(t, 6) for t in ts])
        return out, results


# --------------------------------------------------------------------------------------- memory-limited children


def _child(conn, payload: dict) -> None:
    """A limited case in its own process: warm up, then cap memory (DuckDB memory_limit + RLIMIT_DATA) and run."""
    try:
        case = payload["case"]
        con = reldl.connect()
        install_constants(con, payload["constants"])
        con.execute(table_sql(case["table"], case["rows"]))
        con.execute(table_sql("warm_t", 64))
        create_model(con, "warm_m", payload["warm_model"])
        for fam in FAMILIES:  # torch's thread pool, DuckDB's UDF path, weight tables: before the cap
            con.execute(f"SET reldl_plan = '{fam}'")
            con.execute("SELECT predict('warm_m', a, b, c, d) FROM warm_t").fetchall()
        con.execute("RESET reldl_plan")
        create_model(con, case["model"], payload["model_dir"])
        con.execute(f"SET temp_directory = '{payload['spill_dir']}'")
        con.execute(f"SET memory_limit = '{case['limit']}'")
        runner = Runner(
            con,
            payload["timeout"],
            payload["budget"],
            limit_bytes=parse_size(case["limit"]),
            slack=payload["slack"],
            relation_timeout=payload["limited_timeout"],
            long_run=payload["long_run"],
        )
        rec, results = runner.run_case(case, payload["skip"])
        conn.send(("ok", rec, results))
    except BaseException as e:  # noqa: BLE001
        conn.send(("error", f"{type(e).__name__}: {e}", None))
    finally:
        conn.close()


def run_limited(ctx, case: dict, payload: dict, deadline: float) -> tuple[dict, dict]:
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, {**payload, "case": case}))
    p.start()
    child.close()
    try:
        if parent.poll(deadline):
            status, rec, results = parent.recv()
        else:
            status, rec, results = "error", f"no answer within {deadline:.0f} s", None
    except EOFError:
        status, rec, results = "error", "process died", None
    p.join(5)
    if p.is_alive():
        p.kill()
        p.join()
    if status == "ok":
        return rec, results
    what = "crash" if p.exitcode not in (0, None) else "error"
    failed = {"status": what, "error": f"{rec} (exit code {p.exitcode})"}
    return {"plans": {f: dict(failed) for f in FAMILIES}, "auto": dict(failed), "chosen": None}, {}


# ----------------------------------------------------------------------------------------------------- the cases


def build_cases(quick: bool, llm_rows: int) -> list[dict]:
    rows_list = [1000, 20000] if quick else [1000, 20000, 200000]
    widths = ["w16", "w256"] if quick else list(WIDTHS)
    limits = [None, "32MiB"] if quick else [None, "256MiB", "32MiB"]
    big = rows_list[-1]
    cases = []

    def predict(width, table, tail=""):
        return f"SELECT id, predict('{width}', a, b, c, d) AS y FROM {table}{tail}"

    for limit in limits:
        for width in widths:
            for rows in rows_list:
                cases.append(
                    dict(
                        name=f"grid {width} {rows // 1000}k {limit or 'nolimit'}",
                        group="grid",
                        kind="predict",
                        rows=rows,
                        table=f"t_{rows}",
                        model=width,
                        limit=limit,
                        sql=predict(width, f"t_{rows}"),
                        ref=(f"t_{rows}", width),
                        subset=False,
                    )
                )
    for width in widths[-1:] if quick else widths:
        cases.append(
            dict(
                name=f"limit10 {width} {big // 1000}k",
                group="limit",
                kind="predict",
                rows=big,
                table=f"t_{big}",
                model=width,
                limit=None,
                sql=predict(width, f"t_{big}", " LIMIT 10"),
                ref=(f"t_{big}", width),
                subset=True,
                expect_rows=10,
                same_work_as=f"grid {width} {big // 1000}k nolimit",
            )
        )
    filters = [("g = 7", w) for w in (widths[-1:] if quick else widths)]
    if not quick:
        filters.append(("a < 0.01", widths[-1]))
    for cond, width in filters:
        cases.append(
            dict(
                name=f"filter {width} {big // 1000}k {cond.replace(' ', '')}",
                group="filter",
                kind="predict",
                rows=big,
                table=f"t_{big}",
                model=width,
                limit=None,
                sql=predict(width, f"t_{big}", f" WHERE {cond}"),
                ref=(f"t_{big}", width),
                subset=True,
                expect_sql=f"SELECT count(*) FROM t_{big} WHERE {cond}",
            )
        )
    llm = dict(kind="llm", group="llm", model="demo", limit=None, subset=False)
    n_dup_prompts, dup_times = (12, 10) if quick else (30, 20)
    cases.append(
        dict(
            llm,
            name=f"llm {llm_rows} distinct",
            rows=llm_rows,
            table="reviews",
            sql=f"SELECT id, {LLM_CALL} AS g FROM reviews",
            ref=("reviews", "demo"),
        )
    )
    cases.append(
        dict(
            llm,
            name=f"llm {n_dup_prompts}x{dup_times} dup",
            rows=n_dup_prompts * dup_times,
            table="reviews_dup",
            sql=f"SELECT id, {LLM_CALL} AS g FROM reviews_dup",
            ref=("reviews_dup", "demo"),
            dup=(n_dup_prompts, dup_times),
        )
    )
    cases.append(
        dict(
            llm,
            name=f"llm {llm_rows} limit10",
            rows=llm_rows,
            table="reviews",
            sql=f"SELECT id, {LLM_CALL} AS g FROM reviews LIMIT 10",
            ref=("reviews", "demo"),
            subset=True,
            expect_rows=10,
        )
    )
    return cases


# ------------------------------------------------------------------------------------------------------- reports


def fmt_plan(p: dict | None) -> str:
    if not p:
        return "-"
    if p.get("status") == "ok" and "seconds" in p:
        return f"{p['seconds']:.4f}" + ("*" if p.get("inherited") else "")
    return p.get("status", "?") + ("*" if p.get("inherited") else "")


def score(rec: dict) -> None:
    """fastest forced plan, ratio of the chosen plan's forced time to it."""
    ok = {f: p["seconds"] for f, p in rec["plans"].items() if p.get("status") == "ok"}
    rec["fastest"] = min(ok, key=ok.get) if ok else None
    chosen = rec.get("chosen")
    if not ok:
        rec["ratio"] = None
    elif chosen in ok:
        rec["ratio"] = ok[chosen] / ok[rec["fastest"]]
    else:
        rec["ratio"] = math.inf


def source_fingerprint() -> str:
    """A hash of reldl's source files: the run warns when they change while it runs (other work in the checkout)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha1()
    for d in SOURCE_DIRS:
        for f in sorted((root / d).rglob("*")):
            if f.suffix in (".py", ".sql") and f.is_file():
                h.update(str(f.relative_to(root)).encode())
                h.update(f.read_bytes())
    return h.hexdigest()


def _noop() -> None:
    pass


def machine_info() -> dict:
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass

    def git(*cmd: str) -> str | None:
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        platform=platform.platform(),
        machine=platform.machine(),
        processor=platform.processor(),
        cores=os.cpu_count(),
        cores_usable=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        memory_gib=round(mem / 2**30, 1) if mem else None,
        python=platform.python_version(),
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        duckdb=duckdb.__version__,
        pyarrow=pa.__version__,
        numpy=np.__version__,
        sqlglot=sqlglot.__version__,
        reldl_commit=git("rev-parse", "HEAD"),
        reldl_modified_files=dirty.splitlines() if dirty else [],
        reldl_source_modified=any(
            line[3:].split("/")[0] in SOURCE_DIRS for line in (dirty.splitlines() if dirty else [])
        ),
        loadavg_at_start=list(os.getloadavg()),
    )


# ---------------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/planner.json"), help="JSON results")
    ap.add_argument("--quick", action="store_true", help="a smaller grid (about a minute)")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds before a run is interrupted")
    ap.add_argument(
        "--limited-timeout", type=float, default=600.0, help="memory-limited cases: the relation plan's timeout"
    )
    ap.add_argument("--long-run", type=float, default=20.0, help="a warm-up longer than this is the timed run")
    ap.add_argument("--repeat-budget", type=float, default=1.5, help="timed runs per plan stop after this many s")
    ap.add_argument("--slack-mib", type=float, default=32.0, help="RLIMIT_DATA headroom over the memory limit")
    ap.add_argument("--llm-rows", type=int, default=None, help="distinct prompts (default 300, --quick 60)")
    args = ap.parse_args(argv)
    llm_rows = args.llm_rows or (60 if args.quick else 300)
    start = time.perf_counter()
    fingerprint = source_fingerprint()
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__"])
    warm_server = ctx.Process(target=_noop)  # starts the fork server now, with the code as it is now
    warm_server.start()
    warm_server.join()
    info = machine_info()
    info["source_sha1"] = fingerprint
    print(
        f"{info['platform']}, {info['cores']} cores, {info['memory_gib']} GiB; torch {info['torch']} "
        f"({info['torch_threads']} threads), duckdb {info['duckdb']}; {info['date']}; reldl "
        f"{(info['reldl_commit'] or '?')[:10]}{' (modified)' if info['reldl_source_modified'] else ''}; "
        f"load average {info['loadavg_at_start'][0]:.2f}"
    )

    con = reldl.connect()
    con.execute("SET enable_progress_bar = false")
    print("\ncalibration (reldl.calibrate):")
    constants = calibrate.calibrate(con.duckdb_connection)
    effective = {**cost.DEFAULTS, **constants}
    cases = build_cases(args.quick, llm_rows)

    tmp = tempfile.TemporaryDirectory(prefix="reldl-bench-planner-")
    root = Path(tmp.name)
    con.execute(f"SET temp_directory = '{root / 'spill-main'}'")
    model_dirs: dict[str, Path] = {}
    for width in sorted({c["model"] for c in cases if c["kind"] == "predict"}):
        model_dirs[width] = root / width
        random_tabular(model_dirs[width], "mlp", N_FEATURES, hidden=WIDTHS[width], n_outputs=1, seed=7)
        create_model(con, width, model_dirs[width])
    random_tabular(root / "warm", "mlp", N_FEATURES, hidden=[8], n_outputs=1, seed=1)
    for rows in sorted({c["rows"] for c in cases if c["kind"] == "predict"}):
        con.execute(table_sql(f"t_{rows}", rows))
    llm_cases = [c for c in cases if c["kind"] == "llm"]
    if llm_cases:
        create_model(con, "demo", demo_run.MODEL_DIR, "llm")
        prompts = [demo_data.prompt(r.text) for r in demo_data.reviews(llm_rows, demo_data.HELDOUT_SEED, "heldout")]
        con.duckdb_connection.register("__prompts", pa.table({"id": np.arange(len(prompts)), "prompt": prompts}))
        con.execute("CREATE TABLE reviews AS SELECT id, prompt FROM __prompts")
        n_dup, times_dup = next(c["dup"] for c in llm_cases if "dup" in c)
        con.execute(
            "CREATE TABLE reviews_dup AS SELECT i AS id, r.prompt FROM range("
            f"{n_dup * times_dup}) t(i) JOIN reviews r ON r.id = i % {n_dup}"
        )
        con.duckdb_connection.unregister("__prompts")

    runner = Runner(con, args.timeout, args.repeat_budget)
    refs: dict = {}
    by_name: dict[str, dict] = {}
    records = []
    disagreements = []
    order = sorted(range(len(cases)), key=lambda i: (cases[i]["limit"] is not None, i))  # references first
    print(f"\n{len(cases)} cases; each plan: warm-up + best of <= 9 runs (interleaved); timeout {args.timeout:g} s\n")
    for i in order:
        case = cases[i]
        t_case = time.perf_counter()
        skip: dict[str, str] = {}
        same = by_name.get(case.get("same_work_as", ""))
        if same is not None and same["plans"].get("relation", {}).get("status") == "timeout":
            skip["relation"] = f"timed out in '{same['name']}', which does the same work"
        if case["limit"] is None:
            rec, results = runner.run_case(case, skip)
        else:
            payload = dict(
                constants=constants,
                warm_model=str(root / "warm"),
                model_dir=str(model_dirs[case["model"]]),
                spill_dir=str(root / f"spill-{i}"),
                slack=int(args.slack_mib * MIB),
                timeout=args.timeout,
                budget=args.repeat_budget,
                skip=skip,
                limited_timeout=args.limited_timeout,
                long_run=args.long_run,
            )
            deadline = 12 * args.timeout + 3 * args.limited_timeout + 120
            rec, results = run_limited(ctx, case, payload, deadline=deadline)
        rec = {k: v for k, v in case.items() if k not in ("ref",)} | rec
        rec["case_seconds"] = round(time.perf_counter() - t_case, 2)
        # results: against the reference of this (table, model), made by the first plan that finished
        ref = refs.get(case["ref"])
        if ref is None and not case["subset"]:
            for fam in FAMILIES:
                if fam in results:
                    ref = refs[case["ref"]] = results[fam]
                    rec["reference"] = fam
                    break
        expect = case.get("expect_rows")
        if case.get("expect_sql"):
            expect = con.execute(case["expect_sql"]).fetchall()[0][0]
        rec["expected_rows"] = expect
        checks = {}
        for fam, got in results.items():
            bad = mismatches(ref, got, case["kind"], case["subset"]) if ref is not None else 0
            if expect is not None and len(got[0]) != expect:
                bad += abs(len(got[0]) - expect) or 1
            checks[fam] = bad
            if bad:
                disagreements.append({"case": case["name"], "plan": fam, "rows": bad})
        rec["mismatched_rows"] = checks
        score(rec)
        records.append(rec)
        by_name[case["name"]] = rec
        p = rec["plans"]
        print(
            f"  {case['name']:<32} udf {fmt_plan(p.get('udf')):>9}  dl {fmt_plan(p.get('dl')):>9}  "
            f"relation {fmt_plan(p.get('relation')):>9}  chosen {rec.get('chosen') or '-':<8} "
            f"({rec['case_seconds']:.1f} s)",
            flush=True,
        )

    records.sort(key=lambda r: cases.index(next(c for c in cases if c["name"] == r["name"])))
    head = (
        f"{'case':<32} {'rows':>7} {'model':<8} {'limit':<7} {'udf s':>9} {'dl s':>9} {'relation s':>10} "
        f"{'chosen':<8} {'auto s':>9} {'chosen/fastest':>14}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for r in records:
        p = r["plans"]
        ratio = r["ratio"]
        rtxt = "n/a" if ratio is None else ("inf" if math.isinf(ratio) else f"{ratio:.2f}")
        flag = "" if ratio is None or ratio <= 1.10 else "  <- miss"
        print(
            f"{r['name']:<32} {r['rows']:>7} {r['model']:<8} {r['limit'] or '-':<7} {fmt_plan(p.get('udf')):>9} "
            f"{fmt_plan(p.get('dl')):>9} {fmt_plan(p.get('relation')):>10} {r.get('chosen') or '-':<8} "
            f"{fmt_plan(r.get('auto')):>9} {rtxt:>14}{flag}"
        )
    print(
        "(* not run: inherited from the case with the same work, or for auto from the forced run of its plan when "
        "that ran once for minutes; auto s is otherwise the chosen plan's own run)"
    )

    scored = [r for r in records if r["ratio"] is not None]
    hits = [r for r in scored if r["ratio"] <= 1.10]
    frac = len(hits) / len(scored) if scored else 0.0
    limited = [r for r in records if r["limit"] is not None]
    dl_failed = [r for r in limited if r["plans"]["dl"].get("status") != "ok"]
    rel_where_dl_failed = [r for r in dl_failed if r["plans"]["relation"].get("status") == "ok"]
    misses = [
        {
            "case": r["name"],
            "chosen": r.get("chosen"),
            "fastest": r["fastest"],
            "ratio": r["ratio"],
            "measured": {f: p.get("seconds") for f, p in r["plans"].items() if p.get("status") == "ok"},
            "estimated": {f: e["seconds"] for f, e in r.get("estimates", {}).items()},
        }
        for r in scored
        if r["ratio"] > 1.10
    ]
    elapsed = time.perf_counter() - start
    summary = dict(
        cases=len(records),
        scored=len(scored),
        within_10pct=len(hits),
        within_10pct_fraction=frac,
        target_fraction=0.9,
        limit_cases=len(limited),
        limit_cases_dl_failed=[r["name"] for r in dl_failed],
        limit_cases_relation_finished_where_dl_failed=[r["name"] for r in rel_where_dl_failed],
        limit_cases_dl_failed_relation_did_not=[
            {"case": r["name"], "relation": r["plans"]["relation"].get("status")}
            for r in dl_failed
            if r["plans"]["relation"].get("status") != "ok"
        ],
        disagreements=len(disagreements),
        disagreement_details=disagreements,
        misses=misses,
        elapsed_seconds=round(elapsed, 1),
    )
    print(
        f"\nchosen plan within 10% of the fastest: {len(hits)}/{len(scored)} = {frac:.1%} (target >= 90%)"
        + ("" if len(scored) == len(records) else f"; {len(records) - len(scored)} case(s) where no plan finished")
    )
    for m in misses:
        est = ", ".join(f"{f} {s:.3g}" for f, s in m["estimated"].items())
        meas = ", ".join(f"{f} {s:.3g}" for f, s in m["measured"].items())
        print(
            f"  miss: {m['case']}: chose {m['chosen']}, fastest {m['fastest']} (x{m['ratio']:.2f}); "
            f"measured s: {meas}; estimated s: {est}"
        )
    print(
        f"memory-limit cases: dl failed in {len(dl_failed)} of {len(limited)}; relation finished in "
        f"{len(rel_where_dl_failed)} of those {len(dl_failed)}"
    )
    for d in summary["limit_cases_dl_failed_relation_did_not"]:
        print(f"  dl and relation both failed: {d['case']} (relation: {d['relation']})")
    print(f"result disagreements between plans: {len(disagreements)} (must be 0)")
    for d in disagreements:
        print(f"  {d['case']}: {d['plan']} differs in {d['rows']} row(s)")
    print(f"total time {elapsed:.0f} s")
    changed = source_fingerprint() != fingerprint
    summary["source_changed_during_run"] = changed
    if changed:
        print("WARNING: reldl's source files changed while this ran; the fork server and this process kept the code")
        print(
            "         they imported at the start, but lazily imported modules may not have: rerun on a quiet checkout"
        )

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        out = dict(
            meta=info | {"args": {k: str(v) for k, v in vars(args).items()}, "loadavg_at_end": list(os.getloadavg())},
            calibration={"measured": constants, "effective": effective, "defaults": cost.DEFAULTS},
            method=__doc__,
            summary=summary,
            cases=records,
        )
        args.out.write_text(json.dumps(out, indent=1, default=str))
        print(f"wrote {args.out}")
    con.close()
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
