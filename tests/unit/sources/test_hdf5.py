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
from neurocube.errors import DataNotFoundError, FormatError, SourceChangedError
from neurocube.sources import hdf5 as h5src
from neurocube.sources import hdf5_handles as h5handles
from neurocube.storage import IO_STATS
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
    key = h5handles.stat_key(path)
    with h5py.File(path, "r") as h5:
        return h5src.HDF5DatasetSpec.from_dataset(h5[name], key)


def test_is_hdf5(tmp_path, matrix_file):
    assert h5handles.is_hdf5(matrix_file)
    text = tmp_path / "t.h5"
    text.write_bytes(b"hello" * 200)
    assert not h5handles.is_hdf5(text)
    assert not h5handles.is_hdf5(tmp_path / "missing.h5")
    with_userblock = tmp_path / "ub.h5"
    with h5py.File(with_userblock, "w", userblock_size=512) as h5:
        h5["x"] = np.arange(3)
    assert h5handles.is_hdf5(with_userblock)


def test_open_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"missing\.h5: no such file"):
        h5handles.open_hdf5(tmp_path / "missing.h5")
    text = tmp_path / "t.h5"
    text.write_text("not hdf5")
    with pytest.raises(FormatError, match=r"t\.h5: expected an HDF5 file"):
        h5handles.open_hdf5(text)
    with pytest.raises(DataNotFoundError, match="is a folder, expected an HDF5 file"):
        h5handles.open_hdf5(tmp_path)


def test_open_counts_and_uses_swmr(matrix_file):
    before = IO_STATS.snapshot()[0]
    with h5handles.open_hdf5(matrix_file) as h5:
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
    assert len(h5handles.HDF5_POOL) >= 1  # the read opened a pooled handle ...
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
    h5handles.HDF5_POOL.clear()
    with pytest.raises(SourceChangedError, match=r"c\.h5: changed since it was opened"):
        arr.compute()


# -- both readers on a process-based cluster -----------------------------------------


def _pool_size() -> int:
    from neurocube.sources.hdf5_handles import HDF5_POOL

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
    h5handles.HDF5_POOL.clear()

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


# -- stored chunks inflated outside h5py's lock -------------------------------------------

BIG = np.random.default_rng(5).normal(size=(203, 150))  # chunks (64, 64) f8: 32 KiB each
CUBE = np.arange(10 * 40 * 50, dtype=np.float64).reshape(10, 40, 50)
INTS = np.arange(150 * 100, dtype=">i4").reshape(150, 100)


@pytest.fixture(scope="module")
def direct_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("h5direct") / "d.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("deflate", data=BIG, chunks=(64, 64), compression="gzip",
                          compression_opts=4)  # fmt: skip
        h5.create_dataset("cube", data=CUBE, chunks=(4, 40, 50), compression="gzip")
        h5.create_dataset("plain", data=INTS, chunks=(96, 96))  # big-endian, no filter
        h5.create_dataset("shuffle", data=BIG, chunks=(64, 64), compression="gzip", shuffle=True)
        h5.create_dataset("small", data=BIG, chunks=(16, 16), compression="gzip")
        sparse = h5.create_dataset("sparse", shape=BIG.shape, dtype="f8", chunks=(64, 64),
                                   compression="gzip", fillvalue=-1.0)  # fmt: skip
        sparse[:64, :64] = BIG[:64, :64]  # the first chunk only; the rest is never written
        skipped = h5.create_dataset("skipped", data=BIG, chunks=(64, 64), compression="gzip")
        raw = np.ascontiguousarray(BIG[64:128, 0:64] * 2)
        skipped.id.write_direct_chunk((64, 0), raw.tobytes(), filter_mask=1)  # stored raw
        broken = h5.create_dataset("broken", data=BIG, chunks=(64, 64), compression="gzip")
        broken.id.write_direct_chunk((0, 64), b"not deflate at all", filter_mask=0)
    return path


BLOCK_KEYS = [
    (slice(None), slice(None)),
    (slice(10, 150), slice(0, 20)),
    (slice(60, 70), slice(60, 70)),  # across four chunks
    (slice(200, 203), slice(140, 150)),  # the partial edge chunk only
    (5, slice(3, 149)),
    (slice(0, 203), -1),
    (-3, 77),
    slice(63, 65),
    17,
]


@pytest.mark.parametrize("key", BLOCK_KEYS, ids=repr)
def test_direct_reads_match_h5py(direct_file, key, monkeypatch):
    spec = spec_of(direct_file, "deflate")
    with h5py.File(direct_file, "r") as h5:
        expected = h5["deflate"][key]
        assert h5src._direct_plan(h5["deflate"], spec, key) is not None  # the path under test
    got = h5src.read_selection(spec, key)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)
    monkeypatch.setattr(h5src, "DIRECT_BATCH_BYTES", 1)  # one chunk per turn of the lock
    np.testing.assert_array_equal(h5src.read_selection(spec, key), expected)


