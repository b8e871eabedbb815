"""Paged KV cache: a pool of fixed-size blocks per layer, block tables per sequence, reference-counted blocks.

Block 0 is never handed out: padding tokens write there and block tables are padded with it, so fixed-shape
(CUDA-graph) steps need no branches. Reference counts let a prefix shared by several sequences (samples, beams,
rows with a common prompt prefix) be stored once; `fork` shares blocks, `free` returns them when unused.
"""

from __future__ import annotations

import torch

from reldl.errors import OperationalError
from reldl.llm.attention import LayerKV
from reldl.llm.config import ModelConfig

TRASH_BLOCK = 0


class BlockAllocator:
    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise OperationalError("KV cache too small: need at least 2 blocks")
        self.num_blocks = num_blocks
        self.refcount = [0] * num_blocks
        self.free_blocks = list(range(num_blocks - 1, TRASH_BLOCK, -1))

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_blocks):
            raise OperationalError(f"KV cache exhausted: need {n} blocks, {len(self.free_blocks)} free")
        out = [self.free_blocks.pop() for _ in range(n)]
        for b in out:
            self.refcount[b] = 1
        return out

    def fork(self, blocks: list[int]) -> list[int]:
        for b in blocks:
            self.refcount[b] += 1
        return list(blocks)

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refcount[b] -= 1
            if self.refcount[b] == 0:
                self.free_blocks.append(b)


class PagedKVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, device, dtype):
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim)
        self.layers = [
            LayerKV(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(cfg.num_layers)
        ]
        self.allocator = BlockAllocator(num_blocks)

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy whole blocks src[i] -> dst[i] in every layer (copy-on-write of a forked sequence's partial block)."""
        if not src:
            return
        dev = self.layers[0].k.device
        s = torch.tensor(src, dtype=torch.long, device=dev)
        d = torch.tensor(dst, dtype=torch.long, device=dev)
        bs = self.block_size
        for layer in self.layers:
            for t in (layer.k, layer.v):
                view = t.view(self.num_blocks, bs, *t.shape[1:])
                view.index_copy_(0, d, view.index_select(0, s))

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def slot(self, blocks: list[int], position: int) -> int:
        return blocks[position // self.block_size] * self.block_size + position % self.block_size
