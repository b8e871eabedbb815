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
        self.tokens = torch.zeros((batch, 1), dtype=torch.long, device=dev)
        self.positions = torch.zeros((batch, 1), dtype=torch.long, device=dev)
        self.slots = torch.zeros((batch, 1), dtype=torch.long, device=dev)
        self.tables = torch.full((batch, blocks), TRASH_BLOCK, dtype=torch.long, device=dev)
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

    def replay(self, tokens, positions, slots, tables) -> torch.Tensor:
        batch, nb = self.tables.shape
        rows = [
            [t, p, s] + row + [TRASH_BLOCK] * (nb - len(row)) for t, p, s, row in zip(tokens, positions, slots, tables)
        ]
        rows += [[0] * (3 + nb)] * (batch - len(rows))  # padding rows: token 0 at position 0, into the trash block
        packed = torch.tensor(rows, dtype=torch.long).to(self.tokens.device, non_blocking=True)
        self.tokens.copy_(packed[:, 0:1])
        self.positions.copy_(packed[:, 1:2])
        self.slots.copy_(packed[:, 2:3])
        self.tables.copy_(packed[:, 3:])
        self.graph.replay()
        return self.logits[: len(tokens)]


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
        cache = eng.cache
        positions = [s.length - 1 for s in seqs]
        tokens = [s.out[-1] if s.out else s.prompt[-1] for s in seqs]
        slots = [cache.slot(s.blocks, p) for s, p in zip(seqs, positions)]
        return g.replay(tokens, positions, slots, [s.blocks for s in seqs])
