"""One training epoch over a masked session: trials/s and peak RSS, neurocube vs per-item loops.

Generates a session-like ``.nii.gz`` (81x96x81x300 float32 by default, a third of
the grid in the brain mask) and measures, each in a fresh subprocess (so peak
RSS is its own), one epoch of masked trials:

- ``load``: ``neurocube.load`` of the whole masked selection (the reference for (a));
- (a) ``batches_gz``: ``neurocube.batches`` over the ``.nii.gz`` with its gzip index,
  shuffled, batches of 64;
- (b) ``batches_zarr``: the same over the selection's Zarr cache (``neurocube.cache``);
- (c) ``map_random``: the map-style ``TrialDataset`` read item by item in a random
  order from its chunk-aware sampler (chunks permuted, trials shuffled within the
  LRU's window), as a ``DataLoader(ds, sampler=ds.sampler(...))`` would;
- (d) ``isel_loop``: ``ds.isel(trial=i).values`` per trial, in a random order, on a
  subset of trials and **extrapolated** to the epoch (the report says how many);
- (e) ``nibabel_loop``: nibabel, one volume at a time through ``dataobj`` + the mask;
- ``map_random_zarr`` and ``isel_loop_zarr``: (c) and (d) over the Zarr cache, for information
  (there a per-item ``isel`` decompresses its trial's whole chunk).

Targets: (a) >= 0.8 x load; (b) >= 3 x (a); (c) >= 10 x (d). Writes
``benchmarks/results/batches.json``.

    python benchmarks/bench_batches.py              # full size (a few minutes)
    python benchmarks/bench_batches.py --quick      # tiny, seconds (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

from _report import judge, rss_now, rss_peak, run_worker, write_report

HERE = Path(__file__).resolve().parent


def worker(name: str, path: str, mask_path: str, cache: str, subset: int) -> dict:
    import dask
    import dask.array as da
    import numpy as np

    import neurocube
    from neurocube.datasets.training import TrialDataset

    mask = np.load(mask_path)
    da.ones(4, chunks=2).sum().compute()  # warm up dask (imports) outside the clock
    ds = neurocube.open_nifti(path, mask=mask, cache_dir=cache).rename(data="betas")
    n = ds.sizes["trial"]
    zarr_store = str(Path(cache) / "zarr")
    if name in ("batches_zarr", "map_random_zarr", "isel_loop_zarr"):
        ds = neurocube.open_cached("bench-batches", store=zarr_store)
    base = rss_now()
    trials = n
    t0 = time.perf_counter()
    c0 = time.process_time()
    checksum = 0.0
    if name == "make_zarr":
        neurocube.cache(ds, store=zarr_store, key="bench-batches", progress=False)
    elif name == "load":
        checksum = float(np.nansum(neurocube.load(ds.betas, progress=False).values[:, 0]))
    elif name in ("batches_gz", "batches_zarr"):
        for batch in neurocube.batches(ds, batch_size=64, seed=0):
            checksum += float(np.nansum(batch["betas"][:, 0]))
    elif name in ("map_random", "map_random_zarr"):
        items = TrialDataset(ds, cache_chunks=4)
        for i in items.sampler(seed=0):
            checksum += float(np.nansum(items[i]["betas"][0]))
    elif name in ("isel_loop", "isel_loop_zarr"):
        order = np.random.default_rng(0).permutation(n)[:subset]
        trials = len(order)
        with dask.config.set(scheduler="threads"):
            for i in order.tolist():
                checksum += float(np.nansum(ds.betas.isel(trial=i).values[0]))
    elif name == "nibabel_loop":
        import nibabel as nib

        img = nib.load(path, keep_file_open=True)
        for t in range(img.shape[3]):
            volume = np.asarray(img.dataobj[..., t], dtype=np.float32)
            checksum += float(np.nansum(volume[mask][0]))
    else:
        raise SystemExit(f"unknown worker {name}")
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - c0  # every thread of the process
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "trials": trials, "epoch_trials": n,
            "peak_rss": rss_peak(), "base_rss": base, "checksum": checksum}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny file (smoke test)")
    parser.add_argument("--data", type=Path, default=HERE / "data" / "batches")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: results/batches.json (batches-quick.json with --quick)")
    parser.add_argument("--worker", nargs=5, metavar=("NAME", "PATH", "MASK", "CACHE", "SUBSET"))
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds over every method; medians (default 3, 1 with --quick)")
    args = parser.parse_args()
    if args.worker:
        name, path, mask_path, cache, subset = args.worker
        print(json.dumps(worker(name, path, mask_path, cache, int(subset))))
        return 0

    import nibabel as nib
    import numpy as np

    from neurocube.synthetic.session import make_session

    if args.out is None:
        args.out = HERE / "results" / ("batches-quick.json" if args.quick else "batches.json")
    grid, n_trials, subset = ((20, 24, 20), 40, 10) if args.quick else ((81, 96, 81), 300, 40)
    folder = args.data / ("quick" if args.quick else "full")
    session_file = folder / "session.json"
    if not session_file.exists():
        print(f"generating {grid} x {n_trials} session in {folder} ...", flush=True)
        s = make_session(folder, grid=grid, n_trials=n_trials, nan_fraction=0.01)
        np.save(folder / "mask.npy", np.asarray(nib.load(str(s.brain_mask)).dataobj) > 0)
        session_file.write_text(json.dumps({"betas": str(s.betas)}))
    betas = Path(json.loads(session_file.read_text())["betas"])
    mask_path = folder / "mask.npy"
    cache = folder / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    with open(betas, "rb") as fh:  # warm the page cache: every method reads from RAM
        while fh.read(64 << 20):
            pass
    run_worker(__file__, "load", betas, mask_path, cache, subset)  # builds the gzip index
    run_worker(__file__, "make_zarr", betas, mask_path, cache, subset)

    methods = ["load", "batches_gz", "batches_zarr", "map_random", "isel_loop", "nibabel_loop",
               "map_random_zarr", "isel_loop_zarr"]
    repeats = args.repeats or (1 if args.quick else 3)
    # Rounds over all methods (not one method's repeats in a row), so a noisy spell on the shared
    # machine hits every method alike; each method's median run is reported.
    runs: dict[str, list[dict]] = {name: [] for name in methods}
    for round_no in range(repeats):
        print(f"round {round_no + 1} of {repeats}", flush=True)
        for name in methods:
            runs[name].append(run_worker(__file__, name, betas, mask_path, cache, subset))
    results: dict[str, dict] = {}
    for name in methods:
        rs = runs[name]
        rates = [r["trials"] / r["seconds"] for r in rs]
        ms_per_trial = statistics.median(1e3 * r["seconds"] / r["trials"] for r in rs)
        cpu_ms_per_trial = statistics.median(1e3 * r["cpu_seconds"] / r["trials"] for r in rs)
        epoch_trials = rs[0]["epoch_trials"]
        results[name] = {
            "runs_trials_per_s": rates,
            "trials_per_s": statistics.median(rates),
            "ms_per_trial": ms_per_trial,
            "cpu_ms_per_trial": cpu_ms_per_trial,
            "trials_timed": rs[0]["trials"],
            "epoch_seconds": ms_per_trial * epoch_trials / 1e3,
            "extrapolated": rs[0]["trials"] != epoch_trials,
            "peak_rss_mb": statistics.median(r["peak_rss"] for r in rs) / 1e6,
            "rss_growth_mb": statistics.median(r["peak_rss"] - r["base_rss"] for r in rs) / 1e6,
            "checksum": rs[0]["checksum"],
        }
        note = f" ({rs[0]['trials']} of {epoch_trials} trials, extrapolated)" if (
            results[name]["extrapolated"]) else ""
        print(f"  {name:14s} {results[name]['trials_per_s']:10.1f} trials/s  "
              f"{ms_per_trial:8.2f} ms/trial  CPU {cpu_ms_per_trial:8.2f} ms/trial  "
              f"peak {results[name]['peak_rss_mb']:7.0f} MB{note}", flush=True)

    tps = {k: v["trials_per_s"] for k, v in results.items()}
    ratios = {
        "a_batches_gz_vs_load": tps["batches_gz"] / tps["load"],
        "b_batches_zarr_vs_batches_gz": tps["batches_zarr"] / tps["batches_gz"],
        "c_map_random_vs_isel_loop": tps["map_random"] / tps["isel_loop"],
        "a_batches_gz_vs_nibabel_loop": tps["batches_gz"] / tps["nibabel_loop"],
        # CPU time per trial (all threads), for information: the same work, whatever the cores
        "a_cpu_load_vs_batches_gz": results["load"]["cpu_ms_per_trial"]
        / results["batches_gz"]["cpu_ms_per_trial"],
        "c_cpu_isel_loop_vs_map_random": results["isel_loop"]["cpu_ms_per_trial"]
        / results["map_random"]["cpu_ms_per_trial"],
        # the ceiling of (c): inflating every trial once, on all cores, against the loop. A
        # map-style dataset over the .nii.gz cannot beat load (it inflates the same bytes)
        "c_ceiling_load_vs_isel_loop": tps["load"] / tps["isel_loop"],
        "c_map_random_vs_load": tps["map_random"] / tps["load"],
        # (c) with both sides over the Zarr cache: there a per-item isel decompresses its whole
        # chunk, which is what the dataset's chunk LRU saves (over the .nii.gz the gzip index
        # lets the loop inflate only its one volume)
        "c_zarr_map_random_vs_isel_loop": tps["map_random_zarr"] / tps["isel_loop_zarr"],
    }
    targets = {
        "a_batches_gz_vs_load": (">=", 0.8),
        "b_batches_zarr_vs_batches_gz": (">=", 3.0),
        "c_map_random_vs_isel_loop": (">=", 10.0),
    }
    verdicts = judge(ratios, targets)
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "data": {"grid": list(grid), "trials": n_trials, "gz_bytes": betas.stat().st_size,
                 "isel_loop_subset": subset},
        "notes": "Methods run in rounds (each round runs every method once, each in a fresh "
                 "process); figures are per-method medians over the rounds, ratios are ratios of "
                 "medians. isel_loop is timed on a random subset of trials and extrapolated to "
                 "the epoch; map_random reads items in the dataset's chunk-aware random order "
                 "(sampler()). cpu_ms_per_trial counts every thread of the worker; load's is "
                 "what decoding and gathering one volume costs (the decoder's limit per item).",
        "results": results,
        "ratios": ratios,
        "targets": {k: list(v) for k, v in targets.items()},
        "met": verdicts,
    }
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
