"""A ``.nii.gz`` is verified before its values are returned: CRC32 and length on a full pass,
per-volume checksums (recorded with the index) on every read through the index."""

from __future__ import annotations

import json
import os
import warnings
import zlib

import dask
import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import neurocube
from neurocube.errors import CorruptDataError, NeurocubeError, TruncatedFileError
from neurocube.sources import gzindex, nifti, nifti_header
from neurocube.sources.gzindex_store import IndexRebuildWarning
from neurocube.sources.volume_sums import VOLUME_SUM, VolumeHasher, volume_checksum
from tests.fixtures.nifti import write_nifti

SHAPE = (40, 32, 24, 30)  # 123 KB per volume: the file is more than the hashed 2 MiB of ends


pytestmark = pytest.mark.usefixtures("fresh_gz_handles")


@pytest.fixture
def stored(tmp_path):
    """A .nii.gz of stored (level 0) deflate blocks: a flipped data byte still inflates."""
    values = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    path = write_nifti(tmp_path / "sess.nii.gz", values, compresslevel=0)
    return path, np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))


def _index_of(path, cache):
    (index,) = (cache / "gzindex").glob(f"{path.name}.*.gzidx")
    return index


def _flip_middle(path, fraction=0.5):
    """Flip one byte of deflate data in place (keeping size and mtime); return its volume."""
    data = bytearray(path.read_bytes())
    original = zlib.decompress(bytes(data), 31)
    at = int(len(data) * fraction)
    data[at] ^= 0xFF
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    damaged = zlib.decompressobj(31).decompress(bytes(data[:-8]))  # stops short of the CRC
    first = next(i for i, (a, b) in enumerate(zip(original, damaged)) if a != b)  # noqa: B905
    info = nifti_header.read_header(path)
    return (first - info.vox_offset) // info.volume_bytes


def test_the_sidecar_records_each_volume_checksum(stored, tmp_path):
    path, expected = stored
    cache = tmp_path / "cache"
    np.testing.assert_array_equal(neurocube.open_nifti(path, cache_dir=cache).data.values,
                                  expected)
    side = json.loads(_index_of(path, cache).with_suffix(".json").read_text())
    info = nifti_header.read_header(path)
    raw = zlib.decompressobj(31).decompress(path.read_bytes())
    want = [volume_checksum(raw[info.vox_offset + t * info.volume_bytes :
                                info.vox_offset + (t + 1) * info.volume_bytes])
            for t in range(SHAPE[3])]
    assert side["volumes"]["sums"] == want
    assert side["volumes"]["algorithm"] == VOLUME_SUM
    assert side["index_crc32"] == zlib.crc32(_index_of(path, cache).read_bytes())


@pytest.mark.parametrize("how", ["values", "load", "one_trial", "masked_values"])
def test_indexed_reads_refuse_a_volume_damaged_after_indexing(stored, tmp_path, how):
    path, expected = stored
    cache = tmp_path / "cache"
    mask = np.ones(SHAPE[:3], bool)
    neurocube.open_nifti(path, cache_dir=cache).compute()  # the index and its checksums
    bad = _flip_middle(path)
    gzindex.reset_handles()  # a new session: the ends still match, the index is used
    ds = neurocube.open_nifti(path, cache_dir=cache, mask=mask if how != "values" else None)
    assert gzindex.has_index(nifti.build_parts(path, cache_dir=cache).array.spec.gzip)
    with pytest.raises(CorruptDataError, match=rf"sess\.nii\.gz: volume {bad} \(0-based\) of "
                       rf"{SHAPE[3]} does not match the checksum"):
        if how == "values":
            ds.data.values  # noqa: B018
        elif how == "load":
            neurocube.load(ds.data, progress=False)
        elif how == "one_trial":
            ds.data.isel(trial=bad).values  # noqa: B018
        else:
            ds.data.values  # noqa: B018
    other = 0 if bad else SHAPE[3] - 1  # an undamaged volume still reads
    np.testing.assert_array_equal(
        neurocube.open_nifti(path, cache_dir=cache).data.isel(trial=other).values,
        expected[..., other],
    )


def test_an_explicit_index_without_checksums_verifies_through_one_pass(stored, tmp_path):
    path, expected = stored
    cache = tmp_path / "cache"
    neurocube.open_nifti(path, cache_dir=cache).compute()
    mine = tmp_path / "mine.gzidx"
    mine.write_bytes(_index_of(path, cache).read_bytes())  # no sidecar beside it
    gzindex.reset_handles()
    np.testing.assert_array_equal(neurocube.open_nifti(path, index=mine).data.values, expected)
    bad = _flip_middle(path)
    gzindex.reset_handles()
    with pytest.raises(NeurocubeError, match=r"sess\.nii\.gz"):
        neurocube.open_nifti(path, index=mine).data.isel(trial=bad).values  # noqa: B018


@pytest.mark.parametrize("how", ["stream", "auto", "load"])
@pytest.mark.parametrize("field", ["crc", "isize"])
def test_a_wrong_crc32_or_length_is_a_corrupt_data_error(stored, tmp_path, how, field):
    path, _ = stored
    data = bytearray(path.read_bytes())
    data[-8 if field == "crc" else -2] ^= 0x01
    path.write_bytes(bytes(data))
    what = "CRC32" if field == "crc" else r"length \(ISIZE\)"
    ds = neurocube.open_nifti(path, cache_dir=tmp_path / "cache",
                              index=False if how == "stream" else "auto")
    with pytest.raises(CorruptDataError, match=rf"sess\.nii\.gz: the gzip {what} .* does not "
                       "match"):
        if how == "load":
            neurocube.load(ds.data, progress=False)
        else:
            ds.data.isel(trial=slice(0, 2)).values  # noqa: B018  (a part: verified all the same)
    assert not (tmp_path / "cache" / "gzindex").exists() or not list(
        (tmp_path / "cache" / "gzindex").glob("*.gzidx")
    )  # no index of a file that failed its check


