"""Relation-centric MLP inference: the weights are a DuckDB table and a forward pass is one SQL query over it, so
the work runs inside DuckDB's executor and buffer manager: streamed chunk by chunk, or joined and aggregated with
spilling to the temp directory, where PyTorch would need weights plus activations in memory at once.

Weight table layout (one table per model, e.g. ``reldl.w_<model>``), written by :func:`store_weights`::

    layer    INTEGER   -- 0-based layer index
    j        INTEGER   -- 0-based output unit of the layer (row j of its weight W [out, in])
    in_block INTEGER   -- 0-based block of the input dimension: columns [in_block*tile, (in_block+1)*tile) of row j
    w        DOUBLE[]  -- W[j, in_block*tile : (in_block+1)*tile]; the last block of a row may be shorter
    b        DOUBLE    -- bias[j] on in_block 0, 0.0 on the other blocks (so a SUM over blocks adds it once)

One row per (layer, output unit, input block), written in (layer, in_block, j) order. ``tile`` is the knob, per layer:

* ``tile`` >= the layer's input width (``tile=None``: every layer) keeps whole rows, and the query streams: the
  layer's rows are gathered once into a matrix (``list(w ORDER BY j)``, a list of rows), cross-joined with the input
  rows and applied with ``list_transform(m, lambda r, i: list_dot_product(r, x) + bb[i])``, then the activation in
  another ``list_transform``. No join on data and no aggregate over input rows: DuckDB processes chunks of 2048 rows,
  so memory stays about (chunk x width) whatever the number of rows, and nothing needs to spill. The fastest path,
  but the layer's matrix is one value, so it must fit in memory.
* a smaller ``tile`` cuts x into the same blocks (``x[blk*tile+1 : blk*tile+tile]`` against ``range(0, n_blocks)``),
  joins them with the weight tiles on ``in_block``, sums ``list_dot_product(w, xt) + b`` in ``GROUP BY rid, j``,
  applies the activation, and re-assembles each row's vector in ``GROUP BY rid`` as a list of ``{j, v}`` structs
  sorted by j. Hash join and aggregates spill, so weights larger than memory (and DuckDB's own working set of
  per-(row, unit) partial sums) go through the temp directory. Several times slower; for huge or sparse layers.

Layers are chained as CTEs, one select over the input relation ``(rid, x)`` (:func:`forward_query`); the SQL of a small
model is shown by ``print(forward_query(...).sql("duckdb", pretty=True))``. Input rows whose x is NULL or holds a NULL
element get a NULL output (NULL in, NULL out); an x of the wrong length raises an error. Everything is DOUBLE.

Activations: identity, relu, tanh, sigmoid, gelu. DuckDB has no ``erf``, so gelu's exact (erf) form, torch's default
``F.gelu``, uses an erf built here from piecewise polynomials (fitted at import by Chebyshev interpolation of
``math.erf``; absolute error about 3e-15), not the tanh approximation (which differs from torch by up to 5e-4).

This module only builds SQL (sqlglot ASTs from fixed templates; table names go through ``exp.to_table``, numbers
through literals) and writes the weight table; it imports nothing else of reldl.
"""

from __future__ import annotations

import functools
import math
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import sqlglot
from sqlglot import exp

ACTIVATIONS = ("identity", "relu", "tanh", "sigmoid", "gelu")
TASKS = ("regression", "binary", "multiclass")

# (weight [out, in], bias [out], activation) as torch tensors, numpy arrays or nested lists
WeightLayer = tuple[Any, Any, str]
# input-block width: one for every layer, or one per layer (None: whole rows)
Tiles = int | None | Sequence[int | None]
# (in, out, activation): the shape of a layer, as TabularSpec.layers holds it
LayerShape = tuple[int, int, str]

_WITH = "with_" if "with_" in exp.Select.arg_types else "with"  # sqlglot renamed the key


# ---------------------------------------------------------------------------------------------------------------------
# weights


