"""A synthetic single-trial betas bucket in the ``laion_fmri`` layout (docs/fmri.md).

:func:`make_bucket` writes a small but complete bucket (betas, trial tables,
noise ceilings, R² map, anatomical masks, ROIs as volume / GIFTI / FreeSurfer
label files in category folders, a FreeSurfer folder, stimuli HDF5/CSV files)
and returns the ground truth it was built from (:class:`SyntheticBucket`).
Everything is drawn from one seeded generator, so the same arguments give the
same bytes.

Betas are written volume by volume (one trial at a time), so a bucket whose
sessions are larger than memory can be generated; uncompressed sessions
(``compress=False``) are written at disk speed.

Examples
--------
>>> import tempfile
>>> from neurocube.synthetic.bucket import make_bucket
>>> truth = make_bucket(tempfile.mkdtemp(), subjects=1, sessions=2, trials=12, grid=(6, 7, 5))
>>> sorted(truth.subjects)
['sub-01']
>>> truth.subjects["sub-01"].sessions
['ses-01', 'ses-02']
"""

from __future__ import annotations

import gzip
import io
import itertools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from neurocube.io._atomic import atomic_path

__all__ = [
    "DEFAULT_ROIS",
    "SubjectTruth",
    "SyntheticBucket",
    "make_bucket",
    "write_nifti_volumes",
]

#: ROI categories and names written by default (two categories, several ROIs each).
DEFAULT_ROIS: dict[str, tuple[str, ...]] = {
    "face": ("FFA1", "FFA2", "OFA"),
    "place": ("PPA", "OPA"),
}

_GLM = "derivatives/glmsingle-tedana"
_TASK = "task-images"


@dataclass
class SubjectTruth:
    """What one synthetic subject was built from (all volumes are 3-D, on the functional grid)."""

    subject: str
    grid: tuple[int, int, int]
    affine: np.ndarray
    brain_mask: np.ndarray
    r2mean: np.ndarray
    nan_voxels: np.ndarray
    rois: dict[str, np.ndarray]
    roi_categories: dict[str, list[str]]
    noise_ceilings: dict[str, np.ndarray]
    subject_noise_ceilings: dict[str, np.ndarray]
    trials: dict[str, pd.DataFrame]
    betas_paths: dict[str, Path]

    @property
    def sessions(self) -> list[str]:
        """Session ids in order."""
        return list(self.trials)


@dataclass
class SyntheticBucket:
    """A generated bucket and its ground truth."""

    root: Path
    subjects: dict[str, SubjectTruth]
    images: pd.DataFrame
    embedding_models: list[str] = field(default_factory=list)


