"""FlexGen placement policy and cost model (reldl.llm.offload.policy): validation, hand-computed cases, feasibility
and monotonicity of the search over random hardware."""

from __future__ import annotations

import math
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reldl.llm.offload import COMPRESSED_BYTES, Hardware, ModelShape, Policy, estimate, memory, policy, search_policy
from reldl.llm.offload.policy import GiB, measure_attention, measure_disk

INF = math.inf
# coarse grid: a search takes a few tens of milliseconds
GRID = dict(
    gpu_batch_sizes=(1, 4, 16, 64),
    num_gpu_batches=(1, 2, 8),
    weight_step=0.25,
    cache_step=0.25,
    activation_step=0.5,
    cpu_attention=None,
)


def _hw(**kw) -> Hardware:
    base = dict(
        gpu_mem=INF,
        cpu_mem=INF,
        disk_mem=INF,
        ctog_bw=10e9,
        gtoc_bw=10e9,
        dtoc_bw=2e9,
        ctod_bw=1e9,
        gpu_flops=INF,
        gpu_mem_bw=INF,
        gpu_attn_flops=INF,
        cpu_attn_flops=INF,
    )
    base.update(kw)
    return Hardware(**base)


def test_policy_validation_and_describe():
    with pytest.raises(ValueError, match="sum"):
        Policy(4, weights=(0.5, 0.4, 0.0))
    with pytest.raises(ValueError, match="fractions"):
        Policy(4, cache=(1.2, -0.2, 0.0))
    with pytest.raises(ValueError, match="gpu_batch_size"):
        Policy(0)
    with pytest.raises(ValueError, match="num_gpu_batches"):
        Policy(4, num_gpu_batches=1.5)
    p = Policy(32, 8, weights=(0.2, 0.8, 0), cache=(0, 1, 0), compress_weight=True, cpu_attention=True)
    assert p.block_size == 256 and p.weights == (0.2, 0.8, 0.0)
    d = p.describe()
    assert "\n" not in d and "block 256 = 8 x GPU batch 32" in d and "weights 20/80/0 (4-bit)" in d
    assert "KV cache 0/100/0," in d and "CPU attention" in d


def test_hardware_validation_and_calibration_round_trip():
    with pytest.raises(ValueError, match="ctog_bw"):
        _hw(ctog_bw=0)
    with pytest.raises(ValueError, match="gpu_mem"):
        _hw(gpu_mem=-1)
    hw = Hardware.preset("t4")
    assert Hardware.from_calibration(hw.to_calibration()) == hw
    assert Hardware.from_calibration({"offload_gpu_mem": 1.0}, hw) == hw.with_memory(gpu=1.0)
    with pytest.raises(ValueError, match="unknown"):
        Hardware.preset("nope")


def test_model_shapes():
    for size, params in [("6.7b", 6.7e9), ("30b", 30e9), ("66b", 66e9), ("175b", 175e9)]:
        m = ModelShape.opt(size)
        assert abs(m.params / params - 1) < 0.03, (size, m.params)
    assert ModelShape.opt("OPT-30B") == ModelShape.opt("30b")
    with pytest.raises(ValueError):
        ModelShape.opt("7b")
    from reldl.llm.config import ModelConfig

    cfg = ModelConfig(
        family="llama",
        model_type="llama",
        vocab_size=32000,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=11008,
        max_positions=4096,
        tie_word_embeddings=False,
    )
    m = ModelShape.from_config(cfg)
    assert (m.num_layers, m.hidden, m.ffn, m.heads, m.kv_heads, m.vocab) == (32, 4096, 11008, 32, 8, 32000)
    assert m.gated_mlp and not m.tied_embeddings and m.max_positions == 0 and m.kv_dim == 1024
    assert abs(m.params / 5.93e9 - 1) < 0.01  # Llama-2-7B (6.74e9) less 3/4 of k/v: GQA 8
    ns = SimpleNamespace(
        num_layers=2, hidden_size=64, intermediate_size=256, num_heads=4, num_kv_heads=4, vocab_size=100
    )
    assert ModelShape.from_config(ns).layer_params > 0


