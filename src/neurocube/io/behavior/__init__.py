"""Writers for behaviour datasets (the ``mosaic`` layout); every write is atomic.

- :func:`save_manifest`: ``dataset.yaml`` / ``.yml`` / ``.json``, unknown keys kept;
- :func:`write_index_csv`: an index CSV, every cell text;
- :func:`index_tracks_raw`: scan folders for raw tracker exports and write
  ``tracks_raw/index.csv``;
- :func:`save_tracks`: one (group, sequence) long-form table to
  ``tracks/<run_id>/<entry_key>.parquet`` and its row in ``tracks/index.csv``;
- :func:`convert_tracks`: raw TRex per-individual ``.npz`` exports to
  ``mosaic_v1`` parquet (pixels) in the run-folder layout.

No writer writes outside the dataset folder: a root or index path that leads
elsewhere (``..``, an absolute path, a remapped prefix) raises
:class:`~neurocube.errors.UnsafePathError`.
"""

from __future__ import annotations

import datetime
import fnmatch
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neurocube import storage
from neurocube.errors import DataNotFoundError, FormatError, SelectionError, UnsafePathError
from neurocube.io._atomic import atomic_path
from neurocube.io.behavior.conventions import (  # noqa: F401  (re-exported)
    _INDEX_KINDS,
    DEFAULT_ROOTS,
    MANIFEST_NAMES,
    MANIFEST_VERSION,
    STD_FORMAT_UNITS,
    _url_join,
    entry_key,
    is_inside,
    longest_prefix_remap,
    split_list_cell,
    std_format_of,
)
from neurocube.io.behavior.index import (
    RAW_INDEX_COLUMNS,
    TRACKS_INDEX_COLUMNS,
    _filter_pairs,
    _merge_index,
    index_file,
    read_index_csv,
    write_index_csv,
)
from neurocube.io.behavior.manifest import (  # noqa: F401  (re-exported)
    Manifest,
    _stat_or_none,
    _version_key,
    find_manifest,
    save_manifest,
)
from neurocube.storage import StorageOptions, is_url, open_file

__all__ = [
    "RAW_INDEX_COLUMNS",
    "TRACKS_INDEX_COLUMNS",
    "convert_tracks",
    "index_tracks_raw",
    "save_manifest",
    "save_tracks",
    "write_index_csv",
]

# --------------------------------------------------------------------------- layout
# What readers (neurocube.catalog.behavior) and these writers both need lives here, in the
# lower layer: names, roots, entry keys, index CSVs and the manifest.


# --------------------------------------------------------------------------- writers


_DERIVED_RE = re.compile(r"^(VX|VY|AX|AY|SPEED|ANGLE|ACCELERATION)$|#")
_REQUIRED = ("frame", "time", "id", "group", "sequence", "X", "Y")
_TREX_SUFFIX = r"_fish\d+$"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


