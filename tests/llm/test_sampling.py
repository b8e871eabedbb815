"""Token selection (`reldl.llm.sampling`) and the request options of `Engine.generate`."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import checkpoints as ck  # noqa: E402  (tests/ is put on sys.path by tests/conftest.py)

from reldl.errors import DataError  # noqa: E402
from reldl.llm import SamplingParams  # noqa: E402
from reldl.llm.sampling import filter_logits, sample, uniform_noise  # noqa: E402
from reldl.registry import get_engine  # noqa: E402

PROMPTS = ["The phone is really", "Order #1234 shipped on", "Q: Is the lamp cheap?\nA:", "I think"]


@pytest.fixture(scope="module")
def engine(llama_path):
    return get_engine("test_sampling_llama", str(llama_path), dtype="float32", device="cpu")


def _sample(logits, temperature=0.0, top_k=0, top_p=1.0, seeds=None, steps=None):
    """`sample()` with per-row scalars broadcast to the batch."""
    B = logits.shape[0]
    seeds = torch.zeros(B, dtype=torch.long) if seeds is None else seeds
    steps = torch.zeros(B, dtype=torch.long) if steps is None else steps
    return sample(
        logits,
        torch.full((B,), float(temperature)),
        torch.full((B,), int(top_k), dtype=torch.long),
        torch.full((B,), float(top_p)),
        seeds,
        steps,
    )


def _chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    assert counts[probs == 0].sum() == 0, "drew a token of probability 0"
    keep = probs > 0
    expected = probs[keep].double() * n
    return float(((counts[keep] - expected) ** 2 / expected).sum())


# --------------------------------------------------------------------------------------------------
# sample() / filter_logits() directly
# --------------------------------------------------------------------------------------------------

LOGITS = torch.tensor([2.0, 1.2, 0.7, 0.0, -0.5, -1.5, -4.0])
N = 40_000
# chi-square critical values at p = 1e-4 (df = categories - 1); the draws are deterministic, so this is
# a check of the distribution, not a flaky statistical test
CHI2_P1E4 = {1: 15.1, 2: 18.4, 3: 21.1, 4: 23.5, 5: 25.7, 6: 27.9}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_follows_softmax_over_seeds(temperature):
    tokens = _sample(LOGITS.expand(N, -1), temperature, seeds=torch.arange(N) * 7919 + 3)
    probs = (LOGITS / temperature).softmax(-1)
    stat = _chi_square(tokens, probs)
    assert stat < CHI2_P1E4[LOGITS.numel() - 1], (temperature, stat)


def test_temperature_sampling_follows_softmax_over_steps():
    """One request's successive draws (same seed, increasing step) are independent samples too."""
    tokens = _sample(LOGITS.expand(N, -1), 1.0, seeds=torch.full((N,), 1234), steps=torch.arange(N))
    assert _chi_square(tokens, LOGITS.softmax(-1)) < CHI2_P1E4[LOGITS.numel() - 1]


def test_large_seeds_use_all_64_bits():
    seeds = torch.tensor([5, 5 + (1 << 32), 5 + (1 << 40), (1 << 62) + 5])
    u = uniform_noise(seeds, torch.zeros(4, dtype=torch.long), 64)
    assert ((u > 0) & (u < 1)).all()
    assert len({tuple(row.tolist()) for row in u}) == 4


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_top_k_renormalises_over_the_k_best(top_k):
    tokens = _sample(LOGITS.expand(N, -1), 1.0, top_k=top_k, seeds=torch.arange(N))
    probs = torch.zeros_like(LOGITS)
    probs[:top_k] = LOGITS[:top_k].softmax(-1)  # LOGITS is sorted
    if top_k == 1:
        assert (tokens == 0).all()
    else:
        assert _chi_square(tokens, probs) < CHI2_P1E4[top_k - 1]


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5 (1), 0.3 (3), 0.15 (2), 0.05 (0)
    logits = probs.log().unsqueeze(0)
    no_k = torch.zeros(1, dtype=torch.long)
    cases = {0.01: {1}, 0.45: {1}, 0.55: {1, 3}, 0.75: {1, 3}, 0.85: {1, 3, 2}, 0.99: {1, 3, 2, 0}, 1.0: {0, 1, 2, 3}}
    for top_p, nucleus in cases.items():
        kept = filter_logits(logits, no_k, torch.tensor([top_p])).isfinite()[0]
        assert set(kept.nonzero().flatten().tolist()) == nucleus, top_p
    # mass exactly at top_p: equal logits give exact probabilities 1/4, and 2 tokens already hold 0.5
    equal = torch.zeros(1, 4)
    for top_p, size in ((0.25, 1), (0.5, 2), (0.5000001, 3), (0.75, 3), (1.0, 4)):
        assert int(filter_logits(equal, no_k, torch.tensor([top_p])).isfinite().sum()) == size, top_p
    # sampling from the nucleus renormalises within it
    tokens = _sample(logits.expand(N, -1), 1.0, top_p=0.75, seeds=torch.arange(N))
    want = torch.tensor([0.0, 0.5, 0.0, 0.3]) / 0.8
    assert _chi_square(tokens, want) < CHI2_P1E4[1]