def test_pure_transfer_bound_is_bytes_over_bandwidth():
    """Infinite compute, weights streamed, cache and activations on the GPU: a step is weight bytes / bandwidth."""
    m = ModelShape.opt("6.7b")
    hw = _hw()
    # every layer, the embedding unit (token + position tables) and the LM head unit: with the head tied to the
    # token table, that table crosses twice a step (the executor fetches each unit's weights)
    w_bytes = (m.num_layers * m.layer_params + (2 * m.vocab + m.max_positions) * m.hidden) * 2
    e = estimate(Policy(8, weights=(0, 1, 0)), m, hw, prompt_len=128, gen_len=16)
    assert e.decode_step_s == pytest.approx(w_bytes / hw.ctog_bw, rel=1e-12)
    assert e.prefill_s == pytest.approx(w_bytes / hw.ctog_bw, rel=1e-12)  # loaded once per layer for the block
    assert e.total_s == pytest.approx(16 * w_bytes / hw.ctog_bw, rel=1e-12)
    assert e.throughput == pytest.approx(8 * 16 / e.total_s, rel=1e-8)
    # on disk: disk -> CPU (2 GB/s) is the bottleneck with overlap, the sum of both channels without
    e = estimate(Policy(8, weights=(0, 0, 1)), m, hw, 128, 16)
    assert e.decode_step_s == pytest.approx(w_bytes / hw.dtoc_bw, rel=1e-12)
    e = estimate(Policy(8, weights=(0, 0, 1), overlap=False), m, hw, 128, 16)
    assert e.decode_step_s == pytest.approx(w_bytes / hw.dtoc_bw + w_bytes / hw.ctog_bw, rel=1e-12)
    # the block schedule amortises the weight load over all GPU batches of the block
    e1 = estimate(Policy(8, 1, weights=(0, 1, 0)), m, hw, 128, 16)
    e4 = estimate(Policy(8, 4, weights=(0, 1, 0)), m, hw, 128, 16)
    assert e4.decode_step_s == e1.decode_step_s and e4.throughput == pytest.approx(4 * e1.throughput, rel=1e-8)


def test_cache_offload_transfer_and_cpu_attention():
    m = ModelShape.opt("6.7b")
    hw = _hw()
    s, n, bls = 256, 33, 16
    kv_tok = 2 * m.hidden * 2  # K and V, fp16, per layer
    e = estimate(Policy(bls, cache=(0, 1, 0)), m, hw, s, n)
    # decode: the whole cache in (avg context s + n/2) over ctog; the new token's K/V out over gtoc (smaller)
    assert e.terms["decode_ctog"] == pytest.approx(bls * (s + n / 2) * kv_tok / hw.ctog_bw)
    assert e.decode_step_s == pytest.approx(m.num_layers * bls * (s + n / 2) * kv_tok / hw.ctog_bw)
    # CPU attention: only activations cross PCIe
    e = estimate(Policy(bls, cache=(0, 1, 0), cpu_attention=True), m, hw, s, n)
    assert e.terms["decode_ctog"] == pytest.approx(bls * m.hidden * 2 / hw.ctog_bw)
    assert e.terms["decode_gtoc"] == pytest.approx(bls * (kv_tok + m.hidden * 2) / hw.gtoc_bw)
    # prefill: the prompt's K/V go out once
    assert e.terms["prefill_gtoc"] == pytest.approx(bls * s * kv_tok / hw.gtoc_bw)
    mem = memory(Policy(bls, cache=(0, 1, 0), cpu_attention=True), m, s, n)
    assert mem["cpu"] >= m.num_layers * bls * (s + n) * kv_tok


def test_compression():
    m = ModelShape.opt("30b")
    hw = _hw()
    assert COMPRESSED_BYTES == 0.5625  # 4 bits + an fp16 scale and min per 64
    plain = estimate(Policy(4, weights=(0, 0, 1)), m, hw, 64, 8)
    comp = estimate(Policy(4, weights=(0, 0, 1), compress_weight=True), m, hw, 64, 8)
    assert plain.disk_bytes == pytest.approx(m.params * 2)
    assert comp.disk_bytes == pytest.approx(m.params * COMPRESSED_BYTES)
    assert comp.disk_bytes < 0.3 * plain.disk_bytes
    assert comp.decode_step_s == pytest.approx(plain.decode_step_s * COMPRESSED_BYTES / 2)
    plain = memory(Policy(64, cache=(0, 0, 1)), m, 512, 32)
    comp = memory(Policy(64, cache=(0, 0, 1), compress_cache=True), m, 512, 32)
    cache = m.num_layers * 64 * (512 + 32) * 2 * m.hidden
    assert plain["disk"] == pytest.approx(cache * 2) and comp["disk"] == pytest.approx(cache * COMPRESSED_BYTES)
    # allowed to compress, a tight machine runs a bigger block
    hw = Hardware.preset("t4")
    p0, e0 = search_policy(m, hw, 512, 32, **GRID)
    p1, e1 = search_policy(m, hw, 512, 32, **{**GRID, "compress_weight": None, "compress_cache": None})
    assert e1.throughput >= e0.throughput and (p1.compress_weight or p1.compress_cache)


