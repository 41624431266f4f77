"""TMS trace caches (offspect layout): open lazily, read and edit annotations, merge, create.

The reading side is :func:`open_traces` (a lazy ``xarray.Dataset``). The editing
side keeps the original library's safety rules and its file format, so files
stay readable by offspect:

- :func:`get_attrs` returns one trace's annotations decoded to Python values,
  plus ``cache_file``, ``cache_file_index`` and ``cache_file_token`` that say
  where they came from;
- :func:`set_attrs` writes them back only to that file and index, and only if
  the trace did not change since it was read; only trace-level keys are
  written, each in the string encoding the file already uses;
- :func:`merge` joins caches after the original's consistency checks;
- :func:`populate` creates a cache from annotations and arrays.

Every write is atomic: the new content goes to a temporary copy that replaces
the file by rename. A process reading the file meanwhile keeps reading the
version it opened (its handle points at the old inode); writers to one folder
are serialised with an advisory lock, so two editors cannot lose each other's
updates.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neurocube.datasets.traces import (
    attrs_token,
    decode_attr,
    encode_attr,
    locate_trace,
    open_traces,
    origin_groups,
    read_raw_attrs,
    same_value,
    scan_traces,
    trace_sort_key,
)
from neurocube.errors import AttributeMismatchError, FormatError, SourceChangedError
from neurocube.io._atomic import atomic_path
from neurocube.sources.hdf5_handles import open_hdf5, pooled_file, stat_key

__all__ = [
    "CONSISTENT_ORIGIN_KEYS",
    "TRANSIENT_KEYS",
    "decode_attr",
    "encode_attr",
    "get_attrs",
    "merge",
    "open_traces",
    "populate",
    "set_attrs",
    "set_attrs_many",
]

#: Keys :func:`get_attrs` adds that are never written to the file.
TRANSIENT_KEYS = ("cache_file", "cache_file_index", "cache_file_token")

#: Origin keys that must be identical across the origins of a merged cache.
CONSISTENT_ORIGIN_KEYS = (
    "channel_labels",
    "channel_of_interest",
    "samples_pre_event",
    "samples_post_event",
    "samplingrate",
    "subject",
    "readout",
    "readin",
    "version",
)

_SUFFIX = ".hdf5"

#: How often :func:`get_attrs` reads when a writer's rename lands mid-read (one retry).
_READ_ATTEMPTS = 2
_TRACES = "traces"


def get_attrs(path: str | os.PathLike[str], index: int) -> dict[str, Any]:
    """Return the decoded annotations of trace ``index`` (origin keys included).

    Parameters
    ----------
    path
        A trace cache.
    index
        Global trace index (origins in HDF5 name order, traces numerically).

    Returns
    -------
    dict
        The origin's annotations overlaid with the trace's own, decoded with
        :func:`~neurocube.datasets.traces.decode_attr` (``''``/``'None'`` are
        None), plus ``origin`` (the origin group), ``cache_file`` (absolute
        path), ``cache_file_index`` and ``cache_file_token`` (a hash of the
        trace's stored attributes) for :func:`set_attrs`.

    A concurrent writer (:func:`set_attrs`) replaces the file by rename; if that
    lands between this call's stat and its open, the read is done again once
    (with a fresh stat) before :class:`~neurocube.errors.SourceChangedError` is
    raised.

    Raises
    ------
    SelectionError
        If there is no such trace.
    SourceChangedError
        If the file was replaced again during the second attempt too.
    """
    for attempt in range(_READ_ATTEMPTS):
        key = stat_key(path)
        local = key[0]
        try:
            with pooled_file(*key, heap_checked=True) as h5:
                origin, name = locate_trace(h5, index, local)
                origin_raw = read_raw_attrs(h5[origin], local)
                trace_raw = read_raw_attrs(h5[origin][_TRACES][name], local)
            break
        except SourceChangedError:
            # a writer's atomic rename landed between the stat and the open: open it again
            if attempt + 1 == _READ_ATTEMPTS:
                raise
    attrs = {k: decode_attr(v) for k, v in origin_raw.items()}
    attrs.update({k: decode_attr(v) for k, v in trace_raw.items()})
    attrs["origin"] = origin
    attrs["cache_file"] = local
    attrs["cache_file_index"] = int(index)
    attrs["cache_file_token"] = attrs_token(trace_raw)
    return attrs


def set_attrs(
    path: str | os.PathLike[str],
    index: int,
    attrs: Mapping[str, Any],
    *,
    allow_new_keys: bool = False,
) -> None:
    """Write back the annotations of trace ``index`` (as returned by :func:`get_attrs`).

    Parameters
    ----------
    path
        The trace cache ``attrs`` was read from.
    index
        The trace ``attrs`` was read from (checked, as in the original library).
    attrs
        Decoded values; only keys whose value changed are written, each encoded
        with :func:`~neurocube.datasets.traces.encode_attr` so the stored
        spelling (YAML scalar or ``str()``) stays what the original reads.
    allow_new_keys
        Allow keys the trace does not have yet (refused by default, since a
        typo would otherwise add a key silently).

    Raises
    ------
    AttributeMismatchError
        If ``attrs`` did not come from this file and index, if the trace changed
        since ``attrs`` was read (read it again), if an origin-level key (shared
        by every trace of the origin, e.g. ``samplingrate``) was changed, or if
        an unknown key was added without ``allow_new_keys``.
    """
    set_attrs_many(path, {index: attrs}, allow_new_keys=allow_new_keys)


def set_attrs_many(
    path: str | os.PathLike[str],
    updates: Mapping[int, Mapping[str, Any]],
    *,
    allow_new_keys: bool = False,
) -> None:
    """Write back the annotations of several traces in one atomic rewrite.

    Same checks as :func:`set_attrs`, for every ``index -> attrs`` of
    ``updates``; if one fails, nothing is written.
    """
    local = stat_key(path)[0]
    for index, attrs in updates.items():
        _check_origin_of(local, index, attrs)
    if not updates:
        return
    import h5py

    with _edit_lock(local), atomic_path(local) as tmp:
        shutil.copyfile(local, tmp)
        shutil.copymode(local, tmp)
        with h5py.File(tmp, "r+") as h5:
            locations = _trace_locations(h5, local)  # once: a walk per update is O(n) each
            origin_raws: dict[str, dict[str, Any]] = {}
            for index, attrs in updates.items():
                if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not (
                    0 <= int(index) < len(locations)
                ):
                    locate_trace(h5, index, local)  # raises the SelectionError that says why
                origin, name = locations[int(index)]
                if origin not in origin_raws:
                    origin_raws[origin] = read_raw_attrs(h5[origin], local)
                _write_trace_attrs(
                    h5, local, index, (origin, name), origin_raws[origin], attrs, allow_new_keys
                )


def _trace_locations(h5: Any, local: str) -> list[tuple[str, str]]:
    """``(origin, name)`` of every trace, in global index order (as :func:`locate_trace`)."""
    return [
        (origin, str(name))
        for origin, group in origin_groups(h5, local)
        for name in sorted(group.keys(), key=trace_sort_key)
    ]


def _check_origin_of(local: str, index: int, attrs: Mapping[str, Any]) -> None:
    if "cache_file" not in attrs or "cache_file_index" not in attrs:
        raise AttributeMismatchError(
            f"{local}: the attributes for trace {index} do not say where they came from (no "
            "'cache_file'/'cache_file_index'); get them with neurocube.traces.get_attrs first."
        )
    source = str(attrs["cache_file"])
    if os.path.realpath(source) != os.path.realpath(local):
        raise AttributeMismatchError(
            f"{local}: the attributes for trace {index} came from another file ({source}); "
            "read them from this file with neurocube.traces.get_attrs."
        )
    try:
        source_index = int(attrs["cache_file_index"])
    except (TypeError, ValueError) as exc:
        raise AttributeMismatchError(
            f"{local}: cache_file_index {attrs['cache_file_index']!r} is not an integer"
        ) from exc
    if source_index != index:
        raise AttributeMismatchError(
            f"{local}: the attributes came from trace {source_index}, not trace {index}; "
            "write them to the trace they were read from."
        )


def _write_trace_attrs(
    h5: Any,
    local: str,
    index: int,
    location: tuple[str, str],
    origin_raw: Mapping[str, Any],
    attrs: Mapping[str, Any],
    allow_new_keys: bool,
) -> None:
    origin, name = location
    dset = h5[origin][_TRACES][name]
    trace_raw = read_raw_attrs(dset, local)
    token = attrs.get("cache_file_token")
    if token is not None and token != attrs_token(trace_raw):
        raise AttributeMismatchError(
            f"{local}: trace {index} ({origin}/{_TRACES}/{name}) changed since its attributes "
            "were read (another edit came first); read them again with get_attrs and redo "
            "the change."
        )
    writes: dict[str, str] = {}
    for key, value in attrs.items():
        if key in TRANSIENT_KEYS:
            continue
        if key == "origin" and "origin" not in trace_raw:
            if value != origin:
                raise AttributeMismatchError(
                    f"{local}: trace {index} belongs to origin {origin!r}; 'origin' cannot be "
                    f"changed to {value!r}."
                )
            continue
        if key in origin_raw:
            if not _equal(decode_attr(origin_raw[key]), value) and not (
                key in trace_raw and _equal(decode_attr(trace_raw[key]), value)
            ):
                raise AttributeMismatchError(
                    f"{local}: {key!r} is an origin-level annotation of {origin!r} (shared by all "
                    f"its traces) and cannot be changed for trace {index} alone "
                    f"({decode_attr(origin_raw[key])!r} -> {value!r})."
                )
            continue
        stored = trace_raw.get(key)
        if stored is None and key not in trace_raw and not allow_new_keys:
            raise AttributeMismatchError(
                f"{local}: trace {index} has no annotation {key!r}; pass allow_new_keys=True to "
                f"add it (existing keys: {sorted(trace_raw)})."
            )
        stored_text = stored if isinstance(stored, str) else None
        if stored is not None and not isinstance(stored, str):
            if _equal(decode_attr(stored), value):
                continue
        text = encode_attr(value, stored_text)
        if text != stored_text:
            writes[key] = text
    for key, text in writes.items():
        dset.attrs[key] = text


def _equal(a: Any, b: Any) -> bool:
    """Compare decoded values; numbers by value (1000 == 1000.0), NaN equal to NaN."""
    if isinstance(b, (np.generic, np.ndarray, tuple)):
        b = b.tolist() if not isinstance(b, tuple) else list(b)

    def is_number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if is_number(a) and is_number(b):
        return same_value(float(a), float(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return same_value(a, b)


@contextlib.contextmanager
def _edit_lock(local: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on the file's folder (POSIX; no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; the rename is still atomic
        yield
        return
    fd = os.open(os.path.dirname(local) or ".", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _check_suffix(path: Path) -> None:
    if path.suffix != _SUFFIX:
        raise FormatError(
            f"{path}: trace caches end in {_SUFFIX!r} (the original library refuses other "
            f"suffixes); found {path.suffix!r}. Rename the target."
        )


def merge(
    to: str | os.PathLike[str], sources: Sequence[str | os.PathLike[str]]
) -> Path:
    """Merge trace caches into one new file (overwriting ``to`` atomically).

    Checks first, as the original library does: every origin name appears once
    across all sources, and the origin keys of :data:`CONSISTENT_ORIGIN_KEYS`
    (``readin``, ``readout``, ``samplingrate``, ``channel_labels``, ...) are
    identical everywhere. Origins and traces are copied as they are stored
    (attributes byte for byte).

    Returns
    -------
    pathlib.Path
        The absolute path of the merged file.

    Raises
    ------
    FormatError
        If an origin repeats, a consistency key differs, or ``to`` does not
        end in ``.hdf5``.
    """
    target = Path(to).expanduser().absolute()
    _check_suffix(target)
    if not sources:
        raise FormatError(f"merge into {target}: no sources given")
    catalogs = [scan_traces(s) for s in sources]
    seen: dict[str, str] = {}
    for catalog in catalogs:
        for origin in catalog.origins:
            if origin in seen:
                raise FormatError(
                    f"merge into {target}: origin {origin!r} is in both {seen[origin]} and "
                    f"{catalog.path}; each recording may be merged once."
                )
            seen[origin] = catalog.path
    reference: dict[str, tuple[Any, str]] = {}
    for catalog in catalogs:
        for origin in catalog.origins:
            raw = catalog.origin_attrs[origin]
            for key in CONSISTENT_ORIGIN_KEYS:
                value = decode_attr(raw[key]) if key in raw else None
                where = f"{catalog.path}:{origin}"
                if key not in reference:
                    reference[key] = (value, where)
                elif not _equal(reference[key][0], value):
                    raise FormatError(
                        f"merge into {target}: {key!r} differs: {reference[key][0]!r} in "
                        f"{reference[key][1]} but {value!r} in {where}; only caches of the same "
                        "readin/readout and recording settings can be merged."
                    )
    import h5py

    with atomic_path(target) as tmp, h5py.File(tmp, "w") as out:
        for catalog in catalogs:
            with open_hdf5(catalog.path, heap_checked=True) as source:
                for origin in catalog.origins:
                    source.copy(source[origin], out, name=origin)
    return target


def populate(
    path: str | os.PathLike[str],
    annotations: Sequence[Mapping[str, Any]],
    traces: Sequence[Sequence[Any]],
) -> Path:
    """Create a trace cache from annotations and arrays (overwriting ``path`` atomically).

    Parameters
    ----------
    path
        The new ``.hdf5`` file.
    annotations
        One dict per origin, as the original library's ``Annotations``:
        ``{"origin": "rec1.xdf", "attrs": {...origin keys...},
        "traces": [{...trace keys, "id": 0...}, ...]}``.
    traces
        One list of arrays per origin, ``(samples,)`` or ``(samples, channels)``,
        in the order of ``annotations[i]["traces"]``.

    Notes
    -----
    As in the original, origin attributes are also copied onto every trace
    (origin values win), and a trace's dataset is named by its ``id`` (its
    position when there is none). String values are stored as given; other
    values are encoded with :func:`~neurocube.datasets.traces.encode_attr`.

    Returns
    -------
    pathlib.Path
        The absolute path of the new file.

    Raises
    ------
    FormatError
        If the lists do not match in length, an origin or trace id repeats, or
        the suffix is not ``.hdf5``.
    """
    target = Path(path).expanduser().absolute()
    _check_suffix(target)
    if len(annotations) != len(traces):
        raise FormatError(
            f"populate {target}: {len(annotations)} annotations but {len(traces)} trace lists; "
            "pass one list of traces per origin."
        )
    origins = [str(a.get("origin", "")) for a in annotations]
    for i, origin in enumerate(origins):
        if not origin or "/" in origin:
            raise FormatError(
                f"populate {target}: annotations[{i}]['origin'] must be a non-empty name "
                f"without '/', got {origin!r}."
            )
    if len(set(origins)) != len(origins):
        raise FormatError(f"populate {target}: origins repeat: {origins}")
    import h5py

    with atomic_path(target) as tmp, h5py.File(tmp, "w") as out:
        for i, (annotation, arrays) in enumerate(zip(annotations, traces, strict=True)):
            origin = origins[i]
            origin_attrs = dict(annotation.get("attrs", {}))
            trace_attrs = list(annotation.get("traces", []))
            if len(trace_attrs) != len(arrays):
                raise FormatError(
                    f"populate {target}: origin {origin!r} has {len(trace_attrs)} trace "
                    f"annotations but {len(arrays)} arrays."
                )
            group = out.create_group(origin)
            for key, value in origin_attrs.items():
                group.attrs[str(key)] = _stored_text(value)
            trace_group = group.create_group(_TRACES)
            names: set[str] = set()
            for j, (tattrs, array) in enumerate(zip(trace_attrs, arrays, strict=True)):
                merged = {**dict(tattrs), **origin_attrs}
                merged.setdefault("id", j)
                name = str(merged["id"])
                if name in names:
                    raise FormatError(
                        f"populate {target}: origin {origin!r} has two traces with id {name!r}."
                    )
                names.add(name)
                data = np.asarray(array)
                if data.ndim not in (1, 2):
                    raise FormatError(
                        f"populate {target}: trace {j} of {origin!r} is {data.ndim}-D; traces are "
                        "(samples,) or (samples, channels)."
                    )
                dset = trace_group.create_dataset(name, data=data)
                for key, value in merged.items():
                    dset.attrs[str(key)] = _stored_text(value)
    return target


def _stored_text(value: Any) -> str:
    return value if isinstance(value, str) else encode_attr(value)

