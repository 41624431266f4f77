"""Conversion of raw TRex exports to standard tracks: :func:`convert_tracks`.

TRex writes one ``.npz`` per individual; the exports of one (group, sequence)
become one ``mosaic_v1`` (pixels) or ``mosaic_cm_v1`` parquet table in the
run-folder layout, written through :func:`~neurocube.io.behavior.tracks.save_tracks`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neurocube.errors import FormatError, SelectionError
from neurocube.io._atomic import atomic_path
from neurocube.io.behavior.conventions import entry_key
from neurocube.io.behavior.index import filter_pairs
from neurocube.io.behavior.layout import writable_layout, writable_root
from neurocube.io.behavior.tracks import save_tracks
from neurocube.storage import open_file


def _load_trex_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with open_file(path, "rb") as fh, np.load(fh, allow_pickle=False) as npz:
            return {name: np.asarray(npz[name]) for name in npz.files}
    except ValueError as exc:
        raise FormatError(
            f"{path}: not a plain TRex export ({exc}); TRex writes numeric arrays only, "
            "so an object member means another writer."
        ) from exc


def _trex_frame(
    path: Path, arrays: dict[str, np.ndarray], cm_per_pixel: float | None, to_pixels: bool
) -> tuple[pd.DataFrame, float | None]:
    for needed in ("frame", "X", "Y"):
        if needed not in arrays:
            raise FormatError(
                f"{path}: TRex export has no {needed!r} array; members are {sorted(arrays)}"
            )
    n = arrays["frame"].shape[0]
    if "id" in arrays and np.asarray(arrays["id"]).size >= 1:
        ident = int(np.asarray(arrays["id"]).reshape(-1)[0])
    else:
        m = re.search(r"_fish(\d+)$", path.stem)
        if m is None:
            raise FormatError(f"{path}: no 'id' array and no _fish<k> suffix to take the id from")
        ident = int(m.group(1))
    scale = cm_per_pixel
    if scale is None and "cm_per_pixel" in arrays and np.asarray(arrays["cm_per_pixel"]).size:
        scale = float(np.asarray(arrays["cm_per_pixel"]).reshape(-1)[0])
    if to_pixels and not (scale and np.isfinite(scale) and scale > 0):
        raise FormatError(
            f"{path}: positions are in cm and the export has no usable cm_per_pixel "
            f"(found {scale!r}); pass cm_per_pixel=<float> or std_format='mosaic_cm_v1'."
        )
    columns: dict[str, np.ndarray] = {}
    for name, values in arrays.items():
        if values.ndim != 1 or values.shape[0] != n or name in ("id", "cm_per_pixel"):
            continue
        columns[name] = values
    frame = pd.DataFrame(columns)
    frame["id"] = ident
    x_col = "X#wcentroid" if "X#wcentroid" in frame.columns else "X"
    y_col = "Y#wcentroid" if "Y#wcentroid" in frame.columns else "Y"
    out = pd.DataFrame(
        {
            "frame": frame["frame"].astype(np.int64),
            "time": frame["time"].astype(np.float64) if "time" in frame else np.nan,
            "id": np.int64(ident),
            "X": frame[x_col].astype(np.float64),
            "Y": frame[y_col].astype(np.float64),
        }
    )
    pose = sorted(
        {int(m.group(1)) for c in frame.columns if (m := re.fullmatch(r"poseX(\d+)", str(c)))}
    )
    for k in pose:
        if f"poseY{k}" not in frame:
            continue
        out[f"poseX{k}"] = frame[f"poseX{k}"].astype(np.float64)
        out[f"poseY{k}"] = frame[f"poseY{k}"].astype(np.float64)
    position_cols = [c for c in out.columns if c not in ("frame", "time", "id")]
    values = out[position_cols].to_numpy()
    values[~np.isfinite(values)] = np.nan  # TRex marks a lost individual with inf
    if to_pixels:
        assert scale is not None
        values = values / scale
    out[position_cols] = values
    tracked = ~np.isnan(values).all(axis=1)
    return out[tracked].reset_index(drop=True), scale


def convert_tracks(
    dataset: Any,
    *,
    groups: str | Iterable[str] | None = None,
    sequences: str | Iterable[str] | None = None,
    src_format: str = "trex_npz",
    std_format: str = "mosaic_v1",
    cm_per_pixel: float | None = None,
    row_group_size: int = 65536,
    overwrite: bool = False,
) -> list[Path]:
    """Convert raw tracks listed in ``tracks_raw/index.csv`` to standard parquet.

    Supported raw format: ``trex_npz``, TRex's per-individual ``.npz`` exports
    (one 1-D array per column, ``id`` and ``cm_per_pixel`` as 1-element arrays,
    positions in cm, ``inf`` where the individual was lost). The files of one
    (group, sequence) are merged into one long table, one row per (frame, id):

    - ``X, Y`` come from ``X#wcentroid, Y#wcentroid`` when present (the
      weighted centroid), else from ``X, Y``; ``poseX<k>, poseY<k>`` are kept;
    - ``inf`` becomes NaN, and rows where nothing was tracked are dropped;
    - ``std_format="mosaic_v1"`` stores pixels (cm / ``cm_per_pixel``, taken
      from the export unless given); ``"mosaic_cm_v1"`` keeps centimetres;
    - derived columns (``SPEED, ANGLE, VX, ...``) are not kept.

    Output: ``tracks/<run_id>/<entry_key>.parquet`` with
    ``run_id = "convert-trex_npz.1-<hash of the parameters>"`` and a
    ``params.json`` beside them; ``tracks/index.csv`` is updated atomically.

    Returns
    -------
    list of pathlib.Path
        The parquet files written (or found, when they exist and not ``overwrite``).
    """
    if src_format != "trex_npz":
        raise SelectionError(
            f"no converter for src_format {src_format!r}; neurocube converts 'trex_npz' "
            "(TRex per-individual .npz exports)"
        )
    if std_format not in ("mosaic_v1", "mosaic_cm_v1"):
        raise SelectionError(
            f"std_format must be 'mosaic_v1' or 'mosaic_cm_v1', not {std_format!r}"
        )
    catalog = writable_layout(dataset)
    raw = catalog.read_index("tracks_raw")
    raw = raw[raw["src_format"] == src_format]
    raw = filter_pairs(raw, groups, sequences, catalog.index_path("tracks_raw"))
    if raw.empty:
        raise SelectionError(
            f"{catalog.index_path('tracks_raw')}: no {src_format} rows to convert for "
            f"groups={groups!r}, sequences={sequences!r}; run index_tracks_raw first."
        )
    params = {"src_format": src_format, "std_format": std_format, "cm_per_pixel": cm_per_pixel}
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode(), usedforsecurity=False)
    run_id = f"convert-{src_format}.1-{digest.hexdigest()[:10]}"
    run_dir = writable_root(catalog, "tracks") / run_id
    catalog.check_writable(run_dir, "run folder")
    with atomic_path(run_dir / "params.json") as tmp:
        tmp.write_text(
            json.dumps({"op": f"convert-{src_format}", "version": "1", "params": params}, indent=2)
            + "\n"
        )
    written = []
    to_pixels = std_format == "mosaic_v1"
    for (group, sequence), rows in raw.groupby(["group", "sequence"], sort=True):
        target = (
            catalog.manifest.get_root("tracks") / run_id / f"{entry_key(group, sequence)}.parquet"
        )
        if target.exists() and not overwrite:
            written.append(target)
            continue
        pieces = []
        sources = []
        scales = set()
        for cell in rows["abs_path"]:
            src = catalog.resolve_path(cell)
            sources.append(src)
            piece, scale = _trex_frame(src, _load_trex_npz(src), cm_per_pixel, to_pixels)
            scales.add(scale)
            pieces.append(piece)
        table = pd.concat(pieces, ignore_index=True)
        if table.duplicated(["frame", "id"]).any():
            raise FormatError(
                f"{[str(s) for s in sources]}: two exports of ({group!r}, {sequence!r}) hold the "
                "same (frame, id); give each individual its own id."
            )
        extra = {}
        if len(scales) == 1 and None not in scales:
            extra["cm_per_pixel"] = repr(float(next(iter(scales))))  # type: ignore[arg-type]
        written.append(
            save_tracks(
                catalog,
                str(group),
                str(sequence),
                table,
                run_id=run_id,
                std_format=std_format,
                producer=f"convert-{src_format}",
                source_path=sources[0] if len(sources) == 1 else None,
                row_group_size=row_group_size,
                overwrite=True,
                extra_index=extra,
            )
        )
    return written
