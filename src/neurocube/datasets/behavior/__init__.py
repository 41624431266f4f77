"""Behaviour-tracking datasets (the ``mosaic`` layout) as lazy xarray Datasets.

>>> ds = neurocube.open_behavior("path/to/dataset")          # doctest: +SKIP
>>> long = ds.tracks(groups="g1", columns=["X", "Y"])        # doctest: +SKIP
>>> dense = ds.to_dense(sequences=["s1", "s2"])              # doctest: +SKIP

:func:`open_behavior` reads the manifest and the index CSVs only.
:meth:`BehaviorDataset.tracks` reads the parquet footers of the selected files
and returns a Dask-backed Dataset: the long form (one ``row`` per (frame, id),
chunked by parquet row groups) or, with ``dense=True`` / :meth:`to_dense`, the
``movement`` convention ``position(frame, space, keypoint, individual)`` plus
``confidence``, with a ``sequence`` dim when several sequences are stacked.
Labels come as a lazy event table (:meth:`labels`) or a dense per-frame array
aligned with the dense tracks (:meth:`labels_dense`).

This package's ``__init__`` holds :func:`open_behavior` and
:class:`BehaviorDataset` (files, units, frame ranges, :meth:`~BehaviorDataset.tracks`,
:meth:`~BehaviorDataset.to_dense`); the pieces live in sibling modules, their
public names re-exported here:

- :mod:`~neurocube.datasets.behavior.track_files`: :class:`TrackFile` and the column roles;
- :mod:`~neurocube.datasets.behavior.long_form`: building the long form, lazily or now;
- :mod:`~neurocube.datasets.behavior.dense`: planning and reading the dense view;
- :mod:`~neurocube.datasets.behavior.labels`: label files and the label methods
  (:class:`~neurocube.datasets.behavior.labels.LabelsMixin`, which
  :class:`BehaviorDataset` inherits);
- :mod:`~neurocube.datasets.behavior.graph`: Dask graph pieces the others share.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from neurocube import storage
from neurocube.catalog.behavior import STD_FORMAT_UNITS, BehaviorCatalog, Manifest, std_format_of
from neurocube.datasets.behavior.dense import (
    DEFAULT_FRAME_CHUNK,
    DenseTask,
    chunk_bounds,
    dense_chunk,
    dense_spec,
    pick_dense,
    plan_dense,
)
from neurocube.datasets.behavior.labels import LabelsMixin, read_npz_headers
from neurocube.datasets.behavior.long_form import (
    choose_columns,
    eager_long,
    lazy_long,
    planned_bytes,
)
from neurocube.datasets.behavior.track_files import (
    KEY_COLUMNS,
    POSITION_RE,
    STRING_KEYS,
    TrackFile,
)
from neurocube.errors import DataNotFoundError, FormatError, SelectionError
from neurocube.sources.parquet_meta import common_dtypes, read_parquet_info
from neurocube.storage import StorageOptions, is_url

__all__ = ["BehaviorDataset", "TrackFile", "open_behavior", "read_npz_headers"]

#: A frame-range selection of the long form whose row groups hold at most this many bytes of
#: values is read when :meth:`BehaviorDataset.tracks` is called (``lazy=None``): building
#: and running a Dask graph costs more than reading it (about 0.5 ms per column).
SMALL_READ_BYTES = 8 << 20


def open_behavior(
    path: str | os.PathLike[str],
    *,
    path_map: Mapping[str, str] | None = None,
    run_id: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> BehaviorDataset:
    """Open a behaviour dataset: read its manifest and index CSVs, nothing else.

    Parameters
    ----------
    path
        The dataset folder, or its ``dataset.yaml`` / ``.yml`` / ``.json``; a
        local path or a URL (``s3://bucket/dataset``, read-only).
    path_map
        ``{old prefix: new prefix}`` for absolute paths in the indexes that no
        longer exist (the dataset moved); the longest prefix wins.
    run_id
        Use this tracks run instead of the newest run per (group, sequence).
    storage_options
        fsspec options for a URL (``{"anon": True}`` for a public bucket, or an
        endpoint and keys). A remote dataset is listed once; opening reads the
        manifest and index CSVs; :meth:`BehaviorDataset.tracks` reads parquet
        footers (one range request each) and the chunks read their row groups'
        column chunks by a few large range requests. The specs carry the
        options, so Dask workers in other processes read with them.

    Returns
    -------
    BehaviorDataset

    Raises
    ------
    DataNotFoundError
        If there is no manifest.
    FormatError
        If the manifest is malformed.
    """
    return BehaviorDataset(
        BehaviorCatalog(path, path_map=path_map, storage_options=storage_options), run_id=run_id
    )


class BehaviorDataset(LabelsMixin):
    """A behaviour dataset: manifest, indexes, and lazy tracks and labels.

    Build it with :func:`open_behavior`.
    """

    def __init__(self, catalog: BehaviorCatalog, *, run_id: str | None = None) -> None:
        self.catalog = catalog
        self.run_id = run_id

    def __repr__(self) -> str:
        try:
            n = len(self.catalog.pairs())
        except (DataNotFoundError, FormatError):
            n = 0
        return f"<BehaviorDataset {self.manifest.name!r} at {self.root}: {n} sequences>"

    # -- manifest and paths (delegated) ------------------------------------------------

    @property
    def manifest(self) -> Manifest:
        """The dataset manifest."""
        return self.catalog.manifest

    @property
    def root(self) -> Path:
        """The dataset folder."""
        return self.catalog.root

    @property
    def fps_default(self) -> float | None:
        """``meta.fps_default`` of the manifest (None when absent)."""
        return self.manifest.fps_default

    def get_root(self, key: str) -> Path:
        """Return the absolute folder of a named root (see :meth:`Manifest.get_root`)."""
        return self.manifest.get_root(key)

    def set_root(self, key: str, path: str | os.PathLike[str]) -> Path:
        """Set a named root inside the dataset and create its folder (manifest saved)."""
        folder = self.manifest.set_root(key, path)
        self.manifest.save()
        return folder

    def ensure_roots(self) -> list[Path]:
        """Create the root folders that lie inside the dataset; return those created."""
        return self.manifest.ensure_roots()

    def remap_roots(self, path_map: Mapping[str, str], *, dry_run: bool = False) -> dict[str, str]:
        """Remap absolute roots by longest prefix and save the manifest (unless ``dry_run``)."""
        changes = self.manifest.remap_roots(path_map, dry_run=dry_run)
        if changes and not dry_run:
            self.manifest.save()
            self.catalog.invalidate()
        return changes

    def resolve_path(self, path: str | os.PathLike[str]) -> Path:
        """Resolve a stored path (relative to the dataset, or absolute through ``path_map``)."""
        return self.catalog.resolve_path(path)

    def make_portable(self, *, dry_run: bool = False) -> dict[str, int]:
        """Turn absolute paths inside the dataset into relative ones (manifest and indexes)."""
        return self.catalog.make_portable(dry_run=dry_run)

    def rewrite_index_paths(
        self, path_map: Mapping[str, str], *, dry_run: bool = False
    ) -> dict[str, int]:
        """Rewrite index paths through ``path_map`` on disk (atomic; never outside the dataset)."""
        return self.catalog.rewrite_index_paths(path_map, dry_run=dry_run)

    # -- listing -------------------------------------------------------------------------

    def list_groups(self) -> list[str]:
        """Return the sorted group names of ``tracks/index.csv``."""
        return self.catalog.list_groups()

    def list_sequences(self, group: str | None = None) -> list[str]:
        """Return the sorted sequence names (of one group when given)."""
        return self.catalog.list_sequences(group)

    def sequence_metadata(
        self, level_names: Sequence[str] | None = None, separator: str = "__"
    ) -> pd.DataFrame:
        """Return one row per sequence with index columns and parsed hierarchy levels."""
        return self.catalog.sequence_metadata(level_names, separator)

    def query_sequences(self, **criteria: str | None) -> list[tuple[str, str]]:
        """Return (group, sequence) pairs by prefix / suffix / substring of their names.

        Keywords: ``group_contains, group_startswith, group_endswith,
        sequence_contains, sequence_startswith, sequence_endswith``.
        """
        return self.catalog.query_sequences(**criteria)

    # -- files -----------------------------------------------------------------------------

    def track_files(
        self,
        groups: str | Iterable[str] | None = None,
        sequences: str | Iterable[str] | None = None,
        *,
        pairs: Iterable[tuple[str, str]] | None = None,
        run_id: str | None = None,
    ) -> list[TrackFile]:
        """Return the selected tracks files with their footers (reads footers only).

        Raises
        ------
        SelectionError
            If a group / sequence / run is not in the index, or nothing is selected.
        DataNotFoundError
            If an indexed parquet file is missing.
        """
        table = self.catalog.select(groups, sequences, run_id or self.run_id)
        if pairs is not None:
            wanted = {(str(g), str(s)) for g, s in pairs}
            have = set(zip(table["group"], table["sequence"], strict=True))
            missing = wanted - have
            if missing:
                raise SelectionError(
                    f"{self.catalog.index_path('tracks')}: no tracks for {sorted(missing)}"
                )
            keep = [
                (g, s) in wanted for g, s in zip(table["group"], table["sequence"], strict=True)
            ]
            table = table[keep]
        if table.empty:
            raise SelectionError(
                f"{self.catalog.index_path('tracks')}: the selection (groups={groups!r}, "
                f"sequences={sequences!r}) matches no tracks"
            )
        files = []
        names = list(table.columns)
        records = [
            dict(zip(names, cells, strict=True))
            for cells in zip(*(table[c].tolist() for c in names), strict=True)
        ]
        for row in records:
            path = self.catalog.resolve_path(row["abs_path"])
            meta = self.catalog.stat(path)
            if meta is None:
                raise DataNotFoundError(
                    f"{path}: tracks file of group {row['group']!r}, sequence {row['sequence']!r} "
                    f"(index {self.catalog.index_path('tracks')}) does not exist. If the dataset "
                    "moved, open it with path_map={old_prefix: new_prefix}."
                )
            std_format = std_format_of(str(row.get("std_format", "")))
            units = STD_FORMAT_UNITS.get(std_format)
            if units is None:
                raise FormatError(
                    f"{path}: unknown std_format {std_format!r} in the tracks index; known: "
                    f"{sorted(STD_FORMAT_UNITS)}"
                )
            info = read_parquet_info(
                str(path), storage_options=self._options_for(str(path)), object_info=meta
            )
            files.append(
                TrackFile(row["group"], row["sequence"], info.path, std_format, units, info)
            )
        return files

    def _options_for(self, path: str) -> StorageOptions | None:
        """Return the storage options to read ``path`` with (None for a local file)."""
        if not is_url(path):
            return None
        return self.catalog.storage_options or storage.options_for(path)

    def _convert_units(
        self,
        files: list[TrackFile],
        units: str | None,
        cm_per_pixel: float | Mapping[Any, float] | None,
    ) -> tuple[list[TrackFile], str]:
        families = sorted({f.units for f in files})
        if units is None:
            if len(families) > 1:
                by_family = {
                    fam: sorted({f.std_format for f in files if f.units == fam}) for fam in families
                }
                raise FormatError(
                    f"dataset {self.root}: the selection mixes unit families {by_family}; "
                    "positions in pixels and centimetres cannot share one Dataset. Pass "
                    "units='cm' (or 'pixels') with cm_per_pixel=<float or {(group, sequence): "
                    "float}> to convert, or select sequences of one family."
                )
            return files, families[0]
        if units not in ("cm", "pixels"):
            raise SelectionError(f"units must be 'cm' or 'pixels', got {units!r}")
        out = []
        for f in files:
            if f.units == units:
                out.append(f)
                continue
            factor = _lookup_cm_per_pixel(cm_per_pixel, f.group, f.sequence)
            if factor is None:
                raise FormatError(
                    f"{f.path}: stored in {f.units} ({f.std_format}); converting to {units} needs "
                    f"cm_per_pixel for ({f.group!r}, {f.sequence!r}). Pass cm_per_pixel=<float> "
                    "or a mapping keyed by (group, sequence) or sequence."
                )
            scale = factor if units == "cm" else 1.0 / factor
            out.append(replace(f, scale=scale, units=units))
        return out, units

    def _frame_range(
        self,
        start_frame: int | None,
        end_frame: int | None,
        start_time: float | None,
        end_time: float | None,
    ) -> tuple[int | None, int | None]:
        start_frame = _bound("start_frame", start_frame, self.manifest.path, whole=True)
        end_frame = _bound("end_frame", end_frame, self.manifest.path, whole=True)
        start_time = _bound("start_time", start_time, self.manifest.path, whole=False)
        end_time = _bound("end_time", end_time, self.manifest.path, whole=False)
        if start_time is not None or end_time is not None:
            fps = self.fps_default
            if fps is None or fps <= 0:
                raise FormatError(
                    f"{self.manifest.path}: start_time/end_time need meta.fps_default in the "
                    "manifest (frame = time x fps); set it, or filter with start_frame/end_frame."
                )
            if start_time is not None:
                t_frame = math.ceil(start_time * fps - 1e-9)
                start_frame = t_frame if start_frame is None else max(start_frame, t_frame)
            if end_time is not None:
                t_frame = math.ceil(end_time * fps - 1e-9)
                end_frame = t_frame if end_frame is None else min(end_frame, t_frame)
        if start_frame is not None and end_frame is not None and end_frame < start_frame:
            raise SelectionError(f"end_frame {end_frame} is before start_frame {start_frame}")
        return start_frame, end_frame

    # -- tracks: long form -----------------------------------------------------------------

    def tracks(
        self,
        groups: str | Iterable[str] | None = None,
        sequences: str | Iterable[str] | None = None,
        *,
        columns: Sequence[str] | None = None,
        with_keys: bool = True,
        start_frame: int | None = None,
        end_frame: int | None = None,
        start_time: float | None = None,
        end_time: float | None = None,
        exact: bool = True,
        units: str | None = None,
        cm_per_pixel: float | Mapping[Any, float] | None = None,
        min_chunk_rows: int = 65536,
        dense: bool = False,
        frame_chunk: int | None = None,
        individuals: Sequence[int] | None = None,
        run_id: str | None = None,
        pairs: Iterable[tuple[str, str]] | None = None,
        lazy: bool | None = None,
    ) -> xr.Dataset:
        """Return the selected tracks as one Dataset: lazy, or loaded when small and filtered.

        Parameters
        ----------
        groups, sequences
            Names (or lists of names) to keep; None keeps all. ``pairs`` (a list
            of (group, sequence), e.g. from :meth:`query_sequences`) narrows further.
        columns
            Data columns to read (default: every numeric column). Only these,
            plus the key columns ``frame, time, id`` when ``with_keys``, are read.
        with_keys
            Read ``frame, time, id`` as coordinates along ``row``.
        start_frame, end_frame
            Keep frames in ``[start_frame, end_frame)``; pushed down to row-group statistics.
        start_time, end_time
            The same in seconds, converted with the manifest's ``meta.fps_default``.
        exact
            With a frame filter, drop the rows outside the range exactly: the
            ``frame`` column of the (at most two per file) row groups that
            straddle a bound is read now to size the chunks. ``exact=False``
            reads nothing now and keeps those row groups whole.
        units, cm_per_pixel
            Convert positions to ``"cm"`` or ``"pixels"``; needed when the
            selection mixes unit families (refused otherwise).
        min_chunk_rows
            Merge consecutive row groups into chunks of at least this many rows.
        dense, frame_chunk, individuals
            Return the dense view instead (see :meth:`to_dense`).
        run_id
            Use this tracks run instead of the newest.
        lazy
            ``True``: Dask arrays, one task per chunk, nothing read but the
            boundary frames of ``exact``. ``False``: read the selection now into
            numpy arrays. ``None`` (default): lazy, except a frame / time range
            whose row groups hold at most ``SMALL_READ_BYTES`` (8 MiB) of values,
            which is read now (one read per file; a Dask graph would cost more
            than the read). Both give the same values, dtypes and coords, with
            the same page-checksum and changed-file checks. Ignored with ``dense``.

        Returns
        -------
        xarray.Dataset
            Long form: dim ``row``; coords ``frame, time, id, group, sequence``;
            one variable per data column, Dask-backed or (small frame ranges,
            ``lazy=False``) numpy-backed. Attrs record ``std_formats``,
            ``units``, ``neurocube_sources`` and the filter.
        """
        if dense:
            return self.to_dense(
                groups,
                sequences,
                columns=columns,
                start_frame=start_frame,
                end_frame=end_frame,
                start_time=start_time,
                end_time=end_time,
                units=units,
                cm_per_pixel=cm_per_pixel,
                frame_chunk=frame_chunk,
                individuals=individuals,
                run_id=run_id,
                pairs=pairs,
            )
        lo, hi = self._frame_range(start_frame, end_frame, start_time, end_time)
        files = self.track_files(groups, sequences, pairs=pairs, run_id=run_id)
        files, unit_family = self._convert_units(files, units, cm_per_pixel)
        infos = [f.info for f in files]
        data_columns = choose_columns(files, columns)
        keys = [k for k in KEY_COLUMNS if with_keys and any(k in i.dtypes for i in infos)]
        out_columns = [*keys, *data_columns]
        dtypes = common_dtypes(infos, out_columns)
        dtypes = [
            "float64"
            if POSITION_RE.match(c)
            and np.dtype(dt).kind != "f"
            and any(f.scale != 1.0 for f in files)
            else dt
            for c, dt in zip(out_columns, dtypes, strict=True)
        ]
        filtering = lo is not None or hi is not None
        if filtering:
            for f in files:
                if "frame" not in f.info.dtypes:
                    raise FormatError(f"{f.path}: no 'frame' column; cannot filter by frame")
        scaled_columns = tuple(c for c in out_columns if POSITION_RE.match(c))
        if lazy is None:  # a small frame range is read now: Dask would cost more than the read
            lazy = not filtering or planned_bytes(files, lo, hi, dtypes) > SMALL_READ_BYTES
        coords: dict[str, Any]
        data_vars: dict[str, Any]
        if lazy:
            coords, data_vars = lazy_long(
                files, out_columns, dtypes, keys, data_columns, scaled_columns,
                (lo, hi) if filtering else None, exact, min_chunk_rows,
            )  # fmt: skip
        else:
            coords, data_vars = eager_long(
                files, out_columns, dtypes, keys, data_columns, scaled_columns,
                (lo, hi) if filtering else None, exact,
            )  # fmt: skip
        ds = xr.Dataset(data_vars, coords=coords)
        attrs: dict[str, Any] = {
            "neurocube_sources": [f.path for f in files],
            "dataset": self.manifest.name,
            "dataset_root": str(self.root),
            "layout": "long",
            "std_formats": sorted({f.std_format for f in files}),
            "units": unit_family,
            "frame_filter": ("exact" if exact else "row_groups") if filtering else "none",
        }
        if lo is not None:
            attrs["start_frame"] = int(lo)
        if hi is not None:
            attrs["end_frame"] = int(hi)
        if self.fps_default is not None:
            attrs["fps"] = float(self.fps_default)
        if any(f.scale != 1.0 for f in files):
            attrs["unit_conversion"] = {
                f"{f.group}/{f.sequence}": float(f.scale) for f in files if f.scale != 1.0
            }
        skipped = sorted({c for i in infos for c in i.other_columns} - set(STRING_KEYS))
        if skipped:
            attrs["skipped_columns"] = skipped
        ds.attrs.update(attrs)
        for c in data_columns:
            if POSITION_RE.match(c):
                ds.variables[c].attrs["units"] = unit_family
        return ds

    # -- tracks: dense view -------------------------------------------------------------------

    def to_dense(
        self,
        groups: str | Iterable[str] | None = None,
        sequences: str | Iterable[str] | None = None,
        *,
        columns: Sequence[str] | None = None,
        start_frame: int | None = None,
        end_frame: int | None = None,
        start_time: float | None = None,
        end_time: float | None = None,
        units: str | None = None,
        cm_per_pixel: float | Mapping[Any, float] | None = None,
        frame_chunk: int | None = None,
        individuals: Sequence[int] | None = None,
        run_id: str | None = None,
        pairs: Iterable[tuple[str, str]] | None = None,
        stack: bool | None = None,
    ) -> xr.Dataset:
        """Return the selected tracks in the ``movement`` shape, lazily.

        ``position(frame, space, keypoint, individual)`` and
        ``confidence(frame, keypoint, individual)``; keypoints are the
        ``poseX<k>/poseY<k>/poseP<k>`` columns (``k`` as the keypoint name), or a
        single ``centroid`` keypoint from ``X, Y`` when there are no pose
        columns. With pose columns, ``X, Y`` also give ``centroid(frame, space,
        individual)``. A frame or (frame, id) with no row is NaN; when a
        (frame, id) appears twice the last row wins.

        The frame axis of a sequence runs from the smallest to the largest frame
        of its footer statistics (clipped to the filter). Individuals are every
        id between the smallest and largest ``id`` of the statistics, unless
        ``individuals`` is given (rows of other ids are then dropped).

        Several sequences (or ``stack=True``) add a leading ``sequence`` dim:
        ``frame`` is then the offset from each sequence's first frame, padded
        with NaN to the longest; ``frame_start(sequence)`` and
        ``n_frames(sequence)`` keep the true start and length.

        Parameters
        ----------
        columns
            Extra data columns to add as ``(frame, individual)`` variables.
        frame_chunk
            Frames per chunk (default 16384).

        Other Parameters
        ----------------
            As in :meth:`tracks`.
        """
        lo, hi = self._frame_range(start_frame, end_frame, start_time, end_time)
        files = self.track_files(groups, sequences, pairs=pairs, run_id=run_id)
        files, unit_family = self._convert_units(files, units, cm_per_pixel)
        plan = plan_dense(files, lo, hi, individuals, list(columns or []))
        frame_chunk = int(frame_chunk or DEFAULT_FRAME_CHUNK)
        if frame_chunk <= 0:
            raise SelectionError(f"frame_chunk must be positive, got {frame_chunk}")
        stacked = len(files) > 1 if stack is None else bool(stack)
        if len(files) > 1 and not stacked:
            raise SelectionError(
                "several sequences selected: they can only be stacked (stack=True)"
            )
        n_max = max(plan.lengths) if plan.lengths else 0
        bounds = chunk_bounds(n_max, frame_chunk)
        token = tokenize("dense", [f.info for f in files], [f.scale for f in files], plan, bounds)
        read_name = f"tracks-dense-read-{token}"
        read_layer: dict[Any, Any] = {}
        for s, f in enumerate(files):
            for j, (a, b) in enumerate(bounds):
                task = DenseTask(
                    spec=dense_spec(
                        f, plan, plan.starts[s] + a, plan.starts[s] + min(b, plan.lengths[s])
                    ),
                    frame_lo=plan.starts[s] + a,
                    n_frames=b - a,
                    n_valid=max(0, min(b, plan.lengths[s]) - a),
                    plan=plan,
                    scale=f.scale,
                )
                read_layer[(read_name, s, j)] = (dense_chunk, task)
        chunk_frames = tuple(b - a for a, b in bounds) or (0,)
        n_kp, n_ind, n_seq = len(plan.keypoints), len(plan.individuals), len(files)
        shapes = {
            "position": ((2, n_kp, n_ind), (2,), (n_kp,), (n_ind,)),
            "confidence": ((n_kp, n_ind), (n_kp,), (n_ind,)),
        }
        var_dims = {
            "position": ("frame", "space", "keypoint", "individual"),
            "confidence": ("frame", "keypoint", "individual"),
        }
        if plan.has_centroid:
            shapes["centroid"] = ((2, n_ind), (2,), (n_ind,))
            var_dims["centroid"] = ("frame", "space", "individual")
        for c in plan.extra:
            shapes[c] = ((n_ind,), (n_ind,))
            var_dims[c] = ("frame", "individual")
        data_vars: dict[str, Any] = {}
        for var, (_, *rest) in shapes.items():
            name = f"tracks-dense-{var}-{token}"
            layer: dict[Any, Any] = {
                (name, s, j, *([0] * len(rest))): (pick_dense, (read_name, s, j), var, stacked)
                for s in range(n_seq)
                for j in range(len(bounds))
            }
            if not stacked:
                layer = {(k[0], *k[2:]): v for k, v in layer.items()}
            graph = HighLevelGraph(
                {read_name: read_layer, name: layer}, {read_name: set(), name: {read_name}}
            )
            chunks: tuple[tuple[int, ...], ...] = (chunk_frames, *rest)
            if stacked:
                chunks = ((1,) * n_seq, *chunks)
            dims = var_dims[var]
            arr = da.Array(graph, name, chunks, dtype=np.float64)
            data_vars[var] = (("sequence", *dims) if stacked else dims, arr)
        coords: dict[str, Any] = {
            "space": ["x", "y"],
            "keypoint": list(plan.keypoints),
            "individual": np.asarray(plan.individuals, dtype=np.int64),
        }
        fps = self.fps_default
        if stacked:
            coords["frame"] = np.arange(n_max, dtype=np.int64)
            coords["group"] = ("sequence", np.asarray([f.group for f in files], dtype=str))
            coords["sequence"] = np.asarray([f.sequence for f in files], dtype=str)
            coords["frame_start"] = ("sequence", np.asarray(plan.starts, dtype=np.int64))
            coords["n_frames"] = ("sequence", np.asarray(plan.lengths, dtype=np.int64))
        else:
            frames = np.arange(plan.starts[0], plan.starts[0] + plan.lengths[0], dtype=np.int64)
            coords["frame"] = frames
            if fps:
                coords["time"] = ("frame", frames / fps)
        ds = xr.Dataset(data_vars, coords=coords)
        ds.attrs.update(
            {
                "neurocube_sources": [f.path for f in files],
                "dataset": self.manifest.name,
                "dataset_root": str(self.root),
                "layout": "dense",
                "std_formats": sorted({f.std_format for f in files}),
                "units": unit_family,
                "source_software": "neurocube (mosaic layout)",
            }
        )
        if not stacked:
            ds.attrs["group"] = files[0].group
            ds.attrs["sequence"] = files[0].sequence
        if fps:
            ds.attrs["fps"] = float(fps)
        for var in ("position", "centroid"):
            if var in ds:
                ds[var].attrs["units"] = unit_family
        return ds


# --------------------------------------------------------------------------- helpers


def _lookup_cm_per_pixel(
    cm_per_pixel: float | Mapping[Any, float] | None, group: str, sequence: str
) -> float | None:
    if cm_per_pixel is None:
        return None
    if isinstance(cm_per_pixel, Mapping):
        for key in ((group, sequence), sequence):
            if key in cm_per_pixel:
                return float(cm_per_pixel[key])
        return None
    return float(cm_per_pixel)


def _bound(name: str, value: Any, where: Any, *, whole: bool) -> Any:
    """Check a frame or time bound: None, or a finite number (a whole one for frames)."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise SelectionError(f"{where}: {name} must be a number or None, got {value!r}.")
    if not math.isfinite(float(value)):
        raise SelectionError(f"{where}: {name} must be a finite number or None, got {value!r}.")
    if whole:
        if float(value) != int(value):
            raise SelectionError(f"{where}: {name} must be a whole frame number, got {value!r}.")
        return int(value)
    return float(value)
