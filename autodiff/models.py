"""Model types trained by ``CREATE MODEL name OPTIONS (model_type = ...) AS SELECT ...``: IR graphs over tile tables.

The SELECT's rows become tables in the ``reldl`` schema named ``m_<model>_<spec>__*`` (``<spec>``: a hash of the
options and query, another when the registered model already uses that one, so a CREATE OR REPLACE that fails leaves
the previous model's tables alone):

* ``linear_reg``, ``logistic_reg``, ``mlp``: every column but ``label`` is a numeric feature. Rows become one tile
  a row, ``__data(rb, r, x DOUBLE[features], y DOUBLE[1])`` stored in row order (``r``: the SELECT's order, or with
  ``shuffle`` a seeded random order fixed when the table is made), ``rb = r // tile_rows``
  the shuffle unit (default ``tile_rows = batch_size``, which must be a multiple of it): a batch of one ``rb`` is
  read with one range predicate over that part of the table, the layout block fusion trains fastest on
  (:mod:`reldl.autodiff.blockfuse`); with smaller ``tile_rows`` a batch is ``batch_size / tile_rows`` shuffled
  blocks, read through an index on ``rb``. Weights ``__w<i>(v DOUBLE[] (in x out))`` and
  biases ``__b<i>(v DOUBLE[])``. Loss: mean squared error (regression), binary cross-entropy on logits (binary),
  softmax cross-entropy (multiclass), each the mean over the batch's rows, as torch's ``MSELoss``,
  ``BCEWithLogitsLoss``, ``CrossEntropyLoss``. The task: ``linear_reg`` regression; ``logistic_reg`` binary when the
  labels are 0/1, else multiclass over classes ``0..max(label)``; ``mlp`` from ``task`` or the label's type (integer
  or boolean: classification, else regression). The trained weights are exported (float32) to a tabular checkpoint
  (``path``: missing or an empty directory, checked before training; default ``<database>.models/<name>``, another
  name when that holds files, or a temporary directory for in-memory databases) and the model is registered with
  that path, so ``predict()`` / ``predict_proba()`` and all three planner plans work on it.
* ``matrix_factorization``: rows ``(user, item, rating)`` (column names: options ``user``, ``item``, ``label``).
  Users and items get dense ids; embeddings ``__users(u, v DOUBLE[k])`` and ``__items(i, v DOUBLE[k])``; the loss is
  the mean of ``(p_u . q_i - rating)^2`` over the observed entries of the batch only (the sparse mask: the join with
  the ratings relation) plus ``l2 * (sum p^2 + sum q^2)``. Predictions are SQL over the embedding tables
  (:func:`mf_predict_sql`).
* ``gcn``: a 2-layer graph convolutional network (Kipf & Welling): ``OPTIONS (model_type = 'gcn', edges = 'table',
  node = 'node', edge_source = 'src', edge_target = 'dst', label = 'label', hidden_units = [16]) AS SELECT node,
  features..., label``. Edges are read as undirected, self-loops are added, and ``A = D^-1/2 (A + I) D^-1/2`` is the
  table ``__adj(i, j, a)``. ``Z = A relu(A X W1 + b1) W2 + b2`` on per-node tiles; the loss is softmax cross-entropy
  averaged over the nodes whose label is not NULL (the others are unlabeled, transductive). Full batch.

Initialisation (deterministic, numpy PCG64 seeded by ``seed``): linear and logistic regression start at zero; MLP and
GCN weights and biases are uniform in ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]`` (torch.nn.Linear's bounds), drawn per
tensor in order ``w0, b0, w1, b1, ...`` from one generator; matrix factorization embeddings are normal with standard
deviation ``init_scale`` (default 0.1), users then items.

Failures leave the database as it was: a SELECT without rows (or with NULLs, bad labels, a model too large) fails
while the tables are prepared, in one transaction with the bookkeeping tables; training that diverges (a NaN or
infinite loss or parameter) is undone (:func:`_discard`). The parameters (DOUBLE) may take at most
``MAX_PARAMETER_BYTES`` and an eighth of memory (:func:`parameter_limit`), checked before anything is allocated. Only
an interrupted run keeps its tables, to resume.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import sqlglot
from sqlglot import exp

from reldl import catalog, paths
from reldl.autodiff import builder as ad
from reldl.autodiff import symbolic as sym
from reldl.autodiff import train
from reldl.autodiff.emit import aliased, col, select
from reldl.autodiff.ir import AutodiffError, Node, Shape
from reldl.autodiff.kernels import Kernel, transform
from reldl.errors import DataError, ProgrammingError

MODEL_TYPES = ("linear_reg", "logistic_reg", "mlp", "matrix_factorization", "gcn")
TABULAR = ("linear_reg", "logistic_reg", "mlp")
ACTIVATIONS = ("relu", "tanh", "sigmoid")

COMMON = {
    "model_type": None,
    "label": "label",
    "optimizer": "adam",
    "learning_rate": 0.01,
    "epochs": 10,
    "batch_size": 1024,
    "seed": 0,
    "shuffle": True,
    "momentum": 0.9,
    "beta1": 0.9,
    "beta2": 0.999,
    "eps": 1e-8,
    "weight_decay": 0.0,
    "plot": None,  # a PNG path: the loss curve is drawn there after training (needs matplotlib)
}
PER_TYPE: dict[str, dict[str, Any]] = {
    "linear_reg": {"tile_rows": None, "path": None},
    "logistic_reg": {"tile_rows": None, "path": None},
    "mlp": {"tile_rows": None, "path": None, "hidden_units": [64], "activation": "relu", "task": None},
    "matrix_factorization": {"user": "user", "item": "item", "num_factors": 8, "l2": 0.0, "init_scale": 0.1},
    "gcn": {
        "edges": None,
        "node": "node",
        "edge_source": "src",
        "edge_target": "dst",
        "hidden_units": [16],
        "activation": "relu",
    },
}
_NUMERIC = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "FLOAT", "DOUBLE", "DECIMAL", "BOOLEAN")
_INTEGRAL = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "BOOLEAN")

after_step = None  # tests: a callable(epoch, step, loss) run after every update (e.g. to kill the process)


class ModelError(ProgrammingError):
    """A CREATE MODEL ... AS SELECT that cannot train as written (one line, naming the model)."""


# ---------------------------------------------------------------------------------------------------------------------
# options


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options with defaults filled in, or a one-line ModelError naming the first problem."""

    def bad(msg: str) -> ModelError:
        return ModelError(f"CREATE MODEL {name}: {msg}")

    kind = options.get("model_type")
    if kind not in MODEL_TYPES:
        raise bad(f"model_type {kind!r} cannot be trained with AS SELECT (use {', '.join(MODEL_TYPES)})")
    allowed = {**COMMON, **PER_TYPE[kind]}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise bad(
            f"unknown option(s) {', '.join(unknown)} for model_type {kind!r} (options: {', '.join(sorted(allowed))})"
        )
    o = {**allowed, **{k: v for k, v in options.items() if v is not None}}
    if kind == "gcn" and not o["batch_size"] == COMMON["batch_size"] and "batch_size" in options:
        raise bad("a gcn trains on the whole graph: batch_size does not apply")
    for key in (
        "label",
        "user",
        "item",
        "node",
        "edge_source",
        "edge_target",
        "edges",
        "optimizer",
        "activation",
        "plot",
    ):
        if key in o and o[key] is not None and (not isinstance(o[key], str) or not o[key]):
            raise bad(f"option {key!r} must be a name, got {o[key]!r}")
    for key in ("epochs", "batch_size", "seed", "num_factors", "tile_rows"):
        if (
            key in o
            and o[key] is not None
            and (not _is_int(o[key]) or o[key] < (0 if key in ("epochs", "seed") else 1))
        ):
            raise bad(
                f"option {key!r} must be a {'non-negative' if key in ('epochs', 'seed') else 'positive'} integer, "
                f"got {o[key]!r}"
            )
    for key in ("learning_rate", "momentum", "beta1", "beta2", "eps", "weight_decay", "l2", "init_scale"):
        if key in o and (isinstance(o[key], bool) or not isinstance(o[key], (int, float))):
            raise bad(f"option {key!r} must be a number, got {o[key]!r}")
    if not isinstance(o["shuffle"], bool):
        raise bad(f"option 'shuffle' must be true or false, got {o['shuffle']!r}")
    if o["optimizer"] not in train.OPTIMIZERS:
        raise bad(f"optimizer {o['optimizer']!r} is not supported (use {', '.join(train.OPTIMIZERS)})")
    if "hidden_units" in o:
        h = o["hidden_units"]
        if _is_int(h):
            h = o["hidden_units"] = [h]
        if not isinstance(h, list) or not all(_is_int(u) and u >= 1 for u in h):
            raise bad(f"hidden_units must be a list of positive integers, got {h!r}")
        if kind == "gcn" and len(h) != 1:
            raise bad("a gcn has two layers: hidden_units must have one entry")
    if "activation" in o and o["activation"] not in ACTIVATIONS:
        raise bad(f"activation {o['activation']!r} is not supported (use {', '.join(ACTIVATIONS)})")
    if kind == "mlp" and o["task"] not in (None, "regression", "binary", "multiclass"):
        raise bad(f"task {o['task']!r} is not supported (use regression, binary or multiclass)")
    if kind == "gcn" and not o["edges"]:
        raise bad("a gcn needs OPTIONS (edges = 'table') naming the edge table")
    if kind in TABULAR:
        t = o["tile_rows"] or o["batch_size"]
        if o["batch_size"] % t:
            raise bad(f"batch_size ({o['batch_size']}) must be a multiple of tile_rows ({t})")
        o["tile_rows"] = t
        if o["path"] is not None and (not isinstance(o["path"], str) or not o["path"]):
            raise bad("option 'path' must be a directory name")
        if o["path"] is not None:  # missing or an empty directory (catalog.model_dir's rule): nothing is overwritten
            paths.new_dir(f"CREATE MODEL {name}: path", o["path"])
    if o["plot"] is not None:
        train.check_plot(f"CREATE MODEL {name}: plot", o["plot"])
    try:
        train.Optimizer(
            o["optimizer"], o["learning_rate"], o["momentum"], o["beta1"], o["beta2"], o["eps"], o["weight_decay"]
        )
    except AutodiffError as e:
        raise bad(str(e)) from None
    return o


