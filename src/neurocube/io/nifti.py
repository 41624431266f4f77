"""Write NIfTI images atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from neurocube.io._atomic import atomic_path

__all__ = ["save_nifti"]


def save_nifti(
    path: str | os.PathLike[str],
    volume: Any,
    affine: Any,
    *,
    dtype: Any = None,
    overwrite: bool = True,
) -> Path:
    """Write a 3-D or 4-D array as NIfTI-1 (gzip when ``path`` ends in ``.gz``), atomically.

    Parameters
    ----------
    path
        Destination ``.nii`` or ``.nii.gz``.
    volume
        The array, ``(X, Y, Z)`` or ``(X, Y, Z, T)`` (a Dask array or
        DataArray is computed first).
    affine
        4x4 voxel-to-scanner transform.
    dtype
        On-disk dtype (default: the array's).
    overwrite
        Refuse to replace an existing file when False.

    Returns
    -------
    pathlib.Path
        The written path.
    """
    import nibabel as nib

    data = np.asarray(getattr(volume, "values", volume))
    if dtype is not None:
        data = data.astype(dtype)
    image = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm", "sec")
    final = Path(path)
    with atomic_path(final, overwrite=overwrite) as tmp:
        image.to_filename(str(tmp))
    return final
