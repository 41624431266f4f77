"""Dask graph pieces shared by the long form and the label events.

A string coordinate that is constant over runs of rows (``group``,
``sequence``) is built chunk by chunk from (value, count) pieces with no I/O;
:func:`pick_variable` takes one variable out of a chunk task that read several.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph


def fill_strings(pieces: tuple[tuple[str, int], ...], dtype: str) -> np.ndarray:
    """Return one chunk of a :func:`constant_strings` coordinate: each value repeated."""
    if len(pieces) == 1:
        return np.full(pieces[0][1], pieces[0][0], dtype=dtype)
    return np.concatenate([np.full(n, v, dtype=dtype) for v, n in pieces])


def constant_strings(chunks: Sequence[Sequence[tuple[str, int]]], what: str) -> da.Array:
    """Build a lazy string coordinate: chunk i is its (value, count) pieces, no I/O."""
    width = max([len(v) for c in chunks for v, _ in c] + [1])
    dtype = f"<U{width}"
    frozen = [tuple((str(v), int(n)) for v, n in c) for c in chunks]
    token = tokenize(frozen, dtype)
    name = f"{what}-{token}"
    if not frozen:
        return da.from_array(np.empty(0, dtype=dtype), name=name)
    layer: dict[Any, Any] = {(name, i): (fill_strings, c, dtype) for i, c in enumerate(frozen)}
    return da.Array(
        HighLevelGraph.from_collections(name, layer, dependencies=()),
        name,
        (tuple(sum(n for _, n in c) for c in frozen),),
        dtype=np.dtype(dtype),
    )


def pick_variable(chunk: dict[str, np.ndarray], key: str) -> np.ndarray:
    """Take variable ``key`` out of a chunk task's dict of arrays."""
    return chunk[key]
