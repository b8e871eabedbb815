"""Side-by-side variants of the contextual-sparsity MLP kernels (issue 7) against dense torch, in one GPU run.

    python benchmarks/sweep_sparse_mlp.py [--out sweep.json] [--rep 30] [--quick] [--only tiles|teal] [--combos]

ReLU (DejaVu) at batch 1 on the OPT shapes: the three-kernel path with its tiles, programs per SM and split-K bound
changed one at a time (TILE_VARIANTS) or in combinations (TILE_COMBOS, `--combos`). The one-launch fused batch-1
kernel this script also swept was removed (1.3-1.8x slower: RESULTS.md). TEAL (SwiGLU, Llama-2-7B) at batch 1, 4,
16: the older row-walking kernel, the compacted path with a few tile settings, and the thresholded dense fallback.
Same method as bench_sparse_mlp.py: CUDA-graph medians (triton do_bench_cudagraph), each timed call cycling through
up to 16 disjoint neuron sets / inputs so no call finds its rows in L2; dense baseline in the same run. Every variant
is first checked in float16 against the float32 reference (scaled error printed).
"""

# ruff: noqa: B023  (the lambdas run inside the loop iteration that made them)
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

import reldl.kernels as K

SM = importlib.import_module("reldl.kernels.sparse_mlp")
ROT = 16
TOL = 5e-3

