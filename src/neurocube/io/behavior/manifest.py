"""The dataset manifest of the ``mosaic`` layout: finding, reading and writing it.

:func:`find_manifest` locates ``dataset.yaml`` / ``.yml`` / ``.json`` in a
dataset folder (local or at a URL); :class:`Manifest` reads it (parsed once
per process and file version), names the roots and changes them in memory;
:func:`save_manifest` writes it atomically.
"""

from __future__ import annotations

import collections
import copy
import datetime
import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import yaml

from neurocube import storage
from neurocube.errors import DataNotFoundError, FormatError, SelectionError, UnsafePathError
from neurocube.io._atomic import atomic_path
from neurocube.io.behavior.conventions import (
    DEFAULT_ROOTS,
    MANIFEST_NAMES,
    MANIFEST_VERSION,
    is_inside,
    longest_prefix_remap,
    url_join,
)
from neurocube.storage import ObjectInfo, is_url, open_file


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
    meta = stat_or_none(p)
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


def stat_or_none(
    path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> ObjectInfo | None:
    """Return ``storage.info`` of ``path``, or None if it does not exist."""
    try:
        return storage.info(path, storage_options)
    except DataNotFoundError:
        return None


def version_key(path: str, meta: ObjectInfo) -> tuple[Any, ...]:
    """Return what names one version of a file (a key of the per-process memos).

    Size, mtime and ctime locally (ctime changes with any rewrite, even one that
    restores size and mtime); size and ETag remotely.
    """
    if is_url(path):
        return (path, meta.size, meta.etag)
    return (path, meta.size, meta.mtime_ns, meta.ctime_ns)


#: Parsed manifests per file version (see :func:`version_key`), for this process.
_MANIFESTS: collections.OrderedDict[tuple[Any, ...], dict[str, Any]] = collections.OrderedDict()
_MANIFESTS_LOCK = threading.Lock()
_MEMO_SIZE = 64


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
        # a local manifest is parsed once per process and file version (a reopened dataset
        # parses no YAML); a remote one is read at every open (its access is checked then)
        seen = None if remote else stat_or_none(manifest_path)
        file_version = None if seen is None else version_key(str(manifest_path), seen)
        if file_version is not None:
            with _MANIFESTS_LOCK:
                known = _MANIFESTS.get(file_version)
            if known is not None:
                return cls(manifest_path, copy.deepcopy(known))
        with open_file(manifest_path, "rb", storage_options if remote else None,
                       cache_type="all" if remote else None) as fh:
            raw = fh.read()
        try:
            text = raw.decode("utf-8")
            if os.path.splitext(str(manifest_path))[1].lower() == ".json":
                data = json.loads(text) if text.strip() else {}
            else:
                data = yaml.safe_load(text) or {}
        except (yaml.YAMLError, ValueError, RecursionError) as exc:  # UTF-8, JSON, digits
            raise FormatError(
                f"{manifest_path}: manifest is not valid YAML/JSON ({exc}); fix or rewrite it."
            ) from exc
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
        if file_version is not None and seen is not None and len(raw) == seen.size:
            with _MANIFESTS_LOCK:
                _MANIFESTS[file_version] = copy.deepcopy(data)
                while len(_MANIFESTS) > _MEMO_SIZE:
                    _MANIFESTS.popitem(last=False)
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
            return cast(Path, url_join(str(self.dataset_dir), value))
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


_MANIFEST_HEADER = """\
# neurocube / mosaic dataset manifest (manifest_version 3)
# roots: named folders relative to this file; meta.fps_default: frame rate.
# Written by neurocube: comments are not kept across saves, unknown keys are.
"""


def save_manifest(data: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a manifest atomically: YAML for ``.yaml``/``.yml``, JSON for ``.json``.

    Keys are written in their order; unknown keys are written as they are.

    Raises
    ------
    FormatError
        If ``path`` has another suffix, or the data are not plain YAML/JSON types.
    """
    target = Path(path)
    suffix = target.suffix.lower()
    plain = json.loads(json.dumps(dict(data), default=_json_default))
    if suffix == ".json":
        text = json.dumps(plain, indent=2) + "\n"
    elif suffix in (".yaml", ".yml"):
        text = _MANIFEST_HEADER + yaml.safe_dump(plain, sort_keys=False, allow_unicode=True)
    else:
        raise FormatError(f"{target}: a manifest is .yaml, .yml or .json, not {suffix!r}")
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return target


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    raise FormatError(f"manifest value {value!r} ({type(value).__name__}) is not YAML/JSON-plain")