def _as_f64(a: Any, name: str) -> np.ndarray:
    if hasattr(a, "detach"):  # torch.Tensor, without importing torch
        a = a.detach().cpu().double().numpy()
    out = np.asarray(a, dtype=np.float64)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name} holds NaN or infinite values")
    return out


def _check_activation(act: str, i: int) -> str:
    if act not in ACTIVATIONS:
        raise ValueError(f"layer {i}: unknown activation {act!r} (one of {', '.join(ACTIVATIONS)})")
    return act


def _check_tile(tile: int | None) -> int | None:
    if tile is None:
        return None
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 1:
        raise ValueError(f"tile must be a positive integer or None (whole rows), got {tile!r}")
    return int(tile)


def _layer_tiles(tile: Tiles, n_layers: int) -> list[int | None]:
    """``tile`` for every layer: one width (or None) for all, or a sequence with one per layer."""
    if isinstance(tile, (list, tuple)):
        if len(tile) != n_layers:
            raise ValueError(f"tile: {len(tile)} widths given for {n_layers} layers")
        return [_check_tile(t) for t in tile]
    return [_check_tile(tile)] * n_layers


def _checked_layer(i: int, weight: Any, bias: Any, act: str) -> tuple[np.ndarray, np.ndarray]:
    """Layer ``i``'s weight [out, in] and bias [out] as float64 arrays, its activation checked."""
    _check_activation(act, i)
    w = _as_f64(weight, f"layers.{i}.weight")
    b = _as_f64(bias, f"layers.{i}.bias")
    if w.ndim != 2 or b.shape != (w.shape[0],):
        raise ValueError(f"layer {i}: weight must be [out, in] and bias [out], got {w.shape} and {b.shape}")
    return w, b


