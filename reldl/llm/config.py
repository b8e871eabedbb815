"""Hugging Face config.json -> one normalised `ModelConfig` for every decoder family we run."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reldl.errors import CheckpointError

# model_type in config.json -> our family module
FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "opt": "opt",
    "gpt2": "gpt2",
}


@dataclass
class ModelConfig:
    family: str  # llama | opt | gpt2
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_positions: int
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (Qwen2) or on all projections (OPT/GPT-2)
    mlp_bias: bool = False
    activation: str = "silu"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None
    layer_windows: list[int | None] = field(default_factory=list)  # per layer; empty: sliding_window for all
    word_embed_proj_dim: int | None = None  # OPT-350m style projections
    norm_before: bool = True  # OPT's do_layer_norm_before
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def _rope_scaling(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """transformers 4.x writes `rope_theta` + `rope_scaling`; 5.x writes `rope_parameters`."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or None
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if scaling is not None:
        scaling = dict(scaling)
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        scaling["rope_type"] = kind
        if kind == "default":
            scaling = None
    return float(theta), scaling


def _eos_ids(cfg: dict[str, Any], gen: dict[str, Any]) -> list[int]:
    ids: list[int] = []
    for src in (cfg.get("eos_token_id"), gen.get("eos_token_id")):
        for x in src if isinstance(src, list) else [src]:
            if isinstance(x, int) and x not in ids:
                ids.append(x)
    return ids


def parse_config(path: Path) -> ModelConfig:
    """Read `config.json` (and `generation_config.json` when present) from a checkpoint directory."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    gen_file = path / "generation_config.json"
    gen = {}
    if gen_file.is_file():
        try:
            gen = json.loads(gen_file.read_text())
        except ValueError:
            gen = {}
    model_type = cfg.get("model_type")
    family = FAMILIES.get(model_type)
    if family is None:
        archs = ",".join(cfg.get("architectures") or []) or "?"
        known = ", ".join(sorted(FAMILIES))
        raise CheckpointError(
            f"{cfg_file}: unsupported architecture model_type={model_type!r} ({archs}); supported: {known}"
        )
    try:
        return _FAMILY_PARSERS[family](cfg, gen, model_type)
    except KeyError as e:
        raise CheckpointError(f"{cfg_file}: missing key {e} for model_type={model_type!r}") from None


def _llama(cfg: dict[str, Any], gen: dict[str, Any], model_type: str) -> ModelConfig:
    heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    theta, scaling = _rope_scaling(cfg)
    act = cfg.get("hidden_act", "silu")
    window = cfg.get("sliding_window")
    if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
        window = None
    # Qwen2 slides only layers >= max_window_layers; transformers 5 spells the choice out in `layer_types`
    n_layers, types = cfg["num_hidden_layers"], cfg.get("layer_types")
    if window is not None and isinstance(types, list) and len(types) == n_layers:
        windows = [window if t == "sliding_attention" else None for t in types]
    elif window is not None and model_type == "qwen2":
        windows = [window if i >= cfg.get("max_window_layers", n_layers) else None for i in range(n_layers)]
    else:
        windows = [window] * n_layers
    window = window if any(w is not None for w in windows) else None
    return ModelConfig(
        family="llama",
        model_type=model_type,
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        intermediate_size=cfg["intermediate_size"],
        max_positions=cfg.get("max_position_embeddings", 2048),
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        attention_bias=cfg.get("attention_bias", model_type == "qwen2"),
        mlp_bias=cfg.get("mlp_bias", False),
        activation=act,
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=window,
        layer_windows=windows,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg, gen),
        pad_token_id=cfg.get("pad_token_id"),
        raw=cfg,
    )


def _opt(cfg: dict[str, Any], gen: dict[str, Any], model_type: str) -> ModelConfig:
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    proj = cfg.get("word_embed_proj_dim", hidden)
    return ModelConfig(
        family="opt",
        model_type=model_type,
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=cfg["ffn_dim"],
        max_positions=cfg.get("max_position_embeddings", 2048),
        norm_eps=1e-5,
        tie_word_embeddings=cfg.get("tie_word_embeddings", True),
        attention_bias=cfg.get("enable_bias", True),
        mlp_bias=cfg.get("enable_bias", True),
        activation=cfg.get("activation_function", "relu"),
        word_embed_proj_dim=proj,
        norm_before=cfg.get("do_layer_norm_before", True),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg, gen),
        pad_token_id=cfg.get("pad_token_id"),
        raw=cfg,
    )


def _gpt2(cfg: dict[str, Any], gen: dict[str, Any], model_type: str) -> ModelConfig:
    hidden = cfg["n_embd"]
    heads = cfg["n_head"]
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if cfg.get(flag):
            raise CheckpointError(f"config.json: GPT-2 option {flag}=true is not supported")
    if cfg.get("scale_attn_weights") is False:
        raise CheckpointError("config.json: GPT-2 option scale_attn_weights=false is not supported")
    return ModelConfig(
        family="gpt2",
        model_type=model_type,
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        num_layers=cfg["n_layer"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=cfg.get("n_inner") or 4 * hidden,
        max_positions=cfg.get("n_positions", 1024),
        norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=cfg.get("tie_word_embeddings", True),
        attention_bias=True,
        mlp_bias=True,
        activation=cfg.get("activation_function", "gelu_new"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg, gen),
        pad_token_id=cfg.get("pad_token_id"),
        raw=cfg,
    )


_FAMILY_PARSERS = {"llama": _llama, "opt": _opt, "gpt2": _gpt2}
