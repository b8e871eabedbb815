"""IR nodes -> sqlglot SELECTs over DuckDB. Each node's query reads its inputs by name (a CTE or a materialized table),
so the same builders serve one WITH query (:func:`with_query`) and step-by-step materialization (the trainer).

Every relation comes out as ``(keys..., v)``. Sums of tiles use ``reldl_tile_sum(list(v))``; sums of scalars ``SUM``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sqlglot import exp

from reldl.autodiff import symbolic as sym
from reldl.autodiff.ir import Aggregate, AutodiffError, Join, Node, Rename, Scan, Shape
from reldl.planner.relational import source_tree

Ref = Callable[[Node], exp.Expression]  # a node -> the table expression its rows are read from

_WITH = "with_" if "with_" in exp.Select.arg_types else "with"  # sqlglot renamed the key


def ident(name: str) -> exp.Identifier:
    return exp.to_identifier(name, quoted=not name.isidentifier() or name.lower() != name)


def col(name: str, table: str | None = None) -> exp.Column:
    return exp.column(ident(name), table=exp.to_identifier(table) if table else None)


def aliased(e: exp.Expression, name: str) -> exp.Alias:
    return exp.alias_(e, ident(name))


def table_as(ref: exp.Expression, alias: str) -> exp.Expression:
    t = ref.copy()
    t.set("alias", exp.TableAlias(this=exp.to_identifier(alias)))
    return t


def _source_tree(source) -> exp.Expression:
    """The planner's reading of a source (table name, query text or tree), as a FROM-able tree."""
    try:
        return source_tree(source)
    except TypeError as e:
        raise AutodiffError(f"a scan's {e}") from None


def tile_sum(v: exp.Expression, shape: Shape) -> exp.Expression:
    """The aggregate summing ``v`` over a group: SUM for scalars, element-wise for tiles."""
    if shape == ():
        return exp.Sum(this=v.copy())
    return sym.func("reldl_tile_sum", exp.Anonymous(this="list", expressions=[v.copy()]))


def zeros_like(v: exp.Expression, shape: Shape) -> exp.Expression:
    if shape == ():
        return sym.num(0.0)
    from reldl.autodiff.kernels import transform

    return transform(v, sym.num(0.0), with_index=False)


def select(*columns: exp.Expression) -> exp.Select:
    return exp.Select(expressions=list(columns))


def scan_raw(node: Scan) -> exp.Expression:
    """A scan's value column (or expression) over its source aliased ``s``, as stored."""
    return node.value.copy() if isinstance(node.value, exp.Expression) else col(node.value, "s")


def scan_value(node: Scan) -> exp.Expression:
    """A scan's value over its source aliased ``s``, cast to DOUBLE / DOUBLE[]."""
    return exp.Cast(this=scan_raw(node), to=exp.DataType.build("DOUBLE" if node.shape == () else "DOUBLE[]"))


def scan_query(node: Scan) -> exp.Select:
    src = table_as(_source_tree(node.source), "s")
    cols = [aliased(col(node.columns.get(k, k), "s"), k) for k in node.keys]
    return select(*cols, aliased(scan_value(node), "v")).from_(src)


def join_from(parts: Sequence[Node], ref: Ref, extra: Sequence[tuple[exp.Expression, Sequence[str]]] = ()):
    """FROM clause of a natural join of ``parts`` (aliased t0, t1, ...) plus ``extra`` (table, keys) joined on
    their keys; returns (select with FROM/JOINs, {key -> alias holding it})."""
    holder: dict[str, str] = {}
    q: exp.Select | None = None
    entries = [(ref(p), p.keys) for p in parts] + list(extra)
    for j, (table, keys) in enumerate(entries):
        alias = f"t{j}"
        t = table_as(table, alias)
        shared = [k for k in keys if k in holder]
        if q is None:
            q = select().from_(t)
        elif shared:
            on = exp.and_(*[exp.EQ(this=col(k, holder[k]), expression=col(k, alias)) for k in shared])
            q = q.join(t, on=on, join_type="inner")
        else:
            q = q.join(t, join_type="cross")
        for k in keys:
            holder.setdefault(k, alias)
    return q, holder


