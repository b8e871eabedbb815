"""Runs the planner's plans on a cursor: estimates inputs with DuckDB, evaluates model calls for DL-centric and
relation-centric plans, and runs the rewritten statement. `planner/` decides and rewrites; this module executes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from reldl import catalog
from reldl.errors import DataError, OperationalError, ProgrammingError, translate, unknown_model, wrong_model
from reldl.planner import cost, plans, predict_calls

if TYPE_CHECKING:
    from reldl.connection import Cursor

SETTINGS = {"reldl_plan": ("auto", "udf", "dl", "relation")}


@dataclass
class Timings:
    stages: list[tuple[str, float]] = field(default_factory=list)

    def add(self, name: str, start: float) -> None:
        self.stages.append((name, time.perf_counter() - start))


def _estimated_rows(duck: duckdb.DuckDBPyConnection, query: exp.Select) -> float:
    """DuckDB's cardinality estimate for the rows reaching the model calls."""
    q = query.copy()
    q.set("distinct", None)
    try:
        plan = json.loads(duck.execute("EXPLAIN (FORMAT JSON) " + q.sql(dialect="duckdb")).fetchall()[0][1])
        return float(plan[0].get("extra_info", {}).get("Estimated Cardinality", 1000))
    except (duckdb.Error, ValueError, KeyError, IndexError, TypeError):
        return 1000.0


DISTINCT_SAMPLE_ROWS = 2048  # rows the distinct-count estimate reads (the first ones the scan yields)


def estimate_distinct(duck: duckdb.DuckDBPyConnection, query: exp.Select, rows: float) -> tuple[float, str]:
    """Distinct argument tuples among ``rows`` (DuckDB's cardinality estimate of the inputs), from the first
    DISTINCT_SAMPLE_ROWS rows of the inputs query: tuples seen more than once in the sample are taken as all there
    is of them, tuples seen once are scaled up with the population (a unique column stays unique, a column of few
    values stays few). A sample that reaches the end of the input is exact. Cheap: the scan stops at the sample."""
    q = query.copy()
    q.set("distinct", None)
    keys = ", ".join(e.alias_or_name for e in q.expressions)
    sample = q.limit(DISTINCT_SAMPLE_ROWS).sql(dialect="duckdb")
    sql = (
        f"SELECT count(*), coalesce(sum(c), 0), count(*) FILTER (WHERE c = 1) FROM "
        f"(SELECT count(*) AS c FROM ({sample}) AS s GROUP BY hash({keys})) AS g"
    )
    try:
        d, n, f1 = duck.execute(sql).fetchall()[0]
    except duckdb.Error:
        return rows, "not estimated (sample failed): every row taken as distinct"
    if n == 0:
        return 0.0, "empty sample"
    if n < DISTINCT_SAMPLE_ROWS:
        return float(d), f"exact: {d} of {n} rows"
    total = max(rows, float(n))
    est = min(total, max(float(d), (d - f1) + f1 * total / n))
    return est, f"{d} distinct in a sample of {n} rows"


def _layer_shapes(path: str) -> list[tuple[int, int, str]]:
    from reldl import tabular

    return tabular.inspect_tabular(path).layers


