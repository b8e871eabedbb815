"""Tabular models (MLP, linear and logistic regression): a directory with `config.json` + `model.safetensors`.

config.json::

    {"model_type": "mlp" | "linear_reg" | "logistic_reg", "n_features": F,
     "layers": [{"units": 64, "activation": "relu"}, ..., {"units": K, "activation": "identity"}],
     "task": "regression" | "binary" | "multiclass"}

model.safetensors holds `layers.{i}.weight` [out, in] and `layers.{i}.bias` [out], float32. The task applies the link
of the output layer: binary -> sigmoid of the single output (probability of class 1), multiclass -> softmax over the
K >= 2 outputs, regression -> the single output as is. linear_reg is one identity layer of 1 unit with task regression;
logistic_reg is one identity layer of 1 unit (binary) or K units (multiclass).

Validation reads the safetensors header only (CREATE MODEL runs it); weights load only from safetensors. No DuckDB here.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from reldl.errors import CheckpointError, ProgrammingError
from reldl.llm.loader import PICKLE_SUFFIXES, read_safetensors_header

MODEL_TYPES = ("mlp", "linear_reg", "logistic_reg")
TASKS = ("regression", "binary", "multiclass")
ACTIVATIONS = ("identity", "relu", "tanh", "sigmoid", "gelu")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CREATE_OPTIONS = ("model_type", "path", "device")
_REQUIRED_KEYS = ("model_type", "n_features", "layers", "task")


@dataclass
class TabularSpec:
    model_type: str
    n_features: int
    layers: list[tuple[int, int, str]]  # (in, out, activation) per layer
    task: str

    @property
    def n_outputs(self) -> int:
        return self.layers[-1][1]

    @property
    def flops_per_row(self) -> int:
        return 2 * sum(i * o for i, o, _ in self.layers)

    @property
    def weight_bytes(self) -> int:
        return 4 * sum(i * o + o for i, o, _ in self.layers)  # float32 weights and biases

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for n, (i, o, _) in enumerate(self.layers):
            shapes[f"layers.{n}.weight"] = (o, i)
            shapes[f"layers.{n}.bias"] = (o,)
        return shapes

    def to_config(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "n_features": self.n_features,
            "layers": [{"units": o, "activation": a} for _, o, a in self.layers],
            "task": self.task,
        }


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def spec_from_config(config: Any, where: str = CONFIG_FILE) -> TabularSpec:
    """A parsed config.json -> TabularSpec, or CheckpointError (one line, prefixed with `where`) naming the problem."""

    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"{where}: {msg}")

    if not isinstance(config, dict):
        raise bad("must be a JSON object")
    missing = [k for k in _REQUIRED_KEYS if k not in config]
    if missing:
        raise bad(f"missing key(s) {', '.join(missing)} (a tabular config needs {', '.join(_REQUIRED_KEYS)})")
    model_type, n_features, layers, task = (config[k] for k in _REQUIRED_KEYS)
    if model_type not in MODEL_TYPES:
        raise bad(f"model_type {model_type!r} is not a tabular model type (use {', '.join(MODEL_TYPES)})")
    if not _is_int(n_features) or n_features < 1:
        raise bad(f"n_features must be a positive integer, got {n_features!r}")
    if task not in TASKS:
        raise bad(f"task {task!r} is not supported (use {', '.join(TASKS)})")
    if not isinstance(layers, list) or not layers:
        raise bad("layers must be a non-empty list of {units, activation} objects")
    spec_layers: list[tuple[int, int, str]] = []
    fan_in = n_features
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict) or "units" not in layer:
            raise bad(f"layers[{i}] must be an object with units and activation")
        units, act = layer["units"], layer.get("activation", "identity")
        if not _is_int(units) or units < 1:
            raise bad(f"layers[{i}].units must be a positive integer, got {units!r}")
        if act not in ACTIVATIONS:
            raise bad(f"layers[{i}].activation {act!r} is not supported (use {', '.join(ACTIVATIONS)})")
        spec_layers.append((fan_in, units, act))
        fan_in = units
    k, last_act = spec_layers[-1][1], spec_layers[-1][2]
    if model_type in ("linear_reg", "logistic_reg"):
        if len(spec_layers) != 1 or last_act != "identity":
            raise bad(f"a {model_type} model is a single layer with activation 'identity'")
    if model_type == "linear_reg" and task != "regression":
        raise bad(f"a linear_reg model has task 'regression', got {task!r}")
    if model_type == "logistic_reg" and task == "regression":
        raise bad("a logistic_reg model has task 'binary' or 'multiclass', got 'regression'")
    if task in ("regression", "binary") and k != 1:
        raise bad(f"task {task!r} needs 1 output unit in the last layer, got {k}")
    if task == "multiclass" and k < 2:
        raise bad(f"task 'multiclass' needs at least 2 output units in the last layer, got {k}")
    if task != "regression" and last_act != "identity":
        raise bad(f"the last layer of a {task} model must have activation 'identity' (the task applies the link)")
    return TabularSpec(model_type, n_features, spec_layers, task)


def _paths(path: str | Path) -> tuple[Path, Path, Path]:
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: model directory does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (a tabular model is a directory with config.json)")
    cfg, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg.is_file():
        raise CheckpointError(f"{cfg}: missing config.json")
    if not weights.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{path}: only pickle weights ({', '.join(pickles)}); reldl loads safetensors only, "
                f"because unpickling can run arbitrary code: save the weights as {WEIGHTS_FILE}"
            )
        raise CheckpointError(f"{weights}: missing {WEIGHTS_FILE}")
    return path, cfg, weights


def inspect_tabular(path: str | Path) -> TabularSpec:
    """Validate a tabular model directory cheaply (config + safetensors header, no weights read)."""
    _, cfg, weights = _paths(path)
    try:
        config = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg}: cannot read ({type(e).__name__})") from None
    except ValueError as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({str(e).splitlines()[0]})") from None
    spec = spec_from_config(config, str(cfg))
    tensors = read_safetensors_header(weights)
    expected = spec.tensor_shapes()
    for name, shape in expected.items():
        info = tensors.get(name)
        if info is None:
            raise CheckpointError(f"{weights}: weight {name!r} missing")
        if tuple(info.shape) != shape:
            raise CheckpointError(
                f"{weights}: weight {name!r} has shape {list(info.shape)} but config.json implies {list(shape)}"
            )
        if info.dtype != "F32":
            raise CheckpointError(f"{weights}: weight {name!r} has dtype {info.dtype}, expected F32")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        more = f" (+{len(extra) - 3} more)" if len(extra) > 3 else ""
        raise CheckpointError(
            f"{weights}: unexpected tensor(s) {', '.join(map(repr, extra[:3]))}{more} not implied by config.json"
        )
    return spec


# ---------------------------------------------------------------------------------------------------- the module

_ACT = {
    "identity": lambda x: x,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": nn.functional.gelu,  # exact (erf) form
}


class TabularModel(nn.Module):
    """The network of a TabularSpec. Parameters are named like the safetensors tensors (`layers.{i}.weight`)."""

    def __init__(self, spec: TabularSpec):
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o, _ in spec.layers)
        self.activations = [a for _, _, a in spec.layers]

    @property
    def n_features(self) -> int:
        return self.spec.n_features

    @property
    def n_outputs(self) -> int:
        return self.spec.n_outputs

    @property
    def task(self) -> str:
        return self.spec.task

    def _param(self) -> torch.Tensor:
        return self.layers[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features [N, F] -> raw outputs [N, K] (before the task's sigmoid / softmax)."""
        for layer, act in zip(self.layers, self.activations):
            x = _ACT[act](layer(x))
        return x

    def _inputs(self, x) -> torch.Tensor:
        p = self._param()
        if isinstance(x, np.ndarray) and not x.flags.writeable:
            x = np.array(x)  # e.g. a zero-copy view of Arrow data: torch refuses read-only memory
        t = torch.as_tensor(x)
        if t.ndim != 2 or t.shape[1] != self.n_features:
            raise ValueError(f"expected features of shape [N, {self.n_features}], got {list(t.shape)}")
        return t.to(device=p.device, dtype=p.dtype)

    @torch.inference_mode()
    def predict_proba(self, x) -> np.ndarray:
        """[N, K] float64: binary -> [1 - p, p]; multiclass -> softmax; regression -> the raw outputs."""
        out = self(self._inputs(x))
        if self.task == "binary":
            p = torch.sigmoid(out[:, 0])
            out = torch.stack([1 - p, p], dim=1)
        elif self.task == "multiclass":
            out = torch.softmax(out, dim=1)
        return out.to("cpu", torch.float64).numpy()

    @torch.inference_mode()
    def predict(self, x) -> np.ndarray:
        """[N] float64: regression -> the output; binary -> probability of class 1; multiclass -> argmax index."""
        out = self(self._inputs(x))
        if self.task == "binary":
            y = torch.sigmoid(out[:, 0])
        elif self.task == "multiclass":
            y = out.argmax(dim=1)
        else:
            y = out[:, 0]
        return y.to("cpu", torch.float64).numpy()


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    from reldl.registry import resolve_device

    return resolve_device(device)


