"""PEP 249 (DB-API 2.0) Connection and Cursor over DuckDB, with reldl's SQL surface.

Each cursor runs on its own DuckDB cursor (DuckDB's own DB-API does the same), so cursors can be used from
different threads. reldl's UDFs live in the DuckDB instance's catalog under names unique to each reldl connection,
registered on the connection's own DuckDB handle (which outlives its cursors); each cursor gets the TEMP
named-argument macros. Statements go through the planner: reldl statements run here, everything else goes to DuckDB
as written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import duckdb
import pyarrow as pa

from reldl import catalog, paths
from reldl.errors import Error, IntegrityError, InterfaceError, NotSupportedError, ProgrammingError, shown, translate
from reldl.planner.predict_calls import lone_feature_message
from reldl.planner.statements import (
    CreateModel,
    DropModel,
    Explain,
    ExplainModel,
    Passthrough,
    SetOption,
    ShowModels,
    parse,
)
from reldl.udfs import SqlFunctions

LLM_OPTIONS = {"model_type", "path", "dtype", "device"}
# offloaded inference (reldl/llm/offload/sql.py): offload = 'auto' | '<policy>', capacities, disk tier, workload
OFFLOAD_OPTIONS = {"offload", "gpu_memory", "cpu_memory", "disk_memory", "offload_dir", "prompt_len", "gen_len"}


_serial: dict[object, list] = {}  # DuckDB instance -> [statements with model calls running, saved `threads`]
_serial_lock = threading.Lock()


@contextlib.contextmanager
def _calling_thread(duck: duckdb.DuckDBPyConnection, instance: object):
    """Run statements with model calls on the thread that waits for the query (DuckDB `threads = 1`).

    On a DuckDB worker thread, the UDF hands the GIL to the waiting thread, which polls for Ctrl-C, at every
    release (each torch call): measured on an H100 as 27% over the engine alone, against 10% on the calling thread.
    The model calls serialize on the engine anyway. `threads` is global to a database instance, so it is counted
    per instance and restored when the last such statement ends.
    """
    with _serial_lock:
        entry = _serial.get(instance)
        if entry is None:
            with contextlib.closing(duck.cursor()) as cur:  # not `duck`: its result set is the user's
                saved = cur.execute("SELECT current_setting('threads')").fetchall()[0][0]
                cur.execute("SET threads = 1")
            entry = _serial[instance] = [0, int(saved)]
        entry[0] += 1
    try:
        yield
    finally:
        with _serial_lock:
            entry[0] -= 1
            if entry[0] == 0:
                del _serial[instance]
                with contextlib.closing(duck.cursor()) as cur:
                    cur.execute(f"SET threads = {entry[1]}")


def _sql_lines(plan, sql: str) -> list[str]:
    return ["  runs:"] + ["    " + line for line in sql.splitlines()]


def _unload(name: str) -> None:
    """Free a model's memory in whichever process-wide cache holds it (LLM engines or tabular models)."""
    from reldl import tabular

    _registry().unload(name)
    tabular.unload(name)


# -- directories reldl created for a model (catalog option `owned_dirs`, resolved by `catalog.owned_dirs`): removed once
# DROP MODEL / OR REPLACE is committed, never a directory a user named (a checkpoint `path`), never one another
# catalog row still refers to, never one another database file made (a copied or moved database owns none of them).
_TRANSACTION_END = ("commit", "end", "rollback", "abort")
_OWNERSHIP_KEYS = ("owned_dirs", "owned_by")  # read through catalog.owned_dirs, not as paths


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            if k not in _OWNERSHIP_KEYS:
                yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _referenced(duck: duckdb.DuckDBPyConnection, records) -> set[str]:
    """Every absolute path a catalog row mentions (its `path`, `sparse_dir`, a variant's `base_path`, ...) and the
    directories it owns."""
    out: set[str] = set()
    for rec in records:
        for s in _strings([rec.path, rec.options]):
            if s.startswith(os.sep) or s.startswith("~"):
                out.add(os.path.realpath(os.path.expanduser(s)))
        out.update(catalog.owned_dirs(duck, rec.options))
    return out


def _carry_ownership(duck: duckdb.DuckDBPyConnection, existing, path: str | None, options: dict) -> None:
    """OR REPLACE: a directory the replaced model owned and the new one still uses stays owned (by the new one).
    `path`: None when the user named it; `options["owned_dirs"]`: absolute paths, not stored yet (put_model)."""
    if existing is None:
        return
    refs = _referenced(duck, [catalog.ModelRecord("", "", path, {**options, "owned_dirs": []})])
    kept = [d for d in catalog.owned_dirs(duck, existing.options) if d in refs]
    if kept:
        options["owned_dirs"] = list(dict.fromkeys(list(options.get("owned_dirs") or []) + kept))


