"""neurocube.load: values, the in-place fast path for NIfTI, and the general Dask path."""

from __future__ import annotations

import dask.array as da
import nibabel as nib
import numpy as np
import pytest
import xarray as xr

import neurocube
from neurocube.sources import nifti
from neurocube.sources.files import IO_STATS


@pytest.fixture
def masked(nifti_factory):
    path = nifti_factory("load.nii.gz", shape=(6, 7, 8, 30))
    mask = np.zeros((6, 7, 8), bool)
    mask[1:5, ::2, 2:7] = True
    return path, mask, nib.load(str(path)).get_fdata()[mask].T


def test_load_matches_oracle_on_every_path(masked, tmp_path, monkeypatch):
    path, mask, expected = masked
    calls = []
    original = nifti.direct_load
    monkeypatch.setattr(nifti, "direct_load", lambda d, **k: calls.append(d.name) or original(d))

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
    np.testing.assert_allclose(nifti.direct_load(ds.data.data), expected)
    assert nifti.direct_load(ds.data.data * 2) is None
    assert nifti.direct_load(ds.data.data[:5]) is None
    assert nifti.direct_load(da.ones(3)) is None


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
