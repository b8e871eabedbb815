"""Process-wide cache of loaded models, shared by every connection and cursor, with explicit unload."""

from __future__ import annotations

import gc
import json
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from reldl.errors import ProgrammingError
from reldl.llm.engine import Engine
from reldl.llm.loader import inspect_checkpoint, load_tokenizer
from reldl.llm.models import build

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str) -> torch.device:
    device = (device or "auto").lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ProgrammingError(f"unknown device {device!r} (use 'auto', 'cpu' or 'cuda[:N]')") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ProgrammingError(f"device {device!r} requested but no CUDA GPU is available")
    if dev.type not in ("cpu", "cuda"):
        raise ProgrammingError(f"unsupported device {device!r} (use 'auto', 'cpu' or 'cuda[:N]')")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    dtype = (dtype or "auto").lower()
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ProgrammingError(f"unknown dtype {dtype!r} (use 'auto', 'float32', 'bfloat16' or 'float16')")
    return _DTYPES[dtype]


@dataclass(frozen=True)
class EngineKey:
    path: str
    mtime_ns: int  # a checkpoint replaced on disk is a different model
    dtype: str
    device: str


@dataclass(frozen=True)
class OffloadKey:
    """An offloaded model's identity: the checkpoint, its policy and offload directory (4-bit policies give other
    text, so the SQL functions' result cache must not share results with the dense model)."""

    engine: EngineKey
    policy: str  # the policy's fields as sorted JSON
    offload_dir: str | None


_engines: dict[EngineKey, dict[tuple, Engine]] = {}  # loaded checkpoint -> engines by their options
_offloaded: dict[OffloadKey, object] = {}  # offloaded models (reldl/llm/offload/adapter.py OffloadedLLM)
_names: dict[str, set] = {}  # model name -> EngineKeys and OffloadKeys loaded under it
_lock = threading.Lock()


def engine_key(path: str, dtype: str = "auto", device: str = "auto") -> EngineKey:
    """A checkpoint's identity. A sparse variant (a directory with sparse.json, reldl/llm/sparse) is keyed by its own
    directory, so the dense and the sparse engines of one checkpoint are different entries and coexist."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    p = Path(path).expanduser().resolve()
    cfg = p / "config.json"
    mtime = max((f.stat().st_mtime_ns for f in p.glob("*.safetensors")), default=0)
    mtime = max(mtime, cfg.stat().st_mtime_ns if cfg.exists() else 0)
    return EngineKey(str(p), mtime, str(dt).removeprefix("torch."), str(dev))


def _sparse_model(key: EngineKey):
    """The model and tokenizer of a sparse variant: its MLPs swapped over the base checkpoint's model, which is
    shared with the dense engine when that is loaded (else loaded for the variant alone)."""
    from reldl.llm.sparse import variant

    spec = variant.read_spec(key.path)
    base_path = spec["base_path"]
    if variant.base_mtime_ns(base_path) != spec["base_mtime_ns"]:
        raise ProgrammingError(
            f"sparse model at {key.path}: its base checkpoint {base_path} changed since calibration "
            "(run its CREATE OR REPLACE MODEL ... AS SELECT again)"
        )
    base_key = engine_key(base_path, key.dtype, key.device)
    loaded_base = _engines.get(base_key)
    if loaded_base:
        eng = next(iter(loaded_base.values()))
        model, tokenizer = eng.model, eng.tokenizer
    else:
        ckpt = inspect_checkpoint(base_path)
        model = build(ckpt, torch.device(key.device), getattr(torch, key.dtype))
        tokenizer = load_tokenizer(ckpt)
    return variant.build_variant(model, key.path, spec), tokenizer


def get_engine(name: str, path: str, dtype: str = "auto", device: str = "auto", **engine_options) -> Engine:
    """Load (once per process) and return the engine for a registered model. Engines with other options
    (max_batch, cache_tokens, ...) share the loaded weights."""
    key = engine_key(path, dtype, device)
    opts = tuple(sorted(engine_options.items()))
    with _lock:
        engines = _engines.setdefault(key, {})
        eng = engines.get(opts)
        if eng is None:
            if engines:
                base = next(iter(engines.values()))
                model, tokenizer = base.model, base.tokenizer
            elif (Path(key.path) / "sparse.json").is_file():
                try:
                    model, tokenizer = _sparse_model(key)
                except BaseException:
                    del _engines[key]
                    raise
            else:
                ckpt = inspect_checkpoint(key.path)
                model = build(ckpt, torch.device(key.device), getattr(torch, key.dtype))
                tokenizer = load_tokenizer(ckpt)
            dev, dt = torch.device(key.device), getattr(torch, key.dtype)
            try:
                eng = engines[opts] = Engine(model, tokenizer, device=dev, dtype=dt, **engine_options)
            finally:
                if not engines:
                    del _engines[key]
        _names.setdefault(name, set()).add(key)
        return eng


def model_engine(rec) -> tuple[EngineKey | OffloadKey, object]:
    """(identity for result caches, engine) of a catalog record (reldl.catalog.ModelRecord): an `OffloadedLLM` when
    its options hold "offload" (CREATE MODEL ... offload = ...), else `get_engine`'s Engine."""
    spec = rec.options.get("offload")
    if not spec:
        return engine_key(rec.path, rec.dtype, rec.device), get_engine(rec.name, rec.path, rec.dtype, rec.device)
    from reldl.llm.offload.adapter import OffloadedLLM
    from reldl.llm.offload.sql import policy_of

    key = OffloadKey(
        engine_key(rec.path, rec.dtype, rec.device), json.dumps(spec["policy"], sort_keys=True), spec.get("offload_dir")
    )
    with _lock:
        eng = _offloaded.get(key)
        if eng is None:
            dev = torch.device(key.engine.device)
            eng = _offloaded[key] = OffloadedLLM(
                rec.name,
                key.engine.path,
                policy_of(spec),
                dev,
                getattr(torch, key.engine.dtype),
                spec.get("offload_dir"),
            )
            _remove_spill_dir_at_exit(eng)
        _names.setdefault(rec.name, set()).add(key)
    return key, eng


def _remove_spill_dir_at_exit(eng) -> None:
    """An offloaded model given no offload_dir spills into a temporary directory of its own, which `unload` (DROP
    MODEL, OR REPLACE) removes by closing the engine. One still loaded when the process exits, or dropped unclosed,
    would stay in the temp folder for good: it is removed then (by the process that made it, not a forked child)."""
    disk = eng.engine.disk
    if disk.owned:  # (the pool makes its directory with its first file, if ever: looked up at exit)
        weakref.finalize(eng, _close_pool, disk, os.getpid())


def _close_pool(disk, pid: int) -> None:
    if os.getpid() == pid:
        disk.close()


def unload(name: str | None = None) -> int:
    """Free the memory of a model loaded under `name` (all models when None). Returns how many were unloaded."""
    with _lock:
        if name is None:
            keys = set(_engines) | set(_offloaded)
            _names.clear()
        else:
            keys = _names.pop(name, set())
        count = sum(_engines.pop(k, None) is not None for k in keys if isinstance(k, EngineKey))
        closing = [e for e in (_offloaded.pop(k, None) for k in keys if isinstance(k, OffloadKey)) if e is not None]
    for eng in closing:
        eng.close()
    count += len(closing)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return count


def loaded() -> list[EngineKey]:
    with _lock:
        return list(_engines)
