"""Generation throughput: `SELECT llm_generate(...)` vs reldl's engine called directly vs transformers' `generate`.

Same random Llama-architecture checkpoint, same prompts, greedy, same batch size. Also times one decode step against
the time to read the weights once from memory (the floor for a memory-bound decode step).

    python benchmarks/bench_generate.py --preset cpu            # small model on the CPU
    python benchmarks/bench_generate.py --preset gpu            # ~1.1B parameters, bfloat16, on a CUDA GPU

Prints a table and writes JSON (default benchmarks/out/generate-<preset>.json).
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import random
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

import reldl
from reldl import registry
from reldl.llm import SamplingParams, fused
from reldl.llm.engine import Engine, _Seq
from reldl.udfs.llm import LLMFunctions

PRESETS = {
    # ~20M parameters: quick on 2 CPU cores
    "cpu": dict(
        hidden=256,
        layers=4,
        heads=8,
        kv_heads=4,
        inter=688,
        vocab=8000,
        rows=64,
        batch=16,
        prompt=32,
        max_tokens=32,
        dtype="float32",
        device="cpu",
        hf_batches=4,
    ),
    # TinyLlama-1.1B shapes
    "gpu": dict(
        hidden=2048,
        layers=22,
        heads=32,
        kv_heads=4,
        inter=5632,
        vocab=32000,
        rows=512,
        batch=64,
        prompt=128,
        max_tokens=128,
        dtype="bfloat16",
        device="cuda",
        hf_batches=1,
    ),
}


def make_checkpoint(out: Path, p: dict, seed: int = 0) -> Path:
    """A random Llama checkpoint (config.json, model.safetensors, word-level tokenizer.json). No EOS, so every
    request generates exactly max_tokens and all three paths do the same work."""
    out.mkdir(parents=True, exist_ok=True)
    h, d = p["hidden"], p["hidden"] // p["heads"]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": p["vocab"],
        "hidden_size": h,
        "intermediate_size": p["inter"],
        "num_hidden_layers": p["layers"],
        "num_attention_heads": p["heads"],
        "num_key_value_heads": p["kv_heads"],
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": 0,
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": None, "pad_token_id": 0}))
    vocab = {f"w{i}": i for i in range(p["vocab"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))
    gen = torch.Generator(device=p["device"]).manual_seed(seed)
    dt = getattr(torch, p["dtype"])

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=gen, device=p["device"]) * std).to(dt).cpu()

    t = {"model.embed_tokens.weight": rnd(p["vocab"], h, std=1.0), "lm_head.weight": rnd(p["vocab"], h)}
    t["model.norm.weight"] = torch.ones(h, dtype=dt)
    for i in range(p["layers"]):
        q = f"model.layers.{i}."
        t[q + "self_attn.q_proj.weight"] = rnd(p["heads"] * d, h)
        t[q + "self_attn.k_proj.weight"] = rnd(p["kv_heads"] * d, h)
        t[q + "self_attn.v_proj.weight"] = rnd(p["kv_heads"] * d, h)
        t[q + "self_attn.o_proj.weight"] = rnd(h, p["heads"] * d)
        t[q + "mlp.gate_proj.weight"] = rnd(p["inter"], h)
        t[q + "mlp.up_proj.weight"] = rnd(p["inter"], h)
        t[q + "mlp.down_proj.weight"] = rnd(h, p["inter"])
        t[q + "input_layernorm.weight"] = torch.ones(h, dtype=dt)
        t[q + "post_attention_layernorm.weight"] = torch.ones(h, dtype=dt)
    save_file(t, str(out / "model.safetensors"))
    return out


def make_prompts(n: int, length: int, vocab: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(1, vocab)}" for _ in range(length)) for _ in range(n)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_engine(eng, prompts, p) -> dict:
    """Engine.generate on the prompt strings (tokenization included, as in the SQL path)."""
    params = [SamplingParams(max_tokens=p["max_tokens"])] * len(prompts)
    sync(p["device"])
    t = time.perf_counter()
    res = eng.generate(prompts, params)
    sync(p["device"])
    secs = time.perf_counter() - t
    tokens = sum(len(r.token_ids) for r in res)
    return {"seconds": secs, "tokens": tokens, "tokens_per_s": tokens / secs, "texts": [r.text for r in res]}


def bench_engine_in_thread(eng, prompts, p) -> dict:
    """The same call from a non-main thread, as DuckDB makes it: separates threading effects from SQL overhead."""
    box: dict = {}
    t = threading.Thread(target=lambda: box.update(bench_engine(eng, prompts, p)))
    t.start()
    t.join()
    return box


def bench_sql(path: Path, eng, prompts, p, threads: int | None = None) -> dict:
    """SQL path; also records how much of it is spent inside the engine (the rest is DuckDB + the UDF adapter)."""
    inner = {"seconds": 0.0}
    engine_call = Engine.generate_ids  # the SQL path's engine is the registry's, not `eng`: patch the class

    def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return engine_call(self, *args, **kwargs)
        finally:
            sync(p["device"])
            inner["seconds"] += time.perf_counter() - t0

    udf_call = LLMFunctions.generate

    def timed_udf(self, *args):
        t0 = time.perf_counter()
        try:
            return udf_call(self, *args)
        finally:
            inner["udf_seconds"] = inner.get("udf_seconds", 0.0) + time.perf_counter() - t0

    timed_udf.__signature__ = inspect.signature(udf_call)  # DuckDB reads the arity
    LLMFunctions.generate = timed_udf
    con = reldl.connect()
    con.execute(
        f"CREATE MODEL bench OPTIONS (model_type = 'llm', path = '{path}', dtype = '{p['dtype']}', "
        f"device = '{p['device']}')"
    )
    con.execute("CREATE TABLE prompts (id INTEGER, prompt VARCHAR)")
    con.cursor().executemany("INSERT INTO prompts VALUES (?, ?)", list(enumerate(prompts)))
    if threads is not None:
        con.execute(f"SET threads = {threads}")
    # untimed full-size run first, as for the engine: the SQL path's engine captures its own CUDA graphs and sizes
    # its allocator. One token fewer, so the timed run does not hit the UDF's result cache.
    con.execute(f"SELECT count(llm_generate(prompt, max_tokens := {p['max_tokens'] - 1})) FROM prompts").fetchall()
    inner["udf_seconds"] = 0.0
    Engine.generate_ids = timed
    sync(p["device"])
    t = time.perf_counter()
    con.execute(
        f"CREATE TABLE out AS SELECT id, llm_generate(prompt, max_tokens := {p['max_tokens']}) AS g FROM prompts"
    )
    sync(p["device"])
    secs = time.perf_counter() - t
    texts = [r[0] for r in con.execute("SELECT g FROM out ORDER BY id").fetchall()]
    tokens = len(prompts) * p["max_tokens"]
    con.close()
    Engine.generate_ids = engine_call
    LLMFunctions.generate = udf_call
    return {
        "udf_seconds": inner.get("udf_seconds", 0.0),
        "seconds": secs,
        "tokens": tokens,
        "tokens_per_s": tokens / secs,
        "engine_seconds_inside": inner["seconds"],
        "texts": texts,
    }


def bench_transformers(path: Path, eng, prompts, p) -> dict | None:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    dt = getattr(torch, p["dtype"])
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dt).to(p["device"]).eval()
    batches = [prompts[i : i + p["batch"]] for i in range(0, len(prompts), p["batch"])][: p["hf_batches"]]

    def run(batch: list[str], max_tokens: int) -> torch.Tensor:
        ids = torch.tensor([eng.encode(x) for x in batch], device=p["device"])
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                pad_token_id=0,
            )
        return out[:, ids.shape[1] :]

    run(batches[0], 2)  # warm-up
    sync(p["device"])
    t = time.perf_counter()
    new = [run(b, p["max_tokens"]) for b in batches]
    sync(p["device"])
    secs = time.perf_counter() - t
    tokens = sum(x.numel() for x in new)
    texts = [eng.decode(row.tolist()) for x in new for row in x]
    return {"seconds": secs, "tokens": tokens, "tokens_per_s": tokens / secs, "texts": texts}


def decode_step_ms(base, p, context: int, triton: bool = True) -> dict:
    """Time one decode step for a full batch at a given context length (host prep + forward + logits), on a fresh
    engine sharing the model's weights, with reldl's Triton kernels or the PyTorch path."""
    fused.enabled = triton
    eng = Engine(
        base.model,
        base.tokenizer,
        device=base.device,
        dtype=base.dtype,
        max_batch=p["batch"],
        cache_tokens=p["batch"] * (context + 32),
    )
    seqs = []
    for i in range(p["batch"]):
        s = _Seq(i, [1] * context, SamplingParams(max_tokens=1), 0)
        s.blocks = eng.cache.allocator.allocate(eng.cache.blocks_for(context + 1))
        seqs.append(s)
    try:
        with torch.inference_mode():
            for _ in range(3):
                eng._decode(seqs)
            sync(p["device"])
            n = 20
            t = time.perf_counter()
            for _ in range(n):
                eng._decode(seqs)
            sync(p["device"])
            step = (time.perf_counter() - t) / n
    finally:
        for s in seqs:
            eng.cache.allocator.free(s.blocks)
        fused.enabled = True
    return {"context": context, "batch": p["batch"], "triton": triton, "ms": step * 1e3}


def weight_read_ms(eng, p) -> dict:
    nbytes = sum(t.numel() * t.element_size() for t in eng.model.parameters())
    if not p["device"].startswith("cuda"):
        return {"weight_bytes": nbytes}
    a = torch.empty(1 << 30, dtype=torch.uint8, device=p["device"])
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync(p["device"])
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ev0.record()
    for _ in range(10):
        b.copy_(a)
    ev1.record()
    sync(p["device"])
    bw = 2 * a.numel() * 10 / (ev0.elapsed_time(ev1) / 1e3)  # bytes read + written per second
    del a, b
    return {"weight_bytes": nbytes, "copy_bandwidth_GBps": bw / 1e9, "ms": nbytes / bw * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    for k in ("rows", "batch", "prompt", "max_tokens", "hf_batches"):
        ap.add_argument("--" + k.replace("_", "-"), type=int)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    p = dict(PRESETS[args.preset])
    for k in ("rows", "batch", "prompt", "max_tokens", "hf_batches"):
        if getattr(args, k) is not None:
            p[k] = getattr(args, k)
    out = args.out or Path(__file__).parent / "out" / f"generate-{args.preset}.json"
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp) / "model", p)
        prompts = make_prompts(p["rows"], p["prompt"], p["vocab"])
        eng = registry.get_engine("bench", str(path), p["dtype"], p["device"], max_batch=p["batch"])
        eng.generate(prompts[: p["batch"]], SamplingParams(max_tokens=4))  # warm-up: load, graphs, allocator
        bench_engine(eng, prompts, p)  # one untimed full-size run: allocator, kernels and graphs for these shapes
        direct = bench_engine(eng, prompts, p)
        sql = bench_sql(path, eng, prompts, p)
        direct2 = bench_engine(eng, prompts, p)  # again, so drift shows
        threaded = bench_engine_in_thread(eng, prompts, p)
        sql1 = bench_sql(path, eng, prompts, p, threads=1)
        hf = bench_transformers(path, eng, prompts, p)
        contexts = (p["prompt"], p["prompt"] + p["max_tokens"], 2048 - 32)
        kinds = (True, False) if p["device"].startswith("cuda") else (False,)  # Triton kernels run on CUDA only
        steps = [decode_step_ms(eng, p, c, t) for c in contexts for t in kinds]
        floor = weight_read_ms(eng, p)
    best_direct = min(direct["seconds"], direct2["seconds"])
    same_sql = sum(a == b for a, b in zip(sql["texts"], direct["texts"])) / len(prompts)
    result = {
        "preset": args.preset,
        "params": p,
        "device": torch.cuda.get_device_name(0) if p["device"].startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "engine": {k: v for k, v in direct.items() if k != "texts"},
        "engine_repeat": {k: v for k, v in direct2.items() if k != "texts"},
        "engine_worker_thread": {k: v for k, v in threaded.items() if k != "texts"},
        "sql": {k: v for k, v in sql.items() if k != "texts"},
        "sql_threads_1": {k: v for k, v in sql1.items() if k != "texts"},
        "transformers": {k: v for k, v in hf.items() if k != "texts"} if hf else None,
        "sql_overhead_vs_engine": sql["seconds"] / best_direct - 1,
        "sql_equals_engine_fraction": same_sql,
        "decode_step": steps,
        "weight_read": floor,
    }
    if hf:
        result["speedup_vs_transformers"] = direct["tokens_per_s"] / hf["tokens_per_s"]
        same = sum(a == b for a, b in zip(hf["texts"], direct["texts"]))
        result["transformers_equals_engine_fraction"] = same / len(hf["texts"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(
        f"\nbench_generate preset={args.preset} device={result['device']} rows={p['rows']} batch={p['batch']} "
        f"prompt={p['prompt']} max_tokens={p['max_tokens']} dtype={p['dtype']}"
    )
    print(f"{'path':<34}{'seconds':>10}{'tokens':>10}{'tokens/s':>12}{'vs engine':>11}")
    ref = direct["tokens_per_s"]
    rows = [
        ("engine (direct)", direct),
        ("engine (direct, repeat)", direct2),
        ("engine (direct, worker thread)", threaded),
        ("SQL llm_generate", sql),
        ("SQL llm_generate (threads=1)", sql1),
    ]
    if hf:
        rows.append((f"transformers generate ({p['hf_batches']} batch)", hf))
    for name, r in rows:
        ratio = r["tokens_per_s"] / ref
        print(f"{name:<34}{r['seconds']:>10.3f}{r['tokens']:>10}{r['tokens_per_s']:>12.1f}{ratio:>10.3f}x")
    print(
        f"SQL: {sql['seconds']:.3f} s = {sql['udf_seconds']:.3f} s in the UDF (of which "
        f"{sql['engine_seconds_inside']:.3f} s in Engine.generate_ids) + DuckDB"
    )
    print(
        f"SQL overhead vs best engine run: {result['sql_overhead_vs_engine'] * 100:+.1f}%  "
        f"(SQL text == engine text for {same_sql * 100:.0f}% of rows)"
    )
    if hf:
        print(f"engine vs transformers: {result['speedup_vs_transformers']:.1f}x tokens/s")
    for s in steps:
        kind = "triton" if s["triton"] else "pytorch"
        line = f"decode step ({kind}), batch {s['batch']}, context {s['context']}: {s['ms']:.2f} ms"
        if "ms" in floor:
            line += (
                f" = {s['ms'] / floor['ms']:.2f}x the weight-read time ({floor['ms']:.2f} ms for "
                f"{floor['weight_bytes'] / 1e9:.2f} GB at {floor['copy_bandwidth_GBps']:.0f} GB/s)"
            )
        print(line)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
