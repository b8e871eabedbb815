"""Model files are never overwritten or deleted by a database that does not own them, and paths that cannot be
written are refused up front with one line naming them:

* CREATE MODEL ... AS SELECT with a `path` that exists and is not an empty directory is refused before any work;
* DROP MODEL in a copy of a database file never deletes the original's model directory (`owned_dirs` are stored
  relative to the database's own `<db>.models/`, or with the database file that made them);
* a `path` or `plot` that cannot be written is a one-line error before training starts.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from sqlhelpers import one_line, quote

import reldl
from reldl import catalog, paths

TRAIN = "CREATE MODEL m OPTIONS (model_type = {kind!r}, label = 'y', epochs = 2, batch_size = 20{extra}) AS "
TRAIN += "SELECT x1, x2, y FROM pts"
PREDICT = "SELECT round(predict('m', x1, x2), 6) FROM pts ORDER BY x1"


def _pts(conn) -> None:
    conn.execute("CREATE TABLE pts AS SELECT i::DOUBLE AS x1, (i % 3)::DOUBLE AS x2, (i % 2) AS y FROM range(40) t(i)")


def _train(conn, kind: str = "logistic_reg", extra: str = "") -> None:
    conn.execute(TRAIN.format(kind=kind, extra=extra))


def _files(d: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(d)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.rglob("*")) if p.is_file()}


def _nothing_written(conn) -> None:
    """No catalog row, no training job, no training tables: the statement did no work."""
    assert conn.execute("SELECT count(*) FROM reldl.models").fetchall() == [(0,)]
    tables = conn.execute("SELECT table_name FROM duckdb_tables() WHERE schema_name = 'reldl' ORDER BY 1").fetchall()
    assert not [t for (t,) in tables if t.startswith("m_") or t.startswith("training_")]


def _options(conn, name: str = "m") -> dict:
    ((o,),) = conn.execute("SELECT options FROM reldl.models WHERE name = ?", [name]).fetchall()
    return json.loads(o)


@pytest.fixture
def mem():
    conn = reldl.connect()
    _pts(conn)
    yield conn
    conn.close()


# -- 1. an explicit `path` that is taken is refused before any work


@pytest.mark.parametrize("kind", ["logistic_reg", "linear_reg", "mlp"])
def test_training_into_a_non_empty_path_is_refused(mem, tmp_path, kind):
    taken = tmp_path / "shipped_model"  # e.g. a checkpoint someone else registered
    taken.mkdir()
    (taken / "config.json").write_text('{"model_type": "llama"}')
    (taken / "model.safetensors").write_bytes(b"weights")
    before = _files(taken)
    with pytest.raises(reldl.ProgrammingError) as e:
        _train(mem, kind, f", path = {quote(taken)}")
    assert one_line(e.value) == f"CREATE MODEL m: path {str(taken)!r} exists and is not an empty directory"
    assert _files(taken) == before
    _nothing_written(mem)


def test_training_into_a_file_path_is_refused(mem, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    with pytest.raises(reldl.ProgrammingError, match="exists and is not an empty directory"):
        _train(mem, extra=f", path = {quote(f)}")
    assert f.read_text() == "mine"
    _nothing_written(mem)


def test_training_into_an_empty_or_missing_path_works(mem, tmp_path):
    empty, missing = tmp_path / "empty", tmp_path / "a" / "b"
    empty.mkdir()
    _train(mem, extra=f", path = {quote(empty)}")
    mem.execute("DROP MODEL m")
    _train(mem, extra=f", path = {quote(missing)}")
    assert sorted(os.listdir(empty)) == sorted(os.listdir(missing)) == ["config.json", "model.safetensors"]
    assert mem.execute("SELECT count(*) FROM pts WHERE predict('m', x1, x2) BETWEEN 0 AND 1").fetchall() == [(40,)]


def test_or_replace_into_its_own_non_empty_path_is_refused_too(mem, tmp_path):
    """The same rule as the LLM variants: a user's path is never written over, even by the model that wrote it."""
    p = tmp_path / "m"
    _train(mem, extra=f", path = {quote(p)}")
    before, rows = _files(p), mem.execute(PREDICT).fetchall()
    with pytest.raises(reldl.ProgrammingError, match="exists and is not an empty directory"):
        mem.execute(
            TRAIN.format(kind="logistic_reg", extra=f", path = {quote(p)}").replace("CREATE", "CREATE OR REPLACE", 1)
        )
    assert _files(p) == before and mem.execute(PREDICT).fetchall() == rows