# ---------------------------------------------------------------------------------------------------------------------
# SQL helpers


def _t(schema: str, name: str) -> exp.Table:
    return exp.Table(this=exp.to_identifier(name, quoted=True), db=exp.to_identifier(schema))


def _c(name: str, table: str | None = None) -> exp.Column:
    return exp.column(exp.to_identifier(name, quoted=True), table=exp.to_identifier(table) if table else None)


def _run(duck: Any, q: exp.Expression | str, params: Sequence[Any] | None = None) -> Any:
    import duckdb

    sql = q if isinstance(q, str) else q.sql("duckdb")
    try:
        return duck.execute(sql, params) if params is not None else duck.execute(sql)
    except duckdb.Error as e:
        from reldl.errors import translate

        raise translate(e) from None


def _ctas(target: exp.Table, q: exp.Expression, temp: bool = False) -> exp.Create:
    props = exp.Properties(expressions=[exp.TemporaryProperty()]) if temp else None
    return exp.Create(this=target, kind="TABLE", expression=q, replace=True, properties=props)


def _put(duck: Any, target: exp.Table, table: pa.Table) -> None:
    """CREATE OR REPLACE ``target`` from an Arrow table."""
    view = "__reldl_models_put"
    duck.register(view, table)
    try:
        _run(duck, _ctas(target, select(exp.Star()).from_(exp.Table(this=exp.to_identifier(view)))))
    finally:
        duck.unregister(view)


def _index_rb(duck: Any, table: exp.Table) -> None:
    """An index on the row-block key, so each mini-batch reads only its own rows (see train.Batches)."""
    rb = exp.Ordered(this=exp.column("rb"), nulls_first=False)
    index = exp.Index(
        this=exp.to_identifier(f"{table.name}_rb_idx"), table=table.copy(), params=exp.IndexParameters(columns=[rb])
    )
    _run(duck, exp.Create(this=index, kind="INDEX"))


def _columns(duck: Any, query: exp.Query) -> list[tuple[str, str]]:
    """(name, DuckDB type) of the SELECT's columns, without running it."""
    q = select(exp.Star()).from_(exp.Subquery(this=query.copy(), alias=exp.TableAlias(this=exp.to_identifier("q"))))
    cur = _run(duck, q.limit(0))
    return [(d[0], str(d[1])) for d in cur.description]


def _numeric(t: str) -> bool:
    return t.split("(")[0] in _NUMERIC


MAX_ARRAY = 100_000  # DuckDB's largest fixed-size ARRAY
# the version of the training tables' layout: part of a job's spec, so an interrupted run written by an earlier
# layout (tabular: 1024-row DOUBLE[] tiles, before 2026-11-27) is started over, not resumed on tables it cannot read
LAYOUT = 2


def _dbl(e: exp.Expression) -> exp.Expression:
    return exp.Cast(this=e, to=exp.DataType.build("DOUBLE"))


# ---------------------------------------------------------------------------------------------------------------------
# model size: the largest model trained in the database

# its parameters as DOUBLE (how they are stored and computed) may take at most this and an eighth of the machine's
# memory, since training holds several copies of them (working copies, gradients, optimizer moments, the update):
# 134M parameters at most. Checked before anything is allocated, so hidden_units = [100000000] is one line, not
# gigabytes of tables and a machine out of memory
MAX_PARAMETER_BYTES = 1 << 30


