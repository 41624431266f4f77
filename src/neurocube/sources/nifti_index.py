"""Where the gzip seek index of a ``.nii.gz`` lives, and building it ahead of time.

:func:`open_nifti` asks :func:`gzip_spec` which index a file gets: one in the
cache folder (named after the file's identity), one kept in a shared index
store, a file the caller names, or none (the file is streamed from the start).
:func:`build_index` makes the index before any read, for a batch of files or a
cluster that should not each pay a first pass (``neurocube index``).
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Any

from neurocube import config, storage
from neurocube.errors import ArgumentError, NeurocubeError
from neurocube.sources import gzindex, gzindex_store
from neurocube.sources.nifti_header import NiftiInfo, read_header

__all__ = ["build_index", "check_index_argument", "gzip_spec"]

_WRITABLE_CACHE: dict[str, bool] = {}
_WRITABLE_LOCK = threading.Lock()


def _cache_writable(folder: Path) -> bool:
    key = str(folder)
    with _WRITABLE_LOCK:
        if key in _WRITABLE_CACHE:
            return _WRITABLE_CACHE[key]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}-{threading.get_ident()}"
        probe.write_bytes(b"")
        probe.unlink()
        ok = True
    except OSError:
        ok = False
    with _WRITABLE_LOCK:
        _WRITABLE_CACHE[key] = ok
    return ok


#: ``index=`` values that name no index file (for a plain ``.nii`` they change nothing).
_INDEX_WORDS = ("auto", "never")


def check_index_argument(index: Any, info: NiftiInfo) -> None:
    """Refuse an ``index=`` that ``open_nifti`` does not accept for this file.

    ``index`` accepts ``"auto"`` (default) or ``True``, ``False``/``None``/``"never"``,
    or the path of a gzip index file (a ``str`` or ``os.PathLike``); a path only for
    a ``.nii.gz``: a plain ``.nii`` has no gzip stream to index.

    Raises
    ------
    ArgumentError
        Naming the file, the value given and what ``index`` accepts.
    """
    accepts = (
        "index accepts 'auto' (default) or True, False/None/'never' (always stream), or the "
        "path of a gzip index file for a .nii.gz"
    )
    if index is None or isinstance(index, bool):
        return
    if isinstance(index, str) and index in _INDEX_WORDS:
        return
    if not isinstance(index, (str, os.PathLike)):
        raise ArgumentError(
            f"{info.path}: index={index!r} ({type(index).__name__}) is not an index setting; "
            f"{accepts}."
        )
    if not info.compressed:
        raise ArgumentError(
            f"{info.path}: index={index!r} names a gzip index, but this is an uncompressed "
            f".nii (nothing to index); {accepts}. Leave index at its default."
        )


def gzip_spec(
    info: NiftiInfo,
    index: Any,
    cache_dir: Any,
    index_store: Any = None,
    index_store_options: dict[str, Any] | None = None,
) -> gzindex_store.GzipIndexSpec:
    """Return the gzip index spec of the ``.nii.gz`` ``info`` describes, for ``index=``.

    ``"auto"``/``True``: the index in the cache folder's ``gzindex`` (fetched from
    and put into ``index_store`` when one is named; older versions' indexes are
    retired); ``False``/``None``/``"never"`` or an unwritable cache folder (with an
    :class:`~neurocube.sources.gzindex_store.IndexWriteWarning`): none, the file is
    streamed; a path: that index file, checked against the file first.
    """
    check_index_argument(index, info)
    remote = not storage.is_local(info.path)
    base = {
        "storage_options": info.storage_options,
        "size": info.size,
        "etag": str(info.file_version) if remote else "",
    }
    if index is False or index is None or index == "never":
        return gzindex_store.GzipIndexSpec(info.path, None, **base)  # type: ignore[arg-type]
    if index == "auto" or index is True:
        folder = config.cache_dir(cache_dir) / "gzindex"
        if not _cache_writable(folder):
            warnings.warn(
                f"{info.path}: neurocube's cache folder {folder} cannot be created or written; "
                "reading this .nii.gz by streaming from the start (no random access). Set "
                "NEUROCUBE_CACHE_DIR or pass cache_dir= to a writable folder.",
                gzindex_store.IndexWriteWarning,
                stacklevel=3,
            )
            return gzindex_store.GzipIndexSpec(info.path, None, **base)  # type: ignore[arg-type]
        meta = storage.ObjectInfo(
            info.path, info.size, mtime_ns=info.file_version if not remote else 0,  # type: ignore[arg-type]
            etag=str(info.file_version) if remote else "",
        )
        store = gzindex_store.index_store(index_store)
        store_options = (
            storage.as_options(index_store_options)
            if index_store_options is not None
            else info.storage_options
        )
        spec = gzindex_store.GzipIndexSpec(
            info.path,
            str(gzindex_store.auto_index_path(info.path, cache_dir, meta=meta)),
            store=store,
            store_options=store_options if store is not None else None,
            **base,  # type: ignore[arg-type]
        )
        gzindex_store.retire_old_versions(spec)
        return spec
    index_path = storage.local_path(index)
    gzindex_store.check_index(index_path, info.path, info.storage_options)
    return gzindex_store.GzipIndexSpec(info.path, str(index_path), explicit=True,
                                       **base)  # type: ignore[arg-type]


def build_index(
    path: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    index_store: str | os.PathLike[str] | None = None,
    index_store_options: dict[str, Any] | None = None,
) -> str | None:
    """Build (or find) the gzip seek index of a ``.nii.gz`` ahead of time; return its local path.

    Streams the file once (remote objects: once over the network) unless a
    valid index is already in the cache folder or the index store, and puts
    a new index into the store when one is named. A ``.nii`` needs no index:
    None is returned.
    """
    info = read_header(path, storage_options)
    if not info.compressed:
        return None
    spec = gzip_spec(info, "auto", cache_dir, index_store, index_store_options)
    if spec.index_path is None:
        raise NeurocubeError(
            f"{info.path}: no writable cache folder for its index; set NEUROCUBE_CACHE_DIR "
            "or pass cache_dir= to a writable folder."
        )
    if gzindex_store.fetch_index(spec) and gzindex_store.index_usable(spec):
        return spec.index_path
    layout = (info.vox_offset, info.volume_bytes, info.n_volumes)
    gzindex.run_pass(spec, data_end=info.data_end, volumes=layout)
    return spec.index_path
