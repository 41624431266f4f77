"""Peak memory of a masked read is the output plus a few chunks, never the 4-D file."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

GRID = (64, 64, 64)
BOUND = 200 * 2**20

MEASURE = textwrap.dedent(
    """
    import json, sys
    import dask, numpy as np, neurocube

    def status(field):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024

    path, mask_path, scheduler, how = sys.argv[1:5]
    options = json.loads(sys.argv[5]) if len(sys.argv) > 5 else None
    ds = neurocube.open_nifti(path, mask=np.load(mask_path), storage_options=options)
    base = status("VmRSS")
    # Reset the kernel's peak-RSS mark to now: ru_maxrss would also count the forked copy of
    # the parent (pytest, hundreds of MB after a long run) from before exec.
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    with dask.config.set(scheduler=scheduler, num_workers=2):
        out = ds.data.values if how == "values" else neurocube.load(ds.data).values
    peak = status("VmHWM")
    print(json.dumps({"base": base, "peak": peak, "out": out.nbytes,
                      "checksum": float(np.nansum(out[:, ::97], dtype=np.float64))}))
    """
)


def make_session(folder, n_trials, *, gz=False):
    """A .nii (or .nii.gz) of float32 volumes: trial t holds t + 0.5 inside the mask, 0 outside."""
    rng = np.random.default_rng(0)
    mask = np.zeros(GRID, bool)
    mask[16:48, 16:48, 20:44] = rng.random((32, 32, 24)) < 0.3  # ~7.4k voxels
    path = folder / ("session.nii.gz" if gz else "session.nii")
    # write the header for n_trials volumes, then the volumes one at a time
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape((*GRID, n_trials))
    hdr.set_data_dtype(np.float32)
    hdr.set_data_offset(352)
    raw = folder / "session.nii"
    with open(raw, "wb") as fh:
        hdr.write_to(fh)
        fh.write(b"\0" * (352 - fh.tell()))
        vol = np.zeros(GRID, np.float32)
        for t in range(n_trials):
            vol[mask] = t + 0.5
            fh.write(vol.tobytes(order="F"))
    if gz:
        with open(raw, "rb") as src, gzip.open(path, "wb", compresslevel=1) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
        raw.unlink()
    np.save(folder / "mask.npy", mask)
    return path, folder / "mask.npy", mask


def measure(path, mask_path, scheduler="threads", how="values", storage_options=None):
    extra = [json.dumps(storage_options)] if storage_options else []
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path), str(mask_path), scheduler, how, *extra],
        capture_output=True, text=True, check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def expected_checksum(mask, n_trials):
    t = np.arange(n_trials, dtype=np.float64) + 0.5
    cols = np.arange(0, int(mask.sum()), 97).size
    return float(t.sum() * cols)


@pytest.mark.parametrize("n_trials", [1200])
def test_masked_read_of_a_large_nii_stays_within_output_plus_200mb(tmp_path, n_trials):
    path, mask_path, mask = make_session(tmp_path, n_trials)
    file_bytes = path.stat().st_size
    result = measure(path, mask_path)
    growth = result["peak"] - result["base"]
    assert file_bytes > 4 * (result["out"] + BOUND)  # the file is several times the bound
    assert growth <= result["out"] + BOUND, (
        f"peak grew by {growth / 2**20:.0f} MiB for an output of {result['out'] / 2**20:.0f} MiB"
    )
    assert result["checksum"] == pytest.approx(expected_checksum(mask, n_trials))


@pytest.mark.slow
def test_masked_read_of_a_large_nii_gz_stays_within_output_plus_200mb(tmp_path):
    n_trials = 1200
    path, mask_path, mask = make_session(tmp_path, n_trials, gz=True)
    first_load = measure(path, mask_path, how="load")  # no index: one parallel pass builds it
    shutil.rmtree(os.path.join(os.environ["NEUROCUBE_CACHE_DIR"], "gzindex"))
    first = measure(path, mask_path)  # no index yet, through Dask: the ordered graph's pass
    again = measure(path, mask_path)  # through the index, threads in parallel
    loaded = measure(path, mask_path, how="load")  # neurocube.load: one forward pass per thread
    for result, bound in ((first_load, 1), (first, 2), (again, 2), (loaded, 1)):
        growth = result["peak"] - result["base"]
        assert growth <= bound * result["out"] + BOUND  # Dask's .values: + its concatenation
        assert result["checksum"] == pytest.approx(expected_checksum(mask, n_trials))


def test_first_masked_read_of_a_remote_nii_gz_stays_within_output_plus_200mb(tmp_path, s3):
    """From S3: one pass over the object, the index recorded, memory bounded like locally."""
    n_trials = 300
    path, mask_path, mask = make_session(tmp_path, n_trials, gz=True)
    url = s3.put(path, "memory/session.nii.gz")
    first = measure(url, mask_path, how="load", storage_options=s3.storage_options)
    assert s3.counter.bytes_for("session.nii.gz") <= 1.02 * path.stat().st_size
    again = measure(url, mask_path, storage_options=s3.storage_options)  # Dask, through the index
    for result in (first, again):
        growth = result["peak"] - result["base"]
        assert growth <= result["out"] + BOUND, (
            f"peak grew by {growth / 2**20:.0f} MiB for an output of "
            f"{result['out'] / 2**20:.0f} MiB"
        )
        assert result["checksum"] == pytest.approx(expected_checksum(mask, n_trials))