RELU_SHAPES = {"opt-13b": (5120, 20480), "opt-30b": (7168, 28672), "opt-175b": (12288, 49152)}
# the batch-1 ReLU path (kernels 1-3, PDL): its tiles, programs per SM and split-K bound, one change at a time
# from the defaults, then a few combinations (`--only tiles`)
TILE_VARIANTS = {
    "current": {},
    "default": {},
    "up n4": {"up": {"BLOCK_N": 4}},
    "up n16": {"up": {"BLOCK_N": 16}},
    "up d256": {"up": {"BLOCK_D": 256}},
    "up d1024": {"up": {"BLOCK_D": 1024}},
    "up w2": {"up": {"num_warps": 2}},
    "up w8": {"up": {"num_warps": 8}},
    "up s2": {"up": {"num_stages": 2}},
    "up s4": {"up": {"num_stages": 4}},
    "down k32": {"down": {"BLOCK_K": 32}},
    "down k128": {"down": {"BLOCK_K": 128}},
    "down n64": {"down": {"BLOCK_N": 64}},
    "down n256": {"down": {"BLOCK_N": 256}},
    "down w8": {"down": {"num_warps": 8}},
    "down w2": {"down": {"num_warps": 2}},
    "down s2": {"down": {"num_stages": 2}},
    "down s4": {"down": {"num_stages": 4}},
    "pps2": {"attrs": {"PROGRAMS_PER_SM": 2}},
    "pps8": {"attrs": {"PROGRAMS_PER_SM": 8}},
    "pf4": {"attrs": {"PARTIAL_FRACTION": 4}},
    "pf16": {"attrs": {"PARTIAL_FRACTION": 16}},
    "pps8 pf4": {"attrs": {"PROGRAMS_PER_SM": 8, "PARTIAL_FRACTION": 4}},
    "up n16 d1024 w8": {"up": {"BLOCK_N": 16, "BLOCK_D": 1024, "num_warps": 8}},
    "down k32 n256 w8": {"down": {"BLOCK_K": 32, "BLOCK_N": 256, "num_warps": 8}},
    "down k128 n64": {"down": {"BLOCK_K": 128, "BLOCK_N": 64}},
    "no pdl": {"attrs": {"PDL_RELU_MAX_BATCH": 0}},
}
# combinations of the singles that won on the H200 (2026-11-27 sweep: down k128 n64, down w2, up w8, up n16)
TILE_COMBOS = {
    "current": {},
    "default": {},
    "down k128 n64": {"down": {"BLOCK_K": 128, "BLOCK_N": 64}},
    "down k128 n64 w2": {"down": {"BLOCK_K": 128, "BLOCK_N": 64, "num_warps": 2}},
    "down k128 n64 + up w8": {"down": {"BLOCK_K": 128, "BLOCK_N": 64}, "up": {"num_warps": 8}},
    "down k128 n64 w2 + up w8": {"down": {"BLOCK_K": 128, "BLOCK_N": 64, "num_warps": 2}, "up": {"num_warps": 8}},
    "down k128 n64 w2 + up n16 w8": {
        "down": {"BLOCK_K": 128, "BLOCK_N": 64, "num_warps": 2},
        "up": {"BLOCK_N": 16, "num_warps": 8},
    },
    "down k128 w2": {"down": {"BLOCK_K": 128, "num_warps": 2}},
    "down k256 n64": {"down": {"BLOCK_K": 256, "BLOCK_N": 64}},
    "down k256 n32 w2": {"down": {"BLOCK_K": 256, "BLOCK_N": 32, "num_warps": 2}},
    "down k128 n32 w2": {"down": {"BLOCK_K": 128, "BLOCK_N": 32, "num_warps": 2}},
    "down k64 n64 w2": {"down": {"BLOCK_K": 64, "BLOCK_N": 64, "num_warps": 2}},
    "down k128 n64 w2 pps2": {"down": {"BLOCK_K": 128, "BLOCK_N": 64, "num_warps": 2}, "attrs": {"PROGRAMS_PER_SM": 2}},
    "down k128 n64 w2 pps8": {"down": {"BLOCK_K": 128, "BLOCK_N": 64, "num_warps": 2}, "attrs": {"PROGRAMS_PER_SM": 8}},
    "down w2 + up w8": {"down": {"num_warps": 2}, "up": {"num_warps": 8}},
    # no split-K in kernel 2 (so no reduce launch): the column blocks alone fill the GPU
    "nosplit k128 n32 w2": {
        "down": {"BLOCK_K": 128, "BLOCK_N": 32, "num_warps": 2},
        "attrs": {"PARTIAL_FRACTION": 1e9},
    },
    "nosplit k128 n32 w4": {"down": {"BLOCK_K": 128, "BLOCK_N": 32}, "attrs": {"PARTIAL_FRACTION": 1e9}},
    "nosplit k128 n16 w2": {
        "down": {"BLOCK_K": 128, "BLOCK_N": 16, "num_warps": 2},
        "attrs": {"PARTIAL_FRACTION": 1e9},
    },
    "nosplit k64 n32 w2": {"down": {"BLOCK_K": 64, "BLOCK_N": 32, "num_warps": 2}, "attrs": {"PARTIAL_FRACTION": 1e9}},
    "nosplit k128 n64 w2": {
        "down": {"BLOCK_K": 128, "BLOCK_N": 64, "num_warps": 2},
        "attrs": {"PARTIAL_FRACTION": 1e9},
    },
    "nosplit k128 n32 w2 + up w8": {
        "down": {"BLOCK_K": 128, "BLOCK_N": 32, "num_warps": 2},
        "up": {"num_warps": 8},
        "attrs": {"PARTIAL_FRACTION": 1e9},
    },
    "nosplit k128 n32 w2 + up n4 pps1": {
        "down": {"BLOCK_K": 128, "BLOCK_N": 32, "num_warps": 2},
        "up": {"BLOCK_N": 4},
        "attrs": {"PARTIAL_FRACTION": 1e9, "PROGRAMS_PER_SM": 1},
    },
    # kernel 2 reading longer row segments (profile_sparse_mlp: kernel 2 is at 1.2 TB/s where kernel 1 reaches 1.9)
    "down k16 n512": {"down": {"BLOCK_K": 16, "BLOCK_N": 512}},
    "down k16 n512 w8": {"down": {"BLOCK_K": 16, "BLOCK_N": 512, "num_warps": 8}},
    "down k8 n1024 w8": {"down": {"BLOCK_K": 8, "BLOCK_N": 1024, "num_warps": 8}},
    "down k32 n512 w8": {"down": {"BLOCK_K": 32, "BLOCK_N": 512, "num_warps": 8}},
    "down k16 n256 w4": {"down": {"BLOCK_K": 16, "BLOCK_N": 256}},
    "down k32 n256 w4": {"down": {"BLOCK_K": 32, "BLOCK_N": 256}},
    "k128 n64 w2 + up w8 pf2": {
        "down": {"BLOCK_K": 128, "BLOCK_N": 64, "num_warps": 2},
        "up": {"num_warps": 8},
        "attrs": {"PARTIAL_FRACTION": 2},
    },
}
TEAL_VARIANTS = {
    "walk (old)": {"TEAL_COMPACT": False, "TEAL_MAX_SPARSE_BATCH": 1 << 20},
    "compact": {"TEAL_MAX_SPARSE_BATCH": 1 << 20},
    "compact k32n256": {"TEAL_MAX_SPARSE_BATCH": 1 << 20, "gemv": {"BLOCK_K": 32, "BLOCK_N": 256}},
    "compact k128n64": {"TEAL_MAX_SPARSE_BATCH": 1 << 20, "gemv": {"BLOCK_K": 128, "BLOCK_N": 64}},
    "compact w8": {"TEAL_MAX_SPARSE_BATCH": 1 << 20, "gemv": {"num_warps": 8}, "dot": {"num_warps": 8}},
    "compact pps8": {"TEAL_MAX_SPARSE_BATCH": 1 << 20, "PROGRAMS_PER_SM": 8},
    "compact dot k64": {"TEAL_MAX_SPARSE_BATCH": 1 << 20, "dot": {"BLOCK_K": 64}},
    "dense fallback": {"TEAL_MAX_SPARSE_BATCH": 0},
}


