"""Random access into ``.gz`` files through seek-point indexes.

A gzip stream can only be decompressed from its start, unless one keeps
*seek points*: (compressed offset, uncompressed offset, 32 KiB window) every
few MiB. This module keeps such an index (indexed_gzip's ``GZIDX`` format) for
each ``.nii.gz`` neurocube reads, in neurocube's cache folder, never beside the
data:

- first read: the file is streamed once, in order, through one shared handle
  per process (rapidgzip's parallel decoder on all cores, :data:`STREAM_THREADS`;
  indexed_gzip if rapidgzip is missing), which records seek points and a
  checksum of every volume as it goes; the stream is read to its end, where
  rapidgzip checks the gzip CRC32 and length (and neurocube the trailer's
  presence), and the index is exported atomically from that same pass. No
  value read through the stream is handed out before that check: a partial
  first read goes on to the end of the file (see :func:`read_range`);
- later reads: every thread opens its own indexed_gzip reader on the index and
  seeks straight to the bytes it needs, so chunks inflate in parallel (the
  libraries release the GIL) and in any order;
- whole masked loads (:func:`neurocube.load`): each thread reads a contiguous
  run of volumes in one forward pass through a private rapidgzip reader on
  the same index (:func:`open_sequential`), which inflates faster per core.

A remote object (``s3://``, ``https://``) is read the same way through a
seekable file over its byte ranges (:class:`neurocube.storage.BlockReader`):
the first pass fetches the object once, ahead of the inflater, and records the
index; with the index, a read fetches only the compressed bytes between the
seek points around the volumes it needs.

Verification. Reads through an index check the volumes they return against the
checksums the first pass recorded (:func:`check_volumes`, the checksum itself
is :mod:`neurocube.sources.volume_sums`): a mismatch is a
:class:`~neurocube.errors.CorruptDataError` naming the file and the volume. An
index the caller names (``index=path``) has no neurocube sidecar unless one lies
beside it; its volume checksums are then computed by one full pass per process
before the first read through it.

This module reads; the index files are kept elsewhere. Their names, their
sidecars (the file's identity, checked once per process and file version), a
stale or damaged index deleted with an ``IndexRebuildWarning``, an unwritable
cache folder and the shared index store are
:mod:`neurocube.sources.gzindex_store`; the GZIDX layout itself (thinning,
spans of seek points, compressed ranges) is :mod:`neurocube.sources.gzidx_format`.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import struct
import threading
from typing import Any

from neurocube import storage
from neurocube.errors import (
    CorruptDataError,
    NeurocubeError,
    TruncatedFileError,
)
from neurocube.sources import gzidx_format, gzindex_store
from neurocube.sources.gzindex_store import GzipIndexSpec
from neurocube.sources.volume_sums import VOLUME_SUM, VolumeHasher, Volumes, volume_checksum
from neurocube.storage import IO_STATS, HandlePool

__all__ = ["open_sequential", "read_range"]

INDEXED_READ_BLOCK = 32 << 20  # bytes per read call through an index (one call per chunk)
SEQUENTIAL_READ_BLOCK = 4 << 20  # bytes per read call of a forward pass (open_sequential)
STREAM_THREADS = max(1, os.cpu_count() or 1)  # a first pass decodes on all cores (rapidgzip)
DECODED_CHUNK = 6 << 20  # rapidgzip chunk size of a first pass, in decoded bytes (2 threads)
VERIFY_VOLUMES = True  # read by check_volumes; False only in benchmarks, to measure its cost


_STREAM_THREADS_IN_USE = 0
_STREAM_THREADS_LOCK = threading.Lock()


def _claim_stream_threads() -> int:
    """Inflate threads for a new stream: what is left of STREAM_THREADS, at least one.

    Each rapidgzip thread holds its own decoded chunks (~50 MB measured), so
    streams open at the same time (several sessions read for the first time in
    one compute) share one budget instead of each taking every core.
    """
    global _STREAM_THREADS_IN_USE
    with _STREAM_THREADS_LOCK:
        threads = max(1, STREAM_THREADS - _STREAM_THREADS_IN_USE)
        _STREAM_THREADS_IN_USE += threads
        return threads


def _release_stream_threads(threads: int) -> None:
    global _STREAM_THREADS_IN_USE
    with _STREAM_THREADS_LOCK:
        _STREAM_THREADS_IN_USE = max(0, _STREAM_THREADS_IN_USE - threads)


def stream_chunk_size(compressed: int, uncompressed: int, threads: int = 2) -> int:
    """Return a rapidgzip chunk size (in *compressed* bytes) for a first pass on ``threads``.

    rapidgzip's chunk size counts compressed bytes, and it holds about ``2 *
    threads + 1`` chunks decoded, so its memory grows with the compression ratio
    and the thread count: a session that compresses 30:1 (zeros outside the
    brain) held over 1 GB at the default 4 MiB. The chunk is sized from the
    file's own ratio to decode to about :data:`DECODED_CHUNK` at 2 threads
    (less per chunk with more threads, at least 2 MiB), between 64 KiB and
    2 MiB of compressed bytes. Smaller chunks cost CPU: on 3:1 data, 1 MiB
    chunks took ~20 % more CPU per byte than 4 MiB ones, 2 MiB ~5 % (measured).
    """
    if compressed <= 0 or uncompressed <= 0:
        return 256 << 10
    ratio = max(1.0, uncompressed / compressed)
    decoded = max(2 << 20, DECODED_CHUNK * 5 / (2 * max(1, threads) + 1))
    return int(min(2 << 20, max(64 << 10, decoded / ratio)))



def _source(spec: GzipIndexSpec, *, readahead: int | None = None) -> Any:
    """Return what the inflaters read: the local path, or a seekable reader over the object."""
    if not spec.remote:
        return spec.path
    return storage.BlockReader(
        spec.path, spec.storage_options, size=spec.size, version=spec.etag, readahead=readahead
    )


def _compressed_size(spec: GzipIndexSpec) -> int:
    return spec.size if spec.remote else storage.info(spec.path).size


# --- per-process handles -------------------------------------------------------------------

_INDEXED = HandlePool(maxsize=32)  # key: (path, index_path, thread id) -> indexed_gzip handle
_STREAMS = HandlePool(maxsize=8)  # key: (path, index_path) -> _Stream (shared, locked)


def _drop_readers(path: str, index_path: str) -> None:
    """Close the readers that loaded ``index_path`` for ``path`` (the index is being deleted)."""
    _INDEXED.discard_matching(lambda key: isinstance(key, tuple) and key[:2] == (path, index_path))


gzindex_store.on_discard(_drop_readers)

# File versions (see gzindex_store.version, index part "") a stream of this process read in
# full with a matching CRC32 and length.
_PASSED: set[tuple[str, str, int, int | str, int]] = set()
_PASSED_LOCK = threading.Lock()


def _indexed_gzip_file(spec: GzipIndexSpec, **kwargs: Any) -> Any:
    import indexed_gzip

    source = _source(spec)
    if isinstance(source, str):
        return indexed_gzip.IndexedGzipFile(source, **kwargs)
    return indexed_gzip.IndexedGzipFile(fileobj=source, **kwargs)


class _Stream:
    """The first pass over a ``.gz``: one sequential reader that records seek points as it goes.

    rapidgzip decodes ahead on :data:`STREAM_THREADS` threads (all cores) without an index and
    checks the gzip CRC32 and length when the stream reaches its end. Bytes that pass the
    stream's high-water mark for the first time also feed a :class:`VolumeHasher` (the
    per-volume checksums stored with the index). A forward seek past the high-water mark reads
    the gap, so the checksums always cover every byte.
    """

    def __init__(
        self,
        spec: GzipIndexSpec,
        *,
        uncompressed_size: int = 0,
        indexing: bool = True,
        volumes: tuple[int, int, int] | None = None,
    ) -> None:
        self.spec = spec
        self.path = path = spec.path
        self.data_end = uncompressed_size
        self.kind: str
        self.handle: Any
        try:
            import rapidgzip

            self.threads = _claim_stream_threads()
            self.handle = rapidgzip.RapidgzipFile(
                _source(spec),
                parallelization=self.threads,
                chunk_size=stream_chunk_size(
                    _compressed_size(spec), uncompressed_size, self.threads
                ),
            )
            self.kind = "rapidgzip"
        except ImportError:
            self.threads = 0
            self.handle = _indexed_gzip_file(spec, spacing=gzindex_store.SPACING)
            self.kind = "indexed_gzip"
        self.exported = False
        self.closed = False
        self.verified = False  # the whole stream was read and its CRC32 and length matched
        self.failure: NeurocubeError | None = None  # rapidgzip found damage: never deliver
        self.hasher = None if volumes is None else VolumeHasher(*volumes)
        self._high_water = 0
        self._bars = contextlib.ExitStack()
        from neurocube.progress import progress_bar

        label = f"{'indexing' if indexing else 'reading'} {storage.basename(path)}"
        self.bar = self._bars.enter_context(progress_bar(uncompressed_size or None, label))

    def use_indexed_gzip(self) -> None:
        """Switch to indexed_gzip (after rapidgzip failed on a damaged file), to locate the damage.

        rapidgzip gives up on a truncated or corrupt stream as a whole, where
        indexed_gzip inflates up to the damage, so the error can name the first
        volume that cannot be read. indexed_gzip checks no CRC: the stream is
        marked failed and delivers nothing after this.
        """
        self.handle.close()
        self.handle = _indexed_gzip_file(self.spec, spacing=gzindex_store.SPACING)
        self.kind = "indexed_gzip"
        self.hasher = None
        _release_stream_threads(self.threads)
        self.threads = 0

    def locate_damage(self) -> None:
        """Read on (indexed_gzip, small reads) to the first byte that cannot be inflated; raise.

        indexed_gzip ends early on a truncated stream without an error and
        inflates some damage without noticing: the first is reported where
        the data ends short of the header's size, the second with rapidgzip's
        error.
        """
        scratch = memoryview(bytearray(4096))
        while self.readinto(scratch):
            pass
        at = int(self.handle.tell())
        if at < self.data_end:
            err = TruncatedFileError(
                f"{self.path}: the gzip stream ends at uncompressed byte {at}, but the header "
                f"promises {self.data_end} bytes. The file is truncated or corrupt: "
                "re-download or re-write it."
            )
            err.offset = at  # type: ignore[attr-defined]
            raise err
        assert self.failure is not None
        raise self.failure

    def untouched(self) -> bool:
        """Return True while nothing has been read through this stream (no seek points yet)."""
        return self._high_water == 0 and not self.exported

    def seek(self, offset: int) -> None:
        if offset > self._high_water:  # rapidgzip checks the length only of what it read
            self._seek(self._high_water)
            scratch = bytearray(min(offset - self._high_water, SEQUENTIAL_READ_BLOCK))
            while self._high_water < offset:  # read the gap: every byte gets its checksum
                want = min(len(scratch), offset - self._high_water)
                if not self.readinto(memoryview(scratch)[:want]):
                    break
        self._seek(offset)

    def _seek(self, offset: int) -> None:
        try:
            self.handle.seek(offset)
        except Exception as exc:  # rapidgzip inflates (and checks) while it seeks
            raise _gzip_error(self.path, exc, offset) from exc

    def readinto(self, view: memoryview) -> int:
        before = int(self.handle.tell())
        try:
            n = int(self.handle.readinto(view))
        except Exception as exc:  # rapidgzip raises ValueError/RuntimeError on damaged data
            raise _gzip_error(self.path, exc, before) from exc
        position = before + n
        if position > self._high_water:  # inflated for the first time: count it once
            if self.hasher is not None:
                fresh = position - max(before, self._high_water)
                self.hasher.feed(position - fresh, view[n - fresh : n])
            self.bar.update(position - self._high_water)
            self._high_water = position
        return n

    def at_eof(self) -> bool:
        """Read the rest of the stream (checking the CRC32 and length); True when verified.

        Raises :class:`CorruptDataError` or :class:`TruncatedFileError` (naming
        the file) when the stream does not end as its trailer says.
        """
        scratch = memoryview(bytearray(SEQUENTIAL_READ_BLOCK))
        self._seek(max(self._high_water, int(self.handle.tell())))
        while self.readinto(scratch):
            pass
        if self.failure is not None:  # indexed_gzip read on past the damage rapidgzip found
            raise self.failure
        if self.kind == "rapidgzip":
            _check_trailer(self.spec, int(self.handle.tell()))
            self.verified = True
        return self.verified

    def export(self, index_path: str) -> None:
        if self.kind == "rapidgzip":
            import rapidgzip

            self.handle.export_index(index_path, index_format=rapidgzip.IndexFormat.INDEXED_GZIP)
        else:
            self.handle.export_index(index_path)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._bars.close()
        self.handle.close()
        _release_stream_threads(self.threads)


def _check_trailer(spec: GzipIndexSpec, total: int) -> None:
    """Check that the file ends with a gzip trailer for ``total`` inflated bytes.

    rapidgzip checks the CRC32 and length of every trailer it meets, but a
    stream cut inside its last (empty) block ends without one and without an
    error (measured with rapidgzip 0.16). The trailer's ISIZE must be the
    length mod 2**32; if it is not (a file of several gzip members, whose
    last trailer counts its own member only), zlib inflates the file once to
    decide.
    """
    import zlib

    size = _compressed_size(spec)
    if size < 8:
        raise TruncatedFileError(f"{spec.path}: {size} bytes cannot hold a gzip stream.")
    if spec.remote:
        tail = storage.read_range(spec.path, size - 8, size, spec.storage_options)
    else:
        with storage.open_file(spec.path) as fh:
            fh.seek(size - 8)
            tail = fh.read(8)
    if struct.unpack("<I", tail[4:8])[0] == total & 0xFFFFFFFF:
        return
    inflater = zlib.decompressobj(31)
    done = 0
    ended = False  # the last member seen so far reached its trailer
    try:
        source = _source(spec)
        fh = storage.open_file(source) if isinstance(source, str) else source
        with contextlib.closing(fh):
            while block := fh.read(1 << 20):
                while block:
                    done += len(inflater.decompress(block))
                    if not inflater.eof:
                        break
                    ended, block = True, inflater.unused_data
                    if not block.strip(b"\0"):  # trailing zero padding
                        break
                    inflater, ended = zlib.decompressobj(31), False  # the next member
    except zlib.error as exc:
        raise _gzip_error(spec.path, exc, done) from exc
    if not ended or done != total:
        raise TruncatedFileError(
            f"{spec.path}: the gzip stream ends without its trailer (CRC32 and length) after "
            f"{done} inflated bytes: the file is truncated, and none of its values are "
            "returned. Re-download or re-write it."
        )


def _gzip_error(path: str, exc: BaseException, at: int) -> NeurocubeError:
    """Translate an inflater's error on ``path`` into a neurocube error naming the file."""
    if isinstance(exc, NeurocubeError):
        return exc
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "Mismatching CRC32" in text or "Mismatching size" in text:
        what = "CRC32" if "CRC32" in text else "length (ISIZE)"
        return CorruptDataError(
            f"{path}: the gzip {what} of the decompressed data does not match the one stored "
            f"at the end of the file ({text}): the file is corrupt and no value of it is "
            "returned. Re-download or re-write it."
        )
    err = TruncatedFileError(
        f"{path}: the gzip stream is corrupt or truncated before uncompressed byte {at} "
        f"({type(exc).__name__}: {text}). Re-download or re-write the file."
    )
    err.offset = at  # type: ignore[attr-defined]
    return err


