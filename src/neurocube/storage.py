"""The one place that lists, stats, identifies and opens anything.

A *location* is a local path or an fsspec URL (``s3://bucket/key``,
``https://host/file``, ``gs://...``) plus its ``storage_options`` (a dict handed
to fsspec: ``{"anon": True}`` for a public bucket, or an endpoint and keys).
Every catalog and reader goes through this module; nothing else calls
``os.stat``, ``os.scandir`` or ``open`` on source data.

- :func:`normalize` turns a path or URL into the string every spec carries
  (an absolute local path, or the URL as given).
- :func:`info`, :func:`exists`, :func:`find` stat and list (one recursive
  listing per prefix on object stores, no per-file request).
- :func:`identity` says which version of a file this is: size, mtime and a hash
  of the first and last MiB for a local file; size and ETag (or version id)
  for an object.
- :func:`open_file` opens for reading with a chosen block size and cache
  type; :func:`read_range` / :func:`read_ranges` fetch byte ranges (concurrent
  requests for several); :class:`BlockReader` is a seekable file over an
  object whose blocks are shared by every reader of the process and fetched
  ahead of a forward pass by a pool of threads.

Credentials never leave this module in text: :class:`StorageOptions` prints
and tokenizes without them, and errors name the URL, never the options.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import os
import threading
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from neurocube.errors import (
    AccessDeniedError,
    ArgumentError,
    DataChangedError,
    DataNotFoundError,
    NeurocubeError,
    StorageError,
)

__all__ = [
    "IO_STATS",
    "BlockReader",
    "FileIdentity",
    "HandlePool",
    "ObjectInfo",
    "StorageOptions",
    "as_options",
    "basename",
    "check_unchanged",
    "delete",
    "exists",
    "file_identity",
    "find",
    "identity",
    "info",
    "is_local",
    "is_url",
    "isdir",
    "join",
    "list_files",
    "local_path",
    "normalize",
    "open_file",
    "options_for",
    "remember_options",
    "parent",
    "read_all",
    "read_range",
    "read_ranges",
    "write_bytes",
    "redact",
]


# --- counters ---------------------------------------------------------------------------------


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


# --- storage options --------------------------------------------------------------------------

#: Option names whose values are secrets (matched case-insensitively, at any depth).
SECRET_NAMES = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "session_token",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "client_secret",
        "credentials",
        "access_key",
        "secret_key",
        "sas_token",
        "account_key",
        "connection_string",
        "authorization",
        "headers",
        "auth",
    }
)


def redact(value: Any) -> Any:
    """Return ``value`` (storage options, possibly nested) with every secret replaced by ``***``."""
    if isinstance(value, Mapping):
        return {
            k: ("***" if str(k).lower() in SECRET_NAMES else redact(v)) for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


class StorageOptions(Mapping[str, Any]):
    """Frozen, picklable ``storage_options`` whose text never shows a secret.

    It travels inside specs to Dask workers (which read with it), so it is
    pickled whole; ``repr``, ``str`` and Dask tokens see the options with
    every secret (key, secret, token, ...) redacted, so credentials reach no
    cache key, attribute, message or log. Two sets of options that differ only
    in their secrets tokenize alike: the data they reach is the same.
    """

    __slots__ = ("_json",)
    _json: str

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        try:
            text = json.dumps(dict(options or {}), sort_keys=True)
        except TypeError as exc:
            raise TypeError(
                "storage_options must be a dict of JSON values (strings, numbers, booleans, "
                "lists and dicts of them) so that Dask workers can receive it; found a value "
                f"that is not ({exc}). Pass credentials as strings, or set them in the "
                "environment."
            ) from None
        object.__setattr__(self, "_json", text)

    def as_dict(self) -> dict[str, Any]:
        """Return a fresh, mutable copy of the options (secrets included: hand it to fsspec)."""
        out: dict[str, Any] = json.loads(self._json)
        return out

    def public(self) -> dict[str, Any]:
        """Return the options with secrets redacted."""
        out: dict[str, Any] = redact(self.as_dict())
        return out

    def __getitem__(self, key: str) -> Any:
        return self.as_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.as_dict())

    def __len__(self) -> int:
        return len(self.as_dict())

    def __hash__(self) -> int:
        return hash(self._json)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StorageOptions):
            return self._json == other._json
        if isinstance(other, Mapping):
            return self.as_dict() == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"StorageOptions({self.public()!r})"

    __str__ = __repr__

    def __reduce__(self) -> tuple[Any, ...]:
        return (StorageOptions, (self.as_dict(),))

    def __dask_tokenize__(self) -> Any:
        return ("neurocube.StorageOptions", json.dumps(self.public(), sort_keys=True))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("StorageOptions is frozen")


def as_options(options: Mapping[str, Any] | None) -> StorageOptions | None:
    """Return ``options`` frozen as :class:`StorageOptions`, or None for none given."""
    if options is None:
        return None
    if isinstance(options, StorageOptions):
        return options
    if not isinstance(options, Mapping):
        raise ArgumentError(
            f"storage_options must be a dict (e.g. {{'anon': True}}), found "
            f"{type(options).__name__}"
        )
    return StorageOptions(options) if options else None


# --- locations --------------------------------------------------------------------------------


def is_url(path: Any) -> bool:
    """Return True if ``path`` is an fsspec URL such as ``s3://...`` (``file://`` included)."""
    return isinstance(path, str) and "://" in path


