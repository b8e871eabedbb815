"""FlexGen's placement policy, cost model and policy search (Sheng et al., 2023, arXiv 2303.06865, section 4).

Pure Python + numpy; torch is imported only by the `measure_*` functions.

Setting: one GPU runs a decoder too large (with its KV cache) for its memory, throughput first. Tensors are spread
over three tiers (GPU, pinned CPU memory, disk). The *block schedule* runs `num_gpu_batches` GPU batches of
`gpu_batch_size` sequences (a block of `block_size` sequences) layer by layer: a layer's weights are loaded once and
every GPU batch of the block runs through it, while the next layer's weights, the next batch's cache and
activations are prefetched (`overlap`).

Cost model (per layer, as in the paper; all quantities in bytes, FLOPs, seconds):

    T      = prefill + (gen_len - 1) * step        # the prefill emits the first token
    prefill = L * layer(prefill terms) + head(prefill terms)
    step    = L * layer(decode terms)  + head(decode terms)
    layer(terms) = max(ctog, gtoc, dtoc, ctod, gpu + cpu, host)        with overlap
                 = max(ctog + gtoc + dtoc + ctod + gpu + cpu, host)  without
    throughput = block_size * gen_len / T          # generated tokens per second

ctog / gtoc: CPU->GPU / GPU->CPU over PCIe, dtoc / ctod: disk->CPU / CPU->disk (the four channels run
concurrently). Per layer, with W the layer's weight bytes, fractions (g, c, d) on GPU/CPU/disk:
  - weights: ctog += (wc + wd) W, dtoc += wd W (loaded once per layer for the whole block).
  - KV cache, prefill: the new K/V of block_size * prompt_len tokens go out: gtoc += (cc + cd) kv, ctod += cd kv.
  - KV cache, decode, context t = prompt_len + gen_len / 2 on average (kv_t = block_size * t * 2 * kv_dim bytes):
      attention on the GPU: the offloaded cache comes in, ctog += (cc + cd) kv_t, dtoc += cd kv_t, and the new
      token's K/V go back (gtoc += (cc + cd) kv_1, ctod += cd kv_1);
      attention on the CPU (`cpu_attention`, the paper's CPU delegation): only q / new K,V go out and the attention
      output comes back (gtoc += (cc + cd)(kv_1 + q), ctog += (cc + cd) out), dtoc += cd kv_t, and the CPU computes
      the (cc + cd) share of the attention.
  - activations (the block's hidden states between layers, fractions hg/hc/hd): read and written once per layer.
  - gpu = max(2 * tokens * params / gpu_flops, num_gpu_batches * W / gpu_mem_bw)  (linears: compute bound, or
    bound by re-reading the weights from GPU memory once per GPU batch) + attention FLOPs / gpu_attn_flops;
    cpu = CPU-side attention FLOPs / cpu_attn_flops (decode attention FLOPs: 4 * t * hidden per token).
  - the embedding / LM head is one more "layer" of vocab * hidden weights, placed like the others.
  - host = num_gpu_batches * host_call_s (the embedding / head: twice that, two units): the executor's host work,
    one call per unit and GPU batch, which the device cannot run ahead of (reldl.llm.offload.overhead measures it;
    0 in the presets); a decoder layer whose KV cache is split by heads over several tiers adds host_segment_s per
    call for each segment past the first (the attention path runs once per segment).
4-bit compression (groups of 64, fp16 scale and min, reldl.kernels.quant4) stores 0.5 + 4/64 bytes per element;
dequantization is fused into the GEMM / attention kernels, which are not as fast per byte as fp16 GEMMs: compressed
weights stream through the GPU matmul at `gpu_q4_bw` (measured with the fused kernel at decode batch sizes) instead
of `gpu_mem_bw`, and compute at Q4_FLOPS_FRACTION of `gpu_flops`.

Peak memory per tier (independent of the hardware): weights by fraction, plus double-buffered staging for one
streamed layer; the whole KV cache of prompt_len + gen_len tokens by fraction, plus a double-buffered copy of one
GPU batch's offloaded cache for one layer when attention runs on the GPU; the block's prefill hidden states by
fraction; and the GPU working set of one GPU batch (prefill intermediates, fp32 logits). The GPU total is raised by
GPU_ALLOC_SLACK for the caching allocator's rounding and fragmentation: a full-depth OPT-30B policy estimated at
39.8 of a 40 GiB cap ran out of memory with 2.1 GiB reserved but unallocated (H100, 2026-11-27).

Search (`search_policy`): exhaustive over a fixed grid (batch sizes x numbers of GPU batches x weight / cache /
activation fractions x attention on CPU or not x compression choices). The grid and every candidate's cost and
memory never depend on the capacities, which only decide feasibility: more memory in any tier enlarges the feasible
set, so the best throughput never drops (exactly: ties compare equal because throughputs are rounded to 30 mantissa
bits before comparing, then the candidate with more on the GPU, then CPU, then the smaller block wins).
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

GiB = 1 << 30
GB = 1e9
GROUP = 64  # quantization group (reldl.kernels.quant4)
SCALE_BYTES = 2  # fp16 scale and min per group
COMPRESSED_BYTES = 0.5 + 2 * SCALE_BYTES / GROUP  # bytes per element of a 4-bit tensor (0.5625)
# the fused dequantizing matmul's rate, where `reldl calibrate` has not measured it (`measure_q4`): as launched by
# the engine (eagerly, M = 4, a 12288 x 12288 weight), the H100 moved 4-bit weight bytes at 0.48-0.55 TB/s against a
# 2.85 TB/s device copy (bench_offload, 2026-11-27: 0.17-0.19x); the kernel alone in a CUDA graph reaches ~0.5x of
# cuBLAS's fp16 byte rate at M = 2-16 (bench_quant4), the launches cost the rest. At M = 2048 it runs at 0.47-0.51x
# cuBLAS's FLOP rate (bench_quant4)
Q4_BW_FRACTION = 0.18
Q4_FLOPS_FRACTION = 0.5
# the GPU peak estimate times (1 + GPU_ALLOC_SLACK): memory PyTorch's caching allocator reserves but cannot hand out
GPU_ALLOC_SLACK = 0.06
TIERS = ("gpu", "cpu", "disk")


# --------------------------------------------------------------------------------------------------- hardware


@dataclass(frozen=True)
class Hardware:
    """Memory capacities (bytes), transfer bandwidths (bytes/s) and compute rates (FLOP/s) of one GPU host.

    `gpu_mem_bw` is the GPU's own memory bandwidth (decode matmuls at small batch are bound by it);
    `gpu_attn_flops` / `cpu_attn_flops` are effective rates of decode attention (one query token against a long
    context: memory bound, far below the matmul rate). Rates may be `math.inf` (that cost is then zero).
    """

    gpu_mem: float
    cpu_mem: float
    disk_mem: float
    ctog_bw: float  # pinned CPU -> GPU
    gtoc_bw: float  # GPU -> pinned CPU
    dtoc_bw: float  # disk -> CPU
    ctod_bw: float  # CPU -> disk
    gpu_flops: float  # fp16 matmul
    gpu_mem_bw: float
    gpu_attn_flops: float
    cpu_attn_flops: float
    gpu_q4_bw: float | None = None  # 4-bit weight bytes/s through the fused matmul (None: Q4_BW_FRACTION * gpu_mem_bw)
    # host seconds the executor spends per (unit, GPU batch) call (Python, kernel launches, copy bookkeeping), which
    # the device cannot run ahead of: a layer takes at least num_gpu_batches * host_call_s (0: not modelled)
    host_call_s: float = 0.0
    # more host seconds per call for each further tier a GPU batch's KV cache is split over (the executor runs the
    # attention path once per head segment): a layer takes at least num_gpu_batches * (host_call_s + (segments - 1)
    # * host_segment_s)
    host_segment_s: float = 0.0

    def __post_init__(self):
        if self.gpu_q4_bw is None:
            object.__setattr__(self, "gpu_q4_bw", Q4_BW_FRACTION * float(self.gpu_mem_bw))
        for f in fields(self):
            v = float(getattr(self, f.name))
            if math.isnan(v) or v < 0 or (f.name.endswith(("bw", "flops")) and v == 0):
                raise ValueError(f"Hardware.{f.name} must be {'>' if f.name.endswith(('bw', 'flops')) else '>='} 0")
            object.__setattr__(self, f.name, v)
        for name in ("host_call_s", "host_segment_s"):
            if math.isinf(getattr(self, name)):
                raise ValueError(f"Hardware.{name} must be finite")

    def with_memory(self, gpu: float | None = None, cpu: float | None = None, disk: float | None = None) -> Hardware:
        return replace(
            self,
            gpu_mem=self.gpu_mem if gpu is None else gpu,
            cpu_mem=self.cpu_mem if cpu is None else cpu,
            disk_mem=self.disk_mem if disk is None else disk,
        )

    def capacity(self, tier: str) -> float:
        return getattr(self, f"{tier}_mem")

    @classmethod
    def preset(cls, name: str) -> Hardware:
        """Illustrative machines: "t4" (the paper's: 16 GB T4, 208 GB RAM, 1.5 TB NVMe, PCIe 3), "a100-40gb",
        "h100" (80 GB, PCIe 5). Measure the real one with `Hardware.measure`."""
        presets = {
            "t4": cls(
                16 * GiB, 208 * GiB, 1500 * GB, 12 * GB, 12 * GB, 2 * GB, 1.5 * GB, 50e12, 300 * GB, 0.25e12, 0.1e12
            ),
            "a100-40gb": cls(
                40 * GiB, 200 * GiB, 2000 * GB, 24 * GB, 24 * GB, 3 * GB, 2 * GB, 250e12, 1500 * GB, 1e12, 0.2e12
            ),
            "h100": cls(
                80 * GiB, 1000 * GiB, 3000 * GB, 50 * GB, 50 * GB, 5 * GB, 3 * GB, 600e12, 3000 * GB, 2.5e12, 0.3e12
            ),
        }
        if name not in presets:
            raise ValueError(f"Hardware.preset: unknown {name!r} (known: {', '.join(presets)})")
        return presets[name]

    @classmethod
    def measure(
        cls, device: str = "cuda", disk_path: str | None = None, quick: bool = False, **overrides: float
    ) -> Hardware:
        """Measure this host (the hooks `reldl calibrate` can call): capacities from the driver / OS / file system,
        PCIe with pinned copies, disk with a temporary file, matmul / attention rates with torch. `device` must be a
        CUDA device for the GPU numbers. `overrides` replace any field (e.g. gpu_mem=... to plan for less)."""
        values = measure_host(device, disk_path, quick)
        values.update(overrides)
        return cls(**values)

    def to_calibration(self) -> dict[str, float]:
        """Keys for the reldl.calibration table (prefix "offload_")."""
        return {f"offload_{f.name}": float(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_calibration(cls, values: dict[str, float], base: Hardware | None = None) -> Hardware:
        """Fields from `values` (as written by `to_calibration`), the rest from `base` (default: the h100 preset)."""
        base = base or cls.preset("h100")
        kw = {f.name: values.get(f"offload_{f.name}", getattr(base, f.name)) for f in fields(cls)}
        if "offload_gpu_mem_bw" in values and "offload_gpu_q4_bw" not in values:  # a calibration from before the
            kw["gpu_q4_bw"] = None  # 4-bit rate existed: derived from its memory bandwidth, not kept from the base
        return cls(**kw)


def _timings(fn, sync, repeat: int) -> list[float]:
    """Seconds of `repeat` timed calls of `fn` after one untimed warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return times


def _best_seconds(fn, sync, repeat: int = 3) -> float:
    return min(_timings(fn, sync, repeat))


def _median_seconds(fn, sync, repeat: int = 5) -> float:
    """The median call: for CPU work, whose best call overstates the rate the executor gets (two 66B measurements on
    one H200 box read 5.9 and 13.6 GFLOP/s best-of-3 decode attention)."""
    return statistics.median(_timings(fn, sync, repeat))


def measure_pcie(device: str = "cuda", nbytes: int = 256 << 20) -> tuple[float, float]:
    """(CPU->GPU, GPU->CPU) bytes/s of a pinned copy."""
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    sync = torch.cuda.synchronize
    h2d = _best_seconds(lambda: dev.copy_(host, non_blocking=True), sync)
    d2h = _best_seconds(lambda: host.copy_(dev, non_blocking=True), sync)
    return nbytes / h2d, nbytes / d2h


def measure_gpu(device: str = "cuda", n: int = 8192) -> tuple[float, float]:
    """(fp16 matmul FLOP/s, device memory bytes/s of a copy) on a CUDA device."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.float16)
    b = torch.randn(n, n, device=device, dtype=torch.float16)
    flops = 2 * n**3 / _best_seconds(lambda: a @ b, torch.cuda.synchronize)
    src = torch.empty(512 << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    bw = 2 * src.numel() / _best_seconds(lambda: dst.copy_(src), torch.cuda.synchronize)
    return flops, bw


def measure_q4(device: str = "cuda", n: int = 12288, m: int = 4) -> float:
    """Bytes/s of 4-bit weights through reldl's fused dequantizing matmul at a decode batch of ``m`` rows (an n x n
    weight: 85 MB at 12288, beyond the L2 cache)."""
    import torch

    from reldl.kernels.quant4 import matmul_4bit, quantize_4bit

    w = torch.randn(n, n, device=device, dtype=torch.float16)
    q = quantize_4bit(w)
    del w
    x = torch.randn(m, n, device=device, dtype=torch.float16)
    secs = _best_seconds(lambda: matmul_4bit(x, q), torch.cuda.synchronize, repeat=5)
    return n * n * COMPRESSED_BYTES / secs


def measure_attention(device: str = "cpu", batch: int = 8, heads: int = 32, ctx: int = 1024, head_dim: int = 128):
    """Decode attention FLOP/s (one query token per sequence against `ctx` keys, 4 * ctx * hidden FLOPs each)."""
    import torch
    import torch.nn.functional as F

    if not str(device).startswith("cuda"):
        # the executor's CPU path: layers.cpu_decode_attention over an fp16 cache in its [S, B, h, D] layout
        from reldl.llm.offload.layers import cpu_decode_attention

        k = torch.randn(ctx, batch, heads, head_dim).half()
        v = torch.randn_like(k)
        q = torch.randn(batch, 1, heads, head_dim)
        mask = torch.ones(batch, 1, ctx, dtype=torch.bool)
        secs = _median_seconds(lambda: cpu_decode_attention(q, k, v, mask, head_dim**-0.5), lambda: None)
        return 4 * batch * ctx * heads * head_dim / secs
    dtype = torch.float16
    q = torch.randn(batch, heads, 1, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, heads, ctx, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    secs = _best_seconds(lambda: F.scaled_dot_product_attention(q, k, v), sync)
    return 4 * batch * ctx * heads * head_dim / secs


def measure_disk(path: str | None = None, nbytes: int = 256 << 20) -> tuple[float, float]:
    """(disk->CPU, CPU->disk) bytes/s: write a temporary file with fsync, drop it from the page cache
    (posix_fadvise, where available), read it back."""
    buf = os.urandom(1 << 20) * (nbytes >> 20)
    fd, name = tempfile.mkstemp(prefix="reldl-disk-", dir=path)
    try:
        t = time.perf_counter()
        with os.fdopen(fd, "wb", buffering=0) as f:
            f.write(buf)
            os.fsync(f.fileno())
        write = time.perf_counter() - t
        with open(name, "rb", buffering=0) as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            t = time.perf_counter()
            while f.read(16 << 20):
                pass
            read = time.perf_counter() - t
    finally:
        os.unlink(name)
    return len(buf) / read, len(buf) / write


def measure_host(device: str = "cuda", disk_path: str | None = None, quick: bool = False) -> dict[str, float]:
    """Every Hardware field measured on this host (a dict; see Hardware.measure)."""
    import torch

    from reldl.llm.offload.overhead import measure_host_overheads

    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        raise RuntimeError("Hardware.measure needs a CUDA device for the GPU numbers (or build Hardware by hand)")
    size = (32 << 20) if quick else (256 << 20)
    free, total = torch.cuda.mem_get_info(torch.device(device))
    ctog, gtoc = measure_pcie(device, size)
    gflops, gbw = measure_gpu(device, 4096 if quick else 8192)
    dtoc, ctod = measure_disk(disk_path, size)
    return dict(
        gpu_mem=float(total),
        cpu_mem=float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
        disk_mem=float(shutil.disk_usage(disk_path or tempfile.gettempdir()).free),
        ctog_bw=ctog,
        gtoc_bw=gtoc,
        dtoc_bw=dtoc,
        ctod_bw=ctod,
        gpu_flops=gflops,
        gpu_mem_bw=gbw,
        gpu_q4_bw=measure_q4(device),
        **measure_host_overheads(device),
        gpu_attn_flops=measure_attention(device, ctx=512 if quick else 2048),
        # at a working set far beyond the CPU caches (24 x 56 heads x 512 slots: 350 MB of fp16 K/V), as decode
        # attention over an offloaded cache is: a cache-resident size overstated it 3x on the H100 box), the median
        # of five calls
        cpu_attn_flops=measure_attention("cpu", batch=24, heads=56, ctx=1024),
    )


# --------------------------------------------------------------------------------------------------- model


OPT_SIZES = {  # layers, hidden, heads, ffn
    "125m": (12, 768, 12, 3072),
    "1.3b": (24, 2048, 32, 8192),
    "6.7b": (32, 4096, 32, 16384),
    "13b": (40, 5120, 40, 20480),
    "30b": (48, 7168, 56, 28672),
    "66b": (64, 9216, 72, 36864),
    "175b": (96, 12288, 96, 49152),
}


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs of a decoder: sizes, and bytes per element of weights / cache / activations."""

    name: str
    num_layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    dtype_bytes: int = 2
    gated_mlp: bool = False  # SwiGLU (3 ffn matrices) or not (2)
    tied_embeddings: bool = True
    max_positions: int = 0  # learned position embeddings (OPT, GPT-2): counted as weights

    def __post_init__(self):
        for f in ("num_layers", "hidden", "ffn", "heads", "kv_heads", "vocab", "dtype_bytes"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"ModelShape.{f} must be >= 1")
        if self.heads % self.kv_heads:
            raise ValueError("ModelShape: heads must be a multiple of kv_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """Linear weights of one decoder layer (q, o: hidden^2; k, v: hidden x kv_dim; MLP: 2 or 3 x hidden x ffn)
        plus biases and norms."""
        h = self.hidden
        mats = 2 * h * h + 2 * h * self.kv_dim + (3 if self.gated_mlp else 2) * h * self.ffn
        return mats + 2 * h + 2 * self.kv_dim + self.ffn + 5 * h

    @property
    def head_params(self) -> int:
        """Embeddings and LM head (one matrix when tied), position embeddings, final norm."""
        return (
            self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
            + self.max_positions * self.hidden
            + 2 * self.hidden
        )

    @property
    def params(self) -> int:
        return self.num_layers * self.layer_params + self.head_params

    def layer_tensors(self, fused_qkv: bool = False) -> tuple[int, ...]:
        """Elements of one layer's weight matrices, in the executor's placement order (q, k, v, o, then the MLP;
        with `fused_qkv`, q, k and v as one matrix: see `fuses_qkv`)."""
        h, kv, f = self.hidden, self.kv_dim, self.ffn
        attn = (h * (h + 2 * kv), h * h) if fused_qkv else (h * h, h * kv, h * kv, h * h)
        return attn + ((f * h,) * (3 if self.gated_mlp else 2))

    def head_units(self) -> tuple[tuple[int, ...], ...]:
        """The embedding unit's and the LM head unit's weight matrices (a tied head is placed with its unit too)."""
        embed = (self.vocab * self.hidden,) + ((self.max_positions * self.hidden,) if self.max_positions else ())
        return (embed, (self.vocab * self.hidden,))

    @classmethod
    def opt(cls, size: str) -> ModelShape:
        """OPT-125m ... OPT-175B ("30b", "opt-30b", "OPT-175B" all work)."""
        key = size.lower().removeprefix("opt-").removeprefix("opt")
        if key not in OPT_SIZES:
            raise ValueError(f"ModelShape.opt: unknown size {size!r} (known: {', '.join(OPT_SIZES)})")
        layers, hidden, heads, ffn = OPT_SIZES[key]
        return cls(f"opt-{key}", layers, hidden, ffn, heads, heads, 50272, 2, False, True, 2048)

    @classmethod
    def from_config(cls, cfg: Any, dtype_bytes: int = 2) -> ModelShape:
        """From a reldl ModelConfig (or anything with num_layers, hidden_size, intermediate_size, num_heads,
        num_kv_heads, vocab_size; optional family, model_type, activation, tie_word_embeddings, max_positions)."""
        family = getattr(cfg, "family", "")
        gated = family == "llama" or getattr(cfg, "activation", "") in ("silu", "swiglu")
        learned_pos = family in ("opt", "gpt2")
        return cls(
            name=str(getattr(cfg, "model_type", family or "model")),
            num_layers=int(cfg.num_layers),
            hidden=int(cfg.hidden_size),
            ffn=int(cfg.intermediate_size),
            heads=int(cfg.num_heads),
            kv_heads=int(getattr(cfg, "num_kv_heads", cfg.num_heads) or cfg.num_heads),
            vocab=int(cfg.vocab_size),
            dtype_bytes=dtype_bytes,
            gated_mlp=gated,
            tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)),
            max_positions=int(getattr(cfg, "max_positions", 0) or 0) if learned_pos else 0,
        )


# --------------------------------------------------------------------------------------------------- placement


# the executor stores a layer's q, k and v projections as one matrix (one GEMM launch instead of three: with many
# small GPU batches the host's launches set a decode step's pace, benchmarks/RESULTS.md session 8), except where
# weights may go to disk, whose tensors are the checkpoint's own memory-mapped bytes (a fused matrix is not)
FUSE_QKV = True


def fuses_qkv(weights: Sequence[float]) -> bool:
    """Whether the executor fuses each layer's q, k and v under these weight fractions (gpu, cpu, disk)."""
    return FUSE_QKV and weights[2] == 0


def unit_tiers(sizes: Sequence[int], fractions: Sequence[float]) -> list[str]:
    """The tier of each whole tensor of one unit (a layer) under the policy's weight fractions (normalized to sum
    to 1). GPU, then CPU, are caps: largest first, a tensor goes to the GPU while the GPU's bytes stay within its
    share of the unit, else to the CPU while the CPU's stay within its share, else to disk (to the CPU when the
    disk share is 0). Largest-first keeps the big matrices' tiers independent of a unit's biases and norms (placed
    last, into what room is left), so the cost model can charge the matrices alone. FlexGen's rule, each tensor to
    the tier holding the midpoint of its bytes, put whole OPT-30B layers on the GPU at 85% (16.6 GB at a 16 GiB
    cap)."""
    total_f = sum(fractions)
    g, c, d = (f / total_f for f in fractions) if total_f > 0 else (0.0, 1.0, 0.0)
    total = sum(sizes)
    room = {"gpu": g * total * (1 + 1e-9), "cpu": c * total * (1 + 1e-9)}
    tiers = ["disk" if d > 0 else "cpu"] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        for tier in ("gpu", "cpu"):
            if sizes[i] <= room[tier]:
                tiers[i] = tier
                room[tier] -= sizes[i]
                break
    return tiers


def placed_shares(units: Sequence[Sequence[int]], fractions: Sequence[float]) -> tuple[float, float, float]:
    """The GPU / CPU / disk shares of the bytes of `units` (tensor sizes per unit) as `unit_tiers` places them:
    what the cost model charges, so that its transfers and memory are those of the placement that runs."""
    on = dict.fromkeys(TIERS, 0)
    for sizes in units:
        for size, tier in zip(sizes, unit_tiers(sizes, fractions), strict=True):
            on[tier] += size
    total = max(sum(on.values()), 1)
    return tuple(on[t] / total for t in TIERS)  # type: ignore[return-value]


def head_placement(model: ModelShape, fractions: Sequence[float]) -> tuple[float, ...]:
    """Elements of the embedding and LM head units as placed: (GPU, CPU, disk) stored; streamed per step from off
    the GPU and from disk (both units); and the most one of the two units streams from off the GPU and from disk
    (staging buffers hold one unit). A tied head placed on the tier its embedding table is on shares that copy; on
    another tier it is a second copy. Both units are streamed every step."""
    units = model.head_units()
    tiers = [unit_tiers(u, fractions) for u in units]
    (embed, head), (te, th) = units, tiers
    stored = dict.fromkeys(TIERS, 0)
    for size, tier in zip(embed, te, strict=True):
        stored[tier] += size
    if not (model.tied_embeddings and th[0] == te[0]):
        stored[th[0]] += head[0]
    moved = [sum(sz for sz, t in zip(u, ts, strict=True) if t != "gpu") for u, ts in zip(units, tiers, strict=True)]
    disk = [sum(sz for sz, t in zip(u, ts, strict=True) if t == "disk") for u, ts in zip(units, tiers, strict=True)]
    return (stored["gpu"], stored["cpu"], stored["disk"], sum(moved), sum(disk), max(moved), max(disk))


def layer_shares(model: ModelShape, fractions: Sequence[float]) -> tuple[float, float, float]:
    """A decoder layer's GPU / CPU / disk shares of its matrices as the executor places them under these weight
    fractions (q, k and v fused where `fuses_qkv`): what the cost model charges and EXPLAIN shows."""
    return _layer_shares_of(model, tuple(fractions), fuses_qkv(fractions))


@functools.lru_cache(maxsize=4096)
def _layer_shares_of(model: ModelShape, fractions: tuple, fused: bool) -> tuple[float, float, float]:
    return placed_shares([model.layer_tensors(fused)], fractions)


@functools.lru_cache(maxsize=4096)
def _head_shares(model: ModelShape, fractions: tuple[float, float, float]) -> tuple[float, ...]:
    return head_placement(model, fractions)


def _per_fractions(fn, wg, wc, wd) -> tuple[np.ndarray, ...]:
    """fn(fractions) -> tuple of floats, over broadcast arrays of fractions (each distinct triple computed once)."""
    flat = np.stack(np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (wg, wc, wd))), -1)
    rows, inv = np.unique(flat.reshape(-1, 3), axis=0, return_inverse=True)
    vals = np.array([fn(tuple(float(x) for x in r)) for r in rows], dtype=np.float64)[inv.reshape(-1)]
    vals = vals.reshape(*flat.shape[:-1], vals.shape[-1])
    return tuple(vals[..., i] for i in range(vals.shape[-1]))


