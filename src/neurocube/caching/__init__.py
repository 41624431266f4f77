"""Zarr spill cache: content-addressed keys, atomic writes, lazy reopen.

``neurocube.cache(ds)`` writes a lazily computed Dataset to a Zarr v3 entry
chunk by chunk and returns it reopened from there; the same inputs later find
the entry and read nothing else. ``neurocube.cache_info()``,
``neurocube.evict_cache(budget)`` and ``neurocube.clear_cache()`` look after
the entries (also ``neurocube cache ls|du|clear`` on the command line).

The package is named ``caching`` (not ``cache``) so that the function
``neurocube.cache`` is never shadowed by a submodule. The ``.neuro`` xarray
accessor (``ds.neuro.cache()``) is registered by ``import neurocube`` as soon
as xarray is imported; this package does not import :mod:`neurocube.accessor`
(which builds on it).
"""

from __future__ import annotations

from neurocube.caching.core import cache, open_cached
from neurocube.caching.keys import CACHE_FORMAT_VERSION, fingerprint
from neurocube.caching.manage import (
    CacheEntry,
    cache_entries,
    cache_info,
    clear_cache,
    evict_cache,
)

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CacheEntry",
    "cache",
    "cache_entries",
    "cache_info",
    "clear_cache",
    "evict_cache",
    "fingerprint",
    "open_cached",
]
