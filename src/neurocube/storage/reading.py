"""Opening and reading files and objects; writing and deleting neurocube's own outputs.

:func:`open_file`, byte ranges (:func:`read_range`, :func:`read_ranges`; conditional on
the ETag on S3), :func:`read_all`; :func:`write_bytes` and :func:`delete` are for
indexes and cache entries, never for source data.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from neurocube.errors import DataChangedError
from neurocube.storage.backends import filesystem, translate_errors
from neurocube.storage.counters import IO_STATS
from neurocube.storage.listing import local_errors
from neurocube.storage.locations import is_local, is_url, local_path, normalize

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
        with local_errors(str(local), "file"):
            return open(local, mode)
    fs, fpath = filesystem(loc, storage_options)
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
    fs, fpath = filesystem(path, storage_options)
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
    fs, fpath = filesystem(path, storage_options)
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
    fs, fpath = filesystem(path, storage_options)
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
    fs, fpath = filesystem(path, storage_options)
    with translate_errors(path, "delete it"):
        try:
            fs.rm(fpath, recursive=recursive)
        except FileNotFoundError:
            pass
        with contextlib.suppress(Exception):
            fs.invalidate_cache(fpath)
