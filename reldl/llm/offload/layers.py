"""Functional decoder pieces for the offloaded executor: each takes one unit's weights explicitly.

The family files (reldl/llm/models) own their weights as nn.Modules; the executor instead streams a layer's
weights in and out, so it needs the same math as functions of (weights, input). The code mirrors
models/opt.py and models/llama.py (the PyTorch path) line for line, with two differences:

- every linear is `linear(x, w, b)`, which runs `kernels.matmul_4bit` (CUDA) / `matmul_4bit_reference` (CPU) when
  the weight is a `Quantized4`, so the full-precision weights of a compressed layer never exist on the device;
  an embedding table may be a `Quantized4` too (its rows are gathered and dequantized, nothing more);
- attention is a callback `attend(q [B,T,H,D], k [B,T,KVH,D], v) -> [B,T,H*D]` supplied by the executor, which
  owns the layer's KV cache (placed over tiers, maybe compressed) and the padding mask.

A "unit" is what the block schedule loads at once: the embedding ("embed"), each decoder layer, the head
("head": final norm, output projection, LM head). `units(cfg)` lists each unit's (key, Hugging Face name) pairs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from reldl.kernels.quant4 import Quantized4, dequantize_4bit, matmul_4bit, matmul_4bit_reference
from reldl.llm.config import ModelConfig
from reldl.llm.models.common import activation

Weights = dict[str, "torch.Tensor | Quantized4"]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

OPT_POSITION_OFFSET = 2

# SDPA backends for the executor's attention on CUDA: cuDNN attention left out. Each decode step's key length grows
# by one; on the H100 the first steps whose length was divisible by 2, 4 and 8 (decode steps 2, 4, 8 after a
# 512-token prompt) stalled 0.4-2 s each in the first process on a fresh machine, and never in later processes
# (a per-alignment runtime-compiled kernel whose compilation the driver caches on disk fits that; cuDNN's SDPA
# builds its graphs and kernels at run time, the CUTLASS memory-efficient kernel is precompiled). The attention
# is a few percent of an offloaded decode step, so the backend choice costs nothing measurable there.
# Not yet re-measured on the GPU (benchmarks/RESULTS.md, offloaded inference).
_SDPA_CUDA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(w, Quantized4):
        return (matmul_4bit if x.is_cuda else matmul_4bit_reference)(x, w, b)
    return F.linear(x, w, b)


EMBED_CHUNK_ROWS = 4096  # 4-bit embedding rows dequantized at a time (float32 temporaries: ~4 x rows x hidden x 4 B)


def embedding(ids: torch.Tensor, w, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(w, Quantized4):
        # in chunks of rows, into the output: a whole block's prompt (96 x 512 tokens of OPT-30B) dequantized at once
        # took ~4 GB of float32 temporaries beside a 0.7 GB result
        flat = ids.reshape(-1)
        out = torch.empty((flat.numel(), w.k), dtype=dtype, device=w.packed.device)
        for lo in range(0, flat.numel(), EMBED_CHUNK_ROWS):
            i = flat[lo : lo + EMBED_CHUNK_ROWS]
            out[lo : lo + i.numel()] = dequantize_4bit(Quantized4(w.packed[i], w.scale[i], w.minv[i], w.k), dtype)
        return out.reshape(*ids.shape, w.k)
    return F.embedding(ids, w)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


# --------------------------------------------------------------------------------------------------- units


def units(cfg: ModelConfig) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(unit name, [(key, HF tensor name), ...]), ...]: embed, layer 0..L-1, head."""
    if cfg.family == "opt":
        return _opt_units(cfg)
    if cfg.family == "llama":
        return _llama_units(cfg)
    raise NotImplementedError(f"offloaded inference supports the opt and llama families, not {cfg.family!r}")


def _opt_units(cfg: ModelConfig):
    d = "model.decoder."
    proj = cfg.word_embed_proj_dim or cfg.hidden_size
    embed = [("tok", d + "embed_tokens.weight"), ("pos", d + "embed_positions.weight")]
    head = []
    if proj != cfg.hidden_size:
        embed.append(("proj_in", d + "project_in.weight"))
        head.append(("proj_out", d + "project_out.weight"))
    if cfg.norm_before and not cfg.raw.get("_remove_final_layer_norm", False):
        head = [("norm", d + "final_layer_norm.weight"), ("norm.b", d + "final_layer_norm.bias")] + head
    head.append(("lm_head", d + "embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"))
    out = [("embed", embed)]
    for i in range(cfg.num_layers):
        p = f"{d}layers.{i}."
        w = []
        for key, name in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
            w.append((key, f"{p}self_attn.{name}.weight"))
            if cfg.attention_bias:
                w.append((key + ".b", f"{p}self_attn.{name}.bias"))
        for key in ("fc1", "fc2"):
            w.append((key, f"{p}{key}.weight"))
            if cfg.mlp_bias:
                w.append((key + ".b", f"{p}{key}.bias"))
        w += [("ln1", p + "self_attn_layer_norm.weight"), ("ln1.b", p + "self_attn_layer_norm.bias")]
        w += [("ln2", p + "final_layer_norm.weight"), ("ln2.b", p + "final_layer_norm.bias")]
        out.append((f"layer{i}", w))
    out.append(("head", head))
    return out


