"""Issue 8's baselines for offloaded inference: reldl's OffloadEngine against the `flexgen` package and against
transformers + accelerate CPU offloading, on one card, same model, prompt, generation length and GPU memory cap.

    bash benchmarks/baselines/install.sh   # GPU box: flexgen (+ attrs, accelerate, tqdm if missing), .whl/baselines
    python3 benchmarks/bench_offload_baselines.py --caps 16                       # all three systems, 48 layers
    python3 benchmarks/bench_offload_baselines.py --caps 40 --systems flexgen     # one system (rows merge into --out)
    python3 benchmarks/bench_offload_baselines.py --layers 8 --caps 16            # 8 of 48 layers, all systems alike
    python3 benchmarks/bench_offload_baselines.py --preset cpu                    # tiny smoke run, no GPU

Per cap: `Hardware.measure()` (as bench_offload.py) and `search_policy` for the whole OPT-30B shape pick reldl's policy
(or --policy-from a bench_offload.py JSON takes the policy of its row for that cap). Then each system runs in its own
child process (its own CUDA context, GPU capped by torch.cuda.set_per_process_memory_fraction(cap)), one at a time:

- reldl: `OffloadEngine` with that policy over random fp16 weights (bench_offload.random_source), prompts of random
  ids, `reserve` (the pinned KV cache / activation buffers made once, timed: reserve_s), a 2-token warm-up (prompts
  cut to 128 tokens), then one block of prompt x gen tokens. Its step timers and the wall clock of generate(); also
  wall + reserve_s, the figure as if the buffers were made inside the measured call (flexgen makes its unpinned
  cache inside generate).
- flexgen (0.1.8): its own benchmark entry point `flexgen.flex_opt.run_flexgen` with the CLI arguments of the same
  policy: --gpu-batch-size / --num-gpu-batches = reldl's, --percent = reldl's weights / cache / activations GPU and
  CPU percentages (rest on disk), --cpu-cache-compute = reldl's cpu_attention, --compress-weight / --compress-cache,
  --overlap; --path _DUMMY_ (flexgen's dummy weights: every weight np.ones, placed in its tiers, no files read) and
  --offload-dir under --offload-dir. Runtime patches (flexgen's files are not edited), recorded in the JSON:
  `flex_opt.AutoTokenizer` -> a loader of a local byte-level BPE tokenizer built here (OPT's special ids 0-3; the GPU
  box has no hub: flexgen otherwise loads facebook/opt-30b's tokenizer, only to pad its test prompt); with --layers N
  `flex_opt.get_opt_config` -> OPT-30B's config with N layers; `OptLM.generate` wrapped to record its wall clock (with
  a CUDA sync). No torch API patch: flexgen 0.1.8 imports under torch 2.13 (checked on the CPU; the box has 2.11) and
  calls no removed API (its `Tensor.storage()` in cpu_mem_stats only warns); its CUDA paths are untried before the GPU
  run. Its prompts are its own: "Paris is the capital city of" left-padded to prompt-len (pad positions masked,
  compute as dense as any prompt), warm-up 1 token at prompt 32, as run_flexgen does.
  Reported: its own numbers (prefill / decode / total latency and throughput from timers("generate")) and the wall
  clock. A policy flexgen cannot express (activations split over tiers) is skipped with the reason.
- accelerate: OPTForCausalLM of the same config built under `init_empty_weights` (meta), each parameter materialized
  as a random fp16 CPU tensor (made on the GPU and copied when there is one; tied embeddings stay tied), then
  `infer_auto_device_map(max_memory={0: GPU room for weights, "cpu": ...}, no_split_module_classes=OPTDecoderLayer)`
  and `dispatch_model(main_device=0, force_hooks=True)`: modules mapped to "cpu" keep their weights in CPU memory and
  are copied to the GPU at each forward (accelerate's offload hooks; without force_hooks a map of "cpu" alone gets no
  hooks and the model runs on the CPU). No 60 GB checkpoint is written. Batch: the largest whose KV cache
  (prompt + gen) and prefill activations fit the cap beside one streamed layer (estimate below), or --accel-batch; an
  out-of-memory error retries at 0.8x the batch. GPU room for weights = cap - that batch's estimate. generate(greedy,
  min_new_tokens = max_new_tokens = gen) on random ids after a warm-up forward (1 sequence of 8 tokens, 1 new token);
  a StoppingCriteria stamps every step (CUDA sync): prefill + first token, then each of the gen - 1 decode steps.

Throughput compared: generated tokens / wall clock of the measured generate call (all three alike; prefill included);
each system's own figures beside it. Targets (issue 8): reldl >= 1.2x flexgen, >= 10x accelerate, same cap.
--layers N < 48 runs N layers in all three (labelled in every row; no extrapolation here). Rows merge into --out
(default benchmarks/out/offload_baselines.json) by (cap, layers, system), so a session can run caps / systems in
separate commands (the device's 10-minute limit) and the table printed at the end covers the whole file.
--preset cpu: a tiny OPT on the CPU; reldl and accelerate run, flexgen is skipped (its run_flexgen needs CUDA: cuda:0
device, CUDA streams, pinned memory) after its tokenizer patch and policy translation are exercised.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
BASELINES_SITE = os.environ.get("RELDL_BASELINES_SITE", "/tmp/reldl-baselines")
if os.path.isdir(BASELINES_SITE) and BASELINES_SITE not in sys.path:
    sys.path.append(BASELINES_SITE)  # after the image's packages: install.sh only adds what they lack

import bench_offload as bo  # noqa: E402

GiB = 1 << 30
# "reldl-inline" / "reldl-threads": reldl with its host<->device copies issued from the main thread
# (OffloadEngine(threads=False)) or from worker threads (threads=True): the same streams and events; "reldl" takes
# the engine's default (worker threads only where the policy places something on disk)
# "reldl-unfused": q, k and v as three matrices (policy.FUSE_QKV off; the default fuses them without a disk share)
SYSTEMS = ("reldl", "reldl-inline", "reldl-threads", "reldl-unfused", "flexgen", "accelerate")
TARGETS = {"flexgen": 1.2, "accelerate": 10.0}


# --------------------------------------------------------------------------------------------------------- helpers
def dims_for(preset: str) -> dict:
    return bo.TINY if preset == "cpu" else bo.OPT_30B


def set_cap(job: dict) -> None:
    import torch

    if job["preset"] == "cpu":
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, job["cap_gb"] * GiB / total), 0)
    torch.cuda.reset_peak_memory_stats(0)


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def random_prompts(n: int, prompt: int, vocab: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(4, vocab, (n, prompt), generator=g).tolist()


# ------------------------------------------------------------------------------------------------------ reldl
def run_reldl(job: dict) -> dict:
    import torch

    from reldl.llm.offload.executor import OffloadEngine

    cpu = job["preset"] == "cpu"
    dev = torch.device("cpu" if cpu else "cuda", None if cpu else 0)
    from reldl.llm.offload import policy as policy_mod

    policy_mod.FUSE_QKV = job.get("fuse_qkv", True)
    policy = bo.policy_from_fields(job["policy_fields"])
    tmp = Path(tempfile.mkdtemp(prefix="baselines-reldl-"))
    cfg = bo.opt_config(dims_for(job["preset"]), job["layers"], tmp / "cfg")
    set_cap(job)
    t = time.perf_counter()
    eng = OffloadEngine(
        bo.random_source(cfg, dev),
        policy,
        dev,
        torch.float32 if cpu else torch.float16,
        offload_dir=job["offload_dir"],
        threads=job.get("threads"),
    )
    build_s = time.perf_counter() - t
    try:
        # the KV cache / activation buffers, pinned, made once (reused by every generate call that fits)
        reserve_s = eng.reserve(job["prompt"], job["gen"])
        prompts = random_prompts(policy.block_size, job["prompt"], cfg.vocab_size)
        # warm-up (cuBLAS / Triton first use): the whole block at a prompt of at most WARMUP_PROMPT tokens, the
        # same kernels and configs as the measured run (its prefill matmuls have M > 64 either way) without the
        # full prefill (minutes for a 512-sequence block of a 48-layer model)
        eng.generate([p[: bo.WARMUP_PROMPT] for p in prompts], 2)
        sync(dev)
        t = time.perf_counter()
        eng.generate(prompts, job["gen"])
        sync(dev)
        wall = time.perf_counter() - t
        steps = eng.stats.steps
        total = sum(s.seconds for s in steps)
        dec = sum(s.seconds for s in steps[1:])
        n = policy.block_size
        return dict(
            batch=n,
            build_s=build_s,
            reserve_s=reserve_s,
            pin_s=eng.arena.pin_s,
            wall_s=wall,
            wall_throughput=n * job["gen"] / wall,
            # the conservative figure: as if the block buffers were made inside the measured call
            wall_plus_reserve_throughput=n * job["gen"] / (wall + reserve_s),
            decode_steps_s=[s.seconds for s in steps[1:]],
            copy_threads=eng.mover.threads,  # copies from worker threads (True) or the main thread
            fused_qkv="qkv" in eng.weights.placed[1] if len(eng.weights.placed) > 2 else None,
            own=dict(
                prefill_s=steps[0].seconds,
                decode_s=dec,
                decode_throughput=n * (job["gen"] - 1) / max(dec, 1e-12),
                total_s=total,
                total_throughput=n * job["gen"] / total,
            ),
            peak_gpu_gib=None if cpu else torch.cuda.max_memory_allocated(dev) / GiB,
        )
    finally:
        eng.close()
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- flexgen
def local_tokenizer(directory: Path) -> Path:
    """A byte-level BPE with OPT's special tokens at OPT's ids (<s> 0, <pad> 1, </s> 2, <unk> 3), saved as a
    PreTrainedTokenizerFast: stands in for facebook/opt-30b's tokenizer, which the offline GPU box cannot download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["Paris is the capital city of France.", "The quick brown fox jumps over the lazy dog."] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )
    assert fast.pad_token_id == 1 and fast.eos_token_id == 2, (fast.pad_token_id, fast.eos_token_id)
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))
    return directory


