"""An interrupted write is never used; racing writers end with one valid entry."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import neurocube
from neurocube.caching.keys import fingerprint

from .conftest import SHAPE, make_betas

# Caches the unmasked file chunk by chunk, each chunk read slowed down so that a test
# can catch the writer in the middle. The graph is the plain open_nifti graph: the
# slowdown patches the read function, so the key equals the one of this test process.
WRITER_SCRIPT = """
import sys, time
import dask
import neurocube
from neurocube.sources import nifti

read = nifti.VolumeArray.__getitem__
def slow_read(self, index):
    time.sleep(float(sys.argv[3]))
    return read(self, index)
nifti.VolumeArray.__getitem__ = slow_read

dask.config.set(scheduler="synchronous")
ds = neurocube.open_nifti(sys.argv[1], chunks=1)
cached = neurocube.cache(ds, store=sys.argv[2])
print(float(cached.data.sum()))
"""


def _start_writer(path: Path, store: Path, delay: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER_SCRIPT, str(path), str(store), str(delay)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "NEUROCUBE_PROGRESS": "0"},
    )  # fmt: skip


def _temporaries(store: Path) -> list[Path]:
    return [p for p in store.glob(".*.tmp.zarr")] if store.exists() else []


def _written_chunks(folder: Path) -> int:
    chunk_dir = folder / "data" / "c"
    return sum(1 for p in chunk_dir.rglob("*") if p.is_file()) if chunk_dir.exists() else 0


def _wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


def test_sigkilled_writer_leaves_nothing_used_and_next_call_rebuilds(tmp_path):
    path = make_betas(tmp_path / "b.nii")
    store = tmp_path / "cache"
    writer = _start_writer(path, store, delay=0.4)
    try:
        _wait_for(lambda: any(_written_chunks(t) >= 2 for t in _temporaries(store)))
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    assert writer.returncode == -signal.SIGKILL

    ds = neurocube.open_nifti(path, chunks=1)
    key = fingerprint(ds).key
    (leftover,) = _temporaries(store)
    assert 2 <= _written_chunks(leftover) < SHAPE[3]  # killed midway
    assert not (store / f"{key}.zarr").exists()
    info = neurocube.cache_info(store=store)
    assert info["status"].tolist() == ["incomplete"]

    rebuilt = neurocube.cache(ds, store=store)
    np.testing.assert_array_equal(rebuilt.data.values, ds.data.values)
    assert (store / f"{key}.zarr").is_dir()
    assert _temporaries(store) == []  # the dead writer's copy was swept
    assert neurocube.cache_info(store=store)["status"].tolist() == ["complete"]


def test_two_processes_writing_the_same_key_end_with_one_valid_entry(tmp_path):
    path = make_betas(tmp_path / "b.nii")
    store = tmp_path / "cache"
    writers = [_start_writer(path, store, delay=0.15) for _ in range(2)]
    try:
        # Both are writing at the same time (two temporary copies exist at once).
        _wait_for(lambda: len(_temporaries(store)) == 2)
        outputs = [w.communicate(timeout=120) for w in writers]
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
    assert [w.returncode for w in writers] == [0, 0], [err for _, err in outputs]

    ds = neurocube.open_nifti(path)
    expected = float(ds.data.sum())
    assert [float(out.strip().splitlines()[-1]) for out, _ in outputs] == [expected, expected]
    entries = sorted(p.name for p in store.iterdir())
    assert entries == [f"{fingerprint(neurocube.open_nifti(path, chunks=1)).key}.zarr"]
    cached = neurocube.cache(neurocube.open_nifti(path, chunks=1), store=store)
    np.testing.assert_array_equal(cached.data.values, ds.data.values)
