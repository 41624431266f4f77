"""What gzidx_format keeps in memory of an index file is dropped when the file is reset or replaced.

:func:`gzidx_format.span_index` keeps the bytes of the last few index files it read, keyed by
their stat. An index rewritten within the file system's timestamp granularity with the same
size has the same size and mtime; it must still be read again, not served from memory.
"""

from __future__ import annotations

import os
import shutil
import struct

import pytest

from neurocube.sources import gzidx_format, gzindex, gzindex_store
from neurocube.sources.gzindex_store import GzipIndexSpec, IndexRebuildWarning

WINDOW = 64
_HEADER = struct.Struct("<5sBBQQIII")
_POINT = struct.Struct("<QQBB")


def _gzidx(fill: bytes, n: int = 2) -> bytes:
    """A GZIDX (v1) index of ``n`` points, each with a window of ``fill`` bytes."""
    points = [(10 + 100 * i, 1000 * i, 0, 1) for i in range(n)]
    parts = [_HEADER.pack(gzidx_format.MAGIC, 1, 0, 100 * n, 1000 * n, 1000, WINDOW, n)]
    parts += [_POINT.pack(*p) for p in points]
    parts += [fill * WINDOW for _ in points]
    return b"".join(parts)


def _fresh_span(tmp_path, content: bytes) -> bytes | None:
    """The span a first read of ``content`` gives (an oracle: a path never read before)."""
    other = tmp_path / "oracle" / f"{content[-1]:02x}.gzidx"
    other.parent.mkdir(exist_ok=True)
    other.write_bytes(content)
    return gzidx_format.span_index(str(other), 0, 1500)


@pytest.fixture(autouse=True)
def _fresh_handles():
    gzindex.reset_handles()
    yield
    gzindex.reset_handles()


@pytest.fixture
def index(tmp_path):
    path = tmp_path / "cache" / "sess.nii.gz.gzidx"
    path.parent.mkdir()
    path.write_bytes(_gzidx(b"A"))
    first = gzidx_format.span_index(str(path), 0, 1500)
    assert first == _fresh_span(tmp_path, _gzidx(b"A"))
    assert str(path) in gzidx_format._INDEX_BYTES  # the bytes are now kept in memory
    return path


def _same_stat_rewrite(path, content: bytes, stat: os.stat_result) -> None:
    """Rewrite ``path`` in place, as a write within the mtime granularity leaves it."""
    assert len(content) == stat.st_size
    with open(path, "r+b") as fh:
        fh.write(content)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_an_index_rewritten_in_place_is_read_again_after_reset_handles(index, tmp_path):
    stat = index.stat()
    _same_stat_rewrite(index, _gzidx(b"B"), stat)
    gzindex.reset_handles()
    assert str(index) not in gzidx_format._INDEX_BYTES
    assert gzidx_format.span_index(str(index), 0, 1500) == _fresh_span(tmp_path, _gzidx(b"B"))


def test_a_discarded_index_is_forgotten_and_its_successor_read(index, tmp_path):
    gz = tmp_path / "sess.nii.gz"
    gz.write_bytes(b"\x1f\x8b" + bytes(100))
    spec = GzipIndexSpec(path=str(gz), index_path=str(index))
    stat = index.stat()
    with pytest.warns(IndexRebuildWarning, match="deleted"):
        gzindex_store.unusable_index(spec, str(index), ValueError("damaged on purpose"))
    assert not index.exists()
    assert str(index) not in gzidx_format._INDEX_BYTES
    # a new index in its place, with the old one's size and mtime
    index.write_bytes(_gzidx(b"B"))
    os.utime(index, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert gzidx_format.span_index(str(index), 0, 1500) == _fresh_span(tmp_path, _gzidx(b"B"))


def test_an_index_replaced_by_store_index_is_read_again(index, tmp_path):
    gz = tmp_path / "sess.nii.gz"
    gz.write_bytes(b"\x1f\x8b" + bytes(100))
    spec = GzipIndexSpec(path=str(gz), index_path=str(index))
    stat = index.stat()

    def export(dense: str) -> None:  # a first pass's points, as gzindex's handle writes them
        with open(dense, "wb") as fh:
            fh.write(_gzidx(b"B"))

    gzindex_store.store_index(spec, export, None)
    assert str(index) not in gzidx_format._INDEX_BYTES
    # stored within the same mtime tick and with the same size (two points, none thinned)
    os.utime(index, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert index.stat().st_size == stat.st_size
    copy = tmp_path / "copy.gzidx"
    shutil.copyfile(index, copy)
    expected = gzidx_format.span_index(str(copy), 0, 1500)
    assert expected is not None and expected.endswith(2 * WINDOW * b"B")  # thinned: new spacing
    assert gzidx_format.span_index(str(index), 0, 1500) == expected