def _open_indexed(spec: GzipIndexSpec, index_path: str) -> Any:
    """Open a random-access reader of ``path`` through its GZIDX index (one per thread).

    indexed_gzip holds ~10-20 MB per handle; rapidgzip reads faster per call
    but its decoded-chunk cache grew to ~95 MB per handle under random seeks
    (measured), which two threads cannot afford under the memory bound.
    indexed_gzip restarts inflation from a seek point on every read call
    (~4 ms at 4 MiB spacing), so callers read a whole chunk per call
    (:data:`INDEXED_READ_BLOCK`).
    """
    import indexed_gzip

    IO_STATS.add_open()
    if spec.remote:  # only the compressed bytes around each read travel (see _prefetch)
        reader = _source(spec, readahead=0)
        return indexed_gzip.IndexedGzipFile(
            fileobj=reader, index_file=index_path, buffer_size=4 << 20
        )
    return indexed_gzip.IndexedGzipFile(spec.path, index_file=index_path, buffer_size=4 << 20)


def has_index(spec: GzipIndexSpec | None) -> bool:
    """Return True if reads of this file will seek through a stored index."""
    return spec is not None and spec.index_path is not None and os.path.exists(spec.index_path)


def _readinto_exact(handle: Any, view: memoryview, start: int, path: str) -> None:
    got = 0
    total = len(view)
    try:
        handle.seek(start)
    except NeurocubeError:
        raise
    except (OSError, EOFError, ValueError, RuntimeError) as exc:  # seeking inflates too
        raise _gzip_error(path, exc, start) from exc
    while got < total:
        try:
            n = handle.readinto(view[got:])
        except NeurocubeError:
            raise
        except (OSError, EOFError, ValueError, RuntimeError) as exc:
            err = TruncatedFileError(
                f"{path}: the gzip stream is corrupt or truncated before uncompressed byte "
                f"{start + got} ({exc}). Re-download or re-write the file."
            )
            err.offset = start + got  # type: ignore[attr-defined]
            raise err from exc
        if not n:
            err = TruncatedFileError(
                f"{path}: the gzip stream ends at uncompressed byte {start + got}, but "
                f"{start + total} bytes were expected. The file is truncated: re-download it."
            )
            err.offset = start + got  # type: ignore[attr-defined]
            raise err
        got += n


