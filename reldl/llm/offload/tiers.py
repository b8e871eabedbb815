"""Memory tiers and the transfers between them, for the offloaded executor (issue 8).

Tiers: "gpu" (tensors on the compute device), "cpu" (host tensors, pinned when the device is CUDA) and "disk"
(memory-mapped files). On a CPU-only machine the same code runs with the "device" being the CPU: "gpu" tensors are
ordinary CPU tensors and every copy is a plain synchronous copy, so each tier stands in for the others.

- `CheckpointSource`: a safetensors checkpoint whose tensors are returned as views of read-only (copy-on-write)
  memory maps of the files: reading a disk-tier weight costs the page faults of the copy that moves it, nothing
  else. `MemorySource`: tensors built in memory (the benchmark's random weights).
- `Arena`: allocations on a tier; "cpu" and "disk" carve many tensors out of one pinned buffer / one file.
  `Arena.slab` keeps one such buffer per key and carves it again for every request that fits (the executor's KV
  cache and activation buffers, reused across blocks and generate calls: pinning 8 GB of fresh host memory costs
  seconds). Large pinned buffers are faulted in by all CPU threads (and asked for transparent huge pages) before
  cudaHostRegister, which would otherwise fault them in one page at a time on one thread. `pin="alloc"` makes them
  with the driver's cuMemHostAlloc instead (exact size, no rounding): on the H100 box, copies from 48 GiB of
  registered buffers ran at 46.6 GB/s (680 MB) and 43.6 GB/s (12 MB), against 49.0 and 51.3 GB/s from 48 GiB of
  cudaHostAlloc'd ones (benchmarks/RESULTS.md, session 9); an option until measured inside the executor.
- `Mover`: asynchronous host<->device copies. On CUDA, loads (host -> device) run on their own stream, stores
  (device -> host) on another, issued inline or (`threads=True`) from a load and a store worker thread; pageable or
  memory-mapped sources go through a pinned staging buffer (torch's caching host allocator keeps it alive until its
  copy is done). Ordering: a load's destination is allocated on the compute stream by the caller, and the load
  stream waits for an event recorded at that moment, so memory the allocator recycled is never written while earlier
  compute still reads it; the compute stream waits for the load's event before using the data (`Mover.wait`); a
  store waits for an event recorded on the compute stream after the producing kernels, and marks its source with
  `record_stream` so the allocator does not recycle it before the copy ends; a load that reads what a store wrote
  waits for the store's future (host side) and event (device side).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from reldl.errors import CheckpointError
from reldl.llm.config import ModelConfig, parse_config
from reldl.llm.loader import _weight_files, resolve

TIERS = ("gpu", "cpu", "disk")
ALIGN = 64  # byte alignment of tensors carved out of one buffer / file

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _carve(flat: torch.Tensor, specs: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    out, off = [], 0
    for shape, dtype in specs:
        n = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        out.append(flat[off : off + n].view(dtype).view(shape))
        off += -(-n // ALIGN) * ALIGN
    return out


def _total(specs: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> int:
    tot = 0
    for shape, dtype in specs:
        n = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        tot += -(-n // ALIGN) * ALIGN
    return max(tot, ALIGN)


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


_MADV_HUGEPAGE = 14  # Linux


def prefault(buf: torch.Tensor) -> None:
    """Fault in a fresh host buffer's pages with every CPU thread (torch's parallel fill), after asking for
    transparent huge pages on it (Linux; ignored where unsupported). cudaHostRegister of resident pages is then
    a pinning walk, not a single-threaded page-fault loop."""
    lib = _libc()
    if lib is not None and hasattr(lib, "madvise"):
        import ctypes

        page = 1 << 21
        start = -(-buf.data_ptr() // page) * page
        end = (buf.data_ptr() + buf.numel() * buf.element_size()) // page * page
        if end > start:
            lib.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)
    buf.view(torch.uint8).zero_()


# --------------------------------------------------------------------------------------------------- sources


class CheckpointSource:
    """A safetensors checkpoint directory: config, tokenizer (if any), tensors as memory-mapped views.

    `get(name)` returns a CPU tensor viewing the file's bytes (np.memmap in copy-on-write mode: nothing is read
    until the tensor is, and nothing is ever written back). Names are Hugging Face names (`loader.resolve` maps
    checkpoints that omit the `model.` prefix)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.config: ModelConfig = parse_config(self.path)
        tok = self.path / "tokenizer.json"
        self.tokenizer = Tokenizer.from_file(str(tok)) if tok.is_file() else None
        self.entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        for f in _weight_files(self.path):
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if meta["dtype"] not in _ST_DTYPES:
                    raise CheckpointError(f"{f}: tensor {name!r} has unsupported dtype {meta['dtype']}")
                start, end = meta["data_offsets"]
                self.entries[name] = (f, _ST_DTYPES[meta["dtype"]], tuple(meta["shape"]), 8 + n + start, 8 + n + end)
        self._maps: dict[Path, np.memmap] = {}

    def has(self, name: str) -> bool:
        return resolve(self.entries, name) in self.entries

    def mapped(self, name: str) -> bool:
        return True

    def _entry(self, name: str) -> tuple:
        key = resolve(self.entries, name)
        if key not in self.entries:
            raise CheckpointError(f"{self.path}: weight {name!r} missing from the safetensors files")
        return self.entries[key]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[2]

    def get(self, name: str) -> torch.Tensor:
        f, dtype, shape, a, b = self._entry(name)
        mm = self._maps.get(f)
        if mm is None:
            mm = self._maps[f] = np.memmap(f, dtype=np.uint8, mode="c")
        raw = torch.from_numpy(mm[a:b])
        if b - a == 0:
            return torch.empty(shape, dtype=dtype)
        if (a % torch.empty((), dtype=dtype).element_size()) != 0:  # misaligned (never in files safetensors writes)
            raw = raw.clone()
        return raw.view(dtype).view(shape)


