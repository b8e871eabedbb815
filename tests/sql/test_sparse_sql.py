"""Sparse variants from SQL: CREATE MODEL fast OPTIONS (model_type = 'llm', base = ..., sparsity = ...) AS SELECT text
FROM corpus, llm_generate with the variant, EXPLAIN's per-layer sparsity, one-line errors that leave the catalog as
it was."""

from __future__ import annotations

import json
from pathlib import Path

import checkpoints as ck
import pytest
from sqlhelpers import MODEL, create_model_sql, one_line, quote, usable

import reldl
from reldl import registry


@pytest.fixture(scope="module")
def opt_ckpt(ckpt_root) -> Path:
    return ck.make_checkpoint(ckpt_root / "opt_sparse", "opt")


def _corpus(conn, n: int = 80) -> None:
    conn.execute("CREATE TABLE corpus AS SELECT unnest(?) AS text", [ck.corpus_sentences(n, seed=3)])


def _create(name: str, base: str, sparsity=0.8, extra: str = "", query: str = "SELECT text FROM corpus", verb="CREATE"):
    return (
        f"{verb} MODEL {name} OPTIONS (model_type = 'llm', base = {quote(base)}, sparsity = {sparsity}, epochs = 2"
        f"{extra}) AS {query}"
    )


def _rows(conn) -> list:
    return conn.execute("SELECT name, path, options FROM reldl.models ORDER BY name").fetchall()


def test_create_generate_explain_dejavu(conn, opt_ckpt):
    conn.execute(create_model_sql("base", opt_ckpt))
    _corpus(conn)
    conn.execute(_create("fast", "base", 0.75))
    ((name, path, options),) = [r for r in _rows(conn) if r[0] == "fast"]
    opts = json.loads(options)
    assert opts["method"] == "dejavu" and opts["base"] == "base" and opts["sparsity"] == 0.75
    assert opts["sparse_dir"] == path and (Path(path) / "sparse.json").is_file()
    assert [lay["layer"] for lay in opts["layers"]] == [0, 1]
    assert all(0 < lay["recall"] <= 1 and lay["fraction_selected"] == 0.25 for lay in opts["layers"])
    # the variant runs through llm_generate unchanged, beside its dense base
    sql = "SELECT llm_generate('Alice went to', model := {m}, max_tokens := 5)"
    fast = conn.execute(sql.format(m="'fast'")).fetchall()[0][0]
    dense = conn.execute(sql.format(m="'base'")).fetchall()[0][0]
    assert isinstance(fast, str) and isinstance(dense, str)
    lines = [r[0] for r in conn.execute(f"EXPLAIN {sql.format(m=quote('fast'))}").fetchall()]
    assert any("sparse model fast" in ln and "DejaVu" in ln for ln in lines)
    layer_lines = [ln for ln in lines if ln.strip().startswith("layer ")]
    assert len(layer_lines) == 2 and "75.0% sparse" in layer_lines[0] and "recall" in layer_lines[0]
    dense_lines = [r[0] for r in conn.execute(f"EXPLAIN {sql.format(m=quote('base'))}").fetchall()]
    assert not any("sparse model" in ln for ln in dense_lines)
    registry.unload("fast")
    registry.unload("base")


def test_llama_auto_is_teal_and_or_replace(llm):
    _corpus(llm, 40)
    llm.execute(_create("fast", MODEL, 0.5))
    opts = json.loads(_rows(llm)[0][2])
    assert opts["method"] == "teal" and len(opts["layers"]) == 2
    out = llm.execute("SELECT llm_generate('The product is', model := 'fast', max_tokens := 4)").fetchall()[0][0]
    assert isinstance(out, str)
    lines = [r[0] for r in llm.execute("EXPLAIN SELECT llm_generate('x', model := 'fast')").fetchall()]
    assert any("TEAL" in ln for ln in lines) and any("layer 1: input" in ln for ln in lines)
    with pytest.raises(reldl.IntegrityError) as e:
        llm.execute(_create("fast", MODEL, 0.9))
    one_line(e.value)
    llm.execute(_create("fast", MODEL, 0.9, verb="CREATE OR REPLACE"))
    assert json.loads(_rows(llm)[0][2])["sparsity"] == 0.9
    registry.unload("fast")


@pytest.mark.parametrize(
    "stmt, match",
    [
        (_create("bad", "nope"), "base model 'nope' does not exist"),
        (_create("bad", "tab"), "not an LLM"),
        (_create("bad", MODEL, 0), r"sparsity' must be a number in \(0, 1\)"),
        (_create("bad", MODEL, 1), r"sparsity' must be a number in \(0, 1\)"),
        (_create("bad", MODEL, "'lots'"), "sparsity"),
        (_create("bad", MODEL, extra=", method = 'dejavu'"), "method 'dejavu' needs a ReLU/GELU MLP"),
        (_create("bad", MODEL, extra=", method = 'magic'"), "method must be one of"),
        (_create("bad", MODEL, extra=", colour = 'red'"), "unknown option"),
        (_create("bad", MODEL, query="SELECT text FROM corpus WHERE false"), "returned no text"),
        (_create("bad", MODEL, query="SELECT text, text FROM corpus"), "one text column"),
        (_create("bad", MODEL, query="SELECT 42"), "must be text"),
        (_create("bad", MODEL, query="SELECT * FROM missing_table"), "missing_table"),
        (
            f"CREATE MODEL bad OPTIONS (model_type = 'llm', base = {quote(MODEL)}, sparsity = 0.5)",
            "AS SELECT text FROM calibration_corpus",
        ),
    ],
)
def test_errors_are_one_line_and_leave_the_catalog(llm, stmt, match):
    _corpus(llm, 10)
    llm.execute("INSERT INTO reldl.models (name, model_type, path, options) VALUES ('tab', 'mlp', '/nowhere', '{}')")
    before = _rows(llm)
    with pytest.raises(reldl.Error, match=match) as e:
        llm.execute(stmt)
    one_line(e.value)
    assert _rows(llm) == before
    usable(llm)
