"""Config sweep of reldl.kernels.tree_attention on the DeFT workloads of bench_tree_attention.py (GPU only).

    python benchmarks/sweep_tree_attention.py --out DIR [--only SUBSTR] [--budget SECONDS] [--jobs N]

Per case, three stages: (A) tile configs (key tile, wide tile height, warps, stages, register cap, dense items, K/V
prefetch) with the default chunking; (B) the two best tiles of A x chunking knobs (PARTIAL_FACTOR, MAX_CHUNK,
MIN_CHUNK, PROGRAMS_PER_SM, FULL_WAVES); (C) merge tiles at the best of B. Every config is checked against the
float32 reference (max abs error <= 1e-2, else rejected) and timed as the median of CUDA-graph replays (a graph of 10
calls, 10 timed replays, same inputs: L2-warm like the bench). The kernels of stage A are compiled beforehand by
--jobs worker processes (Triton's disk cache), so the sweep itself does not wait on the compiler. Writes
DIR/sweep.json (every measurement) and prints, per case, the old default (DENSE off), the current default, the best
config and its phase-1 time.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_tree_attention", HERE / "bench_tree_attention.py")
B = importlib.util.module_from_spec(_spec)
sys.modules["bench_tree_attention"] = B
_spec.loader.exec_module(B)
TA = importlib.import_module("reldl.kernels.tree_attention")
K = B.K

H, KVH, D, DTYPE = 32, 8, 128, torch.float16


def tile_grid() -> list[dict]:
    out = []
    for bm in (64, 128):
        for bn in (32, 64):
            for w in (4, 8):
                for st in (2, 3):
                    for dense in (True, False):
                        out.append(dict(BLOCK_M_WIDE=bm, BLOCK_N=bn, num_warps=w, num_stages=st, DENSE=dense))
    for st in (2, 3):
        for dense in (True, False):
            out.append(dict(BLOCK_M_WIDE=64, BLOCK_N=32, num_warps=4, num_stages=st, DENSE=dense, maxnreg=128))
    for dense in (True, False):
        out.append(dict(BLOCK_M_WIDE=64, BLOCK_N=32, num_warps=4, num_stages=1, DENSE=dense, PREFETCH_KV=True))
        out.append(dict(BLOCK_M_WIDE=128, BLOCK_N=128, num_warps=8, num_stages=2, DENSE=dense))
        out.append(dict(BLOCK_M_WIDE=64, BLOCK_M_NARROW=32, BLOCK_N=32, num_warps=4, num_stages=3, DENSE=dense))
    return out


def chunk_grid() -> list[dict]:
    return [
        dict(PARTIAL_FACTOR=pf, MAX_CHUNK=mx, MIN_CHUNK=mn, PROGRAMS_PER_SM=ps, FULL_WAVES=fw)
        for pf in (1, 2, 4)
        for mx in (512, 1024, 2048, 4096)
        for mn in (64, 128)
        for ps in (2, 3, 4)
        for fw in (False, True)
    ]


MERGE_GRID = [
    dict(MERGE_HEADS=hm, merge_warps=w) for hm, w in ((1, 1), (2, 1), (4, 1), (4, 2), (8, 2), (8, 4), (32, 4))
]


def gtime(fn, reps: int = 10, iters: int = 10) -> float:
    """Microseconds per call: median over `iters` replays of a CUDA graph of `reps` calls."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(iters):
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) / reps)
    del g
    return statistics.median(ts) * 1e3


