"""Kernels: what a Join applies to its inputs' tiles, with the vector-Jacobian product for each input.

Two kinds:

* :class:`Elementwise`: a scalar SQL expression over the inputs (``add``, ``mul``, ``exp``, ``sigmoid``, or any
  expression the SQL front end meets). Its partial derivatives come from :mod:`reldl.autodiff.symbolic`. On tiles it
  is lifted with ``list_transform(a, lambda x, i: ...)``; scalar inputs broadcast over a tile (and their gradient is
  the tile's sum).
* Tile kernels that are not element-wise (``matmul``, ``bias_add``, ``softmax_xent``, ``dot``, ``tile_sum``): their
  heavy parts are calls to ``reldl_*`` functions, which DuckDB runs as vectorized numpy UDFs over Arrow buffers
  (:func:`install`), and which :mod:`reldl.autodiff.spark` rewrites to Spark SQL higher-order functions.

Tiles are ``DOUBLE[]`` in row-major order; a kernel reads the leading dimension of a matrix tile from its length, so
the last row block of a relation may be short.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from sqlglot import exp

from reldl.autodiff import symbolic as sym
from reldl.autodiff.ir import AutodiffError, Shape

_X, _I = "__x", "__i"  # lambda parameters in lifted kernels (names no table column uses)
SMALL_TILE = 64  # element-wise sums over groups of tiles up to this size are one SUM per element


def _lam_col(name: str) -> exp.Column:
    return exp.column(exp.to_identifier(name))


def at(tile: exp.Expression, index: exp.Expression) -> exp.Expression:
    """``tile[index]`` (1-based, as DuckDB reads it)."""
    return exp.Bracket(this=tile.copy(), expressions=[index.copy()], offset=1)


def transform(tile: exp.Expression, body: exp.Expression, with_index: bool = True) -> exp.Expression:
    """``list_transform(tile, lambda __x, __i: body)``."""
    params = [exp.to_identifier(_X)] + ([exp.to_identifier(_I)] if with_index else [])
    return exp.Transform(this=tile.copy(), expression=exp.Lambda(this=body, expressions=params))


def length(tile: exp.Expression) -> exp.Expression:
    return sym.func("len", tile)


def rows(tile: exp.Expression, cols: int) -> exp.Expression:
    """The leading dimension of a row-major tile with ``cols`` columns: ``len(tile) // cols``."""
    return exp.IntDiv(this=length(tile), expression=exp.Literal.number(cols))


def _int(n: int) -> exp.Expression:
    return exp.Literal.number(int(n))


class Kernel:
    """Interface: output shape, forward expression, and the vector-Jacobian product for input ``i``."""

    name = "kernel"

    def out_shape(self, shapes: Sequence[Shape]) -> Shape:
        raise NotImplementedError

    def forward(self, args: Sequence[exp.Expression], shapes: Sequence[Shape]) -> exp.Expression:
        raise NotImplementedError

    def vjp(
        self, i: int, args: Sequence[exp.Expression], grad: exp.Expression, shapes: Sequence[Shape]
    ) -> exp.Expression:
        """The gradient of input ``i`` (same shape as it) given the output's gradient ``grad``."""
        raise NotImplementedError

    def differentiable(self, i: int) -> bool:
        return True

    def zero_partial(self, i: int) -> bool:
        """True when the output does not depend on input ``i`` at all (no gradient step is needed)."""
        return False

    def vjp_sum(
        self, i: int, args: Sequence[exp.Expression], grad: exp.Expression, shapes: Sequence[Shape]
    ) -> exp.Expression | None:
        """An aggregate expression summing input ``i``'s gradient over a group of rows in one call, where the kernel
        has a faster way than summing :meth:`vjp` per row (None: sum the per-row products)."""
        return None

    def forward_sum(self, args: Sequence[exp.Expression], shapes: Sequence[Shape]) -> exp.Expression | None:
        """An aggregate expression summing :meth:`forward` over a group of rows, where faster (None: sum per row)."""
        return None

    def __repr__(self) -> str:
        return self.name


def _substitute(template: exp.Expression, subs: dict[str, exp.Expression]) -> exp.Expression:
    def sub(node: exp.Expression) -> exp.Expression:
        if isinstance(node, exp.Column) and not node.table and node.name in subs:
            return subs[node.name].copy()
        return node

    return template.copy().transform(sub)