def make_bucket(
    root: str | os.PathLike[str],
    *,
    subjects: int | Sequence[str] = 2,
    sessions: int = 3,
    trials: int = 40,
    grid: tuple[int, int, int] = (10, 12, 9),
    vary_grid: bool = True,
    rois: Mapping[str, Sequence[str]] | None = None,
    n_shared: int = 6,
    shared_repeats: int = 2,
    nan_fraction: float = 0.05,
    compress: bool = True,
    compresslevel: int = 1,
    dtype: str = "float32",
    anatomical: bool = True,
    full_resolution: bool = True,
    surface_rois: bool = True,
    freesurfer: bool = True,
    stimuli: bool = True,
    embedding_models: Sequence[str] = ("CLIP", "DINOv2"),
    embedding_dim: int = 8,
    segmentation_size: int = 16,
    seed: int = 0,
) -> SyntheticBucket:
    """Write a synthetic bucket under ``root`` and return its ground truth.

    Parameters
    ----------
    root
        Folder to write into (created if needed).
    subjects
        How many subjects (``sub-01``, ``sub-02``, ...) or their ids.
    sessions
        Sessions per subject (``ses-01`` ...).
    trials
        Trials (volumes) per session.
    grid
        Functional grid of the first subject. With ``vary_grid`` the n-th
        subject gets ``n`` more voxels along x, so subjects differ in grid.
    vary_grid
        See ``grid``.
    rois
        ``{category: [roi names]}``; :data:`DEFAULT_ROIS` if None.
    n_shared
        Number of shared images; each is shown ``shared_repeats`` times per
        session (repeated images). The other trials show unique images.
    shared_repeats
        See ``n_shared``.
    nan_fraction
        Fraction of brain voxels the "GLM did not fit": NaN in every trial of
        every session and in the noise ceilings.
    compress
        Write ``.nii.gz`` (True) or ``.nii`` betas.
    compresslevel
        gzip level for the betas (1 keeps generation fast).
    dtype
        ``"float32"`` or ``"int16"`` (scaled with ``scl_slope``/``scl_inter``).
    anatomical, full_resolution, surface_rois, freesurfer, stimuli
        Which optional parts of the bucket to write.
    embedding_models
        One ``desc-<model>_embeddings.h5`` per name.
    embedding_dim
        Width of the embeddings.
    segmentation_size
        Height and width of the segmentation masks.
    seed
        Seed of the one random generator everything is drawn from.

    Returns
    -------
    SyntheticBucket
        The root and, per subject, the masks, ROI volumes, noise ceilings and
        trial tables that were written.
    """
    if dtype not in {"float32", "int16"}:
        raise ValueError(f"dtype must be 'float32' or 'int16', got {dtype!r}")
    if trials < 1 or sessions < 1:
        raise ValueError("need at least one session and one trial")
    root_path = Path(root)
    root_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    subject_ids = (
        [f"sub-{i + 1:02d}" for i in range(subjects)]
        if isinstance(subjects, int)
        else [str(s) for s in subjects]
    )
    roi_spec = {str(k): [str(n) for n in v] for k, v in (rois or DEFAULT_ROIS).items()}
    n_shared_trials = min(trials, n_shared * shared_repeats)
    n_unique_per_session = trials - n_shared_trials
    images = _image_table(n_shared, n_unique_per_session, sessions, len(subject_ids), subject_ids)

    truths: dict[str, SubjectTruth] = {}
    for s_index, subject in enumerate(subject_ids):
        sub_grid = (grid[0] + (s_index if vary_grid else 0), grid[1], grid[2])
        truths[subject] = _make_subject(
            root_path,
            subject,
            s_index,
            sub_grid,
            rng,
            roi_spec=roi_spec,
            sessions=sessions,
            trials=trials,
            images=images,
            n_shared=n_shared,
            shared_repeats=shared_repeats,
            nan_fraction=nan_fraction,
            compress=compress,
            compresslevel=compresslevel,
            dtype=dtype,
            anatomical=anatomical,
            full_resolution=full_resolution,
            surface_rois=surface_rois,
            freesurfer=freesurfer,
        )
    models: list[str] = []
    if stimuli:
        models = list(embedding_models)
        _write_stimuli(root_path, images, rng, models, embedding_dim, segmentation_size)
    return SyntheticBucket(root_path, truths, images, models)


# ----------------------------------------------------------------------------------------------
# NIfTI writing


def _nifti_header(
    shape: tuple[int, ...], affine: np.ndarray, dtype: np.dtype, slope: float, inter: float
) -> bytes:
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header.set_sform(affine, code=1)
    header.set_qform(affine, code=1)
    header.set_xyzt_units("mm", "sec")
    header["scl_slope"] = slope
    header["scl_inter"] = inter
    header.set_data_offset(352)
    return bytes(header.binaryblock) + b"\x00\x00\x00\x00"  # no extensions