def test_top_k_and_top_p_combine():
    logits = torch.tensor([[3.0, 2.9, 2.8, 2.7, -5.0]])
    kept = filter_logits(logits, torch.tensor([2]), torch.tensor([0.99])).isfinite()[0]
    assert kept.tolist() == [True, True, False, False, False]


def test_greedy_rows_and_sampled_rows_do_not_interact():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen) * 3
    temperature = torch.tensor([0.0, 1.0, 0.0, 0.7, 1.5, 0.0])
    top_k = torch.tensor([0, 0, 5, 10, 0, 0])
    top_p = torch.tensor([1.0, 0.9, 1.0, 1.0, 0.8, 0.5])
    seeds = torch.tensor([1, 2, 3, 4, 5, 6])
    steps = torch.tensor([0, 3, 1, 7, 2, 9])
    together = sample(logits, temperature, top_k, top_p, seeds, steps)
    for i in range(6):
        alone = sample(logits[i : i + 1], temperature[i : i + 1], top_k[i : i + 1], top_p[i : i + 1],
                       seeds[i : i + 1], steps[i : i + 1])  # fmt: skip
        assert together[i] == alone[0]
    greedy = temperature == 0
    assert torch.equal(together[greedy], logits[greedy].argmax(-1))


# --------------------------------------------------------------------------------------------------
# Through the engine
# --------------------------------------------------------------------------------------------------


def _gen(engine, prompts, params, **kw):
    return engine.generate(prompts, params, **kw)


def test_same_seed_same_tokens_regardless_of_batch(engine):
    sp = SamplingParams(max_tokens=24, temperature=1.2, top_p=0.95, seed=2024)
    alone = _gen(engine, [PROMPTS[0]], sp)[0]
    others = [
        SamplingParams(max_tokens=5),
        SamplingParams(max_tokens=30, temperature=0.8, seed=1),
        SamplingParams(max_tokens=12, temperature=1.0),  # unseeded
    ]
    batch = _gen(engine, [PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[3]], [others[0], sp, *others[1:]])
    assert batch[1] == alone
    # the same seed in several rows of one batch: each row is the same request
    rows = _gen(engine, [PROMPTS[0]] * 3, sp)
    assert all(r == alone for r in rows)
    assert len(alone.token_ids) == 24 and alone.finish_reason == "length"


def test_different_seeds_differ_and_sampling_is_not_greedy(engine):
    outs = [_gen(engine, [PROMPTS[0]], SamplingParams(max_tokens=32, temperature=1.5, seed=s))[0] for s in range(4)]
    assert len({tuple(o.token_ids) for o in outs}) == 4
    greedy = _gen(engine, [PROMPTS[0]], SamplingParams(max_tokens=32))[0]
    assert all(o.token_ids != greedy.token_ids for o in outs)


def test_top_k_1_equals_greedy(engine):
    greedy = _gen(engine, PROMPTS, SamplingParams(max_tokens=20))
    top1 = _gen(engine, PROMPTS, SamplingParams(max_tokens=20, temperature=5.0, top_k=1, seed=9))
    assert [r.token_ids for r in top1] == [r.token_ids for r in greedy]
    # a tiny nucleus is greedy as well
    tiny_p = _gen(engine, PROMPTS, SamplingParams(max_tokens=20, temperature=1.0, top_p=1e-6, seed=9))
    assert [r.token_ids for r in tiny_p] == [r.token_ids for r in greedy]


