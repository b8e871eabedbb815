"""Contextual sparsity in the MLP (issue 7): read only the weight rows that matter for this step.

Two kinds of sparsity, one pair of kernels:

- DejaVu (ReLU MLPs, OPT / GPT-2 style, y = W2 act(W1 x + b1) + b2): a predictor picks the neurons likely to be
  active; only those rows of W1 [n, d] (nn.Linear layout) and of W2t [n, d] (= W2 transposed, contiguous, so a
  neuron's output weights are one contiguous row) are read. `idx` is the union of the selected neurons over the
  batch (int32 or int64, any order, no duplicates, length k); rows not in `idx` are never addressed.
- TEAL (SwiGLU MLPs, Llama style, y = W_down (silu(W_gate x) * (W_up x))): entries of each layer's *input* with
  |value| <= threshold are zeroed, so only the weight columns of the surviving input dimensions are needed. The
  weights are stored transposed (W_gate_t / W_up_t [d, n], W_down_t [n, d]) so those columns are contiguous rows.
  Either an index of the surviving dimensions is given (row gather), or none is and the kernel looks at the input
  itself and skips the rows whose input is zero for the whole batch (masked loads: no index, no host sync).

Kernels:

1. `_rows_dot_kernel` (gather-GEMV / GEMM, the "up" half of the ReLU MLP): out[b, j] = x[b] . W[idx[j]]. Grid
   (cdiv(k, BLOCK_N), SPLIT_D): a program takes BLOCK_N selected rows and one chunk of d. With one chunk it applies
   bias and activation and writes h; otherwise it writes float32 partials [SPLIT_D, B, k] that the next kernel sums
   in a fixed order.
2. `_gather_matmul_kernel` (the "down" half, and TEAL's projections): out[b, :] = sum_j a[b, j] * W[row_j, :].
   Grid (S, cdiv(N, BLOCK_N)): program (s, c) takes a contiguous share of the selected rows (split-K over the
   neurons) and a block of output columns; a[b, j] is read compactly (h[b, j]), gathered (x[b, idx[j]]), summed
   from kernel 1's partials (+ bias, activation), or taken densely with the TEAL threshold. With S == 1 it writes
   the result (+ bias); otherwise float32 partials [S, B, N].
3. `_reduce_kernel`: sums partials over splits in a fixed order (deterministic, no atomics), then bias (optionally
   gathered through idx), activation, or silu(gate) * up for the fused gate/up projection. With
   DOWN_REDUCE_IN_KERNEL, kernel 2 (not the dual gate/up) sums its own partials instead (`_arrive_and_reduce`: the
   last programs to arrive, counted with atomics, reduce column slices in a fixed split order: still deterministic).
4. A one-launch fused batch-1 ReLU MLP kernel was measured 1.3-1.8x slower than 1 + 2 + 3 and removed (RESULTS.md,
   session 4; commit d1bae54).
   Also measured and removed (RESULTS.md): a one-launch kernel with a grid-wide barrier between the halves (2-3x
   slower on the H200, commit 99e7b3b) and a one-launch dataflow kernel whose down programs wait on per-split
   arrival counters (1.35x or more slower, commit 31471f7).
5. TEAL without an index: `_compact_kernel` lists the kept input dimensions on the device (count, indices, values);
   kernel 2 then reads the count from device memory (no host sync). `sparse_swiglu_mlp` runs the thresholded dense
   MLP (cuBLAS + `_threshold_kernel` / `_glu_threshold_kernel`) above TEAL_MAX_SPARSE_BATCH rows.
PDL (programmatic dependent launch) can chain kernels 1-3 and the compaction (module flag PDL).

Batch 1 takes a GEMV path (float32 fused multiply-adds, no tl.dot); batches 2..64 use tl.dot with the batch padded to
16 rows (every tl.dot dimension >= 16); larger batches are cut into chunks of 64. Accumulation is float32; weights in
float16 / bfloat16 / float32; offsets into the weights are int64 (a 49152 x 12288 matrix has 6e8 elements).

Every launcher takes its grid from shapes only (k = idx.numel()) and makes no host sync, so it can be captured in a
CUDA graph. `select_neurons` with `density` is sync-free too; with `threshold` it calls torch.nonzero (a host sync:
the number of selected neurons becomes a shape). TEAL without an index needs no selection at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reldl.kernels._triton import (
    cdiv,
    next_pow2,
    pdl_launch_opts,
    pdl_supported,
    require_triton,
    tl,
    triton,
)
from reldl.kernels.paged_attention import num_sms

ACTIVATIONS = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}
PROGRAMS_PER_SM = 4  # launch about this many programs per SM (memory-level parallelism for a bandwidth-bound read)
UP_PROGRAMS_PER_SM = 4  # the same for kernel 1 (under PDL, kernel 2's programs need room beside kernel 1's)
PARTIAL_FRACTION = 8  # split-K partials may cost at most 1/PARTIAL_FRACTION of the weight bytes read
MAX_DOT_BATCH = 64  # larger batches are processed in chunks of this many rows
MODE_COMPACT, MODE_GATHER, MODE_PARTIALS, MODE_DENSE = 0, 1, 2, 3


# ---------------------------------------------------------------------------------------------------------------
# references


def _act_reference(h: torch.Tensor, act: str) -> torch.Tensor:
    if act == "none":
        return h
    if act == "relu":
        return F.relu(h)
    if act == "gelu":
        return F.gelu(h)
    if act == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if act == "silu":
        return F.silu(h)
    raise ValueError(f"unknown activation {act!r}: one of {sorted(ACTIVATIONS)}")


def _teal_sparsify(x: torch.Tensor, threshold: float | None) -> torch.Tensor:
    return x if threshold is None else torch.where(x.abs() > threshold, x, torch.zeros_like(x))


def sparse_up_reference(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, idx: torch.Tensor, act: str = "relu"
) -> torch.Tensor:
    """h [B, k] = act(x @ W1[idx].T + b1[idx]) in float32. x [B, d]; w1 [n, d]; b1 [n] or None; idx [k]."""
    rows = idx.long()
    h = x.float() @ w1[rows].float().T
    if b1 is not None:
        h = h + b1[rows].float()
    return _act_reference(h, act)


def sparse_down_reference(
    h: torch.Tensor, w2t: torch.Tensor, b2: torch.Tensor | None, idx: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """y [B, d] = h @ W2t[idx] + b2, computed in float32, returned in out_dtype (default w2t.dtype).
    h [B, k] (the activations of the selected neurons, in idx order); w2t [n, d]; b2 [d] or None."""
    y = h.float() @ w2t[idx.long()].float()
    if b2 is not None:
        y = y + b2.float()
    return y.to(out_dtype or w2t.dtype)


def sparse_mlp_reference(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2t: torch.Tensor,
    b2: torch.Tensor | None,
    idx: torch.Tensor,
    act: str = "relu",
) -> torch.Tensor:
    """The ReLU (or GELU) MLP restricted to the neurons in idx: W2t[idx].T act(W1[idx] x + b1[idx]) + b2, computed in
    float32, returned in x.dtype. Equals the dense MLP when idx holds every neuron whose activation is nonzero."""
    h = sparse_up_reference(x, w1, b1, idx, act)
    return sparse_down_reference(h, w2t, b2, idx, x.dtype)


def dense_mlp_reference(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2t: torch.Tensor, b2: torch.Tensor | None, act="relu"
) -> torch.Tensor:
    """The dense MLP with the same weight layout, in float32, returned in x.dtype."""
    h = _act_reference(F.linear(x.float(), w1.float(), None if b1 is None else b1.float()), act)
    y = h @ w2t.float()
    if b2 is not None:
        y = y + b2.float()
    return y.to(x.dtype)


def teal_linear_reference(
    x: torch.Tensor,
    w_t: torch.Tensor,
    threshold: float | None = None,
    idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [B, N] = s(x) @ w_t (+ bias), s zeroing entries with |x| <= threshold (none when threshold is None), and, when
    idx is given, every input dimension not in idx. x [B, d]; w_t [d, N]. float32 inside, x.dtype out."""
    xs = _teal_sparsify(x.float(), threshold)
    if idx is not None:
        keep = torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
        keep[idx.long()] = True
        xs = xs * keep
    y = xs @ w_t.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def teal_gate_up_reference(
    x: torch.Tensor,
    w_gate_t: torch.Tensor,
    w_up_t: torch.Tensor,
    threshold: float | None = None,
    idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """h [B, n] = silu(s(x) @ w_gate_t) * (s(x) @ w_up_t), s as in `teal_linear_reference`; x.dtype out."""
    g = teal_linear_reference(x.float(), w_gate_t, threshold, idx)
    u = teal_linear_reference(x.float(), w_up_t, threshold, idx)
    return (F.silu(g) * u).to(x.dtype)


def sparse_swiglu_mlp_reference(
    x: torch.Tensor,
    w_gate_t: torch.Tensor,
    w_up_t: torch.Tensor,
    w_down_t: torch.Tensor,
    threshold_in: float | None,
    threshold_mid: float | None,
    use_index: bool = False,
) -> torch.Tensor:
    """TEAL SwiGLU: h = silu(s_in(x) W_gate_t) * (s_in(x) W_up_t) rounded to x.dtype, y = s_mid(h) W_down_t.
    `use_index` is accepted for signature parity (the result does not depend on it)."""
    del use_index
    h = teal_gate_up_reference(x, w_gate_t, w_up_t, threshold_in)
    return teal_linear_reference(h, w_down_t, threshold_mid)


# ---------------------------------------------------------------------------------------------------------------
# selection


def num_selected(n: int, density: float) -> int:
    """How many of n neurons a density keeps: round(density * n), clamped to [0, n]."""
    return max(0, min(n, int(round(float(density) * n))))


def select_neurons(
    scores: torch.Tensor, density: float | None = None, threshold: float | None = None, absolute: bool = False
) -> torch.Tensor:
    """Union over the batch of the neurons to compute -> int32 index [k] (unsorted).

    scores [B, n] or [n] (a predictor's scores, or the activations themselves; `absolute` uses |scores|, as TEAL
    does). Exactly one of:
    - density: the k = round(density * n) neurons with the largest max-over-the-batch score (for B = 1, the row's
      top-k). k depends only on shapes: no host sync, CUDA-graph safe.
    - threshold: every neuron whose score exceeds `threshold` in at least one row. The count depends on the
      values, so this calls torch.nonzero, which SYNCS with the host (not capturable in a CUDA graph). For TEAL
      prefer `teal_linear` / `sparse_swiglu_mlp` without an index: they threshold inside the kernel, sync-free.
    """
    if (density is None) == (threshold is None):
        raise ValueError("select_neurons: give exactly one of density and threshold")
    s = scores.abs() if absolute else scores
    if s.dim() == 1:
        s = s.unsqueeze(0)
    if s.dim() != 2:
        raise ValueError(f"select_neurons: scores must be [B, n] or [n], got {tuple(scores.shape)}")
    n = s.shape[1]
    if density is not None:
        k = num_selected(n, density)
        if k == 0 or s.shape[0] == 0:
            return torch.empty(0, dtype=torch.int32, device=s.device)
        best = s.amax(dim=0)
        return torch.topk(best, k, sorted=False).indices.to(torch.int32)
    # compare in float32, as the kernels' THRESH does (`|a| > threshold`, a float32 threshold): a float16 tensor
    # compared with a Python float rounds the threshold to float16, and where it rounds up, the entries equal to the
    # rounded value were dropped from the index while the kernels and the references keep them
    keep = (s.float() > threshold).any(dim=0)
    return torch.nonzero(keep).view(-1).to(torch.int32)  # host sync


# ---------------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _apply_act(h, ACT: tl.constexpr):
    if ACT == 1:
        h = tl.maximum(h, 0.0)
    elif ACT == 2:
        h = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT == 3:
        z = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        h = 0.5 * h * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * z)) - 1.0))
    elif ACT == 4:
        h = h / (1.0 + tl.exp(-h))
    return h


