"""neurocube.load: values, the in-place fast path for NIfTI, and the general Dask path."""

from __future__ import annotations

import os

import dask
import dask.array as da
import nibabel as nib
import numpy as np
import pytest
import xarray as xr

import neurocube
from neurocube.errors import SourceChangedError, TruncatedFileError
from neurocube.sources import gzindex, gzindex_store, nifti, nifti_header, nifti_load
from neurocube.storage import IO_STATS
from tests.fixtures.nifti import analytic_values, write_nifti


@pytest.fixture
def masked(nifti_factory):
    path = nifti_factory("load.nii.gz", shape=(6, 7, 8, 30))
    mask = np.zeros((6, 7, 8), bool)
    mask[1:5, ::2, 2:7] = True
    return path, mask, nib.load(str(path)).get_fdata()[mask].T


def test_load_matches_oracle_on_every_path(masked, tmp_path, monkeypatch):
    path, mask, expected = masked
    calls = []
    original = nifti_load.direct_load
    monkeypatch.setattr(
        nifti_load, "direct_load", lambda d, **k: calls.append(d.name) or original(d)
    )

    first = neurocube.open_nifti(path, mask=mask, chunks=7, cache_dir=tmp_path)
    np.testing.assert_allclose(neurocube.load(first).data.values, expected)  # no index yet
    again = neurocube.open_nifti(path, mask=mask, chunks=7, cache_dir=tmp_path)
    IO_STATS.reset()
    got = neurocube.load(again)  # index present: chunks read straight into the output
    np.testing.assert_allclose(got.data.values, expected)
    assert isinstance(got.data.data, np.ndarray)
    assert IO_STATS.snapshot()[1] > 0
    sel = neurocube.load(again.data.isel(trial=slice(3, 20)))  # a selection: general path
    np.testing.assert_allclose(sel.values, expected[3:20])
    assert len(calls) == 3


def test_direct_load_only_takes_untransformed_arrays(masked, tmp_path):
    path, mask, expected = masked
    neurocube.open_nifti(path, mask=mask, cache_dir=tmp_path).compute()  # builds the index
    ds = neurocube.open_nifti(path, mask=mask, chunks=4, cache_dir=tmp_path)
    np.testing.assert_allclose(nifti_load.direct_load(ds.data.data), expected)
    assert nifti_load.direct_load(ds.data.data * 2) is None
    assert nifti_load.direct_load(ds.data.data[:5]) is None
    assert nifti_load.direct_load(da.ones(3)) is None


@pytest.mark.parametrize("workers", [1, 2, 3, 31, 40])
@pytest.mark.parametrize(("dtype", "endian"), [("float32", "<"), ("float32", ">"), ("int16", "<")])
def test_direct_load_of_indexed_gz_reads_one_forward_pass_per_thread(
    nifti_factory, tmp_path, workers, dtype, endian
):
    path = nifti_factory(f"runs-{dtype}{endian == '>'}.nii.gz", shape=(6, 7, 8, 31),
                         dtype=dtype, endian=endian)
    mask = np.zeros((6, 7, 8), bool)
    mask[1:5, ::2, 2:7] = True
    mask[0, 0, 0] = mask[5, 6, 7] = True  # first and last voxel of a volume
    expected = nib.load(str(path)).get_fdata()[mask].T
    neurocube.open_nifti(path, mask=mask, cache_dir=tmp_path).compute()  # builds the index
    ds = neurocube.open_nifti(path, mask=mask, chunks=4, cache_dir=tmp_path)
    IO_STATS.reset()
    got = nifti_load.direct_load(ds.data.data, num_workers=workers)
    opens, nbytes = IO_STATS.snapshot()[:2]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got.dtype == ds.data.dtype
    info = nifti_header.read_header(path)
    assert opens == min(workers, 31)  # one reader per run of volumes, not one per chunk
    assert nbytes == 31 * info.volume_bytes  # every volume inflated once


def test_volume_runs_hand_out_every_volume_once_and_split_the_largest_run_left():
    runs = nifti.VolumeRuns(10, 2, min_split=2)
    assert (runs.claim(), runs.claim()) == (0, 1)
    assert [runs.take(0, 3), runs.take(0, 3), runs.take(0, 3)] == [(0, 3), (3, 5), None]
    assert runs.take(1, 1) == (5, 6)
    assert runs.claim() == 2  # thread 0 is done: takes the back half of run 1 (6..9)
    assert runs.start(2) == 8
    assert runs.take(1, 10) == (6, 8)  # run 1 now ends where the split began
    assert runs.take(2, 1) == (8, 9)
    assert runs.claim() is None  # one volume left: below 2 * min_split, not worth a reader
    assert runs.take(2, 5) == (9, 10)
    assert runs.take(2, 5) is None
    assert nifti.VolumeRuns(3, 8).claim() == 0  # never more runs than volumes


def test_direct_load_values_do_not_depend_on_how_runs_are_split(
    nifti_factory, tmp_path, monkeypatch
):
    path = nifti_factory("split.nii.gz", shape=(6, 7, 8, 50))
    mask = np.zeros((6, 7, 8), bool)
    mask[::2, 1:, 3:] = True
    expected = nib.load(str(path)).get_fdata()[mask].T
    neurocube.open_nifti(path, mask=mask, cache_dir=tmp_path).compute()  # builds the index
    monkeypatch.setattr(nifti_load, "RUN_MIN_SPLIT", 1)  # split whenever 2 volumes are left
    monkeypatch.setattr(gzindex, "SEQUENTIAL_READ_BLOCK", 1)  # one volume per read call
    ds = neurocube.open_nifti(path, mask=mask, cache_dir=tmp_path)
    for workers in (1, 2, 4):
        IO_STATS.reset()
        got = nifti_load.direct_load(ds.data.data, num_workers=workers)
        np.testing.assert_allclose(got, expected)
        opens, nbytes = IO_STATS.snapshot()[:2]
        assert opens >= min(workers, 50)
        assert nbytes == 50 * nifti_header.read_header(path).volume_bytes  # each volume read once


