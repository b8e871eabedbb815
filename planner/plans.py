"""Plans for statements with model calls: UDF-centric, DL-centric or relation-centric, chosen by the cost model.

- UDF-centric: the statement runs as written; DuckDB streams chunks through the Arrow UDFs (stops early under LIMIT).
- DL-centric: the distinct argument tuples of the model calls are pulled out once (Arrow), the model runs on all of
  them in one large batch, and the statement reads the results back through a lookup on the argument tuple.
- Relation-centric (tabular models): as DL-centric, but the model itself runs as SQL joins and aggregates over
  weight tables, so DuckDB's buffer manager spills where PyTorch would run out of memory.

Each rewrite is a small transform over the sqlglot AST. Shapes the planner does not understand run UDF-centric,
and EXPLAIN says why.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import sqlglot
from sqlglot import exp

from reldl.planner import cost

# positional signature of each function's UDF (after macro defaults), with the SQL types of its arguments
SIGNATURES: dict[str, list[tuple[str, str, str | None]]] = {
    # name, type, default (SQL) when the call does not give it
    "llm_generate": [
        ("prompt", "VARCHAR", None),
        ("model", "VARCHAR", "NULL"),
        ("max_tokens", "BIGINT", "64"),
        ("temperature", "DOUBLE", "0.0"),
        ("top_p", "DOUBLE", "1.0"),
        ("top_k", "BIGINT", "0"),
        ("seed", "BIGINT", "NULL"),
        ("stop", "VARCHAR", "NULL"),  # to_json(stop), as the macro passes it
        ("truncate", "VARCHAR", "NULL"),
    ],
    "llm_score": [("prompt", "VARCHAR", None), ("continuation", "VARCHAR", None), ("model", "VARCHAR", "NULL")],
    "predict": [("model", "VARCHAR", None), ("features", "DOUBLE[]", None)],
    "predict_proba": [("model", "VARCHAR", None), ("features", "DOUBLE[]", None)],
}
# llm_generate(..., n := k) / beam_width := k, after statements.list_generate_sql: a LIST(VARCHAR) per row
# (n and beam_width as to_json(...) of them, as the macro passes them; beam_width's default is the macro's marker)
SIGNATURES["llm_generate_list"] = SIGNATURES["llm_generate"] + [
    ("n", "VARCHAR", "1"),
    ("beam_width", "VARCHAR", "{'reldl_default': true}"),
]
GENERATE = ("llm_generate", "llm_generate_list")
_JSON_ARGS = {"llm_generate": (7,), "llm_generate_list": (7, 9, 10)}  # arguments the macros wrap in to_json


def _as_passed(function: str, j: int, arg: exp.Expression) -> exp.Expression:
    """Argument `j` of a call as the macro hands it to the UDF."""
    value = arg.copy()
    return exp.func("to_json", value) if j in _JSON_ARGS.get(function, ()) else value


FAMILIES = ("udf", "dl", "relation")
_names = itertools.count()


@dataclass
class CallSite:
    node: exp.Expression
    function: str
    args: list[exp.Expression]  # in SIGNATURES order, defaults filled in
    model: str | None  # the model's name when given as a literal (None: the default LLM, or not static)


@dataclass
class Plan:
    family: str
    statement: exp.Expression
    calls: list[CallSite] = field(default_factory=list)
    select: exp.Select | None = None  # the SELECT whose calls a DL/relation plan rewrites
    estimates: list[cost.Estimate] = field(default_factory=list)
    reason: str = ""
    forced: bool = False
    inputs: str = ""  # the row and distinct-count estimates the costs come from
    notes: list[str] = field(default_factory=list)  # why a plan family was not considered
    batch_rows: float | None = None  # distinct inputs estimate: the batch a DL-centric plan hands a model
    extra: list[str] = field(default_factory=list)  # printed last (offloaded models' policy and throughput)
    top_n: list[TopN] = field(default_factory=list)  # SELECTs whose ORDER BY ... LIMIT now runs before the calls
    rewritten_sql: str | None = None  # the statement a UDF-centric plan runs, when a rewrite changed it

    def explain(self) -> list[str]:
        names = {"udf": "UDF-centric", "dl": "DL-centric", "relation": "relation-centric"}
        lines = [f"reldl plan: {names[self.family]}" + (" (forced by SET reldl_plan)" if self.forced else "")]
        lines.append(f"  why: {self.reason}")
        for t in self.top_n:
            n = f"{t.rows} rows" if t.rows is not None else "the LIMIT's rows"
            lines.append(f"  {TOP_N_NOTE}: ORDER BY ... LIMIT over {t.source} first; the calls see at most {n}")
        if self.inputs:
            lines.append(f"  inputs: {self.inputs}")
        for e in self.estimates:
            mark = "*" if e.family == self.family else " "
            state = f"{e.seconds:.4g} s" if e.feasible else f"infeasible ({e.note})"
            ws = e.details.get("working_set_bytes")
            memory = f", working set {ws / 2**20:.3g} MiB" if ws is not None and e.feasible else ""
            lines.append(f"  {mark} {names[e.family]:<17} estimated {state}{memory}")
        lines += [f"    {n}" for n in self.notes]
        for c in self.calls:
            lines.append(f"  model call: {c.node.sql(dialect='duckdb', normalize_functions=False)}")
        return lines + [f"  {line}" for line in self.extra]


def model_calls(tree: exp.Expression) -> list[exp.Expression]:
    return [n for n in tree.find_all(exp.Anonymous) if str(n.this).lower() in SIGNATURES]


def canonical_args(call: exp.Expression) -> list[exp.Expression]:
    """Positional and named arguments -> the UDF's positional list, defaults filled in."""
    sig = SIGNATURES[str(call.this).lower()]
    given: dict[str, exp.Expression] = {}
    positional = [a for a in call.expressions if not isinstance(a, (exp.PropertyEQ, exp.Kwarg))]
    for (name, _, _), arg in zip(sig, positional):
        given[name] = arg
    for a in call.expressions:
        if isinstance(a, (exp.PropertyEQ, exp.Kwarg)):
            given[a.this.name.lower()] = a.expression
    out = []
    for name, _, default in sig:
        arg = given.get(name)
        if arg is None:
            arg = sqlglot.parse_one(default or "NULL", read="duckdb")
        out.append(arg.copy())
    return out