def parameter_limit() -> int:
    """Bytes the DOUBLE parameters of a model trained in the database may take (see MAX_PARAMETER_BYTES)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # no sysconf: the fixed cap alone
        return MAX_PARAMETER_BYTES
    return min(MAX_PARAMETER_BYTES, memory // 8)


def _layered(dims: Sequence[int]) -> int:
    """Weights and biases of dense layers of widths ``dims`` (inputs first)."""
    return sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def _check_parameters(name: str, count: int, asked: str, fix: str, at_least: bool = False) -> None:
    """A one-line ModelError when ``count`` DOUBLE parameters exceed :func:`parameter_limit`; ``asked`` says what
    made them (the options, the data's sizes), ``fix`` what to change."""
    limit = parameter_limit()
    if count * 8 <= limit:
        return
    raise ModelError(
        f"CREATE MODEL {name}: {asked} needs {'at least ' if at_least else ''}{count:,} parameters "
        f"({_size(count * 8)} as DOUBLE), over the limit of {limit // 8:,} parameters ({_size(limit)}: training keeps "
        f"several copies of them); {fix}"
    )


def _layers_asked(kind: str, hidden: Sequence[int], features: int, classes: int | None) -> tuple[str, str]:
    """(what sized a layered model's parameters, what to change) for _check_parameters' message."""
    asked = (f"hidden_units = {list(hidden)} with " if hidden else "") + f"{features:,} features"
    fix = "reduce hidden_units" if kind in ("mlp", "gcn") else "use fewer features"
    if classes is not None:
        asked += f" and {classes:,} classes"
        fix += " or classes (a label's classes are 0 .. its largest value)"
    return asked, fix


def _check_size_before_data(name: str, opts: dict[str, Any], info: dict[str, Any]) -> None:
    """The model-size cap with the least the data can add (one output, one user and item), before anything is
    written; the prepare functions check it again with the data's classes, users and items."""
    kind = opts["model_type"]
    if kind == "matrix_factorization":
        k = opts["num_factors"]
        _check_parameters(name, 2 * k, f"num_factors = {k}", "reduce num_factors", at_least=True)
        return
    hidden = opts["hidden_units"] if kind in ("mlp", "gcn") else []
    features = len(info["features"])
    asked, fix = _layers_asked(kind, hidden, features, None)
    _check_parameters(name, _layered([features, *hidden, 1]), asked, fix, at_least=True)


# ---------------------------------------------------------------------------------------------------------------------
# custom kernel: matrix factorization's squared error on observed entries


class DotError(Kernel):
    """``(p . q - r)^2`` for embeddings ``p``, ``q`` (k,) and an observed rating ``r`` (scalar)."""

    name = "dot_error"

    def out_shape(self, shapes: Sequence[Shape]) -> Shape:
        if len(shapes) != 3 or len(shapes[0]) != 1 or shapes[0] != shapes[1] or shapes[2] != ():
            raise AutodiffError(f"dot_error needs vectors (k,), (k,) and a scalar, got {list(shapes)}")
        return ()

    def _residual(self, args: Sequence[exp.Expression]) -> exp.Expression:
        return sym.sub(sym.func("list_dot_product", args[0], args[1]), args[2])

    def forward(self, args, shapes):
        r = self._residual(args)
        return sym.mul(r, r.copy())

    def differentiable(self, i: int) -> bool:
        return i < 2

    def vjp(self, i, args, grad, shapes):
        if i == 2:
            raise AutodiffError("dot_error has no gradient with respect to the rating")
        scale = sym.mul(sym.mul(sym.num(2.0), self._residual(args)), grad)
        return transform(args[1 - i], sym.mul(col("__x"), scale), with_index=False)


# ---------------------------------------------------------------------------------------------------------------------
# the job


@dataclass
class Job:
    """One CREATE MODEL ... AS SELECT: names, prepared tables and the loss graph."""

    name: str
    options: dict[str, Any]
    query: exp.Query
    spec: str
    base: str  # table name prefix in schema reldl
    tables: dict[str, str] = field(default_factory=dict)  # role -> table name (schema reldl)
    info: dict[str, Any] = field(default_factory=dict)  # task, classes, features, ...

    def table(self, role: str) -> exp.Table:
        return _t("reldl", self.tables[role])

    def add(self, role: str) -> exp.Table:
        self.tables[role] = f"{self.base}__{role}"
        return self.table(role)

    @property
    def run(self) -> str:
        return f"model:{self.name.lower()}"

    @property
    def view(self) -> str:
        return f"__reldl_batch_{self.spec}"


def make_job(duck: Any, name: str, options: dict[str, Any], query_sql: str) -> Job:
    """Validate options and the SELECT (columns, types) without writing anything."""
    opts = check_options(name, options)
    try:
        query = sqlglot.parse_one(query_sql, read="duckdb")
    except sqlglot.errors.ParseError as e:
        raise ModelError(f"CREATE MODEL {name}: cannot parse the SELECT ({str(e).splitlines()[0]})") from None
    if not isinstance(query, exp.Query):
        raise ModelError(f"CREATE MODEL {name}: AS must be followed by a SELECT")
    cols = _columns(duck, query)
    names = [c for c, _ in cols]
    if len(set(n.lower() for n in names)) != len(names):
        raise ModelError(f"CREATE MODEL {name}: the SELECT has duplicate column names ({', '.join(names)})")
    types = dict(cols)
    kind = opts["model_type"]

    def need(col_name: str, what: str) -> None:
        if col_name not in types:
            raise ModelError(
                f"CREATE MODEL {name}: {what} column {col_name!r} is not in the SELECT's columns ({', '.join(names)})"
            )

    need(opts["label"], "label")
    if not _numeric(types[opts["label"]]):
        raise ModelError(
            f"CREATE MODEL {name}: label column {opts['label']!r} has type {types[opts['label']]}; it must be numeric"
        )
    info: dict[str, Any] = {}
    if kind == "matrix_factorization":
        need(opts["user"], "user")
        need(opts["item"], "item")
        extra = [c for c in names if c not in (opts["user"], opts["item"], opts["label"])]
        if extra:
            raise ModelError(
                f"CREATE MODEL {name}: matrix_factorization takes (user, item, rating) columns; "
                f"also got {', '.join(extra)}"
            )
    else:
        ignore = {opts["label"]} | ({opts["node"]} if kind == "gcn" else set())
        if kind == "gcn":
            need(opts["node"], "node")
        features = [c for c in names if c not in ignore]
        if not features:
            raise ModelError(f"CREATE MODEL {name}: the SELECT has no feature columns besides the label")
        for f in features:
            if not _numeric(types[f]):
                raise ModelError(
                    f"CREATE MODEL {name}: feature column {f!r} has type {types[f]}; features must be numeric"
                )
        info["features"] = features
    info["label_integral"] = types[opts["label"]].split("(")[0] in _INTEGRAL
    _check_size_before_data(name, opts, info)
    trained = {k: v for k, v in opts.items() if k != "plot"}  # where the curve is drawn does not change the model
    spec_text = json.dumps(
        {"options": trained, "query": query.sql("duckdb"), "layout": LAYOUT}, sort_keys=True, default=str
    )
    spec = hashlib.sha256(spec_text.encode()).hexdigest()[:10]
    safe = "".join(ch if ch.isalnum() else "_" for ch in name.lower())
    if _registered_on(duck, name, f"m_{safe}_{spec}"):
        spec = hashlib.sha256(f"{spec}:again".encode()).hexdigest()[:10]
    return Job(name, opts, query, spec, f"m_{safe}_{spec}", info=info)


def _registered_on(duck: Any, name: str, base: str) -> bool:
    """Whether the registered model ``name`` keeps its tables under ``base``: the same statement run again (after its
    data changed, say) then trains under the other of two specs, so a run that fails or is interrupted never writes
    over, or drops, the tables of the model it would replace."""
    rec = catalog.get_model(duck, name)
    tables = ((rec.options or {}).get("tables") or {}) if rec is not None else {}
    return any(t.split(".", 1)[-1].lower().startswith(f"{base}__") for t in tables.values())


# ---------------------------------------------------------------------------------------------------------------------
# data preparation and parameters (one transaction; see prepare)


def _no_nulls(duck: Any, job: Job, table: exp.Table, columns: list[str]) -> None:
    checks = [
        aliased(exp.Sum(this=exp.cast(exp.Is(this=_c(c), expression=exp.Null()), "INT")), f"n{i}")
        for i, c in enumerate(columns)
    ]
    row = _run(duck, select(*checks).from_(table.copy())).fetchall()[0]
    for c, n in zip(columns, row):
        if n:
            raise DataError(
                f"CREATE MODEL {job.name}: column {c!r} has {n} NULL value(s); filter them out in the SELECT"
            )


def _name_nulls(duck: Any, job: Job, data: exp.Table, feats: list[str], label: str) -> None:
    """Raise a DataError naming the first column (the label, then the features) with NULL values in ``data``."""
    values = [("y", 1, label)] + [("x", i + 1, f) for i, f in enumerate(feats)]
    checks = [
        aliased(
            exp.Sum(
                this=exp.cast(
                    exp.Is(
                        this=exp.Bracket(this=col(c), expressions=[exp.Literal.number(i)], offset=1),
                        expression=exp.Null(),
                    ),
                    "INT",
                )
            ),
            f"n{j}",
        )
        for j, (c, i, _) in enumerate(values)
    ]
    row = _run(duck, select(*checks).from_(data.copy())).fetchall()[0]
    for (_, _, name), n in zip(values, row):
        if n:
            raise DataError(
                f"CREATE MODEL {job.name}: column {name!r} has {n} NULL value(s); filter them out in the SELECT"
            )


def _uniform(rng: np.random.Generator, fan_in: int, shape: tuple[int, ...]) -> np.ndarray:
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape)


