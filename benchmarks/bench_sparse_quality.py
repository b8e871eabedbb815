"""Quality of contextual sparsity (issue 7): next-token agreement with the dense model and the change in perplexity on
held-out text, at 50%, 80% and 90% sparsity, on the shipped demo model and on tiny random checkpoints. CPU, float32.

    python benchmarks/bench_sparse_quality.py          # all models; JSON to benchmarks/out/sparse_quality.json
    python benchmarks/bench_sparse_quality.py --models demo --sparsities 0.5

Per model and sparsity: a variant is calibrated exactly as `CREATE MODEL ... AS SELECT` does (reldl/llm/sparse:
TEAL for the demo Llama and tiny Llama, DejaVu predictors for tiny OPT (ReLU) and GPT-2 (GELU: "active" = positive
pre-activation); tiny OPT also with TEAL), then every held-out token runs through the sparse MLPs with its own
neuron set (mode 'sparse', i.e. as if each token were decoded alone; in the engine, prefill runs dense), and its
logits are compared with the dense model's: agreement = share of positions whose argmax is the same; perplexity of
the held-out text under each. For the demo model also the exact-match accuracy of the demo task (greedy generation
through the engine: prefill dense, decode sparse) on held-out reviews.

Calibration text: demo: training-split reviews (prompt + answer); tiny models: `tests/checkpoints.corpus_sentences`.
Held-out text: demo: held-out reviews (their own seed and product templates); tiny: sentences from another seed.
Random tiny checkpoints have no learned structure (about half of the ReLU neurons fire for any input), so their
numbers show the mechanics, not what a trained model keeps.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

MODELS = ("demo", "opt", "opt-teal", "gpt2", "llama")
SPARSITIES = (0.5, 0.8, 0.9)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    ap.add_argument("--sparsities", nargs="*", type=float, default=list(SPARSITIES))
    ap.add_argument("--calibration-rows", type=int, default=256)
    ap.add_argument("--heldout-rows", type=int, default=64)
    ap.add_argument("--demo-generate", type=int, default=100, help="held-out reviews generated for exact match")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "sparse_quality.json"))
    return ap.parse_args()


def _texts(model: str, calib: int, held: int, tokenizer) -> tuple[list[str], list[tuple[list[int], int]]]:
    """Calibration texts, and held-out (token ids, index of the first scored target). The demo model was trained
    on the answer only (the review is its input), so only the answer's tokens are scored; tiny models: all."""
    if model == "demo":
        from reldl.demo.data import answer, prompt, reviews
        from reldl.demo.train import encode_example, heldout

        full = [prompt(r.text) + answer(r) for r in reviews(calib, seed=1, split="train")]
        scored = []
        for r in heldout(held):
            ids, labels = encode_example(tokenizer, r)
            scored.append((ids, next(i for i, y in enumerate(labels) if y != -100)))
        return full, scored
    import checkpoints

    calib_texts = checkpoints.corpus_sentences(calib, seed=11)
    return calib_texts, [(e.ids, 1) for e in tokenizer.encode_batch(checkpoints.corpus_sentences(held, seed=12345))]


def _checkpoint(model: str, tmp: Path) -> Path:
    if model == "demo":
        from reldl.demo.run import MODEL_DIR

        return MODEL_DIR
    import checkpoints

    family = model.split("-")[0]
    return checkpoints.make_checkpoint(tmp / family, family)


def _method(model: str) -> str:
    return "teal" if model in ("demo", "llama", "opt-teal") else "dejavu"


def _metrics(dense_logits, sparse_logits, items) -> dict:
    import torch

    agree = total = 0
    nll_d = nll_s = 0.0
    for ld, ls, (ids, first) in zip(dense_logits, sparse_logits, items):
        if len(ids) <= first:
            continue
        tgt = torch.tensor(ids[first:])
        ld, ls = ld[first - 1 : -1].double(), ls[first - 1 : -1].double()  # logits at i predict token i + 1
        agree += int((ld.argmax(-1) == ls.argmax(-1)).sum())
        total += len(tgt)
        nll_d += float(-ld.log_softmax(-1).gather(1, tgt[:, None]).sum())
        nll_s += float(-ls.log_softmax(-1).gather(1, tgt[:, None]).sum())
    ppl_d, ppl_s = math.exp(nll_d / total), math.exp(nll_s / total)
    return {
        "scored_tokens": total,
        "agreement": round(agree / total, 4),
        "ppl_dense": round(ppl_d, 4),
        "ppl_sparse": round(ppl_s, 4),
        "ppl_change_pct": round(100 * (ppl_s / ppl_d - 1), 4),
        "nll_dense": float(f"{nll_d / total:.5g}"),
        "nll_sparse": float(f"{nll_s / total:.5g}"),
    }


