"""Sanity tests for the tiny-checkpoint builders in ``tests/checkpoints.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402

try:  # tests/ is on sys.path (pytest's default "prepend" import mode, no tests/__init__.py)
    import checkpoints as ck
except ImportError:  # pragma: no cover - if tests/ ever becomes a package
    from tests import checkpoints as ck

PROMPTS = ("The phone is really", "Order #1234 shipped on")


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """``build(family, sharded=False)`` -> checkpoint dir, built once per module."""
    cache: dict[tuple[str, bool], Path] = {}
    root = tmp_path_factory.mktemp("ckpts")

    def _build(family: str, sharded: bool = False) -> Path:
        key = (family, sharded)
        if key not in cache:
            cache[key] = ck.make_checkpoint(root / f"{family}{'_sharded' if sharded else ''}", family, sharded=sharded)
        return cache[key]

    return _build


@pytest.fixture(scope="module")
def reference(build):
    cache: dict[str, object] = {}

    def _ref(family: str):
        if family not in cache:
            cache[family] = ck.load_reference(build(family))
        return cache[family]

    return _ref


def _tensor_shapes(d: Path) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                shapes[k] = tuple(fh.get_slice(k).get_shape())
    return shapes


def _encode(d: Path, text: str) -> list[int]:
    return ck.load_reference_tokenizer(d).encode(text).ids


@pytest.mark.parametrize("family", ck.FAMILIES)
def test_family_builds_loads_and_gives_finite_logits(build, reference, family):
    d = build(family)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (d / name).is_file(), name
    assert not (d / "pytorch_model.bin").exists()
    config = json.loads((d / "config.json").read_text())
    ids = ck.special_token_ids(family)
    assert config["vocab_size"] == ck.VOCAB_SIZE == ck.load_reference_tokenizer(d).get_vocab_size()
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        ids["bos"],
        ids["eos"],
        ids["pad"],
    )
    model = reference(family)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    x = torch.tensor([_encode(d, PROMPTS[0])])
    with torch.no_grad():
        logits = model(x).logits
    assert logits.shape == (1, x.shape[1], ck.VOCAB_SIZE)
    assert torch.isfinite(logits).all()
    assert logits[0, -1].std() > 0.5  # not near-uniform


@pytest.mark.parametrize("family", ck.FAMILIES)
def test_greedy_generation_is_not_degenerate(build, reference, family):
    d = build(family)
    model = reference(family)
    outs = []
    for prompt in PROMPTS:
        x = torch.tensor([_encode(d, prompt)])
        with torch.no_grad():
            g = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=8,
                do_sample=False,
                pad_token_id=ck.special_token_ids(family)["pad"],
            )
        new = g[0, x.shape[1] :].tolist()
        assert len(new) == 8  # special tokens are suppressed, so no early EOS
        outs.append(new)
    assert outs[0] != outs[1]


@pytest.mark.parametrize("kind", ck.TOKENIZER_KINDS)
def test_tokenizer_round_trip_and_specials(build, kind):
    d = build(kind)
    tok = ck.load_reference_tokenizer(d)
    ids = ck.special_token_ids(kind)
    text = 'Rating: 5/5 - great phone!\nIt broke after 12 days... "naïve" café 😀  tabs\tand  spaces'
    enc = tok.encode(text).ids
    assert tok.decode(enc, skip_special_tokens=True) == text
    if kind == "gpt2":
        assert enc[0] != ids["bos"]  # GPT-2 adds no BOS
        assert tok.token_to_id("<|endoftext|>") == ck.VOCAB_SIZE - 1
        assert ids["bos"] == ids["eos"] == ids["pad"] == ck.VOCAB_SIZE - 1
    else:
        assert enc[0] == ids["bos"]
        assert enc.count(ids["bos"]) == 1
    if kind == "llama":
        assert (tok.token_to_id("<pad>"), tok.token_to_id("<s>"), tok.token_to_id("</s>")) == (0, 1, 2)
        assert ids == {"bos": 1, "eos": 2, "pad": 0, "unk": None}
    if kind == "opt":
        assert ids == {"bos": 2, "eos": 2, "pad": 1, "unk": 3}
    # BPE actually merged something (vocab 512 = 256 bytes + specials + ~250 merges).
    sample = "Order #1234 shipped on 12/5/2021. The seller is great."
    assert len(tok.encode(sample).ids) < 0.7 * len(sample)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == tok.id_to_token(ids["bos"])


def test_tokenizer_is_deterministic(tmp_path):
    for kind in ck.TOKENIZER_KINDS:
        a = ck.train_tokenizer(tmp_path / "a" / kind, family=kind)
        b = ck.train_tokenizer(tmp_path / "b" / kind, family=kind)
        assert a.name == "tokenizer.json"
        assert a.read_bytes() == b.read_bytes()


def test_transformers_autotokenizer_agrees(build):
    from transformers import AutoTokenizer

    for kind in ck.TOKENIZER_KINDS:
        d = build(kind)
        hf = AutoTokenizer.from_pretrained(str(d))
        assert hf(PROMPTS[1])["input_ids"] == _encode(d, PROMPTS[1])
        assert hf.bos_token_id == ck.special_token_ids(kind)["bos"]


def test_same_seed_same_weights_different_seed_different(tmp_path, build):
    from safetensors.torch import load_file

    a = load_file(str(build("llama") / "model.safetensors"))
    b = load_file(str(ck.make_checkpoint(tmp_path / "same", "llama") / "model.safetensors"))
    c = load_file(str(ck.make_checkpoint(tmp_path / "other", "llama", seed=1) / "model.safetensors"))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    # Families never share weights, even with identical shapes (llama vs mistral).
    m = load_file(str(build("mistral") / "model.safetensors"))
    assert not torch.equal(a["model.embed_tokens.weight"], m["model.embed_tokens.weight"])


def test_config_overrides(tmp_path):
    d = ck.make_checkpoint(tmp_path / "deep", "llama", num_hidden_layers=3)
    assert json.loads((d / "config.json").read_text())["num_hidden_layers"] == 3
    assert "model.layers.2.mlp.up_proj.weight" in _tensor_shapes(d)


@pytest.mark.parametrize(
    "family, rope_type, extra",
    [
        ("llama", "default", {}),
        (
            "llama_rope_llama3",
            "llama3",
            {
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        ("llama_rope_linear", "linear", {"factor": 2.0}),
    ],
)
def test_rope_config(build, family, rope_type, extra):
    config = json.loads((build(family) / "config.json").read_text())
    rope = config["rope_parameters"]
    assert rope["rope_type"] == rope_type
    assert rope["rope_theta"] == 10000.0
    for k, v in extra.items():
        assert rope[k] == v


def test_family_specific_weights(build):
    llama = _tensor_shapes(build("llama"))
    assert llama["model.layers.0.self_attn.k_proj.weight"] == (32, 64)  # GQA: 2 kv heads x 16
    assert "lm_head.weight" in llama  # untied
    assert not any(k.endswith(".bias") for k in llama)

    qwen = _tensor_shapes(build("qwen2"))
    assert qwen["model.layers.0.self_attn.q_proj.bias"] == (64,)
    assert qwen["model.layers.0.self_attn.k_proj.bias"] == (32,)
    assert "model.layers.0.self_attn.o_proj.bias" not in qwen
    assert "lm_head.weight" not in qwen  # tied

    opt = _tensor_shapes(build("opt"))
    assert opt["model.decoder.embed_positions.weight"] == (256 + 2, 64)  # OPT's position offset of 2
    assert "model.decoder.final_layer_norm.weight" in opt
    assert not any("project_" in k for k in opt)

    proj = _tensor_shapes(build("opt_project"))
    assert proj["model.decoder.embed_tokens.weight"] == (ck.VOCAB_SIZE, 32)
    assert proj["model.decoder.project_in.weight"] == (64, 32)
    assert proj["model.decoder.project_out.weight"] == (32, 64)
    assert "model.decoder.final_layer_norm.weight" not in proj
    assert json.loads((build("opt_project") / "config.json").read_text())["do_layer_norm_before"] is False

    gpt2 = _tensor_shapes(build("gpt2"))
    assert gpt2["transformer.h.0.mlp.c_fc.weight"] == (64, 256)  # Conv1D: (in, out); n_inner=None -> 4*64
    assert gpt2["transformer.wpe.weight"] == (256, 64)
    assert "lm_head.weight" not in gpt2


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sharded_checkpoint(build, reference, family):
    d = build(family, sharded=True)
    assert not (d / "model.safetensors").exists()
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(d.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert _tensor_shapes(d) == _tensor_shapes(build(family))
    x = torch.tensor([_encode(d, PROMPTS[0])])
    with torch.no_grad():
        assert torch.equal(ck.load_reference(d)(x).logits, reference(family)(x).logits)


def test_bad_builders(build, tmp_path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    good = build("llama")
    good_st = good / "model.safetensors"

    d = ck.make_pickle_only(good, tmp_path / "pickle")
    assert (d / "pytorch_model.bin").is_file()
    assert not list(d.glob("*.safetensors")) and not list(d.glob("*.index.json"))
    state = torch.load(d / "pytorch_model.bin", weights_only=True)
    assert state.keys() == load_file(str(good_st)).keys()
    assert (good_st).is_file()  # the source is untouched

    d = ck.make_missing_tokenizer(good, tmp_path / "notok")
    assert not (d / "tokenizer.json").exists() and (d / "model.safetensors").is_file()

    d = ck.make_missing_config(good, tmp_path / "nocfg")
    assert not (d / "config.json").exists() and (d / "tokenizer.json").is_file()

    d = ck.make_truncated_safetensors(good, tmp_path / "trunc")
    assert (d / "model.safetensors").stat().st_size == good_st.stat().st_size // 2
    with pytest.raises(SafetensorError):
        load_file(str(d / "model.safetensors"))

    d = ck.make_corrupt_header(good, tmp_path / "header")
    assert (d / "model.safetensors").stat().st_size == good_st.stat().st_size
    with pytest.raises(SafetensorError):
        load_file(str(d / "model.safetensors"))

    for family, key in (("llama", "intermediate_size"), ("opt", "ffn_dim"), ("gpt2", "n_inner")):
        d = ck.make_shape_mismatch(build(family), tmp_path / f"shape_{family}")
        before = json.loads((build(family) / "config.json").read_text())
        after = json.loads((d / "config.json").read_text())
        assert after[key] not in (before[key], None)
        with pytest.raises(RuntimeError, match="mismatch|size"):
            ck.load_reference(d)

    d = ck.make_unknown_architecture(good, tmp_path / "fancy")
    config = json.loads((d / "config.json").read_text())
    assert config["architectures"] == ["FancyNewForCausalLM"] and config["model_type"] == "fancy"
    assert json.loads((good / "config.json").read_text())["model_type"] == "llama"
