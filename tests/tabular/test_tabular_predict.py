"""predict / predict_proba / forward of every model type against a float64 numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tabular_helpers import MODELS, reference

from reldl.tabular import load_tabular


@pytest.mark.parametrize("name", list(MODELS))
def test_matches_numpy_reference(tabular_models, name):
    path = tabular_models[name]
    model = load_tabular(path)
    x = np.random.default_rng(1).normal(scale=2.0, size=(257, MODELS[name]["n_features"]))
    raw, want_pred, want_proba = reference(path, x)
    got_raw = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got_raw, raw, rtol=1e-12, atol=1e-12)
    pred, proba = model.predict(x), model.predict_proba(x)
    assert pred.dtype == np.float64 and pred.shape == (257,)
    assert proba.dtype == np.float64 and proba.shape == want_proba.shape
    np.testing.assert_allclose(pred, want_pred, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(proba, want_proba, rtol=1e-12, atol=1e-12)


def test_task_semantics(tabular_models):
    x = np.random.default_rng(2).normal(size=(50, 3))
    binary = load_tabular(tabular_models["logistic"])
    p, proba = binary.predict(x), binary.predict_proba(x)
    assert ((p > 0) & (p < 1)).all() and proba.shape == (50, 2)
    np.testing.assert_allclose(proba[:, 1], p)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    multi = load_tabular(tabular_models["mlp_multi"])
    x6 = np.random.default_rng(3).normal(size=(50, 6))
    pred, proba = multi.predict(x6), multi.predict_proba(x6)
    assert set(np.unique(pred)) <= {0.0, 1.0, 2.0}
    np.testing.assert_array_equal(pred, proba.argmax(axis=1))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    reg = load_tabular(tabular_models["linear"])
    x4 = np.random.default_rng(4).normal(size=(50, 4))
    np.testing.assert_array_equal(reg.predict_proba(x4)[:, 0], reg.predict(x4))


def test_float32_inputs_and_empty_batch(tabular_models):
    model = load_tabular(tabular_models["mlp_reg"])
    x = np.random.default_rng(5).normal(size=(7, 4)).astype(np.float32)
    np.testing.assert_allclose(model.predict(x), reference(tabular_models["mlp_reg"], x)[1], rtol=1e-12)
    assert model.predict(np.zeros((0, 4))).shape == (0,)
    assert model.predict_proba(np.zeros((0, 4))).shape == (0, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_float32(tabular_models):
    model = load_tabular(tabular_models["mlp_bin"], device="cuda")
    assert next(model.parameters()).dtype == torch.float32
    x = np.random.default_rng(6).normal(size=(100, 3))
    np.testing.assert_allclose(model.predict(x), reference(tabular_models["mlp_bin"], x)[1], rtol=1e-4, atol=1e-5)