# --------------------------------------------------------------------------------------------------- policy


def _placement(name: str, value: Sequence[float]) -> tuple[float, float, float]:
    t = tuple(float(v) for v in value)
    if len(t) != 3 or any(not (0.0 <= v <= 1.0) for v in t) or abs(sum(t) - 1.0) > 1e-6:
        raise ValueError(f"Policy.{name} must be 3 fractions (gpu, cpu, disk) in [0, 1] summing to 1, got {value}")
    return t


@dataclass(frozen=True)
class Policy:
    """Where weights, KV cache and activations live (fractions on gpu / cpu / disk), and the block shape."""

    gpu_batch_size: int
    num_gpu_batches: int = 1
    weights: tuple[float, float, float] = (1.0, 0.0, 0.0)
    cache: tuple[float, float, float] = (1.0, 0.0, 0.0)
    activations: tuple[float, float, float] = (1.0, 0.0, 0.0)
    compress_weight: bool = False
    compress_cache: bool = False
    overlap: bool = True
    cpu_attention: bool = False  # decode attention over the CPU/disk share of the cache runs on the CPU

    def __post_init__(self):
        for f in ("gpu_batch_size", "num_gpu_batches"):
            v = getattr(self, f)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ValueError(f"Policy.{f} must be an integer >= 1, got {v!r}")
            object.__setattr__(self, f, int(v))
        for f in ("weights", "cache", "activations"):
            object.__setattr__(self, f, _placement(f, getattr(self, f)))

    @property
    def block_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches

    @property
    def uses_disk(self) -> bool:
        """Whether any weights, cache or activations are placed on disk."""
        return any(p[2] > 0 for p in (self.weights, self.cache, self.activations))

    def describe(self) -> str:
        """One line for EXPLAIN."""

        def pl(t):
            return "/".join(f"{round(100 * v):d}" for v in t)

        extras = [
            "overlap" if self.overlap else "no overlap",
            "CPU attention" if self.cpu_attention else "GPU attention",
        ]
        return (
            f"offload policy: block {self.block_size} = {self.num_gpu_batches} x GPU batch {self.gpu_batch_size}; "
            f"% on GPU/CPU/disk: weights {pl(self.weights)}{' (4-bit)' if self.compress_weight else ''}, "
            f"KV cache {pl(self.cache)}{' (4-bit)' if self.compress_cache else ''}, "
            f"activations {pl(self.activations)}; {', '.join(extras)}"
        )