def is_local(path: Any) -> bool:
    """Return True for a local path (``file://`` URLs included)."""
    return not is_url(path) or str(path).startswith("file://")


def local_path(path: str | os.PathLike[str]) -> Path:
    """Return a local path as an absolute :class:`~pathlib.Path` (symlinks resolved).

    Raises
    ------
    ValueError
        If ``path`` is a remote URL.
    """
    text = os.fspath(path)
    if is_url(text):
        if not text.startswith("file://"):
            raise ValueError(f"{text}: a remote URL, not a local path")
        text = text[len("file://") :]
    try:
        return Path(text).expanduser().resolve()
    except RuntimeError as exc:  # Python < 3.13: a symlink loop
        raise DataNotFoundError(
            f"{text}: a symlink loop ({exc}); expected a file or folder. Fix or remove the link."
        ) from exc
    except ValueError as exc:  # a NUL byte in the path
        raise ArgumentError(f"{text!r}: not a usable path ({exc}); expected a file name") from exc


def normalize(path: str | os.PathLike[str]) -> str:
    """Return the canonical text of a location: an absolute local path, or the URL itself.

    A trailing ``/`` of a URL is removed; ``file://`` URLs become local paths.
    """
    if isinstance(path, (str, os.PathLike)) and not (
        isinstance(path, str) and is_url(path) and not path.startswith("file://")
    ):
        return str(local_path(path))
    if not isinstance(path, str):
        raise ArgumentError(
            f"expected a path or URL string, found {type(path).__name__}: {path!r}"
        )
    return path.rstrip("/") if not path.endswith("://") else path


def join(base: str, *parts: str) -> str:
    """Join ``parts`` to a location with ``/`` (URLs) or the OS separator (local paths)."""
    if is_url(base):
        out = base.rstrip("/")
        for p in parts:
            out += "/" + str(p).strip("/")
        return out
    return os.path.join(base, *parts)


def basename(path: str) -> str:
    """Return the last component of a path or URL."""
    return str(path).rstrip("/").rsplit("/", 1)[-1] if is_url(path) else os.path.basename(path)


def parent(path: str) -> str:
    """Return the location one level up."""
    if is_url(path):
        return str(path).rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(path)


def relative(path: str, root: str) -> str:
    """Return ``path`` relative to ``root`` with ``/`` separators."""
    if is_url(path):
        return str(path)[len(root.rstrip("/")) + 1 :]
    return os.path.relpath(path, root).replace(os.sep, "/")


_FS_CACHE: dict[tuple[str, str], Any] = {}
_FS_LOCK = threading.Lock()


def _filesystem(url: str, options: Mapping[str, Any] | None) -> tuple[Any, str]:
    """Return ``(fsspec filesystem, path inside it)`` for a URL (one instance per options)."""
    import fsspec
    from fsspec.core import split_protocol

    protocol, _ = split_protocol(url)
    opts = as_options(options)
    key = (protocol or "file", opts._json if opts is not None else "{}")
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
    if fs is None:
        try:
            fs = fsspec.filesystem(protocol, **(opts.as_dict() if opts is not None else {}))
        except ImportError as exc:
            package = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
                       "abfs": "adlfs", "http": "aiohttp", "https": "aiohttp"}.get(
                           protocol or "", "the fsspec backend")
            raise StorageError(
                f"{url}: reading {protocol}:// URLs needs {package} ({exc}); install it with "
                f"pip install {package}."
            ) from None
        except (TypeError, ValueError) as exc:
            raise StorageError(
                f"{url}: fsspec refused these storage_options "
                f"{redact(opts.as_dict() if opts else {})} ({type(exc).__name__}). Expected "
                "options of the backend, e.g. {'anon': True} or "
                "{'key': ..., 'secret': ..., 'client_kwargs': {'endpoint_url': ...}} for S3."
            ) from None
        with _FS_LOCK:
            fs = _FS_CACHE.setdefault(key, fs)
    return fs, fs._strip_protocol(url)