class patched:
    """Temporarily set module attributes / DOWN_TILES / UP_TILES entries."""

    def __init__(self, attrs=None, tiles=None, up=None):
        self.attrs, self.tiles, self.up = attrs or {}, tiles or {}, up or {}

    def __enter__(self):
        self.old = (
            {a: getattr(SM, a) for a in self.attrs},
            {k: dict(v) for k, v in SM.DOWN_TILES.items()},
            {k: dict(v) for k, v in SM.UP_TILES.items()},
        )
        for a, v in self.attrs.items():
            setattr(SM, a, v)
        for path, upd in self.tiles.items():
            SM.DOWN_TILES[path] = dict(SM.DOWN_TILES[path], **upd)
        for path, upd in self.up.items():
            SM.UP_TILES[path] = dict(SM.UP_TILES[path], **upd)

    def __exit__(self, *exc):
        attrs, tiles, up = self.old
        for a, v in attrs.items():
            setattr(SM, a, v)
        SM.DOWN_TILES.clear()
        SM.DOWN_TILES.update(tiles)
        SM.UP_TILES.clear()
        SM.UP_TILES.update(up)


def bench(fns, rep):
    def run_all():
        for f in fns:
            f()

    return triton.testing.do_bench_cudagraph(run_all, rep=rep, return_mode="median") / len(fns)


def scaled_err(got, want):
    return ((got.float() - want.float()).abs() / (1 + want.float().abs())).max().item()


def rand(*shape, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).half()


def relu_row(name, kind, density, variant, dense, ms, err, elements, **extra) -> dict:
    """One batch-1 ReLU measurement (fp16: 2 bytes per element of the two matrices' selected rows)."""
    return dict(
        shape=name,
        kind=kind,
        batch=1,
        density=density,
        variant=variant,
        dense_ms=dense,
        ms=ms,
        speedup=dense / ms,
        target=0.6 / density,
        err=err,
        gbps=2 * elements * 2 / ms / 1e6,
        **extra,
    )


def relu_case(d: int, n: int, rep: int):
    """Random fp16 weights of one ReLU MLP shape, a neuron permutation, ROT batch-1 inputs, and the dense time."""
    torch.manual_seed(0)
    w1, b1 = rand(n, d, scale=d**-0.5), rand(n, scale=0.1)
    w2t, b2 = rand(n, d, scale=n**-0.5), rand(d, scale=0.1)
    perm = torch.randperm(n, device="cuda").to(torch.int32)
    xs = [rand(1, d) for _ in range(ROT)]
    dense = bench([lambda x=x: F.linear(F.relu(F.linear(x, w1, b1)), w2t.t(), b2) for x in xs[:2]], rep)
    return w1, b1, w2t, b2, perm, xs, dense


