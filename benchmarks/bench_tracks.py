"""Benchmark: behaviour tracks (mosaic layout) through neurocube vs pandas / pyarrow.

Generates a dataset of S sequences x F frames x 4 individuals x 7 keypoints
(mosaic_v1 long form: frame, time, id, group, sequence, X, Y, poseX/Y/P 0..6),
written with pyarrow in row groups of ``--row-group-frames`` frames, then times
in the same run, each case in its own subprocess (median of N repeats after
one warm-up; peak RSS of that subprocess):

- open: ``open_behavior`` + ``tracks()`` graph build (manifest, index, 200
  footers) vs pyarrow reading the same footers;
- two columns of all sequences: neurocube vs ``pyarrow.parquet.read_table``
  (list of files, threads) vs ``pandas.read_parquet`` per file + concat;
- one sequence's frame range: neurocube (exact filter, row-group pushdown) vs
  pyarrow / pandas with ``filters=``;
- dense view of 10 sequences: ``to_dense`` vs pandas read + numpy scatter;
- full read (every numeric column of all sequences) vs pyarrow / pandas.

``neurocube`` rows include opening the dataset and building the graph (footers
of every selected file); ``neurocube_prebuilt`` rows time ``compute()`` of a
Dataset built beforehand. The timed repeats run in one process after a warm-up,
so neurocube's per-process caches (parsed manifest, index and footers, keyed by
file version) are warm, as in a notebook that reopens a dataset;
``neurocube_cold`` rows empty those caches before every call (a first open in a
process whose modules are imported). ``first_s`` is the warm-up call, the first
in a fresh process (lazy imports included). A frame range this small is read
when ``tracks()`` is called (numpy-backed).
The last column is neurocube's speed relative to that library (time of the
library / time of neurocube; >= 1 means neurocube is faster). The string
coordinates ``group``/``sequence`` are dropped before computing (pyarrow/pandas
are not asked for them either).

The full size of the issue (200 x 50,000 frames) is ~8 GB of float64; on the
shared 2-core machine the default is scaled down to 200 x 2,000 frames
(~330 MB in memory). Pass ``--frames 50000`` for the full size.

Usage: ``python benchmarks/bench_tracks.py [--sequences 200] [--frames 2000] [--repeats 5]
[--cases frame_range,open]`` (``--cases`` runs some cases only, e.g. as a quick check; the
JSON is written only when every case ran).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_IND = 4
N_KP = 7
HERE = Path(__file__).resolve().parent


def generate(root: Path, n_seq: int, n_frames: int, rg_frames: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    marker = root / f".complete-{n_seq}-{n_frames}-{rg_frames}"
    if marker.exists():
        return
    rng = np.random.default_rng(0)
    (root / "tracks" / "run1").mkdir(parents=True, exist_ok=True)
    (root / "dataset.yaml").write_text(
        "manifest_version: 3\nname: bench\nroots:\n  tracks: tracks\nmeta:\n  fps_default: 50\n"
    )
    rows = ["abs_path,run_id,group,sequence,std_format"]
    frame = np.repeat(np.arange(n_frames, dtype=np.int64), N_IND)
    ident = np.tile(np.arange(N_IND, dtype=np.int64), n_frames)
    for s in range(n_seq):
        group, sequence = f"fish{s // 10:02d}", f"speed{s % 5}__loop{s % 10}"
        cols: dict[str, object] = {
            "frame": frame, "time": frame / 50.0, "id": ident,
            "group": pa.array([group] * frame.size).dictionary_encode(),
            "sequence": pa.array([sequence] * frame.size).dictionary_encode(),
            "X": rng.random(frame.size) * 1000, "Y": rng.random(frame.size) * 1000,
        }  # fmt: skip
        for k in range(N_KP):
            cols[f"poseX{k}"] = rng.random(frame.size) * 1000
            cols[f"poseY{k}"] = rng.random(frame.size) * 1000
            cols[f"poseP{k}"] = rng.random(frame.size)
        rel = f"tracks/run1/{group}__{sequence}.parquet"
        pq.write_table(pa.table(cols), root / rel, row_group_size=rg_frames * N_IND)
        rows.append(f"{rel},run1,{group},{sequence},mosaic_v1")
    (root / "tracks" / "index.csv").write_text("\n".join(rows) + "\n")
    marker.write_text("ok")


# ----------------------------------------------------------------------------- cases
# Each case returns a callable doing the work once and returning something to check.


def _files(root: Path) -> list[str]:
    lines = (root / "tracks" / "index.csv").read_text().splitlines()[1:]
    return [str(root / line.split(",")[0]) for line in lines]


def case(name: str, lib: str, root: Path):
    import pandas as pd
    import pyarrow.parquet as pq

    import neurocube

    files = _files(root)
    two = ["poseX0", "poseY0"]
    numeric = ["frame", "time", "id", "X", "Y"] + [
        f"pose{a}{k}" for k in range(N_KP) for a in "XYP"
    ]  # fmt: skip
    seq_file = files[7]
    meta = pq.read_metadata(seq_file)
    n_frames = meta.num_rows // N_IND
    lo, hi = int(n_frames * 0.3), int(n_frames * 0.55)
    ten = files[:10]

    if name == "open":
        if lib == "neurocube":
            return lambda: neurocube.open_behavior(root).tracks(columns=two)
        return lambda: [pq.read_metadata(f) for f in files]
    if name in ("two_columns", "full") and lib == "neurocube_prebuilt":
        cols = two if name == "two_columns" else numeric
        built = neurocube.open_behavior(root).tracks(columns=cols, with_keys=name == "full")
        built = built.drop_vars(["group", "sequence"])
        return built.compute
    if name == "two_columns":
        if lib == "neurocube":

            def run():
                ds = neurocube.open_behavior(root).tracks(columns=two, with_keys=False)
                return ds.drop_vars(["group", "sequence"]).compute()

            return run
        if lib == "pyarrow":

            def run():
                t = pq.read_table(files, columns=two)
                return {c: t.column(c).to_numpy() for c in two}

            return run
        return lambda: pd.concat([pd.read_parquet(f, columns=two) for f in files])
    if name == "frame_range":
        filt = [("frame", ">=", lo), ("frame", "<", hi)]
        if lib == "neurocube":

            def run():
                ds = neurocube.open_behavior(root)
                g, s = Path(seq_file).stem.split("__", 1)
                return ds.tracks(groups=g, sequences=s, start_frame=lo, end_frame=hi).compute()

            return run
        if lib == "pyarrow":
            return lambda: pq.read_table(seq_file, filters=filt)
        return lambda: pd.read_parquet(seq_file, filters=filt)
    if name == "dense10":
        if lib == "neurocube":

            def run():
                ds = neurocube.open_behavior(root)
                pairs = [tuple(Path(f).stem.split("__", 1)) for f in ten]
                return ds.to_dense(pairs=pairs, frame_chunk=max(n_frames // 2, 1)).compute()

            return run

        def run_pandas():
            out = np.full((len(ten), n_frames, 2, N_KP, N_IND), np.nan)
            for s, f in enumerate(ten):
                df = pd.read_parquet(f)
                fr, ids = df["frame"].to_numpy(), df["id"].to_numpy()
                for k in range(N_KP):
                    out[s, fr, 0, k, ids] = df[f"poseX{k}"].to_numpy()
                    out[s, fr, 1, k, ids] = df[f"poseY{k}"].to_numpy()
            return out

        return run_pandas
    if name == "full":
        if lib == "neurocube":

            def run():
                ds = neurocube.open_behavior(root).tracks(columns=numeric)
                return ds.drop_vars(["group", "sequence"]).compute()

            return run
        if lib == "pyarrow":

            def run():
                t = pq.read_table(files, columns=numeric)
                return {c: t.column(c).to_numpy() for c in numeric}

            return run
        return lambda: pd.concat([pd.read_parquet(f, columns=numeric) for f in files])
    raise ValueError(name)


def _forget_caches() -> None:
    """Empty neurocube's per-process caches of manifests, indexes and parquet footers."""
    from neurocube.catalog import behavior as catalog_behavior
    from neurocube.io.behavior import manifest as io_manifest
    from neurocube.sources import parquet_meta

    parquet_meta._INFOS.clear()
    parquet_meta._FOOTERS.clear()
    catalog_behavior._MEMO.clear()
    io_manifest._MANIFESTS.clear()


