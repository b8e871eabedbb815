"""The tabular model format: round trip, validation from the header alone, one-line errors, CREATE MODEL options,
and the process-wide cache."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from tabular_helpers import MODELS

from reldl import tabular
from reldl.errors import CheckpointError, OperationalError, ProgrammingError
from reldl.tabular import (
    TabularSpec,
    get_tabular,
    inspect_tabular,
    load_tabular,
    random_tabular,
    read_layers,
    save_tabular,
    validate_create_options,
)


def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
    return msg


def checkpoint_error(path) -> str:
    """The one-line CheckpointError for `path`; loading refuses it with the same message."""
    with pytest.raises(CheckpointError) as info:
        inspect_tabular(path)
    assert isinstance(info.value, OperationalError)
    msg = one_line(info.value)
    with pytest.raises(CheckpointError) as again:
        load_tabular(path)
    assert str(again.value) == msg
    return msg


@pytest.fixture
def model_dir(tabular_models, tmp_path):
    """A private copy of the 2-hidden-layer regression MLP, free to damage."""
    return shutil.copytree(tabular_models["mlp_reg"], tmp_path / "m")


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


# ------------------------------------------------------------------------------------------------------ good models


@pytest.mark.parametrize("name", list(MODELS))
def test_inspect_and_load_round_trip(tabular_models, name):
    kw = MODELS[name]
    spec = inspect_tabular(tabular_models[name])
    assert spec.model_type == kw["model_type"] and spec.n_features == kw["n_features"]
    assert spec.layers[0][0] == kw["n_features"]
    assert all(spec.layers[i][1] == spec.layers[i + 1][0] for i in range(len(spec.layers) - 1))
    assert spec.flops_per_row == 2 * sum(i * o for i, o, _ in spec.layers)
    assert spec.weight_bytes == 4 * sum(i * o + o for i, o, _ in spec.layers)
    model = load_tabular(tabular_models[name])
    assert not model.training
    assert all(not p.requires_grad and p.dtype == torch.float64 for p in model.parameters())
    assert model.spec == spec
    # save(load(x)) writes the same weights back
    from safetensors.torch import load_file

    original = load_file(str(tabular_models[name] / "model.safetensors"))
    assert set(dict(model.named_parameters())) == set(original)
    for k, v in model.named_parameters():
        assert torch.equal(v.float(), original[k])


def test_spec_shapes_and_sizes():
    spec = TabularSpec("mlp", 4, [(4, 16, "relu"), (16, 8, "tanh"), (8, 1, "identity")], "regression")
    assert spec.n_outputs == 1
    assert spec.flops_per_row == 2 * (4 * 16 + 16 * 8 + 8 * 1)
    assert spec.weight_bytes == 4 * (4 * 16 + 16 + 16 * 8 + 8 + 8 + 1)
    assert spec.tensor_shapes()["layers.1.weight"] == (8, 16)
    assert tabular.spec_from_config(spec.to_config()) == spec


def test_float32_forward_and_raw_outputs(tabular_models):
    m64 = load_tabular(tabular_models["mlp_multi"])
    m32 = load_tabular(tabular_models["mlp_multi"], dtype=torch.float32)
    x = np.random.default_rng(0).normal(size=(5, 6))
    raw32 = m32(torch.tensor(x, dtype=torch.float32))
    assert raw32.shape == (5, 3) and raw32.dtype == torch.float32
    np.testing.assert_allclose(raw32.detach().numpy(), m64(torch.tensor(x)).detach().numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[N, 6\]"):
        m64.predict(np.zeros((2, 5)))


def test_save_refuses_mismatched_weights(tmp_path):
    spec = TabularSpec("linear_reg", 2, [(2, 1, "identity")], "regression")
    with pytest.raises(ValueError, match="layers.0.bias"):
        save_tabular(tmp_path / "a", spec, {"layers.0.weight": torch.zeros(1, 2)})
    with pytest.raises(ValueError, match="shape"):
        save_tabular(tmp_path / "a", spec, {"layers.0.weight": torch.zeros(2, 2), "layers.0.bias": torch.zeros(1)})
    save_tabular(tmp_path / "a", spec, {"layers.0.weight": torch.ones(1, 2), "layers.0.bias": torch.zeros(1)})
    assert load_tabular(tmp_path / "a").predict(np.array([[1.0, 2.0]])).tolist() == [3.0]
    assert not list(tmp_path.glob("a/*.tmp"))


def test_random_tabular_defaults(tmp_path):
    assert random_tabular(tmp_path / "a", "logistic_reg", 3).task == "binary"
    assert random_tabular(tmp_path / "b", "logistic_reg", 3, n_outputs=5).task == "multiclass"
    assert random_tabular(tmp_path / "c", "mlp", 3, hidden=[4]).task == "regression"
    with pytest.raises(ValueError):
        random_tabular(tmp_path / "d", "linear_reg", 3, hidden=[4])


# ------------------------------------------------------------------------------------------------------- bad models


def test_missing_directory(tmp_path):
    msg = checkpoint_error(tmp_path / "nope")
    assert str(tmp_path / "nope") in msg and "does not exist" in msg
    (tmp_path / "file").write_text("x")
    assert "not a directory" in checkpoint_error(tmp_path / "file")


def test_missing_config(model_dir):
    (model_dir / "config.json").unlink()
    msg = checkpoint_error(model_dir)
    assert str(model_dir / "config.json") in msg and "missing" in msg


def test_bad_json(model_dir):
    (model_dir / "config.json").write_text('{"model_type": "mlp",')
    msg = checkpoint_error(model_dir)
    assert str(model_dir / "config.json") in msg and "not valid JSON" in msg


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"model_type": "llama"}, ["model_type 'llama'", "mlp"]),
        ({"n_features": 0}, ["n_features"]),
        ({"n_features": "4"}, ["n_features"]),
        ({"task": "ranking"}, ["task 'ranking'"]),
        ({"layers": []}, ["layers"]),
        ({"layers": [{"units": 16, "activation": "swish"}, {"units": 1}]}, ["layers[0].activation 'swish'", "gelu"]),
        ({"layers": [{"units": 16, "activation": "relu"}, {"units": 1.5}]}, ["layers[1].units"]),
        ({"layers": [{"units": 16, "activation": "relu"}, {"units": 2, "activation": "identity"}]}, ["1 output"]),
        ({"task": "multiclass", "layers": [{"units": 1, "activation": "identity"}]}, ["at least 2"]),
        ({"task": "binary", "layers": [{"units": 1, "activation": "sigmoid"}]}, ["'identity'", "link"]),
    ],
)
def test_bad_config_values(model_dir, changes, words):
    edit_config(model_dir, **changes)
    msg = checkpoint_error(model_dir)
    assert str(model_dir / "config.json") in msg
    for w in words:
        assert w in msg, (w, msg)


def test_missing_config_key(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    del cfg["task"]
    (model_dir / "config.json").write_text(json.dumps(cfg))
    assert "missing key(s) task" in checkpoint_error(model_dir)
    (model_dir / "config.json").write_text("[1, 2]")
    assert "JSON object" in checkpoint_error(model_dir)


@pytest.mark.parametrize(
    "model_type, changes, word",
    [
        ("linear_reg", {"task": "binary"}, "regression"),
        ("linear_reg", {"layers": [{"units": 1, "activation": "relu"}]}, "single layer"),
        ("logistic_reg", {"task": "regression"}, "'binary' or 'multiclass'"),
    ],
)
def test_linear_model_constraints(tabular_models, tmp_path, model_type, changes, word):
    src = tabular_models["linear" if model_type == "linear_reg" else "logistic"]
    d = shutil.copytree(src, tmp_path / "m")
    edit_config(d, **changes)
    assert word in checkpoint_error(d)


def test_wrong_layer_shapes(model_dir):
    edit_config(model_dir, n_features=5)  # the weights were made for 4 features
    msg = checkpoint_error(model_dir)
    assert str(model_dir / "model.safetensors") in msg
    assert "'layers.0.weight' has shape [16, 4] but config.json implies [16, 5]" in msg
    edit_config(model_dir, n_features=4, layers=[{"units": 16, "activation": "relu"}, {"units": 1}])
    assert "'layers.1.weight' has shape [8, 16] but config.json implies [1, 16]" in checkpoint_error(model_dir)


def test_missing_extra_and_wrongly_typed_tensors(model_dir):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(model_dir / "model.safetensors"))
    file = model_dir / "model.safetensors"
    save_file({k: v for k, v in weights.items() if k != "layers.2.bias"}, str(file))
    assert "'layers.2.bias' missing" in checkpoint_error(model_dir)
    save_file({**weights, "layers.3.weight": torch.zeros(1, 1), "scale": torch.zeros(1)}, str(file))
    assert "unexpected tensor(s) 'layers.3.weight', 'scale'" in checkpoint_error(model_dir)
    save_file({**weights, "layers.0.bias": weights["layers.0.bias"].double()}, str(file))
    assert "'layers.0.bias' has dtype F64, expected F32" in checkpoint_error(model_dir)


def test_truncated_and_corrupted_safetensors(model_dir):
    file = model_dir / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-10])
    msg = checkpoint_error(model_dir)
    assert str(file) in msg and "truncated" in msg
    file.write_bytes(data[:5])
    assert "truncated" in checkpoint_error(model_dir)
    file.write_bytes(b"\xff" * 64)
    assert "corrupted" in checkpoint_error(model_dir)


def test_pickle_only_and_missing_weights(model_dir):
    (model_dir / "model.safetensors").unlink()
    msg = checkpoint_error(model_dir)
    assert str(model_dir / "model.safetensors") in msg and "missing" in msg
    (model_dir / "model.pt").write_bytes(b"\x80\x04not really a pickle")
    msg = checkpoint_error(model_dir)
    assert str(model_dir) in msg and "model.pt" in msg
    assert "safetensors only" in msg and "arbitrary code" in msg


# ---------------------------------------------------------------------------------------------------- CREATE MODEL


def test_create_options(tabular_models):
    path, stored = validate_create_options("m", {"model_type": "mlp", "path": str(tabular_models["mlp_multi"])})
    assert path == str(tabular_models["mlp_multi"].resolve())
    spec = inspect_tabular(path)
    assert stored == {
        "device": "auto",
        "n_features": 6,
        "task": "multiclass",
        "n_outputs": 3,
        "flops_per_row": spec.flops_per_row,
        "weight_bytes": spec.weight_bytes,
    }
    _, stored = validate_create_options(
        "m", {"model_type": "linear_reg", "path": str(tabular_models["linear"]), "device": "cpu"}
    )
    assert stored["device"] == "cpu" and stored["task"] == "regression"


@pytest.mark.parametrize(
    "options, words",
    [
        ({"model_type": "logistic_reg"}, ["CREATE MODEL churn", "logistic_reg", "does not match", "'mlp'"]),
        ({"model_type": "mlp", "dtype": "float16"}, ["CREATE MODEL churn", "unknown option(s) dtype"]),
        ({"model_type": "mlp", "path": None}, ["CREATE MODEL churn", "path"]),
        ({"model_type": "llm"}, ["CREATE MODEL churn", "not a tabular model type"]),
        ({"model_type": "mlp", "device": "tpu"}, ["'tpu'"]),
    ],
)
def test_create_options_errors(tabular_models, options, words):
    opts = {"path": str(tabular_models["mlp_reg"]), **options}
    if opts["path"] is None:
        del opts["path"]
    with pytest.raises(ProgrammingError) as info:
        validate_create_options("churn", opts)
    msg = one_line(info.value)
    for w in words:
        assert w in msg, (w, msg)


def test_create_options_bad_directory(tmp_path):
    with pytest.raises(CheckpointError) as info:
        validate_create_options("m", {"model_type": "mlp", "path": str(tmp_path)})
    assert "config.json" in one_line(info.value)


# ------------------------------------------------------------------------------------------------------------ cache


def test_cache_reuses_and_reloads_replaced_files(tmp_path):
    d = tmp_path / "m"
    random_tabular(d, "mlp", 3, hidden=[4], seed=1)
    a = get_tabular(d, "cpu", name="Cached")
    assert get_tabular(str(d), "cpu") is a
    x = np.ones((2, 3))
    before = a.predict(x)
    random_tabular(d, "mlp", 3, hidden=[4], seed=2)  # replaced on disk: a different model
    b = get_tabular(d, "cpu", name="cached")
    assert b is not a and not np.allclose(b.predict(x), before)
    assert sum(k.path == str(d.resolve()) for k in tabular.loaded()) == 1  # the old version was dropped
    assert tabular.unload("CACHED") == 1
    assert get_tabular(d, "cpu") is not b
    assert tabular.unload("never-used") == 0


def test_read_layers(tabular_models):
    spec, layers = read_layers(tabular_models["mlp_bin"])
    model = load_tabular(tabular_models["mlp_bin"])
    assert [a for _, _, a in layers] == [a for _, _, a in spec.layers] == ["gelu", "sigmoid", "identity"]
    for (w, b, _), layer in zip(layers, model.layers):
        assert w.dtype == np.float64 and w.shape == tuple(layer.weight.shape)
        np.testing.assert_array_equal(w, layer.weight.numpy())
        np.testing.assert_array_equal(b, layer.bias.numpy())
