"""The offloaded executor (reldl/llm/offload/executor.py) over FlexGen's test matrix, on the CPU.

On a CPU-only machine the "GPU" is the CPU: "gpu" tensors are ordinary CPU tensors, "cpu" ones separate host
copies, "disk" ones memory-mapped files, and every transfer is a copy between them; the schedule, placement and
4-bit code paths are the same as on CUDA. Every placement must give exactly the tokens of the all-on-device run,
which must equal reldl's Engine and transformers' greedy decoding; compressed variants must equal the all-on-device
compressed run, and that run must equal a dense run of the dequantized weights.
"""

from __future__ import annotations

import importlib
import json
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import checkpoints as ck  # noqa: E402

from reldl.kernels.quant4 import dequantize_4bit, quantize_4bit_reference  # noqa: E402
from reldl.llm import SamplingParams  # noqa: E402
from reldl.llm.offload import executor  # noqa: E402
from reldl.llm.offload.executor import OffloadEngine, _parts, split_counts, split_pairs  # noqa: E402
from reldl.llm.offload.policy import Policy, unit_tiers  # noqa: E402
from reldl.llm.offload.tiers import job_rates, nbytes  # noqa: E402
from reldl.registry import get_engine  # noqa: E402

NEW = 6
LENGTHS = (5, 9, 3, 12, 7, 4)  # mixed lengths (left padding); 6 prompts: blocks of 4 leave a short last block


def _prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, ck.VOCAB_SIZE, (n,), generator=g).tolist() for n in LENGTHS]


def _run(path, policy, prompts, n=NEW, **kw):
    with OffloadEngine(path, policy, **kw) as eng:
        out = eng.generate(prompts, n, keep_logits=True)
        return out, eng.logits, eng


class Model:
    def __init__(self, family, path):
        self.path = path
        self.prompts = _prompts()
        engine = get_engine(f"test_offload_{family}", str(path), dtype="float32", device="cpu")
        self.engine = [r.token_ids for r in engine.generate_ids(self.prompts, [SamplingParams(max_tokens=NEW)] * 6)]
        ref = ck.load_reference(path)
        pad = ck.special_token_ids(family)["pad"]
        self.hf = []
        with torch.no_grad():
            for p in self.prompts:
                x = torch.tensor([p])
                out = ref.generate(
                    x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False, pad_token_id=pad
                )
                self.hf.append(out[0, len(p) :].tolist())
        self.base, self.base_logits, _ = _run(path, Policy(2, 2), self.prompts)


@pytest.fixture(scope="module")
def opt(tiny_checkpoints):
    return Model("opt", tiny_checkpoints("opt"))


@pytest.fixture(scope="module")
def llama(tiny_checkpoints):
    return Model("llama", tiny_checkpoints("llama"))


def test_all_on_device_matches_engine_and_transformers(opt, llama):
    for m in (opt, llama):
        assert m.base == m.engine
        assert m.base == m.hf


ALL_GPU = (1, 0, 0)
CPU, DISK, HALF_CPU, HALF_DISK, THIRDS = (0, 1, 0), (0, 0, 1), (0.5, 0.5, 0), (0.5, 0, 0.5), (0.3, 0.3, 0.4)

MATRIX = {
    "weights_cpu": Policy(2, 2, weights=CPU),
    "weights_disk": Policy(2, 2, weights=DISK),
    "weights_50_cpu": Policy(2, 2, weights=HALF_CPU),
    "weights_50_disk": Policy(2, 2, weights=HALF_DISK),
    "cache_cpu": Policy(2, 2, cache=CPU),
    "cache_disk": Policy(2, 2, cache=DISK),
    "cache_50_cpu": Policy(2, 2, cache=HALF_CPU),
    "cache_50_disk": Policy(2, 2, cache=HALF_DISK),
    "both_cpu": Policy(2, 2, weights=CPU, cache=CPU),
    "both_disk": Policy(2, 2, weights=DISK, cache=DISK),
    "both_thirds": Policy(2, 2, weights=THIRDS, cache=THIRDS),
    "activations_cpu_disk": Policy(2, 2, weights=HALF_CPU, activations=(0, 0.5, 0.5)),
    "one_big_batch": Policy(4, 1, weights=HALF_DISK, cache=HALF_CPU),
    "many_gpu_batches": Policy(1, 6, weights=THIRDS, cache=THIRDS, activations=(0.5, 0.5, 0)),
    "no_overlap": Policy(2, 3, weights=HALF_DISK, cache=HALF_DISK, overlap=False),
    "cpu_attention": Policy(3, 2, weights=HALF_CPU, cache=(0, 0.5, 0.5), cpu_attention=True),
}