class Elementwise(Kernel):
    """A scalar expression over placeholders ``__a0 .. __a{n-1}``, lifted over tiles."""

    def __init__(self, name: str, template: exp.Expression, arity: int):
        self.name, self.template, self.arity = name, template, arity
        self._partials: dict[int, exp.Expression] = {}

    @staticmethod
    def placeholder(i: int) -> str:
        return f"__a{i}"

    def partial(self, i: int) -> exp.Expression:
        if i not in self._partials:
            self._partials[i] = sym.derivative(self.template, self.placeholder(i))
        return self._partials[i]

    def _check(self, shapes: Sequence[Shape]) -> Shape:
        if len(shapes) != self.arity:
            raise AutodiffError(f"kernel {self.name} takes {self.arity} inputs, got {len(shapes)}")
        tiles = {s for s in shapes if s != ()}
        if len(tiles) > 1:
            raise AutodiffError(f"kernel {self.name}: tile shapes differ: {sorted(tiles)}")
        return tiles.pop() if tiles else ()

    def out_shape(self, shapes: Sequence[Shape]) -> Shape:
        return self._check(shapes)

    def zero_partial(self, i: int) -> bool:
        return sym.is_const(self.partial(i), 0.0)

    def _element(self, body: exp.Expression, args, shapes, k: int) -> exp.Expression:
        """``body`` at element ``k`` (1-based) of the tiles: ``tile[k]`` for tiles, scalars as they are."""
        subs = {self.placeholder(j): (a if s == () else at(a, _int(k))) for j, (a, s) in enumerate(zip(args, shapes))}
        return _substitute(body, subs)

    def forward_sum(self, args, shapes):
        out = self._check(shapes)
        size = math.prod(out) if out else 0
        if not 0 < size <= SMALL_TILE:  # small tiles: one SUM per element, no per-row lists (DuckDB sums in place)
            return None
        return sym.func(
            "list_value", *[exp.Sum(this=self._element(self.template, args, shapes, k)) for k in range(1, size + 1)]
        )

    def vjp_sum(self, i, args, grad, shapes):
        out = self._check(shapes)
        size = math.prod(out) if out else 0
        if not 0 < size <= SMALL_TILE or shapes[i] != out:
            return None
        d = self.partial(i)
        sums = [exp.Sum(this=sym.mul(self._element(d, args, shapes, k), at(grad, _int(k)))) for k in range(1, size + 1)]
        return sym.func("list_value", *sums)

    def _lifted(self, body: exp.Expression, args: Sequence[exp.Expression], shapes: Sequence[Shape]):
        """``body`` with placeholders bound: scalars directly; tiles element by element (lead tile as ``__x``)."""
        lead = next((j for j, s in enumerate(shapes) if s != ()), None)
        subs = {}
        for j, (a, s) in enumerate(zip(args, shapes)):
            if s == ():
                subs[self.placeholder(j)] = a
            elif j == lead:
                subs[self.placeholder(j)] = _lam_col(_X)
            else:
                subs[self.placeholder(j)] = at(a, _lam_col(_I))
        return lead, _substitute(body, subs)

    def forward(self, args, shapes):
        self._check(shapes)
        lead, body = self._lifted(self.template, args, shapes)
        return body if lead is None else transform(args[lead], body)

    def vjp(self, i, args, grad, shapes):
        out = self._check(shapes)
        if out == ():
            return sym.mul(_substitute(self.partial(i), {self.placeholder(j): a for j, a in enumerate(args)}), grad)
        # walk the output's gradient tile (``__x``); other tiles are read by index only where the partial uses them
        d = self.partial(i)
        subs = {}
        for j, (a, s) in enumerate(zip(args, shapes)):
            subs[self.placeholder(j)] = a if s == () else at(a, _lam_col(_I))
        body = _substitute(d, subs)
        indexed = any(c.name == _I for c in body.find_all(exp.Column))
        scaled = sym.mul(body, _lam_col(_X))
        if shapes[i] != () and isinstance(scaled, exp.Column) and scaled.name == _X and not scaled.table:
            return grad.copy()  # a partial of 1 (add, identity): the output's gradient as it is
        per_element = transform(grad, scaled, with_index=indexed)
        return per_element if shapes[i] != () else sym.func("list_sum", per_element)


@functools.cache
def elementwise(name: str) -> Elementwise:
    """A named element-wise kernel (see :data:`ELEMENTWISE`)."""
    if name not in ELEMENTWISE:
        raise AutodiffError(f"unknown kernel {name!r} (one of {', '.join(sorted(KERNELS))})")
    arity, build = ELEMENTWISE[name]
    return Elementwise(name, build(*[_lam_col(Elementwise.placeholder(i)) for i in range(arity)]), arity)


def expression(sql: str | exp.Expression, names: Sequence[str]) -> Elementwise:
    """An element-wise kernel from a scalar SQL expression over the column names ``names`` (in input order)."""
    import sqlglot

    tree = sqlglot.parse_one(sql, read="duckdb") if isinstance(sql, str) else sql
    unknown = {c.name for c in tree.find_all(exp.Column)} - set(names)
    if unknown:
        raise AutodiffError(f"expression {tree.sql('duckdb')!r} uses {sorted(unknown)}, not among {list(names)}")
    template = _substitute(tree, {n: _lam_col(Elementwise.placeholder(i)) for i, n in enumerate(names)})
    return Elementwise(tree.sql("duckdb"), template, len(names))


def _sigmoid(a):
    return sym.div(sym.num(1.0), sym.add(sym.num(1.0), exp.Exp(this=sym.neg(a))))


def _relu(a):
    return exp.Case(ifs=[exp.If(this=exp.GT(this=a, expression=sym.num(0.0)), true=a.copy())], default=sym.num(0.0))


def _bce_logits(z, y):  # max(z, 0) - z y + ln(1 + exp(-|z|)): binary cross-entropy on logits, stable
    return sym.add(
        sym.sub(_relu(z), sym.mul(z.copy(), y)),
        exp.Ln(this=sym.add(sym.num(1.0), exp.Exp(this=sym.neg(exp.Abs(this=z.copy()))))),
    )


ELEMENTWISE: dict[str, tuple[int, Callable[..., exp.Expression]]] = {
    "identity": (1, lambda a: a),
    "neg": (1, sym.neg),
    "add": (2, sym.add),
    "sub": (2, sym.sub),
    "mul": (2, sym.mul),
    "div": (2, sym.div),
    "square": (1, lambda a: sym.mul(a, a.copy())),
    "squared_error": (2, lambda a, b: exp.Pow(this=exp.Paren(this=sym.sub(a, b)), expression=sym.num(2.0))),
    "exp": (1, lambda a: exp.Exp(this=a)),
    "log": (1, lambda a: exp.Ln(this=a)),
    "tanh": (1, lambda a: sym.func("tanh", a)),
    "sigmoid": (1, _sigmoid),
    "relu": (1, _relu),
    "bce_logits": (2, _bce_logits),
}


# ---------------------------------------------------------------------------------------------------------------------
# element-wise expressions as numpy: what a fused tile kernel applies to its input inside its UDF


# comparisons of an array with a number (not NaN) in DuckDB's order, as one numpy comparison: (function, negate)
_COMPLEMENT: dict[Callable, tuple[Callable, bool]] = {
    np.greater: (np.less_equal, True),  # NaN > c is true
    np.greater_equal: (np.less, True),  # NaN >= c is true
}


def _nan_last(op: Callable, a: Any, b: Any, nan_a: bool = False, both: bool = False) -> Any:
    """``op(a, b)`` with DuckDB's ordering of NaN: above every other number and equal to itself (so NaN > 0 is
    true in SQL, where IEEE says false). ``nan_a``: true where ``a`` is NaN and ``b`` is not; ``both``: true where
    both are NaN."""
    if np.ndim(b) == 0 and not np.isnan(b) and op in _COMPLEMENT:
        # against a number: one pass, no NaN masks (a > c is NOT a <= c, which holds for NaN in DuckDB's order)
        flip, negate = _COMPLEMENT[op]
        return ~flip(a, b) if negate else flip(a, b)
    out = np.asarray(op(a, b))
    na, nb = np.isnan(a), np.isnan(b)
    if not (np.any(na) or np.any(nb)):
        return out
    if nan_a:
        out = out | (na & ~nb)
    if both:
        out = out | (na & nb)
    return out


