"""Discovery and catalog of coco-pipe embedding derivatives (headers only)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import neurocube.sources.npz as npz_source
from neurocube.catalog.embeddings import (
    catalog_embeddings,
    discover_embedding_artifacts,
    guess_npz_embedding,
    parse_entities,
    scan_artifact,
)
from neurocube.errors import (
    DataNotFoundError,
    FormatError,
    NeurocubeWarning,
    TruncatedFileError,
    UnsafeDataError,
)
from tests.fixtures.embeddings_tree import make_tree

SAMPLE = Path(__file__).parents[2] / "data" / "coco_pipe" / "eeg_foundation_embeddings"


@pytest.fixture
def no_array_reads(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("array data was read")

    monkeypatch.setattr(npz_source, "_fill", forbidden)
    monkeypatch.setattr(npz_source, "_inflate", forbidden)


def test_sample_discovery_falls_back_to_scan():
    # The sample's manifest paths are relative to the BIDS root, so none resolves
    # against the derivative root and discovery scans the folder (as coco-pipe does).
    embeddings = discover_embedding_artifacts(SAMPLE)
    tokens = discover_embedding_artifacts(SAMPLE, kind="token")
    assert [p.name for p in embeddings] == sorted(p.name for p in SAMPLE.rglob("*_embedding.npz"))
    assert len(embeddings) == 4 and len(tokens) == 4
    assert all(p.name.endswith("_tokens.npz") for p in tokens)
    assert discover_embedding_artifacts(SAMPLE, model_key="CBRAMOD") == embeddings
    assert discover_embedding_artifacts(SAMPLE, model_key="labram") == []


def test_sample_catalog_reads_headers_only(no_array_reads):
    table = catalog_embeddings(SAMPLE)
    assert len(table) == 4
    assert list(table["subject"]) == ["0001", "0001", "0002", "0002"]
    assert list(table["run"]) == ["01", "02", "01", "02"]
    assert set(table["model_key"]) == {"cbramod"}
    assert list(table["n_windows"]) == [3] * 4
    assert list(table["n_features"]) == [4] * 4
    assert table["shape_window_embeddings"].tolist() == [(3, 4)] * 4
    assert table["entity_desc"].tolist() == ["cbramodEOMean"] * 4
    assert table["compressed"].all()
    tokens = catalog_embeddings(SAMPLE, kind="token")
    assert tokens["shape_token_embeddings"].tolist() == [(3, 19, 5, 4)] * 4
    assert set(tokens["kind"]) == {"token"}


def test_manifest_success_records_only(tmp_path):
    recordings = make_tree(tmp_path, models=("cbramod",), conditions=("EO",))
    found = discover_embedding_artifacts(tmp_path)
    assert found == sorted(r.path for r in recordings)
    assert not any(
        "sub-99" in str(p) for p in found
    )  # the failed record's file exists but is skipped


def test_manifest_wins_over_scan(tmp_path):
    recordings = make_tree(tmp_path, models=("cbramod",), conditions=("EO",))
    manifest = json.loads((tmp_path / "run_manifest.json").read_text())
    manifest["records"] = manifest["records"][:2]
    (tmp_path / "run_manifest.json").write_text(json.dumps(manifest))
    assert discover_embedding_artifacts(tmp_path) == sorted(r.path for r in recordings[:2])


def test_model_key_case_insensitive_with_rescan(tmp_path):
    recordings = make_tree(tmp_path, failed_record=False)
    labram = sorted(r.path for r in recordings if r.model_key == "Labram")
    # keep only cbramod records in the manifest: labram is found by the rescan
    manifest = json.loads((tmp_path / "run_manifest.json").read_text())
    manifest["records"] = [r for r in manifest["records"] if r.get("model_key") == "cbramod"]
    (tmp_path / "run_manifest.json").write_text(json.dumps(manifest))
    assert discover_embedding_artifacts(tmp_path, model_key="LABRAM") == labram


def test_manifest_outside_root_warns(tmp_path):
    make_tree(tmp_path / "a", models=("cbramod",), conditions=("EO",), subjects=("01",))
    outside = make_tree(tmp_path / "b", models=("cbramod",), conditions=("EO",), subjects=("02",))
    manifest = {
        "records": [
            {
                "artifact_path": f"../b/{outside[0].path.relative_to(tmp_path / 'b')}",
                "status": "success",
            },
            {"artifact_path": str(outside[1].path), "status": "success"},
        ]
    }
    (tmp_path / "a" / "run_manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(
        NeurocubeWarning, match=r"run_manifest\.json: record artifact_path .* outside"
    ):
        found = discover_embedding_artifacts(tmp_path / "a")
    assert found and all(str(p).startswith(str(tmp_path / "a")) for p in found)


def test_unreadable_manifest_warns_and_scans(tmp_path):
    recordings = make_tree(tmp_path, models=("cbramod",), conditions=("EO",), failed_record=False)
    (tmp_path / "run_manifest.json").write_text("{not json")
    with pytest.warns(NeurocubeWarning, match=r"run_manifest\.json: unreadable run manifest"):
        found = discover_embedding_artifacts(tmp_path)
    assert found == sorted(r.path for r in recordings)


def test_catalog_filters_condition(tmp_path):
    make_tree(tmp_path)
    table = catalog_embeddings(tmp_path, model_key="cbramod", condition="EC")
    assert set(table["condition"]) == {"EC"} and set(table["model_key"]) == {"cbramod"}
    assert len(table) == 6


def test_parse_entities():
    assert parse_entities("sub-0001_ses-01_task-rest_run-02_desc-xEOMean_embedding.npz") == {
        "sub": "0001",
        "ses": "01",
        "task": "rest",
        "run": "02",
        "desc": "xEOMean",
    }


def _one(tmp_path) -> Path:
    src = next(SAMPLE.rglob("*run-01_desc-cbramodEOMean_embedding.npz"))
    dst = tmp_path / src.name
    shutil.copy(src, dst)
    shutil.copy(src.with_suffix(".json"), dst.with_suffix(".json"))
    return dst


def test_missing_sidecar(tmp_path):
    path = _one(tmp_path)
    path.with_suffix(".json").unlink()
    with pytest.raises(
        DataNotFoundError, match=r"cbramodEOMean_embedding\.json: missing embedding sidecar"
    ):
        scan_artifact(path)
    assert not guess_npz_embedding(path)


def test_sidecar_not_an_object(tmp_path):
    path = _one(tmp_path)
    path.with_suffix(".json").write_text("[1, 2, 3]")
    with pytest.raises(
        FormatError, match=r"_embedding\.json: expected a JSON object .* found a list"
    ):
        scan_artifact(path)


def test_corrupt_npz(tmp_path):
    path = _one(tmp_path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(TruncatedFileError, match=r"_embedding\.npz: not a complete NPZ"):
        scan_artifact(path)


def test_object_dtype_member(tmp_path):
    path = _one(tmp_path)
    with np.load(path) as payload:
        arrays = dict(payload)
    arrays["window_index"] = np.array([0, 1, "x"], dtype=object)
    np.savez_compressed(path, **arrays)
    with pytest.raises(
        UnsafeDataError, match=r"_embedding\.npz: array 'window_index' has an object dtype"
    ):
        scan_artifact(path)


def test_unequal_lengths(tmp_path):
    path = _one(tmp_path)
    with np.load(path) as payload:
        arrays = dict(payload)
    arrays["window_stop"] = arrays["window_stop"][:2]
    np.savez_compressed(path, **arrays)
    with pytest.raises(
        FormatError, match=r"window_stop has shape \(2,\); its length must equal the 3 rows"
    ):
        scan_artifact(path)


def test_guess_npz_embedding(tmp_path):
    path = _one(tmp_path)
    assert guess_npz_embedding(path)
    assert not guess_npz_embedding(path.with_suffix(".json"))
    assert not guess_npz_embedding(tmp_path / "missing.npz")
    fake = tmp_path / "fake_embedding.npz"
    fake.write_bytes(b"\x93NUMPY not a zip")
    fake.with_suffix(".json").write_text("{}")
    assert not guess_npz_embedding(fake)


def test_native_token_contract_needs_token_source(tmp_path):
    # coco-pipe's validator refuses a native token file without token_source; so do we
    src = next(SAMPLE.rglob("*run-01_desc-cbramodEONative_tokens.npz"))
    dst = tmp_path / src.name
    shutil.copy(src, dst)
    sidecar = json.loads(src.with_suffix(".json").read_text())
    assert scan_artifact(src).kind == "token"
    del sidecar["token_source"]
    dst.with_suffix(".json").write_text(json.dumps(sidecar))
    with pytest.raises(FormatError, match=r"_tokens\.json: token_source is missing"):
        scan_artifact(dst)


def _set_sidecar(path: Path, **values) -> None:
    sidecar = path.with_suffix(".json")
    metadata = json.loads(sidecar.read_text())
    metadata.update(values)
    sidecar.write_text(json.dumps(metadata))


def test_damaged_model_key_in_a_sidecar_is_reported_not_dropped(tmp_path):
    recordings = make_tree(tmp_path, models=("cbramod",), conditions=("EO",), failed_record=False)
    damaged = recordings[1].path
    _set_sidecar(damaged, model_key="cbramoe")  # one byte changed: another model, per the sidecar
    with pytest.raises(FormatError, match=r"model_key is 'cbramoe', but the file name .* names "
                                          r"'cbramod'"):
        discover_embedding_artifacts(tmp_path, model_key="cbramod")
    with pytest.warns(NeurocubeWarning, match="cbramoe"):
        found = discover_embedding_artifacts(tmp_path, model_key="cbramod", on_error="skip")
    assert found == sorted(r.path for r in recordings if r.path != damaged)


def test_damaged_condition_in_a_sidecar_is_reported_not_dropped(tmp_path):
    recordings = make_tree(tmp_path, models=("cbramod",), failed_record=False)
    damaged = next(r.path for r in recordings if "cbramodEC" in r.path.name)
    _set_sidecar(damaged, condition="EO")
    with pytest.raises(FormatError, match=r"condition is 'EO', but the file name .* names 'EC'"):
        catalog_embeddings(tmp_path, model_key="cbramod", condition="EC")
    import neurocube

    with pytest.warns(NeurocubeWarning, match="names 'EC'"):
        ds = neurocube.open_embeddings(tmp_path, model_key="cbramod", condition="EC",
                                       on_error="skip")
    assert ds.attrs["skipped"] == [str(damaged)]
    assert ds.sizes["recording"] == sum("cbramodEC" in r.path.name for r in recordings) - 1
    # the damaged one spells EC in its name: it is not reported under the other condition
    assert len(catalog_embeddings(tmp_path, model_key="cbramod", condition="EO")) == sum(
        "cbramodEO" in r.path.name for r in recordings
    ) + 1


def test_names_and_sidecars_that_agree_are_filtered_quietly(tmp_path):
    recordings = make_tree(tmp_path, models=("cbramod",), conditions=("EO",), failed_record=False)
    # a model whose key starts with another's: its files spell both, its sidecar the longer one
    other = recordings[0].path
    renamed = other.with_name(other.name.replace("desc-cbramod", "desc-cbramodv2"))
    other.rename(renamed)
    other.with_suffix(".json").rename(renamed.with_suffix(".json"))
    _set_sidecar(renamed, model_key="cbramodV2")
    # a file named by another scheme keeps its sidecar's word
    plain = recordings[1].path
    named = plain.with_name(plain.name.replace("desc-cbramodEOMean", "desc-pooled"))
    plain.rename(named)
    plain.with_suffix(".json").rename(named.with_suffix(".json"))
    _set_sidecar(named, model_key="labram")
    (tmp_path / "run_manifest.json").unlink()
    found = discover_embedding_artifacts(tmp_path, model_key="cbramod")
    assert sorted(found) == sorted(r.path for r in recordings[2:])
    assert discover_embedding_artifacts(tmp_path, model_key="cbramodv2") == [renamed]