class MemorySource:
    """Tensors given by a function (name -> tensor, on any device), for random-weight benchmarks. `shapes` (name ->
    shape) lets a reader size tensors without making them; without it `shape` makes the tensor."""

    def __init__(
        self,
        config: ModelConfig,
        make: Callable[[str], torch.Tensor],
        names: Sequence[str],
        tokenizer=None,
        shapes: dict[str, tuple[int, ...]] | None = None,
    ):
        self.config, self._make, self.names, self.tokenizer = config, make, set(names), tokenizer
        self._shapes = shapes or {}

    def has(self, name: str) -> bool:
        return name in self.names

    def mapped(self, name: str) -> bool:
        return False

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._shapes[name]) if name in self._shapes else tuple(self._make(name).shape)

    def get(self, name: str) -> torch.Tensor:
        return self._make(name)


# --------------------------------------------------------------------------------------------------- arenas


class DiskPool:
    """Files under one directory (a temporary one by default, removed by `close`). `drop_cache=True` asks the
    kernel to drop a file's pages after writing it (posix_fadvise DONTNEED), so later reads come from the disk
    rather than the page cache (reads themselves refill it; see `Mover(drop_cache=...)`). The temporary directory
    is made by the first file: a policy with no disk share leaves nothing behind, even if the process dies."""

    def __init__(self, directory: str | Path | None = None, drop_cache: bool = False):
        self.owned = directory is None
        self._dir = None if directory is None else Path(directory)
        if self._dir is not None:
            self._dir.mkdir(parents=True, exist_ok=True)
        self.drop_cache = drop_cache
        self._n = 0
        self._lock = threading.Lock()
        self.files: list[Path] = []
        self.bytes = 0

    @property
    def dir(self) -> Path:
        """The directory (the temporary one made now if it was not yet)."""
        with self._lock:
            if self._dir is None:
                self._dir = Path(tempfile.mkdtemp(prefix="reldl-offload-"))
            return self._dir

    def alloc_many(self, specs: Sequence[tuple[tuple[int, ...], torch.dtype]], tag: str = "t") -> list[torch.Tensor]:
        directory = self.dir
        with self._lock:
            self._n += 1
            path = directory / f"{tag}-{self._n:06d}.bin"
        size = _total(specs)
        mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=(size,))
        self.files.append(path)
        self.bytes += size
        return _carve(torch.from_numpy(mm), specs)

    def put(self, t: torch.Tensor, tag: str = "w") -> torch.Tensor:
        """A disk copy of `t` (any device), memory-mapped back."""
        (out,) = self.alloc_many([(tuple(t.shape), t.dtype)], tag)
        out.copy_(t)
        if self.drop_cache:
            path = self.files[-1]
            fd = os.open(path, os.O_RDWR)
            try:
                os.fsync(fd)
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return out

    def close(self) -> None:
        if self.owned and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


