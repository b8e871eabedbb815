"""The one API everything calls: `Engine.generate` (continuous batching over the paged KV cache) and `Engine.score`.

Each loop iteration admits waiting requests while cache blocks and batch slots are free, prefills them, runs one
decode step over every running sequence, samples, and retires finished sequences so new ones take their places.
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
from reldl.llm.attention import Step
from reldl.llm.config import ModelConfig
from reldl.llm.kv_cache import TRASH_BLOCK, PagedKVCache
from reldl.llm.runner import DecodeGraphs
from reldl.llm.sampling import SamplingParams, sample

ProgressFn = Callable[[int, int], None]  # (rows finished, tokens generated) since the last call


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string), "length" (max_tokens) or "context" (model limit)
    prompt_tokens: int


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

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.out)


def _pad(rows: Sequence[Sequence[int]], width: int, value: int) -> list[list[int]]:
    return [list(r) + [value] * (width - len(r)) for r in rows]


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
        """Tokenize in one call: `tokenizers` works through the batch without returning to Python per text."""
        out = [e.ids for e in self.tokenizer.encode_batch(list(texts))]
        bos = self.config.bos_token_id
        return [ids if ids or bos is None else [bos] for ids in out]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def prepare(self, text: str, params: SamplingParams, truncate: str | None = None) -> list[int]:
        """Tokenize a prompt and check it fits the context (or cut it from the left when asked)."""
        return self.prepare_many([text], [params], truncate)[0]

    def prepare_many(
        self, texts: Sequence[str], params: Sequence[SamplingParams], truncate: str | None = None
    ) -> list[list[int]]:
        limit = self.context_length
        out = []
        for ids, sp in zip(self.encode_many(texts), params):
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

    # ------------------------------------------------------------------ forward
    def _forward(self, tokens, positions, slots, tables) -> torch.Tensor:
        dev = self.device
        step = Step(
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            slots=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.long, device=dev),
            block_size=self.cache.block_size,
        )
        toks = torch.tensor(tokens, dtype=torch.long, device=dev)
        return self.model(toks, step, self.cache.layers)

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

    def _decode(self, seqs: list[_Seq]) -> torch.Tensor:
        if self.graphs is not None:
            out = self.graphs.decode(seqs)
            if out is not None:
                return out
        hidden = self._forward(*self._inputs(seqs, [s.length - 1 for s in seqs], 1))
        return self.model.logits(hidden[:, 0])

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
        with self.lock, torch.inference_mode():
            self._loop([s for s in seqs if s.finish is None], on_progress)
        return [Result(s.text or "", s.out, s.finish or "length", len(s.prompt)) for s in seqs]

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
        need = self.cache.blocks_for(min(len(s.prompt) + s.params.max_tokens, self.context_length)) - shared
        if need > self.cache.allocator.num_free:
            return False
        s.blocks = self.cache.allocator.fork(donor.blocks[:shared]) if shared else []
        s.blocks += self.cache.allocator.allocate(need)
        s.cached = shared * bs
        return True

    def _loop(self, pending: list[_Seq], on_progress: ProgressFn | None) -> None:
        # prompts in token order: rows sharing a prefix are admitted one after another and share its blocks
        waiting = deque(sorted(pending, key=lambda s: s.prompt))
        running: list[_Seq] = []
        donor: _Seq | None = None
        try:
            while waiting or running:
                admitted: list[_Seq] = []
                budget = self.prefill_tokens
                while waiting and len(running) + len(admitted) < self.max_batch:
                    s = waiting[0]
                    width = max([len(x.prompt) - x.cached for x in admitted] + [len(s.prompt)])
                    if admitted and width * (len(admitted) + 1) > budget:
                        break
                    if not self._reserve(s, donor):
                        if not running and not admitted:
                            raise DataError(
                                f"prompt of {len(s.prompt)} tokens plus max_tokens={s.params.max_tokens} "
                                "does not fit the KV cache"
                            )
                        break
                    donor = waiting.popleft()
                    admitted.append(donor)
                if admitted:
                    self._advance(admitted, self._prefill(admitted))
                    running += admitted
                decoding = [s for s in running if s.finish is None and s not in admitted]
                if decoding:
                    self._advance(decoding, self._decode(decoding))
                done = [s for s in running if s.finish is not None]
                if done:
                    for s in done:
                        self.cache.allocator.free(s.blocks)
                        s.blocks = []
                    running = [s for s in running if s.finish is None]
                if on_progress is not None:
                    on_progress(len(done), len(admitted) + len(decoding))
        finally:
            for s in running + list(waiting):
                if s.blocks:
                    self.cache.allocator.free(s.blocks)
                    s.blocks = []

    def _advance(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        if all(s.params.greedy for s in seqs):
            tokens = logits.argmax(-1).tolist()
        else:
            tokens = self._sample(seqs, logits)
        self._append(seqs, tokens)

    def _sample(self, seqs: list[_Seq], logits: torch.Tensor) -> list[int]:
        dev = logits.device
        return sample(
            logits,
            torch.tensor([s.params.temperature for s in seqs], device=dev, dtype=torch.float32),
            torch.tensor([s.params.top_k for s in seqs], device=dev, dtype=torch.long),
            torch.tensor([s.params.top_p for s in seqs], device=dev, dtype=torch.float32),
            torch.tensor([s.seed for s in seqs], device=dev, dtype=torch.long),
            torch.tensor([len(s.out) for s in seqs], device=dev, dtype=torch.long),
        ).tolist()

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