def worker(name: str, lib: str, root: Path, repeats: int) -> None:
    import resource

    import dask

    dask.config.set(scheduler="threads")
    cold = lib == "neurocube_cold"
    fn = case(name, "neurocube" if cold else lib, root)
    t0 = time.perf_counter()
    fn()  # warm-up (page cache, imports, per-process caches)
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        if cold:
            _forget_caches()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"median_s": statistics.median(times), "times_s": times, "first_s": first_s,
              "peak_rss_mb": rss_mb}  # fmt: skip
    print(json.dumps(result))


CASES = {
    "open": ["neurocube", "neurocube_cold", "pyarrow"],
    "two_columns": ["neurocube", "neurocube_prebuilt", "pyarrow", "pandas"],
    "frame_range": ["neurocube", "neurocube_cold", "pyarrow", "pandas"],
    "dense10": ["neurocube", "pandas"],
    "full": ["neurocube", "neurocube_prebuilt", "pyarrow", "pandas"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=200)
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--row-group-frames", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "LIB"))
    parser.add_argument("--cases", default=",".join(CASES),
                        help="comma-separated cases to run (default: all)")
    args = parser.parse_args()
    cases = {name: CASES[name] for name in args.cases.split(",") if name}
    root = args.data or Path(tempfile.gettempdir()) / "neurocube-bench-tracks"
    if args.worker:
        worker(args.worker[0], args.worker[1], root, args.repeats)
        return
    t0 = time.perf_counter()
    generate(root, args.sequences, args.frames, args.row_group_frames)
    gen_s = time.perf_counter() - t0
    size_mb = sum(p.stat().st_size for p in root.rglob("*.parquet")) / 2**20
    results: dict[str, dict[str, dict[str, object]]] = {}
    for name, libs in cases.items():
        results[name] = {}
        for lib in libs:
            cmd = [sys.executable, __file__, "--worker", name, lib, "--data", str(root),
                   "--repeats", str(args.repeats)]  # fmt: skip
            out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                 env={**os.environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip
            results[name][lib] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\n{args.sequences} sequences x {args.frames} frames x {N_IND} individuals x {N_KP} "
          f"keypoints; {size_mb:.0f} MB of parquet; generated in {gen_s:.1f} s")  # fmt: skip
    print(f"{'case':<13}{'library':<20}{'median s':>10}{'peak RSS MB':>13}{'neurocube speed':>17}")
    for name, by_lib in results.items():
        ref = by_lib["neurocube"]["median_s"]
        for lib, r in by_lib.items():
            ratio = r["median_s"] / ref  # neurocube speed relative to lib: >1 = faster
            print(f"{name:<13}{lib:<20}{r['median_s']:>10.4f}{r['peak_rss_mb']:>13.0f}"
                  f"{'' if lib.startswith('neurocube') else f'{ratio:>16.2f}x'}")
    ratios = {
        name: {
            f"neurocube_speed_vs_{lib}": by_lib[lib]["median_s"] / by_lib["neurocube"]["median_s"]
            for lib in by_lib if not lib.startswith("neurocube")
        }
        for name, by_lib in results.items()
    }  # fmt: skip
    payload = {
        "benchmark": "tracks",
        "config": {"sequences": args.sequences, "frames": args.frames, "individuals": N_IND,
                   "keypoints": N_KP, "row_group_frames": args.row_group_frames,
                   "repeats": args.repeats, "parquet_mb": round(size_mb, 1),
                   "cpu_count": os.cpu_count(),
                   "note": "scaled down from 200 x 50,000 frames for a shared 2-core machine"},
        "results": results,
        "ratios": ratios,
        "target": "full read >= 0.9 x pyarrow (neurocube_speed_vs_pyarrow >= 0.9); one "
                  "sequence's frame range >= 0.5 x pyarrow (issue 13 item 6)",
    }  # fmt: skip
    if set(cases) != set(CASES):
        print("\nsome cases only: results/tracks.json left as it was")
        return
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "tracks.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {out_dir / 'tracks.json'}")


if __name__ == "__main__":
    main()