def _one(v: np.ndarray) -> pa.Table:
    return pa.table({"v": pa.array([np.asarray(v, np.float64).ravel().tolist()], pa.list_(pa.float64()))})


def _prepare_tabular(duck: Any, job: Job) -> None:
    o, info = job.options, job.info
    feats, label = info["features"], o["label"]
    t = o["tile_rows"]
    # one row a tuple, stored in row order, built in one pass over the SELECT: x a fixed-size array (a list past
    # DuckDB's array limit), y one value; rb = r // tile_rows is the batch key. With shuffle on, the rows are put in a
    # random order (a seeded hash of each row) once here, so a batch is a random sample even of a sorted SELECT;
    # each epoch then shuffles the order of the batches
    # the SELECT's own column names stay inside the innermost query (whatever they are: __row, x, y, ...): x and y
    # are built there, and only x, y and the generated row numbers go further out
    xtype = f"DOUBLE[{len(feats)}]" if len(feats) <= MAX_ARRAY else "DOUBLE[]"
    x = exp.Cast(this=exp.Array(expressions=[_dbl(_c(f, "q")) for f in feats]), to=exp.DataType.build(xtype))
    y = exp.Cast(this=exp.Array(expressions=[_dbl(_c(label, "q"))]), to=exp.DataType.build("DOUBLE[1]"))
    source = exp.Subquery(this=job.query.copy(), alias=exp.TableAlias(this=exp.to_identifier("q")))
    query = select(aliased(x, "x"), aliased(y, "y")).from_(source).subquery("v")
    order = None
    if o["shuffle"]:  # by the rows' contents (ties: equal rows), so a SELECT whose row order varies (a join, a
        # parallel GROUP BY) still gives the same table for the same seed
        seed = exp.Literal.number(int(o["seed"]))
        order = exp.Order(
            expressions=[sym.func("hash", col("x", "v"), col("y", "v"), seed), col("x", "v"), col("y", "v")]
        )
    row_number = exp.Window(this=exp.RowNumber(), order=order)
    numbered = select(
        aliased(exp.Sub(this=row_number, expression=exp.Literal.number(1)), "__row"), col("x", "v"), col("y", "v")
    ).from_(query)
    tiles = select(
        aliased(exp.IntDiv(this=col("__row", "n"), expression=exp.Literal.number(t)), "rb"),
        aliased(col("__row", "n"), "r"),
        aliased(col("x", "n"), "x"),
        aliased(col("y", "n"), "y"),
    ).from_(exp.Subquery(this=numbered, alias=exp.TableAlias(this=exp.to_identifier("n"))))
    data = job.add("data")
    _run(duck, _ctas(data, tiles.order_by(col("r"))))
    yv = exp.Bracket(this=col("y"), expressions=[exp.Literal.number(1)], offset=1)
    x_short = exp.LT(this=sym.func("list_count", col("x")), expression=exp.Literal.number(len(feats)))
    nulls, n, lo, hi, frac = _run(  # list_count counts a row's non-NULL features
        duck,
        select(
            exp.Sum(this=exp.cast(exp.or_(x_short, exp.Is(this=yv.copy(), expression=exp.Null())), "INT")),
            exp.Count(this=exp.Star()),
            exp.Min(this=yv.copy()),
            exp.Max(this=yv.copy()),
            exp.Sum(this=exp.cast(exp.NEQ(this=yv.copy(), expression=exp.Floor(this=yv.copy())), "INT")),
        ).from_(data.copy()),
    ).fetchall()[0]
    if nulls:
        _name_nulls(duck, job, data, feats, label)
    if not n:
        raise DataError(f"CREATE MODEL {job.name}: the SELECT returned no rows")
    task = _task(job, lo, hi, frac)
    info.update(task=task, rows=int(n), n_features=len(feats))
    info["classes"] = int(hi) + 1 if task == "multiclass" else None
    sizes = _layer_sizes(job)
    hidden = o["hidden_units"] if o["model_type"] == "mlp" else []
    asked, fix = _layers_asked(o["model_type"], hidden, len(feats), info["classes"])
    _check_parameters(job.name, sum(fi * fo + fo for fi, fo in sizes), asked, fix)
    if o["batch_size"] > t:  # batches of several shuffled blocks: an IN list, through an index
        _index_rb(duck, data)
    rng = np.random.default_rng(o["seed"])
    for i, (fan_in, fan_out) in enumerate(sizes):
        if o["model_type"] == "mlp":
            w, b = _uniform(rng, fan_in, (fan_in, fan_out)), _uniform(rng, fan_in, (fan_out,))
        else:
            w, b = np.zeros((fan_in, fan_out)), np.zeros(fan_out)
        _put(duck, job.add(f"w{i}"), _one(w))
        _put(duck, job.add(f"b{i}"), _one(b))


def _task(job: Job, lo: float, hi: float, non_integers: int) -> str:
    o, kind = job.options, job.options["model_type"]
    if kind == "linear_reg":
        return "regression"
    task = o.get("task")
    if kind == "mlp" and task is None:
        task = "regression" if not job.info["label_integral"] else ("binary" if hi <= 1 else "multiclass")
    if kind == "logistic_reg":
        task = "binary" if hi <= 1 else "multiclass"
    if task != "regression":
        if non_integers or lo < 0:
            raise DataError(
                f"CREATE MODEL {job.name}: {task} labels must be class indices 0, 1, ... (label {o['label']!r} has "
                f"values in [{lo}, {hi}])"
            )
        if task == "binary" and hi > 1:
            raise DataError(f"CREATE MODEL {job.name}: binary labels must be 0 or 1, got values up to {hi}")
    return task


def _layer_sizes(job: Job) -> list[tuple[int, int]]:
    info = job.info
    out = info["classes"] if info["task"] == "multiclass" else 1
    hidden = job.options.get("hidden_units", []) if job.options["model_type"] == "mlp" else []
    dims = [info["n_features"], *hidden, out]
    return list(zip(dims[:-1], dims[1:]))


