"""Block fusion: the forward and backward pass of a batch's block-local subgraph in one pass over its tiles.

A training step as :func:`reldl.autodiff.grad.backward` writes it reads each batch of data tiles twice: once in the
forward join (``x W1``) and once in the weight gradient's join (``x^T G``), and converts those tiles from DuckDB to
Arrow each time; on an MLP over 16k x 256 float64 rows those two passes were most of the step. But every relation
between the data scans and the per-batch SUM that ends the loss is keyed by the batch's row block and joins only
keyless parameters: the subgraph is *block-local*, and its gradient for a block needs nothing but that block's tiles,
the parameters and the upstream gradient of the SUM (``1 / n`` for a mean loss). So, where the upstream gradient does
not depend on the SUM's own value (a loss linear in it), the step runs the block-local subgraph's forward and its
vector-Jacobian products in numpy inside one UDF call per chunk of rows: each data tile is read and converted once,
and the weight gradients come out summed over the chunk (``reldl_block_step_<types>``). The SQL still does the rest:
the scans, the sum of the chunks' partial gradients, the loss's scalar tail and the updates.

The region's keyless inputs (the parameters, the upstream gradients) reach the UDF through a one-row *stash* step
run just before it (``reldl_block_stash_<n>``, which files them in this process under a fresh token that its one-row
TEMP table hands to the step, so connections running the same plan never read each other's), not as
columns of the batch: a keyless tile joined to every row is converted to Arrow once per row, which on row tiles
(one data row a tuple, 16k a batch) copied W1 16k times a step. Keyed inputs whose column is a fixed-size
``DOUBLE[k]`` array go in as they are (see :func:`resolve_types`): DuckDB hands such a batch to Arrow 2-5x faster
than the same values as ``DOUBLE[]`` lists or as a few large tiles.

This is a physical rewrite of :class:`~reldl.autodiff.grad.Program` (like folding an activation into a matmul): the
relational program from ``backward`` is unchanged, :func:`fuse_blocks` replaces the steps it covers, and anything it
cannot prove block-local stays as it was (Spark and ``grad()`` always get the unfused SQL). The UDF's spec travels as
JSON text in the stash step's SQL.
"""

from __future__ import annotations

import collections
import functools
import inspect
import itertools
import json
import math
import re
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import sqlglot
from sqlglot import exp

from reldl.autodiff import emit
from reldl.autodiff import symbolic as sym
from reldl.autodiff.emit import aliased, col, select, table_as
from reldl.autodiff.grad import Program, Step, ordered, reachable
from reldl.autodiff.ir import Aggregate, Join, Node, Scan, topological
from reldl.autodiff.kernels import (
    Affine,
    BiasAdd,
    Elementwise,
    Matmul,
    SoftmaxXent,
    TileSum,
    _int,
    at,
    numpy_function,
)

MAX_INPUTS = 32  # tile arguments of the fused UDFs (DuckDB Python UDFs have a fixed arity)
SUB_ROWS = 16384  # rows of data tiles the UDF computes at a time (see block_step)

_HANDLES = itertools.count(1)
_TOKENS = itertools.count(1)
# token -> (spec, keyless tiles, upstream gradients): filed by a stash statement, read by the step UDF's calls of the
# statement that reads that stash's TEMP table (the token is per execution, so per connection)
_STASH: dict[int, tuple[dict, list[np.ndarray], list[float]]] = {}
# plan handle -> its latest tokens: up to STASH_KEEP connections may run one plan's statements interleaved, each
# reading its own latest stash (`minimize` fuses a plan per run and releases each step's stash once it is read)
_BY_HANDLE: dict[int, collections.deque] = {}
STASH_KEEP = 8
_STASH_LOCK = threading.Lock()

# ---------------------------------------------------------------------------------------------------------------------
# planning: which part of the graph is block-local


