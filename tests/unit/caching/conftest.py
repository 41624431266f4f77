"""Helpers for the cache tests: small NIfTI files and Datasets with known values."""

from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures.nifti import AFFINE, analytic_values, write_nifti

SHAPE = (4, 5, 6, 10)  # 120 voxels x 10 trials


def make_betas(path, shape=SHAPE, *, offset: float = 0.0):
    """Write a float32 4-D NIfTI whose voxel v of trial t holds t * 1000 + v (+ offset)."""
    values = (analytic_values(shape) + offset).astype(np.float32)
    return write_nifti(path, values, affine=AFFINE)


def oracle_masked(shape, mask, *, offset: float = 0.0) -> np.ndarray:
    """(trial, voxel) values of a masked analytic file, voxels in C order."""
    values = (analytic_values(shape) + offset).astype(np.float32)
    return values[mask].T  # mask over (x,y,z) -> (voxel, trial), C order


@pytest.fixture
def betas_path(tmp_path):
    return make_betas(tmp_path / "betas.nii")


@pytest.fixture
def brain_mask():
    mask = np.zeros(SHAPE[:3], bool)
    mask[1:3, 1:4, 2:5] = True
    return mask
