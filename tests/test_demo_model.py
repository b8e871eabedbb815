"""The demo model that ships in reldl/demo/model, and the synthetic review data it was trained on."""

from __future__ import annotations

import json

import pytest

from reldl.demo import MODEL_DIR
from reldl.demo import data as D

FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


# ---------------------------------------------------------------------------------------------- data


def test_reviews_are_deterministic():
    a = D.reviews(300, seed=7)
    assert a == D.reviews(300, seed=7)
    assert D.reviews(50, seed=7) == a[:50]  # a longer list extends a shorter one
    assert a != D.reviews(300, seed=8)
    assert [r.id for r in a] == list(range(1, 301))


def test_splits_differ():
    train = D.reviews(2000, D.TRAIN_SEED, split="train")
    held = D.reviews(500, D.HELDOUT_SEED, split="heldout")
    assert not {r.text for r in train} & {r.text for r in held}
    assert D.reviews(100, 0, split="train") != D.reviews(100, 0, split="heldout")
    with pytest.raises(ValueError):
        D.reviews(1, 0, split="test")


def test_fields_are_consistent():
    rs = D.reviews(2000, seed=3)
    for r in rs:
        assert r.product in D.PRODUCTS and r.issue in D.ISSUES and r.sentiment in D.SENTIMENTS
        assert 1 <= r.rating <= 5 and r.sentiment == D.sentiment_of(r.rating)
        assert r.product in r.text
    assert {r.rating for r in rs} == {1, 2, 3, 4, 5}
    assert {r.issue for r in rs} == set(D.ISSUES)
    assert {r.product for r in rs} == set(D.PRODUCTS)
    assert len({r.text for r in rs}) > 0.99 * len(rs)


def test_prompt_answer_parse_round_trip():
    for r in D.reviews(500, seed=1):
        a = D.answer(r)
        assert a.startswith(" {") and a.endswith("}\n") and a.count("\n") == 1
        assert D.parse(a) == r.fields()
        assert D.parse(a.strip()) == r.fields()
        p = D.prompt(r.text)
        assert p == f"Review: {r.text}\nJSON:" and "\n" not in r.text
    r = D.reviews(1, seed=0)[0]
    assert json.loads(D.answer(r)) == {
        "product": r.product,
        "rating": r.rating,
        "sentiment": r.sentiment,
        "issue": r.issue,
    }
    for bad in ("", None, "nonsense", ' {"product": "tent"}', ' {"product": "tent", "rating": "5"', "{}"):
        assert D.parse(bad) is None
    assert D.parse(' {"product": "tent", "rating": "5", "sentiment": "positive", "issue": "none"}') is None


# ---------------------------------------------------------------------------------------------- shipped model


@pytest.fixture(scope="module")
def model_dir():
    missing = [f for f in FILES if not (MODEL_DIR / f).is_file()]
    if missing:
        pytest.fail(f"demo model files missing from {MODEL_DIR}: {missing} (python -m reldl.demo.train)")
    return MODEL_DIR


def test_checkpoint_is_valid(model_dir):
    from reldl.llm.loader import inspect_checkpoint

    ckpt = inspect_checkpoint(model_dir)
    cfg = ckpt.config
    assert cfg.family == "llama" and cfg.bos_token_id == 1 and 2 in cfg.eos_token_ids
    assert all(t.dtype == "F32" for t in ckpt.tensors.values())
    assert (model_dir / "model.safetensors").stat().st_size <= 25_000_000
    record = json.loads((model_dir / "training.json").read_text())
    assert record["heldout"]["exact_match"] >= 0.95


def test_engine_accuracy_on_heldout(model_dir):
    from reldl.demo.train import evaluate

    ev = evaluate(model_dir, n=200)
    assert ev["exact_match"] >= 0.95, ev["failures"]
    assert ev["parsed"] >= 0.98