def _workload(cur: Cursor, call: plans.CallSite, rows: float, distinct: float, rows_needed: float | None):
    models = catalog.list_models(cur._duck)
    try:
        rec = catalog.pick_model(models, call.model) if (call.model or call.function.startswith("llm")) else None
    except ProgrammingError:
        rec = None
    w = cost.Workload(call.function, rows, min(rows, distinct), rows_needed)
    limit = _memory_limit(cur._duck)
    w.memory_limit = limit
    if rec is not None:
        opts = rec.options
        w.device = str(opts.get("device", "cpu"))
        if w.device == "auto":
            w.device = "cpu"  # the cost model treats 'auto' as the CPU until calibrated on a GPU
        w.flops_per_row = float(opts.get("flops_per_row", 0.0))
        w.weight_bytes = float(opts.get("weight_bytes", 0.0))
        w.activation_bytes_per_row = float(opts.get("activation_bytes_per_row", 8 * opts.get("max_width", 64)))
        w.relation_ok = call.function.startswith("predict") and rec.model_type in ("mlp", "linear_reg", "logistic_reg")
        if w.relation_ok:
            try:
                shapes = _layer_shapes(rec.path)
            except Exception:  # noqa: BLE001 - a broken checkpoint fails when the plan runs, with its own error
                shapes = []
            if shapes:
                mats = [np.empty((o, i)) for i, o, _ in shapes]  # shapes only: np.empty allocates lazily
                layers = [(m, None, a) for m, (_, _, a) in zip(mats, shapes)]
                tiles = layer_tiles(layers, limit)
                threads = _threads(cur._duck)
                serial = threads > 1 and threads * thread_bytes(layers, tiles, limit) > THREAD_SHARE * limit
                w.relation_threads = 1.0 if serial else float(min(threads, os.cpu_count() or 1))
                whole = sum(8 * i * o for (i, o, _), t in zip(shapes, tiles) if t is None)
                w.relation_bytes = whole + w.relation_threads * thread_bytes(layers, tiles, limit)
                w.relation_tiled_values = float(sum(o for (_, o, _), t in zip(shapes, tiles) if t is not None))
    if call.function in plans.GENERATE:
        w.max_tokens = _max_tokens(call)
        if rec is not None and rec.options.get("offload"):  # the offload cost model's times (llm/offload/sql.py)
            from reldl.llm.offload import sql as offload_sql

            w.row_seconds, w.call_seconds = offload_sql.workload_seconds(cur._duck, rec, w.max_tokens)
        if call.function == "llm_generate_list":  # n samples / beam_width beams: that many rows of decoding
            w.max_tokens *= max([_int_literal(a, 1) for a in call.args[9:]] + [1])
    return w


def _threads(duck: duckdb.DuckDBPyConnection) -> int:
    try:
        return int(duck.execute("SELECT current_setting('threads')").fetchall()[0][0])
    except (duckdb.Error, ValueError):
        return 1


def _memory_limit(duck: duckdb.DuckDBPyConnection) -> float:
    try:
        value = duck.execute("SELECT current_setting('memory_limit')").fetchall()[0][0]
    except duckdb.Error:
        return float("inf")
    units = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
    number, _, unit = str(value).partition(" ")
    try:
        return float(number) * units.get(unit, 1)
    except ValueError:
        return float("inf")


# -- output column names: a rewrite must not rename the user's columns. DuckDB names an unaliased select item by the
# text of its parsed expression (`llm_generate(prompt, max_tokens := 2)`); reldl's rewrites replace calls
# (`__reldl_d.__reldl_r0`, a lookup) or change their text (`predict('m', list_value(a, b))`, `llm_generate_list`), so
# the items holding calls get, as an alias, the name DuckDB gives the item as the user wrote it.


def _output_select(tree: exp.Expression) -> exp.Select | None:
    """The SELECT whose items name the statement's result columns (a SELECT, or CREATE TABLE ... AS SELECT)."""
    if isinstance(tree, exp.Create):
        tree = tree.expression
    return tree if isinstance(tree, exp.Select) else None


def _calls_reldl(node: exp.Expression) -> bool:
    return any(str(a.this).lower() in plans.SIGNATURES for a in node.find_all(exp.Anonymous))


def output_names(duck: duckdb.DuckDBPyConnection, sql: str) -> dict[int, str]:
    """Position -> the column name DuckDB gives each unaliased result item of ``sql`` (as the user wrote it) that
    calls a reldl function: the item's text as DuckDB's parser prints it back. {} when there is none, or when
    sqlglot or DuckDB cannot parse the statement (names are then left as they come)."""
    try:
        select = _output_select(predict_calls.parse_one(sql))
    except (ParseError, TokenError):
        return {}
    if select is None:
        return {}
    names = {}
    for i, item in enumerate(select.expressions):
        if isinstance(item, (exp.Alias, exp.Column, exp.Star)) or not _calls_reldl(item):
            continue
        text = "SELECT " + item.sql(dialect=predict_calls.DIALECT)
        try:
            ((printed,),) = duck.execute("SELECT json_deserialize_sql(json_serialize_sql(?))", [text]).fetchall()
        except (duckdb.Error, ValueError):
            continue
        if isinstance(printed, str) and printed.startswith("SELECT ") and "\n" not in printed:
            names[i] = printed[len("SELECT ") :]
    return names