def load_tabular(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> TabularModel:
    """Load a validated model in eval mode. `dtype` None computes in float64 on CPU (exact against a float64
    reference; the models are small) and float32 elsewhere."""
    spec = inspect_tabular(path)
    dev = _resolve_device(device)
    dtype = dtype or (torch.float64 if dev.type == "cpu" else torch.float32)
    from safetensors.torch import load_file

    weights = Path(path).expanduser() / WEIGHTS_FILE
    try:
        tensors = load_file(str(weights), device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{weights}: cannot load ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    model = TabularModel(spec)
    model.load_state_dict({k: tensors[k] for k in spec.tensor_shapes()})
    return model.to(device=dev, dtype=dtype).eval().requires_grad_(False)


def read_layers(path: str | Path) -> tuple[TabularSpec, list[tuple[np.ndarray, np.ndarray, str]]]:
    """The validated spec and, per layer, (weight [out, in], bias [out], activation) as float64 numpy arrays:
    e.g. for running the model as SQL over a weight table (planner/relational.py's store_weights)."""
    spec = inspect_tabular(path)
    from safetensors.numpy import load_file

    weights = Path(path).expanduser() / WEIGHTS_FILE
    try:
        t = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{weights}: cannot load ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    layers = [
        (t[f"layers.{i}.weight"].astype(np.float64), t[f"layers.{i}.bias"].astype(np.float64), act)
        for i, (_, _, act) in enumerate(spec.layers)
    ]
    return spec, layers


# -------------------------------------------------------------------------------------------------- writing models


def save_tabular(path: str | Path, spec: TabularSpec, weights: dict[str, torch.Tensor]) -> Path:
    """Write config.json + model.safetensors (float32). Each file is replaced atomically, weights first."""
    from safetensors.torch import save_file

    spec_from_config(spec.to_config(), "spec")  # the spec itself must be valid
    expected = spec.tensor_shapes()
    if set(weights) != set(expected):
        raise ValueError(f"weights must be exactly {sorted(expected)}, got {sorted(weights)}")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"weight {name!r} has shape {list(weights[name].shape)}, spec implies {list(shape)}")
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}
    tmp = path / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / WEIGHTS_FILE)
    tmp = path / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(spec.to_config(), indent=2) + "\n")
    os.replace(tmp, path / CONFIG_FILE)
    return path