_NP_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    exp.Add: np.add,
    exp.Sub: np.subtract,
    exp.Mul: np.multiply,
    exp.Div: np.divide,
    exp.Pow: np.power,
    exp.GT: lambda a, b: _nan_last(np.greater, a, b, nan_a=True),
    exp.GTE: lambda a, b: _nan_last(np.greater_equal, a, b, nan_a=True, both=True),
    exp.LT: lambda a, b: _nan_last(np.greater, b, a, nan_a=True),
    exp.LTE: lambda a, b: _nan_last(np.greater_equal, b, a, nan_a=True, both=True),
    exp.EQ: lambda a, b: _nan_last(np.equal, a, b, both=True),
    exp.NEQ: lambda a, b: ~_nan_last(np.equal, a, b, both=True),
    exp.And: np.logical_and,
    exp.Or: np.logical_or,
}
_NP_UNARY: dict[type, Callable[[Any], Any]] = {
    exp.Neg: np.negative,
    exp.Exp: np.exp,
    exp.Ln: np.log,
    exp.Sqrt: np.sqrt,
    exp.Abs: np.abs,
    exp.Sign: np.sign,
    exp.Not: np.logical_not,
}
_NP_NAMED: dict[str, Callable[..., Any]] = {
    "tanh": np.tanh,
    "exp": np.exp,
    "ln": np.log,
    "sqrt": np.sqrt,
    "abs": np.abs,
    "sign": np.sign,
    "power": np.power,
    "pow": np.power,
    "greatest": np.maximum,
    "least": np.minimum,
}


def _greatest(e: exp.Case) -> exp.Expression | None:
    """``x`` where ``e`` is ``CASE WHEN x > c THEN x ELSE c END`` for a number ``c`` (relu: c = 0): that is
    ``greatest(x, c)`` in DuckDB's order (NaN > c, so NaN stays NaN, as np.maximum keeps it), one pass in numpy."""
    ifs = e.args.get("ifs") or []
    default = e.args.get("default")
    if len(ifs) != 1 or not isinstance(default, exp.Literal) or default.is_string:
        return None
    cond, value = ifs[0].this, ifs[0].args.get("true")
    if not isinstance(cond, exp.GT) or not isinstance(cond.expression, exp.Literal) or cond.expression.is_string:
        return None
    if float(cond.expression.this) != float(default.this) or cond.this.sql() != value.sql():
        return None
    return cond.this