def pin_names(tree: exp.Expression, names: dict[int, str]) -> bool:
    """Alias the result items of ``tree`` at ``names``' positions (those still unaliased); whether any changed."""
    select = _output_select(tree)
    if select is None or not names:
        return False
    items = list(select.expressions)
    changed = False
    for i, name in names.items():
        if i < len(items) and not isinstance(items[i], exp.Alias):
            items[i] = exp.alias_(items[i], name, quoted=True)
            changed = True
    if changed:
        select.set("expressions", items)
    return changed


def rewrite_trained_lookups(cur: Cursor, sql: str, original: str | None = None) -> str | None:
    """``sql`` with predict() on in-database-trained matrix factorizations and GCNs replaced by SQL over their tables
    (planner/trained_calls.py), or None when it has no such call. The replaced calls' result columns keep the names
    they have in ``original`` (the statement as the user wrote it; default ``sql``)."""
    from reldl.autodiff import models as trained
    from reldl.planner import trained_calls

    if "predict" not in sql.lower():
        return None
    records = catalog.list_models(cur._duck)
    lookups = [r for r in records if r.options.get("trained") and r.model_type in ("matrix_factorization", "gcn")]
    if not lookups:  # the common case: no parse
        return None

    def resolve(name: str, args: list[exp.Expression]) -> exp.Expression | None:
        rec = catalog.pick_model(lookups, name)  # None: another kind of model, or an unknown one (fails later)
        return None if rec is None else trained.lookup_sql(rec.name, rec.model_type, rec.options, args)

    names = output_names(cur._duck, original or sql)
    try:
        out = trained_calls.rewrite(sql, resolve)
        if out is not None and names:
            tree = predict_calls.parse_one(out)
            if pin_names(tree, names):
                out = tree.sql(dialect=predict_calls.DIALECT)
        return out
    except (ParseError, TokenError):
        return None


def make_plan(cur: Cursor, sql: str, parameters, original: str | None = None) -> plans.Plan:
    """Parse, analyse and cost a statement with model calls; honours `SET reldl_plan`. EXPLAIN's extra lines:
    the offload policy and predicted throughput of offloaded models the statement calls. ``original``: the
    statement as the user wrote it, when reldl's text rewrites (statements.classify) changed it into ``sql``: its
    result columns keep the names they have there."""
    plan = _make_plan(cur, sql, parameters, original)
    calls = [c for c in plan.calls if c.function in plans.GENERATE]
    if calls:
        models = catalog.list_models(cur._duck)
        if any(m.options.get("offload") for m in models):
            from reldl.llm.offload import sql as offload_sql

            wanted = [(c.model, _max_tokens(c)) for c in calls]
            plan.extra += offload_sql.explain_lines(cur._duck, models, wanted, plan.family, plan.batch_rows)
    return plan


def _int_literal(arg: exp.Expression, default: int) -> int:
    """An argument's value when it is an integer literal (statements.check_literals has checked its range),
    `default` otherwise (an expression, NULL, or a value the UDF will refuse)."""
    if isinstance(arg, exp.Literal) and not arg.is_string:
        try:
            value = float(arg.this)
        except ValueError:
            return default
        if value.is_integer() and value >= 0:
            return int(value)
    return default


def _max_tokens(call: plans.CallSite) -> int:
    """The literal max_tokens of an llm_generate call (64, its default, when not a literal)."""
    return _int_literal(call.args[2], 64)


