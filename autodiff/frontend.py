"""The SQL front end: a loss written as a SELECT over parameter and data tables, lowered to the IR and differentiated.

    grad(con, '''SELECT AVG(POWER(s.pred - y.v, 2)) FROM
                   (SELECT x.i, SUM(x.v * w.v) AS pred FROM x JOIN w ON x.j = w.j GROUP BY x.i) AS s
                   JOIN y ON s.i = y.i''', wrt=["w"])
    -> {"w": "WITH ... SELECT j, v FROM ..."}   # one row per row of w: its key columns and the gradient

The supported subset (anything else is an AutodiffError naming it):

* FROM: tables, CTEs and subqueries in FROM, combined with inner JOIN ... ON / USING or commas; equalities between
  columns of two relations (in ON or WHERE) are join keys; other WHERE conditions filter on key columns.
* SELECT: either aggregates (SUM, AVG, COUNT(*), COUNT(col)) over arithmetic, with GROUP BY columns, or plain
  arithmetic per row; expressions may combine several aggregates (``SUM(a) / COUNT(*)``). Arithmetic is what
  :mod:`reldl.autodiff.symbolic` differentiates: + - * /, POWER, EXP, LN, LOG, SQRT, TANH, ABS, GREATEST, LEAST, CASE.
* Tables hold scalar tuples: a table's columns used in arithmetic are values, the others are its keys (a table with
  none is keyed by its rowid); a parameter table has exactly one value column. The outermost SELECT returns one row
  and one column: the loss.

A table read twice (a self-join, or in two subqueries) gets the sum of both contributions to its gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlglot
from sqlglot import exp

from reldl.autodiff import emit, ir
from reldl.autodiff import symbolic as sym
from reldl.autodiff.grad import _cte_ref, backward
from reldl.autodiff.ir import AutodiffError, Node, Scan
from reldl.autodiff.kernels import expression

_AGGS = {exp.Sum: "sum", exp.Avg: "avg", exp.Count: "count"}


@dataclass
class Relation:
    """A FROM item as the block sees it: key columns and value columns, each value a node keyed by ``keys``."""

    alias: str
    columns: list[str]
    keys: list[str] = field(default_factory=list)  # column names (of this relation) that are keys
    values: dict[str, Node] = field(default_factory=dict)  # value column -> node (keys named by key_names)
    key_only: Node | None = None
    key_names: dict[str, str] = field(default_factory=dict)  # key column -> key name inside the block
    table: str | None = None  # base table name, for parameters


def _name(e: exp.Expression) -> str:
    return e.alias_or_name


class _Lowering:
    def __init__(self, duck: Any, wrt: Sequence[str]):
        self.duck = duck
        self.wrt = {w.lower() for w in wrt}
        self.ctes: dict[str, exp.Query] = {}
        self.params: dict[str, list[Scan]] = {}  # table -> its parameter scans

    # -- FROM items ------------------------------------------------------------------------------------------------

    def columns_of(self, table: exp.Table) -> list[str]:
        q = exp.select("*").from_(table.copy()).limit(0)
        try:
            return [d[0] for d in self.duck.execute(q.sql("duckdb")).description]
        except Exception as e:  # noqa: BLE001 - DuckDB's own message names the table
            raise AutodiffError(f"cannot read table {table.sql('duckdb')}: {str(e).splitlines()[0]}") from None

    def from_items(self, select: exp.Select) -> list[tuple[str, exp.Expression]]:
        items = []
        src = select.args.get("from") or select.args.get("from_")
        if src is None:
            raise AutodiffError("the loss query has no FROM")
        items.append(src.this)
        for j in select.args.get("joins") or []:
            kind = (j.args.get("side") or "", j.args.get("kind") or "")
            if kind[0] or kind[1] not in ("", "INNER", "CROSS"):
                raise AutodiffError(f"only inner joins are supported, not {j.sql('duckdb')!r}")
            items.append(j.this)
        out = []
        for it in items:
            alias = it.alias_or_name
            if not alias:
                raise AutodiffError(f"give {it.sql('duckdb')!r} an alias")
            out.append((alias, it))
        if len({a for a, _ in out}) != len(out):
            raise AutodiffError("two FROM items share an alias")
        return out

    # -- one SELECT block ------------------------------------------------------------------------------------------

    def block(self, select: exp.Expression) -> tuple[list[str], dict[str, Node]]:
        """Lower a SELECT: (output key columns, {output value column: node keyed by those names})."""
        if not isinstance(select, exp.Select):
            raise AutodiffError(f"only SELECT blocks are supported, not {select.key.upper()}")
        for w in (select.args.get("with") or select.args.get("with_") or exp.With()).expressions:
            self.ctes[w.alias.lower()] = w.this
        for bad in ("having", "order", "limit", "distinct", "qualify"):
            if select.args.get(bad):
                raise AutodiffError(f"{bad.upper()} is not supported in a differentiated query")
        items = self.from_items(select)
        conds = []
        for j in select.args.get("joins") or []:
            if j.args.get("on") is not None:
                conds.append(j.args["on"])
            for u in j.args.get("using") or []:
                conds.append(("using", u.name, j.this.alias_or_name))
        if select.args.get("where") is not None:
            conds.append(select.args["where"].this)

        # what each FROM item exposes
        rels: dict[str, Relation] = {}
        sub_blocks: dict[str, tuple[list[str], dict[str, Node]]] = {}
        for alias, it in items:
            if isinstance(it, exp.Subquery) or (isinstance(it, exp.Table) and it.name.lower() in self.ctes):
                query = it.this if isinstance(it, exp.Subquery) else self.ctes[it.name.lower()]
                keys, values = self.block(query)
                sub_blocks[alias] = (keys, values)
                rels[alias] = Relation(alias, keys + list(values))
            elif isinstance(it, exp.Table):
                bare = exp.table_(it.name, db=it.db or None, catalog=it.catalog or None)
                rels[alias] = Relation(alias, self.columns_of(bare), table=bare.sql("duckdb"))
            else:
                raise AutodiffError(f"unsupported FROM item {it.sql('duckdb')!r}")

        def resolve(c: exp.Column) -> tuple[str, str]:
            if c.table:
                if c.table not in rels:
                    raise AutodiffError(f"unknown table or alias {c.table!r}")
                if c.name not in rels[c.table].columns:
                    raise AutodiffError(f"{c.table} has no column {c.name!r}")
                return c.table, c.name
            owners = [a for a, r in rels.items() if c.name in r.columns]
            if len(owners) != 1:
                raise AutodiffError(f"column {c.name!r} is {'ambiguous' if owners else 'unknown'}")
            return owners[0], c.name

        # join keys: equalities between two relations' columns (union-find over (alias, column))
        parent: dict[tuple[str, str], tuple[str, str]] = {}

        def find(x):
            while parent.setdefault(x, x) != x:
                x = parent[x]
            return x

        filters: list[exp.Expression] = []
        for cond in conds:
            if isinstance(cond, tuple):  # USING (col)
                _, name, right = cond
                left = [a for a in rels if a != right and name in rels[a].columns]
                if not left:
                    raise AutodiffError(f"USING ({name}): no other relation has it")
                parent[find((left[0], name))] = find((right, name))
                continue
            for part in cond.flatten() if isinstance(cond, exp.And) else [cond]:
                if (
                    isinstance(part, exp.EQ)
                    and isinstance(part.this, exp.Column)
                    and isinstance(part.expression, exp.Column)
                ):
                    a, b = resolve(part.this), resolve(part.expression)
                    if a[0] != b[0]:
                        parent[find(a)] = find(b)
                        continue
                filters.append(part)

        groups = [
            resolve(g) if isinstance(g, exp.Column) else None
            for g in (select.args.get("group") or exp.Group()).expressions
        ]
        if any(g is None for g in groups):
            raise AutodiffError("GROUP BY must list columns")

        outputs = select.expressions
        for o in outputs:
            if (
                o.find(exp.Subquery, exp.Select) is not None
                or isinstance(o, exp.Star)
                or o.find(exp.Star)
                and not o.find(exp.Count)
            ):
                raise AutodiffError(f"{o.sql('duckdb')!r}: subqueries and * in the SELECT list are not supported")
            if o.find(exp.Window) is not None:
                raise AutodiffError(f"{o.sql('duckdb')!r}: window functions are not supported")
        aggregated = any(o.find(exp.AggFunc) for o in outputs)
        value_cols: set[tuple[str, str]] = set()
        for o in outputs:
            for c in o.find_all(exp.Column):
                rc = resolve(c)
                if not (aggregated and rc in groups and not _inside_agg(c)):
                    value_cols.add(rc)
        key_cols: set[tuple[str, str]] = set(parent) | set(groups)
        for f in filters:
            for c in f.find_all(exp.Column):
                key_cols.add(resolve(c))

        # key names: one per equality class
        names: dict[tuple[str, str], str] = {}
        for kc in sorted(key_cols):
            root = find(kc)
            if root not in names:
                names[root] = f"{root[0]}_{root[1]}".replace(".", "_")
            names[kc] = names[root]

        # each relation's scans / renamed sub-block nodes
        for alias, rel in rels.items():
            if alias in sub_blocks:
                skeys, svalues = sub_blocks[alias]
                bad = [c for c in skeys if (alias, c) in value_cols]
                if bad:
                    raise AutodiffError(f"{alias}.{bad[0]} is a GROUP BY key of its subquery, not a value")
                rel.keys = skeys
                rel.key_names = {c: names.get((alias, c), f"{alias}_{c}") for c in skeys}
                for c, node in svalues.items():
                    mapping = {k: rel.key_names[k] for k in skeys if rel.key_names[k] != k}
                    rel.values[c] = ir.rename(node, mapping) if mapping else node
                first = next(iter(rel.values.values()))
                rel.key_only = ir.join(expression("1.0", ["x"]), first)  # the rows, no value: no gradient
                continue
            vals = [c for c in rel.columns if (alias, c) in value_cols]
            keys = [c for c in rel.columns if (alias, c) in key_cols or (alias, c) not in value_cols]
            tname = rel.table.lower()
            match = next((w for w in self.wrt if w in (tname, tname.split(".")[-1])), None)
            is_param = match is not None
            if is_param:
                keys = [c for c in rel.columns if c not in vals]
                if len(vals) != 1:
                    raise AutodiffError(f"parameter table {rel.table} must use exactly one value column, uses {vals}")
                if any((alias, c) in key_cols for c in vals):
                    raise AutodiffError(f"parameter {rel.table}.{vals[0]} cannot be a join key or filter")
            source: Any = rel.table
            rel.keys = keys or ([] if is_param else ["rowid"])  # a keyless parameter is one scalar
            if not keys and not is_param:
                source = exp.select("rowid", "*").from_(exp.to_table(rel.table, dialect="duckdb"))
            rel.key_names = {c: names.get((alias, c), f"{alias}_{c}") for c in rel.keys}
            scan_keys = tuple(rel.key_names[c] for c in rel.keys)
            cols = {rel.key_names[c]: c for c in rel.keys}
            for c in vals:
                sc = Scan(scan_keys, (), source=source, value=c, columns=cols, param=is_param, name=f"{alias}.{c}")
                rel.values[c] = sc
                if is_param:
                    self.params.setdefault(match, []).append(sc)
            rel.key_only = Scan(scan_keys, (), source=source, value=sym.num(1.0), columns=cols, name=alias)

        def bind(e: exp.Expression) -> tuple[exp.Expression, list[Node]]:
            """e with its value columns replaced by placeholders x0.., and the nodes they stand for (plus every
            relation's key-only node, so the join has the FROM's rows)."""
            inputs: list[Node] = []
            slots: dict[tuple[str, str], str] = {}

            def sub(n: exp.Expression) -> exp.Expression:
                if isinstance(n, exp.Column):
                    rc = resolve(n)
                    if rc in value_cols and not (aggregated and rc in groups and not _inside_agg(n)):
                        if rc not in slots:
                            slots[rc] = f"x{len(slots)}"
                            inputs.append(rels[rc[0]].values[rc[1]])
                        return exp.column(slots[rc])
                    raise AutodiffError(f"{rc[0]}.{rc[1]} is a key here; it cannot be used in arithmetic")
                return n

            bound = e.copy().transform(sub)
            used = {id(n) for n in inputs}
            for rel in rels.values():
                if not any(id(v) in used for v in rel.values.values()):
                    inputs.append(rel.key_only)
            return bound, inputs

        where = None
        if filters:
            qual = exp.and_(*filters).transform(
                lambda n: exp.column(names[resolve(n)]) if isinstance(n, exp.Column) else n
            )
            where = qual

        def apply(e: exp.Expression) -> Node:
            bound, inputs = bind(e)
            placeholders = [f"x{i}" for i in range(len(inputs))]
            return ir.join(expression(bound, placeholders), *inputs, where=where)

        out_keys = [names[g] for g in groups]
        out_values: dict[str, Node] = {}
        key_outputs: dict[str, str] = {}  # key name in the block -> output column name
        for o in outputs:
            e = o.this if isinstance(o, exp.Alias) else o
            if isinstance(e, exp.Column) and resolve(e) in key_cols and (not aggregated or resolve(e) in groups):
                key_outputs[names[resolve(e)]] = _name(o)  # a key in the output
                continue
            if not aggregated:
                out_values[_name(o)] = apply(e)
                continue
            aggs: list[Node] = []

            def lower_agg(n: exp.Expression, aggs: list[Node] = aggs) -> exp.Expression:
                if type(n) in _AGGS:
                    fn = _AGGS[type(n)]
                    arg = n.this
                    if isinstance(arg, exp.Distinct):
                        raise AutodiffError("DISTINCT aggregates are not supported")
                    if fn == "count":
                        body = apply(sym.num(1.0)) if arg is None or isinstance(arg, exp.Star) else apply(arg)
                    else:
                        body = apply(arg)
                    aggs.append(ir.aggregate(body, out_keys, fn))
                    return exp.column(f"__agg{len(aggs) - 1}")
                if isinstance(n, exp.AggFunc):
                    raise AutodiffError(f"aggregate {n.key.upper()} is not supported (SUM, AVG, COUNT)")
                return n

            combined = e.copy().transform(lower_agg)
            if any(not c.name.startswith("__agg") for c in combined.find_all(exp.Column)):
                raise AutodiffError(f"{o.sql('duckdb')!r} mixes row values with aggregates")
            if isinstance(combined, exp.Column) and len(aggs) == 1:
                out_values[_name(o)] = aggs[0]
            else:
                out_values[_name(o)] = ir.join(expression(combined, [f"__agg{i}" for i in range(len(aggs))]), *aggs)
        if not out_values:
            raise AutodiffError("the query returns no value column")
        node_keys = set(next(iter(out_values.values())).keys)
        if aggregated:
            missing = [names[g] for g in groups if names[g] not in key_outputs]
            if missing:
                raise AutodiffError("select every GROUP BY column, so the result's rows can be told apart")
        elif node_keys != set(key_outputs):
            raise AutodiffError("a row-level subquery must select all its key (join) columns")
        mapping = {k: n for k, n in key_outputs.items() if k != n}
        renamed = {c: (ir.rename(v, mapping) if mapping else v) for c, v in out_values.items()}
        return [key_outputs[k] for k in next(iter(out_values.values())).keys], renamed


def _inside_agg(c: exp.Expression) -> bool:
    return c.find_ancestor(*_AGGS) is not None


def lower(duck: Any, loss_sql: str | exp.Expression, wrt: Sequence[str]) -> tuple[Node, dict[str, list[Scan]]]:
    """The loss query as an IR node (one row, no keys), and each parameter table's scans."""
    tree = sqlglot.parse_one(loss_sql, read="duckdb") if isinstance(loss_sql, str) else loss_sql
    low = _Lowering(duck, wrt)
    keys, values = low.block(tree)
    if keys or len(values) != 1:
        raise AutodiffError("the loss query must return one row with one column (no GROUP BY at the top)")
    loss = next(iter(values.values()))
    if loss.keys:
        raise AutodiffError("the loss query must return one row: aggregate it (SUM, AVG) at the top")
    missing = [w for w in wrt if w.lower() not in low.params]
    if missing:
        raise AutodiffError(f"the loss does not use the parameter table(s) {missing} as values")
    return loss, low.params


