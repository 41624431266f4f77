"""Spectral decomposition caches (the ``spectralbrain`` HDF5 layout) as lazy Datasets.

A cache holds, each optional, ``/eigenvalues`` (k,), ``/eigenvectors`` (N, k),
``/vertices`` (N, 3), ``/faces`` (F, 3) and ``/descriptors/<name>`` (N, T),
gzip-compressed and chunked, with metadata as root attributes and a
``spectralbrain_version`` stamp written last by the original writer.

:func:`open_spectral` turns one file into an ``xarray.Dataset`` whose variables
are Dask arrays chunked along the HDF5 chunks; :func:`open_spectral_many`
stacks several subjects / hemispheres along ``subject`` / ``hemi``.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from neurocube import storage
from neurocube.errors import FormatError, IncompleteFileError, NeurocubeWarning
from neurocube.sources.hdf5 import HDF5DatasetSpec, hdf5_dask_array
from neurocube.sources.hdf5_checks import (
    check_attribute_types,
    check_declared_size,
    check_storage,
    member,
    structure_errors,
    unique_names,
)
from neurocube.sources.hdf5_handles import is_hdf5, location, open_hdf5, pooled_file, stat_key

__all__ = [
    "SPECTRAL_DIMS",
    "VERSION_ATTR",
    "decode_hdf5_attr",
    "guess_spectral",
    "open_spectral",
    "open_spectral_many",
    "spectral_entities",
]

#: Root datasets of the layout and the dims they get.
SPECTRAL_DIMS: dict[str, tuple[str, ...]] = {
    "eigenvalues": ("mode",),
    "eigenvectors": ("vertex", "mode"),
    "vertices": ("vertex", "xyz"),
    "faces": ("face", "corner"),
}

#: The numpy kinds each known dataset may have (the writer stores floats and int64 faces);
#: another kind means the datatype message is damaged (HDF5 would convert the bytes).
SPECTRAL_KINDS: dict[str, str] = {
    "eigenvalues": "f",
    "eigenvectors": "f",
    "vertices": "f",
    "faces": "iu",
}

#: The root attribute the original writer sets last; a file without it is incomplete.
VERSION_ATTR = "spectralbrain_version"

_DESCRIPTORS = "descriptors"
_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")


def decode_hdf5_attr(value: Any) -> Any:
    """Turn an h5py attribute value into plain Python (bool, int, float, str, lists).

    NumPy scalars become Python scalars, byte strings are decoded as UTF-8,
    arrays become (nested) lists of those. Returns None for an empty attribute.
    """
    import h5py

    if isinstance(value, h5py.Empty):
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return [decode_hdf5_attr(item) for item in value.tolist()] if value.ndim else (
            decode_hdf5_attr(value[()])
        )
    if isinstance(value, (list, tuple)):
        return [decode_hdf5_attr(item) for item in value]
    if isinstance(value, np.generic):
        return decode_hdf5_attr(value.item())
    return value


def guess_spectral(
    path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> bool:
    """Return True if ``path`` looks like a spectral cache (cheap sniffing).

    The HDF5 signature must be present and the root must hold at least one of
    the layout's datasets (or the version stamp) and no offspect-style origin
    groups. ``path`` may be a URL (read with ``storage_options``; only the
    superblock and root group travel). Never raises.
    """
    try:
        if not is_hdf5(path, storage_options):
            return False
        with open_hdf5(path, storage_options) as h5:
            names = set(h5.keys())
            known = names & {*SPECTRAL_DIMS, _DESCRIPTORS}
            if not known and VERSION_ATTR not in h5.attrs:
                return False
            return all(name in SPECTRAL_DIMS or name == _DESCRIPTORS for name in known)
    except Exception:
        return False


def open_spectral(
    path: str | os.PathLike[str],
    *,
    strict: bool = False,
    chunks: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Open a spectral decomposition cache lazily.

    Parameters
    ----------
    path
        An HDF5 file written by spectralbrain's ``save_hdf5`` (or
        :func:`neurocube.io.save_spectral`): a local path or a URL
        (``s3://bucket/key.h5``, ``https://...``). Opening a URL reads the
        file's metadata only (its superblock, object headers and attributes);
        array chunks travel when computed, as concurrent range requests.
    strict
        If True, a file without the ``spectralbrain_version`` stamp (left
        half-written by its writer) raises :class:`~neurocube.errors.IncompleteFileError`;
        by default it opens with a :class:`~neurocube.errors.NeurocubeWarning`.
    chunks
        Dask chunks per HDF5 dataset name (``{"eigenvectors": (10000, 50)}``);
        by default whole HDF5 chunks grown to about 64 MiB.
    storage_options
        For a URL: options handed to fsspec (``{"anon": True}`` for a public
        bucket, or keys and an endpoint). They travel with the lazy arrays to
        Dask workers; no secret appears in attrs, reprs or task names.

    Returns
    -------
    xarray.Dataset
        ``eigenvalues(mode)``, ``eigenvectors(vertex, mode)``,
        ``vertices(vertex, xyz)``, ``faces(face, corner)`` and one
        ``<name>(vertex, <name>_scale)`` per descriptor, each present only if in
        the file; the root attributes decoded to Python values in ``attrs``,
        plus ``neurocube_sources`` and ``neurocube_descriptors``.

    Raises
    ------
    DataNotFoundError
        If the file does not exist (the message names it).
    AccessDeniedError
        If the storage refuses access (HTTP 403): credentials may be needed.
    FormatError
        If it is not HDF5, not this layout, or its arrays disagree on sizes.
    IncompleteFileError
        If ``strict`` and the version stamp is missing.

    Examples
    --------
    >>> ds = open_spectral("sub-01_lh_white_spectral.h5")  # doctest: +SKIP
    >>> ds.eigenvectors.isel(mode=slice(0, 10)).compute()  # doctest: +SKIP
    """
    options = storage.as_options(storage_options)
    key = stat_key(path, options)
    local = key[0]
    options = None if storage.is_local(local) else options
    storage.remember_options(local, options)
    chunks = dict(chunks or {})
    with pooled_file(*key, options, heap_checked=True) as h5, structure_errors(local):
        names = set(unique_names(h5, local))
        unknown_groups = sorted(
            name
            for name in names
            if name != _DESCRIPTORS and name not in SPECTRAL_DIMS
        )
        known = names & {*SPECTRAL_DIMS, _DESCRIPTORS}
        has_version = VERSION_ATTR in h5.attrs
        if not known and not has_version:
            raise FormatError(
                f"{local}: expected a spectral cache (datasets {sorted(SPECTRAL_DIMS)} or "
                f"'{_DESCRIPTORS}/<name>', attribute {VERSION_ATTR!r}); found "
                f"{sorted(names) or 'an empty file'}. For TMS trace caches use "
                "neurocube.open_traces."
            )
        if not has_version:
            message = (
                f"{local}: incomplete spectral cache: no {VERSION_ATTR!r} attribute, which the "
                "writer sets last, so the file was left half-written (e.g. a metadata value it "
                f"could not store). It holds only {sorted(names)}; re-create it (e.g. with "
                "neurocube.io.save_spectral) before trusting it."
            )
            if strict:
                raise IncompleteFileError(message)
            warnings.warn(message, NeurocubeWarning, stacklevel=2)
        specs: dict[str, tuple[HDF5DatasetSpec, tuple[str, ...]]] = {}
        for name, dims in SPECTRAL_DIMS.items():
            if name in names:
                dset = _dataset(h5, name, local)
                if np.dtype(dset.dtype).kind not in SPECTRAL_KINDS[name]:
                    expected = "floats" if SPECTRAL_KINDS[name] == "f" else "integers"
                    raise FormatError(
                        f"{local}: expected {name!r} to hold {expected}, found "
                        f"{np.dtype(dset.dtype)}; its datatype is damaged or the file is not a "
                        "spectral cache. Re-create it."
                    )
                spec = HDF5DatasetSpec.from_dataset(dset, key, options)
                specs[name] = (spec, _dims_for(dims, dset.ndim))
        descriptor_names: list[str] = []
        if _DESCRIPTORS in names:
            group = member(h5, _DESCRIPTORS, local)
            import h5py

            if not isinstance(group, h5py.Group):
                raise FormatError(
                    f"{local}: expected '{_DESCRIPTORS}' to be a group of datasets, found a dataset"
                )
            for name in sorted(group.keys()):
                dset = _dataset(h5, f"{_DESCRIPTORS}/{name}", local)
                var = name if name not in SPECTRAL_DIMS else f"descriptor_{name}"
                dims = ("vertex", f"{name}_scale")[: dset.ndim]
                if dset.ndim > 2:
                    dims = ("vertex", *(f"{name}_dim{i}" for i in range(1, dset.ndim)))
                specs[var] = (HDF5DatasetSpec.from_dataset(dset, key, options), dims)
                descriptor_names.append(var)
        for name in unknown_groups:
            obj = member(h5, name, local)
            import h5py

            if isinstance(obj, h5py.Dataset):
                check_declared_size(obj, local)
                dims = tuple(f"{name}_dim{i}" for i in range(obj.ndim))
                specs[name] = (HDF5DatasetSpec.from_dataset(obj, key, options), dims)
        attrs: dict[str, Any] = {}
        check_attribute_types(h5, local)
        for attr_name in h5.attrs:
            value = decode_hdf5_attr(h5.attrs[attr_name])
            if value is not None:
                attrs[str(attr_name)] = value
        if not specs:
            raise FormatError(
                f"{local}: expected a spectral cache with at least one array; found "
                f"{sorted(names) or 'no members'} (its group index may be damaged). Re-create it."
            )
        stored = {spec.dataset: h5[spec.dataset] for spec, _ in specs.values()}
        check_storage(h5, stored, local, complete=True)
    _check_sizes(specs, local)
    data_vars = {
        name: xr.Variable(dims, hdf5_dask_array(spec, chunks.get(name)))
        for name, (spec, dims) in specs.items()
    }
    coords: dict[str, Any] = {}
    if "vertices" in specs and specs["vertices"][0].shape[1:] == (3,):
        coords["xyz"] = ("xyz", np.array(["x", "y", "z"]))
    attrs["neurocube_sources"] = [local]
    attrs["neurocube_descriptors"] = descriptor_names
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def _dataset(h5: Any, name: str, local: str) -> Any:
    import h5py

    group, _, leaf = name.rpartition("/")
    obj = member(h5[group] if group else h5, leaf, local)
    if not isinstance(obj, h5py.Dataset):
        raise FormatError(f"{local}: expected {name!r} to be a dataset, found a group")
    check_declared_size(obj, local)
    return obj