@dataclass(frozen=True)
class Estimate:
    """The cost model's prediction for one policy (times in seconds, memory in bytes, throughput in tokens/s)."""

    gpu_bytes: float
    cpu_bytes: float
    disk_bytes: float
    prefill_s: float  # the whole block's prefill (all layers)
    decode_step_s: float  # one decode step of the whole block
    total_s: float  # prefill + (gen_len - 1) decode steps
    throughput: float  # generated tokens / total_s
    terms: dict[str, float] = field(default_factory=dict, compare=False)  # per-layer terms, for EXPLAIN / tests

    def fits(self, hw: Hardware) -> bool:
        return self.gpu_bytes <= hw.gpu_mem and self.cpu_bytes <= hw.cpu_mem and self.disk_bytes <= hw.disk_mem

    def describe(self) -> str:
        return (
            f"{self.throughput:.3g} tok/s (prefill {self.prefill_s:.3g} s, decode step {self.decode_step_s:.3g} s); "
            f"memory GPU {self.gpu_bytes / GiB:.3g} GiB, CPU {self.cpu_bytes / GiB:.3g} GiB, "
            f"disk {self.disk_bytes / GiB:.3g} GiB"
        )


# --------------------------------------------------------------------------------------------------- cost model


def _round_key(x: np.ndarray) -> np.ndarray:
    """x rounded to 30 mantissa bits with exact operations only (frexp / ldexp / round): near-equal throughputs
    compare equal whatever the order of floating-point operations that produced them."""
    m, e = np.frexp(x)
    return np.ldexp(np.round(m * (1 << 30)) / (1 << 30), e)


