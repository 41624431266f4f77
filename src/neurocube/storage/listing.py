"""Stat and list files and objects.

:class:`ObjectInfo`, :func:`info`, :func:`exists`, :func:`isdir`, :func:`isfile`;
:func:`find`, :func:`list_files`, :func:`listdir` (one recursive listing per prefix on
object stores, no request per file).
"""

from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from neurocube.errors import DataNotFoundError
from neurocube.storage.backends import filesystem, translate_errors
from neurocube.storage.locations import basename, is_local, normalize


@dataclass(frozen=True)
class ObjectInfo:
    """What a stat or a listing says of one file or object."""

    path: str
    size: int
    is_dir: bool = False
    mtime_ns: int = 0
    ctime_ns: int = 0
    etag: str = ""

    @property
    def name(self) -> str:
        """The last component of the path."""
        return basename(self.path)


def _etag(detail: Mapping[str, Any]) -> str:
    for key in ("ETag", "etag", "VersionId", "version_id", "generation", "md5Hash",
                "LastModified", "last_modified", "mtime"):
        value = detail.get(key)
        if value:
            return str(value).strip('"')
    return ""


def _remote_info(path: str, detail: Mapping[str, Any]) -> ObjectInfo:
    kind = detail.get("type", "file")
    version = detail.get("VersionId") or ""
    etag = _etag(detail)
    if version and version != "null" and version not in etag:
        etag = f"{etag}@{version}"
    return ObjectInfo(
        path=path,
        size=int(detail.get("size") or detail.get("Size") or 0),
        is_dir=kind == "directory",
        etag=etag,
    )


@contextlib.contextmanager
def local_errors(loc: str, what: str) -> Iterator[None]:
    """Turn the OS errors of a missing local path into a :class:`DataNotFoundError` naming it."""
    try:
        yield
    except FileNotFoundError as exc:
        raise DataNotFoundError(
            f"{loc}: no such {what}. Check the path (cwd is {os.getcwd()})."
        ) from exc
    except IsADirectoryError as exc:
        raise DataNotFoundError(f"{loc}: is a folder, expected a file") from exc
    except NotADirectoryError as exc:
        raise DataNotFoundError(f"{loc}: no such {what} (a parent is not a folder)") from exc


def info(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
         ) -> ObjectInfo:
    """Stat one file or object.

    Raises
    ------
    DataNotFoundError
        If nothing exists there (names the location).
    AccessDeniedError, StorageError
        For a remote backend that refuses or fails.
    """
    loc = normalize(path)
    if is_local(loc):
        with local_errors(loc, "file or folder"):
            try:
                st = os.stat(loc)
            except (FileNotFoundError, NotADirectoryError):
                raise
            except OSError as exc:  # a symlink loop, a name too long, ...
                raise DataNotFoundError(f"{loc}: cannot be read ({exc.strerror or exc})") from exc
        import stat as stat_mod

        return ObjectInfo(loc, st.st_size, stat_mod.S_ISDIR(st.st_mode), st.st_mtime_ns,
                          st.st_ctime_ns)
    fs, fpath = filesystem(loc, storage_options)
    with translate_errors(loc, "look it up"):
        detail = fs.info(fpath)
    return _remote_info(loc, detail)


