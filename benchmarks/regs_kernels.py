"""Registers, spills and software-pipelined loads of kernel variants, compiled for sm_90 on this machine (no GPU).

Why: the tree-attention phase 1 and the batch-1 sparse MLP kernels are latency-bound, so their occupancy (set by
registers) and whether their loops keep loads in flight decide their speed, and a local compile answers "what would
this variant take" in seconds, without a device session. Arguments get the divisibility hints the launcher gives
aligned pointers, strides and sizes (without them every element is loaded on its own and the counts are
meaningless). Needs a Triton build with the NVIDIA backend (its bundled cuobjdump).

    python3 benchmarks/regs_kernels.py [--only tree|sparse] [--out benchmarks/out/regs_kernels.json]
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TYPES = {"q_ptr": "*fp16", "k_ptr": "*fp16", "v_ptr": "*fp16", "lse_ptr": "*fp32", "o_ptr": "*fp16", "qk_scale": "fp32"}
BASE = dict(  # Llama-3-8B heads (32 query, 8 KV, head dim 128), fp16: the DeFT workloads' shape
    NUM_KV_HEADS=8, NUM_HEADS=32, GROUP=4, HEAD_DIM=128, BLOCK_M_NARROW=16, BLOCK_M_WIDE=64, BLOCK_G=4, BLOCK_D=128,
    BLOCK_N=64, DOT_PREC="tf32", WRITE_LSE=True, EARLY_V=False, PREFETCH=True, PREFETCH_KV=False, KV_FAST=True,
    USE_DENSE=False, PDL=False, OFFS32=True,
)  # fmt: skip
TREE_VARIANTS = [  # (name, warps, stages, overrides)
    ("default (64-row wide, 16-row narrow tiles)", 4, 3, {}),
    ("32-key tiles", 4, 3, dict(BLOCK_N=32)),
    ("128-row wide tiles, 8 warps", 8, 3, dict(BLOCK_M_WIDE=128)),
    ("64-bit K/V offsets", 4, 3, dict(OFFS32=False)),
]


# the batch-1 ReLU MLP's kernels at OPT-13B 5% (d 5120, 1024 neurons): kernel 1's "gemv_small" tile, kernel 2's
SPARSE_TYPES = {"x_ptr": "*fp16", "w_ptr": "*fp16", "w2_ptr": "*fp16", "a_ptr": "*fp32", "out_ptr": "*fp32",
                "y_ptr": "*fp16", "threshold": "fp32", "a_bias_ptr": "*fp16", "bias_ptr": "*fp16"}  # fmt: skip
UP = dict(HAS_BIAS=False, ACT=0, FINAL=False, BLOCK_B=1, BLOCK_N=8, BLOCK_D=512, DOT_PREC="ieee", PDL=True)
DOWN = dict(
    A_MODE=2, A_SPLITS=5, A_ACT=1, HAS_A_BIAS=True, THRESH=False, SKIP_ZERO_ROWS=False, DUAL=False, DIRECT=False,
    HAS_BIAS=False, K_PTR=False, BLOCK_B=1, BLOCK_K=128, BLOCK_N=64, DOT_PREC="ieee", PDL=True, RED_IN=False, RED_P=16,
    RED_C=64, PREFETCH_L2=True, LINE=64,
)  # fmt: skip
SPARSE_VARIANTS = [  # (name, kernel, warps, stages, constexprs)
    ("kernel 1 (default)", "_rows_dot_kernel", 8, 3, UP),
    ("kernel 1, loop in 3 stages", "_rows_dot_kernel", 8, 3, dict(UP, LOOP_STAGES=3)),
    ("kernel 2 (default: 128 x 64, 2 warps)", "_gather_matmul_kernel", 2, 3, DOWN),
    ("kernel 2, loop in 3 stages", "_gather_matmul_kernel", 2, 3, dict(DOWN, LOOP_STAGES=3)),
    ("kernel 2, STEP_SUM", "_gather_matmul_kernel", 2, 3, dict(DOWN, STEP_SUM=True)),
    ("kernel 2, STEP_SUM, 3 stages", "_gather_matmul_kernel", 2, 3, dict(DOWN, STEP_SUM=True, LOOP_STAGES=3)),
    ("kernel 2, 64 x 128, 4 warps", "_gather_matmul_kernel", 4, 3, dict(DOWN, BLOCK_K=64, BLOCK_N=128)),
    (
        "kernel 2, 64 x 128, 4 warps, STEP_SUM",
        "_gather_matmul_kernel",
        4,
        3,
        dict(DOWN, BLOCK_K=64, BLOCK_N=128, STEP_SUM=True),
    ),
]
# integer arguments hinted as multiples of 16 (they are here)
SIZES = ("B", "k", "d", "d_per_split", "N", "n_red")


def resources(fn, const: dict, warps: int, stages: int, types: dict = TYPES) -> dict:
    """cuobjdump's REG / STACK / SHARED of the kernel compiled for sm_90 with these constexprs, and how many of its
    loads were turned into asynchronous (software-pipelined) copies."""
    const = dict({p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **const)
    idx = {n: i for i, n in enumerate(fn.arg_names)}
    sig = {n: "constexpr" if n in const else types.get(n, "*i32" if n.endswith("_ptr") else "i32") for n in idx}
    hinted = [n for n in idx if n not in const and (n.endswith("_ptr") or n.startswith("stride_") or n in SIZES[2:])]
    src = ASTSource(
        fn,
        sig,
        constexprs={(idx[k],): v for k, v in const.items()},
        attrs={(idx[n],): [["tt.divisibility", 16]] for n in hinted},
    )
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in text.splitlines() if "REG:" in ln)
    fields = dict(part.split(":") for part in line.split() if ":" in part)
    out = {k.lower(): int(fields[k]) for k in ("REG", "STACK", "SHARED")}
    out["async_copies"] = compiled.asm["ttgir"].count("async_copy_global_to_local")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("tree", "sparse"), default=None)
    ap.add_argument("--out", default="benchmarks/out/regs_kernels.json")
    args = ap.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    jobs = []
    if args.only in (None, "tree"):
        tree = importlib.import_module("reldl.kernels.tree_attention")._tree_attention_kernel
        jobs += [("tree", name, tree, w, st, dict(BASE, **over), TYPES) for name, w, st, over in TREE_VARIANTS]
    if args.only in (None, "sparse"):
        sm = importlib.import_module("reldl.kernels.sparse_mlp")
        jobs += [("sparse", name, getattr(sm, k), w, st, c, SPARSE_TYPES) for name, k, w, st, c in SPARSE_VARIANTS]
    rows = []
    print(
        f"{'kernel':7s} {'variant':44s} {'warps':>5s} {'regs':>5s} {'spill B':>7s} {'programs/SM':>11s} {'async':>5s}"
    )
    for group, name, fn, warps, stages, const, types in jobs:
        r = resources(fn, const, warps, stages, types)
        per_sm = min(32, 65536 // (max(r["reg"], 1) * 32 * warps))  # by registers alone (shared memory is small)
        rows.append(dict(kernel=group, variant=name, num_warps=warps, num_stages=stages, programs_per_sm=per_sm, **r))
        print(f"{group:7s} {name:44s} {warps:5d} {r['reg']:5d} {r['stack']:7d} {per_sm:11d} {r['async_copies']:5d}")
    out = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        triton=triton.__version__,
        target="sm_90 (compiled locally)",
        rows=rows,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
