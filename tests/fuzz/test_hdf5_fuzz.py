"""Fuzz: damaged HDF5 files (the offspect trace caches and spectral caches in tests/data, and
generated ones), read through ``open_traces`` / ``open_spectral``.

Each example damages a copy at a hypothesis-chosen place. Reading it must give h5py's eager
values of the undamaged file or a neurocube error. A file written with fletcher32 chunks and
``libver="latest"`` (checksummed superblock, object headers and chunk index) must never give
other values.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import neurocube
from neurocube.datasets.traces import trace_sort_key
from neurocube.sources.hdf5_handles import release_file
from tests.fuzz.damage import assert_oracle_or_neurocube_error, damages, fuzz_settings

DATA = Path(__file__).parents[1] / "data"
TRACE_SAMPLES = sorted((DATA / "offspect").glob("*.hdf5"))
SPECTRAL_SAMPLES = [
    p for p in sorted((DATA / "spectralbrain").glob("*.h5")) if p.name != "bad.h5"
]
_COUNTER = itertools.count()


def _trace_oracle(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as h5:
        rows = [
            np.asarray(h5[origin]["traces"][name][()], dtype="float64")
            for origin in h5.keys()
            for name in sorted(h5[origin]["traces"].keys(), key=trace_sort_key)
        ]
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width, *rows[0].shape[1:]), np.nan)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _spectral_oracle(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as h5:
        for name in ("eigenvalues", "eigenvectors", "vertices", "faces"):
            if name in h5:
                out[name] = h5[name][()]
    return out


def _read_traces(path: Path) -> np.ndarray:
    return neurocube.open_traces(path, use_cache=False).data.values.astype("float64")


def _read_spectral(path: Path) -> dict[str, np.ndarray]:
    ds = neurocube.open_spectral(path)
    return {name: ds[name].values for name in ("eigenvalues", "eigenvectors", "vertices",
                                                 "faces") if name in ds}


def _checksummed_traces(folder: Path) -> Path:
    path = folder / "fletcher.hdf5"
    rng = np.random.default_rng(2)
    with h5py.File(path, "w", libver="latest") as h5:
        group = h5.create_group("rec1.xdf")
        group.attrs["channel_labels"] = "['EDC_L']"
        traces = group.create_group("traces")
        for i in range(6):
            dset = traces.create_dataset(
                str(i), data=rng.standard_normal(3_000), chunks=(1_000,), fletcher32=True
            )
            dset.attrs["onset"] = str(i)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import warnings

    folder = tmp_path_factory.mktemp("hdf5-fuzz")
    entries = [(p, _read_traces, _trace_oracle(p), False) for p in TRACE_SAMPLES]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        entries += [(p, _read_spectral, _spectral_oracle(p), False) for p in SPECTRAL_SAMPLES]
    checked = _checksummed_traces(folder)
    entries.append((checked, _read_traces, _trace_oracle(checked), True))
    return folder, entries


def _run(files, damage, which):
    import warnings

    folder, entries = files
    source, read, oracle, checksummed = entries[which % len(entries)]
    target = folder / f"damaged_{next(_COUNTER)}{source.suffix}"
    shutil.copyfile(source, target)
    damage.apply_to(target)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. an incomplete-cache warning is not the point
            assert_oracle_or_neurocube_error(
                lambda: read(target), oracle, checksummed=checksummed,
                what=f"{source.name} with {damage}",
            )
    finally:
        release_file(target)
        target.unlink()


@fuzz_settings()
@given(damage=damages(), which=st.integers(0, 20))
def test_damaged_hdf5_gives_h5py_values_or_a_neurocube_error(files, damage, which):
    _run(files, damage, which)


@pytest.mark.slow
@fuzz_settings(slow=True)
@given(damage=damages(), which=st.integers(0, 20))
def test_damaged_hdf5_many(files, damage, which):
    _run(files, damage, which)