def _literal_model(call: exp.Expression, args: list[exp.Expression]) -> str | None:
    fn = str(call.this).lower()
    idx = [n for n, _, _ in SIGNATURES[fn]].index("model")
    arg = args[idx]
    return arg.this if isinstance(arg, exp.Literal) and arg.is_string else None


def target_select(tree: exp.Expression) -> tuple[exp.Select | None, str]:
    """The SELECT a DL/relation plan can rewrite: every model call in its scope, arguments from its FROM only."""
    stmt = tree
    if isinstance(stmt, (exp.Create, exp.Insert)):
        stmt = stmt.expression
    if not isinstance(stmt, exp.Select):
        return None, "not a plain SELECT (or CREATE TABLE AS / INSERT ... SELECT)"
    calls = model_calls(tree)
    if not stmt.args.get("from_") and not stmt.args.get("from"):
        return None, "SELECT without FROM"
    for c in calls:
        if c.parent_select is not stmt:
            return None, "a model call inside a subquery or CTE"
        parent = c.parent
        while parent is not None and parent is not stmt:
            if isinstance(parent, (exp.AggFunc, exp.Window)):
                return None, "a model call inside an aggregate or window function"
            parent = parent.parent
        for arg in c.expressions:
            if arg.find(exp.Subquery, exp.Select, exp.AggFunc, exp.Window):
                return None, "a model call whose arguments hold a subquery, aggregate or window"
            if arg.find(exp.Anonymous) and any(str(a.this).lower() in SIGNATURES for a in arg.find_all(exp.Anonymous)):
                return None, "nested model calls"
    return stmt, ""


def inputs_query(select: exp.Select, calls: list[CallSite]) -> exp.Select:
    """SELECT DISTINCT <each call's arguments, cast to the UDF's types> FROM <the statement's sources>."""
    cols = []
    for i, c in enumerate(calls):
        for j, ((_, typ, _), arg) in enumerate(zip(SIGNATURES[c.function], c.args)):
            value = _as_passed(c.function, j, arg)
            cols.append(exp.alias_(exp.cast(value, typ, dialect="duckdb"), f"a{i}_{j}"))
    q = exp.select(*cols).distinct()
    src = select.args.get("from_") or select.args.get("from")
    q.set("from_" if "from_" in select.args else "from", src.copy())
    if select.args.get("joins"):
        q.set("joins", [j.copy() for j in select.args["joins"]])
    in_where = any(c.node.find_ancestor(exp.Where) is not None for c in calls)
    if select.args.get("where") and not in_where:
        q.set("where", select.args["where"].copy())
    if select.args.get("with_") or select.args.get("with"):
        key = "with_" if "with_" in select.args else "with"
        q.set(key, select.args[key].copy())
    return q


