"""Damaged ``.nii.gz`` files and gzip index sidecars: the oracle's values or a neurocube error.

A ``.nii.gz`` is checksummed (the gzip CRC32 and length, and the per-volume checksums its first
pass records with the index), so reading a damaged copy must never give values that differ
from nibabel's eager read of the undamaged file.
"""

from __future__ import annotations

import itertools
import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import neurocube
from neurocube.errors import NeurocubeError
from neurocube.sources import gzindex
from tests.fixtures.nifti import write_nifti
from tests.fuzz.damage import Damage, assert_oracle_or_neurocube_error, damages, fuzz_settings

SHAPE = (12, 10, 8, 16)
_COUNTER = itertools.count()


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """An undamaged session (noise inside a box, zeros outside) and nibabel's eager values."""
    folder = tmp_path_factory.mktemp("gzfuzz")
    rng = np.random.default_rng(3)
    values = np.zeros(SHAPE, np.float32)
    values[2:10, 2:8, 1:7] = rng.normal(size=(8, 6, 6, SHAPE[3])).astype(np.float32)
    path = write_nifti(folder / "orig.nii.gz", values, compresslevel=1)
    oracle = np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))
    return path.read_bytes(), oracle


def _fresh(tmp_path: Path, data: bytes) -> tuple[Path, Path]:
    """Write ``data`` as a new file in its own folder, with its own (empty) index cache."""
    folder = tmp_path / f"ex{next(_COUNTER)}"
    folder.mkdir()
    path = folder / "sess.nii.gz"
    path.write_bytes(data)
    return path, folder / "cache"


def _read(path: Path, cache: Path, how: str) -> np.ndarray:
    gzindex.reset_handles()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # index rebuild warnings are expected here
        if how == "load":
            ds = neurocube.open_nifti(path, cache_dir=cache, chunks=5)
            return np.asarray(neurocube.load(ds.data, progress=False).values)
        index = False if how == "stream" else "auto"
        ds = neurocube.open_nifti(path, cache_dir=cache, index=index, chunks=5)
        return np.asarray(ds.data.values)


def _read_masked(path: Path, cache: Path) -> np.ndarray:
    gzindex.reset_handles()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = neurocube.open_nifti(path, cache_dir=cache, mask=np.ones(SHAPE[:3], bool), chunks=5)
        return np.asarray(neurocube.load(ds.data, progress=False).values)


HOWS = ("stream", "auto", "load")


@fuzz_settings()
@given(damage=damages(), how=st.sampled_from(HOWS))
def test_damaged_nii_gz_gives_the_oracle_or_an_error(original, tmp_path, damage, how):
    data, oracle = original
    path, cache = _fresh(tmp_path, damage.apply(data))
    assert_oracle_or_neurocube_error(
        lambda: _read(path, cache, how), oracle, checksummed=True, what=f"{damage} {how}"
    )


@pytest.mark.slow
@fuzz_settings(slow=True)
@given(damage=damages(), how=st.sampled_from(HOWS))
def test_damaged_nii_gz_gives_the_oracle_or_an_error_many(original, tmp_path, damage, how):
    data, oracle = original
    path, cache = _fresh(tmp_path, damage.apply(data))
    assert_oracle_or_neurocube_error(
        lambda: _read(path, cache, how), oracle, checksummed=True, what=f"{damage} {how}"
    )


@pytest.mark.parametrize("where", [0.1, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("how", HOWS)
def test_64_zeroed_bytes_in_the_deflate_data_are_an_error(original, tmp_path, where, how):
    """The case of issue 11: this returned wrong trials with no error, where gzip -t fails."""
    data, _ = original
    damaged = Damage("zero_run", where, 64, 0, 0.0).apply(data)
    path, cache = _fresh(tmp_path, damaged)
    with pytest.raises(NeurocubeError, match="sess\\.nii\\.gz"):
        _read(path, cache, how)
    with pytest.raises(NeurocubeError, match="sess\\.nii\\.gz"):
        _read_masked(path, cache)


def _damage_after_indexing(path: Path, damage: Damage) -> None:
    """Damage ``path`` in place between its first and last MiB, keeping size and mtime."""
    st_ = path.stat()
    damage.apply_to(path)
    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns))


BIG = (40, 32, 24, 30)  # 3.7 MB: damage between the hashed first and last MiB


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A file larger than the hashed ends, in stored deflate blocks (damage still inflates)."""
    folder = tmp_path_factory.mktemp("gzfuzzbig")
    values = np.random.default_rng(4).normal(size=BIG).astype(np.float32)
    path = write_nifti(folder / "big.nii.gz", values, compresslevel=0)
    return path.read_bytes(), np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))


@fuzz_settings()
@given(
    kind=st.sampled_from(("flip_bit", "zero_run", "swap_blocks")),
    where=st.floats(0.35, 0.65),
    size=st.integers(1, 256),
    bit=st.integers(0, 7),
    other=st.floats(0.35, 0.65),
    masked=st.booleans(),
)
def test_data_damaged_after_indexing_is_caught_by_the_volume_checksums(
    big, tmp_path, kind, where, size, bit, other, masked
):
    """The index (and the hash of the file's ends) still match: only volume checksums can tell."""
    data, oracle = big
    damage = Damage(kind, where, size, bit, other)
    path, cache = _fresh(tmp_path, data)
    gzindex.reset_handles()
    neurocube.open_nifti(path, cache_dir=cache).compute()  # the index and volume checksums
    _damage_after_indexing(path, damage)

    def read() -> np.ndarray:
        gzindex.reset_handles()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mask = np.ones(BIG[:3], bool) if masked else None
            ds = neurocube.open_nifti(path, cache_dir=cache, mask=mask, chunks=4)
            if masked:
                return np.asarray(neurocube.load(ds.data, progress=False).values)
            return np.asarray(ds.data.values)

    want = oracle.reshape(-1, BIG[3]).T if masked else oracle
    assert_oracle_or_neurocube_error(read, want, checksummed=True, what=str(damage))


@fuzz_settings()
@given(
    damage=damages(),
    target=st.sampled_from(("index", "sidecar")),
    how=st.sampled_from(("auto", "load")),
)
def test_damaged_index_or_sidecar_is_rebuilt_or_refused(original, tmp_path, damage, target, how):
    data, oracle = original
    path, cache = _fresh(tmp_path, data)
    _read(path, cache, "auto")
    (index,) = (cache / "gzindex").glob("*.gzidx")
    damage.apply_to(index if target == "index" else index.with_suffix(".json"))
    assert_oracle_or_neurocube_error(
        lambda: _read(path, cache, how), oracle, checksummed=True, what=f"{target} {damage}"
    )