PIN_METHODS = ("register", "alloc")


def _driver_host_buffer(size: int, device: torch.device) -> torch.Tensor:
    """A page-locked host buffer of exactly `size` bytes from the CUDA driver (cuMemHostAlloc), as a uint8 tensor.
    It is freed (cuMemFreeHost, after a device sync: no copy may still use it) once no tensor refers to it."""
    import ctypes
    import weakref

    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuMemHostAlloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]
    lib.cuMemFreeHost.argtypes = [ctypes.c_void_p]
    torch.cuda.synchronize(device)  # CUDA initialized, the primary context current on this thread
    ptr = ctypes.c_void_p()
    err = lib.cuMemHostAlloc(ctypes.byref(ptr), ctypes.c_size_t(size), ctypes.c_uint(0))
    if err != 0 or not ptr.value:
        raise MemoryError(f"cuMemHostAlloc of {size} bytes failed (CUresult {err})")
    raw = (ctypes.c_uint8 * size).from_address(ptr.value)

    def free(address=ptr.value):
        try:
            torch.cuda.synchronize(device)
            lib.cuMemFreeHost(ctypes.c_void_p(address))
        except Exception:  # interpreter shutdown: the process exit releases it
            pass

    weakref.finalize(raw, free)  # the tensor (and every view of it) keeps `raw` alive
    return torch.frombuffer(raw, dtype=torch.uint8)