def check_models(cur: Cursor, calls: list[plans.CallSite]) -> None:
    """The models the calls name with a literal (or, for the LLM functions, the default LLM) exist and are of the
    kind the function runs: the one-line error the call raises when it runs, raised before anything runs (and by
    EXPLAIN). Models named by an expression are checked row by row when the statement runs."""
    if not calls:
        return
    from reldl.udfs.predict import TABULAR_TYPES

    models = catalog.list_models(cur._duck)
    for c in calls:
        fn = "llm_generate" if c.function == "llm_generate_list" else c.function
        arg = c.args[[name for name, _, _ in plans.SIGNATURES[c.function]].index("model")]
        if c.model is None and (fn.startswith("predict") or not isinstance(arg, exp.Null)):
            continue  # an expression (checked per row), or predict(NULL, ...), which is NULL
        rec = catalog.pick_model(models, c.model)  # no model given: the only LLM (raises if none or several)
        if rec is None:
            raise unknown_model(fn, c.model)
        if fn.startswith("llm") and rec.model_type != "llm":
            raise wrong_model(fn, rec, "an LLM")
        if fn.startswith("predict") and rec.model_type not in TABULAR_TYPES:
            kinds = TABULAR_TYPES + (("matrix_factorization", "gcn") if fn == "predict" else ())  # (trained lookups)
            what = "a model predict() runs" if fn == "predict" else "a tabular model"
            raise wrong_model(fn, rec, f"{what} ({', '.join(kinds)})")


def _scalar_functions(duck: duckdb.DuckDBPyConnection) -> set[str]:
    """Lower-case names of the scalar functions DuckDB knows (aggregates, table functions and macros excluded)."""
    try:
        rows = duck.execute(
            "SELECT DISTINCT lower(function_name) FROM duckdb_functions() WHERE function_type = 'scalar'"
        )
        return {r[0] for r in rows.fetchall()}
    except duckdb.Error:
        return set()


def _make_plan(cur: Cursor, sql: str, parameters, original: str | None = None) -> plans.Plan:
    forced = cur.connection.settings.get("reldl_plan", "auto")
    try:
        tree = predict_calls.parse_one(sql)
    except (ParseError, TokenError):
        return plans.Plan("udf", exp.Anonymous(this="raw"), reason="statement not parsed by sqlglot; runs as written")
    renamed = pin_names(tree, output_names(cur._duck, original or sql))  # every plan keeps the user's column names
    known: list[set[str]] = []

    def scalar(name: str) -> bool:  # DuckDB's function list, read only for a statement that needs it
        if not known:
            known.append(_scalar_functions(cur._duck))
        return name.lower() in known[0]

    tree, top_n = plans.push_top_n(tree, scalar)
    calls, select, why = plans.analyse(tree)
    check_models(cur, calls)
    plan = plans.Plan("udf", tree, calls, select, top_n=top_n)
    if top_n or (renamed and original is not None):  # (the text as written names its columns right otherwise)
        plan.rewritten_sql = tree.sql(dialect="duckdb")
    if select is None:
        plan.reason = f"SQL shape not understood ({why}): runs UDF-centric, as written"
        return plan
    if parameters is not None:
        plan.reason = "parameterized statement: runs UDF-centric"
        return plan
    if not all(plans.deterministic(c) for c in calls):
        plan.reason = "sampling without a seed: every row draws its own sample, so rows are not deduplicated"
        return plan
    inputs = plans.inputs_query(select, calls)
    rows = _estimated_rows(cur._duck, inputs)
    scanned = rows
    if inputs.args.get("where") is not None:
        unfiltered = inputs.copy()
        unfiltered.set("where", None)
        scanned = max(rows, _estimated_rows(cur._duck, unfiltered))
    distinct, how = estimate_distinct(cur._duck, inputs, rows)
    limit = plans.limit_of(select)
    bound = next((t.rows for t in top_n if t.select is select), None)
    if bound is not None:  # the calls see the top-N's rows only
        rows, scanned, distinct = min(rows, bound), min(scanned, bound), min(distinct, bound)
    work = [_workload(cur, c, rows, distinct, limit) for c in calls]
    for w in work:
        w.scanned = scanned
    plan.inputs = f"~{rows:.0f} rows (DuckDB's estimate), ~{min(rows, distinct):.0f} distinct inputs ({how})"
    plan.batch_rows = min(rows, distinct)
    per_family: dict[str, cost.Estimate] = {}
    for w in work:
        for e in cost.estimate(w, cur.connection.cost_constants()):
            acc = per_family.get(e.family)
            if acc is None:
                per_family[e.family] = e
            else:  # calls run one after the other: times add, the working set is the largest
                acc.seconds += e.seconds
                if not e.feasible and acc.feasible:
                    acc.note = e.note
                acc.feasible &= e.feasible
                for k, v in e.details.items():
                    acc.details[k] = max(acc.details.get(k, 0.0), v)
    if not all(w.relation_ok for w in work):
        per_family.pop("relation", None)
        if any(c.function.startswith("llm") for c in calls):
            plan.notes.append("relation-centric: not for LLM calls (it runs tabular models as SQL over weight tables)")
    plan.estimates = list(per_family.values())
    best, reason = cost.choose(plan.estimates)
    plan.family, plan.reason = best.family, reason
    if forced != "auto":
        if forced not in per_family:
            if not why and forced == "relation":
                why = "it runs tabular models only (mlp, linear_reg, logistic_reg), as SQL over weight tables"
            raise ProgrammingError(
                f"reldl_plan = '{forced}' is not possible for this statement ({why or 'model type'})"
            )
        plan.family, plan.forced = forced, True
    return plan


