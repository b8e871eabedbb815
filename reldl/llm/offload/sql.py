"""Offloaded LLMs from SQL (issue 8): `CREATE MODEL big OPTIONS (model_type = 'llm', path = '/ckpt', offload = 'auto'
| '<policy>' [, gpu_memory = '16GB', cpu_memory = ..., disk_memory = ..., offload_dir = '/nvme/x', prompt_len = 512,
gen_len = 32])`, the hardware the policy search plans for, and EXPLAIN's lines.

Torch-free at import (numpy only, through policy.py); torch is imported only to read a CUDA card's memory.

- `offload = 'auto'`: `search_policy` over the checkpoint's `ModelShape` (bytes per element of the dtype the model
  runs in) and this host's `Hardware`, for a workload of `prompt_len` prompt tokens and `gen_len` new tokens
  (defaults 512 / 32, FlexGen's setting, cut to the model's context). No 4-bit compression (the search keeps the
  text exact); explicit policies may compress.
- `offload = '<policy>'`: JSON with `Policy`'s fields (`{"gpu_batch_size": 8, "weights": [0.5, 0, 0.5], ...}`) or
  the same as text, `weights = 50/0/50, cache = 0/100/0, gpu_batch_size = 8, compress_weight = true` (placements as
  gpu/cpu/disk percentages or fractions; `gpu_batch_size` defaults to 8). Its peak memory must fit the hardware.
- Hardware: user caps (`gpu_memory` ...) > `reldl calibrate`'s `offload_*` keys in `reldl.calibration` > host
  defaults (capacities read from the OS / the driver, rates from the h100 preset; when the model runs on the CPU the
  CPU stands in for the GPU: the GPU-side rates are the CPU's, capacities half the RAM each). EXPLAIN says
  "uncalibrated" while no `offload_*` key is stored.

The catalog row keeps, under options["offload"]: the policy's fields, how it was chosen, the caps, the workload
(prompt_len, gen_len), the ModelShape and the estimate at creation (throughput, memory per tier).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, fields, replace
from typing import Any

from reldl.errors import ProgrammingError, shown
from reldl.llm.offload.policy import (
    Estimate,
    Hardware,
    ModelShape,
    Policy,
    estimate,
    layer_shares,
    memory,
    search_policy,
)

OFFLOAD_OPTIONS = ("offload", "gpu_memory", "cpu_memory", "disk_memory", "offload_dir", "prompt_len", "gen_len")
DEFAULT_PROMPT_LEN = 512
DEFAULT_GEN_LEN = 32
DEFAULT_GPU_BATCH = 8
UDF_CHUNK_ROWS = 2048  # rows per DuckDB chunk: the most one engine call of a UDF-centric plan gets

# Hardware fields about the GPU side: on a model that runs on the CPU they describe the CPU standing in
GPU_FIELDS = ("gpu_mem", "ctog_bw", "gtoc_bw", "gpu_flops", "gpu_mem_bw", "gpu_q4_bw", "gpu_attn_flops")
CPU_STANDIN = {"ctog_bw": 10e9, "gtoc_bw": 10e9, "gpu_mem_bw": 20e9}  # memcpy-speed "transfers" on one host


# --------------------------------------------------------------------------------------------------- parsing


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1e3,
    "mb": 1e6,
    "gb": 1e9,
    "tb": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(value: Any, name: str, option: str) -> float:
    """A size with its unit, as DuckDB's memory_limit takes it: '16GB' (KB, MB, GB, TB: powers of 1000), '16 GiB'
    (KiB, MiB, GiB, TiB: powers of 1024), '512MiB', '4096B'. A bare number (16, '16') is refused, as DuckDB refuses
    it: 16 could mean bytes or GB, and a budget read in the wrong unit fails late or plans nonsense."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", str(value).lower())
    if isinstance(value, (int, float)) and not isinstance(value, bool) or (m is not None and m.group(2) == ""):
        n = str(value) if isinstance(value, int) else f"{float(value):g}" if m is None else m.group(1)
        if float(n) <= 0:
            raise ProgrammingError(f"CREATE MODEL {name}: {option} must be a positive size, got {shown(value)}")
        raise ProgrammingError(
            f"CREATE MODEL {name}: {option} must be a size such as '16GB' or '512MiB', got {shown(value)} without "
            f"a unit (write '{n}GB' or '{n}GiB', or '{n}B' for bytes)"
        )
    if m is None or m.group(2) not in _UNITS:
        raise ProgrammingError(
            f"CREATE MODEL {name}: {option} must be a size such as '16GB' or '512MiB', got {shown(value)}"
        )
    number, unit = float(m.group(1)), m.group(2)
    out = number * _UNITS[unit]
    if not math.isfinite(out) or out <= 0:
        raise ProgrammingError(f"CREATE MODEL {name}: {option} must be a positive size, got {shown(value)}")
    return out


