"""Benchmark: the Zarr spill cache against reading the .nii.gz again, and against plain to_zarr.

Data are generated (``neurocube.synthetic.bucket.make_bucket``): one subject, one session of
81x96x81 x N float32 trials as ``.nii.gz`` (default N=200: 504 MB uncompressed), an ellipsoid
brain mask (273k voxels) and the ROI "FFA1" (17k voxels, 6 % of the brain; real ROIs are
smaller, so the cache's advantage here is conservative). Three measurements, in one run:

1. **Reopen from the cache + ROI selection** vs the same selection from the ``.nii.gz``
   first call in a fresh process ("cold") and the median of 3 further calls in that process
   ("warm", the next call of a session); wall time of the work after imports; peak RSS above
   the post-import RSS; median over ``--repeats`` processes:

   - ``gzip, indexed``: ``sub.betas(ses, roi="FFA1").compute()`` with the gzip index present;
   - ``nibabel``: the whole 4-D array with nibabel, then the ROI mask (what a user does instead);
   - ``cache(sub.betas(roi)) hit``: the same ``betas(...)`` call wrapped in ``neurocube.cache``
     (a hit: the graph is built to derive the key, then the entry is reopened) and computed;
   - ``open_cached(key) of the ROI``: the same entry reopened by its key (no graph built,
     source identities checked) and computed;
   - ``cache: brain entry, ROI after``: the brain-masked session cached, reopened, ROI voxels
     picked with ``isel`` and computed (reads whole cached chunks: voxels are one chunk).

2. **Cache write throughput** vs ``to_zarr`` of the same in-memory numpy array (the brain-masked
   session, same codec and chunks): MB/s of data written, each in its own process.

3. **Distributed, memory-limited**: an uncompressed masked session of ~1 GB (64x64x32 grid,
   2800 trials, 31 of 32 slices in the mask) cached on ``LocalCluster(n_workers=2,
   threads_per_worker=1, memory_limit=350 MB)``: wall time, throughput, peak process memory per
   worker (sampled every 100 ms), restarts.

``--scaling 380`` adds a second session of 380 trials (958 MB raw) timed for the gzip read and
``open_cached`` only, to show how the ratio grows with the session.

Run: ``python benchmarks/bench_cache.py [--trials 200] [--repeats 5]`` (about 5 minutes here,
mostly fresh Python processes; data under ``benchmarks/data/``, removed at the end). Writes
``benchmarks/results/cache.json``. The machine is shared (2 noisy cores): compare ratios.
``--quick`` times only the gzip read, the cache hit and ``open_cached`` (2 repeats, ~2 minutes)
and writes ``results/cache-quick.json``: a check that the script works, not figures of record.
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
SESSION = "ses-01"

_PRELUDE = textwrap.dedent(
    """
    import json, os, resource, sys, time
    import numpy as np
    # imported before the baseline (dask imports distributed on a process's first compute)
    import dask, dask.array, distributed, nibabel, pandas, xarray, zarr
    import neurocube, neurocube.caching, neurocube.sources.nifti, neurocube.datasets.fmri
    root, store = sys.argv[1], sys.argv[2]
    WARM_CALLS = int(os.environ.get("BENCH_WARM_CALLS", "3"))
    def rss_now():
        # also resets the peak-RSS mark (VmHWM): ru_maxrss would count the driver process
        # this one was started from (exec keeps the old memory's high-water mark)
        with open('/proc/self/clear_refs', 'w') as fh:
            fh.write('5')
        with open('/proc/self/statm') as fh:
            return int(fh.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    def peak_rss():
        with open('/proc/self/status') as fh:
            return next(int(l.split()[1]) * 1024 for l in fh if l.startswith('VmHWM:'))
    def report(wall, values, **extra):
        peak = peak_rss()
        print(json.dumps({"wall": wall, "peak": peak - base, "shape": list(values.shape),
                          "checksum": float(np.nansum(values, dtype=np.float64)), **extra}))
    base = rss_now()
    """
)

# Each contender defines work() -> values; the first call in a fresh process is timed as "cold",
# the next WARM_CALLS calls in the same process as "warm" (the next call in the same session).
_TIMED = textwrap.dedent(
    """
    t0 = time.perf_counter()
    values = work()
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(WARM_CALLS):
        t0 = time.perf_counter()
        work()
        warm.append(time.perf_counter() - t0)
    report(cold, values, warm=sorted(warm)[len(warm) // 2])
    """
)
GZIP_ROI = (
    _PRELUDE
    + textwrap.dedent(
        """
    def work():
        sub = neurocube.open_subject(root, "sub-01")
        return sub.betas("ses-01", roi="FFA1").betas.values
    """
    )
    + _TIMED
)

NIBABEL_ROI = (
    _PRELUDE
    + textwrap.dedent(
        """
    sub = neurocube.open_subject(root, "sub-01")
    brain = sub.brain_mask()                        # the same voxels (not timed: small files)
    roi = np.zeros(brain.shape, bool)               # flat over the grid, C order
    roi[brain] = sub.roi_mask("FFA1")               # flat over brain voxels -> grid
    roi = roi.reshape(sub.grid_shape)
    path = sub.betas_path("ses-01")
    def work():
        data = np.asarray(nibabel.load(path).dataobj, dtype=np.float32)
        return data[roi].T.copy()
    """
    )
    + _TIMED
)

CACHE_ROI = (
    _PRELUDE
    + textwrap.dedent(
        """
    def work():
        sub = neurocube.open_subject(root, "sub-01")
        cached = neurocube.cache(sub.betas("ses-01", roi="FFA1"), store=store, key="ffa1")
        return cached.betas.values
    """
    )
    + _TIMED
)

OPEN_CACHED_ROI = (
    _PRELUDE
    + textwrap.dedent(
        """
    def work():
        return neurocube.open_cached("ffa1", store=store).betas.values
    """
    )
    + _TIMED
)

CACHE_BRAIN_THEN_ROI = (
    _PRELUDE
    + textwrap.dedent(
        """
    def work():
        sub = neurocube.open_subject(root, "sub-01")
        cached = neurocube.cache(sub.betas("ses-01"), store=store)
        roi = sub.roi_mask("FFA1")                  # flat over brain voxels = cached voxels
        return cached.betas.isel(voxel=np.flatnonzero(roi)).values
    """
    )
    + _TIMED
)


# Write throughput: the brain-masked session loaded into memory first (not timed), then written.
_IN_MEMORY = textwrap.dedent(
    """
    sub = neurocube.open_subject(root, "sub-01")
    lazy = sub.betas("ses-01")
    values = lazy.betas.values
    chunks = lazy.betas.chunks
    plain = xarray.Dataset({"betas": (("trial", "voxel"), values)},
                           attrs={"neurocube_sources": []})
    base = rss_now()
    """
)

WRITE_CACHE = (
    _PRELUDE
    + _IN_MEMORY
    + textwrap.dedent(
        """
    ds = plain.chunk({"trial": chunks[0][0]})
    t0 = time.perf_counter()
    neurocube.cache(ds, store=store, key="throughput", overwrite=True, progress=False)
    report(time.perf_counter() - t0, values, nbytes=values.nbytes)
    """
    )
)

WRITE_TO_ZARR = (
    _PRELUDE
    + _IN_MEMORY
    + textwrap.dedent(
        """
    import shutil
    from neurocube.caching.core import numeric_codec
    target = os.path.join(store, "plain.zarr")
    shutil.rmtree(target, ignore_errors=True)
    encoding = {"betas": {"chunks": (chunks[0][0], values.shape[1]),
                          "compressors": [numeric_codec()]}}
    t0 = time.perf_counter()
    plain.to_zarr(target, mode="w", zarr_format=3, consolidated=False, encoding=encoding)
    report(time.perf_counter() - t0, values, nbytes=values.nbytes)
    """
    )
)

DISTRIBUTED = textwrap.dedent(
    """
    import json, os, sys, threading, time
    import numpy as np
    import distributed, neurocube
    path, store, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    GRID = (64, 64, 32)
    if __name__ == "__main__":
        mask = np.ones(GRID, bool)
        mask[:, :, 0] = False
        with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                      memory_limit=limit, dashboard_address=None) as cluster, \\
             distributed.Client(cluster) as client:
            def rss():
                import os, psutil
                return psutil.Process(os.getpid()).memory_info().rss
            peaks = dict.fromkeys(client.scheduler_info()["workers"], 0)
            before = set(peaks)
            done = threading.Event()
            def sample():
                while not done.is_set():
                    try:
                        for addr, value in client.run(rss).items():
                            peaks[addr] = max(peaks.get(addr, 0), value)
                    except Exception:
                        pass
                    time.sleep(0.1)
            sampler = threading.Thread(target=sample, daemon=True)
            ds = neurocube.open_nifti(path, mask=mask, chunks="8MiB")
            sampler.start()
            t0 = time.perf_counter()
            cached = neurocube.cache(ds, store=store, overwrite=True, progress=False)
            wall = time.perf_counter() - t0
            done.set()
            sampler.join()
            after = set(client.scheduler_info()["workers"])
            with __import__("dask").config.set(scheduler="threads"):
                checksum = float(cached.data.sum(dtype="float64"))
            print(json.dumps({"wall": wall, "nbytes": int(ds.data.nbytes),
                              "peak_worker_rss": max(peaks.values()),
                              "restarted_workers": len(before - after),
                              "checksum": checksum}))
    """
)


def run(script: str, *args: str, env: dict[str, str]) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
        check=False, timeout=900,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_big_nifti(path: Path, grid: tuple[int, int, int], trials: int) -> Path:
    """A raw float32 4-D NIfTI written volume by volume: value = C index + (t % 97) / 2."""
    import nibabel as nib
    import numpy as np

    header = nib.Nifti1Header()
    header.set_data_shape((*grid, trials))
    header.set_data_dtype(np.float32)
    header.set_sform(np.eye(4), code=1)
    header.set_data_offset(352)
    base = np.arange(np.prod(grid), dtype=np.float32).reshape(grid).ravel(order="F")
    with open(path, "wb") as fh:
        header.write_to(fh)
        fh.write(b"\0" * (352 - fh.tell()))
        for t in range(trials):
            fh.write((base + np.float32((t % 97) * 0.5)).astype("<f4").tobytes())
    return path


def scaling_point(work: Path, trials: int, repeats: int, env: dict[str, str]) -> dict[str, float]:
    """Time the gzip read and open_cached of FFA1 on a session with ``trials`` trials."""
    from neurocube.synthetic.bucket import make_bucket

    root, store = work / f"bucket-{trials}", work / f"zarr-{trials}"
    make_bucket(root, subjects=1, sessions=1, trials=trials, grid=GRID, vary_grid=False,
                stimuli=False, surface_rois=False, full_resolution=False, freesurfer=False,
                nan_fraction=0.01, compresslevel=1, seed=2)  # fmt: skip
    for script in (GZIP_ROI, CACHE_ROI):  # build the index and the entry
        run(script, str(root), str(store), env=env)
    point: dict[str, float] = {"trials": trials}
    for label, script in (("gzip_warm_s", GZIP_ROI), ("open_cached_warm_s", OPEN_CACHED_ROI)):
        outs = [run(script, str(root), str(store), env=env) for _ in range(repeats)]
        point[label] = statistics.median(o["warm"] for o in outs)
    shutil.rmtree(root, ignore_errors=True)
    return point


def summarise(name: str, outs: list[dict[str, float]]) -> dict[str, object]:
    walls = [o["wall"] for o in outs]
    peaks = [o.get("peak", 0.0) for o in outs]
    return {
        "name": name,
        "wall_median_s": statistics.median(walls),
        "wall_runs_s": walls,
        "warm_median_s": statistics.median(o["warm"] for o in outs) if "warm" in outs[0] else None,
        "peak_rss_above_imports_mb": statistics.median(peaks) / 1e6,
        "shape": outs[0].get("shape"),
        "checksum": outs[0]["checksum"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dist-trials", type=int, default=2800)
    parser.add_argument("--worker-memory", type=int, default=350_000_000)
    parser.add_argument(
        "--scaling",
        type=int,
        default=None,
        metavar="TRIALS",
        help="also time gzip vs open_cached on a second session with this many trials",
    )
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="only the gzip read, the cache hit and open_cached of the ROI, 2 repeats; no write "
        "or distributed runs; writes results/cache-quick.json (a check that the script works "
        "and a rough ratio, not the figures of record)",
    )
    args = parser.parse_args()
    if args.quick:
        args.repeats = min(args.repeats, 2)

    from neurocube.synthetic.bucket import make_bucket

    data_dir = HERE / "data"
    data_dir.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-cache-", dir=data_dir))
    root, store, index_cache = work / "bucket", work / "zarr", work / "nc-cache"
    env = dict(os.environ, NEUROCUBE_CACHE_DIR=str(index_cache), NEUROCUBE_PROGRESS="0")
    results: dict[str, object] = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "args": vars(args),
    }
    try:
        t0 = time.perf_counter()
        make_bucket(root, subjects=1, sessions=1, trials=args.trials, grid=GRID,
                    vary_grid=False, stimuli=False, surface_rois=False, full_resolution=False,
                    freesurfer=False, nan_fraction=0.01, compresslevel=1, seed=2)  # fmt: skip
        gz = next(root.glob("derivatives/glmsingle-tedana/sub-01/ses-01/func/*Betas*.nii.gz"))
        raw_mb = args.trials * GRID[0] * GRID[1] * GRID[2] * 4 / 1e6
        made = time.perf_counter() - t0
        print(f"session: {args.trials} trials on {GRID}: {raw_mb:.0f} MB raw, "
              f"{gz.stat().st_size / 1e6:.0f} MB gzip (made in {made:.0f} s)")  # fmt: skip

        # 1. reopen + ROI: warm-up runs build the gzip index and the two cache entries.
        warmups = [GZIP_ROI, CACHE_ROI] + ([] if args.quick else [CACHE_BRAIN_THEN_ROI])
        for script in warmups:
            run(script, str(root), str(store), env=env)
        contenders = {
            "gzip, indexed (neurocube)": GZIP_ROI,
            "nibabel 4-D load, then ROI": NIBABEL_ROI,
            "cache(sub.betas(roi)) hit": CACHE_ROI,
            "open_cached(key) of the ROI": OPEN_CACHED_ROI,
            "cache: brain entry, ROI after": CACHE_BRAIN_THEN_ROI,
        }
        if args.quick:
            for name in ("nibabel 4-D load, then ROI", "cache: brain entry, ROI after"):
                del contenders[name]
        reopen = []
        for name, script in contenders.items():
            outs = [run(script, str(root), str(store), env=env) for _ in range(args.repeats)]
            reopen.append(summarise(name, outs))
            print(f"  {name}: {reopen[-1]['wall_median_s']:.3f} s cold, "
                  f"{reopen[-1]['warm_median_s']:.3f} s warm", flush=True)  # fmt: skip
        if len({round(float(r["checksum"]), 0) for r in reopen}) != 1:
            raise RuntimeError(f"contenders disagree: {[r['checksum'] for r in reopen]}")
        gzip_cold = float(reopen[0]["wall_median_s"])
        gzip_warm = float(reopen[0]["warm_median_s"])
        for r in reopen:
            r["speedup_vs_gzip"] = gzip_cold / float(r["wall_median_s"])
            r["warm_speedup_vs_gzip"] = gzip_warm / float(r["warm_median_s"])
        results["reopen_roi"] = reopen
        opened = next(r for r in reopen if r["name"] == "open_cached(key) of the ROI")
        if args.scaling:
            results["scaling"] = [
                {"trials": args.trials, "gzip_warm_s": gzip_warm,
                 "open_cached_warm_s": opened["warm_median_s"]},
                scaling_point(work, args.scaling, args.repeats, env),
            ]  # fmt: skip
            print(f"  scaling: {results['scaling']}", flush=True)

        if args.quick:
            out = HERE / "results" / "cache-quick.json"
            out.parent.mkdir(exist_ok=True)
            out.write_text(json.dumps(results, indent=2))
            for r in reopen:
                print(f"{r['name']:<32} cold {r['wall_median_s']:.3f} s "
                      f"({r['speedup_vs_gzip']:.1f} x gzip), warm {r['warm_median_s']:.3f} s "
                      f"({r['warm_speedup_vs_gzip']:.1f} x gzip)")  # fmt: skip
            print(f"wrote {out}")
            return

        # 2. write throughput
        writes = []
        writers = {"neurocube.cache": WRITE_CACHE, "xarray to_zarr": WRITE_TO_ZARR}
        for name, script in writers.items():
            outs = [run(script, str(root), str(store), env=env) for _ in range(args.repeats)]
            row = summarise(name, outs)
            row["nbytes"] = outs[0]["nbytes"]
            row["throughput_mb_s"] = outs[0]["nbytes"] / 1e6 / float(row["wall_median_s"])
            # ru_maxrss spans the whole process, loading the data included: not the write's peak.
            row.pop("peak_rss_above_imports_mb")
            writes.append(row)
            print(f"  write {name}: {row['throughput_mb_s']:.0f} MB/s", flush=True)
        writes[0]["ratio_vs_to_zarr"] = writes[0]["throughput_mb_s"] / writes[1]["throughput_mb_s"]
        results["write"] = writes

        # 3. distributed, memory-limited (fewer repeats: each run moves ~1 GB)
        big = write_big_nifti(work / "big.nii", (64, 64, 32), args.dist_trials)
        dist_runs = [
            run(DISTRIBUTED, str(big), str(store), str(args.worker_memory), env=env)
            for _ in range(max(3, args.repeats // 2))
        ]
        walls = [d["wall"] for d in dist_runs]
        nbytes = dist_runs[0]["nbytes"]
        results["distributed"] = {
            "n_workers": 2,
            "memory_limit_per_worker_mb": args.worker_memory / 1e6,
            "data_mb": nbytes / 1e6,
            "data_over_total_memory_limit": nbytes / (2 * args.worker_memory),
            "wall_median_s": statistics.median(walls),
            "wall_runs_s": walls,
            "throughput_mb_s": nbytes / 1e6 / statistics.median(walls),
            "peak_worker_rss_mb": max(d["peak_worker_rss"] for d in dist_runs) / 1e6,
            "restarted_workers": sum(d["restarted_workers"] for d in dist_runs),
        }
        print(f"  distributed: {results['distributed']}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    out = HERE / "results" / "cache.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"wrote {out}")


def print_table(results: dict[str, object]) -> None:
    print("\nReopen + ROI selection: first call in a fresh process (cold) and next calls in the")
    print("same process (warm); median wall; peak RSS above the post-import RSS")
    head = ("contender", "cold s", "x gzip", "warm s", "x gzip", "peak MB")
    print(f"{head[0]:<32} {head[1]:>7} {head[2]:>7} {head[3]:>7} {head[4]:>7} {head[5]:>8}")
    for r in results["reopen_roi"]:  # type: ignore[union-attr]
        print(f"{r['name']:<32} {r['wall_median_s']:>7.3f} {r['speedup_vs_gzip']:>7.1f} "
              f"{r['warm_median_s']:>7.3f} {r['warm_speedup_vs_gzip']:>7.1f} "
              f"{r['peak_rss_above_imports_mb']:>8.0f}")  # fmt: skip
    print("\nWrite throughput (in-memory numpy data, same codec and chunks)")
    for r in results["write"]:  # type: ignore[union-attr]
        print(f"{r['name']:<34} {r['throughput_mb_s']:>8.0f} MB/s "
              f"({r['nbytes'] / 1e6:.0f} MB in {r['wall_median_s']:.2f} s)")  # fmt: skip
    for point in results.get("scaling", []):  # type: ignore[attr-defined]
        print(f"scaling: {point['trials']} trials: gzip {point['gzip_warm_s']:.3f} s, "
              f"open_cached {point['open_cached_warm_s']:.3f} s, "
              f"{point['gzip_warm_s'] / point['open_cached_warm_s']:.1f} x")  # fmt: skip
    d: dict = results["distributed"]  # type: ignore[assignment]
    print("\nDistributed (2 workers)")
    print(f"{d['data_mb']:.0f} MB cached with {d['memory_limit_per_worker_mb']:.0f} MB per worker "
          f"({d['data_over_total_memory_limit']:.2f} x the total limit): "
          f"{d['wall_median_s']:.1f} s, {d['throughput_mb_s']:.0f} MB/s, peak worker RSS "
          f"{d['peak_worker_rss_mb']:.0f} MB, {d['restarted_workers']} restarts")  # fmt: skip


if __name__ == "__main__":
    main()