def test_whole_compressed_cache_for_flexgen():
    """split_compressed_cache=False (the policies flexgen can also run): a 4-bit cache sits wholly on one tier, at
    no more throughput than the free search, which does split it on this tight machine."""
    m = ModelShape.opt("30b")
    hw = Hardware.preset("h100").with_memory(gpu=24 * GiB)
    grid = {**GRID, "gpu_batch_sizes": (1, 4, 16, 64), "compress_weight": True, "compress_cache": True}
    free, e_free = search_policy(m, hw, 512, 32, **grid)
    whole, e_whole = search_policy(m, hw, 512, 32, **grid, split_compressed_cache=False)
    assert free.compress_cache and max(free.cache) < 1  # the free search splits the 4-bit cache here
    assert whole.compress_cache and max(whole.cache) == 1 and e_whole.fits(hw)
    assert e_whole.throughput <= e_free.throughput


def test_model_that_fits_gets_all_gpu():
    m = ModelShape.opt("6.7b")
    for hw in (Hardware.preset("h100"), Hardware.preset("h100").with_memory(gpu=1000 * GiB)):
        p, e = search_policy(m, hw, 128, 32, **GRID)
        assert p.weights == p.cache == p.activations == (1.0, 0.0, 0.0), p.describe()
        assert e.cpu_bytes == 0 and e.disk_bytes == 0 and e.fits(hw)
    # nothing off the GPU: more batches only cost memory
    assert p.num_gpu_batches == 1


def test_overlap_never_slower_and_search_estimate_consistent():
    m = ModelShape.opt("30b")
    hw = Hardware.preset("t4")
    p, e = search_policy(m, hw, 512, 32, **GRID)
    assert estimate(p, m, hw, 512, 32) == e
    assert e.fits(hw) and not p.compress_weight and not p.compress_cache
    no = estimate(Policy(**{**p.__dict__, "overlap": False}), m, hw, 512, 32)
    assert no.total_s >= e.total_s and no.gpu_bytes == e.gpu_bytes


def test_nothing_fits():
    with pytest.raises(ValueError, match="no policy"):
        search_policy(ModelShape.opt("175b"), Hardware.preset("t4").with_memory(cpu=0, disk=0), 512, 32, **GRID)


# ------------------------------------------------------------------------------------------ random hardware


def _log(lo, hi):
    return st.floats(math.log(lo), math.log(hi)).map(math.exp)


hardware = st.builds(
    Hardware,
    gpu_mem=_log(2 * GiB, 200 * GiB),
    cpu_mem=st.one_of(st.just(0.0), _log(1 * GiB, 2000 * GiB)),
    disk_mem=st.one_of(st.just(0.0), _log(10 * GiB, 5000 * GiB)),
    ctog_bw=_log(1e9, 100e9),
    gtoc_bw=_log(1e9, 100e9),
    dtoc_bw=_log(0.1e9, 10e9),
    ctod_bw=_log(0.1e9, 10e9),
    gpu_flops=_log(1e12, 1e15),
    gpu_mem_bw=_log(100e9, 5e12),
    gpu_attn_flops=_log(1e10, 1e13),
    cpu_attn_flops=_log(1e9, 1e12),
)
workload = st.tuples(
    st.sampled_from(["1.3b", "6.7b", "30b"]), st.sampled_from([32, 256, 1024]), st.sampled_from([8, 64])
)
SETTINGS = settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _search(m, hw, s, n):
    try:
        return search_policy(m, hw, s, n, **GRID)
    except ValueError:
        return None


