"""``neurocube demo``: what neurocube is for, on a small generated bucket, in under a minute.

Writes a synthetic single-trial-betas bucket (one subject, two sessions, the
``laion_fmri`` layout), then: opens the subject (file names and headers
only), selects a ROI with a noise-ceiling threshold over both sessions (trials
labelled by session and image), averages the repeats of each image, reads the
selection twice (the first read streams the ``.nii.gz`` files and records their
seek indexes; the second reads through them), caches it and reopens the cache
in a fresh Python process, and writes a map back to NIfTI. Each figure printed
says what it measures.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["register", "run_demo"]

DESCRIPTION = (
    "Generate a small synthetic single-trial-betas bucket (one subject, two sessions) and show, "
    "with a figure for each step: opening a subject (names and headers only), a ROI + "
    "noise-ceiling selection over both sessions with its trial labels, repeats averaged per "
    "image, the first read (streams the .nii.gz, records a seek index) against the indexed read, "
    "a cache reopened in a fresh process, and a map written back to NIfTI."
)

ROI = "face"
NC_THRESHOLD = 15.0
CACHE_KEY = "demo-face-nc15"


def _positive_trials(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of trials, got {text!r}"
        ) from None
    if value < 8:
        raise argparse.ArgumentTypeError(
            f"at least 8 trials per session are needed (some images are shown twice), got {value}"
        )
    if value > 5000:
        raise argparse.ArgumentTypeError(f"at most 5000 trials keep the demo short, got {value}")
    return value


def register(subparsers: Any) -> None:
    """Add the ``demo`` subcommand."""
    parser = subparsers.add_parser(
        "demo", help="tell neurocube's story on a generated bucket (under a minute)",
        description=DESCRIPTION,
    )  # fmt: skip
    parser.add_argument(
        "--folder", type=Path, default=None,
        help="folder to write the example into, in a new subfolder (default: a temporary folder, "
        "removed at the end)",
    )  # fmt: skip
    parser.add_argument("--trials", type=_positive_trials, default=60,
                        help="trials per session")  # fmt: skip

    def one_line_error(message: str) -> None:  # argparse's error, without the usage block
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)

    parser.error = one_line_error
    parser.set_defaults(func=lambda args: run_demo(args.folder, n_trials=args.trials))


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def _usable_folder(folder: Path) -> str | None:
    """Return why ``folder`` cannot take the demo's files, or None if it can."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".neurocube-probe-")
        probe.close()
    except OSError as exc:
        return f"cannot write into --folder {folder} ({exc.strerror or type(exc).__name__})"
    return None


def run_demo(folder: Path | None = None, *, n_trials: int = 60, out: Any = None) -> int:
    """Generate a bucket and walk through neurocube's main uses; print each figure.

    Returns 0, or 2 (with a one-line message on stderr) when ``folder`` cannot be written.
    """
    if n_trials < 8:
        print(f"neurocube demo: error: at least 8 trials per session are needed, got {n_trials}",
              file=sys.stderr)  # fmt: skip
        return 2
    if folder is not None:
        problem = _usable_folder(Path(folder))
        if problem:
            print(f"neurocube demo: error: {problem}", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="neurocube-demo-") as tmp:
        work = Path(tempfile.mkdtemp(prefix="neurocube-demo-", dir=folder)) if folder else Path(tmp)
        return _story(work, n_trials, out or sys.stdout, keep=folder is not None)


