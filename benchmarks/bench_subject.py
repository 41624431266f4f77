"""Benchmark: masked multi-session betas with neurocube vs the reference library's two approaches.

The bucket is generated (``neurocube.synthetic.bucket.make_bucket``): one subject, 2 sessions of
81x96x81 x N trials (float32 ``.nii.gz``, zeros outside an ellipsoid brain; default N=100, so
about 250 MB uncompressed per session, ~0.5 GB in all). The query is
``betas(["ses-01", "ses-02"], roi="face", nc_threshold=10)``.

Contenders, each run in its own subprocess (wall time of the work only; peak RSS of the process
above its RSS after imports), median of ``--repeats`` runs, all in the same run:

- ``neurocube (first read)``: neurocube.load(Subject.betas(...)) with an empty cache folder, so the
  seek index is built during the read;
- ``neurocube (indexed)``: the same with the index present (parallel inflate through it);
- ``bulk``: the reference library's default (nibabel loads the whole 4-D array, then masks);
- ``streaming``: the reference library's low-memory mode, re-implemented from FORMATS.md: one
  sequential gzip stream per session, volume by volume, the combined mask applied inline.

Also measured: ``betas.groupby("image_name").mean()`` computed lazily against ``neurocube.load``
plus a numpy group-by (sort, ``np.add.reduceat``), whole brain, both sessions (issue 13, item 4:
lazy <= 1.3 x), with the graph's task count and smallest trial chunk, and the shuffled form
``betas.groupby("image_name").shuffle_to_chunks().groupby("image_name").mean()`` (each image's
trials in one chunk, read straight from the file), all three in rounds, with peak RSS.

Run: ``python benchmarks/bench_subject.py [--trials 100] [--repeats 5] [--skip-groupby]``. Writes
``benchmarks/results/subject.json``. The machine is shared (2 noisy cores): compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GRID = (81, 96, 81)

_PRELUDE = """
import json, os, resource, sys, time
import numpy as np
import dask.array, nibabel, pandas, xarray  # imported before the baseline by every contender
root = sys.argv[1]
def rss_now():
    # The baseline also resets the kernel's peak-RSS mark (VmHWM): ru_maxrss would count the
    # driver process this one was started from (exec keeps the old memory's high-water mark).
    with open('/proc/self/clear_refs', 'w') as fh:
        fh.write('5')
    with open('/proc/self/statm') as fh:
        return int(fh.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
def peak_rss():
    with open('/proc/self/status') as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith('VmHWM:'))
