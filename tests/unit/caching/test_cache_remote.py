"""The Zarr cache with ``store=`` an ``s3://`` URL reached with explicit ``storage_options``.

A real S3 server (moto on loopback, behind a counting proxy): the store's credentials are
passed as arguments, never through the environment, and no text the cache writes or shows
holds them. Sources opened from URLs are identified by size and ETag.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import neurocube
from neurocube.caching.store import RemoteRoot, open_root
from neurocube.cli import main
from neurocube.errors import CacheError
from tests.fixtures.remote import SECRET
from tests.unit.caching.conftest import SHAPE, make_betas, oracle_masked


@pytest.fixture
def remote_betas(s3, tmp_path, brain_mask):
    path = make_betas(tmp_path / "betas.nii.gz")
    url = s3.put(path, "data/betas.nii.gz")
    ds = neurocube.open_nifti(url, mask=brain_mask, chunks=4, storage_options=s3.storage_options)
    return url, ds


def test_cache_into_s3_and_reopen(s3, remote_betas, brain_mask):
    url, ds = remote_betas
    store = f"{s3.url}/cache"
    cached = neurocube.cache(ds, store=store, storage_options=s3.storage_options)
    want = oracle_masked(SHAPE, brain_mask)
    np.testing.assert_array_equal(cached.data.values, want)
    info = neurocube.cache_info(store=store, storage_options=s3.storage_options)
    assert list(info.status) == ["complete"]
    assert info.sources[0] == [url]
    assert info.attrs["root"] == store
    key = info.key[0]
    again = neurocube.open_cached(key, store=store, storage_options=s3.storage_options)
    np.testing.assert_array_equal(again.data.values, want)
    assert neurocube.cache_info(store=store, storage_options=s3.storage_options).hits[0] >= 2
    # the recorded identity of the source is its size and ETag, not a local stat
    marker = json.loads(s3.fs().cat_file(f"{s3.name}/cache/{key}.zarr/.neurocube/entry.json"))
    (source,) = marker["sources"]
    assert source["path"] == url and source["etag"] and source["mtime_ns"] == 0
    assert source["size"] == s3.fs().info(url[5:])["size"]
    # later calls in this process find the store's options by its URL; no text shows them
    root = open_root(store)
    assert isinstance(root, RemoteRoot) and root.storage_options is not None
    assert SECRET not in repr(root) and SECRET not in root.url
    assert len(neurocube.cache_info(store=store)) == 1


def test_cached_values_equal_a_local_store(s3, remote_betas, tmp_path):
    _, ds = remote_betas
    remote = neurocube.cache(ds.isel(trial=slice(2, 9)), store=f"{s3.url}/c",
                             storage_options=s3.storage_options)
    local = neurocube.cache(ds.isel(trial=slice(2, 9)), store=tmp_path / "local")
    np.testing.assert_array_equal(remote.data.values, local.data.values)
    for name in local.coords:
        np.testing.assert_array_equal(remote[name].values, local[name].values)


def test_evict_and_clear_a_remote_store(s3, remote_betas):
    _, ds = remote_betas
    store = f"{s3.url}/cache"
    opts = s3.storage_options
    first = neurocube.cache(ds, store=store, storage_options=opts, key="first")
    neurocube.cache(ds.isel(trial=[0, 1]), store=store, storage_options=opts, key="second")
    assert first.data.shape == ds.data.shape
    info = neurocube.cache_info(store=store, storage_options=opts)
    assert sorted(info.key) == ["first", "second"] and (info.size_bytes > 0).all()
    assert neurocube.evict_cache(int(info.size_bytes.max()), store,
                                 storage_options=opts) == ["first"]
    assert list(neurocube.cache_info(store=store, storage_options=opts).key) == ["second"]
    assert neurocube.clear_cache(store, storage_options=opts) == ["second"]
    assert s3.fs().find(f"{s3.name}/cache") == []
    with pytest.raises(CacheError, match="no complete cache entry"):
        neurocube.open_cached("second", store=store, storage_options=opts)


def test_an_overwritten_source_object_makes_the_entry_stale(s3, remote_betas, tmp_path):
    url, ds = remote_betas
    store = f"{s3.url}/cache"
    neurocube.cache(ds, store=store, storage_options=s3.storage_options, key="k")
    s3.put(make_betas(tmp_path / "other.nii.gz", offset=1.0), "data/betas.nii.gz")
    with pytest.raises(CacheError, match="stale") as info:
        neurocube.open_cached("k", store=store, storage_options=s3.storage_options)
    assert url in str(info.value) and SECRET not in str(info.value)
    served = neurocube.open_cached("k", store=store, storage_options=s3.storage_options,
                                   check_sources=False)
    assert served.data.shape == ds.data.shape


def test_cli_lists_a_remote_store_with_storage_options(s3, remote_betas, capsys, tmp_path):
    _, ds = remote_betas
    store = f"{s3.url}/cache"
    neurocube.cache(ds, store=store, storage_options=s3.storage_options, key="listed")
    capsys.readouterr()
    opts = json.dumps(s3.storage_options)
    assert main(["cache", "ls", "-l", "--store", store, "--storage-options", opts]) == 0
    out = capsys.readouterr()
    assert "listed" in out.out and "complete" in out.out
    assert main(["cache", "du", "--store", store, "--storage-options", opts]) == 0
    assert "1 entries" in capsys.readouterr().out
    options = tmp_path / "opts.json"  # @FILE keeps the keys out of the process list
    options.write_text(opts)
    assert main(["cache", "evict", "0", "--store", store, "--storage-options", f"@{options}"]) == 0
    assert "evicted listed" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('{"key": "k", "secret": "' + SECRET + '"', "not valid JSON"),
        ('["' + SECRET + '"]', "must be a JSON object"),
        ("@/nonexistent/opts.json", "cannot read"),
    ],
)
def test_cli_bad_storage_options(value, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["cache", "ls", "--store", "s3://b/c", "--storage-options", value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and SECRET not in err