def _prepare_mf(duck: Any, job: Job) -> None:
    o = job.options
    src = exp.Subquery(this=job.query.copy(), alias=exp.TableAlias(this=exp.to_identifier("q")))
    raw = _t("reldl", f"{job.base}__raw")
    _run(
        duck,
        _ctas(
            raw,
            select(
                aliased(_c(o["user"], "q"), "usr"),
                aliased(_c(o["item"], "q"), "itm"),
                aliased(_dbl(_c(o["label"], "q")), "r"),
            ).from_(src),
        ),
    )
    try:
        _no_nulls(duck, job, raw, ["usr", "itm", "r"])
        for role, c, key in (("user_ids", "usr", "u"), ("item_ids", "itm", "i")):
            ids = select(
                aliased(
                    exp.Sub(
                        this=exp.Window(this=exp.RowNumber(), order=exp.Order(expressions=[exp.Ordered(this=col(c))])),
                        expression=exp.Literal.number(1),
                    ),
                    key,
                ),
                aliased(col(c), "value"),
            ).from_(select(col(c)).from_(raw.copy()).distinct().subquery("d"))
            _run(duck, _ctas(job.add(role), ids))
        ratings = select(
            aliased(
                exp.Sub(
                    this=exp.Window(
                        this=exp.RowNumber(),
                        order=exp.Order(expressions=[exp.Ordered(this=col("u")), exp.Ordered(this=col("i"))]),
                    ),
                    expression=exp.Literal.number(1),
                ),
                "rid",
            ),
            col("u"),
            col("i"),
            col("r"),
        )
        joined = (
            select(_c("u", "a"), _c("i", "b"), _c("r", "t"))
            .from_(raw.copy().as_("t"))
            .join(job.table("user_ids").as_("a"), on=exp.EQ(this=_c("usr", "t"), expression=_c("value", "a")))
            .join(job.table("item_ids").as_("b"), on=exp.EQ(this=_c("itm", "t"), expression=_c("value", "b")))
        )
        ratings = ratings.from_(joined.subquery("j"))
        bs = exp.Literal.number(o["batch_size"])
        ratings = select(exp.Star(), aliased(exp.IntDiv(this=col("rid"), expression=bs), "rb")).from_(
            ratings.subquery("k")
        )
        _run(duck, _ctas(job.add("ratings"), ratings))
        _index_rb(duck, job.table("ratings"))
    finally:
        _run(duck, train.drop_sql(raw))
    n_users = _run(duck, select(exp.Count(this=exp.Star())).from_(job.table("user_ids"))).fetchall()[0][0]
    n_items = _run(duck, select(exp.Count(this=exp.Star())).from_(job.table("item_ids"))).fetchall()[0][0]
    n = _run(duck, select(exp.Count(this=exp.Star())).from_(job.table("ratings"))).fetchall()[0][0]
    if not n:
        raise DataError(f"CREATE MODEL {job.name}: the SELECT returned no rows")
    job.info.update(rows=int(n), users=int(n_users), items=int(n_items))
    k, scale = o["num_factors"], float(o["init_scale"])
    asked = f"num_factors = {k} for {n_users:,} users and {n_items:,} items"
    _check_parameters(job.name, k * (n_users + n_items), asked, "reduce num_factors")
    rng = np.random.default_rng(o["seed"])
    for role, key, count in (("users", "u", n_users), ("items", "i", n_items)):
        emb = rng.normal(0.0, scale, size=(count, k))
        _put(
            duck,
            job.add(role),
            pa.table({key: pa.array(range(count), pa.int64()), "v": pa.array(emb.tolist(), pa.list_(pa.float64()))}),
        )


def _prepare_gcn(duck: Any, job: Job) -> None:
    o, info = job.options, job.info
    feats = info["features"]
    edges_t = train.table_ref(o["edges"], f"CREATE MODEL {job.name}: edges")
    ecols = [d[0] for d in _run(duck, select(exp.Star()).from_(edges_t.copy()).limit(0)).description]
    for c in (o["edge_source"], o["edge_target"]):
        if c not in ecols:
            raise ModelError(
                f"CREATE MODEL {job.name}: edge table {o['edges']} has no column {c!r} ({', '.join(ecols)})"
            )
    src = exp.Subquery(this=job.query.copy(), alias=exp.TableAlias(this=exp.to_identifier("q")))
    x = exp.Array(expressions=[_dbl(_c(f, "q")) for f in feats])
    order = exp.Order(expressions=[exp.Ordered(this=_c(o["node"], "q"))])
    nodes = select(
        aliased(exp.Sub(this=exp.Window(this=exp.RowNumber(), order=order), expression=exp.Literal.number(1)), "n"),
        aliased(_c(o["node"], "q"), "node"),
        aliased(x, "x"),
        aliased(_dbl(_c(o["label"], "q")), "y"),
        *[aliased(_c(f, "q"), f"__f{i}") for i, f in enumerate(feats)],
    ).from_(src)
    _run(duck, _ctas(job.add("nodes"), nodes))
    _no_nulls(duck, job, job.table("nodes"), ["node", *[f"__f{i}" for i in range(len(feats))]])
    n, dup, labeled, lo, hi, frac = _run(
        duck,
        select(
            exp.Count(this=exp.Star()),
            exp.Sub(
                this=exp.Count(this=exp.Star()), expression=exp.Count(this=exp.Distinct(expressions=[col("node")]))
            ),
            exp.Count(this=col("y")),
            exp.Min(this=col("y")),
            exp.Max(this=col("y")),
            exp.Sum(this=exp.cast(exp.NEQ(this=col("y"), expression=exp.Floor(this=col("y"))), "INT")),
        ).from_(job.table("nodes")),
    ).fetchall()[0]
    if not n:
        raise DataError(f"CREATE MODEL {job.name}: the SELECT returned no nodes")
    if dup:
        raise DataError(f"CREATE MODEL {job.name}: node ids in column {o['node']!r} are not unique")
    if not labeled:
        raise DataError(f"CREATE MODEL {job.name}: no node has a label (unlabeled nodes have label NULL)")
    if frac or lo < 0:
        raise DataError(f"CREATE MODEL {job.name}: labels must be class indices 0, 1, ... (got values in [{lo}, {hi}])")
    # undirected edges by dense id, self loops, symmetric normalisation
    e = edges_t.copy().as_("e")
    s_id = (
        select(_c("n", "a").as_("s"), _c("n", "b").as_("t"))
        .from_(e)
        .join(job.table("nodes").as_("a"), on=exp.EQ(this=_c(o["edge_source"], "e"), expression=_c("node", "a")))
        .join(job.table("nodes").as_("b"), on=exp.EQ(this=_c(o["edge_target"], "e"), expression=_c("node", "b")))
    )
    n_edges = _run(duck, select(exp.Count(this=exp.Star())).from_(edges_t.copy())).fetchall()[0][0]
    n_known = _run(duck, select(exp.Count(this=exp.Star())).from_(s_id.subquery("k"))).fetchall()[0][0]
    if n_known != n_edges:
        raise DataError(
            f"CREATE MODEL {job.name}: {n_edges - n_known} edge(s) of {o['edges']} name nodes not in the SELECT"
        )
    both = exp.union(
        exp.union(
            select(col("s"), col("t")).from_(s_id.subquery("p")),
            select(col("t").as_("s"), col("s").as_("t")).from_(s_id.copy().subquery("r")),
            distinct=True,
        ),
        select(col("n").as_("s"), col("n").as_("t")).from_(job.table("nodes")),
        distinct=True,
    )
    pairs = job.add("pairs")
    _run(duck, _ctas(pairs, select(col("s"), col("t")).from_(both.subquery("b"))))
    deg = select(col("s"), aliased(_dbl(exp.Count(this=exp.Star())), "d")).from_(pairs.copy()).group_by(col("s"))
    norm = sym.div(sym.num(1.0), sym.func("sqrt", sym.mul(_c("d", "di"), _c("d", "dj"))))
    adj = (
        select(aliased(_c("s", "p"), "i"), aliased(_c("t", "p"), "j"), aliased(norm, "a"))
        .from_(pairs.copy().as_("p"))
        .join(deg.subquery("di"), on=exp.EQ(this=_c("s", "p"), expression=_c("s", "di")))
        .join(deg.copy().subquery("dj"), on=exp.EQ(this=_c("t", "p"), expression=_c("s", "dj")))
    )
    _run(duck, _ctas(job.add("adj"), adj))
    _run(duck, train.drop_sql(pairs))
    del job.tables["pairs"]
    info.update(rows=int(n), labeled=int(labeled), n_features=len(feats), classes=int(hi) + 1, task="multiclass")
    dims = [len(feats), o["hidden_units"][0], int(hi) + 1]
    asked, fix = _layers_asked("gcn", o["hidden_units"], len(feats), dims[-1])
    _check_parameters(job.name, _layered(dims), asked, fix)
    rng = np.random.default_rng(o["seed"])
    for i, (fi, fo) in enumerate(zip(dims[:-1], dims[1:])):
        _put(duck, job.add(f"w{i}"), _one(_uniform(rng, fi, (fi, fo))))
        _put(duck, job.add(f"b{i}"), _one(_uniform(rng, fi, (fo,))))