def store_weights(
    duck: Any, table: str, layers: Sequence[WeightLayer], tile: Tiles = 64, only: Sequence[int] | None = None
) -> None:
    """Write an MLP's weights into ``table`` (``CREATE OR REPLACE``; its schema is created if missing).

    ``layers``: ``(weight [out, in], bias [out], activation)`` per dense layer, in order; ``tile``: input-block width,
    None for whole rows, for every layer or one per layer; ``only``: the layers to write (default all; the others
    may come from :func:`store_matrices`). The layout is in the module docstring. Inserted in one statement from an
    Arrow table.
    """
    if not layers:
        raise ValueError("a model needs at least one layer")
    tiles = _layer_tiles(tile, len(layers))
    cols: dict[str, list[np.ndarray]] = {"layer": [], "j": [], "in_block": [], "b": []}
    values: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    prev_out = None
    for i, (weight, bias, act) in enumerate(layers):
        w, b = _checked_layer(i, weight, bias, act)
        out_dim, in_dim = w.shape
        if prev_out is not None and in_dim != prev_out:
            raise ValueError(f"layer {i} takes {in_dim} inputs but layer {i - 1} gives {prev_out}")
        if in_dim < 1 or out_dim < 1:
            raise ValueError(f"layer {i}: empty weight {w.shape}")
        prev_out = out_dim
        if only is not None and i not in only:
            continue
        t = in_dim if tiles[i] is None else min(tiles[i], in_dim)
        for blk in range(-(-in_dim // t)):
            part = w[:, blk * t : (blk + 1) * t]
            values.append(part.ravel())
            lengths.append(np.full(out_dim, part.shape[1], dtype=np.int64))
            cols["layer"].append(np.full(out_dim, i, dtype=np.int32))
            cols["j"].append(np.arange(out_dim, dtype=np.int32))
            cols["in_block"].append(np.full(out_dim, blk, dtype=np.int32))
            cols["b"].append(b if blk == 0 else np.zeros(out_dim))
    if not values:
        values, lengths = [np.zeros(0)], [np.zeros(0, dtype=np.int64)]
        for k in cols:
            cols[k].append(np.zeros(0, dtype=np.int32 if k != "b" else np.float64))
    arrow = pa.table(
        {
            "layer": pa.array(np.concatenate(cols["layer"])),
            "j": pa.array(np.concatenate(cols["j"])),
            "in_block": pa.array(np.concatenate(cols["in_block"])),
            "w": _lists(np.concatenate(values), np.concatenate(lengths)),
            "b": pa.array(np.concatenate(cols["b"])),
        }
    )
    _write(
        duck,
        table,
        arrow,
        "CREATE OR REPLACE TABLE __t AS SELECT CAST(layer AS INTEGER) AS layer, CAST(j AS INTEGER) AS j, "
        "CAST(in_block AS INTEGER) AS in_block, CAST(w AS DOUBLE[]) AS w, CAST(b AS DOUBLE) AS b FROM __v",
    )


def store_matrices(duck: Any, table: str, layers: Sequence[WeightLayer], only: Sequence[int] | None = None) -> None:
    """Write whole-row layers as one value each into ``table`` (``CREATE OR REPLACE``): ``(layer INTEGER,
    m DOUBLE[][], bb DOUBLE[])``, ``m`` the weight's rows in order and ``bb`` the bias. :func:`forward_query` with
    ``matrices=table`` applies them without assembling the matrix at query time (an ordered aggregate, which holds
    the matrix twice and cannot spill). ``only``: the layers to write (default all)."""
    if not layers:
        raise ValueError("a model needs at least one layer")
    ids, rows, biases = [], [], []
    for i, (weight, bias, act) in enumerate(layers):
        w, b = _checked_layer(i, weight, bias, act)
        if only is None or i in only:
            ids.append(i)
            rows.append(w)
            biases.append(b)
    outer = np.concatenate([[0], np.cumsum([w.shape[0] for w in rows])]) if rows else np.zeros(1, np.int64)
    inner = _lists(
        np.concatenate([w.ravel() for w in rows]) if rows else np.zeros(0),
        np.concatenate([np.full(w.shape[0], w.shape[1], np.int64) for w in rows]) if rows else np.zeros(0, np.int64),
    )
    arrow = pa.table(
        {
            "layer": pa.array(np.asarray(ids, dtype=np.int32)),
            "m": pa.ListArray.from_arrays(pa.array(outer.astype(np.int32)), inner),
            "bb": _lists(
                np.concatenate(biases) if biases else np.zeros(0),
                np.asarray([len(b) for b in biases], dtype=np.int64),
            ),
        }
    )
    _write(
        duck,
        table,
        arrow,
        "CREATE OR REPLACE TABLE __t AS SELECT CAST(layer AS INTEGER) AS layer, CAST(m AS DOUBLE[][]) AS m, "
        "CAST(bb AS DOUBLE[]) AS bb FROM __v",
    )


def _lists(flat: np.ndarray, lengths: np.ndarray) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if offsets[-1] < 2**31 - 1:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat, pa.float64()))
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float64()))


def _write(duck: Any, table: str, arrow: pa.Table, ctas_sql: str) -> None:
    """``ctas_sql`` (``CREATE OR REPLACE TABLE __t AS ... FROM __v``) with ``__t`` the target, ``__v`` the Arrow
    table; ``temp.main.x`` makes a TEMP table; a missing schema is created."""
    target = exp.to_table(table, dialect="duckdb")
    temporary = str(target.args.get("catalog") or "").lower() == "temp"  # temp.main.t: a TEMP table of duck
    if temporary:
        target = exp.to_table(target.name, dialect="duckdb")
    view = f"__reldl_weights_{uuid.uuid4().hex}"
    duck.register(view, arrow)
    try:
        if target.args.get("db") is not None:
            schema = exp.Table(this=target.args["db"].copy(), db=_copy(target.args.get("catalog")))
            duck.execute(exp.Create(this=schema, kind="SCHEMA", exists=True).sql("duckdb"))
        ctas = _template(
            ctas_sql,
            __t=target,
            __v=exp.to_table(exp.to_identifier(view, quoted=True)),
        )
        if temporary:
            ctas.set("properties", exp.Properties(expressions=[exp.TemporaryProperty()]))
        duck.execute(ctas.sql("duckdb"))
    finally:
        duck.unregister(view)


