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

import copy
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, cast
from urllib.parse import quote

import pandas as pd
import yaml

from neurocube import storage
from neurocube.errors import DataNotFoundError, FormatError, SelectionError, UnsafePathError
from neurocube.storage import ObjectInfo, StorageOptions, as_options, is_url, open_file

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

MANIFEST_NAMES = ("dataset.yaml", "dataset.yml", "dataset.json")
MANIFEST_VERSION = 3

#: Roots every dataset has (relative to the dataset folder); absent keys are filled on load.
DEFAULT_ROOTS: dict[str, str] = {
    "media_raw": "media_raw",
    "tracks_raw": "tracks_raw",
    "labels_raw": "labels_raw",
    "labels": "labels",
    "media": "media",
    "tracks": "tracks",
    "features": "features",
    "models": "models",
    "frames": "media/frames",
}

#: Standard track schemas and the unit family of their positions.
STD_FORMAT_UNITS: dict[str, str] = {
    "mosaic_v1": "pixels",
    "trex_v1": "cm",
    "trex_v2": "pixels",
    "mosaic_cm_v1": "cm",
}

_INDEX_KINDS = ("tracks_raw", "tracks")


def entry_key(group: str, sequence: str) -> str:
    """Return the file stem the layout uses for one (group, sequence).

    ``quote(group, safe="") + "__" + quote(sequence, safe="")``, or the quoted
    sequence alone when the group is empty.

    Examples
    --------
    >>> entry_key("fish 1", "a/b")
    'fish%201__a%2Fb'
    >>> entry_key("", "s1")
    's1'
    """
    if not group:
        return quote(sequence, safe="")
    return quote(group, safe="") + "__" + quote(sequence, safe="")


def std_format_of(cell: str) -> str:
    """Return the standard track schema named by an index cell (blank means ``trex_v1``)."""
    return cell.strip() or "trex_v1"


def split_list_cell(cell: str) -> list[str]:
    """Split a comma-joined index cell (``"0,1,2"``) into its items; blank gives ``[]``."""
    cell = cell.strip()
    if not cell:
        return []
    return [item.strip() for item in cell.split(",")]