@pytest.mark.parametrize(
    ("name", "key", "expected"),
    [
        ("cube", (slice(3, 9), 7, slice(10, 50)), CUBE[3:9, 7, 10:50]),
        ("cube", (9, slice(None), 0), CUBE[9, :, 0]),
        ("plain", (slice(90, 150), slice(50, 100)), INTS[90:150, 50:100]),
        ("skipped", (slice(60, 130), slice(0, 70)), None),
    ],
)
def test_direct_reads_other_layouts(direct_file, name, key, expected):
    spec = spec_of(direct_file, name)
    with h5py.File(direct_file, "r") as h5:
        oracle = h5[name][key]
        assert h5src._direct_plan(h5[name], spec, key) is not None
    got = h5src.read_selection(spec, key)
    assert got.dtype == oracle.dtype  # big-endian stays big-endian, as h5py returns it
    np.testing.assert_array_equal(got, oracle)
    if expected is not None:
        np.testing.assert_array_equal(got, expected)
    if name == "skipped":  # the chunk stored without its filter holds the doubled values
        np.testing.assert_array_equal(got[4:68, :64], BIG[64:128, :64] * 2)


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("shuffle", (slice(0, 100), slice(None))),  # another filter: h5py decodes
        ("small", (slice(0, 100), slice(None))),  # chunks under DIRECT_CHUNK_MIN_BYTES
        ("deflate", (slice(0, 100, 2), slice(None))),  # strided
        ("deflate", ([1, 5, 9], slice(None))),  # an index list
        ("deflate", (slice(5, 5), slice(None))),  # empty
        ("contiguous", (slice(0, 5),)),
    ],
)
def test_h5py_reads_what_the_direct_path_does_not(direct_file, matrix_file, name, key):
    path = matrix_file if name == "contiguous" else direct_file
    spec = spec_of(path, name)
    with h5py.File(path, "r") as h5:
        assert h5src._direct_plan(h5[name], spec, key) is None
        expected = h5[name][key]
    np.testing.assert_array_equal(h5src.read_selection(spec, key), expected)


def test_unwritten_chunks_read_their_fill_value(direct_file, monkeypatch):
    spec = spec_of(direct_file, "sparse")
    expected = np.full(BIG.shape, -1.0)
    expected[:64, :64] = BIG[:64, :64]
    for batch_bytes in (h5src.DIRECT_BATCH_BYTES, 1):  # found missing in the first/a later turn
        monkeypatch.setattr(h5src, "DIRECT_BATCH_BYTES", batch_bytes)
        np.testing.assert_array_equal(h5src.read_selection(spec, (slice(None),) * 2), expected)
        np.testing.assert_array_equal(h5src.read_selection(spec, (slice(0, 64), 3)), BIG[:64, 3])


def test_damaged_chunk_is_reported(direct_file):
    spec = spec_of(direct_file, "broken")
    np.testing.assert_array_equal(
        h5src.read_selection(spec, (slice(0, 64), slice(0, 64))), BIG[:64, :64]
    )
    with pytest.raises(FormatError, match=r"d\.h5: chunk \(0, 64\) of '/broken' does not inflate"):
        h5src.read_selection(spec, (slice(0, 64), slice(60, 70)))


def test_spectral_selections_through_threads_match_h5py(tmp_path):
    """The benchmark's selections, on a cache chunked as its original writer does."""
    path = tmp_path / "sub-01_lh_spectral.h5"
    values = np.random.default_rng(6).normal(size=(20_000, 60))
    with h5py.File(path, "w") as h5:
        h5.create_dataset("eigenvectors", data=values, chunks=True, compression="gzip",
                          compression_opts=4)  # fmt: skip
        h5.attrs["spectralbrain_version"] = "0.1.0"
        assert h5["eigenvectors"].chunks[0] * h5["eigenvectors"].chunks[1] * 8 >= (
            h5src.DIRECT_CHUNK_MIN_BYTES
        )
    IO_STATS.reset()
    ds = neurocube.open_spectral(path, chunks={"eigenvectors": (5000, 30)})
    assert IO_STATS.snapshot()[1] == 0  # opening reads no array data
    scattered = np.sort(np.random.default_rng(2).choice(20_000, 300, replace=False))
    with h5py.File(path, "r") as h5:
        dset = h5["eigenvectors"]
        cases = [
            ({"vertex": slice(5000, 7500)}, dset[5000:7500]),
            ({"mode": slice(0, 20)}, dset[:, 0:20]),
            ({"vertex": scattered}, dset[scattered]),
            ({}, dset[()]),
        ]
    for selection, expected in cases:
        np.testing.assert_array_equal(
            ds.eigenvectors.isel(selection).compute(scheduler="threads").values, expected
        )