def numpy_function(template: exp.Expression, arity: int = 1) -> Callable[..., np.ndarray] | None:
    """A numpy function of ``arity`` float64 arrays computing the scalar SQL ``template`` (over ``__a0 ..``) element by
    element, with DuckDB's DOUBLE semantics (IEEE: x / 0 is inf, ln(0) -inf); None when the template uses anything
    outside the supported subset (arithmetic, comparisons, AND/OR/NOT, CASE with an ELSE, exp, ln, sqrt, abs, sign,
    tanh, power, greatest, least)."""
    names = {Elementwise.placeholder(i): i for i in range(arity)}

    def build(e: exp.Expression) -> Callable[[Sequence[np.ndarray]], Any] | None:
        if isinstance(e, exp.Paren):
            return build(e.this)
        if isinstance(e, exp.Column) and not e.table and e.name in names:
            i = names[e.name]
            return lambda a: a[i]
        if isinstance(e, exp.Literal) and not e.is_string:
            value = float(e.this)
            return lambda a: value
        if isinstance(e, exp.Boolean):
            flag = bool(e.this)
            return lambda a: flag
        if type(e) in _NP_BINARY:
            f, left, right = _NP_BINARY[type(e)], build(e.this), build(e.expression)
            if left is None or right is None:
                return None
            return lambda a: f(left(a), right(a))
        if type(e) in _NP_UNARY:
            f, inner = _NP_UNARY[type(e)], build(e.this)
            return None if inner is None else (lambda a: f(inner(a)))
        if isinstance(e, exp.Tanh):
            inner = build(e.this)
            return None if inner is None else (lambda a: np.tanh(inner(a)))
        if isinstance(e, exp.Anonymous) and str(e.this).lower() in _NP_NAMED:
            f, args = _NP_NAMED[str(e.this).lower()], [build(x) for x in e.expressions]
            if any(x is None for x in args) or not args:
                return None
            return lambda a: f(*[x(a) for x in args])
        if isinstance(e, exp.Case) and e.this is None and e.args.get("default") is not None:
            top = _greatest(e)
            if top is not None:
                inner, floor = build(top), float(e.args["default"].this)
                return None if inner is None else (lambda a: np.maximum(inner(a), floor))
            branches = [(build(i.this), build(i.args["true"])) for i in e.args.get("ifs") or []]
            default = build(e.args["default"])
            if default is None or any(c is None or v is None for c, v in branches):
                return None

            def case(a):
                out = default(a)
                for cond, value in reversed(branches):  # the first true WHEN wins
                    out = _pick(cond(a), value(a), out)
                return out

            return case
        return None

    body = build(template)
    if body is None:
        return None

    def run(*arrays: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            out = np.asarray(body(arrays), dtype=np.float64)
        shape = np.broadcast_shapes(*[np.shape(x) for x in arrays]) if arrays else ()
        return np.broadcast_to(out, shape) if out.shape != shape else out

    return run


def _pick(mask: Any, value: Any, other: Any) -> Any:
    """``np.where(mask, value, other)``; where ``other`` is the scalar 0 (relu and its derivative), as a multiply by the
    mask instead: np.where branches per element, and on a random mask (relu's) that was 4-8x slower (1M elements:
    3.7 ms vs 0.5-1 ms). Non-finite values outside the mask still give 0, and zeros come out as +0.0."""
    if np.ndim(mask) == 0 or np.ndim(other) != 0 or other != 0.0:
        return np.where(mask, value, other)
    if np.ndim(value) == 0:
        if not np.isfinite(value):
            return np.where(mask, value, other)
        return mask.astype(np.float64) if value == 1.0 else mask * float(value) + 0.0
    out = value * mask
    bad = ~np.isfinite(value)
    if bad.any():
        out[bad & ~mask] = 0.0
    out += 0.0
    return out


@functools.cache
def _compiled(code: str) -> Callable[..., np.ndarray]:
    """The numpy function of an element-wise kernel's SQL text over ``__a0`` (as fused kernels pass it to UDFs)."""
    import sqlglot

    fn = numpy_function(sqlglot.parse_one(code, read="duckdb"))
    if fn is None:
        raise ValueError(f"element-wise expression not supported in numpy: {code}")
    return fn


class Activated(Kernel):
    """A tile kernel (``matmul`` or ``affine``) whose first input passes through a unary element-wise kernel first:
    ``inner(act(a), w[, b])`` in one UDF call, so ``act(a)`` is never stored; the gradient for ``a`` is
    ``act'(a) * (G @ W^T)``, also one call (:func:`reldl.autodiff.grad.backward` fuses an element-wise join into the
    matmul or dense layer that is its only consumer, on row-block tiles)."""

    def __init__(self, inner: Kernel, act: Elementwise):
        self.inner, self.act = inner, act
        self.name = f"{inner.name}({act.name})"
        self.code = act.template.sql("duckdb")
        self.dcode = act.partial(0).sql("duckdb")

    @staticmethod
    def fusable(inner: Kernel, act: Kernel, shapes: Sequence[Shape]) -> bool:
        """Whether ``inner(act(a), ...)`` can run as one :class:`Activated` kernel: a unary element-wise ``act`` that
        numpy can compute (with its derivative), and ``inner`` a matmul or dense layer on row-block tiles (whose
        weight gradient is summed per row, see :meth:`Matmul.vjp_sum`)."""
        if not isinstance(inner, (Matmul, Affine)) or not isinstance(act, Elementwise) or act.arity != 1:
            return False
        if len(shapes[0]) != 2 or Matmul().vjp_sum(1, [exp.null()] * 2, exp.null(), shapes[:2]) is not None:
            return False
        return numpy_function(act.template) is not None and numpy_function(act.partial(0)) is not None

    def out_shape(self, shapes):
        return self.inner.out_shape(shapes)

    def forward(self, args, shapes):
        k, n = shapes[1]
        code = exp.Literal.string(self.code)
        if isinstance(self.inner, Affine):
            return sym.func("reldl_affine_act", code, args[0], args[1], args[2], rows(args[0], k), _int(k), _int(n))
        return sym.func("reldl_matmul_act", code, args[0], args[1], rows(args[0], k), _int(k), _int(n))

    def vjp(self, i, args, grad, shapes):
        k, n = shapes[1]
        if i == 0:  # act'(a) * (G @ W^T)
            code = exp.Literal.string(self.dcode)
            return sym.func("reldl_matmul_nt_act", code, grad, args[1], args[0], rows(grad, n), _int(n), _int(k))
        if i == 1:  # act(a)^T @ G
            code = exp.Literal.string(self.code)
            return sym.func("reldl_matmul_tn_act", code, args[0], grad, _int(k), rows(grad, n), _int(n))
        return self.inner.vjp(i, args, grad, shapes)


# ---------------------------------------------------------------------------------------------------------------------
# tile kernels


class Matmul(Kernel):
    """``A (m, k) @ B (k, n)``; a vector ``(k,)`` on the left is one row (output ``(n,)``)."""

    name = "matmul"

    def out_shape(self, shapes):
        if len(shapes) != 2 or len(shapes[0]) not in (1, 2) or len(shapes[1]) != 2 or shapes[0][-1] != shapes[1][0]:
            raise AutodiffError(f"matmul needs tiles (m, k) and (k, n), got {list(shapes)}")
        return (shapes[1][1],) if len(shapes[0]) == 1 else (shapes[0][0], shapes[1][1])

    def forward(self, args, shapes):
        k, n = shapes[1]
        return sym.func("reldl_matmul", args[0], args[1], rows(args[0], k), _int(k), _int(n))

    def vjp(self, i, args, grad, shapes):
        k, n = shapes[1]
        if i == 0:  # dA = G @ B^T: (m, n) x (k, n)^T
            return sym.func("reldl_matmul_nt", grad, args[1], rows(grad, n), _int(n), _int(k))
        return sym.func("reldl_matmul_tn", args[0], grad, _int(k), rows(grad, n), _int(n))  # dB = A^T @ G

    def vjp_sum(self, i, args, grad, shapes):
        k, n = shapes[1]
        m = shapes[0][0] if len(shapes[0]) == 2 else 1
        if i != 1 or m * (k + n) > k * n:
            # row-block tiles: the per-row products (k x n each) are smaller than the stacked inputs a list would
            # hold (aggregates that build lists cannot spill), and each product is already a BLAS-sized GEMM
            return None
        # vector rows: sum over rows of A_r^T G_r = (A_1; ...; A_R)^T (G_1; ...; G_R), one GEMM, lists of small rows
        lists = [exp.Anonymous(this="list", expressions=[a.copy()]) for a in (args[0], grad)]
        return sym.func("reldl_matmul_tn_sum", *lists, _int(k), _int(n))


def _plus_bias(tile: exp.Expression, bias: exp.Expression, n: exp.Expression) -> exp.Expression:
    """``tile (m, n) + bias (n,)`` on every row, as a list lambda: element i adds ``bias[(i - 1) % n + 1]``."""
    col = sym.add(exp.Mod(this=exp.Paren(this=sym.sub(_lam_col(_I), _int(1))), expression=n.copy()), _int(1))
    return transform(tile, sym.add(_lam_col(_X), at(bias, col)))


class Affine(Kernel):
    """``A (m, k) @ W (k, n) + b (n,)`` on every row: a dense layer in one pass over A (matmul, then bias_add)."""

    name = "affine"

    def out_shape(self, shapes):
        ok = len(shapes) == 3 and len(shapes[0]) == 2 and len(shapes[1]) == 2 and shapes[0][1] == shapes[1][0]
        if not ok or shapes[2] != shapes[1][1:]:
            raise AutodiffError(f"affine needs tiles (m, k), (k, n) and a vector (n,), got {list(shapes)}")
        return (shapes[0][0], shapes[1][1])

    def forward(self, args, shapes):
        k, n = shapes[1]
        return sym.func("reldl_affine", args[0], args[1], args[2], rows(args[0], k), _int(k), _int(n))

    def vjp(self, i, args, grad, shapes):
        if i == 2:
            return sym.func("reldl_col_sum", grad, rows(grad, shapes[1][1]), _int(shapes[1][1]))
        return Matmul().vjp(i, args[:2], grad, shapes[:2])

    def vjp_sum(self, i, args, grad, shapes):
        return Matmul().vjp_sum(i, args[:2], grad, shapes[:2]) if i < 2 else None


class BiasAdd(Kernel):
    """``A (m, n) + b (n,)`` on every row."""

    name = "bias_add"

    def out_shape(self, shapes):
        if len(shapes) != 2 or len(shapes[0]) != 2 or shapes[1] != shapes[0][1:]:
            raise AutodiffError(f"bias_add needs a tile (m, n) and a vector (n,), got {list(shapes)}")
        return shapes[0]

    def forward(self, args, shapes):
        return _plus_bias(args[0], args[1], _int(shapes[0][1]))

    def vjp(self, i, args, grad, shapes):
        n = shapes[0][1]
        return grad.copy() if i == 0 else sym.func("reldl_col_sum", grad, rows(grad, n), _int(n))


class SoftmaxXent(Kernel):
    """Softmax cross-entropy per row: logits ``(m, n)`` and class labels ``(m,)`` (0-based, as DOUBLE) -> ``(m,)``;
    or one row: logits ``(n,)`` and a scalar label -> a scalar (per-node outputs of a GCN)."""

    name = "softmax_xent"

    def out_shape(self, shapes):
        if len(shapes) == 2 and len(shapes[0]) == 1 and shapes[1] == ():
            return ()
        if len(shapes) != 2 or len(shapes[0]) != 2 or shapes[1] != shapes[0][:1]:
            raise AutodiffError(f"softmax_xent needs logits (m, n) and labels (m,), or (n,) and (), got {list(shapes)}")
        return shapes[1]

    def forward(self, args, shapes):
        n = shapes[0][-1]
        if len(shapes[0]) == 1:
            one = sym.func("reldl_softmax_xent", args[0], sym.func("list_value", args[1]), _int(1), _int(n))
            return at(one, _int(1))
        return sym.func("reldl_softmax_xent", args[0], args[1], rows(args[0], n), _int(n))

    def differentiable(self, i):
        return i == 0

    def vjp(self, i, args, grad, shapes):
        if i != 0:
            raise AutodiffError("softmax_xent has no gradient with respect to the labels")
        n = shapes[0][-1]
        if len(shapes[0]) == 1:
            probs = sym.func("reldl_softmax_xent_grad", args[0], sym.func("list_value", args[1]), _int(1), _int(n))
            return transform(probs, sym.mul(_lam_col(_X), grad), with_index=False)
        row = sym.add(exp.IntDiv(this=exp.Paren(this=sym.sub(_lam_col(_I), _int(1))), expression=_int(n)), _int(1))
        probs = sym.func("reldl_softmax_xent_grad", args[0], args[1], rows(args[0], n), _int(n))
        return transform(probs, sym.mul(_lam_col(_X), at(grad, row)))


class TileSum(Kernel):
    """Sum of a tile's elements -> a scalar."""

    name = "tile_sum"

    def out_shape(self, shapes):
        if len(shapes) != 1 or shapes[0] == ():
            raise AutodiffError(f"tile_sum needs one tile, got {list(shapes)}")
        return ()

    def forward(self, args, shapes):
        return sym.func("list_sum", args[0])

    def vjp(self, i, args, grad, shapes):
        return transform(args[0], grad.copy(), with_index=False)


class Dot(Kernel):
    """Dot product of two vectors ``(n,)`` -> a scalar."""

    name = "dot"

    def out_shape(self, shapes):
        if len(shapes) != 2 or len(shapes[0]) != 1 or shapes[0] != shapes[1]:
            raise AutodiffError(f"dot needs two vectors of one length, got {list(shapes)}")
        return ()

    def forward(self, args, shapes):
        return sym.func("list_dot_product", args[0], args[1])

    def vjp(self, i, args, grad, shapes):
        return transform(args[1 - i], sym.mul(_lam_col(_X), grad), with_index=False)


TILE_KERNELS: dict[str, Kernel] = {k.name: k for k in (Matmul(), Affine(), BiasAdd(), SoftmaxXent(), TileSum(), Dot())}
KERNELS = sorted(set(ELEMENTWISE) | set(TILE_KERNELS))


def kernel(name: str) -> Kernel:
    """The registered kernel called ``name``."""
    return TILE_KERNELS[name] if name in TILE_KERNELS else elementwise(name)


# ---------------------------------------------------------------------------------------------------------------------
# the reldl_* functions, as DuckDB UDFs over Arrow buffers


def _lists(a: Any) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of a list<double> Arrow array (offsets index ``values``), nulls refused."""
    if isinstance(a, pa.ChunkedArray):
        a = a.combine_chunks()
    if a.null_count:
        raise ValueError("a tile is NULL")
    offsets = np.asarray(a.offsets, dtype=np.int64)
    values = np.asarray(a.values.to_numpy(zero_copy_only=False), dtype=np.float64)
    return offsets, values


def _ints(a: Any) -> np.ndarray:
    if isinstance(a, pa.ChunkedArray):
        a = a.combine_chunks()
    return np.asarray(a.to_numpy(zero_copy_only=False), dtype=np.int64)


def _take(offsets: np.ndarray, values: np.ndarray, idx: np.ndarray, length: int) -> np.ndarray:
    """Rows ``idx`` (all of one ``length``) as an array [len(idx), length], without a Python loop over rows."""
    starts = offsets[idx]
    if len(idx) and np.all(np.diff(starts) == length):  # contiguous: a view
        return values[starts[0] : starts[0] + len(idx) * length].reshape(len(idx), length)
    return values[starts[:, None] + np.arange(length)]


def _by_length(offsets: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """Row indices grouped by list length: [(rows, length)] (usually one group; two with a short last block)."""
    lengths = np.diff(offsets)
    uniq = np.unique(lengths)
    if len(uniq) == 1:
        return [(np.arange(len(lengths)), int(uniq[0]))]
    return [(np.nonzero(lengths == n)[0], int(n)) for n in uniq]


def _tiles(a: Any, cols: int, what: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rows grouped by tile length: [(row indices, array [rows, len/cols, cols])]."""
    offsets, values = _lists(a)
    groups = []
    for idx, length in _by_length(offsets):
        if cols < 1 or length % cols:
            raise ValueError(f"{what}: a tile's length is not a multiple of {cols}")
        groups.append((idx, _take(offsets, values, idx, length).reshape(len(idx), length // cols, cols)))
    return groups


def _gather(n: int, results: list[tuple[np.ndarray, np.ndarray]]) -> pa.Array:
    """Reassemble per-group results [(row indices, array [rows, ...])] in row order, as a list<double> array."""
    lengths = np.zeros(n, dtype=np.int64)
    flats = []
    for idx, arr in results:
        flat = arr.reshape(len(idx), -1)
        lengths[idx] = flat.shape[1]
        flats.append((idx, flat))
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if len(flats) == 1 and len(flats[0][0]) == n:
        values = np.ascontiguousarray(flats[0][1]).ravel()
    else:
        values = np.empty(offsets[-1], dtype=np.float64)
        for idx, flat in flats:
            values[offsets[idx][:, None] + np.arange(flat.shape[1])] = flat
    return _list_array(offsets, values)


def _list_array(offsets: np.ndarray, values: np.ndarray) -> pa.Array:
    if offsets[-1] >= 2**31:
        return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, pa.float64()))
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, pa.float64()))