def tiles_sweep(args, rows):
    """The batch-1 ReLU path (kernels 1-3) under TILE_VARIANTS (or TILE_COMBOS): every variant checked (float16 vs
    the float32 reference) and timed on the same neuron sets."""
    cases = [("opt-13b", 0.05), ("opt-13b", 0.1), ("opt-30b", 0.05), ("opt-175b", 0.05)]
    for name in dict.fromkeys(c[0] for c in cases):
        d, n = RELU_SHAPES[name]
        w1, b1, w2t, b2, perm, xs, dense = relu_case(d, n, args.rep)
        for density in [c[1] for c in cases if c[0] == name]:
            k = round(density * n)
            m = max(1, min(ROT, n // k))
            sets = [perm[i * k : (i + 1) * k] for i in range(m)]
            want = K.sparse_mlp_reference(xs[0], w1, b1, w2t, b2, sets[0])
            line = f"{name:<9} relu B=1 {density:>4.0%} dense {dense * 1e3:7.1f} us target {0.6 / density:4.1f}x |"
            for vname, over in (TILE_COMBOS if args.combos else TILE_VARIANTS).items():
                # a variant's tiles are changes to the "gemv" tiles, used for every selection size ("current": the
                # module's own choice, "gemv_small" for small selections)
                base_down, base_up = SM.DOWN_TILES["gemv"], SM.UP_TILES["gemv"]
                down, up = dict(base_down, **over.get("down", {})), dict(base_up, **over.get("up", {}))
                tiles, ups = ({}, {}) if vname == "current" else ({"gemv_small": down}, {"gemv_small": up})
                if vname != "current":
                    tiles["gemv"], ups["gemv"] = down, up
                with patched(attrs=over.get("attrs"), tiles=tiles, up=ups):
                    try:
                        err = scaled_err(K.sparse_mlp(xs[0], w1, b1, w2t, b2, sets[0]), want)
                        ms = bench(
                            [lambda x=x, s=s: K.sparse_mlp(x, w1, b1, w2t, b2, s) for x, s in zip(xs, sets)], args.rep
                        )
                    except Exception as e:  # a tile the compiler refuses: noted, the sweep goes on
                        print(f"  {vname}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                        continue
                rows.append(relu_row(name, "relu-tiles", density, vname, dense, ms, err, k * d))
                line += f" {vname} {ms * 1e3:5.1f}us {dense / ms:5.2f}x{'' if err <= TOL else '!'} |"
            print(line, flush=True)
        w1 = w2t = None
        torch.cuda.empty_cache()


def quantile_threshold(v, density):
    return torch.quantile(v.float().abs().flatten()[: 1 << 20], 1 - density).item()


def teal_sweep(args, rows):
    d, n = 4096, 11008
    torch.manual_seed(1)
    wg, wu, wd = rand(d, n, scale=d**-0.5), rand(d, n, scale=d**-0.5), rand(n, d, scale=n**-0.5)

    def dense_fn(x):
        return F.linear(F.silu(F.linear(x, wg.t())) * F.linear(x, wu.t()), wd.t())

    densities = [0.1, 0.5] if args.quick else [0.05, 0.1, 0.2, 0.5]
    for batch in (1, 4, 16):
        xs = [rand(batch, d) for _ in range(ROT)]
        dense = bench([lambda x=x: dense_fn(x) for x in xs[:2]], args.rep)
        calib_h = K.teal_gate_up_reference(torch.cat(xs[:4]), wg, wu, None)
        for density in densities:
            t_in = quantile_threshold(torch.cat(xs[:4]), density)
            t_mid = quantile_threshold(calib_h, density)
            m = max(1, min(ROT, int(1 / density)))
            union = statistics.mean((x.abs() > t_in).any(0).float().mean().item() for x in xs[:m])
            want = K.sparse_swiglu_mlp_reference(xs[0], wg, wu, wd, t_in, t_mid)
            line = f"llama-2-7b teal B={batch:<2} {density:>4.0%} (union {union:4.0%}) dense {dense * 1e3:6.1f} us |"
            for vname, over in TEAL_VARIANTS.items():
                over = dict(over)
                tiles = {p: over.pop(p) for p in ("gemv", "dot") if p in over}
                with patched(attrs=over, tiles=tiles):
                    err = scaled_err(K.sparse_swiglu_mlp(xs[0], wg, wu, wd, t_in, t_mid), want)
                    ms = bench([lambda x=x: K.sparse_swiglu_mlp(x, wg, wu, wd, t_in, t_mid) for x in xs[:m]], args.rep)
                rows.append(
                    dict(
                        shape="llama-2-7b",
                        kind="swiglu-teal",
                        batch=batch,
                        density=density,
                        union_in=union,
                        variant=vname,
                        dense_ms=dense,
                        ms=ms,
                        speedup=dense / ms,
                        err=err,
                        target=1.3 if (batch == 1 and density == 0.5) else (1.0 if batch > 1 else None),
                    )
                )
                line += f" {vname} {ms * 1e3:6.1f}us {dense / ms:5.2f}x{'' if err <= TOL else '!'} |"
            print(line, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/out/sweep_sparse_mlp.json")
    ap.add_argument("--rep", type=int, default=30)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--combos", action="store_true", help="the ReLU tiles sweep: TILE_COMBOS instead of TILE_VARIANTS")
    ap.add_argument(
        "--only", choices=["tiles", "teal"], default=None, help="only the ReLU tiles sweep or only TEAL (default: both)"
    )
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.cuda.get_device_name()
    print(f"{dev}, torch {torch.__version__}, triton {triton.__version__}, SMs {SM.num_sms(torch.device('cuda'))}")
    rows, t0 = [], time.time()
    if args.only != "teal":
        tiles_sweep(args, rows)
        print(f"relu tiles sweep {time.time() - t0:.0f} s", flush=True)
    if args.only != "tiles":
        teal_sweep(args, rows)
    print(f"sweep {time.time() - t0:.0f} s")
    with open(args.out, "w") as f:
        json.dump(
            dict(
                device=dev,
                torch=torch.__version__,
                triton=triton.__version__,
                rows=rows,
                down_tiles=SM.DOWN_TILES,
            ),
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
