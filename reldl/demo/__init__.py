"""reldl's own small demo model: a synthetic product-review corpus and a tiny Llama trained to extract JSON from it.

`reldl.demo.data` renders the reviews (deterministic, seeded), `reldl.demo.train` trains and evaluates the model,
and `MODEL_DIR` is where the trained checkpoint ships.
"""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"

__all__ = ["MODEL_DIR"]