def _in_transaction(duck: duckdb.DuckDBPyConnection) -> bool:
    """Whether `duck` is inside an explicit transaction (BEGIN ...) rather than autocommit: two statements in one
    transaction see one transaction id. (Not `duck.begin()`: its error aborts the open transaction, which a later
    COMMIT then silently rolls back.) Raises duckdb.ConnectionException when `duck` is closed."""
    try:
        first = duck.execute("SELECT txid_current()").fetchall()
        return first == duck.execute("SELECT txid_current()").fetchall()
    except duckdb.ConnectionException:
        raise
    except duckdb.Error:  # an aborted transaction answers nothing until it ends
        return True


class _DirJanitor:
    """Directories of dropped or replaced models, removed once their catalog change is committed: at once in
    autocommit, otherwise at the COMMIT that ends the transaction (Connection.commit() or SQL COMMIT). After a
    ROLLBACK the row is back and refers to the directory again, so nothing is removed.

    The same check cleans up after a CREATE MODEL inside a transaction that does not commit (ROLLBACK, or a COMMIT
    that DuckDB turned into a rollback after a failed statement): the directories the new row owns are pending too,
    and once the transaction ends they are removed unless a committed row (the new one, after COMMIT) refers to
    them."""

    def __init__(self, duck: duckdb.DuckDBPyConnection | None):
        self._duck = duck  # the database handle that reads the committed catalog (None: the caller's own handle)
        self._pending: list[tuple[duckdb.DuckDBPyConnection, str]] = []
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._pending)

    def discard(self, duck: duckdb.DuckDBPyConnection, rec: catalog.ModelRecord | None) -> None:
        """`rec`'s catalog row was just deleted or replaced on `duck` (in its transaction, if one is open); the
        caller has unloaded its engine, so no memory map holds the files."""
        dirs = catalog.owned_dirs(duck, rec.options) if rec is not None else []
        if not dirs:
            return
        with self._lock:
            self._pending += [(duck, d) for d in dirs]
        self.ended(duck)

    def created(self, duck: duckdb.DuckDBPyConnection, options: dict) -> None:
        """A CREATE MODEL on `duck` just wrote a catalog row owning `options`' `owned_dirs`. In autocommit the row
        is committed already; inside a transaction its directories go if the transaction does not commit."""
        dirs = catalog.owned_dirs(duck, options)
        if not dirs:
            return
        try:
            if not _in_transaction(duck):
                return
        except duckdb.ConnectionException:
            return
        with self._lock:
            self._pending += [(duck, d) for d in dirs]

    def ended(self, duck: duckdb.DuckDBPyConnection) -> None:
        """`duck` ran its DROP / OR REPLACE in autocommit, or just ran COMMIT / ROLLBACK (checked, not assumed:
        the check runs a statement on `duck`, harmless right after those statements)."""
        try:
            if _in_transaction(duck):
                return
        except duckdb.ConnectionException:
            pass  # closed: its transaction was rolled back, which the catalog check below sees
        self.sweep({id(duck)})

    def sweep(self, handles: set[int] | None = None) -> None:
        """Remove the pending directories of `handles` (ids; None: all, after Connection.commit() / rollback(),
        when every transaction has ended) that no committed catalog row refers to: a rolled-back DROP's row is
        back, so its directory stays."""
        with self._lock:
            ready = [e for e in self._pending if handles is None or id(e[0]) in handles]
            self._pending = [e for e in self._pending if e not in ready]
        if not ready:
            return
        try:
            reader = (self._duck or ready[0][0]).cursor()
            try:
                refs = _referenced(reader, catalog.list_models(reader))
            finally:
                reader.close()
        except duckdb.Error as e:
            warnings.warn(f"reldl: model directories not removed (cannot read the catalog: {e})", stacklevel=3)
            return
        for _, d in ready:
            real = os.path.realpath(d)
            if any(r == real or r.startswith(real + os.sep) for r in refs) or not os.path.isdir(real):
                continue  # rolled back, still used by another model, or already gone
            try:
                shutil.rmtree(real)
            except OSError as e:
                warnings.warn(f"reldl: could not remove model directory {real}: {e}", stacklevel=3)


def _check_offload_dir(name: str, value) -> None:
    """`offload_dir`, when it names a directory that exists (or one whose parent exists, which reldl creates when
    the model loads), must be writable and not on a pseudo-file system such as /proc (where root may "write"): a
    one-line error at CREATE MODEL, not a PermissionError at the first query.
    Other bad values (not text, not a directory, no parent) get their messages from the offload option checks."""
    if not isinstance(value, str) or not value:
        return
    path = os.path.abspath(os.path.expanduser(value))
    fs = paths.pseudo_fs(os.path.realpath(path))
    if fs:
        raise ProgrammingError(
            f"CREATE MODEL {name}: offload_dir {path} is on a kernel pseudo-file system ({fs}), which cannot hold files"
        )
    if os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            raise ProgrammingError(f"CREATE MODEL {name}: offload_dir {path} is not writable")
        return
    parent = os.path.dirname(path)
    if not os.path.exists(path) and os.path.isdir(parent) and not os.access(parent, os.W_OK | os.X_OK):
        raise ProgrammingError(
            f"CREATE MODEL {name}: offload_dir {path} cannot be created (its parent directory {parent} is not writable)"
        )


