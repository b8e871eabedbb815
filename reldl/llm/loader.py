"""Checkpoint directory -> config, validated safetensors weights and tokenizer. Never unpickles."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from reldl.errors import CheckpointError
from reldl.llm.config import ModelConfig, parse_config

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_DTYPES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


@dataclass
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    tensors: dict[str, TensorInfo]
    tokenizer_file: Path


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors file's header without reading its data."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100_000_000):
                raise CheckpointError(f"{file}: corrupted safetensors header (claims {n} bytes)")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{file}: corrupted safetensors header ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupted safetensors header")
    out: dict[str, TensorInfo] = {}
    data_size = size - 8 - n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: corrupted safetensors header entry {name!r}") from None
        if dtype not in _DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {dtype}")
        numel = 1
        for d in shape:
            numel *= d
        if end - start != numel * _DTYPES[dtype] or start < 0:
            raise CheckpointError(f"{file}: corrupted safetensors header for tensor {name!r}")
        if end > data_size:
            raise CheckpointError(
                f"{file}: truncated safetensors file (tensor {name!r} ends at byte {end}, file holds {data_size})"
            )
        out[name] = TensorInfo(file, dtype, shape)
    return out


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a valid safetensors index") from None
        files = [path / n for n in names]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in {index.name} is missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(
            f"{path}: only pickle weights ({', '.join(sorted(pickles))}); reldl loads safetensors only, "
            "because unpickling can run arbitrary code: convert with save_pretrained(safe_serialization=True)"
        )
    raise CheckpointError(f"{path}: no *.safetensors weights found")


def inspect_checkpoint(path: str | Path) -> Checkpoint:
    """Validate a checkpoint directory cheaply (headers only): used by CREATE MODEL and before loading."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (a checkpoint is a directory)")
    config = parse_config(path)
    tok = path / "tokenizer.json"
    if not tok.is_file():
        raise CheckpointError(f"{tok}: missing tokenizer.json")
    tensors: dict[str, TensorInfo] = {}
    for f in _weight_files(path):
        tensors.update(read_safetensors_header(f))
    from reldl.llm.models import expected_shapes

    expected = expected_shapes(config)
    for name, shape in expected.items():
        info = tensors.get(resolve(tensors, name))
        if info is None:
            if name.endswith("lm_head.weight") and config.tie_word_embeddings:
                continue
            raise CheckpointError(f"{path}: weight {name!r} missing from the safetensors files")
        if tuple(info.shape) != tuple(shape):
            raise CheckpointError(
                f"{info.file}: weight {name!r} has shape {list(info.shape)} but config.json implies {list(shape)}"
            )
    return Checkpoint(path, config, tensors, tok)


def resolve(tensors: dict[str, TensorInfo], name: str) -> str:
    """Hugging Face name -> name in the files; older checkpoints omit the `model.`/`transformer.` prefix."""
    if name in tensors:
        return name
    head, _, rest = name.partition(".")
    if head in ("model", "transformer") and rest in tensors:
        return rest
    return name


class TensorReader:
    """Reads tensors by Hugging Face name from the memory-mapped safetensors files, one handle per file."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype):
        self.ckpt, self.dtype = ckpt, dtype
        self._handles: dict[Path, object] = {}

    def __call__(self, name: str) -> torch.Tensor:
        key = resolve(self.ckpt.tensors, name)
        info = self.ckpt.tensors.get(key)
        if info is None:
            raise CheckpointError(f"{self.ckpt.path}: weight {name!r} missing from the safetensors files")
        try:
            handle = self._handles.get(info.file)
            if handle is None:
                handle = self._handles[info.file] = safe_open(str(info.file), framework="pt")
            return handle.get_tensor(key).to(self.dtype)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{info.file}: cannot read weight {key!r} ({type(e).__name__}: {e})") from None


def load_tokenizer(ckpt: Checkpoint) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(ckpt.tokenizer_file))
    except Exception as e:
        raise CheckpointError(f"{ckpt.tokenizer_file}: cannot load tokenizer ({e})") from None
