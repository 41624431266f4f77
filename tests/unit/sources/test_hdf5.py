"""The HDF5 source: specs, handle pool, chunk layout, fancy keys; both readers on a cluster."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

import neurocube
from neurocube.errors import DataNotFoundError, FormatError
from neurocube.sources import hdf5 as h5src
from neurocube.sources.files import IO_STATS
from tests.unit.datasets.test_traces import write_traces

distributed = pytest.importorskip("distributed")

VALUES = np.arange(300 * 40, dtype=np.float64).reshape(300, 40) * 0.5


@pytest.fixture(scope="module")
def matrix_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("h5") / "m.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("m", data=VALUES, chunks=(32, 8), compression="gzip", compression_opts=4)
        h5.create_dataset("contiguous", data=VALUES[:10])
    return path


def spec_of(path, name="m"):
    key = h5src.stat_key(path)
    with h5py.File(path, "r") as h5:
        return h5src.HDF5DatasetSpec.from_dataset(h5[name], key)


def test_is_hdf5(tmp_path, matrix_file):
    assert h5src.is_hdf5(matrix_file)
    text = tmp_path / "t.h5"
    text.write_bytes(b"hello" * 200)
    assert not h5src.is_hdf5(text)
    assert not h5src.is_hdf5(tmp_path / "missing.h5")
    with_userblock = tmp_path / "ub.h5"
    with h5py.File(with_userblock, "w", userblock_size=512) as h5:
        h5["x"] = np.arange(3)
    assert h5src.is_hdf5(with_userblock)


def test_open_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"missing\.h5: no such file"):
        h5src.open_hdf5(tmp_path / "missing.h5")
    text = tmp_path / "t.h5"
    text.write_text("not hdf5")
    with pytest.raises(FormatError, match=r"t\.h5: expected an HDF5 file"):
        h5src.open_hdf5(text)
    with pytest.raises(FormatError, match="local paths only"):
        h5src.stat_key("s3://bucket/x.h5")


def test_open_counts_and_uses_swmr(matrix_file):
    before = IO_STATS.snapshot()[0]
    with h5src.open_hdf5(matrix_file) as h5:
        assert h5.swmr_mode
    assert IO_STATS.snapshot()[0] == before + 1


@pytest.mark.parametrize(
    ("shape", "hchunks", "itemsize", "target", "expected"),
    [
        ((160_000, 300), (2500, 38), 8, 64 * 2**20, (80_000, 76)),
        ((100, 10), (10, 5), 8, 1, (10, 5)),
        ((100, 10), (10, 5), 8, 10**9, (100, 10)),
        ((50, 3), None, 4, 10**9, (50, 3)),
        ((50, 3), None, 4, 24, (2, 3)),
        ((0, 3), (1, 3), 8, 100, (1, 3)),
    ],
)
def test_dask_chunks_for(shape, hchunks, itemsize, target, expected):
    assert h5src.dask_chunks_for(shape, hchunks, itemsize, target) == expected


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 500), st.integers(1, 60)),
    hchunks=st.tuples(st.integers(1, 64), st.integers(1, 16)),
    target=st.integers(8, 200_000),
)
def test_dask_chunks_are_whole_hdf5_chunks(shape, hchunks, target):
    block = h5src.dask_chunks_for(shape, hchunks, 8, target)
    for n, h, b in zip(shape, hchunks, block, strict=True):
        assert b == n or (b % min(h, n) == 0 and b <= n)
    base_bytes = min(hchunks[0], shape[0]) * min(hchunks[1], shape[1]) * 8
    assert np.prod(block) * 8 <= max(target, base_bytes)


def test_lazy_array_values_names_and_laziness(matrix_file, monkeypatch):
    spec = spec_of(matrix_file)
    IO_STATS.reset()
    arr = h5src.hdf5_dask_array(spec, target_bytes=8 * 64 * 16)
    assert arr.chunksize == (128, 8)  # rows doubled twice (10 -> 3 pieces), columns would pass
    assert arr.name == h5src.hdf5_dask_array(spec, target_bytes=8 * 64 * 16).name
    assert arr.name != h5src.hdf5_dask_array(spec).name  # other chunks, other keys
    sub = arr[[250, 3, 3, 100], 5:33:3] + 1
    assert IO_STATS.snapshot() == (0, 0)
    np.testing.assert_array_equal(sub.compute(), VALUES[[250, 3, 3, 100], 5:33:3] + 1)
    np.testing.assert_array_equal(arr[::-7, -1].compute(), VALUES[::-7, -1])
    contiguous = h5src.hdf5_dask_array(spec_of(matrix_file, "contiguous"))
    np.testing.assert_array_equal(contiguous.compute(), VALUES[:10])


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(st.integers(-300, 299), min_size=1, max_size=8),
    start=st.integers(0, 39),
    step=st.integers(1, 7),
)
def test_selections_match_numpy(matrix_file, rows, start, step):
    arr = h5src.hdf5_dask_array(spec_of(matrix_file), target_bytes=8 * 64 * 16)
    np.testing.assert_array_equal(
        arr[rows, start::step].compute(), VALUES[rows, start::step]
    )


def test_proxy_and_graph_pickle_without_handles(matrix_file):
    spec = spec_of(matrix_file)
    proxy = pickle.loads(pickle.dumps(h5src.HDF5ArrayProxy(spec)))
    np.testing.assert_array_equal(proxy[3:5, 1], VALUES[3:5, 1])
    assert len(h5src.HDF5_POOL) >= 1  # the read opened a pooled handle ...
    arr = h5src.hdf5_dask_array(spec)
    graph = dict(arr.__dask_graph__())
    assert b"h5py._hl.files" not in pickle.dumps(graph)  # ... which never enters a graph


def test_changed_file_is_reported(tmp_path):
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as h5:
        h5["m"] = np.zeros((10, 4))
    arr = h5src.hdf5_dask_array(spec_of(path))
    with h5py.File(path, "w") as h5:  # rewritten with another shape
        h5["m"] = np.zeros((12, 4))
    h5src.HDF5_POOL.clear()
    with pytest.raises(FormatError, match=r"was \(10, 4\) <f8 when opened, now \(12, 4\)"):
        arr.compute()


# -- both readers on a process-based cluster -----------------------------------------


def _pool_size() -> int:
    from neurocube.sources.hdf5 import HDF5_POOL

    return len(HDF5_POOL)


@pytest.fixture(scope="module")
def client():
    with (
        distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as cluster_client,
    ):
        yield cluster_client


def test_both_readers_on_a_cluster(client, tmp_path):
    spectral = tmp_path / "sub-01_hemi-L_spectral.h5"
    with h5py.File(spectral, "w") as h5:
        h5.create_dataset("eigenvectors", data=VALUES, chunks=(32, 8), compression="gzip")
        h5.create_dataset("eigenvalues", data=np.arange(40.0))
        h5.create_group("descriptors").create_dataset("hks", data=VALUES[:, :5] * 2, chunks=True)
        h5.attrs["spectralbrain_version"] = "0.1.0"
    traces = tmp_path / "traces.hdf5"
    write_traces(traces, n_per_origin=(30, 21), channels=2)
    h5src.HDF5_POOL.clear()

    ds = neurocube.open_spectral(spectral, chunks={"eigenvectors": (64, 16)})
    assert ds.eigenvectors.data.npartitions > 4
    on_cluster = ds.compute()
    xr.testing.assert_identical(on_cluster, ds.compute(scheduler="threads"))
    np.testing.assert_array_equal(on_cluster.eigenvectors.values, VALUES)

    tds = neurocube.open_traces(traces, traces_per_chunk=8)
    t_cluster = tds.compute()
    xr.testing.assert_identical(t_cluster, tds.compute(scheduler="threads"))
    with h5py.File(traces, "r") as h5:
        np.testing.assert_array_equal(t_cluster.data.values[35], h5["rec1.xdf/traces/5"][()])

    workers = client.run(_pool_size)
    assert len(workers) == 2 and sum(workers.values()) >= 2  # the workers opened the files
    assert Path(ds.attrs["neurocube_sources"][0]).is_absolute()