def test_default_path_never_overwrites_a_stray_directory(tmp_path):
    stray = tmp_path / "t.db.models" / "m"  # left by something else
    stray.mkdir(parents=True)
    (stray / "config.json").write_text("{}")
    with reldl.connect(str(tmp_path / "t.db")) as conn:
        _pts(conn)
        _train(conn)
        ((path,),) = conn.execute("SELECT path FROM reldl.models").fetchall()
        assert Path(path).parent == stray.parent and Path(path) != stray
        conn.execute("DROP MODEL m")
    assert (stray / "config.json").read_text() == "{}" and not Path(path).exists()


# -- 2. DROP MODEL in a copy of the database never deletes the original's files


@pytest.fixture
def original(tmp_path):
    """t.db with a trained model in its default directory t.db.models/m; yields (db, model dir, predictions)."""
    db = tmp_path / "t.db"
    with reldl.connect(str(db)) as conn:
        _pts(conn)
        _train(conn)
        rows = conn.execute(PREDICT).fetchall()
        ((path,),) = conn.execute("SELECT path FROM reldl.models").fetchall()
    assert Path(path) == tmp_path / "t.db.models" / "m"
    return db, Path(path), rows


def test_owned_dir_is_stored_relative_to_the_databases_models_folder(original):
    db, _, _ = original
    with reldl.connect(str(db)) as conn:
        assert _options(conn)["owned_dirs"] == ["m"] and "owned_by" not in _options(conn)


def _drop_in(db: Path) -> None:
    with reldl.connect(str(db)) as conn:
        conn.execute("DROP MODEL m")
        assert conn.execute("SELECT count(*) FROM reldl.models").fetchall() == [(0,)]


def _still_works(db: Path, model_dir: Path, files, rows) -> None:
    assert _files(model_dir) == files
    with reldl.connect(str(db)) as conn:
        assert conn.execute(PREDICT).fetchall() == rows


def test_drop_in_a_copy_keeps_the_originals_files(original, tmp_path):
    db, model_dir, rows = original
    files = _files(model_dir)
    shutil.copy(db, tmp_path / "copy.db")  # the .db file alone
    _drop_in(tmp_path / "copy.db")
    _still_works(db, model_dir, files, rows)


def test_drop_in_a_copy_with_its_models_dir_removes_only_its_own(original, tmp_path):
    db, model_dir, rows = original
    files = _files(model_dir)
    shutil.copy(db, tmp_path / "copy.db")
    shutil.copytree(tmp_path / "t.db.models", tmp_path / "copy.db.models")
    _drop_in(tmp_path / "copy.db")
    assert not (tmp_path / "copy.db.models" / "m").exists()  # the copy's own directory
    _still_works(db, model_dir, files, rows)


def test_drop_in_a_copy_in_another_folder_keeps_the_originals_files(original, tmp_path):
    db, model_dir, rows = original
    files = _files(model_dir)
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(db, tmp_path / "elsewhere" / "t.db")
    _drop_in(tmp_path / "elsewhere" / "t.db")
    _still_works(db, model_dir, files, rows)


def _old_style(db: Path, owned: list[str]) -> None:
    """Rewrite the row as catalogs written before this fix held it: absolute `owned_dirs`, no `owned_by`."""
    with reldl.connect(str(db)) as conn:
        conn.execute(
            "UPDATE reldl.models SET options = json_merge_patch(options, ?::JSON) WHERE name = 'm'",
            [json.dumps({"owned_dirs": owned})],
        )


def test_old_style_catalog_drop_still_removes_its_own_dir(original):
    db, model_dir, _ = original
    _old_style(db, [str(model_dir)])
    _drop_in(db)
    assert not model_dir.exists()


def test_old_style_catalog_copy_keeps_the_originals_files(original, tmp_path):
    db, model_dir, rows = original
    files = _files(model_dir)
    _old_style(db, [str(model_dir)])
    shutil.copy(db, tmp_path / "copy.db")
    shutil.copytree(tmp_path / "t.db.models", tmp_path / "copy.db.models")
    _drop_in(tmp_path / "copy.db")
    _still_works(db, model_dir, files, rows)


def test_old_style_dir_outside_the_models_folder_is_left_on_disk(original, tmp_path):
    """Ownership of an absolute directory elsewhere (an old offload_dir record) cannot be established: the row
    goes, the files stay."""
    db, _, _ = original
    spill = tmp_path / "spill"
    spill.mkdir()
    (spill / "w.bin").write_bytes(b"x")
    _old_style(db, [str(spill)])
    _drop_in(db)
    assert (spill / "w.bin").read_bytes() == b"x"


