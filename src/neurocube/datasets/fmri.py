"""Single-trial fMRI betas buckets (the ``laion_fmri`` layout) as lazy xarray Datasets.

A bucket holds, per subject and session, a 4-D betas NIfTI (one volume per
trial), its trial table, noise ceilings, brain masks, ROIs and the stimuli the
trials showed (docs/fmri.md). :func:`open_subject` scans the bucket (names
only) and returns a :class:`Subject`; its :meth:`Subject.betas` builds one lazy
``(trial, voxel)`` Dataset over any number of sessions, reading only headers,
masks, noise ceilings and TSVs until computed.

The bucket may be a local folder or a URL (``s3://laion-fmri`` with
``storage_options={"anon": True}``, or keys and an endpoint): every listing and
read goes through :mod:`neurocube.storage` with the subject's
``storage_options``, which travel inside the specs to Dask workers.

Voxel selection follows docs/fmri.md ("Selection rules"), in this order: ROI union within the
brain mask (or a custom mask instead, never both), AND ``NC >= nc_threshold``;
then trials are filtered by shared / unique. **With several sessions and a
noise-ceiling threshold, a voxel is kept only if it passes the threshold in
every requested session** (the intersection of the per-session NC masks), so
all sessions share one voxel axis and concatenate along ``trial``.

Examples
--------
>>> import tempfile, neurocube
>>> from neurocube.synthetic.bucket import make_bucket
>>> root = tempfile.mkdtemp()
>>> _ = make_bucket(root, subjects=1, sessions=2, trials=12, grid=(6, 7, 5))
>>> sub = neurocube.open_subject(root, "sub-01")
>>> ds = sub.betas(["ses-01", "ses-02"], roi="face", nc_threshold=10)
>>> ds.betas.dims
('trial', 'voxel')
>>> ds.sizes["trial"]
24
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neurocube import storage
from neurocube.catalog.fmri import natural_key, scan_bucket, subject_ids
from neurocube.datasets.fmri_trials import (
    SIDECAR_BLOCK,
    annotate_trials,
    read_csv,
    read_trial_table,
    trial_coords,
)
from neurocube.errors import (
    AccessDeniedError,
    ArgumentError,
    DataNotDownloadedError,
    FormatError,
    GridMismatchError,
    NeurocubeWarning,
    SelectionError,
)
from neurocube.ops import roi as roi_ops
from neurocube.ops.masks import voxel_coords

__all__ = ["Subject", "open_subject", "open_subjects", "roi_means"]

MASK_SOURCES = ("anatomical", "rsquare")
STIMULI_FILTERS = ("shared", "unique")


def _names(
    value: Any, what: str, expected: str, *, items: type | tuple[type, ...] = str
) -> list[Any]:
    """``value`` as a list: one name alone, or the items of a list (else :class:`ArgumentError`).

    ``what`` names the argument, ``expected`` says what one item is; every item must be an
    instance of ``items``.
    """
    if isinstance(value, items) and not isinstance(value, (bool, bytes)):
        return [value]
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(
        value, (Sequence, np.ndarray, pd.Index, pd.Series, set, frozenset)
    ):
        raise ArgumentError(
            f"{what}={value!r}: expected {expected} or a list of them, found "
            f"{type(value).__name__}"
        )
    chosen = list(value)
    bad = [v for v in chosen if not isinstance(v, items) or isinstance(v, (bool, bytes))]
    if bad:
        raise ArgumentError(
            f"{what}={value!r}: expected {expected} or a list of them, found "
            f"{bad[0]!r} ({type(bad[0]).__name__})"
        )
    return chosen


def _download_hint(what: str) -> str:
    hints = {
        "anatomical": "download the anatomical derivatives (include_anatomical=True in laion_fmri)",
        "freesurfer": "download the FreeSurfer recon (include_freesurfer=True in laion_fmri)",
        "stimuli": "download the stimuli folder (HDF5 and CSV files) into <root>/stimuli/",
    }
    return hints.get(what, "download it into the bucket, keeping the bucket's folder layout")


class Subject:
    """One subject of a betas bucket; array accessors return lazy xarray objects.

    Use :func:`open_subject` to make one. Masks, noise ceilings and trial
    tables are small and read eagerly (and cached) when a selection needs them;
    betas, embeddings, images and segmentations are read only when computed.

    Parameters
    ----------
    root
        Bucket root: a folder or a URL.
    subject_id
        ``"sub-XX"``.
    catalog
        The scan of the bucket (:func:`neurocube.catalog.fmri.scan_bucket`);
        scanned here when None.
    chunks
        Default chunking of betas along ``trial`` (see :func:`neurocube.open_nifti`).
    storage_options
        fsspec options for a URL root, used for every read of the subject's
        files (kept as :class:`neurocube.storage.StorageOptions`: never shown).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        subject_id: str,
        *,
        catalog: pd.DataFrame | None = None,
        chunks: Any = "auto",
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        location = storage.normalize(root)
        #: The bucket root: a :class:`~pathlib.Path` for a local folder, the URL otherwise.
        self.root: Path | str = Path(location) if storage.is_local(location) else location
        self._location = location
        self.storage_options = storage.as_options(storage_options)
        storage.remember_options(location, self.storage_options)
        table = scan_bucket(location, self.storage_options) if catalog is None else catalog
        known = subject_ids(table)
        if subject_id not in known:
            raise SelectionError(
                f"{location}: no subject {subject_id!r}; the bucket has {known}. Subjects are "
                "named 'sub-XX' (or pass an integer index)."
            )
        self._subject_id = subject_id
        self._files = table[table["subject"] == subject_id].reset_index(drop=True)
        self._stimuli_files = table[table["subject"] == ""].reset_index(drop=True)
        self.chunks = chunks
        self._lock = threading.Lock()
        self._volumes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._metadata: pd.DataFrame | None = None
        self._stimuli_table: pd.DataFrame | None = None
        self._denied: dict[str, str] = {}  # session -> why its trial table could not be read
        sessions = self._files[self._files["kind"].isin(["betas", "trials"])]["session"]
        self._sessions = sorted(set(sessions.tolist()), key=natural_key)

    # ------------------------------------------------------------------ identity

    @property
    def subject_id(self) -> str:
        """The BIDS subject id (``"sub-03"``)."""
        return self._subject_id

    @property
    def sessions(self) -> list[str]:
        """Sessions with a betas file or a trial table, in natural order."""
        return list(self._sessions)

    @property
    def files(self) -> pd.DataFrame:
        """Rows of the bucket catalog that belong to this subject."""
        return self._files.copy()

    def __repr__(self) -> str:
        return f"Subject({self._subject_id!r}, sessions={self._sessions}, root='{self._location}')"

    # ------------------------------------------------------------------ files

    def _at(self, *parts: str) -> str:
        """Return the location of ``parts`` below the bucket root (for messages)."""
        return storage.join(self._location, *parts)

    def _read_kwargs(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """``storage_options=`` for readers of ``path`` (none for a local file)."""
        if storage.is_local(path):
            return {}
        return {"storage_options": self.storage_options}

    def _rows(self, kind: str, **match: str) -> pd.DataFrame:
        rows = self._files[self._files["kind"] == kind]
        for column, value in match.items():
            rows = rows[rows[column] == value]
        return rows

    def _one(self, kind: str, what: str, expected: str, hint: str = "", **match: str) -> str:
        rows = self._rows(kind, **match)
        if rows.empty:
            raise DataNotDownloadedError(
                f"{self._subject_id}: {what} is not on disk; expected {self._at(expected)}. "
                f"To get it: {_download_hint(hint)}."
            )
        return str(rows["path"].iloc[0])

    def _session(self, session: str) -> str:
        if session not in self._sessions:
            raise SelectionError(
                f"{self._subject_id}: no session {session!r} in {self._location}; sessions on "
                f"disk: {self._sessions}"
            )
        return session

    def _sessions_arg(self, session: str | Sequence[str] | None) -> list[str]:
        if session is None or (isinstance(session, str) and session == "all"):
            return self.sessions
        chosen = _names(session, "session", "a session id such as 'ses-01'")
        if not chosen:
            raise SelectionError(f"{self._subject_id}: empty session list")
        if len(set(chosen)) != len(chosen):
            raise SelectionError(f"{self._subject_id}: sessions repeated in {chosen}")
        return [self._session(s) for s in chosen]

    def _check_access(self, sessions: Sequence[str]) -> None:
        """Raise :class:`AccessDeniedError` for a session whose trial table was refused."""
        denied = [s for s in sessions if s in self._denied]
        if denied:
            raise AccessDeniedError(
                f"{self._subject_id}: access denied to session {denied[0]} "
                f"({self._denied[denied[0]]}). Sessions readable here: "
                f"{[s for s in self._sessions if s not in self._denied]}."
            )

    def betas_path(self, session: str) -> str:
        """Path of the 4-D betas file of ``session``.

        Raises
        ------
        DataNotDownloadedError
            If the session's trial table exists but its betas file does not.
        """
        session = self._session(session)
        glm = f"derivatives/glmsingle-tedana/{self._subject_id}/{session}/func"
        name = (
            f"{self._subject_id}_{session}_task-images_space-T1w_stat-effect_"
            "desc-SingletrialBetas_statmap.nii.gz"
        )
        return self._one("betas", f"the betas of {session}", f"{glm}/{name}", session=session)

    def trials_path(self, session: str) -> str:
        """Path of the trial table (TSV) of ``session``."""
        session = self._session(session)
        glm = f"derivatives/glmsingle-tedana/{self._subject_id}/{session}/func"
        name = f"{self._subject_id}_{session}_task-images_desc-SingletrialBetas_trials.tsv"
        return self._one("trials", f"the trial table of {session}", f"{glm}/{name}",
                         session=session)

    def _volume(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            cached = self._volumes.get(path)
        if cached is None:
            cached = roi_ops.read_small_volume(path, storage_options=self.storage_options)
            with self._lock:
                self._volumes[path] = cached
        return cached

    # ------------------------------------------------------------------ availability

    def has_anatomical(self) -> bool:
        """Return True if the anatomical derivatives (brain masks, T1w/T2w) are on disk."""
        return not self._rows("brain_mask").empty or not self._rows("anatomical").empty

    def has_freesurfer(self) -> bool:
        """Return True if the subject's FreeSurfer recon folder is on disk."""
        return not self._rows("freesurfer").empty

    def has_stimuli(self) -> bool:
        """Return True if the stimuli metadata CSV and images HDF5 are on disk."""
        kinds = set(self._stimuli_files["kind"])
        return {"stimuli_metadata", "stimuli_images"} <= kinds

    def anatomical_dir(self) -> Path | str:
        """Folder of the anatomical derivatives (a Path, or a URL for a remote bucket).

        Raises
        ------
        DataNotDownloadedError
            If the catalog lists no file in it.
        """
        folder = self._at("derivatives", "anatomical", self._subject_id)
        prefix = folder + ("/" if storage.is_url(folder) else os.sep)
        if not self._files["path"].str.startswith(prefix).any():
            raise DataNotDownloadedError(
                f"{folder}: the anatomical derivatives of {self._subject_id} are not on disk. "
                f"To get them: {_download_hint('anatomical')}."
            )
        return Path(folder) if storage.is_local(folder) else folder

    def freesurfer_dir(self) -> Path | str:
        """Folder of the FreeSurfer recon (raises :class:`DataNotDownloadedError` if absent)."""
        rows = self._rows("freesurfer")
        if rows.empty:
            raise DataNotDownloadedError(
                f"{self._at('derivatives', 'freesurfer', self._subject_id)}: the FreeSurfer recon "
                f"of {self._subject_id} is not on disk. To get it: {_download_hint('freesurfer')}."
            )
        path = str(rows["path"].iloc[0])
        return Path(path) if storage.is_local(path) else path

    def t1w_path(self, res: str | None = None) -> str:
        """Path of the T1w volume (``res="1pt8"`` for the functional grid, None for full)."""
        res_value = _res(res)
        return self._one(
            "anatomical", f"the T1w volume (res={res!r})",
            f"derivatives/anatomical/{self._subject_id}/ses-PrismaAnat/anat/",
            "anatomical", desc="T1w", res=res_value,
        )

    # ------------------------------------------------------------------ brain masks

    def brain_mask_path(self, source: str = "anatomical", res: str | None = "1pt8") -> str:
        """Path of the brain mask file for ``source`` (``"anatomical"`` or ``"rsquare"``)."""
        source = _mask_source(source)
        if source == "rsquare":
            rows = self._rows("r2mean")
            if rows.empty:
                rows = self._rows("r2mask_legacy")
            if rows.empty:
                name = f"{self._subject_id}_task-images_space-T1w_stat-rsquare_desc-R2mean_statmap"
                raise DataNotDownloadedError(
                    f"{self._subject_id}: the R2mean map (mask_source='rsquare') is not on disk; "
                    f"expected {self._location}/derivatives/glmsingle-tedana/{self._subject_id}/"
                    f"{name}.nii.gz. Download it, or use mask_source='anatomical'."
                )
            return str(rows["path"].iloc[0])
        res_value = _res(res)
        suffix = f"_res-{res_value}" if res_value else ""
        return self._one(
            "brain_mask",
            f"the anatomical brain mask (res={res!r})",
            f"derivatives/anatomical/{self._subject_id}/ses-PrismaAnat/anat/"
            f"{self._subject_id}_ses-PrismaAnat_space-T1w{suffix}_desc-brain_mask.nii.gz",
            "anatomical",
            res=res_value,
        )

    def _brain(self, source: str, res: str | None = "1pt8") -> tuple[np.ndarray, np.ndarray]:
        volume, affine = self._volume(self.brain_mask_path(source, res))
        return roi_ops.nonzero_mask(volume), affine

    def brain_mask(self, source: str = "anatomical", res: str | None = "1pt8") -> np.ndarray:
        """Return the brain mask as a flat boolean array over the whole grid (C order).

        Parameters
        ----------
        source
            ``"anatomical"`` (``..._res-1pt8_desc-brain_mask``) or ``"rsquare"``
            (voxels where the subject's R2mean map is non-zero, NaN outside).
        res
            ``"1pt8"`` (the functional grid) or None (full resolution,
            anatomical only; does not align with betas).
        """
        return self._brain(source, res)[0].reshape(-1)

    def n_voxels(self, source: str = "anatomical", res: str | None = "1pt8") -> int:
        """Return the number of voxels in the brain mask (see :meth:`brain_mask`)."""
        return int(self._brain(source, res)[0].sum())

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """The functional grid, taken from the R2mean map or the anatomical 1pt8 mask."""
        return self._functional_grid()[0]

    def _functional_grid(self) -> tuple[tuple[int, int, int], np.ndarray]:
        for source in ("rsquare", "anatomical"):
            try:
                volume, affine = self._brain(source)
            except DataNotDownloadedError:
                continue
            return (int(volume.shape[0]), int(volume.shape[1]), int(volume.shape[2])), affine
        raise DataNotDownloadedError(
            f"{self._subject_id}: neither the R2mean map nor the anatomical brain mask is on disk; "
            f"one is needed to define the voxel axis. To get it: {_download_hint('anatomical')}."
        )

    # ------------------------------------------------------------------ ROIs

    def roi_categories(self, fmt: str = "volume") -> dict[str, list[str]]:
        """Return ``{category: [roi names]}`` of ROIs available as ``fmt`` files.

        ``fmt="volume"`` lists volume ROIs on the functional grid (``res-1pt8``
        or the older ``derivatives/atlases`` layout); ``"any"`` lists every ROI.
        """
        rows = self._rows("roi")
        if fmt == "volume":
            rows = rows[rows["fmt"].isin(["nii.gz", "nii"]) & rows["res"].isin(["1pt8", ""])]
        categories: dict[str, list[str]] = {}
        for category, label in zip(rows["category"], rows["label"], strict=True):
            names = categories.setdefault(category, [])
            if label not in names:
                names.append(label)
        return {c: sorted(n, key=natural_key) for c, n in sorted(categories.items())}

    def _roi_path(self, category: str, name: str) -> str:
        rows = self._rows("roi", category=category, label=name)
        rows = rows[rows["fmt"].isin(["nii.gz", "nii"]) & rows["res"].isin(["1pt8", ""])]
        return str(rows.sort_values("res", ascending=False)["path"].iloc[0])

    def _roi_grid_mask(
        self,
        query: roi_ops.RoiQuery,
        brain: np.ndarray,
        *,
        category: str | None = None,
        used: list[str] | None = None,
    ) -> np.ndarray:
        """Return the union of the ROIs of ``query`` in ``brain``; add their files to ``used``."""
        categories = self.roi_categories("volume")
        if not categories:
            raise DataNotDownloadedError(
                f"{self._subject_id}: no volume ROI on disk; expected files under "
                f"{self._location}/derivatives/rois/{self._subject_id}/<category>/. Download "
                "the ROIs."
            )
        if category is not None:  # one known (category, name) pair
            pairs = [(category, str(query))]
        else:
            tokens = _names(query, "roi", "a ROI name, a category or 'all'")
            anywhere = self.roi_categories("any")
            known = {n for names in categories.values() for n in names} | set(categories)
            elsewhere = [
                t for t in tokens if isinstance(t, str) and t != "all" and t not in known
                and (t in anywhere or any(t in names for names in anywhere.values()))
            ]
            if elsewhere:
                raise SelectionError(
                    f"{self._subject_id}: ROI {elsewhere} has no volume file on the functional "
                    f"grid (..._res-1pt8_label-<ROI>_mask.nii.gz) under {self._location}/"
                    f"derivatives/rois/{self._subject_id}/; only surface (.func.gii/.label) or "
                    "other-resolution files exist. Use roi_data() for those."
                )
            pairs = roi_ops.resolve_roi_query(query, categories, where=self._subject_id)
        volumes = []
        for category, name in pairs:
            path = self._roi_path(category, name)
            volume, _ = self._volume(path)
            if used is not None and path not in used:
                used.append(path)
            if volume.shape != brain.shape:
                raise GridMismatchError(
                    f"{self._subject_id}: ROI {name!r} ({category}) has grid {volume.shape}, the "
                    f"brain mask {brain.shape}; expected ROIs on the functional grid (res-1pt8)."
                )
            volumes.append(volume)
        return roi_ops.roi_union(volumes, brain)

    def roi_mask(self, query: roi_ops.RoiQuery, mask_source: str = "anatomical") -> np.ndarray:
        """Return the union of the ROIs named by ``query`` as a flat bool over brain-mask voxels.

        ``query`` is a ROI name, a category, ``"all"`` or a list of those
        (see :func:`neurocube.ops.roi.resolve_roi_query`).
        """
        brain, _ = self._brain(mask_source)
        return self._roi_grid_mask(query, brain)[brain]

    def roi_masks(
        self, queries: roi_ops.RoiQuery, mask_source: str = "anatomical"
    ) -> dict[str, np.ndarray]:
        """Return ``{query: roi_mask(query)}`` keyed by the caller's strings."""
        items = _names(queries, "queries", "a ROI name, a category or 'all'")
        return {str(q): self.roi_mask(q, mask_source=mask_source) for q in items}

    def roi_data(
        self,
        query: roi_ops.RoiQuery,
        format: str | None = None,
        hemi: str | None = None,
        mask_source: str = "anatomical",
    ) -> dict[str, dict[str, Any]]:
        """Return ROI files' content per ROI: volume mask and per-hemisphere surface data.

        Parameters
        ----------
        query
            ROI grammar, resolved over every ROI on disk (any format).
        format
            ``"all"``/None, ``"volume"`` (or ``"nii.gz"``), ``"gii"`` (func.gii and
            label), ``"func.gii"`` or ``"label"``.
        hemi
            ``"L"``, ``"R"`` or ``"all"``/None.
        mask_source
            Brain mask the volume mask is indexed within.

        Returns
        -------
        dict
            ``{roi: {"volume": bool over brain voxels, "gii": {"hemi-L": {"func.gii":
            float array, "label": int vertex ids}, ...}}}``, pruned by the filters.
        """
        fmt = "all" if format is None else format
        allowed = {
            "all": {"volume", "func.gii", "label"},
            "volume": {"volume"},
            "nii.gz": {"volume"},
            "gii": {"func.gii", "label"},
            "func.gii": {"func.gii"},
            "label": {"label"},
        }
        if fmt not in allowed:
            raise SelectionError(
                f"format={format!r}: expected one of {sorted(allowed)} or None"
            )
        if hemi in (None, "all"):
            hemis = {"L", "R"}
        elif isinstance(hemi, str) and hemi in ("L", "R"):
            hemis = {hemi}
        else:
            raise SelectionError(f"hemi={hemi!r}: expected 'L', 'R', 'all' or None")
        _names(query, "query", "a ROI name, a category or 'all'")
        pairs = roi_ops.resolve_roi_query(query, self.roi_categories("any"), where=self._subject_id)
        wanted = allowed[fmt]
        on_grid = self.roi_categories("volume")
        out: dict[str, dict[str, Any]] = {}
        for category, name in pairs:
            entry = out.setdefault(name, {})
            # A volume entry only for ROIs with a volume on the functional grid (res-1pt8 or
            # the older atlases layout); a res-1pt5 volume does not align with the voxel axis.
            if "volume" in wanted and name in on_grid.get(category, []):
                brain, _ = self._brain(mask_source)
                entry["volume"] = self._roi_grid_mask(name, brain, category=category)[brain]
            for h in sorted(hemis):
                for kind in ("func.gii", "label"):
                    if kind not in wanted:
                        continue
                    rows = self._rows("roi", category=category, label=name, hemi=h, fmt=kind)
                    if rows.empty:
                        continue
                    path = str(rows["path"].iloc[0])
                    reader = _read_func_gii if kind == "func.gii" else _read_label
                    value = reader(path, self.storage_options)
                    entry.setdefault("gii", {}).setdefault(f"hemi-{h}", {})[kind] = value
        return out

    # ------------------------------------------------------------------ selection

    def voxel_selection(
        self,
        session: str | Sequence[str] | None = None,
        *,
        roi: roi_ops.RoiQuery | None = None,
        mask: Any = None,
        nc_threshold: float | None = None,
        mask_source: str = "anatomical",
    ) -> np.ndarray:
        """Return the selected voxels as a 3-D bool volume (order: :mod:`neurocube.ops.roi`).

        With several sessions and ``nc_threshold``, a voxel must pass the
        threshold in every session (intersection).
        """
        return self._select(
            session, roi=roi, mask=mask, nc_threshold=nc_threshold, mask_source=mask_source
        )[0]

    def _select(
        self,
        session: str | Sequence[str] | None = None,
        *,
        roi: roi_ops.RoiQuery | None = None,
        mask: Any = None,
        nc_threshold: float | None = None,
        mask_source: str = "anatomical",
    ) -> tuple[np.ndarray, list[str]]:
        """:meth:`voxel_selection` plus every file the selection depends on (brain mask first)."""
        brain, _ = self._brain(mask_source)
        used = [self.brain_mask_path(mask_source)]
        roi_mask = None if roi is None else self._roi_grid_mask(roi, brain, used=used)
        if roi is not None and mask is not None:
            raise SelectionError(
                f"{self._subject_id}: give either roi= or mask=, not both: a custom mask replaces "
                "the ROI selection (intersect them yourself if you need both)"
            )
        custom = None
        if mask is not None:
            if isinstance(mask, (str, os.PathLike)):
                volume, mask_affine = self._volume(str(mask))
                used.append(storage.normalize(mask))
                custom = roi_ops.coerce_selection_mask(volume, brain, source=str(mask))
                _, brain_affine = self._brain(mask_source)
                if not np.allclose(mask_affine, brain_affine, atol=1e-3):
                    raise GridMismatchError(
                        f"mask {mask}: same shape as the functional grid but another affine "
                        f"than the {mask_source} brain mask {self.brain_mask_path(mask_source)}"
                        f".\nmask affine:\n{np.round(mask_affine, 4)}\nbrain-mask affine:\n"
                        f"{np.round(brain_affine, 4)}\nResample the mask onto the functional "
                        "grid."
                    )
            else:
                custom = roi_ops.coerce_selection_mask(mask, brain, source=self._subject_id)
        ncs: list[np.ndarray] = []
        if nc_threshold is not None:
            roi_ops.check_nc_threshold(nc_threshold)  # before any map is read
            if session is None:
                raise SelectionError("nc_threshold needs the session(s) whose noise ceiling to use")
            for ses in self._sessions_arg(session):
                nc_path = self._nc_session_path(ses)
                volume = self._volume(nc_path)[0]
                if volume.shape != brain.shape:
                    raise GridMismatchError(
                        f"{nc_path}: the noise ceiling of {ses} lies on a {volume.shape} grid, "
                        f"but the {mask_source} brain mask {self.brain_mask_path(mask_source)} "
                        f"(the functional grid) is {brain.shape}. Use the noise-ceiling map "
                        "written for this grid (or re-download it)."
                    )
                ncs.append(volume)
                used.append(nc_path)
        selection = roi_ops.select_voxels(
            brain, roi_mask=roi_mask, custom_mask=custom, noise_ceilings=ncs,
            nc_threshold=nc_threshold, allow_empty=False,
        )
        return selection, used

    def _nc_session_path(self, session: str) -> str:
        glm = f"derivatives/glmsingle-tedana/{self._subject_id}/{session}/func"
        name = (
            f"{self._subject_id}_{session}_task-images_space-T1w_desc-Noiseceiling_statmap.nii.gz"
        )
        return self._one(
            "noise_ceiling_session", f"the noise ceiling of {session}", f"{glm}/{name}",
            session=session,
        )

    def voxel_coordinates(
        self,
        roi: roi_ops.RoiQuery | None = None,
        mask: Any = None,
        mask_source: str = "anatomical",
    ) -> pd.DataFrame:
        """Return grid indices ``i, j, k`` and scanner ``x, y, z`` (mm) of the selected voxels.

        The table's index is ``voxel``, the flat C-order grid index that labels
        the ``voxel`` dim of :meth:`betas` and :meth:`noise_ceiling`.
        """
        selection = self.voxel_selection(roi=roi, mask=mask, mask_source=mask_source)
        _, affine = self._brain(mask_source)
        coords = voxel_coords(selection, affine)
        index = pd.Index(coords.pop("voxel")[1], name="voxel")
        return pd.DataFrame({name: values for name, (_, values) in coords.items()}, index=index)

    # ------------------------------------------------------------------ trial table

    @property
    def metadata(self) -> pd.DataFrame:
        """Trial table of every session, indexed by the global trial index (``trial``).

        Columns: the TSV columns, plus ``session, session_trial, image_name,
        stim_idx, unique_or_shared, dataset``. ``stim_idx`` is the row of the
        stimuli metadata CSV (-1 when the image is not listed or the CSV is not
        on disk).

        A session whose trial table the bucket refuses to serve (HTTP 403, e.g.
        a held-out session of a public bucket) is left out, with a
        :class:`~neurocube.errors.NeurocubeWarning`; asking for its betas
        raises :class:`~neurocube.errors.AccessDeniedError`.
        """
        if self._metadata is None:
            self._metadata = self._build_metadata()
        return self._metadata.copy()

    def _build_metadata(self) -> pd.DataFrame:
        stimuli = self._stimulus_table(required=False)
        paths = [self.trials_path(session) for session in self._sessions]
        opts = self.storage_options

        def read(item: tuple[str, str]) -> pd.DataFrame | AccessDeniedError:
            path, session = item
            try:
                return read_trial_table(path, session, opts)
            except AccessDeniedError as exc:
                return exc

        items = list(zip(paths, self._sessions, strict=True))
        if storage.is_local(self._location) or len(items) < 2:
            tables = [read(item) for item in items]
        else:  # one small GET per session: sent concurrently
            with ThreadPoolExecutor(min(8, len(items))) as pool:
                tables = list(pool.map(read, items))
        frames = []
        denied: dict[str, str] = {}
        for (path, session), table_or_error in zip(items, tables, strict=True):
            if isinstance(table_or_error, AccessDeniedError):
                denied[session] = str(table_or_error)
                continue
            # Annotated per session: sessions may follow different layouts (``label`` or the
            # older ``stimulus_id``), and a concatenation would put NaN in the missing column.
            frames.append(annotate_trials(table_or_error, stimuli, path))
        self._denied = denied
        if denied:
            warnings.warn(
                f"{self._subject_id}: access denied to the trial tables of sessions "
                f"{sorted(denied, key=natural_key)} in {self._location}; they are left out of "
                "the metadata (held-out sessions, or credentials needed: pass "
                "storage_options).",
                NeurocubeWarning,
                stacklevel=3,
            )
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        if table.empty:
            return table
        for column in table.columns:  # a column only some sessions have: "" (text) or -1 (ints)
            if table[column].isna().any():
                ints = all(
                    f[column].dtype.kind in "iu" for f in frames if column in f.columns
                )
                table[column] = (
                    table[column].fillna(-1).astype(np.int64) if ints
                    else table[column].fillna("").astype(str)
                )
        table.index = pd.RangeIndex(len(table), name="trial")
        return table

    def n_stimuli(self, stimuli: str | None = None) -> int:
        """Return the number of images in the stimuli CSV (optionally shared or unique only)."""
        table = self._stimulus_table(required=True)
        assert table is not None
        if stimuli is None:
            return len(table)
        _stimuli_filter(stimuli)
        return int((table["unique_or_shared"] == stimuli).sum())

    def _stimuli_file(self, kind: str, expected: str, **match: str) -> str:
        rows = self._stimuli_files[self._stimuli_files["kind"] == kind]
        for column, value in match.items():
            rows = rows[rows[column].str.lower() == value.lower()]
        if rows.empty:
            legacy = self._stimuli_files[self._stimuli_files["kind"] == "stimuli_table_legacy"]
            if kind == "stimuli_metadata" and not legacy.empty:
                raise FormatError(
                    f"{legacy['path'].iloc[0]}: an older bucket layout (stimuli/stimuli.tsv) that "
                    "neurocube does not read; expected stimuli/task-images_metadata.csv "
                    "(image_name, dataset, participant, unique_or_shared, n_reps). Download the "
                    "current stimuli folder."
                )
            raise DataNotDownloadedError(
                f"{self._at('stimuli', expected)}: not on disk. To get it: "
                f"{_download_hint('stimuli')}."
            )
        return str(rows["path"].iloc[0])

    def _stimulus_table(self, *, required: bool) -> pd.DataFrame | None:
        try:
            path = self._stimuli_file("stimuli_metadata", "task-images_metadata.csv")
        except DataNotDownloadedError:
            if required:
                raise
            return None
        with self._lock:
            table = self._stimuli_table
        if table is None:
            table = read_csv(path, storage_options=self.storage_options)
            with self._lock:
                self._stimuli_table = table
        return table

    # ------------------------------------------------------------------ betas

    def betas(
        self,
        session: str | Sequence[str] | None,
        roi: roi_ops.RoiQuery | None = None,
        mask: Any = None,
        nc_threshold: float | None = None,
        stimuli: str | None = None,
        mask_source: str = "anatomical",
        *,
        chunks: Any = None,
    ) -> Any:
        """Return single-trial betas of one or several sessions as one lazy Dataset.

        Parameters
        ----------
        session
            A session id, a list of them (concatenated along ``trial`` in the
            given order), or None / ``"all"`` for every session.
        roi
            ROI query (name, category, ``"all"``, list): union within the brain mask.
        mask
            Custom voxel mask replacing ``roi`` (3-D, flat over the grid, flat
            over brain-mask voxels, or a NIfTI path). ``roi`` and ``mask``
            together are an error.
        nc_threshold
            Keep voxels whose session noise ceiling is >= this (percent) in
            every requested session; NaN is dropped.
        stimuli
            ``"shared"`` or ``"unique"`` keeps only those trials.
        mask_source
            ``"anatomical"`` or ``"rsquare"`` brain mask.
        chunks
            Volumes per chunk (see :func:`neurocube.open_nifti`); default: the
            subject's ``chunks``.

        Returns
        -------
        xarray.Dataset
            ``betas`` (``trial``, ``voxel``), float32 for float32 or scaled-int
            files; NaN where the GLM gave no estimate. ``trial`` holds the
            global trial index (the index of :attr:`metadata`) and carries
            ``subject, session, session_trial, image_name, stim_idx,
            unique_or_shared, dataset`` and every trial-table column;
            ``voxel`` carries ``i, j, k, x, y, z``.

        Raises
        ------
        SelectionError
            Unknown session / ROI, both ``roi`` and ``mask``, or a bad ``stimuli``.
        DataNotDownloadedError
            A needed file (betas, mask, noise ceiling) is not on disk.
        FormatError
            A betas file's volume count differs from its trial table.
        GridMismatchError
            Betas and brain mask on different grids.
        """
        import xarray as xr

        from neurocube.sources.nifti import open_nifti
        from neurocube.sources.nifti_load import concatenate_trials

        sessions = self._sessions_arg(session)
        keep_kind = None if stimuli is None else _stimuli_filter(stimuli)
        metadata = self.metadata
        self._check_access(sessions)
        selection, sources = self._select(
            sessions, roi=roi, mask=mask, nc_threshold=nc_threshold, mask_source=mask_source
        )
        brain_path = self.brain_mask_path(mask_source)
        _, affine = self._brain(mask_source)
        flat = selection.reshape(-1)
        trial_chunks = self.chunks if chunks is None else chunks
        if trial_chunks is None or trial_chunks == "auto":
            trial_chunks = _trials_per_chunk(int(selection.sum()))
        arrays = []
        rows = []
        for ses in sessions:
            path = self.betas_path(ses)
            try:
                ds = open_nifti(
                    path, mask=flat, chunks=trial_chunks, **self._read_kwargs(path)
                )
            except GridMismatchError as exc:
                raise GridMismatchError(
                    f"{path}: its grid differs from the {mask_source} brain mask {brain_path} "
                    f"({exc}). Use mask_source='rsquare' or check the subject's files."
                ) from exc
            data = ds["data"].data
            table = metadata[metadata["session"] == ses]
            if data.shape[0] != len(table):
                raise FormatError(
                    f"{path}: {data.shape[0]} volumes, but its trial table "
                    f"{self.trials_path(ses)} has {len(table)} rows; expected one row per volume."
                )
            if keep_kind is not None:
                unknown = table["unique_or_shared"] == ""
                if unknown.any():
                    raise FormatError(
                        f"{self.trials_path(ses)}: stimuli={stimuli!r} needs each trial's "
                        f"shared/unique flag, unknown for {int(unknown.sum())} trials (e.g. label "
                        f"{str(table['image_name'][unknown].iloc[0])!r}): expected labels "
                        "starting with 'shared_'/'unique_' or the image listed in "
                        "stimuli/task-images_metadata.csv. Download the stimuli folder."
                    )
                keep = (table["unique_or_shared"] == keep_kind).to_numpy()
                if not keep.any():
                    raise SelectionError(
                        f"{self._subject_id} {ses}: stimuli={stimuli!r} leaves no trial: the "
                        f"session's {len(table)} trials are all "
                        f"{sorted(set(table['unique_or_shared']) - {keep_kind})}. Choose other "
                        "sessions or another stimuli= filter."
                    )
                if not keep.all():
                    data = data[np.flatnonzero(keep)]
                    table = table[keep]
            arrays.append(data)
            rows.append(table)
            sources += [path, self.trials_path(ses)]
        data = concatenate_trials(arrays)  # neurocube.load reads it session by session
        trials = pd.concat(rows)
        coords: dict[str, Any] = {"trial": trials.index.to_numpy(dtype=np.int64)}
        coords.update(trial_coords(trials, self._subject_id))
        coords.update(voxel_coords(selection, affine))
        attrs: dict[str, Any] = {
            "subject": self._subject_id,
            "sessions": list(sessions),
            "mask_source": mask_source,
            "voxel_rule": "intersection of per-session noise-ceiling masks",
            "affine": np.asarray(affine).tolist(),
            "grid_shape": [int(n) for n in selection.shape],
            "units": "percent signal change",
            "neurocube_sources": sources,
        }
        if roi is not None:
            attrs["roi"] = [roi] if isinstance(roi, str) else [str(r) for r in roi]
        if nc_threshold is not None:
            attrs["nc_threshold"] = float(nc_threshold)
        if stimuli is not None:
            attrs["stimuli"] = stimuli
        # The variable carries the same attributes: ds.betas alone (cached, grouped, written
        # back with .neuro.to_nifti) still knows its subject, grid and files.
        return xr.Dataset(
            {"betas": (("trial", "voxel"), data, dict(attrs))}, coords=coords, attrs=attrs
        )

    # ------------------------------------------------------------------ noise ceilings

    def noise_ceiling(
        self,
        session: str | Sequence[str] | None = None,
        desc: str | Sequence[str] | None = None,
        roi: roi_ops.RoiQuery | None = None,
        mask: Any = None,
        mask_source: str = "anatomical",
    ) -> Any:
        """Return a noise-ceiling map (percent, 0-100) over the selected voxels, lazily.

        Exactly one of ``session`` (per-session map) and ``desc`` (subject-level
        ``desc-Noiseceiling<token>`` map; ``"12rep"`` or ``"Noiseceiling12rep"``,
        any case) is given. A single value gives a ``noise_ceiling`` DataArray
        ``(voxel,)``; a list gives a Dataset with a ``session`` or ``desc`` dim.
        """
        import xarray as xr

        from neurocube.sources.nifti import open_nifti

        if (session is None) == (desc is None):
            raise SelectionError(
                "noise_ceiling: give exactly one of session= (per-session map) and desc= "
                "(subject-level map)"
            )
        if session is not None:
            dim = "session"
            keys = self._sessions_arg(session)
            paths = [self._nc_session_path(s) for s in keys]
            single = isinstance(session, str) and session != "all"
        else:
            assert desc is not None
            dim = "desc"
            keys = _names(desc, "desc", "a noise-ceiling desc such as '12rep'")
            paths = [self._nc_desc_path(d) for d in keys]
            single = isinstance(desc, str)
        selection, used = self._select(roi=roi, mask=mask, mask_source=mask_source)
        _, affine = self._brain(mask_source)
        flat = selection.reshape(-1)
        grid_attrs = {
            "subject": self._subject_id,
            "units": "percent",
            "affine": np.asarray(affine).tolist(),
            "grid_shape": [int(n) for n in selection.shape],
        }
        maps = []
        for key, path in zip(keys, paths, strict=True):
            try:
                ds = open_nifti(path, mask=flat, **self._read_kwargs(path))
            except GridMismatchError as exc:
                raise GridMismatchError(
                    f"{path}: this noise-ceiling map ({dim} {key}) does not lie on the grid of "
                    f"the {mask_source} brain mask {self.brain_mask_path(mask_source)} (the "
                    f"functional grid, {selection.shape}): {exc}. Use the noise-ceiling map "
                    "written for this grid (or re-download it)."
                ) from exc
            values = ds["data"]  # a 3-D map: (voxel,)
            maps.append(
                xr.DataArray(
                    values.data, dims=("voxel",), coords=voxel_coords(selection, affine),
                    name="noise_ceiling",
                    attrs={**grid_attrs, "source": path, dim: key,
                           "neurocube_sources": [*used, path]},
                )
            )
        if single:
            return maps[0]
        stacked = xr.concat(maps, dim=dim, combine_attrs="drop")
        stacked = stacked.assign_coords({dim: np.asarray(keys, dtype=str)})
        stacked.attrs = {**grid_attrs, "neurocube_sources": [*used, *paths]}
        return stacked.to_dataset(name="noise_ceiling").assign_attrs(stacked.attrs)

    def _nc_desc_path(self, desc: str) -> str:
        rows = self._rows("noise_ceiling_subject")
        wanted = desc.lower()
        for value, path in zip(rows["desc"], rows["path"], strict=True):
            if value.lower() in (wanted, f"noiseceiling{wanted}"):
                return str(path)
        raise SelectionError(
            f"{self._subject_id}: no subject-level noise ceiling desc-{desc}; on disk: "
            f"{sorted(rows['desc'])}"
        )

    # ------------------------------------------------------------------ writing back

    def to_nifti(
        self,
        values: Any,
        path: str | os.PathLike[str],
        roi: roi_ops.RoiQuery | None = None,
        mask: Any = None,
        mask_source: str = "anatomical",
    ) -> Path:
        """Scatter per-voxel values back onto the subject's grid and write NIfTI (atomically).

        ``values`` is a DataArray of this subject with a ``voxel`` dim (e.g.
        ``betas(...).betas.mean("trial")``, a noise-ceiling map, any ROI or
        threshold selection): ``(voxel,)`` gives a 3-D image, ``(voxel, k)`` or
        ``(k, voxel)`` a 4-D one. Or a 1-D array over the voxels selected by
        ``roi`` / ``mask`` / ``mask_source``. Voxels not given are NaN.

        Raises
        ------
        GridMismatchError
            If ``values`` come from another subject or grid (their ``subject``,
            ``grid_shape`` or ``affine`` attributes differ), or an array's length
            is not the number of selected voxels.
        FormatError
            If ``path`` does not end in ``.nii`` or ``.nii.gz``.
        """
        from neurocube.io.nifti import check_nifti_name, save_nifti, scatter_voxels

        final = check_nifti_name(path)
        _, affine = self._brain(mask_source)
        grid = self.grid_shape
        coords = getattr(values, "coords", None)
        placed = coords is not None and ("voxel" in coords or {"i", "j", "k"} <= set(coords))
        if placed and roi is None and mask is None:
            self._check_own(values, affine, grid, final)
            volume = scatter_voxels(values, grid, label=f"to_nifti {final}")
        else:
            selection = self.voxel_selection(roi=roi, mask=mask, mask_source=mask_source)
            flat_values = np.asarray(values, dtype=np.float32).reshape(-1)
            if flat_values.size != int(selection.sum()):
                raise GridMismatchError(
                    f"to_nifti: {flat_values.size} values for {int(selection.sum())} selected "
                    f"voxels (mask_source={mask_source!r}, roi={roi!r}); pass one value per voxel"
                )
            volume = np.full(grid, np.nan, dtype=np.float32)
            volume[selection] = flat_values
        return save_nifti(final, volume, affine, dtype=np.float32)

    def _check_own(self, values: Any, affine: np.ndarray, grid: tuple[int, ...], out: Any) -> None:
        """Refuse per-voxel values whose attributes say they belong to another subject or grid."""
        attrs = getattr(values, "attrs", {})
        where = f"to_nifti {out}"
        subject = attrs.get("subject")
        if subject is not None and subject != self._subject_id:
            raise GridMismatchError(
                f"{where}: the values are {subject}'s, this is {self._subject_id}: subjects lie "
                f"on different grids. Write them with {subject}'s Subject (or "
                "values.neuro.to_nifti(path), which uses the values' own grid)."
            )
        their_grid = attrs.get("grid_shape")
        if their_grid is not None and tuple(int(n) for n in their_grid) != tuple(grid):
            raise GridMismatchError(
                f"{where}: the values lie on a {tuple(their_grid)} grid, {self._subject_id}'s "
                f"functional grid is {tuple(grid)}. Use values.neuro.to_nifti(path) to write "
                "them on their own grid."
            )
        their_affine = attrs.get("affine")
        if their_affine is not None and not np.allclose(
            np.asarray(their_affine, dtype=np.float64), affine, atol=1e-3
        ):
            raise GridMismatchError(
                f"{where}: the values' affine differs from {self._subject_id}'s grid (same "
                f"shape, other position).\nvalues:\n{np.round(np.asarray(their_affine), 4)}\n"
                f"grid:\n{np.round(affine, 4)}"
            )

    # ------------------------------------------------------------------ stimuli

    def stimulus_embeddings(self, model: str, *, trials_per_chunk: int = 1024) -> Any:
        """Return per-trial embeddings of ``model`` as a lazy ``(trial, feature)`` Dataset.

        Rows follow :attr:`metadata` (repeated images repeat their row); the
        float16 values are read from ``task-images_desc-<model>_embeddings.h5``
        when computed, looked up by ``image_ids``. Trials whose image the file
        does not list are NaN. ``embedding_valid`` (per trial) copies the file's
        ``valid`` flag.
        """
        import xarray as xr

        from neurocube.sources.stimuli import open_trial_embeddings

        rows = self._stimuli_files[self._stimuli_files["kind"] == "embeddings"]
        models = sorted(rows["label"])
        if not isinstance(model, str):
            raise ArgumentError(
                f"model={model!r}: expected the name of an embedding model (one of {models}), "
                f"found {type(model).__name__}"
            )
        path = self._stimuli_file(
            "embeddings", f"task-images_desc-{model}_embeddings.h5 (models on disk: {models})",
            label=model,
        )
        metadata = self.metadata
        values, valid = open_trial_embeddings(
            path, metadata["image_name"].to_numpy(dtype=str), trials_per_chunk=trials_per_chunk,
            storage_options=self.storage_options,
        )
        coords: dict[str, Any] = {"trial": metadata.index.to_numpy(dtype=np.int64)}
        coords.update(trial_coords(metadata, self._subject_id))
        coords["embedding_valid"] = ("trial", valid)
        model_name = str(rows[rows["label"].str.lower() == model.lower()]["label"].iloc[0])
        return xr.Dataset(
            {"embedding": (("trial", "feature"), values)},
            coords=coords,
            attrs={"model": model_name, "subject": self._subject_id, "neurocube_sources": [path]},
        )

    def to_torch_dataset(
        self,
        sessions: str | Sequence[str] | None,
        *,
        roi: roi_ops.RoiQuery | None = None,
        nc_threshold: float | None = None,
        stimuli: str | None = None,
        embeddings: str | None = None,
        images: bool | str = False,
        captions: bool | str = False,
        **kwargs: Any,
    ) -> Any:
        """Return the selected trials as a map-style dataset for ``torch.utils.data.DataLoader``.

        Items are dicts: ``betas`` (float32, per voxel), ``embedding``
        (``embeddings="CLIP"``), ``image`` (``images=True`` / ``"array"``),
        ``captions`` (``captions=True`` / ``"first"``) and the trial's labels.
        neurocube does not import torch. See
        :func:`neurocube.datasets.training.trial_dataset` for every option
        (``mask``, ``mask_source``, ``chunks``, ``cache_chunks``, ``prefetch``).
        """
        from neurocube.datasets.training import trial_dataset

        return trial_dataset(
            self, sessions, roi=roi, nc_threshold=nc_threshold, stimuli=stimuli,
            embeddings=embeddings, images=images, captions=captions, **kwargs,
        )

    @property
    def images(self) -> Any:
        """Per-trial stimulus JPEG bytes, read lazily (a ``TrialImages``)."""
        from neurocube.sources.stimuli import TrialImages

        path = self._stimuli_file("stimuli_images", "task-images_stimuli.h5")
        metadata = self.metadata
        return TrialImages(
            path, metadata["stim_idx"].to_numpy(dtype=np.int64),
            storage_options=self.storage_options,
        )

    @property
    def captions(self) -> pd.DataFrame:
        """Captions table (``task-images_desc-captions.csv``), every cell as text."""
        path = self._stimuli_file("captions", "task-images_desc-captions.csv")
        return read_csv(path, storage_options=self.storage_options)

    @property
    def segmentations(self) -> Any:
        """Segmentation masks: lazy ``masks (mask, height, width)`` with metadata coords."""
        from neurocube.sources.stimuli import open_segmentations

        path = self._stimuli_file("segmentations", "task-images_desc-segmentations.h5")
        meta_path = self._stimuli_file(
            "segmentations_metadata", "task-images_desc-segmentations_metadata.csv"
        )
        return open_segmentations(path, meta_path, storage_options=self.storage_options)


# ---------------------------------------------------------------------- helpers

#: Default size of a betas chunk, counted in *selected* voxels (the output), not in whole volumes.
BETAS_CHUNK_BYTES = 32 << 20


def _trials_per_chunk(n_voxels: int, itemsize: int = 4) -> int:
    """Trials per chunk for ``n_voxels`` selected voxels: about :data:`BETAS_CHUNK_BYTES` each.

    ``open_nifti``'s ``"auto"`` counts whole volumes (32 MiB of *input*), so a ROI of a few
    thousand voxels got chunks of a dozen trials holding a few hundred kB: a group-by over
    ``image_name`` then worked on hundreds of tiny pieces (flox splits each chunk by the groups
    in it, down to single trials). Chunks sized by what they hold keep a ROI's session in one
    chunk and a whole-brain selection in chunks of tens of trials; a task still reads its
    volumes a few MiB at a time, so memory per task is the chunk plus that buffer.
    """
    return max(1, BETAS_CHUNK_BYTES // max(n_voxels * itemsize, 1))


def _res(res: str | None) -> str:
    if res in (None, "", "full"):
        return ""
    if res not in ("1pt8", "1pt5"):
        raise SelectionError(f"res={res!r}: expected '1pt8', '1pt5' or None (full resolution)")
    return str(res)


def _mask_source(source: str) -> str:
    if source not in MASK_SOURCES:
        raise SelectionError(f"mask_source={source!r}: expected one of {list(MASK_SOURCES)}")
    return source


def _stimuli_filter(stimuli: str) -> str:
    if stimuli not in STIMULI_FILTERS:
        raise SelectionError(f"stimuli={stimuli!r}: expected 'shared', 'unique' or None")
    return stimuli


def _read_func_gii(path: str, storage_options: Any = None) -> np.ndarray:
    import nibabel as nib

    with storage.open_file(path, "rb", storage_options, block_size=SIDECAR_BLOCK) as handle:
        raw = handle.read()
    try:
        image = nib.GiftiImage.from_bytes(raw)
    except Exception as exc:
        raise FormatError(f"{path}: not a GIFTI file ({exc})") from exc
    if not image.darrays:
        raise FormatError(f"{path}: a GIFTI file without data arrays; expected a vertex mask")
    return np.asarray(image.darrays[0].data)


def _read_label(path: str, storage_options: Any = None) -> np.ndarray:
    with storage.open_file(path, "rb", storage_options, block_size=SIDECAR_BLOCK) as handle:
        lines = handle.read().decode("ascii", errors="replace").splitlines()
    try:
        count = int(lines[1].strip())
        vertices = [int(line.split()[0]) for line in lines[2 : 2 + count]]
    except (IndexError, ValueError) as exc:
        raise FormatError(
            f"{path}: not a FreeSurfer ASCII label (expected a comment line, a count, then "
            f"'vertex x y z value' rows): {exc}"
        ) from exc
    if len(vertices) != count:
        raise FormatError(f"{path}: header announces {count} vertices, {len(vertices)} found")
    return np.asarray(vertices, dtype=np.int64)


# ---------------------------------------------------------------------- opening


def open_subject(
    root: str | os.PathLike[str],
    subject: str | int,
    *,
    chunks: Any = "auto",
    catalog: pd.DataFrame | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Subject:
    """Open one subject of a betas bucket (reads file names only).

    Parameters
    ----------
    root
        Bucket root (holding ``derivatives/`` and ``stimuli/``): a folder or a
        URL such as ``"s3://laion-fmri"``.
    subject
        ``"sub-03"``, or an int: the n-th subject in sorted order.
    chunks
        Default betas chunking along ``trial`` (see :func:`neurocube.open_nifti`).
    catalog
        A scan of the bucket to reuse.
    storage_options
        fsspec options for a URL: ``{"anon": True}`` for a public bucket, or
        ``{"key": ..., "secret": ..., "client_kwargs": {"endpoint_url": ...}}``.
        Every later read of the subject (trial tables, masks, betas, stimuli)
        uses them, Dask workers included.

    Raises
    ------
    DataNotFoundError
        If ``root`` is not a folder (or a prefix holding objects).
    SelectionError
        If the subject is unknown or the index out of range.
    AccessDeniedError, StorageError
        If a bucket refuses the listing or cannot be reached.

    Examples
    --------
    >>> sub = open_subject("s3://laion-fmri", "sub-01",
    ...                    storage_options={"anon": True})  # doctest: +SKIP
    """
    location = storage.normalize(root)
    opts = storage.as_options(storage_options)
    if catalog is not None and not (
        isinstance(catalog, pd.DataFrame) and {"kind", "subject", "path"} <= set(catalog.columns)
    ):
        raise ArgumentError(
            f"catalog={type(catalog).__name__}: expected a scan of the bucket "
            "(neurocube.catalog.fmri.scan_bucket(root)) or None"
        )
    table = scan_bucket(location, opts) if catalog is None else catalog
    if isinstance(subject, (int, np.integer)) and not isinstance(subject, bool):
        known = subject_ids(table)
        if not -len(known) <= int(subject) < len(known):
            raise SelectionError(
                f"{location}: subject index {subject} out of range; the bucket has {len(known)} "
                f"subjects {known}"
            )
        subject = known[int(subject)]
    if not isinstance(subject, str):
        raise SelectionError(f"subject must be 'sub-XX' or an int, got {subject!r}")
    return Subject(location, subject, catalog=table, chunks=chunks, storage_options=opts)


def open_subjects(
    root: str | os.PathLike[str],
    subjects: Sequence[str | int] | None = None,
    *,
    chunks: Any = "auto",
    storage_options: Mapping[str, Any] | None = None,
) -> list[Subject]:
    """Open several subjects of one bucket (one scan shared by all); None opens every subject.

    ``root`` may be a URL, read with ``storage_options`` (see :func:`open_subject`).
    """
    location = storage.normalize(root)
    opts = storage.as_options(storage_options)
    table = scan_bucket(location, opts)
    chosen: Sequence[str | int] = (
        subject_ids(table) if subjects is None
        else _names(subjects, "subjects", "a subject id such as 'sub-01' or an index",
                    items=(str, int, np.integer))
    )
    return [
        open_subject(location, s, chunks=chunks, catalog=table, storage_options=opts)
        for s in chosen
    ]


def roi_means(
    subjects: Sequence[Subject] | Mapping[str, Subject],
    roi: roi_ops.RoiQuery,
    *,
    session: str | Sequence[str] | None = None,
    nc_threshold: float | None = None,
    stimuli: str | None = None,
    mask_source: str = "anatomical",
    by_image: bool = False,
) -> Any:
    """Mean betas over a ROI's voxels for several subjects, lazily.

    Subjects lie on different grids, so they are compared per ROI: each
    subject's ROI (its own files) is reduced to its mean over voxels (NaN
    voxels skipped) per trial.

    Parameters
    ----------
    subjects
        Subjects from :func:`open_subjects` (a list or a dict).
    roi
        ROI query, resolved per subject.
    session, nc_threshold, stimuli, mask_source
        As in :meth:`Subject.betas` (``session=None``: every session).
    by_image
        Average repeated presentations: dims ``(subject, image_name)`` over the
        union of the subjects' images (NaN where a subject did not see one).

    Returns
    -------
    xarray.Dataset
        ``roi_mean`` with dims ``(subject, trial)``: ``trial`` is the position
        within each subject's selection, padded with NaN to the longest
        subject; per-trial coords become ``(subject, trial)`` arrays (``""`` /
        -1 where padded). With ``by_image``: ``(subject, image_name)``, plus
        ``n_trials`` (presentations averaged).
    """
    import dask.array as da
    import xarray as xr

    subs = (
        list(subjects.values()) if isinstance(subjects, Mapping)
        else _names(subjects, "subjects", "a Subject (from neurocube.open_subjects)",
                    items=Subject)
    )
    wrong = [s for s in subs if not isinstance(s, Subject)]
    if wrong:
        raise ArgumentError(
            f"roi_means: expected Subjects (from neurocube.open_subjects), found {wrong[0]!r} "
            f"({type(wrong[0]).__name__})"
        )
    if not subs:
        raise SelectionError("roi_means: no subject given")
    means = []
    sources: list[str] = []
    for sub in subs:
        ds = sub.betas(
            session, roi=roi, nc_threshold=nc_threshold, stimuli=stimuli, mask_source=mask_source
        )
        if ds.sizes["voxel"] == 0:
            raise SelectionError(
                f"{sub.subject_id}: ROI {roi!r} keeps no voxel (nc_threshold={nc_threshold}); "
                "lower the threshold or pick another ROI"
            )
        means.append(ds["betas"].mean("voxel", skipna=True))
        sources += [p for p in ds.attrs["neurocube_sources"] if p not in sources]
    names = np.asarray([s.subject_id for s in subs], dtype=str)
    attrs: dict[str, Any] = {
        "roi": [roi] if isinstance(roi, str) else [str(r) for r in roi],
        "mask_source": mask_source,
        "neurocube_sources": sources,
    }
    if nc_threshold is not None:
        attrs["nc_threshold"] = float(nc_threshold)
    if by_image:
        images = sorted(
            {str(n) for m in means for n in np.asarray(m["image_name"].values).tolist()},
            key=natural_key,
        )
        position = {name: g for g, name in enumerate(images)}
        rows_mean = []
        rows_count = []
        for mean in means:
            # (image, trial) indicator: each image's mean is one small matrix product, so the
            # result stays one chunk per subject whatever the number of images.
            groups = np.asarray([position[str(n)] for n in mean["image_name"].values])
            indicator = np.zeros((len(images), groups.size), dtype=np.float32)
            indicator[groups, np.arange(groups.size)] = 1.0
            values = mean.data
            finite = ~da.isnan(values)
            total = da.dot(indicator, da.where(finite, values, 0).astype(np.float32))
            count = da.dot(indicator, finite.astype(np.float32))
            with np.errstate(invalid="ignore", divide="ignore"):
                rows_mean.append(total / da.where(count > 0, count, np.nan))
            rows_count.append(indicator.sum(axis=1).astype(np.int64))
        out = xr.Dataset(
            {
                "roi_mean": (("subject", "image_name"), da.stack(rows_mean, axis=0)),
                "n_trials": (("subject", "image_name"), np.vstack(rows_count)),
            },
            coords={"subject": names, "image_name": np.asarray(images, dtype=str)},
        )
        out["roi_mean"].attrs.update(attrs)
        return out.assign_attrs(attrs)
    longest = max(m.sizes["trial"] for m in means)
    padded = []
    trial_coords: dict[str, list[np.ndarray]] = {}
    for mean in means:
        n = mean.sizes["trial"]
        data = mean.data
        if n < longest:
            data = da.concatenate(
                [data, da.full((longest - n,), np.nan, dtype=data.dtype, chunks=longest - n)]
            )
        padded.append(data)
        for name, coord in mean.coords.items():
            if name == "subject" or coord.dims != ("trial",):
                continue
            trial_coords.setdefault(str(name), []).append(_pad(np.asarray(coord.values), longest))
    coords: dict[str, Any] = {"subject": names, "trial": np.arange(longest, dtype=np.int64)}
    for name, columns in trial_coords.items():
        if len(columns) != len(means):
            continue  # a column only some subjects have
        stacked = np.vstack(columns)
        coords["global_trial" if name == "trial" else name] = (("subject", "trial"), stacked)
    values = da.stack(padded, axis=0)
    return xr.Dataset(
        {"roi_mean": (("subject", "trial"), values, dict(attrs))}, coords=coords, attrs=attrs
    )


def _pad(values: np.ndarray, length: int) -> np.ndarray:
    """Pad a 1-D coordinate to ``length``: ``""`` for text, -1 for ints, NaN for floats."""
    if values.size == length:
        return values.astype(str) if values.dtype.kind in "USO" else values
    if values.dtype.kind in "USO":
        return np.asarray([*(str(v) for v in values), *[""] * (length - values.size)], dtype=str)
    if values.dtype.kind in "iu":
        return np.concatenate([values, np.full(length - values.size, -1, dtype=values.dtype)])
    out = np.full(length, np.nan, dtype=np.float64)
    out[: values.size] = values
    return out