def cache_segments(kv_heads: int, cg, cc) -> np.ndarray:
    """How many head segments (tiers holding at least one KV head) the executor splits a GPU batch's cache into:
    its `split_counts` rounding, elementwise over arrays of GPU and CPU fractions (disk takes the rest)."""
    n = np.float64(kv_heads)
    g_end = np.minimum(n, np.round(np.asarray(cg, np.float64) * n))
    c_end = np.maximum(g_end, np.minimum(n, np.round((0.0 + np.asarray(cg, np.float64) + cc) * n)))
    return (g_end > 0).astype(np.float64) + (c_end > g_end) + (n > c_end)


def _cost(
    model: ModelShape,
    hw: Hardware | None,
    prompt_len: int,
    gen_len: int,
    gbs,
    nb,
    w,  # (wg, wc, wd)
    c,  # (cg, cc, cd)
    h,  # (hg, hc, hd)
    cw,
    ck,
    cpu_attn,
    overlap,
) -> dict[str, np.ndarray]:
    """The cost model over numpy arrays (broadcast together): memory per tier and, when `hw` is given, times.
    Elementwise IEEE operations only, so a candidate gets the same numbers alone or inside a grid."""
    f64 = np.float64
    gbs, nb = np.asarray(gbs, f64), np.asarray(nb, f64)
    wg, wc, wd = (np.asarray(v, f64) for v in w)
    cg, cc, cd = (np.asarray(v, f64) for v in c)
    hg, hc, hd = (np.asarray(v, f64) for v in h)
    cw, ck = np.asarray(cw, bool), np.asarray(ck, bool)
    cpu_attn, overlap = np.asarray(cpu_attn, bool), np.asarray(overlap, bool)
    s, n, b = f64(prompt_len), f64(gen_len), f64(model.dtype_bytes)
    hid, kvd, L = f64(model.hidden), f64(model.kv_dim), f64(model.num_layers)
    bls = gbs * nb

    # what the executor actually places (`unit_tiers`, whole tensors): a layer's shares, and the embedding / head
    # units' stored elements per tier and elements streamed per step
    # (cached per model and fractions: a search evaluates the same fraction grid for every batch shape)
    hp = _per_fractions(functools.partial(_head_shares, model), wg, wc, wd)
    wg, wc, wd = _per_fractions(functools.partial(layer_shares, model), wg, wc, wd)
    wbe = np.where(cw, COMPRESSED_BYTES, b)  # bytes per weight element
    cbe = np.where(ck, COMPRESSED_BYTES, b)  # bytes per cache element
    W = f64(model.layer_params) * wbe  # one layer's weights
    E = f64(model.head_params) * wbe  # embeddings + head (compute)
    # as placed: stored per tier, streamed per step (both units), the most one of them streams
    E_gpu, E_cpu, E_disk, E_moved, E_from_disk, E_moved_max, E_disk_max = (v * wbe for v in hp)
    W_off_max = np.maximum((wc + wd) * W, E_moved_max)  # the most one streamed unit moves (staging)
    W_disk_max = np.maximum(wd * W, E_disk_max)
    kv_tok = 2 * kvd * cbe  # K and V of one token, one layer
    C_all = L * bls * (s + n) * kv_tok  # the whole cache
    A = bls * s * hid * b  # the block's hidden states (prefill: the largest)
    off_w, off_c, off_h = wc + wd, cc + cd, hc + hd

    gpu_work = gbs * s * b * (4 * hid + model.ffn * (2 if model.gated_mlp else 1)) + gbs * f64(model.vocab) * 4
    gpu_mem = (1.0 + GPU_ALLOC_SLACK) * (
        wg * L * W
        + E_gpu
        + 2 * W_off_max
        + cg * C_all
        + np.where(cpu_attn, 2 * gbs * kv_tok, 2 * off_c * gbs * (s + n) * kv_tok)
        + hg * A
        + 2 * off_h * gbs * s * hid * b
        + gpu_work
    )
    cpu_mem = (
        wc * L * W
        + E_cpu
        + 2 * W_disk_max
        + cc * C_all
        + 2 * cd * bls * (s + n) * kv_tok
        + hc * A
        + 2 * hd * gbs * s * hid * b
        + np.where(cpu_attn, bls * f64(model.heads) * (s + n) * 4, 0.0)
    )
    disk_mem = wd * L * W + E_disk + cd * C_all + hd * A
    out = dict(gpu_bytes=gpu_mem, cpu_bytes=cpu_mem, disk_bytes=disk_mem)
    if hw is None:
        return out

    P, V = f64(model.layer_params), f64(model.vocab)
    w_bw = np.where(cw, hw.gpu_q4_bw, hw.gpu_mem_bw)  # the GPU matmuls' weight stream
    mm_flops = np.where(cw, Q4_FLOPS_FRACTION * hw.gpu_flops, hw.gpu_flops)

    def combine(ctog, gtoc, dtoc, ctod, gpu, cpu, calls=1.0, call_s=hw.host_call_s):
        """A unit's time: its transfers and compute (overlapped or not), and at least its calls' host time."""
        t = (ctog / hw.ctog_bw, gtoc / hw.gtoc_bw, dtoc / hw.dtoc_bw, ctod / hw.ctod_bw, gpu + cpu)
        t += (calls * nb * call_s,)
        over = np.maximum(np.maximum(np.maximum(t[0], t[1]), np.maximum(t[2], t[3])), t[4])
        return np.maximum(np.where(overlap, over, t[0] + t[1] + t[2] + t[3] + t[4]), t[5]), t

    layer_call_s = hw.host_call_s + (cache_segments(model.kv_heads, cg, cc) - 1) * hw.host_segment_s
    # prefill, one decoder layer
    kv_p = bls * s * kv_tok
    act_p = bls * s * hid * b
    pre_layer, pre_t = combine(
        off_w * W + off_h * act_p,
        off_c * kv_p + off_h * act_p,
        wd * W + hd * act_p,
        cd * kv_p + hd * act_p,
        np.maximum(2 * bls * s * P / mm_flops, nb * W / w_bw) + 2 * bls * s * s * hid / hw.gpu_flops,
        0.0,
        call_s=layer_call_s,
    )
    # decode step, one decoder layer, context t on average
    t_ctx = s + n / 2
    kv_t = bls * t_ctx * kv_tok
    kv_1 = bls * kv_tok
    act_d = bls * hid * b
    attn = 4 * bls * t_ctx * hid
    dec_layer, dec_t = combine(
        off_w * W + off_h * act_d + np.where(cpu_attn, off_c * act_d, off_c * kv_t),
        off_h * act_d + np.where(cpu_attn, off_c * (kv_1 + act_d), off_c * kv_1),
        wd * W + hd * act_d + cd * kv_t,
        hd * act_d + cd * kv_1,
        np.maximum(2 * bls * P / mm_flops, nb * W / w_bw) + np.where(cpu_attn, cg * attn, attn) / hw.gpu_attn_flops,
        np.where(cpu_attn, off_c * attn / hw.cpu_attn_flops, 0.0),
        call_s=layer_call_s,
    )
    # the embedding / LM head (logits of one token per sequence), prefill and decode alike
    head, head_t = combine(
        E_moved, 0.0, E_from_disk, 0.0, np.maximum(2 * bls * V * hid / mm_flops, nb * E / w_bw), 0.0, calls=2.0
    )
    prefill = L * pre_layer + head
    step = L * dec_layer + head
    total = prefill + (n - 1) * step
    thr = _round_key(bls * n / total)
    out.update(prefill_s=prefill, decode_step_s=step, total_s=total, throughput=thr)
    names = ("ctog", "gtoc", "dtoc", "ctod", "compute", "host")
    out.update({f"prefill_{k}": v for k, v in zip(names, pre_t, strict=True)})
    out.update({f"decode_{k}": v for k, v in zip(names, dec_t, strict=True)})
    out.update({f"head_{k}": v for k, v in zip(names, head_t, strict=True)})
    return out