BOOKKEEPING = ("training_jobs", "training_runs", "training_log")  # tables in schema reldl that training makes


def _jobs_table(duck: Any) -> None:
    _run(duck, "CREATE SCHEMA IF NOT EXISTS reldl")
    _run(
        duck,
        "CREATE TABLE IF NOT EXISTS reldl.training_jobs (name VARCHAR PRIMARY KEY, spec VARCHAR NOT NULL, "
        "tables JSON NOT NULL, info JSON NOT NULL)",
    )


def _bookkeeping(duck: Any) -> set[str]:
    """Which of the BOOKKEEPING tables exist in the database's reldl schema."""
    q = (
        select(col("table_name"))
        .from_(exp.Table(this=exp.Anonymous(this="duckdb_tables", expressions=[])))
        .where(exp.Anonymous(this="current_database", expressions=[]).eq(col("database_name")))
        .where(col("schema_name").eq(exp.Literal.string("reldl")))
        .where(col("table_name").isin(*(exp.Literal.string(t) for t in BOOKKEEPING)))
    )
    return {r[0] for r in _run(duck, q).fetchall()}


def _job_row(duck: Any, job: Job) -> list[tuple]:
    """The job's training_jobs row (spec, tables, info) as a list of zero or one rows; none without the table."""
    if "training_jobs" not in _bookkeeping(duck):
        return []
    return _run(
        duck, "SELECT spec, tables, info FROM reldl.training_jobs WHERE name = ?", [job.name.lower()]
    ).fetchall()


def _drop_tables(duck: Any, tables: Sequence[str]) -> None:
    for t in tables:
        _run(duck, train.drop_sql(_t("reldl", t)))


def prepare(duck: Any, job: Job) -> bool:
    """Tile tables and initial parameters, committed in one transaction with the job's row; returns True when an
    interrupted run of the same job (same options and SELECT) was found instead, whose tables are reused. The
    bookkeeping tables are made inside the transaction too: a job that fails here (no rows, NULLs, too large) leaves
    the database as it was, without an empty training_jobs table."""
    row = _job_row(duck, job)
    if row and row[0][0] == job.spec:
        job.tables, job.info = json.loads(row[0][1]), json.loads(row[0][2])
        return True
    _run(duck, "BEGIN TRANSACTION")
    try:
        _jobs_table(duck)
        if row:  # an unfinished job with other options: its tables go (a registered model's job row was removed)
            _drop_tables(duck, list(json.loads(row[0][1]).values()))
            _run(duck, "DELETE FROM reldl.training_jobs WHERE name = ?", [job.name.lower()])
        kind = job.options["model_type"]
        if kind in TABULAR:
            _prepare_tabular(duck, job)
        elif kind == "matrix_factorization":
            _prepare_mf(duck, job)
        else:
            _prepare_gcn(duck, job)
        _run(
            duck,
            "INSERT INTO reldl.training_jobs VALUES (?, ?, ?, ?)",
            [job.name.lower(), job.spec, json.dumps(job.tables), json.dumps(job.info)],
        )
        train.forget(duck, job.run)
        _run(duck, "COMMIT")
    except BaseException:
        duck.execute("ROLLBACK")
        raise
    return False


# ---------------------------------------------------------------------------------------------------------------------
# loss graphs


def _from(src: exp.Expression) -> exp.Expression:
    """``src`` (a table or a query) in a FROM clause."""
    return src.copy().subquery("s") if isinstance(src, exp.Query) else src.copy()


def _param(job: Job, role: str, shape: tuple[int, ...], keys: Sequence[str] = ()) -> Node:
    return ad.param(job.table(role), keys=keys, shape=shape, name=role)


def tabular_graph(job: Job, source: exp.Expression | None = None) -> tuple[Node, list[Node]]:
    """(loss, parameter scans) of linear/logistic regression or an MLP over the batch view (or ``source``): tiles of
    one row, keyed by ``r``."""
    info = job.info
    src = source if source is not None else exp.Table(this=exp.to_identifier(job.view))
    f, task = info["n_features"], info["task"]
    h: Node = ad.table(src, keys=["r"], shape=(1, f), value="x", name="x")
    params = []
    sizes = _layer_sizes(job)
    for i, (fi, fo) in enumerate(sizes):
        w, b = _param(job, f"w{i}", (fi, fo)), _param(job, f"b{i}", (fo,))
        params += [w, b]
        h = ad.linear(h, w, b, name=f"z{i}")
        if i < len(sizes) - 1:
            h = ad.apply(job.options.get("activation", "relu"), h, name=f"h{i}")
    if task == "multiclass":
        y = ad.table(src, keys=["r"], shape=(1,), value="y", name="y")
        per_row = ad.apply("softmax_xent", h, y)
    else:
        y = ad.table(src, keys=["r"], shape=(1, 1), value="y", name="y")
        per_row = ad.apply("squared_error" if task == "regression" else "bce_logits", h, y)
    total = ad.sum(ad.apply("tile_sum", per_row))
    n = select(aliased(_dbl(exp.Sum(this=sym.func("len", col("y")))), "v")).from_(_from(src))
    return ad.apply("div", total, ad.table(n, name="rows")), params


def mf_graph(job: Job, source: exp.Expression | None = None) -> tuple[Node, list[Node]]:
    """(loss, [users, items]): mean squared error on the observed ratings of the batch, plus the L2 term."""
    k = job.options["num_factors"]
    src = source if source is not None else exp.Table(this=exp.to_identifier(job.view))
    users, items = _param(job, "users", (k,), ["u"]), _param(job, "items", (k,), ["i"])
    r = ad.table(src, keys=["rid", "u", "i"], value="r", name="ratings")
    err = ad.apply(DotError(), users, items, r, name="err")
    n = select(aliased(_dbl(exp.Count(this=exp.Star())), "v")).from_(_from(src))
    loss = ad.apply("div", ad.sum(err), ad.table(n, name="n"))
    l2 = float(job.options["l2"])
    if l2:
        sq = ad.sum(
            ad.apply(
                "add",
                ad.sum(ad.apply("tile_sum", ad.apply("square", users))),
                ad.sum(ad.apply("tile_sum", ad.apply("square", items))),
            )
        )
        reg = ad.apply(ad_kernel_scale(l2), sq)
        loss = ad.apply("add", loss, reg)
    return loss, [users, items]


def ad_kernel_scale(c: float) -> Kernel:
    """The element-wise kernel ``c * x``."""
    from reldl.autodiff.kernels import expression

    return expression(exp.Mul(this=sym.num(c), expression=exp.column("x")), ["x"])


