"""Every model family against the transformers implementation: logits, greedy decoding and scoring.

Also: sharded checkpoints, continuous batching with few batch slots, and a KV cache small enough that
requests must wait for blocks -- all must give exactly what running each request alone gives.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import checkpoints as ck  # noqa: E402  (tests/ is put on sys.path by tests/conftest.py)

from reldl.errors import DataError  # noqa: E402
from reldl.llm import Engine, SamplingParams  # noqa: E402
from reldl.registry import get_engine  # noqa: E402

ATOL = 1e-4
LOGIT_LENGTHS = (1, 5, 17, 40, 100)  # 100 > 64, the llama3-scaled RoPE's original context
GEN_LENGTHS = (1, 5, 17, 40)
NEW_TOKENS = 32
TEXT = " ".join(ck.corpus_sentences(40, seed=99))


class Family:
    """A family's checkpoint, our engine (float32 CPU) and the transformers reference, loaded once."""

    def __init__(self, family: str, path):
        self.family, self.path = family, path
        self.engine = get_engine(f"test_models_{family}", str(path), dtype="float32", device="cpu")
        self.ref = ck.load_reference(path)
        self.tok = ck.load_reference_tokenizer(path)
        self.ids = ck.special_token_ids(family)

    def ref_logits(self, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.ref(torch.tensor([ids])).logits[0].float()

    def ref_greedy(self, ids: list[int], n: int) -> list[int]:
        x = torch.tensor([ids])
        with torch.no_grad():
            out = self.ref.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=n,
                do_sample=False,
                pad_token_id=self.ids["pad"],
            )
        return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def families(tiny_checkpoints):
    cache: dict[str, Family] = {}

    def get(family: str) -> Family:
        if family not in cache:
            cache[family] = Family(family, tiny_checkpoints(family))
        return cache[family]

    return get


def _random_ids(lengths, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, ck.VOCAB_SIZE, (n,), generator=gen).tolist() for n in lengths]


def _text_prompts(f: Family, lengths) -> list[list[int]]:
    """Prefixes of a tokenized text (for BOS-adding tokenizers a length-1 prompt is just BOS)."""
    ids = f.tok.encode(TEXT).ids
    assert len(ids) >= max(lengths)
    return [ids[:n] for n in lengths]


@pytest.mark.parametrize("family", ck.FAMILIES)
def test_logits_match_transformers(families, family):
    f = families(family)
    seqs = _random_ids(LOGIT_LENGTHS, seed=1) + _text_prompts(f, (3, 33))
    ours = f.engine.logits(seqs)  # one call: every length batched (right-padded) together
    assert len(ours) == len(seqs)
    for ids, lg in zip(seqs, ours):
        ref = f.ref_logits(ids)
        assert lg.shape == ref.shape == (len(ids), ck.VOCAB_SIZE)
        assert lg.dtype == torch.float32
        err = (lg - ref).abs().max().item()
        assert err < ATOL, f"{family}: prompt of {len(ids)} tokens, max |logit diff| {err:.2e}"


@pytest.mark.parametrize("family", ck.FAMILIES)
def test_greedy_matches_transformers_generate(families, family):
    f = families(family)
    prompts = _text_prompts(f, GEN_LENGTHS) + _random_ids((9,), seed=2)
    params = [SamplingParams(max_tokens=NEW_TOKENS)] * len(prompts)
    results = f.engine.generate_ids(prompts, params)  # all together: mixed lengths, one batch
    eos = set(f.engine.config.eos_token_ids)
    for ids, res in zip(prompts, results):
        want = f.ref_greedy(ids, NEW_TOKENS)  # transformers on this prompt alone, unpadded
        want_finish = "length"
        if want and want[-1] in eos:
            want, want_finish = want[:-1], "stop"
        assert res.token_ids == want, f"{family}: prompt of {len(ids)} tokens"
        assert res.finish_reason == want_finish
        assert res.prompt_tokens == len(ids)
        assert res.text == f.tok.decode(want, skip_special_tokens=True)
    # the builders suppress special tokens, so decoding really ran to max_tokens
    assert all(len(r.token_ids) == NEW_TOKENS for r in results)