def flexgen_argv(job: dict, offload_dir: str, log_file: str) -> tuple[list[str] | None, str | None]:
    """flexgen.flex_opt's CLI arguments for reldl's policy, or (None, why) where flexgen cannot express it."""
    f = job["policy_fields"]
    w, c, a = (f[k] for k in ("weights", "cache", "activations"))
    if max(a) < 1.0:
        return None, f"activations split over tiers ({a}): flexgen keeps them 100% on one tier"
    pct = [round(100 * w[0]), round(100 * w[1]), round(100 * c[0]), round(100 * c[1]), round(100 * a[0])]
    pct.append(round(100 * a[1]))
    for i in (0, 2, 4):  # integer percentages whose GPU + CPU share stays <= 100
        pct[i + 1] = min(pct[i + 1], 100 - pct[i])
    argv = ["--model", "facebook/opt-30b", "--path", "_DUMMY_", "--offload-dir", offload_dir]
    argv += ["--prompt-len", str(job["prompt"]), "--gen-len", str(job["gen"])]
    argv += ["--gpu-batch-size", str(f["gpu_batch_size"]), "--num-gpu-batches", str(f["num_gpu_batches"])]
    argv += ["--percent", *map(str, pct), "--overlap", str(bool(f["overlap"])).lower()]
    argv += ["--log-file", log_file, "--verbose", "1"]
    argv += ["--cpu-cache-compute"] if f.get("cpu_attention") else []
    argv += ["--compress-weight"] if f.get("compress_weight") else []
    argv += ["--compress-cache"] if f.get("compress_cache") else []
    return argv, None


