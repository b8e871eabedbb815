"""Offloaded generation (reldl/llm/offload, issue 8) of an OPT-30B-shaped model under a GPU memory cap.

    python benchmarks/bench_offload.py                         # GPU: OPT-30B, caps 16 and 40 GB
    python benchmarks/bench_offload.py --layers 12 --caps 16   # fewer layers (see "scaled" below)
    python benchmarks/bench_offload.py --preset cpu            # tiny smoke run on the CPU
    python benchmarks/bench_offload.py --model opt-66b --caps 64 --no-disk               # fp16, GPU + CPU
    python benchmarks/bench_offload.py --model opt-175b --caps 64 --no-disk --weights-4bit

Per GPU memory cap: `Hardware.measure()` on this box (PCIe, disk, matmul / attention rates) with gpu_mem = the cap,
cpu_mem = --cpu-mem-gb (default 85% of MemAvailable), disk_mem = 90% of the offload directory's free space;
`search_policy` for the full model shape (--model: OPT-30B, 66B or 175B; prompt 512, 32 tokens); then the model with
random fp16 weights (generated on the GPU tensor by tensor and placed by the executor: "cpu" tensors in pinned
memory, "disk" ones written once to files under --offload-dir, so no 60 GB checkpoint is needed; with
--weights-4bit quantized on the GPU first) runs one block of that policy, after `reserve` (its KV cache buffers):
prompt 512, 32 generated tokens, every step timed (prefill, then each decode step; no extrapolation), with the GPU
capped by torch.cuda.set_per_process_memory_fraction(cap) on top of the policy's own memory accounting.

Reported: predicted (cost model: `estimate` for the model actually run, with the measured hardware) vs measured
prefill, decode step and throughput; then a profile run (`OffloadEngine.set_profile`: every transfer and every
compute serialised and timed separately, 3 decode steps) giving transfer seconds and compute seconds per decode
step, and the check "overlapped decode step <= 1.2 x max(transfer, compute)"; peak GPU memory against the cap.

--layers N < 48 runs an N-layer model with the full model's policy: measured numbers are for that N-layer model
(the JSON says so); `scaled_48_layers` multiplies the per-layer part of the decode step by 48 / N (labelled as an
extrapolation, never mixed with measurements). The flexgen / accelerate comparisons are not here.
JSON (card, date, command, rows) to --out (default benchmarks/out/offload.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

GiB = 1 << 30
OPT_30B = dict(hidden_size=7168, num_attention_heads=56, ffn_dim=28672, num_hidden_layers=48, vocab_size=50272)
OPT_66B = dict(hidden_size=9216, num_attention_heads=72, ffn_dim=36864, num_hidden_layers=64, vocab_size=50272)
OPT_175B = dict(hidden_size=12288, num_attention_heads=96, ffn_dim=49152, num_hidden_layers=96, vocab_size=50272)
MODELS = {"opt-30b": OPT_30B, "opt-66b": OPT_66B, "opt-175b": OPT_175B}
TINY = dict(hidden_size=64, num_attention_heads=4, ffn_dim=256, num_hidden_layers=4, vocab_size=512)
TINY_POSITIONS = 128


def opt_config(dims: dict, layers: int | None, directory: Path):
    from reldl.llm.config import parse_config

    cfg = {
        "model_type": "opt",
        "architectures": ["OPTForCausalLM"],
        "max_position_embeddings": TINY_POSITIONS if dims is TINY else 2048,
        "word_embed_proj_dim": dims["hidden_size"],
        "do_layer_norm_before": True,
        "enable_bias": True,
        "activation_function": "relu",
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": 2,
        "pad_token_id": 1,
        **dims,
    }
    if layers:
        cfg["num_hidden_layers"] = layers
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    return parse_config(directory)


WARMUP_PROMPT = 128  # the untimed warm-up run's prompt length cap (tokens)


def random_source(cfg, device):
    """Random fp16 weights made on `device` when asked for (deterministic per tensor name)."""
    import torch

    from reldl.llm.offload.layers import units
    from reldl.llm.offload.tiers import MemorySource

    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes = {"tok": (v, h), "pos": (cfg.max_positions + 2, h), "q": (h, h), "k": (h, h), "v": (h, h), "o": (h, h)}
    shapes.update({"fc1": (f, h), "fc2": (h, f), "lm_head": (v, h), "fc1.b": (f,)})
    names = {}
    for _, entries in units(cfg):
        for key, name in entries:
            names[name] = shapes.get(key, (h,))

    def make(name):
        shape = names[name]
        if len(shape) == 1:
            fill = 1.0 if name.endswith("norm.weight") else 0.0
            return torch.full(shape, fill, dtype=torch.float16, device=device)
        g = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
        # drawn in fp16 and scaled in place: no float32 temporary (twice the tensor) beside the GPU-resident weights
        return torch.randn(shape, generator=g, device=device, dtype=torch.float16).mul_(0.02)

    return MemorySource(cfg, make, list(names), shapes=names)


def mem_available() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return float(line.split()[1]) * 1024
    return 0.0


def allocator_counts(dev) -> dict:
    """The CUDA caching allocator's event counters (cumulative; {} on the CPU): cudaMalloc / cudaFree calls, and the
    retries that free cached blocks and synchronise the device when an allocation does not fit (near the cap)."""
    import torch

    if dev.type != "cuda":
        return {}
    st = torch.cuda.memory_stats(dev)
    keys = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams", "num_ooms")
    return {k: int(st.get(k, 0)) for k in keys}


def ab_run(eng, setter, current, other, prompts, gen: int, row: dict, dev) -> dict:
    """The measured run (row) beside one more with `setter(other)` on the same engine (then `setter(current)`):
    throughput, mean decode step and allocator counts of each, keyed by the setting."""
    setter(other)
    alloc0 = allocator_counts(dev)
    eng.generate(prompts, gen)
    counts = {k: v - alloc0.get(k, 0) for k, v in allocator_counts(dev).items()}
    setter(current)
    m2 = measured(eng.stats.steps, len(prompts) * gen)
    m = row["measured"]
    return {
        str(key).lower(): dict(throughput=r["throughput"], decode_step_mean_s=r["decode_step_mean_s"], allocator=c)
        for key, r, c in ((current, m, row["allocator"]), (other, m2, counts))
    }


def measured(steps, tokens: int) -> dict:
    """One generate call's steps (prefill first): step times, throughput, bytes and copies per decode step."""
    dec = [s.seconds for s in steps[1:]]
    per = max(len(dec), 1)
    total_s = sum(s.seconds for s in steps)
    return dict(
        prefill_s=steps[0].seconds,
        decode_steps_s=dec,
        decode_step_mean_s=sum(dec) / per,
        total_s=total_s,
        throughput=tokens / total_s,
        bytes_per_decode_step={k: sum(s.bytes[k] for s in steps[1:]) / per for k in steps[0].bytes},
        copies_per_decode_step={k: sum(s.copies[k] for s in steps[1:]) / per for k in steps[0].copies},
    )