def random_tabular(
    path: str | Path,
    model_type: str,
    n_features: int,
    hidden: list[int | tuple[int, str]] | None = None,
    n_outputs: int | None = None,
    task: str | None = None,
    seed: int = 0,
) -> TabularSpec:
    """A model with random weights (tests, benchmarks). `hidden`: units (relu) or (units, activation) per hidden
    layer, MLP only. Defaults: task regression (mlp, linear_reg) or binary/multiclass by n_outputs (logistic_reg)."""
    hidden = list(hidden or [])
    if hidden and model_type != "mlp":
        raise ValueError(f"{model_type} has no hidden layers")
    if task is None:
        task = "regression" if model_type != "logistic_reg" else ("binary" if (n_outputs or 1) == 1 else "multiclass")
    if n_outputs is None:
        n_outputs = 3 if task == "multiclass" else 1
    layers: list[tuple[int, int, str]] = []
    fan_in = n_features
    for h in hidden:
        units, act = (h, "relu") if isinstance(h, int) else h
        layers.append((fan_in, units, act))
        fan_in = units
    layers.append((fan_in, n_outputs, "identity"))
    spec = TabularSpec(model_type, n_features, layers, task)
    gen = torch.Generator().manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}
    for n, (i, o, _) in enumerate(layers):
        weights[f"layers.{n}.weight"] = torch.randn(o, i, generator=gen) / i**0.5
        weights[f"layers.{n}.bias"] = torch.randn(o, generator=gen) * 0.1
    save_tabular(path, spec, weights)
    return spec


