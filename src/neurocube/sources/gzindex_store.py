"""Where gzip seek indexes are kept, what vouches for them, and the shared index store.

gzindex.py reads ``.gz`` files through seek-point indexes; this module owns the
index *files*. It knows which file an index belongs to and whether it can still
be trusted, and it never inflates anything itself:

- naming: an index lives in the cache folder under ``gzindex/``, never beside
  the data. A local file's index is named from its resolved path, size and
  mtime, so that opening a file costs one ``stat``; an object's from its URL,
  size and ETag (:func:`index_name`), which also lets the indexes of earlier
  versions of the same URL be found and deleted (:func:`retire_old_versions`);
- the sidecar: beside each index, a JSON file records the identity of the file
  it was built from (size, hash of the first and last MiB, ETag), the CRC32 of
  the index file, the per-volume checksums of the pass that built it
  (:mod:`neurocube.sources.volume_sums`) and a CRC32 of its own content.
  :func:`cached_index_usable` compares it with the file once per process and
  file version; an index that fails is deleted with an
  :class:`IndexRebuildWarning`, and the next read streams the file again;
- writing: :func:`store_index` thins a first pass's seek points to
  :data:`SPACING` and moves the index and its sidecar into place atomically; a
  cache folder that cannot be written costs an :class:`IndexWriteWarning`, not
  the read;
- the index store (``index_store=`` or ``$NEUROCUBE_INDEX_STORE``, a folder or
  a URL): an index missing from the cache is looked up there before a first
  pass (:func:`fetch_index`), and a new one is uploaded, so that a team or a
  cluster builds each index once;
- an index the caller names (``index=path``) is checked when the file is opened
  (:func:`check_index`) and is never overwritten or deleted.

The :class:`GzipIndexSpec` a reader carries lives here too: it says which file,
which index file and which store, the things this module decides. Readers that
keep indexes loaded register with :func:`on_discard` to be told when one is
deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neurocube import config, storage
from neurocube.errors import (
    DataNotFoundError,
    IndexMismatchError,
    NeurocubeError,
    NeurocubeWarning,
)
from neurocube.sources import gzidx_format
from neurocube.sources.volume_sums import VOLUME_SUM, VolumeHasher, Volumes
from neurocube.storage import StorageOptions, file_identity

__all__ = [
    "GzipIndexSpec",
    "IndexRebuildWarning",
    "IndexWriteWarning",
    "auto_index_path",
    "check_index",
    "fetch_index",
    "index_store",
    "index_usable",
]

SPACING = 4 << 20  # one seek point per 4 MiB of uncompressed data in a stored index


class IndexWriteWarning(NeurocubeWarning):
    """The gzip index could not be stored; reads fall back to streaming."""


class IndexRebuildWarning(NeurocubeWarning):
    """A cached gzip index was damaged or stale: it was deleted and is rebuilt by streaming."""


INDEX_STORE_ENV = "NEUROCUBE_INDEX_STORE"


@dataclass(frozen=True)
class GzipIndexSpec:
    """How to reach bytes inside one ``.gz`` file (picklable: locations and numbers only).

    Parameters
    ----------
    path
        The ``.gz`` file: a local path or a URL.
    index_path
        Where its index lives locally (or will be written); None disables indexing.
    explicit
        True when the caller named the index file: a missing or mismatched
        index is then an error, and neurocube never overwrites it.
    storage_options
        Options for a remote ``path`` (credentials redacted from text and tokens).
    size, etag
        The object's size and ETag when it was opened (remote files): its version.
    store, store_options
        An index store (folder or URL) where the index is looked up before a
        first read streams the file, and where a new index is uploaded.
    """

    path: str
    index_path: str | None
    explicit: bool = False
    storage_options: StorageOptions | None = None
    size: int = 0
    etag: str = ""
    store: str | None = None
    store_options: StorageOptions | None = None

    @property
    def remote(self) -> bool:
        """True for an object reached over the network (not a local path)."""
        return not storage.is_local(self.path)


def auto_index_path(
    path: str | os.PathLike[str],
    cache: str | os.PathLike[str] | None = None,
    *,
    meta: storage.ObjectInfo | None = None,
) -> Path:
    """Return where the index of ``path`` lives in the cache folder.

    For a local file the name comes from the resolved path, the size and the
    mtime (one ``stat``, no read); the hash of the file's first and last MiB,
    the rest of its identity, is recorded in the index's sidecar and checked
    when the index is first used (``gzindex.read_range``). For an object it comes
    from the URL, the size and the ETag (``meta``, from the opener's stat).

    Raises
    ------
    DataNotFoundError
        If ``path`` does not exist.
    """
    meta = meta or storage.info(path)
    return config.cache_dir(cache) / "gzindex" / index_name(meta)


def index_name(meta: storage.ObjectInfo) -> str:
    """Return the file name of the index of a file or object, from its stat alone.

    An object's name is ``<name>.<hash of the URL>-<hash of size and ETag>.gzidx``,
    so the indexes of earlier versions of the same URL can be found (and
    retired, see :func:`retire_old_versions`).
    """
    if storage.is_local(meta.path):
        text = f"{meta.path}\0{meta.size}\0{meta.mtime_ns}"
        digest = hashlib.sha256(text.encode()).hexdigest()[:32]
        return f"{meta.name}.{digest}.gzidx"
    version = hashlib.sha256(f"{meta.size}\0etag:{meta.etag}".encode()).hexdigest()[:16]
    return f"{meta.name}.{_url_digest(meta.path)}-{version}.gzidx"


def _url_digest(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def retire_old_versions(spec: GzipIndexSpec) -> None:
    """Delete cached indexes of earlier versions of ``spec.path`` (an object), with a warning.

    The object's ETag changed since they were built: their seek points would
    land in the wrong places. The new version gets its own index on its first
    read; nothing is read through an old one.
    """
    if not spec.remote or spec.index_path is None or spec.explicit:
        return
    current = Path(spec.index_path)
    prefix = f"{storage.basename(spec.path)}.{_url_digest(spec.path)}-"
    try:
        stale = [
            p for p in current.parent.glob(f"{prefix}*.gzidx") if p.name != current.name
        ]
    except OSError:
        return
    if not stale:
        return
    for old in stale:
        for leftover in (old, old.with_suffix(".json")):
            with contextlib.suppress(OSError):
                leftover.unlink()
        gzidx_format.forget_index(str(old))
    warnings.warn(
        f"{spec.path}: the object changed since its gzip index was built (its ETag is now "
        f"{spec.etag}); the old index was deleted and the next read streams the object once, "
        "storing a new one.",
        IndexRebuildWarning,
        stacklevel=4,
    )


def index_store(store: str | os.PathLike[str] | None = None) -> str | None:
    """Return the index store to use: ``store``, else ``$NEUROCUBE_INDEX_STORE``, else None."""
    chosen = store if store is not None else os.environ.get(INDEX_STORE_ENV) or None
    return None if chosen is None else storage.normalize(chosen)


def check_index(
    index_path: str | os.PathLike[str],
    gz_path: str | os.PathLike[str],
    storage_options: StorageOptions | None = None,
) -> None:
    """Raise :class:`IndexMismatchError` unless ``index_path`` is a GZIDX index of ``gz_path``.

    The index header (read through :func:`gzidx_format.read_header`) records the
    compressed size of the file it was built on and how many seek points follow;
    a sidecar ``.json`` (written by neurocube) records its full identity.
    """
    index_path = Path(index_path)
    try:
        with open(index_path, "rb") as fh:
            head = fh.read(gzidx_format.HEADER_SIZE)
            index_size = os.fstat(fh.fileno()).st_size
    except FileNotFoundError as exc:
        raise IndexMismatchError(
            f"{index_path}: gzip index not found (given for {gz_path}). Pass index='auto' to let "
            "neurocube build one in its cache folder, or index=False to stream."
        ) from exc
    header = gzidx_format.read_header(head, index_path)
    table_end = gzidx_format.HEADER_SIZE + header.n_points * gzidx_format.POINT_SIZE
    if index_size < table_end:
        raise IndexMismatchError(
            f"{index_path}: this gzip index announces {header.n_points} seek points "
            f"({table_end} bytes with the header) but has {index_size} bytes. The index is "
            "damaged or truncated: delete it or pass index='auto' to rebuild it."
        )
    compressed_size = header.compressed_size
    actual = storage.info(gz_path, storage_options).size
    if compressed_size != actual:
        raise IndexMismatchError(
            f"{index_path}: this gzip index was built for a file of {compressed_size} compressed "
            f"bytes, but {gz_path} has {actual}. The file changed or the index belongs to another "
            "file: delete the index or pass index='auto' to rebuild it."
        )
    sidecar = index_path.with_suffix(".json")
    if sidecar.exists():
        recorded = json.loads(sidecar.read_text())
        ident = storage.identity(gz_path, storage_options).as_dict()
        if (recorded.get("ends_sha256") or "") != ident["ends_sha256"] or (
            recorded.get("etag") or ""
        ) != ident.get("etag", ""):
            raise IndexMismatchError(
                f"{index_path}: built for a file whose first/last MiB differ from {gz_path} now; "
                "delete the index or pass index='auto' to rebuild it."
            )


# --- what this process knows about its indexes ------------------------------------------

_BROKEN_INDEX_DIRS: set[str] = set()
_STORE_CHECKED: set[str] = set()  # index paths already looked up in the store
_STATE_LOCK = threading.Lock()
# Cached indexes whose sidecar matched the file, per (path, index, size, mtime, ctime): the ends
# are hashed once per process and file version, not per chunk. ctime changes with any rewrite,
# even one that puts the old size and mtime back.
_VERIFIED: set[tuple[str, str, int, int | str, int]] = set()
_VERIFY_LOCK = threading.Lock()
# Per-volume checksums of an index, per index path: ((offset, size, count), uint32 sums).
_SUMS: dict[str, tuple[tuple[int, int, int], Any]] = {}
_SUMS_LOCK = threading.Lock()
# Called with (path, index path) when a cached index is deleted, by whoever holds readers that
# loaded it (gzindex.py's handle pool): this module does not know the readers.
_DISCARD_HOOKS: list[Callable[[str, str], None]] = []


def on_discard(hook: Callable[[str, str], None]) -> None:
    """Call ``hook(path, index_path)`` whenever a cached index of ``path`` is deleted."""
    _DISCARD_HOOKS.append(hook)


def reset() -> None:
    """Forget what this process checked, fetched and warned about (``gzindex.reset_handles``)."""
    with _STATE_LOCK:
        _BROKEN_INDEX_DIRS.clear()
        _STORE_CHECKED.clear()
    with _VERIFY_LOCK:
        _VERIFIED.clear()
    with _SUMS_LOCK:
        _SUMS.clear()


def version_of(spec: GzipIndexSpec, index_path: str) -> tuple[str, str, int, int | str, int]:
    """Which version of the file this is, cheaply: a stat locally, the opened ETag remotely."""
    if spec.remote:
        return (spec.path, index_path, spec.size, spec.etag, 0)
    meta = storage.info(spec.path)
    return (spec.path, index_path, meta.size, meta.mtime_ns, meta.ctime_ns)


def cached_index_usable(spec: GzipIndexSpec, index_path: str) -> bool:
    """Return True if the cached index at ``index_path`` belongs to ``spec.path`` as it is now.

    Its sidecar must record the file's size and the hash of its first and
    last MiB. A stale index (the file was rewritten, e.g. with the same size
    and mtime) or one without a readable sidecar is deleted with an
    :class:`IndexRebuildWarning` and False is returned: the caller streams and
    stores a new one. An explicit index was checked when the file was opened.
    """
    if spec.explicit:
        return True
    try:
        version = version_of(spec, index_path)
    except DataNotFoundError as exc:
        raise DataNotFoundError(
            f"{spec.path}: no such file (it was removed after it was opened)"
        ) from exc
    if version in _VERIFIED:
        return True
    with _VERIFY_LOCK:
        if version in _VERIFIED:
            return True
        if not os.path.exists(index_path):  # another thread found it stale and deleted it
            return False
        sidecar = Path(index_path).with_suffix(".json")
        try:
            recorded = _unseal(sidecar.read_text())
        except (OSError, ValueError) as exc:
            _discard_cached_index(
                spec, index_path, f"has no readable identity sidecar {sidecar.name} ({exc})"
            )
            return False
        ident = _identity(spec)
        if (
            recorded.get("size") != ident.size
            or (recorded.get("ends_sha256") or "") != ident.ends_sha256
            or (recorded.get("etag") or "") != ident.etag
        ):
            _discard_cached_index(
                spec,
                index_path,
                f"is stale: it was built for a file of {recorded.get('size')} bytes whose "
                f"{_version_text(recorded)}, but the file now has {ident.size} bytes whose "
                f"{_version_text(ident.as_dict())} (rewritten, possibly with the same size "
                "and modification time)",
            )
            return False
        try:
            volumes = _parse_volumes(recorded)
        except ValueError as exc:
            _discard_cached_index(spec, index_path, f"cannot be trusted: its sidecar {exc}")
            return False
        try:
            crc = _file_crc32(index_path)
        except OSError:
            return False  # another thread deleted it meanwhile
        if crc != recorded.get("index_crc32"):
            _discard_cached_index(
                spec, index_path, f"is damaged (its CRC32 is {crc:#010x}, its sidecar recorded "
                f"{recorded.get('index_crc32')!r})"
            )
            return False
        with _SUMS_LOCK:
            _SUMS[index_path] = volumes
        _VERIFIED.add(version)
        return True


def _identity(spec: GzipIndexSpec) -> storage.FileIdentity:
    """Return the identity of ``spec.path`` now (remote: checked against the opened ETag)."""
    if not spec.remote:
        return file_identity(spec.path)
    storage.check_unchanged(spec.path, spec.storage_options, spec.size, spec.etag)
    return storage.FileIdentity(spec.path, spec.size, 0, "", spec.etag)


def _version_text(identity: dict[str, Any]) -> str:
    if identity.get("etag"):
        return f"ETag is {identity['etag']}"
    return f"first/last MiB hash to {str(identity.get('ends_sha256'))[:12]}..."


def index_usable(spec: GzipIndexSpec | None) -> bool:
    """Return True if ``spec`` has a stored index that belongs to the file as it is now.

    A cached index is checked against the file (the hash of its ends) once
    per process and file version; a stale or unreadable one is deleted with an
    :class:`IndexRebuildWarning` and False is returned (reads then stream and
    store a new index, see ``gzindex.read_range``).
    """
    if spec is None or spec.index_path is None or not os.path.exists(spec.index_path):
        return False
    return cached_index_usable(spec, spec.index_path)


def fetch_index(spec: GzipIndexSpec) -> bool:
    """Copy the index of ``spec.path`` from its index store if it is there; True if one exists."""
    if spec.index_path is None:
        return False
    if spec.store is not None and not spec.explicit:
        fetch_from_store(spec, spec.index_path)
    return os.path.exists(spec.index_path)


def fetch_from_store(spec: GzipIndexSpec, index_path: str) -> None:
    """Copy the index of ``spec.path`` from the index store into the local cache, if it is there.

    Looked up once per process and index; an index that is not in the store
    is built by the first read (and uploaded by :func:`store_index`).
    """
    if os.path.exists(index_path) or spec.store is None:
        return
    with _STATE_LOCK:
        if index_path in _STORE_CHECKED:
            return
        _STORE_CHECKED.add(index_path)
    name = Path(index_path).name
    remote_index = storage.join(spec.store, name)
    remote_sidecar = storage.join(spec.store, Path(name).with_suffix(".json").name)
    opts = spec.store_options
    try:
        sidecar = storage.read_all(remote_sidecar, opts)
        data = storage.read_all(remote_index, opts)
    except DataNotFoundError:
        return
    except NeurocubeError as exc:
        _warn_store(spec.store, f"cannot be read ({exc})")
        return
    target = Path(index_path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        for path, payload in ((target.with_suffix(".json"), sidecar), (target, data)):
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_bytes(payload)
            os.replace(tmp, path)
    except OSError as exc:
        _warn_unwritable(target.parent, exc)
    finally:
        gzidx_format.forget_index(index_path)  # whatever was kept of an earlier file there


def _upload_to_store(spec: GzipIndexSpec, target: Path) -> None:
    """Put a freshly built index (and its sidecar) into the index store, if one is set."""
    if spec.store is None:
        return
    opts = spec.store_options
    try:
        storage.write_bytes(storage.join(spec.store, target.name), target.read_bytes(), opts)
        sidecar = target.with_suffix(".json")
        storage.write_bytes(storage.join(spec.store, sidecar.name), sidecar.read_bytes(), opts)
    except (OSError, NeurocubeError) as exc:
        _warn_store(spec.store, f"cannot be written ({exc})")


def _warn_store(store: str, problem: str) -> None:
    with _STATE_LOCK:
        if f"store:{store}" in _BROKEN_INDEX_DIRS:
            return
        _BROKEN_INDEX_DIRS.add(f"store:{store}")
    warnings.warn(
        f"the gzip index store {store} {problem}; indexes are kept in the local cache folder "
        "only. Check index_store= / NEUROCUBE_INDEX_STORE and index_store_options.",
        IndexWriteWarning,
        stacklevel=4,
    )


def _file_crc32(path: str | os.PathLike[str]) -> int:
    import zlib

    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            crc = zlib.crc32(block, crc)
    return crc


def _seal(record: dict[str, Any]) -> str:
    """Return ``record`` as sidecar JSON carrying the CRC32 of its own content."""
    import zlib

    body = json.dumps(record, sort_keys=True)
    return json.dumps({**record, "sidecar_crc32": zlib.crc32(body.encode())}, sort_keys=True)


def _unseal(text: str) -> dict[str, Any]:
    """Parse a sidecar written by :func:`_seal`; ValueError if it is damaged or not sealed."""
    import zlib

    record = json.loads(text)
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, found {type(record).__name__}")
    sealed = record.pop("sidecar_crc32", None)
    if sealed is None:
        raise ValueError("it carries no checksum of its own (written by an older neurocube)")
    if zlib.crc32(json.dumps(record, sort_keys=True).encode()) != sealed:
        raise ValueError("its content does not match its checksum (the sidecar is damaged)")
    return record


def _parse_volumes(record: dict[str, Any]) -> tuple[tuple[int, int, int], Any]:
    """Return ``((offset, size, count), sums)`` from a sidecar record; ValueError if unusable."""
    import numpy as np

    vols = record.get("volumes")
    if not isinstance(vols, dict) or vols.get("algorithm") != VOLUME_SUM:
        raise ValueError(
            "it records no per-volume checksums (written by an older neurocube, or with "
            f"another algorithm than {VOLUME_SUM})"
        )
    geometry = tuple(vols.get(k) for k in ("offset", "size", "count"))
    sums = vols.get("sums")
    if (
        not all(isinstance(v, int) and v >= 0 for v in geometry)
        or geometry[1] <= 0  # type: ignore[operator]
        or not isinstance(sums, list)
        or len(sums) != geometry[2]
        or not all(isinstance(v, int) and 0 <= v < 1 << 32 for v in sums)
    ):
        raise ValueError("its per-volume checksums are malformed")
    return geometry, np.asarray(sums, dtype=np.uint32)  # type: ignore[return-value]


def recorded_sums(spec: GzipIndexSpec, volumes: Volumes) -> Any:
    """Return the checksums of ``volumes`` recorded for the index of ``spec``, or None.

    A cached index's sums were loaded from its sidecar when the index was
    checked (:func:`cached_index_usable`); an index the caller named may have a
    neurocube sidecar beside it. None when neither records this layout: the
    caller then computes them with a full pass (:func:`remember_sums`).
    """
    assert spec.index_path is not None
    with _SUMS_LOCK:
        known = _SUMS.get(spec.index_path)
    if known is not None and known[0] == tuple(volumes):
        return known[1]
    if spec.explicit:
        sidecar = Path(spec.index_path).with_suffix(".json")
        with contextlib.suppress(OSError, ValueError):
            known = _parse_volumes(_unseal(sidecar.read_text()))
            if known[0] == tuple(volumes):
                with _SUMS_LOCK:
                    _SUMS[spec.index_path] = known
                return known[1]
    return None


def remember_sums(index_path: str, volumes: Volumes, sums: Any) -> None:
    """Keep the checksums of ``volumes`` computed for ``index_path`` for the rest of the process."""
    with _SUMS_LOCK:
        _SUMS[index_path] = (tuple(volumes), sums)  # type: ignore[assignment]


def store_index(
    spec: GzipIndexSpec, export: Callable[[str], None], hasher: VolumeHasher | None
) -> None:
    """Store the index of a first pass at ``spec.index_path`` atomically (or warn and carry on).

    ``export(path)`` writes the pass's seek points (every one it recorded) to
    ``path``; they are thinned to :data:`SPACING`. ``hasher`` holds the pass's
    per-volume checksums, if it computed them. The sidecar records the file's
    identity, the CRC32 of the index file, the per-volume checksums of the pass
    (when the caller gave the volume layout) and a CRC32 of its own content: a
    damaged index or sidecar is detected and rebuilt, never read through.
    """
    assert spec.index_path is not None
    target = Path(spec.index_path)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    dense = tmp.with_name(tmp.name + ".dense")
    side_tmp = tmp.with_name(tmp.name + ".json")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        export(str(dense))
        gzidx_format.thin_index(dense, tmp, SPACING)
        version = version_of(spec, str(target))
        record: dict[str, Any] = {
            "format": "GZIDX",
            **_identity(spec).as_dict(),
            "index_crc32": _file_crc32(tmp),
        }
        if hasher is not None and hasher.complete:
            record["volumes"] = {
                "algorithm": VOLUME_SUM, "offset": hasher.offset, "size": hasher.size,
                "count": hasher.count, "sums": hasher.sums,
            }
        side_tmp.write_text(_seal(record))
        os.replace(side_tmp, target.with_suffix(".json"))
        os.replace(tmp, target)
        gzidx_format.forget_index(spec.index_path)  # what was kept of the index it replaced
        _upload_to_store(spec, target)
        with _VERIFY_LOCK:
            _VERIFIED.add(version)  # built from this very version: no need to hash it again
        if "volumes" in record:
            with _SUMS_LOCK:
                _SUMS[str(target)] = _parse_volumes(record)
    except OSError as exc:
        _warn_unwritable(target.parent, exc)
    finally:
        for leftover in (tmp, dense, side_tmp):
            with contextlib.suppress(OSError):
                leftover.unlink()


def unusable_index(spec: GzipIndexSpec, index_path: str, exc: BaseException) -> None:
    """Handle an index file that exists but cannot be loaded for ``spec.path``.

    A caller's own index (``explicit``) is never touched: that is an
    :class:`IndexMismatchError`. A damaged index in neurocube's cache (a
    crash, a full disk, a hand-edited file) is deleted with a warning, so the
    next read streams the file and stores a fresh one.
    """
    if not storage.exists(spec.path, spec.storage_options):
        raise DataNotFoundError(f"{spec.path}: no such file (it was removed after it was opened)")
    if spec.explicit:
        raise IndexMismatchError(
            f"{index_path}: this gzip index cannot be loaded for {spec.path} ({exc}); expected "
            "a complete GZIDX index of this file, found a damaged index or one of another "
            "file. Delete it, or pass index='auto' to let neurocube build one in its cache "
            "folder."
        ) from exc
    _discard_cached_index(spec, index_path, f"is damaged ({exc})")


def _discard_cached_index(spec: GzipIndexSpec, index_path: str, problem: str) -> None:
    """Delete a cached index (and its sidecar) that cannot serve ``spec.path``, with a warning.

    ``problem`` completes "the cached gzip index of <file> ...". Raises
    :class:`IndexMismatchError` if the index cannot be deleted (never reads
    through it).
    """
    with _STATE_LOCK:
        for stale in (Path(index_path), Path(index_path).with_suffix(".json")):
            with contextlib.suppress(OSError):
                stale.unlink()
    gzidx_format.forget_index(index_path)
    with _SUMS_LOCK:
        _SUMS.pop(index_path, None)
    for hook in _DISCARD_HOOKS:  # readers that loaded the old index (or hold the old file)
        hook(spec.path, index_path)
    if os.path.exists(index_path):
        raise IndexMismatchError(
            f"{index_path}: the cached gzip index of {spec.path} {problem} and cannot be "
            "deleted; delete it by hand, or pass index=False to stream."
        )
    warnings.warn(
        f"{index_path}: the cached gzip index of {spec.path} {problem}; it was deleted and "
        "this read streams the file, storing a new index.",
        IndexRebuildWarning,
        stacklevel=5,
    )


def _warn_unwritable(folder: Path, exc: BaseException) -> None:
    with _STATE_LOCK:
        if str(folder) in _BROKEN_INDEX_DIRS:
            return
        _BROKEN_INDEX_DIRS.add(str(folder))
    warnings.warn(
        f"neurocube cannot store gzip indexes in {folder} ({exc}); reading by streaming "
        "instead, which is slower. Set NEUROCUBE_CACHE_DIR (or pass cache_dir=) to a "
        "writable folder to enable random access.",
        IndexWriteWarning,
        stacklevel=3,
    )
