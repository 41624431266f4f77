"""Behaviour-tracking datasets (the ``mosaic`` layout): manifest, roots and index CSVs.

A dataset is a folder with a manifest (``dataset.yaml``, ``.yml`` or ``.json``,
``manifest_version: 3``) naming its roots (``tracks_raw``, ``tracks``,
``labels``, ...) and one ``index.csv`` per root that lists the files in it:

- ``tracks_raw/index.csv``: raw tracker exports (``group, sequence, abs_path,
  src_format, size_bytes, mtime_iso, md5``);
- ``tracks/index.csv``: standardised long-form parquet tracks, one row per
  (group, sequence, run);
- ``labels/<kind>/index.csv``: label files (NPZ) with the label ids and names.

Everything here reads text only: the manifest and the index CSVs. Every index
cell is read as text, so a blank cell stays ``""`` (never NaN) and ``0.10``
stays ``"0.10"``. Nothing is written here except through :meth:`Manifest.save`,
:meth:`BehaviorCatalog.make_portable` and :meth:`BehaviorCatalog.rewrite_index_paths`,
which go through the atomic writers of :mod:`neurocube.io.behavior` and never
write to a path that leaves the dataset.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, cast
from urllib.parse import quote

import pandas as pd

from neurocube import storage
from neurocube.errors import DataNotFoundError, SelectionError
from neurocube.io.behavior.conventions import (
    DEFAULT_ROOTS,
    INDEX_KINDS,
    MANIFEST_NAMES,
    MANIFEST_VERSION,
    STD_FORMAT_UNITS,
    entry_key,
    is_inside,
    longest_prefix_remap,
    split_list_cell,
    std_format_of,
    url_join,
)
from neurocube.io.behavior.index import filter_pairs, read_index_csv, write_index_csv
from neurocube.io.behavior.layout import DatasetLayout
from neurocube.io.behavior.manifest import Manifest, find_manifest, stat_or_none, version_key
from neurocube.storage import ObjectInfo, StorageOptions, as_options, is_url

# The layout helpers and the Manifest live in neurocube.io.behavior (the lower layer: its
# writers need them too); they are re-exported here, where readers look for them.
__all__ = [
    "DEFAULT_ROOTS",
    "MANIFEST_NAMES",
    "MANIFEST_VERSION",
    "STD_FORMAT_UNITS",
    "BehaviorCatalog",
    "Manifest",
    "entry_key",
    "find_manifest",
    "is_inside",
    "longest_prefix_remap",
    "read_index_csv",
    "split_list_cell",
    "std_format_of",
]

# --------------------------------------------------------------------------- catalog


class BehaviorCatalog(DatasetLayout):
    """What a behaviour dataset holds, read from its manifest and index CSVs (text only).

    Builds on :class:`neurocube.io.behavior.DatasetLayout` (index files, stored
    paths, the write guard), adding URLs, ``path_map`` and cached indexes.

    Parameters
    ----------
    path
        The dataset folder or its manifest file.
    path_map
        ``{old prefix: new prefix}`` applied (longest prefix first) to absolute
        paths in the manifest and indexes that do not exist any more, e.g. after
        the dataset moved to another machine (a prefix may map to a URL).
    storage_options
        fsspec options for a dataset at a URL (``s3://bucket/dataset``). A remote
        dataset is listed once (one recursive listing): existence, sizes and
        versions of its files come from that listing, never a request per file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        path_map: Mapping[str, str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        options: StorageOptions | None = None
        self._listing: dict[str, ObjectInfo] | None = None
        if is_url(path):
            options = as_options(storage_options)
            url = str(path).rstrip("/")
            folder = storage.parent(url) if url.rsplit("/", 1)[-1] in MANIFEST_NAMES else url
            self._listing = storage.find(folder, options)
            manifest = Manifest.load(url, options, listing=self._listing)
            storage.remember_options(folder, options)
        else:
            manifest = Manifest.load(path)
        super().__init__(manifest, path_map=path_map, storage_options=options)
        self._index_cache: dict[str, pd.DataFrame] = {}
        self._index_versions: dict[str, tuple[Any, ...]] = {}

    @property
    def is_remote(self) -> bool:
        """True for a dataset at a URL."""
        return self._listing is not None

    def stat(self, path: str | os.PathLike[str]) -> ObjectInfo | None:
        """Return what is known of a file (size, mtime or ETag), or None if it does not exist.

        Files of a remote dataset come from its listing (no request); others
        are stat'ed through :mod:`neurocube.storage`.
        """
        text = os.fspath(path)
        if self._listing is not None and is_url(text):
            found = self._listing.get(text)
            if found is not None:
                return found
            if text.startswith(str(self.root).rstrip("/") + "/"):
                return None
        meta = stat_or_none(text, self.storage_options if is_url(text) else None)
        return None if meta is None or meta.is_dir else meta

    # -- paths ---------------------------------------------------------------------

    def remap_path(self, path: str | os.PathLike[str]) -> Path:
        """Apply ``path_map`` (longest prefix) to ``path``; unchanged when no prefix matches."""
        text = os.fspath(path)
        new = longest_prefix_remap(text, self.path_map)
        return Path(new if new is not None else text)

    def resolve_path(
        self, path: str | os.PathLike[str], anchor: str | os.PathLike[str] | None = None
    ) -> Path:
        """Resolve a stored path to an absolute path.

        A relative path is taken relative to ``anchor`` (default: the dataset
        folder). An absolute path that exists is returned as is; one that does
        not is passed through ``path_map``.
        """
        text = self._stored_text(path)
        if is_url(text):
            return cast(Path, text)
        if self.is_remote:
            if not os.path.isabs(text):
                base = str(anchor) if anchor is not None else str(self.root)
                return cast(Path, url_join(base, text))
            new = longest_prefix_remap(text, self.path_map)
            return cast(Path, new if new is not None else text)
        return super().resolve_path(text, anchor)

    def _resolve_absolute(self, path: Path) -> Path:
        """Return an absolute local path as it is if it exists, else through ``path_map``."""
        if storage.exists(path):
            return path
        remapped = longest_prefix_remap(str(path), self.path_map)
        if remapped is not None and is_url(remapped):
            return cast(Path, remapped)
        return self.remap_path(path)

    # -- indexes -------------------------------------------------------------------

    def read_index(self, kind: str) -> pd.DataFrame:
        """Read an index CSV (every cell text); cached per catalog.

        Raises
        ------
        DataNotFoundError
            If the index does not exist; the message says how to build it.
        """
        return self._index(kind).copy()

    def _index(self, kind: str) -> pd.DataFrame:
        """Return the cached index table itself (callers must not modify it)."""
        cached = self._index_cache.get(kind)
        if cached is not None:
            return cached
        path = self.index_path(kind)
        meta = self.stat(path)
        if meta is None:
            hint = {
                "tracks_raw": "neurocube.index_tracks_raw(...)",
                "tracks": "neurocube.convert_tracks(...)",
            }.get(kind, "a label converter")
            raise DataNotFoundError(
                f"{path}: no {kind} index in dataset {self.root}; build it with {hint}."
            )
        # a local index is shared by every catalog of this process that sees the same
        # version of the file; a remote one is read at every open (one request)
        version = ("index", *version_key(str(path), meta))
        table = _memo_get(version) if not self.is_remote else None
        if table is None:
            table = self._load_index(path)
            if not self.is_remote:
                _memo_put(version, table)
        self._index_cache[kind] = table
        self._index_versions[kind] = version
        return table

    def invalidate(self) -> None:
        """Forget cached index tables (after a writer changed them)."""
        self._index_cache.clear()
        self._index_versions.clear()

    def tracks_table(self, run_id: str | None = None) -> pd.DataFrame:
        """Return one ``tracks/index.csv`` row per (group, sequence): the newest run, or ``run_id``.

        Newest means the latest ``finished_at`` (else ``started_at``); rows
        without timestamps count in file order (a later row is newer). Rows of
        the legacy flat layout have a blank ``run_id``.

        Raises
        ------
        SelectionError
            If ``run_id`` is given and no row has it; the message lists the runs.
        """
        return self._tracks_table(run_id).copy()

    def _tracks_table(self, run_id: str | None = None) -> pd.DataFrame:
        """Return :meth:`tracks_table` itself, cached (callers must not modify it)."""
        cache_key = f"tracks#run={run_id}"
        cached = self._index_cache.get(cache_key)
        if cached is None:
            table = self._index("tracks")
            version = (*self._index_versions["tracks"], "runs", run_id)
            cached = _memo_get(version) if not self.is_remote else None
            if cached is None:
                cached = _select_runs(table, run_id, self.index_path("tracks"))
                if not self.is_remote:
                    _memo_put(version, cached)
            self._index_cache[cache_key] = cached
        return cached

    def labels_table(self, kind: str = "behavior", run_id: str | None = None) -> pd.DataFrame:
        """Return one ``labels/<kind>/index.csv`` row per (group, sequence), newest run first."""
        table = self.read_index(f"labels/{kind}")
        return _select_runs(table, run_id, self.index_path(f"labels/{kind}"))

    def label_kinds(self) -> list[str]:
        """Return the label kinds that have an index (``behavior``, ``id_tags``, ...)."""
        try:
            labels_root = self.manifest.get_root("labels")
        except SelectionError:
            return []
        if self._listing is not None:
            base = str(labels_root).rstrip("/") + "/"
            kinds = []
            for loc in self._listing:
                parts = loc[len(base) :].split("/") if loc.startswith(base) else []
                if len(parts) == 2 and parts[1] == "index.csv":
                    kinds.append(parts[0])
            return sorted(kinds)
        if not storage.isdir(labels_root):
            return []
        return sorted(
            entry.name
            for entry in storage.listdir(labels_root)
            if entry.is_dir and storage.isfile(os.path.join(entry.path, "index.csv"))
        )

    # -- listing and queries ---------------------------------------------------------

    def list_groups(self) -> list[str]:
        """Return the sorted unique group names of ``tracks/index.csv``."""
        return sorted(set(self.tracks_table()["group"]))

    def list_sequences(self, group: str | None = None) -> list[str]:
        """Return the sorted unique sequence names (of one group when ``group`` is given)."""
        table = self.tracks_table()
        if group is not None:
            table = table[table["group"] == group]
        return sorted(set(table["sequence"]))

    def sequence_metadata(
        self, level_names: Sequence[str] | None = None, separator: str = "__"
    ) -> pd.DataFrame:
        """Return one row per (group, sequence) with the index columns and parsed hierarchy levels.

        Parameters
        ----------
        level_names
            Names for the levels of ``group + separator + sequence`` (the group
            is left out when blank), e.g. ``["fish", "speed", "loop"]``. A name
            with fewer parts leaves the last levels blank; one with more parts
            keeps the rest, joined by ``separator``, in the last level.
        separator
            The separator inside compound names.
        """
        table = self.tracks_table().reset_index(drop=True)
        table.insert(2, "group_safe", [quote(g, safe="") for g in table["group"]])
        table.insert(3, "sequence_safe", [quote(s, safe="") for s in table["sequence"]])
        if level_names:
            names = list(level_names)
            levels: dict[str, list[str]] = {n: [] for n in names}
            for group, sequence in zip(table["group"], table["sequence"], strict=True):
                full = f"{group}{separator}{sequence}" if group else sequence
                parts = full.split(separator) if separator else [full]
                if len(parts) > len(names):
                    parts = [*parts[: len(names) - 1], separator.join(parts[len(names) - 1 :])]
                parts = parts + [""] * (len(names) - len(parts))
                for n, part in zip(names, parts, strict=True):
                    levels[n].append(part)
            for n in names:
                if n in table.columns:
                    raise SelectionError(f"level name {n!r} clashes with an index column")
                table[n] = levels[n]
        return table

    def query_sequences(
        self,
        group_contains: str | None = None,
        group_startswith: str | None = None,
        group_endswith: str | None = None,
        sequence_contains: str | None = None,
        sequence_startswith: str | None = None,
        sequence_endswith: str | None = None,
    ) -> list[tuple[str, str]]:
        """Return the sorted (group, sequence) pairs matching every criterion given."""
        tests = [
            ("group", group_contains, str.__contains__),
            ("group", group_startswith, str.startswith),
            ("group", group_endswith, str.endswith),
            ("sequence", sequence_contains, str.__contains__),
            ("sequence", sequence_startswith, str.startswith),
            ("sequence", sequence_endswith, str.endswith),
        ]
        pairs = []
        for group, sequence in self.pairs():
            values = {"group": group, "sequence": sequence}
            if all(v is None or fn(values[col], v) for col, v, fn in tests):
                pairs.append((group, sequence))
        return pairs

    def pairs(self) -> list[tuple[str, str]]:
        """Return every (group, sequence) in ``tracks/index.csv``, sorted."""
        table = self.tracks_table()
        return sorted(set(zip(table["group"], table["sequence"], strict=True)))

    def select(
        self,
        groups: str | Iterable[str] | None = None,
        sequences: str | Iterable[str] | None = None,
        run_id: str | None = None,
    ) -> pd.DataFrame:
        """Return the tracks rows of the chosen groups and sequences (None means all).

        Raises
        ------
        SelectionError
            If a named group or sequence is not in the index.
        """
        table = self._tracks_table(run_id)
        return filter_pairs(table, groups, sequences, self.index_path("tracks"))

    # -- portability -------------------------------------------------------------------

    def _index_files(self) -> list[Path]:
        files = []
        for kind in INDEX_KINDS:
            try:
                files.append(self.index_path(kind))
            except SelectionError:
                continue
        files += [self.index_path(f"labels/{k}") for k in self.label_kinds()]
        return [f for f in files if storage.isfile(f)]

    def rewrite_index_paths(
        self, path_map: Mapping[str, str], *, dry_run: bool = False
    ) -> dict[str, int]:
        """Rewrite ``abs_path`` (and ``source_abs_path``) in every index through ``path_map``.

        Returns ``{index file: number of paths changed}``. Index files outside
        the dataset are never written (:class:`UnsafePathError`).
        """

        def remap(cell: str) -> str:
            new = longest_prefix_remap(cell, path_map) if cell else None
            return new if new is not None else cell

        return self._rewrite_indexes(remap, dry_run)

    def make_portable(self, *, dry_run: bool = False) -> dict[str, int]:
        """Turn absolute paths inside the dataset into dataset-relative ones.

        Covers the manifest roots and the path columns of every index. Already
        relative paths and paths outside the dataset are left as they are.
        Idempotent. Returns ``{file: number of paths changed}``; with
        ``dry_run`` nothing is written.
        """
        base = Path(os.path.realpath(self.root))

        def relative(cell: str) -> str:
            if not cell or not Path(cell).is_absolute():
                return cell
            real = Path(os.path.realpath(cell))
            if real == base or base in real.parents:
                return PurePosixPath(real.relative_to(base).as_posix()).as_posix()
            return cell

        report: dict[str, int] = {}
        manifest = self.manifest
        root_changes = {k: relative(v) for k, v in manifest.roots.items() if relative(v) != v}
        if root_changes:
            report[str(manifest.path)] = len(root_changes)
            if not dry_run:
                manifest.roots.update(root_changes)
                self.check_writable(manifest.path, "manifest")
                manifest.save()
        report.update(self._rewrite_indexes(relative, dry_run))
        return report

    def _rewrite_indexes(self, fn: Any, dry_run: bool) -> dict[str, int]:
        report: dict[str, int] = {}
        for index_csv in self._index_files():
            table = read_index_csv(index_csv)
            n_changed = 0
            for col in ("abs_path", "source_abs_path"):
                if col not in table.columns:
                    continue
                new = [fn(cell) for cell in table[col]]
                n_changed += sum(a != b for a, b in zip(new, table[col], strict=True))
                table[col] = new
            if n_changed:
                report[str(index_csv)] = n_changed
                if not dry_run:
                    self.check_writable(index_csv, "index CSV")
                    write_index_csv(table, index_csv)
        if not dry_run:
            self.invalidate()
        return report


#: Index tables and run selections per file version, shared by the catalogs of this
#: process (a dataset reopened in a loop parses its index once). Entries are never
#: modified: the catalog hands out copies.
_MEMO: collections.OrderedDict[tuple[Any, ...], pd.DataFrame] = collections.OrderedDict()
_MEMO_LOCK = threading.Lock()
_MEMO_SIZE = 64


def _memo_get(key: tuple[Any, ...]) -> pd.DataFrame | None:
    with _MEMO_LOCK:
        found = _MEMO.get(key)
        if found is not None:
            _MEMO.move_to_end(key)
        return found


def _memo_put(key: tuple[Any, ...], table: pd.DataFrame) -> None:
    with _MEMO_LOCK:
        _MEMO[key] = table
        while len(_MEMO) > _MEMO_SIZE:
            _MEMO.popitem(last=False)


def _select_runs(table: pd.DataFrame, run_id: str | None, index_file: Path) -> pd.DataFrame:
    if run_id is not None:
        chosen = table[table["run_id"] == run_id]
        if chosen.empty:
            runs = sorted(set(table["run_id"]) - {""})
            raise SelectionError(
                f"{index_file}: no rows with run_id {run_id!r}; runs present: {runs}"
                + (" (and legacy rows with a blank run_id)" if "" in set(table["run_id"]) else "")
            )
        table = chosen
    table = table.reset_index(drop=True)
    if table.empty:
        return table
    blank = pd.Series([""] * len(table), index=table.index, dtype=object)
    finished = table["finished_at"] if "finished_at" in table.columns else blank
    started = table["started_at"] if "started_at" in table.columns else blank
    stamp = [f or s for f, s in zip(finished.astype(str), started.astype(str), strict=True)]
    order = pd.DataFrame(
        {"group": table["group"], "sequence": table["sequence"], "stamp": stamp,
         "pos": range(len(table))}
    )  # fmt: skip
    # newest = greatest (stamp, position): a later row wins a tie or a missing stamp
    newest = order.sort_values(["stamp", "pos"]).groupby(["group", "sequence"], sort=True).tail(1)
    newest = newest.sort_values(["group", "sequence"])
    return table.iloc[newest["pos"].to_numpy()].reset_index(drop=True)