def _llama_units(cfg: ModelConfig):
    windows = cfg.layer_windows or [cfg.sliding_window] * cfg.num_layers
    if any(w is not None and w < cfg.max_positions for w in windows):
        raise NotImplementedError("offloaded inference: sliding-window attention is not supported")
    out = [("embed", [("tok", "model.embed_tokens.weight")])]
    o_bias = cfg.attention_bias and cfg.model_type != "qwen2"
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        w = []
        for key in ("q", "k", "v", "o"):
            w.append((key, f"{p}self_attn.{key}_proj.weight"))
            if (cfg.attention_bias and key != "o") or (key == "o" and o_bias):
                w.append((key + ".b", f"{p}self_attn.{key}_proj.bias"))
        for key in ("gate", "up", "down"):
            w.append((key, f"{p}mlp.{key}_proj.weight"))
            if cfg.mlp_bias:
                w.append((key + ".b", f"{p}mlp.{key}_proj.bias"))
        w += [("ln1", p + "input_layernorm.weight"), ("ln2", p + "post_attention_layernorm.weight")]
        out.append((f"layer{i}", w))
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    out.append(("head", [("norm", "model.norm.weight"), ("lm_head", head)]))
    return out


# --------------------------------------------------------------------------------------------------- forward


def embed(cfg: ModelConfig, w: Weights, ids: torch.Tensor, positions: torch.Tensor, dtype) -> torch.Tensor:
    """ids, positions [B, T] -> hidden [B, T, hidden]."""
    x = embedding(ids, w["tok"], dtype)
    if cfg.family == "opt":
        if "proj_in" in w:
            x = linear(x, w["proj_in"])
        x = x + embedding(positions + OPT_POSITION_OFFSET, w["pos"], dtype)
    return x


MLP_CHUNK_TOKENS = 4096  # prefill MLPs run this many tokens at a time: the ffn-wide intermediates stay bounded


def _by_tokens(fn, h: torch.Tensor) -> torch.Tensor:
    """fn over h [B, T, hidden] in chunks of MLP_CHUNK_TOKENS tokens. A block's prefill (OPT-30B, 96 x 512 tokens)
    otherwise holds fc1's output and its activation at once: 2 x 2.6 GiB."""
    flat = h.reshape(-1, h.shape[-1])
    if flat.shape[0] <= MLP_CHUNK_TOKENS:
        return fn(h)
    out = None
    for lo in range(0, flat.shape[0], MLP_CHUNK_TOKENS):
        y = fn(flat[lo : lo + MLP_CHUNK_TOKENS])
        if out is None:
            out = torch.empty((flat.shape[0], y.shape[-1]), dtype=y.dtype, device=y.device)
        out[lo : lo + y.shape[0]] = y
    return out.reshape(*h.shape[:-1], out.shape[-1])


def _qkv(w: Weights, h: torch.Tensor, q_dim: int, kv_dim: int) -> tuple[torch.Tensor, ...]:
    """The q, k and v projections of h: one GEMM over the fused "qkv" matrix where the executor stored one (its
    outputs are column slices of one tensor), else three."""
    if "qkv" in w:
        return tuple(linear(h, w["qkv"], w.get("qkv.b")).split([q_dim, kv_dim, kv_dim], dim=-1))
    return tuple(linear(h, w[key], w.get(f"{key}.b")) for key in ("q", "k", "v"))