@dataclass
class BlockPlan:
    """The block-local region of a program: what the fused UDF reads, computes and returns."""

    keys: tuple[str, ...]
    inputs: list[Node]  # keyed data scans, then keyless scans (parameters, constants)
    nodes: list[Join]  # the region's joins, inputs before consumers
    outputs: list[Aggregate]  # SUMs over all keys of the region: their values come out, their gradients go in
    params: list[Scan]  # parameters whose whole gradient comes from the region
    spec: str  # JSON for the UDF
    handle: int = field(default_factory=lambda: next(_HANDLES))  # what its stash entries are filed by
    native: dict[int, str] = field(default_factory=dict)  # keyed input index -> its column's DOUBLE[k] type

    @property
    def arity(self) -> int:
        """Tile values the region reads: the inputs, then each output's upstream gradient."""
        return len(self.inputs) + len(self.outputs)

    @property
    def keyed(self) -> list[int]:
        return [i for i, n in enumerate(self.inputs) if n.keys]

    @property
    def keyless(self) -> list[int]:
        return [i for i, n in enumerate(self.inputs) if not n.keys]

    def arg_types(self) -> list[str]:
        """SQL types of the step UDF's tile arguments (the keyed inputs)."""
        return [self.native.get(i, "DOUBLE" if self.inputs[i].shape == () else "DOUBLE[]") for i in self.keyed]

    @property
    def step_function(self) -> str:
        return "reldl_block_step_" + "_".join(_type_code(t) for t in self.arg_types())

    @property
    def stash_arity(self) -> int:
        """Tiles the stash UDF files: the keyless inputs, then each output's upstream gradient."""
        return len(self.keyless) + len(self.outputs)

    @property
    def stash_function(self) -> str:
        return f"reldl_block_stash_{self.stash_arity}"


def _type_code(t: str) -> str:
    """A SQL tile type as a UDF name part: DOUBLE -> d, DOUBLE[] -> l, DOUBLE[256] -> a256."""
    if t == "DOUBLE":
        return "d"
    if t == "DOUBLE[]":
        return "l"
    return "a" + t[len("DOUBLE[") : -1]


def _kernel_spec(k: Any) -> dict | None:
    if isinstance(k, Elementwise):
        if numpy_function(k.template, k.arity) is None:
            return None
        if any(numpy_function(k.partial(i), k.arity) is None for i in range(k.arity)):
            return None
        return {"kind": "elementwise", "sql": k.template.sql("duckdb"), "arity": k.arity}
    tile_kernels = (Affine, Matmul, BiasAdd, SoftmaxXent, TileSum)
    return {"kind": k.name} if type(k) in tile_kernels else None


def _shapes_ok(y: Join, kind: str) -> bool:
    """Whether the numpy executor's reading of each input (keyed tiles: rows stacked on the first axis; keyed
    scalars: one per block; keyless: as is) fits the kernel."""
    shapes, keyed = [p.shape for p in y.parts], [bool(p.keys) for p in y.parts]
    if kind == "elementwise":  # keyless inputs only as scalars (a keyless tile would need the block's rows)
        return all(k or s == () for k, s in zip(keyed, shapes))
    if kind in ("affine", "matmul", "bias_add"):
        return keyed[0] and len(shapes[0]) == 2 and not any(keyed[1:])
    if kind == "softmax_xent":
        return keyed[0] and keyed[1] and len(shapes[0]) == 2
    if kind == "tile_sum":
        return keyed[0]
    return False


