"""Per-request decoding parameters (torch-free, so SQL adapters can build them without loading torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_BRANCHES = 64  # the most samples (n) or beams (beam_width) one request may ask for

_MASK62 = (1 << 62) - 1


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes.

    n > 1: n samples of the same prompt, decoded as one tree (the prompt prefilled once, its cache blocks shared).
    beam_width = k: log-probability beam search returning the k finished hypotheses best first, with transformers'
    semantics for `length_penalty` (score = sum of log-probabilities / generated length ** length_penalty, EOS
    counted) and `early_stopping` (True: stop once k hypotheses are finished; False: also stop when the best running
    beam cannot beat the worst finished one at its current length; "never": at the longest possible length). Beam
    search is deterministic: it needs temperature 0 and ignores top_k / top_p / seed; n and beam_width exclude each
    other, and beam search does not take stop strings.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    n: int = 1
    beam_width: int | None = None
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem is not None:
            raise ValueError(problem)

    def problem(self) -> str | None:
        """Why these parameters are invalid (one line), or None."""
        if not isinstance(self.n, int) or self.n < 1:
            return f"n must be >= 1, got {self.n}"
        if self.n > MAX_BRANCHES:
            return f"n must be at most {MAX_BRANCHES}, got {self.n}"
        if self.beam_width is None:
            return None
        if not isinstance(self.beam_width, int) or self.beam_width < 1:
            return f"beam_width must be >= 1, got {self.beam_width}"
        if self.beam_width > MAX_BRANCHES:
            return f"beam_width must be at most {MAX_BRANCHES}, got {self.beam_width}"
        if self.n > 1:
            return "n and beam_width cannot be combined (beam search returns beam_width hypotheses)"
        if self.temperature > 0:
            return "beam_width needs temperature 0 (beam search is deterministic)"
        if self.stop:
            return "beam_width does not support stop strings"
        if self.early_stopping not in (True, False, "never"):
            return f"early_stopping must be True, False or 'never', got {self.early_stopping!r}"
        return None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def beam(self) -> bool:
        return self.beam_width is not None

    @property
    def width(self) -> int:
        """Branches the request decodes: n samples or beam_width beams."""
        return self.beam_width if self.beam_width is not None else self.n

    @property
    def deterministic(self) -> bool:
        """Same prompt, same output: greedy decoding, beam search, or sampling with a fixed seed."""
        return self.greedy or self.seed is not None


def branch_seed(seed: int, branch: int) -> int:
    """The seed of sample `branch` of a request seeded with `seed`: branch 0 keeps the request's seed (so its first
    sample is what n = 1 gives), the others get a 62-bit mix of (seed, branch). A pure function: a branch's draws do
    not depend on the batch, and decoding the branch as its own request with this seed gives the same text."""
    if branch == 0:
        return seed
    x = (seed * 0x9E3779B97F4A7C15 + branch * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) & ((1 << 64) - 1)
    x ^= x >> 29
    return x & _MASK62
