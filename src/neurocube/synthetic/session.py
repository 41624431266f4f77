"""A synthetic single-trial-betas session: a 4-D float32 NIfTI shaped like a real one.

An ellipsoid "brain" fills about a third of the grid; outside it every value
is 0, inside it each voxel has a response profile plus trial noise (percent
signal change), and a few voxels the GLM "did not fit" are NaN in every trial.
Volumes are generated and written one at a time, so a session larger than
memory can be made.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neurocube.io._atomic import atomic_path

__all__ = ["SyntheticSession", "brain_ellipsoid", "make_session"]


@dataclass(frozen=True)
class SyntheticSession:
    """Paths and facts of a generated session."""

    betas: Path
    brain_mask: Path
    shape: tuple[int, int, int, int]
    n_brain_voxels: int
    affine: np.ndarray


def brain_ellipsoid(grid: tuple[int, int, int], fill: float = 0.33) -> np.ndarray:
    """Boolean ellipsoid centred in ``grid`` covering about ``fill`` of it."""
    axes = [np.linspace(-1, 1, n) for n in grid]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    radius = (fill / (np.pi * 4 / 3 / 8)) ** (1 / 3)  # ellipsoid volume / box volume = pi/6 r^3
    return np.asarray((x**2 + y**2 + z**2) <= radius**2)


def _header(shape: tuple[int, ...], affine: np.ndarray) -> bytes:
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    hdr.set_sform(affine, code=1)
    hdr.set_qform(affine, code=1)
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_data_offset(352)
    return bytes(hdr.binaryblock) + b"\0" * 4


def make_session(
    folder: str | os.PathLike[str],
    *,
    grid: tuple[int, int, int] = (40, 48, 40),
    n_trials: int = 120,
    seed: int = 0,
    compresslevel: int = 1,
    nan_fraction: float = 0.01,
    name: str = "sub-01_ses-01_task-images_space-T1w_stat-effect_desc-SingletrialBetas_statmap",
) -> SyntheticSession:
    """Write a ``.nii.gz`` session and its brain mask into ``folder``.

    Parameters
    ----------
    folder
        Output folder (created).
    grid, n_trials
        Shape of the 4-D image.
    seed
        Random seed: the same arguments give the same bytes.
    compresslevel
        gzip level (1 is what fast pipelines use; 6 is gzip's default).
    nan_fraction
        Fraction of brain voxels that are NaN in every trial.
    name
        File stem of the betas.

    Returns
    -------
    SyntheticSession
    """
    import nibabel as nib

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    affine = np.array(
        [[-1.8, 0, 0, 1.8 * grid[0] / 2], [0, 1.8, 0, -1.8 * grid[1] / 2],
         [0, 0, 1.8, -1.8 * grid[2] / 2], [0, 0, 0, 1]], dtype=np.float64,
    )
    brain = brain_ellipsoid(grid)
    n_brain = int(brain.sum())
    profile = rng.normal(1.0, 0.5, n_brain).astype(np.float32)  # a positive response
    failed = rng.random(n_brain) < nan_fraction
    betas = folder / f"{name}.nii.gz"
    vol = np.zeros(grid, np.float32)
    with atomic_path(betas) as tmp:
        with open(tmp, "wb") as raw, gzip.GzipFile(
            fileobj=raw, mode="wb", compresslevel=compresslevel, mtime=0
        ) as gz:
            gz.write(_header((*grid, n_trials), affine))
            for t in range(n_trials):
                gain = np.float32(np.sin(t / 7.0))
                values = profile * gain + rng.normal(0.0, 0.5, n_brain).astype(np.float32)
                values[failed] = np.nan
                vol[brain] = values
                gz.write(vol.tobytes(order="F"))
    mask_path = folder / "brain_mask.nii.gz"
    with atomic_path(mask_path) as tmp:
        nib.Nifti1Image(brain.astype(np.uint8), affine).to_filename(str(tmp))
    return SyntheticSession(betas, mask_path, (*grid, n_trials), n_brain, affine)
