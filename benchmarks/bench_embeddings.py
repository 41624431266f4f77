"""Benchmark: coco-pipe embedding derivatives through neurocube vs numpy.load / pyarrow.

Generates a tree of N recordings (W windows x D features, float32, written with
np.savez_compressed like coco-pipe), then measures in the SAME run, each in a fresh
subprocess (so peak RSS is per measurement), median of R repeats:

- neurocube open (catalog + graph) time;
- full epoch load: neurocube (open + compute) vs an eager loop of numpy.load over all
  files (what coco-pipe's loader does, minus its extra validation pass);
- recording (pooled vector) load, same comparison;
- subject aggregation (mean of epoch rows per subject): neurocube lazy mean vs
  numpy loop + pandas groupby;
- the combined epoch parquet: open_combined_table(...).compute vs pyarrow read_table
  + column stacking.

Ratios are plain-library time / neurocube time (> 1: neurocube faster).

Usage: python benchmarks/bench_embeddings.py [--recordings 5000] [--windows 30]
       [--features 512] [--repeats 5] [--data benchmarks/data/embeddings]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- data


def generate(root: Path, n_recordings: int, n_windows: int, n_features: int) -> None:
    marker = root / ".complete.json"
    spec = {"recordings": n_recordings, "windows": n_windows, "features": n_features}
    table = root / "combined" / "bench_EO_epoch_embeddings.parquet"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        if not table.exists():
            import neurocube

            neurocube.write_combined_tables(root, "bench", ["EO"], ["epoch"])
        return
    import shutil

    if root.exists():
        shutil.rmtree(root)
    rng = np.random.default_rng(0)
    records = []
    n_subjects = max(1, n_recordings // 10)
    for i in range(n_recordings):
        subject = f"{i % n_subjects:04d}"
        session = f"{i // n_subjects:02d}"
        folder = root / f"sub-{subject}" / f"ses-{session}" / "eeg"
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"sub-{subject}_ses-{session}_task-rest_run-01_desc-benchEOMean"
        path = folder / f"{stem}_embedding.npz"
        windows = rng.standard_normal((n_windows, n_features), dtype=np.float32)
        np.savez_compressed(
            path,
            window_embeddings=windows,
            recording_embedding=windows.mean(axis=0),
            window_start=np.arange(n_windows, dtype=np.int64) * 2500,
            window_stop=np.arange(n_windows, dtype=np.int64) * 2500 + 2500,
            window_index=np.arange(n_windows, dtype=np.int64),
        )
        metadata = {
            "model_key": "bench",
            "subject": subject,
            "session": session,
            "run": "01",
            "task": "rest",
            "condition": "EO",
            "recording_id": f"subject-{subject}_session-{session}_run-01",
            "embedding_shape": [n_windows, n_features],
            "arrays": {"window_embeddings": ["window", "embedding_feature"]},
        }
        path.with_suffix(".json").write_text(json.dumps(metadata, indent=2, sort_keys=True))
        records.append(
            {**metadata, "artifact_path": str(path.relative_to(root)), "status": "success"}
        )
    (root / "run_manifest.json").write_text(json.dumps({"records": records}))
    import neurocube

    neurocube.write_combined_tables(root, "bench", ["EO"], ["epoch"])
    marker.write_text(json.dumps(spec))


# --------------------------------------------------------------------------- measurements (child)


def _paths(root: Path) -> list[Path]:
    return sorted(root.rglob("*_embedding.npz"))


def measure(method: str, root: Path) -> dict[str, float]:
    import dask
    import dask.array
    import pandas as pd
    import pyarrow.parquet as pq
    import xarray  # noqa: F401

    import neurocube
    import neurocube.datasets.embeddings

    dask.config.set(scheduler="threads")
    # one-time start-up of the scheduler's thread pool, as in any session that used dask before
    dask.array.ones(10, chunks=5).sum().compute()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    if method == "numpy_epoch":
        rows = []
        for path in _paths(root):
            with np.load(path, allow_pickle=False) as payload:
                rows.append(payload["window_embeddings"])
        values = np.concatenate(rows)
    elif method == "numpy_json_epoch":
        # what it takes to get the same labelled rows by hand: sidecar + arrays per file
        rows, labels = [], []
        for path in _paths(root):
            metadata = json.loads(path.with_suffix(".json").read_text())
            with np.load(path, allow_pickle=False) as payload:
                block = payload["window_embeddings"]
                window_index = payload["window_index"]
            rows.append(block)
            labels += [(metadata["recording_id"], int(w)) for w in window_index]
        values = np.concatenate(rows)
    elif method == "numpy_recording":
        rows = []
        for path in _paths(root):
            with np.load(path, allow_pickle=False) as payload:
                rows.append(payload["recording_embedding"])
        values = np.stack(rows)
    elif method == "numpy_subject":
        rows, subjects = [], []
        for path in _paths(root):
            subject = json.loads(path.with_suffix(".json").read_text())["subject"]
            with np.load(path, allow_pickle=False) as payload:
                block = payload["window_embeddings"]
            rows.append(block)
            subjects += [subject] * len(block)
        frame = pd.DataFrame(np.concatenate(rows))
        values = frame.groupby(np.asarray(subjects), sort=False).mean().to_numpy()
    elif method in ("neurocube_epoch", "neurocube_recording", "neurocube_subject"):
        level = method.split("_", 1)[1]
        if level == "subject":
            ds = neurocube.open_embeddings(root, "epoch", "bench", aggregate_by="subject")
        else:
            ds = neurocube.open_embeddings(root, level, "bench")
        out["open_s"] = time.perf_counter() - t0
        values = ds.embedding.values
    elif method == "pyarrow_table":
        table = pq.read_table(root / "combined" / "bench_EO_epoch_embeddings.parquet")
        features = [c for c in table.column_names if c.startswith("embedding_")]
        values = np.empty((table.num_rows, len(features)), np.float32)
        for j, name in enumerate(features):
            values[:, j] = table.column(name).to_numpy()
        ids = {c: table.column(c).to_numpy() for c in table.column_names if c not in features}
        assert ids
    elif method == "neurocube_table":
        ds = neurocube.open_combined_table(root, "bench", "EO", "epoch")
        out["open_s"] = time.perf_counter() - t0
        values = ds.embedding.values
    else:
        raise SystemExit(f"unknown method {method}")
    out["total_s"] = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["peak_rss_mb"] = peak / 1024
    out["peak_above_imports_mb"] = (peak - baseline) / 1024
    out["output_mb"] = values.nbytes / 2**20
    out["checksum"] = float(np.asarray(values, dtype=np.float64).sum())
    return out


# --------------------------------------------------------------------------- driver


def run_child(method: str, root: Path) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, __file__, "--child", method, "--data", str(root)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recordings", type=int, default=5000)
    parser.add_argument("--windows", type=int, default=30)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", type=Path, default=HERE / "data" / "embeddings")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.data)))
        return

    t0 = time.perf_counter()
    generate(args.data, args.recordings, args.windows, args.features)
    generate_s = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in _paths(args.data))
    methods = [
        "numpy_epoch",
        "numpy_json_epoch",
        "neurocube_epoch",
        "numpy_recording",
        "neurocube_recording",
        "numpy_subject",
        "neurocube_subject",
        "pyarrow_table",
        "neurocube_table",
    ]
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    for _ in range(args.repeats):  # interleaved, so machine noise hits every method alike
        for method in methods:
            runs[method].append(run_child(method, args.data))
    summary: dict[str, dict[str, float]] = {}
    for method, results in runs.items():
        summary[method] = {
            key: statistics.median(r[key] for r in results)
            for key in results[0]
            if key != "checksum"
        }
        summary[method]["checksum"] = results[0]["checksum"]
    pairs = [
        ("epoch", "numpy_epoch", "neurocube_epoch"),
        ("epoch+sidecars", "numpy_json_epoch", "neurocube_epoch"),
        ("recording", "numpy_recording", "neurocube_recording"),
        ("subject", "numpy_subject", "neurocube_subject"),
        ("parquet", "pyarrow_table", "neurocube_table"),
    ]
    ratios = {}
    for label, plain, ours in pairs:
        ratio = summary[plain]["total_s"] / summary[ours]["total_s"]
        ratios[label] = ratio
        same = np.isclose(summary[plain]["checksum"], summary[ours]["checksum"], rtol=1e-4)
        summary[ours]["checksum_matches_plain"] = bool(same)

    print(
        f"\n{args.recordings} recordings x {args.windows} windows x {args.features} features "
        f"({size / 2**20:.0f} MiB of NPZ on disk); median of {args.repeats}; "
        f"{os.cpu_count()} CPUs\n"
    )
    header = f"{'method':<22}{'open s':>9}{'total s':>9}{'peak RSS MB':>13}{'above imports':>15}"
    print(header)
    print("-" * len(header))
    for method in methods:
        s = summary[method]
        open_s = f"{s['open_s']:.2f}" if "open_s" in s else "-"
        print(
            f"{method:<22}{open_s:>9}{s['total_s']:>9.2f}{s['peak_rss_mb']:>13.0f}"
            f"{s['peak_above_imports_mb']:>15.0f}"
        )
    print()
    for label, _plain, ours in pairs:
        print(
            f"{label:<15} plain/neurocube time ratio = {ratios[label]:.2f} "
            f"(values agree: {summary[ours]['checksum_matches_plain']})"
        )
    result = {
        "benchmark": "embeddings",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "data": {
            "recordings": args.recordings,
            "windows": args.windows,
            "features": args.features,
            "npz_bytes": size,
            "generate_s": generate_s,
        },
        "repeats": args.repeats,
        "median": summary,
        "ratio_plain_over_neurocube": ratios,
        "target": "NPZ/parquet reads >= 0.9 x the plain library (ratio >= 0.9)",
    }
    out = HERE / "results" / "embeddings.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
