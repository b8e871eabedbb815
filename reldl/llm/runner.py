"""CUDA graphs for the decode step: one static-shape graph per (batch bucket, block-table bucket).

A decode step is one token per sequence, so its shapes are fixed once the batch and the block-table width are
rounded up to powers of two. Padding rows write to the cache's trash block and are dropped. Replaying a captured
graph removes the per-kernel launch cost that otherwise dominates small-batch decoding on a GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from reldl.llm.attention import Step
from reldl.llm.kv_cache import TRASH_BLOCK

if TYPE_CHECKING:
    from reldl.llm.engine import Engine, _Seq


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class _Captured:
    def __init__(self, engine: Engine, batch: int, blocks: int, pool):
        dev = engine.device
        # tokens, positions, slots: one buffer (one copy per step), each row contiguous (kernels index densely)
        self.inputs = torch.zeros((3, batch, 1), dtype=torch.long, device=dev)
        self.tokens, self.positions, self.slots = self.inputs.unbind(0)
        self.tables = torch.full((batch, blocks), TRASH_BLOCK, dtype=torch.long, device=dev)
        self.members: list[_Seq] = []
        step = Step(self.positions, self.slots, self.tables, engine.cache.block_size)
        model, layers = engine.model, engine.cache.layers

        def run() -> torch.Tensor:
            return model.logits(model(self.tokens, step, layers)[:, 0])

        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph (lazy init, autotuning)
                run()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = run()

    def replay(self, seqs: list[_Seq], block_size: int) -> torch.Tensor:
        batch, nb = self.tables.shape
        same = len(seqs) == len(self.members) and all(a is b for a, b in zip(seqs, self.members))
        if not same:  # block tables change only when the batch does (a sequence's blocks are reserved up front)
            rows = [s.blocks + [TRASH_BLOCK] * (nb - len(s.blocks)) for s in seqs]
            rows += [[TRASH_BLOCK] * nb] * (batch - len(rows))
            self.tables.copy_(torch.tensor(rows, dtype=torch.long), non_blocking=True)
            self.members = list(seqs)  # references, not ids: ids of freed sequences get reused
        step = []
        for s in seqs:
            pos = s.length - 1
            step.append(
                (s.out[-1] if s.out else s.prompt[-1], pos, s.blocks[pos // block_size] * block_size + pos % block_size)
            )
        step += [(0, 0, 0)] * (batch - len(step))  # padding rows: token 0 at position 0, into the trash block
        self.inputs.copy_(torch.tensor(step, dtype=torch.long).T.unsqueeze(-1), non_blocking=True)
        self.graph.replay()
        return self.logits[: len(seqs)]


class DecodeGraphs:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.graphs: dict[tuple[int, int], _Captured] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.max_blocks = engine.cache.blocks_for(engine.context_length)

    def decode(self, seqs: list[_Seq]) -> torch.Tensor | None:
        eng = self.engine
        nb = max(len(s.blocks) for s in seqs)
        key = (_bucket(len(seqs)), min(_bucket(nb), _bucket(self.max_blocks)))
        if key[0] > _bucket(eng.max_batch):
            return None
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = _Captured(eng, key[0], key[1], self.pool)
        return g.replay(seqs, eng.cache.block_size)