def test_direct_load_of_a_gz_cut_after_opening_fails_like_the_dask_path(nifti_factory, tmp_path):
    path = nifti_factory("whole.nii.gz", shape=(5, 6, 7, 40), compresslevel=0)
    mask = np.ones((5, 6, 7), bool)
    neurocube.open_nifti(path, mask=mask, cache_dir=tmp_path).compute()  # builds the index
    index = tmp_path / "whole.gzidx"
    index.write_bytes(gzindex_store.auto_index_path(path, tmp_path).read_bytes())
    ds = neurocube.open_nifti(path, mask=mask, chunks=10, index=index)  # intact when opened
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    # a file changed after it was opened is refused before any index or byte is used
    def direct():
        return nifti_load.direct_load(ds.data.data, num_workers=2)

    for read in (direct, lambda: ds.data.values):
        with pytest.raises(SourceChangedError, match=r"whole\.nii\.gz: changed since it was "
                           r"opened"):
            read()


def test_direct_load_of_a_gz_damaged_inside_names_the_damage(tmp_path):
    # Damage the middle of the compressed stream, keeping size, mtime and the hashed ends:
    # the stored index still matches, and rapidgzip's forward pass hits the damage.
    shape = (64, 64, 40, 12)
    values = analytic_values(shape) + np.random.default_rng(0).normal(size=shape)
    path = write_nifti(tmp_path / "hurt.nii.gz", values.astype(np.float32), compresslevel=1)
    assert path.stat().st_size > 4 << 20  # more than the hashed first and last MiB
    mask = np.ones(shape[:3], bool)
    neurocube.open_nifti(path, mask=mask, cache_dir=tmp_path).compute()  # builds the index
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 4096] = np.random.default_rng(1).integers(0, 256, 4096, np.uint8).tobytes()
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    ds = neurocube.open_nifti(path, mask=mask, chunks=3, cache_dir=tmp_path)
    with pytest.raises(TruncatedFileError, match=r"hurt\.nii\.gz: the gzip stream is corrupt or "
                       r"truncated before uncompressed byte \d+.*Volume \d+ of 12 \(0-based\)"):
        nifti_load.direct_load(ds.data.data, num_workers=2)


def test_load_keeps_coords_attrs_and_other_variables():
    ds = xr.Dataset(
        {"a": (("t", "v"), da.arange(12, chunks=5).reshape(3, 4)), "b": ("t", np.arange(3))},
        coords={"t": [10, 20, 30]},
        attrs={"source": "x"},
    )
    out = neurocube.load(ds, progress=False)
    xr.testing.assert_identical(out, ds.compute())
    arr = neurocube.load(ds.a, progress=False)
    xr.testing.assert_identical(arr, ds.a.compute())
    assert ds.neuro.load(progress=False).a.values.sum() == 66


def test_several_sessions_load_one_after_another_and_match_dask(tmp_path, monkeypatch):
    from neurocube.synthetic.bucket import make_bucket

    make_bucket(tmp_path / "b", subjects=1, sessions=3, trials=20, grid=(6, 7, 5), seed=3,
                stimuli=False, surface_rois=False, freesurfer=False)  # fmt: skip
    monkeypatch.setenv("NEUROCUBE_CACHE_DIR", str(tmp_path / "cache"))
    active, most = [0], [0]
    original_init, original_close = gzindex._Stream.__init__, gzindex._Stream.close

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        active[0] += 1
        most[0] = max(most[0], active[0])

    def close(self):
        if not self.closed:
            active[0] -= 1
        original_close(self)

    monkeypatch.setattr(gzindex._Stream, "__init__", init)
    monkeypatch.setattr(gzindex._Stream, "close", close)
    sub = neurocube.open_subject(tmp_path / "b", "sub-01", chunks=3)
    sessions = sub.sessions
    ds = sub.betas(sessions, roi="face")
    with dask.config.set(scheduler="threads", num_workers=2):
        expected = ds.betas.compute().values  # Dask's own path, first read: builds the indexes
    # (how many sessions Dask streams side by side depends on its scheduling: not asserted)
    assert len(sessions) == 3 and most[0] >= 1

    sub = neurocube.open_subject(tmp_path / "b", "sub-01", chunks=3)
    fresh = tmp_path / "cache2"
    monkeypatch.setenv("NEUROCUBE_CACHE_DIR", str(fresh))
    active[0] = most[0] = 0
    first = neurocube.load(sub.betas(sessions, roi="face"), progress=False)
    np.testing.assert_array_equal(first.betas.values, expected)
    assert most[0] == 1  # neurocube.load: one session's gzip stream at a time

    built = sub.betas(sessions, roi="face").betas
    IO_STATS.reset()
    with dask.config.set(num_workers=2):
        again = neurocube.load(built, progress=False)
    np.testing.assert_array_equal(again.values, expected)
    assert IO_STATS.snapshot()[0] == 3 * 2  # indexed: one forward-pass reader per thread each
    # Trials filtered by shared/unique are not a plain read: those pieces go through Dask
    # into their rows, and the rows line up with Dask's own result.
    picked = sub.betas(sessions, roi="face", stimuli="shared")
    assert 0 < picked.sizes["trial"] < len(expected)
    np.testing.assert_array_equal(
        neurocube.load(picked, progress=False).betas.values, picked.betas.compute().values
    )
