"""Write NIfTI images atomically, and per-voxel results back onto their grid.

Examples
--------
>>> import numpy as np, nibabel as nib, neurocube, tempfile, os
>>> folder = tempfile.mkdtemp()
>>> src = os.path.join(folder, "betas.nii.gz")
>>> volumes = np.arange(4 * 5 * 6 * 3, dtype=np.float32).reshape(4, 5, 6, 3)
>>> path = neurocube.io.save_nifti(src, volumes, np.diag([2.0, 2.0, 2.0, 1.0]))
>>> mask = np.zeros((4, 5, 6), bool); mask[1:3, 2:4, 3] = True
>>> ds = neurocube.open_nifti(src, mask=mask)
>>> out = ds.data.mean("trial").neuro.to_nifti(os.path.join(folder, "mean.nii.gz"))
>>> back = nib.load(out).get_fdata()
>>> bool(np.allclose(back[mask], volumes[mask].mean(axis=1)))
True
>>> bool(np.isnan(back[~mask]).all())
True
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neurocube.errors import FormatError, GridMismatchError, SelectionError
from neurocube.io._atomic import atomic_path

__all__ = ["check_nifti_name", "save_nifti", "scatter_voxels", "voxels_to_nifti"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def check_nifti_name(path: str | os.PathLike[str]) -> Path:
    """Return ``path`` as a Path if its name ends in ``.nii`` or ``.nii.gz``, else refuse it.

    Raises
    ------
    FormatError
        If the name has another suffix (nibabel picks the format from it).
    """
    final = Path(path)
    if not final.name.endswith(NIFTI_SUFFIXES) or final.name in NIFTI_SUFFIXES:
        raise FormatError(
            f"{final}: a NIfTI output needs a name ending in '.nii' or '.nii.gz' (found "
            f"{''.join(final.suffixes) or 'no suffix'!r}); e.g. {final.with_suffix('')}.nii.gz"
        )
    return final


def save_nifti(
    path: str | os.PathLike[str],
    volume: Any,
    affine: Any,
    *,
    dtype: Any = None,
    overwrite: bool = True,
) -> Path:
    """Write a 3-D or 4-D array as NIfTI-1 (gzip when ``path`` ends in ``.gz``), atomically.

    The file appears complete or not at all (written beside it, then renamed).
    To write a per-voxel result of a neurocube reader (a ``voxel`` dim), use
    ``da.neuro.to_nifti(path)`` (:func:`voxels_to_nifti`), which scatters it
    onto its grid first.

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

    Raises
    ------
    FormatError
        If ``path`` does not end in ``.nii`` or ``.nii.gz``, or the array is not 3-D or 4-D.
    OutputExistsError
        If the file exists and ``overwrite`` is False.
    """
    import nibabel as nib

    final = check_nifti_name(path)
    data = np.asarray(getattr(volume, "values", volume))
    if data.ndim not in (3, 4):
        raise FormatError(
            f"{final}: NIfTI volumes are 3-D (x, y, z) or 4-D (x, y, z, t); found an array of "
            f"shape {data.shape}"
        )
    if dtype is not None:
        data = data.astype(dtype)
    image = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm", "sec")
    with atomic_path(final, overwrite=overwrite) as tmp:
        # nibabel chooses gzip from the name: give the temporary file the final suffix
        suffix = ".nii.gz" if final.name.endswith(".gz") else ".nii"
        target = tmp if tmp.name.endswith(suffix) else tmp.with_name(tmp.name + suffix)
        image.to_filename(str(target))
        if target != tmp:
            os.replace(target, tmp)
    return final


def _flat_positions(values: Any, grid: tuple[int, int, int], label: str) -> np.ndarray:
    """Flat C-order grid positions of ``values``'s voxels (its ``voxel`` index, else i, j, k)."""
    size = int(np.prod(grid))
    coords = values.coords
    if "voxel" in coords and coords["voxel"].dtype.kind in "iu":
        flat = np.asarray(coords["voxel"].values, dtype=np.int64)
    elif {"i", "j", "k"} <= set(coords):
        ijk = [np.asarray(coords[c].values, dtype=np.int64) for c in ("i", "j", "k")]
        if any((a < 0).any() or (a >= n).any() for a, n in zip(ijk, grid, strict=True)):
            raise GridMismatchError(
                f"{label}: its i, j, k coordinates reach outside the grid {grid}: the values "
                "come from another grid"
            )
        flat = np.ravel_multi_index(tuple(ijk), grid).astype(np.int64)
    else:
        raise SelectionError(
            f"{label}: the voxel dim has neither a 'voxel' index (flat grid position) nor i, j, "
            "k coordinates, so the voxels cannot be placed on the grid; use values from a "
            "neurocube reader (or keep their voxel coordinates)"
        )
    if flat.size and (flat.min() < 0 or flat.max() >= size):
        raise GridMismatchError(
            f"{label}: voxel positions up to {int(flat.max())} do not fit the grid {grid} "
            f"({size} voxels): the values come from another grid"
        )
    if np.unique(flat).size != flat.size:
        raise SelectionError(f"{label}: some voxels appear more than once along 'voxel'")
    return flat


