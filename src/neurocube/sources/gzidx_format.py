"""The GZIDX seek-index file: reading its points, cutting and thinning it.

neurocube stores its gzip indexes in indexed_gzip's ``GZIDX`` layout (version
1), which both inflaters read (rapidgzip imports it too). The file is a fixed
header (magic, version, flags, compressed and uncompressed sizes, spacing,
window size, number of points), then one record per seek point (compressed
offset, uncompressed offset, bit offset, whether a window follows), then the
32 KiB windows of the points that have one, in point order.

This module reads and writes that layout and nothing else; it never opens
the ``.gz`` file itself, and knows nothing of sidecars, caches or stores:

- :func:`thin_index` copies an index keeping points a given distance apart
  (a first pass records far more than reads need);
- :func:`span_index` cuts out the points a forward pass over a byte range
  needs, so a reader imports a few windows instead of all of them;
- :func:`compressed_range` says which compressed bytes a read of an
  uncompressed range touches (what a remote read fetches), from the points
  kept in memory per index.

Both keep what they read of an index file in memory (its bytes, its seek
points); :func:`forget_index` drops that when an index is deleted or replaced,
and when handles are reset.
"""

from __future__ import annotations

import os
import struct
import threading
from typing import NamedTuple

from neurocube.errors import IndexMismatchError

__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "POINT_SIZE",
    "IndexHeader",
    "compressed_range",
    "forget_index",
    "read_header",
    "span_index",
    "thin_index",
]

MAGIC = b"GZIDX"
_HEADER = struct.Struct("<5sBBQQIII")  # magic, version, flags, csize, usize, spacing, window, n
_POINT = struct.Struct("<QQBB")  # compressed offset, uncompressed offset, bits, has-window
HEADER_SIZE = _HEADER.size
POINT_SIZE = _POINT.size


class IndexHeader(NamedTuple):
    """The fixed header of a GZIDX (version 1) index file."""

    magic: bytes
    version: int
    flags: int
    compressed_size: int  #: size of the ``.gz`` file the index was built on
    uncompressed_size: int
    spacing: int
    window_size: int
    n_points: int


def read_header(head: bytes, index_path: str | os.PathLike[str]) -> IndexHeader:
    """Parse the header at the start of ``head`` (the first :data:`HEADER_SIZE` bytes or more).

    Raises
    ------
    IndexMismatchError
        If ``head`` is shorter than a header, does not start with the ``GZIDX``
        magic, or is not version 1: it names the file, what was found and what
        to do.
    """
    if len(head) < HEADER_SIZE or not head.startswith(MAGIC):
        raise IndexMismatchError(
            f"{index_path}: not a gzip seek index (expected the {HEADER_SIZE}-byte 'GZIDX' "
            f"header of indexed_gzip, found {head[:8]!r} in {len(head)} bytes). Delete it or "
            "pass index='auto'."
        )
    header = IndexHeader(*_HEADER.unpack_from(head))
    if header.version != 1:
        raise IndexMismatchError(
            f"{index_path}: a GZIDX index of version {header.version}; neurocube reads version "
            "1 (indexed_gzip's). The header is damaged or the index was written by another "
            "tool: delete it or pass index='auto' to rebuild it."
        )
    return header


# index path -> ((size, mtime, ctime, inode), bytes). The stat is a second guard besides
# forget_index: an index replaced by another process gets a new inode and ctime.
_INDEX_BYTES: dict[str, tuple[tuple[int, int, int, int], bytes]] = {}
_INDEX_BYTES_LOCK = threading.Lock()


