"""Tree attention: the layout builders against brute force, the plan's metadata, and the Triton kernel against
`tree_attention_reference` on fresh random trees.

Trees have random depths, branching and node lengths (1-token nodes, and nodes of 1000-2000 tokens in the larger
cases), forests of unrelated rows, multi-query speculative trees (every tree token a query) and layouts from both
builders. Cache slots outside the layout hold NaN for the kernel: a single read of one would poison the output.
"""

from __future__ import annotations

import importlib
import math
import random

import pytest
import torch
from kernel_testing import ON_GPU, TOL, randn

from reldl.kernels import (
    TreeLayout,
    layout_from_block_tables,
    layout_from_tree,
    plan_tree_attention,
    tree_attention,
    tree_attention_reference,
)
from reldl.kernels.tree_attention import TreePlanBuffers

# --------------------------------------------------------------------------------------------------- random trees


def random_tree(rng: random.Random, depth: int, branching: tuple[int, int], lens, roots: int = 1):
    """(parents, node_lens) in pre-order: `roots` trees, each node with randint(*branching) children up to `depth`
    levels below the root; lens(rng, level) -> the node's token count."""
    parents: list[int] = []
    node_lens: list[int] = []

    def grow(parent: int, level: int):
        me = len(parents)
        parents.append(parent)
        node_lens.append(lens(rng, level))
        if level < depth:
            for _ in range(rng.randint(*branching)):
                grow(me, level + 1)

    for _ in range(roots):
        grow(-1, 0)
    return parents, node_lens


def all_token_queries(node_lens):
    return [(i, k) for i, n in enumerate(node_lens) for k in range(n)]


def leaf_queries(parents, node_lens):
    has_child = set(p for p in parents if p >= 0)
    return [(i, node_lens[i] - 1) for i in range(len(parents)) if i not in has_child]


def random_queries(rng, parents, node_lens, n):
    """n distinct random tokens (sorted: layout order), always including the leaves' last tokens."""
    pool = all_token_queries(node_lens)
    picked = set(rng.sample(pool, min(n, len(pool)))) | set(leaf_queries(parents, node_lens))
    return sorted(picked)


def tree_case(parents, node_lens, queries, extra_slots=7, seed=0, device="cpu"):
    total = sum(node_lens)
    g = torch.Generator().manual_seed(seed)
    slots = torch.randperm(total + extra_slots, generator=g)[:total]
    return layout_from_tree(parents, node_lens, slots.to(device), queries), slots


def path_slots_tree(parents, node_lens, slots, node, off):
    """Brute force: the slots on the root-to-token path."""
    start = [0]
    for n in node_lens[:-1]:
        start.append(start[-1] + n)
    out = set(slots[start[node] : start[node] + off + 1].tolist())
    p = parents[node]
    while p != -1:
        out |= set(slots[start[p] : start[p] + node_lens[p]].tolist())
        p = parents[p]
    return out


def visible_slots(layout: TreeLayout):
    vis = layout.visible().cpu()
    s = layout.slots.cpu()
    return [set(s[vis[x]].tolist()) for x in range(layout.num_queries)]


# ---------------------------------------------------------------------------------------------------- builders


@pytest.mark.parametrize("seed", range(6))
def test_layout_from_tree_matches_paths(seed):
    rng = random.Random(seed)
    parents, lens = random_tree(
        rng, rng.randint(0, 5), (1, 3), lambda r, lvl: r.choice([1, 1, 2, r.randint(1, 30)]), roots=rng.randint(1, 3)
    )
    queries = random_queries(rng, parents, lens, 12)
    layout, slots = tree_case(parents, lens, queries, seed=seed)
    assert layout.slots.dtype == torch.int64 and layout.end.dtype == torch.int32 and layout.q_index.dtype == torch.int32
    assert sorted(layout.slots.tolist()) == sorted(slots.tolist())  # every token once
    assert bool((layout.q_index[1:] >= layout.q_index[:-1]).all())
    for x, (node, off) in enumerate(queries):
        assert visible_slots(layout)[x] == path_slots_tree(parents, lens, slots, node, off)