@pytest.mark.parametrize("cut", range(1, 10))
def test_a_file_missing_its_last_bytes_is_a_truncated_file_error(stored, tmp_path, cut):
    path, _ = stored
    path.write_bytes(path.read_bytes()[:-cut])
    for how in ("values", "load", "masked"):
        gzindex.reset_handles()
        ds = neurocube.open_nifti(path, cache_dir=tmp_path / "cache",
                                  mask=np.ones(SHAPE[:3], bool) if how == "masked" else None)
        with pytest.raises((TruncatedFileError, CorruptDataError), match=r"sess\.nii\.gz"):
            if how == "values":
                ds.data.values  # noqa: B018
            else:
                neurocube.load(ds.data, progress=False)


def test_an_old_sidecar_without_checksums_is_rebuilt(stored, tmp_path):
    path, expected = stored
    cache = tmp_path / "cache"
    neurocube.open_nifti(path, cache_dir=cache).compute()
    sidecar = _index_of(path, cache).with_suffix(".json")
    old = json.loads(sidecar.read_text())
    for key in ("volumes", "sidecar_crc32", "index_crc32"):
        old.pop(key)
    sidecar.write_text(json.dumps(old))  # what neurocube wrote before issue 11
    gzindex.reset_handles()
    with pytest.warns(IndexRebuildWarning, match="older neurocube"):
        got = neurocube.open_nifti(path, cache_dir=cache).data.values
    np.testing.assert_array_equal(got, expected)
    assert "volumes" in json.loads(sidecar.read_text())


def test_edited_checksums_in_a_sidecar_are_caught_by_its_seal(stored, tmp_path):
    path, expected = stored
    cache = tmp_path / "cache"
    neurocube.open_nifti(path, cache_dir=cache).compute()
    sidecar = _index_of(path, cache).with_suffix(".json")
    record = json.loads(sidecar.read_text())
    record["volumes"]["sums"][3] ^= 1
    sidecar.write_text(json.dumps(record))
    gzindex.reset_handles()
    with pytest.warns(IndexRebuildWarning, match="sidecar is damaged"):
        got = neurocube.open_nifti(path, cache_dir=cache).data.values
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_first_read_decodes_on_the_parallel_decoder_and_records_the_index_once(
    stored, tmp_path, monkeypatch, threads
):
    import rapidgzip

    path, expected = stored
    opened = []
    real = rapidgzip.RapidgzipFile

    def spy(*args, **kwargs):  # the real decoder, counted
        opened.append(kwargs.get("parallelization"))
        return real(*args, **kwargs)

    monkeypatch.setattr(rapidgzip, "RapidgzipFile", spy)
    monkeypatch.setattr(gzindex, "STREAM_THREADS", threads)
    cache = tmp_path / "cache"
    mask = np.ones(SHAPE[:3], bool)
    with dask.config.set(scheduler="threads", num_workers=2):
        got = neurocube.load(neurocube.open_nifti(path, cache_dir=cache, mask=mask).data,
                             progress=False)
    np.testing.assert_array_equal(got.values, expected.reshape(-1, SHAPE[3]).T)
    assert opened == [threads]  # one pass, on `threads` decoding threads
    assert _index_of(path, cache).exists()  # exported from that same pass
    opened.clear()
    with dask.config.set(scheduler="threads", num_workers=2):
        again = neurocube.open_nifti(path, cache_dir=cache, mask=mask).data.values
    np.testing.assert_array_equal(again, expected.reshape(-1, SHAPE[3]).T)
    assert all(p == 1 for p in opened)  # through the index: no second full pass


def test_a_first_values_read_is_one_pass_released_after_its_check(stored, tmp_path, monkeypatch):
    path, expected = stored
    passes = []
    real = gzindex._Stream.at_eof

    def spy(self):
        passes.append(self.kind)
        return real(self)

    monkeypatch.setattr(gzindex._Stream, "at_eof", spy)
    ds = neurocube.open_nifti(path, cache_dir=tmp_path / "cache", chunks=3)
    with dask.config.set(scheduler="threads", num_workers=2):
        np.testing.assert_array_equal(ds.data.values, expected)
    assert passes == ["rapidgzip"]


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 3 * 4096 + 17),
    offset=st.integers(0, 600),
    cuts=st.lists(st.integers(1, 20000), max_size=12),
)
def test_volume_checksums_do_not_depend_on_how_the_stream_is_cut(size, offset, cuts):
    count = 4
    data = np.random.default_rng(size).integers(0, 256, offset + size * count + 9,
                                                dtype=np.uint8).tobytes()
    want = [volume_checksum(data[offset + t * size : offset + (t + 1) * size])
            for t in range(count)]
    hasher = VolumeHasher(offset, size, count)
    pos = 0
    for n in [*cuts, len(data)]:
        piece = data[pos : pos + n]
        hasher.feed(pos, piece)
        pos += len(piece)
    assert hasher.sums == want


def test_a_changed_byte_changes_the_volume_checksum():
    data = bytearray(np.random.default_rng(1).integers(0, 256, 3 * 4096 + 5,
                                                       dtype=np.uint8).tobytes())
    base = volume_checksum(bytes(data))
    for at in (0, 4095, 4096, len(data) - 1):
        for bit in range(8):
            data[at] ^= 1 << bit
            assert volume_checksum(bytes(data)) != base
            data[at] ^= 1 << bit
    swapped = data[4096:8192] + data[:4096] + data[8192:]  # two blocks trade places
    assert volume_checksum(bytes(swapped)) != base
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert volume_checksum(b"") == volume_checksum(bytearray())
