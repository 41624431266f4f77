"""Where cache entries live: a local folder or an fsspec URL prefix.

An entry is a Zarr v3 store named ``<key>.zarr`` under a cache root. Two small
JSON files sit in its ``.neurocube/`` folder (Zarr ignores it):

``entry.json``
    the completion marker, written last: format version, key, source
    identities, what the entry holds. An entry without it is never used.
``last_use.json``
    the time of the last hit and a hit count, rewritten on each hit (for LRU
    eviction and ``neurocube cache ls``). It lives in a subfolder so that a hit
    does not change the entry folder's mtime, which xarray folds into the Dask
    names of the reopened arrays: every reopen of an entry gives the same names.

On a local disk an entry is written under a temporary name
(``.<key>.<host>-<pid>-<random>.tmp.zarr``), the marker is written into it last,
and the folder is renamed to ``<key>.zarr``. ``rename`` of a folder onto an
existing non-empty folder fails, so when two writers race, the first rename
wins and the other discards its copy. Object stores have no rename: there the
entry is written in place and the marker, written last, is what makes it
usable.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from neurocube import storage
from neurocube.config import cache_dir
from neurocube.errors import CacheError, DataNotFoundError
from neurocube.io._atomic import atomic_path
from neurocube.storage import is_url

__all__ = [
    "ENTRY_SUFFIX",
    "LAST_USE_NAME",
    "MARKER_NAME",
    "CacheRoot",
    "LocalRoot",
    "RemoteRoot",
    "open_root",
    "validate_key",
]

MARKER_NAME = ".neurocube/entry.json"
LAST_USE_NAME = ".neurocube/last_use.json"
ENTRY_SUFFIX = ".zarr"
TMP_SUFFIX = ".tmp.zarr"
TRASH_SUFFIX = ".trash"
# Temporary folders of a crashed writer on another host are removed after this long.
STALE_TMP_SECONDS = 24 * 3600

_KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TMP_PATTERN = re.compile(r"^\.(?P<key>.+)\.(?P<host>[^.]+)-(?P<pid>\d+)-[0-9a-f]+\.tmp\.zarr$")


def validate_key(key: str) -> str:
    """Return ``key`` if it is usable as an entry name, else raise :class:`CacheError`."""
    if not isinstance(key, str) or not _KEY_PATTERN.match(key) or key.endswith(ENTRY_SUFFIX):
        raise CacheError(
            f"cache key {key!r} is not usable as an entry name: expected 1-128 characters "
            "from letters, digits, '.', '_' and '-', starting with a letter or digit and not "
            "ending in '.zarr' (e.g. key='sub01-ffa-nc15')."
        )
    return key


class CacheRoot(ABC):
    """A folder (or URL prefix) holding cache entries."""

    #: How the root is shown to users.
    url: str
    #: What fsspec (and Zarr) need to reach a remote root; None for local folders.
    storage_options: dict[str, Any] | None = None

    def entry_url(self, key: str) -> str:
        """Return where the entry for ``key`` lives."""
        return f"{self.url.rstrip('/')}/{key}{ENTRY_SUFFIX}"

    def read_json(self, entry: str, name: str) -> dict[str, Any] | None:
        """Return the JSON object ``name`` inside ``entry``, or None if absent or unreadable."""
        raw = self._read_bytes(f"{entry}/{name}")
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        return value if isinstance(value, dict) else None

    def write_json(
        self, entry: str, name: str, value: dict[str, Any], *, durable: bool = True
    ) -> None:
        """Write ``value`` as JSON to ``name`` inside ``entry`` (atomically where possible).

        ``durable=False`` skips the flush to disk (for the last-use record, rewritten
        on every hit: losing it in a power cut costs nothing).
        """
        data = json.dumps(value, indent=1, sort_keys=True).encode()
        self._write_bytes(f"{entry}/{name}", data, durable=durable)

    @abstractmethod
    def _read_bytes(self, path: str) -> bytes | None: ...

    def read_entry_file(self, entry: str, rel: str) -> bytes | None:
        """Return the bytes of file ``rel`` (a chunk, a ``zarr.json``) of ``entry``, or None."""
        return self._read_bytes(f"{entry}/{rel}")

    def list_entry_files(self, entry: str) -> dict[str, int]:
        """Return ``{relative path: size}`` of the entry's Zarr files, in one listing.

        The ``.neurocube/`` records are left out.
        """
        base = storage.normalize(entry).rstrip("/") + "/"
        out = {}
        for location, info in self._find(entry).items():
            rel = location[len(base):] if location.startswith(base) else location
            if not rel.startswith(".neurocube/"):
                out[rel] = info.size
        return out

    @abstractmethod
    def _find(self, entry: str) -> dict[str, storage.ObjectInfo]: ...

    @abstractmethod
    def zarr_read_store(self, entry: str) -> Any:
        """Return a read-only Zarr store object over ``entry``."""

    @abstractmethod
    def _write_bytes(self, path: str, data: bytes, *, durable: bool) -> None: ...

    @abstractmethod
    def zarr_store(self, entry: str) -> Any:
        """Return what ``to_zarr`` / ``open_zarr`` accept for ``entry``."""

    @abstractmethod
    def has_entry(self, entry: str) -> bool:
        """Return True if something (complete or not) exists under the entry's name."""

    @abstractmethod
    def begin_write(self, key: str) -> str:
        """Return where a new copy of entry ``key`` is written (a temporary name if possible)."""

    @abstractmethod
    def publish(self, written: str, key: str, *, replace: bool) -> bool:
        """Make a written copy the entry ``key``; return False if another writer won the race."""

    @abstractmethod
    def discard(self, written: str) -> None:
        """Remove a copy that will not be published."""

    @abstractmethod
    def remove(self, entry: str) -> None:
        """Remove an entry (or a leftover) for good."""

    @abstractmethod
    def disk_usage(self, entry: str) -> int:
        """Return the bytes an entry takes on its storage."""

    @abstractmethod
    def modified(self, entry: str) -> float:
        """Return the latest modification time (unix seconds) of anything in ``entry``."""

    @abstractmethod
    def list_entries(self) -> Iterator[tuple[str, str]]:
        """Yield ``(name, url)`` of every folder that looks like an entry or a leftover."""

    def sweep_leftovers(self) -> int:
        """Remove temporary copies whose writer is gone; return how many were removed."""
        return 0


