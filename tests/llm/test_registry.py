"""The process-wide model registry: one load per checkpoint, engines with other options share its weights."""

from __future__ import annotations

from reldl import registry


def test_engines_with_other_options_share_weights_and_unload_together(llama_path):
    a = registry.get_engine("reg-a", str(llama_path), "float32", "cpu")
    assert registry.get_engine("reg-a", str(llama_path), "float32", "cpu") is a
    b = registry.get_engine("reg-a", str(llama_path), "float32", "cpu", max_batch=2)
    assert b is not a and b.max_batch == 2 and b.model is a.model
    assert registry.unload("reg-a") == 1
    assert registry.get_engine("reg-a", str(llama_path), "float32", "cpu") is not a
    registry.unload("reg-a")
