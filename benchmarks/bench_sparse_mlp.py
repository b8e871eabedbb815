"""Contextual-sparsity MLP kernels (issue 7) against the dense torch MLP, at OPT and Llama-2 MLP shapes.

    python benchmarks/bench_sparse_mlp.py                # GPU: the full grid, JSON to benchmarks/out/sparse_mlp.json
    python benchmarks/bench_sparse_mlp.py --preset cpu   # tiny shapes in the Triton interpreter (smoke test)
    python benchmarks/bench_sparse_mlp.py --shapes opt-13b --batches 1 --densities 0.05 0.5

ReLU MLPs (OPT-13B / 30B / 175B: d x n = 5120 x 20480, 7168 x 28672, 12288 x 49152), DejaVu style: `sparse_mlp` with
an index of k = density * n neurons (random, unsorted) reads k rows of W1 and of W2t; the dense baseline is
F.linear -> relu -> F.linear over the full weights, in the same run and dtype. SwiGLU (Llama-2-7B, 4096 x 11008), TEAL
style: `sparse_swiglu_mlp` with per-layer thresholds set to keep `density` of the entries of the MLP input and of the
intermediate activation (batch 1 keeps exactly that; larger batches read the union over the batch, reported as
"read"); dense baseline F.linear(gate), F.linear(up), silu * up, F.linear(down). TEAL at 50% density is the issue's
headline case (target >= 1.3x); the ReLU target is speedup >= 0.6 / density at batch 1.

Timing: triton.testing.do_bench_cudagraph (median, the calls replayed from a CUDA graph, as the engine's decode step
runs) and do_bench (median of eager launches). CUDA-graph replays do not flush the L2 cache, so each timed call cycles
through up to 16 disjoint neuron sets (different inputs for TEAL) and the time is divided by their number: every
call reads rows the previous ones did not, as consecutive layers would (H100's L2 is 50 MB, a 5% OPT-13B MLP 21 MB).
Bandwidth = weight bytes actually read (selected rows of both matrices) / time. First each kernel is checked in
float16 against its float32 reference (exit 1 if one is over tolerance).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RELU_SHAPES = {"opt-13b": (5120, 20480), "opt-30b": (7168, 28672), "opt-175b": (12288, 49152)}
SWIGLU_SHAPES = {"llama-2-7b": (4096, 11008)}
CPU_RELU_SHAPES = {"tiny-opt": (64, 256)}
CPU_SWIGLU_SHAPES = {"tiny-llama": (64, 176)}
MAX_ROTATION = 16
PEAK_GBPS = {"H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H200": 4800}
TOL = 5e-3  # largest |kernel - reference| / (1 + |reference|), float16 vs float32 reference


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="gpu", choices=["gpu", "cpu"])
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/out/sparse_mlp[-cpu].json)")
    ap.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--shapes", nargs="*", default=None, help="subset of the shape names")
    ap.add_argument("--batches", nargs="*", type=int, default=None, help="default 1 4 16 (cpu: 1 4)")
    ap.add_argument("--densities", nargs="*", type=float, default=None, help="default 0.05 0.1 0.2 0.5 (cpu: 0.1 0.5)")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timings")
    ap.add_argument("--no-eager", action="store_true", help="skip the eager timings")
    ap.add_argument("--peak-gbps", type=float, default=None, help="HBM bandwidth for the %%-of-peak column")
    ap.add_argument("--rep", type=int, default=100, help="ms of timed calls per measurement (triton do_bench)")
    ap.add_argument("--no-variants", action="store_true", help="only the default kernels (no side-by-side variants)")
    ap.add_argument("--variants", nargs="*", default=None, help="only these side-by-side variants (by name)")
    args = ap.parse_args()
    cpu = args.preset == "cpu"
    args.batches = args.batches or ([1, 4] if cpu else [1, 4, 16])
    args.densities = args.densities or ([0.1, 0.5] if cpu else [0.05, 0.1, 0.2, 0.5])
    return args


ARGS = parse_args()
if ARGS.preset == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton / reldl.kernels are imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

import reldl.kernels as K  # noqa: E402

SM = importlib.import_module("reldl.kernels.sparse_mlp")  # the module (reldl.kernels.sparse_mlp is the function)

GPU = ARGS.preset == "gpu"


# ------------------------------------------------------------------------------------------------ timing


def bench(fns, graph: bool) -> float:
    """Median ms of one call, the calls of `fns` made in turn (so each reads what the previous ones did not)."""

    def run_all():
        for f in fns:
            f()

    if not GPU:
        run_all()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            run_all()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times) / len(fns)
    if graph:
        return triton.testing.do_bench_cudagraph(run_all, rep=ARGS.rep, return_mode="median") / len(fns)
    return triton.testing.do_bench(run_all, warmup=25, rep=ARGS.rep, return_mode="median") / len(fns)


def timings(fns) -> dict:
    out = {}
    if not ARGS.no_eager or not GPU:
        out["eager_ms"] = bench(fns, False)
    if GPU and not ARGS.no_graph:
        out["graph_ms"] = bench(fns, True)
    return out


def best_ms(t: dict) -> float:
    return t.get("graph_ms", t.get("eager_ms"))


def _k2(**kw) -> dict:
    """DOWN_TILES with kernel 2's batch-1 "gemv_small" tile changed."""
    return dict(SM.DOWN_TILES, gemv_small=dict(SM.DOWN_TILES["gemv_small"], **kw))


