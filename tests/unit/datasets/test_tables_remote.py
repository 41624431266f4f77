"""Embeddings (NPZ + sidecars, combined parquet) and behaviour datasets (parquet tracks, NPZ
labels) read from s3:// (a real moto server on loopback behind a counting proxy) and http://,
compared value for value with the local read of the same files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import neurocube
from neurocube import storage
from neurocube.errors import AccessDeniedError, DataChangedError, DataNotFoundError
from tests.fixtures.embeddings_tree import make_tree
from tests.fixtures.remote import SECRET

SAMPLES = Path("/work/shared/samples")
DERIVATIVES = SAMPLES / "coco_pipe_derivatives" / "eeg_foundation_embeddings"


def assert_same(remote: xr.Dataset, local: xr.Dataset) -> None:
    """Every variable and coordinate equal (NaN equal to NaN), same dims and chunks."""
    assert set(remote.data_vars) == set(local.data_vars)
    assert set(remote.coords) == set(local.coords)
    for name in [*local.data_vars, *local.coords]:
        a, b = remote[name], local[name]
        assert a.dims == b.dims, name
        if name in ("artifact_path",):
            continue  # the location itself differs (URL vs path)
        np.testing.assert_array_equal(np.asarray(a.values), np.asarray(b.values), err_msg=name)
        assert a.dtype == b.dtype, name


def no_secret(*objects: object) -> None:
    for obj in objects:
        assert SECRET not in repr(obj)


def rewrite(s3, url: str) -> None:
    """Rewrite an object in place with one byte changed (same size, new ETag)."""
    fs = s3.fs()
    key = url[len("s3://"):]
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(key, bytes(data))


# --------------------------------------------------------------------------- embeddings


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "deriv"
    make_tree(root, subjects=("01", "02"), sessions=("01",), models=("cbramod",))
    return root


@pytest.mark.parametrize("representation", ["recording", "epoch", "token"])
def test_open_embeddings_s3_equals_local(s3, tree, representation):
    url = s3.put(tree, "deriv")
    local = neurocube.open_embeddings(tree, representation, model_key="cbramod", condition="EO")
    s3.counter.reset()
    remote = neurocube.open_embeddings(
        url, representation, model_key="cbramod", condition="EO",
        storage_options=s3.storage_options,
    )
    # opening: one listing, sidecars and NPZ directories only (no HEAD per file)
    assert s3.counter.count("GET", query="list-type") <= 1
    assert s3.counter.count("HEAD") == 0
    tree_bytes = sum(p.stat().st_size for p in tree.rglob("*.npz"))
    assert s3.counter.total_bytes < tree_bytes + 20_000
    assert_same(remote, local)
    assert all(p.startswith(url) for p in remote["artifact_path"].values)
    no_secret(remote, remote.attrs, remote["embedding"].data.dask)


def test_open_embeddings_aggregate_by_s3(s3, tree):
    url = s3.put(tree, "deriv")
    kw = {"model_key": "cbramod", "condition": "EC", "aggregate_by": "subject"}
    local = neurocube.open_embeddings(tree, "epoch", **kw)
    remote = neurocube.open_embeddings(url, "epoch", storage_options=s3.storage_options, **kw)
    assert_same(remote, local)


def test_open_embeddings_sample_manifest_s3(s3):
    url = s3.put(DERIVATIVES, "sample")
    local = neurocube.open_embeddings(DERIVATIVES, "epoch", model_key="cbramod")
    s3.counter.reset()
    remote = neurocube.open_embeddings(url, "epoch", model_key="cbramod",
                                       storage_options=s3.storage_options)
    assert s3.counter.count("HEAD") == 0
    assert_same(remote, local)
    # one artifact by URL, and the catalog
    one = str(local["artifact_path"].values[0])
    one_url = url + "/" + storage.relative(one, str(DERIVATIVES.resolve()))
    single = neurocube.open_embeddings(one_url, "recording",
                                       storage_options=s3.storage_options)
    np.testing.assert_array_equal(
        single["embedding"].values,
        neurocube.open_embeddings(one, "recording")["embedding"].values,
    )


def test_open_combined_table_s3(s3):
    url = s3.put(DERIVATIVES, "sample")
    for level in ("recording", "epoch"):
        local = neurocube.open_combined_table(DERIVATIVES, "cbramod", "EO", level)
        s3.counter.reset()
        remote = neurocube.open_combined_table(url, "cbramod", "EO", level,
                                               storage_options=s3.storage_options)
        size = (DERIVATIVES / "combined" / f"cbramod_EO_{level}_embeddings.parquet").stat().st_size
        assert s3.counter.total_bytes <= size  # footer + id columns, not the features
        assert_same(remote, local)
        no_secret(remote, remote["embedding"].data.dask)
    agg_local = neurocube.open_combined_table(DERIVATIVES, "cbramod", "EO", "epoch",
                                              aggregate_by="subject")
    agg_remote = neurocube.open_combined_table(url, "cbramod", "EO", "epoch",
                                               aggregate_by="subject",
                                               storage_options=s3.storage_options)
    assert_same(agg_remote, agg_local)


def test_embeddings_errors_s3(s3, tree):
    url = s3.put(tree, "deriv")
    with pytest.raises(DataNotFoundError, match="nothing-here"):
        neurocube.open_embeddings(f"{s3.url}/nothing-here", storage_options=s3.storage_options)
    with pytest.raises(DataNotFoundError, match="combined"):
        neurocube.open_combined_table(url, "cbramod", "EO", storage_options=s3.storage_options)
    s3.proxy.deny.append(f"/{s3.name}/deriv")
    with pytest.raises(AccessDeniedError) as info:
        neurocube.open_embeddings(url, "recording", model_key="cbramod", condition="EO",
                                  storage_options=s3.storage_options)
    assert SECRET not in str(info.value)


def test_embeddings_changed_object_refused(s3, tree):
    url = s3.put(tree, "deriv")
    ds = neurocube.open_embeddings(url, "recording", model_key="cbramod", condition="EO",
                                   storage_options=s3.storage_options)
    path = str(ds["artifact_path"].values[0])
    # rewrite the object with other bytes: its ETag changes
    rewrite(s3, path)
    with pytest.raises(DataChangedError, match="changed since"):
        ds["embedding"].compute()


def test_open_embeddings_http(http_files, tree):
    shutil.copytree(tree, Path(http_files.root) / "deriv")
    local = neurocube.open_embeddings(tree, "recording", model_key="cbramod", condition="EO")
    files = sorted(
        str(p.relative_to(tree)) for p in tree.rglob("*_embedding.npz") if "EO" in p.name
    )
    urls = [f"{http_files.url}/deriv/{f}" for f in files]
    remote = neurocube.open_embeddings(urls, "recording")
    assert_same(remote, local)


# --------------------------------------------------------------------------- behaviour

from tests.unit.datasets._behavior_data import hierarchical, make_dataset  # noqa: E402

MOSAIC = SAMPLES / "mosaic_dataset"


@pytest.fixture
def behavior(tmp_path):
    gen = make_dataset(tmp_path / "gen", hierarchical(2, 2, 60), row_group_size=16)
    return gen.root


def test_behavior_s3_equals_local(s3, behavior):
    url = s3.put(behavior, "mosaic")
    local = neurocube.open_behavior(behavior)
    s3.counter.reset()
    remote = neurocube.open_behavior(url, storage_options=s3.storage_options)
    assert s3.counter.count("GET", query="list-type") == 1  # one listing, no HEAD per file
    assert s3.counter.count("HEAD") == 0
    assert remote.list_groups() == local.list_groups()
    assert remote.list_sequences() == local.list_sequences()
    assert remote.label_kinds() == local.label_kinds() == ["behavior"]

    s3.counter.reset()
    tracks = remote.tracks(start_frame=5, end_frame=50, lazy=True)
    data_bytes = sum(p.stat().st_size for p in behavior.rglob("*.parquet"))
    opened = s3.counter.total_bytes
    assert s3.counter.count("HEAD") == 0
    assert_same(tracks, local.tracks(start_frame=5, end_frame=50, lazy=True))
    no_secret(tracks, tracks.attrs, *(v.data.dask for v in tracks.data_vars.values()))
    assert opened <= data_bytes + 2_000  # footers (+ boundary frame columns) only

    # a small frame range is read at once (default lazy=None), remotely too: same values;
    # at most one HEAD per object (the changed-since-listed check, once per version)
    s3.counter.reset()
    small = neurocube.open_behavior(url, storage_options=s3.storage_options).tracks(
        start_frame=5, end_frame=50
    )
    assert all(isinstance(v.data, np.ndarray) for v in small.variables.values())
    assert s3.counter.count("HEAD") <= len(small.attrs["neurocube_sources"])
    assert_same(small, local.tracks(start_frame=5, end_frame=50))
    assert_same(small, tracks)
    no_secret(small, small.attrs)

    dense_local = local.to_dense()
    dense_remote = remote.to_dense()
    assert_same(dense_remote, dense_local)
    one = local.to_dense(sequences=local.list_sequences()[0])
    assert_same(remote.to_dense(sequences=local.list_sequences()[0]), one)

    for kw in ({}, {"groups": local.list_groups()[0]}):
        with pytest.warns(neurocube.errors.NeurocubeWarning, match="object member"):
            lab_remote = remote.labels(**kw)
        with pytest.warns(neurocube.errors.NeurocubeWarning, match="object member"):
            lab_local = local.labels(**kw)
        assert_same(lab_remote, lab_local)
    assert_same(remote.labels_dense(), local.labels_dense())


def test_behavior_sample_s3(s3):
    url = s3.put(MOSAIC, "sample")
    local = neurocube.open_behavior(MOSAIC)
    remote = neurocube.open_behavior(url + "/dataset.yaml", storage_options=s3.storage_options)
    assert_same(remote.tracks(), local.tracks())
    assert_same(remote.to_dense(), local.to_dense())
    with pytest.warns(neurocube.errors.NeurocubeWarning):
        lab_local = local.labels()
    with pytest.warns(neurocube.errors.NeurocubeWarning):
        lab_remote = remote.labels()
    assert_same(lab_remote, lab_local)


def test_behavior_errors_s3(s3, behavior):
    url = s3.put(behavior, "mosaic")
    with pytest.raises(DataNotFoundError, match="missing-dataset"):
        neurocube.open_behavior(f"{s3.url}/missing-dataset", storage_options=s3.storage_options)
    ds = neurocube.open_behavior(url, storage_options=s3.storage_options)
    tracks = ds.tracks()
    # a tracks file rewritten after opening is refused at read time
    path = tracks.attrs["neurocube_sources"][0]
    rewrite(s3, path)
    with pytest.raises(DataChangedError, match="changed since"):
        tracks.compute()
    s3.proxy.deny.append(f"/{s3.name}/mosaic/dataset.yaml")
    with pytest.raises(AccessDeniedError) as info:
        neurocube.open_behavior(url, storage_options=s3.storage_options)
    assert SECRET not in str(info.value)


def test_behavior_local_unchanged_and_path_map_to_url(s3, behavior):
    """An index holding absolute local paths, moved to a bucket: path_map points them at it."""
    url = s3.put(behavior, "mosaic")
    local = neurocube.open_behavior(behavior)
    remote = neurocube.open_behavior(
        url, storage_options=s3.storage_options, path_map={str(behavior): url}
    )
    assert_same(remote.tracks(), local.tracks())
