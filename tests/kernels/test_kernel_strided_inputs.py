"""Index tensors arrive as strided views from the engine's CUDA-graph buffers ([3, B, 1] unbound, or [B, 3] sliced):
the launchers must not assume they are contiguous."""

from __future__ import annotations

import torch

from reldl.kernels import (
    paged_decode_attention,
    paged_decode_attention_reference,
    rope_and_cache,
    rope_and_cache_reference,
)


def test_rope_and_cache_with_strided_positions_and_slots(device):
    torch.manual_seed(0)
    n, h, kvh, d = 6, 4, 2, 16
    qkv = torch.randn(n, (h + 2 * kvh) * d).to(device)
    packed = torch.stack([torch.randint(0, 40, (n,)), torch.randperm(30)[:n] + 1], dim=1).to(
        device
    )  # [n, 2]: strided columns
    pos, slots = packed[:, 0:1], packed[:, 1:2]
    assert not pos.reshape(-1).is_contiguous() or pos.stride(0) != 1
    ang = torch.randn(64, d // 2)
    cos, sin = ang.cos().to(device), ang.sin().to(device)
    caches = [torch.zeros(32, kvh, d, device=device) for _ in range(4)]
    q = rope_and_cache(qkv, pos, cos, sin, caches[0], caches[1], slots, h, kvh, d)
    q_ref = rope_and_cache_reference(
        qkv, pos.contiguous(), cos, sin, caches[2], caches[3], slots.contiguous(), h, kvh, d
    )
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[0], caches[2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[1], caches[3], atol=0, rtol=0)


def test_paged_attention_with_strided_context_lens(device):
    torch.manual_seed(1)
    b, h, kvh, d, bs = 3, 4, 2, 16, 16
    k = torch.randn(8 * bs, kvh, d).to(device)
    v = torch.randn(8 * bs, kvh, d).to(device)
    q = torch.randn(b, h, d).to(device)
    tables = torch.tensor([[1, 2], [3, 4], [5, 6]], device=device)
    lens = torch.tensor([[5, 0], [17, 0], [32, 0]], device=device)[:, 0]  # a strided view
    out = paged_decode_attention(q, k, v, tables, lens, bs, d**-0.5)
    ref = paged_decode_attention_reference(q, k, v, tables, lens.contiguous(), bs, d**-0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