@SETTINGS
@given(hw=hardware, wl=workload)
def test_search_is_feasible(hw, wl):
    size, s, n = wl
    m = ModelShape.opt(size)
    found = _search(m, hw, s, n)
    if found is None:
        return
    p, e = found
    assert e.fits(hw)
    mem = memory(p, m, s, n)
    assert (mem["gpu"], mem["cpu"], mem["disk"]) == (e.gpu_bytes, e.cpu_bytes, e.disk_bytes)
    assert e.gpu_bytes <= hw.gpu_mem and e.cpu_bytes <= hw.cpu_mem and e.disk_bytes <= hw.disk_mem
    assert e.throughput > 0 and e.total_s > 0


@SETTINGS
@given(
    hw=hardware,
    wl=workload,
    tier=st.sampled_from(["gpu", "cpu", "disk"]),
    factor=st.floats(1.0, 16.0),
    extra=st.floats(0.0, 64 * GiB),
)
def test_more_memory_never_predicts_lower_throughput(hw, wl, tier, factor, extra):
    size, s, n = wl
    m = ModelShape.opt(size)
    bigger = hw.with_memory(**{tier: hw.capacity(tier) * factor + extra})
    small, big = _search(m, hw, s, n), _search(m, bigger, s, n)
    if small is None:
        return
    assert big is not None
    assert big[1].throughput >= small[1].throughput


@SETTINGS
@given(
    hw=hardware, wl=workload, field=st.sampled_from(["ctog_bw", "dtoc_bw", "gpu_flops", "gpu_q4_bw", "cpu_attn_flops"])
)
def test_faster_hardware_never_predicts_lower_throughput(hw, wl, field):
    size, s, n = wl
    m = ModelShape.opt(size)
    small = _search(m, hw, s, n)
    if small is None:
        return
    faster = Hardware(**{**hw.__dict__, field: getattr(hw, field) * 2})
    assert _search(m, faster, s, n)[1].throughput >= small[1].throughput


# ------------------------------------------------------------------------------------------ measuring hooks


def test_import_needs_no_torch():
    code = "import sys, reldl.llm.offload; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_measure_hooks_on_cpu(tmp_path):
    read, write = measure_disk(str(tmp_path), nbytes=4 << 20)
    assert read > 0 and write > 0 and not list(tmp_path.iterdir())
    assert measure_attention("cpu", batch=1, heads=2, ctx=64, head_dim=16) > 0


def test_cpu_attention_rate_is_the_median_call_not_the_best(monkeypatch):
    """CPU decode attention is timed as the median of five calls after a warm-up: the best of three read 13.6
    GFLOP/s on an H200 box where the executor got about 10, and the search chose CPU attention on it."""
    durations = iter([0.0, 9.0, 1.0, 4.0, 2.0, 3.0])  # the warm-up call (untimed), then five timed calls
    clock = {"t": 0.0}
    calls = []

    def fake_attention(*args):
        calls.append(1)
        clock["t"] += next(durations)

    monkeypatch.setattr(policy.time, "perf_counter", lambda: clock["t"])
    monkeypatch.setattr("reldl.llm.offload.layers.cpu_decode_attention", fake_attention)
    flops = measure_attention("cpu", batch=1, heads=2, ctx=64, head_dim=16)
    assert len(calls) == 6
    assert flops == pytest.approx(4 * 1 * 64 * 2 * 16 / 3.0)  # the median of 9, 1, 4, 2, 3


def test_compressed_weights_stream_at_the_4bit_kernel_rate():
    """A decode step over 4-bit weights on the GPU is charged at gpu_q4_bw (the fused kernel's rate), not at the
    GPU's memory bandwidth; without a measured value it is Q4_BW_FRACTION of it; fp16 weights are unaffected."""
    m = ModelShape.opt("175b")
    hw = _hw(gpu_flops=600e12, gpu_mem_bw=3000e9)
    assert hw.gpu_q4_bw == pytest.approx(policy.Q4_BW_FRACTION * 3000e9)
    p4 = Policy(2, 16, weights=(1.0, 0.0, 0.0), cache=(1.0, 0.0, 0.0), compress_weight=True)
    p16 = replace(p4, compress_weight=False)
    slow = Hardware(**{**hw.__dict__, "gpu_q4_bw": hw.gpu_q4_bw / 2})
    base, halved = estimate(p4, m, hw, 512, 32).terms, estimate(p4, m, slow, 512, 32).terms
    w4 = m.layer_params * COMPRESSED_BYTES
    assert base["decode_compute"] == pytest.approx(16 * w4 / hw.gpu_q4_bw, rel=1e-9)  # attention is free here
    assert halved["decode_compute"] == pytest.approx(2 * base["decode_compute"], rel=1e-9)
    assert estimate(p16, m, slow, 512, 32).terms == estimate(p16, m, hw, 512, 32).terms


