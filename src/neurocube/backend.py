"""xarray backend: ``xr.open_dataset(path, engine="neurocube")``.

Registered through the ``xarray.backends`` entry point. NIfTI files open with
xarray's lazy indexing (``chunks={}`` gives Dask arrays chunked by whole
volumes); other single-file formats are handed to their neurocube readers.
Paths may be URLs (``s3://...``, ``https://...``): pass ``storage_options=``
(a dict handed to fsspec), which reaches the format sniffers and the reader.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np
from xarray.backends import BackendArray, BackendEntrypoint
from xarray.core import indexing

from neurocube import storage
from neurocube.errors import DataNotFoundError, ReaderNotFoundError

__all__ = ["NeurocubeBackendEntrypoint"]


class _NiftiBackendArray(BackendArray):
    """Lets xarray index a NIfTI lazily; reads only the volumes a selection touches."""

    def __init__(self, volumes: Any) -> None:
        self.volumes = volumes
        self.shape = volumes.shape
        self.dtype = volumes.dtype

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.BASIC, self.volumes.__getitem__
        )


def _open_nifti_lazy(path: str, **kwargs: Any) -> Any:
    import xarray as xr

    from neurocube.sources import gzindex
    from neurocube.sources.nifti import build_parts

    parts = build_parts(path, **kwargs)
    gz = parts.array.spec.gzip
    if gz is not None and gz.index_path is not None and gz.store is not None:
        gzindex.fetch_index(gz)  # an index shared in the store: no first pass over the data
    var = xr.Variable(
        parts.dims, indexing.LazilyIndexedArray(_NiftiBackendArray(parts.array)),
        attrs=parts.variable_attrs(),
    )
    trial_chunks = parts.chunks[parts.dims.index("trial")] if "trial" in parts.dims else None
    if trial_chunks:
        var.encoding["preferred_chunks"] = {
            d: (trial_chunks[0] if d == "trial" else parts.array.shape[n])
            for n, d in enumerate(parts.dims)
        }
    return xr.Dataset({"data": var}, coords=parts.coords, attrs=parts.attrs)


def _open_embedding_file(path: str, **kwargs: Any) -> Any:
    from neurocube.datasets.embeddings import open_embeddings

    default = "token" if path.endswith("_tokens.npz") else "recording"
    return open_embeddings(path, representation=kwargs.pop("representation", default), **kwargs)


def _readers() -> list[tuple[str, str, str, tuple[str, ...]]]:
    """Every single-file reader: (name, sniffing function, opener, keyword arguments it takes).

    Sniffers look at magic bytes and layout, never at the suffix alone; each
    takes ``(path, storage_options)``.
    """
    return [
        ("nifti", "neurocube.sources.nifti:sniff_nifti", "neurocube.backend:_open_nifti_lazy",
         ("mask", "index", "chunks", "cache_dir", "storage_options", "index_store",
          "index_store_options")),
        ("spectral (HDF5)", "neurocube.datasets.spectral:guess_spectral",
         "neurocube.datasets.spectral:open_spectral", ("strict", "chunks", "storage_options")),
        ("TMS traces (HDF5)", "neurocube.datasets.traces:guess_traces",
         "neurocube.datasets.traces:open_traces",
         ("traces_per_chunk", "ragged", "use_cache", "storage_options")),
        ("embedding (NPZ + JSON)", "neurocube.catalog.embeddings:guess_npz_embedding",
         "neurocube.backend:_open_embedding_file",
         ("representation", "files_per_chunk", "storage_options")),
    ]


def _load(dotted: str) -> Any:
    import importlib

    module, _, attr = dotted.partition(":")
    return getattr(importlib.import_module(module), attr)


class NeurocubeBackendEntrypoint(BackendEntrypoint):
    """Open neurocube's single-file formats with ``xr.open_dataset(..., engine="neurocube")``."""

    description = "Lazy NIfTI (.nii, .nii.gz) and neuroscience HDF5/NPZ files via neurocube"
    url = "https://github.com/neurocube/neurocube"
    open_dataset_parameters = ("filename_or_obj", "drop_variables")

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        """Sniff magic bytes and layout; fall back to the suffix for URLs and missing files.

        xarray asks without ``storage_options``, so a URL is judged by its
        suffix alone (nothing travels); pass ``engine="neurocube"`` for others.
        """
        if not isinstance(filename_or_obj, (str, os.PathLike)):
            return False
        path = str(filename_or_obj)
        if storage.is_local(path) and storage.isfile(path):
            return any(bool(_load(sniff)(path)) for _, sniff, _, _ in _readers())
        return path.endswith((".nii", ".nii.gz"))

    def open_dataset(
        self,
        filename_or_obj: Any,
        *,
        drop_variables: str | Iterable[str] | None = None,
        storage_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Open ``filename_or_obj`` with the first neurocube reader that recognises it.

        ``storage_options`` (for a URL: a dict handed to fsspec, e.g.
        ``{"anon": True}`` or keys and an endpoint) reaches the sniffers and the
        reader. Other keyword arguments go to that reader (``mask=``/``index=``/
        ``index_store=`` for NIfTI, ``strict=`` for spectral caches,
        ``representation=`` for embeddings...).
        """
        path = os.fspath(filename_or_obj)
        opts = storage.as_options(storage_options)
        if not storage.is_local(path):
            # a missing or forbidden object says so now, not as "no reader recognises it"
            if storage.info(path, opts).is_dir:
                raise DataNotFoundError(f"{path}: a folder (prefix), expected a file")
        for name, sniff, opener, accepted in _readers():
            if not _load(sniff)(path, opts):
                continue
            unknown = sorted(set(kwargs) - set(accepted))
            if unknown:
                raise TypeError(
                    f"{path}: the {name} reader takes {', '.join(accepted) or 'no options'}; "
                    f"got {', '.join(unknown)}"
                )
            if opts is not None:
                kwargs["storage_options"] = opts.as_dict()
            ds = _load(opener)(path, **kwargs)
            if drop_variables is not None:
                dropped = (
                    [drop_variables] if isinstance(drop_variables, str) else list(drop_variables)
                )
                ds = ds.drop_vars(dropped, errors="ignore")
            return ds
        if not storage.exists(path, opts):
            raise DataNotFoundError(f"{path}: no such file")
        names = ", ".join(name for name, _, _, _ in _readers())
        raise ReaderNotFoundError(
            f"{path}: no neurocube reader recognises this file (by its magic bytes and layout). "
            f"Readers: {names}. For other formats use xarray's own engines (netcdf4, h5netcdf, "
            "zarr)."
        )