_POLICY_FIELDS = {f.name for f in fields(Policy)}
_PLACEMENTS = ("weights", "cache", "activations")
_FLAGS = ("compress_weight", "compress_cache", "overlap", "cpu_attention")


def _placement(value: Any, key: str, name: str) -> tuple[float, float, float]:
    """gpu/cpu/disk shares as percentages (summing to 100) or fractions (summing to 1); messages in the user's
    units, never the scaled fractions."""
    if isinstance(value, str):
        value = [v for v in re.split(r"[/:\s]+", value.strip()) if v]
    try:
        vals = [float(v) for v in value]
    except (TypeError, ValueError):
        vals = []
    if len(vals) != 3 or not all(math.isfinite(v) for v in vals):
        raise ProgrammingError(
            f"CREATE MODEL {name}: offload policy: {key} must be gpu/cpu/disk shares like 50/0/50 or [0.5, 0, 0.5], "
            f"got {shown(value)}"
        )
    total = sum(vals)
    percent = any(abs(v) > 1 for v in vals)
    whole, unit = (100, "gpu/cpu/disk %") if percent else (1, "gpu/cpu/disk fractions")
    text = "/".join(f"{v:g}" for v in vals)
    if any(v < 0 for v in vals):
        raise ProgrammingError(f"CREATE MODEL {name}: offload policy: {key} shares must be >= 0 ({unit}), got {text}")
    if abs(total - whole) > 1e-6 * whole:
        raise ProgrammingError(
            f"CREATE MODEL {name}: offload policy: {key} shares must sum to {whole} ({unit}), got {text} = {total:g}"
        )
    return tuple(v / whole for v in vals)  # type: ignore[return-value]


_INTEGERS = ("gpu_batch_size", "num_gpu_batches")


def _integer(value: Any, key: str, name: str) -> int:
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number != int(number) or number < 1:
        text = value if isinstance(value, str) and value.strip() else shown(value)
        raise ProgrammingError(f"CREATE MODEL {name}: offload policy: {key} must be an integer >= 1, got {text}")
    return int(number)


