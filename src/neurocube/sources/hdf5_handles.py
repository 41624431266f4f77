"""Open HDF5 files read-only and keep one pooled handle of each per process.

Everything that turns a path or URL into an open ``h5py.File`` lives here: naming a file
(:func:`location`, :func:`stat_key`), recognising one (:func:`is_hdf5`), opening it
(:func:`open_hdf5`) and sharing the handle (:func:`pooled_file`, :func:`release_file`).
The lazy arrays of :mod:`neurocube.sources.hdf5` hold no handle; each process reaches its
files through :data:`HDF5_POOL` (an LRU of read-only handles, one lock per handle), keyed by
``(path, size, version)`` so that a file replaced since it was seen gets a fresh handle, and
a file changed in place is refused instead of read as a mix of two versions.

Local files open in SWMR mode (``swmr=True, libver="latest"``) where HDF5 allows it, so a
writer appending in SWMR mode neither blocks nor confuses a reader, with a bounded number of
metadata retries (:data:`SWMR_METADATA_READ_ATTEMPTS`) so a damaged file fails instead of
hanging; files the SWMR open refuses open plainly read-only.

Remote files (``s3://``, ``https://``: any fsspec URL, with ``storage_options``) open over a
:class:`neurocube.storage.BlockReader` (blocks of :data:`REMOTE_BLOCK_SIZE` shared by every
handle of the process, no readahead: opening reads the superblock and object headers, not the
data), only after a check that the object still has the ETag first seen
(:func:`neurocube.storage.check_unchanged`, once per process and version). While h5py reads a
remote file the cyclic garbage collector is paused (:func:`gc_paused`).

Handles that read attributes (``heap_checked``) and every remote handle read through a file
object that refuses a damaged global heap collection before HDF5 parses it
(:func:`global_heap_problem`; files with 8-byte offsets): HDF5 loops forever on some.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py

from neurocube import storage
from neurocube.errors import (
    DataChangedError,
    DataNotFoundError,
    FormatError,
    NeurocubeError,
    ReaderNotFoundError,
)
from neurocube.storage import (
    IO_STATS,
    BlockReader,
    HandlePool,
    StorageOptions,
    as_options,
    is_local,
    is_url,
    open_file,
)

__all__ = [
    "GLOBAL_HEAP_SIGNATURE",
    "HDF5_POOL",
    "HDF5_SIGNATURE",
    "OPEN_LOCK",
    "REMOTE_BLOCK_SIZE",
    "SWMR_METADATA_READ_ATTEMPTS",
    "Version",
    "gc_paused",
    "global_heap_problem",
    "is_hdf5",
    "location",
    "open_hdf5",
    "pooled_file",
    "release_file",
    "stat_key",
]

#: What identifies the version of a file: its mtime (ns) locally, its ETag remotely.
Version = int | str


#: The eight bytes every HDF5 superblock starts with.
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

#: One pool of read-only h5py handles per process (never pickled).
HDF5_POOL = HandlePool(maxsize=32)

#: Held while handles are opened and the pool's keys change (and for other one-time setup).
OPEN_LOCK = threading.Lock()

#: How often HDF5 re-reads a metadata object whose checksum fails in SWMR mode. A SWMR reader
#: retries because a writer may be mid-update; HDF5's default is 100 tries with a sleep that
#: doubles each time (1 ns, 2 ns, ... so the last tries sleep for years): a *damaged* file then
#: hangs its reader. 20 tries sleep about a millisecond in all, plenty for a writer's update.
SWMR_METADATA_READ_ATTEMPTS = 20


def _hdf5_library() -> Any:
    """Find the HDF5 C library h5py is linked with (a ctypes handle), or None."""
    import ctypes

    try:  # the process's own memory map (not source data): where h5py's libhdf5 is loaded from
        maps = Path("/proc/self/maps").read_text().splitlines()
        paths = {line.split()[-1] for line in maps if "libhdf5" in line and "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        if os.path.basename(path).startswith("libhdf5") and "_hl" not in os.path.basename(path):
            try:
                lib = ctypes.CDLL(path)
                lib.H5Pset_metadata_read_attempts  # noqa: B018 - the symbol must exist
            except (OSError, AttributeError):
                continue
            return lib
    return None


_HDF5_LIB: list[Any] = []


def _open_swmr_read(loc: str) -> h5py.File:
    """Open ``loc`` read-only in SWMR mode with bounded metadata read attempts.

    Falls back to h5py's own SWMR open (HDF5's default attempts) where the C library's
    ``H5Pset_metadata_read_attempts`` cannot be reached (not Linux, or an unusual build).
    """
    import ctypes

    if not _HDF5_LIB:
        _HDF5_LIB.append(_hdf5_library())
    lib = _HDF5_LIB[0]
    if lib is None:
        return h5py.File(loc, "r", libver="latest", swmr=True)
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_LATEST, h5py.h5f.LIBVER_LATEST)
    status = lib.H5Pset_metadata_read_attempts(
        ctypes.c_int64(fapl.id), ctypes.c_uint(SWMR_METADATA_READ_ATTEMPTS)
    )
    if status < 0:
        return h5py.File(loc, "r", libver="latest", swmr=True)
    fid = h5py.h5f.open(os.fsencode(loc), h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ, fapl=fapl)
    return h5py.File(fid)


_PoolKey = tuple[str, str, int, Version]
_CURRENT_KEY: dict[tuple[str, str], _PoolKey] = {}  # per (kind of handle, path)
_KEYS_OF_PATH: dict[str, set[_PoolKey]] = {}  # every key pooled, per path

#: Blocks of remote HDF5 files h5py reads through (metadata: a few KiB each, scattered).
REMOTE_BLOCK_SIZE = 128 * 2**10


def location(path: str | os.PathLike[str]) -> str:
    """Return the text every spec carries for ``path``: an absolute local path or the URL.

    Local paths are made absolute without resolving symlinks (the name the
    caller used stays the name in attrs and messages); ``file://`` URLs are
    local paths.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ReaderNotFoundError(
            f"expected the path of an HDF5 file (a str or os.PathLike), got {path!r} "
            f"({type(path).__name__}). Pass the file's path or URL."
        )
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if is_url(text) and not text.startswith("file://"):
        return storage.normalize(text)
    return str(Path(text.removeprefix("file://")).expanduser().absolute())


