"""Examples from a table: tokenization like the engine's, deterministic shuffling, padded batches."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass
class Example:
    ids: list[int]  # prompt tokens followed by completion tokens
    prompt_len: int  # tokens of the prompt (masked out of the loss)


def tokenize(tokenizer, config, pairs: list[tuple[str, str]], max_length: int) -> list[Example]:
    """(prompt, completion) -> Example. The prompt is encoded as `Engine.encode` does (the tokenizer's own special
    tokens, BOS when the prompt is empty), the completion without special tokens and followed by the first EOS id,
    so the model learns to stop where `llm_generate` stops. Too long: the prompt loses tokens from the left, then
    the completion from the right."""
    prompts = [e.ids for e in tokenizer.encode_batch([p for p, _ in pairs])]
    comps = [e.ids for e in tokenizer.encode_batch([c for _, c in pairs], add_special_tokens=False)]
    eos = config.eos_token_ids[0] if config.eos_token_ids else None
    bos = config.bos_token_id
    out = []
    for p, c in zip(prompts, comps):
        if not p and bos is not None:
            p = [bos]
        c = c + ([eos] if eos is not None else [])
        if len(p) + len(c) > max_length:
            keep_p = max(1, max_length - len(c)) if p else 0
            p = p[len(p) - keep_p :] if keep_p else []
            c = c[: max_length - len(p)]
        if c:
            out.append(Example(list(p) + list(c), len(p)))
    return out


def fingerprint(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(f"{e.prompt_len}:{','.join(map(str, e.ids))};".encode())
    return h.hexdigest()


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the examples in `epoch` (0-based): a permutation seeded by (seed, epoch) alone, so a resumed
    run sees the same batches."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g).tolist()


def steps_per_epoch(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


def collate(examples: list[Example], idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] right-padded with 0 and targets [B, T] (the next token, IGNORE on prompt and padding).
    Right padding with causal attention: real tokens never see the padding, positions are 0..T-1 per row."""
    rows = [examples[i] for i in idx]
    T = max(len(e.ids) for e in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for r, e in enumerate(rows):
        n = len(e.ids)
        ids[r, :n] = torch.tensor(e.ids)
        # position t predicts token t+1; completion tokens are e.ids[prompt_len:]
        start = max(e.prompt_len - 1, 0)
        targets[r, start : n - 1] = torch.tensor(e.ids[start + 1 : n])
    return ids, targets