def test_host_cost_per_call_bounds_each_unit():
    """host_call_s: every decoder layer takes at least num_gpu_batches x host_call_s (the executor's host work, one
    call per GPU batch), the embedding / head twice that; 0 leaves the estimate as it was; a cheaper host never
    predicts lower throughput, and with a costly host the search prefers fewer, larger GPU batches."""
    m = ModelShape.opt("30b")
    hw = _hw(gpu_flops=600e12, gpu_mem_bw=3000e9, gpu_attn_flops=1e12, cpu_attn_flops=5e9)
    p = Policy(16, 24, weights=(0.9, 0.1, 0.0), cache=(0.0, 1.0, 0.0), compress_weight=True, compress_cache=True)
    base = estimate(p, m, hw, 512, 32)
    assert hw.host_call_s == 0.0 and base.terms["decode_host"] == 0.0
    chans = ("ctog", "gtoc", "dtoc", "ctod", "compute")  # without a host term: the paper's max over the channels
    unit = {u: max(base.terms[f"{u}_{c}"] for c in chans) for u in ("decode", "head")}
    assert base.decode_step_s == pytest.approx(m.num_layers * unit["decode"] + unit["head"], rel=1e-9)
    slow = Hardware(**{**hw.__dict__, "host_call_s": 0.01})
    e = estimate(p, m, slow, 512, 32)
    assert e.terms["decode_host"] == pytest.approx(24 * 0.01) and e.terms["head_host"] == pytest.approx(2 * 24 * 0.01)
    assert e.decode_step_s == pytest.approx(m.num_layers * 24 * 0.01 + 2 * 24 * 0.01)  # host-bound at 10 ms a call
    assert e.prefill_s >= m.num_layers * 24 * 0.01 and e.throughput < base.throughput
    for host in (1e-4, 1e-3, 3e-3):
        a = estimate(p, m, Hardware(**{**hw.__dict__, "host_call_s": host}), 512, 32)
        b = estimate(p, m, Hardware(**{**hw.__dict__, "host_call_s": host / 2}), 512, 32)
        assert b.throughput >= a.throughput
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="host_call_s"):
            Hardware(**{**hw.__dict__, "host_call_s": bad})
    # OPT-30B at 16 GB on H100-like links (q, k, v fused): 16 GPU batches of 24 for a free host, 8 x 48 at 4 ms a call
    caps = dict(gpu_mem=16 * GiB, cpu_mem=100 * GiB, disk_mem=0.0, ctog_bw=50e9, gtoc_bw=50e9)
    free = dict(compress_weight=None, compress_cache=None)
    fast_host = search_policy(m, Hardware(**{**hw.__dict__, **caps}), 512, 32, **free)[0]
    slow_host = search_policy(m, Hardware(**{**hw.__dict__, **caps, "host_call_s": 0.004}), 512, 32, **free)[0]
    assert slow_host.num_gpu_batches < fast_host.num_gpu_batches


def test_cache_segments_follow_the_executors_head_split():
    """The cost model counts a GPU batch's cache segments exactly as the executor splits the heads."""
    import numpy as np

    from reldl.llm.offload.executor import split_counts

    grid = policy._simplex(0.05)
    for heads in (1, 4, 8, 56, 96):
        segs = policy.cache_segments(heads, grid[:, 0], grid[:, 1])
        assert segs.tolist() == [len(split_counts(heads, tuple(f))) for f in grid]
    assert policy.cache_segments(56, np.array([0.1, 0.0, 0.5]), np.array([0.9, 1.0, 0.25])).tolist() == [2, 1, 3]