@pytest.mark.parametrize("family", ck.FAMILIES)
def test_score_matches_transformers(families, family):
    f = families(family)
    prompts = ["The phone is really", "Order #1234 shipped on", "Q: Is the lamp cheap?\nA:", "Rating:"]
    conts = [
        " great.",
        " 12/5/2021. The seller is great!",
        " Yes, it is",
        " 5/5 - Solid kettle, loud cable...",
    ]
    got = f.engine.score(prompts, conts)
    assert len(got) == len(prompts)
    for p, c, g in zip(prompts, conts, got):
        ctx = f.tok.encode(p).ids
        cont = f.tok.encode(c, add_special_tokens=False).ids
        assert ctx and cont
        logp = f.ref_logits(ctx + cont).double().log_softmax(-1)
        want = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
        assert isinstance(g, float)
        assert g == pytest.approx(want, abs=ATOL), f"{family}: {p!r} + {c!r}"
        assert g < 0
    assert f.engine.score(["The phone"], [""]) == [0.0]


# Config options the default tiny checkpoints leave at their defaults.
VARIANTS = {
    "mistral_window8": ("mistral", dict(sliding_window=8)),
    "qwen2_window8_all_layers": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=0)),
    "qwen2_window8_layer1": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "qwen2_window_unused": ("qwen2", dict(use_sliding_window=True, sliding_window=8)),  # max_window_layers=28
    "llama_mqa": ("llama", dict(num_key_value_heads=1)),
    "llama_mha_biases": ("llama", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    "llama_head_dim32_tied": ("llama", dict(head_dim=32, tie_word_embeddings=True)),
    "llama_yarn": (
        "llama",
        dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    ),
    "opt_post_norm_no_bias": ("opt", dict(do_layer_norm_before=False, enable_bias=False)),
    "gpt2_gelu_n_inner": ("gpt2", dict(n_inner=96, activation_function="gelu")),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_variants_match_transformers(tiny_checkpoints, variant):
    family, overrides = VARIANTS[variant]
    f = Family(family, tiny_checkpoints(family, **overrides))
    seqs = _random_ids((1, 9, 40, 100), seed=4)
    for ids, lg in zip(seqs, f.engine.logits(seqs)):
        err = (lg - f.ref_logits(ids)).abs().max().item()
        assert err < ATOL, f"{variant}: prompt of {len(ids)} tokens, max |logit diff| {err:.2e}"
    prompts = _text_prompts(f, (3, 20))  # decoding runs well past an 8-token window
    results = f.engine.generate_ids(prompts, [SamplingParams(max_tokens=16)] * 2)
    for ids, res in zip(prompts, results):
        assert res.token_ids == f.ref_greedy(ids, 16), variant


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sharded_checkpoint_gives_identical_logits(tiny_checkpoints, family):
    whole = tiny_checkpoints(family)
    sharded = tiny_checkpoints(family, sharded=True)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) >= 2
    assert not (sharded / "model.safetensors").exists()
    a = get_engine(f"whole_{family}", str(whole), dtype="float32", device="cpu")
    b = get_engine(f"sharded_{family}", str(sharded), dtype="float32", device="cpu")
    assert a is not b
    for name, p in a.model.state_dict().items():
        assert torch.equal(p, b.model.state_dict()[name]), name
    seqs = _random_ids((1, 7, 30), seed=3)
    for x, y in zip(a.logits(seqs), b.logits(seqs)):
        assert torch.equal(x, y)


# --------------------------------------------------------------------------------------------------
# Continuous batching and KV-cache pressure
# --------------------------------------------------------------------------------------------------

MAX_TOKENS = (1, 9, 24, 3, 17, 6, 12)


def _batch_requests(engine: Engine):
    texts = [
        "The phone",
        "Order #1234 shipped on 12/5/2021.",
        "Q: Is the lamp cheap?\nA:",
        "Alice bought 3 cables for $12.50 in Paris!",
        "I think",
        '"Great watch!" said Bob. 97% of buyers agree (n=120). It broke after 3 days;',
        "Rating: 4/5 -",
    ]
    prompts = [engine.encode(t) for t in texts]
    params = [SamplingParams(max_tokens=m) for m in MAX_TOKENS]
    # two seeded sampled requests: deterministic too, so they must not depend on the batch either
    params[1] = SamplingParams(max_tokens=MAX_TOKENS[1], temperature=0.9, top_p=0.95, seed=11)
    params[4] = SamplingParams(max_tokens=MAX_TOKENS[4], temperature=1.3, top_k=20, seed=12)
    return prompts, params


