"""CUDA graphs for the decode step: one static-shape graph per (batch bucket, block-table bucket).

A decode step is one token per sequence, so its shapes are fixed once the batch and the block-table width are
rounded up to powers of two. Padding rows write to the cache's trash block and are dropped. Replaying a captured
graph removes the per-kernel launch cost that otherwise dominates small-batch decoding on a GPU.

Tree steps (rows sharing cache blocks, attending through a `TreeLayout`) replay graphs too, one per (batch bucket,
work-item bucket, partial bucket, kernel config): each step's layout and plan are built on the host (no device
syncs; the block tables are host lists anyway) and copied into the graph's fixed-size buffers
(`TreePlanBuffers`: padding reads and writes nothing). The layout's token buffers are shared by all tree graphs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from reldl.kernels.tree_attention import TreePlanBuffers, layout_from_block_tables
from reldl.llm.attention import Step
from reldl.llm.kv_cache import TRASH_BLOCK

if TYPE_CHECKING:
    from reldl.llm.engine import Engine, _Seq


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class _Captured:
    def __init__(self, engine: Engine, batch: int, blocks: int, pool, tree: TreePlanBuffers | None = None):
        dev = engine.device
        # tokens, positions, slots: one buffer (one copy per step), each row contiguous (kernels index densely)
        self.inputs = torch.zeros((3, batch, 1), dtype=torch.long, device=dev)
        self.tokens, self.positions, self.slots = self.inputs.unbind(0)
        self.tables = torch.full((batch, blocks), TRASH_BLOCK, dtype=torch.long, device=dev)
        self.members: list[_Seq] = []
        step = Step(self.positions, self.slots, self.tables, engine.cache.block_size)
        self.tree = tree
        if tree is not None:  # attention reads the layout, not the block tables
            step.tree, step.tree_plan = tree.layout, tree.plan
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
        # block tables change only when the batch does (a sequence's blocks are reserved up front); tree graphs read
        # the layout instead
        if self.tree is None and not same:
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
        self.tree_graphs: dict[tuple, _Captured] = {}
        self._tree_tokens: tuple[torch.Tensor, torch.Tensor] | None = None  # layout slots/end, shared
        self._tree_tables: tuple[list[_Seq], torch.Tensor] | None = None  # host block tables of the last batch
        self.sms: int | None = None
        self._tree_ahead: tuple | None = None  # (host tables entry, lengths, layout, plan) planned a step ahead

    def decode_tree(self, seqs: list[_Seq]) -> torch.Tensor | None:
        """A tree step (rows in tree order) through a captured graph; None when it cannot (no tree kernel)."""
        eng = self.engine
        batch = _bucket(len(seqs))
        if batch > _bucket(eng.max_batch):
            return None
        dev, bs = eng.device, eng.cache.block_size
        if self.sms is None:
            from reldl.kernels.paged_attention import num_sms

            self.sms = num_sms(dev)
        cached = self._tree_tables
        if cached is None or len(cached[0]) != len(seqs) or any(a is not b for a, b in zip(seqs, cached[0])):
            nb = max(len(s.blocks) for s in seqs)  # block tables change only when the batch does
            rows = [s.blocks + [TRASH_BLOCK] * (nb - len(s.blocks)) for s in seqs]
            cached = self._tree_tables = (list(seqs), torch.tensor(rows, dtype=torch.long))
        lengths = [s.length for s in seqs]
        ahead = self._tree_ahead
        self._tree_ahead = None
        if ahead is not None and ahead[0] is cached and ahead[1] == lengths:
            layout, plan = ahead[2], ahead[3]  # planned during the previous step's GPU work
        else:
            layout, plan = self._tree_layout_plan(cached[1], lengths)
        if plan is None:
            return None
        key = (
            batch,
            _bucket(max(plan.num_items, 32)),
            _bucket(max(plan.num_partials, 64)),
            tuple(sorted(plan.config.items())),
        )
        g = self.tree_graphs.get(key)
        if g is None:
            if self._tree_tokens is None:
                n = eng.cache.num_blocks * bs  # every layout token is a distinct cache slot
                self._tree_tokens = (
                    torch.zeros(n, dtype=torch.long, device=dev),
                    torch.full((n,), -1, dtype=torch.int32, device=dev),
                )
            bufs = TreePlanBuffers(plan, batch, key[1], key[2], *self._tree_tokens)
            g = self.tree_graphs[key] = _Captured(eng, batch, 1, self.pool, tree=bufs)
        g.tree.load(layout, plan)
        logits = g.replay(seqs, bs)
        # while the GPU runs this step, plan the next one on the host for the same rows one token longer (an n-sample
        # tree's usual next step; used only if the next step's rows and lengths are exactly these)
        nxt = [n + 1 for n in lengths]
        if all(n <= len(s.blocks) * bs for s, n in zip(seqs, nxt)):
            self._tree_ahead = (cached, nxt, *self._tree_layout_plan(cached[1], nxt))
        return logits

    def _tree_layout_plan(self, tables: torch.Tensor, lengths: list[int]):
        """The layout and the kernel's plan of a tree step, built on the host (no device syncs)."""
        layout = layout_from_block_tables(tables, torch.tensor(lengths, dtype=torch.long), self.engine.cache.block_size)
        return layout, self.engine._tree_plan(layout, sms=self.sms)

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
