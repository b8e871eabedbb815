"""The fine-tuning loop: layer-by-layer forward and recomputing backward, offloaded Adam, checkpoints, export.

One training step over a batch (units are the embedding, each decoder layer and the head, as in
`reldl/llm/offload/layers.py`, whose family math this runs):

1. forward without autograd, unit by unit; each decoder layer's input is kept (activation checkpoint) on the GPU
   or, when the budget says so, copied to pinned CPU memory on a side stream;
2. the head with autograd gives the loss (cross-entropy on completion tokens) and the gradient of the last hidden
   state; then for each layer from the last: its input back, its weights as fresh leaves, the layer recomputed with
   autograd and backpropagated from the gradient of its output. A post-accumulate-grad hook on every trainable
   leaf copies the gradient to pinned CPU memory on a side stream (after an event on the compute stream) and hands
   it to `OffloadedAdam`, whose CPU thread updates that tensor's fp32 master while the GPU goes on with the
   backward of the layers below;
3. the embedding's backward; then the step waits for the last updates, whose new working copies (bf16/fp16 on the
   GPU) were already sent by the worker right after each update.

Working weights: on CUDA each unit is resident (kept on the GPU between steps) or streamed (copied from pinned
host memory before each use, the next unit prefetched on a copy stream while the current one computes), chosen by
`weight_placement` and the `gpu_memory` budget. On the CPU the "device" is the CPU and the same code runs with
in-place copies (fp32 working copies beside the fp32 masters).

LoRA: adapters A [r, in] and B [out, r] on the chosen linears of every layer (A seeded Kaiming-uniform, B zero, as
peft), scale alpha / r; the layer runs with W + scale * B @ A (one weight-sized temporary for the layer being
computed) and only the adapters are trainable. Export merges them into a plain checkpoint.

Checkpoints (`state_dir`): at the end of every epoch and every `checkpoint_steps` steps, the masters, Adam moments
and steps, the data position and the loss log go to `ckpt-<step>/` (written under a temporary name, renamed), then
`latest.json` is replaced atomically and older checkpoints deleted. A trainer over the same state directory resumes
from it; the data order depends only on (seed, epoch), so the resumed run's weights are bit-identical to an
uninterrupted run's.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from reldl.llm.finetune import data
from reldl.llm.finetune.adam import OffloadedAdam, PinnedRing
from reldl.llm.loader import TensorReader, inspect_checkpoint
from reldl.llm.offload import layers
from reldl.llm.offload.tiers import Arena

LORA_TARGETS = {"llama": ("q", "k", "v", "o", "gate", "up", "down"), "opt": ("q", "k", "v", "o", "fc1", "fc2")}
FAULT_AFTER_STEP: int | None = None  # tests: raise SimulatedKill once this many steps ran (global step count)


class SimulatedKill(RuntimeError):
    pass


@dataclass
class Settings:
    method: str = "full"  # 'full' | 'lora'
    epochs: int = 1
    learning_rate: float = 1e-4
    batch_size: int = 8
    max_length: int = 512
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q", "v")
    seed: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    # placement and scheduling: they never change the arithmetic, so they are not part of the fingerprint
    optimizer_placement: str = "cpu"  # 'cpu' | 'disk'
    weight_placement: str = "auto"  # 'auto' | 'gpu' | 'stream'
    activation_placement: str = "auto"  # 'auto' | 'gpu' | 'cpu'
    gpu_memory: float | None = None  # bytes the trainer may use on the GPU (None: the device's free memory)
    checkpoint_steps: int = 0
    overlap: bool = True
    # rows of the batch per forward/backward pass (0: the whole batch). Each unit's weights are loaded once per pass
    # over all micro-batches and its gradient (accumulated over them, float32 on CUDA) shipped once per step, so a
    # large batch (many tokens per optimizer step) costs one CPU Adam pass. Changes the summation order: part of the
    # fingerprint when set.
    micro_batch: int = 0
    extra: dict = field(default_factory=dict)

    def math(self) -> dict:
        d = asdict(self)
        for k in ("optimizer_placement", "weight_placement", "activation_placement", "gpu_memory", "checkpoint_steps"):
            d.pop(k)
        d.pop("overlap")
        d.pop("extra")
        if not self.micro_batch or self.micro_batch >= self.batch_size:
            d.pop("micro_batch")
        if self.method != "lora":
            for k in ("lora_rank", "lora_alpha", "lora_targets"):
                d.pop(k)
        d["lora_targets"] = list(d.get("lora_targets", []))
        d["betas"] = list(self.betas)
        return d


@dataclass
class Report:
    steps: int = 0
    epochs: int = 0
    examples: int = 0
    tokens: int = 0  # tokens processed (prompt + completion, padding excluded)
    target_tokens: int = 0  # completion tokens in the loss
    first_loss: float | None = None
    final_loss: float | None = None
    epoch_losses: list = field(default_factory=list)
    seconds: float = 0.0
    resumed_from_step: int = 0
    resident_units: int = 0
    streamed_units: int = 0
    activations: str = "gpu"
    log: list = field(default_factory=list)  # (epoch, step, loss, seconds)


class Trainer:
    def __init__(
        self,
        path: str | Path,
        settings: Settings,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        state_dir: str | Path | None = None,
        fingerprint: str = "",
        *,
        config=None,
        weights: dict[str, torch.Tensor] | None = None,
    ):
        """`path`: a checkpoint directory; or `config` (a ModelConfig) and `weights` (Hugging Face name -> fp32
        tensor, taken over: full fine-tuning updates them in place) for models that exist only in memory
        (benchmarks)."""
        self.s = settings
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.dtype = dtype or (torch.bfloat16 if self.cuda else torch.float32)
        self.ckpt = inspect_checkpoint(path) if config is None else None
        cfg = self.cfg = self.ckpt.config if config is None else config
        self.units = layers.units(cfg)  # NotImplementedError for families / sliding windows it does not cover
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.fingerprint = fingerprint
        self.rope = None
        if cfg.family == "llama":
            from reldl.llm.rope import Rotary

            self.rope = Rotary(
                cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_positions, self.device, self.dtype
            )
        self.scale = cfg.head_dim**-0.5
        self.lora = settings.method == "lora"
        if settings.method not in ("full", "lora"):
            raise ValueError(f"finetune must be 'full' or 'lora', got {settings.method!r}")
        if self.lora:
            allowed = LORA_TARGETS[cfg.family]
            bad = [t for t in settings.lora_targets if t not in allowed]
            if bad or not settings.lora_targets:
                raise ValueError(f"lora_targets {list(settings.lora_targets)} for {cfg.family}: choose from {allowed}")
        self.lora_scale = settings.lora_alpha / settings.lora_rank if self.lora else 0.0

        names = list(dict.fromkeys(hf for _, ws in self.units for _, hf in ws))
        if weights is None:
            reader = TensorReader(self.ckpt, torch.float32)
            base = {hf: reader(hf) for hf in names}
        else:
            base = {hf: weights[hf] for hf in names}
        self.names = names
        # trainable tensors and how many units contribute to each one's gradient
        if self.lora:
            g = torch.Generator().manual_seed(int(settings.seed))
            trainable: dict[str, torch.Tensor] = {}
            self.adapters: dict[int, dict[str, tuple[str, str]]] = {}
            for u, (uname, ws) in enumerate(self.units):
                if not uname.startswith("layer"):
                    continue
                for key, hf in ws:
                    if key not in settings.lora_targets:
                        continue
                    out_f, in_f = base[hf].shape
                    a = torch.empty(settings.lora_rank, in_f)
                    bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and peft
                    a.uniform_(-bound, bound, generator=g)
                    trainable[hf + ".lora_A"] = a
                    trainable[hf + ".lora_B"] = torch.zeros(out_f, settings.lora_rank)
                    self.adapters.setdefault(u, {})[key] = (hf + ".lora_A", hf + ".lora_B")
            parts = {n: 1 for n in trainable}
            self.base = base  # fp32 frozen weights (export merges into them)
        else:
            trainable = base
            parts = dict(Counter(hf for _, ws in self.units for _, hf in ws))
            self.adapters = {}
            self.base = None
        # host copies in the working dtype (pinned on CUDA): frozen weights and the working copy of trainables
        # one host buffer (pinned via cudaHostRegister on CUDA: no power-of-two rounding) carved per tensor
        host_src = list(base.items()) + (list(trainable.items()) if self.lora else [])
        # (separate tensors on the CPU, where they are the working copies: views of one buffer share its autograd
        # version counter, so updating one tensor would invalidate another's saved copy mid-backward)
        self.arena = Arena(self.device, None)
        if self.cuda:
            carved = self.arena.alloc("cpu", [(tuple(t.shape), self.dtype) for _, t in host_src], "finetune")
        else:
            carved = [torch.empty(t.shape, dtype=self.dtype) for _, t in host_src]
        self.host: dict[str, torch.Tensor] = {}
        for (name, t), h in zip(host_src, carved):
            h.copy_(t)
            self.host[name] = h
        opt_dir = None
        if settings.optimizer_placement == "disk":
            root = self.state_dir or Path(os.environ.get("TMPDIR", "/tmp")) / f"reldl-finetune-{uuid.uuid4().hex[:8]}"
            opt_dir = root / "optimizer"
        self.adam = OffloadedAdam(
            trainable,
            parts,
            lr=settings.learning_rate,
            betas=tuple(settings.betas),
            eps=settings.eps,
            weight_decay=settings.weight_decay,
            placement=settings.optimizer_placement,
            directory=opt_dir,
            overlap=settings.overlap,
            on_update=self._updated,
            device=self.device,
        )
        del trainable
        if not self.lora:
            base.clear()  # the masters are the fp32 copies now
        self.trainable = set(self.adam.master)
        if self.cuda:
            self.compute = torch.cuda.current_stream(self.device)
            self.load_stream = torch.cuda.Stream(self.device)
            self.d2h_stream = torch.cuda.Stream(self.device)
            self.h2d_stream = torch.cuda.Stream(self.device)
        self._last = True  # the backward pass of the last micro-batch: gradient hooks ship what accumulated
        self._acc: dict[str, torch.Tensor] = {}  # CUDA: float32 gradient sums over the micro-batches so far
        self._plan_placement()
        self._pending: dict[int, tuple[dict, object]] = {}
        self.ring = None
        if self.cuda:  # pinned float32 gradients in flight to the CPU Adam: about three layers' worth
            per_unit = [
                sum(self.adam.master[hf].numel() * 4 for _, hf in ws if hf in self.adam.master) for _, ws in self.units
            ]
            biggest = max((self.adam.master[n].numel() * 4 for n in self.adam.master), default=0)
            lora = sum(self.adam.master[n].numel() * 4 for n in self.adam.master if ".lora_" in n)
            size = max(3 * max(per_unit, default=0), 2 * biggest, lora, 1 << 20) + (1 << 20)
            (buf,) = self.arena.alloc("cpu", [((size,), torch.uint8)], "finetune-grads")
            self.ring = PinnedRing(buf)

    # ------------------------------------------------------------------ placement
    def _unit_bytes(self, u: int) -> int:
        return sum(self.host[hf].numel() * self.host[hf].element_size() for _, hf in self.units[u][1])

    def _plan_placement(self) -> None:
        """Which units stay on the GPU and where layer inputs go: resident units first by size order (head, embed,
        layers), within the budget left after two streamed layers, the activations' estimate and the adapters."""
        n = len(self.units)
        s = self.s
        if not self.cuda:
            self.resident = set(range(n))
            self.act_cpu = s.activation_placement == "cpu"
            self.work = self.host
            return
        budget = s.gpu_memory
        if budget is None:
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free
        tokens = s.batch_size * s.max_length
        mb_tokens = min(s.micro_batch or s.batch_size, s.batch_size) * s.max_length
        h = self.cfg.hidden_size
        esize = torch.tensor([], dtype=self.dtype).element_size()
        checkpoints = (self.cfg.num_layers + 1) * tokens * h * esize
        # working set of one layer's recompute + backward per micro-batch (about 16 hidden-sized and 4 MLP-sized
        # tensors per token), the head's fp32 logits and their gradient, the whole batch's hidden state and its
        # gradients (3 hidden-sized tensors per token), float32 gradient sums of two units
        layer_params = max((sum(self.host[hf].numel() for _, hf in self.units[u][1]) for u in range(n)), default=0)
        work_set = (
            mb_tokens * (16 * h + 4 * self.cfg.intermediate_size) * esize
            + 3 * mb_tokens * self.cfg.vocab_size * 4
            + 3 * tokens * h * esize
            + 2 * layer_params * 4
        )
        adapters = sum(self.host[a].numel() * esize for a in self.host if ".lora_" in a)
        layer_max = max(self._unit_bytes(u) for u in range(1, n - 1)) if n > 2 else 0
        if s.activation_placement == "cpu":
            self.act_cpu = True
        elif s.activation_placement == "gpu":
            self.act_cpu = False
        else:
            self.act_cpu = checkpoints > 0.25 * budget
        left = budget - work_set - adapters - (0 if self.act_cpu else checkpoints)
        if s.weight_placement == "gpu":
            resident = set(range(n))
        elif s.weight_placement == "stream":
            resident = set()
        else:
            resident = set()
            left -= 2 * layer_max  # room for streamed layers (current + prefetched)
            order = [n - 1, 0] + list(range(1, n - 1))
            for u in order:
                b = self._unit_bytes(u)
                if b <= left:
                    resident.add(u)
                    left -= b
            if len(resident) >= n - 1:  # everything but one unit fits: keep it too rather than streaming
                resident = set(range(n))
        self.resident = resident
        self.work: dict[str, torch.Tensor] = {}
        for u in sorted(resident):
            for _, hf in self.units[u][1]:
                if hf not in self.work:
                    self.work[hf] = self.host[hf].to(self.device, non_blocking=True)
        for a in self.host:
            if ".lora_" in a:
                self.work[a] = self.host[a].to(self.device, non_blocking=True)
        torch.cuda.synchronize(self.device)

    def _resident_name(self, hf: str) -> bool:
        return hf in self.work

    # ------------------------------------------------------------------ weights in
    def _prefetch(self, u: int) -> None:
        if not self.cuda or u in self.resident or u in self._pending or not 0 <= u < len(self.units):
            return
        dst = {hf: torch.empty(self.host[hf].shape, dtype=self.dtype, device=self.device) for _, hf in self.units[u][1]}
        alloc = torch.cuda.Event()
        alloc.record(self.compute)
        with torch.cuda.stream(self.load_stream):
            self.load_stream.wait_event(alloc)
            for hf, t in dst.items():
                t.copy_(self.host[hf], non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.load_stream)
        self._pending[u] = (dst, done)

    def _tensors(self, u: int) -> dict[str, torch.Tensor]:
        if u in self.resident:
            return {hf: self.work[hf] for _, hf in self.units[u][1]}
        self._prefetch(u)
        dst, done = self._pending.pop(u)
        self.compute.wait_event(done)
        return dst

    def _weights(self, u: int, grad: bool, next_u: int | None = None) -> dict[str, torch.Tensor]:
        """Unit u's weights by layers.py key; trainable ones as fresh leaves with gradient hooks when `grad`."""
        t = self._tensors(u)
        if next_u is not None:
            self._prefetch(next_u)
        w = {}
        for key, hf in self.units[u][1]:
            x = t[hf]
            if grad and hf in self.trainable:
                x = self._leaf(x, hf)
            w[key] = x
        for key, (a_name, b_name) in self.adapters.get(u, {}).items():
            a, b = self.work[a_name], self.work[b_name]
            if grad:
                a, b = self._leaf(a, a_name), self._leaf(b, b_name)
            w[key] = w[key] + self.lora_scale * (b @ a)
        return w

    def _leaf(self, x: torch.Tensor, name: str) -> torch.Tensor:
        leaf = x.detach().requires_grad_(True)
        leaf.register_post_accumulate_grad_hook(lambda p, name=name: self._ship(name, p))
        return leaf

    # ------------------------------------------------------------------ gradients out, weights back
    def _ship(self, name: str, p: torch.Tensor) -> None:
        """Gradient hook. Before the last micro-batch: keep the sum (CPU: autograd accumulates into p.grad; CUDA:
        a float32 sum, the leaves being 16-bit). At the last: hand the gradient to the CPU Adam (CUDA: float32, copied
        into the pinned ring on the d2h stream)."""
        if not self.cuda:
            if self._last:
                g, p.grad = p.grad, None
                self.adam.submit(name, g)
            return
        g, p.grad = p.grad, None
        acc = self._acc.pop(name, None)
        if acc is None:
            acc = g.float() if g.dtype != torch.float32 else g
        else:
            acc.add_(g)
        if not self._last:
            self._acc[name] = acc
            return
        view, token = self.ring.take(acc.numel() * 4)
        dst = view.view(torch.float32).view(acc.shape)
        buf, done = self._to_host(acc, dst)
        self.adam.submit(name, buf, done, release=lambda token=token: self.ring.release(token))

    def _to_host(self, x: torch.Tensor, dst: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Copy `x` into `dst` (pinned; default: a new pinned buffer) on the d2h stream once the compute stream's
        work so far is done; returns the buffer and an event recorded after the copy."""
        ready = torch.cuda.Event()
        ready.record(self.compute)
        buf = dst if dst is not None else torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        with torch.cuda.stream(self.d2h_stream):
            self.d2h_stream.wait_event(ready)
            buf.copy_(x, non_blocking=True)
            x.record_stream(self.d2h_stream)
            done = torch.cuda.Event()
            done.record(self.d2h_stream)
        return buf, done

    def _updated(self, name: str, master: torch.Tensor) -> None:
        """After Adam updated `name` (worker thread): refresh its host copy and, if resident, its GPU copy. The
        gradient's event was waited on, so the compute stream has finished every kernel that read the old copy."""
        self.host[name].copy_(master)
        if self.cuda and name in self.work:
            with torch.cuda.stream(self.h2d_stream):
                self.work[name].copy_(self.host[name], non_blocking=True)

    # ------------------------------------------------------------------ activations
    def _stash(self, x: torch.Tensor, dst: torch.Tensor | None = None):
        """A layer input kept for the backward: x itself, or (activations on the CPU) a copy in `dst` (pinned)."""
        if not (self.cuda and self.act_cpu):
            return x
        return self._to_host(x, dst)[0]

    def _unstash(self, s) -> torch.Tensor:
        if not (self.cuda and self.act_cpu):
            return s
        self.load_stream.wait_stream(self.d2h_stream)
        with torch.cuda.stream(self.load_stream):
            x = s.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.load_stream)
        self.compute.wait_event(done)
        x.record_stream(self.compute)
        return x

    # ------------------------------------------------------------------ one step
    def _attend(self, q, k, v):
        B, T, H, D = q.shape
        g = H // k.shape[2]
        if g > 1:
            k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.scale
        )
        return out.transpose(1, 2).reshape(B, T, H * D)

    def step(self, ids: torch.Tensor, targets: torch.Tensor) -> float:
        """One optimizer step over the batch, in micro-batches of `micro_batch` rows (all rows: one pass). Layer by
        layer, every micro-batch runs before the next layer, so each unit's weights are loaded once per pass and its
        gradient leaves once per step."""
        cfg = self.cfg
        L = cfg.num_layers
        ids = ids.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        B, T = ids.shape
        mb = min(self.s.micro_batch or B, B)
        parts = [(a, min(B, a + mb)) for a in range(0, B, mb)]
        positions = torch.arange(T, device=self.device).expand(B, T)
        count = (targets != data.IGNORE).sum()
        if self.cuda:
            self.compute.wait_stream(self.h2d_stream)  # the previous step's updated working copies
        host = None
        if self.cuda and self.act_cpu:  # pinned layer inputs, reused from step to step
            host = self.arena.slab("cpu", [((B, T, cfg.hidden_size), self.dtype)] * L, "finetune-activations")

        def each(fn):
            """fn(rows) over the micro-batches; their results into one new batch tensor."""
            if len(parts) == 1:
                return fn(slice(0, B))
            out = None
            for a, b in parts:
                y = fn(slice(a, b))
                if out is None:
                    out = torch.empty((B, *y.shape[1:]), dtype=y.dtype, device=y.device)
                out[a:b] = y
            return out

        with torch.no_grad():
            w = self._weights(0, False, next_u=1)
            x = each(lambda r: layers.embed(cfg, w, ids[r], positions[r], self.dtype))
            saved = []
            for i in range(L):
                saved.append(self._stash(x, None if host is None else host[i]))
                w = self._weights(1 + i, False, next_u=2 + i)
                x = each(lambda r, x=x, w=w: layers.layer(cfg, w, x[r], self._attend, positions[r], self.rope))
        w = self._weights(L + 1, True, next_u=L)
        loss = torch.zeros((), dtype=torch.float32, device=self.device)
        g = None
        for j, (a, b) in enumerate(parts):
            self._last = j == len(parts) - 1
            xa = x[a:b].detach().requires_grad_(True)
            logits = layers.head(cfg, w, xa)
            part = F.cross_entropy(
                logits.view(-1, logits.shape[-1]), targets[a:b].reshape(-1), ignore_index=data.IGNORE, reduction="sum"
            )
            part = part / count
            part.backward(retain_graph=not self._last)
            loss += part.detach()
            g = _rows_into(g, x, a, b, xa.grad, len(parts) == 1)
            del logits, xa, part
        del x
        for i in reversed(range(L)):
            xin = self._unstash(saved.pop())
            w = self._weights(1 + i, True, next_u=i)
            g_in = None
            for j, (a, b) in enumerate(parts):
                self._last = j == len(parts) - 1
                xi = xin[a:b].detach().requires_grad_(True)
                y = layers.layer(cfg, w, xi, self._attend, positions[a:b], self.rope)
                y.backward(g[a:b], retain_graph=not self._last)
                g_in = _rows_into(g_in, g, a, b, xi.grad, len(parts) == 1)
                del y, xi
            g = g_in
            del xin, w
        if any(hf in self.trainable for _, hf in self.units[0][1]):
            w = self._weights(0, True)
            for j, (a, b) in enumerate(parts):
                self._last = j == len(parts) - 1
                x0 = layers.embed(cfg, w, ids[a:b], positions[a:b], self.dtype)
                x0.backward(g[a:b], retain_graph=not self._last)
                del x0
        self._last = True
        del g
        value = float(loss)
        self.adam.wait()
        return value

    # ------------------------------------------------------------------ training
    def train(self, examples: list[data.Example], progress=None) -> Report:
        s = self.s
        if not examples:
            raise ValueError("no training examples")
        n = len(examples)
        per_epoch = data.steps_per_epoch(n, s.batch_size)
        total = per_epoch * s.epochs
        rep = Report(examples=n, resident_units=len(self.resident), streamed_units=len(self.units) - len(self.resident))
        rep.activations = "cpu" if (self.cuda and self.act_cpu) else ("gpu" if self.cuda else "cpu (the device)")
        epoch, pos, gstep = 0, 0, 0
        state = self._load_checkpoint()
        if state is not None:
            epoch, pos, gstep = state["epoch"], state["position"], state["step"]
            rep.log = [tuple(r) for r in state["log"]]
            rep.tokens, rep.target_tokens = state["tokens"], state["target_tokens"]
            rep.resumed_from_step = gstep
        if progress is not None:
            progress.start(total, gstep)
        start = time.perf_counter()
        try:
            while epoch < s.epochs:
                order = data.epoch_order(n, s.seed, epoch)
                while pos < per_epoch:
                    idx = order[pos * s.batch_size : (pos + 1) * s.batch_size]
                    ids, targets = data.collate(examples, idx)
                    t0 = time.perf_counter()
                    loss = self.step(ids, targets)
                    secs = time.perf_counter() - t0
                    rep.tokens += sum(len(examples[i].ids) for i in idx)
                    rep.target_tokens += int((targets != data.IGNORE).sum())
                    rep.log.append((epoch, gstep, loss, secs))
                    pos += 1
                    gstep += 1
                    if progress is not None:
                        progress.update(epoch, loss)
                    if FAULT_AFTER_STEP is not None and gstep >= FAULT_AFTER_STEP:
                        raise SimulatedKill(f"simulated kill after step {gstep}")
                    if s.checkpoint_steps and gstep % s.checkpoint_steps == 0 and pos < per_epoch:
                        self._save_checkpoint(epoch, pos, gstep, rep)
                epoch, pos = epoch + 1, 0
                self._save_checkpoint(epoch, pos, gstep, rep)
        finally:
            self.adam.close()
            self._pending.clear()
            if progress is not None:
                progress.close()
        rep.steps, rep.epochs = gstep, s.epochs
        rep.seconds = time.perf_counter() - start
        losses = [r[2] for r in rep.log]
        rep.first_loss, rep.final_loss = (losses[0], losses[-1]) if losses else (None, None)
        by_epoch: dict[int, list[float]] = {}
        for e, _, lo, _ in rep.log:
            by_epoch.setdefault(e, []).append(lo)
        rep.epoch_losses = [sum(v) / len(v) for _, v in sorted(by_epoch.items())]
        return rep

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, epoch: int, position: int, step: int, rep: Report) -> None:
        if self.state_dir is None:
            return
        from safetensors.torch import save_file

        self.state_dir.mkdir(parents=True, exist_ok=True)
        tensors, steps = self.adam.state()
        final = self.state_dir / f"ckpt-{step:08d}"
        tmp = self.state_dir / f".ckpt-{step:08d}.tmp-{uuid.uuid4().hex[:6]}"
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        meta = {
            "fingerprint": self.fingerprint,
            "epoch": epoch,
            "position": position,
            "step": step,
            "adam_steps": steps,
            "log": [list(r) for r in rep.log],
            "tokens": rep.tokens,
            "target_tokens": rep.target_tokens,
            "torch_rng": torch.get_rng_state().tolist(),  # nothing random runs after initialisation; kept for audits
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest = self.state_dir / "latest.json"
        t2 = self.state_dir / f".latest.tmp-{uuid.uuid4().hex[:6]}"
        t2.write_text(json.dumps({"checkpoint": final.name, "fingerprint": self.fingerprint}))
        os.replace(t2, latest)
        _fsync_dir(self.state_dir)
        for old in self.state_dir.glob("ckpt-*"):
            if old.name != final.name:
                shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self) -> dict | None:
        if self.state_dir is None or not (self.state_dir / "latest.json").is_file():
            return None
        from safetensors.torch import load_file

        latest = json.loads((self.state_dir / "latest.json").read_text())
        if latest.get("fingerprint") != self.fingerprint:
            return None
        d = self.state_dir / latest["checkpoint"]
        meta = json.loads((d / "meta.json").read_text())
        self.adam.load_state(load_file(str(d / "state.safetensors")), meta["adam_steps"])
        for name, m in self.adam.master.items():
            self._updated(name, m)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return meta

    # ------------------------------------------------------------------ export
    def trained_weights(self) -> dict[str, torch.Tensor]:
        """Hugging Face name -> fp32 tensor of the trained model (LoRA merged: W + alpha / r * B @ A)."""
        if not self.lora:
            return {hf: self.adam.master[hf].clone() for hf in self.names}
        out = {hf: t.clone() for hf, t in self.base.items()}
        for adapters in self.adapters.values():
            for a_name, b_name in adapters.values():
                hf = a_name.removesuffix(".lora_A")
                out[hf] += self.lora_scale * (self.adam.master[b_name] @ self.adam.master[a_name])
        return out

    def export(self, target: str | Path, info: dict) -> Path:
        """Write the trained model as a checkpoint directory (config, tokenizer and other files of the base, the
        weights as one fp32 model.safetensors; LoRA adapters also under lora/) at `target`, atomically."""
        from safetensors.torch import save_file

        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            for f in self.ckpt.path.iterdir() if self.ckpt is not None else []:
                if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
                    shutil.copy2(f, tmp / f.name)
            save_file({k: v.contiguous() for k, v in self.trained_weights().items()}, str(tmp / "model.safetensors"))
            if self.lora:
                (tmp / "lora").mkdir()
                save_file(
                    {k: v.contiguous() for k, v in self.adam.master.items()}, str(tmp / "lora" / "adapters.safetensors")
                )
            (tmp / "finetune.json").write_text(json.dumps(info, indent=1, default=str))
            if target.exists():
                target.rmdir()  # must be empty: the caller checked
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def discard_state(self) -> None:
        if self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)


def _fsync_dir(d: Path) -> None:
    for f in d.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _rows_into(dst: torch.Tensor | None, like: torch.Tensor, a: int, b: int, rows: torch.Tensor, whole: bool):
    """A micro-batch's gradient (rows a:b) placed into the whole batch's (``dst``, made like ``like`` on first use);
    with one micro-batch, the gradient itself."""
    if whole:
        return rows
    if dst is None:
        dst = torch.empty_like(like)
    dst[a:b] = rows
    return dst