def test_a_split_cache_costs_host_time_per_segment():
    """host_segment_s: a decoder layer whose cache is split over two tiers costs num_gpu_batches x (host_call_s +
    host_segment_s) of host time, over three tiers one more host_segment_s a call; an unsplit cache and the
    head unit are unaffected; a costly segment steers the search away from split caches."""
    m = ModelShape.opt("30b")
    hw = _hw(gpu_flops=600e12, gpu_mem_bw=3000e9, gpu_attn_flops=1e12, cpu_attn_flops=5e9)
    hw = Hardware(**{**hw.__dict__, "host_call_s": 0.002, "host_segment_s": 0.001})
    kw = dict(weights=(0.9, 0.1, 0.0), compress_weight=True, compress_cache=True)
    one = estimate(Policy(16, 24, cache=(0.0, 1.0, 0.0), **kw), m, hw, 512, 32).terms
    two = estimate(Policy(16, 24, cache=(0.1, 0.9, 0.0), **kw), m, hw, 512, 32).terms
    three = estimate(Policy(16, 24, cache=(0.1, 0.5, 0.4), **kw), m, hw, 512, 32).terms
    assert one["decode_host"] == pytest.approx(24 * 0.002) and one["head_host"] == pytest.approx(2 * 24 * 0.002)
    assert two["decode_host"] == pytest.approx(24 * 0.003) and two["prefill_host"] == pytest.approx(24 * 0.003)
    assert three["decode_host"] == pytest.approx(24 * 0.004) and three["head_host"] == one["head_host"]
    with pytest.raises(ValueError, match="host_segment_s"):
        Hardware(**{**hw.__dict__, "host_segment_s": math.inf})
    assert Hardware.from_calibration(hw.to_calibration()) == hw  # the new field round-trips
    caps = dict(gpu_mem=16 * GiB, cpu_mem=100 * GiB, disk_mem=0.0, ctog_bw=50e9, gtoc_bw=50e9)
    free = search_policy(m, Hardware(**{**hw.__dict__, **caps, "host_segment_s": 0.0}), 512, 32)[0]
    costly = search_policy(m, Hardware(**{**hw.__dict__, **caps, "host_segment_s": 0.05}), 512, 32)[0]
    assert policy.cache_segments(m.kv_heads, free.cache[0], free.cache[1]) == 2  # a split, when it costs nothing
    assert policy.cache_segments(m.kv_heads, costly.cache[0], costly.cache[1]) == 1


def test_executor_call_overhead_is_measured_on_the_cpu():
    """reldl.llm.offload.overhead times the executor's decode calls on a tiny model (the CPU stands in here)."""
    pytest.importorskip("torch")
    import torch

    from reldl.llm.offload.overhead import _decode_step_s, measure_call_overhead, measure_host_overheads

    with tempfile.TemporaryDirectory() as d:  # more decoder layers: more calls, a longer step
        assert _decode_step_s(6, Path(d), torch.device("cpu"), 4, 3) > _decode_step_s(
            2, Path(d), torch.device("cpu"), 4, 3
        )
    assert 0.0 <= measure_call_overhead("cpu", batches=2, steps=2, rounds=1) < 0.5
    got = measure_host_overheads("cpu", batches=2, steps=2, rounds=1)
    assert set(got) == {"host_call_s", "host_segment_s"}
    assert all(0.0 <= v < 0.5 for v in got.values())


