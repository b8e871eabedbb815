"""The SQL side: `CREATE MODEL tuned OPTIONS (model_type = 'llm', base = 'm', finetune = 'full' | 'lora', ...) AS
SELECT prompt, completion FROM examples`.

Options are checked before anything runs; the query must return `prompt` and `completion` columns with at least one
row where both are non-NULL. The trained model is written as a checkpoint directory (`path`, or `<db>.models/<name>`,
or a temporary directory for in-memory databases) and the catalog row (inserted by the caller) points at it, so
`llm_generate` loads it as any checkpoint. Training state (optimizer, data position, loss log) is checkpointed
under a directory named by the run's fingerprint (base checkpoint and file time, options that change the
arithmetic, the tokenized data): running the same statement after a kill resumes from the last checkpoint. The loss
of every step goes to `reldl.training_log` (autodiff's table) once the model is registered.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from reldl import catalog
from reldl.errors import ProgrammingError, shown
from reldl.llm.derived import base_llm, model_dir, run_query

OPTIONS = {
    "model_type",
    "base",
    "finetune",
    "epochs",
    "learning_rate",
    "batch_size",
    "micro_batch",
    "max_length",
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "seed",
    "weight_decay",
    "optimizer_placement",
    "weight_placement",
    "activation_placement",
    "gpu_memory",
    "gpu_memory_gb",
    "checkpoint_steps",
    "overlap",
    "path",
    "dtype",
    "device",
}


def _num(name, opts, key, default, lo, integer=False, hi=None):
    v = opts.get(key, default)
    ok = not isinstance(v, bool) and isinstance(v, (int,) if integer else (int, float))
    if not ok or v < lo or (hi is not None and v > hi):
        kind = "an integer" if integer else "a number"
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ProgrammingError(f"CREATE MODEL {name}: option {key!r} must be {kind} {rng}, got {shown(v)}")
    return v


def _choice(name, opts, key, default, choices):
    v = str(opts.get(key, default)).lower()
    if v not in choices:
        raise ProgrammingError(
            f"CREATE MODEL {name}: option {key!r} must be one of {', '.join(choices)}, got {shown(opts.get(key))}"
        )
    return v


def check_options(name: str, opts: dict[str, Any], has_query: bool):
    """Validate (before anything runs); returns trainer Settings and the other options."""
    from reldl.llm.finetune.trainer import Settings

    unknown = set(opts) - OPTIONS
    if unknown:
        raise ProgrammingError(
            f"CREATE MODEL {name}: unknown option(s) {', '.join(sorted(unknown))} for fine-tuning an LLM "
            f"(options: {', '.join(sorted(OPTIONS))})"
        )
    if not has_query:
        raise ProgrammingError(
            f"CREATE MODEL {name}: fine-tuning needs examples: add AS SELECT prompt, completion FROM examples"
        )
    base = opts.get("base")
    if not isinstance(base, str) or not base:
        raise ProgrammingError(f"CREATE MODEL {name}: option 'base' must name a registered LLM, got {shown(base)}")
    if "sparsity" in opts:
        raise ProgrammingError(f"CREATE MODEL {name}: finetune and sparsity cannot be combined in one model")
    method = _choice(name, opts, "finetune", "full", ("full", "lora"))
    lora_only = sorted(k for k in opts if k.startswith("lora_"))
    if method != "lora" and lora_only:
        verb = "applies" if len(lora_only) == 1 else "apply"
        raise ProgrammingError(f"CREATE MODEL {name}: {', '.join(lora_only)} {verb} only to finetune = 'lora'")
    targets = opts.get("lora_targets", "q,v")
    if isinstance(targets, str):
        targets = tuple(t.strip().lower() for t in targets.split(",") if t.strip())
    elif isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets):
        targets = tuple(t.lower() for t in targets)
    else:
        raise ProgrammingError(f"CREATE MODEL {name}: lora_targets must be a list like 'q,v', got {shown(targets)}")
    gpu = None  # the GPU budget: gpu_memory = '16GB' as for offloading (DuckDB sizes), or gpu_memory_gb = 16 (alias)
    if "gpu_memory" in opts and "gpu_memory_gb" in opts:
        raise ProgrammingError(f"CREATE MODEL {name}: give gpu_memory or gpu_memory_gb (its alias), not both")
    if "gpu_memory" in opts:
        from reldl.llm.offload.sql import parse_bytes

        gpu = parse_bytes(opts["gpu_memory"], name, "gpu_memory")
    elif "gpu_memory_gb" in opts:
        gpu = float(_num(name, opts, "gpu_memory_gb", None, 0.001)) * (1 << 30)
    overlap = opts.get("overlap", True)
    if not isinstance(overlap, bool):
        raise ProgrammingError(f"CREATE MODEL {name}: option 'overlap' must be true or false, got {shown(overlap)}")
    for key in ("dtype", "device"):
        if key in opts and (not isinstance(opts[key], str) or not opts[key]):
            raise ProgrammingError(
                f"CREATE MODEL {name}: option {key!r} must be text such as 'auto', got {shown(opts[key])}"
            )
    path = opts.get("path")
    if "path" in opts and (not isinstance(path, str) or not path):
        raise ProgrammingError(f"CREATE MODEL {name}: option 'path' must be a directory name, got {shown(path)}")
    default_lr = 1e-4 if method == "full" else 1e-3
    s = Settings(
        method=method,
        epochs=_num(name, opts, "epochs", 3, 1, True),
        learning_rate=float(_num(name, opts, "learning_rate", default_lr, 0.0)),
        batch_size=_num(name, opts, "batch_size", 8, 1, True),
        max_length=_num(name, opts, "max_length", 512, 2, True),
        lora_rank=_num(name, opts, "lora_rank", 8, 1, True),
        lora_alpha=float(_num(name, opts, "lora_alpha", 16, 0.0)),
        lora_targets=targets,
        seed=_num(name, opts, "seed", 0, 0, True),
        weight_decay=float(_num(name, opts, "weight_decay", 0.0, 0.0)),
        optimizer_placement=_choice(name, opts, "optimizer_placement", "cpu", ("cpu", "disk")),
        weight_placement=_choice(name, opts, "weight_placement", "auto", ("auto", "gpu", "stream")),
        activation_placement=_choice(name, opts, "activation_placement", "auto", ("auto", "gpu", "cpu")),
        gpu_memory=gpu,
        checkpoint_steps=_num(name, opts, "checkpoint_steps", 0, 0, True),
        overlap=overlap,
        micro_batch=_num(name, opts, "micro_batch", 0, 0, True),
    )
    return s, {"base": base, "path": path}


def _pairs(duck, name: str, query: str) -> list[tuple[str, str]]:
    cols, rows = run_query(duck, query)
    cols = [c.lower() for c in cols]
    missing = [c for c in ("prompt", "completion") if c not in cols]
    if missing:
        raise ProgrammingError(
            f"CREATE MODEL {name}: the query must return columns prompt and completion (missing: "
            f"{', '.join(missing)}; got {', '.join(cols) or 'none'})"
        )
    ip, ic = cols.index("prompt"), cols.index("completion")
    pairs = [(r[ip], r[ic]) for r in rows if r[ip] is not None and r[ic] is not None]
    if any(not isinstance(p, str) or not isinstance(c, str) for p, c in pairs):
        raise ProgrammingError(f"CREATE MODEL {name}: prompt and completion must be text (VARCHAR)")
    pairs = [(p, c) for p, c in pairs if c]
    if not pairs:
        raise ProgrammingError(
            f"CREATE MODEL {name}: the query returned no examples (need rows with a non-empty completion)"
        )
    return pairs


def create(duck, name: str, options: dict[str, Any], query: str, progress: bool | None = None):
    """Fine-tune, write the checkpoint; returns (path, catalog options, loss log rows). Writes no catalog row."""
    from reldl import registry
    from reldl.llm.finetune import data
    from reldl.llm.finetune.trainer import Trainer
    from reldl.llm.loader import inspect_checkpoint, load_tokenizer
    from reldl.llm.sparse.variant import base_mtime_ns

    s, o = check_options(name, options, query is not None)
    base = base_llm(duck, name, o["base"])
    if base.options.get("sparse"):
        raise ProgrammingError(f"CREATE MODEL {name}: base model {base.name!r} is a sparse variant; fine-tune its base")
    ckpt = inspect_checkpoint(base.path)
    cfg = ckpt.config
    if cfg.family not in ("llama", "opt"):
        raise ProgrammingError(
            f"CREATE MODEL {name}: fine-tuning supports the Llama and OPT families, not {cfg.model_type!r}"
        )
    windows = cfg.layer_windows or [cfg.sliding_window] * cfg.num_layers
    if any(w is not None and w < cfg.max_positions for w in windows):
        raise ProgrammingError(f"CREATE MODEL {name}: fine-tuning does not support sliding-window attention")
    if s.method == "lora":
        from reldl.llm.finetune.trainer import LORA_TARGETS

        allowed = LORA_TARGETS[cfg.family]
        bad = [t for t in s.lora_targets if t not in allowed]
        if bad or not s.lora_targets:
            raise ProgrammingError(
                f"CREATE MODEL {name}: lora_targets {', '.join(bad) or '(none)'} not in {', '.join(allowed)} "
                f"for {cfg.model_type}"
            )
    s.max_length = min(s.max_length, cfg.max_positions)
    dtype_opt = str(options.get("dtype", base.dtype))
    device_opt = str(options.get("device", base.device))
    dev = registry.resolve_device(device_opt)
    dt = registry.resolve_dtype(dtype_opt, dev)
    pairs = _pairs(duck, name, query)
    examples = data.tokenize(load_tokenizer(ckpt), cfg, pairs, s.max_length)
    if not examples:
        raise ProgrammingError(f"CREATE MODEL {name}: no example has a completion token within max_length")
    fp = hashlib.sha256(
        json.dumps(
            [str(Path(base.path).resolve()), base_mtime_ns(base.path), s.math(), str(dt), data.fingerprint(examples)],
            sort_keys=True,
        ).encode()
    ).hexdigest()
    target, _ = model_dir(duck, name, o["path"])
    db = catalog.db_file(duck)
    # training state: found again by the run's fingerprint (beside the database file, else in the temp directory)
    state_root = Path(str(db) + ".models") if db else Path(tempfile.gettempdir())
    state_dir = state_root / f".reldl-finetune-{fp[:20]}"
    try:
        trainer = Trainer(base.path, s, dev, dt, state_dir=state_dir, fingerprint=fp)
    except (NotImplementedError, ValueError) as e:
        raise ProgrammingError(f"CREATE MODEL {name}: {e}") from None
    bar = _Bar(progress, name)
    report = trainer.train(examples, bar)
    info = {
        "base": base.name,
        "base_path": str(Path(base.path).resolve()),
        "finetune": s.method,
        "fingerprint": fp,
        "settings": {k: v for k, v in s.math().items()},
    }
    rep = _report(report, trainer)
    info["report"] = rep
    trainer.export(target, info)
    log = list(report.log)
    trainer.discard_state()
    if s.optimizer_placement == "disk":
        shutil.rmtree(state_dir, ignore_errors=True)
    stored = {
        "dtype": dtype_opt,
        "device": device_opt,
        "architecture": cfg.model_type,
        "finetuned": True,
        "base": base.name,
        "base_path": info["base_path"],
        "finetune": s.method,
        "finetune_dir": str(target),
        "settings": info["settings"],
        "report": rep,
    }
    return str(target), stored, log


def _report(r, trainer) -> dict:
    return {
        "steps": r.steps,
        "epochs": r.epochs,
        "examples": r.examples,
        "tokens": r.tokens,
        "target_tokens": r.target_tokens,
        "first_loss": r.first_loss,
        "final_loss": r.final_loss,
        "epoch_losses": r.epoch_losses,
        "seconds": round(r.seconds, 3),
        "resumed_from_step": r.resumed_from_step,
        "device": str(trainer.device),
        "dtype": str(trainer.dtype).removeprefix("torch."),
        "resident_units": r.resident_units,
        "streamed_units": r.streamed_units,
        "activations": r.activations,
        "optimizer": f"Adam on the CPU ({trainer.s.optimizer_placement})",
    }


def write_log(duck, name: str, log: list) -> None:
    """The loss of every step into reldl.training_log (autodiff's table; epochs 1-based as there)."""
    from reldl.autodiff import train

    train._ensure_tables(duck)
    duck.execute("DELETE FROM reldl.training_log WHERE name = ?", [name])
    if log:
        duck.executemany(
            "INSERT INTO reldl.training_log (name, epoch, step, loss, seconds) VALUES (?, ?, ?, ?, ?)",
            [[name, int(e) + 1, int(st), float(lo), float(sec)] for e, st, lo, sec in log],
        )


class _Bar:
    """Progress on stderr (reldl.progress's rule: shown when interactive): steps and the latest loss."""

    def __init__(self, enabled: bool | None, name: str):
        from reldl.progress import _interactive

        self.enabled = _interactive() if enabled is None else enabled
        self.name = name
        self.bar = None

    def start(self, total: int, done: int) -> None:
        if self.enabled:
            import sys

            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, desc=f"fine-tuning {self.name}", unit=" steps", file=sys.stderr)

    def update(self, epoch: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"epoch {epoch + 1} loss {loss:.4f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