def _key_conditions(calls: list[CallSite], ref) -> list[exp.Expression]:
    """NULL-safe equality of each call argument that references columns with its column of the results table
    (``ref(i, j)``); arguments without columns are the same on every row, so they are not part of the key."""
    conds = []
    for i, c in enumerate(calls):
        for j, ((_, typ, _), a) in enumerate(zip(SIGNATURES[c.function], c.args)):
            if not a.find(exp.Column):
                continue
            value = _as_passed(c.function, j, a)
            conds.append(exp.NullSafeEQ(this=ref(i, j), expression=exp.cast(value, typ, dialect="duckdb")))
    return conds


def lookup_rewrite(tree: exp.Expression, calls: list[CallSite], table: str) -> exp.Expression:
    """Replace each call with its result from `table` (one row per distinct argument tuple of all the calls).

    The results are attached with one ``LEFT JOIN`` on the argument tuple (NULL-safe equality), appended to the
    SELECT's joins: a plain hash join, which DuckDB can run out of core (a correlated lookup per call becomes a
    delim join that materializes the whole input and runs out of memory under a small ``memory_limit``). The join's
    columns are prefixed ``__reldl_`` and excluded from ``*``. A call inside an existing join's ON clause cannot see
    a join appended after it: then each call becomes a correlated scalar subquery on the table instead.
    """
    tree = tree.copy()
    by_sql = {c.node.sql(): i for i, c in enumerate(calls)}
    nodes = [(n, by_sql.get(n.sql())) for n in model_calls(tree)]
    nodes = [(n, i) for n, i in nodes if i is not None]
    if not nodes:
        return tree
    if any(n.find_ancestor(exp.Join) is not None for n, _ in nodes):
        return _subquery_rewrite(tree, calls, nodes, table)
    select = nodes[0][0].parent_select
    alias = "__reldl_d"
    keys = _key_conditions(calls, lambda i, j: exp.column(f"__reldl_a{i}_{j}", table=alias))
    cols = [
        exp.alias_(exp.column(f"a{i}_{j}"), f"__reldl_a{i}_{j}")
        for i, c in enumerate(calls)
        for j, a in enumerate(c.args)
        if a.find(exp.Column)
    ] + [exp.alias_(exp.column(f"r{i}"), f"__reldl_r{i}") for i in range(len(calls))]
    source = exp.Subquery(this=exp.select(*cols).from_(exp.to_table(table)), alias=exp.TableAlias(this=alias))
    joins = [j.copy() for j in select.args.get("joins") or []]
    for j in joins:  # FROM a, b: a comma binds looser than JOIN, so make it a CROSS JOIN before appending ours
        if not j.args.get("kind") and not j.args.get("side") and not j.args.get("on") and not j.args.get("using"):
            j.set("kind", "CROSS")
    joins.append(exp.Join(this=source, side="LEFT", on=exp.and_(*keys) if keys else exp.true()))
    select.set("joins", joins)
    hidden = [exp.column(e.alias) for e in cols]
    for star in [p for p in select.expressions if isinstance(p, exp.Star)]:
        star.set("except_", [*(star.args.get("except_") or []), *[h.copy() for h in hidden]])
    for node, i in nodes:
        node.replace(exp.column(f"__reldl_r{i}", table=alias))
    return tree


def _subquery_rewrite(tree: exp.Expression, calls: list[CallSite], nodes, table: str) -> exp.Expression:
    """Each call replaced by a correlated scalar subquery on `table` (keys of that call only)."""
    for node, i in nodes:
        conds = _key_conditions([calls[i]], lambda _, j, i=i: exp.column(f"a{i}_{j}", table="__d"))
        sub = exp.select(exp.column(f"r{i}", table="__d")).from_(exp.alias_(exp.to_table(table), "__d", table=True))
        if conds:
            sub = sub.where(exp.and_(*conds))
        node.replace(exp.Subquery(this=sub))
    return tree


def deterministic(call: CallSite) -> bool:
    """Whether identical arguments give identical results (else a DL plan's deduplication would change results)."""
    if call.function not in GENERATE:
        return True
    temperature, seed = call.args[3], call.args[6]
    greedy = isinstance(temperature, exp.Literal) and not temperature.is_string and float(temperature.this) == 0
    seeded = not isinstance(seed, exp.Null)
    beams = call.function == "llm_generate_list" and not isinstance(call.args[10], (exp.Null, exp.Struct))  # beams
    return greedy or seeded or beams


def new_table_name() -> str:
    return f"__reldl_results_{next(_names)}"


