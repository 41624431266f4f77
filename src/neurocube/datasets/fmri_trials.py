"""The trial tables of a fMRI bucket: reading them, naming each trial's image, and coordinates.

Each session has a TSV of its trials (one row per beta volume). Newer tables
label a trial ``shared_<image>`` or ``unique_<image>``; older ones give a
``stimulus_id`` to look up in the stimuli metadata CSV. :func:`read_trial_table`
reads and checks one table, :func:`annotate_trials` adds each trial's
``image_name``, ``stim_idx``, ``dataset`` and ``unique_or_shared``, and
:func:`trial_coords` turns the columns into ``trial`` coordinates.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import pandas as pd

from neurocube import storage
from neurocube.errors import FormatError

__all__ = ["annotate_trials", "read_csv", "read_trial_table", "same_session", "trial_coords"]

#: Remote sidecars (TSVs, CSVs, surface ROIs) are read in blocks this large: one request for
#: a small file, a few for a big captions CSV.
SIDECAR_BLOCK = 8 << 20

_LABEL_PREFIX = re.compile(r"^(shared|unique)_(.+)$")


def read_csv(path: str, sep: str = ",", storage_options: Any = None) -> pd.DataFrame:
    """Read a CSV (or a TSV, with a tab as ``sep``) as strings; damage is a :class:`FormatError`."""
    with storage.open_file(path, "rb", storage_options, block_size=SIDECAR_BLOCK) as handle:
        kind = "TSV" if sep == chr(9) else "CSV"
        try:
            return pd.read_csv(handle, sep=sep, dtype=str, keep_default_na=False)
        except pd.errors.EmptyDataError as exc:
            raise FormatError(
                f"{path}: an empty {kind} (no header line); expected a header naming its columns "
                "and one row per entry. Re-download the file."
            ) from exc
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise FormatError(f"{path}: not a readable {kind} ({exc})") from exc


_INT_COLUMNS = ("run", "beta_index")


def read_trial_table(path: str, session: str, storage_options: Any = None) -> pd.DataFrame:
    """Read one session's trial TSV, checked, with ``session`` and ``session_trial`` columns."""
    table = read_csv(path, sep="\t", storage_options=storage_options)
    if "label" not in table.columns and "stimulus_id" not in table.columns:
        raise FormatError(
            f"{path}: a trial table needs a 'label' column (or 'stimulus_id' in older buckets); "
            f"found columns {list(table.columns)}"
        )
    for column in _INT_COLUMNS:
        if column in table.columns:
            try:
                table[column] = table[column].astype(np.int64)
            except ValueError as exc:
                raise FormatError(f"{path}: column {column!r} must hold integers ({exc})") from exc
    if "session" in table.columns and not table.empty:
        bad = {value for value in set(table["session"]) if not same_session(value, session)}
        if bad:
            raise FormatError(
                f"{path}: its 'session' column says {sorted(bad)}, but the file is in folder "
                f"{session}; expected {session!r} (or its number) on every row"
            )
    table["session"] = session
    table["session_trial"] = np.arange(len(table), dtype=np.int64)
    return table


def same_session(value: str, session: str) -> bool:
    """Return True if a trial table's ``session`` cell names ``session``.

    Older tables write the number: ``ses-01``, ``01`` and ``1`` all name
    folder ``ses-01``; ``ses-02`` or ``2`` do not.
    """
    cell = str(value).strip()
    label = session[4:] if session.startswith("ses-") else session
    cell = cell[4:] if cell.startswith("ses-") else cell
    if cell == label:
        return True
    return cell.isdigit() and label.isdigit() and int(cell) == int(label)


def annotate_trials(table: pd.DataFrame, stimuli: pd.DataFrame | None, where: str) -> pd.DataFrame:
    """Add each trial's ``image_name``, ``stim_idx``, ``dataset`` and ``unique_or_shared``."""
    names_known: dict[str, int] = {}
    if stimuli is not None:
        names_known = {name: i for i, name in enumerate(stimuli["image_name"].tolist())}
    image_names: list[str] = []
    kinds: list[str] = []
    if "label" in table.columns:
        for label in table["label"].tolist():
            match = _LABEL_PREFIX.match(label)
            kind, rest = (match.group(1), match.group(2)) if match else ("", label)
            candidates = [rest, os.path.splitext(rest)[0], label]
            name = next((c for c in candidates if c in names_known), rest)
            image_names.append(name)
            kinds.append(kind)
    else:  # older trial tables: stimulus_id joined against the metadata CSV
        if stimuli is None:
            raise FormatError(
                f"{where}: an older trial table (stimulus_id, no label) needs "
                "stimuli/task-images_metadata.csv to know each trial's image; it is not on disk"
            )
        for sid in table["stimulus_id"].tolist():
            if sid in names_known:
                image_names.append(sid)
            elif sid.isdigit() and int(sid) < len(stimuli):
                image_names.append(str(stimuli["image_name"].iloc[int(sid)]))
            else:
                raise FormatError(
                    f"{where}: stimulus_id {sid!r} is neither an image_name nor a row of the "
                    "stimuli metadata CSV"
                )
            kinds.append("")
    out = table.copy()
    out["image_name"] = image_names
    out["stim_idx"] = np.array([names_known.get(n, -1) for n in image_names], dtype=np.int64)
    if stimuli is not None:
        by_row = out["stim_idx"].to_numpy()
        meta_kind = np.asarray([*stimuli["unique_or_shared"].tolist(), ""], dtype=object)
        meta_dataset = np.asarray([*stimuli["dataset"].tolist(), ""], dtype=object)
        kinds = [k or str(meta_kind[r]) for k, r in zip(kinds, by_row, strict=True)]
        out["dataset"] = [str(v) for v in meta_dataset[by_row]]
    else:
        out["dataset"] = ""
    out["unique_or_shared"] = kinds
    return out


def trial_coords(trials: pd.DataFrame, subject: str) -> dict[str, Any]:
    """Return a ``trial`` coordinate per column of ``trials``, plus ``subject``."""
    coords: dict[str, Any] = {"subject": ("trial", np.asarray([subject] * len(trials), dtype=str))}
    for column in trials.columns:
        values = trials[column]
        if values.dtype.kind in "iub":
            array = values.to_numpy()
        elif values.dtype.kind == "f":
            array = values.to_numpy(dtype=np.float64)
        else:
            array = np.asarray([str(v) for v in values.tolist()], dtype=str)
            if array.size == 0:
                array = array.astype("<U1")
        coords[str(column)] = ("trial", array)
    return coords