# ------------------------------------------------------------------------------------------------- CREATE MODEL


def validate_create_options(name: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """CREATE MODEL name OPTIONS (model_type = 'mlp' | 'linear_reg' | 'logistic_reg', path = '/dir', device = ...):
    check the options and the model directory; return the resolved path and the options for the catalog row."""
    model_type = options.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ProgrammingError(
            f"CREATE MODEL {name}: model_type {model_type!r} is not a tabular model type (use {', '.join(MODEL_TYPES)})"
        )
    unknown = set(options) - set(CREATE_OPTIONS)
    if unknown:
        raise ProgrammingError(
            f"CREATE MODEL {name}: unknown option(s) {', '.join(sorted(unknown))} for model_type {model_type!r} "
            f"(options: {', '.join(sorted(CREATE_OPTIONS))})"
        )
    path = options.get("path")
    if not isinstance(path, str) or not path:
        raise ProgrammingError(f"CREATE MODEL {name}: OPTIONS must set path = '/dir/of/model'")
    device = options.get("device", "auto")
    device = "auto" if device is None else str(device)
    _resolve_device(device)
    spec = inspect_tabular(path)
    if spec.model_type != model_type:
        raise ProgrammingError(
            f"CREATE MODEL {name}: model_type {model_type!r} does not match {spec.model_type!r} in "
            f"{Path(path).expanduser() / CONFIG_FILE}"
        )
    stored = {
        "device": device,
        "n_features": spec.n_features,
        "task": spec.task,
        "n_outputs": spec.n_outputs,
        "flops_per_row": spec.flops_per_row,
        "weight_bytes": spec.weight_bytes,
    }
    return str(Path(path).expanduser().resolve()), stored


# ----------------------------------------------------------------------------------------- process-wide cache


@dataclass(frozen=True)
class TabularKey:
    path: str
    mtime_ns: int  # a model replaced on disk is a different model
    size: int
    device: str


_models: dict[TabularKey, TabularModel] = {}
_names: dict[str, set[TabularKey]] = {}
_lock = threading.Lock()


def tabular_key(path: str | Path, device: str = "auto") -> TabularKey:
    p = Path(path).expanduser().resolve()
    mtime = size = 0
    for f in (p / CONFIG_FILE, p / WEIGHTS_FILE):
        try:
            st = f.stat()
        except OSError:
            continue  # inspect_tabular reports it
        mtime, size = max(mtime, st.st_mtime_ns), size + st.st_size
    return TabularKey(str(p), mtime, size, str(_resolve_device(device)))


def get_tabular(path: str | Path, device: str = "auto", name: str | None = None) -> TabularModel:
    """Load (once per process, per file version and device) and return a tabular model."""
    key = tabular_key(path, device)
    with _lock:
        model = _models.get(key)
        if model is None:
            for old in [k for k in _models if k.path == key.path and k.device == key.device]:
                del _models[old]  # an older version of the files
            model = _models[key] = load_tabular(key.path, key.device)
        if name is not None:
            _names.setdefault(name.lower(), set()).add(key)
        return model


def unload(name: str | None = None) -> int:
    """Drop the cached models used under catalog name `name` (all when None). Returns how many were dropped."""
    with _lock:
        if name is None:
            keys = set(_models)
            _names.clear()
        else:
            keys = _names.pop(name.lower(), set())
        return sum(_models.pop(k, None) is not None for k in keys)


def loaded() -> list[TabularKey]:
    with _lock:
        return list(_models)
