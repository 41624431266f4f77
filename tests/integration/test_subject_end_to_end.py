"""End to end: a generated bucket through Subject on a real LocalCluster, and bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import xarray as xr

import neurocube
from neurocube.synthetic.bucket import make_bucket

SESSIONS = ["ses-01", "ses-02", "ses-03"]


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    return make_bucket(tmp_path_factory.mktemp("e2e"), subjects=2, sessions=3, trials=30,
                       grid=(9, 10, 8), seed=11)


@pytest.fixture(scope="module")
def cluster_client():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  dashboard_address=None, memory_limit="1GiB") as cluster, \
            distributed.Client(cluster) as client:
        yield client


def test_local_cluster_matches_threads(bucket, cluster_client):
    sub = neurocube.open_subject(bucket.root, "sub-02", chunks=7)
    betas = sub.betas(SESSIONS, roi="face", nc_threshold=10, stimuli="shared")
    emb = sub.stimulus_embeddings("CLIP", trials_per_chunk=16)
    merged = xr.merge([betas, emb], join="inner", compat="no_conflicts")
    threaded = merged.compute(scheduler="threads")
    distributed_result = cluster_client.compute(merged).result()
    xr.testing.assert_identical(distributed_result, threaded)
    means = neurocube.roi_means(neurocube.open_subjects(bucket.root), "place", session=SESSIONS,
                                by_image=True)
    np.testing.assert_array_equal(
        cluster_client.compute(means.roi_mean).result().values,
        means.roi_mean.compute(scheduler="threads").values,
    )


_MEASURE = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    import neurocube
    root, chunks = sys.argv[1], sys.argv[2]
    sub = neurocube.open_subject(root, "sub-01", chunks=chunks)
    ds = sub.betas("ses-01", roi="face")
    arr = ds.betas.data
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    values = arr.compute(scheduler="threads", num_workers=2)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"before": before, "after": after, "out": values.nbytes,
                      "shape": list(values.shape), "finite": bool(np.isfinite(values).any())}))
    """
)


def _peak_growth(root, chunks: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(root), chunks],
                          capture_output=True, text=True, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _large_session(tmp_path, grid, trials):
    truth = make_bucket(tmp_path, subjects=1, sessions=1, trials=trials, grid=grid,
                        compress=False, stimuli=False, surface_rois=False, full_resolution=False,
                        freesurfer=False, rois={"face": ["FFA1", "OFA"]}, nan_fraction=0.01)
    return truth, truth.subjects["sub-01"].betas_paths["ses-01"].stat().st_size


def test_memory_stays_bounded_small(tmp_path):
    truth, size = _large_session(tmp_path, (80, 80, 60), 96)  # ~147 MB .nii
    result = _peak_growth(truth.root, "8MiB")
    growth = result["after"] - result["before"]
    print(f"file {size / 1e6:.0f} MB, output {result['out'] / 1e6:.1f} MB, "
          f"peak growth {growth / 1e6:.1f} MB")
    assert result["finite"] and result["shape"][0] == 96
    assert growth < result["out"] + 64 * 2**20, (growth, size)
    assert growth < size / 2


@pytest.mark.slow
def test_memory_stays_bounded_large(tmp_path):
    truth, size = _large_session(tmp_path, (100, 100, 100), 128)  # ~512 MB .nii
    assert size > 5 * 10**8  # bytes
    result = _peak_growth(truth.root, "auto")
    growth = result["after"] - result["before"]
    print(f"file {size / 1e6:.0f} MB, output {result['out'] / 1e6:.1f} MB, "
          f"peak growth {growth / 1e6:.1f} MB")
    assert growth < result["out"] + 200 * 2**20, (growth, size)
    assert growth < size / 2.5
