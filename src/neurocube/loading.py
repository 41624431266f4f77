"""Load lazy results into memory without holding them twice.

``ds.compute()`` gathers every chunk and then concatenates them into a new
array, so for a moment the result exists twice. :func:`load` allocates each
output once and lets every chunk write into its place as soon as it is
computed (``dask.array.store``), so peak memory is the output plus the chunks
in flight. An untransformed masked ``open_nifti`` array skips even that copy:
each chunk's volumes are gathered straight into their rows of the output;
several sessions' betas (``Subject.betas``) are loaded so session by session.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["load"]


def load(obj: Any, *, progress: bool | None = None) -> Any:
    """Compute a lazy Dataset or DataArray into numpy arrays, chunk by chunk into place.

    Parameters
    ----------
    obj
        An :class:`xarray.Dataset` or :class:`xarray.DataArray` (Dask-backed
        variables are computed; others are kept).
    progress
        Show a progress bar (None follows ``NEUROCUBE_PROGRESS``).

    Returns
    -------
    Same type as ``obj``, with every variable in memory.

    Notes
    -----
    Under a ``distributed.Client`` the chunks are computed on the workers and
    cannot write into this process's arrays; :func:`load` then falls back to
    ``obj.compute()``.

    Examples
    --------
    >>> import numpy as np, xarray as xr, dask.array as da, neurocube
    >>> ds = xr.Dataset({"v": (("t", "x"), da.ones((4, 3), chunks=2))})
    >>> float(neurocube.load(ds).v.sum())
    12.0
    """
    import dask.array as da
    import xarray as xr

    from neurocube.progress import TaskProgress, active_client

    if active_client() is not None:
        return obj.compute()
    dataset = obj._to_temp_dataset() if isinstance(obj, xr.DataArray) else obj
    sources: list[Any] = []
    targets: list[np.ndarray] = []
    replaced: dict[Any, xr.Variable] = {}
    direct = _direct_loader()
    # The bar follows every Dask computation inside, also the pieces a direct loader stores.
    with TaskProgress("loading", progress=progress):
        for name, variable in dataset.variables.items():
            if isinstance(variable.data, da.Array):
                loaded_directly = direct(variable.data) if direct is not None else None
                if loaded_directly is not None:
                    replaced[name] = variable.copy(data=loaded_directly)
                    continue
                target = np.empty(variable.shape, dtype=variable.dtype)
                sources.append(variable.data)
                targets.append(target)
                replaced[name] = variable.copy(data=target)
        if sources:
            da.store(sources, targets, lock=False)
    loaded = dataset.copy()
    for name, variable in replaced.items():
        loaded[name] = variable
    return obj._from_temp_dataset(loaded) if isinstance(obj, xr.DataArray) else loaded


def _direct_loader() -> Any:
    """Return the NIfTI reader's in-place loader, if that reader is in use in this process."""
    import sys

    if "neurocube.sources.nifti" not in sys.modules:
        return None
    from neurocube.sources.nifti_load import direct_load

    return direct_load
