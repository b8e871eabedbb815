"""llm_generate / llm_score from SQL: arguments, NULLs, deduplication, sampling, stop strings, context limits,
agreement with the engine and with transformers, concurrent cursors, and plain DuckDB after reldl.install()."""

from __future__ import annotations

import threading

import checkpoints as ck
import duckdb
import pytest
from sqlhelpers import MODEL, create_model_sql, one_line, quote, usable

import reldl
from reldl import registry
from reldl.llm import Engine, SamplingParams

PROMPTS = ck.corpus_sentences(40, seed=7)


def engine(path) -> Engine:
    return registry.get_engine(MODEL, str(path), "float32", "cpu")


def gen1(conn, prompt: str, args: str = "max_tokens := 8"):
    return conn.execute(f"SELECT llm_generate(?, {args})", [prompt]).fetchall()[0][0]


@pytest.fixture
def count_prompts(monkeypatch):
    """Records, per call of Engine.generate_ids, how many prompts it was given."""
    calls: list[int] = []
    original = Engine.generate_ids

    def spy(self, prompts, params, **kw):
        calls.append(len(prompts))
        return original(self, prompts, params, **kw)

    monkeypatch.setattr(Engine, "generate_ids", spy)
    return calls


# ---------------------------------------------------------------------------------------------- model resolution


def test_returns_varchar(llm):
    cur = llm.execute("SELECT llm_generate('Hello', max_tokens := 3) AS g, typeof(llm_generate('Hello')) AS t")
    (g, t), *_ = cur.fetchall()
    assert isinstance(g, str) and t == "VARCHAR"
    assert [d[0] for d in cur.description] == ["g", "t"]


def test_model_named_or_omitted(llm, llama_ckpt):
    named = gen1(llm, "The cable is", f"model := '{MODEL}', max_tokens := 8")
    omitted = gen1(llm, "The cable is")
    assert named == omitted == engine(llama_ckpt).generate(["The cable is"], SamplingParams(max_tokens=8))[0].text


def test_no_model_registered(conn):
    with pytest.raises(reldl.ProgrammingError) as info:
        conn.execute("SELECT llm_generate('x')").fetchall()
    msg = one_line(info.value)
    assert "CREATE MODEL" in msg and "model_type" in msg
    usable(conn)


def test_two_models_need_model_argument(llm, other_ckpt):
    llm.execute(create_model_sql("second", other_ckpt))
    with pytest.raises(reldl.ProgrammingError) as info:
        llm.execute("SELECT llm_generate('x')").fetchall()
    msg = one_line(info.value)
    assert MODEL in msg and "second" in msg and "model :=" in msg
    with pytest.raises(reldl.ProgrammingError) as info:
        llm.execute("SELECT llm_score('x', 'y')").fetchall()
    assert "second" in one_line(info.value)
    a = gen1(llm, "Hello there", f"model := '{MODEL}'")
    b = gen1(llm, "Hello there", "model := 'second'")
    assert a != b
    usable(llm)


def test_model_per_row(llm, other_ckpt, llama_ckpt):
    llm.execute(create_model_sql("second", other_ckpt))
    rows = llm.execute(
        f"SELECT m, llm_generate('The box is', model := m, max_tokens := 5) FROM (VALUES ('{MODEL}'), ('second'), "
        f"('{MODEL}')) v(m)"
    ).fetchall()
    exp_a = engine(llama_ckpt).generate(["The box is"], SamplingParams(max_tokens=5))[0].text
    exp_b = (
        registry.get_engine("second", str(other_ckpt), "float32", "cpu")
        .generate(["The box is"], SamplingParams(max_tokens=5))[0]
        .text
    )
    assert sorted(rows) == sorted([(MODEL, exp_a), ("second", exp_b), (MODEL, exp_a)])


