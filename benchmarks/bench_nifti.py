"""Masked single-trial-betas reads from a .nii.gz: neurocube vs the tools a user has instead.

Generates a session-like file (81x96x81x300 float32 by default: ~750 MB
uncompressed, a third of the grid inside the brain, zeros outside) and
measures, in one run and each in a fresh subprocess (so peak RSS is its own):

- neurocube masked read, first read (no index yet; builds it) and with the index, loaded with
  ``neurocube.load`` (chunks stored into one output array); also with the index through plain
  ``.values`` (dask gathers then concatenates: the output is briefly held twice);
- nibabel: per-volume loop over ``dataobj[..., t]`` (indexed_gzip), and ``get_fdata()`` + mask;
- nilearn's ``NiftiMasker`` (if installed: ``pip install -e ".[bench]"``);
- the laion_fmri streaming approach: one sequential gzip stream, one volume at a time;
- limits: single-core zlib streaming of the file, and all cores reading through the index
  with no masking (indexed_gzip and rapidgzip, 32 MiB reads; the faster is the limit);
- one random trial: the first and the last trial alone, through the index.

Throughput is MB/s of *uncompressed 4-D data* (the work every method must do).
Each figure is the median of ``--repeats`` runs; ratios compare methods measured
in this same run. Writes ``benchmarks/results/nifti.json`` and prints a table.

    python benchmarks/bench_nifti.py              # full size (a few minutes)
    python benchmarks/bench_nifti.py --quick      # tiny, seconds (smoke test)
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

from _report import judge, write_report
from _report import rss_now as _rss_now
from _report import rss_peak as _rss_peak
from _report import run_worker as _run_worker

HERE = Path(__file__).resolve().parent
SINGLE_THREADED = {"limit_zlib_stream", "nibabel_volume_loop", "nibabel_get_fdata",
                   "laion_streaming", "nilearn_masker"}


# --------------------------------------------------------------------------- workers
# Each worker runs in its own process: `python bench_nifti.py --worker NAME ...`.


def worker(name: str, path: str, mask_path: str, cache: str, threads: int) -> dict:
    import numpy as np

    mask = np.load(mask_path)
    out_bytes = 0
    # Warm up what every method pays once per session (imports; dask's first compute imports
    # distributed to look for a client), so the clock measures the read itself.
    import dask
    import dask.array as da
    import nibabel  # noqa: F401
    import xarray  # noqa: F401

    import neurocube
    from neurocube.sources import (
        gzindex,
        nifti,  # noqa: F401
    )

    da.ones(4, chunks=2).sum().compute()
    gzindex.STREAM_THREADS = threads  # a first pass decodes on this many threads
    if name.endswith("_noverify"):  # the same read without per-volume checksums (their cost)
        name = name[: -len("_noverify")]
        gzindex.VERIFY_VOLUMES = False
    check_cpu = _count_check_cpu(gzindex)
    base = _rss_now()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    if name in ("neurocube_first", "neurocube_indexed", "neurocube_indexed_compute",
                "neurocube_first_compute"):
        ds = neurocube.open_nifti(path, mask=mask, cache_dir=cache)
        with dask.config.set(scheduler="threads", num_workers=threads):
            if name.endswith("_compute"):  # dask's gather + concatenate (= .values)
                out = ds.data.values
            else:  # chunks stored into one preallocated output
                out = neurocube.load(ds.data, progress=False).values
        out_bytes = out.nbytes
    elif name in ("neurocube_first_cache", "neurocube_indexed_cache"):
        ds = neurocube.open_nifti(path, mask=mask, cache_dir=cache)
        store = Path(cache) / "zarr"
        shutil.rmtree(store, ignore_errors=True)
        with dask.config.set(scheduler="threads", num_workers=threads):
            neurocube.cache(ds, store=store, key="bench")
        out_bytes = 0
    elif name in ("neurocube_trial_first", "neurocube_trial_last"):
        ds = neurocube.open_nifti(path, mask=mask, cache_dir=cache, chunks=1)
        t = 0 if name.endswith("first") else -1
        t0 = time.perf_counter()  # time the read only
        out = ds.data.isel(trial=t).values
        out_bytes = out.nbytes
    elif name == "nibabel_volume_loop":
        import nibabel as nib

        img = nib.load(path, keep_file_open=True)
        n = img.shape[3]
        out = np.empty((n, int(mask.sum())), np.float32)
        for t in range(n):
            out[t] = np.asarray(img.dataobj[..., t])[mask]
        out_bytes = out.nbytes
    elif name == "nibabel_get_fdata":
        import nibabel as nib

        data = nib.load(path).get_fdata(dtype=np.float32)
        out = data[mask].T.copy()
        del data
        out_bytes = out.nbytes
    elif name == "nilearn_masker":
        import nibabel as nib
        from nilearn.maskers import NiftiMasker

        img = nib.load(path)
        masker = NiftiMasker(mask_img=nib.Nifti1Image(mask.astype(np.uint8), img.affine))
        out = masker.fit_transform(img)
        out_bytes = out.nbytes
    elif name == "laion_streaming":
        out = _laion_streaming(path, mask)
        out_bytes = out.nbytes
    elif name == "limit_zlib_stream":
        import zlib

        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                inflater.decompress(block)
    elif name in ("limit_parallel_inflate_igz", "limit_parallel_inflate_rapidgzip"):
        _parallel_inflate(path, cache, threads, name.rsplit("_", 1)[1])
    elif name == "limit_rapidgzip_noindex":  # rapidgzip's parallel decoder, no index at all
        import rapidgzip

        with rapidgzip.RapidgzipFile(path, parallelization=threads) as fh:
            buf = memoryview(bytearray(4 << 20))
            while fh.readinto(buf):
                pass
    else:
        raise SystemExit(f"unknown worker {name}")
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - cpu0  # every thread of this process
    return {"seconds": seconds, "cpu_seconds": cpu, "check_cpu_seconds": check_cpu[0],
            "peak_rss": _rss_peak(), "base_rss": base, "out_bytes": out_bytes}


def _count_check_cpu(gzindex) -> list[float]:
    """Count the CPU time the reader threads spend in per-volume checks (a one-item list).

    The checks run inside the reads, so their own thread time is an exact account of their
    cost, where a difference of two noisy runs is not.
    """
    import threading

    total = [0.0]
    lock = threading.Lock()
    original = gzindex.check_volumes

    def counted(*args):
        t0 = time.thread_time()
        try:
            return original(*args)
        finally:
            spent = time.thread_time() - t0
            with lock:
                total[0] += spent

    gzindex.check_volumes = counted
    return total


def _laion_streaming(path: str, mask):
    """The existing loader's streaming mode (FORMATS.md §1): one sequential gzip stream,
    header parsed, then one volume at a time with the mask applied inline; no scaling."""
    import gzip

    import nibabel as nib
    import numpy as np

    with gzip.open(path, "rb") as fh:
        head = fh.read(352)
        hdr = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(head + b"\0" * 4))
        shape = hdr.get_data_shape()
        dtype = hdr.get_data_dtype()
        fh.read(int(hdr.get_data_offset()) - 352)
        vol_bytes = int(np.prod(shape[:3])) * dtype.itemsize
        flat = mask.ravel(order="F")
        out = np.empty((shape[3], int(mask.sum())), np.float32)
        order = np.argsort(np.ravel_multi_index(np.nonzero(mask), shape[:3], order="F"))
        inv = np.empty_like(order)
        inv[order] = np.arange(order.size)
        for t in range(shape[3]):
            vol = np.frombuffer(fh.read(vol_bytes), dtype=dtype)
            out[t] = vol[flat][inv]  # back to C order of the grid
    return out


def _parallel_inflate(path: str, cache: str, threads: int, lib: str) -> None:
    """All cores inflating the same file through its index, no masking (the machine's limit).

    Each thread reads one contiguous share in 32 MiB calls (the best case for
    both libraries); the report takes the faster library as the limit.
    """
    import threading

    import indexed_gzip
    import rapidgzip

    from neurocube.sources import gzindex_store

    index = gzindex_store.auto_index_path(path, cache)
    size = _uncompressed_size(path, str(index))
    bounds = [size * i // threads for i in range(threads + 1)]

    def run(lo: int, hi: int) -> None:
        if lib == "igz":
            fh = indexed_gzip.IndexedGzipFile(path, index_file=str(index), buffer_size=4 << 20)
        else:
            fh = rapidgzip.RapidgzipFile(path, parallelization=1)
            fh.import_index(str(index))
        buf = bytearray(32 << 20)
        fh.seek(lo)
        left = hi - lo
        while left > 0:
            left -= fh.readinto(memoryview(buf)[: min(left, len(buf))])
        fh.close()

    pool = [threading.Thread(target=run, args=(bounds[i], bounds[i + 1])) for i in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()


def _uncompressed_size(path: str, index: str) -> int:
    import struct

    with open(index, "rb") as fh:
        return struct.unpack("<Q", fh.read(23)[15:23])[0]


# --------------------------------------------------------------------------- driver


def run_worker(name, path, mask_path, cache, threads):
    return _run_worker(__file__, name, path, mask_path, cache, threads)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny file, one repeat (smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=HERE / "data" / "nifti")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: results/nifti.json (results/nifti-quick.json with --quick, "
                             "so a smoke run never replaces the recorded figures)")
    parser.add_argument("--verification", action="store_true",
                        help="only the cost of per-volume checksums: indexed reads with and "
                             "without them, alternating, --repeats pairs (results/"
                             "nifti-verification.json)")
    parser.add_argument("--worker", nargs=5, metavar=("NAME", "PATH", "MASK", "CACHE", "THREADS"))
    args = parser.parse_args()
    if args.worker:
        name, path, mask_path, cache, threads = args.worker
        print(json.dumps(worker(name, path, mask_path, cache, int(threads))))
        return 0

    import numpy as np

    from neurocube.synthetic.session import make_session

    if args.out is None:
        name = "nifti-verification" if args.verification else "nifti"
        args.out = HERE / "results" / (f"{name}-quick.json" if args.quick else f"{name}.json")
    grid, n_trials = ((20, 24, 20), 30) if args.quick else ((81, 96, 81), 300)
    repeats = 1 if args.quick else args.repeats
    threads = os.cpu_count() or 2
    folder = args.data / ("quick" if args.quick else "full")
    session_file = folder / "session.json"
    if not session_file.exists():
        print(f"generating {grid} x {n_trials} session in {folder} ...", flush=True)
        s = make_session(folder, grid=grid, n_trials=n_trials, nan_fraction=0.01)
        import nibabel as nib

        np.save(folder / "mask.npy", nib.load(str(s.brain_mask)).get_fdata() > 0)
        session_file.write_text(json.dumps({"betas": str(s.betas)}))
    betas = Path(json.loads(session_file.read_text())["betas"])
    mask_path = folder / "mask.npy"
    cache = folder / "cache"
    raw_bytes = int(np.prod(grid)) * n_trials * 4
    gz_bytes = betas.stat().st_size
    with open(betas, "rb") as fh:  # warm the page cache: every method reads from RAM
        while fh.read(64 << 20):
            pass

    if args.verification:
        return _verification_cost(args, betas, mask_path, cache, threads, raw_bytes, repeats)

    # (method, threads): every figure of one run; "@1t" / "@2t" rows are the scaling runs.
    scaling = sorted({1, 2, threads})
    methods: list[tuple[str, int]] = [
        ("limit_zlib_stream", 1),
        *[("limit_rapidgzip_noindex", t) for t in scaling],
        *[("neurocube_first", t) for t in scaling],  # (cache cleared before each repeat)
        ("neurocube_first_compute", threads),
        ("neurocube_first_cache", threads),
        *[("limit_parallel_inflate_igz", t) for t in scaling],
        ("limit_parallel_inflate_rapidgzip", threads),
        *[("neurocube_indexed", t) for t in scaling],
        ("neurocube_indexed_noverify", threads),
        ("neurocube_indexed_compute", threads),
        ("neurocube_indexed_compute_noverify", threads),
        ("neurocube_indexed_cache", threads),
        ("neurocube_trial_first", threads),
        ("neurocube_trial_last", threads),
        ("nibabel_volume_loop", 1),
        ("nibabel_get_fdata", 1),
        ("laion_streaming", 1),
    ]
    try:
        import nilearn  # noqa: F401

        methods.append(("nilearn_masker", 1))
    except ImportError:
        print("nilearn not installed: skipping NiftiMasker (pip install -e '.[bench]')")

    def label(name: str, t: int) -> str:
        return name if t == threads or name in SINGLE_THREADED else f"{name}@{t}t"

    # Rounds: each round runs every method once, so a slow spell of this shared machine
    # touches all methods alike instead of every repeat of one method.
    all_runs: dict[tuple[str, int], list[dict]] = {m: [] for m in methods}
    for round_no in range(repeats):
        print(f"round {round_no + 1} of {repeats}", flush=True)
        for name, t in methods:
            if name.startswith("neurocube_first"):
                shutil.rmtree(cache, ignore_errors=True)
            if name.startswith(("limit_parallel", "neurocube_indexed")) and not (
                cache / "gzindex"
            ).exists():
                run_worker("neurocube_first", betas, mask_path, cache, threads)
            all_runs[(name, t)].append(run_worker(name, betas, mask_path, cache, t))

    results: dict[str, dict] = {}
    for name, t in methods:
        runs = all_runs[(name, t)]
        secs = [r["seconds"] for r in runs]
        med = statistics.median(secs)
        key = label(name, t)
        results[key] = {
            "threads": t,
            "seconds_median": med,
            "seconds_all": secs,
            "mb_per_s": raw_bytes / 1e6 / med,
            "mb_per_s_per_thread": raw_bytes / 1e6 / med / t,
            "peak_rss_mb": statistics.median(r["peak_rss"] for r in runs) / 1e6,
            "rss_growth_mb": statistics.median(r["peak_rss"] - r["base_rss"] for r in runs) / 1e6,
            "out_mb": runs[0]["out_bytes"] / 1e6,
        }
        print(f"  {key:34s} {med:8.3f} s  {results[key]['mb_per_s']:8.1f} MB/s  "
              f"peak {results[key]['peak_rss_mb']:7.0f} MB", flush=True)

    r = results
    out_mb = r["neurocube_indexed"]["out_mb"]
    noindex_limit = r["limit_rapidgzip_noindex"]["mb_per_s"]
    limit = max(r["limit_parallel_inflate_igz"]["mb_per_s"],
                r["limit_parallel_inflate_rapidgzip"]["mb_per_s"], noindex_limit)
    one = "@1t" if threads != 1 else ""
    two = "@2t" if threads != 2 else ""
    ratios = {
        "first_read_load_vs_noindex_limit": r["neurocube_first"]["mb_per_s"] / noindex_limit,
        "first_read_values_vs_noindex_limit": r["neurocube_first_compute"]["mb_per_s"]
        / noindex_limit,
        "first_read_cache_vs_noindex_limit": r["neurocube_first_cache"]["mb_per_s"]
        / noindex_limit,
        "indexed_load_vs_all_cores_limit": r["neurocube_indexed"]["mb_per_s"] / limit,
        "indexed_values_vs_all_cores_limit": r["neurocube_indexed_compute"]["mb_per_s"] / limit,
        "indexed_cache_vs_all_cores_limit": r["neurocube_indexed_cache"]["mb_per_s"] / limit,
        "first_read_2_threads_vs_1": r[f"neurocube_first{two}"]["mb_per_s"]
        / r[f"neurocube_first{one}"]["mb_per_s"],
        "noindex_limit_2_threads_vs_1": r[f"limit_rapidgzip_noindex{two}"]["mb_per_s"]
        / r[f"limit_rapidgzip_noindex{one}"]["mb_per_s"],
        "indexed_load_2_threads_vs_1": r[f"neurocube_indexed{two}"]["mb_per_s"]
        / r[f"neurocube_indexed{one}"]["mb_per_s"],
        "verified_vs_unverified_load": r["neurocube_indexed"]["mb_per_s"]
        / r["neurocube_indexed_noverify"]["mb_per_s"],
        "verified_vs_unverified_values": r["neurocube_indexed_compute"]["mb_per_s"]
        / r["neurocube_indexed_compute_noverify"]["mb_per_s"],
        "indexed_vs_nibabel_volume_loop": r["neurocube_indexed"]["mb_per_s"]
        / r["nibabel_volume_loop"]["mb_per_s"],
        "first_read_vs_zlib_stream": r["neurocube_first"]["mb_per_s"]
        / r["limit_zlib_stream"]["mb_per_s"],
        "indexed_vs_laion_streaming": r["neurocube_indexed"]["mb_per_s"]
        / r["laion_streaming"]["mb_per_s"],
        "last_trial_vs_first_trial_time": r["neurocube_trial_last"]["seconds_median"]
        / r["neurocube_trial_first"]["seconds_median"],
        "indexed_rss_growth_minus_output_mb": r["neurocube_indexed"]["rss_growth_mb"] - out_mb,
        "first_rss_growth_minus_output_mb": r["neurocube_first"]["rss_growth_mb"] - out_mb,
        "first_values_rss_growth_minus_2x_output_mb": r["neurocube_first_compute"]["rss_growth_mb"]
        - 2 * out_mb,
        "indexed_values_rss_growth_minus_2x_output_mb":
        r["neurocube_indexed_compute"]["rss_growth_mb"] - 2 * out_mb,
    }
    # The same speed ratios paired by round: the median over rounds of the ratio within each
    # round. Each round runs every method once, close in time, so a slow spell of the VM that
    # spans some rounds moves both sides of a round alike; a ratio of medians mixes rounds.
    def paired(method: str, *references: str) -> float:
        """Median over rounds of (fastest reference's seconds / method's seconds)."""
        per_round = zip(r[method]["seconds_all"], *(r[ref]["seconds_all"] for ref in references),
                        strict=True)
        return statistics.median(min(refs) / secs for secs, *refs in per_round)

    all_limits = ("limit_parallel_inflate_igz", "limit_parallel_inflate_rapidgzip",
                  "limit_rapidgzip_noindex")
    paired_ratios = {
        "first_read_load_vs_noindex_limit": paired("neurocube_first", "limit_rapidgzip_noindex"),
        "first_read_values_vs_noindex_limit": paired("neurocube_first_compute",
                                                     "limit_rapidgzip_noindex"),
        "first_read_cache_vs_noindex_limit": paired("neurocube_first_cache",
                                                    "limit_rapidgzip_noindex"),
        "indexed_load_vs_all_cores_limit": paired("neurocube_indexed", *all_limits),
        "indexed_values_vs_all_cores_limit": paired("neurocube_indexed_compute", *all_limits),
        "indexed_cache_vs_all_cores_limit": paired("neurocube_indexed_cache", *all_limits),
        "first_read_2_threads_vs_1": paired(f"neurocube_first{two}", f"neurocube_first{one}"),
        "verified_vs_unverified_load": paired("neurocube_indexed", "neurocube_indexed_noverify"),
        "verified_vs_unverified_values": paired("neurocube_indexed_compute",
                                                "neurocube_indexed_compute_noverify"),
    }
    targets = {
        "first_read_load_vs_noindex_limit": (">=", 0.8),
        "first_read_values_vs_noindex_limit": (">=", 0.8),
        "first_read_cache_vs_noindex_limit": (">=", 0.8),
        "indexed_load_vs_all_cores_limit": (">=", 0.9),
        "indexed_values_vs_all_cores_limit": (">=", 0.8),
        "indexed_cache_vs_all_cores_limit": (">=", 0.8),
        "first_read_2_threads_vs_1": (">=", 1.6),
        "verified_vs_unverified_load": (">=", 0.95),
        "verified_vs_unverified_values": (">=", 0.95),
        "indexed_vs_nibabel_volume_loop": (">=", 3.0),
        "last_trial_vs_first_trial_time": ("<=", 2.0),
        "indexed_rss_growth_minus_output_mb": ("<=", 200.0),
        "first_rss_growth_minus_output_mb": ("<=", 200.0),
        "first_values_rss_growth_minus_2x_output_mb": ("<=", 200.0),
        "indexed_values_rss_growth_minus_2x_output_mb": ("<=", 200.0),
    }
    print("\n| method | threads | median s | MB/s (uncompressed) | MB/s per thread | peak RSS MB "
          "| RSS growth MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, v in r.items():
        print(f"| {name} | {v['threads']} | {v['seconds_median']:.3f} | {v['mb_per_s']:.1f} | "
              f"{v['mb_per_s_per_thread']:.1f} | {v['peak_rss_mb']:.0f} | "
              f"{v['rss_growth_mb']:.0f} |")
    verdicts = judge(ratios, targets, digits=2)
    print("\nthe same speed ratios paired by round (median of the ratios within each round):")
    for name, value in paired_ratios.items():
        print(f"  {name}: {value:.2f}")
    report = {
        "benchmark": "nifti",
        "file": {"grid": list(grid), "trials": n_trials, "uncompressed_mb": raw_bytes / 1e6,
                 "gzip_mb": gz_bytes / 1e6, "output_mb": out_mb},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_at_end": os.getloadavg()},
        "repeats": repeats,
        "results": r,
        "ratios": ratios,
        "targets_met": verdicts,
        "paired_ratios": paired_ratios,
        "paired_ratios_note": "median over rounds of the ratio within each round (the targets "
                              "are judged on the ratios of medians above)",
    }
    write_report(args.out, report)
    return 0


def _verification_cost(args, betas, mask_path, cache, threads, raw_bytes, repeats) -> int:
    """Indexed reads with and without per-volume checksums, in alternating pairs.

    Each pair runs both variants back to back in fresh processes, the order swapped every
    pair, so a slow spell of the machine touches both alike. The ratio of medians is the
    wall-clock cost; the CPU-seconds ratio is the work the checks add (less noisy on a
    shared machine).
    """
    if not (cache / "gzindex").exists():
        run_worker("neurocube_first", betas, mask_path, cache, threads)
    pairs = [("neurocube_indexed", "neurocube_indexed_noverify"),
             ("neurocube_indexed_compute", "neurocube_indexed_compute_noverify")]
    runs: dict[str, list[dict]] = {name: [] for pair in pairs for name in pair}
    for k in range(repeats):
        print(f"pair {k + 1} of {repeats}", flush=True)
        for pair in pairs:
            for name in pair if k % 2 == 0 else pair[::-1]:
                runs[name].append(run_worker(name, betas, mask_path, cache, threads))
    results = {}
    for name, rs in runs.items():
        secs = [r["seconds"] for r in rs]
        cpus = [r["cpu_seconds"] for r in rs]
        checks = [r["check_cpu_seconds"] for r in rs]
        results[name] = {"seconds_median": statistics.median(secs), "seconds_all": secs,
                         "cpu_seconds_median": statistics.median(cpus), "cpu_seconds_all": cpus,
                         "check_cpu_seconds_median": statistics.median(checks),
                         "mb_per_s": raw_bytes / 1e6 / statistics.median(secs)}
        print(f"  {name:38s} {results[name]['seconds_median']:.3f} s  "
              f"cpu {results[name]['cpu_seconds_median']:.3f} s  "
              f"in checks {results[name]['check_cpu_seconds_median']:.3f} s", flush=True)
    ratios = {}
    for verified, plain in pairs:
        what = "values" if verified.endswith("compute") else "load"
        v, u = runs[verified], runs[plain]
        ratios[f"verified_vs_unverified_{what}"] = (
            results[verified]["mb_per_s"] / results[plain]["mb_per_s"])
        ratios[f"verified_vs_unverified_{what}_pairwise_median"] = statistics.median(
            b["seconds"] / a["seconds"] for a, b in zip(v, u, strict=True))
        ratios[f"unverified_vs_verified_{what}_cpu"] = statistics.median(
            b["cpu_seconds"] / a["cpu_seconds"] for a, b in zip(v, u, strict=True))
        # the checks' own CPU time, counted inside each verified run: the throughput left if
        # they were removed from the reader threads (spread over `threads` cores)
        ratios[f"check_cpu_share_{what}"] = statistics.median(
            a["check_cpu_seconds"] / a["cpu_seconds"] for a in v)
        ratios[f"verified_throughput_share_{what}"] = statistics.median(
            1 - a["check_cpu_seconds"] / threads / a["seconds"] for a in v)
    targets = {"verified_vs_unverified_load": (">=", 0.95),
               "verified_vs_unverified_values": (">=", 0.95),
               "verified_throughput_share_load": (">=", 0.95),
               "verified_throughput_share_values": (">=", 0.95)}
    verdicts = judge(ratios, targets, digits=3)
    write_report(args.out, {
        "benchmark": "nifti-verification",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_at_end": os.getloadavg()},
        "threads": threads, "pairs": repeats, "results": results, "ratios": ratios,
        "targets_met": verdicts,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
