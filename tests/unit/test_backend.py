"""xr.open_dataset(path, engine="neurocube") for every single-file format, chosen by content."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import neurocube
from neurocube.backend import NeurocubeBackendEntrypoint
from neurocube.errors import ReaderNotFoundError

DATA = Path(__file__).resolve().parents[1] / "data"


def _first(pattern):
    found = sorted(DATA.glob(pattern))
    if not found:
        pytest.skip(f"no sample matching {pattern}")
    return found[0]


def test_spectral_cache_through_the_engine(tmp_path):
    sample = _first("spectralbrain/*spectral*.h5")
    renamed = tmp_path / "decomposition.bin"  # content decides, not the suffix
    shutil.copyfile(sample, renamed)
    assert NeurocubeBackendEntrypoint().guess_can_open(str(renamed))
    via_engine = xr.open_dataset(renamed, engine="neurocube")
    direct = neurocube.open_spectral(sample)
    assert set(via_engine.data_vars) == set(direct.data_vars)
    for name in direct.data_vars:
        np.testing.assert_array_equal(via_engine[name].values, direct[name].values)


def test_trace_cache_through_the_engine():
    sample = _first("offspect/merged.hdf5")
    via_engine = xr.open_dataset(sample, engine="neurocube", use_cache=False)
    direct = neurocube.open_traces(sample, use_cache=False)
    np.testing.assert_array_equal(via_engine.data.values, direct.data.values)


def test_embedding_file_through_the_engine():
    sample = _first("coco_pipe/**/*Mean_embedding.npz")
    via_engine = xr.open_dataset(sample, engine="neurocube")
    direct = neurocube.open_embeddings(sample, representation="recording")
    np.testing.assert_array_equal(via_engine.embedding.values, direct.embedding.values)


def test_options_are_checked_per_reader(nifti_factory):
    path = nifti_factory("opts.nii.gz")
    with pytest.raises(TypeError, match=r"the nifti reader takes mask, index.*got strict"):
        xr.open_dataset(path, engine="neurocube", strict=True)


def test_unknown_content_lists_the_readers(tmp_path):
    other = tmp_path / "table.csv"
    other.write_text("a,b\n1,2\n")
    assert not NeurocubeBackendEntrypoint().guess_can_open(str(other))
    with pytest.raises(ReaderNotFoundError, match=r"table\.csv: no neurocube reader.*nifti, spe"):
        xr.open_dataset(other, engine="neurocube")
