"""Sparse MLP modules that replace `block.mlp` per layer, from outside the family files.

- `DejaVuMLP` (ReLU / GELU MLPs: OPT, GPT-2): a low-rank predictor scores the neurons, the k best are computed
  (`kernels.sparse_mlp` on CUDA, `sparse_mlp_reference` elsewhere), the others are taken as zero.
- `TealMLP` (SwiGLU MLPs: Llama family; also ReLU MLPs with method 'teal'): entries of the MLP input, and of the
  down projection's input, with |value| <= a per-layer threshold are zeroed, so only the weight rows of the surviving
  input dimensions are read (`kernels.sparse_swiglu_mlp` / `teal_linear` on CUDA, the same math in torch elsewhere).

When a module runs sparse (`mode`):
- "auto" (the engine's default): decode steps (one token per row, at most `MAX_SPARSE_ROWS` rows) run sparse;
  prefill (many tokens) runs dense, since a prompt's tokens together touch nearly every neuron and a dense GEMM is
  then faster than any gather.
- "sparse": every token runs sparse with its own neuron set, as if it were decoded alone (quality measurements run
  the whole held-out text this way through one forward).
- "dense": never sparse (the base model's function, for comparisons).

Decode with a batch of rows computes the union of the rows' neuron sets (DejaVu) or reads the union of the rows'
surviving input dimensions (TEAL: the kernel skips a weight row only when its input is zero in every row).

Look-ahead (DejaVu): the predictor of layer i+1 and its top-k selection run from layer i's MLP input while layer i's
sparse MLP and layer i+1's attention run: on CUDA on a side stream (forked at layer i's MLP, joined at layer i+1's
MLP, inside one forward, so it also works inside the engine's CUDA-graph capture), on the CPU inline. Layer 0's
predictor runs on its own input. The predictors are
trained on exactly these inputs (calibrate.py), so CPU and GPU compute the same selection.
"""

from __future__ import annotations

import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from reldl.llm import fused

MAX_SPARSE_ROWS = 16  # decode batches up to this many rows run sparse; more rows run dense
MODES = ("auto", "sparse", "dense")

# the model's activation name -> the kernels' name
KERNEL_ACT = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
}


def kernel_act(name: str) -> str:
    return KERNEL_ACT.get(name, "none")


def act_fn(name: str):
    from reldl.kernels.sparse_mlp import _act_reference

    kname = kernel_act(name)
    return lambda h: _act_reference(h, kname)


def _kernels(x: torch.Tensor):
    k = fused.on(x)
    if k is None or not hasattr(k, "sparse_mlp"):
        return None
    return k


class Predictor(nn.Module):
    """scores [R, n] = (x [R, d] @ a [d, r]) @ b [r, n] + c [n]: a low-rank linear classifier of 'neuron active'."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor):
        super().__init__()
        self.register_buffer("a", a)
        self.register_buffer("b", b)
        self.register_buffer("c", c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.c, x @ self.a, self.b)


class LookAhead:
    """The next layer's neuron selection, computed while the current layer's MLP and the next layer's attention run.

    `launch(i, x, union)` starts predictor i on x and, with `union`, the decode selection `select_union(scores, k_i)`
    (a side stream on CUDA; inline on the CPU or with `overlap` off); `take(i)` makes the current stream wait for the
    side stream and returns (scores, idx) once. Layer i launches layer i + 1's work at the start of its MLP and layer
    i + 1 takes it at the start of its own MLP, so the side stream (predictor GEMVs and the top-k selection, a chain
    of small latency-bound kernels) overlaps layer i's sparse MLP and all of layer i + 1's attention. At most one
    fork is outstanding, and every fork is joined inside the same forward pass (the last layer launches nothing), so
    a CUDA-graph capture of a decode step sees the fork and its join. The launching tensor x is kept referenced until
    the join, so the caching allocator cannot hand its memory to the main stream while the side stream reads it."""

    def __init__(self, predictors: list[Predictor | None]):
        self.predictors = predictors
        self.ks: dict[int, int] = {}  # layer -> neurons kept per row (DejaVuMLP registers its own)
        self._local = threading.local()  # engines with other options share the model and may run in other threads
        self.overlap = True  # False: on CUDA too, the predictor runs inline on the current stream (for comparisons)

    @property
    def pending(self) -> dict[int, tuple]:
        p = getattr(self._local, "pending", None)
        if p is None:
            p = self._local.pending = {}
        return p

    @property
    def _forked(self) -> tuple[torch.cuda.Stream, torch.device] | None:
        return getattr(self._local, "forked", None)

    @_forked.setter
    def _forked(self, value: tuple[torch.cuda.Stream, torch.device] | None) -> None:
        self._local.forked = value

    def _side(self, device: torch.device) -> torch.cuda.Stream:
        streams = getattr(self._local, "streams", None)
        if streams is None:
            streams = self._local.streams = {}
        s = streams.get(device)
        if s is None:
            s = streams[device] = torch.cuda.Stream(device)
        return s

    def _work(self, layer: int, x: torch.Tensor, union: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        scores = self.predictors[layer](x)
        k = self.ks.get(layer) if union else None
        return scores, (select_union(scores, k) if k is not None else None)

    def launch(self, layer: int, x: torch.Tensor, union: bool = False) -> None:
        if layer >= len(self.predictors) or self.predictors[layer] is None:
            return
        if not x.is_cuda or not self.overlap:
            self.pending[layer] = (*self._work(layer, x, union), None)
            return
        self.join()  # at most one fork outstanding
        side = self._side(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))  # x (and earlier uses of old results) ordered first
        with torch.cuda.stream(side):
            scores, idx = self._work(layer, x, union)
        self.pending[layer] = (scores, idx, x)  # x stays alive until the join
        self._forked = (side, x.device)

    def join(self) -> None:
        forked = self._forked
        if forked is not None:
            side, device = forked
            torch.cuda.current_stream(device).wait_stream(side)
            self._forked = None

    def take(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(scores, idx or None) launched for `layer`, or (None, None); joins the side stream first."""
        entry = self.pending.pop(layer, None)
        self.join()
        if entry is None:
            return None, None
        return entry[0], entry[1]

    def clear(self) -> None:
        self.join()
        self.pending.clear()


