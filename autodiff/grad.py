"""Reverse mode over the IR: from a scalar loss relation to one gradient relation per parameter, as SQL.

The result is a :class:`Program`: named steps (forward relations ``f<id>``, gradient relations ``g<id>``), each a
SELECT over earlier steps. Run it as one WITH query per parameter (:meth:`Program.gradient_query`), or materialize
every step once into temporary tables (:meth:`Program.materialize`, what training does each step).

Rules, for a consumer ``y`` of ``x`` with gradient ``gy`` (a relation on ``y``'s keys):

* Join ``y = k(x_0, ..., x_n)``: re-join the inputs with ``gy`` on ``y``'s keys, apply ``k``'s vector-Jacobian
  product for ``x_j``, and sum over the keys ``x_j`` lacks (GROUP BY ``x_j``'s keys). Filters are applied again.
* Aggregate ``y = agg_{keys - g}(x)``: broadcast ``gy`` to the group's members (join on ``g``); AVG divides by the
  group's size, MAX passes it to the members equal to the maximum; COUNT has no gradient.
* Rename: rename ``gy``'s keys back.
* Several consumers (or one join using ``x`` twice): contributions are stacked with UNION ALL and summed per key.

Gradients are sparse: a key with no row has gradient zero. The per-parameter query fills those with zeros (LEFT JOIN
from the parameter), so it returns one row per parameter row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlglot import exp

from reldl.autodiff import emit
from reldl.autodiff import symbolic as sym
from reldl.autodiff.emit import aliased, col, select, table_as, tile_sum
from reldl.autodiff.ir import Aggregate, AutodiffError, Join, Node, Rename, Scan, topological
from reldl.autodiff.kernels import Activated, at, transform

Names = Callable[[str], exp.Expression]  # step name -> table expression to read it from


def reachable(names: Sequence[str], edges: Callable[[str], Sequence[str]]) -> set[str]:
    """``names`` and every name reachable from them through ``edges`` (a step's dependencies)."""
    seen: set[str] = set()
    stack = list(names)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(edges(n))
    return seen


@dataclass
class Step:
    name: str
    build: Callable[[Names], exp.Select]
    deps: list[str]
    node: Node
    gradient: bool = False
    view: bool = False  # render as a view even though it computes (a cheap slice read once)


@dataclass
class Program:
    """Forward and gradient steps in dependency order; ``grads`` maps each parameter's node id to its step."""

    loss: Node
    steps: list[Step] = field(default_factory=list)
    grads: dict[int, str] = field(default_factory=dict)
    wrt: list[Scan] = field(default_factory=list)

    def step(self, name: str) -> Step:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __post_init__(self) -> None:
        self._by_name: dict[str, Step] = {}
        self._views: dict[str, bool] = {}

    def add(self, step: Step) -> None:
        self.steps.append(step)
        self._by_name[step.name] = step

    def closure(self, names: Sequence[str]) -> list[Step]:
        """The steps ``names`` need, in order."""
        need = reachable(names, lambda n: self._by_name[n].deps)
        return [s for s in self.steps if s.name in need]

    def _with(self, names: Sequence[str], last: exp.Select) -> exp.Select:
        """``last`` under a WITH of the steps ``names`` need."""
        return emit.with_query([(s.name, s.build(_cte_ref)) for s in self.closure(names)], last)

    def query(self, name: str) -> exp.Select:
        """One WITH query computing step ``name`` from the sources."""
        return self._with([name], select(exp.Star()).from_(_cte_ref(name)))

    def loss_query(self) -> exp.Select:
        return self.query(f"f{self.loss.id}")

    def gradient_query(self, param: Scan) -> exp.Select:
        """``(keys..., v)``: the loss's gradient for every row of ``param`` (zeros where it does not depend on it)."""
        if param.id not in self.grads:
            raise AutodiffError(f"{param.label()} is not among the parameters differentiated")
        g = self.grads[param.id]
        return self._with([g, f"f{param.id}"], _dense(param, _cte_ref(f"f{param.id}"), _cte_ref(g)))

    def is_view(self, name: str) -> bool:
        """Whether step ``name`` renders as a view: a scan, whose data (or a batch of it) costs more to copy into a
        table than to read twice, or a step that only renames or passes on another's columns (a Rename, the
        gradient of an addition's input), which a table would merely copy."""
        step = self._by_name[name]
        if step.view or (isinstance(step.node, Scan) and not step.gradient):
            return True
        if name not in self._views:
            self._views[name] = _is_projection(step.build(_cte_ref))
        return self._views[name]

    def statements(self, prefix: str, names: Sequence[str] | None = None) -> list[tuple[str, str, str]]:
        """``(step, table, CREATE OR REPLACE TEMP TABLE ... AS ...)`` for the steps (all, or those ``names`` need), in
        order; tables are named ``<prefix>_<step>`` (scans are TEMP VIEWs). Build once, execute every training step."""
        steps = self.closure(names) if names is not None else self.steps
        tables = {s.name: f"{prefix}_{s.name}" for s in steps}

        def ref(n: str) -> exp.Expression:
            return exp.Table(this=exp.to_identifier(tables[n]))

        out = []
        for s in steps:
            create = exp.Create(
                this=exp.Table(this=exp.to_identifier(tables[s.name])),
                kind="VIEW" if self.is_view(s.name) else "TABLE",
                expression=s.build(ref),
                replace=True,
                properties=exp.Properties(expressions=[exp.TemporaryProperty()]),
            )
            out.append((s.name, tables[s.name], create.sql("duckdb")))
        return out

    def materialize(self, duck: Any, prefix: str, names: Sequence[str] | None = None) -> dict[str, str]:
        """Run the steps (all, or those ``names`` need) into TEMP tables ``<prefix>_<step>``; returns step -> table."""
        tables = {}
        for step, table, sql in self.statements(prefix, names):
            duck.execute(sql)
            tables[step] = table
        return tables


def _is_projection(q: exp.Expression) -> bool:
    """A SELECT of plain columns (renamed or not) from one table: no joins, filters, grouping or expressions."""
    if not isinstance(q, exp.Select) or not isinstance(q.args.get("from_", q.args.get("from")), exp.From):
        return False
    if any(q.args.get(k) for k in ("joins", "where", "group", "having", "order", "limit", "distinct", "qualify")):
        return False
    if not isinstance(q.args.get("from_", q.args.get("from")).this, exp.Table):
        return False
    return all(isinstance(e.unalias() if isinstance(e, exp.Alias) else e, exp.Column) for e in q.expressions)


def _cte_ref(name: str) -> exp.Expression:
    return exp.Table(this=exp.to_identifier(name))


def _dense(param: Scan, pref: exp.Expression, gref: exp.Expression) -> exp.Select:
    cols = [aliased(col(k, "t0"), k) for k in param.keys]
    v = exp.Coalesce(this=col("v", "t1"), expressions=[emit.zeros_like(col("v", "t0"), param.shape)])
    on = (
        exp.and_(*[exp.EQ(this=col(k, "t0"), expression=col(k, "t1")) for k in param.keys])
        if param.keys
        else exp.true()
    )
    q = select(*cols, aliased(v, "v")).from_(table_as(pref, "t0"))
    q = q.join(table_as(gref, "t1"), on=on, join_type="left")
    return q.order_by(*[col(k, "t0") for k in param.keys]) if param.keys else q


def _seed(ref: Names) -> exp.Select:
    return select(aliased(sym.num(1.0), "v"))


def _group(keys: Sequence[str], q: exp.Select, shape, v: exp.Expression, key_cols: list[exp.Expression]) -> exp.Select:
    """q with ``keys`` + v summed per key (or as is when not grouped)."""
    q = q.select(*[aliased(c, k) for c, k in zip(key_cols, keys)], aliased(tile_sum(v, shape), "v"))
    return q.group_by(*[c.copy() for c in key_cols]) if keys else q


def _join_contribution(y: Join, j: int, gname: str, gkeys: Sequence[str]) -> Callable[[Names], exp.Select]:
    """Input ``j``'s share of the gradient of join ``y``, whose output gradient is ``gname`` on ``gkeys`` (y's keys,
    or, when y feeds only a SUM, that aggregate's keys: its gradient broadcast over y's rows)."""
    x = y.parts[j]

    shapes = [p.shape for p in y.parts]
    keep = list(range(len(y.parts)))
    if set(gkeys) == set(y.keys):
        # the gradient's rows are y's rows, each from one row of every input (keys are unique per row): inputs whose
        # values the vector-Jacobian product does not read (a bias for a weight's gradient, the weight for a bias's)
        # need not be joined again
        probe = [col("v", f"t{i}") for i in range(len(y.parts))]
        g = col("v", f"t{len(y.parts)}")
        forms = [y.kernel.vjp(j, probe, g, shapes), y.kernel.vjp_sum(j, probe, g, shapes)]
        used = {c.table for f in forms if f is not None for c in f.find_all(exp.Column) if c.name == "v"}
        keep = [i for i in keep if f"t{i}" in used]

    def build(ref: Names) -> exp.Select:
        parts = [y.parts[i] for i in keep]
        n = len(parts)
        q, holder = emit.join_from(parts, lambda p: ref(f"f{p.id}"), extra=[(ref(gname), gkeys)])
        pos = {i: p for p, i in enumerate(keep)}
        args = [col("v", f"t{pos[i]}") if i in pos else exp.null() for i in range(len(y.parts))]
        g = col("v", f"t{n}")
        if y.where is not None:
            q = q.where(emit._qualify(y.where, holder))
        # x's own keys come from x's alias, so a key x shares with an earlier input reads the same value
        key_cols = [col(k, holder[k]) for k in x.keys]
        if set(x.keys) == set(y.keys):
            v = y.kernel.vjp(j, args, g, shapes)
            return q.select(*[aliased(c, k) for c, k in zip(key_cols, x.keys)], aliased(v, "v"))
        summed = y.kernel.vjp_sum(j, args, g, shapes)
        if summed is None:
            return _group(x.keys, q, x.shape, y.kernel.vjp(j, args, g, shapes), key_cols)
        q = q.select(*[aliased(c, k) for c, k in zip(key_cols, x.keys)], aliased(summed, "v"))
        return q.group_by(*[c.copy() for c in key_cols]) if x.keys else q

    return build


def _aggregate_contribution(y: Aggregate, gname: str) -> Callable[[Names], exp.Select]:
    x = y.source

    def build(ref: Names) -> exp.Select:
        q = select().from_(table_as(ref(f"f{x.id}"), "t0"))
        g = list(y.keys)

        def on(alias: str) -> exp.Expression:
            return exp.and_(*[exp.EQ(this=col(k, "t0"), expression=col(k, alias)) for k in g]) if g else exp.true()

        q = q.join(table_as(ref(gname), "t1"), on=on("t1"), join_type="inner")
        gv = col("v", "t1")
        if y.fn == "sum":
            v = gv
        elif y.fn == "avg":
            counts = select(*[col(k) for k in g], aliased(exp.Count(this=exp.Star()), "n")).from_(ref(f"f{x.id}"))
            counts = counts.group_by(*[col(k) for k in g]) if g else counts
            q = q.join(exp.Subquery(this=counts, alias=exp.TableAlias(this=exp.to_identifier("t2"))), on=on("t2"))
            n = col("n", "t2")
            v = sym.div(gv, n) if x.shape == () else transform(gv, sym.div(col("__x"), n), with_index=False)
        elif y.fn == "max":
            q = q.join(table_as(ref(f"f{y.id}"), "t2"), on=on("t2"))
            if x.shape == ():
                hit = exp.EQ(this=col("v", "t0"), expression=col("v", "t2"))
                v = exp.Case(ifs=[exp.If(this=hit, true=gv)], default=sym.num(0.0))
            else:
                i = col("__i")
                hit = exp.EQ(this=col("__x"), expression=at(col("v", "t2"), i))
                v = transform(col("v", "t0"), exp.Case(ifs=[exp.If(this=hit, true=at(gv, i))], default=sym.num(0.0)))
        else:
            raise AutodiffError("COUNT has no gradient")
        return q.select(*[aliased(col(k, "t0"), k) for k in x.keys], aliased(v, "v"))

    return build


def _rename_contribution(y: Rename, gname: str) -> Callable[[Names], exp.Select]:
    back = {new: old for old, new in y.mapping.items()}

    def build(ref: Names) -> exp.Select:
        return select(*[aliased(col(k), back.get(k, k)) for k in y.keys], col("v")).from_(ref(gname))

    return build


def _sum_of(x: Node, parts: list[Callable[[Names], exp.Select]]) -> Callable[[Names], exp.Select]:
    if len(parts) == 1:
        return parts[0]

    def build(ref: Names) -> exp.Select:
        union: exp.Query = parts[0](ref)
        for p in parts[1:]:
            union = exp.union(union, p(ref), distinct=False)
        sub = exp.Subquery(this=union, alias=exp.TableAlias(this=exp.to_identifier("u")))
        return _group(x.keys, select().from_(sub), x.shape, col("v"), [col(k) for k in x.keys])

    return build


def backward(loss: Node, wrt: Sequence[Scan] | None = None) -> Program:
    """The forward and gradient steps of ``loss`` (a scalar relation: no keys, shape ()) for the parameters ``wrt``
    (default: every Scan marked ``param=True`` that the loss reads)."""
    if loss.keys or loss.shape != ():
        raise AutodiffError(f"the loss must be one scalar (no keys, shape ()), got keys {loss.keys} shape {loss.shape}")
    order = topological([loss])
    if wrt is None:
        wrt = [n for n in order if isinstance(n, Scan) and n.param]
    wrt = list(wrt)
    ids = {n.id for n in order}
    for p in wrt:
        if not isinstance(p, Scan):
            raise AutodiffError(f"gradients are taken for tables (scans), not {p!r}")
        if p.id not in ids:
            raise AutodiffError(f"the loss does not read {p.label()}")
    if not wrt:
        raise AutodiffError("no parameters to differentiate: mark scans with param=True or pass wrt")
    want = {p.id for p in wrt}
    order = _inline_activations(order, loss)
    by_id = {n.id: n for n in order}
    needs: dict[int, bool] = {}
    for n in order:
        needs[n.id] = n.id in want or any(needs[i.id] for i in n.inputs)

    prog = Program(loss=loss, wrt=wrt)
    consumers: dict[int, list[tuple[Node, int]]] = {n.id: [] for n in order}
    for y in order:
        for j, x in enumerate(y.inputs):
            consumers[x.id].append((y, j))
    # a join whose only consumer is a SUM is fused into it: the aggregate runs over the join directly (no product
    # relation is stored), and the join's inputs take the aggregate's gradient, broadcast by the join on its keys
    fused: dict[int, Aggregate] = {}
    for y in order:
        cons = consumers[y.id]
        if isinstance(y, Join) and len(cons) == 1 and isinstance(cons[0][0], Aggregate) and cons[0][0].fn == "sum":
            fused[y.id] = cons[0][0]
    for n in order:
        if n.id in fused:
            continue
        src = by_id[n.inputs[0].id] if isinstance(n, Aggregate) else None  # a stand-in where one replaced it
        if src is not None and src.id in fused:
            prog.add(Step(f"f{n.id}", _fused_forward(n, src), [f"f{p.id}" for p in src.parts], n))
        else:
            prog.add(Step(f"f{n.id}", _forward(n), [f"f{i.id}" for i in n.inputs], n))

    prog.add(Step(f"g{loss.id}", _seed, [], loss, gradient=True))
    for x in reversed(order):
        if x is loss or not needs[x.id] or x.id in fused:
            continue
        parts, deps = [], []
        for y, j in consumers[x.id]:
            if not needs[y.id] and y.id not in want:
                continue
            gname = f"g{y.id}"
            if isinstance(y, Join):
                if y.kernel.zero_partial(j):  # e.g. a relation joined only for its rows: nothing flows back
                    continue
                if not y.kernel.differentiable(j):
                    raise AutodiffError(f"kernel {y.kernel.name} has no gradient for input {j} ({x.label()})")
                z = fused.get(y.id)
                gname, gkeys = (f"g{z.id}", z.keys) if z is not None else (gname, y.keys)
                parts.append(_join_contribution(y, j, gname, gkeys))
                deps += [f"f{p.id}" for p in y.parts] + [gname]
            elif isinstance(y, Aggregate):
                if y.fn == "count":
                    continue
                parts.append(_aggregate_contribution(y, gname))
                deps += [f"f{x.id}", gname] + ([f"f{y.id}"] if y.fn == "max" else [])
            elif isinstance(y, Rename):
                parts.append(_rename_contribution(y, gname))
                deps.append(gname)
        if not parts:  # nothing differentiable reaches the loss through x: gradient zero, no rows
            prog.add(Step(f"g{x.id}", _empty(x), [f"f{x.id}"], x, gradient=True))
        else:
            prog.add(Step(f"g{x.id}", _sum_of(x, parts), sorted(set(deps)), x, gradient=True))
    prog.grads = {p.id: f"g{p.id}" for p in wrt}
    prog.steps = ordered(prog.steps)
    return prog


def _inline_activations(order: list[Node], loss: Node) -> list[Node]:
    """``order`` with each unary element-wise join whose only consumer is a matmul or dense layer (as its first input,
    on row-block tiles) folded into that consumer: the consumer becomes a stand-in node (same id, keys and shape)
    whose :class:`~reldl.autodiff.kernels.Activated` kernel applies the element-wise function inside its UDF, and
    the element-wise join gets no step (its output, e.g. ``relu(z)``, is never stored; its gradient is computed with
    the consumer's input gradient, in one call)."""
    uses: dict[int, int] = {}
    for y in order:
        for x in y.inputs:
            uses[x.id] = uses.get(x.id, 0) + 1
    inlined: set[int] = set()
    stand_in: dict[int, Join] = {}
    for y in order:
        if not isinstance(y, Join) or not y.parts:
            continue
        e = y.parts[0]
        if not isinstance(e, Join) or e is loss or uses.get(e.id) != 1 or len(e.parts) != 1 or e.where is not None:
            continue
        shapes = [e.parts[0].shape, *[p.shape for p in y.parts[1:]]]
        if not Activated.fusable(y.kernel, e.kernel, shapes):
            continue
        node = Join(
            y.keys,
            y.shape,
            parts=(e.parts[0], *y.parts[1:]),
            kernel=Activated(y.kernel, e.kernel),
            where=y.where,
            name=y.name,
        )
        node.id = y.id  # stands in for y: its steps keep y's names
        stand_in[y.id] = node
        inlined.add(e.id)
    return [stand_in.get(n.id, n) for n in order if n.id not in inlined]


def _forward(n: Node) -> Callable[[Names], exp.Select]:
    return lambda ref: emit.node_query(n, lambda m: ref(f"f{m.id}"))


def _fused_forward(z: Aggregate, y: Join) -> Callable[[Names], exp.Select]:
    return lambda ref: emit.fused_sum_query(z, y, lambda m: ref(f"f{m.id}"))


def _empty(x: Node) -> Callable[[Names], exp.Select]:
    return lambda ref: select(*[col(k) for k in x.keys], col("v")).from_(ref(f"f{x.id}")).limit(0)


def ordered(steps: Sequence[Step]) -> list[Step]:
    """``steps`` in an order where every step follows its dependencies (forward first, then gradients in reverse)."""
    done: set[str] = set()
    out: list[Step] = []
    pending = list(steps)
    while pending:
        rest = []
        for s in pending:
            if all(d in done for d in s.deps):
                out.append(s)
                done.add(s.name)
            else:
                rest.append(s)
        if len(rest) == len(pending):
            raise AutodiffError("internal: gradient steps have a dependency cycle")
        pending = rest
    return out
