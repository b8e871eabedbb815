"""reldl's LLM engine: model families, paged KV cache, continuous batching, sampling.

Names are imported on first use, so that `import reldl` and the CLI start without loading torch.
"""

from reldl.llm.params import SamplingParams

__all__ = ["Engine", "Result", "SamplingParams"]


def __getattr__(name: str):
    if name in ("Engine", "Result"):
        from reldl.llm import engine

        return getattr(engine, name)
    raise AttributeError(name)
