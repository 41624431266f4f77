"""neurocube.batches: every row once per epoch, aligned, reproducible, each chunk read once,
memory within buffer + prefetch chunks, nothing read before the first batch."""

from __future__ import annotations

import gc
import pickle
import threading
import tracemalloc
import weakref

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

import neurocube
from neurocube.errors import SelectionError
from neurocube.ops.batches import BlockReader


class CountingSource:
    """A (trial, feature) array whose row t, column v holds ``t * 1000 + v``.

    Counts reads per first row, and how many of the arrays it handed out are still alive.
    """

    def __init__(self, n: int, width: int = 3, dtype: str = "float64") -> None:
        self.shape = (n, width)
        self.dtype = np.dtype(dtype)
        self.ndim = 2
        self.reads: dict[int, int] = {}
        self.alive = 0
        self.max_alive = 0
        self._lock = threading.Lock()

    def __dask_tokenize__(self) -> object:
        return ("CountingSource", id(self))

    def _released(self) -> None:
        with self._lock:
            self.alive -= 1

    def __getitem__(self, key):
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        t = np.arange(self.shape[0])[rows]
        v = np.arange(self.shape[1])[cols]
        out = np.empty((t.size, v.size), dtype=self.dtype)  # no temporary of the chunk's size
        np.add((t * 1000).astype(self.dtype)[:, None], v.astype(self.dtype)[None, :], out=out)
        with self._lock:
            self.reads[int(t[0]) if t.size else -1] = self.reads.get(int(t[0]), 0) + 1
            self.alive += 1
            self.max_alive = max(self.max_alive, self.alive)
        weakref.finalize(out, self._released)
        return out


def lazy(source: CountingSource, chunks: int) -> da.Array:
    return da.from_array(source, chunks=(chunks, -1), asarray=False, name=f"src-{id(source)}")


def dataset(n: int, chunks: int, feature_chunks: int | None = None):
    betas = CountingSource(n, width=5)
    data = {"betas": (("trial", "voxel"), lazy(betas, chunks))}
    feats = None
    if feature_chunks is not None:
        feats = CountingSource(n, width=2, dtype="float32")
        data["feature"] = (("trial", "f"), lazy(feats, feature_chunks))
    ds = xr.Dataset(data, coords={
        "trial": np.arange(n) + 100,
        "image_name": ("trial", np.asarray([f"img{t % 7}" for t in range(n)])),
    })
    return ds, betas, feats


def check_epoch(ds, out, drop_last=False, batch_size=None):
    trials = np.concatenate([b["trial"] for b in out]) if out else np.array([], int)
    if not drop_last:
        np.testing.assert_array_equal(np.sort(trials), ds.trial.values)  # every row exactly once
    assert len(set(trials.tolist())) == trials.size
    eager = ds.compute()
    for b in out:
        if batch_size is not None:
            assert len(b["trial"]) <= batch_size
        t = b["trial"] - 100
        np.testing.assert_array_equal(b["betas"], eager.betas.sel(trial=b["trial"]).values)
        np.testing.assert_array_equal(b["betas"][:, 0], t * 1000.0)  # by construction
        np.testing.assert_array_equal(b["image_name"], [f"img{x % 7}" for x in t])
        if "feature" in b:
            np.testing.assert_array_equal(b["feature"], eager.feature.sel(trial=b["trial"]).values)
            assert b["feature"].dtype == np.float32
    return trials


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 90),
    chunks=st.integers(1, 25),
    feature_chunks=st.one_of(st.none(), st.integers(1, 40)),
    batch_size=st.integers(1, 30),
    buffer_chunks=st.integers(1, 4),
    prefetch=st.integers(0, 3),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_row_once_and_aligned(n, chunks, feature_chunks, batch_size, buffer_chunks,
                                    prefetch, shuffle, drop_last, seed):
    ds, betas, feats = dataset(n, chunks, feature_chunks)
    it = neurocube.batches(ds, batch_size=batch_size, shuffle=shuffle, seed=seed,
                           buffer_chunks=buffer_chunks, prefetch=prefetch, drop_last=drop_last)
    out = list(it)
    assert len(out) == len(it)
    reads, feature_reads = dict(betas.reads), dict(feats.reads) if feats is not None else None
    trials = check_epoch(ds, out, drop_last=drop_last, batch_size=batch_size)
    if drop_last:
        assert all(len(b["trial"]) == batch_size for b in out)
        assert trials.size == n - n % batch_size
    else:
        assert all(len(b["trial"]) == batch_size for b in out[:-1])
    if not shuffle:
        np.testing.assert_array_equal(trials, ds.trial.values[: trials.size])
    # the betas (most bytes per row) set the grid: each of their chunks read exactly once
    assert reads == {s: 1 for s in range(0, n, chunks)}
    if feats is not None and feature_chunks is not None and feature_chunks <= chunks and (
        chunks % feature_chunks == 0
    ):  # finer chunks on the same boundaries: each read once too
        assert feature_reads == {s: 1 for s in range(0, n, feature_chunks)}


