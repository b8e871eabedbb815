"""Per-layer costs of DejaVu decode on an OPT-13B-shaped MLP (one layer, fp16, CUDA graphs of 50 replays).

    python benchmarks/bench_sparse_components.py [--density 0.05] [--rank 128] [--out file.json]

Rows: the dense MLP, `sparse_mlp` with a given index, the predictor (d -> r -> n), the selection
(`select_union`: torch.topk at one row), predictor + selection, and the whole DejaVu decode step of one layer's MLP
(`DejaVuMLP.forward` with look-ahead off, i.e. predictor + selection + sparse MLP on one stream), per batch size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def graph_time(fn, reps: int = 50, iters: int = 5) -> float:
    """Median microseconds per call of fn, replayed from one CUDA graph that holds `reps` calls."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps)
    return sorted(times)[len(times) // 2]


def _cases(F, dense, mlp, pred, sparse_mlp, select_union, x, scores, idx, k) -> dict:
    B, d = x.shape
    w1, b1, w2, b2 = dense.fc1.weight, dense.fc1.bias, dense.fc2.weight, dense.fc2.bias
    return {
        "dense MLP": lambda: F.linear(F.relu(F.linear(x, w1, b1)), w2, b2),
        "sparse_mlp (given idx)": lambda: sparse_mlp(x, mlp.w1, mlp.b1, mlp.w2t, mlp.b2, idx, "relu"),
        "predictor": lambda: pred(x),
        "selection (select_union)": lambda: select_union(scores, k),
        "predictor + selection": lambda: select_union(pred(x), k),
        "DejaVuMLP step (inline)": lambda: mlp(x.view(B, 1, d)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 4, 16])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from reldl.kernels.sparse_mlp import sparse_mlp
    from reldl.llm.sparse.modules import DejaVuMLP, LookAhead, Predictor, select_union

    dev, dt = torch.device("cuda"), torch.float16
    d, n = 5120, 20480
    k = round(args.density * n)
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, std=0.02):
        return torch.randn(*shape, device=dev, dtype=dt, generator=g) * std

    dense = nn.Module()
    dense.fc1, dense.fc2 = nn.Linear(d, n, device=dev, dtype=dt), nn.Linear(n, d, device=dev, dtype=dt)
    pred = Predictor(rnd(d, args.rank, std=d**-0.5), rnd(args.rank, n, std=args.rank**-0.5), rnd(n))
    la = LookAhead([pred])
    mlp = DejaVuMLP(dense, 0, la, k, "relu")
    la.overlap = False
    rows = []
    card = torch.cuda.get_device_name(0)
    print(f"OPT-13B MLP (d {d}, n {n}), density {args.density} (k {k}), predictor rank {args.rank}; {card}")
    for B in args.batches:
        x = rnd(B, d, std=1.0)
        scores = pred(x)
        idx = select_union(scores, k)
        cases = _cases(F, dense, mlp, pred, sparse_mlp, select_union, x, scores, idx, k)
        for name, fn in cases.items():
            us = graph_time(fn)
            rows.append({"batch": B, "case": name, "us": us, "selected": idx.numel()})
            print(f"B={B:>2} {name:<28} {us:>8.1f} us", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