def select_union(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Neurons to compute for a decode batch, int64 [min(n, R*k)], with no host sync (CUDA-graph safe).

    One row: its top-k. R rows: every row's top-k (the union), padded up to the fixed size min(n, R*k) with the
    neurons of highest score among the rest, so the count depends only on shapes."""
    rows, n = scores.shape
    if rows == 1:
        return torch.topk(scores[0], k, sorted=False).indices
    size = min(n, rows * k)
    top = torch.topk(scores, k, dim=1, sorted=False).indices.reshape(-1)
    member = torch.zeros(n, dtype=torch.float32, device=scores.device)
    member.index_fill_(0, top, 2.0)
    key = member + torch.sigmoid(scores.float().amax(dim=0))  # union first (>= 2), then by best score (< 1)
    return torch.topk(key, size, sorted=False).indices


def _rows_per_token_sparse(x: torch.Tensor, mode: str) -> bool:
    """Whether this call runs sparse: x [B, T, d]."""
    if mode == "sparse":
        return True
    if mode == "dense":
        return False
    B, T = x.shape[0], x.shape[1]
    return T == 1 and B <= MAX_SPARSE_ROWS


class DejaVuMLP(nn.Module):
    """y = W2 act(W1 x + b1) + b2 over the predicted neurons only. W1 [n, d] and b1 are the base model's tensors
    (shared); W2 is stored transposed ([n, d], contiguous) as the kernel reads it; built once at load."""

    def __init__(self, dense: nn.Module, layer: int, lookahead: LookAhead, k: int, activation: str):
        super().__init__()
        fc1, fc2 = (dense.fc1, dense.fc2) if hasattr(dense, "fc1") else (dense.fc, dense.proj)
        self.w1 = fc1.weight
        self.b1 = fc1.bias
        self.register_buffer("w2t", fc2.weight.detach().t().contiguous())
        self.b2 = fc2.bias
        self.layer, self.lookahead, self.k = layer, lookahead, int(k)
        lookahead.ks[layer] = self.k
        self.activation = activation
        self.kact = kernel_act(activation)
        self.act = act_fn(activation)
        self.mode = "auto"
        self.oracle = False  # select the neurons whose pre-activation is > 0 (exact for ReLU); tests and upper bounds

    def _dense(self, x2: torch.Tensor) -> torch.Tensor:
        h = self.act(F.linear(x2, self.w1, self.b1))
        y = h @ self.w2t
        return y if self.b2 is None else y + self.b2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        la = self.lookahead
        scores, idx = la.take(self.layer)  # always taken (and joined), also when this call runs dense
        if not _rows_per_token_sparse(x, self.mode):
            return self._dense(x2).view(shape)
        union = self.mode != "sparse" and not self.oracle  # the decode path: a fixed-size union of the rows' top-k
        if scores is None or scores.shape[0] != x2.shape[0]:  # layer 0 (or a layer after a dense one): inline
            pred = la.predictors[self.layer]
            scores = pred(x2) if pred is not None and not self.oracle else None
            idx = None
        la.launch(self.layer + 1, x2, union)
        if self.mode == "sparse" or self.oracle:  # each token with its own neuron set (or the exact set)
            pre = F.linear(x2, self.w1, self.b1)
            if self.oracle:
                keep = pre > 0
            else:
                keep = torch.zeros_like(pre, dtype=torch.bool)
                keep.scatter_(1, torch.topk(scores, self.k, dim=1, sorted=False).indices, True)
            if self.mode != "sparse" and self.oracle:  # a decode batch with the oracle: the union, gathered
                idx = torch.nonzero(keep.any(dim=0)).view(-1)
                y = self._gather(x2, idx)
            else:
                h = self.act(pre) * keep
                y = h @ self.w2t
                y = y if self.b2 is None else y + self.b2
        else:
            if idx is None or idx.numel() != min(scores.shape[1], scores.shape[0] * self.k):
                idx = select_union(scores, self.k)
            y = self._gather(x2, idx)
        return y.view(shape)

    def _gather(self, x2: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        k_ = _kernels(x2)
        if k_ is not None and self.kact != "none":
            return k_.sparse_mlp(x2, self.w1, self.b1, self.w2t, self.b2, idx, self.kact)
        from reldl.kernels.sparse_mlp import sparse_mlp_reference

        if self.kact == "none":
            h = self.act(F.linear(x2, self.w1[idx], None if self.b1 is None else self.b1[idx]))
            y = h @ self.w2t[idx]
            return y if self.b2 is None else y + self.b2
        return sparse_mlp_reference(x2, self.w1, self.b1, self.w2t, self.b2, idx, self.kact)


def _zero_small(x: torch.Tensor, t: float | None) -> torch.Tensor:
    """x with the entries of |value| <= t zeroed (t None: x). `F.hardshrink` is exactly `where(|x| > t, x, 0)` for
    finite values (t is compared in x's dtype either way) in one kernel instead of four (abs, compare, zeros, where):
    on the CPU a decode step's MLP is a few small ops, so each op's dispatch cost shows."""
    return x if t is None else F.hardshrink(x, t)


class TealMLP(nn.Module):
    """TEAL activation sparsity. Gated (SwiGLU): h = act(s_in(x) W_gate) * (s_in(x) W_up), y = s_mid(h) W_down;
    plain (ReLU/GELU): h = act(s_in(x) W1 + b1), y = s_mid(h) W2 + b2. s_t zeroes entries with |v| <= t. Weights are
    stored transposed ([in, out], contiguous: one input dimension's weights are one row) and replace the base
    module's (the dense path uses the same tensors), built once at load."""

    def __init__(self, dense: nn.Module, t_in: float, t_mid: float, activation: str):
        super().__init__()
        self.gated = hasattr(dense, "w13")
        if self.gated:
            n = dense.inter
            w13 = dense.w13.weight.detach()
            self.register_buffer("w_gate_t", w13[:n].t().contiguous())
            self.register_buffer("w_up_t", w13[n:].t().contiguous())
            b13 = dense.w13.bias
            self.b_gate = None if b13 is None else b13[:n]
            self.b_up = None if b13 is None else b13[n:]
            down = dense.w2
        else:
            fc1, down = (dense.fc1, dense.fc2) if hasattr(dense, "fc1") else (dense.fc, dense.proj)
            self.register_buffer("w1t", fc1.weight.detach().t().contiguous())
            self.b1 = fc1.bias
        self.register_buffer("w_down_t", down.weight.detach().t().contiguous())
        self.b_down = down.bias
        self.t_in, self.t_mid = float(t_in), float(t_mid)
        self.activation = activation
        self.kact = kernel_act(activation)
        self.act = act_fn(activation)
        self.mode = "auto"

    def _torch(self, x2: torch.Tensor, t_in: float | None, t_mid: float | None) -> torch.Tensor:
        xs = _zero_small(x2, t_in)
        if self.gated:
            g = xs @ self.w_gate_t
            u = xs @ self.w_up_t
            if self.b_gate is not None:
                g, u = g + self.b_gate, u + self.b_up
            h = self.act(g) * u
        else:
            h = xs @ self.w1t
            h = self.act(h if self.b1 is None else h + self.b1)
        y = _zero_small(h, t_mid) @ self.w_down_t
        return y if self.b_down is None else y + self.b_down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if not _rows_per_token_sparse(x, self.mode):
            return self._torch(x2, None, None).view(shape)
        k_ = _kernels(x2) if self.mode == "auto" else None
        if k_ is not None:
            if self.gated and self.kact == "silu" and self.b_gate is None and self.b_down is None:
                y = k_.sparse_swiglu_mlp(x2, self.w_gate_t, self.w_up_t, self.w_down_t, self.t_in, self.t_mid)
                return y.view(shape)
            if not self.gated and self.kact != "none":
                h = k_.teal_linear(x2, self.w1t, self.t_in, bias=self.b1)
                h = self.act(h)
                return k_.teal_linear(h, self.w_down_t, self.t_mid, bias=self.b_down).view(shape)
        return self._torch(x2, self.t_in, self.t_mid).view(shape)


def set_mode(model: nn.Module, mode: str) -> None:
    """Set every sparse MLP's mode ('auto', 'sparse' or 'dense')."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for m in model.modules():
        if isinstance(m, (DejaVuMLP, TealMLP)):
            m.mode = mode
    la = getattr(model, "sparse_lookahead", None)
    if la is not None:
        la.clear()


def set_oracle(model: nn.Module, on: bool = True) -> None:
    for m in model.modules():
        if isinstance(m, DejaVuMLP):
            m.oracle = on
