"""The ``.neuro`` accessor on xarray objects: ``ds.neuro.cache()``.

``import neurocube`` registers it as soon as xarray is imported too (before or
after neurocube), so every xarray object has it; ``import neurocube.accessor``
registers it at once.

Examples
--------
>>> import numpy as np, xarray as xr, tempfile
>>> import neurocube.accessor
>>> ds = xr.Dataset({"data": (("trial",), np.arange(3.0))},
...                 attrs={"neurocube_sources": []}).chunk(trial=2)
>>> cached = ds.neuro.cache(store=tempfile.mkdtemp(), key="doc")
>>> cached.data.values.tolist()
[0.0, 1.0, 2.0]
"""

from __future__ import annotations

import os
from typing import Any, Generic, TypeVar

import xarray as xr

__all__ = ["NeuroAccessor"]

Obj = TypeVar("Obj", xr.Dataset, xr.DataArray)


class NeuroAccessor(Generic[Obj]):
    """neurocube's methods on a Dataset or DataArray (``obj.neuro``)."""

    def __init__(self, obj: Obj) -> None:
        self._obj: Obj = obj

    def cache(
        self,
        *,
        store: str | os.PathLike[str] | None = None,
        key: str | None = None,
        overwrite: bool = False,
        progress: bool | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> Obj:
        """Cache this object in Zarr and return it reopened; see :func:`neurocube.cache`."""
        from neurocube.caching.core import cache

        return cache(
            self._obj,
            store=store,
            key=key,
            overwrite=overwrite,
            progress=progress,
            storage_options=storage_options,
        )

    def load(self, *, progress: bool | None = None) -> Obj:
        """Compute into memory chunk by chunk, without a second copy; see :func:`neurocube.load`."""
        from neurocube.loading import load

        return load(self._obj, progress=progress)

    def to_nifti(
        self,
        path: str | os.PathLike[str],
        *,
        affine: Any = None,
        grid_shape: Any = None,
        dtype: Any = None,
        overwrite: bool = True,
    ) -> Any:
        """Write a DataArray with a ``voxel`` dim as NIfTI on its grid (NaN elsewhere).

        ``(voxel,)`` gives a 3-D image, ``(voxel, k)`` or ``(k, voxel)`` a 4-D
        one, placed with the DataArray's ``affine`` and ``grid_shape``
        attributes; the inverse of ``open_nifti(path, mask=...)``. See
        :func:`neurocube.io.nifti.voxels_to_nifti`.
        """
        from neurocube.io.nifti import voxels_to_nifti

        if not isinstance(self._obj, xr.DataArray):
            raise TypeError(
                "to_nifti writes one variable: call it on a DataArray, e.g. ds.betas.mean('trial')"
                ".neuro.to_nifti(path)"
            )
        return voxels_to_nifti(
            self._obj, path, affine=affine, grid_shape=grid_shape, dtype=dtype,
            overwrite=overwrite,
        )

    def cache_key(self) -> str:
        """Return the key :func:`neurocube.cache` would file this object under."""
        from neurocube.caching.keys import fingerprint

        return fingerprint(self._obj).key


def _register() -> None:
    # Registering twice (e.g. after importlib.reload) would warn; skip if already there.
    for cls, register in (
        (xr.Dataset, xr.register_dataset_accessor),
        (xr.DataArray, xr.register_dataarray_accessor),
    ):
        existing: Any = getattr(cls, "neuro", None)
        if existing is None:
            register("neuro")(NeuroAccessor)


_register()