class SequentialReadError(Exception):
    """A forward pass (:class:`SequentialReader`) could not deliver the bytes asked for.

    Not a user-facing error: callers re-read the same bytes through
    :func:`read_range`, which names the damage (:class:`TruncatedFileError`).
    """


class SequentialReader:
    """A private reader for one forward pass over ``[start, ...)`` of an indexed ``.gz``.

    rapidgzip (one inflate thread, the stored index imported) inflates faster
    per core than indexed_gzip, and reading on from where it stopped costs
    nothing, where every indexed_gzip read call restarts at a seek point. Its
    decoded-chunk cache stays small (~16 MB measured) while the reader only
    moves forward from one seek; a second far seek on the same handle kept ~70
    MB more, so a reader serves one pass and is then closed (no pooling).
    Read calls of :data:`SEQUENTIAL_READ_BLOCK` keep what was just inflated in
    the CPU cache for the caller.
    """

    def __init__(
        self,
        handle: Any,
        path: str,
        start: int,
        source: Any = None,
        spec: GzipIndexSpec | None = None,
        volumes: Volumes | None = None,
    ) -> None:
        self._handle = handle
        self._path = path
        self._position = start
        self._source = source  # the BlockReader of a remote file (None locally)
        self._spec = spec
        self._volumes = volumes
        self.end: int | None = None  # opened with a span's seek points only: read no further

    def limit_to(self, end: int) -> None:
        """Let a remote file's read-ahead go no further than uncompressed byte ``end`` needs."""
        if self._source is None or self._spec is None or self._spec.index_path is None:
            return
        try:
            _, hi = gzidx_format.compressed_range(self._spec.index_path, end, end, self._spec.size)
        except (OSError, NeurocubeError):
            return
        self._source.ahead_limit = hi

    def readinto(self, view: memoryview) -> None:
        """Fill ``view`` with the next ``len(view)`` bytes (else :class:`SequentialReadError`)."""
        got = 0
        total = len(view)
        if self.end is not None and self._position + total > self.end:
            raise SequentialReadError(
                f"{self._path}: this reader holds the seek points up to byte {self.end} only"
            )
        try:
            while got < total:
                n = int(self._handle.readinto(view[got:]))
                if not n:
                    break
                got += n
        except Exception as exc:  # rapidgzip raises several types on damaged data
            raise SequentialReadError(f"{self._path}: {exc}") from exc
        if got < total:
            raise SequentialReadError(
                f"{self._path}: the stream ended at uncompressed byte {self._position + got}"
            )
        if self._volumes is not None and self._spec is not None:
            check_volumes(self._spec, self._volumes, self._position, view)
        self._position += total
        IO_STATS.add_bytes(total)

    def close(self) -> None:
        """Close the handle (frees its decoded chunks)."""
        with contextlib.suppress(Exception):
            self._handle.close()

    def __enter__(self) -> SequentialReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_sequential(
    spec: GzipIndexSpec, start: int, volumes: Volumes | None = None, end: int | None = None
) -> SequentialReader | None:
    """Open a :class:`SequentialReader` of ``spec.path`` at uncompressed byte ``start``.

    With ``end`` (the pass reads no further than uncompressed byte ``end``), the
    reader is given only the seek points that span ``[start, end)``
    (:func:`~neurocube.sources.gzidx_format.span_index`): importing the whole
    index costs ~20-25 ms of CPU for a 750 MB file (rapidgzip takes every
    32 KiB window in), a span's points ~3-5 ms, for the same bytes (measured).
    Such a reader refuses to read past ``end`` (:class:`SequentialReadError`).

    Returns None when the file has no usable index (see
    :func:`~neurocube.sources.gzindex_store.index_usable`), rapidgzip is not
    installed, or it cannot load the index: the caller then reads through
    :func:`read_range`.
    """
    if not gzindex_store.index_usable(spec):
        return None
    assert spec.index_path is not None
    try:
        import rapidgzip
    except ImportError:
        return None
    handle = None
    source = _source(spec)
    try:
        handle = rapidgzip.RapidgzipFile(source, parallelization=1)
        span = None if end is None else gzidx_format.span_index(spec.index_path, start, end)
        handle.import_index(spec.index_path if span is None else io.BytesIO(span))
        handle.seek(start)
    except Exception:  # an index rapidgzip cannot load: indexed_gzip reads (or reports) it
        if handle is not None:
            with contextlib.suppress(Exception):
                handle.close()
        return None
    IO_STATS.add_open()
    remote = None if isinstance(source, str) else source
    reader = SequentialReader(handle, spec.path, start, remote, spec, volumes)
    reader.end = None if span is None else end
    if end is not None:
        reader.limit_to(end)  # a remote span moves its own compressed bytes, not more
    return reader