@triton.jit
def _arrive_and_reduce(
    part_ptr,
    out_ptr,
    bias_ptr,
    cnt_ptr,
    n_parts,
    n_prog,
    n_red,
    B,
    N,
    stride_ps,
    stride_pb,
    stride_ob,
    HAS_BIAS: tl.constexpr,
    RED_P: tl.constexpr,
    RED_C: tl.constexpr,
):
    """The split-K reduce inside the launch that wrote the partials (float32 part[s, b, c], s < n_parts): every
    program counts its arrival on cnt[0] once its partial is stored; the last n_red to arrive wait until all n_prog
    have, and reducer r sums column slice r over s = 0..n_parts-1 in order (deterministic: the same sums whichever
    program does them), adds bias[c], writes out[b, c]; the last reducer to finish zeroes both counters for the next
    launch. Only those n_red programs ever wait, and only for programs already counted or still to run: no
    deadlock while n_red programs fit on the GPU at once (n_red <= half the SMs; 1 in the interpreter, where programs
    run one after another)."""
    tl.debug_barrier()  # every thread's partial stores before the (releasing) arrival
    old = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    slot = old - (n_prog - n_red)
    if slot >= 0:
        seen = old + 1
        while seen < n_prog:
            seen = tl.atomic_add(cnt_ptr, 0, sem="acq_rel", scope="gpu")
        per = tl.cdiv(tl.cdiv(N, n_red), RED_C) * RED_C
        c_lo = slot * per
        c_hi = tl.minimum(c_lo + per, N)
        ss0 = tl.arange(0, RED_P)
        for b in range(B):
            for c0 in range(c_lo, c_hi, RED_C):
                cols = c0 + tl.arange(0, RED_C)
                cm = cols < c_hi
                acc = tl.zeros([RED_C], dtype=tl.float32)
                for s0 in range(0, n_parts, RED_P):
                    ss = s0 + ss0
                    src = part_ptr + ss[:, None].to(tl.int64) * stride_ps + b * stride_pb + cols[None, :]
                    t = tl.load(src, mask=(ss < n_parts)[:, None] & cm[None, :], other=0.0, cache_modifier=".cg")
                    acc += tl.sum(t, axis=0)
                if HAS_BIAS:
                    acc += tl.load(bias_ptr + cols, mask=cm, other=0.0).to(tl.float32)
                tl.store(out_ptr + b * stride_ob + cols, acc.to(out_ptr.dtype.element_ty), mask=cm)
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + 1, 1, sem="acq_rel", scope="gpu")
        if done == n_red - 1:  # every reducer is past its wait: reset for the next launch
            tl.atomic_xchg(cnt_ptr + 1, 0, sem="acq_rel", scope="gpu")
            tl.atomic_xchg(cnt_ptr, 0, sem="acq_rel", scope="gpu")


