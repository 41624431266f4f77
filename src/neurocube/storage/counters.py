"""Per-process counters of the storage layer: files opened and payload bytes read.

:data:`IO_STATS` is the one instance; readers add to it, tests and benchmarks read it.
"""

from __future__ import annotations

import threading


class _IOStats:
    """Per-process counters of file opens and payload bytes read (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.opens = 0
        self.bytes_read = 0

    def add_open(self) -> None:
        with self._lock:
            self.opens += 1

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes_read += n

    def reset(self) -> None:
        with self._lock:
            self.opens = 0
            self.bytes_read = 0

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.opens, self.bytes_read


IO_STATS = _IOStats()
