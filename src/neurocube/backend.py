"""xarray backend: ``xr.open_dataset(path, engine="neurocube")``.

Registered through the ``xarray.backends`` entry point. NIfTI files open with
xarray's lazy indexing (``chunks={}`` gives Dask arrays chunked by whole
volumes); other single-file formats are handed to their neurocube readers.
Paths may be URLs (``s3://...``, ``https://...``): pass ``storage_options=``
(a dict handed to fsspec), which reaches the format sniffers and the reader.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
from xarray.backends import BackendArray, BackendEntrypoint
from xarray.core import indexing

from neurocube import storage
from neurocube.errors import DataNotFoundError, FormatError, ReaderNotFoundError

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

    from neurocube.sources import gzindex_store
    from neurocube.sources.nifti import build_parts

    parts = build_parts(path, **kwargs)
    gz = parts.array.spec.gzip
    if gz is not None and gz.index_path is not None and gz.store is not None:
        gzindex_store.fetch_index(gz)  # an index shared in the store: no first pass over the data
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


# -- the other single-file formats: plain NPZ, parquet tables, GIFTI, connectome TSV ------------

#: A connectome TSV or GIFTI file larger than this is not sniffed by reading it whole.
_SMALL_TEXT = 256 << 20


def _head(path: str, opts: Any, n: int) -> bytes:
    try:
        if storage.is_local(path):
            with storage.open_file(path, "rb") as fh:
                return bytes(fh.read(n))
        size = storage.info(path, opts).size
        return bytes(storage.read_range(path, 0, min(n, size), opts))
    except (OSError, ValueError):
        return b""


def _size(path: str, opts: Any) -> int:
    try:
        return int(storage.info(path, opts).size)
    except (OSError, ValueError):
        return -1


def sniff_npz(path: str, storage_options: Any = None) -> bool:
    """Return True for a ZIP archive named ``*.npz`` (``np.savez``, ``neurocube.io.save_npz``)."""
    return str(path).lower().endswith(".npz") and _head(path, storage_options, 4) == b"PK\x03\x04"


def _open_npz(path: str, storage_options: Any = None) -> Any:
    """Every array of an NPZ as a variable (dims ``<name>_dim_<n>``), one Dask chunk each."""
    import dask
    import dask.array as da
    import xarray as xr

    from neurocube.sources.npz import read_member, read_npz_directory

    members = read_npz_directory(path, storage_options)
    data_vars = {}
    for name, member in members.items():
        dtype = np.dtype(member.dtype)
        if dtype.hasobject:
            raise FormatError(
                f"{path}: array {name!r} holds Python objects (it would need pickle to read); "
                "neurocube reads numeric and string arrays only. Load it with "
                "np.load(path, allow_pickle=True) if you trust the file."
            )
        lazy = da.from_delayed(
            dask.delayed(read_member, pure=True)(member, dask_key_name=f"npz-{name}-{path}"),
            shape=member.shape, dtype=dtype.newbyteorder("="),
        )  # fmt: skip
        dims = tuple(f"{name}_dim_{n}" for n in range(len(member.shape)))
        data_vars[name] = xr.Variable(dims, lazy)
    attrs = {"source_format": "NPZ archive", "neurocube_sources": [str(path)]}
    return xr.Dataset(data_vars, attrs=attrs)


def sniff_parquet(path: str, storage_options: Any = None) -> bool:
    """Return True for a file that starts with the parquet magic ``PAR1``."""
    return _head(path, storage_options, 4) == b"PAR1"


_COMBINED_NAME = re.compile(r"^(?P<model>.+)_(?P<cond>[^_]+)_(?P<rep>epoch|recording|subject)"
                            r"_embeddings\.parquet$")  # fmt: skip


def _open_parquet(
    path: str,
    *,
    representation: str | None = None,
    min_chunk_rows: int = 65536,
    storage_options: Any = None,
) -> Any:
    """Open a parquet table: a combined embedding table, or a long-form one such as tracks.

    A table with ``embedding_*`` columns opens as ``open_combined_table`` does
    (``embedding(<representation>, feature)``). Any other table opens in long
    form: dim ``row``, one variable per numeric column, ``frame, time, id`` as
    coordinates (a tracks file of a behaviour dataset opens as ``tracks()``
    gives it, without the dataset's group / sequence labels); string columns
    are listed in ``attrs["skipped_columns"]``. One Dask chunk per run of row
    groups of at least ``min_chunk_rows`` rows.
    """
    import xarray as xr

    from neurocube.sources.parquet import group_chunks, lazy_columns, plan_chunks
    from neurocube.sources.parquet_meta import read_parquet_info

    info = read_parquet_info(path, storage_options=storage_options)
    if any(c.startswith("embedding_") for c in info.columns):
        from neurocube.datasets.embeddings import open_combined_file

        match = _COMBINED_NAME.match(storage.basename(path))
        rep = representation or (match["rep"] if match else "recording")
        return open_combined_file(
            path, rep, model_key=match["model"] if match else "",
            condition=match["cond"] if match else "", storage_options=storage_options,
        )  # fmt: skip
    columns = list(info.dtypes)
    dtypes = [info.dtypes[c] for c in columns]
    specs = plan_chunks(info, columns, dtypes, min_chunk_rows=min_chunk_rows)
    arrays = lazy_columns(group_chunks(specs, min_chunk_rows), columns, dtypes, name="parquet")
    keys = [c for c in ("frame", "time", "id") if c in arrays]
    ds = xr.Dataset(
        {c: ("row", arrays[c]) for c in columns if c not in keys},
        coords={k: ("row", arrays[k]) for k in keys},
    )
    ds.attrs.update({
        "source_format": "parquet table (long form)",
        "neurocube_sources": [info.path],
    })  # fmt: skip
    if info.other_columns:
        ds.attrs["skipped_columns"] = sorted(info.other_columns)
    return ds


def sniff_gifti(path: str, storage_options: Any = None) -> bool:
    """Return True for an XML file with a ``<GIFTI`` root element, named ``*.gii``."""
    if not str(path).lower().endswith(".gii"):
        return False
    head = _head(path, storage_options, 4096)
    return head.lstrip().startswith(b"<?xml") and b"<GIFTI" in head


def _open_gifti(path: str, storage_options: Any = None) -> Any:
    """Open a functional GIFTI (``.func.gii``) as ``data(vertex, map)``, a map per data array.

    GIFTI stores its arrays as encoded XML text, so the file is read whole when
    opened (such maps are small: one value per vertex).
    """
    import nibabel as nib
    import xarray as xr

    with storage.open_file(path, "rb", storage_options) as fh:
        raw = fh.read()
    try:
        image = nib.GiftiImage.from_bytes(raw)
    except Exception as exc:  # nibabel raises many kinds on damaged XML
        raise FormatError(
            f"{path}: not a readable GIFTI file ({type(exc).__name__}: {exc})"
        ) from None
    arrays = [np.asarray(d.data) for d in image.darrays]
    if not arrays or any(a.ndim != 1 or a.shape != arrays[0].shape for a in arrays):
        shapes = [a.shape for a in arrays]
        raise FormatError(
            f"{path}: expected a functional GIFTI (data arrays of one value per vertex, all the "
            f"same length), found data arrays of shapes {shapes}; a surface geometry "
            "(.surf.gii) opens with nibabel.load"
        )
    values = np.stack(arrays, axis=1)
    intents = [nib.nifti1.intent_codes.label[d.intent] for d in image.darrays]
    return xr.Dataset(
        {"data": (("vertex", "map"), values)},
        coords={"intent": ("map", np.asarray(intents, dtype=str))},
        attrs={"source_format": "GIFTI (functional)", "neurocube_sources": [str(path)]},
    )


def sniff_connectome(path: str, storage_options: Any = None) -> bool:
    """Return True for a ``*.tsv`` holding a square numeric matrix (labels optional)."""
    if not str(path).lower().endswith(".tsv") or not 0 < _size(path, storage_options) < _SMALL_TEXT:
        return False
    try:
        _open_connectome(path, storage_options)
    except (FormatError, OSError, ValueError, UnicodeDecodeError):
        return False
    return True


def _open_connectome(path: str, storage_options: Any = None) -> Any:
    """Open a connectome TSV as ``connectome(source, target)`` (read whole: it is small)."""
    from neurocube.io.spectral import read_connectome

    if storage.is_local(path):
        matrix = read_connectome(path)
    else:
        import tempfile

        with storage.open_file(path, "rb", storage_options) as fh:
            raw = fh.read()
        with tempfile.NamedTemporaryFile(suffix=".tsv") as local:  # the reader takes a path
            local.write(raw)
            local.flush()
            matrix = read_connectome(local.name).load()
        matrix.attrs["neurocube_sources"] = [str(path)]
    ds = matrix.to_dataset(name="connectome")
    ds.attrs["source_format"] = "connectome TSV"
    ds.attrs["neurocube_sources"] = matrix.attrs.get("neurocube_sources", [str(path)])
    return ds


def single_file_readers() -> list[tuple[str, str, str, tuple[str, ...]]]:
    """Every single-file reader: (name, sniffing function, opener, keyword arguments it takes).

    Sniffers look at magic bytes and layout, never at the suffix alone; each
    takes ``(path, storage_options)``.
    """
    return [
        ("nifti", "neurocube.sources.nifti_header:sniff_nifti",
         "neurocube.backend:_open_nifti_lazy",
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
        ("NPZ arrays", "neurocube.backend:sniff_npz", "neurocube.backend:_open_npz",
         ("storage_options",)),
        ("parquet table (tracks, combined embeddings)", "neurocube.backend:sniff_parquet",
         "neurocube.backend:_open_parquet",
         ("representation", "min_chunk_rows", "storage_options")),
        ("GIFTI (.func.gii)", "neurocube.backend:sniff_gifti", "neurocube.backend:_open_gifti",
         ("storage_options",)),
        ("connectome (TSV)", "neurocube.backend:sniff_connectome",
         "neurocube.backend:_open_connectome", ("storage_options",)),
    ]


def resolve_dotted(dotted: str) -> Any:
    """Return the object named by ``"module:attribute"`` (importing the module)."""
    import importlib

    module, _, attr = dotted.partition(":")
    return getattr(importlib.import_module(module), attr)


class NeurocubeBackendEntrypoint(BackendEntrypoint):
    """Open neurocube's single-file formats with ``xr.open_dataset(..., engine="neurocube")``."""

    description = (
        "Lazy NIfTI (.nii, .nii.gz), spectral / TMS HDF5, embedding NPZ, parquet tables, "
        "GIFTI and connectome TSV files via neurocube"
    )
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
            readers = single_file_readers()
            return any(bool(resolve_dotted(sniff)(path)) for _, sniff, _, _ in readers)
        return path.endswith((".nii", ".nii.gz", ".func.gii", ".npz", ".parquet"))

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
        for name, sniff, opener, accepted in single_file_readers():
            if not resolve_dotted(sniff)(path, opts):
                continue
            unknown = sorted(set(kwargs) - set(accepted))
            if unknown:
                raise TypeError(
                    f"{path}: the {name} reader takes {', '.join(accepted) or 'no options'}; "
                    f"got {', '.join(unknown)}"
                )
            if opts is not None:
                kwargs["storage_options"] = opts.as_dict()
            ds = resolve_dotted(opener)(path, **kwargs)
            if drop_variables is not None:
                dropped = (
                    [drop_variables] if isinstance(drop_variables, str) else list(drop_variables)
                )
                ds = ds.drop_vars(dropped, errors="ignore")
            return ds
        if not storage.exists(path, opts):
            raise DataNotFoundError(f"{path}: no such file")
        names = ", ".join(name for name, _, _, _ in single_file_readers())
        raise ReaderNotFoundError(
            f"{path}: no neurocube reader recognises this file (by its magic bytes and layout). "
            f"Readers: {names}. For other formats use xarray's own engines (netcdf4, h5netcdf, "
            "zarr)."
        )
