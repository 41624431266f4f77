"""Group-bys over trials on lazy betas (issue 13, item 4).

Values against numpy on the eagerly loaded selection (NaN-aware, several reductions), for the
plain ``groupby("image_name")`` call (flox) and for the shuffled form the docs recommend for
large selections; nothing is read while the graphs are built; no one-trial chunks; the shuffled
form reads each selected volume once, straight from the file (no whole chunk held for later).
"""

from __future__ import annotations

import warnings

import dask
import numpy as np
import pytest
from dask._task_spec import convert_legacy_graph
from dask.array.core import getter, getter_nofancy
from dask.core import flatten
from dask.utils import ensure_dict

import neurocube
from neurocube.sources import pushdown
from neurocube.storage import IO_STATS
from neurocube.synthetic.bucket import make_bucket

REDUCTIONS = {
    "mean": np.nanmean,
    "sum": np.nansum,
    "std": np.nanstd,
    "count": lambda a, axis: np.sum(~np.isnan(a), axis=axis),
    "min": np.nanmin,
    "max": np.nanmax,
}


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    root = tmp_path_factory.mktemp("grp")
    # shared images repeat within and across sessions; NaN voxels; a few trials per chunk so
    # groups span chunks and sessions
    make_bucket(root, subjects=1, sessions=2, trials=18, grid=(7, 8, 6), vary_grid=False,
                n_shared=4, shared_repeats=3, nan_fraction=0.1, stimuli=False,
                surface_rois=False, freesurfer=False, full_resolution=False, seed=7)
    return root


def _betas(root, chunks=4):
    sub = neurocube.open_subject(root, "sub-01", chunks=chunks)
    return sub.betas(sub.sessions).betas


def _oracle(values, labels, names, how):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN voxels of a group
        return np.stack([REDUCTIONS[how](values[labels == n], axis=0) for n in names])


@pytest.mark.parametrize("how", sorted(REDUCTIONS))
@pytest.mark.parametrize("form", ["plain", "shuffled"])
def test_lazy_group_reductions_match_numpy(bucket, how, form):
    betas = _betas(bucket)
    assert len(betas.data.chunks[0]) > 2  # groups really span chunks
    values = neurocube.load(betas, progress=False).values
    labels = betas.image_name.values
    if form == "plain":
        grouped = betas.groupby("image_name")
    else:
        grouped = betas.groupby("image_name").shuffle_to_chunks().groupby("image_name")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = getattr(grouped, how)()
        with dask.config.set(scheduler="threads", num_workers=2):
            got = result.values
    names = result.image_name.values
    assert sorted(names.tolist()) == sorted(set(labels.tolist()))
    assert any((labels == n).sum() > 1 for n in names)  # repeats exist
    expected = _oracle(values, labels, names, how)
    assert np.isnan(expected).any() == np.isnan(got).any()
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6, equal_nan=True)


def test_building_group_by_graphs_reads_nothing(bucket):
    betas = _betas(bucket)
    IO_STATS.reset()
    plain = betas.groupby("image_name").mean()
    shuffled = betas.groupby("image_name").shuffle_to_chunks()
    means = shuffled.groupby("image_name").mean()
    for arr in (plain.data, means.data):
        arr.__dask_optimize__(arr.__dask_graph__(), arr.__dask_keys__())
    assert IO_STATS.snapshot() == (0, 0)


def test_default_chunks_have_many_trials_and_the_shuffle_keeps_them(tmp_path):
    # whole brain of a bigger grid: the default chunks hold tens of trials, never one
    make_bucket(tmp_path, subjects=1, sessions=2, trials=40, grid=(30, 32, 28),
                vary_grid=False, n_shared=10, shared_repeats=3, stimuli=False,
                surface_rois=False, freesurfer=False, full_resolution=False, seed=2)
    sub = neurocube.open_subject(tmp_path, "sub-01")
    betas = sub.betas(sub.sessions).betas
    assert min(betas.data.chunks[0]) > 1
    shuffled = betas.groupby("image_name").shuffle_to_chunks()
    assert min(shuffled.data.chunks[0]) > 1
    means = shuffled.groupby("image_name").mean()
    assert len(means.data.__dask_graph__()) < 20 * len(betas.data.chunks[0])


def test_shuffled_group_by_reads_each_volume_once_from_the_file(bucket):
    neurocube.load(_betas(bucket), progress=False)  # a first read builds the seek indexes
    betas = _betas(bucket, chunks="auto")  # default chunks: the shuffle keeps voxels whole
    means = betas.groupby("image_name").shuffle_to_chunks().groupby("image_name").mean()
    arr = means.data
    graph = pushdown.push_down(convert_legacy_graph(ensure_dict(arr.__dask_graph__())))
    needed, todo = set(), list(flatten(arr.__dask_keys__()))
    while todo:  # what the result needs, as dask's culling will keep it
        key = todo.pop()
        if key not in needed:
            needed.add(key)
            todo.extend(graph[key].dependencies)
    tasks = [graph[key] for key in needed]
    # no whole chunk is read and held until the other output chunks take their part: every
    # read is a selected read of the trials one output chunk needs, across both sessions
    assert not any(getattr(t, "func", None) in (getter, getter_nofancy) for t in tasks)
    read: dict[int, list[int]] = {}
    for task in tasks:
        if getattr(task, "func", None) is pushdown.read_selected:
            volumes, key = (arg.value for arg in task.args)
            trials = np.arange(volumes.shape[0])[key[0]]
            read.setdefault(id(volumes), []).extend(np.atleast_1d(trials).tolist())
    assert len(read) == 2  # one VolumeArray per session
    for trials in read.values():
        assert sorted(trials) == list(range(len(trials)))  # each volume once
    assert sum(len(t) for t in read.values()) == betas.sizes["trial"]
    with dask.config.set(scheduler="threads", num_workers=2):
        got = means.values
    values = betas.values
    labels = betas.image_name.values
    np.testing.assert_allclose(got, _oracle(values, labels, means.image_name.values, "mean"),
                               rtol=2e-5, equal_nan=True)