def test_layout_from_tree_rejects_bad_input():
    s = torch.arange(3)
    with pytest.raises(ValueError):
        layout_from_tree([-1, 0, 2], [1, 1, 1], s, [(0, 0)])  # parent after child
    with pytest.raises(ValueError):
        layout_from_tree([-1, 0, 0], [1, 1, 1], s, [(2, 0), (1, 0)])  # queries out of layout order
    with pytest.raises(ValueError):
        layout_from_tree([-1, 0], [1, 1], s, [(0, 0)])  # slot count


def random_block_tables(rng: random.Random, block_size: int, roots: int):
    """Forked sequences in a paged cache: a tree of segments of whole shared blocks, rows in depth-first order.

    Each leaf row adds a private partial tail; some inner segments also end a row (a sequence whose context ends
    exactly at a block boundary, with longer sequences forked from it)."""
    next_block = [1]  # block 0 is the padding / trash block

    def new_blocks(n):
        out = list(range(next_block[0], next_block[0] + n))
        next_block[0] += n
        return out

    rows: list[tuple[list[int], int]] = []

    def grow(prefix: list[int], level: int):
        blocks = prefix + new_blocks(rng.randint(1, 3))
        kids = rng.randint(1, 3) if level < 3 else 0
        if kids and blocks and rng.random() < 0.3:
            rows.append((blocks, len(blocks) * block_size))  # a row ending exactly here, before its descendants
        if not kids:
            tail = rng.randint(1, block_size)
            rows.append((blocks + new_blocks(1), len(blocks) * block_size + tail))
        for _ in range(kids):
            grow(blocks, level + 1)

    for _ in range(roots):
        grow([], 0)
    nb = max(len(b) for b, _ in rows) + rng.randint(0, 2)
    tables = torch.zeros(len(rows), nb, dtype=torch.long)
    for i, (b, _) in enumerate(rows):
        tables[i, : len(b)] = torch.tensor(b)
    # shuffle the physical block ids (the structure stays: equal ids stay equal)
    perm = torch.tensor(
        [0] + (torch.randperm(next_block[0] - 1, generator=torch.Generator().manual_seed(7)) + 1).tolist()
    )
    return perm[tables], torch.tensor([c for _, c in rows]), next_block[0]