def _const(a: Any) -> int:
    v = _ints(a)
    if len(v) and np.any(v != v[0]):
        raise ValueError("a tile dimension varies between rows")
    return int(v[0]) if len(v) else 0


def _matmul(kind: str):
    def run(a, b, m, k, n):
        k_, n_ = (None if kind == "tn" else _const(k)), _const(n)  # tn: k is the rows of a, varying per row
        bo, bv = _lists(b)
        a_cols = _const(m) if kind == "tn" else k_  # tn: a is [k, m] per row, m fixed; else a is [m, k]
        out = []
        for idx, a3 in _tiles(a, a_cols, f"reldl_matmul_{kind}"):
            b_len = a3.shape[1] * n_ if kind == "tn" else k_ * n_
            if np.any(np.diff(bo)[idx] != b_len):
                raise ValueError(f"reldl_matmul_{kind}: the right tile does not have {b_len} elements")
            b2 = _take(bo, bv, idx, b_len)
            if kind != "tn" and len(idx) > 1 and np.array_equal(b2, np.broadcast_to(b2[0], b2.shape)):
                # one weight tile cross-joined to every row: a single GEMM over the stacked rows (BLAS-sized)
                w = b2[0].reshape(k_, n_) if kind == "nn" else b2[0].reshape(n_, k_).T
                out.append((idx, (a3.reshape(-1, k_) @ w).reshape(len(idx), a3.shape[1], n_)))
                continue
            if kind == "nn":
                b3 = b2.reshape(len(idx), k_, n_)
            elif kind == "nt":
                b3 = b2.reshape(len(idx), n_, k_).transpose(0, 2, 1)
            else:  # a is [k, m] (a3 [rows, k, m]), b is [k, n]
                a3, b3 = a3.transpose(0, 2, 1), b2.reshape(len(idx), a3.shape[1], n_)
            if a3.shape[1] * a3.shape[2] >= 4096:  # big tiles: one BLAS call each (numpy's stacked matmul may not
                out.append((idx, np.stack([x @ y for x, y in zip(a3, b3)])))  # use BLAS on transposed stacks)
            else:
                out.append((idx, a3 @ b3))
        return _gather(len(bo) - 1, out)

    return run


