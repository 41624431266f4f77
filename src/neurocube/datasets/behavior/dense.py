"""The dense view of the tracks: ``position(frame, space, keypoint, individual)`` and friends.

:func:`plan_dense` reads footer statistics only to fix the keypoints, the
individuals and each sequence's frame range (a :class:`_DensePlan`);
:func:`dense_spec` picks the row groups one frame chunk needs; the chunk task
:func:`dense_chunk` reads them and scatters rows into NaN-filled arrays (the
last row of a repeated (frame, id) wins); :func:`pick_dense` takes one variable.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from neurocube.datasets.behavior.track_files import KEY_COLUMNS, POSITION_RE, TrackFile
from neurocube.errors import FormatError, SelectionError
from neurocube.sources.parquet import ParquetChunkSpec, read_table

_POSE_RE = re.compile(r"^pose([XYP])(\d+)$")
DEFAULT_FRAME_CHUNK = 16384


@dataclass(frozen=True)
class _DensePlan:
    keypoints: tuple[str, ...]
    x_cols: tuple[str, ...]
    y_cols: tuple[str, ...]
    p_cols: tuple[str | None, ...]
    has_centroid: bool
    extra: tuple[str, ...]
    individuals: tuple[int, ...]
    starts: tuple[int, ...]
    lengths: tuple[int, ...]


def plan_dense(
    files: list[TrackFile],
    lo: int | None,
    hi: int | None,
    individuals: Sequence[int] | None,
    extra: list[str],
) -> _DensePlan:
    """Fix the keypoints, individuals and columns of the dense view from footers only."""
    pose: dict[int, set[str]] = {}
    numeric: set[str] = set()
    for f in files:
        numeric |= set(f.info.dtypes)
        for c in f.info.dtypes:
            m = _POSE_RE.match(c)
            if m:
                pose.setdefault(int(m.group(2)), set()).add(m.group(1))
    for f in files:
        for needed in ("frame", "id"):
            if needed not in f.info.dtypes:
                raise FormatError(
                    f"{f.path}: no {needed!r} column; the dense view needs frame and id"
                )
    ks = sorted(k for k, axes in pose.items() if {"X", "Y"} <= axes)
    has_xy = {"X", "Y"} <= numeric
    if ks:
        keypoints = tuple(str(k) for k in ks)
        x_cols = tuple(f"poseX{k}" for k in ks)
        y_cols = tuple(f"poseY{k}" for k in ks)
        p_cols: tuple[str | None, ...] = tuple(f"poseP{k}" if "P" in pose[k] else None for k in ks)
        has_centroid = has_xy
    elif has_xy:
        keypoints, x_cols, y_cols, p_cols, has_centroid = (
            ("centroid",),
            ("X",),
            ("Y",),
            (None,),
            False,
        )
    else:
        raise FormatError(f"{files[0].path}: no X/Y or poseX<k>/poseY<k> columns to place in space")
    for c in extra:
        if c not in numeric:
            raise SelectionError(f"column {c!r} is in none of the selected files")
    if individuals is None:
        lows, highs = [], []
        for f in files:
            rng = f.info.column_range("id")
            if rng is None:
                if f.info.num_rows == 0:
                    continue
                raise FormatError(
                    f"{f.path}: no min/max statistics for 'id'; pass individuals=[...] to to_dense"
                )
            lows.append(int(rng[0]))
            highs.append(int(rng[1]))
        ind = tuple(range(min(lows), max(highs) + 1)) if lows else ()
    else:
        ind = tuple(sorted({int(i) for i in individuals}))
    starts, lengths = [], []
    for f in files:
        rng = f.info.column_range("frame")
        if rng is None:
            if f.info.num_rows == 0:
                starts.append(int(lo or 0))
                lengths.append(0)
                continue
            raise FormatError(
                f"{f.path}: no min/max statistics for 'frame'; cannot size the frame axis"
            )
        a, b = int(rng[0]), int(rng[1]) + 1
        if lo is not None:
            a = max(a, lo)
        if hi is not None:
            b = min(b, hi)
        starts.append(a)
        lengths.append(max(0, b - a))
    return _DensePlan(
        keypoints,
        x_cols,
        y_cols,
        p_cols,
        has_centroid,
        tuple(c for c in extra if c not in KEY_COLUMNS),
        ind,
        tuple(starts),
        tuple(lengths),
    )


def chunk_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """Return ``[lo, hi)`` frame ranges of ``size`` covering ``n`` frames (one empty if none)."""
    return [(a, min(a + size, n)) for a in range(0, n, size)] or [(0, 0)]


def dense_spec(f: TrackFile, plan: _DensePlan, lo: int, hi: int) -> ParquetChunkSpec | None:
    """Return the read of the row groups of ``f`` that frames ``[lo, hi)`` need, or None."""
    if hi <= lo:
        return None
    wanted = [
        "frame",
        "id",
        *plan.x_cols,
        *plan.y_cols,
        *(c for c in plan.p_cols if c),
        *plan.extra,
    ]
    if plan.has_centroid:
        wanted += ["X", "Y"]
    wanted = list(dict.fromkeys(wanted))
    present = tuple(c for c in wanted if c in f.info.dtypes)
    keep = []
    for i, n in enumerate(f.info.row_group_rows):
        if n == 0:
            continue
        st = f.info.stats[i].get("frame")
        if (
            st is not None
            and st.min is not None
            and st.max is not None
            and (st.max < lo or st.min >= hi)
        ):
            continue
        keep.append(i)
    if not keep:
        return None
    return ParquetChunkSpec(
        f.info.path,
        f.info.size,
        f.info.mtime_ns,
        tuple(keep),
        tuple(wanted),
        tuple(f.info.dtypes.get(c, "float64") for c in wanted),
        sum(f.info.row_group_rows[i] for i in keep),
        present,
        etag=f.info.etag,
        storage_options=f.info.storage_options,
    )


@dataclass(frozen=True)
class DenseTask:
    """One frame chunk of one sequence of the dense view: what :func:`dense_chunk` reads."""

    spec: ParquetChunkSpec | None
    frame_lo: int
    n_frames: int
    n_valid: int
    plan: _DensePlan
    scale: float


def dense_chunk(task: DenseTask) -> dict[str, np.ndarray]:
    """Read a :class:`DenseTask`'s rows and scatter them into NaN-filled dense arrays."""
    plan = task.plan
    n_kp, n_ind = len(plan.keypoints), len(plan.individuals)
    out = {
        "position": np.full((task.n_frames, 2, n_kp, n_ind), np.nan),
        "confidence": np.full((task.n_frames, n_kp, n_ind), np.nan),
    }
    if plan.has_centroid:
        out["centroid"] = np.full((task.n_frames, 2, n_ind), np.nan)
    for c in plan.extra:
        out[c] = np.full((task.n_frames, n_ind), np.nan)
    spec = task.spec
    if spec is None or task.n_valid == 0 or n_ind == 0:
        return out
    table = read_table(spec, list(spec.present))
    frames = table.column("frame").to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    ids = table.column("id").to_numpy(zero_copy_only=False)
    rel = frames - task.frame_lo
    ind = np.asarray(plan.individuals, dtype=np.int64)
    slot = np.searchsorted(ind, ids)
    slot_ok = slot < n_ind
    slot_ok[slot_ok] = ind[slot[slot_ok]] == ids[slot_ok]
    keep = (rel >= 0) & (rel < task.n_valid) & slot_ok
    rel, slot = rel[keep], slot[keep]

    def col(name: str | None) -> np.ndarray | None:
        if name is None or name not in spec.present:
            return None
        return np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)[keep]

    for k, (xc, yc, pc) in enumerate(zip(plan.x_cols, plan.y_cols, plan.p_cols, strict=True)):
        for axis, name in ((0, xc), (1, yc)):
            values = col(name)
            if values is not None:
                out["position"][rel, axis, k, slot] = values * task.scale
        conf = col(pc)
        if conf is not None:
            out["confidence"][rel, k, slot] = conf
    if plan.has_centroid:
        for axis, name in ((0, "X"), (1, "Y")):
            values = col(name)
            if values is not None:
                out["centroid"][rel, axis, slot] = values * task.scale
    for c in plan.extra:
        values = col(c)
        if values is not None:
            out[c][rel, slot] = values * (task.scale if POSITION_RE.match(c) else 1.0)
    return out


def pick_dense(chunk: dict[str, np.ndarray], var: str, stacked: bool) -> np.ndarray:
    """Take ``var`` out of a :func:`dense_chunk` result (with a sequence axis if stacked)."""
    values = chunk[var]
    return values[np.newaxis] if stacked else values
