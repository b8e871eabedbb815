"""Offloaded full fine-tuning (reldl/llm/finetune, Fuyou-style) of a 6.7B-shaped model under a GPU memory cap.

Random weights (no checkpoint), Llama-2-7B or OPT-6.7B shapes. reldl's trainer keeps fp32 masters and Adam moments
on the CPU (Adam on a CPU thread, overlapped with the backward), bf16 working weights on the GPU resident or
streamed per layer under the cap, activation checkpoints per layer (swapped to pinned CPU memory when short).
Reported: step time, tokens per step, achieved TFLOPS = 6 * non-embedding params * tokens / step time (the usual
model-FLOPs convention: the recompute of checkpointed layers is not counted; the input embedding is a lookup, so its
parameters are left out; `tflops_all_params` counts them too), the CPU Adam's busy seconds per step, the GPU's bf16
matmul rate measured in the same run, and plain PyTorch under the same cap (fp32 parameters and fused Adam on the GPU,
bf16 autocast, the same tokens per step by gradient accumulation over the same micro-batches): OOM, and the largest
layer count that fits with its TFLOPS. `--layers N` trains N layers of the shape (the label says so). Defaults on
the GPU: 64 rows x 512 tokens per step (32768 tokens) in micro-batches of 8 rows.

  python benchmarks/bench_finetune.py                       # H100/H200: 6.7B Llama shape, 16 GB cap
  python benchmarks/bench_finetune.py --family opt --gpu-mem-gb 16 --layers 32
  python benchmarks/bench_finetune.py --preset cpu          # smoke run on the CPU (tiny shape)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reldl.llm.config import parse_config  # noqa: E402
from reldl.llm.finetune.trainer import Settings, Trainer  # noqa: E402
from reldl.llm.offload import layers  # noqa: E402

SHAPES = {
    "llama": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=11008,
        num_attention_heads=32, num_key_value_heads=32, num_hidden_layers=32, vocab_size=32000,
        max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    ),
    "opt": dict(
        model_type="opt", architectures=["OPTForCausalLM"], hidden_size=4096, ffn_dim=16384, num_attention_heads=32,
        num_hidden_layers=32, vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=4096,
        do_layer_norm_before=True, activation_function="relu", enable_bias=True, tie_word_embeddings=True,
        bos_token_id=2, eos_token_id=2,
    ),
}  # fmt: skip
TINY = dict(hidden_size=256, intermediate_size=688, ffn_dim=1024, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=1000, max_position_embeddings=512, word_embed_proj_dim=256)  # fmt: skip


def config(family: str, layers_: int, tiny: bool):
    raw = dict(SHAPES[family])
    if tiny:
        raw.update({k: v for k, v in TINY.items() if k in raw or k == "num_key_value_heads" and family == "llama"})
    raw["num_hidden_layers"] = layers_
    d = Path(tempfile.mkdtemp(prefix="bench-ft-"))
    (d / "config.json").write_text(json.dumps(raw))
    return parse_config(d)


def random_weights(cfg, seed=0, device=None, on=None):
    """fp32 weights (matrices N(0, 0.02), norms 1, biases 0) on `on` (default CPU), drawn on `device` (CUDA: fast
    for the 6.7B shape; the CPU generator takes about a minute)."""
    device = torch.device(device or "cpu")
    g = torch.Generator(device).manual_seed(seed)
    out = {}
    for _, ws in layers.units(cfg):
        for key, hf in ws:
            if hf in out:
                continue
            shape = _shape(cfg, key)
            t = torch.empty(shape, device=device)
            if len(shape) == 1:
                t.fill_(1.0 if "ln" in key or "norm" in key else 0.0)
            else:
                t.normal_(0, 0.02, generator=g)
            out[hf] = t.to(on or "cpu")
            del t
    return out


def embedding_params(cfg, w) -> int:
    """Parameters of the input embeddings (a lookup, no matmul FLOPs); a tied head is a matmul and stays counted."""
    names = [hf for key, hf in layers.units(cfg)[0][1] if key in ("tok", "pos")]
    head = {hf for _, hf in layers.units(cfg)[-1][1]}
    return sum(w[hf].numel() for hf in names if hf not in head)


def _shape(cfg, key):
    h, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    return {
        "tok": (cfg.vocab_size, h), "pos": (cfg.max_positions + 2, h), "lm_head": (cfg.vocab_size, h),
        "q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "q.b": (q,), "k.b": (kv,), "v.b": (kv,), "o.b": (h,),
        "gate": (f, h), "up": (f, h), "down": (h, f), "fc1": (f, h), "fc2": (h, f), "fc1.b": (f,), "fc2.b": (h,),
    }.get(key, (h,))  # fmt: skip


def n_params(w):
    return sum(t.numel() for t in w.values())


def matmul_tflops(device):
    if device.type != "cuda":
        a = torch.randn(1024, 1024)
        t0 = time.perf_counter()
        for _ in range(5):
            a @ a
        return 5 * 2 * 1024**3 / (time.perf_counter() - t0) / 1e12
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
    return 20 * 2 * n**3 / (time.perf_counter() - t0) / 1e12


def batch(cfg, b, t, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.vocab_size, (b, t), generator=g)
    targets = torch.cat([ids[:, 1:], torch.full((b, 1), -100)], 1)
    return ids, targets


def run_reldl(cfg, args, device, cap):
    t0 = time.perf_counter()
    w = random_weights(cfg, device=device)
    init_s = time.perf_counter() - t0
    params = n_params(w)
    flop_params = params - embedding_params(cfg, w)
    s = Settings(method="full", batch_size=args.batch, max_length=args.seq, learning_rate=1e-5,
                 gpu_memory=cap, weight_placement=args.weight_placement,
                 activation_placement=args.activation_placement, micro_batch=args.micro_batch)  # fmt: skip
    t0 = time.perf_counter()
    tr = Trainer(None, s, device, torch.bfloat16 if device.type == "cuda" else torch.float32, config=cfg, weights=w)
    setup = time.perf_counter() - t0
    del w
    times, losses, adam_s = [], [], []
    for i in range(args.warmup + args.steps):
        ids, tg = batch(cfg, args.batch, args.seq, i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        busy = tr.adam.busy_s
        t0 = time.perf_counter()
        losses.append(tr.step(ids, tg))
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            adam_s.append(tr.adam.busy_s - busy)
    tr.adam.close()
    step = sorted(times)[len(times) // 2]
    tokens = args.batch * args.seq
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    out = dict(params=params, flop_params=flop_params, tokens_per_step=tokens,
               micro_batch=args.micro_batch or args.batch,
               init_weights_s=init_s, setup_s=setup, step_s=step, steps_s=times, losses=losses,
               cpu_adam_s_per_step=adam_s, tflops=6 * flop_params * tokens / step / 1e12,
               tflops_all_params=6 * params * tokens / step / 1e12, peak_gpu_gb=peak,
               ring_waits=tr.ring.waits if tr.ring is not None else None, resident_units=len(tr.resident),
               units=len(tr.units), activations_on_cpu=bool(tr.act_cpu),
               cpu_threads=torch.get_num_threads())  # fmt: skip
    del tr
    gc.collect()
    return out


def run_plain(cfg, args, device):
    """Plain PyTorch: fp32 parameters + fused Adam on the GPU, bf16 autocast, no checkpointing, the same tokens per
    step (gradient accumulation over the same micro-batches). Returns a dict or raises torch.cuda.OutOfMemoryError."""
    w = {k: v.requires_grad_() for k, v in random_weights(cfg, device=device, on=device).items()}
    params = n_params(w)
    flop_params = params - embedding_params(cfg, w)
    mb = args.micro_batch or args.batch
    opt = torch.optim.Adam(list(w.values()), lr=1e-5, fused=device.type == "cuda")
    units = layers.units(cfg)
    rope = None
    if cfg.family == "llama":
        from reldl.llm.rope import Rotary

        rope = Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_positions, device, torch.bfloat16)

    def attend(q, k, v):
        B, T, H, D = q.shape
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return o.transpose(1, 2).reshape(B, T, H * D)

    times = []
    for i in range(args.warmup + args.steps):
        ids_all, tg_all = (t.to(device) for t in batch(cfg, args.batch, args.seq, i))
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for a in range(0, args.batch, mb):
            ids, tg = ids_all[a : a + mb], tg_all[a : a + mb]
            pos = torch.arange(args.seq, device=device).expand(ids.shape[0], args.seq)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                x = layers.embed(cfg, {k: w[hf] for k, hf in units[0][1]}, ids, pos, torch.bfloat16)
                for u in range(1, len(units) - 1):
                    x = layers.layer(cfg, {k: w[hf] for k, hf in units[u][1]}, x, attend, pos, rope)
                logits = layers.head(cfg, {k: w[hf] for k, hf in units[-1][1]}, x)
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), tg.reshape(-1), ignore_index=-100)
            (loss * ids.shape[0] / args.batch).backward()
            del x, logits, loss
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]
    tokens = args.batch * args.seq
    return dict(params=params, flop_params=flop_params, step_s=step, tflops=6 * flop_params * tokens / step / 1e12,
                tflops_all_params=6 * params * tokens / step / 1e12)  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["gpu", "cpu"], default="gpu")
    ap.add_argument("--family", choices=["llama", "opt"], default="llama")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: 32, the 6.7B shape; cpu: 4)")
    ap.add_argument("--gpu-mem-gb", type=float, default=16.0)
    ap.add_argument("--batch", type=int, default=None, help="rows per optimizer step (default: cpu 2, gpu 64)")
    ap.add_argument("--micro-batch", type=int, default=None, help="rows per pass (default: cpu all, gpu 8)")
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--weight-placement", default="auto", choices=["auto", "gpu", "stream"])
    ap.add_argument("--activation-placement", default="auto", choices=["auto", "gpu", "cpu"])
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cpu = args.preset == "cpu"
    device = torch.device("cpu" if cpu else "cuda")
    full_layers = 4 if cpu else 32
    nl = args.layers or full_layers
    args.batch = args.batch or (2 if cpu else 64)
    args.micro_batch = args.micro_batch if args.micro_batch is not None else (0 if cpu else 8)
    args.seq = args.seq or (64 if cpu else 512)
    cfg = config(args.family, nl, cpu)
    cap = None
    if not cpu:
        total = torch.cuda.get_device_properties(device).total_memory
        cap = args.gpu_mem_gb * 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), torch.cuda.current_device())
    label = f"{args.family} {'tiny' if cpu else '6.7B'}-shaped, {nl} of {full_layers} layers" + (
        "" if nl == full_layers else " (fewer layers than the full model: NOT the full model)"
    )
    peak = matmul_tflops(device)
    out = dict(model=label, device=torch.cuda.get_device_name(device) if not cpu else "cpu",
               gpu_cap_gb=None if cpu else args.gpu_mem_gb, batch=args.batch, seq=args.seq,
               matmul_bf16_tflops=peak)  # fmt: skip
    if not cpu:
        torch.cuda.reset_peak_memory_stats(device)
    out["reldl"] = run_reldl(cfg, args, device, cap)
    path = args.json or f"benchmarks/results/finetune_{args.preset}_{args.family}_{nl}l.json"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1, default=str))  # again below, with the baseline
    r = out["reldl"]
    print(f"reldl: step {r['step_s']:.2f} s ({r['steps_s']}), {r['tflops']:.1f} TFLOPS, CPU Adam busy "
          f"{r['cpu_adam_s_per_step']} s/step, setup {r['setup_s']:.1f} s", flush=True)  # fmt: skip
    if not args.no_baseline:
        n = nl
        while n >= 1:
            oom = False
            try:
                res = run_plain(config(args.family, n, cpu), args, device)
                out["plain_pytorch"] = dict(res, layers=n, fits_full=(n == nl))
                break
            except torch.cuda.OutOfMemoryError:
                oom = True
                out.setdefault("plain_pytorch_oom_layers", []).append(n)
            if oom:  # outside the except block: the traceback no longer holds the failed run's tensors
                gc.collect()
                torch.cuda.empty_cache()
                n //= 2
        else:
            out["plain_pytorch"] = "OOM at 1 layer"
    r = out["reldl"]
    print(f"{label}; {out['device']}; cap {out['gpu_cap_gb']} GB; batch {args.batch} x {args.seq} tokens per step "
          f"(micro-batches of {r['micro_batch']}); TFLOPS = 6 x non-embedding params x tokens / step time")  # fmt: skip
    print(f"{'run':<34}{'params':>10}{'step s':>10}{'TFLOPS':>10}{'% matmul':>10}")
    print(f"{'matmul rate (measured)':<34}{'':>10}{'':>10}{peak:>10.1f}{100.0:>10.1f}")
    print(f"{'reldl offloaded (CPU Adam)':<34}{r['params'] / 1e9:>9.2f}B{r['step_s']:>10.2f}{r['tflops']:>10.1f}"
          f"{100 * r['tflops'] / peak:>10.1f}")  # fmt: skip
    p = out.get("plain_pytorch")
    if isinstance(p, dict):
        name = f"plain PyTorch ({p['layers']} layers{'' if p['fits_full'] else ', largest that fits'})"
        print(f"{name:<34}{p['params'] / 1e9:>9.2f}B{p['step_s']:>10.2f}{p['tflops']:>10.1f}"
              f"{100 * p['tflops'] / peak:>10.1f}")  # fmt: skip
    if out.get("plain_pytorch_oom_layers"):
        print(f"plain PyTorch OOM at layers: {out['plain_pytorch_oom_layers']}")
    print(f"reldl: {r['resident_units']}/{r['units']} units resident, activations on CPU: {r['activations_on_cpu']}, "
          f"peak GPU {r['peak_gpu_gb']} GB, CPU Adam busy {[round(x, 2) for x in r['cpu_adam_s_per_step']]} s/step "
          f"({r['cpu_threads']} threads), ring waits {r['ring_waits']}, setup {r['setup_s']:.1f} s, "
          f"losses {[round(x, 3) for x in r['losses']]}")  # fmt: skip
    Path(path).write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
