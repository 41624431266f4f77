"""File identity: which version of a file or object this is, and whether it still is.

:class:`FileIdentity`, :func:`file_identity`, :func:`identity`, :func:`stat_key`;
:func:`check_unchanged` compares a location with the version seen when it was opened.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from neurocube.errors import DataChangedError, DataNotFoundError
from neurocube.storage.backends import filesystem
from neurocube.storage.listing import info
from neurocube.storage.locations import is_local, local_path, normalize


@dataclass(frozen=True)
class FileIdentity:
    """What identifies one version of a file or object.

    Local files: path, size, mtime and a hash of their first and last MiB
    (``ends_sha256``). Objects: URL, size and ETag (or version id): ``etag``;
    ``mtime_ns`` is 0 and ``ends_sha256`` empty.
    """

    path: str
    size: int
    mtime_ns: int
    ends_sha256: str
    etag: str = ""

    def as_dict(self) -> dict[str, Any]:
        """Return the identity as a JSON-ready dict."""
        out: dict[str, Any] = {
            "path": self.path,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "ends_sha256": self.ends_sha256,
        }
        if self.etag:
            out["etag"] = self.etag
        return out

    @property
    def digest(self) -> str:
        """A short hex digest of the whole identity (for file names and cache keys)."""
        text = f"{self.path}\0{self.size}\0{self.mtime_ns}\0{self.ends_sha256}"
        if self.etag:
            text += f"\0{self.etag}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]


_IDENTITY_CACHE: dict[tuple[str, int, int, int], FileIdentity] = {}
_IDENTITY_LOCK = threading.Lock()
_END_BYTES = 1 << 20


def file_identity(path: str | os.PathLike[str]) -> FileIdentity:
    """Return the :class:`FileIdentity` of a local file (see :func:`identity` for any location).

    The hash covers the first and the last MiB, so it is cheap on a 12 GB file
    and still notices a file rewritten in place with the same size and mtime.
    Results are memoised per (path, size, mtime, ctime).
    """
    local = local_path(path)
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


def identity(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
             ) -> FileIdentity:
    """Return the :class:`FileIdentity` of a local file (hashing its ends) or an object (ETag)."""
    loc = normalize(path)
    if is_local(loc):
        return file_identity(loc)
    meta = info(loc, storage_options)
    if meta.is_dir:
        raise DataNotFoundError(f"{loc}: a folder (prefix), expected an object")
    return FileIdentity(loc, meta.size, 0, "", meta.etag or f"size:{meta.size}")


def stat_key(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
             ) -> tuple[str, int, int | str]:
    """Return ``(location, size, version)``: mtime_ns locally, the ETag remotely (one stat)."""
    meta = info(path, storage_options)
    return (meta.path, meta.size, meta.mtime_ns if is_local(meta.path) else meta.etag)


_CHECKED: dict[tuple[str, int, str], float] = {}
_CHECKED_LOCK = threading.Lock()


def check_unchanged(
    path: str,
    storage_options: Mapping[str, Any] | None,
    size: int,
    version: int | str,
    *,
    what: str = "opened",
    ctime_ns: int | None = None,
) -> None:
    """Raise :class:`DataChangedError` if ``path`` is not the version seen when it was opened.

    ``version`` is the mtime (ns) of a local file or the ETag of an object, as
    :func:`stat_key` gave it. Remote objects are checked once per process and
    version (a HEAD request), local files at every call (a stat). ``ctime_ns``
    (a local file's status-change time when opened; pass it where it was kept)
    is compared too: any rewrite changes it, also one that restores the size and
    sets the mtime back with ``os.utime``.
    """
    if not is_local(path):
        key = (path, size, str(version))
        with _CHECKED_LOCK:
            if key in _CHECKED:
                return
        # a listing (find) leaves its entries in the backend's cache: ask the server itself
        fs, fpath = filesystem(path, storage_options)
        with contextlib.suppress(Exception):
            fs.invalidate_cache(fpath)
    meta = info(path, storage_options)
    local = is_local(meta.path)
    now_size, now_version = meta.size, (meta.mtime_ns if local else meta.etag)
    if now_size != size or now_version != version:
        raise DataChangedError(
            f"{path}: changed since it was {what} (then {size} bytes, version {version}; now "
            f"{now_size} bytes, version {now_version}). Values read now would mix two versions: "
            "open it again."
        )
    if local and ctime_ns and meta.ctime_ns != ctime_ns:
        raise DataChangedError(
            f"{path}: changed since it was {what} (then ctime {ctime_ns} ns; now ctime "
            f"{meta.ctime_ns} ns, with {now_size} bytes and mtime {now_version}: rewritten, "
            "even if its size and mtime look the same). Values read now would mix two "
            "versions: open it again."
        )
    if not is_local(path):
        with _CHECKED_LOCK:
            _CHECKED[(path, size, str(version))] = 1.0