def test_batch_larger_than_the_epoch_holds_only_its_rows():
    ds, _, _ = dataset(30, 7)
    (batch,) = list(neurocube.batches(ds, batch_size=10**12, seed=3))  # no room for 10**12 rows
    assert len(batch["trial"]) == 30 and batch["betas"].shape[0] == 30
    check_epoch(ds, [batch], drop_last=False, batch_size=10**12)
    assert list(neurocube.batches(ds, batch_size=10**12, drop_last=True)) == []


def test_batch_arrays_are_refilled_only_once_nothing_refers_to_them():
    ds, _, _ = dataset(120, 7, feature_chunks=5)
    kept_view = kept_memory = None
    seen: list[weakref.ref] = []
    reused = 0
    trials = []
    for i, batch in enumerate(neurocube.batches(ds, batch_size=8, seed=1)):
        t = batch["trial"] - 100
        np.testing.assert_array_equal(batch["betas"][:, 0], t * 1000.0)  # right when handed out
        np.testing.assert_array_equal(batch["feature"][:, 1], t * 1000.0 + 1)
        reused += any(r() is batch["betas"] for r in seen)
        seen.append(weakref.ref(batch["betas"]))
        trials.append(t)
        if i == 1:  # a view and a memoryview outlive their batches: never refilled
            kept_view, view_trials = batch["betas"][:3], t[:3].copy()
        if i == 2:
            kept_memory, memory_trials = memoryview(batch["feature"]), t.copy()
        del batch
    assert reused > 0  # dropped batches were filled again rather than allocated anew
    np.testing.assert_array_equal(np.sort(np.concatenate(trials)), np.arange(120))
    np.testing.assert_array_equal(kept_view[:, 0], view_trials * 1000.0)
    np.testing.assert_array_equal(np.asarray(kept_memory)[:, 0], memory_trials * 1000.0)


def test_same_seed_and_epoch_same_order_other_epoch_other_order():
    ds, _, _ = dataset(200, 10)

    def order(**kw):
        return np.concatenate([b["trial"] for b in neurocube.batches(ds, batch_size=16, **kw)])

    first = order(seed=3, epoch=0)
    np.testing.assert_array_equal(first, order(seed=3, epoch=0))
    np.testing.assert_array_equal(first, order(seed=3, epoch=0, prefetch=0))  # threads: same
    assert not np.array_equal(first, order(seed=3, epoch=1))
    assert not np.array_equal(first, order(seed=4, epoch=0))
    # shuffled across chunks and within them, not just chunk by chunk
    assert not np.array_equal(np.sort(first[:10]), first[:10])


def test_dict_of_arrays_with_other_chunks_lines_up():
    n = 57
    ds, betas, _ = dataset(n, 8)
    emb = xr.DataArray(da.arange(n * 2.0, chunks=30).reshape(n, 2), dims=("trial", "f"),
                       coords={"trial": ds.trial.values})
    out = list(neurocube.batches({"betas": ds.betas, "embedding": emb}, batch_size=10, seed=0))
    for b in out:
        np.testing.assert_array_equal(b["embedding"][:, 0], (b["trial"] - 100) * 2.0)
        np.testing.assert_array_equal(b["betas"][:, 0], (b["trial"] - 100) * 1000.0)
        np.testing.assert_array_equal(b["image_name"], [f"img{t % 7}" for t in b["trial"] - 100])
    assert sum(len(b["trial"]) for b in out) == n
    assert betas.reads == {s: 1 for s in range(0, n, 8)}


def test_in_memory_data_and_transposed_variables():
    values = np.arange(24.0).reshape(4, 6)  # (voxel, trial): batched along trial all the same
    ds = xr.Dataset({"b": (("voxel", "trial"), values)}, coords={"trial": np.arange(6)})
    out = list(neurocube.batches(ds, batch_size=4, shuffle=False))
    np.testing.assert_array_equal(np.concatenate([b["b"] for b in out]), values.T)


def test_nothing_is_read_until_the_first_batch():
    ds, betas, feats = dataset(50, 5, 7)
    it = neurocube.batches(ds, batch_size=4, seed=0, prefetch=3)
    assert len(it) == 13
    assert betas.reads == {} and feats.reads == {}
    assert not any(t.name.startswith("neurocube-batches") for t in threading.enumerate())
    next(it)
    assert betas.reads
    it.close()


