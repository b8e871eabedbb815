"""Model families. Each file is one readable decoder (gpt-fast style) whose blocks are
`x = x + attn(norm(x)); x = x + mlp(norm(x))` with `attn` and `mlp` swappable per layer."""

from __future__ import annotations

import torch

from reldl.errors import CheckpointError
from reldl.llm.config import ModelConfig
from reldl.llm.models import gpt2, llama, opt

FAMILY_MODULES = {"llama": llama, "opt": opt, "gpt2": gpt2}


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names and shapes a checkpoint of this config must hold."""
    return FAMILY_MODULES[cfg.family].expected_shapes(cfg)


def build(ckpt, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Instantiate the family's Transformer directly on `device`/`dtype` and load the checkpoint into it."""
    from reldl.llm.loader import TensorReader

    family = FAMILY_MODULES[ckpt.config.family]
    with torch.device("meta"):
        model = family.Transformer(ckpt.config)
    model = model.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # any weight the loader forgets shows up below instead of as garbage
        family.load(model, TensorReader(ckpt, dtype))
        for name, p in model.named_parameters():
            if torch.isnan(p).any():
                raise CheckpointError(f"{ckpt.path}: weight for {name!r} was not loaded (or holds NaN)")
    model.setup(device, dtype)
    model.eval().requires_grad_(False)
    return model
