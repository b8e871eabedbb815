"""GPT-2 family: learned positions, pre-LayerNorm, fused QKV stored as Conv1D ([in, out]) weights, GELU MLP."""

from __future__ import annotations

import torch
import torch.nn as nn

from reldl.llm.attention import LayerKV, Step, build_mask, paged_attention
from reldl.llm.config import ModelConfig
from reldl.llm.models.common import Getter, activation, assign


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.d = cfg.num_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.wo = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.scale = self.d**-0.5

    def forward(self, x, step: Step, kv: LayerKV, mask):
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, self.h, self.d) for t in self.wqkv(x).chunk(3, dim=-1))
        return self.wo(paged_attention(q, k, v, kv, step, mask, self.scale))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.activation)

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, step, kv, mask):
        x = x + self.attn(self.attn_norm(x), step, kv, mask)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_positions = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def setup(self, device, dtype) -> None:
        pass

    def forward(self, tokens: torch.Tensor, step: Step, cache: list[LayerKV]) -> torch.Tensor:
        mask = build_mask(step, 1)
        x = self.embed(tokens) + self.embed_positions(step.positions)
        for layer, kv in zip(self.layers, cache):
            x = layer(x, step, kv, mask)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, f = cfg.hidden_size, cfg.intermediate_size
    t = "transformer."
    shapes: dict[str, tuple[int, ...]] = {
        t + "wte.weight": (cfg.vocab_size, h),
        t + "wpe.weight": (cfg.max_positions, h),
        t + "ln_f.weight": (h,),
        "lm_head.weight": (cfg.vocab_size, h),
    }
    for i in range(cfg.num_layers):
        p = f"{t}h.{i}."
        shapes[p + "attn.c_attn.weight"] = (h, 3 * h)
        shapes[p + "attn.c_proj.weight"] = (h, h)
        shapes[p + "mlp.c_fc.weight"] = (h, f)
        shapes[p + "mlp.c_proj.weight"] = (f, h)
        shapes[p + "ln_1.weight"] = (h,)
        shapes[p + "ln_2.weight"] = (h,)
    return shapes


def _conv1d(module: nn.Linear, get: Getter, name: str) -> None:
    """Hugging Face's GPT-2 Conv1D stores weights as [in, out]: transpose into nn.Linear's [out, in]."""
    assign(module.weight, get(name + ".weight").t(), name)
    assign(module.bias, get(name + ".bias"), name + ".bias")


def _norm(module: nn.LayerNorm, get: Getter, name: str) -> None:
    assign(module.weight, get(name + ".weight"), name)
    assign(module.bias, get(name + ".bias"), name + ".bias")


def load(model: Transformer, get: Getter) -> None:
    cfg = model.config
    t = "transformer."
    assign(model.embed.weight, get(t + "wte.weight"), t + "wte.weight")
    assign(model.embed_positions.weight, get(t + "wpe.weight"), t + "wpe.weight")
    head = t + "wte.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    assign(model.lm_head.weight, get(head), head)
    _norm(model.norm, get, t + "ln_f")
    for i, layer in enumerate(model.layers):
        p = f"{t}h.{i}."
        _conv1d(layer.attn.wqkv, get, p + "attn.c_attn")
        _conv1d(layer.attn.wo, get, p + "attn.c_proj")
        _conv1d(layer.mlp.fc, get, p + "mlp.c_fc")
        _conv1d(layer.mlp.proj, get, p + "mlp.c_proj")
        _norm(layer.attn_norm, get, p + "ln_1")
        _norm(layer.mlp_norm, get, p + "ln_2")
