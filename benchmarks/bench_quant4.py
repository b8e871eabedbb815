"""The fused 4-bit GEMM (reldl.kernels.matmul_4bit) against an fp16 torch matmul, at OPT-30B / OPT-175B linear shapes.

    python benchmarks/bench_quant4.py                    # GPU: OPT-30B and OPT-175B, M = 1, 2, 4, ..., 2048
    python benchmarks/bench_quant4.py --sweep            # GPU: candidate configs of the M >= 2 kernel, best per M
    python benchmarks/bench_quant4.py --preset cpu       # tiny shapes in the Triton interpreter (smoke run)

Per shape (N out features, K in features) and M rows: checks the kernel against x @ dequantize(q).T in float32
(exit 1 if the error is over tolerance), times it and `x @ w.T` on the fp16 weight, and reports the weight bytes each
reads and the effective weight bandwidth. Timing: each call captured in a CUDA graph and replayed
(triton.testing.do_bench_cudagraph, median), over enough copies of the weights (rotated) that the 4-bit bytes and the
fp16 bytes each exceed 256 MB, so neither is timed out of L2. Prints a table and writes JSON (card, date, command,
rows) to --out (default benchmarks/out/quant4.json).
"""

from __future__ import annotations

import argparse
import sys

from _common import kernel_device, write_report

MODELS = {"opt-30b": (7168, 28672), "opt-175b": (12288, 49152)}  # hidden, ffn
TOL = {"float16": 5e-3, "bfloat16": 3e-2, "float32": 1e-4}
ROTATE_BYTES = 256 << 20

# --sweep: candidate configs of `_matmul_4bit_kernel` per M bucket (keys as quant4.GEMM_CONFIGS: the largest M)
_S = dict(GROUP_N=8, SWAP=True, num_warps=4)
SWEEP = {
    8: [
        dict(_S, BLOCK_N=64, BLOCK_M=16, NG=2, DEQ=2, PROGRAMS_PER_SM=8, num_stages=4),
        dict(_S, BLOCK_N=64, BLOCK_M=16, NG=4, DEQ=2, PROGRAMS_PER_SM=8, num_stages=4),
        dict(_S, BLOCK_N=128, BLOCK_M=16, NG=2, DEQ=2, PROGRAMS_PER_SM=4, num_stages=3),
        dict(_S, BLOCK_N=64, BLOCK_M=16, NG=2, DEQ=1, PROGRAMS_PER_SM=8, num_stages=4),
    ],
    16: [
        dict(_S, BLOCK_N=128, BLOCK_M=16, NG=2, DEQ=2, PROGRAMS_PER_SM=2, num_stages=3),
        dict(_S, BLOCK_N=64, BLOCK_M=16, NG=2, DEQ=2, PROGRAMS_PER_SM=8, num_stages=4),
        dict(_S, BLOCK_N=128, BLOCK_M=16, NG=4, DEQ=2, PROGRAMS_PER_SM=2, num_stages=3),
    ],
    64: [
        dict(_S, BLOCK_N=128, BLOCK_M=64, NG=2, DEQ=1, PROGRAMS_PER_SM=2, num_stages=3),
        dict(_S, BLOCK_N=128, BLOCK_M=64, NG=2, DEQ=1, PROGRAMS_PER_SM=2, num_stages=3, SWAP=False),
        dict(_S, BLOCK_N=128, BLOCK_M=64, NG=1, DEQ=2, PROGRAMS_PER_SM=2, num_stages=4),
        dict(_S, BLOCK_N=128, BLOCK_M=64, NG=2, DEQ=2, PROGRAMS_PER_SM=2, num_stages=4, SWAP=False),
        dict(_S, BLOCK_N=64, BLOCK_M=64, NG=4, DEQ=2, PROGRAMS_PER_SM=4, num_stages=3),
    ],
    None: [
        dict(_S, BLOCK_N=128, BLOCK_M=64, NG=2, DEQ=2, PROGRAMS_PER_SM=1, num_stages=4),
        dict(_S, BLOCK_N=128, BLOCK_M=128, NG=1, DEQ=2, PROGRAMS_PER_SM=1, num_stages=4, num_warps=8),
        dict(_S, BLOCK_N=128, BLOCK_M=128, NG=1, DEQ=2, PROGRAMS_PER_SM=1, num_stages=4, num_warps=8, SWAP=False),
        dict(_S, BLOCK_N=128, BLOCK_M=128, NG=2, DEQ=2, PROGRAMS_PER_SM=1, num_stages=3, num_warps=8, SWAP=False),
        dict(_S, BLOCK_N=256, BLOCK_M=128, NG=1, DEQ=2, PROGRAMS_PER_SM=1, num_stages=3, num_warps=8),
        dict(_S, BLOCK_N=128, BLOCK_M=256, NG=1, DEQ=2, PROGRAMS_PER_SM=1, num_stages=3, num_warps=8, SWAP=False),
        dict(_S, BLOCK_N=128, BLOCK_M=128, NG=2, DEQ=2, PROGRAMS_PER_SM=1, num_stages=3, num_warps=8),
        dict(_S, BLOCK_N=64, BLOCK_M=128, NG=2, DEQ=2, PROGRAMS_PER_SM=1, num_stages=4, SWAP=False),
        dict(_S, BLOCK_N=128, BLOCK_M=128, NG=1, DEQ=1, PROGRAMS_PER_SM=1, num_stages=4, SWAP=False),
    ],
}


