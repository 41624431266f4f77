"""Cache keys: what produced a Dataset, reduced to one hex digest.

A key covers three things:

1. the cache format version (:data:`CACHE_FORMAT_VERSION`), so a change of
   layout never reuses old entries;
2. the identity of every source file named in ``attrs["neurocube_sources"]``
   (path, size, mtime, a hash of its first and last MiB), so a file rewritten
   in place gives a new key;
3. the Dask token of the object. neurocube readers give their arrays names
   derived from the file identity and the read parameters, and every lazy
   operation (mask, ROI selection, threshold, ``isel``) derives its output
   name from its inputs and arguments, so the token captures the whole chain
   of operations. Coordinates and attributes are part of the token too.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.base
import xarray as xr

from neurocube.errors import CacheError, NeurocubeWarning
from neurocube.storage import file_identity, identity, is_url, options_for

__all__ = ["CACHE_FORMAT_VERSION", "Fingerprint", "fingerprint", "source_identity", "source_paths"]

#: Bump when the layout of a cache entry changes; old entries are then ignored.
CACHE_FORMAT_VERSION = 2

#: Length of the hex keys used as entry names (160 bits of sha256).
KEY_LENGTH = 40


@dataclass(frozen=True)
class Fingerprint:
    """What identifies the content of a Dataset for the cache.

    Attributes
    ----------
    key
        Hex digest over the format version, the source identities and the token.
    token
        ``dask.base.tokenize`` of the object.
    sources
        One JSON-ready identity dict per source file.
    """

    key: str
    token: str
    sources: list[dict[str, Any]] = field(default_factory=list)


def source_paths(obj: xr.Dataset | xr.DataArray) -> list[str]:
    """Return the source files named in ``obj.attrs["neurocube_sources"]`` (may be empty)."""
    value = obj.attrs.get("neurocube_sources", [])
    if isinstance(value, (str, os.PathLike)):
        value = [value]
    return [str(p) for p in value]


def source_identity(
    path: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Return the JSON-ready identity of a source file (local path or fsspec URL).

    A URL is identified by its size and ETag (one HEAD request), stat'ed with
    ``storage_options`` or else the options it was opened with in this
    process (:func:`neurocube.storage.options_for`); a local file by size,
    mtime and a hash of its ends. Never holds credentials: the URL names the
    object, the options stay out.
    """
    if is_url(path) and not path.startswith("file://"):
        opts = storage_options if storage_options is not None else options_for(path)
        return identity(path, opts).as_dict()
    return file_identity(path).as_dict()


def _graph_token(obj: xr.Dataset | xr.DataArray) -> str:
    try:
        with dask.config.set({"tokenize.ensure-deterministic": True}):
            return str(dask.base.tokenize(obj))
    except RuntimeError as exc:
        raise CacheError(
            "cannot derive a cache key: this object holds something Dask cannot hash "
            f"deterministically ({exc}). Pass key='a-name-you-choose' to neurocube.cache()."
        ) from exc


def fingerprint(obj: xr.Dataset | xr.DataArray, *, stacklevel: int = 2) -> Fingerprint:
    """Return the :class:`Fingerprint` of a Dataset or DataArray.

    Reads nothing but the first and last MiB of each source file (memoised per
    file version); the data itself is not computed.

    Parameters
    ----------
    obj
        The object to identify.
    stacklevel
        Where the warning points (as for :func:`warnings.warn`), for callers that wrap this.

    Warns
    -----
    NeurocubeWarning
        If the object has no ``attrs["neurocube_sources"]`` (an empty list
        says "made from no files" and does not warn): the key then rests on the
        Dask token alone and a source file changed on disk cannot be noticed.

    Raises
    ------
    CacheError
        If the object cannot be tokenised deterministically.
    """
    paths = source_paths(obj)
    if "neurocube_sources" not in obj.attrs:
        warnings.warn(
            "this object has no attrs['neurocube_sources']: its cache key rests on the Dask "
            "token alone, so a change of the files it came from cannot be detected. "
            "Clear the entry yourself (neurocube.clear_cache) if the inputs change.",
            NeurocubeWarning,
            stacklevel=stacklevel + 1,
        )
    sources = [source_identity(p) for p in paths]
    token = _graph_token(obj)
    payload = json.dumps(
        {"format": CACHE_FORMAT_VERSION, "sources": sources, "token": token},
        sort_keys=True,
    )
    key = hashlib.sha256(payload.encode()).hexdigest()[:KEY_LENGTH]
    return Fingerprint(key=key, token=token, sources=sources)