def _describe(exc: BaseException) -> str:
    """Describe a backend error briefly, with no request details that could carry secrets."""
    name = type(exc).__name__
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{name}: {text[:200]}" if text else name


@contextlib.contextmanager
def translate_errors(url: str, what: str = "read", byte_range: tuple[int, int] | None = None
                     ) -> Iterator[None]:
    """Turn backend errors (s3fs, aiohttp, botocore, OS) into neurocube errors naming ``url``."""
    where = f" (bytes {byte_range[0]}-{byte_range[1] - 1})" if byte_range else ""
    try:
        yield
    except NeurocubeError:
        raise
    except FileNotFoundError as exc:
        raise DataNotFoundError(
            f"{url}: no such file or object. Check the path or URL (and, for a bucket, the "
            "endpoint and region in storage_options)."
        ) from _chain(exc)
    except PermissionError as exc:
        raise AccessDeniedError(
            f"{url}: access denied while trying to {what}{where} ({_describe(exc)}). The "
            "data may need credentials: pass storage_options={'key': ..., 'secret': ...} "
            "(or {'anon': True} for a public bucket), or set them in the environment."
        ) from _chain(exc)
    except IsADirectoryError as exc:
        raise DataNotFoundError(f"{url}: is a folder, expected a file") from _chain(exc)
    except Exception as exc:
        module = type(exc).__module__ or ""
        if "NoCredentials" in type(exc).__name__ or "Credential" in type(exc).__name__:
            raise StorageError(
                f"{url}: no credentials to {what} it ({_describe(exc)}). Pass "
                "storage_options={'anon': True} for a public bucket, or "
                "{'key': ..., 'secret': ...}; an S3-compatible server also needs "
                "{'client_kwargs': {'endpoint_url': 'https://...'}}."
            ) from _chain(exc)
        if isinstance(exc, (OSError, TimeoutError)) or module.split(".")[0] in {
            "botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "gcsfs", "adlfs",
        }:
            raise StorageError(
                f"{url}: could not {what}{where} ({_describe(exc)}), after the backend's "
                "retries. Check the network, the endpoint in storage_options and that the "
                "object exists; then try again."
            ) from _chain(exc)
        raise


def _chain(exc: BaseException) -> BaseException | None:
    """Return the exception to chain from: a builtin one, never a backend's (may show headers)."""
    return exc if type(exc).__module__ == "builtins" else None


# --- stat and list ----------------------------------------------------------------------------


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
def _local_errors(loc: str, what: str) -> Iterator[None]:
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
        with _local_errors(loc, "file or folder"):
            try:
                st = os.stat(loc)
            except (FileNotFoundError, NotADirectoryError):
                raise
            except OSError as exc:  # a symlink loop, a name too long, ...
                raise DataNotFoundError(f"{loc}: cannot be read ({exc.strerror or exc})") from exc
        import stat as stat_mod

        return ObjectInfo(loc, st.st_size, stat_mod.S_ISDIR(st.st_mode), st.st_mtime_ns,
                          st.st_ctime_ns)
    fs, fpath = _filesystem(loc, storage_options)
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
    fs, fpath = _filesystem(loc, storage_options)
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
    fs, fpath = _filesystem(loc, storage_options)
    with translate_errors(loc, "list it"):
        listing = fs.ls(fpath, detail=True)
    base = loc.rstrip("/")
    return sorted(
        (_remote_info(f"{base}/{d['name'].rstrip('/').rsplit('/', 1)[-1]}", d) for d in listing),
        key=lambda i: i.path,
    )


# --- identity ---------------------------------------------------------------------------------


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
        fs, fpath = _filesystem(path, storage_options)
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


# --- opening and reading ----------------------------------------------------------------------

#: Block size for reads whose size is not known ahead (headers, footers, sidecars).
SMALL_BLOCK = 64 << 10


