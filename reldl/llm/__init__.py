"""reldl's LLM engine: model families, paged KV cache, continuous batching, sampling."""

from reldl.llm.engine import Engine, Result
from reldl.llm.sampling import SamplingParams

__all__ = ["Engine", "Result", "SamplingParams"]