class LocalRoot(CacheRoot):
    """A cache root on a local (or network-mounted) file system.

    Reads, stats and listings go through :mod:`neurocube.storage`; writes (the
    cache's own output) are plain file operations: temporary names and renames.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser().absolute()
        self.url = str(self.path)

    def _read_bytes(self, path: str) -> bytes | None:
        # the cache's own small JSON records, not source data: not counted in IO_STATS
        try:
            return Path(path).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _write_bytes(self, path: str, data: bytes, *, durable: bool) -> None:
        if durable:
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
            return
        final = Path(path)
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def zarr_store(self, entry: str) -> Any:
        """Return the entry folder's path."""
        return entry

    def _find(self, entry: str) -> dict[str, storage.ObjectInfo]:
        return storage.find(entry, hidden=True)

    def zarr_read_store(self, entry: str) -> Any:
        """Return a read-only ``zarr.storage.LocalStore`` over the entry folder."""
        from zarr.storage import LocalStore

        return LocalStore(entry, read_only=True)

    def has_entry(self, entry: str) -> bool:
        """Return True if the entry folder exists."""
        return storage.exists(entry)

    def begin_write(self, key: str) -> str:
        """Create the root if needed; return a fresh temporary folder name for ``key``."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(
                f"{self.path}: cannot create the cache folder ({exc}). Set NEUROCUBE_CACHE_DIR "
                "or pass store= to a writable folder."
            ) from exc
        host = _hostname()
        name = f".{key}.{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
        return str(self.path / name)

    def publish(self, written: str, key: str, *, replace: bool) -> bool:
        """Rename the written folder to ``<key>.zarr``; False if another entry got there first."""
        final = Path(self.entry_url(key))
        trash: Path | None = None
        if replace and storage.exists(str(final)):
            trash = final.with_name(f".{key}.{uuid.uuid4().hex[:8]}{TRASH_SUFFIX}")
            with contextlib.suppress(FileNotFoundError):
                os.rename(final, trash)
        try:
            os.rename(written, final)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise CacheError(f"{final}: cannot publish the cache entry ({exc})") from exc
            self.discard(written)  # another writer published the same key first
            return False
        finally:
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        return True

    def discard(self, written: str) -> None:
        """Delete the written folder."""
        shutil.rmtree(written, ignore_errors=True)

    def remove(self, entry: str) -> None:
        """Rename the entry out of the way, then delete it."""
        path = Path(entry)
        # Rename first so that a reader never sees a half-deleted entry under its real name.
        doomed = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{TRASH_SUFFIX}")
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            return
        shutil.rmtree(doomed, ignore_errors=True)

    def disk_usage(self, entry: str) -> int:
        """Return the bytes of every file in the entry."""
        return sum(i.size for i in storage.find(entry, hidden=True).values())

    def modified(self, entry: str) -> float:
        """Return the newest file mtime in the entry."""
        files = storage.find(entry, hidden=True).values()
        return max((i.mtime_ns / 1e9 for i in files), default=0.0)

    def list_entries(self) -> Iterator[tuple[str, str]]:
        """Yield ``<key>.zarr`` folders and hidden leftovers (temporary or trash folders)."""
        try:
            children = storage.listdir(self.url)
        except DataNotFoundError:
            return
        for child in children:
            if child.is_dir and (child.name.endswith(ENTRY_SUFFIX) or child.name.startswith(".")):
                yield child.name, child.path

    def sweep_leftovers(self) -> int:
        """Remove temporary copies of writers that died (same host) or are over a day old."""
        removed = 0
        host = _hostname()
        now = time.time()
        for name, url in list(self.list_entries()):
            if name.endswith(TRASH_SUFFIX):
                shutil.rmtree(url, ignore_errors=True)
                removed += 1
                continue
            match = _TMP_PATTERN.match(name)
            if match is None:
                continue
            writer_gone = match["host"] == host and not _pid_alive(int(match["pid"]))
            try:
                too_old = now - storage.info(url).mtime_ns / 1e9 > STALE_TMP_SECONDS
            except DataNotFoundError:
                continue
            if writer_gone or too_old:
                shutil.rmtree(url, ignore_errors=True)
                removed += 1
        return removed


class RemoteRoot(CacheRoot):
    """A cache root behind an fsspec URL (``s3://bucket/prefix``, ``memory://cache``, ...).

    Every request goes through :mod:`neurocube.storage` with the root's
    ``storage_options`` (listings uncached: other writers change the store);
    Zarr gets the same options. The options never appear in the root's text.
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        opts = storage.as_options(storage_options)
        self.storage_options = opts.as_dict() if opts is not None else None
        # Listings and stats must see what other processes (and Zarr's own client) wrote.
        self._opts = storage.as_options({**(self.storage_options or {}),
                                         "use_listings_cache": False})
        storage.remember_options(self.url, opts)

    def __repr__(self) -> str:
        return f"RemoteRoot({self.url!r})"

    def _read_bytes(self, path: str) -> bytes | None:
        try:
            return storage.read_all(path, self._opts)
        except DataNotFoundError:
            return None

    def _write_bytes(self, path: str, data: bytes, *, durable: bool) -> None:
        storage.write_bytes(path, data, self._opts)

    def zarr_store(self, entry: str) -> Any:
        """Return the entry URL (xarray opens it through fsspec with ``storage_options``)."""
        return entry

    def _find(self, entry: str) -> dict[str, storage.ObjectInfo]:
        return storage.find(entry, self._opts, hidden=True)

    def zarr_read_store(self, entry: str) -> Any:
        """Return a read-only ``zarr.storage.FsspecStore`` over the entry URL."""
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(
            entry, storage_options=dict(self.storage_options or {}), read_only=True
        )

    def has_entry(self, entry: str) -> bool:
        """Return True if any object exists under the entry's prefix."""
        return bool(storage.find(entry, self._opts, hidden=True))

    def begin_write(self, key: str) -> str:
        """Remove any unfinished copy and return the entry URL itself (written in place)."""
        # No atomic rename on object stores: write in place; the marker, written last, is
        # what makes the entry usable. Remove an unfinished or stale copy first.
        entry = self.entry_url(key)
        self.remove(entry)
        return entry

    def publish(self, written: str, key: str, *, replace: bool) -> bool:
        """Nothing to rename: the marker written last already made the entry usable."""
        return True

    def discard(self, written: str) -> None:
        """Delete the partial entry."""
        self.remove(written)

    def remove(self, entry: str) -> None:
        """Delete the entry recursively (the marker first, so no reader takes it half-gone)."""
        storage.delete(f"{entry}/{MARKER_NAME}", self._opts)
        storage.delete(entry, self._opts, recursive=True)

    def disk_usage(self, entry: str) -> int:
        """Return the total size of the entry's objects."""
        return sum(i.size for i in storage.find(entry, self._opts, hidden=True).values())

    def modified(self, entry: str) -> float:
        """Return the newest modification time the store reports for the entry's objects."""
        # storage's ObjectInfo keeps mtime_ns 0 for objects (their version is the ETag): ask
        # the backend's listing for the times, through storage's filesystem and error mapping
        fs, fpath = storage.filesystem(entry, self._opts)
        latest = 0.0
        with storage.translate_errors(entry, "list it"):
            try:
                listing = fs.find(fpath, detail=True)
            except FileNotFoundError:
                return 0.0
        for detail in listing.values():
            for field in ("mtime", "created", "LastModified", "last_modified"):
                value = detail.get(field)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    latest = max(latest, float(value))
                elif hasattr(value, "timestamp"):
                    latest = max(latest, float(value.timestamp()))
        return latest

    def list_entries(self) -> Iterator[tuple[str, str]]:
        """Yield ``<key>.zarr`` prefixes under the root."""
        try:
            children = storage.listdir(self.url, self._opts)
        except DataNotFoundError:
            return
        for child in children:
            if child.is_dir and child.name.endswith(ENTRY_SUFFIX):
                yield child.name, f"{self.url}/{child.name}"


def open_root(
    store: str | os.PathLike[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> CacheRoot:
    """Return the cache root for ``store``.

    Parameters
    ----------
    store
        A folder, an fsspec URL (``s3://bucket/cache``; ``file://`` URLs count as
        local folders), or None for ``<neurocube cache folder>/zarr``.
    storage_options
        For a URL: options handed to fsspec (keys, endpoint, ``{"anon": True}``).
        Default: the options this process last used for that URL, else none
        (the backend's own credentials, e.g. environment variables).
    """
    if store is None:
        return LocalRoot(cache_dir() / "zarr")
    if is_url(store):
        text = str(store)
        if text.startswith("file://"):
            return LocalRoot(text[len("file://") :])
        if storage_options is None:
            storage_options = storage.options_for(text)
        return RemoteRoot(text, storage_options)
    return LocalRoot(store)


def _hostname() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
