"""The long form of the tracks: one ``row`` per (frame, id), chunked by parquet row groups.

:meth:`~neurocube.datasets.behavior.BehaviorDataset.tracks` chooses the
columns (:func:`choose_columns`), weighs a frame range (:func:`planned_bytes`)
and builds the variables either lazily (:func:`lazy_long`, one Dask task per
chunk of row groups) or by reading now (:func:`eager_long`, one read per file):
the same rows, values, dtypes and coordinates either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from neurocube.datasets.behavior.graph import constant_strings, fill_strings
from neurocube.datasets.behavior.track_files import KEY_COLUMNS, STRING_KEYS, TrackFile
from neurocube.errors import SelectionError
from neurocube.sources.parquet import (
    ParquetChunkSpec,
    group_chunks,
    lazy_columns,
    plan_chunks,
    read_rows,
    row_groups_in_range,
)


def planned_bytes(
    files: Sequence[TrackFile], lo: int | None, hi: int | None, dtypes: Sequence[str]
) -> int:
    """Bytes of the long form's values in the row groups a frame range keeps (statistics only)."""
    row_bytes = sum(np.dtype(dt).itemsize for dt in dtypes)
    rows = 0
    for f in files:
        groups = row_groups_in_range(f.info, "frame", (lo, hi))
        rows += sum(f.info.row_group_rows[i] for i, _ in groups)
    return rows * row_bytes


def lazy_long(
    files: Sequence[TrackFile],
    out_columns: list[str],
    dtypes: list[str],
    keys: list[str],
    data_columns: list[str],
    scaled_columns: tuple[str, ...],
    frames: tuple[int | None, int | None] | None,
    exact: bool,
    min_chunk_rows: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Plan the long form's chunks; return its Dask-backed coords and data variables."""
    specs: list[ParquetChunkSpec] = []
    owner_of: dict[str, TrackFile] = {}
    for f in files:
        owner_of[f.path] = f
        file_specs = plan_chunks(
            f.info,
            out_columns,
            dtypes,
            filter_column="frame" if frames is not None else None,
            filter_range=frames,
            exact=exact,
            min_chunk_rows=min_chunk_rows,
        )
        if f.scale != 1.0:
            file_specs = [replace(s, scale=f.scale, scaled=scaled_columns) for s in file_specs]
        specs += file_specs
    chunks = group_chunks(specs, min_chunk_rows)
    scaled = lazy_columns(chunks, out_columns, dtypes, name="tracks")
    coords: dict[str, Any] = {k: ("row", scaled[k]) for k in keys}
    for key in STRING_KEYS:
        pieces = [[(getattr(owner_of[s.path], key), s.n_rows) for s in c] for c in chunks]
        coords[key] = ("row", constant_strings(pieces, key))
    data_vars = {c: ("row", scaled[c]) for c in data_columns}
    return coords, data_vars


def eager_long(
    files: Sequence[TrackFile],
    out_columns: list[str],
    dtypes: list[str],
    keys: list[str],
    data_columns: list[str],
    scaled_columns: tuple[str, ...],
    frames: tuple[int | None, int | None] | None,
    exact: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read the long form now (one read per file); return numpy-backed coords and variables.

    The same rows, values, dtypes and coordinates as :func:`lazy_long` computes.
    """
    parts: list[dict[str, np.ndarray]] = []
    owners: list[tuple[TrackFile, int]] = []
    for f in files:
        part = read_rows(
            f.info,
            out_columns,
            dtypes,
            filter_column="frame" if frames is not None else None,
            filter_range=frames,
            exact=exact,
            scale=f.scale,
            scaled=scaled_columns if f.scale != 1.0 else (),
        )
        n = len(part[out_columns[0]]) if out_columns else 0
        if n:
            parts.append(part)
            owners.append((f, n))
    values: dict[str, np.ndarray] = {}
    for c, dt in zip(out_columns, dtypes, strict=True):
        if len(parts) == 1:
            values[c] = parts[0][c]
        else:
            values[c] = np.concatenate([p[c] for p in parts] or [np.empty(0, dtype=dt)])
    coords: dict[str, Any] = {k: ("row", values[k]) for k in keys}
    for key in STRING_KEYS:
        pieces = tuple((str(getattr(f, key)), n) for f, n in owners)
        width = max([len(v) for v, _ in pieces] + [1])
        strings = (
            fill_strings(pieces, f"<U{width}") if pieces else np.empty(0, dtype=f"<U{width}")
        )
        coords[key] = ("row", strings)
    data_vars = {c: ("row", values[c]) for c in data_columns}
    return coords, data_vars


def choose_columns(files: list[TrackFile], columns: Sequence[str] | None) -> list[str]:
    """Return the numeric columns to load (all but the keys if ``columns`` is None), checked."""
    numeric: dict[str, None] = {}
    others: set[str] = set()
    for f in files:
        numeric.update(dict.fromkeys(f.info.dtypes))
        others |= set(f.info.other_columns)
    if columns is None:
        return [c for c in numeric if c not in KEY_COLUMNS]
    chosen = []
    for c in columns:
        if c in KEY_COLUMNS:
            continue
        if c in others or c in STRING_KEYS:
            raise SelectionError(
                f"column {c!r} is not numeric (group/sequence are coordinates already); only "
                "numeric columns load as arrays"
            )
        if c not in numeric:
            raise SelectionError(
                f"column {c!r} is in none of the selected tracks files ({files[0].path}, ...); "
                f"columns are {list(numeric)}"
            )
        chosen.append(c)
    return chosen