def scatter_voxels(
    values: Any, grid_shape: Sequence[int], *, label: str = "values"
) -> np.ndarray:
    """Place a DataArray with a ``voxel`` dim onto its grid: ``(X, Y, Z)`` or ``(X, Y, Z, K)``.

    ``(voxel,)`` gives a 3-D volume, ``(voxel, k)`` or ``(k, voxel)`` a 4-D one
    with ``k`` as the 4th axis. Voxels not given are NaN. The values are
    computed (a Dask array is read).
    """
    grid = tuple(int(n) for n in grid_shape)
    if len(grid) != 3:
        raise GridMismatchError(f"{label}: grid_shape {grid} is not a 3-D grid")
    dims = tuple(values.dims)
    if "voxel" not in dims or len(dims) > 2:
        raise SelectionError(
            f"{label}: expected dims ('voxel',), ('voxel', k) or (k, 'voxel'), found {dims}; "
            "reduce or select the other dims first (e.g. .mean('trial'))"
        )
    flat = _flat_positions(values, grid, label)
    data = np.asarray(values.transpose("voxel", ...).values)
    dtype = np.result_type(data.dtype, np.float32)  # NaN outside needs a float
    extra = data.shape[1:]
    volume = np.full((int(np.prod(grid)), *extra), np.nan, dtype=dtype)
    volume[flat] = data
    return volume.reshape(*grid, *extra)


def voxels_to_nifti(
    values: Any,
    path: str | os.PathLike[str],
    *,
    affine: Any = None,
    grid_shape: Sequence[int] | None = None,
    dtype: Any = None,
    overwrite: bool = True,
) -> Path:
    """Write a DataArray with a ``voxel`` dim as NIfTI, scattered onto its grid (NaN elsewhere).

    The inverse of ``open_nifti(path, mask=...)``: ``(voxel,)`` becomes a 3-D
    image, ``(voxel, k)`` or ``(k, voxel)`` a 4-D one. Voxels are placed by
    their ``voxel`` index (the flat C-order grid position every neurocube
    reader gives). ``affine`` and ``grid_shape`` default to the DataArray's
    attributes (set by every neurocube reader). Also ``da.neuro.to_nifti(path)``.

    Raises
    ------
    FormatError
        If ``path`` does not end in ``.nii``/``.nii.gz``.
    SelectionError
        If the dims or voxel coordinates do not allow scattering.
    GridMismatchError
        If the voxels do not fit the grid.
    """
    final = check_nifti_name(path)
    name = getattr(values, "name", None)
    label = f"{'DataArray ' + repr(name) if name is not None else 'the DataArray'} -> {final}"
    attrs = getattr(values, "attrs", {})
    affine = attrs.get("affine") if affine is None else affine
    grid_shape = attrs.get("grid_shape") if grid_shape is None else grid_shape
    if affine is None or grid_shape is None:
        missing = [n for n, v in (("affine", affine), ("grid_shape", grid_shape)) if v is None]
        raise SelectionError(
            f"{label}: no {' and '.join(missing)} to place the voxels with (neurocube readers set "
            "them as attributes; an operation may have dropped them). Pass affine= and "
            "grid_shape=, e.g. from the Dataset the values came from."
        )
    volume = scatter_voxels(values, grid_shape, label=label)
    return save_nifti(final, volume, affine, dtype=dtype, overwrite=overwrite)
