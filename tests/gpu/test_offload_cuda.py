"""The offloaded executor on a CUDA GPU: real streams, worker threads, pinned host memory and the Triton 4-bit
kernels. Every placement gives the tokens of the all-on-GPU run with the same compression (the head segments of a
split cache go through the same per-head kernels). Skipped where no GPU exists (CI); run with `pytest tests/gpu`.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from reldl.llm.offload.executor import OffloadEngine
from reldl.llm.offload.policy import Policy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

NEW = 8
CPU, HALF_CPU, THIRDS = (0, 1, 0), (0.5, 0.5, 0), (0.3, 0.3, 0.4)


def _prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 100, (n,), generator=g).tolist() for n in (5, 9, 3, 12, 7, 4)]


def _run(path, policy: Policy, threads: bool | None = None, cache_stream: bool = False) -> list[list[int]]:
    with OffloadEngine(
        path, policy, device="cuda", dtype=torch.float32, threads=threads, cache_stream=cache_stream
    ) as eng:  # float32: no ties
        assert eng.mover.threads == (policy.uses_disk if threads is None else threads)
        assert (eng.mover.h2d_side is not eng.mover.h2d) == cache_stream
        return eng.generate(_prompts(), NEW)


@pytest.mark.parametrize("pieces", [False, True])
@pytest.mark.parametrize("cache_stream", [False, True])
@pytest.mark.parametrize("threads", [None, True])
@pytest.mark.parametrize("compress", [False, True])
def test_placements_match_all_on_gpu(tiny_checkpoints, monkeypatch, compress, threads, cache_stream, pieces):
    """Weights and cache on the CPU, split 50/50 (the cache by heads: a GPU and a host segment per layer, the host
    one loaded into the ring of device buffers every decode step) and over three tiers: the all-on-GPU tokens. The
    attention is slowed on the GPU (a spin before each call on the compute stream), so a load that overwrote a ring
    buffer before the attention reading it had run would change the tokens; the ring must have been used. Copies
    from the engine's default (the main thread without a disk share, worker threads with one) and from worker
    threads always; the cache and hidden states on the weights' stream or on their own (cache_stream); with `pieces`
    every unit's weights move in several loads between the batches (PieceLoad, 256-byte pieces)."""
    ex = importlib.import_module("reldl.llm.offload.executor")
    if pieces:
        monkeypatch.setattr(ex, "PIECE_MIN_BYTES", 256)
    made = []

    class SpyCache(ex.KVCache):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    def slow(fn):
        def run(*a, **kw):
            torch.cuda._sleep(2_000_000)  # ~1 ms on the compute stream
            return fn(*a, **kw)

        return run

    monkeypatch.setattr(ex, "KVCache", SpyCache)
    monkeypatch.setattr(ex, "quant4_decode_attention", slow(ex.quant4_decode_attention))
    monkeypatch.setattr(ex.layers, "attention", slow(ex.layers.attention))
    path = tiny_checkpoints("opt")
    both = dict(compress_weight=compress, compress_cache=compress)
    want = _run(path, Policy(2, 2, **both))
    for name, kw in {
        "cache cpu": dict(cache=CPU),
        "cache half": dict(cache=HALF_CPU),
        "weights half, cache half": dict(weights=HALF_CPU, cache=HALF_CPU),
        "thirds": dict(weights=THIRDS, cache=THIRDS, activations=HALF_CPU),
    }.items():
        made.clear()
        assert _run(path, Policy(2, 2, **both, **kw), threads, cache_stream) == want, name
        assert any(kv.load_bufs and kv.next_load > 0 for kv in made), name  # decode steps loaded through the ring


def test_driver_allocated_pinned_buffers_give_the_same_tokens(tiny_checkpoints, monkeypatch):
    """pin="alloc": the arena's pinned host buffers come from cuMemHostAlloc (every one here: the size threshold is
    lowered for the tiny model); they count as pinned (no staging copies, which the mover would count as disk
    traffic) and the tokens equal the registered-memory run's."""
    tiers = importlib.import_module("reldl.llm.offload.tiers")
    made = []
    real = tiers._driver_host_buffer
    monkeypatch.setattr(tiers, "_driver_host_buffer", lambda size, dev: made.append(size) or real(size, dev))
    monkeypatch.setattr(tiers.Arena, "LARGE", 1)
    path = tiny_checkpoints("opt")
    policy = Policy(2, 2, weights=HALF_CPU, cache=HALF_CPU, activations=HALF_CPU)
    out = {}
    for pin in ("register", "alloc"):
        with OffloadEngine(path, policy, device="cuda", dtype=torch.float32, pin=pin) as eng:
            out[pin] = eng.generate(_prompts(), NEW)
            assert eng.mover.bytes["disk_read"] == 0 and eng.mover.bytes["h2d"] > 0
        if pin == "register":
            assert not made
    assert made and out["alloc"] == out["register"]


@pytest.mark.parametrize("cache_stream", [False, True])
def test_timeline_mode_on_cuda(tiny_checkpoints, cache_stream):
    """The timeline mode on real streams: the same tokens; every call and copy timed on the device clock (the
    weights' loads arrive before the calls that wait for them end; each stream's busy time, idle gaps and tail add
    up to the step)."""
    path = tiny_checkpoints("opt")
    policy = Policy(2, 2, weights=HALF_CPU, cache=HALF_CPU, activations=HALF_CPU)
    want = _run(path, policy, cache_stream=cache_stream)
    with OffloadEngine(path, policy, device="cuda", dtype=torch.float32, cache_stream=cache_stream) as eng:
        eng.set_timeline(True)
        assert eng.generate(_prompts(), NEW) == want
        steps = eng.stats.steps
    for s in steps:
        tl = s.timeline
        assert tl["compute"]["calls"] == eng.num_units * policy.num_gpu_batches
        assert 0 < tl["gpu_step_s"] <= s.seconds
        for name in ("compute", "h2d", "h2d_side", "d2h"):
            if name in tl:
                parts = [v for k, v in tl[name].items() if k in ("busy", "tail") or k.startswith("idle_")]
                assert sum(parts) == pytest.approx(tl["gpu_step_s"], rel=1e-6), name
        assert ("h2d_side" in tl) == cache_stream  # the hidden states come back from the CPU in every step


@pytest.mark.parametrize("compress", [False, True])
def test_fixed_weight_staging_on_cuda(tiny_checkpoints, compress):
    """staging="fixed" (streamed weights in two buffers made once) gives the all-on-GPU tokens, with the weights on
    the CPU, split 50/50 and over three tiers; the allocator makes no device allocation during a second run."""
    path = tiny_checkpoints("opt")
    both = dict(compress_weight=compress, compress_cache=compress)
    want = _run(path, Policy(2, 2, **both))
    for weights in (CPU, HALF_CPU, THIRDS):
        policy = Policy(2, 2, weights=weights, cache=HALF_CPU, **both)
        with OffloadEngine(path, policy, device="cuda", dtype=torch.float32, staging="fixed") as eng:
            assert eng.generate(_prompts(), NEW) == want, weights
            before = torch.cuda.memory_stats()["num_device_alloc"]
            assert eng.generate(_prompts(), NEW) == want, weights
            if not policy.uses_disk:  # (a disk share stages through pinned host copies, not device memory)
                assert torch.cuda.memory_stats()["num_device_alloc"] == before, weights