def _prefetch(spec: GzipIndexSpec, index_path: str, start: int, end: int) -> None:
    """Fetch the compressed bytes an indexed read of ``[start, end)`` needs, concurrently."""
    try:
        lo, hi = gzidx_format.compressed_range(index_path, start, end, spec.size)
    except (OSError, NeurocubeError):
        return  # the inflater reports an unusable index itself
    reader = _source(spec, readahead=0)
    reader.prefetch(lo, hi)


def read_range(
    spec: GzipIndexSpec,
    start: int,
    view: memoryview,
    *,
    data_end: int,
    volumes: Volumes | None = None,
    verify: bool = True,
) -> None:
    """Fill ``view`` with the uncompressed bytes ``[start, start + len(view))`` of ``spec.path``.

    With a usable index this seeks directly (one handle per thread, parallel)
    and checks each volume read against the checksums its first pass recorded
    (``volumes`` gives their layout; the view must then hold whole volumes).
    Without one it reads through the shared per-process stream (rapidgzip on
    all cores), which records seek points and volume checksums; once the
    stream has passed ``data_end`` the index is stored. A cached index is
    checked against the file (the hash of its ends, in its sidecar) the first
    time this process uses it for this version of the file; a stale one is
    deleted with a warning and this read streams.

    Values are never returned unverified: a read through the stream that
    stops short of the end goes on to the end of the stream (checking its
    CRC32 and length, and storing the index) before it returns, unless
    ``verify`` is False, which only a caller that verifies the pass itself
    may pass (the ordered Dask graph of a first read, see :func:`ensure_verified`).

    Raises
    ------
    CorruptDataError
        A volume's checksum or the stream's CRC32 / length does not match.
    TruncatedFileError
        The stream cannot be inflated up to the bytes asked for (or to its end).
    """
    index_path = spec.index_path
    if index_path is not None and spec.store and not spec.explicit:
        gzindex_store.fetch_from_store(spec, index_path)
    if (
        index_path is not None
        and os.path.exists(index_path)
        and gzindex_store.cached_index_usable(spec, index_path)  # once per file version
    ):
        try:
            handle, lock = _INDEXED.acquire(
                (spec.path, index_path, threading.get_ident()),
                lambda: _open_indexed(spec, index_path),
            )
        except OSError as exc:  # indexed_gzip's ZranError: the index cannot be loaded
            gzindex_store.unusable_index(spec, index_path, exc)  # raises, or deletes it
            return read_range(spec, start, view, data_end=data_end, volumes=volumes,
                              verify=verify)  # streams and rebuilds it
        if spec.remote:
            _prefetch(spec, index_path, start, start + len(view))
        with lock:
            _readinto_exact(handle, view, start, spec.path)
        IO_STATS.add_bytes(len(view))
        if volumes is not None:
            check_volumes(spec, volumes, start, view)
        return

    stream_key = (spec.path, index_path)

    def _open_stream() -> _Stream:
        IO_STATS.add_open()
        return _Stream(spec, uncompressed_size=data_end, indexing=index_path is not None,
                       volumes=volumes if index_path is not None else None)

    stream, lock = _STREAMS.acquire(stream_key, _open_stream)
    with lock:
        if stream.closed:  # another thread finished the index and retired this stream
            return read_range(spec, start, view, data_end=data_end, volumes=volumes,
                              verify=verify)
        late = (
            index_path is not None
            and stream.untouched()
            and os.path.exists(index_path)
        )
    if late:  # this read chose to stream just before another stored the index: use the index
        _STREAMS.discard(stream_key)
        return read_range(spec, start, view, data_end=data_end, volumes=volumes, verify=verify)
    failed = False
    try:
        with lock:
            if stream.closed:
                return read_range(spec, start, view, data_end=data_end, volumes=volumes,
                                  verify=verify)
            _read_stream(stream, view, start)
            IO_STATS.add_bytes(len(view))
            if verify or start + len(view) >= data_end:
                _finish_stream(stream, spec)
    except NeurocubeError:
        failed = True  # a damaged file: the next read starts afresh (and fails the same way)
        raise
    finally:
        if failed:
            _STREAMS.discard(stream_key)
    if stream.closed or stream.verified:
        # Later reads go through the index, in parallel; a stream kept open would also keep
        # its inflate threads out of the budget of the next file's first read.
        _STREAMS.discard(stream_key)