def policy_from_fields(fields: dict):
    """A Policy from a JSON row's policy_fields (lists back to tuples)."""
    from reldl.llm.offload import Policy

    return Policy(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def policy_from_file(path: str, cap_gb: float) -> tuple[dict, str, dict] | None:
    """(policy_fields, description, source) of the row for `cap_gb` in a bench_offload JSON (benchmarks/policies/
    holds some), or None."""
    data = json.loads(Path(path).read_text())
    for r in data.get("rows", []):
        if abs(float(r.get("cap_gb", -1)) - cap_gb) < 1e-9 and "policy_fields" in r:
            return r["policy_fields"], r.get("policy", ""), dict(source=path)
    return None


def run_cap(args, cap_gb: float, hw_base, out_rows: list) -> dict:
    import torch

    from reldl.llm.offload import ModelShape, estimate, memory, search_policy, timeline
    from reldl.llm.offload.executor import OffloadEngine
    from reldl.llm.offload.tiers import job_rates

    cpu = args.preset == "cpu"
    dev = torch.device("cpu" if cpu else "cuda")
    dims = TINY if cpu else MODELS[args.model]
    with tempfile.TemporaryDirectory(prefix="bench-offload-cfg-") as d:  # configs are parsed into memory
        full_cfg = opt_config(dims, None, Path(d) / "full")
        run_cfg = opt_config(dims, args.layers, Path(d) / "run")
    full = ModelShape.from_config(full_cfg)
    shape = ModelShape.from_config(run_cfg)
    hw = hw_base.with_memory(gpu=cap_gb * GiB, disk=0.0 if args.no_disk else None)
    comp = None if args.compress else False
    t = time.perf_counter()
    found = policy_from_file(args.policy_from, cap_gb) if args.policy_from else None
    if args.policy_from and found is None:
        raise SystemExit(f"bench_offload: {args.policy_from} has no policy for a {cap_gb:g} GB cap")
    if found is not None:  # a given policy (an earlier run's), predicted but not searched
        policy = policy_from_fields(found[0])
        est_full = estimate(policy, full, hw, args.prompt, args.gen)
    else:
        policy, est_full = search_policy(
            full,
            hw,
            args.prompt,
            args.gen,
            compress_weight=True if args.weights_4bit else comp,
            compress_cache=comp,
            **(dict(gpu_batch_sizes=(1, 2, 4), num_gpu_batches=(1, 2, 3)) if cpu else {}),
        )
    search_s = time.perf_counter() - t
    est = estimate(policy, shape, hw, args.prompt, args.gen)
    row = dict(
        cap_gb=cap_gb,
        model=f"{args.model} shape, {shape.num_layers} of {full.num_layers} layers" if not cpu else "tiny opt",
        layers_run=shape.num_layers,
        policy=policy.describe(),
        policy_fields={k: (list(v) if isinstance(v, tuple) else v) for k, v in policy.__dict__.items()},
        search_s=search_s,
        predicted_full_model=dict(
            prefill_s=est_full.prefill_s, decode_step_s=est_full.decode_step_s, throughput=est_full.throughput
        ),
        predicted=dict(prefill_s=est.prefill_s, decode_step_s=est.decode_step_s, throughput=est.throughput),
        predicted_memory_gib={k: v / GiB for k, v in memory(policy, shape, args.prompt, args.gen).items()},
    )
    print(f"\n== cap {cap_gb} GB: {policy.describe()}")
    print(f"   predicted (model run): {est.describe()}")
    if not cpu:
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * GiB / total), torch.cuda.current_device())
        torch.cuda.reset_peak_memory_stats(dev)
    t = time.perf_counter()
    src = random_source(run_cfg, dev)
    eng = OffloadEngine(
        src,
        policy,
        dev,
        torch.float16 if not cpu else torch.float32,
        offload_dir=args.offload_dir,
        drop_page_cache=args.drop_page_cache,
        pin=args.pin,
        cache_stream=args.cache_stream,
        staging=args.staging,
        weight_pieces=args.weight_pieces,
    )
    row["build_s"] = time.perf_counter() - t
    try:
        row["reserve_s"] = eng.reserve(args.prompt, args.gen)  # the block's KV cache / activation buffers
        row["pin_s"], row["pin"], row["cache_stream"] = eng.arena.pin_s, args.pin, args.cache_stream
        row["staging"], row["weight_pieces"] = args.staging, args.weight_pieces
        print(f"   built in {row['build_s']:.1f} s (pinning {row['pin_s']:.1f} s), reserve {row['reserve_s']:.2f} s")
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(4, run_cfg.vocab_size, (policy.block_size, args.prompt), generator=g).tolist()
        if args.warmup:  # first-use costs (cuBLAS / Triton compiles, page faults of fresh buffers) not timed; a
            # prompt of at most WARMUP_PROMPT tokens runs the same kernels and configs without the whole prefill
            eng.generate([p[:WARMUP_PROMPT] for p in prompts], 2)
        alloc0 = allocator_counts(dev)
        t = time.perf_counter()
        eng.generate(prompts, args.gen)
        row["wall_s"] = time.perf_counter() - t
        row["measured"] = measured(eng.stats.steps, policy.block_size * args.gen)
        row["allocator"] = {k: v - alloc0.get(k, 0) for k, v in allocator_counts(dev).items()}
        dec = row["measured"]["decode_steps_s"]
        row["memory_placed_gib"] = {part: {k: v / GiB for k, v in d.items()} for part, d in eng.memory().items()}
        if not cpu:
            row["peak_gpu_gib"] = torch.cuda.max_memory_allocated(dev) / GiB
        m = row["measured"]
        print(
            f"   measured: prefill {m['prefill_s']:.3g} s, decode step {m['decode_step_mean_s']:.3g} s "
            f"(min {min(dec):.3g}, max {max(dec):.3g}), {m['throughput']:.3g} tok/s "
            f"(predicted {est.throughput:.3g}, ratio {m['throughput'] / est.throughput:.2f})"
        )
        if row["allocator"]:
            print("   allocator during the run: " + ", ".join(f"{k} {v}" for k, v in row["allocator"].items()))
        # transfer vs compute, serialised (profile mode), a few decode steps
        eng.set_profile(True)
        eng.generate(prompts, 4)
        eng.set_profile(False)
        prof = eng.stats.steps[1:]
        tr = sum(s.transfer_s for s in prof) / len(prof)
        co = sum(s.compute_s for s in prof) / len(prof)
        ser = sum(s.seconds for s in prof) / len(prof)
        ratio = m["decode_step_mean_s"] / max(tr, co)
        row["breakdown"] = dict(
            transfer_s=tr,
            compute_s=co,
            serialised_step_s=ser,
            overlapped_step_s=m["decode_step_mean_s"],
            ratio_to_max=ratio,
            within_1_2x=ratio <= 1.2,
            predicted_terms={k: v for k, v in est.terms.items() if k.startswith("decode_")},
        )
        rates = job_rates([j for s in prof for j in s.jobs], steps=len(prof))
        row["breakdown"]["transfer_by_size"] = rates
        for r in rates:
            print(
                f"   {r['counter']:>9} jobs >= {r['min_bytes'] / 2**20:8.3f} MiB: {r['jobs_per_step']:7.1f} per step, "
                f"{r['gb_per_step']:7.3f} GB, {r['s_per_step']:.3g} s, {r['gb_per_s']:.3g} GB/s"
            )
        print(
            f"   decode step: transfer {tr:.3g} s, compute {co:.3g} s (serialised {ser:.3g} s); overlapped "
            f"{m['decode_step_mean_s']:.3g} s = {ratio:.2f} x max -> {'OK' if ratio <= 1.2 else 'over 1.2x'}"
        )
        # A/B: the same engine and prompts with the other setting, measured again (then set back)
        if args.ab_cache_stream:
            cur = args.cache_stream
            row["ab_cache_stream"] = ab_run(eng, eng.set_cache_stream, cur, not cur, prompts, args.gen, row, dev)
        if args.ab_staging:
            cur = args.staging
            other = "fixed" if cur == "alloc" else "alloc"
            row["ab_staging"] = ab_run(eng, eng.set_staging, cur, other, prompts, args.gen, row, dev)
        if args.ab_pieces:
            cur = args.weight_pieces
            keys = {True: "pieces", False: "whole"}
            ab = ab_run(eng, eng.set_weight_pieces, cur, not cur, prompts, args.gen, row, dev)
            row["ab_pieces"] = {keys[k == "true"]: v for k, v in ab.items()}
        for name in ("ab_cache_stream", "ab_staging", "ab_pieces"):
            for k, v in row.get(name, {}).items():
                print(
                    f"   {name[3:]}={k}: {v['throughput']:.3g} tok/s, decode step {v['decode_step_mean_s']:.3g} s "
                    f"(predicted {est.throughput:.3g} tok/s, ratio {v['throughput'] / est.throughput:.2f}); "
                    f"allocator {v['allocator']}"
                )
        if args.timeline:  # where the overlapped step's time goes (OffloadEngine.set_timeline), a few decode steps
            eng.set_timeline(True)
            eng.generate(prompts, 4)
            eng.set_timeline(False)
            tl_steps = eng.stats.steps[1:]
            row["timeline"] = dict(
                decode_step_mean_s=sum(s.seconds for s in tl_steps) / len(tl_steps),
                mean=timeline.merge([s.timeline for s in tl_steps]),
            )
            print(f"   timeline (3 decode steps, step {row['timeline']['decode_step_mean_s']:.3g} s):")
            for line in timeline.format_summary(row["timeline"]["mean"]):
                print("      " + line)
        if shape.num_layers != full.num_layers:
            per_layer = (m["decode_step_mean_s"]) / (shape.num_layers + 2)
            row["scaled_48_layers"] = dict(
                note="extrapolated, not measured: decode step / (layers + 2 units) x (48 + 2)",
                decode_step_s=per_layer * (full.num_layers + 2),
                throughput=policy.block_size
                * args.gen
                / (
                    m["prefill_s"] * (full.num_layers + 2) / (shape.num_layers + 2)
                    + (args.gen - 1) * per_layer * (full.num_layers + 2)
                ),
            )
    finally:
        eng.close()
        if not cpu:
            torch.cuda.set_per_process_memory_fraction(1.0, torch.cuda.current_device())
    out_rows.append(row)
    return row


