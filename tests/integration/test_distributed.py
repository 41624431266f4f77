"""Dask distributed end to end: every reader and the Zarr cache on process-based workers.

One ``LocalCluster`` (2 worker processes, 1 thread each, a memory limit per
worker) serves the whole module. Tasks carry paths and specs; each worker opens
the files itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import dask
import nibabel as nib
import numpy as np
import pytest
import xarray as xr

import neurocube
from neurocube.caching.keys import fingerprint
from tests.fixtures.nifti import AFFINE, analytic_values, write_nifti
from tests.unit.caching._reader_cases import READERS

distributed = pytest.importorskip("distributed")

# Per-worker memory limit. A fresh worker in a clean virtualenv holds ~192 MB once it has
# imported numpy, pandas, xarray, dask and zarr, and dask pauses a worker at 80 % of its limit:
# at 250 MB the workers paused before the first task (seen on a clean-clone CI run). 350 MB
# pauses at 280 MB, leaving ~90 MB per worker for data in flight.
WORKER_MEMORY_LIMIT = 350_000_000
SHAPE = (6, 5, 4, 11)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """A 2-process cluster whose workers share this module's cache folder."""
    cache_dir = tmp_path_factory.mktemp("cluster-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEUROCUBE_CACHE_DIR", str(cache_dir))  # inherited by the worker processes
        mp.setenv("NEUROCUBE_PROGRESS", "0")
        with (
            distributed.LocalCluster(
                n_workers=2,
                processes=True,
                threads_per_worker=1,
                memory_limit=WORKER_MEMORY_LIMIT,
                dashboard_address=None,
            ) as cluster,
            distributed.Client(cluster) as cluster_client,
        ):
            yield cluster_client


def _mask() -> np.ndarray:
    mask = np.zeros(SHAPE[:3], bool)
    mask[1:5, 0:4, 1:3] = True
    mask[0, 0, 0] = True
    return mask


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_nifti_on_the_cluster_matches_threads_and_oracle(client, tmp_path, suffix, masked):
    values = analytic_values(SHAPE).astype(np.float32)
    path = write_nifti(tmp_path / f"betas{suffix}", values, affine=AFFINE)
    mask = _mask() if masked else None
    ds = neurocube.open_nifti(path, mask=mask, chunks=3)

    on_cluster = ds.compute()  # the module's client is the default scheduler
    threaded = ds.compute(scheduler="threads")
    xr.testing.assert_identical(on_cluster, threaded)
    expected = values[mask].T if masked else values
    np.testing.assert_array_equal(on_cluster.data.values, expected)
    # The graph ran on the workers: both did some of it.
    assert len(client.scheduler_info()["workers"]) == 2


def test_nifti_mask_given_as_a_path_on_the_cluster(client, tmp_path):
    values = analytic_values(SHAPE).astype(np.float32)
    path = write_nifti(tmp_path / "betas.nii.gz", values, affine=AFFINE)
    mask_path = tmp_path / "mask.nii.gz"
    nib.Nifti1Image(_mask().astype(np.float32), AFFINE).to_filename(mask_path)
    ds = neurocube.open_nifti(path, mask=mask_path, chunks=4)
    np.testing.assert_array_equal(ds.data.values, values[_mask()].T)


def test_cache_on_the_cluster_then_reuse(client, tmp_path):
    values = analytic_values(SHAPE).astype(np.float32)
    path = write_nifti(tmp_path / "betas.nii.gz", values, affine=AFFINE)
    ds = neurocube.open_nifti(path, mask=_mask(), chunks=2)
    cached = neurocube.cache(ds)  # written by the workers, into the shared cache folder
    root = Path(os.environ["NEUROCUBE_CACHE_DIR"]) / "zarr"
    assert (root / f"{fingerprint(ds).key}.zarr").is_dir()
    np.testing.assert_array_equal(cached.data.values, values[_mask()].T)  # read on the cluster
    xr.testing.assert_identical(cached.compute(scheduler="threads"), ds.compute())
    again = neurocube.cache(neurocube.open_nifti(path, mask=_mask(), chunks=2))
    assert again.data.data.name == cached.data.data.name
    assert neurocube.cache_info()["hits"].tolist() == [2]


def test_cache_progress_on_the_cluster(client, tmp_path, capsys):
    values = analytic_values(SHAPE).astype(np.float32)
    path = write_nifti(tmp_path / "betas.nii", values, affine=AFFINE)
    ds = neurocube.open_nifti(path, chunks=2)
    cached = neurocube.cache(ds, store=tmp_path / "c", progress=True)
    captured = capsys.readouterr()
    assert "caching" in captured.err
    assert "100%" in captured.out + captured.err  # distributed's text progress bar
    np.testing.assert_array_equal(cached.data.values, values)


# --- bounded memory: a masked dataset about twice the cluster's total memory limit --------

BIG_GRID = (64, 64, 32)
BIG_TRIALS = 2800  # 1.39 GB of masked data: ~2x the cluster's 700 MB


def _write_big_nifti(path: Path) -> Path:
    """A float32 4-D NIfTI of ~1.5 GB written volume by volume (value = C index + (t % 97) / 2)."""
    header = nib.Nifti1Header()
    header.set_data_shape((*BIG_GRID, BIG_TRIALS))
    header.set_data_dtype(np.float32)
    header.set_sform(AFFINE, code=1)
    header.set_qform(AFFINE, code=1)
    header.set_data_offset(352)
    base = np.arange(np.prod(BIG_GRID), dtype=np.float32).reshape(BIG_GRID).ravel(order="F")
    with open(path, "wb") as fh:
        header.write_to(fh)
        fh.write(b"\0" * (352 - fh.tell()))
        for t in range(BIG_TRIALS):
            fh.write((base + np.float32((t % 97) * 0.5)).astype("<f4").tobytes())
    return path