def plan(prog: Program) -> BlockPlan | None:
    """The block-local region of ``prog``'s graph, or None where there is none that one pass can compute.

    Region: the joins that depend on a parameter, all keyed by the same keys K, whose inputs are region joins, data
    scans keyed by K, or keyless scans; each consumed only inside the region or by a SUM over all of K (an output).
    A parameter qualifies when the region is its only consumer, and the region is fused only when every output's
    upstream gradient can be computed before the region runs (it reads no forward value of the region)."""
    order = topological([prog.loss])
    wrt = {p.id for p in prog.wrt}
    dep: dict[int, bool] = {}
    for n in order:
        dep[n.id] = n.id in wrt or any(dep[i.id] for i in n.inputs)
    consumers: dict[int, list[Node]] = {n.id: [] for n in order}
    for y in order:
        for x in y.inputs:
            consumers[x.id].append(y)
    joins = [n for n in order if isinstance(n, Join) and dep[n.id] and n.keys]
    if not joins:
        return None
    keys = joins[0].keys
    if any(set(j.keys) != set(keys) for j in joins):
        return None
    region: dict[int, Join] = {}
    kernels: dict[int, dict] = {}
    for y in joins:  # topological: a join's region inputs are already in
        kernels[y.id] = _kernel_spec(y.kernel)
        if y.where is not None or kernels[y.id] is None or not _shapes_ok(y, kernels[y.id]["kind"]):
            return None
        for p in y.parts:
            ok = p.id in region or (isinstance(p, Scan) and (not p.keys or set(p.keys) == set(keys)))
            if not ok:
                return None
        region[y.id] = y
    outputs: list[Aggregate] = []
    for y in region.values():
        for c in consumers[y.id]:
            if c.id in region:
                continue
            if not (isinstance(c, Aggregate) and c.fn == "sum" and not c.keys and c.shape == () and y.shape == ()):
                return None
            if c not in outputs:
                outputs.append(c)
    if not outputs:
        return None
    inputs: list[Node] = []
    for y in region.values():
        for p in y.parts:
            if p.id not in region and p not in inputs:
                inputs.append(p)
    inputs.sort(key=lambda n: not n.keys)  # keyed data first
    params = [p for p in inputs if p.id in wrt]
    if any(any(c.id not in region for c in consumers[p.id]) for p in params) or not params:
        return None
    # the outputs' gradients must not need the region's forward values (e.g. loss = log(sum(...)) would)
    covered = {f"f{n.id}" for n in [*region.values(), *outputs]}
    for o in outputs:
        if f"g{o.id}" not in prog or covered & reachable([f"g{o.id}"], lambda n: _reads(prog.step(n))):
            return None
    nodes = list(region.values())
    spec = {
        "inputs": [{"id": n.id, "keyed": bool(n.keys), "shape": list(n.shape)} for n in inputs],
        "nodes": [
            {
                "id": y.id,
                "parts": [p.id for p in y.parts],
                "need": [dep[p.id] for p in y.parts],  # which inputs' gradients lead to a parameter
                "kernel": kernels[y.id],
            }
            for y in nodes
        ],
        "outputs": [{"id": o.id, "source": o.source.id} for o in outputs],
        "params": [{"id": p.id, "size": math.prod(p.shape)} for p in params],
    }
    bp = BlockPlan(keys, inputs, nodes, outputs, params, json.dumps(spec, separators=(",", ":")))
    if bp.arity > MAX_INPUTS:
        return None
    weakref.finalize(bp, _release, bp.handle)  # a plan run outside minimize (Program.materialize) is released too
    return bp


def _reads(step: Step) -> set[str]:
    """The steps whose tables ``step``'s SQL actually reads (its recorded deps may list more)."""
    seen: set[str] = set()

    def ref(name: str) -> exp.Expression:
        seen.add(name)
        return exp.Table(this=exp.to_identifier(name))

    step.build(ref)
    return seen


# ---------------------------------------------------------------------------------------------------------------------
# the rewrite


