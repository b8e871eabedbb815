"""Package surface: what reldl.kernels exports, `triton_available`, and CUDA-graph capture (GPU only)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from kernel_testing import ON_GPU, randn

import reldl.kernels as K


def test_exports_and_reference_signatures():
    import inspect

    for name in ("rmsnorm", "rope_and_cache", "paged_decode_attention", "silu_and_mul"):
        kernel, ref = getattr(K, name), getattr(K, name + "_reference")
        assert list(inspect.signature(kernel).parameters) == list(inspect.signature(ref).parameters), name


def test_triton_available(monkeypatch):
    assert K.HAS_TRITON
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert K.triton_available("cpu") and K.triton_available(torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not K.triton_available(torch.device("cpu")) and not K.triton_available(torch.zeros(1))
    assert K.triton_available("cuda") and K.triton_available(torch.device("cuda", 0))


def test_kernels_import_nothing_but_torch_and_triton():
    """kernels/ must not pull in DuckDB or the rest of reldl (the `reldl` package itself imports DuckDB, so this
    reads the source)."""
    allowed = {"__future__", "functools", "math", "os", "torch", "triton", "reldl.kernels"}  # standard library ok
    for path in Path(K.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert any(name == a or name.startswith(a + ".") for a in allowed), f"{path.name} imports {name}"


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU (RELDL_KERNEL_TESTS_GPU=1)")
def test_cuda_graph_capture_and_replay():
    """All four kernels captured in one graph; replaying with new inputs (new context lengths, positions, slots,
    longer contexts needing split-K) gives what eager calls give."""
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    b, h, kvh, d, bs, nb, hidden = 4, 8, 2, 64, 16, 64, 256
    num_blocks = b * nb + 1
    kc = torch.zeros(num_blocks * bs, kvh, d, device=dev, dtype=dtype)
    vc = torch.zeros_like(kc)
    kc.copy_(randn(*kc.shape, seed=1, device=dev, dtype=dtype))
    vc.copy_(randn(*vc.shape, seed=2, device=dev, dtype=dtype))
    cos = randn(4096, d // 2, seed=3, device=dev)
    sin = randn(4096, d // 2, seed=4, device=dev)
    w = randn(hidden, seed=5, device=dev, dtype=dtype)
    x = torch.zeros(b, hidden, device=dev, dtype=dtype)
    res = torch.zeros_like(x)
    qkv = torch.zeros(b, (h + 2 * kvh) * d, device=dev, dtype=dtype)
    gate_up = torch.zeros(b, 2 * hidden, device=dev, dtype=dtype)
    pos = torch.zeros(b, dtype=torch.long, device=dev)
    slots = torch.zeros(b, dtype=torch.long, device=dev)
    tables = torch.zeros(b, nb, dtype=torch.long, device=dev)
    ctx = torch.ones(b, dtype=torch.int32, device=dev)

    def step():
        n, r = K.rmsnorm(x, w, 1e-5, res)
        q = K.rope_and_cache(qkv, pos, cos, sin, kc, vc, slots, h, kvh, d)
        o = K.paged_decode_attention(q, kc, vc, tables, ctx, bs, d**-0.5)  # b*kvh = 8 programs: split-K
        return n, r, o, K.silu_and_mul(gate_up)

    def fill(seed):
        g = torch.Generator().manual_seed(seed)
        x.copy_(randn(b, hidden, seed=seed, device=dev, dtype=dtype))
        res.copy_(randn(b, hidden, seed=seed + 1, device=dev, dtype=dtype))
        qkv.copy_(randn(*qkv.shape, seed=seed + 2, device=dev, dtype=dtype))
        gate_up.copy_(randn(*gate_up.shape, seed=seed + 3, device=dev, dtype=dtype))
        lens = torch.randint(1, nb * bs, (b,), generator=g)
        perm = torch.randperm(num_blocks - 1, generator=g) + 1
        tables.copy_(perm[: b * nb].view(b, nb))
        ctx.copy_(lens)
        pos.copy_(lens - 1)
        slots.copy_(tables.cpu().gather(1, ((lens - 1) // bs).view(b, 1)).view(b) * bs + (lens - 1) % bs)

    fill(10)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in (20, 30):
        fill(seed)
        graph.replay()
        kc_after, vc_after = kc.clone(), vc.clone()
        want = step()  # eager, same inputs (rewrites the same cache rows with the same values)
        torch.cuda.synchronize()
        for got, exp in zip(outs, want):
            torch.testing.assert_close(got, exp, atol=0, rtol=0)
        assert torch.equal(kc, kc_after) and torch.equal(vc, vc_after)