def test_caching_twice_the_cluster_memory_completes_with_exact_values(client, tmp_path):
    path = _write_big_nifti(tmp_path / "big.nii")
    mask = np.ones(BIG_GRID, bool)
    mask[:, :, 0] = False
    ds = neurocube.open_nifti(path, mask=mask, chunks="8MiB")
    total_limit = WORKER_MEMORY_LIMIT * len(client.scheduler_info()["workers"])
    assert ds.data.nbytes > 1.9 * total_limit
    workers_before = set(client.scheduler_info()["workers"])

    cached = neurocube.cache(ds, store=tmp_path / "c")

    # No worker was killed and restarted (a restarted worker comes back on a new address),
    # and none is left paused.
    info = client.scheduler_info()["workers"]
    assert set(info) == workers_before
    assert [w["status"] for w in info.values()] == ["running", "running"]
    # The stored values equal the oracle, checked chunk by chunk in this process.
    voxel_index = np.flatnonzero(mask.ravel())  # C order, as the reader's voxel axis
    with dask.config.set(scheduler="synchronous"):
        start = 0
        for size in cached.data.chunks[0]:
            block = cached.data.isel(trial=slice(start, start + size)).values
            offsets = ((np.arange(start, start + size) % 97) * 0.5).astype(np.float32)
            expected = voxel_index.astype(np.float32)[None, :] + offsets[:, None]
            if not np.array_equal(block, expected):  # fast path; the assert explains a failure
                np.testing.assert_array_equal(block, expected)
            start += size
    assert start == BIG_TRIALS


def test_subject_betas_on_the_cluster_match_threads(client, tmp_path):
    from neurocube.synthetic.bucket import make_bucket

    make_bucket(tmp_path / "bucket", subjects=1, sessions=2, trials=10, grid=(9, 10, 8), seed=3)
    sub = neurocube.open_subject(tmp_path / "bucket", "sub-01")
    ds = sub.betas(["ses-01", "ses-02"], roi="face", nc_threshold=10, chunks=4)
    xr.testing.assert_identical(ds.compute(), ds.compute(scheduler="threads"))
    cached = neurocube.cache(ds, store=tmp_path / "c")
    xr.testing.assert_identical(cached.compute(), ds.compute(scheduler="threads"))


def _executed_count(dask_worker) -> int:  # runs on each worker
    return int(dask_worker.state.executed_count)


@pytest.mark.parametrize("reader", sorted(READERS))
def test_every_reader_on_the_cluster_matches_threads_and_caches_there(client, tmp_path, reader):
    case = READERS[reader](tmp_path / "input")
    ds = case.open()
    executed_before = sum(client.run(_executed_count).values())

    on_cluster = ds.compute()  # the module's client is the default scheduler
    assert sum(client.run(_executed_count).values()) > executed_before  # the workers ran it
    threaded = ds.compute(scheduler="threads")
    xr.testing.assert_identical(on_cluster, threaded)
    case.check(on_cluster)

    cached = neurocube.cache(ds, store=tmp_path / "c")  # chunks written by the workers
    xr.testing.assert_identical(cached.compute(), threaded)  # read back on the cluster
    case.check(cached.compute(scheduler="threads"))


@pytest.fixture(scope="module")
def roomy_client():
    """Worker processes without a memory limit: s3fs and botocore add ~60 MB to each worker,
    which would pause the module's 350 MB workers before the first task (memory is not the
    point of the S3 tests)."""
    with (
        distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, memory_limit=0,
            dashboard_address=None,
        ) as cluster,
        distributed.Client(cluster) as cluster_client,
    ):
        yield cluster_client


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_from_s3_on_the_cluster_with_options_as_arguments(roomy_client, tmp_path, s3,
                                                                suffix):
    """Workers read s3:// with the storage options the specs carry (no environment variables)."""
    assert not any(k.startswith("AWS_ACCESS") or k.startswith("AWS_SECRET") for k in os.environ)
    values = analytic_values(SHAPE).astype(np.float32)
    path = write_nifti(tmp_path / f"betas{suffix}", values)
    url = s3.put(path, f"cluster/betas{suffix}")
    mask = _mask()
    ds = neurocube.open_nifti(url, mask=mask, chunks=3, storage_options=s3.storage_options)
    expected = values[mask].T
    with roomy_client.as_current():
        np.testing.assert_array_equal(ds.data.compute().values, expected)  # read on workers
        again = neurocube.open_nifti(url, mask=mask, chunks=3,
                                     storage_options=s3.storage_options)
        picked = again.data.isel(trial=[1, 7, 10]).values
    np.testing.assert_array_equal(picked, expected[[1, 7, 10]])


def test_whole_array_computes_stay_spread_over_the_workers(client, tmp_path):
    """On one machine ``.values`` of a masked NIfTI is one direct read; on a cluster it is not."""
    from neurocube.sources import pushdown

    values = analytic_values(SHAPE).astype(np.float32)
    path = write_nifti(tmp_path / "betas.nii.gz", values, affine=AFFINE)
    data = neurocube.open_nifti(path, mask=_mask(), chunks=2).data
    data.values  # noqa: B018 (the index exists: chunks are independent tasks)
    data = neurocube.open_nifti(path, mask=_mask(), chunks=2).data
    graph = pushdown.optimize(data.data.__dask_graph__(), data.data.__dask_keys__())
    assert not any(str(k).startswith("whole-") for k in dict(graph))
    np.testing.assert_array_equal(data.values, values[_mask()].T)