class Arena:
    """Allocation on a tier: "gpu" -> device tensors; "cpu" -> views of one host buffer (pinned when the device is
    CUDA; see `_host`); "disk" -> views of one memory-mapped file of `disk`. `slab`: reusable buffers (module
    docstring). `pin`: how large pinned buffers are made on CUDA, "register" (cudaHostRegister of prefaulted memory)
    or "alloc" (the driver's cuMemHostAlloc, freed when no tensor refers to it)."""

    CHUNK = 1 << 30
    LARGE = 256 << 20  # pinned buffers of at least this many bytes: registered (or cuMemHostAlloc'd), not cached

    def __init__(self, device: torch.device, disk: DiskPool, pin: str = "register"):
        if pin not in PIN_METHODS:
            raise ValueError(f"Arena: pin must be one of {', '.join(PIN_METHODS)}, got {pin!r}")
        self.device, self.disk = device, disk
        self.pin = device.type == "cuda"
        self.pin_method = pin
        self.bytes = {t: 0 for t in TIERS}
        self._registered: list[torch.Tensor] = []
        self._slabs: dict[tuple[str, str], torch.Tensor] = {}
        self._chunk: torch.Tensor | None = None  # registered host chunk small buffers are carved from
        self._chunk_off = 0
        self.pin_s = 0.0  # seconds spent making pinned host buffers

    def slab(self, tier: str, specs: Sequence[tuple[tuple[int, ...], torch.dtype]], key: str) -> list[torch.Tensor]:
        """Tensors of `specs` on `tier`, carved out of the buffer kept under (tier, key): it is reused when large
        enough, else replaced by a larger one (the old one released once no carved tensor refers to it). The caller
        must be done with the tensors of the previous request of the same key (the executor: the block is over)."""
        if not specs:
            return []
        size = _total(specs)
        buf = self._slabs.get((tier, key))
        if buf is None or buf.numel() < size:
            if buf is not None:
                self._release(buf)
                del self._slabs[(tier, key)]
                buf = None
            self.bytes[tier] += size
            if tier == "gpu":
                buf = torch.empty(size, dtype=torch.uint8, device=self.device)
            elif tier == "cpu":
                buf = self._host(size)
            elif tier == "disk":
                (buf,) = self.disk.alloc_many([((size,), torch.uint8)], key)
            else:
                raise ValueError(f"unknown tier {tier!r}")
            self._slabs[(tier, key)] = buf
        return _carve(buf, specs)

    def _release(self, buf: torch.Tensor) -> None:
        for i, r in enumerate(self._registered):
            if r is buf:
                torch.cuda.synchronize(self.device)  # no copy may still read or write it
                torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
                del self._registered[i]
                return

    def alloc(self, tier: str, specs: Sequence[tuple[tuple[int, ...], torch.dtype]], tag: str = "t"):
        if not specs:
            return []
        if tier == "gpu":
            out = [torch.empty(s, dtype=d, device=self.device) for s, d in specs]
            self.bytes["gpu"] += sum(nbytes(t) for t in out)
            return out
        if tier == "cpu":
            size = _total(specs)
            self.bytes["cpu"] += size
            return _carve(self._host(size), specs)
        if tier == "disk":
            self.bytes["disk"] += _total(specs)
            return self.disk.alloc_many(specs, tag)
        raise ValueError(f"unknown tier {tier!r}")

    def _host(self, size: int) -> torch.Tensor:
        """A host buffer, pinned on CUDA. Large ones are registered with cudaHostRegister rather than taken from
        torch's caching host allocator, which rounds every request up to a power of two (40 GiB -> 64 GiB); mid-sized
        ones (1 MiB to CHUNK / 4) are carved out of registered CHUNK-sized buffers (OPT-30B's 103 MB matrices would
        take 128 MB each from the caching allocator)."""
        if not self.pin:
            return torch.empty(size, dtype=torch.uint8)
        if (1 << 20) <= size < self.CHUNK // 4:
            if self._chunk is None or self._chunk_off + size > self._chunk.numel():
                self._chunk, self._chunk_off = self._pinned(self.CHUNK), 0
            out = self._chunk[self._chunk_off : self._chunk_off + size]
            self._chunk_off += -(-size // ALIGN) * ALIGN
            return out
        return self._pinned(size)

    def _pinned(self, size: int) -> torch.Tensor:
        t = time.perf_counter()
        try:
            if size >= self.LARGE and self.pin_method == "alloc":
                return _driver_host_buffer(size, self.device)
            if size >= self.LARGE:
                buf = torch.empty(size, dtype=torch.uint8)
                prefault(buf)
                err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), size, 0)
                if int(err) == 0:
                    self._registered.append(buf)
                    return buf
            return torch.empty(size, dtype=torch.uint8, pin_memory=True)
        finally:
            self.pin_s += time.perf_counter() - t

    def close(self) -> None:
        for buf in self._registered:
            torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
        self._registered = []

        self._slabs = {}
        self._chunk = None

    def put(self, tier: str, t: torch.Tensor, tag: str = "w") -> torch.Tensor:
        """A copy of `t` on `tier` (always a copy, even where `t` already lives there)."""
        if tier == "disk":
            self.bytes["disk"] += nbytes(t)
            return self.disk.put(t, tag)
        (out,) = self.alloc(tier, [(tuple(t.shape), t.dtype)], tag)
        out.copy_(t)
        return out


# --------------------------------------------------------------------------------------------------- mover


class _Done:
    """A finished future (the CPU path runs every job inline)."""

    __slots__ = ("value",)

    def __init__(self, value=None):
        self.value = value

    def result(self):
        return self.value


