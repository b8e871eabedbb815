"""Temporary directories reldl makes for one process (models of an in-memory database) are gone when it exits;
a file database's models stay."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("duckdb")

CHILD = textwrap.dedent(
    """
    import os, sys
    import reldl
    con = reldl.connect(sys.argv[1])
    cur = con.cursor()
    cur.execute("CREATE TABLE t AS SELECT i::DOUBLE AS x, 2.0 * i AS y FROM range(64) r(i)")
    cur.execute("CREATE MODEL lin OPTIONS (model_type = 'linear_reg', label = 'y', epochs = 1) AS SELECT x, y FROM t")
    print(sorted(os.listdir(os.environ["TMPDIR"])))
    """
)


def run_child(tmp_path, database: str) -> list[str]:
    env = dict(os.environ, TMPDIR=str(tmp_path), RELDL_PROGRESS="0")
    out = subprocess.run([sys.executable, "-c", CHILD, database], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return eval(out.stdout.strip().splitlines()[-1])


def test_in_memory_models_leave_no_directory(tmp_path):
    during = run_child(tmp_path, ":memory:")
    assert any(name.startswith("reldl-lin-") for name in during)  # the model's files were there while it ran
    assert not [n for n in os.listdir(tmp_path) if n.startswith("reldl-")]


def test_file_database_models_stay(tmp_path):
    db = tmp_path / "data" / "m.duckdb"
    db.parent.mkdir()
    run_child(tmp_path, str(db))
    assert (tmp_path / "data" / "m.duckdb.models" / "lin").is_dir()


def test_a_directory_a_file_database_registers_is_kept(tmp_path):
    """A model trained in memory whose files a database file then registers (by path) keeps them at exit."""
    code = textwrap.dedent(
        """
        import os, sys
        import reldl
        mem = reldl.connect(":memory:")
        mem.execute("CREATE TABLE t AS SELECT i::DOUBLE AS x, 2.0 * i AS y FROM range(64) r(i)")
        opts = "model_type = 'linear_reg', label = 'y', epochs = 1"
        mem.execute(f"CREATE MODEL lin OPTIONS ({opts}) AS SELECT x, y FROM t")
        path = mem.execute("SELECT path FROM reldl.models WHERE name = 'lin'").fetchall()[0][0]
        disk = reldl.connect(sys.argv[1])
        disk.execute(f"CREATE MODEL kept OPTIONS (model_type = 'linear_reg', path = '{path}')")
        print(path)
        """
    )
    env = dict(os.environ, TMPDIR=str(tmp_path), RELDL_PROGRESS="0")
    db = str(tmp_path / "keep.duckdb")
    out = subprocess.run([sys.executable, "-c", code, db], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert os.path.isdir(out.stdout.strip().splitlines()[-1])


def test_forked_child_removes_only_its_own(tmp_path):
    from reldl import scratch

    parent_dir = tmp_path / "parent"
    parent_dir.mkdir()
    scratch.remove_at_exit(parent_dir)
    pid = os.fork()
    if pid == 0:  # the child: its own directory, then the exit handlers
        child_dir = tmp_path / "child"
        child_dir.mkdir()
        scratch.remove_at_exit(child_dir)
        scratch._cleanup()
        os._exit(0 if not child_dir.exists() and parent_dir.exists() else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert parent_dir.exists()
    scratch.keep(parent_dir)  # leave the test's directory to pytest
