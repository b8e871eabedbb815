"""Per-request decoding parameters (torch-free, so SQL adapters can build them without loading torch)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def deterministic(self) -> bool:
        """Same prompt, same output: greedy decoding, or sampling with a fixed seed."""
        return self.greedy or self.seed is not None
