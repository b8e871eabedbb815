"""`OffloadedLLM`: an `OffloadEngine` behind the interface the SQL functions (udfs/llm.py) call on an `Engine`:
`prepare_many`, `generate_ids(ids, params, on_progress=...) -> [Result]`, `generate`, `encode_many`, `decode`.

What the executor supports, and what is refused (one-line NotSupportedError naming the limitation):
- greedy decoding only: temperature > 0 is refused (top_p / top_k / seed mean nothing under greedy decoding and
  are ignored, as the Engine ignores them); n > 1 and beam_width are refused; llm_score is refused.
- stop strings: applied to the finished tokens exactly as the Engine applies them after each token (the executor
  runs every sequence of a block for the block's max_tokens steps anyway: FlexGen's fixed gen_len).
- finish reasons and context limits as the Engine's ("stop" at EOS or a stop string, "length", "context").

One engine call: prompts grouped by their max_tokens (capped by the context), sorted by length (less left padding
within a block), each group one `OffloadEngine.generate` call. A group smaller than the policy's block runs with
the block shrunk to it (same placement: no weight moves; the executor would otherwise fill the block with copies).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from reldl.errors import DataError, NotSupportedError
from reldl.llm.engine import Result, fit_prompts
from reldl.llm.offload.executor import OffloadEngine
from reldl.llm.offload.policy import Policy
from reldl.llm.offload.sql import fit_block
from reldl.llm.params import SamplingParams


class OffloadedLLM:
    def __init__(
        self,
        name: str,
        path: str | Path,
        policy: Policy,
        device: torch.device,
        dtype: torch.dtype,
        offload_dir: str | None = None,
    ):
        self.name, self.policy = name, policy
        if offload_dir is not None:
            Path(offload_dir).mkdir(parents=True, exist_ok=True)
        self.engine = OffloadEngine(str(path), policy, device, dtype, offload_dir=offload_dir)
        self.config, self.tokenizer = self.engine.config, self.engine.tokenizer
        self.device, self.dtype = self.engine.device, self.engine.dtype
        self.lock = threading.Lock()

    @property
    def context_length(self) -> int:
        return self.config.max_positions

    # ------------------------------------------------------------------ tokens
    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        return self.engine.encode_many(texts)

    def encode(self, text: str) -> list[int]:
        return self.encode_many([text])[0]

    def decode(self, ids: Sequence[int]) -> str:
        return self.engine.decode(ids)

    def check(self, sp: SamplingParams) -> None:
        """Refuse what the offloaded executor cannot honour (one line, naming the limitation)."""
        what = f"llm_generate: model {self.name!r} is offloaded (FlexGen block schedule), which decodes greedily only"
        if sp.beam_width is not None:
            raise NotSupportedError(f"{what}: beam_width (beam search) is not supported")
        if sp.n > 1:
            raise NotSupportedError(f"{what}: n > 1 samples are not supported")
        if not sp.greedy:
            raise NotSupportedError(f"{what}: temperature > 0 (sampling) is not supported; use temperature := 0")

    def prepare_many(
        self, texts: Sequence[str], params: Sequence[SamplingParams], truncate: str | None = None
    ) -> list[list[int]]:
        """Tokenize, check each prompt fits the context (or cut it from the left), as Engine.prepare_many."""
        for sp in params:
            self.check(sp)
        return fit_prompts(self.encode_many(texts), params, self.context_length, truncate)

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
        *,
        truncate: str | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> list[Result]:
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        return self.generate_ids(self.prepare_many(prompts, plist, truncate), plist, on_progress=on_progress)

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        params: Sequence[SamplingParams],
        *,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> list[Result]:
        ctx = self.context_length
        results: list[Result | None] = [None] * len(prompts)
        groups: dict[int, list[int]] = {}
        for i, (p, sp) in enumerate(zip(prompts, params)):
            self.check(sp)
            if not p or len(p) >= ctx:
                raise DataError(f"prompt of {len(p)} tokens does not fit the context ({ctx})")
            if sp.max_tokens <= 0:
                results[i] = Result("", [], "length", len(p))
            else:
                groups.setdefault(min(sp.max_tokens, ctx - len(p)), []).append(i)
        with self.lock:
            for steps, idx in sorted(groups.items()):
                idx.sort(key=lambda i: len(prompts[i]))
                self.engine.policy = fit_block(self.policy, len(idx))
                try:
                    outs = self.engine.generate([list(prompts[i]) for i in idx], steps)
                finally:
                    self.engine.policy = self.policy
                for i, out in zip(idx, outs):
                    results[i] = self._result(prompts[i], out, params[i], steps)
                if on_progress is not None:
                    on_progress(len(idx), sum(len(results[i].token_ids) for i in idx))
        return results  # type: ignore[return-value]

    def _result(self, prompt: Sequence[int], out: list[int], sp: SamplingParams, steps: int) -> Result:
        """The Engine's bookkeeping after the fact: a stop string ends the text at the first token whose decoded
        text contains one; EOS (already dropped by the executor) is "stop"; max_tokens "length"; the context
        "context"."""
        if sp.stop:
            for k in range(1, len(out) + 1):
                text = self.decode(out[:k])
                cut = min((i for i in (text.find(x) for x in sp.stop) if i >= 0), default=-1)
                if cut >= 0:
                    return Result(text[:cut], out[:k], "stop", len(prompt))
        if len(out) >= sp.max_tokens:
            finish = "length"
        elif len(out) >= steps:
            finish = "context"
        else:
            finish = "stop"
        return Result(self.decode(out), out, finish, len(prompt))

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        raise NotSupportedError(
            f"llm_score: model {self.name!r} is offloaded (FlexGen block schedule), which only generates; "
            "register the checkpoint without offload to score"
        )

    def close(self) -> None:
        with self.lock:
            self.engine.close()
