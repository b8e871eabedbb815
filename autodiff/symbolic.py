"""Symbolic derivatives of scalar SQL expressions (sqlglot trees), for element-wise kernels and the SQL front end.

``derivative(e, x)`` is d e / d x where ``x`` is a column name standing for a variable; other columns are constants.
Supported: numbers, + - * /, unary minus, parentheses, POWER / ** / ^, EXP, LN, LOG (DuckDB's one-argument LOG is
base 10; LOG(b, x), LOG2, LOG10), SQRT, TANH, ABS, SIGN, GREATEST / LEAST, CASE (conditions are held fixed: the
derivative is taken piecewise) and CAST to a floating type. Anything else raises :class:`AutodiffError` naming it.
Results are lightly simplified (0 * e = 0, 1 * e = e, e + 0 = e) so generated SQL stays small.
"""

from __future__ import annotations

import math

from sqlglot import exp

from reldl.autodiff.ir import AutodiffError

_LN10 = math.log(10.0)


def num(x: float | int) -> exp.Expression:
    """A DOUBLE literal (an exponent keeps DuckDB from reading DECIMAL); negatives as unary minus."""
    lit = exp.Literal.number(f"{abs(float(x)):.17e}")
    return exp.Neg(this=lit) if x < 0 else lit


def is_const(e: exp.Expression, value: float) -> bool:
    if isinstance(e, exp.Paren):
        return is_const(e.this, value)
    if isinstance(e, exp.Literal) and not e.is_string:
        return float(e.this) == value
    if isinstance(e, exp.Neg):
        return is_const(e.this, -value) if value != 0 else is_const(e.this, 0.0)
    return False


def _wrap(e: exp.Expression) -> exp.Expression:
    return e if isinstance(e, (exp.Column, exp.Literal, exp.Paren, exp.Func, exp.Bracket)) else exp.Paren(this=e)


def add(a: exp.Expression, b: exp.Expression) -> exp.Expression:
    if is_const(a, 0.0):
        return b
    if is_const(b, 0.0):
        return a
    return exp.Add(this=_wrap(a), expression=_wrap(b))


def sub(a: exp.Expression, b: exp.Expression) -> exp.Expression:
    if is_const(b, 0.0):
        return a
    if is_const(a, 0.0):
        return neg(b)
    return exp.Sub(this=_wrap(a), expression=_wrap(b))


def neg(a: exp.Expression) -> exp.Expression:
    if is_const(a, 0.0):
        return num(0.0)
    return exp.Neg(this=_wrap(a))


def mul(a: exp.Expression, b: exp.Expression) -> exp.Expression:
    if is_const(a, 0.0) or is_const(b, 0.0):
        return num(0.0)
    if is_const(a, 1.0):
        return b
    if is_const(b, 1.0):
        return a
    return exp.Mul(this=_wrap(a), expression=_wrap(b))


def div(a: exp.Expression, b: exp.Expression) -> exp.Expression:
    if is_const(a, 0.0):
        return num(0.0)
    if is_const(b, 1.0):
        return a
    return exp.Div(this=_wrap(a), expression=_wrap(b))


def func(name: str, *args: exp.Expression) -> exp.Expression:
    """A call DuckDB and sqlglot read the same way (an Anonymous node: sqlglot adds no dialect rewrites)."""
    return exp.Anonymous(this=name, expressions=[a.copy() for a in args])


def _ln(x: exp.Expression) -> exp.Expression:
    return exp.Ln(this=x.copy())


def depends_on(e: exp.Expression, x: str) -> bool:
    return any(c.name == x and not c.table for c in e.find_all(exp.Column))


def derivative(e: exp.Expression, x: str) -> exp.Expression:
    """d e / d x, as a new tree."""
    if not depends_on(e, x):
        return num(0.0)
    d = _DERIVATIVES.get(type(e))
    if d is None and isinstance(e, exp.Anonymous):
        d = _ANONYMOUS.get(e.name.lower())
    if d is None:
        raise AutodiffError(f"cannot differentiate {e.sql('duckdb')!r}: {_what(e)} is not supported")
    return d(e, x)


def _what(e: exp.Expression) -> str:
    return f"function {e.name.upper()}" if isinstance(e, exp.Anonymous) else e.key.upper()


def _column(e: exp.Column, x: str) -> exp.Expression:
    return num(1.0) if e.name == x and not e.table else num(0.0)


