"""Broken checkpoints are refused with a one-line CheckpointError naming the file and the problem."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import checkpoints as ck  # noqa: E402  (tests/ is put on sys.path by tests/conftest.py)
from safetensors import safe_open  # noqa: E402

from reldl import registry  # noqa: E402
from reldl.errors import CheckpointError, OperationalError  # noqa: E402
from reldl.llm.loader import inspect_checkpoint  # noqa: E402

FAMILIES = ("llama", "opt", "gpt2")  # one per engine family module


def _error(path) -> str:
    """The message of the CheckpointError raised for `path`, checked to be a single line."""
    with pytest.raises(CheckpointError) as info:
        inspect_checkpoint(path)
    msg = str(info.value)
    assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
    assert isinstance(info.value, OperationalError)  # PEP 249 placement
    # the registry (what CREATE MODEL / llm_generate use) refuses it the same way
    with pytest.raises(CheckpointError) as via_registry:
        registry.get_engine("test_loader_bad", str(path), dtype="float32", device="cpu")
    assert str(via_registry.value) == msg
    return msg


def test_good_checkpoints_pass(tiny_checkpoints):
    for family in FAMILIES:
        ckpt = inspect_checkpoint(tiny_checkpoints(family))
        assert ckpt.config.vocab_size == ck.VOCAB_SIZE
        assert ckpt.tokenizer_file.name == "tokenizer.json"


@pytest.mark.parametrize("family", FAMILIES)
def test_pickle_only(tiny_checkpoints, tmp_path, family):
    bad = ck.make_pickle_only(tiny_checkpoints(family), tmp_path / "pickle_only")
    msg = _error(bad)
    assert str(bad) in msg
    assert "pytorch_model.bin" in msg
    assert "safetensors only" in msg  # what reldl accepts ...
    assert "arbitrary code" in msg  # ... and why


@pytest.mark.parametrize("family", FAMILIES)
def test_missing_tokenizer(tiny_checkpoints, tmp_path, family):
    bad = ck.make_missing_tokenizer(tiny_checkpoints(family), tmp_path / "no_tokenizer")
    msg = _error(bad)
    assert str(bad / "tokenizer.json") in msg
    assert "missing" in msg


@pytest.mark.parametrize("family", FAMILIES)
def test_missing_config(tiny_checkpoints, tmp_path, family):
    bad = ck.make_missing_config(tiny_checkpoints(family), tmp_path / "no_config")
    msg = _error(bad)
    assert str(bad / "config.json") in msg
    assert "missing" in msg


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sharded", [False, True])
def test_truncated_safetensors(tiny_checkpoints, tmp_path, family, sharded):
    bad = ck.make_truncated_safetensors(tiny_checkpoints(family, sharded=sharded), tmp_path / "truncated")
    first = sorted(bad.glob("*.safetensors"))[0]
    msg = _error(bad)
    assert str(first) in msg
    assert "truncated" in msg


@pytest.mark.parametrize("family", FAMILIES)
def test_corrupt_header(tiny_checkpoints, tmp_path, family):
    bad = ck.make_corrupt_header(tiny_checkpoints(family), tmp_path / "corrupt")
    msg = _error(bad)
    assert str(bad / "model.safetensors") in msg
    assert "corrupt" in msg and "header" in msg


@pytest.mark.parametrize("family", FAMILIES)
def test_shape_mismatch(tiny_checkpoints, tmp_path, family):
    bad = ck.make_shape_mismatch(tiny_checkpoints(family), tmp_path / "shape")
    msg = _error(bad)
    assert str(bad / "model.safetensors") in msg
    # the message names a weight (quoted) that really is stored with the first shape it quotes
    name = msg.split("weight '", 1)[1].split("'", 1)[0]
    with safe_open(str(bad / "model.safetensors"), "pt") as fh:
        stored = list(fh.get_slice(name).get_shape())
    config = json.loads((bad / "config.json").read_text())
    width = config.get("intermediate_size") or config.get("ffn_dim") or config.get("n_inner")
    implied = [width if d == width - 32 else d for d in stored]
    assert implied != stored
    assert f"shape {stored}" in msg
    assert f"implies {implied}" in msg


@pytest.mark.parametrize("family", FAMILIES)
def test_unknown_architecture(tiny_checkpoints, tmp_path, family):
    bad = ck.make_unknown_architecture(tiny_checkpoints(family), tmp_path / "fancy")
    msg = _error(bad)
    assert str(bad / "config.json") in msg
    assert "'fancy'" in msg
    assert "unsupported architecture" in msg
    assert "FancyNewForCausalLM" in msg


def test_missing_directory(tmp_path):
    missing = tmp_path / "no" / "such" / "checkpoint"
    msg = _error(missing)
    assert str(missing) in msg
    assert "does not exist" in msg


def test_file_instead_of_directory(llama_path, tmp_path):
    for f in (llama_path / "model.safetensors", llama_path / "config.json"):
        msg = _error(f)
        assert str(f) in msg
        assert "not a directory" in msg


def test_index_naming_a_missing_shard(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints("llama", sharded=True)
    bad = ck.make_missing_config(src, tmp_path / "shards")  # a copy; put config.json back
    (bad / "config.json").write_text((src / "config.json").read_text())
    shard = sorted(bad.glob("model-*.safetensors"))[-1]
    shard.unlink()
    msg = _error(bad)
    assert str(shard) in msg
    assert "missing" in msg
