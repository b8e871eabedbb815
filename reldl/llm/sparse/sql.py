"""The SQL side of sparse variants: `CREATE MODEL ... OPTIONS (model_type = 'llm', base = ..., sparsity = ...) AS
SELECT text FROM corpus`, and the per-layer lines EXPLAIN prints for statements that call a sparse model.

Torch is imported only when a variant is created (EXPLAIN reads the catalog's JSON).
"""

from __future__ import annotations

import shutil
from typing import Any

from reldl import catalog
from reldl.errors import ProgrammingError
from reldl.llm.derived import base_llm, model_dir, run_query

OPTIONS = {
    "model_type",
    "base",
    "sparsity",
    "method",
    "predictor_rank",
    "epochs",
    "calibration_tokens",
    "path",
    "dtype",
    "device",
}
METHODS = ("auto", "dejavu", "teal")


def is_sparse_request(options: dict[str, Any]) -> bool:
    return options.get("model_type") == "llm" and "base" in options


def _int_option(name: str, opts: dict, key: str, default: int, lo: int) -> int:
    v = opts.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ProgrammingError(f"CREATE MODEL {name}: option {key!r} must be an integer >= {lo}, got {v!r}")
    return v


def check_options(name: str, opts: dict[str, Any], has_query: bool) -> dict[str, Any]:
    """Validate the options of a sparse variant (before anything runs); returns them normalised."""
    unknown = set(opts) - OPTIONS
    if unknown:
        raise ProgrammingError(
            f"CREATE MODEL {name}: unknown option(s) {', '.join(sorted(unknown))} for a sparse LLM "
            f"(options: {', '.join(sorted(OPTIONS))})"
        )
    if not has_query:
        raise ProgrammingError(
            f"CREATE MODEL {name}: a sparse variant of {opts.get('base')!r} calibrates on text: add "
            "AS SELECT text FROM calibration_corpus"
        )
    base = opts.get("base")
    if not isinstance(base, str) or not base:
        raise ProgrammingError(f"CREATE MODEL {name}: option 'base' must name a registered LLM")
    s = opts.get("sparsity")
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 < float(s) < 1.0:
        raise ProgrammingError(f"CREATE MODEL {name}: option 'sparsity' must be a number in (0, 1), got {s!r}")
    method = str(opts.get("method", "auto")).lower()
    if method not in METHODS:
        raise ProgrammingError(
            f"CREATE MODEL {name}: method must be one of {', '.join(METHODS)}, got {opts.get('method')!r}"
        )
    path = opts.get("path")
    if path is not None and (not isinstance(path, str) or not path):
        raise ProgrammingError(f"CREATE MODEL {name}: option 'path' must be a directory name")
    return {
        "base": base,
        "sparsity": float(s),
        "method": method,
        "rank": _int_option(name, opts, "predictor_rank", 128, 1),
        "epochs": _int_option(name, opts, "epochs", 8, 1),
        "tokens": _int_option(name, opts, "calibration_tokens", 32768, 1),
        "path": path,
    }


def _texts(duck, name: str, query: str) -> list[str]:
    desc, rows = run_query(duck, query)
    if len(desc) != 1:
        raise ProgrammingError(
            f"CREATE MODEL {name}: the calibration query must return one text column, got {len(desc)} columns"
        )
    texts = [r[0] for r in rows if r[0] is not None]
    if any(not isinstance(t, str) for t in texts):
        raise ProgrammingError(f"CREATE MODEL {name}: the calibration query's column must be text (VARCHAR)")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ProgrammingError(f"CREATE MODEL {name}: the calibration query returned no text (need at least one row)")
    return texts


