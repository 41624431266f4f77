"""Voxel selections on a grid: boolean masks checked against the data, and voxel coordinates.

A mask is always known at graph-build time (a numpy boolean array), so masked
arrays have known chunk sizes. Voxel order everywhere is the C-order
flattening of the ``(X, Y, Z)`` grid. Reading a mask *file* is the NIfTI
reader's job (:func:`neurocube.sources.nifti.as_mask`); this module only
checks and converts values.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from neurocube.errors import GridMismatchError

__all__ = ["check_mask_grid", "mask_from_array", "voxel_coords"]

AFFINE_TOL = 1e-3  # mm; affines written by different tools differ by float noise


def check_mask_grid(
    values: np.ndarray,
    mask_affine: np.ndarray,
    grid_shape: tuple[int, ...],
    affine: np.ndarray | None,
    *,
    label: str,
    where: str = "",
) -> np.ndarray:
    """Return a mask image's values as a boolean grid, after checking shape and affine.

    NaN is outside and any non-zero value (negative ones included) is inside.
    ``label`` names the mask (e.g. ``"mask /data/roi.nii.gz"``).
    """
    if values.shape != tuple(grid_shape):
        raise GridMismatchError(
            f"{label}: grid {values.shape} does not match the data grid {tuple(grid_shape)}"
            f"{where}. Use a mask written on the data's grid (resample it first)."
        )
    if affine is not None and not np.allclose(mask_affine, affine, atol=AFFINE_TOL):
        raise GridMismatchError(
            f"{label}: its affine differs from the data's{where} (same shape, "
            f"other position/orientation).\nmask affine:\n{np.round(mask_affine, 4)}\n"
            f"data affine:\n{np.round(np.asarray(affine), 4)}\nResample the mask onto the "
            "data grid."
        )
    with np.errstate(invalid="ignore"):
        return np.asarray((values != 0) & ~np.isnan(values))


def mask_from_array(
    mask: Any, grid_shape: tuple[int, ...], *, name: str = "mask", where: str = ""
) -> np.ndarray:
    """Return an in-memory mask (boolean/0-1 grid or flat C-order array) as a boolean grid."""
    arr = np.asarray(mask)
    if arr.dtype != bool:
        if arr.dtype.kind not in "iuf":
            raise GridMismatchError(
                f"{name}: expected a boolean array or a NIfTI path{where}, found dtype {arr.dtype}"
            )
        with np.errstate(invalid="ignore"):
            arr = (arr != 0) & ~np.isnan(arr.astype(np.float64))
    size = int(np.prod(grid_shape))
    if arr.shape == tuple(grid_shape):
        return arr
    if arr.ndim == 1 and arr.size == size:
        return arr.reshape(tuple(grid_shape))  # C order, as documented
    raise GridMismatchError(
        f"{name}: shape {arr.shape} fits neither the data grid {tuple(grid_shape)} nor its flat "
        f"form ({size},){where}. A mask must be on the same grid as the data."
    )


def voxel_coords(selection: np.ndarray, affine: Any) -> dict[str, Any]:
    """Coordinates along ``voxel`` for the voxels of a 3-D boolean ``selection``, in C order.

    Returns ``voxel`` (the index: each voxel's flat C-order position on the
    grid, int64, so selections of one grid align and merge like any xarray
    data), ``i, j, k`` (int32 grid indices) and ``x, y, z`` (scanner mm
    through ``affine``), each as ``("voxel", values)`` ready for an xarray
    object.
    """
    i, j, k = np.nonzero(selection)
    flat = np.ravel_multi_index((i, j, k), selection.shape).astype(np.int64)
    xyz = np.asarray(affine, dtype=np.float64) @ np.vstack([i, j, k, np.ones_like(i)]).astype(
        np.float64
    )
    return {
        "voxel": ("voxel", flat),
        "i": ("voxel", i.astype(np.int32)),
        "j": ("voxel", j.astype(np.int32)),
        "k": ("voxel", k.astype(np.int32)),
        "x": ("voxel", xyz[0]),
        "y": ("voxel", xyz[1]),
        "z": ("voxel", xyz[2]),
    }
