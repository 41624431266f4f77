"""trial_rows: masked NIfTI rows read without Dask (what neurocube.batches reads blocks with).

Values against the Dask compute of the same array (itself checked against nibabel elsewhere) and
against nibabel directly; arrays whose values are not plain trial rows are refused (None).
"""

from __future__ import annotations

import dask.array as da
import nibabel as nib
import numpy as np
import pytest

import neurocube
from neurocube.sources.nifti_load import concatenate_trials
from neurocube.sources.nifti_rows import trial_rows
from neurocube.synthetic.session import make_session


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    root = tmp_path_factory.mktemp("trial_rows")
    s = make_session(root, grid=(8, 9, 7), n_trials=30, nan_fraction=0.01)
    mask = np.asarray(nib.load(str(s.brain_mask)).dataobj) > 0
    truth = np.asarray(nib.load(str(s.betas)).dataobj, dtype=np.float32)[mask].T  # (trial, voxel)
    return s, mask, truth, root


def _selections(x):
    return {
        "plain": (x, np.arange(30)),
        "picked": (x[np.array([1, 2, 3, 9, 20, 5, 5])], np.array([1, 2, 3, 9, 20, 5, 5])),
        "slice": (x[2:20], np.arange(2, 20)),
        "rechunked": (x[2:20].rechunk((3, -1)), np.arange(2, 20)),
        "joined": (concatenate_trials([x[::2], x[:7]]),
                   np.concatenate([np.arange(0, 30, 2), np.arange(7)])),
    }


@pytest.mark.parametrize("indexed", [False, True])
def test_rows_of_selections_equal_the_values(session, indexed):
    s, mask, truth, root = session
    cache = root / ("cache-indexed" if indexed else "cache-first")
    if indexed:
        from neurocube.sources.nifti_index import build_index

        build_index(s.betas, cache_dir=cache)
    x = neurocube.open_nifti(s.betas, mask=mask, cache_dir=cache, chunks=4)["data"].data
    for name, (array, rows) in _selections(x).items():
        found = trial_rows(array)
        assert found is not None, name
        got = found.read(0, array.shape[0])
        np.testing.assert_array_equal(got, truth[rows], err_msg=name)
        np.testing.assert_array_equal(got, array.compute(), err_msg=name)
        np.testing.assert_array_equal(found.read(3, 9), truth[rows][3:9], err_msg=name)
        assert found.read(3, 100).shape[0] == array.shape[0] - 3


def test_arrays_that_are_not_plain_rows_are_refused(session):
    s, mask, _, root = session
    x = neurocube.open_nifti(s.betas, mask=mask, cache_dir=root / "cache-refused",
                             chunks=4)["data"].data
    refused = {
        "voxel subset": x[:, :5],
        "voxels reversed": x[:, ::-1],
        "voxels permuted": x[:, np.arange(x.shape[1])[::-1]],
        "arithmetic": x * 2,
        "cast": x.astype("f8"),
        "voxel chunks": x.rechunk((4, 10)),
        "not nifti": da.ones((30, 4), chunks=4),
    }
    for name, array in refused.items():
        assert trial_rows(array) is None, name


def test_batches_over_a_selection_read_the_same_rows(session):
    s, mask, truth, root = session
    ds = neurocube.open_nifti(s.betas, mask=mask, cache_dir=root / "cache-batches", chunks=4)
    picked = np.array([0, 3, 4, 5, 11, 12, 29, 28, 2])
    sub = ds.isel(trial=picked)
    seen = {}
    for batch in neurocube.batches(sub, batch_size=4, seed=1):
        for t, row in zip(batch["trial"].tolist(), batch["data"], strict=True):
            seen[t] = row
    assert sorted(seen) == sorted(ds["trial"].values[picked].tolist())
    for position, t in enumerate(ds["trial"].values[picked].tolist()):
        np.testing.assert_array_equal(seen[t], truth[picked[position]])


def test_forward_reads_of_spans_equal_the_values(session, monkeypatch):
    """Spans long enough for a reader of their own (made small here) read the same values."""
    import neurocube.sources.nifti as nifti
    from neurocube.sources.nifti_index import build_index

    s, mask, truth, root = session
    cache = root / "cache-forward"
    build_index(s.betas, cache_dir=cache)
    monkeypatch.setattr(nifti, "FORWARD_MIN_BYTES", 1)
    from neurocube.sources import gzindex

    opened = []
    real_open = gzindex.open_sequential

    def spy(*args, **kwargs):
        reader = real_open(*args, **kwargs)
        opened.append(reader is not None and reader.end is not None)  # a span's points only
        return reader

    monkeypatch.setattr(gzindex, "open_sequential", spy)
    x = neurocube.open_nifti(s.betas, mask=mask, cache_dir=cache, chunks=4)["data"].data
    found = trial_rows(x[np.array([4, 5, 6, 7, 8, 20, 21, 0])])
    assert found is not None
    np.testing.assert_array_equal(found.read(0, 8), truth[[4, 5, 6, 7, 8, 20, 21, 0]])
    np.testing.assert_array_equal(found.read(1, 3), truth[[5, 6]])
    assert opened and all(opened)