def _read_stream(stream: _Stream, view: memoryview, start: int) -> None:
    """Read ``view`` at ``start`` through the first-pass stream (the caller holds its lock).

    If rapidgzip finds damage, indexed_gzip re-reads the same bytes to name
    the first one that cannot be inflated; if it inflates them anyway (it
    checks no CRC), rapidgzip's error stands: nothing is delivered.
    """
    if stream.failure is not None:
        raise stream.failure
    try:
        _readinto_exact(stream, view, start, stream.path)
    except TruncatedFileError as exc:
        if stream.kind != "rapidgzip":
            raise
        stream.failure = exc
        stream.use_indexed_gzip()
        _readinto_exact(stream, view, start, stream.path)  # raises if the damage is in view
        stream.locate_damage()  # raises at the first byte it cannot inflate
        raise


def _finish_stream(stream: _Stream, spec: GzipIndexSpec) -> None:
    """Read ``stream`` to its end (checking CRC32 and length) and store the index, once."""
    if stream.verified or stream.closed:
        return
    stream.at_eof()
    with _PASSED_LOCK:
        _PASSED.add(gzindex_store.version_of(spec, ""))
    if spec.index_path is not None and not spec.explicit and not stream.exported:
        gzindex_store.store_index(spec, stream.export, stream.hasher)
        stream.exported = True


