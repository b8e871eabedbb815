"""Calibration: run the dense model over calibration texts, record every layer's MLP input, and fit the sparsity.

- TEAL: per layer, the threshold on |MLP input| that zeroes the target fraction of its entries (a quantile over the
  calibration tokens), then, with the input already thresholded, the same on the down projection's input.
- DejaVu: per layer, a low-rank classifier d -> r -> n of "neuron active after the activation function" (ReLU:
  pre-activation > 0; GELU, which is not exactly sparse: pre-activation > 0, i.e. the neurons GELU passes nearly
  linearly; the ones left out contribute at most -0.17 each), trained with BCE from the model's own activations.
  Its input is the previous layer's MLP input (the look-ahead: modules.py runs it while that layer computes); layer
  0's is its own. Each token then computes its top k = round((1 - sparsity) * n) neurons.

Tokens are split by sequence: the last ~10% of the calibration sequences are held out to report recall and the
relative error of each layer's MLP output. Everything is seeded: the same texts give the same variant.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from reldl.llm.sparse.modules import act_fn

DEFAULT_RANK = 128
DEFAULT_EPOCHS = 8
DEFAULT_TOKENS = 32768  # calibration tokens used at most (whole sequences, in order)
VAL_FRACTION = 0.1
MAX_QUANTILE_ELEMENTS = 1 << 22


@dataclass
class Recorded:
    inputs: list[torch.Tensor]  # per layer: MLP inputs [N, d], float32
    n_train: int  # the first n_train rows are training tokens, the rest held out
    sequences: int


@torch.no_grad()
def record_mlp_inputs(engine, texts: Sequence[str], max_tokens: int = DEFAULT_TOKENS) -> Recorded:
    """Run `engine`'s (dense) model over the texts through `Engine.logits` and keep each layer's MLP input for
    every real (non-padding) token. Sequences beyond `max_tokens` tokens in total are not run."""
    model = engine.model
    limit = engine.context_length
    seqs: list[list[int]] = []
    total = 0
    for ids in engine.encode_many(list(texts)):
        ids = ids[:limit]
        if not ids:
            continue
        if total and total + len(ids) > max_tokens:
            break
        seqs.append(ids[:max_tokens])
        total += len(seqs[-1])
    if not seqs:
        raise ValueError("the calibration rows hold no tokens")
    n_val_seqs = max(1, round(len(seqs) * VAL_FRACTION)) if len(seqs) > 1 else 0
    me = threading.get_ident()
    batches: list[list[torch.Tensor]] = [[] for _ in model.layers]

    def hook(i):
        def pre(_module, args):
            if threading.get_ident() == me:
                batches[i].append(args[0].detach().float().cpu())

        return pre

    handles = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(model.layers)]
    try:
        engine.logits(seqs)
    finally:
        for h in handles:
            h.remove()
    inputs = []
    for per_layer in batches:
        rows: list[torch.Tensor] = []
        s = 0
        for x in per_layer:  # forwards in order; each holds consecutive sequences, right-padded
            for b in range(x.shape[0]):
                rows.append(x[b, : len(seqs[s])])
                s += 1
        inputs.append(torch.cat(rows))
    n_train = sum(len(s) for s in seqs[: len(seqs) - n_val_seqs])
    return Recorded(inputs, n_train, len(seqs))


def _abs_quantile(t: torch.Tensor, q: float, gen: torch.Generator) -> float:
    """The value below which a fraction q of |t| lies; 0.0 when q rounds to no element (nothing but zeros drop)."""
    flat = t.reshape(-1).abs()
    if flat.numel() > MAX_QUANTILE_ELEMENTS:
        pick = torch.randint(0, flat.numel(), (MAX_QUANTILE_ELEMENTS,), generator=gen)
        flat = flat[pick]
    k = int(math.floor(q * flat.numel()))
    if k <= 0:
        return 0.0
    return float(torch.kthvalue(flat.float(), k).values)


def _zero_small(x: torch.Tensor, t: float) -> torch.Tensor:
    return torch.where(x.abs() > t, x, torch.zeros_like(x))


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def _mlp_weights(mlp) -> dict[str, torch.Tensor | None]:
    """Float32 CPU copies of a dense MLP's weights (nn.Linear layout), for any family."""

    def f(t):
        return None if t is None else t.detach().float().cpu()

    if hasattr(mlp, "w13"):
        n = mlp.inter
        w, b = mlp.w13.weight, mlp.w13.bias
        return {
            "gate": f(w[:n]),
            "up": f(w[n:]),
            "b_gate": None if b is None else f(b[:n]),
            "b_up": None if b is None else f(b[n:]),
            "down": f(mlp.w2.weight),
            "b_down": f(mlp.w2.bias),
        }
    fc1, fc2 = (mlp.fc1, mlp.fc2) if hasattr(mlp, "fc1") else (mlp.fc, mlp.proj)
    return {"w1": f(fc1.weight), "b1": f(fc1.bias), "down": f(fc2.weight), "b_down": f(fc2.bias)}


