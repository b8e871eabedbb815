"""Decode latency per token of an OPT-13B-shaped model, dense vs DejaVu-sparse at fixed density, predictor included.

    python benchmarks/bench_sparse_decode.py                   # GPU (H100): OPT-13B shape, fp16, 40 layers
    python benchmarks/bench_sparse_decode.py --layers 8        # fewer layers (per-token time scales with layers)
    python benchmarks/bench_sparse_decode.py --preset cpu      # tiny shape on the CPU (smoke test)

The model: OPT-13B's shape (hidden 5120, 40 heads, MLP 20480, vocab 50272, ReLU, biases), random weights (std 0.02),
fp16, built directly from a ModelConfig (no checkpoint). The sparse variant: the same model with every MLP replaced
by `DejaVuMLP` (reldl/llm/sparse) with a random low-rank predictor (rank 128 by default) and a fixed density (5%, 10%,
20% of the neurons: k = density * 20480 per layer), exactly as a calibrated variant runs, so the predictor's cost
(d -> r -> n GEMVs and the top-k) is included; with random weights the *choice* of neurons is meaningless, the cost
is the same. Look-ahead on: layer i+1's predictor and its top-k selection run on a side stream while layer i's MLP
and layer i+1's attention run (joined at layer i+1's MLP); `inline` rows run them on the main stream instead.
Per-component costs of one layer: benchmarks/bench_sparse_components.py.

Timing: the reldl Engine as served (continuous batching, CUDA-graph decode steps, greedy sampling). A request of
P prompt tokens is generated twice, with 1 and with 1 + N new tokens; per-token latency = (t(1 + N) - t(1)) / N, the
median over --repeats. So prefill, which runs dense in the sparse variant too, cancels out. Batch > 1 computes the
union of the rows' neuron sets (fixed size min(n, B*k)).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "opt-13b": dict(hidden=5120, heads=40, inter=20480, vocab=50272, layers=40),
    "tiny": dict(hidden=64, heads=4, inter=256, vocab=512, layers=2),
}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="gpu", choices=["gpu", "cpu"])
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the shape's (say so when reporting)")
    ap.add_argument("--densities", nargs="*", type=float, default=[0.05, 0.1, 0.2])
    ap.add_argument("--batches", nargs="*", type=int, default=[1])
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=128, help="decode steps timed per measurement")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-inline", action="store_true", help="skip the look-ahead-off rows")
    ap.add_argument("--out", default=None)
    return ap.parse_args()


class _Tokens:
    """The engine's tokenizer interface, for token-id requests only."""

    def decode(self, ids, skip_special_tokens=True):
        return ""

    def encode_batch(self, texts):
        raise NotImplementedError


def build_model(shape: dict, layers: int, device, dtype):
    import torch

    from reldl.llm.config import ModelConfig
    from reldl.llm.models import opt

    d = shape["hidden"]
    cfg = ModelConfig(
        family="opt",
        model_type="opt",
        vocab_size=shape["vocab"],
        hidden_size=d,
        num_layers=layers,
        num_heads=shape["heads"],
        num_kv_heads=shape["heads"],
        head_dim=d // shape["heads"],
        intermediate_size=shape["inter"],
        max_positions=2048,
        attention_bias=True,
        mlp_bias=True,
        activation="relu",
        word_embed_proj_dim=d,
        eos_token_ids=[],  # never stop early: every request decodes all its tokens
    )
    with torch.device("meta"):
        model = opt.Transformer(cfg)
    model = model.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.01, generator=gen)
    model.setup(device, dtype)
    return model.eval().requires_grad_(False)


def sparse_variant(model, density: float, rank: int, tmp: Path, tag: str = ""):
    """The model with DejaVu MLPs at a fixed density and random predictors, through the real variant path."""
    import torch

    from reldl.llm.sparse import variant

    cfg = model.config
    d, n = cfg.hidden_size, cfg.intermediate_size
    k = max(1, round(density * n))
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(cfg.num_layers):
        tensors[f"layers.{i}.a"] = torch.randn(d, rank, generator=g) / d**0.5
        tensors[f"layers.{i}.b"] = torch.randn(rank, n, generator=g) / rank**0.5
        tensors[f"layers.{i}.c"] = torch.zeros(n)
    spec = {
        "method": "dejavu",
        "sparsity": 1 - density,
        "num_layers": cfg.num_layers,
        "hidden_size": d,
        "layers": [{"layer": i, "selected": k, "neurons": n} for i in range(cfg.num_layers)],
    }
    target = tmp / f"{tag}d{density}"  # one directory per (batch, density): save_variant refuses a non-empty one
    variant.save_variant(target, spec, tensors)
    return variant.build_variant(model, target, dict(spec, format=variant.FORMAT))


