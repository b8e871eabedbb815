"""Tree attention (DeFT): decoding queries of many branches that share KV prefixes, each KV entry read once.

The tree's KV is laid out once, in pre-order: every token appears once, a node's tokens are consecutive and a node's
subtree follows it. With `end[t]` the last layout index of token t's subtree, token t is visible to a query whose
own token sits at layout index x exactly when `t <= x <= end[t]` (t is x or one of its ancestors). Queries are kept
in layout order, so the queries that see any token of a run of consecutive layout tokens form one contiguous range:
that is what KV-guided grouping needs, with no per-(block, query) bitmask.

`TreeLayout` is the whole description; the builders make one from a paged KV cache's block tables (branches that
share cache blocks share KV: samples and beams forked from one prompt) or from an explicit tree of nodes (speculative
token trees, tree-of-thought). Both build token-level tensors with torch ops on the tensors' device; only node-level
work (a few hundred nodes at most) runs in Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TreeLayout:
    """The KV of a token tree, once each, in pre-order; and the queries, in layout order.

    slots [L] int64: the paged-cache slot holding layout token t's K/V.
    end [L] int32: the last layout index of token t's subtree (t visible to query x iff t <= q_index[x] <= end[t]).
    q_index [Q] int32: the layout index of each query's own token, non-decreasing.
    """

    slots: torch.Tensor
    end: torch.Tensor
    q_index: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.slots.shape[0]

    @property
    def num_queries(self) -> int:
        return self.q_index.shape[0]

    def visible(self) -> torch.Tensor:
        """Dense [Q, L] visibility mask (for references and tests; the kernel never builds it)."""
        t = torch.arange(self.num_tokens, device=self.slots.device)
        x = self.q_index.long().unsqueeze(1)
        return (t <= x) & (x <= self.end.long())


def layout_from_block_tables(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> TreeLayout:
    """The tree of B sequences whose block tables share physical blocks (forked samples or beams), one query each.

    block_tables [B, NB]; context_lens [B] (tokens in the cache, the newest being the query's own token). Rows that
    share the block at column i must share every earlier column and be adjacent (rows in tree order). Each shared
    block is laid out once, under the first row holding it; a row's query is its newest token.
    """
    dev = block_tables.device
    tables = block_tables.long()
    ctx = context_lens.to(device=dev, dtype=torch.long)
    B, NB = tables.shape
    col = torch.arange(NB, device=dev)
    used = col.unsqueeze(0) * block_size < ctx.unsqueeze(1)  # [B, NB] columns holding tokens
    same_as_prev = torch.zeros_like(used)
    same_as_prev[1:] = (tables[1:] == tables[:-1]) & used[1:] & used[:-1]
    first = used & ~same_as_prev  # the row lays this block out
    # first column each row owns (ownership is a suffix of the used columns)
    own_from = torch.where(first, col.unsqueeze(0), NB).min(1).values
    owned = (ctx - own_from * block_size).clamp(min=0)  # tokens each row lays out
    row_end = owned.cumsum(0) - 1  # layout index of each row's last (= query) token
    # rows sharing column i's block with row b: b .. next_first[b, i] - 1
    rows = torch.arange(B, device=dev).unsqueeze(1).expand(B, NB)
    marker = torch.where(first | ~used, rows, B)
    next_first = torch.full_like(marker, B)
    if B > 1:
        next_first[:-1] = marker[1:].flip(0).cummin(0).values.flip(0)
    # token-level: row b's tokens own_from[b]*bs .. ctx[b]-1
    tok_row = torch.repeat_interleave(torch.arange(B, device=dev), owned)
    start = torch.cumsum(owned, 0) - owned
    pos = torch.arange(int(owned.sum()), device=dev) - start[tok_row] + own_from[tok_row] * block_size
    blk = pos // block_size
    slots = tables[tok_row, blk] * block_size + pos % block_size
    end = row_end[next_first[tok_row, blk] - 1]
    return TreeLayout(slots=slots, end=end.to(torch.int32), q_index=row_end.to(torch.int32))


def layout_from_tree(
    parents: Sequence[int],
    node_lens: Sequence[int],
    slots: torch.Tensor,
    queries: Sequence[tuple[int, int]],
) -> TreeLayout:
    """A tree of nodes given in pre-order (parents[i] < i, -1 for a root; a node's subtree follows it).

    node_lens[i] tokens per node; slots: the cache slots of all tokens, node after node; queries: (node, offset
    within the node) of each query's own token, in layout order. A node's tokens form a chain: token k of a node
    sees the node's tokens 0..k and its ancestors' tokens.
    """
    n = len(parents)
    if len(node_lens) != n:
        raise ValueError(f"layout_from_tree: {n} parents but {len(node_lens)} node lengths")
    dev = slots.device
    lens = torch.tensor(list(node_lens), dtype=torch.long)
    if bool((lens <= 0).any()):
        raise ValueError("layout_from_tree: every node needs at least one token")
    if slots.shape[0] != int(lens.sum()):
        raise ValueError(f"layout_from_tree: {slots.shape[0]} slots for {int(lens.sum())} tokens")
    start = (lens.cumsum(0) - lens).tolist()
    # pre-order check and subtree ends: walk the stack of open ancestors
    last_node = list(range(n))
    stack: list[int] = []
    for i, p in enumerate(parents):
        if p >= i or p < -1:
            raise ValueError(f"layout_from_tree: node {i} has parent {p}; nodes must be in pre-order")
        while stack and stack[-1] != p:
            stack.pop()
        if p != -1 and not stack:
            raise ValueError(f"layout_from_tree: node {i}'s parent {p} is not on the current path (not pre-order)")
        for a in stack:
            last_node[a] = i
        stack.append(i)
    node_end = torch.tensor([start[j] + node_lens[j] - 1 for j in last_node], dtype=torch.long)
    node_of = torch.repeat_interleave(torch.arange(n), lens)
    # within a node the chain: token k's subtree is the rest of the node plus the node's subtree
    end = node_end[node_of]
    q = torch.tensor([start[node] + off for node, off in queries], dtype=torch.long)
    for node, off in queries:
        if not 0 <= node < n or not 0 <= off < node_lens[node]:
            raise ValueError(f"layout_from_tree: query ({node}, {off}) is not a token of the tree")
    if q.numel() > 1 and bool((q[1:] < q[:-1]).any()):
        raise ValueError("layout_from_tree: queries must be in layout (pre-)order")
    return TreeLayout(slots=slots.long(), end=end.to(device=dev, dtype=torch.int32), q_index=q.to(dev, torch.int32))


def tree_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: TreeLayout, scale: float
) -> torch.Tensor:
    """q [Q, H, D]; k_cache/v_cache [slots, KVH, D] -> [Q, H, D] in q.dtype, computed in float32 over a dense mask."""
    Q, H, D = q.shape
    kvh = k_cache.shape[1]
    k = k_cache[layout.slots].float().transpose(0, 1)  # [KVH, L, D]
    v = v_cache[layout.slots].float().transpose(0, 1)
    qg = q.float().view(Q, kvh, H // kvh, D).permute(1, 0, 2, 3).reshape(kvh, Q * (H // kvh), D)
    mask = layout.visible().repeat_interleave(H // kvh, dim=0)  # [Q*G, L]
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return out.view(kvh, Q, H // kvh, D).permute(1, 0, 2, 3).reshape(Q, H, D).to(q.dtype)
