"""Names and paths of the ``mosaic`` layout, shared by its readers and writers.

The manifest file names and version, the roots every dataset has, the standard
track schemas and their units, the file stem of one (group, sequence), the
text of list cells in an index, and where a stored path leads (inside the
dataset or not, remapped by prefix, joined to a URL). Pure functions: nothing
here reads or writes a file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

MANIFEST_NAMES = ("dataset.yaml", "dataset.yml", "dataset.json")
MANIFEST_VERSION = 3

#: Roots every dataset has (relative to the dataset folder); absent keys are filled on load.
DEFAULT_ROOTS: dict[str, str] = {
    "media_raw": "media_raw",
    "tracks_raw": "tracks_raw",
    "labels_raw": "labels_raw",
    "labels": "labels",
    "media": "media",
    "tracks": "tracks",
    "features": "features",
    "models": "models",
    "frames": "media/frames",
}

#: Standard track schemas and the unit family of their positions.
STD_FORMAT_UNITS: dict[str, str] = {
    "mosaic_v1": "pixels",
    "trex_v1": "cm",
    "trex_v2": "pixels",
    "mosaic_cm_v1": "cm",
}

#: The roots whose index CSV sits in the root folder (labels are per kind: ``labels/<kind>``).
INDEX_KINDS = ("tracks_raw", "tracks")


def entry_key(group: str, sequence: str) -> str:
    """Return the file stem the layout uses for one (group, sequence).

    ``quote(group, safe="") + "__" + quote(sequence, safe="")``, or the quoted
    sequence alone when the group is empty.

    Examples
    --------
    >>> entry_key("fish 1", "a/b")
    'fish%201__a%2Fb'
    >>> entry_key("", "s1")
    's1'
    """
    if not group:
        return quote(sequence, safe="")
    return quote(group, safe="") + "__" + quote(sequence, safe="")


def std_format_of(cell: str) -> str:
    """Return the standard track schema named by an index cell (blank means ``trex_v1``)."""
    return cell.strip() or "trex_v1"


def split_list_cell(cell: str) -> list[str]:
    """Split a comma-joined index cell (``"0,1,2"``) into its items; blank gives ``[]``."""
    cell = cell.strip()
    if not cell:
        return []
    return [item.strip() for item in cell.split(",")]


def is_inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Return True if ``path`` (after resolving ``..`` and symlinks) lies inside ``folder``."""
    resolved = Path(os.path.realpath(os.fspath(path)))
    base = Path(os.path.realpath(os.fspath(folder)))
    return resolved == base or base in resolved.parents


def longest_prefix_remap(path: str, path_map: Mapping[str, str]) -> str | None:
    """Replace the longest prefix of ``path`` found in ``path_map``; None if none matches.

    A prefix matches on whole path components only (``/data/a`` matches
    ``/data/a/x.parquet`` but not ``/data/ab/x.parquet``).

    Examples
    --------
    >>> longest_prefix_remap("/old/data/t.parquet", {"/old": "/x", "/old/data": "/new"})
    '/new/t.parquet'
    >>> longest_prefix_remap("/other/t.parquet", {"/old": "/x"}) is None
    True
    """
    norm = path.replace("\\", "/")
    for src in sorted(path_map, key=len, reverse=True):
        prefix = src.replace("\\", "/").rstrip("/")
        if not prefix:
            continue
        if norm == prefix or norm.startswith(prefix + "/"):
            dest = path_map[src].replace("\\", "/").rstrip("/")
            return dest + norm[len(prefix) :]
    return None


def url_join(base: str, rel: str) -> str:
    """Join a relative POSIX path to a URL, resolving ``.`` and ``..`` lexically."""
    scheme, rest = base.rstrip("/").split("://", 1)
    parts = rest.split("/")
    for part in rel.replace("\\", "/").split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if len(parts) > 1:
                parts.pop()
            continue
        parts.append(part)
    return f"{scheme}://" + "/".join(parts)
