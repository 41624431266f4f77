"""``neurocube.cache``: write a lazy Dataset to Zarr once, reopen it lazily ever after."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import warnings
from collections.abc import Hashable, Iterator, Mapping
from datetime import datetime, timezone
from typing import Any, TypeVar

import dask.base
import numpy as np
import xarray as xr

from neurocube import __version__
from neurocube.caching.integrity import (
    ChunkArray,
    EntryProblem,
    VerifiedStore,
    build_manifest,
    check_listing,
    checked_metadata,
    direct_readable,
    marker_checksum,
    plain_variable,
    rebuild_hint,
)
from neurocube.caching.keys import CACHE_FORMAT_VERSION, Fingerprint, fingerprint, source_identity
from neurocube.caching.store import (
    LAST_USE_NAME,
    MARKER_NAME,
    CacheRoot,
    LocalRoot,
    open_root,
    validate_key,
)
from neurocube.errors import (
    CacheError,
    CorruptDataError,
    DataNotFoundError,
    NeurocubeError,
    NeurocubeWarning,
)
from neurocube.progress import compute
from neurocube.storage import is_url, options_for

__all__ = [
    "MIN_CHUNK_BYTES",
    "ZSTD_LEVEL",
    "cache",
    "entry_problem",
    "marker_status",
    "numeric_codec",
    "open_cached",
    "read_marker",
    "touch_entry",
]

#: zstd level of cached string variables (coordinates such as image names).
ZSTD_LEVEL = 1

#: Stored chunks smaller than this are merged along the first dim (whole Dask blocks).
MIN_CHUNK_BYTES = 8 << 20


def numeric_codec() -> Any:
    """Return the compressor of cached numeric variables: Blosc, LZ4, bit-shuffled.

    A cache is read far more often than it is written, and float betas barely
    compress whatever the codec, so the choice is decompression speed. Measured
    on a 300-trial synthetic session (327 MB brain-masked, 38 MB ROI, 12-trial
    chunks): Blosc-LZ4 with bit shuffling stores 90.4 % of raw and reads the ROI
    entry in 15 ms; zstd level 1 stores 92.4 % and reads it in 73 ms (no
    compression: 100 %, 9 ms). Writes are ~2.5x faster too.
    """
    import zarr

    return zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")

_DATAARRAY_VARIABLE = "__neurocube_dataarray__"

# Object dtype tagged as "variable-length str" (xarray's own convention). A Dask variable of
# this dtype is written as Zarr strings chunk by chunk; a plain object dtype would make xarray
# compute the whole variable in memory first, just to find out that it holds strings.
_VLEN_STR = np.dtype("O", metadata={"element_type": str})

Cacheable = TypeVar("Cacheable", xr.Dataset, xr.DataArray)

# identity (data variable names and Dask names) of an object this process returned from the
# cache -> (root url, key), so that caching a cached object returns it, not a second copy.
_REOPENED: dict[str, tuple[str, str]] = {}
_REOPENED_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_zarr() -> Iterator[None]:
    """Silence zarr's notes about format extensions we do not use (consolidated metadata)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"zarr\..*")
        yield


def marker_status(root: CacheRoot, entry: str) -> tuple[dict[str, Any] | None, str]:
    """Return ``(marker, status)`` of an entry's completion marker.

    ``status`` is ``"complete"`` (the marker is intact and of this format: its
    manifest still has to be checked against the store, see :func:`entry_problem`),
    ``"missing"`` (no marker: a write that never finished, or not an entry),
    ``"damaged"`` (not JSON, or its checksum does not match its content) or
    ``"stale"`` (written by another cache format, e.g. before entries had
    checksums and a manifest: rebuilt on the next ``cache()``).
    """
    raw = root.read_entry_file(entry, MARKER_NAME)
    if raw is None:
        return None, "missing"
    try:
        marker = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, "damaged"
    if not isinstance(marker, dict):
        return None, "damaged"
    if marker.get("format") != CACHE_FORMAT_VERSION:
        return None, "stale"
    if marker.get("checksum") != marker_checksum(marker) or not isinstance(
        marker.get("manifest"), dict
    ):
        return None, "damaged"
    return marker, "complete"


def read_marker(root: CacheRoot, entry: str) -> dict[str, Any] | None:
    """Return the completion marker of ``entry`` if it is intact and of this format."""
    return marker_status(root, entry)[0]


