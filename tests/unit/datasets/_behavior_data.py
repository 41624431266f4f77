"""Generated mosaic-layout datasets with values known by construction.

Every position is ``value(s, frame, id, k, axis)``: sequence number s, frame, individual,
keypoint k (-1 for the centroid X/Y), axis 0 for x and 1 for y. Files are written with
pyarrow and the csv module directly, independently of neurocube's writers.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "mosaic"
SAMPLE_GROUP = "calms21_task1_train"
SAMPLE_SEQUENCE = "task1__train__mouse001_task1_annotator1"

TRACKS_COLUMNS = [
    "abs_path", "run_id", "started_at", "finished_at", "group", "sequence", "producer",
    "std_format", "n_rows", "n_keypoints", "frame_min", "frame_max",
]  # fmt: skip
LABEL_COLUMNS = [
    "abs_path", "run_id", "started_at", "finished_at", "group", "sequence", "label_kind",
    "label_format", "n_frames", "label_ids", "label_names",
]  # fmt: skip


def value(s: int, frame, ident, k, axis):
    return s * 1_000_000.0 + np.asarray(frame) * 100.0 + np.asarray(ident) * 10.0 + k + axis * 0.5


def key(group: str, sequence: str) -> str:
    return (
        quote(sequence, safe="")
        if not group
        else f"{quote(group, safe='')}__{quote(sequence, safe='')}"
    )


@dataclass
class SeqSpec:
    group: str
    sequence: str
    n_frames: int = 40
    ids: tuple[int, ...] = (0, 1)
    first_frame: int = 0
    missing_frames: tuple[int, ...] = ()
    nan_frames: tuple[int, ...] = ()  # rows kept, positions NaN (for id 0)
    std_format: str = "mosaic_v1"


@dataclass
class Generated:
    root: Path
    seqs: list[SeqSpec]
    files: dict[tuple[str, str], Path] = field(default_factory=dict)
    n_kp: int = 3


def write_manifest(root: Path, fps: float | None = 30.0, extra: str = "") -> None:
    root.mkdir(parents=True, exist_ok=True)
    meta = f"meta:\n  fps_default: {fps}\n" if fps is not None else ""
    (root / "dataset.yaml").write_text(
        "manifest_version: 3\nname: generated\nversion: 0.1.0\nroots:\n  tracks: tracks\n"
        "  labels: labels\n  tracks_raw: tracks_raw\n" + meta + extra
    )


def table_for(s_index: int, spec: SeqSpec, n_kp: int, confidence: bool = True) -> pa.Table:
    frames = [
        f
        for f in range(spec.first_frame, spec.first_frame + spec.n_frames)
        if f not in spec.missing_frames
    ]
    fr = np.repeat(np.asarray(frames, dtype=np.int64), len(spec.ids))
    ids = np.tile(np.asarray(spec.ids, dtype=np.int64), len(frames))
    cols: dict[str, object] = {
        "frame": fr,
        "time": fr / 30.0,
        "id": ids,
        "group": [spec.group] * len(fr),
        "sequence": [spec.sequence] * len(fr),
        "X": value(s_index, fr, ids, -1, 0),
        "Y": value(s_index, fr, ids, -1, 1),
    }
    for k in range(n_kp):
        cols[f"poseX{k}"] = value(s_index, fr, ids, k, 0)
        cols[f"poseY{k}"] = value(s_index, fr, ids, k, 1)
        if confidence:
            cols[f"poseP{k}"] = np.full(fr.shape, 0.5 + k / 100)
    table = pa.table(cols)
    if spec.nan_frames:
        bad = np.isin(fr, spec.nan_frames) & (ids == 0)
        arrays = []
        for name in table.column_names:
            col = table.column(name).to_numpy(zero_copy_only=False)
            if name.startswith(("poseX", "poseY", "X", "Y")):
                col = np.where(bad, np.nan, col)
            arrays.append(pa.array(col))
        table = pa.table(dict(zip(table.column_names, arrays, strict=True)))
    return table


def write_index(path: Path, columns: list[str], rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        for row in rows:
            w.writerow({c: row.get(c, "") for c in columns})


def make_dataset(
    root: Path,
    seqs: list[SeqSpec],
    *,
    n_kp: int = 3,
    row_group_size: int = 20,
    layout: str = "run",
    run_id: str = "convert-x.1-abc",
    fps: float | None = 30.0,
    labels: bool = True,
) -> Generated:
    write_manifest(root, fps)
    gen = Generated(root, seqs, n_kp=n_kp)
    rows = []
    label_rows = []
    for s, spec in enumerate(seqs):
        table = table_for(s, spec, n_kp)
        stem = key(spec.group, spec.sequence)
        rel = f"tracks/{run_id}/{stem}.parquet" if layout == "run" else f"tracks/{stem}.parquet"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, row_group_size=row_group_size)
        gen.files[(spec.group, spec.sequence)] = path
        frames = table.column("frame").to_numpy()
        rows.append(
            {
                "abs_path": rel,
                "run_id": run_id if layout == "run" else "",
                "started_at": "2026-01-01T00:00:00+00:00" if layout == "run" else "",
                "group": spec.group,
                "sequence": spec.sequence,
                "std_format": "" if spec.std_format == "trex_v1" else spec.std_format,
                "n_rows": str(table.num_rows),
                "n_keypoints": str(n_kp),
                "frame_min": str(frames.min()),
                "frame_max": str(frames.max()),
            }
        )
        if labels:
            lrel = f"labels/behavior/lab-run/{stem}.npz"
            lpath = root / lrel
            lpath.parent.mkdir(parents=True, exist_ok=True)
            ev_frames = np.arange(
                spec.first_frame, spec.first_frame + spec.n_frames, 3, dtype=np.int32
            )
            ev_labels = (ev_frames // 3 % 3).astype(np.int32)
            pairs = np.stack(
                [np.full(ev_frames.size, spec.ids[-1]), np.full(ev_frames.size, -1)], 1
            )
            pairs[::4] = -1  # every 4th event is a scene event
            np.savez(
                lpath,
                frames=ev_frames,
                labels=ev_labels,
                individual_ids=pairs.astype(np.int32),
                label_ids=np.array([0, 1, 2]),
                label_names=np.array(["rest", "swim", "turn"], dtype=object),
                group=np.array(spec.group),
                sequence=np.array(spec.sequence),
                label_format=np.array("individual_pair_v1"),
            )
            label_rows.append(
                {
                    "abs_path": lrel,
                    "run_id": "lab-run",
                    "group": spec.group,
                    "sequence": spec.sequence,
                    "label_kind": "behavior",
                    "label_format": "individual_pair_v1",
                    "n_frames": str(ev_frames.size),
                    "label_ids": "0,1,2",
                    "label_names": "rest,swim,turn",
                }
            )
    write_index(root / "tracks" / "index.csv", TRACKS_COLUMNS, rows)
    if labels:
        write_index(root / "labels" / "behavior" / "index.csv", LABEL_COLUMNS, label_rows)
    return gen


def hierarchical(n_fish: int = 2, n_speed: int = 2, n_frames: int = 40) -> list[SeqSpec]:
    return [
        SeqSpec(f"fish{f:02d}", f"speed{s}__loop1", n_frames=n_frames)
        for f in range(1, n_fish + 1)
        for s in range(1, n_speed + 1)
    ]


def copy_sample(dest: Path) -> Path:
    shutil.copytree(SAMPLE, dest)
    for p in dest.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dest