@pytest.mark.parametrize("name", list(MATRIX))
def test_placements_match_all_on_device_opt(opt, name):
    out, _, _ = _run(opt.path, MATRIX[name], opt.prompts)
    assert out == opt.base


@pytest.mark.parametrize("name", ["both_thirds", "many_gpu_batches", "cpu_attention"])
def test_placements_match_all_on_device_llama(llama, name):
    out, _, _ = _run(llama.path, MATRIX[name], llama.prompts)
    assert out == llama.base


def test_threaded_transfers_on_cpu(opt):
    """The worker-thread path of the Mover (the CUDA default) with CPU tensors."""
    out, _, _ = _run(
        opt.path, Policy(2, 3, weights=THIRDS, cache=THIRDS, activations=THIRDS), opt.prompts, threads=True
    )
    assert out == opt.base


@pytest.mark.parametrize("threads", [False, True])
def test_cache_loads_on_their_own_lane(opt, threads):
    """cache_stream: KV cache and hidden-state loads go through the Mover's side lane (its own worker when threaded,
    its own CUDA stream on a GPU), weights through the main one; same tokens and logits as one lane."""
    policy = Policy(2, 3, weights=THIRDS, cache=THIRDS, activations=THIRDS)
    base, base_logits, _ = _run(opt.path, policy, opt.prompts, threads=threads)
    sides = []
    with OffloadEngine(opt.path, policy, threads=threads, cache_stream=True) as eng:
        load = eng.mover.load

        def spy(pairs, after=(), side=False, **kw):
            sides.append(side)
            return load(pairs, after, side, **kw)

        eng.mover.load = spy
        out = eng.generate(opt.prompts, NEW, keep_logits=True)
        assert (eng.mover._side_loads is not eng.mover._loads) == threads
        logits = eng.logits
        eng.set_cache_stream(False)  # switched between runs: one lane again, same tokens
        assert eng.mover._side_loads is eng.mover._loads
        again = eng.generate(opt.prompts, NEW)
    assert out == base == again == opt.base
    torch.testing.assert_close(logits, base_logits)
    assert True in sides and False in sides  # both lanes used


