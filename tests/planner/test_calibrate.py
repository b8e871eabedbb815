"""`reldl calibrate` stores measured constants in the catalog, the planner's cost model reads them, and a noisy
measurement does not replace a stored value."""

from __future__ import annotations

import reldl
from reldl import calibrate as cal
from reldl.planner.cost import DEFAULTS

PROBED = {"torch_cpu_flops", "sql_flops", "udf_chunk_seconds", "row_seconds"}


def test_calibrate_stores_constants_that_the_planner_uses(tmp_path):
    db = str(tmp_path / "cal.db")
    lines: list[str] = []
    with reldl.connect(db) as con:
        measured = cal.calibrate(con.duckdb_connection, out=lines.append, offload=False)  # offload: sql tests
        assert set(measured) <= PROBED | {"torch_cuda_flops"}
        # (a busy machine may leave noisy ones out: test_noisy_measurement_keeps_the_stored_value)
        assert all(v > 0 for v in measured.values())
        assert len(lines) >= len(PROBED)  # every probe reports: stored or kept
    with reldl.connect(db) as con:  # persisted with the database
        constants = con.cost_constants()
    assert constants == measured
    assert set(constants) <= set(DEFAULTS)


def test_noisy_measurement_keeps_the_stored_value(tmp_path, monkeypatch):
    db = str(tmp_path / "cal.db")
    with reldl.connect(db) as con:
        duck = con.duckdb_connection
        duck.execute(cal.SCHEMA)
        duck.execute("INSERT INTO reldl.calibration (key, value) VALUES ('sql_flops', 123.0)")
        spreads = iter([1.0, 2.0, 1.0, 1.0, 1.0, 1.0])  # the second probe (sql_flops) is noisy
        monkeypatch.setattr(cal, "_rounds", lambda fn, rounds=3: (fn(), next(spreads)))
        lines: list[str] = []
        measured = cal.calibrate(duck, out=lines.append, offload=False)
        assert "sql_flops" not in measured and "torch_cpu_flops" in measured
        assert any("sql_flops" in line and "noisy" in line and "kept 123" in line for line in lines)
        assert con.cost_constants()["sql_flops"] == 123.0


def test_steady_measurements_are_all_stored(tmp_path, monkeypatch):
    monkeypatch.setattr(cal, "_rounds", lambda fn, rounds=3: (fn(), 1.0))
    with reldl.connect(str(tmp_path / "cal.db")) as con:
        measured = cal.calibrate(con.duckdb_connection, out=lambda line: None)
        assert set(measured) >= PROBED
        assert con.cost_constants() == measured