def test_unknown_model(llm):
    with pytest.raises(reldl.ProgrammingError) as info:
        llm.execute("SELECT llm_generate('x', model := 'nope')").fetchall()
    assert "nope" in one_line(info.value)
    usable(llm)


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture
def reviews(llm):
    """1,000 rows: 40 distinct sentences, plus NULLs and empty strings, each repeated many times."""
    llm.execute("CREATE TABLE sentences (k INTEGER, s VARCHAR)")
    llm.cursor().executemany("INSERT INTO sentences VALUES (?, ?)", list(enumerate(PROMPTS)))
    llm.execute(
        """
        CREATE TABLE reviews AS
        SELECT i AS id,
               CASE WHEN i % 11 = 0 THEN NULL WHEN i % 13 = 0 THEN '' ELSE s END AS prompt
        FROM range(1000) r(i) JOIN sentences ON k = i % 40
        """
    )
    return llm


def test_thousand_rows(reviews, llama_ckpt, count_prompts):
    rows = reviews.execute(
        "SELECT id, prompt, llm_generate(prompt, max_tokens := 4) AS out FROM reviews ORDER BY id"
    ).fetchall()
    assert len(rows) == 1000
    assert [r[0] for r in rows] == list(range(1000))
    distinct = sorted({p for _, p, _ in rows if p is not None})
    assert "" in distinct and len(distinct) == 41
    # identical prompts are generated once
    assert sum(count_prompts) == len(distinct)
    by_prompt: dict[str, str] = {}
    for _, p, out in rows:
        if p is None:
            assert out is None  # NULL in, NULL out
            continue
        assert isinstance(out, str)
        assert by_prompt.setdefault(p, out) == out  # duplicates give identical outputs
    assert sum(p is None for _, p, _ in rows) == sum(i % 11 == 0 for i in range(1000))
    # the same as calling the engine directly
    results = engine(llama_ckpt).generate(distinct, SamplingParams(max_tokens=4))
    assert {p: r.text for p, r in zip(distinct, results)} == by_prompt
    assert all(len(r.token_ids) <= 4 for r in results)
    # the table is untouched
    assert reviews.execute("SELECT count(*), count(prompt) FROM reviews").fetchall() == [
        (1000, 1000 - sum(i % 11 == 0 for i in range(1000)))
    ]


def test_aggregates_over_generated_text(reviews):
    out = reviews.execute(
        """
        SELECT count(*), count(g), count(DISTINCT g) <= 41
        FROM (SELECT llm_generate(prompt, max_tokens := 2) AS g FROM reviews)
        """
    ).fetchall()
    assert out == [(1000, 1000 - sum(i % 11 == 0 for i in range(1000)), True)]


def test_dedup_with_literal_prompts(llm, count_prompts):
    rows = llm.execute(
        "SELECT llm_generate(p, max_tokens := 3) FROM (VALUES ('a b'), ('a b'), (NULL), ('c d'), ('a b')) v(p)"
    ).fetchall()
    assert sum(count_prompts) == 2
    assert rows[0] == rows[1] == rows[4] and rows[2] == (None,)


def test_null_prompt(llm, count_prompts):
    assert llm.execute("SELECT llm_generate(NULL)").fetchall() == [(None,)]
    assert llm.execute("SELECT llm_generate(NULL::VARCHAR, max_tokens := 3)").fetchall() == [(None,)]
    assert count_prompts == []


def test_max_tokens_zero(llm):
    assert llm.execute("SELECT llm_generate('Hello', max_tokens := 0)").fetchall() == [("",)]


def test_empty_prompt(llm):
    out = llm.execute("SELECT llm_generate('', max_tokens := 3)").fetchall()[0][0]
    assert isinstance(out, str)


# ---------------------------------------------------------------------------------------------- sampling