def _hidden(w: dict, x: torch.Tensor, act) -> torch.Tensor:
    if "gate" in w:
        return act(F.linear(x, w["gate"], w["b_gate"])) * F.linear(x, w["up"], w["b_up"])
    return act(F.linear(x, w["w1"], w["b1"]))


@torch.no_grad()
def calibrate_teal(
    model, rec: Recorded, sparsity: float, seed: int = 0
) -> tuple[list[tuple[float, float]], list[dict]]:
    """Per layer (threshold on the MLP input, threshold on the down projection's input) and a report."""
    gen = torch.Generator().manual_seed(seed)
    act = act_fn(model.config.activation)
    thresholds, report = [], []
    for i, layer in enumerate(model.layers):
        w = _mlp_weights(layer.mlp)
        x = rec.inputs[i]
        xt, xv = x[: rec.n_train], x[rec.n_train :]
        if xv.shape[0] == 0:
            xv = xt
        t_in = _abs_quantile(xt, sparsity, gen)
        h_t = _hidden(w, _zero_small(xt, t_in), act)
        t_mid = _abs_quantile(h_t, sparsity, gen)
        xv = xv[:4096]
        xs = _zero_small(xv, t_in)
        hs = _hidden(w, xs, act)
        hz = _zero_small(hs, t_mid)
        y = F.linear(hz, w["down"], w["b_down"])
        ref = F.linear(_hidden(w, xv, act), w["down"], w["b_down"])
        s_in = float((xs == 0).float().mean())
        s_mid = float((hz == 0).float().mean())
        d, n = xv.shape[1], w["down"].shape[1]
        up_mats = 2 if "gate" in w else 1
        read = ((1 - s_in) * up_mats * d * n + (1 - s_mid) * n * d) / ((up_mats + 1) * d * n)
        thresholds.append((t_in, t_mid))
        report.append(
            {
                "layer": i,
                "threshold_in": t_in,
                "threshold_mid": t_mid,
                "sparsity_in": round(s_in, 4),
                "sparsity_mid": round(s_mid, 4),
                "weights_read": round(read, 4),
                "output_rel_error": round(_rel_err(y, ref), 4),
            }
        )
    return thresholds, report


def _labels(w: dict, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w["w1"], w["b1"]) > 0