def test_a_split_cache_runs_the_attention_path_once_per_segment(monkeypatch):
    """What host_segment_s prices: with the cache split over two tiers each decoder layer and GPU batch attends
    twice (one head segment each), against once with the cache in one tier."""
    import torch

    from reldl.llm.offload import layers
    from reldl.llm.offload.overhead import SPLIT_CACHE, _engine, _prompts

    real, calls = layers.attention, []
    monkeypatch.setattr(layers, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    counts = {}
    with tempfile.TemporaryDirectory() as d:
        for cache in ((0.0, 1.0, 0.0), SPLIT_CACHE):
            with _engine(2, Path(d) / str(len(counts)), torch.device("cpu"), 2, cache) as eng:
                calls.clear()
                eng.generate(_prompts(eng.policy.block_size), 3)
                counts[cache] = len(calls)
    one, split = counts.values()
    assert one == 3 * 2 * 2  # 3 steps x 2 layers x 2 GPU batches
    assert split == 2 * one


def test_host_overheads_are_paired_differences(monkeypatch):
    """measure_host_overheads: host_call_s is the one-tier per-call time, host_segment_s the split per-call time
    minus the one-tier one of the same round (medians, clamped at 0 at the end)."""
    import contextlib

    from reldl.llm.offload import overhead

    @contextlib.contextmanager
    def fake_engine(layers, root, device, batches, cache=overhead.MEASURE_POLICY["cache"]):
        yield (layers, cache != overhead.MEASURE_POLICY["cache"])

    for one_s, split_s, want in ((1e-3, 1.5e-3, 5e-4), (1e-3, 0.8e-3, 0.0)):
        per_call = {False: iter([one_s, one_s * 1.1, one_s * 0.9]), True: iter([split_s, split_s * 1.1, split_s * 0.9])}
        monkeypatch.setattr(overhead, "_engine", fake_engine)
        monkeypatch.setattr(overhead, "_per_call_s", lambda few, many, b, s, times=per_call: next(times[many[1]]))
        got = overhead.measure_host_overheads("cpu")
        assert got["host_call_s"] == pytest.approx(one_s)
        assert got["host_segment_s"] == pytest.approx(want, abs=1e-12)


def test_the_4bit_rate_follows_the_memory_bandwidth_in_use():
    """Without its own calibrated value, gpu_q4_bw is derived from the gpu_mem_bw actually used (a calibration from
    before the field existed, or the CPU stand-in), never carried over from a preset or a GPU's calibration."""
    old = {"offload_gpu_mem_bw": 300e9}  # written before gpu_q4_bw existed
    hw = Hardware.from_calibration(old, base=Hardware.preset("h100"))
    assert hw.gpu_q4_bw == pytest.approx(policy.Q4_BW_FRACTION * 300e9)
    assert Hardware.from_calibration({**old, "offload_gpu_q4_bw": 1e11}).gpu_q4_bw == 1e11
    import duckdb

    from reldl.llm.offload import sql as offload_sql

    con = duckdb.connect()
    con.execute("CREATE SCHEMA reldl")
    con.execute("CREATE TABLE reldl.calibration (key VARCHAR PRIMARY KEY, value DOUBLE)")
    con.execute("INSERT INTO reldl.calibration VALUES ('offload_gpu_q4_bw', 5.2e11), ('offload_gpu_mem_bw', 2.9e12)")
    cpu, _ = offload_sql.hardware(con, "cpu", {}, None)  # the CPU stands in for the GPU
    assert cpu.gpu_q4_bw == pytest.approx(policy.Q4_BW_FRACTION * cpu.gpu_mem_bw) and cpu.gpu_q4_bw < 1e11


def test_from_calibration_keeps_a_measured_4bit_rate_it_does_not_replace():
    measured = Hardware(**{**Hardware.preset("h100").__dict__, "gpu_q4_bw": 4.8e11})
    assert Hardware.from_calibration({"offload_gpu_mem": 1e10}, base=measured).gpu_q4_bw == 4.8e11


def test_charges_the_whole_tensor_placement_the_executor_makes():
    """Weights move as whole tensors (`unit_tiers`): the model charges the shares that placement gives, not the
    policy's nominal fractions. OPT-30B at 85% GPU: q, k, fc1, fc2 on the GPU (10 of a layer's 12 h^2 matrices)."""
    m = ModelShape.opt("30b")
    hw = _hw()
    assert m.layer_tensors() == (m.hidden**2,) * 4 + (4 * m.hidden**2,) * 2
    g, c, d = policy.placed_shares([m.layer_tensors()], (0.85, 0.15, 0.0))
    assert (g, c, d) == pytest.approx((10 / 12, 2 / 12, 0.0))
    nominal = estimate(Policy(8, weights=(0.85, 0.15, 0)), m, hw, 128, 16)
    placed = estimate(Policy(8, weights=(10 / 12, 2 / 12, 0)), m, hw, 128, 16)
    assert nominal.decode_step_s == placed.decode_step_s and nominal.gpu_bytes == placed.gpu_bytes
    # a lone LM head is all or nothing: at 85% it streams from the CPU
    assert policy.placed_shares([(m.vocab * m.hidden,)], (0.85, 0.15, 0.0)) == (0.0, 1.0, 0.0)
    # never more on the GPU than asked, for any share on the search grid
    for frac in policy._simplex(0.05):
        assert policy.placed_shares([m.layer_tensors()], frac)[0] <= frac[0] + 1e-12