def run_plan(cur: Cursor, plan: plans.Plan, sql: str, parameters, timings: Timings | None = None) -> tuple[str, str]:
    """Evaluate a DL-centric or relation-centric plan's model calls; returns the rewritten statement and the name
    of the registered Arrow table of results it reads (the caller unregisters it)."""
    start = time.perf_counter()
    query = plans.inputs_query(plan.select, plan.calls)
    try:
        rel = cur._duck.sql(query.sql(dialect="duckdb"))  # a relation: Arrow without the DB-API copy
        inputs = rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()
    except duckdb.Error as e:
        raise translate(e) from None
    if timings:
        timings.add(f"pull {inputs.num_rows} distinct input rows (Arrow)", start)
    start = time.perf_counter()
    results = inputs
    for i, call in enumerate(plan.calls):
        cols = [inputs.column(f"a{i}_{j}").combine_chunks() for j in range(len(call.args))]
        if plan.family == "relation":
            values = relation_predict(cur, call.function, cols)
        else:
            try:
                values = cur._functions_for(call.function)(*cols)
            except (MemoryError, RuntimeError) as e:
                if not isinstance(e, MemoryError) and not _OOM.search(str(e)):
                    raise
                raise _dl_out_of_memory(cur, plan, call, inputs.num_rows, e) from None
        results = results.append_column(f"r{i}", values if isinstance(values, pa.Array) else pa.array(values))
    if timings:
        timings.add(f"run the model on them ({plan.family})", start)
    table = plans.new_table_name()
    cur._duck.register(table, results)
    try:
        return plans.lookup_rewrite(plan.statement, plan.calls, table).sql(dialect="duckdb"), table
    except Exception:
        cur._duck.unregister(table)
        raise


_OOM = re.compile(
    r"can't allocate memory|cannot allocate memory|out of memory|failed to allocate|not enough memory", re.I
)


def _dl_out_of_memory(cur: Cursor, plan: plans.Plan, call: plans.CallSite, rows: int, exc: BaseException):
    """A one-line OperationalError for a DL-centric plan whose model ran out of memory (torch's allocator or
    Python's MemoryError), with what it needed against the limit and the plan that spills instead."""
    name = call.model or "the default model"
    asked = re.search(r"tried to allocate (\d+) bytes", str(exc))
    est = next((e for e in plan.estimates if e.family == "dl"), None)
    needed = []
    if est is not None and "working_set_bytes" in est.details:
        needed.append(f"about {est.details['working_set_bytes'] / 2**20:.0f} MiB estimated")
    if asked:
        needed.append(f"an allocation of {int(asked.group(1)) / 2**20:.0f} MiB failed")
    limit = _memory_limit(cur._duck)
    limit_text = f"memory_limit {limit / 2**20:.0f} MiB" if limit < float("inf") else "the memory available"
    hint = (
        "SET reldl_plan = 'relation' runs the model as SQL, which spills to disk"
        if call.function.startswith("predict")
        else "SET reldl_plan = 'udf' streams chunk by chunk"
    )
    return OperationalError(
        f"{call.function}: model {name!r} ran out of memory in the DL-centric plan over {rows} distinct inputs "
        f"({'; '.join(needed) or 'allocation failed'}; limit: {limit_text}); {hint}"
    )