def _recall(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    keep = torch.zeros_like(labels)
    keep.scatter_(1, torch.topk(scores, k, dim=1, sorted=False).indices, True)
    active = labels.sum()
    return float((keep & labels).sum() / active) if active > 0 else 1.0


def _train_predictor(
    x: torch.Tensor, y: torch.Tensor, rank: int, epochs: int, gen: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """a [d, r], b [r, n], c [n] minimising BCE(x a b + c, y); Adam, minibatches, deterministic seed."""
    d, n = x.shape[1], y.shape[1]
    a = (torch.randn(d, rank, generator=gen) / math.sqrt(d)).to(device)
    b = (torch.randn(rank, n, generator=gen) / math.sqrt(rank) * 0.1).to(device)
    p = y.float().mean(0).clamp(1e-4, 1 - 1e-4)
    c = torch.log(p / (1 - p)).to(device)  # start from each neuron's base rate
    params = [t.requires_grad_() for t in (a, b, c)]
    opt = torch.optim.Adam(params, lr=3e-3)
    batch = 256
    steps_per_epoch = max(1, math.ceil(x.shape[0] / batch))
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(x.shape[0], generator=gen)
            for s in range(steps_per_epoch):
                sel = order[s * batch : (s + 1) * batch]
                xb, yb = x[sel].to(device), y[sel].to(device).float()
                loss = F.binary_cross_entropy_with_logits(torch.addmm(c, xb @ a, b), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return a.detach().cpu(), b.detach().cpu(), c.detach().cpu()


def calibrate_dejavu(
    model,
    rec: Recorded,
    sparsity: float,
    rank: int = DEFAULT_RANK,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    device: torch.device | None = None,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], int, list[dict]]:
    """Per-layer predictors (a, b, c), the per-layer k, and a report (recall on training and held-out tokens)."""
    gen = torch.Generator().manual_seed(seed)
    act = act_fn(model.config.activation)
    device = device or torch.device("cpu")
    preds, report = [], []
    n = model.config.intermediate_size
    k = max(1, min(n, round((1.0 - sparsity) * n)))
    for i, layer in enumerate(model.layers):
        w = _mlp_weights(layer.mlp)
        x = rec.inputs[i]
        src = rec.inputs[max(0, i - 1)]  # the look-ahead input: the previous layer's MLP input
        r = max(1, min(rank, x.shape[1], n))
        with torch.no_grad():
            y = _labels(w, x)
        t = rec.n_train
        a, b, c = _train_predictor(src[:t], y[:t], r, epochs, gen, device)
        with torch.no_grad():
            vt = slice(t, None) if x.shape[0] > t else slice(0, None)
            s_tr = torch.addmm(c, src[:t][:8192] @ a, b)
            s_val = torch.addmm(c, src[vt][:8192] @ a, b)
            y_tr, y_val = y[:t][:8192], y[vt][:8192]
            xv = x[vt][:4096]
            pre = F.linear(xv, w["w1"], w["b1"])
            keep = torch.zeros_like(pre, dtype=torch.bool)
            keep.scatter_(1, torch.topk(s_val[:4096], k, dim=1, sorted=False).indices, True)
            ys = F.linear(act(pre) * keep, w["down"], w["b_down"])
            ref = F.linear(act(pre), w["down"], w["b_down"])
            oracle = torch.zeros_like(keep)
            oracle.scatter_(1, torch.topk(pre, k, dim=1, sorted=False).indices, True)
        preds.append((a, b, c))
        report.append(
            {
                "layer": i,
                "neurons": n,
                "selected": k,
                "fraction_selected": round(k / n, 4),
                "rank": r,
                "natural_sparsity": round(1 - float(y.float().mean()), 4),
                "recall_train": round(_recall(s_tr, y_tr, k), 4),
                "recall": round(_recall(s_val, y_val, k), 4),
                "oracle_recall": round(float((oracle & (pre > 0)).sum() / (pre > 0).sum().clamp_min(1)), 4),
                "output_rel_error": round(_rel_err(ys, ref), 4),
            }
        )
    return preds, k, report


def make_variant(
    engine,
    texts: Sequence[str],
    target,
    *,
    method: str,
    sparsity: float,
    base_name: str,
    base_path: str,
    rank: int = DEFAULT_RANK,
    epochs: int = DEFAULT_EPOCHS,
    max_tokens: int = DEFAULT_TOKENS,
    seed: int = 0,
) -> dict:
    """Calibrate `engine`'s (dense) model on `texts` and write the variant directory `target`; returns its spec."""
    import time
    from pathlib import Path

    from reldl.llm.sparse import variant

    start = time.perf_counter()
    cfg = engine.model.config
    rec = record_mlp_inputs(engine, texts, max_tokens)
    tensors: dict[str, torch.Tensor] = {}
    if method == "teal":
        thresholds, report = calibrate_teal(engine.model, rec, sparsity, seed=seed)
        tensors["thresholds"] = torch.tensor(thresholds, dtype=torch.float32).reshape(-1, 2)
    elif method == "dejavu":
        preds, _, report = calibrate_dejavu(
            engine.model, rec, sparsity, rank=rank, epochs=epochs, seed=seed, device=engine.device
        )
        for i, (a, b, c) in enumerate(preds):
            tensors[f"layers.{i}.a"], tensors[f"layers.{i}.b"], tensors[f"layers.{i}.c"] = a, b, c
    else:
        raise ValueError(f"unknown method {method!r}")
    base_path = str(Path(base_path).resolve())
    spec = {
        "method": method,
        "sparsity": sparsity,
        "base": base_name,
        "base_path": base_path,
        "base_mtime_ns": variant.base_mtime_ns(base_path),
        "architecture": cfg.model_type,
        "activation": cfg.activation,
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "calibration": {
            "rows": len(texts),
            "sequences": rec.sequences,
            "tokens": int(rec.inputs[0].shape[0]),
            "held_out_tokens": int(rec.inputs[0].shape[0] - rec.n_train),
            "seconds": round(time.perf_counter() - start, 2),
        },
        "layers": report,
    }
    if method == "dejavu":
        spec["predictor_rank"] = report[0]["rank"]
        spec["epochs"] = epochs
    variant.save_variant(Path(target), spec, tensors)
    return spec
