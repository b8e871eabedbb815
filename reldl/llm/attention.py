"""Attention over the paged KV cache: the one place model files touch the cache.

Every forward pass (prefill or decode) is described by a `Step`: for each of B sequences, T new tokens with their
positions and the cache slots they are written to, plus each sequence's block table. Attention writes the new K/V
into the pool, gathers each sequence's context through its block table and attends with a causal mask built from
positions, so prompts of different lengths, padding and continuous batching need no special cases.

A decode step whose sequences share cache blocks (samples or beams forked from one prompt, prompts with a common
prefix) may carry a `TreeLayout` (kernels/tree_attention.py): the shared blocks are then read once for all the
queries that see them (DeFT tree attention) instead of once per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from reldl.kernels.tree_attention import TreeAttentionPlan, TreeLayout, tree_attention_reference


@dataclass
class Step:
    positions: torch.Tensor  # [B, T] int64, absolute position of each new token
    slots: torch.Tensor  # [B, T] int64, flat cache slot each new token's K/V goes to (padding -> trash slot)
    block_tables: torch.Tensor  # [B, NB] int64, cache blocks of each sequence in order
    block_size: int
    tree: TreeLayout | None = None  # decode steps (T == 1) only: rows in tree order, their KV laid out once
    # the kernel's work plan for `tree` (plan_tree_attention), made once per step and shared by every layer; None:
    # the PyTorch reference (CPU), which needs none
    tree_plan: TreeAttentionPlan | None = None


@dataclass
class LayerKV:
    k: torch.Tensor  # [num_blocks * block_size, kv_heads, head_dim]
    v: torch.Tensor


def build_mask(step: Step, group: int, sliding_window: int | None = None) -> torch.Tensor | None:
    """Boolean mask [B, 1, T*group, S]: key j is visible to a query at position p iff j <= p (and within window).
    None for a tree step (the layout says what each query sees)."""
    if step.tree is not None:
        return None
    B, NB = step.block_tables.shape
    S = NB * step.block_size
    keys = torch.arange(S, device=step.positions.device)
    pos = step.positions.unsqueeze(-1)  # [B, T, 1]
    mask = keys <= pos
    if sliding_window is not None:
        mask &= keys > pos - sliding_window
    if group > 1:
        mask = mask.repeat_interleave(group, dim=1)
    return mask.unsqueeze(1)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv: LayerKV,
    step: Step,
    mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [B,T,H,D], k/v [B,T,KVH,D] -> [B,T,H*D]. Query heads of a GQA group share one read of their KV head."""
    KVH, D = k.shape[2], k.shape[3]
    flat = step.slots.reshape(-1)
    kv.k.index_copy_(0, flat, k.reshape(-1, KVH, D).to(kv.k.dtype))
    kv.v.index_copy_(0, flat, v.reshape(-1, KVH, D).to(kv.v.dtype))
    if step.tree is not None:
        B, T, H, _ = q.shape
        return tree_attend(q.reshape(B * T, H, D), kv, step.tree, scale, step.tree_plan).reshape(B, T, H * D)
    return attend_cached(q, kv, step, mask, scale)


def tree_attend(
    q: torch.Tensor, kv: LayerKV, layout: TreeLayout, scale: float, plan: TreeAttentionPlan | None = None
) -> torch.Tensor:
    """q [Q, H, D] (one query per row, rows in tree order) over the tree's KV -> [Q, H, D]: reldl's Triton kernel
    on CUDA when it is there (with `plan`, the step's plan, no host syncs), the PyTorch reference elsewhere."""
    from reldl.llm import fused

    k_ = fused.on(q)
    kernel = getattr(k_, "tree_attention", None) if k_ is not None else None
    if kernel is not None:
        return kernel(q.contiguous(), kv.k, kv.v, layout, scale, plan=plan)
    return tree_attention_reference(q, kv.k, kv.v, layout, scale)


def attend_cached(q: torch.Tensor, kv: LayerKV, step: Step, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B,T,H,D] against each sequence's cached K/V (gathered through its block table) -> [B,T,H*D]."""
    B, T, H, D = q.shape
    KVH = kv.k.shape[1]
    g = H // KVH
    bs = step.block_size
    S = step.block_tables.shape[1] * bs
    kc = kv.k.view(-1, bs, KVH, D)[step.block_tables].view(B, S, KVH, D).transpose(1, 2)
    vc = kv.v.view(-1, bs, KVH, D)[step.block_tables].view(B, S, KVH, D).transpose(1, 2)
    qg = q.view(B, T, KVH, g, D).permute(0, 2, 1, 3, 4).reshape(B, KVH, T * g, D)
    out = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=mask, scale=scale)
    return out.view(B, KVH, T, g, D).permute(0, 2, 1, 3, 4).reshape(B, T, H * D)