class Mover:
    """Host <-> device copies; see the module docstring for the stream and event ordering.

    `threads`: run jobs on worker threads (the engine asks for them where a copy blocks the host, a disk share;
    CPU tests, to exercise that path), else inline. `profile=True`: run every job inline and synchronise the device
    after it, accumulating the seconds in `transfer_s` (no overlap: for the transfer / compute breakdown) and
    appending (the counter that moved most, bytes, seconds) per job to `jobs` (rates by copy size: `job_rates`).
    Byte counters: `bytes["h2d"]`, `bytes["d2h"]`, `bytes["disk_read"]`, `bytes["disk_write"]` (a copy from or to a
    non-pinned host tensor on CUDA, or from / to a disk-tier tensor on CPU, counts as disk traffic); `copies`: the
    number of counted transfers per key (a tensor pair each; a 4-bit tensor's three parts count as one), for
    fitting a per-transfer latency beside the bytes; the CPU-attention path's q / output transfers are not counted."""

    def __init__(self, device: torch.device, threads: bool = False, profile: bool = False, side_stream: bool = False):
        self.device = device
        self.cuda = device.type == "cuda"
        self.profile = profile
        self.threads = threads
        self.h2d = torch.cuda.Stream(device) if self.cuda else None
        self.d2h = torch.cuda.Stream(device) if self.cuda else None
        self._loads = ThreadPoolExecutor(1, thread_name_prefix="reldl-load") if self.threads else None
        # `load(side=True)` goes to a second stream (and worker) while side_stream is set, else to the main one;
        # both exist from the start, so the choice can change between runs (a same-process A/B)
        self.side_stream = side_stream
        self._side = torch.cuda.Stream(device) if self.cuda else None
        self._side_pool = ThreadPoolExecutor(1, thread_name_prefix="reldl-load-side") if self.threads else None
        self._stores = ThreadPoolExecutor(1, thread_name_prefix="reldl-store") if self.threads else None
        self.bytes = {"h2d": 0, "d2h": 0, "disk_read": 0, "disk_write": 0}
        self.copies = dict.fromkeys(self.bytes, 0)
        self.transfer_s = 0.0
        self.jobs: list[tuple[str, int, float]] = []  # profile mode: (main counter, bytes, seconds) per job
        # timeline mode (a list, else None): (stream, bytes, host issue time, start, end) per job; start / end are
        # CUDA events (recorded after the job's waits and after its copies) on CUDA, host times on the CPU
        self.timeline: list[tuple] | None = None
        self._lock = threading.Lock()

    @property
    def h2d_side(self):
        """The stream side loads use now."""
        return self._side if self.side_stream else self.h2d

    @property
    def _side_loads(self):
        return self._side_pool if self.side_stream else self._loads

    def _count(self, key: str, n: int) -> None:
        with self._lock:
            self.bytes[key] += n
            self.copies[key] += 1

    def _event(self):
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def compute_event(self):
        """An event after the compute issued so far (None on the CPU), for `load(ready=...)`."""
        return self._event()

    def _mark(self, stream):
        """Timeline mode: an event recorded on `stream` now (on CUDA), else the host time."""
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(stream)
        return ev

    def _log(self, stream: str, pairs, host: float, start, end) -> None:
        if self.timeline is not None:
            self.timeline.append((stream, sum(nbytes(src) for _, src, _ in pairs), host, start, end))

    def _now(self) -> float:
        return time.perf_counter() if self.timeline is not None else 0.0

    def _run(self, pool, job):
        if self.profile:
            before = dict(self.bytes)
            t = time.perf_counter()
            out = job()
            if self.cuda:
                torch.cuda.synchronize(self.device)
            secs = time.perf_counter() - t
            self.transfer_s += secs
            moved = {k: v - before[k] for k, v in self.bytes.items() if v != before[k]}
            self.jobs.append((max(moved, key=moved.get) if moved else "none", sum(moved.values()), secs))
            return _Done(out)
        if pool is None:
            return _Done(job())

        def threaded():  # inference mode is thread-local: the caller's tensors are inference tensors
            with torch.inference_mode():
                return job()

        return pool.submit(threaded)

    def load(
        self,
        pairs: list[tuple[torch.Tensor, torch.Tensor, bool]],
        after: Sequence = (),
        side: bool = False,
        ready=None,
    ) -> Future | _Done:
        """Copy each (device dst, host src, src_on_disk) pair; `after`: store futures this load must follow.
        `side`: on the side stream (the KV cache and hidden states; the same stream as weights unless the Mover
        was made with side_stream), so such loads need not wait behind the next unit's weights. `ready`: the
        compute-stream event the copies wait for (`compute_event`, recorded earlier), else one recorded now: the
        compute issued so far (which may still read the memory the copies overwrite)."""
        ready = ready if ready is not None else self._event()
        stream = self.h2d_side if side else self.h2d
        name = "h2d_side" if side and self.side_stream else "h2d"
        after = [a for a in after if a is not None]

        def job():
            host = self._now()
            for a in after:
                ev = a.result()
                if ev is not None:
                    stream.wait_event(ev)
            if not self.cuda:
                start = self._now()
                for dst, src, disk in pairs:
                    dst.copy_(src)
                    self._count("disk_read" if disk else "h2d", nbytes(src))
                self._log(name, pairs, host, start, self._now())
                return None
            with torch.cuda.stream(stream):
                stream.wait_event(ready)
                start = self._mark(stream) if self.timeline is not None else None
                for dst, src, _disk in pairs:
                    if not src.is_pinned():
                        staged = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
                        staged.copy_(src)  # disk (or pageable memory) -> pinned: the only host-side copy
                        self._count("disk_read", nbytes(src))
                        src = staged
                    dst.copy_(src, non_blocking=True)
                    self._count("h2d", nbytes(src))
                done = torch.cuda.Event(enable_timing=self.timeline is not None)
                done.record(stream)
            self._log(name, pairs, host, start, done)
            return done

        return self._run(self._side_loads if side else self._loads, job)

    def store(self, pairs: list[tuple[torch.Tensor, torch.Tensor, bool]]) -> Future | _Done:
        """Copy each (host dst, device src, dst_on_disk) pair once the compute stream has produced src."""
        ready = self._event()

        def job():
            host = self._now()
            if not self.cuda:
                for dst, src, disk in pairs:
                    dst.copy_(src)
                    self._count("disk_write" if disk else "d2h", nbytes(src))
                self._log("d2h", pairs, host, host, self._now())
                return None
            later = []
            with torch.cuda.stream(self.d2h):
                self.d2h.wait_event(ready)
                start = self._mark(self.d2h) if self.timeline is not None else None
                for dst, src, _disk in pairs:
                    if dst.is_pinned():
                        dst.copy_(src, non_blocking=True)
                    else:
                        staged = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
                        staged.copy_(src, non_blocking=True)
                        later.append((dst, staged))
                    src.record_stream(self.d2h)
                    self._count("d2h", nbytes(src))
                done = torch.cuda.Event(enable_timing=self.timeline is not None)
                done.record(self.d2h)
            self._log("d2h", pairs, host, start, done)
            if later:
                done.synchronize()
                for dst, staged in later:
                    dst.copy_(staged)
                    self._count("disk_write", nbytes(staged))
            return done

        return self._run(self._stores, job)

    def wait(self, ticket) -> None:
        """Make the compute stream wait for a load (or store)."""
        if ticket is None:
            return
        ev = ticket.result()
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)

    def sync_host(self, ticket) -> None:
        """Block the host until a load / store is complete (for host-side readers of stored data)."""
        if ticket is None:
            return
        ev = ticket.result()
        if ev is not None:
            ev.synchronize()

    def close(self) -> None:
        for p in (self._loads, self._side_pool, self._stores):
            if p is not None:
                p.shutdown(wait=True)


