"""Registers and spills of the tree-attention phase-1 kernel per variant, compiled for sm_90 on this machine (no GPU).

Why: occupancy of phase 1 is set by its registers (ncu on the H100: 225 per thread, 2 programs per SM), and a local
compile answers "what would this variant take" in seconds, without a device session. Arguments get the divisibility
hints the launcher gives aligned pointers and strides (without them every K/V element is loaded on its own and the
counts are meaningless). Needs a Triton build with the NVIDIA backend (its bundled cuobjdump).

    python3 benchmarks/regs_tree_attention.py [--out benchmarks/out/regs_tree_attention.json]
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
    USE_DENSE=False, PDL=False, OFFS32=True, TILES=0,
)  # fmt: skip
VARIANTS = [  # (name, warps, stages, overrides)
    ("one kernel, both tile heights (default)", 4, 3, {}),
    ("wide tiles only (SPLIT_TILES)", 4, 3, dict(TILES=1)),
    ("narrow tiles only (SPLIT_TILES)", 4, 3, dict(TILES=2)),
    ("wide only, 8 warps (WIDE_WARPS=8)", 8, 3, dict(TILES=1)),
    ("both, 32-key tiles", 4, 3, dict(BLOCK_N=32)),
    ("wide only, 32-key tiles", 4, 3, dict(TILES=1, BLOCK_N=32)),
    ("narrow only, 32-key tiles", 4, 3, dict(TILES=2, BLOCK_N=32)),
    ("wide only, 128 rows, 8 warps", 8, 3, dict(TILES=1, BLOCK_M_WIDE=128)),
    ("both, 64-bit K/V offsets", 4, 3, dict(OFFS32=False)),
]


def resources(fn, const: dict, warps: int, stages: int) -> dict:
    """cuobjdump's REG / STACK / SHARED of the kernel compiled for sm_90 with these constexprs."""
    idx = {n: i for i, n in enumerate(fn.arg_names)}
    sig = {n: "constexpr" if n in const else TYPES.get(n, "*i32" if n.endswith("_ptr") else "i32") for n in idx}
    hinted = [n for n in idx if n.endswith("_ptr") or n.startswith("stride_")]
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
    return {k.lower(): int(fields[k]) for k in ("REG", "STACK", "SHARED")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/out/regs_tree_attention.json")
    args = ap.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    fn = importlib.import_module("reldl.kernels.tree_attention")._tree_attention_kernel
    rows = []
    print(f"{'variant':44s} {'warps':>5s} {'regs':>5s} {'spill B':>7s} {'programs/SM':>11s}")
    for name, warps, stages, over in VARIANTS:
        r = resources(fn, dict(BASE, **over), warps, stages)
        per_sm = 65536 // (max(r["reg"], 1) * 32 * warps)  # by registers alone (the kernel's shared memory is small)
        rows.append(dict(variant=name, num_warps=warps, num_stages=stages, overrides=over, programs_per_sm=per_sm, **r))
        print(f"{name:44s} {warps:5d} {r['reg']:5d} {r['stack']:7d} {per_sm:11d}")
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
