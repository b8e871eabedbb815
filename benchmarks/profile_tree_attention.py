"""Run the tree-attention kernels of chosen DeFT workloads a few times, for a profiler (issue 6).

    ncu --clock-control none -k regex:_tree_ --launch-skip 4 --launch-count 2 --section SpeedOfLight \\
        python3 benchmarks/profile_tree_attention.py --only "b=50 len=50"

Builds each case as `bench_tree_attention.py` does (Llama3-8B heads, fp16, KV scattered in a paged cache), plans it
once, checks the kernel against the float32 reference, then calls `tree_attention` --calls times (phase 1 then the
merge each time). `--config KEY=VALUE` overrides entries of tree_attention_config (Python literals), so a
profile can compare two configs of one case. Prints each case's plan and error; a profiler attached to the process
sees the kernels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_tree_attention as B  # noqa: E402

import reldl.kernels as K  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", action="append", default=[], help="cases whose name contains this (repeatable)")
    ap.add_argument("--calls", type=int, default=6)
    ap.add_argument("--config", action="append", default=[], help="KEY=VALUE override of the kernel config")
    args = ap.parse_args()
    dev = torch.device("cuda")
    cfg = B.PRESETS["h100"]
    h, kvh, d, dtype = cfg["heads"], cfg["kv_heads"], cfg["head_dim"], getattr(torch, cfg["dtype"])
    over = B._parse_config(",".join(args.config))  # the benchmark's KEY=VALUE parser (Python literals)
    for _family, name, (parents, lens, queries) in B.workloads("h100", quick=False):
        if args.only and not any(o in name for o in args.only):
            continue
        L = sum(lens)
        gen = torch.Generator(device="cpu").manual_seed(L)
        slots = torch.randperm(L + 64, generator=gen)[:L].to(dev)
        layout = K.layout_from_tree(parents, lens, slots, queries)
        q = torch.randn(layout.num_queries, h, d, device=dev, dtype=dtype)
        k_cache = torch.randn(L + 64, kvh, d, device=dev, dtype=dtype)
        v_cache = torch.randn(L + 64, kvh, d, device=dev, dtype=dtype)
        plan = K.plan_tree_attention(layout, h, kvh, d, dtype, config=over or None)
        ref = K.tree_attention_reference(q.float(), k_cache.float(), v_cache.float(), layout, d**-0.5)
        for _ in range(args.calls):
            out = K.tree_attention(q, k_cache, v_cache, layout, d**-0.5, plan)
        torch.cuda.synchronize()
        err = (out.float() - ref).abs().max().item()
        print(f"{name}: {plan} max err {err:.2e} config {over}", flush=True)


if __name__ == "__main__":
    main()
