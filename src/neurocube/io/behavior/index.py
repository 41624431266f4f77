"""The index CSVs of the ``mosaic`` layout: where they are, reading, selecting, writing.

Every cell of an index is text: :func:`read_index_csv` keeps a blank cell
``""`` and ``0.10`` as ``"0.10"``; :func:`write_index_csv` writes each cell
as text, atomically. The column lists of ``tracks_raw/index.csv`` and
``tracks/index.csv``, the merge of new rows into an index and the selection
of rows by group and sequence live here too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from neurocube import storage
from neurocube.errors import FormatError, SelectionError
from neurocube.io._atomic import atomic_path
from neurocube.io.behavior.conventions import INDEX_KINDS
from neurocube.io.behavior.manifest import Manifest
from neurocube.storage import is_url, open_file


def _below(folder: Path, *parts: str) -> Path:
    """Join ``parts`` below a folder: a :class:`Path`, or a URL string for a remote dataset."""
    if is_url(folder):
        return cast(Path, storage.join(str(folder), *parts))
    return folder.joinpath(*parts)


def index_file(manifest: Manifest, kind: str) -> Path:
    """Return the index CSV of ``tracks_raw``, ``tracks`` or ``labels/<kind>`` of a dataset."""
    if kind in INDEX_KINDS:
        return _below(manifest.get_root(kind), "index.csv")
    if kind.startswith("labels/"):
        return _below(manifest.get_root("labels"), kind.split("/", 1)[1], "index.csv")
    raise SelectionError(
        f"unknown index {kind!r}; expected 'tracks_raw', 'tracks' or 'labels/<kind>'"
    )


def read_index_csv(
    path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """Read an index CSV with every cell as text (blank stays ``""``, ``0.10`` stays ``"0.10"``).

    A URL is read whole in one request with ``storage_options``.

    Raises
    ------
    DataNotFoundError
        If the file does not exist.
    FormatError
        If it is not a CSV with a header row.
    """
    remote = is_url(path)
    with open_file(path, "rb", storage_options if remote else None,
                   cache_type="all" if remote else None) as fh:
        try:
            table = pd.read_csv(fh, dtype=str, keep_default_na=False, na_filter=False)
        except pd.errors.EmptyDataError as exc:
            raise FormatError(
                f"{path}: empty index CSV; expected a header row "
                "(e.g. 'group,sequence,abs_path,...')."
                " Rebuild it with neurocube.index_tracks_raw / convert_tracks."
            ) from exc
        except pd.errors.ParserError as exc:
            raise FormatError(f"{path}: not a readable CSV index ({exc}).") from exc
    return table


def _as_set(value: str | Iterable[str] | None) -> set[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return {value}
    return {str(v) for v in value}


def filter_pairs(
    table: pd.DataFrame,
    groups: str | Iterable[str] | None,
    sequences: str | Iterable[str] | None,
    index_file: Path,
) -> pd.DataFrame:
    """Return the rows of index ``table`` in ``groups`` and ``sequences`` (None: all), renumbered.

    Shared by the catalog, the label reader and the TRex converter.

    Raises
    ------
    SelectionError
        If a group, or a sequence in the selected groups, is not in the index
        (``index_file`` names it in the message).
    """
    want_groups = _as_set(groups)
    want_sequences = _as_set(sequences)
    # plain Python over the two name columns, one take at the end: an index of a few hundred
    # rows is selected in microseconds (pandas' boolean indexing costs ~1 ms per step)
    group_names = table["group"].tolist()
    rows = range(len(group_names))
    if want_groups is not None:
        missing = want_groups - set(group_names)
        if missing:
            raise SelectionError(
                f"{index_file}: no group(s) {sorted(missing)}; "
                f"groups are {sorted(set(group_names))}"
            )
        rows = [i for i in rows if group_names[i] in want_groups]  # type: ignore[assignment]
    if want_sequences is not None:
        sequence_names = table["sequence"].tolist()
        missing = want_sequences - {sequence_names[i] for i in rows}
        if missing:
            known = sorted({sequence_names[i] for i in rows})
            shown = known[:20] + (["..."] if len(known) > 20 else [])
            raise SelectionError(
                f"{index_file}: no sequence(s) {sorted(missing)}"
                + (f" in group(s) {sorted(want_groups)}" if want_groups else "")
                + f"; sequences are {shown}"
            )
        rows = [i for i in rows if sequence_names[i] in want_sequences]  # type: ignore[assignment]
    if len(rows) == len(group_names):
        return table.reset_index(drop=True)
    return table.take(list(rows)).reset_index(drop=True)


RAW_INDEX_COLUMNS = [
    "group",
    "sequence",
    "abs_path",
    "src_format",
    "size_bytes",
    "mtime_iso",
    "md5",
]
TRACKS_INDEX_COLUMNS = [
    "abs_path", "run_id", "started_at", "finished_at", "group", "sequence", "producer",
    "std_format", "producer_run_id", "source_abs_path", "source_md5", "consumed_source_roots",
    "n_rows", "n_keypoints", "frame_min", "frame_max",
]  # fmt: skip


def write_index_csv(table: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write an index CSV atomically, every cell as text (missing values as blank)."""
    text_table = table.copy()
    for col in text_table.columns:
        text_table[col] = ["" if _is_missing(v) else str(v) for v in text_table[col]]
    with atomic_path(path) as tmp:
        text_table.to_csv(tmp, index=False)
    return Path(path)


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, float) and np.isnan(value)


def merge_index(path: Path, new_rows: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Return index ``path`` (if it exists) with ``new_rows`` replacing rows of the same abs_path.

    Columns come in the order of ``columns``, then any others; blanks are ``""``.
    """
    if path.is_file():
        old = read_index_csv(path)
        old = old[~old["abs_path"].isin(set(new_rows["abs_path"]))]
        table = pd.concat([old, new_rows], ignore_index=True)
    else:
        table = new_rows
    ordered = [c for c in columns if c in table.columns]
    ordered += [c for c in table.columns if c not in ordered]
    return table[ordered].fillna("")
