"""Builders for tiny random Hugging Face-format checkpoints used by the test-suite.

Everything here is deterministic and offline: tokenizers are trained on a synthetic corpus generated
in code, and models are built from config classes with seeded random weights.  The resulting
directories look like real hub checkpoints (``config.json``, ``*.safetensors`` [+ index],
``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``) so they can be fed to the
engine's loader, while :func:`load_reference` gives the transformers implementation to compare with.

The helpers intentionally do not import pytest; session fixtures in ``conftest.py`` call them.
"""

from __future__ import annotations

import json
import random
import shutil
import zlib
from pathlib import Path
from typing import Any

__all__ = [
    "FAMILIES",
    "TOKENIZER_KINDS",
    "VOCAB_SIZE",
    "corpus_sentences",
    "tokenizer_kind",
    "special_token_ids",
    "train_tokenizer",
    "make_checkpoint",
    "load_reference",
    "load_reference_tokenizer",
    "make_pickle_only",
    "make_missing_tokenizer",
    "make_missing_config",
    "make_truncated_safetensors",
    "make_corrupt_header",
    "make_shape_mismatch",
    "make_unknown_architecture",
]

VOCAB_SIZE = 512

#: Model families supported by :func:`make_checkpoint`.
FAMILIES = (
    "llama",
    "llama_rope_llama3",
    "llama_rope_linear",
    "mistral",
    "qwen2",
    "opt",
    "opt_project",
    "gpt2",
)

#: Tokenizer flavours (special tokens / post-processing) supported by :func:`train_tokenizer`.
TOKENIZER_KINDS = ("llama", "gpt2", "opt")

_FAMILY_TOKENIZER = {
    "llama": "llama",
    "llama_rope_llama3": "llama",
    "llama_rope_linear": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "opt": "opt",
    "opt_project": "opt",
    "gpt2": "gpt2",
}

