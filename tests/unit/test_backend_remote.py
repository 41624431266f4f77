"""``xr.open_dataset(url, engine="neurocube", storage_options=...)`` on a real S3 server."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import neurocube
from neurocube.backend import NeurocubeBackendEntrypoint
from neurocube.errors import AccessDeniedError, DataNotFoundError, ReaderNotFoundError
from tests.fixtures.nifti import write_nifti
from tests.fixtures.remote import SECRET
from tests.unit.datasets.test_spectral import write_cache

SHAPE = (6, 7, 5, 12)


@pytest.fixture
def files(tmp_path):
    values = (np.random.default_rng(5).normal(size=SHAPE) * 2).astype(np.float32)
    write_nifti(tmp_path / "betas.nii.gz", values, compresslevel=1)
    write_nifti(tmp_path / "betas.nii", values)
    write_cache(tmp_path / "spectral.h5")
    (tmp_path / "notes.txt").write_text("not a neuroscience file\n" * 40)
    mask = np.zeros(SHAPE[:3], bool)
    mask[1:5, 2:6, 1:4] = True
    return tmp_path, values, mask


@pytest.mark.parametrize("name", ["betas.nii.gz", "betas.nii"])
def test_open_dataset_on_s3_equals_open_nifti(s3, files, name):
    folder, values, mask = files
    url = s3.put(folder / name, f"d/{name}")
    opts = s3.storage_options
    ds = xr.open_dataset(url, engine="neurocube", storage_options=opts, mask=mask)
    want = neurocube.open_nifti(folder / name, mask=mask)
    np.testing.assert_array_equal(ds.data.values, want.data.values)
    assert ds.attrs["source"] == url
    grid = xr.open_dataset(url, engine="neurocube", storage_options=opts, chunks={})
    same = neurocube.open_nifti(url, storage_options=opts)
    np.testing.assert_array_equal(grid.data.values, same.data.values)
    np.testing.assert_array_equal(grid.data.values, values)
    assert SECRET not in repr(ds) + str(ds.attrs) + repr(grid)


def test_open_dataset_on_s3_reads_spectral_hdf5(s3, files):
    folder, _, _ = files
    url = s3.put(folder / "spectral.h5", "d/spectral.h5")
    ds = xr.open_dataset(url, engine="neurocube", storage_options=s3.storage_options)
    local = neurocube.open_spectral(folder / "spectral.h5")
    for name in local.variables:
        np.testing.assert_array_equal(ds[name].values, local[name].values)


def test_open_dataset_errors_on_s3(s3, files):
    folder, _, _ = files
    opts = s3.storage_options
    missing = f"{s3.url}/d/none.nii.gz"
    with pytest.raises(DataNotFoundError, match=r"none\.nii\.gz") as info:
        xr.open_dataset(missing, engine="neurocube", storage_options=opts)
    assert SECRET not in str(info.value)
    url = s3.put(folder / "betas.nii.gz", "held-out/betas.nii.gz")
    s3.proxy.deny.append("held-out/")
    with pytest.raises(AccessDeniedError, match="access denied") as info:
        xr.open_dataset(url, engine="neurocube", storage_options=opts)
    assert SECRET not in str(info.value)
    text = s3.put(folder / "notes.txt", "d/notes.txt")
    with pytest.raises(ReaderNotFoundError, match="no neurocube reader"):
        xr.open_dataset(text, engine="neurocube", storage_options=opts)
    with pytest.raises(TypeError, match="spectral"):
        xr.open_dataset(s3.put(folder / "spectral.h5", "d/s.h5"), engine="neurocube",
                        storage_options=opts, mask=np.ones(3))


def test_guess_can_open_a_url_by_suffix_without_reading(s3, files):
    folder, _, _ = files
    url = s3.put(folder / "betas.nii.gz", "d/betas.nii.gz")
    entry = NeurocubeBackendEntrypoint()
    assert entry.guess_can_open(url)
    assert not entry.guess_can_open(f"{s3.url}/d/spectral.h5")
    assert s3.counter.total_bytes == 0 and not s3.counter.requests
    assert entry.guess_can_open(folder / "spectral.h5")  # local: sniffed
    assert not entry.guess_can_open(folder / "notes.txt")
