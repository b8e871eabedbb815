"""Tree decoding (issue 6): n samples and beam search forked from one prefilled prompt, sharing its cache blocks.

- greedy n > 1 gives n copies of the n = 1 text; seeded samples equal the same branches decoded as separate requests
  (seeds from `branch_seed`), whatever else is in the batch;
- tree attention (the decode step reading each shared block once) gives the per-row path's logits to ~1e-5 and the
  same tokens, on Llama, OPT and GPT-2;
- beam search equals transformers' `generate(num_beams=k, num_return_sequences=k, do_sample=False)` for the
  length_penalty / early_stopping settings below, EOS-finished hypotheses included;
- every cache block comes back.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import checkpoints as ck  # noqa: E402

from reldl.llm import SamplingParams  # noqa: E402
from reldl.llm.engine import Engine  # noqa: E402
from reldl.llm.params import branch_seed  # noqa: E402
from reldl.registry import get_engine  # noqa: E402

FAMILIES = ("llama", "opt", "gpt2")


def _engine(path, tree_min_saving: float | None = 0.0, **kw) -> Engine:
    base = get_engine(f"tree-{path.name}", str(path), "float32", "cpu")
    eng = Engine(base.model, base.tokenizer, device=torch.device("cpu"), dtype=torch.float32, **kw)
    if tree_min_saving is not None:
        eng.tree_min_saving = tree_min_saving  # 0: every step whose rows share a block uses tree attention
    return eng


def _prompts(lengths, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]


def _all_blocks_back(eng: Engine) -> bool:
    a = eng.cache.allocator
    return a.num_free == a.num_blocks - 1 and sum(a.refcount) == 0


class _Spy(Engine):
    """Counts tree steps; with `compare`, also runs each tree step per row and records the largest logit gap."""

    compare = False

    def _decode(self, seqs, tree=False):
        out = super()._decode(seqs, tree)
        if tree:
            self.tree_steps = getattr(self, "tree_steps", 0) + 1
            if self.compare:  # the per-row path rewrites the same K/V and reads each row's whole context
                ref = super()._decode(seqs, False)
                gap = (out - ref).abs().max().item()
                self.max_gap = max(getattr(self, "max_gap", 0.0), gap)
        return out


def _spy(path, **kw) -> _Spy:
    base = get_engine(f"tree-{path.name}", str(path), "float32", "cpu")
    eng = _Spy(base.model, base.tokenizer, device=torch.device("cpu"), dtype=torch.float32, **kw)
    eng.tree_min_saving = 0.0
    return eng


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_n_samples_equal_n1_and_tree_logits_match(tiny_checkpoints, family):
    path = tiny_checkpoints(family)
    prompts = _prompts((5, 16, 23, 40))  # partial last block (copied on fork) and an exact block boundary
    eng = _spy(path, block_size=16)
    eng.compare = True
    trees = eng.generate_ids(prompts, [SamplingParams(max_tokens=20, n=4)] * len(prompts))
    alone = _engine(path, tree_attention=False).generate_ids(prompts, [SamplingParams(max_tokens=20)] * len(prompts))
    for t, a in zip(trees, alone):
        assert [b.token_ids for b in t.branches] == [a.token_ids] * 4
        assert t.texts == [a.text] * 4 and t.text == a.text and t.token_ids == a.token_ids
    assert eng.tree_steps >= 19
    assert eng.max_gap < 1e-4, eng.max_gap  # float32: the tree path reorders the softmax sums only
    assert _all_blocks_back(eng)


@pytest.mark.parametrize("family", FAMILIES)
def test_seeded_samples_equal_separate_requests(tiny_checkpoints, family):
    path = tiny_checkpoints(family)
    prompts = _prompts((7, 33))
    params = [SamplingParams(max_tokens=16, temperature=0.8, top_k=50, seed=11 + i, n=5) for i in range(2)]
    eng = _spy(path)
    trees = eng.generate_ids(prompts, params)
    assert eng.tree_steps > 0
    # the same branches as separate requests, per-row attention, in one batch with an unrelated request
    sep = _engine(path, tree_attention=False)
    reqs, sps = [], []
    for p, sp in zip(prompts, params):
        for b in range(sp.n):
            reqs.append(p)
            sps.append(SamplingParams(max_tokens=16, temperature=0.8, top_k=50, seed=branch_seed(sp.seed, b)))
    reqs.append(_prompts((12,), seed=5)[0])
    sps.append(SamplingParams(max_tokens=9, temperature=1.0, seed=3))
    flat = sep.generate_ids(reqs, sps)
    got = [b.token_ids for t in trees for b in t.branches]
    assert got == [r.token_ids for r in flat[:-1]]
    assert len({tuple(x) for x in got}) > 2  # the branches really differ
    # branch 0 is what n = 1 gives with the request's seed
    one = _engine(path).generate_ids(prompts[:1], [SamplingParams(max_tokens=16, temperature=0.8, top_k=50, seed=11)])
    assert trees[0].branches[0].token_ids == one[0].token_ids
    assert _all_blocks_back(eng)


def test_mixed_batch_with_prefix_sharing_matches_alone(llama_path):
    """Plain, n-sample and beam requests whose prompts share a prefix, in one batch with few slots."""
    prefix = _prompts((40,), seed=3)[0]
    prompts = [prefix + tail for tail in _prompts((3, 9, 1, 20, 5), seed=4)]
    params = [
        SamplingParams(max_tokens=10),
        SamplingParams(max_tokens=12, n=3, temperature=0.7, seed=1),
        SamplingParams(max_tokens=8, beam_width=3),
        SamplingParams(max_tokens=6, n=2),
        SamplingParams(max_tokens=9, temperature=0.9, seed=4),
    ]
    eng = _spy(path=llama_path, max_batch=6)
    together = eng.generate_ids(prompts, params)
    assert eng.tree_steps > 0
    for p, sp, r in zip(prompts, params, together):
        alone = _engine(llama_path, tree_attention=False).generate_ids([p], [sp])[0]
        assert r.texts == alone.texts and r.token_ids == alone.token_ids
        assert (r.branches is None) == (sp.width == 1)
    assert _all_blocks_back(eng)


def test_tree_layout_on_forked_block_tables(llama_path):
    """The layout the engine builds lays each shared block out once."""
    eng = _engine(llama_path, block_size=16)
    layouts = []
    fwd = eng._forward

    def spy(*args):
        if len(args) > 4 and args[4]:
            layouts.append((args[3], args[1]))
        return fwd(*args)

    eng._forward = spy
    prompt = _prompts((50,))[0]  # 3 whole blocks + 2 tokens
    eng.generate_ids([prompt], [SamplingParams(max_tokens=3, n=4)])
    tables, positions = layouts[0]
    assert len(tables) == 4 and all(t[:3] == tables[0][:3] for t in tables)
    assert len({t[3] for t in tables}) == 4  # the partial block was copied per branch
    from reldl.kernels.tree_attention import layout_from_block_tables

    lay = layout_from_block_tables(torch.tensor(tables), torch.tensor(positions)[:, 0] + 1, 16)
    assert lay.num_tokens == 48 + 4 * 3  # shared blocks once, then each branch's 2 prompt tokens + its new token


@pytest.mark.parametrize(
    "length_penalty, early_stopping",
    [(1.0, False), (1.0, True), (0.0, "never"), (2.0, False), (-0.5, True)],
)
def test_beam_search_matches_transformers(tiny_checkpoints, length_penalty, early_stopping):
    # special tokens not suppressed: some hypotheses end with EOS before max_tokens
    path = tiny_checkpoints("llama", suppress_special_tokens=False)
    ref = ck.load_reference(path)
    prompts = _prompts((5, 16, 23, 40))
    k, new = 3, 12
    sp = SamplingParams(max_tokens=new, beam_width=k, length_penalty=length_penalty, early_stopping=early_stopping)
    eng = _spy(path)
    results = eng.generate_ids(prompts, [sp] * len(prompts))
    stopped = 0
    for ids, res in zip(prompts, results):
        x = torch.tensor([ids])
        with torch.no_grad():
            out = ref.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=new,
                do_sample=False,
                num_beams=k,
                num_return_sequences=k,
                length_penalty=length_penalty,
                early_stopping=early_stopping,
                pad_token_id=0,
                output_scores=True,
                return_dict_in_generate=True,
            )
        want = []
        for row in out.sequences[:, len(ids) :].tolist():
            end = next((i for i, t in enumerate(row) if t in eng.eos), len(row))
            want.append(row[:end])
        assert [b.token_ids for b in res.branches] == want
        assert [b.score for b in res.branches] == pytest.approx(out.sequences_scores.tolist(), abs=1e-4)
        assert res.token_ids == want[0]
        stopped += sum(b.finish_reason == "stop" for b in res.branches)
    if length_penalty <= 1.0:  # (a large penalty favours the long hypotheses)
        assert stopped > 0  # EOS-finished hypotheses were exercised
    assert eng.tree_steps > 0
    assert _all_blocks_back(eng)


def test_beam_width_one_is_greedy(llama_path):
    prompts = _prompts((9,))
    eng = _engine(llama_path)
    beam = eng.generate_ids(prompts, [SamplingParams(max_tokens=10, beam_width=1)])[0]
    greedy = eng.generate_ids(prompts, [SamplingParams(max_tokens=10)])[0]
    assert beam.texts == [greedy.text] and beam.branches is not None and greedy.branches is None


def test_small_cache_makes_trees_wait(llama_path):
    """A tree reserves its branches' blocks at admission: with a cache for about one tree, trees run one by one."""
    prompts = _prompts((30, 31, 29))
    params = [SamplingParams(max_tokens=20, n=4, temperature=0.5, seed=i) for i in range(3)]
    small = _engine(llama_path, cache_tokens=16 * 14, block_size=16)
    got = small.generate_ids(prompts, params)
    want = _engine(llama_path).generate_ids(prompts, params)
    assert [r.texts for r in got] == [r.texts for r in want]
    assert _all_blocks_back(small)


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"n": 0}, "n must be >= 1"),
        ({"n": 65}, "n must be at most 64"),
        ({"beam_width": 0}, "beam_width must be >= 1"),
        ({"beam_width": 2, "n": 2}, "cannot be combined"),
        ({"beam_width": 2, "temperature": 0.5}, "needs temperature 0"),
        ({"beam_width": 2, "stop": ("x",)}, "stop strings"),
        ({"beam_width": 2, "early_stopping": "sometimes"}, "early_stopping"),
    ],
)
def test_bad_params(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ("llama", "opt"))
def test_cuda_tree_steps_replay_graphs(tiny_checkpoints, family):
    """On CUDA, tree steps replay CUDA graphs (layout and plan made on the host, copied into padded buffers):
    float32 tokens equal the eager tree steps' and the separate sequences', for samples, beams and a forest of
    trees whose batch shrinks (several batch buckets); every block comes back."""
    from reldl.llm.loader import inspect_checkpoint, load_tokenizer
    from reldl.llm.models import build

    path = tiny_checkpoints(family)
    ckpt = inspect_checkpoint(path)
    dev = torch.device("cuda")
    model, tok = build(ckpt, dev, torch.float32), load_tokenizer(ckpt)

    def engine(cls=Engine, **kw):
        eng = cls(model, tok, device=dev, dtype=torch.float32, max_batch=16, **kw)
        eng.tree_min_saving = 0.0
        return eng

    prompts = _prompts((5, 40, 23, 70), seed=8)
    params = [
        SamplingParams(max_tokens=12, n=4, temperature=0.8, seed=1),
        SamplingParams(max_tokens=20, n=3),
        SamplingParams(max_tokens=9, beam_width=3),
        SamplingParams(max_tokens=15, n=5, temperature=1.0, top_k=20, seed=2),
    ]
    graphed = engine(_Spy)
    got = graphed.generate_ids(prompts, params)
    assert graphed.tree_steps > 0 and len(graphed.graphs.tree_graphs) > 1
    eager = engine(use_cuda_graphs=False).generate_ids(prompts, params)
    separate = engine(tree_attention=False).generate_ids(prompts, params)
    for g, e, s in zip(got, eager, separate):
        assert g.texts == e.texts == s.texts
    assert _all_blocks_back(graphed)
