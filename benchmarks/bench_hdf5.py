"""Benchmark: HDF5 spectral caches and TMS trace caches through neurocube vs plain h5py.

Generates, under ``benchmarks/data/hdf5/`` (git-ignored; reused when present):

- a spectral cache with a 160,000-vertex x 300-mode float64 eigenvector matrix
  (gzip level 4, h5py's automatic chunks, as spectralbrain's ``save_hdf5``
  writes it; ~384 MB of values), plus eigenvalues;
- a 10,000-trace offspect cache (2 origins x 5,000 traces of (200, 1) float64,
  30 string attributes each, no compression).

Then times, in the same run, each case in its own fresh subprocess (one
warm-up, median of ``--repeats``; peak RSS of that subprocess):

- spectral, reading all of the eigenvectors, a block of 20,000 vertices, 2,000
  scattered (sorted) vertices, and the first 20 modes: ``open_spectral`` +
  ``.isel`` + ``.values`` (threaded Dask, handle pool cleared every repeat) vs
  ``h5py`` slicing the same dataset;
- traces, "open + attribute table + 100 random traces": ``open_traces`` (all
  attributes decoded into coords; cold, and with its catalog cached from the
  warm-up run) + ``data.isel(trace=...)`` vs one h5py open
  walking every trace's attributes (raw strings, no decoding) and reading the
  100 traces, vs the original library's access pattern re-implemented from
  FORMATS.md §4 (each trace looked up with its own file open, origins walked
  and trace names sorted numerically every time), which is measured on the
  first 1,000 traces of the table (``--original-traces``) because the full
  10,000 take minutes per repeat; its table time is then reported as measured
  on those traces and, separately, scaled linearly to 10,000 (a lower bound:
  the per-lookup cost grows with the index).

Usage: ``python benchmarks/bench_hdf5.py [--vertices 160000] [--modes 300] [--traces 10000]
[--repeats 5]``. Writes ``benchmarks/results/hdf5.json``. The machine is a
shared, noisy 2-core box: quote the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "hdf5"
TRACE_ATTRS = 30


# -- data ------------------------------------------------------------------------------


def generate_spectral(path: Path, n_vertices: int, n_modes: int) -> None:
    import h5py

    if path.exists():
        return
    tmp = path.with_suffix(".tmp")
    rng = np.random.default_rng(0)
    with h5py.File(tmp, "w") as h5:
        dset = h5.create_dataset(
            "eigenvectors", shape=(n_vertices, n_modes), dtype="f8", chunks=True,
            compression="gzip", compression_opts=4,
        )  # fmt: skip
        step = 20_000
        for start in range(0, n_vertices, step):
            stop = min(start + step, n_vertices)
            # smooth-ish values (mesh eigenvectors are smooth), not trivially compressible
            block = np.sin(np.arange(start, stop)[:, None] * (np.arange(n_modes) + 1) * 1e-4)
            dset[start:stop] = block + rng.normal(scale=1e-3, size=block.shape)
        h5.create_dataset("eigenvalues", data=np.linspace(0, 1, n_modes), chunks=True,
                          compression="gzip", compression_opts=4)
        h5.attrs["subject"] = "sub-01"
        h5.attrs["spectralbrain_version"] = "0.1.0"
    os.replace(tmp, path)


def generate_traces(path: Path, n_traces: int) -> None:
    import h5py

    if path.exists():
        return
    tmp = path.with_suffix(".tmp")
    rng = np.random.default_rng(1)
    origins = ("rec1.xdf", "rec2.xdf")
    per_origin = n_traces // len(origins)
    origin_attrs = {
        "channel_labels": "['EDC_L']", "channel_of_interest": "EDC_L", "readin": "tms",
        "readout": "cmep", "samplingrate": "1000", "samples_pre_event": "100",
        "samples_post_event": "100", "subject": "S01", "version": "0.1.3",
        "global_comment": "", "filedate": "2020-09-28 10:47:02",
    }  # fmt: skip
    with h5py.File(tmp, "w") as h5:
        for origin in origins:
            group = h5.create_group(origin)
            for key, value in origin_attrs.items():
                group.attrs[key] = value
            traces = group.create_group("traces")
            for t in range(per_origin):
                dset = traces.create_dataset(str(t), data=rng.normal(size=(200, 1)))
                attrs = dict(origin_attrs)
                attrs.update(
                    id=str(t), event_name="[S  1]", event_sample=str(1000 * t),
                    event_time=f"{t * 1.0:.3f}", onset_shift=str(t % 5 - 2),
                    time_since_last_pulse_in_s="None" if t == 0 else "4.5",
                    reject="False", comment="", examiner="HiWi",
                    stimulation_intensity_mso="54", neg_peak_magnitude_uv="-21.1",
                    pos_peak_latency_ms="37.7", xyz_coords=f"[{t % 50}.0, 22.8, 54.2]",
                )  # fmt: skip
                for k in range(TRACE_ATTRS - len(attrs)):
                    attrs[f"extra_{k}"] = str(k)
                for key, value in attrs.items():
                    dset.attrs[key] = value
    os.replace(tmp, path)


# -- cases (each runs in its own subprocess) ---------------------------------------------

MODE_BLOCK = slice(0, 20)


def vertex_block(n_vertices: int) -> slice:
    """Vertices 40,000:60,000 of 160,000 (the same fraction at other sizes)."""
    return slice(n_vertices // 4, n_vertices // 4 + n_vertices // 8)


def scattered_vertices(n_vertices: int) -> np.ndarray:
    return np.sort(np.random.default_rng(2).choice(n_vertices, 2000, replace=False))


def random_traces(n_traces: int) -> np.ndarray:
    return np.random.default_rng(3).choice(n_traces, 100, replace=False)


def case_spectral(tool: str, what: str, path: str) -> float:
    import h5py

    with h5py.File(path, "r") as h5:
        n_vertices = h5["eigenvectors"].shape[0]
    selection: dict[str, object] = {
        "all": {},
        "vertex_block": {"vertex": vertex_block(n_vertices)},
        "vertex_scattered": {"vertex": scattered_vertices(n_vertices)},
        "mode_block": {"mode": MODE_BLOCK},
    }[what]
    if tool == "neurocube":
        import neurocube
        from neurocube.sources.hdf5_handles import HDF5_POOL

        HDF5_POOL.clear()
        ds = neurocube.open_spectral(path)
        out = ds.eigenvectors.isel(selection).values  # type: ignore[arg-type]
    else:
        with h5py.File(path, "r") as h5:
            dset = h5["eigenvectors"]
            key = (selection.get("vertex", slice(None)), selection.get("mode", slice(None)))
            out = dset[key]
    return float(out[0, 0])


def case_traces(tool: str, path: str, n_original: int) -> float:
    import h5py

    if tool in ("neurocube", "neurocube_cached"):
        import neurocube
        from neurocube.sources.hdf5_handles import HDF5_POOL

        HDF5_POOL.clear()
        # cold: every HDF5 attribute read and decoded; cached: the catalog JSON that the
        # warm-up run stored in neurocube's cache folder (decoding still done every time)
        ds = neurocube.open_traces(path, use_cache=tool == "neurocube_cached")
        picked = random_traces(ds.sizes["trace"])
        values = ds.data.isel(trace=picked).values
        return float(values[0, 0, 0]) + float(ds.onset_shift.values.sum())
    if tool == "h5py":
        table = []
        names = []
        with h5py.File(path, "r", libver="latest", swmr=True) as h5:
            for origin in h5:
                group = h5[origin]["traces"]
                for name in sorted(group, key=int):
                    table.append(dict(group[name].attrs))
                    names.append(f"{origin}/traces/{name}")
            picked = random_traces(len(names))
            values = [h5[names[i]][()] for i in picked]
        return float(values[0][0, 0]) + len(table)
    # the original library's pattern: one open (and a fresh walk) per trace lookup
    def open_read() -> h5py.File:
        return h5py.File(path, "r", libver="latest", swmr=True)

    def lookup(index: int, what: str) -> object:
        count = -1
        with open_read() as h5:
            for origin in h5.keys():
                keys = [str(k) for k in sorted(int(k) for k in h5[origin]["traces"].keys())]
                for position, key in enumerate(keys, start=count + 1):
                    if position == index:
                        dset = h5[origin]["traces"][key]
                        dset.id.refresh()
                        if what == "attrs":
                            attrs = dict(dset.attrs)
                            attrs["origin"] = origin
                            return attrs
                        return np.asanyarray(dset, dtype=float)
                    count = position
        raise IndexError(index)

    with open_read() as h5:
        n_traces = sum(len(h5[o]["traces"]) for o in h5)
    table = [lookup(i, "attrs") for i in range(min(n_original, n_traces))]
    values = [lookup(int(i), "data") for i in random_traces(n_traces)]
    return float(values[0][0, 0]) + len(table)  # type: ignore[index]


def run_case(args: argparse.Namespace) -> None:
    import resource

    def once() -> float:
        if args.case == "spectral":
            return case_spectral(args.tool, args.what, args.path)
        return case_traces(args.tool, args.path, args.original_traces)

    once()  # warm-up (imports, page cache)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = {"times_s": times, "median_s": statistics.median(times), "peak_rss_mb": peak_mb}
    print(json.dumps(summary))


def measure(case: list[str], repeats: int, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--run", *case, "--repeats", str(repeats), *extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vertices", type=int, default=160_000)
    parser.add_argument("--modes", type=int, default=300)
    parser.add_argument("--traces", type=int, default=10_000)
    parser.add_argument("--original-traces", type=int, default=1_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--run", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.run:
        args.case, args.tool, args.path = args.run[0], args.run[1], args.run[2]
        args.what = args.run[3] if len(args.run) > 3 else ""
        run_case(args)
        return

    DATA.mkdir(parents=True, exist_ok=True)
    os.environ["NEUROCUBE_CACHE_DIR"] = str(DATA / "neurocube-cache")  # inherited by the cases
    spectral = DATA / f"spectral_{args.vertices}x{args.modes}.h5"
    traces = DATA / f"traces_{args.traces}.hdf5"
    t0 = time.perf_counter()
    generate_spectral(spectral, args.vertices, args.modes)
    generate_traces(traces, args.traces)
    print(f"data ready in {time.perf_counter() - t0:.1f} s "
          f"({spectral.stat().st_size / 1e6:.0f} MB + {traces.stat().st_size / 1e6:.0f} MB)")

    results: dict[str, dict] = {}
    extra = ["--original-traces", str(args.original_traces)]
    for what in ("all", "vertex_block", "vertex_scattered", "mode_block"):
        results[f"spectral_{what}"] = {
            tool: measure(["spectral", tool, str(spectral), what], args.repeats, extra)
            for tool in ("h5py", "neurocube")
        }
    results["traces_open_table_100"] = {
        tool: measure(["traces", tool, str(traces)], args.repeats, extra)
        for tool in ("h5py", "neurocube", "neurocube_cached", "original_pattern")
    }
    original = results["traces_open_table_100"]["original_pattern"]
    original["note"] = (
        f"attribute table measured on the first {args.original_traces} of {args.traces} traces"
    )

    print(f"\n{'case':<26}{'tool':<18}{'median s':>10}{'peak MB':>10}{'h5py/tool':>11}")
    for case, tools in results.items():
        base = tools["h5py"]["median_s"]
        for tool, r in tools.items():
            ratio = base / r["median_s"]
            r["speed_vs_h5py"] = ratio
            print(f"{case:<26}{tool:<18}{r['median_s']:>10.3f}{r['peak_rss_mb']:>10.0f}{ratio:>11.2f}")
    per_lookup = original["median_s"] / (args.original_traces + 100)
    scaled = per_lookup * (args.traces + 100)
    nc = results["traces_open_table_100"]["neurocube"]["median_s"]
    print(f"\noriginal pattern scaled to {args.traces} traces: >= {scaled:.1f} s "
          f"({scaled / nc:.0f} x neurocube's {nc:.2f} s)")
    original["scaled_to_all_traces_s_lower_bound"] = scaled

    out = {
        "benchmark": "hdf5",
        "config": {
            "vertices": args.vertices, "modes": args.modes, "traces": args.traces,
            "original_traces_measured": args.original_traces, "repeats": args.repeats,
            "spectral_file_mb": round(spectral.stat().st_size / 1e6, 1),
            "traces_file_mb": round(traces.stat().st_size / 1e6, 1),
            "cpu_count": os.cpu_count(),
            "note": "shared noisy 2-core machine; each case in its own subprocess, one warm-up, "
                    "median of repeats; speed_vs_h5py = h5py median / tool median (>1 is faster)",
        },
        "results": results,
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "hdf5.json").write_text(json.dumps(out, indent=1))
    print(f"\nwrote {HERE / 'results' / 'hdf5.json'}")


if __name__ == "__main__":
    main()
