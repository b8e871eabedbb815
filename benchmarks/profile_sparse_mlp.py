"""Where the batch-1 sparse ReLU MLP's time goes (issue 7), kernel by kernel, on a GPU.

    python benchmarks/profile_sparse_mlp.py [--out benchmarks/out/profile_sparse_mlp.json]

For OPT-13B / 30B / 175B shapes at 5% and 10% density: CUDA-graph medians (triton do_bench_cudagraph, 16 disjoint
neuron sets cycled so no call finds its rows in L2) of the whole `sparse_mlp`, kernel 1 alone (`_up_partials`),
kernel 2 with its reduce (`_gather_matmul`), kernel 2's reduce alone, and a device copy of the same bytes (what a
kernel of that size can reach: ramp-up and tail included). Prints a table and writes JSON.
"""

# ruff: noqa: B023  (the lambdas run inside the loop iteration that made them)
from __future__ import annotations

import argparse
import importlib
import json

import torch
import triton
import triton.testing

import reldl.kernels as K

SM = importlib.import_module("reldl.kernels.sparse_mlp")
ROT = 16
RELU = SM._act_code("relu")
SHAPES = {"opt-13b": (5120, 20480), "opt-30b": (7168, 28672), "opt-175b": (12288, 49152)}


def bench(fns, rep: int) -> float:
    def run_all():
        for f in fns:
            f()

    return triton.testing.do_bench_cudagraph(run_all, rep=rep, return_mode="median") / len(fns) * 1e3  # us


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/out/profile_sparse_mlp.json")
    ap.add_argument("--rep", type=int, default=40)
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    print(f"{torch.cuda.get_device_name()}; us per call (CUDA graph); GB/s of the bytes each part reads")
    print(f"{'case':<16} {'whole':>7} {'k1':>7} {'k2+red':>7} {'red':>6} {'copy 2x':>8} {'k1 GB/s':>8} {'k2 GB/s':>8}")
    for name, (d, n) in SHAPES.items():
        torch.manual_seed(0)
        w1 = (torch.randn(n, d, device=dev) * d**-0.5).half()
        b1 = (torch.randn(n, device=dev) * 0.1).half()
        w2t = (torch.randn(n, d, device=dev) * n**-0.5).half()
        b2 = (torch.randn(d, device=dev) * 0.1).half()
        perm = torch.randperm(n, device=dev).to(torch.int32)
        xs = [torch.randn(1, d, device=dev).half() for _ in range(ROT)]
        for density in (0.05, 0.1):
            k = round(density * n)
            sets = [perm[i * k : (i + 1) * k] for i in range(min(ROT, n // k))]
            pairs = list(zip(xs, sets))
            whole = bench([lambda x=x, s=s: K.sparse_mlp(x, w1, b1, w2t, b2, s) for x, s in pairs], args.rep)
            parts = [SM._up_partials(x, w1, b1, s, RELU, pdl=True, small=True) for x, s in pairs]
            k1 = bench(
                [lambda x=x, s=s: SM._up_partials(x, w1, b1, s, RELU, pdl=True, small=True) for x, s in pairs], args.rep
            )
            y = torch.empty(1, d, dtype=torch.float16, device=dev)
            split = parts[0][1]

            def down(p, s):  # as sparse_mlp calls kernel 2 at batch 1
                if split == 1:
                    SM._gather_matmul(p, w2t, y, mode=SM.MODE_COMPACT, k=k, idx=s, bias=b2, pdl=True, small=True)
                    return
                kw = dict(a_splits=split, a_bias=b1, a_act=RELU, pdl=True, small=True)
                SM._gather_matmul(p, w2t, y, mode=SM.MODE_PARTIALS, k=k, idx=s, bias=b2, **kw)

            k2 = bench([lambda p=p[0], s=s: down(p, s) for p, (_, s) in zip(parts, pairs)], args.rep)
            cfg = SM.down_config(1, k, d, torch.float16, SM.num_sms(dev), small=True)
            part = torch.randn(cfg["SPLITS"], 1, d, device=dev)
            red = (
                bench([lambda: SM._reduce(part, y, d, cfg["SPLITS"], bias=b2, pdl=True)], args.rep)
                if cfg["SPLITS"] > 1
                else 0.0
            )
            src = torch.empty(k * d * 2, dtype=torch.uint8, device=dev)
            dst = torch.empty_like(src)
            copy = 2 * bench([lambda: dst.copy_(src)], args.rep)
            mb = k * d * 2 / 1e6
            row = dict(
                shape=name,
                density=density,
                k=k,
                whole_us=whole,
                k1_us=k1,
                k2_with_reduce_us=k2,
                reduce_us=red,
                copy_both_us=copy,
                k1_gbps=mb / k1 * 1e3,
                k2_gbps=mb / k2 * 1e3,
                up_split=split,
                down_splits=cfg["SPLITS"],
                device=torch.cuda.get_device_name(),
            )
            rows.append(row)
            case = f"{name} {density:.0%}"
            rates = f"{row['k1_gbps']:8.0f} {row['k2_gbps']:8.0f}"
            print(f"{case:<16} {whole:7.1f} {k1:7.1f} {k2:7.1f} {red:6.1f} {copy:8.1f} {rates}")
        w1 = w2t = None
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(dict(rows=rows, torch=torch.__version__, triton=triton.__version__), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
