"""Writers (and the connectome reader) of the spectralbrain formats, all atomic.

- :func:`save_spectral`: the HDF5 cache (gzip, chunked, metadata as root
  attributes, ``spectralbrain_version`` stamp), readable by the original
  ``load_hdf5`` and by :func:`neurocube.open_spectral`;
- :func:`save_connectome` / :func:`read_connectome`: square matrices as TSV;
- :func:`save_gifti_func`: scalar maps as ``.func.gii`` (float32, intent SHAPE);
- :func:`save_npz`: named arrays, ``np.savez_compressed``.

Each writes a temporary sibling and renames it into place, so a failure part
way leaves no file (or the previous one).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neurocube.errors import FormatError
from neurocube.io._atomic import atomic_path
from neurocube.storage import open_file

__all__ = [
    "SPECTRAL_FORMAT_VERSION",
    "read_connectome",
    "save_connectome",
    "save_gifti_func",
    "save_npz",
    "save_spectral",
    "validate_spectral_metadata",
]

#: The version stamp written into caches (the format of spectralbrain 0.1.0's ``save_hdf5``).
SPECTRAL_FORMAT_VERSION = "0.1.0"

_MAIN = ("eigenvalues", "eigenvectors", "vertices", "faces")
_VERSION_ATTR = "spectralbrain_version"


# -- HDF5 cache ------------------------------------------------------------------------


def validate_spectral_metadata(metadata: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """Check that every metadata value can be an HDF5 attribute; return them normalised.

    Allowed: str, bool, int, float (NumPy scalars too), and flat lists / 1-D
    arrays of numbers or of strings.

    Raises
    ------
    FormatError
        Naming every key whose value is None, nested (dict, list of lists), or
        a list mixing strings and numbers, before anything is written.
    """
    problems: list[str] = []
    clean: dict[str, Any] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not key or "/" in key:
            problems.append(f"{key!r}: keys must be non-empty strings without '/'")
            continue
        if isinstance(value, np.generic):
            value = value.item()
        if value is None:
            problems.append(f"{key!r}: None cannot be stored (drop the key or use a string)")
        elif isinstance(value, (str, bool, int, float)):
            problem = _scalar_problem(value)
            if problem:
                problems.append(f"{key!r}: {problem}")
            else:
                clean[key] = value
        elif isinstance(value, Mapping):
            problems.append(f"{key!r}: nested dicts cannot be stored (flatten them into keys)")
        elif isinstance(value, (list, tuple, np.ndarray)):
            items = np.asarray(value).tolist() if isinstance(value, np.ndarray) else list(value)
            if isinstance(value, np.ndarray) and value.ndim != 1:
                problems.append(f"{key!r}: only 1-D arrays can be stored, got {value.ndim}-D")
            elif any(item is None for item in items):
                problems.append(f"{key!r}: a list with None cannot be stored")
            elif any(isinstance(item, (list, tuple, dict, np.ndarray)) for item in items):
                problems.append(f"{key!r}: nested lists cannot be stored (flatten them)")
            elif any(_scalar_problem(item) for item in items):
                first = next(p for p in map(_scalar_problem, items) if p)
                problems.append(f"{key!r}: an item {first}")
            elif items and all(isinstance(item, str) for item in items):
                clean[key] = items
            elif all(isinstance(item, (bool, int, float, np.generic)) for item in items):
                clean[key] = np.asarray(items)
            else:
                problems.append(f"{key!r}: a list mixing strings and numbers cannot be stored")
        else:
            problems.append(f"{key!r}: values of type {type(value).__name__} cannot be stored")
    if problems:
        target = f"{where}: " if where else ""
        raise FormatError(
            f"{target}metadata cannot be written as HDF5 attributes (nothing was written): "
            + "; ".join(problems)
        )
    return clean


def _scalar_problem(value: Any) -> str:
    """Why HDF5 cannot hold this scalar as an attribute ("" if it can)."""
    if isinstance(value, str):
        if "\x00" in value:
            return "holds a NUL character, which HDF5 strings cannot store"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "is not valid Unicode (lone surrogates cannot be stored as UTF-8)"
    elif isinstance(value, int) and not isinstance(value, bool):
        if not -(2**63) <= value < 2**64:  # int64, or uint64 when non-negative
            return f"{value} does not fit in 64 bits (store it as a string or a float)"
    return ""


def _collect_arrays(ds_or_arrays: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Return (main arrays, descriptors, metadata from the source)."""
    import xarray as xr

    main: dict[str, Any] = {}
    descriptors: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    if isinstance(ds_or_arrays, xr.Dataset):
        ds = ds_or_arrays
        for name in _MAIN:
            if name in ds.data_vars:
                main[name] = ds[name].data
        listed = ds.attrs.get("neurocube_descriptors")
        names = list(listed) if isinstance(listed, list) else [
            str(v) for v in ds.data_vars if str(v) not in _MAIN
        ]
        for var in names:
            if var not in ds.data_vars:
                continue
            bare = var.removeprefix("descriptor_")
            name = bare if bare in _MAIN else var
            descriptors[name] = ds[var].data
        metadata = {
            k: v
            for k, v in ds.attrs.items()
            if not str(k).startswith("neurocube_") and k != _VERSION_ATTR
        }
    elif isinstance(ds_or_arrays, Mapping):
        unknown = sorted(set(ds_or_arrays) - {*_MAIN, "descriptors"})
        if unknown:
            raise FormatError(
                f"save_spectral: unknown arrays {unknown}; expected {list(_MAIN)} and "
                "'descriptors' (a dict of name -> (N, T) array)."
            )
        for name in _MAIN:
            if ds_or_arrays.get(name) is not None:
                main[name] = ds_or_arrays[name]
        found = ds_or_arrays.get("descriptors") or {}
        if not isinstance(found, Mapping):
            raise FormatError("save_spectral: 'descriptors' must be a dict of name -> array")
        descriptors = dict(found)
    else:
        raise FormatError(
            "save_spectral: expected an xarray.Dataset (as from open_spectral) or a dict of "
            f"arrays, got {type(ds_or_arrays).__name__}"
        )
    for name in descriptors:
        if not name or "/" in name:
            raise FormatError(f"save_spectral: descriptor name {name!r} is not a valid HDF5 name")
    return main, descriptors, metadata


