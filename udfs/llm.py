"""`llm_generate` and `llm_score` as vectorized (Arrow) DuckDB functions: a thin adapter over `Engine`.

Per chunk: NULL in gives NULL out; arguments are checked; rows are grouped by model; identical prompts with
deterministic decoding run once; results are remembered across the chunks of one query.
"""

from __future__ import annotations

import itertools
import json
import string
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa
from duckdb.sqltypes import BIGINT, DOUBLE, VARCHAR

from reldl import catalog
from reldl.errors import ProgrammingError, unknown_model, wrong_model
from reldl.llm.params import SamplingParams
from reldl.progress import Progress

if TYPE_CHECKING:
    from reldl.llm.engine import Engine
    from reldl.registry import EngineKey

CACHE_ENTRIES = 100_000


def _stop(value: str | None) -> tuple[str, ...]:
    """`stop` arrives as JSON (the macro wraps it in to_json) so both 'x' and ['x', 'y'] work."""
    if value is None:
        return ()
    parsed = json.loads(value)
    items = parsed if isinstance(parsed, list) else [parsed]
    if not all(isinstance(s, str) and s for s in items):
        raise ProgrammingError("llm_generate: stop must be a non-empty string or a list of non-empty strings")
    return tuple(items)


BRANCHES_DEFAULT = {"reldl_default": True}  # the macro's beam_width default (to_json of it): no beam search
UNSET = json.dumps(BRANCHES_DEFAULT)


def _branches(value: str | None, name: str, fn: str) -> int | None:
    """`n` / `beam_width` arrive as JSON (the macro wraps them in to_json, as `stop`), so that any SQL type reaches
    this check: an integer from 1 to MAX_BRANCHES, or (beam_width only) the macro's default, no beam search."""
    from reldl.llm.params import MAX_BRANCHES

    parsed = json.loads(value) if value is not None else None
    if name == "beam_width" and parsed == BRANCHES_DEFAULT:
        return None
    ok = isinstance(parsed, (int, float)) and not isinstance(parsed, bool) and float(parsed).is_integer()
    if ok and 1 <= parsed <= MAX_BRANCHES:
        return int(parsed)
    if parsed is None:
        shown = "NULL"
    elif isinstance(parsed, bool):
        shown = str(parsed).lower()
    elif isinstance(parsed, str):
        shown = repr(parsed)
    else:
        shown = value
    raise ProgrammingError(f"{fn}: {name} must be an integer from 1 to {MAX_BRANCHES}, got {shown}")


def _params(max_tokens, temperature, top_p, top_k, seed, stop, n="1", beam_width=UNSET, fn="llm_generate"):
    if max_tokens is None:
        raise ProgrammingError(f"{fn}: max_tokens must be an integer >= 0, got NULL")
    if max_tokens < 0:
        raise ProgrammingError(f"{fn}: max_tokens must be >= 0, got {max_tokens}")
    temperature = 0.0 if temperature is None else float(temperature)
    if not temperature >= 0:  # NaN too: it compares false both ways and sampled as neither greedy nor a temperature
        raise ProgrammingError(f"{fn}: temperature must be >= 0, got {temperature:g}")
    top_p = 1.0 if top_p is None else float(top_p)
    if not 0.0 < top_p <= 1.0:
        raise ProgrammingError(f"{fn}: top_p must be in (0, 1], got {top_p:g}")
    top_k = 0 if top_k is None else int(top_k)
    if top_k < 0:
        raise ProgrammingError(f"{fn}: top_k must be >= 0, got {top_k}")
    n = _branches(n, "n", fn)
    beam_width = _branches(beam_width, "beam_width", fn)
    try:
        return SamplingParams(int(max_tokens), temperature, top_p, top_k, seed, _stop(stop), n, beam_width)
    except ValueError as e:  # n / beam_width out of range or combined badly
        raise ProgrammingError(f"{fn}: {e}") from None


