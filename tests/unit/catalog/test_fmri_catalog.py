"""Catalog of a betas bucket: every kind of file found by name, older layouts, speed."""

from __future__ import annotations

import builtins
import os
import shutil
import time
from pathlib import Path

import pytest

from neurocube.catalog.fmri import COLUMNS, parse_entities, scan_bucket, subject_ids
from neurocube.errors import DataNotFoundError, FormatError
from neurocube.synthetic.bucket import make_bucket

SAMPLE = Path(__file__).parents[2] / "data" / "laion_fmri_bucket"


def test_sample_bucket_kinds_and_subjects():
    table = scan_bucket(SAMPLE)
    assert list(table.columns) == list(COLUMNS)
    counts = table["kind"].value_counts().to_dict()
    assert counts == {
        "roi": 20, "anatomical": 8, "brain_mask": 4, "trials": 4, "betas": 4,
        "noise_ceiling_session": 4, "noise_ceiling_subject": 2, "r2mean": 2,
        "embeddings": 1, "stimuli_metadata": 1, "stimuli_images": 1,
    }
    assert subject_ids(table) == ["sub-01", "sub-03"]
    betas = table[table.kind == "betas"]
    assert betas[["subject", "session"]].values.tolist() == [
        ["sub-01", "ses-01"], ["sub-01", "ses-02"], ["sub-03", "ses-01"], ["sub-03", "ses-02"],
    ]
    rois = table[(table.kind == "roi") & (table.subject == "sub-01")]
    assert sorted(set(zip(rois.category, rois.label, strict=True))) == [
        ("hlviscat", "hlvis"), ("visualcat", "visual"),
    ]
    assert sorted(rois.fmt.unique()) == ["func.gii", "label", "nii.gz"]
    assert sorted(rois[rois.fmt == "label"].hemi) == ["L", "L", "R", "R"]
    masks = table[table.kind == "brain_mask"]
    assert sorted(masks.res) == ["", "", "1pt8", "1pt8"]
    assert table[table.kind == "noise_ceiling_subject"].desc.unique().tolist() == [
        "Noiseceiling12rep"
    ]
    assert table[table.kind == "embeddings"].label.tolist() == ["CLIP"]
    # every value is a plain str: the table is serialisable as is
    assert all(isinstance(v, str) for v in table.to_numpy().ravel())
    assert all(os.path.isabs(p) for p in table.path)


def test_synthetic_bucket_catalogues_every_kind(tmp_path):
    truth = make_bucket(tmp_path, subjects=2, sessions=3, trials=8, grid=(5, 6, 4))
    table = scan_bucket(tmp_path)
    kinds = set(table.kind)
    assert {
        "betas", "trials", "noise_ceiling_session", "noise_ceiling_subject", "r2mean",
        "brain_mask", "anatomical", "roi", "freesurfer", "stimuli_images", "stimuli_metadata",
        "embeddings", "segmentations", "segmentations_metadata", "captions",
    } <= kinds
    assert "other" not in kinds
    assert len(table[table.kind == "betas"]) == 6
    assert sorted(table[table.kind == "embeddings"].label) == sorted(truth.embedding_models)
    freesurfer = table[table.kind == "freesurfer"]
    assert freesurfer.subject.tolist() == ["sub-01", "sub-02"]
    assert freesurfer.fmt.unique().tolist() == ["dir"]  # the recon is not descended into
    rois = table[(table.kind == "roi") & (table.subject == "sub-02") & (table.fmt == "nii.gz")]
    assert sorted(set(rois.category)) == ["face", "place"]
    assert sorted(rois.label) == sorted(n for ns in truth.subjects["sub-02"].roi_categories.values()
                                        for n in ns)


def test_scan_reads_names_only(tmp_path, monkeypatch):
    make_bucket(tmp_path, subjects=1, sessions=1, trials=4, grid=(4, 4, 4))

    def refuse_open(*args, **kwargs):
        raise AssertionError(f"scan opened a file: {args[:1]}")

    monkeypatch.setattr(builtins, "open", refuse_open)
    table = scan_bucket(tmp_path)
    assert len(table) > 20


def test_older_layouts_are_catalogued_with_their_layout_name(tmp_path):
    glm = tmp_path / "derivatives/glmsingle-tedana/sub-01"
    (glm / "ses-01/func").mkdir(parents=True)
    old = "sub-01_ses-01_task-images_desc-singletrial_stat-effect_statmap.nii.gz"
    (glm / "ses-01/func" / old).touch()
    (glm / "sub-01_task-images_space-T1w_desc-meanR2gt15mask_mask.nii.gz").touch()
    atlas = tmp_path / "derivatives/atlases/sub-01/rois"
    atlas.mkdir(parents=True)
    (atlas / "FFA.nii.gz").touch()
    (tmp_path / "stimuli").mkdir()
    (tmp_path / "stimuli/stimuli.tsv").touch()
    table = scan_bucket(tmp_path).set_index("kind")
    assert table.loc["betas", "layout"] == "desc-singletrial_stat-effect"
    assert table.loc["betas", "session"] == "ses-01"
    assert table.loc["r2mask_legacy", "layout"] == "desc-meanR2gt15mask_mask"
    assert table.loc["roi", "label"] == "FFA"
    assert table.loc["roi", "category"] == "atlases"
    assert table.loc["stimuli_table_legacy", "path"].endswith("stimuli/stimuli.tsv")


