"""Graphs that read every chunk of a masked NIfTI array.

``.values``, ``.compute()`` and ``ds.load()`` are rewritten into one task that
reads the whole array the way ``neurocube.load`` does (a forward pass per
thread); each chunk becomes a view of it. Graphs that consume every chunk
(``cache()``, a reduction over all trials) read the chunks of an indexed
``.nii.gz`` in one run per thread, each run front to back. Values are checked
against nibabel; the rewrites are checked on the optimized graph; anything that
needs only some chunks keeps its chunk tasks.
"""

from __future__ import annotations

import os
import time

import dask
import dask.array
import nibabel as nib
import numpy as np
import pytest
import xarray as xr

import neurocube
from neurocube.sources import nifti, pushdown


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
    real = nifti.read_whole_array

    def counting(source):
        calls.append(source[0])
        return real(source)

    monkeypatch.setattr(nifti, "read_whole_array", counting)
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
    stacked = nifti.concatenate_trials(arrays)
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
    monkeypatch.setattr(nifti, "read_whole_array", lambda source: calls.append(source))
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


def _run_tasks(array):
    """Chunk tasks chained in runs (before Dask fuses each into its only user)."""
    from dask._task_spec import convert_legacy_graph
    from dask.utils import ensure_dict

    keys = array.__dask_keys__()
    graph = convert_legacy_graph(ensure_dict(array.__dask_graph__()))
    graph = pushdown.read_chunks_as_runs(pushdown.push_down(graph), keys)
    return [k for k, v in graph.items() if getattr(v, "func", None) is nifti.read_run_chunk]


def _indexed(nifti_factory, tmp_path, shape, chunks=3):
    path = nifti_factory("betas.nii.gz", shape=shape)
    mask = _mask(shape)
    neurocube.open_nifti(path, mask=mask, cache_dir=tmp_path / "c").data.values  # noqa: B018
    ds = neurocube.open_nifti(path, mask=mask, cache_dir=tmp_path / "c", chunks=chunks)
    return path, mask, ds


def test_reductions_over_every_chunk_read_runs(nifti_factory, tmp_path):
    shape = (6, 5, 4, 20)
    path, mask, ds = _indexed(nifti_factory, tmp_path, shape)
    oracle = _oracle(path, mask).astype(np.float64)
    total = ds.data.sum("trial")
    assert len(_run_tasks(total.data)) == len(ds.data.chunks[0])
    with dask.config.set(scheduler="threads", num_workers=2):
        np.testing.assert_allclose(total.values, oracle.sum(0), rtol=1e-6)
        np.testing.assert_allclose(ds.data.std("trial").values, oracle.std(0), rtol=1e-5)


@pytest.mark.parametrize(
    "derived",
    [
        (lambda a: a.chunk(trial=7).sum("trial"), False),  # pieces of chunks: pushed down
        (lambda a: (a - a.mean("trial")).max("trial"), True),  # every chunk used twice
        (lambda a: a.cumsum("trial"), True),  # each chunk's result needs the previous ones
        (lambda a: a.chunk(trial=-1).std("trial"), True),  # one task uses every chunk
    ],
    ids=["rechunk", "twice", "cumsum", "one-chunk"],
)
def test_any_graph_over_every_chunk_reads_correctly(nifti_factory, tmp_path, derived):
    derived, runs = derived
    shape = (6, 5, 4, 20)
    path, mask, ds = _indexed(nifti_factory, tmp_path, shape)
    result = derived(ds.data)
    assert bool(_run_tasks(result.data)) == runs
    oracle = derived(xr.DataArray(_oracle(path, mask).astype(np.float64), dims=("trial", "voxel")))
    with dask.config.set(scheduler="threads", num_workers=2):
        np.testing.assert_allclose(result.values, oracle.values, rtol=1e-5, atol=1e-3)


def test_cache_reads_runs_and_keeps_values(nifti_factory, tmp_path):
    shape = (6, 5, 4, 20)
    path, mask, ds = _indexed(nifti_factory, tmp_path, shape)
    with dask.config.set(scheduler="threads", num_workers=2):
        cached = neurocube.cache(ds, store=tmp_path / "zarr", key="runs")
    np.testing.assert_array_equal(cached.data.values, _oracle(path, mask))