def write_nifti_volumes(
    path: str | os.PathLike[str],
    volumes: Iterable[np.ndarray] | np.ndarray,
    affine: np.ndarray,
    *,
    n_volumes: int | None = None,
    dtype: str = "float32",
    slope: float = 1.0,
    inter: float = 0.0,
    compresslevel: int = 1,
) -> Path:
    """Write a 3-D or 4-D NIfTI-1 file one volume at a time (atomically).

    Parameters
    ----------
    path
        Destination; ``.nii.gz`` is gzip-compressed (``mtime=0``, so the bytes
        are reproducible), ``.nii`` is written raw.
    volumes
        A 3-D array (one volume, written as a 3-D image) or an iterable of
        3-D arrays (written as a 4-D image with ``n_volumes`` volumes). Values
        are stored as ``(value - inter) / slope`` in ``dtype``.
    affine
        4x4 voxel-to-scanner matrix.
    n_volumes
        Number of volumes when ``volumes`` is an iterator.
    dtype, slope, inter, compresslevel
        Storage type, scaling and gzip level.

    Returns
    -------
    pathlib.Path
        The written path.
    """
    out = Path(path)
    stored = np.dtype(dtype).newbyteorder("<")
    iterable: Iterable[np.ndarray]
    if isinstance(volumes, np.ndarray):
        if volumes.ndim == 3:
            shape: tuple[int, ...] = volumes.shape
            iterable = [volumes]
        else:
            shape = volumes.shape
            iterable = (volumes[..., t] for t in range(volumes.shape[3]))
    else:
        iterator = iter(volumes)
        first = np.asarray(next(iterator))
        count = n_volumes if n_volumes is not None else len(volumes)  # type: ignore[arg-type]
        shape = (*first.shape, count)
        iterable = itertools.chain([first], iterator)
    header = _nifti_header(shape, affine, stored, slope, inter)
    with atomic_path(out) as tmp, open(tmp, "wb") as raw:
        sink: io.BufferedIOBase | gzip.GzipFile
        sink = (
            gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=compresslevel, mtime=0)
            if out.name.endswith(".gz")
            else raw
        )
        sink.write(header)
        for volume in iterable:
            data = (np.asarray(volume, dtype=np.float64) - inter) / slope
            if stored.kind in "iu":
                info = np.iinfo(stored)
                data = np.clip(np.rint(np.nan_to_num(data)), info.min, info.max)
            sink.write(np.asarray(data, dtype=stored).tobytes(order="F"))
        if sink is not raw:
            sink.close()
    return out


def _save_volume(path: Path, volume: np.ndarray, affine: np.ndarray, dtype: str) -> None:
    write_nifti_volumes(path, np.asarray(volume), affine, dtype=dtype, compresslevel=6)


# ----------------------------------------------------------------------------------------------
# Subject content


def _affine(grid: tuple[int, int, int], s_index: int) -> np.ndarray:
    affine = np.diag([1.8, 1.8, 1.8, 1.0])
    affine[:3, 3] = [-(grid[0] - 1) * 0.9 - s_index, -(grid[1] - 1) * 0.9 + 2.5, -(grid[2]) * 0.9]
    return affine


def _ellipsoid(grid: tuple[int, int, int], scale: float) -> np.ndarray:
    axes = [np.linspace(-1, 1, n) for n in grid]
    xx, yy, zz = np.meshgrid(*axes, indexing="ij")
    return (xx**2 + yy**2 + zz**2) <= scale**2


def _blob(grid: tuple[int, int, int], center: np.ndarray, radius: float) -> np.ndarray:
    ii, jj, kk = np.indices(grid)
    dist2 = (ii - center[0]) ** 2 + (jj - center[1]) ** 2 + (kk - center[2]) ** 2
    return dist2 <= radius**2


