"""End to end: a generated bucket through Subject on a real LocalCluster, and bounded memory."""

from __future__ import annotations

import json
import os
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


# Peak RSS of the compute alone: the kernel's high-water mark (VmHWM) is reset to the current
# RSS right before computing (writing "5" to /proc/self/clear_refs), so neither imports nor
# building the graph count, and the peak is not hidden by an earlier, higher one (ru_maxrss
# cannot be reset: a growth measured with it can come out smaller than the output itself).
_MEASURE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import neurocube
    def status(key):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    root, chunks = sys.argv[1], sys.argv[2]
    sub = neurocube.open_subject(root, "sub-01", chunks=chunks)
    ds = sub.betas("ses-01", roi="face")
    arr = ds.betas.data
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = status("VmRSS")
    values = arr.compute(scheduler="threads", num_workers=2)
    after = status("VmHWM")
    print(json.dumps({"before": before, "after": after, "out": values.nbytes,
                      "shape": list(values.shape), "finite": bool(np.isfinite(values).any())}))
    """
)


def _peak_growth(root, chunks: str) -> dict:
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak-RSS mark")
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(root), chunks],
                          capture_output=True, text=True, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _large_session(tmp_path, grid, trials, compress=False):
    truth = make_bucket(tmp_path, subjects=1, sessions=1, trials=trials, grid=grid,
                        compress=compress, compresslevel=1, stimuli=False, surface_rois=False,
                        full_resolution=False, freesurfer=False, rois={"face": ["FFA1", "OFA"]},
                        nan_fraction=0.01)
    raw = int(np.prod(grid)) * trials * 4
    return truth, raw


def test_memory_stays_bounded_small(tmp_path):
    truth, size = _large_session(tmp_path, (80, 80, 60), 96)  # ~147 MB .nii
    result = _peak_growth(truth.root, "8MiB")
    growth = result["after"] - result["before"]
    assert growth >= 0.9 * result["out"]  # the measurement sees the output being filled
    print(f"file {size / 1e6:.0f} MB, output {result['out'] / 1e6:.1f} MB, "
          f"peak growth {growth / 1e6:.1f} MB")
    assert result["finite"] and result["shape"][0] == 96
    assert growth < result["out"] + 64 * 2**20, (growth, size)
    assert growth < size / 2


@pytest.mark.slow
@pytest.mark.parametrize("compress", [False, True], ids=["nii", "nii.gz"])
def test_memory_stays_bounded_large(tmp_path, compress):
    # 512 MB of voxel data (uncompressed), output ~49 MB: the file is ~2x the bound
    truth, size = _large_session(tmp_path, (100, 100, 100), 128, compress=compress)
    assert size > 5 * 10**8  # bytes
    result = _peak_growth(truth.root, "auto")
    growth = result["after"] - result["before"]
    assert growth >= 0.9 * result["out"]
    print(f"file {size / 1e6:.0f} MB, output {result['out'] / 1e6:.1f} MB, "
          f"peak growth {growth / 1e6:.1f} MB")
    assert growth < result["out"] + 200 * 2**20, (growth, size)
    # never near the file: rapidgzip's parallel first pass keeps ~175 MB of decode buffers
    assert growth < size / 2


# Build-time reads, counted by the kernel (read bytes of this process, /proc/self/io rchar), not
# by patching neurocube: opening a subject and building betas over all its sessions reads the
# small maps (brain mask, ROIs, noise ceilings), the TSVs and CSV, and per betas file only its
# header block, .nii or .nii.gz alike: a .nii.gz's gzip seek index is named from a stat (path,
# size, mtime); the hash of its ends is checked by the first read task. Never the volumes.
_BUILD_READS = textwrap.dedent(
    """
    import json, sys
    import neurocube
    def rchar():
        with open("/proc/self/io") as fh:
            for line in fh:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    root = sys.argv[1]
    def build(subject):
        sub = neurocube.open_subject(root, subject)
        ds = sub.betas(sub.sessions, roi="face", nc_threshold=10, stimuli="shared")
        return ds.betas.groupby("image_name").mean()
    build("sub-02")  # the same code paths once: lazy imports are not counted below
    before = rchar()
    lazy = build("sub-01")
    after = rchar()
    print(json.dumps({"read": after - before, "shape": list(lazy.shape)}))
    """
)


@pytest.mark.parametrize("compress", [False, True], ids=["nii", "nii.gz"])
def test_building_betas_reads_headers_not_volumes(tmp_path, compress):
    if not os.path.exists("/proc/self/io"):
        pytest.skip("needs Linux /proc/self/io")
    # gzip shrinks these files ~2.5x: more trials, so that a full read stands out of the bound
    truth = make_bucket(tmp_path, subjects=2, sessions=3, trials=120 if compress else 40,
                        grid=(40, 40, 32),
                        vary_grid=False, compress=compress, surface_rois=False,
                        full_resolution=False, freesurfer=False, seed=4)
    betas = list(truth.subjects["sub-01"].betas_paths.values())
    betas_bytes = sum(p.stat().st_size for p in betas)
    small = [p for p in tmp_path.rglob("*") if p.is_file() and "sub-02" not in p.parts
             and p not in betas and p.suffix in {".gz", ".nii", ".tsv", ".csv"}]
    small_bytes = sum(p.stat().st_size for p in small)
    per_file = 64 * 2**10  # the header block
    bound = small_bytes + len(betas) * per_file + 256 * 2**10
    assert betas_bytes > 3 * bound  # a full read of the betas would be seen
    done = subprocess.run([sys.executable, "-c", _BUILD_READS, str(tmp_path)],
                          capture_output=True, text=True, timeout=300, check=True,
                          env=dict(os.environ, NEUROCUBE_PROGRESS="0",
                                   NEUROCUBE_CACHE_DIR=str(tmp_path / "cache")))
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"betas {betas_bytes / 1e6:.1f} MB, small files {small_bytes / 1e6:.2f} MB, "
          f"read while building {result['read'] / 1e6:.2f} MB")
    assert result["shape"][1] > 0
    assert result["read"] < bound, (result["read"], bound, betas_bytes)