def weights_layout(duck: Any, table: str) -> tuple[list[tuple[int, int]], int]:
    """``([(in, out) per layer], tile)`` read back from a table :func:`store_weights` wrote.

    ``tile`` is the block width of the tiled layers, or the widest input when every layer keeps whole rows.
    """
    q = _template(
        "SELECT layer, COUNT(*) FILTER (WHERE in_block = 0) AS n_out, SUM(len(w)) FILTER (WHERE j = 0) AS n_in, "
        "MAX(in_block) AS last_block, MAX(len(w)) AS widest FROM __t GROUP BY layer ORDER BY layer",
        __t=exp.to_table(table, dialect="duckdb"),
    )
    rows = duck.execute(q.sql("duckdb")).fetchall()
    if not rows:
        raise ValueError(f"{table} holds no weights")
    dims = [(int(n_in), int(n_out)) for _, n_out, n_in, _, _ in rows]
    tiled = [int(widest) for _, _, _, last, widest in rows if last > 0]
    return dims, (tiled[0] if tiled else max(d[0] for d in dims))


# ---------------------------------------------------------------------------------------------------------------------
# SQL helpers


def _copy(e: exp.Expression | None) -> exp.Expression | None:
    return e.copy() if e is not None else None


@functools.cache
def _parsed(sql: str) -> exp.Expression:
    return sqlglot.parse_one(sql, read="duckdb")


def _template(sql: str, **subs: exp.Expression) -> exp.Expression:
    """Parse a fixed SQL template (cached) and replace its placeholder names (``__t``, ...) by the given trees.

    A placeholder may stand for a table (``FROM __t``), a column or bare name (``__v``), or a number (``__n`` as a
    column); the replacement is copied in.
    """
    tree = _parsed(sql).copy()

    def sub(node: exp.Expression) -> exp.Expression:
        if isinstance(node, exp.Table) and not node.args.get("db") and node.name in subs:
            new = subs[node.name].copy()
            if isinstance(new, (exp.Table, exp.Subquery)) and node.args.get("alias") is not None:
                new.set("alias", node.args["alias"].copy())
            return new
        if isinstance(node, exp.Column) and not node.table and node.name in subs:
            return subs[node.name].copy()
        return node

    return tree.transform(sub)


def _num(x: float | int) -> exp.Expression:
    """A numeric literal DuckDB reads as DOUBLE (floats) or INTEGER (ints); negatives as unary minus."""
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        lit: exp.Expression = exp.Literal.number(abs(int(x)))
    else:
        lit = exp.Literal.number(f"{abs(float(x)):.17e}")  # the exponent makes DuckDB read DOUBLE, not DECIMAL
    return exp.Neg(this=lit) if x < 0 else lit


def _col(name: str, table: str | None = None) -> exp.Column:
    return exp.column(exp.to_identifier(name), table=exp.to_identifier(table) if table else None)


def source_tree(source: str | exp.Expression) -> exp.Expression:
    """A FROM-able tree: a table/view name (``schema.table``), SQL text of a query, or a sqlglot tree."""
    if isinstance(source, exp.Query):
        return exp.Subquery(this=source.copy())
    if isinstance(source, (exp.Table, exp.Subquery)):
        return source.copy()
    if isinstance(source, str):
        try:
            parsed = sqlglot.parse_one(source, read="duckdb")
        except sqlglot.errors.ParseError:
            parsed = None
        if isinstance(parsed, exp.Query):
            return exp.Subquery(this=parsed)
        return exp.to_table(source, dialect="duckdb")
    raise TypeError(f"source must be a table name, SQL text or a sqlglot tree, not {type(source).__name__}")


