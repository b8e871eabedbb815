"""The planner on statements with LLM calls: every plan gives the same rows; EXPLAIN says what runs and why."""

from __future__ import annotations

import pytest

import reldl

QUERY = "SELECT id, llm_generate(prompt, max_tokens := 4) AS g FROM t ORDER BY id"


@pytest.fixture
def con(llama_path):
    con = reldl.connect()
    con.execute(f"CREATE MODEL m OPTIONS (model_type = 'llm', path = '{llama_path}')")
    con.execute(
        "CREATE TABLE t AS SELECT i AS id, CASE WHEN i % 5 = 0 THEN NULL WHEN i % 7 = 0 THEN '' "
        "ELSE 'p ' || (i % 17)::VARCHAR END AS prompt FROM range(120) t(i)"
    )
    yield con
    con.close()


def _explain(con, sql: str) -> str:
    return "\n".join(r[0] for r in con.execute("EXPLAIN " + sql).fetchall())


@pytest.mark.parametrize(
    "sql",
    [
        QUERY,
        "SELECT id, llm_generate(prompt, max_tokens := 3, stop := ['a', 'b']) AS g FROM t WHERE id > 10 ORDER BY id",
        "SELECT count(*), count(DISTINCT llm_generate(prompt, max_tokens := 2)) FROM t",
        "SELECT id, llm_score(prompt, ' x') AS s FROM t ORDER BY id",
        "SELECT id, llm_generate(prompt, max_tokens := 3, temperature := 0.7, seed := 5) FROM t ORDER BY id",
    ],
)
def test_all_plans_give_the_same_rows(con, sql):
    rows = {}
    for mode in ("udf", "dl"):
        con.execute(f"SET reldl_plan = '{mode}'")
        rows[mode] = con.execute(sql).fetchall()
    con.execute("RESET reldl_plan")
    rows["auto"] = con.execute(sql).fetchall()
    assert rows["udf"] == rows["dl"] == rows["auto"]


def test_dl_plan_with_create_table_as_and_insert(con):
    con.execute("SET reldl_plan = 'dl'")
    con.execute("CREATE TABLE o AS SELECT id, llm_generate(prompt, max_tokens := 3) AS g FROM t")
    con.execute("INSERT INTO o SELECT id + 1000, llm_generate(prompt, max_tokens := 3) FROM t WHERE id < 10")
    con.execute("SET reldl_plan = 'udf'")
    want = con.execute("SELECT id, llm_generate(prompt, max_tokens := 3) FROM t ORDER BY id").fetchall()
    assert con.execute("SELECT id, g FROM o WHERE id < 1000 ORDER BY id").fetchall() == want
    assert con.execute("SELECT count(*) FROM o").fetchall() == [(130,)]


def test_explain_shows_choice_costs_and_sql(con):
    text = _explain(con, QUERY)
    assert text.startswith("reldl plan: ")
    assert "DL-centric" in text and "UDF-centric" in text and "estimated" in text
    assert "llm_generate(prompt, max_tokens := 4)" in text
    con.execute("SET reldl_plan = 'dl'")
    forced = _explain(con, QUERY)
    assert "DL-centric (forced by SET reldl_plan)" in forced


def test_explain_analyze_reports_stages(con):
    con.execute("SET reldl_plan = 'dl'")
    text = "\n".join(r[0] for r in con.execute("EXPLAIN ANALYZE " + QUERY).fetchall())
    assert "distinct input rows" in text and " ms" in text


@pytest.mark.parametrize(
    "sql, why",
    [
        ("SELECT (SELECT llm_generate(prompt, max_tokens := 2)) FROM t", "subquery"),
        ("SELECT llm_generate(prompt, max_tokens := 2, temperature := 0.5) FROM t", "sampling without a seed"),
        ("SELECT llm_generate('hi', max_tokens := 2)", "without FROM"),
    ],
)
def test_shapes_the_planner_does_not_rewrite_run_udf_centric(con, sql, why):
    text = _explain(con, sql)
    assert text.startswith("reldl plan: UDF-centric") and why in text
    assert con.execute(sql).fetchall()


def test_bad_options(con):
    with pytest.raises(reldl.ProgrammingError, match="reldl_plan must be one of"):
        con.execute("SET reldl_plan = 'fast'")
    with pytest.raises(reldl.ProgrammingError, match="unknown reldl option"):
        con.execute("SET reldl_speed = 'x'")
    con.execute("SET reldl_plan = 'relation'")
    with pytest.raises(reldl.ProgrammingError, match="not possible"):
        con.execute(QUERY)
    con.execute("RESET reldl_plan")
    assert con.execute(QUERY).fetchall()


def test_plain_statements_still_pass_through(con):
    assert con.execute("EXPLAIN SELECT 1").fetchall()  # DuckDB's own EXPLAIN
    assert con.execute("SELECT count(*) FROM t").fetchall() == [(120,)]
