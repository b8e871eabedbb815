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

import math

import torch
import torch.nn.functional as F

from reldl.kernels._triton import cdiv, next_pow2, pdl_launch_opts, require_triton, tl, triton
from reldl.kernels.paged_attention import LOG2E, num_sms


class TreeLayout:
    """The KV of a token tree, once each, in pre-order; and the queries, in layout order.

    slots [L] int64: the paged-cache slot holding layout token t's K/V.
    end [L] int32: the last layout index of token t's subtree (t visible to query x iff t <= q_index[x] <= end[t]).
    q_index [Q] int32: the layout index of each query's own token, non-decreasing.

    (A plain class rather than a dataclass: kernels/ imports nothing but torch and triton.)
    """

    __slots__ = ("slots", "end", "q_index")

    def __init__(self, slots: torch.Tensor, end: torch.Tensor, q_index: torch.Tensor):
        self.slots = slots
        self.end = end
        self.q_index = q_index

    def __repr__(self) -> str:
        return f"TreeLayout(num_tokens={self.num_tokens}, num_queries={self.num_queries}, device={self.slots.device})"

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
    parents: list[int] | tuple[int, ...],
    node_lens: list[int] | tuple[int, ...],
    slots: torch.Tensor,
    queries: list[tuple[int, int]] | tuple[tuple[int, int], ...],
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


# ---------------------------------------------------------------------------------------------------------------------
# The Triton kernel: KV-guided grouping (DeFT). The layout is cut into chunks of consecutive tokens; one program per
# (work item = chunk x query tile, KV head) reads the chunk's K/V once for all the queries that see any of its tokens
# and all the query heads of the KV head's GQA group, and writes one partial (log-sum-exp in fp32, normalized output
# in the output dtype) per (chunk, query, head); a second kernel merges each query's partials in chunk order
# (deterministic, no atomics).
# ---------------------------------------------------------------------------------------------------------------------

_W_ONE = 1 << 24  # fixed-point unit of the chunking weights (integer cumsum: exact and deterministic)

# chunking knobs (see plan_tree_attention)
PARTIAL_FACTOR = 4  # a chunk seen by n queries of group g is at least PARTIAL_FACTOR * n * g tokens long ...
MIN_CHUNK = 128  # ... and at least this long, unless shortened to fill the GPU (never below BLOCK_N) ...
MAX_CHUNK = 1024  # ... and at most this long
PROGRAMS_PER_SM = 2  # shorten chunks until about this many programs per SM are launched
COMPUTE_BOUND_ROWS = 128  # query rows per token above which a tree is compute-bound (about an H100/H200's ridge)
PREFIX_ROWS = 40  # memory-bound trees with at least this many rows per token: a shared prefix dominates the KV
HEAVY_ROWS = 640  # compute-bound trees with at least this many rows per token (256-token speculative trees)
HEAVY_MAX_CHUNK = 2048  # MAX_CHUNK of those: fewer partials to write and merge


CONFIG_OVERRIDES: dict = {}  # entries that replace tree_attention_config's everywhere (benchmarks' A/B of a setting)