def is_hdf5(
    path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> bool:
    """Return True if ``path`` starts with an HDF5 superblock signature.

    HDF5 places the superblock at byte 0, 512, 1024, 2048, ... (a user block
    may precede it); the first four positions are checked (one small read of
    a remote object). Never raises for a missing or unreadable file.
    """
    try:
        with open_file(location(path), "rb", storage_options) as fh:
            return _has_signature(fh)
    except (OSError, ValueError):
        return False


def _has_signature(fh: Any) -> bool:
    for offset in (0, 512, 1024, 2048):
        fh.seek(offset)
        if fh.read(8) == HDF5_SIGNATURE:
            return True
    return False


def stat_key(
    path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> tuple[str, int, Version]:
    """Return ``(location, size, version)`` of a file: mtime_ns locally, the ETag remotely.

    One stat (a HEAD request for an object).

    Raises
    ------
    DataNotFoundError
        If the file does not exist (or is a folder); the message names it.
    AccessDeniedError, StorageError
        For a remote backend that refuses or fails.
    """
    loc = location(path)
    meta = storage.info(loc, storage_options)
    if meta.is_dir:
        raise DataNotFoundError(f"{loc}: is a folder, expected an HDF5 file")
    if is_local(loc):
        return loc, meta.size, meta.mtime_ns
    return loc, meta.size, meta.etag or f"size:{meta.size}"


# -- global heap collections: checked before HDF5 parses them ----------------------------------

#: Signature of a global heap collection (where HDF5 keeps variable-length strings, e.g. the
#: attribute values of a trace cache).
GLOBAL_HEAP_SIGNATURE = b"GCOL"

_GCOL_HEADER = 16  # signature, version, 3 reserved bytes, collection size (8 bytes)
_GCOL_OBJECT_HEADER = 16  # index (2), reference count (2), reserved (4), size (8)


def global_heap_problem(block: Any, offset: int, file_size: int) -> str | None:
    """Say what is wrong with a global heap collection read at ``offset``, or None.

    ``block`` holds the bytes HDF5 asked for at ``offset``. HDF5 reads a collection
    once for its header and once whole; the objects are checked when the block
    holds the whole collection. HDF5 itself walks the objects by their declared
    sizes and, on a damaged collection (a free-space object of size 0), loops
    forever; a collection declaring more bytes than the file holds would be
    allocated whole. Both are refused here, before HDF5 sees the bytes. File
    offsets and lengths of 8 bytes are assumed (the caller checks the superblock).
    """
    view = memoryview(block).cast("B")
    if len(view) < _GCOL_HEADER or bytes(view[:4]) != GLOBAL_HEAP_SIGNATURE:
        return None
    size = int.from_bytes(view[8:16], "little")
    if size < _GCOL_HEADER or offset + size > file_size:
        return (
            f"a global heap collection at byte {offset} declaring {size} bytes, where the "
            f"file has {max(file_size - offset, 0)} bytes from there"
        )
    if size > len(view):
        return None  # the header read: HDF5 reads the whole collection next
    pos = _GCOL_HEADER
    while pos + _GCOL_OBJECT_HEADER <= size:
        index = int.from_bytes(view[pos : pos + 2], "little")
        length = int.from_bytes(view[pos + 8 : pos + 16], "little")
        need = length if index == 0 else _GCOL_OBJECT_HEADER + (length + 7) // 8 * 8
        if (index == 0 and length < _GCOL_OBJECT_HEADER) or pos + need > size:
            return (
                f"a global heap collection at byte {offset} ({size} bytes) whose object at "
                f"byte {offset + pos} (index {index}) declares {length} bytes, which do not "
                "fit in the collection"
            )
        pos += need
    return None


def _heap_error(loc: str, problem: str) -> FormatError:
    return FormatError(
        f"{loc}: expected global heap collections (variable-length strings) that fit in the "
        f"file; found {problem}. The file is damaged: restore or re-create it."
    )


def _offsets_are_8_bytes(fh: Any) -> bool:
    """Whether the superblock declares 8-byte offsets and lengths (what the heap check reads)."""
    for base in (0, 512, 1024, 2048):
        fh.seek(base)
        head = fh.read(16)
        if head[:8] != HDF5_SIGNATURE:
            continue
        if head[8] in (0, 1):
            return head[13:15] == b"\x08\x08"
        return head[9:11] == b"\x08\x08"
    return False


class _HeapCheckedFile(io.RawIOBase):
    """A local HDF5 file h5py reads through, refusing damaged global heap collections.

    Used for handles that read attributes (variable-length strings), where
    HDF5 parses global heap collections; a refused collection is kept in
    :attr:`error` (a FormatError naming the file) for the caller of h5py.
    """

    error: BaseException | None = None

    def __init__(self, loc: str) -> None:
        self.loc = loc
        self._fh = storage.open_file(loc, "rb")
        self._size = os.fstat(self._fh.fileno()).st_size
        self._check = _offsets_are_8_bytes(self._fh)
        self._fh.seek(0)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def fileno(self) -> int:
        return self._fh.fileno()

    def readinto(self, b: Any) -> int:
        """Read into ``b``; a damaged global heap collection raises (kept in :attr:`error`)."""
        offset = self._fh.tell()
        n = self._fh.readinto(b)  # type: ignore[attr-defined]
        if self._check and n:
            problem = global_heap_problem(memoryview(b)[:n], offset, self._size)
            if problem is not None:
                self.error = _heap_error(self.loc, problem)
                raise OSError(str(self.error))
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


class _RemoteH5File(BlockReader):
    """The file object h5py reads a remote HDF5 file through.

    No readahead (HDF5 jumps between object headers and chunk indexes; a
    forward pass over metadata must not pull megabytes of data). A storage
    error raised inside h5py's read callback is kept in :attr:`error` so the
    caller raises it instead of h5py's generic "can't read" OSError.
    """

    error: BaseException | None = None
    heap_check = False  # set at open when the superblock declares 8-byte offsets and lengths

    def readinto(self, b: Any) -> int:
        """Read into ``b``, keeping any error for the caller of h5py.

        A damaged global heap collection is refused as for local files.
        """
        offset = self.tell()
        try:
            n = super().readinto(b)
        except BaseException as exc:
            self.error = exc
            raise
        if n and self.heap_check:
            problem = global_heap_problem(memoryview(b)[:n], offset, self.size)
            if problem is not None:
                self.error = _heap_error(self.url, problem)
                raise OSError(str(self.error))
        return n


def open_hdf5(
    path: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    size: int | None = None,
    version: Version | None = None,
    heap_checked: bool = False,
) -> h5py.File:
    """Open an HDF5 file or object read-only.

    Local files open in SWMR mode where HDF5 allows it. Remote objects open
    over a block reader that reads only what HDF5 asks for (``size`` and
    ``version``, as :func:`stat_key` gave them, save a HEAD request). Counts
    one open in :data:`neurocube.storage.IO_STATS`.

    With ``heap_checked``, a local file is read through a file object that
    refuses damaged global heap collections before HDF5 parses them (HDF5
    loops forever on some); use it for handles that read attributes. It reads
    data about a fifth slower than HDF5's own driver, so data reads use the
    plain handle. Remote objects are always read that way.

    Raises
    ------
    DataNotFoundError
        If the file does not exist.
    AccessDeniedError, StorageError
        For a remote backend that refuses or fails.
    FormatError
        If the file is not HDF5 (or is damaged beyond opening).
    """
    loc = location(path)
    if not is_local(loc):
        return _open_remote(loc, as_options(storage_options), size, version)
    meta = storage.info(loc)
    if meta.is_dir:
        raise DataNotFoundError(f"{loc}: is a folder, expected an HDF5 file")
    IO_STATS.add_open()
    if heap_checked:
        return _open_heap_checked(loc)
    with OPEN_LOCK:
        try:
            return _open_swmr_read(loc)
        except (OSError, ValueError):
            pass  # not SWMR-capable (or locked by a non-SWMR writer): plain read-only below
        try:
            return h5py.File(loc, "r")
        except OSError as exc:
            raise _not_opened(loc, is_hdf5(loc), exc) from exc


def _open_heap_checked(loc: str) -> h5py.File:
    reader = _HeapCheckedFile(loc)
    with OPEN_LOCK:
        try:
            h5 = h5py.File(reader, "r")
        except (OSError, ValueError) as exc:
            reader.close()
            if isinstance(reader.error, NeurocubeError):
                raise reader.error from None
            raise _not_opened(loc, is_hdf5(loc), exc) from None
    h5._neurocube_reader = reader  # for _storage_errors
    return h5


@atexit.register
def _close_pooled_handles() -> None:
    """Close pooled handles while Python still runs.

    A handle read through a Python file object (remote, heap-checked) calls back into
    Python when HDF5 closes it; left to HDF5's own exit handler, that happens after the
    interpreter is gone and crashes the process.
    """
    HDF5_POOL.discard_matching(lambda key: True)


def _not_opened(loc: str, signature: bool, exc: BaseException) -> FormatError:
    if signature:
        return FormatError(
            f"{loc}: an HDF5 file that h5py cannot open ({exc}). It may be damaged or "
            "still open for writing by another program; close that program or re-create "
            "the file."
        )
    return FormatError(
        f"{loc}: expected an HDF5 file (signature {HDF5_SIGNATURE!r}), found other "
        "bytes. Check that this is the file you meant."
    )


_GC_PAUSES = 0
_GC_PAUSE_LOCK = threading.Lock()
_GC_WAS_ENABLED = True


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Keep Python's cyclic garbage collector off while h5py reads a remote file.

    h5py holds its global lock for the whole of a read, and HDF5 reads a
    remote file through :class:`_RemoteH5File`, whose bytes fsspec fetches on
    its own event-loop thread. If a collection starts on that thread and frees
    an h5py object left in a reference cycle (an exception's traceback holds
    them), the free waits for h5py's lock while the lock's holder waits for
    the fetch: both hang for good (seen in the suite). With the collector off
    until no remote h5py call is running, no thread can start one meanwhile.
    Nested and concurrent pauses are counted; the collector is turned back on
    (if it was on) when the last one ends.
    """
    import gc

    global _GC_PAUSES, _GC_WAS_ENABLED
    with _GC_PAUSE_LOCK:
        if _GC_PAUSES == 0:
            _GC_WAS_ENABLED = gc.isenabled()
            gc.disable()
        _GC_PAUSES += 1
    try:
        yield
    finally:
        with _GC_PAUSE_LOCK:
            _GC_PAUSES -= 1
            if _GC_PAUSES == 0 and _GC_WAS_ENABLED:
                gc.enable()


def _open_remote(
    url: str, options: StorageOptions | None, size: int | None, version: Version | None
) -> h5py.File:
    if size is None or version is None:
        _, size, version = stat_key(url, options)
    reader = _RemoteH5File(
        url, options, size=size, version=str(version), readahead=0,
        block_size=REMOTE_BLOCK_SIZE,
    )  # fmt: skip
    reader.prefetch(0, min(size, REMOTE_BLOCK_SIZE))  # storage errors surface here, as ours
    reader.heap_check = _offsets_are_8_bytes(reader)
    reader.seek(0)
    with OPEN_LOCK, gc_paused():
        try:
            h5 = h5py.File(reader, "r")
        except (OSError, ValueError) as exc:
            if isinstance(reader.error, NeurocubeError):
                raise reader.error from None
            reader.error = None
            raise _not_opened(url, _has_signature(reader), exc) from None
    h5._neurocube_reader = reader  # for _storage_errors and prefetching
    return h5


@contextlib.contextmanager
def _storage_errors(h5: h5py.File) -> Iterator[None]:
    """Raise the storage error behind an h5py failure on a remote file, not h5py's OSError."""
    try:
        yield
    except (OSError, RuntimeError, KeyError, ValueError):
        reader = getattr(h5, "_neurocube_reader", None)
        error = getattr(reader, "error", None)
        if isinstance(error, NeurocubeError):
            reader.error = None  # type: ignore[union-attr]
            raise error from None
        raise


def _newer(previous: _PoolKey, key: _PoolKey) -> bool:
    """Whether ``key`` names a later version of the file than ``previous``."""
    old, new = previous[3], key[3]
    if isinstance(old, int) and isinstance(new, int):
        return old < new  # local: a later mtime
    return old != new or previous[2] != key[2]  # an object's old version cannot be read


@contextlib.contextmanager
def pooled_file(
    path: str,
    size: int,
    version: Version,
    storage_options: Mapping[str, Any] | None = None,
    *,
    heap_checked: bool = False,
) -> Iterator[h5py.File]:
    """Yield this process's pooled handle of ``path``, holding its lock.

    ``heap_checked`` asks for a handle that refuses damaged global heap
    collections (see :func:`open_hdf5`): use it to read attributes.

    The pool key is ``(path, size, version)`` as the caller saw them (mtime
    locally, ETag remotely), so a file replaced since (an atomic rewrite, a new
    object version) gets a fresh handle instead of a stale one. A remote
    handle is opened only after checking that the object still has that ETag
    (:class:`~neurocube.errors.DataChangedError` otherwise; once per process
    and version).
    """
    kind = "hdf5-heap-checked" if heap_checked and is_local(path) else "hdf5"
    key: _PoolKey = (kind, path, size, version)
    with OPEN_LOCK:
        previous = _CURRENT_KEY.get((kind, path))
        _CURRENT_KEY[(kind, path)] = key
        _KEYS_OF_PATH.setdefault(path, set()).add(key)
    if previous is not None and previous != key and _newer(previous, key):
        HDF5_POOL.discard(previous)  # the file was replaced: free the old version's handle

    def opener() -> h5py.File:
        if not is_local(path):
            storage.check_unchanged(path, storage_options, size, version)
        return open_hdf5(
            path, storage_options, size=size, version=version, heap_checked=heap_checked
        )

    handle, lock = HDF5_POOL.acquire(key, opener)
    if is_local(path):
        with lock:
            changed = _changed(handle, key)
        if changed is not None:
            HDF5_POOL.discard(key)  # that handle reads another version: never use it again
            raise changed
    remote = not is_local(path)
    with lock, _storage_errors(handle), (gc_paused() if remote else contextlib.nullcontext()):
        reader = getattr(handle, "_neurocube_reader", None)
        if reader is not None:
            reader.error = None
        yield handle


def _changed(handle: h5py.File, key: _PoolKey) -> DataChangedError | None:
    """Return the error for a local handle whose file is not the version ``key`` names.

    One fstat.

    The check is on the open file itself, so a file edited in place (same inode, new
    size or mtime) is refused, while a file *replaced* by rename leaves the old inode,
    and a handle already open on it, unchanged: that handle still reads exactly the
    version that was opened. A handle opened after the replacement sees the new file
    and is refused.
    """
    _, path, size, version = key
    try:
        reader = getattr(handle, "_neurocube_reader", None)
        st = os.fstat(reader.fileno() if reader is not None else handle.id.get_vfd_handle())
        now: tuple[int, Version] = (st.st_size, st.st_mtime_ns)
    except (OSError, RuntimeError, ValueError, TypeError):  # a driver without a descriptor
        _, now_size, now_version = storage.stat_key(path)
        now = (now_size, now_version)
    if now != (size, version):
        return DataChangedError(
            f"{path}: changed since it was opened (then {size} bytes, mtime {version}; now "
            f"{now[0]} bytes, mtime {now[1]}). Values read now would mix two versions: open "
            "it again."
        )
    return None


def release_file(path: str | os.PathLike[str]) -> bool:
    """Close this process's pooled read handle of ``path``, if it has one.

    While HDF5 has a file open it holds a shared lock on it, so a program that
    rewrites the file *in place* (offspect's own ``set_trace_attrs``, ``h5py``
    in ``"r+"`` mode) fails with "unable to lock file" as long as neurocube keeps
    its handle in :data:`HDF5_POOL`. Call this (on a cluster:
    ``client.run(release_file, path)``) before such an edit. neurocube's own
    writers replace files by rename and never need it. Datasets opened earlier
    still work: their next read opens the file again. URLs work too (their
    handles hold no lock, only memory).

    Returns
    -------
    bool
        Whether this process had opened the file through the pool.
    """
    loc = location(path)
    with OPEN_LOCK:
        for kind in ("hdf5", "hdf5-heap-checked"):
            _CURRENT_KEY.pop((kind, loc), None)
        keys = _KEYS_OF_PATH.pop(loc, set())
    for key in keys:  # the current version and any older one an earlier Dataset still reads
        HDF5_POOL.discard(key)
    return bool(keys)
