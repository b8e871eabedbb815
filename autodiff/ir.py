"""The relational IR that reldl differentiates: tensors as relations of keyed tiles, and four operators over them.

A node is a relation with named key columns (unique per row) and one value column ``v`` holding a tile:

* shape ``()``: a DOUBLE per row (scalar tuples: sparse data, one entry per row);
* shape ``(n,)`` or ``(m, n)``: a ``DOUBLE[]`` per row, a vector or a row-major matrix tile. The leading dimension of a
  tile may be shorter in the last block of a relation (kernels read it from the tile's length), so a table of
  1,000,003 rows cut in blocks of 1,024 needs no padding.

Operators (each one SELECT; :mod:`reldl.autodiff.emit` writes them as sqlglot trees):

* :class:`Scan`: a table (or query) read as ``(keys..., v)``; ``param=True`` marks what gradients are taken for.
* :class:`Join`: a natural join of its inputs on their shared key names, with a kernel applied to their values; the
  output keys are the union of the inputs' keys, so a join never contracts (a map is a join of one input).
  An optional ``where`` (a predicate over key names) filters rows: selection.
* :class:`Aggregate`: GROUP BY a subset of the keys with SUM, AVG, MAX or COUNT (element-wise on tiles).
* :class:`Rename`: renames keys (free), so one relation can play two roles (``H(j)`` and ``H(i)`` in a GCN).

A matrix product is a Join (tile kernel ``matmul``) followed by an Aggregate summing over the contracted key, as in
Tang et al.'s relational autodiff. Nodes are immutable and compared by identity: a node used twice is one node with
two consumers, and its gradient is the sum of both contributions.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlglot import exp

if TYPE_CHECKING:
    from reldl.autodiff.kernels import Kernel

Shape = tuple[int, ...]
AGGREGATES = ("sum", "avg", "max", "count")

_ids = itertools.count()


class AutodiffError(ValueError):
    """A graph or query that reldl's relational autodiff cannot build or differentiate (message says why)."""


def _check_keys(keys: Iterable[str], what: str) -> tuple[str, ...]:
    keys = tuple(keys)
    for k in keys:
        if not isinstance(k, str) or not k.isidentifier() or k == "v":
            raise AutodiffError(f"{what}: key {k!r} must be an identifier other than 'v'")
    if len(set(keys)) != len(keys):
        raise AutodiffError(f"{what}: duplicate key in {keys}")
    return keys


def _check_shape(shape: Sequence[int], what: str) -> Shape:
    shape = tuple(int(d) for d in shape)
    if len(shape) > 2 or any(d < 1 for d in shape):
        raise AutodiffError(f"{what}: tile shape must be (), (n,) or (m, n) with positive sizes, got {shape}")
    return shape


@dataclass(eq=False)
class Node:
    """A relation ``(keys..., v)``; subclasses say how it is computed."""

    keys: tuple[str, ...]
    shape: Shape
    name: str = field(default="", kw_only=True)  # a readable label for EXPLAIN and generated names
    id: int = field(default_factory=lambda: next(_ids), init=False)

    @property
    def inputs(self) -> tuple[Node, ...]:
        return ()

    def label(self) -> str:
        return self.name or f"{type(self).__name__.lower()}{self.id}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label()}, keys={self.keys}, shape={self.shape})"


@dataclass(eq=False, repr=False)
class Scan(Node):
    """Rows of ``source`` (a table name, SQL text of a query, or a sqlglot tree) as ``(keys..., v)``.

    ``columns`` maps each key name to the source column holding it (default: the same name); ``value`` is the
    source column (or expression) holding the tile.
    """

    source: Any = None
    value: str | exp.Expression = "v"
    columns: dict[str, str] = field(default_factory=dict)
    param: bool = False

    def __post_init__(self) -> None:
        self.keys = _check_keys(self.keys, f"scan {self.label()}")
        self.shape = _check_shape(self.shape, f"scan {self.label()}")
        if self.source is None:
            raise AutodiffError(f"scan {self.label()}: no source table")


