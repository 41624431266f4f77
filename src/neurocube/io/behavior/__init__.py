"""Writers for behaviour datasets (the ``mosaic`` layout); every write is atomic.

- :func:`save_manifest`: ``dataset.yaml`` / ``.yml`` / ``.json``, unknown keys kept;
- :func:`write_index_csv`: an index CSV, every cell text;
- :func:`index_tracks_raw`: scan folders for raw tracker exports and write
  ``tracks_raw/index.csv``;
- :func:`save_tracks`: one (group, sequence) long-form table to
  ``tracks/<run_id>/<entry_key>.parquet`` and its row in ``tracks/index.csv``;
- :func:`convert_tracks`: raw TRex per-individual ``.npz`` exports to
  ``mosaic_v1`` parquet (pixels) in the run-folder layout.

No writer writes outside the dataset folder: a root or index path that leads
elsewhere (``..``, an absolute path, a remapped prefix) raises
:class:`~neurocube.errors.UnsafePathError`.

What readers (:mod:`neurocube.catalog.behavior`) and these writers both need
lives in this package, in the lower layer. Its modules, each re-exported here:

- :mod:`~neurocube.io.behavior.conventions`: names, roots, std formats, entry
  keys, list cells and path helpers (pure functions);
- :mod:`~neurocube.io.behavior.manifest`: finding, reading and writing the manifest;
- :mod:`~neurocube.io.behavior.index`: the index CSVs (read, select, merge, write);
- :mod:`~neurocube.io.behavior.layout`: :class:`DatasetLayout`, one dataset as
  its readers and writers see it;
- :mod:`~neurocube.io.behavior.tracks`: :func:`index_tracks_raw`, :func:`save_tracks`;
- :mod:`~neurocube.io.behavior.trex`: :func:`convert_tracks` (TRex exports).
"""

from __future__ import annotations

from neurocube.io.behavior.conventions import (  # noqa: F401  (re-exported)
    DEFAULT_ROOTS,
    MANIFEST_NAMES,
    MANIFEST_VERSION,
    STD_FORMAT_UNITS,
    entry_key,
    is_inside,
    longest_prefix_remap,
    split_list_cell,
    std_format_of,
)
from neurocube.io.behavior.index import (  # noqa: F401  (re-exported)
    RAW_INDEX_COLUMNS,
    TRACKS_INDEX_COLUMNS,
    index_file,
    read_index_csv,
    write_index_csv,
)
from neurocube.io.behavior.layout import DatasetLayout  # noqa: F401  (re-exported)
from neurocube.io.behavior.manifest import (  # noqa: F401  (re-exported)
    Manifest,
    find_manifest,
    save_manifest,
)
from neurocube.io.behavior.tracks import index_tracks_raw, save_tracks
from neurocube.io.behavior.trex import convert_tracks

__all__ = [
    "RAW_INDEX_COLUMNS",
    "TRACKS_INDEX_COLUMNS",
    "convert_tracks",
    "index_tracks_raw",
    "save_manifest",
    "save_tracks",
    "write_index_csv",
]