def gcn_graph(job: Job) -> tuple[Node, list[Node]]:
    """(loss, parameters) of the 2-layer GCN over per-node tiles (1, features)."""
    info = job.info
    f, hdim, c = info["n_features"], job.options["hidden_units"][0], info["classes"]
    nodes = job.table("nodes")
    x = ad.table(nodes, keys=["j"], shape=(1, f), value="x", columns={"j": "n"}, name="x")
    adj = ad.table(job.table("adj"), keys=["i", "j"], value="a", name="adj")
    w0, b0 = _param(job, "w0", (f, hdim)), _param(job, "b0", (hdim,))
    w1, b1 = _param(job, "w1", (hdim, c)), _param(job, "b1", (c,))

    def propagate(h: Node) -> Node:  # sum_j A(i, j) h(j)
        return ad.sum(ad.apply("mul", adj, h), by=["i"])

    h1 = ad.apply(job.options["activation"], ad.apply("bias_add", propagate(ad.matmul(x, w0)), b0), name="h1")
    z = ad.apply("bias_add", propagate(ad.matmul(ad.rename(h1, {"i": "j"}), w1)), b1, name="logits")
    labeled = select(col("n").as_("i"), aliased(exp.Array(expressions=[col("y")]), "y")).from_(nodes.copy())
    labeled = labeled.where(exp.Not(this=exp.Is(this=col("y"), expression=exp.Null())))
    y = ad.table(labeled, keys=["i"], shape=(1,), value="y", name="labels")
    total = ad.sum(ad.apply("tile_sum", ad.apply("softmax_xent", z, y)))
    n = (
        select(aliased(_dbl(exp.Count(this=exp.Star())), "v"))
        .from_(nodes.copy())
        .where(exp.Not(this=exp.Is(this=col("y"), expression=exp.Null())))
    )
    return ad.apply("div", total, ad.table(n, name="labeled")), [w0, b0, w1, b1]


def graph(job: Job) -> tuple[Node, list[Node], train.Batches | None]:
    o, kind = job.options, job.options["model_type"]
    if kind in TABULAR:
        loss, params = tabular_graph(job)
        per = o["batch_size"] // o["tile_rows"]
        data = job.table("data").sql("duckdb")
        # one block a batch: a range over the row-ordered table (contiguous); several: shuffled blocks, an IN list
        return loss, params, train.Batches(job.view, data, "rb", per, o["shuffle"], o["seed"], contiguous=per == 1)
    if kind == "matrix_factorization":
        loss, params = mf_graph(job)
        return (
            loss,
            params,
            train.Batches(job.view, job.table("ratings").sql("duckdb"), "rb", 1, o["shuffle"], o["seed"]),
        )
    loss, params = gcn_graph(job)
    return loss, params, None


# ---------------------------------------------------------------------------------------------------------------------
# the statement


def fit(duck: Any, job: Job, progress: bool | None = None) -> train.TrainResult:
    """Prepare (or find) the job's tables and train them; resumes an interrupted run of the same job."""
    resumed = prepare(duck, job)
    loss, params, batches = graph(job)
    o = job.options
    return train.minimize(
        duck,
        loss,
        params,
        optimizer=o["optimizer"],
        learning_rate=float(o["learning_rate"]),
        epochs=o["epochs"],
        batches=batches,
        momentum=float(o["momentum"]),
        betas=(float(o["beta1"]), float(o["beta2"])),
        eps=float(o["eps"]),
        weight_decay=float(o["weight_decay"]),
        name=job.run,
        resume=resumed,
        progress=progress,
        on_step=after_step,
        plot=o["plot"],
    )


def read_tile(duck: Any, table: exp.Table) -> np.ndarray:
    rows = _run(duck, select(col("v")).from_(table.copy())).fetchall()
    return np.asarray(rows[0][0], dtype=np.float64)


def export_tabular(duck: Any, job: Job, path: Path) -> Path:
    """Write the trained weights as a tabular checkpoint (config.json + model.safetensors, float32)."""
    import torch

    from reldl import tabular

    info, o = job.info, job.options
    sizes = _layer_sizes(job)
    act = o.get("activation", "relu")
    layers = [(fi, fo, act if i < len(sizes) - 1 else "identity") for i, (fi, fo) in enumerate(sizes)]
    spec = tabular.TabularSpec(o["model_type"], info["n_features"], layers, info["task"])
    weights = {}
    for i, (fi, fo) in enumerate(sizes):
        w = read_tile(duck, job.table(f"w{i}")).reshape(fi, fo)
        weights[f"layers.{i}.weight"] = torch.from_numpy(np.ascontiguousarray(w.T))
        weights[f"layers.{i}.bias"] = torch.from_numpy(read_tile(duck, job.table(f"b{i}")))
    return tabular.save_tabular(path, spec, weights)


def create_model(
    duck: Any, name: str, options: dict[str, Any], query_sql: str, progress: bool | None = None
) -> tuple[str | None, dict[str, Any], list[str]]:
    """Train the model of ``CREATE MODEL name OPTIONS (...) AS SELECT ...``; returns (path or None, catalog options,
    tables of a previously registered version that the caller drops once the new one is registered)."""
    job = make_job(duck, name, options, query_sql)  # checks `path` and `plot` before anything is written
    saved = _save(duck, job)
    try:
        result = fit(duck, job, progress)
        _check_finite(duck, job, result)
    except train.Diverged as e:  # no use resuming it: undone, as a job that fails in prepare is
        _discard(duck, job, saved)
        raise _diverged(job, e) from None
    o, kind = job.options, job.options["model_type"]
    stored: dict[str, Any] = {
        "trained": True,
        "tables": {role: f"reldl.{t}" for role, t in job.tables.items()},
        "training_run": job.run,
        "epochs": result.epochs,
        "steps": result.steps,
        "loss": result.losses[-1] if result.losses else None,
        "train_options": {k: v for k, v in o.items() if k not in ("model_type", "path")},
        **{k: v for k, v in job.info.items() if k != "label_integral"},
    }
    if kind == "gcn":  # transductive: the trained forward pass's class per node, for predict()
        _store_gcn_predictions(duck, job)
        stored["tables"]["pred"] = f"reldl.{job.tables['pred']}"
    path: str | None = None
    if kind in TABULAR:
        from reldl import tabular

        target, _ = catalog.model_dir(duck, name, o["path"])  # `path` checked again: not taken while training
        export_tabular(duck, job, target)
        resolved, tab = tabular.validate_create_options(name, {"model_type": kind, "path": str(target)})
        spec = tabular.inspect_tabular(resolved)
        tab["activation_bytes_per_row"] = 8 * (spec.n_features + sum(out for _, out, _ in spec.layers))
        stored = {**tab, **stored}
        path = resolved
    _run(duck, "DELETE FROM reldl.training_jobs WHERE name = ?", [job.name.lower()])
    return path, stored, list(job.tables.values())


@dataclass
class _Saved:
    """What a job changes outside its own tables, to put back if it diverges: which BOOKKEEPING tables existed, and
    the registered model's rows in training_runs / training_log (Arrow), which the new job's prepare forgets (its run
    has the model's name); None when an unfinished job of that name owns those rows."""

    tables: set[str]
    runs: pa.Table | None = None
    log: pa.Table | None = None


def _save(duck: Any, job: Job) -> _Saved:
    saved = _Saved(_bookkeeping(duck))
    if _job_row(duck, job) or not {"training_runs", "training_log"} <= saved.tables:
        return saved
    for attr, table in (("runs", "training_runs"), ("log", "training_log")):
        q = select(exp.Star()).from_(_t("reldl", table)).where(col("name").eq(exp.Placeholder()))
        setattr(saved, attr, _arrow(duck, q.sql("duckdb"), [job.run]))
    return saved


def _arrow(duck: Any, sql: str, params: Sequence[Any]) -> pa.Table:
    import duckdb

    try:
        rel = duck.sql(sql, params=params)
        return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()  # (renamed in DuckDB 1.4)
    except duckdb.Error as e:
        from reldl.errors import translate

        raise translate(e) from None