@dataclass(eq=False, repr=False)
class Join(Node):
    """``kernel(v_0, ..., v_n)`` over the natural join of the inputs on shared key names, optionally filtered."""

    parts: tuple[Node, ...] = ()
    kernel: Kernel | None = None
    where: exp.Expression | None = None  # over key names

    @property
    def inputs(self) -> tuple[Node, ...]:
        return self.parts


@dataclass(eq=False, repr=False)
class Aggregate(Node):
    """GROUP BY ``keys`` (a subset of the input's keys) with ``fn`` applied to ``v`` (element-wise on tiles)."""

    source: Node | None = None
    fn: str = "sum"

    @property
    def inputs(self) -> tuple[Node, ...]:
        return (self.source,)


@dataclass(eq=False, repr=False)
class Rename(Node):
    """The same rows with keys renamed (``mapping``: old name -> new name)."""

    source: Node | None = None
    mapping: dict[str, str] = field(default_factory=dict)

    @property
    def inputs(self) -> tuple[Node, ...]:
        return (self.source,)


def join(kernel: Kernel, *parts: Node, where: exp.Expression | str | None = None, name: str = "") -> Join:
    """Apply ``kernel`` to the values of ``parts`` joined on their shared keys (a map when there is one part)."""
    if not parts:
        raise AutodiffError("a join needs at least one input")
    keys: list[str] = []
    for p in parts:
        if not isinstance(p, Node):
            raise AutodiffError(f"join inputs must be relations, got {type(p).__name__}")
        keys += [k for k in p.keys if k not in keys]
    shape = kernel.out_shape([p.shape for p in parts])
    if isinstance(where, str):
        import sqlglot

        where = sqlglot.parse_one(where, read="duckdb")
    if where is not None:
        unknown = {c.name for c in where.find_all(exp.Column)} - set(keys)
        if unknown:
            raise AutodiffError(f"join filter uses {sorted(unknown)}, which are not keys of its inputs {keys}")
    return Join(tuple(keys), shape, parts=tuple(parts), kernel=kernel, where=where, name=name)


def aggregate(source: Node, by: Sequence[str] = (), fn: str = "sum", name: str = "") -> Aggregate:
    """GROUP BY ``by`` with ``fn`` (sum, avg, max, count); ``by=()`` reduces to one row."""
    if fn not in AGGREGATES:
        raise AutodiffError(f"unknown aggregate {fn!r} (one of {', '.join(AGGREGATES)})")
    by = _check_keys(by, "aggregate")
    missing = [k for k in by if k not in source.keys]
    if missing:
        raise AutodiffError(f"aggregate groups by {missing}, which are not keys of {source.label()} {source.keys}")
    shape = () if fn == "count" else source.shape
    return Aggregate(by, shape, source=source, fn=fn, name=name)


def rename(source: Node, mapping: dict[str, str], name: str = "") -> Rename:
    """The relation with keys renamed, e.g. ``rename(h, {"j": "i"})``."""
    unknown = [k for k in mapping if k not in source.keys]
    if unknown:
        raise AutodiffError(f"rename: {unknown} are not keys of {source.label()} {source.keys}")
    keys = _check_keys((mapping.get(k, k) for k in source.keys), "rename")
    return Rename(keys, source.shape, source=source, mapping=dict(mapping), name=name)


def topological(roots: Sequence[Node]) -> list[Node]:
    """Every node the roots depend on, inputs before consumers, each once."""
    order: list[Node] = []
    seen: set[int] = set()
    stack: list[tuple[Node, bool]] = [(r, False) for r in reversed(roots)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if node.id in seen:
            continue
        seen.add(node.id)
        stack.append((node, True))
        stack.extend((i, False) for i in reversed(node.inputs) if i.id not in seen)
    return order


def params(root: Node) -> list[Scan]:
    """The parameter scans ``root`` depends on, in first-use order."""
    return [n for n in topological([root]) if isinstance(n, Scan) and n.param]
