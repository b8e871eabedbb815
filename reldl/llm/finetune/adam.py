"""Adam on the CPU over fp32 master weights, fed gradient by gradient from the backward pass.

Each trainable tensor has an fp32 master and two Adam moments, in CPU memory ('cpu') or in memory-mapped files
('disk': the page cache holds what fits, the rest lives in the files). Each is updated by its own
`torch.optim.Adam(fused=True)` (the fused CPU kernel: one multi-threaded, vectorized pass over parameter, gradient
and moments, instead of the single-tensor path's seven passes; the same update as one `torch.optim.Adam` over all
parameters, to rounding) as soon as its gradient is complete: with `overlap`, on a worker thread (as many intra-op
threads as the caller's) while the GPU (or the main thread) goes on with the backward pass; without, inline. A
tensor used twice in the forward pass (tied embeddings) receives its gradient in parts, summed on the CPU before its
update. `on_update(name, master)` runs after each update (the trainer refreshes the working copy from it).
`submit(..., release=f)`: f() runs once the gradient's memory is no longer read (the trainer reuses it:
`PinnedRing`).
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def _mapped(path: Path, shape: tuple[int, ...]) -> torch.Tensor:
    mm = np.lib.format.open_memmap(str(path), mode="w+", dtype=np.float32, shape=tuple(shape))
    return torch.from_numpy(mm)


class OffloadedAdam:
    def __init__(
        self,
        params: dict[str, torch.Tensor],
        parts: dict[str, int],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        placement: str = "cpu",
        directory: Path | None = None,
        overlap: bool = True,
        on_update: Callable[[str, torch.Tensor], None] | None = None,
        device: torch.device | None = None,
    ):
        if placement not in ("cpu", "disk"):
            raise ValueError(f"optimizer_placement must be 'cpu' or 'disk', got {placement!r}")
        if placement == "disk" and directory is None:
            raise ValueError("optimizer_placement 'disk' needs a directory")
        self.parts = parts
        self.on_update = on_update
        self.overlap = overlap
        self.device = device
        self.master: dict[str, torch.Tensor] = {}
        self.opt: dict[str, torch.optim.Adam] = {}
        if placement == "disk":
            Path(directory).mkdir(parents=True, exist_ok=True)
        for i, (name, value) in enumerate(params.items()):
            if placement == "disk":
                m = _mapped(Path(directory) / f"{i}.master.npy", value.shape)
                m.copy_(value)
                ea = _mapped(Path(directory) / f"{i}.exp_avg.npy", value.shape)
                eq = _mapped(Path(directory) / f"{i}.exp_avg_sq.npy", value.shape)
            else:
                m = value.detach().to(torch.float32).contiguous()  # no copy of an fp32 tensor: the caller hands it over
                ea, eq = torch.zeros_like(m), torch.zeros_like(m)
            opt = torch.optim.Adam([m], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
            opt.state[m] = {"step": torch.tensor(0.0), "exp_avg": ea, "exp_avg_sq": eq}
            self.master[name] = m
            self.opt[name] = opt
        self._pending: dict[str, tuple[torch.Tensor, int]] = {}
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._threads = torch.get_num_threads()  # the worker's intra-op threads (its OpenMP team is its own)
        self.updates = 0
        self.busy_s = 0.0  # seconds spent applying updates (worker or inline)

    # ------------------------------------------------------------------ gradients in
    def submit(self, name: str, grad: torch.Tensor, ready=None, release: Callable[[], None] | None = None) -> None:
        """A (part of a) gradient for `name`, in CPU memory once `ready` (a CUDA event, or None) has completed;
        `release()` runs once its memory is no longer read (also after an error)."""
        if not self.overlap:
            try:
                self._apply(name, grad, ready)
            finally:
                if release is not None:
                    release()
            return
        if self._thread is None:
            cuda = self.device is not None and self.device.type == "cuda"
            # the worker's CUDA device, resolved here: torch.cuda.set_device needs an index ("cuda" alone fails)
            index = (
                (self.device.index if self.device.index is not None else torch.cuda.current_device()) if cuda else None
            )
            self._thread = threading.Thread(target=self._work, args=(index,), name="reldl-cpu-adam", daemon=True)
            self._thread.start()
        self._queue.put((name, grad, ready, release))

    def _work(self, cuda_index: int | None) -> None:
        try:
            torch.set_num_threads(self._threads)
            if cuda_index is not None:
                torch.cuda.set_device(cuda_index)
        except BaseException as e:  # reported by wait(); the loop below still drains the queue, so wait() returns
            self._error = e
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    self._apply(*item[:3])
            except BaseException as e:  # reported by wait()
                self._error = e
            finally:
                if item is not None and item[3] is not None:
                    try:
                        item[3]()
                    except BaseException as e:  # pragma: no cover - a release callback failing
                        self._error = self._error or e
                self._queue.task_done()

    def _apply(self, name: str, grad: torch.Tensor, ready) -> None:
        t0 = time.perf_counter()
        try:
            self._update(name, grad, ready)
        finally:
            self.busy_s += time.perf_counter() - t0

    def _update(self, name: str, grad: torch.Tensor, ready) -> None:
        if ready is not None:
            ready.synchronize()
        g = grad if grad.dtype == torch.float32 else grad.float()
        need = self.parts.get(name, 1)
        if need > 1:
            acc, seen = self._pending.pop(name, (None, 0))
            g = g.clone() if acc is None else acc.add_(g)
            if seen + 1 < need:
                self._pending[name] = (g, seen + 1)
                return
        m = self.master[name]
        m.grad = g
        with torch.no_grad():
            self.opt[name].step()
        m.grad = None
        self.updates += 1
        if self.on_update is not None:
            self.on_update(name, m)

    def wait(self) -> None:
        """Block until every submitted gradient has been applied; re-raise a worker's error."""
        if self._thread is not None:
            self._queue.join()
        if self._error is not None:
            err, self._error = self._error, None
            self._pending.clear()
            raise err
        if self._pending:
            missing = ", ".join(sorted(self._pending))
            self._pending.clear()
            raise RuntimeError(f"fine-tuning: gradient parts missing for {missing}")

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        tensors, steps = {}, {}
        for name, m in self.master.items():
            st = self.opt[name].state[m]
            tensors[f"{name}::master"] = m
            tensors[f"{name}::exp_avg"] = st["exp_avg"]
            tensors[f"{name}::exp_avg_sq"] = st["exp_avg_sq"]
            steps[name] = float(st["step"])
        return tensors, steps

    def load_state(self, tensors: dict[str, torch.Tensor], steps: dict[str, float]) -> None:
        with torch.no_grad():
            for name, m in self.master.items():
                st = self.opt[name].state[m]
                m.copy_(tensors[f"{name}::master"])
                st["exp_avg"].copy_(tensors[f"{name}::exp_avg"])
                st["exp_avg_sq"].copy_(tensors[f"{name}::exp_avg_sq"])
                st["step"] = torch.tensor(float(steps[name]))


