"""Write foundation-model embedding derivatives in the coco-pipe layout, atomically.

- :func:`save_embedding_derivative`: one artifact, an NPZ (``np.savez_compressed``)
  plus its JSON sidecar (sorted keys, indent 2, ``created_at``, ``arrays``),
  the same bytes layout coco-pipe writes, so coco-pipe and neurocube both read it.
- :func:`validate_embedding_derivative`: checks an artifact from its member
  headers and sidecar (no array data read) and returns the sidecar.
- :func:`write_embedding_manifest`, :func:`write_embedding_dataset_description`:
  ``run_manifest.json`` and the BIDS ``dataset_description.json``.

Each file is written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from neurocube.errors import DataNotFoundError, FormatError, OutputExistsError
from neurocube.io._atomic import atomic_path
from neurocube.sources.embedding_format import (
    ARTIFACT_SUFFIX,
    EMBEDDING_ARRAYS,
    MANIFEST_NAME,
    TOKEN_ARRAYS,
    check_artifact,
    read_sidecar,
    sidecar_path,
)
from neurocube.sources.npz import read_npz_directory

__all__ = [
    "save_embedding_derivative",
    "validate_embedding_derivative",
    "write_embedding_dataset_description",
    "write_embedding_manifest",
]


def _json_ready(value: Any) -> Any:
    """Convert metadata to JSON types (as coco-pipe does; unknown objects become a tag string)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _json_ready(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return value.as_posix()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return f"<{type(value).__module__}.{type(value).__name__}: {value!s}>"


def _dump(payload: Mapping[str, Any]) -> str:
    return json.dumps(_json_ready(payload), indent=2, sort_keys=True)


def _write_text(path: Path, text: str, overwrite: bool = True) -> None:
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _arrays_of(source: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Return (arrays, metadata) from a mapping, an xarray Dataset or an object with attributes."""
    wanted = {*EMBEDDING_ARRAYS, *TOKEN_ARRAYS}
    metadata: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    try:
        import xarray as xr

        is_dataset = isinstance(source, xr.Dataset)
    except ImportError:  # pragma: no cover - xarray is a dependency
        is_dataset = False
    if is_dataset:
        for name in wanted:
            if name in source.variables:
                arrays[name] = np.asarray(source[name].values)
        metadata = {
            k: v
            for k, v in source.attrs.items()
            if not str(k).startswith("neurocube_") and isinstance(v, (str, int, float, bool, list))
        }
    elif isinstance(source, Mapping):
        for name in wanted:
            if source.get(name) is not None:
                arrays[name] = np.asarray(source[name])
        extra = source.get("metadata")
        metadata = dict(extra) if isinstance(extra, Mapping) else {}
    else:
        for name in wanted:
            value = getattr(source, name, None)
            if value is not None:
                arrays[name] = np.asarray(value)
        metadata = dict(getattr(source, "metadata", None) or {})
    return arrays, metadata


def save_embedding_derivative(
    arrays_or_dataset: Any,
    path: str | os.PathLike[str],
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write one embedding artifact (NPZ + JSON sidecar) as coco-pipe does, atomically.

    Parameters
    ----------
    arrays_or_dataset
        A mapping (or an :class:`xarray.Dataset`, or an object with attributes)
        holding either ``window_embeddings`` (n_windows, D), ``recording_embedding``
        (D,), ``window_start``, ``window_stop``, ``window_index`` (n_windows,) for a
        pooled artifact, or ``token_embeddings`` (n_windows, ...) and the three
        window arrays for a token artifact. A mapping may carry a ``metadata``
        entry; an object a ``metadata`` attribute; a Dataset its attrs.
    path
        Destination ending in ``_embedding.npz`` (pooled) or ``_tokens.npz`` (tokens).
    metadata
        Sidecar values (``model_key``, ``subject``, ``condition``, ``recording_id``,
        ...); they override the source's own metadata. Token artifacts need
        ``token_axes`` (one name per axis, starting with ``window``),
        ``token_observation_axes``, ``token_feature_axis`` and ``token_source``.
    overwrite
        Replace an existing artifact (NPZ or sidecar); default False.

    Returns
    -------
    tuple of pathlib.Path
        The NPZ and sidecar paths.

    Raises
    ------
    FormatError
        For a wrong suffix, missing arrays, inconsistent shapes, or an incomplete
        token axis contract (nothing is written then).
    OutputExistsError
        (a ``FileExistsError``) If the artifact exists and ``overwrite`` is False.
    """
    target = Path(path)
    if target.suffix != ".npz":
        raise FormatError(f"{target}: an embedding derivative path must end in .npz.")
    arrays, source_metadata = _arrays_of(arrays_or_dataset)
    is_token = "token_embeddings" in arrays
    kind = "token" if is_token else "embedding"
    suffix = ARTIFACT_SUFFIX[kind]
    if not target.name.endswith(suffix):
        raise FormatError(
            f"{target}: a {kind} artifact must be saved to a path ending in {suffix!r} "
            "(the suffix is how readers tell the kinds apart)."
        )
    side = sidecar_path(target)
    if not overwrite and (target.exists() or side.exists()):
        raise OutputExistsError(
            f"{target}: embedding derivative exists; pass overwrite=True to replace it."
        )
    required = TOKEN_ARRAYS if is_token else EMBEDDING_ARRAYS
    missing = [name for name in required if name not in arrays]
    if missing:
        raise FormatError(
            f"{target}: cannot write a {kind} artifact without arrays {missing} "
            f"(given {sorted(arrays)})."
        )
    for name in required:
        if arrays[name].dtype.hasobject:
            raise FormatError(
                f"{target}: array {name!r} has an object dtype; give a numeric array."
            )
    contract = {**source_metadata, **dict(metadata or {})}
    if is_token:
        tokens = arrays["token_embeddings"]
        axes = contract.get("token_axes")
        if not isinstance(axes, list) or len(axes) != tokens.ndim:
            raise FormatError(
                f"{target}: saving native tokens needs token_axes with one name per axis "
                f"({tokens.ndim} axes), got {axes!r}."
            )
        declared = {
            "arrays": {
                "token_embeddings": list(axes),
                "window_start": ["window"],
                "window_stop": ["window"],
                "window_index": ["window"],
            }
        }
        extra: dict[str, Any] = {
            "representation": "token",
            "token_layout": "native",
            "token_layout_version": 1,
            "token_shape": list(tokens.shape),
            "token_dtype": str(tokens.dtype),
        }
    else:
        declared = {
            "arrays": {
                "window_embeddings": ["window", "embedding_feature"],
                "recording_embedding": ["embedding_feature"],
                "window_start": ["window"],
                "window_stop": ["window"],
                "window_index": ["window"],
            }
        }
        extra = {}
    payload = {**contract, **extra, "created_at": _now(), **declared}
    saved = {name: arrays[name] for name in required}
    # Check the contract on what is about to be written (same rules as the reader).
    from neurocube.sources.npz import NpzMember

    fake = {
        name: NpzMember(str(target), name, tuple(a.shape), a.dtype.str, False, 8, 0, 0, 0, 0, 0)
        for name, a in saved.items()
    }
    check_artifact(str(target), fake, payload)
    with atomic_path(target, overwrite=overwrite) as tmp_npz:
        np.savez_compressed(tmp_npz, **saved)  # type: ignore[arg-type]
        _write_text(side, _dump(payload), overwrite=True)
    validate_embedding_derivative(target)
    return target, side


def validate_embedding_derivative(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check an artifact's arrays and sidecar; return the sidecar metadata.

    Reads the NPZ directory and member headers only (no array data).

    Raises
    ------
    DataNotFoundError
        If the NPZ or its sidecar is missing.
    FormatError
        If an array is missing, lengths are unequal, the window embeddings are not
        2-D, the recording embedding's width differs, the token axis contract is
        incomplete, or the sidecar is not a JSON object. Messages name the file.
    UnsafeDataError
        If a member has an object dtype.
    TruncatedFileError
        If the archive is cut short.
    """
    target = Path(path)
    if not target.exists():
        raise DataNotFoundError(f"{target}: no such embedding artifact.")
    metadata = read_sidecar(target)
    members = read_npz_directory(target)
    check_artifact(str(target), members, metadata)
    return metadata


def write_embedding_manifest(
    root: str | os.PathLike[str], records: Iterable[Mapping[str, Any]]
) -> Path:
    """Write ``<root>/run_manifest.json`` (``created_at`` and ``records``), atomically.

    Each record is the artifact's metadata plus ``artifact_path`` (relative to
    ``root`` or absolute), ``status`` (``success`` / ``failed`` / ``skipped``)
    and optionally ``reason``. Readers use only successful records.
    """
    path = Path(root) / MANIFEST_NAME
    payload = {"created_at": _now(), "records": [_json_ready(dict(r)) for r in records]}
    _write_text(path, _dump(payload))
    return path


def write_embedding_dataset_description(
    root: str | os.PathLike[str],
    name: str,
    bids_version: str,
    generated_by: Sequence[Mapping[str, Any]],
    source_datasets: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Write the BIDS derivative ``<root>/dataset_description.json``, atomically.

    Keys: ``Name``, ``BIDSVersion``, ``DatasetType: "derivative"``,
    ``GeneratedBy`` and, when given and non-empty, ``SourceDatasets``.
    """
    path = Path(root) / "dataset_description.json"
    payload: dict[str, Any] = {
        "Name": name,
        "BIDSVersion": bids_version,
        "DatasetType": "derivative",
        "GeneratedBy": [_json_ready(item) for item in generated_by],
    }
    if source_datasets:
        payload["SourceDatasets"] = [_json_ready(item) for item in source_datasets]
    _write_text(path, _dump(payload))
    return path
