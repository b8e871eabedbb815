"""The fused decode kernels of reldl.kernels against their PyTorch references, at Llama-1.1B decode shapes.

    python benchmarks/bench_decode_kernels.py --out benchmarks/out/decode-kernels.json

Needs a CUDA GPU, torch and triton (nothing else of reldl but reldl.kernels). First checks every kernel on the GPU in
float32, float16 and bfloat16 against the float32 reference and prints the largest errors (exit 1 if one is over its
tolerance); then times each kernel and its reference with triton.testing.do_bench (median of eager launches) and
do_bench_cudagraph (the same call replayed from a CUDA graph, as the engine's decode step is), prints a table and
writes JSON to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch
import triton
import triton.testing

import reldl.kernels as K

# TinyLlama-1.1B
CFG = dict(batch=64, heads=32, kv_heads=4, head_dim=64, hidden=2048, inter=5632, block_size=16, eps=1e-5)
MAX_POS = 4096
# largest |kernel - reference| / (1 + |reference|) allowed, reference in float32 on float32 copies of the inputs
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _rand(*shape, dtype, dev, scale=1.0):
    return (torch.randn(*shape, device=dev, dtype=torch.float32) * scale).to(dtype)


def _rope_tables(d, dev):
    inv = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    f = torch.outer(torch.arange(MAX_POS, dtype=torch.float64), inv)
    return f.cos().float().to(dev), f.sin().float().to(dev)


def make_inputs(dtype, dev, batch=CFG["batch"], ctx=256, seed=0):
    """Everything one decode step of one layer needs, with shuffled (non-contiguous) block tables."""
    torch.manual_seed(seed)
    c = CFG
    bs, h, kvh, d = c["block_size"], c["heads"], c["kv_heads"], c["head_dim"]
    nb = -(-ctx // bs)
    num_blocks = batch * nb + 1
    tables = (torch.randperm(num_blocks - 1, device=dev)[: batch * nb] + 1).view(batch, nb)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    pos = (lens - 1).long()
    slots = tables.gather(1, (pos // bs).view(-1, 1)).view(-1) * bs + pos % bs
    cos, sin = _rope_tables(d, dev)
    return dict(
        x=_rand(batch, c["hidden"], dtype=dtype, dev=dev),
        res=_rand(batch, c["hidden"], dtype=dtype, dev=dev, scale=4.0),
        w=_rand(c["hidden"], dtype=dtype, dev=dev, scale=0.1) + 1,
        qkv=_rand(batch, (h + 2 * kvh) * d, dtype=dtype, dev=dev),
        pos=pos,
        slots=slots,
        cos=cos,
        sin=sin,
        k_cache=_rand(num_blocks * bs, kvh, d, dtype=dtype, dev=dev),
        v_cache=_rand(num_blocks * bs, kvh, d, dtype=dtype, dev=dev),
        q=_rand(batch, h, d, dtype=dtype, dev=dev),
        tables=tables,
        lens=lens,
        gate_up=_rand(batch, 2 * c["inter"], dtype=dtype, dev=dev, scale=2.0),
    )


def calls(inp, impl: str, num_splits=None):
    """name -> zero-argument callable for each kernel (impl 'triton' or 'torch')."""
    c = CFG
    h, kvh, d, bs = c["heads"], c["kv_heads"], c["head_dim"], c["block_size"]
    tri = impl == "triton"
    norm = K.rmsnorm if tri else K.rmsnorm_reference
    rope = K.rope_and_cache if tri else K.rope_and_cache_reference
    attn = K.paged_decode_attention if tri else K.paged_decode_attention_reference
    act = K.silu_and_mul if tri else K.silu_and_mul_reference
    i = inp
    return {
        "rmsnorm+residual": lambda: norm(i["x"], i["w"], c["eps"], i["res"]),
        "rope_and_cache": lambda: rope(
            i["qkv"], i["pos"], i["cos"], i["sin"], i["k_cache"], i["v_cache"], i["slots"], h, kvh, d
        ),
        "paged_decode_attention": lambda: attn(
            i["q"], i["k_cache"], i["v_cache"], i["tables"], i["lens"], bs, d**-0.5, num_splits=num_splits
        ),
        "silu_and_mul": lambda: act(i["gate_up"]),
    }


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def check(dev) -> tuple[dict, bool]:
    """Each kernel in each dtype vs the float32 reference on float32 copies of the same inputs."""
    errors, ok = {}, True
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for ctx, batch, splits in ((256, 64, None), (2048, 4, None), (2048, 4, 1), (37, 3, 4)):
            inp = make_inputs(dtype, dev, batch=batch, ctx=ctx, seed=ctx + batch)
            ref_inp = {k: (v.float() if v.is_floating_point() else v) for k, v in inp.items()}
            # the rope kernel writes the caches: give each side its own copy
            tri_inp = dict(inp, k_cache=inp["k_cache"].clone(), v_cache=inp["v_cache"].clone())
            got = {n: _as_tuple(f()) for n, f in calls(tri_inp, "triton", splits).items()}
            want = {n: _as_tuple(f()) for n, f in calls(ref_inp, "torch").items()}
            got["k_cache (written rows)"] = (tri_inp["k_cache"][inp["slots"]],)
            want["k_cache (written rows)"] = (ref_inp["k_cache"][inp["slots"]],)
            got["v_cache (written rows)"] = (tri_inp["v_cache"][inp["slots"]],)
            want["v_cache (written rows)"] = (ref_inp["v_cache"][inp["slots"]],)
            for name in got:
                pairs = list(zip(got[name], want[name]))
                abs_err = max((a.float() - b.float()).abs().max().item() for a, b in pairs)
                err = max(((a.float() - b.float()).abs() / (1 + b.float().abs())).max().item() for a, b in pairs)
                key = f"{name} {str(dtype).removeprefix('torch.')} B={batch} ctx={ctx} splits={splits}"
                errors[key] = {"max_abs": abs_err, "max_scaled": err}
                bad = not err <= TOL[dtype]
                ok &= not bad
                print(f"  {key:<72} max abs err {abs_err:.2e}  scaled {err:.2e}{'  FAIL' if bad else ''}")
    return errors, ok


def _auto_splits(batch, ctx, dtype, dev) -> int:
    from reldl.kernels.paged_attention import num_sms, paged_attention_config

    c = CFG
    cfg = paged_attention_config(c["head_dim"], c["heads"] // c["kv_heads"], dtype)
    return K.choose_num_splits(batch, c["kv_heads"], ctx, cfg["BLOCK_N"], num_sms(dev))


def bench(fn, graph: bool) -> float:
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def tune(dtype, dev) -> list[dict]:
    """Time paged_decode_attention (replayed from a CUDA graph) over a grid of tile sizes, warps, stages and split
    counts (where they apply), by swapping reldl.kernels.paged_attention.paged_attention_config. Prints the best few."""
    import itertools

    import reldl.kernels.paged_attention as PA

    base = PA.paged_attention_config
    results = []
    for ctx, batch in ((2048, 64), (2048, 4)):
        inp = make_inputs(dtype, dev, batch=batch, ctx=ctx)
        split_opts = (1,) if batch * CFG["kv_heads"] >= 132 else (4, 8, 16)
        for bn, warps, stages, splits in itertools.product((64, 128), (4, 8), (2, 3), split_opts):

            def cfg(head_dim, group, dt, bn=bn, warps=warps, stages=stages):
                return dict(base(head_dim, group, dt), BLOCK_N=bn, num_warps=warps, num_stages=stages)

            PA.paged_attention_config = cfg
            try:
                ms = bench(calls(inp, "triton", splits)["paged_decode_attention"], True)
            except Exception as e:  # a config the compiler refuses (shared memory, registers)
                ms = float("inf")
                print(f"  ctx={ctx} B={batch} BLOCK_N={bn} warps={warps} stages={stages}: {type(e).__name__}")
            finally:
                PA.paged_attention_config = base
            results.append(
                dict(context=ctx, batch=batch, BLOCK_N=bn, num_warps=warps, num_stages=stages, splits=splits, ms=ms)
            )
        best = sorted((r for r in results if r["context"] == ctx and r["batch"] == batch), key=lambda r: r["ms"])
        print(
            f"tune ctx={ctx} B={batch}: "
            + "; ".join(
                f"BN={r['BLOCK_N']} w={r['num_warps']} st={r['num_stages']} sp={r['splits']} {r['ms']:.4f}ms"
                for r in best[:5]
            )
        )
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/out/decode-kernels.json")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timings")
    ap.add_argument("--tune", action="store_true", help="also sweep the attention kernel's launch configs")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_decode_kernels: needs a CUDA GPU")
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(dev)
    print(f"{name}, torch {torch.__version__}, triton {triton.__version__}, {args.dtype}")

    print("correctness (kernel in each dtype vs float32 reference):")
    errors, ok = check(dev)
    if not ok:
        sys.exit("bench_decode_kernels: a kernel is over its tolerance")

    rows = []
    cases = [(256, 64, None), (2048, 64, None), (2048, 4, None), (2048, 4, 1)]
    for ctx, batch, splits in cases:
        inp = make_inputs(dtype, dev, batch=batch, ctx=ctx)
        tri, ref = calls(inp, "triton", splits), calls(inp, "torch")
        for kname in tri:
            if kname != "paged_decode_attention" and (batch, ctx) != (64, 256):
                continue  # only attention depends on the context length / batch here
            row = {"kernel": kname, "batch": batch, "context": ctx}
            if kname == "paged_decode_attention":
                row["num_splits"] = splits if splits is not None else _auto_splits(batch, ctx, dtype, dev)
            row["torch_ms"] = bench(ref[kname], False)
            row["triton_ms"] = bench(tri[kname], False)
            if not args.no_graph:
                row["torch_graph_ms"] = bench(ref[kname], True)
                row["triton_graph_ms"] = bench(tri[kname], True)
            rows.append(row)

    # one layer's worth of these kernels (2 norms, rope+cache, attention, activation) at B=64
    per_layer = {}
    for ctx in (256, 2048):
        sel = [r for r in rows if r["batch"] == 64 and (r["kernel"] != "paged_decode_attention" or r["context"] == ctx)]
        for col in ("torch_ms", "triton_ms", "torch_graph_ms", "triton_graph_ms"):
            if all(col in r for r in sel):
                per_layer.setdefault(f"context {ctx}", {})[col] = sum(
                    r[col] * (2 if r["kernel"] == "rmsnorm+residual" else 1) for r in sel
                )

    hdr = f"{'kernel':<24}{'B':>4}{'ctx':>6}{'split':>6}{'torch ms':>10}{'triton ms':>10}{'speedup':>9}"
    if not args.no_graph:
        hdr += f"{'torch graph':>12}{'triton graph':>13}{'speedup':>9}"
    print(hdr)
    for r in rows:
        line = f"{r['kernel']:<24}{r['batch']:>4}{r['context']:>6}{str(r.get('num_splits', '')):>6}"
        line += f"{r['torch_ms']:>10.4f}{r['triton_ms']:>10.4f}{r['torch_ms'] / r['triton_ms']:>8.2f}x"
        if not args.no_graph:
            line += f"{r['torch_graph_ms']:>12.4f}{r['triton_graph_ms']:>13.4f}"
            line += f"{r['torch_graph_ms'] / r['triton_graph_ms']:>8.2f}x"
        print(line)
    for k, v in per_layer.items():
        print(f"per layer, B=64, {k}: " + ", ".join(f"{c} {x:.4f}" for c, x in v.items()))

    tuning = tune(dtype, dev) if args.tune else None

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": args.dtype,
        "config": CFG,
        "timing": "triton.testing.do_bench median (eager), do_bench_cudagraph median (graph)",
        "rows": rows,
        "per_layer_b64": per_layer,
        "errors_vs_float32_reference": errors,
        "attention_tuning": tuning,
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
