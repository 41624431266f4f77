"""TMS trace caches (the ``offspect`` HDF5 layout) as lazy Datasets.

Layout::

    /<origin>/               one group per recording ("rec1.xdf"); attributes: origin annotations
    /<origin>/traces/<id>    one dataset per trace ("0", "1", ...), (samples,) or (samples, chans)

Every attribute is a string: a YAML scalar (``54``, ``1000.0``, ``.inf``,
``''`` for none) or Python's ``str()`` (``None``, ``False``,
``['EDC_L']``). :func:`decode_attr` reads both without ``eval``;
:func:`encode_attr` writes values back so the original library reads them.

The global trace index counts origins in HDF5 name order and, inside an
origin, traces in numeric order ("2" before "10").
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr
import yaml

from neurocube import storage
from neurocube.errors import FormatError, SelectionError
from neurocube.sources.hdf5 import TraceStackSpec, trace_stack_dask_array
from neurocube.sources.hdf5_checks import (
    check_attribute_types,
    check_declared_size,
    check_storage,
    member,
    structure_errors,
    unique_names,
)
from neurocube.sources.hdf5_handles import Version, is_hdf5, open_hdf5, pooled_file, stat_key

__all__ = [
    "RESERVED_COORDS",
    "attrs_token",
    "dataset_from_catalog",
    "TraceCatalog",
    "TraceEntry",
    "decode_attr",
    "encode_attr",
    "guess_traces",
    "locate_trace",
    "open_traces",
    "origin_groups",
    "read_raw_attrs",
    "same_value",
    "scan_traces",
    "trace_sort_key",
]

#: Names neurocube gives coords itself; a trace attribute with one of these
#: names becomes ``attr_<name>``.
RESERVED_COORDS = ("trace", "origin", "name", "n_samples", "sample", "channel", "data")

_TRACES = "traces"
_NONE_TEXTS = {"", "None", "null", "Null", "NULL", "~"}
_TRUE_TEXTS = {"True", "true", "TRUE"}
_FALSE_TEXTS = {"False", "false", "FALSE"}
_INT_RE = re.compile(r"[-+]?(0|[1-9][0-9]*)")
_FLOAT_RE = re.compile(
    r"[-+]?((0|[1-9][0-9]*)\.[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?|[-+]?(0|[1-9][0-9]*)[eE][-+]?[0-9]+"
)
#: What parsing an arbitrary annotation may raise besides a clean "not this syntax":
#: YAML constructs dates and tagged scalars (``[2020-02-30]``, ``[!!int x]`` raise
#: ValueError) and every parser recurses on deep nesting.
_PARSE_ERRORS = (
    yaml.YAMLError, ValueError, TypeError, SyntaxError, OverflowError, RecursionError, MemoryError
)
_SPECIAL_FLOATS = {
    ".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan,
    "inf": math.inf, "+inf": math.inf, "-inf": -math.inf, "nan": math.nan,
    "infinity": math.inf, "+infinity": math.inf, "-infinity": -math.inf,
}  # fmt: skip


# -- attribute codec -------------------------------------------------------------------


def decode_attr(text: Any) -> Any:
    """Decode one stored attribute value to Python, never evaluating code.

    Rules, in order: ``''``/``'None'``/``'null'``/``'~'`` -> None;
    ``True``/``False`` (any case used by YAML or Python) -> bool; integers
    without leading zeros -> int; decimal floats, ``inf``/``nan`` and YAML's
    ``.inf``/``.nan`` -> float; ``[...]``/``{...}`` -> list/dict when it is a
    Python literal (``ast.literal_eval``) or JSON, or a YAML flow list of
    numbers/bools; a quoted string -> its content; anything else -> the text
    itself (so ``'[S  1]'`` and ``'1970-01-01 00:01:01'`` stay strings).
    Non-string values (numeric attributes) are returned as Python scalars/lists.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
        if isinstance(text, np.ndarray):
            items = text.tolist()
            return [decode_attr(item) if isinstance(item, bytes) else item for item in items]
        if isinstance(text, np.generic):
            return text.item()
        return text
    stripped = text.strip()
    if stripped in _NONE_TEXTS:
        return None
    if stripped in _TRUE_TEXTS:
        return True
    if stripped in _FALSE_TEXTS:
        return False
    if _INT_RE.fullmatch(stripped):
        try:
            return int(stripped)
        except ValueError:  # more digits than Python converts (4300): not a number to compute
            return text
    if _FLOAT_RE.fullmatch(stripped):
        return float(stripped)
    special = _SPECIAL_FLOATS.get(stripped.lower())
    if special is not None:
        return special
    if len(stripped) >= 2 and stripped[0] + stripped[-1] in ("[]", "{}"):
        return _decode_container(text, stripped)
    if len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "'\"":
        try:
            unquoted = yaml.safe_load(stripped)
        except _PARSE_ERRORS:
            return text
        return unquoted if isinstance(unquoted, str) else text
    return text