def gradient_sql(duck: Any, loss_sql: str, wrt: Sequence[str]) -> dict[str, str]:
    """DuckDB SQL per parameter table: its key columns and ``v``, the gradient of the loss, one row per table row."""
    if isinstance(wrt, str):
        wrt = [wrt]
    loss, scans = lower(duck, loss_sql, wrt)
    prog = backward(loss, [s for w in wrt for s in scans[w.lower()]])
    out = {}
    for w in wrt:
        ss = scans[w.lower()]
        steps = prog.closure([prog.grads[s.id] for s in ss])
        ref = _cte_ref
        ctes = [(s.name, s.build(ref)) for s in steps]
        cols = list(ss[0].columns.values())
        parts: exp.Query | None = None
        for s in ss:
            q = emit.select(*[emit.aliased(emit.col(k), s.columns[k]) for k in s.keys], emit.col("v")).from_(
                ref(prog.grads[s.id])
            )
            parts = q if parts is None else exp.union(parts, q, distinct=False)
        summed = emit.select(*[emit.col(c) for c in cols], emit.aliased(exp.Sum(this=emit.col("v")), "v")).from_(
            exp.Subquery(this=parts, alias=exp.TableAlias(this=exp.to_identifier("u")))
        )
        summed = summed.group_by(*[emit.col(c) for c in cols]) if cols else summed
        ctes.append(("__grad", summed))
        table = exp.to_table(ss[0].source, dialect="duckdb")
        final = emit.select(
            *[emit.aliased(emit.col(c, "p"), c) for c in cols],
            emit.aliased(exp.Coalesce(this=emit.col("v", "g"), expressions=[sym.num(0.0)]), "v"),
        )
        final = final.from_(emit.table_as(table, "p"))
        on = (
            exp.and_(*[exp.EQ(this=emit.col(c, "p"), expression=emit.col(c, "g")) for c in cols])
            if cols
            else exp.true()
        )
        final = final.join(emit.table_as(exp.Table(this=exp.to_identifier("__grad")), "g"), on=on, join_type="left")
        if cols:
            final = final.order_by(*[emit.col(c, "p") for c in cols])
        out[w] = emit.with_query(ctes, final).sql("duckdb")
    return out