def per_token(model, device, dtype, batch: int, args) -> float:
    import torch

    from reldl.llm import SamplingParams
    from reldl.llm.engine import Engine

    cache = batch * (args.prompt + args.tokens + 32)
    eng = Engine(model, _Tokens(), device=device, dtype=dtype, max_batch=batch, cache_tokens=cache)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, model.config.vocab_size, (args.prompt,), generator=g).tolist() for _ in range(batch)]

    def run(n: int) -> float:
        sp = [SamplingParams(max_tokens=n)] * batch
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        eng.generate_ids(prompts, sp)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    run(1 + args.tokens)  # warm-up: CUDA-graph capture, Triton compilation
    diffs = [(run(1 + args.tokens) - run(1)) / args.tokens for _ in range(args.repeats)]
    return statistics.median(diffs)


def main() -> None:
    args = parse_args()
    import torch

    cpu = args.preset == "cpu"
    if not cpu and not torch.cuda.is_available():
        sys.exit("no CUDA GPU: use --preset cpu for the smoke test")
    if cpu:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        args.tokens, args.repeats, args.prompt = min(args.tokens, 8), min(args.repeats, 2), min(args.prompt, 16)
    device = torch.device("cpu" if cpu else "cuda")
    dtype = torch.float32 if cpu else torch.float16
    shape_name = "tiny" if cpu else "opt-13b"
    shape = SHAPES[shape_name]
    layers = args.layers or shape["layers"]
    rank = min(args.rank, shape["hidden"])
    model = build_model(shape, layers, device, dtype)
    card = torch.cuda.get_device_name(0) if not cpu else platform.processor() or platform.machine()
    print(f"{shape_name} shape, {layers} of {shape['layers']} layers, {dtype}, {card}; per-token decode latency")
    print(f"{'batch':>5} {'variant':<28} {'ms/token':>9} {'speedup':>8}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="reldl-sparse-decode-") as d:
        for batch in args.batches:
            dense_s = per_token(model, device, dtype, batch, args)
            rows.append({"batch": batch, "variant": "dense", "density": 1.0, "ms_per_token": dense_s * 1e3})
            print(f"{batch:>5} {'dense':<28} {dense_s * 1e3:>9.3f} {1.0:>8.2f}", flush=True)
            for density in args.densities:
                sparse = sparse_variant(model, density, rank, Path(d), f"b{batch}-")
                modes = [True] if args.no_inline else [True, False]
                for overlap in modes:
                    sparse.sparse_lookahead.overlap = overlap
                    s = per_token(sparse, device, dtype, batch, args)
                    name = f"dejavu {density:.0%} ({'look-ahead' if overlap else 'inline predictor'})"
                    rows.append(
                        {
                            "batch": batch,
                            "variant": name,
                            "density": density,
                            "lookahead": overlap,
                            "ms_per_token": s * 1e3,
                            "speedup": dense_s / s,
                        }
                    )
                    print(f"{batch:>5} {name:<28} {s * 1e3:>9.3f} {dense_s / s:>8.2f}", flush=True)
                del sparse
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    out = {
        "date": datetime.date.today().isoformat(),
        "device": card,
        "shape": shape_name,
        "layers": layers,
        "full_layers": shape["layers"],
        "dtype": str(dtype),
        "predictor_rank": rank,
        "prompt_tokens": args.prompt,
        "timed_tokens": args.tokens,
        "torch": torch.__version__,
        "command": "python benchmarks/bench_sparse_decode.py " + " ".join(sys.argv[1:]),
        "rows": rows,
    }
    path = Path(args.out or ROOT / "benchmarks" / "out" / f"sparse_decode{'-cpu' if cpu else ''}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
