"""The embedding derivative format (coco-pipe's): names, required arrays, sidecars, checks.

An artifact is an NPZ whose file-name suffix marks its kind
(:data:`ARTIFACT_SUFFIX`) plus a JSON sidecar with the same stem; a run's
artifacts are listed in ``run_manifest.json`` (:data:`MANIFEST_NAME`). These
are the facts and rules both the writer (:mod:`neurocube.io.embeddings`) and
the catalog (:mod:`neurocube.catalog.embeddings`) apply, so they live here,
below both: which arrays each kind needs (:data:`EMBEDDING_ARRAYS`,
:data:`TOKEN_ARRAYS`), where the sidecar is (:func:`sidecar_path`,
:func:`sidecar_location`), reading it (:func:`read_sidecar`) and checking an
artifact from its member headers (:func:`check_artifact`, no array data read).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from neurocube.errors import DataNotFoundError, FormatError
from neurocube.sources.npz import NpzMember
from neurocube.storage import IO_STATS, is_url, open_file

__all__ = [
    "ARTIFACT_SUFFIX",
    "EMBEDDING_ARRAYS",
    "MANIFEST_NAME",
    "TOKEN_ARRAYS",
    "WINDOW_ARRAYS",
    "artifact_kind",
    "check_artifact",
    "read_sidecar",
    "sidecar_location",
    "sidecar_path",
]

ARTIFACT_SUFFIX: dict[str, str] = {"embedding": "_embedding.npz", "token": "_tokens.npz"}
"""File-name suffix of each artifact kind (the suffix is what marks the kind)."""

WINDOW_ARRAYS = ("window_start", "window_stop", "window_index")
EMBEDDING_ARRAYS = ("window_embeddings", "recording_embedding", *WINDOW_ARRAYS)
TOKEN_ARRAYS = ("token_embeddings", *WINDOW_ARRAYS)
MANIFEST_NAME = "run_manifest.json"


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """Return the JSON sidecar paired with an artifact NPZ (same stem, ``.json``).

    For a URL use :func:`sidecar_location` (a URL is not a :class:`~pathlib.Path`).
    """
    return Path(path).with_suffix(".json")


def sidecar_location(path: str | os.PathLike[str]) -> str:
    """Return the sidecar of an artifact as text: a local path or a URL."""
    return os.path.splitext(os.fspath(path))[0] + ".json"


def artifact_kind(path: str | os.PathLike[str]) -> str | None:
    """Return ``"embedding"`` or ``"token"`` from a file name's suffix, else None."""
    name = Path(path).name
    for kind, suffix in ARTIFACT_SUFFIX.items():
        if name.endswith(suffix):
            return kind
    return None