def _shapes(layers: Sequence[LayerShape | WeightLayer]) -> list[LayerShape]:
    """``(in, out, activation)`` per layer, from shapes or from ``(weight, bias, activation)``."""
    out: list[LayerShape] = []
    for i, layer in enumerate(layers):
        if len(layer) != 3:
            raise ValueError(f"layer {i}: expected (in, out, activation) or (weight, bias, activation)")
        a, b, act = layer
        if isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer)):
            n_in, n_out = int(a), int(b)
        else:
            shape = tuple(a.shape) if hasattr(a, "shape") else np.asarray(a).shape
            if len(shape) != 2:
                raise ValueError(f"layer {i}: weight must be [out, in], got shape {shape}")
            n_out, n_in = int(shape[0]), int(shape[1])
        if n_in < 1 or n_out < 1:
            raise ValueError(f"layer {i}: bad shape in={n_in} out={n_out}")
        if out and out[-1][1] != n_in:
            raise ValueError(f"layer {i} takes {n_in} inputs but layer {i - 1} gives {out[-1][1]}")
        out.append((n_in, n_out, _check_activation(act, i)))
    if not out:
        raise ValueError("a model needs at least one layer")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# activations


_SQRT_HALF = math.sqrt(0.5)  # M_SQRT1_2
_ERF_SMALL_DEG = 12  # erf(u) = u * g(2u^2 - 1) on |u| < 1
_ERF_PIECES = (1.0, 2.0, 3.0, 4.0, 5.0)  # then a polynomial in (|u| - a - 0.5) on [a, a + 1), up to 6
_ERF_PIECE_DEG = 20  # erf(6) rounds to 1.0 in float64 (erfc(6) = 2.2e-17)


def _cheb_nodes(n: int) -> np.ndarray:
    return np.cos(np.pi * (np.arange(n) + 0.5) / n)


@functools.cache
def _erf_coefficients() -> tuple[list[float], list[tuple[float, list[float]]]]:
    """Monomial coefficients (constant first) of the erf pieces, by Chebyshev interpolation of ``math.erf``."""
    from numpy.polynomial import chebyshev as C

    t = _cheb_nodes(_ERF_SMALL_DEG + 1)
    u = np.sqrt((t + 1) / 2)  # t = 2u^2 - 1 over [-1, 1] <=> u over [0, 1]
    g = np.array([math.erf(x) / x for x in u])
    small = C.cheb2poly(C.chebfit(t, g, _ERF_SMALL_DEG)).tolist()
    pieces = []
    t = _cheb_nodes(_ERF_PIECE_DEG + 1)
    for a in _ERF_PIECES:
        c = a + 0.5  # s = u - c over [-0.5, 0.5] is t / 2
        y = np.array([math.erf(c + x / 2) for x in t])
        mono = C.cheb2poly(C.chebfit(t, y, _ERF_PIECE_DEG)) * 2.0 ** np.arange(_ERF_PIECE_DEG + 1)
        pieces.append((c, mono.tolist()))
    return small, pieces


def _horner(coeffs: Sequence[float], x: exp.Expression) -> exp.Expression:
    acc: exp.Expression = _num(coeffs[-1])
    for a in reversed(coeffs[:-1]):
        acc = exp.Add(this=exp.Mul(this=exp.Paren(this=acc), expression=x.copy()), expression=_num(a))
    return acc


def erf_sql(z: exp.Expression) -> exp.Expression:
    """erf(z) in DOUBLE as SQL (DuckDB has no erf); z should be a column or other cheap expression."""
    small, pieces = _erf_coefficients()
    az = exp.Abs(this=z.copy())
    t = exp.Sub(this=exp.Mul(this=_num(2), expression=exp.Mul(this=z.copy(), expression=z.copy())), expression=_num(1))
    case = exp.Case()
    for c, mono in pieces:
        s = exp.Paren(this=exp.Sub(this=az.copy(), expression=_num(c)))
        case = case.when(exp.LT(this=az.copy(), expression=_num(c + 0.5)), _horner(mono, s))
    case = case.else_(_num(1.0))
    return (
        exp.Case()
        .when(
            exp.LT(this=az.copy(), expression=_num(1.0)),
            exp.Mul(this=z.copy(), expression=exp.Paren(this=_horner(small, exp.Paren(this=t)))),
        )
        .else_(exp.Mul(this=exp.Sign(this=z.copy()), expression=case))
    )