def span_index(index_path: str, start: int, end: int) -> bytes | None:
    """Return a GZIDX index holding the seek points a pass over ``[start, end)`` needs.

    The stream's first point, the last point at or before ``start`` and every
    point up to the first at or after ``end``, with their windows, copied from
    the stored index (which the caller has checked). None if the
    index cannot be parsed (the caller then imports the whole file).
    """
    import bisect

    stat = os.stat(index_path)
    version = (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    with _INDEX_BYTES_LOCK:
        cached = _INDEX_BYTES.get(index_path)
    if cached is None or cached[0] != version:
        with open(index_path, "rb") as fh:
            cached = (version, fh.read())
        with _INDEX_BYTES_LOCK:
            _INDEX_BYTES[index_path] = cached
            while len(_INDEX_BYTES) > 4:  # a few MB each
                _INDEX_BYTES.pop(next(iter(_INDEX_BYTES)))
    raw = cached[1]
    if len(raw) < _HEADER.size or not raw.startswith(MAGIC):
        return None
    magic, version_byte, flags, csize, usize, spacing, window, n = _HEADER.unpack_from(raw)
    table = _HEADER.size
    if n == 0 or len(raw) < table + n * _POINT.size:
        return None
    points = [_POINT.unpack_from(raw, table + i * _POINT.size) for i in range(n)]
    windows: list[int] = []
    pos = table + n * _POINT.size
    for point in points:
        windows.append(pos)
        pos += window if point[3] else 0
    if len(raw) < pos:
        return None
    uoffs = [p[1] for p in points]
    first = max(0, bisect.bisect_right(uoffs, start) - 1)
    last = min(n - 1, bisect.bisect_left(uoffs, end))
    keep = sorted({0, *range(first, last + 1)})
    parts = [_HEADER.pack(magic, version_byte, flags, csize, usize, spacing, window, len(keep))]
    parts += [_POINT.pack(*points[k]) for k in keep]
    parts += [raw[windows[k] : windows[k] + window] for k in keep if points[k][3]]
    return b"".join(parts)


def thin_index(src: str | os.PathLike[str], dst: str | os.PathLike[str], spacing: int) -> int:
    """Copy a GZIDX (v1) index keeping seek points at least ``spacing`` uncompressed bytes apart.

    rapidgzip records a point per compressed chunk; every indexed_gzip handle
    loads all windows (32 KiB each) into memory, so a dense index would cost
    hundreds of MB per handle on a large session. The first and the last
    points are always kept. Returns the number of points kept.
    """
    with open(src, "rb") as fh:
        head = fh.read(_HEADER.size)
        magic, version, flags, csize, usize, old_spacing, window, n = read_header(head, src)
        points = [_POINT.unpack(fh.read(_POINT.size)) for _ in range(n)]
        keep: list[int] = []
        last = None
        for idx, (_, uoff, _, _) in enumerate(points):
            if last is None or uoff - last >= spacing or idx == n - 1:
                keep.append(idx)
                last = uoff
        window_at: dict[int, int] = {}
        pos = fh.tell()
        for idx, point in enumerate(points):
            if point[3]:
                window_at[idx] = pos
                pos += window
        with open(dst, "wb") as out:
            out.write(_HEADER.pack(magic, version, flags, csize, usize,
                                   max(old_spacing, spacing), window, len(keep)))
            for idx in keep:
                out.write(_POINT.pack(*points[idx]))
            for idx in keep:
                if points[idx][3]:
                    fh.seek(window_at[idx])
                    out.write(fh.read(window))
    return len(keep)


_POINTS: dict[str, tuple[list[int], list[int]]] = {}  # index path -> (uncompressed, compressed)
_POINTS_LOCK = threading.Lock()


def _seek_points(index_path: str) -> tuple[list[int], list[int]]:
    """Return the seek points of a GZIDX index: sorted uncompressed and compressed offsets."""
    with _POINTS_LOCK:
        cached = _POINTS.get(index_path)
    if cached is not None:
        return cached
    with open(index_path, "rb") as fh:
        n = read_header(fh.read(_HEADER.size), index_path).n_points
        raw = fh.read(n * _POINT.size)
    if len(raw) < n * _POINT.size:
        raise IndexMismatchError(f"{index_path}: the index is truncated ({n} points announced)")
    points = [_POINT.unpack_from(raw, i * _POINT.size) for i in range(n)]
    result = ([p[1] for p in points], [p[0] for p in points])
    with _POINTS_LOCK:
        _POINTS[index_path] = result
    return result


def compressed_range(index_path: str, start: int, end: int, size: int) -> tuple[int, int]:
    """Return the compressed bytes ``[lo, hi)`` that inflate uncompressed ``[start, end)``.

    From the last seek point at or before ``start`` (one byte earlier: a point
    may start inside a byte) to the first point at or after ``end`` (or the
    end of the file), plus a small margin for the inflater's look-ahead.
    """
    import bisect

    uoffs, coffs = _seek_points(index_path)
    i = bisect.bisect_right(uoffs, start) - 1
    lo = max(0, coffs[i] - 1) if i >= 0 else 0
    j = bisect.bisect_left(uoffs, end)
    hi = min(size, coffs[j] + (64 << 10)) if j < len(uoffs) else size
    return lo, max(lo, hi)


def forget_index(index_path: str | None = None) -> None:
    """Drop what is kept in memory of ``index_path`` (every index if None): bytes, seek points.

    Called when the index file is deleted, replaced or rewritten: the next
    :func:`span_index` or :func:`compressed_range` reads the file again.
    """
    with _POINTS_LOCK:
        if index_path is None:
            _POINTS.clear()
        else:
            _POINTS.pop(index_path, None)
    with _INDEX_BYTES_LOCK:
        if index_path is None:
            _INDEX_BYTES.clear()
        else:
            _INDEX_BYTES.pop(index_path, None)
