"""Process-wide cache of loaded models, shared by every connection and cursor, with explicit unload."""

from __future__ import annotations

import gc
import threading
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


_engines: dict[EngineKey, dict[tuple, Engine]] = {}  # loaded checkpoint -> engines by their options
_names: dict[str, set[EngineKey]] = {}
_lock = threading.Lock()


def engine_key(path: str, dtype: str = "auto", device: str = "auto") -> EngineKey:
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    p = Path(path).expanduser().resolve()
    cfg = p / "config.json"
    mtime = max((f.stat().st_mtime_ns for f in p.glob("*.safetensors")), default=0)
    mtime = max(mtime, cfg.stat().st_mtime_ns if cfg.exists() else 0)
    return EngineKey(str(p), mtime, str(dt).removeprefix("torch."), str(dev))


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


def unload(name: str | None = None) -> int:
    """Free the memory of a model loaded under `name` (all models when None). Returns how many were unloaded."""
    with _lock:
        if name is None:
            keys = set(_engines)
            _names.clear()
        else:
            keys = _names.pop(name, set())
        count = sum(_engines.pop(k, None) is not None for k in keys)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return count


def loaded() -> list[EngineKey]:
    with _lock:
        return list(_engines)
