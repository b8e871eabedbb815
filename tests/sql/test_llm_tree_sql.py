"""`llm_generate(..., n := k)` and `llm_generate(..., beam_width := k)`: a LIST(VARCHAR) per row (samples, or beams
best first), through every plan, EXPLAIN, the result cache, argument errors and plain DuckDB after install()."""

from __future__ import annotations

import duckdb
import pytest
from sqlhelpers import MODEL, create_model_sql, one_line, usable

import reldl
from reldl import registry
from reldl.llm import SamplingParams


def engine(path):
    return registry.get_engine(MODEL, str(path), "float32", "cpu")


@pytest.fixture
def reviews(llm):
    llm.execute(
        "CREATE TABLE r AS SELECT * FROM (VALUES (1, 'Bob bought'), (2, 'The cat'), (3, 'Bob bought'), (4, NULL)) "
        "AS t(id, p)"
    )
    return llm


def test_greedy_n_samples_are_n_copies(llm):
    one = llm.execute("SELECT llm_generate('Bob bought', max_tokens := 6)").fetchall()[0][0]
    rows = llm.execute("SELECT llm_generate('Bob bought', max_tokens := 6, n := 3)").fetchall()
    assert rows == [([one] * 3,)]
    typ = llm.execute("SELECT typeof(llm_generate('Bob bought', max_tokens := 2, n := 2))").fetchall()
    assert typ == [("VARCHAR[]",)]


def test_seeded_samples_same_in_every_plan(reviews, llama_ckpt):
    sql = "SELECT id, llm_generate(p, max_tokens := 6, temperature := 1.0, seed := 5, n := 4) AS s FROM r ORDER BY id"
    got = {}
    for plan in ("udf", "dl"):
        reviews.execute(f"SET reldl_plan = '{plan}'")
        got[plan] = reviews.execute(sql).fetchall()
    assert got["udf"] == got["dl"]
    rows = got["udf"]
    assert rows[3] == (4, None)  # NULL prompt, NULL list
    assert rows[0][1] == rows[2][1] and len(rows[0][1]) == 4  # same prompt and seed: same samples
    assert len(set(rows[0][1])) > 1  # the samples differ
    want = engine(llama_ckpt).generate(["Bob bought"], SamplingParams(max_tokens=6, temperature=1.0, seed=5, n=4))[0]
    assert rows[0][1] == want.texts


def test_beam_search(reviews, llama_ckpt):
    rows = reviews.execute("SELECT llm_generate(p, max_tokens := 5, beam_width := 3) FROM r ORDER BY id").fetchall()
    want = engine(llama_ckpt).generate(["Bob bought", "The cat"], SamplingParams(max_tokens=5, beam_width=3))
    assert [r[0] for r in rows] == [want[0].texts, want[1].texts, want[0].texts, None]
    assert all(len(r[0]) == 3 for r in rows[:3])


def test_mixed_calls_and_cache_keys(reviews):
    """n and beam_width are part of the result cache key and of the DL plan's deduplication."""
    sql = (
        "SELECT llm_generate(p, max_tokens := 4) AS a, llm_generate(p, max_tokens := 4, n := 2) AS b, "
        "llm_generate(p, max_tokens := 4, n := 3) AS c, llm_generate(p, max_tokens := 4, beam_width := 2) AS d "
        "FROM r WHERE id = 1"
    )
    for plan in ("udf", "dl"):
        reviews.execute(f"SET reldl_plan = '{plan}'")
        a, b, c, d = reviews.execute(sql).fetchall()[0]
        assert b == [a] * 2 and c == [a] * 3 and len(d) == 2


def test_explain_shows_the_list_call(reviews):
    lines = [
        r[0]
        for r in reviews.execute("EXPLAIN SELECT llm_generate(p, max_tokens := 4, beam_width := 2) FROM r").fetchall()
    ]
    text = "\n".join(lines)
    assert "llm_generate_list(" in text
    assert "relation-centric: not for LLM calls" in text
    unseeded = "EXPLAIN SELECT llm_generate(p, max_tokens := 4, temperature := 1.0, n := 2) FROM r"
    assert "sampling without a seed" in "\n".join(r[0] for r in reviews.execute(unseeded).fetchall())


BAD = [
    ("n := 0", "n must be an integer from 1 to 64, got 0"),
    ("n := 65", "n must be an integer from 1 to 64, got 65"),
    ("beam_width := 0", "beam_width must be an integer from 1 to 64, got 0"),
    ("beam_width := 2, temperature := 0.5", "temperature 0"),
    ("beam_width := 2, n := 2", "cannot be combined"),
    ("beam_width := 2, stop := 'x'", "stop"),
]


@pytest.mark.parametrize("args, words", BAD)
def test_bad_values(llm, args, words):
    with pytest.raises(reldl.ProgrammingError) as info:
        llm.execute(f"SELECT llm_generate('x', max_tokens := 2, {args})").fetchall()
    msg = one_line(info.value)
    assert words in msg and "llm_generate" in msg, msg
    usable(llm)


def test_qualified_and_unrelated_calls_untouched():
    from reldl.planner.statements import list_generate_sql

    sql = "SELECT llm_generate(p, n := 2), s.llm_generate(p, n := 2), llm_generate(p, max_tokens := 3) FROM t"
    assert list_generate_sql(sql) == (
        "SELECT llm_generate_list(p, n := 2), s.llm_generate(p, n := 2), llm_generate(p, max_tokens := 3) FROM t"
    )


def test_plain_duckdb_calls_llm_generate_list(llama_ckpt, llm):
    duck = duckdb.connect()
    try:
        reldl.install(duck)
        reldl.register_model(duck, "plain", str(llama_ckpt), dtype="float32", device="cpu")
        out = duck.execute("SELECT llm_generate_list('Bob bought', max_tokens := 5, beam_width := 2)").fetchall()
        want = llm.execute(f"SELECT llm_generate('Bob bought', model := '{MODEL}', max_tokens := 5, beam_width := 2)")
        assert out == want.fetchall()
    finally:
        duck.close()


def test_create_table_as_with_samples(llm, llama_ckpt):
    llm.execute(create_model_sql("other_name", llama_ckpt))
    llm.execute(
        "CREATE TABLE out AS SELECT llm_generate('Bob bought', model := 'other_name', max_tokens := 3, n := 2) AS s"
    )
    assert llm.execute("SELECT len(s) FROM out").fetchall() == [(2,)]
