"""neurocube.cache: round trips, reuse without recomputation, staleness, stores, bad input."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr

import neurocube
from neurocube.caching.keys import fingerprint
from neurocube.caching.store import MARKER_NAME
from neurocube.errors import CacheError, NeurocubeWarning
from neurocube.sources import nifti as nifti_source
from neurocube.storage import IO_STATS, identities

from .conftest import SHAPE, make_betas, oracle_masked


def _entries(root: Path) -> list[Path]:
    names = root.iterdir()
    return sorted(p for p in names if p.name.endswith(".zarr") and not p.name.startswith("."))


def test_masked_nifti_round_trip_keeps_values_coords_attrs(betas_path, brain_mask, tmp_path):
    ds = neurocube.open_nifti(betas_path, mask=brain_mask, chunks=3)
    cached = neurocube.cache(ds, store=tmp_path / "c")

    # Values against the numpy oracle, coords and attrs identical to the source Dataset.
    np.testing.assert_array_equal(cached.data.values, oracle_masked(SHAPE, brain_mask))
    xr.testing.assert_identical(cached.compute(), ds.compute())
    assert cached.attrs["neurocube_sources"] == [str(betas_path.resolve())]
    # Lazy, coords back in memory with their dtypes; the source's 3-trial blocks (a few KB)
    # are merged along trial into one stored chunk (see test_small_blocks_are_merged...).
    assert isinstance(cached.data.data, da.Array)
    assert cached.data.chunks == ((SHAPE[3],), ds.data.chunks[1])
    for name in ("i", "j", "k", "x", "y", "z"):
        assert not isinstance(cached[name].data, da.Array)
        assert cached[name].dtype == ds[name].dtype
    # Zarr v3, Blosc-LZ4 (bit-shuffled) for numbers.
    (entry,) = _entries(tmp_path / "c")
    meta = json.loads((entry / "data" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [SHAPE[3], int(brain_mask.sum())]
    assert [c["name"] for c in meta["codecs"]] == ["bytes", "blosc", "crc32c"]
    blosc = meta["codecs"][1]["configuration"]
    assert (blosc["cname"], blosc["shuffle"], blosc["typesize"]) == ("lz4", "bitshuffle", 4)
    assert cached.data.encoding["compressors"][0].cname.value == "lz4"


def test_second_call_reads_nothing_from_the_source(betas_path, brain_mask, tmp_path, monkeypatch):
    ds = neurocube.open_nifti(betas_path, mask=brain_mask, chunks=4)
    first = neurocube.cache(ds, store=tmp_path)

    def no_reads(*args, **kwargs):
        raise AssertionError("the source file was read although a cache entry exists")

    monkeypatch.setattr(nifti_source.VolumeArray, "__getitem__", no_reads)
    again = neurocube.open_nifti(betas_path, mask=brain_mask, chunks=4)
    IO_STATS.reset()
    second = neurocube.cache(again, store=tmp_path)
    opens, _ = IO_STATS.snapshot()
    assert opens <= 1  # at most the identity hash of the file's ends (memoised per version)
    np.testing.assert_array_equal(second.data.values, first.data.values)
    assert len(_entries(tmp_path)) == 1
    # Reopening the same entry gives the same Dask names (deterministic graphs downstream).
    assert second.data.data.name == first.data.data.name


def test_caching_a_cached_object_returns_it(betas_path, tmp_path):
    cached = neurocube.cache(neurocube.open_nifti(betas_path), store=tmp_path)
    assert neurocube.cache(cached, store=tmp_path) is cached
    assert cached.neuro.cache(store=tmp_path) is cached
    assert len(_entries(tmp_path)) == 1


def test_operations_give_different_entries(betas_path, brain_mask, tmp_path):
    ds = neurocube.open_nifti(betas_path, mask=brain_mask, chunks=5)
    variants = {
        "all": ds,
        "isel": ds.isel(trial=[0, 2, 4]),
        "threshold": ds.where(ds.data > 3000),
        "voxels": ds.isel(voxel=slice(0, 7)),
    }
    keys = {name: neurocube.cache(v, store=tmp_path) for name, v in variants.items()}
    assert len(_entries(tmp_path)) == 4
    values = oracle_masked(SHAPE, brain_mask)
    np.testing.assert_array_equal(keys["isel"].data.values, values[[0, 2, 4]])
    np.testing.assert_array_equal(keys["voxels"].data.values, values[:, :7])
    expected = np.where(values > 3000, values, np.nan)
    np.testing.assert_array_equal(keys["threshold"].data.values, expected)


def test_touched_source_file_gives_a_new_entry(tmp_path, brain_mask):
    path = make_betas(tmp_path / "b.nii")
    neurocube.cache(neurocube.open_nifti(path, mask=brain_mask), store=tmp_path / "c")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    neurocube.cache(neurocube.open_nifti(path, mask=brain_mask), store=tmp_path / "c")
    assert len(_entries(tmp_path / "c")) == 2


def test_rewritten_source_with_same_size_and_mtime_gives_a_new_entry(
    tmp_path, brain_mask, monkeypatch
):
    path = make_betas(tmp_path / "b.nii")
    old = neurocube.cache(neurocube.open_nifti(path, mask=brain_mask), store=tmp_path / "c")
    # Rewrite the file with other values but the same size, and put the old mtime back:
    # only the hash of the file's ends can tell. (file_identity memoises per path, size and
    # mtime within a process, so start from an empty memo, as a new session would.)
    stat = path.stat()
    make_betas(path, offset=0.5)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    monkeypatch.setattr(identities, "_IDENTITY_CACHE", {})
    new = neurocube.cache(neurocube.open_nifti(path, mask=brain_mask), store=tmp_path / "c")
    assert len(_entries(tmp_path / "c")) == 2
    np.testing.assert_array_equal(new.data.values, oracle_masked(SHAPE, brain_mask, offset=0.5))
    np.testing.assert_array_equal(old.data.values, oracle_masked(SHAPE, brain_mask))


def _plain_dataset(values: np.ndarray, chunks) -> xr.Dataset:
    n_trial, n_vox = values.shape
    return xr.Dataset(
        {"data": (("trial", "voxel"), da.from_array(values, chunks=chunks))},
        coords={
            "trial": np.arange(n_trial),
            "image_name": ("trial", np.array([f"img{t:03d}.jpg" for t in range(n_trial)])),
            "shared": ("trial", np.arange(n_trial) % 2 == 0),
            "label": ("trial", np.array([f"s{t}" for t in range(n_trial)], dtype=object)),
            "x": ("voxel", np.linspace(-1, 1, n_vox)),
        },
        attrs={"neurocube_sources": [], "grid_shape": [2, 3, 4], "note": "plain"},
    )


def test_dtypes_nan_strings_and_irregular_chunks_round_trip(tmp_path):
    values = np.arange(7 * 5, dtype=np.float64).reshape(7, 5)
    values[2, 3] = np.nan
    ds = _plain_dataset(values, chunks=((2, 4, 1), (5,)))  # not storable as is in Zarr
    ds["count"] = (("trial",), da.from_array(np.array([0, 3, 0, -2, 7, 0, 1], np.int16), chunks=3))
    cached = neurocube.cache(ds, store=tmp_path, key="plain")
    xr.testing.assert_identical(cached.compute(), ds.compute())
    assert cached.image_name.dtype == np.dtype("<U10")
    assert cached.label.dtype == object
    assert cached["count"].dtype == np.int16
    # Irregular chunks were regularised to the largest block (4), and blocks this small merged.
    assert cached.data.chunks == ((7,), (5,))


@pytest.mark.parametrize(
    ("min_bytes", "expected"),
    [
        (100, (4,) * 10),  # a block of 4 x 10 float64 is 320 bytes: kept
        (1000, (16, 16, 8)),  # ceil(1000 / 320) = 4 blocks per stored chunk
        (10**9, (40,)),  # never more than the whole axis
    ],
)
def test_small_blocks_are_merged_along_the_first_dim(tmp_path, monkeypatch, min_bytes, expected):
    from neurocube.caching import core

    monkeypatch.setattr(core, "MIN_CHUNK_BYTES", min_bytes)
    values = np.arange(40 * 10, dtype=np.float64).reshape(40, 10)
    ds = _plain_dataset(values, chunks=(4, 10))
    cached = neurocube.cache(ds, store=tmp_path, key=f"m{min_bytes}")
    assert cached.data.chunks == (expected, (10,))
    np.testing.assert_array_equal(cached.data.values, values)
    np.testing.assert_array_equal(cached.trial.values, ds.trial.values)


def test_dataarray_round_trip_keeps_name_and_attrs(tmp_path):
    ds = _plain_dataset(np.ones((4, 3)), chunks=2)
    arr = ds.data.assign_attrs(units="psc", neurocube_sources=[]).rename("beta")
    cached = neurocube.cache(arr, store=tmp_path, key="arr")
    assert isinstance(cached, xr.DataArray)
    assert cached.name == "beta"
    xr.testing.assert_identical(cached.compute(), arr.compute())
    unnamed = arr.rename(None)
    assert neurocube.cache(unnamed, store=tmp_path, key="unnamed").name is None


def test_numpy_backed_dataset_is_cached_too(tmp_path):
    ds = _plain_dataset(np.ones((4, 3)), chunks=2).compute()
    cached = neurocube.cache(ds, store=tmp_path, key="eager")
    xr.testing.assert_identical(cached.compute(), ds)


def test_no_sources_warns_that_staleness_is_not_detected(tmp_path):
    ds = xr.Dataset({"v": ("t", da.arange(6, chunks=3))})
    with pytest.warns(NeurocubeWarning, match="cannot be detected"):
        cached = neurocube.cache(ds, store=tmp_path)
    np.testing.assert_array_equal(cached.v.values, np.arange(6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        neurocube.cache(ds, store=tmp_path, key="named")  # a chosen name: no warning


def test_user_key_rebuilds_when_inputs_change(tmp_path):
    first = xr.Dataset({"v": ("t", da.arange(4, chunks=2))}, attrs={"neurocube_sources": []})
    assert neurocube.cache(first, store=tmp_path, key="mine").v.values.tolist() == [0, 1, 2, 3]
    second = first + 10
    second.attrs = first.attrs
    rebuilt = neurocube.cache(second, store=tmp_path, key="mine")
    assert rebuilt.v.values.tolist() == [10, 11, 12, 13]
    assert [p.name for p in _entries(tmp_path)] == ["mine.zarr"]


def test_overwrite_rebuilds(tmp_path, betas_path):
    ds = neurocube.open_nifti(betas_path)
    first = neurocube.cache(ds, store=tmp_path)
    created = json.loads((_entries(tmp_path)[0] / MARKER_NAME).read_text())["created_unix"]
    again = neurocube.cache(ds, store=tmp_path, overwrite=True)
    marker = json.loads((_entries(tmp_path)[0] / MARKER_NAME).read_text())
    assert marker["created_unix"] >= created
    np.testing.assert_array_equal(again.data.values, first.data.values)
    assert len(_entries(tmp_path)) == 1
    # A rebuilt entry gets new Dask names (no stale results from Dask's or a cluster's memory).
    assert again.data.data.name != first.data.data.name


def test_default_store_is_the_cache_folder(betas_path):
    neurocube.cache(neurocube.open_nifti(betas_path))
    root = neurocube.config.cache_dir() / "zarr"
    (entry,) = _entries(root)
    assert entry.name == f"{neurocube.open_nifti(betas_path).neuro.cache_key()}.zarr"


def test_fsspec_url_store(betas_path, brain_mask):
    import fsspec

    ds = neurocube.open_nifti(betas_path, mask=brain_mask)
    cached = neurocube.cache(ds, store="memory://nc-test-cache")
    np.testing.assert_array_equal(cached.data.values, oracle_masked(SHAPE, brain_mask))
    key = fingerprint(ds).key
    fs = fsspec.filesystem("memory")
    assert fs.exists(f"/nc-test-cache/{key}.zarr/{MARKER_NAME}")
    info = neurocube.cache_info(store="memory://nc-test-cache")
    assert info["key"].tolist() == [key]
    assert neurocube.cache(ds, store="memory://nc-test-cache").data.values.sum() == pytest.approx(
        oracle_masked(SHAPE, brain_mask).sum()
    )
    neurocube.clear_cache(store="memory://nc-test-cache")
    assert not fs.exists(f"/nc-test-cache/{key}.zarr")


def test_file_url_store_is_local(betas_path, tmp_path):
    neurocube.cache(neurocube.open_nifti(betas_path), store=f"file://{tmp_path}/c")
    assert len(_entries(tmp_path / "c")) == 1


@pytest.mark.parametrize("bad", ["../escape", ".hidden", "a/b", "x.zarr", "", "k" * 129])
def test_bad_keys_are_refused(tmp_path, bad):
    ds = xr.Dataset({"v": ("t", np.arange(3))}, attrs={"neurocube_sources": []})
    with pytest.raises(CacheError, match="not usable as an entry name"):
        neurocube.cache(ds, store=tmp_path, key=bad)


def test_not_xarray_is_refused(tmp_path):
    with pytest.raises(CacheError, match="expects an xarray Dataset or DataArray, got ndarray"):
        neurocube.cache(np.arange(3), store=tmp_path)  # type: ignore[arg-type]


def test_unwritable_cache_folder_names_the_fix(tmp_path):
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    ds = xr.Dataset({"v": ("t", np.arange(3))}, attrs={"neurocube_sources": []})
    with pytest.raises(CacheError, match=r"cannot create the cache folder.*NEUROCUBE_CACHE_DIR"):
        neurocube.cache(ds, store=blocker / "sub", key="k")


def test_unhashable_object_asks_for_a_key(tmp_path):
    import threading

    ds = xr.Dataset({"v": ("t", np.arange(3))}, attrs={"neurocube_sources": []})
    ds.v.attrs["lock"] = threading.Lock()  # nothing Dask can hash the same way twice
    with pytest.raises(CacheError, match="Pass key="):
        neurocube.cache(ds, store=tmp_path)
    # With a key the fingerprint is skipped; Zarr then refuses the attribute, and the
    # interrupted write leaves nothing behind.
    with pytest.raises(TypeError, match="Invalid attribute"):
        neurocube.cache(ds, store=tmp_path, key="locked")
    assert list(tmp_path.iterdir()) == []


def test_missing_source_file_is_reported(tmp_path):
    gone = str(tmp_path / "gone.nii")
    ds = xr.Dataset({"v": ("t", np.arange(3))}, attrs={"neurocube_sources": [gone]})
    with pytest.raises(neurocube.errors.DataNotFoundError, match=r"gone\.nii: no such file"):
        neurocube.cache(ds, store=tmp_path)


def test_a_failed_compute_leaves_no_entry(tmp_path):
    def boom(block):
        raise RuntimeError("chunk failed")

    ds = xr.Dataset(
        {"v": ("t", da.arange(6, chunks=3).map_blocks(boom, dtype=int))},
        attrs={"neurocube_sources": []},
    )
    with pytest.raises(RuntimeError, match="chunk failed"):
        neurocube.cache(ds, store=tmp_path, key="fails")
    assert list(tmp_path.iterdir()) == []


def test_open_cached_by_key_checks_the_sources(tmp_path, brain_mask):
    path = make_betas(tmp_path / "b.nii")
    ds = neurocube.open_nifti(path, mask=brain_mask)
    cached = neurocube.cache(ds, store=tmp_path / "c", key="sub01-brain")
    reopened = neurocube.open_cached("sub01-brain", store=tmp_path / "c")
    xr.testing.assert_identical(reopened.compute(), cached.compute())
    assert neurocube.cache_info(store=tmp_path / "c")["hits"].tolist() == [2]
    # A derived key works too.
    derived = neurocube.cache(ds, store=tmp_path / "d")
    key = fingerprint(ds).key
    assert neurocube.open_cached(key, store=tmp_path / "d").data.data.name == derived.data.data.name

    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(CacheError, match=r"'sub01-brain' is stale: .*b\.nii changed"):
        neurocube.open_cached("sub01-brain", store=tmp_path / "c")
    path.unlink()
    with pytest.raises(CacheError, match=r"b\.nii, which is gone.*check_sources=False"):
        neurocube.open_cached("sub01-brain", store=tmp_path / "c")
    served = neurocube.open_cached("sub01-brain", store=tmp_path / "c", check_sources=False)
    np.testing.assert_array_equal(served.data.values, oracle_masked(SHAPE, brain_mask))


def test_open_cached_unknown_key(tmp_path):
    with pytest.raises(CacheError, match="no complete cache entry named 'nope'"):
        neurocube.open_cached("nope", store=tmp_path)