def measure_gpu_box(args):
    """The GPU machine's tiers as the policy search sees them: measured bandwidths and rates, 85% of available RAM
    (or --cpu-mem-gb), 90% of the offload directory's free disk."""
    from reldl.llm.offload import Hardware

    odir = args.offload_dir or tempfile.gettempdir()
    cpu_mem = args.cpu_mem_gb * GiB if args.cpu_mem_gb else 0.85 * mem_available()
    return Hardware.measure(
        "cuda", disk_path=odir, quick=args.quick_measure, cpu_mem=cpu_mem, disk_mem=0.9 * shutil.disk_usage(odir).free
    )


def hardware_and_card(args) -> tuple | None:
    """(Hardware, card name) for the run; ``--preset cpu``: the tiny model's smoke run (prompt and generation
    shortened; caps 16,40 become 50% and 80% of its all-on-GPU footprint, which forces offloading). None, after a
    message, where the GPU preset finds no GPU. Shared with bench_offload_baselines.py."""
    import torch

    from reldl.llm.offload import Hardware

    if args.preset != "cpu":
        if not torch.cuda.is_available():
            print("needs a CUDA GPU (or --preset cpu)", file=sys.stderr)
            return None
        return measure_gpu_box(args), torch.cuda.get_device_name()
    args.prompt, args.gen = min(args.prompt, 32), min(args.gen, 6)
    hw = Hardware.preset("t4").with_memory(cpu=64 << 20, disk=1 << 30)
    if args.caps == "16,40":
        from reldl.llm.offload import ModelShape, Policy, memory

        with tempfile.TemporaryDirectory(prefix="bench-offload-") as d:
            tiny = ModelShape.from_config(opt_config(TINY, None, Path(d)))
        need = memory(Policy(1), tiny, args.prompt, args.gen)["gpu"] / GiB
        args.caps = f"{0.5 * need:.6g},{0.8 * need:.6g}"
    return hw, platform.processor() or "cpu"