def save_spectral(
    path: str | os.PathLike[str],
    ds_or_arrays: Any,
    metadata: Mapping[str, Any] | None = None,
    *,
    compression: str | None = "gzip",
    compression_opts: int | None = 4,
) -> Path:
    """Write a spectral cache, as spectralbrain's ``save_hdf5`` does, atomically.

    Parameters
    ----------
    path
        The ``.h5`` file to write (replaced if it exists).
    ds_or_arrays
        A Dataset from :func:`neurocube.open_spectral` (Dask arrays are written
        chunk by chunk, never loaded whole), or a dict with any of
        ``eigenvalues`` (k,), ``eigenvectors`` (N, k), ``vertices`` (N, 3),
        ``faces`` (F, 3) and ``descriptors`` (dict name -> (N, T)).
    metadata
        Root attributes; by default the Dataset's attrs (without neurocube's
        own keys). Checked before anything is written (no None, nothing nested).
    compression, compression_opts
        HDF5 filter, gzip level 4 by default (as the original).

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    FormatError
        If the metadata or the arrays cannot be stored; no file is left behind.
    """
    import h5py

    target = Path(path)
    main, descriptors, source_metadata = _collect_arrays(ds_or_arrays)
    meta = validate_spectral_metadata(
        dict(source_metadata if metadata is None else metadata), where=str(target)
    )
    stamp = meta.pop(_VERSION_ATTR, SPECTRAL_FORMAT_VERSION)
    with atomic_path(target) as tmp:
        with h5py.File(tmp, "w") as h5:
            for name, array in main.items():
                _write_array(h5, name, array, compression, compression_opts)
            if descriptors:
                group = h5.create_group("descriptors")
                for name, array in descriptors.items():
                    _write_array(group, name, array, compression, compression_opts)
            for key, value in meta.items():
                h5.attrs[key] = value
            h5.attrs[_VERSION_ATTR] = stamp  # last, as the original: marks the file complete
    return target


