"""Offloaded fine-tuning (reldl/llm/finetune) on tiny random Llama / OPT checkpoints, on the CPU.

The CPU is both tiers here: working copies and masters are separate fp32 tensors, gradients go through the same
hooks, the same (threaded) CPU Adam and the same checkpoints as on CUDA. Checked: the loss and every gradient equal
transformers' (the math is independent of ours); weights after several steps equal a plain PyTorch loop (whole
model under autograd, one torch.optim.Adam) for 'full' and 'lora'; the overlapped Adam, synchronous Adam and
optimizer state on disk give identical weights; a run killed after step k and resumed is bit-identical.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import checkpoints as ck  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from reldl.llm.finetune import data  # noqa: E402
from reldl.llm.finetune import trainer as T  # noqa: E402
from reldl.llm.loader import TensorReader, inspect_checkpoint, load_tokenizer  # noqa: E402
from reldl.llm.offload import layers  # noqa: E402

PAIRS = [(f"Question {i}: where is the cat", f" answer {i} is the dog") for i in range(7)]


@pytest.fixture(scope="module", params=["llama", "opt"])
def model(request, tiny_checkpoints):
    path = tiny_checkpoints(request.param)
    ckpt = inspect_checkpoint(path)
    examples = data.tokenize(load_tokenizer(ckpt), ckpt.config, PAIRS, 64)
    return path, examples


def _settings(**kw):
    base = dict(method="full", batch_size=3, learning_rate=1e-3, epochs=2, overlap=True)
    base.update(kw)
    return T.Settings(**base)


def _train(path, examples, state_dir=None, **kw):
    tr = T.Trainer(path, _settings(**kw), state_dir=state_dir, fingerprint="x")
    rep = tr.train(examples)
    return tr.trained_weights(), rep


def _reference(path, examples, s: T.Settings):
    """Plain PyTorch: the whole model under autograd, no checkpointing, one torch.optim.Adam over all trainables."""
    ckpt = inspect_checkpoint(path)
    cfg = ckpt.config
    units = layers.units(cfg)
    reader = TensorReader(ckpt, torch.float32)
    base = {hf: reader(hf) for _, ws in units for _, hf in ws}
    g = torch.Generator().manual_seed(s.seed)
    adapters = {}
    if s.method == "lora":
        for uname, ws in units:  # same creation order as the trainer
            if uname.startswith("layer"):
                for key, hf in ws:
                    if key in s.lora_targets:
                        out_f, in_f = base[hf].shape
                        a = torch.empty(s.lora_rank, in_f).uniform_(-(in_f**-0.5), in_f**-0.5, generator=g)
                        adapters[hf] = (a.requires_grad_(), torch.zeros(out_f, s.lora_rank, requires_grad=True))
        params = [t for ab in adapters.values() for t in ab]
    else:
        for t in base.values():
            t.requires_grad_(True)
        params = list(base.values())
    # fused: the CPU kernel OffloadedAdam runs per tensor (a different rounding than the single-tensor path would
    # move OPT's k bias, whose gradient is pure noise that Adam scales up to lr-sized steps)
    opt = torch.optim.Adam(
        params, lr=s.learning_rate, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay, fused=True
    )
    rope = None
    if cfg.family == "llama":
        from reldl.llm.rope import Rotary

        rope = Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_positions, "cpu", torch.float32)
    scale = s.lora_alpha / s.lora_rank

    def attend(q, k, v):
        B, Tn, H, D = q.shape
        rep = H // k.shape[2]
        k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return o.transpose(1, 2).reshape(B, Tn, H * D)

    def w(u):
        out = {}
        for key, hf in units[u][1]:
            out[key] = base[hf]
            if hf in adapters and key in s.lora_targets:
                a, b = adapters[hf]
                out[key] = base[hf] + scale * (b @ a)
        return out

    n = len(examples)
    for epoch in range(s.epochs):
        order = data.epoch_order(n, s.seed, epoch)
        for i in range(0, n, s.batch_size):
            ids, tg = data.collate(examples, order[i : i + s.batch_size])
            B, Tn = ids.shape
            pos = torch.arange(Tn).expand(B, Tn)
            x = layers.embed(cfg, w(0), ids, pos, torch.float32)
            for li in range(cfg.num_layers):
                x = layers.layer(cfg, w(1 + li), x, attend, pos, rope)
            logits = layers.head(cfg, w(len(units) - 1), x)
            loss = F.cross_entropy(logits.view(B * Tn, -1), tg.view(-1), ignore_index=data.IGNORE)
            opt.zero_grad()
            loss.backward()
            opt.step()
    if s.method == "lora":
        with torch.no_grad():
            return {
                hf: base[hf] + (scale * (adapters[hf][1] @ adapters[hf][0]) if hf in adapters else 0) for hf in base
            }
    return {k: v.detach() for k, v in base.items()}


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_loss_and_gradients_equal_transformers(model):
    path, examples = model
    grads: dict[str, torch.Tensor] = {}
    tr = T.Trainer(path, _settings(learning_rate=0.0, overlap=False))

    def record(name, g, ready=None):
        grads[name] = grads.get(name, 0) + g.clone()

    tr.adam.submit = record
    ids, tg = data.collate(examples, [0, 1, 2])
    loss = tr.step(ids, tg)
    ref = ck.load_reference(path)
    lens = torch.tensor([len(examples[i].ids) for i in (0, 1, 2)])
    mask = (torch.arange(ids.shape[1])[None] < lens[:, None]).long()
    logits = ref(input_ids=ids, attention_mask=mask).logits
    rl = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tg.view(-1), ignore_index=data.IGNORE)
    rl.backward()
    assert abs(loss - rl.item()) < 1e-5
    params = dict(ref.named_parameters())
    assert set(grads) == set(params)
    top = max(float(p.grad.abs().max()) for p in params.values())
    for name, p in params.items():  # relative to the largest gradient (OPT's k bias has a zero gradient + noise)
        assert float((grads[name] - p.grad).abs().max()) < 1e-5 * top, name


@pytest.mark.parametrize("method", ["full", "lora"])
def test_weights_equal_plain_torch_loop(model, method):
    path, examples = model
    kw = dict(method=method, lora_targets=("q", "v", "o"), lora_rank=4) if method == "lora" else dict(method=method)
    got, rep = _train(path, examples, **kw)
    want = _reference(path, examples, _settings(**kw))
    assert rep.steps == 6 and rep.epochs == 2
    assert _max_diff(got, want) < 1e-6
    # the training moved the weights (LoRA: only the targets)
    base = _reference(path, examples, _settings(**dict(kw, learning_rate=0.0)))
    moved = {k for k in got if not torch.equal(got[k], base[k])}
    if method == "lora":
        assert moved and all(k.split(".")[-2] in ("q_proj", "v_proj", "o_proj", "out_proj") for k in moved)
    else:
        assert len(moved) == len(got)


def test_overlapped_sync_and_disk_adam_identical(model, tmp_path):
    path, examples = model
    a, _ = _train(path, examples, overlap=True)
    b, _ = _train(path, examples, overlap=False)
    c, _ = _train(path, examples, state_dir=tmp_path / "st", optimizer_placement="disk")
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)


# 7 examples, batches of 3: steps 0-2 are epoch 0, 3-5 epoch 1; checkpoints after steps 2 (every 2), 3 (epoch), 4
@pytest.mark.parametrize("kill_after,method,resumed", [(3, "full", 2), (5, "lora", 4), (4, "full", 3)])
def test_resume_after_kill_is_bit_identical(model, tmp_path, kill_after, method, resumed):
    path, examples = model
    kw = dict(method=method, checkpoint_steps=2)
    want, rep_full = _train(path, examples, **kw)
    st = tmp_path / "state"
    T.FAULT_AFTER_STEP = kill_after
    try:
        with pytest.raises(T.SimulatedKill):
            _train(path, examples, state_dir=st, **kw)
    finally:
        T.FAULT_AFTER_STEP = None
    assert (st / "latest.json").is_file()
    got, rep = _train(path, examples, state_dir=st, **kw)
    assert rep.resumed_from_step == resumed  # the last checkpoint before the kill
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert [r[2] for r in rep.log] == [r[2] for r in rep_full.log]


def test_overlapped_adam_worker_error_is_raised_not_hung():
    """A failure on the CPU Adam thread reaches wait() as the exception, and wait() returns (no hung queue)."""
    from reldl.llm.finetune.adam import OffloadedAdam

    opt = OffloadedAdam({"w": torch.zeros(4)}, {}, lr=0.1, overlap=True)
    try:
        opt.submit("w", torch.ones(5))  # wrong shape: Adam's update fails on the worker
        with pytest.raises(RuntimeError):
            opt.wait()
        opt.submit("w", torch.ones(4))  # the worker keeps serving after an error
        opt.wait()
        assert opt.updates == 1
    finally:
        opt.close()


def test_pinned_ring_fifo_wraps_and_blocks_until_release():
    import threading

    from reldl.llm.finetune.adam import PinnedRing

    ring = PinnedRing(torch.zeros(1024, dtype=torch.uint8))
    a, ta = ring.take(400)  # [0, 512)
    b, tb = ring.take(300)  # [512, 768)
    assert a.numel() == 400 and b.numel() == 300 and b.data_ptr() - a.data_ptr() == 512
    a.fill_(1)
    b.fill_(2)
    got = {}

    def taker():  # 400 bytes fit only once a's bytes are free: at the front (wrap)
        got["c"] = ring.take(400)

    t = threading.Thread(target=taker)
    t.start()
    t.join(0.2)
    assert t.is_alive() and ring.waits == 1  # blocked: 256 bytes free at the end, none at the front
    with pytest.raises(RuntimeError, match="order"):
        ring.release(tb)  # not the oldest
    ring.release(ta)
    t.join(5)
    c, tc = got["c"]
    assert c.data_ptr() == a.data_ptr() and bool((b == 2).all())  # b untouched
    ring.release(tb)
    ring.release(tc)
    with pytest.raises(ValueError):
        ring.take(2000)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_micro_batches_equal_whole_batch(model, method):
    """Micro-batches of 1 and 2 rows (gradients summed over them before the CPU Adam) train the same weights as the
    whole batch at once and as the plain PyTorch loop, up to the summation order; the loss log matches."""
    path, examples = model
    kw = dict(method=method, lora_targets=("q", "v", "o"), lora_rank=4) if method == "lora" else dict(method=method)
    want, rep_want = _train(path, examples, **kw)
    ref = _reference(path, examples, _settings(**kw))
    for mb in (1, 2):
        got, rep = _train(path, examples, micro_batch=mb, **kw)
        assert rep.steps == rep_want.steps
        assert all(abs(a[2] - b[2]) < 1e-5 for a, b in zip(rep.log, rep_want.log))
        for name in want:
            # OPT's k bias: its gradient is pure rounding noise, which Adam turns into lr-sized steps of any sign
            tol = 2 * 1e-3 * rep.steps if name.endswith("k_proj.bias") else 1e-5
            assert float((got[name] - want[name]).abs().max()) < tol, (mb, name)
            assert float((got[name] - ref[name]).abs().max()) < tol, (mb, name)
    assert T.Settings(micro_batch=2, batch_size=3).math()["micro_batch"] == 2
    assert "micro_batch" not in T.Settings(micro_batch=3, batch_size=3).math()  # the whole batch: as before


def test_gpu_gradient_path_with_faked_streams(model, monkeypatch):
    """The CUDA-only gradient path (sums over micro-batches kept apart from autograd's, gradients through the bounded
    ring, ring space released after each Adam update) run on the CPU with the stream and copy calls faked: the same
    weights, bit for bit, as the CPU path, and every ring allocation released."""
    import contextlib

    from reldl.llm.finetune.adam import PinnedRing

    path, examples = model
    want, rep_want = _train(path, examples, micro_batch=2)
    tr = T.Trainer(path, _settings(micro_batch=2), fingerprint="x")

    class FakeStream:
        def wait_stream(self, other):
            pass

    tr.compute = tr.h2d_stream = FakeStream()
    tr.cuda = True
    biggest = max(m.numel() * 4 for m in tr.adam.master.values())
    tr.ring = PinnedRing(torch.empty(biggest * 2 + 4096, dtype=torch.uint8))  # two tensors: takes wait and wrap
    taken = []
    take = tr.ring.take
    tr.ring.take = lambda nbytes: (taken.append(nbytes), take(nbytes))[1]
    monkeypatch.setattr(T.torch.cuda, "stream", lambda s: contextlib.nullcontext())
    copies = []

    def to_host(x, dst=None):
        assert dst is not None and dst.dtype == torch.float32  # float32 sums into the ring, never a new buffer
        copies.append(x.numel())
        return dst.copy_(x), None

    tr._to_host = to_host
    rep = tr.train(examples)
    got = tr.trained_weights()
    assert [r[2] for r in rep.log] == [r[2] for r in rep_want.log]
    assert all(torch.equal(got[k], want[k]) for k in want)
    parts = sum(tr.adam.parts.get(n, 1) for n in tr.adam.master)
    assert len(copies) == rep.steps * parts  # one copy per tensor (part) per step, not per micro-batch
    # more bytes went through the ring than it holds: space was released and reused (whether a take had to wait
    # for a release depends on thread timing, so it is not asserted)
    assert not tr.ring.live and sum(taken) > tr.ring.size
