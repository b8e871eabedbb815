"""Tree decoding (issue 6): n samples of one long prompt decoded as a tree vs as n separate sequences.

End-to-end throughput (generated tokens / wall seconds of `Engine.generate_ids`, prefill included) of
- tree:      one request with `n := N`: the prompt prefilled once, N branches forked from its cache blocks, decode
             steps reading each shared block once (tree attention; reldl's Triton kernel on CUDA when present);
- separate:  N requests of the same prompt with the branches' seeds (`branch_seed`), per-row attention (each row
             reads its whole context; the engine's prefix sharing still prefills the prompt once; CUDA graphs);
- separate+tree (--all): the same N requests with tree attention on (their shared prompt blocks make a tree).
Same prompts, seeds and max_tokens; no EOS (random weights, the EOS id is never sampled: every branch generates
max_tokens). Token identity of tree vs separate is checked under greedy decoding (and reported for sampling).

The model is Llama-3-8B-shaped (hidden 4096, 32 heads, 8 KV heads, head dim 128, MLP 14336, vocab 128256) with random
weights built in memory (no checkpoint on disk); `--layers` (default 32, the full depth) may be lowered.

    python benchmarks/bench_tree_decode.py                       # GPU preset, fp16, prompts 1024/4096, n 8/16/32
    python benchmarks/bench_tree_decode.py --preset cpu          # a tiny float32 model on the CPU (smoke test)

Prints a table and writes JSON (benchmarks/out/tree_decode.json; the cpu preset tree_decode-cpu.json).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import random
import time
from pathlib import Path

import torch
from _common import parse_settings
from tokenizers import Tokenizer, models, pre_tokenizers

from reldl.llm import SamplingParams, fused
from reldl.llm.config import ModelConfig
from reldl.llm.engine import Engine
from reldl.llm.models import llama
from reldl.llm.params import branch_seed

PRESETS = {
    "gpu": dict(
        hidden=4096,
        layers=32,
        heads=32,
        kv_heads=8,
        head_dim=128,
        inter=14336,
        vocab=128256,
        prompts=[1024, 4096],
        n=[8, 16, 32],
        requests=1,
        max_tokens=128,
        temperature=0.8,
        dtype="float16",
        device="cuda",
    ),
    "cpu": dict(
        hidden=256,
        layers=2,
        heads=8,
        kv_heads=4,
        head_dim=32,
        inter=512,
        vocab=1000,
        prompts=[100, 300],
        n=[4, 8],
        requests=1,
        max_tokens=16,
        temperature=0.8,
        dtype="float32",
        device="cpu",
    ),
}


def build_model(p: dict) -> tuple[torch.nn.Module, Tokenizer]:
    """A random Llama of the preset's shapes, directly on the device (std 0.02, norms 1; no EOS token)."""
    cfg = ModelConfig(
        family="llama",
        model_type="llama",
        vocab_size=p["vocab"],
        hidden_size=p["hidden"],
        num_layers=p["layers"],
        num_heads=p["heads"],
        num_kv_heads=p["kv_heads"],
        head_dim=p["head_dim"],
        intermediate_size=p["inter"],
        max_positions=8192,
        rope_theta=500000.0,
    )
    dev, dt = torch.device(p["device"]), getattr(torch, p["dtype"])
    with torch.device("meta"):
        model = llama.Transformer(cfg)
    model = model.to(dt).to_empty(device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if w.ndim == 1:
                w.fill_(1.0)
            else:
                w.normal_(0.0, 1.0 if name.startswith("embed") else 0.02, generator=gen)
    model.setup(dev, dt)
    model.eval().requires_grad_(False)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(p["vocab"])}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return model, tok


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def requests(mode: str, prompts: list[list[int]], n: int, p: dict, greedy: bool):
    """The prompts and parameters of one run: one n-sample request per prompt, or n separate requests each."""
    temp = 0.0 if greedy else p["temperature"]
    if mode == "tree":
        return prompts, [SamplingParams(max_tokens=p["max_tokens"], temperature=temp, seed=7 + i, n=n)
                         for i in range(len(prompts))]  # fmt: skip
    ids, params = [], []
    for i, pr in enumerate(prompts):
        for b in range(n):
            ids.append(pr)
            params.append(SamplingParams(max_tokens=p["max_tokens"], temperature=temp, seed=branch_seed(7 + i, b)))
    return ids, params


