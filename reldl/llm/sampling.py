"""Token selection: greedy, temperature, top-k, top-p; seeded per request.

Random draws come from a counter-based hash of (seed, step, token id) rather than a stateful generator, so a
request's text depends only on its own seed and prompt: not on the batch it shares, nor on the device.
"""

from __future__ import annotations

import torch

from reldl.llm.params import SamplingParams  # noqa: F401  (re-exported)

_MASK32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2**31, so 32-bit x * _MUL never overflows int64


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply) on int64 tensors holding values < 2**32."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * _MUL) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _MUL) & _MASK32
    return x ^ (x >> 16)


_TOKEN_HASH: dict[tuple[int, torch.device], torch.Tensor] = {}


def _token_hash(vocab: int, device: torch.device) -> torch.Tensor:
    """The per-token-id half of the noise hash, [vocab] int64: the same every step, so computed once per device."""
    key = (vocab, device)
    t = _TOKEN_HASH.get(key)
    if t is None:
        t = _TOKEN_HASH[key] = _mix(torch.arange(vocab, device=device, dtype=torch.int64) + 0x7F4A7C15)
    return t


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] uniforms in (0, 1), a pure function of (seed, step, token id)."""
    base = _mix(_mix(seeds & _MASK32) ^ _mix((seeds >> 32) + 0x9E3779B9))
    base = _mix(base ^ _mix(steps + 0x632BE5AB))
    tok = _token_hash(vocab, seeds.device)
    bits = _mix(base.unsqueeze(1) ^ tok.unsqueeze(0))
    return (bits.double() + 0.5) / 4294967296.0


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k and nucleus (top-p). top_k <= 0 and top_p >= 1 disable."""
    V = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(V, device=logits.device).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V)).unsqueeze(1)
    drop = ranks >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    before = probs.cumsum(-1) - probs  # probability mass strictly before each token
    drop |= (before >= top_p.unsqueeze(1)) & (ranks > 0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    *,
    all_hot: bool = False,
    unfiltered: bool = False,
) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B]. Rows with temperature 0 are greedy.

    Hints from a caller that knows the parameters on the host (each saves device work or a host sync; the result
    is the same): `all_hot`, every row has temperature > 0; `unfiltered`, no row filters (top_k <= 0 and
    top_p >= 1, which `filter_logits` documents as disabled), so the sort over the vocabulary is skipped."""
    if all_hot:
        lg = logits / temperature.unsqueeze(1)
        if not unfiltered:
            lg = filter_logits(lg, top_k, top_p)
        u = uniform_noise(seeds, steps, lg.shape[-1])
        return (lg.double() - torch.log(-torch.log(u))).argmax(-1)
    tokens = logits.argmax(-1)
    hot = temperature > 0
    if bool(hot.any()):
        idx = hot.nonzero().squeeze(1)
        lg = logits[idx] / temperature[idx].unsqueeze(1)
        if not unfiltered:
            lg = filter_logits(lg, top_k[idx], top_p[idx])
        u = uniform_noise(seeds[idx], steps[idx], lg.shape[-1])
        gumbel = -torch.log(-torch.log(u))
        tokens[idx] = (lg.double() + gumbel).argmax(-1)
    return tokens
