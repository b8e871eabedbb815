"""The offloaded generation engine (issue 8, FlexGen's execution half): runs a `Policy` (policy.py).

`OffloadEngine(path, policy, device, dtype).generate(prompts, max_tokens)` decodes greedily, one *block* of
`policy.block_size` = num_gpu_batches x gpu_batch_size sequences at a time, with FlexGen's block schedule
(Algorithm 1 of Sheng et al., 2023): for every step (the prefill, then each decode step), for every unit (the
embedding, each decoder layer, the head), the unit's weights are loaded once and every GPU batch of the block runs
through them. With `policy.overlap`, while a unit computes, the next unit's weights, the next GPU batch's KV cache
and hidden states are being loaded (Mover's load stream and thread), and each batch's new K/V and hidden states are
stored (store stream and thread); see tiers.py for the stream / event ordering. Without overlap every transfer
happens right before its use.

Placement (fractions on gpu / cpu / disk, as the policy gives them):
- Weights: per unit, tensor by tensor (`policy.unit_tiers`): largest first, to the GPU while the GPU's bytes stay
  within its share of the unit, else to the CPU within its share, else to disk (the cost model charges this
  placement, `policy.placed_shares`). Without a disk share a decoder layer's q, k and v (and biases) are placed as
  one stacked matrix (`fuse_qkv_entries`: one GEMM launch instead of three). "disk" tensors are the checkpoint's own
  memory-mapped bytes when the dtypes match (zero copies until the transfer's staging copy), else a file written
  once into the offload directory. With `compress_weight` every matrix (linears and embedding tables; not norms or
  biases) is quantized once at load (kernels.quant4, groups of 64) and only the `Quantized4` parts are placed, moved
  and read: linears run the fused dequantizing GEMM, embeddings dequantize the gathered rows.
- KV cache: dense per (layer, GPU batch), laid out [slots, batch, kv_heads, head_dim] so a prefix is contiguous;
  split along the KV heads by the fractions (each head's attention is independent, so per-segment outputs are just
  concatenated). "disk" is a memory-mapped file in the offload directory: reads and writes go through the page
  cache (enough to run and test the schedule; a real O_DIRECT disk tier is not built). With `compress_cache` the
  cache holds 4-bit K/V (quantize_kv_4bit, groups of 64 along head_dim); on CUDA, decode attention runs
  kernels.quant4_decode_attention (the loaded prefix dequantized in registers), on the CPU it dequantizes the prefix;
  both use the exact K/V of the current step's tokens (as FlexGen does).
- `cpu_attention`: decode attention over the cpu / disk heads runs on the CPU against the host copy (q and the new
  K/V go to the host, the output comes back); the prefill always attends on the device.
- Activations (the hidden states between units, per GPU batch): split along the batch rows.

Prompts of a block are left-padded to the longest (the padding masked out, positions counted from each
prompt's first real token), as FlexGen does; a short last block is filled with copies of its last prompt. Output
stops at EOS (excluded, as reldl's Engine does) or max_tokens; every sequence of a block still runs max_tokens
steps (FlexGen's fixed gen_len).

`profile=True` serialises everything (no overlap) and accumulates transfer seconds (`Mover.transfer_s`) and
compute seconds separately, for the "step time vs max(transfer, compute)" check of benchmarks/bench_offload.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from reldl.kernels.quant4 import (
    GROUP,
    Quantized4,
    dequantize_kv_4bit,
    quantize_4bit,
    quantize_4bit_reference,
    quantize_kv_4bit,
    quantize_kv_4bit_reference,
)
from reldl.kernels.quant4_attention import decode_splits, quant4_decode_attention, quantize_kv_4bit_into
from reldl.llm.engine import encode_texts
from reldl.llm.offload import layers, timeline
from reldl.llm.offload.policy import Policy, fuses_qkv, unit_tiers
from reldl.llm.offload.tiers import (
    ALIGN,
    PIN_METHODS,
    TIERS,
    Arena,
    CheckpointSource,
    DiskPool,
    MemorySource,
    Mover,
    _total,
    nbytes,
)
from reldl.llm.rope import Rotary

STAGING = ("alloc", "fixed")  # OffloadEngine(staging=...): where streamed weights land on the device


def split_counts(n: int, fractions: Sequence[float]) -> list[tuple[str, int, int]]:
    """[0, n) split into (tier, start, end) by cumulative fractions (rounded), empty ranges dropped."""
    out, acc, start = [], 0.0, 0
    for tier, f in zip(TIERS, fractions):
        acc += f
        end = n if tier == "disk" else min(n, round(acc * n))
        if end > start:
            out.append((tier, start, end))
        start = max(start, end)
    return out


def _qbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    rows = math.prod(shape) // shape[-1]
    g = -(-shape[-1] // GROUP)
    return rows * (g * GROUP // 2 + 2 * g * torch.empty((), dtype=dtype).element_size())


def _rows(q, a: int, b: int):
    if isinstance(q, Quantized4):
        return Quantized4(q.packed[a:b], q.scale[a:b], q.minv[a:b], q.k)
    return q[a:b]


def _parts(q) -> list[torch.Tensor]:
    return [q.packed, q.scale, q.minv] if isinstance(q, Quantized4) else [q]


def _empty_like_on(q, device: torch.device):
    if isinstance(q, Quantized4):
        return Quantized4(*(torch.empty(p.shape, dtype=p.dtype, device=device) for p in _parts(q)), q.k)
    return torch.empty(q.shape, dtype=q.dtype, device=device)


# --------------------------------------------------------------------------------------------------- weights


class WeightStore:
    """Every unit's tensors placed on their tiers (see the module docstring); `fetch(u)` starts moving a unit's
    offloaded tensors to the device and returns (weights dict, load ticket)."""

    def __init__(self, source, policy: Policy, device: torch.device, dtype: torch.dtype, arena: Arena, mover: Mover):
        self.device, self.dtype, self.arena, self.mover = device, dtype, arena, mover
        self.staging = "alloc"  # where fetched weights land: fresh tensors from the allocator, or "fixed" (set_staging)
        self._slot = 0
        self._views: dict[tuple[int, int], list[torch.Tensor]] = {}  # (buffer, unit) -> the unit's views of it
        self.units = layers.units(source.config)
        self.placed: list[dict[str, tuple[str, object]]] = []
        self.bytes = {t: 0 for t in TIERS}
        self.checkpoint_mapped = 0  # disk-tier bytes read straight from the checkpoint's files
        self.unit_bytes: list[dict[str, int]] = []
        shared: dict[tuple, object] = {}
        fuse = fuses_qkv(policy.weights)
        for _, entries in self.units:
            if fuse:
                entries = fuse_qkv_entries(entries)
            # shapes first, tensors one at a time: a source that makes its tensors on the GPU (random weights)
            # never holds a whole layer's fp16 weights beside the ones already placed
            shapes = [_entry_shape(source, name) for _, name in entries]
            compress = [policy.compress_weight and len(sh) == 2 for sh in shapes]
            sizes = [_qbytes(sh, dtype) if c else math.prod(sh) * _esize(dtype) for sh, c in zip(shapes, compress)]
            unit, ub = {}, {t: 0 for t in TIERS}
            for (key, name), c, size, tier in zip(entries, compress, sizes, unit_tiers(sizes, policy.weights)):
                sk = (name, tier, c)
                if sk not in shared:
                    shared[sk] = self._place(tier, _entry_tensor(source, name), c, _entry_mapped(source, name))
                    self.bytes[tier] += size
                unit[key] = (tier, shared[sk])
                ub[tier] += size
            self.placed.append(unit)
            self.unit_bytes.append(ub)

    def _place(self, tier: str, t: torch.Tensor, compress: bool, mapped: bool):
        dev, dt = self.device, self.dtype
        if compress:
            w = t.to(dev, dt)
            q = quantize_4bit(w, check_finite=False) if dev.type == "cuda" else quantize_4bit_reference(w)
            del w
            if tier == "gpu":
                return q
            return Quantized4(*(self.arena.put(tier, p.cpu() if tier == "disk" else p) for p in _parts(q)), q.k)
        if tier == "gpu":
            out = torch.empty(t.shape, dtype=dt, device=dev)
            out.copy_(t)
            return out
        if tier == "disk" and mapped and t.dtype == dt and t.device.type == "cpu":
            self.checkpoint_mapped += nbytes(t)
            return t
        if tier == "disk":
            return self.arena.put("disk", t.to("cpu", dt))
        return self.arena.put("cpu", t.to(dt))  # from the map or the device straight into the (pinned) buffer

    def fetch(self, u: int):
        """Start moving unit u's offloaded tensors (one load); (weights dict, load ticket)."""
        out, pairs = self.prepare(u)
        return out, (self.mover.load(pairs) if pairs else None)

    def fetch_in_pieces(self, u: int, pieces: int) -> PieceLoad:
        """Unit u's fetch as up to `pieces` loads, issued by the caller between GPU batches (`PieceLoad`)."""
        out, pairs = self.prepare(u)
        return PieceLoad(self.mover, out, split_pairs(pairs, pieces))

    def prepare(self, u: int):
        """Unit u's weights dict (device tensors; offloaded ones not yet filled) and the (dst, src, on_disk) pairs
        that fill them."""
        pairs = []
        out = {key: val for key, (tier, val) in self.placed[u].items() if tier == "gpu"}
        moved = [(key, tier, val) for key, (tier, val) in self.placed[u].items() if tier != "gpu"]
        views = iter(self._stage(u)) if moved and self.staging == "fixed" else None
        for key, tier, val in moved:
            if views is None:
                dst = _empty_like_on(val, self.device)
            elif isinstance(val, Quantized4):
                dst = Quantized4(*(next(views) for _ in range(3)), val.k)
            else:
                dst = next(views)
            pairs += [(d, s, tier == "disk") for d, s in zip(_parts(dst), _parts(val))]
            out[key] = dst
        return out, pairs

    def _stage(self, u: int) -> list[torch.Tensor]:
        """staging "fixed": device views for unit u's offloaded parts in the next of two buffers, both made once at
        the largest unit's size. Consecutive fetches alternate, and a load waits for the compute issued before it,
        so the unit still being computed keeps its buffer; no allocator call per fetch (near the memory cap the
        allocator's retries synchronise the device)."""
        if ("gpu", "wstage0") not in self.arena._slabs:
            self.make_staging()
        self._slot ^= 1
        key = (self._slot, u)
        if key not in self._views:  # a unit's views of a buffer never change: carved once
            self._views[key] = self.arena.slab("gpu", self._moved_specs(u), f"wstage{self._slot}")
        return self._views[key]

    def make_staging(self) -> None:
        """The two "fixed" staging buffers, at the largest unit's offloaded size (before a timed run: no allocation in
        it)."""
        biggest = max(_total(self._moved_specs(i)) for i in range(len(self.placed)))
        if biggest > ALIGN:  # (no unit streams anything: nothing to make)
            for name in ("wstage0", "wstage1"):
                self.arena.slab("gpu", [((biggest,), torch.uint8)], name)

    def drop_staging(self) -> None:
        self._views.clear()
        for name in ("wstage0", "wstage1"):
            buf = self.arena._slabs.pop(("gpu", name), None)
            if buf is not None:
                self.arena.bytes["gpu"] -= buf.numel()

    def _moved_specs(self, u: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """(shape, dtype) of unit u's offloaded parts, in fetch order."""
        return [
            (tuple(p.shape), p.dtype) for tier, val in self.placed[u].values() if tier != "gpu" for p in _parts(val)
        ]


PIECE_MIN_BYTES = 32 << 20  # a piece of a unit's fetch is no smaller (per-copy cost), but a unit's last piece may be


def split_pairs(pairs: list[tuple], pieces: int, min_bytes: int | None = None) -> list[list[tuple]]:
    """(dst, src, on_disk) copy pairs cut into at most `pieces` groups, in order, of about equal bytes and no
    fewer than `min_bytes` each (but the last); a contiguous pair is cut along its flattened elements, so one large
    matrix spreads over several groups."""
    if not pairs:
        return []
    total = sum(nbytes(src) for _, src, _ in pairs)
    target = max(-(-total // max(1, pieces)), PIECE_MIN_BYTES if min_bytes is None else min_bytes, 1)
    groups: list[list[tuple]] = [[]]
    room = target
    for dst, src, disk in pairs:
        esize = src.element_size()
        whole = not (dst.is_contiguous() and src.is_contiguous() and dst.numel() == src.numel())
        a, n = 0, src.numel()
        while a < n:
            if room <= 0:
                groups.append([])
                room = target
            b = n if whole else min(n, a + max(1, room // esize))
            if (a, b) == (0, n):
                groups[-1].append((dst, src, disk))
            else:
                groups[-1].append((dst.view(-1)[a:b], src.view(-1)[a:b], disk))
            room -= (b - a) * esize
            a = b
    return groups


class PieceLoad:
    """A unit's weight fetch issued in pieces (`issue`) between the GPU batches of the unit before it, so that
    each batch's KV cache and hidden-state loads, on the same FIFO copy stream, wait behind one piece rather than
    the whole unit (OPT-66B on the H200: a 1.5 GB layer took 28 ms to move while the compute waiting behind it sat
    idle; a second copy stream did not help, `cache_stream`). Every piece waits for the compute issued before the
    fetch began (`ready`, as a whole-unit load does): the unit two back, whose memory it may reuse."""

    def __init__(self, mover: Mover, out: dict, groups: list[list[tuple]]):
        self.mover, self.out, self.groups = mover, out, groups
        self.ready = mover.compute_event() if groups else None
        self.tickets: list = []

    def issue(self, upto: int) -> None:
        """Issue the pieces before index `upto` not issued yet."""
        while len(self.tickets) < min(upto, len(self.groups)):
            self.tickets.append(self.mover.load(self.groups[len(self.tickets)], ready=self.ready))

    def finish(self) -> tuple[dict, object]:
        """Issue the rest; (weights dict, one ticket for all the pieces)."""
        self.issue(len(self.groups))
        return self.out, (_AllPieces(self.tickets) if self.tickets else None)


class _AllPieces:
    """The pieces' tickets as one: `result()` waits for each (so a failed piece raises, as a whole-unit load would)
    and gives the last one's event (one FIFO stream: the last copy done means all are)."""

    __slots__ = ("tickets",)

    def __init__(self, tickets: list):
        self.tickets = tickets

    def result(self):
        out = None
        for t in self.tickets:
            out = t.result()
        return out


def fuse_qkv_entries(entries: list[tuple[str, str]]) -> list[tuple[str, object]]:
    """A unit's (key, tensor name) entries with q, k and v (and their biases, when all three have one) as one
    entry "qkv" ("qkv.b") whose name is the tuple of the three: stacked along the output rows at placement. A unit
    without all three, or with biases on only some, is left as it is."""
    names = dict(entries)
    if not all(k in names for k in ("q", "k", "v")):
        return entries
    has_b = [f"{k}.b" in names for k in ("q", "k", "v")]
    if any(has_b) and not all(has_b):
        return entries
    fused = {"q": ("qkv", (names["q"], names["k"], names["v"]))}
    if all(has_b):
        fused["q.b"] = ("qkv.b", (names["q.b"], names["k.b"], names["v.b"]))
    drop = {"k", "v", "k.b", "v.b"}
    return [fused.get(key, (key, name)) for key, name in entries if key not in drop]


def _entry_shape(source, name) -> tuple[int, ...]:
    if isinstance(name, tuple):
        shapes = [tuple(source.shape(n)) for n in name]
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    return tuple(source.shape(name))


def _entry_tensor(source, name) -> torch.Tensor:
    return torch.cat([source.get(n) for n in name]) if isinstance(name, tuple) else source.get(name)


def _entry_mapped(source, name) -> bool:
    return not isinstance(name, tuple) and source.mapped(name)


def _esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------------------------------- KV cache


@dataclass
class _Segment:
    tier: str
    h0: int
    h1: int
    k: object  # [S, B, h, D] tensor or Quantized4 (packed [S, B*h, G*32], scale / minv [S, B*h, G])
    v: object


class KVCache:
    """The block's KV cache: per (layer, GPU batch) a list of head segments placed per `policy.cache`."""

    def __init__(self, eng: OffloadEngine, slots: int):
        cfg, p = eng.config, eng.policy
        self.B, self.D, self.G, self.dtype = p.gpu_batch_size, cfg.head_dim, -(-cfg.head_dim // GROUP), eng.dtype
        self.compress = p.compress_cache
        self.slots = slots
        self.splits: dict[tuple[int, int], int] = {}  # 4-bit attention's split-K count per (heads, query rows)
        self.split = split_counts(cfg.num_kv_heads, p.cache)
        self.segs: dict[tuple[int, int], list[_Segment]] = {}
        specs: dict[str, list] = {t: [] for t in TIERS}
        for _ in range(cfg.num_layers * p.num_gpu_batches):
            for tier, h0, h1 in self.split:
                specs[tier] += self._kv_specs(slots, h1 - h0)
        # one reusable buffer per tier (Arena.slab): a later block or generate call of no more slots carves it again
        tensors = {t: iter(eng.arena.slab(t, specs[t], "kv")) for t in TIERS}
        self.bytes = {t: _total(specs[t]) if specs[t] else 0 for t in TIERS}
        for j in range(cfg.num_layers):
            for k in range(p.num_gpu_batches):
                self.segs[(j, k)] = [
                    _Segment(tier, h0, h1, *self._kv_pair(tensors[tier])) for tier, h0, h1 in self.split
                ]
        self.stores: dict[tuple[int, int], object] = {}  # last store future of (layer, batch)
        # Device buffers the offloaded cache prefix is loaded into for attention on the GPU: two sets (slabs kept by
        # the arena), used in turn by successive (layer, batch) loads. A load into a set waits (Mover.load's ready
        # event, recorded when the load is issued) for the compute already issued, which includes the previous
        # user of that set: the (layer, batch) two loads earlier. Fixed buffers, so the growing prefix allocates
        # nothing per step (the caching allocator's growth showed as 0.6-0.9 s stalls on some decode steps).
        self.load_bufs: list[list[tuple | None]] = []
        self.next_load = 0
        off = [(tier, h0, h1) for tier, h0, h1 in self.split if tier != "gpu"]
        if off and not p.cpu_attention:
            for r in range(2):
                specs = [sp for _, h0, h1 in off for sp in self._kv_specs(slots, h1 - h0)]
                it = iter(eng.arena.slab("gpu", specs, f"kvload{r}"))
                self.load_bufs.append([None if t == "gpu" else self._kv_pair(it) for t, _, _ in self.split])

    def _kv_specs(self, slots: int, h: int) -> list:
        """Buffer specs of one head segment's K and V: [slots, B, h, D], or 4-bit packed [slots, B*h, G*32] with
        scale / minv [slots, B*h, G]."""
        if self.compress:
            one = [((slots, self.B * h, self.G * GROUP // 2), torch.uint8)]
            one += [((slots, self.B * h, self.G), self.dtype)] * 2
        else:
            one = [((slots, self.B, h, self.D), self.dtype)]
        return one * 2

    def _kv_pair(self, it) -> tuple:
        """(K, V) of one head segment from tensors carved by `_kv_specs` (a Quantized4 each when compressed)."""
        if self.compress:
            return tuple(Quantized4(next(it), next(it), next(it), self.D) for _ in range(2))
        return next(it), next(it)


# --------------------------------------------------------------------------------------------------- activations


class ActStore:
    """Hidden states of each GPU batch between units, rows split over tiers per `policy.activations`."""

    def __init__(self, eng: OffloadEngine, max_tokens: int):
        p = eng.policy
        self.eng = eng
        self.B = p.gpu_batch_size
        self.split = split_counts(self.B, p.activations)
        hid = eng.config.hidden_size
        self.host: list[dict[str, torch.Tensor]] = [{} for _ in range(p.num_gpu_batches)]
        self.bytes = {t: 0 for t in TIERS}
        for tier, r0, r1 in self.split:
            if tier != "gpu":
                specs = [(((r1 - r0) * max_tokens * hid,), eng.dtype)] * p.num_gpu_batches
                for k, buf in enumerate(eng.arena.slab(tier, specs, "act")):
                    self.host[k][tier] = buf
                self.bytes[tier] += _total(specs)
        self.dev: list[torch.Tensor | None] = [None] * p.num_gpu_batches
        self.futs: list[object] = [None] * p.num_gpu_batches
        self.shape: list[tuple[int, ...] | None] = [None] * p.num_gpu_batches

    def _view(self, k: int, tier: str, rows: int, T: int, hid: int) -> torch.Tensor:
        return self.host[k][tier][: rows * T * hid].view(rows, T, hid)

    def put(self, k: int, x: torch.Tensor) -> None:
        self.shape[k] = tuple(x.shape)
        _, T, hid = x.shape
        pairs = []
        self.dev[k] = None
        for tier, r0, r1 in self.split:
            if tier == "gpu":
                self.dev[k] = x if (r0, r1) == (0, self.B) else x[r0:r1]
            else:
                pairs.append((self._view(k, tier, r1 - r0, T, hid), x[r0:r1], tier == "disk"))
        self.futs[k] = self.eng.mover.store(pairs) if pairs else None

    def load(self, k: int):
        if self.futs[k] is None:
            return self.dev[k], None
        _, T, hid = self.shape[k]
        dst = torch.empty(self.shape[k], dtype=self.eng.dtype, device=self.eng.device)
        pairs = []
        for tier, r0, r1 in self.split:
            if tier == "gpu":
                dst[r0:r1].copy_(self.dev[k])
            else:
                pairs.append((dst[r0:r1], self._view(k, tier, r1 - r0, T, hid), tier == "disk"))
        return dst, self.eng.mover.load(pairs, after=[self.futs[k]], side=True)


# --------------------------------------------------------------------------------------------------- engine


@dataclass
class StepStats:
    seconds: float
    bytes: dict[str, int]
    transfer_s: float = 0.0  # profile mode only
    compute_s: float = 0.0  # profile mode only
    copies: dict[str, int] = field(default_factory=dict)  # copy calls per kind (Mover.copies)
    jobs: list[tuple[str, int, float]] = field(default_factory=list)  # profile mode: Mover.jobs of this step
    timeline: dict = field(default_factory=dict)  # timeline mode: timeline.summarize of this step


@dataclass
class RunStats:
    steps: list[StepStats] = field(default_factory=list)  # one per step per block: prefill first, then decode
    blocks: int = 0


class OffloadEngine:
    """Greedy generation for OPT and Llama-family checkpoints under an offloading `Policy`.

    `source`: a checkpoint directory (or a `CheckpointSource` / `MemorySource`). `device`: "cuda[:i]" or "cpu"
    (the CPU then stands in for the GPU: same schedule, plain copies). `dtype`: default float16 on CUDA, float32 on
    CPU. `offload_dir`: where disk-tier files go (default: a temporary directory removed by `close`).
    `threads`: worker threads for the transfers. Default: only on CUDA with a disk share in the policy, where a copy
    stages through pinned memory on the host and would block the schedule; pinned copies are asynchronous already,
    and issuing them from the main thread avoided a thread handoff per copy (H100, OPT-30B at 40 GB, full depth:
    decode steps 0.108 -> 0.076 s; benchmarks/RESULTS.md). `profile`: see the module docstring. `pin`: how large
    pinned host buffers are made on CUDA (tiers.Arena: "register", the default, or "alloc"). `cache_stream`: load
    the KV cache and hidden states on a second host-to-device stream, so a GPU batch's cache does not queue behind
    the next unit's weights (FIFO on one stream: on the H200, OPT-66B's 1.5 GB per-layer weight prefetch held back
    the batches behind it, and the decode step was 1.2x the stream's busy time); measured on the H200 it changed
    nothing, so it is off. `staging`: where streamed weights land, "alloc" (fresh tensors per fetch) or "fixed" (two
    buffers made once: no allocator call per unit, whose retries near the memory cap would synchronise the device);
    "alloc", as "fixed" measured slower (OPT-66B, H200). `weight_pieces`: with overlap, the next unit's weights move
    in up to num_gpu_batches pieces, one after each GPU batch's own cache and hidden-state loads (PieceLoad), rather
    than as one load ahead of them all (False, for A/B runs): what fixed the FIFO wait above (OPT-66B: 1.28x).
    """

    def __init__(
        self,
        source,
        policy: Policy,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        *,
        offload_dir: str | Path | None = None,
        threads: bool | None = None,
        profile: bool = False,
        drop_page_cache: bool = False,
        pin: str = "register",
        cache_stream: bool = False,
        staging: str = "alloc",
        weight_pieces: bool = True,
    ):
        if pin not in PIN_METHODS:  # before anything is made (the offload directory)
            raise ValueError(f"OffloadEngine: pin must be one of {', '.join(PIN_METHODS)}, got {pin!r}")
        if not isinstance(source, (CheckpointSource, MemorySource)):
            source = CheckpointSource(source)
        self.source, self.policy = source, policy
        self.config = cfg = source.config
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.tokenizer = source.tokenizer
        self.profile = profile
        self.timeline = False
        self.weight_pieces = weight_pieces
        self._tl_calls: list[tuple] = []
        self.disk = DiskPool(offload_dir, drop_page_cache)
        self.arena = Arena(self.device, self.disk, pin)
        if threads is None:
            threads = self.device.type == "cuda" and policy.uses_disk
        self.mover = Mover(self.device, threads, profile, side_stream=cache_stream)
        self.eos = set(cfg.eos_token_ids)
        self.scale = cfg.head_dim**-0.5
        self.rope = None
        if cfg.family == "llama":
            self.rope = Rotary(
                cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_positions, self.device, torch.float32
            )
        with torch.inference_mode():
            self.weights = WeightStore(source, policy, self.device, self.dtype, self.arena, self.mover)
        self.set_staging(staging)
        self.num_units = len(self.weights.units)
        self.stats = RunStats()
        self.block_bytes = {t: 0 for t in TIERS}
        self.logits: list[list[torch.Tensor]] | None = None

    # ------------------------------------------------------------------ public
    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token ids")
        return encode_texts(self.tokenizer, self.config.bos_token_id, texts)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def generate(
        self, prompts: Sequence[str] | Sequence[Sequence[int]], max_tokens: int, *, keep_logits: bool = False
    ) -> list[list[int]]:
        """Greedy continuations (token ids; EOS ends one and is not included) of prompts given as texts or ids."""
        ids = self.encode_many(prompts) if prompts and isinstance(prompts[0], str) else [list(p) for p in prompts]
        if max_tokens < 1:
            return [[] for _ in ids]
        for p in ids:
            if not p:
                raise ValueError("empty prompt")
        self.stats = RunStats()
        self.logits = [] if keep_logits else None
        bs = self.policy.block_size
        out: list[list[int]] = []
        with torch.inference_mode():
            for b0 in range(0, len(ids), bs):
                block = ids[b0 : b0 + bs]
                n = len(block)
                block = block + [block[-1]] * (bs - n)
                out += self._run_block(block, max_tokens)[:n]
                self.stats.blocks += 1
        return out

    def reserve(self, prompt_len: int, max_tokens: int) -> float:
        """Make the block buffers (KV cache, offloaded activations) for prompts of up to `prompt_len` tokens and
        `max_tokens` new ones now, rather than in the first generate call (generate reuses them while they are large
        enough; pinning fresh host memory costs about a second per few GB). Returns the seconds it took."""
        t = time.perf_counter()
        slots = prompt_len + max_tokens - 1
        if slots > self.config.max_positions:
            raise ValueError(f"prompt {prompt_len} + max_tokens {max_tokens} exceed the context")
        KVCache(self, max(slots, 1))
        ActStore(self, prompt_len)
        return time.perf_counter() - t

    def generate_text(self, prompts: Sequence[str], max_tokens: int) -> list[str]:
        return [self.decode(t) for t in self.generate(prompts, max_tokens)]

    def memory(self) -> dict[str, dict[str, int]]:
        """Bytes placed per tier: "weights" (the checkpoint's own memory-mapped bytes count as disk) and "block"
        (the last block's KV cache and activation buffers); transient device buffers (streamed weights, loaded
        cache) are not counted: see torch.cuda.max_memory_allocated for the peak."""
        return {"weights": dict(self.weights.bytes), "block": dict(self.block_bytes)}

    def set_cache_stream(self, on: bool) -> None:
        """Switch the KV cache / hidden-state loads to their own stream (True) or the weights' (False) for the next
        runs (see the class docstring)."""
        self.mover.side_stream = bool(on)

    def set_weight_pieces(self, on: bool) -> None:
        """Fetch the next unit's weights in pieces between GPU batches (True) or in one load (False) for the next
        runs (see the class docstring)."""
        self.weight_pieces = bool(on)

    def set_staging(self, staging: str) -> None:
        """Where streamed weights land for the next runs: "alloc" (fresh tensors from the caching allocator per
        fetch) or "fixed" (two device buffers made once; see WeightStore._stage)."""
        if staging not in STAGING:
            raise ValueError(f"OffloadEngine: staging must be one of {', '.join(STAGING)}, got {staging!r}")
        self.weights.staging = staging
        if staging == "fixed":  # made now, outside any timed run; the allocator's cached blocks given back first
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.weights.make_staging()
        else:
            self.weights.drop_staging()

    def set_profile(self, on: bool) -> None:
        """Switch the serialised, timed mode (see the module docstring) on or off for the next runs."""
        self.profile = self.mover.profile = bool(on)
        self.mover.jobs.clear()

    def set_timeline(self, on: bool) -> None:
        """Switch the timeline mode (timeline.py: host times and CUDA events around every copy and compute call,
        the schedule unchanged; a summary per step in `StepStats.timeline`) on or off for the next runs."""
        self.timeline = bool(on)

    def close(self) -> None:
        self.mover.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.weights = self._kv = self._act = None
        self.arena.close()
        self.disk.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ block schedule
    def _run_block(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        p, cfg, dev = self.policy, self.config, self.device
        nb, B = p.num_gpu_batches, p.gpu_batch_size
        P = max(len(x) for x in prompts)
        slots = P + max_tokens - 1  # the last generated token is never fed back
        if slots > cfg.max_positions:
            raise ValueError(f"prompt {P} + max_tokens {max_tokens} exceed the context ({cfg.max_positions})")
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        batches = [prompts[k * B : (k + 1) * B] for k in range(nb)]
        pads = [torch.tensor([P - len(x) for x in bt], device=dev) for bt in batches]
        ids = [torch.tensor([[pad_id] * (P - len(x)) + x for x in bt], device=dev) for bt in batches]
        self._kv = KVCache(self, max(slots, 1))
        self._act = ActStore(self, P)
        self.block_bytes = {t: self._kv.bytes[t] + self._act.bytes[t] for t in TIERS}
        outs = [[] for _ in prompts]
        done = [False] * len(prompts)
        pending = None
        for i in range(max_tokens):
            s, T = (0, P) if i == 0 else (P + i - 1, 1)
            keys = torch.arange(s + T, device=dev)
            qpos = torch.arange(s, s + T, device=dev)
            ctx = []
            for k in range(nb):
                pos = (qpos[None, :] - pads[k][:, None]).clamp(min=0)
                mask = (keys[None, None, :] >= pads[k][:, None, None]) & (keys[None, None, :] <= qpos[None, :, None])
                ctx.append((ids[k], pos, mask))
            ref = self._timeline_start() if self.timeline else None
            t0 = time.perf_counter()
            b0, c0 = dict(self.mover.bytes), dict(self.mover.copies)
            tr0, j0 = self.mover.transfer_s, len(self.mover.jobs)
            self._compute_s = 0.0
            tokens, pending = self._step(ctx, s, T, pending, last=i == max_tokens - 1)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            host = torch.cat(tokens).tolist()
            self.stats.steps.append(
                StepStats(
                    time.perf_counter() - t0,
                    {key: self.mover.bytes[key] - b0[key] for key in b0},
                    self.mover.transfer_s - tr0,
                    self._compute_s,
                    {key: self.mover.copies[key] - c0[key] for key in c0},
                    self.mover.jobs[j0:],
                    self._timeline_end(*ref) if ref else {},
                )
            )
            ids = [t[:, None] for t in tokens]
            for r, t in enumerate(host):
                if done[r]:
                    continue
                if t in self.eos:
                    done[r] = True
                else:
                    outs[r].append(t)
        for f in self._kv.stores.values():  # let the last stores land before the buffers go
            self.mover.sync_host(f)
        for f in self._act.futs:
            self.mover.sync_host(f)
        self._kv = self._act = None
        return outs

    def _step(self, ctx, s: int, T: int, pending, last: bool):
        """One step (prefill or decode) of the block over every unit; returns (next tokens per batch, the next
        step's prefetched first unit)."""
        nb, U, overlap = self.policy.num_gpu_batches, self.num_units, self.policy.overlap
        w_cur = pending if pending is not None else self.weights.fetch(0)
        tokens: list[torch.Tensor] = [None] * nb  # type: ignore[list-item]
        pre_a: dict[tuple[int, int], tuple] = {}
        pre_c: dict[tuple[int, int], tuple] = {}
        nxt = None
        for u in range(U):
            w, wt = w_cur
            if overlap:  # the next unit's weights (the next step's embedding after the head) move during this unit,
                # a piece after each batch's own loads (PieceLoad)
                nu_w = u + 1 if u + 1 < U else (None if last else 0)
                nxt = self.weights.fetch_in_pieces(nu_w, nb if self.weight_pieces else 1) if nu_w is not None else None
                if nxt is not None and not self.weight_pieces:
                    nxt.issue(1)  # whole, ahead of this unit's batches' loads
            self.mover.wait(wt)
            for k in range(nb):
                act = pre_a.pop((u, k), None) or self._prefetch_act(u, k)
                cache = pre_c.pop((u, k), None) or self._prefetch_cache(u, k, s, T)
                if overlap:  # the next batch's (or the next unit's first batch's) cache and hidden states
                    nu, nk = (u, k + 1) if k + 1 < nb else (u + 1, 0)
                    if nu < U:
                        if (nu, nk) not in pre_c:
                            pre_c[(nu, nk)] = self._prefetch_cache(nu, nk, s, T)
                        if (nu, nk) not in pre_a and (nu == u or k > 0):  # its producer (nu - 1, nk) has run
                            pre_a[(nu, nk)] = self._prefetch_act(nu, nk)
                    if nxt is not None:
                        nxt.issue(k + 1)
                data = (act, cache)
                if self.profile:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    t0 = time.perf_counter()
                if self.timeline:
                    self._timed_compute(u, k, w, wt, data, ctx[k], s, T, tokens)
                else:
                    self._compute(u, k, w, data, ctx[k], s, T, tokens)
                if self.profile:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    self._compute_s += time.perf_counter() - t0
            del w
            if overlap:
                nxt = nxt.finish() if nxt is not None else None
            else:
                nxt = self.weights.fetch(u + 1) if u + 1 < U else None
            w_cur = nxt
        return tokens, (nxt if overlap else None)

    def _timeline_start(self) -> tuple:
        """The step's reference point: an event on the idle device and the host time beside it."""
        self._tl_calls = []
        self.mover.timeline = []
        if self.device.type != "cuda":
            return None, time.perf_counter()
        torch.cuda.synchronize(self.device)
        ref = torch.cuda.Event(enable_timing=True)
        ref.record(torch.cuda.current_stream(self.device))
        return ref, time.perf_counter()

    def _timeline_end(self, ref, h0: float) -> dict:
        """After the step's synchronisation: the recorded calls and jobs on one clock, summarized."""

        def at(x):
            if x is None:
                return None
            if isinstance(x, float):
                return x - h0
            try:
                return ref.elapsed_time(x) / 1e3
            except RuntimeError:  # an event without timing (recorded before the timeline mode was on)
                return None

        jobs = [timeline.Job(st, n, h - h0, at(a), at(b)) for st, n, h, a, b in self.mover.timeline]
        calls = []
        for u, k, h, he, end, deps, inner in self._tl_calls:
            d = {name: t for name, ev in deps.items() if (t := at(ev)) is not None}
            i = {name: t for name, ev in inner.items() if (t := at(ev)) is not None}
            calls.append(timeline.Call(u, k, h - h0, he - h0, at(end), d, i))
        self.mover.timeline = None
        return timeline.summarize(calls, [j for j in jobs if j.start is not None and j.end is not None])

    def _timed_compute(self, u: int, k: int, w, wt, data, ctx, s: int, T: int, tokens) -> None:
        """`_compute` with its host times, its end (an event on CUDA) and the done events of its inputs' loads."""

        def done(ticket):
            return None if ticket is None else ticket.result()

        h = time.perf_counter()
        self._compute(u, k, w, data, ctx, s, T, tokens)
        he = time.perf_counter()
        if self.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record(torch.cuda.current_stream(self.device))
        else:
            end = he
        deps = {"weights": done(wt), "act": done(data[0][1])}
        self._tl_calls.append((u, k, h, he, end, deps, {"cache": done(data[1][1])}))

    def _prefetch_act(self, u: int, k: int):
        """Start loading the hidden states (unit u, batch k) reads (the output of unit u - 1 for batch k)."""
        return self._act.load(k) if u > 0 else (None, None)

    def _prefetch_cache(self, u: int, k: int, s: int, T: int):
        """Start loading the offloaded prefix [0, s) of the cache of (unit u, batch k) (decoder layers only)."""
        cache = []
        if 0 < u < self.num_units - 1 and s > 0:
            j = u - 1
            pairs = []
            ring = None
            if self._kv.load_bufs and T == 1:
                ring = self._kv.load_bufs[self._kv.next_load % len(self._kv.load_bufs)]
                self._kv.next_load += 1
            for si, seg in enumerate(self._kv.segs[(j, k)]):
                if seg.tier == "gpu" or (self.policy.cpu_attention and T == 1):
                    cache.append(None)
                    continue
                disk = seg.tier == "disk"
                if self._kv.compress:
                    srcs = (_rows(seg.k, 0, s), _rows(seg.v, 0, s))
                    if ring is not None:
                        bufs = (_rows(ring[si][0], 0, s), _rows(ring[si][1], 0, s))
                    else:
                        bufs = tuple(_empty_like_on(x, self.device) for x in srcs)
                    for d, src in zip(bufs, srcs):
                        pairs += [(a, b, disk) for a, b in zip(_parts(d), _parts(src))]
                else:
                    shp = (s + T, *seg.k.shape[1:])
                    if ring is not None:
                        bufs = (ring[si][0][: s + T], ring[si][1][: s + T])
                    else:
                        bufs = tuple(torch.empty(shp, dtype=self.dtype, device=self.device) for _ in range(2))
                    pairs += [(bufs[0][:s], seg.k[:s], disk), (bufs[1][:s], seg.v[:s], disk)]
                cache.append(bufs)
            ticket = self.mover.load(pairs, after=[self._kv.stores.get((j, k))], side=True) if pairs else None
            return cache, ticket
        return [None] * len(self._kv.split), None

    def _compute(self, u: int, k: int, w, data, ctx, s: int, T: int, tokens) -> None:
        cfg = self.config
        ids, pos, mask = ctx
        (x, at), (cache, ct) = data
        if u == 0:
            self._act.put(k, layers.embed(cfg, w, ids, pos, self.dtype))
            return
        self.mover.wait(at)
        if u == self.num_units - 1:
            logits = layers.head(cfg, w, x[:, -1])
            tokens[k] = logits.argmax(-1)
            if self.logits is not None:
                self.logits.append(logits.cpu())
            return
        self.mover.wait(ct)
        j = u - 1
        attend = self._attend_fn(j, k, cache, mask, s, T)
        self._act.put(k, layers.layer(cfg, w, x, attend, pos, self.rope))

    def _attend_fn(self, j: int, k: int, cache, mask, s: int, T: int):
        kv, segs = self._kv, self._kv.segs[(j, k)]
        g = self.config.num_heads // self.config.num_kv_heads

        def attend(q, k_new, v_new):
            outs, pairs = [], []
            B = q.shape[0]
            for seg, loaded in zip(segs, cache):
                h = seg.h1 - seg.h0
                kn = k_new[:, :, seg.h0 : seg.h1].transpose(0, 1)  # [T, B, h, D]
                vn = v_new[:, :, seg.h0 : seg.h1].transpose(0, 1)
                qs = q[:, :, seg.h0 * g : seg.h1 * g]
                if seg.tier != "gpu" and self.policy.cpu_attention and T == 1:
                    outs.append(self._cpu_attend(j, k, seg, qs, kn, vn, mask, s))
                    continue
                full = []
                fused = kv.compress and s > 0 and q.is_cuda  # 4-bit prefix dequantized inside the kernel
                for store, new, buf in ((seg.k, kn, loaded and loaded[0]), (seg.v, vn, loaded and loaded[1])):
                    if kv.compress:
                        if seg.tier == "gpu":  # quantized straight into the cache rows (no temporary, no copies)
                            quantize_kv_4bit_into(new.reshape(T, B * h, new.shape[-1]), store, s)
                            prefix = _rows(store, 0, s)
                        else:
                            qn = self._quantize_kv(new.reshape(T, B * h, new.shape[-1]))
                            prefix = buf
                            pairs += [
                                (d, src, seg.tier == "disk")
                                for d, src in zip(_parts(_rows(store, s, s + T)), _parts(qn))
                            ]
                        if fused:
                            full.append(prefix)
                            continue
                        t = torch.empty((s + T, *new.shape[1:]), dtype=self.dtype, device=self.device)
                        if s:
                            t[:s] = dequantize_kv_4bit(prefix, self.dtype).view(s, *new.shape[1:])
                        t[s:] = new
                    elif seg.tier == "gpu":
                        store[s : s + T] = new
                        t = store[: s + T]
                    else:
                        if buf is None:
                            t = torch.empty((s + T, *new.shape[1:]), dtype=self.dtype, device=self.device)
                        else:
                            t = buf
                        t[s:] = new
                        # stored from `new`, not from t (a load buffer the next loads reuse: kv.load_bufs)
                        pairs.append((store[s : s + T], new, seg.tier == "disk"))
                    full.append(t)
                if fused:  # one split count per head segment for the whole block (the context's final length)
                    key = (h, T * g)
                    if key not in kv.splits:
                        kv.splits[key] = decode_splits(B, h, T * g, q.shape[-1], kv.slots, q.device)
                    o = quant4_decode_attention(qs, full[0], full[1], self.scale, kn, vn, mask, kv.splits[key])
                    outs.append(o.reshape(B, T, -1))
                else:
                    outs.append(layers.attention(qs, full[0], full[1], mask, self.scale))
            if pairs:
                kv.stores[(j, k)] = self.mover.store(pairs)
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

        return attend

    def _quantize_kv(self, x: torch.Tensor) -> Quantized4:
        if x.is_cuda:
            return quantize_kv_4bit(x, check_finite=False)
        return quantize_kv_4bit_reference(x, check_finite=False)

    def _cpu_attend(self, j: int, k: int, seg: _Segment, q, kn, vn, mask, s: int) -> torch.Tensor:
        """Decode attention of one offloaded head segment on the CPU, against its host copy (FlexGen's CPU
        delegation): q and the new K/V go to the host, the output comes back."""
        self.mover.sync_host(self._kv.stores.pop((j, k), None))  # the prefill's stores must have landed
        cpu = torch.device("cpu")
        qh, knh, vnh = q.to(cpu), kn.to(cpu), vn.to(cpu)
        T, B, h, D = knh.shape
        full = []
        for store, new in ((seg.k, knh), (seg.v, vnh)):
            if self._kv.compress:
                qn = quantize_kv_4bit_reference(new.reshape(T, B * h, D), check_finite=False)
                for dst, src in zip(_parts(_rows(store, s, s + T)), _parts(qn)):
                    dst.copy_(src)
                t = torch.empty((s + T, B, h, D), dtype=torch.float32)
                if s:
                    t[:s] = dequantize_kv_4bit(_rows(store, 0, s), torch.float32).view(s, B, h, D)
                t[s:] = new
            else:
                store[s : s + T] = new
                t = store[: s + T]  # read in place, converted chunk by chunk (cpu_decode_attention)
            full.append(t)
            cnt = "disk_write" if seg.tier == "disk" else "d2h"
            self.mover._count(cnt, nbytes(new))
        if T == 1:
            out = layers.cpu_decode_attention(qh, full[0], full[1], mask.to(cpu), self.scale)
        else:
            out = layers.attention(qh.float(), full[0].float(), full[1].float(), mask.to(cpu), self.scale)
        return out.to(self.device, self.dtype)
