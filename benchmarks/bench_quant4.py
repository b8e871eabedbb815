"""The fused 4-bit GEMM (reldl.kernels.matmul_4bit) against an fp16 torch matmul, at OPT-30B / OPT-175B linear shapes.

    python benchmarks/bench_quant4.py                    # GPU: OPT-30B and OPT-175B, M = 1, 16, 256
    python benchmarks/bench_quant4.py --preset cpu       # tiny shapes in the Triton interpreter (smoke run)

Per shape (N out features, K in features) and M rows: checks the kernel against x @ dequantize(q).T in float32
(exit 1 if the error is over tolerance), times it and `x @ w.T` on the fp16 weight with triton.testing.do_bench
(median), and reports the weight bytes each reads and the effective weight bandwidth. Prints a table and writes JSON
(card, date, command, rows) to --out (default benchmarks/out/quant4.json).
"""

from __future__ import annotations

import argparse
import os
import sys

from _common import timer, write_report

MODELS = {"opt-30b": (7168, 28672), "opt-175b": (12288, 49152)}  # hidden, ffn
TOL = {"float16": 5e-3, "bfloat16": 3e-2, "float32": 1e-4}


def linear_shapes(hidden: int, ffn: int) -> list[tuple[str, int, int]]:
    """(name, N, K) of one decoder layer's linears (q/k/v/out are alike)."""
    return [("qkv_out", hidden, hidden), ("fc1", ffn, hidden), ("fc2", hidden, ffn)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=["gpu", "cpu"], default="gpu")
    ap.add_argument("--models", default="opt-30b,opt-175b")
    ap.add_argument("--m", default="1,16,256")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--out", default="benchmarks/out/quant4.json")
    args = ap.parse_args()
    if args.preset == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before reldl.kernels defines its kernels

    import torch

    import reldl.kernels as K

    cpu = args.preset == "cpu"
    if not cpu and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --preset cpu)", file=sys.stderr)
        return 2
    dev = "cpu" if cpu else "cuda"
    dtype = torch.float32 if cpu else getattr(torch, args.dtype)
    ms = [int(v) for v in args.m.split(",")]
    if cpu:
        cases = [("tiny", "qkv_out", 96, 130), ("tiny", "fc1", 160, 96)]
        ms = [1, 16]
    else:
        cases = [(m, *s) for m in args.models.split(",") for s in linear_shapes(*MODELS[m])]

    bench = timer(cpu)
    rows, bad = [], 0
    torch.manual_seed(0)
    for model, name, n, k in cases:
        w = (torch.randn(n, k, device=dev) * 0.02).to(dtype)
        q = K.quantize_4bit(w)
        deq = K.dequantize_4bit(q)  # float32, for the check
        for m in ms:
            x = torch.randn(m, k, device=dev).to(dtype)
            got = K.matmul_4bit(x, q)
            want = x.float() @ deq.T
            err = float((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-12))
            ok = err <= TOL[str(dtype).removeprefix("torch.")]
            bad += not ok
            t4 = bench(lambda x=x, q=q: K.matmul_4bit(x, q))
            t16 = bench(lambda x=x, w=w: x @ w.T)
            b4, b16 = q.nbytes, w.numel() * w.element_size()
            rows.append(
                dict(
                    model=model,
                    linear=name,
                    m=m,
                    n=n,
                    k=k,
                    ms_4bit=t4,
                    ms_dense=t16,
                    speedup=t16 / t4,
                    weight_bytes_4bit=b4,
                    weight_bytes_dense=b16,
                    gbps_4bit=b4 / t4 / 1e6,
                    gbps_dense=b16 / t16 / 1e6,
                    tflops_4bit=2 * m * n * k / t4 / 1e9,
                    max_rel_err=err,
                    ok=ok,
                )
            )
            r = rows[-1]
            print(
                f"{model:>9} {name:>8} M={m:<5} N={n:<6} K={k:<6} 4bit {t4:8.3f} ms ({r['gbps_4bit']:7.1f} GB/s, "
                f"{r['tflops_4bit']:6.1f} TFLOP/s)  dense {t16:8.3f} ms ({r['gbps_dense']:7.1f} GB/s)  "
                f"x{r['speedup']:.2f}  err {err:.1e}{'' if ok else '  OVER TOLERANCE'}",
                flush=True,
            )
    write_report(args.out, "quant4", rows, preset=args.preset, dtype=dtype, cpu=cpu)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
