"""`reldl demo` end to end (reduced row count): real SQL over the shipped model, accuracy asserted."""

from __future__ import annotations

import io

import reldl
from reldl.cli import main
from reldl.demo.run import run


def test_demo_runs_and_is_accurate(tmp_path):
    out = io.StringIO()
    assert run(tmp_path, rows=60, out=out) == 0
    text = out.getvalue()
    assert "llm_generate(" in text and "GROUP BY" in text
    with reldl.connect(str(tmp_path / "demo.db"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM extracted WHERE answer IS NOT NULL").fetchall() == [(60,)]
        ((exact,),) = con.execute(
            "SELECT avg(coalesce(p.product = r.product AND p.rating = r.rating AND p.sentiment = r.sentiment "
            "AND p.issue = r.issue, false)::INT) FROM reviews r JOIN predicted p USING (id)"
        ).fetchall()
        assert exact >= 0.95
        assert [m[0] for m in con.execute("SHOW MODELS").fetchall()] == ["demo", "demo_fast"]
        # the sparse variant's step: 12 rows extracted with model := 'demo_fast', as accurate as the dense model
        ((n, same),) = con.execute(
            "SELECT count(*), avg((f.answer = e.answer)::INT) FROM extracted_fast f JOIN extracted e USING (id)"
        ).fetchall()
        assert n == 12 and same >= 0.9
    assert "EXPLAIN's per-layer sparsity" in text and "layer 0: input" in text and "sparse variant step:" in text


def test_demo_fails_when_accuracy_is_below_the_bar(tmp_path):
    assert run(tmp_path, rows=5, min_accuracy=1.01, out=io.StringIO()) == 1


def test_demo_command_line(tmp_path, capsys):
    assert main(["demo", "--dir", str(tmp_path), "--rows", "8"]) == 0
    assert "exact match on all four fields" in capsys.readouterr().out
    assert main(["demo", "--rows", "0"]) == 1


def test_demo_bad_device_or_failure_leaves_no_temporary_folder(tmp_path, monkeypatch):
    import tempfile

    import pytest

    from reldl.demo import data

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(reldl.ProgrammingError, match="unknown device 'tpu'"):
        run(device="tpu", out=io.StringIO())
    monkeypatch.setattr(data, "reviews", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        run(rows=5, out=io.StringIO())
    assert list(tmp_path.iterdir()) == []