def _affine(a, w, b, m, k, n):
    """``a @ w + b`` per row (a: m x k, w: k x n, b: n); one GEMM when every row has the same w and b."""
    k_, n_ = _const(k), _const(n)
    wo, wv = _lists(w)
    bo, bv = _lists(b)
    out = []
    for idx, a3 in _tiles(a, k_, "reldl_affine"):
        if np.any(np.diff(wo)[idx] != k_ * n_) or np.any(np.diff(bo)[idx] != n_):
            raise ValueError(f"reldl_affine: the weight is not {k_} x {n_} or the bias not {n_} long")
        w2, b2 = _take(wo, wv, idx, k_ * n_), _take(bo, bv, idx, n_)
        if np.array_equal(w2, np.broadcast_to(w2[0], w2.shape)) and np.array_equal(
            b2, np.broadcast_to(b2[0], b2.shape)
        ):
            y = a3.reshape(-1, k_) @ w2[0].reshape(k_, n_)
            y += b2[0]
            out.append((idx, y.reshape(len(idx), a3.shape[1], n_)))
        else:
            out.append((idx, a3 @ w2.reshape(len(idx), k_, n_) + b2[:, None, :]))
    return _gather(len(wo) - 1, out)


def _col_sum(a, m, n):
    groups = _tiles(a, _const(n), "reldl_col_sum")
    return _gather(sum(len(i) for i, _ in groups), [(idx, t.sum(axis=1)) for idx, t in groups])


def _row_sum(a, m, n):
    groups = _tiles(a, _const(n), "reldl_row_sum")
    return _gather(sum(len(i) for i, _ in groups), [(idx, t.sum(axis=2)) for idx, t in groups])