def test_seeded_sampling_is_reproducible(llm):
    args = "max_tokens := 8, temperature := 1.0, top_p := 0.9, top_k := 50, seed := 1234"
    a = gen1(llm, "Honestly, this lamp", args)
    b = gen1(llm, "Honestly, this lamp", args)  # a separate query
    c = llm.cursor().execute(f"SELECT llm_generate('Honestly, this lamp', {args})").fetchall()[0][0]
    assert a == b == c
    rows = llm.execute(f"SELECT llm_generate('Honestly, this lamp', {args}) FROM range(5)").fetchall()
    assert rows == [(a,)] * 5
    others = {gen1(llm, "Honestly, this lamp", args.replace("1234", str(s))) for s in range(8)}
    assert len(others) > 1  # the seed matters


def test_unseeded_sampling_varies(llm, count_prompts):
    rows = llm.execute(
        "SELECT llm_generate('The phone is', max_tokens := 8, temperature := 1.5) FROM range(20)"
    ).fetchall()
    assert len(rows) == 20 and all(isinstance(r[0], str) for r in rows)
    assert len(set(rows)) > 1
    assert sum(count_prompts) == 20  # not deduplicated


def test_greedy_ignores_seed(llm):
    assert gen1(llm, "The desk", "max_tokens := 6, seed := 1") == gen1(llm, "The desk", "max_tokens := 6, seed := 2")


# ---------------------------------------------------------------------------------------------- stop strings


def _stop_chars(text: str) -> list[str]:
    chars = [ch for ch in text[1:] if ch.isascii() and ch.isalnum()]
    assert len(chars) >= 2, f"greedy output too short to pick stop strings: {text!r}"
    return chars


def test_stop_string(llm):
    prompt = "After a week this charger"
    full = gen1(llm, prompt, "max_tokens := 24")
    a, b = _stop_chars(full)[:2]
    single = gen1(llm, prompt, f"max_tokens := 24, stop := {quote(a)}")
    assert a not in single
    assert single == full[: full.index(a)]
    both = gen1(llm, prompt, f"max_tokens := 24, stop := [{quote(a)}, {quote(b)}]")
    assert a not in both and b not in both
    assert both == full[: min(full.index(a), full.index(b))]
    absent = gen1(llm, prompt, "max_tokens := 24, stop := ['\u00a7\u00a7', 'zzzzqq']")
    assert absent == full


def test_stop_over_a_table(reviews):
    rows = reviews.execute(
        "SELECT prompt, llm_generate(prompt, max_tokens := 12, stop := ['e', 'a']) FROM reviews WHERE prompt <> ''"
    ).fetchall()
    assert rows and all("e" not in out and "a" not in out for _, out in rows)


# ---------------------------------------------------------------------------------------------- context limit


def test_prompt_longer_than_context(llm, llama_ckpt):
    prompt = " ".join(ck.corpus_sentences(60, seed=3))
    eng = engine(llama_ckpt)
    n = len(eng.encode(prompt))
    assert n > eng.context_length == 256
    with pytest.raises(reldl.DataError) as info:
        llm.execute("SELECT llm_generate(?, max_tokens := 4)", [prompt]).fetchall()
    msg = one_line(info.value)
    assert str(n) in msg and "256" in msg
    usable(llm)
    out = gen1(llm, prompt, "max_tokens := 4, truncate := 'left'")
    assert isinstance(out, str)
    assert out == eng.generate([prompt], SamplingParams(max_tokens=4), truncate="left")[0].text
    # prompts that fit are unaffected by truncate := 'left'
    assert gen1(llm, "The box", "max_tokens := 4, truncate := 'left'") == gen1(llm, "The box", "max_tokens := 4")


def test_long_prompt_among_short_ones(llm):
    long = " ".join(ck.corpus_sentences(60, seed=3))
    llm.execute("CREATE TABLE p AS SELECT * FROM (VALUES (1, 'short one'), (2, ?)) v(id, prompt)", [long])
    with pytest.raises(reldl.DataError):
        llm.execute("SELECT llm_generate(prompt, max_tokens := 2) FROM p").fetchall()
    rows = llm.execute("SELECT id, llm_generate(prompt, max_tokens := 2, truncate := 'left') FROM p ORDER BY id")
    assert [r[0] for r in rows.fetchall()] == [1, 2]