def is_inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Return True if ``path`` (after resolving ``..`` and symlinks) lies inside ``folder``."""
    resolved = Path(os.path.realpath(os.fspath(path)))
    base = Path(os.path.realpath(os.fspath(folder)))
    return resolved == base or base in resolved.parents


def longest_prefix_remap(path: str, path_map: Mapping[str, str]) -> str | None:
    """Replace the longest prefix of ``path`` found in ``path_map``; None if none matches.

    A prefix matches on whole path components only (``/data/a`` matches
    ``/data/a/x.parquet`` but not ``/data/ab/x.parquet``).

    Examples
    --------
    >>> longest_prefix_remap("/old/data/t.parquet", {"/old": "/x", "/old/data": "/new"})
    '/new/t.parquet'
    >>> longest_prefix_remap("/other/t.parquet", {"/old": "/x"}) is None
    True
    """
    norm = path.replace("\\", "/")
    for src in sorted(path_map, key=len, reverse=True):
        prefix = src.replace("\\", "/").rstrip("/")
        if not prefix:
            continue
        if norm == prefix or norm.startswith(prefix + "/"):
            dest = path_map[src].replace("\\", "/").rstrip("/")
            return dest + norm[len(prefix) :]
    return None


def _url_join(base: str, rel: str) -> str:
    """Join a relative POSIX path to a URL, resolving ``.`` and ``..`` lexically."""
    scheme, rest = base.rstrip("/").split("://", 1)
    parts = rest.split("/")
    for part in rel.replace("\\", "/").split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if len(parts) > 1:
                parts.pop()
            continue
        parts.append(part)
    return f"{scheme}://" + "/".join(parts)


def find_manifest(
    path: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    listing: Mapping[str, ObjectInfo] | None = None,
) -> Path:
    """Return the manifest file of a dataset given its folder or the manifest itself.

    For a URL (``s3://bucket/dataset``) the location is returned as a string;
    ``listing`` (a :func:`storage.find` of the folder) saves a request.

    Raises
    ------
    DataNotFoundError
        If ``path`` does not exist or the folder holds none of ``dataset.yaml``,
        ``dataset.yml``, ``dataset.json``.
    """
    if is_url(path):
        url = str(path).rstrip("/")
        if url.rsplit("/", 1)[-1] in MANIFEST_NAMES:
            if listing is not None and url in listing:
                return cast(Path, url)
            if storage.isfile(url, storage_options):
                return cast(Path, url)
            raise DataNotFoundError(f"{url}: no such dataset manifest")
        files = listing if listing is not None else storage.find(url, storage_options)
        for name in MANIFEST_NAMES:
            if storage.join(url, name) in files:
                return cast(Path, storage.join(url, name))
        if not files:
            raise DataNotFoundError(f"{url}: no such dataset folder or manifest (nothing there)")
        raise DataNotFoundError(
            f"{url}: no dataset manifest; expected one of {', '.join(MANIFEST_NAMES)} in this "
            "folder."
        )
    p = Path(path).expanduser()
    meta = _stat_or_none(p)
    if meta is not None and not meta.is_dir:
        return storage.local_path(p)
    if meta is not None:
        for name in MANIFEST_NAMES:
            if storage.isfile(p / name):
                return storage.local_path(p / name)
        raise DataNotFoundError(
            f"{p}: no dataset manifest; expected one of {', '.join(MANIFEST_NAMES)} in this "
            "folder. Create one with neurocube.catalog.behavior.Manifest.create(folder)."
        )
    raise DataNotFoundError(f"{p}: no such dataset folder or manifest file")


def _below(folder: Path, *parts: str) -> Path:
    """Join ``parts`` below a folder: a :class:`Path`, or a URL string for a remote dataset."""
    if is_url(folder):
        return cast(Path, storage.join(str(folder), *parts))
    return folder.joinpath(*parts)


def _stat_or_none(
    path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> ObjectInfo | None:
    try:
        return storage.info(path, storage_options)
    except DataNotFoundError:
        return None


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


# --------------------------------------------------------------------------- manifest


@dataclass
class Manifest:
    """A dataset manifest: its file and its content (unknown keys are kept verbatim).

    Parameters
    ----------
    path
        The manifest file (``dataset.yaml`` / ``.yml`` / ``.json``).
    data
        The parsed content. Known keys: ``manifest_version, name, version, uuid,
        created_at, roots, sources, notes, tags, continuous_groups, libraries, meta``.
    """

    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    # -- construction ------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        storage_options: Mapping[str, Any] | None = None,
        *,
        listing: Mapping[str, ObjectInfo] | None = None,
    ) -> Manifest:
        """Read a manifest (YAML with ``yaml.safe_load``, or JSON) from a file or dataset folder.

        Roots absent from the file are filled with the defaults; nothing is written.
        ``path`` may be a URL (read with ``storage_options``); such a manifest is
        read-only and its :attr:`path` and roots are URL strings.

        Raises
        ------
        DataNotFoundError
            If there is no manifest.
        FormatError
            If the file is not a mapping, or declares a ``manifest_version`` above 3.
        """
        manifest_path = find_manifest(path, storage_options, listing=listing)
        remote = is_url(manifest_path)
        with open_file(manifest_path, "rb", storage_options if remote else None,
                       cache_type="all" if remote else None) as fh:
            text = fh.read().decode("utf-8")
        try:
            if os.path.splitext(str(manifest_path))[1].lower() == ".json":
                data = json.loads(text) if text.strip() else {}
            else:
                data = yaml.safe_load(text) or {}
        except (yaml.YAMLError, json.JSONDecodeError) as exc:
            raise FormatError(f"{manifest_path}: manifest is not valid YAML/JSON ({exc}).") from exc
        if not isinstance(data, dict):
            raise FormatError(
                f"{manifest_path}: expected a mapping at the top of the manifest, found "
                f"{type(data).__name__}."
            )
        version = data.get("manifest_version", MANIFEST_VERSION)
        if not isinstance(version, int) or isinstance(version, bool):
            raise FormatError(
                f"{manifest_path}: manifest_version must be an integer (3), found {version!r}; "
                "fix the manifest."
            )
        if version > MANIFEST_VERSION:
            raise FormatError(
                f"{manifest_path}: manifest_version {version!r} is newer than this reader "
                f"(knows up to {MANIFEST_VERSION}); upgrade neurocube."
            )
        roots = data.get("roots") or {}
        if not isinstance(roots, dict):
            raise FormatError(f"{manifest_path}: 'roots' must be a mapping, found {roots!r}.")
        data["roots"] = {**DEFAULT_ROOTS, **{str(k): str(v) for k, v in roots.items()}}
        return cls(manifest_path, data)

    @classmethod
    def create(
        cls,
        folder: str | os.PathLike[str],
        *,
        name: str = "unnamed",
        version: str = "0.1.0",
        fmt: str = "yaml",
        fps_default: float | None = None,
    ) -> Manifest:
        """Return a new (unsaved) manifest for ``folder``; call :meth:`save` to write it."""
        import datetime
        import uuid

        suffix = {"yaml": "dataset.yaml", "yml": "dataset.yml", "json": "dataset.json"}.get(fmt)
        if suffix is None:
            raise FormatError(f"fmt must be 'yaml', 'yml' or 'json', got {fmt!r}")
        data: dict[str, Any] = {
            "manifest_version": MANIFEST_VERSION,
            "name": name,
            "version": version,
            "uuid": str(uuid.uuid4()),
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "roots": dict(DEFAULT_ROOTS),
            "meta": {},
        }
        if fps_default is not None:
            data["meta"]["fps_default"] = float(fps_default)
        return cls(Path(folder).expanduser().resolve() / suffix, data)

    # -- content -----------------------------------------------------------------

    @property
    def is_remote(self) -> bool:
        """True for a manifest read from a URL (read-only)."""
        return is_url(self.path)

    @property
    def dataset_dir(self) -> Path:
        """The dataset folder (the manifest's parent; a URL string for a remote dataset)."""
        if is_url(self.path):
            return cast(Path, storage.parent(str(self.path)))
        return self.path.parent

    @property
    def name(self) -> str:
        """The dataset name."""
        return str(self.data.get("name", "unnamed"))

    @property
    def roots(self) -> dict[str, str]:
        """Root name -> stored path (relative to the dataset, or absolute)."""
        roots = self.data.setdefault("roots", {})
        return roots

    @property
    def meta(self) -> dict[str, Any]:
        """The ``meta`` mapping (per-subsystem metadata written by converters)."""
        meta = self.data.get("meta")
        return meta if isinstance(meta, dict) else {}

    @property
    def fps_default(self) -> float | None:
        """``meta.fps_default`` as a float, or None when the manifest has none."""
        fps = self.meta.get("fps_default")
        if fps in (None, ""):
            return None
        try:
            return float(fps)
        except (TypeError, ValueError) as exc:
            raise FormatError(f"{self.path}: meta.fps_default is not a number: {fps!r}") from exc

    def has_root(self, key: str) -> bool:
        """Return True if the manifest names a root ``key`` (with a non-empty path)."""
        return bool(self.roots.get(key))

    def get_root(self, key: str) -> Path:
        """Return the absolute folder of root ``key``.

        Raises
        ------
        SelectionError
            If the manifest has no such root; the message lists those it has.
        """
        value = self.roots.get(key)
        if not value:
            raise SelectionError(
                f"{self.path}: no root named {key!r}; roots are {sorted(self.roots)}. "
                f"Add one with set_root({key!r}, path)."
            )
        if self.is_remote:
            if is_url(value) or os.path.isabs(value):
                return cast(Path, value)
            return cast(Path, _url_join(str(self.dataset_dir), value))
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.dataset_dir / p

    def _checked_inside(self, folder: Path, what: str) -> Path:
        if not is_inside(folder, self.dataset_dir):
            raise UnsafePathError(
                f"{self.path}: {what} resolves to {folder}, outside the dataset folder "
                f"{self.dataset_dir}; neurocube never writes outside a dataset. Use a path inside "
                "it (or remap_roots to the dataset's new location)."
            )
        return folder

    def set_root(self, key: str, path: str | os.PathLike[str]) -> Path:
        """Set root ``key`` to ``path`` (dataset-relative, or absolute inside it) and create it.

        The manifest is changed in memory; call :meth:`save` to keep it.

        Raises
        ------
        UnsafePathError
            If ``path`` leaves the dataset folder (``..``, an absolute path elsewhere).
        """
        p = Path(path).expanduser()
        folder = p if p.is_absolute() else self.dataset_dir / p
        self._checked_inside(folder, f"root {key!r}")
        folder.mkdir(parents=True, exist_ok=True)
        resolved = Path(os.path.realpath(folder))
        rel = resolved.relative_to(Path(os.path.realpath(self.dataset_dir)))
        self.roots[key] = rel.as_posix() if str(rel) != "." else "."
        return folder

    def ensure_roots(self) -> list[Path]:
        """Create every root folder that lies inside the dataset; return those created.

        Roots that point outside the dataset are left alone (never created).
        """
        created = []
        for key in list(self.roots):
            if not self.roots[key]:
                continue
            folder = self.get_root(key)
            if not is_inside(folder, self.dataset_dir) or folder.exists():
                continue
            folder.mkdir(parents=True, exist_ok=True)
            created.append(folder)
        return created

    def remap_roots(self, path_map: Mapping[str, str], *, dry_run: bool = False) -> dict[str, str]:
        """Replace the longest matching prefix of each absolute root with its target.

        Returns ``{root name: new path}`` for the roots that change; with
        ``dry_run`` nothing changes. The manifest is changed in memory only.
        """
        changes: dict[str, str] = {}
        for key, value in self.roots.items():
            new = longest_prefix_remap(value, path_map)
            if new is not None and new != value:
                changes[key] = new
        if not dry_run:
            self.roots.update(changes)
        return changes

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the manifest atomically (to ``path`` or where it was read); return the file.

        A manifest read without a ``manifest_version`` is written with
        ``manifest_version: 3`` first; every other key is written as it is.
        """
        from neurocube.io.behavior import save_manifest

        if self.is_remote and path is None:
            raise UnsafePathError(
                f"{self.path}: a manifest read from a URL is read-only; save it to a local "
                "path with save(path)."
            )
        if "manifest_version" not in self.data:
            self.data = {"manifest_version": MANIFEST_VERSION, **self.data}
        target = Path(path) if path is not None else self.path
        save_manifest(self.data, target)
        return target

    def copy(self) -> Manifest:
        """Return a deep copy (edits to it leave this one alone)."""
        return Manifest(self.path, copy.deepcopy(self.data))


# --------------------------------------------------------------------------- catalog


class BehaviorCatalog:
    """What a behaviour dataset holds, read from its manifest and index CSVs (text only).

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
        self.storage_options: StorageOptions | None = None
        self._listing: dict[str, ObjectInfo] | None = None
        if is_url(path):
            self.storage_options = as_options(storage_options)
            url = str(path).rstrip("/")
            folder = storage.parent(url) if url.rsplit("/", 1)[-1] in MANIFEST_NAMES else url
            self._listing = storage.find(folder, self.storage_options)
            self.manifest = Manifest.load(url, self.storage_options, listing=self._listing)
            storage.remember_options(folder, self.storage_options)
        else:
            self.manifest = Manifest.load(path)
        self.path_map: dict[str, str] = dict(path_map or {})
        self._index_cache: dict[str, pd.DataFrame] = {}

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
        meta = _stat_or_none(text, self.storage_options if is_url(text) else None)
        return None if meta is None or meta.is_dir else meta

    # -- paths ---------------------------------------------------------------------

    @property
    def root(self) -> Path:
        """The dataset folder."""
        return self.manifest.dataset_dir

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
        text = os.fspath(path).strip()
        if not text:
            raise FormatError(f"{self.manifest.path}: empty path in an index row")
        if is_url(text):
            return cast(Path, text)
        if self.is_remote:
            if not os.path.isabs(text):
                base = str(anchor) if anchor is not None else str(self.root)
                return cast(Path, _url_join(base, text))
            new = longest_prefix_remap(text, self.path_map)
            return cast(Path, new if new is not None else text)
        p = Path(text).expanduser()
        if not p.is_absolute():
            return Path(anchor) / p if anchor is not None else self.root / p
        if storage.exists(p):
            return p
        remapped = longest_prefix_remap(str(p), self.path_map)
        if remapped is not None and is_url(remapped):
            return cast(Path, remapped)
        return self.remap_path(p)

    def check_writable(self, path: str | os.PathLike[str], what: str) -> Path:
        """Return ``path`` if it lies inside the dataset, else raise :class:`UnsafePathError`."""
        p = Path(path)
        if not is_inside(p, self.root):
            raise UnsafePathError(
                f"{what}: {p} lies outside the dataset {self.root}; neurocube never writes there "
                "(a '..' or a path_map prefix points away). Fix the manifest root or index path."
            )
        return p

    # -- indexes -------------------------------------------------------------------

    def index_path(self, kind: str) -> Path:
        """Return the index CSV of ``tracks_raw``, ``tracks`` or ``labels/<kind>``."""
        if kind in _INDEX_KINDS:
            return _below(self.manifest.get_root(kind), "index.csv")
        if kind.startswith("labels/"):
            return _below(self.manifest.get_root("labels"), kind.split("/", 1)[1], "index.csv")
        raise SelectionError(
            f"unknown index {kind!r}; expected 'tracks_raw', 'tracks' or 'labels/<kind>'"
        )

    def read_index(self, kind: str) -> pd.DataFrame:
        """Read an index CSV (every cell text); cached per catalog.

        Raises
        ------
        DataNotFoundError
            If the index does not exist; the message says how to build it.
        """
        cached = self._index_cache.get(kind)
        if cached is not None:
            return cached.copy()
        path = self.index_path(kind)
        if self.stat(path) is None:
            hint = {
                "tracks_raw": "neurocube.index_tracks_raw(...)",
                "tracks": "neurocube.convert_tracks(...)",
            }.get(kind, "a label converter")
            raise DataNotFoundError(
                f"{path}: no {kind} index in dataset {self.root}; build it with {hint}."
            )
        table = read_index_csv(path, self.storage_options)
        for required in ("abs_path",):
            if required not in table.columns:
                raise FormatError(
                    f"{path}: index has no {required!r} column; found {list(table.columns)}."
                )
        for col in ("group", "sequence", "run_id"):
            if col not in table.columns:
                table[col] = ""
        self._index_cache[kind] = table
        return table.copy()

    def invalidate(self) -> None:
        """Forget cached index tables (after a writer changed them)."""
        self._index_cache.clear()

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
        cache_key = f"tracks#run={run_id}"
        cached = self._index_cache.get(cache_key)
        if cached is None:
            cached = _select_runs(self.read_index("tracks"), run_id, self.index_path("tracks"))
            self._index_cache[cache_key] = cached
        return cached.copy()

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
        table = self.tracks_table(run_id)
        return _filter_pairs(table, groups, sequences, self.index_path("tracks"))

    # -- portability -------------------------------------------------------------------

    def _index_files(self) -> list[Path]:
        files = []
        for kind in _INDEX_KINDS:
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
        from neurocube.io.behavior import write_index_csv

        report: dict[str, int] = {}
        for index_file in self._index_files():
            table = read_index_csv(index_file)
            n_changed = 0
            for col in ("abs_path", "source_abs_path"):
                if col not in table.columns:
                    continue
                new = [fn(cell) for cell in table[col]]
                n_changed += sum(a != b for a, b in zip(new, table[col], strict=True))
                table[col] = new
            if n_changed:
                report[str(index_file)] = n_changed
                if not dry_run:
                    self.check_writable(index_file, "index CSV")
                    write_index_csv(table, index_file)
        if not dry_run:
            self.invalidate()
        return report


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


def _as_set(value: str | Iterable[str] | None) -> set[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return {value}
    return {str(v) for v in value}


def _filter_pairs(
    table: pd.DataFrame,
    groups: str | Iterable[str] | None,
    sequences: str | Iterable[str] | None,
    index_file: Path,
) -> pd.DataFrame:
    want_groups = _as_set(groups)
    want_sequences = _as_set(sequences)
    if want_groups is not None:
        missing = want_groups - set(table["group"])
        if missing:
            raise SelectionError(
                f"{index_file}: no group(s) {sorted(missing)}; "
                f"groups are {sorted(set(table['group']))}"
            )
        table = table[table["group"].isin(want_groups)]
    if want_sequences is not None:
        missing = want_sequences - set(table["sequence"])
        if missing:
            known = sorted(set(table["sequence"]))
            shown = known[:20] + (["..."] if len(known) > 20 else [])
            raise SelectionError(
                f"{index_file}: no sequence(s) {sorted(missing)}"
                + (f" in group(s) {sorted(want_groups)}" if want_groups else "")
                + f"; sequences are {shown}"
            )
        table = table[table["sequence"].isin(want_sequences)]
    return table.reset_index(drop=True)
