"""Writers of tracks into a behaviour dataset; every write is atomic.

- :func:`index_tracks_raw`: scan folders for raw tracker exports and write
  ``tracks_raw/index.csv``;
- :func:`save_tracks`: one (group, sequence) long-form table to
  ``tracks/<run_id>/<entry_key>.parquet`` and its row in ``tracks/index.csv``.
"""

from __future__ import annotations

import datetime
import fnmatch
import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neurocube import storage
from neurocube.errors import DataNotFoundError, FormatError, SelectionError
from neurocube.io._atomic import atomic_path
from neurocube.io.behavior.conventions import entry_key
from neurocube.io.behavior.index import (
    RAW_INDEX_COLUMNS,
    TRACKS_INDEX_COLUMNS,
    merge_index,
    write_index_csv,
)
from neurocube.io.behavior.layout import stored_path, writable_layout, writable_root
from neurocube.storage import open_file

_DERIVED_RE = re.compile(r"^(VX|VY|AX|AY|SPEED|ANGLE|ACCELERATION)$|#")
_REQUIRED = ("frame", "time", "id", "group", "sequence", "X", "Y")
_TREX_SUFFIX = r"_fish\d+$"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open_file(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def index_tracks_raw(
    dataset: Any,
    search_dirs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    patterns: str | Iterable[str] = ("*.npz",),
    src_format: str = "trex_npz",
    *,
    recursive: bool = True,
    multi_sequences_per_file: bool = False,
    group_from: str | None = None,
    group_pattern: str | None = None,
    exclude_patterns: Iterable[str] | None = None,
    individual_suffix: str | None = _TREX_SUFFIX,
    compute_md5: bool = False,
) -> Path:
    """Scan folders for raw tracking files and write ``tracks_raw/index.csv``.

    Parameters
    ----------
    dataset
        A dataset folder, manifest, :class:`~neurocube.datasets.behavior.BehaviorDataset`
        or :class:`~neurocube.catalog.behavior.BehaviorCatalog`.
    search_dirs
        Folders to scan (they may lie outside the dataset: they are only read).
    patterns
        Glob patterns of file names (``"*.npz"``).
    src_format
        Raw format name recorded in the index (``"trex_npz"`` for TRex exports).
    recursive
        Scan sub-folders too.
    multi_sequences_per_file
        One file holds several sequences: ``sequence`` is left blank and the
        group comes from ``group_from``.
    group_from
        ``"parent"`` (the file's folder name) or ``"filename"`` (its stem).
    group_pattern
        A regex with one capturing group applied to the sequence name, e.g.
        ``r"^(fish[0-9]+)"``; it wins over ``group_from``.
    exclude_patterns
        Glob patterns of file names to skip.
    individual_suffix
        Regex removed from the stem to get the sequence (TRex writes one file
        per individual: ``<video>_fish0.npz`` -> sequence ``<video>``).
    compute_md5
        Hash every file (slow on large files).

    Returns
    -------
    pathlib.Path
        The index written. Rows of files already indexed (same path) are
        replaced; other rows are kept.
    """
    catalog = writable_layout(dataset)
    dirs = [search_dirs] if isinstance(search_dirs, (str, os.PathLike)) else list(search_dirs)
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    excludes = list(exclude_patterns or [])
    if group_from not in (None, "parent", "filename"):
        raise SelectionError(f"group_from must be 'parent', 'filename' or None, got {group_from!r}")
    regex = re.compile(group_pattern) if group_pattern else None
    if regex is not None and regex.groups < 1:
        raise SelectionError(f"group_pattern {group_pattern!r} needs one capturing group")
    found: dict[Path, None] = {}
    for d in dirs:
        folder = Path(d).expanduser()
        if not storage.isdir(folder):
            raise DataNotFoundError(f"{folder}: search folder does not exist")
        # one listing of the folder (recursive: every level), matched against each pattern
        files = (
            list(storage.find(folder))
            if recursive
            else [e.path for e in storage.listdir(folder) if not e.is_dir]
        )
        for pat in pats:
            for loc in sorted(files, key=Path):
                name = os.path.basename(loc)
                if fnmatch.fnmatchcase(name, pat) and not any(
                    fnmatch.fnmatch(name, ex) for ex in excludes
                ):
                    found[storage.local_path(loc)] = None
    rows = []
    for p in found:
        stem = p.name
        for suffix in (".parquet", ".npz", ".npy", ".csv", ".h5"):
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        if multi_sequences_per_file:
            sequence = ""
        else:
            sequence = re.sub(individual_suffix, "", stem) if individual_suffix else stem
        group = ""
        if group_from == "parent":
            group = p.parent.name
        elif group_from == "filename":
            group = stem
        if regex is not None:
            m = regex.search(sequence or stem)
            if m:
                group = m.group(1)
        st = storage.info(p)
        rows.append(
            {
                "group": group,
                "sequence": sequence,
                "abs_path": stored_path(catalog, p),
                "src_format": src_format,
                "size_bytes": str(st.size),
                "mtime_iso": datetime.datetime.fromtimestamp(
                    st.mtime_ns / 1e9, datetime.timezone.utc
                ).isoformat(),
                "md5": _md5(p) if compute_md5 else "",
            }
        )
    if not rows:
        raise DataNotFoundError(
            f"no files matching {pats} under {[str(d) for d in dirs]}; nothing to index"
        )
    index_file = writable_root(catalog, "tracks_raw") / "index.csv"
    table = merge_index(index_file, pd.DataFrame(rows, dtype=str), RAW_INDEX_COLUMNS)
    write_index_csv(table, index_file)
    catalog.invalidate()
    return index_file


def _validate_tracks(table: pd.DataFrame, std_format: str, where: str) -> None:
    missing = [c for c in _REQUIRED if c not in table.columns]
    if missing:
        raise FormatError(
            f"{where}: a {std_format} table needs columns {list(_REQUIRED)}; missing {missing}"
        )
    if std_format in ("mosaic_v1", "mosaic_cm_v1"):
        derived = [c for c in table.columns if _DERIVED_RE.search(str(c))]
        if derived:
            raise FormatError(
                f"{where}: derived columns {derived} are not allowed in {std_format} (compute "
                "them as features); drop them or write std_format='trex_v2'."
            )


def save_tracks(
    dataset: Any,
    group: str,
    sequence: str,
    table: pd.DataFrame,
    *,
    run_id: str,
    std_format: str = "mosaic_v1",
    producer: str = "neurocube",
    source_path: str | os.PathLike[str] | None = None,
    source_md5: str = "",
    row_group_size: int = 65536,
    overwrite: bool = False,
    extra_index: Mapping[str, str] | None = None,
) -> Path:
    """Write one (group, sequence) long-form table as parquet and record it in ``tracks/index.csv``.

    The file is ``tracks/<run_id>/<entry_key>.parquet`` (run-folder layout),
    rows sorted by (frame, id), written with row-group statistics so frame
    filters can skip row groups.

    Raises
    ------
    FormatError
        If required columns are missing or a ``mosaic_v1`` table holds derived columns.
    OutputExistsError
        (a ``FileExistsError``) If the file exists and ``overwrite`` is False.
    UnsafePathError
        If the tracks root or ``run_id`` leads outside the dataset.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    catalog = writable_layout(dataset)
    if not run_id or "/" in run_id or "\\" in run_id or run_id in (".", ".."):
        raise SelectionError(f"run_id must be a plain folder name, got {run_id!r}")
    tracks_root = writable_root(catalog, "tracks")
    target = tracks_root / run_id / f"{entry_key(group, sequence)}.parquet"
    catalog.check_writable(target, "tracks file")
    table = table.copy()
    table["group"] = group
    table["sequence"] = sequence
    _validate_tracks(table, std_format, str(target))
    table = table.sort_values(["frame", "id"], kind="stable").reset_index(drop=True)
    table["frame"] = table["frame"].astype(np.int64)
    table["id"] = table["id"].astype(np.int64)
    front = [c for c in _REQUIRED]
    table = table[front + [c for c in table.columns if c not in front]]
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    started = _now()
    with atomic_path(target, overwrite=overwrite) as tmp:
        pq.write_table(arrow, tmp, row_group_size=row_group_size, write_statistics=True,
                       write_page_checksum=True)
    n_keypoints = len([c for c in table.columns if re.fullmatch(r"poseX\d+", str(c))])
    row = {
        "abs_path": stored_path(catalog, target),
        "run_id": run_id,
        "started_at": started,
        "finished_at": _now(),
        "group": group,
        "sequence": sequence,
        "producer": producer,
        "std_format": std_format,
        "producer_run_id": "",
        "source_abs_path": stored_path(catalog, Path(source_path)) if source_path else "",
        "source_md5": source_md5,
        "consumed_source_roots": "tracks_raw" if source_path else "",
        "n_rows": str(len(table)),
        "n_keypoints": str(n_keypoints),
        "frame_min": str(int(table["frame"].min())) if len(table) else "",
        "frame_max": str(int(table["frame"].max())) if len(table) else "",
        **dict(extra_index or {}),
    }
    index_file = tracks_root / "index.csv"
    merged = merge_index(index_file, pd.DataFrame([row], dtype=str), TRACKS_INDEX_COLUMNS)
    write_index_csv(merged, index_file)
    catalog.invalidate()
    return target