def _story(work: Path, n_trials: int, out: Any, *, keep: bool) -> int:
    import nibabel as nib
    import numpy as np

    import neurocube
    from neurocube import config
    from neurocube.io import save_nifti
    from neurocube.sources import gzindex
    from neurocube.synthetic.bucket import make_bucket

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    cache = work / "cache"
    previous = os.environ.get(config.CACHE_ENV)
    os.environ[config.CACHE_ENV] = str(cache)  # the demo's cache and indexes stay in its folder
    try:
        root = work / "bucket"
        t0 = time.perf_counter()
        truth = make_bucket(root, subjects=1, sessions=2, trials=n_trials, grid=(32, 38, 28),
                            seed=0, stimuli=False, surface_rois=False, freesurfer=False,
                            full_resolution=False)  # fmt: skip
        n_files = sum(1 for p in root.rglob("*") if p.is_file())
        say(f"1. Generated a synthetic bucket in {root} ({time.perf_counter() - t0:.1f} s): "
            f"{n_files} files, one subject, two sessions of {n_trials} trials.")  # fmt: skip

        t0 = time.perf_counter()
        sub = neurocube.open_subject(root, "sub-01")
        sessions = sub.sessions
        say(f"\n2. Opened sub-01 in {1000 * (time.perf_counter() - t0):.0f} ms, reading file "
            "names and headers only:")  # fmt: skip
        say(f"   sessions: {', '.join(sessions)}")
        say(f"   functional grid: {sub.grid_shape}, brain voxels: {sub.n_voxels()}")
        say(f"   ROIs by category: {sub.roi_categories()}")

        t0 = time.perf_counter()
        ds = sub.betas(sessions, roi=ROI, nc_threshold=NC_THRESHOLD)
        n_trial, n_voxel = ds.sizes["trial"], ds.sizes["voxel"]
        say(f"\n3. Selected the {ROI!r} ROIs' voxels with a noise ceiling >= {NC_THRESHOLD:g} % "
            f"in both sessions ({1000 * (time.perf_counter() - t0):.0f} ms: masks and noise "
            "ceilings read, no betas):")  # fmt: skip
        say(f"   {n_trial} trials x {n_voxel} voxels, {ds.betas.nbytes / 1e6:.2f} MB once "
            f"computed; chunks of {ds.betas.chunks[0][0]} trials")  # fmt: skip
        labels = ds.betas.coords.to_dataset().reset_coords()[["session", "image_name"]]
        table = labels.to_dataframe().head(4).to_string(index=True)
        say("   the first trials and their labels:")
        for line in table.splitlines():
            say(f"     {line}")

        by_image = ds.betas.groupby("image_name").mean()
        repeats = ds.betas.image_name.to_series().value_counts()
        say(f"\n4. Averaged the repeats of each image (lazily, one group-by): "
            f"{by_image.sizes['image_name']} images from {n_trial} trials; "
            f"{int((repeats > 1).sum())} images were shown more than once.")  # fmt: skip

        gzindex.reset_handles()
        t0 = time.perf_counter()
        first = ds.betas.values
        t_first = time.perf_counter() - t0
        gzindex.reset_handles()
        t0 = time.perf_counter()
        second = ds.betas.values
        t_second = time.perf_counter() - t0
        assert np.array_equal(first, second, equal_nan=True)
        session_mb = sum(p.stat().st_size for p in root.rglob("*SingletrialBetas*.nii.gz")) / 1e6
        say(f"\n5. Read the selection ({session_mb:.1f} MB of gzipped betas in two sessions):")
        say(f"   first read, streams each .nii.gz once and records its seek index: {t_first:.2f} s")
        say(f"   second read, straight to the trials through the index:           {t_second:.2f} s")
        say(f"   same values both times; indexes in {cache / 'gzindex'}")

        t0 = time.perf_counter()
        neurocube.cache(ds, key=CACHE_KEY, progress=False)
        t_cache = time.perf_counter() - t0
        script = (
            "import time; t0 = time.perf_counter(); import neurocube; "
            f"ds = neurocube.open_cached({CACHE_KEY!r}); v = ds.betas.values; "
            "print(ds.sizes['trial'], ds.sizes['voxel'], float(abs(v[v == v]).sum()), "
            "time.perf_counter() - t0)"
        )
        env = {**os.environ, config.CACHE_ENV: str(cache)}
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              env=env, timeout=120, check=True)  # fmt: skip
        trials_back, voxels_back, total, t_reopen = proc.stdout.split()
        same = (int(trials_back), int(voxels_back)) == (n_trial, n_voxel) and np.isclose(
            float(total), float(np.nansum(np.abs(first)))
        )
        say(f"\n6. Cached the selection as {CACHE_KEY!r} ({t_cache:.2f} s to compute and write), "
            f"then reopened it in a fresh Python process with neurocube.open_cached: "
            f"{trials_back} trials x {voxels_back} voxels read back in {float(t_reopen):.2f} s "
            f"(import included), {'identical' if same else 'DIFFERENT'} values.")  # fmt: skip

        mean_map = ds.betas.mean("trial")
        volume = np.full(sub.grid_shape, np.nan, dtype=np.float32)
        i, j, k = (np.asarray(ds[c].values, dtype=np.int64) for c in ("i", "j", "k"))
        volume[i, j, k] = np.nanmean(first, axis=0)
        target = work / "sub-01_desc-faceMeanBeta.nii.gz"
        affine = np.asarray(ds.attrs.get("affine", truth.subjects["sub-01"].affine))
        save_nifti(target, volume, affine)
        image: Any = nib.load(str(target))
        back = np.asarray(image.dataobj, dtype=np.float64)
        written = int(np.isfinite(back).sum())
        same_map = np.allclose(back[i, j, k], mean_map.values, rtol=1e-4, atol=1e-6,
                               equal_nan=True)  # float32 on disk
        say(f"\n7. Wrote the mean beta of each selected voxel back to NIfTI: {target.name} "
            f"(grid {back.shape}, {written} voxels with a value, NaN elsewhere); nibabel reads "
            f"back {'the same map' if same_map else 'A DIFFERENT MAP'}.")  # fmt: skip
        say(f"\nPeak memory of this process: {_peak_rss_mb():.0f} MB."
            + (f" Files kept in {work}." if keep else ""))  # fmt: skip
    finally:
        gzindex.reset_handles()
        if previous is None:
            os.environ.pop(config.CACHE_ENV, None)
        else:
            os.environ[config.CACHE_ENV] = previous
    return 0