@triton.jit
def _rows_dot_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    idx_ptr,
    out_ptr,
    B,
    k,
    d,
    d_per_split,
    stride_xb,
    stride_w,
    stride_os,
    stride_ob,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    FINAL: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    PDL: tl.constexpr = False,
    LOOP_STAGES: tl.constexpr = None,
):
    """LOOP_STAGES: software-pipeline the loop over d in that many stages (tl.range's num_stages: the next steps'
    weight loads go out before this step's arrive); None, the plain loop: Triton pipelines only loads that feed a
    tl.dot, so each step of the batch-1 loop waits for its own loads."""
    if PDL:  # programmatic dependent launch: wait for the previous kernel, then let the next one start launching
        # (in this order: kernel 2 reads the neuron index before it waits for this kernel, so it must not start
        # before the kernel that wrote the index has finished)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    jm = j < k
    rows = tl.load(idx_ptr + j, mask=jm, other=0).to(tl.int64)
    w_rows = w_ptr + rows[:, None] * stride_w
    d_lo = pid_s * d_per_split
    d_hi = tl.minimum(d_lo + d_per_split, d)
    cols0 = tl.arange(0, BLOCK_D)
    bb = tl.arange(0, BLOCK_B)
    bm = bb < B
    if BLOCK_B == 1:
        acc2 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for d0 in tl.range(d_lo, d_hi, BLOCK_D, num_stages=LOOP_STAGES):
            cols = d0 + cols0
            cm = cols < d
            w = tl.load(w_rows + cols[None, :], mask=jm[:, None] & cm[None, :], other=0.0)
            xv = tl.load(x_ptr + cols, mask=cm, other=0.0)
            acc2 += w.to(tl.float32) * xv.to(tl.float32)[None, :]
        acc = tl.sum(acc2, axis=1)[None, :]  # [1, BLOCK_N]
    else:
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        x_rows = x_ptr + bb[:, None].to(tl.int64) * stride_xb
        for d0 in range(d_lo, d_hi, BLOCK_D):
            cols = d0 + cols0
            cm = cols < d
            w = tl.load(w_rows + cols[None, :], mask=jm[:, None] & cm[None, :], other=0.0)
            xv = tl.load(x_rows + cols[None, :], mask=bm[:, None] & cm[None, :], other=0.0)
            acc = tl.dot(xv.to(w.dtype), tl.trans(w), acc, input_precision=DOT_PREC)
    om = bm[:, None] & jm[None, :]
    if FINAL:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=jm, other=0.0).to(tl.float32)[None, :]
        acc = _apply_act(acc, ACT)
        tl.store(out_ptr + bb[:, None] * stride_ob + j[None, :], acc.to(out_ptr.dtype.element_ty), mask=om)
    else:
        tl.store(out_ptr + pid_s * stride_os + bb[:, None] * stride_ob + j[None, :], acc, mask=om)