JOB_SIZE_BUCKETS = (64 << 10, 1 << 20, 16 << 20, 256 << 20)


def job_rates(jobs: Sequence[tuple[str, int, float]], steps: int = 1) -> list[dict]:
    """Profile-mode jobs grouped by counter and size (below 64 KiB, 1 MiB, 16 MiB, 256 MiB, and above): jobs, GB
    and seconds per step, and GB/s. Why: a step's serialised transfer time can be short of its bytes over the
    measured bandwidth for small copies (per-copy latency) or for the memory they come from; this says which."""
    groups: dict[tuple[str, int], list[float]] = {}
    for key, n, secs in jobs:
        bucket = sum(n >= b for b in JOB_SIZE_BUCKETS)
        g = groups.setdefault((key, bucket), [0, 0, 0.0])
        g[0], g[1], g[2] = g[0] + 1, g[1] + n, g[2] + secs
    out = []
    for (key, bucket), (count, n, secs) in sorted(groups.items()):
        lo = JOB_SIZE_BUCKETS[bucket - 1] if bucket else 0
        out.append(
            dict(
                counter=key,
                min_bytes=lo,
                jobs_per_step=count / steps,
                gb_per_step=n / 1e9 / steps,
                s_per_step=secs / steps,
                gb_per_s=n / 1e9 / secs if secs > 0 else 0.0,
            )
        )
    return out