def model_types() -> dict[str, str]:
    """Every model_type CREATE MODEL takes -> how a model of it is made, gathered from the modules that implement
    them (tabular checkpoints: reldl/tabular.py; trained in SQL: autodiff/models.py), so no list is written twice."""
    from reldl import tabular
    from reldl.autodiff.models import MODEL_TYPES as TRAINED

    kinds = {"llm": "a checkpoint (path), or a variant of a registered LLM (base) AS SELECT"}
    kinds.update({t: "a checkpoint (path), or trained AS SELECT" for t in tabular.MODEL_TYPES})
    kinds.update({t: "trained AS SELECT" for t in TRAINED if t not in kinds})
    return kinds


def _registry():
    """The model registry, imported on first use so that importing reldl (and the CLI) does not load torch."""
    from reldl import registry

    return registry


class Cursor:
    arraysize: int = 1

    def __init__(
        self,
        connection: Connection,
        duck: duckdb.DuckDBPyConnection,
        functions: SqlFunctions | None = None,
        *,
        owns_duck: bool = True,
    ):
        self.connection = connection
        self._duck = duck
        self._functions = functions  # None: a cursor over a plain DuckDB connection (reldl.register_model)
        self._owns_duck = owns_duck  # False for the connection's own cursor: closing it must not close the database
        self._has_result = False
        self.rowcount = -1
        self._description: list[tuple] | None = None
        self._closed = False
        self._temp_views: list[str] = []  # Arrow tables a plan registered; dropped before the next statement
        self._weight_tables: dict = {}  # relation-centric plans: checkpoint version -> this cursor's temp table

    # -- PEP 249 attributes
    @property
    def description(self) -> list[tuple] | None:
        return self._description

    @property
    def duckdb_cursor(self) -> duckdb.DuckDBPyConnection:
        return self._duck

    def _check(self) -> None:
        if self._closed:
            raise InterfaceError("cursor is closed")
        if self.connection.closed:
            raise InterfaceError("connection is closed")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._drop_temp_views()
            if self._functions is not None:
                self._functions.end_query()
            if self._owns_duck:
                try:
                    self._duck.close()
                except duckdb.Error:
                    pass

    def execute(self, operation: str, parameters: Sequence[Any] | dict | None = None) -> Cursor:
        """Run one statement or a script; the last statement's result is what fetch* returns."""
        self._check()
        if not isinstance(operation, str):
            raise ProgrammingError("execute() needs SQL text")
        statements = parse(operation)
        if parameters is not None and len(statements) > 1:
            raise ProgrammingError("parameters can only be used with a single statement")
        self._has_result = False
        self._description = None
        self.rowcount = -1
        self._drop_temp_views()
        try:
            for stmt in statements:
                self._run(stmt, parameters)
        except duckdb.Error as e:  # a catalog read or planning query (most paths translate their own)
            raise translate(e) from None
        return self

    def _run(self, stmt, parameters) -> None:
        if parameters and not isinstance(stmt, (Passthrough, Explain)):  # reldl's own statements bind nothing
            what = {CreateModel: "CREATE MODEL", ExplainModel: "EXPLAIN CREATE MODEL", DropModel: "DROP MODEL"}
            what.update({ShowModels: "SHOW MODELS", SetOption: f"SET {getattr(stmt, 'name', '')}"})
            raise NotSupportedError(
                f"{what[type(stmt)]} does not take parameters (? or $name): write the values into the statement "
                "(reldl.register_model(conn, name, path) registers a checkpoint from Python)"
            )
        if isinstance(stmt, Passthrough) and stmt.functions:
            try:
                self._model_statement(stmt.sql, parameters, stmt.returns_rows, original=stmt.original)
            except Error as e:  # predict(m, x) of a one-feature model: say how to call it
                better = lone_feature_message(stmt.original or stmt.sql, str(e))
                if better is None:
                    raise
                raise ProgrammingError(better) from None
        elif isinstance(stmt, Explain):
            self._model_statement(stmt.statement, parameters, True, explain=True, analyze=stmt.analyze)
        elif isinstance(stmt, Passthrough):
            try:
                self._duckdb(stmt.sql, parameters, returns_rows=stmt.returns_rows)
            finally:
                janitor = self._janitor()
                if janitor and stmt.sql.lstrip().lower().startswith(_TRANSACTION_END):  # SQL COMMIT / ROLLBACK
                    janitor.ended(self._duck)  # (a COMMIT of an aborted transaction rolls back: checked there)
        elif isinstance(stmt, SetOption):
            self.connection.set_option(stmt.name, stmt.value)
        elif isinstance(stmt, CreateModel):
            self._create_model(stmt)
        elif isinstance(stmt, ExplainModel):
            self._explain_model(stmt)
        elif isinstance(stmt, DropModel):
            rec = catalog.delete_model(self._duck, stmt.name, if_exists=stmt.if_exists)
            if rec is not None:
                _unload(rec.name)
                if rec.options.get("trained"):  # CREATE MODEL ... AS SELECT: its parameter tables go too
                    from reldl.autodiff import models

                    models.drop_trained(self._duck, rec.options)
                self._janitor().discard(self._duck, rec)
        elif isinstance(stmt, ShowModels):
            sql = f"SELECT {catalog.MODEL_COLUMNS} FROM reldl.models ORDER BY name"
            self._duckdb(sql if catalog.has_catalog(self._duck) else catalog.EMPTY_MODELS_SQL, None)

    def _janitor(self) -> _DirJanitor:
        """The connection's pending directory removals (a one-off for a cursor over a plain DuckDB connection)."""
        janitor = getattr(self.connection, "_dirs", None)
        return janitor if janitor is not None else _DirJanitor(None)

    def _model_statement(
        self,
        sql: str,
        parameters,
        returns_rows: bool,
        explain: bool = False,
        analyze: bool = False,
        original: str | None = None,
    ) -> None:
        """A statement with model calls: plan it (planner/), then run the plan or show it (EXPLAIN). `original`: the
        statement as the user wrote it, when reldl's text rewrites made `sql` of it (result columns keep its names)."""
        from reldl import planning

        rewritten = planning.rewrite_trained_lookups(self, sql, original)
        if rewritten is not None:  # predict() on trained lookup models (matrix factorization, GCN) became SQL
            sql, original = rewritten, None  # (its result columns are named already)
            if not any(isinstance(s, Passthrough) and s.functions for s in parse(sql)):
                if explain and not analyze:
                    why = "plan: lookup (predict on models trained in the database reads their tables; no model runs)"
                    self._bind(sql, parameters)
                    self._show([why] + _sql_lines(None, sql))
                elif explain:
                    self._duckdb("EXPLAIN ANALYZE " + sql, parameters)
                else:
                    self._duckdb(sql, parameters, returns_rows=returns_rows)
                return
        plan = planning.make_plan(self, sql, parameters, original)
        if explain and not analyze:
            self._bind(sql, parameters)  # a missing table or column, a type error: the statement's own error
            self._show(plan.explain() + self._sparse_lines(plan) + _sql_lines(plan, plan.rewritten_sql or sql))
            return
        timings = planning.Timings() if analyze else None
        if self._functions is not None:
            self._functions.begin_query(catalog.list_models(self._duck))
        table = None
        try:
            start = time.perf_counter()
            if plan.family == "udf":
                run_sql = plan.rewritten_sql or sql  # the top-N rewrite (planner/plans.py), if any
                with _calling_thread(self._duck, self.connection.instance_key):
                    self._execute(run_sql, parameters)
            else:
                run_sql, table = planning.run_plan(self, plan, sql, parameters, timings)
                start = time.perf_counter()
                self._execute(run_sql, parameters)
            if timings is not None:
                timings.add("statement" if plan.family == "udf" else "statement reading the results", start)
        finally:
            if self._functions is not None:
                self._functions.end_query()
        if table is not None:
            self._temp_views.append(table)
        if analyze:
            self._duck.fetchall()  # finish the statement's own result
            lines = plan.explain() + [f"  {name}: {secs * 1e3:.1f} ms" for name, secs in timings.stages]
            lines += self._sparse_lines(plan)
            self._show(lines + _sql_lines(plan, run_sql))
            return
        self._finish(returns_rows)

    def _sparse_lines(self, plan) -> list[str]:
        """EXPLAIN: the per-layer sparsity of the sparse models the statement calls (reldl/llm/sparse)."""
        from reldl.llm.sparse.sql import explain_lines

        calls = [c for c in plan.calls if c.function.startswith("llm")]
        return explain_lines(catalog.list_models(self._duck), [c.model for c in calls]) if calls else []

    def _functions_for(self, function: str):
        """The Python function behind a model call, for plans that evaluate calls outside DuckDB's pipeline."""
        return self._functions.function(function)

    def _show(self, lines: list[str]) -> None:
        """Make `lines` this cursor's result set (one VARCHAR column), as EXPLAIN output."""
        table = f"__reldl_explain_{id(self)}"
        self._duck.register(table, pa.table({"explain": pa.array(lines, pa.string())}))
        self._temp_views.append(table)
        self._execute(f'SELECT * FROM "{table}"', None)
        self._finish(True)

    def _bind(self, sql: str, parameters) -> None:
        """Have DuckDB parse and bind `sql` without running it (its EXPLAIN): EXPLAIN of a statement that cannot run
        (a missing table or column, an argument of the wrong type) fails with the statement's own error."""
        self._execute("EXPLAIN " + sql, parameters)
        self._duck.fetchall()

    def _execute(self, sql: str, parameters) -> None:
        try:
            self._duck.execute(sql, parameters)
        except (duckdb.Error, RuntimeError) as e:  # DuckDB raises RuntimeError("Query interrupted") on Ctrl-C
            raise translate(e) from None

    def _drop_temp_views(self) -> None:
        while self._temp_views:
            try:
                self._duck.unregister(self._temp_views.pop())
            except duckdb.Error:
                pass

    def _duckdb(self, sql: str, parameters, returns_rows: bool = True) -> None:
        self._execute(sql, parameters)
        self._finish(returns_rows)

    def _finish(self, returns_rows: bool) -> None:
        """PEP 249: statements without rows have no description; DML reports its row count."""
        if returns_rows:
            self._has_result = True
            self._description = self._duck.description
            self.rowcount = -1
            return
        status = self._duck.fetchall() if self._duck.description else []  # DuckDB's one "Count" row
        count = status[0][0] if status and isinstance(status[0][0], int) and not isinstance(status[0][0], bool) else -1
        self.rowcount = count

    def _create_model(self, stmt: CreateModel) -> None:
        from reldl import tabular

        opts = dict(stmt.options)
        model_type = opts.get("model_type")
        if model_type is None:
            raise ProgrammingError(f"CREATE MODEL {stmt.name}: OPTIONS must set model_type (e.g. model_type = 'llm')")
        if model_type == "llm" and "finetune" in opts:  # fine-tuned from a table (reldl/llm/finetune)
            self._create_finetuned_model(stmt)
            return
        if model_type == "llm" and "base" in opts:  # a sparse variant of a registered LLM (reldl/llm/sparse)
            self._create_sparse_model(stmt)
            return
        if stmt.query is not None:
            self._train_model(stmt)
            return
        self._check_model_type(stmt.name, model_type)
        if stmt.if_not_exists and catalog.get_model(self._duck, stmt.name) is not None:
            return
        if model_type == "llm":
            path, options = self._llm_options(stmt.name, opts, self._duck)
        else:
            path, options = tabular.validate_create_options(stmt.name, opts)
            spec = tabular.inspect_tabular(path)
            options["activation_bytes_per_row"] = 8 * (spec.n_features + sum(out for _, out, _ in spec.layers))
        existing = catalog.get_model(self._duck, stmt.name)
        _carry_ownership(self._duck, existing, None, options)  # `path` is the user's: never owned
        catalog.put_model(self._duck, stmt.name, model_type, str(path), options, replace=stmt.replace)
        self._janitor().created(self._duck, options)  # an offload_dir reldl will create
        if existing is not None:
            _unload(existing.name)
            self._janitor().discard(self._duck, existing)

    def _explain_model(self, stmt: ExplainModel) -> None:
        """EXPLAIN CREATE MODEL: the options checked as CREATE MODEL checks them (same errors), and what the model
        would be: its checkpoint and, for an offloaded LLM, the policy and predicted throughput that EXPLAIN SELECT
        shows once it is registered. Nothing is registered or created. Training (AS SELECT) is not explained."""
        from reldl import tabular

        create, name = stmt.create, stmt.create.name
        opts = dict(create.options)
        model_type = opts.get("model_type")
        if stmt.analyze:
            raise NotSupportedError(f"EXPLAIN ANALYZE CREATE MODEL {name}: not supported (it would create the model)")
        if model_type is None:
            raise ProgrammingError(f"CREATE MODEL {name}: OPTIONS must set model_type (e.g. model_type = 'llm')")
        if create.query is not None or (model_type == "llm" and ("base" in opts or "finetune" in opts)):
            raise NotSupportedError(
                f"EXPLAIN CREATE MODEL {name}: training (AS SELECT) has no plan to show; EXPLAIN explains "
                "registering a checkpoint (OPTIONS (path = ...)), e.g. an offload = 'auto' policy"
            )
        existing = catalog.get_model(self._duck, name)
        if existing is not None and not (create.replace or create.if_not_exists):
            raise IntegrityError(f"model {existing.name!r} already exists (use CREATE OR REPLACE MODEL)")
        head = f"CREATE MODEL {name}: model_type {model_type!r} (EXPLAIN: nothing is registered)"
        if model_type == "llm":
            path, options = self._llm_options(name, opts, self._duck)
            lines = [head, f"  checkpoint: {path} ({options['architecture']})"]
            lines.append(f"  dtype {options['dtype']}, device {options['device']}")
            if options.get("offload"):
                from reldl.llm.offload import sql as offload_sql

                rec = catalog.ModelRecord(name, "llm", path, options)
                lines += [f"  {line}" for line in offload_sql.explain_lines(self._duck, [rec], [(name, 0)], "dl", None)]
            else:
                lines.append("  not offloaded: the whole model is loaded on the device (offload = 'auto' plans it)")
        elif model_type in tabular.MODEL_TYPES:
            path, _ = tabular.validate_create_options(name, opts)
            spec = tabular.inspect_tabular(path)
            layers = " -> ".join(str(n) for n in [spec.n_features] + [out for _, out, _ in spec.layers])
            lines = [head, f"  checkpoint: {path}", f"  {spec.n_features} features, layer widths {layers}"]
        else:
            self._check_model_type(name, model_type)
            return
        self._show(lines)

    @staticmethod
    def _check_model_type(name: str, model_type) -> None:
        """CREATE MODEL without AS SELECT: a model_type that registers a checkpoint, else a one-line error listing
        the model types (every registered kind, from model_types())."""
        from reldl import tabular

        if model_type == "llm" or model_type in tabular.MODEL_TYPES:
            return
        kinds = model_types()
        if model_type in kinds:  # trained in the database only: there is no checkpoint to register
            raise ProgrammingError(
                f"CREATE MODEL {name}: model_type {model_type!r} is trained in the database: "
                f"CREATE MODEL {name} OPTIONS (model_type = {model_type!r}, ...) AS SELECT ..."
            )
        raise NotSupportedError(
            f"CREATE MODEL {name}: model_type {shown(model_type)} is not supported (model types: {', '.join(kinds)})"
        )

    def _train_model(self, stmt: CreateModel) -> None:
        """CREATE MODEL ... AS SELECT: train with relational autodiff (autodiff/models.py), then register the model.
        Running the statement again after an interruption resumes from the last committed epoch."""
        from reldl.autodiff import models

        existing = catalog.get_model(self._duck, stmt.name)
        if existing is not None and stmt.if_not_exists:
            return
        if existing is not None and not stmt.replace:
            raise IntegrityError(f"model {existing.name!r} already exists (use CREATE OR REPLACE MODEL)")
        models.check_options(stmt.name, stmt.options)  # bad options fail before anything is written
        if _in_transaction(self._duck):  # (checked before DuckDB's own error, which would abort the transaction)
            raise ProgrammingError(
                f"CREATE MODEL {stmt.name}: training in the database commits its steps one by one, so it cannot run "
                "inside a transaction (BEGIN ... COMMIT): run it outside one"
            )
        path, options, tables = models.create_model(self._duck, stmt.name, stmt.options, stmt.query)
        if path is not None and not stmt.options.get("path"):  # <db>.models/<name> or a temporary directory
            options["owned_dirs"] = [path]
        _carry_ownership(self._duck, existing, path if "owned_dirs" in options else None, options)
        catalog.put_model(self._duck, stmt.name, stmt.options["model_type"], path, options, replace=stmt.replace)
        self._janitor().created(self._duck, options)
        if existing is not None:
            _unload(existing.name)
            if existing.options.get("trained"):
                models.drop_trained(self._duck, existing.options, keep=tables)
            self._janitor().discard(self._duck, existing)

    def _create_sparse_model(self, stmt: CreateModel) -> None:
        """CREATE MODEL ... OPTIONS (model_type = 'llm', base = ..., sparsity = ...) AS SELECT text ...: calibrate
        (reldl/llm/sparse/sql.py), then register; a failure leaves no catalog row."""
        from reldl.llm.sparse import sql as sparse_sql

        existing = catalog.get_model(self._duck, stmt.name)
        if existing is not None and stmt.if_not_exists:
            return
        if existing is not None and not stmt.replace:
            raise IntegrityError(f"model {existing.name!r} already exists (use CREATE OR REPLACE MODEL)")
        path, options = sparse_sql.create(self._duck, stmt.name, stmt.options, stmt.query)
        _carry_ownership(self._duck, existing, path if options.get("owned_dirs") else None, options)
        catalog.put_model(self._duck, stmt.name, "llm", path, options, replace=stmt.replace)
        self._janitor().created(self._duck, options)
        if existing is not None:
            _unload(existing.name)
            self._janitor().discard(self._duck, existing)

    def _create_finetuned_model(self, stmt: CreateModel) -> None:
        """CREATE MODEL ... OPTIONS (model_type = 'llm', base = ..., finetune = 'full' | 'lora') AS SELECT prompt,
        completion ...: train (reldl/llm/finetune/sql.py; resumes after a kill), then register; a failure leaves no
        catalog row."""
        from reldl.llm.finetune import sql as finetune_sql

        existing = catalog.get_model(self._duck, stmt.name)
        if existing is not None and stmt.if_not_exists:
            return
        if existing is not None and not stmt.replace:
            raise IntegrityError(f"model {existing.name!r} already exists (use CREATE OR REPLACE MODEL)")
        path, options, log = finetune_sql.create(self._duck, stmt.name, stmt.options, stmt.query)
        if not stmt.options.get("path"):  # reldl chose the checkpoint's place (<db>.models/<name> or a temp dir)
            options["owned_dirs"] = [path]
        _carry_ownership(self._duck, existing, path if "owned_dirs" in options else None, options)
        catalog.put_model(self._duck, stmt.name, "llm", path, options, replace=stmt.replace)
        self._janitor().created(self._duck, options)
        finetune_sql.write_log(self._duck, stmt.name, log)
        if existing is not None:
            _unload(existing.name)
            self._janitor().discard(self._duck, existing)

    @staticmethod
    def _llm_options(name: str, opts: dict, duck: duckdb.DuckDBPyConnection | None = None) -> tuple[str, dict]:
        unknown = set(opts) - LLM_OPTIONS - OFFLOAD_OPTIONS
        if unknown:
            raise ProgrammingError(
                f"CREATE MODEL {name}: unknown option(s) {', '.join(sorted(unknown))} for model_type 'llm' "
                f"(options: {', '.join(sorted(LLM_OPTIONS | OFFLOAD_OPTIONS))})"
            )
        path = opts.get("path")
        if not isinstance(path, str) or not path:
            raise ProgrammingError(f"CREATE MODEL {name}: OPTIONS must set path = '/dir/of/checkpoint'")
        for key in ("dtype", "device"):
            if key in opts and (not isinstance(opts[key], str) or not opts[key]):
                raise ProgrammingError(
                    f"CREATE MODEL {name}: option {key!r} must be text such as 'auto', got {shown(opts[key])}"
                )
        if "offload" in opts:
            _check_offload_dir(name, opts.get("offload_dir"))
        from reldl.llm.loader import inspect_checkpoint

        registry = _registry()
        dev = registry.resolve_device(str(opts.get("device", "auto")))
        dt = registry.resolve_dtype(str(opts.get("dtype", "auto")), dev)
        ckpt = inspect_checkpoint(path)
        options = {"dtype": str(opts.get("dtype", "auto")), "device": str(opts.get("device", "auto"))}
        options["architecture"] = ckpt.config.model_type
        if OFFLOAD_OPTIONS & set(opts):  # policy searched or checked here; the catalog keeps it (offload/sql.py)
            from reldl.llm.offload import sql as offload_sql

            size = dt.itemsize
            options["offload"] = offload_sql.create_options(duck, name, opts, ckpt.config, str(dev), size)
            odir = (options["offload"] or {}).get("offload_dir")
            if odir and not os.path.exists(odir):  # reldl creates it when the model loads: reldl's to remove
                options["owned_dirs"] = [os.path.abspath(os.path.expanduser(odir))]
        return str(ckpt.path.resolve()), options

    def executemany(self, operation: str, seq_of_parameters: Sequence[Sequence[Any]]) -> Cursor:
        self._check()
        statements = parse(operation)
        if len(statements) != 1:
            raise ProgrammingError(f"executemany() takes a single SQL statement, got {len(statements)}")
        if not isinstance(statements[0], Passthrough):  # CREATE / DROP / SHOW MODEL, EXPLAIN, SET reldl_*
            raise NotSupportedError(
                "executemany() runs DuckDB statements with parameters; run reldl's own with execute()"
            )
        params = list(seq_of_parameters)
        try:
            self._duck.executemany(statements[0].sql, params)
        except (duckdb.Error, RuntimeError) as e:
            raise translate(e) from None
        self._finish(statements[0].returns_rows)
        if len(params) > 1:  # DuckDB reports the last parameter set's count only: PEP 249's -1, not a wrong total
            self.rowcount = -1
        return self

    def _fetch(self, how: str, *args):
        self._check()
        if not self._has_result:
            raise ProgrammingError("no result set to fetch: execute() a query first (the last statement returned none)")
        try:
            return getattr(self._duck, how)(*args)
        except duckdb.Error as e:
            raise translate(e) from None

    def fetchone(self) -> tuple | None:
        return self._fetch("fetchone")

    def fetchmany(self, size: int | None = None) -> list[tuple]:
        return self._fetch("fetchmany", self.arraysize if size is None else size)

    def fetchall(self) -> list[tuple]:
        return self._fetch("fetchall")

    def fetch_arrow_table(self) -> pa.Table:
        """The rest of the result as an Arrow table. DuckDB 1.4+ calls it to_arrow_table (fetch_arrow_table was
        deprecated, then removed) and warns that it copies the rows, advising con.sql(query).to_arrow_table(): a
        cursor's statement has run already, so the copy is the only way, and the advice is not for reldl's users."""
        if not hasattr(self._duck, "to_arrow_table"):
            return self._fetch("fetch_arrow_table")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Arrow output on a DB-API result makes an extra copy", UserWarning)
            return self._fetch("to_arrow_table")

    def fetchdf(self):
        return self._fetch("fetchdf")

    def __iter__(self) -> Iterator[tuple]:
        while (row := self.fetchone()) is not None:
            yield row

    def setinputsizes(self, sizes) -> None:
        pass

    def setoutputsize(self, size, column=None) -> None:
        pass

    def __enter__(self) -> Cursor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Connection:
    def __init__(self, database: str = ":memory:", *, read_only: bool = False, config: dict | None = None):
        if not isinstance(database, (str, bytes, os.PathLike)):  # 123 opened a file named "123", then a TypeError
            raise ProgrammingError(f"connect: database must be a file path or ':memory:', got {database!r}")
        database = os.fsdecode(database)
        try:
            self._duck = duckdb.connect(database, read_only=read_only, config=config or {})
        except duckdb.Error as e:
            raise translate(e) from None
        try:
            if not read_only:
                catalog.ensure_schema(self._duck)
            self._functions = SqlFunctions(self._duck)
            self._functions.register(self._duck)
        except duckdb.Error as e:
            self._duck.close()
            raise translate(e) from None
        except BaseException:
            self._duck.close()
            raise
        self.database = str(database)
        # DuckDB shares one instance between connections to the same file; in-memory databases are their own
        self.instance_key: object = os.path.realpath(database) if database not in ("", ":memory:") else self
        self.read_only = read_only
        self.closed = False
        self._cursors: weakref.WeakSet[Cursor] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._default: Cursor | None = None
        self.settings: dict[str, str] = {}  # reldl session options (SET reldl_plan = ...)
        self._dirs = _DirJanitor(self._duck)  # owned directories of dropped / replaced models, removed on commit

    def set_option(self, name: str, value: str | None) -> None:
        from reldl.planning import SETTINGS

        if name not in SETTINGS:
            raise ProgrammingError(f"unknown reldl option {name!r} (options: {', '.join(sorted(SETTINGS))})")
        if value is None:
            self.settings.pop(name, None)
            return
        value = value.lower()
        if value not in SETTINGS[name]:
            raise ProgrammingError(f"{name} must be one of {', '.join(SETTINGS[name])}, got {value!r}")
        self.settings[name] = value

    def cost_constants(self) -> dict[str, float]:
        """Calibrated cost-model constants (`reldl calibrate`), read from the catalog; defaults where absent."""
        try:
            rows = (
                self._duck.cursor()
                .execute(
                    "SELECT key, value FROM reldl.calibration WHERE database_name = current_database()"
                    if False
                    else "SELECT key, value FROM reldl.calibration"
                )
                .fetchall()
            )
        except duckdb.Error:
            return {}
        return dict(rows)

    @property
    def duckdb_connection(self) -> duckdb.DuckDBPyConnection:
        """The underlying DuckDB connection, for power users."""
        return self._duck

    def _check(self) -> None:
        if self.closed:
            raise InterfaceError("connection is closed")

    def cursor(self) -> Cursor:
        self._check()
        with self._lock:
            try:
                duck = self._duck.cursor()
                self._functions.install_macros(duck)
                cur = Cursor(self, duck, self._functions)
            except duckdb.Error as e:
                raise translate(e) from None
            self._cursors.add(cur)
        return cur

    def execute(self, operation: str, parameters: Sequence[Any] | dict | None = None) -> Cursor:
        """Shortcut: run on the connection's own cursor (the one commit() and rollback() act on) and return it."""
        self._check()
        if self._default is None or self._default._closed:
            self._default = Cursor(self, self._duck, self._functions, owns_duck=False)
        return self._default.execute(operation, parameters)

    def commit(self) -> None:
        self._check()
        self._each_transaction("commit")
        self._dirs.sweep()  # DROP MODEL / OR REPLACE committed: their owned directories go

    def rollback(self) -> None:
        self._check()
        self._each_transaction("rollback")
        self._dirs.sweep()  # the rows are back and refer to their directories: nothing is removed

    def _each_transaction(self, how: str) -> None:
        """DuckDB autocommits unless BEGIN was issued; end any open transaction on this connection's cursors."""
        handles = [self._duck] + [c._duck for c in list(self._cursors) if not c._closed]
        for h in handles:
            try:
                getattr(h, how)()
            except duckdb.TransactionException:
                pass
            except duckdb.Error as e:
                raise translate(e) from None

    def close(self) -> None:
        if self.closed:
            return
        for c in list(self._cursors):
            c.close()
        if self._default is not None:
            self._default.close()
        if self._dirs:  # a CREATE MODEL in a transaction never committed: closing rolls it back
            with contextlib.suppress(duckdb.Error):
                self._duck.rollback()
            self._dirs.sweep()
        self._functions.unregister()
        self._duck.close()
        self.closed = True

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.closed:
            if exc_type is None:
                self.commit()
            else:
                self.rollback()
        self.close()
