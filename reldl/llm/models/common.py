"""Pieces shared by the family files: norms, activations and weight loading by Hugging Face names."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from reldl.errors import CheckpointError
from reldl.llm import fused


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k_ = fused.on(x)
        if k_ is not None:
            return k_.rmsnorm(x, self.weight, self.eps)[0]
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    acts = {
        "silu": F.silu,
        "swish": F.silu,
        "relu": F.relu,
        "gelu": F.gelu,
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    }
    if name not in acts:
        raise CheckpointError(f"config.json: activation function {name!r} is not supported")
    return acts[name]


Getter = Callable[[str], torch.Tensor]


@torch.no_grad()
def assign(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise CheckpointError(f"weight {name!r} has shape {list(value.shape)}, expected {list(param.shape)}")
    param.copy_(value)
