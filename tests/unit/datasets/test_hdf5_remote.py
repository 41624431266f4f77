"""open_spectral(_many) and open_traces on s3:// and http:// URLs, against the local reads."""

from __future__ import annotations

import pickle
import shutil

import h5py
import numpy as np
import pytest
import xarray as xr

import neurocube
from neurocube import storage
from neurocube.errors import AccessDeniedError, DataChangedError, DataNotFoundError, FormatError
from neurocube.sources import hdf5 as h5src
from neurocube.sources import hdf5_handles as h5handles
from tests.fixtures.remote import SECRET
from tests.unit.datasets.test_spectral import FULL, write_cache
from tests.unit.datasets.test_traces import DATA as TRACE_DATA
from tests.unit.datasets.test_traces import write_traces


@pytest.fixture(autouse=True)
def _fresh_pool():
    """Every test opens its files itself (no handle or block left by another test)."""
    h5handles.HDF5_POOL.clear()
    storage.SHARED_BLOCKS.clear()
    yield
    h5handles.HDF5_POOL.clear()


def assert_same_dataset(remote: xr.Dataset, local: xr.Dataset, url: str | list[str]) -> None:
    """Every variable and coord equal (values, dtype, dims); attrs equal but for the sources."""
    assert set(remote.variables) == set(local.variables)
    for name in local.variables:
        assert remote[name].dims == local[name].dims, name
        assert remote[name].dtype == local[name].dtype, name
        np.testing.assert_array_equal(remote[name].values, local[name].values, err_msg=name)
    sources = remote.attrs["neurocube_sources"]
    assert sources == (url if isinstance(url, list) else [url])
    strip = {"neurocube_sources"}
    assert {k: v for k, v in remote.attrs.items() if k not in strip} == {
        k: v for k, v in local.attrs.items() if k not in strip
    }


def big_spectral(path, n_vertices=40_000, n_modes=60):
    """A cache whose eigenvectors (~19 MB of noise, barely compressible) dwarf its metadata."""
    values = np.random.default_rng(3).normal(size=(n_vertices, n_modes))
    with h5py.File(path, "w") as h5:
        h5.create_dataset("eigenvalues", data=np.arange(n_modes, dtype=np.float64))
        h5.create_dataset("eigenvectors", data=values, chunks=(2500, 20), compression="gzip",
                          compression_opts=1)  # fmt: skip
        h5.create_dataset("vertices", data=values[:, :3], chunks=True, compression="gzip")
        h5.create_group("descriptors").create_dataset(
            "hks", data=values[:, :4] * 2, chunks=(4096, 4)  # plain chunks, no filter
        )
        h5.attrs["subject"] = "sub-01"
        h5.attrs["spectralbrain_version"] = "0.1.0"
    return values


# -- spectral ------------------------------------------------------------------------------


def test_sample_spectral_from_s3_equals_local(s3):
    url = s3.put(FULL, "derivatives/sub-01/sub-01_lh_white_spectral.h5")
    ds = neurocube.open_spectral(url, storage_options=s3.storage_options)
    assert_same_dataset(ds, neurocube.open_spectral(FULL), url)
    text = repr(ds) + repr(ds.attrs) + str(dict(ds.eigenvectors.data.dask))
    assert SECRET not in text and "neurocube-test-key" not in text


def test_generated_spectral_from_s3_reads_metadata_then_chunks(s3, tmp_path):
    path = tmp_path / "sub-01_hemi-L_spectral.h5"
    values = big_spectral(path)
    size = path.stat().st_size
    url = s3.put(path, "spec/sub-01_hemi-L_spectral.h5")
    ds = neurocube.open_spectral(url, storage_options=s3.storage_options)
    opened = s3.counter.total_bytes
    assert opened < size / 20, (opened, size)  # metadata only: a few blocks, not the data
    assert s3.counter.count("GET") <= 12
    sub = ds.eigenvectors.isel(vertex=slice(10_000, 12_500), mode=slice(0, 20))
    assert s3.counter.total_bytes == opened  # building graphs reads nothing
    np.testing.assert_array_equal(sub.values, values[10_000:12_500, :20])
    assert s3.counter.total_bytes - opened < size / 10  # one stored chunk (and its index)
    local = neurocube.open_spectral(path)
    assert_same_dataset(ds, local, url)
    picked = np.array([3, 39_999, 17, 20_000])
    np.testing.assert_array_equal(  # index lists and strides go to h5py over the shared blocks
        ds.eigenvectors.isel(vertex=picked, mode=slice(1, 60, 7)).values,
        values[picked][:, 1:60:7],
    )
    np.testing.assert_array_equal(ds.hks.values, values[:, :4] * 2)