def _check_lengths(prompt_len: int, gen_len: int) -> None:
    if int(prompt_len) < 1 or int(gen_len) < 1:
        raise ValueError("prompt_len and gen_len must be >= 1")


def _policy_args(p: Policy) -> tuple:
    return (
        p.gpu_batch_size,
        p.num_gpu_batches,
        p.weights,
        p.cache,
        p.activations,
        p.compress_weight,
        p.compress_cache,
        p.cpu_attention,
        p.overlap,
    )


def memory(policy: Policy, model: ModelShape, prompt_len: int, gen_len: int) -> dict[str, float]:
    """Peak bytes per tier ({"gpu", "cpu", "disk"}): needs no hardware."""
    _check_lengths(prompt_len, gen_len)
    r = _cost(model, None, prompt_len, gen_len, *_policy_args(policy))
    return {t: float(r[f"{t}_bytes"]) for t in TIERS}


def estimate(policy: Policy, model: ModelShape, hardware: Hardware, prompt_len: int, gen_len: int) -> Estimate:
    """The cost model's prediction for `policy` (see the module docstring). Does not check capacities: use
    `Estimate.fits(hardware)`."""
    _check_lengths(prompt_len, gen_len)
    r = _cost(model, hardware, prompt_len, gen_len, *_policy_args(policy))
    return _estimate_at(r, ())


