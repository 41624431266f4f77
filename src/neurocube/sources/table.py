"""Wide parquet tables (id columns + numeric feature columns) read row group by row group.

The combined embedding tables (``combined/<model>_<condition>_<level>_embeddings.parquet``)
are wide: a few string id columns, then hundreds of ``embedding_NNNN`` float
columns. :func:`parquet_layout` reads the footer only; :func:`read_feature_rowgroup`
is the chunk task: it reads the feature columns of one row group into a 2-D
``(rows, features)`` array. Tasks carry a :class:`ParquetRowGroup` spec (path,
size, mtime, row group, columns), never a handle; each process keeps the parsed
footers of the files it reads (keyed by path, size and mtime) so a task does not
parse the footer again.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neurocube.errors import DataNotFoundError, FormatError
from neurocube.storage import IO_STATS, open_file

__all__ = [
    "PARQUET_MAGIC",
    "ParquetLayout",
    "ParquetRowGroup",
    "parquet_layout",
    "read_feature_rowgroup",
]

PARQUET_MAGIC = b"PAR1"
_FOOTERS: OrderedDict[tuple[str, int, int], Any] = OrderedDict()
_FOOTERS_LOCK = threading.Lock()
_FOOTERS_MAX = 128


@dataclass(frozen=True)
class ParquetRowGroup:
    """What a chunk task needs to read one row group's feature columns."""

    path: str
    size: int
    mtime_ns: int
    row_group: int
    columns: tuple[str, ...]
    dtype: str


@dataclass(frozen=True)
class ParquetLayout:
    """A parquet file's identity, column names and types, and rows per row group."""

    path: str
    size: int
    mtime_ns: int
    columns: tuple[str, ...]
    column_types: dict[str, str]
    row_group_rows: tuple[int, ...]


def _metadata(path: str, size: int, mtime_ns: int) -> Any:
    """Return the parsed footer of ``path`` (memoised per process)."""
    import pyarrow.lib
    import pyarrow.parquet as pq

    key = (path, size, mtime_ns)
    with _FOOTERS_LOCK:
        cached = _FOOTERS.get(key)
        if cached is not None:
            _FOOTERS.move_to_end(key)
            return cached
    with open_file(path) as fh:
        head = fh.read(4)
        if head != PARQUET_MAGIC:
            raise FormatError(
                f"{path}: not a parquet file (expected magic 'PAR1', found {head!r})."
            )
        try:
            metadata = pq.read_metadata(fh)
        except (pyarrow.lib.ArrowInvalid, OSError) as exc:
            raise FormatError(
                f"{path}: unreadable parquet footer ({exc}); rewrite the table."
            ) from exc
    IO_STATS.add_bytes(metadata.serialized_size + 12)
    with _FOOTERS_LOCK:
        _FOOTERS[key] = metadata
        while len(_FOOTERS) > _FOOTERS_MAX:
            _FOOTERS.popitem(last=False)
    return metadata


def parquet_layout(path: str | os.PathLike[str]) -> ParquetLayout:
    """Read a parquet footer: columns, their arrow types, rows per row group.

    Raises
    ------
    DataNotFoundError
        If the file does not exist.
    FormatError
        If it is not a parquet file.
    """
    local = Path(path).resolve()
    try:
        st = local.stat()
    except FileNotFoundError as exc:
        raise DataNotFoundError(f"{local}: no such parquet table.") from exc
    metadata = _metadata(str(local), st.st_size, st.st_mtime_ns)
    schema = metadata.schema.to_arrow_schema()
    return ParquetLayout(
        path=str(local),
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        columns=tuple(schema.names),
        column_types={f.name: str(f.type) for f in schema},
        row_group_rows=tuple(
            metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)
        ),
    )


def read_columns(layout: ParquetLayout, columns: list[str]) -> dict[str, np.ndarray]:
    """Read whole columns (e.g. the small id columns) eagerly, as numpy arrays."""
    import pyarrow.parquet as pq

    metadata = _metadata(layout.path, layout.size, layout.mtime_ns)
    with open_file(layout.path) as fh:
        table = pq.ParquetFile(fh, metadata=metadata).read(columns=columns)
    IO_STATS.add_bytes(table.nbytes)
    out: dict[str, np.ndarray] = {}
    for name in columns:
        out[name] = table.column(name).to_numpy()
    return out


def read_feature_rowgroup(spec: ParquetRowGroup) -> np.ndarray:
    """Read the feature columns of one row group into a ``(rows, len(columns))`` array."""
    import pyarrow.parquet as pq

    metadata = _metadata(spec.path, spec.size, spec.mtime_ns)
    with open_file(spec.path) as fh:
        table = pq.ParquetFile(fh, metadata=metadata).read_row_group(
            spec.row_group, columns=list(spec.columns)
        )
    IO_STATS.add_bytes(table.nbytes)
    out = np.empty((table.num_rows, len(spec.columns)), dtype=np.dtype(spec.dtype))
    for j, column in enumerate(table.columns):
        out[:, j] = column.to_numpy()
    return out