def test_spectral_many_from_s3(s3, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for seed, hemi in enumerate(("L", "R")):
        write_cache(folder / f"sub-01_hemi-{hemi}_spectral.h5", seed=seed)
    base = s3.put(folder, "many")
    urls = [f"{base}/sub-01_hemi-{h}_spectral.h5" for h in ("L", "R")]
    ds = neurocube.open_spectral_many(urls, storage_options=s3.storage_options)
    local = neurocube.open_spectral_many(sorted(folder.iterdir()))
    assert_same_dataset(ds, local, urls)
    assert list(ds.hemi.values) == ["L", "R"]


def test_spectral_over_http(http_files):
    shutil.copy(FULL, http_files.root / "sub-01_lh_white_spectral.h5")
    url = http_files.url + "/sub-01_lh_white_spectral.h5"
    assert neurocube.datasets.spectral.guess_spectral(url)
    ds = neurocube.open_spectral(url)
    assert_same_dataset(ds, neurocube.open_spectral(FULL), url)
    assert http_files.counter.count("GET") > 0


def test_missing_and_denied_objects(s3, tmp_path):
    with pytest.raises(DataNotFoundError, match=rf"s3://{s3.name}/nope\.h5"):
        neurocube.open_spectral(f"{s3.url}/nope.h5", storage_options=s3.storage_options)
    with pytest.raises(DataNotFoundError, match=rf"s3://{s3.name}/nope\.hdf5"):
        neurocube.open_traces(f"{s3.url}/nope.hdf5", storage_options=s3.storage_options)
    url = s3.put(FULL, "held-out/sub-02_lh_spectral.h5")
    traces = tmp_path / "t.hdf5"
    write_traces(traces)
    turl = s3.put(traces, "held-out/t.hdf5")
    s3.proxy.deny.append("held-out/")
    for opener, target in ((neurocube.open_spectral, url), (neurocube.open_traces, turl)):
        with pytest.raises(AccessDeniedError, match="access denied") as info:
            opener(target, storage_options=s3.storage_options)
        assert target in str(info.value) and SECRET not in str(info.value)
    text = tmp_path / "text.h5"
    text.write_bytes(b"not an HDF5 file at all" * 100)
    turl = s3.put(text, "text.h5")
    with pytest.raises(FormatError, match=r"text\.h5: expected an HDF5 file"):
        neurocube.open_spectral(turl, storage_options=s3.storage_options)
    assert not neurocube.datasets.spectral.guess_spectral(turl, s3.storage_options)


def test_specs_pickle_with_their_options_and_read_in_a_fresh_pool(s3, tmp_path):
    path = tmp_path / "sub-01_lh_spectral.h5"
    values = big_spectral(path, n_vertices=6000, n_modes=20)
    url = s3.put(path, "p/sub-01_lh_spectral.h5")
    ds = neurocube.open_spectral(url, storage_options=s3.storage_options)
    (key,) = [k for k in ds.eigenvectors.data.dask if k[0].startswith("hdf5-")][:1] or [None]
    proxy = next(
        v for v in ds.eigenvectors.data.dask.values() if isinstance(v, h5src.HDF5ArrayProxy)
    )
    spec = proxy.spec
    assert spec.path == url and spec.version and spec.storage_options == s3.storage_options
    assert SECRET not in repr(spec) and SECRET not in ds.eigenvectors.data.name
    again = pickle.loads(pickle.dumps(spec))
    assert again == spec and again.storage_options.as_dict() == s3.storage_options
    h5handles.HDF5_POOL.clear()  # as a worker process would: no handle, options from the spec
    storage.SHARED_BLOCKS.clear()
    np.testing.assert_array_equal(h5src.read_selection(again, (slice(0, 100), 3)), values[:100, 3])
    assert len(h5handles.HDF5_POOL) == 1
    assert key is None or key[0] == ds.eigenvectors.data.name


def test_a_changed_object_is_an_error_not_new_values(s3, tmp_path):
    path = tmp_path / "sub-01_lh_spectral.h5"
    write_cache(path, n_vertices=50)
    url = s3.put(path, "c/sub-01_lh_spectral.h5")
    ds = neurocube.open_spectral(url, storage_options=s3.storage_options)
    write_cache(path, n_vertices=50, seed=7)
    s3.put(path, "c/sub-01_lh_spectral.h5")  # a new version: another ETag
    h5handles.HDF5_POOL.clear()  # as in a worker process that has not opened nor checked it yet
    storage.SHARED_BLOCKS.clear()
    storage.identities._CHECKED.clear()
    with pytest.raises(DataChangedError, match="changed since it was opened"):
        ds.eigenvectors.compute()


def test_access_lost_mid_read_is_our_error_on_both_paths(s3, tmp_path):
    path = tmp_path / "sub-01_lh_spectral.h5"
    big_spectral(path, n_vertices=6000, n_modes=20)
    url = s3.put(path, "lost/sub-01_lh_spectral.h5")
    ds = neurocube.open_spectral(url, storage_options=s3.storage_options)
    s3.proxy.deny.append("lost/")
    storage.SHARED_BLOCKS.clear()
    with pytest.raises(AccessDeniedError, match=r"lost/sub-01_lh_spectral\.h5"):
        ds.eigenvectors.compute()  # stored chunks by range requests
    with pytest.raises(AccessDeniedError, match=r"lost/sub-01_lh_spectral\.h5"):
        ds.eigenvectors[::2].compute()  # h5py reading through the shared blocks


# -- traces --------------------------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [True, False])
def test_sample_traces_from_s3_equal_local(s3, use_cache):
    for path in sorted(TRACE_DATA.glob("*.hdf5")):
        url = s3.put(path, f"traces/{path.name}")
        ds = neurocube.open_traces(url, storage_options=s3.storage_options, use_cache=use_cache)
        assert_same_dataset(ds, neurocube.open_traces(path, use_cache=use_cache), url)
        if use_cache:  # the catalog is kept by URL + ETag: a second open reads no attribute
            s3.counter.reset()
            again = neurocube.open_traces(url, storage_options=s3.storage_options)
            assert again.identical(ds)
            assert s3.counter.count("GET") == 0


def test_generated_traces_from_s3_and_http(s3, http_files, tmp_path):
    path = tmp_path / "long.hdf5"
    write_traces(path, n_per_origin=(6, 3), channels=2, lengths=lambda o, t: 100_000 + 7 * t)
    size = path.stat().st_size
    url = s3.put(path, "t/long.hdf5")
    ds = neurocube.open_traces(url, storage_options=s3.storage_options, traces_per_chunk=2)
    opened = s3.counter.total_bytes
    assert opened < size / 8, (opened, size)  # attributes and headers, not the samples
    local = neurocube.open_traces(path, traces_per_chunk=2)
    assert_same_dataset(ds, local, url)
    np.testing.assert_array_equal(
        ds.data.isel(trace=[7, 1]).values, local.data.isel(trace=[7, 1]).values
    )
    text = repr(ds) + repr(ds.attrs) + repr(ds.data.data.dask)
    assert SECRET not in text
    shutil.copy(path, http_files.root / "long.hdf5")
    hds = neurocube.open_traces(http_files.url + "/long.hdf5", use_cache=False)
    assert_same_dataset(hds, local, http_files.url + "/long.hdf5")


# -- process workers read with the options the specs carry ---------------------------------


def _pool_size() -> int:
    from neurocube.sources.hdf5_handles import HDF5_POOL

    return len(HDF5_POOL)


def test_process_workers_read_s3_with_the_specs_options(s3, tmp_path):
    distributed = pytest.importorskip("distributed")
    spectral = tmp_path / "sub-01_hemi-L_spectral.h5"
    values = big_spectral(spectral, n_vertices=8000, n_modes=40)
    traces = tmp_path / "traces.hdf5"
    write_traces(traces, n_per_origin=(30, 21), channels=2)
    surl = s3.put(spectral, "w/sub-01_hemi-L_spectral.h5")
    turl = s3.put(traces, "w/traces.hdf5")
    ds = neurocube.open_spectral(
        surl, storage_options=s3.storage_options, chunks={"eigenvectors": (2500, 20)}
    )
    tds = neurocube.open_traces(turl, storage_options=s3.storage_options, traces_per_chunk=8)
    with (
        distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=2, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        on_cluster = ds.compute()
        t_cluster = tds.compute()
        workers = client.run(_pool_size)
    np.testing.assert_array_equal(on_cluster.eigenvectors.values, values)
    assert_same_dataset(on_cluster, neurocube.open_spectral(spectral), surl)
    assert_same_dataset(t_cluster, neurocube.open_traces(traces), turl)
    assert sum(workers.values()) >= 2  # the workers opened the objects themselves


def test_a_damaged_global_heap_of_a_remote_trace_cache_is_refused(tmp_path, s3):
    from tests.unit.sources.test_hdf5_safety import _string_attr_traces, _zero_free_space

    path = tmp_path / "heap.hdf5"
    _string_attr_traces(path)
    _zero_free_space(path)
    url = s3.put(path, "heap/t.hdf5")
    with pytest.raises(FormatError, match=r"t\.hdf5: expected global heap collections"):
        neurocube.open_traces(url, storage_options=s3.storage_options, use_cache=False)
