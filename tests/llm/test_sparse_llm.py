"""Contextual sparsity (reldl/llm/sparse): exactness at sparsity -> 0 and with the oracle, predictor recall, the
decode path against the per-token path, the union selection, and dense + sparse engines side by side."""

from __future__ import annotations

import os

import pytest
import torch

from reldl import registry
from reldl.llm import SamplingParams
from reldl.llm.sparse import calibrate, modules, variant

FAMILIES = ("opt", "gpt2", "llama")
TOL = 1e-5


@pytest.fixture(scope="module")
def texts():
    import checkpoints

    return checkpoints.corpus_sentences(120, seed=7)


@pytest.fixture(scope="module")
def ckpts(tiny_checkpoints):
    return {f: tiny_checkpoints(f) for f in FAMILIES}


def _variant(tmp_path, eng, path, texts, method, sparsity, **kw):
    target = tmp_path / f"{method}-{sparsity}-{len(list(tmp_path.iterdir()))}"
    spec = calibrate.make_variant(
        eng, texts, target, method=method, sparsity=sparsity, base_name="base", base_path=str(path), epochs=2, **kw
    )
    return target, spec


def _method(family: str) -> str:
    return "teal" if family == "llama" else "dejavu"


def _dense(path):
    return registry.get_engine("sparse-test-dense", str(path), "float32", "cpu")


def _logits(model, eng, seqs):
    """Logits of every position through the engine's paged cache with `model` swapped in."""
    saved = eng.model
    eng.model = model
    try:
        return eng.logits(seqs)
    finally:
        eng.model = saved


@pytest.mark.parametrize("family", FAMILIES)
def test_sparsity_near_zero_equals_dense(family, ckpts, texts, tmp_path):
    eng = _dense(ckpts[family])
    target, spec = _variant(tmp_path, eng, ckpts[family], texts, _method(family), 1e-9)
    sparse = variant.build_variant(eng.model, target)
    seqs = eng.encode_many(texts[:3])
    dense = eng.logits(seqs)
    for mode in ("sparse", "auto"):
        modules.set_mode(sparse, mode)
        for a, b in zip(_logits(sparse, eng, seqs), dense):
            torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)
    # decode steps (sparse path, one row and a batch of rows) give the dense greedy tokens
    sp = SamplingParams(max_tokens=6)
    want = [r.token_ids for r in eng.generate_ids(seqs, [sp] * 3)]
    seng = registry.get_engine("sparse-test-variant", str(target), "float32", "cpu")
    assert [r.token_ids for r in seng.generate_ids(seqs, [sp] * 3)] == want
    assert [seng.generate_ids([s], [sp])[0].token_ids for s in seqs] == want
    registry.unload("sparse-test-variant")


def test_oracle_relu_is_exact_at_high_sparsity(ckpts, texts, tmp_path):
    eng = _dense(ckpts["opt"])
    target, _ = _variant(tmp_path, eng, ckpts["opt"], texts, "dejavu", 0.9)
    sparse = variant.build_variant(eng.model, target)
    seqs = eng.encode_many(texts[:2])
    dense = eng.logits(seqs)
    modules.set_mode(sparse, "sparse")
    modules.set_oracle(sparse)
    for a, b in zip(_logits(sparse, eng, seqs), dense):
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)
    modules.set_oracle(sparse, False)
    far = max(float((a - b).abs().max()) for a, b in zip(_logits(sparse, eng, seqs), dense))
    assert far > 1e-3  # without the oracle, 90% sparsity does change the logits


@pytest.mark.parametrize("family", ("opt", "gpt2"))
def test_predictor_recall(family, ckpts, texts):
    eng = _dense(ckpts[family])
    rec = calibrate.record_mlp_inputs(eng, texts)
    assert rec.n_train < rec.inputs[0].shape[0]  # some sequences held out
    _, k, report = calibrate.calibrate_dejavu(eng.model, rec, 0.5, rank=32, epochs=4)
    n = eng.config.intermediate_size
    assert k == n // 2
    for lay in report:
        assert lay["fraction_selected"] == pytest.approx(0.5)
        # random weights: about half the neurons fire; a random half would recall 0.5
        assert lay["recall_train"] > 0.75, lay
        assert lay["recall"] > 0.7, lay
        assert lay["recall"] <= lay["oracle_recall"] + 1e-6


def test_teal_thresholds_reach_the_target(ckpts, texts):
    eng = _dense(ckpts["llama"])
    rec = calibrate.record_mlp_inputs(eng, texts)
    thresholds, report = calibrate.calibrate_teal(eng.model, rec, 0.8)
    for (t_in, t_mid), lay in zip(thresholds, report):
        assert t_in > 0 and t_mid > 0
        assert lay["sparsity_in"] == pytest.approx(0.8, abs=0.05)
        assert lay["sparsity_mid"] == pytest.approx(0.8, abs=0.05)