def linear_shapes(hidden: int, ffn: int) -> list[tuple[str, int, int]]:
    """(name, N, K) of one decoder layer's linears (q/k/v/out are alike)."""
    return [("qkv_out", hidden, hidden), ("fc1", ffn, hidden), ("fc2", hidden, ffn)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=["gpu", "cpu"], default="gpu")
    ap.add_argument("--models", default="opt-30b,opt-175b")
    ap.add_argument("--m", default="1,2,4,8,16,64,256,2048")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--sweep", action="store_true", help="time the SWEEP candidate configs (M >= 2) instead")
    ap.add_argument("--sweep-models", default="opt-30b", help="--sweep: the models whose shapes are swept")
    ap.add_argument("--apply", action="store_true", help="--sweep: then set the best configs and run the table")
    ap.add_argument("--check", type=int, default=0, help="only check matmul_4bit: N fresh inputs per shape and M")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    box = kernel_device(args.preset, args.dtype)  # before reldl.kernels defines its kernels
    if box is None:
        return 2
    cpu, dev, dtype = box
    import torch

    import reldl.kernels as K
    import reldl.kernels.quant4 as Q

    ms = [int(v) for v in args.m.split(",")]
    if cpu:
        cases = [("tiny", "qkv_out", 96, 130), ("tiny", "fc1", 160, 96)]
        ms = [1, 2, 16]
    else:
        cases = [(m, *s) for m in args.models.split(",") for s in linear_shapes(*MODELS[m])]
    out_path = args.out or f"benchmarks/out/quant4{'_sweep' if args.sweep else ''}.json"

    if cpu:
        import time

        def bench(fn, calls):
            fn(0)
            t = time.perf_counter()
            fn(0)
            return (time.perf_counter() - t) * 1e3

    else:
        import triton.testing

        def bench(fn, calls):
            """ms per call: one graph replays `calls` calls (over rotated weight copies)."""

            def body():
                for i in range(calls):
                    fn(i)

            return float(triton.testing.do_bench_cudagraph(body, rep=50, return_mode="median")) / calls

    sms = Q._sms(torch.device(dev))
    torch.manual_seed(0)
    tol = TOL[str(dtype).removeprefix("torch.")]

    def measure(cases, ms, sweep):
        rows, bad = [], 0
        for model, name, n, k in cases:
            w = (torch.randn(n, k, device=dev) * 0.02).to(dtype)
            q = K.quantize_4bit(w)
            deq = K.dequantize_4bit(q)  # float32, for the check
            c4 = 1 if cpu else max(1, -(-ROTATE_BYTES // q.nbytes))
            c16 = 1 if cpu else max(1, -(-ROTATE_BYTES // (w.numel() * w.element_size())))
            qs = [q] + [Q.Quantized4(q.packed.clone(), q.scale.clone(), q.minv.clone(), q.k) for _ in range(c4 - 1)]
            ws = [w] + [w.clone() for _ in range(c16 - 1)]
            for m in ms:
                x = torch.randn(m, k, device=dev).to(dtype)
                want = x.float() @ deq.T
                dense = bench(lambda i, x=x, ws=ws: x @ ws[i].T, c16)
                b4, b16 = q.nbytes, w.numel() * w.element_size()
                if sweep:
                    if m < 2:
                        continue
                    bucket = next(top for top in SWEEP if top is None or m <= top)
                    for ci, cfg in enumerate(SWEEP[bucket]):
                        full = Q.matmul_4bit_config(m, n, k, dtype, sms, q.scale.dtype, base=cfg)

                        def run(i, x=x, full=full, qs=qs, m=m, n=n, k=k):
                            qq = qs[i]
                            o = torch.empty((m, n), dtype=dtype, device=dev)
                            Q._gemm_4bit(x, qq.packed, qq.scale, qq.minv, None, o, n, k, full)
                            return o

                        try:
                            got = run(0)
                            err = float((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-12))
                            t4 = bench(run, c4)
                        except Exception as e:  # noqa: BLE001 - a config that does not compile (shared memory)
                            print(f"{model} {name} M={m} config {ci}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                            continue
                        ok = err <= tol
                        rows.append(dict(model=model, linear=name, m=m, n=n, k=k, bucket=bucket, config=ci,
                                         splits=full["SPLITS"], ms_4bit=t4, ms_dense=dense, speedup=dense / t4,
                                         max_rel_err=err, ok=ok))  # fmt: skip
                        print(f"{model:>9} {name:>8} M={m:<5} cfg {ci} splits {full['SPLITS']:>2}: "
                              f"4bit {t4 * 1e3:8.1f} us"
                              f"  dense {dense * 1e3:8.1f} us  x{dense / t4:.2f}  err {err:.1e}"
                              f"{'' if ok else '  OVER TOLERANCE'}", flush=True)  # fmt: skip
                    continue
                got = K.matmul_4bit(x, q)
                err = float((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-12))
                ok = err <= tol
                bad += not ok
                t4 = bench(lambda i, x=x, qs=qs: K.matmul_4bit(x, qs[i]), c4)
                rows.append(
                    dict(
                        model=model,
                        linear=name,
                        m=m,
                        n=n,
                        k=k,
                        ms_4bit=t4,
                        ms_dense=dense,
                        speedup=dense / t4,
                        weight_bytes_4bit=b4,
                        weight_bytes_dense=b16,
                        gbps_4bit=b4 / t4 / 1e6,
                        gbps_dense=b16 / dense / 1e6,
                        tflops_4bit=2 * m * n * k / t4 / 1e9,
                        tflops_dense=2 * m * n * k / dense / 1e9,
                        max_rel_err=err,
                        ok=ok,
                    )
                )
                r = rows[-1]
                print(
                    f"{model:>9} {name:>8} M={m:<5} N={n:<6} K={k:<6} "
                    f"4bit {t4 * 1e3:8.1f} us ({r['gbps_4bit']:6.0f} GB/s, "
                    f"{r['tflops_4bit']:6.1f} TFLOP/s)  fp16 {dense * 1e3:8.1f} us ({r['tflops_dense']:6.1f} TFLOP/s)  "
                    f"x{r['speedup']:.2f}  err {err:.1e}{'' if ok else '  OVER TOLERANCE'}",
                    flush=True,
                )
        return rows, bad

    if args.check:  # correctness only: fresh weights and inputs each round, against float32 x @ dequantize(q).T
        worst, bad = 0.0, 0
        for model, name, n, k in cases:
            for rnd in range(args.check):
                w = (torch.randn(n, k, device=dev) * 0.02).to(dtype)
                q = K.quantize_4bit(w)
                deq = K.dequantize_4bit(q)
                for m in ms:
                    x = torch.randn(m, k, device=dev).to(dtype)
                    b = torch.randn(n, device=dev).to(dtype) if rnd % 2 else None
                    got = K.matmul_4bit(x, q, b)
                    want = x.float() @ deq.T + (b.float() if b is not None else 0)
                    err = float((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-12))
                    worst = max(worst, err)
                    if err > tol or not bool(torch.isfinite(got).all()):
                        bad += 1
                        print(f"{model} {name} M={m} round {rnd}: err {err:.2e} OVER TOLERANCE", flush=True)
                del w, q, deq
        print(f"check: {len(cases)} shapes x {len(ms)} M x {args.check} rounds, worst err {worst:.2e}, {bad} over")
        return 1 if bad else 0
    if args.sweep:
        sweep_cases = (
            cases if cpu else [(m, *s) for m in args.sweep_models.split(",") for s in linear_shapes(*MODELS[m])]
        )
        rows, _ = measure(sweep_cases, [v for v in ms if v >= 2], True)
        import math

        by: dict[tuple, dict[int, list[float]]] = {}
        for r in rows:
            if r["ok"]:
                by.setdefault((r["bucket"], r["m"]), {}).setdefault(r["config"], []).append(r["speedup"])
        print("best per M (geometric mean speedup over the shapes, configs that ran on every shape):")
        for (bucket, m), per in sorted(by.items(), key=lambda kv: kv[0][1]):
            full = {c: v for c, v in per.items() if len(v) == max(len(u) for u in per.values())}
            gm = {c: math.exp(sum(map(math.log, v)) / len(v)) for c, v in full.items()}
            best = max(gm, key=gm.get)
            print(f"  M={m:<5} bucket {bucket!s:>4}: config {best} x{gm[best]:.2f}  (all: "
                  + ", ".join(f"{c}:{s:.2f}" for c, s in sorted(gm.items())) + ")")  # fmt: skip
        chosen = {}  # per bucket: the config with the best geometric mean over all its (shape, M) rows
        for bucket in SWEEP:
            per: dict[int, list[float]] = {}
            for r in rows:
                if r["bucket"] == bucket and r["ok"]:
                    per.setdefault(r["config"], []).append(r["speedup"])
            if per:
                full = {c: v for c, v in per.items() if len(v) == max(len(u) for u in per.values())}
                gm = {c: math.exp(sum(map(math.log, v)) / len(v)) for c, v in full.items()}
                chosen[bucket] = max(gm, key=gm.get)
                print(
                    f"  bucket {bucket!s:>4}: config {chosen[bucket]} x{gm[chosen[bucket]]:.2f} "
                    f"{SWEEP[bucket][chosen[bucket]]}"
                )
        write_report(out_path, "quant4_sweep", rows, preset=args.preset, dtype=dtype, cpu=cpu)
        if not args.apply:
            return 0
        for bucket, ci in chosen.items():
            Q.GEMM_CONFIGS[bucket] = dict(SWEEP[bucket][ci])
        print("applied:", {str(b): Q.GEMM_CONFIGS[b] for b in Q.GEMM_CONFIGS})
        out_path = out_path.replace(".json", "_applied.json")
    rows, bad = measure(cases, ms, False)
    write_report(out_path, "quant4", rows, preset=args.preset, dtype=dtype, cpu=cpu)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
