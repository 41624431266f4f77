"""Damage a file the way disks, networks and half-finished copies do, at hypothesis-chosen places.

Each fuzz module builds an undamaged file and its oracle (values read eagerly by the format's own
library), then draws a :class:`Damage` with :func:`damages` and applies it to a copy. The
property every fuzz test asserts is the same (:func:`assert_oracle_or_neurocube_error`): reading the
damaged copy gives either the oracle's values or a ``neurocube.errors`` error; for checksummed
formats, never values that differ from the oracle.

How many examples run: ``EXAMPLES`` in the default test run (bounded, so the suite stays fast) and
``SLOW_EXAMPLES`` under ``-m slow`` (use :func:`fuzz_settings`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from neurocube.errors import NeurocubeError

EXAMPLES = 25
SLOW_EXAMPLES = 400

KINDS = ("flip_bit", "zero_run", "truncate", "swap_blocks")


@dataclass(frozen=True)
class Damage:
    """One damage: ``kind`` at fraction ``where`` (0..1) of the file, ``size`` bytes, ``bit``."""

    kind: str
    where: float
    size: int
    bit: int
    other: float

    def apply(self, data: bytes) -> bytes:
        """Return ``data`` with this damage applied (never the same bytes for a non-empty input)."""
        n = len(data)
        if n == 0:
            return data
        at = min(int(self.where * n), n - 1)
        buf = bytearray(data)
        if self.kind == "flip_bit":
            buf[at] ^= 1 << self.bit
        elif self.kind == "zero_run":
            end = min(n, at + self.size)
            buf[at:end] = bytes(end - at)
            if bytes(buf) == data:  # the run was zeros already: flip instead
                buf[at] ^= 1 << self.bit
        elif self.kind == "truncate":
            return bytes(buf[:at])
        elif self.kind == "swap_blocks":
            other = min(int(self.other * n), n - 1)
            size = max(1, min(self.size, n - max(at, other)))
            a, b = sorted((at, other))
            if b < a + size:  # overlapping blocks: swap the halves of one block instead
                half = max(1, size // 2)
                buf[a : a + 2 * half] = buf[a + half : a + 2 * half] + buf[a : a + half]
            else:
                buf[a : a + size], buf[b : b + size] = buf[b : b + size], buf[a : a + size]
            if bytes(buf) == data:
                buf[at] ^= 1 << self.bit
        else:  # pragma: no cover - the strategy only draws KINDS
            raise ValueError(self.kind)
        return bytes(buf)

    def apply_to(self, path: str | os.PathLike[str]) -> None:
        """Damage the file at ``path`` in place."""
        p = Path(path)
        p.write_bytes(self.apply(p.read_bytes()))


def damages(kinds: tuple[str, ...] = KINDS, max_size: int = 4096) -> st.SearchStrategy[Damage]:
    """Hypothesis strategy of :class:`Damage`."""
    return st.builds(
        Damage,
        kind=st.sampled_from(kinds),
        where=st.floats(0.0, 1.0, allow_nan=False),
        size=st.integers(1, max_size),
        bit=st.integers(0, 7),
        other=st.floats(0.0, 1.0, allow_nan=False),
    )


def fuzz_settings(slow: bool = False, **kwargs: Any) -> settings:
    """Hypothesis settings for a fuzz test: bounded by default, many more under ``-m slow``."""
    return settings(
        max_examples=SLOW_EXAMPLES if slow else EXAMPLES,
        deadline=None,
        derandomize=not slow,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        **kwargs,
    )


def assert_oracle_or_neurocube_error(
    read: Callable[[], Any], oracle: Any, *, checksummed: bool, what: str = ""
) -> str:
    """Call ``read()``; pass if it returns the oracle's values or raises a neurocube error.

    For a format without checksums, ``read()`` may also return other values (the damage fell in
    data bytes nothing can verify); for a checksummed one it may not. Any other exception fails the
    test. Returns ``"same"``, ``"error"`` or ``"different"``.
    """
    try:
        got = read()
    except NeurocubeError:
        return "error"
    if _equal(got, oracle):
        return "same"
    if checksummed:
        raise AssertionError(f"{what}: damaged input returned values that differ from the oracle")
    return "different"


def _equal(a: Any, b: Any) -> bool:
    if isinstance(b, dict):
        return isinstance(a, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in b)
    if isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    a_arr, b_arr = np.asarray(a), np.asarray(b)
    if a_arr.shape != b_arr.shape:
        return False
    if a_arr.dtype.kind in "fc" or b_arr.dtype.kind in "fc":
        return bool(np.array_equal(a_arr, b_arr, equal_nan=True))
    return bool(np.array_equal(a_arr, b_arr))
