"""The Python front end: build a model's forward pass as relational operators, then differentiate it.

from reldl import autodiff as ad
x = ad.table("x_tiles", keys=["rb"], shape=(1024, 256))        # data: row blocks of 1024 x 256
y = ad.table("y_tiles", keys=["rb"], shape=(1024,))
w = ad.param("w1", keys=[], shape=(256, 10))                   # one tile
b = ad.param("b1", keys=[], shape=(10,))
logits = ad.apply("bias_add", ad.matmul(x, w), b)
loss = ad.mean(ad.apply("softmax_xent", logits, y))            # mean of per-row-block sums / ...
ad.grad(con, loss)                                             # {"w1": "WITH ... SELECT ...", "b1": ...}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlglot import exp

from reldl.autodiff import ir
from reldl.autodiff.grad import backward
from reldl.autodiff.ir import AutodiffError, Node, Scan
from reldl.autodiff.kernels import Kernel, kernel


def table(
    source: Any,
    keys: Sequence[str] = (),
    shape: Sequence[int] = (),
    value: str = "v",
    columns: dict[str, str] | None = None,
    name: str = "",
) -> Scan:
    """Data: ``source`` (table name, query text or sqlglot tree) read as ``(keys..., v)``."""
    label = name or (source if isinstance(source, str) and source.replace(".", "").isidentifier() else "")
    return Scan(tuple(keys), tuple(shape), source=source, value=value, columns=dict(columns or {}), name=label)


def param(
    source: Any,
    keys: Sequence[str] = (),
    shape: Sequence[int] = (),
    value: str = "v",
    columns: dict[str, str] | None = None,
    name: str = "",
) -> Scan:
    """A parameter table ``(keys..., v)``: what gradients are taken for."""
    s = table(source, keys, shape, value, columns, name)
    s.param = True
    return s


def apply(k: str | Kernel, *inputs: Node, where: exp.Expression | str | None = None, name: str = "") -> ir.Join:
    """``k`` (a kernel or its name) applied to ``inputs`` joined on their shared keys."""
    return ir.join(kernel(k) if isinstance(k, str) else k, *inputs, where=where, name=name)


def sum(x: Node, by: Sequence[str] = (), name: str = "") -> ir.Aggregate:  # noqa: A001 - relational SUM
    return ir.aggregate(x, by, "sum", name)


def mean(x: Node, by: Sequence[str] = (), name: str = "") -> ir.Aggregate:
    return ir.aggregate(x, by, "avg", name)


def max(x: Node, by: Sequence[str] = (), name: str = "") -> ir.Aggregate:  # noqa: A001 - relational MAX
    return ir.aggregate(x, by, "max", name)


def count(x: Node, by: Sequence[str] = (), name: str = "") -> ir.Aggregate:
    return ir.aggregate(x, by, "count", name)


def rename(x: Node, mapping: dict[str, str], name: str = "") -> ir.Rename:
    return ir.rename(x, mapping, name)


def matmul(a: Node, b: Node, contract: Sequence[str] | None = None, name: str = "") -> Node:
    """Tile matrix product summed over the contracted keys (default: the keys ``a`` and ``b`` share).

    ``a(rb, kb)`` tiles (m, k) times ``b(kb, cb)`` tiles (k, n) -> ``(rb, cb)`` tiles (m, n).
    """
    shared = [k for k in a.keys if k in b.keys]
    contract = list(shared if contract is None else contract)
    bad = [k for k in contract if k not in shared]
    if bad:
        raise AutodiffError(f"matmul contracts {bad}, which {a.label()} and {b.label()} do not share")
    product = ir.join(kernel("matmul"), a, b, name=name and f"{name}_partial")
    if not contract:
        return product
    return ir.aggregate(product, [k for k in product.keys if k not in contract], "sum", name)


def linear(x: Node, w: Node, b: Node, name: str = "") -> ir.Join:
    """A dense layer on row-block tiles: ``x (m, k) @ w (k, n) + b (n,)`` in one kernel (``affine``)."""
    return ir.join(kernel("affine"), x, w, b, name=name)


def grad(duck: Any, loss: Node | str, wrt: Sequence[Scan] | Sequence[str] | None = None) -> dict[str, str]:
    """Gradient SQL (DuckDB) for each parameter: one query returning ``(keys..., v)`` per parameter row.

    ``loss`` is a graph built with this module, or the SQL text of a SELECT over parameter and data tables (then
    ``wrt`` names the parameter tables; see :mod:`reldl.autodiff.frontend` for the supported subset).
    """
    if isinstance(loss, str):
        from reldl.autodiff.frontend import gradient_sql

        if not wrt:
            raise AutodiffError("name the parameter tables: wrt=['w', ...]")
        return gradient_sql(_raw(duck), loss, [str(w) for w in wrt])
    prog = backward(loss, wrt)
    return {p.label(): prog.gradient_query(p).sql("duckdb") for p in prog.wrt}


def _raw(duck: Any) -> Any:
    """The DuckDB connection under a reldl connection (or the DuckDB connection itself)."""
    return getattr(duck, "_duck", duck)