def tree_attention_config(head_dim: int, group: int, dtype: torch.dtype, intensity: float | None = None) -> dict:
    """Tile sizes and launch options of the main kernel. Rows of a tile = query tile x (group padded to a power of
    two); two tile heights: BLOCK_M_NARROW for chunks seen by few queries (decode branches: one query, one GQA
    group), BLOCK_M_WIDE for chunks seen by many (shared prefixes, speculative trees). Every tl.dot dimension is
    >= 16. `intensity`: the tree's mean query rows (queries x group) per token, from the plan: below
    COMPUTE_BOUND_ROWS the kernel streams K/V (short key tiles: more tiles in flight), above it it is bound by the
    matrix units. Key tiles of 64 where the mean rows per token (intensity) is in [PREFIX_ROWS,
    COMPUTE_BOUND_ROWS) (a long prefix shared by many queries: half the iterations of the prefix programs) or at
    least HEAVY_ROWS (the largest speculative trees), else 32 (branch-dominated and tree-of-thought trees, and
    speculative trees of 64-128 tokens); HEAVY_ROWS trees also get MAX_CHUNK = HEAVY_MAX_CHUNK. Chosen from a sweep
    on an H100 (benchmarks/sweep_tree_attention.py, 2026-11-27: 40 tile configs x 144 chunkings on the 21 DeFT
    workloads); the tile height, warps, stages and merge tiles (unchanged) were the best single choice across the
    workloads; DENSE and PREFETCH_KV lost on most of them and are off. The slots of the next key tile are loaded
    during the current one (PREFETCH: the K/V loads no longer wait for their slot loads), measured 1.5-2x faster
    on an H200. Memory-bound trees (intensity below COMPUTE_BOUND_ROWS) chain the merge to phase 1 with
    programmatic dependent launch (PDL)."""
    block_d = max(16, next_pow2(head_dim))
    block_g = next_pow2(group)
    narrow = max(16, block_g)
    block_n = 64 if (block_d <= 128 and dtype != torch.float32) or block_d <= 64 else 32
    heavy = intensity is not None and intensity >= HEAVY_ROWS
    if intensity is not None and not (PREFIX_ROWS <= intensity < COMPUTE_BOUND_ROWS or heavy):
        block_n = 32
    return {
        "BLOCK_G": block_g,
        "BLOCK_D": block_d,
        "BLOCK_N": block_n,
        "BLOCK_M_NARROW": narrow,
        "BLOCK_M_WIDE": max(narrow, 64),
        "DOT_PREC": "ieee" if dtype == torch.float32 else "tf32",
        "num_warps": 4,
        "num_stages": 3,
        "EARLY_V": False,  # issue the V load before the softmax (more bytes in flight, more registers)
        "PREFETCH": True,  # load the next tile's slots during this tile (software pipelining by hand)
        "PREFETCH_KV": False,  # load the next tile's K/V (and the slots of the one after) during this tile
        # items whose chunk every query of the tile sees in full skip the visibility mask: off, it compiles two more
        # tile variants (more registers and shared memory) and was slower on most of the sweep's workloads
        "DENSE": False,
        "maxnreg": None,  # register cap per thread (more programs resident per SM), None: the compiler's choice
        # K/V element offsets in int32 where every offset into the caches is below 2**31 (fewer registers per gathered
        # tile). H100, few-shot trees (results/2026-11-28-tree-attention-offs32-h100.json): 20x50 16.1 -> 14.9 us,
        # 30x50 19.2 -> 17.7, 50x50 31.3 -> 27.6, the longer branches unchanged
        "OFFS32": True,
        "KV_FAST": True,  # program order: the KV heads of one item next to each other (else items first)
        # programmatic dependent launch (where supported: sm_90+, compiled): the merge is launched while phase 1's
        # last programs run and waits for them on the GPU; phase 1 likewise after the kernel before it. Memory-bound
        # trees only: on the H100 (2026-11-27, results/2026-11-27-tree-attention-pdl-h100.json) it saved 0.3-1.3 us
        # on 8 of the 9 few-shot trees and on tree-of-thought depth 1 and 3, but cost 1.6-11.6 us on speculative
        # trees of 64-128 tokens (merge programs resident while phase 1 still runs)
        "PDL": intensity is not None and intensity < COMPUTE_BOUND_ROWS,
        # the planner's chunking (see plan_tree_attention)
        "PARTIAL_FACTOR": PARTIAL_FACTOR,
        "MIN_CHUNK": MIN_CHUNK,
        "MAX_CHUNK": HEAVY_MAX_CHUNK if heavy else MAX_CHUNK,
        "PROGRAMS_PER_SM": PROGRAMS_PER_SM,
        "FULL_WAVES": False,  # also shorten chunks when programs overshoot a wave, to fill the last wave
        # the merge kernel: partials loaded MERGE_BLOCK_P at a time, MERGE_HEADS heads per program
        "MERGE_BLOCK_P": 16,
        "MERGE_HEADS": 2,
        "merge_warps": 1,
        **CONFIG_OVERRIDES,
    }