def _parameter_roles(job: Job) -> list[str]:
    if job.options["model_type"] == "matrix_factorization":
        return ["users", "items"]
    return [role for role in job.tables if role[0] in "wb" and role[1:].isdigit()]


def _check_finite(duck: Any, job: Job, result: train.TrainResult) -> None:
    """Raise train.Diverged when a trained parameter is NaN or infinite: minimize checks each step's loss, which
    comes before that step's update, so the last update is checked here."""
    for role in _parameter_roles(job):
        values = select(aliased(exp.Unnest(expressions=[col("v")]), "x")).from_(job.table(role))
        finite = exp.Anonymous(this="isfinite", expressions=[col("x")])
        q = select(exp.Count(this=exp.Star())).from_(values.subquery()).where(exp.Not(this=finite))
        if _run(duck, q).fetchall()[0][0]:
            raise train.Diverged(result.epochs, result.steps, "the parameters are not finite after the last update")


def _discard(duck: Any, job: Job, saved: _Saved) -> None:
    """Undo a job that cannot finish, in one transaction: its tables, training_jobs row and run rows go, the
    registered model's run rows come back, and the BOOKKEEPING tables the statement made go if they are empty."""
    view = "__reldl_models_saved"
    _run(duck, "BEGIN TRANSACTION")
    try:
        drop_trained(duck, {"tables": job.tables})
        _run(duck, "DELETE FROM reldl.training_jobs WHERE name = ?", [job.name.lower()])
        train.forget(duck, job.run)
        for table, rows in (("training_runs", saved.runs), ("training_log", saved.log)):
            if rows is not None and rows.num_rows:
                duck.register(view, rows)
                try:
                    _run(duck, exp.insert(select(exp.Star()).from_(exp.to_identifier(view)), _t("reldl", table)))
                finally:
                    duck.unregister(view)
        for table in BOOKKEEPING:
            count = select(exp.Count(this=exp.Star())).from_(_t("reldl", table))
            if table not in saved.tables and not _run(duck, count).fetchall()[0][0]:
                _run(duck, train.drop_sql(_t("reldl", table)))
        _run(duck, "COMMIT")
    except BaseException:
        duck.execute("ROLLBACK")
        raise


def _diverged(job: Job, e: train.Diverged) -> DataError:
    """The one line a SQL user sees: where it diverged and what to change."""
    if e.first_step:  # before any update: the initial parameters are small, so the values are at fault
        return DataError(
            f"CREATE MODEL {job.name}: the {e.what} at the first step, before any update: the SELECT's values "
            "include NaN, infinite or very large numbers"
        )
    scale = "ratings" if job.options["model_type"] == "matrix_factorization" else "features"
    return DataError(f"CREATE MODEL {job.name}: {e}; lower learning_rate or scale the {scale}")


def drop_trained(duck: Any, options: dict[str, Any], keep: Sequence[str] = ()) -> None:
    """Drop the tables a trained model's catalog row lists (except ``keep``)."""
    keep_set = {k.lower() for k in keep}
    for t in (options or {}).get("tables", {}).values():
        short = t.split(".", 1)[-1]
        if short.lower() not in keep_set:
            _run(duck, train.drop_sql(_t("reldl", short)))
            _run(duck, train.drop_sql(_t("reldl", short + "__opt")))  # optimizer state beside a parameter


def _store_gcn_predictions(duck: Any, job: Job) -> None:
    """``pred(node, class, logits)``: the trained GCN's forward pass over the whole graph, class = argmax."""
    from reldl.autodiff.grad import backward
    from reldl.autodiff.ir import topological

    loss, _ = gcn_graph(job)
    logits = next(n for n in topological([loss]) if n.name == "logits")
    prog = backward(loss)
    z = exp.Subquery(this=prog.query(f"f{logits.id}"), alias=exp.TableAlias(this=exp.to_identifier("z")))
    argmax = exp.Sub(
        this=sym.func("list_position", _c("v", "z"), sym.func("list_max", _c("v", "z"))),
        expression=exp.Literal.number(1),
    )
    q = select(aliased(_c("node", "nd"), "node"), aliased(argmax, "class"), aliased(_c("v", "z"), "logits"))
    q = q.from_(z).join(job.table("nodes").as_("nd"), on=exp.EQ(this=_c("n", "nd"), expression=_c("i", "z")))
    _run(duck, _ctas(job.add("pred"), q))


def lookup_sql(model: str, model_type: str, options: dict[str, Any], args: list[exp.Expression]) -> exp.Expression:
    """What ``predict(model, args...)`` is for a trained matrix factorization (user, item) or GCN (node)."""
    tables = options.get("tables", {})
    if model_type == "matrix_factorization":
        if len(args) != 2:
            raise ModelError(
                f"predict: model {model!r} is a matrix factorization: it takes (user, item), got {len(args)} value(s)"
            )
        return mf_predict_sql(tables, args[0], args[1])
    if len(args) != 1:
        raise ModelError(f"predict: model {model!r} is a GCN: it takes one node id, got {len(args)} value(s)")
    if "pred" not in tables:
        raise ModelError(f"predict: GCN {model!r} was trained before predictions were stored; CREATE OR REPLACE it")
    alias = "__reldl_gcn_p"
    q = select(_c("__reldl_class", alias)).from_(
        _renamed(tables["pred"], {"node": "__reldl_node", "class": "__reldl_class"}, alias)
    )
    return exp.Subquery(this=q.where(exp.EQ(this=_c("__reldl_node", alias), expression=args[0].copy())))


def _renamed(table: str, columns: dict[str, str], alias: str) -> exp.Expression:
    """``(SELECT c AS __reldl_c, ... FROM table) AS alias``: a lookup's own columns under names the caller's query
    cannot use, so the caller's arguments (``user``, ``u``, ``a.x``) bind to the caller's tables, never to ours."""
    schema, name = table.split(".", 1)
    q = select(*[aliased(_c(c), n) for c, n in columns.items()]).from_(_t(schema, name))
    return exp.Subquery(this=q, alias=exp.TableAlias(this=exp.to_identifier(alias)))


def mf_predict_sql(tables: dict[str, str], user: exp.Expression, item: exp.Expression) -> exp.Expression:
    """A scalar subquery: the trained matrix factorization's prediction ``p_u . q_i`` for a user and item value."""
    a, p, b, q = (f"__reldl_mf_{k}" for k in "apbq")
    query = select(sym.func("list_dot_product", _c("__reldl_pv", p), _c("__reldl_qv", q))).from_(
        _renamed(tables["user_ids"], {"value": "__reldl_uval", "u": "__reldl_u"}, a)
    )
    joins = (
        (_renamed(tables["users"], {"u": "__reldl_pu", "v": "__reldl_pv"}, p), ("__reldl_u", a), ("__reldl_pu", p)),
        (_renamed(tables["item_ids"], {"value": "__reldl_ival", "i": "__reldl_i"}, b), None, None),
        (_renamed(tables["items"], {"i": "__reldl_qi", "v": "__reldl_qv"}, q), ("__reldl_i", b), ("__reldl_qi", q)),
    )
    for table, left, right in joins:
        if left is None:
            query = query.join(table, join_type="cross")
        else:
            query = query.join(table, on=exp.EQ(this=_c(*left), expression=_c(*right)))
    query = query.where(
        exp.and_(
            exp.EQ(this=_c("__reldl_uval", a), expression=user.copy()),
            exp.EQ(this=_c("__reldl_ival", b), expression=item.copy()),
        )
    )
    return exp.Subquery(this=query)