def test_stop_strings_cut_before_the_stop(engine):
    full = _gen(engine, [PROMPTS[0]], SamplingParams(max_tokens=40))[0]
    text = full.text
    assert len(text) > 30 and full.finish_reason == "length"
    stop = text[15:18]
    cut = text.find(stop)
    res = _gen(engine, [PROMPTS[0]], SamplingParams(max_tokens=40, stop=(stop,)))[0]
    assert res.finish_reason == "stop"
    assert res.text == text[:cut]
    assert stop not in res.text
    assert len(res.token_ids) < 40
    assert res.token_ids == full.token_ids[: len(res.token_ids)]
    # of several stop strings, the one that appears first wins
    later = text[25:28]
    if later not in text[: cut + len(stop)]:
        res2 = _gen(engine, [PROMPTS[0]], SamplingParams(max_tokens=40, stop=(later, stop)))[0]
        assert res2.text == text[:cut] and res2.finish_reason == "stop"
    # a stop string that never appears changes nothing
    res3 = _gen(engine, [PROMPTS[0]], SamplingParams(max_tokens=40, stop=("\x00never\x00",)))[0]
    assert res3 == full


@pytest.mark.parametrize("max_tokens", [1, 2, 7, 33])
def test_max_tokens_respected(engine, max_tokens):
    res = _gen(engine, PROMPTS, SamplingParams(max_tokens=max_tokens))
    for r in res:
        assert len(r.token_ids) == max_tokens
        assert r.finish_reason == "length"
        assert r.text == engine.decode(r.token_ids)


def test_max_tokens_zero_gives_empty_text(engine):
    res = _gen(engine, PROMPTS[:2], [SamplingParams(max_tokens=0), SamplingParams(max_tokens=3)])
    assert res[0].text == "" and res[0].token_ids == []
    assert res[0].prompt_tokens == len(engine.encode(PROMPTS[0]))
    assert len(res[1].token_ids) == 3


def _long_prompt(engine, min_tokens: int) -> str:
    sentences = ck.corpus_sentences(400, seed=5)
    text = ""
    for s in sentences:
        text += s + " "
        if len(engine.encode(text)) > min_tokens:
            return text
    raise AssertionError("corpus too short")


def test_prompt_longer_than_context(engine):
    ctx = engine.context_length
    assert ctx == 256
    text = _long_prompt(engine, ctx + 20)
    n = len(engine.encode(text))
    with pytest.raises(DataError) as info:
        _gen(engine, [text], SamplingParams(max_tokens=8))
    msg = str(info.value)
    assert f"{n} tokens" in msg and f"{ctx} tokens" in msg
    assert "\n" not in msg

    res = _gen(engine, [PROMPTS[0], text], SamplingParams(max_tokens=8), truncate="left")
    r = res[1]
    assert r.finish_reason == "length" and len(r.token_ids) == 8
    assert r.prompt_tokens + 8 <= ctx
    kept = engine.encode(text)[-r.prompt_tokens :]  # the end of the prompt is what is kept
    assert engine.generate_ids([kept], [SamplingParams(max_tokens=8)])[0] == r
    assert res[0] == _gen(engine, [PROMPTS[0]], SamplingParams(max_tokens=8))[0]


def test_generation_stops_at_the_context_limit(engine):
    text = _long_prompt(engine, 200)
    ids = engine.encode(text)[:250]
    r = engine.generate_ids([ids], [SamplingParams(max_tokens=50)])[0]
    assert r.finish_reason == "context"
    assert len(ids) + len(r.token_ids) == engine.context_length


def test_sample_host_hints_give_the_same_tokens():
    """`all_hot` / `unfiltered` (parameters known on the host) skip work, not change tokens."""
    from reldl.llm.sampling import sample

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 300, generator=g) * 3
    temp = torch.full((6,), 0.7)
    seeds = torch.arange(6, dtype=torch.long) * 977 + 5
    steps = torch.arange(6, dtype=torch.long)
    for top_k, top_p in ((0, 1.0), (20, 0.9)):
        k = torch.full((6,), top_k, dtype=torch.long)
        p = torch.full((6,), top_p)
        want = sample(logits, temp, k, p, seeds, steps)
        got = sample(logits, temp, k, p, seeds, steps, all_hot=True, unfiltered=(top_k, top_p) == (0, 1.0))
        assert torch.equal(want, got)