class Case:
    def __init__(self, family, name, tree, dev):
        parents, lens, queries = tree
        L = sum(lens)
        gen = torch.Generator(device="cpu").manual_seed(L)
        n = L + 64
        slots = torch.randperm(n, generator=gen)[:L].to(dev)
        self.family, self.name = family, name
        self.layout = K.layout_from_tree(parents, lens, slots, queries)
        self.q = torch.randn(self.layout.num_queries, H, D, device=dev, dtype=DTYPE)
        self.k = torch.randn(n, KVH, D, device=dev, dtype=DTYPE)
        self.v = torch.randn(n, KVH, D, device=dev, dtype=DTYPE)
        self.scale = D**-0.5
        self.ref = K.tree_attention_reference(self.q.float(), self.k.float(), self.v.float(), self.layout, self.scale)

    def plan(self, config: dict):
        return K.plan_tree_attention(self.layout, H, KVH, D, DTYPE, config=config)

    def measure(self, config: dict, phase1: bool = False) -> dict:
        rec = dict(config=config)
        try:
            plan = self.plan(config)
            rec["plan"] = dict(chunks=plan.num_chunks, items=plan.num_items, partials=plan.num_partials)

            def fn():
                return K.tree_attention(self.q, self.k, self.v, self.layout, self.scale, plan)

            out = fn()
            torch.cuda.synchronize()
            err = (out.float() - self.ref).abs().max().item()
            rec["err"] = err
            if not err <= 1e-2:
                rec["error"] = f"max abs error {err}"
                return rec
            rec["us"] = gtime(fn)
            if phase1 and not plan.direct:
                lse = torch.empty((plan.num_partials, H), dtype=torch.float32, device=self.q.device)
                po = torch.empty((plan.num_partials, H, D), dtype=DTYPE, device=self.q.device)
                rec["phase1_us"] = gtime(
                    lambda: TA._launch_phase1(self.q, self.k, self.v, self.layout, self.scale, plan, lse, po)
                )
        except Exception as e:  # a config the compiler or the card refuses: recorded, not fatal
            rec["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        return rec


def precompile(index: int, jobs: int) -> None:
    """Worker: compile this worker's share of the tile and merge configs on a small tree (same strides)."""
    dev = torch.device("cuda")
    case = Case("few-shot", "small", B.fewshot_tree(300, 6, 40), dev)
    spec = Case("spec", "small spec", B.spec_tree(200, 64), dev)
    work = tile_grid() + MERGE_GRID
    for i, cfg in enumerate(work):
        if i % jobs != index:
            continue
        for c in (case, spec):
            rec = c.measure(cfg)
            if "error" in rec:
                print(f"precompile {c.name} {cfg}: {rec['error']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--only", default="")
    ap.add_argument("--budget", type=float, default=330.0, help="stop starting new cases after this many seconds")
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--precompile", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.precompile:
        i, n = map(int, args.precompile.split("/"))
        precompile(i, n)
        return
    t_start = time.time()
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}", flush=True)
    if args.jobs > 0:
        env = dict(os.environ)
        procs = [
            subprocess.Popen([sys.executable, __file__, "--precompile", f"{i}/{args.jobs}"], env=env)
            for i in range(args.jobs)
        ]
        for p in procs:
            p.wait()
        print(f"[{time.time() - t_start:5.0f}s] precompiled", flush=True)
    bw = B.hbm_bandwidth(dev)
    B._free(dev)
    rate = B.matmul_rate(dev)
    B._free(dev)
    print(f"HBM {bw / 1e12:.2f} TB/s, fp16 matmul {rate / 1e12:.0f} TFLOP/s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = dict(device=torch.cuda.get_device_name(dev), bw=bw, rate=rate, cases=[])
    tiles, chunks = tile_grid(), chunk_grid()
    for family, name, tree in B.workloads("h100", False):
        if args.only and args.only not in name:
            continue
        if time.time() - t_start > args.budget:
            print(f"budget: skipping {name}", flush=True)
            continue
        c = Case(family, name, tree, dev)
        L, Q = c.layout.num_tokens, c.layout.num_queries
        io = (L * KVH * D * 2 + 2 * Q * H * D) * 2
        floor = io / bw * 1e6
        cfloor = 4 * int(c.layout.visible().sum()) * H * D / rate * 1e6
        target = max(2 * max(floor, cfloor), 15.0)
        row = dict(case=name, family=family, floor_us=floor, compute_floor_us=cfloor, target_us=target)
        row["old"] = c.measure(dict(DENSE=False), phase1=True)
        row["default"] = c.measure({}, phase1=True)
        row["A"] = [c.measure(t) for t in tiles]
        okA = sorted((r for r in row["A"] if "us" in r), key=lambda r: r["us"])
        row["B"] = []
        for best in okA[:2]:
            row["B"] += [c.measure(dict(best["config"], **ch)) for ch in chunks]
        okB = sorted((r for r in row["B"] + okA[:1] if "us" in r), key=lambda r: r["us"])
        row["C"] = [c.measure(dict(okB[0]["config"], **m)) for m in MERGE_GRID] if okB else []
        allok = sorted((r for r in row["A"] + row["B"] + row["C"] if "us" in r), key=lambda r: r["us"])
        if allok:
            row["best"] = c.measure(allok[0]["config"], phase1=True)
        results["cases"].append(row)
        (out / "sweep.json").write_text(json.dumps(results, indent=1, default=str))
        o, d, b = row["old"], row["default"], row.get("best", {})
        print(
            f"[{time.time() - t_start:5.0f}s] {name:<28} target {target:6.1f} | old {o.get('us', -1):6.1f}"
            f" (p1 {o.get('phase1_us', -1):5.1f}) | default {d.get('us', -1):6.1f} | best {b.get('us', -1):6.1f}"
            f" (p1 {b.get('phase1_us', -1):5.1f}) {b.get('config')} {b.get('plan')}",
            flush=True,
        )
    # which single configs do well across cases (ratio to each case's best, worst case first)
    (out / "sweep.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"done in {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
