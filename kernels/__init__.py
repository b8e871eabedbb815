"""Fused Triton kernels for the decode step, each with a plain PyTorch reference of the same signature.

Only triton and torch are imported here (never DuckDB or the rest of reldl). Where triton is missing the module
still imports: `triton_available(device)` is then False and callers use the `*_reference` functions.

- `rmsnorm(x, weight, eps, residual=None) -> (out, residual_out)`: RMSNorm, optionally fused with the residual add.
- `rope_and_cache(qkv, positions, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads, head_dim) -> q`:
  RoPE on q and k out of the fused qkv projection, k and v written to the paged cache.
- `paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, block_size, scale, window=None,
  num_splits=None) -> out`: flash-decoding over the paged cache, GQA groups packed, automatic split-K.
- `silu_and_mul(x) -> out`: silu(gate) * up.
- `tree_attention_reference(q, k_cache, v_cache, layout, scale) -> out`: attention of queries over a token tree
  whose KV is laid out once (`TreeLayout`, from `layout_from_block_tables` or `layout_from_tree`).
"""

from reldl.kernels._triton import HAS_TRITON, triton_available
from reldl.kernels.activations import silu_and_mul, silu_and_mul_reference
from reldl.kernels.paged_attention import (
    choose_num_splits,
    paged_decode_attention,
    paged_decode_attention_reference,
)
from reldl.kernels.rmsnorm import rmsnorm, rmsnorm_reference
from reldl.kernels.rope_cache import rope_and_cache, rope_and_cache_reference
from reldl.kernels.tree_attention import (
    TreeLayout,
    layout_from_block_tables,
    layout_from_tree,
    tree_attention_reference,
)

__all__ = [
    "HAS_TRITON",
    "triton_available",
    "rmsnorm",
    "rmsnorm_reference",
    "rope_and_cache",
    "rope_and_cache_reference",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "choose_num_splits",
    "silu_and_mul",
    "silu_and_mul_reference",
    "TreeLayout",
    "layout_from_block_tables",
    "layout_from_tree",
    "tree_attention_reference",
]