@pytest.mark.parametrize("seed", range(6))
def test_layout_from_block_tables_matches_rows(seed):
    rng = random.Random(100 + seed)
    bs = rng.choice([4, 8, 16])
    tables, ctx, num_blocks = random_block_tables(rng, bs, roots=rng.randint(1, 3))
    layout = layout_from_block_tables(tables, ctx, bs)
    assert layout.num_queries == tables.shape[0]
    assert len(set(layout.slots.tolist())) == layout.num_tokens  # every token once
    for x in range(tables.shape[0]):
        j = torch.arange(int(ctx[x]))
        want = set((tables[x, j // bs] * bs + j % bs).tolist())
        assert visible_slots(layout)[x] == want
        # the query's own token is the row's newest one
        newest = int(tables[x, (int(ctx[x]) - 1) // bs]) * bs + (int(ctx[x]) - 1) % bs
        assert int(layout.slots[layout.q_index[x]]) == newest


# --------------------------------------------------------------------------------------------------- the plan


def _check_plan(layout: TreeLayout, plan, group: int):
    L, Q = layout.num_tokens, layout.num_queries
    cs, ce = plan.chunk_start.long().cpu(), plan.chunk_end.long().cpu()
    qlo, qhi = plan.chunk_qlo.long().cpu(), plan.chunk_qhi.long().cpu()
    # chunks partition [0, L) in order
    assert cs[0] == 0 and ce[-1] == L and bool((cs[1:] == ce[:-1]).all()) and bool((ce > cs).all())
    vis = layout.visible().cpu()
    cfg = plan.config
    pbase = plan.chunk_pbase.cpu()
    seen_by = []
    for c in range(plan.num_chunks):
        qs = vis[:, cs[c] : ce[c]].any(1).nonzero().flatten()
        # the query range is exactly the queries seeing some token of the chunk (contiguous)
        if len(qs):
            assert (int(qlo[c]), int(qhi[c])) == (int(qs[0]), int(qs[-1]) + 1) and len(qs) == int(qs[-1] - qs[0] + 1)
        else:
            assert qhi[c] <= qlo[c]
        seen_by.append(qs.tolist())
    nq = (qhi - qlo).clamp(min=0)
    assert plan.num_partials == int(nq.sum()) and bool((pbase == nq.cumsum(0) - nq).all())
    # items tile each chunk's queries exactly once, with the tile height its class says
    covered = {}
    for i in range(plan.num_items):
        c, q0, wide = int(plan.item_chunk[i]), int(plan.item_q0[i]), int(plan.item_wide[i])
        bq = (cfg["BLOCK_M_WIDE"] if wide else cfg["BLOCK_M_NARROW"]) // cfg["BLOCK_G"]
        assert bool(wide) == (int(nq[c]) * cfg["BLOCK_G"] > cfg["BLOCK_M_NARROW"])
        for x in range(q0, min(q0 + bq, int(qhi[c]))):
            assert (c, x) not in covered
            covered[(c, x)] = True
    assert set(covered) == {(c, x) for c in range(plan.num_chunks) for x in range(int(qlo[c]), int(qhi[c]))}
    lens = (ce - cs)[plan.item_chunk.long().cpu()]
    assert bool((lens[1:] <= lens[:-1]).all())  # longest chunks first
    # dense items: exactly those whose tile's queries see every token of the chunk
    meta = plan.item_meta.cpu()
    for i in range(plan.num_items):
        c, q0 = int(plan.item_chunk[i]), int(plan.item_q0[i])
        bq = (cfg["BLOCK_M_WIDE"] if int(plan.item_wide[i]) else cfg["BLOCK_M_NARROW"]) // cfg["BLOCK_G"]
        full = bool(vis[q0 : min(q0 + bq, int(qhi[c])), cs[c] : ce[c]].all())
        assert int(plan.item_dense[i]) == int(meta[i, 6]) == int(full and cfg["DENSE"])
    # merge lists: each query's partial rows, in chunk order
    ptr, rows = plan.merge_ptr.cpu(), plan.merge_rows.cpu()
    assert ptr[0] == 0 and ptr[-1] == plan.num_partials
    for x in range(Q):
        want = [int(pbase[c]) + x - int(qlo[c]) for c in range(plan.num_chunks) if x in seen_by[c]]
        assert rows[ptr[x] : ptr[x + 1]].tolist() == want


@pytest.mark.parametrize("chunk_tokens", [None, 1, 5, 64])
@pytest.mark.parametrize("group", [1, 4])
def test_plan_metadata(group, chunk_tokens):
    rng = random.Random(group * 10 + (chunk_tokens or 0))
    parents, lens = random_tree(rng, 4, (1, 3), lambda r, lvl: r.choice([1, 1, 3, r.randint(1, 80)]), roots=2)
    layout, _ = tree_case(parents, lens, random_queries(rng, parents, lens, 20))
    plan = plan_tree_attention(layout, 2 * group, 2, 64, torch.float16, chunk_tokens=chunk_tokens)
    _check_plan(layout, plan, group)


def _fewshot_layout(prefix, branches, branch_len):
    parents = [-1] + [0] * branches
    lens = [prefix] + [branch_len] * branches
    return layout_from_tree(parents, lens, torch.arange(sum(lens)), leaf_queries(parents, lens))


def test_plan_long_shared_prefix():
    """4000-token prefix seen by 50 queries: few, long prefix chunks (small partials), yet enough programs."""
    layout = _fewshot_layout(4000, 50, 50)
    plan = plan_tree_attention(layout, 32, 8, 128, torch.float16, sms=132)
    _check_plan(layout, plan, 4)
    ce = plan.chunk_end.long()
    prefix_chunks = int((ce <= 4000).sum())
    assert 4 <= prefix_chunks <= 32  # partials of the prefix: at most 32 x 50 (query, chunk) pairs
    assert plan.num_items * 8 >= 2 * 132  # fills the GPU
    # and the small-partials side: partial floats stay well below the KV elements read
    assert plan.num_partials * 32 * (128 + 2) < 0.5 * layout.num_tokens * 8 * 2 * 128


def test_plan_merges_one_token_nodes():
    """A 256-token speculative tree of 1-token nodes, every token a query: neighbouring nodes share chunks."""
    rng = random.Random(3)
    parents = [-1]
    while len(parents) < 256:
        parents.append(rng.randrange(len(parents)))
    # pre-order renumbering of the random tree
    kids = {i: [] for i in range(256)}
    for i, p in enumerate(parents[1:], 1):
        kids[p].append(i)
    order, stack = [], [0]
    while stack:
        n = stack.pop()
        order.append(n)
        stack.extend(reversed(kids[n]))
    new = {old: i for i, old in enumerate(order)}
    pre_parents = [-1 if parents[o] == -1 else new[parents[o]] for o in order]
    lens = [1] * 256
    layout = layout_from_tree(pre_parents, lens, torch.arange(256), all_token_queries(lens))
    plan = plan_tree_attention(layout, 32, 8, 128, torch.float16, sms=132)
    _check_plan(layout, plan, 4)
    assert plan.num_chunks <= 8  # not one chunk per node


# ------------------------------------------------------------------------------------------------- the kernel


def _poisoned(cache, layout):
    keep = torch.zeros(cache.shape[0], dtype=torch.bool, device=cache.device)
    keep[layout.slots] = True
    out = cache.clone()
    out[~keep] = float("nan")
    return out


def _run(layout, num_slots, h, kvh, d, dtype, device, seed, plan=None, **plan_kw):
    q = randn(layout.num_queries, h, d, seed=seed, dtype=dtype, device=device)
    k = randn(num_slots, kvh, d, seed=seed + 1, dtype=dtype, device=device)
    v = randn(num_slots, kvh, d, seed=seed + 2, dtype=dtype, device=device)
    scale = d**-0.5
    if plan is None and plan_kw:
        plan = plan_tree_attention(layout, h, kvh, d, dtype, **plan_kw)
    out = tree_attention(q, _poisoned(k, layout), _poisoned(v, layout), layout, scale, plan=plan)
    assert out.shape == q.shape and out.dtype == dtype
    want = tree_attention_reference(q.float(), k.float(), v.float(), layout, scale)
    torch.testing.assert_close(out.float(), want, **TOL[dtype])
    return out


def _to(layout, device):
    return TreeLayout(layout.slots.to(device), layout.end.to(device), layout.q_index.to(device))


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_kernel_random_trees(device, group, d):
    """Random trees with random queries, GQA group sizes 1-8, head dims 64/128, default plan and forced tiny
    chunks (runs of a few tokens, many partials per query)."""
    rng = random.Random(1000 + 10 * group + d)
    parents, lens = random_tree(rng, rng.randint(1, 4), (1, 3), lambda r, lvl: r.choice([1, 2, r.randint(1, 40)]))
    layout, slots = tree_case(parents, lens, random_queries(rng, parents, lens, 20), seed=group)
    layout = _to(layout, device)
    kvh = 2 if group < 8 else 1
    a = _run(layout, len(slots) + 7, kvh * group, kvh, d, torch.float32, device, seed=group)
    b = _run(layout, len(slots) + 7, kvh * group, kvh, d, torch.float32, device, seed=group, chunk_tokens=7)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group", [2, 8])
def test_kernel_float16(device, group):
    rng = random.Random(50 + group)
    parents, lens = random_tree(rng, 3, (1, 3), lambda r, lvl: r.choice([1, r.randint(1, 60)]), roots=2)
    layout, slots = tree_case(parents, lens, random_queries(rng, parents, lens, 8), seed=group)
    _run(_to(layout, device), len(slots) + 7, 2 * group, 2, 64, torch.float16, device, seed=group)


@pytest.mark.skipif(not ON_GPU, reason="bf16 is broken in the Triton interpreter")
@pytest.mark.parametrize("d", [64, 128])
def test_kernel_bfloat16(device, d):
    rng = random.Random(70 + d)
    parents, lens = random_tree(rng, 3, (1, 4), lambda r, lvl: r.choice([1, r.randint(1, 300)]), roots=2)
    layout, slots = tree_case(parents, lens, random_queries(rng, parents, lens, 30), seed=d)
    _run(_to(layout, device), len(slots) + 7, 32, 8, d, torch.bfloat16, device, seed=d)


@pytest.mark.parametrize("prefix", [0, 40])
def test_kernel_speculative_tree(device, prefix):
    """Medusa-like token tree (top-k per depth, 1-token nodes, every tree token a query) over a prompt node."""
    parents, lens = [-1] if prefix else [], [prefix] if prefix else []
    frontier = [0] if prefix else [-1]
    for k in (3, 2, 2):
        nxt = []
        for p in frontier:
            for _ in range(k):
                nxt.append(p)
        frontier = []
        for p in nxt:
            frontier.append(len(parents))
            parents.append(p)
            lens.append(1)
    # the construction above is level order; rebuild in pre-order
    kids = {i: [] for i in range(-1, len(parents))}
    for i, p in enumerate(parents):
        kids[p].append(i)
    order, stack = [], list(reversed(kids[-1]))
    while stack:
        n = stack.pop()
        order.append(n)
        stack.extend(reversed(kids[n]))
    new = {o: i for i, o in enumerate(order)}
    pp = [-1 if parents[o] == -1 else new[parents[o]] for o in order]
    ll = [lens[o] for o in order]
    queries = [(i, 0) for i in range(len(pp)) if ll[i] == 1]
    layout, slots = tree_case(pp, ll, queries, seed=prefix)
    layout = _to(layout, device)
    _run(layout, len(slots) + 7, 8, 2, 64, torch.float32, device, seed=prefix)
    _run(layout, len(slots) + 7, 8, 2, 64, torch.float16, device, seed=prefix)


def test_kernel_block_table_forest(device):
    """Rows forked in a paged cache (forest of unrelated prompts), one query per row, GQA 4."""
    rng = random.Random(9)
    tables, ctx, num_blocks = random_block_tables(rng, 8, roots=3)
    layout = _to(layout_from_block_tables(tables.to(device), ctx.to(device), 8), device)
    _run(layout, num_blocks * 8, 16, 4, 64, torch.float32, device, seed=9)


def test_plan_buffers_padded(device):
    """Layouts and plans planned on the host, copied into fixed-size buffers (what CUDA-graph tree steps replay):
    padding queries, items, partials and tokens change nothing; a smaller tree loaded after a larger one (stale token
    tails) too; a direct plan goes through the merge."""
    rng = random.Random(13)
    h, kvh, d = 16, 4, 64
    cases = []
    for roots in (3, 1):
        tables, ctx, num_blocks = random_block_tables(rng, 8, roots=roots)
        layout = layout_from_block_tables(tables, ctx, 8)
        cases.append((layout, plan_tree_attention(layout, h, kvh, d, torch.float32, chunk_tokens=16), num_blocks))
    ql, qp = cases[0][0], plan_tree_attention(cases[0][0], h, kvh, d, torch.float32, chunk_tokens=10**6)
    cases.append((ql, qp, cases[0][2]))
    num_slots = max(c[2] for c in cases) * 8
    big = max(cases, key=lambda c: c[1].num_items)[1]
    Q = max(c[0].num_queries for c in cases) + 3
    slots = torch.zeros(num_slots, dtype=torch.long, device=device)
    end = torch.full((num_slots,), -1, dtype=torch.int32, device=device)
    bufs = TreePlanBuffers(
        big, Q, max(c[1].num_items for c in cases) + 5, max(c[1].num_partials for c in cases) + 9, slots, end
    )
    for i, (layout, plan, _) in enumerate(cases):
        assert bufs.fits(layout, plan)
        bufs.load(layout, plan)
        q = randn(Q, h, d, seed=i, dtype=torch.float32, device=device)
        k = randn(num_slots, kvh, d, seed=i + 1, dtype=torch.float32, device=device)
        v = randn(num_slots, kvh, d, seed=i + 2, dtype=torch.float32, device=device)
        out = tree_attention(q, k, v, bufs.layout, d**-0.5, bufs.plan)
        n = layout.num_queries
        want = tree_attention_reference(q[:n], k, v, _to(layout, device), d**-0.5)
        torch.testing.assert_close(out[:n], want, **TOL[torch.float32])
        assert bool((out[n:] == 0).all())
    assert not bufs.fits(cases[0][0], plan_tree_attention(cases[0][0], h, kvh, d, torch.float16, chunk_tokens=16))


def test_kernel_long_nodes(device):
    """One larger case: a 1500-token root and a 1100-token child, branches of 1-300 tokens, default plan (long
    chunks with many queries, wide tiles) and a forced chunk length, in float16 and float32."""
    rng = random.Random(11)
    parents = [-1, 0, 1, 1, 1, 0, 5, 5, 0]
    lens = [1500, 1100, 1, 37, 300, 1, 1, 2, 64]
    queries = random_queries(rng, parents, lens, 24)
    layout, slots = tree_case(parents, lens, queries, seed=11)
    layout = _to(layout, device)
    _run(layout, len(slots) + 7, 8, 2, 64, torch.float16, device, seed=11, sms=4)
    _run(layout, len(slots) + 7, 8, 2, 64, torch.float32, device, seed=12, chunk_tokens=900)


def test_kernel_deterministic_and_plan_reuse(device):
    rng = random.Random(5)
    parents, lens = random_tree(rng, 3, (2, 3), lambda r, lvl: r.randint(1, 20))
    layout, slots = tree_case(parents, lens, random_queries(rng, parents, lens, 10))
    layout = _to(layout, device)
    plan = plan_tree_attention(layout, 8, 2, 64, torch.float32, chunk_tokens=16)
    a = _run(layout, len(slots) + 7, 8, 2, 64, torch.float32, device, seed=5, plan=plan)
    b = _run(layout, len(slots) + 7, 8, 2, 64, torch.float32, device, seed=5, plan=plan)
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        q = torch.zeros(layout.num_queries, 4, 64, device=device)
        tree_attention(
            q, torch.zeros(60, 2, 64, device=device), torch.zeros(60, 2, 64, device=device), layout, 1.0, plan
        )


def test_kernel_on_strided_cache_views(device):
    """K/V given as views of a larger cache ([slots, 2, KVH, D][:, i]): the kernel reads through their strides, and
    the 32-bit offset check looks at the views' largest offset, not their element count."""
    ta = importlib.import_module("reldl.kernels.tree_attention")
    rng = random.Random(41)
    parents, lens = random_tree(rng, 2, (2, 3), lambda r, lvl: r.randint(1, 30))
    layout, slots = tree_case(parents, lens, random_queries(rng, parents, lens, 12), seed=41)
    layout = _to(layout, device)
    n = len(slots) + 7
    both = randn(n, 2, 2, 64, seed=42, device=device)
    k, v = both[:, 0], both[:, 1]
    assert ta._extent(k) == 1 + (n - 1) * 256 + 64 + 63 and ta._extent(k) > k.numel()
    q = randn(layout.num_queries, 8, 64, seed=43, device=device)
    out = tree_attention(q, k, v, layout, 0.125)
    want = tree_attention_reference(q, k, v, layout, 0.125)
    torch.testing.assert_close(out, want, **TOL[torch.float32])


def test_kernel_no_queries(device):
    layout = _to(layout_from_tree([-1], [5], torch.arange(5), []), device)
    out = tree_attention(
        torch.zeros(0, 4, 64, device=device),
        torch.zeros(5, 2, 64, device=device),
        torch.zeros(5, 2, 64, device=device),
        layout,
        0.125,
    )
    assert out.shape == (0, 4, 64)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU (RELDL_KERNEL_TESTS_GPU=1)")
def test_cuda_graph_capture_and_replay():
    """A plan computed once; tree_attention captured in a CUDA graph and replayed with new q/k/v values."""
    dev = torch.device("cuda")
    rng = random.Random(21)
    parents, lens = random_tree(rng, 3, (1, 4), lambda r, lvl: r.choice([1, r.randint(1, 500)]))
    layout, slots = tree_case(parents, lens, random_queries(rng, parents, lens, 40), device=dev)
    h, kvh, d, dtype = 32, 8, 128, torch.float16
    n = len(slots) + 7
    q = torch.zeros(layout.num_queries, h, d, device=dev, dtype=dtype)
    k = torch.zeros(n, kvh, d, device=dev, dtype=dtype)
    v = torch.zeros_like(k)
    plan = plan_tree_attention(layout, h, kvh, d, dtype)
    tree_attention(q, k, v, layout, d**-0.5, plan)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tree_attention(q, k, v, layout, d**-0.5, plan)
    for seed in (1, 2):
        q.copy_(randn(*q.shape, seed=seed, device=dev, dtype=dtype))
        k.copy_(randn(*k.shape, seed=seed + 1, device=dev, dtype=dtype))
        v.copy_(randn(*v.shape, seed=seed + 2, device=dev, dtype=dtype))
        graph.replay()
        torch.cuda.synchronize()
        want = tree_attention_reference(q.float(), k.float(), v.float(), layout, d**-0.5)
        torch.testing.assert_close(out.float(), want, **TOL[dtype])


@pytest.mark.parametrize(
    "config",
    [
        dict(PREFETCH=True),
        dict(KV_FAST=False, EARLY_V=True),
        dict(MERGE_BLOCK_P=2, MERGE_HEADS=8, merge_warps=2),
        dict(BLOCK_M_WIDE=128, BLOCK_N=32, num_stages=3, PREFETCH=True),
        dict(PREFETCH_KV=True, DENSE=True),
        dict(PREFETCH_KV=True, BLOCK_M_WIDE=128, BLOCK_N=16),
        dict(OFFS32=False),
        dict(OFFS32=False, PREFETCH_KV=True, DENSE=True),
    ],
)
def test_kernel_config_variants(device, config):
    """The kernel's optional paths (hand-pipelined slot loads or K/V loads, program orders, early V loads, merge
    tiles that need several blocks of partials per query, no dense items, 64-bit K/V offsets) compute the same
    attention."""
    rng = random.Random(31)
    parents, lens = random_tree(rng, 3, (1, 3), lambda r, lvl: r.choice([1, 2, r.randint(1, 70)]), roots=2)
    layout, slots = tree_case(parents, lens, random_queries(rng, parents, lens, 24), seed=31)
    layout = _to(layout, device)
    plan = plan_tree_attention(layout, 8, 2, 64, torch.float32, chunk_tokens=11, config=config)
    assert plan.config["MERGE_HEADS"] == config.get("MERGE_HEADS", plan.config["MERGE_HEADS"])
    assert not plan.direct and plan.max_partials > 2
    _run(layout, len(slots) + 7, 8, 2, 64, torch.float32, device, seed=31, plan=plan)


def test_kernel_direct_single_chunk(device):
    """Every query seeing exactly one chunk (a forest of short unrelated rows, one chunk each): the first kernel
    writes the output itself, no merge."""
    parents = [-1, 0, -1, -1]
    lens = [16, 16, 32, 32]
    layout, slots = tree_case(parents, lens, [(1, 15), (2, 31), (3, 31)], seed=4)
    layout = _to(layout, device)
    plan = plan_tree_attention(layout, 8, 2, 64, torch.float32, chunk_tokens=32)
    assert plan.direct and plan.num_partials == layout.num_queries
    _run(layout, len(slots) + 7, 8, 2, 64, torch.float32, device, seed=4, plan=plan)
    _run(layout, len(slots) + 7, 8, 2, 64, torch.float16, device, seed=5, plan=plan)
    # and the same tree planned with smaller chunks goes through the merge, to the same result
    plan2 = plan_tree_attention(layout, 8, 2, 64, torch.float32, chunk_tokens=8)
    assert not plan2.direct
    _run(layout, len(slots) + 7, 8, 2, 64, torch.float32, device, seed=4, plan=plan2)


@pytest.mark.parametrize("wide_rows", [64, 128])
def test_kernel_dense_items(device, wide_rows):
    """A shared prefix with branches: prefix chunks (wide tiles) and the branches' own chunks (narrow tiles) are
    dense items (no visibility mask), chunks straddling branches are not; with DENSE off every item is masked. Both
    plans compute the reference attention, and the dense plan has both kinds of item in both tile heights."""
    parents = [-1] + [0] * 12
    lens = [70] + [9, 23, 1, 40, 5, 17, 33, 2, 11, 29, 3, 19]
    layout, slots = tree_case(parents, lens, leaf_queries(parents, lens), seed=41)
    layout = _to(layout, device)
    cfg = dict(BLOCK_M_WIDE=wide_rows, DENSE=True)
    plan = plan_tree_attention(layout, 8, 2, 64, torch.float32, chunk_tokens=16, config=cfg)
    _check_plan(_to(layout, "cpu"), plan, 4)
    kinds = set(zip(plan.item_wide.tolist(), plan.item_dense.tolist()))
    assert kinds >= {(0, 0), (0, 1), (1, 1)}, kinds  # (1, 0): the chunk holding the prefix end and a branch
    out = _run(layout, len(slots) + 7, 8, 2, 64, torch.float32, device, seed=41, plan=plan)
    masked = plan_tree_attention(layout, 8, 2, 64, torch.float32, chunk_tokens=16, config=dict(cfg, DENSE=False))
    assert int(masked.item_dense.sum()) == 0
    out2 = _run(layout, len(slots) + 7, 8, 2, 64, torch.float32, device, seed=41, plan=masked)
    torch.testing.assert_close(out, out2, atol=1e-5, rtol=1e-5)


def test_plan_full_waves():
    """FULL_WAVES: when the programs overshoot a wave, chunks shorten until the programs fill whole waves."""
    layout = _fewshot_layout(4000, 50, 50)
    base = plan_tree_attention(layout, 32, 8, 128, torch.float16, sms=132, config=dict(PROGRAMS_PER_SM=2))
    full = plan_tree_attention(
        layout, 32, 8, 128, torch.float16, sms=132, config=dict(PROGRAMS_PER_SM=2, FULL_WAVES=True)
    )
    _check_plan(layout, full, 4)
    slots = 2 * 132
    assert base.num_items * 8 > slots  # the default overshoots one wave ...
    assert full.num_items > base.num_items  # ... FULL_WAVES cuts more, shorter chunks
    assert full.num_items * 8 >= 0.9 * slots * math.ceil(base.num_items * 8 / slots)


def test_config_follows_intensity():
    """Key tiles and chunk cap by the tree's mean query rows per token (the sweep's rule)."""
    from reldl.kernels.tree_attention import HEAVY_MAX_CHUNK, MAX_CHUNK, tree_attention_config

    def pick(i):
        c = tree_attention_config(128, 4, torch.float16, i)
        return c["BLOCK_N"], c["MAX_CHUNK"]

    assert pick(7.3) == (32, MAX_CHUNK)  # tree of thought
    assert pick(36.7) == (32, MAX_CHUNK)  # few-shot, long branches
    assert pick(64.8) == (64, MAX_CHUNK)  # few-shot, shared prefix dominates
    assert pick(252.0) == (32, MAX_CHUNK)  # 64-token speculative tree
    assert pick(964.6) == (64, HEAVY_MAX_CHUNK)  # 256-token speculative tree
    assert not tree_attention_config(128, 4, torch.float16, 64.8)["DENSE"]