# ---------------------------------------------------------------------------------------------- bad arguments

BAD_ARGS = [
    ("'x', colour := 'red'", ["colour"]),
    ("'x', max_tokens := -1", ["max_tokens", "-1"]),
    ("'x', top_p := 0.0", ["top_p"]),
    ("'x', top_p := 1.5", ["top_p", "1.5"]),
    ("'x', temperature := -0.5", ["temperature"]),
    ("'x', top_k := -3", ["top_k"]),
    ("'x', truncate := 'right'", ["truncate", "right"]),
    ("'x', stop := ''", ["stop"]),
    ("'x', max_tokens := 2, max_tokens := 3", ["max_tokens"]),
    ("'x', 'sql_tiny'", ["positional"]),
    ("", ["positional"]),
]


@pytest.mark.parametrize("args, words", BAD_ARGS)
def test_bad_arguments(llm, args, words):
    with pytest.raises(reldl.ProgrammingError) as info:
        llm.execute(f"SELECT llm_generate({args})").fetchall()
    msg = one_line(info.value)
    for w in words:
        assert w in msg, (w, msg)
    assert "llm_generate" in msg
    usable(llm)


@pytest.mark.parametrize("args", ["'x', 'y', colour := 1", "'x'", "'x', 'y', 'z'"])
def test_bad_score_arguments(llm, args):
    with pytest.raises(reldl.ProgrammingError) as info:
        llm.execute(f"SELECT llm_score({args})").fetchall()
    assert "llm_score" in one_line(info.value)
    usable(llm)


# ---------------------------------------------------------------------------------------------- llm_score


def test_llm_score_matches_transformers(llm, llama_ckpt):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    pairs = [
        ("The product is", " great."),
        ("Rating: 5/5 -", " Excellent phone, quiet cable!"),
        ("Q: Is the lamp bright?\nA:", " Yes, it is dull."),
        ("", " hello"),
        ("Hello", ""),
    ]
    cur = llm.cursor()
    cur.execute("CREATE TABLE pairs (id INTEGER, p VARCHAR, c VARCHAR)")
    cur.executemany("INSERT INTO pairs VALUES (?, ?, ?)", [(i, p, c) for i, (p, c) in enumerate(pairs)])
    cur.execute("INSERT INTO pairs VALUES (100, NULL, ' x'), (101, 'x', NULL), (102, NULL, NULL)")
    cur.execute("SELECT id, llm_score(p, c), typeof(llm_score(p, c)) FROM pairs ORDER BY id")
    rows = cur.fetchall()
    assert rows[-3:] == [(100, None, "DOUBLE"), (101, None, "DOUBLE"), (102, None, "DOUBLE")]

    tok = Tokenizer.from_file(str(llama_ckpt / "tokenizer.json"))
    ref = ck.load_reference(llama_ckpt)
    for (i, got, _), (p, c) in zip(rows, pairs):
        ctx = tok.encode(p).ids
        cont = tok.encode(c, add_special_tokens=False).ids
        with torch.no_grad():
            logits = ref(torch.tensor([ctx + cont])).logits[0].double()
        lp = logits.log_softmax(-1)
        want = sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
        assert isinstance(got, float)
        assert got == pytest.approx(want, abs=1e-4), (i, p, c)
    assert rows[4][1] == 0.0  # empty continuation
    named = llm.execute(f"SELECT llm_score('The product is', ' great.', model := '{MODEL}')").fetchall()[0][0]
    assert named == pytest.approx(rows[0][1], abs=1e-9)


def test_llm_score_ranks_continuations(llm):
    rows = llm.execute(
        "SELECT c, llm_score('The product is', c) AS s FROM (VALUES (' great'), (' terrible'), ('!!')) v(c) "
        "ORDER BY s DESC"
    ).fetchall()
    assert len(rows) == 3 and all(s < 0 for _, s in rows)
    assert [s for _, s in rows] == sorted((s for _, s in rows), reverse=True)