def analyse(tree: exp.Expression) -> tuple[list[CallSite], exp.Select | None, str]:
    calls = []
    for node in model_calls(tree):
        args = canonical_args(node)
        calls.append(CallSite(node, str(node.this).lower(), args, _literal_model(node, args)))
    select, why = target_select(tree)
    return calls, select, why


def limit_of(select: exp.Select) -> int | None:
    """Rows a streaming plan needs when a LIMIT applies directly to the model calls' rows."""
    limit = select.args.get("limit")
    if limit is None or select.args.get("order") or select.args.get("group") or select.args.get("distinct"):
        return None
    if any(isinstance(e, exp.AggFunc) for p in select.expressions for e in p.find_all(exp.AggFunc)):
        return None
    value = limit.expression if isinstance(limit, exp.Limit) else None
    if isinstance(value, exp.Literal) and not value.is_string:
        return int(value.this)
    return None


# ---------------------------------------------------------------------------------------- top-N before model calls

TOP_N_NOTE = "top-N before model calls"
_TOP_N_ARGS = {"expressions", "from_", "where", "order", "limit", "offset", "with_"}  # nothing else may be set
_PARAMS = (exp.Placeholder, exp.Parameter)  # copied into two ORDER BYs, a key's parameter would count twice
_VOLATILE = {"random", "rand", "uuid", "gen_random_uuid", "nextval", "setseed", "currval"}


@dataclass
class TopN:
    """One SELECT whose ORDER BY ... LIMIT now runs before its model calls."""

    rows: int | None  # LIMIT as a literal (None: a parameter)
    source: str  # the FROM item's name, which the subquery keeps
    select: exp.Select = field(repr=False, default=None)  # the rewritten SELECT (its calls' rows: at most `rows`)


def _name_is_scalar(node: exp.Expression, scalar) -> bool:
    return not isinstance(node, exp.Anonymous) or str(node.this).lower() in SIGNATURES or scalar(str(node.this))


def _count(value: exp.Expression | None) -> bool:
    """A LIMIT / OFFSET count the rewrite keeps as it is: an integer literal or a parameter."""
    if isinstance(value, exp.Literal):
        return not value.is_string and value.this.isdigit()
    return isinstance(value, _PARAMS)


def _top_n_keys(select: exp.Select, scalar) -> list[exp.Ordered] | None:
    """The ORDER BY keys with ordinals and select-list aliases replaced by their expressions (as DuckDB binds
    them: an alias before a column of the same name), or None when a key needs the model calls' results or the
    rewrite is not certain to keep DuckDB's semantics."""
    items = select.expressions
    aliases: dict[str, exp.Expression] = {}
    for e in items:
        if isinstance(e, exp.Alias):
            name = e.alias.lower()
            if name in aliases:
                return None  # ambiguous
            aliases[name] = e.this

    def lateral(expr: exp.Expression, before: int | None = None) -> bool:
        """An unqualified name in `expr` that may be a select-list alias (for select item `before`: the aliases of
        the items before it, which DuckDB's lateral aliases may refer to)."""
        names = aliases if before is None else {e.alias.lower() for e in items[:before] if isinstance(e, exp.Alias)}
        return any(not c.table and c.name.lower() in names for c in expr.find_all(exp.Column))

    keys = []
    for o in select.args["order"].expressions:
        key = o.this
        if isinstance(key, exp.Literal) and not key.is_string and key.this.isdigit():
            k = int(key.this)
            if not 1 <= k <= len(items) or any(e.find(exp.Star) for e in items[:k]):
                return None  # ordinals count the expanded columns of * / t.*
            key = items[k - 1].this if isinstance(items[k - 1], exp.Alias) else items[k - 1]
            if lateral(key, k - 1):
                return None
        elif isinstance(key, exp.Column) and not key.table and key.name.lower() in aliases:
            k = next(i for i, e in enumerate(items) if isinstance(e, exp.Alias) and e.alias.lower() == key.name.lower())
            key = items[k].this
            if lateral(key, k):
                return None
        elif isinstance(key, (exp.Literal, exp.Var)) or lateral(key):
            return None  # ORDER BY ALL, constants, an alias inside an expression
        if model_calls(key) or key.find(exp.Subquery, exp.Select, exp.AggFunc, exp.Window, exp.Star, *_PARAMS):
            return None
        if any(str(f.this).lower() in _VOLATILE for f in key.find_all(exp.Anonymous)) or key.find(exp.Rand):
            return None
        if not all(_name_is_scalar(f, scalar) for f in key.find_all(exp.Anonymous)):
            return None
        ordered = o.copy()
        ordered.set("this", key.copy())
        keys.append(ordered)
    return keys