def open_file(
    path: str | os.PathLike[str],
    mode: str = "rb",
    storage_options: Mapping[str, Any] | None = None,
    *,
    block_size: int | None = None,
    cache_type: str | None = None,
) -> IO[Any]:
    """Open a local path or a URL for reading.

    Remote files are opened with ``block_size`` (default :data:`SMALL_BLOCK`,
    so a header costs a few KiB, not fsspec's multi-MiB readahead) and
    ``cache_type`` (fsspec's: ``"readahead"`` by default, ``"none"`` for
    exact ranges, ``"all"`` for a small file read whole).

    Raises
    ------
    DataNotFoundError
        If the file does not exist; the message names it.
    AccessDeniedError, StorageError
        For a remote backend that refuses or fails.
    """
    IO_STATS.add_open()
    loc = normalize(path) if not isinstance(path, str) or is_url(path) else path
    if is_local(loc):
        local = local_path(loc) if is_url(loc) else Path(loc)
        with _local_errors(str(local), "file"):
            return open(local, mode)
    fs, fpath = _filesystem(loc, storage_options)
    with translate_errors(loc, "open it"):
        handle = fs.open(
            fpath,
            mode,
            block_size=block_size or SMALL_BLOCK,
            cache_type=cache_type or "readahead",
        )
    if "b" in mode:
        return _RemoteHandle(handle, loc)  # type: ignore[return-value]
    return handle