def _xent_parts(logits, labels, n):
    groups = _tiles(logits, _const(n), "reldl_softmax_xent")
    lo, lv = _lists(labels)
    for idx, z in groups:
        if np.any(np.diff(lo)[idx] != z.shape[1]):
            raise ValueError("reldl_softmax_xent: labels do not match the logits' rows")
        y = _take(lo, lv, idx, z.shape[1])
        yi = y.astype(np.int64)
        if np.any(yi != y) or np.any(yi < 0) or np.any(yi >= z.shape[2]):
            raise ValueError(f"reldl_softmax_xent: labels must be class indices in [0, {z.shape[2]})")
        zmax = z.max(axis=2, keepdims=True)
        e = np.exp(z - zmax)
        s = e.sum(axis=2, keepdims=True)
        yield idx, z, yi, zmax, e, s


def _softmax_xent(logits, labels, m, n):
    out = []
    for idx, z, yi, zmax, _e, s in _xent_parts(logits, labels, n):
        picked = np.take_along_axis(z, yi[..., None], axis=2)
        out.append((idx, (np.log(s) + zmax - picked)[..., 0]))
    return _gather(len(_ints(m)), out)


def _softmax_xent_grad(logits, labels, m, n):
    out = []
    for idx, _z, yi, _zmax, e, s in _xent_parts(logits, labels, n):
        p = e / s
        np.put_along_axis(p, yi[..., None], np.take_along_axis(p, yi[..., None], axis=2) - 1.0, axis=2)
        out.append((idx, p))
    return _gather(len(_ints(m)), out)


def _reduce_tiles(ufunc: np.ufunc):
    """An element-wise reduction (np.add, np.maximum) of each row's list of equal-length tiles."""

    def run(tiles):
        if isinstance(tiles, pa.ChunkedArray):
            tiles = tiles.combine_chunks()
        if tiles.null_count:
            raise ValueError("a group's tile list is NULL")
        outer = np.asarray(tiles.offsets, dtype=np.int64)
        inner_o, inner_v = _lists(tiles.values)
        n = len(outer) - 1
        first, last = outer[:-1], outer[1:]
        sizes = np.diff(inner_o)[outer[0] : outer[-1]]
        if len(sizes) and np.any(sizes != sizes[0]):
            raise ValueError("tiles of different lengths in one aggregate")
        width = int(sizes[0]) if len(sizes) else 0
        block = inner_v[inner_o[outer[0]] : inner_o[outer[-1]]].reshape(-1, width) if width else None
        nonempty = last > first
        lengths = np.where(nonempty, width, 0).astype(np.int64)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if block is None or not nonempty.any():
            return _list_array(offsets, np.zeros(0))
        reduced = ufunc.reduceat(block, (first - outer[0])[nonempty], axis=0)
        return _list_array(offsets, reduced.ravel())

    return run


def _matmul_tn_sum(la, lg, k, n):
    """Per row: the sum over its list of tile pairs of A_r^T G_r (A_r: m_r x k, G_r: m_r x n), as one GEMM."""
    k_, n_ = _const(k), _const(n)
    out_pieces, lengths = [], []
    for lists, cols in ((la, k_), (lg, n_)):
        if isinstance(lists, pa.ChunkedArray):
            lists = lists.combine_chunks()
        out_pieces.append((np.asarray(lists.offsets, dtype=np.int64), *_lists(lists.values), cols))
    (ao, aio, aiv, _), (go, gio, giv, _) = out_pieces
    results = []
    for r in range(len(ao) - 1):
        a = aiv[aio[ao[r]] : aio[ao[r + 1]]]
        g = giv[gio[go[r]] : gio[go[r + 1]]]
        if a.size % k_ or g.size % n_ or a.size // k_ != g.size // n_:
            raise ValueError("reldl_matmul_tn_sum: the tiles' rows do not match")
        results.append((a.reshape(-1, k_).T @ g.reshape(-1, n_)).ravel())
        lengths.append(k_ * n_)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return _list_array(offsets, np.concatenate(results) if results else np.zeros(0))


def _code(a: Any) -> str:
    """The one SQL text of a column of element-wise expressions (a constant argument)."""
    if isinstance(a, pa.ChunkedArray):
        a = a.combine_chunks()
    values = set(a.to_pylist())
    if len(values) != 1 or None in values:
        raise ValueError("an element-wise expression argument must be one constant text")
    return values.pop()


def _activated(a: Any, code: Any) -> pa.Array:
    """``act(a)`` element by element, as a list<double> array of the same shape as ``a``."""
    offsets, values = _lists(a)
    return _list_array(offsets, _compiled(_code(code))(values))


def _affine_act(code, a, w, b, m, k, n):
    return _affine(_activated(a, code), w, b, m, k, n)


def _matmul_act(code, a, w, m, k, n):
    return _matmul("nn")(_activated(a, code), w, m, k, n)


def _matmul_tn_act(code, a, g, k, m, n):
    return _matmul("tn")(_activated(a, code), g, k, m, n)


def _matmul_nt_act(code, g, w, z, m, n, k):
    """``d(z) * (g @ w^T)`` per row, ``d`` the element-wise derivative in ``code``."""
    prod = _matmul("nt")(g, w, m, n, k)
    po, pv = _lists(prod)
    zo, zv = _lists(z)
    if not np.array_equal(po, zo):
        raise ValueError("reldl_matmul_nt_act: the tiles' shapes do not match")
    return _list_array(po, _compiled(_code(code))(zv) * pv)


# ---------------------------------------------------------------------------------------------------------------------
# the fused functions as per-row kernels and list lambdas: the same results from functions other engines translate


def _list_arg(e: exp.Expression) -> exp.Expression | None:
    """x of DuckDB's ``list(x)`` aggregate (an Anonymous call, or sqlglot's ArrayAgg when parsed), else None."""
    if isinstance(e, exp.Anonymous) and str(e.this).lower() == "list" and len(e.expressions) == 1:
        return e.expressions[0]
    if isinstance(e, exp.ArrayAgg) and not isinstance(e.this, (exp.Order, exp.Distinct)):
        return e.this
    return None


def _affine_unfused(args: list[exp.Expression]) -> exp.Expression:
    if len(args) != 6:
        raise AutodiffError("reldl_affine() takes 6 arguments")
    a, w, b, m, k, n = args
    return _plus_bias(sym.func("reldl_matmul", a, w, m, k, n), b, n)


