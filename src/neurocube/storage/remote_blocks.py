"""Shared blocks of remote objects, read through :class:`BlockReader`.

Blocks live in one per-process LRU (:data:`SHARED_BLOCKS`), shared by every reader of
an object version, and are fetched as concurrent range requests by one pool of threads.
"""

from __future__ import annotations

import collections
import io
import threading
from collections.abc import Hashable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from neurocube.errors import DataChangedError
from neurocube.storage.counters import IO_STATS
from neurocube.storage.options import as_options
from neurocube.storage.reading import read_range

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