BIG_LAYER_TILE = 512  # input-block width for layers too big to hold as one value (planner/relational.py)
WHOLE_LAYER_SHARE = 0.3  # a layer keeps whole rows while its matrix (float64) is at most this share of memory_limit
VALUES_PER_BATCH_SHARE = 1 / 32  # bytes of one input batch's widest activations, as a share of memory_limit
MAX_BATCH_ROWS = 2048  # DuckDB's vector size
THREAD_SHARE = 0.5  # per-thread working sets of all DuckDB threads may take this share of memory_limit


def thread_bytes(layers, tiles: list[int | None], memory_limit: float) -> float:
    """DuckDB's working set per thread for the whole-row layers: list_transform runs its lambda over vectors of up
    to 2048 list elements, here weight rows (a batch's rows x the layer's units), about (elements x width) float64
    values (measured: a 1024-wide layer runs on one thread under a 32 MiB memory_limit, not on two)."""
    batch = batch_rows(layers, memory_limit)
    sizes = [
        min(MAX_BATCH_ROWS, batch * w.shape[0]) * w.shape[1] * 8 for (w, _, _), t in zip(layers, tiles) if t is None
    ]
    return float(max(sizes, default=0))


def single_thread(duck: duckdb.DuckDBPyConnection, layers, tiles, memory_limit: float) -> bool:
    """Whether the relation query must run on one DuckDB thread to stay within ``memory_limit``."""
    threads = _threads(duck)
    return threads > 1 and threads * thread_bytes(layers, tiles, memory_limit) > THREAD_SHARE * memory_limit


def layer_tiles(layers, memory_limit: float) -> list[int | None]:
    """Per layer: whole weight rows (the fastest path, streams without spilling, but the layer's matrix is one value
    held in memory) while the matrix is a small share of ``memory_limit``; otherwise input tiles, which DuckDB joins
    and aggregates out of core."""
    return [None if w.size * 8 <= WHOLE_LAYER_SHARE * memory_limit else BIG_LAYER_TILE for w, _, _ in layers]


def batch_rows(layers, memory_limit: float) -> int:
    """Rows per Arrow record batch of the relation plan's input. DuckDB's scan emits a chunk per batch at most, and
    every chunk of a whole-row layer carries (rows x width) float64 activations through the pipeline, so wide models
    under a small memory_limit get smaller chunks (a 2048-row chunk of a 1024-wide layer is 16 MiB)."""
    widest = max(max(w.shape) for w, _, _ in layers)
    rows = int(VALUES_PER_BATCH_SHARE * memory_limit / (8 * widest)) if memory_limit < float("inf") else MAX_BATCH_ROWS
    return max(16, min(MAX_BATCH_ROWS, rows))


