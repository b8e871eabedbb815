"""Helpers of the tabular-model tests: the models every test uses, and a float64 numpy reference of their outputs,
independent of torch (weights read with safetensors.numpy)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

# name -> random_tabular arguments
MODELS = {
    "linear": dict(model_type="linear_reg", n_features=4),
    "logistic": dict(model_type="logistic_reg", n_features=3),
    "softmax": dict(model_type="logistic_reg", n_features=5, n_outputs=4, task="multiclass"),
    "mlp_reg": dict(model_type="mlp", n_features=4, hidden=[16, (8, "tanh")]),
    "mlp_bin": dict(model_type="mlp", n_features=3, hidden=[(8, "gelu"), (8, "sigmoid")], task="binary"),
    "mlp_multi": dict(model_type="mlp", n_features=6, hidden=[12], task="multiclass", n_outputs=3),
}

_erf = np.vectorize(math.erf, otypes=[np.float64])

ACT = {
    "identity": lambda x: x,
    "relu": lambda x: np.maximum(x, 0.0),
    "tanh": np.tanh,
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
}


def reference(path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (raw outputs [N, K], predict [N], predict_proba [N, K or 2]) in float64."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    w = load_file(str(Path(path) / "model.safetensors"))
    h = np.asarray(x, np.float64)
    for i, layer in enumerate(cfg["layers"]):
        h = h @ w[f"layers.{i}.weight"].astype(np.float64).T + w[f"layers.{i}.bias"].astype(np.float64)
        h = ACT[layer["activation"]](h)
    if cfg["task"] == "binary":
        p = 1.0 / (1.0 + np.exp(-h[:, 0]))
        return h, p, np.stack([1.0 - p, p], axis=1)
    if cfg["task"] == "multiclass":
        e = np.exp(h - h.max(axis=1, keepdims=True))
        return h, h.argmax(axis=1).astype(np.float64), e / e.sum(axis=1, keepdims=True)
    return h, h[:, 0], h