def _decode_container(text: str, stripped: str) -> Any:
    if len(stripped) > 1_000_000:  # not an annotation; do not parse it
        return text
    try:
        return ast.literal_eval(stripped)  # literals only: no names, calls or operators
    except _PARSE_ERRORS:
        pass
    try:
        return json.loads(stripped)
    except _PARSE_ERRORS:  # ValueError, or RecursionError on deep nesting
        pass
    try:
        loaded = yaml.safe_load(stripped)
    except _PARSE_ERRORS:
        return text
    if isinstance(loaded, list):
        items = [decode_attr(item) if isinstance(item, str) else item for item in loaded]
        if all(item is None or isinstance(item, (bool, int, float)) for item in items):
            return items
    return text


def _decode_memo(raw: Any, memo: dict[str, Any]) -> Any:
    """:func:`decode_attr` of ``raw``, decoding each distinct string once per ``memo``.

    A cache holds tens of thousands of traces whose annotations are mostly the
    same few strings; some (``[S  1]``) go through three parsers before they
    stay text. A list may be handed out more than once: :func:`_column` only
    reads the values it is given into new arrays.
    """
    if not isinstance(raw, str):
        return decode_attr(raw)
    try:
        return memo[raw]
    except KeyError:
        value = memo[raw] = decode_attr(raw)
        return value


def same_value(a: Any, b: Any) -> bool:
    """Equality of decoded values that tells 1, 1.0 and True apart and treats NaN as equal."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return bool(a == b)



def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


def _yaml_reads(text: str, value: Any) -> bool:
    """Whether a YAML loader (the original library's decoder) reads ``text`` as ``value``."""
    try:
        return same_value(yaml.safe_load(text), value)
    except _PARSE_ERRORS:  # e.g. "2020-02-30": YAML reads a date and fails on it
        return False


def encode_attr(value: Any, stored: str | None = None) -> str:
    """Encode a Python value as an attribute string both neurocube and offspect read back.

    Parameters
    ----------
    value
        None, bool, int, float, str, or a list/dict of those (NumPy scalars and
        arrays are converted).
    stored
        The string currently stored for this key, if any. When it already
        decodes to ``value`` it is returned unchanged (the file keeps its
        encoding byte for byte); a None keeps the ``'None'`` spelling if that is
        what the key used.

    Returns
    -------
    str
        ``''`` for None (YAML's empty scalar), ``True``/``False``, ``str(int)``,
        floats as YAML floats (``1000.0``, ``1.0e-05``, ``.inf``, ``.nan``),
        strings as themselves unless they would read back as something else
        (then a YAML double-quoted line), lists as ``str(list)`` when
        that reads back, else a YAML flow list.
    """
    value = _plain(value)
    if stored is not None and same_value(decode_attr(stored), value):
        return stored
    if value is None:
        return "None" if stored is not None and stored.strip() == "None" else ""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        text = repr(value)
        if _yaml_reads(text, value):
            return text
        return str(yaml.safe_dump(value)).splitlines()[0]
    if isinstance(value, str):
        if same_value(decode_attr(value), value) and (
            _yaml_reads(value, value) or _yaml_reads_as_date(value)
        ):
            return value
        quoted = yaml.safe_dump(value, default_style='"', allow_unicode=True, width=math.inf)
        return str(quoted).rstrip("\n")  # one YAML double-quoted line, escapes included
    if isinstance(value, (list, dict)):
        value = _plain_nested(value)
        text = str(value)
        if same_value(decode_attr(text), value) and _yaml_reads(text, value):
            return text
        flow = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=math.inf)
        return str(flow).strip().removesuffix("...").strip()
    return encode_attr(str(value), stored)