def fuse_blocks(prog: Program) -> tuple[Program, BlockPlan | None]:
    """``prog`` with its block-local region (if any) computed by one fused step, and the region's plan; ``(prog,
    None)`` where there is none."""
    bp = plan(prog)
    if bp is None:
        return prog, None
    packed, stash = f"b{prog.loss.id}", f"k{prog.loss.id}"

    # keyed inputs read from one source with the same key columns come from one scan of it (a batch view's index
    # scan once, not once per column and joined back)
    groups: dict[tuple, list[int]] = {}
    for i in bp.keyed:
        n = bp.inputs[i]
        key = (emit._source_tree(n.source).sql("duckdb"), tuple(n.columns.get(k, k) for k in n.keys), n.keys)
        groups.setdefault(key, []).append(i)

    def build_stash(ref) -> exp.Select:
        """One row: a fresh token, after filing the keyless tiles and upstream gradients under it."""
        q, args = None, [exp.Literal.number(bp.handle), exp.Literal.string(bp.spec)]
        tables = [(f"f{bp.inputs[i].id}", bp.inputs[i].shape) for i in bp.keyless]
        tables += [(f"g{o.id}", ()) for o in bp.outputs]
        for j, (name, shape) in enumerate(tables):
            src = table_as(ref(name), f"p{j}")
            q = select().from_(src) if q is None else q.join(src, join_type="cross")
            args.append(_as_list(col("v", f"p{j}"), shape))
        return q.select(aliased(sym.func(bp.stash_function, *args), "v"))

    def build_packed(ref) -> exp.Select:
        q, args, first = None, {}, ""
        for g, members in enumerate(groups.values()):
            alias = f"t{g}"
            n0 = bp.inputs[members[0]]
            cols = [aliased(col(n0.columns.get(k, k), "s"), k) for k in n0.keys]
            vals = [aliased(_arg_value(bp, i), f"v{i}") for i in members]
            src_q = select(*cols, *vals).from_(table_as(emit._source_tree(n0.source), "s"))
            src = exp.Subquery(this=src_q, alias=exp.TableAlias(this=exp.to_identifier(alias)))
            for i in members:
                args[i] = col(f"v{i}", alias)
            if q is None:
                q, first = select().from_(src), alias
            else:
                on = exp.and_(*[exp.EQ(this=col(k, first), expression=col(k, alias)) for k in n0.keys])
                q = q.join(src, on=on, join_type="inner")
        q = q.join(table_as(ref(stash), "k"), join_type="cross")
        call = sym.func(bp.step_function, col("v", "k"), *[args[i] for i in bp.keyed])
        inner = exp.Subquery(this=q.select(aliased(call, "v")), alias=exp.TableAlias(this=exp.to_identifier("c")))
        not_null = exp.Not(this=exp.Is(this=col("v"), expression=exp.Null()))
        agg = exp.Filter(this=exp.Anonymous(this="list", expressions=[col("v")]), expression=exp.Where(this=not_null))
        return select(aliased(sym.func("reldl_tile_sum", agg), "v")).from_(inner)

    new = Program(loss=prog.loss, wrt=prog.wrt, grads=dict(prog.grads))
    replaced: dict[str, Step] = {}
    offset = 1
    for o in bp.outputs:
        replaced[f"f{o.id}"] = Step(f"f{o.id}", _slice(packed, offset, ()), [packed], o, view=True)
        offset += 1
    for p in bp.params:
        replaced[f"g{p.id}"] = Step(f"g{p.id}", _slice(packed, offset, p.shape), [packed], p, gradient=True, view=True)
        offset += math.prod(p.shape)
    fused = [Step(stash, build_stash, [], prog.loss), Step(packed, build_packed, [], prog.loss)]
    steps = fused + [replaced.get(s.name, s) for s in prog.steps]
    # dependencies are what each step's SQL reads (the relational program's recorded deps may list more)
    reads = {s.name: _reads(s) for s in steps}
    # keep what the loss's value and the parameters' gradients need
    want = [f"f{prog.loss.id}", *prog.grads.values()]
    need = reachable(want, reads.__getitem__)
    readers: dict[str, int] = {n: want.count(n) for n in need}
    for n in need:
        for r in reads[n]:
            readers[r] += 1
    for s in steps:
        if s.name in need:
            # one-row steps read once (the loss's scalar tail) are views: a statement saved each training step
            # (not the stash: it must run, as a statement, before the step that reads what it filed)
            view = s.view or (not s.node.keys and readers[s.name] <= 1 and s.name not in (packed, stash))
            new.add(Step(s.name, s.build, sorted(reads[s.name]), s.node, s.gradient, view))
    new.steps = ordered(new.steps)
    return new, bp


def _as_list(v: exp.Expression, shape: tuple[int, ...]) -> exp.Expression:
    return sym.func("list_value", v) if shape == () else v


def _arg_value(bp: BlockPlan, i: int) -> exp.Expression:
    """Keyed input ``i``'s value over its source aliased ``s``: as stored where it is a ``DOUBLE[k]`` array (no
    conversion to a list), else cast to DOUBLE / DOUBLE[]."""
    return emit.scan_raw(bp.inputs[i]) if i in bp.native else emit.scan_value(bp.inputs[i])