def _demo_exact(engine, n: int) -> float:
    from reldl.demo.data import answer, prompt
    from reldl.demo.train import MAX_TOKENS, heldout
    from reldl.llm import SamplingParams

    data = heldout(n)
    res = engine.generate([prompt(r.text) for r in data], SamplingParams(max_tokens=MAX_TOKENS, stop=("\n",)))
    return sum(out.text == answer(r)[:-1] for r, out in zip(data, res)) / n


def run_model(model: str, args, tmp: Path) -> list[dict]:
    import torch

    from reldl import registry
    from reldl.llm.engine import Engine
    from reldl.llm.sparse import calibrate, modules, variant

    path = _checkpoint(model, tmp)
    dense = registry.get_engine(f"q-{model}", str(path), "float32", "cpu")
    calib, items = _texts(model, args.calibration_rows, args.heldout_rows, dense.tokenizer)
    items = [(ids[: dense.context_length], first) for ids, first in items]
    seqs = [ids for ids, _ in items]
    dense_logits = dense.logits(seqs)
    dense_exact = _demo_exact(dense, args.demo_generate) if model == "demo" and args.demo_generate else None
    rows = []
    for s in args.sparsities:
        t = time.perf_counter()
        target = tmp / f"{model}-{s}"
        spec = calibrate.make_variant(
            dense, calib, target, method=_method(model), sparsity=s, base_name=model, base_path=str(path)
        )
        calib_s = time.perf_counter() - t
        sparse = variant.build_variant(dense.model, target, spec)
        eng = Engine(sparse, dense.tokenizer, device=torch.device("cpu"), dtype=torch.float32)
        modules.set_mode(sparse, "sparse")
        row = {
            "model": model,
            "method": spec["method"],
            "sparsity": s,
            **_metrics(dense_logits, eng.logits(seqs), items),
        }
        layers = spec["layers"]
        if spec["method"] == "dejavu":
            row["recall_per_layer"] = [lay["recall"] for lay in layers]
            row["natural_sparsity_per_layer"] = [lay["natural_sparsity"] for lay in layers]
        else:
            row["weights_read_per_layer"] = [lay["weights_read"] for lay in layers]
        row["mlp_rel_error_per_layer"] = [lay["output_rel_error"] for lay in layers]
        row["calibration_tokens"] = spec["calibration"]["tokens"]
        row["calibration_s"] = round(calib_s, 2)
        if dense_exact is not None:
            modules.set_mode(sparse, "auto")  # as served: prefill dense, decode sparse
            row["demo_exact_match_dense"] = dense_exact
            row["demo_exact_match_sparse"] = _demo_exact(eng, args.demo_generate)
        rows.append(row)
        print(_fmt(row), flush=True)
    registry.unload(f"q-{model}")
    return rows


HEADER = (
    f"{'model':<9} {'method':<7} {'sparsity':>8} {'agree':>7} {'ppl dense':>10} {'ppl sparse':>10} {'dppl':>8}  "
    "per-layer"
)


def _fmt(r: dict) -> str:
    per = r.get("recall_per_layer")
    per = f"recall {per}" if per is not None else f"weights read {r['weights_read_per_layer']}"
    line = (
        f"{r['model']:<9} {r['method']:<7} {r['sparsity']:>8.2f} {r['agreement']:>7.3f} {r['ppl_dense']:>10.3f} "
        f"{r['ppl_sparse']:>10.3f} {r['ppl_change_pct']:>7.2f}%  {per}"
    )
    if r["ppl_dense"] < 1.1:  # a near-deterministic target: the per-token NLL says more than the perplexity
        line += f"; nll/token {r['nll_dense']:.3g} -> {r['nll_sparse']:.3g}"
    if "demo_exact_match_sparse" in r:
        line += f"; demo exact match {r['demo_exact_match_dense']:.2f} -> {r['demo_exact_match_sparse']:.2f}"
    return line


def main() -> None:
    args = parse_args()
    import torch

    torch.manual_seed(0)
    print(HEADER)
    rows = []
    with tempfile.TemporaryDirectory(prefix="reldl-sparse-quality-") as d:
        for m in args.models:
            rows += run_model(m, args, Path(d))
    out = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "command": "python benchmarks/bench_sparse_quality.py " + " ".join(sys.argv[1:]),
        "calibration_rows": args.calibration_rows,
        "heldout_rows": args.heldout_rows,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
