"""Adam on the CPU over fp32 master weights, fed gradient by gradient from the backward pass.

Each trainable tensor has an fp32 master and two Adam moments, in CPU memory ('cpu') or in memory-mapped files
('disk': the page cache holds what fits, the rest lives in the files). Each is updated by its own
`torch.optim.Adam` (single-tensor CPU path: exactly the arithmetic of one `torch.optim.Adam` over all parameters)
as soon as its gradient is complete: with `overlap`, on a worker thread while the GPU (or the main thread) goes on
with the backward pass; without, inline. A tensor used twice in the forward pass (tied embeddings) receives its
gradient in parts, summed on the CPU before its update. `on_update(name, master)` runs after each update (the
trainer refreshes the working copy from it).
"""

from __future__ import annotations

import queue
import threading
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
            opt = torch.optim.Adam([m], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
            opt.state[m] = {"step": torch.tensor(0.0), "exp_avg": ea, "exp_avg_sq": eq}
            self.master[name] = m
            self.opt[name] = opt
        self._pending: dict[str, tuple[torch.Tensor, int]] = {}
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.updates = 0

    # ------------------------------------------------------------------ gradients in
    def submit(self, name: str, grad: torch.Tensor, ready=None) -> None:
        """A (part of a) gradient for `name`, in CPU memory once `ready` (a CUDA event, or None) has completed."""
        if not self.overlap:
            self._apply(name, grad, ready)
            return
        if self._thread is None:
            cuda = self.device is not None and self.device.type == "cuda"
            # the worker's CUDA device, resolved here: torch.cuda.set_device needs an index ("cuda" alone fails)
            index = (
                (self.device.index if self.device.index is not None else torch.cuda.current_device()) if cuda else None
            )
            self._thread = threading.Thread(target=self._work, args=(index,), name="reldl-cpu-adam", daemon=True)
            self._thread.start()
        self._queue.put((name, grad, ready))

    def _work(self, cuda_index: int | None) -> None:
        try:
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
                    self._apply(*item)
            except BaseException as e:  # reported by wait()
                self._error = e
            finally:
                self._queue.task_done()

    def _apply(self, name: str, grad: torch.Tensor, ready) -> None:
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
