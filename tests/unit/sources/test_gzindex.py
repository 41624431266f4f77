"""Gzip seek indexes: built on the first read, reused, invalidated, optional, never beside data."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import warnings

import dask
import nibabel as nib
import numpy as np
import pytest

import neurocube
from neurocube.errors import IndexMismatchError
from neurocube.sources import gzidx_format, gzindex, gzindex_store
from neurocube.sources.gzindex_store import IndexRebuildWarning, IndexWriteWarning

SHAPE = (6, 7, 8, 60)


@pytest.fixture
def gz_file(nifti_factory):
    return nifti_factory("sess.nii.gz", shape=SHAPE)


pytestmark = pytest.mark.usefixtures("fresh_gz_handles")


def index_files(cache):
    folder = cache / "gzindex"
    return sorted(p.name for p in folder.glob("*.gzidx")) if folder.exists() else []


def test_first_read_builds_index_in_cache_not_beside_data(gz_file, tmp_path):
    cache = tmp_path / "cache"
    before = sorted(os.listdir(gz_file.parent))  # the cache folder is created later
    ds = neurocube.open_nifti(gz_file, chunks=7, cache_dir=cache)
    assert index_files(cache) == []  # opening builds nothing
    np.testing.assert_allclose(ds.data.values, nib.load(str(gz_file)).get_fdata())
    assert len(index_files(cache)) == 1
    assert sorted(os.listdir(gz_file.parent)) == sorted([*before, "cache"])
    assert not list(gz_file.parent.glob("*.gzidx"))


def test_later_reads_seek_through_the_index(gz_file, tmp_path):
    cache = tmp_path / "cache"
    neurocube.open_nifti(gz_file, chunks=7, cache_dir=cache).compute()
    gzindex.reset_handles()
    expected = nib.load(str(gz_file)).get_fdata()
    ds = neurocube.open_nifti(gz_file, chunks=7, cache_dir=cache)
    last = ds.data.isel(trial=-1).values  # random access: no stream from the start
    np.testing.assert_allclose(last, expected[..., -1])
    assert len(gzindex._STREAMS) == 0 and len(gzindex._INDEXED) == 1


def test_threads_and_processes_read_through_the_index(gz_file, tmp_path):
    cache = tmp_path / "cache"
    mask = np.zeros(SHAPE[:3], bool)
    mask[1:5, 2:6, ::2] = True
    expected = nib.load(str(gz_file)).get_fdata()[mask].T
    neurocube.open_nifti(gz_file, chunks=5, cache_dir=cache).compute()
    ds = neurocube.open_nifti(gz_file, mask=mask, chunks=5, cache_dir=cache)
    with dask.config.set(scheduler="threads", num_workers=4):
        np.testing.assert_allclose(ds.data.values, expected)  # one direct read of every chunk
        # chunk tasks of their own (a selection) seek through pooled per-thread handles
        np.testing.assert_allclose(ds.data.isel(trial=slice(1, None)).values, expected[1:])
    assert len(gzindex._INDEXED) >= 1
    with dask.config.set(scheduler="processes", num_workers=2):
        np.testing.assert_allclose(ds.data.values, expected)


def test_concurrent_first_reads_are_correct(gz_file, tmp_path):
    cache = tmp_path / "cache"
    ds = neurocube.open_nifti(gz_file, chunks=3, cache_dir=cache)
    with dask.config.set(scheduler="threads", num_workers=6):
        got = ds.data.isel(trial=slice(None, None, -1)).values  # out of order
    np.testing.assert_allclose(got, nib.load(str(gz_file)).get_fdata()[..., ::-1])
    assert len(index_files(cache)) == 1


def test_changed_file_gets_a_new_index(gz_file, tmp_path, nifti_factory):
    cache = tmp_path / "cache"
    neurocube.open_nifti(gz_file, cache_dir=cache).compute()
    first = index_files(cache)
    other = nifti_factory("other.nii.gz", shape=SHAPE, dtype="float64")
    shutil.copyfile(other, gz_file)  # same path, new content
    gzindex.reset_handles()
    ds = neurocube.open_nifti(gz_file, cache_dir=cache)
    np.testing.assert_allclose(ds.data.values, nib.load(str(gz_file)).get_fdata())
    second = index_files(cache)
    assert len(second) == 2 and set(first) < set(second)


def test_index_false_streams_and_writes_nothing(gz_file, tmp_path):
    cache = tmp_path / "cache"
    ds = neurocube.open_nifti(gz_file, chunks=7, index=False, cache_dir=cache)
    np.testing.assert_allclose(ds.data.values, nib.load(str(gz_file)).get_fdata())
    assert index_files(cache) == []


def test_unwritable_cache_falls_back_to_streaming_with_a_warning(gz_file, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(IndexWriteWarning, match="cannot be created or written; reading this"):
        ds = neurocube.open_nifti(gz_file, chunks=7, cache_dir=blocker / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(ds.data.values, nib.load(str(gz_file)).get_fdata())


def test_explicit_index_path(gz_file, tmp_path, nifti_factory):
    cache = tmp_path / "cache"
    neurocube.open_nifti(gz_file, cache_dir=cache).compute()
    (built,) = (cache / "gzindex").glob("*.gzidx")
    mine = tmp_path / "my.gzidx"
    shutil.copyfile(built, mine)
    gzindex.reset_handles()
    ds = neurocube.open_nifti(gz_file, index=mine)
    np.testing.assert_allclose(ds.data.isel(trial=[0, 59]).values,
                               nib.load(str(gz_file)).get_fdata()[..., [0, 59]])

    other = nifti_factory("bigger.nii.gz", shape=(6, 7, 8, 80))
    with pytest.raises(IndexMismatchError, match=r"built for a file of \d+ compressed bytes, but"):
        neurocube.open_nifti(other, index=mine)
    junk = tmp_path / "junk.gzidx"
    junk.write_bytes(b"not an index at all")
    with pytest.raises(IndexMismatchError, match=r"junk\.gzidx: not a gzip seek index"):
        neurocube.open_nifti(gz_file, index=junk)
    with pytest.raises(IndexMismatchError, match=r"absent\.gzidx: gzip index not found"):
        neurocube.open_nifti(gz_file, index=tmp_path / "absent.gzidx")


def test_same_size_rewrite_is_caught_by_the_content_hash(gz_file, tmp_path):
    cache = tmp_path / "cache"
    neurocube.open_nifti(gz_file, cache_dir=cache).compute()
    (built,) = (cache / "gzindex").glob("*.gzidx")
    keep = tmp_path / "keep.gzidx"
    shutil.copyfile(built, keep)
    shutil.copyfile(built.with_suffix(".json"), keep.with_suffix(".json"))
    data = bytearray(gz_file.read_bytes())
    data[-9] ^= 0xFF  # same size, other bytes (in the CRC trailer)
    gz_file.write_bytes(bytes(data))
    with pytest.raises(IndexMismatchError, match="first/last MiB differ"):
        neurocube.open_nifti(gz_file, index=keep)


def test_first_read_shows_one_progress_bar(gz_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NEUROCUBE_PROGRESS", "1")
    monkeypatch.setattr("neurocube.progress.DELAY", 0.0)  # a small file: show the bar anyway
    neurocube.open_nifti(gz_file, chunks=7, cache_dir=tmp_path / "cache").compute()
    err = capsys.readouterr().err
    # one bar for the compute; the stream inflating the file inside it draws none of its own
    assert "computing: done" in err and "indexing sess.nii.gz" not in err
    monkeypatch.setenv("NEUROCUBE_PROGRESS", "0")
    gzindex.reset_handles()
    neurocube.open_nifti(gz_file, chunks=7, cache_dir=tmp_path / "other").compute()
    assert capsys.readouterr().err == ""


def _index_of(gz_file, cache):
    return gzindex_store.auto_index_path(gz_file, cache)


def test_touched_file_gets_a_new_index(gz_file, tmp_path):
    cache = tmp_path / "cache"
    neurocube.open_nifti(gz_file, cache_dir=cache).compute()
    first = _index_of(gz_file, cache)
    st = os.stat(gz_file)
    os.utime(gz_file, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # mtime only
    second = _index_of(gz_file, cache)
    assert second != first and not second.exists()
    gzindex.reset_handles()
    ds = neurocube.open_nifti(gz_file, cache_dir=cache)
    np.testing.assert_allclose(ds.data.values, nib.load(str(gz_file)).get_fdata())
    assert second.exists()


def _stored_gz(path, values):
    """Write ``values`` as a .nii.gz of stored (level 0) deflate blocks: its size depends on the
    shape alone, so other values give a file of the same size."""
    raw = nib.Nifti1Image(values, np.eye(4)).to_bytes()
    path.write_bytes(gzip.compress(raw, compresslevel=0, mtime=0))
    return path


@pytest.mark.parametrize("process", ["same process", "new process"])
def test_same_size_and_mtime_rewrite_is_caught_at_read_and_reindexed(tmp_path, process):
    cache = tmp_path / "cache"
    rng = np.random.default_rng(5)
    path = _stored_gz(tmp_path / "sess.nii.gz", rng.random(SHAPE, dtype=np.float32))
    neurocube.open_nifti(path, chunks=7, cache_dir=cache).compute()
    index = _index_of(path, cache)
    old_sidecar = json.loads(index.with_suffix(".json").read_text())
    with dask.config.set(scheduler="synchronous"):  # readers of the old version, kept open
        old = neurocube.open_nifti(path, chunks=7, cache_dir=cache).data.isel(trial=[0, -1])
        old.compute()
    assert len(gzindex._INDEXED) == 1
    st = os.stat(path)
    _stored_gz(path, rng.random(SHAPE, dtype=np.float32))  # new content...
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... same size, the old mtime back
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert _index_of(path, cache) == index and index.exists()  # the name cannot tell
    if process == "new process":
        gzindex.reset_handles()  # forget what this process checked and opened
    expected = nib.load(str(path)).get_fdata()
    ds = neurocube.open_nifti(path, chunks=7, cache_dir=cache)
    with pytest.warns(IndexRebuildWarning, match=r"\.gzidx: the cached gzip index of .*"
                      r"sess\.nii\.gz is stale: it was built for a file of \d+ bytes whose "
                      r"first/last MiB hash to .*deleted and this read streams"):
        np.testing.assert_array_equal(ds.data.values, expected)
    new_sidecar = json.loads(index.with_suffix(".json").read_text())
    assert new_sidecar["ends_sha256"] != old_sidecar["ends_sha256"]  # rebuilt for the new file
    for _ in range(2):  # this process (old readers were closed), then a fresh one
        with warnings.catch_warnings(), dask.config.set(scheduler="synchronous"):
            warnings.simplefilter("error")  # the new index passes the check
            again = neurocube.open_nifti(path, chunks=7, cache_dir=cache)
            np.testing.assert_array_equal(again.data.isel(trial=[-1, 0]).values,
                                          expected[..., [-1, 0]])
        assert len(gzindex._STREAMS) == 0 and len(gzindex._INDEXED) >= 1  # through the index
        gzindex.reset_handles()


def test_the_ends_are_hashed_once_per_process_not_per_chunk(gz_file, tmp_path):
    cache = tmp_path / "cache"
    neurocube.open_nifti(gz_file, chunks=3, cache_dir=cache).compute()
    gzindex.reset_handles()
    index = str(_index_of(gz_file, cache))
    ds = neurocube.open_nifti(gz_file, chunks=3, cache_dir=cache)
    assert gzindex_store._VERIFIED == set()  # opening checks nothing
    with dask.config.set(scheduler="threads", num_workers=4):
        np.testing.assert_allclose(ds.data.values, nib.load(str(gz_file)).get_fdata())
    assert [key[:2] for key in gzindex_store._VERIFIED] == [(str(gz_file.resolve()), index)]


def test_cached_index_without_its_sidecar_is_rebuilt_with_a_warning(gz_file, tmp_path):
    cache = tmp_path / "cache"
    neurocube.open_nifti(gz_file, chunks=7, cache_dir=cache).compute()
    index = _index_of(gz_file, cache)
    index.with_suffix(".json").unlink()
    gzindex.reset_handles()
    ds = neurocube.open_nifti(gz_file, chunks=7, cache_dir=cache)
    with pytest.warns(IndexRebuildWarning, match=r"has no readable identity sidecar .*\.json"):
        np.testing.assert_allclose(ds.data.values, nib.load(str(gz_file)).get_fdata())
    assert index.exists() and index.with_suffix(".json").exists()


def _rchar():
    with open("/proc/self/io") as fh:
        for line in fh:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
def test_opening_reads_the_header_only_with_or_without_an_index(tmp_path):
    cache = tmp_path / "cache"
    rng = np.random.default_rng(2)
    values = rng.random((32, 32, 32, 40), dtype=np.float32)
    path = _stored_gz(tmp_path / "big.nii.gz", values)
    assert path.stat().st_size > 4 * 2**20  # hashing its ends would read 2 MiB
    warm = _stored_gz(tmp_path / "warm.nii.gz", values)  # another file: nothing memoised
    for _ in range(2):  # without an index, then with the one the compute stored
        neurocube.open_nifti(warm, chunks=8, cache_dir=cache)  # lazy imports, cache probe
        before = _rchar()
        ds = neurocube.open_nifti(path, chunks=8, cache_dir=cache)
        read = _rchar() - before
        assert read < 256 * 2**10, read  # the 64 KiB header block; hashing the ends: 2 MiB more
        ds.data.isel(trial=-1).compute()
    assert _index_of(path, cache).exists()


def test_damaged_cached_index_is_deleted_and_rebuilt_with_a_warning(gz_file, tmp_path):
    cache = tmp_path / "cache"
    expected = nib.load(str(gz_file)).get_fdata()
    neurocube.open_nifti(gz_file, chunks=7, cache_dir=cache).compute()
    index = _index_of(gz_file, cache)
    good = index.read_bytes()
    index.write_bytes(good[: len(good) // 2])  # e.g. a crash or a full disk
    gzindex.reset_handles()
    ds = neurocube.open_nifti(gz_file, chunks=7, cache_dir=cache)
    with pytest.warns(IndexRebuildWarning, match=r"\.gzidx: the cached gzip index of .*"
                      r"sess\.nii\.gz is damaged .*deleted"):
        np.testing.assert_allclose(ds.data.values, expected)
    assert index.read_bytes() == good  # rebuilt, the same as before
    gzindex.reset_handles()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = neurocube.open_nifti(gz_file, chunks=7, cache_dir=cache)
        np.testing.assert_allclose(again.data.isel(trial=[-1, 0]).values, expected[..., [-1, 0]])
    assert len(gzindex._STREAMS) == 0  # that read went through the index


def test_damaged_explicit_index_is_a_clear_error(gz_file, tmp_path):
    cache = tmp_path / "cache"
    neurocube.open_nifti(gz_file, cache_dir=cache).compute()
    mine = tmp_path / "mine.gzidx"
    good = _index_of(gz_file, cache).read_bytes()
    # the header and the point table (what check_index reads) are intact, but the first point
    # now announces a 32 KiB window that the file does not hold (as if cut after the table)
    flag = gzidx_format.HEADER_SIZE + gzidx_format.POINT_SIZE - 1
    assert good[flag] == 0
    damaged = good[:flag] + b"\x01" + good[flag + 1 :]
    mine.write_bytes(damaged)
    gzindex.reset_handles()
    ds = neurocube.open_nifti(gz_file, index=mine)
    with pytest.raises(IndexMismatchError, match=r"mine\.gzidx: this gzip index cannot be loaded "
                       r"for .*sess\.nii\.gz.*Delete it, or pass index='auto'"):
        ds.data.values  # noqa: B018
    assert mine.read_bytes() == damaged  # the caller's file is left alone
    mine.write_bytes(good[: len(good) // 2])  # cut inside the point table: refused at open
    with pytest.raises(IndexMismatchError, match=r"mine\.gzidx: this gzip index announces \d+ seek "
                       r"points \(\d+ bytes with the header\) but has \d+ bytes.*index='auto'"):
        neurocube.open_nifti(gz_file, index=mine)


def test_cache_unwritable_at_read_time_streams_with_a_warning(gz_file, tmp_path):
    cache = tmp_path / "cache"
    ds = neurocube.open_nifti(gz_file, chunks=7, cache_dir=cache)  # writable when opened
    shutil.rmtree(cache)
    cache.write_text("the cache folder was replaced by a file")  # ... but not when read
    with pytest.warns(IndexWriteWarning, match=r"cannot store gzip indexes in .*cache.*streaming"):
        np.testing.assert_allclose(ds.data.values, nib.load(str(gz_file)).get_fdata())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_cache_folder_falls_back_to_streaming(gz_file, tmp_path):
    cache = tmp_path / "cache"
    (cache / "gzindex").mkdir(parents=True)
    os.chmod(cache / "gzindex", 0o555)
    try:
        with pytest.warns(IndexWriteWarning, match="cannot be created or written"):
            ds = neurocube.open_nifti(gz_file, chunks=7, cache_dir=cache)
        np.testing.assert_allclose(ds.data.values, nib.load(str(gz_file)).get_fdata())
        assert index_files(cache) == []
    finally:
        os.chmod(cache / "gzindex", 0o755)


def test_streams_without_an_index_close_at_the_end_of_the_data(gz_file, tmp_path):
    # A mask read from a .nii.gz (streamed, never indexed) must not keep its stream, and with
    # it its share of the inflate threads, open for the rest of the process.
    mask_path = tmp_path / "mask.nii.gz"
    mask = np.zeros(SHAPE[:3], np.uint8)
    mask[1:4, 2:6, 3:7] = 1
    nib.Nifti1Image(mask, nib.load(str(gz_file)).affine).to_filename(str(mask_path))
    ds = neurocube.open_nifti(gz_file, mask=mask_path, chunks=7, cache_dir=tmp_path / "cache")
    assert len(gzindex._STREAMS) == 0 and gzindex._STREAM_THREADS_IN_USE == 0
    np.testing.assert_allclose(ds.data.values, nib.load(str(gz_file)).get_fdata()[mask > 0].T)
    streamed = neurocube.open_nifti(gz_file, chunks=7, index=False)
    np.testing.assert_allclose(streamed.data.values, nib.load(str(gz_file)).get_fdata())
    assert len(gzindex._STREAMS) == 0 and gzindex._STREAM_THREADS_IN_USE == 0
