"""Decode attention over a 4-bit KV cache (reldl.kernels.quant4_decode_attention) against the eager path it replaces
in the offloaded executor (dequantize the prefix, then SDPA) and against SDPA over an fp16 cache.

    python benchmarks/bench_quant4_attention.py                # GPU: OPT-30B (56 heads, g=1) / Llama-70B (g=8)
    python benchmarks/bench_quant4_attention.py --preset cpu   # tiny shapes in the Triton interpreter (smoke run)

Per (model, batch B, context S): one decode step (T = 1, the exact new K/V row appended, a left-padding mask), in
the executor's layout (packed [S, B*h, D/2]). Checks the kernel against the reference in float32 (exit 1 over
tolerance), times the three with triton.testing.do_bench (median), reports cache bytes read and effective GB/s.
Writes JSON (card, date, command, rows) to --out (default benchmarks/out/quant4_attention.json).
"""

from __future__ import annotations

import argparse
import sys

from _common import kernel_device, timer, write_report

MODELS = {"opt-30b": (56, 1, 128), "llama-70b": (8, 8, 128)}  # kv heads, group, head_dim
TOL = {"float16": 1e-2, "bfloat16": 3e-2, "float32": 1e-4}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=["gpu", "cpu"], default="gpu")
    ap.add_argument("--models", default="opt-30b,llama-70b")
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--ctx", default="512,2048")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--out", default="benchmarks/out/quant4_attention.json")
    args = ap.parse_args()
    box = kernel_device(args.preset, args.dtype)  # before reldl.kernels defines its kernels
    if box is None:
        return 2
    cpu, dev, dtype = box
    import torch

    import reldl.kernels as K

    if cpu:
        cases = [("tiny-mha", 2, 1, 64, 2, 77), ("tiny-gqa", 1, 4, 128, 1, 300)]
    else:
        cases = [
            (m, *MODELS[m], b, s)
            for m in args.models.split(",")
            for b in (int(v) for v in args.batch.split(","))
            for s in (int(v) for v in args.ctx.split(","))
        ]

    bench = timer(cpu)
    rows, bad = [], 0
    torch.manual_seed(0)
    for model, h, g, d, b, s in cases:
        q = torch.randn(b, 1, h * g, d, device=dev).to(dtype)
        kd = torch.randn(s, b, h, d, device=dev).to(dtype)  # the dense cache (fp16 baseline)
        vd = torch.randn(s, b, h, d, device=dev).to(dtype)
        kc = K.quantize_kv_4bit(kd.reshape(s, b * h, d), check_finite=False)
        vc = K.quantize_kv_4bit(vd.reshape(s, b * h, d), check_finite=False)
        kn = torch.randn(1, b, h, d, device=dev).to(dtype)
        vn = torch.randn(1, b, h, d, device=dev).to(dtype)
        pads = torch.randint(0, max(1, s // 4), (b,), device=dev)
        keys = torch.arange(s + 1, device=dev)
        mask = (keys[None, None, :] >= pads[:, None, None]).expand(b, 1, s + 1).contiguous()
        scale = d**-0.5

        def kernel(q=q, kc=kc, vc=vc, kn=kn, vn=vn, mask=mask, scale=scale):
            return K.quant4_decode_attention(q, kc, vc, scale, kn, vn, mask)

        def eager(q=q, kc=kc, vc=vc, kn=kn, vn=vn, mask=mask, scale=scale):
            return K.quant4_decode_attention_reference(q, kc, vc, scale, kn, vn, mask)

        kfull, vfull = torch.cat([kd, kn]), torch.cat([vd, vn])
        m4 = mask.repeat_interleave(g, dim=1).unsqueeze(1) if g > 1 else mask.unsqueeze(1)
        qg = q.view(b, h, g, d)  # T = 1: [B, h, g, D]

        def dense(qg=qg, kfull=kfull, vfull=vfull, m4=m4, scale=scale):
            kk, vv = kfull.permute(1, 2, 0, 3), vfull.permute(1, 2, 0, 3)
            return torch.nn.functional.scaled_dot_product_attention(qg, kk, vv, attn_mask=m4, scale=scale)

        got = kernel()
        f = (lambda x: x.float()) if dtype != torch.float32 else (lambda x: x)
        want = K.quant4_decode_attention_reference(f(q), kc, vc, scale, f(kn), f(vn), mask)
        err = float((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-12))
        ok = err <= TOL[str(dtype).removeprefix("torch.")]
        bad += not ok
        t4, te, td = bench(kernel), bench(eager), bench(dense)
        variants = {}
        if g == 1 and not cpu:  # one row per KV head: the GEMV kernel's tiles, and the tl.dot kernel, same run
            import importlib

            qa = importlib.import_module("reldl.kernels.quant4_attention")
            base = dict(qa.GEMV_CONFIG)
            for name, flag, cfg in [("dot", False, base)] + [
                (f"gemv n{bn} w{nw}", True, dict(base, BLOCK_N=bn, num_warps=nw))
                for bn in (16, 32, 64)
                for nw in (2, 4)
            ]:
                qa.GEMV, qa.GEMV_CONFIG = flag, cfg
                try:
                    v_err = float((kernel().float() - want).abs().max() / want.abs().max().clamp_min(1e-12))
                    variants[name] = dict(ms=bench(kernel), err=v_err)
                except Exception as e:  # noqa: BLE001 - a failing variant is reported, the rest still run
                    variants[name] = dict(error=f"{type(e).__name__}: {e}"[:200])
                finally:
                    qa.GEMV, qa.GEMV_CONFIG = True, base
        b4 = kc.nbytes + vc.nbytes
        bd = 2 * kd.numel() * kd.element_size()
        rows.append(
            dict(
                model=model,
                kv_heads=h,
                group=g,
                head_dim=d,
                batch=b,
                ctx=s,
                ms_kernel=t4,
                ms_eager_dequant=te,
                ms_dense_fp=td,
                speedup_vs_eager=te / t4,
                speedup_vs_dense=td / t4,
                cache_bytes_4bit=b4,
                cache_bytes_dense=bd,
                gbps_kernel=b4 / t4 / 1e6,
                gbps_dense=bd / td / 1e6,
                max_rel_err=err,
                ok=ok,
                variants=variants,
            )
        )
        r = rows[-1]
        print(
            f"{model:>9} B={b:<3} S={s:<5} 4bit {t4:8.3f} ms ({r['gbps_kernel']:7.1f} GB/s)  eager {te:8.3f} ms  "
            f"dense {td:8.3f} ms ({r['gbps_dense']:7.1f} GB/s)  x{r['speedup_vs_eager']:.2f} vs eager  "
            f"err {err:.1e}{'' if ok else '  OVER TOLERANCE'}",
            flush=True,
        )
        if variants:
            print("    " + "  ".join(f"{k} {v.get('ms', float('nan')):.3f}" for k, v in variants.items()), flush=True)
    write_report(args.out, "quant4_attention", rows, preset=args.preset, dtype=dtype, cpu=cpu)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