def test_decode_row_matches_per_token_path(ckpts, texts, tmp_path):
    """A one-row decode step (index gather) computes what the per-token path (masking) computes."""
    eng = _dense(ckpts["opt"])
    target, _ = _variant(tmp_path, eng, ckpts["opt"], texts, "dejavu", 0.75)
    sparse = variant.build_variant(eng.model, target)
    mlp = sparse.layers[0].mlp
    x = torch.randn(1, 1, eng.config.hidden_size, generator=torch.Generator().manual_seed(0))
    mlp.mode = "auto"
    a = mlp(x)
    mlp.mode = "sparse"
    b = mlp(x)
    sparse.sparse_lookahead.clear()
    torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)
    assert not torch.allclose(a, eng.model.layers[0].mlp(x), atol=1e-4)


def test_select_union_is_a_fixed_size_superset():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(5, 40, generator=g)
    k = 3
    idx = modules.select_union(scores, k)
    assert idx.numel() == 15 and idx.unique().numel() == 15
    for row in scores:
        assert set(torch.topk(row, k).indices.tolist()) <= set(idx.tolist())
    assert set(modules.select_union(scores[:1], k).tolist()) == set(torch.topk(scores[0], k).indices.tolist())
    assert modules.select_union(torch.randn(20, 8, generator=g), 3).numel() == 8  # capped at n


def test_dense_and_sparse_engines_coexist(ckpts, texts, tmp_path):
    path = ckpts["opt"]
    dense = registry.get_engine("coexist-dense", str(path), "float32", "cpu")
    target, _ = _variant(tmp_path, dense, path, texts, "dejavu", 0.5)
    sparse = registry.get_engine("coexist-sparse", str(target), "float32", "cpu")
    assert sparse is not dense and sparse.model is not dense.model
    assert registry.engine_key(str(target), "float32", "cpu") != registry.engine_key(str(path), "float32", "cpu")
    # weights other than the MLPs' are shared; the dense model keeps its dense MLPs
    assert sparse.model.layers[0].attn is dense.model.layers[0].attn
    assert sparse.model.layers[0].mlp.w1 is dense.model.layers[0].mlp.fc1.weight
    assert type(dense.model.layers[0].mlp).__name__ == "MLP"
    sp = SamplingParams(max_tokens=4)
    assert len(sparse.generate(["Alice went to"], sp)[0].token_ids) == 4
    registry.unload("coexist-sparse")
    assert registry.get_engine("coexist-dense", str(path), "float32", "cpu") is dense
    registry.unload("coexist-dense")


def test_changed_base_checkpoint_is_refused(tiny_checkpoints, texts, tmp_path):
    import shutil

    path = tmp_path / "base"
    shutil.copytree(tiny_checkpoints("opt"), path)
    eng = registry.get_engine("changed-base", str(path), "float32", "cpu")
    target, _ = _variant(tmp_path, eng, path, texts, "dejavu", 0.5)
    registry.unload("changed-base")
    cfg = path / "config.json"
    cfg.write_text(cfg.read_text())  # same content, newer file time
    import os

    st = cfg.stat()
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(Exception, match="changed since calibration"):
        registry.get_engine("changed-variant", str(target), "float32", "cpu")


@pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs CUDA and compiled kernels (tests/kernels' conftest turns on the Triton interpreter: run apart)",
)
def test_cuda_lookahead_matches_inline(ckpts, texts, tmp_path):
    """On CUDA the look-ahead (predictor + selection on a side stream, joined at the next layer's MLP) decodes the
    same tokens as the inline predictor, with CUDA graphs and eagerly, at one row and at a batch (union)."""
    from reldl.llm.engine import Engine

    eng = _dense(ckpts["opt"])
    target, _ = _variant(tmp_path, eng, ckpts["opt"], texts, "dejavu", 0.75)
    gpu = registry.get_engine("sparse-test-dense-cuda", str(ckpts["opt"]), "float32", "cuda")
    sparse = variant.build_variant(gpu.model, target)
    la = sparse.sparse_lookahead
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]]
    outs = {}
    for graphs in (True, False):
        for overlap in (True, False):
            la.overlap = overlap
            e = Engine(sparse, gpu.tokenizer, device=torch.device("cuda"), dtype=torch.float32, use_cuda_graphs=graphs)
            for rows in (1, 3):
                res = e.generate_ids(prompts[:rows], [SamplingParams(max_tokens=12)] * rows)
                outs[(graphs, overlap, rows)] = [r.token_ids for r in res]
            assert la._forked is None and not la.pending
    la.overlap = True
    # the same selection and kernels either way; graphs vs eager are not compared (a graph pads 3 rows to its
    # 4-row bucket, and the padding row's neurons join the union)
    for graphs in (True, False):
        for rows in (1, 3):
            assert outs[(graphs, True, rows)] == outs[(graphs, False, rows)], (graphs, rows)