def test_owned_dir_outside_the_models_folder_belongs_to_its_database_file(original, tmp_path):
    """A directory reldl made outside `<db>.models/` (an offload_dir) is recorded with the file that made it: a copy
    does not remove it, the original does."""
    db, _, _ = original
    spill = tmp_path / "spill"
    spill.mkdir()
    (spill / "w.bin").write_bytes(b"x")
    with reldl.connect(str(db)) as conn:
        opts = _options(conn)
        opts["owned_dirs"] = [str(spill)]
        catalog.put_model(conn.duckdb_connection, "m", "logistic_reg", str(spill), opts, replace=True)
        assert _options(conn)["owned_dirs"] == [str(spill)]
        assert _options(conn)["owned_by"] == os.path.realpath(db)
    shutil.copy(db, tmp_path / "copy.db")
    _drop_in(tmp_path / "copy.db")
    assert spill.is_dir()
    _drop_in(db)
    assert not spill.exists()


# -- 3. paths that cannot be written: one line, before training


def test_path_that_cannot_be_created_is_one_line_before_training(mem, tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(reldl.ProgrammingError) as e:
        _train(mem, extra=f", path = {quote(f / 'sub')}")
    assert one_line(e.value) == (
        f"CREATE MODEL m: path {str(f / 'sub')!r} cannot be created: {str(f)!r} is not a directory"
    )
    _nothing_written(mem)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_path_is_one_line_before_training(mem, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(reldl.ProgrammingError, match="is not writable"):
            _train(mem, extra=f", path = {quote(ro / 'm')}")
        with pytest.raises(reldl.ProgrammingError, match="is not writable"):
            _train(mem, extra=f", plot = {quote(ro / 'loss.png')}")
    finally:
        ro.chmod(0o700)
    _nothing_written(mem)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="no /proc")
def test_paths_on_pseudo_file_systems_are_refused(mem, tmp_path):
    """As root, os.access calls /proc, /sys and /dev writable: a path there, or reached through a symlink, is refused
    in one line naming it, before training."""
    link = tmp_path / "to_proc"
    link.symlink_to("/proc")
    for given, real in ((link / "m", "/proc/m"), ("/sys/m", "/sys/m"), ("/dev/m", "/dev/m")):
        with pytest.raises(reldl.ProgrammingError) as e:
            _train(mem, extra=f", path = {quote(given)}")
        assert one_line(e.value).startswith(f"CREATE MODEL m: path {real!r} is on a kernel pseudo-file system (")
        _nothing_written(mem)
    assert paths.work_dir("x", tmp_path) == tmp_path.resolve()  # real file systems, tmpfs included, still pass
    if os.path.isdir("/dev/shm"):
        assert paths.pseudo_fs("/dev/shm/m") is None


@pytest.mark.parametrize(
    "where,error",
    [
        ("missing/loss.png", "cannot be written: directory {parent!r} does not exist"),
        ("a_file/loss.png", "cannot be written: {parent!r} is not a directory"),
        (".", "is a directory"),
    ],
)
def test_plot_that_cannot_be_written_fails_before_training(mem, tmp_path, where, error):
    pytest.importorskip("matplotlib")
    (tmp_path / "a_file").write_text("x")
    plot = (tmp_path / where).resolve()
    with pytest.raises(reldl.ProgrammingError) as e:
        _train(mem, extra=f", plot = {quote(plot)}")
    msg = one_line(e.value)
    assert msg.startswith(f"CREATE MODEL m: plot {str(plot)!r} ") and error.format(parent=str(plot.parent)) in msg
    _nothing_written(mem)  # no stale training_jobs entry, no training log
    _train(mem, extra=f", plot = {quote(tmp_path / 'loss.png')}")  # the same statement with a good path trains
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_llm_variant_path_that_cannot_be_created(tmp_path, llama_ckpt):
    """The LLM variants use the same rule (catalog.model_dir)."""
    from sqlhelpers import create_model_sql

    from reldl import registry

    f = tmp_path / "a_file"
    f.write_text("x")
    with reldl.connect() as conn:
        conn.execute(create_model_sql("base", llama_ckpt))
        conn.execute("CREATE TABLE corpus AS SELECT 'the cat sat on the mat' AS text")
        with pytest.raises(reldl.ProgrammingError) as e:
            conn.execute(
                "CREATE MODEL fast OPTIONS (model_type = 'llm', base = 'base', sparsity = 0.5, "
                f"path = {quote(f / 'sub')}) AS SELECT text FROM corpus"
            )
        assert one_line(e.value).endswith(f"cannot be created: {str(f)!r} is not a directory")
        assert conn.execute("SELECT name FROM reldl.models").fetchall() == [("base",)]
    registry.unload()
