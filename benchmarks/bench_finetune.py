"""Offloaded full fine-tuning (reldl/llm/finetune, Fuyou-style) of a 6.7B-shaped model under a GPU memory cap.

Random weights (no checkpoint), Llama-2-7B or OPT-6.7B shapes. reldl's trainer keeps fp32 masters and Adam moments
on the CPU (Adam on a CPU thread, overlapped with the backward), bf16 working weights on the GPU resident or
streamed per layer under the cap, activation checkpoints per layer (swapped to pinned CPU memory when short).
Reported: step time, achieved TFLOPS = 6 * params * tokens / step time (the usual model-FLOPs convention: the
recompute of checkpointed layers is not counted), the GPU's bf16 matmul rate measured in the same run, and plain
PyTorch under the same cap (fp32 parameters and fused Adam on the GPU, bf16 autocast): OOM, and the largest layer
count that fits with its TFLOPS. `--layers N` trains N layers of the shape (the label says so).

  python benchmarks/bench_finetune.py                       # H100/H200: 6.7B Llama shape, 16 GB cap
  python benchmarks/bench_finetune.py --family opt --gpu-mem-gb 16 --layers 32
  python benchmarks/bench_finetune.py --preset cpu          # smoke run on the CPU (tiny shape)
"""

from __future__ import annotations

import argparse
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


def random_weights(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for _, ws in layers.units(cfg):
        for key, hf in ws:
            if hf in out:
                continue
            shape = _shape(cfg, key)
            t = torch.empty(shape)
            if len(shape) == 1:
                t.fill_(1.0 if "ln" in key or "norm" in key else 0.0)
            else:
                t.normal_(0, 0.02, generator=g)
            out[hf] = t
    return out


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
    w = random_weights(cfg)
    params = n_params(w)
    s = Settings(method="full", batch_size=args.batch, max_length=args.seq, learning_rate=1e-5,
                 gpu_memory=cap, weight_placement=args.weight_placement,
                 activation_placement=args.activation_placement)  # fmt: skip
    t0 = time.perf_counter()
    tr = Trainer(None, s, device, torch.bfloat16 if device.type == "cuda" else torch.float32, config=cfg, weights=w)
    setup = time.perf_counter() - t0
    del w
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        ids, tg = batch(cfg, args.batch, args.seq, i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses.append(tr.step(ids, tg))
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    tr.adam.close()
    step = sorted(times)[len(times) // 2]
    tokens = args.batch * args.seq
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(params=params, setup_s=setup, step_s=step, steps_s=times, losses=losses,
                tflops=6 * params * tokens / step / 1e12, peak_gpu_gb=peak,
                resident_units=len(tr.resident), units=len(tr.units), activations_on_cpu=bool(tr.act_cpu))  # fmt: skip


def run_plain(cfg, args, device):
    """Plain PyTorch: fp32 parameters + fused Adam on the GPU, bf16 autocast, no checkpointing. Returns a dict or
    raises torch.cuda.OutOfMemoryError."""
    w = {k: v.to(device).requires_grad_() for k, v in random_weights(cfg).items()}
    params = n_params(w)
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
        ids, tg = (t.to(device) for t in batch(cfg, args.batch, args.seq, i))
        pos = torch.arange(args.seq, device=device).expand(args.batch, args.seq)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            x = layers.embed(cfg, {k: w[hf] for k, hf in units[0][1]}, ids, pos, torch.bfloat16)
            for u in range(1, len(units) - 1):
                x = layers.layer(cfg, {k: w[hf] for k, hf in units[u][1]}, x, attend, pos, rope)
            logits = layers.head(cfg, {k: w[hf] for k, hf in units[-1][1]}, x)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), tg.view(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]
    return dict(params=params, step_s=step, tflops=6 * params * args.batch * args.seq / step / 1e12)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["gpu", "cpu"], default="gpu")
    ap.add_argument("--family", choices=["llama", "opt"], default="llama")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: 32, the 6.7B shape; cpu: 4)")
    ap.add_argument("--gpu-mem-gb", type=float, default=16.0)
    ap.add_argument("--batch", type=int, default=None)
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
    args.batch = args.batch or (2 if cpu else 8)
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
    out["reldl"] = run_reldl(cfg, args, device, cap)
    if not args.no_baseline:
        n = nl
        while n >= 1:
            try:
                res = run_plain(config(args.family, n, cpu), args, device)
                out["plain_pytorch"] = dict(res, layers=n, fits_full=(n == nl))
                break
            except torch.cuda.OutOfMemoryError:
                out.setdefault("plain_pytorch_oom_layers", []).append(n)
                torch.cuda.empty_cache()
                n //= 2
        else:
            out["plain_pytorch"] = "OOM at 1 layer"
    r = out["reldl"]
    print(f"{label}; {out['device']}; cap {out['gpu_cap_gb']} GB; batch {args.batch} x {args.seq} tokens")
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
          f"peak GPU {r['peak_gpu_gb']} GB, losses {[round(x, 3) for x in r['losses']]}")  # fmt: skip
    path = args.json or f"benchmarks/results/finetune_{args.preset}_{args.family}_{nl}l.json"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