def entry_problem(root: CacheRoot, entry: str, marker: Mapping[str, Any]) -> EntryProblem | None:
    """Compare one listing of the entry with its manifest (no chunk is read)."""
    return check_listing(marker["manifest"], root.list_entry_files(entry))


def touch_entry(root: CacheRoot, entry: str) -> None:
    """Record a hit on ``entry`` (time and count), for LRU eviction and listings."""
    previous = root.read_json(entry, LAST_USE_NAME) or {}
    try:
        hits = int(previous.get("hits", 0))
    except (TypeError, ValueError):  # a damaged record only loses the count
        hits = 0
    now = time.time()
    record = {"last_used": _iso(now), "last_used_unix": now, "hits": hits + 1}
    with contextlib.suppress(OSError):  # a read-only cache still serves hits
        root.write_json(entry, LAST_USE_NAME, record, durable=False)


def cache(
    obj: Cacheable,
    *,
    store: str | os.PathLike[str] | None = None,
    key: str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Cacheable:
    """Write ``obj`` to a Zarr v3 cache entry once; return it reopened lazily from there.

    The first call computes ``obj`` chunk by chunk (on the active Dask
    scheduler, a ``distributed.Client`` included) and streams each chunk to the
    store, so memory stays at a few chunks whatever the size. Later calls with
    the same inputs (same source files, same chain of operations) find the
    entry and only reopen it: nothing is recomputed.

    Parameters
    ----------
    obj
        A Dataset or DataArray, usually lazy (Dask-backed) and produced by neurocube.
        Its ``attrs["neurocube_sources"]`` name the files it came from.
    store
        Cache root: a folder or an fsspec URL (``s3://lab/neurocube-cache``).
        Default: ``<neurocube cache folder>/zarr`` (see :func:`neurocube.config.cache_dir`).
        On a cluster, give a path or URL that every worker can reach.
    key
        Entry name to use instead of the derived key (letters, digits, ``._-``).
        An existing entry under that name is reused only if it was made from the
        same inputs; otherwise it is rebuilt.
    overwrite
        Rebuild the entry even if a valid one exists.
    progress
        Show a progress bar while writing (default: ``NEUROCUBE_PROGRESS``).
    storage_options
        For a ``store`` URL: options handed to fsspec and Zarr (keys, an
        endpoint, ...). Default: the options this process last used for that
        URL, else the backend's own (environment) credentials. They never
        appear in the entry, its key or any message.

    Returns
    -------
    xarray.Dataset or xarray.DataArray
        Same type, dims, coords (with their dtypes), attrs and values as ``obj``,
        backed by Dask arrays that read from the Zarr entry; chunks are those of ``obj``.

    Raises
    ------
    CacheError
        If the key is not a valid name, the cache folder is not writable, or
        ``obj`` cannot be hashed deterministically (then pass ``key=``).

    Warns
    -----
    NeurocubeWarning
        If ``obj`` names no source files (a changed input cannot be detected).

    Examples
    --------
    >>> import numpy as np, xarray as xr, neurocube, tempfile
    >>> ds = xr.Dataset({"data": (("trial",), np.arange(4.0))},
    ...                 attrs={"neurocube_sources": []}).chunk(trial=2)
    >>> folder = tempfile.mkdtemp()
    >>> cached = neurocube.cache(ds, store=folder, key="example")
    >>> cached.data.values.tolist()
    [0.0, 1.0, 2.0, 3.0]
    """
    if not isinstance(obj, (xr.Dataset, xr.DataArray)):
        raise CacheError(
            f"neurocube.cache expects an xarray Dataset or DataArray, got {type(obj).__name__}."
        )
    root = open_root(store, storage_options)
    if key is not None:
        validate_key(key)
    already = _already_cached(obj, root)
    if already is not None and key in (None, already) and not overwrite:
        return obj  # this very object was reopened from that entry

    fp = _fingerprint_for(obj, user_key=key is not None)
    entry_key = key if key is not None else fp.key  # type: ignore[union-attr]
    entry = root.entry_url(entry_key)
    marker = None if overwrite else read_marker(root, entry)
    stale = marker is not None and fp is not None and marker.get("fingerprint") != fp.key
    damaged = False
    if marker is not None and not stale:
        problem = entry_problem(root, entry, marker)
        if problem is None:
            try:
                reopened = _reopen(root, entry, marker)
            except (CacheError, CorruptDataError) as exc:
                problem = EntryProblem("damaged", str(exc))
            else:
                touch_entry(root, entry)
                return reopened  # type: ignore[return-value]
        warnings.warn(
            f"cache entry {entry_key!r} ({entry}) is {problem.status}: {problem.what}. "
            "Rebuilding it from the sources.",
            NeurocubeWarning,
            stacklevel=2,
        )
        damaged = True

    # Something unusable under the final name (no marker, other format, damaged) is
    # replaced; a complete entry that a racing writer publishes meanwhile is not.
    replace = overwrite or stale or damaged or (marker is None and root.has_entry(entry))
    root.sweep_leftovers()
    dataset, encoding, layout = _prepare(obj)
    written = root.begin_write(entry_key)
    try:
        with _quiet_zarr():
            delayed = dataset.to_zarr(
                root.zarr_store(written),
                storage_options=root.storage_options,
                mode="w-",
                zarr_format=3,
                consolidated=False,
                encoding=encoding,
                compute=False,
                write_empty_chunks=True,  # every chunk on storage: a missing one is damage
            )
        compute(
            delayed,
            description=f"caching {entry_key if len(entry_key) <= 24 else entry_key[:12]}",
            progress=progress,
        )
        now = time.time()
        new_marker = {
            "format": CACHE_FORMAT_VERSION,
            "key": entry_key,
            "fingerprint": fp.key if fp is not None else None,
            "token": fp.token if fp is not None else None,
            "sources": fp.sources if fp is not None else [],
            "created": _iso(now),
            "created_unix": now,
            "neurocube_version": __version__,
            "nbytes": int(dataset.nbytes),
            **layout,
            "manifest": build_manifest(
                root.list_entry_files(written), lambda rel: root.read_entry_file(written, rel)
            ),
        }
        new_marker["checksum"] = marker_checksum(new_marker)
        root.write_json(written, MARKER_NAME, new_marker)  # last: completes the copy
        if replace and not overwrite and not damaged and fp is not None:
            current = read_marker(root, entry)
            if current is not None and current.get("fingerprint") == fp.key:
                replace = False  # a racing writer published the same entry: keep theirs
        published = root.publish(written, entry_key, replace=replace)
    except BaseException:
        root.discard(written)
        raise
    final_marker = new_marker if published else read_marker(root, entry)
    if final_marker is None:
        raise CacheError(
            f"{entry}: another writer published this entry but it is not complete. "
            "Run `neurocube cache clear` and try again."
        )
    touch_entry(root, entry)
    return _reopen(root, entry, final_marker)  # type: ignore[return-value]


def open_cached(
    key: str,
    *,
    store: str | os.PathLike[str] | None = None,
    check_sources: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    source_options: Mapping[str, Any] | None = None,
) -> xr.Dataset | xr.DataArray:
    """Reopen a cache entry by its key, without rebuilding what produced it.

    The fastest way back to cached data in a new session: no source file is
    opened and no graph is built, only the identities of the sources recorded
    in the entry are checked (size, mtime, hash of the file ends).

    Parameters
    ----------
    key
        The entry's key: the name given as ``cache(..., key=...)``, or a derived
        key as listed by :func:`neurocube.cache_info`.
    store
        Cache root (folder or fsspec URL); default ``<neurocube cache folder>/zarr``.
    check_sources
        Refuse an entry whose source files changed or disappeared since it was
        written. False serves it anyway (e.g. after deleting the raw files on purpose).
    storage_options
        For a ``store`` URL: options handed to fsspec and Zarr (see :func:`cache`).
    source_options
        Options to stat source URLs with when checking them (their size and
        ETag only). Default: the options this process opened each source
        with, else ``storage_options``.

    Returns
    -------
    xarray.Dataset or xarray.DataArray
        As :func:`cache` returns it.

    Raises
    ------
    CacheError
        No complete entry under that key, or a source file changed or is gone.
    """
    root = open_root(store, storage_options)
    entry = root.entry_url(validate_key(key))
    marker, status = marker_status(root, entry)
    if marker is None:
        if status == "missing":
            raise CacheError(
                f"{entry}: no complete cache entry named {key!r}. neurocube.cache_info() "
                "lists the entries; neurocube.cache(obj, key=...) creates one."
            )
        why = {
            "damaged": "its completion marker is damaged (not JSON, or its checksum does not "
            "match)",
            "stale": "it was written by another cache format (before entries had checksums "
            "and a manifest)",
        }[status]
        raise CacheError(
            f"cache entry {key!r} ({entry}) cannot be used: {why}. {rebuild_hint(key)}"
        )
    problem = entry_problem(root, entry, marker)
    if problem is not None:
        raise problem.error(entry, key)
    if check_sources:
        for recorded in marker.get("sources", []):
            path = str(recorded.get("path"))
            opts = source_options
            if opts is None and is_url(path) and not path.startswith("file://"):
                opts = options_for(path) or root.storage_options
            try:
                current = source_identity(path, opts)
            except (DataNotFoundError, FileNotFoundError) as exc:
                raise CacheError(
                    f"cache entry {key!r} was made from {path}, which is gone. Pass "
                    "check_sources=False to use the entry anyway."
                ) from exc
            except NeurocubeError as exc:
                raise CacheError(
                    f"cache entry {key!r} was made from {path}, which cannot be checked now "
                    f"({exc}). Pass source_options= to reach it, or check_sources=False to use "
                    "the entry anyway."
                ) from exc
            if current != recorded:
                raise CacheError(
                    f"cache entry {key!r} is stale: {path} changed since it was cached "
                    f"(recorded {recorded}, now {current}). Rebuild it with neurocube.cache(...)."
                )
    touch_entry(root, entry)
    return _reopen(root, entry, marker)


def _fingerprint_for(obj: xr.Dataset | xr.DataArray, *, user_key: bool) -> Fingerprint | None:
    if not user_key:
        return fingerprint(obj, stacklevel=4)  # point at the caller of neurocube.cache
    # With a name chosen by the caller, the fingerprint only guards against staleness:
    # an object Dask cannot hash still caches, without that guard.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fingerprint(obj)
        except CacheError:
            return None


def _already_cached(obj: xr.Dataset | xr.DataArray, root: CacheRoot) -> str | None:
    """Return the key if ``obj``'s data are what this process reopened from ``root``."""
    if not _REOPENED:
        return None
    if any(getattr(v.data, "name", None) is None for v in _data_variables(obj)):
        return None  # some data are not (only) read from an entry
    with _REOPENED_LOCK:
        found = _REOPENED.get(_identity_of(obj))
    if found is None or found[0] != root.url:
        return None
    entry = root.entry_url(found[1])
    marker = read_marker(root, entry)
    if marker is None or entry_problem(root, entry, marker) is not None:  # cleared or damaged
        return None
    return found[1]


def _data_variables(obj: xr.Dataset | xr.DataArray) -> list[xr.Variable]:
    if isinstance(obj, xr.DataArray):
        return [obj.variable]
    return [v.variable for v in obj.data_vars.values()]


def _prepare(
    obj: xr.Dataset | xr.DataArray,
) -> tuple[xr.Dataset, dict[Hashable, dict[str, Any]], dict[str, Any]]:
    """Return the Dataset to write, its Zarr encoding, and what reopening must restore."""
    import zarr.codecs

    if isinstance(obj, xr.DataArray):
        layout: dict[str, Any] = {"kind": "DataArray", "dataarray_name": _json_name(obj.name)}
        dataset = obj.to_dataset(name=_DATAARRAY_VARIABLE)
    else:
        layout = {"kind": "Dataset", "dataarray_name": None}
        dataset = obj
    dataset = dataset.drop_encoding()

    string_dtypes: dict[str, str] = {}
    in_memory_coords: list[str] = []
    encoding: dict[Hashable, dict[str, Any]] = {}
    replacements: dict[Hashable, xr.Variable] = {}
    for name, variable in dataset.variables.items():
        if not isinstance(name, str):
            raise CacheError(f"variable name {name!r} is not a str; Zarr needs str names.")
        if name in dataset.coords and name not in dataset.indexes and not _is_dask(variable):
            in_memory_coords.append(name)
        if variable.dtype.kind == "U" or (variable.dtype == object and _all_str(variable)):
            # Variable-length strings have a stable Zarr v3 type; fixed-width '<U' does not.
            string_dtypes[name] = variable.dtype.str
            variable = variable.astype(_VLEN_STR)
            replacements[name] = variable
        numeric = variable.dtype.kind in "biufcmM"
        compressor = numeric_codec() if numeric else zarr.codecs.ZstdCodec(level=ZSTD_LEVEL)
        # every chunk ends with a crc32c of its bytes, checked on every read
        var_encoding: dict[str, Any] = {"compressors": [compressor, zarr.codecs.Crc32cCodec()]}
        if _is_dask(variable):
            chunks = _coalesced(_uniform_chunks(variable), variable.dtype.itemsize)
            if chunks != variable.chunks:
                variable = variable.chunk(dict(zip(variable.dims, chunks, strict=True)))
                replacements[name] = variable
            var_encoding["chunks"] = tuple(max(c[0], 1) if c else 1 for c in chunks)
        encoding[name] = var_encoding
    if replacements:
        dataset = dataset.copy()
        for name, variable in replacements.items():
            if name in dataset.indexes:
                dataset = dataset.assign_coords({name: variable.values})
            else:
                dataset[name] = variable
    layout["string_dtypes"] = string_dtypes
    layout["in_memory_coords"] = in_memory_coords
    if isinstance(obj, xr.DataArray):
        layout["variables"] = [str(obj.name)]
    else:
        layout["variables"] = sorted(str(n) for n in dataset.data_vars)
    return dataset, encoding, layout


def _reopen(root: CacheRoot, entry: str, marker: dict[str, Any]) -> xr.Dataset | xr.DataArray:
    dataset = _fast_open(root, entry, marker) if isinstance(root, LocalRoot) else None
    if dataset is None:
        dataset = _open_with_xarray(root, entry, marker)
    result: xr.Dataset | xr.DataArray = dataset
    if marker.get("kind") == "DataArray":
        result = dataset[_DATAARRAY_VARIABLE].rename(marker.get("dataarray_name"))
    with _REOPENED_LOCK:
        _REOPENED[_identity_of(result)] = (root.url, str(marker["key"]))
    return result


def _dask_name(marker: Mapping[str, Any], root: CacheRoot, name: Hashable, chunks: Any) -> str:
    """Name the Dask array of a cached variable after the entry, its creation and its chunks."""
    token = dask.base.tokenize(
        root.url, marker.get("key"), marker.get("created_unix"), marker.get("fingerprint")
    )
    return f"neurocube-cached-{name}-{dask.base.tokenize(token, name, chunks)}"


def _fast_open(root: CacheRoot, entry: str, marker: Mapping[str, Any]) -> xr.Dataset | None:
    """Build the Dataset straight from the entry's metadata documents and chunks.

    For local entries whose variables xarray would open unchanged (numbers and
    strings without CF decoding, see :func:`~neurocube.caching.integrity.plain_variable`):
    each ``zarr.json`` is read once and checked against the manifest, coordinates
    that were in memory are read by the direct chunk reader, and every other
    variable becomes a Dask array over that reader. This skips xarray's and Zarr's
    generic open (member listing, async round trips per array) that cost several
    times the checks themselves. Returns None when anything is unusual: the caller
    then opens the entry through xarray (same checks, same result).
    """
    import dask.array as da

    key = str(marker.get("key"))
    manifest = marker["manifest"]
    files: Mapping[str, Any] = manifest.get("files", {})
    specs: Mapping[str, Mapping[str, Any]] = manifest.get("variables", {})
    string_dtypes: Mapping[str, str] = marker.get("string_dtypes", {})
    metas: dict[str, Any] = {}
    for rel in ["zarr.json", *(f"{name}/zarr.json" for name in specs)]:
        raw = root.read_entry_file(entry, rel)
        if raw is None or rel not in files:
            return None  # the xarray path reports it
        checked_metadata(raw, files[rel], entry=entry, key=key, rel=rel)
        try:
            metas[rel] = json.loads(raw)
        except ValueError:
            return None
    attrs = dict(metas["zarr.json"].get("attributes") or {})
    coord_names = set(str(attrs.pop("coordinates", "")).split())
    plain: dict[str, tuple[Any, np.dtype[Any], dict[str, Any]]] = {}
    for name, spec in specs.items():
        meta = metas[f"{name}/zarr.json"]
        found = plain_variable(meta)
        if found is None or "/" in name or list(meta["shape"]) != list(spec["shape"]):
            return None
        if found[0].kind == "O" and name not in string_dtypes:
            return None  # strings of another numpy type: leave them to xarray
        coord_names.update(str((meta.get("attributes") or {}).get("coordinates", "")).split())
        plain[name] = (meta, *found)
    in_memory = set(marker.get("in_memory_coords", []))
    coords: dict[Hashable, xr.Variable] = {}
    data_vars: dict[Hashable, xr.Variable] = {}
    for name, (meta, dtype, var_attrs) in plain.items():
        dims = tuple(meta.get("dimension_names") or ())
        if len(dims) != len(meta["shape"]) or not all(isinstance(d, str) for d in dims):
            return None
        spec = specs[name]
        reader = ChunkArray(root, entry, key, name, spec, dtype)
        chunk_shape = tuple(int(c) for c in spec["chunks"])
        preferred = dict(zip(dims, chunk_shape, strict=True))
        encoding = {"chunks": chunk_shape, "preferred_chunks": preferred, "dtype": dtype,
                    "compressors": _compressors(meta)}  # fmt: skip
        if dtype.kind == "f":
            encoding["_FillValue"] = np.nan
        is_index = dims == (name,)
        data: Any
        if is_index or name in in_memory:
            data = reader[...]
            if name in string_dtypes:  # numpy strings first: xarray checks object arrays slowly
                data = data.astype(np.dtype(string_dtypes[name]))
        else:
            data = da.from_array(
                reader,
                chunks=chunk_shape,
                name=_dask_name(marker, root, name, preferred),
                lock=False,
                asarray=False,
                meta=np.empty((0,) * len(dims), reader.dtype),
            )
        variable = xr.Variable(dims, data, var_attrs, encoding=encoding)
        if name in string_dtypes and variable.dtype != np.dtype(string_dtypes[name]):
            variable = variable.astype(np.dtype(string_dtypes[name]))
        (coords if is_index or name in coord_names else data_vars)[name] = variable
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def _compressors(meta: Mapping[str, Any]) -> tuple[Any, ...]:
    """Return the bytes-to-bytes codecs of an array, as xarray puts them in ``encoding``."""
    from zarr.registry import get_codec_class

    return tuple(get_codec_class(c["name"]).from_dict(c) for c in meta.get("codecs", [])[1:])


def _open_with_xarray(root: CacheRoot, entry: str, marker: dict[str, Any]) -> xr.Dataset:
    key = str(marker.get("key"))
    manifest = marker["manifest"]
    specs: dict[str, dict[str, Any]] = manifest.get("variables", {})
    store = VerifiedStore(root.zarr_read_store(entry), entry=entry, key=key,
                          files=manifest.get("files", {}))  # fmt: skip
    with _quiet_zarr():
        # Opened without Dask: the coordinates that were in memory are read straight from the
        # store (a Dask graph per small array cost twice the read itself); every other variable
        # gets Dask chunks equal to its Zarr chunks, named after the entry and its creation, so
        # every reopen of one entry gives the same names and a rebuilt entry new ones. Every
        # document and chunk read is checked against the manifest (VerifiedStore, ChunkArray).
        try:
            plain = xr.open_zarr(store, consolidated=False, zarr_format=3, chunks=None)
        except NeurocubeError:
            raise
        except Exception as exc:  # zarr/xarray on metadata that passed the manifest: not ours
            raise CorruptDataError(
                f"cache entry {key!r} ({entry}) cannot be opened ({type(exc).__name__}: {exc}). "
                f"{rebuild_hint(key)}"
            ) from exc
        for name, spec in specs.items():
            found = plain.variables.get(name)
            if found is None or list(found.shape) != list(spec["shape"]):
                raise CacheError(
                    f"cache entry {key!r} ({entry}) is incomplete: variable {name!r} "
                    f"{'is missing' if found is None else f'has shape {found.shape}'} "
                    f"(the manifest records shape {tuple(spec['shape'])}). {rebuild_hint(key)}"
                )
        in_memory = set(marker.get("in_memory_coords", []))
        string_dtypes = marker.get("string_dtypes", {})
        coords: dict[Hashable, xr.Variable] = {}
        data_vars: dict[Hashable, xr.Variable] = {}
        for name, variable in plain.variables.items():
            if name in plain.indexes:
                if name in string_dtypes:  # an index is in memory already: just its dtype
                    coords[name] = variable.astype(np.dtype(string_dtypes[name]))
                continue
            spec = specs.get(str(name), {})
            direct = direct_readable(spec, variable)
            if name in in_memory:
                if direct:
                    values = ChunkArray(root, entry, key, str(name), spec, variable.dtype)[...]
                    variable = xr.Variable(variable.dims, values, variable.attrs)
                else:
                    variable = variable.load()
            elif variable.ndim:
                chunks = variable.encoding.get("preferred_chunks", {})
                dask_name = _dask_name(marker, root, name, chunks)
                if direct:
                    import dask.array as da

                    array = da.from_array(
                        ChunkArray(root, entry, key, str(name), spec, variable.dtype),
                        chunks=tuple(int(c) for c in spec["chunks"]),
                        name=dask_name,
                        lock=False,
                        asarray=False,
                        meta=np.empty((0,) * variable.ndim, variable.dtype),
                    )
                    variable = xr.Variable(
                        variable.dims, array, variable.attrs, encoding=variable.encoding
                    )
                else:
                    variable = variable.chunk(chunks, from_array_kwargs={"name": dask_name})
            if name in string_dtypes:
                variable = variable.astype(np.dtype(string_dtypes[name]))
            (coords if name in plain.coords else data_vars)[name] = variable
    dataset = plain.assign_coords(coords) if coords else plain
    if data_vars:
        dataset = dataset.assign(data_vars)
    return dataset


def _identity_of(obj: xr.Dataset | xr.DataArray) -> str:
    """Return a cheap identity of the data: names and Dask names of the data variables."""
    if isinstance(obj, xr.DataArray):
        parts = [(str(obj.name), obj.dims, getattr(obj.data, "name", None))]
    else:
        parts = [(str(n), v.dims, getattr(v.data, "name", None)) for n, v in obj.data_vars.items()]
    return str(dask.base.tokenize(sorted(parts, key=str)))


def _is_dask(variable: xr.Variable) -> bool:
    return variable.chunks is not None


def _all_str(variable: xr.Variable) -> bool:
    if _is_dask(variable):
        return False  # cannot check without computing; leave it to xarray
    return all(isinstance(v, str) for v in np.asarray(variable.values).ravel())


def _uniform_chunks(variable: xr.Variable) -> tuple[tuple[int, ...], ...]:
    """Return chunks Zarr can store: equal blocks along each dim, a shorter last one allowed."""
    assert variable.chunks is not None
    uniform = []
    for dim_chunks in variable.chunks:
        head = dim_chunks[:-1]
        if len(set(head)) <= 1 and (not head or dim_chunks[-1] <= head[0]):
            uniform.append(tuple(dim_chunks))
            continue
        size, total = max(dim_chunks), sum(dim_chunks)
        blocks = [size] * (total // size) + ([total % size] if total % size else [])
        uniform.append(tuple(blocks))
    return tuple(uniform)


def _coalesced(
    chunks: tuple[tuple[int, ...], ...], itemsize: int, min_bytes: int | None = None
) -> tuple[tuple[int, ...], ...]:
    """Merge whole blocks along the first dim until a block holds ``MIN_CHUNK_BYTES``.

    Reading a Zarr chunk has a fixed cost (~1 ms here) on top of its bytes, so an
    entry of many small chunks (12 trials of a ROI: under 1 MB each) reopens at a
    fraction of the disk's speed. Each stored chunk is a run of whole Dask blocks
    of the source, so the two stay aligned.
    """
    min_bytes = MIN_CHUNK_BYTES if min_bytes is None else min_bytes
    if not chunks or not chunks[0]:
        return chunks
    first = chunks[0]
    size, total = first[0], sum(first)
    block_bytes = size * itemsize * int(np.prod([c[0] for c in chunks[1:] if c], dtype=np.int64))
    if size <= 0 or size >= total or block_bytes >= min_bytes:
        return chunks
    merged = min(total, size * -(-min_bytes // max(block_bytes, 1)))
    blocks = (merged,) * (total // merged) + ((total % merged,) if total % merged else ())
    return (blocks, *chunks[1:])


def _json_name(name: Hashable) -> str | None:
    return None if name is None else str(name)


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, tz=timezone.utc).isoformat(timespec="seconds")
