"""The offloaded executor's host cost per call, for the cost model's `Hardware.host_call_s` and `host_segment_s`.

The executor works unit by unit and, within a unit, GPU batch by GPU batch: every (decoder layer, GPU batch) call
costs host time (Python, about a dozen kernel launches, copy bookkeeping) that the device cannot run ahead of. With
many small GPU batches this host time, not the copies, sets the pace: on the H100 at 16 GB (OPT-30B, 24 GPU batches
of 16) it was about 1.5-2 ms per call against 1.4 ms of copies (benchmarks/RESULTS.md, session 8).

Measured on a tiny random OPT (hidden size 64), where the device work per call is negligible: the decode step of a
model with more decoder layers minus that of one with fewer, per added (layer, GPU batch) call, under a policy that
takes the offloaded paths (4-bit weights split over GPU and CPU, 4-bit cache and hidden states on the CPU).

A GPU batch's KV cache split by heads over two tiers runs the attention path (quantize the new K/V, attend, store)
once per head segment: the same measurement with the cache split half and half gives the extra host time per extra
segment (`Hardware.host_segment_s`), both from the same four engines round by round (paired differences). On this
development VM's CPU it reads about 0.35 ms against 0.6 ms for a call; on the H100, 0-0.42 ms in three runs
(benchmarks/RESULTS.md, session 9).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import zlib
from pathlib import Path

import torch

from reldl.llm.config import parse_config
from reldl.llm.offload.layers import units
from reldl.llm.offload.policy import Policy
from reldl.llm.offload.tiers import MemorySource

TINY_OPT = dict(hidden_size=64, num_attention_heads=4, ffn_dim=128, vocab_size=128, max_position_embeddings=64)
MEASURE_POLICY = dict(
    weights=(0.5, 0.5, 0.0),
    cache=(0.0, 1.0, 0.0),
    activations=(0.0, 1.0, 0.0),
    compress_weight=True,
    compress_cache=True,
)
SPLIT_CACHE = (0.5, 0.5, 0.0)  # two head segments (the tiny OPT's 4 heads: 2 on the GPU, 2 on the CPU)


def tiny_opt_source(layers: int, directory: Path, device: torch.device, dtype: torch.dtype) -> MemorySource:
    """A random-weight OPT of `layers` layers (TINY_OPT sizes), made on `device` when asked for."""
    cfg = dict(
        model_type="opt",
        architectures=["OPTForCausalLM"],
        num_hidden_layers=layers,
        word_embed_proj_dim=TINY_OPT["hidden_size"],
        do_layer_norm_before=True,
        enable_bias=True,
        activation_function="relu",
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
        **TINY_OPT,
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    config = parse_config(directory)
    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    by_key = {"tok": (v, h), "lm_head": (v, h), "pos": (config.max_positions + 2, h), "fc1": (f, h), "fc2": (h, f)}
    by_key.update({"fc1.b": (f,)}, **{k: (h, h) for k in ("q", "k", "v", "o")})
    shapes = {name: by_key.get(key, (h,)) for _, entries in units(config) for key, name in entries}

    def make(name: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        t = torch.randn(shapes[name], generator=g) * 0.02 if len(shapes[name]) == 2 else torch.ones(shapes[name])
        return t.to(device, dtype)

    return MemorySource(config, make, list(shapes), shapes=shapes)


def _engine(layers: int, root: Path, device: torch.device, batches: int, cache=MEASURE_POLICY["cache"]):
    """An engine over a tiny OPT under the measuring policy (the cache placed as given), its kernels compiled and
    block buffers made."""
    from reldl.llm.offload.executor import OffloadEngine

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    policy = Policy(2, batches, **{**MEASURE_POLICY, "cache": cache})
    eng = OffloadEngine(tiny_opt_source(layers, root / f"l{layers}", device, dtype), policy, device, dtype)
    eng.eos = set()  # random weights: no sequence may stop early
    eng.generate(_prompts(policy.block_size), 3)  # compiles every kernel, makes the block buffers
    return eng


def _prompts(n: int) -> list[list[int]]:
    return [[3 + (7 * i + j) % 100 for j in range(6)] for i in range(n)]


def _fastest_step_s(eng, steps: int) -> float:
    eng.generate(_prompts(eng.policy.block_size), steps + 1)
    return min(s.seconds for s in eng.stats.steps[1:])  # the least disturbed decode step


def _decode_step_s(
    layers: int, root: Path, device: torch.device, batches: int, steps: int, cache=MEASURE_POLICY["cache"]
) -> float:
    """The fastest of `steps` decode steps of a `layers`-layer tiny OPT with `batches` GPU batches."""
    with _engine(layers, root, device, batches, cache) as eng:
        return _fastest_step_s(eng, steps)


def _per_call_s(few, many, batches: int, steps: int) -> float:
    """One round: (fastest step of `many` - fastest step of `few`) per added call (4 layers x `batches`)."""
    return (_fastest_step_s(many, steps) - _fastest_step_s(few, steps)) / (4 * batches)


def measure_call_overhead(
    device: str | torch.device = "cuda",
    batches: int = 8,
    steps: int = 6,
    rounds: int = 3,
    cache: tuple[float, float, float] = MEASURE_POLICY["cache"],
) -> float:
    """Host seconds per (decoder layer, GPU batch) call of a decode step (see the module docstring): the fastest
    decode step of a 6-layer and of a 2-layer tiny OPT under the same policy with `batches` GPU batches, their
    difference over 4 x `batches` calls (the embedding and head units cancel out); the median of `rounds` such
    differences (each engine built once), at least 0. The per-unit host work (one weight fetch per unit) is spread
    over the batches, so the figure is for policies of about `batches` GPU batches; the offloaded paths it times are
    the costliest. `cache`: the cache placement (default: all on the CPU, one head segment)."""
    device = torch.device(device)
    with (
        tempfile.TemporaryDirectory(prefix="reldl-overhead-") as d,
        _engine(2, Path(d), device, batches, cache) as few,
        _engine(6, Path(d), device, batches, cache) as many,
    ):
        return max(0.0, statistics.median(_per_call_s(few, many, batches, steps) for _ in range(rounds)))


def measure_host_overheads(
    device: str | torch.device = "cuda", batches: int = 8, steps: int = 6, rounds: int = 3
) -> dict[str, float]:
    """`Hardware.host_call_s` (cache in one tier) and `host_segment_s` (the extra host seconds of a call whose cache
    is split over two tiers): four engines (2 and 6 layers, cache in one tier and split), each round timing all four
    so the segment cost is a paired difference (split per call - one-tier per call, same round); medians over
    `rounds`, each clamped at 0 only at the end."""
    device = torch.device(device)
    one, seg = [], []
    with tempfile.TemporaryDirectory(prefix="reldl-overhead-") as d:
        root = Path(d)
        with (
            _engine(2, root / "one", device, batches) as few,
            _engine(6, root / "one", device, batches) as many,
            _engine(2, root / "split", device, batches, SPLIT_CACHE) as few_split,
            _engine(6, root / "split", device, batches, SPLIT_CACHE) as many_split,
        ):
            for _ in range(rounds):
                a = _per_call_s(few, many, batches, steps)
                one.append(a)
                seg.append(_per_call_s(few_split, many_split, batches, steps) - a)
    return {"host_call_s": max(0.0, statistics.median(one)), "host_segment_s": max(0.0, statistics.median(seg))}