# Special tokens in id order for the flavours trained with special tokens up front.
# llama-like: <pad>=0, <s>=1 (BOS), </s>=2 (EOS)   -- BOS/EOS ids match real Llama/Mistral.
# opt:        <s>=0, <pad>=1, </s>=2 (BOS and EOS), <unk>=3 -- same layout as facebook/opt-*.
# gpt2:       <|endoftext|> appended *last* (id VOCAB_SIZE - 1), like GPT-2's 50256.
_SPECIALS = {
    "llama": ["<pad>", "<s>", "</s>"],
    "opt": ["<s>", "<pad>", "</s>", "<unk>"],
    "gpt2": [],
}
_ROLES = {
    "llama": {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": None},
    "opt": {"bos": "</s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"},
    "gpt2": {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<|endoftext|>", "unk": "<|endoftext|>"},
}

# --------------------------------------------------------------------------------------------------
# Synthetic corpus
# --------------------------------------------------------------------------------------------------

_ADJ = (
    "great good bad terrible excellent cheap expensive solid flimsy sturdy light heavy quiet loud fast slow "
    "bright dull comfortable awkward reliable broken perfect decent average amazing awful useful handy "
    "small large tiny huge soft hard smooth rough warm cold clean dirty simple complex"
).split()
_NOUN = (
    "product phone laptop charger cable battery screen keyboard mouse headset speaker camera lens bag "
    "bottle kettle blender toaster chair desk lamp jacket shoe sock shirt book pen notebook watch clock "
    "printer router monitor tablet case cover strap box package delivery seller price quality design "
    "color size sound picture handle button"
).split()
_VERB = (
    "works broke arrived failed charges fits feels looks sounds lasts stopped started shipped returned "
    "improved heated cooled cracked folded cleaned"
).split()
_ADV = "really very quite pretty super extremely slightly barely totally almost".split()
_NAMES = "Alice Bob Carol Dave Erin Frank Grace Heidi Ivan Judy Mallory Oscar Peggy Trent Victor Walter".split()
_CITIES = "Paris London Berlin Tokyo Madrid Rome Oslo Vienna Dublin Prague Lisbon Boston Seattle Denver".split()
_OPENERS = (
    "I think",
    "Honestly,",
    "Overall",
    "To be fair,",
    "In my opinion",
    "After a week",
    "After two months",
    "Sadly",
    "Luckily",
    "Update:",
)
_PUNCT = (".", ".", ".", "!", "?", "...", "!!")


def corpus_sentences(n: int = 4000, seed: int = 1234) -> list[str]:
    """Deterministic English-ish corpus: product reviews, numbers, punctuation and newlines."""
    rng = random.Random(seed)
    out: list[str] = []
    for i in range(n):
        kind = i % 8
        adj, adj2 = rng.choice(_ADJ), rng.choice(_ADJ)
        noun, noun2 = rng.choice(_NOUN), rng.choice(_NOUN)
        punct = rng.choice(_PUNCT)
        if kind == 0:
            s = f"The {noun} is {rng.choice(_ADV)} {adj}{punct}"
        elif kind == 1:
            s = f"{rng.choice(_OPENERS)} this {noun} {rng.choice(_VERB)} {rng.choice(_ADV)} well{punct}"
        elif kind == 2:
            s = f"Rating: {rng.randint(1, 5)}/5 - {adj.capitalize()} {noun}, {adj2} {noun2}{punct}"
        elif kind == 3:
            s = (
                f"{rng.choice(_NAMES)} bought {rng.randint(1, 12)} {noun}s for ${rng.randint(2, 999)}."
                f"{rng.randint(0, 99):02d} in {rng.choice(_CITIES)}{punct}"
            )
        elif kind == 4:
            s = f"It {rng.choice(_VERB)} after {rng.randint(2, 90)} days; the {noun2} was {adj}.\n"
        elif kind == 5:
            s = (
                f"Order #{rng.randint(1000, 99999)} shipped on {rng.randint(1, 28)}/"
                f"{rng.randint(1, 12)}/20{rng.randint(10, 29)}."
            )
        elif kind == 6:
            s = f"Q: Is the {noun} {adj}?\nA: {rng.choice(['Yes', 'No', 'Maybe'])}, it is {adj2}{punct}"
        else:
            s = (
                f'"{adj.capitalize()} {noun}!" said {rng.choice(_NAMES)}. '
                f"{rng.randint(1, 100)}% of buyers agree (n={rng.randint(10, 5000)})."
            )
        out.append(s)
    return out


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def tokenizer_kind(family: str) -> str:
    """Map a model family (or tokenizer flavour) to a tokenizer flavour: ``llama``, ``gpt2`` or ``opt``."""
    if family in TOKENIZER_KINDS:
        return family
    try:
        return _FAMILY_TOKENIZER[family]
    except KeyError:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}") from None


def special_token_ids(family: str) -> dict[str, int | None]:
    """Ids of ``bos``/``eos``/``pad``/``unk`` for a family's tokenizer (unk is None for llama-like)."""
    kind = tokenizer_kind(family)
    specials = list(_SPECIALS[kind]) if kind != "gpt2" else []
    ids = {tok: i for i, tok in enumerate(specials)}
    if kind == "gpt2":
        ids["<|endoftext|>"] = VOCAB_SIZE - 1
    return {role: (ids[tok] if tok is not None else None) for role, tok in _ROLES[kind].items()}


def _all_special_ids(family: str) -> list[int]:
    kind = tokenizer_kind(family)
    return [VOCAB_SIZE - 1] if kind == "gpt2" else list(range(len(_SPECIALS[kind])))


def _build_tokenizer(kind: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = _SPECIALS[kind]
    n_trained = VOCAB_SIZE - (1 if kind == "gpt2" else 0)
    trainer = trainers.BpeTrainer(
        vocab_size=n_trained,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_sentences(), trainer=trainer)
    if kind == "gpt2":
        # GPT-2 keeps <|endoftext|> as the very last id and has no post-processor (no BOS added).
        tok.add_special_tokens(["<|endoftext|>"])
    else:
        bos = _ROLES[kind]["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, tok.token_to_id(bos))],
        )
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"trained vocab has {tok.get_vocab_size()} tokens, expected {VOCAB_SIZE}")
    return tok


def train_tokenizer(out_dir: Path, *, family: str) -> Path:
    """Train a byte-level BPE (vocab 512) for ``family`` and save it into ``out_dir``.

    Writes ``tokenizer.json`` plus ``tokenizer_config.json`` and ``special_tokens_map.json``.
    Returns the path to ``tokenizer.json``.  Output bytes are identical across runs.
    """
    kind = tokenizer_kind(family)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _build_tokenizer(kind)
    path = out_dir / "tokenizer.json"
    path.write_text(tok.to_str(pretty=True), encoding="utf-8")

    roles = _ROLES[kind]
    special_map = {f"{role}_token": t for role, t in roles.items() if t is not None}
    added_decoder = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in (_SPECIALS[kind] or ["<|endoftext|>"])
    }
    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": kind != "gpt2",
        "add_eos_token": False,
        "added_tokens_decoder": added_decoder,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
        **special_map,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, sort_keys=True) + "\n")
    return path


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

