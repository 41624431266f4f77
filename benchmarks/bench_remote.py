"""Masked reads of a remote .nii.gz over S3 with a per-request latency: neurocube vs the usual ways.

Generates a session-like file (81x96x81 float32 x 400 trials by default: ~1 GB
uncompressed; zeros outside a brain-shaped ellipsoid and noise inside, so gzip
keeps about a third of it; a real session has ~1,050 trials, and with 200 a
10-trial subset would be a twentieth of the file, the 20 x target out of reach)
and its brain mask, uploads both to a moto S3 server
on 127.0.0.1, and reads them through a counting proxy that adds a latency to
every request (``--latency``, 30 ms by default: a cloud region seen from a
notebook). Each method runs in a fresh subprocess (clean caches, its own peak
RSS, its own temp and cache folders):

- neurocube: first masked read (no index yet; records it), the same read with
  the index present, and a 10-trial subset near the end of the session
  (``ds.data.isel(trial=slice(k, k + 10)).values``) with the index;
- (a) the existing library's way: download the session file (``fs.get`` to a
  temp file), then nibabel load + mask;
- (b) nibabel on a gzip stream over an fsspec file (no download), then mask;
- (c) the transfer limit: the whole object fetched with concurrent ranged GETs
  (``fs.cat_ranges`` over 8 MiB pieces) and nothing else.

For each: bytes the server sent and requests (the proxy's counter), wall time
(median of ``--repeats``; methods run round robin), CPU seconds of the reader and
of the serving process (moto and the proxy share the machine with the reader),
peak RSS of the child, and local disk used (growth of the child's temp and cache
folders over the run). Ratios compare methods of the
same run; targets (issue 10): first read <= 1.2 x the transfer limit's time and
<= 1.02 x its bytes; a 10-trial subset >= 20 x fewer bytes than (a); local disk
used by neurocube <= the index size. Writes ``benchmarks/results/remote.json``
and prints a table.

The server side is moto, patched here (in this process only) so that a ranged GET
reads just its range from moto's object buffer: stock moto reads the whole
object for every range request, a cost real S3 does not have, which would
charge every reader per request rather than per byte. What travels over the
wire, and what the proxy counts, is unchanged.

    python benchmarks/bench_remote.py              # full size (a few minutes)
    python benchmarks/bench_remote.py --quick      # tiny, seconds (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from _report import judge, run_worker, write_report

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

PIECE = 8 << 20  # the transfer limit's range size
SUBSET = 10  # trials in the subset read

# --------------------------------------------------------------------------- workers
# Each worker runs in its own process: `python bench_remote.py --worker NAME` with a JSON
# config on stdin (storage options hold keys: never on the command line).


def _mask_from_url(fs: Any, url: str) -> Any:
    """The brain mask as a boolean grid (NaN outside, non-zero inside), read with fsspec."""
    import gzip

    import nibabel as nib
    import numpy as np

    data = np.asanyarray(nib.Nifti1Image.from_bytes(gzip.decompress(fs.cat(url))).dataobj)
    return np.isfinite(data) & (data != 0)


def worker(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    import dask
    import dask.array as da
    import nibabel as nib
    import numpy as np
    import s3fs
    import xarray  # noqa: F401
    from bench_nifti import _rss_now, _rss_peak

    import neurocube
    from neurocube.sources import nifti  # noqa: F401

    url, mask_url, opts = cfg["url"], cfg["mask_url"], cfg["storage_options"]
    cache, tmp, threads = cfg["cache"], cfg["tmp"], int(cfg["threads"])
    # Warm up what every method pays once per process (imports; dask's first compute imports
    # distributed to look for a client), so the clock measures the read itself.
    da.ones(4, chunks=2).sum().compute()
    out = None
    base = _rss_now()
    cpu0 = os.times()
    t0 = time.perf_counter()
    if name in ("neurocube_first", "neurocube_indexed"):
        ds = neurocube.open_nifti(url, mask=mask_url, storage_options=opts, cache_dir=cache)
        with dask.config.set(scheduler="threads", num_workers=threads):
            out = neurocube.load(ds.data, progress=False).values
    elif name == "neurocube_subset":
        k = int(cfg["subset_start"])
        ds = neurocube.open_nifti(url, mask=mask_url, storage_options=opts, cache_dir=cache)
        with dask.config.set(scheduler="threads", num_workers=threads):
            out = ds.data.isel(trial=slice(k, k + SUBSET)).values
    elif name == "download_nibabel":  # (a)
        fs = s3fs.S3FileSystem(**opts)
        local = Path(tmp) / url.rsplit("/", 1)[1]
        # One streamed GET. (s3fs's concurrent mode first opens an unranged GET for the size
        # and drops it; the proxy, which buffers whole responses, would count that as a second
        # copy of the object, a cost real S3 mostly does not charge.)
        fs.get(url, str(local), max_concurrency=1)
        mask = _mask_from_url(fs, mask_url)
        data = nib.load(str(local)).get_fdata(dtype=np.float32)
        out = np.ascontiguousarray(data[mask].T)  # (trial, voxel), voxels in C order
        del data
    elif name == "nibabel_stream":  # (b)
        import gzip

        fs = s3fs.S3FileSystem(**opts)
        mask = _mask_from_url(fs, mask_url)
        with fs.open(url, "rb") as fh, gzip.GzipFile(fileobj=fh) as gz:
            img = nib.Nifti1Image.from_stream(gz)
            data = np.asanyarray(img.dataobj, dtype=np.float32)
        out = np.ascontiguousarray(data[mask].T)
        del data
    elif name == "transfer_limit":  # (c)
        fs = s3fs.S3FileSystem(**opts)
        size = fs.size(url)
        starts = list(range(0, size, PIECE))
        ends = [min(s + PIECE, size) for s in starts]
        pieces = fs.cat_ranges([url] * len(starts), starts, ends)
        assert sum(len(p) for p in pieces) == size
        del pieces
    else:
        raise SystemExit(f"unknown worker {name}")
    seconds = time.perf_counter() - t0
    cpu1 = os.times()
    result: dict[str, Any] = {"seconds": seconds, "peak_rss": _rss_peak(), "base_rss": base,
                              "cpu_seconds": cpu1.user - cpu0.user + cpu1.system - cpu0.system,
                              "out_bytes": 0, "out_shape": None, "checksum": None}
    if out is not None:
        result.update(out_bytes=int(out.nbytes), out_shape=list(out.shape),
                      checksum=_checksum(out))
    return result


def _checksum(out: Any) -> list[float]:
    import numpy as np

    finite = np.isfinite(out)
    return [float(out[finite].sum(dtype=np.float64)), float(finite.sum())]


# --------------------------------------------------------------------------- server


def _ranged_gets_read_only_their_range() -> None:
    """Make moto serve ``Range: bytes=a-b`` from its object buffer without reading the object.

    Stock moto materialises the whole object for each GET and slices it afterwards, so a
    ranged GET of a 150 MB object costs a 150 MB read on the server: a per-request cost
    that S3 does not have. Here a GET with one plain range hands moto a stand-in value
    that reads only the slice asked for; responses are byte for byte the same.
    """
    from moto.s3.models import FakeKey
    from moto.s3.responses import S3Response

    local = threading.local()
    plain_range = re.compile(r"^bytes=(\d+)-(\d*)$")

    class _Window:
        def __init__(self, key: Any) -> None:
            self.key = key

        def __len__(self) -> int:
            return int(self.key.size)

        def __bool__(self) -> bool:
            return self.key.size > 0

        def __getitem__(self, item: slice) -> bytes:
            start, stop, _ = item.indices(self.key.size)
            with self.key.lock:
                self.key._value_buffer.seek(start)
                return bytes(self.key._value_buffer.read(max(0, stop - start)))

    value_prop = FakeKey.value

    def value_get(self: Any) -> Any:
        if getattr(local, "window", False):
            return _Window(self)
        return value_prop.fget(self)

    FakeKey.value = property(value_get, value_prop.fset)  # type: ignore[method-assign,assignment]
    original_get = S3Response.get_object

    def get_object(self: Any) -> Any:
        m = plain_range.match(self.headers.get("range") or "")
        ok = (m is not None and (not m.group(2) or int(m.group(1)) <= int(m.group(2)))
              and not self._get_param("partNumber"))
        local.window = ok
        try:
            status, headers, body = original_get(self)
        finally:
            local.window = False
        if isinstance(body, _Window) and status != 200:  # not handed to the range slicer
            body = body[:]
        return status, headers, body

    S3Response.get_object = get_object  # type: ignore[method-assign]


def start_s3(latency: float) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """moto on a free loopback port and the counting proxy in front of it."""
    sys.path.insert(0, str(ROOT))
    import logging

    from moto.server import ThreadedMotoServer
    from tests.fixtures.remote import free_port, s3_options, start_proxy

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    _ranged_gets_read_only_their_range()
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    proxy = start_proxy(("127.0.0.1", port))
    proxy.set_latency(latency)
    return server, proxy, s3_options(f"http://127.0.0.1:{port}"), s3_options(proxy.url)


def upload(direct: dict[str, Any], bucket: str, files: dict[str, Path]) -> dict[str, str]:
    import boto3
    import s3fs

    boto3.client(
        "s3", endpoint_url=direct["client_kwargs"]["endpoint_url"], aws_access_key_id=direct["key"],
        aws_secret_access_key=direct["secret"], region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
    fs = s3fs.S3FileSystem(**direct)
    urls = {}
    for key, path in files.items():
        fs.put_file(str(path), f"{bucket}/{key}")
        urls[key] = f"s3://{bucket}/{key}"
    return urls


def check_ranges(options: dict[str, Any], url: str, local: Path) -> None:
    """The patched server answers ranges with the object's bytes (first, middle, past the end)."""
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    data = local.read_bytes()
    size = len(data)
    for start, end in ((0, 352), (size // 2, size // 2 + (3 << 20)), (size - 100, size + 50)):
        got = fs.cat_file(url, start=start, end=end)
        if got != data[start:end]:
            raise RuntimeError(f"server answered bytes {start}-{end} wrongly")
    if fs.cat_file(url) != data:
        raise RuntimeError("server answered the whole object wrongly")


# --------------------------------------------------------------------------- driver


def du(*folders: Path) -> int:
    total = 0
    for folder in folders:
        if folder.exists():
            for dirpath, _, names in os.walk(folder):
                total += sum(os.lstat(os.path.join(dirpath, n)).st_size for n in names)
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small file, one repeat (smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.030, help="seconds added per request")
    parser.add_argument("--trials", type=int, default=None, help="default 400 (40 with --quick)")
    parser.add_argument("--data", type=Path, default=HERE / "data" / "remote")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: results/remote.json (results/remote-quick.json with "
                             "--quick, so a smoke run never replaces the recorded figures)")
    parser.add_argument("--worker", metavar="NAME")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(sys.stdin.read()))))
        return 0

    import numpy as np

    from neurocube.synthetic.session import make_session

    if args.out is None:
        args.out = HERE / "results" / ("remote-quick.json" if args.quick else "remote.json")
    grid = (40, 48, 40) if args.quick else (81, 96, 81)
    n_trials = args.trials or (40 if args.quick else 400)
    if n_trials < SUBSET + 2:
        parser.error(f"--trials must be at least {SUBSET + 2}")
    repeats = 1 if args.quick else args.repeats
    threads = os.cpu_count() or 2
    folder = args.data / f"{'x'.join(map(str, grid))}x{n_trials}"
    session_file = folder / "session.json"
    if not session_file.exists():
        print(f"generating {grid} x {n_trials} session in {folder} ...", flush=True)
        s = make_session(folder, grid=grid, n_trials=n_trials, nan_fraction=0.01)
        session_file.write_text(json.dumps({"betas": str(s.betas), "mask": str(s.brain_mask)}))
    paths = {k: Path(v) for k, v in json.loads(session_file.read_text()).items()}
    raw_bytes = int(np.prod(grid)) * n_trials * 4
    gz_bytes = paths["betas"].stat().st_size
    subset_start = n_trials - SUBSET - 2  # near the end of the session

    load_at_start = os.getloadavg()
    work = folder / "work"
    shutil.rmtree(work, ignore_errors=True)
    cache = work / "cache"
    server, proxy, direct, options = start_s3(args.latency)
    try:
        urls = upload(direct, "neurocube-bench", {
            "sub-01/ses-01/func/betas.nii.gz": paths["betas"],
            "sub-01/anat/brain_mask.nii.gz": paths["mask"],
        })
        betas_url, mask_url = urls.values()
        check_ranges(options, betas_url, paths["betas"])
        betas_key = betas_url.split("/", 3)[3]
        env = dict(os.environ)
        env.pop("NEUROCUBE_INDEX_STORE", None)
        env["AWS_EC2_METADATA_DISABLED"] = "true"
        env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
        env["AWS_CONFIG_FILE"] = os.devnull
        env["NEUROCUBE_PROGRESS"] = "0"
        os.environ["NEUROCUBE_PROGRESS"] = "0"
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p)

        # Expected values of the subset (a local read of the same file).
        import neurocube

        local_ds = neurocube.open_nifti(paths["betas"], mask=paths["mask"],
                                        cache_dir=work / "local-cache")
        expected_subset = _checksum(
            local_ds.data.isel(trial=slice(subset_start, subset_start + SUBSET)).values)
        shutil.rmtree(work / "local-cache", ignore_errors=True)

        methods = ["transfer_limit", "neurocube_first", "neurocube_indexed", "neurocube_subset",
                   "download_nibabel", "nibabel_stream"]
        results: dict[str, dict[str, Any]] = {}
        index_bytes = 0
        # Round robin (every method once per repeat) so a change in the machine's background load
        # over the run touches every method alike; each repeat's first read builds the index
        # that its indexed reads use.
        all_runs: dict[str, list[dict[str, Any]]] = {name: [] for name in methods}
        for rep in range(repeats):
            print(f"repeat {rep + 1}/{repeats}", flush=True)
            for name in methods:
                tmp = work / "tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                cfg = {"url": betas_url, "mask_url": mask_url, "storage_options": options,
                       "cache": str(cache), "tmp": str(tmp), "threads": threads,
                       "subset_start": subset_start}
                run_env = dict(env, TMPDIR=str(tmp), NEUROCUBE_CACHE_DIR=str(cache))
                if name == "neurocube_first":
                    shutil.rmtree(cache, ignore_errors=True)
                elif name.startswith("neurocube") and not (cache / "gzindex").exists():
                    run_worker(__file__, "neurocube_first", stdin=json.dumps(cfg), env=run_env)
                cache.mkdir(parents=True, exist_ok=True)
                before = du(cache, tmp)
                proxy.counter.reset()
                server_cpu = os.times()
                r = run_worker(__file__, name, stdin=json.dumps(cfg), env=run_env)
                after = os.times()  # this process serves: moto and the proxy
                r["server_cpu_seconds"] = (after.user - server_cpu.user
                                           + after.system - server_cpu.system)
                r["bytes_sent"] = proxy.counter.total_bytes
                r["object_bytes_sent"] = proxy.counter.bytes_for(betas_key)
                r["requests"] = proxy.counter.count()
                r["object_gets"] = proxy.counter.count("GET", betas_key)
                r["disk_used"] = du(cache, tmp) - before
                if name == "neurocube_first":
                    index_bytes = du(cache / "gzindex")
                all_runs[name].append(r)
                shutil.rmtree(tmp, ignore_errors=True)
                print(f"  {name:18s} {r['seconds']:8.3f} s  {r['bytes_sent'] / 1e6:9.1f} MB sent  "
                      f"{r['requests']:5d} requests  peak {r['peak_rss'] / 1e6:6.0f} MB  "
                      f"disk {r['disk_used'] / 1e6:7.2f} MB", flush=True)
        for name, runs in all_runs.items():
            secs = [r["seconds"] for r in runs]
            results[name] = {
                "seconds_median": statistics.median(secs),
                "seconds_all": secs,
                "bytes_sent": int(statistics.median(r["bytes_sent"] for r in runs)),
                "object_bytes_sent": int(statistics.median(r["object_bytes_sent"] for r in runs)),
                "requests": int(statistics.median(r["requests"] for r in runs)),
                "object_gets": int(statistics.median(r["object_gets"] for r in runs)),
                "cpu_seconds_median": statistics.median(r["cpu_seconds"] for r in runs),
                "server_cpu_seconds_median": statistics.median(
                    r["server_cpu_seconds"] for r in runs),
                "peak_rss_mb": statistics.median(r["peak_rss"] for r in runs) / 1e6,
                "rss_growth_mb": statistics.median(r["peak_rss"] - r["base_rss"] for r in runs)
                / 1e6,
                "disk_used_bytes": int(max(r["disk_used"] for r in runs)),
                "out_mb": runs[0]["out_bytes"] / 1e6,
                "out_shape": runs[0]["out_shape"],
                "checksum": runs[0]["checksum"],
            }
    finally:
        proxy.server.shutdown()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    r = results
    # Every full read must give the same values; the subset must equal the local read's.
    full = ["neurocube_first", "neurocube_indexed", "download_nibabel", "nibabel_stream"]
    ref = r["download_nibabel"]
    for name in full:
        r[name]["values_ok"] = bool(
            r[name]["out_shape"] == ref["out_shape"]
            and np.allclose(r[name]["checksum"], ref["checksum"], rtol=1e-9))
    r["neurocube_subset"]["values_ok"] = bool(
        np.allclose(r["neurocube_subset"]["checksum"], expected_subset, rtol=1e-9)
        and r["neurocube_subset"]["out_shape"][0] == SUBSET)
    r["transfer_limit"]["values_ok"] = None
    limit, down = r["transfer_limit"], r["download_nibabel"]
    for v in r.values():
        v["time_vs_limit"] = v["seconds_median"] / limit["seconds_median"]
        v["bytes_vs_limit"] = v["bytes_sent"] / limit["bytes_sent"]
        v["time_vs_download"] = v["seconds_median"] / down["seconds_median"]
        v["bytes_fewer_than_download"] = down["bytes_sent"] / max(v["bytes_sent"], 1)

    nc = ("neurocube_first", "neurocube_indexed", "neurocube_subset")
    # Issue 10 §4: a subset may send the compressed bytes of its volumes (estimated here as
    # their share of the file: every volume has the same statistics) + 2 index spacings.
    from neurocube.sources.gzindex_store import SPACING

    subset_budget = gz_bytes * (SUBSET / n_trials + 2 * SPACING / raw_bytes)
    ratios = {
        "first_read_time_vs_limit": r["neurocube_first"]["time_vs_limit"],
        "first_read_bytes_vs_limit": r["neurocube_first"]["bytes_vs_limit"],
        "indexed_read_bytes_vs_object": r["neurocube_indexed"]["object_bytes_sent"] / gz_bytes,
        "subset_bytes_fewer_than_download": r["neurocube_subset"]["bytes_fewer_than_download"],
        "subset_object_bytes_vs_budget": r["neurocube_subset"]["object_bytes_sent"]
        / subset_budget,
        "neurocube_disk_used_vs_index_size": max(r[n]["disk_used_bytes"] for n in nc)
        / max(index_bytes, 1),
        "first_read_time_vs_download": r["neurocube_first"]["time_vs_download"],
        "indexed_read_time_vs_download": r["neurocube_indexed"]["time_vs_download"],
        "subset_time_vs_download": r["neurocube_subset"]["time_vs_download"],
        "first_read_time_vs_nibabel_stream": r["neurocube_first"]["seconds_median"]
        / r["nibabel_stream"]["seconds_median"],
    }
    targets = {
        "first_read_time_vs_limit": ("<=", 1.2),
        "first_read_bytes_vs_limit": ("<=", 1.02),
        "indexed_read_bytes_vs_object": ("<=", 1.05),
        "subset_bytes_fewer_than_download": (">=", 20.0),
        "subset_object_bytes_vs_budget": ("<=", 1.0),
        "neurocube_disk_used_vs_index_size": ("<=", 1.0),
    }

    print(f"\nsession {grid} x {n_trials}: {raw_bytes / 1e6:.0f} MB raw, {gz_bytes / 1e6:.1f} MB "
          f"gzip; index {index_bytes / 1e6:.2f} MB; latency {args.latency * 1e3:.0f} ms/request; "
          f"{threads} cores; median of {repeats}\n")
    print("| method | median s | x limit time | x (a) time | MB sent | x limit bytes | "
          "x fewer bytes than (a) | requests | CPU s | server CPU s | peak RSS MB | "
          "RSS growth MB | disk used MB | values |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    labels = {"download_nibabel": "(a) download_nibabel", "nibabel_stream": "(b) nibabel_stream",
              "transfer_limit": "(c) transfer_limit"}
    for name, v in r.items():
        ok = "" if v["values_ok"] is None else ("ok" if v["values_ok"] else "WRONG")
        print(f"| {labels.get(name, name)} | {v['seconds_median']:.2f} | {v['time_vs_limit']:.2f} "
              f"| {v['time_vs_download']:.2f} | {v['bytes_sent'] / 1e6:.1f} | "
              f"{v['bytes_vs_limit']:.3f} | {v['bytes_fewer_than_download']:.1f} | "
              f"{v['requests']} | {v['cpu_seconds_median']:.2f} | "
              f"{v['server_cpu_seconds_median']:.2f} | {v['peak_rss_mb']:.0f} | "
              f"{v['rss_growth_mb']:.0f} | "
              f"{v['disk_used_bytes'] / 1e6:.2f} | {ok} |")
    verdicts = judge(ratios, targets, digits=3)
    report = {
        "benchmark": "remote",
        "file": {"grid": list(grid), "trials": n_trials, "uncompressed_mb": raw_bytes / 1e6,
                 "gzip_mb": gz_bytes / 1e6, "index_mb": index_bytes / 1e6,
                 "output_mb": r["neurocube_indexed"]["out_mb"],
                 "subset": [subset_start, subset_start + SUBSET],
                 "subset_budget_mb": subset_budget / 1e6},
        "server": {"kind": "moto ThreadedMotoServer on 127.0.0.1 behind a counting proxy",
                   "latency_s_per_request": args.latency, "limit_piece_bytes": PIECE},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_at_start": load_at_start, "load_avg_at_end": os.getloadavg()},
        "repeats": repeats,
        "results": r,
        "ratios": ratios,
        "targets": {k: f"{op} {b}" for k, (op, b) in targets.items()},
        "targets_met": verdicts,
    }
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