def activation_sql(act: str, v: exp.Expression, z: exp.Expression | None = None) -> exp.Expression:
    """The activation applied to the DOUBLE expression v (a column: gelu repeats it), as torch computes it.

    gelu also takes ``z``, a column holding ``v * sqrt(0.5)`` (computed once in a subquery), or builds it inline.
    """
    if act == "identity":
        return v.copy()
    if act == "relu":
        return _template("greatest(__v, 0)", __v=v)  # DuckDB's greatest; sqlglot's own Greatest adds a NULL CASE
    if act == "tanh":
        return exp.Anonymous(this="tanh", expressions=[v.copy()])
    if act == "sigmoid":  # torch: 1 / (1 + exp(-v))
        return _template("1 / (1 + exp(-__v))", __v=v)
    if act == "gelu":  # torch's default F.gelu: v * 0.5 * (1 + erf(v * M_SQRT1_2))
        if z is None:
            z = exp.Paren(this=exp.Mul(this=v.copy(), expression=_num(_SQRT_HALF)))
        return _template("__v * 0.5 * (1 + __e)", __v=v, __e=exp.Paren(this=erf_sql(z)))
    raise ValueError(f"unknown activation {act!r} (one of {', '.join(ACTIVATIONS)})")


# ---------------------------------------------------------------------------------------------------------------------
# queries


def _cte(name: str, query: exp.Expression) -> exp.CTE:
    return exp.CTE(this=query, alias=exp.TableAlias(this=exp.to_identifier(name)))


# the vector of (rid, j, v) rows in j order: a plain list() of (j, v) structs, sorted per row. list(v ORDER BY j) is
# about 1.8x faster in memory, but DuckDB's ordered aggregates cannot spill (Out of Memory under memory_limit)
_ASSEMBLE_SORTED = (
    "SELECT rid, list_transform(list_sort(list({'j': j, 'v': __a})), lambda s: s.v) AS x FROM __pre AS p GROUP BY rid"
)