_TINY = dict(hidden=64, layers=2, heads=4, intermediate=128, positions=256)


def _make_config(family: str, overrides: dict[str, Any]):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    ids = special_token_ids(family)
    tokens = dict(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    llama_like = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=_TINY["hidden"],
        intermediate_size=_TINY["intermediate"],
        num_hidden_layers=_TINY["layers"],
        num_attention_heads=_TINY["heads"],
        num_key_value_heads=2,
        max_position_embeddings=_TINY["positions"],
        rms_norm_eps=1e-6,
        **tokens,
    )
    if family in ("llama", "llama_rope_llama3", "llama_rope_linear"):
        kw = dict(llama_like, tie_word_embeddings=False)
        if family == "llama_rope_llama3":
            kw["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        elif family == "llama_rope_linear":
            kw["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
        cls = LlamaConfig
    elif family == "mistral":
        kw = dict(llama_like, sliding_window=4096, tie_word_embeddings=False)
        cls = MistralConfig
    elif family == "qwen2":
        kw = dict(llama_like, tie_word_embeddings=True, use_sliding_window=False)
        cls = Qwen2Config
    elif family in ("opt", "opt_project"):
        kw = dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=_TINY["hidden"],
            ffn_dim=_TINY["intermediate"],
            num_hidden_layers=_TINY["layers"],
            num_attention_heads=_TINY["heads"],
            max_position_embeddings=_TINY["positions"],
            word_embed_proj_dim=_TINY["hidden"],
            do_layer_norm_before=True,
            tie_word_embeddings=True,
            **tokens,
        )
        if family == "opt_project":
            # facebook/opt-350m style: projected embeddings + post-layer-norm (no final layer norm).
            kw.update(word_embed_proj_dim=32, do_layer_norm_before=False)
        cls = OPTConfig
    elif family == "gpt2":
        kw = dict(
            vocab_size=VOCAB_SIZE,
            n_embd=_TINY["hidden"],
            n_layer=_TINY["layers"],
            n_head=_TINY["heads"],
            n_positions=_TINY["positions"],
            tie_word_embeddings=True,
            **tokens,
        )
        cls = GPT2Config
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    kw.update(overrides)
    return cls(**kw)


def _randomize_(model, seed: int, family: str, suppress_special_ids: list[int]) -> None:
    """Re-initialise weights with a large std so logits are peaky and greedy decoding varies by prompt.

    The generator is seeded from ``(seed, family)`` so different families never share weights.  Rows of
    the output embedding for ``suppress_special_ids`` are scaled down so their logits sit near 0, well
    below the typical top logit: greedy decoding then (practically) never emits BOS/EOS/pad.
    """
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(family.encode()))
    seen: set[int] = set()
    with torch.no_grad():
        for name, p in model.named_parameters(remove_duplicate=True):
            if id(p) in seen:
                continue
            seen.add(id(p))
            leaf = name.rsplit(".", 1)[-1]
            is_norm = "norm" in name or "ln_" in name
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            elif is_norm and leaf == "weight":
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.1)
            else:  # biases (norm and linear)
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        if suppress_special_ids:
            out = model.get_output_embeddings().weight
            out[sorted(set(suppress_special_ids))] *= 0.05