# ---------------------------------------------------------------------------------------------- concurrency


def test_two_threads_two_cursors(llm):
    llm.execute("CREATE TABLE ta AS SELECT i AS id, 'Alice bought ' || (i % 7) || ' cables' AS p FROM range(60) r(i)")
    llm.execute("CREATE TABLE tb AS SELECT i AS id, 'The lamp is ' || (i % 9) || ' times' AS p FROM range(60) r(i)")
    queries = {
        "ta": "SELECT id, llm_generate(p, max_tokens := 5) FROM ta ORDER BY id",
        "tb": "SELECT id, llm_generate(p, max_tokens := 5, temperature := 0.7, seed := 3) FROM tb ORDER BY id",
    }
    expected = {k: llm.execute(q).fetchall() for k, q in queries.items()}
    results: dict[str, list] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def work(key: str) -> None:
        try:
            cur = llm.cursor()
            barrier.wait(timeout=30)
            for _ in range(2):
                results.setdefault(key, []).append(cur.execute(queries[key]).fetchall())
            cur.close()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in queries]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    for k in queries:
        assert results[k] == [expected[k], expected[k]]
    usable(llm)


# ---------------------------------------------------------------------------------------------- named arguments


def test_named_arguments_through_connection_execute(llm):
    a = llm.execute("SELECT llm_generate('Bob bought', max_tokens := 5, temperature := 0.0)").fetchall()
    b = llm.execute("SELECT llm_generate(prompt := 'Bob bought', max_tokens := 5)").fetchall()
    c = llm.execute("SELECT llm_generate('Bob bought', temperature := 0.0, model := ?, max_tokens := ?)", [MODEL, 5])
    assert a == b == c.fetchall()
    assert len(a[0][0]) > 0


def test_named_arguments_on_plain_duckdb_after_install(llama_ckpt):
    duck = duckdb.connect()
    try:
        reldl.install(duck)
        with pytest.raises(duckdb.Error, match="CREATE MODEL"):  # no model yet: the error says how to register
            duck.execute("SELECT llm_generate('x')").fetchall()
        reldl.register_model(duck, "plain", str(llama_ckpt), dtype="float32", device="cpu")
        out = duck.execute("SELECT llm_generate('Bob bought', max_tokens := 5, temperature := 0.0)").fetchall()
        named = duck.execute("SELECT llm_generate('Bob bought', model := 'plain', max_tokens := 5)").fetchall()
        sampled = (
            "SELECT llm_generate('Bob bought', max_tokens := 5, temperature := 1.0, seed := 9, stop := ['zz', 'q'])"
        )
        seeded = duck.execute(sampled).fetchall()
        score = duck.execute("SELECT llm_score('Bob bought', ' two', model := 'plain')").fetchall()
        nulls = duck.execute("SELECT llm_generate(NULL), llm_score(NULL, 'x')").fetchall()
        assert nulls == [(None, None)]
        with pytest.raises(duckdb.Error, match="max_tokens"):
            duck.execute("SELECT llm_generate('x', max_tokens := -2)").fetchall()
        with reldl.connect() as c:  # the same answers as through reldl.connect()
            c.execute(create_model_sql("plain", llama_ckpt))
            assert out == named == c.execute("SELECT llm_generate('Bob bought', max_tokens := 5)").fetchall()
            assert seeded == c.execute(sampled).fetchall()
            assert score == c.execute("SELECT llm_score('Bob bought', ' two')").fetchall()
        # the macros are per DuckDB connection: install() on a cursor of the same database too
        cur = duck.cursor()
        reldl.install(cur)
        assert cur.execute("SELECT llm_generate('Bob bought', max_tokens := 5)").fetchall() == out
        cur.close()
        assert duck.execute("SELECT llm_generate('Bob bought', max_tokens := 5)").fetchall() == out
    finally:
        duck.close()