@pytest.mark.parametrize(
    "partial",
    [lambda a: a.isel(trial=slice(0, 9)).sum("trial"), lambda a: a.isel(trial=[1, 7, 19]).sum()],
    ids=["some-chunks", "pick"],
)
def test_graphs_reading_some_chunks_keep_chunk_reads(nifti_factory, tmp_path, partial):
    shape = (6, 5, 4, 20)
    path, mask, ds = _indexed(nifti_factory, tmp_path, shape)
    selected = partial(ds.data)
    assert _run_tasks(selected.data) == []
    oracle = partial(xr.DataArray(_oracle(path, mask), dims=("trial", "voxel")))
    np.testing.assert_allclose(selected.values, oracle.values, rtol=1e-6)


def test_a_run_over_damaged_data_names_the_file(tmp_path):
    from tests.fixtures.nifti import write_nifti

    shape = (40, 40, 40, 24)  # random values: ~6 MB of gzip, damage far from its first/last MiB
    values = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    path = write_nifti(tmp_path / "betas.nii.gz", values)
    mask = _mask(shape)
    neurocube.open_nifti(path, mask=mask, cache_dir=tmp_path / "c").data.values  # noqa: B018
    before = path.stat()
    raw = bytearray(path.read_bytes())
    pos = len(raw) // 2
    raw[pos : pos + 64] = bytes(64)
    path.write_bytes(bytes(raw))  # same size and mtime: the index is still taken as current
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    ds = neurocube.open_nifti(path, mask=mask, cache_dir=tmp_path / "c", chunks=4)
    assert _run_tasks(ds.data.sum("trial").data)
    with pytest.raises(neurocube.errors.CorruptDataError, match=r"betas\.nii\.gz.*volume"):
        ds.data.sum("trial").values  # noqa: B018


def test_chunk_runs_pickle_without_their_reader(nifti_factory, tmp_path):
    import pickle

    shape = (6, 5, 4, 12)
    path, mask, ds = _indexed(nifti_factory, tmp_path, shape)
    arr = nifti.chunk_runs_source(ds.data.data.name)
    assert arr is not None
    run = nifti.ChunkRun(arr)
    first = run.read(0, 3, last=False)  # the reader stays open for the next chunk
    copy = pickle.loads(pickle.dumps(run))
    assert copy._reader is None
    np.testing.assert_array_equal(np.concatenate([first, copy.read(3, 6, last=True)]),
                                  _oracle(path, mask)[:6])
    np.testing.assert_array_equal(run.read(3, 6, last=True), _oracle(path, mask)[3:6])
    assert run._reader is None


def test_run_reads_wait_for_their_chunks_to_be_used(nifti_factory, tmp_path):
    """Storing every chunk holds about one chunk per run, never the whole array."""
    from dask.callbacks import Callback

    shape = (6, 5, 4, 60)
    path, mask, ds = _indexed(nifti_factory, tmp_path, shape, chunks=2)
    data = ds.data.data
    alive: set[int] = set()
    most = [0]

    class Track(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            if isinstance(key, tuple) and key[0] == data.name:
                alive.add(key[1])
            elif isinstance(key, tuple) and str(key[0]).startswith("store-map"):
                alive.discard(key[1])
            most[0] = max(most[0], len(alive))

    class SlowTarget:  # a slow consumer (compression, a remote store)
        def __init__(self):
            self.values = np.empty(data.shape, data.dtype)
            self.shape, self.dtype, self.ndim = data.shape, data.dtype, data.ndim

        def __setitem__(self, key, value):
            time.sleep(0.02)
            self.values[key] = value

    slow = SlowTarget()
    stored = dask.array.store(data, slow, lock=False, compute=False)
    assert _run_tasks(stored)
    with Track(), dask.config.set(scheduler="threads", num_workers=2):
        stored.compute()
    np.testing.assert_array_equal(slow.values, _oracle(path, mask))
    assert len(data.chunks[0]) == 30
    assert most[0] <= 3  # one chunk per run (two runs), and one being handed over