def run_flexgen(job: dict) -> dict:
    import flexgen
    import flexgen.flex_opt as fo
    import torch
    import transformers
    from flexgen.timer import timers

    tmp = Path(tempfile.mkdtemp(prefix="baselines-flexgen-"))
    offload_dir = str(Path(job["offload_dir"] or tmp) / "flexgen-offload")
    Path(offload_dir).mkdir(parents=True, exist_ok=True)
    argv, why = flexgen_argv(job, offload_dir, str(tmp / "flexgen.log"))
    if argv is None:
        return dict(skipped=why)
    tok_dir = local_tokenizer(tmp / "tokenizer")
    patches = [f"flexgen.flex_opt.AutoTokenizer.from_pretrained(any name) -> local BPE tokenizer at {tok_dir}"]

    class LocalAutoTokenizer:
        @staticmethod
        def from_pretrained(name, **kw):
            return transformers.AutoTokenizer.from_pretrained(str(tok_dir), **kw)

    fo.AutoTokenizer = LocalAutoTokenizer
    if job["layers"]:
        base = fo.get_opt_config

        def get_opt_config(name, **kw):
            return dataclasses.replace(base(name, **kw), num_hidden_layers=job["layers"])

        fo.get_opt_config = get_opt_config
        patches.append(f"flexgen.flex_opt.get_opt_config -> OPT-30B with num_hidden_layers={job['layers']}")
    walls: list[float] = []
    generate = fo.OptLM.generate

    def timed_generate(self, *a, **kw):
        t = time.perf_counter()
        out = generate(self, *a, **kw)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t)
        return out

    fo.OptLM.generate = timed_generate
    patches.append("flexgen.flex_opt.OptLM.generate wrapped: wall clock per call (CUDA sync at the end)")
    parser = argparse.ArgumentParser()
    fo.add_parser_arguments(parser)
    args = parser.parse_args(argv)
    row = dict(
        flexgen_version=getattr(flexgen, "__version__", None) or _dist_version("flexgen"),
        command="python3 -m flexgen.flex_opt " + " ".join(argv),
        patches=patches,
        batch=args.gpu_batch_size * args.num_gpu_batches,
    )
    tok = LocalAutoTokenizer.from_pretrained("facebook/opt-30b", padding_side="left")
    ids = fo.get_test_inputs(job["prompt"], 1, tok)[0]
    row["prompt_ids_check"] = dict(length=len(ids), pads=sum(1 for i in ids if i == 1))
    if job["preset"] == "cpu" or not torch.cuda.is_available():
        shutil.rmtree(tmp, ignore_errors=True)
        row["skipped"] = "flexgen's run_flexgen needs CUDA (cuda:0 device, CUDA streams, pinned memory)"
        return row
    set_cap(job)
    t = time.perf_counter()
    try:
        fo.run_flexgen(args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    costs = timers("generate").costs
    n, gen, prompt = row["batch"], job["gen"], job["prompt"]
    prefill = costs[0]
    dec = sum(costs[1:])
    row.update(
        run_s=time.perf_counter() - t,
        wall_s=walls[-1],
        wall_throughput=n * gen / walls[-1],
        warmup_wall_s=walls[0] if len(walls) > 1 else None,
        own=dict(  # run_flexgen's own formulas
            prefill_s=prefill,
            prefill_throughput=n * prompt / prefill,
            decode_s=dec,
            decode_throughput=n * (gen - 1) / max(dec, 1e-10),
            total_s=prefill + dec,
            total_throughput=n * gen / (prefill + dec),
        ),
        peak_gpu_gib=torch.cuda.max_memory_allocated(0) / GiB,
    )
    return row


def _dist_version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------------- accelerate
def accel_bytes_per_seq(d: dict, layers: int, prompt: int, gen: int) -> float:
    """GPU bytes one sequence needs beside the weights: fp16 KV cache of prompt + gen positions in every layer, and
    the prefill's transient activations of one layer (fc1 output, q/k/v/attention output, residuals)."""
    h, f = d["hidden_size"], d["ffn_dim"]
    kv = 2 * layers * (prompt + gen) * h * 2
    act = prompt * (2 * f + 8 * h) * 2
    return kv + act


def accel_fixed_bytes(d: dict) -> float:
    """One decoder layer streamed in by the offload hook, twice (its copy plus the allocator's slack), + 1.5 GiB for
    the CUDA context's share of the cap, cuBLAS workspaces and fragmentation."""
    h, f = d["hidden_size"], d["ffn_dim"]
    return 2 * (4 * h * h + 2 * h * f) * 2 + 1.5 * GiB


def run_accelerate(job: dict) -> dict:
    import accelerate
    import torch
    import transformers
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from transformers import OPTConfig, OPTForCausalLM

    cpu = job["preset"] == "cpu"
    d = dims_for(job["preset"])
    layers = job["layers"] or d["num_hidden_layers"]
    hf = OPTConfig(
        hidden_size=d["hidden_size"],
        num_attention_heads=d["num_attention_heads"],
        ffn_dim=d["ffn_dim"],
        num_hidden_layers=layers,
        vocab_size=d["vocab_size"],
        max_position_embeddings=bo.TINY_POSITIONS if cpu else 2048,
        word_embed_proj_dim=d["hidden_size"],
        do_layer_norm_before=True,
        enable_bias=True,
        activation_function="relu",
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    dtype = torch.float32 if cpu else torch.float16
    make_dev = torch.device("cuda", 0) if torch.cuda.is_available() and not cpu else torch.device("cpu")
    t = time.perf_counter()
    with init_empty_weights():
        model = OPTForCausalLM(hf)
    model.eval()
    made: dict[int, torch.nn.Parameter] = {}
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        mod_name, _, leaf = name.rpartition(".")
        if id(p) not in made:  # tied parameters (lm_head / embed_tokens) get the same materialized Parameter
            if p.dim() == 1:
                v = torch.full(p.shape, 1.0 if "layer_norm" in name else 0.0, dtype=dtype)
            else:
                g = torch.Generator(device=make_dev).manual_seed(zlib.crc32(name.encode()))
                v = (torch.randn(p.shape, generator=g, device=make_dev) * 0.02).to(dtype).cpu()
            made[id(p)] = torch.nn.Parameter(v, requires_grad=False)
        setattr(model.get_submodule(mod_name), leaf, made[id(p)])
    for name, b in list(model.named_buffers()):
        if b.is_meta:
            raise RuntimeError(f"buffer {name} left on the meta device")
    weight_bytes = sum(p.numel() * p.element_size() for p in made.values())
    materialize_s = time.perf_counter() - t

    per_seq = accel_bytes_per_seq(d, layers, job["prompt"], job["gen"])
    fixed = accel_fixed_bytes(d)
    cap = job["cap_gb"] * GiB
    if job.get("accel_batch"):
        batch = job["accel_batch"]
    elif cpu:
        batch = 4
    else:
        batch = max(1, int((cap - fixed) // per_seq))
    row = dict(
        accelerate_version=accelerate.__version__,
        transformers_version=transformers.__version__,
        weights_gib=weight_bytes / GiB,
        materialize_s=materialize_s,
        batch_estimate=dict(per_seq_gib=per_seq / GiB, fixed_gib=fixed / GiB, batch=batch),
        attempts=[],
    )
    if cpu:
        device_map = {"": "cpu"}
        model = dispatch_model(model, device_map=device_map)
        dev = torch.device("cpu")
    else:
        set_cap(job)
        room = max(0.0, cap - fixed - batch * per_seq)
        device_map = infer_auto_device_map(
            model,
            max_memory={0: int(room), "cpu": int(weight_bytes * 1.2 + 8 * GiB)},
            no_split_module_classes=["OPTDecoderLayer"],
            dtype=dtype,
        )
        # force_hooks: with every module mapped to "cpu" (no GPU room left beside the batch's cache) dispatch_model
        # would otherwise attach no hooks and leave the whole model running on the CPU (seen on the first GPU run:
        # the prefill of 54 x 512 tokens outlasted 170 s); with them, "cpu" modules run on the GPU, their weights
        # copied in at each forward (accelerate's CPU offloading)
        if set(map(str, device_map.values())) == {"cpu"}:
            # no GPU room for weights: accelerate's full CPU offload (every module's weights copied to the GPU at
            # its forward). dispatch_model cannot do this one: the map collapses to {"": "cpu"}, whose state-dict
            # extraction finds no keys (KeyError at the first forward, seen on the GPU run)
            from accelerate import cpu_offload

            model = cpu_offload(model, execution_device=torch.device("cuda", 0))
            row["offload"] = "accelerate.cpu_offload (device map all 'cpu')"
        else:
            model = dispatch_model(model, device_map=device_map, main_device=0, force_hooks=True)
            row["offload"] = "accelerate.dispatch_model(force_hooks=True)"
        dev = torch.device("cuda", 0)
        hooked = [n for n, m in model.named_modules() if hasattr(m, "_hf_hook")]
        if not hooked:
            raise RuntimeError("dispatch_model attached no offload hooks: the model would run on the CPU")
        row["hooked_modules"] = len(hooked)
        on_gpu = [k for k, v in device_map.items() if v not in ("cpu", "disk")]
        row["gpu_weight_room_gib"] = room / GiB
        row["device_map_summary"] = dict(
            on_gpu=len(on_gpu), on_cpu=sum(1 for v in device_map.values() if v == "cpu"), gpu_modules=on_gpu[:8]
        )
    row["device_map"] = {k: str(v) for k, v in device_map.items()}
    vocab = d["vocab_size"]
    stamps: list[float] = []

    class StepClock(transformers.StoppingCriteria):
        """Called once per generated token (after its forward): a synchronised time stamp per step, and a progress
        line, so every step is measured (the prefill + first token, then each decode step) and a slow run shows
        where it is."""

        def __call__(self, input_ids, scores, **kw):
            sync(dev)
            stamps.append(time.perf_counter())
            print(f"   accelerate: step {len(stamps)} at {stamps[-1] - stamps[0]:.1f} s", flush=True)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    with torch.inference_mode():  # warm-up: one forward of one short sequence (first-use costs, one weight pass)
        w_ids = torch.tensor(random_prompts(1, 8, vocab), device=dev)
        sync(dev)
        t = time.perf_counter()
        model.generate(w_ids, attention_mask=torch.ones_like(w_ids), max_new_tokens=1, do_sample=False, pad_token_id=1)
        sync(dev)
        warm = time.perf_counter() - t
    print(f"   accelerate: warm-up forward {warm:.1f} s, batch {batch}", flush=True)
    while True:
        ids = torch.tensor(random_prompts(batch, job["prompt"], vocab), device=dev)
        mask = torch.ones_like(ids)
        kw = dict(attention_mask=mask, do_sample=False, pad_token_id=1)
        try:
            with torch.inference_mode():
                stamps.clear()
                sync(dev)
                t = time.perf_counter()
                out = model.generate(
                    ids,
                    max_new_tokens=job["gen"],
                    min_new_tokens=job["gen"],
                    stopping_criteria=transformers.StoppingCriteriaList([StepClock()]),
                    **kw,
                )
                sync(dev)
                wall = time.perf_counter() - t
            break
        except torch.OutOfMemoryError as e:
            row["attempts"].append(dict(batch=batch, error=str(e).splitlines()[0][:200]))
            del ids, mask
            if not cpu:
                torch.cuda.empty_cache()
            if batch == 1:
                raise
            batch = max(1, int(batch * 0.8))
    new = out.shape[1] - job["prompt"]
    n = batch
    first = stamps[0] - t  # prefill + the first token
    steps = [b - a for a, b in zip(stamps, stamps[1:])]  # each decode step, measured
    row.update(
        batch=n,
        new_tokens=new,
        warmup_forward_s=warm,
        wall_s=wall,
        wall_throughput=n * new / wall,
        decode_steps_s=steps,
        own=dict(
            prefill_s=first,
            decode_s=sum(steps),
            decode_throughput=n * len(steps) / sum(steps) if steps else None,
            total_throughput=n * new / wall,
        ),
        peak_gpu_gib=None if cpu else torch.cuda.max_memory_allocated(dev) / GiB,
    )
    return row


WORKERS = {
    "reldl": run_reldl,
    "reldl-inline": lambda job: run_reldl(dict(job, threads=False)),
    "reldl-threads": lambda job: run_reldl(dict(job, threads=True)),
    "reldl-unfused": lambda job: run_reldl(dict(job, fuse_qkv=False)),
    "flexgen": run_flexgen,
    "accelerate": run_accelerate,
}


def worker_main(system: str, job_file: str) -> int:
    import faulthandler

    # a crashing worker (a signal) shows every thread's stack. No periodic dump_traceback_later: its watchdog
    # thread reads the other threads' frames without the GIL, and on the H100 run of 2026-11-28 it crashed the
    # worker (SIGSEGV right after a "Timeout (0:02:00)!" dump with a garbage frame)
    faulthandler.enable()
    job = json.loads(Path(job_file).read_text())
    t = time.perf_counter()
    try:
        row = WORKERS[system](job)
    except Exception as e:
        import traceback

        traceback.print_exc()
        row = dict(error=f"{type(e).__name__}: {e}"[:2000])
    row["worker_s"] = time.perf_counter() - t
    Path(job_file + ".out").write_text(json.dumps(row, default=str))
    # exit now: a failed flexgen leaves its non-daemon copy threads running, and the worker would sit until the
    # parent's timeout (H200, 2026-11-28: an init OOM held the call for 330 s)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ------------------------------------------------------------------------------------------------------ parent
def search(args, cap_gb: float, hw) -> tuple[dict, str, dict]:
    from reldl.llm.offload import ModelShape, search_policy

    cpu = args.preset == "cpu"
    tmp = Path(tempfile.mkdtemp(prefix="baselines-cfg-"))
    full = ModelShape.from_config(bo.opt_config(dims_for(args.preset), None, tmp / "full"))
    shutil.rmtree(tmp, ignore_errors=True)
    comp = None if args.compress else False
    policy, est = search_policy(
        full,
        hw.with_memory(gpu=cap_gb * GiB),
        args.prompt,
        args.gen,
        compress_weight=comp,
        compress_cache=comp,
        split_compressed_cache=not args.flexgen_compatible,
        **(dict(gpu_batch_sizes=(1, 2, 4), num_gpu_batches=(1, 2, 3)) if cpu else {}),
    )
    fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in policy.__dict__.items()}
    return fields, policy.describe(), dict(throughput_full_model=est.throughput)


def run_child(system: str, job: dict, timeout: float) -> dict:
    fd, job_file = tempfile.mkstemp(prefix=f"baselines-{system}-", suffix=".json")
    os.close(fd)
    Path(job_file).write_text(json.dumps(job))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", system, "--job", job_file]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=timeout)
        out = Path(job_file + ".out")
        row = json.loads(out.read_text()) if out.exists() else dict(error=f"worker exited {proc.returncode}")
    except subprocess.TimeoutExpired:
        row = dict(error=f"timed out after {timeout:.0f} s")
    finally:
        for p in (job_file, job_file + ".out"):
            Path(p).unlink(missing_ok=True)
    row["process_s"] = time.perf_counter() - t
    return row


def print_table(rows: list[dict]) -> None:
    print(
        "\ncap GB | layers | system     | batch | tok/s (wall) | own tok/s (total / decode) | reldl / this "
        "(reldl + reserve) | target"
    )
    for cap, layers in sorted({(r["cap_gb"], r["layers_run"]) for r in rows}):
        group = {r["system"]: r for r in rows if r["cap_gb"] == cap and r["layers_run"] == layers}
        ref = group.get("reldl", {}).get("wall_throughput")
        ref2 = group.get("reldl", {}).get("wall_plus_reserve_throughput")
        for s in SYSTEMS:
            r = group.get(s)
            if r is None:
                continue
            if "wall_throughput" not in r:
                why = r.get("error") or r.get("skipped") or "?"
                print(f"{cap:6.4g} | {layers:6d} | {s:10s} | {'-':>5} | {why[:90]}")
                continue
            own = r.get("own", {})
            dec = own.get("decode_throughput") or float("nan")
            ratio, target = "", ""
            if s in TARGETS:
                target = f">= {TARGETS[s]:g}x"
                if ref:
                    x = ref / r["wall_throughput"]
                    ratio = f"{x:.2f}x" + (f" ({ref2 / r['wall_throughput']:.2f}x)" if ref2 else "")
                    target += " met" if x >= TARGETS[s] else " NOT met"
            print(
                f"{cap:6.4g} | {layers:6d} | {s:10s} | {r.get('batch', '?'):>5} | {r['wall_throughput']:12.4g} | "
                f"{own.get('total_throughput', float('nan')):10.4g} / {dec:<10.4g}   | {ratio:>30} | {target}"
            )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--preset", choices=["gpu", "cpu"], default="gpu")
    ap.add_argument("--caps", default="16,40", help="GPU memory caps in GB (GiB)")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--layers", type=int, default=None, help="run N of the 48 layers in every system")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--compress", action="store_true", help="let the search choose 4-bit weights / cache")
    ap.add_argument(
        "--flexgen-compatible",
        action="store_true",
        help="search only policies flexgen can run too (a 4-bit cache wholly on one tier: flexgen 0.1.8 asserts on a "
        "compressed cache split across GPU and CPU)",
    )
    ap.add_argument("--policy-from", default=None, help="bench_offload.py JSON: take its row's policy per cap")
    ap.add_argument("--accel-batch", type=int, default=None, help="accelerate's batch (default: largest that fits)")
    ap.add_argument("--cpu-mem-gb", type=float, default=None)
    ap.add_argument("--offload-dir", default=None)
    ap.add_argument("--quick-measure", action="store_true")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per system and cap")
    ap.add_argument("--out", default="benchmarks/out/offload_baselines.json")
    args = ap.parse_args()
    if args.worker:
        return worker_main(args.worker, args.job)

    import torch

    systems = [s for s in args.systems.split(",") if s]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad:
        ap.error(f"unknown systems {bad}")
    cpu = args.preset == "cpu"
    box = bo.hardware_and_card(args)
    if box is None:
        return 2
    hw, card = box
    if not cpu:
        torch.cuda.empty_cache()
    print(f"hardware: {json.dumps({k: f'{v:.4g}' for k, v in hw.__dict__.items()})}")
    out_path = Path(args.out)
    old = json.loads(out_path.read_text()) if out_path.exists() else {}
    rows: list[dict] = [r for r in old.get("rows", []) if old.get("card") == card]
    runs = (old.get("runs", []) if old.get("card") == card else []) + [
        dict(date=datetime.datetime.now().isoformat(timespec="seconds"), command=" ".join(sys.argv))
    ]
    layers_full = dims_for(args.preset)["num_hidden_layers"]
    layers_run = args.layers or layers_full
    status = 0
    for cap in (float(c) for c in args.caps.split(",")):
        got = bo.policy_from_file(args.policy_from, cap) if args.policy_from else None
        fields, described, extra = got or search(args, cap, hw)
        print(f"\n== cap {cap} GB, {layers_run} of {layers_full} layers: {described}")
        job = dict(
            preset=args.preset,
            cap_gb=cap,
            layers=args.layers,
            prompt=args.prompt,
            gen=args.gen,
            policy_fields=fields,
            offload_dir=args.offload_dir,
            accel_batch=args.accel_batch,
        )
        for s in systems:
            print(f"-- {s}", flush=True)
            row = run_child(s, job, args.timeout)
            row.update(
                system=s,
                cap_gb=cap,
                layers_run=layers_run,
                model=f"opt-30b shape, {layers_run} of {layers_full} layers" if not cpu else "tiny opt",
                prompt=args.prompt,
                gen=args.gen,
                policy=described,
                policy_fields=fields,
                policy_source=extra,
                date=datetime.datetime.now().isoformat(timespec="seconds"),
            )
            if "error" in row:
                status = 1
                print(f"   {s} failed: {row['error'][:500]}", file=sys.stderr)
            elif "skipped" in row:
                print(f"   {s} skipped: {row['skipped']}")
            else:
                own = row.get("own", {})
                print(
                    f"   {s}: batch {row.get('batch')}, {row['wall_throughput']:.4g} tok/s wall "
                    f"({row['wall_s']:.3g} s), own total {own.get('total_throughput', float('nan')):.4g} tok/s"
                )
            rows[:] = [r for r in rows if (r["cap_gb"], r["layers_run"], r["system"]) != (cap, layers_run, s)]
            rows.append(row)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            doc = dict(card=card, runs=runs, hardware=hw.__dict__, targets=TARGETS, rows=rows)
            out_path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print_table(rows)
    print(f"\nJSON: {out_path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