def layer(
    cfg: ModelConfig, w: Weights, x: torch.Tensor, attend: Attend, positions: torch.Tensor, rope=None
) -> torch.Tensor:
    """One decoder layer: x [B, T, hidden] -> [B, T, hidden]."""
    B, T, hid = x.shape
    H, KVH, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    g = w.get
    if cfg.family == "opt":
        act = activation(cfg.activation)

        def attn(h):
            q, k, v = _qkv(w, h, H * D, KVH * D)
            return linear(attend(q.view(B, T, H, D), k.view(B, T, H, D), v.view(B, T, H, D)), w["o"], g("o.b"))

        def mlp(h):
            return _by_tokens(lambda t: linear(act(linear(t, w["fc1"], g("fc1.b"))), w["fc2"], g("fc2.b")), h)

        def ln(h, key):
            return F.layer_norm(h, (hid,), w[key], w[key + ".b"], cfg.norm_eps)

        if cfg.norm_before:
            x = x + attn(ln(x, "ln1"))
            return x + mlp(ln(x, "ln2"))
        x = ln(x + attn(x), "ln1")
        return ln(x + mlp(x), "ln2")
    # llama family
    h = rms_norm(x, w["ln1"], cfg.norm_eps)
    q, k, v = _qkv(w, h, H * D, KVH * D)
    q = rope(q.view(B, T, H, D), positions)
    k = rope(k.view(B, T, KVH, D), positions)
    v = v.view(B, T, KVH, D)
    x = x + linear(attend(q, k, v), w["o"], g("o.b"))
    h = rms_norm(x, w["ln2"], cfg.norm_eps)
    act = activation(cfg.activation)

    def mlp(t):
        return linear(act(linear(t, w["gate"], g("gate.b"))) * linear(t, w["up"], g("up.b")), w["down"], g("down.b"))

    return x + _by_tokens(mlp, h)


def head(cfg: ModelConfig, w: Weights, x: torch.Tensor) -> torch.Tensor:
    """Last hidden state per sequence [B, hidden] -> float32 logits [B, vocab]."""
    if cfg.family == "opt":
        if "norm" in w:
            x = F.layer_norm(x, (x.shape[-1],), w["norm"], w["norm.b"], 1e-5)
        if "proj_out" in w:
            x = linear(x, w["proj_out"])
    else:
        x = rms_norm(x, w["norm"], cfg.norm_eps)
    return linear(x, w["lm_head"]).float()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, T, h*g, D] against k / v [S, B, h, D] (the cache layout), mask [B, T, S] -> [B, T, h*g*D].

    The g query heads of a KV head are folded into the query length (as attention.attend_cached does)."""
    B, T, Hq, D = q.shape
    h = k.shape[2]
    gq = Hq // h
    qg = q.view(B, T, h, gq, D).permute(0, 2, 1, 3, 4).reshape(B, h, T * gq, D)
    kk = k.permute(1, 2, 0, 3)
    vv = v.permute(1, 2, 0, 3)
    m = mask.repeat_interleave(gq, dim=1).unsqueeze(1) if gq > 1 else mask.unsqueeze(1)
    if qg.is_cuda:  # no cuDNN attention: see _SDPA_CUDA
        with sdpa_kernel(_SDPA_CUDA):
            out = F.scaled_dot_product_attention(qg, kk.to(qg.dtype), vv.to(qg.dtype), attn_mask=m, scale=scale)
    else:
        out = F.scaled_dot_product_attention(qg, kk.to(qg.dtype), vv.to(qg.dtype), attn_mask=m, scale=scale)
    return out.view(B, h, T, gq, D).permute(0, 2, 1, 3, 4).reshape(B, T, Hq * D)


def cpu_decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, chunk: int = 32
) -> torch.Tensor:
    """Decode attention on the CPU (one query token per sequence) straight from the cache layout:
    q [B, 1, h*g, D] (any float dtype), k / v [S, B, h, D] (fp16 / fp32, e.g. views of the pinned host cache),
    mask [B, 1, S] bool -> [B, 1, h*g*D] float32.

    Same math as `attention`, computed in float32 over chunks of `chunk` cache slots: each chunk is converted once
    (small enough to stay in cache) and multiplied in place of its layout by batched GEMMs, so the fp16 cache is read
    once per step and never copied whole to float32 (the cost of `attention(q.float(), k.float(), ...)`)."""
    S, B, h, D = k.shape
    Hq = q.shape[2]
    g = Hq // h
    N = B * h
    qf = (q.reshape(B, h, g, D).float() * scale).reshape(N, g, D)
    sc = torch.empty(N, g, S, dtype=torch.float32)
    for a in range(0, S, chunk):
        kc = k[a : a + chunk].reshape(-1, N, D).float()  # [c, N, D]
        sc[:, :, a : a + kc.shape[0]] = torch.bmm(qf, kc.permute(1, 2, 0))
    sc = sc.view(B, h * g, S).masked_fill_(~mask, float("-inf"))
    p = torch.softmax(sc, dim=-1).view(N, g, S)
    out = torch.zeros(N, g, D, dtype=torch.float32)
    for a in range(0, S, chunk):
        vc = v[a : a + chunk].reshape(-1, N, D).float()
        out.baddbmm_(p[:, :, a : a + vc.shape[0]], vc.permute(1, 0, 2))
    return out.view(B, 1, Hq * D)
