"""Progress of long generations on stderr: shown in a terminal or notebook, silent otherwise."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


def _interactive() -> bool:
    if "ipykernel" in sys.modules:
        return True
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class Progress:
    """Rows done and tokens/s; `update` is the engine's on_progress callback."""

    def __init__(self, enabled: bool | None = None, desc: str = "llm_generate"):
        self.enabled = _interactive() if enabled is None else enabled
        self.rows = 0
        self.tokens = 0
        self.start = time.perf_counter()
        self.bar = tqdm(desc=desc, unit=" rows", file=sys.stderr, leave=False) if self.enabled else None

    def update(self, rows: int, tokens: int) -> None:
        self.rows += rows
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(rows)
            rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