@pytest.mark.parametrize("compress", [False, True])
def test_fixed_weight_staging_gives_the_same_tokens(opt, compress):
    """staging="fixed": streamed weights land in two buffers made once (alternating per fetch) instead of fresh
    tensors; same tokens and logits as "alloc", and switching back between runs works."""
    policy = Policy(2, 3, weights=THIRDS, cache=HALF_CPU, compress_weight=compress, compress_cache=compress)
    base, base_logits, _ = _run(opt.path, policy, opt.prompts)
    with OffloadEngine(opt.path, policy, staging="fixed") as eng:
        fetched = []
        prepare = eng.weights.prepare

        def spy(u):
            w, pairs = prepare(u)
            moved = [w[key] for key, (tier, _) in eng.weights.placed[u].items() if tier != "gpu"]
            fetched.append({p.untyped_storage().data_ptr() for t in moved for p in _parts(t)})
            return w, pairs

        eng.weights.prepare = spy
        out = eng.generate(opt.prompts, NEW, keep_logits=True)
        logits = eng.logits
        slabs = {eng.arena._slabs[("gpu", f"wstage{i}")].untyped_storage().data_ptr() for i in (0, 1)}
        eng.set_staging("alloc")
        again = eng.generate(opt.prompts, NEW)
        with pytest.raises(ValueError, match="staging must be one of alloc, fixed"):
            eng.set_staging("pinned")
    assert out == base == again
    torch.testing.assert_close(logits, base_logits)
    fixed = [f for f in fetched[: len(fetched) // 2] if f]
    buffers = {ptr for f in fixed for ptr in f}
    assert buffers == slabs  # every fixed-staging fetch landed in one of the two buffers, alternately
    assert all(a != b for a, b in zip(fixed, fixed[1:]))


def test_split_pairs_cuts_large_tensors_in_order():
    """A unit's copy pairs in at most `pieces` groups of at least `min_bytes` (but the last); contiguous tensors are
    cut along their elements, others kept whole; copying every group's pairs copies everything exactly."""
    g = torch.Generator().manual_seed(1)
    srcs = [torch.randn(n, generator=g) for n in (1000, 7, 3000, 1)] + [torch.randn(40, 30, generator=g).t()]
    dsts = [torch.zeros_like(s) for s in srcs]
    pairs = [(d, s, False) for d, s in zip(dsts, srcs)]
    total = sum(nbytes(s) for s in srcs)
    for pieces, min_bytes in [(1, 0), (4, 0), (16, 0), (4, 8000), (100, 0), (3, 10**9)]:
        for d in dsts:
            d.zero_()
        groups = split_pairs(pairs, pieces, min_bytes)
        sizes = [sum(nbytes(s) for _, s, _ in grp) for grp in groups]
        assert 1 <= len(groups) <= pieces and sum(sizes) == total
        assert all(size >= min_bytes for size in sizes[:-1])
        assert len(groups) == 1 or max(len(grp) for grp in groups) < len(pairs) + len(groups)
        for grp in groups:
            for d, s, _ in grp:
                d.copy_(s)
        assert all(torch.equal(d, s) for d, s in zip(dsts, srcs))
        assert any(s is srcs[-1] for grp in groups for _, s, _ in grp)  # the non-contiguous one went whole
    assert len(split_pairs(pairs, 16, 0)) > 8  # the large tensors were cut
    assert split_pairs([], 4) == []


def test_a_failed_piece_fails_the_unit_fetch():
    """A unit fetched in pieces waits for every piece: an error in any (a disk read on a worker thread) reaches the
    compute that waits for the unit, not just one in the last piece."""
    from concurrent.futures import Future

    class FakeMover:
        def __init__(self):
            self.n = 0

        def compute_event(self):
            return None

        def load(self, pairs, ready=None):
            self.n += 1
            f = Future()
            if self.n == 2:
                f.set_exception(OSError("read failed"))
            else:
                f.set_result(f"event {self.n}")
            return f

    pairs = [(torch.zeros(100), torch.ones(100), False)]
    fetch = executor.PieceLoad(FakeMover(), {}, split_pairs(pairs, 4, 0))
    fetch.issue(1)
    assert len(fetch.tickets) == 1
    _, ticket = fetch.finish()
    assert len(fetch.tickets) == 4
    with pytest.raises(OSError, match="read failed"):
        ticket.result()
    ok = executor.PieceLoad(FakeMover(), {}, split_pairs(pairs, 1, 0))
    assert ok.finish()[1].result() == "event 1"
    assert executor.PieceLoad(FakeMover(), {}, []).finish()[1] is None


PIECES = {
    "weights_cpu": MATRIX["weights_cpu"],
    "weights_50_disk": MATRIX["weights_50_disk"],
    "many_gpu_batches": MATRIX["many_gpu_batches"],
    "activations_cpu_disk": MATRIX["activations_cpu_disk"],
    "one_big_batch": MATRIX["one_big_batch"],
    "compressed": Policy(2, 3, weights=THIRDS, cache=HALF_CPU, compress_weight=True, compress_cache=True),
}


@pytest.mark.parametrize("threads", [False, True])
@pytest.mark.parametrize("name", list(PIECES))
def test_weights_fetched_in_pieces_between_batches(opt, monkeypatch, name, threads):
    """With overlap the next unit's weights are fetched in up to num_gpu_batches pieces, one after each batch's own
    loads (PieceLoad); with pieces of a few bytes every unit is cut up, and the tokens stay those of whole-unit fetches
    (the all-on-device run's, uncompressed), through the inline and the threaded Mover and both weight stagings."""
    policy = PIECES[name]
    counts, outs = [], []
    for piece in (executor.PIECE_MIN_BYTES, 64):
        monkeypatch.setattr(executor, "PIECE_MIN_BYTES", piece)
        staging = "fixed" if piece == 64 and threads else "alloc"
        with OffloadEngine(opt.path, policy, threads=threads, staging=staging) as eng:
            weight_loads = []
            load = eng.mover.load

            def spy(pairs, after=(), side=False, load=load, log=weight_loads, **kw):
                log.append(not side)
                return load(pairs, after, side, **kw)

            eng.mover.load = spy
            outs.append(eng.generate(opt.prompts, NEW))
        counts.append(sum(weight_loads))
    assert outs[1] == outs[0]
    if not policy.compress_weight:
        assert outs[0] == opt.base
    if policy.num_gpu_batches > 1:
        assert counts[1] > counts[0]  # the weights really went in more, smaller loads
    else:
        assert counts[1] == counts[0]  # one batch: nothing to put pieces between


def test_disk_weights_are_the_checkpoints_memory_maps(opt):
    with OffloadEngine(opt.path, Policy(2, 2, weights=DISK)) as eng:
        w = eng.weights
        assert w.checkpoint_mapped == w.bytes["disk"] > 0
        assert not list(eng.disk.dir.iterdir())  # nothing copied into the offload directory
        out = eng.generate(opt.prompts, NEW)
        assert eng.mover.bytes["disk_read"] > 0
    assert out == opt.base


def test_profile_mode_breaks_down_transfer_and_compute(opt):
    out, _, eng = _run(opt.path, Policy(2, 2, weights=HALF_DISK, cache=HALF_CPU), opt.prompts, profile=True)
    assert out == opt.base
    steps = eng.stats.steps
    assert len(steps) == 2 * NEW  # two blocks
    assert all(s.compute_s > 0 and s.transfer_s > 0 for s in steps)
    assert all(s.bytes["h2d"] > 0 and s.bytes["disk_read"] > 0 for s in steps[1:NEW])  # decode reads the cache
    assert all(s.bytes["d2h"] > 0 for s in steps[:NEW])  # and writes its new K/V
    # copies counted per kind beside the bytes: none where no bytes moved, at least one per copy's worth otherwise
    assert all((s.copies[k] > 0) == (s.bytes[k] > 0) for s in steps for k in s.bytes)
    assert all(s.copies["d2h"] >= 2 for s in steps[:NEW])  # a K and a V store at least
    # every job timed, in its step: the jobs' bytes are the step's bytes, their seconds its transfer seconds
    for s in steps:
        assert sum(n for _, n, _ in s.jobs) == sum(s.bytes.values())
        assert sum(t for _, _, t in s.jobs) == pytest.approx(s.transfer_s)
    rates = job_rates([j for s in steps[1:NEW] for j in s.jobs], steps=NEW - 1)
    assert {r["counter"] for r in rates} >= {"h2d", "disk_read"}
    dec = steps[1:NEW]
    assert sum(r["gb_per_step"] for r in rates) == pytest.approx(
        sum(sum(s.bytes.values()) for s in dec) / 1e9 / len(dec)
    )


@pytest.mark.parametrize("cache_stream", [False, True])
def test_timeline_mode_changes_nothing_and_accounts_every_call_and_copy(opt, cache_stream):
    """The timeline mode records every compute call and copy job of a step (same tokens as without it); on the CPU
    stand-in the clock is the host's, so every call is host-bound."""
    policy = Policy(2, 2, weights=HALF_CPU, cache=HALF_CPU, activations=HALF_CPU)
    with OffloadEngine(opt.path, policy, cache_stream=cache_stream) as eng:
        units = eng.num_units
        eng.set_timeline(True)
        out = eng.generate(opt.prompts, NEW)
        steps = eng.stats.steps
        eng.set_timeline(False)
        again = eng.generate(opt.prompts[:4], 2)
        assert all(not s.timeline for s in eng.stats.steps)
    assert out == opt.base and again == [t[:2] for t in opt.base[:4]]
    for s in steps:
        tl = s.timeline
        assert tl["compute"]["calls"] == units * policy.num_gpu_batches
        assert tl["compute"]["host_bound_calls"] == tl["compute"]["calls"]
        loads = sum(tl[k]["bytes"] for k in ("h2d", "h2d_side") if k in tl)
        assert loads == s.bytes["h2d"] and tl.get("d2h", {}).get("bytes", 0) == s.bytes["d2h"]
        assert ("h2d_side" in tl) == cache_stream  # the hidden states come back from the CPU in every step
        assert 0 < tl["gpu_step_s"] <= s.seconds


def test_job_rates_group_by_counter_and_size():
    jobs = [("h2d", 100 << 20, 0.002), ("h2d", 300 << 20, 0.006), ("h2d", 40 << 10, 0.001), ("d2h", 2 << 20, 0.001)]
    rates = {(r["counter"], r["min_bytes"]): r for r in job_rates(jobs, steps=2)}
    assert set(rates) == {("h2d", 16 << 20), ("h2d", 256 << 20), ("h2d", 0), ("d2h", 1 << 20)}
    big = rates[("h2d", 256 << 20)]
    assert big["jobs_per_step"] == 0.5 and big["gb_per_s"] == pytest.approx((300 << 20) / 1e9 / 0.006)
    assert rates[("h2d", 0)]["gb_per_step"] == pytest.approx((40 << 10) / 1e9 / 2)


def _dequantized_checkpoint(src, dst):
    """A copy of `src` whose matrices are dequantize(quantize(w)): what 4-bit weights compute, densely."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        state = load_file(str(f))
        state = {k: dequantize_4bit(quantize_4bit_reference(v)) if v.dim() == 2 else v for k, v in state.items()}
        save_file(state, str(f), metadata={"format": "pt"})
    return dst


COMPRESSED = {
    "weights_cpu_disk": Policy(2, 2, weights=(0, 0.5, 0.5)),
    "weights_thirds_cache_thirds": Policy(1, 4, weights=THIRDS, cache=THIRDS),
    "cache_disk_cpu_attention": Policy(3, 2, weights=HALF_CPU, cache=(0, 0.5, 0.5), cpu_attention=True),
}


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_compressed_weights_and_cache(request, tmp_path, family):
    m = request.getfixturevalue(family)
    both = dict(compress_weight=True, compress_cache=True)
    ref, ref_logits, _ = _run(m.path, Policy(2, 2, **both), m.prompts)
    policies = COMPRESSED if family == "opt" else {"thirds": COMPRESSED["weights_thirds_cache_thirds"]}
    for name, pol in policies.items():
        pol = Policy(**{**pol.__dict__, **both})
        out, _, _ = _run(m.path, pol, m.prompts)
        assert out == ref, name
    # 4-bit weights compute what the dequantized weights compute densely (cache uncompressed on both sides)
    deq = _dequantized_checkpoint(m.path, tmp_path / "deq")
    w4, w4_logits, _ = _run(m.path, Policy(2, 2, compress_weight=True, weights=HALF_DISK), m.prompts)
    dense, dense_logits, _ = _run(deq, Policy(2, 2), m.prompts)
    assert w4 == dense
    torch.testing.assert_close(torch.cat(w4_logits), torch.cat(dense_logits), rtol=1e-4, atol=1e-4)
    # and stay close to the original model (random tiny weights of std 0.2: 4-bit costs some accuracy)
    cos = torch.nn.functional.cosine_similarity(w4_logits[0], m.base_logits[0], dim=-1)
    assert cos.min() > 0.75, cos
    # 4-bit cache: the prefill is exact (it attends to the fresh K/V), decode steps stay close
    c4, c4_logits, _ = _run(m.path, Policy(2, 2, compress_cache=True, cache=HALF_CPU), m.prompts)
    torch.testing.assert_close(c4_logits[0], m.base_logits[0])
    cos = torch.nn.functional.cosine_similarity(c4_logits[2], m.base_logits[2], dim=-1)
    assert cos.min() > 0.95, cos


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_prefill_in_token_chunks_is_exact(request, monkeypatch, family):
    """Prefill MLPs and the 4-bit embedding run a few tokens at a time (bounded GPU intermediates): the same tokens
    and logits as all at once."""
    m = request.getfixturevalue(family)
    layers = importlib.import_module("reldl.llm.offload.layers")
    pol = Policy(2, 2, compress_weight=True)
    whole, whole_logits, _ = _run(m.path, pol, m.prompts)
    monkeypatch.setattr(layers, "MLP_CHUNK_TOKENS", 3)
    monkeypatch.setattr(layers, "EMBED_CHUNK_ROWS", 5)
    out, logits, _ = _run(m.path, pol, m.prompts)
    assert out == whole
    torch.testing.assert_close(torch.cat(logits), torch.cat(whole_logits), rtol=1e-5, atol=1e-5)
    base, _, _ = _run(m.path, Policy(2, 2), m.prompts)
    assert base == m.base  # uncompressed weights, chunked MLPs: the all-on-device tokens


def test_variants_opt_project_and_sharded(tiny_checkpoints):
    """OPT-350m style (post-norm, projected embeddings) and a sharded checkpoint, against the Engine."""
    for path in (tiny_checkpoints("opt_project"), tiny_checkpoints("opt", sharded=True, seed=3)):
        prompts = _prompts(1)[:4]
        engine = get_engine(f"test_offload_{path.name}", str(path), dtype="float32", device="cpu")
        want = [r.token_ids for r in engine.generate_ids(prompts, [SamplingParams(max_tokens=NEW)] * 4)]
        out, _, _ = _run(path, Policy(2, 2, weights=THIRDS, cache=THIRDS, activations=HALF_DISK), prompts)
        assert out == want


def test_text_prompts_and_eos(opt):
    with OffloadEngine(opt.path, Policy(2, 1, cache=HALF_DISK)) as eng:
        texts = ["The phone is", "Rating: 5/5 -"]
        ids = eng.encode_many(texts)
        assert eng.generate(texts, 4) == eng.generate(ids, 4)
        assert isinstance(eng.generate_text(texts, 3)[0], str)
        with pytest.raises(ValueError, match="context"):
            eng.generate([[5] * 250], 10)


def test_unit_tiers_never_put_more_than_the_gpu_share_on_the_gpu():
    layer = [1, 1, 1, 1, 4, 4]  # q, k, v, o, fc1, fc2 of an OPT layer, in units of hidden^2
    for frac in [
        (0.85, 0.1, 0.05),
        (0.5, 0.5, 0.0),
        (0.2, 0.0, 0.8),
        (1.0, 0.0, 0.0),
        (0.0, 1.0, 0.0),
        (0.3, 0.3, 0.4),
    ]:
        tiers = unit_tiers(layer, frac)
        on = {t: sum(s for s, x in zip(layer, tiers, strict=True) if x == t) for t in ("gpu", "cpu", "disk")}
        assert on["gpu"] <= frac[0] * sum(layer) + 1e-9, (frac, tiers)
        assert (on["cpu"] == 0 or frac[1] > 0) and (on["disk"] == 0 or frac[2] > 0), (frac, tiers)
    # 85%: the two MLP matrices and two attention ones (10 of 12), not the whole layer (midpoints gave 12 of 12)
    assert unit_tiers(layer, (0.85, 0.1, 0.05)) == ["gpu", "gpu", "cpu", "disk", "gpu", "gpu"]
    assert unit_tiers(layer, (1.0, 0.0, 0.0)) == ["gpu"] * 6


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_cost_model_charges_the_placement_the_executor_makes(request, family):
    """For fractions across the search grid, each decoder layer's bytes per tier in a real WeightStore match the
    cost model's `placed_shares` of the layer's matrices (the biases and norms it leaves out fill leftover room:
    at these tiny widths they are a few % of a layer), and the embedding / head units' stored bytes match
    `head_placement`. Without a disk share the executor fuses q, k and v into one matrix, and so does the model."""
    from reldl.llm.offload.policy import ModelShape, fuses_qkv, head_placement, placed_shares

    m = request.getfixturevalue(family)
    for frac in [(0.85, 0.15, 0.0), (0.0, 0.5, 0.5), (0.25, 0.25, 0.5), (0.5, 0.0, 0.5), (0.6, 0.4, 0.0), (1, 0, 0)]:
        with OffloadEngine(m.path, Policy(2, 2, weights=frac)) as eng:
            shape = ModelShape.from_config(eng.config, dtype_bytes=4)
            want = placed_shares([shape.layer_tensors(fuses_qkv(frac))], frac)
            assert ("qkv" in eng.weights.placed[1]) == (frac[2] == 0) and ("q" in eng.weights.placed[1]) != (
                frac[2] == 0
            )
            for ub in eng.weights.unit_bytes[1:-1]:
                total = sum(ub.values())
                got = tuple(ub[t] / total for t in ("gpu", "cpu", "disk"))
                assert got == pytest.approx(want, abs=0.05), (family, frac, got, want)
            # embedding + head as stored (a tied table shared when both units put it on one tier): the store's
            # totals less the layers'
            esize = torch.empty((), dtype=eng.dtype).element_size()
            want_head = [v * esize for v in head_placement(shape, frac)[:3]]
            for t, w in zip(("gpu", "cpu", "disk"), want_head, strict=True):
                got = eng.weights.bytes[t] - sum(ub[t] for ub in eng.weights.unit_bytes[1:-1])
                assert got == pytest.approx(w, rel=0.05, abs=0.05 * max(want_head)), (family, frac, t, got, w)


def test_split_counts():
    assert split_counts(4, (0.5, 0.5, 0)) == [("gpu", 0, 2), ("cpu", 2, 4)]
    assert split_counts(4, (0, 0, 1)) == [("disk", 0, 4)]
    assert split_counts(10, (0.3, 0.3, 0.4)) == [("gpu", 0, 3), ("cpu", 3, 6), ("disk", 6, 10)]
    assert split_counts(1, (0.3, 0.3, 0.4)) == [("cpu", 0, 1)]


def test_json_roundtrip_of_policy_describe(opt):
    """The policy given is the policy run (nothing in the executor mutates it)."""
    p = MATRIX["both_thirds"]
    before = json.dumps(p.__dict__, default=list)
    _run(opt.path, p, opt.prompts[:2], n=2)
    assert json.dumps(p.__dict__, default=list) == before


def test_block_buffers_are_reused_across_blocks_and_calls(opt):
    """KV cache and activation buffers (Arena.slab) are made once (or by reserve) and carved again by later blocks
    and generate calls that fit; a longer request replaces them; results do not depend on what was there."""
    pol = Policy(2, 2, weights=HALF_CPU, cache=THIRDS, activations=(0, 0.5, 0.5))
    with OffloadEngine(opt.path, pol) as eng:
        assert eng.reserve(max(LENGTHS), NEW) >= 0
        slabs = {k: v.data_ptr() for k, v in eng.arena._slabs.items()}
        assert {t for t, _ in slabs} == {"gpu", "cpu", "disk"}
        made = dict(eng.arena.bytes)
        assert eng.generate(opt.prompts, NEW) == opt.base  # two blocks, over the reserved buffers
        assert eng.generate(opt.prompts[:3], 2) == [o[:2] for o in opt.base[:3]]
        assert {k: v.data_ptr() for k, v in eng.arena._slabs.items()} == slabs
        assert eng.arena.bytes == made  # nothing allocated since reserve
        kv = sum(eng.memory()["block"].values())
        out = eng.generate(opt.prompts, NEW + 3)  # more slots: the KV slabs grow
        assert [o[:NEW] for o in out] == opt.base
        assert sum(eng.arena.bytes.values()) > sum(made.values())
        assert sum(eng.memory()["block"].values()) > kv


def test_pin_method_is_checked_and_plain_on_the_cpu(opt):
    """OffloadEngine(pin=...): an unknown method is a one-line error naming the choices; on the CPU stand-in either
    method gives plain host memory and the same tokens (cuMemHostAlloc is CUDA only: tests/gpu)."""
    with pytest.raises(ValueError, match="pin must be one of register, alloc"):
        OffloadEngine(opt.path, Policy(2, 2), pin="mlock")
    with OffloadEngine(opt.path, Policy(2, 2, weights=HALF_CPU, cache=HALF_CPU), pin="alloc") as eng:
        assert eng.arena.pin_method == "alloc" and not eng.arena.pin
        assert eng.generate(opt.prompts, NEW) == opt.base


def test_pinned_bandwidth_benchmark_runs_on_the_cpu(tmp_path):
    """benchmarks/bench_pinned.py --preset cpu: a row per footprint and pin method, through the arena's own paths."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "pinned.json"
    cmd = [sys.executable, str(root / "benchmarks" / "bench_pinned.py"), "--preset", "cpu", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["pin"], r["buffers"]) for r in rows] == [
        ("register", 16),
        ("alloc", 16),
        ("register", 32),
        ("alloc", 32),
    ]
    assert all(r["stream_gbps"] > 0 and r["scattered_gbps"] > 0 for r in rows)
    bad = subprocess.run([*cmd, "--pins", "mlock"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--pins: 'mlock' is not one of register, alloc" in bad.stderr
