"""How much DuckDB spills: the peak total size of its spill files while a block of code runs (benchmarks, tests)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path


class SpillWatcher:
    """Largest total size of DuckDB's spill files (``*.tmp`` in ``path``), polled every ``interval`` seconds while
    the ``with`` block runs; ``peak`` holds it after."""

    def __init__(self, path: str | Path, interval: float = 0.005):
        self.path, self.interval, self.peak = path, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                size = sum(e.stat().st_size for e in os.scandir(self.path) if e.name.endswith(".tmp"))
            except OSError:
                size = 0
            self.peak = max(self.peak, size)
            time.sleep(self.interval)

    def __enter__(self) -> SpillWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