def _k1(**kw) -> dict:
    """UP_TILES with kernel 1's batch-1 tiles ("gemv_small" and "gemv") changed."""
    return dict(SM.UP_TILES, **{t: dict(SM.UP_TILES[t], **kw) for t in ("gemv_small", "gemv")})


def _k2_all(**kw) -> dict:
    """DOWN_TILES with both batch-1 tiles changed."""
    return dict(SM.DOWN_TILES, **{t: dict(SM.DOWN_TILES[t], **kw) for t in ("gemv_small", "gemv")})


# side-by-side variants of the kernels' settings (reldl.kernels.sparse_mlp module attributes), each timed like the
# default in the same run. ReLU: "no pdl" = plain launches at batch 1 too (the default chains
# the three kernels with programmatic dependent launch at batch 1, kernel 2 prefetching its weight rows into L2 before
# it waits for kernel 1), "no prefetch" = that PDL chain without the prefetch, "k1 ..." = kernel 1 with fewer programs
# per SM (UP_PROGRAMS_PER_SM) or 4 warps, so that kernel 2's programs find room beside it sooner, "pdl" = PDL at every
# batch, "reduce-in" = kernel 2 sums its own split-K partials (no reduce launch), "k2 direct ..." = kernel 2 unsplit
# at batch 1 (one program per column block writes the output: no partials, no reduce launch), with 4 warps, 32-column
# blocks or 256-row steps, "k2 2 splits" = at most 2 splits, "k2 n32" = 32-column blocks, "k2 .../SM" = more split-K
# programs per SM (PROGRAMS_PER_SM), "k2 k64/k32" = 64/32-row steps, "loops N" = both kernels' batch-1 loops
# software-pipelined in N stages (LOOP_STAGES; Triton pipelines by itself only loads that feed a tl.dot),
# "k2 step-sum" = kernel 2 summing each block of rows as it arrives (STEP_SUM: fewer registers), "... k256 4w" = with
# 256-row steps at 4 warps (one step per program).
# (The "fused ...", "barrier ..." and "dataflow ..." variants timed one-launch kernels removed since: RESULTS.md
# sessions 4, 12 and 13.)
# TEAL, forced sparse at every batch: "walk" = kernel 2 visiting every input row,
# "compact" = inputs compacted on the device, "compact-in" = only the MLP input compacted, "... pdl" = with PDL;
# "dense" = the thresholded dense fallback at every batch
RELU_VARIANTS = {
    "no pdl": {"attrs": {"PDL_RELU_MAX_BATCH": 0}},
    "no prefetch": {"attrs": {"DOWN_PREFETCH_L2": False}},
    "k1 2/SM": {"attrs": {"UP_PROGRAMS_PER_SM": 2}},
    "k1 1/SM": {"attrs": {"UP_PROGRAMS_PER_SM": 1}},
    "k1 4w": {"attrs": {"UP_TILES": dict(SM.UP_TILES, gemv_small=dict(SM.UP_TILES["gemv_small"], num_warps=4))}},
    "k1 2/SM 4w": {
        "attrs": {
            "UP_PROGRAMS_PER_SM": 2,
            "UP_TILES": dict(SM.UP_TILES, gemv_small=dict(SM.UP_TILES["gemv_small"], num_warps=4)),
        }
    },
    "pdl": {"attrs": {"PDL": True}},
    "reduce-in": {"attrs": {"DOWN_REDUCE_IN_KERNEL": True}},
    "k2 direct": {"attrs": {"DOWN_MAX_SPLITS_GEMV": 1}},
    "k2 2 splits": {"attrs": {"DOWN_MAX_SPLITS_GEMV": 2}},
    "k2 direct 4w": {"attrs": {"DOWN_MAX_SPLITS_GEMV": 1, "DOWN_TILES": _k2(num_warps=4)}},
    "k2 direct n32": {"attrs": {"DOWN_MAX_SPLITS_GEMV": 1, "DOWN_TILES": _k2(BLOCK_N=32)}},
    "k2 direct n32 k256": {"attrs": {"DOWN_MAX_SPLITS_GEMV": 1, "DOWN_TILES": _k2(BLOCK_N=32, BLOCK_K=256)}},
    "k2 direct n32 4w": {"attrs": {"DOWN_MAX_SPLITS_GEMV": 1, "DOWN_TILES": _k2(BLOCK_N=32, num_warps=4)}},
    "k2 n32": {"attrs": {"DOWN_TILES": _k2(BLOCK_N=32)}},
    "k2 8/SM": {"attrs": {"PROGRAMS_PER_SM": 8}},
    "k2 6/SM": {"attrs": {"PROGRAMS_PER_SM": 6}},
    "k2 k64": {"attrs": {"DOWN_TILES": _k2(BLOCK_K=64)}},
    "k2 k64 8/SM": {"attrs": {"PROGRAMS_PER_SM": 8, "DOWN_TILES": _k2(BLOCK_K=64)}},
    "k2 k64 4w 8/SM": {"attrs": {"PROGRAMS_PER_SM": 8, "DOWN_TILES": _k2(BLOCK_K=64, num_warps=4)}},
    "k2 k32 8/SM": {"attrs": {"PROGRAMS_PER_SM": 8, "DOWN_TILES": _k2(BLOCK_K=32)}},
    "loops 2": {"attrs": {"UP_TILES": _k1(LOOP_STAGES=2), "DOWN_TILES": _k2_all(LOOP_STAGES=2)}},
    "loops 3": {"attrs": {"UP_TILES": _k1(LOOP_STAGES=3), "DOWN_TILES": _k2_all(LOOP_STAGES=3)}},
    "k1 loops 3": {"attrs": {"UP_TILES": _k1(LOOP_STAGES=3)}},
    "k2 step-sum": {"attrs": {"DOWN_TILES": _k2_all(STEP_SUM=True)}},
    "k2 step-sum loops 3": {"attrs": {"DOWN_TILES": _k2_all(STEP_SUM=True, LOOP_STAGES=3)}},
    "k2 step-sum k256 4w": {"attrs": {"DOWN_TILES": _k2(BLOCK_K=256, num_warps=4, STEP_SUM=True)}},
    "step-sum loops 3": {
        "attrs": {"UP_TILES": _k1(LOOP_STAGES=3), "DOWN_TILES": _k2_all(STEP_SUM=True, LOOP_STAGES=3)}
    },
}
_SPARSE = {"TEAL_MAX_SPARSE_BATCH": 1 << 20}
TEAL_VARIANTS = {
    "walk": {"attrs": dict(_SPARSE, TEAL_COMPACT=False)},
    "compact": {"attrs": dict(_SPARSE, TEAL_COMPACT=True, TEAL_COMPACT_MID=True)},
    "compact-in": {"attrs": dict(_SPARSE, TEAL_COMPACT=True, TEAL_COMPACT_MID=False)},
    "walk pdl": {"attrs": dict(_SPARSE, TEAL_COMPACT=False, PDL=True)},
    "compact pdl": {"attrs": dict(_SPARSE, TEAL_COMPACT=True, TEAL_COMPACT_MID=True, PDL=True)},
    "dense": {"attrs": {"TEAL_MAX_SPARSE_BATCH": 0}},
}


