"""The one place that lists, stats, identifies and opens anything.

A *location* is a local path or an fsspec URL (``s3://bucket/key``,
``https://host/file``, ``gs://...``) plus its ``storage_options`` (a dict handed
to fsspec: ``{"anon": True}`` for a public bucket, or an endpoint and keys).
Every catalog and reader goes through this package; nothing else calls
``os.stat``, ``os.scandir`` or ``open`` on source data.

- :func:`normalize` turns a path or URL into the string every spec carries
  (an absolute local path, or the URL as given).
- :func:`info`, :func:`exists`, :func:`find` stat and list (one recursive
  listing per prefix on object stores, no per-file request).
- :func:`identity` says which version of a file this is: size, mtime and a hash
  of the first and last MiB for a local file; size and ETag (or version id)
  for an object.
- :func:`open_file` opens for reading with a chosen block size and cache
  type; :func:`read_range` / :func:`read_ranges` fetch byte ranges (concurrent
  requests for several); :class:`BlockReader` is a seekable file over an
  object whose blocks are shared by every reader of the process and fetched
  ahead of a forward pass by a pool of threads.

Credentials never leave this package in text: :class:`StorageOptions` prints
and tokenizes without them, and errors name the URL, never the options.

The layer is split by concept into submodules, each importing only the ones listed
before it: :mod:`~neurocube.storage.counters` (:data:`IO_STATS`),
:mod:`~neurocube.storage.locations` (paths and URLs), :mod:`~neurocube.storage.options`
(:class:`StorageOptions`, options remembered per location),
:mod:`~neurocube.storage.backends` (fsspec filesystems, error translation),
:mod:`~neurocube.storage.listing` (stat and list), :mod:`~neurocube.storage.identities`
(versions and change checks), :mod:`~neurocube.storage.reading` (open, ranges, writes),
:mod:`~neurocube.storage.remote_blocks` (:class:`BlockReader` and its shared blocks) and
:mod:`~neurocube.storage.handles` (:class:`HandlePool`). Their public names are
re-exported here: use ``storage.X``. Module-level state (counters, caches, pools) lives
once, in its submodule; patch it there.
"""

from __future__ import annotations

from neurocube.storage.backends import filesystem as filesystem
from neurocube.storage.backends import translate_errors as translate_errors
from neurocube.storage.counters import IO_STATS
from neurocube.storage.handles import HandlePool
from neurocube.storage.identities import (
    FileIdentity,
    check_unchanged,
    file_identity,
    identity,
)
from neurocube.storage.identities import stat_key as stat_key
from neurocube.storage.listing import LIST_STATS as LIST_STATS
from neurocube.storage.listing import (
    ObjectInfo,
    exists,
    find,
    info,
    isdir,
    list_files,
)
from neurocube.storage.listing import isfile as isfile
from neurocube.storage.listing import listdir as listdir
from neurocube.storage.locations import (
    basename,
    is_local,
    is_url,
    join,
    local_path,
    normalize,
    parent,
)
from neurocube.storage.locations import relative as relative
from neurocube.storage.options import SECRET_NAMES as SECRET_NAMES
from neurocube.storage.options import (
    StorageOptions,
    as_options,
    options_for,
    redact,
    remember_options,
)
from neurocube.storage.reading import SMALL_BLOCK as SMALL_BLOCK
from neurocube.storage.reading import (
    delete,
    open_file,
    read_all,
    read_range,
    read_ranges,
    write_bytes,
)
from neurocube.storage.remote_blocks import BLOCK_SIZE as BLOCK_SIZE
from neurocube.storage.remote_blocks import FETCH_THREADS as FETCH_THREADS
from neurocube.storage.remote_blocks import READAHEAD as READAHEAD
from neurocube.storage.remote_blocks import SHARED_BLOCKS as SHARED_BLOCKS
from neurocube.storage.remote_blocks import SHARED_CACHE_BYTES as SHARED_CACHE_BYTES
from neurocube.storage.remote_blocks import BlockReader

# Pickles and Dask tokens name a class by its module: keep naming the public classes
# ``neurocube.storage.X`` as before the split, so pickled specs still load and cache keys
# derived from objects that hold a FileIdentity or ObjectInfo do not change.
for _cls in (BlockReader, FileIdentity, HandlePool, ObjectInfo, StorageOptions):
    _cls.__module__ = __name__
del _cls

__all__ = [
    "IO_STATS",
    "BlockReader",
    "FileIdentity",
    "HandlePool",
    "ObjectInfo",
    "StorageOptions",
    "as_options",
    "basename",
    "check_unchanged",
    "delete",
    "exists",
    "file_identity",
    "find",
    "identity",
    "info",
    "is_local",
    "is_url",
    "isdir",
    "join",
    "list_files",
    "local_path",
    "normalize",
    "open_file",
    "options_for",
    "remember_options",
    "parent",
    "read_all",
    "read_range",
    "read_ranges",
    "write_bytes",
    "redact",
]