def _plain_nested(value: Any) -> Any:
    value = _plain(value)
    if isinstance(value, list):
        return [_plain_nested(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain_nested(v) for k, v in value.items()}
    return value


def _yaml_reads_as_date(text: str) -> bool:
    """Whether YAML reads ``text`` as a date (the original writes dates plain; keep them so)."""
    import datetime

    try:
        return isinstance(yaml.safe_load(text), (datetime.date, datetime.datetime))
    except _PARSE_ERRORS:
        return False


# -- scanning a file -------------------------------------------------------------------


@dataclass(frozen=True)
class TraceEntry:
    """One trace: where it lives, its shape and dtype, and its raw attribute strings."""

    origin: str
    name: str
    shape: tuple[int, ...]
    dtype: str
    attrs: dict[str, Any] = field(hash=False, compare=False)


@dataclass
class TraceCatalog:
    """Everything :func:`open_traces` needs from a cache, read in one pass.

    ``path`` is an absolute local path or a URL; ``version`` the file's mtime
    (ns) locally or the object's ETag; ``storage_options`` what a URL is read
    with (None locally).
    """

    path: str
    size: int
    version: Version
    origins: list[str]
    origin_attrs: dict[str, dict[str, Any]]
    traces: list[TraceEntry]
    storage_options: storage.StorageOptions | None = None

    @property
    def mtime_ns(self) -> int:
        """The file's mtime (ns) when scanned; 0 for an object (see ``version``)."""
        return self.version if isinstance(self.version, int) else 0


def trace_sort_key(name: str) -> tuple[int, int, str]:
    """Sort key of trace names inside an origin: numeric names by value ("2" before "10")."""
    return (0, int(name), "") if _INT_RE.fullmatch(name) else (1, 0, name)



def _text(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return _text(value[()])
    return value


def read_raw_attrs(obj: Any, path: str | None = None) -> dict[str, Any]:
    """Read every attribute of an h5py object, strings as ``str`` (not decoded further).

    Uses h5py's low-level attribute calls (about a third faster than
    ``dict(obj.attrs)`` for the thousands of small string attributes of a
    trace cache); falls back to the high-level API for unusual attributes.

    Raises
    ------
    FormatError
        If h5py cannot read them either (a damaged attribute, e.g. a string type
        with an unknown encoding); the message names ``path`` (default: the file
        h5py names) and the object.
    """
    import h5py

    out: dict[str, Any] = {}
    oid = obj.id
    check_attribute_types(obj, path if path is not None else _file_name(obj))
    try:
        count = h5py.h5a.get_num_attrs(oid)
        for index in range(count):
            attr = h5py.h5a.open(oid, index=index)
            name = attr.name.decode("utf-8", errors="replace")
            shape = attr.shape
            if shape is None:  # null dataspace
                out[name] = None
                continue
            buffer = np.empty(shape, dtype=attr.dtype)
            attr.read(buffer)
            value = buffer[()] if buffer.ndim == 0 else buffer
            out[name] = _text(value) if not isinstance(value, np.ndarray) else value
    except (OSError, TypeError, ValueError):
        try:
            out = {str(k): _text(v) for k, v in obj.attrs.items()}
        except (OSError, TypeError, ValueError, RuntimeError, KeyError) as exc:
            where = path if path is not None else _file_name(obj)
            raise FormatError(
                f"{where}: expected readable attributes on {obj.name!r}; h5py cannot read them "
                f"({type(exc).__name__}: {exc}). The file is damaged: restore or re-create it."
            ) from exc
    return out


def _file_name(obj: Any) -> str:
    try:
        return str(obj.file.filename)
    except (OSError, RuntimeError, ValueError, AttributeError):
        return "an HDF5 file"


def origin_groups(h5: Any, path: str) -> list[tuple[str, Any]]:
    """Return ``(origin, its traces group)`` of an open cache, in HDF5 name order.

    Raises
    ------
    FormatError
        If a root member is not an origin group holding a ``traces`` group.
    """
    import h5py

    groups = []
    for origin in unique_names(h5, path):  # HDF5 name order, as the original library iterates
        group = member(h5, origin, path)
        if not isinstance(group, h5py.Group) or _TRACES not in group:
            raise FormatError(
                f"{path}: expected every root member to be an origin group holding a "
                f"'{_TRACES}' group (the offspect layout); {origin!r} is not. For spectral caches "
                "use neurocube.open_spectral."
            )
        groups.append((str(origin), member(group, _TRACES, path)))
    return groups


def _catalog_cache_file(local: str, size: int, version: Version) -> Any:
    """Where the catalog of this version of the file is kept in neurocube's cache folder.

    Keyed by the file's identity: path, size, mtime and a hash of its ends
    locally; URL, size and ETag for an object (as stat, never the options).
    """
    from neurocube.config import cache_dir

    if storage.is_local(local):
        digest = storage.identity(local).digest
    else:
        digest = storage.FileIdentity(local, size, 0, "", str(version)).digest
    return cache_dir() / "hdf5-traces" / f"{digest}.json"


def _load_cached_catalog(
    local: str, size: int, version: Version, storage_options: storage.StorageOptions | None
) -> TraceCatalog | None:
    try:
        entry = _catalog_cache_file(local, size, version)
        try:
            text = entry.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        saved = json.loads(text)
        traces = [
            TraceEntry(t[0], t[1], tuple(t[2]), t[3], attrs=t[4]) for t in saved["traces"]
        ]
        return TraceCatalog(
            local, size, version, saved["origins"], saved["origin_attrs"], traces,
            storage_options,
        )  # fmt: skip
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def _store_catalog(catalog: TraceCatalog) -> None:
    """Save the catalog as JSON in neurocube's cache (only when every attribute is a str)."""
    from neurocube.io._atomic import atomic_path

    everything = [a for t in catalog.traces for a in t.attrs.values()]
    everything += [a for o in catalog.origin_attrs.values() for a in o.values()]
    if not all(isinstance(a, str) for a in everything):
        return
    saved = {
        "origins": catalog.origins,
        "origin_attrs": catalog.origin_attrs,
        "traces": [[t.origin, t.name, list(t.shape), t.dtype, t.attrs] for t in catalog.traces],
    }
    try:
        target = _catalog_cache_file(catalog.path, catalog.size, catalog.version)
        with atomic_path(target) as tmp:
            tmp.write_text(json.dumps(saved), encoding="utf-8")
    except OSError:
        pass  # a read-only cache folder only costs speed


def scan_traces(
    path: str | os.PathLike[str],
    *,
    use_cache: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> TraceCatalog:
    """Read the catalog of a trace cache: origins, trace names, shapes and raw attributes.

    Reads no trace data. With ``use_cache``, the catalog is kept as JSON in
    neurocube's cache folder, keyed by the file's identity (path, size, mtime,
    hash of its first and last MiB; URL, size and ETag for an object), so a
    second open of an unchanged file skips reading thousands of HDF5
    attributes. ``path`` may be a URL, read with ``storage_options``. Raises
    :class:`~neurocube.errors.FormatError` if the file is not in the offspect layout.
    """
    options = storage.as_options(storage_options)
    key = stat_key(path, options)
    if storage.is_local(key[0]):
        options = None
    if use_cache:
        cached = _load_cached_catalog(*key, options)
        if cached is not None:
            return cached
    catalog = _scan_file(key, options)
    if use_cache:
        _store_catalog(catalog)
    return catalog


def _scan_file(
    key: tuple[str, int, Version], storage_options: storage.StorageOptions | None = None
) -> TraceCatalog:
    import h5py

    local = key[0]
    with pooled_file(*key, storage_options, heap_checked=True) as h5, structure_errors(local):
        groups = origin_groups(h5, local)
        if not groups:
            raise FormatError(
                f"{local}: expected at least one origin group with traces (offspect layout); "
                "found an empty file."
            )
        origin_attrs: dict[str, dict[str, Any]] = {}
        traces: list[TraceEntry] = []
        stored: dict[str, Any] = {}
        for origin, group in groups:
            origin_attrs[origin] = read_raw_attrs(h5[origin], local)
            for name in sorted(unique_names(group, local), key=trace_sort_key):
                dset = member(group, name, local)
                if not isinstance(dset, h5py.Dataset):
                    raise FormatError(
                        f"{local}: expected {origin}/{_TRACES}/{name} to be a trace dataset, "
                        "found a group."
                    )
                check_declared_size(dset, local, f"/{origin}/{_TRACES}/{name}")
                stored[f"/{origin}/{_TRACES}/{name}"] = dset
                traces.append(
                    TraceEntry(
                        origin=origin,
                        name=str(name),
                        shape=tuple(int(n) for n in dset.shape),
                        dtype=np.dtype(dset.dtype).str,
                        attrs=read_raw_attrs(dset, local),
                    )
                )
        check_storage(h5, stored, local)
    return TraceCatalog(
        local, key[1], key[2], [o for o, _ in groups], origin_attrs, traces, storage_options
    )


def guess_traces(
    path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> bool:
    """Return True if ``path`` looks like a TMS trace cache (HDF5 + origin/traces groups).

    ``path`` may be a URL (read with ``storage_options``). Never raises.
    """
    try:
        if not is_hdf5(path, storage_options):
            return False
        with open_hdf5(path, storage_options) as h5:
            names = list(h5.keys())
            if not names:
                return False
            import h5py

            return all(
                isinstance(h5[n], h5py.Group) and isinstance(h5[n].get(_TRACES), h5py.Group)
                for n in names
            )
    except Exception:
        return False


def locate_trace(h5: Any, index: int, path: str) -> tuple[str, str]:
    """Return ``(origin, trace name)`` of global trace ``index`` in an open cache.

    Raises
    ------
    SelectionError
        If ``index`` is not an int in ``[0, n_traces)``.
    """
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise SelectionError(f"{path}: a trace index must be an int, got {index!r}")
    index = int(index)
    start = 0
    for origin, group in origin_groups(h5, path):
        count = len(group)
        if 0 <= index < start + count:
            names = sorted(group.keys(), key=trace_sort_key)
            return origin, str(names[index - start])
        start += count
    raise SelectionError(
        f"{path}: no trace {index}; the file holds {start} traces (indices 0..{start - 1})."
    )


def attrs_token(raw: Mapping[str, Any]) -> str:
    """Return a short hash of a trace's raw attributes (detects a change between read and write)."""
    text = json.dumps({k: str(v) for k, v in sorted(raw.items())}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- the Dataset -----------------------------------------------------------------------


def _column(values: Sequence[Any], raws: Sequence[Any]) -> tuple[np.ndarray, str]:
    """Type one attribute column: bool, int, float (NaN = missing), float 2-D, or str."""
    present = [v for v in values if v is not None]
    n = len(values)
    if not present:
        return np.full(n, "", dtype=str), "str"
    if all(isinstance(v, bool) for v in present):
        if len(present) == n:
            return np.array(values, dtype=bool), "bool"
        return np.array([np.nan if v is None else float(v) for v in values]), "float"
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present)
    if numeric:
        if len(present) == n and all(isinstance(v, int) for v in present):
            if all(-(2**63) <= v < 2**63 for v in present):
                return np.array(values, dtype=np.int64), "int"
        return np.array([np.nan if v is None else float(v) for v in values]), "float"
    if all(isinstance(v, str) for v in present):
        return np.array(["" if v is None else v for v in values], dtype=str), "str"
    if all(
        isinstance(v, list)
        and v
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        for v in present
    ):
        widths = {len(v) for v in present}
        if len(widths) == 1:
            width = widths.pop()
            table = np.full((n, width), np.nan)
            for row, v in enumerate(values):
                if v is not None:
                    table[row] = v
            return table, "float2d"
    texts = ["" if v is None else (r if isinstance(r, str) else str(r)) for v, r in zip(
        values, raws, strict=True
    )]
    return np.array(texts, dtype=str), "text"


def open_traces(
    path: str | os.PathLike[str],
    *,
    traces_per_chunk: int | None = None,
    ragged: str = "pad",
    use_cache: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Open a TMS trace cache lazily.

    Parameters
    ----------
    path
        An offspect ``.hdf5`` cache: a local path or a URL (``s3://...``,
        ``https://...``). Opening a URL reads the file's metadata and
        attributes only; traces travel when computed.
    traces_per_chunk
        Traces per Dask chunk; by default about 256 KiB of samples per chunk
        (between 16 and 1024 traces).
    ragged
        What to do when traces differ in length: ``"pad"`` (default) pads the
        shorter ones with NaN (integer data becomes float64) and the true
        lengths are in the ``n_samples`` coord; ``"error"`` refuses.
    use_cache
        Keep the attribute catalog (raw strings) as JSON in neurocube's cache
        folder, keyed by the file's identity, so reopening an unchanged file
        does not read every HDF5 attribute again (the slow part of opening a
        10,000-trace cache). Any edit changes the identity (for an object:
        its ETag).
    storage_options
        For a URL: options handed to fsspec (``{"anon": True}``, or keys and
        an endpoint); they travel with the lazy array to Dask workers and
        appear in no attrs, repr or task name.

    Returns
    -------
    xarray.Dataset
        ``data(trace, sample)`` for 1-D traces or ``data(trace, sample, channel)``
        for 2-D ones, a Dask array; coords ``trace`` (the global index),
        ``origin``, ``name`` (the dataset name), ``n_samples``, and one coord
        per attribute key along ``trace`` (origin keys included, as the
        original copies them onto traces): bool, int64, float64 (NaN where a
        trace has no value), a 2-D float ``(trace, <key>_index)`` for numeric
        lists such as ``xyz_coords``, or str (``""`` where missing; mixed or
        non-numeric lists keep their stored text). A key named like a
        neurocube coord gets an ``attr_`` prefix. ``attrs`` holds
        ``origin_attrs`` (the raw origin annotations per origin) and
        ``neurocube_sources``. Exact per-trace values: :func:`neurocube.traces.get_attrs`.

    Raises
    ------
    DataNotFoundError
        If the file does not exist (the message names it).
    AccessDeniedError
        If the storage refuses access (HTTP 403): credentials may be needed.
    FormatError
        If it is not an offspect cache, traces mix 1-D and 2-D or channel
        counts, or (``ragged="error"``) differ in length.
    """
    if ragged not in ("pad", "error"):
        raise ValueError(f"ragged must be 'pad' or 'error', got {ragged!r}")
    catalog = scan_traces(path, use_cache=use_cache, storage_options=storage_options)
    storage.remember_options(catalog.path, catalog.storage_options)
    return dataset_from_catalog(catalog, traces_per_chunk=traces_per_chunk, ragged=ragged)


def dataset_from_catalog(
    catalog: TraceCatalog, *, traces_per_chunk: int | None = None, ragged: str = "pad"
) -> xr.Dataset:
    """Build the lazy Dataset of :func:`open_traces` from a scanned catalog."""
    local = catalog.path
    traces = catalog.traces
    if not traces:
        raise FormatError(f"{local}: the cache holds origins {catalog.origins} but no traces.")
    ndims = {len(t.shape) for t in traces}
    if not ndims <= {1, 2} or len(ndims) > 1:
        raise FormatError(
            f"{local}: traces must all be 1-D (samples,) or all 2-D (samples, channels); found "
            f"{sorted(ndims)}-D traces (e.g. {_example(traces, lambda t: len(t.shape) != 1)})."
        )
    two_d = ndims == {2}
    n_channels: int | None = None
    if two_d:
        channel_counts = {t.shape[1] for t in traces}
        if len(channel_counts) > 1:
            raise FormatError(
                f"{local}: traces have different channel counts {sorted(channel_counts)}; "
                "they cannot share a channel dim. Open origins separately or re-create the cache."
            )
        n_channels = channel_counts.pop()
    lengths = tuple(t.shape[0] for t in traces)
    equal = len(set(lengths)) == 1
    if not equal and ragged == "error":
        raise FormatError(
            f"{local}: traces differ in length ({min(lengths)} to {max(lengths)} samples); "
            "pass ragged='pad' to pad them with NaN."
        )
    kinds = {"f" if np.dtype(t.dtype).kind in "fc" else np.dtype(t.dtype).kind for t in traces}
    if len(kinds) > 1:
        raise FormatError(
            f"{local}: expected the traces of one cache to share a kind of number; found "
            f"{', '.join(sorted({np.dtype(t.dtype).name for t in traces}))} (e.g. "
            f"{_example(traces, lambda t: np.dtype(t.dtype).kind not in 'fc')}). A trace's "
            "datatype message is damaged or the cache was assembled from mismatched files. "
            "Re-create it."
        )
    dtype = np.result_type(*{np.dtype(t.dtype) for t in traces})
    if not equal and not np.issubdtype(dtype, np.inexact):
        dtype = np.dtype(np.float64)
    spec = TraceStackSpec(
        path=local,
        size=catalog.size,
        version=catalog.version,
        storage_options=catalog.storage_options,
        datasets=tuple(f"/{t.origin}/{_TRACES}/{t.name}" for t in traces),
        lengths=lengths,
        n_channels=n_channels,
        dtype=dtype.str,
    )
    if traces_per_chunk is None:
        row_bytes = max(1, max(lengths) * (n_channels or 1) * dtype.itemsize)
        traces_per_chunk = int(min(1024, max(16, (256 * 2**10) // row_bytes)))
    array = trace_stack_dask_array(spec, traces_per_chunk)
    dims = ("trace", "sample", "channel") if two_d else ("trace", "sample")
    n = len(traces)
    coords: dict[str, Any] = {
        "trace": ("trace", np.arange(n, dtype=np.int64)),
        "origin": ("trace", np.array([t.origin for t in traces], dtype=str)),
        "name": ("trace", np.array([t.name for t in traces], dtype=str)),
        "n_samples": ("trace", np.array(lengths, dtype=np.int64)),
        "sample": ("sample", np.arange(max(lengths), dtype=np.int64)),
    }
    if two_d and n_channels is not None:
        coords["channel"] = ("channel", _channel_labels(catalog, n_channels))
    keys: dict[str, None] = {}
    for origin in catalog.origins:
        keys.update(dict.fromkeys(catalog.origin_attrs[origin]))
    for t in traces:
        keys.update(dict.fromkeys(t.attrs))
    memo: dict[str, Any] = {}  # annotations repeat across traces (origin keys on every trace)
    for key in keys:
        raws = [
            t.attrs.get(key, catalog.origin_attrs[t.origin].get(key)) for t in traces
        ]
        values = [None if r is None else _decode_memo(r, memo) for r in raws]
        column, kind = _column(values, raws)
        coord = f"attr_{key}" if key in RESERVED_COORDS else key
        if kind == "float2d":
            coords[coord] = (("trace", f"{coord}_index"), column)
        else:
            coords[coord] = ("trace", column)
    origin_attrs = {
        origin: {k: (v if isinstance(v, str) else json.dumps(decode_attr(v))) for k, v in a.items()}
        for origin, a in catalog.origin_attrs.items()
    }
    attrs = {
        "neurocube_sources": [local],
        "neurocube_format": "offspect",
        "origin_attrs": origin_attrs,
        "ragged": not equal,
    }
    return xr.Dataset({"data": (dims, array)}, coords=coords, attrs=attrs)


def _example(traces: Iterable[TraceEntry], predicate: Any) -> str:
    for t in traces:
        if predicate(t):
            return f"{t.origin}/{_TRACES}/{t.name} {t.shape}"
    return "?"


def _channel_labels(catalog: TraceCatalog, n_channels: int) -> np.ndarray:
    found: set[tuple[str, ...] | None] = set()
    for origin in catalog.origins:
        labels = decode_attr(catalog.origin_attrs[origin].get("channel_labels", ""))
        if isinstance(labels, list) and all(isinstance(x, str) for x in labels):
            found.add(tuple(labels))
        else:
            found.add(None)
    if len(found) == 1:
        only = found.pop()
        if only is not None and len(only) == n_channels and len(set(only)) == n_channels:
            return np.array(only, dtype=str)
    return np.arange(n_channels, dtype=np.int64)
