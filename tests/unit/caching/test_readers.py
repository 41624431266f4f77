"""neurocube.cache on the output of every reader: values, coords, attrs, reuse, staleness."""

from __future__ import annotations

import warnings

import dask.array as da
import numpy as np
import pytest
import xarray as xr

import neurocube
from neurocube.caching.keys import fingerprint

from ._reader_cases import READERS


def _complete_keys(store) -> list[str]:
    info = neurocube.cache_info(store=store)
    return sorted(info.loc[info["status"] == "complete", "key"])


def _storable(chunks: tuple[int, ...]) -> tuple[int, ...]:
    """Zarr needs equal blocks (a shorter last one allowed); irregular ones become the largest."""
    if len(set(chunks[:-1])) <= 1 and chunks[-1] <= chunks[0]:
        return chunks
    size, total = max(chunks), sum(chunks)
    return (size,) * (total // size) + ((total % size,) if total % size else ())


def _assert_stored_chunks(cached: xr.DataArray, source: xr.DataArray) -> None:
    """Stored chunks: Zarr's equal blocks of the source, merged along the first dim while small.

    Every stored boundary is one of the source's, other dims keep the source's blocks, and a
    stored chunk is at least MIN_CHUNK_BYTES unless it spans the whole first dim.
    """
    from neurocube.caching.core import MIN_CHUNK_BYTES

    src = [_storable(c) for c in source.chunks]
    got = cached.chunks
    assert got[1:] == tuple(src[1:])
    assert set(np.cumsum(got[0])) <= set(np.cumsum(src[0]))
    block = got[0][0] * source.dtype.itemsize * int(np.prod([c[0] for c in got[1:]]))
    assert len(got[0]) == 1 or block >= MIN_CHUNK_BYTES or got[0] == src[0]


@pytest.mark.parametrize("reader", sorted(READERS))
def test_every_reader_round_trips_through_the_cache(reader, tmp_path):
    case = READERS[reader](tmp_path / "input")
    store = tmp_path / "cache"
    ds = case.open()
    assert ds.attrs["neurocube_sources"]  # every reader names its files

    with warnings.catch_warnings():
        # e.g. xarray computing a lazy string coordinate just to learn its dtype
        warnings.simplefilter("error", xr.SerializationWarning)
        cached = neurocube.cache(ds, store=store)

    # Values against the oracle read from the files; dims, coords (and their dtypes) and attrs
    # identical to the reader's own output; lazy, with the reader's chunks.
    case.check(cached)
    xr.testing.assert_identical(cached.compute(), ds.compute())
    for name, variable in ds.data_vars.items():
        if isinstance(variable.data, da.Array):
            assert isinstance(cached[name].data, da.Array)
            _assert_stored_chunks(cached[name], variable)
    (key,) = _complete_keys(store)
    assert key == fingerprint(ds).key
    recorded = neurocube.cache_info(store=store).set_index("key").loc[key, "sources"]
    assert recorded == [str(p) for p in ds.attrs["neurocube_sources"]]

    # The same call again is a hit on the same entry (same Dask names downstream) ...
    again = neurocube.cache(case.open(), store=store)
    assert _complete_keys(store) == [key]
    first_var = next(iter(ds.data_vars))
    assert again[first_var].data.name == cached[first_var].data.name
    # ... and so is reopening it by key without opening the files.
    xr.testing.assert_identical(neurocube.open_cached(key, store=store).compute(), ds.compute())

    # One variable alone caches as a DataArray, with its name, coords and attrs.
    array = ds[first_var]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", neurocube.errors.NeurocubeWarning)  # no sources of its own
        cached_array = neurocube.cache(array, store=store)
    assert isinstance(cached_array, xr.DataArray) and cached_array.name == first_var
    xr.testing.assert_identical(cached_array.compute(), array.compute())

    # A changed source file gives a new entry holding the new values ...
    case.rewrite()
    rebuilt = neurocube.cache(case.open(), store=store)
    assert len(_complete_keys(store)) == 3
    case.check(rebuilt)
    # ... for the DataArray too, although it has no sources of its own: the readers' Dask
    # names carry the file identities.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", neurocube.errors.NeurocubeWarning)
        rebuilt_array = neurocube.cache(case.open()[first_var], store=store)
    assert len(_complete_keys(store)) == 4
    xr.testing.assert_identical(rebuilt_array.compute(), rebuilt[first_var].compute())


def test_lazy_string_coordinate_is_written_without_computing_it_first(tmp_path):
    computed = []

    def labels(block):
        computed.append(block.shape)
        return np.array([f"seq{v:03d}" for v in block], dtype="<U6")

    codes = da.arange(12, chunks=4)
    names = codes.map_blocks(labels, dtype="<U6")
    ds = xr.Dataset(
        {"v": ("row", codes * 2.0)},
        coords={"sequence": ("row", names)},
        attrs={"neurocube_sources": []},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", xr.SerializationWarning)
        cached = neurocube.cache(ds, store=tmp_path, key="strings")
    # Each block of the coordinate was computed once, by the write itself (not a whole-array
    # pass before it to find the dtype).
    assert [shape for shape in computed if shape != (0,)] == [(4,)] * 3  # (0,): dask's meta probe
    assert cached.sequence.dtype == np.dtype("<U6")
    assert cached.sequence.values.tolist() == [f"seq{v:03d}" for v in range(12)]