def _dims_for(dims: tuple[str, ...], ndim: int) -> tuple[str, ...]:
    if ndim == len(dims):
        return dims
    return tuple(f"{dims[0]}_dim{i}" for i in range(ndim))


def _check_sizes(specs: Mapping[str, tuple[HDF5DatasetSpec, tuple[str, ...]]], local: str) -> None:
    seen: dict[str, tuple[int, str]] = {}
    for spec, dims in specs.values():
        for dim, size in zip(dims, spec.shape, strict=True):
            if dim in seen and seen[dim][0] != size:
                other_size, other = seen[dim]
                raise FormatError(
                    f"{local}: {spec.dataset!r} has {size} along {dim!r} but {other!r} has "
                    f"{other_size}; the arrays of one cache must agree. Re-create the file."
                )
            seen.setdefault(dim, (size, spec.dataset))


# -- several files -------------------------------------------------------------------

_HEMI_WORDS = {"l": "L", "lh": "L", "left": "L", "r": "R", "rh": "R", "right": "R"}


def spectral_entities(path: str | os.PathLike[str]) -> dict[str, str]:
    """Return ``subject`` and ``hemi`` parsed from a file name (BIDS-like entities).

    ``sub-01_hemi-L_...`` gives ``{"subject": "01", "hemi": "L"}``; a bare
    ``lh``/``rh`` token (``sub-01_lh_white_spectral.h5``) also names the hemisphere.
    Hemispheres are normalised to ``"L"``/``"R"``. ``path`` may be a URL.
    """
    stem = storage.basename(os.fspath(path))
    for suffix in _SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    found: dict[str, str] = {}
    for token in re.split(r"[_.]", stem):
        key, sep, value = token.partition("-")
        if sep and key == "sub" and value:
            found["subject"] = value
        elif sep and key == "hemi" and value:
            found["hemi"] = _HEMI_WORDS.get(value.lower(), value)
        elif not sep and token.lower() in {"lh", "rh"} and "hemi" not in found:
            found["hemi"] = _HEMI_WORDS[token.lower()]
    return found


