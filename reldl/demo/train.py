"""Train reldl's demo model: a tiny Llama that reads a product review and writes its fields as one line of JSON.

    python -m reldl.demo.train [--out reldl/demo/model] [--seed 0] [--steps N]

Everything runs on the CPU and is deterministic: the same seed and steps write byte-identical model and tokenizer
files (on the same software and thread count). Steps:

1. render training reviews (`reldl.demo.data`, split "train") and train a byte-level BPE tokenizer on them;
2. train a `LlamaForCausalLM` on `prompt(text) + answer(review) + </s>` with the loss on the answer tokens only
   (AdamW, linear warm-up then cosine decay);
3. save a Hugging Face checkpoint (config.json, generation_config.json, model.safetensors in float32,
   tokenizer.json, tokenizer_config.json, special_tokens_map.json);
4. evaluate it with reldl's own engine on held-out reviews (`evaluate`), check that the engine's greedy outputs
   equal transformers' (`compare_with_transformers`), and record it all in training.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from reldl.demo import MODEL_DIR
from reldl.demo.data import HELDOUT_SEED, Review, answer, prompt, reviews

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2 as in Llama
MAX_TOKENS = 48  # generation budget used by the evaluation (answers are about 26 tokens)
CONTEXT = 256  # max_position_embeddings: room for longer prompts than training ever saw (RoPE)

MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 1200
    batch_size: int = 32
    lr: float = 1.5e-3  # 3e-3 diverges now and then
    min_lr_ratio: float = 0.05
    warmup_steps: int = 60
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 3  # head_dim 64
    num_kv_heads: int = 1  # grouped-query attention, 3 query heads per KV head
    intermediate_size: int = 512
    vocab_size: int = 1536  # upper bound: the BPE stops when the corpus has no more pairs to merge
    tokenizer_reviews: int = 20_000
    threads: int = 2
    device: str = "cpu"  # "cuda" only for quick experiments: the shipped model is trained on the CPU


# ---------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with <pad>=0, <s>=1, </s>=2; encoding prepends <s> (TemplateProcessing)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0",
        pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, tok.token_to_id(BOS))],
    )
    return tok


def _tokenizer_files(tok, out: Path) -> None:
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "model_max_length": CONTEXT,
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")


def encode_example(tok, r: Review) -> tuple[list[int], list[int]]:
    """(input ids, labels): <s> prompt answer </s>, labels -100 on the prompt so only the answer is learned.

    The prompt is encoded on its own, exactly as the engine encodes it at inference time."""
    p = tok.encode(prompt(r.text)).ids
    a = tok.encode(answer(r), add_special_tokens=False).ids + [tok.token_to_id(EOS)]
    return p + a, [-100] * len(p) + a


# ---------------------------------------------------------------------------------------------- training


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" / "Loading weights" bars for a 9 MB file


def _setup_torch(threads: int):
    import torch

    _quiet()

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already ran in this process
        pass
    torch.use_deterministic_algorithms(True)
    return torch


def build_model(cfg: TrainConfig, vocab_size: int):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=CONTEXT,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=False, max_new_tokens=MAX_TOKENS
    )
    return model


def _batches(examples: list[tuple[list[int], list[int]]], batch_size: int, torch):
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        # right padding needs no attention mask: causal attention never lets a real token see a pad after it
        ids = torch.tensor([x + [0] * (width - len(x)) for x, _ in chunk])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in chunk])
        yield ids, labels


def train(cfg: TrainConfig, out: Path | None = None, log=print):
    """Train a model; save it into `out` when given. Returns (model, tokenizer, stats)."""
    torch = _setup_torch(cfg.threads)
    t0 = time.perf_counter()
    n = cfg.steps * cfg.batch_size
    data = reviews(max(n, cfg.tokenizer_reviews), cfg.seed, split="train")
    tok = train_tokenizer([prompt(r.text) + answer(r) for r in data[: cfg.tokenizer_reviews]], cfg.vocab_size)
    examples = [encode_example(tok, r) for r in data[:n]]
    lengths = [len(ids) for ids, _ in examples]
    log(
        f"tokenizer: {tok.get_vocab_size()} tokens; {n} examples of {min(lengths)}-{max(lengths)} tokens "
        f"(mean {sum(lengths) / n:.1f}) in {time.perf_counter() - t0:.1f}s"
    )

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, tok.get_vocab_size()).to(cfg.device)
    params = sum(p.numel() for p in model.parameters())
    log(f"model: {params / 1e6:.2f}M parameters")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    losses: list[float] = []
    t1 = time.perf_counter()
    for step, (ids, labels) in enumerate(_batches(examples, cfg.batch_size, torch)):
        loss = model(input_ids=ids.to(cfg.device), labels=labels.to(cfg.device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            el = time.perf_counter() - t1
            log(
                f"step {step + 1}/{cfg.steps} loss {sum(losses[-50:]) / len(losses[-50:]):.4f} "
                f"lr {sched.get_last_lr()[0]:.2e} {el:.0f}s ({el / (step + 1):.2f}s/step)"
            )
    model.cpu().eval()
    stats = {
        "parameters": params,
        "vocab_size": tok.get_vocab_size(),
        "train_examples": n,
        "mean_tokens": round(sum(lengths) / n, 2),
        "max_tokens": max(lengths),
        "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 6),
        "last_step_loss": round(losses[-1], 6),
        "train_seconds": round(time.perf_counter() - t1, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    if out is not None:
        save(model, tok, out)
    return model, tok, stats


def save(model, tok, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES + ("training.json",):
        (out / name).unlink(missing_ok=True)
    model.save_pretrained(out)  # config.json, generation_config.json, model.safetensors (float32)
    _tokenizer_files(tok, out)
    for name in MODEL_FILES:
        os.chmod(out / name, 0o644)  # safetensors writes 0600; the files ship inside the package


# ---------------------------------------------------------------------------------------------- evaluation


def heldout(n: int = 500, seed: int = HELDOUT_SEED) -> list[Review]:
    """Held-out reviews: their own random stream and (product, template) pairs never used in training."""
    return reviews(n, seed, split="heldout")


def evaluate(model_dir: str | Path = MODEL_DIR, n: int = 500, seed: int = HELDOUT_SEED, examples: int = 5) -> dict:
    """Exact-match accuracy of reldl's engine (greedy, stop at newline) on `n` held-out reviews."""
    from reldl.demo.data import parse
    from reldl.llm import SamplingParams
    from reldl.registry import get_engine

    model_dir = Path(model_dir)
    eng = get_engine("demo", str(model_dir))
    data = heldout(n, seed)
    t = time.perf_counter()
    res = eng.generate([prompt(r.text) for r in data], SamplingParams(max_tokens=MAX_TOKENS, stop=("\n",)))
    seconds = time.perf_counter() - t
    exact = 0
    fields = {"product": 0, "rating": 0, "sentiment": 0, "issue": 0}
    parsed = 0
    failures = []
    for r, out in zip(data, res):
        want = answer(r)[:-1]  # the engine drops the stop string
        got = parse(out.text)
        exact += out.text == want
        parsed += got is not None
        for k in fields:
            fields[k] += got is not None and got.get(k) == getattr(r, k)
        if out.text != want and len(failures) < examples:
            failures.append({"text": r.text, "expected": want, "got": out.text})
    return {
        "n": n,
        "seed": seed,
        "exact_match": exact / n,
        "parsed": parsed / n,
        "field_accuracy": {k: v / n for k, v in fields.items()},
        "generated_tokens": sum(len(x.token_ids) for x in res),
        "seconds": round(seconds, 2),
        "failures": failures,
    }