def test_not_a_bucket(tmp_path):
    with pytest.raises(DataNotFoundError, match="not a folder"):
        scan_bucket(tmp_path / "missing")
    (tmp_path / "data.txt").touch()
    with pytest.raises(FormatError, match=r"not a betas bucket: expected a derivatives/"):
        scan_bucket(tmp_path)


def test_parse_entities():
    assert parse_entities("sub-01_ses-PrismaAnat_space-T1w_res-1pt8_desc-brain_mask.nii.gz") == (
        {"sub": "01", "ses": "PrismaAnat", "space": "T1w", "res": "1pt8", "desc": "brain"},
        "mask", "nii.gz",
    )
    assert parse_entities("README") == ({}, "README", "")


def test_subjects_sort_naturally(tmp_path):
    for sub in ("sub-10", "sub-2", "sub-01"):
        (tmp_path / "derivatives/glmsingle-tedana" / sub).mkdir(parents=True)
        (tmp_path / "derivatives/glmsingle-tedana" / sub / f"{sub}_x.txt").touch()
    assert subject_ids(scan_bucket(tmp_path)) == ["sub-01", "sub-2", "sub-10"]


def _many_files(root, n_subjects: int, n_sessions: int, per_folder: int) -> None:
    for sub in range(n_subjects):
        for ses in range(n_sessions):
            folder = root / f"derivatives/glmsingle-tedana/sub-{sub:02d}/ses-{ses:02d}/func"
            folder.mkdir(parents=True)
            for k in range(per_folder):
                fd = os.open(folder / f"sub-{sub:02d}_ses-{ses:02d}_run-{k}_x_statmap.nii.gz",
                             os.O_CREAT | os.O_WRONLY)
                os.close(fd)


def _count_scandirs_and_refuse_stats(monkeypatch, root):
    """Count os.scandir calls; fail on os.stat / os.lstat / open of anything inside the bucket.

    The root and its two top folders may be checked (is it a bucket?); every file and folder
    below them must be classified from the directory listing alone.
    """
    allowed = {str(root), str(root / "derivatives"), str(root / "stimuli")}
    calls = {"scandir": 0}
    real_scandir, real_stat, real_lstat = os.scandir, os.stat, os.lstat

    def scandir(path="."):
        calls["scandir"] += 1
        return real_scandir(path)

    def guard(real):
        def checked(path, *args, **kwargs):
            text = os.fspath(path) if not isinstance(path, int) else ""
            if text.startswith(str(root) + os.sep) and text not in allowed:
                raise AssertionError(f"scan called stat on {text}")
            return real(path, *args, **kwargs)
        return checked

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "stat", guard(real_stat))
    monkeypatch.setattr(os, "lstat", guard(real_lstat))
    monkeypatch.setattr(builtins, "open", lambda *a, **k: pytest.fail(f"scan opened {a[:1]}"))
    return calls


def _n_folders(root) -> int:
    return 1 + sum(len(dirs) for _, dirs, _ in os.walk(root))


def test_scan_work_is_one_listing_per_folder(tmp_path, monkeypatch):
    # Speed by construction, not by wall time: one os.scandir per folder, no stat and no open
    # of any file (a name-only scan), so its cost grows with the number of names only.
    _many_files(tmp_path, 5, 6, 100)
    n_folders = _n_folders(tmp_path)
    calls = _count_scandirs_and_refuse_stats(monkeypatch, tmp_path)
    table = scan_bucket(tmp_path)
    monkeypatch.undo()
    assert len(table) == 3_000
    assert (table.kind == "other").all()
    assert calls["scandir"] == n_folders


@pytest.mark.slow
def test_scan_of_100k_files(tmp_path, monkeypatch):
    root = tmp_path / "bucket"
    _many_files(root, 10, 40, 250)
    n_folders = _n_folders(root)
    calls = _count_scandirs_and_refuse_stats(monkeypatch, root)
    start = time.perf_counter()
    table = scan_bucket(root)
    elapsed = time.perf_counter() - start
    monkeypatch.undo()
    # the time is printed as a figure (docs/fmri.md), never asserted
    print(f"scan of {len(table)} files in {n_folders} folders: {elapsed:.2f} s")
    assert len(table) == 100_000
    assert calls["scandir"] == n_folders
    shutil.rmtree(root)