def _alone(engine: Engine, prompts, params):
    return [engine.generate_ids([p], [sp])[0] for p, sp in zip(prompts, params)]


def _spy(engine: Engine, calls: dict[str, list]) -> None:
    """Record the batch size of every forward pass and every refused block reservation."""
    forward, reserve = engine._forward, engine._reserve

    def spy_forward(tokens, *args):
        calls["forward"].append(len(tokens))
        return forward(tokens, *args)

    def spy_reserve(seq, *args):
        ok = reserve(seq, *args)
        if not ok:
            calls["refused"].append(seq.index)
        return ok

    engine._forward, engine._reserve = spy_forward, spy_reserve


@pytest.fixture(scope="module")
def llama_alone(llama_path):
    """The llama engine, the 7 batching requests and their results when each runs alone."""
    base = get_engine("test_models_llama", str(llama_path), dtype="float32", device="cpu")
    prompts, params = _batch_requests(base)
    return base, prompts, params, _alone(base, prompts, params)


def test_continuous_batching_matches_running_alone(llama_alone):
    base, prompts, params, want = llama_alone
    eng = Engine(base.model, base.tokenizer, device=base.device, dtype=base.dtype, max_batch=2)
    calls: dict[str, list] = {"forward": [], "refused": []}
    _spy(eng, calls)
    got = eng.generate_ids(prompts, params)
    assert got == want
    assert [len(r.token_ids) for r in got] == list(MAX_TOKENS)
    assert all(r.finish_reason == "length" for r in got)
    assert max(calls["forward"]) == 2  # never more than max_batch sequences in a step
    # sequences retire and new ones take their slots: far fewer steps than running 7 one after another
    assert len(calls["forward"]) < sum(MAX_TOKENS)
    assert eng.cache.allocator.num_free == eng.cache.num_blocks - 1  # every block returned


@pytest.mark.parametrize(
    "options",
    [dict(block_size=1, max_batch=3), dict(block_size=5), dict(prefill_tokens=24), dict(max_batch=1)],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_engine_options_do_not_change_results(llama_alone, options):
    base, prompts, params, want = llama_alone
    eng = Engine(base.model, base.tokenizer, device=base.device, dtype=base.dtype, **options)
    assert eng.generate_ids(prompts, params) == want
    seqs = [p + r.token_ids for p, r in zip(prompts, want)]
    for x, y in zip(eng.logits(seqs), base.logits(seqs)):
        assert (x - y).abs().max().item() < 1e-5


def test_small_kv_cache_makes_requests_wait_but_gives_same_results(llama_alone):
    base, prompts, params, want = llama_alone
    # 64 tokens = 4 usable blocks of 16; each request needs 1-3 blocks for prompt + max_tokens
    eng = Engine(base.model, base.tokenizer, device=base.device, dtype=base.dtype, cache_tokens=64)
    assert eng.cache.allocator.num_free == 4
    calls: dict[str, list] = {"forward": [], "refused": []}
    _spy(eng, calls)
    got = eng.generate_ids(prompts, params)
    assert got == want
    assert calls["refused"], "the cache never ran short: the test does not exercise waiting"
    assert eng.cache.allocator.num_free == 4
    # a request that can never fit is an error, not a hang, and leaves the cache intact
    with pytest.raises(DataError, match="does not fit the KV cache"):
        eng.generate_ids([prompts[0]], [SamplingParams(max_tokens=100)])
    assert eng.cache.allocator.num_free == 4
    assert eng.generate_ids(prompts[:2], params[:2]) == want[:2]
    # scoring / full logits split their batch to fit the cache too
    seqs = [p + r.token_ids[:10] for p, r in zip(prompts, want)]
    assert sum(eng.cache.blocks_for(len(x)) for x in seqs) > 4
    for x, y in zip(eng.logits(seqs), base.logits(seqs)):
        assert (x - y).abs().max().item() < 1e-5
    texts = [base.decode(p) for p in prompts]
    assert eng.score(texts, [" great"] * 7) == pytest.approx(base.score(texts, [" great"] * 7), abs=1e-6)
    assert eng.cache.allocator.num_free == 4
