"""Look after the cache: list entries, evict least recently used ones, clear."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

from neurocube.caching.core import entry_problem, marker_status
from neurocube.caching.integrity import verify_entry
from neurocube.caching.store import ENTRY_SUFFIX, LAST_USE_NAME, CacheRoot, LocalRoot, open_root
from neurocube.errors import CacheError

__all__ = [
    "CacheEntry",
    "cache_entries",
    "cache_info",
    "clear_cache",
    "evict_cache",
    "index_entries",
    "parse_age",
    "parse_size",
    "verify_cache",
]


@dataclass
class CacheEntry:
    """One folder of a cache root, as :func:`cache_info` reports it.

    ``status`` is ``"complete"`` (usable: its manifest matches a listing of the
    store), ``"incomplete"`` (a write that has not finished or was interrupted,
    or a published entry that lost a chunk or a variable: never used, rebuilt by
    the next ``cache()``), ``"damaged"`` (a file of the wrong size, or a marker
    that fails its checksum), ``"stale"`` (written by an older cache format,
    without checksums: rebuilt by the next ``cache()``), ``"foreign"`` (no
    marker: not a neurocube entry) or ``"gzindex"`` (a gzip seek index kept
    in the same cache folder; listed by the ``neurocube cache`` commands only).
    """

    key: str
    path: str
    status: str
    size_bytes: int
    nbytes: int = 0
    kind: str = ""
    variables: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    created: str = ""
    last_used: str = ""
    last_used_unix: float = 0.0
    hits: int = 0


def cache_entries(
    store: str | os.PathLike[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    *,
    indexes: bool = False,
) -> list[CacheEntry]:
    """Return every entry (and leftover) of a cache root, most recently used first.

    ``indexes=True`` adds the gzip seek indexes kept in the same cache folder
    (:func:`index_entries`).
    """
    root = open_root(store, storage_options)
    entries = [_describe(root, name, url) for name, url in root.list_entries()]
    if indexes:
        entries.extend(index_entries(root))
    entries.sort(key=lambda e: e.last_used_unix, reverse=True)
    return entries


def index_folder(root: CacheRoot) -> str | None:
    """Return the folder of gzip indexes that sits beside a local cache root, if any.

    neurocube keeps ``<cache folder>/zarr`` (the Zarr entries) and
    ``<cache folder>/gzindex`` (the seek indexes of ``.nii.gz`` files,
    :mod:`neurocube.sources.gzindex`) side by side.
    """
    if not isinstance(root, LocalRoot):
        return None
    return str(root.path.parent / "gzindex")


def index_entries(root: CacheRoot) -> list[CacheEntry]:
    """Return one row per gzip index (``.gzidx`` + its ``.json`` sidecar) beside ``root``."""
    from neurocube import storage

    folder = index_folder(root)
    if folder is None:
        return []
    found = storage.find(folder, hidden=True)
    rows: dict[str, CacheEntry] = {}
    for location, info in found.items():
        name = location.rsplit("/", 1)[-1]
        stem = name[: -len(".gzidx")] if name.endswith(".gzidx") else None
        if stem is None and name.endswith(".json"):
            stem = name[: -len(".json")]
        if stem is None:
            continue
        row = rows.setdefault(
            stem, CacheEntry(key=f"{stem}.gzidx", path=f"{folder}/{stem}.gzidx",
                             status="gzindex", size_bytes=0, kind="gzindex")
        )  # fmt: skip
        row.size_bytes += info.size
        when = max(info.mtime_ns, getattr(info, "atime_ns", 0) or 0) / 1e9
        row.last_used_unix = max(row.last_used_unix, when)
    return list(rows.values())


def _remove(root: CacheRoot, entry: CacheEntry) -> None:
    if entry.status == "gzindex":
        for path in (entry.path, entry.path[: -len(".gzidx")] + ".json"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return
    root.remove(entry.path)


def cache_info(
    store: str | os.PathLike[str] | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """Describe the cache: one row per entry.

    Parameters
    ----------
    store
        Cache root (folder or fsspec URL); default ``<neurocube cache folder>/zarr``.
    storage_options
        For a ``store`` URL: options handed to fsspec (keys, endpoint, ...).

    Returns
    -------
    pandas.DataFrame
        Columns ``key, status, size_bytes, nbytes, kind, variables, sources,
        created, last_used, hits, path``, most recently used first. ``size_bytes``
        is what the entry takes on disk (compressed); ``nbytes`` the size of
        the data in memory. ``df.attrs["root"]`` is the cache root and
        ``df.attrs["total_bytes"]`` the sum of ``size_bytes``.
    """
    import pandas as pd

    rows = [asdict(e) for e in cache_entries(store, storage_options)]
    columns = [
        "key", "status", "size_bytes", "nbytes", "kind", "variables", "sources",
        "created", "last_used", "hits", "path",
    ]  # fmt: skip
    table = pd.DataFrame(rows, columns=columns)
    table.attrs["root"] = open_root(store, storage_options).url
    table.attrs["total_bytes"] = int(table["size_bytes"].sum()) if len(table) else 0
    return table


def clear_cache(
    store: str | os.PathLike[str] | None = None,
    *,
    older_than: str | timedelta | float | None = None,
    keys: list[str] | None = None,
    statuses: list[str] | None = None,
    dry_run: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Remove cache entries.

    Parameters
    ----------
    store
        Cache root (folder or fsspec URL); default ``<neurocube cache folder>/zarr``.
    storage_options
        For a ``store`` URL: options handed to fsspec (keys, endpoint, ...).
    older_than
        Remove only entries not used for this long: a ``timedelta``, seconds, or
        text such as ``"7d"``, ``"12h"``, ``"30min"``, ``"2w"``.
    keys
        Remove only the entries with these keys.
    statuses
        Remove only entries of these statuses (e.g. ``["damaged", "incomplete", "stale"]``).
    dry_run
        Remove nothing; return what would be removed.

    With no filter, every entry is removed (the ``neurocube cache clear`` command
    asks for ``--all`` for that).

    Returns
    -------
    list of str
        Keys of the entries removed (leftovers of interrupted writes included).
    """
    root = open_root(store, storage_options)
    max_age = None if older_than is None else parse_age(older_than)
    now = time.time()
    removed = []
    for entry in cache_entries(store, storage_options):
        if max_age is not None and now - _age_reference(root, entry) < max_age:
            continue
        if keys is not None and entry.key not in keys:
            continue
        if statuses is not None and entry.status not in statuses:
            continue
        if not dry_run:
            root.remove(entry.path)
        removed.append(entry.key)
    return removed