def create(duck, name: str, options: dict[str, Any], query: str) -> tuple[str, dict[str, Any]]:
    """Calibrate a sparse variant of the base LLM on the query's text and write it; returns (path, catalog options).
    Nothing is written to the catalog here (the caller inserts the row); on failure nothing is left on disk."""
    o = check_options(name, options, query is not None)
    base = base_llm(duck, name, o["base"])
    if base.options.get("sparse"):
        raise ProgrammingError(f"CREATE MODEL {name}: base model {base.name!r} is itself a sparse variant")
    from reldl.llm.loader import inspect_checkpoint

    cfg = inspect_checkpoint(base.path).config
    gated = cfg.family == "llama"
    method = o["method"]
    if method == "auto":
        method = "teal" if gated else "dejavu"
    if method == "dejavu" and gated:
        raise ProgrammingError(
            f"CREATE MODEL {name}: method 'dejavu' needs a ReLU/GELU MLP, but {base.name!r} ({cfg.model_type}) has a "
            "gated SwiGLU MLP: use method = 'teal' (or 'auto')"
        )
    dtype = str(options.get("dtype", base.dtype))
    device = str(options.get("device", base.device))
    texts = _texts(duck, name, query)
    target, owned = model_dir(duck, name, o["path"])
    try:
        return _calibrate_and_save(name, base, cfg, method, o, texts, dtype, device, target, owned)
    except BaseException:
        if owned and target.exists() and not any(target.iterdir()):
            shutil.rmtree(target, ignore_errors=True)
        raise


def _calibrate_and_save(name, base, cfg, method, o, texts, dtype, device, target, owned):
    from reldl import registry
    from reldl.llm.sparse import calibrate

    eng = registry.get_engine(base.name, base.path, dtype, device)
    if target.exists():
        target.rmdir()  # empty (checked): save_variant renames a complete directory into its place
    spec = calibrate.make_variant(
        eng,
        texts,
        target,
        method=method,
        sparsity=o["sparsity"],
        base_name=base.name,
        base_path=base.path,
        rank=o["rank"],
        epochs=o["epochs"],
        max_tokens=o["tokens"],
    )
    options = {
        "dtype": dtype,
        "device": device,
        "architecture": cfg.model_type,
        "sparse": True,
        "base": base.name,
        "base_path": spec["base_path"],
        "sparsity": o["sparsity"],
        "method": method,
        "sparse_dir": str(target),
        "sparse_dir_owned": owned,
        **({"owned_dirs": [str(target)]} if owned else {}),  # reldl chose the place: DROP MODEL removes it
        "calibration": spec["calibration"],
        "layers": spec["layers"],
    }
    return str(target), options


def explain_lines(models: list, names: list[str | None]) -> list[str]:
    """EXPLAIN lines for the sparse models among the called ones (`names`: the literal model names of the calls;
    None for the default LLM)."""
    lines: list[str] = []
    seen: set[str] = set()
    for n in names:
        try:
            rec = catalog.pick_model(models, n)
        except ProgrammingError:
            rec = None
        if rec is None or not rec.options.get("sparse") or rec.name.lower() in seen:
            continue
        seen.add(rec.name.lower())
        o = rec.options
        method = o.get("method")
        label = "DejaVu predictors, ReLU/GELU MLP" if method == "dejavu" else "TEAL activation thresholds"
        lines.append(
            f"  sparse model {rec.name}: {label}; base {o.get('base')}, target sparsity {o.get('sparsity'):g}; "
            "decode steps (<= 16 rows) run sparse, prefill runs dense"
        )
        for lay in o.get("layers", []):
            if method == "dejavu":
                lines.append(
                    f"    layer {lay['layer']}: {1 - lay['fraction_selected']:.1%} sparse "
                    f"({lay['selected']}/{lay['neurons']} neurons), predictor recall {lay['recall']:.3f} "
                    f"(train {lay['recall_train']:.3f}), natural sparsity {lay['natural_sparsity']:.1%}"
                )
            else:
                lines.append(
                    f"    layer {lay['layer']}: input {lay['sparsity_in']:.1%} / intermediate "
                    f"{lay['sparsity_mid']:.1%} zeroed, MLP weights read {lay['weights_read']:.1%}, "
                    f"output rel. error {lay['output_rel_error']:.3f}"
                )
    return lines