def read_sidecar(
    path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Read the JSON sidecar of an artifact NPZ.

    Parameters
    ----------
    path
        The ``.npz`` artifact (its sidecar is found beside it) or the ``.json`` itself;
        a local path or a URL.
    storage_options
        fsspec options for a URL.

    Raises
    ------
    DataNotFoundError
        If the sidecar does not exist.
    FormatError
        If it is not valid JSON or not a JSON object.
    """
    side = sidecar_location(path)
    try:
        if is_url(side):  # one request for the whole (small) object
            with open_file(side, "rb", storage_options, cache_type="all") as fh:
                raw = fh.read()
        else:
            with open_file(side) as fh:
                raw = fh.read()
    except DataNotFoundError as exc:
        raise DataNotFoundError(
            f"{side}: missing embedding sidecar for {os.path.basename(path)}. Every artifact "
            "NPZ needs a JSON sidecar with the same stem; re-export the artifact with "
            "neurocube.io.save_embedding_derivative."
        ) from exc
    IO_STATS.add_bytes(len(raw))
    try:
        metadata = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, a 5000-digit number
        raise FormatError(f"{side}: sidecar is not valid JSON ({exc}); fix or rewrite it.") from exc
    if not isinstance(metadata, dict):
        raise FormatError(
            f"{side}: expected a JSON object (a mapping of metadata), found a "
            f"{type(metadata).__name__}; rewrite the sidecar."
        )
    return metadata


def check_artifact(path: str, members: Mapping[str, NpzMember], metadata: Mapping[str, Any]) -> str:
    """Check an artifact's arrays and token contract; return its kind.

    Applies coco-pipe's validation rules to the member headers (no data read):
    required arrays present, 2-D window embeddings, a recording embedding as wide
    as the windows, window arrays as long as the embeddings; token files need
    ``ndim >= 3`` and (for the native layout) a complete axis contract:
    ``token_axes`` naming every axis from ``window``, ``token_observation_axes``,
    ``token_feature_axis`` and ``token_source``.

    Raises
    ------
    FormatError
        With the file, the rule broken and what was found.
    """
    names = set(members)
    is_token = "token_embeddings" in names and "window_embeddings" not in names
    required = TOKEN_ARRAYS if is_token else EMBEDDING_ARRAYS
    missing = sorted(set(required) - names)
    if missing:
        raise FormatError(
            f"{path}: missing arrays {missing} (found {sorted(names)}); a "
            f"{'token' if is_token else 'pooled embedding'} artifact needs {list(required)}."
        )
    if is_token:
        tokens = members["token_embeddings"]
        if len(tokens.shape) < 3:
            raise FormatError(
                f"{path}: token_embeddings has shape {tokens.shape}; expected a window axis and "
                "at least two native axes (ndim >= 3)."
            )
        n_rows = tokens.shape[0]
        lead = "token_embeddings"
        if metadata.get("token_layout") == "native":
            _check_token_contract(path, metadata, len(tokens.shape))
    else:
        windows = members["window_embeddings"]
        recording = members["recording_embedding"]
        if len(windows.shape) != 2:
            raise FormatError(
                f"{path}: window_embeddings has shape {windows.shape}; "
                "expected 2-D (window, feature)."
            )
        if len(recording.shape) != 1 or recording.shape[0] != windows.shape[1]:
            raise FormatError(
                f"{path}: recording_embedding has shape {recording.shape}; expected "
                f"({windows.shape[1]},) to match window_embeddings {windows.shape}."
            )
        n_rows = windows.shape[0]
        lead = "window_embeddings"
    for key in WINDOW_ARRAYS:
        shape = members[key].shape
        if len(shape) != 1 or shape[0] != n_rows:
            raise FormatError(
                f"{path}: {key} has shape {shape}; its length must equal the {n_rows} rows of "
                f"{lead} (unequal lengths)."
            )
    return "token" if is_token else "embedding"


def _check_token_contract(path: str, metadata: Mapping[str, Any], ndim: int) -> None:
    axes = metadata.get("token_axes")
    if not isinstance(axes, list) or len(axes) != ndim:
        raise FormatError(
            f"{sidecar_path(path)}: token_axes {axes!r} must name each of the {ndim} axes of "
            "token_embeddings."
        )
    if axes[0] != "window" or len(set(axes)) != len(axes):
        raise FormatError(
            f"{sidecar_path(path)}: token_axes {axes!r} must be unique and start with 'window'."
        )
    observation = metadata.get("token_observation_axes")
    feature = metadata.get("token_feature_axis")
    if not isinstance(observation, list) or not observation:
        raise FormatError(f"{sidecar_path(path)}: token_observation_axes is missing or empty.")
    if not isinstance(feature, str) or not feature:
        raise FormatError(f"{sidecar_path(path)}: token_feature_axis is missing.")
    source = metadata.get("token_source")
    if not isinstance(source, str) or not source:
        # coco-pipe's validator refuses a native token artifact without it, so its
        # loader could not read a file written without it
        raise FormatError(
            f"{sidecar_path(path)}: token_source is missing; native token artifacts name the "
            "model output their tokens come from (e.g. 'backbone')."
        )
    if set(axes) != {"window", *observation, feature}:
        raise FormatError(
            f"{sidecar_path(path)}: every non-window token axis must be an observation axis or "
            f"the feature axis; token_axes={axes}, observation={observation}, feature={feature!r}."
        )