def ensure_verified(spec: GzipIndexSpec, *, data_end: int, volumes: Volumes | None) -> None:
    """Make sure a full pass over ``spec.path`` checked its CRC32 (in this process or stored).

    The ordered Dask graph of a first read reads its chunks with
    ``verify=False`` and runs this after the last one: normally that pass has
    just passed the end here (nothing to do); if the chunks were read in
    another process, a stored index from a verified pass, or a pass of its
    own now, vouches for the file.
    """
    with _PASSED_LOCK:
        if gzindex_store.version_of(spec, "") in _PASSED:
            return
    if spec.index_path is not None and not spec.explicit and gzindex_store.index_usable(spec):
        return  # stored only by a pass that reached the end with a matching CRC32
    run_pass(spec, data_end=data_end, volumes=volumes)


def run_pass(spec: GzipIndexSpec, *, data_end: int, volumes: Volumes | None) -> None:
    """Read ``spec.path`` once in full through a first-pass stream: check it, store its index."""
    stream_key = (spec.path, spec.index_path)
    stream, lock = _STREAMS.acquire(
        stream_key,
        lambda: _Stream(spec, uncompressed_size=data_end, indexing=spec.index_path is not None,
                        volumes=volumes if spec.index_path is not None else None),
    )
    try:
        with lock:
            retired = stream.closed  # another thread finished this pass meanwhile
            if not retired:
                _finish_stream(stream, spec)
    finally:
        _STREAMS.discard(stream_key)
    if retired:
        ensure_verified(spec, data_end=data_end, volumes=volumes)