class PinnedRing:
    """A FIFO ring allocator over one host buffer (pinned by the caller): `take(nbytes)` returns a byte view and a
    token, blocking while the ring is full; `release(token)` frees the oldest live allocation (allocations are
    released in the order they were taken: the Adam worker consumes gradients first in, first out). Bounds the pinned
    memory that gradients in flight to the CPU Adam occupy (torch's caching host allocator would round each to a power
    of two and keep one per tensor)."""

    ALIGN = 256

    def __init__(self, buf: torch.Tensor):
        self.buf = buf.view(torch.uint8).view(-1)
        self.size = self.buf.numel()
        self.live: collections.deque[tuple[int, int]] = collections.deque()
        self.cv = threading.Condition()
        self.waits = 0  # takes that had to wait for a release (Adam behind the backward)

    def _fit(self, n: int) -> int | None:
        if not self.live:
            return 0
        s0 = self.live[0][0]
        e = self.live[-1][0] + self.live[-1][1]
        if e > s0:  # occupied [s0, e): free [e, size) and [0, s0)
            if self.size - e >= n:
                return e
            return 0 if s0 >= n else None
        return e if s0 - e >= n else None  # wrapped: free [e, s0)

    def take(self, nbytes: int) -> tuple[torch.Tensor, tuple[int, int]]:
        n = -(-int(nbytes) // self.ALIGN) * self.ALIGN
        if n > self.size:
            raise ValueError(f"PinnedRing: {nbytes} bytes requested, the ring holds {self.size}")
        with self.cv:
            start = self._fit(n)
            if start is None:
                self.waits += 1
                while start is None:
                    self.cv.wait()
                    start = self._fit(n)
            token = (start, n)
            self.live.append(token)
        return self.buf[start : start + int(nbytes)], token

    def release(self, token: tuple[int, int]) -> None:
        with self.cv:
            if not self.live or self.live[0] != token:
                raise RuntimeError("PinnedRing: allocations must be released in the order they were taken")
            self.live.popleft()
            self.cv.notify_all()