class TreeAttentionPlan:
    """Work decomposition of one layout for given head counts and head dim (see `plan_tree_attention`).

    Device tensors (on the layout's device):
      chunk_start, chunk_end [C] int32: chunk c holds layout tokens [chunk_start[c], chunk_end[c]).
      chunk_qlo, chunk_qhi [C] int32: the queries seeing any token of chunk c are [chunk_qlo[c], chunk_qhi[c]).
      chunk_pbase [C] int64: partial row of (chunk c, query x) = chunk_pbase[c] + x - chunk_qlo[c].
      item_chunk, item_q0 [I] int32, item_wide [I] int8: phase-1 work items (a chunk and a tile of its queries
        starting at item_q0, BLOCK_M_WIDE rows if item_wide else BLOCK_M_NARROW), longest chunks first.
      item_dense [I] int8: every token of the item's chunk is visible to every query of its tile (no mask).
      item_meta [I, 8] int32: what the kernel reads of item i (chunk start and end, q0, the chunk's qhi, partial
        row base = chunk_pbase - chunk_qlo, wide, dense), one row: one memory latency before the first K/V load.
      merge_ptr [Q + 1] int64, merge_rows [P] int64: query x merges partial rows merge_rows[merge_ptr[x]:
        merge_ptr[x + 1]], in chunk order.
    Python ints: num_chunks, num_items, num_partials, max_partials (most partials of one query) (launch grids and
    workspace sizes come from these, so a plan reused while the tree is unchanged lets `tree_attention` run without
    host syncs, inside a CUDA graph). direct: every query has exactly one partial (written straight to the output,
    no merge). dtype, config: the dtype planned for and the kernels' config (tiles, warps, stages, merge tiles);
    intensity: mean query rows per token (picks the key tile, see tree_attention_config).
    """

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def __repr__(self) -> str:
        return (
            f"TreeAttentionPlan(tokens={self.num_tokens}, queries={self.num_queries}, chunks={self.num_chunks}, "
            f"items={self.num_items}, partials={self.num_partials}, heads={self.num_heads}/{self.num_kv_heads})"
        )

    def matches(self, layout: TreeLayout, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
        return (
            self.num_tokens == layout.num_tokens
            and self.num_queries == layout.num_queries
            and (self.num_heads, self.num_kv_heads, self.head_dim) == (num_heads, num_kv_heads, head_dim)
        )


def plan_tree_attention(
    layout: TreeLayout,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float16,
    sms: int | None = None,
    chunk_tokens: int | None = None,
    partial_factor: float | None = None,
    min_chunk: int | None = None,
    max_chunk: int | None = None,
    programs_per_sm: float | None = None,
    config: dict | None = None,
) -> TreeAttentionPlan:
    """Cut the layout into chunks of consecutive tokens and lay out the partials and the merge, with torch ops on
    the layout's device (no Python loops over tokens or queries).

    Chunking: token t is seen by the queries [lo_t, hi_t) (lo_t = searchsorted(q_index, t), hi_t =
    searchsorted(q_index, end[t], right)), n_t = hi_t - lo_t of them. It asks for a chunk of
    T_t = clamp(PARTIAL_FACTOR * n_t * group, MIN_CHUNK, MAX_CHUNK) tokens (long where many queries share the
    tokens, so that the partials, n_t * heads * (head_dim + 2) floats per chunk, stay small next to the chunk's KV;
    short where few do). If the resulting programs (chunks x query tiles x KV heads) number fewer than
    PROGRAMS_PER_SM per SM, every T_t is divided by the shortfall (not below BLOCK_N). Chunks are then the runs
    where floor(cumsum of 1/T_t) is constant (fixed-point integers: exact, deterministic): neighbouring runs of
    1-token nodes merge into one chunk whose query range is the union, masked per (token, query) in the kernel.
    `chunk_tokens` forces T_t = chunk_tokens for every token (tests, tuning); the other keywords override the
    config's chunking entries (PARTIAL_FACTOR, MIN_CHUNK, MAX_CHUNK, PROGRAMS_PER_SM; tuning); `config` overrides
    entries of `tree_attention_config` (tuning; the plan keeps the config and the kernels use it). The partial of
    a (chunk, query) pair costs about `group` tokens' worth of K/V bytes (written and read back, in the output
    dtype), hence the factor: partials add ~1/PARTIAL_FACTOR to the IO.

    Host syncs: five small device-to-host reads (the tree's intensity, the programs estimate, the chunk count, the
    item and partial counts, the fewest and most partials of a query); compute the plan once per tree and reuse it
    while the tree is unchanged.
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"plan_tree_attention: {num_heads} query heads is not a multiple of {num_kv_heads} KV heads")
    dev = layout.slots.device
    L, Q = layout.num_tokens, layout.num_queries
    group = num_heads // num_kv_heads
    i32, i64 = torch.int32, torch.int64
    qidx = layout.q_index.to(i64)
    end = layout.end.to(i64)
    tok = torch.arange(L, device=dev, dtype=i64)
    lo_t = torch.searchsorted(qidx, tok)
    hi_t = torch.searchsorted(qidx, end, right=True)
    n_t = (hi_t - lo_t).clamp(min=0)
    intensity = float(n_t.double().mean()) * group if L else 0.0  # (a host sync)
    cfg = dict(tree_attention_config(head_dim, group, dtype, intensity), **(config or {}))
    for key, val in (
        ("PARTIAL_FACTOR", partial_factor),
        ("MIN_CHUNK", min_chunk),
        ("MAX_CHUNK", max_chunk),
        ("PROGRAMS_PER_SM", programs_per_sm),
    ):
        if val is not None:
            cfg[key] = val
    partial_factor, min_chunk, max_chunk = cfg["PARTIAL_FACTOR"], cfg["MIN_CHUNK"], cfg["MAX_CHUNK"]
    programs_per_sm = cfg["PROGRAMS_PER_SM"]
    bg, bm_n, bm_w, bn = cfg["BLOCK_G"], cfg["BLOCK_M_NARROW"], cfg["BLOCK_M_WIDE"], cfg["BLOCK_N"]
    bq_n, bq_w = bm_n // bg, bm_w // bg

    def tiles(n):
        return torch.where(n * bg > bm_n, (n + bq_w - 1) // bq_w, (n + bq_n - 1) // bq_n)

    if chunk_tokens is not None:
        want = torch.full_like(n_t, max(1, int(chunk_tokens)))
    else:
        want = (partial_factor * group * n_t).to(i64).clamp(min=min_chunk, max=max(min_chunk, max_chunk))
        sms = sms if sms is not None else num_sms(dev)
        target = programs_per_sm * sms
        # programs ~ sum_t tiles_t / T_t * KVH (a chunk of T tokens seen by n queries: tiles(n) items)
        est = float((tiles(n_t).double() / want.double()).sum()) * num_kv_heads if L else 0.0
        if 0 < est and cfg["FULL_WAVES"] and est > target:
            # shorten chunks so the programs fill their last wave (about PROGRAMS_PER_SM per SM each wave)
            target = math.ceil(est / target) * target
        if 0 < est < target:
            want = (want.double() * (est / target)).floor().to(i64).clamp(min=min(bn, min_chunk))
    w = _W_ONE // want  # 1/T_t in fixed point; <= _W_ONE, so chunk ids step by at most 1
    cid = (torch.cumsum(w, 0) - w) // _W_ONE  # [L] non-decreasing, dense 0..C-1
    C = int(cid[-1]) + 1 if L else 0
    counts = torch.bincount(cid, minlength=C)
    start = torch.cumsum(counts, 0) - counts
    qlo = lo_t[start] if C else torch.zeros(0, dtype=i64, device=dev)
    qhi = torch.zeros(C, dtype=i64, device=dev).scatter_reduce(0, cid, hi_t, reduce="amax", include_self=True)
    nq = (qhi - qlo).clamp(min=0)
    wide = nq * bg > bm_n
    nt = tiles(nq)
    pbase = torch.cumsum(nq, 0) - nq
    sizes = torch.stack([nt.sum(), nq.sum()]).tolist() if C else [0, 0]
    num_items, P = int(sizes[0]), int(sizes[1])
    # work items, longest chunks first (stable: deterministic); the order only affects scheduling
    item_chunk = torch.repeat_interleave(torch.arange(C, device=dev, dtype=i64), nt, output_size=num_items)
    tile_base = torch.cumsum(nt, 0) - nt
    bq = torch.where(wide, bq_w, bq_n)
    item_q0 = qlo[item_chunk] + (torch.arange(num_items, device=dev) - tile_base[item_chunk]) * bq[item_chunk]
    order = torch.argsort(-counts[item_chunk], stable=True)
    item_chunk, item_q0 = item_chunk[order], item_q0[order]
    # dense items: every token of the chunk visible to every query of the tile (queries are sorted, so: the chunk's
    # last token <= the tile's first query, and the tile's last query <= the chunk's smallest subtree end)
    cmin_end = torch.full((C,), L, dtype=i64, device=dev).scatter_reduce(0, cid, end, reduce="amin")
    item_qlast = torch.minimum(item_q0 + bq[item_chunk], qhi[item_chunk]) - 1
    dense = ((start + counts)[item_chunk] - 1 <= qidx[item_q0]) & (cmin_end[item_chunk] >= qidx[item_qlast])
    if not cfg["DENSE"]:
        dense = torch.zeros_like(dense)
    # the kernel's per-item metadata, one row of 8 int32: t0, t1, q0, qhi, partial row base (pbase - qlo), wide,
    # dense
    item_meta = torch.zeros((num_items, 8), dtype=i32, device=dev)
    if num_items:
        item_meta[:, :7] = torch.stack(
            [
                start[item_chunk],
                (start + counts)[item_chunk],
                item_q0,
                qhi[item_chunk],
                (pbase - qlo)[item_chunk],
                wide[item_chunk].to(i64),
                dense.to(i64),
            ],
            1,
        ).to(i32)
    # merge lists: pair p = (chunk, query) is partial row p; each query's rows in chunk order
    pair_chunk = torch.repeat_interleave(torch.arange(C, device=dev, dtype=i64), nq, output_size=P)
    pair_q = torch.arange(P, device=dev) - pbase[pair_chunk] + qlo[pair_chunk]
    merge_rows = torch.argsort(pair_q, stable=True)
    per_q = torch.bincount(pair_q, minlength=Q)  # partials per query
    merge_ptr = torch.zeros(Q + 1, dtype=i64, device=dev)
    merge_ptr[1:] = torch.cumsum(per_q, 0)
    lo_hi = torch.stack([per_q.min(), per_q.max()]).tolist() if Q else [0, 0]
    return TreeAttentionPlan(
        num_tokens=L,
        num_queries=Q,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        num_chunks=C,
        num_items=num_items,
        num_partials=P,
        max_partials=int(lo_hi[1]),
        # every query seen by exactly one chunk: partial row = query, phase 1 writes the output (no merge)
        direct=lo_hi[0] == 1 and lo_hi[1] == 1,
        dtype=dtype,
        intensity=intensity,
        config=cfg,
        chunk_start=start.to(i32),
        chunk_end=(start + counts).to(i32),
        chunk_qlo=qlo.to(i32),
        chunk_qhi=qhi.to(i32),
        chunk_pbase=pbase,
        item_chunk=item_chunk.to(i32),
        item_q0=item_q0.to(i32),
        item_wide=wide[item_chunk].to(torch.int8),
        item_dense=dense.to(torch.int8),
        item_meta=item_meta,
        merge_ptr=merge_ptr,
        merge_rows=merge_rows,
    )


class TreePlanBuffers:
    """A layout and a plan at fixed sizes in fixed device buffers, for CUDA graphs: `tree_attention(q, k, v,
    bufs.layout, scale, bufs.plan)` is captured once and replayed for every tree whose plan `fits`, after `load`
    copies that tree's layout and plan in (a few host-to-device copies; no host syncs, nothing reallocated).

    Sizes: num_queries rows of q (the graph's batch), num_items work items (the phase-1 grid), num_partials partial
    rows (the workspace), and the token buffers `slots` [N] int64 / `end` [N] int32, which may be shared by several
    TreePlanBuffers (N bounds the layout's tokens: every layout token is a distinct cache slot). Padding reads and
    writes nothing: tokens past the layout's are covered by no item (their stale values are never read); queries past
    the layout's get q_index = N (no token visible), no partials, zero output; items past the plan's have t0 = t1 = 0
    and qhi = 0 (no K/V loads, every store masked); partial rows past the plan's are never written or read. The
    merge always runs (also for direct plans), BLOCK_P = MERGE_BLOCK_P, so the kernels' constants stay fixed.
    `template`: a plan of the head configuration and config (tile sizes) the buffers are for.
    """

    def __init__(
        self,
        template: TreeAttentionPlan,
        num_queries: int,
        num_items: int,
        num_partials: int,
        slots: torch.Tensor,
        end: torch.Tensor,
    ):
        dev = slots.device
        Q, I, P = num_queries, num_items, num_partials
        self.small32 = torch.zeros(Q + 8 * I, dtype=torch.int32, device=dev)  # q_index | item_meta
        self.small64 = torch.zeros(Q + 1 + P, dtype=torch.int64, device=dev)  # merge_ptr | merge_rows
        q_index = self.small32[:Q]
        self.layout = TreeLayout(slots=slots, end=end, q_index=q_index)
        fields = dict(template.__dict__)
        for name in ("chunk_start", "chunk_end", "chunk_qlo", "chunk_qhi", "chunk_pbase", "item_chunk", "item_q0"):
            fields[name] = None  # host-side bookkeeping of the source plan; the kernels never read it
        fields["item_dense"] = None
        fields.update(
            num_tokens=slots.shape[0],
            num_queries=Q,
            num_items=I,
            num_partials=P,
            num_chunks=None,
            max_partials=template.config["MERGE_BLOCK_P"],
            direct=False,
            item_wide=None,
            item_meta=self.small32[Q:].view(I, 8),
            merge_ptr=self.small64[: Q + 1],
            merge_rows=self.small64[Q + 1 :],
        )
        self.plan = TreeAttentionPlan(**fields)

    def fits(self, layout: TreeLayout, plan: TreeAttentionPlan) -> bool:
        b = self.plan
        return (
            layout.num_tokens <= b.num_tokens
            and plan.num_queries <= b.num_queries
            and plan.num_items <= b.num_items
            and plan.num_partials <= b.num_partials
            and (plan.num_heads, plan.num_kv_heads, plan.head_dim, plan.dtype)
            == (b.num_heads, b.num_kv_heads, b.head_dim, b.dtype)
            and plan.config == b.config
        )

    def load(self, layout: TreeLayout, plan: TreeAttentionPlan) -> None:
        """Copy a layout and its plan in (they may live on the host: planning there needs no device syncs)."""
        if not self.fits(layout, plan):
            raise ValueError(f"TreePlanBuffers.load: {plan} does not fit {self.plan}")
        b = self.plan
        L, Q, I, P = layout.num_tokens, plan.num_queries, plan.num_items, plan.num_partials
        Qb, Ib = b.num_queries, b.num_items
        src = layout.slots.device
        s32 = torch.zeros(Qb + 8 * Ib, dtype=torch.int32, device=src)
        s32[:Q] = layout.q_index
        s32[Q:Qb] = b.num_tokens  # padding queries see nothing
        s32[Qb : Qb + 8 * I] = plan.item_meta.reshape(-1)
        s64 = torch.empty(Qb + 1 + P, dtype=torch.int64, device=src)
        s64[: Q + 1] = plan.merge_ptr
        s64[Q + 1 : Qb + 1] = P  # padding queries: no partials
        s64[Qb + 1 :] = plan.merge_rows
        self.small32.copy_(s32, non_blocking=True)
        self.small64[: Qb + 1 + P].copy_(s64, non_blocking=True)
        self.layout.slots[:L].copy_(layout.slots, non_blocking=True)
        self.layout.end[:L].copy_(layout.end, non_blocking=True)


@triton.jit
def _tree_tile(
    q_ptr,
    k_ptr,
    v_ptr,
    slots_ptr,
    end_ptr,
    qidx_ptr,
    lse_ptr,
    o_ptr,
    kvh,
    t0,
    t1,
    q0,
    qhi,
    prow0,
    qk_scale,
    stride_qq,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    EARLY_V: tl.constexpr,
    PREFETCH: tl.constexpr,
    PREFETCH_KV: tl.constexpr,
    MASKED: tl.constexpr,
    SLOT_T: tl.constexpr,
):
    """Rows = BLOCK_M // BLOCK_G queries (q0 ...) x BLOCK_G heads of KV head kvh, over chunk tokens [t0, t1).
    MASKED=False: the plan found every token of the chunk visible to every query of the tile (a dense item: shared
    prefixes, a branch's own chunk), so the subtree ends are neither loaded nor compared; only the chunk's tail is
    masked. SLOT_T: the integer type of the K/V element offsets (int32 where every offset into the caches is below
    2**31: half the registers of the per-element offsets of a gathered tile)."""
    r = tl.arange(0, BLOCK_M)
    qrow = q0 + r // BLOCK_G
    g = r % BLOCK_G
    row_ok = (qrow < qhi) & (g < GROUP)
    head = kvh * GROUP + g
    d = tl.arange(0, BLOCK_D)
    dm = d < HEAD_DIM
    qrow64 = qrow.to(tl.int64)
    qpos = tl.load(qidx_ptr + qrow64, mask=row_ok, other=-1)
    q = tl.load(
        q_ptr + qrow64[:, None] * stride_qq + head[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None] & dm[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n = tl.arange(0, BLOCK_N)
    k_head = k_ptr + kvh * stride_kh
    v_head = v_ptr + kvh * stride_vh
    if PREFETCH_KV:  # the first tile's K/V and subtree ends and the second tile's slots, before the loop
        tv0 = t0 + n < t1
        slot0 = tl.load(slots_ptr + t0 + n, mask=tv0, other=0).to(SLOT_T)
        m0 = tv0[:, None] & dm[None, :]
        k_nx = tl.load(k_head + slot0[:, None] * stride_ks + d[None, :], mask=m0, other=0.0)
        v_nx = tl.load(v_head + slot0[:, None] * stride_vs + d[None, :], mask=m0, other=0.0)
        if MASKED:
            tend_nx = tl.load(end_ptr + t0 + n, mask=tv0, other=-1)
        n1 = t0 + BLOCK_N + n
        slot_nx = tl.load(slots_ptr + n1, mask=n1 < t1, other=0).to(SLOT_T)
    elif PREFETCH:  # the first tile's slots and subtree ends; each iteration loads the next tile's
        slot_nx = tl.load(slots_ptr + t0 + n, mask=t0 + n < t1, other=0).to(SLOT_T)
        if MASKED:
            tend_nx = tl.load(end_ptr + t0 + n, mask=t0 + n < t1, other=-1)
    for first in range(t0, t1, BLOCK_N):
        toks = first + n
        tv = toks < t1
        if PREFETCH_KV:
            # this tile's K/V arrived during the previous tile; issue the next tile's K/V (its slots arrived too)
            # and the slots of the one after, so one memory latency overlaps a whole tile of work
            k = k_nx
            v = v_nx
            nx = toks + BLOCK_N
            nxm = (nx < t1)[:, None] & dm[None, :]
            k_nx = tl.load(k_head + slot_nx[:, None] * stride_ks + d[None, :], mask=nxm, other=0.0)
            v_nx = tl.load(v_head + slot_nx[:, None] * stride_vs + d[None, :], mask=nxm, other=0.0)
            if MASKED:
                tend = tend_nx
                tend_nx = tl.load(end_ptr + nx, mask=nx < t1, other=-1)
            nx2 = nx + BLOCK_N
            slot_nx = tl.load(slots_ptr + nx2, mask=nx2 < t1, other=0).to(SLOT_T)
        else:
            if PREFETCH:
                slot = slot_nx
                nx = toks + BLOCK_N
                slot_nx = tl.load(slots_ptr + nx, mask=nx < t1, other=0).to(SLOT_T)
                if MASKED:
                    tend = tend_nx
                    tend_nx = tl.load(end_ptr + nx, mask=nx < t1, other=-1)
            else:
                slot = tl.load(slots_ptr + toks, mask=tv, other=0).to(SLOT_T)
                if MASKED:
                    tend = tl.load(end_ptr + toks, mask=tv, other=-1)
            kv_mask = tv[:, None] & dm[None, :]
            k = tl.load(k_head + slot[:, None] * stride_ks + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if MASKED:
            vis = (toks[None, :] <= qpos[:, None]) & (qpos[:, None] <= tend[None, :])
            s = tl.where(vis, s, float("-inf"))
        else:
            s = tl.where(tv[None, :], s, float("-inf"))  # the chunk's tail only
        if EARLY_V and not PREFETCH_KV:
            v = tl.load(v_head + slot[:, None] * stride_vs + d[None, :], mask=kv_mask, other=0.0)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if not EARLY_V and not PREFETCH_KV:
            v = tl.load(v_head + slot[:, None] * stride_vs + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    # partial = (log2-sum-exp, normalized output in the output dtype): half the bytes of (max, sum, fp32 acc)
    part = (prow0 + qrow64) * NUM_HEADS + head  # [BLOCK_M] int64: (partial row, head)
    seen = l_i > 0
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    if WRITE_LSE:
        tl.store(lse_ptr + part, lse, mask=row_ok)
    tl.store(
        o_ptr + part[:, None] * HEAD_DIM + d[None, :], o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & dm[None, :]
    )


@triton.jit
def _tree_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    slots_ptr,
    end_ptr,
    qidx_ptr,
    meta_ptr,
    lse_ptr,
    o_ptr,
    qk_scale,
    stride_qq,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    NUM_KV_HEADS: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M_NARROW: tl.constexpr,
    BLOCK_M_WIDE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    EARLY_V: tl.constexpr,
    PREFETCH: tl.constexpr,
    PREFETCH_KV: tl.constexpr,
    KV_FAST: tl.constexpr,
    USE_DENSE: tl.constexpr,
    PDL: tl.constexpr = False,
    OFFS32: tl.constexpr = False,
):
    SLOT_T: tl.constexpr = tl.int32 if OFFS32 else tl.int64
    if PDL:  # let the merge start launching; wait for the kernel before this one (it may have written q)
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    # 1-D grid over (item, KV head); KV_FAST: the KV heads of one item are neighbouring programs (they run together
    # and read the same cache rows, [slots, KVH, D], at the same time)
    pid = tl.program_id(0)
    if KV_FAST:
        item = pid // NUM_KV_HEADS
        kvh = pid % NUM_KV_HEADS
    else:
        num_items = tl.num_programs(0) // NUM_KV_HEADS
        item = pid % num_items
        kvh = pid // num_items
    # the item's metadata, one row of 8 int32 (independent loads: one memory latency)
    meta = meta_ptr + item.to(tl.int64) * 8
    t0 = tl.load(meta)
    t1 = tl.load(meta + 1)
    q0 = tl.load(meta + 2)
    qhi = tl.load(meta + 3)
    prow0 = tl.load(meta + 4).to(tl.int64)  # partial row of query x = prow0 + x
    wide = tl.load(meta + 5)
    dense = 0
    if USE_DENSE:  # (else the unmasked tiles are not compiled: half the code and the shared memory)
        dense = tl.load(meta + 6)  # every token of the chunk visible to every query of the tile: no mask
    if wide != 0:
        if dense != 0:
            _tree_tile(
                q_ptr, k_ptr, v_ptr, slots_ptr, end_ptr, qidx_ptr, lse_ptr, o_ptr,
                kvh, t0, t1, q0, qhi, prow0, qk_scale,
                stride_qq, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
                NUM_HEADS, GROUP, HEAD_DIM, BLOCK_M_WIDE, BLOCK_G, BLOCK_D, BLOCK_N, DOT_PREC, WRITE_LSE, EARLY_V,
                PREFETCH, PREFETCH_KV, False, SLOT_T,
            )  # fmt: skip
        else:
            _tree_tile(
                q_ptr, k_ptr, v_ptr, slots_ptr, end_ptr, qidx_ptr, lse_ptr, o_ptr,
                kvh, t0, t1, q0, qhi, prow0, qk_scale,
                stride_qq, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
                NUM_HEADS, GROUP, HEAD_DIM, BLOCK_M_WIDE, BLOCK_G, BLOCK_D, BLOCK_N, DOT_PREC, WRITE_LSE, EARLY_V,
                PREFETCH, PREFETCH_KV, True, SLOT_T,
            )  # fmt: skip
    else:
        if dense != 0:
            _tree_tile(
                q_ptr, k_ptr, v_ptr, slots_ptr, end_ptr, qidx_ptr, lse_ptr, o_ptr,
                kvh, t0, t1, q0, qhi, prow0, qk_scale,
                stride_qq, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
                NUM_HEADS, GROUP, HEAD_DIM, BLOCK_M_NARROW, BLOCK_G, BLOCK_D, BLOCK_N, DOT_PREC, WRITE_LSE, EARLY_V,
                PREFETCH, PREFETCH_KV, False, SLOT_T,
            )  # fmt: skip
        else:
            _tree_tile(
                q_ptr, k_ptr, v_ptr, slots_ptr, end_ptr, qidx_ptr, lse_ptr, o_ptr,
                kvh, t0, t1, q0, qhi, prow0, qk_scale,
                stride_qq, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
                NUM_HEADS, GROUP, HEAD_DIM, BLOCK_M_NARROW, BLOCK_G, BLOCK_D, BLOCK_N, DOT_PREC, WRITE_LSE, EARLY_V,
                PREFETCH, PREFETCH_KV, True, SLOT_T,
            )  # fmt: skip


@triton.jit
def _tree_merge_kernel(
    lse_ptr,
    o_ptr,
    ptr_ptr,
    rows_ptr,
    out_ptr,
    stride_oq,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_HM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """One program per (query, block of BLOCK_HM heads): the query's partials are loaded BLOCK_P at a time (all at
    once for the usual handful), so the merge costs a couple of memory latencies rather than one per partial."""
    if PDL:  # launched while phase 1 runs: wait until its partials are written
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    x = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_HM + tl.arange(0, BLOCK_HM)
    p0 = tl.load(ptr_ptr + x)
    p1 = tl.load(ptr_ptr + x + 1)
    i = tl.arange(0, BLOCK_P)
    d = tl.arange(0, BLOCK_D)
    hm = h < NUM_HEADS
    dm = d < HEAD_DIM
    m = tl.full([BLOCK_HM], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_HM], dtype=tl.float32)
    acc = tl.zeros([BLOCK_HM, BLOCK_D], dtype=tl.float32)
    for b in range(p0, p1, BLOCK_P):
        pm = b + i < p1
        rows = tl.load(rows_ptr + b + i, mask=pm, other=0)
        part = rows[:, None] * NUM_HEADS + h[None, :]  # [BLOCK_P, BLOCK_HM]
        ok = pm[:, None] & hm[None, :]
        li = tl.load(lse_ptr + part, mask=ok, other=float("-inf"))
        oi = tl.load(
            o_ptr + part[:, :, None] * HEAD_DIM + d[None, None, :], mask=ok[:, :, None] & dm[None, None, :], other=0.0
        ).to(tl.float32)
        m_new = tl.maximum(m, tl.max(li, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp2(m - m_safe)
        w = tl.exp2(li - m_safe[None, :])  # [BLOCK_P, BLOCK_HM]; 0 for padding and partials that saw nothing
        l = l * a + tl.sum(w, axis=0)
        acc = acc * a[:, None] + tl.sum(oi * w[:, :, None], axis=0)
        m = m_new
    o = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(
        out_ptr + x * stride_oq + h[:, None] * stride_oh + d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=hm[:, None] & dm[None, :],
    )


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: TreeLayout,
    scale: float,
    plan: TreeAttentionPlan | None = None,
) -> torch.Tensor:
    """Triton version of `tree_attention_reference` -> [Q, H, D] in q.dtype.

    q [Q, H, D] (query x's token sits at layout index layout.q_index[x]); k_cache/v_cache [slots, KVH, D] in q.dtype
    (any slot count; the layout's slots index them); `plan`: from `plan_tree_attention(layout, H, KVH, D, q.dtype)`,
    computed here when None (with a few host syncs). With a plan the call has no host syncs: grids
    (plan.num_items, KVH) and (Q, heads / MERGE_HEADS) come from the plan, so it can be captured in a CUDA graph and
    replayed while the tree (the layout) is unchanged. Queries that see no token (impossible for layouts from the
    builders) get zeros. When every query sees exactly one chunk (plan.direct) the first kernel writes the output
    itself and there is no merge.
    """
    require_triton()
    Q, H, D = q.shape
    kvh = k_cache.shape[1]
    if H % kvh:
        raise ValueError(f"tree_attention: {H} query heads is not a multiple of {kvh} KV heads")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 3 or c.shape[1:] != (kvh, D) or c.stride(2) != 1:
            raise ValueError(f"tree_attention: {name} must be [slots, {kvh}, {D}] with a unit last stride")
        if c.dtype != q.dtype:
            raise ValueError(f"tree_attention: {name} is {c.dtype}, q is {q.dtype}")
    if layout.num_queries != Q:
        raise ValueError(f"tree_attention: {Q} queries but the layout has {layout.num_queries}")
    if plan is None:
        plan = plan_tree_attention(layout, H, kvh, D, q.dtype)
    elif not plan.matches(layout, H, kvh, D):
        raise ValueError(f"tree_attention: {plan} was made for another layout or head configuration")
    if q.stride(2) != 1:
        q = q.contiguous()
    if Q == 0 or plan.num_items == 0:
        return torch.zeros((Q, H, D), dtype=q.dtype, device=q.device)
    out = torch.empty((Q, H, D), dtype=q.dtype, device=q.device)  # the merge (or phase 1, direct) writes every query
    if plan.direct:
        _launch_phase1(q, k_cache, v_cache, layout, scale, plan, out, out)  # partial row = query: the output itself
        return out
    lse = torch.empty((plan.num_partials, H), dtype=torch.float32, device=q.device)
    part_o = torch.empty((plan.num_partials, H, D), dtype=q.dtype, device=q.device)
    _launch_phase1(q, k_cache, v_cache, layout, scale, plan, lse, part_o)
    _launch_merge(plan, lse, part_o, out)
    return out


def _kernel_config(plan: TreeAttentionPlan, dtype: torch.dtype) -> dict:
    """The plan's config; BLOCK_N and the dot precision follow the dtype (tile heights, hence items, do not)."""
    cfg = dict(plan.config)
    if dtype != plan.dtype:
        base = tree_attention_config(plan.head_dim, plan.num_heads // plan.num_kv_heads, dtype, plan.intensity)
        cfg["BLOCK_N"], cfg["DOT_PREC"] = base["BLOCK_N"], base["DOT_PREC"]
    return cfg


def _extent(t: torch.Tensor) -> int:
    """1 + the largest element offset of a view (its strides may skip elements: a slice of a larger cache)."""
    return 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True) if n > 0)


def _launch_phase1(q, k_cache, v_cache, layout, scale, plan, lse, part_o):
    Q, H, D = q.shape
    kvh = k_cache.shape[1]
    cfg = _kernel_config(plan, q.dtype)
    _tree_attention_kernel[(plan.num_items * kvh,)](
        q,
        k_cache,
        v_cache,
        layout.slots,
        layout.end,
        layout.q_index,
        plan.item_meta,
        lse,
        part_o,
        float(scale) * LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        NUM_KV_HEADS=kvh,
        NUM_HEADS=H,
        GROUP=H // kvh,
        HEAD_DIM=D,
        BLOCK_M_NARROW=cfg["BLOCK_M_NARROW"],
        BLOCK_M_WIDE=cfg["BLOCK_M_WIDE"],
        BLOCK_G=cfg["BLOCK_G"],
        BLOCK_D=cfg["BLOCK_D"],
        BLOCK_N=cfg["BLOCK_N"],
        DOT_PREC=cfg["DOT_PREC"],
        WRITE_LSE=not plan.direct,
        EARLY_V=cfg["EARLY_V"],
        PREFETCH=cfg["PREFETCH"],
        PREFETCH_KV=cfg["PREFETCH_KV"],
        KV_FAST=cfg["KV_FAST"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        USE_DENSE=cfg["DENSE"],
        OFFS32=bool(cfg.get("OFFS32")) and max(_extent(k_cache), _extent(v_cache)) < 2**31,
        **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}),
        **pdl_launch_opts(q.device, cfg.get("PDL", False)),
    )


def _launch_merge(plan, lse, part_o, out):
    Q, H, D = out.shape
    cfg = plan.config
    hm = min(cfg["MERGE_HEADS"], next_pow2(H))
    _tree_merge_kernel[(Q, cdiv(H, hm))](
        lse,
        part_o,
        plan.merge_ptr,
        plan.merge_rows,
        out,
        out.stride(0),
        out.stride(1),
        NUM_HEADS=H,
        HEAD_DIM=D,
        BLOCK_P=min(cfg["MERGE_BLOCK_P"], max(2, next_pow2(plan.max_partials))),
        BLOCK_HM=hm,
        BLOCK_D=max(16, next_pow2(D)),
        num_warps=cfg["merge_warps"],
        **pdl_launch_opts(out.device, cfg.get("PDL", False)),
    )
