"""What reldl adds to statements without model calls: planner recognition (sqlglot tokenizer) per statement, and
reldl's `cursor.execute` against DuckDB's own on the same statements. Target: under 1 ms per typical statement.

    python benchmarks/bench_passthrough.py [--out benchmarks/out/passthrough.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import duckdb

import reldl
from reldl.planner.statements import parse

STATEMENTS = {
    "point select": "SELECT * FROM orders WHERE id = 42",
    "join + group by": (
        "SELECT c.region, count(*) AS n, sum(o.amount) AS total FROM orders o JOIN customers c ON o.cid = c.id "
        "WHERE o.day >= DATE '2024-01-01' GROUP BY c.region ORDER BY total DESC LIMIT 10"
    ),
    "insert values": "INSERT INTO log VALUES (1, 'started', now())",
    "create table as": "CREATE OR REPLACE TABLE agg AS SELECT cid, avg(amount) AS a FROM orders GROUP BY cid",
    "window + cte": (
        "WITH r AS (SELECT cid, amount, row_number() OVER (PARTITION BY cid ORDER BY amount DESC) AS k FROM orders) "
        "SELECT cid, amount FROM r WHERE k <= 3"
    ),
}


def best_of(fn, n: int) -> float:
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n)
    return min(times)


def _run(cur, sql: str) -> None:
    cur.execute(sql)
    if cur.description is not None:
        cur.fetchall()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "passthrough.json")
    args = ap.parse_args()
    con = reldl.connect()
    raw = duckdb.connect()
    setup = [
        "CREATE TABLE customers AS SELECT i AS id, 'r' || (i % 5) AS region FROM range(1000) t(i)",
        "CREATE TABLE orders AS SELECT i AS id, i % 1000 AS cid, random() * 100 AS amount, "
        "DATE '2024-01-01' + (i % 365)::INT AS day FROM range(20000) t(i)",
        "CREATE TABLE log (id INT, msg VARCHAR, ts TIMESTAMP)",
    ]
    for s in setup:
        con.execute(s)
        raw.execute(s)
    rows = []
    for name, sql in STATEMENTS.items():
        parse_ms = best_of(lambda sql=sql: parse(sql), 200) * 1e3
        cur = con.cursor()
        reldl_ms = best_of(lambda sql=sql, cur=cur: _run(cur, sql), 50) * 1e3
        duck_ms = best_of(lambda sql=sql: raw.execute(sql).fetchall(), 50) * 1e3
        rows.append({"statement": name, "parse_ms": parse_ms, "reldl_ms": reldl_ms, "duckdb_ms": duck_ms})
    print(f"{'statement':<18}{'planner ms':>12}{'reldl ms':>10}{'duckdb ms':>11}{'added ms':>10}")
    for r in rows:
        added = r["reldl_ms"] - r["duckdb_ms"]
        print(f"{r['statement']:<18}{r['parse_ms']:>12.3f}{r['reldl_ms']:>10.3f}{r['duckdb_ms']:>11.3f}{added:>10.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    info = {"machine": platform.platform(), "duckdb": duckdb.__version__, "date": time.strftime("%Y-%m-%d")}
    args.out.write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
