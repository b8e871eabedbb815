"""The one API everything calls: `Engine.generate` (continuous batching over the paged KV cache) and `Engine.score`.

Each loop iteration admits waiting requests while cache blocks and batch slots are free, prefills them, runs one
decode step over every running sequence, samples, and retires finished sequences so new ones take their places.

Tree decoding (n samples, beam search): a request with `n > 1` or `beam_width` is prefilled once, then forked into
branches that share the prompt's whole cache blocks (`BlockAllocator.fork`) and get a private copy of its partial
last block (copy-on-write); the branches decode in the running batch like any sequence. Beams are re-forked from
their parents' blocks every step and dropped beams' blocks are freed. Decode steps whose rows share blocks keep the
rows in tree order and attend through a `TreeLayout` that reads each shared block once.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer

from reldl.errors import DataError
from reldl.kernels.tree_attention import (
    TreeAttentionPlan,
    TreeLayout,
    layout_from_block_tables,
    plan_tree_attention,
)
from reldl.llm import fused
from reldl.llm.attention import Step
from reldl.llm.config import ModelConfig
from reldl.llm.kv_cache import TRASH_BLOCK, PagedKVCache
from reldl.llm.params import branch_seed
from reldl.llm.runner import DecodeGraphs
from reldl.llm.sampling import SamplingParams, sample

ProgressFn = Callable[[int, int], None]  # (rows finished, tokens generated) since the last call


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string), "length" (max_tokens) or "context" (model limit)
    prompt_tokens: int
    # requests with n > 1 or beam_width: every sample in branch order, or the beams best first (the fields above
    # are then branches[0]'s); None for ordinary requests
    branches: list[Result] | None = None
    score: float | None = None  # beam search: sum of log-probabilities / generated length ** length_penalty

    @property
    def texts(self) -> list[str]:
        """Every branch's text (one for an ordinary request)."""
        return [b.text for b in self.branches] if self.branches is not None else [self.text]


@dataclass(eq=False)  # identity: membership tests in the scheduler must not compare token lists
class _Seq:
    index: int
    prompt: list[int]
    params: SamplingParams
    seed: int
    blocks: list[int] = field(default_factory=list)
    cached: int = 0  # leading prompt tokens whose K/V blocks are shared with an earlier sequence
    out: list[int] = field(default_factory=list)
    finish: str | None = None
    text: str | None = None
    group: _Group | None = None  # the tree this sequence is a branch (or the unforked root) of
    score: float = 0.0  # beam search: the beam's sum of log-probabilities

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.out)


@dataclass(eq=False)
class _Group:
    """A request decoded as a tree: n samples or beam_width beams forked from one prefilled prompt."""

    root: _Seq
    max_len: int  # prompt + max_tokens, within the context
    pool: list[int] = field(default_factory=list)  # blocks reserved at admission for the branches' private tails
    forked: bool = False
    branches: list[_Seq] = field(default_factory=list)  # samples in branch order; running beams, best first
    hyps: list[tuple[float, list[int], str]] = field(default_factory=list)  # beams: finished (score, ids, finish)
    done: bool = False

    @property
    def params(self) -> SamplingParams:
        return self.root.params


def _pad(rows: Sequence[Sequence[int]], width: int, value: int) -> list[list[int]]:
    return [list(r) + [value] * (width - len(r)) for r in rows]


def encode_texts(tokenizer: Tokenizer, bos: int | None, texts: Sequence[str]) -> list[list[int]]:
    """Tokenize in one call: `tokenizers` works through the batch without returning to Python per text. A text
    that tokenizes to nothing becomes [bos] where the model has one."""
    out = [e.ids for e in tokenizer.encode_batch(list(texts))]
    return [ids if ids or bos is None else [bos] for ids in out]