def make_checkpoint(
    out_dir: Path,
    family: str,
    *,
    seed: int = 0,
    sharded: bool = False,
    suppress_special_tokens: bool = True,
    **config_overrides: Any,
) -> Path:
    """Build a tiny random ``family`` model and save it HF-style (safetensors + tokenizer) in ``out_dir``.

    ``sharded=True`` saves >= 2 ``model-0000x-of-0000n.safetensors`` shards plus
    ``model.safetensors.index.json``.  ``suppress_special_tokens`` shrinks the output-embedding rows of
    the special tokens (BOS/EOS/pad/unk) so greedy decoding runs to ``max_new_tokens`` instead of
    stopping at a random EOS; pass False to keep them fully random.  ``config_overrides`` are passed
    to the config class (e.g. ``num_hidden_layers=3``, ``vocab_size`` must stay 512).
    Returns ``out_dir``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = _make_config(family, config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    suppress = _all_special_ids(family) if suppress_special_tokens else []
    _randomize_(model, seed, family, suppress)
    model.eval()
    model.save_pretrained(out_dir, max_shard_size="100KB" if sharded else "10GB")
    train_tokenizer(out_dir, family=family)
    return out_dir


def load_reference(path: Path, *, attn_implementation: str = "eager"):
    """Load the checkpoint at ``path`` with transformers (float32, eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation=attn_implementation
    )
    return model.eval()


def load_reference_tokenizer(path: Path):
    """The ``tokenizers.Tokenizer`` stored in ``path`` (``path/tokenizer.json``)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(path) / "tokenizer.json"))


# --------------------------------------------------------------------------------------------------
# Broken checkpoints
# --------------------------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    src, dst = Path(src), Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def _safetensors_files(d: Path) -> list[Path]:
    files = sorted(Path(d).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors file in {d}")
    return files


def make_pickle_only(src: Path, dst: Path) -> Path:
    """Copy with the weights as a single pickled ``pytorch_model.bin`` and no safetensors at all.

    transformers 5 removed ``save_pretrained(safe_serialization=False)``, so the state dict is
    written with ``torch.save`` (exactly what transformers 4 did for the unsharded pickle format).
    """
    import torch
    from safetensors.torch import load_file

    dst = _copy(src, dst)
    state: dict[str, Any] = {}
    for f in _safetensors_files(dst):
        state.update(load_file(str(f)))
        f.unlink()
    for idx in dst.glob("*.safetensors.index.json"):
        idx.unlink()
    torch.save(state, dst / "pytorch_model.bin")
    return dst


def make_missing_tokenizer(src: Path, dst: Path) -> Path:
    """Copy without ``tokenizer.json`` (and the other tokenizer files)."""
    dst = _copy(src, dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (dst / name).unlink(missing_ok=True)
    return dst


def make_missing_config(src: Path, dst: Path) -> Path:
    """Copy without ``config.json``."""
    dst = _copy(src, dst)
    (dst / "config.json").unlink()
    return dst


def make_truncated_safetensors(src: Path, dst: Path) -> Path:
    """Copy and cut the (first) ``.safetensors`` file to half its size."""
    dst = _copy(src, dst)
    f = _safetensors_files(dst)[0]
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    return dst


def make_corrupt_header(src: Path, dst: Path) -> Path:
    """Copy and overwrite the start of the (first) safetensors JSON header with garbage bytes.

    The 8-byte little-endian header length is kept, so readers get past it and then hit invalid JSON.
    """
    dst = _copy(src, dst)
    f = _safetensors_files(dst)[0]
    with open(f, "r+b") as fh:
        fh.seek(8)
        fh.write(b"\xff\xfe\x00GARBAGE\x00{{{{[[[[")
    return dst


def _ffn_key(config: dict[str, Any]) -> str:
    for key in ("intermediate_size", "ffn_dim", "n_inner"):
        if key in config:
            return key
    raise KeyError("config has no intermediate_size/ffn_dim/n_inner")


def make_shape_mismatch(src: Path, dst: Path) -> Path:
    """Copy and edit ``config.json`` so the MLP width no longer matches the stored weights."""
    dst = _copy(src, dst)
    path = dst / "config.json"
    config = json.loads(path.read_text())
    key = _ffn_key(config)
    actual = config[key]
    if actual is None:  # GPT-2 style n_inner=None means 4 * n_embd
        actual = 4 * config["n_embd"]
    config[key] = actual + 32
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dst


def make_unknown_architecture(src: Path, dst: Path) -> Path:
    """Copy and relabel ``config.json`` as an architecture nobody supports."""
    dst = _copy(src, dst)
    path = dst / "config.json"
    config = json.loads(path.read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    config["model_type"] = "fancy"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dst
