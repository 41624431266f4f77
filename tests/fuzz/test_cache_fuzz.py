"""Fuzz: a damaged Zarr cache entry gives the undamaged values or a neurocube error, never others.

A small dataset is cached once per test (numeric data in several chunks, an in-memory integer
coordinate, a string coordinate); each example copies the entry, damages one of its files (a data
chunk, a coordinate chunk, a ``zarr.json``, the manifest-carrying marker or the last-use record) at
hypothesis-chosen offsets, and reopens + computes it both ways (``open_cached`` and a ``cache()``
hit; ``cache()`` rebuilds what it finds unusable before reading). Cache entries are checksummed
end to end (crc32c per chunk, crc32c of each metadata document and a sha256 of the marker), so
values that differ from the oracle fail the test.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from hypothesis import given
from hypothesis import strategies as st

import neurocube
from neurocube.errors import NeurocubeWarning
from tests.fuzz.damage import assert_oracle_or_neurocube_error, damages, fuzz_settings

TARGETS = (
    "data/c/0/0",
    "data/c/1/0",
    "data/zarr.json",
    "i/c/0",
    "label/c/0",
    "label/zarr.json",
    "trial/c/0",
    "zarr.json",
    ".neurocube/entry.json",
    ".neurocube/last_use.json",
)


def _dataset() -> xr.Dataset:
    values = (np.arange(4 * 30, dtype=np.float32).reshape(4, 30) - 17) / 3
    values[1, 3] = np.nan
    return xr.Dataset(
        {"data": (("trial", "voxel"), da.from_array(values, chunks=(2, 30)))},
        coords={"trial": np.arange(4), "label": ("trial", ["a", "bb", "ccc", "dddd"]),
                "i": ("voxel", np.arange(30, dtype=np.int32) * 5)},
        attrs={"neurocube_sources": [], "units": "au"},
    )  # fmt: skip


def _oracle(ds: xr.Dataset) -> dict[str, object]:
    loaded = ds.compute()
    return {name: loaded[name].values for name in ("data", "label", "i", "trial")}


def _values(obj: xr.Dataset) -> dict[str, object]:
    loaded = obj.compute()
    return {name: loaded[name].values for name in ("data", "label", "i", "trial")}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    import neurocube.caching.core as core

    saved, core.MIN_CHUNK_BYTES = core.MIN_CHUNK_BYTES, 1  # two data chunks
    try:
        store = tmp_path_factory.mktemp("cache-fuzz") / "pristine"
        neurocube.cache(_dataset(), store=store, key="k", progress=False)
    finally:
        core.MIN_CHUNK_BYTES = saved
    return store


def _check(pristine, tmp_path, target: str, damage) -> None:
    store = Path(tempfile.mkdtemp(dir=tmp_path)) / "store"
    shutil.copytree(pristine, store)
    damage.apply_to(store / "k.zarr" / target)
    oracle = _oracle(_dataset())

    def reopen_by_key():
        return _values(neurocube.open_cached("k", store=store))

    def cache_hit():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NeurocubeWarning)  # "rebuilding it": fine
            return _values(neurocube.cache(_dataset(), store=store, key="k", progress=False))

    what = f"{target} {damage}"
    try:
        assert_oracle_or_neurocube_error(reopen_by_key, oracle, checksummed=True, what=what)
        # cache() rebuilds what the listing or the reopen finds unusable; a damaged data chunk
        # (same size) is found only when it is read: a CorruptDataError then
        assert_oracle_or_neurocube_error(cache_hit, oracle, checksummed=True, what=what)
    finally:
        shutil.rmtree(store.parent, ignore_errors=True)


@fuzz_settings()
@given(target=st.sampled_from(TARGETS), damage=damages(max_size=64))
def test_damaged_cache_entry_gives_oracle_or_neurocube_error(pristine, tmp_path, target, damage):
    _check(pristine, tmp_path, target, damage)


@pytest.mark.slow
@fuzz_settings(slow=True)
@given(target=st.sampled_from(TARGETS), damage=damages(max_size=256))
def test_damaged_cache_entry_many_examples(pristine, tmp_path, target, damage):
    _check(pristine, tmp_path, target, damage)