def _trial_table(
    session: str, trials: int, images: pd.DataFrame, session_index: int,
    subject_index: int, n_shared: int, shared_repeats: int, rng: np.random.Generator,
) -> pd.DataFrame:
    shared = images[images["unique_or_shared"] == "shared"]["image_name"].tolist()[:n_shared]
    shown = [name for _ in range(shared_repeats) for name in shared][:trials]
    uniq = images[
        (images["unique_or_shared"] == "unique")
        & (images["session_index"] == session_index)
        & (images["subject_index"] == subject_index)
    ]["image_name"].tolist()
    shown += uniq[: trials - len(shown)]
    order = rng.permutation(len(shown))
    shown = [shown[i] for i in order]
    kinds = ["shared" if name in set(shared) else "unique" for name in shown]
    runs_per_session = 2 if trials >= 2 else 1
    run = (np.arange(trials) * runs_per_session // trials + 1).astype(np.int64)
    return pd.DataFrame(
        {
            "session": [session] * trials,
            "run": run,
            "beta_index": np.arange(trials, dtype=np.int64),
            "label": [f"{k}_{n}" for k, n in zip(kinds, shown, strict=True)],
        }
    )


def _make_subject(
    root: Path,
    subject: str,
    s_index: int,
    grid: tuple[int, int, int],
    rng: np.random.Generator,
    *,
    roi_spec: dict[str, list[str]],
    sessions: int,
    trials: int,
    images: pd.DataFrame,
    n_shared: int,
    shared_repeats: int,
    nan_fraction: float,
    compress: bool,
    compresslevel: int,
    dtype: str,
    anatomical: bool,
    full_resolution: bool,
    surface_rois: bool,
    freesurfer: bool,
) -> SubjectTruth:
    affine = _affine(grid, s_index)
    brain = _ellipsoid(grid, 0.95)
    n_brain = int(brain.sum())
    brain_flat = np.flatnonzero(brain.ravel())
    nan_voxels = np.zeros(grid, dtype=bool)
    n_nan = max(1, round(nan_fraction * n_brain)) if nan_fraction > 0 else 0
    nan_voxels.ravel()[rng.choice(brain_flat, size=n_nan, replace=False)] = True

    # R² map: fitted voxels inside the brain are non-zero (some negative), a
    # few voxels outside the brain are fitted too, most outside are 0 or NaN.
    r2 = np.zeros(grid, dtype=np.float32)
    r2[brain] = rng.uniform(0.5, 30.0, n_brain).astype(np.float32)
    r2.ravel()[rng.choice(brain_flat, size=max(1, n_brain // 10), replace=False)] = 0.0
    r2.ravel()[rng.choice(brain_flat, size=max(1, n_brain // 20), replace=False)] = -1.5
    outside_flat = np.flatnonzero(~brain.ravel())
    if outside_flat.size:
        n_out = outside_flat.size
        r2.ravel()[rng.choice(outside_flat, size=max(1, n_out // 8), replace=False)] = np.nan
        r2.ravel()[rng.choice(outside_flat, size=max(1, n_out // 20), replace=False)] = 2.0
    r2[nan_voxels] = np.nan

    # ROIs: blobs around random brain voxels; they may stick out of the brain.
    roi_volumes: dict[str, np.ndarray] = {}
    radius = max(1.2, min(grid) / 4.0)
    for names in roi_spec.values():
        for name in names:
            center = np.array(np.unravel_index(rng.choice(brain_flat), grid))
            roi_volumes[name] = _blob(grid, center, radius)

    sub_dir = root / _GLM / subject
    session_ids = [f"ses-{i + 1:02d}" for i in range(sessions)]
    trial_tables: dict[str, pd.DataFrame] = {}
    noise_ceilings: dict[str, np.ndarray] = {}
    betas_paths: dict[str, Path] = {}
    base_nc = rng.uniform(0.0, 60.0, grid).astype(np.float32)
    base_a = rng.standard_normal(grid).astype(np.float32)
    base_b = rng.standard_normal(grid).astype(np.float32)
    slope, inter = (1.0, 0.0) if dtype == "float32" else (0.001, 0.5)
    for ses_index, session in enumerate(session_ids):
        func = sub_dir / session / "func"
        func.mkdir(parents=True, exist_ok=True)
        table = _trial_table(
            session, trials, images, ses_index, s_index, n_shared, shared_repeats, rng
        )
        trial_tables[session] = table
        table.to_csv(
            func / f"{subject}_{session}_{_TASK}_desc-SingletrialBetas_trials.tsv",
            sep="\t", index=False,
        )
        nc = np.clip(base_nc + rng.uniform(-15, 15, grid).astype(np.float32), 0, 100)
        nc = nc.astype(np.float32)
        nc[~brain] = 0.0
        nc[nan_voxels] = np.nan
        noise_ceilings[session] = nc
        _save_volume(
            func / f"{subject}_{session}_{_TASK}_space-T1w_desc-Noiseceiling_statmap.nii.gz",
            nc, affine, "float32",
        )
        gains = rng.standard_normal(trials).astype(np.float32)
        offsets = rng.standard_normal(trials).astype(np.float32)
        def volumes(
            gains: np.ndarray = gains, offsets: np.ndarray = offsets, shift: int = ses_index
        ) -> Iterator[np.ndarray]:
            outside = ~brain
            for t in range(trials):
                vol = base_a * gains[t] + base_b * offsets[t] + np.float32(shift)
                vol[outside] = 0.0
                if dtype == "float32":
                    vol[nan_voxels] = np.nan
                yield vol

        suffix = ".nii.gz" if compress else ".nii"
        betas_path = func / (
            f"{subject}_{session}_{_TASK}_space-T1w_stat-effect_desc-SingletrialBetas_statmap"
            + suffix
        )
        write_nifti_volumes(
            betas_path, volumes(), affine, n_volumes=trials, dtype=dtype,
            slope=slope, inter=inter, compresslevel=compresslevel,
        )
        betas_paths[session] = betas_path

    subject_ncs: dict[str, np.ndarray] = {}
    for desc in ("Noiseceiling4rep", "Noiseceiling12rep", "NoiseceilingAllrep"):
        vol = np.clip(base_nc + rng.uniform(0, 10, grid).astype(np.float32), 0, 100)
        vol = vol.astype(np.float32)
        vol[~brain] = 0.0
        vol[nan_voxels] = np.nan
        subject_ncs[desc] = vol
        _save_volume(
            sub_dir / f"{subject}_{_TASK}_space-T1w_desc-{desc}_statmap.nii.gz", vol, affine,
            "float32",
        )
    _save_volume(
        sub_dir / f"{subject}_{_TASK}_space-T1w_stat-rsquare_desc-R2mean_statmap.nii.gz",
        r2, affine, "float32",
    )

    if anatomical:
        anat = root / "derivatives/anatomical" / subject / "ses-PrismaAnat" / "anat"
        stem = f"{subject}_ses-PrismaAnat_space-T1w"
        _save_volume(anat / f"{stem}_res-1pt8_desc-brain_mask.nii.gz", brain.astype(np.uint8),
                     affine, "uint8")
        t1 = np.where(brain, rng.uniform(0.3, 1.0, grid), 0.0).astype(np.float32)
        _save_volume(anat / f"{stem}_res-1pt8_T1w.nii.gz", t1, affine, "float32")
        if full_resolution:
            fine = np.repeat(np.repeat(np.repeat(brain, 2, 0), 2, 1), 2, 2).astype(np.uint8)
            fine_affine = affine.copy()
            fine_affine[:3, :3] /= 2.0
            _save_volume(anat / f"{stem}_desc-brain_mask.nii.gz", fine, fine_affine, "uint8")
            _save_volume(anat / f"{stem}_T1w.nii.gz", fine.astype(np.float32), fine_affine,
                         "float32")

    categories: dict[str, list[str]] = {}
    for category, names in roi_spec.items():
        folder = root / "derivatives/rois" / subject / category
        folder.mkdir(parents=True, exist_ok=True)
        categories[category] = list(names)
        for name in names:
            _save_volume(
                folder / f"{subject}_space-T1w_res-1pt8_label-{name}_mask.nii.gz",
                roi_volumes[name].astype(np.uint8), affine, "uint8",
            )
            if surface_rois:
                for hemi in ("L", "R"):
                    vertex_mask = rng.random(64) < 0.2
                    _write_func_gii(
                        folder / f"{subject}_hemi-{hemi}_space-fsnative_label-{name}_mask.func.gii",
                        vertex_mask,
                    )
                    _write_label(
                        folder / f"{subject}_hemi-{hemi}_space-fsnative_label-{name}_mask.label",
                        np.flatnonzero(vertex_mask),
                    )

    if freesurfer:
        fs = root / "derivatives/freesurfer" / subject
        for rel in ("surf/lh.white", "surf/rh.white", "mri/T1.mgz", "label/lh.cortex.label"):
            target = fs / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"")

    return SubjectTruth(
        subject=subject,
        grid=grid,
        affine=affine,
        brain_mask=brain,
        r2mean=r2,
        nan_voxels=nan_voxels,
        rois=roi_volumes,
        roi_categories=categories,
        noise_ceilings=noise_ceilings,
        subject_noise_ceilings=subject_ncs,
        trials=trial_tables,
        betas_paths=betas_paths,
    )


def _write_func_gii(path: Path, vertex_mask: np.ndarray) -> None:
    import nibabel as nib

    array = nib.gifti.GiftiDataArray(
        vertex_mask.astype(np.float32), intent="NIFTI_INTENT_SHAPE", datatype="NIFTI_TYPE_FLOAT32"
    )
    image = nib.gifti.GiftiImage(darrays=[array])
    with atomic_path(path) as tmp:
        tmp.write_bytes(image.to_bytes())


def _write_label(path: Path, vertices: np.ndarray) -> None:
    lines = ["#!ascii label, synthetic", str(len(vertices))]
    lines += [f"{int(v)} 0.000 0.000 0.000 1.000" for v in vertices]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------
# Stimuli


def _image_table(
    n_shared: int, n_unique_per_session: int, sessions: int, n_subjects: int,
    subject_ids: list[str],
) -> pd.DataFrame:
    rows: list[dict[str, object]] = []
    for i in range(n_shared):
        rows.append(
            {
                "image_name": f"stim_{i:04d}",
                "dataset": "coco" if i % 2 == 0 else "imagenet",
                "participant": ";".join(subject_ids),
                "unique_or_shared": "shared",
                "n_reps": "12rep",
                "session_index": -1,
                "subject_index": -1,
            }
        )
    counter = n_shared
    for sub in range(n_subjects):
        for ses in range(sessions):
            for _ in range(n_unique_per_session):
                rows.append(
                    {
                        "image_name": f"stim_{counter:04d}",
                        "dataset": "laion" if counter % 3 else "coco",
                        "participant": subject_ids[sub],
                        "unique_or_shared": "unique",
                        "n_reps": "1rep",
                        "session_index": ses,
                        "subject_index": sub,
                    }
                )
                counter += 1
    return pd.DataFrame(rows)


def _jpeg_bytes(index: int) -> bytes:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow ships with matplotlib
        return b"\xff\xd8\xff\xe0" + index.to_bytes(4, "little") + b"\xff\xd9"
    shade = (index * 37) % 256
    image = Image.new("RGB", (8, 8), (shade, 255 - shade, (index * 11) % 256))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=75)
    return buffer.getvalue()


def _write_stimuli(
    root: Path,
    images: pd.DataFrame,
    rng: np.random.Generator,
    models: list[str],
    embedding_dim: int,
    segmentation_size: int,
) -> None:
    import h5py

    folder = root / "stimuli"
    folder.mkdir(parents=True, exist_ok=True)
    table = images[["image_name", "dataset", "participant", "unique_or_shared", "n_reps"]]
    with atomic_path(folder / "task-images_metadata.csv") as tmp:
        table.to_csv(tmp, index=False)
    n = len(images)
    with atomic_path(folder / "task-images_stimuli.h5") as tmp, h5py.File(tmp, "w") as h5:
        dataset = h5.create_dataset("images", (n,), dtype=h5py.vlen_dtype(np.uint8))
        for i in range(n):
            dataset[i] = np.frombuffer(_jpeg_bytes(i), dtype=np.uint8)
    names = images["image_name"].to_numpy(dtype=str)
    for model in models:
        # Rows are stored in another order than the metadata, as a reader must
        # look images up by id, not by position.
        order = rng.permutation(n)
        embedding = rng.standard_normal((n, embedding_dim)).astype(np.float16)
        valid = np.ones(n, dtype=bool)
        valid[order[-1]] = False
        path = folder / f"task-images_desc-{model}_embeddings.h5"
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
            h5.create_dataset("embedding", data=embedding, chunks=(min(n, 16), embedding_dim))
            h5.create_dataset(
                "image_ids", data=names[order].astype(object), dtype=h5py.string_dtype()
            )
            h5.create_dataset("valid", data=valid)
    shared = images[images["unique_or_shared"] == "shared"]["image_name"].tolist()
    n_masks = 2 * len(shared)
    size = segmentation_size
    masks = (rng.random((n_masks, size, size)) < 0.3).astype(np.uint8)
    seg_meta = pd.DataFrame(
        {
            "mask_index": np.arange(n_masks, dtype=np.int64),
            "image_name": [shared[i // 2] for i in range(n_masks)],
            "category": ["person" if i % 2 == 0 else "background" for i in range(n_masks)],
            "area": masks.reshape(n_masks, -1).sum(axis=1).astype(np.int64),
        }
    )
    with atomic_path(folder / "task-images_desc-segmentations.h5") as tmp, h5py.File(
        tmp, "w"
    ) as h5:
        h5.create_dataset("masks", data=masks, chunks=(1, size, size), compression="gzip")
    with atomic_path(folder / "task-images_desc-segmentations_metadata.csv") as tmp:
        seg_meta.to_csv(tmp, index=False)
    captions = pd.DataFrame(
        {
            "image_name": np.repeat(names, 2),
            "caption_idx": np.tile([0, 1], n),
            "source": np.tile(["human", "ai"], n),
            "caption": [f"a picture number {i // 2} ({'human' if i % 2 == 0 else 'ai'})"
                        for i in range(2 * n)],
            "origin_collection": "synthetic",
            "participant_id": np.tile(["sub-01", ""], n),
            "ai_model": np.tile(["", "captioner-1"], n),
        }
    )
    with atomic_path(folder / "task-images_desc-captions.csv") as tmp:
        captions.to_csv(tmp, index=False)