def exists(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> bool:
    """Return True if a file, object or folder (prefix) exists at ``path``."""
    try:
        info(path, storage_options)
    except DataNotFoundError:
        return False
    return True


def isdir(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> bool:
    """Return True if ``path`` is a folder (or, remotely, a prefix holding objects)."""
    try:
        return info(path, storage_options).is_dir
    except DataNotFoundError:
        return False


def isfile(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
           ) -> bool:
    """Return True if ``path`` is a file or object."""
    try:
        return not info(path, storage_options).is_dir
    except DataNotFoundError:
        return False


LIST_STATS = collections.Counter()  # type: ignore[var-annotated]
"""Listings made by this process, per kind (``find``/``ls``); tests count them."""


def _walk_local(top: str, *, hidden: bool) -> Iterator[tuple[os.DirEntry[str], bool]]:
    """Yield ``(entry, is_dir)`` for everything below a local folder, one ``scandir`` per folder.

    Hidden names (and what is inside hidden folders) are skipped unless
    ``hidden``; folders that vanish or cannot be read are skipped.
    """
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as iterator:
                entries = list(iterator)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for entry in entries:
            if not hidden and entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                continue
            if is_dir:
                stack.append(entry.path)
            yield entry, is_dir


def find(
    root: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    withdirs: bool = False,
    hidden: bool = False,
) -> dict[str, ObjectInfo]:
    """List every file below ``root``, recursively, in one listing per prefix.

    Returns ``{location: ObjectInfo}`` sorted by location. On an object store
    this is one paginated recursive listing (no request per file or folder);
    locally one ``scandir`` per folder. Names starting with ``.`` (and what is
    inside such folders) are left out unless ``hidden``. A missing root gives
    an empty dict.
    """
    loc = normalize(root)
    out: dict[str, ObjectInfo] = {}
    LIST_STATS["find"] += 1
    if is_local(loc):
        for entry, is_dir in _walk_local(loc, hidden=hidden):
            if is_dir:
                if withdirs:
                    out[entry.path] = ObjectInfo(entry.path, 0, True)
                continue
            try:
                st = entry.stat()
            except OSError:
                continue
            out[entry.path] = ObjectInfo(entry.path, st.st_size, False, st.st_mtime_ns,
                                         st.st_ctime_ns)
        return dict(sorted(out.items()))
    fs, fpath = filesystem(loc, storage_options)
    protocol = loc.split("://", 1)[0]
    with translate_errors(loc, "list it"):
        try:
            listing = fs.find(fpath, withdirs=withdirs, detail=True)
        except FileNotFoundError:
            return {}
    base = fpath.rstrip("/")
    for name, detail in listing.items():
        rel = name[len(base) :].lstrip("/") if name.startswith(base) else name
        if not rel or (not hidden and any(p.startswith(".") for p in rel.split("/"))):
            continue
        url = f"{loc.rstrip('/')}/{rel}" if protocol not in {"http", "https"} else name
        out[url] = _remote_info(url, detail)
    return dict(sorted(out.items()))


def list_files(
    root: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    hidden: bool = False,
) -> list[str]:
    """Return the locations of every file below ``root``, sorted: names only.

    Like :func:`find` without the details: locally one ``scandir`` per folder
    and no ``stat`` of any file (a catalog of 100k names costs the listing
    alone); on an object store the same single recursive listing as
    :func:`find`. Hidden names are left out unless ``hidden``; a missing root
    gives an empty list.
    """
    # an absolute local path is listed as given (no resolve: no stat of the folder)
    loc = root if isinstance(root, str) and os.path.isabs(root) else normalize(root)
    if not is_local(loc):
        return list(find(loc, storage_options, hidden=hidden))
    LIST_STATS["find"] += 1
    return sorted(entry.path for entry, is_dir in _walk_local(loc, hidden=hidden) if not is_dir)


def listdir(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
            ) -> list[ObjectInfo]:
    """List the entries directly inside a folder (or prefix), sorted by name."""
    loc = normalize(path)
    LIST_STATS["ls"] += 1
    if is_local(loc):
        try:
            with os.scandir(loc) as iterator:
                entries = sorted(iterator, key=lambda e: e.name)
        except FileNotFoundError as exc:
            raise DataNotFoundError(f"{loc}: no such folder") from exc
        except NotADirectoryError as exc:
            raise DataNotFoundError(f"{loc}: not a folder") from exc
        result = []
        for e in entries:
            try:
                result.append(ObjectInfo(e.path, 0 if e.is_dir() else e.stat().st_size,
                                         e.is_dir()))
            except OSError:
                continue
        return result
    fs, fpath = filesystem(loc, storage_options)
    with translate_errors(loc, "list it"):
        listing = fs.ls(fpath, detail=True)
    base = loc.rstrip("/")
    return sorted(
        (_remote_info(f"{base}/{d['name'].rstrip('/').rsplit('/', 1)[-1]}", d) for d in listing),
        key=lambda i: i.path,
    )
