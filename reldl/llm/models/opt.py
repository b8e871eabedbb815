"""OPT family (Meta's OPT-125m ... OPT-66B): learned positions (offset 2), LayerNorm, ReLU MLP, optional
pre/post-norm and the embedding projections of OPT-350m."""

from __future__ import annotations

import torch
import torch.nn as nn

from reldl.llm.attention import LayerKV, Step, build_mask, paged_attention
from reldl.llm.config import ModelConfig
from reldl.llm.models.common import Getter, activation, assign

POSITION_OFFSET = 2  # OPT's learned position table starts at index 2


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.d = cfg.num_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.attention_bias)
        self.wo = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.attention_bias)
        self.scale = self.d**-0.5

    def forward(self, x, step: Step, kv: LayerKV, mask):
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, self.h, self.d) for t in self.wqkv(x).chunk(3, dim=-1))
        return self.wo(paged_attention(q, k, v, kv, step, mask, self.scale))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = activation(cfg.activation)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_before = cfg.norm_before
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, step, kv, mask):
        if self.norm_before:
            x = x + self.attn(self.attn_norm(x), step, kv, mask)
            return x + self.mlp(self.mlp_norm(x))
        x = self.attn_norm(x + self.attn(x, step, kv, mask))
        return self.mlp_norm(x + self.mlp(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        proj = cfg.word_embed_proj_dim or cfg.hidden_size
        self.embed = nn.Embedding(cfg.vocab_size, proj)
        self.embed_positions = nn.Embedding(cfg.max_positions + POSITION_OFFSET, cfg.hidden_size)
        self.project_in = nn.Linear(proj, cfg.hidden_size, bias=False) if proj != cfg.hidden_size else None
        self.project_out = nn.Linear(cfg.hidden_size, proj, bias=False) if proj != cfg.hidden_size else None
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size) if _has_final_norm(cfg) else None
        self.lm_head = nn.Linear(proj, cfg.vocab_size, bias=False)

    def setup(self, device, dtype) -> None:
        pass

    def forward(self, tokens: torch.Tensor, step: Step, cache: list[LayerKV]) -> torch.Tensor:
        mask = build_mask(step, 1)
        x = self.embed(tokens)
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(step.positions + POSITION_OFFSET)
        for layer, kv in zip(self.layers, cache):
            x = layer(x, step, kv, mask)
        if self.norm is not None:
            x = self.norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


def _has_final_norm(cfg: ModelConfig) -> bool:
    return cfg.norm_before and not cfg.raw.get("_remove_final_layer_norm", False)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, f = cfg.hidden_size, cfg.intermediate_size
    proj = cfg.word_embed_proj_dim or h
    d = "model.decoder."
    shapes: dict[str, tuple[int, ...]] = {
        d + "embed_tokens.weight": (cfg.vocab_size, proj),
        d + "embed_positions.weight": (cfg.max_positions + POSITION_OFFSET, h),
        "lm_head.weight": (cfg.vocab_size, proj),
    }
    if proj != h:
        shapes[d + "project_in.weight"] = (h, proj)
        shapes[d + "project_out.weight"] = (proj, h)
    if _has_final_norm(cfg):
        shapes[d + "final_layer_norm.weight"] = (h,)
    for i in range(cfg.num_layers):
        p = f"{d}layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (h, h)
        shapes[p + "fc1.weight"] = (f, h)
        shapes[p + "fc2.weight"] = (h, f)
        shapes[p + "self_attn_layer_norm.weight"] = (h,)
        shapes[p + "final_layer_norm.weight"] = (h,)
    return shapes


def _norm(module: nn.LayerNorm, get: Getter, name: str) -> None:
    assign(module.weight, get(name + ".weight"), name)
    assign(module.bias, get(name + ".bias"), name + ".bias")


def _linear(module: nn.Linear, get: Getter, name: str) -> None:
    assign(module.weight, get(name + ".weight"), name)
    if module.bias is not None:
        assign(module.bias, get(name + ".bias"), name + ".bias")


def load(model: Transformer, get: Getter) -> None:
    cfg = model.config
    d = "model.decoder."
    assign(model.embed.weight, get(d + "embed_tokens.weight"), d + "embed_tokens.weight")
    assign(model.embed_positions.weight, get(d + "embed_positions.weight"), d + "embed_positions.weight")
    head = d + "embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    assign(model.lm_head.weight, get(head), head)
    if model.project_in is not None:
        _linear(model.project_in, get, d + "project_in")
        _linear(model.project_out, get, d + "project_out")
    if model.norm is not None:
        _norm(model.norm, get, d + "final_layer_norm")
    for i, layer in enumerate(model.layers):
        p = f"{d}layers.{i}."
        a = p + "self_attn."
        qkv = [a + "q_proj", a + "k_proj", a + "v_proj"]
        assign(layer.attn.wqkv.weight, torch.cat([get(x + ".weight") for x in qkv]), a + "q_proj")
        if cfg.attention_bias:
            assign(layer.attn.wqkv.bias, torch.cat([get(x + ".bias") for x in qkv]), a + "q_proj.bias")
        _linear(layer.attn.wo, get, a + "out_proj")
        _linear(layer.mlp.fc1, get, p + "fc1")
        _linear(layer.mlp.fc2, get, p + "fc2")
        _norm(layer.attn_norm, get, p + "self_attn_layer_norm")
        _norm(layer.mlp_norm, get, p + "final_layer_norm")