def _estimate_at(r: dict[str, np.ndarray], idx) -> Estimate:
    def get(k):
        return float(np.broadcast_to(r[k], r["throughput"].shape)[idx])

    main = ("gpu_bytes", "cpu_bytes", "disk_bytes", "prefill_s", "decode_step_s", "total_s", "throughput")
    terms = {k: get(k) for k in r if k not in main}
    return Estimate(*(get(k) for k in main), terms=terms)


# --------------------------------------------------------------------------------------------------- search

GPU_BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
NUM_GPU_BATCHES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def _simplex(step: float) -> np.ndarray:
    """Every (gpu, cpu, disk) on a grid of `step` summing to 1, as an array [k, 3] (exact fractions i / steps)."""
    steps = round(1 / step)
    if steps < 1 or abs(steps * step - 1) > 1e-9:
        raise ValueError(f"placement step must divide 1, got {step}")
    pts = [(i / steps, j / steps, (steps - i - j) / steps) for i in range(steps + 1) for j in range(steps + 1 - i)]
    return np.array(pts, dtype=np.float64)


def _choices(value: bool | None) -> tuple[bool, ...]:
    return (False, True) if value is None else (bool(value),)


def search_policy(
    model: ModelShape,
    hardware: Hardware,
    prompt_len: int,
    gen_len: int,
    *,
    gpu_batch_sizes: Sequence[int] = GPU_BATCH_SIZES,
    num_gpu_batches: Sequence[int] = NUM_GPU_BATCHES,
    weight_step: float = 0.05,
    cache_step: float = 0.1,
    activation_step: float = 0.5,
    compress_weight: bool | None = False,
    compress_cache: bool | None = False,
    cpu_attention: bool | None = None,
    overlap: bool = True,
    split_compressed_cache: bool = True,
) -> tuple[Policy, Estimate]:
    """The highest-throughput policy whose peak memory fits every tier, searched exhaustively over the grid.

    compress_* / cpu_attention: True or False fixes the choice, None searches both. split_compressed_cache=False
    keeps a 4-bit cache wholly on one tier (the policies flexgen can run too). Raises ValueError when no
    candidate fits. Monotone in memory: see the module docstring.
    """
    _check_lengths(prompt_len, gen_len)
    ws, cs, hs = _simplex(weight_step), _simplex(cache_step), _simplex(activation_step)
    cwo, cko, cao = _choices(compress_weight), _choices(compress_cache), _choices(cpu_attention)
    # candidate axes: weights [Wn,1,1,1,1,1], cache [1,Cn,1,1,1,1], activations [1,1,Hn,1,1,1], cw, ck, cpu_attn
    shp = (len(ws), len(cs), len(hs), len(cwo), len(cko), len(cao))

    def axis(a, i):
        s = [1] * len(shp)
        s[i] = len(a)
        return np.asarray(a).reshape(s)

    w = tuple(axis(ws[:, t], 0) for t in range(3))
    c = tuple(axis(cs[:, t], 1) for t in range(3))
    h = tuple(axis(hs[:, t], 2) for t in range(3))
    cw, ck, ca = axis(cwo, 3), axis(cko, 4), axis(cao, 5)
    # tie-breaks (exact): more on the GPU, then on the CPU (rather than disk), smaller block, no 4-bit, GPU attention
    on_gpu = w[0] + c[0] + h[0]
    on_cpu = w[1] + c[1] + h[1]
    best_key, best = None, None
    for gbs in sorted(set(int(v) for v in gpu_batch_sizes)):
        for nbv in sorted(set(int(v) for v in num_gpu_batches)):
            r = _cost(model, hardware, prompt_len, gen_len, gbs, nbv, w, c, h, cw, ck, ca, overlap)
            ok = (r["gpu_bytes"] <= hardware.gpu_mem) & (r["cpu_bytes"] <= hardware.cpu_mem)
            ok &= r["disk_bytes"] <= hardware.disk_mem
            if not split_compressed_cache:  # a 4-bit cache wholly on one tier (flexgen cannot split one)
                ok = ok & ~(ck & (np.maximum(np.maximum(c[0], c[1]), c[2]) < 1.0))
            ok = np.broadcast_to(ok, shp)
            if not ok.any():
                continue
            thr = np.broadcast_to(r["throughput"], shp)
            top = thr[ok].max()
            cand = ok & (thr == top)
            # lexicographic preference among the candidates with the top throughput
            pref = [np.broadcast_to(on_gpu, shp), np.broadcast_to(on_cpu, shp)]
            pref += [-np.broadcast_to(cw, shp).astype(float), -np.broadcast_to(ck, shp).astype(float)]
            pref += [-np.broadcast_to(ca, shp).astype(float)]
            for p in pref:
                sel = p[cand].max()
                cand &= p == sel
            idx = tuple(int(i[0]) for i in np.nonzero(cand))
            key = (float(top), *(float(p[idx]) for p in pref[:2]), -gbs * nbv, -nbv)
            if best_key is None or key > best_key:
                best_key, best = key, (gbs, nbv, idx, r)
    if best is None:
        raise ValueError(
            f"search_policy: no policy on the grid fits {model.name} (prompt {prompt_len}, gen {gen_len}) in "
            f"GPU {hardware.gpu_mem / GiB:.3g} GiB / CPU {hardware.cpu_mem / GiB:.3g} GiB / "
            f"disk {hardware.disk_mem / GiB:.3g} GiB"
        )
    gbs, nbv, idx, r = best
    iw, ic, ih, icw, ick, ica = idx
    policy = Policy(
        gpu_batch_size=gbs,
        num_gpu_batches=nbv,
        weights=tuple(ws[iw]),
        cache=tuple(cs[ic]),
        activations=tuple(hs[ih]),
        compress_weight=cwo[icw],
        compress_cache=cko[ick],
        overlap=overlap,
        cpu_attention=cao[ica],
    )
    return policy, _estimate_at({k: np.broadcast_to(v, shp) for k, v in r.items()}, idx)