def resolve_types(duck: Any, bp: BlockPlan, sources: dict[str, str] | None = None) -> None:
    """Record which keyed inputs are ``DOUBLE[k]`` arrays, to be passed as they are (``sources``: a name the scans
    read, e.g. a batch view that does not exist yet, -> a table with its columns). An input whose type cannot be
    read is cast, as before."""
    bp.native.clear()
    for i in bp.keyed:
        n = bp.inputs[i]
        if n.shape == () or not isinstance(n, Scan):
            continue
        src = emit._source_tree(n.source)
        if sources and isinstance(src, exp.Table) and src.name in sources:
            src = exp.to_table(sources[src.name])
        q = select(aliased(emit.scan_raw(n), "v")).from_(table_as(src, "s")).limit(0)
        try:
            t = duck.execute(f"DESCRIBE {q.sql('duckdb')}").fetchall()[0][1]
        except Exception:  # a source made later: cast, as any non-array tile is
            continue
        if re.fullmatch(r"DOUBLE\[\d+\]", str(t)):
            bp.native[i] = str(t)


def release(bp: BlockPlan) -> None:
    """Forget what the plan's stash steps filed (at the end of a training run; also when the plan is collected)."""
    _release(bp.handle)


def _release(handle: int) -> None:
    with _STASH_LOCK:
        for token in _BY_HANDLE.pop(handle, ()):
            _STASH.pop(token, None)


def _slice(packed: str, start: int, shape: tuple[int, ...]):
    """Elements ``start ..`` (1-based) of the packed row: a scalar, or a tile of ``shape``."""

    def build(ref) -> exp.Select:
        v = col("v")
        if shape == ():
            value = at(v, _int(start))
        else:
            value = sym.func("list_slice", v, _int(start), _int(start + math.prod(shape) - 1))
        return select(aliased(value, "v")).from_(ref(packed))

    return build


# ---------------------------------------------------------------------------------------------------------------------
# the UDF: forward and vector-Jacobian products of the region in numpy


class _Value:
    """A region value in the executor: ``kind`` 'rows' (keyed tiles, rows of all blocks stacked on axis 0, with the
    number of rows per block), 'blocks' (keyed scalars, one per block) or 'const' (keyless, as its tile)."""

    __slots__ = ("a", "kind", "counts")

    def __init__(self, a: np.ndarray, kind: str, counts: np.ndarray | None = None):
        self.a, self.kind, self.counts = a, kind, counts

    @property
    def starts(self) -> np.ndarray:
        """Row offset of each block, and the end: [0, c0, c0 + c1, ...]."""
        out = np.zeros(len(self.counts) + 1, dtype=np.int64)
        np.cumsum(self.counts, out=out[1:])
        return out


@functools.cache
def _compiled_spec(spec: str) -> dict:
    s = json.loads(spec)
    s["keyed"] = [inp for inp in s["inputs"] if inp["keyed"]]
    s["keyless"] = [inp for inp in s["inputs"] if not inp["keyed"]]
    for node in s["nodes"]:
        k = node["kernel"]
        if k["kind"] == "elementwise":
            tree = sqlglot.parse_one(k["sql"], read="duckdb")
            k["fn"] = numpy_function(tree, k["arity"])
            k["partials"] = [
                numpy_function(sym.derivative(tree, Elementwise.placeholder(i)), k["arity"]) for i in range(k["arity"])
            ]
    return s


def _first_list(a: Any) -> tuple[np.ndarray, np.ndarray]:
    """A tile column's values (float64) and offsets: lists, fixed-size arrays, or scalars (one value a row)."""
    if isinstance(a, pa.ChunkedArray):
        a = a.chunk(0) if a.num_chunks == 1 else a.combine_chunks()
    if a.null_count:
        raise ValueError("reldl_block_step: a NULL tile")
    if isinstance(a, pa.FixedSizeListArray):
        values = a.flatten()
        if values.null_count:
            raise ValueError("reldl_block_step: a NULL value in a tile")
        return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64), np.arange(
            len(a) + 1
        ) * a.type.list_size
    if not isinstance(a, (pa.ListArray, pa.LargeListArray)):  # keyed scalars
        return np.asarray(a.to_numpy(zero_copy_only=False), dtype=np.float64), np.arange(len(a) + 1)
    off = np.asarray(a.offsets, dtype=np.int64)
    return np.asarray(a.values.to_numpy(zero_copy_only=False), dtype=np.float64), off