def _write_array(
    parent: Any, name: str, array: Any, compression: str | None, level: int | None
) -> None:
    import dask.array as da

    is_dask = isinstance(array, da.Array)
    data = array if is_dask else np.asarray(array)
    if data.dtype == object:
        raise FormatError(f"save_spectral: array {name!r} has object dtype; use numbers")
    options: dict[str, Any] = {}
    if data.size and data.ndim:
        options = {"chunks": True, "compression": compression, "compression_opts": level}
        if compression is None:
            options = {"chunks": True}
    if is_dask:
        dset = parent.create_dataset(name, shape=data.shape, dtype=data.dtype, **options)
        import threading

        da.store(data, dset, lock=threading.Lock())
    else:
        parent.create_dataset(name, data=data, **options)


# -- connectome TSV --------------------------------------------------------------------


def _format_cell(value: float, float_format: str | None) -> str:
    if float_format is not None:
        return float_format % value
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return repr(float(value))


def save_connectome(
    path: str | os.PathLike[str],
    matrix: Any,
    labels: Sequence[Any] | None = None,
    *,
    float_format: str | None = None,
) -> Path:
    """Write a square connectome matrix as TSV (atomically).

    The layout is the newer spectralbrain one: a header row (an empty corner
    cell, then the labels) and a label column; without labels, the labels are
    ``0..R-1``. Values are written at full precision (``repr``) unless
    ``float_format`` (e.g. ``"%.10g"``, the original's) is given.

    Raises
    ------
    FormatError
        If the matrix is not square 2-D, or the labels do not match it (count,
        duplicates, tabs or newlines).
    """
    import xarray as xr

    if isinstance(matrix, xr.DataArray) and labels is None and matrix.dims:
        first = matrix.dims[0]
        if first in matrix.coords:
            labels = [str(v) for v in matrix.coords[first].values.tolist()]
    values = np.asarray(matrix)
    target = Path(path)
    if values.ndim != 2 or values.shape[0] != values.shape[1]:
        raise FormatError(f"{target}: a connectome is a square 2-D matrix, got {values.shape}")
    n = values.shape[0]
    names = [str(i) for i in range(n)] if labels is None else [str(label) for label in labels]
    if len(names) != n:
        raise FormatError(f"{target}: {len(names)} labels for a {n} x {n} matrix")
    if len(set(names)) != n:
        raise FormatError(f"{target}: labels repeat: {names}")
    if any(ch in name for name in names for ch in "\t\n\r") or any(not name for name in names):
        raise FormatError(f"{target}: labels must be non-empty and hold no tabs or newlines")
    lines = ["\t" + "\t".join(names)]
    for name, row in zip(names, values.tolist(), strict=True):
        lines.append(name + "\t" + "\t".join(_format_cell(v, float_format) for v in row))
    with atomic_path(target) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def _parse_float(text: str, target: str, line: int) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise FormatError(
            f"{target}: line {line}: expected a number, found {text!r}. A connectome TSV holds "
            "numbers, with an optional header row and label column."
        ) from exc


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_connectome(path: str | os.PathLike[str]) -> Any:
    """Read a connectome TSV written by either spectralbrain writer (or save_connectome).

    Handles a header row with a label column (labels, or ``0..R-1`` by the
    newer writer) and the older headerless plain matrix.

    Returns
    -------
    xarray.DataArray
        Dims ``("source", "target")`` with the labels as coords (ints when the
        file's labels are ``0..R-1`` or absent, else strings).

    Raises
    ------
    FormatError
        If the table is ragged, not square, or holds non-numbers.
    """
    import xarray as xr

    with open_file(path, "rb") as fh:
        text = fh.read().decode("utf-8-sig")
    target = str(path)
    rows = [line.rstrip("\r").split("\t") for line in text.split("\n") if line.strip()]
    if not rows:
        raise FormatError(f"{target}: empty file; expected a connectome TSV")
    first = rows[0]
    if first[0] == "" or not all(_is_number(cell) for cell in first):
        col_labels = first[1:] if first[0] == "" else first
        body = rows[1:]
        row_labels = [r[0] for r in body]
        cells = [r[1:] for r in body]
    else:
        cells = rows
        col_labels = [str(i) for i in range(len(first))]
        row_labels = [str(i) for i in range(len(rows))]
    n = len(col_labels)
    for i, row in enumerate(cells):
        if len(row) != n:
            raise FormatError(
                f"{target}: line {i + (2 if cells is not rows else 1)}: {len(row)} values, "
                f"expected {n} (one per column label)"
            )
    if len(cells) != n:
        raise FormatError(f"{target}: {len(cells)} rows but {n} columns; a connectome is square")
    values = np.array(
        [
            [_parse_float(c, target, i + 1) for c in row]
            for i, row in enumerate(cells)
        ],
        dtype=np.float64,
    ).reshape(n, n)

    def labels_of(names: list[str]) -> np.ndarray:
        if names == [str(i) for i in range(len(names))]:
            return np.arange(len(names), dtype=np.int64)
        return np.array(names, dtype=str)

    return xr.DataArray(
        values,
        dims=("source", "target"),
        coords={"source": labels_of(row_labels), "target": labels_of(col_labels)},
        attrs={"neurocube_sources": [str(Path(path).absolute())]},
        name="connectome",
    )