def evict_cache(
    max_bytes: int | str,
    store: str | os.PathLike[str] | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    indexes: bool = False,
    dry_run: bool = False,
) -> list[str]:
    """Shrink the cache to at most ``max_bytes`` on disk, least recently used first.

    Leftovers of interrupted writes whose writer is gone go first; entries
    being written right now are left alone.

    Parameters
    ----------
    max_bytes
        The budget: bytes, or text such as ``"2GB"``, ``"500MiB"``.
    store
        Cache root (folder or fsspec URL); default ``<neurocube cache folder>/zarr``.
    storage_options
        For a ``store`` URL: options handed to fsspec (keys, endpoint, ...).
    indexes
        Count the gzip indexes kept in the same cache folder in the budget, and
        evict them too (least recently used first, like entries).
    dry_run
        Remove nothing; return what would be removed.

    Returns
    -------
    list of str
        Keys of the entries removed, in the order they were removed.
    """
    budget = parse_size(max_bytes)
    root = open_root(store, storage_options)
    if not dry_run:
        root.sweep_leftovers()
    entries = cache_entries(store, storage_options, indexes=indexes)
    total = sum(e.size_bytes for e in entries)
    removed = []
    for entry in sorted(entries, key=lambda e: e.last_used_unix):
        if total <= budget:
            break
        if entry.status == "incomplete" and entry.key.startswith("."):
            continue  # a write in progress (dead writers' copies were swept above)
        if not dry_run:
            _remove(root, entry)
        total -= entry.size_bytes
        removed.append(entry.key)
    return removed