@triton.jit
def _prefetch_l2(ptrs):
    """PTX prefetch.global.L2 of each address (compiled only: the interpreter has no inline assembly)."""
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def _prefetch_rows_l2(
    idx_ptr, w_ptr, k, N, stride_w, blk_lo, n_blk, pid_c,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, LINE: tl.constexpr,
):  # fmt: skip
    """Kernel 2's weight tiles of blocks [blk_lo, blk_lo + n_blk), columns of block pid_c, into L2: one prefetch
    per 128-byte line (LINE elements). Weights and the index are inputs the previous kernel does not write, so
    this may run before gdc_wait; the index is read past L1 (.cg)."""
    kk = tl.arange(0, BLOCK_K)
    segs = pid_c * BLOCK_N + tl.arange(0, BLOCK_N // LINE) * LINE
    segs = tl.minimum(segs, N - 1)
    blk_hi = tl.minimum(blk_lo + n_blk, tl.cdiv(k, BLOCK_K))
    for blk in range(blk_lo, blk_hi):
        j = blk * BLOCK_K + kk
        jm = j < k
        rows = tl.load(idx_ptr + j, mask=jm, other=0, cache_modifier=".cg").to(tl.int64)
        _prefetch_l2(w_ptr + rows[:, None] * stride_w + segs[None, :])


@triton.jit
def _gather_matmul_kernel(
    a_ptr,
    idx_ptr,
    a_bias_ptr,
    w_ptr,
    w2_ptr,
    bias_ptr,
    out_ptr,
    k_ptr,
    cnt_ptr,
    y_ptr,
    B,
    k,
    N,
    blocks_per_split,
    n_red,
    stride_yb,
    threshold,
    stride_ab,
    stride_as,
    stride_w,
    stride_w2,
    stride_os,
    stride_ob,
    A_MODE: tl.constexpr,
    A_SPLITS: tl.constexpr,
    A_ACT: tl.constexpr,
    HAS_A_BIAS: tl.constexpr,
    THRESH: tl.constexpr,
    SKIP_ZERO_ROWS: tl.constexpr,
    DUAL: tl.constexpr,
    DIRECT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    K_PTR: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
    PDL: tl.constexpr = False,
    RED_IN: tl.constexpr = False,
    RED_P: tl.constexpr = 16,
    RED_C: tl.constexpr = 64,
    PREFETCH_L2: tl.constexpr = False,
    LINE: tl.constexpr = 64,
    LOOP_STAGES: tl.constexpr = None,
    STEP_SUM: tl.constexpr = False,
):
    """LOOP_STAGES: as in `_rows_dot_kernel`, for the loop over blocks of rows (its index, input and weight loads).
    STEP_SUM (batch 1): sum each block of rows into a [BLOCK_N] accumulator as it arrives, rather than keeping a
    [BLOCK_K, BLOCK_N] one summed at the end (the 128 x 64 tile at 2 warps: 248 registers -> 128, sm_90)."""
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    if PDL:  # programmatic dependent launch: let the next kernel start launching, wait for the previous one
        tl.extra.cuda.gdc_launch_dependents()
        if PREFETCH_L2:  # while the previous kernel (kernel 1) runs: pull this program's weight rows into L2
            _prefetch_rows_l2(idx_ptr, w_ptr, k, N, stride_w, pid_s * blocks_per_split, blocks_per_split, pid_c,
                              BLOCK_K, BLOCK_N, LINE)  # fmt: skip
        tl.extra.cuda.gdc_wait()
    if K_PTR:  # k counted on the device (`_compact_kernel`): the splits share its blocks evenly
        k = tl.load(k_ptr)
        blocks_per_split = tl.cdiv(tl.cdiv(k, BLOCK_K), tl.num_programs(0))
    cols = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < N
    bb = tl.arange(0, BLOCK_B)
    bm = bb < B
    a_rows = a_ptr + bb[:, None].to(tl.int64) * stride_ab
    kk = tl.arange(0, BLOCK_K)
    nblk = tl.cdiv(k, BLOCK_K)
    blk_lo = pid_s * blocks_per_split
    blk_hi = tl.minimum(blk_lo + blocks_per_split, nblk)
    if BLOCK_B == 1:
        acc2 = tl.zeros([1 if STEP_SUM else BLOCK_K, BLOCK_N], dtype=tl.float32)
        if DUAL:
            acc2u = tl.zeros([1 if STEP_SUM else BLOCK_K, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        if DUAL:
            accu = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for blk in tl.range(blk_lo, blk_hi, num_stages=LOOP_STAGES):
        j = blk * BLOCK_K + kk
        jm = j < k
        if A_MODE == 3:
            rows = j.to(tl.int64)
        else:
            rows = tl.load(idx_ptr + j, mask=jm, other=0).to(tl.int64)
        am = bm[:, None] & jm[None, :]
        if A_MODE == 0:
            a = tl.load(a_rows + j[None, :], mask=am, other=0.0).to(tl.float32)
        elif A_MODE == 2:
            a = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
            for s in tl.static_range(A_SPLITS):
                a += tl.load(a_rows + s * stride_as + j[None, :], mask=am, other=0.0)
            if HAS_A_BIAS:
                a += tl.load(a_bias_ptr + rows, mask=jm, other=0.0).to(tl.float32)[None, :]
            a = _apply_act(a, A_ACT)
            a = tl.where(am, a, 0.0)
        else:
            a = tl.load(a_rows + rows[None, :], mask=am, other=0.0).to(tl.float32)
        if THRESH:
            a = tl.where(tl.abs(a) > threshold, a, 0.0)
        if SKIP_ZERO_ROWS:
            row_on = jm & (tl.max(tl.abs(a), axis=0) > 0.0)
        else:
            row_on = jm
        wm = row_on[:, None] & cm[None, :]
        w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=wm, other=0.0)
        if DUAL:
            w2 = tl.load(w2_ptr + rows[:, None] * stride_w2 + cols[None, :], mask=wm, other=0.0)
        if BLOCK_B == 1:
            a1 = tl.sum(a, axis=0)[:, None]  # [BLOCK_K, 1]
            if STEP_SUM:
                acc2 += tl.sum(a1 * w.to(tl.float32), axis=0)[None, :]
                if DUAL:
                    acc2u += tl.sum(a1 * w2.to(tl.float32), axis=0)[None, :]
            else:
                acc2 += a1 * w.to(tl.float32)
                if DUAL:
                    acc2u += a1 * w2.to(tl.float32)
        else:
            acc = tl.dot(a.to(w.dtype), w, acc, input_precision=DOT_PREC)
            if DUAL:
                accu = tl.dot(a.to(w2.dtype), w2, accu, input_precision=DOT_PREC)
    if BLOCK_B == 1:
        acc = tl.sum(acc2, axis=0)[None, :]
        if DUAL:
            accu = tl.sum(acc2u, axis=0)[None, :]
    om = bm[:, None] & cm[None, :]
    if DIRECT:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + bb[:, None] * stride_ob + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=om)
    else:
        dst = out_ptr + pid_s * stride_os + bb[:, None] * stride_ob + cols[None, :]
        tl.store(dst, acc, mask=om)
        if DUAL:
            tl.store(dst + N, accu, mask=om)
        if RED_IN:  # not DUAL: reduce the splits in this launch (y = sum_s partials + bias)
            n_prog = tl.num_programs(0) * tl.num_programs(1)
            _arrive_and_reduce(
                out_ptr,
                y_ptr,
                bias_ptr,
                cnt_ptr,
                tl.num_programs(0),
                n_prog,
                n_red,
                B,
                N,
                stride_os,
                stride_ob,
                stride_yb,
                HAS_BIAS,
                RED_P,
                RED_C,
            )


@triton.jit
def _compact_kernel(
    a_ptr,
    out_ptr,
    idx_ptr,
    cnt_ptr,
    B,
    n,
    threshold,
    stride_ab,
    stride_ob,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """TEAL's input, compacted on the device: the dimensions i with |a[b, i]| > threshold for some row b, in order:
    idx[0:count] = i, out[b, 0:count] = s(a[b, i]) (entries at or under the threshold zeroed), cnt[0] = count. One
    program over the whole input (n <= BLOCK); no host sync."""
    if PDL:  # programmatic dependent launch: let the next kernel start launching, wait for the previous one
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    i = tl.arange(0, BLOCK)
    m = i < n
    keep = tl.zeros([BLOCK], dtype=tl.int32)
    for b in range(B):
        v = tl.load(a_ptr + b * stride_ab + i, mask=m, other=0.0).to(tl.float32)
        keep = tl.where(tl.abs(v) > threshold, 1, keep)
    keep = tl.where(m, keep, 0)
    pos = tl.cumsum(keep, axis=0) - 1
    on = keep > 0
    tl.store(idx_ptr + pos, i, mask=on)
    for b in range(B):
        v = tl.load(a_ptr + b * stride_ab + i, mask=m, other=0.0)
        v = tl.where(tl.abs(v.to(tl.float32)) > threshold, v, 0.0)
        tl.store(out_ptr + b * stride_ob + pos, v, mask=on)
    tl.store(cnt_ptr, tl.sum(keep, axis=0))


@triton.jit
def _threshold_kernel(a_ptr, out_ptr, n, threshold, BLOCK: tl.constexpr):
    """out = a where |a| > threshold, else 0 (contiguous, n elements)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    v = tl.load(a_ptr + i, mask=m, other=0.0)
    tl.store(out_ptr + i, tl.where(tl.abs(v.to(tl.float32)) > threshold, v, 0.0), mask=m)


@triton.jit
def _glu_threshold_kernel(g_ptr, u_ptr, out_ptr, n, threshold, BLOCK: tl.constexpr):
    """out = s(silu(g) * u): rounded to out's dtype, then entries with |value| <= threshold zeroed (contiguous)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    g = tl.load(g_ptr + i, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + i, mask=m, other=0.0).to(tl.float32)
    h = (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + i, tl.where(tl.abs(h.to(tl.float32)) > threshold, h, 0.0), mask=m)


@triton.jit
def _reduce_kernel(
    part_ptr,
    bias_ptr,
    idx_ptr,
    out_ptr,
    N,
    stride_ps,
    stride_pb,
    stride_ob,
    SPLITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_GATHER: tl.constexpr,
    ACT: tl.constexpr,
    GLU: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    if PDL:  # programmatic dependent launch: let the next kernel start launching, wait for the previous one
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < N
    src = part_ptr + b * stride_pb + c
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(src + s * stride_ps, mask=m, other=0.0)
    if GLU:
        up = tl.zeros([BLOCK], dtype=tl.float32)
        for s in range(SPLITS):
            up += tl.load(src + s * stride_ps + N, mask=m, other=0.0)
        acc = acc / (1.0 + tl.exp(-acc)) * up
    if HAS_BIAS:
        if BIAS_GATHER:
            r = tl.load(idx_ptr + c, mask=m, other=0).to(tl.int64)
            acc += tl.load(bias_ptr + r, mask=m, other=0.0).to(tl.float32)
        else:
            acc += tl.load(bias_ptr + c, mask=m, other=0.0).to(tl.float32)
    acc = _apply_act(acc, ACT)
    tl.store(out_ptr + b * stride_ob + c, acc.to(out_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------------------------
# launch configuration (from shapes only; module-level so benchmarks and tests can swap them)


def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_b(batch: int) -> int:
    return 1 if batch == 1 else max(16, next_pow2(batch))


# tile choices per path ("gemv": batch 1, float32 FMAs; "dot": batch 2..64 padded to >= 16 rows for tl.dot, so
# every tl.dot dimension must stay >= 16)
UP_TILES = {
    "gemv": {"BLOCK_N": 8, "BLOCK_D": 512, "num_warps": 4, "num_stages": 3},
    "gemv_small": {"BLOCK_N": 8, "BLOCK_D": 512, "num_warps": 8, "num_stages": 3},
    "dot": {"BLOCK_N": 32, "BLOCK_D": 128, "num_warps": 4, "num_stages": 3},
}
DOWN_TILES = {
    # gemv: 64 rows x 256 bytes per step (H200 sweep: OPT-13B 5% 14.6 us vs 17.2 us with 32 x 512 bytes; TEAL 50%
    # 64 us vs 74 us)
    "gemv": {"BLOCK_K": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
    "gemv_small": {"BLOCK_K": 128, "BLOCK_N": 64, "num_warps": 2, "num_stages": 3},
    "dot": {"BLOCK_K": 32, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
}
# the batch-1 ReLU MLP takes the "gemv_small" tiles when each matrix's selected rows total at most GEMV_SMALL_BYTES
# (H100 sweep, `sweep_sparse_mlp.py --only tiles --combos`: OPT-13B 5% 15.7 -> 13.6 us, 13B 10% 23.7 -> 21.6 us,
# OPT-30B 5% 22.8 -> 21.9 us; on OPT-175B 5% (60 MB a matrix) they were slower, 52.0 -> 56.7 us)
GEMV_SMALL_BYTES = 32 << 20
# at batch 1, kernel 2 splits its rows over at most this many programs per column block (None: as many as
# PROGRAMS_PER_SM asks for); 1 writes the output directly, without partials or a reduce launch
DOWN_MAX_SPLITS_GEMV: int | None = None


def _tiles(table: dict, bb: int, small: bool) -> dict:
    return table["dot" if bb > 1 else "gemv_small" if small else "gemv"]


def up_config(batch: int, k: int, d: int, dtype: torch.dtype, sms: int, small: bool = False) -> dict:
    """Kernel 1 (x . W1[idx]): tiles, and SPLIT_D / D_PER_SPLIT so that about UP_PROGRAMS_PER_SM * sms programs run.
    ``small``: the batch-1 ReLU path may take the "gemv_small" tiles (see GEMV_SMALL_BYTES)."""
    bb = _block_b(batch)
    cfg = dict(_tiles(UP_TILES, bb, small and k * d * dtype.itemsize <= GEMV_SMALL_BYTES), BLOCK_B=bb)
    cfg["BLOCK_D"] = min(cfg["BLOCK_D"], max(16, next_pow2(d)))
    blocks_n = cdiv(k, cfg["BLOCK_N"])
    chunks = cdiv(d, cfg["BLOCK_D"])
    split = min(chunks, max(1, cdiv(UP_PROGRAMS_PER_SM * sms, max(1, blocks_n))))
    per = cdiv(chunks, split) * cfg["BLOCK_D"]
    cfg["D_PER_SPLIT"] = per
    cfg["SPLIT_D"] = cdiv(d, per)
    return cfg


def down_config(
    batch: int, k: int, n_out: int, dtype: torch.dtype, sms: int, dual: bool = False, small: bool = False
) -> dict:
    """Kernel 2 (a @ W[rows]): tiles, and the split-K over the k rows: SPLITS programs per column block, each
    taking BLOCKS_PER_SPLIT blocks of BLOCK_K rows, bounded so that the float32 partials (SPLITS * B * N * 4 bytes)
    stay under 1/PARTIAL_FRACTION of the weight bytes read (k * N * itemsize). ``small``: as in `up_config`."""
    bb = _block_b(batch)
    cfg = dict(_tiles(DOWN_TILES, bb, small and k * n_out * dtype.itemsize <= GEMV_SMALL_BYTES), BLOCK_B=bb)
    if dual:  # two weight tiles and two accumulators per program: halve the columns to keep registers in check
        cfg["BLOCK_N"] = max(16, cfg["BLOCK_N"] // 2)
    cfg["BLOCK_N"] = min(cfg["BLOCK_N"], max(16, next_pow2(n_out)))
    col_blocks = cdiv(n_out, cfg["BLOCK_N"])
    nblk = max(1, cdiv(k, cfg["BLOCK_K"]))
    by_bytes = max(1, int(k * dtype.itemsize / (4 * max(1, batch) * PARTIAL_FRACTION)))
    splits = max(1, min(nblk, cdiv(PROGRAMS_PER_SM * sms, col_blocks), by_bytes))
    if bb == 1 and DOWN_MAX_SPLITS_GEMV is not None:
        splits = max(1, min(splits, DOWN_MAX_SPLITS_GEMV))
    per = cdiv(nblk, splits)
    cfg["BLOCKS_PER_SPLIT"] = per
    cfg["SPLITS"] = cdiv(nblk, per)
    return cfg


# TEAL without an index: TEAL_COMPACT compacts the input on the device first (`_compact_kernel`, inputs of at most
# TEAL_COMPACT_MAX dimensions); off, kernel 2 walks every row and skips the zero-input ones with masked loads. H100,
# Llama-2-7B, batch 1 (RESULTS.md): compacting wins at low densities (5%: 37.7 vs 47.8 us), walking at TEAL's 50%
# (73.2 vs 83.7 us: the two compaction launches cost more than they save), so walking is the default.
# `sparse_swiglu_mlp` runs the thresholded dense MLP (cuBLAS) for batches over TEAL_MAX_SPARSE_BATCH rows: the union
# of the rows' kept inputs grows with the batch; the walking kernel took 83-100% of dense's time at batch 4 (100% at
# 50% density, 94% of the inputs kept by some row) but 104-109% at batch 16 and 20-50% (H100 sweep); the dense
# fallback took 100-101% (its gate/up now come out in float32 through torch.mm's out_dtype: not timed yet)
TEAL_COMPACT = False
TEAL_COMPACT_MID = True  # False: `sparse_swiglu_mlp` compacts its input only, the down projection walks every row
TEAL_COMPACT_MAX = 1 << 16
TEAL_MAX_SPARSE_BATCH = 4

_LAUNCH_KEYS = ("num_warps", "num_stages")

# programmatic dependent launch (Hopper+, compiled only): each kernel lets the next one launch at its start and waits
# for the previous one before touching memory. `sparse_mlp` uses it for batches of at most PDL_RELU_MAX_BATCH rows
# (H100, batch 1: 0.3-2 us less per MLP, e.g. OPT-30B 5% 24.8 -> 22.9 us; at batch 4 and 16 it was slower); PDL = True
# turns it on for every launch of this module (experiments)
PDL = False
PDL_RELU_MAX_BATCH = 1
# kernel 2's split-K partials (not the fused gate/up) summed in the same launch (`_arrive_and_reduce`) instead of by
# `_reduce_kernel`: off, slower on the H100 at every benchmark shape (OPT-13B 5%, batch 1: 19.2 us vs 16.8 us)
DOWN_REDUCE_IN_KERNEL = False
# under PDL, kernel 2 prefetches its weight rows into L2 while kernel 1 still runs (`_prefetch_rows_l2`), so the
# two kernels' weight reads overlap instead of kernel 2 starting its reads after kernel 1 ends; only for selections
# of at most DOWN_PREFETCH_MAX_BYTES. H100, batch 1 (RESULTS.md): OPT-13B 5% (10.5 MB) 13.6 -> 12.9 us and 13B 10%
# (21 MB) 21.7 -> 20.5 us, but OPT-30B 5% (20.6 MB) 21.8 -> 23.3 us and OPT-175B 5% (60 MB, more than L2 holds)
# 52.1 -> 58.0 us
DOWN_PREFETCH_L2 = True
DOWN_PREFETCH_MAX_BYTES = 16 << 20


def _pdl(device: torch.device, on: bool = False) -> dict:
    """Launch options for PDL where it applies (asked for, a CUDA device of compute capability >= 9, compiled)."""
    return pdl_launch_opts(device, on or PDL)


def _launch_opts(cfg: dict, *keys: str, device: torch.device | None = None, pdl: bool = False) -> dict:
    opts = {k: cfg[k] for k in keys + _LAUNCH_KEYS if k in cfg}
    return opts if device is None else dict(opts, **_pdl(device, pdl))


def _act_code(act: str) -> int:
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}: one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[act]


def _rowmajor(t: torch.Tensor, name: str, fn: str) -> None:
    if t.dim() != 2 or (t.stride(1) != 1 and t.shape[1] > 1):
        raise ValueError(f"{fn}: {name} must be a 2-D tensor with contiguous rows, got shape {tuple(t.shape)}")


def _as_2d(x: torch.Tensor, fn: str) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"{fn}: input must be [B, d], got {tuple(x.shape)}")
    return x if x.stride(1) == 1 or x.shape[1] <= 1 else x.contiguous()


def _index(idx: torch.Tensor, fn: str) -> torch.Tensor:
    if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{fn}: idx must be a 1-D int32/int64 tensor")
    return idx if idx.stride(0) == 1 else idx.contiguous()


def _reduce(part, out, n_cols, splits, bias=None, idx=None, act=0, glu=False, block=1024, pdl=False) -> None:
    """out[b, c] = act(sum_s part[s, b, c] (+ bias[c] or bias[idx[c]])), or silu(gate) * up with GLU."""
    rows = out.shape[0]
    if rows == 0 or n_cols == 0:
        return
    block = min(block, max(16, next_pow2(n_cols)))
    _reduce_kernel[(rows, cdiv(n_cols, block))](
        part,
        bias if bias is not None else part,
        idx if idx is not None else part,
        out,
        n_cols,
        part.stride(0),
        part.stride(1),
        out.stride(0),
        SPLITS=splits,
        HAS_BIAS=bias is not None,
        BIAS_GATHER=idx is not None,
        ACT=act,
        GLU=glu,
        BLOCK=block,
        num_warps=4,
        **_pdl(out.device, pdl),
    )


def _gather_matmul(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    *,
    mode: int,
    k: int,
    idx: torch.Tensor | None = None,
    w2: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    threshold: float | None = None,
    a_splits: int = 1,
    a_bias: torch.Tensor | None = None,
    a_act: int = 0,
    skip_zero_rows: bool = False,
    batch: int | None = None,
    k_ptr: torch.Tensor | None = None,
    pdl: bool = False,
    small: bool = False,
) -> None:
    """out [B, N] (or [B, N] = silu(gate) * up with w2) = a-rows . W[rows] (+ bias); see `_gather_matmul_kernel`.
    With k_ptr (a device int32 [1]) the kernel reads the number of rows from it; k is then its upper bound."""
    n_out = w.shape[1]
    batch = out.shape[0] if batch is None else batch
    dual = w2 is not None
    cfg = down_config(batch, k, n_out, w.dtype, num_sms(w.device), dual, small)
    splits = cfg["SPLITS"]
    direct = splits == 1 and not dual
    if batch == 0 or n_out == 0:
        return
    if k == 0:  # nothing selected: the bias alone (or zero)
        if bias is not None and not dual:
            out.copy_(bias.to(out.dtype).expand_as(out))
        else:
            out.zero_()
        return
    red_in = not direct and not dual and DOWN_REDUCE_IN_KERNEL
    cnt = _arrival_counters(w.device) if red_in else None
    red_in = cnt is not None
    grid = (splits, cdiv(n_out, cfg["BLOCK_N"]))
    n_red = 1 if w.device.type != "cuda" else max(1, min(grid[0] * grid[1], 64, num_sms(w.device) // 2))
    if direct:
        part = out
        stride_os = 0
    else:
        part = torch.empty((splits, batch, (2 if dual else 1) * n_out), dtype=torch.float32, device=w.device)
        stride_os = part.stride(0)
    stride_as = a.stride(0) if mode == MODE_PARTIALS else 0
    stride_ab = a.stride(1) if mode == MODE_PARTIALS else a.stride(0)
    _gather_matmul_kernel[grid](
        a,
        idx if idx is not None else a,
        a_bias if a_bias is not None else a,
        w,
        w2 if dual else w,
        bias if bias is not None else w,
        part,
        k_ptr if k_ptr is not None else a,
        cnt if red_in else a,
        out,
        batch,
        k,
        n_out,
        cfg["BLOCKS_PER_SPLIT"],
        n_red,
        out.stride(0),
        float(threshold) if threshold is not None else 0.0,
        stride_ab,
        stride_as,
        w.stride(0),
        w2.stride(0) if dual else w.stride(0),
        stride_os,
        part.stride(-2),
        A_MODE=mode,
        A_SPLITS=a_splits,
        A_ACT=a_act,
        HAS_A_BIAS=a_bias is not None,
        THRESH=threshold is not None,
        SKIP_ZERO_ROWS=skip_zero_rows,
        DUAL=dual,
        DIRECT=direct,
        HAS_BIAS=bias is not None,
        K_PTR=k_ptr is not None,
        DOT_PREC=_dot_prec(w.dtype),
        RED_IN=red_in,
        **_launch_opts(cfg, "BLOCK_B", "BLOCK_K", "BLOCK_N", "LOOP_STAGES", "STEP_SUM", device=w.device, pdl=pdl),
        **_prefetch_opts(cfg, w, k, pdl, dual, k_ptr, idx),
    )
    if not direct and not red_in:
        _reduce(part, out, n_out, splits, bias=bias, glu=dual, pdl=pdl)


def _prefetch_opts(cfg: dict, w: torch.Tensor, k: int, pdl: bool, dual: bool, k_ptr, idx) -> dict:
    """Kernel 2 prefetches its weight rows into L2 before it waits for kernel 1 (DOWN_PREFETCH_L2): only in
    `sparse_mlp`'s PDL chain (`pdl` passed explicitly: there kernel 1 waits for the kernel that wrote the index
    before it lets kernel 2 launch; the module-wide PDL flag alone gives no such order), for one weight matrix of
    at most DOWN_PREFETCH_MAX_BYTES selected, with k known on the host (a k counted on the device is written by
    the kernel before) and an index of the rows (MODE_DENSE walks them all). A column block spans whole 128-byte
    lines (one prefetch per line) or lies within one (one prefetch of that line per row; neighbouring blocks ask
    for the same line)."""
    line = min(128 // w.element_size(), cfg["BLOCK_N"])  # a 64-byte column block prefetches its whole line
    small = k * w.shape[1] * w.element_size() <= DOWN_PREFETCH_MAX_BYTES
    on = DOWN_PREFETCH_L2 and pdl and small and not dual and k_ptr is None and idx is not None
    on = on and cfg["BLOCK_N"] % line == 0
    return {"PREFETCH_L2": True, "LINE": line} if on and pdl_supported(w.device) else {}


def _chunks(batch: int):
    for lo in range(0, batch, MAX_DOT_BATCH):
        yield lo, min(batch, lo + MAX_DOT_BATCH)


# ---------------------------------------------------------------------------------------------------------------
# ReLU / GELU MLP (DejaVu)


def _check_mlp(x, w1, b1, idx, fn):
    x = _as_2d(x, fn)
    _rowmajor(w1, "w1", fn)
    if w1.shape[1] != x.shape[1]:
        raise ValueError(f"{fn}: w1 is {tuple(w1.shape)}, x has {x.shape[1]} features")
    if b1 is not None and b1.shape != (w1.shape[0],):
        raise ValueError(f"{fn}: b1 must be [{w1.shape[0]}]")
    return x, _index(idx, fn)


def _up_partials(x, w1, b1, idx, act_code, out_h=None, pdl=False, small=False):
    """Kernel 1 on one batch chunk (<= MAX_DOT_BATCH rows). Returns (tensor, splits): h [B, k] float32 (out_h) when
    one split covers d, else float32 partials [SPLIT_D, B, k] (bias and activation not applied yet)."""
    batch, d = x.shape
    k = idx.numel()
    cfg = up_config(batch, k, d, w1.dtype, num_sms(w1.device), small)
    split = cfg["SPLIT_D"]
    final = split == 1
    if final:
        out = out_h if out_h is not None else torch.empty((batch, k), dtype=torch.float32, device=x.device)
        stride_os = 0
    else:
        out = torch.empty((split, batch, k), dtype=torch.float32, device=x.device)
        stride_os = out.stride(0)
    _rows_dot_kernel[(cdiv(k, cfg["BLOCK_N"]), split)](
        x,
        w1,
        b1 if b1 is not None else w1,
        idx,
        out,
        batch,
        k,
        d,
        cfg["D_PER_SPLIT"],
        x.stride(0),
        w1.stride(0),
        stride_os,
        out.stride(-2),
        HAS_BIAS=b1 is not None,
        ACT=act_code,
        FINAL=final,
        DOT_PREC=_dot_prec(w1.dtype),
        **_launch_opts(cfg, "BLOCK_B", "BLOCK_N", "BLOCK_D", "LOOP_STAGES", device=w1.device, pdl=pdl),
    )
    return out, split


_COUNTER_SLOTS = 1024
_counter_buffers: dict = {}
_counter_next = [0]


def _arrival_counters(device: torch.device) -> torch.Tensor | None:
    """Two int32 counters for one launch of kernel 2 with its in-kernel reduce (arrivals, finished reducers), zero
    between launches (the kernel resets them). Slots rotate through a per-device buffer, so launches on different
    streams or in different CUDA graphs do not share them. None while a CUDA graph is being captured and the device
    has no buffer yet (allocating in a capture would tie it to the graph): the caller then takes a path without
    counters."""
    buf = _counter_buffers.get(device)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = _counter_buffers[device] = torch.zeros((_COUNTER_SLOTS, 2), dtype=torch.int32, device=device)
    # (two threads racing here could share a slot: the only user, DOWN_REDUCE_IN_KERNEL, is off by default)
    _counter_next[0] += 1
    return buf[_counter_next[0] % _COUNTER_SLOTS]


def sparse_up(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, idx: torch.Tensor, act: str = "relu"
) -> torch.Tensor:
    """Triton version of `sparse_up_reference`: h [B, k] float32 = act(x @ W1[idx].T + b1[idx]), reading only rows idx
    of w1 [n, d]. Kernel 1 (+ a reduce over the d splits when d is cut); no host sync."""
    require_triton()
    fn = "sparse_up"
    x, idx = _check_mlp(x, w1, b1, idx, fn)
    act_code = _act_code(act)
    batch, k = x.shape[0], idx.numel()
    h = torch.empty((batch, k), dtype=torch.float32, device=x.device)
    if batch == 0 or k == 0:
        return h
    for lo, hi in _chunks(batch):
        part, split = _up_partials(x[lo:hi], w1, b1, idx, act_code, out_h=h[lo:hi])
        if split > 1:
            _reduce(part, h[lo:hi], k, split, bias=b1, idx=idx, act=act_code)
    return h


def sparse_down(
    h: torch.Tensor,
    w2t: torch.Tensor,
    b2: torch.Tensor | None,
    idx: torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Triton version of `sparse_down_reference`: y [B, d] = h @ W2t[idx] + b2, reading only rows idx of w2t [n, d].
    Split-K over the selected rows with a deterministic reduce; no host sync."""
    require_triton()
    fn = "sparse_down"
    h = _as_2d(h, fn)
    _rowmajor(w2t, "w2t", fn)
    idx = _index(idx, fn)
    if h.shape[1] != idx.numel():
        raise ValueError(f"{fn}: h has {h.shape[1]} columns for {idx.numel()} selected neurons")
    y = torch.empty((h.shape[0], w2t.shape[1]), dtype=out_dtype or w2t.dtype, device=h.device)
    for lo, hi in _chunks(h.shape[0]):
        _gather_matmul(h[lo:hi], w2t, y[lo:hi], mode=MODE_COMPACT, k=idx.numel(), idx=idx, bias=b2)
    return y


def sparse_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2t: torch.Tensor,
    b2: torch.Tensor | None,
    idx: torch.Tensor,
    act: str = "relu",
) -> torch.Tensor:
    """Triton version of `sparse_mlp_reference`: y [B, d] in x.dtype = W2t[idx].T act(W1[idx] x + b1[idx]) + b2.

    x [B, d]; w1 [n, d] (nn.Linear layout); b1 [n] or None; w2t [n, d] (W2 transposed, contiguous rows); b2 [d] or
    None; idx [k] int32/int64, the selected neurons (any order, no duplicates). Only rows idx of w1 and w2t are read.
    Two or three launches (kernel 1, its d-split reduce when B > 1 and d is split, kernel 2, kernel 2's reduce when
    the neurons are split); at batch 1 kernel 1's partials are summed, biased and activated inside kernel 2. No host
    sync; grids from shapes only.
    """
    require_triton()
    fn = "sparse_mlp"
    x, idx = _check_mlp(x, w1, b1, idx, fn)
    _rowmajor(w2t, "w2t", fn)
    if w2t.shape[0] != w1.shape[0]:
        raise ValueError(f"{fn}: w2t has {w2t.shape[0]} rows, w1 has {w1.shape[0]} neurons")
    if b2 is not None and b2.shape != (w2t.shape[1],):
        raise ValueError(f"{fn}: b2 must be [{w2t.shape[1]}]")
    act_code = _act_code(act)
    batch, k = x.shape[0], idx.numel()
    y = torch.empty((batch, w2t.shape[1]), dtype=x.dtype, device=x.device)
    for lo, hi in _chunks(batch):
        xc, yc = x[lo:hi], y[lo:hi]
        if k == 0:
            _gather_matmul(xc, w2t, yc, mode=MODE_COMPACT, k=0, idx=idx, bias=b2)
            continue
        pdl = hi - lo <= PDL_RELU_MAX_BATCH
        part, split = _up_partials(xc, w1, b1, idx, act_code, pdl=pdl, small=True)
        if split == 1:  # h is final
            _gather_matmul(part, w2t, yc, mode=MODE_COMPACT, k=k, idx=idx, bias=b2, pdl=pdl, small=True)
        elif hi - lo == 1:  # GEMV: kernel 2 sums the few partials itself
            _gather_matmul(
                part,
                w2t,
                yc,
                mode=MODE_PARTIALS,
                k=k,
                idx=idx,
                bias=b2,
                a_splits=split,
                a_bias=b1,
                a_act=act_code,
                pdl=pdl,
                small=True,
            )
        else:
            h = torch.empty((hi - lo, k), dtype=torch.float32, device=x.device)
            _reduce(part, h, k, split, bias=b1, idx=idx, act=act_code, pdl=pdl)
            _gather_matmul(h, w2t, yc, mode=MODE_COMPACT, k=k, idx=idx, bias=b2, pdl=pdl)
    return y


# ---------------------------------------------------------------------------------------------------------------
# SwiGLU with TEAL input sparsity


def _check_teal(x, w_t, idx, fn):
    x = _as_2d(x, fn)
    _rowmajor(w_t, "w_t", fn)
    if w_t.shape[0] != x.shape[1]:
        raise ValueError(f"{fn}: the transposed weight is {tuple(w_t.shape)}, x has {x.shape[1]} features")
    return x, (None if idx is None else _index(idx, fn))


def _compact(a: torch.Tensor, threshold: float | None):
    """(a_c [B, n], idx [n] int32, count [1] int32) from `_compact_kernel`: the kept dimensions first, in order."""
    batch, n = a.shape
    out = torch.empty((batch, n), dtype=a.dtype, device=a.device)
    idx = torch.empty(n, dtype=torch.int32, device=a.device)
    cnt = torch.empty(1, dtype=torch.int32, device=a.device)
    block = max(16, next_pow2(n))
    thr = -1.0 if threshold is None else float(threshold)
    nw = min(32, max(4, block // 1024))
    _compact_kernel[(1,)](
        a, out, idx, cnt, batch, n, thr, a.stride(0), out.stride(0), BLOCK=block, num_warps=nw, **_pdl(a.device, False)
    )
    return out, idx, cnt


def _teal_matmul(x, w_t, out, threshold, idx, compact=None, **kw) -> None:
    """out = s(x) @ w_t (kernel 2 on the thresholded input, batch chunk by chunk): rows idx of w_t when given; else
    the rows of the inputs kept for some row of the chunk, compacted on the device (`_compact_kernel`, the row count
    read by kernel 2 from device memory), or with TEAL_COMPACT off every row, zero-input rows skipped by masked loads.
    `kw`: bias, or w2 for the fused gate/up."""
    compact = TEAL_COMPACT if compact is None else compact
    if idx is None and compact and 0 < x.shape[1] <= TEAL_COMPACT_MAX:
        for lo, hi in _chunks(x.shape[0]):
            if hi == lo:
                continue
            xc, ic, cnt = _compact(x[lo:hi], threshold)
            _gather_matmul(xc, w_t, out[lo:hi], mode=MODE_COMPACT, k=x.shape[1], idx=ic, k_ptr=cnt, **kw)
        return
    mode, k = (MODE_DENSE, x.shape[1]) if idx is None else (MODE_GATHER, idx.numel())
    for lo, hi in _chunks(x.shape[0]):
        _gather_matmul(
            x[lo:hi], w_t, out[lo:hi], mode=mode, k=k, idx=idx, threshold=threshold, skip_zero_rows=True, **kw
        )


def teal_linear(
    x: torch.Tensor,
    w_t: torch.Tensor,
    threshold: float | None = None,
    idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of `teal_linear_reference`: y [B, N] = s(x) @ w_t (+ bias) in x.dtype, w_t [d, N] (a weight
    stored transposed: row i holds input dimension i's outputs).

    With idx (the surviving input dimensions, e.g. from `select_neurons(x, threshold=t, absolute=True)`), only rows
    idx of w_t are addressed. Without it, every row is visited and the rows whose thresholded input is zero for the
    whole batch are skipped by masked loads (no index, no host sync). No host sync either way."""
    require_triton()
    fn = "teal_linear"
    x, idx = _check_teal(x, w_t, idx, fn)
    y = torch.empty((x.shape[0], w_t.shape[1]), dtype=x.dtype, device=x.device)
    _teal_matmul(x, w_t, y, threshold, idx, bias=bias)
    return y


def teal_gate_up(
    x: torch.Tensor,
    w_gate_t: torch.Tensor,
    w_up_t: torch.Tensor,
    threshold: float | None = None,
    idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of `teal_gate_up_reference`: h [B, n] = silu(s(x) @ w_gate_t) * (s(x) @ w_up_t) in x.dtype;
    both weights [d, n] read in the same program (same rows), gate and up combined in the split reduce."""
    require_triton()
    fn = "teal_gate_up"
    x, idx = _check_teal(x, w_gate_t, idx, fn)
    _rowmajor(w_up_t, "w_up_t", fn)
    if w_up_t.shape != w_gate_t.shape:
        raise ValueError(f"{fn}: w_up_t {tuple(w_up_t.shape)} and w_gate_t {tuple(w_gate_t.shape)} differ")
    h = torch.empty((x.shape[0], w_gate_t.shape[1]), dtype=x.dtype, device=x.device)
    _teal_matmul(x, w_gate_t, h, threshold, idx, w2=w_up_t)
    return h


def _threshold(a: torch.Tensor, threshold: float | None) -> torch.Tensor:
    if threshold is None:
        return a
    a = a.contiguous()
    out = torch.empty_like(a)
    n = a.numel()
    if n:
        _threshold_kernel[(cdiv(n, 1024),)](a, out, n, float(threshold), BLOCK=1024, num_warps=4)
    return out


_MM_OUT_DTYPE = [True]


def _mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 result (as the sparse kernels and the references compute gate and up): torch.mm's
    out_dtype for half-precision CUDA inputs where this torch has it, else the plain product."""
    if a.dtype in (torch.float16, torch.bfloat16) and a.is_cuda and _MM_OUT_DTYPE[0]:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            _MM_OUT_DTYPE[0] = False
    return (a @ b).contiguous()


def _dense_swiglu(x, w_gate_t, w_up_t, w_down_t, threshold_in, threshold_mid) -> torch.Tensor:
    """The same TEAL MLP over all the weights: thresholded input, three torch matmuls (cuBLAS on the GPU) and one
    kernel for h = s_mid(silu(g) * u). For batches whose union of kept inputs is most of them
    (TEAL_MAX_SPARSE_BATCH)."""
    fn = "sparse_swiglu_mlp"
    x = _as_2d(x, fn)
    for name, t in (("w_gate_t", w_gate_t), ("w_up_t", w_up_t), ("w_down_t", w_down_t)):
        _rowmajor(t, name, fn)
    if w_gate_t.shape[0] != x.shape[1] or w_up_t.shape != w_gate_t.shape:
        raise ValueError(f"{fn}: weights {tuple(w_gate_t.shape)}, {tuple(w_up_t.shape)} for {x.shape[1]} features")
    xs = _threshold(x, threshold_in)
    g = _mm_float32(xs, w_gate_t)
    u = _mm_float32(xs, w_up_t)
    h = torch.empty(g.shape, dtype=x.dtype, device=x.device)
    n = g.numel()
    if n:
        thr = -1.0 if threshold_mid is None else float(threshold_mid)
        _glu_threshold_kernel[(cdiv(n, 1024),)](g, u, h, n, thr, BLOCK=1024, num_warps=4)
    return h @ w_down_t


def sparse_swiglu_mlp(
    x: torch.Tensor,
    w_gate_t: torch.Tensor,
    w_up_t: torch.Tensor,
    w_down_t: torch.Tensor,
    threshold_in: float | None,
    threshold_mid: float | None,
    use_index: bool = False,
) -> torch.Tensor:
    """Triton version of `sparse_swiglu_mlp_reference`: the whole TEAL SwiGLU MLP, y [B, d] in x.dtype.

    x [B, d]; w_gate_t, w_up_t [d, n]; w_down_t [n, d] (all transposed from nn.Linear, contiguous); thresholds per
    layer (entries with |value| <= threshold are dropped; None keeps everything). By default no index is built: the
    kernels threshold their input and skip zero rows themselves (no host sync, CUDA-graph safe, 2 + 2 launches).
    `use_index=True` first selects the surviving dimensions with `select_neurons(..., threshold=...)` (a host sync
    per projection) and gathers only those rows."""
    require_triton()
    if w_down_t.shape != (w_gate_t.shape[1], w_gate_t.shape[0]):
        raise ValueError("sparse_swiglu_mlp: w_down_t must be [n, d] for w_gate_t [d, n]")
    if not use_index and x.dim() == 2 and x.shape[0] > TEAL_MAX_SPARSE_BATCH:
        return _dense_swiglu(x, w_gate_t, w_up_t, w_down_t, threshold_in, threshold_mid)
    idx_in = None
    if use_index:
        idx_in = select_neurons(x, threshold=threshold_in if threshold_in is not None else -1.0, absolute=True)
    h = teal_gate_up(x, w_gate_t, w_up_t, threshold_in, idx_in)
    idx_mid = None
    if use_index:
        idx_mid = select_neurons(h, threshold=threshold_mid if threshold_mid is not None else -1.0, absolute=True)
    y = torch.empty((h.shape[0], w_down_t.shape[1]), dtype=h.dtype, device=h.device)
    _teal_matmul(h, w_down_t, y, threshold_mid, idx_mid, compact=TEAL_COMPACT and TEAL_COMPACT_MID)
    return y