def _matmul_tn_sum_unfused(args: list[exp.Expression]) -> exp.Expression:
    a, g = (_list_arg(x) for x in args[:2]) if len(args) == 4 else (None, None)
    if a is None or g is None:
        raise AutodiffError("reldl_matmul_tn_sum() needs list(a), list(g), k, n")
    k, n = args[2], args[3]
    per_row = sym.func("reldl_matmul_tn", a, g, k, exp.IntDiv(this=length(g), expression=n.copy()), n)
    return sym.func("reldl_tile_sum", exp.Anonymous(this="list", expressions=[per_row]))


def _act_code(arg: exp.Expression, fn: str) -> exp.Expression:
    import sqlglot

    if not isinstance(arg, exp.Literal) or not arg.is_string:
        raise AutodiffError(f"{fn}() needs the element-wise expression as a text literal")
    return sqlglot.parse_one(arg.this, read="duckdb")


def _act_lambda(code: exp.Expression, tile: exp.Expression) -> exp.Expression:
    """``list_transform(tile, lambda __x, __i: code(__x))``."""
    return transform(tile, _substitute(code, {Elementwise.placeholder(0): _lam_col(_X)}))


def _affine_act_unfused(args: list[exp.Expression]) -> exp.Expression:
    if len(args) != 7:
        raise AutodiffError("reldl_affine_act() takes 7 arguments")
    return _affine_unfused([_act_lambda(_act_code(args[0], "reldl_affine_act"), args[1]), *args[2:]])


def _matmul_act_unfused(args: list[exp.Expression]) -> exp.Expression:
    if len(args) != 6:
        raise AutodiffError("reldl_matmul_act() takes 6 arguments")
    return sym.func("reldl_matmul", _act_lambda(_act_code(args[0], "reldl_matmul_act"), args[1]), *args[2:])


def _matmul_tn_act_unfused(args: list[exp.Expression]) -> exp.Expression:
    if len(args) != 6:
        raise AutodiffError("reldl_matmul_tn_act() takes 6 arguments")
    return sym.func("reldl_matmul_tn", _act_lambda(_act_code(args[0], "reldl_matmul_tn_act"), args[1]), *args[2:])


def _matmul_nt_act_unfused(args: list[exp.Expression]) -> exp.Expression:
    if len(args) != 7:
        raise AutodiffError("reldl_matmul_nt_act() takes 7 arguments")
    d = _act_code(args[0], "reldl_matmul_nt_act")
    g, w, z, m, n, k = args[1:]
    body = sym.mul(_substitute(d, {Elementwise.placeholder(0): at(z, _lam_col(_I))}), _lam_col(_X))
    return transform(sym.func("reldl_matmul_nt", g, w, m, n, k), body)


UNFUSED: dict[str, Callable[[list[exp.Expression]], exp.Expression]] = {
    "reldl_affine": _affine_unfused,  # reldl_matmul, then the bias added per row
    "reldl_matmul_tn_sum": _matmul_tn_sum_unfused,  # per-row reldl_matmul_tn under reldl_tile_sum(list(...))
    # an element-wise kernel applied to the first input inside the call: a list lambda around it
    "reldl_affine_act": _affine_act_unfused,
    "reldl_matmul_act": _matmul_act_unfused,
    "reldl_matmul_tn_act": _matmul_tn_act_unfused,
    "reldl_matmul_nt_act": _matmul_nt_act_unfused,
}


_DOUBLES, _INT = "DOUBLE[]", "BIGINT"
UDFS: dict[str, tuple[Callable, list[str], str]] = {
    "reldl_matmul": (_matmul("nn"), [_DOUBLES, _DOUBLES, _INT, _INT, _INT], _DOUBLES),
    "reldl_matmul_nt": (_matmul("nt"), [_DOUBLES, _DOUBLES, _INT, _INT, _INT], _DOUBLES),
    "reldl_matmul_tn": (_matmul("tn"), [_DOUBLES, _DOUBLES, _INT, _INT, _INT], _DOUBLES),
    "reldl_affine": (_affine, [_DOUBLES, _DOUBLES, _DOUBLES, _INT, _INT, _INT], _DOUBLES),
    "reldl_matmul_tn_sum": (_matmul_tn_sum, ["DOUBLE[][]", "DOUBLE[][]", _INT, _INT], _DOUBLES),
    "reldl_affine_act": (_affine_act, ["VARCHAR", _DOUBLES, _DOUBLES, _DOUBLES, _INT, _INT, _INT], _DOUBLES),
    "reldl_matmul_act": (_matmul_act, ["VARCHAR", _DOUBLES, _DOUBLES, _INT, _INT, _INT], _DOUBLES),
    "reldl_matmul_tn_act": (_matmul_tn_act, ["VARCHAR", _DOUBLES, _DOUBLES, _INT, _INT, _INT], _DOUBLES),
    "reldl_matmul_nt_act": (_matmul_nt_act, ["VARCHAR", _DOUBLES, _DOUBLES, _DOUBLES, _INT, _INT, _INT], _DOUBLES),
    "reldl_col_sum": (_col_sum, [_DOUBLES, _INT, _INT], _DOUBLES),
    "reldl_row_sum": (_row_sum, [_DOUBLES, _INT, _INT], _DOUBLES),
    "reldl_softmax_xent": (_softmax_xent, [_DOUBLES, _DOUBLES, _INT, _INT], _DOUBLES),
    "reldl_softmax_xent_grad": (_softmax_xent_grad, [_DOUBLES, _DOUBLES, _INT, _INT], _DOUBLES),
    "reldl_tile_sum": (_reduce_tiles(np.add), ["DOUBLE[][]"], _DOUBLES),
    "reldl_tile_max": (_reduce_tiles(np.maximum), ["DOUBLE[][]"], _DOUBLES),
}


def install(duck: Any) -> None:
    """Register the ``reldl_*`` tile functions on a DuckDB connection (once; later calls do nothing)."""
    present = {
        r[0]
        for r in duck.execute(
            "SELECT function_name FROM duckdb_functions() WHERE function_name LIKE 'reldl\\_%' ESCAPE '\\'"
        ).fetchall()
    }
    for name, (fn, args, ret) in UDFS.items():
        if name not in present:
            duck.create_function(name, fn, args, ret, type="arrow", side_effects=False)
