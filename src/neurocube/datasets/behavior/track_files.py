"""The tracks files a selection reads, and the roles of their columns.

:class:`TrackFile` is one selected parquet file with its footer; the key
columns (``frame, time, id``) become coordinates, the string keys (``group,
sequence``) constant coordinates, and the position columns (matched by
``POSITION_RE``) carry units and are scaled by a unit conversion.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from neurocube.sources.parquet_meta import ParquetFileInfo

KEY_COLUMNS = ("frame", "time", "id")
STRING_KEYS = ("group", "sequence")
POSITION_RE = re.compile(r"^(X|Y|VX|VY|SPEED|poseX\d+|poseY\d+)(#.*)?$")


@dataclass(frozen=True)
class TrackFile:
    """One selected tracks file: where it is, what it holds, and its footer."""

    group: str
    sequence: str
    path: str
    std_format: str
    units: str
    info: ParquetFileInfo
    scale: float = 1.0