# -- GIFTI and NPZ ---------------------------------------------------------------------


def save_gifti_func(path: str | os.PathLike[str], scalars: Any) -> Path:
    """Write a scalar map (N,) or a descriptor matrix (N, T) as ``.func.gii``, atomically.

    One float32 data array per column, intent ``NIFTI_INTENT_SHAPE``, as the
    original writer does.

    Raises
    ------
    FormatError
        If ``scalars`` is not 1-D or 2-D, or not numeric.
    """
    import nibabel as nib

    values = np.asarray(scalars)
    target = Path(path)
    if values.ndim not in (1, 2) or not np.issubdtype(values.dtype, np.number):
        raise FormatError(
            f"{target}: expected a numeric (N,) map or (N, T) matrix, got {values.dtype} "
            f"{values.shape}"
        )
    columns = values[:, None] if values.ndim == 1 else values
    arrays = [
        nib.gifti.GiftiDataArray(
            np.ascontiguousarray(columns[:, j], dtype=np.float32),
            intent="NIFTI_INTENT_SHAPE",
            datatype="NIFTI_TYPE_FLOAT32",
        )
        for j in range(columns.shape[1])
    ]
    image = nib.gifti.GiftiImage(darrays=arrays)
    with atomic_path(target) as tmp:
        nib.save(image, tmp)
    return target


def save_npz(path: str | os.PathLike[str], **arrays: Any) -> Path:
    """Write named arrays with ``np.savez_compressed``, atomically (exactly ``path``).

    Raises
    ------
    FormatError
        If no arrays are given, or one has object dtype (it would need pickle to
        read back).
    """
    target = Path(path)
    if not arrays:
        raise FormatError(f"{target}: save_npz needs at least one named array")
    clean: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        values = np.asarray(array)
        if values.dtype == object:
            raise FormatError(
                f"{target}: array {name!r} has object dtype, which needs pickle to load; "
                "convert it to numbers or fixed-width strings"
            )
        clean[name] = values
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **clean)  # type: ignore[arg-type]
    return target