"""

NEUROCUBE = _PRELUDE + textwrap.dedent(
    """
    import neurocube
    base = rss_now()
    t0 = time.perf_counter()
    sub = neurocube.open_subject(root, "sub-01")
    ds = sub.betas(["ses-01", "ses-02"], roi="face", nc_threshold=10)
    import dask
    with dask.config.set(scheduler="threads", num_workers=2):
        values = neurocube.load(ds.betas, progress=False).values  # chunks stored into place
    wall = time.perf_counter() - t0
    peak = peak_rss()
    print(json.dumps({"wall": wall, "peak": peak - base, "shape": list(values.shape),
                      "checksum": float(np.nansum(values, dtype=np.float64))}))
    """
)

# The selection (brain & ROI union & NC >= 10 in both sessions) is computed with nibabel in the
# plain scripts too, so they do the same work as neurocube.
_SELECTION = textwrap.dedent(
    """
    import glob, gzip
    import nibabel as nib
    def vol(p):
        return np.asarray(nib.load(p).get_fdata(dtype=np.float64))
    def inside(v):
        return (v != 0) & ~np.isnan(v)
    anat_dir = f"{root}/derivatives/anatomical/sub-01/ses-PrismaAnat/anat"
    anat = glob.glob(anat_dir + "/*res-1pt8_desc-brain_mask.nii.gz")[0]
    sel = inside(vol(anat))
    roi = np.zeros_like(sel)
    for p in sorted(glob.glob(f"{root}/derivatives/rois/sub-01/face/*_mask.nii.gz")):
        roi |= inside(vol(p))
    sel &= roi
    sessions = ["ses-01", "ses-02"]
    func = {s: f"{root}/derivatives/glmsingle-tedana/sub-01/{s}/func" for s in sessions}
    for s in sessions:
        nc = vol(glob.glob(func[s] + "/*desc-Noiseceiling_statmap.nii.gz")[0])
        with np.errstate(invalid="ignore"):
            sel &= nc >= 10
    betas = {s: glob.glob(func[s] + "/*SingletrialBetas_statmap.nii.gz")[0] for s in sessions}
    """
)

BULK = _PRELUDE + textwrap.dedent(
    """
    base = rss_now()
    t0 = time.perf_counter()
    """
) + _SELECTION + textwrap.dedent(
    """
    parts = []
    for s in sessions:
        data = np.asarray(nib.load(betas[s]).dataobj, dtype=np.float32)  # whole 4-D array
        parts.append(data[sel].T.copy())
        del data
    values = np.concatenate(parts)
    wall = time.perf_counter() - t0
    peak = peak_rss()
    print(json.dumps({"wall": wall, "peak": peak - base, "shape": list(values.shape),
                      "checksum": float(np.nansum(values, dtype=np.float64))}))
    """
)

STREAMING = _PRELUDE + textwrap.dedent(
    """
    base = rss_now()
    t0 = time.perf_counter()
    """
) + _SELECTION + textwrap.dedent(
    """
    i, j, k = np.nonzero(sel)
    X, Y, Z = sel.shape
    fortran = i + X * (j + Y * k)
    parts = []
    for s in sessions:
        image = nib.load(betas[s])  # header only; img.header is a copy with offset reset
        n = int(image.shape[3])
        dtype = image.get_data_dtype()
        offset = int(image.dataobj.offset)
        vol_bytes = X * Y * Z * dtype.itemsize
        out = np.empty((n, fortran.size), dtype=np.float32)
        with gzip.open(betas[s], "rb") as fh:  # one sequential stream, one core
            fh.read(offset)
            for t in range(n):
                raw = np.frombuffer(fh.read(vol_bytes), dtype=dtype)
                out[t] = raw[fortran]
        parts.append(out)
    values = np.concatenate(parts)
    wall = time.perf_counter() - t0
    peak = peak_rss()
    print(json.dumps({"wall": wall, "peak": peak - base, "shape": list(values.shape),
                      "checksum": float(np.nansum(values, dtype=np.float64))}))
    """
)


# Issue 13, item 4: a lazy group-by over trials against load + a numpy group-by, whole brain,
# both sessions, the index present. Target: lazy <= 1.3 x load + numpy.
_GROUPBY_OPEN = textwrap.dedent(
    """
    import dask, neurocube
    base = rss_now()
    t0 = time.perf_counter()
    sub = neurocube.open_subject(root, "sub-01")
    betas = sub.betas(["ses-01", "ses-02"]).betas
    """
)

GROUPBY_LAZY = _PRELUDE + _GROUPBY_OPEN + textwrap.dedent(
    """
    means = betas.groupby("image_name").mean()
    tasks = len(means.data.__dask_graph__())
    with dask.config.set(scheduler="threads", num_workers=2):
        values = means.values
    wall = time.perf_counter() - t0
    print(json.dumps({"wall": wall, "peak": peak_rss() - base, "shape": list(values.shape),
                      "tasks": tasks, "smallest_chunk": min(betas.data.chunks[0]),
                      "checksum": float(np.nansum(values, dtype=np.float64))}))
    """
)

# The form the docs recommend for a large selection: xarray sorts the trials so that each image's
# repeats share a chunk, each chunk reads just its volumes (neurocube's pushdown), and flox reduces
# chunk by chunk with no intermediate over all images.
GROUPBY_SHUFFLED = GROUPBY_LAZY.replace(
    'betas.groupby("image_name").mean()',
    'betas.groupby("image_name").shuffle_to_chunks().groupby("image_name").mean()',
)

GROUPBY_NUMPY = _PRELUDE + _GROUPBY_OPEN + textwrap.dedent(
    """
    with dask.config.set(scheduler="threads", num_workers=2):
        data = neurocube.load(betas, progress=False).values
    names, codes = np.unique(betas.image_name.values, return_inverse=True)
    order = np.argsort(codes, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(codes[order]) != 0])
    rows = data[order]
    finite = np.isfinite(rows)
    sums = np.add.reduceat(np.where(finite, rows, 0).astype(np.float64), starts, axis=0)
    counts = np.add.reduceat(finite, starts, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = (sums / counts).astype(np.float32)
    wall = time.perf_counter() - t0
    print(json.dumps({"wall": wall, "peak": peak_rss() - base, "shape": list(values.shape),
                      "checksum": float(np.nansum(values, dtype=np.float64))}))
    """
)


def groupby_measure(root: Path, env: dict[str, str], repeats: int) -> dict[str, object]:
    """Lazy ``groupby("image_name").mean()`` (plain and shuffled) vs load + numpy, medians."""
    walls: dict[str, list[float]] = {"lazy": [], "shuffled": [], "numpy": []}
    peaks: dict[str, list[float]] = {"lazy": [], "shuffled": [], "numpy": []}
    tasks, smallest = {}, {}
    scripts = {"lazy": GROUPBY_LAZY, "shuffled": GROUPBY_SHUFFLED, "numpy": GROUPBY_NUMPY}
    for _ in range(repeats):
        out = {name: run(script, root, env) for name, script in scripts.items()}  # one round
        b = out["numpy"]
        for name, a in out.items():
            if abs(a["checksum"] - b["checksum"]) > 1e-3 * max(1.0, abs(b["checksum"])):
                raise SystemExit(f"group-by results disagree: {name} {a['checksum']} vs "
                                 f"{b['checksum']}")
            walls[name].append(a["wall"])
            peaks[name].append(a["peak"])
            if "tasks" in a:
                tasks[name], smallest[name] = int(a["tasks"]), int(a["smallest_chunk"])
        print(f"  group-by: lazy {out['lazy']['wall']:.2f} s ({tasks['lazy']} tasks), shuffled "
              f"{out['shuffled']['wall']:.2f} s ({tasks['shuffled']} tasks), load + numpy "
              f"{b['wall']:.2f} s", flush=True)
    med = {name: statistics.median(w) for name, w in walls.items()}
    ratio = med["lazy"] / med["numpy"]
    shuffled = med["shuffled"] / med["numpy"]
    return {
        "lazy_wall_s_median": med["lazy"],
        "shuffled_wall_s_median": med["shuffled"],
        "load_numpy_wall_s_median": med["numpy"],
        "lazy_over_load_numpy": ratio,
        "shuffled_over_load_numpy": shuffled,
        "peak_rss_growth_mb_median": {n: statistics.median(p) / 1e6 for n, p in peaks.items()},
        "target": "<= 1.3",
        "met": ratio <= 1.3,
        "shuffled_met": shuffled <= 1.3,
        "tasks": tasks["lazy"],
        "tasks_shuffled": tasks["shuffled"],
        "smallest_trial_chunk": smallest["lazy"],
    }


def run(script: str, root: Path, env: dict[str, str]) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", script, str(root)], capture_output=True, text=True, env=env,
        check=False, timeout=900,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the generated bucket")
    parser.add_argument("--skip-groupby", action="store_true",
                        help="skip the lazy group-by measurement (issue 13, item 4)")
    args = parser.parse_args()

    from neurocube.synthetic.bucket import make_bucket

    work = Path(tempfile.mkdtemp(prefix="bench-subject-", dir=HERE / "data"
                                 if (HERE / "data").is_dir() else None))
    root = work / "bucket"
    t0 = time.perf_counter()
    make_bucket(root, subjects=1, sessions=2, trials=args.trials, grid=GRID, vary_grid=False,
                stimuli=False, surface_rois=False, full_resolution=False, freesurfer=False,
                nan_fraction=0.01, compresslevel=1, seed=1)
    generated = time.perf_counter() - t0
    glm = root / "derivatives/glmsingle-tedana/sub-01"
    betas = sorted(glm.glob("ses-*/func/*Betas_statmap.nii.gz"))
    compressed = sum(p.stat().st_size for p in betas)
    uncompressed = 2 * args.trials * GRID[0] * GRID[1] * GRID[2] * 4
    print(f"bucket: 2 sessions x {args.trials} trials on {GRID}; {uncompressed / 1e6:.0f} MB "
          f"uncompressed, {compressed / 1e6:.0f} MB gzip; generated in {generated:.1f} s")

    cache = work / "cache"
    env = dict(os.environ, NEUROCUBE_CACHE_DIR=str(cache), NEUROCUBE_PROGRESS="0")
    contenders = {
        "neurocube (first read)": NEUROCUBE,
        "neurocube (indexed)": NEUROCUBE,
        "bulk (nibabel 4-D, then mask)": BULK,
        "streaming (1 gzip stream/session)": STREAMING,
    }
    results: dict[str, dict[str, object]] = {}
    checksums = set()
    for name, script in contenders.items():
        walls, peaks = [], []
        for _ in range(args.repeats):
            if name == "neurocube (first read)":
                shutil.rmtree(cache, ignore_errors=True)
            elif name == "neurocube (indexed)" and not cache.exists():
                run(script, root, env)  # build the index once
            out = run(script, root, env)
            walls.append(out["wall"])
            peaks.append(out["peak"])
            checksums.add(round(out["checksum"], 1))
            print(f"  {name}: {out['wall']:.2f} s, checksum {out['checksum']:.1f}", flush=True)
            shape = out["shape"]
        results[name] = {
            "wall_s_median": statistics.median(walls),
            "wall_s_all": walls,
            "peak_rss_growth_mb_median": statistics.median(peaks) / 1e6,
            "shape": shape,
        }
    if len(checksums) != 1:
        raise SystemExit(f"contenders disagree on the result: checksums {checksums}")

    nc_first = results["neurocube (first read)"]
    nc_index = results["neurocube (indexed)"]
    ratios = {
        "bulk_time_over_neurocube_indexed": results["bulk (nibabel 4-D, then mask)"][
            "wall_s_median"] / nc_index["wall_s_median"],
        "streaming_time_over_neurocube_indexed": results["streaming (1 gzip stream/session)"][
            "wall_s_median"] / nc_index["wall_s_median"],
        "streaming_time_over_neurocube_first_read": results["streaming (1 gzip stream/session)"][
            "wall_s_median"] / nc_first["wall_s_median"],
        "bulk_peak_over_neurocube_peak": results["bulk (nibabel 4-D, then mask)"][
            "peak_rss_growth_mb_median"] / max(nc_index["peak_rss_growth_mb_median"], 1e-9),
    }
    out_mb = shape[0] * shape[1] * 4 / 1e6
    print(f"\nquery: betas([ses-01, ses-02], roi='face', nc_threshold=10) -> {shape} "
          f"({out_mb:.1f} MB); median of {args.repeats}\n")
    print(f"{'contender':<36}{'wall (s)':>10}{'peak RSS growth (MB)':>24}")
    for name, res in results.items():
        print(f"{name:<36}{res['wall_s_median']:>10.2f}{res['peak_rss_growth_mb_median']:>24.0f}")
    print()
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}")
    groupby = None
    if not args.skip_groupby:
        print("\nlazy group-by (whole brain, both sessions, index present):")
        groupby = groupby_measure(root, env, args.repeats)
        print(f"lazy_groupby_over_load_numpy: {groupby['lazy_over_load_numpy']:.2f} "
              f"(target <= 1.3: {'met' if groupby['met'] else 'NOT met'}); "
              f"{groupby['tasks']} tasks, smallest trial chunk {groupby['smallest_trial_chunk']}")
        print(f"shuffled_groupby_over_load_numpy: {groupby['shuffled_over_load_numpy']:.2f} "
              f"(target <= 1.3: {'met' if groupby['shuffled_met'] else 'NOT met'}); "
              f"{groupby['tasks_shuffled']} tasks; peak RSS growth (MB) "
              + ", ".join(f"{k} {v:.0f}" for k, v in groupby["peak_rss_growth_mb_median"].items()))
    record = {
        "benchmark": "subject",
        "grid": list(GRID),
        "trials_per_session": args.trials,
        "sessions": 2,
        "uncompressed_mb": uncompressed / 1e6,
        "compressed_mb": compressed / 1e6,
        "output_shape": shape,
        "output_mb": out_mb,
        "repeats": args.repeats,
        "results": results,
        "ratios": ratios,
        "groupby": groupby,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "note": "2 shared, noisy cores; compare ratios within one run",
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "subject.json").write_text(json.dumps(record, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
