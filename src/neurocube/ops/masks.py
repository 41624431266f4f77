"""Voxel masks: coerce what a user passes into one boolean grid, checked against the data.

A mask is always known at graph-build time (a numpy boolean array), so masked
arrays have known chunk sizes. Voxel order everywhere is the C-order
flattening of the ``(X, Y, Z)`` grid.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from neurocube.errors import FormatError, GridMismatchError

__all__ = ["as_mask", "read_volume", "voxel_coords"]

_AFFINE_TOL = 1e-3  # mm; affines written by different tools differ by float noise


def read_volume(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read a small 3-D NIfTI eagerly: ``(values, affine)``, scaling applied.

    For masks, noise-ceiling and R² maps, which are needed at graph-build time.
    A 4-D image with a single volume is accepted as 3-D.
    """
    from neurocube.sources.nifti import NiftiSpec, VolumeArray, read_header

    info = read_header(path)
    if len(info.shape) == 4 and info.shape[3] != 1:
        raise FormatError(
            f"{info.path}: expected a 3-D volume (a mask or a map), found shape {info.shape}."
        )
    from neurocube.sources.gzindex import GzipIndexSpec

    spec = NiftiSpec.from_info(info, GzipIndexSpec(info.path, None) if info.compressed else None)
    x, y, z = info.grid_shape
    values = np.asarray(VolumeArray(spec)[(slice(None),) * len(info.shape)])
    return values.reshape(x, y, z), info.affine


def as_mask(
    mask: Any,
    grid_shape: tuple[int, int, int],
    affine: np.ndarray | None = None,
    *,
    name: str = "mask",
    data_path: str | None = None,
) -> np.ndarray:
    """Return ``mask`` as a boolean array of shape ``grid_shape``.

    Parameters
    ----------
    mask
        A boolean (or 0/1) array on the grid, a flat array of ``prod(grid)``
        values in C order, or the path of a NIfTI mask. For a NIfTI mask, NaN
        is outside and any non-zero value (negative ones included) is inside.
    grid_shape
        The data's spatial grid.
    affine
        The data's affine; a NIfTI mask must match it (within 1e-3 mm).
    name
        What to call the mask in messages.
    data_path
        The data file, named in messages.

    Raises
    ------
    GridMismatchError
        If the mask lies on another grid (shape or affine).
    """
    where = f" for {data_path}" if data_path else ""
    grid_shape = tuple(int(s) for s in grid_shape)  # type: ignore[assignment]
    if isinstance(mask, (str, os.PathLike)):
        mpath = Path(mask).expanduser()
        values, maffine = read_volume(mpath)
        if values.shape != grid_shape:
            raise GridMismatchError(
                f"{name} {mpath}: grid {values.shape} does not match the data grid {grid_shape}"
                f"{where}. Use a mask written on the data's grid (resample it first)."
            )
        if affine is not None and not np.allclose(maffine, affine, atol=_AFFINE_TOL):
            raise GridMismatchError(
                f"{name} {mpath}: its affine differs from the data's{where} (same shape, "
                f"other position/orientation).\nmask affine:\n{np.round(maffine, 4)}\n"
                f"data affine:\n{np.round(np.asarray(affine), 4)}\nResample the mask onto the "
                "data grid."
            )
        with np.errstate(invalid="ignore"):
            return np.asarray((values != 0) & ~np.isnan(values))
    arr = np.asarray(mask)
    if arr.dtype != bool:
        if arr.dtype.kind not in "iuf":
            raise GridMismatchError(
                f"{name}: expected a boolean array or a NIfTI path{where}, found dtype {arr.dtype}"
            )
        with np.errstate(invalid="ignore"):
            arr = (arr != 0) & ~np.isnan(arr.astype(np.float64))
    size = int(np.prod(grid_shape))
    if arr.shape == grid_shape:
        return arr
    if arr.ndim == 1 and arr.size == size:
        return arr.reshape(grid_shape)  # C order, as documented
    raise GridMismatchError(
        f"{name}: shape {arr.shape} fits neither the data grid {grid_shape} nor its flat form "
        f"({size},){where}. A mask must be on the same grid as the data."
    )


def voxel_coords(selection: np.ndarray, affine: Any) -> dict[str, Any]:
    """Coordinates along ``voxel`` for the voxels of a 3-D boolean ``selection``, in C order.

    Returns ``i, j, k`` (int32 grid indices) and ``x, y, z`` (scanner mm through
    ``affine``), each as ``("voxel", values)`` ready for an xarray object.
    """
    i, j, k = np.nonzero(selection)
    xyz = np.asarray(affine, dtype=np.float64) @ np.vstack([i, j, k, np.ones_like(i)]).astype(
        np.float64
    )
    return {
        "i": ("voxel", i.astype(np.int32)),
        "j": ("voxel", j.astype(np.int32)),
        "k": ("voxel", k.astype(np.int32)),
        "x": ("voxel", xyz[0]),
        "y": ("voxel", xyz[1]),
        "z": ("voxel", xyz[2]),
    }
