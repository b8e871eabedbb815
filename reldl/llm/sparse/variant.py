"""A sparse variant on disk, and the model built from it.

A variant is a directory (never inside site-packages: under the database's model directory, `<db>.models/`, like
the models trained in the database, or a temporary directory for in-memory databases):
- `sparse.json`: format, method, target sparsity, the base checkpoint's path and file time, per-layer settings
  (k for DejaVu, thresholds for TEAL) and the calibration report;
- `sparse.safetensors`: the DejaVu predictors (`layers.{i}.a` [d, r], `.b` [r, n], `.c` [n]) or the TEAL thresholds
  (`thresholds` [L, 2]) in float32.

`build_variant(base_model, path)` returns a new Transformer that shares every module of the base model except the
MLPs, which become `DejaVuMLP` / `TealMLP` (weights in the kernels' layouts, made once here). The base model is not
modified, so a dense engine over it keeps working beside the sparse one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

SPEC_FILE = "sparse.json"
TENSOR_FILE = "sparse.safetensors"
FORMAT = 1


def is_variant(path: str | Path) -> bool:
    return (Path(path) / SPEC_FILE).is_file()


def read_spec(path: str | Path) -> dict[str, Any]:
    from reldl.errors import CheckpointError

    p = Path(path) / SPEC_FILE
    try:
        spec = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p}: cannot read the sparse variant ({e})") from None
    if spec.get("format") != FORMAT:
        raise CheckpointError(f"{p}: unknown sparse variant format {spec.get('format')!r}")
    return spec


def base_mtime_ns(path: str | Path) -> int:
    """The newest file time of a checkpoint's weights and config (what the engine cache keys on)."""
    p = Path(path)
    times = [f.stat().st_mtime_ns for f in p.glob("*.safetensors")]
    cfg = p / "config.json"
    if cfg.exists():
        times.append(cfg.stat().st_mtime_ns)
    return max(times, default=0)


def save_variant(target: Path, spec: dict[str, Any], tensors: dict) -> Path:
    """Write the variant into `target` (which must not exist or be empty): files go to a temporary sibling that is
    renamed into place, so a half-written variant never carries the final name."""
    from safetensors.torch import save_file

    target = Path(target)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / TENSOR_FILE))
        (tmp / SPEC_FILE).write_text(json.dumps(dict(spec, format=FORMAT), indent=1))
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _shallow(module):
    """A copy of an nn.Module that shares its parameters, buffers and submodules, with its own containers (so
    replacing a submodule of the copy leaves the original as it was)."""
    c = module.__class__.__new__(module.__class__)
    c.__dict__.update(module.__dict__)
    c._modules = dict(module._modules)
    c._parameters = dict(module._parameters)
    c._buffers = dict(module._buffers)
    return c


def build_variant(base_model, path: str | Path, spec: dict[str, Any] | None = None):
    """The sparse model of the variant at `path` over `base_model` (loaded on its device and dtype)."""
    import torch.nn as nn
    from safetensors.torch import load_file

    from reldl.errors import CheckpointError
    from reldl.llm.sparse.modules import DejaVuMLP, LookAhead, Predictor, TealMLP

    spec = spec or read_spec(path)
    cfg = base_model.config
    if spec.get("num_layers") != cfg.num_layers or spec.get("hidden_size") != cfg.hidden_size:
        raise CheckpointError(f"{path}: the sparse variant does not match its base model's shape")
    tensors = load_file(str(Path(path) / TENSOR_FILE))
    param = next(base_model.parameters())
    device, dtype = param.device, param.dtype
    model = _shallow(base_model)
    model.layers = nn.ModuleList(_shallow(b) for b in base_model.layers)
    method = spec["method"]
    lookahead = None
    if method == "dejavu":
        preds = []
        for i in range(cfg.num_layers):
            a, b, c = (tensors[f"layers.{i}.{x}"].to(device=device, dtype=dtype) for x in "abc")
            preds.append(Predictor(a, b, c))
        lookahead = LookAhead(preds)
        for i, block in enumerate(model.layers):
            block.mlp = DejaVuMLP(block.mlp, i, lookahead, spec["layers"][i]["selected"], cfg.activation)
    elif method == "teal":
        th = tensors["thresholds"]
        for i, block in enumerate(model.layers):
            block.mlp = TealMLP(block.mlp, float(th[i, 0]), float(th[i, 1]), cfg.activation)
    else:
        raise CheckpointError(f"{path}: unknown sparsity method {method!r}")
    model.sparse_lookahead = lookahead
    model.sparse_spec = spec
    model.eval().requires_grad_(False)
    return model
