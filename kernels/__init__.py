"""Fused Triton kernels for the decode step, each with a plain PyTorch reference of the same signature.

Only triton and torch are imported here (never DuckDB or the rest of reldl). Where triton is missing the module
still imports: `triton_available(device)` is then False and callers use the `*_reference` functions.

- `rmsnorm(x, weight, eps, residual=None) -> (out, residual_out)`: RMSNorm, optionally fused with the residual add.
- `rope_and_cache(qkv, positions, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads, head_dim) -> q`:
  RoPE on q and k out of the fused qkv projection, k and v written to the paged cache.
- `paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, block_size, scale, window=None,
  num_splits=None) -> out`: flash-decoding over the paged cache, GQA groups packed, automatic split-K.
- `silu_and_mul(x) -> out`: silu(gate) * up.
- Contextual sparsity in the MLP (`sparse_mlp.py`, issue 7): `sparse_mlp(x, w1, b1, w2t, b2, idx, act)` (DejaVu-style
  ReLU/GELU MLP reading only the selected neurons' rows; halves `sparse_up`, `sparse_down`), `teal_linear`,
  `teal_gate_up`, `sparse_swiglu_mlp(x, w_gate_t, w_up_t, w_down_t, threshold_in, threshold_mid)` (TEAL input
  sparsity, reading only the rows of the transposed weights whose input survives), `select_neurons`.
- `tree_attention_reference(q, k_cache, v_cache, layout, scale) -> out`: attention of queries over a token tree
  whose KV is laid out once (`TreeLayout`, from `layout_from_block_tables` or `layout_from_tree`).
- `tree_attention(q, k_cache, v_cache, layout, scale, plan=None) -> out`: the Triton version (DeFT KV-guided
  grouping: each chunk of the layout read once for all the queries that see it, deterministic merge);
  `plan_tree_attention(layout, num_heads, num_kv_heads, head_dim, dtype=float16, sms=None, chunk_tokens=None)`
  computes its work decomposition once per tree (`TreeAttentionPlan`; reuse it for CUDA-graph replays).
- `quantize_4bit(w) -> Quantized4`, `dequantize_4bit(q)`, `matmul_4bit(x, q, bias=None)`: group-wise (64) 4-bit
  weights, dequantized inside the GEMM tiles; `quantize_kv_4bit` / `dequantize_kv_4bit` for K/V rows.
- `quant4_decode_attention(q, k_cache, v_cache, scale, k_new=None, v_new=None, mask=None, num_splits=None)`:
  decode attention over a 4-bit K/V cache (the offloaded executor's [S, B*h, ...] layout), K/V dequantized in
  registers, GQA packed, split-K; `quantize_kv_4bit_into(x, cache, start)` quantizes new rows into the cache.
"""

from reldl.kernels._triton import HAS_TRITON, triton_available
from reldl.kernels.activations import silu_and_mul, silu_and_mul_reference
from reldl.kernels.paged_attention import (
    choose_num_splits,
    paged_decode_attention,
    paged_decode_attention_reference,
)
from reldl.kernels.quant4 import (
    Quantized4,
    dequantize_4bit,
    dequantize_kv_4bit,
    matmul_4bit,
    matmul_4bit_reference,
    quantize_4bit,
    quantize_4bit_reference,
    quantize_kv_4bit,
    quantize_kv_4bit_reference,
)
from reldl.kernels.quant4_attention import (
    quant4_decode_attention,
    quant4_decode_attention_reference,
    quantize_kv_4bit_into,
    quantize_kv_4bit_into_reference,
)
from reldl.kernels.rmsnorm import rmsnorm, rmsnorm_reference
from reldl.kernels.rope_cache import rope_and_cache, rope_and_cache_reference
from reldl.kernels.sparse_mlp import (
    dense_mlp_reference,
    select_neurons,
    sparse_down,
    sparse_down_reference,
    sparse_mlp,
    sparse_mlp_reference,
    sparse_swiglu_mlp,
    sparse_swiglu_mlp_reference,
    sparse_up,
    sparse_up_reference,
    teal_gate_up,
    teal_gate_up_reference,
    teal_linear,
    teal_linear_reference,
)
from reldl.kernels.tree_attention import (
    TreeAttentionPlan,
    TreeLayout,
    layout_from_block_tables,
    layout_from_tree,
    plan_tree_attention,
    tree_attention,
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
    "tree_attention",
    "plan_tree_attention",
    "TreeAttentionPlan",
    "sparse_mlp",
    "sparse_mlp_reference",
    "sparse_up",
    "sparse_up_reference",
    "sparse_down",
    "sparse_down_reference",
    "dense_mlp_reference",
    "teal_linear",
    "teal_linear_reference",
    "teal_gate_up",
    "teal_gate_up_reference",
    "sparse_swiglu_mlp",
    "sparse_swiglu_mlp_reference",
    "select_neurons",
    "Quantized4",
    "quantize_4bit",
    "quantize_4bit_reference",
    "dequantize_4bit",
    "matmul_4bit",
    "matmul_4bit_reference",
    "quantize_kv_4bit",
    "quantize_kv_4bit_reference",
    "dequantize_kv_4bit",
    "quant4_decode_attention",
    "quant4_decode_attention_reference",
    "quantize_kv_4bit_into",
    "quantize_kv_4bit_into_reference",
]
