"""Contextual sparsity for the LLM engine (issue 7): DejaVu predictors for ReLU/GELU MLPs, TEAL activation
thresholds for SwiGLU MLPs, calibrated from SQL (`CREATE MODEL fast OPTIONS (model_type = 'llm', base = 'm',
sparsity = 0.9) AS SELECT text FROM corpus`) and served by the same engine with its MLPs swapped per layer.

- `calibrate.py`: record each layer's MLP input over calibration text, fit thresholds / train predictors, report.
- `modules.py`: `DejaVuMLP`, `TealMLP` (the replacements for `block.mlp`), look-ahead, `set_mode`, `set_oracle`.
- `variant.py`: the variant directory (sparse.json + sparse.safetensors) and `build_variant(base_model, path)`.
- `sql.py`: the CREATE MODEL path and EXPLAIN's per-layer lines (torch-free at import).

Importing this package loads nothing heavy; the submodules import torch.
"""
