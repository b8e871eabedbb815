"""Llama family: Llama 1/2/3, Mistral and Qwen2 (GQA, RoPE with scaling, optional q/k/v bias, sliding window)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from reldl.llm import fused
from reldl.llm.attention import LayerKV, Step, attend_cached, build_mask, paged_attention, tree_attend
from reldl.llm.config import ModelConfig
from reldl.llm.models.common import Getter, RMSNorm, activation, assign
from reldl.llm.rope import Rotary


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None = None):
        super().__init__()
        self.h, self.kvh, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.window = window
        self.wqkv = nn.Linear(cfg.hidden_size, (self.h + 2 * self.kvh) * self.d, bias=cfg.attention_bias)
        self.wo = nn.Linear(self.h * self.d, cfg.hidden_size, bias=_output_bias(cfg))
        self.scale = self.d**-0.5

    def forward(self, x, step: Step, kv: LayerKV, mask, rope: Rotary):
        B, T, _ = x.shape
        k_ = fused.on(x)
        if k_ is not None:  # one kernel rotates q/k and writes k/v into the cache; decode reads it in place
            qkv = self.wqkv(x).view(B * T, -1)
            pos, slots = step.positions.reshape(-1), step.slots.reshape(-1)
            q = k_.rope_and_cache(qkv, pos, rope.cos, rope.sin, kv.k, kv.v, slots, self.h, self.kvh, self.d)
            if step.tree is not None:  # rows share cache blocks: each shared block read once (DeFT)
                out = tree_attend(q.view(B, self.h, self.d), kv, step.tree, self.scale, step.tree_plan)
                return self.wo(out.reshape(B, 1, self.h * self.d))
            if T == 1:
                lens = step.positions[:, 0] + 1
                out = k_.paged_decode_attention(
                    q, kv.k, kv.v, step.block_tables, lens, step.block_size, self.scale, window=self.window
                )
                return self.wo(out.reshape(B, 1, self.h * self.d))
            return self.wo(attend_cached(q.view(B, T, self.h, self.d), kv, step, mask, self.scale))
        q, k, v = self.wqkv(x).split([self.h * self.d, self.kvh * self.d, self.kvh * self.d], dim=-1)
        q = rope(q.view(B, T, self.h, self.d), step.positions)
        k = rope(k.view(B, T, self.kvh, self.d), step.positions)
        out = paged_attention(q, k, v.view(B, T, self.kvh, self.d), kv, step, mask, self.scale)
        return self.wo(out)


class GatedMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.w13 = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = activation(cfg.activation)

    def forward(self, x):
        h = self.w13(x)
        k_ = fused.on(x) if self.act is F.silu else None
        if k_ is not None:
            return self.w2(k_.silu_and_mul(h))
        gate, up = h.split(self.inter, dim=-1)
        return self.w2(self.act(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None = None):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg, window)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = GatedMLP(cfg)

    def forward(self, x, step, kv, mask, rope):
        x = x + self.attn(self.attn_norm(x), step, kv, mask, rope)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, w) for w in _windows(cfg))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope: Rotary | None = None

    def setup(self, device, dtype) -> None:
        c = self.config
        self.rope = Rotary(c.head_dim, c.rope_theta, c.rope_scaling, c.max_positions, device, dtype)

    def forward(self, tokens: torch.Tensor, step: Step, cache: list[LayerKV]) -> torch.Tensor:
        c = self.config
        windows = _windows(c)
        masks = {w: build_mask(step, c.num_heads // c.num_kv_heads, w) for w in set(windows)}
        x = self.embed(tokens)
        for layer, kv, w in zip(self.layers, cache, windows):
            x = layer(x, step, kv, masks[w], self.rope)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


def _windows(cfg: ModelConfig) -> list[int | None]:
    """Each layer's sliding window (None: full attention)."""
    return list(cfg.layer_windows or [cfg.sliding_window] * cfg.num_layers)


def _output_bias(cfg: ModelConfig) -> bool:
    """Llama's attention_bias covers q/k/v/o; Qwen2 has bias on q/k/v only."""
    return cfg.attention_bias and cfg.model_type != "qwen2"


def _names(cfg: ModelConfig, i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    return {
        "q": p + "self_attn.q_proj",
        "k": p + "self_attn.k_proj",
        "v": p + "self_attn.v_proj",
        "o": p + "self_attn.o_proj",
        "gate": p + "mlp.gate_proj",
        "up": p + "mlp.up_proj",
        "down": p + "mlp.down_proj",
        "ln1": p + "input_layernorm",
        "ln2": p + "post_attention_layernorm",
    }


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        n = _names(cfg, i)
        shapes[n["q"] + ".weight"] = (cfg.num_heads * d, h)
        shapes[n["k"] + ".weight"] = (cfg.num_kv_heads * d, h)
        shapes[n["v"] + ".weight"] = (cfg.num_kv_heads * d, h)
        shapes[n["o"] + ".weight"] = (h, cfg.num_heads * d)
        shapes[n["gate"] + ".weight"] = (inter, h)
        shapes[n["up"] + ".weight"] = (inter, h)
        shapes[n["down"] + ".weight"] = (h, inter)
        shapes[n["ln1"] + ".weight"] = (h,)
        shapes[n["ln2"] + ".weight"] = (h,)
        if cfg.attention_bias:
            shapes[n["q"] + ".bias"] = (cfg.num_heads * d,)
            shapes[n["k"] + ".bias"] = (cfg.num_kv_heads * d,)
            shapes[n["v"] + ".bias"] = (cfg.num_kv_heads * d,)
        if _output_bias(cfg):
            shapes[n["o"] + ".bias"] = (h,)
        if cfg.mlp_bias:
            shapes[n["gate"] + ".bias"] = (inter,)
            shapes[n["up"] + ".bias"] = (inter,)
            shapes[n["down"] + ".bias"] = (h,)
    return shapes


def load(model: Transformer, get: Getter) -> None:
    cfg = model.config
    assign(model.embed.weight, get("model.embed_tokens.weight"), "model.embed_tokens.weight")
    assign(model.norm.weight, get("model.norm.weight"), "model.norm.weight")
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    assign(model.lm_head.weight, get(head), head)
    for i, layer in enumerate(model.layers):
        n = _names(cfg, i)
        qkv = [n["q"], n["k"], n["v"]]
        assign(layer.attn.wqkv.weight, torch.cat([get(x + ".weight") for x in qkv]), n["q"])
        if cfg.attention_bias:
            assign(layer.attn.wqkv.bias, torch.cat([get(x + ".bias") for x in qkv]), n["q"] + ".bias")
        assign(layer.attn.wo.weight, get(n["o"] + ".weight"), n["o"])
        if layer.attn.wo.bias is not None:
            assign(layer.attn.wo.bias, get(n["o"] + ".bias"), n["o"] + ".bias")
        assign(layer.mlp.w13.weight, torch.cat([get(n["gate"] + ".weight"), get(n["up"] + ".weight")]), n["up"])
        assign(layer.mlp.w2.weight, get(n["down"] + ".weight"), n["down"])
        if cfg.mlp_bias:
            assign(layer.mlp.w13.bias, torch.cat([get(n["gate"] + ".bias"), get(n["up"] + ".bias")]), n["up"])
            assign(layer.mlp.w2.bias, get(n["down"] + ".bias"), n["down"])
        assign(layer.attn_norm.weight, get(n["ln1"] + ".weight"), n["ln1"])
        assign(layer.mlp_norm.weight, get(n["ln2"] + ".weight"), n["ln2"])
