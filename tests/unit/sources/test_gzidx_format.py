"""The GZIDX index file: its header read through one parser, what is kept of it in memory.

:func:`gzindex_store.check_index` refuses an index whose header is damaged with neurocube's
error. :func:`gzidx_format.span_index` keeps the bytes of the last few index files it read,
keyed by their stat; an index rewritten within the file system's timestamp granularity with
the same size has the same size and mtime, and must still be read again, not served from memory.
"""

from __future__ import annotations

import os
import shutil
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neurocube.errors import IndexMismatchError
from neurocube.sources import gzidx_format, gzindex, gzindex_store
from neurocube.sources.gzindex_store import GzipIndexSpec, IndexRebuildWarning

WINDOW = 64
_HEADER = struct.Struct("<5sBBQQIII")
_POINT = struct.Struct("<QQBB")


def _gzidx(fill: bytes, n: int = 2, csize: int = 200) -> bytes:
    """A GZIDX (v1) index of ``n`` points, each with a window of ``fill`` bytes."""
    points = [(10 + 100 * i, 1000 * i, 0, 1) for i in range(n)]
    parts = [_HEADER.pack(gzidx_format.MAGIC, 1, 0, csize, 1000 * n, 1000, WINDOW, n)]
    parts += [_POINT.pack(*p) for p in points]
    parts += [fill * WINDOW for _ in points]
    return b"".join(parts)


def _fresh_span(tmp_path, content: bytes) -> bytes | None:
    """The span a first read of ``content`` gives (an oracle: a path never read before)."""
    other = tmp_path / "oracle" / f"{content[-1]:02x}.gzidx"
    other.parent.mkdir(exist_ok=True)
    other.write_bytes(content)
    return gzidx_format.span_index(str(other), 0, 1500)


pytestmark = pytest.mark.usefixtures("fresh_gz_handles")


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


# --- check_index reads the header through gzidx_format's struct ---------------------------

GZ_SIZE = 300
FIELDS = {"magic": (0, 5), "version": (5, 6), "csize": (7, 15), "n": (31, 35)}


@pytest.fixture
def gz(tmp_path):
    path = tmp_path / "sess.nii.gz"
    path.write_bytes(b"\x1f\x8b" + bytes(GZ_SIZE - 2))
    return path


def test_the_header_layout_is_the_one_the_struct_reads():
    head = _gzidx(b"A", n=3, csize=GZ_SIZE)
    header = gzidx_format.read_header(head, "x.gzidx")
    assert gzidx_format.HEADER_SIZE == 35 and gzidx_format.POINT_SIZE == 18
    assert (header.version, header.compressed_size, header.window_size, header.n_points) == (
        1, GZ_SIZE, WINDOW, 3,
    )


def test_an_intact_index_passes_the_check(gz, tmp_path):
    mine = tmp_path / "mine.gzidx"
    mine.write_bytes(_gzidx(b"A", csize=GZ_SIZE))
    gzindex_store.check_index(mine, gz)
    mine.write_bytes(_gzidx(b"A", csize=GZ_SIZE + 1))
    with pytest.raises(IndexMismatchError, match=r"built for a file of 301 compressed bytes"):
        gzindex_store.check_index(mine, gz)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: raw[:5] + b"\x02" + raw[6:], r"mine\.gzidx: a GZIDX index of version 2; "
         r"neurocube reads version 1.*delete it or pass index='auto'"),
        (lambda raw: raw[:31] + struct.pack("<I", 10**6) + raw[35:], r"mine\.gzidx: this gzip "
         r"index announces 1000000 seek points \(18000035 bytes with the header\) but has \d+ "
         r"bytes.*delete it or pass index='auto'"),
        (lambda raw: raw[:30], r"mine\.gzidx: not a gzip seek index \(expected the 35-byte "
         r"'GZIDX' header of indexed_gzip, found b'GZIDX\\x01\\x00,' in 30 bytes\)"),
    ],
    ids=["version", "point-count", "header-cut"],
)
def test_a_damaged_header_field_is_refused_with_neurocubes_error(gz, tmp_path, damage, message):
    mine = tmp_path / "mine.gzidx"
    mine.write_bytes(damage(_gzidx(b"A", csize=GZ_SIZE)))  # the compressed size still matches
    with pytest.raises(IndexMismatchError, match=message):
        gzindex_store.check_index(mine, gz)


@settings(max_examples=150, deadline=None)
@given(position=st.integers(0, 34), value=st.integers(0, 255), cut=st.integers(0, 300))
def test_any_damaged_header_byte_is_refused_or_harmless(tmp_path_factory, position, value, cut):
    folder = tmp_path_factory.mktemp("gzidx")
    gz = folder / "sess.nii.gz"
    gz.write_bytes(bytes(GZ_SIZE))
    good = _gzidx(b"A", csize=GZ_SIZE)  # 199 bytes: a cut above that keeps it whole
    raw = bytearray(good)
    raw[position] = value
    raw = raw[:cut]
    mine = folder / "mine.gzidx"
    mine.write_bytes(bytes(raw))
    try:
        gzindex_store.check_index(mine, gz)
    except IndexMismatchError as exc:  # never struct.error, IndexError, ...
        assert "mine.gzidx" in str(exc)
        return
    # it passed: the fields check_index vouches for are intact (flags, sizes, spacing and
    # window are not checked here; indexed_gzip refuses those when it loads the index)
    for lo, hi in FIELDS.values():
        if (lo, hi) != FIELDS["n"]:
            assert raw[lo:hi] == good[lo:hi]
    (announced,) = struct.unpack("<I", raw[31:35])
    assert len(raw) >= gzidx_format.HEADER_SIZE + announced * gzidx_format.POINT_SIZE