def _flag(value: Any, key: str, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ProgrammingError(f"CREATE MODEL {name}: offload policy {key} must be true or false, got {shown(value)}")


def parse_policy(text: str, name: str) -> Policy:
    """A policy from JSON (`Policy`'s fields) or `key = value, ...` text; one-line ProgrammingErrors."""
    raw: dict[str, Any]
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            raw = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise ProgrammingError(f"CREATE MODEL {name}: offload policy is not valid JSON ({e.msg})") from None
        if not isinstance(raw, dict):
            raise ProgrammingError(f"CREATE MODEL {name}: offload policy JSON must be an object")
    else:
        raw = {}
        for part in (p for p in re.split(r"[,;]", stripped) if p.strip()):
            key, eq, value = part.partition("=")
            if not eq:
                raise ProgrammingError(
                    f"CREATE MODEL {name}: offload must be 'auto' or a policy 'key = value, ...' (or JSON), "
                    f"got {part.strip()!r}"
                )
            raw[key.strip().lower()] = value.strip()
    unknown = set(raw) - _POLICY_FIELDS
    if unknown:
        raise ProgrammingError(
            f"CREATE MODEL {name}: unknown offload policy field(s) {', '.join(sorted(unknown))} "
            f"(fields: {', '.join(f.name for f in fields(Policy))})"
        )
    kw: dict[str, Any] = {"gpu_batch_size": DEFAULT_GPU_BATCH}
    for key, value in raw.items():
        if key in _PLACEMENTS:
            kw[key] = _placement(value, key, name)
        elif key in _FLAGS:
            kw[key] = _flag(value, key, name)
        elif key in _INTEGERS:
            kw[key] = _integer(value, key, name)
        else:
            kw[key] = value
    try:
        return Policy(**kw)
    except (TypeError, ValueError) as e:
        raise ProgrammingError(f"CREATE MODEL {name}: bad offload policy: {e}") from None


# --------------------------------------------------------------------------------------------------- hardware


def _ram() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16e9


def _free_disk(path: str, default: float) -> float:
    """Free bytes on the file system of `path` (or of its nearest existing parent)."""
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    try:
        return float(shutil.disk_usage(p).free)
    except OSError:
        return default


def calibrated_values(duck) -> dict[str, float]:
    """The `offload_*` keys `reldl calibrate` stored (empty when uncalibrated)."""
    if duck is None:
        return {}
    cur = duck.cursor()
    try:
        rows = cur.execute("SELECT key, value FROM reldl.calibration WHERE key LIKE 'offload_%'").fetchall()
    except Exception:  # noqa: BLE001 - no calibration table yet
        return {}
    finally:
        cur.close()
    return {k: float(v) for k, v in rows}


def cpu_flops(duck) -> float:
    """The CPU's matmul rate the planner uses (calibrated `torch_cpu_flops`, or its default)."""
    from reldl.planner.cost import DEFAULTS

    if duck is None:
        return DEFAULTS["torch_cpu_flops"]
    cur = duck.cursor()
    try:
        row = cur.execute("SELECT value FROM reldl.calibration WHERE key = 'torch_cpu_flops'").fetchall()
    except Exception:  # noqa: BLE001
        row = []
    finally:
        cur.close()
    return float(row[0][0]) if row else DEFAULTS["torch_cpu_flops"]


def hardware(duck, device: str, caps: dict[str, float], offload_dir: str | None) -> tuple[Hardware, bool]:
    """The Hardware a policy is searched / estimated for, and whether `reldl calibrate` measured any of it."""
    base = asdict(Hardware.preset("h100"))
    ram = _ram()
    base.update(cpu_mem=ram, disk_mem=_free_disk(tempfile.gettempdir(), base["disk_mem"]))
    cal = calibrated_values(duck)
    base.update({k.removeprefix("offload_"): v for k, v in cal.items() if k.removeprefix("offload_") in base})
    if "offload_gpu_q4_bw" not in cal:  # derived from the GPU memory bandwidth used (Hardware.__post_init__)
        base["gpu_q4_bw"] = None
    if offload_dir is not None:  # the disk tier's own file system
        base["disk_mem"] = _free_disk(offload_dir, base["disk_mem"])
    if device.startswith("cuda"):
        if "offload_gpu_mem" not in cal:
            import torch

            idx = torch.device(device).index
            base["gpu_mem"] = float(torch.cuda.get_device_properties(idx or 0).total_memory)
    else:  # the CPU stands in for the GPU (the executor's CPU mode): GPU-side numbers are the CPU's
        base.update(CPU_STANDIN)
        base.update(gpu_mem=ram / 2, cpu_mem=ram / 2, gpu_flops=cpu_flops(duck), gpu_attn_flops=base["cpu_attn_flops"])
        base["gpu_q4_bw"] = None  # from the stand-in memory bandwidth, never a calibrated GPU's
        # the CPU executor runs each call to completion: its host time is its compute
        base["host_call_s"] = base["host_segment_s"] = 0.0
    for tier in ("gpu", "cpu", "disk"):
        if tier in caps:
            base[f"{tier}_mem"] = caps[tier]
    return Hardware(**base), bool(cal)


# --------------------------------------------------------------------------------------------------- CREATE MODEL


def create_options(duck, name: str, opts: dict, config, device: str, dtype_bytes: int) -> dict[str, Any] | None:
    """options["offload"] for the catalog (None without `offload`), validated; raises one-line ProgrammingErrors.
    `device`: the resolved device ('cpu', 'cuda:0'); `dtype_bytes`: bytes per element of the dtype it runs in."""
    given = [k for k in OFFLOAD_OPTIONS if k in opts and k != "offload"]
    mode = opts.get("offload")
    if "offload" not in opts:
        if given:
            raise ProgrammingError(f"CREATE MODEL {name}: {', '.join(given)} need(s) offload = 'auto' or a policy")
        return None
    if not isinstance(mode, str) or not mode.strip():
        raise ProgrammingError(
            f"CREATE MODEL {name}: offload must be 'auto' or a policy (text or JSON), got {shown(mode)}"
        )
    if config.family not in ("opt", "llama") or any(config.layer_windows or []) or config.sliding_window:
        raise ProgrammingError(
            f"CREATE MODEL {name}: offload runs OPT and Llama-family models without sliding windows, "
            f"not {config.model_type!r}"
        )
    caps = {
        t: parse_bytes(opts[f"{t}_memory"], name, f"{t}_memory")
        for t in ("gpu", "cpu", "disk")
        if f"{t}_memory" in opts
    }
    offload_dir = opts.get("offload_dir")
    if "offload_dir" in opts:
        if not isinstance(offload_dir, str) or not offload_dir:
            raise ProgrammingError(
                f"CREATE MODEL {name}: offload_dir must be a directory path, got {shown(offload_dir)}"
            )
        offload_dir = os.path.abspath(os.path.expanduser(offload_dir))
        if os.path.exists(offload_dir) and not os.path.isdir(offload_dir):
            raise ProgrammingError(f"CREATE MODEL {name}: offload_dir {offload_dir} is not a directory")
        parent = os.path.dirname(offload_dir)
        if not os.path.exists(offload_dir) and not os.path.isdir(parent):  # reldl creates the last level only
            raise ProgrammingError(f"CREATE MODEL {name}: offload_dir's parent directory {parent} does not exist")
    ctx = int(config.max_positions)
    gen_len = _length(opts, "gen_len", min(DEFAULT_GEN_LEN, max(1, ctx // 2)), name)
    prompt_len = _length(opts, "prompt_len", max(1, min(DEFAULT_PROMPT_LEN, ctx - gen_len)), name)
    if prompt_len + gen_len > ctx:
        raise ProgrammingError(
            f"CREATE MODEL {name}: prompt_len {prompt_len} + gen_len {gen_len} exceed the model's context ({ctx})"
        )
    shape = ModelShape.from_config(config, dtype_bytes)
    hw, calibrated = hardware(duck, device, caps, offload_dir)
    if mode.strip().lower() == "auto":
        try:
            policy, est = search_policy(shape, hw, prompt_len, gen_len)
        except ValueError as e:
            raise ProgrammingError(f"CREATE MODEL {name}: offload = 'auto': {e}") from None
    else:
        policy = parse_policy(mode, name)
        need = memory(policy, shape, prompt_len, gen_len)
        for tier in ("gpu", "cpu", "disk"):
            if need[tier] > hw.capacity(tier):
                src = f"{tier}_memory" if tier in caps else ("calibrated" if calibrated else "this host")
                raise ProgrammingError(
                    f"CREATE MODEL {name}: the offload policy needs {_size(need[tier])} of {tier.upper()} memory "
                    f"(prompt_len {prompt_len}, gen_len {gen_len}), over the {_size(hw.capacity(tier))} available "
                    f"({src})"
                )
        est = estimate(policy, shape, hw, prompt_len, gen_len)
    return {
        "mode": "auto" if mode.strip().lower() == "auto" else "policy",
        "device": device,
        "policy": {f.name: getattr(policy, f.name) for f in fields(Policy)},
        "caps": caps,
        "offload_dir": offload_dir,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "shape": asdict(shape),
        "calibrated": calibrated,
        "estimate": {
            "throughput": est.throughput,
            "prefill_s": est.prefill_s,
            "decode_step_s": est.decode_step_s,
            "gpu_bytes": est.gpu_bytes,
            "cpu_bytes": est.cpu_bytes,
            "disk_bytes": est.disk_bytes,
        },
    }


def _length(opts: dict, key: str, default: int, name: str) -> int:
    v = opts.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < 1:
        raise ProgrammingError(f"CREATE MODEL {name}: {key} must be an integer >= 1, got {shown(v)}")
    return int(v)


def _size(b: float) -> str:
    for unit, f in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= f:
            return f"{b / f:.3g} {unit}"
    return f"{b:.0f} B"


# --------------------------------------------------------------------------------------------------- batches


def policy_of(spec: dict) -> Policy:
    p = dict(spec["policy"])
    for k in _PLACEMENTS:
        p[k] = tuple(p[k])
    return Policy(**p)


def fit_block(policy: Policy, n: int) -> Policy:
    """The policy an engine call of n prompts runs: the same placement, the block shrunk to n when n is smaller
    (the executor fills a short block with copies; shrinking does not move any weight)."""
    if n >= policy.block_size:
        return policy
    gbs = min(policy.gpu_batch_size, max(n, 1))
    return replace(policy, gpu_batch_size=gbs, num_gpu_batches=min(policy.num_gpu_batches, -(-max(n, 1) // gbs)))


def batch_estimate(spec: dict, hw: Hardware, n: int, gen_len: int) -> tuple[Policy, Estimate, float, int]:
    """(block policy, its estimate, predicted tokens/s over n prompts, blocks) for one engine call of n prompts
    generating gen_len tokens each (the catalog's prompt_len)."""
    shape = ModelShape(**spec["shape"])
    pol = fit_block(policy_of(spec), n)
    est = estimate(pol, shape, hw, int(spec["prompt_len"]), max(1, gen_len))
    blocks = max(1, -(-n // pol.block_size))
    return pol, est, n * max(1, gen_len) / (blocks * est.total_s), blocks


def workload_seconds(duck, rec, max_tokens: int) -> tuple[float, float]:
    """For the planner's cost model: (seconds per prompt at a full block, seconds of the smallest engine call: one
    prompt, whose weights still stream through every step)."""
    spec = rec.options["offload"]
    hw, _ = hardware(duck, _device(rec), spec.get("caps", {}), spec.get("offload_dir"))
    full = policy_of(spec).block_size
    _, est_full, _, _ = batch_estimate(spec, hw, full, max_tokens)
    _, est_one, _, _ = batch_estimate(spec, hw, 1, max_tokens)
    return est_full.total_s / full, est_one.total_s


def placed_weight_line(shape: ModelShape, policy: Policy) -> str | None:
    """Weights are placed whole tensors at a time (`policy.unit_tiers`), so a decoder layer's actual GPU / CPU /
    disk shares can differ from the policy's fractions: the shares the placement gives (and the cost model charges),
    or None where they equal the fractions."""
    shares = layer_shares(shape, policy.weights)
    if all(abs(a - b) < 0.005 for a, b in zip(shares, policy.weights, strict=True)):
        return None
    pct = "/".join(f"{round(100 * v):d}" for v in shares)
    return f"weights as placed (whole tensors), % of each decoder layer on GPU/CPU/disk: {pct}"


def _device(rec) -> str:
    return str(rec.options["offload"].get("device") or "cpu")


def explain_lines(
    duck, models, calls: list[tuple[str | None, int]], family: str, batch_rows: float | None
) -> list[str]:
    """EXPLAIN: per offloaded model the statement calls, the policy and the predicted throughput for the batch this
    plan hands the engine (DL-centric: every distinct prompt in one call; UDF-centric: a chunk at most)."""
    from reldl import catalog

    out: list[str] = []
    seen = set()
    for model, max_tokens in calls:
        try:
            rec = catalog.pick_model(models, model)
        except ProgrammingError:
            rec = None
        if rec is None or not rec.options.get("offload") or (rec.name, max_tokens) in seen:
            continue
        seen.add((rec.name, max_tokens))
        spec = rec.options["offload"]
        hw, calibrated = hardware(duck, _device(rec), spec.get("caps", {}), spec.get("offload_dir"))
        policy = policy_of(spec)
        how = "searched (offload = 'auto')" if spec.get("mode") == "auto" else "given"
        hw_note = "calibrated (reldl calibrate)" if calibrated else "uncalibrated: defaults, run reldl calibrate"
        standin = "" if _device(rec).startswith("cuda") else " (on the CPU: the CPU stands in for the GPU)"
        out.append(f"offloaded model {rec.name}: policy {how}; hardware {hw_note}{standin}")
        out.append(f"  {policy.describe()}")
        placed = placed_weight_line(ModelShape(**spec["shape"]), policy)
        if placed:
            out.append(f"  {placed}")
        gen = max_tokens if max_tokens > 0 else int(spec["gen_len"])
        if batch_rows is None:
            n, what = policy.block_size, "a full block"
        elif family == "udf":
            n = max(1, int(min(batch_rows, UDF_CHUNK_ROWS)))
            what = f"a UDF chunk of ~{n} prompts"
        else:
            n = max(1, int(batch_rows))
            what = f"this statement's batch of ~{n} distinct prompts"
        pol, est, thr, blocks = batch_estimate(spec, hw, n, gen)
        out.append(
            f"  predicted throughput: {thr:.4g} tokens/s for {what} ({blocks} block(s) of {pol.block_size}; "
            f"prompt {spec['prompt_len']} tokens assumed, {gen} new tokens); at a full block of {policy.block_size}: "
            f"{batch_estimate(spec, hw, policy.block_size, gen)[2]:.4g} tokens/s"
        )
        out.append(
            f"  memory: GPU {_size(est.gpu_bytes)}, CPU {_size(est.cpu_bytes)}, disk {_size(est.disk_bytes)}; "
            f"prefill {est.prefill_s:.3g} s, decode step {est.decode_step_s:.3g} s per block"
        )
        if family == "udf":
            out.append(
                "  FlexGen's throughput needs big batches: this UDF-centric plan calls the engine once per chunk "
                "(SET reldl_plan = 'dl' hands it every distinct prompt at once)"
            )
        else:
            out.append(
                "  FlexGen's throughput needs big batches: the DL-centric plan hands the engine every distinct "
                "prompt in one call, run as blocks of the policy's size"
            )
    return out