def relation_predict(cur: Cursor, function: str, cols: list[pa.Array]) -> pa.Array:
    """predict / predict_proba for distinct (model, features) rows, with the model run as SQL over weight tables
    (temporary tables of this connection, written once per checkpoint version and memory budget)."""
    from reldl import tabular
    from reldl.connection import _calling_thread
    from reldl.planner import relational

    models, features = cols[0].to_pylist(), cols[1]
    complete = np.asarray([v is not None and None not in v for v in features.to_pylist()], dtype=bool)
    is_proba = function == "predict_proba"
    out: list = [None] * len(models)
    snapshot = catalog.list_models(cur._duck)
    limit = _memory_limit(cur._duck)
    _ensure_temp_directory(cur._duck)
    for name in {m for m in models if m is not None}:
        rec = catalog.pick_model(snapshot, name)
        if rec is None:
            raise unknown_model(function, name)
        if rec.model_type not in tabular.MODEL_TYPES:
            raise wrong_model(function, rec, f"a tabular model ({', '.join(tabular.MODEL_TYPES)})")
        spec, layers = tabular.read_layers(rec.path)
        # NULL features (or a NULL among them) give NULL, as in the UDF: only complete vectors go to SQL
        mine = np.asarray([m == name for m in models], dtype=bool)
        given = np.flatnonzero(mine & features.is_valid().to_numpy(zero_copy_only=False))
        lengths = pc.list_value_length(features.take(pa.array(given, pa.int64()))).to_numpy(zero_copy_only=False)
        wrong = np.flatnonzero(lengths != spec.n_features)
        if wrong.size:  # as the UDF checks it (a list with a NULL in it too), not the weight query's error()
            got = int(lengths[wrong[0]])
            raise DataError(f"{function}: model {rec.name!r} expects {spec.n_features} features, got {got}")
        rows = np.flatnonzero(complete & mine)
        if not rows.size:  # every row of this model has a NULL feature: NULL, nothing to run
            continue
        tiles = layer_tiles(layers, limit)
        weights, matrices = _weight_tables(cur, rec.path, layers, tiles)
        view = plans.new_table_name()
        table = pa.table({"rid": pa.array(rows, pa.int64()), "x": features.take(pa.array(rows))})
        cur._duck.register(view, pa.Table.from_batches(table.to_batches(max_chunksize=batch_rows(layers, limit))))
        try:
            build = relational.proba_query if is_proba else relational.predict_query
            query = build(weights, view, spec.layers, spec.task, tiles, matrices=matrices)
            serial = single_thread(cur._duck, layers, tiles, limit)
            with _calling_thread(cur._duck, cur.connection.instance_key) if serial else contextlib.nullcontext():
                rel = cur._duck.sql(query.sql(dialect="duckdb"))
                result = rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()
        except duckdb.Error as e:
            raise translate(e) from None
        finally:
            cur._duck.unregister(view)
        values = result.column(1).to_pylist()
        for rid, value in zip(result.column(0).to_numpy(), values):
            out[rid] = value
    typ = pa.list_(pa.float64()) if is_proba else pa.float64()
    return pa.array(out, typ)


def _ensure_temp_directory(duck: duckdb.DuckDBPyConnection) -> None:
    """The relation plan relies on spilling: give DuckDB a temp directory when it has none (an in-memory database
    started without one), under the system's temp folder."""
    try:
        current = duck.execute("SELECT current_setting('temp_directory')").fetchall()[0][0]
    except duckdb.Error:
        return
    if current:
        return
    path = os.path.join(tempfile.gettempdir(), f"reldl-spill-{os.getpid()}")
    duck.execute(f"SET temp_directory = '{path}'")


def _weight_tables(cur: Cursor, path: str, layers, tiles: list[int | None]) -> tuple[str, str]:
    """This cursor's temporary weight tables for the checkpoint's current version and these tiles, written on first
    use (temporary tables belong to one DuckDB connection, and each cursor is its own): the tiled layers' tiles and
    the whole-row layers' matrices, each layer stored once."""
    from reldl import tabular
    from reldl.planner import relational

    key = (tabular.tabular_key(path, "cpu"), tuple(tiles))
    tables = cur._weight_tables
    if key not in tables:
        n = len(tables)
        weights, matrices = f"temp.main.__reldl_w_{n}", f"temp.main.__reldl_m_{n}"
        whole = [i for i, t in enumerate(tiles) if t is None]
        relational.store_weights(cur._duck, weights, layers, tiles, only=[i for i, t in enumerate(tiles) if t])
        relational.store_matrices(cur._duck, matrices, layers, only=whole)
        tables[key] = (weights, matrices)
    return tables[key]
