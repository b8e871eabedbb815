"""`reldl calibrate` stores measured constants in the catalog, and the planner's cost model reads them."""

from __future__ import annotations

import reldl
from reldl.calibrate import calibrate
from reldl.planner.cost import DEFAULTS


def test_calibrate_stores_constants_that_the_planner_uses(tmp_path):
    db = str(tmp_path / "cal.db")
    with reldl.connect(db) as con:
        measured = calibrate(con.duckdb_connection, out=lambda line: None)
        assert set(measured) >= {"torch_cpu_flops", "sql_flops", "udf_chunk_seconds", "row_seconds"}
        assert all(v > 0 for v in measured.values())
    with reldl.connect(db) as con:  # persisted with the database
        constants = con.cost_constants()
    assert constants == measured
    assert set(constants) <= set(DEFAULTS)