def compare_with_transformers(model_dir: str | Path = MODEL_DIR, n: int = 20, seed: int = HELDOUT_SEED) -> dict:
    """Greedy completions of reldl's engine vs transformers' `generate` on `n` held-out prompts."""
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    from reldl.llm import SamplingParams
    from reldl.registry import get_engine

    _quiet()
    model_dir = Path(model_dir)
    prompts = [prompt(r.text) for r in heldout(n, seed)]
    eng = get_engine("demo", str(model_dir))
    ours = [r.text for r in eng.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, stop=("\n",)))]
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    theirs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([tok.encode(p).ids])
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
            text = tok.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
            theirs.append(text.split("\n", 1)[0])
    same = sum(a == b for a, b in zip(ours, theirs))
    diffs = [{"prompt": p, "reldl": a, "transformers": b} for p, a, b in zip(prompts, ours, theirs) if a != b]
    return {"n": n, "identical": same, "differences": diffs[:5]}


# ---------------------------------------------------------------------------------------------- entry point


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def hardware() -> dict:
    import torch
    import transformers

    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": __import__("tokenizers").__version__,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m reldl.demo.train", description=__doc__.split("\n\n")[0])
    defaults = TrainConfig()
    ap.add_argument("--out", type=Path, default=MODEL_DIR, help=f"output directory (default {MODEL_DIR})")
    ap.add_argument("--seed", type=int, default=defaults.seed)
    ap.add_argument("--steps", type=int, default=defaults.steps)
    ap.add_argument("--batch-size", type=int, default=defaults.batch_size)
    ap.add_argument("--lr", type=float, default=defaults.lr)
    ap.add_argument("--threads", type=int, default=defaults.threads)
    ap.add_argument("--eval-n", type=int, default=1000, help="held-out reviews to evaluate on (0: skip)")
    ap.add_argument("--compare-n", type=int, default=20, help="prompts to compare with transformers (0: skip)")
    args = ap.parse_args(argv)
    cfg = TrainConfig(seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr, threads=args.threads)
    out: Path = args.out
    t0 = time.perf_counter()
    _, _, stats = train(cfg, out)
    record = {"config": asdict(cfg), "hardware": hardware(), **stats}
    record["files"] = {
        name: {"bytes": (out / name).stat().st_size, "sha256": sha256(out / name)} for name in MODEL_FILES
    }
    size_mb = record["files"]["model.safetensors"]["bytes"] / 1e6
    print(f"saved {out} (model.safetensors {size_mb:.2f} MB, sha256 {record['files']['model.safetensors']['sha256']})")
    if args.eval_n:
        ev = evaluate(out, n=args.eval_n)
        record["heldout"] = ev
        print(f"held-out exact match {ev['exact_match']:.4f} on {ev['n']} reviews ({ev['seconds']}s through reldl)")
        for f in ev["failures"]:
            print(f"  miss: {f['text']!r}\n    expected {f['expected']!r}\n    got      {f['got']!r}")
    if args.compare_n:
        cmp = compare_with_transformers(out, n=args.compare_n)
        record["reldl_vs_transformers"] = cmp
        print(f"reldl vs transformers greedy: {cmp['identical']}/{cmp['n']} identical")
    record["wall_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    os.chmod(out / "training.json", 0o644)
    return 0


if __name__ == "__main__":
    sys.exit(main())