def _layer_ctes(
    k: int,
    prev: str,
    weights: exp.Table,
    n_in: int,
    act: str,
    tile: int | None,
    spill_safe: bool,
    matrices: exp.Table | None = None,
) -> list[exp.CTE]:
    """CTEs computing layer k from ``prev(rid, x)``; the last is named ``__l{k+1}`` with columns (rid, x)."""
    t = n_in if tile is None else min(tile, n_in)
    n_blocks = -(-n_in // t)
    pre, out = f"__p{k}", f"__l{k + 1}"
    if n_blocks == 1:  # whole rows: the layer's matrix as one list of rows, applied to each x; no aggregation
        if matrices is not None:
            matrix = _template("(SELECT m, bb FROM __m WHERE layer = __k)", __m=matrices, __k=_num(k))
        else:
            matrix = _template(
                "(SELECT list(w ORDER BY j) AS m, list(b ORDER BY j) AS bb FROM __w WHERE layer = __k)",
                __w=weights,
                __k=_num(k),
            )
        query = _template(
            "SELECT p.rid, list_transform(w.m, lambda r, i: list_dot_product(r, p.x) + w.bb[i]) AS x "
            "FROM __prev AS p CROSS JOIN __mat AS w",
            __prev=exp.to_table(prev),
            __mat=matrix,
        )
        if act != "identity":
            dots = query.selects[1].this
            query.selects[1].set(
                "this",
                _template("list_transform(__d, lambda v: __a)", __d=dots, __a=activation_sql(act, exp.column("v"))),
            )
        return [_cte(out, query)]
    tiles = f"__t{k}"
    ctes = [
        _cte(
            tiles,
            _template(
                "SELECT p.rid, CAST(b.blk AS INTEGER) AS in_block, "
                "p.x[b.blk * __tile + 1 : b.blk * __tile + __tile] AS xt "
                "FROM __prev AS p CROSS JOIN range(0, __nb) AS b(blk)",
                __prev=exp.to_table(prev),
                __tile=_num(t),
                __nb=_num(n_blocks),
            ),
        ),
        _cte(
            pre,
            _template(
                "SELECT t.rid, w.j, SUM(list_dot_product(w.w, t.xt) + w.b) AS v FROM __tiles AS t "
                "JOIN __w AS w ON w.layer = __k AND w.in_block = t.in_block GROUP BY t.rid, w.j",
                __tiles=exp.to_table(tiles),
                __w=weights,
                __k=_num(k),
            ),
        ),
    ]
    if act == "gelu":  # z = v * sqrt(0.5) once per value, not at each of erf's uses
        source = _template("(SELECT rid, j, v, v * __c AS z FROM __pre)", __c=_num(_SQRT_HALF), __pre=exp.to_table(pre))
        value = activation_sql(act, exp.column("v"), exp.column("z"))
    else:
        source, value = exp.to_table(pre), activation_sql(act, exp.column("v"))
    assemble = _ASSEMBLE_SORTED if spill_safe else "SELECT rid, list(__a ORDER BY j) AS x FROM __pre AS p GROUP BY rid"
    ctes.append(_cte(out, _template(assemble, __a=value, __pre=source)))
    return ctes


def forward_query(
    weights_table: str,
    source: str | exp.Expression,
    layers: Sequence[LayerShape | WeightLayer],
    tile: Tiles = 64,
    *,
    rid: str = "rid",
    x: str = "x",
    spill_safe: bool = True,
    matrices: str | None = None,
) -> exp.Select:
    """The model's raw output per input row: a SELECT of ``(rid, y DOUBLE[])``.

    ``source``: a table/view name, query text or sqlglot query with a unique row id column ``rid`` and the feature
    vector ``x`` (any numeric list or array type); ``layers``: ``(in, out, activation)`` per layer (as
    ``TabularSpec.layers``) or the ``(weight, bias, activation)`` given to :func:`store_weights`; ``tile`` must be the
    one the weights were stored with (one width for all layers, or one per layer); ``matrices``: a table
    :func:`store_matrices` wrote, from which whole-row layers read their matrix. Rows with a NULL x (or a NULL
    element) give a NULL y; an x of another length than the first layer's input raises an error when the query runs.
    Row order is unspecified. ``spill_safe=False`` re-assembles vectors with ``list(v ORDER BY j)``: faster, but
    DuckDB cannot spill ordered aggregates, so only for working sets that fit in ``memory_limit``.
    """
    shapes = _shapes(layers)
    tiles = _layer_tiles(tile, len(shapes))
    weights = exp.to_table(weights_table, dialect="duckdb")
    mats = exp.to_table(matrices, dialect="duckdb") if matrices is not None else None
    src = source_tree(source)
    n_features = shapes[0][0]
    inputs = dict(__src=src, __rid=_col(rid), __x=_col(x))
    bad_length = f"reldl: the model takes {n_features} features, an input vector has another length"
    ctes = [
        _cte(
            "__l0",
            _template(
                "SELECT rid, CASE WHEN len(x) = __n THEN x ELSE error(__msg) END AS x "
                "FROM (SELECT __rid AS rid, CAST(__x AS DOUBLE[]) AS x FROM __src) AS i "
                "WHERE x IS NOT NULL AND list_count(x) = len(x)",
                __n=_num(n_features),
                __msg=exp.Literal.string(bad_length),
                **inputs,
            ),
        )
    ]
    for k, (n_in, _, act) in enumerate(shapes):
        ctes.extend(_layer_ctes(k, f"__l{k}", weights, n_in, act, tiles[k], spill_safe, mats))
    final = _template(
        "SELECT rid, y FROM (SELECT rid, x AS y FROM __last UNION ALL "
        "SELECT rid, CAST(NULL AS DOUBLE[]) AS y "
        "FROM (SELECT __rid AS rid, CAST(__x AS DOUBLE[]) AS x FROM __src) AS i "
        "WHERE x IS NULL OR list_count(x) <> len(x)) AS r",
        __last=exp.to_table(f"__l{len(shapes)}"),
        **inputs,
    )
    final.set(_WITH, exp.With(expressions=ctes))
    return final


def _wrap(forward: exp.Select, template: str) -> exp.Select:
    """``template`` (selecting from ``__y(rid, y)``) with the forward query as the CTE ``__y``, CTEs kept flat."""
    fwd = forward.copy()
    with_ = fwd.args.get(_WITH)
    fwd.set(_WITH, None)
    out = _template(template, __y=exp.to_table("__y"))
    out.set(_WITH, exp.With(expressions=[*with_.expressions, _cte("__y", fwd)]))
    return out


def predict_query(
    weights_table: str,
    source: str | exp.Expression,
    layers: Sequence[LayerShape | WeightLayer],
    task: str,
    tile: Tiles = 64,
    *,
    rid: str = "rid",
    x: str = "x",
    spill_safe: bool = True,
    matrices: str | None = None,
) -> exp.Select:
    """``(rid, prediction DOUBLE)``: regression y[1]; binary sigmoid(y[1]); multiclass the 0-based argmax of y (the
    first maximum, as torch.argmax). Arguments as :func:`forward_query`."""
    forward = forward_query(weights_table, source, layers, tile, rid=rid, x=x, spill_safe=spill_safe, matrices=matrices)
    if task == "regression":
        return _wrap(forward, "SELECT rid, y[1] AS prediction FROM __y")
    if task == "binary":
        return _wrap(forward, "SELECT rid, 1 / (1 + exp(-y[1])) AS prediction FROM __y")
    if task == "multiclass":
        return _wrap(forward, "SELECT rid, CAST(list_position(y, list_max(y)) - 1 AS DOUBLE) AS prediction FROM __y")
    raise ValueError(f"unknown task {task!r} (one of {', '.join(TASKS)})")


def proba_query(
    weights_table: str,
    source: str | exp.Expression,
    layers: Sequence[LayerShape | WeightLayer],
    task: str,
    tile: Tiles = 64,
    *,
    rid: str = "rid",
    x: str = "x",
    spill_safe: bool = True,
    matrices: str | None = None,
) -> exp.Select:
    """``(rid, proba DOUBLE[])``: binary [1 - p, p] with p = sigmoid(y[1]); multiclass softmax(y) (as torch: exp(y -
    max) / sum); regression the raw outputs y. Arguments as :func:`forward_query`."""
    forward = forward_query(weights_table, source, layers, tile, rid=rid, x=x, spill_safe=spill_safe, matrices=matrices)
    if task == "binary":
        return _wrap(
            forward,
            "SELECT rid, CASE WHEN p IS NOT NULL THEN [1 - p, p] END AS proba "
            "FROM (SELECT rid, 1 / (1 + exp(-y[1])) AS p FROM __y) AS s",
        )
    if task == "multiclass":
        return _wrap(
            forward,
            "SELECT rid, list_transform(e, lambda v: v / s) AS proba FROM (SELECT rid, e, list_sum(e) AS s FROM "
            "(SELECT rid, list_transform(y, lambda v: exp(v - m)) AS e FROM "
            "(SELECT rid, y, list_max(y) AS m FROM __y) AS a) AS b) AS c",
        )
    if task == "regression":  # the raw outputs, as TabularModel.predict_proba (the UDF) gives them
        return _wrap(forward, "SELECT rid, y AS proba FROM __y")
    raise ValueError(f"unknown task {task!r} (one of {', '.join(TASKS)})")
