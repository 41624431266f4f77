"""Cache keys: deterministic across processes, sensitive to files and operations."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import xarray as xr

import neurocube
from neurocube.caching.keys import CACHE_FORMAT_VERSION, KEY_LENGTH, fingerprint
from neurocube.errors import CacheError

from .conftest import make_betas

KEY_SCRIPT = """
import sys
import numpy as np
import neurocube
mask = np.zeros((4, 5, 6), bool)
mask[1:3, 1:4, 2:5] = True
ds = neurocube.open_nifti(sys.argv[1], mask=mask, chunks=3)
ds = ds.isel(trial=[1, 3, 5]).where(ds.data > 1500)
from neurocube.caching.keys import fingerprint
print(fingerprint(ds).key)
"""


def _key_in_fresh_process(path) -> str:
    env = {**os.environ, "PYTHONHASHSEED": "random"}
    done = subprocess.run(
        [sys.executable, "-c", KEY_SCRIPT, str(path)],
        capture_output=True, text=True, check=True, env=env, timeout=120,
    )  # fmt: skip
    return done.stdout.strip().splitlines()[-1]


def test_same_inputs_give_the_same_key_in_fresh_processes(tmp_path):
    path = make_betas(tmp_path / "b.nii.gz")
    first = _key_in_fresh_process(path)
    second = _key_in_fresh_process(path)
    assert first == second
    assert len(first) == KEY_LENGTH and int(first, 16) >= 0
    # ... and in this process.
    mask = np.zeros((4, 5, 6), bool)
    mask[1:3, 1:4, 2:5] = True
    ds = neurocube.open_nifti(path, mask=mask, chunks=3)
    assert fingerprint(ds.isel(trial=[1, 3, 5]).where(ds.data > 1500)).key == first
    # Touching the file changes the key in a fresh process too.
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    assert _key_in_fresh_process(path) != first


def test_key_depends_on_every_parameter(tmp_path):
    path = make_betas(tmp_path / "b.nii")
    mask = np.zeros((4, 5, 6), bool)
    mask[0, :, :] = True
    other = mask.copy()
    other[1, 0, 0] = True
    ds = neurocube.open_nifti(path, mask=mask)
    keys = {
        fingerprint(ds).key,
        fingerprint(neurocube.open_nifti(path, mask=other)).key,
        fingerprint(neurocube.open_nifti(path, mask=mask, chunks=2)).key,
        fingerprint(ds.isel(trial=[0, 1])).key,
        fingerprint(ds.isel(trial=[1, 0])).key,
        fingerprint(ds.where(ds.data > 10)).key,
        fingerprint(ds.where(ds.data > 11)).key,
        fingerprint(ds.assign_attrs(note="x")).key,
        fingerprint(ds.assign_coords(label=("trial", [str(t) for t in range(10)]))).key,
    }
    assert len(keys) == 9
    assert fingerprint(neurocube.open_nifti(path, mask=mask)).key == fingerprint(ds).key


def test_fingerprint_records_source_identities(tmp_path):
    path = make_betas(tmp_path / "b.nii")
    fp = fingerprint(neurocube.open_nifti(path))
    (source,) = fp.sources
    assert source["path"] == str(path.resolve())
    assert source["size"] == path.stat().st_size
    assert source["mtime_ns"] == path.stat().st_mtime_ns
    assert len(source["ends_sha256"]) == 64
    assert CACHE_FORMAT_VERSION == 2


def test_nondeterministic_token_is_an_error():
    ds = xr.Dataset({"v": ("t", np.arange(3))}, attrs={"neurocube_sources": []})
    ds.attrs["lock"] = threading.Lock()
    with pytest.raises(CacheError, match=r"cannot derive a cache key.*key='a-name-you-choose'"):
        fingerprint(ds)