class LLMFunctions:
    """The SQL functions registered on one DuckDB connection, with that connection's result cache."""

    _ids = itertools.count()

    def __init__(self, duck: duckdb.DuckDBPyConnection, progress: Callable[[], Progress] | None = None):
        self.duck = duck
        self.cache: OrderedDict[tuple, str] = OrderedDict()
        self.lock = threading.Lock()
        self.new_progress = progress or Progress
        self.progress: Progress | None = None
        self.local = threading.local()
        # DuckDB keeps Python UDFs in the database instance's catalog, shared by every connection to it, while
        # the macros are TEMP (per connection). Unique UDF names let each connection own (and drop) its own.
        n = next(self._ids)
        self.names = {
            "generate": f"reldl_llm_generate_{n}",
            "generate_list": f"reldl_llm_generate_list_{n}",
            "score": f"reldl_llm_score_{n}",
        }

    def register(self, duck: duckdb.DuckDBPyConnection) -> None:
        """Create this connection's UDFs on `duck` (its own handle) and the named-argument macros."""
        duck.create_function(
            self.names["generate"],
            self.generate,
            [VARCHAR, VARCHAR, BIGINT, DOUBLE, DOUBLE, BIGINT, BIGINT, VARCHAR, VARCHAR],
            VARCHAR,
            type="arrow",
            null_handling="special",
            side_effects=True,
        )
        duck.create_function(
            self.names["generate_list"],
            self.generate_list,
            [VARCHAR, VARCHAR, BIGINT, DOUBLE, DOUBLE, BIGINT, BIGINT, VARCHAR, VARCHAR, VARCHAR, VARCHAR],
            duckdb.list_type(VARCHAR),
            type="arrow",
            null_handling="special",
            side_effects=True,
        )
        duck.create_function(
            self.names["score"],
            self.score,
            [VARCHAR, VARCHAR, VARCHAR],
            DOUBLE,
            type="arrow",
            null_handling="special",
            side_effects=True,
        )
        self.install_macros(duck)

    def install_macros(self, duck: duckdb.DuckDBPyConnection) -> None:
        """The TEMP macros (per DuckDB connection or cursor) that give the functions their named arguments."""
        duck.execute(string.Template(catalog.sql_file("functions.sql")).substitute(self.names))

    def unregister(self) -> None:
        """Drop the UDFs before the connection closes: DuckDB would otherwise keep entries pointing at it."""
        for name in self.names.values():
            try:
                self.duck.remove_function(name)
            except duckdb.Error:
                pass

    # -- query lifecycle (called by reldl's cursor; plain DuckDB users get a bounded cache instead)
    def begin_query(self, models: list[catalog.ModelRecord] | None = None) -> None:
        """A statement with model calls starts. `models`: the catalog as the statement's own transaction sees it
        (uncommitted CREATE MODEL included); the UDF runs on this same thread (reldl runs such statements on
        DuckDB's calling thread), so it is kept per thread."""
        with self.lock:
            self.cache.clear()
        self.local.models = models

    def end_query(self) -> None:
        self.local.models = None
        with self.lock:
            progress, self.progress = self.progress, None
        if progress is not None:
            progress.close()

    def _engine(self, model: str | None, fn: str = "llm_generate") -> tuple[EngineKey, Engine]:
        """The engine of a model, and its identity for the result cache: the checkpoint (path, mtime), dtype and
        device, not the catalog name, so results of a model replaced under the same name are never reused."""
        models = getattr(self.local, "models", None)
        if models is None:  # a plain DuckDB connection: read the (committed) catalog through a fresh handle
            cur = self.duck.cursor()  # not self.duck: this runs inside a query on it
            try:
                models = catalog.list_models(cur)
            finally:
                cur.close()
        rec = catalog.pick_model(models, model)
        if rec is None:
            raise unknown_model(fn, model)
        if rec.model_type != "llm":
            raise wrong_model(fn, rec, "an LLM")
        from reldl import registry  # loads torch: only once a model is actually used

        return registry.model_engine(rec)  # an Engine, or an offloaded model's adapter (reldl/llm/offload)

    def _remember(self, key: tuple, value) -> None:
        self.cache[key] = value
        if len(self.cache) > CACHE_ENTRIES:
            self.cache.popitem(last=False)

    def generate(self, prompt, model, max_tokens, temperature, top_p, top_k, seed, stop, truncate) -> pa.Array:
        args = (prompt, model, max_tokens, temperature, top_p, top_k, seed, stop, truncate)
        n = ["1"] * len(prompt)  # (JSON, as llm_generate_list's n arrives)
        return pa.array(self._generate([c.to_pylist() for c in args] + [n], False), pa.string())

    def generate_list(
        self, prompt, model, max_tokens, temperature, top_p, top_k, seed, stop, truncate, n, beam_width
    ) -> pa.Array:
        """`llm_generate(..., n := k)` / `beam_width := k` (the planner rewrites those calls to llm_generate_list):
        a LIST of the n samples, or of the beams best first."""
        args = (prompt, model, max_tokens, temperature, top_p, top_k, seed, stop, truncate, n, beam_width)
        return pa.array(self._generate([c.to_pylist() for c in args], True), pa.list_(pa.string()))

    def _generate(self, cols: list[list], listy: bool) -> list:
        fn = "llm_generate"  # (llm_generate_list is what the planner calls llm_generate(..., n := k) for)
        rows = list(zip(*cols))
        out: list = [None] * len(rows)
        todo: dict[tuple, list[int]] = {}  # cache key -> rows waiting for it
        engines: dict[str | None, tuple[EngineKey, Engine]] = {}  # model argument -> (identity, engine)
        for i, row in enumerate(rows):
            p, m, mt, t, tp, tk, sd, st, tr = row[:9]
            if p is None:
                continue
            if tr not in (None, "left"):
                raise ProgrammingError(f"{fn}: truncate must be 'left' or NULL, got {tr!r}")
            sp = _params(mt, t, tp, tk, sd, st, *row[9:], fn=fn)
            if m not in engines:
                engines[m] = self._engine(m)
            name = engines[m][0]
            # the cache key holds the parameters (n and beam_width included) and which function returns what
            key = (name, p, sp, tr, fn) if sp.deterministic else (name, p, sp, tr, fn, i)
            with self.lock:
                hit = self.cache.get(key) if sp.deterministic else None
            if hit is not None:
                out[i] = hit
            else:
                todo.setdefault(key, []).append(i)
        by_model: dict[EngineKey, list[tuple]] = {}
        for key in todo:
            by_model.setdefault(key[0], []).append(key)
        resolved = dict(engines.values())
        for name, keys in by_model.items():
            eng = resolved[name]
            progress = self.progress
            if progress is None:  # (a local: another cursor's end_query may reset self.progress meanwhile)
                progress = self.progress = self.new_progress()
            keys.sort(key=lambda k: k[3] or "")  # one batched tokenization per truncate mode
            ids = []
            for tr, group in itertools.groupby(keys, key=lambda k: k[3]):
                part = list(group)
                ids += eng.prepare_many([k[1] for k in part], [k[2] for k in part], tr)
            results = eng.generate_ids(ids, [k[2] for k in keys], on_progress=progress.update)
            for k, r in zip(keys, results):
                value = r.texts if listy else r.text
                for i in todo[k]:
                    out[i] = value
                if k[2].deterministic:
                    with self.lock:
                        self._remember(k, value)
        return out

    def score(self, prompt, continuation, model) -> pa.Array:
        rows = list(zip(prompt.to_pylist(), continuation.to_pylist(), model.to_pylist()))
        out: list[float | None] = [None] * len(rows)
        groups: dict[str | None, list[int]] = {}
        for i, (p, c, m) in enumerate(rows):
            if p is not None and c is not None:
                groups.setdefault(m, []).append(i)
        for m, idx in groups.items():
            _, eng = self._engine(m, "llm_score")
            scores = eng.score([rows[i][0] for i in idx], [rows[i][1] for i in idx])
            for i, s in zip(idx, scores):
                out[i] = s
        return pa.array(out, pa.float64())


def install(duck: duckdb.DuckDBPyConnection) -> LLMFunctions:
    """Register reldl's LLM functions on a DuckDB connection (or cursor)."""
    fns = LLMFunctions(duck)
    fns.register(duck)
    return fns