def _broadcast(v: _Value, like: _Value) -> np.ndarray:
    """``v`` against a 'rows' value: keyed scalars repeated over each block's rows (and the tile's other axes)."""
    if v.kind == "blocks" and like.kind == "rows":
        rep = np.repeat(v.a, like.counts)
        return rep.reshape(rep.shape + (1,) * (like.a.ndim - 1))
    return v.a


def _reduce(g: np.ndarray, to: _Value, frm: _Value) -> np.ndarray:
    """A gradient computed at ``frm``'s layout summed back to ``to``'s (broadcasts undone)."""
    if to.kind == frm.kind and np.shape(g) == np.shape(to.a):
        return g
    g = np.broadcast_to(g, np.shape(frm.a)) if np.shape(g) != np.shape(frm.a) else g
    if to.kind == "const":
        return np.asarray(g.sum()).reshape(np.shape(to.a))
    if to.kind == "blocks" and frm.kind == "rows":
        per_row = g.reshape(len(g), -1).sum(axis=1)
        return np.add.reduceat(per_row, _starts(frm.counts))
    return g


def _starts(counts: np.ndarray) -> np.ndarray:
    starts = np.zeros(len(counts), dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    return starts


def block_stash(handle: Any, spec_text: Any, *arrays: Any) -> pa.Array:
    """The stash UDF: file the region's keyless tiles and its outputs' upstream gradients (one row) under a fresh
    token for the step UDF's calls that follow; returns the token (the plan ``handle`` keeps its latest few)."""
    handle, spec_text = _first(handle), _first(spec_text)
    if handle is None or spec_text is None:
        raise ValueError("reldl_block_stash: a NULL handle or spec")
    spec = _compiled_spec(spec_text)
    keyless = spec["keyless"]
    if len(arrays) != len(keyless) + len(spec["outputs"]):
        raise ValueError(f"reldl_block_stash: {len(arrays)} tiles for a spec of {len(keyless) + len(spec['outputs'])}")
    consts = []
    for inp, arr in zip(keyless, arrays):
        values, off = _first_list(arr)
        shape = tuple(inp["shape"])
        tile = values[off[0] : off[1]]
        if tile.size != max(math.prod(shape), 1):
            raise ValueError(f"reldl_block_step: a keyless tile of {tile.size} values, expected shape {shape}")
        consts.append(tile.reshape(shape).copy())
    upstream = []
    for g in arrays[len(keyless) :]:
        gv, goff = _first_list(g)
        upstream.append(float(gv[goff[0]]))
    token = next(_TOKENS)
    with _STASH_LOCK:
        _STASH[token] = (spec, consts, upstream)
        kept = _BY_HANDLE.setdefault(int(handle), collections.deque())
        kept.append(token)
        while len(kept) > STASH_KEEP:
            _STASH.pop(kept.popleft(), None)
    n = len(arrays[0]) if arrays else 1
    return pa.array(np.full(n, token, dtype=np.int64))


def _first(a: Any) -> Any:
    if isinstance(a, pa.ChunkedArray):
        a = a.combine_chunks()
    return a[0].as_py() if len(a) else None


def block_step(token: Any, *arrays: Any) -> pa.Array:
    """The step UDF: one chunk of keyed tiles in, the chunk's outputs and parameter gradients (summed over its rows)
    out on its first row, NULL on the others (the caller sums the non-NULL rows)."""
    n_rows = len(token)
    t = _first(token)
    with _STASH_LOCK:
        entry = _STASH.get(int(t)) if t is not None else None
    if entry is None:
        raise ValueError("reldl_block_step: nothing stashed for this step (its stash statement runs first)")
    spec, consts, upstream = entry
    vals: dict[int, _Value] = {inp["id"]: _Value(tile, "const") for inp, tile in zip(spec["keyless"], consts)}
    for inp, arr in zip(spec["keyed"], arrays):
        values, off = _first_list(arr)
        shape = tuple(inp["shape"])
        if shape == ():
            vals[inp["id"]] = _Value(values[off[0] : off[-1]], "blocks")
        else:
            width = math.prod(shape[1:])
            lengths = np.diff(off)
            if np.any(lengths % width) or np.any(lengths == 0):
                raise ValueError(f"reldl_block_step: a tile's length is not a positive multiple of {width}")
            a = values[off[0] : off[-1]].reshape((-1, *shape[1:]))
            vals[inp["id"]] = _Value(a, "rows", lengths // width)
    # blocks a group at a time (about SUB_ROWS rows): bounds the UDF's working memory (a chunk of 2,048 blocks of
    # 1,024 rows would otherwise hold 2M rows of every intermediate); the gradient is a sum over blocks, so the
    # groups' gradients add up. Smaller groups (1-8k rows, to stay in cache) measured no faster in training
    widest = max((int(v.counts.max()) for v in vals.values() if v.kind == "rows" and len(v.counts)), default=1)
    per_group = max(1, SUB_ROWS // max(widest, 1))
    packed = np.zeros(len(spec["outputs"]))
    totals: dict[int, np.ndarray] = {}
    params = {p["id"] for p in spec["params"]}
    with np.errstate(all="ignore"):
        for b0 in range(0, n_rows, per_group):
            gvals = {i: _blocks(v, b0, b0 + per_group) for i, v in vals.items()}
            saved: dict[int, Any] = {}
            for node in spec["nodes"]:
                gvals[node["id"]] = _forward(node, [gvals[i] for i in node["parts"]], saved)
            grads: dict[int, Any] = {}
            for j, (out, gv) in enumerate(zip(spec["outputs"], upstream)):
                src = gvals[out["source"]]
                packed[j] += src.a.sum()
                grads[out["source"]] = grads.get(out["source"], 0.0) + np.full(len(src.a), gv)
            for node in reversed(spec["nodes"]):
                if node["id"] in grads:
                    parts = [gvals[i] for i in node["parts"]]
                    _backward(node, parts, gvals[node["id"]], grads.pop(node["id"]), saved, grads)
            for pid in params & grads.keys():
                totals[pid] = grads[pid] if pid not in totals else totals[pid] + grads[pid]
    pieces = [packed]
    for p in spec["params"]:
        g = totals.get(p["id"])
        pieces.append(np.zeros(p["size"]) if g is None else np.asarray(g, dtype=np.float64).reshape(-1))
    flat = np.concatenate(pieces)
    offsets = np.full(n_rows + 1, len(flat), dtype=np.int32)
    offsets[0] = 0
    mask = np.ones(n_rows, dtype=bool)
    mask[0] = False
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat), mask=pa.array(mask))


def _blocks(v: _Value, b0: int, b1: int) -> _Value:
    """Blocks ``b0 .. b1 - 1`` of a value (views, no copies); keyless values as they are."""
    if v.kind == "const":
        return v
    if v.kind == "blocks":
        return _Value(v.a[b0:b1], "blocks")
    starts = v.starts
    return _Value(v.a[starts[b0] : starts[min(b1, len(v.counts))]], "rows", v.counts[b0:b1])


def _forward(node: dict, parts: list[_Value], saved: dict) -> _Value:
    k = node["kernel"]
    kind = k["kind"]
    if kind == "elementwise":
        lead = next((p for p in parts if p.kind == "rows"), None) or next(p for p in parts if p.kind == "blocks")
        out = k["fn"](*[_broadcast(p, lead) for p in parts])
        return _Value(np.asarray(out, dtype=np.float64), lead.kind, lead.counts)
    a = parts[0]
    if kind in ("affine", "matmul"):
        out = a.a @ parts[1].a
        if kind == "affine":
            out += parts[2].a
        return _Value(out, "rows", a.counts)
    if kind == "bias_add":
        return _Value(a.a + parts[1].a, "rows", a.counts)
    if kind == "softmax_xent":
        z, y = a.a, parts[1].a.astype(np.int64)
        zmax = z.max(axis=1, keepdims=True)
        e = np.exp(z - zmax)
        s = e.sum(axis=1, keepdims=True)
        rows = np.arange(len(z))
        saved[node["id"]] = (e / s, y)
        return _Value(np.log(s[:, 0]) + zmax[:, 0] - z[rows, y], "rows", a.counts)
    if kind == "tile_sum":
        per_row = a.a.reshape(len(a.a), -1).sum(axis=1)
        return _Value(np.add.reduceat(per_row, _starts(a.counts)), "blocks")
    raise ValueError(f"reldl_block_step: unknown kernel {kind!r}")


def _times(d: Any, g: np.ndarray, args: list) -> Any:
    """``d * g``, in place when ``d`` is a fresh array of g's shape (saves an allocation and a pass per call)."""
    fresh = isinstance(d, np.ndarray) and d.flags.writeable and d.dtype == np.float64 and d.shape == np.shape(g)
    if fresh and not any(np.may_share_memory(d, a) for a in (*args, g) if isinstance(a, np.ndarray)):
        d *= g
        return d
    return d * g


def _backward(node: dict, parts: list[_Value], out: _Value, g: np.ndarray, saved: dict, grads: dict) -> None:
    k = node["kernel"]
    kind = k["kind"]

    need = node["need"]

    def add(i: int, value: np.ndarray) -> None:
        pid = node["parts"][i]
        grads[pid] = value if pid not in grads else grads[pid] + value

    if kind == "elementwise":
        args = [_broadcast(p, out) for p in parts]
        for i, p in enumerate(parts):
            if need[i]:
                add(i, _reduce(_times(k["partials"][i](*args), g, args), p, out))
        return
    a = parts[0]
    if kind in ("affine", "matmul"):
        w = parts[1].a
        if need[0]:
            add(0, g @ w.T)
        if need[1]:
            add(1, a.a.T @ g)
        if kind == "affine" and need[2]:
            add(2, g.sum(axis=0))
        return
    if kind == "bias_add":
        if need[0]:
            add(0, g)
        if need[1]:
            add(1, g.sum(axis=0))
        return
    if kind == "softmax_xent":
        probs, y = saved.pop(node["id"])
        if need[0]:
            probs[np.arange(len(y)), y] -= 1.0
            probs *= g[:, None]
            add(0, probs)
        return
    if kind == "tile_sum":
        if need[0]:
            rep = np.repeat(g, a.counts)
            add(0, np.broadcast_to(rep.reshape(rep.shape + (1,) * (a.a.ndim - 1)), a.a.shape))
        return
    raise ValueError(f"reldl_block_step: unknown kernel {kind!r}")


def install(duck: Any, bp: BlockPlan) -> None:
    """Register the plan's stash and step UDFs on the connection (each name once: it encodes the signature)."""
    like = "SELECT function_name FROM duckdb_functions() WHERE function_name LIKE 'reldl\\_block\\_%' ESCAPE '\\'"
    present = {r[0] for r in duck.execute(like).fetchall()}
    n_stash = bp.stash_arity
    if bp.stash_function not in present:
        duck.create_function(
            bp.stash_function,
            _with_arity(block_stash, n_stash + 2),
            ["BIGINT", "VARCHAR", *["DOUBLE[]"] * n_stash],
            "BIGINT",
            type="arrow",
            null_handling="special",
            side_effects=True,
        )
    if bp.step_function not in present:
        types = bp.arg_types()
        duck.create_function(
            bp.step_function,
            _with_arity(block_step, len(types) + 1),
            ["BIGINT", *types],
            "DOUBLE[]",
            type="arrow",
            null_handling="special",
        )


def _with_arity(fn: Any, n: int) -> Any:
    """``fn`` taking exactly ``n`` arguments (DuckDB checks a UDF's arity against its signature)."""

    def udf(*args: Any) -> pa.Array:
        return fn(*args)

    names = [f"a{i}" for i in range(n)]
    udf.__signature__ = inspect.Signature([inspect.Parameter(a, inspect.Parameter.POSITIONAL_ONLY) for a in names])
    return udf
