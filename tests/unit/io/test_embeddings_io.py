"""Embedding derivative writers: coco-pipe's layout, atomic, validated."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

import neurocube
from neurocube.errors import DataNotFoundError, FormatError, OutputExistsError, UnsafeDataError
from neurocube.io import (
    save_embedding_derivative,
    validate_embedding_derivative,
    write_embedding_dataset_description,
    write_embedding_manifest,
)

SAMPLE = Path(__file__).parents[2] / "data" / "coco_pipe" / "eeg_foundation_embeddings"
POOLED = next(SAMPLE.rglob("*run-01_desc-cbramodEOMean_embedding.npz"))
TOKENS = next(SAMPLE.rglob("*run-01_desc-cbramodEONative_tokens.npz"))


def _arrays(n_windows=3, width=5):
    return {
        "window_embeddings": np.arange(n_windows * width, dtype=np.float32).reshape(
            n_windows, width
        ),
        "recording_embedding": np.arange(width, dtype=np.float32) + 0.5,
        "window_start": np.arange(n_windows, dtype=np.int64) * 100,
        "window_stop": np.arange(n_windows, dtype=np.int64) * 100 + 100,
        "window_index": np.arange(n_windows, dtype=np.int64),
    }


def _metadata(path):
    metadata = json.loads(path.with_suffix(".json").read_text())
    metadata.pop("created_at")
    metadata.pop("arrays")
    return metadata


def test_rewrite_of_the_sample_matches_coco_pipe(tmp_path):
    for source in (POOLED, TOKENS):
        with np.load(source) as payload:
            arrays = dict(payload)
        target = tmp_path / source.name
        npz, sidecar = save_embedding_derivative(arrays, target, _metadata(source))
        assert (npz, sidecar) == (target, target.with_suffix(".json"))
        ours, theirs = (
            json.loads(sidecar.read_text()),
            json.loads(source.with_suffix(".json").read_text()),
        )
        ours.pop("created_at"), theirs.pop("created_at")
        assert ours == theirs
        text = sidecar.read_text()
        assert text == json.dumps(json.loads(text), indent=2, sort_keys=True)
        with zipfile.ZipFile(npz) as a, zipfile.ZipFile(source) as b:
            assert [(i.filename, i.compress_type, i.file_size) for i in a.infolist()] == [
                (i.filename, i.compress_type, i.file_size) for i in b.infolist()
            ]
        with np.load(npz) as got, np.load(source) as expected:
            for name in expected.files:
                np.testing.assert_array_equal(got[name], expected[name])
                assert got[name].dtype == expected[name].dtype


def test_written_tree_opens(tmp_path):
    for i, subject in enumerate(["01", "02"]):
        arrays = _arrays()
        arrays["recording_embedding"] = arrays["recording_embedding"] + i
        save_embedding_derivative(
            arrays,
            tmp_path / f"sub-{subject}/eeg/sub-{subject}_task-rest_desc-mEOMean_embedding.npz",
            {
                "model_key": "m",
                "subject": subject,
                "condition": "EO",
                "recording_id": f"r{subject}",
            },
        )
    ds = neurocube.open_embeddings(tmp_path)
    np.testing.assert_array_equal(
        ds.embedding.values, np.stack([np.arange(5) + 0.5, np.arange(5) + 1.5]).astype(np.float32)
    )
    assert list(ds.recording_id.values) == ["r01", "r02"]


def test_dataset_and_object_inputs(tmp_path):
    import xarray as xr

    arrays = _arrays()
    ds = xr.Dataset(
        {
            k: (
                ("window", "f")
                if v.ndim == 2
                else ("window",)
                if k != "recording_embedding"
                else ("f",),
                v,
            )
            for k, v in arrays.items()
        },
        attrs={"model_key": "m", "neurocube_sources": ["x"]},
    )
    _, sidecar = save_embedding_derivative(ds, tmp_path / "a_embedding.npz")
    meta = json.loads(sidecar.read_text())
    assert meta["model_key"] == "m" and "neurocube_sources" not in meta

    class Result:
        pass

    result = Result()
    result.metadata = {"model_key": "from-object", "subject": "1"}
    for key, value in arrays.items():
        setattr(result, key, value)
    _, sidecar = save_embedding_derivative(result, tmp_path / "b_embedding.npz", {"subject": "2"})
    meta = json.loads(sidecar.read_text())
    assert (meta["model_key"], meta["subject"]) == ("from-object", "2")


def test_overwrite_and_suffix_rules(tmp_path):
    path = tmp_path / "x_embedding.npz"
    save_embedding_derivative(_arrays(), path)
    with pytest.raises(
        OutputExistsError, match=r"x_embedding\.npz: embedding derivative exists"
    ) as refused:
        save_embedding_derivative(_arrays(), path)
    assert isinstance(refused.value, FileExistsError)  # what callers of the original catch
    save_embedding_derivative(_arrays(width=7), path, overwrite=True)
    assert np.load(path)["window_embeddings"].shape == (3, 7)
    with pytest.raises(FormatError, match=r"must end in \.npz"):
        save_embedding_derivative(_arrays(), tmp_path / "x_embedding.npy")
    with pytest.raises(FormatError, match=r"must be saved to a path ending in '_embedding\.npz'"):
        save_embedding_derivative(_arrays(), tmp_path / "x_tokens.npz")


def test_inconsistent_arrays_write_nothing(tmp_path):
    arrays = _arrays()
    arrays["window_index"] = arrays["window_index"][:2]
    path = tmp_path / "bad_embedding.npz"
    with pytest.raises(FormatError, match=r"window_index has shape \(2,\); its length must equal"):
        save_embedding_derivative(arrays, path)
    del arrays["window_index"]
    with pytest.raises(FormatError, match=r"without arrays \['window_index'\]"):
        save_embedding_derivative(arrays, path)
    assert list(tmp_path.iterdir()) == []


def test_token_contract_required(tmp_path):
    arrays = {
        k: v for k, v in _arrays().items() if k.startswith("window_") and k != "window_embeddings"
    }
    arrays["token_embeddings"] = np.zeros((3, 2, 4), dtype=np.float16)
    path = tmp_path / "t_tokens.npz"
    with pytest.raises(FormatError, match=r"token_axes with one name per axis \(3 axes\)"):
        save_embedding_derivative(arrays, path)
    meta = {"token_axes": ["window", "channel", "feature"], "token_feature_axis": "feature"}
    with pytest.raises(FormatError, match=r"token_observation_axes is missing"):
        save_embedding_derivative(arrays, path, meta)
    meta.update(token_observation_axes=["channel"])
    # coco-pipe's validator refuses a native token file without token_source: never write one
    with pytest.raises(FormatError, match=r"t_tokens\.json: token_source is missing"):
        save_embedding_derivative(arrays, path, meta)
    assert list(tmp_path.iterdir()) == []
    meta.update(token_source="backbone")
    save_embedding_derivative(arrays, path, meta)
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["token_dtype"] == "float16" and side["token_shape"] == [3, 2, 4]
    assert side["token_layout"] == "native" and side["representation"] == "token"
    assert np.load(path)["token_embeddings"].dtype == np.float16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t_tokens.json", "t_tokens.npz"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "x_embedding.npz"

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", broken)
    with pytest.raises(OSError, match="disk full"):
        save_embedding_derivative(_arrays(), path)
    assert list(tmp_path.iterdir()) == []


def test_validate_precise_errors(tmp_path):
    path = tmp_path / POOLED.name
    shutil.copy(POOLED, path)
    shutil.copy(POOLED.with_suffix(".json"), path.with_suffix(".json"))
    assert validate_embedding_derivative(path)["model_key"] == "cbramod"
    with np.load(path) as payload:
        arrays = dict(payload)
    np.savez_compressed(path, **{k: v for k, v in arrays.items() if k != "window_start"})
    with pytest.raises(FormatError, match=r"missing arrays \['window_start'\]"):
        validate_embedding_derivative(path)
    np.savez_compressed(
        path, **{**arrays, "recording_embedding": arrays["recording_embedding"][:3]}
    )
    with pytest.raises(FormatError, match=r"recording_embedding has shape \(3,\); expected \(4,\)"):
        validate_embedding_derivative(path)
    np.savez_compressed(path, **{**arrays, "window_stop": np.arange(5)})
    with pytest.raises(
        FormatError, match=r"window_stop has shape \(5,\); its length must equal the 3"
    ):
        validate_embedding_derivative(path)
    np.savez_compressed(path, **{**arrays, "window_index": np.array([None, 1, 2], dtype=object)})
    with pytest.raises(UnsafeDataError, match=r"'window_index' has an object dtype"):
        validate_embedding_derivative(path)
    np.savez_compressed(path, **arrays)
    path.with_suffix(".json").write_text('"just a string"')
    with pytest.raises(FormatError, match=r"expected a JSON object .* found a str"):
        validate_embedding_derivative(path)
    path.with_suffix(".json").unlink()
    with pytest.raises(DataNotFoundError, match=r"missing embedding sidecar"):
        validate_embedding_derivative(path)
    with pytest.raises(DataNotFoundError, match=r"nope_embedding\.npz: no such embedding artifact"):
        validate_embedding_derivative(tmp_path / "nope_embedding.npz")


def test_manifest_and_description(tmp_path):
    records = [
        {"artifact_path": "sub-01/a_embedding.npz", "status": "success", "shape": np.array([3, 4])},
        {"artifact_path": "sub-02/b_embedding.npz", "status": "failed", "reason": "boom"},
    ]
    manifest = write_embedding_manifest(tmp_path, records)
    payload = json.loads(manifest.read_text())
    assert set(payload) == {"created_at", "records"}
    assert payload["records"][0]["shape"] == [3, 4]
    assert payload["records"][1]["status"] == "failed"
    description = write_embedding_dataset_description(
        tmp_path, "synthetic", "1.11.1", [{"Name": "coco-pipe"}], [{"URL": "bids"}]
    )
    assert json.loads(description.read_text()) == json.loads(
        (SAMPLE / "dataset_description.json").read_text()
    )
    assert description.read_text() == (SAMPLE / "dataset_description.json").read_text()
    bare = write_embedding_dataset_description(tmp_path / "b", "n", "1.9.0", [{"Name": "x"}], [])
    assert "SourceDatasets" not in json.loads(bare.read_text())


def test_coco_pipe_reads_what_we_write(tmp_path):
    coco = pytest.importorskip("coco_pipe.io.embeddings")
    for subject in ("01", "02"):
        save_embedding_derivative(
            _arrays(),
            tmp_path / f"sub-{subject}_desc-mEOMean_embedding.npz",
            {"model_key": "m", "subject": subject, "recording_id": f"r{subject}"},
        )
    tokens = {
        k: v for k, v in _arrays().items() if k in ("window_start", "window_stop", "window_index")
    }
    tokens["token_embeddings"] = np.ones((3, 2, 4), np.float16)
    save_embedding_derivative(
        tokens,
        tmp_path / "sub-01_desc-mEONative_tokens.npz",
        {
            "model_key": "m",
            "token_axes": ["window", "channel", "feature"],
            "token_observation_axes": ["channel"],
            "token_feature_axis": "feature",
            "token_source": "b",
        },
    )
    for path in tmp_path.glob("*.npz"):
        coco.validate_embedding_derivative(path)
    original = coco.load_embedding_derivatives(tmp_path, "epoch", model_key="m")
    np.testing.assert_array_equal(
        np.asarray(original.X), neurocube.open_embeddings(tmp_path, "epoch").embedding.values
    )
    original_tokens = coco.load_embedding_derivatives(tmp_path, "token", model_key="m")
    np.testing.assert_array_equal(
        np.asarray(original_tokens.X), neurocube.open_embeddings(tmp_path, "token").embedding.values
    )