def open_spectral_many(
    paths: Iterable[str | os.PathLike[str]],
    *,
    strict: bool = False,
    chunks: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Open several spectral caches and stack them along ``subject`` and/or ``hemi``.

    The entity that differs between the files (from their names, see
    :func:`spectral_entities`; else from their ``subject``/``hemi`` metadata)
    becomes a new leading dim with its values as coordinate. When both differ,
    the files must form a full subject x hemi grid.

    Parameters
    ----------
    paths
        The cache files (local paths or URLs).
    strict, chunks, storage_options
        As in :func:`open_spectral` (the same options for every URL).

    Returns
    -------
    xarray.Dataset
        Variables get a leading ``subject`` and/or ``hemi`` dim; attributes
        that agree across files are kept, ``neurocube_sources`` lists all files.

    Raises
    ------
    FormatError
        If the files hold different variables, disagree on a size (e.g. left and
        right hemispheres with different vertex counts), cannot be told apart
        by subject/hemi, or do not form a full grid.
    """
    path_list = [location(p) for p in paths]
    if not path_list:
        raise FormatError("open_spectral_many: no paths given; pass at least one spectral cache.")
    datasets = [
        open_spectral(p, strict=strict, chunks=chunks, storage_options=storage_options)
        for p in path_list
    ]
    labels: list[dict[str, str]] = []
    for path, ds in zip(path_list, datasets, strict=True):
        found = spectral_entities(path)
        for entity in ("subject", "hemi"):
            if entity not in found and isinstance(ds.attrs.get(entity), str):
                value = ds.attrs[entity]
                found[entity] = (
                    _HEMI_WORDS.get(value.lower(), value) if entity == "hemi" else value
                )
        labels.append(found)
    varying = [
        entity
        for entity in ("subject", "hemi")
        if len({lab.get(entity) for lab in labels}) > 1
    ]
    if len(path_list) > 1 and not varying:
        raise FormatError(
            "open_spectral_many: cannot tell the files apart: none has a distinct subject "
            "(sub-XX) or hemisphere (hemi-L/R, lh/rh) in its name or metadata: "
            f"{[str(p) for p in path_list]}. Rename them with BIDS entities."
        )
    for entity in varying:
        missing = [str(p) for p, lab in zip(path_list, labels, strict=True) if entity not in lab]
        if missing:
            raise FormatError(
                f"open_spectral_many: the files differ by {entity} but these name none: {missing}."
            )
    keys = [tuple(lab[e] for e in varying) for lab in labels]
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        raise FormatError(
            f"open_spectral_many: several files share the same {varying}: {dupes}. "
            "Pass each subject/hemisphere once."
        )
    _check_compatible(path_list, datasets)
    by_key = dict(zip(keys, datasets, strict=True))
    if len(varying) == 1:
        dim = varying[0]
        combined = _concat([by_key[k] for k in keys], dim, [k[0] for k in keys])
    elif len(varying) == 2:
        subjects = list(dict.fromkeys(k[0] for k in keys))
        hemis = list(dict.fromkeys(k[1] for k in keys))
        absent = [(s, h) for s in subjects for h in hemis if (s, h) not in by_key]
        if absent:
            raise FormatError(
                "open_spectral_many: files differ by subject and hemi but do not form a full "
                f"grid; missing (subject, hemi): {absent}. Pass the missing files or open the "
                "groups separately."
            )
        rows = [_concat([by_key[(s, h)] for h in hemis], "hemi", hemis) for s in subjects]
        combined = _concat(rows, "subject", subjects)
    else:
        combined = datasets[0].copy()
    combined.attrs["neurocube_sources"] = [str(ds.attrs["neurocube_sources"][0]) for ds in datasets]
    return combined


def _check_compatible(paths: Sequence[str], datasets: Sequence[xr.Dataset]) -> None:
    first_path, first = paths[0], datasets[0]
    for path, ds in zip(paths[1:], datasets[1:], strict=True):
        if set(ds.data_vars) != set(first.data_vars):
            raise FormatError(
                f"open_spectral_many: {path} holds {sorted(map(str, ds.data_vars))} but "
                f"{first_path} holds {sorted(map(str, first.data_vars))}; all files must hold "
                "the same arrays."
            )
        for dim, size in ds.sizes.items():
            if first.sizes.get(dim) != size:
                raise FormatError(
                    f"open_spectral_many: {path} has {size} along {dim!r} but {first_path} has "
                    f"{first.sizes.get(dim)}; shapes must agree to stack (different meshes, "
                    "e.g. left/right hemispheres of different sizes, cannot share a vertex dim)."
                )


def _concat(datasets: Sequence[xr.Dataset], dim: str, values: Sequence[str]) -> xr.Dataset:
    combined = xr.concat(
        list(datasets),
        dim=dim,
        data_vars="all",
        coords="minimal",
        compat="override",
        join="exact",
        combine_attrs="drop_conflicts",
    )
    return combined.assign_coords({dim: (dim, np.array(list(values), dtype=str))})