_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}  # fmt: skip
_AGE_UNITS = {
    "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
    "w": 604800, "week": 604800, "weeks": 604800,
}  # fmt: skip
_AMOUNT = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: int | float | str) -> int:
    """Return a byte count from ``1500000``, ``"1.5MB"``, ``"2 GiB"``, ...

    Raises
    ------
    CacheError
        If the text is not a number followed by a known unit.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise CacheError(f"size budget {value!r} is negative; expected >= 0 bytes.")
        return int(value)
    match = _AMOUNT.match(str(value))
    unit = match[2].lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise CacheError(
            f"cannot read {value!r} as a size: expected a number and a unit such as "
            "'500MB', '2GiB' or '1.5GB'."
        )
    return int(float(match[1]) * _SIZE_UNITS[unit])


def parse_age(value: str | timedelta | float) -> float:
    """Return seconds from ``timedelta``, seconds, or text like ``"7d"``, ``"12h"``, ``"30min"``.

    Raises
    ------
    CacheError
        If the text is not a number followed by a known unit.
    """
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _AMOUNT.match(str(value))
    unit = match[2].lower() if match else None
    if match is None or unit not in _AGE_UNITS:
        raise CacheError(
            f"cannot read {value!r} as an age: expected a number and a unit such as "
            "'30min', '12h', '7d' or '2w'."
        )
    return float(match[1]) * _AGE_UNITS[unit]


def _describe(root: CacheRoot, name: str, url: str) -> CacheEntry:
    key = name[: -len(ENTRY_SUFFIX)] if name.endswith(ENTRY_SUFFIX) else name
    size = root.disk_usage(url)
    if name.startswith("."):
        modified = root.modified(url)
        return CacheEntry(
            key=key, path=url, status="incomplete", size_bytes=size, last_used_unix=modified
        )
    marker, status = marker_status(root, url)
    if marker is None:
        modified = root.modified(url)
        return CacheEntry(
            key=key,
            path=url,
            status="foreign" if status == "missing" else status,
            size_bytes=size,
            last_used_unix=modified,
        )
    problem = entry_problem(root, url, marker)
    use = root.read_json(url, LAST_USE_NAME) or {}
    try:
        last_unix = float(use.get("last_used_unix", marker.get("created_unix", 0.0)))
        hits = int(use.get("hits", 0))
    except (TypeError, ValueError):  # a damaged last-use record: only the listing suffers
        last_unix, hits = float(marker.get("created_unix", 0.0)), 0
    return CacheEntry(
        key=key,
        path=url,
        status="complete" if problem is None else problem.status,
        size_bytes=size,
        nbytes=int(marker.get("nbytes", 0)),
        kind=str(marker.get("kind", "")),
        variables=[str(v) for v in marker.get("variables", [])],
        sources=[str(s.get("path", "")) for s in marker.get("sources", [])],
        created=str(marker.get("created", "")),
        last_used=str(use.get("last_used", marker.get("created", ""))),
        last_used_unix=last_unix,
        hits=hits,
    )


def verify_cache(
    key: str | None = None,
    store: str | os.PathLike[str] | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, list[str]]:
    """Read and check every file of one entry (``key``) or of every entry.

    Each chunk's crc32c, each metadata document's crc32c and every file's size
    are checked against the entry's manifest (this reads the whole entry).

    Returns
    -------
    dict
        ``{key: problems}``: one line per missing or damaged file (empty: sound).
        Leftovers of interrupted writes are not entries and are left out.

    Raises
    ------
    CacheError
        If ``key`` names no entry.
    """
    root = open_root(store, storage_options)
    if key is not None:
        from neurocube.caching.store import validate_key

        targets = [(validate_key(key), root.entry_url(key))]
        if not root.has_entry(targets[0][1]):
            raise CacheError(
                f"{targets[0][1]}: no cache entry named {key!r}; `neurocube cache ls` lists them."
            )
    else:
        targets = [
            (name[: -len(ENTRY_SUFFIX)], url)
            for name, url in root.list_entries()
            if not name.startswith(".")
        ]
    report: dict[str, list[str]] = {}
    for name, url in targets:
        marker, status = marker_status(root, url)
        if marker is None:
            report[name] = [{
                "missing": "no completion marker (an unfinished write, or not an entry)",
                "damaged": "completion marker damaged (not JSON, or fails its checksum)",
                "stale": "written by an older cache format (no checksums): rebuild it",
            }[status]]  # fmt: skip
            continue
        report[name] = verify_entry(root, url, name, marker)
    return report


def _age_reference(root: CacheRoot, entry: CacheEntry) -> float:
    if entry.status == "complete":
        return entry.last_used_unix
    return root.modified(entry.path) or entry.last_used_unix