class DatasetLayout:
    """The layout of one behaviour dataset: manifest, root, index files, stored paths.

    Holds what readers and writers both need: where the index CSVs are, reading
    one (every cell text), resolving the paths stored in them and refusing
    writes that leave the dataset. Writers given a path use it as it is (a
    local dataset); :class:`~neurocube.catalog.behavior.BehaviorCatalog` builds
    on it (URLs, ``path_map``, cached indexes), so this module needs nothing
    from the layers above it.
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        path_map: Mapping[str, str] | None = None,
        storage_options: StorageOptions | None = None,
    ) -> None:
        self.manifest = manifest
        self.path_map: dict[str, str] = dict(path_map or {})
        self.storage_options = storage_options

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> DatasetLayout:
        """Open a local dataset from its folder or manifest, to write into it."""
        if is_url(path):
            raise UnsafePathError(
                f"{path}: behaviour datasets at a URL are read-only; write into a local copy."
            )
        return cls(Manifest.load(path))

    @property
    def root(self) -> Path:
        """The dataset folder."""
        return self.manifest.dataset_dir

    def index_path(self, kind: str) -> Path:
        """Return the index CSV of ``tracks_raw``, ``tracks`` or ``labels/<kind>``."""
        return index_file(self.manifest, kind)

    def read_index(self, kind: str) -> pd.DataFrame:
        """Read an index CSV (every cell text).

        Raises
        ------
        DataNotFoundError
            If the index does not exist.
        """
        path = self.index_path(kind)
        if not storage.isfile(path):
            raise DataNotFoundError(f"{path}: no {kind} index in dataset {self.root}.")
        return self._load_index(path)

    def _load_index(self, path: str | os.PathLike[str]) -> pd.DataFrame:
        """Read an index CSV that has an ``abs_path`` column; blank group/sequence/run_id added."""
        table = read_index_csv(path, self.storage_options)
        if "abs_path" not in table.columns:
            raise FormatError(f"{path}: index has no 'abs_path' column; found "
                              f"{list(table.columns)}.")
        for col in ("group", "sequence", "run_id"):
            if col not in table.columns:
                table[col] = ""
        return table

    def _stored_text(self, path: str | os.PathLike[str]) -> str:
        """Return the text of a path stored in the manifest or an index (empty: an error)."""
        text = os.fspath(path).strip()
        if not text:
            raise FormatError(f"{self.manifest.path}: empty path in an index row")
        return text

    def resolve_path(
        self, path: str | os.PathLike[str], anchor: str | os.PathLike[str] | None = None
    ) -> Path:
        """Resolve a stored path to an absolute local path.

        A relative path is taken relative to ``anchor`` (default: the dataset
        folder); an absolute one goes through :meth:`_resolve_absolute`.
        """
        p = Path(self._stored_text(path)).expanduser()
        if not p.is_absolute():
            return Path(anchor) / p if anchor is not None else self.root / p
        return self._resolve_absolute(p)

    def _resolve_absolute(self, path: Path) -> Path:
        """Return an absolute stored path as it is (a catalog remaps paths that moved)."""
        return path

    def check_writable(self, path: str | os.PathLike[str], what: str) -> Path:
        """Return ``path`` if it lies inside the dataset, else raise :class:`UnsafePathError`."""
        p = Path(path)
        if not is_inside(p, self.root):
            raise UnsafePathError(
                f"{what}: {p} lies outside the dataset {self.root}; neurocube never writes there "
                "(a '..' or a path_map prefix points away). Fix the manifest root or index path."
            )
        return p

    def invalidate(self) -> None:
        """Forget anything cached (after a writer changed the indexes); nothing here."""


def _catalog(dataset: Any) -> Any:
    """Return the catalog of ``dataset`` (a catalog, a dataset holding one, or a path)."""
    catalog = getattr(dataset, "catalog", dataset)
    if all(hasattr(catalog, name) for name in
           ("manifest", "read_index", "resolve_path", "check_writable", "invalidate")):
        if getattr(catalog.manifest, "is_remote", False):
            raise UnsafePathError(
                f"{catalog.manifest.path}: behaviour datasets at a URL are read-only; write "
                "into a local copy."
            )
        return catalog
    return DatasetLayout.open(dataset)


def _stored_path(catalog: Any, path: Path) -> str:
    """Dataset-relative POSIX path when inside the dataset, else the absolute path."""
    real = Path(os.path.realpath(path))
    base = Path(os.path.realpath(catalog.root))
    if real == base or base in real.parents:
        return real.relative_to(base).as_posix()
    return str(real)


def _writable_root(catalog: Any, key: str) -> Path:
    folder = catalog.manifest.get_root(key)
    if not is_inside(folder, catalog.root):
        raise UnsafePathError(
            f"{catalog.manifest.path}: root {key!r} is {folder}, outside the dataset "
            f"{catalog.root}; neurocube writes only inside a dataset. Point the root inside it."
        )
    return folder


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
    catalog = _catalog(dataset)
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
                "abs_path": _stored_path(catalog, p),
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
    index_file = _writable_root(catalog, "tracks_raw") / "index.csv"
    table = _merge_index(index_file, pd.DataFrame(rows, dtype=str), RAW_INDEX_COLUMNS)
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

    catalog = _catalog(dataset)
    if not run_id or "/" in run_id or "\\" in run_id or run_id in (".", ".."):
        raise SelectionError(f"run_id must be a plain folder name, got {run_id!r}")
    tracks_root = _writable_root(catalog, "tracks")
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
        "abs_path": _stored_path(catalog, target),
        "run_id": run_id,
        "started_at": started,
        "finished_at": _now(),
        "group": group,
        "sequence": sequence,
        "producer": producer,
        "std_format": std_format,
        "producer_run_id": "",
        "source_abs_path": _stored_path(catalog, Path(source_path)) if source_path else "",
        "source_md5": source_md5,
        "consumed_source_roots": "tracks_raw" if source_path else "",
        "n_rows": str(len(table)),
        "n_keypoints": str(n_keypoints),
        "frame_min": str(int(table["frame"].min())) if len(table) else "",
        "frame_max": str(int(table["frame"].max())) if len(table) else "",
        **dict(extra_index or {}),
    }
    index_file = tracks_root / "index.csv"
    merged = _merge_index(index_file, pd.DataFrame([row], dtype=str), TRACKS_INDEX_COLUMNS)
    write_index_csv(merged, index_file)
    catalog.invalidate()
    return target


def _load_trex_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with open_file(path, "rb") as fh, np.load(fh, allow_pickle=False) as npz:
            return {name: np.asarray(npz[name]) for name in npz.files}
    except ValueError as exc:
        raise FormatError(
            f"{path}: not a plain TRex export ({exc}); TRex writes numeric arrays only, "
            "so an object member means another writer."
        ) from exc


def _trex_frame(
    path: Path, arrays: dict[str, np.ndarray], cm_per_pixel: float | None, to_pixels: bool
) -> tuple[pd.DataFrame, float | None]:
    for needed in ("frame", "X", "Y"):
        if needed not in arrays:
            raise FormatError(
                f"{path}: TRex export has no {needed!r} array; members are {sorted(arrays)}"
            )
    n = arrays["frame"].shape[0]
    if "id" in arrays and np.asarray(arrays["id"]).size >= 1:
        ident = int(np.asarray(arrays["id"]).reshape(-1)[0])
    else:
        m = re.search(r"_fish(\d+)$", path.stem)
        if m is None:
            raise FormatError(f"{path}: no 'id' array and no _fish<k> suffix to take the id from")
        ident = int(m.group(1))
    scale = cm_per_pixel
    if scale is None and "cm_per_pixel" in arrays and np.asarray(arrays["cm_per_pixel"]).size:
        scale = float(np.asarray(arrays["cm_per_pixel"]).reshape(-1)[0])
    if to_pixels and not (scale and np.isfinite(scale) and scale > 0):
        raise FormatError(
            f"{path}: positions are in cm and the export has no usable cm_per_pixel "
            f"(found {scale!r}); pass cm_per_pixel=<float> or std_format='mosaic_cm_v1'."
        )
    columns: dict[str, np.ndarray] = {}
    for name, values in arrays.items():
        if values.ndim != 1 or values.shape[0] != n or name in ("id", "cm_per_pixel"):
            continue
        columns[name] = values
    frame = pd.DataFrame(columns)
    frame["id"] = ident
    x_col = "X#wcentroid" if "X#wcentroid" in frame.columns else "X"
    y_col = "Y#wcentroid" if "Y#wcentroid" in frame.columns else "Y"
    out = pd.DataFrame(
        {
            "frame": frame["frame"].astype(np.int64),
            "time": frame["time"].astype(np.float64) if "time" in frame else np.nan,
            "id": np.int64(ident),
            "X": frame[x_col].astype(np.float64),
            "Y": frame[y_col].astype(np.float64),
        }
    )
    pose = sorted(
        {int(m.group(1)) for c in frame.columns if (m := re.fullmatch(r"poseX(\d+)", str(c)))}
    )
    for k in pose:
        if f"poseY{k}" not in frame:
            continue
        out[f"poseX{k}"] = frame[f"poseX{k}"].astype(np.float64)
        out[f"poseY{k}"] = frame[f"poseY{k}"].astype(np.float64)
    position_cols = [c for c in out.columns if c not in ("frame", "time", "id")]
    values = out[position_cols].to_numpy()
    values[~np.isfinite(values)] = np.nan  # TRex marks a lost individual with inf
    if to_pixels:
        assert scale is not None
        values = values / scale
    out[position_cols] = values
    tracked = ~np.isnan(values).all(axis=1)
    return out[tracked].reset_index(drop=True), scale


def convert_tracks(
    dataset: Any,
    *,
    groups: str | Iterable[str] | None = None,
    sequences: str | Iterable[str] | None = None,
    src_format: str = "trex_npz",
    std_format: str = "mosaic_v1",
    cm_per_pixel: float | None = None,
    row_group_size: int = 65536,
    overwrite: bool = False,
) -> list[Path]:
    """Convert raw tracks listed in ``tracks_raw/index.csv`` to standard parquet.

    Supported raw format: ``trex_npz``, TRex's per-individual ``.npz`` exports
    (one 1-D array per column, ``id`` and ``cm_per_pixel`` as 1-element arrays,
    positions in cm, ``inf`` where the individual was lost). The files of one
    (group, sequence) are merged into one long table, one row per (frame, id):

    - ``X, Y`` come from ``X#wcentroid, Y#wcentroid`` when present (the
      weighted centroid), else from ``X, Y``; ``poseX<k>, poseY<k>`` are kept;
    - ``inf`` becomes NaN, and rows where nothing was tracked are dropped;
    - ``std_format="mosaic_v1"`` stores pixels (cm / ``cm_per_pixel``, taken
      from the export unless given); ``"mosaic_cm_v1"`` keeps centimetres;
    - derived columns (``SPEED, ANGLE, VX, ...``) are not kept.

    Output: ``tracks/<run_id>/<entry_key>.parquet`` with
    ``run_id = "convert-trex_npz.1-<hash of the parameters>"`` and a
    ``params.json`` beside them; ``tracks/index.csv`` is updated atomically.

    Returns
    -------
    list of pathlib.Path
        The parquet files written (or found, when they exist and not ``overwrite``).
    """
    if src_format != "trex_npz":
        raise SelectionError(
            f"no converter for src_format {src_format!r}; neurocube converts 'trex_npz' "
            "(TRex per-individual .npz exports)"
        )
    if std_format not in ("mosaic_v1", "mosaic_cm_v1"):
        raise SelectionError(
            f"std_format must be 'mosaic_v1' or 'mosaic_cm_v1', not {std_format!r}"
        )
    catalog = _catalog(dataset)
    raw = catalog.read_index("tracks_raw")
    raw = raw[raw["src_format"] == src_format]
    raw = _filter_pairs(raw, groups, sequences, catalog.index_path("tracks_raw"))
    if raw.empty:
        raise SelectionError(
            f"{catalog.index_path('tracks_raw')}: no {src_format} rows to convert for "
            f"groups={groups!r}, sequences={sequences!r}; run index_tracks_raw first."
        )
    params = {"src_format": src_format, "std_format": std_format, "cm_per_pixel": cm_per_pixel}
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode(), usedforsecurity=False)
    run_id = f"convert-{src_format}.1-{digest.hexdigest()[:10]}"
    run_dir = _writable_root(catalog, "tracks") / run_id
    catalog.check_writable(run_dir, "run folder")
    with atomic_path(run_dir / "params.json") as tmp:
        tmp.write_text(
            json.dumps({"op": f"convert-{src_format}", "version": "1", "params": params}, indent=2)
            + "\n"
        )
    written = []
    to_pixels = std_format == "mosaic_v1"
    for (group, sequence), rows in raw.groupby(["group", "sequence"], sort=True):
        target = (
            catalog.manifest.get_root("tracks") / run_id / f"{entry_key(group, sequence)}.parquet"
        )
        if target.exists() and not overwrite:
            written.append(target)
            continue
        pieces = []
        sources = []
        scales = set()
        for cell in rows["abs_path"]:
            src = catalog.resolve_path(cell)
            sources.append(src)
            piece, scale = _trex_frame(src, _load_trex_npz(src), cm_per_pixel, to_pixels)
            scales.add(scale)
            pieces.append(piece)
        table = pd.concat(pieces, ignore_index=True)
        if table.duplicated(["frame", "id"]).any():
            raise FormatError(
                f"{[str(s) for s in sources]}: two exports of ({group!r}, {sequence!r}) hold the "
                "same (frame, id); give each individual its own id."
            )
        extra = {}
        if len(scales) == 1 and None not in scales:
            extra["cm_per_pixel"] = repr(float(next(iter(scales))))  # type: ignore[arg-type]
        written.append(
            save_tracks(
                catalog,
                str(group),
                str(sequence),
                table,
                run_id=run_id,
                std_format=std_format,
                producer=f"convert-{src_format}",
                source_path=sources[0] if len(sources) == 1 else None,
                row_group_size=row_group_size,
                overwrite=True,
                extra_index=extra,
            )
        )
    return written