def fit_prompts(
    encoded: Sequence[list[int]], params: Sequence[SamplingParams], limit: int, truncate: str | None = None
) -> list[list[int]]:
    """Check each tokenized prompt fits a context of `limit` tokens (or cut it from the left when asked)."""
    out = []
    for ids, sp in zip(encoded, params):
        if not ids:
            raise DataError("llm_generate: empty prompt and the model has no BOS token to start from")
        if len(ids) >= limit:
            if truncate != "left":
                raise DataError(
                    f"llm_generate: prompt is {len(ids)} tokens but the model's context is {limit} tokens "
                    "(pass truncate := 'left' to keep the end of the prompt)"
                )
            keep = max(1, limit - max(1, min(sp.max_tokens, limit // 2)))
            ids = ids[-keep:]
        out.append(ids)
    return out


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        *,
        device: torch.device,
        dtype: torch.dtype,
        max_batch: int | None = None,
        cache_tokens: int | None = None,
        block_size: int = 16,
        prefill_tokens: int | None = None,
        use_cuda_graphs: bool = True,
        tree_attention: bool = True,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.config: ModelConfig = model.config
        self.device, self.dtype = device, dtype
        gpu = device.type == "cuda"
        self.max_batch = max_batch or 64
        self.prefill_tokens = prefill_tokens or (16384 if gpu else 4096)
        cfg = self.config
        if cache_tokens is None:
            cache_tokens = self._default_cache_tokens()
        num_blocks = max(2, -(-cache_tokens // block_size) + 1)
        self.cache = PagedKVCache(cfg, num_blocks, block_size, device, dtype)
        self.eos = set(cfg.eos_token_ids)
        self.lock = threading.Lock()
        self.graphs = DecodeGraphs(self) if gpu and use_cuda_graphs else None
        # tree attention needs full attention in every layer (the layout has no sliding window)
        windows = cfg.layer_windows or [cfg.sliding_window] * cfg.num_layers
        self.tree_attention = tree_attention and all(w is None for w in windows)
        self._order_cache: tuple[list, list] | None = None  # _tree_order's last batch and its tree order
        self._sample_cache: tuple[list, tuple] | None = None  # _sample's last batch and its parameter tensors

    # a decode step attends through a tree layout when its rows' used cache blocks are at least this many times
    # the distinct blocks among them (the tree reads each once); below that, per-row attention (and CUDA graphs)
    tree_min_saving = 2.0

    # ------------------------------------------------------------------ set-up
    def _default_cache_tokens(self) -> int:
        cfg = self.config
        want = self.max_batch * cfg.max_positions
        per_token = PagedKVCache.bytes_per_token(cfg, self.dtype)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * 0.6)
        else:
            budget = 2 << 30
        return max(cfg.max_positions, min(want, budget // per_token))

    @property
    def context_length(self) -> int:
        return self.config.max_positions

    # ------------------------------------------------------------------ tokens
    def encode(self, text: str) -> list[int]:
        return self.encode_many([text])[0]

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        return encode_texts(self.tokenizer, self.config.bos_token_id, texts)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def prepare(self, text: str, params: SamplingParams, truncate: str | None = None) -> list[int]:
        """Tokenize a prompt and check it fits the context (or cut it from the left when asked)."""
        return self.prepare_many([text], [params], truncate)[0]

    def prepare_many(
        self, texts: Sequence[str], params: Sequence[SamplingParams], truncate: str | None = None
    ) -> list[list[int]]:
        return fit_prompts(self.encode_many(texts), params, self.context_length, truncate)

    # ------------------------------------------------------------------ forward
    def _forward(self, tokens, positions, slots, tables, tree: bool = False) -> torch.Tensor:
        dev = self.device
        step = Step(
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            slots=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.long, device=dev),
            block_size=self.cache.block_size,
        )
        if tree:  # a decode step over rows in tree order: each row's query is its newest token
            step.tree = layout_from_block_tables(step.block_tables, step.positions[:, 0] + 1, step.block_size)
            step.tree_plan = self._tree_plan(step.tree)  # once per step, shared by every layer
        toks = torch.tensor(tokens, dtype=torch.long, device=dev)
        return self.model(toks, step, self.cache.layers)

    def _tree_plan(self, layout: TreeLayout, sms: int | None = None) -> TreeAttentionPlan | None:
        """The tree kernel's plan for a step's layout (None where the PyTorch reference runs: it needs none)."""
        k_ = fused.on(torch.empty(0, device=self.device))
        if k_ is None or getattr(k_, "tree_attention", None) is None:
            return None
        c = self.config
        return plan_tree_attention(layout, c.num_heads, c.num_kv_heads, c.head_dim, self.dtype, sms=sms)

    def _inputs(self, seqs: list[_Seq], starts: list[int], width: int):
        """Token/position/slot rows for `width` new tokens per sequence from `starts` (right-padded)."""
        cache = self.cache
        tokens, positions, slots = [], [], []
        for s, start in zip(seqs, starts):
            ids = (s.prompt + s.out)[start:]
            n = len(ids)
            tokens.append(ids + [0] * (width - n))
            positions.append(list(range(start, start + n)) + [0] * (width - n))
            slots.append([cache.slot(s.blocks, p) for p in range(start, start + n)] + [0] * (width - n))
        nb = max(len(s.blocks) for s in seqs)
        tables = _pad([s.blocks for s in seqs], nb, TRASH_BLOCK)
        return tokens, positions, slots, tables

    def _prefill(self, seqs: list[_Seq]) -> torch.Tensor:
        """Prompt tokens after each sequence's shared prefix, in one padded forward."""
        width = max(len(s.prompt) - s.cached for s in seqs)
        hidden = self._forward(*self._inputs(seqs, [s.cached for s in seqs], width))
        last = torch.tensor([len(s.prompt) - 1 - s.cached for s in seqs], device=self.device)
        return self.model.logits(hidden[torch.arange(len(seqs), device=self.device), last])

    def _decode(self, seqs: list[_Seq], tree: bool = False) -> torch.Tensor:
        """One token per sequence. `tree`: the rows are in tree order (`_tree_order`) and attend through a tree
        layout. On CUDA both replay captured graphs (tree steps: the layout and plan built on the host and copied
        into the graph's fixed-size buffers, see runner.py); eagerly where no graph fits."""
        if self.graphs is not None:
            out = self.graphs.decode_tree(seqs) if tree else self.graphs.decode(seqs)
            if out is not None:
                return out
        hidden = self._forward(*self._inputs(seqs, [s.length - 1 for s in seqs], 1), tree)
        return self.model.logits(hidden[:, 0])

    def _tree_order(self, seqs: list[_Seq]) -> list[_Seq] | None:
        """The decode batch in tree order when its rows share enough cache blocks for tree attention, else None.

        Blocks are only ever shared as a prefix of block tables (forks and common prompt prefixes), so sorting the
        rows by their block tables puts the rows that share a block next to each other, as the layout needs."""
        if not self.tree_attention or len(seqs) < 2:
            return None
        refcount = self.cache.allocator.refcount
        if not any(refcount[s.blocks[0]] > 1 for s in seqs):
            return None
        bs = self.cache.block_size
        used = [-(-s.length // bs) for s in seqs]
        seen: set[int] = set()
        for s, u in zip(seqs, used):
            seen.update(s.blocks[:u])
        if sum(used) < self.tree_min_saving * len(seen):
            return None
        # the order depends only on the rows and their block tables (new lists whenever they change): reused while
        # both are unchanged (references kept, so ids are not reused)
        key = [(s, s.blocks) for s in seqs]
        cached = self._order_cache
        if cached is not None and len(cached[0]) == len(key):
            if all(a is c and b is d for (a, b), (c, d) in zip(key, cached[0])):
                return cached[1]
        order = sorted(seqs, key=lambda s: s.blocks)
        self._order_cache = (key, order)
        return order

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
        *,
        truncate: str | None = None,
        on_progress: ProgressFn | None = None,
    ) -> list[Result]:
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        ids = self.prepare_many(prompts, plist, truncate)
        return self.generate_ids(ids, plist, on_progress=on_progress)

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        params: Sequence[SamplingParams],
        *,
        on_progress: ProgressFn | None = None,
    ) -> list[Result]:
        rng = random.SystemRandom()
        seqs = [
            _Seq(i, list(p), sp, sp.seed if sp.seed is not None else rng.getrandbits(62))
            for i, (p, sp) in enumerate(zip(prompts, params))
        ]
        for s in seqs:
            if not s.prompt or len(s.prompt) >= self.context_length:
                raise DataError(f"prompt of {len(s.prompt)} tokens does not fit the context ({self.context_length})")
            if s.params.max_tokens <= 0:
                s.finish, s.text = "length", ""
            elif s.params.width > 1:  # n samples or beams (beam_width 1 is greedy decoding, as in transformers)
                max_len = min(len(s.prompt) + s.params.max_tokens, self.context_length)
                s.group = _Group(s, max_len)
        with self.lock, torch.inference_mode():
            self._loop([s for s in seqs if s.finish is None], on_progress)
        return [self._result(s) for s in seqs]

    def _result(self, s: _Seq) -> Result:
        sp, g = s.params, s.group
        if g is None:
            one = Result(s.text or "", s.out, s.finish or "length", len(s.prompt))
            if sp.n == 1 and not sp.beam:
                return one
            branches = [one] * sp.width  # max_tokens 0, or beam_width 1 (greedy)
        elif sp.beam:
            branches = [Result(self.decode(ids), ids, fin, len(s.prompt), score=sc) for sc, ids, fin in g.hyps]
        else:
            branches = [Result(b.text or "", b.out, b.finish or "length", len(s.prompt)) for b in g.branches]
        top = branches[0]
        return Result(top.text, top.token_ids, top.finish_reason, top.prompt_tokens, list(branches), top.score)

    def _reserve(self, s: _Seq, donor: _Seq | None) -> bool:
        """Reserve cache blocks for prompt + max_tokens. Whole blocks of prompt prefix that `donor` (a sequence
        admitted before it, still holding its blocks) already has are shared, not recomputed: their K/V are the
        same, since a token's K/V depend only on the tokens up to it."""
        bs = self.cache.block_size
        shared = 0
        if donor is not None and donor.blocks:
            common = 0
            for a, b in zip(s.prompt, donor.prompt):
                if a != b:
                    break
                common += 1
            shared = min(common, len(s.prompt) - 1) // bs  # keep one prompt token to prefill, for its logits
        total = self.cache.blocks_for(min(len(s.prompt) + s.params.max_tokens, self.context_length))
        need = total - shared
        # a tree's other branches each need the blocks after the prompt's whole blocks (its partial last block is
        # copied): reserved now, handed out at the fork. Beams re-forked later free at least what they take.
        extra = (s.params.width - 1) * (total - len(s.prompt) // bs) if s.group is not None else 0
        if need + extra > self.cache.allocator.num_free:
            return False
        s.blocks = self.cache.allocator.fork(donor.blocks[:shared]) if shared else []
        s.blocks += self.cache.allocator.allocate(need)
        if extra:
            s.group.pool = self.cache.allocator.allocate(extra)
        s.cached = shared * bs
        return True

    def _loop(self, pending: list[_Seq], on_progress: ProgressFn | None) -> None:
        # prompts in token order: rows sharing a prefix are admitted one after another and share its blocks
        waiting = deque(sorted(pending, key=lambda s: s.prompt))
        groups = [s.group for s in pending if s.group is not None]
        counted: set[int] = set()  # groups reported finished to on_progress
        running: list[_Seq] = []
        donor: _Seq | None = None
        try:
            while waiting or running:
                admitted: list[_Seq] = []
                budget = self.prefill_tokens
                slots = len(running)  # batch rows in use: a tree takes one per branch
                while waiting:
                    s = waiting[0]
                    rows = s.params.width if s.group is not None else 1
                    if (running or admitted) and slots + rows > self.max_batch:
                        break
                    width = max([len(x.prompt) - x.cached for x in admitted] + [len(s.prompt)])
                    if admitted and width * (len(admitted) + 1) > budget:
                        break
                    if not self._reserve(s, donor):
                        if not running and not admitted:
                            raise DataError(
                                f"prompt of {len(s.prompt)} tokens plus max_tokens={s.params.max_tokens} "
                                + (f"for {s.params.width} branches " if s.group is not None else "")
                                + "does not fit the KV cache"
                            )
                        break
                    donor = waiting.popleft()
                    admitted.append(donor)
                    slots += rows
                fresh: list[_Seq] = []
                if admitted:
                    fresh = self._advance(admitted, self._prefill(admitted))
                    running += fresh
                new = {id(s) for s in fresh}
                decoding = [s for s in running if s.finish is None and id(s) not in new]
                if decoding:
                    ordered = self._tree_order(decoding)
                    if ordered is not None:
                        decoding = ordered
                    stepped = {id(s) for s in decoding}
                    live = self._advance(decoding, self._decode(decoding, tree=ordered is not None))
                    running = [s for s in running if id(s) not in stepped] + live
                done = [s for s in running if s.finish is not None]
                if done:
                    for s in done:
                        self.cache.allocator.free(s.blocks)
                        s.blocks = []
                    running = [s for s in running if s.finish is None]
                if on_progress is not None:
                    finished = sum(1 for s in done if s.group is None)
                    for g in groups:
                        if id(g) not in counted and (
                            g.done or (g.forked and not g.params.beam and all(b.finish for b in g.branches))
                        ):
                            counted.add(id(g))
                            finished += 1
                    on_progress(finished, len(admitted) + len(decoding))
        finally:
            for s in running + list(waiting):
                if s.blocks:
                    self.cache.allocator.free(s.blocks)
                    s.blocks = []
            for g in groups:
                if g.pool:
                    self.cache.allocator.free(g.pool)
                    g.pool = []
                for b in g.branches:
                    if b.blocks:
                        self.cache.allocator.free(b.blocks)
                        b.blocks = []

    def _advance(self, seqs: list[_Seq], logits: torch.Tensor) -> list[_Seq]:
        """Choose each sequence's next token from its logits row; returns the sequences that stay in the batch
        (a tree root just prefilled becomes its branches; beams become the next step's beams)."""
        rows: list[int] = []
        plain: list[_Seq] = []
        beams: dict[_Group, list[int]] = {}
        out: list[_Seq] = []
        for i, s in enumerate(seqs):
            g = s.group
            if g is not None and g.params.beam:
                beams.setdefault(g, []).append(i)
                continue
            branches = self._fork_samples(g) if g is not None and not g.forked else [s]
            rows += [i] * len(branches)
            plain += branches
            out += branches
        if plain:
            lg = logits if rows == list(range(len(seqs))) else logits[torch.tensor(rows, device=logits.device)]
            if all(s.params.greedy for s in plain):
                tokens = lg.argmax(-1).tolist()
            else:
                tokens = self._sample(plain, lg)
            self._append(plain, tokens)
        for g, idx in beams.items():
            order = {id(b): j for j, b in enumerate(g.branches)} if g.forked else {}
            idx.sort(key=lambda i: order.get(id(seqs[i]), 0))  # the beams best first, as transformers keeps them
            out += self._beam_step(g, [seqs[i] for i in idx], logits[torch.tensor(idx, device=logits.device)])
        return out

    def _take_blocks(self, g: _Group, n: int) -> list[int]:
        """n blocks for a branch's private tail: from the group's reservation first."""
        take, g.pool = g.pool[:n], g.pool[n:]
        if len(take) < n:
            take += self.cache.allocator.allocate(n - len(take))
        return take

    def _fork(self, g: _Group, parent: _Seq, child: _Seq, copies: list[tuple[int, int]]) -> None:
        """child takes parent's whole blocks (shared) and a private tail; parent's partial last block is copied
        (recorded in `copies`, done for the whole step at once)."""
        bs = self.cache.block_size
        full = parent.length // bs
        child.blocks = self.cache.allocator.fork(parent.blocks[:full])
        child.blocks += self._take_blocks(g, len(parent.blocks) - full)
        if parent.length % bs:
            copies.append((parent.blocks[full], child.blocks[full]))

    def _fork_samples(self, g: _Group) -> list[_Seq]:
        """Fork a just-prefilled root into its n samples; sample b draws with branch_seed(seed, b)."""
        root, copies = g.root, []
        g.branches = [root]
        for b in range(1, g.params.n):
            child = _Seq(root.index, root.prompt, root.params, branch_seed(root.seed, b), group=g)
            self._fork(g, root, child, copies)
            g.branches.append(child)
        self.cache.copy_blocks([c[0] for c in copies], [c[1] for c in copies])
        g.forked = True
        if g.pool:
            self.cache.allocator.free(g.pool)
            g.pool = []
        return g.branches

    def _beam_step(self, g: _Group, beams: list[_Seq], logits: torch.Tensor) -> list[_Seq]:
        """One step of beam search for a request's running beams (best first), as transformers' `_beam_search`:
        the best (1 + #EOS ids) * k continuations of all beams by accumulated log-probability; those among the
        top k that end (EOS, or the length limit) become finished hypotheses (score / generated length **
        length_penalty, the k best kept), the best k that do not end become the next beams, forked from their
        parents' blocks. Returns the next beams ([] once the request is finished, its blocks freed)."""
        sp = g.params
        k, lpen = sp.beam_width, sp.length_penalty
        scores = torch.tensor([b.score for b in beams], dtype=torch.float32, device=logits.device)
        logp = torch.log_softmax(logits.float(), -1) + scores[:, None]
        V = logp.shape[1]
        K = min(max(2, 1 + len(self.eos)) * k, logp.numel())
        top, idx = logp.reshape(-1).topk(K)
        plen, cur = len(g.root.prompt), beams[0].length
        normed = (top / ((cur + 1 - plen) ** lpen)).tolist()  # float32, as transformers computes it
        top_l, idx_l = top.tolist(), idx.tolist()
        ends = [i % V in self.eos or cur + 1 >= g.max_len for i in idx_l]
        full_before = len(g.hyps) >= k
        if not (full_before and sp.early_stopping is True):
            for r in range(min(k, K)):
                if ends[r]:
                    parent, tok = beams[idx_l[r] // V], idx_l[r] % V
                    if tok in self.eos:
                        ids, fin = list(parent.out), "stop"
                    else:
                        ids = parent.out + [tok]
                        fin = "length" if len(ids) >= sp.max_tokens else "context"
                    g.hyps.append((normed[r], ids, fin))
            g.hyps.sort(key=lambda h: -h[0])  # stable: earlier hypotheses first among equal scores
            del g.hyps[k:]
        keep = [r for r in range(K) if not ends[r]][:k]
        done = not keep
        if not done and len(g.hyps) >= k:
            if sp.early_stopping is True:
                done = True
            else:  # can the best running beam still beat the worst finished hypothesis?
                length = g.max_len - plen if sp.early_stopping == "never" and lpen > 0 else cur + 1 - plen
                best = (top[keep[0]] / (length**lpen)).item()
                done = not best > g.hyps[-1][0]
        if done:
            for b in beams:
                self.cache.allocator.free(b.blocks)
                b.blocks = []
            g.branches, g.done = [], True
            return []
        # next beams: a parent's first child continues the parent itself, its other children are forks
        taken: set[int] = set()
        nxt: list[tuple[_Seq, _Seq, int, float]] = []  # (child, parent, token, score)
        for r in keep:
            parent, tok = beams[idx_l[r] // V], idx_l[r] % V
            if id(parent) in taken:
                child = _Seq(parent.index, parent.prompt, parent.params, parent.seed, out=list(parent.out), group=g)
            else:
                taken.add(id(parent))
                child = parent
            nxt.append((child, parent, tok, top_l[r]))
        for b in beams:  # dropped beams go first: their private blocks pay for the forks below
            if id(b) not in taken:
                self.cache.allocator.free(b.blocks)
                b.blocks = []
        copies: list[tuple[int, int]] = []
        for child, parent, _, _ in nxt:
            if child is not parent:
                self._fork(g, parent, child, copies)
        self.cache.copy_blocks([c[0] for c in copies], [c[1] for c in copies])
        for child, _, tok, score in nxt:
            child.out.append(tok)
            child.score = score
        if g.pool:
            self.cache.allocator.free(g.pool)
            g.pool = []
        g.forked = True
        g.branches = [c for c, _, _, _ in nxt]
        return list(g.branches)

    def _sample(self, seqs: list[_Seq], logits: torch.Tensor) -> list[int]:
        dev = logits.device
        cached = self._sample_cache  # the rows' parameters, on the device, reused while the batch is the same
        if cached is None or len(cached[0]) != len(seqs) or any(a is not b for a, b in zip(seqs, cached[0])):
            ps = [s.params for s in seqs]
            args = (
                torch.tensor([p.temperature for p in ps], dtype=torch.float32).to(dev, non_blocking=True),
                torch.tensor([p.top_k for p in ps], dtype=torch.long).to(dev, non_blocking=True),
                torch.tensor([p.top_p for p in ps], dtype=torch.float32).to(dev, non_blocking=True),
                torch.tensor([s.seed for s in seqs], dtype=torch.long).to(dev, non_blocking=True),
                # host hints (see `sample`): every row samples; no row filters (top_k <= 0 and top_p >= 1)
                all(p.temperature > 0 for p in ps),
                all(p.top_k <= 0 and p.top_p >= 1 for p in ps),
            )
            cached = self._sample_cache = (list(seqs), args)
        temp, top_k, top_p, seeds, all_hot, unfiltered = cached[1]
        steps = torch.tensor([len(s.out) for s in seqs], dtype=torch.long).to(dev, non_blocking=True)
        return sample(logits, temp, top_k, top_p, seeds, steps, all_hot=all_hot, unfiltered=unfiltered).tolist()

    def _append(self, seqs: list[_Seq], tokens: list[int]) -> None:
        for s, t in zip(seqs, tokens):
            if t in self.eos:
                s.finish = "stop"
            else:
                s.out.append(t)
                if s.params.stop:
                    text = self.decode(s.out)
                    cut = min((i for i in (text.find(x) for x in s.params.stop) if i >= 0), default=-1)
                    if cut >= 0:
                        s.finish, s.text = "stop", text[:cut]
                if s.finish is None and len(s.out) >= s.params.max_tokens:
                    s.finish = "length"
                elif s.finish is None and s.length >= self.context_length:
                    s.finish = "context"
            if s.finish is not None and s.text is None:
                s.text = self.decode(s.out)

    # ------------------------------------------------------------------ scoring
    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        """Log-likelihood (natural log) of each continuation given its prompt."""
        rows = []
        for p, c in zip(prompts, continuations):
            ctx = self.encode(p)
            cont = self.tokenizer.encode(c, add_special_tokens=False).ids
            if not ctx and cont:
                raise DataError("llm_score: empty prompt and the model has no BOS token to condition on")
            if len(ctx) + len(cont) > self.context_length:
                raise DataError(
                    f"llm_score: prompt plus continuation is {len(ctx) + len(cont)} tokens but the model's "
                    f"context is {self.context_length} tokens"
                )
            rows.append((ctx, cont))
        out: list[float] = []
        for ids, lp in zip(rows, self.token_logprobs([c + k for c, k in rows])):
            ctx, cont = ids
            out.append(
                float(lp[len(ctx) - 1 : len(ctx) + len(cont) - 1].gather(-1, torch.tensor(cont)[:, None]).sum())
                if cont
                else 0.0
            )
        return out

    def token_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Full-sequence log-softmax [T, V] (float64, CPU) for each token sequence; used by scoring and tests."""
        return [lg.double().log_softmax(-1) for lg in self.logits(sequences)]

    def logits(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Logits [T, V] (float32, CPU) at every position of each sequence, computed through the paged cache."""
        results: list[torch.Tensor] = []
        with self.lock, torch.inference_mode():
            start = 0
            while start < len(sequences):
                # as many sequences as max_batch and the free cache blocks allow (always at least one)
                chunk, need = [list(sequences[start])], self.cache.blocks_for(len(sequences[start]))
                for s in sequences[start + 1 : start + self.max_batch]:
                    need += self.cache.blocks_for(len(s))
                    if need > self.cache.allocator.num_free:
                        break
                    chunk.append(list(s))
                start += len(chunk)
                seqs = [_Seq(i, s, SamplingParams(max_tokens=0), 0) for i, s in enumerate(chunk)]
                try:
                    for s in seqs:
                        s.blocks = self.cache.allocator.allocate(self.cache.blocks_for(len(s.prompt)))
                    width = max(len(s.prompt) for s in seqs)
                    hidden = self._forward(*self._inputs(seqs, [0] * len(seqs), width))
                    for b, s in enumerate(seqs):
                        results.append(self.model.logits(hidden[b, : len(s.prompt)]).float().cpu())
                finally:
                    for s in seqs:
                        self.cache.allocator.free(s.blocks)
        return results