def _qualify(pred: exp.Expression, holder: dict[str, str]) -> exp.Expression:
    def sub(n: exp.Expression) -> exp.Expression:
        if isinstance(n, exp.Column) and not n.table and n.name in holder:
            return col(n.name, holder[n.name])
        return n

    return pred.copy().transform(sub)


def join_query(node: Join, ref: Ref) -> exp.Select:
    q, holder = join_from(node.parts, ref)
    args = [col("v", f"t{j}") for j in range(len(node.parts))]
    v = node.kernel.forward(args, [p.shape for p in node.parts])
    q = q.select(*[aliased(col(k, holder[k]), k) for k in node.keys], aliased(v, "v"))
    return q.where(_qualify(node.where, holder)) if node.where is not None else q


def aggregate_query(node: Aggregate, ref: Ref) -> exp.Select:
    src = node.source
    keys = [col(k) for k in node.keys]
    if node.fn == "count":
        v = exp.Count(this=exp.Star())
    elif node.fn == "sum":
        v = tile_sum(col("v"), src.shape)
    elif node.fn == "max":
        v = (
            exp.Max(this=col("v"))
            if src.shape == ()
            else sym.func("reldl_tile_max", exp.Anonymous(this="list", expressions=[col("v")]))
        )
    elif src.shape == ():  # avg
        v = exp.Avg(this=col("v"))
    else:  # avg of tiles: the element-wise sum over the group's count, outside the aggregate
        from reldl.autodiff.kernels import transform

        inner = select(
            *[aliased(c, c.name) for c in keys],
            aliased(tile_sum(col("v"), src.shape), "s"),
            aliased(exp.Count(this=exp.Star()), "c"),
        ).from_(table_as(ref(src), "t0"))
        inner = inner.group_by(*[c.copy() for c in keys]) if keys else inner
        v = transform(col("s"), sym.div(col("__x"), col("c")), with_index=False)
        return select(*[c.copy() for c in keys], aliased(v, "v")).from_(
            exp.Subquery(this=inner, alias=exp.TableAlias(this=exp.to_identifier("a")))
        )
    q = select(*[aliased(c, c.name) for c in keys], aliased(v, "v")).from_(table_as(ref(src), "t0"))
    return q.group_by(*[c.copy() for c in keys]) if keys else q


def fused_sum_query(node: Aggregate, join: Join, ref: Ref) -> exp.Select:
    """SUM over ``join`` grouped by ``node``'s keys, in one SELECT: the product relation is never stored."""
    q, holder = join_from(join.parts, ref)
    args = [col("v", f"t{j}") for j in range(len(join.parts))]
    shapes = [p.shape for p in join.parts]
    summed = join.kernel.forward_sum(args, shapes)
    if summed is None:
        summed = tile_sum(join.kernel.forward(args, shapes), join.shape)
    if join.where is not None:
        q = q.where(_qualify(join.where, holder))
    keys = [col(k, holder[k]) for k in node.keys]
    q = q.select(*[aliased(c, k) for c, k in zip(keys, node.keys)], aliased(summed, "v"))
    return q.group_by(*[c.copy() for c in keys]) if keys else q


def rename_query(node: Rename, ref: Ref) -> exp.Select:
    cols = [aliased(col(k), node.mapping.get(k, k)) for k in node.source.keys]
    return select(*cols, col("v")).from_(table_as(ref(node.source), "t0"))


def node_query(node: Node, ref: Ref) -> exp.Select:
    """The SELECT computing ``node`` from its inputs (read through ``ref``)."""
    if isinstance(node, Scan):
        return scan_query(node)
    if isinstance(node, Join):
        return join_query(node, ref)
    if isinstance(node, Aggregate):
        return aggregate_query(node, ref)
    if isinstance(node, Rename):
        return rename_query(node, ref)
    raise AutodiffError(f"unknown node {node!r}")


def with_query(ctes: Sequence[tuple[str, exp.Query]], final: exp.Select) -> exp.Select:
    """``WITH name AS (query), ... final``."""
    if not ctes:
        return final
    w = exp.With(expressions=[exp.CTE(this=q, alias=exp.TableAlias(this=ident(n))) for n, q in ctes])
    final.set(_WITH, w)
    return final