def _volume_sums(spec: GzipIndexSpec, volumes: Volumes) -> Any:
    """Return the recorded checksums of ``volumes`` of the file behind ``spec``'s index.

    A cached index carries them in its sidecar (loaded when the index is
    checked). An index the caller named, or one recorded for another layout,
    has none: a full pass over the file (CRC32 checked) computes them once per
    process.
    """
    assert spec.index_path is not None
    known = gzindex_store.recorded_sums(spec, volumes)
    if known is not None:
        return known
    import numpy as np

    plain = GzipIndexSpec(spec.path, None, storage_options=spec.storage_options,
                          size=spec.size, etag=spec.etag)
    stream = _Stream(plain, uncompressed_size=volumes[0] + volumes[1] * volumes[2],
                     indexing=False, volumes=volumes)
    try:
        stream.at_eof()
        assert stream.hasher is not None and stream.hasher.complete
        sums = np.asarray(stream.hasher.sums, dtype=np.uint32)
    finally:
        stream.close()
    gzindex_store.remember_sums(spec.index_path, volumes, sums)
    return sums


def check_volumes(spec: GzipIndexSpec, volumes: Volumes, start: int, data: Any) -> None:
    """Check the whole volumes in ``data`` (uncompressed bytes at ``start``) against the index.

    Raises :class:`CorruptDataError` naming the file and the first volume
    whose bytes do not match the checksum recorded by the first full pass.
    """
    offset, size, count = volumes
    if size <= 0 or len(data) == 0 or not VERIFY_VOLUMES:
        return
    first, rem = divmod(start - offset, size)
    if first < 0 or rem or len(data) % size:
        raise ValueError(f"{spec.path}: volume checks need whole volumes (read at {start})")
    sums = _volume_sums(spec, volumes)
    raw = memoryview(data).cast("B")
    for k in range(len(raw) // size):
        got = volume_checksum(raw[k * size : (k + 1) * size])
        want = int(sums[first + k])
        if got != want:
            raise CorruptDataError(
                f"{spec.path}: volume {first + k} (0-based) of {count} does not match the "
                f"checksum recorded when the file was first read in full ({VOLUME_SUM} "
                f"{got:#010x}, expected {want:#010x}, index {spec.index_path}): the file was "
                "damaged since, and none of its values are returned. Re-download or re-write "
                "the file (if you know it is good, delete the index to rebuild it)."
            )


@atexit.register
def reset_handles() -> None:
    """Close every cached gzip handle of this process (tests, or after files changed)."""
    _INDEXED.clear()
    _STREAMS.clear()
    gzindex_store.reset()
    gzidx_format.forget_index()
    with _PASSED_LOCK:
        _PASSED.clear()