class patched:
    """Within the block, the kernels run with a variant's settings (its "attrs": module attributes)."""

    def __init__(self, variant: dict):
        self.attrs = variant.get("attrs", {})

    def __enter__(self):
        self.saved = {a: getattr(SM, a) for a in self.attrs}
        for a, v in self.attrs.items():
            setattr(SM, a, v)

    def __exit__(self, *exc):
        for a, v in self.saved.items():
            setattr(SM, a, v)


def run_variants(table: dict, batch: int, fns, check, key: str, errors: dict, checked: bool) -> dict:
    """Graph-timed ms of `fns` under each applicable variant (the first failure of one is recorded, not raised)."""
    out = {}
    if ARGS.no_variants or not GPU:
        return out
    for name, v in table.items():
        if ARGS.variants and name not in ARGS.variants:
            continue
        try:
            with patched(v):
                if checked:
                    errors[f"{key} [{name}]"] = check()
                out[name] = bench(fns, True)
        except Exception as e:  # noqa: BLE001 - a broken variant is reported, the rest still run
            out[name] = None
            errors[f"{key} [{name}] failed"] = float("inf")
            print(f"  variant {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    return out


def free():
    gc.collect()
    if GPU:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def rand(*shape, dtype, dev, scale=1.0, gen=None):
    return (torch.randn(*shape, device=dev, dtype=torch.float32, generator=gen) * scale).to(dtype)


def scaled_err(got, want) -> float:
    return ((got.float() - want.float()).abs() / (1 + want.float().abs())).max().item() if got.numel() else 0.0


# ------------------------------------------------------------------------------------------------ ReLU (DejaVu)


def relu_case(name, d, n, dtype, dev, rows, errors):
    torch.manual_seed(0)
    w1 = rand(n, d, dtype=dtype, dev=dev, scale=d**-0.5)
    b1 = rand(n, dtype=dtype, dev=dev, scale=0.1)
    w2t = rand(n, d, dtype=dtype, dev=dev, scale=n**-0.5)
    b2 = rand(d, dtype=dtype, dev=dev, scale=0.1)
    el = w1.element_size()
    dense_bytes = 2 * n * d * el
    perm = torch.randperm(n, device=dev).to(torch.int32)

    for batch in ARGS.batches:
        xs = [rand(batch, d, dtype=dtype, dev=dev) for _ in range(MAX_ROTATION)]
        # dense baseline (420 MB+ per call: no L2 effects; rotate the inputs anyway)
        dense_t = timings([lambda x=x: F.linear(F.relu(F.linear(x, w1, b1)), w2t.t(), b2) for x in xs[:2]])
        for density in ARGS.densities:
            k = max(1, int(round(density * n)))
            m = max(1, min(MAX_ROTATION, n // k))
            sets = [perm[i * k : (i + 1) * k] for i in range(m)]
            # correctness: float32 reference on the selected rows
            if density == ARGS.densities[0] or not GPU:
                got = K.sparse_mlp(xs[0], w1, b1, w2t, b2, sets[0])
                want = K.sparse_mlp_reference(xs[0], w1, b1, w2t, b2, sets[0])
                key = f"{name} relu B={batch} density={density}"
                errors[key] = scaled_err(got, want)
                print(f"  check {key:<44} scaled err {errors[key]:.2e}{'  FAIL' if errors[key] > TOL else ''}")
            fns = [lambda x=x, s=s: K.sparse_mlp(x, w1, b1, w2t, b2, s) for x, s in zip(xs, sets)]
            sparse_t = timings(fns)
            want0 = K.sparse_mlp_reference(xs[0], w1, b1, w2t, b2, sets[0])
            variants = run_variants(
                RELU_VARIANTS,
                batch,
                fns,
                lambda x=xs[0], s=sets[0], w=want0: scaled_err(K.sparse_mlp(x, w1, b1, w2t, b2, s), w),
                f"{name} relu B={batch} density={density}",
                errors,
                checked=True,
            )
            scores = rand(batch, n, dtype=dtype, dev=dev)
            select_t = timings([lambda s=scores, p=density: K.select_neurons(s, density=p)])
            read = 2 * k * d * el
            row = dict(
                shape=name,
                kind="relu",
                d=d,
                n=n,
                batch=batch,
                density=density,
                k=k,
                rotation=m,
                dense=dense_t,
                sparse=sparse_t,
                select=select_t,
                variants_graph_ms=variants,
                bytes_read=read,
                dense_bytes=dense_bytes,
                target_speedup=(0.6 / density) if batch == 1 else None,
            )
            finish(row)
            rows.append(row)
        free()


# ------------------------------------------------------------------------------------------------ SwiGLU (TEAL)


def threshold_for(values: torch.Tensor, density: float) -> float:
    """The per-layer TEAL threshold keeping `density` of the entries (calibrated on these values)."""
    a = values.float().abs().flatten()
    if density >= 1:
        return -1.0
    return torch.quantile(a[: 1 << 20], 1 - density).item()


def swiglu_case(name, d, n, dtype, dev, rows, errors):
    torch.manual_seed(1)
    wg = rand(d, n, dtype=dtype, dev=dev, scale=d**-0.5)
    wu = rand(d, n, dtype=dtype, dev=dev, scale=d**-0.5)
    wd = rand(n, d, dtype=dtype, dev=dev, scale=n**-0.5)
    el = wg.element_size()
    dense_bytes = 3 * n * d * el

    def dense(x):
        return F.linear(F.silu(F.linear(x, wg.t())) * F.linear(x, wu.t()), wd.t())

    for batch in ARGS.batches:
        xs = [rand(batch, d, dtype=dtype, dev=dev) for _ in range(MAX_ROTATION)]
        dense_t = timings([lambda x=x: dense(x) for x in xs[:2]])
        calib_h = K.teal_gate_up(torch.cat(xs[:4]), wg, wu, None)
        for density in ARGS.densities:
            t_in = threshold_for(torch.cat(xs[:4]), density)
            t_mid = threshold_for(calib_h, density)
            m = max(1, min(MAX_ROTATION, int(1 / density)))
            # rows actually read: the union over the batch of the surviving inputs, averaged over the rotation
            read_in = statistics.mean((x.abs() > t_in).any(0).sum().item() for x in xs[:m])
            hs = [K.teal_gate_up(x, wg, wu, t_in) for x in xs[:m]]
            read_mid = statistics.mean((h.abs() > t_mid).any(0).sum().item() for h in hs)
            del hs
            if density == ARGS.densities[0] or density == 0.5 or not GPU:
                for use_index in (False, True):
                    got = K.sparse_swiglu_mlp(xs[0], wg, wu, wd, t_in, t_mid, use_index)
                    want = K.sparse_swiglu_mlp_reference(xs[0], wg, wu, wd, t_in, t_mid)
                    key = f"{name} teal B={batch} density={density} index={use_index}"
                    errors[key] = scaled_err(got, want)
                    print(f"  check {key:<44} scaled err {errors[key]:.2e}{'  FAIL' if errors[key] > TOL else ''}")
            fns = [lambda x=x, a=t_in, b=t_mid: K.sparse_swiglu_mlp(x, wg, wu, wd, a, b) for x in xs[:m]]
            sparse_t = timings(fns)
            want0 = K.sparse_swiglu_mlp_reference(xs[0], wg, wu, wd, t_in, t_mid)
            variants = run_variants(
                TEAL_VARIANTS,
                batch,
                fns,
                lambda x=xs[0], a=t_in, b=t_mid, w=want0: scaled_err(K.sparse_swiglu_mlp(x, wg, wu, wd, a, b), w),
                f"{name} teal B={batch} density={density}",
                errors,
                checked=density == ARGS.densities[0] or density == 0.5,
            )
            saved = ARGS.no_graph, ARGS.no_eager
            ARGS.no_graph, ARGS.no_eager = True, False  # torch.nonzero syncs: eager only (also under --no-eager)
            index_t = timings(
                [lambda x=x, a=t_in, b=t_mid: K.sparse_swiglu_mlp(x, wg, wu, wd, a, b, True) for x in xs[:m]]
            )
            ARGS.no_graph, ARGS.no_eager = saved
            read = (2 * read_in * n + read_mid * d) * el
            row = dict(
                shape=name,
                kind="swiglu-teal",
                d=d,
                n=n,
                batch=batch,
                density=density,
                threshold_in=t_in,
                threshold_mid=t_mid,
                rows_read_in=read_in,
                rows_read_mid=read_mid,
                rotation=m,
                dense=dense_t,
                sparse=sparse_t,
                sparse_with_index=index_t,
                path="sparse" if batch <= SM.TEAL_MAX_SPARSE_BATCH else "dense fallback",
                variants_graph_ms=variants,
                bytes_read=read,
                dense_bytes=dense_bytes,
                target_speedup=1.3 if density == 0.5 and batch == 1 else None,
            )
            finish(row)
            rows.append(row)
        free()


# ------------------------------------------------------------------------------------------------ report


def finish(row):
    d_ms, s_ms = best_ms(row["dense"]), best_ms(row["sparse"])
    row["speedup"] = d_ms / s_ms
    row["sparse_gbps"] = row["bytes_read"] / s_ms / 1e6
    row["dense_gbps"] = row["dense_bytes"] / d_ms / 1e6
    if PEAK:
        row["sparse_pct_of_peak"] = 100 * row["sparse_gbps"] / PEAK
        row["dense_pct_of_peak"] = 100 * row["dense_gbps"] / PEAK
    t = row["target_speedup"]
    row["meets_target"] = None if t is None else row["speedup"] >= t
    print(line(row), flush=True)


HEADER = (
    f"{'shape':<12}{'kind':<12}{'B':>3}{'dens':>6}{'dense ms':>10}{'sparse ms':>10}{'speedup':>9}{'target':>8}"
    f"{'sparse GB/s':>12}{'dense GB/s':>11}{'%peak':>7}{'read MB':>9}{'select ms':>10}{'idx ms':>9}"
)


def line(r) -> str:
    t = r["target_speedup"]
    tgt = "" if t is None else f"{t:.1f}x{'' if r['meets_target'] else '!'}"
    pct = f"{r['sparse_pct_of_peak']:.0f}" if "sparse_pct_of_peak" in r else "-"
    sel = f"{best_ms(r['select']):.4f}" if "select" in r else "-"
    idx = f"{best_ms(r['sparse_with_index']):.4f}" if "sparse_with_index" in r else "-"
    dense_ms = best_ms(r["dense"])
    var = "".join(
        f"  {k} " + ("fail" if v is None else f"{v:.4f} ({dense_ms / v:.2f}x)")
        for k, v in r.get("variants_graph_ms", {}).items()
    )
    return (
        f"{r['shape']:<12}{r['kind']:<12}{r['batch']:>3}{r['density']:>6.2f}{best_ms(r['dense']):>10.4f}"
        f"{best_ms(r['sparse']):>10.4f}{r['speedup']:>8.2f}x{tgt:>8}{r['sparse_gbps']:>12.0f}{r['dense_gbps']:>11.0f}"
        f"{pct:>7}{r['bytes_read'] / 1e6:>9.1f}{sel:>10}{idx:>9}{var}"
    )


def peak_gbps(name: str) -> float | None:
    if ARGS.peak_gbps:
        return ARGS.peak_gbps
    for key, v in PEAK_GBPS.items():
        if key in name:
            return v
    return None


def main() -> None:
    global PEAK
    if GPU:
        if not torch.cuda.is_available():
            sys.exit("bench_sparse_mlp: needs a CUDA GPU (or --preset cpu)")
        dev = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False
        device_name = torch.cuda.get_device_name(dev)
        relu_shapes, swiglu_shapes = RELU_SHAPES, SWIGLU_SHAPES
        dtype = getattr(torch, ARGS.dtype or "float16")
    else:
        dev = torch.device("cpu")
        device_name = f"cpu (Triton interpreter), {platform.processor() or platform.machine()}"
        relu_shapes, swiglu_shapes = CPU_RELU_SHAPES, CPU_SWIGLU_SHAPES
        dtype = getattr(torch, ARGS.dtype or "float32")
    if ARGS.shapes:
        relu_shapes = {k: v for k, v in relu_shapes.items() if k in ARGS.shapes}
        swiglu_shapes = {k: v for k, v in swiglu_shapes.items() if k in ARGS.shapes}
    PEAK = peak_gbps(device_name) if GPU else None
    print(f"{device_name}, torch {torch.__version__}, triton {triton.__version__}, {str(dtype)[6:]}, peak {PEAK} GB/s")

    rows, errors = [], {}
    print(HEADER)
    for name, (d, n) in relu_shapes.items():
        relu_case(name, d, n, dtype, dev, rows, errors)
        free()
    for name, (d, n) in swiglu_shapes.items():
        swiglu_case(name, d, n, dtype, dev, rows, errors)
        free()

    print("\nsummary")
    print(HEADER)
    for r in rows:
        print(line(r))
    targets = [r for r in rows if r["meets_target"] is not None]
    met = sum(bool(r["meets_target"]) for r in targets)
    print(f"targets met: {met} / {len(targets)} (ReLU: speedup >= 0.6/density at B=1; TEAL: >= 1.3x at 50%, B=1)")
    bad = {k: v for k, v in errors.items() if not v <= TOL}

    out = Path(ARGS.out or f"benchmarks/out/sparse_mlp{'' if GPU else '-cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "preset": ARGS.preset,
        "dtype": str(dtype)[6:],
        "peak_gbps": PEAK,
        "timing": (
            "median ms per call; graph_ms: triton.testing.do_bench_cudagraph, eager_ms: do_bench; each timed call "
            "cycles through `rotation` disjoint neuron sets (inputs for TEAL) so no call finds its rows in L2"
            if GPU
            else "time.perf_counter median of 3, Triton interpreter (meaningless as performance)"
        ),
        "bytes": "bytes_read = weight bytes of the selected rows actually read; dense_bytes = all MLP weights",
        "targets": {"relu_b1": "speedup >= 0.6 / density", "teal_50pct_b1": "speedup >= 1.3"},
        "configs": {
            "up_tiles": SM.UP_TILES,
            "down_tiles": SM.DOWN_TILES,
            "pdl": SM.PDL,
            "pdl_relu_max_batch": SM.PDL_RELU_MAX_BATCH,
            "down_reduce_in_kernel": SM.DOWN_REDUCE_IN_KERNEL,
            "down_prefetch_l2": SM.DOWN_PREFETCH_L2,
            "programs_per_sm": SM.PROGRAMS_PER_SM,
            "teal_compact": SM.TEAL_COMPACT,
            "teal_compact_mid": SM.TEAL_COMPACT_MID,
            "teal_max_sparse_batch": SM.TEAL_MAX_SPARSE_BATCH,
        },
        "variants": {"relu": RELU_VARIANTS, "swiglu-teal": TEAL_VARIANTS},
        "rows": rows,
        "errors_vs_float32_reference": errors,
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    if bad:
        sys.exit(f"bench_sparse_mlp: over tolerance {TOL}: {bad}")


PEAK = None

if __name__ == "__main__":
    main()