def _top_n_one(select: exp.Select, scalar) -> TopN | None:
    """Rewrite `select` in place when its top-N can run before its model calls (see push_top_n)."""
    args = {k for k, v in select.args.items() if v}
    if not {"order", "limit", "from_"} <= args or not args <= _TOP_N_ARGS:
        return None  # joins, GROUP BY, HAVING, QUALIFY, DISTINCT, WINDOW, ... : left alone
    if isinstance(select.parent, exp.SetOperation):
        return None
    limit, offset = select.args["limit"], select.args.get("offset")
    if not isinstance(limit, exp.Limit) or set(k for k, v in limit.args.items() if v) != {"expression"}:
        return None  # LIMIT n% / WITH TIES / LIMIT a, b
    if not _count(limit.expression) or (offset is not None and not _count(offset.expression)):
        return None
    items = select.expressions
    if not any(model_calls(e) for e in items):
        return None
    if any(model_calls(select.args[part]) for part in ("from_", "where", "order") if select.args.get(part)):
        return None  # a call that filters or orders rows runs on every row anyway (LIMIT / OFFSET: counts, above)
    for e in items:
        if e.find(exp.AggFunc, exp.Window, exp.Subquery, exp.Select):
            return None
        if not all(_name_is_scalar(f, scalar) for f in e.find_all(exp.Anonymous)):
            return None  # an unknown function may be an aggregate
    outer_columns = [c for e in items for c in e.find_all(exp.Column)]
    outer_columns += [c for c in select.args["order"].find_all(exp.Column)]
    if any(c.args.get("db") or c.args.get("catalog") or c.name.lower() == "rowid" for c in outer_columns):
        return None  # schema.table.column, and the pseudo-column SELECT * does not carry
    names = {e.alias.lower() for e in items if isinstance(e, exp.Alias)}
    if select.args.get("where") is not None and any(
        not c.table and c.name.lower() in names for c in select.args["where"].find_all(exp.Column)
    ):
        return None  # DuckDB lets WHERE use a select-list alias, which the subquery would not see
    source = select.args["from_"].this
    alias = source.args.get("alias")
    if alias is not None and alias.this is not None:
        name = alias.this
    elif isinstance(source, exp.Table) and isinstance(source.this, exp.Identifier):
        name = source.this
    else:
        return None  # an unnamed FROM item: outer references could not find it again
    keys = _top_n_keys(select, scalar)
    if keys is None:
        return None
    inner = exp.Select(expressions=[exp.Star()])
    n = limit.expression
    name = name.copy()
    for part in ("from_", "where", "limit", "offset"):  # moved, not copied: nested rewrites stay in place
        node = select.args.get(part)
        select.set(part, None)
        if node is not None:
            inner.set(part, node)
    inner.set("order", exp.Order(expressions=keys))
    select.set("from_", exp.From(this=exp.Subquery(this=inner, alias=exp.TableAlias(this=name))))
    rows = int(n.this) if isinstance(n, exp.Literal) else None
    return TopN(rows, name.name, select)


def push_top_n(tree: exp.Expression, scalar=lambda name: False) -> tuple[exp.Expression, list[TopN]]:
    """Each SELECT with model calls in its select list and ORDER BY ... LIMIT [OFFSET] over one FROM item, with
    no aggregation, DISTINCT, window or set operation at its level, and ORDER BY keys that do not need the calls'
    results, becomes ``SELECT <list> FROM (SELECT * FROM <from> WHERE <where> ORDER BY <keys> LIMIT n OFFSET m) AS
    <the FROM item's name> ORDER BY <the original keys>``: DuckDB evaluates a select list before its top-N (the
    model UDFs have side effects, so it cannot defer them), so otherwise every row would reach the model. The
    subquery keeps the FROM item's name and all its columns, so the select list and ORDER BY bind as before;
    ordinals and aliases in the inner ORDER BY are replaced by their expressions. `scalar(name)` says whether a
    function sqlglot does not know is a scalar function (anything else might be an aggregate: left alone).
    Returns a rewritten copy (or `tree` itself when nothing applies) and what was rewritten."""

    def candidates(t: exp.Expression) -> list[exp.Select]:
        return [s for s in t.find_all(exp.Select) if s.args.get("order") and s.args.get("limit")]

    if not candidates(tree) or not model_calls(tree):
        return tree, []
    tree = tree.copy()
    done = [_top_n_one(select, scalar) for select in reversed(candidates(tree))]
    return tree, [top for top in done if top is not None]