def _pow(e: exp.Pow, x: str) -> exp.Expression:
    base, power = e.this, e.expression
    if not depends_on(power, x):  # d b^c = c b^(c-1) b'
        c_minus_1 = num(float(power.this) - 1.0) if isinstance(power, exp.Literal) else sub(power.copy(), num(1.0))
        return mul(mul(power.copy(), exp.Pow(this=base.copy(), expression=c_minus_1)), derivative(base, x))
    # d b^p = b^p (p' ln b + p b' / b)
    inner = add(mul(derivative(power, x), _ln(base)), div(mul(power.copy(), derivative(base, x)), base.copy()))
    return mul(e.copy(), inner)


def _log(e: exp.Log, x: str) -> exp.Expression:
    if e.expression is None:  # DuckDB LOG(x): base 10
        arg, ln_base = e.this, num(_LN10)
    else:
        base, arg = e.this, e.expression
        if depends_on(base, x):
            raise AutodiffError(f"cannot differentiate {e.sql('duckdb')!r} with respect to the logarithm's base")
        ln_base = num(math.log(float(base.this))) if isinstance(base, exp.Literal) else _ln(base)
    return div(derivative(arg, x), mul(arg.copy(), ln_base))


def _extremum(e: exp.Expression, x: str, pick: str) -> exp.Expression:
    args = [e.this, *e.expressions]
    if len(args) != 2:
        raise AutodiffError(f"cannot differentiate {e.sql('duckdb')!r}: only two-argument {pick.upper()} is supported")
    a, b = args
    cond = (
        exp.GTE(this=a.copy(), expression=b.copy())
        if pick == "greatest"
        else exp.LTE(this=a.copy(), expression=b.copy())
    )
    return exp.Case(ifs=[exp.If(this=cond, true=derivative(a, x))], default=derivative(b, x))


def _case(e: exp.Case, x: str) -> exp.Expression:
    ifs = [exp.If(this=i.this.copy(), true=derivative(i.args["true"], x)) for i in e.args.get("ifs") or []]
    default = e.args.get("default")
    return exp.Case(ifs=ifs, default=derivative(default, x) if default is not None else num(0.0))


def _cast(e: exp.Cast, x: str) -> exp.Expression:
    to = e.args["to"]
    if not (to.is_type(*exp.DataType.FLOAT_TYPES) or to.is_type(exp.DataType.Type.DECIMAL)):
        raise AutodiffError(f"cannot differentiate through {e.sql('duckdb')!r}: the cast is not to a floating type")
    return derivative(e.this, x)


def _tanh(arg: exp.Expression, x: str) -> exp.Expression:  # 1 - tanh^2
    t = func("tanh", arg)
    return mul(sub(num(1.0), mul(t, t.copy())), derivative(arg, x))


_DERIVATIVES = {
    exp.Column: _column,
    exp.Literal: lambda e, x: num(0.0),
    exp.Paren: lambda e, x: derivative(e.this, x),
    exp.Neg: lambda e, x: neg(derivative(e.this, x)),
    exp.Add: lambda e, x: add(derivative(e.this, x), derivative(e.expression, x)),
    exp.Sub: lambda e, x: sub(derivative(e.this, x), derivative(e.expression, x)),
    exp.Mul: lambda e, x: add(
        mul(derivative(e.this, x), e.expression.copy()), mul(e.this.copy(), derivative(e.expression, x))
    ),
    exp.Div: lambda e, x: sub(
        div(derivative(e.this, x), e.expression.copy()),
        div(
            mul(e.this.copy(), derivative(e.expression, x)), exp.Pow(this=_wrap(e.expression.copy()), expression=num(2))
        ),
    ),
    exp.Pow: _pow,
    exp.Exp: lambda e, x: mul(e.copy(), derivative(e.this, x)),
    exp.Ln: lambda e, x: div(derivative(e.this, x), e.this.copy()),
    exp.Log: _log,
    exp.Sqrt: lambda e, x: div(derivative(e.this, x), mul(num(2.0), e.copy())),
    exp.Tanh: lambda e, x: _tanh(e.this, x),
    exp.Abs: lambda e, x: mul(exp.Sign(this=e.this.copy()), derivative(e.this, x)),
    exp.Sign: lambda e, x: num(0.0),
    exp.Greatest: lambda e, x: _extremum(e, x, "greatest"),
    exp.Least: lambda e, x: _extremum(e, x, "least"),
    exp.Case: _case,
    exp.Cast: _cast,
}

_ANONYMOUS = {
    "greatest": lambda e, x: _extremum(
        exp.Greatest(this=e.expressions[0], expressions=e.expressions[1:]), x, "greatest"
    ),
    "least": lambda e, x: _extremum(exp.Least(this=e.expressions[0], expressions=e.expressions[1:]), x, "least"),
    "tanh": lambda e, x: _tanh(e.expressions[0], x),
}
