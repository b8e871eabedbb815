"""Diagnostics for the offloaded executor on a GPU (issue 8): where a decode step's time goes.

    python3 benchmarks/profile_offload.py --layers 8 --cap 16 --out-dir $OUT

1. Pinning fresh host memory (the KV cache's buffer): torch.empty + cudaHostRegister, the same after `prefault`
   (tiers.py: huge pages + parallel zero fill), and cudaHostAlloc (pin_memory=True), seconds for --pin-gib GiB.
2. An OPT-30B-shaped model of --layers layers (random fp16 weights) under the policy of the first H200 run at cap
   16 GB (or, with --measure, the one the search picks for the full model at --cap GB): reserve, a 2-token
   warm-up, --gen tokens timed per step, then --trace-steps tokens under torch.profiler (CPU + CUDA); the Chrome
   trace goes to --out-dir/trace.json.gz and a summary per decode step is printed: the step's wall time, the
   host-to-device copy time (sum and union of intervals), kernel time (union), and the longest idle gaps of the
   copy engine with the CPU op running just before each; and the GPU kernels of the traced steps by total time
   (`key_averages`), to --out-dir/kernels.txt.

    python3 benchmarks/profile_offload.py --layers 48 --cap 40 --measure --compress --gen 6 --out-dir $OUT
        # the full-depth 4-bit policy of bench_offload_baselines --caps 40 --compress (session 6: decode steps 2.7x
        # the model's max(transfer, compute))
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_offload as bo  # noqa: E402

GiB = 1 << 30


def pin_bench(gib: float) -> dict:
    import torch

    from reldl.llm.offload.tiers import prefault

    n = int(gib * GiB)
    out = {}
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    out["thp"] = thp.read_text().strip() if thp.exists() else None
    cud = torch.cuda.cudart()
    for name in ("register", "prefault_register", "cudaHostAlloc"):
        t = time.perf_counter()
        if name == "cudaHostAlloc":
            buf = torch.empty(n, dtype=torch.uint8, pin_memory=True)
            out[name] = time.perf_counter() - t
            del buf
            torch.cuda.empty_cache()  # no-op for host memory, kept for symmetry
            continue
        buf = torch.empty(n, dtype=torch.uint8)
        if name == "prefault_register":
            prefault(buf)
            out["prefault_only"] = time.perf_counter() - t
        err = cud.cudaHostRegister(buf.data_ptr(), n, 0)
        out[name] = time.perf_counter() - t
        out[name + "_err"] = int(err)
        # a copy from it at full speed?
        d = torch.empty(n, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        t = time.perf_counter()
        d.copy_(buf, non_blocking=True)
        torch.cuda.synchronize()
        out[name + "_h2d_GBps"] = n / (time.perf_counter() - t) / 1e9
        del d
        cud.cudaHostUnregister(buf.data_ptr())
        del buf
    out["gib"] = gib
    out["threads"] = torch.get_num_threads()
    return out


def cpu_attention_bench(B: int = 24, H: int = 56, D: int = 128, S: int = 530, reps: int = 3) -> dict:
    """Decode attention on the CPU over an fp16 cache laid out [S, B, H, D] (the executor's), several ways; GFLOP/s
    at 4 * S * H * D FLOPs per sequence (the cost model's convention) and GB/s of cache read."""
    import torch

    from reldl.llm.offload.layers import attention, cpu_decode_attention

    g = torch.Generator().manual_seed(0)
    K = torch.randn(S, B, H, D, generator=g).half()
    V = torch.randn(S, B, H, D, generator=g).half()
    q = torch.randn(B, 1, H, D, generator=g).half()
    mask = torch.ones(B, 1, S, dtype=torch.bool)
    scale = D**-0.5
    ref = attention(q.float(), K.float(), V.float(), mask, scale).view(B, H, D)

    def current():
        return attention(q.float(), K.float(), V.float(), mask, scale).view(B, H, D)

    def einsum16():
        sc = torch.einsum("bhd,sbhd->bhs", q[:, 0], K).float() * scale
        pr = torch.softmax(sc, -1).half()
        return torch.einsum("bhs,sbhd->bhd", pr, V).float()

    def chunked(c):
        return lambda: cpu_decode_attention(q, K, V, mask, scale, chunk=c).view(B, H, D)

    out = {"threads": torch.get_num_threads()}
    flops = 4 * S * H * D * B
    nbytes = 2 * S * B * H * D * 2
    variants = [("current", current), ("einsum16", einsum16)]
    variants += [(f"cpu_decode_attention_c{c}", chunked(c)) for c in (16, 32, 128)]
    for name, fn in variants:
        try:
            got = fn()
            err = (got - ref).abs().max().item()
            best = float("inf")
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t)
            out[name] = dict(ms=best * 1e3, gflops=flops / best / 1e9, gbps=nbytes / best / 1e9, max_err=err)
        except Exception as e:  # report and go on
            out[name] = dict(error=f"{type(e).__name__}: {e}"[:200])
    return out


def summarize(trace: dict, step_marks: list[tuple[float, float]]) -> list[dict]:
    """Per (start, end) window in microseconds (trace clock): copy / kernel busy time and the copy engine's gaps."""
    evs = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    h2d = sorted(
        (e["ts"], e["ts"] + e["dur"], e.get("name", ""))
        for e in evs
        if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")
    )
    d2h = sorted(
        (e["ts"], e["ts"] + e["dur"]) for e in evs if e.get("cat") == "gpu_memcpy" and "DtoH" in e.get("name", "")
    )
    ker = sorted((e["ts"], e["ts"] + e["dur"]) for e in evs if e.get("cat") == "kernel")
    cpu_ops = sorted(
        (e["ts"], e["ts"] + e["dur"], e.get("name", "")) for e in evs if e.get("cat") in ("cpu_op", "python_function")
    )

    def union(iv, a, b):
        tot, cur_s, cur_e = 0.0, None, None
        for s, e, *_ in iv:
            s, e = max(s, a), min(e, b)
            if e <= s:
                continue
            if cur_e is None or s > cur_e:
                if cur_e is not None:
                    tot += cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        if cur_e is not None:
            tot += cur_e - cur_s
        return tot

    rows = []
    for a, b in step_marks:
        inside = [x for x in h2d if x[1] > a and x[0] < b]
        gaps = []
        prev_end = a
        for s, e, _ in inside:
            if s - prev_end > 500:  # > 0.5 ms idle
                before = [c for c in cpu_ops if c[0] <= prev_end]
                gaps.append(
                    dict(
                        at_ms=(prev_end - a) / 1e3,
                        ms=(s - prev_end) / 1e3,
                        cpu_op_before=before[-1][2] if before else None,
                    )
                )
            prev_end = max(prev_end, e)
        if b - prev_end > 500:
            gaps.append(dict(at_ms=(prev_end - a) / 1e3, ms=(b - prev_end) / 1e3, cpu_op_before="(step end)"))
        gaps.sort(key=lambda g: -g["ms"])
        rows.append(
            dict(
                step_ms=(b - a) / 1e3,
                h2d_sum_ms=sum(min(e, b) - max(s, a) for s, e, _ in inside) / 1e3,
                h2d_union_ms=union(h2d, a, b) / 1e3,
                h2d_copies=len(inside),
                d2h_union_ms=union(d2h, a, b) / 1e3,
                kernel_union_ms=union(ker, a, b) / 1e3,
                gaps_top=gaps[:12],
                gaps_total_ms=sum(g["ms"] for g in gaps),
            )
        )
    return rows


def host_profile(eng, prompts, gen: int, out_dir: Path) -> None:
    """Where the host's time goes in a `gen`-token run (the prefill included): cProfile by own time, then by
    cumulative time, with the count of (unit, GPU batch) calls and every step's seconds, to out_dir/cprofile.txt."""
    import cProfile
    import io
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    eng.generate(prompts, gen)
    pr.disable()
    buf = io.StringIO()
    st = pstats.Stats(pr, stream=buf)
    st.sort_stats("tottime").print_stats(35)
    st.sort_stats("cumulative").print_stats(45)
    calls = (len(prompts) // eng.policy.gpu_batch_size) * eng.num_units * gen
    steps = [round(s.seconds, 4) for s in eng.stats.steps[-gen:]]
    head = f"(unit, GPU batch) calls: {calls}; steps {steps}\n"
    (out_dir / "cprofile.txt").write_text(head + buf.getvalue())
    print(head + buf.getvalue(), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--cap", type=float, default=16.0)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=8)
    ap.add_argument("--trace-steps", type=int, default=4)
    ap.add_argument("--pin-gib", type=float, default=4.0)
    ap.add_argument("--measure", action="store_true", help="measure the hardware (else the h100 preset)")
    ap.add_argument("--compress", action="store_true", help="with --measure: the search may pick 4-bit weights/cache")
    ap.add_argument("--out-dir", default="benchmarks/out")
    ap.add_argument(
        "--copies",
        choices=("auto", "inline", "threads"),
        default="auto",
        help="issue the copies from the main thread or from worker threads (auto: the engine's default)",
    )
    ap.add_argument("--policy-from", help="a benchmarks/policies JSON: its row for --cap (no search)")
    ap.add_argument(
        "--cprofile",
        action="store_true",
        help="only the host side: --gen tokens under cProfile (no pinning / CPU-attention / serialised / trace runs)",
    )
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from reldl.llm.offload import Hardware, ModelShape, Policy, search_policy
    from reldl.llm.offload.executor import OffloadEngine

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = dict(card=torch.cuda.get_device_name())
    if not args.cprofile:
        report["cpu_attention"] = cpu_attention_bench()
        print("cpu attention:", json.dumps(report["cpu_attention"]), flush=True)
        report["pin"] = pin_bench(args.pin_gib)
        print("pinning:", json.dumps(report["pin"]), flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="profile-offload-"))
    full = ModelShape.from_config(bo.opt_config(bo.OPT_30B, None, tmp / "full"))
    cfg = bo.opt_config(bo.OPT_30B, args.layers, tmp / "run")
    if args.policy_from:
        found = bo.policy_from_file(args.policy_from, args.cap)
        if found is None:
            raise SystemExit(f"{args.policy_from}: no policy row for --cap {args.cap:g}")
        policy = bo.policy_from_fields(found[0])
    elif args.measure:
        hw = Hardware.measure("cuda", quick=True).with_memory(gpu=args.cap * GiB, cpu=0.85 * bo.mem_available())
        free = None if args.compress else False
        policy, est = search_policy(full, hw, args.prompt, args.gen, compress_weight=free, compress_cache=free)
        report["estimate"] = est.describe()
        report["estimate_terms"] = est.terms
    else:  # the policy the search picked on the H200 at cap 16 (block 72 = 3 x 24, weights 20% GPU, cache on CPU)
        policy = Policy(24, 3, weights=(0.2, 0.8, 0.0), cache=(0.0, 1.0, 0.0), activations=(1.0, 0.0, 0.0))
    report["policy"] = policy.describe()
    print(report["policy"], "| predicted:", report.get("estimate", "-"), flush=True)
    dev = torch.device("cuda", 0)
    total = torch.cuda.get_device_properties(dev).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap * GiB / total), 0)
    t = time.perf_counter()
    eng = OffloadEngine(
        bo.random_source(cfg, dev),
        policy,
        dev,
        torch.float16,
        threads={"auto": None, "inline": False, "threads": True}[args.copies],
    )
    report["copies"] = args.copies
    report["build_s"] = time.perf_counter() - t
    report["reserve_s"] = eng.reserve(args.prompt, args.gen)
    report["pin_s"] = eng.arena.pin_s
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, cfg.vocab_size, (policy.block_size, args.prompt), generator=g).tolist()
    eng.generate([p[: bo.WARMUP_PROMPT] for p in prompts], 2)  # warm-up (same kernels, short prefill)
    t = time.perf_counter()
    eng.generate(prompts, args.gen)
    report["wall_s"] = time.perf_counter() - t
    report["steps_s"] = [s.seconds for s in eng.stats.steps]
    print(
        f"build {report['build_s']:.1f} s (pin {report['pin_s']:.1f}), reserve {report['reserve_s']:.2f} s, "
        f"wall {report['wall_s']:.2f} s, steps {[round(x, 3) for x in report['steps_s']]}",
        flush=True,
    )
    if args.cprofile:
        host_profile(eng, prompts, args.gen, out_dir)
        (out_dir / "profile_offload.json").write_text(json.dumps(report, indent=1, default=str))
        eng.close()
        shutil.rmtree(tmp, ignore_errors=True)
        return 0
    eng.set_profile(True)
    eng.generate(prompts, 4)
    eng.set_profile(False)
    prof_steps = eng.stats.steps[1:]
    report["serialised"] = dict(
        transfer_s=sum(s.transfer_s for s in prof_steps) / len(prof_steps),
        compute_s=sum(s.compute_s for s in prof_steps) / len(prof_steps),
        bytes={k: prof_steps[-1].bytes[k] for k in prof_steps[-1].bytes},
    )
    print("serialised:", report["serialised"], flush=True)

    marks: list[tuple[float, float]] = []
    orig = eng._step

    def marked(*a, **kw):
        with record_function("reldl_step"):
            r = orig(*a, **kw)
            torch.cuda.synchronize()
            return r

    eng._step = marked
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        eng.generate(prompts, args.trace_steps)
    eng._step = orig
    kernels = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30)
    (out_dir / "kernels.txt").write_text(kernels)
    print(kernels, flush=True)
    path = out_dir / "trace.json"
    prof.export_chrome_trace(str(path))
    trace = json.loads(path.read_text())
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and e.get("name") == "reldl_step" and e.get("cat") in ("user_annotation", "cpu_op"):
            marks.append((e["ts"], e["ts"] + e["dur"]))
    marks.sort()
    with gzip.open(out_dir / "trace.json.gz", "wt") as f:
        json.dump(trace, f)
    path.unlink()
    report["traced_steps"] = summarize(trace, marks[1:])  # decode steps
    for r in report["traced_steps"]:
        print(json.dumps({k: v for k, v in r.items() if k != "gaps_top"}))
        for gp in r["gaps_top"][:6]:
            print("    gap", json.dumps(gp))
    (out_dir / "profile_offload.json").write_text(json.dumps(report, indent=1, default=str))
    eng.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