def main() -> int:
    from reldl.llm.offload.tiers import PIN_METHODS

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=["gpu", "cpu"], default="gpu")
    ap.add_argument("--caps", default="16,40", help="GPU memory caps in GB (GiB)")
    ap.add_argument("--layers", type=int, default=None, help="run fewer layers than 48 (policy of the full model)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--compress", action="store_true", help="let the search choose 4-bit weights / cache")
    ap.add_argument("--model", choices=list(MODELS), default="opt-30b", help="shape of the random-weight model")
    ap.add_argument("--weights-4bit", action="store_true", help="4-bit weights (the cache as --compress says)")
    ap.add_argument("--no-disk", action="store_true", help="GPU and CPU only: the search gets no disk")
    ap.add_argument("--cpu-mem-gb", type=float, default=None)
    ap.add_argument("--offload-dir", default=None)
    ap.add_argument("--drop-page-cache", action="store_true", help="drop disk files from the page cache after writing")
    ap.add_argument(
        "--pin", choices=PIN_METHODS, default="register", help="how large pinned buffers are made (OffloadEngine pin)"
    )
    ap.add_argument(
        "--ab-cache-stream",
        action="store_true",
        help="after the measured run, run again with the other --cache-stream setting on the same engine",
    )
    ap.add_argument(
        "--staging",
        choices=("alloc", "fixed"),
        default="alloc",
        help="where streamed weights land (OffloadEngine staging): fresh tensors per fetch, or two fixed buffers",
    )
    ap.add_argument(
        "--ab-staging",
        action="store_true",
        help="after the measured run, run again with the other --staging on the same engine",
    )
    ap.add_argument(
        "--whole-unit-fetch",
        dest="weight_pieces",
        action="store_false",
        help="fetch each unit's weights in one load ahead of the batches' loads (OffloadEngine weight_pieces=False)",
    )
    ap.add_argument(
        "--ab-pieces",
        action="store_true",
        help="after the measured run, run again with the other weight-fetch setting (pieces / whole unit)",
    )
    ap.add_argument(
        "--timeline",
        action="store_true",
        help="after the measured run, 3 decode steps in the timeline mode: GPU busy / idle time per stream and why",
    )
    ap.add_argument(
        "--cache-stream",
        action="store_true",
        help="KV cache and hidden-state loads on their own CUDA stream (OffloadEngine cache_stream)",
    )
    ap.add_argument(
        "--policy-from", default=None, help="a bench_offload JSON: run its row's policy per cap instead of searching"
    )
    ap.add_argument("--quick-measure", action="store_true")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed 2-token run")
    ap.add_argument("--out", default="benchmarks/out/offload.json")
    args = ap.parse_args()

    box = hardware_and_card(args)
    if box is None:
        return 2
    hw, card = box
    print(f"hardware: {json.dumps({k: f'{v:.4g}' for k, v in hw.__dict__.items()})}")
    rows: list[dict] = []
    status = 0
    out = dict(
        card=card,
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        command=" ".join(sys.argv),
        hardware=hw.__dict__,
        rows=rows,
    )
    for cap in (float(c) for c in args.caps.split(",")):
        try:
            run_cap(args, cap, hw, rows)
        except Exception as e:  # report and go on with the next cap
            print(f"   cap {cap} GB failed: {type(e).__name__}: {e}", file=sys.stderr)
            rows.append(dict(cap_gb=cap, error=f"{type(e).__name__}: {e}"))
            status = 1
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
