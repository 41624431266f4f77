"""The one place that opens files.

Everything neurocube reads goes through :func:`open_file` (a local path or an
fsspec URL) or through a :class:`HandlePool` (an LRU of open handles per
process, for readers that keep a handle between chunk reads). Tasks sent to
Dask workers carry paths, never handles: each process opens its own.

:data:`IO_STATS` counts opens and bytes read per process; tests use it to prove
that building a graph reads nothing.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from neurocube.errors import DataNotFoundError

__all__ = [
    "IO_STATS",
    "FileIdentity",
    "HandlePool",
    "file_identity",
    "is_url",
    "open_file",
]


class _IOStats:
    """Per-process counters of file opens and payload bytes read (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.opens = 0
        self.bytes_read = 0

    def add_open(self) -> None:
        with self._lock:
            self.opens += 1

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes_read += n

    def reset(self) -> None:
        with self._lock:
            self.opens = 0
            self.bytes_read = 0

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.opens, self.bytes_read


IO_STATS = _IOStats()


def is_url(path: str | os.PathLike[str]) -> bool:
    """Return True if ``path`` is an fsspec URL such as ``s3://...`` (``file://`` included)."""
    return isinstance(path, str) and "://" in path


def _local(path: str | os.PathLike[str]) -> Path:
    if isinstance(path, str) and path.startswith("file://"):
        return Path(path[len("file://") :])
    return Path(path)


def open_file(path: str | os.PathLike[str], mode: str = "rb") -> IO[Any]:
    """Open a local path or an fsspec URL for reading.

    Raises
    ------
    DataNotFoundError
        If the file does not exist; the message names it.
    """
    IO_STATS.add_open()
    if is_url(path) and not str(path).startswith("file://"):
        import fsspec

        try:
            return fsspec.open(str(path), mode).open()
        except FileNotFoundError as exc:
            raise DataNotFoundError(f"{path}: no such file (fsspec could not open it)") from exc
    local = _local(path)
    try:
        return open(local, mode)
    except FileNotFoundError as exc:
        raise DataNotFoundError(
            f"{local}: no such file. Check the path (cwd is {os.getcwd()})."
        ) from exc
    except IsADirectoryError as exc:
        raise DataNotFoundError(f"{local}: is a folder, expected a file") from exc


@dataclass(frozen=True)
class FileIdentity:
    """What identifies one version of a file: path, size, mtime and a hash of its ends."""

    path: str
    size: int
    mtime_ns: int
    ends_sha256: str

    def as_dict(self) -> dict[str, Any]:
        """Return the identity as a JSON-ready dict."""
        return {
            "path": self.path,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "ends_sha256": self.ends_sha256,
        }

    @property
    def digest(self) -> str:
        """A short hex digest of the whole identity (for file names and cache keys)."""
        text = f"{self.path}\0{self.size}\0{self.mtime_ns}\0{self.ends_sha256}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]


_IDENTITY_CACHE: dict[tuple[str, int, int, int], FileIdentity] = {}
_IDENTITY_LOCK = threading.Lock()
_END_BYTES = 1 << 20


def file_identity(path: str | os.PathLike[str]) -> FileIdentity:
    """Return the :class:`FileIdentity` of a local file.

    The hash covers the first and the last MiB, so it is cheap on a 12 GB file
    and still notices a file rewritten in place with the same size and mtime.
    Results are memoised per (path, size, mtime, ctime).
    """
    local = _local(path).resolve()
    try:
        st = local.stat()
    except FileNotFoundError as exc:
        raise DataNotFoundError(f"{local}: no such file") from exc
    # ctime changes with any rewrite, even one that restores size and mtime
    key = (str(local), st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _IDENTITY_LOCK:
        cached = _IDENTITY_CACHE.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with open(local, "rb") as fh:
        digest.update(fh.read(_END_BYTES))
        if st.st_size > _END_BYTES:
            fh.seek(max(_END_BYTES, st.st_size - _END_BYTES))
            digest.update(fh.read(_END_BYTES))
    ident = FileIdentity(str(local), st.st_size, st.st_mtime_ns, digest.hexdigest())
    with _IDENTITY_LOCK:
        _IDENTITY_CACHE[key] = ident
    return ident


class HandlePool:
    """A per-process LRU of open handles, each with its own lock.

    ``acquire(key, opener)`` returns ``(handle, lock)``; the caller holds
    ``lock`` while it uses the handle. Handles are closed when evicted.
    A pool is never pickled: a module-level pool exists once per process.
    """

    def __init__(self, maxsize: int = 64) -> None:
        self.maxsize = maxsize
        self._lock = threading.Lock()
        self._handles: collections.OrderedDict[Hashable, tuple[Any, threading.Lock]] = (
            collections.OrderedDict()
        )

    def acquire(self, key: Hashable, opener: Callable[[], Any]) -> tuple[Any, threading.Lock]:
        """Return the handle for ``key`` (opening it with ``opener`` if needed) and its lock."""
        with self._lock:
            entry = self._handles.get(key)
            if entry is not None:
                self._handles.move_to_end(key)
                return entry
        handle = opener()
        with self._lock:
            entry = self._handles.get(key)
            if entry is not None:  # another thread opened it meanwhile
                _close_quietly(handle)
                self._handles.move_to_end(key)
                return entry
            entry = (handle, threading.Lock())
            self._handles[key] = entry
            while len(self._handles) > self.maxsize:
                _, (old, old_lock) = self._handles.popitem(last=False)
                with old_lock:
                    _close_quietly(old)
            return entry

    def discard(self, key: Hashable) -> None:
        """Close and forget the handle for ``key`` (e.g. after the file changed)."""
        with self._lock:
            entry = self._handles.pop(key, None)
        if entry is not None:
            with entry[1]:
                _close_quietly(entry[0])

    def discard_matching(self, predicate: Callable[[Hashable], bool]) -> None:
        """Close and forget every handle whose key satisfies ``predicate``."""
        with self._lock:
            keys = [key for key in self._handles if predicate(key)]
            entries = [self._handles.pop(key) for key in keys]
        for handle, lock in entries:
            with lock:
                _close_quietly(handle)

    def clear(self) -> None:
        """Close every handle."""
        with self._lock:
            entries = list(self._handles.values())
            self._handles.clear()
        for handle, lock in entries:
            with lock:
                _close_quietly(handle)

    def __len__(self) -> int:
        return len(self._handles)


def _close_quietly(handle: Any) -> None:
    try:
        handle.close()
    except (OSError, ValueError, io.UnsupportedOperation):
        pass