def run(eng: Engine, mode: str, prompts, n: int, p: dict, greedy: bool) -> dict:
    eng.tree_attention = mode != "separate"
    ids, params = requests(mode, prompts, n, p, greedy)
    steps = {"tree": 0, "rows": 0}
    decode = eng._decode

    def counting(seqs, tree=False):
        steps["tree"] += bool(tree)
        steps["rows"] += 1
        return decode(seqs, tree)

    eng._decode = counting
    try:
        sync(p["device"])
        start = time.perf_counter()
        results = eng.generate_ids(ids, params)
        sync(p["device"])
        seconds = time.perf_counter() - start
    finally:
        del eng._decode
    tokens = [b.token_ids for r in results for b in (r.branches or [r])]
    generated = sum(len(t) for t in tokens)
    return {
        "mode": mode,
        "greedy": greedy,
        "seconds": seconds,
        "generated_tokens": generated,
        "tokens_per_s": generated / seconds,
        "decode_steps": steps["rows"],
        "tree_steps": steps["tree"],
        "tokens": tokens,
    }


def agreement(tree: list[list[int]], base: list[list[int]], first: int = 16) -> dict:
    """How far tree and separate tokens agree, branch by branch: the first position where they differ (the whole
    length where they never do), its median and minimum, and the share of equal tokens among the first `first`."""
    div = []
    same = total = 0
    for a, b in zip(tree, base):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        div.append(k)
        same += sum(x == y for x, y in zip(a[:first], b[:first]))
        total += min(first, max(len(a), len(b)))
    div.sort()
    return {
        "first_divergence_median": div[len(div) // 2] if div else 0,
        "first_divergence_min": div[0] if div else 0,
        f"agree_first_{first}": same / total if total else 1.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--prompts", type=int, nargs="+", help="prompt lengths (tokens)")
    ap.add_argument("--n", type=int, nargs="+", help="samples per prompt")
    ap.add_argument("--requests", type=int, help="prompts decoded together (each with n samples)")
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--all", action="store_true", help="also time separate requests with tree attention")
    ap.add_argument(
        "--tree-config",
        default="",
        help="K=V,...: tree-attention config entries for this run (kernels.tree_attention.CONFIG_OVERRIDES), "
        "e.g. BLOCK_N=32",
    )
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    tree_config = parse_settings(args.tree_config, "bench_tree_decode: --tree-config")
    if tree_config:
        importlib.import_module("reldl.kernels.tree_attention").CONFIG_OVERRIDES.update(tree_config)
    p = dict(PRESETS[args.preset])
    for k in ("layers", "prompts", "n", "requests", "max_tokens"):
        if getattr(args, k) is not None:
            p[k] = getattr(args, k)
    name = "tree_decode.json" if args.preset == "gpu" else f"tree_decode-{args.preset}.json"
    out = args.out or Path(__file__).parent / "out" / name
    model, tok = build_model(p)
    rows = p["requests"] * max(p["n"])
    eng = Engine(model, tok, device=torch.device(p["device"]), dtype=getattr(torch, p["dtype"]), max_batch=rows)
    kernel = fused.on(torch.empty(1, device=p["device"]))
    uses_kernel = kernel is not None and getattr(kernel, "tree_attention", None) is not None
    modes = ["tree", "separate"] + (["separate+tree"] if args.all else [])
    rng = random.Random(1)
    for mode in modes:  # warm-up: first use of the kernels and allocator (each case also runs untimed first)
        run(eng, mode, [[1] * 40], 2, {**p, "max_tokens": 4}, greedy=True)
    cases = []
    for length in p["prompts"]:
        prompts = [[rng.randrange(1, p["vocab"]) for _ in range(length)] for _ in range(p["requests"])]
        for n in p["n"]:
            case = {"prompt_tokens": length, "n": n, "requests": p["requests"], "runs": {}}
            for mode in modes:
                # the greedy run doubles as warm-up (kernels, CUDA graphs of this batch and block-table size)
                g = run(eng, mode, prompts, n, p, greedy=True)
                s = run(eng, mode, prompts, n, p, greedy=False)
                g2 = run(eng, mode, prompts, n, p, greedy=True)
                case["runs"][mode] = {"greedy": g2, "sampled": s, "greedy_first": g}
            base, tree = case["runs"]["separate"], case["runs"]["tree"]
            for kind in ("greedy", "sampled"):
                case[f"speedup_{kind}"] = tree[kind]["tokens_per_s"] / base[kind]["tokens_per_s"]
                same = sum(a == b for a, b in zip(tree[kind]["tokens"], base[kind]["tokens"]))
                case[f"identical_{kind}"] = same / len(base[kind]["tokens"])
                case[f"agreement_{kind}"] = agreement(tree[kind]["tokens"], base[kind]["tokens"])
            cases.append(case)
            print(
                f"prompt {length:>5}  n {n:>3}: tree {tree['sampled']['tokens_per_s']:9.1f} tok/s, separate "
                f"{base['sampled']['tokens_per_s']:9.1f} tok/s, speedup {case['speedup_sampled']:.2f}x "
                f"(greedy {case['speedup_greedy']:.2f}x), identical greedy {case['identical_greedy']:.0%}, greedy "
                f"first divergence median {case['agreement_greedy']['first_divergence_median']}, first 16 agree "
                f"{case['agreement_greedy']['agree_first_16']:.0%}",
                flush=True,
            )
    for c in cases:  # token lists only for the identity numbers, not in the JSON
        for r in c["runs"].values():
            for v in r.values():
                v.pop("tokens")
    result = {
        "preset": args.preset,
        "params": p,
        "model": "Llama-3-8B shapes, random weights" + ("" if p["layers"] == 32 else f", {p['layers']} layers"),
        "device": torch.cuda.get_device_name(0) if p["device"].startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "tree_attention": "triton kernel" if uses_kernel else "pytorch reference",
        "tree_config": tree_config,
        "cases": cases,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(
        f"\nbench_tree_decode preset={args.preset} device={result['device']} layers={p['layers']} dtype={p['dtype']} "
        f"max_tokens={p['max_tokens']} requests={p['requests']} tree attention: {result['tree_attention']}"
    )
    head = f"{'prompt':>7}{'n':>5}{'mode':>15}{'sampled tok/s':>15}{'greedy tok/s':>14}{'tree steps':>12}"
    print(head + f"{'speedup':>9}{'same greedy':>13}{'same sampled':>14}{'div@ (greedy)':>15}{'agree16 g/s':>13}")
    for c in cases:
        for mode, r in c["runs"].items():
            ag, asm = c["agreement_greedy"], c["agreement_sampled"]
            extra = (
                f"{c['speedup_sampled']:>8.2f}x{c['identical_greedy']:>13.0%}{c['identical_sampled']:>14.0%}"
                f"{ag['first_divergence_median']:>9} (min {ag['first_divergence_min']:>3})"
                f"{ag['agree_first_16']:>7.0%}/{asm['agree_first_16']:.0%}"
                if mode == "tree"
                else ""
            )
            print(
                f"{c['prompt_tokens']:>7}{c['n']:>5}{mode:>15}{r['sampled']['tokens_per_s']:>15.1f}"
                f"{r['greedy']['tokens_per_s']:>14.1f}{r['sampled']['tree_steps']:>7}/{r['sampled']['decode_steps']:<4}"
                + extra
            )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
