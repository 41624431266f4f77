"""Computes of every chunk of a masked NIfTI array (``.values``, ``.compute()``, ``ds.load()``).

Such a compute is rewritten into one task that reads the whole array the way
``neurocube.load`` does (a forward pass per thread) straight into the result.
Values are checked against nibabel; the rewrite is checked on the real compute
path; anything that needs only some chunks keeps its chunk tasks.
"""

from __future__ import annotations

import dask
import dask.array
import nibabel as nib
import numpy as np
import pytest
import xarray as xr

import neurocube
from neurocube.sources import nifti_load, pushdown


def _oracle(path, mask):
    data = np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))
    return data[mask].T  # (trial, voxel), voxels in C order of the grid


def _mask(shape):
    rng = np.random.default_rng(3)
    return rng.random(shape[:3]) < 0.4


@pytest.fixture
def whole_reads(monkeypatch):
    """Count the whole-array reads that computes run (the real compute path, not a mock)."""
    calls = []
    real = nifti_load.read_whole_array

    def counting(source):
        calls.append(source[0])
        return real(source)

    monkeypatch.setattr(nifti_load, "read_whole_array", counting)
    return calls


def _optimized_keys(array):
    graph = pushdown.optimize(array.__dask_graph__(), array.__dask_keys__())
    return [str(k) for k in dict(graph)]


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
@pytest.mark.parametrize("first_read", [True, False])
def test_values_of_every_chunk_read_whole(nifti_factory, tmp_path, ext, first_read, whole_reads):
    shape = (6, 5, 4, 23)
    path = nifti_factory(f"betas{ext}", shape=shape)
    mask = _mask(shape)
    cache = tmp_path / "cache"
    if not first_read and ext == ".nii.gz":
        neurocube.open_nifti(path, mask=mask, cache_dir=cache, chunks=4).data.values  # noqa: B018
        assert list(cache.rglob("*.gzidx*")) or list(cache.rglob("*index*"))
    ds = neurocube.open_nifti(path, mask=mask, cache_dir=cache, chunks=4)
    keys = _optimized_keys(ds.data.data)
    assert sum(k.startswith("whole-") for k in keys) == 1
    whole_reads.clear()
    with dask.config.set(scheduler="threads", num_workers=2):
        values = ds.data.values
    assert whole_reads == ["volumes"]  # the compute's concatenation became one direct read
    np.testing.assert_array_equal(values, _oracle(path, mask))
    assert values.shape == (shape[3], int(mask.sum())) and values.flags.c_contiguous


def test_dataset_load_and_compute_read_whole(nifti_factory, tmp_path, whole_reads):
    shape = (6, 5, 4, 17)
    path = nifti_factory("betas.nii.gz", shape=shape)
    mask = _mask(shape)
    ds = neurocube.open_nifti(path, mask=mask, cache_dir=tmp_path / "c", chunks=3)
    oracle = _oracle(path, mask)
    np.testing.assert_array_equal(ds.data.data.compute(), oracle)
    np.testing.assert_array_equal(ds.compute().data.values, oracle)
    np.testing.assert_array_equal(ds.load().data.values, oracle)
    assert whole_reads == ["volumes"] * 3


@pytest.mark.parametrize(
    "partial",
    [
        lambda a: a.isel(trial=slice(2, 9)),
        lambda a: a.isel(trial=[0, 5, 16]),
        lambda a: a.sum("trial"),
        lambda a: a * 2,
    ],
    ids=["slice", "pick", "reduce", "arith"],
)
def test_partial_or_derived_computes_keep_their_chunk_tasks(
    nifti_factory, tmp_path, partial, whole_reads
):
    shape = (6, 5, 4, 17)
    path = nifti_factory("betas.nii.gz", shape=shape)
    mask = _mask(shape)
    ds = neurocube.open_nifti(path, mask=mask, cache_dir=tmp_path / "c", chunks=3)
    ds.data.values  # noqa: B018 (index built: the chunked graph)
    ds = neurocube.open_nifti(path, mask=mask, cache_dir=tmp_path / "c", chunks=3)
    selected = partial(ds.data)
    assert not any(k.startswith("whole-") for k in _optimized_keys(selected.data))
    oracle = partial(xr.DataArray(_oracle(path, mask), dims=("trial", "voxel")))
    whole_reads.clear()
    np.testing.assert_allclose(selected.values, oracle.values, rtol=1e-6)
    assert whole_reads == []


def test_several_sessions_concatenated_read_whole(nifti_factory, tmp_path, whole_reads):
    shape = (6, 5, 4, 11)
    mask = _mask(shape)
    paths = [nifti_factory(f"ses{i}.nii.gz", shape=shape) for i in range(3)]
    arrays = [
        neurocube.open_nifti(p, mask=mask, cache_dir=tmp_path / "c", chunks=4).data.data
        for p in paths
    ]
    stacked = nifti_load.concatenate_trials(arrays)
    assert sum(k.startswith("whole-") for k in _optimized_keys(stacked)) == 1
    whole_reads.clear()
    values = stacked.compute()
    assert whole_reads == ["stacked"]
    np.testing.assert_array_equal(values, np.concatenate([_oracle(p, mask) for p in paths]))


def test_building_the_rewritten_graph_reads_nothing(nifti_factory, tmp_path, monkeypatch):
    shape = (6, 5, 4, 9)
    path = nifti_factory("betas.nii.gz", shape=shape)
    ds = neurocube.open_nifti(path, mask=_mask(shape), cache_dir=tmp_path / "c", chunks=2)
    calls = []
    monkeypatch.setattr(nifti_load, "read_whole_array", lambda source: calls.append(source))
    assert sum(k.startswith("whole-") for k in _optimized_keys(ds.data.data)) == 1
    assert calls == []


def test_a_damaged_file_is_still_refused(nifti_factory, tmp_path):
    shape = (6, 5, 4, 30)
    path = nifti_factory("betas.nii.gz", shape=shape)
    raw = bytearray(path.read_bytes())
    pos = len(raw) * 6 // 10
    raw[pos : pos + 64] = bytes(64)
    path.write_bytes(bytes(raw))
    ds = neurocube.open_nifti(path, mask=_mask(shape), cache_dir=tmp_path / "c", chunks=4)
    with pytest.raises(neurocube.errors.NeurocubeError, match=r"betas\.nii\.gz"):
        ds.data.values  # noqa: B018