def test_close_stops_the_readers():
    ds, betas, _ = dataset(100, 5)
    it = neurocube.batches(ds, batch_size=4, seed=0, prefetch=2)
    next(it)
    it.close()
    assert not any(t.name.startswith("neurocube-batches") for t in threading.enumerate())
    assert sum(betas.reads.values()) < 20  # stopped long before the end of the epoch


@pytest.mark.parametrize(("buffer_chunks", "prefetch"), [(1, 0), (2, 1), (3, 2), (1, 4)])
def test_chunks_in_memory_stay_within_buffer_plus_prefetch(buffer_chunks, prefetch):
    n, chunk = 400, 10  # 40 chunks: far more than buffer + prefetch
    ds, betas, _ = dataset(n, chunk)
    gc.collect()
    seen = 0
    for b in neurocube.batches(ds, batch_size=7, seed=1, buffer_chunks=buffer_chunks,
                               prefetch=prefetch):
        seen += len(b["trial"])
        assert betas.alive <= buffer_chunks + prefetch
    assert seen == n
    assert betas.max_alive <= buffer_chunks + prefetch
    assert betas.max_alive >= min(buffer_chunks, 40)  # the count does see the buffer


def test_peak_memory_within_buffer_plus_prefetch_chunks():
    n, chunk, width = 240, 12, 4000  # 20 chunks of 384 KB: 7.7 MB in all
    source = CountingSource(n, width=width, dtype="float64")
    ds = xr.Dataset({"betas": (("trial", "voxel"), lazy(source, chunk))},
                    coords={"trial": np.arange(n)})
    chunk_bytes = chunk * width * 8
    batch_size = 5
    buffer_chunks, prefetch = 2, 2
    it = neurocube.batches(ds, batch_size=batch_size, seed=0, buffer_chunks=buffer_chunks,
                           prefetch=prefetch)
    list(neurocube.batches(dataset(20, 5)[0], batch_size=3, seed=0))  # imports done before
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        rows = sum(len(b["trial"]) for b in it)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert rows == n
    # buffer + prefetch chunks, a batch being built, one handed out, rows carried over, and the
    # test source's own index temporaries in each reading thread (under a quarter of a chunk), and
    # interpreter bookkeeping (Dask task objects, callbacks, thread pools; measured 20-80 KiB,
    # allowed half a chunk); the bound, 2.4 MB, is under a third of the 7.7 MB selection
    batch_bytes = batch_size * width * 8
    bound = ((buffer_chunks + prefetch) * chunk_bytes + 3 * batch_bytes
             + prefetch * chunk_bytes // 4 + chunk_bytes // 2)
    assert peak <= bound, (peak, bound)
    assert peak < n * width * 8 / 2  # far below the selection


def test_reader_pickles_and_reads_the_same():
    ds = xr.Dataset({"b": (("trial", "v"), da.arange(60.0, chunks=14).reshape(30, 2))})
    reader = BlockReader(ds)
    first = reader.read(1)
    again = pickle.loads(pickle.dumps(reader)).read(1)
    np.testing.assert_array_equal(first["b"], again["b"])
    np.testing.assert_array_equal(first["b"][:, 0], np.arange(7, 14) * 2.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2, "buffer_chunks": 0}, "buffer_chunks"),
        ({"batch_size": 2, "prefetch": -1}, "prefetch"),
        ({"batch_size": 2, "epoch": -1}, "epoch"),
        ({"batch_size": 2, "dim": "image"}, "no variable along 'image'"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    ds, _, _ = dataset(10, 5)
    with pytest.raises(SelectionError, match=match):
        neurocube.batches(ds, **kwargs)


def test_misaligned_inputs_are_refused():
    a = xr.DataArray(np.zeros((4, 2)), dims=("trial", "v"), coords={"trial": [0, 1, 2, 3]})
    b = xr.DataArray(np.zeros((4, 2)), dims=("trial", "f"), coords={"trial": [0, 1, 2, 5]})
    with pytest.raises(SelectionError, match="coordinate 'trial' differs"):
        neurocube.batches({"a": a, "b": b}, batch_size=2)
    c = xr.DataArray(np.zeros((3, 2)), dims=("trial", "f"))
    with pytest.raises(SelectionError, match="disagree on the length"):
        neurocube.batches({"a": a, "c": c}, batch_size=2)
    with pytest.raises(SelectionError, match="dict of DataArrays"):
        neurocube.batches({"a": np.zeros(3)}, batch_size=2)