class _RemoteHandle(io.RawIOBase):
    """An fsspec file whose read errors are neurocube errors naming the URL."""

    def __init__(self, handle: Any, url: str) -> None:
        super().__init__()
        self._h = handle
        self.url = url
        self.name = url

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:
        pos = self._h.tell()
        with translate_errors(self.url, "read", (pos, pos + max(n or 0, 0))):
            data: bytes = self._h.read(-1 if n is None else n)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        memoryview(b).cast("B")[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return int(self._h.seek(offset, whence))

    def tell(self) -> int:
        return int(self._h.tell())

    @property
    def size(self) -> int:
        return int(self._h.size)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._h.close()
        super().close()


def read_range(
    path: str,
    start: int,
    end: int,
    storage_options: Mapping[str, Any] | None = None,
    *,
    etag: str = "",
) -> bytes:
    """Return bytes ``[start, end)`` of a file or object (one range request remotely).

    With ``etag`` (the version seen when the object was opened), an S3 read is
    conditional (``If-Match``): an object replaced since then raises
    :class:`DataChangedError` instead of returning bytes of another version.
    """
    return read_ranges(path, [(start, end)], storage_options, etag=etag)[0]


def read_ranges(
    path: str,
    ranges: Iterable[tuple[int, int]],
    storage_options: Mapping[str, Any] | None = None,
    *,
    etag: str = "",
) -> list[bytes]:
    """Return several byte ranges of one file or object; remote ranges go out concurrently.

    ``etag`` makes S3 reads conditional on that version (see :func:`read_range`).
    """
    ranges = [(a, b) for a, b in ranges]
    if not ranges:
        return []
    if is_local(path):
        out = []
        with open_file(path) as fh:
            for a, b in ranges:
                fh.seek(a)
                out.append(fh.read(max(0, b - a)) if b > a else b"")
        IO_STATS.add_bytes(sum(len(p) for p in out))
        return out
    fs, fpath = _filesystem(path, storage_options)
    IO_STATS.add_open()
    lo = min(a for a, _ in ranges)
    hi = max(b for _, b in ranges)
    with translate_errors(path, "read", (lo, hi)):
        if etag and path.startswith(("s3://", "s3a://")):
            parts: list[Any] = _s3_conditional_ranges(fs, fpath, ranges, etag, path)
        elif len(ranges) == 1:
            a, b = ranges[0]
            parts = [fs.cat_file(fpath, start=a, end=b) if b > a else b""]
        else:
            parts = fs.cat_ranges([fpath] * len(ranges), [a for a, _ in ranges],
                                  [b for _, b in ranges], on_error="raise")
        for p in parts:
            if isinstance(p, BaseException):
                raise p
    IO_STATS.add_bytes(sum(len(p) for p in parts))
    return list(parts)


def _s3_conditional_ranges(
    fs: Any, fpath: str, ranges: list[tuple[int, int]], etag: str, url: str
) -> list[bytes]:
    """GET byte ranges of an S3 object with ``If-Match: etag``, concurrently."""
    import asyncio

    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(fpath)
    tag, _, version_id = etag.partition("@")
    extra = {"VersionId": version_id} if version_id else {}

    attempts = max(1, int(getattr(fs, "retries", 5)))

    async def one(a: int, b: int) -> bytes:
        if b <= a:
            return b""
        for attempt in range(attempts):
            try:
                return await once(a, b)
            except (DataChangedError, FileNotFoundError, PermissionError):
                raise
            except Exception:  # a connection lost mid-body, a timeout: the backend's way, again
                if attempt == attempts - 1:
                    raise
                await asyncio.sleep(min(0.1 * 1.7**attempt, 5.0))
        raise AssertionError("unreachable")

    async def once(a: int, b: int) -> bytes:
        try:
            resp = await fs._call_s3(
                "get_object", Bucket=bucket, Key=key, Range=f"bytes={a}-{b - 1}",
                IfMatch=f'"{tag}"', **extra,
            )
        except Exception as exc:
            text = f"{exc} {exc.__cause__} {exc.__context__}"
            if "PreconditionFailed" in text or "pre-conditions" in text or "412" in text:
                raise DataChangedError(
                    f"{url}: changed since it was opened (its ETag is no longer {tag}). "
                    "Values read now would mix two versions: open it again."
                ) from None
            raise
        try:
            data: bytes = await resp["Body"].read()
            return data
        finally:
            resp["Body"].close()

    async def gather() -> list[bytes]:
        return list(await asyncio.gather(*(one(a, b) for a, b in ranges)))

    result: list[bytes] = sync(fs.loop, gather)
    return result


def read_all(path: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """Return the whole content of a (small) file or object."""
    if is_local(path):
        with open_file(path) as fh:
            data: bytes = fh.read()
        IO_STATS.add_bytes(len(data))
        return data
    fs, fpath = _filesystem(path, storage_options)
    IO_STATS.add_open()
    with translate_errors(path, "read"):
        data = fs.cat_file(fpath)
    IO_STATS.add_bytes(len(data))
    return data


def write_bytes(path: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write ``data`` to a local file (atomically: temporary sibling, then rename) or an object.

    For neurocube's own outputs (indexes in an index store), never for source data.
    """
    if is_local(path):
        target = local_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return
    fs, fpath = _filesystem(path, storage_options)
    with translate_errors(path, "write"):
        fs.pipe_file(fpath, data)  # an object appears whole or not at all


def delete(path: str, storage_options: Mapping[str, Any] | None = None, *,
           recursive: bool = False) -> None:
    """Delete a file or object (a folder or prefix with ``recursive``); absent is fine.

    For neurocube's own outputs (cache entries, indexes), never for source data.
    """
    if is_local(path):
        import shutil

        target = local_path(path)
        if recursive and target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
        return
    fs, fpath = _filesystem(path, storage_options)
    with translate_errors(path, "delete it"):
        try:
            fs.rm(fpath, recursive=recursive)
        except FileNotFoundError:
            pass
        with contextlib.suppress(Exception):
            fs.invalidate_cache(fpath)


# --- shared blocks of remote objects ----------------------------------------------------------

BLOCK_SIZE = 1 << 20  # a block of a remote object in the shared cache
# How far a forward pass fetches ahead of its reader: two 4 MiB requests in flight keep a
# decoder fed across ~100 ms of latency. With the block cache below, a first read of a
# 1 GB session from S3 peaked at output + ~190-205 MB (16 MiB / 64 MiB: + ~240-290 MB;
# the same read of a local file: + ~150 MB).
READAHEAD = 8 << 20
FETCH_THREADS = 8  # concurrent range requests per process
SHARED_CACHE_BYTES = 32 << 20  # blocks kept per process (LRU), shared by all readers

_FETCH_POOL: ThreadPoolExecutor | None = None
_FETCH_POOL_LOCK = threading.Lock()


def _fetch_pool() -> ThreadPoolExecutor:
    global _FETCH_POOL
    with _FETCH_POOL_LOCK:
        if _FETCH_POOL is None:
            _FETCH_POOL = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="neurocube-fetch")
        return _FETCH_POOL


class _SharedBlocks:
    """A per-process LRU of fetched blocks of remote objects, with in-flight fetches shared."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._blocks: collections.OrderedDict[tuple[Hashable, int], bytes] = (
            collections.OrderedDict()
        )
        self._bytes = 0
        self._inflight: dict[tuple[Hashable, int], Future[None]] = {}

    def get(self, key: tuple[Hashable, int]) -> bytes | None:
        with self._lock:
            data = self._blocks.get(key)
            if data is not None:
                self._blocks.move_to_end(key)
            return data

    def put(self, key: tuple[Hashable, int], data: bytes) -> None:
        with self._lock:
            if key in self._blocks:
                return
            self._blocks[key] = data
            self._bytes += len(data)
            while self._bytes > self.capacity and len(self._blocks) > 1:
                _, old = self._blocks.popitem(last=False)
                self._bytes -= len(old)

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._bytes = 0


SHARED_BLOCKS = _SharedBlocks(SHARED_CACHE_BYTES)


class BlockReader(io.RawIOBase):
    """A seekable, read-only file over a remote object, read in shared blocks.

    Blocks of :data:`BLOCK_SIZE` bytes live in a per-process LRU shared by
    every reader of the same object version (``version``: its ETag), so
    neighbouring chunk reads do not fetch their common blocks twice. Missing
    blocks are fetched by a pool of threads as concurrent range requests,
    consecutive blocks as one request. A forward pass fetches up to
    ``readahead`` bytes ahead in the background; :meth:`prefetch` asks for a
    known range up front (e.g. the compressed bytes of some volumes, from a
    gzip index). Local paths are never read through this class.
    """

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None,
        *,
        size: int,
        version: str,
        readahead: int | None = None,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        super().__init__()
        self.url = url
        self.name = url
        self.options = as_options(storage_options)
        self.size = size
        self.block_size = block_size
        self.readahead = READAHEAD if readahead is None else readahead
        self.version = version
        self.ahead_limit = size  # read-ahead never fetches past this byte (see limit_to)
        self._key: Hashable = (url, size, version, block_size)
        self._pos = 0
        self._last_end = -1
        IO_STATS.add_open()

    # io interface
    def readable(self) -> bool:  # noqa: D102
        return True

    def seekable(self) -> bool:  # noqa: D102
        return True

    def tell(self) -> int:  # noqa: D102
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:  # noqa: D102
        base = {0: 0, 1: self._pos, 2: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: Any) -> int:  # noqa: D102
        view = memoryview(b).cast("B")
        n = min(len(view), max(0, self.size - self._pos))
        if n <= 0:
            return 0
        start, end = self._pos, self._pos + n
        sequential = start == self._last_end
        ahead = min(self.size, end + self.readahead) if sequential else end
        ahead = max(end, min(ahead, self.ahead_limit))
        self._ensure(start, end, ahead)
        bs = self.block_size
        out = 0
        for block in range(start // bs, (end - 1) // bs + 1):
            data = memoryview(self._block(block))  # sliced without a copy
            lo = max(start, block * bs) - block * bs
            hi = min(end, (block + 1) * bs) - block * bs
            view[out : out + hi - lo] = data[lo:hi]
            out += hi - lo
        self._pos = self._last_end = end
        return n

    def read(self, n: int | None = -1) -> bytes:  # noqa: D102
        if n is None or n < 0:
            n = self.size - self._pos
        buf = bytearray(max(0, n))
        got = self.readinto(buf)
        return bytes(buf[:got])

    def readall(self) -> bytes:  # noqa: D102
        return self.read(-1)

    def prefetch(self, start: int, end: int) -> None:
        """Fetch bytes ``[start, end)`` into the shared blocks now (concurrent requests)."""
        start, end = max(0, start), min(self.size, end)
        if end > start:
            self._ensure(start, end, end)

    # blocks
    def _block(self, block: int) -> bytes:
        key = (self._key, block)
        data = SHARED_BLOCKS.get(key)
        if data is None:  # evicted between fetch and use: fetch it again
            self._ensure(block * self.block_size, (block + 1) * self.block_size,
                         (block + 1) * self.block_size)
            data = SHARED_BLOCKS.get(key)
            if data is None:
                data = self._fetch_run(block, block + 1, keep=False)
        return data

    def _ensure(self, start: int, end: int, ahead: int) -> None:
        """Make blocks covering ``[start, end)`` present; start fetching up to ``ahead``."""
        bs = self.block_size
        first, last = start // bs, (max(end, ahead) - 1) // bs
        need_last = (end - 1) // bs
        waits: list[Future[None]] = []
        missing: list[int] = []
        with SHARED_BLOCKS._lock:
            for block in range(first, last + 1):
                key = (self._key, block)
                if key in SHARED_BLOCKS._blocks:
                    continue
                fut = SHARED_BLOCKS._inflight.get(key)
                if fut is not None:
                    if block <= need_last:
                        waits.append(fut)
                    continue
                missing.append(block)
            futures: list[tuple[int, int, Future[None]]] = []
            for a, b in _runs(missing, max_len=max(1, (4 << 20) // bs)):
                run_future: Future[None] = Future()
                for block in range(a, b):
                    SHARED_BLOCKS._inflight[(self._key, block)] = run_future
                futures.append((a, b, run_future))
        pool = _fetch_pool()
        for a, b, run_future in futures:
            pool.submit(self._fill, a, b, run_future)
            if a <= need_last:
                waits.append(run_future)
        for fut in waits:
            fut.result()

    def _fill(self, a: int, b: int, fut: Future[None]) -> None:
        try:
            self._fetch_run(a, b, keep=True)
            fut.set_result(None)
        except BaseException as exc:  # handed to the reader that waits on it
            fut.set_exception(exc)
        finally:
            with SHARED_BLOCKS._lock:
                for block in range(a, b):
                    SHARED_BLOCKS._inflight.pop((self._key, block), None)

    def _fetch_run(self, a: int, b: int, *, keep: bool) -> bytes:
        bs = self.block_size
        lo, hi = a * bs, min(self.size, b * bs)
        data = read_range(self.url, lo, hi, self.options, etag=self.version)
        if len(data) != hi - lo:
            raise DataChangedError(
                f"{self.url}: the object ended at byte {lo + len(data)} while bytes up to {hi} "
                f"were expected ({self.size} when it was opened). It changed or was truncated: "
                "open it again."
            )
        if keep:
            for block in range(a, b):
                SHARED_BLOCKS.put((self._key, block), data[(block - a) * bs : (block - a + 1) * bs])
        return data[:bs]


def _runs(blocks: list[int], max_len: int) -> Iterator[tuple[int, int]]:
    """Group sorted block numbers into ``[a, b)`` runs of consecutive blocks, at most max_len."""
    start = prev = None
    for block in blocks:
        if start is None:
            start = prev = block
            continue
        assert prev is not None
        if block == prev + 1 and block - start < max_len:
            prev = block
            continue
        yield start, prev + 1
        start = prev = block
    if start is not None and prev is not None:
        yield start, prev + 1


# --- handle pool ------------------------------------------------------------------------------


_ABANDONED_AFTER_FORK: list[Any] = []  # a forked child's inherited handles, never touched


def _forget_after_fork(ref: Any) -> None:
    pool = ref()
    if pool is not None:
        pool._after_fork()


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
        if hasattr(os, "register_at_fork"):  # a forked child (e.g. a DataLoader worker)
            ref = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: _forget_after_fork(ref))

    def _after_fork(self) -> None:
        """In a forked child: leave the parent's handles alone and open files anew.

        The old handles are kept referenced, never closed or collected here: their
        destructors may take library locks that another thread of the parent held
        at fork time (h5py's, for one), which would hang the child.
        """
        _ABANDONED_AFTER_FORK.append(self._handles)
        self._lock = threading.Lock()
        self._handles = collections.OrderedDict()

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


# --- options of opened locations ------------------------------------------------------------

_KNOWN_OPTIONS: dict[str, StorageOptions] = {}
_KNOWN_LOCK = threading.Lock()


def remember_options(location: str, storage_options: Mapping[str, Any] | None) -> None:
    """Record the options a remote location was opened with, for this process.

    Attributes may name sources by URL only (never with credentials); code
    that later stats such a source (cache keys, change checks) finds the
    options here with :func:`options_for`. Local paths are not recorded.
    """
    opts = as_options(storage_options)
    if opts is None or is_local(location):
        return
    with _KNOWN_LOCK:
        _KNOWN_OPTIONS[normalize(location)] = opts


def options_for(location: str) -> StorageOptions | None:
    """Return the options recorded for ``location`` or its nearest recorded parent, else None."""
    if is_local(location):
        return None
    loc = normalize(location)
    with _KNOWN_LOCK:
        while True:
            opts = _KNOWN_OPTIONS.get(loc)
            if opts is not None:
                return opts
            if "/" not in loc.split("://", 1)[-1]:
                return None
            loc = loc.rsplit("/", 1)[0]
