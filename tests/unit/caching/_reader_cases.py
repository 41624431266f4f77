"""One small generated input per neurocube reader, with an independent oracle for its values.

Shared by the cache round-trip tests (``test_readers.py``) and the distributed tests
(``tests/integration/test_distributed.py``). Each case writes its files under a folder,
opens them lazily with the reader (a fresh graph on every ``open()``), checks values
against what h5py, numpy, pyarrow or nibabel read from the files *now*, and can change a
source file's content in place.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xarray as xr

import neurocube


@dataclass
class ReaderCase:
    """A reader's input, how to open it, an oracle for its values, a way to change it."""

    open: Callable[[], xr.Dataset]
    check: Callable[[xr.Dataset], None]
    rewrite: Callable[[], None]


def _close_hdf5_handles() -> None:
    from neurocube.sources.hdf5_handles import HDF5_POOL

    HDF5_POOL.clear()


def _spectral(folder: Path) -> ReaderCase:
    path = folder / "sub-01_hemi-L_spectral.h5"

    def write(offset: float) -> None:
        _close_hdf5_handles()  # the reader keeps files open between reads
        values = np.arange(120 * 12, dtype=np.float64).reshape(120, 12) * 0.5 + offset
        with h5py.File(path, "w") as h5:
            h5.create_dataset("eigenvectors", data=values, chunks=(16, 4), compression="gzip")
            h5.create_dataset("eigenvalues", data=np.arange(12.0) + offset)
            h5.create_group("descriptors").create_dataset("hks", data=values[:, :5] * 2)
            h5.attrs["spectralbrain_version"] = "0.1.0"

    write(0.0)

    def check(ds: xr.Dataset) -> None:
        with h5py.File(path, "r") as h5:
            np.testing.assert_array_equal(ds.eigenvectors.values, h5["eigenvectors"][()])
            np.testing.assert_array_equal(ds.eigenvalues.values, h5["eigenvalues"][()])
            np.testing.assert_array_equal(ds.hks.values, h5["descriptors/hks"][()])

    return ReaderCase(
        open=lambda: neurocube.open_spectral(path, chunks={"eigenvectors": (32, 12)}),
        check=check,
        rewrite=lambda: write(0.25),
    )


def _traces(folder: Path) -> ReaderCase:
    from tests.unit.datasets.test_traces import write_traces

    path = folder / "traces.hdf5"
    write_traces(path, n_per_origin=(5, 4), channels=2)

    def check(ds: xr.Dataset) -> None:
        values = ds.data.values
        with h5py.File(path, "r") as h5:
            for i, (origin, name) in enumerate(zip(ds.origin.values, ds.name.values, strict=True)):
                np.testing.assert_array_equal(values[i], h5[f"{origin}/traces/{name}"][()])

    def rewrite() -> None:
        _close_hdf5_handles()
        with h5py.File(path, "r+") as h5:
            h5["rec0.xdf/traces/0"][0, 0] = -1.0  # same size, other bytes

    return ReaderCase(
        open=lambda: neurocube.open_traces(path, traces_per_chunk=3),
        check=check,
        rewrite=rewrite,
    )


def _embeddings(folder: Path) -> ReaderCase:
    from tests.fixtures.embeddings_tree import make_tree

    make_tree(folder, models=("cbramod",), conditions=("EO",), tokens=False)

    def check(ds: xr.Dataset) -> None:
        paths = list(dict.fromkeys(str(p) for p in ds.artifact_path.values))
        expected = np.concatenate([np.load(p)["window_embeddings"] for p in paths])
        np.testing.assert_array_equal(ds.embedding.values, expected)

    def rewrite() -> None:
        path = next(folder.rglob("*_embedding.npz"))
        with np.load(path) as payload:
            arrays = {name: payload[name] for name in payload.files}
        arrays["window_embeddings"] = arrays["window_embeddings"] + 1
        np.savez_compressed(path, **arrays)

    return ReaderCase(
        open=lambda: neurocube.open_embeddings(folder, "epoch", "cbramod", files_per_chunk=2),
        check=check,
        rewrite=rewrite,
    )


def _tracks(folder: Path) -> ReaderCase:
    from tests.unit.datasets._behavior_data import hierarchical, make_dataset

    gen = make_dataset(folder / "behaviour", hierarchical(n_frames=30))

    def check(ds: xr.Dataset) -> None:
        out = ds.compute()
        for (group, sequence), path in gen.files.items():
            rows = (out.group.values == group) & (out.sequence.values == sequence)
            expected = pq.read_table(path).to_pandas()
            for column in ("frame", "X", "poseX0", "poseY2"):
                np.testing.assert_array_equal(out[column].values[rows], expected[column])

    def rewrite() -> None:
        path = next(iter(gen.files.values()))
        table = pq.read_table(path)
        index = table.schema.get_field_index("poseX0")
        shifted = pa.compute.add(table.column(index), 0.25)
        pq.write_table(table.set_column(index, "poseX0", shifted), path, row_group_size=20)

    return ReaderCase(
        open=lambda: neurocube.open_behavior(gen.root).tracks(min_chunk_rows=1),
        check=check,
        rewrite=rewrite,
    )


def _subject_betas(folder: Path) -> ReaderCase:
    from neurocube.synthetic.bucket import make_bucket

    truth = make_bucket(folder / "bucket", subjects=1, sessions=1, trials=10, grid=(9, 10, 8),
                        stimuli=False, surface_rois=False, full_resolution=False,
                        freesurfer=False, seed=4)  # fmt: skip
    path = truth.subjects["sub-01"].betas_paths["ses-01"]

    def check(ds: xr.Dataset) -> None:
        volume = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        expected = volume[ds.i.values, ds.j.values, ds.k.values, :].T
        np.testing.assert_array_equal(ds.betas.values, expected)

    def rewrite() -> None:
        stat = path.stat()  # a new modification time is enough for a new key
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))

    return ReaderCase(
        open=lambda: neurocube.open_subject(truth.root, "sub-01").betas(
            "ses-01", roi="face", nc_threshold=10, chunks=4
        ),
        check=check,
        rewrite=rewrite,
    )


def _nifti(folder: Path) -> ReaderCase:
    from tests.fixtures.nifti import AFFINE, analytic_values, write_nifti

    shape = (6, 5, 4, 9)
    path = write_nifti(folder / "betas.nii.gz", analytic_values(shape).astype(np.float32),
                       affine=AFFINE)  # fmt: skip
    mask = np.zeros(shape[:3], bool)
    mask[1:5, 0:4, 1:3] = True

    def check(ds: xr.Dataset) -> None:
        volume = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        np.testing.assert_array_equal(ds.data.values, volume[mask].T)

    def rewrite() -> None:
        write_nifti(path, analytic_values(shape).astype(np.float32) + 0.5, affine=AFFINE)

    return ReaderCase(
        open=lambda: neurocube.open_nifti(path, mask=mask, chunks=4),
        check=check,
        rewrite=rewrite,
    )


def _in_new_folder(make: Callable[[Path], ReaderCase]) -> Callable[[Path], ReaderCase]:
    def made(folder: Path) -> ReaderCase:
        folder.mkdir(parents=True, exist_ok=True)
        return make(folder)

    return made


#: Reader name -> function that writes its input under a folder and returns the case.
READERS: dict[str, Callable[[Path], ReaderCase]] = {
    "nifti": _in_new_folder(_nifti),
    "subject_betas": _in_new_folder(_subject_betas),
    "spectral": _in_new_folder(_spectral),
    "traces": _in_new_folder(_traces),
    "embeddings": _in_new_folder(_embeddings),
    "tracks": _in_new_folder(_tracks),
}
