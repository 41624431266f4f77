"""Catalog of a single-trial betas bucket (the ``laion_fmri`` layout, docs/fmri.md).

:func:`scan_bucket` lists a bucket (a local folder or a URL such as
``s3://laion-fmri``) through :mod:`neurocube.storage` and classifies every file
by its folder and its BIDS-like name. It reads names only (no ``stat``, no
file content; on an object store a few recursive listings, no request per
file), so a tree of 100k files is scanned in well under a second per 10k
files. The result is a :class:`pandas.DataFrame` with one row per file:

========== ==================================================================
column     meaning
========== ==================================================================
kind       what the file is (see :data:`KINDS`)
subject    ``sub-XX`` or ``""`` (stimuli)
session    ``ses-NN`` for per-session files, else ``""``
category   ROI category folder (``"atlases"`` for the older ROI layout)
label      ROI name (``label-<ROI>``), embedding model for ``embeddings``
hemi       ``"L"`` / ``"R"`` for surface ROIs
res        ``"1pt8"`` / ``"1pt5"`` / ``""`` (full resolution)
desc       the ``desc-`` entity (e.g. ``Noiseceiling12rep``)
fmt        ``nii.gz``, ``nii``, ``func.gii``, ``label``, ``tsv``, ``csv``, ``h5``, ``dir``
layout     ``"current"`` or the name of the older layout it follows
path       absolute path or URL (str)
========== ==================================================================

Older layouts (docs/fmri.md): ``desc-singletrial_stat-effect`` betas, the
``desc-meanR2gt15mask_mask`` brain mask and ROIs under
``derivatives/atlases/sub-XX/rois/<roi>.nii.gz`` are catalogued and used;
``stimuli/stimuli.tsv`` is catalogued as ``stimuli_table_legacy`` and refused
by the readers with a message naming the file that is expected instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import pandas as pd

from neurocube import storage
from neurocube.errors import DataNotFoundError, FormatError

__all__ = [
    "COLUMNS",
    "KINDS",
    "parse_entities",
    "scan_bucket",
    "subject_ids",
]

COLUMNS = (
    "kind", "subject", "session", "category", "label", "hemi", "res", "desc", "fmt", "layout",
    "path",
)

#: Every ``kind`` a scan can report.
KINDS = (
    "betas",  # 4-D single-trial betas of one session
    "trials",  # trial table (TSV) of one session
    "noise_ceiling_session",  # per-session noise ceiling (3-D)
    "noise_ceiling_subject",  # subject-level noise ceiling, desc-Noiseceiling<token>
    "r2mean",  # subject-level mean R² map (the "rsquare" brain-mask source)
    "r2mask_legacy",  # older desc-meanR2gt15mask_mask brain mask
    "brain_mask",  # anatomical brain mask (res "1pt8" or full "")
    "anatomical",  # T1w / T2w volumes (desc holds the suffix)
    "roi",  # ROI file: volume, func.gii or label
    "freesurfer",  # a subject's FreeSurfer recon folder
    "stimuli_images",  # stimuli/task-images_stimuli.h5
    "stimuli_metadata",  # stimuli/task-images_metadata.csv
    "embeddings",  # stimuli/task-images_desc-<model>_embeddings.h5 (label = model)
    "segmentations",  # stimuli/task-images_desc-segmentations.h5
    "segmentations_metadata",  # its CSV
    "captions",  # stimuli/task-images_desc-captions.csv
    "stimuli_table_legacy",  # older stimuli/stimuli.tsv
    "other",  # anything else (kept so nothing is silently lost)
)

_GLM_PIPELINE = "glmsingle-tedana"
_ENTITY = re.compile(r"^([A-Za-z0-9]+)-(.+)$")
_SUFFIXES = (".nii.gz", ".func.gii", ".nii", ".label", ".tsv", ".csv", ".h5", ".hdf5", ".json")


def parse_entities(name: str) -> tuple[dict[str, str], str, str]:
    """Split a BIDS-like file name into entities, suffix and extension.

    Parameters
    ----------
    name
        A file name such as ``sub-01_ses-01_task-images_desc-Noiseceiling_statmap.nii.gz``.

    Returns
    -------
    entities, suffix, extension
        ``({"sub": "01", "ses": "01", "task": "images", "desc": "Noiseceiling"},
        "statmap", "nii.gz")``. A name without a known extension gives
        ``extension == ""``; tokens that are not ``key-value`` pairs other than
        the last one are ignored.

    Examples
    --------
    >>> parse_entities("sub-01_hemi-L_space-fsnative_label-FFA1_mask.func.gii")
    ({'sub': '01', 'hemi': 'L', 'space': 'fsnative', 'label': 'FFA1'}, 'mask', 'func.gii')
    """
    ext = ""
    stem = name
    for candidate in _SUFFIXES:
        if name.endswith(candidate):
            ext = candidate[1:]
            stem = name[: -len(candidate)]
            break
    tokens = stem.split("_")
    suffix = ""
    if tokens and _ENTITY.match(tokens[-1]) is None:
        suffix = tokens.pop()
    entities: dict[str, str] = {}
    for token in tokens:
        match = _ENTITY.match(token)
        if match is not None:
            entities.setdefault(match.group(1), match.group(2))
    return entities, suffix, ext


def _row(kind: str, path: str, **values: str) -> dict[str, str]:
    row = dict.fromkeys(COLUMNS, "")
    row.update(values)
    row["kind"] = kind
    row["path"] = path
    row.setdefault("layout", "current")
    if not row["layout"]:
        row["layout"] = "current"
    return row


def _classify_glm(rel: tuple[str, ...], name: str, path: str) -> dict[str, str]:
    entities, suffix, ext = parse_entities(name)
    subject = f"sub-{entities['sub']}" if "sub" in entities else (rel[0] if rel else "")
    session = f"ses-{entities['ses']}" if "ses" in entities else ""
    desc = entities.get("desc", "")
    common = {"subject": subject, "session": session, "desc": desc, "fmt": ext}
    if ext in {"nii.gz", "nii"}:
        if suffix == "statmap" and desc == "SingletrialBetas" and session:
            return _row("betas", path, **common)
        if suffix == "statmap" and desc.lower() == "singletrial" and session:
            return _row("betas", path, layout="desc-singletrial_stat-effect", **common)
        if suffix == "statmap" and desc == "Noiseceiling" and session:
            return _row("noise_ceiling_session", path, **common)
        if suffix == "statmap" and desc.lower().startswith("noiseceiling") and not session:
            return _row("noise_ceiling_subject", path, **common)
        if suffix == "statmap" and desc == "R2mean":
            return _row("r2mean", path, **common)
        if suffix == "mask" and desc.lower() == "meanr2gt15mask":
            return _row("r2mask_legacy", path, layout="desc-meanR2gt15mask_mask", **common)
    if ext == "tsv" and suffix == "trials" and session:
        return _row("trials", path, **common)
    return _row("other", path, **common)


def _classify_anat(name: str, path: str) -> dict[str, str]:
    entities, suffix, ext = parse_entities(name)
    subject = f"sub-{entities['sub']}" if "sub" in entities else ""
    res = entities.get("res", "")
    if ext in {"nii.gz", "nii"} and suffix == "mask" and entities.get("desc") == "brain":
        return _row("brain_mask", path, subject=subject, res=res, desc="brain", fmt=ext)
    if ext in {"nii.gz", "nii"} and suffix in {"T1w", "T2w"}:
        return _row("anatomical", path, subject=subject, res=res, desc=suffix, fmt=ext)
    return _row("other", path, subject=subject, res=res, fmt=ext)


def _classify_roi(subject: str, category: str, name: str, path: str) -> dict[str, str]:
    entities, suffix, ext = parse_entities(name)
    label = entities.get("label", "")
    if suffix == "mask" and label and ext in {"nii.gz", "nii", "func.gii", "label"}:
        return _row(
            "roi", path, subject=subject, category=category, label=label,
            hemi=entities.get("hemi", ""), res=entities.get("res", ""), fmt=ext,
        )
    return _row("other", path, subject=subject, category=category, fmt=ext)


_STIMULI_FILES = {
    "task-images_stimuli.h5": "stimuli_images",
    "task-images_metadata.csv": "stimuli_metadata",
    "task-images_desc-segmentations.h5": "segmentations",
    "task-images_desc-segmentations_metadata.csv": "segmentations_metadata",
    "task-images_desc-captions.csv": "captions",
}
_EMBEDDINGS = re.compile(r"^task-images_desc-(?P<model>[A-Za-z0-9]+)_embeddings\.h5$")


def _classify_stimuli(name: str, path: str) -> dict[str, str]:
    kind = _STIMULI_FILES.get(name)
    ext = parse_entities(name)[2]
    if kind is not None:
        return _row(kind, path, fmt=ext)
    match = _EMBEDDINGS.match(name)
    if match is not None:
        return _row("embeddings", path, label=match.group("model"), desc=match.group("model"),
                    fmt="h5")
    if name == "stimuli.tsv":
        return _row("stimuli_table_legacy", path, fmt="tsv", layout="stimuli/stimuli.tsv")
    return _row("other", path, fmt=ext)


def scan_bucket(
    root: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """Scan a bucket and return one row per file (names only, nothing is opened).

    Parameters
    ----------
    root
        The bucket's root folder or URL (it holds ``derivatives/`` and
        ``stimuli/``), e.g. ``"s3://laion-fmri"``.
    storage_options
        fsspec options for a URL (``{"anon": True}`` for a public bucket, or
        keys and an endpoint).

    Returns
    -------
    pandas.DataFrame
        Columns :data:`COLUMNS` (all ``str``; ``""`` where an entity does not
        apply), rows sorted by ``path`` (absolute local paths, or URLs).

    Raises
    ------
    DataNotFoundError
        If ``root`` is not a folder (or prefix).
    FormatError
        If ``root`` is a folder but holds neither ``derivatives/`` nor
        ``stimuli/`` (not a bucket).
    AccessDeniedError, StorageError
        If the bucket refuses the listing or cannot be reached.

    Notes
    -----
    The scan lists, it never stats or opens a file: locally one ``scandir``
    per folder; on an object store one listing of the root, one of
    ``derivatives/``, one recursive listing per pipeline folder
    (``derivatives/glmsingle-tedana/``, ``derivatives/rois/``, ...) and per
    other top folder (``stimuli/``), and one of ``derivatives/freesurfer/``,
    whose recons are catalogued as one row per subject and never listed.

    Examples
    --------
    >>> import tempfile
    >>> from neurocube.synthetic.bucket import make_bucket
    >>> root = tempfile.mkdtemp()
    >>> _ = make_bucket(root, subjects=1, sessions=1, trials=4, grid=(4, 4, 4), stimuli=False)
    >>> table = scan_bucket(root)
    >>> table.loc[table.kind == "betas", ["subject", "session"]].values.tolist()
    [['sub-01', 'ses-01']]
    """
    top = storage.normalize(root)
    try:
        entries = storage.listdir(top, storage_options)
    except DataNotFoundError:
        raise DataNotFoundError(
            f"{top}: not a folder. Expected the root of a betas bucket (holding derivatives/ "
            "and stimuli/)."
        ) from None
    folders = {e.name: e.path for e in entries if e.is_dir}
    if "derivatives" not in folders and "stimuli" not in folders:
        found = sorted(e.name for e in entries)[:10]
        raise FormatError(
            f"{top}: not a betas bucket: expected a derivatives/ or stimuli/ folder, found "
            f"{found}. Pass the folder that holds derivatives/glmsingle-tedana/."
        )
    sep = "/" if storage.is_url(top) else os.sep
    rows: list[dict[str, str]] = []
    for name, folder in sorted(folders.items()):
        if name.startswith("."):
            continue
        if name != "derivatives":
            rows.extend(_classify_files(top, sep, storage.list_files(folder, storage_options)))
            continue
        pipelines = storage.listdir(folder, storage_options)
        loose = [e.path for e in pipelines if not e.is_dir and not e.name.startswith(".")]
        rows.extend(_classify_files(top, sep, loose))
        for entry in pipelines:
            if not entry.is_dir or entry.name.startswith("."):
                continue
            if entry.name == "freesurfer":
                # FreeSurfer recons: one row per subject folder, never descended into.
                for recon in storage.listdir(entry.path, storage_options):
                    if recon.is_dir and recon.name.startswith("sub-"):
                        rows.append(_row("freesurfer", recon.path, subject=recon.name, fmt="dir"))
                continue
            rows.extend(
                _classify_files(top, sep, storage.list_files(entry.path, storage_options))
            )
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    if not rows:
        table = pd.DataFrame({c: pd.Series([], dtype=str) for c in COLUMNS})
    return table.sort_values("path", kind="stable").reset_index(drop=True)


def _classify_files(top: str, sep: str, paths: list[str]) -> list[dict[str, str]]:
    """Classify files (locations below ``top``) by their folder relative to ``top``."""
    prefix_len = len(top.rstrip(sep)) + 1
    rows: list[dict[str, str]] = []
    folders: dict[str, tuple[str, ...]] = {}
    for path in paths:
        folder, _, name = path[prefix_len:].rpartition(sep)
        rel = folders.get(folder)
        if rel is None:
            rel = folders[folder] = tuple(folder.split(sep)) if folder else ()
        if not rel:
            continue  # a file at the root of the bucket
        rows.append(_classify(rel, name, path))
    return rows


def _classify(rel: tuple[str, ...], name: str, path: str) -> dict[str, str]:
    if rel[0] == "stimuli" and len(rel) == 1:
        return _classify_stimuli(name, path)
    if rel[0] != "derivatives" or len(rel) < 3:
        return _row("other", path, fmt=parse_entities(name)[2])
    pipeline, subject = rel[1], rel[2]
    if not subject.startswith("sub-"):
        return _row("other", path, fmt=parse_entities(name)[2])
    if pipeline == _GLM_PIPELINE:
        return _classify_glm(rel[2:], name, path)
    if pipeline == "anatomical":
        return _classify_anat(name, path)
    if pipeline == "rois" and len(rel) == 4:
        return _classify_roi(subject, rel[3], name, path)
    if pipeline == "atlases" and len(rel) == 4 and rel[3] == "rois":
        return _classify_atlas_roi(subject, name, path)
    return _row("other", path, subject=subject, fmt=parse_entities(name)[2])


def _classify_atlas_roi(subject: str, name: str, path: str) -> dict[str, str]:
    ext = parse_entities(name)[2]
    if ext in {"nii.gz", "nii"}:
        label = name[: -len(ext) - 1]
        return _row(
            "roi", path, subject=subject, category="atlases", label=label, fmt=ext,
            layout="derivatives/atlases/sub-XX/rois",
        )
    return _row("other", path, subject=subject, fmt=ext)


def subject_ids(table: pd.DataFrame) -> list[str]:
    """Return the subjects of a scan, sorted (``sub-02`` before ``sub-10``).

    A subject is listed if any derivative (betas, masks, ROIs, recon) names it.
    """
    subjects = {s for s in table["subject"].tolist() if s.startswith("sub-")}
    return sorted(subjects, key=natural_key)


def natural_key(text: str) -> tuple[object, ...]:
    """Sort key that orders embedded numbers numerically (``ses-2`` before ``ses-10``)."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))
