"""Prompts that share a prefix share its KV-cache blocks (computed once) and still decode exactly as alone."""

from __future__ import annotations

import torch

from reldl.llm import SamplingParams
from reldl.llm.engine import Engine
from reldl.registry import get_engine


def _engine(llama_path, **kw) -> Engine:
    base = get_engine("prefix-sharing", str(llama_path), "float32", "cpu")
    return Engine(base.model, base.tokenizer, device=torch.device("cpu"), dtype=torch.float32, **kw)


def test_shared_prefix_blocks_and_identical_results(llama_path):
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, 500, (45,), generator=g).tolist()  # 2 full blocks of 16 shared, then 13 more tokens
    prompts = [prefix + torch.randint(3, 500, (n,), generator=g).tolist() for n in (1, 4, 9, 20)]
    prompts += [prefix[:10] + [7, 8], prefix[:33]]  # shares no full block / exactly two blocks and one token
    params = [SamplingParams(max_tokens=12)] * len(prompts)
    eng = _engine(llama_path, max_batch=8, block_size=16)
    forks: list[int] = []
    fork = eng.cache.allocator.fork
    eng.cache.allocator.fork = lambda blocks: forks.append(len(blocks)) or fork(blocks)
    together = eng.generate_ids(prompts, params)
    alone = [_engine(llama_path, block_size=16).generate_ids([p], params[:1])[0] for p in prompts]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert sum(forks) >= 2 * 4  # the four long prompts and the 33-token one share prefix blocks
    assert eng.cache.allocator.num_free == eng.cache.allocator.num_blocks - 1  # every block came back


def test_sampled_requests_with_shared_prefix_match_alone(llama_path):
    prompt = list(range(10, 60))
    params = [SamplingParams(max_tokens=8, temperature=0.9, seed=s) for s in range(5)]
    eng = _engine(llama_path)
    together = eng.generate_ids([prompt] * 5, params)
    alone = [_engine(llama_path).generate_ids([prompt], [p])[0] for p in params]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
